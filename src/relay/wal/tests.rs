use super::*;

#[test]
fn positions_round_trip() {
    for (text, n) in [
        ("0/0", 0u64),
        ("16/B374D848", 0x16_B374_D848),
        ("FFFFFFFF/FFFFFFFF", u64::MAX),
    ] {
        assert_eq!(parse_lsn(text), Some(n));
        assert_eq!(format_lsn(n), text);
    }
    for bad in ["", "0", "/", "x/1", "1/", "100000000/0", "1/2/3"] {
        assert_eq!(parse_lsn(bad), None, "{bad}");
    }
}

#[test]
fn names_are_checked() {
    check_name("slot", "omnibox_outbox").unwrap();
    check_name("slot", "_a1").unwrap();
    for bad in ["", "A", "1a", "a-b", "a;drop", &"a".repeat(64)] {
        assert!(check_name("slot", bad).is_err(), "{bad}");
    }
}

#[test]
fn urls_become_replication_settings() {
    let o = WalOptions::default();
    let c = replication_config(
        "postgres://u%40x:p%2Fw@db.example:6543/app?sslmode=verify-full&sslrootcert=/ca.pem",
        &o,
        7,
    )
    .unwrap();
    let shown = c.display_connection();
    assert!(shown.contains("db.example"), "{shown}");
    assert!(!shown.contains("p/w"), "no password shown: {shown}");
    for bad in [
        "mysql://h/db",
        "postgres://h/db?sslmode=bogus",
        "postgres://h:1/db?port=x",
        "not a url",
    ] {
        let e = replication_config(bad, &o, 0).unwrap_err().to_string();
        assert!(e.starts_with("invalid PostgreSQL URL"), "{e}");
    }
}

/// A pgoutput Relation message for `schema.outbox_events` (OID 16384)
/// with the three columns the relay reads, as text.
fn outbox_relation(schema: &str) -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend(16384u32.to_be_bytes());
    for name in [schema, "outbox_events"] {
        m.extend(name.as_bytes());
        m.push(0);
    }
    m.push(b'd');
    m.extend(3u16.to_be_bytes());
    for name in ["id", "topic", "partition_key"] {
        m.push(0);
        m.extend(name.as_bytes());
        m.push(0);
        m.extend(25u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
    }
    m
}

/// The stream is outside input: whatever bytes arrive, decoding
/// answers a row, nothing or an error, and never panics. Seeded
/// (`OMNIBOX_WAL_FUZZ_SEED` replays one seed, `OMNIBOX_WAL_FUZZ_CASES`
/// sets the budget).
#[test]
fn decoding_arbitrary_bytes_never_panics() {
    let seed: u64 = std::env::var("OMNIBOX_WAL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let cases: usize = std::env::var("OMNIBOX_WAL_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let mut rng = fastrand::Rng::with_seed(seed);
    // A valid Relation for the outbox first, so inserts reach the row
    // decoding, then messages of every type with random bodies.
    let relation = outbox_relation("public");
    for case in 0..cases {
        let mut decoder = PgOutputDecoder::with_protocol_version(1);
        let _ = decode(
            &mut decoder,
            bytes::Bytes::from(relation.clone()),
            1,
            "public",
        );
        let kinds = b"RIBCUDTYOMKk";
        let mut msg = vec![kinds[rng.usize(..kinds.len())]];
        if rng.bool() {
            msg.extend(16384u32.to_be_bytes());
            msg.push(b'N');
        }
        let n = rng.usize(0..64);
        msg.extend((0..n).map(|_| rng.u8(..)));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode(&mut decoder, bytes::Bytes::from(msg.clone()), 2, "public")
        }));
        assert!(
            result.is_ok(),
            "case {case} of seed {seed} panicked on {msg:?} (OMNIBOX_WAL_FUZZ_SEED={seed})"
        );
    }
}

#[test]
fn a_well_formed_insert_is_read() {
    let mut decoder = PgOutputDecoder::with_protocol_version(1);
    assert_eq!(
        decode(
            &mut decoder,
            bytes::Bytes::from(outbox_relation("s1")),
            1,
            "s1"
        )
        .unwrap(),
        None
    );
    let id = Uuid::now_v7().to_string();
    let mut insert = vec![b'I'];
    insert.extend(16384u32.to_be_bytes());
    insert.push(b'N');
    insert.extend(3u16.to_be_bytes());
    for value in [id.as_str(), "orders", "k1"] {
        insert.push(b't');
        insert.extend((value.len() as u32).to_be_bytes());
        insert.extend(value.as_bytes());
    }
    let row = decode(&mut decoder, bytes::Bytes::from(insert.clone()), 2, "s1")
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            row.id.to_string(),
            row.topic.as_str(),
            row.partition_key.as_str()
        ),
        (id.clone(), "orders", "k1")
    );
    // Another schema's outbox is not this relay's.
    assert_eq!(
        decode(&mut decoder, bytes::Bytes::from(insert), 3, "s2").unwrap(),
        None
    );
    // An insert for a relation never described is an error, not a row
    // dropped.
    let mut unknown = vec![b'I'];
    unknown.extend(999u32.to_be_bytes());
    unknown.push(b'N');
    unknown.extend(0u16.to_be_bytes());
    let e = decode(&mut decoder, bytes::Bytes::from(unknown), 4, "s1").unwrap_err();
    assert!(e.to_string().contains("had not described"), "{e}");
}

#[test]
fn percent_decoding() {
    assert_eq!(percent_decode("a%2Fb%40").as_deref(), Some("a/b@"));
    assert_eq!(percent_decode("%").as_deref(), Some("%"));
    assert_eq!(percent_decode("%zz").as_deref(), Some("%zz"));
    assert_eq!(percent_decode("%ff"), None);
}

/// A server that accepts the replication connection and never answers is
/// given up on after CONNECT_WAIT (the stream is then retried), not
/// waited for in silence.
#[tokio::test]
async fn a_server_that_never_answers_is_given_up_on() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // The server reads what the client sends and answers nothing; it
    // reports when the client's side is closed.
    let held = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let cfg =
        ReplicationConfig::new("127.0.0.1", "u", "p", "db", "slot", "publication").with_port(port);
    let feed = crate::pipeline::KeyFeed::new(Duration::from_secs(3600), 0);
    let mut acked = feed.acked();
    let (_stop, mut shutdown) = watch::channel(false);
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        read(cfg, "s", &feed, &mut acked, &mut shutdown, &mut false),
    )
    .await
    .expect("read gives up on its own");
    match r {
        Err(Read::Broken(e, false)) => assert!(e.contains("did not start the stream"), "{e}"),
        other => panic!("not a broken stream: {}", matches!(other, Ok(()))),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // The connection given up on is closed, not left behind.
    tokio::time::timeout(Duration::from_secs(3), held)
        .await
        .expect("the client's socket is closed")
        .unwrap();
}

#[test]
fn a_stream_failure_is_said_once_per_kind() {
    let mut said = None;
    let io = "io error: Connection refused (os error 111)";
    assert!(first_of_kind(
        &mut said,
        "broke",
        "io error: EOF while reading"
    ));
    assert!(!first_of_kind(&mut said, "broke", io));
    assert!(!first_of_kind(
        &mut said,
        "broke",
        "FATAL: the database system is starting up (SQLSTATE 57P03)"
    ));
    // The slot dropped meanwhile: said, once.
    let missing = "ERROR: replication slot \"s\" does not exist (SQLSTATE 42704)";
    assert!(first_of_kind(&mut said, "refused", missing));
    assert!(!first_of_kind(&mut said, "refused", missing));
    let lost = "ERROR: can no longer get changes from replication slot \"s\" (SQLSTATE 55000)";
    assert!(first_of_kind(&mut said, "broke", lost));
    assert!(!first_of_kind(&mut said, "broke", lost));
    assert!(first_of_kind(&mut said, "broke", io));
}
