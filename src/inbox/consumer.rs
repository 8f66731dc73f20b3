//! The inbox consumer (the reference's `InboxConsumerRunner`): messages from
//! a source into the inbox table, a batch per database transaction, with the
//! ack strategies of docs/design.md, "The inbox".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

use super::handler::{Handler, run_handler};
use super::normalize::{Normalized, RawMessage, normalize_all};
use super::source::Source;
use crate::domain::{Backoff, DomainService, Retry};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::{InboxEvent, InboxRoute, WorkerId, time};
use crate::pipeline::{DeadLetter, Verdict};
use crate::relay::{AnySink, Sink};
use crate::store::{AnyTable, ClaimToken, EventStore, Failure, RetryAt};

/// When the broker offset is committed (docs/design.md, "The inbox").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AckStrategy {
    /// Before anything else: a crash can lose the message, never repeat it.
    AtMostOnce,
    /// After the row is stored ([`CommitOn::Persist`], also after a handler
    /// error), or after it is stored and handled ([`CommitOn::Success`]).
    AtLeastOnce(CommitOn),
    /// After the transaction that stores the row (and runs the handler and
    /// marks it completed) commits; a duplicate is committed at once; a
    /// handler failure rolls the row back and the message is delivered again.
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
    /// How long a poll waits for the first message.
    pub poll_wait: Duration,
    /// Bound on one handler run.
    pub handler_timeout: Duration,
    /// Exactly-once: deliveries of a message whose handler keeps failing
    /// before it is stored as `failed` (so it cannot block its partition).
    pub max_redeliveries: u32,
}

impl ConsumeOptions {
    /// Defaults: exactly-once, batches of 500, 1 s polls, 30 s handler timeout,
    /// 6 deliveries.
    pub fn new(group: impl Into<String>, worker: WorkerId) -> Self {
        ConsumeOptions {
            group: group.into(),
            worker,
            ack: AckStrategy::ExactlyOnce,
            batch: 500,
            poll_wait: Duration::from_secs(1),
            handler_timeout: Duration::from_secs(30),
            max_redeliveries: crate::model::limits::DEFAULT_MAX_ATTEMPTS as u32,
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
    /// Handler failures (rows left for retry, or rolled back and redelivered).
    pub failed: u64,
    /// Messages rolled back and delivered again (exactly-once handler failures).
    pub redelivered: u64,
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
    metrics: Option<Arc<Metrics>>,
    dlq: Option<(Arc<AnySink>, String)>,
    /// Exactly-once: how often each message's handler failed in a row.
    failures: HashMap<(String, i32, i64), u32>,
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
            dlq: None,
            failures: HashMap::new(),
        }
    }

    /// Records metrics.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Also sends poison messages and rows that become `failed` to `topic`.
    pub fn dead_letter(mut self, sink: Arc<AnySink>, topic: impl Into<String>) -> Self {
        self.dlq = Some((sink, topic.into()));
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
        loop {
            if *shutdown.borrow() {
                break;
            }
            let polled = tokio::select! {
                p = self.source.poll(self.options.batch, self.options.poll_wait) => p,
                _ = shutdown.changed() => continue,
            };
            let polled = match polled {
                Ok(p) => {
                    errors = 0;
                    p
                }
                Err(e) if !once => {
                    errors += 1;
                    let wait = Duration::from_millis(100 * 2u64.pow(errors.min(6)));
                    tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "reading the source failed");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !polled.messages.is_empty() {
                self.consume_batch(&polled.messages, &mut report).await?;
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
        let normalized = normalize_all(&self.domain, messages, &self.options.group);
        match self.options.ack {
            AckStrategy::ExactlyOnce => self.exactly_once(messages, &normalized, report).await,
            AckStrategy::AtMostOnce => {
                self.store_then_handle(messages, &normalized, None, report)
                    .await
            }
            AckStrategy::AtLeastOnce(on) => {
                self.store_then_handle(messages, &normalized, Some(on), report)
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
        let Some((sink, topic)) = &self.dlq else {
            return;
        };
        if events.is_empty() {
            return;
        }
        let messages: Vec<_> = events
            .iter()
            .map(|e| e.dead_letter(topic, e.last_error().unwrap_or("failed")))
            .collect();
        for (m, d) in messages
            .iter()
            .zip(sink.send(&messages, Duration::from_secs(30)).await)
        {
            if d != crate::relay::Delivery::Delivered {
                tracing::error!(event_id = %m.event_id, ?d, "could not write a dead letter (the row is failed in the inbox)");
            }
        }
    }

    /// Exactly-once: one transaction stores the batch, runs the handler on
    /// each new row and marks it completed; offsets are committed after it.
    /// A handler failure ends the batch there: that message and the ones
    /// after it are rolled back and delivered again.
    async fn exactly_once(
        &mut self,
        messages: &[RawMessage],
        normalized: &[Normalized],
        report: &mut ConsumeReport,
    ) -> Result<()> {
        let events: Vec<InboxEvent> = normalized.iter().map(|n| n.event().clone()).collect();
        let mut tx = self.store.begin().await?;
        let outcomes = tx
            .insert(&events)
            .await
            .map_err(|e| persist_error(&events, e))?;
        let mut completed = Vec::new();
        let mut stop_at = None;
        let mut dead: Vec<InboxEvent> = Vec::new();
        if let Some(handler) = self.handler.clone() {
            for (i, (n, o)) in normalized.iter().zip(&outcomes).enumerate() {
                if o.existing || n.is_poison() {
                    continue;
                }
                match run_handler(handler.as_ref(), n.event(), self.options.handler_timeout)
                    .await
                    .verdict()
                {
                    Verdict::Processed => {
                        report.processed += 1;
                        completed.push(o.id);
                    }
                    Verdict::Skipped => {
                        report.skipped += 1;
                        completed.push(o.id);
                    }
                    Verdict::Failed { error, retry } => {
                        report.failed += 1;
                        let key = (
                            messages[i].topic.clone(),
                            messages[i].partition,
                            messages[i].offset,
                        );
                        let n_failed = {
                            let c = self.failures.entry(key.clone()).or_insert(0);
                            if matches!(retry, Retry::Counted(_)) {
                                *c += 1;
                            }
                            *c
                        };
                        if n_failed >= self.options.max_redeliveries {
                            // Give up on redelivery: store it failed, move on.
                            self.failures.remove(&key);
                            let mut e = n.event().clone();
                            e.status = crate::EventStatus::Failed;
                            e.attempts_made = e.max_attempts;
                            e.locked_at = None;
                            e.locked_by = None;
                            e.last_error = Some(crate::store::stored_error(&error));
                            tx.delete(&[o.id]).await?;
                            tx.insert(std::slice::from_ref(&e)).await?;
                            tracing::error!(
                                message_id = e.message_id(),
                                "handler failed {n_failed} times; stored as failed"
                            );
                            dead.push(e);
                            continue;
                        }
                        tracing::warn!(message_id = n.event().message_id(), error = %error, "handler failed; the message will be delivered again");
                        stop_at = Some(i);
                        break;
                    }
                }
            }
        }
        if let Some(i) = stop_at {
            let rolled_back: Vec<Uuid> = outcomes[i..]
                .iter()
                .filter(|o| !o.existing)
                .map(|o| o.id)
                .collect();
            tx.delete(&rolled_back).await?;
        }
        tx.complete(&completed).await?;
        tx.commit().await?;
        let done = stop_at.unwrap_or(messages.len());
        self.tally(&normalized[..done], &outcomes[..done], report);
        self.count("processed", completed.len() as u64);
        for m in &messages[..done] {
            self.failures
                .remove(&(m.topic.clone(), m.partition, m.offset));
        }
        let poison: Vec<&InboxEvent> = normalized[..done]
            .iter()
            .zip(&outcomes[..done])
            .filter(|(n, o)| n.is_poison() && !o.existing)
            .map(|(n, _)| n.event())
            .chain(dead.iter())
            .collect();
        self.forward_dead(&poison).await;
        self.commit(&messages[..done], report).await?;
        if done < messages.len() {
            report.redelivered += (messages.len() - done) as u64;
            self.source.rewind(&messages[done..]).await?;
        }
        Ok(())
    }

    /// At-most-once and at-least-once: the batch is stored (new rows locked
    /// by this consumer) in one transaction; then the handler runs and the
    /// results are written with the lock's token. A failure is an attempt
    /// spent; the row stays pending for `inbox process`.
    async fn store_then_handle(
        &mut self,
        messages: &[RawMessage],
        normalized: &[Normalized],
        commit_on: Option<CommitOn>,
        report: &mut ConsumeReport,
    ) -> Result<()> {
        let events: Vec<InboxEvent> = normalized.iter().map(|n| n.event().clone()).collect();
        let token = ClaimToken {
            worker: self.options.worker.clone(),
            locked_at: time::now(),
            lease: crate::model::limits::DEFAULT_LEASE_TIMEOUT,
        };
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
        for &i in &fresh {
            let event = normalized[i].event();
            match run_handler(handler.as_ref(), event, self.options.handler_timeout)
                .await
                .verdict()
            {
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
        self.count("processed", done.len() as u64);
        self.store.complete(&token, &done).await?;
        let failed_ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
        let fail_report = self.store.fail(&token, &failures).await?;
        if !fail_report.failed.is_empty() {
            let rows: Vec<InboxEvent> = normalized
                .iter()
                .map(|n| n.event().clone())
                .filter(|e| fail_report.failed.contains(&e.id()))
                .collect();
            self.forward_dead(&rows.iter().collect::<Vec<_>>()).await;
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
