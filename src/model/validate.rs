//! The validation rules of docs/design.md, "Event lifecycle and rules", one function per rule, each returning an
//! [`Error::Validation`] that names the field and says what to do.

use std::fmt;
use std::io;

use serde_json::Value;

use super::event::{Headers, Payload};
use super::limits::{self, Limits};
use super::time::Timestamp;
use crate::error::{Error, Result};

/// A required string field: trimmed, non-empty, at most `max` characters, no
/// control characters.
pub fn required(field: &str, value: &str, max: usize) -> Result<String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(Error::validation(field, "must not be empty"));
    }
    check_text(field, v, max)?;
    Ok(v.to_string())
}

/// A consumer group name, taken exactly as given (it is half of the inbox's
/// deduplication key, so it is never trimmed or altered): not empty, no
/// leading or trailing whitespace, no control characters, at most
/// [`limits::CONSUMER_GROUP_MAX_LENGTH`] characters.
pub fn consumer_group(group: &str) -> Result<()> {
    exact("consumer_group", group, limits::CONSUMER_GROUP_MAX_LENGTH)
}

/// A name or id taken exactly as given (never trimmed or cut): not empty,
/// no leading or trailing whitespace, no control characters, at most `max`
/// characters.
pub fn exact(field: &str, value: &str, max: usize) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::validation(field, "must not be empty or blank"));
    }
    if value.trim() != value {
        return Err(Error::validation(
            field,
            format!("{value:?} has leading or trailing whitespace; give it exactly"),
        ));
    }
    check_text(field, value, max)
}

/// An optional string field: trimmed; if given it must follow the rules of
/// [`required`]. An all-whitespace value is rejected rather than dropped.
pub fn optional(field: &str, value: Option<&str>, max: usize) -> Result<Option<String>> {
    value.map(|v| required(field, v, max)).transpose()
}

/// A text field no longer than `max` characters (not bytes), as the
/// reference counts them.
fn check_text(field: &str, v: &str, max: usize) -> Result<()> {
    let chars = v.chars().count();
    if chars > max {
        return Err(Error::validation(
            field,
            format!("is {chars} characters long; the limit is {max}"),
        ));
    }
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(Error::validation(
            field,
            format!("contains the control character {:?}; remove it", c),
        ));
    }
    Ok(())
}

/// The payload: a non-empty JSON object of at most `limits.payload_max_bytes`
/// bytes in compact form, without NUL characters (PostgreSQL's `jsonb` cannot
/// store `\u0000`).
pub fn payload(value: Value, limits: &Limits) -> Result<Payload> {
    let map = match value {
        Value::Object(map) => map,
        other => {
            return Err(Error::validation(
                "payload",
                format!("must be a JSON object, got {}", json_kind(&other)),
            ));
        }
    };
    if map.is_empty() {
        return Err(Error::validation("payload", "must not be empty ({})"));
    }
    let size = compact_len(&map);
    if size > limits.payload_max_bytes {
        return Err(Error::validation(
            "payload",
            format!(
                "is {size} bytes as compact JSON; the limit is {} bytes",
                limits.payload_max_bytes
            ),
        ));
    }
    if map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)) {
        return Err(Error::validation(
            "payload",
            "contains a NUL character (\\u0000), which PostgreSQL cannot store; remove it",
        ));
    }
    Ok(map)
}

/// Name of a JSON value's kind, for messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether any string or key of `v`, at any depth, holds a NUL character
/// (PostgreSQL's `jsonb` cannot store one).
fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(contains_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// Length of the compact JSON text, counted without building it.
pub fn compact_len(map: &Payload) -> usize {
    struct Counter(usize);
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    serde_json::to_writer(&mut c, map).expect("serialising a JSON map to a counter cannot fail");
    c.0
}

/// Headers: at most `headers_max_count`; keys 1..64 and values 1..512
/// characters without control characters; no two keys equal ignoring case.
pub fn headers(headers: Option<Headers>, limits: &Limits) -> Result<Option<Headers>> {
    let Some(headers) = headers else {
        return Ok(None);
    };
    if headers.len() > limits.headers_max_count {
        return Err(Error::validation(
            "headers",
            format!(
                "{} headers given; the limit is {}",
                headers.len(),
                limits.headers_max_count
            ),
        ));
    }
    let mut seen = std::collections::HashMap::with_capacity(headers.len());
    for (key, value) in &headers {
        let field = format!("headers[{key:?}]");
        if key.is_empty() {
            return Err(Error::validation("headers", "a header key is empty"));
        }
        header_part(&field, "key", key, limits.header_key_max_length)?;
        if value.is_empty() {
            return Err(Error::validation(field, "value must not be empty"));
        }
        header_part(&field, "value", value, limits.header_value_max_length)?;
        if let Some(other) = seen.insert(key.to_lowercase(), key) {
            return Err(Error::validation(
                "headers",
                format!("keys {other:?} and {key:?} differ only in case; keep one"),
            ));
        }
    }
    Ok(Some(headers))
}

/// A header's `part` (`key` or `value`): at most `max` characters, no
/// control characters.
fn header_part(field: &str, part: &str, text: &str, max: usize) -> Result<()> {
    let chars = text.chars().count();
    if chars > max {
        return Err(Error::validation(
            field,
            format!("{part} is {chars} characters long; the limit is {max}"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(Error::validation(
            field,
            format!("{part} contains a control character"),
        ));
    }
    Ok(())
}

/// `scheduled_at` must lie within `[created_at - skew, created_at + max_future]`.
pub fn scheduled_at(scheduled: Timestamp, created: Timestamp, limits: &Limits) -> Result<()> {
    let delta = (scheduled - created).num_milliseconds();
    if delta < limits.scheduled_at_skew_seconds.saturating_mul(-1000) {
        return Err(Error::validation(
            "scheduled_at",
            format!(
                "{} is more than {} s before created_at {}",
                super::time::format(&scheduled),
                limits.scheduled_at_skew_seconds,
                super::time::format(&created)
            ),
        ));
    }
    if delta > limits.scheduled_at_max_future_seconds.saturating_mul(1000) {
        return Err(Error::validation(
            "scheduled_at",
            format!(
                "{} is too far in the future (at most {} days after creation)",
                super::time::format(&scheduled),
                limits.scheduled_at_max_future_seconds / 86_400
            ),
        ));
    }
    Ok(())
}

/// `max_attempts` must be at least 1.
pub fn max_attempts(value: i32) -> Result<i32> {
    if value < 1 {
        return Err(Error::validation(
            "max_attempts",
            format!("must be at least 1, got {value}"),
        ));
    }
    Ok(value)
}

/// Truncates an error message to `max_bytes` bytes on a UTF-8 character
/// boundary, ending with `suffix` when cut. The message is trimmed first and
/// must not be empty.
pub fn truncate_error(error: &str, max_bytes: usize, suffix: &str) -> Result<String> {
    if max_bytes < 1 {
        return Err(Error::validation(
            "max_bytes",
            format!("must be >= 1, got {max_bytes}"),
        ));
    }
    let s = error.trim();
    if s.is_empty() {
        return Err(Error::validation(
            "error",
            "an error message must not be empty",
        ));
    }
    if s.len() <= max_bytes {
        return Ok(s.to_string());
    }
    if suffix.len() >= max_bytes {
        return Ok(floor_char_boundary(s, max_bytes).to_string());
    }
    let keep = floor_char_boundary(s, max_bytes - suffix.len());
    Ok(format!("{keep}{suffix}"))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn floor_char_boundary(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A worker id: `^[A-Za-z0-9.\-/:]+$`, at most 255 characters. The default
/// is `host:pid`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(String);

impl WorkerId {
    /// Checks and wraps a worker id (surrounding whitespace is trimmed).
    pub fn new(id: impl AsRef<str>) -> Result<Self> {
        let id = id.as_ref().trim();
        if id.is_empty() {
            return Err(Error::validation("worker_id", "must not be empty"));
        }
        if id.len() > limits::WORKER_ID_MAX_LENGTH {
            return Err(Error::validation(
                "worker_id",
                format!(
                    "is {} characters long; the limit is {}",
                    id.len(),
                    limits::WORKER_ID_MAX_LENGTH
                ),
            ));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '/' | ':')))
        {
            return Err(Error::validation(
                "worker_id",
                format!("{id:?} contains {c:?}; use only letters, digits and . - / :"),
            ));
        }
        Ok(WorkerId(id.to_string()))
    }

    /// `host:pid` of this process (characters outside the pattern replaced by `-`).
    pub fn default_for_process() -> Self {
        let host = hostname().unwrap_or_else(|| "localhost".to_string());
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(200)
            .collect();
        WorkerId(format!("{host}:{}", std::process::id()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// This machine's host name, for default worker ids: `HOSTNAME`, else the
/// kernel's, else `/etc/hostname`.
fn hostname() -> Option<String> {
    if let Ok(h) = std::env::var("HOSTNAME")
        && !h.trim().is_empty()
    {
        return Some(h.trim().to_string());
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for WorkerId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        WorkerId::new(s)
    }
}

/// The reason of a force unlock: trimmed, 1..255 characters. Recorded as
/// `Force unlock: <reason>` in `last_error` when the row has no error of
/// its own (its error is kept), and in the audit row of `omnibox unlock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnlockReason(String);

impl UnlockReason {
    /// Checks and wraps a reason.
    pub fn new(reason: impl AsRef<str>) -> Result<Self> {
        let r = reason.as_ref().trim();
        if r.is_empty() {
            return Err(Error::validation(
                "reason",
                "a force unlock needs a reason; say why, e.g. --reason \"worker host-3 died\"",
            ));
        }
        let chars = r.chars().count();
        if chars > limits::FORCE_UNLOCK_REASON_MAX_LENGTH {
            return Err(Error::validation(
                "reason",
                format!(
                    "is {chars} characters long; the limit is {}",
                    limits::FORCE_UNLOCK_REASON_MAX_LENGTH
                ),
            ));
        }
        if r.chars().any(char::is_control) {
            return Err(Error::validation("reason", "contains a control character"));
        }
        Ok(UnlockReason(r.to_string()))
    }

    /// The reason as given (trimmed).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What is stored in `last_error`.
    pub fn last_error(&self) -> String {
        format!("Force unlock: {}", self.0)
    }
}

#[cfg(test)]
mod tests;
