//! Early wake-ups for idle loops: PostgreSQL LISTEN/NOTIFY (migration 2 adds
//! a statement trigger on each table); other stores just sleep.

use std::time::Duration;

use sqlx::postgres::PgListener;

use super::AnyStore;
use crate::error::{Result, storage};
use crate::model::Table;
use crate::pipeline::Wakeup;

/// A wake-up source for one table.
#[derive(Debug)]
pub enum AnyWakeup {
    /// Sleep the whole interval.
    Sleep,
    /// Wake on a notification on the table's channel (or after the interval).
    Notify(Box<PgListener>),
}

impl AnyStore {
    /// A wake-up source for idle loops over `table`: notifications on
    /// PostgreSQL, plain sleeps on SQLite.
    pub async fn wakeup(&self, table: Table) -> Result<AnyWakeup> {
        match self {
            AnyStore::Postgres(s) => {
                let mut listener = PgListener::connect_with(s.pool()).await.map_err(storage)?;
                let channel = match table {
                    Table::Outbox => "omnibox_outbox",
                    Table::Inbox => "omnibox_inbox",
                };
                listener.listen(channel).await.map_err(storage)?;
                Ok(AnyWakeup::Notify(Box::new(listener)))
            }
            AnyStore::Sqlite(_) => Ok(AnyWakeup::Sleep),
        }
    }
}

impl Wakeup for AnyWakeup {
    async fn wait(&mut self, max: Duration) {
        match self {
            AnyWakeup::Sleep => tokio::time::sleep(max).await,
            AnyWakeup::Notify(listener) => match tokio::time::timeout(max, listener.recv()).await {
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => {
                    // The listener reconnects on its next recv; until then, poll.
                    tracing::debug!(error = %e, "notification listener failed; polling");
                    tokio::time::sleep(max).await;
                }
            },
        }
    }
}
