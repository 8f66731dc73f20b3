//! The store traits: [`EventStore`](super::EventStore) (claim, complete, fail, release: the
//! engine's side), [`MaintenanceStore`](super::MaintenanceStore) (list, requeue, delete: the
//! operator's side), [`OutboxStore`](super::OutboxStore) and [`InboxStore`](super::InboxStore) (writing events).

use super::report::{BulkOutcome, Created, TableCounts};
use super::request::{
    Capabilities, Claim, ClaimOptions, ClaimToken, FailReport, Failure, FetchFilters, ListFilter,
    NO_FILTERS, RequeueFilter,
};
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::{
    Event, EventStatus, InboxEvent, InboxRoute, OutboxEvent, OutboxRoute, Route, Timestamp,
    UnlockReason,
};

/// Operations common to both tables.
///
/// Implemented by the table handles of every backend. Methods return futures
/// that are `Send`, so the engine can run them on any tokio worker. A store
/// of your own implements it too: `examples/custom_store.rs` is an in-memory
/// one, and [`testkit`](crate::testkit) checks it.
pub trait EventStore<R: Route>: Clone + Send + Sync + 'static {
    /// What this store supports.
    fn capabilities(&self) -> Capabilities;

    /// One row by id.
    fn get(&self, id: Uuid) -> impl Future<Output = Result<Option<Event<R>>>> + Send;

    /// Rows matching `filter`, in insertion order.
    fn list(&self, filter: &ListFilter) -> impl Future<Output = Result<Vec<Event<R>>>> + Send;

    /// Counts for `status`.
    fn counts(&self) -> impl Future<Output = Result<TableCounts>> + Send;

    /// Claims up to `limit` due rows (see the module documentation).
    fn claim(&self, opts: &ClaimOptions) -> impl Future<Output = Result<Claim<R>>> + Send;

    /// True when a row is due that a claim could hand out now: pending,
    /// due, unlocked or its lease expired, and (outbox) at the head of its
    /// key or right behind a head that can be handed out. Rows held by a
    /// live lease do not count. Row locks of claims in progress are not
    /// seen, so a `true` may be taken by another worker first; a `false`
    /// means nothing is there for anyone until time passes or rows change.
    fn claimable_exists(&self) -> impl Future<Output = Result<bool>> + Send {
        self.claimable_exists_for(&NO_FILTERS)
    }

    /// As [`claimable_exists`](EventStore::claimable_exists), for a claim
    /// with `filters`.
    fn claimable_exists_for(
        &self,
        filters: &FetchFilters,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Pushes the lease of claimed rows forward: they stay locked until
    /// `lease` from now (by the database's clock). Returns how many rows are
    /// still held by `token` (guarded like [`complete`](EventStore::complete),
    /// but rows no longer held are only counted, not an error).
    fn extend_lease(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
        lease: Duration,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Marks claimed rows completed. Rows no longer held by `token` are not
    /// touched and reported in [`Error::ConcurrentUpdate`](crate::error::Error::ConcurrentUpdate); the rest are written.
    fn complete(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Records failures of claimed rows (guarded like [`complete`](EventStore::complete)).
    fn fail(
        &self,
        token: &ClaimToken,
        failures: &[Failure],
    ) -> impl Future<Output = Result<FailReport>> + Send;

    /// Unlocks claimed rows untried (guarded like [`complete`](EventStore::complete)).
    fn release(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Unlocks one row whoever holds it. Its `last_error` is kept; a row
    /// without one gets `Force unlock: <reason>`.
    fn force_unlock(
        &self,
        id: Uuid,
        reason: &UnlockReason,
    ) -> impl Future<Output = Result<Event<R>>> + Send;

    /// Unlocks every row locked longer than `older_than` (by `locked_at`)
    /// whose lease has run out (`locked_until` passed: a live worker extends
    /// it, so its rows are never taken), `batch_size` rows per statement;
    /// returns how many.
    fn release_stale_locks(
        &self,
        older_than: Duration,
        batch_size: u32,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes up to `batch_size` completed rows completed more than
    /// `older_than` ago; returns how many (call again until 0).
    fn delete_completed(
        &self,
        older_than: Duration,
        batch_size: u32,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Puts failed rows matching `filter` back to pending (attempts 0, error
    /// cleared, scheduled now); returns their ids. On PostgreSQL a failed
    /// row another transaction holds at that moment (its dead letter being
    /// written, a concurrent replay) is skipped, not waited for: the ids
    /// returned are the rows requeued (`ops::replay::requeue` waits
    /// instead).
    fn requeue_failed(
        &self,
        filter: &RequeueFilter,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;
}

/// Maintenance operations (the reference's retention capability and the
/// on-call commands).
pub trait MaintenanceStore<R: Route>: EventStore<R> {
    /// Failed rows matching `filter` (what [`EventStore::requeue_failed`](super::EventStore::requeue_failed)
    /// would change), in insertion order.
    fn list_failed(
        &self,
        filter: &RequeueFilter,
    ) -> impl Future<Output = Result<Vec<Event<R>>>> + Send;

    /// Pending rows waiting for a retry that match `filter`: tried
    /// (`last_error` set), unlocked and due later (`replay --pending` makes
    /// them due now with [`AuditedChange::RetryNow`](super::audit::AuditedChange::RetryNow)),
    /// in insertion order. `since` and `until` select by when their last
    /// failure was written.
    fn list_waiting(
        &self,
        filter: &RequeueFilter,
    ) -> impl Future<Output = Result<Vec<Event<R>>>> + Send;

    /// Unlocks every row locked by `worker` (keeping each row's
    /// `last_error`; `Force unlock: <reason>` where there is none); returns
    /// the ids.
    fn force_unlock_worker(
        &self,
        worker: &str,
        reason: &UnlockReason,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;

    /// Rows locked for longer than `older_than` whose lease has run out.
    fn count_stale_locks(&self, older_than: Duration) -> impl Future<Output = Result<u64>> + Send;

    /// Completed rows completed more than `older_than` ago, or failed rows
    /// that failed more than `older_than` ago.
    fn count_older(
        &self,
        status: EventStatus,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes up to `batch_size` failed rows that failed more than
    /// `older_than` ago; returns how many (call again until 0).
    fn delete_failed(
        &self,
        older_than: Duration,
        batch_size: u32,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Failed rows per event type, most first.
    fn failed_by_event_type(&self) -> impl Future<Output = Result<Vec<(String, u64)>>> + Send;

    /// Failed rows grouped in the database by event type and exact error,
    /// with their count, first and last failure and one row's id: every
    /// failed row counted, none of them read (`omnibox failures` folds the
    /// groups by fingerprint). Each group is handed to `each` as it is
    /// read, so errors that differ in every row (an id in each) take no
    /// memory here.
    fn failed_errors(
        &self,
        each: &mut (dyn FnMut(FailedErrors) + Send),
    ) -> impl Future<Output = Result<()>> + Send;
}

/// One group of [`MaintenanceStore::failed_errors`](super::MaintenanceStore::failed_errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedErrors {
    /// The rows' event type.
    pub event_type: String,
    /// Their exact `last_error`.
    pub error: Option<String>,
    /// How many.
    pub count: u64,
    /// The earliest `updated_at` (when the first of them failed).
    pub first_seen: Timestamp,
    /// The latest.
    pub last_seen: Timestamp,
    /// One of them.
    pub sample_id: Uuid,
}

/// A key held up behind a failed or retrying head (`status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockedKey {
    /// Topic.
    pub topic: String,
    /// Partition key.
    pub partition_key: String,
    /// The head: the earliest pending row of the key that was tried.
    pub head_id: Uuid,
    /// The head's counted failures.
    pub head_attempts: i32,
    /// The head's last error.
    pub head_error: Option<String>,
    /// When the head is tried next.
    #[serde(with = "crate::model::time::serde_ts")]
    pub head_retry_at: Timestamp,
    /// Pending rows queued behind the head.
    pub waiting: u64,
}

/// Outbox-specific operations.
pub trait OutboxStore: EventStore<OutboxRoute> {
    /// Keys whose head was tried and waits for a retry, with the rows behind
    /// it, most rows waiting first.
    fn blocked_keys(&self, limit: u32) -> impl Future<Output = Result<Vec<BlockedKey>>> + Send;

    /// Inserts one event; an event whose idempotency key exists is not
    /// inserted and the existing row is returned.
    fn create(
        &self,
        event: &OutboxEvent,
    ) -> impl Future<Output = Result<Created<OutboxEvent>>> + Send {
        async move {
            let outcomes = self.create_many(std::slice::from_ref(event)).await?;
            inserted_row(self, event.id(), outcomes).await
        }
    }

    /// Inserts many events in one transaction (all or nothing), in order;
    /// idempotency keys are respected as in [`create`](OutboxStore::create).
    fn create_many(
        &self,
        events: &[OutboxEvent],
    ) -> impl Future<Output = Result<Vec<BulkOutcome>>> + Send;
}

/// Inbox-specific operations.
pub trait InboxStore: EventStore<InboxRoute> {
    /// Inserts one event unless its `(message_id, consumer_group)` exists, in
    /// which case the existing row is returned as [`Created::Existing`] (a duplicate).
    fn insert(
        &self,
        event: &InboxEvent,
    ) -> impl Future<Output = Result<Created<InboxEvent>>> + Send {
        async move {
            let outcomes = self.insert_many(std::slice::from_ref(event)).await?;
            inserted_row(self, event.id(), outcomes).await
        }
    }

    /// Inserts many events in one transaction; duplicates are reported as existing.
    fn insert_many(
        &self,
        events: &[InboxEvent],
    ) -> impl Future<Output = Result<Vec<BulkOutcome>>> + Send;

    /// The row of a broker message in a consumer group.
    fn get_by_message_id(
        &self,
        message_id: &str,
        consumer_group: &str,
    ) -> impl Future<Output = Result<Option<InboxEvent>>> + Send;
}

/// The row a one-event insert wrote or met (`outcomes` of the event `id`),
/// read back, as [`Created`].
async fn inserted_row<R: Route, S: EventStore<R>>(
    store: &S,
    id: Uuid,
    outcomes: Vec<BulkOutcome>,
) -> Result<Created<Event<R>>> {
    let outcome = outcomes.first().copied().ok_or(Error::NotFound { id })?;
    let row = store
        .get(outcome.id)
        .await?
        .ok_or(Error::NotFound { id: outcome.id })?;
    Ok(if outcome.existing {
        Created::Existing(row)
    } else {
        Created::Inserted(row)
    })
}
