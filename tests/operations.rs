//! The operations layer (`omnibox::ops`) called as a library, on both
//! stores: replay's selection and change with its audit row, a status
//! snapshot and its limits, unlock's holder check, cleanup's refusals and
//! deletion, and doctor's database checks.

mod common;

use std::time::Duration;

use omnibox::ops::cleanup::{self, Retention};
use omnibox::ops::diagnostics::{self, Level, Thresholds};
use omnibox::ops::replay::{self, Selection};
use omnibox::ops::status::{self, Limits};
use omnibox::ops::unlock::{self, Lock};
use omnibox::ops::{self};
use omnibox::store::RequeueFilter;
use omnibox::store::audit::{AuditEntry, AuditFilter};
use omnibox::{
    ClaimOptions, DomainService, EventStatus, EventStore, Failure, NewOutboxEvent, OutboxStore,
    Table, UnlockReason, WorkerId, time,
};
use serde_json::json;
use uuid::Uuid;

use common::TestDb;

fn event(key: &str) -> omnibox::OutboxEvent {
    let mut n = NewOutboxEvent::new(
        "order",
        Uuid::new_v4(),
        "order.created",
        "orders",
        key,
        json!({ "key": key }),
    );
    n.max_attempts = Some(1);
    DomainService::default().create_outbox_event(n).unwrap()
}

async fn audit_count(db: &TestDb, action: &str) -> Vec<u64> {
    db.store
        .audit(&AuditFilter {
            action: Some(action.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|e| e.count)
        .collect()
}

async fn operations(db: TestDb) {
    let store = &db.store;
    let outbox = store.outbox();
    let (a, b, c) = (event("a"), event("b"), event("c"));
    outbox
        .create_many(&[a.clone(), b.clone(), c.clone()])
        .await
        .unwrap();
    let worker = WorkerId::new("w1").unwrap();
    let claim = outbox
        .claim(&ClaimOptions::new(worker.clone(), 10))
        .await
        .unwrap();
    assert_eq!(claim.len(), 3);
    let retry = time::now();
    outbox
        .fail(
            &claim.token,
            &[
                Failure::counted(a.id(), "broker said no", retry),
                Failure::counted(b.id(), "broker said no", retry),
            ],
        )
        .await
        .unwrap();
    outbox.complete(&claim.token, &[c.id()]).await.unwrap();

    // Replay: what the selection picks, then the change and its audit row.
    let mut selection = Selection {
        tables: ops::tables(None),
        filter: RequeueFilter {
            all: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let picked = replay::select(store, &selection).await.unwrap();
    assert_eq!(
        picked.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![a.id(), b.id()]
    );
    assert!(picked.iter().all(|r| r.table == Table::Outbox
        && r.attempts_made == 1
        && r.last_error.as_deref() == Some("broker said no")));
    selection.fingerprint = Some("000000000000".into());
    assert!(replay::select(store, &selection).await.unwrap().is_empty());
    selection.fingerprint = None;
    selection.limit = Some(1);
    let first = replay::select(store, &selection).await.unwrap();
    assert_eq!(first.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a.id()]);
    let entry = AuditEntry::new("test", "replay");
    let done = replay::requeue(store, &picked, false, None, &entry)
        .await
        .unwrap();
    assert_eq!(done.len(), 2);
    for id in [a.id(), b.id()] {
        let row = outbox.get(id).await.unwrap().unwrap();
        assert_eq!(
            (row.status(), row.attempts_made()),
            (EventStatus::Pending, 0)
        );
    }
    assert_eq!(audit_count(&db, "replay").await, vec![2]);
    // Twice: the rows are no longer failed, nothing changes, no audit row.
    assert!(
        replay::requeue(store, &picked, false, None, &entry)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(audit_count(&db, "replay").await, vec![2]);

    // Status: counts, and the limits it breaks.
    let snap = status::snapshot(store, Duration::from_secs(300), time::now())
        .await
        .unwrap();
    let counts = &snap.tables[0].counts;
    assert_eq!((counts.pending, counts.completed, counts.failed), (2, 1, 0));
    assert_eq!(snap.tables[1].counts.pending, 0);
    let limits = Limits {
        max_pending_age: Some(Duration::ZERO),
        max_failed: Some(0),
        max_stale_locks: Some(0),
        stale_after: Duration::from_secs(300),
    };
    let v = snap.violations(&limits);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].starts_with("outbox: the oldest pending event is"),
        "{v:?}"
    );

    // Unlock: only the holder the operator saw.
    let held = outbox
        .claim(&ClaimOptions::new(worker.clone(), 1))
        .await
        .unwrap();
    let id = held.events[0].id();
    let tables = ops::tables(None);
    assert_eq!(
        unlock::find(store, id, &tables).await.unwrap(),
        Lock::Held {
            table: Table::Outbox,
            holder: "w1".into()
        }
    );
    assert_eq!(
        unlock::find(store, Uuid::new_v4(), &tables).await.unwrap(),
        Lock::Missing
    );
    assert_eq!(
        unlock::held_by(store, Table::Outbox, &worker)
            .await
            .unwrap(),
        vec![id]
    );
    let reason = UnlockReason::new("relay died").unwrap();
    let entry = AuditEntry::new("test", "unlock");
    assert!(
        !unlock::one(
            store,
            Table::Outbox,
            id,
            "someone-else",
            &reason,
            entry.clone()
        )
        .await
        .unwrap()
    );
    assert!(
        unlock::one(store, Table::Outbox, id, "w1", &reason, entry)
            .await
            .unwrap()
    );
    assert_eq!(
        unlock::find(store, id, &tables).await.unwrap(),
        Lock::Free(Table::Outbox)
    );
    assert_eq!(audit_count(&db, "unlock").await, vec![1]);

    // Cleanup: the refusals, then deletion with its audit row.
    let day = Duration::from_secs(86_400);
    let young = Retention::new(Duration::ZERO);
    assert!(
        young
            .refusal(&[Table::Outbox], day, false)
            .unwrap()
            .starts_with("refusing a retention of 0ms")
    );
    assert_eq!(young.refusal(&[Table::Outbox], day, true), None);
    assert!(
        young
            .refusal(&tables, day, true)
            .unwrap()
            .contains("deduplication window")
    );
    assert_eq!(Retention::new(day).refusal(&tables, day, false), None);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let plan = cleanup::count(store, &[Table::Outbox], &young)
        .await
        .unwrap();
    assert_eq!((plan[0].completed, plan[0].failed), (1, 0));
    let mut seen = 0;
    let done = cleanup::delete(
        store,
        &[Table::Outbox],
        &young,
        &AuditEntry::new("test", "cleanup"),
        |n| seen += n,
    )
    .await
    .unwrap();
    assert_eq!((done[0].completed, done[0].bounded, seen), (1, false, 1));
    assert!(outbox.get(c.id()).await.unwrap().is_none());
    assert_eq!(audit_count(&db, "cleanup").await, vec![1]);

    // Doctor's database checks: a migrated schema with nothing wrong.
    let checks = diagnostics::database(
        store,
        &Thresholds {
            max_pending_age: Duration::from_secs(300),
            dedup_window: day,
        },
    )
    .await;
    assert_eq!(checks[0].check, "schema");
    assert_eq!(checks[0].status, Level::Ok, "{checks:?}");
    assert!(checks.iter().all(|c| c.status != Level::Fail), "{checks:?}");
    let skipped = diagnostics::not_checked("no database connection", db.is_postgres());
    assert_eq!(skipped.len(), if db.is_postgres() { 12 } else { 8 });
    assert!(skipped.iter().all(|c| c.status == Level::Skip));
}

#[tokio::test]
async fn operations_sqlite() {
    operations(common::sqlite().await).await;
}

#[tokio::test]
async fn operations_postgres() {
    if let Some(db) = common::postgres().await {
        operations(db).await;
    }
}

/// Doctor's replication-slot check (PostgreSQL): an inactive logical slot
/// (one nothing reads, which keeps WAL until the disk is full) is a warning
/// that names it and the statement that drops it; once dropped it is gone
/// from the check.
#[tokio::test]
async fn doctor_reports_an_unread_replication_slot() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let omnibox::store::AnyStore::Postgres(pg) = &db.store else {
        unreachable!()
    };
    let wal_level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(pg.pool())
        .await
        .unwrap();
    if wal_level != "logical" {
        assert!(
            !common::under_ci(),
            "the test PostgreSQL needs wal_level=logical: scripts/postgres.sh start --logical"
        );
        eprintln!("skipped: wal_level is {wal_level}, not logical");
        return;
    }
    let slot_check = || async {
        diagnostics::database(
            &db.store,
            &Thresholds {
                max_pending_age: Duration::from_secs(300),
                dedup_window: Duration::from_secs(86_400),
            },
        )
        .await
        .into_iter()
        .find(|c| c.check == "replication slots")
        .expect("the check runs on PostgreSQL")
    };
    let name = format!("omnibox_test_{}", uuid::Uuid::new_v4().simple());
    let before = slot_check().await;
    assert!(!before.message.contains(&name), "{before:?}");
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&name)
        .execute(pg.pool())
        .await
        .unwrap();
    let with = slot_check().await;
    let dropped = sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&name)
        .execute(pg.pool())
        .await;
    assert_eq!(with.status, Level::Warn, "{with:?}");
    assert!(
        with.message
            .contains(&format!("{name} (logical, database omnibox")),
        "{with:?}"
    );
    let hint = with.hint.clone().unwrap_or_default();
    assert!(
        hint.contains(&format!("SELECT pg_drop_replication_slot('{name}');")),
        "{hint}"
    );
    assert!(hint.contains("until the disk is full"), "{hint}");
    dropped.unwrap();
    let after = slot_check().await;
    assert!(!after.message.contains(&name), "{after:?}");
}
