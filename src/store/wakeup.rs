//! Early wake-ups for idle loops: PostgreSQL LISTEN/NOTIFY (migration 2 adds
//! a statement trigger on each table); other stores just sleep.

use std::time::Duration;

use sqlx::postgres::PgListener;

use super::AnyStore;
use crate::error::{Result, storage};
use crate::model::Table;

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

impl AnyWakeup {
    /// Waits up to `max`, returning early on a notification (after taking
    /// every notification already received).
    pub async fn wait(&mut self, max: Duration) {
        match self {
            AnyWakeup::Sleep => tokio::time::sleep(max).await,
            AnyWakeup::Notify(listener) => match tokio::time::timeout(max, listener.recv()).await {
                Ok(Ok(_)) => drain(listener),
                Err(_) => {}
                Ok(Err(e)) => {
                    // The listener reconnects on its next recv; until then, poll.
                    tracing::debug!(error = %e, "notification listener failed; polling");
                    tokio::time::sleep(max).await;
                }
            },
        }
    }
}

/// Takes every notification that is already here, without waiting. The
/// claim that follows a wake-up starts after them, so it sees every row they
/// announce (a notification is sent after its transaction committed): one
/// wake-up covers them all. Without this, the notifications of rows a relay
/// claimed while busy would each wake it once more for an empty claim.
fn drain(listener: &mut PgListener) {
    use futures_util::FutureExt;
    // Bounded: a flood of notifications is drained by the next wake-ups.
    for _ in 0..10_000 {
        if listener.next_buffered().is_some() {
            continue;
        }
        match listener.recv().now_or_never() {
            Some(Ok(_)) => {}
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Notifications that piled up while a relay was busy wake it once, and
    /// the next wait is not cut short by one of them (which cost an empty
    /// claim per stale notification). A channel of its own, so that other
    /// tests' inserts on the same server do not wake it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn piled_up_notifications_wake_once() {
        let Ok(url) = std::env::var("OMNIBOX_TEST_DATABASE_URL") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "OMNIBOX_TEST_DATABASE_URL is required under CI"
            );
            return;
        };
        let channel = format!("omnibox_test_{}", uuid::Uuid::new_v4().simple());
        let mut listener = PgListener::connect(&url).await.unwrap();
        listener.listen(&channel).await.unwrap();
        let mut wakeup = AnyWakeup::Notify(Box::new(listener));
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        for i in 0..50 {
            // Each its own transaction: 50 notifications.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&channel)
                .bind(format!("piled-{i}"))
                .execute(&pool)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        wakeup.wait(Duration::from_secs(10)).await;
        assert!(t.elapsed() < Duration::from_secs(5), "woken by the first");
        // Nothing new since: the next wait runs its whole interval.
        let t = Instant::now();
        wakeup.wait(Duration::from_millis(500)).await;
        assert!(
            t.elapsed() >= Duration::from_millis(450),
            "woken again by a notification already covered, after {:?}",
            t.elapsed()
        );
        // A new one still wakes it.
        sqlx::query("SELECT pg_notify($1, 'fresh')")
            .bind(&channel)
            .execute(&pool)
            .await
            .unwrap();
        let t = Instant::now();
        wakeup.wait(Duration::from_secs(10)).await;
        assert!(t.elapsed() < Duration::from_secs(5), "woken by a new one");
        pool.close().await;
    }
}
