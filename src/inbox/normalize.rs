//! From a broker message to an inbox event (docs/design.md, "The inbox"): message id, event
//! type, source, the envelope unwrapped, metadata from headers first and the
//! envelope second. A message that cannot be parsed becomes a *poison* row:
//! stored as `failed`, with the raw bytes base64-encoded, never dropped.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::domain::DomainService;

pub use super::lines::{from_json_bytes, from_json_line};
pub use super::message::{RawMessage, Truncated, sha256_hex};
use crate::model::{EventStatus, Headers, InboxEvent, NewInboxEvent, limits, time, validate};

/// What a message becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Normalized {
    /// A valid inbox event.
    Event(Box<InboxEvent>),
    /// A message that cannot be parsed: a `failed` row carrying the raw bytes.
    Poison(Box<InboxEvent>),
}

impl Normalized {
    /// The event, valid or poison.
    pub fn event(&self) -> &InboxEvent {
        match self {
            Normalized::Event(e) | Normalized::Poison(e) => e,
        }
    }

    /// True for a poison message.
    pub fn is_poison(&self) -> bool {
        matches!(self, Normalized::Poison(_))
    }
}

/// Normalises one message for `consumer_group`.
///
/// The message id is the `message_id` header (else `event_id`) exactly as
/// sent; a message without one is identified by its position for Kafka
/// (`topic:partition:offset`) and by its content for files and stdin
/// ([`RawMessage::content_id`]). An id header that breaks the id's rules
/// (not UTF-8, empty, padded, control characters, over 255 characters) is
/// never altered: the message is poison, with the reason, under its content
/// id. `consumer_group` must be valid ([`validate::consumer_group`]); the
/// consumer checks it before it starts.
pub fn normalize(domain: &DomainService, raw: &RawMessage, consumer_group: &str) -> Normalized {
    let header = raw
        .header_bytes("message_id")
        .map(|b| ("message_id", b))
        .or_else(|| raw.header_bytes("event_id").map(|b| ("event_id", b)));
    let id: std::result::Result<String, String> = match header {
        None => Ok(raw.fallback_id()),
        Some((name, bytes)) => match std::str::from_utf8(bytes) {
            Err(_) => Err(format!("its {name} header is not UTF-8")),
            Ok(id) => validate::exact(name, id, limits::MESSAGE_ID_MAX_LENGTH)
                .map(|()| id.to_string())
                .map_err(|e| format!("its {name} header cannot be an id: {e}")),
        },
    };
    let source = raw.source();
    let outcome = match id {
        Ok(id) => parse(domain, raw, &id, &source, consumer_group).map_err(|why| (why, id)),
        Err(why) => Err((why, raw.content_id())),
    };
    match outcome {
        Ok(e) => Normalized::Event(Box::new(e)),
        Err((why, id)) => Normalized::Poison(Box::new(poison(
            domain,
            raw,
            &id,
            &source,
            consumer_group,
            &why,
        ))),
    }
}

/// Turns a broker message into an inbox event (the reference's
/// `EnvelopeParser`). [`DefaultEnvelopeParser`] applies the rules of this
/// module; a service with its own message format implements this and hands
/// it to [`InboxConsumer::with_parser`](super::InboxConsumer::with_parser).
/// A message that cannot be an event must still come back, as
/// [`Normalized::poison`] (stored `failed` with its bytes, never dropped).
pub trait EnvelopeParser: Send + Sync + 'static {
    /// The event of `raw` for `consumer_group`, created through `domain`
    /// (its limits and default `max_attempts`).
    fn parse(&self, domain: &DomainService, raw: &RawMessage, consumer_group: &str) -> Normalized;
}

/// The default rule: [`normalize`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultEnvelopeParser;

impl EnvelopeParser for DefaultEnvelopeParser {
    fn parse(&self, domain: &DomainService, raw: &RawMessage, consumer_group: &str) -> Normalized {
        normalize(domain, raw, consumer_group)
    }
}

impl Normalized {
    /// A poison row for `raw` that a parser could not read, with `why`: its
    /// message id is the content id (`sha256:...`; a Kafka message keeps
    /// `topic:partition:offset`), its source the `source` header or the
    /// topic, its bytes kept as [`normalize`] keeps them.
    pub fn poison(
        domain: &DomainService,
        raw: &RawMessage,
        consumer_group: &str,
        why: &str,
    ) -> Self {
        let source = raw.source();
        Normalized::Poison(Box::new(poison(
            domain,
            raw,
            &raw.fallback_id(),
            &source,
            consumer_group,
            why,
        )))
    }
}

/// The inbox event of a well-formed message, or why it is poison.
fn parse(
    domain: &DomainService,
    raw: &RawMessage,
    message_id: &str,
    source: &str,
    consumer_group: &str,
) -> std::result::Result<InboxEvent, String> {
    if let Some(why) = &raw.defect {
        return Err(why.clone());
    }
    if let Some(cut) = &raw.cut {
        return Err(format!(
            "the line is {} bytes, longer than a line may be ({} bytes), so it was not parsed",
            cut.len, cut.limit
        ));
    }
    let bytes = raw.payload.as_deref().ok_or("the message has no value")?;
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the value is not JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err(format!(
            "the value is {}, not a JSON object",
            validate::json_kind(&value)
        ));
    };
    let (payload, envelope) = unwrap(object)?;
    let from_envelope = |name: &str| {
        envelope
            .as_ref()
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let pick = |name: &str| raw.header(name).or_else(|| from_envelope(name));
    let event_type = pick("event_type").unwrap_or_else(|| raw.topic.clone());
    let mut new = NewInboxEvent::new(
        message_id,
        consumer_group,
        source,
        event_type,
        Value::Object(payload),
    );
    new.headers = usable_headers(raw, domain);
    new.schema_version = pick("schema_version");
    // Without a trace_id of its own, the W3C trace context's trace id.
    new.trace_id = pick("trace_id").or_else(|| {
        use opentelemetry::trace::TraceContextExt;
        let cx = crate::telemetry::extract(new.headers.as_ref());
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.trace_id().to_string())
    });
    new.correlation_id = pick("correlation_id");
    new.causation_id = pick("causation_id");
    domain
        .create_inbox_event(new)
        .map_err(|e| format!("the message breaks a rule: {e}"))
}

/// A value's payload, and its envelope when it had one.
type Unwrapped = (Map<String, Value>, Option<Map<String, Value>>);

/// An envelope is an object with a `payload` and an `event_type` or
/// `schema_version` beside it; its payload is the event's payload. Such an
/// object whose `payload` is not an object, and an object carrying both
/// `event_type` and `schema_version` (as every omnibox envelope does) but
/// no `payload`, is an envelope that lost its payload: poison, not taken as
/// a bare payload. Any other object is a bare payload (a foreign message).
fn unwrap(object: Map<String, Value>) -> std::result::Result<Unwrapped, String> {
    let has_type = object.contains_key("event_type");
    let has_version = object.contains_key("schema_version");
    match object.get("payload") {
        Some(Value::Object(_)) if has_type || has_version => {}
        Some(other) if has_type || has_version => {
            return Err(format!(
                "the envelope's payload is {}, not a JSON object",
                validate::json_kind(other)
            ));
        }
        None if has_type && has_version => {
            return Err(
                "it has an envelope's event_type and schema_version but no payload".to_string(),
            );
        }
        _ => return Ok((object, None)),
    }
    let mut envelope = object;
    match envelope.remove("payload") {
        Some(Value::Object(payload)) => Ok((payload, Some(envelope))),
        // Not reached (checked above); kept whole if it were.
        other => {
            if let Some(v) = other {
                envelope.insert("payload".into(), v);
            }
            Ok((envelope, None))
        }
    }
}

/// Headers that fit the inbox's rules (valid UTF-8, lengths, no control
/// characters, no case-insensitive duplicates); the others are left out.
fn usable_headers(raw: &RawMessage, domain: &DomainService) -> Option<Headers> {
    let limits = domain.limits();
    let mut out: Headers = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for (k, v) in &raw.headers {
        let Ok(v) = std::str::from_utf8(v) else {
            continue;
        };
        let ok = !k.is_empty()
            && k.chars().count() <= limits.header_key_max_length
            && !v.is_empty()
            && v.chars().count() <= limits.header_value_max_length
            && !k.chars().chain(v.chars()).any(char::is_control);
        if ok && out.len() < limits.headers_max_count && seen.insert(k.to_lowercase()) {
            out.insert(k.clone(), v.to_string());
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The `failed` inbox row kept for a message that cannot be parsed: its
/// raw bytes (base64 where they are not text), key and headers, and `why`.
fn poison(
    domain: &DomainService,
    raw: &RawMessage,
    message_id: &str,
    source: &str,
    consumer_group: &str,
    why: &str,
) -> InboxEvent {
    let bytes = raw.payload.as_deref().unwrap_or_default();
    let (len, sha256) = match &raw.cut {
        Some(cut) => (cut.len, cut.sha256.clone()),
        None => (bytes.len() as u64, sha256_hex(bytes)),
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // A NUL cannot be stored in a JSON text column: such a topic is kept
    // exactly in `topic_base64` beside a readable form.
    let topic = raw.topic.replace('\0', "\u{FFFD}");
    let mut payload = json!({
        "raw_bytes": len,
        "raw_sha256": sha256,
        "topic": topic,
        "partition": raw.partition,
        "offset": raw.offset,
    });
    if topic != raw.topic {
        payload["topic_base64"] = json!(b64(raw.topic.as_bytes()));
    }
    if let Some(origin) = &raw.origin {
        payload["origin"] = json!(origin.replace('\0', "\u{FFFD}"));
    }
    // The key and every header as received, so the message can be rebuilt
    // from the row (or its dead letter): text where it is text a JSON
    // column can hold, base64 otherwise.
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .filter(|t| !t.contains('\0'))
            .map(str::to_string)
    };
    if let Some(key) = &raw.key {
        match text(key) {
            Some(t) => payload["key"] = json!(t),
            None => payload["key_base64"] = json!(b64(key)),
        }
    }
    if !raw.headers.is_empty() {
        let headers: Vec<Value> = raw
            .headers
            .iter()
            .map(|(k, v)| {
                let mut h = Map::new();
                match text(k.as_bytes()) {
                    Some(t) => h.insert("name".into(), json!(t)),
                    None => h.insert("name_base64".into(), json!(b64(k.as_bytes()))),
                };
                match text(v) {
                    Some(t) => h.insert("value".into(), json!(t)),
                    None => h.insert("value_base64".into(), json!(b64(v))),
                };
                Value::Object(h)
            })
            .collect();
        payload["headers"] = Value::Array(headers);
    }
    let clip = |s: &str, n: usize| {
        s.chars()
            .filter(|c| !c.is_control())
            .take(n)
            .collect::<String>()
    };
    // The source is only a label: a blank or unusable one falls back to the
    // topic, then to "unknown", so the poison row itself is always valid.
    let source = [source, raw.topic.as_str()]
        .into_iter()
        .map(|s| clip(s, limits::SOURCE_MAX_LENGTH).trim().to_string())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    let mut new = NewInboxEvent::new(
        message_id,
        consumer_group,
        source,
        "omnibox.poison",
        json!({}),
    );
    new.headers = usable_headers(raw, domain);
    // The exact bytes when the row can hold them; else as long a start as
    // it can (`raw_prefix_base64`), with the whole length and digest.
    let limit = domain.limits().payload_max_bytes;
    let with = |key: &str, b: &[u8]| {
        let mut p = payload.clone();
        p[key] = json!(b64(b));
        p
    };
    let prefix_len = (limit / 4 * 3).saturating_sub(4096).min(bytes.len());
    let mut candidates = Vec::new();
    if raw.cut.is_none() {
        candidates.push(with("raw_base64", bytes));
    }
    candidates.push(with("raw_prefix_base64", &bytes[..prefix_len]));
    candidates.push(payload.clone());
    // Headers beyond what a row holds: the position, length and digest.
    let mut bare = payload.clone();
    if let Some(p) = bare.as_object_mut() {
        p.remove("headers");
        p.remove("key");
        p.remove("key_base64");
    }
    candidates.push(bare);
    let mut event = None;
    for (n, p) in candidates.into_iter().enumerate() {
        new.payload = p;
        if n > 0 {
            new.headers = None;
        }
        if let Ok(e) = domain.create_inbox_event(new.clone()) {
            event = Some(e);
            break;
        }
    }
    // Cannot be None for a valid consumer group (a precondition of
    // `normalize`, checked by the consumer before it starts): the last
    // candidate has a checked header id or a 71-character hash, a
    // non-blank clipped source, a fixed type and a small payload.
    let mut event = event.expect("a minimal poison row is valid");
    event.status = EventStatus::Failed;
    event.attempts_made = event.max_attempts;
    event.last_error = Some(
        validate::truncate_error(
            &format!("cannot parse message {}: {why}", raw.coordinates()),
            limits::LAST_ERROR_MAX_LENGTH,
            limits::DEFAULT_TRUNCATION_SUFFIX,
        )
        .expect("a non-empty message"),
    );
    event.updated_at = time::now();
    event
}

/// Normalises a batch.
pub fn normalize_all(
    domain: &DomainService,
    raws: &[RawMessage],
    consumer_group: &str,
) -> Vec<Normalized> {
    raws.iter()
        .map(|r| normalize(domain, r, consumer_group))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(headers: &[(&str, &str)], value: &str) -> RawMessage {
        RawMessage {
            topic: "orders".into(),
            partition: 2,
            offset: 41,
            key: Some(b"k".to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            payload: Some(value.as_bytes().to_vec()),
            position_is_identity: true,
            cut: None,
            origin: None,
            defect: None,
        }
    }

    /// The raw bytes a poison row keeps (`raw_base64`).
    fn raw_of(e: &InboxEvent) -> Vec<u8> {
        let b64 = e.payload()["raw_base64"].as_str().unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    }

    fn event(n: Normalized) -> InboxEvent {
        match n {
            Normalized::Event(e) => *e,
            Normalized::Poison(e) => panic!("poison: {:?}", e.last_error()),
        }
    }

    #[test]
    fn ids_types_and_sources_follow_the_precedence() {
        let d = DomainService::default();
        let e = event(normalize(
            &d,
            &raw(&[("message_id", "m-1"), ("event_id", "e-1")], r#"{"a":1}"#),
            "g",
        ));
        assert_eq!(e.message_id(), "m-1");
        let e = event(normalize(
            &d,
            &raw(&[("event_id", "e-1")], r#"{"a":1}"#),
            "g",
        ));
        assert_eq!(e.message_id(), "e-1");
        let e = event(normalize(&d, &raw(&[], r#"{"a":1}"#), "g"));
        assert_eq!(e.message_id(), "orders:2:41");
        assert_eq!(
            e.event_type(),
            "orders",
            "event type falls back to the topic"
        );
        assert_eq!(e.source(), "orders", "source falls back to the topic");
        assert_eq!(e.consumer_group(), "g");
        let e = event(normalize(
            &d,
            &raw(&[("source_service", "billing")], r#"{"a":1}"#),
            "g",
        ));
        assert_eq!(e.source(), "billing");
        let e = event(normalize(
            &d,
            &raw(
                &[("source", "shop"), ("source_service", "billing")],
                r#"{"a":1}"#,
            ),
            "g",
        ));
        assert_eq!(e.source(), "shop");
    }

    #[test]
    fn envelopes_are_unwrapped_with_headers_first() {
        let d = DomainService::default();
        let value = r#"{"schema_version":"2.0.0","event_type":"order.created","aggregate_type":"order","aggregate_id":"x",
            "payload":{"total":5},"timestamp":"2026-01-01T00:00:00Z","trace_id":"env-trace","correlation_id":"env-corr"}"#;
        let e = event(normalize(
            &d,
            &raw(&[("trace_id", "hdr-trace"), ("event_id", "id-1")], value),
            "g",
        ));
        assert_eq!(e.payload(), json!({"total": 5}).as_object().unwrap());
        assert_eq!(e.event_type(), "order.created");
        assert_eq!(e.schema_version(), Some("2.0.0"));
        assert_eq!(e.trace_id(), Some("hdr-trace"), "headers win");
        assert_eq!(
            e.correlation_id(),
            Some("env-corr"),
            "the envelope fills in"
        );
        assert_eq!(e.header("trace_id"), Some("hdr-trace"));
        let e = event(normalize(
            &d,
            &raw(&[("event_type", "hdr.type")], value),
            "g",
        ));
        assert_eq!(e.event_type(), "hdr.type");
        // A plain object with a payload field but no envelope keys is the payload itself.
        let e = event(normalize(
            &d,
            &raw(&[], r#"{"payload":{"x":1},"other":2}"#),
            "g",
        ));
        assert_eq!(e.payload().len(), 2);
    }

    #[test]
    fn unparseable_messages_become_failed_rows_with_the_raw_bytes() {
        let d = DomainService::default();
        for (value, why) in [
            ("not json", "not JSON"),
            ("[1,2]", "not a JSON object"),
            ("{}", "breaks a rule"),
        ] {
            let n = normalize(&d, &raw(&[("event_id", "p-1")], value), "g");
            assert!(n.is_poison(), "{value}");
            let e = n.event();
            assert_eq!(e.status(), EventStatus::Failed);
            assert_eq!(e.attempts_made(), e.max_attempts());
            assert_eq!(e.message_id(), "p-1");
            assert!(
                e.last_error().unwrap().contains(why),
                "{:?}",
                e.last_error()
            );
            assert_eq!(raw_of(e), value.as_bytes());
            e.validate_invariants().unwrap();
        }
        let mut r = raw(&[], "x");
        r.payload = None;
        assert!(normalize(&d, &r, "g").is_poison());
    }

    #[test]
    fn bad_headers_are_left_out() {
        let d = DomainService::default();
        let long = "v".repeat(600);
        let e = event(normalize(
            &d,
            &raw(
                &[("ok", "1"), ("long", &long), ("OK", "dup"), ("ctl", "a\nb")],
                r#"{"a":1}"#,
            ),
            "g",
        ));
        let h = e.headers().unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h["ok"], "1");
    }

    #[test]
    fn file_lines_round_trip_the_sink_format() {
        let line = r#"{"topic":"orders","key":"k1","headers":{"event_id":"e-9","event_type":"t"},"value":{"event_type":"t","schema_version":"1.0.0","payload":{"n":1}}}"#;
        let r = from_json_line(line, 7, "file");
        assert_eq!(
            (r.topic.as_str(), r.offset, r.key.as_deref()),
            ("orders", 7, Some(&b"k1"[..]))
        );
        let e = event(normalize(&DomainService::default(), &r, "g"));
        assert_eq!(e.message_id(), "e-9");
        assert_eq!(e.payload()["n"], 1);
        let r = from_json_line("garbage", 3, "file");
        assert_eq!(r.topic, "file");
        assert!(normalize(&DomainService::default(), &r, "g").is_poison());
    }

    /// An envelope that lost its payload is poison with the reason, not a
    /// bare payload whose metadata becomes the payload (and whose type
    /// comes from the topic); an object with only one envelope field and
    /// no payload is a bare payload (the documented rule).
    #[test]
    fn an_envelope_without_its_payload_is_poison() {
        let d = DomainService::default();
        for (value, why) in [
            (
                r#"{"schema_version":"1.0.0","event_type":"order.created","aggregate_id":"a-1"}"#,
                "event_type and schema_version but no payload",
            ),
            (
                r#"{"event_type":"order.created","payload":[1,2]}"#,
                "the envelope's payload is an array, not a JSON object",
            ),
            (
                r#"{"schema_version":"1.0.0","payload":null}"#,
                "the envelope's payload is null",
            ),
        ] {
            let e = poison_row(normalize(&d, &raw(&[("event_id", "x")], value), "g"));
            assert!(
                e.last_error().unwrap().contains(why),
                "{value}: {:?}",
                e.last_error()
            );
        }
        let e = event(normalize(
            &d,
            &raw(&[], r#"{"event_type":"signup","user":"u-1"}"#),
            "g",
        ));
        assert_eq!(e.payload()["user"], "u-1");
        assert_eq!(
            e.event_type(),
            "orders",
            "the topic: no header says otherwise"
        );
    }

    /// A line in the sink's format without a topic is still that format
    /// (its event_id header is the id); one whose key or headers are not
    /// strings, or that has no value, is poison with the reason; a line
    /// with other keys is a foreign message whose value is the line.
    #[test]
    fn sink_lines_are_read_or_refused_never_misread() {
        let d = DomainService::default();
        let r = from_json_line(
            r#"{"key":"k1","headers":{"event_id":"e-7"},"value":{"n":1}}"#,
            4,
            "file",
        );
        assert_eq!(
            (r.topic.as_str(), r.key.as_deref()),
            ("file", Some(&b"k1"[..]))
        );
        let e = event(normalize(&d, &r, "g"));
        assert_eq!(e.message_id(), "e-7");
        assert_eq!(e.payload(), json!({"n": 1}).as_object().unwrap());
        for (line, why) in [
            (
                r#"{"topic":"t","headers":{"event_id":5},"value":{"n":1}}"#,
                r#"the line's header "event_id" is a number, not a string"#,
            ),
            (
                r#"{"topic":"t","key":7,"value":{"n":1}}"#,
                "the line's key is a number, not a string",
            ),
            (
                r#"{"topic":"t","headers":["a"],"value":{"n":1}}"#,
                "the line's headers are an array, not an object",
            ),
            (r#"{"topic":"t","key":"k"}"#, "without a value"),
            (r#"{"topic":9,"value":{}}"#, "the line's topic is a number"),
        ] {
            let e = poison_row(normalize(&d, &from_json_line(line, 2, "file"), "g"));
            assert!(
                e.last_error().unwrap().contains(why),
                "{line}: {:?}",
                e.last_error()
            );
            assert_eq!(raw_of(&e), line.as_bytes(), "the line is kept as read");
        }
        let r = from_json_line(r#"{"value":{"n":1},"amount":5}"#, 1, "file");
        let e = event(normalize(&d, &r, "g"));
        assert_eq!(
            e.payload()["amount"],
            5,
            "a foreign message: the line is the payload"
        );
    }

    /// A poison row keeps the message's key and every header (base64 where
    /// they are not text), so the message can be rebuilt from the row.
    #[test]
    fn poison_keeps_the_key_and_every_header() {
        let d = DomainService::default();
        let mut r = raw(&[("event_id", "p-9"), ("trace", "t-1")], "not json");
        r.key = Some(vec![0xff, 0x00, 0x01]);
        r.headers.push(("bin".into(), vec![0xc3, 0x28]));
        r.headers.push(("trace".into(), b"t-2".to_vec()));
        let e = poison_row(normalize(&d, &r, "g"));
        let p = e.payload();
        assert_eq!(p["key_base64"], "/wAB");
        assert!(p.get("key").is_none());
        assert_eq!(
            p["headers"],
            json!([
                {"name": "event_id", "value": "p-9"},
                {"name": "trace", "value": "t-1"},
                {"name": "bin", "value_base64": "wyg="},
                {"name": "trace", "value": "t-2"},
            ])
        );
        let r = raw(&[], "not json");
        let p = poison_row(normalize(&d, &r, "g")).payload().clone();
        assert_eq!(p["key"], "k");
        assert!(p.get("headers").is_none());
    }

    /// Where a file source's poison came from: `stdin line N` or
    /// `file:PATH line N`; a line over the limit says so, not "not JSON".
    #[test]
    fn file_poison_says_where_and_why() {
        let d = DomainService::default();
        let mut r = from_json_line("garbage", 3, "file");
        r.origin = Some("stdin".into());
        let e = poison_row(normalize(&d, &r, "g"));
        assert!(
            e.last_error()
                .unwrap()
                .starts_with("cannot parse message stdin line 3: "),
            "{:?}",
            e.last_error()
        );
        let mut r = from_json_line(r#"{"topic":"t","value":{"n":"#, 5, "file");
        r.origin = Some("file:in.jsonl".into());
        r.cut = Some(Truncated {
            len: 5_000_000,
            limit: 4_194_304,
            sha256: "00".into(),
        });
        let e = poison_row(normalize(&d, &r, "g"));
        assert_eq!(
            e.last_error(),
            Some(
                "cannot parse message file:in.jsonl line 5: the line is 5000000 bytes, longer than a line may be (4194304 bytes), so it was not parsed"
            )
        );
    }

    fn poison_row(n: Normalized) -> InboxEvent {
        match n {
            Normalized::Poison(e) => *e,
            Normalized::Event(e) => panic!("not poison: {}", e.message_id()),
        }
    }

    /// A file or stdin line without an id is identified by its content:
    /// line 1 of one input no longer collides with line 1 of another.
    #[test]
    fn lines_without_ids_are_identified_by_content() {
        let d = DomainService::default();
        let a = from_json_line(r#"{"topic":"t","value":{"a":1}}"#, 1, "file");
        let b = from_json_line(r#"{"topic":"t","value":{"b":2}}"#, 1, "file");
        let a_again = from_json_line(r#"{"topic":"t","value":{"a":1}}"#, 7, "file");
        let (ia, ib, ia2) = (
            event(normalize(&d, &a, "g")).message_id().to_string(),
            event(normalize(&d, &b, "g")).message_id().to_string(),
            event(normalize(&d, &a_again, "g")).message_id().to_string(),
        );
        assert!(ia.starts_with("sha256:") && ia.len() == 71, "{ia}");
        assert_ne!(ia, ib);
        assert_eq!(ia, ia2, "the same content is the same message");
        // Garbage lines too: two different poison lines are two rows.
        let g1 = poison_row(normalize(&d, &from_json_line("garbage", 1, "file"), "g"));
        let g2 = poison_row(normalize(&d, &from_json_line("rubbish", 1, "file"), "g"));
        assert_ne!(g1.message_id(), g2.message_id());
        // Kafka keeps its position as the id.
        let k = event(normalize(&d, &raw(&[], r#"{"a":1}"#), "g"));
        assert_eq!(k.message_id(), "orders:2:41");
    }

    /// Poison keeps its exact bytes when the row can hold them, else a
    /// prefix, the whole length and its SHA-256; bytes that are not UTF-8
    /// are poison, never "repaired".
    #[test]
    fn poison_keeps_its_bytes_or_their_length_and_digest() {
        use base64::Engine as _;
        let d = DomainService::default();
        let bad = b"{\"a\":\"\xff\"}".to_vec();
        let mut m = raw(&[], "");
        m.payload = Some(bad.clone());
        let p = poison_row(normalize(&d, &m, "g"));
        assert_eq!(raw_of(&p), bad);
        assert_eq!(p.payload()["raw_sha256"], json!(sha256_hex(&bad)));
        let big = vec![b'x'; 3_000_000];
        m.payload = Some(big.clone());
        let p = poison_row(normalize(&d, &m, "g"));
        assert!(p.payload().get("raw_base64").is_none());
        assert_eq!(p.payload()["raw_bytes"], json!(3_000_000));
        assert_eq!(p.payload()["raw_sha256"], json!(sha256_hex(&big)));
        let prefix = base64::engine::general_purpose::STANDARD
            .decode(p.payload()["raw_prefix_base64"].as_str().unwrap())
            .unwrap();
        assert!(prefix.len() > 500_000 && big.starts_with(&prefix));
    }

    /// Every delivery of one message has the same event id (the handler's
    /// idempotency key), a function of the consumer group and message id,
    /// not a fresh UUID per delivery.
    #[test]
    fn the_event_id_is_the_same_for_every_delivery() {
        let d = DomainService::default();
        let m = raw(&[("message_id", "m-1")], r#"{"a":1}"#);
        let first = event(normalize(&d, &m, "billing"));
        let again = event(normalize(&d, &m, "billing"));
        assert_eq!(first.id(), again.id());
        assert_eq!(first.id(), crate::domain::inbox_event_id("billing", "m-1"));
        assert_eq!(first.id().get_version_num(), 5);
        let other_group = event(normalize(&d, &m, "audit"));
        assert_ne!(first.id(), other_group.id());
        let other_id = event(normalize(
            &d,
            &raw(&[("message_id", "m-2")], r#"{"a":1}"#),
            "billing",
        ));
        assert_ne!(first.id(), other_id.id());
    }

    /// An id header is never altered: one that breaks a rule makes the
    /// message poison (with the reason) under its content id, so distinct
    /// messages never collide; a header of control characters does not
    /// panic.
    #[test]
    fn a_bad_id_header_makes_poison_and_never_collides() {
        let d = DomainService::default();
        let ok = event(normalize(
            &d,
            &raw(&[("message_id", "abcd")], r#"{"a":1}"#),
            "g",
        ));
        assert_eq!(ok.message_id(), "abcd");
        let ctl = poison_row(normalize(
            &d,
            &raw(&[("message_id", "ab\u{1}cd")], r#"{"a":1}"#),
            "g",
        ));
        assert_ne!(ctl.message_id(), "abcd");
        assert!(
            ctl.last_error().unwrap().contains("message_id"),
            "{:?}",
            ctl.last_error()
        );
        let only_ctl = poison_row(normalize(
            &d,
            &raw(&[("message_id", "\u{1}\u{2}")], r#"{"a":1}"#),
            "g",
        ));
        assert!(only_ctl.message_id().starts_with("sha256:"));
        let long_a = format!("{}a", "x".repeat(300));
        let long_b = format!("{}b", "x".repeat(300));
        let pa = poison_row(normalize(
            &d,
            &raw(&[("message_id", &long_a)], r#"{"a":1}"#),
            "g",
        ));
        let pb = poison_row(normalize(
            &d,
            &raw(&[("message_id", &long_b)], r#"{"a":1}"#),
            "g",
        ));
        assert_ne!(pa.message_id(), pb.message_id());
        let padded = poison_row(normalize(
            &d,
            &raw(&[("event_id", " id-1")], r#"{"a":1}"#),
            "g",
        ));
        assert!(padded.last_error().unwrap().contains("event_id"));
        let source = poison_row(normalize(
            &d,
            &raw(&[("source", "\u{1}")], r#"{"a":1}"#),
            "g",
        ));
        assert_eq!(source.source(), "orders");
    }

    /// Randomized: arbitrary topics, keys, headers (ids, sources, types)
    /// and values, valid or not, never panic, and every message ends as a
    /// valid row or a poison row. OMNIBOX_FUZZ_CASES (default 20,000) and
    /// OMNIBOX_FUZZ_SEED replay or extend it.
    #[test]
    fn any_message_ends_as_a_row_or_poison() {
        let cases: usize = std::env::var("OMNIBOX_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let seed: u64 = std::env::var("OMNIBOX_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("normalisation fuzz: seed {seed} (OMNIBOX_FUZZ_SEED), {cases} cases");
        let mut rng = fastrand::Rng::with_seed(seed);
        let d = DomainService::default();
        let pieces: [&[u8]; 12] = [
            b"",
            b" ",
            b"\x01",
            b"\xff\xfe",
            b"id",
            b"{",
            b"}",
            b"\"",
            b"{\"a\":1}",
            b"[1]",
            b"null",
            "\u{e9}\u{1F600}".as_bytes(),
        ];
        let bytes = |rng: &mut fastrand::Rng| -> Vec<u8> {
            let mut v = Vec::new();
            match rng.u8(0..10) {
                0 => v.extend(std::iter::repeat_n(b'x', rng.usize(200..400))),
                1 => (0..rng.usize(0..40)).for_each(|_| v.push(rng.u8(..))),
                _ => (0..rng.usize(0..6))
                    .for_each(|_| v.extend_from_slice(pieces[rng.usize(..pieces.len())])),
            }
            v
        };
        let names = [
            "message_id",
            "event_id",
            "source",
            "source_service",
            "event_type",
            "trace_id",
            "x",
        ];
        for case in 0..cases {
            let headers = (0..rng.usize(0..5))
                .map(|_| (names[rng.usize(..names.len())].to_string(), bytes(&mut rng)))
                .collect();
            let payload = match rng.u8(0..4) {
                0 => None,
                1 => Some(br#"{"order":1}"#.to_vec()),
                _ => Some(bytes(&mut rng)),
            };
            let m = RawMessage {
                topic: String::from_utf8_lossy(&bytes(&mut rng)).into_owned(),
                partition: rng.i32(..),
                offset: rng.i64(..),
                key: rng.bool().then(|| bytes(&mut rng)),
                headers,
                payload,
                position_is_identity: rng.bool(),
                cut: None,
                origin: None,
                defect: None,
            };
            let n = std::panic::catch_unwind(|| normalize(&d, &m, "g"))
                .unwrap_or_else(|_| panic!("case {case} (seed {seed}) panicked: {m:?}"));
            let row = n.event();
            assert!(
                validate::exact(
                    "message_id",
                    row.message_id(),
                    limits::MESSAGE_ID_MAX_LENGTH
                )
                .is_ok(),
                "case {case} (seed {seed}): id {:?}",
                row.message_id()
            );
            if let Some(id) = m
                .header_bytes("message_id")
                .or_else(|| m.header_bytes("event_id"))
                && !n.is_poison()
            {
                assert_eq!(
                    row.message_id().as_bytes(),
                    id,
                    "case {case} (seed {seed}): id altered"
                );
            }
            if n.is_poison() {
                assert_eq!(row.status(), EventStatus::Failed);
                assert!(row.last_error().is_some());
            }
        }
    }
}
