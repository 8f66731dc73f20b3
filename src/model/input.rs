//! The JSON form of a new outbox event (one line of `omnibox enqueue --jsonl`,
//! docs/design.md): an object with the outbox fields.

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::event::Headers;
use super::new_event::NewOutboxEvent;
use super::time;
use crate::error::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    topic: String,
    partition_key: String,
    payload: Value,
    id: Option<String>,
    #[serde(default, deserialize_with = "unique_headers")]
    headers: Option<Headers>,
    idempotency_key: Option<String>,
    trace_id: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    schema_version: Option<String>,
    max_attempts: Option<i64>,
    scheduled_at: Option<String>,
}

/// `headers` as an object of strings in which no key is given twice (a map
/// would keep the last silently; keys equal ignoring case are refused by
/// the domain service).
fn unique_headers<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Headers>, D::Error> {
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = Option<Headers>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of string values")
        }
        fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: serde::Deserializer<'de>>(
            self,
            d: D2,
        ) -> std::result::Result<Self::Value, D2::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut headers = Headers::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if headers.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!(
                        "the header {k:?} is given twice"
                    )));
                }
                headers.insert(k, v);
            }
            Ok(Some(headers))
        }
    }
    d.deserialize_option(Unique)
}

/// Parses a UUID field with a message that names the field.
pub fn parse_uuid(field: &str, text: &str) -> Result<Uuid> {
    Uuid::parse_str(text.trim()).map_err(|e| {
        Error::validation(
            field,
            format!(
                "{text:?} is not a UUID ({e}); write e.g. 0190f1d2-7a3b-7cde-8f00-123456789abc"
            ),
        )
    })
}

impl NewOutboxEvent {
    /// Parses one JSON object with the outbox fields: required
    /// `aggregate_type`, `aggregate_id` (UUID), `event_type`, `topic`,
    /// `partition_key`, `payload` (object); optional `id`, `headers`,
    /// `idempotency_key`, `trace_id`, `correlation_id`, `causation_id`,
    /// `schema_version`, `max_attempts`, `scheduled_at` (RFC 3339 with offset).
    /// Unknown fields are rejected. The result still goes through
    /// [`DomainService::create_outbox_event`](crate::domain::DomainService::create_outbox_event).
    pub fn from_json(text: &str) -> Result<Self> {
        let line: Line = serde_json::from_str(text).map_err(json_error)?;
        let max_attempts = line
            .max_attempts
            .map(|n| {
                i32::try_from(n)
                    .map_err(|_| Error::validation("max_attempts", format!("{n} is out of range")))
            })
            .transpose()?;
        Ok(NewOutboxEvent {
            aggregate_id: parse_uuid("aggregate_id", &line.aggregate_id)?,
            aggregate_type: line.aggregate_type,
            event_type: line.event_type,
            topic: line.topic,
            partition_key: line.partition_key,
            payload: line.payload,
            headers: line.headers,
            id: line
                .id
                .as_deref()
                .map(|s| parse_uuid("id", s))
                .transpose()?,
            idempotency_key: line.idempotency_key,
            trace_id: line.trace_id,
            correlation_id: line.correlation_id,
            causation_id: line.causation_id,
            schema_version: line.schema_version,
            max_attempts,
            scheduled_at: line
                .scheduled_at
                .as_deref()
                .map(|s| time::parse("scheduled_at", s))
                .transpose()?,
            created_at: None,
        })
    }
}

/// Turns a serde_json error into a validation error without the meaningless
/// "at line 1 column N" of data errors (kept for syntax errors).
pub fn json_error(e: serde_json::Error) -> Error {
    use serde_json::error::Category;
    let msg = e.to_string();
    match e.classify() {
        Category::Syntax | Category::Eof => {
            let msg = match msg.rfind(" at line ") {
                Some(i) => format!("{} (column {})", &msg[..i], e.column()),
                None => msg,
            };
            Error::validation("json", format!("invalid JSON: {msg}"))
        }
        Category::Data | Category::Io => {
            let msg = match msg.rfind(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            Error::validation("json", msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"aggregate_type":"order","aggregate_id":"0190f1d2-7a3b-7cde-8f00-123456789abc","event_type":"order.created","topic":"orders","partition_key":"o-1","payload":{"total":5}}"#;

    #[test]
    fn parses_required_and_optional_fields() {
        let n = NewOutboxEvent::from_json(OK).unwrap();
        assert_eq!(n.topic, "orders");
        assert_eq!(n.payload["total"], 5);
        let full = r#"{"aggregate_type":"order","aggregate_id":"0190f1d2-7a3b-7cde-8f00-123456789abc","event_type":"e","topic":"t","partition_key":"k","payload":{"a":1},
            "id":"0190f1d2-7a3b-7cde-8f00-000000000001","headers":{"h":"v"},"idempotency_key":"ik","trace_id":"tr","correlation_id":"c","causation_id":"ca","schema_version":"1.2.0","max_attempts":3,"scheduled_at":"2026-01-01T00:00:00+01:00"}"#;
        let n = NewOutboxEvent::from_json(full).unwrap();
        assert_eq!(n.max_attempts, Some(3));
        assert_eq!(n.headers.unwrap()["h"], "v");
        assert_eq!(
            time::format(&n.scheduled_at.unwrap()),
            "2025-12-31T23:00:00.000000Z"
        );
    }

    fn err(text: &str) -> String {
        NewOutboxEvent::from_json(text).unwrap_err().to_string()
    }

    #[test]
    fn rejections_name_the_problem() {
        assert!(
            err("{not json").starts_with("json: invalid JSON: key must be a string (column 2)"),
            "{}",
            err("{not json")
        );
        assert_eq!(
            err(r#"{"aggregate_type":"order"}"#),
            "json: missing field `aggregate_id`"
        );
        assert!(
            err(&OK.replace("\"payload\"", "\"topc\":1,\"payload\""))
                .starts_with("json: unknown field `topc`")
        );
        assert!(
            err(&OK.replace("0190f1d2-7a3b-7cde-8f00-123456789abc", "nope"))
                .starts_with("aggregate_id: \"nope\" is not a UUID")
        );
        let naive = OK.replace("}}", "},\"scheduled_at\":\"2026-01-01T00:00:00\"}");
        assert!(
            err(&naive)
                .starts_with("scheduled_at: timestamp \"2026-01-01T00:00:00\" has no UTC offset"),
            "{}",
            err(&naive)
        );
        assert!(
            err(&OK.replace("}}", "},\"max_attempts\":99999999999}"))
                .starts_with("max_attempts: 99999999999 is out of range")
        );
        assert!(err(r#"{"payload": NaN}"#).starts_with("json: invalid JSON"));
    }

    /// Randomized: any line, valid or mutated, is parsed into an event that
    /// passes validation or refused with a validation error; never a panic.
    /// OMNIBOX_FUZZ_CASES (default 5,000) and OMNIBOX_FUZZ_SEED replay or
    /// extend it.
    #[test]
    fn any_line_is_an_event_or_a_validation_error() {
        use serde_json::{Value, json};
        let (cases, mut rng) = crate::domain::testing::fuzz("enqueue line fuzz", 5_000);
        let domain = crate::domain::DomainService::default();
        let strings = [
            "",
            " ",
            "x",
            " padded ",
            "\u{1}",
            "\u{7f}",
            "é\u{1F600}",
            "a\nb",
            "2026-01-01T00:00:00Z",
            "9999-12-31T23:59:59-23:59",
            "0000-01-01T00:00:00+23:59",
            "2026-01-01T00:00:00",
            "2026-02-30T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "0190f1d2-7a3b-7cde-8f00-123456789abc",
            "00000000-0000-0000-0000-000000000000",
            "{0190f1d2-7a3b-7cde-8f00-123456789abc}",
            "urn:uuid:0190f1d2-7a3b-7cde-8f00-123456789abc",
        ];
        let any = |rng: &mut fastrand::Rng, depth: u32| -> Value {
            fn go(rng: &mut fastrand::Rng, depth: u32, strings: &[&str]) -> Value {
                match rng.u8(0..12) {
                    0 => Value::Null,
                    1 => json!(rng.bool()),
                    2 => json!(rng.i64(..)),
                    3 => json!(rng.u64(..)),
                    4 => json!(rng.f64() * 1e300 - 5e299),
                    5 => json!([-1_i64, 0, 1, i64::from(i32::MAX), 2_147_483_648][rng.usize(..5)]),
                    6 => json!("x".repeat(rng.usize(0..3000))),
                    7 | 8 if depth < 3 => {
                        let mut m = serde_json::Map::new();
                        for i in 0..rng.usize(0..4) {
                            m.insert(
                                strings[rng.usize(..strings.len())].to_string() + &i.to_string(),
                                go(rng, depth + 1, strings),
                            );
                        }
                        Value::Object(m)
                    }
                    9 if depth < 3 => Value::Array(
                        (0..rng.usize(0..3))
                            .map(|_| go(rng, depth + 1, strings))
                            .collect(),
                    ),
                    _ => json!(strings[rng.usize(..strings.len())]),
                }
            }
            go(rng, depth, &strings)
        };
        let valid: Value = serde_json::from_str(OK).unwrap();
        let optional = [
            "id",
            "headers",
            "idempotency_key",
            "trace_id",
            "correlation_id",
            "causation_id",
            "schema_version",
            "max_attempts",
            "scheduled_at",
        ];
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..cases {
            let mut line = valid.clone();
            let m = line.as_object_mut().unwrap();
            for _ in 0..rng.usize(0..4) {
                let field = if rng.bool() {
                    optional[rng.usize(..optional.len())].to_string()
                } else {
                    m.keys()
                        .nth(rng.usize(..m.len().max(1)))
                        .cloned()
                        .unwrap_or_default()
                };
                match rng.u8(0..8) {
                    0 => {
                        m.remove(&field);
                    }
                    1 => {
                        m.insert(format!("{field}_"), any(&mut rng, 0));
                    }
                    _ => {
                        m.insert(field, any(&mut rng, 0));
                    }
                }
            }
            let mut text = line.to_string();
            if rng.u8(0..5) == 0 {
                // A byte-level mutation at a character boundary.
                let cut = rng.usize(0..=text.len());
                if text.is_char_boundary(cut) {
                    match rng.u8(0..3) {
                        0 => text.truncate(cut),
                        1 => text.insert(
                            cut,
                            ['"', '{', '}', ',', ':', '\\', '\u{0}', 'é'][rng.usize(..8)],
                        ),
                        _ => text.insert_str(cut, "\"\\ud800\""),
                    }
                }
            }
            let result =
                NewOutboxEvent::from_json(&text).and_then(|n| domain.create_outbox_event(n));
            match result {
                Ok(e) => {
                    accepted += 1;
                    assert!(
                        !e.topic().trim().is_empty() && e.topic().chars().count() <= 255,
                        "{text}"
                    );
                    assert!(!e.partition_key().is_empty(), "{text}");
                    assert!(e.max_attempts() >= 1, "{text}");
                    let ahead = e.scheduled_at() - e.created_at();
                    assert!(ahead <= chrono::TimeDelta::days(366), "{text}");
                    assert!(
                        serde_json::to_string(e.payload()).unwrap().len() <= 1_000_000,
                        "{text}"
                    );
                }
                Err(Error::Validation { .. }) => refused += 1,
                Err(other) => panic!("{text}: not a validation error: {other:?}"),
            }
        }
        // Both sides are exercised.
        assert!(
            accepted > cases / 20 && refused > cases / 20,
            "accepted {accepted}, refused {refused}"
        );
    }
}
