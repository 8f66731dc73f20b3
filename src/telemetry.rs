//! OpenTelemetry traces.
//!
//! The W3C trace context (`traceparent`, `tracestate`) travels with an event:
//! from an outbox row's headers to the relay's publish span, from there in
//! the broker message's headers, into the inbox row's headers, and to the
//! handler (its span; `TRACEPARENT` for `--exec`, the `traceparent` header
//! for `--webhook`).
//!
//! Spans are exported with OTLP over HTTP when an endpoint is configured
//! ([`Telemetry::install`]); otherwise no span is made and the context
//! passes through unchanged (a valid `traceparent` is handed on as it came,
//! an invalid one is dropped). Span names and attributes follow the
//! OpenTelemetry messaging conventions: `publish` (a relay batch, with
//! `messaging.batch.message_count`), `publish TOPIC` (one per event, child
//! of the row's context), `receive` (a consumed batch) and `process SOURCE`
//! (one handler run, child of the message's context).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::error::{Error, Result};

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The two W3C trace-context headers.
pub const TRACEPARENT: &str = "traceparent";
/// See [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// Whether spans are made and exported (an exporter is installed).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The installed OTLP exporter. [`shutdown`](Self::shutdown) sends what is
/// buffered; call it before the process exits.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    endpoint: String,
    /// The last export failed: the endpoint is down.
    down: Arc<AtomicBool>,
}

impl Telemetry {
    /// Installs an OTLP/HTTP span exporter when an endpoint is configured:
    /// `endpoint` (a collector's base URL, e.g. `http://127.0.0.1:4318`, to
    /// which `/v1/traces` is added), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// (used as is), else `OTEL_EXPORTER_OTLP_ENDPOINT` (base URL). `None`
    /// when none is set, or `OTEL_SDK_DISABLED=true`, or
    /// `OTEL_TRACES_EXPORTER=none`. The standard variables apply:
    /// `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL` (`http/protobuf`, the default,
    /// or `http/json`), `_HEADERS`, `_TIMEOUT`, `_COMPRESSION`,
    /// `OTEL_SERVICE_NAME` (default `omnibox`), `OTEL_RESOURCE_ATTRIBUTES`,
    /// `OTEL_TRACES_SAMPLER[_ARG]`.
    pub fn install(endpoint: Option<&str>) -> Result<Option<Telemetry>> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return Ok(None);
        }
        let url = match endpoint.map(str::trim).filter(|e| !e.is_empty()) {
            Some(base) => traces_url(base),
            None => match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
                Some(full) => full,
                None => match var("OTEL_EXPORTER_OTLP_ENDPOINT") {
                    Some(base) => traces_url(&base),
                    None => return Ok(None),
                },
            },
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::Config(format!(
                "OTLP endpoint {:?} is not an http:// or https:// URL (OTLP over HTTP, e.g. http://127.0.0.1:4318)",
                crate::redact::url(&url)
            )));
        }
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("http/protobuf") => Protocol::HttpBinary,
            Some("http/json") => Protocol::HttpJson,
            Some("grpc") => {
                return Err(Error::Config(
                    "OTLP over gRPC is not supported: use http/protobuf (the collector's port 4318)"
                        .into(),
                ));
            }
            Some(other) => {
                return Err(Error::Config(format!(
                    "unknown OTLP protocol {other:?}: use http/protobuf or http/json"
                )));
            }
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url.clone())
            .with_protocol(protocol)
            .build()
            .map_err(|e| {
                Error::Config(format!(
                    "cannot set up the OTLP exporter: {}",
                    crate::redact::text(&e.to_string())
                ))
            })?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if var("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("omnibox");
        }
        let down = Arc::new(AtomicBool::new(false));
        let exporter = QuietExporter {
            inner: exporter,
            down: down.clone(),
            endpoint: crate::redact::url(&url),
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("omnibox");
        if TRACER.set(tracer).is_err() {
            return Err(Error::Config(
                "OpenTelemetry is installed already in this process".into(),
            ));
        }
        Ok(Some(Telemetry {
            provider,
            endpoint: url,
            down,
        }))
    }

    /// Where spans go (credentials masked).
    pub fn endpoint(&self) -> String {
        crate::redact::url(&self.endpoint)
    }

    /// Sends the spans still buffered (waiting at most `timeout`) and stops
    /// the exporter.
    /// An endpoint known to be down (the last export failed) gets a short
    /// last try, so the exit does not wait for it.
    pub fn shutdown(self, timeout: Duration) {
        let timeout = if self.down.load(Ordering::SeqCst) {
            timeout.min(Duration::from_millis(200))
        } else {
            timeout
        };
        if let Err(e) = self.provider.shutdown_with_timeout(timeout)
            && !self.down.load(Ordering::SeqCst)
        {
            tracing::warn!(error = %e, "could not send every span to the OTLP endpoint");
        }
    }
}

/// The OTLP exporter, with its failures told once per outage (and once when
/// it answers again) instead of the SDK's lines for every batch, and the
/// outage known to [`Telemetry::shutdown`].
#[derive(Debug)]
struct QuietExporter<E> {
    inner: E,
    down: Arc<AtomicBool>,
    endpoint: String,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for QuietExporter<E>
{
    /// Exports the batch through the inner exporter and always answers `Ok`: a failure
    /// marks the endpoint down and is logged once per outage, so the SDK does not log it
    /// again for every batch.
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        match self.inner.export(batch).await {
            Ok(()) => {
                if self.down.swap(false, Ordering::SeqCst) {
                    tracing::warn!(endpoint = %self.endpoint, "the OTLP endpoint answers again; spans are exported");
                }
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        error = %crate::redact::text(&e.to_string()),
                        spans,
                        "cannot export spans to the OTLP endpoint; dropping them until it answers (told once per outage)"
                    );
                }
            }
        }
        // Told here: the SDK would log the failure again for every batch.
        Ok(())
    }

    /// Shuts the inner exporter down, waiting at most `timeout`.
    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    /// Flushes the inner exporter.
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    /// Gives the resource (service name and attributes) to the inner exporter.
    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The collector's traces endpoint: `base` with `/v1/traces` added unless
/// it ends with it already.
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Read-only view of a header map for the propagator's extraction.
struct Read<'a>(&'a BTreeMap<String, String>);

impl Extractor for Read<'_> {
    /// The header's value, looked up by its exact (case-sensitive) name.
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Every header name, in sorted order.
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writable view of a header map for the propagator's injection.
struct Write<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Write<'_> {
    /// Inserts the header, replacing any value it had.
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// The remote context in `headers` (`traceparent`, `tracestate`); an empty
/// context when there is none or it is not a valid W3C trace context.
pub fn extract(headers: Option<&BTreeMap<String, String>>) -> Context {
    match headers {
        Some(h) if h.get(TRACEPARENT).is_some_and(|t| valid_traceparent(t)) => {
            TraceContextPropagator::new().extract(&Read(h))
        }
        _ => Context::new(),
    }
}

/// The W3C rule for `traceparent`, checked before the propagator parses
/// it (which is lenient about lengths): `VERSION-TRACEID-PARENTID-FLAGS` in
/// lowercase hex, 2-32-16-2 digits, version not `ff`, ids not all zero; a
/// later version may append `-...` fields.
fn valid_traceparent(value: &str) -> bool {
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut parts = value.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let rest_ok = if version == "00" {
        parts.next().is_none()
    } else {
        true
    };
    hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && rest_ok
}

/// Writes `cx`'s span context into `headers` as `traceparent` and
/// `tracestate`; without a valid one, removes both.
pub fn inject(cx: &Context, headers: &mut BTreeMap<String, String>) {
    headers.remove(TRACEPARENT);
    headers.remove(TRACESTATE);
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut Write(headers));
        if headers.get(TRACESTATE).is_some_and(|s| s.is_empty()) {
            headers.remove(TRACESTATE);
        }
    }
}

/// The trace context to hand to an external handler of an event with
/// `headers`: the current span's (the handler span) when spans are made,
/// else the event's own, validated. Keys are `traceparent` / `tracestate`.
pub fn outgoing(headers: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    let current = Context::current();
    let mut out = BTreeMap::new();
    if current.span().span_context().is_valid() {
        inject(&current, &mut out);
    } else {
        inject(&extract(headers), &mut out);
    }
    out
}

/// Starts a span named `name` under `parent` (nothing when spans are not
/// made: the parent comes back). End it with [`end`].
pub fn start(name: String, kind: SpanKind, parent: &Context, attributes: Vec<KeyValue>) -> Context {
    match TRACER.get() {
        Some(tracer) => {
            let span = tracer
                .span_builder(name)
                .with_kind(kind)
                .with_attributes(attributes)
                .start_with_context(tracer, parent);
            parent.with_span(span)
        }
        None => parent.clone(),
    }
}

/// Ends the span of `cx` (made by [`start`]), as an error when `error` is set.
pub fn end(cx: &Context, error: Option<&str>) {
    if !enabled() {
        return;
    }
    let span = cx.span();
    if let Some(e) = error {
        span.set_status(Status::error(e.to_string()));
    } else {
        span.set_status(Status::Ok);
    }
    span.end();
}

/// The `messaging.system` of a source or sink, from its description
/// (`kafka://...` is `kafka`; a file, stdin or stdout is `omnibox.file`).
pub fn system_of(description: &str) -> &'static str {
    if description.starts_with("kafka://") {
        "kafka"
    } else if description == "null" {
        "omnibox.null"
    } else {
        "omnibox.file"
    }
}

/// Attribute helper.
pub fn attr(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn valid_context_passes_through_and_invalid_is_dropped() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let h = headers(&[(TRACEPARENT, tp), (TRACESTATE, "vendor=x")]);
        let out = outgoing(Some(&h));
        assert_eq!(out[TRACEPARENT], tp);
        assert_eq!(out[TRACESTATE], "vendor=x");
        for bad in [
            "",
            "00-abc-def-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            let out = outgoing(Some(&headers(&[(TRACEPARENT, bad)])));
            assert!(out.is_empty(), "{bad:?} was passed on: {out:?}");
        }
        assert!(outgoing(None).is_empty());
        let plain = headers(&[(TRACEPARENT, tp)]);
        let out = outgoing(Some(&plain));
        assert_eq!(out.len(), 1, "no empty tracestate: {out:?}");
        // A later version's extra fields are allowed.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        assert!(valid_traceparent(later));
    }

    #[test]
    fn random_headers_never_panic() {
        let mut rng = fastrand::Rng::with_seed(
            std::env::var("OMNIBOX_FUZZ_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(11),
        );
        let alphabet: Vec<char> = "0123456789abcdefABCDEF-=,; \t\0\u{e9}x".chars().collect();
        let cases: usize = std::env::var("OMNIBOX_FUZZ_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5000);
        for _ in 0..cases {
            let len = rng.usize(0..80);
            let mut s: String = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            if rng.bool() {
                // Near-valid: a valid context with one character changed.
                let mut v: Vec<char> = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                    .chars()
                    .collect();
                let i = rng.usize(..v.len());
                v[i] = alphabet[rng.usize(..alphabet.len())];
                s = v.into_iter().collect();
            }
            let state: String = (0..rng.usize(0..40))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let out = outgoing(Some(&headers(&[(TRACEPARENT, &s), (TRACESTATE, &state)])));
            if let Some(tp) = out.get(TRACEPARENT) {
                // Unchanged but for the version (00 is written) and the
                // flags (only the sampled bit is kept).
                assert_eq!(tp[3..53], s[3..53], "only a valid context is handed on");
                assert!(valid_traceparent(&s), "{s:?}");
                assert_eq!(tp.len(), 55, "{s:?} -> {tp:?}");
                assert!(tp.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
            }
        }
    }

    #[test]
    fn endpoints() {
        for given in ["http://c:4318", "http://c:4318/", "http://c:4318/v1/traces"] {
            assert_eq!(traces_url(given), "http://c:4318/v1/traces", "{given}");
        }
        assert_eq!(system_of("kafka://b:9092"), "kafka");
        assert_eq!(system_of("file:x.jsonl"), "omnibox.file");
    }
}
