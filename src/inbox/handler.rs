//! Handlers of inbox events: the library's trait, and the two the CLI offers:
//! a command (`--exec`) and an HTTP endpoint (`--webhook`).

use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::domain::{Retry, chrono_dur};
use crate::model::{InboxEvent, InboxRoute, time};
use crate::pipeline::{BatchHandler, Outcome};
use crate::relay::{DeadLetter, Message};

use super::context::{Dependencies, HandlerContext};

/// Exit code of an `--exec` handler meaning "skipped" (completed, not processed).
pub const EXIT_SKIPPED: i32 = 3;
/// Exit code meaning "try again later, not my fault" (EX_TEMPFAIL): no attempt spent.
pub const EXIT_TEMPFAIL: i32 = 75;

/// Handles one inbox event. Implemented for closures of an [`InboxEvent`]
/// returning a future of [`Outcome`], for [`tx_handler`] closures that
/// also take the [`HandlerContext`], by structs, and by [`ExecHandler`],
/// [`WebhookHandler`] and the [`EventRouter`](super::router::EventRouter).
pub trait Handler: Send + Sync + 'static {
    /// What happened: completed, skipped, or failed (counted or not). `cx`
    /// holds the inbox's transaction when the handler runs in it (writes
    /// through [`HandlerContext::tx`] commit or roll back with the row) and
    /// the [`Dependencies`].
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
}

impl<F, Fut> Handler for F
where
    F: Fn(InboxEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    fn handle(
        &self,
        event: &InboxEvent,
        _cx: &mut HandlerContext<'_>,
    ) -> impl Future<Output = Outcome> + Send {
        self(event.clone())
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
    async fn handle(&self, event: &InboxEvent, cx: &mut HandlerContext<'_>) -> Outcome {
        (self.0)(event, cx).await
    }
}

fn counted(error: impl Into<String>) -> Outcome {
    Outcome::Failed {
        error: error.into(),
        retry: Retry::Counted(None),
    }
}

fn transient(error: impl Into<String>, after: Duration) -> Outcome {
    Outcome::Failed {
        error: error.into(),
        retry: Retry::NotCounted(time::now() + chrono_dur(after)),
    }
}

/// The JSON an external handler receives: the whole inbox row.
pub fn event_json(event: &InboxEvent) -> String {
    serde_json::to_string(event).expect("an event serialises")
}

/// Runs a command per event (`sh -c CMD`): the event as JSON on stdin and
/// `OMNIBOX_*` variables in the environment. Exit 0 → completed; 3 →
/// skipped; 75 → transient (no attempt spent); any other → counted failure
/// with the tail of stderr; still running at the timeout → killed, counted.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    command: String,
    timeout: Duration,
}

impl ExecHandler {
    /// A handler running `command` through `sh -c`, killed after `timeout`.
    pub fn new(command: impl Into<String>, timeout: Duration) -> Self {
        ExecHandler {
            command: command.into(),
            timeout,
        }
    }
}

/// Most bytes of a handler's output kept (its end).
const OUTPUT_TAIL: usize = 64 * 1024;

/// Reads a pipe to its end, keeping the last [`OUTPUT_TAIL`] bytes.
async fn read_tail<R: tokio::io::AsyncRead + Unpin>(mut pipe: R) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * OUTPUT_TAIL {
                    kept.drain(..kept.len() - OUTPUT_TAIL);
                }
            }
        }
    }
}

/// Kills a handler's process group when the handler's future is dropped
/// before it finished (an outer timeout, a shutdown): `kill_on_drop` alone
/// would end only `sh`, leaving what it started running, orphaned.
struct GroupGuard(Option<u32>);

impl GroupGuard {
    /// The handler finished: its group is left as the run left it.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0.take());
    }
}

/// Kills the process group a handler runs in (its id is the handler's pid).
fn kill_group(group: Option<u32>) {
    let Some(pid) = group.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals that process group; it
    // touches no memory of this process.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let start = text.len().saturating_sub(max);
    let mut start = start;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

impl Handler for ExecHandler {
    fn in_transaction(&self) -> bool {
        false
    }

    async fn handle(&self, event: &InboxEvent, _cx: &mut HandlerContext<'_>) -> Outcome {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("OMNIBOX_EVENT_ID", event.id().to_string())
            .env("OMNIBOX_EVENT_TYPE", event.event_type())
            .env("OMNIBOX_MESSAGE_ID", event.message_id())
            .env("OMNIBOX_CONSUMER_GROUP", event.consumer_group())
            .env("OMNIBOX_SOURCE", event.source())
            .env("OMNIBOX_ATTEMPT", (event.attempts_made() + 1).to_string());
        for (name, value) in [
            ("OMNIBOX_SCHEMA_VERSION", event.schema_version()),
            ("OMNIBOX_TRACE_ID", event.trace_id()),
            ("OMNIBOX_CORRELATION_ID", event.correlation_id()),
            ("OMNIBOX_CAUSATION_ID", event.causation_id()),
        ] {
            if let Some(v) = value {
                cmd.env(name, v);
            }
        }
        // The W3C trace context: the handler span's, or the event's own.
        for (name, value) in crate::telemetry::outgoing(event.headers()) {
            cmd.env(name.to_ascii_uppercase(), value);
        }
        // Its own process group: a timeout kills everything it started,
        // not only `sh`.
        cmd.process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return transient(
                    format!("cannot start the handler `{}`: {e}", self.command),
                    Duration::from_secs(5),
                );
            }
        };
        let group = child.id();
        let guard = GroupGuard(group);
        let input = event_json(event);
        // All three pipes were set to `piped` above, so `take` finds them.
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            kill_group(group);
            return counted("handler's pipes could not be opened");
        };
        // Write stdin while reading stdout and stderr: a handler may write
        // more than a pipe holds before it reads its input.
        let io = async move {
            let write = async move {
                // A handler that does not read its stdin is fine.
                let _ = stdin.write_all(input.as_bytes()).await;
                drop(stdin);
            };
            let ((), err, _) = tokio::join!(write, read_tail(stderr), read_tail(stdout));
            err
        };
        let run = async {
            tokio::pin!(io);
            let mut err = None;
            let status = loop {
                tokio::select! {
                    e = &mut io, if err.is_none() => err = Some(e),
                    s = child.wait() => break s,
                }
            };
            let err = match err {
                Some(e) => e,
                // Exited, but something it started holds its output open:
                // that is part of the handler; give it a moment, then end it.
                None => match tokio::time::timeout(Duration::from_secs(1), &mut io).await {
                    Ok(e) => e,
                    Err(_) => {
                        kill_group(group);
                        io.await
                    }
                },
            };
            (status, err)
        };
        let finished = tokio::time::timeout(self.timeout, run).await;
        guard.disarm();
        match finished {
            Err(_) => {
                kill_group(group);
                counted(format!(
                    "handler timed out after {:?} and was killed with every process it started",
                    self.timeout
                ))
            }
            Ok((Err(e), _)) => counted(format!("handler failed to run: {e}")),
            Ok((Ok(status), err)) => match status.code() {
                Some(0) => Outcome::Completed,
                Some(EXIT_SKIPPED) => Outcome::Skipped,
                Some(EXIT_TEMPFAIL) => transient(
                    format!(
                        "handler asked to retry later (exit 75): {}",
                        tail(&err, 1500)
                    ),
                    crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
                ),
                Some(code) => counted(format!("handler exited with {code}: {}", tail(&err, 1500))),
                None => counted(format!(
                    "handler was killed by a signal: {}",
                    tail(&err, 1500)
                )),
            },
        }
    }
}

/// POSTs each event as JSON to a URL. 2xx → completed; 409 → skipped;
/// 429/502/503/504 or no connection → transient (honouring `Retry-After`);
/// any other status → counted failure with the status and the body's tail;
/// no answer within the timeout → counted failure.
#[derive(Clone)]
pub struct WebhookHandler {
    url: String,
    /// `url` with its credentials and query values masked: the only form
    /// that goes into errors, rows and logs.
    shown: String,
    client: reqwest::Client,
}

impl std::fmt::Debug for WebhookHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookHandler")
            .field("url", &self.shown)
            .finish()
    }
}

/// A webhook URL for messages: the password of its user info and the
/// values of its query string are masked (`https://u:***@h/p?token=***`),
/// and a fragment is dropped ([`crate::redact::url_and_query`]).
pub fn redact_http_url(url: &str) -> String {
    crate::redact::url_and_query(url)
}

impl WebhookHandler {
    /// A handler posting to `url`, each request bounded by `timeout`.
    pub fn new(url: impl Into<String>, timeout: Duration) -> crate::error::Result<Self> {
        let url = url.into();
        let shown = redact_http_url(&url);
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(crate::error::Error::Config(format!(
                "webhook URL {shown:?} must start with http:// or https://"
            )));
        }
        if reqwest::Url::parse(&url).is_err() {
            return Err(crate::error::Error::Config(format!(
                "webhook URL {shown:?} is not a valid URL"
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            // A redirect would turn the POST into a GET elsewhere, and a 200
            // there would mark the event completed unhandled: never follow.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("omnibox/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                crate::error::Error::Config(format!("cannot create the HTTP client: {e}"))
            })?;
        Ok(WebhookHandler { url, shown, client })
    }
}

fn retry_after(resp: &reqwest::Response) -> Duration {
    let value = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let Some(value) = value else {
        return crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY;
    };
    if let Ok(secs) = value.parse::<u64>() {
        return Duration::from_secs(secs.min(3600));
    }
    chrono::DateTime::parse_from_rfc2822(value)
        .ok()
        .and_then(|at| {
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .ok()
        })
        .map(|d| d.min(Duration::from_secs(3600)))
        .unwrap_or(crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY)
}

impl Handler for WebhookHandler {
    fn in_transaction(&self) -> bool {
        false
    }

    async fn handle(&self, event: &InboxEvent, _cx: &mut HandlerContext<'_>) -> Outcome {
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", event.id().to_string())
            .header("X-Omnibox-Event-Id", event.id().to_string())
            .header("X-Omnibox-Event-Type", event.event_type())
            .header("X-Omnibox-Message-Id", event.message_id());
        // The W3C trace context: the handler span's, or the event's own.
        for (name, value) in crate::telemetry::outgoing(event.headers()) {
            request = request.header(name, value);
        }
        let sent = request.body(event_json(event)).send().await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return counted(format!(
                    "webhook {} did not answer in time: {}",
                    self.shown,
                    error_chain(e)
                ));
            }
            Err(e) => {
                return transient(
                    format!("webhook {} unreachable: {}", self.shown, error_chain(e)),
                    crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
                );
            }
        };
        let status = resp.status().as_u16();
        match status {
            200..=299 => Outcome::Completed,
            300..=399 => {
                let location = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(redact_http_url)
                    .unwrap_or_else(|| "(no Location header)".into());
                counted(format!(
                    "webhook {} answered {status} redirecting to {location}; redirects are not \
                     followed (the POST would not reach a handler): configure the final URL",
                    self.shown
                ))
            }
            409 => Outcome::Skipped,
            429 | 502 | 503 | 504 => {
                let after = retry_after(&resp);
                let body = resp.text().await.unwrap_or_default();
                transient(
                    format!("webhook answered {status}: {}", tail(body.as_bytes(), 500)),
                    after,
                )
            }
            _ => {
                let body = resp.text().await.unwrap_or_default();
                counted(format!(
                    "webhook answered {status}: {}",
                    tail(body.as_bytes(), 1500)
                ))
            }
        }
    }
}

/// A request error's text without the URL (which may hold credentials),
/// with its causes.
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
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
    async fn handle(&self, event: &InboxEvent, cx: &mut HandlerContext<'_>) -> Outcome {
        match self {
            AnyHandler::Exec(h) => h.handle(event, cx).await,
            AnyHandler::Webhook(h) => h.handle(event, cx).await,
            AnyHandler::Accept => Outcome::Completed,
        }
    }

    fn in_transaction(&self) -> bool {
        matches!(self, AnyHandler::Accept)
    }
}

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
        }
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
            run_handler(self.handler.as_ref(), event, self.timeout, None, &mut cx).await
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
    let outcome = traced(handler, event, timeout, system, cx).await;
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

async fn traced<H: Handler>(
    handler: &H,
    event: &InboxEvent,
    timeout: Duration,
    system: Option<&'static str>,
    cx: &mut HandlerContext<'_>,
) -> Outcome {
    let run = tokio::time::timeout(timeout, handler.handle(event, cx));
    if !crate::telemetry::enabled() {
        return match run.await {
            Ok(o) => o,
            Err(_) => counted(format!("handler timed out after {timeout:?}")),
        };
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
    let outcome = match run.with_context(cx.clone()).await {
        Ok(o) => o,
        Err(_) => counted(format!("handler timed out after {timeout:?}")),
    };
    let error = match &outcome {
        Outcome::Failed { error, .. }
        | Outcome::Dead { error }
        | Outcome::Unavailable { error, .. } => Some(error.as_str()),
        Outcome::Completed | Outcome::Skipped | Outcome::Released | Outcome::Committed => None,
    };
    telemetry::end(&cx, error);
    outcome
}

impl<H: Handler> BatchHandler<InboxRoute> for HandlerStep<H> {
    async fn handle(&self, events: &[InboxEvent]) -> Vec<Outcome> {
        self.handle_held(events, &crate::pipeline::HeldRows::default())
            .await
    }

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
                    run_handler(self.handler.as_ref(), event, self.timeout, None, &mut cx).await
                });
            }
            out.extend(futures_util::future::join_all(running).await);
        }
        out
    }
}

impl DeadLetter for InboxEvent {
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
