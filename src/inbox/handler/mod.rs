//! Handlers of inbox events: the library's trait, and the two the CLI offers:
//! a command (`--exec`) and an HTTP endpoint (`--webhook`).

use std::future::Future;
use std::time::Duration;

use crate::domain::{Retry, chrono_dur};
use crate::model::{InboxEvent, time};
use crate::pipeline::{IntoOutcome, Outcome};
use crate::relay::{DeadLetter, Message};

use super::context::HandlerContext;

mod exec;
mod step;
mod webhook;

pub use exec::{ExecHandler, event_json};
pub use step::{HandlerStep, run_handler};
pub use webhook::{WebhookHandler, redact_http_url};

/// Exit code of an `--exec` handler meaning "skipped" (completed, not processed).
pub const EXIT_SKIPPED: i32 = 3;
/// Exit code meaning "try again later, not my fault" (EX_TEMPFAIL): no attempt spent.
pub const EXIT_TEMPFAIL: i32 = 75;

/// Handles one inbox event. Implemented for closures of an [`InboxEvent`]
/// returning a future of [`Outcome`], for [`tx_handler`] closures that
/// also take the [`HandlerContext`], by structs, and by [`ExecHandler`],
/// [`WebhookHandler`] and the [`EventRouter`](super::router::EventRouter).
/// A panic in a handler is a counted failure (`handler panicked: ...`), not
/// the end of the consumer. `examples/inbox_transactional.rs` shows one
/// writing in the inbox's transaction.
pub trait Handler: Send + Sync + 'static {
    /// What happened: completed, skipped, or failed (counted or not). `cx`
    /// holds the inbox's transaction when the handler runs in it (writes
    /// through [`HandlerContext::tx`] commit or roll back with the row) and
    /// the [`Dependencies`](crate::inbox::Dependencies).
    fn handle(
        &self,
        event: &InboxEvent,
        cx: &mut HandlerContext<'_>,
    ) -> impl Future<Output = Outcome> + Send;

    /// True (the default) for a handler whose effects go through the
    /// inbox's own database: under exactly-once the consumer runs it inside
    /// the transaction that stores the row and marks it completed. False for
    /// an external effect (a command, an HTTP call): the consumer stores the
    /// row first, runs the handler with no transaction open, then marks the
    /// row completed; the receiver deduplicates by the stable event id.
    fn in_transaction(&self) -> bool {
        true
    }

    /// [`handle`](Self::handle)'s future, boxed, for a caller that holds
    /// handlers of different types (the [`EventRouter`](super::router::EventRouter)).
    /// A handler whose future is boxed already returns it as it is.
    fn handle_boxed<'a>(
        &'a self,
        event: &'a InboxEvent,
        cx: &'a mut HandlerContext<'_>,
    ) -> HandlerFuture<'a> {
        Box::pin(self.handle(event, cx))
    }
}

impl<F, Fut> Handler for F
where
    F: Fn(InboxEvent) -> Fut + Send + Sync + 'static,
    Fut: Future + Send,
    Fut::Output: IntoOutcome,
{
    /// Calls the closure with a clone of the event (the context is not
    /// passed on); what it returns becomes an [`Outcome`] ([`IntoOutcome`]:
    /// an `Outcome`, `()`, or `Result<(), E>`).
    fn handle(
        &self,
        event: &InboxEvent,
        _cx: &mut HandlerContext<'_>,
    ) -> impl Future<Output = Outcome> + Send {
        let run = self(event.clone());
        async move { run.await.into_outcome() }
    }
}

/// A boxed handler future borrowing the event and the context.
pub type HandlerFuture<'a> = futures_util::future::BoxFuture<'a, Outcome>;

/// A [`Handler`] made of a closure that takes the event and the
/// [`HandlerContext`] (for writes in the inbox's transaction), returning a
/// boxed future. See [`tx_handler`].
pub struct TxFn<F>(F);

/// Makes a [`Handler`] of a closure that writes in the inbox's transaction:
///
/// ```no_run
/// use omnibox::inbox::tx_handler;
/// use omnibox::pipeline::Outcome;
///
/// let handler = tx_handler(|event, cx| {
///     Box::pin(async move {
///         let Ok(conn) = cx.sqlite().await else {
///             return Outcome::Completed;
///         };
///         let _ = sqlx::query("INSERT INTO seen (id) VALUES (?)")
///             .bind(event.id().to_string())
///             .execute(conn)
///             .await;
///         Outcome::Completed
///     })
/// });
/// ```
pub fn tx_handler<F>(f: F) -> TxFn<F>
where
    F: for<'a, 'c> Fn(&'a InboxEvent, &'a mut HandlerContext<'c>) -> HandlerFuture<'a>
        + Send
        + Sync
        + 'static,
{
    TxFn(f)
}

impl<F> Handler for TxFn<F>
where
    F: for<'a, 'c> Fn(&'a InboxEvent, &'a mut HandlerContext<'c>) -> HandlerFuture<'a>
        + Send
        + Sync
        + 'static,
{
    /// Calls the closure with the event and the context.
    async fn handle(&self, event: &InboxEvent, cx: &mut HandlerContext<'_>) -> Outcome {
        (self.0)(event, cx).await
    }

    /// The closure's own boxed future.
    fn handle_boxed<'a>(
        &'a self,
        event: &'a InboxEvent,
        cx: &'a mut HandlerContext<'_>,
    ) -> HandlerFuture<'a> {
        (self.0)(event, cx)
    }
}

/// A failure that spends an attempt, retried after the backoff's delay (`failed` at
/// the last attempt).
fn counted(error: impl Into<String>) -> Outcome {
    Outcome::Failed {
        error: error.into(),
        retry: Retry::Counted(None),
    }
}

/// A failure that spends no attempt, retried `after` from now.
fn transient(error: impl Into<String>, after: Duration) -> Outcome {
    Outcome::Failed {
        error: error.into(),
        retry: Retry::NotCounted(time::now() + chrono_dur(after)),
    }
}

/// Any of the CLI's handlers.
#[derive(Debug, Clone)]
pub enum AnyHandler {
    /// `--exec`.
    Exec(ExecHandler),
    /// `--webhook`.
    Webhook(WebhookHandler),
    /// Marks every event completed (the demo's "small handler").
    Accept,
}

impl Handler for AnyHandler {
    /// Runs the command or posts to the URL; `Accept` completes every event.
    async fn handle(&self, event: &InboxEvent, cx: &mut HandlerContext<'_>) -> Outcome {
        match self {
            AnyHandler::Exec(h) => h.handle(event, cx).await,
            AnyHandler::Webhook(h) => h.handle(event, cx).await,
            AnyHandler::Accept => Outcome::Completed,
        }
    }

    /// Only `Accept` runs in the inbox's transaction: `--exec` and `--webhook` have
    /// external effects.
    fn in_transaction(&self) -> bool {
        matches!(self, AnyHandler::Accept)
    }
}

impl DeadLetter for InboxEvent {
    /// The event as a dead letter to `topic`: keyed by its message id, the payload as
    /// value, its headers plus `event_id`, `message_id`, `event_type`, `source`,
    /// `consumer_group`, `dlq_error` (control characters dropped, at most 512 characters) and
    /// `dlq_attempts` (the attempts including this one).
    fn dead_letter(&self, topic: &str, error: &str) -> Message {
        let mut headers = self.headers().cloned().unwrap_or_default();
        headers.insert("event_id".into(), self.id().to_string());
        headers.insert("message_id".into(), self.message_id().to_string());
        headers.insert("event_type".into(), self.event_type().to_string());
        headers.insert("source".into(), self.source().to_string());
        headers.insert("consumer_group".into(), self.consumer_group().to_string());
        headers.insert(
            "dlq_error".into(),
            error
                .chars()
                .filter(|c| !c.is_control())
                .take(512)
                .collect(),
        );
        headers.insert(
            "dlq_attempts".into(),
            (self.attempts_made() + 1).to_string(),
        );
        let value = serde_json::value::RawValue::from_string(
            serde_json::to_string(self.payload()).expect("a payload serialises"),
        )
        .expect("valid JSON");
        Message {
            topic: topic.to_string(),
            key: self.message_id().to_string(),
            headers,
            value,
            event_id: self.id(),
        }
    }
}
