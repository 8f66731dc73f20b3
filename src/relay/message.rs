//! What goes on the broker for an outbox event (docs/design.md, "The relay"): key, headers and the
//! JSON envelope (the reference's `EnvelopeEventConverter`).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::model::{Event, OutboxEvent, Payload, Route, time};

/// Default `schema_version` of an envelope whose event has none.
pub const DEFAULT_SCHEMA_VERSION: &str = "1.0.0";

/// One broker message.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// Destination topic.
    pub topic: String,
    /// Message key (the event's partition key).
    pub key: String,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// The value: a JSON document.
    pub value: Box<RawValue>,
    /// The outbox event this message carries (not sent).
    #[serde(skip)]
    pub event_id: Uuid,
}

/// The JSON document a message's value holds (see `envelope`); the optional ids are
/// left out when unset.
#[derive(Serialize)]
struct Envelope<'a> {
    schema_version: &'a str,
    event_type: &'a str,
    aggregate_type: &'a str,
    aggregate_id: Uuid,
    payload: &'a Payload,
    timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causation_id: Option<&'a str>,
}

/// The envelope of an event: `{schema_version, event_type, aggregate_type,
/// aggregate_id, payload, timestamp, trace_id?, correlation_id?, causation_id?}`.
pub fn envelope(event: &OutboxEvent) -> Box<RawValue> {
    envelope_with(event, DEFAULT_SCHEMA_VERSION)
}

/// [`envelope`], with `default_version` for an event without a schema
/// version of its own.
pub fn envelope_with(event: &OutboxEvent, default_version: &str) -> Box<RawValue> {
    let env = Envelope {
        schema_version: event.schema_version().unwrap_or(default_version),
        event_type: event.event_type(),
        aggregate_type: event.aggregate_type(),
        aggregate_id: event.aggregate_id(),
        payload: event.payload(),
        timestamp: time::format(&event.created_at()),
        trace_id: event.trace_id(),
        correlation_id: event.correlation_id(),
        causation_id: event.causation_id(),
    };
    let text = serde_json::to_string(&env).expect("an envelope serialises");
    RawValue::from_string(text).expect("serde_json output is valid JSON")
}

/// The headers of an event's message: its own headers (W3C `traceparent`
/// among them), then `event_id`, `event_type` and, when set,
/// `schema_version`, `trace_id`, `correlation_id`, `causation_id` (these win
/// over an own header of the same name).
pub fn headers(event: &OutboxEvent) -> BTreeMap<String, String> {
    let mut h: BTreeMap<String, String> = event.headers().cloned().unwrap_or_default();
    h.insert("event_id".into(), event.id().to_string());
    h.insert("event_type".into(), event.event_type().to_string());
    for (name, value) in passed_on(event) {
        if let Some(v) = value {
            h.insert(name.into(), v.to_string());
        }
    }
    h
}

/// The optional ids an event passes on to what it is handed to (a broker
/// message's headers, a command's environment), by name: its schema
/// version, trace, correlation and causation ids.
pub(crate) fn passed_on<R: Route>(event: &Event<R>) -> [(&'static str, Option<&str>); 4] {
    [
        ("schema_version", event.schema_version()),
        ("trace_id", event.trace_id()),
        ("correlation_id", event.correlation_id()),
        ("causation_id", event.causation_id()),
    ]
}

impl Message {
    /// The message of an outbox event, to its own topic.
    pub fn from_event(event: &OutboxEvent) -> Self {
        Self::from_event_with(event, DEFAULT_SCHEMA_VERSION)
    }

    /// [`from_event`](Self::from_event), with `default_version` in the
    /// envelope of an event without a schema version of its own.
    pub fn from_event_with(event: &OutboxEvent, default_version: &str) -> Self {
        Message {
            topic: event.topic().to_string(),
            key: event.partition_key().to_string(),
            headers: headers(event),
            value: envelope_with(event, default_version),
            event_id: event.id(),
        }
    }

    /// The same message bound for a dead-letter topic, with the original
    /// topic in the `dlq_original_topic` header.
    pub fn dead_letter(event: &OutboxEvent, dlq_topic: &str) -> Self {
        let mut m = Message::from_event(event);
        m.topic = dlq_topic.to_string();
        m.headers
            .insert("dlq_original_topic".into(), event.topic().to_string());
        m
    }

    /// The JSON line of the file and stdout sinks:
    /// `{"topic", "key", "headers", "value"}`.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("a message serialises")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::DomainService;
    use crate::model::NewOutboxEvent;

    fn event() -> OutboxEvent {
        let mut n = NewOutboxEvent::new(
            "order",
            Uuid::from_u128(42),
            "order.created",
            "orders",
            "order-42",
            json!({"total": 12.5}),
        );
        n.headers = Some(
            [
                ("traceparent".into(), "00-abc-def-01".into()),
                ("event_type".into(), "spoof".into()),
            ]
            .into(),
        );
        n.trace_id = Some("t-1".into());
        n.created_at = Some(time::parse("t", "2026-01-02T03:04:05.5Z").unwrap());
        DomainService::default().create_outbox_event(n).unwrap()
    }

    #[test]
    fn envelope_has_the_spec_fields() {
        let e = event();
        let v: serde_json::Value = serde_json::from_str(envelope(&e).get()).unwrap();
        assert_eq!(
            v,
            json!({
                "schema_version": "1.0.0",
                "event_type": "order.created",
                "aggregate_type": "order",
                "aggregate_id": "00000000-0000-0000-0000-00000000002a",
                "payload": {"total": 12.5},
                "timestamp": "2026-01-02T03:04:05.500000Z",
                "trace_id": "t-1",
            })
        );
    }

    #[test]
    fn headers_merge_own_and_standard() {
        let e = event();
        let h = headers(&e);
        assert_eq!(h["traceparent"], "00-abc-def-01");
        assert_eq!(h["event_type"], "order.created", "standard headers win");
        assert_eq!(h["event_id"], e.id().to_string());
        assert_eq!(h["trace_id"], "t-1");
        assert!(!h.contains_key("schema_version"));
        assert!(!h.contains_key("correlation_id"));
    }

    #[test]
    fn json_line_shape() {
        let m = Message::from_event(&event());
        let v: serde_json::Value = serde_json::from_str(&m.to_json_line()).unwrap();
        assert_eq!(v["topic"], "orders");
        assert_eq!(v["key"], "order-42");
        assert_eq!(v["value"]["payload"]["total"], 12.5);
        assert_eq!(v["headers"]["event_type"], "order.created");
        assert_eq!(v.as_object().unwrap().len(), 4);
    }
}
