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
    // Parsed, a JSON value takes several times its size: a value far over
    // the payload limit (an envelope and whitespace allowed for) is refused
    // unread, whatever the broker lets through (up to 100 MB by default).
    let limit = domain.limits().payload_max_bytes;
    if bytes.len() > limit.saturating_mul(4) {
        return Err(format!(
            "the value is {} bytes, more than four times the payload limit ({limit} bytes), so it was not parsed",
            bytes.len()
        ));
    }
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
    // Whole only when it can fit (base64 is a third larger).
    if raw.cut.is_none() && bytes.len() <= limit / 4 * 3 {
        candidates.push(with("raw_base64", bytes));
    }
    candidates.push(with("raw_prefix_base64", &bytes[..prefix_len]));
    candidates.push(payload.clone());
    // Headers beyond what a row holds: the position, length and digest; a
    // topic or origin too long for a row (a file's line may name any topic)
    // as its start, length and digest.
    let mut bare = payload.clone();
    if let Some(p) = bare.as_object_mut() {
        p.remove("headers");
        p.remove("key");
        p.remove("key_base64");
        for (field, whole) in [
            ("topic", Some(raw.topic.as_str())),
            ("origin", raw.origin.as_deref()),
        ] {
            if let Some(whole) = whole.filter(|w| w.len() > 1024) {
                if field == "topic" {
                    p.remove("topic_base64");
                }
                p.insert(field.into(), json!(clip(whole, 255)));
                p.insert(format!("{field}_bytes"), json!(whole.len()));
                p.insert(
                    format!("{field}_sha256"),
                    json!(sha256_hex(whole.as_bytes())),
                );
            }
        }
    }
    candidates.push(bare.clone());
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
    // The last candidate is small (under 3 KiB) with a checked header id or
    // a 71-character hash, a non-blank clipped source and a fixed type: a
    // valid row under the default limits, which a library's own limits
    // (a payload limit of a few bytes) cannot refuse.
    let mut event = match event {
        Some(e) => e,
        None => {
            new.payload = bare;
            DomainService::default()
                .create_inbox_event(new)
                .expect("a minimal poison row is valid under the default limits")
        }
    };
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
mod tests;
