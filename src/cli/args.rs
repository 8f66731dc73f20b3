//! Parsers for values that several commands take.

use std::time::Duration;

use omnibox::{Timestamp, time};

/// A duration such as `90s`, `5m`, `1h30m`, `7d`, `2w`, `250ms`.
pub fn duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration; write e.g. 30s, 5m, 2h or 7d".into());
    }
    if let Some(positive) = t.strip_prefix('-') {
        return Err(format!(
            "{text:?}: a duration is not negative; an age such as --older-than {positive} already means \"{positive} ago\""
        ));
    }
    let too_long = || {
        format!(
            "{text:?} is too long: the longest duration is 100 years ({}d)",
            omnibox::model::limits::MAX_DURATION.as_secs() / 86_400
        )
    };
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "{text:?} is not a duration; write e.g. 30s, 5m, 2h or 7d"
            ));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = match unit {
            "ms" => {
                total = total
                    .checked_add(Duration::from_millis(n))
                    .filter(|t| *t <= omnibox::model::limits::MAX_DURATION)
                    .ok_or_else(too_long)?;
                continue;
            }
            "s" | "sec" | "secs" => 1,
            "m" | "min" | "mins" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            "w" | "week" | "weeks" => 604_800,
            "" => {
                return Err(format!(
                    "{text:?} has no unit; write e.g. {n}s, {n}m, {n}h or {n}d"
                ));
            }
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?}; use ms, s, m, h, d or w"
                ));
            }
        };
        total = n
            .checked_mul(secs)
            .and_then(|s| total.checked_add(Duration::from_secs(s)))
            .filter(|t| *t <= omnibox::model::limits::MAX_DURATION)
            .ok_or_else(too_long)?;
    }
    Ok(total)
}

/// Largest byte budget accepted (`--batch-bytes`): 64 GiB.
pub const MAX_BYTES: u64 = 64 << 30;

/// A size in bytes such as `16MiB`, `64MB`, `512KiB` or `1048576` (bytes):
/// `KiB`, `MiB`, `GiB` are powers of 1024, `KB`, `MB`, `GB` of 1000, `B` or
/// no unit bytes (the unit's case does not matter). At least 1 byte, at
/// most 64 GiB.
pub fn bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let hint = "write e.g. 16MiB, 64MB, 512KiB or 1048576 (bytes)";
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("{text:?} is not a size; {hint}"));
    }
    let too_large = || format!("{text:?} is too large: at most 64GiB");
    let n: u64 = t[..digits].parse().map_err(|_| too_large())?;
    let unit = t[digits..].trim();
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use B, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    let total = n
        .checked_mul(scale)
        .filter(|b| *b <= MAX_BYTES)
        .ok_or_else(too_large)?;
    if total == 0 {
        return Err(format!("{text:?}: a byte budget must be at least 1 byte"));
    }
    Ok(total)
}

/// A point in time: RFC 3339 with an offset, or a duration meaning "that long ago".
pub fn since(text: &str) -> Result<Timestamp, String> {
    if text.trim().starts_with('-') {
        return Err(format!(
            "{text:?}: give a time (RFC 3339 with an offset) or an age such as {} (meaning that long ago)",
            text.trim().trim_start_matches('-')
        ));
    }
    if text.trim().starts_with(|c: char| c.is_ascii_digit()) && !text.contains('-') {
        let d = duration(text)?;
        let d = chrono::Duration::from_std(d).map_err(|_| format!("{text:?} is too long ago"))?;
        return Ok(time::now() - d);
    }
    time::parse("time", text).map_err(|e| match e {
        omnibox::Error::Validation { message, .. } => {
            format!("{message}; or give a duration such as 2h (meaning 2 hours ago)")
        }
        other => other.to_string(),
    })
}

/// A librdkafka property `KEY=VALUE` (`-X`).
pub fn property(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.trim().is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.trim().to_string(), v.to_string()))
}

/// What a refused value is told: a validation error's message alone (clap
/// names the argument).
pub fn refusal(e: omnibox::Error) -> String {
    match e {
        omnibox::Error::Validation { message, .. } => message,
        other => other.to_string(),
    }
}

/// A worker id.
pub fn worker(s: &str) -> Result<omnibox::WorkerId, String> {
    omnibox::WorkerId::new(s).map_err(refusal)
}

/// A filter value (`--topic`, `--source`, `--event-type`), exactly as given:
/// not blank, no surrounding whitespace or control characters, at most 255
/// characters.
pub fn filter_value(s: &str) -> Result<String, String> {
    omnibox::model::validate::exact("filter", s, 255)
        .map(|()| s.to_string())
        .map_err(refusal)
}

/// A consumer group, exactly as given.
pub fn consumer_group(s: &str) -> Result<String, String> {
    omnibox::model::validate::consumer_group(s)
        .map(|()| s.to_string())
        .map_err(refusal)
}

/// A UUID.
pub fn uuid(text: &str) -> Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(text.trim()).map_err(|e| format!("{text:?} is not a UUID ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that `r` is refused with a message containing `says`.
    #[track_caller]
    fn refused<T: std::fmt::Debug>(r: Result<T, String>, says: &str) {
        let err = r.unwrap_err();
        assert!(err.contains(says), "{err:?} does not say {says:?}");
    }

    #[test]
    fn durations() {
        for (text, secs) in [("90s", 90), ("5m", 300), ("1h30m", 5400), ("7d", 604_800)] {
            assert_eq!(duration(text).unwrap(), Duration::from_secs(secs), "{text}");
        }
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            duration("36500d").unwrap(),
            omnibox::model::limits::MAX_DURATION
        );
        for (text, says) in [
            ("5", "has no unit"),
            ("5y", "unknown unit"),
            ("abc", "is not a duration"),
            ("", "empty duration"),
            ("-5d", "not negative"),
        ] {
            refused(duration(text), says);
        }
        // Overflow is an error, never a panic or a time out of range.
        for huge in [
            "99999999w",
            "18446744073709551615s",
            "18446744073709551616s",
            "36501d",
            "18446744073709551615ms18446744073709551615ms",
            "9999999999999999999999d",
        ] {
            refused(duration(huge), "too long");
            assert!(since(huge).is_err(), "{huge}");
        }
        refused(since("-5d"), "5d");
    }

    #[test]
    fn sizes() {
        for (text, size) in [
            ("16MiB", 16 << 20),
            ("16mib", 16 << 20),
            ("64MB", 64_000_000),
            ("512KiB", 512 << 10),
            ("2 GiB", 2 << 30),
            ("1048576", 1 << 20),
            ("100B", 100),
            ("64GiB", MAX_BYTES),
        ] {
            assert_eq!(bytes(text).unwrap(), size, "{text}");
        }
        for (text, says) in [
            ("0", "at least 1 byte"),
            ("65GiB", "too large"),
            ("99999999999999999999999", "too large"),
            ("18446744073709551615GiB", "too large"),
            ("16M", "unknown unit"),
            ("-5MiB", "not a size"),
            ("MiB", "not a size"),
            ("", "not a size"),
            ("1.5MiB", "unknown unit"),
        ] {
            refused(bytes(text), says);
        }
    }

    /// Randomized: any text given to a flag is a value within its bounds
    /// or a refusal, never a panic. OMNIBOX_FUZZ_CASES (default 20,000) and
    /// OMNIBOX_FUZZ_SEED replay or extend it.
    #[test]
    fn any_flag_text_is_a_value_or_a_refusal() {
        let cases: usize = std::env::var("OMNIBOX_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let seed: u64 = std::env::var("OMNIBOX_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("flag value fuzz: seed {seed} (OMNIBOX_FUZZ_SEED), {cases} cases");
        let mut rng = fastrand::Rng::with_seed(seed);
        let pieces = [
            "0",
            "1",
            "9",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999",
            "-",
            "+",
            " ",
            ".",
            "=",
            ":",
            "T",
            "Z",
            "ms",
            "s",
            "m",
            "h",
            "d",
            "w",
            "y",
            "MiB",
            "kb",
            "GiB",
            "B",
            "é",
            "\u{1F600}",
            "\u{663}",
            "\u{0}",
            "2026-01-01",
            "T00:00:00",
            "+23:59",
            "-23:59",
            "9999-12-31",
            "0190f1d2-7a3b-7cde-8f00-123456789abc",
        ];
        let now = time::now();
        for _ in 0..cases {
            let text: String = (0..rng.usize(0..6))
                .map(|_| pieces[rng.usize(..pieces.len())])
                .collect();
            if let Ok(d) = duration(&text) {
                assert!(d <= omnibox::model::limits::MAX_DURATION, "{text:?}");
            }
            if let Ok(b) = bytes(&text) {
                assert!((1..=MAX_BYTES).contains(&b), "{text:?}");
            }
            if let Ok(t) = since(&text) {
                // A moment, never an error later when it is formatted or compared.
                let _ = time::format(&t);
                if text.trim().starts_with(|c: char| c.is_ascii_digit()) && !text.contains('-') {
                    assert!(t <= now + chrono::TimeDelta::seconds(5), "{text:?}");
                }
            }
            if let Ok((k, _)) = property(&text) {
                assert!(!k.is_empty() && k.trim() == k, "{text:?}");
            }
            let _ = uuid(&text);
            let _ = worker(&text);
            let _ = filter_value(&text).map(|v| assert_eq!(v, text));
            let _ = consumer_group(&text).map(|v| assert_eq!(v, text));
        }
    }

    #[test]
    fn since_accepts_both_forms() {
        let t = since("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(time::format(&t), "2026-01-01T00:00:00.000000Z");
        let ago = since("2h").unwrap();
        let delta = time::now() - ago;
        assert!((delta.num_seconds() - 7200).abs() < 5);
        refused(since("2026-01-01T00:00:00"), "no UTC offset");
    }
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// Where `--dlq` keeps dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DlqArg {
    /// The omnibox_dead_letters table (see `omnibox list --table dead-letters`)
    Table,
}

/// The circuit breaker of `publish` and `inbox process`.
#[derive(Debug, Clone, clap::Args)]
pub struct CircuitArgs {
    /// Pause claiming while downstream (the broker, the handler) does not
    /// answer; off keeps claiming at the transient retry's pace (no attempt
    /// is spent either way)
    #[arg(long, value_enum, default_value_t = OnOff::On, value_name = "on|off")]
    pub circuit_breaker: OnOff,
    /// Consecutive batches downstream did not take before the pause starts
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000), value_name = "N")]
    pub circuit_threshold: u32,
    /// Longest pause: it starts at 1s and doubles while downstream stays
    /// out, up to this (at least 1s)
    #[arg(long, default_value = "30s", value_parser = duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub circuit_recovery: Duration,
}

impl CircuitArgs {
    /// The breaker's settings; a recovery under a second is a usage error.
    pub fn config(
        &self,
    ) -> Result<omnibox::pipeline::circuit::CircuitConfig, crate::cli::UsageError> {
        if self.circuit_recovery < Duration::from_secs(1) {
            return Err(crate::cli::UsageError(
                "--circuit-recovery must be at least 1s".into(),
            ));
        }
        let base = Duration::from_secs(1);
        Ok(omnibox::pipeline::circuit::CircuitConfig {
            enabled: self.circuit_breaker == OnOff::On,
            threshold: self.circuit_threshold,
            base,
            max: self.circuit_recovery,
        })
    }
}
