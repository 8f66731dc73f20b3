//! What each backend provides to the features written once above it (the
//! audit trail and the dead-letter table): statements on its pool
//! ([`Driver`]) and on one of its write transactions ([`FeatureTx`]). The
//! SQL lives in the backends (`postgres/driver.rs`, `sqlite/driver.rs`); the
//! logic (what runs in which transaction, what is checked and recorded)
//! lives in the features (`audit.rs`, `dead_letters.rs`), once for both.
//!
//! A feature reaches the backend of an [`AnyStore`](super::AnyStore)
//! through `with_driver!` (`any.rs`), the one place that switches on it.

use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

use super::BulkOutcome;
use super::audit::{AuditEntry, AuditFilter, AuditedChange};
use super::dead_letters::{DeadLetterFilter, DeadLetterRecord, NewLetter};
use super::diagnostics::{ClaimPlan, ReplicationSlot, Statistics, TableHealth};
use super::dialect::{self, Dialect};
use super::table::Pooled;
use crate::error::Result;
use crate::model::{InboxEvent, OutboxEvent, Table, UnlockReason};

/// Rows a retention run deletes, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retention {
    /// Audit rows recorded before the cut-off.
    Audit,
    /// Dead letters replayed before the cut-off (open letters never).
    ReplayedLetters,
}

/// A backend's statements for the features, on its pool.
pub(crate) trait Driver: Pooled + Sync {
    /// A write transaction of this backend.
    type Tx: FeatureTx;
    /// The backend's dialect.
    type D: Dialect<Db = <Self as Pooled>::Db>;

    /// Opens a write transaction (SQLite takes the write lock at once, so
    /// what the transaction reads is what it changes).
    fn begin(&self) -> impl Future<Output = Result<Self::Tx>> + Send;

    /// Recorded actions matching `filter`, newest first.
    fn list_audit(
        &self,
        filter: &AuditFilter,
    ) -> impl Future<Output = Result<Vec<AuditEntry>>> + Send;

    /// Deletes up to `batch` rows of `what` older than `older_than`;
    /// returns how many.
    fn delete_older(
        &self,
        what: Retention,
        older_than: Duration,
        batch: i64,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Letters matching `filter`, oldest first.
    fn list_letters(
        &self,
        filter: &DeadLetterFilter,
    ) -> impl Future<Output = Result<Vec<DeadLetterRecord>>> + Send {
        async move {
            let rows =
                Self::D::fetch_rows(self.pool(), dialect::letters::<Self::D>(filter)).await?;
            rows.iter().map(Self::D::decode_letter).collect()
        }
    }

    /// How many letters are open, of `origin`'s events or of all.
    fn count_open_letters(
        &self,
        origin: Option<Table>,
    ) -> impl Future<Output = Result<u64>> + Send {
        Self::D::fetch_count(self.pool(), dialect::count_open_letters::<Self::D>(origin))
    }

    /// Writes the letters of `table`'s events whose rows are `failed` now,
    /// holding those rows (PostgreSQL: share locks; SQLite: the write
    /// lock) until the letters are in; a letter already there is kept once.
    fn insert_letters(
        &self,
        table: Table,
        rows: &[NewLetter],
    ) -> impl Future<Output = Result<()>> + Send;

    /// The outbox claim's scan plan (`doctor`).
    fn claim_plan(&self) -> impl Future<Output = Result<ClaimPlan>> + Send;

    /// The planner's statistics of the outbox (`doctor`).
    fn outbox_statistics(&self) -> impl Future<Output = Result<Statistics>> + Send;

    /// Locked rows of `table` whose lease has run out.
    fn expired_leases(&self, table: Table) -> impl Future<Output = Result<i64>> + Send;

    /// `table`'s size, rows and autovacuum settings; `None` where the
    /// backend has none to tell (SQLite) or the table is missing.
    fn table_health(
        &self,
        table: Table,
    ) -> impl Future<Output = Result<Option<TableHealth>>> + Send;

    /// Up to `limit` distinct topics of pending outbox rows.
    fn pending_topics(&self, limit: i64) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// The server's replication slots (none where the backend has no
    /// write-ahead log to stream: SQLite).
    fn replication_slots(&self) -> impl Future<Output = Result<Vec<ReplicationSlot>>> + Send;
}

/// Rows an operator unlocks: those `holder` holds (only row `id`, if
/// given), each keeping its `last_error` or, without one, getting
/// `reason`'s.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unlock<'a> {
    /// The one row, or all of the holder's.
    pub(crate) id: Option<Uuid>,
    /// The worker holding them.
    pub(crate) holder: &'a str,
    /// Why.
    pub(crate) reason: &'a UnlockReason,
}

/// A backend's statements for the features, on one write transaction.
/// Dropped without [`commit`](Self::commit), it rolls back.
pub(crate) trait FeatureTx: Send {
    /// Records `entry`; returns its id.
    fn insert_audit(&mut self, entry: &AuditEntry) -> impl Future<Output = Result<i64>> + Send;

    /// Makes `change` on `table`; returns the ids changed.
    fn audited_change(
        &mut self,
        table: Table,
        change: AuditedChange<'_>,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send {
        async move {
            match change {
                AuditedChange::UnlockOne { id, holder, reason } => {
                    let rows = Unlock {
                        id: Some(id),
                        holder,
                        reason,
                    };
                    self.unlock(table, rows).await
                }
                AuditedChange::UnlockWorker { worker, reason } => {
                    let rows = Unlock {
                        id: None,
                        holder: worker,
                        reason,
                    };
                    self.unlock(table, rows).await
                }
                AuditedChange::Requeue { ids } => self.requeue_failed(table, ids).await,
                AuditedChange::RetryNow { ids } => self.retry_now(table, ids).await,
            }
        }
    }

    /// Makes the pending rows among `events` that wait for a retry
    /// (unlocked and due later) due now; returns their ids.
    fn retry_now(
        &mut self,
        table: Table,
        events: &[Uuid],
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;

    /// Unlocks `rows` of `table`; returns their ids.
    fn unlock(
        &mut self,
        table: Table,
        rows: Unlock<'_>,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;

    /// Marks the open letters of `events` (rows of `table` just requeued)
    /// replayed. A letter locked by a letter replay running now is skipped
    /// (PostgreSQL): that replay finds its event back and closes it.
    fn mark_replayed(
        &mut self,
        table: Table,
        events: &[Uuid],
    ) -> impl Future<Output = Result<()>> + Send;

    /// The open letters among `ids`, oldest first, locked for this
    /// transaction.
    fn lock_open_letters(
        &mut self,
        ids: &[Uuid],
    ) -> impl Future<Output = Result<Vec<DeadLetterRecord>>> + Send;

    /// Puts the `failed` rows among `events` back to pending (attempts 0,
    /// error cleared, due now); returns their ids.
    fn requeue_failed(
        &mut self,
        table: Table,
        events: &[Uuid],
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;

    /// The rows among `events` that exist, with their status.
    fn statuses(
        &mut self,
        table: Table,
        events: &[Uuid],
    ) -> impl Future<Output = Result<Vec<(Uuid, String)>>> + Send;

    /// Inserts outbox events (idempotency keys respected).
    fn insert_outbox(
        &mut self,
        events: &[OutboxEvent],
    ) -> impl Future<Output = Result<Vec<BulkOutcome>>> + Send;

    /// Inserts inbox events (message ids respected).
    fn insert_inbox(
        &mut self,
        events: &[InboxEvent],
    ) -> impl Future<Output = Result<Vec<BulkOutcome>>> + Send;

    /// Marks the letters `ids` replayed.
    fn close_letters(&mut self, ids: &[Uuid]) -> impl Future<Output = Result<()>> + Send;

    /// Commits.
    fn commit(self) -> impl Future<Output = Result<()>> + Send;

    /// Rolls back.
    fn rollback(self) -> impl Future<Output = Result<()>> + Send;
}

/// Runs a retention delete of `what` until it deletes fewer rows than a
/// batch; returns how many.
pub(crate) async fn delete_older_in_batches<D: Driver>(
    driver: &D,
    what: Retention,
    older_than: Duration,
    batch_size: u32,
) -> Result<u64> {
    let batch = i64::from(batch_size.max(1));
    let mut total = 0;
    loop {
        let n = driver.delete_older(what, older_than, batch).await?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}
