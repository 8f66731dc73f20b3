//! `--webhook`: a handler that POSTs each event to a URL, the response
//! status the outcome.

use std::time::Duration;

use crate::model::InboxEvent;
use crate::pipeline::Outcome;

use super::exec::tail;
use super::{Handler, counted, event_json, transient};
use crate::inbox::context::HandlerContext;

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
    /// Shows the masked URL only, so credentials never reach logs.
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

/// The wait a response's `Retry-After` asks for (seconds or an HTTP date),
/// at most an hour; the default transient delay without a readable one.
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
        // At least a second: `Retry-After: 0` would have the row claimed
        // and posted again at once, round after round.
        return Duration::from_secs(secs.clamp(1, 3600));
    }
    chrono::DateTime::parse_from_rfc2822(value)
        .ok()
        .and_then(|at| {
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .ok()
        })
        .map(|d| d.clamp(Duration::from_secs(1), Duration::from_secs(3600)))
        .unwrap_or(crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY)
}

impl Handler for WebhookHandler {
    /// An HTTP call: never run inside the inbox's transaction.
    fn in_transaction(&self) -> bool {
        false
    }

    /// POSTs the event with `Idempotency-Key` set to the event id (and the trace
    /// context) and maps the response, as the type's documentation says.
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
                let body = body_tail(resp, 500).await;
                transient(format!("webhook answered {status}: {body}"), after)
            }
            _ => {
                let body = body_tail(resp, 1500).await;
                counted(format!("webhook answered {status}: {body}"))
            }
        }
    }
}

/// How much of an error reply's body is read: its end is kept for the
/// row's error, and a server that sends more is not read further (the
/// request's timeout bounds the time it may take).
const BODY_READ_MAX: usize = 1 << 20;

/// The last `max` bytes of an error reply's body, as text, from at most
/// [`BODY_READ_MAX`] bytes read: a reply of any size costs no more memory.
async fn body_tail(mut resp: reqwest::Response, max: usize) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut read = 0usize;
    while read < BODY_READ_MAX {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                kept.extend_from_slice(&chunk);
                // Slack for the trimmed whitespace and a split character.
                let keep = max + 256;
                if kept.len() > 2 * keep {
                    kept.drain(..kept.len() - keep);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    tail(&kept, max)
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
