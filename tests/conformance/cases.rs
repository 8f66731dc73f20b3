use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use omnibox::store::{
    AnyStore, BulkOutcome, Created, EventSelector, FailureSelector, ListFilter, RequeueFilter,
    TimeWindow,
};
use omnibox::{
    ClaimOptions, DomainService, Error, EventStatus, EventStore, Failure, InboxStore,
    NewInboxEvent, NewOutboxEvent, OutboxEvent, OutboxStore, UnlockReason, WorkerId, time,
};
use serde_json::json;
use uuid::Uuid;

use crate::common::TestDb;

fn svc() -> DomainService {
    DomainService::default()
}

fn w(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

fn new_event(key: &str, n: usize) -> NewOutboxEvent {
    NewOutboxEvent::new(
        "order",
        Uuid::from_u128(n as u128 + 1),
        "order.created",
        "orders",
        key,
        json!({ "n": n, "key": key }),
    )
}

fn ev(key: &str, n: usize) -> OutboxEvent {
    svc().create_outbox_event(new_event(key, n)).unwrap()
}

fn ids(events: &[OutboxEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.id()).collect()
}

async fn raw(db: &TestDb, pg: &'static str, sqlite: &'static str) -> Result<u64, sqlx::Error> {
    match &db.store {
        AnyStore::Postgres(s) => sqlx::query(pg)
            .execute(s.pool())
            .await
            .map(|r| r.rows_affected()),
        AnyStore::Sqlite(s) => sqlx::query(sqlite)
            .execute(s.pool())
            .await
            .map(|r| r.rows_affected()),
        _ => unreachable!(),
    }
}

async fn seed(db: &TestDb, events: &[OutboxEvent]) {
    let out = db.store.outbox().create_many(events).await.unwrap();
    assert!(out.iter().all(|o| !o.existing));
}

pub async fn migrate_is_idempotent(db: &TestDb) {
    let again = db.store.migrate().await.unwrap();
    assert!(again.applied.is_empty(), "{again:?}");
    let latest = db.store.backend().migrations().last().unwrap().version;
    assert_eq!(again.version, latest);
    assert!(latest >= 1);
    db.store.ensure_migrated().await.unwrap();
}

pub async fn create_and_get_round_trip(db: &TestDb) {
    let mut n = new_event("k", 1);
    n.headers = Some([("traceparent".to_string(), "00-abc-01".to_string())].into());
    n.trace_id = Some("trace-1".into());
    n.correlation_id = Some("corr".into());
    n.causation_id = Some("cause".into());
    n.schema_version = Some("2.1.0".into());
    n.max_attempts = Some(3);
    n.payload = json!({"nested": {"list": [1, 2.5, "é"], "flag": true, "none": null}});
    // Times the caller sets are stored as given (without them, PostgreSQL's
    // clock sets them: see postgres_times_come_from_the_database_clock).
    n.created_at = Some(time::now());
    let event = svc().create_outbox_event(n).unwrap();
    let created = db.store.outbox().create(&event).await.unwrap();
    let Created::Inserted(stored) = created else {
        panic!("expected a new row")
    };
    assert!(stored.seq().is_some());
    // Everything but seq comes back exactly, timestamps to the microsecond.
    let mut expected = serde_json::to_value(&event).unwrap();
    let mut actual = serde_json::to_value(&stored).unwrap();
    expected.as_object_mut().unwrap().remove("seq");
    actual.as_object_mut().unwrap().remove("seq");
    assert_eq!(actual, expected);
    assert_eq!(
        db.store.outbox().get(event.id()).await.unwrap().unwrap(),
        stored
    );
    assert_eq!(db.store.outbox().get(Uuid::new_v4()).await.unwrap(), None);
}

pub async fn idempotent_create_returns_the_existing_row(db: &TestDb) {
    let mut a = new_event("k", 1);
    a.idempotency_key = Some("order-1-created".into());
    let mut b = new_event("k", 2);
    b.idempotency_key = Some("order-1-created".into());
    let first = svc().create_outbox_event(a).unwrap();
    let second = svc().create_outbox_event(b).unwrap();
    let outbox = db.store.outbox();
    assert!(outbox.create(&first).await.unwrap().is_inserted());
    match outbox.create(&second).await.unwrap() {
        Created::Existing(e) => assert_eq!(e.id(), first.id()),
        other => panic!("expected the existing row, got {other:?}"),
    }
    assert_eq!(outbox.counts().await.unwrap().pending, 1);
}

pub async fn bulk_create_keeps_order_and_idempotency(db: &TestDb) {
    let outbox = db.store.outbox();
    let mut pre = new_event("k", 0);
    pre.idempotency_key = Some("dup-existing".into());
    let pre = svc().create_outbox_event(pre).unwrap();
    seed(db, std::slice::from_ref(&pre)).await;

    // 2,500 events cross the 1,000-row chunks; two repeat a key.
    let mut events = Vec::new();
    for i in 1..=2500 {
        let mut n = new_event(&format!("k{}", i % 7), i);
        if i == 10 {
            n.idempotency_key = Some("dup-existing".into());
        }
        if i == 1500 || i == 2400 {
            n.idempotency_key = Some("dup-in-batch".into());
        }
        events.push(svc().create_outbox_event(n).unwrap());
    }
    let out = outbox.create_many(&events).await.unwrap();
    assert_eq!(out.len(), 2500);
    assert_eq!(
        out[9],
        BulkOutcome {
            id: pre.id(),
            existing: true
        }
    );
    assert_eq!(
        out[1499],
        BulkOutcome {
            id: events[1499].id(),
            existing: false
        }
    );
    assert_eq!(
        out[2399],
        BulkOutcome {
            id: events[1499].id(),
            existing: true
        }
    );
    assert_eq!(out.iter().filter(|o| o.existing).count(), 2);
    assert_eq!(outbox.counts().await.unwrap().pending, 1 + 2498);

    // seq follows input order.
    let rows = outbox
        .list(&ListFilter {
            limit: Some(5000),
            ..Default::default()
        })
        .await
        .unwrap();
    let order: Vec<Uuid> = rows.iter().map(|e| e.id()).collect();
    let mut expected = vec![pre.id()];
    expected.extend(
        events
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 9 && *i != 2399)
            .map(|(_, e)| e.id()),
    );
    assert_eq!(order, expected);
    let seqs: Vec<i64> = rows.iter().map(|e| e.seq().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}

pub async fn bulk_create_is_all_or_nothing(db: &TestDb) {
    let outbox = db.store.outbox();
    let mut events: Vec<OutboxEvent> = (0..1200).map(|i| ev("k", i)).collect();
    // The last event reuses the first one's id: the whole input must fail.
    let mut dup = new_event("k", 9999);
    dup.id = Some(events[0].id());
    events.push(svc().create_outbox_event(dup).unwrap());
    let err = outbox.create_many(&events).await.unwrap_err();
    assert!(matches!(err, Error::StorageIntegrity(_)), "{err:?}");
    assert_eq!(
        outbox.counts().await.unwrap().pending,
        0,
        "nothing of the input is written"
    );
}

pub async fn inbox_insert_reports_duplicates(db: &TestDb) {
    let inbox = db.store.inbox();
    let make = |msg: &str, group: &str| {
        svc()
            .create_inbox_event(NewInboxEvent::new(
                msg,
                group,
                "orders",
                "order.created",
                json!({"m": msg}),
            ))
            .unwrap()
    };
    let first = make("m-1", "billing");
    assert!(inbox.insert(&first).await.unwrap().is_inserted());
    match inbox.insert(&make("m-1", "billing")).await.unwrap() {
        Created::Existing(e) => assert_eq!(e.id(), first.id()),
        other => panic!("{other:?}"),
    }
    assert!(
        inbox
            .insert(&make("m-1", "shipping"))
            .await
            .unwrap()
            .is_inserted(),
        "another group is not a duplicate"
    );

    let batch = vec![
        make("m-2", "billing"),
        make("m-1", "billing"),
        make("m-2", "billing"),
        make("m-3", "billing"),
    ];
    let out = inbox.insert_many(&batch).await.unwrap();
    assert_eq!(
        out.iter().map(|o| o.existing).collect::<Vec<_>>(),
        vec![false, true, true, false]
    );
    assert_eq!(out[1].id, first.id());
    assert_eq!(out[2].id, batch[0].id());
    let found = inbox
        .get_by_message_id("m-3", "billing")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id(), batch[3].id());
    assert_eq!(found.source(), "orders");
    assert!(
        inbox
            .get_by_message_id("m-3", "shipping")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(inbox.counts().await.unwrap().pending, 4);
}

pub async fn list_filters_and_pages(db: &TestDb) {
    let outbox = db.store.outbox();
    let mut events = Vec::new();
    for i in 0..30 {
        let mut n = new_event("k", i);
        if i % 3 == 0 {
            n.topic = "payments".into();
            n.event_type = "payment.made".into();
        }
        events.push(svc().create_outbox_event(n).unwrap());
    }
    seed(db, &events).await;
    let payments = outbox
        .list(&ListFilter {
            select: EventSelector {
                topic: Some("payments".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(payments.len(), 10);
    assert!(payments.iter().all(|e| e.topic() == "payments"));
    let by_type = outbox
        .list(&ListFilter {
            select: EventSelector {
                event_type: Some("order.created".into()),
                ..Default::default()
            },
            limit: Some(5),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_type.len(), 5);
    let next = outbox
        .list(&ListFilter {
            select: EventSelector {
                event_type: Some("order.created".into()),
                ..Default::default()
            },
            limit: Some(100),
            after_seq: by_type.last().unwrap().seq(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next.len(), 15);
    assert!(next[0].seq() > by_type[4].seq());
    let none = outbox
        .list(&ListFilter {
            status: Some(EventStatus::Failed),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
    let future = time::now() + chrono::Duration::hours(1);
    let since = outbox
        .list(&ListFilter {
            since: Some(future),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(since.is_empty());
}

pub async fn counts_per_status(db: &TestDb) {
    let outbox = db.store.outbox();
    let mut events: Vec<OutboxEvent> = (0..6).map(|i| ev(&format!("k{i}"), i)).collect();
    let mut later = new_event("later", 99);
    later.scheduled_at = Some(time::now() + chrono::Duration::hours(1));
    events.push(svc().create_outbox_event(later).unwrap());
    seed(db, &events).await;
    let claim = outbox.claim(&ClaimOptions::new(w("w1"), 3)).await.unwrap();
    assert_eq!(claim.len(), 3);
    outbox
        .complete(&claim.token, &ids(&claim.events[..1]))
        .await
        .unwrap();
    let c = outbox.counts().await.unwrap();
    assert_eq!(
        (c.pending, c.completed, c.failed, c.locked, c.due_now),
        (6, 1, 0, 2, 3)
    );
    let mut oldest = None;
    for e in &events[1..] {
        let t = outbox.get(e.id()).await.unwrap().unwrap().created_at();
        oldest = Some(oldest.map_or(t, |o: omnibox::Timestamp| o.min(t)));
    }
    assert_eq!(c.oldest_pending_created_at, oldest);
    assert!(c.oldest_pending_age().unwrap() < Duration::from_secs(60));
}

pub async fn claim_takes_due_rows_in_order(db: &TestDb) {
    let outbox = db.store.outbox();
    let now = time::now();
    let mut events = Vec::new();
    for i in 0..10 {
        let mut n = new_event(&format!("k{i}"), i);
        n.created_at = Some(now);
        // Scheduled in reverse order, 30..21 s ago; one in the future.
        n.scheduled_at = Some(now - chrono::Duration::seconds(30 - i as i64));
        events.push(n);
    }
    events[4].scheduled_at = Some(now + chrono::Duration::hours(1));
    let events: Vec<OutboxEvent> = events
        .into_iter()
        .map(|n| svc().create_outbox_event(n).unwrap())
        .collect();
    seed(db, &events).await;
    let claim = outbox.claim(&ClaimOptions::new(w("w1"), 5)).await.unwrap();
    let got: HashSet<Uuid> = ids(&claim.events).into_iter().collect();
    let expected: HashSet<Uuid> = [0, 1, 2, 3, 5].iter().map(|&i| events[i].id()).collect();
    assert_eq!(got, expected, "the five due rows scheduled earliest");
    assert!(
        claim
            .events
            .iter()
            .all(|e| e.locked_by() == Some("w1") && e.locked_at() == Some(claim.token.locked_at))
    );
    let rest = outbox
        .claim(&ClaimOptions::new(w("w2"), 100))
        .await
        .unwrap();
    assert_eq!(rest.len(), 4, "the future row is not due");
    assert!(!ids(&rest.events).contains(&events[4].id()));
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("w3"), 100))
            .await
            .unwrap()
            .is_empty()
    );
    let err = outbox
        .claim(&ClaimOptions::new(w("w3"), 0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Validation { .. }));
}

pub async fn claim_keeps_per_key_order_and_takes_runs(db: &TestDb) {
    let outbox = db.store.outbox();
    // Interleaved: a0 b0 a1 b1 a2 a3 a4 b2
    let order = [
        ("a", 0),
        ("b", 0),
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("a", 3),
        ("a", 4),
        ("b", 2),
    ];
    let events: Vec<OutboxEvent> = order.iter().map(|(k, i)| ev(k, *i)).collect();
    seed(db, &events).await;
    // Key first: a's rows became due first, so a claim of 3 takes the run
    // of a from its head (a0 a1 a2), not the first three rows by time.
    let first = outbox.claim(&ClaimOptions::new(w("w1"), 3)).await.unwrap();
    assert_eq!(
        ids(&first.events),
        ids(&[events[0].clone(), events[2].clone(), events[4].clone()])
    );
    // Another worker takes the other key whole; a is held by w1.
    let second = outbox
        .claim(&ClaimOptions::new(w("w2"), 100))
        .await
        .unwrap();
    assert_eq!(
        ids(&second.events),
        ids(&[events[1].clone(), events[3].clone(), events[7].clone()])
    );
    // Nothing is left that anyone can take: a3 a4 wait behind w1's rows.
    let third = outbox
        .claim(&ClaimOptions::new(w("w3"), 100))
        .await
        .unwrap();
    assert!(third.is_empty(), "{:?}", ids(&third.events));
    assert!(!outbox.claimable_exists().await.unwrap());
    // Completing a0 and a1 (a2 still held) frees nothing.
    outbox
        .complete(&first.token, &[events[0].id(), events[2].id()])
        .await
        .unwrap();
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("w3"), 100))
            .await
            .unwrap()
            .is_empty()
    );
    outbox
        .complete(&first.token, &[events[4].id()])
        .await
        .unwrap();
    // Now the rest of a's run goes out whole, in order.
    assert!(outbox.claimable_exists().await.unwrap());
    let fourth = outbox
        .claim(&ClaimOptions::new(w("w3"), 100))
        .await
        .unwrap();
    assert_eq!(ids(&fourth.events), ids(&events[5..7]));
}

pub async fn tried_or_locked_heads_block_their_key(db: &TestDb) {
    let outbox = db.store.outbox();
    let now = time::now();
    // Key x: a row scheduled later and never tried, then a due row: the due row goes.
    let mut later = new_event("x", 0);
    later.scheduled_at = Some(now + chrono::Duration::hours(1));
    let later = svc().create_outbox_event(later).unwrap();
    let x1 = ev("x", 1);
    // Key y: the head fails (counted, retried in an hour); y1 must wait behind it.
    let y0 = ev("y", 0);
    let y1 = ev("y", 1);
    // Key z: the head becomes failed (dead letter); z1 is free afterwards.
    let mut z0 = new_event("z", 0);
    z0.max_attempts = Some(1);
    let z0 = svc().create_outbox_event(z0).unwrap();
    let z1 = ev("z", 1);
    seed(
        db,
        &[
            later.clone(),
            x1.clone(),
            y0.clone(),
            y1.clone(),
            z0.clone(),
            z1.clone(),
        ],
    )
    .await;

    let heads = outbox.claim(&ClaimOptions::new(w("w1"), 1)).await.unwrap();
    assert_eq!(
        ids(&heads.events),
        vec![x1.id()],
        "a future, untried row does not hold its key"
    );
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 10)).await.unwrap();
    // y0 and y1 form a run; z0 and z1 too.
    assert_eq!(ids(&c.events), vec![y0.id(), y1.id(), z0.id(), z1.id()]);
    // The run is released from the first failure on: y0 fails, y1 is released untried.
    let retry = now + chrono::Duration::hours(1);
    outbox
        .fail(
            &c.token,
            &[Failure::counted(y0.id(), "broker said no", retry)],
        )
        .await
        .unwrap();
    outbox.release(&c.token, &[y1.id()]).await.unwrap();
    let z_report = outbox
        .fail(&c.token, &[Failure::counted(z0.id(), "poison", retry)])
        .await
        .unwrap();
    assert_eq!(z_report.failed, vec![z0.id()]);
    outbox.release(&c.token, &[z1.id()]).await.unwrap();

    let next = outbox.claim(&ClaimOptions::new(w("w2"), 10)).await.unwrap();
    assert_eq!(
        ids(&next.events),
        vec![z1.id()],
        "y1 waits behind its tried head; z1 is free once z0 failed"
    );
}

/// A lease is the claimer's: rows are taken again when the lease the
/// claiming worker asked for has passed, whatever the lease of the worker
/// that takes them (each claim stores its own `locked_until`).
pub async fn claim_skips_held_rows_until_the_lease_expires(db: &TestDb) {
    let outbox = db.store.outbox();
    let events: Vec<OutboxEvent> = (0..5).map(|i| ev(&format!("k{i}"), i)).collect();
    seed(db, &events).await;
    // w1 holds the rows with the default 5-minute lease: a claimer with a
    // 10 ms lease does not judge them by its own setting.
    let first = outbox.claim(&ClaimOptions::new(w("w1"), 10)).await.unwrap();
    assert_eq!(first.len(), 5);
    assert!(
        first.events.iter().all(
            |e| e.locked_until() == Some(e.locked_at().unwrap() + chrono::Duration::minutes(5))
        )
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("w2"), 10).lease(Duration::from_millis(10)))
            .await
            .unwrap()
            .is_empty(),
        "w1's 5-minute lease has not expired"
    );
    outbox.release(&first.token, &ids(&events)).await.unwrap();
    // w1 again, now with a 500 ms lease: a worker with the default 5-minute
    // lease takes the rows once w1's own lease has passed (not before: the
    // lease is long enough for the next claim on a loaded machine).
    let short = outbox
        .claim(&ClaimOptions::new(w("w1"), 10).lease(Duration::from_millis(500)))
        .await
        .unwrap();
    assert_eq!(short.len(), 5);
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("w2"), 10))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(outbox.claimable_exists().await.unwrap());
    let second = outbox.claim(&ClaimOptions::new(w("w2"), 10)).await.unwrap();
    assert_eq!(ids(&second.events), ids(&events));
    // w1 lost its lease: its completion is refused and names the rows.
    match outbox
        .complete(&short.token, &ids(&events))
        .await
        .unwrap_err()
    {
        Error::ConcurrentUpdate {
            expected,
            actual,
            missing,
        } => {
            assert_eq!((expected, actual), (5, 0));
            assert_eq!(missing.len(), 5);
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(
        outbox.complete(&second.token, &ids(&events)).await.unwrap(),
        5
    );
    assert_eq!(outbox.counts().await.unwrap().completed, 5);
}

/// A lease is extended while its batch is in flight (the fencing token,
/// `locked_at`, stays), and only by the claim that holds it.
pub async fn extending_a_lease_keeps_the_rows(db: &TestDb) {
    let outbox = db.store.outbox();
    let events: Vec<OutboxEvent> = (0..3).map(|i| ev(&format!("k{i}"), i)).collect();
    seed(db, &events).await;
    // A lease of 1 s extended every 300 ms, four times: the claim's own
    // lease ran out long ago, and a machine that stalls a step (a loaded CI
    // runner) has 700 ms of slack before the extended lease could lapse.
    let lease = Duration::from_secs(1);
    let c = outbox
        .claim(&ClaimOptions::new(w("w1"), 10).lease(lease))
        .await
        .unwrap();
    let claimed = std::time::Instant::now();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            outbox
                .extend_lease(&c.token, &ids(&events), lease)
                .await
                .unwrap(),
            3
        );
    }
    assert!(claimed.elapsed() > lease, "the claim's own lease ran out");
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("w2"), 10))
            .await
            .unwrap()
            .is_empty(),
        "1.2 s after a 1 s claim, the extended lease still holds"
    );
    let row = outbox.get(events[0].id()).await.unwrap().unwrap();
    assert_eq!(row.locked_at(), Some(c.token.locked_at));
    // Extended from the last call (at least 1.2 s in) by 1 s.
    assert!(row.locked_until().unwrap() > c.token.locked_at + chrono::Duration::seconds(2));
    // A stale token extends nothing.
    let stale = omnibox::ClaimToken {
        locked_at: c.token.locked_at - chrono::Duration::seconds(1),
        ..c.token.clone()
    };
    assert_eq!(
        outbox
            .extend_lease(&stale, &ids(&events), Duration::from_secs(60))
            .await
            .unwrap(),
        0
    );
    assert_eq!(outbox.complete(&c.token, &ids(&events)).await.unwrap(), 3);
}

pub async fn fencing_rejects_a_stale_claim_of_the_same_worker(db: &TestDb) {
    let outbox = db.store.outbox();
    let events: Vec<OutboxEvent> = (0..3).map(|i| ev(&format!("k{i}"), i)).collect();
    seed(db, &events).await;
    let old = outbox
        .claim(&ClaimOptions::new(w("relay"), 10).lease(Duration::from_millis(5)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The same worker id (a restarted process, say) re-claims after expiry.
    let new = outbox
        .claim(&ClaimOptions::new(w("relay"), 10))
        .await
        .unwrap();
    assert_eq!(new.len(), 3);
    assert_ne!(old.token, new.token);
    let err = outbox
        .fail(
            &old.token,
            &[Failure::counted(events[0].id(), "late", time::now())],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ConcurrentUpdate { .. }), "{err:?}");
    assert!(matches!(
        outbox.release(&old.token, &ids(&events)).await.unwrap_err(),
        Error::ConcurrentUpdate { .. }
    ));
    // Partly held: the held rows are written, the rest reported.
    outbox
        .complete(&new.token, &[events[0].id()])
        .await
        .unwrap();
    match outbox
        .complete(&new.token, &ids(&events))
        .await
        .unwrap_err()
    {
        Error::ConcurrentUpdate {
            expected: 3,
            actual: 2,
            missing,
        } => assert_eq!(missing, vec![events[0].id()]),
        e => panic!("{e:?}"),
    }
    assert_eq!(outbox.counts().await.unwrap().completed, 3);
}

pub async fn fail_counts_attempts_then_dead_letters(db: &TestDb) {
    let outbox = db.store.outbox();
    let mut n = new_event("k", 0);
    n.max_attempts = Some(2);
    let e = svc().create_outbox_event(n).unwrap();
    seed(db, std::slice::from_ref(&e)).await;
    let long = "x".repeat(3000);
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 1)).await.unwrap();
    let retry = time::now() - chrono::Duration::milliseconds(1);
    let r = outbox
        .fail(&c.token, &[Failure::counted(e.id(), &long, retry)])
        .await
        .unwrap();
    assert_eq!(r.rescheduled, vec![e.id()]);
    let row = outbox.get(e.id()).await.unwrap().unwrap();
    assert_eq!(
        (row.status(), row.attempts_made(), row.is_locked()),
        (EventStatus::Pending, 1, false)
    );
    assert_eq!(row.scheduled_at(), time::truncate(retry));
    let stored = row.last_error().unwrap();
    assert!(
        stored.len() <= 2000 && stored.ends_with("... [TRUNCATED]"),
        "{}",
        stored.len()
    );

    let c = outbox.claim(&ClaimOptions::new(w("w1"), 1)).await.unwrap();
    assert_eq!(c.len(), 1);
    let r = outbox
        .fail(&c.token, &[Failure::counted(e.id(), "again", time::now())])
        .await
        .unwrap();
    assert_eq!(r.failed, vec![e.id()]);
    let row = outbox.get(e.id()).await.unwrap().unwrap();
    assert_eq!(
        (row.status(), row.attempts_made(), row.last_error()),
        (EventStatus::Failed, 2, Some("again"))
    );
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("w1"), 1))
            .await
            .unwrap()
            .is_empty(),
        "failed rows are not claimed"
    );
    assert_eq!(outbox.counts().await.unwrap().failed, 1);
}

pub async fn transient_failure_spends_no_attempt(db: &TestDb) {
    let outbox = db.store.outbox();
    let e = ev("k", 0);
    seed(db, std::slice::from_ref(&e)).await;
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 1)).await.unwrap();
    let retry = time::now() + chrono::Duration::seconds(1);
    outbox
        .fail(
            &c.token,
            &[Failure::transient(e.id(), "broker unreachable", retry)],
        )
        .await
        .unwrap();
    let row = outbox.get(e.id()).await.unwrap().unwrap();
    assert_eq!(
        (row.status(), row.attempts_made()),
        (EventStatus::Pending, 0)
    );
    assert_eq!(row.scheduled_at(), time::truncate(retry));
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("w1"), 1))
            .await
            .unwrap()
            .is_empty(),
        "not due for a second"
    );
}

pub async fn release_returns_rows_untried(db: &TestDb) {
    let outbox = db.store.outbox();
    let events: Vec<OutboxEvent> = (0..3).map(|i| ev("k", i)).collect();
    seed(db, &events).await;
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 10)).await.unwrap();
    assert_eq!(outbox.release(&c.token, &ids(&events)).await.unwrap(), 3);
    let row = outbox.get(events[0].id()).await.unwrap().unwrap();
    assert_eq!(
        (row.is_locked(), row.last_error(), row.attempts_made()),
        (false, None, 0)
    );
    let again = outbox.claim(&ClaimOptions::new(w("w2"), 10)).await.unwrap();
    assert_eq!(ids(&again.events), ids(&events));
}

pub async fn force_unlock_records_the_reason(db: &TestDb) {
    let outbox = db.store.outbox();
    let e = ev("k", 0);
    seed(db, std::slice::from_ref(&e)).await;
    let reason = UnlockReason::new("worker host-3 died").unwrap();
    assert!(matches!(
        outbox.force_unlock(e.id(), &reason).await.unwrap_err(),
        Error::NotLocked { .. }
    ));
    assert!(matches!(
        outbox
            .force_unlock(Uuid::new_v4(), &reason)
            .await
            .unwrap_err(),
        Error::NotFound { .. }
    ));
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 1)).await.unwrap();
    let row = outbox.force_unlock(e.id(), &reason).await.unwrap();
    assert!(!row.is_locked());
    assert_eq!(row.last_error(), Some("Force unlock: worker host-3 died"));
    // The old owner's completion is fenced off.
    assert!(matches!(
        outbox.complete(&c.token, &[e.id()]).await.unwrap_err(),
        Error::ConcurrentUpdate { .. }
    ));
    assert_eq!(
        outbox
            .claim(&ClaimOptions::new(w("w2"), 1))
            .await
            .unwrap()
            .len(),
        1
    );
    // A row's own error is kept (the reason is the audit row's business).
    let e2 = ev("k2", 1);
    seed(db, std::slice::from_ref(&e2)).await;
    let c = outbox.claim(&ClaimOptions::new(w("w3"), 1)).await.unwrap();
    assert_eq!(ids(&c.events), vec![e2.id()]);
    outbox
        .fail(
            &c.token,
            &[Failure::counted(
                e2.id(),
                "broker rejected the record",
                time::now(),
            )],
        )
        .await
        .unwrap();
    let c = outbox.claim(&ClaimOptions::new(w("w4"), 1)).await.unwrap();
    assert_eq!(ids(&c.events), vec![e2.id()]);
    let row = outbox.force_unlock(e2.id(), &reason).await.unwrap();
    assert_eq!(row.last_error(), Some("broker rejected the record"));
    let c = outbox.claim(&ClaimOptions::new(w("w5"), 1)).await.unwrap();
    assert_eq!(ids(&c.events), vec![e2.id()]);
    let gone = omnibox::MaintenanceStore::force_unlock_worker(&outbox, "w5", &reason)
        .await
        .unwrap();
    assert_eq!(gone, vec![e2.id()]);
    let row = outbox.get(e2.id()).await.unwrap().unwrap();
    assert_eq!(row.last_error(), Some("broker rejected the record"));
}

pub async fn release_stale_locks_in_batches(db: &TestDb) {
    let outbox = db.store.outbox();
    let events: Vec<OutboxEvent> = (0..30).map(|i| ev(&format!("k{i}"), i)).collect();
    seed(db, &events).await;
    // 25 rows of a worker whose lease runs out at once, 5 of a live one.
    let live = outbox
        .claim(&ClaimOptions::new(w("w2"), 5))
        .await
        .unwrap()
        .len() as u64;
    let old = outbox
        .claim(&ClaimOptions::new(w("w1"), 25).lease(Duration::from_millis(5)))
        .await
        .unwrap()
        .len() as u64;
    assert!(old > 0 && live > 0);
    assert_eq!(
        outbox
            .release_stale_locks(Duration::from_secs(3600), 10)
            .await
            .unwrap(),
        0,
        "not stale yet"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        omnibox::MaintenanceStore::count_stale_locks(&outbox, Duration::ZERO)
            .await
            .unwrap(),
        25
    );
    assert_eq!(
        outbox
            .release_stale_locks(Duration::ZERO, 10)
            .await
            .unwrap(),
        old,
        "a live lease is never released, whatever the threshold"
    );
    assert_eq!(outbox.counts().await.unwrap().locked, live);
    assert_eq!(
        db.store
            .inbox()
            .release_stale_locks(Duration::from_millis(10), 10)
            .await
            .unwrap(),
        0
    );
}

pub async fn delete_completed_in_batches(db: &TestDb) {
    let outbox = db.store.outbox();
    let events: Vec<OutboxEvent> = (0..25).map(|i| ev(&format!("k{i}"), i)).collect();
    seed(db, &events).await;
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 20)).await.unwrap();
    outbox.complete(&c.token, &ids(&c.events)).await.unwrap();
    assert_eq!(
        outbox
            .delete_completed(Duration::from_secs(3600), 100)
            .await
            .unwrap(),
        0,
        "within retention"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        outbox
            .delete_completed(Duration::from_millis(10), 8)
            .await
            .unwrap(),
        8
    );
    assert_eq!(
        outbox
            .delete_completed(Duration::from_millis(10), 8)
            .await
            .unwrap(),
        8
    );
    assert_eq!(
        outbox
            .delete_completed(Duration::from_millis(10), 8)
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        outbox
            .delete_completed(Duration::from_millis(10), 8)
            .await
            .unwrap(),
        0
    );
    let c = outbox.counts().await.unwrap();
    assert_eq!(
        (c.completed, c.pending),
        (0, 5),
        "pending rows are never deleted"
    );
}

pub async fn requeue_failed_by_filter(db: &TestDb) {
    let outbox = db.store.outbox();
    let mut events = Vec::new();
    for i in 0..6 {
        let mut n = new_event(&format!("k{i}"), i);
        n.max_attempts = Some(1);
        if i >= 4 {
            n.event_type = "order.cancelled".into();
        }
        events.push(svc().create_outbox_event(n).unwrap());
    }
    seed(db, &events).await;
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 10)).await.unwrap();
    let failures: Vec<Failure> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            Failure::counted(
                e.id(),
                if i % 2 == 0 {
                    "timeout talking to X"
                } else {
                    "schema mismatch"
                },
                time::now(),
            )
        })
        .collect();
    assert_eq!(
        outbox.fail(&c.token, &failures).await.unwrap().failed.len(),
        6
    );

    let err = outbox
        .requeue_failed(&RequeueFilter::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Validation { .. }));
    let by_id = outbox
        .requeue_failed(&RequeueFilter {
            failures: FailureSelector {
                ids: vec![events[0].id()],
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_id, vec![events[0].id()]);
    let row = outbox.get(events[0].id()).await.unwrap().unwrap();
    assert_eq!(
        (row.status(), row.attempts_made(), row.last_error()),
        (EventStatus::Pending, 0, None)
    );
    let by_type = outbox
        .requeue_failed(&RequeueFilter {
            failures: FailureSelector {
                select: EventSelector {
                    event_type: Some("order.cancelled".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_type.len(), 2);
    let by_error = outbox
        .requeue_failed(&RequeueFilter {
            failures: FailureSelector {
                error_contains: Some("timeout".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        by_error,
        vec![events[2].id()],
        "0 and 4 were requeued already"
    );
    let future = time::now() + chrono::Duration::hours(1);
    let none = outbox
        .requeue_failed(&RequeueFilter {
            failures: FailureSelector {
                window: TimeWindow {
                    since: Some(future),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
    let rest = outbox
        .requeue_failed(&RequeueFilter {
            all: true,
            limit: Some(10),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(outbox.counts().await.unwrap().failed, 0);
}

pub async fn database_enforces_invariants(db: &TestDb) {
    let cases: [(&str, &'static str, &'static str); 6] = [
        (
            "attempts over max",
            "INSERT INTO outbox_events (id, event_type, payload, status, attempts_made, max_attempts, aggregate_type, aggregate_id, topic, partition_key) VALUES (gen_random_uuid(), 't', '{\"a\":1}', 'pending', 7, 6, 'a', gen_random_uuid(), 't', 'k')",
            "INSERT INTO outbox_events (id, event_type, payload, status, attempts_made, max_attempts, scheduled_at, created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key) VALUES ('00000000-0000-0000-0000-000000000001', 't', '{\"a\":1}', 'pending', 7, 6, '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', 'a', '00000000-0000-0000-0000-000000000001', 't', 'k')",
        ),
        (
            "completed without completed_at",
            "INSERT INTO outbox_events (id, event_type, payload, status, aggregate_type, aggregate_id, topic, partition_key) VALUES (gen_random_uuid(), 't', '{\"a\":1}', 'completed', 'a', gen_random_uuid(), 't', 'k')",
            "INSERT INTO outbox_events (id, event_type, payload, status, scheduled_at, created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key) VALUES ('00000000-0000-0000-0000-000000000002', 't', '{\"a\":1}', 'completed', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', 'a', '00000000-0000-0000-0000-000000000001', 't', 'k')",
        ),
        (
            "locked_at without locked_by",
            "INSERT INTO outbox_events (id, event_type, payload, locked_at, aggregate_type, aggregate_id, topic, partition_key) VALUES (gen_random_uuid(), 't', '{\"a\":1}', now(), 'a', gen_random_uuid(), 't', 'k')",
            "INSERT INTO outbox_events (id, event_type, payload, locked_at, scheduled_at, created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key) VALUES ('00000000-0000-0000-0000-000000000003', 't', '{\"a\":1}', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', 'a', '00000000-0000-0000-0000-000000000001', 't', 'k')",
        ),
        (
            "unknown status",
            "INSERT INTO outbox_events (id, event_type, payload, status, aggregate_type, aggregate_id, topic, partition_key) VALUES (gen_random_uuid(), 't', '{\"a\":1}', 'done', 'a', gen_random_uuid(), 't', 'k')",
            "INSERT INTO outbox_events (id, event_type, payload, status, scheduled_at, created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key) VALUES ('00000000-0000-0000-0000-000000000004', 't', '{\"a\":1}', 'done', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', 'a', '00000000-0000-0000-0000-000000000001', 't', 'k')",
        ),
        (
            "payload not an object",
            "INSERT INTO outbox_events (id, event_type, payload, aggregate_type, aggregate_id, topic, partition_key) VALUES (gen_random_uuid(), 't', '[1,2]', 'a', gen_random_uuid(), 't', 'k')",
            "INSERT INTO outbox_events (id, event_type, payload, scheduled_at, created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key) VALUES ('00000000-0000-0000-0000-000000000005', 't', '[1,2]', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', 'a', '00000000-0000-0000-0000-000000000001', 't', 'k')",
        ),
        (
            "duplicate inbox message",
            "INSERT INTO inbox_events (id, event_type, payload, message_id, consumer_group, source) SELECT gen_random_uuid(), 't', '{\"a\":1}', 'm', 'g', 's' FROM generate_series(1, 2)",
            "INSERT INTO inbox_events (id, event_type, payload, scheduled_at, created_at, updated_at, message_id, consumer_group, source) VALUES ('00000000-0000-0000-0000-000000000006', 't', '{\"a\":1}', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', 'm', 'g', 's'), ('00000000-0000-0000-0000-000000000007', 't', '{\"a\":1}', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', 'm', 'g', 's')",
        ),
    ];
    for (what, pg, sqlite) in cases {
        let err = raw(db, pg, sqlite).await.expect_err(what);
        let db_err = err
            .as_database_error()
            .unwrap_or_else(|| panic!("{what}: {err}"));
        // SQLite enforces the lease pairing with a trigger (a table CHECK
        // cannot be added to an existing table).
        assert!(
            db_err.is_check_violation()
                || db_err.is_unique_violation()
                || db_err.message().contains("must be set together"),
            "{what}: expected a constraint violation, got {db_err}"
        );
    }
    // The same writes with valid values pass, so the failures above are the constraints'.
    raw(
        db,
        "INSERT INTO outbox_events (id, event_type, payload, aggregate_type, aggregate_id, topic, partition_key) VALUES (gen_random_uuid(), 't', '{\"a\":1}', 'a', gen_random_uuid(), 't', 'k')",
        "INSERT INTO outbox_events (id, event_type, payload, scheduled_at, created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key) VALUES ('00000000-0000-0000-0000-000000000008', 't', '{\"a\":1}', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', 'a', '00000000-0000-0000-0000-000000000001', 't', 'k')",
    )
    .await
    .unwrap();
    // An update that breaks the lock pairing is refused too.
    let err = raw(
        db,
        "UPDATE outbox_events SET locked_by = 'w1'",
        "UPDATE outbox_events SET locked_by = 'w1'",
    )
    .await
    .unwrap_err();
    assert!(
        err.as_database_error().unwrap().is_check_violation(),
        "{err}"
    );
    if !db.is_postgres() {
        // SQLite also checks the timestamp text form, so comparisons stay correct.
        let err = raw(
            db,
            "",
            "UPDATE outbox_events SET scheduled_at = '2026-01-01 00:00:00'",
        )
        .await
        .unwrap_err();
        assert!(
            err.as_database_error().unwrap().is_check_violation(),
            "{err}"
        );
    }
}

/// Claims with filters: the outbox by topic (a dedicated relay), the inbox
/// by source and event type. Only matching rows are handed out, per-key
/// order holds, `claimable_exists_for` answers for the filter, a filter the
/// table does not take is refused, and the filtered scans read the filter
/// indexes (`outbox_events_topic_due`, `inbox_events_source_due`).
pub async fn filtered_claims_take_only_their_rows_from_an_index(db: &TestDb) {
    use omnibox::{FetchFilters, NewInboxEvent};
    let events: Vec<OutboxEvent> = (0..3000)
        .map(|i| {
            let mut n = new_event(&format!("k{}", i % 20), i);
            n.topic = format!("t{}", i % 10);
            svc().create_outbox_event(n).unwrap()
        })
        .collect();
    seed(db, &events).await;
    let outbox = db.store.outbox();
    let only = |topics: &[&str]| FetchFilters {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        ..FetchFilters::default()
    };
    let mut opts = ClaimOptions::new(w("w1"), 1000);
    opts.filters = only(&["t3"]);
    let c = outbox.claim(&opts).await.unwrap();
    assert_eq!(c.events.len(), 300, "every due row of t3, in one claim");
    assert!(c.events.iter().all(|e| e.topic() == "t3"));
    let mut last: HashMap<&str, usize> = HashMap::new();
    for e in &c.events {
        let n = e.payload()["n"].as_u64().unwrap() as usize;
        if let Some(prev) = last.insert(e.partition_key(), n) {
            assert!(prev < n, "key order within the claim");
        }
    }
    assert!(!outbox.claimable_exists_for(&only(&["t3"])).await.unwrap());
    assert!(
        outbox
            .claimable_exists_for(&only(&["t4", "t9"]))
            .await
            .unwrap()
    );
    assert!(outbox.claimable_exists().await.unwrap());
    let mut opts = ClaimOptions::new(w("w2"), 1000);
    opts.filters = only(&["t4", "t9"]);
    let c = outbox.claim(&opts).await.unwrap();
    assert_eq!(c.events.len(), 600);
    assert!(
        c.events
            .iter()
            .all(|e| e.topic() == "t4" || e.topic() == "t9")
    );
    opts.filters = FetchFilters {
        sources: vec!["billing".into()],
        ..FetchFilters::default()
    };
    let e = outbox.claim(&opts).await.unwrap_err().to_string();
    assert!(e.contains("cannot filter by sources"), "{e}");

    // The inbox, by source and event type.
    let inbox_rows: Vec<_> = (0..600)
        .map(|i| {
            let n = NewInboxEvent::new(
                format!("m-{i}"),
                "g",
                format!("s{}", i % 3),
                if i % 2 == 0 { "a" } else { "b" },
                json!({"n": i}),
            );
            svc().create_inbox_event(n).unwrap()
        })
        .collect();
    for row in &inbox_rows {
        db.store.inbox().insert(row).await.unwrap();
    }
    let inbox = db.store.inbox();
    let filters = FetchFilters {
        sources: vec!["s1".into()],
        event_types: vec!["b".into()],
        ..FetchFilters::default()
    };
    let mut opts = ClaimOptions::new(w("p1"), 1000);
    opts.filters = filters.clone();
    let c = inbox.claim(&opts).await.unwrap();
    assert_eq!(c.events.len(), 100, "i % 3 == 1 and i odd: 100 of 600");
    assert!(
        c.events
            .iter()
            .all(|e| e.source() == "s1" && e.event_type() == "b")
    );
    assert!(!inbox.claimable_exists_for(&filters).await.unwrap());
    assert!(inbox.claimable_exists().await.unwrap());
    // By consumer group: rows of other groups are left.
    for i in 0..10 {
        let n = NewInboxEvent::new(
            format!("m-{i}"),
            if i % 2 == 0 { "g2" } else { "g3" },
            "s1",
            "b",
            json!({"n": i}),
        );
        db.store
            .inbox()
            .insert(&svc().create_inbox_event(n).unwrap())
            .await
            .unwrap();
    }
    let groups = FetchFilters {
        consumer_groups: vec!["g2".into()],
        ..filters.clone()
    };
    assert!(inbox.claimable_exists_for(&groups).await.unwrap());
    let mut opts = ClaimOptions::new(w("p3"), 1000);
    opts.filters = groups.clone();
    let c = inbox.claim(&opts).await.unwrap();
    assert_eq!(c.events.len(), 5, "the g2 rows of s1 and b");
    assert!(c.events.iter().all(|e| e.consumer_group() == "g2"));
    assert!(!inbox.claimable_exists_for(&groups).await.unwrap());
    assert!(
        inbox.claimable_exists_for(&filters).await.unwrap(),
        "g3's rows"
    );
    let e = outbox
        .claim(&ClaimOptions {
            filters: FetchFilters {
                consumer_groups: vec!["g2".into()],
                ..FetchFilters::default()
            },
            ..ClaimOptions::new(w("w3"), 10)
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot filter by consumer groups"), "{e}");
    let e = inbox
        .claimable_exists_for(&only(&["t1"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot filter by topics"), "{e}");

    // The plans.
    match &db.store {
        AnyStore::Postgres(s) => {
            // A rare topic (a dedicated relay's slow topic) among many rows.
            let rare: Vec<OutboxEvent> = (0..30)
                .map(|i| {
                    let mut n = new_event(&format!("s{}", i % 3), 10_000 + i);
                    n.topic = "slow".into();
                    svc().create_outbox_event(n).unwrap()
                })
                .collect();
            seed(db, &rare).await;
            sqlx::query("ANALYZE outbox_events")
                .execute(s.pool())
                .await
                .unwrap();
            sqlx::query("ANALYZE inbox_events")
                .execute(s.pool())
                .await
                .unwrap();
            let beginning = chrono::DateTime::from_timestamp(-62_135_596_800, 0).unwrap();
            let scan_plan = |topic: &'static str| {
                let pool = s.pool().clone();
                async move {
                    let sql = format!(
                        "EXPLAIN (FORMAT TEXT) {}",
                        omnibox::store::postgres::OUTBOX_SCAN
                    );
                    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .bind(beginning)
                        .bind(0_i64)
                        .bind(10_i64)
                        .bind(10_i64)
                        .bind(0_i64)
                        .bind(Some(topic))
                        .bind(None::<Vec<String>>)
                        .persistent(false)
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                    rows.join("\n")
                }
            };
            // Index-served either way, in (scheduled_at, seq) order: a rare
            // topic from its own index, a common one from the claim index.
            let rare_plan = scan_plan("slow").await;
            assert!(
                rare_plan.contains("Index Scan using outbox_events_topic_due"),
                "{rare_plan}"
            );
            for plan in [rare_plan, scan_plan("t5").await] {
                assert!(!plan.contains("Seq Scan"), "{plan}");
                assert!(!plan.contains("Sort Key: r.scheduled_at"), "{plan}");
            }
            for i in 0..5 {
                let n = NewInboxEvent::new(format!("r-{i}"), "g", "rare", "a", json!({"n": i}));
                db.store
                    .inbox()
                    .insert(&svc().create_inbox_event(n).unwrap())
                    .await
                    .unwrap();
            }
            sqlx::query("ANALYZE inbox_events")
                .execute(s.pool())
                .await
                .unwrap();
            let claim_plan = |source: &'static str| {
                let pool = s.pool().clone();
                async move {
                    let sql = format!(
                        "EXPLAIN (FORMAT TEXT) {}",
                        omnibox::store::postgres::INBOX_CLAIM
                    );
                    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .bind(60.0_f64)
                        .bind(10_i64)
                        .bind("p2")
                        .bind(Some(vec![source.to_string()]))
                        .bind(Some(vec!["a".to_string()]))
                        .bind(16_i64 << 20)
                        .bind(None::<Vec<String>>)
                        .persistent(false)
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                    rows.join("\n")
                }
            };
            let rare = claim_plan("rare").await;
            assert!(rare.contains("inbox_events_source_due"), "{rare}");
            // The rows to claim are found by an index (the final UPDATE may
            // join the few picked ids any way it likes).
            for plan in [rare, claim_plan("s2").await] {
                let free = plan
                    .split("CTE expired")
                    .next()
                    .unwrap_or_default()
                    .to_string();
                assert!(free.contains("Index Scan"), "{plan}");
                assert!(!free.contains("Seq Scan"), "{plan}");
            }
        }
        AnyStore::Sqlite(s) => {
            let now = time::format(&time::now());
            let sql = format!("EXPLAIN QUERY PLAN {}", omnibox::store::sqlite::OUTBOX_SCAN);
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now)
                .bind("0001-01-01T00:00:00.000000Z")
                .bind(0_i64)
                .bind(1000_i64)
                .bind(1000_i64)
                .bind(0_i64)
                .bind(r#"["t5"]"#)
                .fetch_all(s.pool())
                .await
                .unwrap();
            let plan: Vec<String> = rows
                .iter()
                .map(|r| sqlx::Row::get::<String, _>(r, "detail"))
                .collect();
            let plan = plan.join("\n");
            assert!(
                !plan.contains("SCAN outbox_events\n") && !plan.ends_with("SCAN outbox_events"),
                "{plan}"
            );
            assert!(plan.contains("outbox_events_"), "{plan}");
        }
        _ => unreachable!(),
    }
}

pub async fn claim_is_served_by_the_index(db: &TestDb) {
    let events: Vec<OutboxEvent> = (0..20_000)
        .map(|i| ev(&format!("k{}", i % 100), i))
        .collect();
    match &db.store {
        AnyStore::Postgres(s) => {
            // The plan must not depend on statistics: check it on a table
            // analyzed while empty, then loaded (the statistics say "no
            // rows"), on one loaded and never analyzed, and once analyzed.
            sqlx::query("ANALYZE outbox_events")
                .execute(s.pool())
                .await
                .unwrap();
            seed(db, &events).await;
            let explain = || async {
                let beginning = chrono::DateTime::from_timestamp(-62_135_596_800, 0).unwrap();
                let mut conn = s.pool().acquire().await.unwrap();
                let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
                let sql = format!(
                    "EXPLAIN (FORMAT TEXT) {}",
                    omnibox::store::postgres::OUTBOX_SCAN
                );
                let scan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(beginning)
                    .bind(0_i64)
                    .bind(1000_i64)
                    .bind(1000_i64)
                    .bind(0_i64)
                    .bind(None::<String>)
                    .bind(None::<Vec<String>>)
                    .persistent(false)
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap();
                let sql = format!(
                    "EXPLAIN (FORMAT TEXT) {}",
                    omnibox::store::postgres::OUTBOX_WALK
                );
                let walk: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(vec!["orders".to_string(); 3])
                    .bind(vec!["k1".to_string(), "k2".to_string(), "k3".to_string()])
                    .bind(1000_i64)
                    .bind(vec![None, Some(1_i64), None])
                    .bind(vec![None, Some(900_i64), None])
                    .bind("relay-1")
                    .persistent(false)
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap();
                drop(tx);
                // The claim's writes by id, as the claim runs them: in its
                // transaction, for a batch of 1,000 rows.
                let mut tx =
                    sqlx::Connection::begin_with(&mut *conn, omnibox::store::postgres::CLAIM_BEGIN)
                        .await
                        .unwrap();
                let (ids, from, to): (Vec<Uuid>, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
                    sqlx::query_as(
                        "SELECT array_agg(id), min(created_at), max(created_at)
                           FROM (SELECT id, created_at FROM outbox_events ORDER BY seq LIMIT 1000) b",
                    )
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                let mut by_id = Vec::new();
                for (name, sql) in [
                    ("lock", omnibox::store::postgres::OUTBOX_LOCK),
                    ("lock read", omnibox::store::postgres::OUTBOX_LOCK_READ),
                    ("mark", omnibox::store::postgres::OUTBOX_MARK),
                    (
                        "held completion",
                        omnibox::store::postgres::OUTBOX_COMPLETE_HELD,
                    ),
                ] {
                    let sql = format!("EXPLAIN (FORMAT TEXT) {sql}");
                    let q = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(ids.clone());
                    let q = match name {
                        "lock" | "held completion" => q.bind(from).bind(to),
                        "lock read" => q
                            .bind(from)
                            .bind(to)
                            .bind("relay-1")
                            .bind(60.0_f64)
                            .bind("60000"),
                        _ => q.bind("relay-1").bind(60.0_f64).bind(from).bind(to),
                    };
                    let plan: Vec<String> = q.persistent(false).fetch_all(&mut *tx).await.unwrap();
                    by_id.push(format!("--- {name}\n{}", plan.join("\n")));
                }
                drop(tx);
                // The same and the walk as generic plans, as a claim runs
                // them on a plain table (after its scan, or from the start
                // for given keys): each prepared, then explained through
                // EXECUTE, which plans it generically.
                let mut tx = sqlx::Connection::begin_with(
                    &mut *conn,
                    omnibox::store::postgres::CLAIM_GENERIC_BEGIN,
                )
                .await
                .unwrap();
                for (name, sql) in [
                    ("walk", omnibox::store::postgres::OUTBOX_WALK),
                    ("lock", omnibox::store::postgres::OUTBOX_LOCK),
                    ("lock read", omnibox::store::postgres::OUTBOX_LOCK_READ),
                    ("mark", omnibox::store::postgres::OUTBOX_MARK),
                    (
                        "held completion",
                        omnibox::store::postgres::OUTBOX_COMPLETE_HELD,
                    ),
                ] {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "PREPARE omnibox_generic AS {sql}"
                    )))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    // EXECUTE takes no protocol parameters: the values are
                    // written out (the test's own, and a generic plan does
                    // not depend on them).
                    let id_list = format!(
                        "'{{{}}}'::uuid[]",
                        ids.iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    );
                    let (lo, hi) = (
                        format!("'{}'::timestamptz", from.to_rfc3339()),
                        format!("'{}'::timestamptz", to.to_rfc3339()),
                    );
                    let values = match name {
                        "walk" => "ARRAY['orders','orders','orders'], ARRAY['k1','k2','k3'], 1000, \
                                   ARRAY[NULL,1,NULL]::int8[], ARRAY[NULL,900,NULL]::int8[], 'relay-1'"
                            .to_string(),
                        "lock" | "held completion" => format!("{id_list}, {lo}, {hi}"),
                        "lock read" => format!("{id_list}, {lo}, {hi}, 'relay-1', 60, '60000'"),
                        _ => format!("{id_list}, 'relay-1', 60, {lo}, {hi}"),
                    };
                    let sql = format!("EXPLAIN (FORMAT TEXT) EXECUTE omnibox_generic({values})");
                    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .persistent(false)
                        .fetch_all(&mut *tx)
                        .await
                        .unwrap();
                    sqlx::raw_sql("DEALLOCATE omnibox_generic")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    by_id.push(format!("--- generic {name}\n{}", plan.join("\n")));
                }
                drop(tx);
                format!(
                    "{}\n--- walk\n{}\n{}",
                    scan.join("\n"),
                    walk.join("\n"),
                    by_id.join("\n")
                )
            };
            let mut plans = vec![("analyzed empty, then loaded", explain().await)];
            sqlx::query("DELETE FROM pg_statistic WHERE starelid = 'outbox_events'::regclass")
                .execute(s.pool())
                .await
                .ok();
            plans.push(("loaded, statistics removed", explain().await));
            sqlx::query("ANALYZE outbox_events")
                .execute(s.pool())
                .await
                .unwrap();
            plans.push(("analyzed", explain().await));
            for (when, plan) in plans {
                assert!(
                    plan.contains("Index Scan using outbox_events_claim"),
                    "{when}:\n{plan}"
                );
                assert!(
                    plan.contains("Index Scan using outbox_events_key_order"),
                    "{when}:\n{plan}"
                );
                assert!(!plan.contains("Seq Scan"), "{when}:\n{plan}");
                assert!(plan.contains("outbox_events_locked"), "{when}:\n{plan}");
                // The pending backlog is read in index order, never sorted or
                // bitmap-scanned (the expired-lease scan reads only locked
                // rows, a handful, and may sort those).
                for bad in [
                    "Sort Key: r.scheduled_at",
                    "Bitmap Index Scan on outbox_events_claim",
                    "Bitmap Index Scan on outbox_events_key_order",
                ] {
                    assert!(!plan.contains(bad), "{when}: {bad}:\n{plan}");
                }
                // The scan switches the rest of its claim to generic plans
                // once, before its first row.
                assert!(plan.contains("One-Time Filter"), "{when}:\n{plan}");
                // A batch's rows are found by primary key: never by reading
                // the table, nor every pending row of a partial index; the
                // walk by the key-order index. The same as generic plans
                // (their conditions name the parameters, not values).
                for part in plan.split("--- ").skip(2) {
                    if part.starts_with("generic walk") {
                        assert!(
                            part.contains("Index Scan using outbox_events_key_order"),
                            "{when}:\n{part}"
                        );
                        assert!(part.contains("= $6)"), "{when}: not generic:\n{part}");
                        assert!(!part.contains("Seq Scan"), "{when}:\n{part}");
                        continue;
                    }
                    assert!(part.contains("outbox_events_pkey"), "{when}:\n{part}");
                    if part.starts_with("generic") {
                        assert!(part.contains("ANY ($1)"), "{when}: not generic:\n{part}");
                    }
                    for bad in ["Seq Scan", "outbox_events_key_order", "outbox_events_claim"] {
                        assert!(!part.contains(bad), "{when}: {bad}:\n{part}");
                    }
                }
            }
            // Run, the scan leaves its transaction in generic plans (and
            // the next claim's transaction starts in custom ones again).
            let mut conn = s.pool().acquire().await.unwrap();
            for _ in 0..2 {
                let mut tx =
                    sqlx::Connection::begin_with(&mut *conn, omnibox::store::postgres::CLAIM_BEGIN)
                        .await
                        .unwrap();
                let mode = || sqlx::query_scalar::<_, String>("SHOW plan_cache_mode");
                assert_eq!(
                    mode().fetch_one(&mut *tx).await.unwrap(),
                    "force_custom_plan"
                );
                let rows = sqlx::query(omnibox::store::postgres::OUTBOX_SCAN)
                    .bind(chrono::DateTime::from_timestamp(-62_135_596_800, 0).unwrap())
                    .bind(0_i64)
                    .bind(10_i64)
                    .bind(10_i64)
                    .bind(0_i64)
                    .bind(None::<String>)
                    .bind(None::<Vec<String>>)
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap();
                assert_eq!(rows.len(), 10);
                assert_eq!(
                    mode().fetch_one(&mut *tx).await.unwrap(),
                    "force_generic_plan"
                );
                tx.rollback().await.unwrap();
            }
        }
        AnyStore::Sqlite(s) => {
            seed(db, &events).await;
            let now = time::format(&time::now());
            let mut plan = Vec::new();
            let sql = format!("EXPLAIN QUERY PLAN {}", omnibox::store::sqlite::OUTBOX_SCAN);
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now.clone())
                .bind("0001-01-01T00:00:00.000000Z")
                .bind(0_i64)
                .bind(1000_i64)
                .bind(1000_i64)
                .bind(0_i64)
                .bind(None::<String>)
                .fetch_all(s.pool())
                .await
                .unwrap();
            plan.extend(
                rows.iter()
                    .map(|r| sqlx::Row::get::<String, _>(r, "detail")),
            );
            let sql = format!("EXPLAIN QUERY PLAN {}", omnibox::store::sqlite::OUTBOX_WALK);
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now)
                .bind(r#"[["orders","k1"],["orders","k2"]]"#)
                .bind(1000_i64)
                .fetch_all(s.pool())
                .await
                .unwrap();
            plan.extend(
                rows.iter()
                    .map(|r| sqlx::Row::get::<String, _>(r, "detail")),
            );
            let plan = plan.join("\n");
            assert!(plan.contains("USING INDEX outbox_events_claim"), "{plan}");
            assert!(plan.contains("outbox_events_key_order"), "{plan}");
            assert!(!plan.contains("SCAN outbox_events"), "{plan}");
        }
        _ => unreachable!(),
    }
    // And the claim itself hands out a full batch from the 20,000.
    let c = db
        .store
        .outbox()
        .claim(&ClaimOptions::new(w("w1"), 1000))
        .await
        .unwrap();
    assert_eq!(c.len(), 1000);
}

pub async fn concurrent_claimers_share_the_work_in_key_order(db: &TestDb) {
    const ROWS: usize = 10_000;
    const KEYS: usize = 50;
    let events: Vec<OutboxEvent> = (0..ROWS)
        .map(|i| ev(&format!("key-{}", i % KEYS), i))
        .collect();
    seed(db, &events).await;
    let seq_of: HashMap<Uuid, (String, usize)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id(), (e.partition_key().to_string(), i)))
        .collect();
    let seq_of = Arc::new(seq_of);
    let clock = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let outbox = db.store.outbox();
        let clock = clock.clone();
        tasks.push(tokio::spawn(async move {
            let me = w(&format!("worker-{worker}"));
            let mut got: Vec<(u64, Uuid)> = Vec::new();
            let mut idle = 0;
            while idle < 50 {
                let c = outbox
                    .claim(&ClaimOptions::new(me.clone(), 100))
                    .await
                    .unwrap();
                if c.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                idle = 0;
                // Stamp each event in claim order: a key's next rows can only
                // be claimed after these are completed, so stamps must follow seq.
                for e in &c.events {
                    got.push((clock.fetch_add(1, Ordering::SeqCst), e.id()));
                }
                outbox.complete(&c.token, &ids(&c.events)).await.unwrap();
            }
            got
        }));
    }
    let mut all: Vec<(u64, Uuid)> = Vec::new();
    let mut per_worker = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        per_worker.push(got.len());
        all.extend(got);
    }
    let unique: HashSet<Uuid> = all.iter().map(|(_, id)| *id).collect();
    assert_eq!(all.len(), unique.len(), "no row was handed out twice");
    assert_eq!(unique.len(), ROWS, "every row was handed out");
    all.sort();
    let mut last_by_key: HashMap<String, usize> = HashMap::new();
    for (_, id) in &all {
        let (key, seq) = &seq_of[id];
        if let Some(prev) = last_by_key.insert(key.clone(), *seq) {
            assert!(
                prev < *seq,
                "key {key}: row {seq} handed out after row {prev}"
            );
        }
    }
    assert_eq!(
        db.store.outbox().counts().await.unwrap().completed,
        ROWS as u64
    );
    eprintln!("rows per worker: {per_worker:?}");
}

/// Rows queued behind failed heads must not fill the claim window and starve
/// the heads once they are due again.
pub async fn rows_behind_failed_heads_do_not_starve_them(db: &TestDb) {
    let outbox = db.store.outbox();
    let events: Vec<OutboxEvent> = (0..200).map(|i| ev(&format!("k{}", i % 10), i)).collect();
    seed(db, &events).await;
    let first = outbox
        .claim(&ClaimOptions::new(w("w1"), 200))
        .await
        .unwrap();
    assert_eq!(first.len(), 200);
    // Each key's head fails transiently (retry in 500 ms: wide enough that the
    // claims below run before it on a slow machine); the rest of the runs are
    // released.
    let heads: Vec<Uuid> = (0..10).map(|i| events[i].id()).collect();
    let retry = time::now() + chrono::Duration::milliseconds(500);
    let failures: Vec<Failure> = heads
        .iter()
        .map(|id| Failure::transient(*id, "broker down", retry))
        .collect();
    outbox.fail(&first.token, &failures).await.unwrap();
    let rest: Vec<Uuid> = ids(&first.events)
        .into_iter()
        .filter(|id| !heads.contains(id))
        .collect();
    outbox.release(&first.token, &rest).await.unwrap();
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("w1"), 50))
            .await
            .unwrap()
            .is_empty(),
        "heads not due yet"
    );
    assert!(!outbox.claimable_exists().await.unwrap());
    tokio::time::sleep(Duration::from_millis(530)).await;
    // 190 rows wait behind 10 heads; a claim of 10 must still reach the
    // heads, and a tried head goes alone.
    let again = outbox.claim(&ClaimOptions::new(w("w1"), 10)).await.unwrap();
    let got: HashSet<Uuid> = ids(&again.events).into_iter().collect();
    assert_eq!(got, heads.iter().copied().collect::<HashSet<_>>());
}

fn ev_at(key: &str, n: usize, scheduled_at: omnibox::Timestamp) -> OutboxEvent {
    let mut e = new_event(key, n);
    e.scheduled_at = Some(scheduled_at);
    svc().create_outbox_event(e).unwrap()
}

/// A key's later row scheduled before its head (clock skew, an explicit
/// `scheduled_at`) must not stall the claim: the old window took the first N
/// due rows by time and dropped rows whose head lay outside it, so N such
/// rows ahead of the heads made every claim empty.
pub async fn successors_scheduled_before_their_head_do_not_stall_the_claim(db: &TestDb) {
    let outbox = db.store.outbox();
    let past = time::now() - chrono::Duration::seconds(30);
    // One key: k#1 now, k#2 thirty seconds earlier.
    let one = vec![ev("k", 0), ev_at("k", 1, past)];
    seed(db, &one).await;
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 1)).await.unwrap();
    assert_eq!(
        ids(&c.events),
        vec![one[0].id()],
        "the head first, alone in a batch of 1"
    );
    outbox.complete(&c.token, &ids(&c.events)).await.unwrap();
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 1)).await.unwrap();
    assert_eq!(ids(&c.events), vec![one[1].id()]);
    outbox.complete(&c.token, &ids(&c.events)).await.unwrap();
    // 150 keys shaped the same way, batch 100: every claim is full and every
    // key keeps its order.
    let mut many = Vec::new();
    for k in 0..150 {
        many.push(ev(&format!("m{k}"), 2 * k));
    }
    for k in 0..150 {
        many.push(ev_at(&format!("m{k}"), 2 * k + 1, past));
    }
    seed(db, &many).await;
    let mut handed = Vec::new();
    loop {
        let c = outbox
            .claim(&ClaimOptions::new(w("w1"), 100))
            .await
            .unwrap();
        if c.is_empty() {
            break;
        }
        assert!(
            c.len() == 100 || handed.len() + c.len() == 300,
            "a short claim: {}",
            c.len()
        );
        handed.extend(ids(&c.events));
        outbox.complete(&c.token, &ids(&c.events)).await.unwrap();
    }
    assert_eq!(handed.len(), 300);
    let pos: HashMap<Uuid, usize> = handed.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    for k in 0..150 {
        assert!(
            pos[&many[k].id()] < pos[&many[150 + k].id()],
            "key m{k} out of order"
        );
    }
}

/// A hot key held by one relay (a backlog larger than the batch) must not
/// fill every other relay's window: they claim the other keys.
pub async fn a_held_hot_key_does_not_starve_other_relays(db: &TestDb) {
    let outbox = db.store.outbox();
    let mut events: Vec<OutboxEvent> = (0..500).map(|i| ev("hot", i)).collect();
    events.extend((0..20).map(|i| ev(&format!("small{i}"), 500 + i)));
    seed(db, &events).await;
    let a = outbox.claim(&ClaimOptions::new(w("a"), 100)).await.unwrap();
    assert_eq!(
        ids(&a.events),
        ids(&events[..100]),
        "relay a takes a run of the hot key"
    );
    let b = outbox.claim(&ClaimOptions::new(w("b"), 100)).await.unwrap();
    assert_eq!(
        ids(&b.events),
        ids(&events[500..]),
        "relay b takes the small keys"
    );
    let c = outbox.claim(&ClaimOptions::new(w("c"), 100)).await.unwrap();
    assert!(c.is_empty());
    assert!(
        !outbox.claimable_exists().await.unwrap(),
        "everything left is held by a live lease"
    );
}

/// The routine replay: a key whose head failed, newer rows queued on it;
/// replay makes the head due now (later than the rows behind it) and clears
/// its error. The claim must hand out the head and its run.
pub async fn a_replayed_head_is_claimed_with_its_run(db: &TestDb) {
    let outbox = db.store.outbox();
    let mut n = new_event("k", 0);
    n.max_attempts = Some(1);
    let head = svc().create_outbox_event(n).unwrap();
    seed(db, std::slice::from_ref(&head)).await;
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 10)).await.unwrap();
    let r = outbox
        .fail(
            &c.token,
            &[Failure::counted(head.id(), "rejected", time::now())],
        )
        .await
        .unwrap();
    assert_eq!(r.failed, vec![head.id()]);
    let rest: Vec<OutboxEvent> = (1..=150).map(|i| ev("k", i)).collect();
    seed(db, &rest).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let replayed = outbox
        .requeue_failed(&RequeueFilter {
            all: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(replayed, vec![head.id()]);
    assert!(outbox.claimable_exists().await.unwrap());
    let c = outbox
        .claim(&ClaimOptions::new(w("w1"), 100))
        .await
        .unwrap();
    assert_eq!(c.len(), 100);
    assert_eq!(c.events[0].id(), head.id(), "the replayed head goes first");
    assert_eq!(ids(&c.events[1..]), ids(&rest[..99]));
}

/// A pending row whose attempts are used up (edited by hand) is handed out,
/// and a counted failure makes it failed without breaking the database's
/// attempts check; the old fail statement violated it and the batch was
/// claimed again forever.
pub async fn a_row_with_attempts_used_up_fails_cleanly(db: &TestDb) {
    let outbox = db.store.outbox();
    let e = ev("k", 0);
    seed(db, std::slice::from_ref(&e)).await;
    raw(
        db,
        "UPDATE outbox_events SET attempts_made = max_attempts",
        "UPDATE outbox_events SET attempts_made = max_attempts",
    )
    .await
    .unwrap();
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 10)).await.unwrap();
    assert_eq!(c.len(), 1);
    let r = outbox
        .fail(
            &c.token,
            &[Failure::counted(e.id(), "attempts used up", time::now())],
        )
        .await
        .unwrap();
    assert_eq!(r.failed, vec![e.id()]);
    let row = outbox.get(e.id()).await.unwrap().unwrap();
    assert_eq!(row.status(), EventStatus::Failed);
    assert_eq!(row.attempts_made(), row.max_attempts());
}

/// A row due within the next second holds its key up (it is taken for due,
/// though handed out only once due): a row written "now" by a transaction
/// that committed while a claim ran must not count as scheduled for later,
/// which let its successor (scheduled in the past) go first. Found by the
/// randomized model test.
pub async fn a_row_due_within_a_second_holds_its_key(db: &TestDb) {
    let outbox = db.store.outbox();
    let soon = time::now() + chrono::Duration::milliseconds(400);
    let past = time::now() - chrono::Duration::seconds(30);
    let rows = vec![ev_at("k", 0, soon), ev_at("k", 1, past)];
    seed(db, &rows).await;
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("w1"), 10))
            .await
            .unwrap()
            .is_empty(),
        "the successor must wait for its head"
    );
    assert!(!outbox.claimable_exists().await.unwrap());
    tokio::time::sleep(Duration::from_millis(450)).await;
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 10)).await.unwrap();
    assert_eq!(ids(&c.events), ids(&rows));
    // Further ahead than that, a row does not hold its key up.
    let later = time::now() + chrono::Duration::seconds(30);
    let rows = vec![ev_at("j", 2, later), ev_at("j", 3, past)];
    seed(db, &rows).await;
    let c = outbox.claim(&ClaimOptions::new(w("w1"), 10)).await.unwrap();
    assert_eq!(ids(&c.events), vec![rows[1].id()]);
}

/// A worker with a key's rows in flight claims the rows after them (its
/// pipeline stays full on one busy key), but only while every row before
/// them is still its own and locked: not for another worker, not when an
/// operator unlocked one of its rows, not past a row that failed meanwhile.
pub async fn a_worker_claims_behind_its_own_rows_in_flight(db: &TestDb) {
    let outbox = db.store.outbox();
    let events: Vec<OutboxEvent> = (0..30).map(|i| ev("k", i)).collect();
    seed(db, &events).await;
    let first = outbox.claim(&ClaimOptions::new(w("a"), 10)).await.unwrap();
    assert_eq!(ids(&first.events), ids(&events[..10]));
    let seq = |e: &OutboxEvent| e.seq().unwrap();
    let own = |from: &OutboxEvent, to: &OutboxEvent| {
        let mut o = ClaimOptions::new(w("a"), 10);
        o.own = HashMap::from([(
            ("orders".to_string(), "k".to_string()),
            (seq(from), seq(to)),
        )]);
        o
    };
    // Without saying what it holds, the key is held, as for anyone.
    assert!(
        outbox
            .claim(&ClaimOptions::new(w("a"), 10))
            .await
            .unwrap()
            .is_empty()
    );
    // Another worker naming the same rows gets nothing: they are not its own.
    let mut other = own(&first.events[0], &first.events[9]);
    other.worker = w("b");
    assert!(outbox.claim(&other).await.unwrap().is_empty());
    // Its own rows: the run goes on after them.
    let second = outbox
        .claim(&own(&first.events[0], &first.events[9]))
        .await
        .unwrap();
    assert_eq!(ids(&second.events), ids(&events[10..20]));
    // The first batch is written: one completed, the rest failed/released.
    outbox
        .complete(&first.token, &[events[0].id()])
        .await
        .unwrap();
    outbox
        .fail(
            &first.token,
            &[Failure::counted(
                events[1].id(),
                "rejected",
                time::now() + chrono::Duration::hours(1),
            )],
        )
        .await
        .unwrap();
    let rest: Vec<Uuid> = events[2..10].iter().map(|e| e.id()).collect();
    outbox.release(&first.token, &rest).await.unwrap();
    // A row before its own ones failed: the key is held, own rows or not.
    let held = outbox
        .claim(&own(&second.events[0], &second.events[9]))
        .await
        .unwrap();
    assert!(
        held.is_empty(),
        "claimed past a failed row: {:?}",
        ids(&held.events)
    );
    // The first batch's rows are gone (cleaned up): only its own rows are
    // ahead again. Then an operator unlocks one of them: held as well.
    let reason = UnlockReason::new("test").unwrap();
    raw(
        db,
        "DELETE FROM outbox_events WHERE seq < (SELECT min(seq) + 10 FROM outbox_events)",
        "DELETE FROM outbox_events WHERE seq < (SELECT min(seq) + 10 FROM outbox_events)",
    )
    .await
    .unwrap();
    let third = outbox
        .claim(&own(&second.events[0], &second.events[9]))
        .await
        .unwrap();
    assert_eq!(
        ids(&third.events),
        ids(&events[20..30]),
        "only its own rows are ahead again"
    );
    outbox
        .release(&third.token, &ids(&third.events))
        .await
        .unwrap();
    outbox
        .force_unlock(second.events[4].id(), &reason)
        .await
        .unwrap();
    let held = outbox
        .claim(&own(&second.events[0], &second.events[9]))
        .await
        .unwrap();
    assert!(
        held.is_empty(),
        "claimed past an unlocked row: {:?}",
        ids(&held.events)
    );
}

/// A claim with a byte budget (`ClaimOptions::max_bytes`, the payloads'
/// compact JSON size): rows of mixed sizes in three keys. Each claim is the
/// prefix of what an unbounded claim would hand out (keys first, each key's
/// run in `seq` order) that fits the budget, at least one row even when
/// that row alone is over it; a run cut short leaves no hole (the rest of
/// the key waits behind the rows handed out, also for another worker); and
/// claim after claim every row goes out once, each key in order. The same
/// for the inbox's plain claim. On PostgreSQL, rows whose `payload_bytes`
/// was not written (inserted by other means) are measured from the payload.
pub async fn a_byte_budget_cuts_claims_in_key_order(db: &TestDb) {
    const BUDGET: u64 = 4000;
    let payload = |n: usize, size: usize| json!({ "n": n, "pad": "x".repeat(size) });
    let compact = |p: &serde_json::Value| serde_json::to_string(p).unwrap().len() as u64;
    // (key, pad): a1 and c1 are each over the budget on their own.
    let rows = [
        ("a", 900),
        ("b", 80),
        ("a", 5000),
        ("a", 80),
        ("b", 2900),
        ("c", 180),
        ("b", 80),
        ("c", 6000),
        ("a", 80),
        ("c", 1500),
        ("b", 1800),
        ("c", 1800),
        ("a", 3900),
    ];
    let events: Vec<OutboxEvent> = rows
        .iter()
        .enumerate()
        .map(|(i, (key, pad))| {
            let mut n = new_event(key, i);
            n.payload = payload(i, *pad);
            svc().create_outbox_event(n).unwrap()
        })
        .collect();
    seed(db, &events).await;
    let mut size: HashMap<Uuid, u64> = events
        .iter()
        .map(|e| {
            (
                e.id(),
                compact(&serde_json::Value::Object(e.payload().clone())),
            )
        })
        .collect();
    if let AnyStore::Postgres(s) = &db.store {
        // Rows 0, 2, 4, ... as another writer leaves them: no size. Their
        // payload is measured as jsonb's text, which writes `"pad": "..."`
        // (one space more than the compact form per key: two keys).
        let unsized_ids: Vec<Uuid> = events.iter().step_by(2).map(|e| e.id()).collect();
        sqlx::query("UPDATE outbox_events SET payload_bytes = NULL WHERE id = ANY($1)")
            .bind(&unsized_ids)
            .execute(s.pool())
            .await
            .unwrap();
        for id in unsized_ids {
            *size.get_mut(&id).unwrap() += 3;
        }
    }
    let outbox = db.store.outbox();
    let key_of: HashMap<Uuid, String> = events
        .iter()
        .map(|e| (e.id(), e.partition_key().to_string()))
        .collect();
    let claim = |worker: &'static str| {
        let outbox = outbox.clone();
        async move {
            outbox
                .claim(&ClaimOptions::new(w(worker), 100).max_bytes(BUDGET))
                .await
                .unwrap()
        }
    };
    // What an unbounded claim hands out: keys in the order their first
    // pending rows came, each key's pending rows in seq order, minus the
    // keys `held`.
    let unbounded = |done: &HashSet<Uuid>, held: &HashSet<String>| -> Vec<Uuid> {
        let mut keys: Vec<&str> = Vec::new();
        for e in events.iter().filter(|e| !done.contains(&e.id())) {
            if !keys.contains(&e.partition_key()) {
                keys.push(e.partition_key());
            }
        }
        let mut out = Vec::new();
        for key in keys {
            if held.contains(key) {
                continue;
            }
            out.extend(
                events
                    .iter()
                    .filter(|e| e.partition_key() == key && !done.contains(&e.id()))
                    .map(|e| e.id()),
            );
        }
        out
    };
    let prefix = |order: Vec<Uuid>| -> Vec<Uuid> {
        let mut used = 0;
        let mut out = Vec::new();
        for id in order {
            if !out.is_empty() && used + size[&id] > BUDGET {
                break;
            }
            used += size[&id];
            out.push(id);
        }
        out
    };
    let mut done: HashSet<Uuid> = HashSet::new();
    // The first claim: a0 fits, a1 (over the budget) would pass it: a's
    // run is cut after a0 and the claim stops there.
    let first = claim("w1").await;
    assert_eq!(ids(&first.events), vec![events[0].id()]);
    // Another worker: key a waits behind w1's a0 (a1 and later are not
    // handed out past it); b's run and then c's, up to the budget.
    let second = claim("w2").await;
    let expected = prefix(unbounded(&done, &HashSet::from(["a".to_string()])));
    assert_eq!(ids(&second.events), expected);
    assert!(
        second.events.iter().all(|e| e.partition_key() != "a"),
        "nothing of a while w1 holds its head"
    );
    assert!(second.events.iter().map(|e| size[&e.id()]).sum::<u64>() <= BUDGET);
    for (c, token) in [(&first, &first.token), (&second, &second.token)] {
        outbox.complete(token, &ids(&c.events)).await.unwrap();
        done.extend(ids(&c.events));
    }
    // Claim after claim, completing each: always the budgeted prefix, one
    // row at least (a1 and c1 go out alone), each key in order, every row
    // once.
    let mut claims = 0;
    let mut alone_over_budget = 0;
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    while done.len() < events.len() {
        claims += 1;
        assert!(claims <= events.len(), "the claims made no progress");
        let expected = prefix(unbounded(&done, &HashSet::new()));
        let c = claim("w3").await;
        assert_eq!(ids(&c.events), expected, "claim {claims}");
        assert!(!c.is_empty());
        let bytes: u64 = c.events.iter().map(|e| size[&e.id()]).sum();
        if bytes > BUDGET {
            assert_eq!(c.len(), 1, "only a single row may pass the budget");
            alone_over_budget += 1;
        }
        for e in &c.events {
            let key = &key_of[&e.id()];
            let seq = e.seq().unwrap();
            if let Some(prev) = last_seq.insert(key.clone(), seq) {
                assert!(seq > prev, "key {key} out of order");
            }
            assert!(done.insert(e.id()), "{} claimed twice", e.id());
        }
        outbox.complete(&c.token, &ids(&c.events)).await.unwrap();
    }
    assert_eq!(alone_over_budget, 2, "a1 and c1 each went out alone");
    assert!(
        claim("w3").await.is_empty(),
        "every row was claimed exactly once"
    );

    // The inbox: rows in (scheduled_at, seq) order, the running sum of
    // their sizes up to the budget, the first row whatever its size.
    let inbox = db.store.inbox();
    let pads = [3000, 900, 200, 4500, 100, 3800, 300, 50];
    let mut rows = Vec::new();
    for (i, pad) in pads.iter().enumerate() {
        let e = svc()
            .create_inbox_event(NewInboxEvent::new(
                format!("m-{i}"),
                "g",
                "orders",
                "order.created",
                payload(i, *pad),
            ))
            .unwrap();
        inbox.insert(&e).await.unwrap();
        rows.push((e.id(), compact(&payload(i, *pad))));
    }
    let mut left: &[(Uuid, u64)] = &rows;
    while !left.is_empty() {
        let c = inbox
            .claim(&ClaimOptions::new(w("p1"), 100).max_bytes(BUDGET))
            .await
            .unwrap();
        let mut used = 0;
        let take = left
            .iter()
            .enumerate()
            .take_while(|(i, (_, bytes))| {
                used += bytes;
                *i == 0 || used <= BUDGET
            })
            .count();
        let expected: Vec<Uuid> = left[..take].iter().map(|(id, _)| *id).collect();
        let got: Vec<Uuid> = c.events.iter().map(|e| e.id()).collect();
        assert_eq!(got, expected);
        inbox.complete(&c.token, &got).await.unwrap();
        left = &left[take..];
    }
    assert!(
        inbox
            .claim(&ClaimOptions::new(w("p1"), 100).max_bytes(BUDGET))
            .await
            .unwrap()
            .is_empty()
    );
}
