//! Storage: the store traits, their request and report types, and one module
//! per backend ([`postgres`], [`sqlite`]), each owning its migrations.
//!
//! A backend's store ([`PgStore`], [`SqliteStore`], or [`AnyStore`] chosen by
//! URL at run time) hands out one *table handle* per table:
//! `store.outbox()` implements [`EventStore<OutboxRoute>`] and [`OutboxStore`],
//! `store.inbox()` implements [`EventStore<InboxRoute>`] and [`InboxStore`].
//!
//! # The claim
//!
//! [`EventStore::claim`] hands out up to N due rows. For the outbox it keeps
//! per-key order: a row is handed out only if every earlier pending row of
//! its `(topic, partition_key)` that is due, tried or locked is handed out in
//! the same claim. It works key first: it finds keys whose head can be
//! handed out (skipping rows behind a held head inside the index scan, so it
//! cannot stall), then takes a *run* of each key from its head, keys in the
//! order their rows became due. See `claim.rs` and docs/design.md.
//!
//! Every claim returns a [`ClaimToken`] (worker id and the claim's
//! `locked_at`); completion, failure and release are guarded by it, so a
//! worker whose lease expired cannot overwrite a newer claim. Each claim
//! writes its own expiry (`locked_until`), and any claimer may take a row
//! once it has passed.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::domain::Retry;
use crate::error::{Error, Result};
use crate::model::{
    Event, EventStatus, InboxEvent, InboxRoute, OutboxEvent, OutboxRoute, Route, Table, Timestamp,
    UnlockReason, WorkerId,
};

mod any;
pub mod audit;
pub(crate) mod claim;
pub mod dead_letters;
pub mod diagnostics;
mod driver;
pub mod fingerprint;
mod migrate;
mod operations;
pub mod postgres;
pub mod sqlite;
mod wakeup;
mod write;

pub(crate) use any::BulkTx;
pub use any::{AnyStore, AnyTable, Backend, InboxTx, OutboxBulkWriter, StoreOptions};
pub use migrate::{
    AppliedMigration, MIGRATIONS_TABLE, MigrationReport, MigrationScript, MigrationState,
    ProblemKind, SchemaProblem, SchemaState,
};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use wakeup::AnyWakeup;
pub use write::{EventConnection, insert_inbox, insert_outbox};

/// The default database: an SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://omnibox.db";

/// Optional features of a store (the reference's `RepositoryCapabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Capabilities {
    /// Bulk create and bulk completion in one statement.
    pub bulk: bool,
    /// Concurrent claimers on many machines (`FOR UPDATE SKIP LOCKED`).
    pub distributed_locking: bool,
    /// Release of stale locks and deletion of old rows.
    pub retention: bool,
    /// Wake-ups on insert (PostgreSQL LISTEN/NOTIFY).
    pub notify: bool,
}

/// Where a claim's scan of due rows stopped (the last row it examined), so
/// the next claim can go on from there: see [`Claim::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimCursor {
    /// The last examined row's due time.
    pub scheduled_at: Timestamp,
    /// The last examined row's insertion order.
    pub seq: i64,
}

/// What a claim asks for.
#[derive(Debug, Clone)]
pub struct ClaimOptions {
    /// The claiming worker.
    pub worker: WorkerId,
    /// Most rows to hand out.
    pub limit: u32,
    /// Most payload bytes to hand out (the payloads' size as compact JSON):
    /// the claim stops before the row that would pass it, but always hands
    /// out at least one row, however large. On the outbox a key's run may
    /// be cut short by it, never given a hole. `None`: rows alone bound it.
    pub max_bytes: Option<u64>,
    /// Scan due rows after this position (from a previous claim's
    /// [`Claim::next`]); `None` starts at the oldest due row.
    pub after: Option<ClaimCursor>,
    /// Most due rows one claim examines (outbox); 0 means the default,
    /// the larger of `limit` and 500.
    pub examine: u32,
    /// Skip a random number of due rows (up to four batches) before the
    /// scan (outbox): a worker whose claim collided with another's moves to
    /// another part of the backlog instead of colliding again. The rows
    /// skipped are left to the others, or to this worker's next pass.
    pub spread: bool,
    /// How long the claimed rows stay locked (written to `locked_until`);
    /// after that any worker may claim them again.
    pub lease: Duration,
    /// The keys this worker has batches in flight for (outbox), with the
    /// first and last `seq` it holds of each. When a key's first active rows
    /// are exactly those rows, still locked by this worker, the claim goes
    /// on after them, so one worker keeps a key's batches in a pipeline
    /// (the caller must hand them to the broker in claim order and hold a
    /// later batch's rows back when an earlier one's did not go through:
    /// [`Processor`](crate::pipeline::Processor) does). Empty: rows in flight hold
    /// their key, as another worker's do.
    pub own: HashMap<(String, String), (i64, i64)>,
    /// Which rows the claim may take (empty: any).
    pub filters: FetchFilters,
}

/// Which rows a claim may take (the reference's `FetchFilters`): every
/// non-empty list narrows the claim to rows whose column is one of its
/// values. The outbox takes `topics` (a key belongs to one topic, so per-key
/// order holds; a dedicated relay for a slow topic); the inbox takes
/// `sources`, `event_types` and `consumer_groups`. A filter a table does not
/// take is an input error, not ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchFilters {
    /// Outbox topics.
    pub topics: Vec<String>,
    /// Inbox sources (the producing service, or the topic).
    pub sources: Vec<String>,
    /// Inbox event types.
    pub event_types: Vec<String>,
    /// Inbox consumer groups.
    pub consumer_groups: Vec<String>,
}

static NO_FILTERS: FetchFilters = FetchFilters::NONE;

impl FetchFilters {
    /// No filter: every row.
    pub const NONE: FetchFilters = FetchFilters {
        topics: Vec::new(),
        sources: Vec::new(),
        event_types: Vec::new(),
        consumer_groups: Vec::new(),
    };

    /// True when nothing is filtered.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
            && self.sources.is_empty()
            && self.event_types.is_empty()
            && self.consumer_groups.is_empty()
    }

    /// Refuses a filter `table` does not take.
    pub fn check_for(&self, table: Table) -> Result<()> {
        let (allowed, refused): (&str, Vec<&str>) = match table {
            Table::Outbox => (
                "topics",
                [
                    (!self.sources.is_empty()).then_some("sources"),
                    (!self.event_types.is_empty()).then_some("event types"),
                    (!self.consumer_groups.is_empty()).then_some("consumer groups"),
                ]
                .into_iter()
                .flatten()
                .collect(),
            ),
            Table::Inbox => (
                "sources, event types and consumer groups",
                [(!self.topics.is_empty()).then_some("topics")]
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
        };
        if refused.is_empty() {
            return Ok(());
        }
        Err(Error::validation(
            "filter",
            format!(
                "the {} claim cannot filter by {}: it filters by {allowed} only",
                table.as_str(),
                refused.join(" or ")
            ),
        ))
    }

    /// A list as a PostgreSQL array parameter (`NULL`: no filter).
    pub(crate) fn pg(list: &[String]) -> Option<Vec<String>> {
        (!list.is_empty()).then(|| list.to_vec())
    }

    /// A list as an SQLite JSON array parameter (`NULL`: no filter).
    pub(crate) fn sqlite(list: &[String]) -> Option<String> {
        (!list.is_empty()).then(|| serde_json::Value::from(list.to_vec()).to_string())
    }
}

impl ClaimOptions {
    /// A claim of up to `limit` rows for `worker` with the default 5-minute lease.
    pub fn new(worker: WorkerId, limit: u32) -> Self {
        ClaimOptions {
            worker,
            limit,
            max_bytes: None,
            after: None,
            examine: 0,
            spread: false,
            lease: crate::model::limits::DEFAULT_LEASE_TIMEOUT,
            own: HashMap::new(),
            filters: FetchFilters::default(),
        }
    }

    /// Most rows the scan examines.
    pub(crate) fn examine_limit(&self) -> u32 {
        if self.examine == 0 {
            self.limit.max(500)
        } else {
            self.examine.max(self.limit)
        }
    }

    /// Sets the lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the byte budget (the `max_bytes` field).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// The byte budget as a bind parameter (`i64::MAX`: none).
    pub(crate) fn byte_budget(&self) -> i64 {
        self.max_bytes
            .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX))
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.limit == 0 {
            return Err(Error::validation(
                "limit",
                "a claim must ask for at least 1 row",
            ));
        }
        if self.lease.is_zero() {
            return Err(Error::validation("lease", "must be longer than 0 s"));
        }
        Ok(())
    }
}

/// Proof of a claim: the worker and the `locked_at` the claim wrote. Writes
/// that follow a claim must present it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToken {
    /// The claiming worker.
    pub worker: WorkerId,
    /// The `locked_at` value written by the claim.
    pub locked_at: Timestamp,
    /// The lease the claim took (its rows' `locked_until` is `locked_at`
    /// plus this, until extended).
    pub lease: Duration,
}

/// The rows a claim handed out, in insertion order, with the claim's token.
#[derive(Debug, Clone)]
pub struct Claim<R> {
    /// The token that guards writes to these rows.
    pub token: ClaimToken,
    /// The claimed events, ordered by `seq`.
    pub events: Vec<Event<R>>,
    /// True when rows this claim wanted were being claimed by another worker
    /// at the same moment, so fewer (perhaps none) were handed out: an empty
    /// contended claim does not mean that nothing is due.
    pub contended: bool,
    /// Set when the claim's scan stopped at its bound before the end of the
    /// due rows (outbox): pass it as [`ClaimOptions::after`] to go on. An
    /// empty claim with `next` set does not mean that nothing is due: the
    /// rows it examined were all held.
    pub next: Option<ClaimCursor>,
}

impl<R> Claim<R> {
    /// True when nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
    /// Number of claimed events.
    pub fn len(&self) -> usize {
        self.events.len()
    }
}

/// When a failed event is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAt {
    /// This long after the failure is written, by the database's clock
    /// (PostgreSQL's `now()`), so no process's clock decides it.
    After(Duration),
    /// At this time (a handler's own `next_retry_at`).
    At(Timestamp),
}

impl From<Timestamp> for RetryAt {
    fn from(t: Timestamp) -> Self {
        RetryAt::At(t)
    }
}

impl From<Duration> for RetryAt {
    fn from(d: Duration) -> Self {
        RetryAt::After(d)
    }
}

/// One failed event of a claim, as written by [`EventStore::fail`].
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The event.
    pub id: Uuid,
    /// What went wrong (truncated to 2000 bytes when stored).
    pub error: String,
    /// Whether an attempt is spent.
    pub counted: bool,
    /// When to try again, if the event stays pending.
    pub retry: RetryAt,
    /// Fail it now (status `failed`), whatever attempts are left.
    pub dead: bool,
}

impl Failure {
    /// A counted failure retried at `retry` (or failed at `max_attempts`).
    pub fn counted(id: Uuid, error: impl Into<String>, retry: impl Into<RetryAt>) -> Self {
        Failure {
            id,
            error: error.into(),
            counted: true,
            retry: retry.into(),
            dead: false,
        }
    }

    /// A failure that must not be retried: `failed` now, one attempt spent
    /// (without going past `max_attempts`).
    pub fn dead(id: Uuid, error: impl Into<String>) -> Self {
        Failure {
            id,
            error: error.into(),
            counted: true,
            retry: RetryAt::After(Duration::ZERO),
            dead: true,
        }
    }

    /// A transient failure: no attempt spent, retried at `retry`.
    pub fn transient(id: Uuid, error: impl Into<String>, retry: impl Into<RetryAt>) -> Self {
        Failure {
            id,
            error: error.into(),
            counted: false,
            retry: retry.into(),
            dead: false,
        }
    }

    /// Builds a failure from the domain's [`Retry`], resolving a counted
    /// failure without a time through the backoff of `event`'s attempts.
    pub fn from_retry<R: Route>(
        event: &Event<R>,
        error: impl Into<String>,
        retry: Retry,
        backoff: &crate::domain::Backoff,
    ) -> Self {
        match retry {
            Retry::Counted(at) => Failure::counted(
                event.id(),
                error,
                at.map(RetryAt::At)
                    .unwrap_or_else(|| RetryAt::After(backoff.delay(event.attempts_made()))),
            ),
            Retry::NotCounted(at) => Failure::transient(event.id(), error, RetryAt::At(at)),
            Retry::NotCountedAfter(d) => Failure::transient(event.id(), error, RetryAt::After(d)),
        }
    }
}

/// What [`EventStore::fail`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FailReport {
    /// Rows rescheduled (still pending).
    pub rescheduled: Vec<Uuid>,
    /// Rows that reached `max_attempts` and are now `failed`.
    pub failed: Vec<Uuid>,
}

/// Filters of [`EventStore::list`]. All set filters must match.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only rows with this status.
    pub status: Option<EventStatus>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this topic (outbox) or source (inbox).
    pub topic: Option<String>,
    /// Only this consumer group (inbox; the outbox has none, and refuses it).
    pub consumer_group: Option<String>,
    /// Only rows created at or after this time.
    pub since: Option<Timestamp>,
    /// Only rows after this `seq` (keyset paging).
    pub after_seq: Option<i64>,
    /// Only rows locked by this worker.
    pub locked_by: Option<String>,
    /// Most rows to return (default 100).
    pub limit: Option<u32>,
}

/// Which failed rows [`EventStore::requeue_failed`] puts back to pending.
/// At least one selector, or `all`, is required.
#[derive(Debug, Clone, Default)]
pub struct RequeueFilter {
    /// These ids.
    pub ids: Vec<Uuid>,
    /// This event type.
    pub event_type: Option<String>,
    /// This topic (outbox) or source (inbox).
    pub topic: Option<String>,
    /// This consumer group (inbox; the outbox has none, and refuses it).
    pub consumer_group: Option<String>,
    /// Rows whose `last_error` contains this text.
    pub error_contains: Option<String>,
    /// Rows that failed at or after this time.
    pub since: Option<Timestamp>,
    /// Rows that failed before this time.
    pub until: Option<Timestamp>,
    /// Every failed row (must be explicit).
    pub all: bool,
    /// Most rows to requeue.
    pub limit: Option<u32>,
}

impl RequeueFilter {
    /// True when no selector is set.
    pub fn selects_nothing(&self) -> bool {
        self.ids.is_empty()
            && self.event_type.is_none()
            && self.topic.is_none()
            && self.consumer_group.is_none()
            && self.error_contains.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    pub(crate) fn check(&self, table: Table) -> Result<()> {
        if self.selects_nothing() && !self.all {
            return Err(Error::validation(
                "filter",
                "no rows selected; give an id, event type, topic, consumer group, error text or time range, or ask for all rows explicitly",
            ));
        }
        if self.limit == Some(0) {
            return Err(Error::validation("limit", "must be at least 1"));
        }
        check_consumer_group(table, self.consumer_group.as_deref())
    }
}

impl ListFilter {
    pub(crate) fn check(&self, table: Table) -> Result<()> {
        check_consumer_group(table, self.consumer_group.as_deref())
    }
}

/// A consumer group selects inbox rows only: the outbox refuses it rather
/// than match nothing.
fn check_consumer_group(table: Table, group: Option<&str>) -> Result<()> {
    match (table, group) {
        (Table::Outbox, Some(_)) => Err(Error::validation(
            "consumer_group",
            "outbox rows have no consumer group: a consumer group selects inbox rows",
        )),
        _ => Ok(()),
    }
}

/// Counts of one table for `omnibox status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableCounts {
    /// Which table.
    pub table: Table,
    /// Pending rows (locked or not).
    pub pending: u64,
    /// Completed rows.
    pub completed: u64,
    /// Failed rows.
    pub failed: u64,
    /// Rows locked by a worker.
    pub locked: u64,
    /// Pending, unlocked rows whose time has come.
    pub due_now: u64,
    /// Creation time of the oldest pending row.
    #[serde(with = "crate::model::time::serde_ts::option")]
    pub oldest_pending_created_at: Option<Timestamp>,
    /// The database's clock when counted.
    #[serde(with = "crate::model::time::serde_ts")]
    pub now: Timestamp,
    /// True when `completed` is the planner's estimate of the table's size
    /// less the exact pending and failed counts
    /// ([`AnyTable::status_counts`](crate::store::AnyTable::status_counts)
    /// on a large PostgreSQL table); the other counts are exact.
    pub completed_is_estimate: bool,
}

impl TableCounts {
    /// Age of the oldest pending row.
    pub fn oldest_pending_age(&self) -> Option<Duration> {
        self.oldest_pending_created_at
            .map(|t| (self.now - t).to_std().unwrap_or(Duration::ZERO))
    }
}

/// The result of creating one outbox event.
#[derive(Debug, Clone, PartialEq)]
pub enum Created<E> {
    /// A new row was written.
    Inserted(E),
    /// A row with the same idempotency key (outbox) or the same
    /// `(message_id, consumer_group)` (inbox) exists; it is returned and nothing was written.
    Existing(E),
}

impl<E> Created<E> {
    /// The row, new or existing.
    pub fn into_inner(self) -> E {
        match self {
            Created::Inserted(e) | Created::Existing(e) => e,
        }
    }
    /// True when a new row was written.
    pub fn is_inserted(&self) -> bool {
        matches!(self, Created::Inserted(_))
    }
}

/// An existing pending inbox row that the consumer met again
/// ([`InboxTx::take`](crate::store::InboxTx::take)).
#[derive(Debug, Clone)]
pub enum Existing {
    /// Due and free: now locked by the consumer's token; run its handler
    /// (its `attempts_made` counts the deliveries that failed before).
    Taken(Box<crate::model::InboxEvent>),
    /// Not due yet (a failure's retry time) or held by another worker's live
    /// lease: wait until this time, then deliver the message again.
    Wait(crate::model::Timestamp),
}

/// Sorts existing pending inbox rows met again into those to take now and
/// those to wait for (see [`Existing`]); returns the ids to lock for
/// `token` with the map. `now` is the database's clock.
pub(crate) fn sort_existing(
    rows: Vec<crate::model::InboxEvent>,
    token: &ClaimToken,
    now: Timestamp,
) -> (Vec<Uuid>, HashMap<Uuid, Existing>) {
    let mut out = HashMap::with_capacity(rows.len());
    let mut takeable = Vec::new();
    for mut event in rows {
        let free_at = event
            .locked_until
            .unwrap_or(event.scheduled_at)
            .max(event.scheduled_at);
        // A row this worker holds is left from an attempt of this same
        // consumer that failed midway (the database went away): it is free
        // to take again (nothing of this consumer is in flight at a batch's
        // start).
        let own = event.locked_by.as_deref() == Some(token.worker.as_str());
        if free_at <= now || (own && event.scheduled_at <= now) {
            event.locked_at = Some(token.locked_at);
            event.locked_by = Some(token.worker.as_str().to_string());
            event.locked_until = Some(token.locked_at + crate::domain::chrono_dur(token.lease));
            takeable.push(event.id);
            out.insert(event.id, Existing::Taken(Box::new(event)));
        } else {
            out.insert(event.id, Existing::Wait(free_at));
        }
    }
    (takeable, out)
}

/// The result of one element of a bulk create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BulkOutcome {
    /// Id of the row: the new one, or the existing row's.
    pub id: Uuid,
    /// True when the row already existed and nothing was written.
    pub existing: bool,
}

/// Operations common to both tables.
///
/// Implemented by the table handles of every backend. Methods return futures
/// that are `Send`, so the engine can run them on any tokio worker.
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
    /// touched and reported in [`Error::ConcurrentUpdate`]; the rest are written.
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
    /// cleared, scheduled now); returns their ids.
    fn requeue_failed(
        &self,
        filter: &RequeueFilter,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;
}

/// Maintenance operations (the reference's retention capability and the
/// on-call commands).
pub trait MaintenanceStore<R: Route>: EventStore<R> {
    /// Failed rows matching `filter` (what [`EventStore::requeue_failed`]
    /// would change), in insertion order.
    fn list_failed(
        &self,
        filter: &RequeueFilter,
    ) -> impl Future<Output = Result<Vec<Event<R>>>> + Send;

    /// Pending rows waiting for a retry that match `filter`: tried
    /// (`last_error` set), unlocked and due later (`replay --pending` makes
    /// them due now with [`AuditedChange::RetryNow`](audit::AuditedChange::RetryNow)),
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
    /// groups by fingerprint).
    fn failed_errors(&self) -> impl Future<Output = Result<Vec<FailedErrors>>> + Send;
}

/// One group of [`MaintenanceStore::failed_errors`].
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
    ) -> impl Future<Output = Result<Created<OutboxEvent>>> + Send;

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
    ) -> impl Future<Output = Result<Created<InboxEvent>>> + Send;

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

/// Checks the ids of a guarded update against what it changed.
pub(crate) fn guard_result(expected: &[Uuid], changed: &[Uuid]) -> Result<()> {
    if changed.len() == expected.len() {
        return Ok(());
    }
    let changed: std::collections::HashSet<&Uuid> = changed.iter().collect();
    let missing: Vec<Uuid> = expected
        .iter()
        .filter(|id| !changed.contains(id))
        .copied()
        .collect();
    Err(Error::ConcurrentUpdate {
        expected: expected.len(),
        actual: expected.len() - missing.len(),
        missing,
    })
}

/// Redacts the password of a database URL for messages and logs (see
/// [`crate::redact::url`]).
pub fn redact_url(url: &str) -> String {
    crate::redact::url(url)
}

/// A duration as seconds for SQL, clamped to
/// [`MAX_DURATION`](crate::model::limits::MAX_DURATION) so `now()` plus or
/// minus it stays a valid timestamp.
pub(crate) fn secs(d: Duration) -> f64 {
    d.min(crate::model::limits::MAX_DURATION).as_secs_f64()
}

/// What every store writes as `last_error` (and a dead letter's error):
/// the error with credentials and secret-looking parameters masked (it may
/// quote a remote's reply: a webhook's body echoing the request, a broker's
/// or a database's message), truncated to 2000 bytes on a character
/// boundary.
pub(crate) fn stored_error(error: &str) -> String {
    use crate::model::limits::{DEFAULT_TRUNCATION_SUFFIX, LAST_ERROR_MAX_LENGTH};
    let error = crate::redact::text(error);
    crate::model::validate::truncate_error(&error, LAST_ERROR_MAX_LENGTH, DEFAULT_TRUNCATION_SUFFIX)
        .unwrap_or_else(|_| "(no error message)".to_string())
}

/// Column of the "topic" filter: `topic` on the outbox, `source` on the inbox.
pub(crate) fn topic_column(table: Table) -> &'static str {
    match table {
        Table::Outbox => "topic",
        Table::Inbox => "source",
    }
}

pub(crate) const DEFAULT_LIST_LIMIT: u32 = 100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://h/db?password=x&a=1"),
            "postgres://h/db?password=***&a=1"
        );
        assert_eq!(redact_url("sqlite://omnibox.db"), "sqlite://omnibox.db");
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
    }

    #[test]
    fn guard_reports_missing_rows() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        assert!(guard_result(&[a, b], &[b, a]).is_ok());
        match guard_result(&[a, b], &[b]).unwrap_err() {
            Error::ConcurrentUpdate {
                expected,
                actual,
                missing,
            } => {
                assert_eq!((expected, actual), (2, 1));
                assert_eq!(missing, vec![a]);
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn requeue_filter_needs_a_selector() {
        assert!(RequeueFilter::default().check(Table::Outbox).is_err());
        assert!(
            RequeueFilter {
                all: true,
                ..Default::default()
            }
            .check(Table::Outbox)
            .is_ok()
        );
        assert!(
            RequeueFilter {
                event_type: Some("x".into()),
                ..Default::default()
            }
            .check(Table::Outbox)
            .is_ok()
        );
        let group = RequeueFilter {
            consumer_group: Some("billing".into()),
            ..Default::default()
        };
        assert!(group.check(Table::Inbox).is_ok());
        let e = group.check(Table::Outbox).unwrap_err().to_string();
        assert!(e.contains("no consumer group"), "{e}");
    }
}
