//! The run loop: polls the source, stores each batch under the ack
//! strategy, rides out database and source outages, stops on shutdown
//! with the batch in hand finished, and reads a batch ahead where the
//! source allows it.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::InboxConsumer;
use super::options::ConsumeReport;
use crate::error::{Error, Result};
use crate::inbox::handler::Handler;
use crate::inbox::normalize::{Normalized, RawMessage};
use crate::inbox::source::Source;
use crate::inbox::unit_of_work::ConsumerStore;

/// A batch polled while the batch before it was being stored, with its
/// messages parsed.
pub(super) struct Ahead {
    pub(super) polled: Result<crate::inbox::source::Polled>,
    pub(super) normalized: Vec<Normalized>,
}

impl<S: Source, H: Handler, T: ConsumerStore> InboxConsumer<S, H, T> {
    /// Consumes until the source ends (`once`) or `shutdown` turns true. The
    /// batch in hand is always finished.
    pub async fn run(
        &mut self,
        once: bool,
        shutdown: watch::Receiver<bool>,
    ) -> Result<ConsumeReport> {
        // A batch read ahead is dropped if the batch before it is cut off
        // by the stall watchdog: read ahead only from a source that gives
        // it again.
        self.reading_ahead = self.source.read_ahead()
            && (self.options.stall_limit.is_none() || self.source.replays());
        let ran = self.run_loop(once, shutdown).await;
        self.reading_ahead = false;
        ran
    }

    /// [`run`](Self::run)'s loop.
    async fn run_loop(
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
                    _ = stop_asked(&mut shutdown) => Ok(())};
                    if let Err(e) = idled {
                        tracing::warn!(error = %e, "the source failed while paused");
                        tokio::time::sleep(step).await;
                    }
                    continue;
                }
                self.resume_at = None;
            }
            // The batch read ahead, if any, is next.
            let (polled, mut parsed) = match self.ahead.take() {
                Some(ahead) => (ahead.polled, Some(ahead.normalized)),
                None => {
                    let polled = tokio::select! {
                    p = self.source.poll_within(
                        self.options.batch,
                        self.batch_budget(),
                        self.options.poll_wait,
                    ) => p,
                    _ = stop_asked(&mut shutdown) => continue};
                    (polled, None)
                }
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
                    .consume_through_outages(
                        &polled.messages,
                        parsed.take(),
                        &mut report,
                        once,
                        &mut shutdown,
                    )
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
        // A shutdown that cancelled a poll waiting for more input: what it
        // had read (after what was read ahead) is stored before the
        // consumer stops (stdin cannot give it again), reading nothing more.
        self.reading_ahead = false;
        let mut held = match self.ahead.take() {
            Some(Ahead {
                polled: Ok(polled), ..
            }) => polled.messages,
            _ => Vec::new(),
        };
        held.extend(self.source.held());
        if !held.is_empty() {
            tracing::info!(
                messages = held.len(),
                "storing the messages read before the shutdown"
            );
            self.consume_through_outages(&held, None, &mut report, once, &mut shutdown)
                .await?;
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
        mut parsed: Option<Vec<Normalized>>,
        report: &mut ConsumeReport,
        once: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let mut outage: Option<Instant> = None;
        let mut attempt = 0u32;
        loop {
            let before = report.clone();
            let calls = self.calls.clone();
            let limit = self.options.stall_limit;
            // A stopped run loses nothing when the source gives the batch
            // again and nothing of it was committed before it was stored.
            let may_stop = self.source.replays()
                && !matches!(self.options.ack, crate::inbox::AckStrategy::AtMostOnce);
            let consumed = tokio::select! {
                consumed = self.consume_parsed(messages, parsed.take(), report) => consumed,
                // The batch's work is dropped (the lost connection with it):
                // the run stops, for the source to give the batch to the
                // next one, or stores it again on a new connection.
                why = crate::pipeline::stall::stalled(&calls, limit) => {
                    if may_stop {
                        *report = before;
                        return Err(Error::Outage(format!(
                            "{why}; {}",
                            crate::pipeline::stall::STOPPING
                        )));
                    }
                    Err(Error::Outage(format!(
                        "{why}; the batch is stored again on a new connection (this source cannot give it again)"
                    )))
                }
            };
            match consumed {
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
                        let batch = if matches!(
                            self.options.ack,
                            crate::inbox::AckStrategy::AtMostOnce
                        ) {
                            "nothing of the batch in hand was stored, and with --ack at-most-once it had been committed to the source: its messages are lost"
                        } else {
                            "nothing of the batch in hand was stored or committed"
                        };
                        return Err(Error::Outage(format!(
                            "the database was unreachable for {}s (--outage-limit); {batch}: {e}",
                            since.elapsed().as_secs()
                        )));
                    }
                    attempt += 1;
                    let wait = Duration::from_millis(100 * 2u64.pow(attempt.min(6)))
                        .min(Duration::from_secs(5));
                    tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop_asked(shutdown) => return Err(e)}
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Outside [`run`](Self::run) nothing is read ahead: a batch a run read
    /// ahead and left (the run was cancelled) goes back to the source, to
    /// be polled again.
    pub(super) async fn stop_reading_ahead(&mut self) -> Result<()> {
        self.reading_ahead = false;
        if let Some(Ahead {
            polled: Ok(polled), ..
        }) = self.ahead.take()
            && !polled.messages.is_empty()
        {
            self.source.rewind(&polled.messages).await?;
        }
        Ok(())
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

/// Resolves once `shutdown` is true. A receiver whose sender is gone (say
/// `watch::channel(false).1`) can never be asked to stop: it never
/// resolves, rather than resolving at once and cutting every poll short.
async fn stop_asked(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
