//! Timestamps: always UTC, microsecond precision (what PostgreSQL stores), and
//! one fixed-width text form so that SQLite compares them correctly as TEXT.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, SubsecRound, Utc};

use crate::error::{Error, Result};

/// A point in time; always UTC, microsecond precision.
pub type Timestamp = DateTime<Utc>;

/// The current time, truncated to microseconds.
pub fn now() -> Timestamp {
    truncate(Utc::now())
}

/// The moment `d` from now on the monotonic clock, `d` taken at most
/// [`MAX_DURATION`](crate::model::limits::MAX_DURATION): a wait that comes
/// from a handler or an option (`Duration::MAX` included) cannot overflow
/// the clock.
pub fn instant_after(d: std::time::Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_add(d.min(crate::model::limits::MAX_DURATION))
        .unwrap_or(now)
}

/// [`instant_after`] on tokio's clock.
pub fn tokio_instant_after(d: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d.min(crate::model::limits::MAX_DURATION))
        .unwrap_or(now)
}

/// Truncates to microseconds, the precision both stores keep.
pub fn truncate(t: Timestamp) -> Timestamp {
    t.trunc_subsecs(6)
}

/// Formats as RFC 3339 UTC with exactly six fractional digits and `Z`
/// (`2026-11-26T20:45:17.123456Z`). Fixed width, so text order is time order.
pub fn format(t: &Timestamp) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// `3d 4h`, `5m 12s`, `800ms`: the two largest units.
pub fn human_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (days, hours, mins, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m {s}s"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// Parses an RFC 3339 timestamp that carries a UTC offset (`Z` or `+02:00`)
/// and converts it to UTC. A timestamp without an offset is rejected: its
/// meaning would depend on the machine's time zone.
pub fn parse(field: &str, text: &str) -> Result<Timestamp> {
    let text = text.trim();
    match DateTime::parse_from_rfc3339(text) {
        Ok(t) => Ok(truncate(t.with_timezone(&Utc))),
        Err(_) if is_naive(text) => Err(Error::validation(
            field,
            format!("timestamp {text:?} has no UTC offset; add one, e.g. {text}Z or {text}+02:00"),
        )),
        Err(e) => Err(Error::validation(
            field,
            format!("{text:?} is not an RFC 3339 timestamp ({e}); write e.g. 2026-01-31T12:00:00Z"),
        )),
    }
}

/// Whether `text` is a date and time without a UTC offset (refused with a
/// hint, since its time zone would be a guess).
fn is_naive(text: &str) -> bool {
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .any(|f| NaiveDateTime::parse_from_str(text, f).is_ok())
}

/// Parses the fixed text form written by [`format`] (also any RFC 3339 form).
pub(crate) fn parse_stored(text: &str) -> std::result::Result<Timestamp, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("bad timestamp {text:?}: {e}"))
}

/// serde helpers: timestamps serialise in the fixed form.
pub(crate) mod serde_ts {
    use serde::Serializer;

    use super::Timestamp;

    pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(t))
    }

    pub mod option {
        use serde::Serializer;

        use super::super::Timestamp;

        pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_str(&super::super::format(t)),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A wait of any size (a handler's `Duration::MAX`) is a moment at most
    /// 100 years away, on both clocks, never an overflow.
    #[tokio::test]
    async fn instants_after_any_wait() {
        let max = crate::model::limits::MAX_DURATION;
        for d in [Duration::ZERO, Duration::from_secs(5), max, Duration::MAX] {
            let (now, at) = (std::time::Instant::now(), instant_after(d));
            assert!(at >= now + d.min(max), "{d:?}");
            assert!(at <= std::time::Instant::now() + d.min(max), "{d:?}");
            let (now, at) = (tokio::time::Instant::now(), tokio_instant_after(d));
            assert!(at >= now + d.min(max), "{d:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(Duration::from_millis(800)), "800ms");
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(312)), "5m 12s");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600 + 60)), "3h 1m");
        assert_eq!(
            human_duration(Duration::from_secs(2 * 86_400 + 3600)),
            "2d 1h"
        );
    }

    #[test]
    fn format_is_fixed_width_and_sorts_as_time() {
        let a = parse("t", "2026-01-01T00:00:00Z").unwrap();
        let b = parse("t", "2026-01-01T00:00:00.5Z").unwrap();
        assert_eq!(format(&a), "2026-01-01T00:00:00.000000Z");
        assert_eq!(format(&b), "2026-01-01T00:00:00.500000Z");
        assert!(format(&a) < format(&b));
    }

    #[test]
    fn offsets_are_converted_to_utc() {
        let t = parse("t", "2026-01-01T02:00:00+02:00").unwrap();
        assert_eq!(format(&t), "2026-01-01T00:00:00.000000Z");
    }

    #[test]
    fn naive_timestamps_are_rejected_with_a_hint() {
        let err = parse("scheduled_at", "2026-01-01T00:00:00").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("scheduled_at: timestamp \"2026-01-01T00:00:00\" has no UTC offset"),
            "{msg}"
        );
        assert!(msg.contains("2026-01-01T00:00:00Z"));
    }

    #[test]
    fn garbage_is_rejected() {
        let err = parse("scheduled_at", "tomorrow").unwrap_err();
        assert!(err.to_string().contains("is not an RFC 3339 timestamp"));
    }

    #[test]
    fn nanoseconds_are_truncated_to_micros() {
        let t = parse("t", "2026-01-01T00:00:00.123456789Z").unwrap();
        assert_eq!(format(&t), "2026-01-01T00:00:00.123456Z");
    }
}
