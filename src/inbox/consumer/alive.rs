//! Running a handler while the source keeps its place: the consumer's
//! handler calls, with the source idling (Kafka: paused partitions, polls
//! going on) while a slow handler runs.

use std::time::{Duration, Instant};

use super::{IDLE_AFTER, InboxConsumer};
use crate::inbox::context::HandlerContext;
use crate::inbox::handler::{Handler, run_handler};
use crate::inbox::source::Source;
use crate::inbox::unit_of_work::ConsumerStore;
use crate::model::InboxEvent;
use crate::pipeline::{EventOutcome, MetricsRecorder, Outcome};

impl<S: Source, H: Handler, T: ConsumerStore> InboxConsumer<S, H, T> {
    /// Runs `handler` on `event` in `cx` (see [`handle_alive`]).
    pub(super) async fn handle(
        &mut self,
        handler: &H,
        event: &InboxEvent,
        cx: &mut HandlerContext<'_>,
    ) -> Outcome {
        handle_alive(
            &mut self.source,
            handler,
            event,
            self.options.handler_timeout,
            cx,
            self.limit.as_deref(),
            self.metrics.as_deref(),
        )
        .await
    }

    /// Runs `handler` on `event` with no transaction open.
    pub(super) async fn handle_detached(&mut self, handler: &H, event: &InboxEvent) -> Outcome {
        let mut cx = HandlerContext::detached(self.deps.clone());
        self.handle(handler, event, &mut cx).await
    }
}

/// Runs `handler` on `event`; when it runs longer than a moment, the source
/// idles meanwhile (Kafka: paused partitions, polls go on), so a slow handler
/// does not outlive the group's poll interval.
#[allow(clippy::too_many_arguments)]
async fn handle_alive<S: Source, H: Handler>(
    source: &mut S,
    handler: &H,
    event: &InboxEvent,
    timeout: Duration,
    cx: &mut HandlerContext<'_>,
    limit: Option<&tokio::sync::Semaphore>,
    metrics: Option<&dyn MetricsRecorder>,
) -> Outcome {
    let system =
        crate::telemetry::enabled().then(|| crate::telemetry::system_of(&source.describe()));
    let run = async {
        // A closed semaphore (never closed here) would mean no limit.
        let _permit = match limit {
            Some(l) => l.acquire().await.ok(),
            None => None,
        };
        let started = Instant::now();
        let outcome = run_handler(handler, event, timeout, system, cx).await;
        if let Some(m) = metrics {
            m.handled(
                crate::model::Table::Inbox,
                &EventOutcome {
                    event_type: event.event_type(),
                    attempts_made: event.attempts_made(),
                    max_attempts: event.max_attempts(),
                    outcome: &outcome,
                },
                started.elapsed(),
            );
        }
        outcome
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
