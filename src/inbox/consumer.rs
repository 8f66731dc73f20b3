//! The inbox consumer (the reference's `InboxConsumerRunner`): messages from
//! a source into the inbox table, a batch per database transaction, with the
//! ack strategies of docs/design.md, "The inbox".

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

use super::context::{Dependencies, HandlerContext};
use super::handler::{Handler, run_handler};
use super::normalize::{DefaultEnvelopeParser, EnvelopeParser, Normalized, RawMessage};
use super::source::Source;
use crate::domain::{Backoff, DomainService, Retry};
use crate::error::{Error, Result};
use crate::model::{InboxEvent, InboxRoute, WorkerId, time};
use crate::pipeline::throttle::Throttle;
use crate::pipeline::{DeadLetterStore, Letter, MetricsRecorder, Verdict, put_dead_letters};
use crate::pipeline::{Heartbeat, Outcome};
use crate::relay::{AnySink, DeadLetterTopic};
use crate::store::{AnyTable, ClaimToken, EventStore, Existing, Failure, InboxStore, RetryAt};

/// When the broker offset is committed (docs/design.md, "The inbox").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AckStrategy {
    /// Before anything else: a crash can lose the message, never repeat it.
    AtMostOnce,
    /// After the row is stored ([`CommitOn::Persist`], also after a handler
    /// error), or after it is stored and handled ([`CommitOn::Success`]).
    AtLeastOnce(CommitOn),
    /// After the row is stored and handled: a handler that works in the
    /// database ([`Handler::in_transaction`]) runs inside the transaction
    /// that stores the row and marks it completed; an external one runs
    /// after the row is stored (locked by this consumer) and before it is
    /// marked completed. A duplicate is committed at once. A handler failure
    /// is written to the row (attempts, error, retry time) and the message
    /// is delivered again once its retry time comes, so the attempt count
    /// and the backoff survive restarts and rebalances.
    ExactlyOnce,
}

/// The commit point of [`AckStrategy::AtLeastOnce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommitOn {
    /// Once stored.
    Persist,
    /// Once stored and handled (completed or skipped).
    Success,
}

/// Default of [`ConsumeOptions::transient_limit`].
pub const DEFAULT_TRANSIENT_LIMIT: Duration = Duration::from_secs(3600);
/// Default of [`ConsumeOptions::lease`].
pub const DEFAULT_CONSUMER_LEASE: Duration = Duration::from_secs(30);
/// A handler still running after this long makes the source idle (Kafka:
/// partitions paused, polls go on) until it ends.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Settings of an [`InboxConsumer`].
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// The consumer group (part of the deduplication key).
    pub group: String,
    /// This consumer's id (locks rows while a handler runs them).
    pub worker: WorkerId,
    /// The ack strategy.
    pub ack: AckStrategy,
    /// Messages per database transaction.
    pub batch: usize,
    /// Bytes per database transaction ([`RawMessage::size`]: value, key and
    /// headers): a batch ends before the message that would pass it, and
    /// holds at least one message ([`Source::poll_within`]). `None`:
    /// messages alone bound a batch.
    pub batch_bytes: Option<u64>,
    /// How long a poll waits for the first message.
    pub poll_wait: Duration,
    /// Bound on one handler run.
    pub handler_timeout: Duration,
    /// Counted failures of a message's handler before its row is `failed`
    /// (so it cannot block its partition): the `max_attempts` of new rows.
    pub max_redeliveries: u32,
    /// Exactly-once: the wait before a message whose handler failed (a
    /// counted failure) is delivered again, by its attempts so far.
    pub backoff: Backoff,
    /// Exactly-once: a message whose handler keeps failing transiently (no
    /// attempt spent: exit 75, HTTP 429/502/503/504, no connection) is
    /// parked as `failed` once this long has passed since its row was stored.
    pub transient_limit: Duration,
    /// Exactly-once with an external handler: how long the rows of a batch
    /// stay locked by this consumer; the lease is extended every third of it
    /// while the batch is handled, so it bounds only how long a consumer
    /// that died holds its rows.
    pub lease: Duration,
    /// A `once` run gives up (with an error) when the database has been
    /// unreachable this long; a running consumer waits for it however long.
    pub outage_limit: Duration,
}

impl ConsumeOptions {
    /// Defaults: exactly-once, batches of 500 messages and 16 MiB
    /// ([`DEFAULT_BATCH_BYTES`](crate::model::limits::DEFAULT_BATCH_BYTES)),
    /// 1 s polls, 30 s handler timeout, 6 deliveries.
    pub fn new(group: impl Into<String>, worker: WorkerId) -> Self {
        ConsumeOptions {
            group: group.into(),
            worker,
            ack: AckStrategy::ExactlyOnce,
            batch: 500,
            batch_bytes: Some(crate::model::limits::DEFAULT_BATCH_BYTES),
            poll_wait: Duration::from_secs(1),
            handler_timeout: Duration::from_secs(30),
            max_redeliveries: crate::model::limits::DEFAULT_MAX_ATTEMPTS as u32,
            backoff: Backoff::default(),
            transient_limit: DEFAULT_TRANSIENT_LIMIT,
            lease: DEFAULT_CONSUMER_LEASE,
            outage_limit: Duration::from_secs(60),
        }
    }
}

/// Totals of a consume run; the `--format json` shape of `inbox consume`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsumeReport {
    /// Messages read.
    pub consumed: u64,
    /// New rows stored.
    pub stored: u64,
    /// Messages already in the inbox for this group.
    pub duplicates: u64,
    /// Messages that could not be parsed (stored as failed rows).
    pub poison: u64,
    /// Handled and completed.
    pub processed: u64,
    /// Handled and skipped by the handler's choice.
    pub skipped: u64,
    /// Handler failures, whatever followed: `retrying` plus `dead`. Kept
    /// because the JSON summary's fields are never renamed; the summary's
    /// table shows the two apart.
    pub failed: u64,
    /// Handler failures that left their row pending, to be tried again
    /// (rows left for retry, or rolled back and redelivered).
    pub retrying: u64,
    /// Handler failures that made their row `failed` (its attempts spent,
    /// or failing transiently past `transient_limit`): what `status`
    /// counts as failed.
    pub dead: u64,
    /// Messages rewound to be delivered again (a handler failure waiting for
    /// its retry time, a row held by another consumer).
    pub redelivered: u64,
    /// Deliveries of a message whose row an earlier delivery stored and that
    /// was handled again (its retry time had come).
    pub retried: u64,
    /// Messages of partitions revoked by a rebalance while they were in
    /// hand: neither handled nor committed here.
    pub revoked: u64,
    /// Offset commits done.
    pub commits: u64,
    /// Seconds the run took.
    pub elapsed_seconds: f64,
    /// Messages read per second.
    pub messages_per_second: f64,
}

/// Consumes from a source into the inbox.
pub struct InboxConsumer<S: Source, H: Handler> {
    source: S,
    store: AnyTable<InboxRoute>,
    handler: Option<Arc<H>>,
    options: ConsumeOptions,
    domain: DomainService,
    backoff: Backoff,
    metrics: Option<Arc<dyn MetricsRecorder>>,
    dlq: Vec<Arc<dyn DeadLetterStore<InboxRoute>>>,
    /// Exactly-once: the source is paused until then (a retry's time).
    resume_at: Option<Instant>,
    /// Repeated handler-failure warnings are logged at most every few
    /// seconds; the others are counted here and reported with the next.
    warnings: Throttle,
    /// Handed to every handler run.
    deps: Dependencies,
    /// Turns messages into events.
    parser: Arc<dyn EnvelopeParser>,
    /// Shared bound on handler runs at once (`with_concurrency_limit`).
    limit: Option<Arc<tokio::sync::Semaphore>>,
}

impl<S: Source, H: Handler> InboxConsumer<S, H> {
    /// A consumer of `source` into `store`, running `handler` (if any) on new rows.
    pub fn new(
        source: S,
        store: AnyTable<InboxRoute>,
        handler: Option<Arc<H>>,
        options: ConsumeOptions,
    ) -> Self {
        InboxConsumer {
            source,
            store,
            handler,
            options,
            domain: DomainService::default(),
            backoff: Backoff::default(),
            metrics: None,
            dlq: Vec::new(),
            resume_at: None,
            warnings: Throttle::default(),
            deps: Dependencies::default(),
            parser: Arc::new(DefaultEnvelopeParser),
            limit: None,
        }
    }

    /// Bounds the handler runs of every consumer sharing `limit` to its
    /// permits at once (the reference's `concurrency_limit`): e.g. several
    /// consumers of one service, one per topic, sharing one database pool.
    /// A run waiting for a permit keeps its source alive like a slow one.
    pub fn with_concurrency_limit(mut self, limit: Arc<tokio::sync::Semaphore>) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Creates events through `domain` instead of the default one: its
    /// limits apply to every message, and its `max_attempts` becomes the
    /// consumer's redelivery limit ([`ConsumeOptions::max_redeliveries`]).
    pub fn with_domain(mut self, domain: DomainService) -> Self {
        self.options.max_redeliveries =
            u32::try_from(domain.limits().max_attempts.max(1)).unwrap_or(1);
        self.domain = domain;
        self
    }

    /// Reads messages with `parser` instead of the default rule
    /// ([`DefaultEnvelopeParser`]).
    pub fn with_parser(mut self, parser: impl EnvelopeParser) -> Self {
        self.parser = Arc::new(parser);
        self
    }

    /// Hands `deps` to every handler run ([`HandlerContext::dep`]).
    pub fn with_dependencies(mut self, deps: Dependencies) -> Self {
        self.deps = deps;
        self
    }

    /// Records metrics.
    pub fn metrics<M: MetricsRecorder>(mut self, metrics: Arc<M>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Also sends poison messages and rows that become `failed` to `topic`.
    pub fn dead_letter(self, sink: Arc<AnySink>, topic: impl Into<String>) -> Self {
        self.dead_letter_store(Arc::new(DeadLetterTopic::new(sink, topic)))
    }

    /// Also keeps poison messages and rows that become `failed` in `store`
    /// (e.g. a [`DeadLetterTable`](crate::store::dead_letters::DeadLetterTable)).
    pub fn dead_letter_store<D: DeadLetterStore<InboxRoute>>(mut self, store: Arc<D>) -> Self {
        self.dlq.push(store);
        self
    }

    fn count(&self, name: &str, n: u64) {
        if let Some(m) = &self.metrics
            && n > 0
        {
            m.count(name, n);
        }
    }

    /// Consumes until the source ends (`once`) or `shutdown` turns true. The
    /// batch in hand is always finished.
    pub async fn run(
        &mut self,
        once: bool,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<ConsumeReport> {
        // A bad group would make every message's row invalid: refuse it
        // before anything is read.
        crate::model::validate::consumer_group(&self.options.group)?;
        let started = Instant::now();
        let mut report = ConsumeReport::default();
        let mut errors = 0u32;
        // A source outage (a broker restart, say) is warned about once (at
        // most once a minute), and its end logged.
        let mut outage_since: Option<Instant> = None;
        let mut warned_at: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            if let Some(at) = self.resume_at {
                let now = Instant::now();
                if now < at {
                    let step = (at - now).min(Duration::from_secs(1));
                    let idled = tokio::select! {
                        r = self.source.idle(step) => r,
                        _ = shutdown.changed() => Ok(()),
                    };
                    if let Err(e) = idled {
                        tracing::warn!(error = %e, "the source failed while paused");
                        tokio::time::sleep(step).await;
                    }
                    continue;
                }
                self.resume_at = None;
            }
            let polled = tokio::select! {
                p = self.source.poll_within(
                    self.options.batch,
                    self.options
                        .batch_bytes
                        .map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX)),
                    self.options.poll_wait,
                ) => p,
                _ = shutdown.changed() => continue,
            };
            let polled = match polled {
                Ok(p) => {
                    errors = 0;
                    // Messages, or an answer about the end: it answers again.
                    if (!p.messages.is_empty() || p.end)
                        && let Some(since) = outage_since.take()
                    {
                        tracing::info!(
                            after_s = since.elapsed().as_secs(),
                            "the source answers again"
                        );
                    }
                    p
                }
                Err(e) if !once => {
                    errors += 1;
                    let wait = Duration::from_millis(100 * 2u64.pow(errors.min(5)));
                    outage_since.get_or_insert_with(Instant::now);
                    if warned_at.is_none_or(|w| w.elapsed() >= Duration::from_secs(60)) {
                        warned_at = Some(Instant::now());
                        tracing::warn!(error = %e, "reading the source failed; retrying with backoff until it answers (nothing is lost: offsets are committed only after messages are stored)");
                    } else {
                        tracing::debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "reading the source failed again");
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !polled.messages.is_empty() {
                let span = crate::telemetry::enabled().then(|| {
                    receive_span(
                        &self.source.describe(),
                        &self.options.group,
                        &polled.messages,
                    )
                });
                let stored = self
                    .consume_through_outages(&polled.messages, &mut report, once, &mut shutdown)
                    .await;
                if let Some(cx) = span {
                    let error = stored.as_ref().err().map(|e| e.to_string());
                    crate::telemetry::end(&cx, error.as_deref());
                }
                stored?;
            }
            if polled.end && once && polled.messages.is_empty() {
                break;
            }
        }
        report.elapsed_seconds = started.elapsed().as_secs_f64();
        report.messages_per_second = if report.elapsed_seconds > 0.0 {
            report.consumed as f64 / report.elapsed_seconds
        } else {
            0.0
        };
        Ok(report)
    }

    /// [`consume_batch`](Self::consume_batch), again and again while the
    /// database is unreachable (a restart, a network cut): the batch's
    /// transaction rolled back, nothing was committed to the source, so the
    /// same messages are stored once it is back. One warning per outage, not
    /// one per retry. A `once` run gives up after `outage_limit`; a shutdown
    /// during an outage ends the run with the error (the messages are
    /// delivered again to the next run).
    async fn consume_through_outages(
        &mut self,
        messages: &[RawMessage],
        report: &mut ConsumeReport,
        once: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let mut outage: Option<Instant> = None;
        let mut attempt = 0u32;
        loop {
            let before = report.clone();
            match self.consume_batch(messages, report).await {
                Ok(()) => {
                    if let Some(since) = outage {
                        tracing::warn!(
                            down_for_ms = since.elapsed().as_millis() as u64,
                            "the database is back; consuming again"
                        );
                    }
                    return Ok(());
                }
                Err(e) if e.is_outage() => {
                    *report = before;
                    let since = *outage.get_or_insert_with(|| {
                        tracing::warn!(
                            error = %e,
                            "the database cannot be reached; the batch in hand is stored once it is back (retrying; logged once per outage)"
                        );
                        Instant::now()
                    });
                    if once && since.elapsed() >= self.options.outage_limit {
                        return Err(Error::Outage(format!(
                            "the database was unreachable for {}s (--outage-limit); nothing of the batch in hand was stored or committed: {e}",
                            since.elapsed().as_secs()
                        )));
                    }
                    attempt += 1;
                    let wait = Duration::from_millis(100 * 2u64.pow(attempt.min(6)))
                        .min(Duration::from_secs(5));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores one batch under the ack strategy.
    pub async fn consume_batch(
        &mut self,
        messages: &[RawMessage],
        report: &mut ConsumeReport,
    ) -> Result<()> {
        report.consumed += messages.len() as u64;
        self.count("consumed", messages.len() as u64);
        if self.options.ack == AckStrategy::AtMostOnce {
            self.commit(messages, report).await?;
        }
        let mut normalized: Vec<Normalized> = messages
            .iter()
            .map(|m| self.parser.parse(&self.domain, m, &self.options.group))
            .collect();
        match self.options.ack {
            AckStrategy::ExactlyOnce => self.exactly_once(messages, &mut normalized, report).await,
            AckStrategy::AtMostOnce => {
                self.store_then_handle(messages, &mut normalized, None, report)
                    .await
            }
            AckStrategy::AtLeastOnce(on) => {
                self.store_then_handle(messages, &mut normalized, Some(on), report)
                    .await
            }
        }
    }

    async fn commit(&mut self, messages: &[RawMessage], report: &mut ConsumeReport) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        match self.source.commit(messages).await {
            Ok(()) => {
                report.commits += 1;
                self.count("committed", 1);
                Ok(())
            }
            Err(e) => {
                self.count("commit_failed", 1);
                Err(e)
            }
        }
    }

    fn tally(
        &self,
        normalized: &[Normalized],
        outcomes: &[crate::store::BulkOutcome],
        report: &mut ConsumeReport,
    ) {
        let mut poison = 0;
        let mut stored = 0;
        let mut dups = 0;
        for (n, o) in normalized.iter().zip(outcomes) {
            if o.existing {
                dups += 1;
            } else {
                stored += 1;
                if n.is_poison() {
                    poison += 1;
                }
            }
        }
        report.stored += stored;
        report.duplicates += dups;
        report.poison += poison;
        self.count("stored", stored);
        self.count("duplicate", dups);
        self.count("poison", poison);
    }

    async fn forward_dead(&self, events: &[&InboxEvent]) {
        if self.dlq.is_empty() || events.is_empty() {
            return;
        }
        let letters: Vec<Letter<'_, InboxRoute>> = events
            .iter()
            .map(|e| Letter {
                event: e,
                error: e.last_error().unwrap_or("failed"),
            })
            .collect();
        put_dead_letters(&self.dlq, &letters, Duration::from_secs(30)).await;
    }

    /// The token of this consumer's locks for one batch.
    fn token(&self) -> ClaimToken {
        ClaimToken {
            worker: self.options.worker.clone(),
            locked_at: time::now(),
            lease: self.options.lease,
        }
    }

    /// The row a message becomes: new rows get the consumer's attempt limit.
    /// A valid event's payload and headers move to its row (a batch of
    /// large messages is not held twice): `normalized` keeps the rest. A
    /// poison row is copied whole (it is dead-lettered from `normalized`).
    fn new_rows(&self, normalized: &mut [Normalized]) -> Vec<InboxEvent> {
        let max = i32::try_from(self.options.max_redeliveries.max(1)).unwrap_or(i32::MAX);
        normalized
            .iter_mut()
            .map(|n| match n {
                Normalized::Poison(e) => (**e).clone(),
                Normalized::Event(e) => {
                    let payload = std::mem::take(&mut e.payload);
                    let headers = e.headers.take();
                    let mut row = (**e).clone();
                    row.payload = payload;
                    row.headers = headers;
                    row.max_attempts = max;
                    row
                }
            })
            .collect()
    }

    /// The failure to write for a handler's failed result: a transient one
    /// past the transient limit parks the row as failed.
    fn failure(&self, event: &InboxEvent, error: String, retry: Retry) -> Failure {
        if !retry.is_counted() {
            let age = (time::now() - event.created_at())
                .to_std()
                .unwrap_or_default();
            if age > self.options.transient_limit {
                return Failure::dead(
                    event.id(),
                    format!(
                        "gave up after failing transiently for {}s (limit {}s): {error}",
                        age.as_secs(),
                        self.options.transient_limit.as_secs()
                    ),
                );
            }
        }
        Failure::from_retry(event, error, retry, &self.options.backoff)
    }

    /// True when writing `failure` leaves the row `failed`.
    fn is_final(event: &InboxEvent, failure: &Failure) -> bool {
        failure.dead || (failure.counted && event.attempts_made() + 1 >= event.max_attempts())
    }

    fn warn_failure(&mut self, event: &InboxEvent, error: &str, wait: Duration) {
        match self.warnings.allow() {
            Some(suppressed) => tracing::warn!(
                message_id = event.message_id(),
                attempt = event.attempts_made() + 1,
                retry_in_ms = wait.as_millis() as u64,
                suppressed,
                error = %error,
                "handler failed; the message will be delivered again"
            ),
            None => {
                tracing::debug!(message_id = event.message_id(), error = %error, "handler failed again")
            }
        }
    }

    /// Pauses the source until `wait` has passed.
    fn pause_for(&mut self, wait: Duration) {
        let at = Instant::now() + wait;
        self.resume_at = Some(self.resume_at.map_or(at, |r| r.max(at)));
    }

    /// Exactly-once: see [`AckStrategy::ExactlyOnce`]. A message whose row
    /// exists and is pending is handled again when its retry time has come
    /// and no live lease holds it; otherwise the batch ends before it and
    /// the source pauses until then. A handler failure that leaves the row
    /// pending ends the batch there too (the messages after it are
    /// delivered again, after the retry time), so a partition's messages
    /// are handled in order.
    async fn exactly_once(
        &mut self,
        messages: &[RawMessage],
        normalized: &mut [Normalized],
        report: &mut ConsumeReport,
    ) -> Result<()> {
        let events = self.new_rows(normalized);
        let normalized: &[Normalized] = normalized;
        let token = self.token();
        let Some(handler) = self.handler.clone() else {
            // Nothing else to write with the rows: the store inserts them
            // on its own (on PostgreSQL a batch that fits one statement is
            // one round trip, atomic without BEGIN and COMMIT).
            let outcomes = self
                .store
                .insert_many(&events)
                .await
                .map_err(|e| persist_error(&events, e))?;
            self.tally(normalized, &outcomes, report);
            self.forward_dead_poison(normalized, &outcomes).await;
            return self.commit(messages, report).await;
        };
        let mut tx = self.store.begin().await?;
        let outcomes = tx
            .insert(&events)
            .await
            .map_err(|e| persist_error(&events, e))?;
        let existing: Vec<Uuid> = outcomes
            .iter()
            .filter(|o| o.existing)
            .map(|o| o.id)
            .collect();
        let mut met = tx.take(&existing, &token).await?;
        // Each new row goes to the handler's work list (moved, not copied).
        let mut events: Vec<Option<InboxEvent>> = events.into_iter().map(Some).collect();

        // What to handle, in message order, up to the first message whose
        // row must wait.
        let mut work: Vec<Work> = Vec::new();
        let mut seen = HashSet::with_capacity(outcomes.len());
        let mut end = messages.len();
        let mut wait_until = None;
        for (i, (n, o)) in normalized.iter().zip(&outcomes).enumerate() {
            if !seen.insert(o.id) {
                continue; // the same message twice in the batch
            }
            if !o.existing {
                if !n.is_poison()
                    && let Some(event) = events[i].take()
                {
                    work.push(Work {
                        index: i,
                        event,
                        new: true,
                    });
                }
                continue;
            }
            match met.remove(&o.id) {
                None => {} // completed or failed: a duplicate
                Some(Existing::Taken(e)) => work.push(Work {
                    index: i,
                    event: *e,
                    new: false,
                }),
                Some(Existing::Wait(until)) => {
                    end = i;
                    wait_until = Some(until);
                    break;
                }
            }
        }
        // Rows taken beyond the end go back as they were.
        let untouched: Vec<Uuid> = met
            .into_iter()
            .filter_map(|(id, m)| matches!(m, Existing::Taken(_)).then_some(id))
            .collect();
        tx.unlock(&untouched).await?;
        // New rows beyond the end are not kept: they come again.
        let beyond: Vec<Uuid> = (end..messages.len())
            .filter(|&i| !outcomes[i].existing && !normalized[i].is_poison())
            .map(|i| outcomes[i].id)
            .collect();
        tx.delete(&beyond).await?;

        let settled = if handler.in_transaction() {
            self.handle_in_transaction(tx, &token, handler.as_ref(), messages, &work, report)
                .await?
        } else {
            let fresh: Vec<Uuid> = work
                .iter()
                .filter(|w| w.new)
                .map(|w| w.event.id())
                .collect();
            tx.lock(&fresh, &token).await?;
            tx.commit().await?;
            self.handle_outside(&token, handler.as_ref(), messages, &work, report)
                .await?
        };
        let (end, retry_in) = match settled {
            Some((i, wait)) if i < end => (i, Some(wait)),
            _ => (
                end,
                wait_until.map(|t| (t - time::now()).to_std().unwrap_or_default()),
            ),
        };

        // Count what happened to the messages before the end.
        let taken: HashSet<Uuid> = work
            .iter()
            .filter(|w| !w.new)
            .map(|w| w.event.id())
            .collect();
        let mut counted = HashSet::new();
        for (i, (n, o)) in normalized.iter().zip(&outcomes).enumerate() {
            if i >= end && (o.existing || !n.is_poison()) {
                continue; // comes again (a new poison row is kept)
            }
            if !o.existing {
                if counted.insert(o.id) {
                    report.stored += 1;
                    self.count("stored", 1);
                }
            } else if taken.contains(&o.id) && counted.insert(o.id) {
                report.retried += 1;
            } else {
                report.duplicates += 1;
                self.count("duplicate", 1);
            }
        }
        report.poison += self.forward_new_poison(normalized, &outcomes).await;
        // (A source leaves out of its commit the partitions it lost.)
        let (done, rest) = messages.split_at(end);
        self.commit(done, report).await?;
        if !rest.is_empty() {
            report.redelivered += rest.len() as u64;
            self.source.rewind(rest).await?;
            let wait = retry_in.unwrap_or_default();
            self.pause_for(wait);
        }
        Ok(())
    }

    /// Sends new poison rows to the DLQ and counts them (metrics and the
    /// returned number).
    async fn forward_new_poison(
        &mut self,
        normalized: &[Normalized],
        outcomes: &[crate::store::BulkOutcome],
    ) -> u64 {
        let n = self.forward_dead_poison(normalized, outcomes).await;
        self.count("poison", n);
        n
    }

    /// Sends new poison rows to the DLQ; returns how many.
    async fn forward_dead_poison(
        &self,
        normalized: &[Normalized],
        outcomes: &[crate::store::BulkOutcome],
    ) -> u64 {
        let mut ids = HashSet::new();
        let poison: Vec<&InboxEvent> = normalized
            .iter()
            .zip(outcomes)
            .filter(|(n, o)| n.is_poison() && !o.existing && ids.insert(o.id))
            .map(|(n, _)| n.event())
            .collect();
        self.forward_dead(&poison).await;
        poison.len() as u64
    }

    /// Runs a database handler inside `tx` on each row of `work`; completes
    /// the rows it handled and commits. Returns the index of the message
    /// whose failure ends the batch, with the wait before its retry.
    async fn handle_in_transaction(
        &mut self,
        mut tx: crate::store::InboxTx,
        token: &ClaimToken,
        handler: &H,
        messages: &[RawMessage],
        work: &[Work],
        report: &mut ConsumeReport,
    ) -> Result<Option<(usize, Duration)>> {
        let mut completed = Vec::new();
        let mut failures: Vec<(Failure, &InboxEvent)> = Vec::new();
        let mut stop: Option<(usize, usize, Duration)> = None;
        let mut gone_new = Vec::new();
        let mut gone_taken = Vec::new();
        for (k, w) in work.iter().enumerate() {
            if !self.source.owns(&messages[w.index]) {
                report.revoked += 1;
                if w.new {
                    gone_new.push(w.event.id());
                } else {
                    gone_taken.push(w.event.id());
                }
                continue;
            }
            let outcome = {
                let mut cx = HandlerContext::in_transaction(tx.bulk(), self.deps.clone());
                handle_alive(
                    &mut self.source,
                    handler,
                    &w.event,
                    self.options.handler_timeout,
                    &mut cx,
                    self.limit.as_deref(),
                )
                .await
            };
            match outcome.verdict() {
                Verdict::Processed => {
                    report.processed += 1;
                    completed.push(w.event.id());
                }
                Verdict::Skipped => {
                    report.skipped += 1;
                    completed.push(w.event.id());
                }
                Verdict::Failed { error, retry } => {
                    report.failed += 1;
                    let failure = self.failure(&w.event, error, retry);
                    let last = Self::is_final(&w.event, &failure);
                    if last {
                        report.dead += 1;
                    } else {
                        report.retrying += 1;
                    }
                    let wait = retry_wait(&failure);
                    if !last {
                        self.warn_failure(&w.event, &failure.error, wait);
                    }
                    failures.push((failure, &w.event));
                    if !last {
                        stop = Some((k, w.index, wait));
                        break;
                    }
                }
            }
        }
        if let Some((k, _, _)) = stop {
            for w in &work[k + 1..] {
                if w.new {
                    gone_new.push(w.event.id());
                } else {
                    gone_taken.push(w.event.id());
                }
            }
        }
        tx.delete(&gone_new).await?;
        tx.unlock(&gone_taken).await?;
        // Failed rows are written through the lease, after the commit:
        // lock the new ones now.
        let failed_new: Vec<Uuid> = failures
            .iter()
            .filter(|(_, e)| work.iter().any(|w| w.new && w.event.id() == e.id()))
            .map(|(f, _)| f.id)
            .collect();
        tx.lock(&failed_new, token).await?;
        tx.complete(&completed).await?;
        tx.commit().await?;
        self.count("processed", completed.len() as u64);
        if !failures.is_empty() {
            let list: Vec<Failure> = failures.iter().map(|(f, _)| f.clone()).collect();
            let written = self.store.fail(token, &list).await?;
            self.forward_failed(&failures, &written.failed).await;
        }
        Ok(stop.map(|(_, i, wait)| (i, wait)))
    }

    /// Runs an external handler on each row of `work` (stored and locked by
    /// `token`) with no transaction open, writing each result before the
    /// next handler starts. Returns the index of the message whose failure
    /// ends the batch, with the wait before its retry.
    async fn handle_outside(
        &mut self,
        token: &ClaimToken,
        handler: &H,
        messages: &[RawMessage],
        work: &[Work],
        report: &mut ConsumeReport,
    ) -> Result<Option<(usize, Duration)>> {
        let held = Arc::new(std::sync::Mutex::new(
            work.iter().map(|w| w.event.id()).collect::<Vec<Uuid>>(),
        ));
        let mut heartbeat =
            Heartbeat::for_shared(&self.store, token.clone(), held.clone(), self.options.lease);
        let mut stop = None;
        let mut k = 0;
        while k < work.len() {
            let w = &work[k];
            k += 1;
            if let Ok(mut h) = held.lock()
                && k > 1
            {
                // The rows before this one are settled.
                h.retain(|id| *id != work[k - 2].event.id());
            }
            if !self.source.owns(&messages[w.index]) {
                report.revoked += 1;
                self.release(token, &[w.event.id()]).await?;
                continue;
            }
            let outcome = handle_alive(
                &mut self.source,
                handler,
                &w.event,
                self.options.handler_timeout,
                &mut HandlerContext::detached(self.deps.clone()),
                self.limit.as_deref(),
            )
            .await;
            match outcome.verdict() {
                verdict @ (Verdict::Processed | Verdict::Skipped) => {
                    match self.store.complete(token, &[w.event.id()]).await {
                        Ok(_) if matches!(verdict, Verdict::Skipped) => report.skipped += 1,
                        Ok(_) => {
                            report.processed += 1;
                            self.count("processed", 1);
                        }
                        Err(Error::ConcurrentUpdate { .. }) => tracing::warn!(
                            message_id = w.event.message_id(),
                            "the handler finished after this consumer lost the row's lease \
                             (an operator unlocked it, or it ran past the lease); it is not \
                             marked completed here and may run again"
                        ),
                        Err(e) => return Err(e),
                    }
                }
                Verdict::Failed { error, retry } => {
                    report.failed += 1;
                    let failure = self.failure(&w.event, error, retry);
                    let wait = retry_wait(&failure);
                    let written = match self.store.fail(token, std::slice::from_ref(&failure)).await
                    {
                        Ok(w) => w,
                        Err(Error::ConcurrentUpdate { .. }) => {
                            tracing::warn!(
                                message_id = w.event.message_id(),
                                "the handler failed after this consumer lost the row's lease"
                            );
                            crate::store::FailReport::default()
                        }
                        Err(e) => return Err(e),
                    };
                    if !written.failed.is_empty() {
                        report.dead += 1;
                        self.forward_failed(&[(failure, &w.event)], &written.failed)
                            .await;
                        continue;
                    }
                    report.retrying += 1;
                    self.warn_failure(&w.event, &failure.error, wait);
                    stop = Some((w.index, wait));
                    break;
                }
            }
        }
        heartbeat.stop();
        let rest: Vec<Uuid> = work[k..].iter().map(|w| w.event.id()).collect();
        self.release(token, &rest).await?;
        Ok(stop)
    }

    async fn release(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match self.store.release(token, ids).await {
            Ok(_) | Err(Error::ConcurrentUpdate { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Rows that ended `failed`: logged and sent to the DLQ.
    async fn forward_failed(&self, failures: &[(Failure, &InboxEvent)], failed: &[Uuid]) {
        let rows: Vec<InboxEvent> = failures
            .iter()
            .filter(|(f, _)| failed.contains(&f.id))
            .map(|(f, e)| {
                let mut e = (*e).clone();
                e.status = crate::EventStatus::Failed;
                e.attempts_made = (e.attempts_made + 1).min(e.max_attempts);
                e.last_error = Some(crate::store::stored_error(&f.error));
                tracing::error!(
                    message_id = e.message_id(),
                    attempts = e.attempts_made,
                    error = %f.error,
                    "handler failed for good; the row is failed (omnibox replay retries it)"
                );
                e
            })
            .collect();
        self.forward_dead(&rows.iter().collect::<Vec<_>>()).await;
    }

    /// At-most-once and at-least-once: the batch is stored (new rows locked
    /// by this consumer) in one transaction; then the handler runs and the
    /// results are written with the lock's token. A failure is an attempt
    /// spent; the row stays pending for `inbox process`.
    async fn store_then_handle(
        &mut self,
        messages: &[RawMessage],
        normalized: &mut [Normalized],
        commit_on: Option<CommitOn>,
        report: &mut ConsumeReport,
    ) -> Result<()> {
        let events = self.new_rows(normalized);
        let normalized: &[Normalized] = normalized;
        let token = self.token();
        let mut tx = self.store.begin().await?;
        let outcomes = tx
            .insert(&events)
            .await
            .map_err(|e| persist_error(&events, e))?;
        let fresh: Vec<usize> = (0..normalized.len())
            .filter(|&i| !outcomes[i].existing && !normalized[i].is_poison())
            .collect();
        if self.handler.is_some() {
            let ids: Vec<Uuid> = fresh.iter().map(|&i| outcomes[i].id).collect();
            tx.lock(&ids, &token).await?;
        }
        tx.commit().await?;
        self.tally(normalized, &outcomes, report);
        let poison: Vec<&InboxEvent> = normalized
            .iter()
            .zip(&outcomes)
            .filter(|(n, o)| n.is_poison() && !o.existing)
            .map(|(n, _)| n.event())
            .collect();
        self.forward_dead(&poison).await;
        if commit_on == Some(CommitOn::Persist) {
            self.commit(messages, report).await?;
        }
        let Some(handler) = self.handler.clone() else {
            if commit_on == Some(CommitOn::Success) {
                self.commit(messages, report).await?;
            }
            return Ok(());
        };
        let mut done = Vec::new();
        let mut failures = Vec::new();
        let ids: Vec<Uuid> = fresh.iter().map(|&i| outcomes[i].id).collect();
        let mut heartbeat =
            Heartbeat::for_rows(&self.store, token.clone(), ids, self.options.lease);
        for &i in &fresh {
            let event = &events[i];
            let outcome = handle_alive(
                &mut self.source,
                handler.as_ref(),
                event,
                self.options.handler_timeout,
                &mut HandlerContext::detached(self.deps.clone()),
                self.limit.as_deref(),
            )
            .await;
            match outcome.verdict() {
                Verdict::Processed => {
                    report.processed += 1;
                    done.push(outcomes[i].id);
                }
                Verdict::Skipped => {
                    report.skipped += 1;
                    done.push(outcomes[i].id);
                }
                Verdict::Failed { error, retry } => {
                    report.failed += 1;
                    let retry_at = match retry {
                        Retry::Counted(Some(at)) | Retry::NotCounted(at) => RetryAt::At(at),
                        Retry::NotCountedAfter(d) => RetryAt::After(d),
                        Retry::Counted(None) => RetryAt::After(self.backoff.delay(0)),
                    };
                    failures.push(Failure {
                        id: outcomes[i].id,
                        error,
                        counted: retry.is_counted(),
                        retry: retry_at,
                        dead: false,
                    });
                }
            }
        }
        heartbeat.stop();
        self.count("processed", done.len() as u64);
        self.store.complete(&token, &done).await?;
        let failed_ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
        let fail_report = self.store.fail(&token, &failures).await?;
        report.dead += fail_report.failed.len() as u64;
        report.retrying += (failures.len() - fail_report.failed.len()) as u64;
        if !fail_report.failed.is_empty() {
            let rows: Vec<&InboxEvent> = events
                .iter()
                .filter(|e| fail_report.failed.contains(&e.id()))
                .collect();
            self.forward_dead(&rows).await;
        }
        if commit_on == Some(CommitOn::Success) {
            // Commit through the last message before the first failure; the
            // rest is delivered again (its stored rows make it a duplicate).
            let first_failed = fresh
                .iter()
                .copied()
                .find(|&i| failed_ids.contains(&outcomes[i].id));
            match first_failed {
                None => self.commit(messages, report).await?,
                Some(i) => {
                    self.commit(&messages[..i], report).await?;
                    report.redelivered += (messages.len() - i) as u64;
                    self.source.rewind(&messages[i..]).await?;
                }
            }
        }
        Ok(())
    }
}

fn persist_error(events: &[InboxEvent], e: Error) -> Error {
    Error::InboxPersist {
        message_id: events
            .first()
            .map(|e| e.message_id().to_string())
            .unwrap_or_default(),
        source: Box::new(e),
    }
}

/// A row to handle in an exactly-once batch.
struct Work {
    /// Its message's index in the batch.
    index: usize,
    event: InboxEvent,
    /// Stored by this batch (else taken: stored by an earlier delivery).
    new: bool,
}

/// How long until a written failure's retry.
fn retry_wait(failure: &Failure) -> Duration {
    match failure.retry {
        RetryAt::After(d) => d,
        RetryAt::At(t) => (t - time::now()).to_std().unwrap_or_default(),
    }
}

/// The `receive` span of a polled batch (its messages' own spans are the
/// handlers', children of each message's trace context).
fn receive_span(source: &str, group: &str, messages: &[RawMessage]) -> opentelemetry::Context {
    use crate::telemetry::{self, attr};
    let mut attrs = vec![
        attr("messaging.system", telemetry::system_of(source)),
        attr("messaging.operation.type", "receive"),
        attr("messaging.operation.name", "receive"),
        attr("messaging.consumer.group.name", group.to_string()),
        attr("messaging.batch.message_count", messages.len() as i64),
    ];
    if let Some(first) = messages.first()
        && messages.iter().all(|m| m.topic == first.topic)
    {
        attrs.push(attr("messaging.destination.name", first.topic.clone()));
    }
    telemetry::start(
        "receive".into(),
        opentelemetry::trace::SpanKind::Consumer,
        &opentelemetry::Context::new(),
        attrs,
    )
}

/// Runs `handler` on `event`; when it runs longer than a moment, the source
/// idles meanwhile (Kafka: paused partitions, polls go on), so a slow handler
/// does not outlive the group's poll interval.
async fn handle_alive<S: Source, H: Handler>(
    source: &mut S,
    handler: &H,
    event: &InboxEvent,
    timeout: Duration,
    cx: &mut HandlerContext<'_>,
    limit: Option<&tokio::sync::Semaphore>,
) -> Outcome {
    let system =
        crate::telemetry::enabled().then(|| crate::telemetry::system_of(&source.describe()));
    let run = async {
        // A closed semaphore (never closed here) would mean no limit.
        let _permit = match limit {
            Some(l) => l.acquire().await.ok(),
            None => None,
        };
        run_handler(handler, event, timeout, system, cx).await
    };
    tokio::pin!(run);
    tokio::select! {
        biased;
        o = &mut run => return o,
        _ = tokio::time::sleep(IDLE_AFTER) => {}
    }
    loop {
        tokio::select! {
            biased;
            o = &mut run => return o,
            r = source.idle(Duration::from_millis(500)) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "the source failed while a handler ran");
                    return run.await;
                }
            }
        }
    }
}
