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
        position_is_identity: true,
        cut: None,
        origin: None,
        defect: None,
    }
}

/// `m` normalised for the consumer group `g` with the default limits.
fn normal(m: &RawMessage) -> Normalized {
    normalize(&DomainService::default(), m, "g")
}

/// A message with these headers and the payload `{"a":1}`, normalised.
fn with_headers(headers: &[(&str, &str)]) -> Normalized {
    normal(&raw(headers, r#"{"a":1}"#))
}

/// The raw bytes a poison row keeps (`raw_base64`).
fn raw_of(e: &InboxEvent) -> Vec<u8> {
    let b64 = e.payload()["raw_base64"].as_str().unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// The row `n` normalised to, which must be poison when `poison` is true
/// and a valid event otherwise.
fn row(n: Normalized, poison: bool) -> InboxEvent {
    let e = n.event();
    assert_eq!(
        n.is_poison(),
        poison,
        "{}: {:?}",
        e.message_id(),
        e.last_error()
    );
    match n {
        Normalized::Event(e) | Normalized::Poison(e) => *e,
    }
}

/// The valid event `n` must be.
fn event(n: Normalized) -> InboxEvent {
    row(n, false)
}

/// The poison row `n` must be.
fn poison_row(n: Normalized) -> InboxEvent {
    row(n, true)
}

#[test]
fn ids_types_and_sources_follow_the_precedence() {
    type Field = fn(&InboxEvent) -> &str;
    let (id, ty, source, group): (Field, Field, Field, Field) = (
        InboxEvent::message_id,
        InboxEvent::event_type,
        InboxEvent::source,
        InboxEvent::consumer_group,
    );
    // Each case: the message's headers, a field of its row and the value it must have.
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Headers, Field, &str, &str); 8] = [
        (
            &[("message_id", "m-1"), ("event_id", "e-1")],
            id,
            "m-1",
            "message_id first",
        ),
        (&[("event_id", "e-1")], id, "e-1", "then event_id"),
        (&[], id, "orders:2:41", "then the position"),
        (&[], ty, "orders", "event type falls back to the topic"),
        (&[], source, "orders", "source falls back to the topic"),
        (&[], group, "g", "the consumer's group"),
        (
            &[("source_service", "billing")],
            source,
            "billing",
            "source_service",
        ),
        (
            &[("source", "shop"), ("source_service", "billing")],
            source,
            "shop",
            "source first",
        ),
    ];
    for (headers, field, expected, why) in cases {
        assert_eq!(field(&event(with_headers(headers))), expected, "{why}");
    }
}

#[test]
fn envelopes_are_unwrapped_with_headers_first() {
    let value = r#"{"schema_version":"2.0.0","event_type":"order.created","aggregate_type":"order","aggregate_id":"x",
            "payload":{"total":5},"timestamp":"2026-01-01T00:00:00Z","trace_id":"env-trace","correlation_id":"env-corr"}"#;
    let e = event(normal(&raw(
        &[("trace_id", "hdr-trace"), ("event_id", "id-1")],
        value,
    )));
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
    let e = event(normal(&raw(&[("event_type", "hdr.type")], value)));
    assert_eq!(e.event_type(), "hdr.type");
    // A plain object with a payload field but no envelope keys is the payload itself.
    let e = event(normal(&raw(&[], r#"{"payload":{"x":1},"other":2}"#)));
    assert_eq!(e.payload().len(), 2);
}

#[test]
fn unparseable_messages_become_failed_rows_with_the_raw_bytes() {
    for (value, why) in [
        ("not json", "not JSON"),
        ("[1,2]", "not a JSON object"),
        ("{}", "breaks a rule"),
    ] {
        let n = normal(&raw(&[("event_id", "p-1")], value));
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
        assert_eq!(raw_of(e), value.as_bytes());
        e.validate_invariants().unwrap();
    }
    let mut r = raw(&[], "x");
    r.payload = None;
    assert!(normal(&r).is_poison());
}

#[test]
fn bad_headers_are_left_out() {
    let long = "v".repeat(600);
    let e = event(with_headers(&[
        ("ok", "1"),
        ("long", &long),
        ("OK", "dup"),
        ("ctl", "a\nb"),
    ]));
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
    let e = event(normal(&r));
    assert_eq!(e.message_id(), "e-9");
    assert_eq!(e.payload()["n"], 1);
    let r = from_json_line("garbage", 3, "file");
    assert_eq!(r.topic, "file");
    assert!(normal(&r).is_poison());
}

/// An envelope that lost its payload is poison with the reason, not a
/// bare payload whose metadata becomes the payload (and whose type
/// comes from the topic); an object with only one envelope field and
/// no payload is a bare payload (the documented rule).
#[test]
fn an_envelope_without_its_payload_is_poison() {
    for (value, why) in [
        (
            r#"{"schema_version":"1.0.0","event_type":"order.created","aggregate_id":"a-1"}"#,
            "event_type and schema_version but no payload",
        ),
        (
            r#"{"event_type":"order.created","payload":[1,2]}"#,
            "the envelope's payload is an array, not a JSON object",
        ),
        (
            r#"{"schema_version":"1.0.0","payload":null}"#,
            "the envelope's payload is null",
        ),
    ] {
        let e = poison_row(normal(&raw(&[("event_id", "x")], value)));
        assert!(
            e.last_error().unwrap().contains(why),
            "{value}: {:?}",
            e.last_error()
        );
    }
    let e = event(normal(&raw(&[], r#"{"event_type":"signup","user":"u-1"}"#)));
    assert_eq!(e.payload()["user"], "u-1");
    assert_eq!(
        e.event_type(),
        "orders",
        "the topic: no header says otherwise"
    );
}

/// A line in the sink's format without a topic is still that format
/// (its event_id header is the id); one whose key or headers are not
/// strings, or that has no value, is poison with the reason; a line
/// with other keys is a foreign message whose value is the line.
#[test]
fn sink_lines_are_read_or_refused_never_misread() {
    let r = from_json_line(
        r#"{"key":"k1","headers":{"event_id":"e-7"},"value":{"n":1}}"#,
        4,
        "file",
    );
    assert_eq!(
        (r.topic.as_str(), r.key.as_deref()),
        ("file", Some(&b"k1"[..]))
    );
    let e = event(normal(&r));
    assert_eq!(e.message_id(), "e-7");
    assert_eq!(e.payload(), json!({"n": 1}).as_object().unwrap());
    for (line, why) in [
        (
            r#"{"topic":"t","headers":{"event_id":5},"value":{"n":1}}"#,
            r#"the line's header "event_id" is a number, not a string"#,
        ),
        (
            r#"{"topic":"t","key":7,"value":{"n":1}}"#,
            "the line's key is a number, not a string",
        ),
        (
            r#"{"topic":"t","headers":["a"],"value":{"n":1}}"#,
            "the line's headers are an array, not an object",
        ),
        (r#"{"topic":"t","key":"k"}"#, "without a value"),
        (r#"{"topic":9,"value":{}}"#, "the line's topic is a number"),
    ] {
        let e = poison_row(normal(&from_json_line(line, 2, "file")));
        assert!(
            e.last_error().unwrap().contains(why),
            "{line}: {:?}",
            e.last_error()
        );
        assert_eq!(raw_of(&e), line.as_bytes(), "the line is kept as read");
    }
    let r = from_json_line(r#"{"value":{"n":1},"amount":5}"#, 1, "file");
    let e = event(normal(&r));
    assert_eq!(
        e.payload()["amount"],
        5,
        "a foreign message: the line is the payload"
    );
}

/// A poison row keeps the message's key and every header (base64 where
/// they are not text), so the message can be rebuilt from the row.
#[test]
fn poison_keeps_the_key_and_every_header() {
    let mut r = raw(&[("event_id", "p-9"), ("trace", "t-1")], "not json");
    r.key = Some(vec![0xff, 0x00, 0x01]);
    r.headers.push(("bin".into(), vec![0xc3, 0x28]));
    r.headers.push(("trace".into(), b"t-2".to_vec()));
    let e = poison_row(normal(&r));
    let p = e.payload();
    assert_eq!(p["key_base64"], "/wAB");
    assert!(p.get("key").is_none());
    assert_eq!(
        p["headers"],
        json!([
            {"name": "event_id", "value": "p-9"},
            {"name": "trace", "value": "t-1"},
            {"name": "bin", "value_base64": "wyg="},
            {"name": "trace", "value": "t-2"},
        ])
    );
    let r = raw(&[], "not json");
    let p = poison_row(normal(&r)).payload().clone();
    assert_eq!(p["key"], "k");
    assert!(p.get("headers").is_none());
}

/// Where a file source's poison came from: `stdin line N` or
/// `file:PATH line N`; a line over the limit says so, not "not JSON".
#[test]
fn file_poison_says_where_and_why() {
    let mut r = from_json_line("garbage", 3, "file");
    r.origin = Some("stdin".into());
    let e = poison_row(normal(&r));
    assert!(
        e.last_error()
            .unwrap()
            .starts_with("cannot parse message stdin line 3: "),
        "{:?}",
        e.last_error()
    );
    let mut r = from_json_line(r#"{"topic":"t","value":{"n":"#, 5, "file");
    r.origin = Some("file:in.jsonl".into());
    r.cut = Some(Truncated {
        len: 5_000_000,
        limit: 4_194_304,
        sha256: "00".into(),
    });
    let e = poison_row(normal(&r));
    assert_eq!(
        e.last_error(),
        Some(
            "cannot parse message file:in.jsonl line 5: the line is 5000000 bytes, longer than a line may be (4194304 bytes), so it was not parsed"
        )
    );
}

/// A file or stdin line without an id is identified by its content:
/// line 1 of one input no longer collides with line 1 of another.
#[test]
fn lines_without_ids_are_identified_by_content() {
    let a = from_json_line(r#"{"topic":"t","value":{"a":1}}"#, 1, "file");
    let b = from_json_line(r#"{"topic":"t","value":{"b":2}}"#, 1, "file");
    let a_again = from_json_line(r#"{"topic":"t","value":{"a":1}}"#, 7, "file");
    let (ia, ib, ia2) = (
        event(normal(&a)).message_id().to_string(),
        event(normal(&b)).message_id().to_string(),
        event(normal(&a_again)).message_id().to_string(),
    );
    assert!(ia.starts_with("sha256:") && ia.len() == 71, "{ia}");
    assert_ne!(ia, ib);
    assert_eq!(ia, ia2, "the same content is the same message");
    // Garbage lines too: two different poison lines are two rows.
    let g1 = poison_row(normal(&from_json_line("garbage", 1, "file")));
    let g2 = poison_row(normal(&from_json_line("rubbish", 1, "file")));
    assert_ne!(g1.message_id(), g2.message_id());
    // Kafka keeps its position as the id.
    let k = event(with_headers(&[]));
    assert_eq!(k.message_id(), "orders:2:41");
}

/// Poison keeps its exact bytes when the row can hold them, else a
/// prefix, the whole length and its SHA-256; bytes that are not UTF-8
/// are poison, never "repaired".
#[test]
fn poison_keeps_its_bytes_or_their_length_and_digest() {
    use base64::Engine as _;
    let bad = b"{\"a\":\"\xff\"}".to_vec();
    let mut m = raw(&[], "");
    m.payload = Some(bad.clone());
    let p = poison_row(normal(&m));
    assert_eq!(raw_of(&p), bad);
    assert_eq!(p.payload()["raw_sha256"], json!(sha256_hex(&bad)));
    let big = vec![b'x'; 3_000_000];
    m.payload = Some(big.clone());
    let p = poison_row(normal(&m));
    assert!(p.payload().get("raw_base64").is_none());
    assert_eq!(p.payload()["raw_bytes"], json!(3_000_000));
    assert_eq!(p.payload()["raw_sha256"], json!(sha256_hex(&big)));
    let prefix = base64::engine::general_purpose::STANDARD
        .decode(p.payload()["raw_prefix_base64"].as_str().unwrap())
        .unwrap();
    assert!(prefix.len() > 500_000 && big.starts_with(&prefix));
    // A value over four times the payload limit is not parsed at all.
    let mut huge = br#"{"a":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 5_000_000));
    huge.extend(br#""}"#);
    m.payload = Some(huge);
    let p = poison_row(normal(&m));
    assert!(
        p.last_error()
            .unwrap()
            .contains("more than four times the payload limit"),
        "{:?}",
        p.last_error()
    );
    assert_eq!(p.payload()["raw_bytes"], json!(5_000_008));
    // Under that bound a value is judged by its payload: 2 MB of
    // whitespace around a small object is a valid message.
    let mut padded = br#"{"a":1}"#.to_vec();
    padded.extend(std::iter::repeat_n(b' ', 2_000_000));
    m.payload = Some(padded);
    let n = normal(&m);
    assert!(!n.is_poison());
}

/// Every delivery of one message has the same event id (the handler's
/// idempotency key), a function of the consumer group and message id,
/// not a fresh UUID per delivery.
#[test]
fn the_event_id_is_the_same_for_every_delivery() {
    let d = DomainService::default();
    let m = raw(&[("message_id", "m-1")], r#"{"a":1}"#);
    let first = event(normalize(&d, &m, "billing"));
    let again = event(normalize(&d, &m, "billing"));
    assert_eq!(first.id(), again.id());
    assert_eq!(first.id(), crate::domain::inbox_event_id("billing", "m-1"));
    assert_eq!(first.id().get_version_num(), 5);
    let other_group = event(normalize(&d, &m, "audit"));
    assert_ne!(first.id(), other_group.id());
    let other_id = event(normalize(
        &d,
        &raw(&[("message_id", "m-2")], r#"{"a":1}"#),
        "billing",
    ));
    assert_ne!(first.id(), other_id.id());
}

/// An id header is never altered: one that breaks a rule makes the
/// message poison (with the reason) under its content id, so distinct
/// messages never collide; a header of control characters does not
/// panic.
#[test]
fn a_bad_id_header_makes_poison_and_never_collides() {
    let ok = event(with_headers(&[("message_id", "abcd")]));
    assert_eq!(ok.message_id(), "abcd");
    let ctl = poison_row(with_headers(&[("message_id", "ab\u{1}cd")]));
    assert_ne!(ctl.message_id(), "abcd");
    assert!(
        ctl.last_error().unwrap().contains("message_id"),
        "{:?}",
        ctl.last_error()
    );
    let only_ctl = poison_row(with_headers(&[("message_id", "\u{1}\u{2}")]));
    assert!(only_ctl.message_id().starts_with("sha256:"));
    let long_a = format!("{}a", "x".repeat(300));
    let long_b = format!("{}b", "x".repeat(300));
    let pa = poison_row(with_headers(&[("message_id", &long_a)]));
    let pb = poison_row(with_headers(&[("message_id", &long_b)]));
    assert_ne!(pa.message_id(), pb.message_id());
    let padded = poison_row(with_headers(&[("event_id", " id-1")]));
    assert!(padded.last_error().unwrap().contains("event_id"));
    let source = poison_row(with_headers(&[("source", "\u{1}")]));
    assert_eq!(source.source(), "orders");
}

/// Normalises `m` (a randomized case, named by `what`; the seed is on
/// stderr): no panic, a valid message id, and a poison row is `failed`
/// with its reason.
fn normalize_checked(d: &DomainService, m: &RawMessage, what: &str) -> Normalized {
    let n = std::panic::catch_unwind(|| normalize(d, m, "g"))
        .unwrap_or_else(|_| panic!("{what} panicked (the seed is on stderr)"));
    let row = n.event();
    assert!(
        validate::exact(
            "message_id",
            row.message_id(),
            limits::MESSAGE_ID_MAX_LENGTH
        )
        .is_ok(),
        "{what}: id {:?}",
        row.message_id()
    );
    if n.is_poison() {
        assert_eq!(row.status(), EventStatus::Failed, "{what}");
        assert!(row.last_error().is_some(), "{what}");
    }
    n
}

/// Randomized: arbitrary topics, keys, headers (ids, sources, types)
/// and values, valid or not, never panic, and every message ends as a
/// valid row or a poison row. OMNIBOX_FUZZ_CASES (default 20,000) and
/// OMNIBOX_FUZZ_SEED replay or extend it.
#[test]
fn any_message_ends_as_a_row_or_poison() {
    let (cases, mut rng) = crate::domain::testing::fuzz("normalisation fuzz", 20_000);
    let d = DomainService::default();
    let pieces: [&[u8]; 12] = [
        b"",
        b" ",
        b"\x01",
        b"\xff\xfe",
        b"id",
        b"{",
        b"}",
        b"\"",
        b"{\"a\":1}",
        b"[1]",
        b"null",
        "\u{e9}\u{1F600}".as_bytes(),
    ];
    let bytes = |rng: &mut fastrand::Rng| -> Vec<u8> {
        let mut v = Vec::new();
        match rng.u8(0..10) {
            0 => v.extend(std::iter::repeat_n(b'x', rng.usize(200..400))),
            1 => (0..rng.usize(0..40)).for_each(|_| v.push(rng.u8(..))),
            _ => (0..rng.usize(0..6))
                .for_each(|_| v.extend_from_slice(pieces[rng.usize(..pieces.len())])),
        }
        v
    };
    let names = [
        "message_id",
        "event_id",
        "source",
        "source_service",
        "event_type",
        "trace_id",
        "x",
    ];
    for case in 0..cases {
        let headers = (0..rng.usize(0..5))
            .map(|_| (names[rng.usize(..names.len())].to_string(), bytes(&mut rng)))
            .collect();
        let payload = match rng.u8(0..4) {
            0 => None,
            1 => Some(br#"{"order":1}"#.to_vec()),
            _ => Some(bytes(&mut rng)),
        };
        let m = RawMessage {
            topic: String::from_utf8_lossy(&bytes(&mut rng)).into_owned(),
            partition: rng.i32(..),
            offset: rng.i64(..),
            key: rng.bool().then(|| bytes(&mut rng)),
            headers,
            payload,
            position_is_identity: rng.bool(),
            cut: None,
            origin: None,
            defect: None,
        };
        let n = normalize_checked(&d, &m, &format!("case {case}: {m:?}"));
        let row = n.event();
        if let Some(id) = m
            .header_bytes("message_id")
            .or_else(|| m.header_bytes("event_id"))
            && !n.is_poison()
        {
            assert_eq!(
                row.message_id().as_bytes(),
                id,
                "case {case}: id altered (the seed is on stderr)"
            );
        }
    }
}

/// Randomized: any line of a file or of stdin (the sink's format with
/// fields of any type, a bare value, bytes that are not UTF-8, a cut line)
/// becomes a valid row or a poison row with its reason, never a panic.
/// OMNIBOX_FUZZ_CASES (default 20,000) and OMNIBOX_FUZZ_SEED replay or
/// extend it.
#[test]
fn any_line_ends_as_a_row_or_poison() {
    let (cases, mut rng) = crate::domain::testing::fuzz("inbox line fuzz", 20_000);
    let d = DomainService::default();
    let values = [
        "null",
        "1",
        "-1e400",
        "true",
        "\"\"",
        "\" \"",
        "\"\\u0001\"",
        "\"\\ud800\"",
        "\"k\"",
        "{}",
        "{\"order\":1}",
        "[1]",
        "{\"message_id\":\"m\",\"source\":\"s\"}",
        "{\"a\":\"\\u0000\"}",
    ];
    let keys = ["topic", "key", "headers", "value", "x"];
    for case in 0..cases {
        let mut line: Vec<u8> = match rng.u8(0..6) {
            0 => (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect(),
            1 => values[rng.usize(..values.len())].as_bytes().to_vec(),
            _ => {
                let fields: Vec<String> = (0..rng.usize(0..5))
                    .map(|_| {
                        let k = keys[rng.usize(..keys.len())];
                        let v = if k == "headers" && rng.bool() {
                            format!(
                                "{{\"message_id\":{},\"event_type\":{}}}",
                                values[rng.usize(..values.len())],
                                values[rng.usize(..values.len())]
                            )
                        } else {
                            values[rng.usize(..values.len())].to_string()
                        };
                        format!("\"{k}\":{v}")
                    })
                    .collect();
                format!("{{{}}}", fields.join(",")).into_bytes()
            }
        };
        if rng.u8(0..4) == 0 {
            line.truncate(rng.usize(0..=line.len()));
        }
        let m = from_json_bytes(&line, rng.i64(0..1_000_000), "file");
        let what = format!("case {case}: {:?}", String::from_utf8_lossy(&line));
        let n = normalize_checked(&d, &m, &what);
        if !n.is_poison() {
            assert_eq!(n.event().status(), EventStatus::Pending, "{what}");
        }
    }
}

/// A line naming a topic too long for any row (a file's lines are up to
/// 4 MiB) is poison with the topic's start, length and digest; and a
/// library's own limits too small for any poison row get one under the
/// default limits instead of a panic.
#[test]
fn poison_too_large_for_a_row_is_still_a_row() {
    let topic = "a".repeat(1_000_001);
    let line = format!(r#"{{"topic":"{topic}","value":1}}"#);
    let p = poison_row(normal(&from_json_line(&line, 3, "file")));
    let payload = p.payload();
    assert_eq!(payload["topic"].as_str().unwrap().len(), 255);
    assert_eq!(payload["topic_bytes"], 1_000_001);
    assert_eq!(payload["topic_sha256"].as_str().unwrap().len(), 64);
    assert!(p.last_error().is_some());
    let tiny = DomainService::new(
        crate::model::limits::Limits {
            payload_max_bytes: 10,
            ..Default::default()
        },
        crate::domain::Backoff::default(),
    );
    let n = normalize(&tiny, &from_json_line("garbage", 4, "file"), "g");
    assert!(n.is_poison());
    assert_eq!(n.event().status(), EventStatus::Failed);
}
