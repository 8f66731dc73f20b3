//! Partitioned tables (`omnibox migrate --partitioned`) as users run them:
//! the binary and the library against the shared PostgreSQL, and the relay
//! through a Kafka-protocol broker (tansu). Each test works in a schema of
//! its own; old partitions are made by SQL, as time would have made them.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::TestDb;
use common::kafka::consume;
use common::run::{Run, run};
use common::tansu::{create_topic, shared_brokers};
use omnibox::store::{ClaimOptions, Created, InboxStore};
use omnibox::{
    DomainService, EventStore, NewInboxEvent, NewOutboxEvent, OutboxEvent, OutboxStore, WorkerId,
};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

fn command(db: &TestDb, dir: &Path) -> Command {
    let mut cmd = common::run::command(dir);
    cmd.env("OMNIBOX_DATABASE_URL", &db.url)
        .env("OMNIBOX_DATABASE_SCHEMA", db.schema());
    cmd
}

fn omnibox(db: &TestDb, dir: &Path, args: &[&str]) -> Run {
    let mut cmd = command(db, dir);
    cmd.args(args);
    run(cmd, None)
}

/// A pool whose sessions work in the test's schema.
async fn pool(db: &TestDb) -> PgPool {
    let opts = PgConnectOptions::from_str(&db.url)
        .unwrap()
        .options([("search_path", db.schema())]);
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .unwrap()
}

/// `migrate --partitioned` (daily, 2 ahead), checked to succeed.
fn partition(db: &TestDb, dir: &Path) -> serde_json::Value {
    let out = omnibox(db, dir, &["migrate", "--partitioned", "--format", "json"]);
    assert_eq!(out.code, 0, "{}", out.render());
    out.json()
}

fn today() -> DateTime<Utc> {
    let now = Utc::now();
    now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc()
}

/// The day partition of `table` starting `days` days before today, with
/// its key, as `partitions create` would have made it then.
async fn day_partition(pool: &PgPool, table: &str, days: i64) -> (String, DateTime<Utc>) {
    let start = today() - chrono::Duration::days(days);
    let name = format!("{table}_p{}", start.format("%Y%m%d"));
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ('{}') TO ('{}')",
        start.format("%Y-%m-%d %H:%M:%S+00"),
        (start + chrono::Duration::days(1)).format("%Y-%m-%d %H:%M:%S+00")
    );
    sqlx::query(sqlx::AssertSqlSafe(ddl))
        .execute(pool)
        .await
        .unwrap();
    let key = format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = '{name}'::regclass AND indisprimary) THEN
             ALTER TABLE {name} ADD CONSTRAINT {name}_pkey PRIMARY KEY (id); END IF; END $$"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(key))
        .execute(pool)
        .await
        .unwrap();
    (name, start)
}

/// `n` outbox rows created at `at` (in its partition), with `status`; a
/// completed row completed an hour later, a failed one updated then. Rows
/// of even number carry the idempotency key `{prefix}{i}`.
async fn old_rows(pool: &PgPool, at: DateTime<Utc>, n: i32, status: &str, prefix: &str) {
    sqlx::query(
        "INSERT INTO outbox_events (id, event_type, payload, status, attempts_made, last_error,
                completed_at, created_at, updated_at, scheduled_at, aggregate_type, aggregate_id,
                topic, partition_key, idempotency_key)
         SELECT gen_random_uuid(), 'e', '{}', $2, CASE WHEN $2 = 'failed' THEN 6 ELSE 0 END,
                CASE WHEN $2 = 'failed' THEN 'rejected' END,
                CASE WHEN $2 = 'completed' THEN $1 + interval '1 hour' END,
                $1, $1 + interval '1 hour', $1, 'o', gen_random_uuid(), 't', 'k',
                CASE WHEN g % 2 = 0 THEN $3 || g END
           FROM generate_series(1, $4) g",
    )
    .bind(at)
    .bind(status)
    .bind(prefix)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

async fn exists(pool: &PgPool, name: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

fn outbox_event(topic: &str, key: &str, n: usize) -> NewOutboxEvent {
    NewOutboxEvent::new(
        "order",
        uuid::Uuid::now_v7(),
        "order.created",
        topic,
        key,
        json!({"n": n}),
    )
}

fn created(new: NewOutboxEvent) -> OutboxEvent {
    DomainService::default().create_outbox_event(new).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_partitioned_converts_the_tables_and_keeps_their_rows() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = pool(&db).await;

    // SQLite is refused before anything is opened or created.
    let sqlite = d.join("x.db");
    let out = run(
        {
            let mut c = common::run::command(d);
            c.env(
                "OMNIBOX_DATABASE_URL",
                format!("sqlite://{}", sqlite.display()),
            )
            .args(["migrate", "--partitioned"]);
            c
        },
        None,
    );
    assert_eq!(out.code, 2, "{}", out.render());
    assert!(out.stderr.contains("needs PostgreSQL"), "{}", out.render());
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.render());
    assert!(!sqlite.exists());

    // Rows written before the conversion come along, with their ids,
    // sequence numbers and idempotency keys.
    let mut first = outbox_event("t", "k", 0);
    first.idempotency_key = Some("k1".into());
    let first = created(first);
    let events = [first.clone(), created(outbox_event("t", "k", 1))];
    db.store.outbox().create_many(&events).await.unwrap();
    let before: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT id, seq FROM outbox_events ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(before.len(), 2);

    let report = partition(&db, d);
    let tables = report["partitioned"].as_array().unwrap();
    assert_eq!(tables.len(), 2, "{report}");
    for t in tables {
        assert_eq!(t["converted"], true, "{report}");
        assert_eq!(t["period"], "day", "{report}");
        assert_eq!(t["created"].as_array().unwrap().len(), 3, "{report}");
    }
    assert_eq!(tables[0]["table"], "outbox");
    assert_eq!(tables[0]["rows_copied"], 2);
    for table in ["outbox_events", "inbox_events"] {
        let kind: String =
            sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)")
                .bind(table)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(kind, "p", "{table}");
    }
    let after: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT id, seq FROM outbox_events ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(after, before);

    // The partitions run from today's to two days ahead, back to back.
    let listed = omnibox(&db, d, &["partitions", "--format", "json"]);
    assert_eq!(listed.code, 0, "{}", listed.render());
    let parts = listed.json()["partitions"].as_array().unwrap().clone();
    let outbox: Vec<&serde_json::Value> = parts.iter().filter(|p| p["table"] == "outbox").collect();
    assert_eq!(outbox.len(), 3);
    assert_eq!(
        outbox[0]["name"],
        format!("outbox_events_p{}", today().format("%Y%m%d"))
    );
    for pair in outbox.windows(2) {
        assert_eq!(pair[0]["to"], pair[1]["from"]);
    }

    // Every command goes on as before: the schema is current, the key
    // is still taken, and the sequence goes on.
    let doctor = omnibox(&db, d, &["doctor"]);
    assert!(
        doctor.stdout.contains("as this omnibox expects") && doctor.stdout.contains("present"),
        "{}",
        doctor.render()
    );
    let mut again = outbox_event("t", "k", 2);
    again.idempotency_key = Some("k1".into());
    match db.store.outbox().create(&created(again)).await.unwrap() {
        Created::Existing(e) => assert_eq!(e.id(), first.id()),
        other => panic!("a key taken before the conversion let a row in: {other:?}"),
    }
    let third = created(outbox_event("t", "k", 3));
    db.store.outbox().create(&third).await.unwrap();
    let seq: i64 = sqlx::query_scalar("SELECT seq FROM outbox_events WHERE id = $1")
        .bind(third.id())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(seq > before[1].1, "seq {seq} after {:?}", before);

    // Running it again changes nothing; another period is refused.
    let report = partition(&db, d);
    for t in report["partitioned"].as_array().unwrap() {
        assert_eq!(t["converted"], false, "{report}");
        assert_eq!(t["created"].as_array().unwrap().len(), 0, "{report}");
    }
    // A partition made by hand without its key on id: doctor says how to
    // add it.
    sqlx::query(
        "CREATE TABLE outbox_events_p20200101 PARTITION OF outbox_events
             FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-01-02 00:00:00+00')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let doctor = omnibox(&db, d, &["doctor"]);
    assert!(
        doctor
            .stdout
            .contains("outbox_events_p20200101 without a unique key on id")
            && doctor
                .stdout
                .contains("ALTER TABLE outbox_events_p20200101 ADD PRIMARY KEY (id);"),
        "{}",
        doctor.render()
    );
    let out = omnibox(
        &db,
        d,
        &["migrate", "--partitioned", "--partition-period", "hour"],
    );
    assert_eq!(out.code, 2, "{}", out.render());
    assert!(
        out.stderr.contains("partitioned by day already"),
        "{}",
        out.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_inbox_messages_stay_unique_across_partitions() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    partition(&db, dir.path());
    let pool = pool(&db).await;
    let (_, old) = day_partition(&pool, "outbox_events", 20).await;
    day_partition(&pool, "inbox_events", 20).await;
    let at = old + chrono::Duration::hours(3);

    // An outbox key taken by a row of an old partition is taken today.
    let mut first = outbox_event("t", "k", 0);
    first.idempotency_key = Some("order-1".into());
    first.created_at = Some(at);
    let first = created(first);
    db.store.outbox().create(&first).await.unwrap();
    let in_old: i64 = count(
        &pool,
        &format!(
            "SELECT count(*) FROM outbox_events_p{} WHERE idempotency_key = 'order-1'",
            old.format("%Y%m%d")
        ),
    )
    .await;
    assert_eq!(in_old, 1);
    let mut retry = outbox_event("t", "k", 1);
    retry.idempotency_key = Some("order-1".into());
    match db.store.outbox().create(&created(retry)).await.unwrap() {
        Created::Existing(e) => assert_eq!(e.id(), first.id()),
        other => panic!("a retried key got a second row: {other:?}"),
    }

    // Eight producers with one new key at once: one row.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut e = outbox_event("t", "k", i);
            e.idempotency_key = Some("order-2".into());
            matches!(
                store.outbox().create(&created(e)).await.unwrap(),
                Created::Inserted(_)
            )
        }));
    }
    let mut inserted = 0;
    for t in tasks {
        inserted += usize::from(t.await.unwrap());
    }
    assert_eq!(inserted, 1);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM outbox_events WHERE idempotency_key = 'order-2'"
        )
        .await,
        1
    );

    // Deleting a row frees its key, as on a plain table.
    sqlx::query("DELETE FROM outbox_events WHERE id = $1")
        .bind(first.id())
        .execute(&pool)
        .await
        .unwrap();
    let mut later = outbox_event("t", "k", 9);
    later.idempotency_key = Some("order-1".into());
    assert!(matches!(
        db.store.outbox().create(&created(later)).await.unwrap(),
        Created::Inserted(_)
    ));

    // A message stored in an old partition is a duplicate today.
    let service = DomainService::default();
    let mut message =
        NewInboxEvent::new("m-1", "billing", "orders", "order.created", json!({"n": 1}));
    message.created_at = Some(at);
    let stored = service.create_inbox_event(message).unwrap();
    assert!(matches!(
        db.store.inbox().insert(&stored).await.unwrap(),
        Created::Inserted(_)
    ));
    let redelivered = service
        .create_inbox_event(NewInboxEvent::new(
            "m-1",
            "billing",
            "orders",
            "order.created",
            json!({"n": 1}),
        ))
        .unwrap();
    match db.store.inbox().insert(&redelivered).await.unwrap() {
        Created::Existing(e) => assert_eq!(e.id(), stored.id()),
        other => panic!("a redelivered message was stored again: {other:?}"),
    }
    // Another group's copy is its own.
    let other_group = service
        .create_inbox_event(NewInboxEvent::new(
            "m-1",
            "shipping",
            "orders",
            "order.created",
            json!({"n": 1}),
        ))
        .unwrap();
    assert!(matches!(
        db.store.inbox().insert(&other_group).await.unwrap(),
        Created::Inserted(_)
    ));

    // Eight consumers with one new message at once: one row.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let e = DomainService::default()
                .create_inbox_event(NewInboxEvent::new(
                    "m-2",
                    "billing",
                    "orders",
                    "order.created",
                    json!({"n": 1}),
                ))
                .unwrap();
            matches!(
                store.inbox().insert(&e).await.unwrap(),
                Created::Inserted(_)
            )
        }));
    }
    let mut inserted = 0;
    for t in tasks {
        inserted += usize::from(t.await.unwrap());
    }
    assert_eq!(inserted, 1);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM inbox_events WHERE message_id = 'm-2'"
        )
        .await,
        1
    );
    // A batch holding one message twice stores it once.
    let twice: Vec<_> = (0..2)
        .map(|_| {
            service
                .create_inbox_event(NewInboxEvent::new(
                    "m-3",
                    "billing",
                    "orders",
                    "order.created",
                    json!({"n": 1}),
                ))
                .unwrap()
        })
        .collect();
    let outcomes = db.store.inbox().insert_many(&twice).await.unwrap();
    assert_eq!(
        outcomes.iter().map(|o| o.existing).collect::<Vec<_>>(),
        [false, true]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_drops_partitions_past_retention_and_keeps_those_with_work() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    partition(&db, d);
    let pool = pool(&db).await;
    let hour = chrono::Duration::hours(1);
    // A: done long ago. B: one row still pending. C: empty. D: one failed
    // row. E: done, but younger than the retention.
    let (a, a_at) = day_partition(&pool, "outbox_events", 30).await;
    old_rows(&pool, a_at + hour, 2000, "completed", "a-").await;
    let (b, b_at) = day_partition(&pool, "outbox_events", 29).await;
    old_rows(&pool, b_at + hour, 100, "completed", "b-").await;
    old_rows(&pool, b_at + hour, 1, "pending", "").await;
    let (c, _) = day_partition(&pool, "outbox_events", 28).await;
    let (dd, d_at) = day_partition(&pool, "outbox_events", 27).await;
    old_rows(&pool, d_at + hour, 100, "completed", "d-").await;
    old_rows(&pool, d_at + hour, 1, "failed", "").await;
    let (e, e_at) = day_partition(&pool, "outbox_events", 3).await;
    old_rows(&pool, e_at + hour, 100, "completed", "e-").await;
    let keys_of = |p: &str| {
        format!("SELECT count(*) FROM omnibox_outbox_keys WHERE idempotency_key LIKE '{p}%'")
    };
    assert_eq!(count(&pool, &keys_of("a-")).await, 1000);

    // A dry run names what would go, and changes nothing.
    let plan = omnibox(
        &db,
        d,
        &[
            "cleanup",
            "--older-than",
            "7d",
            "--table",
            "outbox",
            "--dry-run",
            "--format",
            "json",
        ],
    );
    assert_eq!(plan.code, 0, "{}", plan.render());
    let t = &plan.json()["tables"][0];
    assert_eq!(t["partitions"], json!([a, c]), "{}", plan.render());
    assert_eq!(t["completed"], 2200, "{}", plan.render());
    let kept: Vec<&str> = t["kept_partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(kept, [b.as_str(), dd.as_str()]);
    assert!(
        plan.stderr
            .contains(&format!("kept partition {b}: it holds pending rows"))
    );
    assert!(exists(&pool, &a).await && exists(&pool, &c).await);

    // The cleanup drops A and C whole; in B and D it deletes the rows past
    // retention one by one and keeps the pending and failed rows.
    let done = omnibox(
        &db,
        d,
        &[
            "cleanup",
            "--older-than",
            "7d",
            "--table",
            "outbox",
            "--yes",
            "--format",
            "json",
        ],
    );
    assert_eq!(done.code, 0, "{}", done.render());
    let t = &done.json()["tables"][0];
    assert_eq!(t["partitions"], json!([a, c]), "{}", done.render());
    assert_eq!(t["completed"], 2200, "{}", done.render());
    assert!(!exists(&pool, &a).await && !exists(&pool, &c).await);
    assert!(exists(&pool, &b).await && exists(&pool, &dd).await && exists(&pool, &e).await);
    assert_eq!(count(&pool, &format!("SELECT count(*) FROM {b}")).await, 1);
    assert_eq!(count(&pool, &format!("SELECT count(*) FROM {dd}")).await, 1);
    assert_eq!(
        count(&pool, &format!("SELECT count(*) FROM {e}")).await,
        100
    );
    for p in ["a-", "b-", "d-"] {
        assert_eq!(count(&pool, &keys_of(p)).await, 0, "keys {p}");
    }
    assert_eq!(count(&pool, &keys_of("e-")).await, 50);
    let details: serde_json::Value = sqlx::query_scalar(
        "SELECT details FROM omnibox_audit WHERE action = 'cleanup' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(details["partitions_dropped"], json!([a, c]));

    // One id in two partitions (a caller's own id, used again weeks
    // later): the row-by-row cleanup of the old completed row in B (kept
    // for its pending row) leaves the new pending one.
    let twin = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox_events (id, event_type, payload, status, completed_at, created_at,
                updated_at, scheduled_at, aggregate_type, aggregate_id, topic, partition_key)
         VALUES ($1, 'e', '{}', 'completed', $2 + interval '1 hour', $2, $2, $2, 'o', $1, 't', 'k')",
    )
    .bind(twin)
    .bind(b_at + hour)
    .execute(&pool)
    .await
    .unwrap();
    let mut again = outbox_event("t", "k", 1);
    again.id = Some(twin);
    db.store.outbox().create(&created(again)).await.unwrap();
    let done = omnibox(
        &db,
        d,
        &[
            "cleanup",
            "--older-than",
            "7d",
            "--table",
            "outbox",
            "--yes",
        ],
    );
    assert_eq!(done.code, 0, "{}", done.render());
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT status::text FROM outbox_events WHERE id = $1")
            .bind(twin)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, ["pending"], "{}", done.render());

    // With failed rows past their own retention, D goes too; B stays
    // while its row is pending.
    let done = omnibox(
        &db,
        d,
        &[
            "cleanup",
            "--older-than",
            "7d",
            "--include-failed",
            "--failed-older-than",
            "7d",
            "--table",
            "outbox",
            "--yes",
            "--format",
            "json",
        ],
    );
    assert_eq!(done.code, 0, "{}", done.render());
    let t = &done.json()["tables"][0];
    assert_eq!(t["partitions"], json!([dd]), "{}", done.render());
    assert_eq!(t["failed"], 1, "{}", done.render());
    assert!(exists(&pool, &b).await && !exists(&pool, &dd).await);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM outbox_events WHERE status = 'pending'"
        )
        .await,
        2,
        "B's pending row and the twin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_a_partitioned_outbox_and_keeps_partitions_ahead() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let Some(brokers) = shared_brokers() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    partition(&db, d);
    let pool = pool(&db).await;
    let topic = format!("part-{}", db.schema());
    create_topic(&brokers, &topic, 3).await;

    // The partitions ahead are missing (as when nothing created them for
    // two days): the relay makes them when it starts.
    let last = format!(
        "outbox_events_p{}",
        (today() + chrono::Duration::days(2)).format("%Y%m%d")
    );
    let next = format!(
        "outbox_events_p{}",
        (today() + chrono::Duration::days(1)).format("%Y%m%d")
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {last}, {next}")))
        .execute(&pool)
        .await
        .unwrap();
    // `doctor` says so before inserts start failing.
    let doctor = omnibox(&db, d, &["doctor"]);
    assert!(
        doctor
            .stdout
            .lines()
            .any(|l| l.starts_with("warn")
                && l.contains("no partition for the next period of outbox")),
        "{}",
        doctor.render()
    );

    // Rows over three partitions (two days ago, yesterday, today), keys
    // interleaved, in insertion order.
    let mut events = Vec::new();
    for (days, n) in [(2, 60), (1, 60), (0, 80)] {
        let (_, start) = day_partition(&pool, "outbox_events", days).await;
        let at = if days == 0 {
            None
        } else {
            Some(start + chrono::Duration::hours(12))
        };
        let batch: Vec<OutboxEvent> = (0..n)
            .map(|i| {
                let mut e = outbox_event(&topic, &format!("k{}", i % 7), events.len() + i);
                e.created_at = at;
                created(e)
            })
            .collect();
        db.store.outbox().create_many(&batch).await.unwrap();
        events.extend(batch);
    }
    let out = omnibox(
        &db,
        d,
        &[
            "publish",
            "--once",
            "--batch",
            "50",
            "--broker",
            &format!("kafka://{brokers}"),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.render());
    assert!(
        exists(&pool, &last).await && exists(&pool, &next).await,
        "{}",
        out.render()
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM outbox_events WHERE status = 'completed'"
        )
        .await,
        200
    );
    let got = consume(&brokers, &topic, 200, Duration::from_secs(30)).await;
    let ids: HashSet<&str> = got.iter().map(|m| m.headers["event_id"].as_str()).collect();
    assert_eq!(ids.len(), 200);
    assert_eq!(got.len(), 200, "published once each");
    // Per key, Kafka holds the events in insertion order.
    let order: HashMap<String, usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id().to_string(), i))
        .collect();
    let mut by_offset: Vec<_> = got.iter().collect();
    by_offset.sort_by_key(|m| (m.partition, m.offset));
    let mut last_of: HashMap<&str, usize> = HashMap::new();
    for m in by_offset {
        let i = order[m.headers["event_id"].as_str()];
        if let Some(&before) = last_of.get(m.key.as_str()) {
            assert!(before < i, "key {}: {i} after {before}", m.key);
        }
        last_of.insert(m.key.as_str(), i);
    }

    // `partitions create` does the same by hand, and says what it made.
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {last}")))
        .execute(&pool)
        .await
        .unwrap();
    let made = omnibox(&db, d, &["partitions", "create"]);
    assert_eq!(made.code, 0, "{}", made.render());
    assert!(
        made.stdout.contains(&format!("Created partition {last}.")),
        "{}",
        made.render()
    );
    let again = omnibox(&db, d, &["partitions", "create"]);
    assert!(
        again.stdout.contains("nothing created"),
        "{}",
        again.render()
    );

    // --from makes the partitions back to a date (for rows with an older
    // created_at), with their keys; too far back is refused, nothing made.
    let from = today() - chrono::Duration::days(5);
    let back = omnibox(
        &db,
        d,
        &[
            "partitions",
            "create",
            "--from",
            &from.format("%Y-%m-%d").to_string(),
        ],
    );
    assert_eq!(back.code, 0, "{}", back.render());
    let made: Vec<&str> = back.stdout.lines().collect();
    // The outbox's two days ago and yesterday exist already (the rows
    // above): three outbox and five inbox partitions.
    assert_eq!(made.len(), 3 + 5, "{}", back.render());
    let oldest = format!("outbox_events_p{}", from.format("%Y%m%d"));
    assert!(exists(&pool, &oldest).await);
    let keyed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = to_regclass($1) AND indisprimary)",
    )
    .bind(&oldest)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(keyed);
    let mine = "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE c.relnamespace = current_schema()::regnamespace";
    let before = count(&pool, mine).await;
    let far = omnibox(&db, d, &["partitions", "create", "--from", "1990-01-01"]);
    assert_eq!(far.code, 2, "{}", far.render());
    assert!(far.stderr.contains("at most 1000"), "{}", far.render());
    assert_eq!(count(&pool, mine).await, before);
    let ancient = omnibox(&db, d, &["partitions", "create", "--from=-262143-01-01"]);
    assert_eq!(ancient.code, 2, "{}", ancient.render());
    assert!(
        ancient.stderr.contains("from 1970 to 9999"),
        "{}",
        ancient.render()
    );
    let bad = omnibox(&db, d, &["partitions", "create", "--from", "yesterday"]);
    assert_eq!(bad.code, 2, "{}", bad.render());
    assert!(bad.stderr.contains("is not a date"), "{}", bad.render());
}

/// The claim's walk reads only the partitions that hold pending rows
/// (`OUTBOX_PENDING_RANGE`, in the walk's own statement), and a key's
/// pending head in an old partition still holds the key's later rows back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_reads_only_partitions_with_pending_rows_and_keeps_key_order() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    partition(&db, dir.path());
    let pool = pool(&db).await;
    let mut starts = HashMap::new();
    for days in 1..=6 {
        let (name, start) = day_partition(&pool, "outbox_events", days).await;
        starts.insert(days, (name, start));
    }
    // History: completed rows only (these partitions hold nothing to walk).
    for days in [6, 5, 2, 1] {
        old_rows(
            &pool,
            starts[&days].1,
            50,
            "completed",
            &format!("c{days}-"),
        )
        .await;
    }
    // Four days ago: key "held"'s head, tried and waiting for its retry an
    // hour from now; key "due"'s head, due now.
    let old = starts[&4].1 + chrono::Duration::hours(12);
    let mut tried = outbox_event("orders", "held", 0);
    tried.created_at = Some(old);
    tried.scheduled_at = Some(Utc::now() + chrono::Duration::hours(1));
    let tried = created(tried);
    let mut due_old = outbox_event("orders", "due", 1);
    due_old.created_at = Some(old);
    let due_old = created(due_old);
    db.store
        .outbox()
        .create_many(&[tried.clone(), due_old.clone()])
        .await
        .unwrap();
    sqlx::query(
        "UPDATE outbox_events SET last_error = 'broker said no', attempts_made = 1 WHERE id = $1",
    )
    .bind(tried.id())
    .execute(&pool)
    .await
    .unwrap();
    // Today: a later row of each, and a key of its own.
    let later: Vec<OutboxEvent> = [("held", 2), ("due", 3), ("new", 4)]
        .into_iter()
        .map(|(k, n)| created(outbox_event("orders", k, n)))
        .collect();
    db.store.outbox().create_many(&later).await.unwrap();

    // The range: from four days ago to the end of today.
    let (lo, hi): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        sqlx::query_as(omnibox::store::postgres::OUTBOX_PENDING_RANGE)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(lo, Some(starts[&4].1));
    assert_eq!(hi, Some(today() + chrono::Duration::days(1)));

    // The partitioned walk, given that range, plans only its partitions;
    // without one it plans them all. Its guard says whether a pending row
    // lies outside the range it was given, in its own snapshot.
    let walk = |lo: Option<DateTime<Utc>>, hi: Option<DateTime<Utc>>, explain: bool| {
        let pool = pool.clone();
        async move {
            let sql = if explain {
                format!(
                    "EXPLAIN (COSTS OFF) {}",
                    omnibox::store::postgres::OUTBOX_WALK_PARTITIONED
                )
            } else {
                format!(
                    "SELECT bool_and(stale)::text FROM ({}) w",
                    omnibox::store::postgres::OUTBOX_WALK_PARTITIONED
                )
            };
            let rows: Vec<Option<String>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(vec!["orders".to_string(); 3])
                .bind(vec![
                    "held".to_string(),
                    "due".to_string(),
                    "new".to_string(),
                ])
                .bind(10_i64)
                .bind(vec![None::<i64>; 3])
                .bind(vec![None::<i64>; 3])
                .bind("w")
                .bind(lo)
                .bind(hi)
                .persistent(false)
                .fetch_all(&pool)
                .await
                .unwrap();
            rows.into_iter().flatten().collect::<Vec<String>>()
        }
    };
    // A key's probe: an index scan of one partition whose condition names
    // the walked key (the guard's probes name none).
    let probed = |plan: &[String], name: &str| {
        plan.windows(2)
            .any(|w| w[0].contains(name) && w[1].contains("k.topic"))
    };
    let today_name = format!("outbox_events_p{}", today().format("%Y%m%d"));
    let bounded = walk(lo, hi, true).await;
    assert!(probed(&bounded, &starts[&4].0), "{}", bounded.join("\n"));
    assert!(probed(&bounded, &today_name), "{}", bounded.join("\n"));
    for days in [6, 5] {
        assert!(
            !probed(&bounded, &starts[&days].0),
            "{}",
            bounded.join("\n")
        );
    }
    let unbounded = walk(None, None, true).await;
    assert!(
        probed(&unbounded, &starts[&6].0),
        "{}",
        unbounded.join("\n")
    );
    assert_eq!(walk(lo, hi, false).await, vec!["false"]);
    assert_eq!(walk(None, None, false).await, vec!["false"]);
    // A hint that leaves out four days ago, where "held" and "due" have
    // their heads: the guard says so (the store then walks unbounded).
    assert_eq!(walk(Some(today()), hi, false).await, vec!["true"]);
    // The scan, given the range, plans only its partitions too.
    let sql = format!(
        "EXPLAIN (COSTS OFF) {}",
        omnibox::store::postgres::OUTBOX_SCAN_PARTITIONED
    );
    let scan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(DateTime::from_timestamp(-62_135_596_800, 0).unwrap())
        .bind(0_i64)
        .bind(10_i64)
        .bind(10_i64)
        .bind(0_i64)
        .bind(None::<String>)
        .bind(None::<Vec<String>>)
        .bind(lo)
        .bind(hi)
        .persistent(false)
        .fetch_all(&pool)
        .await
        .unwrap();
    let scan = scan.join("\n");
    assert!(scan.contains(&today_name), "{scan}");
    for days in [6, 5] {
        assert!(!scan.contains(&starts[&days].0), "{scan}");
    }

    // The claim: "due" from its old head on, "new"; "held" waits for its
    // head's retry, its later row with it.
    let claim = db
        .store
        .outbox()
        .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 10))
        .await
        .unwrap();
    let got: HashSet<uuid::Uuid> = claim.events.iter().map(|e| e.id()).collect();
    let want: HashSet<uuid::Uuid> = [due_old.id(), later[1].id(), later[2].id()]
        .into_iter()
        .collect();
    assert_eq!(got, want);
    // Once "held"'s head is done, its later row follows.
    sqlx::query("UPDATE outbox_events SET status = 'completed', completed_at = now(), last_error = NULL WHERE id = $1")
        .bind(tried.id())
        .execute(&pool)
        .await
        .unwrap();
    let next = db
        .store
        .outbox()
        .claim(&ClaimOptions::new(WorkerId::new("w2").unwrap(), 10))
        .await
        .unwrap();
    let ids: Vec<uuid::Uuid> = next.events.iter().map(|e| e.id()).collect();
    assert_eq!(ids, vec![later[0].id()]);
}
