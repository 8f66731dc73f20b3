//! `omnibox publish` as a process: the embedded default, an unreachable
//! broker, SIGTERM, and kill -9 in the middle of a batch (Kafka protocol via
//! librdkafka's mock cluster, which listens on real TCP ports).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use omnibox::{DomainService, EventStore, NewOutboxEvent, OutboxEvent, OutboxStore};
use rdkafka::mocking::MockCluster;
use serde_json::json;

use common::kafka::consume;

fn omnibox(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_omnibox"));
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn events(n: usize, keys: usize) -> Vec<OutboxEvent> {
    (0..n)
        .map(|i| {
            DomainService::default()
                .create_outbox_event(NewOutboxEvent::new(
                    "order",
                    uuid::Uuid::now_v7(),
                    "order.updated",
                    "orders",
                    format!("key-{}", i % keys),
                    json!({ "n": i }),
                ))
                .unwrap()
        })
        .collect()
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(mut child: Child, limit: Duration) -> (i32, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("omnibox did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct PgEnv {
    db: common::TestDb,
}

impl PgEnv {
    async fn new() -> Option<PgEnv> {
        Some(PgEnv {
            db: common::postgres().await?,
        })
    }

    fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("OMNIBOX_DATABASE_URL", self.db.url.as_str()),
            ("OMNIBOX_DATABASE_SCHEMA", self.db.schema()),
        ]
    }
}

/// A one-broker mock cluster whose broker answers in 300 ms, its topic
/// `orders` (2 partitions), and 2,000 outbox rows of 20 keys written to it.
async fn slow_broker_and_rows(
    pg: &PgEnv,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    Vec<OutboxEvent>,
) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 2, 1).unwrap();
    cluster
        .broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();
    let all = events(2000, 20);
    pg.db.store.outbox().create_many(&all).await.unwrap();
    (cluster, all)
}

/// Reads `orders` and checks that every one of `all` is there; returns the
/// messages.
async fn every_row_on_the_topic(
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    all: &[OutboxEvent],
) -> Vec<common::kafka::Received> {
    let got = consume(
        &cluster.bootstrap_servers(),
        "orders",
        all.len(),
        Duration::from_secs(30),
    )
    .await;
    let on_topic: std::collections::HashSet<String> =
        got.iter().map(|m| m.headers["event_id"].clone()).collect();
    for e in all {
        assert!(on_topic.contains(&e.id().to_string()), "lost: {}", e.id());
    }
    got
}

#[test]
fn publish_once_to_the_default_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let line = r#"{"aggregate_type":"order","aggregate_id":"0190f1d2-7a3b-7cde-8f00-123456789abc","event_type":"order.created","topic":"orders","partition_key":"order-1","payload":{"total":12.5},"headers":{"traceparent":"00-a-b-01"}}"#;
    let mut enqueue = omnibox(d, &["enqueue", "--jsonl"], &[])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    enqueue
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{line}\n{line}\n{line}\n").as_bytes())
        .unwrap();
    assert!(enqueue.wait().unwrap().success());
    let out = omnibox(d, &["publish", "--once", "--format", "json"], &[])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["completed"], 3);
    assert_eq!(report["broker"], "file:omnibox-events.jsonl");
    let file = std::fs::read_to_string(d.join("omnibox-events.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = file
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert_eq!(l["topic"], "orders");
        assert_eq!(l["key"], "order-1");
        assert_eq!(l["headers"]["traceparent"], "00-a-b-01");
        assert_eq!(l["headers"]["event_type"], "order.created");
        assert_eq!(l["value"]["payload"]["total"], 12.5);
        assert_eq!(l["value"]["schema_version"], "1.0.0");
    }
    // Nothing left: a second run publishes nothing and appends nothing.
    let out = omnibox(d, &["publish", "--once"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("published"), "{table}");
    assert_eq!(
        std::fs::read_to_string(d.join("omnibox-events.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
}

#[test]
fn publish_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (args, needle) in [
        (
            vec!["publish", "--broker", "amqp://x"],
            "unsupported broker URL",
        ),
        (
            vec!["publish", "--lease", "500ms"],
            "--lease (500ms) must be at least 1s",
        ),
        (vec!["publish", "--worker-id", "bad id"], "contains ' '"),
        (vec!["publish", "--batch", "0"], "--batch"),
        (vec!["publish", "-X", "novalue"], "KEY=VALUE"),
        (
            vec!["publish", "--hold", "transaction"],
            "this database is SQLite",
        ),
        (vec!["publish", "--hold", "forever"], "--hold"),
    ] {
        let out = omnibox(d, &args, &[]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// The broker does not answer: no attempt is spent, the rows stay pending
/// with the reason, and `--once` says so with exit code 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_spends_no_attempt() {
    let db = common::sqlite().await;
    db.store.outbox().create_many(&events(20, 4)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = omnibox(
        dir.path(),
        &[
            "publish",
            "--once",
            "--broker",
            "kafka://127.0.0.1:1",
            "--publish-timeout",
            "2s",
            "--lease",
            "1m",
        ],
        &[("OMNIBOX_DATABASE_URL", db.url.as_str())],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the broker did not answer"), "{err}");
    let rows = db.store.outbox().list(&Default::default()).await.unwrap();
    assert!(
        rows.iter()
            .all(|e| e.attempts_made() == 0 && e.status() == omnibox::EventStatus::Pending)
    );
    assert!(rows.iter().any(|e| {
        e.last_error()
            .is_some_and(|m| m.contains("broker not answering"))
    }));
    assert_eq!(db.store.outbox().counts().await.unwrap().locked, 0);
}

/// SIGTERM in the middle of a run: the relay finishes its batch, exits 0,
/// and leaves no row locked; every completed row is on the topic. With
/// leases and with held claims (the default on PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_no_row_locked() {
    sigterm_flow("lease").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_no_row_locked_with_held_claims() {
    sigterm_flow("transaction").await;
}

async fn sigterm_flow(hold: &str) {
    let Some(pg) = PgEnv::new().await else { return };
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 2, 1).unwrap();
    cluster
        .broker_round_trip_time(1, Duration::from_millis(200))
        .unwrap();
    pg.db
        .store
        .outbox()
        .create_many(&events(3000, 50))
        .await
        .unwrap();
    let broker = format!("kafka://{}", cluster.bootstrap_servers());
    let dir = tempfile::tempdir().unwrap();
    let child = omnibox(
        dir.path(),
        &[
            "publish", "--broker", &broker, "--batch", "200", "--hold", hold,
        ],
        &pg.env(),
    )
    .spawn()
    .unwrap();
    let outbox = pg.db.store.outbox();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = outbox.counts().await.unwrap();
        // Rows in flight of a held claim show no lock: any progress will do.
        if c.completed > 0 && (c.locked > 0 || hold == "transaction") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay never got going: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "TERM");
    let (code, err) =
        tokio::task::spawn_blocking(move || wait_exit(child, Duration::from_secs(60)))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("stopping after the current batch"), "{err}");
    let c = outbox.counts().await.unwrap();
    assert_eq!(c.locked, 0, "no row left locked: {c:?}");
    assert!(c.completed < 3000, "stopped early, as asked: {c:?}");
    let got = consume(
        &cluster.bootstrap_servers(),
        "orders",
        c.completed as usize,
        Duration::from_secs(30),
    )
    .await;
    let on_topic: std::collections::HashSet<String> =
        got.iter().map(|m| m.headers["event_id"].clone()).collect();
    let completed = outbox
        .list(&omnibox::ListFilter {
            status: Some(omnibox::EventStatus::Completed),
            limit: Some(10_000),
            ..Default::default()
        })
        .await
        .unwrap();
    for e in completed {
        assert!(
            on_topic.contains(&e.id().to_string()),
            "completed but not on the topic: {}",
            e.id()
        );
    }
}

/// kill -9 in the middle of a batch of leased claims (`--hold lease`):
/// after the lease expires another relay publishes every row; none is lost.
/// (Held claims: `held_claims_survive_kill_9_and_drain_in_key_order`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_loses_nothing() {
    let Some(pg) = PgEnv::new().await else { return };
    let (cluster, all) = slow_broker_and_rows(&pg).await;
    let broker = format!("kafka://{}", cluster.bootstrap_servers());
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "publish",
        "--broker",
        &broker,
        "--batch",
        "500",
        "--lease",
        "6s",
        "--publish-timeout",
        "4s",
        "--hold",
        "lease",
    ];
    let child = omnibox(dir.path(), &args, &pg.env()).spawn().unwrap();
    let outbox = pg.db.store.outbox();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = outbox.counts().await.unwrap();
        if c.locked > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the relay never claimed: {c:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(&child, "KILL");
    let (code, _) = tokio::task::spawn_blocking(move || wait_exit(child, Duration::from_secs(10)))
        .await
        .unwrap();
    assert_ne!(code, 0);
    let left_locked = outbox.counts().await.unwrap().locked;
    assert!(left_locked > 0, "the kill landed mid-batch");
    // A second relay (same lease) takes over once the dead one's lease expires.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = omnibox(
            dir.path(),
            &[
                "publish",
                "--once",
                "--broker",
                &broker,
                "--batch",
                "500",
                "--lease",
                "6s",
                "--publish-timeout",
                "4s",
            ],
            &pg.env(),
        )
        .output()
        .unwrap();
        // Exit 1 with "did not answer" is allowed: the slowed-down mock broker
        // can time out a first batch (no attempt spent); the loop tries again.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(0) || err.contains("did not answer"),
            "{err}"
        );
        let c = outbox.counts().await.unwrap();
        if c.completed == 2000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not everything published after the lease expired: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let got = every_row_on_the_topic(&cluster, &all).await;
    eprintln!(
        "{} rows were locked by the killed relay; {} messages on the topic for 2000 events",
        left_locked,
        got.len()
    );
}

/// `--metrics-addr` serves Prometheus metrics while the relay runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_while_publishing() {
    let db = common::sqlite().await;
    // One event failed earlier and kept as a dead letter: the gauge shows it.
    let outbox = db.store.outbox();
    outbox.create(&events(1, 1).remove(0)).await.unwrap();
    let claim = outbox
        .claim(&omnibox::ClaimOptions::new(
            omnibox::WorkerId::new("earlier").unwrap(),
            1,
        ))
        .await
        .unwrap();
    let dead = &claim.events[0];
    outbox
        .fail(
            &claim.token,
            &[omnibox::Failure::dead(dead.id(), "rejected")],
        )
        .await
        .unwrap();
    omnibox::pipeline::DeadLetterStore::put(
        &db.store.dead_letters(),
        &[omnibox::pipeline::Letter {
            event: dead,
            error: "rejected",
        }],
    )
    .await
    .unwrap();
    db.store.outbox().create_many(&events(30, 3)).await.unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let child = omnibox(
        dir.path(),
        &["publish", "--broker", "null", "--metrics-addr", &addr],
        &[("OMNIBOX_DATABASE_URL", db.url.as_str())],
    )
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).await.unwrap();
            if resp.contains(
                r#"omnibox_events_completed_total{table="outbox",event_type="order.updated"} 30"#,
            ) && resp.contains(r#"omnibox_dead_letters_open{table="outbox"} 1"#)
            {
                break resp;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the 30 published events and the open dead letter"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.starts_with("HTTP/1.1 200 OK"));
    assert!(body.contains("omnibox_batch_latency_seconds"));
    signal(&child, "TERM");
    let (code, err) =
        tokio::task::spawn_blocking(move || wait_exit(child, Duration::from_secs(30)))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
}

fn enqueue_flags(
    dir: &Path,
    env: &[(&str, &str)],
    key: &str,
    n: usize,
    scheduled_at: Option<&str>,
) {
    let aggregate = format!("0190f1d2-7a3b-7cde-8f00-{n:012}");
    let payload = format!(r#"{{"n": {n}}}"#);
    let mut args = vec![
        "enqueue",
        "-q",
        "--aggregate-type",
        "order",
        "--aggregate-id",
        &aggregate,
        "--event-type",
        "order.updated",
        "--topic",
        "orders",
        "--partition-key",
        key,
        "--payload",
        &payload,
    ];
    if let Some(at) = scheduled_at {
        args.extend(["--scheduled-at", at]);
    }
    let out = omnibox(dir, &args, env).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The claim window used to stall: k#2 scheduled 30 s before k#1 filled a
/// window of 1 and `--once --batch 1` published nothing, exit 0. With the
/// stdout sink the messages are the output (one JSON line each, so `| jq`
/// works) and the summary goes to stderr.
#[test]
fn a_successor_scheduled_before_its_head_does_not_stall_publish() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let past = (omnibox::time::now() - chrono::Duration::seconds(30)).to_rfc3339();
    enqueue_flags(d, &[], "k", 1, None);
    enqueue_flags(d, &[], "k", 2, Some(&past));
    // 150 keys shaped the same way: the default batch of 100 used to publish nothing.
    for k in 0..150 {
        let key = format!("m{k}");
        enqueue_flags(d, &[], &key, 10 + 2 * k, None);
        enqueue_flags(d, &[], &key, 11 + 2 * k, Some(&past));
    }
    let out = omnibox(
        d,
        &["publish", "--once", "--batch", "1", "--broker", "stdout"],
        &[],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line: {l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 302, "every row published");
    assert!(err.contains("published"), "the summary is on stderr: {err}");
    let mut seen: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for l in &lines {
        seen.entry(l["key"].as_str().unwrap().to_string())
            .or_default()
            .push(l["value"]["payload"]["n"].as_i64().unwrap());
    }
    assert_eq!(seen["k"], vec![1, 2], "the head first");
    for (key, ns) in &seen {
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{key}: {ns:?}");
    }
}

/// `--once` relays started together drain everything: an empty claim under
/// contention is not "nothing due", and rows held by another relay are
/// that relay's to finish. One key (1,000 rows, batch 100) and 100 keys
/// (20,000 rows, batch 200), four processes each, on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_once_relays_together_drain_every_due_row() {
    let Some(pg) = PgEnv::new().await else {
        return;
    };
    for (rows, keys, batch, hold) in [
        (1000, 1, "100", "lease"),
        (20_000, 100, "200", "lease"),
        (1000, 1, "100", "transaction"),
        (5000, 100, "200", "transaction"),
    ] {
        pg.db
            .store
            .outbox()
            .create_many(&events(rows, keys))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let children: Vec<Child> = (0..4)
            .map(|i| {
                let worker = format!("relay-{i}");
                let mut env = pg.env();
                env.push(("OMNIBOX_LOG", "warn"));
                omnibox(
                    dir.path(),
                    &[
                        "publish",
                        "--once",
                        "--broker",
                        "null",
                        "--batch",
                        batch,
                        "--worker-id",
                        &worker,
                        "--hold",
                        hold,
                        "-q",
                    ],
                    &env,
                )
                .spawn()
                .unwrap()
            })
            .collect();
        for child in children {
            let (code, err) = wait_exit(child, Duration::from_secs(120));
            assert_eq!(code, 0, "{err}");
        }
        let c = pg.db.store.outbox().counts().await.unwrap();
        assert_eq!(
            (c.pending, c.locked),
            (0, 0),
            "{rows} rows in {keys} key(s), --hold {hold}: every --once relay exited with rows left: {c:?}"
        );
    }
}

/// A topic the broker does not know is named at once (not after the publish
/// timeout), its events keep their attempts, and the other topics go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_topic_is_named_and_does_not_stop_other_topics() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 1, 1).unwrap();
    cluster
        .topic_error(
            "gone",
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
    let db = common::sqlite().await;
    let mut all = Vec::new();
    for i in 0..50 {
        let mut n = NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            "order.updated",
            "gone",
            format!("g{i}"),
            json!({"n": i}),
        );
        n.max_attempts = Some(1);
        all.push(DomainService::default().create_outbox_event(n).unwrap());
    }
    all.extend(events(50, 5));
    db.store.outbox().create_many(&all).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let brokers = format!("kafka://{}", cluster.bootstrap_servers());
    let started = Instant::now();
    let out = omnibox(
        dir.path(),
        &[
            "publish",
            "--once",
            "--broker",
            &brokers,
            "--publish-timeout",
            "30s",
            "--format",
            "json",
        ],
        &[("OMNIBOX_DATABASE_URL", db.url.as_str())],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited for the publish timeout: {err}"
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(r#"topic "gone" does not exist on the broker"#),
        "{err}"
    );
    assert!(
        err.contains("create it, or enable automatic topic creation"),
        "{err}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["completed"], 50,
        "the other topic went out: {report}"
    );
    assert_eq!(report["unavailable_topics"][0]["topic"], "gone");
    for e in &all[..50] {
        let row = db.store.outbox().get(e.id()).await.unwrap().unwrap();
        assert_eq!(row.attempts_made(), 0);
        assert!(
            row.last_error().unwrap().contains("does not exist"),
            "{:?}",
            row.last_error()
        );
    }
    let orders = consume(
        &cluster.bootstrap_servers(),
        "orders",
        50,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(orders.len(), 50);
    // Past the limit, the topic's events spend attempts: they reach failed
    // (and the dead-letter topic) instead of waiting forever.
    let mut status = Vec::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = omnibox(
            dir.path(),
            &[
                "publish",
                "--once",
                "--broker",
                &brokers,
                "--topic-unavailable-limit",
                "0s",
                "--dlq-topic",
                "orders",
            ],
            &[("OMNIBOX_DATABASE_URL", db.url.as_str())],
        )
        .output()
        .unwrap();
        assert_ne!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        status = Vec::new();
        for e in &all[..50] {
            status.push(db.store.outbox().get(e.id()).await.unwrap().unwrap());
        }
        if status
            .iter()
            .all(|r| r.status() == omnibox::EventStatus::Failed)
        {
            break;
        }
    }
    for r in &status {
        assert_eq!(
            r.status(),
            omnibox::EventStatus::Failed,
            "{:?}",
            r.last_error()
        );
        assert!(
            r.last_error().unwrap().contains("longer than the limit"),
            "{:?}",
            r.last_error()
        );
    }
}

/// The README's SQL contract for services in other languages: the
/// `INSERT INTO outbox_events` its tutorial shows, run exactly as written
/// (only the columns it names; id from `gen_random_uuid()`, the rest left to
/// the table's defaults), in one transaction with a business row, is a
/// pending row with the documented defaults, and `omnibox publish` relays
/// it with its topic, key and payload. (The README shows SQL for PostgreSQL
/// only: SQLite's tables have no defaults for the id and the timestamps.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_sql_insert_is_published() {
    let Some(pg) = PgEnv::new().await else { return };
    let readme: &'static str = include_str!("../README.md");
    let snippet = readme
        .split("```sql\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("INSERT INTO outbox_events"))
        .expect("the README shows an INSERT INTO outbox_events in a sql block");
    let omnibox::AnyStore::Postgres(store) = &pg.db.store else {
        unreachable!("a PostgreSQL test database")
    };
    // The business table the snippet writes to is the service's own.
    sqlx::query("CREATE TABLE orders (id uuid PRIMARY KEY, total numeric NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::raw_sql(snippet)
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("the README's SQL fails: {e}\n{snippet}"));

    use sqlx::Row;
    let row = sqlx::query(
        "SELECT id, status, attempts_made, max_attempts, scheduled_at <= now() AS due, \
         headers IS NULL AS no_headers, payload_bytes IS NULL AS unsized, \
         (SELECT count(*) FROM orders) AS orders FROM outbox_events",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    let id: uuid::Uuid = row.get("id");
    assert_eq!(row.get::<String, _>("status"), "pending");
    assert_eq!(row.get::<i32, _>("attempts_made"), 0);
    assert_eq!(row.get::<i32, _>("max_attempts"), 6);
    assert!(row.get::<bool, _>("due"), "scheduled_at defaults to now()");
    assert!(row.get::<bool, _>("no_headers"));
    assert!(row.get::<bool, _>("unsized"), "payload_bytes is left NULL");
    assert_eq!(
        row.get::<i64, _>("orders"),
        1,
        "the business row commits with it"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = omnibox(
        dir.path(),
        &[
            "publish",
            "--once",
            "--broker",
            "file:published.jsonl",
            "--format",
            "json",
        ],
        &pg.env(),
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
    assert_eq!(report["completed"], 1, "{report}");
    let published = std::fs::read_to_string(dir.path().join("published.jsonl")).unwrap();
    let messages: Vec<serde_json::Value> = published
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(messages.len(), 1, "{published}");
    let m = &messages[0];
    let order_id = "0190f1d2-7a3b-7cde-8f00-123456789abc";
    assert_eq!(m["topic"], "orders", "{m}");
    assert_eq!(m["key"], order_id, "{m}");
    assert_eq!(
        m["value"]["payload"],
        json!({"order_id": order_id, "total": 12.5}),
        "{m}"
    );
    assert_eq!(m["value"]["event_type"], "order.created");
    assert_eq!(m["value"]["aggregate_type"], "order");
    assert_eq!(m["value"]["aggregate_id"], order_id);
    assert_eq!(
        m["value"]["schema_version"], "1.0.0",
        "the documented default"
    );
    assert_eq!(m["headers"]["event_id"], id.to_string());
    assert_eq!(m["headers"]["event_type"], "order.created");
    let row = pg.db.store.outbox().get(id).await.unwrap().unwrap();
    assert_eq!(row.status(), omnibox::EventStatus::Completed);
}

/// A row written by SQL whose headers hold non-string values is published
/// with each such value as its JSON text, beside the rows after it: one
/// such row does not stop the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_non_string_header_values_are_published() {
    let Some(pg) = PgEnv::new().await else { return };
    let omnibox::AnyStore::Postgres(store) = &pg.db.store else {
        unreachable!("a PostgreSQL test database")
    };
    for (key, headers) in [
        (
            "k1",
            r#"{"retries": 3, "urgent": true, "note": null, "tags": ["a"], "source": "sql"}"#,
        ),
        ("k2", r#"{"source": "sql"}"#),
    ] {
        sqlx::query(
            "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, topic, \
             partition_key, payload, headers) \
             VALUES (gen_random_uuid(), 'order', gen_random_uuid(), 'order.created', 'orders', $1, \
             '{\"n\": 1}', $2::jsonb)",
        )
        .bind(key)
        .bind(headers)
        .execute(store.pool())
        .await
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = omnibox(
        dir.path(),
        &[
            "publish",
            "--once",
            "--broker",
            "file:published.jsonl",
            "--format",
            "json",
        ],
        &pg.env(),
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let published = std::fs::read_to_string(dir.path().join("published.jsonl")).unwrap();
    let messages: Vec<serde_json::Value> = published
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(messages.len(), 2, "{published}");
    let m = messages
        .iter()
        .find(|m| m["key"] == "k1")
        .expect("k1 published");
    assert_eq!(m["headers"]["retries"], "3", "{m}");
    assert_eq!(m["headers"]["urgent"], "true", "{m}");
    assert_eq!(m["headers"]["note"], "null", "{m}");
    assert_eq!(m["headers"]["tags"], r#"["a"]"#, "{m}");
    assert_eq!(m["headers"]["source"], "sql", "{m}");
    assert!(messages.iter().any(|m| m["key"] == "k2"), "{published}");
}

/// `--hold transaction`: the rows a relay holds are row locks of its open
/// transactions, so a relay killed with -9 frees them at once (the lease of
/// 10 minutes is never waited out), nothing is lost, and several such relays
/// drain a table together, each key's events in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_claims_survive_kill_9_and_drain_in_key_order() {
    let Some(pg) = PgEnv::new().await else { return };
    let (cluster, all) = slow_broker_and_rows(&pg).await;
    let broker = format!("kafka://{}", cluster.bootstrap_servers());
    let dir = tempfile::tempdir().unwrap();
    let held = [
        "--hold",
        "transaction",
        "--broker",
        &broker,
        "--batch",
        "500",
        "--lease",
        "10m",
        "--publish-timeout",
        "4s",
    ];
    let mut args = vec!["publish"];
    args.extend(held);
    let child = omnibox(dir.path(), &args, &pg.env()).spawn().unwrap();
    // Held rows stay pending and unmarked: wait for the relay to have a
    // claim open (a transaction idle while its batch is published).
    let pool = match &pg.db.store {
        omnibox::store::AnyStore::Postgres(s) => s.pool().clone(),
        _ => unreachable!(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND state = 'idle in transaction'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if open > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the relay never held a claim");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&child, "KILL");
    let (code, _) = tokio::task::spawn_blocking(move || wait_exit(child, Duration::from_secs(10)))
        .await
        .unwrap();
    assert_ne!(code, 0);
    let outbox = pg.db.store.outbox();
    assert_eq!(
        outbox.counts().await.unwrap().locked,
        0,
        "no lease was written"
    );
    // Two relays together finish, long before any lease could run out.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let children: Vec<Child> = (0..2)
            .map(|i| {
                let worker = format!("held-{i}");
                let mut args = vec!["publish", "--once", "--worker-id", &worker];
                args.extend(held);
                omnibox(dir.path(), &args, &pg.env()).spawn().unwrap()
            })
            .collect();
        for child in children {
            let (code, err) =
                tokio::task::spawn_blocking(move || wait_exit(child, Duration::from_secs(120)))
                    .await
                    .unwrap();
            // Exit 1 with "did not answer" is allowed: the slowed-down mock
            // broker can time out a batch (no attempt spent); the loop goes on.
            assert!(code == 0 || err.contains("did not answer"), "{err}");
        }
        let c = outbox.counts().await.unwrap();
        if c.completed == 2000 {
            break;
        }
        assert!(Instant::now() < deadline, "not everything published: {c:?}");
    }
    let got = every_row_on_the_topic(&cluster, &all).await;
    // Each key's events reach its partition in order (a redelivery after
    // the kill may repeat an earlier run, never jump ahead of it).
    let mut last: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for m in &got {
        let n = m.value["payload"]["n"].as_i64().unwrap();
        let prev = last.insert(m.key.clone(), n);
        if let Some(prev) = prev {
            assert!(
                n > prev || redelivered(&got, &m.key, n),
                "{}: {n} after {prev}",
                m.key
            );
        }
    }
}

/// True when the message `n` of `key` is on the topic more than once.
fn redelivered(got: &[common::kafka::Received], key: &str, n: i64) -> bool {
    got.iter()
        .filter(|m| m.key == key && m.value["payload"]["n"].as_i64() == Some(n))
        .count()
        > 1
}
