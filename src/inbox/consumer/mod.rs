//! The inbox consumer (the reference's `InboxConsumerRunner`): messages from
//! a source into the inbox table, a batch per database transaction, with the
//! ack strategies of docs/design.md, "The inbox".

use std::sync::Arc;
use std::time::{Duration, Instant};

use run::Ahead;

use super::context::Dependencies;
use super::handler::Handler;
use super::normalize::{DefaultEnvelopeParser, EnvelopeParser, Normalized, RawMessage};
use super::source::Source;
use crate::domain::{Backoff, DomainService, Retry};
use crate::error::{Error, Result};
use crate::inbox::unit_of_work::ConsumerStore;
use crate::model::{InboxEvent, InboxRoute, time};
use crate::pipeline::throttle::Throttle;
use crate::pipeline::{DeadLetterStore, Letter, MetricsRecorder, put_dead_letters};
use crate::relay::{AnySink, DeadLetterTopic};
use crate::store::{AnyTable, ClaimToken, Failure, RetryAt};

mod alive;
mod exactly_once;
mod in_transaction;
mod one;
mod options;
mod outside;
mod run;
mod store_then_handle;

pub use one::ConsumeOne;
use options::IDLE_AFTER;
pub use options::{
    AckStrategy, CommitOn, ConsumeOptions, ConsumeReport, DEFAULT_CONSUMER_LEASE,
    DEFAULT_TRANSIENT_LIMIT,
};

/// Consumes from a source into the inbox: a batch of messages per unit of
/// work of its store ([`ConsumerStore`]), under the ack strategy of its
/// [`ConsumeOptions`]; [`run`](Self::run) loops, [`process_one`](Self::process_one)
/// takes one message per call. `examples/inbox_transactional.rs` runs one
/// with a handler writing in the inbox's transaction.
pub struct InboxConsumer<S: Source, H: Handler, T: ConsumerStore = AnyTable<InboxRoute>> {
    source: S,
    store: T,
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
    /// The last [`process_one`](Self::process_one) found the source at its
    /// end with nothing left.
    ended: bool,
    /// Set while [`run`](Self::run) loops: a batch stored exactly-once
    /// without a handler polls the next one meanwhile, if the source
    /// [reads ahead](Source::read_ahead).
    reading_ahead: bool,
    /// The batch polled (and parsed) while the one before it was stored;
    /// the run loop's next batch.
    ahead: Option<Ahead>,
    /// Database calls in progress (the stall watchdog of [`run`](Self::run)).
    calls: Arc<crate::pipeline::stall::Calls>,
}

impl<S: Source, H: Handler, T: ConsumerStore> InboxConsumer<S, H, T> {
    /// A consumer of `source` into `store`, running `handler` (if any) on new rows.
    pub fn new(source: S, store: T, handler: Option<Arc<H>>, options: ConsumeOptions) -> Self {
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
            ended: false,
            limit: None,
            reading_ahead: false,
            ahead: None,
            calls: Default::default(),
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

    /// Hands `deps` to every handler run ([`HandlerContext::dep`](crate::inbox::HandlerContext::dep)).
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

    /// Adds `n` to the metrics counter `name`, when metrics are recorded and `n` is not
    /// zero.
    fn count(&self, name: &str, n: u64) {
        if let Some(m) = &self.metrics
            && n > 0
        {
            m.count(name, n);
        }
    }

    /// Stores one batch under the ack strategy.
    pub async fn consume_batch(
        &mut self,
        messages: &[RawMessage],
        report: &mut ConsumeReport,
    ) -> Result<()> {
        self.stop_reading_ahead().await?;
        self.consume_parsed(messages, None, report).await
    }

    /// [`consume_batch`](Self::consume_batch), with the messages parsed
    /// already (`parsed`, one per message) or not.
    async fn consume_parsed(
        &mut self,
        messages: &[RawMessage],
        parsed: Option<Vec<Normalized>>,
        report: &mut ConsumeReport,
    ) -> Result<()> {
        report.consumed += messages.len() as u64;
        self.count("consumed", messages.len() as u64);
        if self.options.ack == AckStrategy::AtMostOnce {
            self.commit(messages, report).await?;
        }
        let mut normalized: Vec<Normalized> = match parsed {
            Some(parsed) if parsed.len() == messages.len() => parsed,
            _ => messages.iter().map(|m| self.parse(m)).collect(),
        };
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

    /// `message` as an event of this consumer's group.
    fn parse(&self, message: &RawMessage) -> Normalized {
        self.parser
            .parse(&self.domain, message, &self.options.group)
    }

    /// The byte budget of a batch (`batch_bytes`).
    fn batch_budget(&self) -> usize {
        self.options
            .batch_bytes
            .map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX))
    }

    /// Commits the source through `messages` (nothing when there are none), counting
    /// `committed` or `commit_failed`; the source's error is returned.
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

    /// Adds the bulk insert's results to `report` and the metrics: a row already present
    /// is a duplicate, any other is stored, and a stored poison row counts as poison too.
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

    /// Sends rows that became `failed` to every dead-letter store, each with its last
    /// error, retrying a store for up to 30 s; a store that still fails is only logged.
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
        put_dead_letters(
            &self.dlq,
            &letters,
            Duration::from_secs(30),
            Some(&self.calls),
        )
        .await;
    }

    /// The token of this consumer's locks for one batch.
    fn token(&self) -> ClaimToken {
        ClaimToken {
            worker: self.options.worker.clone(),
            locked_at: time::now(),
            lease: self.options.lease,
            created_between: None,
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

    /// Logs a handler failure that gets the message delivered again, at most once per
    /// `Throttle::EVERY` (the ones between are counted and go to debug).
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
        let at = time::instant_after(wait);
        self.resume_at = Some(self.resume_at.map_or(at, |r| r.max(at)));
    }
}

/// A storage error while persisting `events`, naming the batch's first
/// message.
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
struct ToHandle {
    /// Its message's index in the batch.
    index: usize,
    event: InboxEvent,
    /// Stored by this batch (else taken: stored by an earlier delivery).
    new: bool,
}

/// An exactly-once batch handed to the handler: the claim its rows are
/// locked by, the messages polled and the rows to handle, in message order.
struct Batch<'a> {
    token: &'a ClaimToken,
    messages: &'a [RawMessage],
    work: &'a [ToHandle],
}

/// How long until a written failure's retry.
fn retry_wait(failure: &Failure) -> Duration {
    match failure.retry {
        RetryAt::After(d) => d.min(crate::model::limits::MAX_DURATION),
        RetryAt::At(t) => (t - time::now()).to_std().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler's `retry_after` of any size waits at most 100 years.
    #[test]
    fn a_retry_wait_is_bounded() {
        let failure = |retry| Failure {
            id: uuid::Uuid::nil(),
            error: "x".into(),
            counted: false,
            retry,
            dead: false,
        };
        let max = crate::model::limits::MAX_DURATION;
        assert_eq!(retry_wait(&failure(RetryAt::After(Duration::MAX))), max);
        let soon = Duration::from_secs(3);
        assert_eq!(retry_wait(&failure(RetryAt::After(soon))), soon);
        let past = time::now() - chrono::TimeDelta::hours(1);
        assert_eq!(retry_wait(&failure(RetryAt::At(past))), Duration::ZERO);
    }
}
