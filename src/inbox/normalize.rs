//! From a broker message to an inbox event (docs/design.md, "The inbox"): message id, event
//! type, source, the envelope unwrapped, metadata from headers first and the
//! envelope second. A message that cannot be parsed becomes a *poison* row:
//! stored as `failed`, with the raw bytes base64-encoded, never dropped.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::domain::DomainService;
use crate::model::{EventStatus, Headers, InboxEvent, NewInboxEvent, limits, time, validate};

/// A message as a source delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct RawMessage {
    /// Topic (for a file source: the line's `topic`).
    pub topic: String,
    /// Partition (0 for a file).
    pub partition: i32,
    /// Offset (for a file: the line number).
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The value.
    pub payload: Option<Vec<u8>>,
}

impl RawMessage {
    /// `topic:partition:offset`, the message id of last resort.
    pub fn coordinates(&self) -> String {
        format!("{}:{}:{}", self.topic, self.partition, self.offset)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }
}

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
pub fn normalize(domain: &DomainService, raw: &RawMessage, consumer_group: &str) -> Normalized {
    let message_id = raw
        .header("message_id")
        .or_else(|| raw.header("event_id"))
        .map(|m| m.chars().take(limits::MESSAGE_ID_MAX_LENGTH).collect())
        .unwrap_or_else(|| raw.coordinates());
    let source = raw
        .header("source")
        .or_else(|| raw.header("source_service"))
        .unwrap_or_else(|| raw.topic.clone());
    match parse(domain, raw, &message_id, &source, consumer_group) {
        Ok(e) => Normalized::Event(Box::new(e)),
        Err(why) => Normalized::Poison(Box::new(poison(
            domain,
            raw,
            &message_id,
            &source,
            consumer_group,
            &why,
        ))),
    }
}

fn parse(
    domain: &DomainService,
    raw: &RawMessage,
    message_id: &str,
    source: &str,
    consumer_group: &str,
) -> std::result::Result<InboxEvent, String> {
    let bytes = raw.payload.as_deref().ok_or("the message has no value")?;
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the value is not JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err(format!(
            "the value is {}, not a JSON object",
            validate::json_kind(&value)
        ));
    };
    let (payload, envelope) = unwrap(object);
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
    new.trace_id = pick("trace_id");
    new.correlation_id = pick("correlation_id");
    new.causation_id = pick("causation_id");
    domain
        .create_inbox_event(new)
        .map_err(|e| format!("the message breaks a rule: {e}"))
}

/// An envelope is an object with a `payload` object and an `event_type` or
/// `schema_version` beside it; its payload is the event's payload.
fn unwrap(object: Map<String, Value>) -> (Map<String, Value>, Option<Map<String, Value>>) {
    let is_envelope = matches!(object.get("payload"), Some(Value::Object(_)))
        && (object.contains_key("event_type") || object.contains_key("schema_version"));
    if !is_envelope {
        return (object, None);
    }
    let mut envelope = object;
    let Some(Value::Object(payload)) = envelope.remove("payload") else {
        unreachable!("checked above")
    };
    (payload, Some(envelope))
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

fn poison(
    domain: &DomainService,
    raw: &RawMessage,
    message_id: &str,
    source: &str,
    consumer_group: &str,
    why: &str,
) -> InboxEvent {
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(raw.payload.as_deref().unwrap_or_default());
    let payload = json!({
        "raw_base64": b64,
        "topic": raw.topic,
        "partition": raw.partition,
        "offset": raw.offset,
    });
    let clip = |s: &str, n: usize| {
        s.chars()
            .filter(|c| !c.is_control())
            .take(n)
            .collect::<String>()
    };
    let mut new = NewInboxEvent::new(
        clip(message_id, limits::MESSAGE_ID_MAX_LENGTH),
        consumer_group,
        clip(source, limits::SOURCE_MAX_LENGTH),
        "omnibox.poison",
        payload,
    );
    new.headers = usable_headers(raw, domain);
    let mut event = match domain.create_inbox_event(new.clone()) {
        Ok(e) => e,
        Err(_) => {
            // Even the raw bytes break a rule (over the payload limit once
            // encoded): keep the coordinates, drop the bytes.
            new.payload = json!({"raw_base64": null, "raw_bytes": raw.payload.as_ref().map_or(0, Vec::len),
                                 "topic": raw.topic, "partition": raw.partition, "offset": raw.offset});
            new.headers = None;
            domain
                .create_inbox_event(new)
                .expect("a minimal poison row is valid")
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

/// Parses a line of the file sink's format (`{"topic", "key", "headers",
/// "value"}`) into a raw message; a line that is not in that format becomes a
/// message whose value is the line itself (so it is stored as poison).
pub fn from_json_line(line: &str, number: i64, default_topic: &str) -> RawMessage {
    let parsed: Option<Map<String, Value>> = serde_json::from_str(line).ok();
    let wrapped = parsed
        .as_ref()
        .filter(|m| m.contains_key("value") && m.contains_key("topic"));
    match wrapped {
        Some(m) => RawMessage {
            topic: m
                .get("topic")
                .and_then(Value::as_str)
                .unwrap_or(default_topic)
                .to_string(),
            partition: 0,
            offset: number,
            key: m
                .get("key")
                .and_then(Value::as_str)
                .map(|k| k.as_bytes().to_vec()),
            headers: m
                .get("headers")
                .and_then(Value::as_object)
                .map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.as_bytes().to_vec())))
                        .collect()
                })
                .unwrap_or_default(),
            payload: m
                .get("value")
                .map(|v| serde_json::to_vec(v).expect("a JSON value serialises")),
        },
        None => RawMessage {
            topic: default_topic.to_string(),
            partition: 0,
            offset: number,
            key: None,
            headers: Vec::new(),
            payload: Some(line.as_bytes().to_vec()),
        },
    }
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
        }
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
            let b64 = e.payload()["raw_base64"].as_str().unwrap();
            assert_eq!(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
                value.as_bytes()
            );
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
}
