//! The store conformance suite: every case runs against SQLite and PostgreSQL
//! (a fresh database or schema each).

#[path = "conformance/cases.rs"]
mod cases;
mod common;

backend_tests!(
    migrate_is_idempotent,
    create_and_get_round_trip,
    idempotent_create_returns_the_existing_row,
    bulk_create_keeps_order_and_idempotency,
    bulk_create_is_all_or_nothing,
    inbox_insert_reports_duplicates,
    list_filters_and_pages,
    counts_per_status,
    claim_takes_due_rows_in_order,
    claim_keeps_per_key_order_and_takes_runs,
    tried_or_locked_heads_block_their_key,
    claim_skips_held_rows_until_the_lease_expires,
    extending_a_lease_keeps_the_rows,
    fencing_rejects_a_stale_claim_of_the_same_worker,
    fail_counts_attempts_then_dead_letters,
    transient_failure_spends_no_attempt,
    release_returns_rows_untried,
    force_unlock_records_the_reason,
    release_stale_locks_in_batches,
    delete_completed_in_batches,
    requeue_failed_by_filter,
    database_enforces_invariants,
    claim_is_served_by_the_index,
    filtered_claims_take_only_their_rows_from_an_index,
    concurrent_claimers_share_the_work_in_key_order,
    rows_behind_failed_heads_do_not_starve_them,
    successors_scheduled_before_their_head_do_not_stall_the_claim,
    a_held_hot_key_does_not_starve_other_relays,
    a_replayed_head_is_claimed_with_its_run,
    a_row_with_attempts_used_up_fails_cleanly,
    a_row_due_within_a_second_holds_its_key,
    a_worker_claims_behind_its_own_rows_in_flight,
    a_byte_budget_cuts_claims_in_key_order,
);

/// PostgreSQL only: when the caller sets no time, the database's clock sets
/// `scheduled_at` and `created_at` (a producer whose clock runs ahead must
/// not let a later event of its key go first), and a transient retry is
/// scheduled by the database's clock too.
#[tokio::test]
async fn postgres_times_come_from_the_database_clock() {
    use omnibox::store::RetryAt;
    use omnibox::{ClaimOptions, DomainService, EventStore, Failure, NewOutboxEvent, WorkerId};
    let Some(db) = common::postgres().await else {
        return;
    };
    let omnibox::store::AnyStore::Postgres(pg) = &db.store else {
        unreachable!()
    };
    let svc = DomainService::default();
    let mk = |key: &str, scheduled: Option<omnibox::Timestamp>, idempotency: Option<&str>| {
        let mut n = NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            "order.created",
            "orders",
            key,
            serde_json::json!({"a": 1}),
        );
        n.scheduled_at = scheduled;
        n.idempotency_key = idempotency.map(str::to_string);
        svc.create_outbox_event(n).unwrap()
    };
    // Both insert paths (COPY without idempotency keys, INSERT with them).
    let plain = mk("k", None, None);
    let keyed = mk("k2", None, Some("ik-1"));
    let explicit_at = omnibox::time::truncate(omnibox::time::now() + chrono::Duration::seconds(30));
    let explicit = mk("k3", Some(explicit_at), None);
    let mut tx = pg.pool().begin().await.unwrap();
    omnibox::store::postgres::insert_outbox(&mut tx, std::slice::from_ref(&plain))
        .await
        .unwrap();
    omnibox::store::postgres::insert_outbox(&mut tx, &[keyed.clone(), explicit.clone()])
        .await
        .unwrap();
    let now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for e in [&plain, &keyed] {
        let row = db.store.outbox().get(e.id()).await.unwrap().unwrap();
        assert_eq!(
            row.scheduled_at(),
            now,
            "scheduled_at is the database's now()"
        );
        assert_eq!(row.created_at(), now);
    }
    let row = db.store.outbox().get(explicit.id()).await.unwrap().unwrap();
    assert_eq!(
        row.scheduled_at(),
        explicit_at,
        "a time the caller set is kept"
    );
    // A transient retry "in 1 s" is 1 s after the failure by the database's clock.
    let c = db
        .store
        .outbox()
        .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 10))
        .await
        .unwrap();
    assert_eq!(c.len(), 2);
    db.store
        .outbox()
        .fail(
            &c.token,
            &[Failure::transient(
                plain.id(),
                "down",
                RetryAt::After(std::time::Duration::from_secs(1)),
            )],
        )
        .await
        .unwrap();
    let row = db.store.outbox().get(plain.id()).await.unwrap().unwrap();
    assert_eq!(
        row.scheduled_at() - row.updated_at(),
        chrono::Duration::seconds(1)
    );
}

/// PostgreSQL only: the two insert paths write the same row. Rows without
/// idempotency keys go through COPY in binary, rows with them through an
/// INSERT of arrays; every column of both must read back alike, for values
/// that text formats quote or escape and times before PostgreSQL's epoch.
#[tokio::test]
async fn postgres_copy_and_insert_write_the_same_columns() {
    use omnibox::{DomainService, EventStore, NewOutboxEvent};
    let Some(db) = common::postgres().await else {
        return;
    };
    let omnibox::store::AnyStore::Postgres(pg) = &db.store else {
        unreachable!()
    };
    let svc = DomainService::default();
    // Fields refuse control characters; the payload takes them.
    let awkward = "quote \" comma , backslash \\ é ☃ 😀 \\N";
    let controls = "tab \t newline \n carriage return \r \\. end";
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let mk = |idempotency: Option<&str>, full: bool| {
        let mut n = NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            awkward,
            "orders,\"x\"",
            awkward,
            serde_json::json!({"text": awkward, "controls": controls, "n": 1.5, "nested": {"a": [1, null, true]}}),
        );
        n.idempotency_key = idempotency.map(str::to_string);
        if full {
            n.headers = Some(
                [("h,1".to_string(), awkward.to_string())]
                    .into_iter()
                    .collect(),
            );
            n.trace_id = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
            n.correlation_id = Some(awkward.chars().take(60).collect());
            n.causation_id = Some("cause".into());
            n.schema_version = Some("v2".into());
            n.max_attempts = Some(9);
            n.scheduled_at = Some(at("1999-12-31T23:59:59.999999Z"));
            n.created_at = Some(at("1999-12-31T23:59:30.000007Z"));
        }
        svc.create_outbox_event(n).unwrap()
    };
    let pairs = [
        (mk(None, true), mk(Some("ik-full"), true)),
        (mk(None, false), mk(Some("ik-bare"), false)),
    ];
    let mut tx = pg.pool().begin().await.unwrap();
    for (copied, inserted) in &pairs {
        omnibox::store::postgres::insert_outbox(&mut tx, std::slice::from_ref(copied))
            .await
            .unwrap();
        omnibox::store::postgres::insert_outbox(&mut tx, std::slice::from_ref(inserted))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    for (copied, inserted) in &pairs {
        // Every column as JSON, but for those that differ by design.
        let row = |id: uuid::Uuid| {
            let pool = pg.pool().clone();
            async move {
                let v: serde_json::Value = sqlx::query_scalar(
                    "SELECT to_jsonb(o) - 'id' - 'seq' - 'idempotency_key' - 'aggregate_id'
                     FROM outbox_events o WHERE id = $1",
                )
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
                v
            }
        };
        let (a, b) = (row(copied.id()).await, row(inserted.id()).await);
        assert_eq!(a, b, "COPY wrote {a:#}\nINSERT wrote {b:#}");
        assert_eq!(a["event_type"], serde_json::json!(awkward));
        assert_eq!(a["payload"]["text"], serde_json::json!(awkward));
        assert_eq!(a["payload"]["controls"], serde_json::json!(controls));
        assert_eq!(a["status"], serde_json::json!("pending"));
        assert!(a["payload_bytes"].as_i64().unwrap() > 0, "{a:#}");
    }
    let full = &pairs[0].0;
    let read = db.store.outbox().get(full.id()).await.unwrap().unwrap();
    assert_eq!(read.scheduled_at(), at("1999-12-31T23:59:59.999999Z"));
    assert_eq!(read.created_at(), at("1999-12-31T23:59:30.000007Z"));
    assert_eq!(read.max_attempts(), 9);
    assert_eq!(read.headers(), full.headers());
}

/// PostgreSQL only: timestamps are absolute instants whatever the session's
/// TimeZone (the reference's `timezone('UTC', now())` defaults shift by the
/// session's offset).
#[tokio::test]
async fn postgres_timestamps_ignore_the_session_time_zone() {
    use omnibox::store::PgStore;
    use omnibox::{
        ClaimOptions, DomainService, EventStore, NewOutboxEvent, OutboxStore, WorkerId, time,
    };
    use sqlx::Executor;
    let Some(url) = common::pg_url() else { return };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let ddl = format!("CREATE SCHEMA {schema}");
    sqlx::query(sqlx::AssertSqlSafe(ddl))
        .execute(&admin)
        .await
        .unwrap();
    // sqlx starts sessions in UTC; switch every connection to New York, the
    // way an application's pool might be configured.
    let path = schema.clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .after_connect(move |conn, _| {
            let path = path.clone();
            Box::pin(async move {
                conn.execute("SET TimeZone = 'America/New_York'").await?;
                sqlx::query("SELECT set_config('search_path', $1, false)")
                    .bind(path)
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .unwrap();
    let store = PgStore::from_pool(pool);
    store.migrate().await.unwrap();
    let tz: String = sqlx::query_scalar("SHOW TimeZone")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(tz, "America/New_York");
    let event = DomainService::default()
        .create_outbox_event(NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            "order.created",
            "orders",
            "k",
            serde_json::json!({"a": 1}),
        ))
        .unwrap();
    store.outbox().create(&event).await.unwrap();
    let before = time::now();
    let claim = store
        .outbox()
        .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 1))
        .await
        .unwrap();
    let after = time::now();
    let row = &claim.events[0];
    // The caller set no time: created_at is the database's now(), within a
    // second of this process's clock here.
    assert!((row.created_at() - event.created_at()).num_seconds().abs() <= 1);
    let locked = row.locked_at().unwrap();
    // Server-side now() lands between two client readings (1 s of slack for clocks).
    assert!(
        locked >= before - chrono::Duration::seconds(1)
            && locked <= after + chrono::Duration::seconds(1)
    );
    // A column default (now()) written under the New York session is still the right instant.
    let default_created: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "INSERT INTO outbox_events (id, event_type, payload, aggregate_type, aggregate_id, topic, partition_key) \
         VALUES (gen_random_uuid(), 't', '{\"a\":1}', 'a', gen_random_uuid(), 't', 'k2') RETURNING created_at",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(
        (default_created - time::now()).num_seconds().abs() <= 1,
        "{default_created}"
    );
    let ddl = format!("DROP SCHEMA {schema} CASCADE");
    sqlx::query(sqlx::AssertSqlSafe(ddl))
        .execute(store.pool())
        .await
        .unwrap();
}

/// Runs `omnibox::testkit` (what it asks of a store of your own) on stores
/// from `fresh`: the built-in stores must pass it.
async fn testkit_passes(fresh: impl AsyncFn() -> common::TestDb) {
    use omnibox::testkit;
    let keep = std::sync::Mutex::new(Vec::new());
    let table = async |inbox: bool| {
        let db = fresh().await;
        let t = (db.store.outbox(), db.store.inbox());
        keep.lock().unwrap().push(db);
        if inbox {
            (None, Some(t.1))
        } else {
            (Some(t.0), None)
        }
    };
    let outbox = async || table(false).await.0.unwrap();
    let inbox = async || table(true).await.1.unwrap();
    let passed = testkit::outbox_store(outbox)
        .await
        .unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(passed, testkit::OUTBOX_CASES.len());
    let passed = testkit::inbox_store(inbox)
        .await
        .unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(passed, testkit::INBOX_CASES.len());
    let passed = testkit::consumer_store(inbox)
        .await
        .unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(passed, testkit::CONSUMER_CASES.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testkit_passes_on_sqlite() {
    testkit_passes(common::sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testkit_passes_on_postgres() {
    if common::postgres().await.is_none() {
        return;
    }
    testkit_passes(async || common::postgres().await.unwrap()).await;
}
