//! What a caller asks of a store (claim options, filters, failures) and
//! what a claim hands out (the claim, its token).

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::domain::Retry;
use crate::error::{Error, Result};
use crate::model::{Event, EventStatus, Route, Table, Timestamp, WorkerId};

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

impl Capabilities {
    /// PostgreSQL's: all of them.
    pub(crate) const POSTGRES: Capabilities = Capabilities {
        bulk: true,
        distributed_locking: true,
        retention: true,
        notify: true,
    };
    /// SQLite's: one machine's claimers, and no wake-ups.
    pub(crate) const SQLITE: Capabilities = Capabilities {
        distributed_locking: false,
        notify: false,
        ..Self::POSTGRES
    };
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
    /// The keys `(topic, partition_key)` to walk, in this order (outbox):
    /// when not empty the claim skips its scan (step 1) and walks these
    /// keys instead, with the same rules (a relay told of new rows by the
    /// write-ahead log knows their keys). `after`, `examine` and `spread`
    /// are then unused, and a key of a topic the filters leave out is
    /// skipped.
    pub keys: Vec<(String, String)>,
    /// PostgreSQL outbox: hold the claimed rows with row locks in the
    /// claim's own transaction, left open until they are written, instead
    /// of writing a lease on them. [`complete`](super::EventStore::complete)
    /// then writes each row once and commits; any other write of the claim
    /// (a failure, a release) first writes the lease, and goes on as for a
    /// leased claim. Rows held this way show as pending, not locked; a
    /// worker that dies releases them at once (its connection goes), and one
    /// that stops answering releases them after `lease` of idleness (the
    /// server's `idle_in_transaction_session_timeout`). Each held claim
    /// keeps a connection: while half of the pool's connections hold claims,
    /// a further claim writes its lease instead. Other tables and backends
    /// write the lease. Default `false`.
    pub hold: bool,
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

pub(super) static NO_FILTERS: FetchFilters = FetchFilters::NONE;

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
            keys: Vec::new(),
            hold: false,
        }
    }

    /// Sets [`hold`](Self::hold).
    pub fn hold(mut self, hold: bool) -> Self {
        self.hold = hold;
        self
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

    /// Refuses options no store can honour (a limit of 0 rows, a lease of
    /// 0 s) with [`Error::Validation`]; every store's claim checks them
    /// first.
    pub fn check(&self) -> Result<()> {
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
    /// The earliest and latest `created_at` of the claimed rows, when the
    /// claim knows them (`None`: any). Writes that present the token then
    /// read only the partitions of a partitioned table that can hold those
    /// rows, instead of looking each id up in every partition.
    pub created_between: Option<(Timestamp, Timestamp)>,
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

/// One failed event of a claim, as written by [`EventStore::fail`](super::EventStore::fail).
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

/// What [`EventStore::fail`](super::EventStore::fail) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FailReport {
    /// Rows rescheduled (still pending).
    pub rescheduled: Vec<Uuid>,
    /// Rows that reached `max_attempts` and are now `failed`.
    pub failed: Vec<Uuid>,
}

/// Which events a filter takes by what they are: their event type, their
/// topic (outbox) or source (inbox), and their consumer group (inbox only).
/// Every set field narrows; an empty selector takes every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventSelector {
    /// This event type.
    pub event_type: Option<String>,
    /// This topic (outbox) or source (inbox).
    pub topic: Option<String>,
    /// This consumer group (inbox; the outbox has none, and refuses it).
    pub consumer_group: Option<String>,
}

impl EventSelector {
    /// True when nothing is selected (every event).
    pub fn is_empty(&self) -> bool {
        self.event_type.is_none() && self.topic.is_none() && self.consumer_group.is_none()
    }

    /// Refuses a consumer group on the outbox with [`Error::Validation`]:
    /// a consumer group selects inbox rows only, and the outbox refuses it
    /// rather than match nothing.
    pub fn check(&self, table: Table) -> Result<()> {
        match (table, &self.consumer_group) {
            (Table::Outbox, Some(_)) => Err(Error::validation(
                "consumer_group",
                "outbox rows have no consumer group: a consumer group selects inbox rows",
            )),
            _ => Ok(()),
        }
    }
}

/// A span of time: at or after `since` and before `until`, each when set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeWindow {
    /// At or after this time.
    pub since: Option<Timestamp>,
    /// Before this time.
    pub until: Option<Timestamp>,
}

impl TimeWindow {
    /// True when neither end is set (all time).
    pub fn is_empty(&self) -> bool {
        self.since.is_none() && self.until.is_none()
    }
}

/// Which failures a filter takes: failed rows to requeue
/// ([`RequeueFilter`]), or the dead letters kept of them
/// ([`DeadLetterFilter`](super::dead_letters::DeadLetterFilter)). Every
/// set field narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureSelector {
    /// These events (dead letters: also the letters with these ids).
    pub ids: Vec<Uuid>,
    /// What the events are.
    pub select: EventSelector,
    /// Failures whose error contains this text.
    pub error_contains: Option<String>,
    /// When they failed: rows by their `updated_at`, letters by their
    /// `dead_at`.
    pub window: TimeWindow,
}

impl FailureSelector {
    /// True when no selector is set.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.select.is_empty()
            && self.error_contains.is_none()
            && self.window.is_empty()
    }
}

/// Filters of [`EventStore::list`](super::EventStore::list). All set filters must match.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only rows with this status.
    pub status: Option<EventStatus>,
    /// Only these events.
    pub select: EventSelector,
    /// Only rows created at or after this time.
    pub since: Option<Timestamp>,
    /// Only rows after this `seq` (keyset paging).
    pub after_seq: Option<i64>,
    /// Only rows locked by this worker.
    pub locked_by: Option<String>,
    /// Most rows to return (default 100).
    pub limit: Option<u32>,
}

/// Which failed rows [`EventStore::requeue_failed`](super::EventStore::requeue_failed) puts back to pending.
/// At least one selector, or `all`, is required.
#[derive(Debug, Clone, Default)]
pub struct RequeueFilter {
    /// The selectors: ids, event type, topic (outbox) or source (inbox),
    /// consumer group, `last_error` text, and when the rows failed.
    pub failures: FailureSelector,
    /// Every failed row (must be explicit).
    pub all: bool,
    /// Most rows to requeue.
    pub limit: Option<u32>,
}

impl RequeueFilter {
    /// True when no selector is set.
    pub fn selects_nothing(&self) -> bool {
        self.failures.is_empty()
    }

    /// Refuses a filter that selects nothing without asking for all rows,
    /// a limit of 0, and a consumer group on the outbox, with
    /// [`Error::Validation`]; every store's requeue checks it first.
    pub fn check(&self, table: Table) -> Result<()> {
        if self.selects_nothing() && !self.all {
            return Err(Error::validation(
                "filter",
                "no rows selected; give an id, event type, topic, consumer group, error text or time range, or ask for all rows explicitly",
            ));
        }
        if self.limit == Some(0) {
            return Err(Error::validation("limit", "must be at least 1"));
        }
        self.failures.select.check(table)
    }
}

impl ListFilter {
    pub(crate) fn check(&self, table: Table) -> Result<()> {
        self.select.check(table)
    }
}
