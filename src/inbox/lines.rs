//! JSON lines into messages: a line of a file or of stdin, in the sink's
//! format (`topic`, `key`, `headers`, `value`) or a bare value.

use serde_json::{Map, Value};

use super::message::RawMessage;
use crate::model::validate;

/// [`from_json_line`] for a line as read: a line that is not UTF-8 becomes
/// a message whose value is the line's exact bytes (poison, bytes kept).
pub fn from_json_bytes(line: &[u8], number: i64, default_topic: &str) -> RawMessage {
    match std::str::from_utf8(line) {
        Ok(text) => from_json_line(text, number, default_topic),
        Err(_) => RawMessage {
            topic: default_topic.to_string(),
            partition: 0,
            offset: number,
            key: None,
            headers: Vec::new(),
            payload: Some(line.to_vec()),
            position_is_identity: false,
            cut: None,
            origin: None,
            defect: None,
        },
    }
}

/// The keys of a line in the file sink's format.
const SINK_KEYS: [&str; 4] = ["topic", "key", "headers", "value"];

/// Parses a line of the file sink's format (`{"topic", "key", "headers",
/// "value"}`) into a raw message. A JSON object whose keys are all of these
/// and that has a `value` or a `topic` is in that format (a missing `topic`
/// is `default_topic`): its key must be a string (or null), its headers an
/// object of strings, and it must have a value, or the message is poison
/// with the reason. Any other line is a message whose value is the line
/// itself (a foreign message, stored as its payload; poison if it is not a
/// JSON object).
pub fn from_json_line(line: &str, number: i64, default_topic: &str) -> RawMessage {
    let whole = |defect: Option<String>| RawMessage {
        topic: default_topic.to_string(),
        partition: 0,
        offset: number,
        key: None,
        headers: Vec::new(),
        payload: Some(line.as_bytes().to_vec()),
        position_is_identity: false,
        cut: None,
        origin: None,
        defect,
    };
    let parsed: Option<Map<String, Value>> = serde_json::from_str(line).ok();
    let Some(m) = parsed.filter(|m| {
        (m.contains_key("value") || m.contains_key("topic"))
            && m.keys().all(|k| SINK_KEYS.contains(&k.as_str()))
    }) else {
        return whole(None);
    };
    let topic = match m.get("topic") {
        None | Some(Value::Null) => default_topic.to_string(),
        Some(Value::String(t)) => t.clone(),
        Some(other) => {
            return whole(Some(format!(
                "the line's topic is {}, not a string",
                validate::json_kind(other)
            )));
        }
    };
    let key = match m.get("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k.as_bytes().to_vec()),
        Some(other) => {
            return whole(Some(format!(
                "the line's key is {}, not a string",
                validate::json_kind(other)
            )));
        }
    };
    let mut headers = Vec::new();
    match m.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (k, v) in h {
                let Some(v) = v.as_str() else {
                    return whole(Some(format!(
                        "the line's header {k:?} is {}, not a string",
                        validate::json_kind(v)
                    )));
                };
                headers.push((k.clone(), v.as_bytes().to_vec()));
            }
        }
        Some(other) => {
            return whole(Some(format!(
                "the line's headers are {}, not an object",
                validate::json_kind(other)
            )));
        }
    }
    let Some(value) = m.get("value") else {
        return whole(Some(
            "a line in the file sink's format (topic, key, headers) without a value".into(),
        ));
    };
    RawMessage {
        topic,
        partition: 0,
        offset: number,
        key,
        headers,
        // Serialising a parsed value cannot fail; were it to, the line is
        // kept as it is.
        payload: Some(serde_json::to_vec(value).unwrap_or_else(|_| line.as_bytes().to_vec())),
        position_is_identity: false,
        cut: None,
        origin: None,
        defect: None,
    }
}
