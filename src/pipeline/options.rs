//! A processor's settings and what one batch did.

use std::time::Duration;

use uuid::Uuid;

use crate::domain::Backoff;
use crate::model::WorkerId;
use crate::model::limits::DEFAULT_LEASE_TIMEOUT;
use crate::store::FetchFilters;

/// Settings of a [`Processor`](super::Processor).
#[derive(Debug, Clone)]
pub struct ProcessorOptions {
    /// The worker claiming rows.
    pub worker: WorkerId,
    /// Rows per claim.
    pub batch: u32,
    /// Payload bytes per claim (see [`ClaimOptions::max_bytes`](crate::store::ClaimOptions::max_bytes)): a claim
    /// stops before the row that would pass it, and holds at least one row.
    /// With up to three batches in flight (see
    /// [`run`](crate::pipeline::runner::run)), a worker holds about three
    /// times this much. `None`: rows alone bound a claim.
    pub batch_bytes: Option<u64>,
    /// Lease of a claim.
    pub lease: Duration,
    /// Backoff of counted failures.
    pub backoff: Backoff,
    /// Delay of a transient failure's retry.
    pub transient_delay: Duration,
    /// How long result writes are retried when the database fails.
    pub commit_retry_for: Duration,
    /// Which rows the claims take (empty: any; see [`FetchFilters`]).
    pub filters: FetchFilters,
    /// Hold claimed rows with row locks in an open transaction instead of a
    /// lease (PostgreSQL outbox; see
    /// [`ClaimOptions::hold`](crate::store::ClaimOptions::hold)).
    pub hold_claims: bool,
}

impl ProcessorOptions {
    /// Defaults: batch 100 rows and 16 MiB
    /// ([`DEFAULT_BATCH_BYTES`](crate::model::limits::DEFAULT_BATCH_BYTES)),
    /// lease 5 min, backoff 10 s..1 h, transient retry in 1 s.
    pub fn new(worker: WorkerId) -> Self {
        ProcessorOptions {
            worker,
            batch: 100,
            batch_bytes: Some(crate::model::limits::DEFAULT_BATCH_BYTES),
            lease: DEFAULT_LEASE_TIMEOUT,
            backoff: Backoff::default(),
            transient_delay: crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
            commit_retry_for: DEFAULT_LEASE_TIMEOUT / 2,
            filters: FetchFilters::default(),
            hold_claims: false,
        }
    }
}

/// What one batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Completed (published or processed).
    pub completed: usize,
    /// Completed by a handler's choice, not processed.
    pub skipped: usize,
    /// Counted failures still pending (rescheduled by the backoff).
    pub failed: usize,
    /// Counted failures that reached `max_attempts` (now `failed`).
    pub dead: usize,
    /// Transient failures (no attempt spent).
    pub transient: usize,
    /// Events whose own destination was unavailable (no attempt spent;
    /// counted in `transient` too).
    pub unavailable: usize,
    /// Released untried.
    pub released: usize,
    /// Rows whose lease was lost before their result could be written.
    pub lease_lost: usize,
    /// Dead-lettered events written to the DLQ topic.
    pub dead_lettered: usize,
    /// The result write failed after every retry (the rows stay locked until
    /// their lease expires).
    pub commit_error: Option<String>,
    /// Time spent in the handler step.
    pub handle_time: Duration,
    /// Age of the oldest claimed event's due time.
    pub lag: Duration,
    /// The first transient failure's error (why downstream did not take the
    /// batch), for the outage warning.
    pub transient_error: Option<String>,
    /// The events of each outcome, by id (what the counts above count).
    pub ids: BatchIds,
}

/// The ids of a batch's events by outcome, as the counts of
/// [`BatchReport`] count them: a row whose lease was lost before its result
/// was written is in `lease_lost` only; after a `commit_error` they say
/// what was to be written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchIds {
    /// Completed (published or processed), in claim order.
    pub completed: Vec<Uuid>,
    /// Completed by a handler's (or a step's) choice, not processed.
    pub skipped: Vec<Uuid>,
    /// Counted failures still pending.
    pub failed: Vec<Uuid>,
    /// Now `failed` (attempts used up, or dead at once).
    pub dead: Vec<Uuid>,
    /// Transient failures (no attempt spent), unavailable destinations
    /// included.
    pub transient: Vec<Uuid>,
    /// Released untried.
    pub released: Vec<Uuid>,
    /// Rows whose lease was lost before their result was written.
    pub lease_lost: Vec<Uuid>,
}

impl BatchReport {
    /// True when the downstream did not answer for any event of the batch.
    pub fn all_transient(&self) -> bool {
        self.transient > self.unavailable
            && self.completed + self.skipped + self.failed + self.dead == 0
    }
}
