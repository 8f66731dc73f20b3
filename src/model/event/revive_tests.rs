use serde_json::{Value, json};

use super::*;

#[test]
fn header_values_that_are_not_strings_keep_their_json_text() {
    let h = headers_from_json(json!({"s": "x", "n": 3, "b": false, "z": null, "o": {"a": [1]}}))
        .unwrap()
        .unwrap();
    assert_eq!(h["s"], "x");
    assert_eq!(h["n"], "3");
    assert_eq!(h["b"], "false");
    assert_eq!(h["z"], "null");
    assert_eq!(h["o"], r#"{"a":[1]}"#);
    assert_eq!(headers_from_json(Value::Null).unwrap(), None);
    for bad in [json!([1]), json!("x"), json!(1), json!(true)] {
        assert!(headers_from_json(bad).unwrap_err().contains("JSON object"));
    }
}
use crate::domain::testing;

fn copy() -> Value {
    let e = testing::order_created(Uuid::now_v7(), "k1", json!({"total": 12.5}));
    serde_json::to_value(&e).unwrap()
}

#[test]
fn a_copy_comes_back_as_a_fresh_pending_row() {
    let mut c = copy();
    c["status"] = json!("failed");
    c["attempts_made"] = json!(3);
    c["last_error"] = json!("rejected");
    let e = OutboxEvent::revived(&c).unwrap();
    assert_eq!(
        (e.status(), e.attempts_made(), e.last_error()),
        (EventStatus::Pending, 0, None)
    );
    assert_eq!(e.id().to_string(), c["id"].as_str().unwrap());
    assert_eq!((e.topic(), e.partition_key()), ("orders", "k1"));
    assert_eq!(e.payload()["total"], 12.5);
    assert!(e.clock_default.scheduled_at && !e.clock_default.created_at);
    // An inbox copy is not an outbox event, and the reverse.
    assert!(InboxEvent::revived(&c).is_err());
}

/// Randomized: a copy with keys removed, replaced by values of other
/// kinds, or mangled never panics; it comes back or is refused.
/// OMNIBOX_FUZZ_CASES (default 5,000) and OMNIBOX_FUZZ_SEED.
#[test]
fn any_damaged_copy_comes_back_or_is_refused() {
    let (cases, mut rng) = testing::fuzz("dead-letter copy fuzz", 5_000);
    let base = copy();
    let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
    let values = [
        json!(null),
        json!(""),
        json!(-1),
        json!(0),
        json!(i64::MAX),
        json!(1e300),
        json!("2026-13-45T99:99:99Z"),
        json!("2026-01-01T00:00:00"),
        json!("not-a-uuid"),
        json!([]),
        json!({}),
        json!({"a": [1, {"b": null}]}),
        json!("\u{0}\u{1F600}"),
        json!(true),
    ];
    let mut ok = 0;
    for _ in 0..cases {
        let mut c = base.clone();
        for _ in 0..rng.usize(1..4) {
            let k = &keys[rng.usize(..keys.len())];
            let o = c.as_object_mut().unwrap();
            if rng.bool() {
                o.remove(k);
            } else {
                o.insert(k.clone(), values[rng.usize(..values.len())].clone());
            }
        }
        if rng.u8(..8) == 0 {
            c = values[rng.usize(..values.len())].clone();
        }
        if let Ok(e) = OutboxEvent::revived(&c) {
            assert!(e.max_attempts() >= 1 && !e.event_type().is_empty());
            ok += 1;
        }
    }
    eprintln!("{ok} of {cases} damaged copies came back (the damage was in fields not restored)");
}

#[test]
fn the_size_estimate_is_close_to_the_compact_json() {
    let payload = serde_json::json!({
            "order": 17,
            "items": [{"sku": "SKU-000123", "qty": 3, "price": 12.5, "note": "fragile"}, {"sku": "x", "qty": 1}],
            "flags": [true, false, null],
            "attachment": "x".repeat(10_000)});
    let Value::Object(map) = payload else {
        unreachable!()
    };
    let exact = serde_json::to_string(&map).unwrap().len();
    let approx = approx_json_len(&map);
    assert!(approx.abs_diff(exact) * 100 <= exact, "{approx} vs {exact}");
    assert_eq!(approx_json_len(&Map::new()), 2);
}
