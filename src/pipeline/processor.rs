//! One batch: claim (fetch strategy), handle (the handler step, with the
//! circuit breaker, dead-letter and metrics steps around it), write the
//! results in bulk (commit strategy). The claim and the writes are separate
//! short statements: no database transaction is open while the handler or
//! the broker works.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::batch::{ClaimedBatch, HandledBatch, Heartbeat, NextBatch, NextHandled, Ticket};
use super::circuit::{CircuitBreaker, CircuitConfig};
use super::dead_letter::DeadLetterStore;
use super::feed::{KeyFeed, Take};
use super::flight::{self, Flight, Key};
use super::options::{BatchReport, ProcessorOptions};
use super::outcome::{BatchHandler, Outcome};
use super::outcome::{HeldRows, lock};
use super::recorder::MetricsRecorder;
use crate::error::Result;
use crate::model::{Event, Route, time};
use crate::store::{ClaimOptions, EventStore};

/// Claims, handles and writes back batches of one table.
pub struct Processor<R: Route, S: EventStore<R>, H: BatchHandler<R>> {
    pub(super) store: S,
    pub(super) handler: H,
    pub(super) options: ProcessorOptions,
    pub(super) dlq: Vec<Arc<dyn DeadLetterStore<R>>>,
    pub(super) metrics: Option<Arc<dyn MetricsRecorder>>,
    pub(super) breaker: Mutex<CircuitBreaker>,
    pub(super) scan: Mutex<ScanState>,
    /// Failed events that stay pending are logged at most every few
    /// seconds (a failing handler fails every event of every batch).
    pub(super) warnings: Mutex<super::throttle::Throttle>,
    pub(super) flight: Arc<Mutex<Flight>>,
    /// Claims and results writes in progress (the runner's watchdog).
    pub(super) calls: super::stall::Calls,
    /// Keys to claim, pushed by a source that knows them (the WAL relay).
    pub(super) feed: Option<Arc<KeyFeed>>,
    pub(super) job: &'static str,
    pub(super) _route: std::marker::PhantomData<fn() -> R>,
}

/// Where this worker's claims go on scanning, and how far one may look:
/// the bound doubles while claims find only held rows, so a long backlog
/// behind another worker's key is crossed in a few claims.
#[derive(Debug, Default)]
pub(super) struct ScanState {
    pub(super) after: Option<crate::store::ClaimCursor>,
    pub(super) widen: u32,
    /// The next claim spreads out (see `ClaimOptions::spread`): the last
    /// one collided with another worker's.
    pub(super) spread: u32,
}

/// Builds a [`Processor`] (the reference's `EventProcessorBuilder`) on any
/// [`EventStore`] with any [`BatchHandler`]. `examples/dead_letters.rs` and
/// `examples/custom_step.rs` build inbox processors;
/// [`relay::publisher`](crate::relay::publisher) builds the relay's.
pub struct ProcessorBuilder<R: Route, S: EventStore<R>, H: BatchHandler<R>> {
    store: S,
    handler: H,
    options: ProcessorOptions,
    dlq: Vec<Arc<dyn DeadLetterStore<R>>>,
    metrics: Option<Arc<dyn MetricsRecorder>>,
    circuit: CircuitConfig,
    feed: Option<Arc<KeyFeed>>,
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
            feed: None,
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

    /// Claims walk the keys `feed` is given instead of scanning the table,
    /// and scan only now and then when it has none (see [`KeyFeed`]; the
    /// WAL relay's claims). Outbox only: the inbox's claims have no keys.
    pub fn key_feed(mut self, feed: Arc<KeyFeed>) -> Self {
        self.feed = Some(feed);
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
            calls: Default::default(),
            feed: self.feed,
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

    /// The handler's outcomes for `events`. A panic in it (a service's
    /// handler or step) unwinds no further: every event of the call gets a
    /// counted failure naming the panic, and the processor goes on.
    async fn handled(&self, events: &[Event<R>], held: &HeldRows) -> Vec<Outcome> {
        use futures_util::FutureExt as _;
        match std::panic::AssertUnwindSafe(self.handler.handle_held(events, held))
            .catch_unwind()
            .await
        {
            Ok(outcomes) => outcomes,
            Err(panic) => {
                let error = format!("handler panicked: {}", super::outcome::panic_text(&*panic));
                tracing::error!(rows = events.len(), %error, "a batch handler panicked");
                vec![
                    Outcome::Failed {
                        error,
                        retry: crate::domain::Retry::Counted(None),
                    };
                    events.len()
                ]
            }
        }
    }

    /// Claims one batch, handles it, writes the results. An error means the
    /// claim itself failed (nothing was claimed); failures after the claim
    /// are in the report.
    pub async fn process_batch(&self) -> Result<BatchReport> {
        match self.claim_and_handle().await? {
            NextHandled::Batch(handled) => Ok(self.finish(*handled).await),
            NextHandled::Empty { .. } => Ok(BatchReport::default()),
        }
    }

    /// First half of a batch: [`fetch`](Self::fetch) and
    /// [`handle`](Self::handle). The rows stay locked (their lease kept
    /// alive) until [`finish`](Self::finish).
    pub async fn claim_and_handle(&self) -> Result<NextHandled<R>> {
        Ok(match self.fetch().await? {
            NextBatch::Batch(f) => NextHandled::Batch(Box::new(self.handle(*f).await)),
            NextBatch::Empty { contended, more } => NextHandled::Empty { contended, more },
        })
    }

    /// The claim (fetch strategy) alone: the worker's next batch, its lease
    /// kept alive until [`finish`](Self::finish). The runner claims the
    /// next batch while the previous one is handled and the one before is
    /// written.
    pub async fn fetch(&self) -> Result<NextBatch<R>> {
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
            let (keys, mut receipt) = match &self.feed {
                None => (Vec::new(), None),
                Some(feed) => match feed.take(self.options.batch) {
                    Take::Keys(keys, receipt) => (keys, Some(receipt)),
                    Take::Scan => (Vec::new(), None),
                    Take::Nothing => {
                        return Ok(NextBatch::Empty {
                            contended: false,
                            more: false,
                        });
                    }
                },
            };
            let fed = receipt.is_some();
            let (no, own) = lock(&self.flight).begin_claim();
            let mut ticket = Ticket {
                flight: Arc::clone(&self.flight),
                no,
                receipt: None,
            };
            let call = self.calls.begin("a claim");
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
                    keys,
                    hold: self.options.hold_claims,
                })
                .await;
            drop(call);
            let claim = match claim {
                Ok(claim) => claim,
                Err(e) => {
                    // Nothing was claimed: the keys wait for the next claim
                    // (settling them would confirm rows no one claimed).
                    if let Some(r) = receipt.take() {
                        r.give_back();
                    }
                    return Err(e);
                }
            };
            let mut held: HashMap<Key, (i64, i64)> = HashMap::new();
            for e in &claim.events {
                if let (Some((topic, key)), Some(seq)) = (e.order_key(), e.seq()) {
                    flight::widen(&mut held, &(topic.to_string(), key.to_string()), (seq, seq));
                }
            }
            lock(&self.flight).claimed(no, held);
            if let Some(r) = receipt.as_mut() {
                let ids = claim.events.iter().map(|e| e.id()).collect();
                r.claimed(
                    &ids,
                    claim.events.len() >= self.options.batch as usize,
                    &self.options.filters.topics,
                );
            } else if let Some(feed) = &self.feed {
                feed.scanned(!claim.is_empty());
            }
            ticket.receipt = receipt;
            if !fed {
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
                return Ok(NextBatch::Empty {
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
            Ok(NextBatch::Batch(Box::new(ClaimedBatch {
                claim,
                lag,
                heartbeat,
                held,
                ticket,
            })))
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
    pub async fn handle(&self, fetched: ClaimedBatch<R>) -> HandledBatch<R> {
        let span = tracing::info_span!("batch", job = self.job, table = %R::TABLE, worker = %self.options.worker, rows = fetched.claim.events.len());
        async {
            let ClaimedBatch {
                mut claim,
                lag,
                heartbeat,
                held: held_rows,
                ticket} = fetched;
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
                        self.handled(&live, &held_rows).await
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
                                    )}
                            });
                            claim.events.push(e);
                        } else if let Some(e) = live.next() {
                            outcomes.push(handled.next().unwrap_or(Outcome::Released));
                            claim.events.push(e);
                        }
                    }
                    outcomes
                } else {
                    let mut o = self.handled(&claim.events, &held_rows).await;
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
            HandledBatch {
                claim,
                outcomes,
                handle_time: started.elapsed(),
                lag,
                heartbeat,
                ticket,
                forfeited}
        }
        .instrument(span)
        .await
    }

    /// Second half of a batch: write the results (with the dead-letter,
    /// circuit breaker and metrics steps).
    pub async fn finish(&self, handled: HandledBatch<R>) -> BatchReport {
        let HandledBatch {
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
}
