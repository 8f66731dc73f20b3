//! End to end against tansu, a real Kafka-protocol broker process:
//! `omnibox publish` processes, PostgreSQL, and a broker that goes away.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use omnibox::{DomainService, EventStatus, EventStore, NewOutboxEvent, OutboxEvent, OutboxStore};
use serde_json::json;

use common::kafka::consume;
use common::tansu::{Tansu, create_topic, shared_brokers};

fn events(topic: &str, n: usize, keys: usize) -> Vec<OutboxEvent> {
    (0..n)
        .map(|i| {
            let mut e = NewOutboxEvent::new(
                "order",
                uuid::Uuid::now_v7(),
                "order.updated",
                topic,
                format!("key-{}", i % keys),
                json!({ "n": i }),
            );
            e.headers = Some(
                [(
                    "traceparent".to_string(),
                    format!("00-{i:032x}-{i:016x}-01"),
                )]
                .into(),
            );
            DomainService::default().create_outbox_event(e).unwrap()
        })
        .collect()
}

async fn pg() -> Option<(common::TestDb, String)> {
    let db = common::postgres().await?;
    let schema = db.schema().to_string();
    Some((db, schema))
}

fn publish(dir: &Path, db: &common::TestDb, schema: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_omnibox"));
    cmd.arg("publish")
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("NO_COLOR", "1")
        .env("OMNIBOX_DATABASE_URL", &db.url)
        .env("OMNIBOX_DATABASE_SCHEMA", schema)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn topic_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Every row arrives once, with its key, headers and envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_delivers_every_row_to_tansu() {
    let Some(brokers) = shared_brokers() else {
        return;
    };
    let Some((db, schema)) = pg().await else {
        return;
    };
    let topic = topic_name("orders");
    create_topic(&brokers, &topic, 3).await;
    let all = events(&topic, 2000, 20);
    db.store.outbox().create_many(&all).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = format!("kafka://{brokers}");
    let out = publish(
        dir.path(),
        &db,
        &schema,
        &[
            "--once", "--broker", &broker, "--batch", "500", "--format", "json",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["completed"], 2000);
    let got = consume(&brokers, &topic, 2000, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 2000);
    let by_id: HashMap<String, &common::kafka::Received> = got
        .iter()
        .map(|m| (m.headers["event_id"].clone(), m))
        .collect();
    assert_eq!(by_id.len(), 2000);
    for e in &all {
        let m = by_id[&e.id().to_string()];
        assert_eq!(m.key, e.partition_key());
        assert_eq!(m.headers["traceparent"], e.header("traceparent").unwrap());
        assert_eq!(m.headers["event_type"], "order.updated");
        assert_eq!(m.value["payload"]["n"], e.payload()["n"]);
        assert_eq!(m.value["aggregate_id"], e.aggregate_id().to_string());
    }
}

/// An event at the payload limit (1,000,000 bytes) is published whole,
/// although its record passes librdkafka's default limit of 1,000,000
/// bytes; one whose headers take its record past the producer's limit is
/// a rejection that says the record's size, the limits and what to change,
/// and spends one attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_at_the_payload_limit_is_published_whole() {
    let Some(brokers) = shared_brokers() else {
        return;
    };
    let Some((db, schema)) = pg().await else {
        return;
    };
    let topic = topic_name("large");
    create_topic(&brokers, &topic, 1).await;
    let payload = json!({ "d": "x".repeat(1_000_000 - 8) });
    assert_eq!(serde_json::to_string(&payload).unwrap().len(), 1_000_000);
    let make = |key: &str, headers: usize| {
        let mut e = NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            "order.updated",
            &topic,
            key,
            payload.clone(),
        );
        e.headers = Some(
            (0..headers)
                .map(|i| (format!("h{i:0>63}"), "v".repeat(512)))
                .collect(),
        );
        DomainService::default().create_outbox_event(e).unwrap()
    };
    let fits = make("fits", 20);
    let too_large = make("too-large", 100);
    db.store
        .outbox()
        .create_many(&[fits.clone(), too_large.clone()])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = format!("kafka://{brokers}");
    let out = publish(
        dir.path(),
        &db,
        &schema,
        &["--once", "--broker", &broker, "--format", "json"],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(report["completed"], 1, "{report} {stderr}");
    assert_eq!(report["retrying"], 1, "{report} {stderr}");
    let got = consume(&brokers, &topic, 1, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].key, "fits");
    assert_eq!(got[0].headers["event_id"], fits.id().to_string());
    assert_eq!(got[0].value["payload"], payload);
    let outbox = db.store.outbox();
    let row = outbox.get(fits.id()).await.unwrap().unwrap();
    assert_eq!(row.status(), EventStatus::Completed);
    let row = outbox.get(too_large.id()).await.unwrap().unwrap();
    assert_eq!(row.status(), EventStatus::Pending);
    assert_eq!(row.attempts_made(), 1);
    let error = row.last_error().unwrap();
    assert!(
        error.contains("Message size too large")
            && error.contains("message.max.bytes (1048576)")
            && error.contains("-X message.max.bytes=N"),
        "{error}"
    );
}

/// Four relay processes over 20,000 rows in 100 keys: each key's events are
/// on the topic in insertion order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_keep_each_keys_order_on_tansu() {
    let Some(brokers) = shared_brokers() else {
        return;
    };
    let Some((db, schema)) = pg().await else {
        return;
    };
    let topic = topic_name("ordered");
    create_topic(&brokers, &topic, 4).await;
    db.store
        .outbox()
        .create_many(&events(&topic, 20_000, 100))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = format!("kafka://{brokers}");
    let relays: Vec<_> = (0..4)
        .map(|i| {
            publish(
                dir.path(),
                &db,
                &schema,
                &[
                    "--once",
                    "--broker",
                    &broker,
                    "--batch",
                    "1000",
                    "--worker-id",
                    &format!("relay-{i}"),
                ],
            )
            .spawn()
            .unwrap()
        })
        .collect();
    for r in relays {
        let out = r.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A relay's --once ends at its first empty claim, which can come while
    // another holds the keys: drain the rest.
    let deadline = Instant::now() + Duration::from_secs(120);
    while db.store.outbox().counts().await.unwrap().completed < 20_000 {
        let out = publish(
            dir.path(),
            &db,
            &schema,
            &["--once", "--broker", &broker, "--batch", "1000"],
        )
        .output()
        .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(Instant::now() < deadline);
    }
    let mut got = consume(&brokers, &topic, 20_000, Duration::from_secs(120)).await;
    assert_eq!(got.len(), 20_000, "every event exactly once");
    got.sort_by_key(|m| (m.partition, m.offset));
    let mut last: HashMap<String, u64> = HashMap::new();
    for m in &got {
        let n = m.value["payload"]["n"].as_u64().unwrap();
        if let Some(prev) = last.insert(m.key.clone(), n) {
            assert!(
                prev < n,
                "key {}: event {n} is on the topic after event {prev}",
                m.key
            );
        }
    }
    assert_eq!(last.len(), 100);
}

/// The broker is down for 30 s: no attempt is spent, and everything is
/// delivered after it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_30_seconds_spends_no_attempts() {
    let Some(mut tansu) = Tansu::start().await else {
        return;
    };
    let Some((db, schema)) = pg().await else {
        return;
    };
    let brokers = tansu.brokers();
    let topic = topic_name("outage");
    create_topic(&brokers, &topic, 2).await;
    let all = events(&topic, 1000, 10);
    db.store.outbox().create_many(&all).await.unwrap();
    tansu.kill();
    let dir = tempfile::tempdir().unwrap();
    let broker = format!("kafka://{brokers}");
    let relay = common::KillOnDrop::new(
        publish(
            dir.path(),
            &db,
            &schema,
            &[
                "--broker",
                &broker,
                "--batch",
                "200",
                "--publish-timeout",
                "5s",
            ],
        )
        .spawn()
        .unwrap(),
    );
    let down = Instant::now();
    let outbox = db.store.outbox();
    let everything = omnibox::ListFilter {
        limit: Some(5000),
        ..Default::default()
    };
    // The relay meets the outage (its transient error is recorded) ...
    let deadline = down + Duration::from_secs(30);
    loop {
        let rows = outbox.list(&everything).await.unwrap();
        if rows.iter().any(|e| {
            e.last_error()
                .is_some_and(|m| m.contains("broker not answering"))
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay recorded no transient failure in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ... and the broker stays down for the 30 s the scenario is about
    // (many retries of the relay), a span of time rather than a condition.
    tokio::time::sleep_until((down + Duration::from_secs(30)).into()).await;
    let rows = outbox.list(&everything).await.unwrap();
    assert_eq!(
        rows.iter()
            .filter(|e| e.status() == EventStatus::Completed)
            .count(),
        0
    );
    assert!(
        rows.iter().all(|e| e.attempts_made() == 0),
        "the outage spent attempts"
    );
    assert!(rows.iter().any(|e| {
        e.last_error()
            .is_some_and(|m| m.contains("broker not answering"))
    }));
    tansu.restart().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while outbox.counts().await.unwrap().completed < 1000 {
        assert!(
            Instant::now() < deadline,
            "not delivered after the broker returned: {:?}",
            outbox.counts().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(relay.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let out = relay.take().wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = outbox.list(&everything).await.unwrap();
    assert!(
        rows.iter().all(|e| e.attempts_made() == 0),
        "no attempt spent"
    );
    assert_eq!(outbox.counts().await.unwrap().locked, 0);
    let got = consume(&brokers, &topic, 1000, Duration::from_secs(60)).await;
    let ids: HashSet<String> = got.iter().map(|m| m.headers["event_id"].clone()).collect();
    for e in &all {
        assert!(ids.contains(&e.id().to_string()), "lost {}", e.id());
    }
}

/// A relay whose producer was connected before the broker restarted keeps
/// publishing after it: the producer state the broker lost is not taken for
/// silence, no attempt is spent, nothing is lost, one warning per outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_relay_continues_after_a_broker_restart() {
    let Some(mut tansu) = Tansu::start().await else {
        return;
    };
    let Some((db, schema)) = pg().await else {
        return;
    };
    let brokers = tansu.brokers();
    let topic = topic_name("restart");
    create_topic(&brokers, &topic, 2).await;
    let before = events(&topic, 500, 10);
    let outbox = db.store.outbox();
    outbox.create_many(&before).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = format!("kafka://{brokers}");
    let relay = common::KillOnDrop::new(
        publish(
            dir.path(),
            &db,
            &schema,
            &[
                "--broker",
                &broker,
                "--batch",
                "200",
                "--publish-timeout",
                "5s",
                "--poll-interval",
                "200ms",
                "-v",
            ],
        )
        .stderr(std::fs::File::create(dir.path().join("relay.log")).unwrap())
        .spawn()
        .unwrap(),
    );
    let log = dir.path().join("relay.log");
    let wait_completed = |n: u64, limit: Duration| {
        let outbox = outbox.clone();
        let log = log.clone();
        async move {
            let deadline = Instant::now() + limit;
            loop {
                let c = outbox.counts().await.unwrap();
                if c.completed >= n {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{n} not completed in {limit:?}: {c:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The producer is connected and has its producer id.
    wait_completed(500, Duration::from_secs(60)).await;
    tansu.stop();
    let during = events(&topic, 300, 10);
    outbox.create_many(&during).await.unwrap();
    // The broker stays down 8 s with rows waiting: the outage is a span
    // of time (the producer's reconnect backoff grows through it), not a
    // condition to poll for.
    tokio::time::sleep(Duration::from_secs(8)).await;
    tansu.start_again().await;
    let after = events(&topic, 2000, 10);
    outbox.create_many(&after).await.unwrap();
    let restarted = Instant::now();
    wait_completed(2800, Duration::from_secs(90)).await;
    eprintln!("delivered after the restart in {:?}", restarted.elapsed());
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(relay.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let out = relay.take().wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let rows = outbox
        .list(&omnibox::ListFilter {
            limit: Some(5000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        rows.iter().all(|e| e.attempts_made() == 0),
        "the restart spent attempts"
    );
    assert_eq!(outbox.counts().await.unwrap().locked, 0);
    eprintln!("{stderr}");
    // One warning when it began, and one line at the same level when it ended.
    assert_eq!(
        stderr.matches("downstream answering again").count(),
        1,
        "{stderr}"
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && !l.contains("downstream answering again"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning per outage:\n{stderr}");
    assert!(
        warnings[0].contains("downstream not answering")
            && warnings[0].contains("no Kafka broker reachable"),
        "the warning says why:\n{stderr}"
    );
    assert!(stderr.contains("downstream answering again"), "{stderr}");
    let got = consume(&brokers, &topic, 2800, Duration::from_secs(90)).await;
    let ids: HashSet<String> = got.iter().map(|m| m.headers["event_id"].clone()).collect();
    for e in before.iter().chain(&during).chain(&after) {
        assert!(ids.contains(&e.id().to_string()), "lost {}", e.id());
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// A SCRAM-SHA-256 credential as a broker stores it (RFC 5802, RFC 7677):
/// (stored key, server key).
fn scram_sha256(password: &str, salt: &[u8], iterations: u32) -> ([u8; 32], [u8; 32]) {
    use sha2::{Digest, Sha256};
    let mut u = hmac_sha256(password.as_bytes(), &[salt, &1u32.to_be_bytes()].concat());
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac_sha256(password.as_bytes(), &u);
        for (s, b) in salted.iter_mut().zip(u) {
            *s ^= b;
        }
    }
    let client_key = hmac_sha256(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    (stored_key, hmac_sha256(&salted, b"Server Key"))
}

/// SASL/SCRAM-SHA-256 through the shortcut flags against a broker that
/// requires authentication: a wrong password publishes nothing, spends no
/// attempt and says why (without the password); the right one publishes,
/// and `inbox consume` reads the topic back with the same flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_against_a_broker_that_requires_it() {
    let Some(tansu) = Tansu::start_with(&["--authentication"]).await else {
        return;
    };
    let Some((db, schema)) = pg().await else {
        return;
    };
    let (user, password) = ("relay", "correct horse battery staple");
    let salt = b"omnibox-test-salt";
    let (stored, server) = scram_sha256(password, salt, 4096);
    let broker_db = sqlx::SqlitePool::connect(&format!("sqlite://{}", tansu.database().display()))
        .await
        .unwrap();
    let mut inserted = 0;
    for _ in 0..100 {
        // The broker writes its cluster row at start.
        inserted = sqlx::query(
            "INSERT INTO scram_credential (cluster, username, mechanism, salt, iterations, stored_key, server_key) \
             SELECT c.id, ?, 1, ?, 4096, ?, ? FROM cluster c",
        )
        .bind(user)
        .bind(&salt[..])
        .bind(&stored[..])
        .bind(&server[..])
        .execute(&broker_db)
        .await
        .map(|r| r.rows_affected())
        .unwrap_or(0);
        if inserted > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(inserted, 1, "the SCRAM credential was stored");
    let brokers = tansu.brokers();
    let topic = topic_name("sasl");
    common::tansu::create_topic_with(
        &brokers,
        &topic,
        1,
        &[
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "SCRAM-SHA-256"),
            ("sasl.username", user),
            ("sasl.password", password),
        ],
    )
    .await;
    let all = events(&topic, 20, 5);
    let outbox = db.store.outbox();
    outbox.create_many(&all).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = format!("kafka://{brokers}");
    let sasl = [
        "--kafka-sasl-mechanism",
        "SCRAM-SHA-256",
        "--kafka-sasl-username",
        user,
    ];
    let mut args = vec!["--once", "--broker", &broker, "--publish-timeout", "5s"];
    args.extend(sasl);
    let out = publish(dir.path(), &db, &schema, &args)
        .env("OMNIBOX_KAFKA_SASL_PASSWORD", "wrong password")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    eprintln!("{stderr}");
    assert!(stderr.contains("uthentication"), "says why: {stderr}");
    assert!(!stderr.contains("wrong password"), "{stderr}");
    assert_eq!(outbox.counts().await.unwrap().completed, 0);
    let rows = outbox.list(&omnibox::ListFilter::default()).await.unwrap();
    assert!(
        rows.iter().all(|e| e.attempts_made() == 0),
        "no attempt spent"
    );

    // The rows are due again a second after the transient failure.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = publish(dir.path(), &db, &schema, &args)
        .env("OMNIBOX_KAFKA_SASL_PASSWORD", password)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(outbox.counts().await.unwrap().completed, 20);

    let mut consume = Command::new(env!("CARGO_BIN_EXE_omnibox"));
    consume
        .args(["inbox", "consume", "--from", &broker, "--topic", &topic])
        .args(["--group", "audit", "--once", "--format", "json"])
        .args(sasl)
        .current_dir(dir.path())
        .env_clear()
        .env("OMNIBOX_DATABASE_URL", &db.url)
        .env("OMNIBOX_DATABASE_SCHEMA", &schema)
        .env("OMNIBOX_KAFKA_SASL_PASSWORD", password)
        .stdin(Stdio::null());
    let out = consume.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stored"], 20, "{report}");
}
