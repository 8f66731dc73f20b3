//! Transactions on a backend chosen by URL: chunked bulk inserts
//! ([`OutboxBulkWriter`]) and the inbox consumer's transaction
//! ([`InboxTx`]).

use uuid::Uuid;

use super::postgres::PgRoute;
use super::sqlite::SqliteRoute;
use super::{BulkOutcome, ClaimToken, EventStore, Redelivered, TableCounts};
use crate::error::Result;
use crate::model::{InboxEvent, InboxRoute, OutboxEvent, OutboxRoute};

use super::any::AnyTable;

/// A transaction for inserting many outbox events in chunks (for inputs too
/// large to hold in memory): nothing is visible until [`commit`](Self::commit),
/// and dropping the writer rolls everything back.
#[derive(Debug)]
pub struct OutboxBulkWriter {
    tx: BulkTx,
}

/// An open write transaction of either backend.
#[derive(Debug)]
pub(crate) enum BulkTx {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl BulkTx {
    /// Commits (`true`) or rolls back.
    async fn finish(self, commit: bool) -> Result<()> {
        let done = match (self, commit) {
            (BulkTx::Postgres(tx), true) => tx.commit().await,
            (BulkTx::Postgres(tx), false) => tx.rollback().await,
            (BulkTx::Sqlite(tx), true) => tx.commit().await,
            (BulkTx::Sqlite(tx), false) => tx.rollback().await,
        };
        done.map_err(crate::error::storage)
    }
}

impl<R> AnyTable<R> {
    /// A write transaction (`BEGIN IMMEDIATE` on SQLite, so that the write
    /// lock is taken up front rather than on a later upgrade).
    async fn begin_tx(&self) -> Result<BulkTx> {
        Ok(match self {
            AnyTable::Postgres(t) => {
                BulkTx::Postgres(t.pool().begin().await.map_err(crate::error::storage)?)
            }
            AnyTable::Sqlite(t) => BulkTx::Sqlite(crate::store::sqlite::write_tx(t.pool()).await?),
        })
    }
}

impl AnyTable<OutboxRoute> {
    /// Opens a bulk insert transaction.
    pub async fn begin_bulk(&self) -> Result<OutboxBulkWriter> {
        let tx = self.begin_tx().await?;
        Ok(OutboxBulkWriter { tx })
    }
}

impl OutboxBulkWriter {
    /// Inserts events in order, respecting idempotency keys.
    pub async fn insert(&mut self, events: &[OutboxEvent]) -> Result<Vec<BulkOutcome>> {
        match &mut self.tx {
            BulkTx::Postgres(tx) => super::postgres::insert_outbox(tx, events).await,
            BulkTx::Sqlite(tx) => super::sqlite::insert_outbox(tx, events).await,
        }
    }

    /// Inserts a stream of chunks in order (PostgreSQL: one streaming COPY
    /// for runs without idempotency keys). Stops at the first error, of the
    /// stream or of the database; call [`rollback`](Self::rollback) then (or drop the writer).
    pub async fn insert_stream<S>(&mut self, chunks: S) -> Result<Vec<BulkOutcome>>
    where
        S: futures_util::Stream<Item = Result<Vec<OutboxEvent>>> + Send,
    {
        let mut out = Vec::new();
        self.insert_stream_with(chunks, |o| out.extend_from_slice(o))
            .await?;
        Ok(out)
    }

    /// [`insert_stream`](Self::insert_stream), handing each chunk's
    /// outcomes to `outcomes` as it is written instead of collecting them:
    /// a writer of any number of events holds one chunk at a time.
    pub async fn insert_stream_with<S, F>(&mut self, chunks: S, mut outcomes: F) -> Result<()>
    where
        S: futures_util::Stream<Item = Result<Vec<OutboxEvent>>> + Send,
        F: FnMut(&[BulkOutcome]) + Send,
    {
        match &mut self.tx {
            BulkTx::Postgres(tx) => {
                super::postgres::insert_outbox_stream(tx, chunks, outcomes).await
            }
            BulkTx::Sqlite(tx) => {
                use futures_util::StreamExt;
                let mut chunks = std::pin::pin!(chunks);
                while let Some(chunk) = chunks.next().await {
                    outcomes(&super::sqlite::insert_outbox(tx, &chunk?).await?);
                }
                Ok(())
            }
        }
    }

    /// Commits everything inserted.
    pub async fn commit(self) -> Result<()> {
        self.tx.finish(true).await
    }

    /// Discards everything inserted.
    pub async fn rollback(self) -> Result<()> {
        self.tx.finish(false).await
    }
}

impl<R: PgRoute + SqliteRoute> AnyTable<R> {
    /// Counts for a status report, fast on tables of many millions of rows:
    /// on a large PostgreSQL table `completed` is an estimate (flagged in
    /// [`TableCounts::completed_is_estimate`]) and the rest exact; otherwise
    /// the same as [`EventStore::counts`].
    pub async fn status_counts(&self) -> Result<TableCounts> {
        match self {
            AnyTable::Postgres(t) => super::postgres::maintenance::status_counts(t).await,
            AnyTable::Sqlite(t) => t.counts().await,
        }
    }

    /// For rates (`status --watch`): the highest `seq` (rows ever inserted,
    /// gaps aside) and the rows completed after `since` (by the completion
    /// index, so cheap on any table size).
    pub async fn progress(&self, since: crate::model::Timestamp) -> Result<(i64, u64)> {
        let t = R::TABLE.sql_name();
        let row: (Option<i64>, i64) = match self {
            AnyTable::Postgres(p) => {
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT (SELECT max(seq) FROM {t}),
                        (SELECT count(*) FROM {t} WHERE status = 'completed' AND completed_at > $1)"
            )))
                .bind(since)
                .fetch_one(p.pool())
                .await
            }
            AnyTable::Sqlite(s) => {
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT (SELECT max(seq) FROM {t}),
                        (SELECT count(*) FROM {t} WHERE status = 'completed' AND completed_at > ?1)"
            )))
                .bind(crate::model::time::format(&since))
                .fetch_one(s.pool())
                .await
            }
        }
        .map_err(crate::error::storage)?;
        Ok((row.0.unwrap_or(0), row.1.max(0) as u64))
    }
}

/// A transaction on the inbox table for the consumer: insert a batch (with
/// deduplication), lock, complete or delete the new rows, then commit. Used
/// for the exactly-once path, where storing the rows, running the handler and
/// marking them completed commit together.
#[derive(Debug)]
pub struct InboxTx {
    tx: BulkTx,
}

impl AnyTable<InboxRoute> {
    /// Opens an inbox transaction.
    pub async fn begin(&self) -> Result<InboxTx> {
        let tx = self.begin_tx().await?;
        Ok(InboxTx { tx })
    }
}

impl InboxTx {
    /// The transaction itself (handlers write in it).
    pub(crate) fn bulk(&mut self) -> &mut BulkTx {
        &mut self.tx
    }

    /// Inserts events in order; an existing `(message_id, consumer_group)` is
    /// reported as existing and not written.
    pub async fn insert(&mut self, events: &[InboxEvent]) -> Result<Vec<BulkOutcome>> {
        match &mut self.tx {
            BulkTx::Postgres(tx) => super::postgres::insert_inbox(tx, events).await,
            BulkTx::Sqlite(tx) => super::sqlite::insert_inbox(tx, events).await,
        }
    }

    /// Locks rows for `token` (so no processor claims them while a handler runs).
    pub async fn lock(&mut self, ids: &[Uuid], token: &ClaimToken) -> Result<()> {
        match &mut self.tx {
            BulkTx::Postgres(tx) => super::postgres::lock_inbox(tx, ids, token).await,
            BulkTx::Sqlite(tx) => super::sqlite::lock_inbox(tx, ids, token).await,
        }
    }

    /// Pending rows met again (a message delivered again): each
    /// one that is due and not held by a live lease is locked for `token` and
    /// returned as [`Redelivered::Taken`]; the others say how long to wait.
    /// Rows that are completed or failed are not in the map (duplicates).
    pub async fn take(
        &mut self,
        ids: &[Uuid],
        token: &ClaimToken,
    ) -> Result<std::collections::HashMap<Uuid, Redelivered>> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        match &mut self.tx {
            BulkTx::Postgres(tx) => super::postgres::take_inbox(tx, ids, token).await,
            BulkTx::Sqlite(tx) => super::sqlite::take_inbox(tx, ids, token).await,
        }
    }

    /// Unlocks rows (taken, then not handled in this batch).
    pub async fn unlock(&mut self, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match &mut self.tx {
            BulkTx::Postgres(tx) => super::postgres::unlock_inbox(tx, ids).await,
            BulkTx::Sqlite(tx) => super::sqlite::unlock_inbox(tx, ids).await,
        }
    }

    /// Marks rows completed (and unlocked).
    pub async fn complete(&mut self, ids: &[Uuid]) -> Result<()> {
        match &mut self.tx {
            BulkTx::Postgres(tx) => super::postgres::complete_inbox(tx, ids).await,
            BulkTx::Sqlite(tx) => super::sqlite::complete_inbox(tx, ids).await,
        }
    }

    /// Marks the claimed row of `event` completed, if its claim (the
    /// worker and lock time it was claimed with) still holds it. Returns
    /// whether it did.
    pub async fn complete_claimed(&mut self, event: &crate::model::InboxEvent) -> Result<bool> {
        let (Some(worker), Some(locked_at)) = (event.locked_by(), event.locked_at()) else {
            return Ok(false);
        };
        match &mut self.tx {
            BulkTx::Postgres(tx) => {
                super::postgres::complete_claimed_inbox(tx, event.id(), worker, &locked_at).await
            }
            BulkTx::Sqlite(tx) => {
                super::sqlite::complete_claimed_inbox(tx, event.id(), worker, &locked_at).await
            }
        }
    }

    /// Deletes rows written in this transaction (a handler failed: as if never stored).
    pub async fn delete(&mut self, ids: &[Uuid]) -> Result<()> {
        match &mut self.tx {
            BulkTx::Postgres(tx) => super::postgres::delete_inbox(tx, ids).await,
            BulkTx::Sqlite(tx) => super::sqlite::delete_inbox(tx, ids).await,
        }
    }

    /// Commits.
    pub async fn commit(self) -> Result<()> {
        self.tx.finish(true).await
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<()> {
        self.tx.finish(false).await
    }
}
