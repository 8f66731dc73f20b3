use serde_json::json;

use super::*;

#[test]
fn consumer_groups_are_taken_exactly_or_refused() {
    assert!(consumer_group("billing").is_ok());
    assert!(consumer_group("a b").is_ok());
    assert!(consumer_group(&"g".repeat(255)).is_ok());
    for bad in [
        "",
        " ",
        "\t",
        " billing",
        "billing\n",
        "a\u{1}b",
        &"g".repeat(256),
    ] {
        assert!(consumer_group(bad).is_err(), "{bad:?}");
    }
}

fn lim() -> Limits {
    Limits::default()
}

/// Asserts that `r` is an error whose message contains `says`.
#[track_caller]
fn refused<T: fmt::Debug>(r: Result<T>, says: &str) {
    let err = r.unwrap_err().to_string();
    assert!(err.contains(says), "{err:?} does not say {says:?}");
}

#[test]
fn required_trims_and_rejects_empty_long_and_control() {
    assert_eq!(required("topic", "  orders ", 10).unwrap(), "orders");
    assert_eq!(
        required("topic", "   ", 10).unwrap_err().to_string(),
        "topic: must not be empty"
    );
    assert_eq!(
        required("topic", "abcdefghijk", 10)
            .unwrap_err()
            .to_string(),
        "topic: is 11 characters long; the limit is 10"
    );
    // Characters, not bytes: ten two-byte characters fit.
    assert!(required("topic", "éééééééééé", 10).is_ok());
    refused(required("topic", "a\u{0}b", 10), "control character");
}

#[test]
fn optional_passes_none_and_checks_some() {
    assert_eq!(optional("trace_id", None, 64).unwrap(), None);
    assert_eq!(
        optional("trace_id", Some(" t "), 64).unwrap(),
        Some("t".into())
    );
    assert!(optional("trace_id", Some(" "), 64).is_err());
}

#[test]
fn payload_must_be_a_non_empty_object() {
    assert_eq!(
        payload(json!([1]), &lim()).unwrap_err().to_string(),
        "payload: must be a JSON object, got an array"
    );
    assert_eq!(
        payload(json!("x"), &lim()).unwrap_err().to_string(),
        "payload: must be a JSON object, got a string"
    );
    assert_eq!(
        payload(json!(null), &lim()).unwrap_err().to_string(),
        "payload: must be a JSON object, got null"
    );
    assert_eq!(
        payload(json!({}), &lim()).unwrap_err().to_string(),
        "payload: must not be empty ({})"
    );
    assert_eq!(payload(json!({"a": 1}), &lim()).unwrap().len(), 1);
}

#[test]
fn payload_size_is_measured_compact_and_capped() {
    let limits = Limits {
        payload_max_bytes: 20,
        ..Limits::default()
    };
    // {"a":"123456789012"} is exactly 20 bytes.
    assert!(payload(json!({"a": "123456789012"}), &limits).is_ok());
    let err = payload(json!({"a": "1234567890123"}), &limits).unwrap_err();
    assert_eq!(
        err.to_string(),
        "payload: is 21 bytes as compact JSON; the limit is 20 bytes"
    );
    let big = "x".repeat(1_000_000);
    refused(
        payload(json!({ "a": big }), &lim()),
        "the limit is 1000000 bytes",
    );
}

#[test]
fn payload_rejects_nul_anywhere() {
    refused(payload(json!({"a": {"b": ["x\u{0}"]}}), &lim()), "NUL");
    assert!(payload(json!({"a\u{0}": 1}), &lim()).is_err());
}

#[test]
fn nan_and_infinity_cannot_be_parsed_into_a_payload() {
    assert!(serde_json::from_str::<Value>(r#"{"a": NaN}"#).is_err());
    assert!(serde_json::from_str::<Value>(r#"{"a": Infinity}"#).is_err());
    // A Rust f64 NaN cannot become a JSON number either.
    assert!(serde_json::Number::from_f64(f64::NAN).is_none());
}

fn h(pairs: &[(&str, &str)]) -> Option<Headers> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[test]
fn headers_rules() {
    assert_eq!(headers(None, &lim()).unwrap(), None);
    assert!(headers(h(&[("a", "b")]), &lim()).is_ok());
    assert_eq!(
        headers(h(&[("", "b")]), &lim()).unwrap_err().to_string(),
        "headers: a header key is empty"
    );
    assert!(headers(h(&[(&"k".repeat(64), "v")]), &lim()).is_ok());
    let (long_key, long_value) = ("k".repeat(65), "v".repeat(513));
    for (pairs, says) in [
        (h(&[("a", "")]), "value must not be empty"),
        (h(&[(&long_key, "v")]), "key is 65 characters"),
        (h(&[("k", &long_value)]), "value is 513 characters"),
        (h(&[("k", "a\nb")]), "value contains a control character"),
        (h(&[("k\t", "v")]), "key contains a control character"),
        (h(&[("X-Id", "1"), ("x-id", "2")]), "differ only in case"),
    ] {
        refused(headers(pairs, &lim()), says);
    }
    let many: Headers = (0..101)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    assert_eq!(
        headers(Some(many), &lim()).unwrap_err().to_string(),
        "headers: 101 headers given; the limit is 100"
    );
}

#[test]
fn scheduled_at_window() {
    let created = crate::model::time::parse("t", "2026-01-01T00:00:00Z").unwrap();
    let at = |s: &str| crate::model::time::parse("t", s).unwrap();
    assert!(scheduled_at(at("2025-12-31T23:59:00Z"), created, &lim()).is_ok());
    refused(
        scheduled_at(at("2025-12-31T23:58:59Z"), created, &lim()),
        "more than 60 s before created_at",
    );
    assert!(scheduled_at(at("2027-01-01T00:00:00Z"), created, &lim()).is_ok());
    refused(
        scheduled_at(at("2027-01-01T00:00:01Z"), created, &lim()),
        "too far in the future",
    );
}

#[test]
fn max_attempts_at_least_one() {
    assert_eq!(max_attempts(1).unwrap(), 1);
    assert_eq!(
        max_attempts(0).unwrap_err().to_string(),
        "max_attempts: must be at least 1, got 0"
    );
}

#[test]
fn truncation_keeps_utf8_boundaries() {
    assert_eq!(truncate_error("  boom  ", 10, "...").unwrap(), "boom");
    assert!(truncate_error("   ", 10, "...").is_err());
    assert!(truncate_error("x", 0, "...").is_err());
    // 'é' is two bytes; 2000 bytes would cut one in half.
    let long = "é".repeat(1500);
    let t = truncate_error(&long, 2000, limits::DEFAULT_TRUNCATION_SUFFIX).unwrap();
    assert!(t.len() <= 2000);
    assert!(t.ends_with("... [TRUNCATED]"));
    assert_eq!(t.len(), 1984 + "... [TRUNCATED]".len());
    // Suffix longer than the limit: plain cut.
    assert_eq!(truncate_error("héllo", 2, "...").unwrap(), "h");
    // Exactly at the limit: untouched.
    let exact = "a".repeat(2000);
    assert_eq!(truncate_error(&exact, 2000, "...").unwrap(), exact);
}

#[test]
fn worker_id_pattern() {
    for good in [
        "host-1.example.com:1234",
        "k8s/pod-7:relay",
        &"x".repeat(255),
    ] {
        assert!(WorkerId::new(good).is_ok(), "{good:?}");
    }
    assert!(WorkerId::new("").is_err());
    assert!(WorkerId::new("x".repeat(256)).is_err());
    refused(WorkerId::new("has space"), "contains ' '");
    let d = WorkerId::default_for_process();
    assert!(WorkerId::new(d.as_str()).is_ok(), "{d}");
    assert!(d.as_str().ends_with(&format!(":{}", std::process::id())));
}

#[test]
fn unlock_reason_rules() {
    assert_eq!(
        UnlockReason::new(" dead ").unwrap().last_error(),
        "Force unlock: dead"
    );
    refused(UnlockReason::new("  "), "needs a reason");
    assert!(UnlockReason::new("r".repeat(256)).is_err());
    assert!(UnlockReason::new("r".repeat(255)).is_ok());
}
