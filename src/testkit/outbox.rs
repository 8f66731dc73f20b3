//! The outbox cases of the kit ([`OUTBOX_CASES`](super::OUTBOX_CASES)).

use std::time::Duration;

use uuid::Uuid;

use super::{Check, claim, ids, outbox_event, seed, wait_past, worker};
use crate::error::Error;
use crate::model::{EventStatus, OutboxEvent, UnlockReason, time};
use crate::store::{ClaimOptions, Created, Failure, OutboxStore};

/// Rows come back as written; `seq` follows insertion; an idempotency key
/// met again returns the existing row.
pub(super) async fn round_trip<S: OutboxStore>(store: &S) -> Check {
    let events: Vec<OutboxEvent> = (0..3)
        .map(|n| outbox_event(&format!("k{n}"), n, |_| {}))
        .collect();
    seed(store, &events).await?;
    let mut last_seq = None;
    for e in &events {
        let Some(row) = call!(store.get(e.id()), "get") else {
            return Err(format!("get({}) found nothing after create_many", e.id()));
        };
        ensure!(
            row.event_type() == e.event_type()
                && row.payload() == e.payload()
                && row.route() == e.route(),
            "row {} came back changed: {row:?}",
            e.id()
        );
        ensure!(
            row.status() == EventStatus::Pending && row.attempts_made() == 0 && !row.is_locked(),
            "a new row must be pending, untried, unlocked: {row:?}"
        );
        ensure!(
            row.seq().is_some() && row.seq() > last_seq,
            "seq must be set and grow in insertion order: {:?} after {last_seq:?}",
            row.seq()
        );
        last_seq = row.seq();
    }
    ensure!(
        call!(store.get(Uuid::now_v7()), "get").is_none(),
        "get of an unknown id found a row"
    );
    let keyed = |n| outbox_event("ik", n, |e| e.idempotency_key = Some("ik-1".into()));
    let first = call!(store.create(&keyed(10)), "create");
    let Created::Inserted(first) = first else {
        return Err("the first create of an idempotency key must insert".into());
    };
    match call!(store.create(&keyed(11)), "create") {
        Created::Existing(row) if row.id() == first.id() => {}
        other => {
            return Err(format!(
                "a second create with idempotency key ik-1 must return the existing row {}, got {other:?}",
                first.id()
            ));
        }
    }
    let counts = call!(store.counts(), "counts");
    ensure!(
        counts.pending == 4,
        "4 rows are pending, counts says {counts:?}"
    );
    Ok(())
}

/// A claim takes due rows only, locks them with its token, and leaves
/// nothing for the next claim; a claim of 0 rows is refused.
pub(super) async fn claim_takes_due_rows<S: OutboxStore>(store: &S) -> Check {
    let later = time::now() + chrono::Duration::hours(1);
    let mut events: Vec<OutboxEvent> = (0..3)
        .map(|n| outbox_event(&format!("k{n}"), n, |_| {}))
        .collect();
    events.push(outbox_event("k9", 9, |e| e.scheduled_at = Some(later)));
    seed(store, &events).await?;
    let c = claim(store, "w1", 10).await?;
    let mut got = ids(&c.events);
    got.sort();
    let mut due = ids(&events[..3]);
    due.sort();
    ensure!(
        got == due,
        "the claim must take the 3 due rows and not the one due in an hour: got {got:?}, due {due:?}"
    );
    ensure!(
        c.events.iter().all(|e| e.locked_by() == Some("w1")
            && e.locked_at() == Some(c.token.locked_at)
            && e.locked_until().is_some()),
        "claimed rows must carry the claim's token: {:?}",
        c.events
    );
    for e in &c.events {
        let row = call!(store.get(e.id()), "get");
        ensure!(
            row.as_ref().and_then(|r| r.locked_by()) == Some("w1"),
            "a claimed row must be stored locked: {row:?}"
        );
    }
    let again = claim(store, "w2", 10).await?;
    ensure!(
        again.events.is_empty(),
        "held rows must not be claimed again: {:?}",
        ids(&again.events)
    );
    ensure!(
        matches!(
            store
                .claim(&ClaimOptions::new(worker("w3"), 0))
                .await
                .map(|c| c.events.len()),
            Err(Error::Validation { .. })
        ),
        "a claim of 0 rows must be refused with Error::Validation"
    );
    Ok(())
}

/// A key's rows go out in `seq` order, never while an earlier row of the
/// key is held.
pub(super) async fn per_key_order<S: OutboxStore>(store: &S) -> Check {
    let a0 = outbox_event("a", 0, |_| {});
    let b0 = outbox_event("b", 0, |_| {});
    let a1 = outbox_event("a", 1, |_| {});
    let a2 = outbox_event("a", 2, |_| {});
    seed(store, &[a0.clone(), b0.clone(), a1.clone(), a2.clone()]).await?;
    let first = claim(store, "w1", 1).await?;
    ensure!(
        ids(&first.events) == vec![a0.id()],
        "a claim of 1 must take the first due key's head a0 ({}), got {:?}",
        a0.id(),
        ids(&first.events)
    );
    let second = claim(store, "w2", 10).await?;
    ensure!(
        ids(&second.events) == vec![b0.id()],
        "while a0 is held, a1 and a2 must wait: a second claim must take b0 only, got {:?}",
        ids(&second.events)
    );
    call!(store.complete(&first.token, &[a0.id()]), "complete");
    let third = claim(store, "w3", 10).await?;
    ensure!(
        ids(&third.events) == vec![a1.id(), a2.id()],
        "after a0, its key's rows go out in order: expected [a1, a2], got {:?}",
        ids(&third.events)
    );
    Ok(())
}

/// A claim whose lease ran out and was taken over writes nothing, even
/// from the same worker id; the new claim's writes go through.
pub(super) async fn fencing<S: OutboxStore>(store: &S) -> Check {
    let e = outbox_event("k", 0, |_| {});
    seed(store, std::slice::from_ref(&e)).await?;
    let old = call!(
        store.claim(&ClaimOptions::new(worker("relay"), 1).lease(Duration::from_millis(5))),
        "claim"
    );
    ensure!(old.events.len() == 1, "the row must be claimed");
    wait_past(old.events[0].locked_until()).await;
    let new = claim(store, "relay", 1).await?;
    ensure!(
        ids(&new.events) == vec![e.id()] && new.token != old.token,
        "a row whose lease ran out must be claimable again, with a new token: got {:?}",
        ids(&new.events)
    );
    for (what, result) in [
        (
            "complete",
            store.complete(&old.token, &[e.id()]).await.map(drop),
        ),
        (
            "release",
            store.release(&old.token, &[e.id()]).await.map(drop),
        ),
        (
            "fail",
            store
                .fail(&old.token, &[Failure::counted(e.id(), "late", time::now())])
                .await
                .map(drop),
        ),
    ] {
        ensure!(
            matches!(result, Err(Error::ConcurrentUpdate { .. })),
            "{what} with the old token must be refused with Error::ConcurrentUpdate, got {result:?}"
        );
    }
    let extended = call!(
        store.extend_lease(&new.token, &[e.id()], Duration::from_secs(60)),
        "extend_lease"
    );
    ensure!(
        extended == 1,
        "extend_lease by the holder must extend 1 row, said {extended}"
    );
    call!(store.complete(&new.token, &[e.id()]), "complete");
    let row = call!(store.get(e.id()), "get").ok_or("the row is gone")?;
    ensure!(
        row.status() == EventStatus::Completed && row.completed_at().is_some() && !row.is_locked(),
        "a completed row must be completed, with a time, unlocked: {row:?}"
    );
    let counts = call!(store.counts(), "counts");
    ensure!(counts.completed == 1, "counts: {counts:?}");
    Ok(())
}

/// Counted failures spend attempts and reschedule, the last one fails the
/// row; transient failures spend none; a dead failure fails at once.
pub(super) async fn failures<S: OutboxStore>(store: &S) -> Check {
    let e = outbox_event("k", 0, |e| e.max_attempts = Some(2));
    let t = outbox_event("t", 0, |_| {});
    let d = outbox_event("d", 0, |_| {});
    let q = outbox_event("q", 0, |_| {});
    seed(store, &[e.clone(), t.clone(), d.clone(), q.clone()]).await?;
    let c = claim(store, "w1", 10).await?;
    ensure!(c.events.len() == 4, "4 rows are due");
    let retry = time::now() - chrono::Duration::milliseconds(1);
    let later = time::now() + chrono::Duration::hours(1);
    let report = call!(
        store.fail(
            &c.token,
            &[
                Failure::counted(e.id(), "boom", retry),
                Failure::transient(t.id(), "broker unreachable", later),
                Failure::dead(d.id(), "poison"),
                Failure::transient(q.id(), "", later),
            ],
        ),
        "fail"
    );
    ensure!(
        report.rescheduled.contains(&e.id())
            && report.rescheduled.contains(&t.id())
            && report.failed == vec![d.id()],
        "fail must report e and t rescheduled and d failed: {report:?}"
    );
    let row = call!(store.get(e.id()), "get").ok_or("row e is gone")?;
    ensure!(
        (
            row.status(),
            row.attempts_made(),
            row.is_locked(),
            row.last_error()
        ) == (EventStatus::Pending, 1, false, Some("boom"))
            && row.scheduled_at() == time::truncate(retry),
        "a counted failure must leave the row pending, unlocked, with 1 attempt, its error and its retry time: {row:?}"
    );
    let row = call!(store.get(t.id()), "get").ok_or("row t is gone")?;
    ensure!(
        (row.status(), row.attempts_made(), row.is_locked()) == (EventStatus::Pending, 0, false)
            && row.scheduled_at() == time::truncate(later),
        "a transient failure must spend no attempt and keep its retry time: {row:?}"
    );
    let row = call!(store.get(q.id()), "get").ok_or("row q is gone")?;
    ensure!(
        row.last_error().is_some_and(|e| !e.trim().is_empty()),
        "a failure with an empty error is written all the same, with a text saying so: {row:?}"
    );
    let row = call!(store.get(d.id()), "get").ok_or("row d is gone")?;
    ensure!(
        row.status() == EventStatus::Failed && !row.is_locked() && row.attempts_made() == 1,
        "a dead failure must fail the row at once, spending one attempt: {row:?}"
    );
    let c = claim(store, "w1", 10).await?;
    ensure!(
        ids(&c.events) == vec![e.id()],
        "only e is due again (t in an hour, d failed): got {:?}",
        ids(&c.events)
    );
    let report = call!(
        store.fail(&c.token, &[Failure::counted(e.id(), "again", time::now())]),
        "fail"
    );
    ensure!(
        report.failed == vec![e.id()],
        "the last attempt must fail the row: {report:?}"
    );
    let row = call!(store.get(e.id()), "get").ok_or("row e is gone")?;
    ensure!(
        (row.status(), row.attempts_made(), row.last_error())
            == (EventStatus::Failed, 2, Some("again")),
        "after max_attempts counted failures the row is failed: {row:?}"
    );
    let counts = call!(store.counts(), "counts");
    ensure!(
        (counts.pending, counts.failed) == (2, 2),
        "2 pending and 2 failed: {counts:?}"
    );
    Ok(())
}

/// A release returns rows untried; a forced unlock records its reason and
/// fences the old claim off.
pub(super) async fn release_and_unlock<S: OutboxStore>(store: &S) -> Check {
    let events: Vec<OutboxEvent> = (0..2).map(|n| outbox_event("k", n, |_| {})).collect();
    seed(store, &events).await?;
    let c = claim(store, "w1", 10).await?;
    let released = call!(store.release(&c.token, &ids(&events)), "release");
    ensure!(released == 2, "release of 2 held rows said {released}");
    for e in &events {
        let row = call!(store.get(e.id()), "get").ok_or("a row is gone")?;
        ensure!(
            !row.is_locked() && row.attempts_made() == 0 && row.last_error().is_none(),
            "a released row is unlocked and untried: {row:?}"
        );
    }
    let c = claim(store, "w2", 10).await?;
    ensure!(
        ids(&c.events) == ids(&events),
        "released rows are claimed again in order: {:?}",
        ids(&c.events)
    );
    let reason = UnlockReason::new("worker host-3 died").expect("a valid reason");
    let row = call!(store.force_unlock(events[0].id(), &reason), "force_unlock");
    ensure!(
        !row.is_locked() && row.last_error() == Some("Force unlock: worker host-3 died"),
        "a forced unlock unlocks and records `Force unlock: <reason>`: {row:?}"
    );
    let late = store.complete(&c.token, &[events[0].id()]).await;
    ensure!(
        matches!(late, Err(Error::ConcurrentUpdate { .. })),
        "the old claim's write after a forced unlock must be refused, got {late:?}"
    );
    let again = store.force_unlock(events[0].id(), &reason).await;
    ensure!(
        matches!(again, Err(Error::NotLocked { .. })),
        "unlocking an unlocked row must be Error::NotLocked, got {again:?}"
    );
    let unknown = store.force_unlock(Uuid::now_v7(), &reason).await;
    ensure!(
        matches!(unknown, Err(Error::NotFound { .. })),
        "unlocking an unknown row must be Error::NotFound, got {unknown:?}"
    );
    Ok(())
}

/// `release_stale_locks` unlocks rows whose lease ran out, never a live one.
pub(super) async fn stale_locks<S: OutboxStore>(store: &S) -> Check {
    let live = outbox_event("a", 0, |_| {});
    let dead = outbox_event("b", 0, |_| {});
    seed(store, &[live.clone(), dead.clone()]).await?;
    let first = claim(store, "alive", 1).await?;
    ensure!(
        ids(&first.events) == vec![live.id()],
        "a claim of 1 takes the first row"
    );
    let second = call!(
        store.claim(&ClaimOptions::new(worker("gone"), 1).lease(Duration::from_millis(5))),
        "claim"
    );
    ensure!(
        ids(&second.events) == vec![dead.id()],
        "the second claim takes the other row"
    );
    wait_past(second.events[0].locked_until()).await;
    let kept = call!(
        store.release_stale_locks(Duration::from_secs(3600), 10),
        "release_stale_locks"
    );
    ensure!(kept == 0, "nothing was locked an hour ago, released {kept}");
    let released = call!(
        store.release_stale_locks(Duration::ZERO, 10),
        "release_stale_locks"
    );
    ensure!(
        released == 1,
        "only the row whose lease ran out is released, released {released}"
    );
    let row = call!(store.get(dead.id()), "get").ok_or("a row is gone")?;
    ensure!(!row.is_locked() && row.attempts_made() == 0, "{row:?}");
    let row = call!(store.get(live.id()), "get").ok_or("a row is gone")?;
    ensure!(
        row.locked_by() == Some("alive"),
        "a live lease is never released: {row:?}"
    );
    Ok(())
}

/// `delete_completed` deletes completed rows older than asked, at most a
/// batch at a time, and nothing else.
pub(super) async fn retention<S: OutboxStore>(store: &S) -> Check {
    let events: Vec<OutboxEvent> = (0..3)
        .map(|n| outbox_event(&format!("k{n}"), n, |_| {}))
        .collect();
    let pending = outbox_event("p", 0, |e| {
        e.scheduled_at = Some(time::now() + chrono::Duration::hours(1))
    });
    seed(store, &events).await?;
    seed(store, std::slice::from_ref(&pending)).await?;
    let c = claim(store, "w1", 10).await?;
    call!(store.complete(&c.token, &ids(&events)), "complete");
    for e in &events {
        let row = call!(store.get(e.id()), "get").ok_or("a completed row is gone")?;
        wait_past(row.completed_at()).await;
    }
    let young = call!(
        store.delete_completed(Duration::from_secs(3600), 10),
        "delete_completed"
    );
    ensure!(
        young == 0,
        "rows completed just now are kept, deleted {young}"
    );
    let batch = call!(
        store.delete_completed(Duration::ZERO, 2),
        "delete_completed"
    );
    ensure!(batch == 2, "a batch of 2 deletes 2, deleted {batch}");
    let rest = call!(
        store.delete_completed(Duration::ZERO, 2),
        "delete_completed"
    );
    ensure!(rest == 1, "the last completed row, deleted {rest}");
    for e in &events {
        ensure!(
            call!(store.get(e.id()), "get").is_none(),
            "completed row {} is still there",
            e.id()
        );
    }
    ensure!(
        call!(store.get(pending.id()), "get").is_some(),
        "a pending row is never deleted"
    );
    Ok(())
}

/// `requeue_failed` brings failed rows back: pending, no attempts, no error.
pub(super) async fn requeue<S: OutboxStore>(store: &S) -> Check {
    let e = outbox_event("k", 0, |e| e.max_attempts = Some(1));
    seed(store, std::slice::from_ref(&e)).await?;
    let c = claim(store, "w1", 1).await?;
    call!(
        store.fail(&c.token, &[Failure::counted(e.id(), "boom", time::now())]),
        "fail"
    );
    let nothing = store
        .requeue_failed(&crate::store::RequeueFilter::default())
        .await;
    ensure!(
        matches!(nothing, Err(Error::Validation { .. })),
        "a requeue that selects nothing must be refused with Error::Validation, got {nothing:?}"
    );
    let back = call!(
        store.requeue_failed(&crate::store::RequeueFilter {
            failures: crate::store::FailureSelector {
                ids: vec![e.id()],
                ..Default::default()
            },
            ..Default::default()
        }),
        "requeue_failed"
    );
    ensure!(
        back == vec![e.id()],
        "requeue by id must return it: {back:?}"
    );
    let row = call!(store.get(e.id()), "get").ok_or("the row is gone")?;
    ensure!(
        (row.status(), row.attempts_made(), row.last_error()) == (EventStatus::Pending, 0, None),
        "a requeued row is pending, with no attempts and no error: {row:?}"
    );
    let again = claim(store, "w2", 1).await?;
    ensure!(
        ids(&again.events) == vec![e.id()],
        "a requeued row is claimed again"
    );
    Ok(())
}
