//! Held claims (`ClaimOptions::hold`, `publish --hold transaction`) on a
//! real PostgreSQL: the rows stay pending and unmarked but locked while the
//! claim is open; a completion writes each row once; any other write first
//! writes the lease; a store that closes frees what it held.

mod common;

use std::time::Duration;

use omnibox::store::{AnyStore, ClaimOptions, Failure, PgStore};
use omnibox::{DomainService, EventStore, NewOutboxEvent, OutboxEvent, OutboxStore, WorkerId};
use serde_json::json;
use uuid::Uuid;

fn event(key: &str, n: usize) -> OutboxEvent {
    let e = NewOutboxEvent::new(
        "order",
        Uuid::now_v7(),
        "order.updated",
        "orders",
        key,
        json!({ "n": n }),
    );
    DomainService::default().create_outbox_event(e).unwrap()
}

fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

fn pg(store: &AnyStore) -> &PgStore {
    match store {
        AnyStore::Postgres(s) => s,
        _ => unreachable!("a PostgreSQL test"),
    }
}

/// `(pending and unmarked, pending with a lease, completed)` rows.
async fn states(store: &AnyStore) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending' AND locked_at IS NULL),
                count(*) FILTER (WHERE status = 'pending' AND locked_at IS NOT NULL),
                count(*) FILTER (WHERE status = 'completed')
           FROM outbox_events",
    )
    .fetch_one(pg(store).pool())
    .await
    .unwrap()
}

async fn seeded(rows: usize) -> Option<common::TestDb> {
    let db = common::postgres().await?;
    let events: Vec<OutboxEvent> = (0..rows).map(|n| event(&format!("k{n}"), n)).collect();
    db.store.outbox().create_many(&events).await.unwrap();
    Some(db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_claim_locks_its_rows_and_writes_each_once_when_done() {
    let Some(db) = seeded(10).await else { return };
    let outbox = db.store.outbox();
    let claim = outbox
        .claim(&ClaimOptions::new(worker("held"), 10).hold(true))
        .await
        .unwrap();
    assert_eq!(claim.events.len(), 10);
    assert!(claim.events.iter().all(|e| e.locked_by() == Some("held")));
    assert_eq!(
        states(&db.store).await,
        (10, 0, 0),
        "nothing is written while the claim is open"
    );
    let other = outbox
        .claim(&ClaimOptions::new(worker("other"), 10))
        .await
        .unwrap();
    assert!(other.events.is_empty(), "the rows are locked");
    assert!(other.contended);
    let ids: Vec<Uuid> = claim.events.iter().map(|e| e.id()).collect();
    assert_eq!(
        outbox
            .extend_lease(&claim.token, &ids, Duration::from_secs(60))
            .await
            .unwrap(),
        10
    );
    assert_eq!(outbox.complete(&claim.token, &ids[..6]).await.unwrap(), 6);
    assert_eq!(
        states(&db.store).await,
        (0, 4, 6),
        "the rest got the claim's lease, as a leased claim's rows have"
    );
    let failure = Failure::counted(ids[6], "broker said no", Duration::from_secs(60));
    let report = outbox.fail(&claim.token, &[failure]).await.unwrap();
    assert_eq!(report.rescheduled, vec![ids[6]]);
    assert_eq!(outbox.release(&claim.token, &ids[7..]).await.unwrap(), 3);
    assert_eq!(states(&db.store).await, (4, 0, 6));
    let again = outbox.get(ids[6]).await.unwrap().unwrap();
    assert_eq!(again.attempts_made(), 1);
    assert_eq!(again.last_error(), Some("broker said no"));
}

/// A held claim's transaction begins before its batch is published; the
/// completion is dated when it is written, not when the claim began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_completion_is_dated_after_the_publish() {
    let Some(db) = seeded(3).await else { return };
    let outbox = db.store.outbox();
    let claim = outbox
        .claim(&ClaimOptions::new(worker("held"), 10).hold(true))
        .await
        .unwrap();
    assert_eq!(claim.events.len(), 3);
    // The publish: a slow broker.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let published = chrono::Utc::now();
    let ids: Vec<Uuid> = claim.events.iter().map(|e| e.id()).collect();
    assert_eq!(outbox.complete(&claim.token, &ids).await.unwrap(), 3);
    for id in ids {
        let row = outbox.get(id).await.unwrap().unwrap();
        let done = row.completed_at().expect("completed");
        assert!(
            done >= published - chrono::Duration::milliseconds(50),
            "completed_at {done} is before the publish at {published}"
        );
        assert!(row.updated_at() >= done, "{row:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_of_a_held_claim_writes_the_lease_first() {
    let Some(db) = seeded(3).await else { return };
    let outbox = db.store.outbox();
    let claim = outbox
        .claim(&ClaimOptions::new(worker("held"), 3).hold(true))
        .await
        .unwrap();
    let failures: Vec<Failure> = claim
        .events
        .iter()
        .map(|e| Failure::counted(e.id(), "rejected", Duration::from_secs(60)))
        .collect();
    let report = outbox.fail(&claim.token, &failures).await.unwrap();
    assert_eq!(report.rescheduled.len(), 3);
    // The claim is a leased one now: completing it again finds no row held.
    let ids: Vec<Uuid> = claim.events.iter().map(|e| e.id()).collect();
    let err = outbox.complete(&claim.token, &ids).await.unwrap_err();
    assert!(err.to_string().contains("no longer"), "{err}");
    assert_eq!(states(&db.store).await, (3, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_closes_frees_the_rows_it_held() {
    let Some(db) = seeded(5).await else { return };
    let claim = db
        .store
        .outbox()
        .claim(&ClaimOptions::new(worker("held"), 5).hold(true))
        .await
        .unwrap();
    assert_eq!(claim.events.len(), 5);
    tokio::time::timeout(Duration::from_secs(10), db.store.close())
        .await
        .expect("close does not wait for a held claim");
    let opts = omnibox::store::postgres::PgOptions {
        schema: Some(db.schema().to_string()),
        ..Default::default()
    };
    let store = AnyStore::Postgres(PgStore::connect(&db.url, &opts).await.unwrap());
    let next = store
        .outbox()
        .claim(&ClaimOptions::new(worker("next"), 5))
        .await
        .unwrap();
    assert_eq!(
        next.events.len(),
        5,
        "free at once, without a lease to wait out"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_claim_that_goes_idle_past_its_lease_is_ended_by_the_server() {
    let Some(db) = seeded(2).await else { return };
    let outbox = db.store.outbox();
    let claim = outbox
        .claim(
            &ClaimOptions::new(worker("stuck"), 2)
                .hold(true)
                .lease(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert_eq!(claim.events.len(), 2);
    // No heartbeat: after the lease of idleness the server ends the
    // transaction, and the rows are anyone's.
    let mut taken = 0;
    for _ in 0..100 {
        let next = outbox
            .claim(&ClaimOptions::new(worker("next"), 2))
            .await
            .unwrap();
        taken = next.events.len();
        if taken == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(taken, 2);
    let ids: Vec<Uuid> = claim.events.iter().map(|e| e.id()).collect();
    assert!(outbox.complete(&claim.token, &ids).await.is_err());
}

/// A dead failure written outside its fence (an operator unlocked the row
/// in flight) skips rows another transaction locks, so as never to wait on
/// a held claim. When the lock is the unlock's own statement, still
/// running as the failure is written, the failure must not be lost: else
/// the row would be sent again after the later rows of its key that the
/// broker acknowledged (the randomized model test found this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_failure_meeting_an_unlock_in_progress_is_still_written() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let outbox = db.store.outbox();
    let (head, next) = (event("k", 0), event("k", 1));
    outbox
        .create_many(&[head.clone(), next.clone()])
        .await
        .unwrap();
    let claim = outbox
        .claim(&ClaimOptions::new(worker("relay"), 10))
        .await
        .unwrap();
    assert_eq!(claim.events.len(), 2);
    // The operator's unlock of `head`, its transaction still open.
    let pool = pg(&db.store).pool().clone();
    let mut unlock = pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE outbox_events SET locked_at = NULL, locked_by = NULL, locked_until = NULL,
                last_error = 'unlocked by hand' WHERE id = $1",
    )
    .bind(head.id())
    .execute(&mut *unlock)
    .await
    .unwrap();
    let writer = {
        let outbox = outbox.clone();
        let token = claim.token.clone();
        let id = head.id();
        tokio::spawn(async move {
            outbox
                .fail(
                    &token,
                    &[Failure::dead(id, "rejected, and a later row acknowledged")],
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    unlock.commit().await.unwrap();
    let report = writer.await.unwrap().unwrap();
    let row = outbox.get(head.id()).await.unwrap().unwrap();
    assert_eq!(
        row.status().as_str(),
        "failed",
        "the dead failure was lost ({report:?}): {row:?}"
    );
    assert_eq!(
        row.last_error(),
        Some("rejected, and a later row acknowledged")
    );
}
