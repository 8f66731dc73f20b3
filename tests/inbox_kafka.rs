//! The inbox consumer through the Kafka protocol: librdkafka's mock cluster
//! (consumer groups and committed offsets work on it) and tansu.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omnibox::inbox::{AckStrategy, ConsumeOptions, InboxConsumer, KafkaSource};
use omnibox::pipeline::Outcome;
use omnibox::{EventStore, InboxEvent, InboxStore, WorkerId};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;

/// Produces `n` distinct messages plus a repeat of every other one.
async fn produce(brokers: &str, topic: &str, n: usize) -> usize {
    produce_from(brokers, topic, 0, n).await
}

/// As [`produce`], ids from `evt-{from}`.
async fn produce_from(brokers: &str, topic: &str, from: usize, n: usize) -> usize {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    let mut sent = 0;
    for i in (from..from + n).chain((from..from + n).step_by(2)) {
        let id = format!("evt-{i}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event_id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "event_type",
                value: Some("order.created"),
            });
        let value = format!(
            r#"{{"schema_version":"1.0.0","event_type":"order.created","payload":{{"n":{i}}}}}"#
        );
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&id)
                    .payload(&value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        sent += 1;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_group_exactly_once_and_resume() {
    let db = common::sqlite().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let sent = produce(&brokers, "orders", 200).await;
    assert_eq!(sent, 300);
    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::new(Mutex::new(HashMap::new()));
    let c = calls.clone();
    let handler = Arc::new(move |e: InboxEvent| {
        let c = c.clone();
        async move {
            *c.lock()
                .unwrap()
                .entry(e.message_id().to_string())
                .or_insert(0) += 1;
            Outcome::Completed
        }
    });
    let props = vec![("session.timeout.ms".to_string(), "6000".to_string())];
    let source = KafkaSource::new(&brokers, "billing", &["orders".to_string()], &props).unwrap();
    let mut o = ConsumeOptions::new("billing", WorkerId::new("c1").unwrap());
    o.ack = AckStrategy::ExactlyOnce;
    o.batch = 64;
    o.poll_wait = Duration::from_secs(2);
    let mut consumer =
        InboxConsumer::new(source, db.store.inbox(), Some(handler.clone()), o.clone());
    let (_tx, rx) = watch::channel(false);
    let r = tokio::time::timeout(Duration::from_secs(60), consumer.run(true, rx.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.consumed, r.stored, r.duplicates),
        (300, 200, 100),
        "{r:?}"
    );
    drop(consumer);
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 200);
        assert!(calls.values().all(|&n| n == 1));
    }
    let c = db.store.inbox().counts().await.unwrap();
    assert_eq!(c.completed, 200);
    // A new consumer in the same group resumes at the committed offsets.
    let source = KafkaSource::new(&brokers, "billing", &["orders".to_string()], &props).unwrap();
    let mut again = InboxConsumer::new(source, db.store.inbox(), Some(handler), o);
    let r = tokio::time::timeout(Duration::from_secs(60), again.run(true, rx))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.consumed, 0, "everything was committed: {r:?}");
}

/// `omnibox inbox consume` against tansu, twice: the second run reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_consume_from_tansu() {
    let Some(brokers) = common::tansu::shared_brokers() else {
        return;
    };
    let Some(db) = common::postgres().await else {
        return;
    };
    let topic = format!("inbox-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    common::tansu::create_topic(&brokers, &topic, 2).await;
    assert_eq!(produce(&brokers, &topic, 100).await, 150);
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects.log");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_omnibox"))
            .args([
                "inbox",
                "consume",
                "--from",
                &format!("kafka://{brokers}"),
                "--topic",
                &topic,
            ])
            .args(["--group", "audit", "--once", "--format", "json"])
            .args([
                "--exec",
                &format!("echo $OMNIBOX_MESSAGE_ID >> {}", effects.display()),
            ])
            .current_dir(dir.path())
            .env_clear()
            .env("OMNIBOX_DATABASE_URL", &db.url)
            .env("OMNIBOX_DATABASE_SCHEMA", db.schema())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            r["consumed"].as_u64(),
            r["stored"].as_u64(),
            r["processed"].as_u64()
        ),
        (Some(150), Some(100), Some(100))
    );
    let lines = std::fs::read_to_string(&effects).unwrap();
    assert_eq!(
        lines.lines().count(),
        100,
        "the handler ran once per message id"
    );
    let out = run();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["consumed"], 0, "the group's offsets were committed");
    assert_eq!(
        std::fs::read_to_string(&effects).unwrap().lines().count(),
        100
    );
}

/// A header whose name is not UTF-8 (no Java client sends one; any other
/// producer can) does not stop the consumer: rdkafka's header reader
/// panics on it, which would fail the same offset after every restart. The
/// message is stored with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_text_is_read() {
    let Some(brokers) = common::tansu::shared_brokers() else {
        return;
    };
    let Some(db) = common::postgres().await else {
        return;
    };
    let topic = format!("inbox-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    common::tansu::create_topic(&brokers, &topic, 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    for id in ["odd-1", "odd-2"] {
        let headers = OwnedHeaders::new().insert(Header {
            key: "message_id",
            value: Some(id),
        });
        if id == "odd-1" {
            // rdkafka takes header names as &str; the C call takes bytes.
            // `BorrowedHeaders` is librdkafka's header list itself.
            let raw = headers.as_borrowed() as *const rdkafka::message::BorrowedHeaders
                as *mut rdkafka::bindings::rd_kafka_headers_t;
            let (name, value) = (b"\xffbad\xfe", b"v");
            // SAFETY: `raw` is the live list `headers` owns; librdkafka
            // copies both buffers, whose lengths are given.
            let err = unsafe {
                rdkafka::bindings::rd_kafka_header_add(
                    raw,
                    name.as_ptr().cast(),
                    name.len() as isize,
                    value.as_ptr().cast(),
                    value.len() as isize,
                )
            };
            assert_eq!(
                err,
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            );
        }
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(id)
                    .payload(r#"{"n":1}"#)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_omnibox"))
        .args(["inbox", "consume", "--from", &format!("kafka://{brokers}")])
        .args([
            "--topic", &topic, "--group", "odd", "--once", "--format", "json",
        ])
        .env_clear()
        .env("OMNIBOX_DATABASE_URL", &db.url)
        .env("OMNIBOX_DATABASE_SCHEMA", db.schema())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["consumed"].as_u64(), r["stored"].as_u64()),
        (Some(2), Some(2)),
        "{r}"
    );
    let inbox = db.store.inbox();
    for id in ["odd-1", "odd-2"] {
        let row = inbox
            .get_by_message_id(id, "odd")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} was not stored"));
        assert_eq!(row.status(), omnibox::EventStatus::Pending, "{id}");
    }
}

/// A handler failure under exactly-once seeks the Kafka consumer back: the
/// message is delivered again and completed; nothing else runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_handler_failure_seeks_back_and_redelivers() {
    let db = common::sqlite().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("payments", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "payments", 20).await;
    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::new(Mutex::new(HashMap::new()));
    let c = calls.clone();
    let handler = Arc::new(move |e: InboxEvent| {
        let c = c.clone();
        async move {
            let n = {
                let mut m = c.lock().unwrap();
                let n = m.entry(e.message_id().to_string()).or_insert(0);
                *n += 1;
                *n
            };
            if e.message_id() == "evt-5" && n <= 2 {
                Outcome::Failed {
                    error: "not yet".into(),
                    retry: omnibox::Retry::Counted(None),
                }
            } else {
                Outcome::Completed
            }
        }
    });
    let source = KafkaSource::new(&brokers, "ledger", &["payments".to_string()], &[]).unwrap();
    let mut o = ConsumeOptions::new("ledger", WorkerId::new("c1").unwrap());
    o.batch = 8;
    o.poll_wait = Duration::from_secs(2);
    o.backoff = omnibox::Backoff {
        base: Duration::from_millis(200),
        cap: Duration::from_secs(1),
    };
    let mut consumer = InboxConsumer::new(source, db.store.inbox(), Some(handler), o);
    let (_tx, rx) = watch::channel(false);
    let r = tokio::time::timeout(Duration::from_secs(60), consumer.run(true, rx))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.failed, 2, "{r:?}");
    assert!(r.redelivered > 0);
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls["evt-5"], 3);
        assert!(
            calls
                .iter()
                .filter(|(k, _)| *k != "evt-5")
                .all(|(_, &n)| n == 1),
            "{calls:?}"
        );
    }
    assert_eq!(db.store.inbox().counts().await.unwrap().completed, 20);
}

/// A handler that runs longer than the group's max.poll.interval.ms: the
/// consumer keeps polling (partitions paused) while it runs, so it stays in
/// the group and its commit lands; a new consumer of the group reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_slow_handler_keeps_the_group_membership() {
    let db = common::sqlite().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("slow", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let sent = produce(&brokers, "slow", 4).await;
    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::new(Mutex::new(HashMap::new()));
    let c = calls.clone();
    let handler = Arc::new(move |e: InboxEvent| {
        let c = c.clone();
        async move {
            *c.lock()
                .unwrap()
                .entry(e.message_id().to_string())
                .or_insert(0) += 1;
            if e.message_id() == "evt-2" {
                tokio::time::sleep(Duration::from_secs(14)).await;
            }
            Outcome::Completed
        }
    });
    let props = vec![
        ("session.timeout.ms".to_string(), "6000".to_string()),
        ("heartbeat.interval.ms".to_string(), "1000".to_string()),
        ("max.poll.interval.ms".to_string(), "6000".to_string()),
    ];
    let mut o = ConsumeOptions::new("slowpokes", WorkerId::new("c1").unwrap());
    o.poll_wait = Duration::from_secs(2);
    o.handler_timeout = Duration::from_secs(30);
    let source = KafkaSource::new(&brokers, "slowpokes", &["slow".to_string()], &props).unwrap();
    let mut consumer =
        InboxConsumer::new(source, db.store.inbox(), Some(handler.clone()), o.clone());
    let (_tx, rx) = watch::channel(false);
    let r = tokio::time::timeout(Duration::from_secs(90), consumer.run(true, rx.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.consumed as usize, sent, "{r:?}");
    drop(consumer);
    assert!(calls.lock().unwrap().values().all(|&n| n == 1));
    assert_eq!(db.store.inbox().counts().await.unwrap().completed, 4);
    let source = KafkaSource::new(&brokers, "slowpokes", &["slow".to_string()], &props).unwrap();
    let mut again = InboxConsumer::new(source, db.store.inbox(), Some(handler), o);
    let r = tokio::time::timeout(Duration::from_secs(60), again.run(true, rx))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        r.consumed, 0,
        "the slow batch's offsets were committed: {r:?}"
    );
}

/// A long-running `omnibox inbox consume` from Kafka keeps going through a
/// broker restart: every message handled once, one warning for the outage,
/// a clean exit on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_consume_survives_a_broker_restart() {
    let Some(mut tansu) = common::tansu::Tansu::start().await else {
        return;
    };
    let Some(db) = common::postgres().await else {
        return;
    };
    let brokers = tansu.brokers();
    let topic = format!(
        "restart-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    common::tansu::create_topic(&brokers, &topic, 2).await;
    assert_eq!(produce_from(&brokers, &topic, 0, 100).await, 150);
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects.log");
    let log = dir.path().join("consume.log");
    let consumer = common::KillOnDrop::new(
        Command::new(env!("CARGO_BIN_EXE_omnibox"))
            .args([
                "inbox",
                "consume",
                "--from",
                &format!("kafka://{brokers}"),
                "--topic",
                &topic,
                "--group",
                "audit",
                "-v",
            ])
            .args([
                "--exec",
                &format!("echo $OMNIBOX_MESSAGE_ID >> {}", effects.display()),
            ])
            .current_dir(dir.path())
            .env_clear()
            .env("OMNIBOX_DATABASE_URL", &db.url)
            .env("OMNIBOX_DATABASE_SCHEMA", db.schema())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let handled = || {
        std::fs::read_to_string(&effects)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let wait = |n: usize, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while handled().len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {} of {n} handled\n{}",
                handled().len(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait(100, "before the restart");
    tansu.stop();
    tokio::time::sleep(Duration::from_secs(8)).await;
    tansu.start_again().await;
    assert_eq!(produce_from(&brokers, &topic, 100, 100).await, 150);
    wait(200, "after the restart");
    // Nothing more arrives (the repeats are duplicates).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids = handled();
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(
        (ids.len(), distinct.len()),
        (200, 200),
        "each message handled once"
    );
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(consumer.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let code = consumer.take().wait().unwrap().code();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    eprintln!("{stderr}");
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    assert!(
        warnings <= 1,
        "at most one warning for the outage:\n{stderr}"
    );
    let counts = db.store.inbox().counts().await.unwrap();
    assert_eq!(
        (counts.completed, counts.pending, counts.locked),
        (200, 0, 0)
    );
}

/// Produces `n` distinct messages (ids from `evt-{from}`) to one partition.
async fn produce_to(brokers: &str, topic: &str, partition: i32, from: usize, n: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let sends: Vec<_> = (from..from + n)
        .map(|i| {
            let id = format!("evt-{i}");
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "event_id",
                    value: Some(id.as_str()),
                })
                .insert(Header {
                    key: "event_type",
                    value: Some("order.created"),
                });
            let value = format!(
                r#"{{"schema_version":"1.0.0","event_type":"order.created","payload":{{"n":{i}}}}}"#
            );
            producer
                .send_result(
                    FutureRecord::to(topic)
                        .partition(partition)
                        .key(&id)
                        .payload(&value)
                        .headers(headers),
                )
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    for s in sends {
        s.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Each partition of `topic`: the offset `group` committed (None: none)
/// and the partition's high watermark.
fn committed_and_ends(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<(Option<i64>, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    (0..partitions)
        .map(|p| {
            let (_, high) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            let offset = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => Some(o),
                _ => None,
            };
            (offset, high)
        })
        .collect()
}

/// `omnibox inbox consume --once` from 4 partitions of tansu, one of them
/// empty and one far longer than the others: it stores every message,
/// commits each partition's end (nothing for the empty one), and stops; a
/// second run finds every partition at its end at once and reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_consume_once_stops_at_the_end_of_every_partition() {
    let Some(brokers) = common::tansu::shared_brokers() else {
        return;
    };
    let Some(db) = common::postgres().await else {
        return;
    };
    let topic = format!("ends-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    common::tansu::create_topic(&brokers, &topic, 4).await;
    produce_to(&brokers, &topic, 0, 0, 1500).await;
    produce_to(&brokers, &topic, 1, 1500, 200).await;
    produce_to(&brokers, &topic, 2, 1700, 300).await;
    // Repeats of messages of partition 0, in partition 2: duplicates.
    produce_to(&brokers, &topic, 2, 0, 100).await;
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        let start = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_omnibox"))
            .args([
                "inbox",
                "consume",
                "--from",
                &format!("kafka://{brokers}"),
                "--topic",
                &topic,
            ])
            .args(["--group", "ends", "--once", "--batch", "128"])
            .args(["--format", "json"])
            .current_dir(dir.path())
            .env_clear()
            .env("OMNIBOX_DATABASE_URL", &db.url)
            .env("OMNIBOX_DATABASE_SCHEMA", db.schema())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("inbox consume --once took {:?}", start.elapsed());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let r = run();
    assert_eq!(
        (
            r["consumed"].as_u64(),
            r["stored"].as_u64(),
            r["duplicates"].as_u64()
        ),
        (Some(2100), Some(2000), Some(100)),
        "{r}"
    );
    let c = db.store.inbox().counts().await.unwrap();
    assert_eq!(c.pending, 2000, "{c:?}");
    let ends = committed_and_ends(&brokers, "ends", &topic, 4);
    assert_eq!(
        ends,
        vec![
            (Some(1500), 1500),
            (Some(200), 200),
            (Some(400), 400),
            (None, 0)
        ]
    );
    let r = run();
    assert_eq!(r["consumed"], 0, "{r}");
    // New messages after the end: the next run reads just those.
    produce_to(&brokers, &topic, 3, 5000, 10).await;
    let r = run();
    assert_eq!(
        (r["consumed"].as_u64(), r["stored"].as_u64()),
        (Some(10), Some(10)),
        "{r}"
    );
    assert_eq!(
        committed_and_ends(&brokers, "ends", &topic, 4)[3],
        (Some(10), 10)
    );
}

/// `once` over two topics that both have partitions 0 and 1 (an end event
/// names only its partition number, so the source asks the broker about
/// those), one of them empty: the run stores every message and ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_ends_with_topics_sharing_partition_numbers() {
    let db = common::sqlite().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("full", 2, 1).unwrap();
    cluster.create_topic("empty", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    produce_to(&brokers, "full", 0, 0, 40).await;
    produce_to(&brokers, "full", 1, 40, 30).await;
    let topics = ["full".to_string(), "empty".to_string()];
    let source = KafkaSource::new(&brokers, "both", &topics, &[]).unwrap();
    let o = ConsumeOptions::new("both", WorkerId::new("c1").unwrap());
    let mut consumer =
        InboxConsumer::<_, omnibox::inbox::AnyHandler>::new(source, db.store.inbox(), None, o);
    let (_tx, rx) = watch::channel(false);
    let r = tokio::time::timeout(Duration::from_secs(60), consumer.run(true, rx))
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!((r.consumed, r.stored), (70, 70), "{r:?}");
    drop(consumer);
    assert_eq!(
        committed_and_ends(&brokers, "both", "full", 2),
        vec![(Some(40), 40), (Some(30), 30)]
    );
}

/// A Kafka source keeps to a poll's byte budget: a poll ends before the
/// message that would pass it (held for the next poll), one message at
/// least; across rewinds and a pause every message comes in order, none
/// lost or doubled; and a consumer with a small `batch_bytes` stores them
/// all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_polls_are_bounded_by_bytes() {
    use omnibox::inbox::Source;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("big", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    let n = 60;
    for i in 0..n {
        // 20 to 60 KB each; key i % 4 (two partitions).
        let value = format!(
            r#"{{"event_type":"order.archived","payload":{{"n":{i},"blob":"{}"}}}}"#,
            "x".repeat(20_000 + (i * 7919) % 40_000)
        );
        let id = format!("big-{i}");
        producer
            .send(
                FutureRecord::to("big")
                    .key(&format!("k{}", i % 4))
                    .payload(&value)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "event_id",
                        value: Some(id.as_str()),
                    })),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let props = vec![("session.timeout.ms".to_string(), "6000".to_string())];
    let budget = 100_000;
    let mut source = KafkaSource::new(&brokers, "sizes", &["big".to_string()], &props).unwrap();
    // Next offset expected per partition.
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut seen = 0;
    let mut polls = 0;
    let mut rewound = false;
    let mut paused = false;
    while seen < n {
        polls += 1;
        assert!(polls < 500, "no progress after {seen} messages");
        let p = source
            .poll_within(100, budget, Duration::from_secs(2))
            .await
            .unwrap();
        if p.messages.is_empty() {
            continue;
        }
        let bytes: usize = p.messages.iter().map(|m| m.size()).sum();
        assert!(
            bytes <= budget || p.messages.len() == 1,
            "{} messages, {bytes} bytes",
            p.messages.len()
        );
        // Once, give the batch back (as a consumer whose handler failed):
        // the same messages come again, the held one after them.
        if !rewound && seen > 10 {
            rewound = true;
            source.rewind(&p.messages).await.unwrap();
            continue;
        }
        // Once, pause and resume (a slow handler): nothing is lost.
        if !paused && seen > 30 {
            paused = true;
            source.idle(Duration::from_millis(300)).await.unwrap();
        }
        for m in &p.messages {
            let expected = next.entry(m.partition).or_insert(0);
            assert_eq!(
                m.offset, *expected,
                "partition {} in order, no gap",
                m.partition
            );
            *expected += 1;
            seen += 1;
        }
    }
    assert!(rewound && paused);
    assert!(polls > 10, "small polls: {polls}");
    drop(source);

    let db = common::sqlite().await;
    let source = KafkaSource::new(&brokers, "store", &["big".to_string()], &props).unwrap();
    let mut o = ConsumeOptions::new("store", WorkerId::new("c1").unwrap());
    o.batch = 100;
    o.batch_bytes = Some(budget as u64);
    o.poll_wait = Duration::from_secs(2);
    let mut consumer = InboxConsumer::<_, fn(InboxEvent) -> std::future::Ready<Outcome>>::new(
        source,
        db.store.inbox(),
        None,
        o,
    );
    let (_tx, rx) = watch::channel(false);
    let r = tokio::time::timeout(Duration::from_secs(60), consumer.run(true, rx))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.consumed, r.stored), (n as u64, n as u64), "{r:?}");
    assert!(r.commits >= 20, "many small transactions: {r:?}");
}

/// A partition the source paused (a slow handler, a retry's wait) and lost
/// to a rebalance is read again once it comes back: librdkafka keeps an
/// application's pause across a revocation, so with the source resumed
/// while the group rebalanced (it held no partition then), the partition
/// came back paused and was never read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_paused_partition_revoked_and_assigned_again_is_read() {
    use omnibox::inbox::Source;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("paused", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    produce_to(&brokers, "paused", 0, 0, 10).await;
    produce_to(&brokers, "paused", 1, 10, 10).await;
    let timers = [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
    ];
    // Another member of the group, polled on a thread of its own until it
    // leaves (a rebalance).
    let leave = Arc::new(AtomicBool::new(false));
    let other = {
        let leave = leave.clone();
        let brokers = brokers.clone();
        std::thread::spawn(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let mut config = ClientConfig::new();
            config
                .set("bootstrap.servers", &brokers)
                .set("group.id", "pausers")
                .set("enable.auto.commit", "false");
            for (k, v) in timers {
                config.set(k, v);
            }
            let c: BaseConsumer = config.create().unwrap();
            c.subscribe(&["paused"]).unwrap();
            while !leave.load(Ordering::SeqCst) {
                let _ = c.poll(Duration::from_millis(100));
            }
            // Dropped: it leaves the group.
        })
    };
    let props: Vec<(String, String)> = timers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut source =
        KafkaSource::new(&brokers, "pausers", &["paused".to_string()], &props).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        let p = source
            .poll_within(100, usize::MAX, Duration::from_secs(1))
            .await
            .unwrap();
        if !p.messages.is_empty() {
            break p.messages;
        }
        assert!(Instant::now() < deadline, "nothing read");
    };
    // Given back and paused, as a consumer waiting for a retry's time.
    source.rewind(&first).await.unwrap();
    source.idle(Duration::from_millis(100)).await.unwrap();
    leave.store(true, Ordering::SeqCst);
    other.join().unwrap();
    while source.owns(&first[0]) {
        assert!(Instant::now() < deadline, "never revoked");
        source.idle(Duration::from_millis(100)).await.unwrap();
    }
    // The wait is over while the group rebalances: the source resumes with
    // no partition assigned, then gets both.
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while next.values().sum::<i64>() < 20 {
        assert!(
            Instant::now() < deadline,
            "every partition read to its end: next offsets {next:?} (paused: partition {})",
            first[0].partition
        );
        let p = source
            .poll_within(100, usize::MAX, Duration::from_millis(200))
            .await
            .unwrap();
        for m in &p.messages {
            let n = next.entry(m.partition).or_insert(0);
            assert_eq!(m.offset, *n, "partition {} in order", m.partition);
            *n += 1;
        }
    }
    assert_eq!(next, BTreeMap::from([(0, 10), (1, 10)]));
}

/// The processes whose parent is `pid`, each with its process group.
fn children_of(pid: u32) -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold anything.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1).and_then(|f| f.parse::<u32>().ok()) == Some(pid) {
            let group = fields.get(2).and_then(|f| f.parse().ok()).unwrap_or(child);
            out.push((child, group));
        }
    }
    out
}

/// True when every thread of `pid` is stopped (SIGSTOP took effect).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
            })
            .is_some_and(|state| state == "T" || state == "t")
    })
}

/// Kills `pid` and every handler it runs with SIGKILL, as Kubernetes kills
/// a pod's processes, at a moment a handler is in flight: once a handler
/// runs, the process is stopped (it starts nothing more), and if that
/// handler ended meanwhile, let go again. A handler runs in a process group
/// of its own, so each child's group is killed too. Returns how many
/// children it had.
fn kill_pod_mid_handler(pid: u32) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no handler of {pid} in flight for 30 s"
        );
        if children_of(pid).is_empty() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // SAFETY: kill(2) on a child of this test; no memory is touched.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        while !all_stopped(pid) {
            assert!(std::time::Instant::now() < deadline, "{pid} never stopped");
            std::thread::sleep(Duration::from_millis(1));
        }
        let children = children_of(pid);
        if children.is_empty() {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            continue;
        }
        for &(child, group) in &children {
            // SAFETY: as above; the groups are the handlers' own (never
            // this test's: the member runs in a group of its own too).
            unsafe {
                libc::kill(-group, libc::SIGKILL);
                libc::kill(child, libc::SIGKILL);
            }
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        return children.len();
    }
}

/// A consumer group losing a member, as when Kubernetes kills a pod: two
/// `omnibox inbox consume` processes of one group (exactly-once, an
/// external handler) share a store and 4 partitions; one is killed -9 with
/// its handler while the handler runs. After its session times out the
/// survivor gets its partitions, waits for the dead member's leases, and
/// reads every partition to its end: every message is stored once and
/// completed, every handler ran once except, at most, the one the killed
/// member had in flight (docs/design.md: "a crash repeats at most the
/// handler in flight"), and the group's offsets are the partitions' ends.
/// librdkafka's mock cluster runs the group's rebalances (tansu does not
/// reassign a dead member's partitions).
async fn group_loses_a_member_mid_batch(db: &common::TestDb) {
    use omnibox::{EventStatus, ListFilter};
    use std::collections::{BTreeMap, BTreeSet};
    use std::os::unix::process::CommandExt;
    use std::time::Instant;

    let started = Instant::now();
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 4, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    // Enough that the member to be killed is still busy when it is killed,
    // even when the group formed late.
    let per_partition = 150;
    for p in 0..4 {
        produce_to(
            &brokers,
            "orders",
            p,
            p as usize * per_partition,
            per_partition,
        )
        .await;
    }
    // Repeats, in other partitions, of messages of partitions 0 and 1:
    // duplicates that the other member may meet while a row is in hand.
    produce_to(&brokers, "orders", 3, 0, 50).await;
    produce_to(&brokers, "orders", 2, per_partition, 50).await;
    let distinct = 4 * per_partition;
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects.log");
    let member = |tag: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_omnibox"));
        cmd.args(["inbox", "consume", "--from", &format!("kafka://{brokers}")])
            .args(["--topic", "orders", "--group", "billing", "--batch", "25"])
            .args(["--lease", "10s", "--worker-id", tag, "-v"])
            .args(["-X", "session.timeout.ms=6000"])
            .args(["-X", "heartbeat.interval.ms=500"])
            .args([
                "--exec",
                // The effect first, then a while in flight.
                &format!(
                    "echo \"{tag} $OMNIBOX_MESSAGE_ID\" >> '{}'; sleep 0.02",
                    effects.display()
                ),
            ])
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("OMNIBOX_DATABASE_URL", &db.url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(format!("{tag}.log"))).unwrap())
            // A pod of its own.
            .process_group(0);
        if db.is_postgres() {
            cmd.env("OMNIBOX_DATABASE_SCHEMA", db.schema());
        }
        common::KillOnDrop::new(cmd.spawn().unwrap())
    };
    let log_of = |tag: &str| {
        std::fs::read_to_string(dir.path().join(format!("{tag}.log"))).unwrap_or_default()
    };
    // (member, message id) per handler run, in the order they ran.
    let handled = || -> Vec<(String, String)> {
        std::fs::read_to_string(&effects)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(m, id)| (m.to_string(), id.to_string()))
            .collect()
    };
    let a = member("member-a");
    let b = member("member-b");

    // Both members work (the group split the partitions between them) and
    // the one to be killed is some batches in.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let runs = handled();
        let of = |tag: &str| runs.iter().filter(|(m, _)| m == tag).count();
        if of("member-a") >= 40 && of("member-b") >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both members handling: a {} b {}\n--- a:\n{}\n--- b:\n{}",
            of("member-a"),
            of("member-b"),
            log_of("member-a"),
            log_of("member-b")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a_pid = a.id();
    let killed = tokio::task::spawn_blocking(move || kill_pod_mid_handler(a_pid))
        .await
        .unwrap();
    let status = a.take().wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "{status:?}"
    );
    let killed_at = Instant::now();
    let at_kill = handled();
    // The message the killed member had in flight: the last it started
    // (its effect comes first; a handler killed before it has none).
    let in_flight = at_kill
        .iter()
        .rev()
        .find(|(m, _)| m == "member-a")
        .map(|(_, id)| id.clone())
        .unwrap();
    // Mid-batch: rows of its batch stay locked by the dead member.
    let held: BTreeSet<String> = db
        .store
        .inbox()
        .list(&ListFilter {
            locked_by: Some("member-a".into()),
            limit: Some(1000),
            ..ListFilter::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|e| e.message_id().to_string())
        .collect();
    assert!(
        !held.is_empty(),
        "the killed member held rows ({killed} handler process(es) killed)"
    );
    eprintln!(
        "member-a killed after {:?} with {} handler run(s), {killed} handler process(es) and {} \
         locked row(s); last started: {in_flight}",
        started.elapsed(),
        at_kill.iter().filter(|(m, _)| m == "member-a").count(),
        held.len()
    );

    // The survivor takes over and reads every partition to its end.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut offsets = None;
    let ends = loop {
        let rows = db
            .store
            .inbox()
            .list(&ListFilter {
                limit: Some(10_000),
                ..ListFilter::default()
            })
            .await
            .unwrap();
        let completed = rows
            .iter()
            .filter(|r| r.status() == EventStatus::Completed)
            .count();
        if completed == distinct {
            let b = brokers.clone();
            let ends =
                tokio::task::spawn_blocking(move || committed_and_ends(&b, "billing", "orders", 4))
                    .await
                    .unwrap();
            if ends.iter().all(|&(c, high)| c == Some(high)) {
                break ends;
            }
            offsets = Some(ends);
        }
        assert!(
            Instant::now() < deadline,
            "the survivor finishing: {completed} of {distinct} rows completed, {} rows, \
             offsets {offsets:?}\n--- a:\n{}\n--- b:\n{}",
            rows.len(),
            log_of("member-a"),
            log_of("member-b")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "member-b done {:?} after the kill; offsets {ends:?}",
        killed_at.elapsed()
    );
    // Nothing more runs: the repeats are duplicates.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The survivor stops cleanly.
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(b.id() as i32, libc::SIGTERM) };
    let mut b = b.take();
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = b.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = b.kill();
            panic!("member-b did not stop on SIGTERM\n{}", log_of("member-b"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, Some(0), "{}", log_of("member-b"));
    let b_log = log_of("member-b");
    eprintln!("--- member-b:\n{b_log}");
    assert!(
        b_log.lines().any(|l| l.contains("partitions assigned")
            && (0..4).all(|p| l.contains(&format!("\"orders\", {p})")))),
        "the survivor got every partition:\n{b_log}"
    );

    // Every message stored once, and completed.
    let rows = db
        .store
        .inbox()
        .list(&ListFilter {
            limit: Some(10_000),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    let ids: BTreeSet<&str> = rows.iter().map(|r| r.message_id()).collect();
    let expected: BTreeSet<String> = (0..distinct).map(|i| format!("evt-{i}")).collect();
    assert_eq!(rows.len(), distinct);
    assert_eq!(
        ids,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    for r in &rows {
        assert_eq!(
            (r.status(), r.locked_by(), r.attempts_made()),
            (EventStatus::Completed, None, 0),
            "{}",
            r.message_id()
        );
    }

    // Every message handled; twice only the one in flight at the kill.
    let runs = handled();
    let mut per_id: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (m, id) in &runs {
        per_id.entry(id).or_default().push(m);
    }
    assert_eq!(
        per_id.keys().copied().collect::<BTreeSet<_>>(),
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "every message handled"
    );
    let twice: BTreeMap<&str, &Vec<&str>> = per_id
        .iter()
        .filter(|(_, m)| m.len() > 1)
        .map(|(id, m)| (*id, m))
        .collect();
    for (id, members) in &twice {
        assert_eq!(
            (*id, members.as_slice()),
            (in_flight.as_str(), &["member-a", "member-b"][..]),
            "only the killed member's message in flight runs again, once, on the survivor: \
             {twice:?}"
        );
    }
    // The rows the dead member held: the survivor handled each, once (the
    // one in flight perhaps after the dead member's run).
    for id in &held {
        let members = &per_id[id.as_str()];
        assert_eq!(members.last(), Some(&"member-b"), "{id}: {members:?}");
        if *id != in_flight {
            assert_eq!(members.len(), 1, "{id}: {members:?}");
        }
    }
    // The killed member ran nothing after the kill.
    assert_eq!(
        runs.iter().filter(|(m, _)| m == "member-a").count(),
        at_kill.iter().filter(|(m, _)| m == "member-a").count()
    );
    eprintln!(
        "{} handler runs, {} message(s) twice ({twice:?}), in {:?}",
        runs.len(),
        twice.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_group_loses_a_member_mid_batch_postgres() {
    let Some(db) = common::postgres().await else {
        return;
    };
    group_loses_a_member_mid_batch(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_group_loses_a_member_mid_batch_sqlite() {
    let db = common::sqlite().await;
    group_loses_a_member_mid_batch(&db).await;
}
