//! One batch: claim (fetch strategy), handle (the handler step, with the
//! circuit breaker, dead-letter and metrics steps around it), write the
//! results in bulk (commit strategy). The claim and the writes are separate
//! short statements: no database transaction is open while the handler or
//! the broker works.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Instrument;
use uuid::Uuid;

use super::circuit::{CircuitBreaker, CircuitConfig};
use super::dead_letter::{DeadLetterStore, Letter, put_dead_letters};
use super::flight::{self, Flight, Key};
use super::recorder::{EventOutcome, MetricsRecorder};
use crate::domain::{Backoff, Retry};
use crate::error::{Error, Result};
use crate::model::limits::DEFAULT_LEASE_TIMEOUT;
use crate::model::{Event, Route, WorkerId, time};
use crate::store::{Claim, ClaimOptions, ClaimToken, EventStore, Failure, FetchFilters, RetryAt};

/// What the handler step decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Published or processed.
    Completed,
    /// The handler chose not to process it; it is completed all the same.
    Skipped,
    /// It failed; [`Retry::Counted`] spends an attempt (`None`: retry by the
    /// backoff), [`Retry::NotCounted`] does not.
    Failed {
        /// Why.
        error: String,
        /// How the failure counts.
        retry: Retry,
    },
    /// Not tried (a key's run stopped at an earlier failure, or shutdown):
    /// unlocked, nothing else changes.
    Released,
    /// The event's own destination is unavailable (for the relay: its topic
    /// is unknown to the broker, or has no leader or too few replicas), not
    /// the downstream as a whole: no attempt is spent, the event is retried
    /// after `retry_after`, and the circuit breaker is not touched, so other
    /// destinations keep flowing.
    Unavailable {
        /// Why.
        error: String,
        /// When to try again (by the database's clock).
        retry_after: Duration,
    },
    /// It failed and must not be retried automatically: it becomes `failed`
    /// now, whatever attempts are left (and is dead-lettered).
    Dead {
        /// Why.
        error: String,
    },
    /// Completed, and the row already marked completed by the handler step
    /// in its own transaction, together with the handler's writes: nothing
    /// is left to write (see [`HandlerStep::in_transactions`](crate::inbox::HandlerStep::in_transactions)).
    Committed,
}

/// An [`Outcome`] reduced to what the inbox consumer distinguishes.
pub(crate) enum Verdict {
    Processed,
    /// Skipped by the handler, or released.
    Skipped,
    Failed {
        error: String,
        retry: Retry,
    },
}

impl Outcome {
    /// [`Outcome::Unavailable`] is a failure that spends no attempt,
    /// [`Outcome::Dead`] one that spends an attempt.
    pub(crate) fn verdict(self) -> Verdict {
        match self {
            Outcome::Completed | Outcome::Committed => Verdict::Processed,
            Outcome::Skipped | Outcome::Released => Verdict::Skipped,
            Outcome::Failed { error, retry } => Verdict::Failed { error, retry },
            Outcome::Unavailable { error, retry_after } => Verdict::Failed {
                error,
                retry: Retry::NotCountedAfter(retry_after),
            },
            Outcome::Dead { error } => Verdict::Failed {
                error,
                retry: Retry::Counted(None),
            },
        }
    }
}

/// The step that does the work for a claimed batch: publish it, or run the
/// application's handler on each event.
pub trait BatchHandler<R: Route>: Send + Sync + 'static {
    /// One outcome per event, in the order given. Events of one key come in
    /// insertion order; a handler that keeps per-key order stops a key at its
    /// first failure and returns [`Outcome::Released`] for the rest.
    fn handle(&self, events: &[Event<R>]) -> impl Future<Output = Vec<Outcome>> + Send;

    /// As [`handle`](Self::handle), with the rows whose lease the processor
    /// keeps extending: a step that settles a row itself (and answers
    /// [`Outcome::Committed`]) takes it out with [`HeldRows::settled`]. The
    /// default ignores `held`.
    fn handle_held(
        &self,
        events: &[Event<R>],
        held: &HeldRows,
    ) -> impl Future<Output = Vec<Outcome>> + Send {
        let _ = held;
        self.handle(events)
    }
}

/// The rows of a batch in flight whose lease the processor keeps extending.
#[derive(Debug, Clone, Default)]
pub struct HeldRows(Arc<Mutex<Vec<Uuid>>>);

impl HeldRows {
    /// `id` is settled (written by the step itself): its lease is no longer
    /// extended.
    pub fn settled(&self, id: Uuid) {
        lock(&self.0).retain(|held| *held != id);
    }
}

/// A claimed and handled batch whose results are not written yet. Its
/// lease is kept alive until the results are written.
#[derive(Debug)]
pub struct Handled<R> {
    claim: Claim<R>,
    outcomes: Vec<Outcome>,
    handle_time: Duration,
    lag: Duration,
    heartbeat: Heartbeat,
    ticket: Ticket,
    /// The lease ran out before the batch was sent: it was not sent, and
    /// its rows may be another worker's now.
    forfeited: bool,
}

/// A claimed batch not handled yet (see [`Processor::fetch`]). Its lease is
/// kept alive from the claim on.
#[derive(Debug)]
pub struct Fetched<R> {
    claim: Claim<R>,
    lag: Duration,
    heartbeat: Heartbeat,
    held: HeldRows,
    ticket: Ticket,
}

/// A batch's place in the worker's [`Flight`]: dropped once its results
/// are written (or the batch is given up), which tells the flight.
#[derive(Debug)]
struct Ticket {
    flight: Arc<Mutex<Flight>>,
    no: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.flight).written(self.no);
    }
}

/// Locks a mutex, going on past a panic in another holder (the data is
/// bookkeeping that stays consistent between statements).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<R> Fetched<R> {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.claim.events.len()
    }

    /// True when the batch is empty (never, in practice).
    pub fn is_empty(&self) -> bool {
        self.claim.events.is_empty()
    }
}

/// What [`Processor::fetch`] got.
#[derive(Debug)]
pub enum Fetch<R> {
    /// A batch, to be handled with [`Processor::handle`].
    Batch(Fetched<R>),
    /// Nothing was handed out (see `Claimed::Empty`).
    Empty {
        /// Rows were lost to a concurrent claim.
        contended: bool,
        /// The scan stopped at its bound; claim again to go on.
        more: bool,
    },
}

/// What [`Processor::claim_and_handle`] got.
#[derive(Debug)]
pub enum Claimed<R> {
    /// A batch, handled, to be written with [`Processor::finish`].
    Batch(Handled<R>),
    /// Nothing was handed out. `contended`: rows were wanted that another
    /// worker was claiming at the same moment (so it is worth trying again).
    /// `more`: the claim examined as many due rows as it may and all were
    /// held; the next claim goes on after them (so claim again at once).
    Empty {
        /// Rows were lost to a concurrent claim.
        contended: bool,
        /// The scan stopped at its bound; claim again to go on.
        more: bool,
    },
}

/// Keeps a batch's lease alive while it is in flight: every third of the
/// lease, the rows' `locked_until` is pushed a lease ahead. A process that
/// dies stops extending, and its rows come free when the lease runs out.
/// It also knows, by this process's clock, until when the lease is surely
/// held: a process paused (SIGSTOP, a VM pause) past it must not send the
/// batch, which may be another worker's by then.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    task: Option<tokio::task::JoinHandle<()>>,
    valid_until: Arc<Mutex<Instant>>,
}

impl Heartbeat {
    /// Extends the lease of `ids`, held by `token`, every third of `lease`
    /// until stopped or dropped.
    pub(crate) fn for_rows<R: Route, S: EventStore<R>>(
        store: &S,
        token: ClaimToken,
        ids: Vec<Uuid>,
        lease: Duration,
    ) -> Self {
        Self::for_shared(store, token, Arc::new(Mutex::new(ids)), lease)
    }

    /// Like [`for_rows`](Heartbeat::for_rows), for the rows in `ids` at each
    /// beat: the caller removes the rows it has settled.
    pub(crate) fn for_shared<R: Route, S: EventStore<R>>(
        store: &S,
        token: ClaimToken,
        ids: Arc<Mutex<Vec<Uuid>>>,
        lease: Duration,
    ) -> Self {
        // The claim was taken just before: its lease runs from about now.
        let valid_until = Arc::new(Mutex::new(
            Instant::now()
                .checked_add(lease)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365)),
        ));
        let period = lease / 3;
        if period.is_zero() || ids.lock().map(|i| i.is_empty()).unwrap_or(true) {
            return Heartbeat {
                task: None,
                valid_until,
            };
        }
        let store = store.clone();
        let until = valid_until.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let ids: Vec<Uuid> = match ids.lock() {
                    Ok(i) => i.clone(),
                    Err(_) => return,
                };
                if ids.is_empty() {
                    continue;
                }
                let beat = Instant::now();
                match store.extend_lease(&token, &ids, lease).await {
                    Ok(held) if held < ids.len() => tracing::warn!(
                        held,
                        claimed = ids.len(),
                        "some rows of the batch in flight are no longer held by this worker \
                         (an operator unlocked them, or the lease ran out)"
                    ),
                    Ok(_) => {
                        if let (Ok(mut u), Some(t)) = (until.lock(), beat.checked_add(lease)) {
                            *u = t;
                        }
                        tracing::debug!(rows = ids.len(), "lease extended")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not extend the lease of the batch in flight")
                    }
                }
            }
        });
        Heartbeat {
            task: Some(task),
            valid_until,
        }
    }

    /// True once the lease may have run out, by this process's clock.
    pub(crate) fn expired(&self) -> bool {
        self.valid_until
            .lock()
            .map(|u| Instant::now() >= *u)
            .unwrap_or(false)
    }

    pub(crate) fn stop(&mut self) {
        if let Some(h) = self.task.take() {
            h.abort();
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<R> Handled<R> {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.claim.events.len()
    }

    /// True when the batch is empty (never, in practice).
    pub fn is_empty(&self) -> bool {
        self.claim.events.is_empty()
    }
}

/// How a guarded write ended.
enum Written<T> {
    Done(T),
    /// The lease of these rows was lost; the rest was written.
    Lost(Vec<Uuid>),
    /// An attempt whose answer was lost had already written every row (the
    /// retry found none of them held any more): done, nothing to report.
    DoneEarlier,
    /// The database kept failing.
    Failed,
}

/// Settings of a [`Processor`].
#[derive(Debug, Clone)]
pub struct ProcessorOptions {
    /// The worker claiming rows.
    pub worker: WorkerId,
    /// Rows per claim.
    pub batch: u32,
    /// Payload bytes per claim (see [`ClaimOptions::max_bytes`]): a claim
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
}

impl BatchReport {
    /// True when the downstream did not answer for any event of the batch.
    pub fn all_transient(&self) -> bool {
        self.transient > self.unavailable
            && self.completed + self.skipped + self.failed + self.dead == 0
    }
}

/// Claims, handles and writes back batches of one table.
pub struct Processor<R: Route, S: EventStore<R>, H: BatchHandler<R>> {
    store: S,
    handler: H,
    options: ProcessorOptions,
    dlq: Vec<Arc<dyn DeadLetterStore<R>>>,
    metrics: Option<Arc<dyn MetricsRecorder>>,
    breaker: Mutex<CircuitBreaker>,
    scan: Mutex<ScanState>,
    /// Failed events that stay pending are logged at most every few
    /// seconds (a failing handler fails every event of every batch).
    warnings: Mutex<super::throttle::Throttle>,
    flight: Arc<Mutex<Flight>>,
    job: &'static str,
    _route: std::marker::PhantomData<fn() -> R>,
}

/// Where this worker's claims go on scanning, and how far one may look:
/// the bound doubles while claims find only held rows, so a long backlog
/// behind another worker's key is crossed in a few claims.
#[derive(Debug, Default)]
struct ScanState {
    after: Option<crate::store::ClaimCursor>,
    widen: u32,
    /// The next claim spreads out (see `ClaimOptions::spread`): the last
    /// one collided with another worker's.
    spread: u32,
}

/// Builds a [`Processor`] (the reference's `EventProcessorBuilder`).
pub struct ProcessorBuilder<R: Route, S: EventStore<R>, H: BatchHandler<R>> {
    store: S,
    handler: H,
    options: ProcessorOptions,
    dlq: Vec<Arc<dyn DeadLetterStore<R>>>,
    metrics: Option<Arc<dyn MetricsRecorder>>,
    circuit: CircuitConfig,
    job: &'static str,
    _route: std::marker::PhantomData<fn() -> R>,
}

impl<R: Route, S: EventStore<R>, H: BatchHandler<R>> ProcessorBuilder<R, S, H> {
    /// A builder for `store` with `handler` as the handler step.
    pub fn new(store: S, handler: H, options: ProcessorOptions) -> Self {
        ProcessorBuilder {
            store,
            handler,
            options,
            dlq: Vec::new(),
            metrics: None,
            circuit: CircuitConfig::default(),
            job: "processor",
            _route: std::marker::PhantomData,
        }
    }

    /// Keeps events that become `failed` in `store` as well (the
    /// reference's `dlq_storage`), e.g. a
    /// [`DeadLetterTable`](crate::store::dead_letters::DeadLetterTable).
    /// Stores add up: each gets every dead letter.
    pub fn dead_letter_store<D: DeadLetterStore<R>>(mut self, store: Arc<D>) -> Self {
        self.dlq.push(store);
        self
    }

    /// Records metrics.
    pub fn metrics<M: MetricsRecorder>(mut self, metrics: Arc<M>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Circuit breaker settings.
    pub fn circuit(mut self, config: CircuitConfig) -> Self {
        self.circuit = config;
        self
    }

    /// Name of the job in logs and spans.
    pub fn job(mut self, name: &'static str) -> Self {
        self.job = name;
        self
    }

    /// The processor.
    pub fn build(self) -> Processor<R, S, H> {
        Processor {
            store: self.store,
            handler: self.handler,
            options: self.options,
            dlq: self.dlq,
            metrics: self.metrics,
            breaker: Mutex::new(CircuitBreaker::new(self.circuit)),
            scan: Mutex::new(ScanState::default()),
            warnings: Mutex::default(),
            flight: Arc::new(Mutex::new(Flight::default())),
            job: self.job,
            _route: std::marker::PhantomData,
        }
    }
}

impl<R, S, H> Processor<R, S, H>
where
    R: Route,
    S: EventStore<R>,
    H: BatchHandler<R>,
{
    /// The settings in force.
    pub fn options(&self) -> &ProcessorOptions {
        &self.options
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// How long to pause before the next claim, if the circuit is open.
    pub fn pause(&self) -> Option<Duration> {
        self.breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pause()
    }

    /// The handler step.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Claims one batch, handles it, writes the results. An error means the
    /// claim itself failed (nothing was claimed); failures after the claim
    /// are in the report.
    pub async fn process_batch(&self) -> Result<BatchReport> {
        match self.claim_and_handle().await? {
            Claimed::Batch(handled) => Ok(self.finish(handled).await),
            Claimed::Empty { .. } => Ok(BatchReport::default()),
        }
    }

    /// First half of a batch: [`fetch`](Self::fetch) and
    /// [`handle`](Self::handle). The rows stay locked (their lease kept
    /// alive) until [`finish`](Self::finish).
    pub async fn claim_and_handle(&self) -> Result<Claimed<R>> {
        Ok(match self.fetch().await? {
            Fetch::Batch(f) => Claimed::Batch(self.handle(f).await),
            Fetch::Empty { contended, more } => Claimed::Empty { contended, more },
        })
    }

    /// The claim (fetch strategy) alone: the worker's next batch, its lease
    /// kept alive until [`finish`](Self::finish). The runner claims the
    /// next batch while the previous one is handled and the one before is
    /// written.
    pub async fn fetch(&self) -> Result<Fetch<R>> {
        let span = tracing::info_span!("claim", job = self.job, table = %R::TABLE, worker = %self.options.worker);
        async {
            let (after, widen, spread) = {
                let s = lock(&self.scan);
                (s.after, s.widen, s.spread > 0)
            };
            let examine = self
                .options
                .batch
                .max(500)
                .saturating_mul(1 << widen.min(6))
                .min(100_000);
            let (no, own) = lock(&self.flight).begin_claim();
            let ticket = Ticket {
                flight: Arc::clone(&self.flight),
                no,
            };
            let claim = self
                .store
                .claim(&ClaimOptions {
                    worker: self.options.worker.clone(),
                    limit: self.options.batch,
                    max_bytes: self.options.batch_bytes,
                    after,
                    examine,
                    spread,
                    lease: self.options.lease,
                    own,
                    filters: self.options.filters.clone(),
                })
                .await?;
            let mut held: HashMap<Key, (i64, i64)> = HashMap::new();
            for e in &claim.events {
                if let (Some((topic, key)), Some(seq)) = (e.order_key(), e.seq()) {
                    flight::widen(&mut held, &(topic.to_string(), key.to_string()), (seq, seq));
                }
            }
            lock(&self.flight).claimed(no, held);
            {
                let mut s = lock(&self.scan);
                s.after = claim.next;
                // After a collision with another worker's claim, the next
                // claim jumps ahead by a random stretch of the backlog.
                s.spread = u32::from(claim.contended);
                s.widen = if claim.is_empty() && claim.next.is_some() {
                    widen + 1
                } else {
                    0
                };
            }
            if claim.is_empty() {
                return Ok(Fetch::Empty {
                    contended: claim.contended,
                    more: claim.next.is_some(),
                });
            }
            let held = HeldRows(Arc::new(Mutex::new(
                claim.events.iter().map(|e| e.id()).collect(),
            )));
            let heartbeat = Heartbeat::for_shared(
                &self.store,
                claim.token.clone(),
                held.0.clone(),
                self.options.lease,
            );
            let now = time::now();
            let lag = claim
                .events
                .iter()
                .map(|e| e.scheduled_at())
                .min()
                .and_then(|t| (now - t).to_std().ok())
                .unwrap_or_default();
            Ok(Fetch::Batch(Fetched {
                claim,
                lag,
                heartbeat,
                held,
                ticket,
            }))
        }
        .instrument(span)
        .await
    }

    /// The handler step on a fetched batch. A row whose attempts are
    /// already used up (`attempts_made >= max_attempts`: edited outside
    /// omnibox) is not handed to the handler: it becomes `failed` and is
    /// dead-lettered. Rows of a key that an earlier batch of this worker did
    /// not settle (a row failed or was not sent) are released unsent: this
    /// batch was claimed behind that batch's rows, before its results were
    /// written (see `pipeline/flight.rs`).
    pub async fn handle(&self, fetched: Fetched<R>) -> Handled<R> {
        let span = tracing::info_span!("batch", job = self.job, table = %R::TABLE, worker = %self.options.worker, rows = fetched.claim.events.len());
        async {
            let Fetched {
                mut claim,
                lag,
                heartbeat,
                held: held_rows,
                ticket,
            } = fetched;
            let started = Instant::now();
            let held = lock(&self.flight).held_back(ticket.no);
            let held_back = |e: &Event<R>| {
                !held.is_empty()
                    && e.order_key()
                        .is_some_and(|(t, k)| held.contains(&(t.to_string(), k.to_string())))
            };
            let exhausted = |e: &Event<R>| e.attempts_made() >= e.max_attempts();
            // Paused (SIGSTOP, a VM pause) past the lease between the claim
            // and now: another worker may have taken these rows and sent
            // later events of their keys. Sending them now would put old
            // events after newer ones: drop the batch unsent.
            let forfeited = heartbeat.expired();
            if forfeited {
                tracing::warn!(
                    rows = claim.events.len(),
                    lease_ms = self.options.lease.as_millis() as u64,
                    "the lease of a claimed batch ran out before it was sent (was this process paused?); \
                     it is dropped unsent and its rows are handled again, by whichever worker holds them now"
                );
            }
            let outcomes: Vec<Outcome> = if forfeited {
                vec![Outcome::Released; claim.events.len()]
            } else if claim.events.iter().any(|e| held_back(e) || exhausted(e)) {
                    // The handler gets the live events: moved out of the
                    // batch and back (not copied: a batch of large events
                    // is not held twice).
                    let mut live = Vec::new();
                    let mut others = Vec::new();
                    for (i, e) in std::mem::take(&mut claim.events).into_iter().enumerate() {
                        if held_back(&e) || exhausted(&e) {
                            others.push((i, e));
                        } else {
                            live.push(e);
                        }
                    }
                    let handled = if live.is_empty() {
                        Vec::new()
                    } else {
                        self.handler.handle_held(&live, &held_rows).await
                    };
                    let total = live.len() + others.len();
                    let mut handled = handled.into_iter();
                    let mut live = live.into_iter();
                    let mut others = others.into_iter().peekable();
                    // Both kept the batch's order: merge them back.
                    let mut outcomes = Vec::with_capacity(total);
                    for position in 0..total {
                        if let Some((_, e)) = others.next_if(|(i, _)| *i == position) {
                            outcomes.push(if held_back(&e) {
                                Outcome::Released
                            } else {
                                Outcome::Dead {
                                    error: format!(
                                        "not tried: its attempts were used up before this try \
                                         (attempts_made {} >= max_attempts {}, set outside omnibox)",
                                        e.attempts_made(),
                                        e.max_attempts()
                                    ),
                                }
                            });
                            claim.events.push(e);
                        } else if let Some(e) = live.next() {
                            outcomes.push(handled.next().unwrap_or(Outcome::Released));
                            claim.events.push(e);
                        }
                    }
                    outcomes
                } else {
                    let mut o = self.handler.handle_held(&claim.events, &held_rows).await;
                    o.resize(claim.events.len(), Outcome::Released);
                    o
                };
            let unsettled: HashSet<Key> = claim
                .events
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| {
                    !matches!(
                        o,
                        Outcome::Completed | Outcome::Skipped | Outcome::Committed
                    )
                })
                .filter_map(|(e, _)| e.order_key())
                .map(|(t, k)| (t.to_string(), k.to_string()))
                .collect();
            lock(&self.flight).handled(ticket.no, unsettled);
            // What the write stage needs of a settled event is its id, type
            // and attempts: its payload and headers (all of a batch's
            // bytes) go now. Only an event that may become failed keeps
            // them, for its dead letter.
            for (e, o) in claim.events.iter_mut().zip(&outcomes) {
                if matches!(
                    o,
                    Outcome::Completed | Outcome::Skipped | Outcome::Committed | Outcome::Released
                ) {
                    e.shed_body();
                }
            }
            Handled {
                claim,
                outcomes,
                handle_time: started.elapsed(),
                lag,
                heartbeat,
                ticket,
                forfeited,
            }
        }
        .instrument(span)
        .await
    }

    /// Second half of a batch: write the results (with the dead-letter,
    /// circuit breaker and metrics steps).
    pub async fn finish(&self, handled: Handled<R>) -> BatchReport {
        let Handled {
            claim,
            outcomes,
            handle_time,
            lag,
            mut heartbeat,
            ticket,
            forfeited,
        } = handled;
        let mut report = if forfeited {
            self.give_back(&claim).await
        } else {
            self.commit(&claim, &outcomes).await
        };
        heartbeat.stop();
        // Written: claims that start from now on see the results.
        drop(ticket);
        report.handle_time = handle_time;
        report.lag = lag;
        {
            let mut breaker = lock(&self.breaker);
            // One warning per downstream outage (not one per batch or
            // pause), and one line when it ends.
            if report.all_transient() {
                if breaker.outage().is_none() {
                    tracing::warn!(
                        error = report.transient_error.as_deref().unwrap_or("no answer"),
                        "downstream not answering; pausing claims and retrying with backoff until it answers (no attempt is spent)"
                    );
                }
                breaker.record_failure(report.transient_error.as_deref());
            } else if report.completed + report.skipped > 0 {
                if let Some((since, _)) = breaker.outage() {
                    // At the level of the warning that began it.
                    tracing::warn!(
                        down_for_ms = since.elapsed().as_millis() as u64,
                        "downstream answering again"
                    );
                }
                breaker.record_success();
            }
        }
        self.record_metrics(&claim, &outcomes, &report);
        tracing::debug!(
            worker = %self.options.worker,
            claimed = report.claimed,
            completed = report.completed,
            failed = report.failed + report.dead,
            transient = report.transient,
            released = report.released,
            elapsed_ms = handle_time.as_millis() as u64,
            "batch done"
        );
        report
    }

    /// Writes the outcomes: completions, failures, releases, each one bulk
    /// statement guarded by the claim's token, retried while the database
    /// fails.
    async fn commit(&self, claim: &Claim<R>, outcomes: &[Outcome]) -> BatchReport {
        let mut report = BatchReport {
            claimed: claim.events.len(),
            ..BatchReport::default()
        };
        let mut done = Vec::new();
        let mut skipped = Vec::new();
        let mut released = Vec::new();
        let mut failures = Vec::new();
        let mut errors: HashMap<Uuid, String> = HashMap::new();
        // Events that failed (a handler or the broker said no, or asked for
        // a retry) and may stay pending: warned about once written.
        let mut retrying: HashSet<Uuid> = HashSet::new();
        for (event, outcome) in claim.events.iter().zip(outcomes) {
            match outcome {
                Outcome::Completed => {
                    report.completed += 1;
                    done.push(event.id());
                }
                Outcome::Committed => report.completed += 1,
                Outcome::Skipped => {
                    report.skipped += 1;
                    done.push(event.id());
                    skipped.push(event.id());
                }
                Outcome::Released => {
                    report.released += 1;
                    released.push(event.id());
                }
                Outcome::Unavailable { error, retry_after } => {
                    report.transient += 1;
                    report.unavailable += 1;
                    errors.insert(event.id(), crate::redact::text(error));
                    failures.push(Failure::transient(event.id(), error.clone(), *retry_after));
                }
                Outcome::Dead { error } => {
                    errors.insert(event.id(), crate::redact::text(error));
                    failures.push(Failure::dead(event.id(), error.clone()));
                }
                Outcome::Failed { error, retry } => {
                    let retry_at = match retry {
                        Retry::Counted(Some(at)) | Retry::NotCounted(at) => RetryAt::At(*at),
                        Retry::NotCountedAfter(d) => RetryAt::After(*d),
                        Retry::Counted(None) => {
                            RetryAt::After(self.options.backoff.delay(event.attempts_made()))
                        }
                    };
                    let counted = retry.is_counted();
                    if !counted {
                        report.transient += 1;
                        if report.transient_error.is_none() {
                            report.transient_error = Some(crate::redact::text(error));
                        }
                    }
                    errors.insert(event.id(), crate::redact::text(error));
                    retrying.insert(event.id());
                    failures.push(Failure {
                        id: event.id(),
                        error: error.clone(),
                        counted,
                        retry: retry_at,
                        dead: false,
                    });
                }
            }
        }
        let token = &claim.token;
        // Failures first: a row that is failed now because a later row of
        // its key was acknowledged must be failed before that later row is
        // completed (and its key freed), or another relay could take it.
        let mut dead = Vec::new();
        if !failures.is_empty() {
            let counted = failures.iter().filter(|f| f.counted).count();
            let mut unwritten: Option<Vec<Uuid>> = None;
            match self
                .write(&mut report, "fail", || self.store.fail(token, &failures))
                .await
            {
                Written::Done(r) => dead = r.failed,
                Written::DoneEarlier => {
                    // The report of the attempt that wrote them was lost:
                    // read back which rows are failed now.
                    for f in failures.iter().filter(|f| f.counted) {
                        if let Ok(Some(row)) = self.store.get(f.id).await
                            && row.status() == crate::EventStatus::Failed
                        {
                            dead.push(f.id);
                        }
                    }
                }
                Written::Lost(lost) => {
                    let lost_counted = failures
                        .iter()
                        .filter(|f| f.counted && lost.contains(&f.id))
                        .count();
                    report.transient -= lost.len() - lost_counted;
                    tracing::warn!(
                        "some failures were written without a dead-letter report; check `omnibox list --status failed`"
                    );
                    unwritten = Some(lost);
                }
                Written::Failed => unwritten = Some(failures.iter().map(|f| f.id).collect()),
            }
            report.dead = dead.len();
            report.failed = counted.saturating_sub(report.dead);
            // A batch downstream did not take at all has its one warning
            // per outage (see `finish`); other failures that leave their
            // event pending are warned about here, throttled.
            let outage = report.all_transient();
            for f in &failures {
                if !retrying.contains(&f.id)
                    || dead.contains(&f.id)
                    || unwritten.as_ref().is_some_and(|u| u.contains(&f.id))
                    || (outage && !f.counted)
                {
                    continue;
                }
                if let Some(e) = claim.events.iter().find(|e| e.id() == f.id) {
                    let error = errors.get(&f.id).map(String::as_str).unwrap_or("");
                    self.warn_retrying(e, f, error);
                }
            }
            for id in &dead {
                let Some(e) = claim.events.iter().find(|e| e.id() == *id) else {
                    continue;
                };
                let (topic, key) = e.order_key().unwrap_or(("", ""));
                tracing::error!(
                    table = %R::TABLE,
                    id = %id,
                    event_type = e.event_type(),
                    topic,
                    key,
                    attempts = e.attempts_made() + 1,
                    error = %crate::redact::text(errors.get(id).map(String::as_str).unwrap_or("")),
                    "event failed for good: it is now `failed`{}; fix the cause, then `omnibox replay --id {id}`",
                    if self.dlq.is_empty() { "" } else { " and dead-lettered" }
                );
            }
        }
        if let Written::Lost(lost) = self
            .write(&mut report, "complete", || {
                self.store.complete(token, &done)
            })
            .await
        {
            let lost_skipped = lost.iter().filter(|id| skipped.contains(id)).count();
            report.skipped -= lost_skipped;
            report.completed -= lost.len() - lost_skipped;
        }
        self.write(&mut report, "release", || {
            self.store.release(token, &released)
        })
        .await;
        if !dead.is_empty() {
            self.dead_letter(claim, &dead, &errors, &mut report).await;
        }
        report
    }

    /// Logs a failure that leaves its event pending, at most once per
    /// [`Throttle::EVERY`](super::throttle::Throttle::EVERY), the next
    /// warning saying how many were left out (the rest at debug level).
    fn warn_retrying(&self, e: &Event<R>, f: &Failure, error: &str) {
        let Some(suppressed) = lock(&self.warnings).allow() else {
            tracing::debug!(table = %R::TABLE, id = %e.id(), error = %error, "event failed again");
            return;
        };
        let retry_in_ms = match f.retry {
            RetryAt::After(d) => d.as_millis() as u64,
            RetryAt::At(t) => (t - time::now()).to_std().unwrap_or_default().as_millis() as u64,
        };
        if f.counted {
            tracing::warn!(
                table = %R::TABLE,
                id = %e.id(),
                event_type = e.event_type(),
                attempt = e.attempts_made() + 1,
                max_attempts = e.max_attempts(),
                retry_in_ms,
                suppressed,
                error = %error,
                "event failed; it stays pending and is tried again after its backoff \
                 (once the cause is fixed, `omnibox replay --pending --id {}` tries it now)",
                e.id()
            );
        } else {
            tracing::warn!(
                table = %R::TABLE,
                id = %e.id(),
                event_type = e.event_type(),
                retry_in_ms,
                suppressed,
                error = %error,
                "event not taken, no attempt spent; it stays pending and is tried again shortly"
            );
        }
    }

    /// A batch whose lease ran out before it was sent: its rows go back to
    /// pending where this claim still holds them; rows another worker took
    /// meanwhile (and perhaps completed) are its business, not a lost lease
    /// to warn about.
    async fn give_back(&self, claim: &Claim<R>) -> BatchReport {
        let ids: Vec<Uuid> = claim.events.iter().map(|e| e.id()).collect();
        let mut report = BatchReport {
            claimed: ids.len(),
            released: ids.len(),
            ..BatchReport::default()
        };
        match self.store.release(&claim.token, &ids).await {
            Ok(_) => {}
            Err(Error::ConcurrentUpdate { missing, .. }) => {
                tracing::debug!(
                    rows = missing.len(),
                    "rows of the dropped batch were taken by another worker meanwhile"
                );
                report.released -= missing.len().min(report.released);
                report.lease_lost += missing.len();
            }
            Err(e) => tracing::warn!(
                error = %e,
                "could not give back the rows of the dropped batch; their lease has run out, so other workers take them anyway"
            ),
        }
        report
    }

    /// Runs one guarded write with retries while the database fails.
    ///
    /// A write is one statement, so it applies to all its rows or to none.
    /// When an attempt fails without an answer (the connection dropped, say)
    /// it may still have been applied; if the retry then finds that none of
    /// the rows is held by this claim any more, the earlier attempt wrote
    /// them, and that is not a lost lease.
    async fn write<T, F, Fut>(&self, report: &mut BatchReport, what: &str, mut op: F) -> Written<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let deadline = Instant::now() + self.options.commit_retry_for;
        let mut wait = Duration::from_millis(100);
        let mut unanswered = false;
        loop {
            match op().await {
                Ok(v) => return Written::Done(v),
                Err(Error::ConcurrentUpdate {
                    expected,
                    actual: 0,
                    ..
                }) if unanswered && expected > 0 => {
                    tracing::debug!(
                        "{what}: an earlier attempt whose answer was lost had written the rows"
                    );
                    return Written::DoneEarlier;
                }
                Err(Error::ConcurrentUpdate { missing, .. }) => {
                    tracing::warn!(
                        rows = missing.len(),
                        ids = ?missing.iter().take(10).collect::<Vec<_>>(),
                        "{what}: the lease of these rows was lost (another worker or an operator took them); \
                         they will be handled again"
                    );
                    report.lease_lost += missing.len();
                    return Written::Lost(missing);
                }
                Err(e) if Instant::now() + wait < deadline => {
                    unanswered = true;
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what}: cannot write the results; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    let msg = format!(
                        "{what}: cannot write the results after retrying for {:?}: {e}; the batch's rows stay locked by {} \
                         until their lease expires ({:?}), then they are handled again",
                        self.options.commit_retry_for, self.options.worker, self.options.lease
                    );
                    tracing::error!("{msg}");
                    report.commit_error = Some(msg);
                    return Written::Failed;
                }
            }
        }
    }

    async fn dead_letter(
        &self,
        claim: &Claim<R>,
        dead: &[Uuid],
        errors: &HashMap<Uuid, String>,
        report: &mut BatchReport,
    ) {
        if self.dlq.is_empty() {
            return;
        }
        let letters: Vec<Letter<'_, R>> = claim
            .events
            .iter()
            .filter(|e| dead.contains(&e.id()))
            .map(|e| Letter {
                event: e,
                error: errors.get(&e.id()).map(String::as_str).unwrap_or(""),
            })
            .collect();
        report.dead_lettered +=
            put_dead_letters(&self.dlq, &letters, self.options.commit_retry_for).await;
    }

    fn record_metrics(&self, claim: &Claim<R>, outcomes: &[Outcome], report: &BatchReport) {
        let Some(m) = &self.metrics else { return };
        let events: Vec<EventOutcome<'_>> = claim
            .events
            .iter()
            .zip(outcomes)
            .map(|(e, outcome)| EventOutcome {
                event_type: e.event_type(),
                attempts_made: e.attempts_made(),
                max_attempts: e.max_attempts(),
                outcome,
            })
            .collect();
        m.batch(R::TABLE, report, &events);
    }
}

/// A step around a processor's handler (the reference's `add_step` and
/// `additional_steps_before` / `additional_steps_after`): it sees each batch
/// before the handler runs and each outcome after, and may change an
/// outcome (skip an event, make a failure final, ...). Add it with
/// [`WithStep`]: `handler.with_step(step)` ([`StepExt`]); steps nest, the
/// outer one seeing the inner one's outcomes.
pub trait Step<R: Route>: Send + Sync + 'static {
    /// Before the handler runs on `events`.
    fn before_batch(&self, events: &[Event<R>]) -> impl Future<Output = ()> + Send {
        let _ = events;
        async {}
    }

    /// After the handler, once per event: may replace `outcome`.
    fn after_event(
        &self,
        event: &Event<R>,
        outcome: &mut Outcome,
    ) -> impl Future<Output = ()> + Send {
        let _ = (event, outcome);
        async {}
    }

    /// After every outcome of the batch is final, before they are written.
    fn after_batch(
        &self,
        events: &[Event<R>],
        outcomes: &[Outcome],
    ) -> impl Future<Output = ()> + Send {
        let _ = (events, outcomes);
        async {}
    }
}

/// A handler with a [`Step`] around it.
#[derive(Debug)]
pub struct WithStep<H, S> {
    handler: H,
    step: S,
}

/// Adds [`with_step`](StepExt::with_step) to every [`BatchHandler`].
pub trait StepExt<R: Route>: BatchHandler<R> + Sized {
    /// This handler with `step` around it.
    fn with_step<S: Step<R>>(self, step: S) -> WithStep<Self, S> {
        WithStep {
            handler: self,
            step,
        }
    }
}

impl<R: Route, H: BatchHandler<R>> StepExt<R> for H {}

/// Runs the step's after-hooks on the handler's outcomes.
async fn after_step<R: Route, S: Step<R>>(
    step: &S,
    events: &[Event<R>],
    outcomes: impl Future<Output = Vec<Outcome>>,
) -> Vec<Outcome> {
    let mut outcomes = outcomes.await;
    for (event, outcome) in events.iter().zip(outcomes.iter_mut()) {
        step.after_event(event, outcome).await;
    }
    step.after_batch(events, &outcomes).await;
    outcomes
}

impl<R: Route, H: BatchHandler<R>, S: Step<R>> BatchHandler<R> for WithStep<H, S> {
    async fn handle(&self, events: &[Event<R>]) -> Vec<Outcome> {
        self.step.before_batch(events).await;
        after_step(&self.step, events, self.handler.handle(events)).await
    }

    async fn handle_held(&self, events: &[Event<R>], held: &HeldRows) -> Vec<Outcome> {
        self.step.before_batch(events).await;
        after_step(&self.step, events, self.handler.handle_held(events, held)).await
    }
}

/// A shared step (the caller keeps a handle, e.g. to read its counters).
impl<R: Route, S: Step<R>> Step<R> for Arc<S> {
    fn before_batch(&self, events: &[Event<R>]) -> impl Future<Output = ()> + Send {
        S::before_batch(self, events)
    }

    fn after_event(
        &self,
        event: &Event<R>,
        outcome: &mut Outcome,
    ) -> impl Future<Output = ()> + Send {
        S::after_event(self, event, outcome)
    }

    fn after_batch(
        &self,
        events: &[Event<R>],
        outcomes: &[Outcome],
    ) -> impl Future<Output = ()> + Send {
        S::after_batch(self, events, outcomes)
    }
}
