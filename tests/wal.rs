//! The WAL relay (`omnibox publish --source wal`) as users run it: the
//! binary, the shared PostgreSQL (started with `wal_level = logical` by
//! scripts/test.sh) and a Kafka-protocol broker (tansu). Each test reads a
//! slot and a publication of its own, named after its schema, and drops
//! them at the end.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;
use common::kafka::{Received, consume};
use common::tansu::{Tansu, create_topic, shared_brokers};
use omnibox::{DomainService, EventStore, NewOutboxEvent, OutboxEvent, OutboxStore};
use serde_json::json;
use sqlx::PgPool;

/// The relay process, killed if the test ends first.
struct Relay(Option<Child>);

impl Relay {
    /// SIGTERM, then the exit code.
    fn stop(mut self) -> i32 {
        let mut c = self.0.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap().code().unwrap_or(-1)
    }

    /// SIGKILL, nothing finished.
    fn kill9(mut self) {
        let mut c = self.0.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
        let _ = c.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The slot and publication of one test, dropped at its end.
struct Wal {
    pool: PgPool,
    name: String,
}

impl Wal {
    async fn new(db: &TestDb) -> Wal {
        let pool = PgPool::connect(&db.url).await.unwrap();
        Wal {
            pool,
            name: db.schema().to_string(),
        }
    }

    /// The relay writing `log` reads the slot: it said so (after creating
    /// the slot, which holds it for a moment too), and the slot is active.
    async fn held(&self, dir: &Path, log_name: &str) -> bool {
        log(dir, log_name).contains("reading the write-ahead log") && self.slot_active().await
    }

    async fn slot_active(&self) -> bool {
        sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&self.name)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
            .unwrap_or(false)
    }

    /// Has the slot confirmed everything up to `lsn`?
    async fn confirmed_past(&self, lsn: &str) -> bool {
        sqlx::query_scalar(
            "SELECT coalesce(confirmed_flush_lsn >= $2::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.name)
        .bind(lsn)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
        .unwrap_or(false)
    }

    async fn current_lsn(&self) -> String {
        sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn drop_all(&self) {
        for _ in 0..50 {
            if !self.slot_active().await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.name)
        .execute(&self.pool)
        .await;
        let ddl = format!("DROP PUBLICATION IF EXISTS {}", self.name);
        let _ = sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&self.pool)
            .await;
    }
}

fn command(db: &TestDb, dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_omnibox"));
    cmd.current_dir(dir)
        .env_clear()
        .env("OMNIBOX_DATABASE_URL", &db.url)
        .env("OMNIBOX_DATABASE_SCHEMA", db.schema());
    cmd
}

fn spawn_relay(db: &TestDb, dir: &Path, brokers: &str, extra: &[&str], log: &str) -> Relay {
    let name = db.schema();
    let mut args = vec![
        "publish",
        "--source",
        "wal",
        "--slot",
        name,
        "--publication",
        name,
        "--batch",
        "50",
        "--poll-interval",
        "200ms",
        "--lease",
        "2s",
    ];
    args.extend_from_slice(extra);
    let broker = format!("kafka://{brokers}");
    let child = command(db, dir)
        .args(&args)
        .args(["--broker", &broker])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap())
        .spawn()
        .unwrap();
    Relay(Some(child))
}

/// The WAL relay on the test's slot and publication, to the null sink,
/// serving metrics on `addr`, logging to relay.log.
fn spawn_null_relay(db: &TestDb, dir: &Path, name: &str, extra: &[&str], addr: &str) -> Relay {
    let child = command(db, dir)
        .args([
            "publish",
            "--source",
            "wal",
            "--slot",
            name,
            "--publication",
            name,
        ])
        .args(["--broker", "null"])
        .args(extra)
        .args(["--metrics-addr", addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("relay.log")).unwrap())
        .spawn()
        .unwrap();
    Relay(Some(child))
}

fn event(topic: &str, key: &str, n: usize) -> OutboxEvent {
    DomainService::default()
        .create_outbox_event(NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            "order.created",
            topic,
            key,
            json!({"n": n}),
        ))
        .unwrap()
}

/// Inserts `txs` transactions of `per` rows over `keys` keys.
async fn insert(db: &TestDb, topic: &str, txs: usize, per: usize, keys: usize) -> Vec<OutboxEvent> {
    let mut all = Vec::new();
    for t in 0..txs {
        let batch: Vec<OutboxEvent> = (0..per)
            .map(|i| event(topic, &format!("k{}", (t * per + i) % keys), t * per + i))
            .collect();
        db.store.outbox().create_many(&batch).await.unwrap();
        all.extend(batch);
    }
    all
}

async fn wait_for<F: std::future::Future<Output = bool>>(
    dir: &Path,
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) {
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > limit {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    eprintln!("--- {}\n{text}", entry.path().display());
                }
            }
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn completed(db: &TestDb) -> u64 {
    db.store.outbox().counts().await.unwrap().completed
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Every event published at least once, and per key the first time each
/// was published follows insertion order.
fn assert_published_in_key_order(got: &[Received], events: &[OutboxEvent]) {
    let ids: HashSet<String> = got.iter().map(|m| m.headers["event_id"].clone()).collect();
    for e in events {
        assert!(
            ids.contains(&e.id().to_string()),
            "{} never published",
            e.id()
        );
    }
    let mut by_partition: Vec<&Received> = got.iter().collect();
    by_partition.sort_by_key(|m| (m.partition, m.offset));
    let order: HashMap<String, usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id().to_string(), i))
        .collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for m in by_partition {
        let id = m.headers["event_id"].as_str();
        if !seen.insert(id) {
            continue;
        }
        let Some(&i) = order.get(id) else { continue };
        if let Some(&before) = last.get(m.key.as_str()) {
            assert!(
                before < i,
                "key {}: event {i} first published after {before}",
                m.key
            );
        }
        last.insert(m.key.as_str(), i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_relay_streams_resumes_and_refuses_a_second_reader() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let Some(brokers) = shared_brokers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wal = Wal::new(&db).await;
    let topic = format!("wal-{}", db.schema());
    create_topic(&brokers, &topic, 2).await;

    // Rows from before the slot: the relay's first scan sends them.
    let mut events = insert(&db, &topic, 1, 20, 5).await;
    let addr = common::free_addr();
    let relay = spawn_relay(&db, d, &brokers, &["--metrics-addr", &addr], "first.log");
    wait_for(d, "the slot held", Duration::from_secs(30), || {
        wal.held(d, "first.log")
    })
    .await;
    assert!(
        log(d, "first.log").contains("(created)"),
        "{}",
        log(d, "first.log")
    );

    // A second reader of the slot is refused, with what to do.
    let second = command(&db, d)
        .args([
            "publish",
            "--source",
            "wal",
            "--slot",
            db.schema(),
            "--publication",
            db.schema(),
        ])
        .args(["--broker", &format!("kafka://{brokers}")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        err.contains("in use by another WAL relay") && err.contains("--standby"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A standby waits for the slot, and a signal ends its wait.
    let idle = spawn_relay(&db, d, &brokers, &["--standby"], "idle.log");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(idle.stop(), 0, "{}", log(d, "idle.log"));
    let standby = spawn_relay(&db, d, &brokers, &["--standby"], "again.log");

    events.extend(insert(&db, &topic, 10, 20, 5).await);
    wait_for(d, "220 published", Duration::from_secs(60), || async {
        completed(&db).await == 220
    })
    .await;
    // The slot confirms past the inserts once their rows are published.
    let lsn = wal.current_lsn().await;
    wait_for(d, "the slot confirmed", Duration::from_secs(30), || {
        wal.confirmed_past(&lsn)
    })
    .await;
    // The stream's metrics: the 200 rows inserted after the slot (the 20
    // from before it went out through a scan), nothing left waiting.
    let scrape = || async {
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    wait_for(
        d,
        "the stream's metrics",
        Duration::from_secs(10),
        || async {
            let text = scrape().await;
            text.contains("omnibox_wal_rows_total 200")
                && text.contains("omnibox_wal_keys_waiting 0")
        },
    )
    .await;
    assert!(scrape().await.contains("omnibox_wal_confirmed_lsn "));
    assert_eq!(relay.stop(), 0, "{}", log(d, "first.log"));

    // The standby takes the same slot over: nothing re-sent, new rows
    // streamed.
    let relay = standby;
    wait_for(
        d,
        "the standby reading",
        Duration::from_secs(30),
        || async { log(d, "again.log").contains("reading the write-ahead log") },
    )
    .await;
    assert!(
        !log(d, "again.log").contains("(created)"),
        "{}",
        log(d, "again.log")
    );
    events.extend(insert(&db, &topic, 3, 10, 5).await);
    wait_for(d, "250 published", Duration::from_secs(60), || async {
        completed(&db).await == 250
    })
    .await;
    assert_eq!(relay.stop(), 0, "{}", log(d, "again.log"));

    let got = consume(&brokers, &topic, 250, Duration::from_secs(30)).await;
    assert_eq!(
        got.len(),
        250,
        "each event once: clean stops re-send nothing"
    );
    assert_published_in_key_order(&got, &events);
    let c = db.store.outbox().counts().await.unwrap();
    assert_eq!((c.pending, c.failed, c.locked), (0, 0, 0));
    wal.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_relay_survives_kill_9_and_a_broker_outage() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let Some(mut tansu) = Tansu::start().await else {
        return;
    };
    let brokers = tansu.brokers();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wal = Wal::new(&db).await;
    let topic = "orders";
    create_topic(&brokers, topic, 2).await;

    let relay = spawn_relay(&db, d, &brokers, &[], "first.log");
    wait_for(d, "the slot held", Duration::from_secs(30), || {
        wal.held(d, "first.log")
    })
    .await;
    let mut events = Vec::new();
    for _ in 0..6 {
        events.extend(insert(&db, topic, 10, 10, 7).await);
        if completed(&db).await > 0 {
            break;
        }
    }
    wait_for(d, "some published", Duration::from_secs(30), || async {
        completed(&db).await >= 50
    })
    .await;
    // Killed mid-stream: the rows its claims held (row locks, the
    // default) are free at once, and the stream resumes at the last
    // confirmed position. The next relay writes leases: both kinds of
    // claim read the same stream and table.
    relay.kill9();
    events.extend(insert(&db, topic, 5, 10, 7).await);
    let relay = spawn_relay(&db, d, &brokers, &["--hold", "lease"], "second.log");
    let total = events.len() as u64;
    wait_for(
        d,
        "all published after kill -9",
        Duration::from_secs(60),
        || async { completed(&db).await == total },
    )
    .await;

    // The broker goes away: nothing is published, no attempt spent.
    tansu.kill();
    let during = insert(&db, topic, 4, 5, 7).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for e in &during {
        let row = db.store.outbox().get(e.id()).await.unwrap().unwrap();
        assert_eq!(row.attempts_made(), 0, "an outage spends no attempt");
        assert_eq!(row.status(), omnibox::EventStatus::Pending);
    }
    tansu.start_again().await;
    events.extend(during);
    let total = events.len() as u64;
    wait_for(
        d,
        "all published after the outage",
        Duration::from_secs(90),
        || async { completed(&db).await == total },
    )
    .await;
    assert_eq!(relay.stop(), 0, "{}", log(d, "second.log"));
    let got = consume(&brokers, topic, events.len(), Duration::from_secs(30)).await;
    assert_published_in_key_order(&got, &events);
    let c = db.store.outbox().counts().await.unwrap();
    assert_eq!((c.pending, c.failed, c.locked), (0, 0, 0));
    wal.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_relay_fails_rejected_records_waits_for_scheduled_rows_and_sends_replays() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let Some(brokers) = shared_brokers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wal = Wal::new(&db).await;
    let topic = format!("wal-{}", db.schema());
    create_topic(&brokers, &topic, 1).await;
    let outbox = db.store.outbox();

    // A producer limit the big event passes: the record is rejected.
    let relay = spawn_relay(
        &db,
        d,
        &brokers,
        &["-X", "message.max.bytes=1000", "--dlq", "table"],
        "limited.log",
    );
    wait_for(d, "the slot held", Duration::from_secs(30), || {
        wal.held(d, "limited.log")
    })
    .await;
    let mut big = NewOutboxEvent::new(
        "order",
        uuid::Uuid::now_v7(),
        "order.created",
        &topic,
        "k",
        json!({"blob": "x".repeat(5000)}),
    );
    big.max_attempts = Some(1);
    let big = DomainService::default().create_outbox_event(big).unwrap();
    let after = event(&topic, "k", 1);
    let mut later = NewOutboxEvent::new(
        "order",
        uuid::Uuid::now_v7(),
        "order.created",
        &topic,
        "other",
        json!({"n": 2}),
    );
    later.scheduled_at = Some(omnibox::time::now() + chrono::Duration::seconds(4));
    let later = DomainService::default().create_outbox_event(later).unwrap();
    outbox
        .create_many(&[big.clone(), after.clone(), later.clone()])
        .await
        .unwrap();
    wait_for(
        d,
        "the big event failed",
        Duration::from_secs(30),
        || async {
            outbox.get(big.id()).await.unwrap().unwrap().status() == omnibox::EventStatus::Failed
        },
    )
    .await;
    let row = outbox.get(big.id()).await.unwrap().unwrap();
    assert!(
        row.last_error()
            .unwrap_or_default()
            .contains("broker rejected the record"),
        "{row:?}"
    );
    wait_for(
        d,
        "the event after it sent",
        Duration::from_secs(30),
        || async {
            outbox.get(after.id()).await.unwrap().unwrap().status()
                == omnibox::EventStatus::Completed
        },
    )
    .await;
    let dead: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.omnibox_dead_letters WHERE event_id = $1",
        db.schema()
    )))
    .bind(big.id())
    .fetch_one(&wal.pool)
    .await
    .unwrap();
    assert_eq!(dead, 1, "a dead letter in the table");
    // The scheduled row waits for its time, then a scan sends it.
    assert_eq!(
        outbox.get(later.id()).await.unwrap().unwrap().status(),
        omnibox::EventStatus::Pending
    );
    wait_for(
        d,
        "the scheduled row sent",
        Duration::from_secs(30),
        || async {
            outbox.get(later.id()).await.unwrap().unwrap().status()
                == omnibox::EventStatus::Completed
        },
    )
    .await;
    let row = outbox.get(later.id()).await.unwrap().unwrap();
    assert!(row.completed_at().unwrap() >= later.scheduled_at());
    assert_eq!(relay.stop(), 0, "{}", log(d, "limited.log"));

    // The limit lifted and the event replayed: the WAL relay sends it.
    let relay = spawn_relay(&db, d, &brokers, &[], "fixed.log");
    wait_for(d, "the slot held again", Duration::from_secs(30), || {
        wal.held(d, "fixed.log")
    })
    .await;
    let out = command(&db, d)
        .args([
            "replay",
            "--id",
            &big.id().to_string(),
            "--reason",
            "limit lifted",
            "--yes",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        d,
        "the replayed event sent",
        Duration::from_secs(30),
        || async {
            outbox.get(big.id()).await.unwrap().unwrap().status() == omnibox::EventStatus::Completed
        },
    )
    .await;
    assert_eq!(relay.stop(), 0, "{}", log(d, "fixed.log"));
    let got = consume(&brokers, &topic, 3, Duration::from_secs(20)).await;
    let ids: Vec<String> = got.iter().map(|m| m.headers["event_id"].clone()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    for e in [&after, &later, &big] {
        assert!(ids.contains(&e.id().to_string()));
    }
    wal.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_relay_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |url: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_omnibox"))
            .current_dir(d)
            .env_clear()
            .env("OMNIBOX_DATABASE_URL", url)
            .args(["publish", "--source", "wal"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let sqlite = format!("sqlite://{}", d.join("db.sqlite").display());
    let (code, err) = run(&sqlite, &["--broker", "null"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("this database is SQLite"), "{err}");
    let (code, err) = run(&sqlite, &["--once"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--once is the polling relay's"), "{err}");
    let pg = "postgres://nobody@127.0.0.1:1/none";
    let (code, err) = run(pg, &["--slot", "Bad-Name"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("invalid slot name"), "{err}");
    assert!(!d.join("db.sqlite").exists(), "nothing created");
}

/// The private server's port (below Linux's ephemeral range, as in
/// tests/restarts.rs; 29341 to 29344 are restarts.rs's and tls.rs's).
const PRIVATE_PORT: &str = "29345";

/// The private server of the test of a shutdown while keys pile up.
const PILE_PORT: &str = "29346";

fn private_pg(cmd: &[&str]) -> String {
    private_pg_on(PRIVATE_PORT, cmd)
}

fn private_pg_on(port: &str, cmd: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh");
    let out = Command::new(script)
        .args(cmd)
        .args(["--port", port])
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/postgres.sh");
    assert!(out.status.success(), "postgres.sh {cmd:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts a private server with `wal_level = logical` on `port`: its guard
/// and URL.
fn start_private(port: &'static str) -> (PrivateServer, String) {
    let server = PrivateServer(port);
    let exports = private_pg_on(port, &["start", "--logical"]);
    let url = exports
        .lines()
        .find_map(|l| l.strip_prefix("export OMNIBOX_TEST_DATABASE_URL="))
        .expect("the server's URL")
        .to_string();
    (server, url)
}

/// Stops the private server whatever happens to the test.
struct PrivateServer(&'static str);

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh");
        let _ = Command::new(script)
            .args(["stop", "--port", self.0])
            .status();
    }
}

/// PostgreSQL restarted in immediate mode (a crash: the slot's position
/// is the one of the last checkpoint) while the relay runs: it goes on
/// once the server is back, and every row is published; transactions the
/// server sends again find their rows completed and publish nothing twice.
/// Then a fast shutdown while rows are being published: the relay does
/// not hold the server up, and the rows it had not settled are published
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_relay_goes_on_after_a_postgresql_restart() {
    if common::pg_url().is_none() {
        return;
    }
    let Some(brokers) = shared_brokers() else {
        return;
    };
    let (_server, url) = start_private(PRIVATE_PORT);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = omnibox::store::AnyStore::connect(&url, &Default::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let topic = format!("wal-restart-{}", uuid::Uuid::new_v4().simple());
    create_topic(&brokers, &topic, 2).await;
    let spawn = |log: &str| {
        Relay(Some(
            Command::new(env!("CARGO_BIN_EXE_omnibox"))
                .current_dir(d)
                .env_clear()
                .env("OMNIBOX_DATABASE_URL", &url)
                .args([
                    "publish",
                    "--source",
                    "wal",
                    "--batch",
                    "50",
                    "--poll-interval",
                    "200ms",
                ])
                // A crash can lose the last results (the test server does
                // not flush them): their rows come back after the lease.
                .args(["--lease", "2s"])
                .args(["--broker", &format!("kafka://{brokers}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join(log)).unwrap())
                .spawn()
                .unwrap(),
        ))
    };
    let relay = spawn("relay.log");
    let outbox = store.outbox();
    let insert = |n: usize, from: usize| {
        let outbox = outbox.clone();
        let topic = topic.clone();
        async move {
            let mut all = Vec::new();
            for t in 0..n {
                let batch: Vec<OutboxEvent> = (0..10)
                    .map(|i| {
                        event(
                            &topic,
                            &format!("k{}", (from + t * 10 + i) % 7),
                            from + t * 10 + i,
                        )
                    })
                    .collect();
                // A producer retries while the server restarts.
                let mut tries = 0;
                while let Err(e) = outbox.create_many(&batch).await {
                    tries += 1;
                    assert!(tries < 100, "{e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                all.extend(batch);
            }
            all
        }
    };
    let mut events = insert(10, 0).await;
    wait_for(d, "100 published", Duration::from_secs(60), || async {
        outbox.counts().await.map(|c| c.completed).unwrap_or(0) == 100
    })
    .await;
    private_pg(&["restart", "--mode", "immediate"]);
    events.extend(insert(10, 100).await);
    wait_for(
        d,
        "200 published after the restart",
        Duration::from_secs(90),
        || async {
            match outbox.counts().await {
                Ok(c) => c.completed == 200,
                Err(e) => {
                    eprintln!("counts: {e}");
                    false
                }
            }
        },
    )
    .await;
    // A fast shutdown (pg_ctl's default) as a transaction of 2,000 rows is
    // being published: PostgreSQL waits for a logical client to confirm
    // all it was sent, so a relay confirming only what it had published
    // (it cannot finish: its connections are ended) held the server in
    // "shutting down" for as long as it ran (postgres.sh's halt gives up
    // after 60 s). Down for seconds: the stream reconnects with backoff
    // meanwhile.
    let burst: Vec<OutboxEvent> = (200..2200)
        .map(|n| event(&topic, &format!("k{}", n % 7), n))
        .collect();
    outbox.create_many(&burst).await.unwrap();
    events.extend(burst);
    private_pg(&["halt", "--mode", "fast"]);
    std::thread::sleep(Duration::from_secs(4));
    private_pg(&["resume"]);
    events.extend(insert(10, 2200).await);
    wait_for(
        d,
        "2,300 published after an outage",
        Duration::from_secs(90),
        || async { outbox.counts().await.map(|c| c.completed).unwrap_or(0) == 2300 },
    )
    .await;
    assert_eq!(relay.stop(), 0, "{}", log(d, "relay.log"));
    let text = log(d, "relay.log");
    // Said once for each outage, not at every reconnection.
    assert_eq!(
        text.matches("the replication stream broke").count(),
        2,
        "{text}"
    );
    let got = consume(&brokers, &topic, 2300, Duration::from_secs(30)).await;
    assert_published_in_key_order(&got, &events);
    let ids: HashSet<String> = got.iter().map(|m| m.headers["event_id"].clone()).collect();
    assert_eq!(ids.len(), 2300);
    let c = outbox.counts().await.unwrap();
    assert_eq!((c.pending, c.failed, c.locked), (0, 0, 0));
}

/// Keys pile up while the broker is down: past 200,000 waiting, the rows
/// of new transactions are left to the scans and the stream goes on being
/// read. A relay that stopped reading it instead (as it did) kept a fast
/// shutdown of PostgreSQL waiting for its answer for as long as it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_shutdown_is_not_held_up_while_keys_pile_up() {
    if common::pg_url().is_none() {
        return;
    }
    let (_server, url) = start_private(PILE_PORT);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = PgPool::connect(&url).await.unwrap();
    omnibox::store::PgStore::from_pool(pool.clone())
        .migrate()
        .await
        .unwrap();
    // No broker listens on port 1: claims pause at the first batch.
    let relay = Relay(Some(
        Command::new(env!("CARGO_BIN_EXE_omnibox"))
            .current_dir(d)
            .env_clear()
            .env("OMNIBOX_DATABASE_URL", &url)
            .args(["publish", "--source", "wal", "--batch", "50"])
            .args(["--broker", "kafka://127.0.0.1:1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("relay.log")).unwrap())
            .spawn()
            .unwrap(),
    ));
    // Its slot exists once it says so: later inserts are in the stream.
    wait_for(d, "the relay started", Duration::from_secs(30), || async {
        log(d, "relay.log").contains("reading the write-ahead log")
    })
    .await;
    // Three transactions of 100,000 keys each (the stream keeps 100,000
    // rows of one), then one more: it finds 200,000 keys waiting.
    let insert = |rows: i32| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO outbox_events (id, event_type, payload, created_at, updated_at,
                                            scheduled_at, aggregate_type, aggregate_id, topic,
                                            partition_key)
                 SELECT gen_random_uuid(), 'order.created', '{}', now(), now(), now(), 'order',
                        gen_random_uuid(), 'orders', gen_random_uuid()::text
                   FROM generate_series(1, $1)",
            )
            .bind(rows)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    for _ in 0..3 {
        insert(100_000).await;
    }
    let said = "the rows of new transactions are left to the table's scans";
    wait_for(d, "keys piled up", Duration::from_secs(120), || {
        let insert = insert(1);
        async move {
            insert.await;
            tokio::time::sleep(Duration::from_millis(400)).await;
            log(d, "relay.log").contains(said)
        }
    })
    .await;
    pool.close().await;
    let started = Instant::now();
    // postgres.sh's halt fails when the server is not down within 60 s.
    private_pg_on(PILE_PORT, &["halt", "--mode", "fast"]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the fast shutdown took {:?}",
        started.elapsed()
    );
    let text = log(d, "relay.log");
    assert_eq!(text.matches(said).count(), 1, "said once: {text}");
    drop(relay);
}

/// A user without the REPLICATION attribute (`omnibox_cert`, which
/// scripts/postgres.sh creates as a member of `omnibox`: it has the
/// tables' privileges, but REPLICATION is not inherited), on a slot and
/// publication that exist: the relay says at once that the server refused
/// its replication connection and what to do (exit 2), instead of retrying
/// for ever while it only scans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_relay_says_when_the_server_refuses_replication() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let wal = Wal::new(&db).await;
    let name = wal.name.clone();
    let role = "omnibox_cert";
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1 AND NOT rolreplication)",
    )
    .bind(role)
    .fetch_one(&wal.pool)
    .await
    .unwrap();
    if !exists {
        assert!(!common::under_ci(), "scripts/postgres.sh creates {role}");
        eprintln!("SKIPPED: no role {role} (scripts/postgres.sh creates it)");
        return;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE PUBLICATION {name} FOR TABLE {name}.outbox_events WITH (publish = 'insert')"
    )))
    .execute(&wal.pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&name)
        .execute(&wal.pool)
        .await
        .unwrap();
    let url = db.url.replacen("omnibox:omnibox@", &format!("{role}@"), 1);
    assert_ne!(url, db.url, "the test URL names the omnibox user");
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_omnibox"))
        .current_dir(dir.path())
        .env_clear()
        .env("OMNIBOX_DATABASE_URL", &url)
        .env("OMNIBOX_DATABASE_SCHEMA", &name)
        .args([
            "publish",
            "--source",
            "wal",
            "--slot",
            &name,
            "--publication",
            &name,
        ])
        .args(["--broker", "null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("refused the replication connection"), "{err}");
    assert!(err.contains("REPLICATION attribute"), "{err}");
    assert_eq!(
        err.lines()
            .filter(|l| !l.starts_with("omnibox: ") || l.contains("error"))
            .count(),
        1,
        "one line says it: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    wal.drop_all().await;
}

/// A run that ends for another reason than a signal (`--limit`) stops its
/// stream too, and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_relay_stops_at_its_limit() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let wal = Wal::new(&db).await;
    insert(&db, "t", 1, 10, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let name = db.schema();
    let out = command(&db, dir.path())
        .args([
            "publish",
            "--source",
            "wal",
            "--slot",
            name,
            "--publication",
            name,
        ])
        .args(["--broker", "null", "--batch", "5", "--limit", "5"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{err}");
    assert_eq!(completed(&db).await, 5, "{err}");
    wal.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_relay_reads_a_partitioned_outbox() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wal = Wal::new(&db).await;
    let name = db.schema();
    let migrated = command(&db, d)
        .args(["migrate", "--partitioned"])
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let in_schema = |sql: &str| format!("SET search_path = {name}; {sql}");

    // A publication that names the partitions, not the root, is refused
    // before anything streams.
    sqlx::raw_sql(sqlx::AssertSqlSafe(in_schema(&format!(
        "CREATE PUBLICATION {name} FOR TABLE outbox_events WITH (publish = 'insert')"
    ))))
    .execute(&wal.pool)
    .await
    .unwrap();
    let refused = command(&db, d)
        .args([
            "publish",
            "--source",
            "wal",
            "--slot",
            name,
            "--publication",
            name,
        ])
        .args(["--broker", "null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(err.contains("does not publish the inserts"), "{err}");
    wal.drop_all().await;

    // The relay's own publication publishes through the root: rows of
    // every partition arrive as outbox rows.
    let addr = common::free_addr();
    let relay = spawn_null_relay(
        &db,
        d,
        name,
        &["--batch", "50", "--poll-interval", "5s"],
        &addr,
    );
    wait_for(d, "the slot held", Duration::from_secs(30), || {
        wal.held(d, "relay.log")
    })
    .await;
    let via_root: bool =
        sqlx::query_scalar("SELECT pubviaroot FROM pg_publication WHERE pubname = $1")
            .bind(name)
            .fetch_one(&wal.pool)
            .await
            .unwrap();
    assert!(via_root);
    // Only the three columns the relay reads (PostgreSQL 15): no payload
    // goes through the stream.
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(attnames)::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
    )
    .bind(name)
    .fetch_all(&wal.pool)
    .await
    .unwrap();
    assert_eq!(columns, ["id", "partition_key", "topic"]);
    insert(&db, "t", 3, 10, 4).await;
    wait_for(
        d,
        "30 streamed and published",
        Duration::from_secs(30),
        || async {
            let text = reqwest::get(format!("http://{addr}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            text.contains("omnibox_wal_rows_total 30") && completed(&db).await == 30
        },
    )
    .await;
    assert_eq!(relay.stop(), 0, "{}", log(d, "relay.log"));
    wal.drop_all().await;
}

/// One transaction of more rows than the stream keeps (100,000): the
/// stream feeds the first 100,000, the scans find the rest, and every row
/// is published; the relay's memory does not grow with the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_the_stream_keeps_is_published_whole() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let wal = Wal::new(&db).await;
    let name = wal.name.clone();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let addr = common::free_addr();
    let relay = spawn_null_relay(
        &db,
        d,
        &name,
        &["--batch", "1000", "--poll-interval", "1s"],
        &addr,
    );
    wait_for(d, "the slot held", Duration::from_secs(30), || {
        wal.held(d, "relay.log")
    })
    .await;
    let rows = 100_050;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET search_path = {name};
         INSERT INTO outbox_events (id, event_type, payload, status, created_at, updated_at,
                                    scheduled_at, aggregate_type, aggregate_id, topic, partition_key)
         SELECT gen_random_uuid(), 'bulk', jsonb_build_object('n', g), 'pending', now(), now(),
                now(), 'order', gen_random_uuid(), 'bulk', 'k' || g
           FROM generate_series(1, {rows}) g"
    )))
    .execute(&wal.pool)
    .await
    .unwrap();
    wait_for(
        d,
        "every row published",
        Duration::from_secs(180),
        || async { completed(&db).await == rows },
    )
    .await;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let streamed = text
        .lines()
        .find_map(|l| l.strip_prefix("omnibox_wal_rows_total "))
        .map(|v| v.trim().parse::<f64>().unwrap());
    // Sampled every second: at most the stream's bound, never the whole.
    assert!(
        streamed.is_some_and(|n| n <= 100_000.0),
        "omnibox_wal_rows_total {streamed:?}"
    );
    assert_eq!(relay.stop(), 0, "{}", log(d, "relay.log"));
    wal.drop_all().await;
}
