//! The relay through the real Kafka protocol: librdkafka's mock cluster
//! (real TCP listeners speaking the Kafka protocol) and the relay of the
//! library, on both stores.

mod common;

use std::sync::Arc;
use std::time::Duration;

use omnibox::pipeline::{ProcessorOptions, RunMode, RunOptions, Sleep, run};
use omnibox::relay::{self, AnySink};
use omnibox::store::AnyStore;
use omnibox::{
    Backoff, DomainService, EventStatus, EventStore, NewOutboxEvent, OutboxEvent, OutboxStore,
    WorkerId,
};
use rdkafka::mocking::MockCluster;
use serde_json::json;
use tokio::sync::watch;

use common::kafka::consume;

fn event(topic: &str, key: &str, n: usize) -> OutboxEvent {
    let mut e = NewOutboxEvent::new(
        "order",
        uuid::Uuid::now_v7(),
        "order.updated",
        topic,
        key,
        json!({ "n": n, "key": key }),
    );
    e.headers = Some(
        [(
            "traceparent".to_string(),
            format!("00-{n:032x}-{n:016x}-01"),
        )]
        .into(),
    );
    e.trace_id = Some(format!("trace-{n}"));
    e.correlation_id = Some("corr".into());
    DomainService::default().create_outbox_event(e).unwrap()
}

fn options(worker: &str, batch: u32) -> ProcessorOptions {
    let mut o = ProcessorOptions::new(WorkerId::new(worker).unwrap());
    o.batch = batch;
    // Short enough for a test to wait out, long enough that one drain
    // does not retry the same failure twice.
    o.backoff = Backoff {
        base: Duration::from_millis(600),
        cap: Duration::from_millis(600),
    };
    o
}

fn kafka(
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    timeout: Duration,
) -> Arc<AnySink> {
    Arc::new(
        AnySink::from_url(
            &format!("kafka://{}", cluster.bootstrap_servers()),
            &[],
            timeout,
        )
        .unwrap(),
    )
}

async fn drain(
    store: &AnyStore,
    sink: Arc<AnySink>,
    worker: &str,
    batch: u32,
    dlq: Option<&str>,
) -> omnibox::pipeline::RunReport {
    let mut b = relay::publisher(
        store.outbox(),
        sink.clone(),
        options(worker, batch),
        Duration::from_secs(10),
    );
    if let Some(t) = dlq {
        // Dead letters to the topic and to the table: both get each one.
        b = b
            .dead_letter_store(Arc::new(relay::DeadLetterTopic::new(sink, t)))
            .dead_letter_store(Arc::new(store.dead_letters()));
    }
    let p = b.build();
    let (_tx, rx) = watch::channel(false);
    let opts = RunOptions {
        mode: RunMode::Once,
        ..RunOptions::default()
    };
    run(&p, &opts, rx, &mut Sleep, |_| {}).await.unwrap()
}

mod cases {
    use super::*;
    use crate::common::TestDb;

    /// Every row arrives once, with its key, headers and envelope.
    pub async fn every_row_arrives_once_with_key_headers_and_envelope(db: &TestDb) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("orders", 3, 1).unwrap();
        let events: Vec<OutboxEvent> = (0..500)
            .map(|n| event("orders", &format!("order-{}", n % 20), n))
            .collect();
        db.store.outbox().create_many(&events).await.unwrap();
        let report = drain(
            &db.store,
            kafka(&cluster, Duration::from_secs(10)),
            "relay-1",
            100,
            None,
        )
        .await;
        assert_eq!(report.completed, 500);
        let got = consume(
            &cluster.bootstrap_servers(),
            "orders",
            500,
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(got.len(), 500, "exactly once");
        let by_id: std::collections::HashMap<String, &common::kafka::Received> = got
            .iter()
            .map(|m| (m.headers["event_id"].clone(), m))
            .collect();
        assert_eq!(by_id.len(), 500, "no event twice");
        for e in &events {
            let m = by_id[&e.id().to_string()];
            assert_eq!(m.key, e.partition_key());
            assert_eq!(m.headers["event_type"], "order.updated");
            assert_eq!(m.headers["trace_id"], e.trace_id().unwrap());
            assert_eq!(m.headers["correlation_id"], "corr");
            assert_eq!(
                m.headers["traceparent"],
                e.header("traceparent").unwrap(),
                "W3C traceparent is propagated"
            );
            assert!(!m.headers.contains_key("schema_version"));
            assert_eq!(m.value["schema_version"], "1.0.0");
            assert_eq!(m.value["event_type"], "order.updated");
            assert_eq!(m.value["aggregate_type"], "order");
            assert_eq!(m.value["aggregate_id"], e.aggregate_id().to_string());
            assert_eq!(
                m.value["payload"],
                serde_json::Value::Object(e.payload().clone())
            );
            let stored = db.store.outbox().get(e.id()).await.unwrap().unwrap();
            assert_eq!(
                m.value["timestamp"],
                omnibox::time::format(&stored.created_at())
            );
            assert_eq!(m.value["trace_id"], e.trace_id().unwrap());
        }
        let c = db.store.outbox().counts().await.unwrap();
        assert_eq!((c.completed, c.pending, c.locked), (500, 0, 0));
    }

    /// A record the broker rejects is a counted failure, then failed at
    /// max_attempts, then written to the dead-letter topic; other topics flow.
    pub async fn rejected_record_is_counted_then_failed_then_dead_lettered(db: &TestDb) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("orders", 1, 1).unwrap();
        cluster.create_topic("orders.dlq", 1, 1).unwrap();
        cluster
            .topic_error(
                "forbidden",
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
            )
            .unwrap();
        let mut bad = NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            "order.secret",
            "forbidden",
            "k",
            json!({"x": 1}),
        );
        bad.max_attempts = Some(2);
        let bad = DomainService::default().create_outbox_event(bad).unwrap();
        let good = event("orders", "k", 1);
        db.store
            .outbox()
            .create_many(&[bad.clone(), good.clone()])
            .await
            .unwrap();
        let sink = kafka(&cluster, Duration::from_secs(5));

        let first = drain(&db.store, sink.clone(), "relay-1", 10, Some("orders.dlq")).await;
        assert_eq!(
            (first.completed, first.failed, first.dead, first.transient),
            (1, 1, 0, 0),
            "{first:?}"
        );
        let row = db.store.outbox().get(bad.id()).await.unwrap().unwrap();
        assert_eq!(
            (row.status(), row.attempts_made()),
            (EventStatus::Pending, 1)
        );
        assert!(
            row.last_error()
                .unwrap()
                .contains("broker rejected the record"),
            "{:?}",
            row.last_error()
        );

        // After the (short) backoff, the second counted failure makes it failed and dead-lettered.
        let mut dead = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = drain(&db.store, sink.clone(), "relay-1", 10, Some("orders.dlq")).await;
            dead += r.dead_lettered;
            if r.dead > 0 {
                break;
            }
        }
        assert_eq!(dead, 1);
        let row = db.store.outbox().get(bad.id()).await.unwrap().unwrap();
        assert_eq!(
            (row.status(), row.attempts_made()),
            (EventStatus::Failed, 2)
        );
        let dlq = consume(
            &cluster.bootstrap_servers(),
            "orders.dlq",
            1,
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].headers["event_id"], bad.id().to_string());
        assert_eq!(dlq[0].headers["dlq_original_topic"], "forbidden");
        assert_eq!(dlq[0].headers["dlq_attempts"], "2");
        assert!(dlq[0].headers["dlq_error"].contains("rejected"));
        assert_eq!(dlq[0].value["payload"]["x"], 1);
        let orders = consume(
            &cluster.bootstrap_servers(),
            "orders",
            1,
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(
            orders.len(),
            1,
            "the good event went out; the failing head of another topic did not hold it up"
        );

        // The table kept the same letter: the event as it failed.
        let letters = db
            .store
            .dead_letters()
            .list(&Default::default())
            .await
            .unwrap();
        assert_eq!(letters.len(), 1, "{letters:?}");
        let l = &letters[0];
        assert_eq!(
            (l.origin, l.event_id, l.topic.as_str()),
            (omnibox::Table::Outbox, bad.id(), "forbidden")
        );
        assert_eq!(l.attempts_made, 2);
        assert!(l.error.contains("rejected"), "{}", l.error);
        assert_eq!(l.event["status"], "failed");
        assert_eq!(l.event["partition_key"], "k");
        // Its row deleted (cleanup --include-failed), the letter brings the
        // event back as a new pending row with its id, key and payload.
        use omnibox::MaintenanceStore;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            db.store
                .outbox()
                .delete_failed(Duration::ZERO, 10)
                .await
                .unwrap(),
            1
        );
        assert!(db.store.outbox().get(bad.id()).await.unwrap().is_none());
        let r = db
            .store
            .dead_letters()
            .replay(
                &[l.id],
                omnibox::store::audit::AuditEntry::new("test", "replay"),
            )
            .await
            .unwrap();
        assert_eq!((r.replayed.len(), r.left.len()), (1, 0), "{r:?}");
        let back = db.store.outbox().get(bad.id()).await.unwrap().unwrap();
        assert_eq!(
            (back.status(), back.attempts_made(), back.last_error()),
            (EventStatus::Pending, 0, None)
        );
        assert_eq!((back.topic(), back.partition_key()), ("forbidden", "k"));
        assert_eq!(back.payload(), bad.payload());
        assert_eq!(back.max_attempts(), 2);
        assert!(
            back.seq() > row.seq(),
            "a re-inserted row queues after the rows of its key"
        );
        // Replayed once: a second replay of the letter does nothing.
        let again = db
            .store
            .dead_letters()
            .replay(
                &[l.id],
                omnibox::store::audit::AuditEntry::new("test", "replay"),
            )
            .await
            .unwrap();
        assert!(
            again.replayed.is_empty() && again.left.is_empty(),
            "{again:?}"
        );
    }

    /// All brokers down: no attempt is spent; once the broker is back,
    /// everything is delivered.
    pub async fn broker_outage_spends_no_attempts(db: &TestDb) {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("omnibox=debug")
            .with_test_writer()
            .try_init();
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("orders", 1, 1).unwrap();
        let events: Vec<OutboxEvent> = (0..200)
            .map(|n| event("orders", &format!("k{}", n % 10), n))
            .collect();
        db.store.outbox().create_many(&events).await.unwrap();
        cluster.broker_down(1).unwrap();
        let sink = Arc::new(
            AnySink::from_url(
                &format!("kafka://{}", cluster.bootstrap_servers()),
                &[],
                Duration::from_secs(2),
            )
            .unwrap(),
        );
        let p = relay::publisher(
            db.store.outbox(),
            sink,
            options("relay-1", 50),
            Duration::from_secs(2),
        )
        .build();
        let (tx, rx) = watch::channel(false);
        let relay = tokio::spawn(async move {
            let opts = RunOptions {
                mode: RunMode::Watch,
                idle_max: Duration::from_millis(200),
                ..RunOptions::default()
            };
            run(&p, &opts, rx, &mut Sleep, |_| {}).await.unwrap()
        });
        // The relay meets the outage (its transient error is recorded),
        // then the broker stays down for 8 s in all: several of the
        // relay's retries, a span of time rather than a condition.
        let down = std::time::Instant::now();
        let mut met = false;
        while !met && down.elapsed() < Duration::from_secs(8) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            met = db
                .store
                .outbox()
                .list(&omnibox::ListFilter::default())
                .await
                .unwrap()
                .iter()
                .any(|e| {
                    e.last_error()
                        .is_some_and(|m| m.contains("broker not answering"))
                });
        }
        tokio::time::sleep_until((down + Duration::from_secs(8)).into()).await;
        let rows = db
            .store
            .outbox()
            .list(&omnibox::ListFilter {
                limit: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            rows.iter()
                .filter(|e| e.status() == EventStatus::Completed)
                .count(),
            0
        );
        assert!(
            rows.iter().all(|e| e.attempts_made() == 0),
            "an outage spends no attempt"
        );
        assert!(
            rows.iter().any(|e| e
                .last_error()
                .is_some_and(|m| m.contains("broker not answering"))),
            "the transient failure is recorded"
        );
        cluster.broker_up(1).unwrap();
        let mut done = false;
        for _ in 0..120 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if db.store.outbox().counts().await.unwrap().completed == 200 {
                done = true;
                break;
            }
        }
        tx.send(true).unwrap();
        let report = relay.await.unwrap();
        assert!(
            done,
            "not all delivered after the broker came back: {report:?}"
        );
        assert!(report.transient > 0);
        let rows = db
            .store
            .outbox()
            .list(&omnibox::ListFilter {
                limit: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(rows.iter().all(|e| e.attempts_made() == 0));
        let got = consume(
            &cluster.bootstrap_servers(),
            "orders",
            200,
            Duration::from_secs(30),
        )
        .await;
        let ids: std::collections::HashSet<_> =
            got.iter().map(|m| m.headers["event_id"].clone()).collect();
        assert_eq!(ids.len(), 200, "every event arrived");
        assert_eq!(db.store.outbox().counts().await.unwrap().locked, 0);
    }
}

backend_tests!(
    every_row_arrives_once_with_key_headers_and_envelope,
    rejected_record_is_counted_then_failed_then_dead_lettered,
    broker_outage_spends_no_attempts,
);

/// The broker rejects a key's first message (a real broker-side rejection:
/// the mock cluster answers the produce request with INVALID_RECORD) while
/// the key's later messages are in flight. No later event of the key may
/// reach the topic before an earlier one that is still retried: here the
/// later ones were acknowledged, so the rejected one is failed at once
/// (dead-lettered, with the reason) instead of being retried behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_rejection_never_reorders_a_key() {
    let db = common::sqlite().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 1, 1).unwrap();
    cluster.create_topic("orders.dlq", 1, 1).unwrap();
    // One message per produce request, so the rejection hits one message.
    let props = vec![
        ("linger.ms".to_string(), "0".to_string()),
        ("batch.num.messages".to_string(), "1".to_string()),
    ];
    let sink = Arc::new(
        AnySink::from_url(
            &format!("kafka://{}", cluster.bootstrap_servers()),
            &props,
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    // Warm the producer up (metadata, producer id), so the injected error
    // meets the first message of the key.
    let warm = event("orders", "warm-up", 0);
    db.store.outbox().create_many(&[warm]).await.unwrap();
    let r = drain(&db.store, sink.clone(), "relay-1", 10, Some("orders.dlq")).await;
    assert_eq!(r.completed, 1);
    let key: Vec<OutboxEvent> = (1..=6).map(|n| event("orders", "k", n)).collect();
    db.store.outbox().create_many(&key).await.unwrap();
    cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::Produce,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
    );
    let mut report = drain(&db.store, sink.clone(), "relay-1", 10, Some("orders.dlq")).await;
    for _ in 0..30 {
        let c = db.store.outbox().counts().await.unwrap();
        if c.pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        report = drain(&db.store, sink.clone(), "relay-1", 10, Some("orders.dlq")).await;
    }
    let c = db.store.outbox().counts().await.unwrap();
    assert_eq!(c.pending, 0, "{c:?} {report:?}");
    let got = consume(
        &cluster.bootstrap_servers(),
        "orders",
        c.completed as usize,
        Duration::from_secs(20),
    )
    .await;
    let order: Vec<i64> = got
        .iter()
        .filter(|m| m.key == "k")
        .map(|m| m.value["payload"]["n"].as_i64().unwrap())
        .collect();
    // First deliveries follow the key's order.
    let mut first = Vec::new();
    for n in &order {
        if !first.contains(n) {
            first.push(*n);
        }
    }
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "key k reached the topic out of order: {order:?}"
    );
    for e in &key {
        let row = db.store.outbox().get(e.id()).await.unwrap().unwrap();
        let n = e.payload()["n"].as_i64().unwrap();
        match row.status() {
            EventStatus::Completed => assert!(order.contains(&n)),
            EventStatus::Failed => {
                assert!(!order.contains(&n), "a failed event is not on the topic");
                assert!(
                    row.last_error()
                        .unwrap()
                        .contains("not retried: a later event of its key"),
                    "{:?}",
                    row.last_error()
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // The rejected first event either went out first after all, or was
    // dead-lettered: it never arrives after a later one.
    let head = db.store.outbox().get(key[0].id()).await.unwrap().unwrap();
    if head.status() == EventStatus::Failed {
        let dlq = consume(
            &cluster.bootstrap_servers(),
            "orders.dlq",
            1,
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].headers["event_id"], key[0].id().to_string());
    }
}

/// 4 relays over 20,000 rows in 100 keys: each key's events are on the topic
/// in insertion order, every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_keep_each_keys_order() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 8, 1).unwrap();
    let events: Vec<OutboxEvent> = (0..20_000)
        .map(|n| event("orders", &format!("key-{}", n % 100), n))
        .collect();
    db.store.outbox().create_many(&events).await.unwrap();
    let sink = kafka(&cluster, Duration::from_secs(10));
    let mut relays = Vec::new();
    for i in 0..4 {
        let store = db.store.clone();
        let sink = sink.clone();
        relays.push(tokio::spawn(async move {
            drain(&store, sink, &format!("relay-{i}"), 500, None).await
        }));
    }
    let mut total = 0;
    for r in relays {
        let report = r.await.unwrap();
        total += report.completed;
    }
    // A relay's Once run ends at its first empty claim, which can come while
    // another relay holds the keys; drain what is left.
    total += drain(&db.store, sink.clone(), "relay-final", 500, None)
        .await
        .completed;
    assert_eq!(total, 20_000);
    let got = consume(
        &cluster.bootstrap_servers(),
        "orders",
        20_000,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(got.len(), 20_000, "every event exactly once");
    let mut by_partition = got.clone();
    by_partition.sort_by_key(|m| (m.partition, m.offset));
    let mut last: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for m in &by_partition {
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

/// The database drops the relay's connections between publishing and
/// writing the results: the write is retried on a fresh connection, the rows
/// are completed, none is left locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_hiccup_while_writing_results_is_retried() {
    use omnibox::Event;
    use omnibox::pipeline::{BatchHandler, Outcome, ProcessorBuilder};
    use omnibox::store::postgres::{PgOptions, PgStore};

    struct DropConnections {
        admin: sqlx::PgPool,
        app: String,
    }
    impl BatchHandler<omnibox::OutboxRoute> for DropConnections {
        async fn handle(&self, events: &[Event<omnibox::OutboxRoute>]) -> Vec<Outcome> {
            let killed: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(&self.app)
            .fetch_all(&self.admin)
            .await
            .unwrap();
            assert!(!killed.is_empty(), "no connection to drop");
            vec![Outcome::Completed; events.len()]
        }
    }

    let Some(url) = common::pg_url() else { return };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let app = format!("omnibox-hiccup-{}", &schema[2..10]);
    let store = PgStore::connect(
        &url,
        &PgOptions {
            schema: Some(schema.clone()),
            application_name: Some(app.clone()),
            ..PgOptions::default()
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let events: Vec<OutboxEvent> = (0..50)
        .map(|n| event("orders", &format!("k{n}"), n))
        .collect();
    store.outbox().create_many(&events).await.unwrap();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let p = ProcessorBuilder::new(
        store.outbox(),
        DropConnections {
            admin: admin.clone(),
            app,
        },
        options("relay-1", 100),
    )
    .build();
    let report = p.process_batch().await.unwrap();
    assert_eq!(report.claimed, 50);
    assert!(report.commit_error.is_none(), "{:?}", report.commit_error);
    assert_eq!(report.completed, 50);
    let c = store.outbox().counts().await.unwrap();
    assert_eq!((c.completed, c.locked), (50, 0));
    let ddl = format!("DROP SCHEMA {schema} CASCADE");
    sqlx::query(sqlx::AssertSqlSafe(ddl))
        .execute(&admin)
        .await
        .unwrap();
}

/// A handler that waits, for tests of what happens while a batch is slow.
struct Slow(Duration);

impl omnibox::pipeline::BatchHandler<omnibox::OutboxRoute> for Slow {
    async fn handle(
        &self,
        events: &[omnibox::Event<omnibox::OutboxRoute>],
    ) -> Vec<omnibox::pipeline::Outcome> {
        tokio::time::sleep(self.0).await;
        vec![omnibox::pipeline::Outcome::Completed; events.len()]
    }
}

/// A batch slower than its lease keeps its rows: the lease is extended while
/// it is in flight, so another relay cannot take (and publish again) a live
/// batch. Before, a lease shorter than the batch let the rows go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_keeps_its_lease() {
    use omnibox::pipeline::ProcessorBuilder;
    let db = common::sqlite().await;
    let events: Vec<OutboxEvent> = (0..20)
        .map(|n| event("orders", &format!("k{n}"), n))
        .collect();
    db.store.outbox().create_many(&events).await.unwrap();
    let mut o = options("slow", 100);
    o.lease = Duration::from_millis(600);
    let slow =
        ProcessorBuilder::new(db.store.outbox(), Slow(Duration::from_millis(2000)), o).build();
    let store = db.store.clone();
    let other = tokio::spawn(async move {
        let mut taken = 0;
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_millis(120)).await;
            let c = store
                .outbox()
                .claim(&omnibox::ClaimOptions::new(
                    WorkerId::new("other").unwrap(),
                    100,
                ))
                .await
                .unwrap();
            taken += c.len();
        }
        taken
    });
    let report = slow.process_batch().await.unwrap();
    assert_eq!(
        other.await.unwrap(),
        0,
        "another relay took rows of a live batch"
    );
    assert_eq!(
        (report.claimed, report.completed, report.lease_lost),
        (20, 20, 0)
    );
}

/// A row whose attempts were used up outside omnibox is not published: it
/// becomes failed at once (and dead-lettered); its key goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_attempts_used_up_is_dead_lettered_unpublished() {
    let db = common::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.jsonl");
    let sink = Arc::new(
        AnySink::from_url(
            &format!("file:{}", file.display()),
            &[],
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    let events: Vec<OutboxEvent> = (0..3).map(|n| event("orders", "k", n)).collect();
    db.store.outbox().create_many(&events).await.unwrap();
    let AnyStore::Sqlite(s) = &db.store else {
        unreachable!()
    };
    sqlx::query("UPDATE outbox_events SET attempts_made = max_attempts, last_error = 'edited' WHERE id = ?1")
        .bind(events[0].id().to_string())
        .execute(s.pool())
        .await
        .unwrap();
    let report = drain(&db.store, sink, "relay-1", 10, None).await;
    assert_eq!((report.completed, report.dead), (2, 1), "{report:?}");
    let head = db
        .store
        .outbox()
        .get(events[0].id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head.status(), EventStatus::Failed);
    assert!(
        head.last_error().unwrap().contains("attempts were used up"),
        "{:?}",
        head.last_error()
    );
    let published = std::fs::read_to_string(&file).unwrap();
    assert_eq!(published.lines().count(), 2);
    assert!(!published.contains(&events[0].id().to_string()));
}

/// The database going away after some batches ends a --once run with the
/// work done reported and an error (exit 1 for `publish`), not as "nothing
/// changed" (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_failure_mid_run_is_reported_with_the_work_done() {
    use omnibox::pipeline::{BatchHandler, Outcome, ProcessorBuilder};
    struct DropTable(AnyStore);
    impl BatchHandler<omnibox::OutboxRoute> for DropTable {
        async fn handle(&self, events: &[omnibox::Event<omnibox::OutboxRoute>]) -> Vec<Outcome> {
            let AnyStore::Sqlite(s) = &self.0 else {
                unreachable!()
            };
            sqlx::query("ALTER TABLE outbox_events RENAME TO outbox_events_gone")
                .execute(s.pool())
                .await
                .ok();
            vec![Outcome::Completed; events.len()]
        }
    }
    let db = common::sqlite().await;
    let events: Vec<OutboxEvent> = (0..30)
        .map(|n| event("orders", &format!("k{n}"), n))
        .collect();
    db.store.outbox().create_many(&events).await.unwrap();
    let mut o = options("relay-1", 10);
    o.commit_retry_for = Duration::from_millis(300);
    let p = ProcessorBuilder::new(db.store.outbox(), DropTable(db.store.clone()), o).build();
    let (_tx, rx) = watch::channel(false);
    let opts = RunOptions {
        mode: RunMode::Once,
        ..RunOptions::default()
    };
    let report = run(&p, &opts, rx, &mut Sleep, |_| {})
        .await
        .expect("a report, not an error");
    assert!(report.error, "{report:?}");
    assert!(report.batches >= 1);
    assert!(report.stopped_because.unwrap().contains("no such table"));
}

/// A batch handler (a service's own, or a step around it) that panics:
/// each event of the batch gets a counted failure naming the panic, its
/// lock is released, and the processor goes on to the next batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_batch_handler_is_a_counted_failure() {
    use omnibox::pipeline::{BatchHandler, Outcome, ProcessorBuilder};
    struct PanicsOnK1;
    impl BatchHandler<omnibox::OutboxRoute> for PanicsOnK1 {
        async fn handle(&self, events: &[omnibox::Event<omnibox::OutboxRoute>]) -> Vec<Outcome> {
            let keys: Vec<&str> = events.iter().map(|e| e.partition_key()).collect();
            assert!(!keys.contains(&"k1"), "no handler for {keys:?}");
            vec![Outcome::Completed; events.len()]
        }
    }
    let db = common::sqlite().await;
    let events: Vec<OutboxEvent> = (0..4)
        .map(|n| event("orders", &format!("k{n}"), n))
        .collect();
    db.store.outbox().create_many(&events).await.unwrap();
    let p = ProcessorBuilder::new(db.store.outbox(), PanicsOnK1, options("relay-1", 2)).build();
    let first = p.process_batch().await.unwrap();
    let second = p.process_batch().await.unwrap();
    assert_eq!((first.claimed, first.completed), (2, 0), "{first:?}");
    assert_eq!((second.claimed, second.completed), (2, 2), "{second:?}");
    for e in &events[..2] {
        let row = db.store.outbox().get(e.id()).await.unwrap().unwrap();
        assert_eq!(
            (row.status(), row.attempts_made(), row.is_locked()),
            (EventStatus::Pending, 1, false)
        );
        assert!(
            row.last_error()
                .is_some_and(|m| m.starts_with("handler panicked: no handler for [\"k0\", \"k1\"]")),
            "{:?}",
            row.last_error()
        );
    }
}
