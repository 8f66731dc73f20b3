//! [`HandlerStep`]: the processor's batch handler that runs a [`Handler`]
//! on each event, with a timeout, a concurrency limit and a span.

use futures_util::FutureExt as _;
use std::sync::Arc;
use std::time::Duration;

use crate::model::{InboxEvent, InboxRoute};
use crate::pipeline::{BatchHandler, Outcome};

use super::{Handler, counted, transient};
use crate::inbox::context::{Dependencies, HandlerContext};

/// The handler step of `inbox process`: runs a [`Handler`] on each claimed
/// event, `concurrency` at a time, each bounded by `timeout` (a timeout is a
/// counted failure).
pub struct HandlerStep<H: Handler> {
    handler: Arc<H>,
    concurrency: usize,
    timeout: Duration,
    deps: Dependencies,
    /// Set by [`in_transactions`](Self::in_transactions).
    table: Option<crate::store::AnyTable<InboxRoute>>,
    /// Set by [`metrics`](Self::metrics).
    metrics: Option<Arc<dyn crate::pipeline::MetricsRecorder>>,
}

impl<H: Handler> HandlerStep<H> {
    /// Wraps `handler`.
    pub fn new(handler: Arc<H>, concurrency: usize, timeout: Duration) -> Self {
        HandlerStep {
            handler,
            concurrency: concurrency.max(1),
            timeout,
            deps: Dependencies::default(),
            table: None,
            metrics: None,
        }
    }

    /// Reports each handler run's time to `metrics`
    /// ([`MetricsRecorder::handler_time`](crate::pipeline::MetricsRecorder::handler_time);
    /// `handler_duration_seconds` in Prometheus).
    pub fn metrics<M: crate::pipeline::MetricsRecorder>(mut self, metrics: Arc<M>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs the handler on `event` in `cx`, timed.
    async fn run(&self, event: &InboxEvent, cx: &mut HandlerContext<'_>) -> Outcome {
        let started = std::time::Instant::now();
        let outcome = run_handler(self.handler.as_ref(), event, self.timeout, None, cx).await;
        if let Some(m) = &self.metrics {
            m.handler_time(
                crate::model::Table::Inbox,
                event.event_type(),
                started.elapsed(),
            );
        }
        outcome
    }

    /// Runs each event's handler (one whose
    /// [`in_transaction`](Handler::in_transaction) is true) in a transaction
    /// of its own on `table`, the handler's writes ([`HandlerContext::tx`])
    /// and the row's completion committed together; a failing run's writes
    /// are rolled back. The completion is guarded by the claim: a row whose
    /// lease was lost meanwhile is not completed and the writes are rolled
    /// back. On SQLite each such transaction holds the database's write lock
    /// while its handler runs.
    pub fn in_transactions(mut self, table: crate::store::AnyTable<InboxRoute>) -> Self {
        self.table = Some(table);
        self
    }

    /// One event in a transaction of its own (see `in_transactions`).
    async fn handle_in_transaction(
        &self,
        table: &crate::store::AnyTable<InboxRoute>,
        event: &InboxEvent,
        held: &crate::pipeline::HeldRows,
    ) -> Outcome {
        let mut tx = match table.begin().await {
            Ok(tx) => tx,
            Err(e) => {
                return transient(
                    format!("cannot open the handler's transaction: {e}"),
                    crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
                );
            }
        };
        let outcome = {
            let mut cx = HandlerContext::in_transaction(tx.bulk(), self.deps.clone());
            self.run(event, &mut cx).await
        };
        if !matches!(outcome, Outcome::Completed | Outcome::Skipped) {
            // Nothing of the failed run stays (its savepoint is rolled back
            // already); the processor writes the failure.
            let _ = tx.rollback().await;
            return outcome;
        }
        match tx.complete_claimed(event).await {
            Ok(true) => match tx.commit().await {
                Ok(()) => {
                    held.settled(event.id());
                    Outcome::Committed
                }
                Err(e) => transient(
                    format!(
                        "the handler's transaction could not commit (nothing of it was kept): {e}"
                    ),
                    crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
                ),
            },
            Ok(false) => {
                let _ = tx.rollback().await;
                tracing::warn!(
                    message_id = event.message_id(),
                    "the handler finished after this worker lost the row's lease; its writes \
                     were rolled back and the row is left to its new holder"
                );
                Outcome::Released
            }
            Err(e) => {
                let _ = tx.rollback().await;
                transient(
                    format!(
                        "cannot mark the row completed (the handler's writes were rolled back): {e}"
                    ),
                    crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
                )
            }
        }
    }

    /// Hands `deps` to every handler run ([`HandlerContext::dep`]).
    pub fn with_dependencies(mut self, deps: Dependencies) -> Self {
        self.deps = deps;
        self
    }
}

/// Runs `handler` on one event with a timeout, in a `process SOURCE` span
/// (when spans are made) whose parent is the event's trace context;
/// `system` is the source's `messaging.system` when known. Ends the
/// handler's savepoint in `cx` (kept on success, rolled back otherwise).
pub async fn run_handler<H: Handler>(
    handler: &H,
    event: &InboxEvent,
    timeout: Duration,
    system: Option<&'static str>,
    cx: &mut HandlerContext<'_>,
) -> Outcome {
    let run = tokio::time::timeout(
        timeout,
        std::panic::AssertUnwindSafe(handler.handle(event, cx)).catch_unwind(),
    );
    let outcome = traced(run, timeout, event, system).await;
    let keep = matches!(outcome, Outcome::Completed | Outcome::Skipped);
    match cx.settle(keep).await {
        Ok(None) => outcome,
        Ok(Some(why)) => counted(why),
        Err(e) => transient(
            format!("the handler's writes could not be settled: {e}"),
            crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
        ),
    }
}

/// Awaits a handler's `run` on `event` (bounded by `timeout`) in a span
/// carrying the event's trace context; a timeout is a counted failure.
async fn traced(
    run: impl Future<Output = HandlerRun>,
    timeout: Duration,
    event: &InboxEvent,
    system: Option<&'static str>,
) -> Outcome {
    if !crate::telemetry::enabled() {
        return settled(run.await, timeout);
    }
    use crate::telemetry::{self, attr};
    use opentelemetry::context::FutureExt as _;
    let mut attrs = vec![
        attr("messaging.operation.type", "process"),
        attr("messaging.operation.name", "process"),
        attr("messaging.destination.name", event.source().to_string()),
        attr("messaging.message.id", event.message_id().to_string()),
        attr(
            "messaging.consumer.group.name",
            event.consumer_group().to_string(),
        ),
        attr("omnibox.event_id", event.id().to_string()),
        attr("omnibox.event_type", event.event_type().to_string()),
        attr("omnibox.attempt", i64::from(event.attempts_made()) + 1),
    ];
    if let Some(system) = system {
        attrs.push(attr("messaging.system", system));
    }
    let cx = telemetry::start(
        format!("process {}", event.source()),
        opentelemetry::trace::SpanKind::Consumer,
        &telemetry::extract(event.headers()),
        attrs,
    );
    let outcome = settled(run.with_context(cx.clone()).await, timeout);
    let error = match &outcome {
        Outcome::Failed { error, .. }
        | Outcome::Dead { error }
        | Outcome::Unavailable { error, .. } => Some(error.as_str()),
        Outcome::Completed | Outcome::Skipped | Outcome::Released | Outcome::Committed => None,
    };
    telemetry::end(&cx, error);
    outcome
}

/// How a handler's run ended: its outcome, a panic, or the timeout.
type HandlerRun = Result<std::thread::Result<Outcome>, tokio::time::error::Elapsed>;

/// A handler's run as an outcome: its own, or a counted failure when it
/// timed out or panicked (a panic unwinds no further than here: the
/// consumer goes on, and the message is retried, then failed and
/// dead-lettered like any failure).
fn settled(run: HandlerRun, timeout: Duration) -> Outcome {
    match run {
        Ok(Ok(o)) => o,
        Ok(Err(panic)) => counted(format!(
            "handler panicked: {}",
            crate::pipeline::panic_text(&*panic)
        )),
        Err(_) => counted(format!("handler timed out after {timeout:?}")),
    }
}

impl<H: Handler> BatchHandler<InboxRoute> for HandlerStep<H> {
    /// As `handle_held`, with nothing held.
    async fn handle(&self, events: &[InboxEvent]) -> Vec<Outcome> {
        self.handle_held(events, &crate::pipeline::HeldRows::default())
            .await
    }

    /// Runs the handler on the events in chunks of `concurrency`, each chunk finishing
    /// before the next starts; with a table set and a handler that runs in
    /// transactions, each event gets a transaction of its own.
    async fn handle_held(
        &self,
        events: &[InboxEvent],
        held: &crate::pipeline::HeldRows,
    ) -> Vec<Outcome> {
        let table = self
            .table
            .as_ref()
            .filter(|_| self.handler.in_transaction());
        let mut out = Vec::with_capacity(events.len());
        for chunk in events.chunks(self.concurrency) {
            let mut running = Vec::with_capacity(chunk.len());
            for event in chunk {
                let deps = self.deps.clone();
                running.push(async move {
                    if let Some(table) = table {
                        return self.handle_in_transaction(table, event, held).await;
                    }
                    let mut cx = HandlerContext::detached(deps);
                    self.run(event, &mut cx).await
                });
            }
            out.extend(futures_util::future::join_all(running).await);
        }
        out
    }
}
