//! A test kit for stores of your own: the contract the relay, the inbox
//! processor and the inbox consumer rely on, as checks your tests run
//! against your store. The built-in stores pass it (the crate's own tests
//! run it on SQLite and PostgreSQL).
//!
//! Each function runs its cases, each case on a fresh store from `fresh`,
//! and returns how many passed, or the first [`Violation`]: which case,
//! and what the store did that the engine does not allow.
//!
//! ```no_run
//! # async fn f() {
//! # let my_store = || async { omnibox::SqliteStore::connect("sqlite::memory:").await.unwrap().outbox() };
//! let passed = omnibox::testkit::outbox_store(my_store).await.unwrap();
//! assert_eq!(passed, omnibox::testkit::OUTBOX_CASES.len());
//! # }
//! ```
//!
//! `examples/custom_store.rs` is an in-memory store that passes
//! [`outbox_store`] and runs a processor.
//!
//! What the cases check:
//!
//! * **Writing and reading** ([`OUTBOX_CASES`] `round_trip`): rows come
//!   back as written, pending, with a `seq` in insertion order; an
//!   idempotency key met again returns the existing row.
//! * **Claiming**: only due rows, locked by the claim's token; a key's
//!   rows go out in `seq` order and never while an earlier row of the key
//!   is held.
//! * **Fencing**: a write with a claim whose lease ran out and was taken
//!   over is refused with [`Error::ConcurrentUpdate`], even from the same
//!   worker id.
//! * **Failures**: a counted failure spends an attempt and reschedules,
//!   the last one fails the row; a transient failure spends none; a dead
//!   failure fails the row at once.
//! * **Releases and unlocks**: a release returns rows untried; a forced
//!   unlock records its reason and fences the old claim off.
//! * **Maintenance**: stale locks are released only when their lease ran
//!   out; completed rows are deleted by age, in bounded batches; failed rows
//!   are requeued by id (pending, no attempts, no error), and a requeue that
//!   selects nothing is refused.
//! * **The inbox** ([`inbox_store`]): deduplication by `(message_id,
//!   consumer_group)`, look-up by message id.
//! * **The consumer's unit of work** ([`consumer_store`]): writes take
//!   effect at commit and not after a rollback; redelivered rows are taken
//!   when due and free, waited for otherwise, left out when done.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::domain::DomainService;
use crate::error::Error;
use crate::inbox::{ConsumerStore, ConsumerTx};
use crate::model::{
    EventStatus, InboxEvent, NewInboxEvent, NewOutboxEvent, OutboxEvent, UnlockReason, WorkerId,
    time,
};
use crate::store::{
    ClaimOptions, ClaimToken, Created, EventStore, Failure, InboxStore, OutboxStore, Redelivered,
};

/// A case a store failed: its name, and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The case.
    pub case: &'static str,
    /// What the store did.
    pub message: String,
}

impl std::fmt::Display for Violation {
    /// `case: message`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.case, self.message)
    }
}

impl std::error::Error for Violation {}

/// The outcome of one case.
type Check = std::result::Result<(), String>;

/// Fails the case with the message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Unwraps a store call, failing the case with its error.
macro_rules! call {
    ($e:expr, $what:literal) => {
        $e.await.map_err(|e| format!("{} failed: {e}", $what))?
    };
}

/// The names of the cases [`outbox_store`] runs, in order.
pub const OUTBOX_CASES: &[&str] = &[
    "round_trip",
    "claim_takes_due_rows",
    "per_key_order",
    "fencing",
    "failures",
    "release_and_unlock",
    "stale_locks",
    "retention",
    "requeue",
];

/// The names of the cases [`inbox_store`] runs, in order.
pub const INBOX_CASES: &[&str] = &["deduplication"];

/// The names of the cases [`consumer_store`] runs, in order.
pub const CONSUMER_CASES: &[&str] = &["unit_of_work", "redelivered_rows"];

/// Runs each of `cases` with `run` on a store from `fresh`; returns how
/// many passed, or the first violation.
async fn run_cases<S>(
    cases: &'static [&'static str],
    fresh: impl AsyncFn() -> S,
    run: impl AsyncFn(&'static str, &S) -> Check,
) -> std::result::Result<usize, Violation> {
    for &case in cases {
        let store = fresh().await;
        run(case, &store)
            .await
            .map_err(|message| Violation { case, message })?;
    }
    Ok(cases.len())
}

/// Runs the outbox cases ([`OUTBOX_CASES`]), each on a store from `fresh`
/// (an empty outbox); returns how many passed, or the first violation.
pub async fn outbox_store<S: OutboxStore>(
    fresh: impl AsyncFn() -> S,
) -> std::result::Result<usize, Violation> {
    run_cases(OUTBOX_CASES, fresh, async |case, store: &S| match case {
        "round_trip" => round_trip(store).await,
        "claim_takes_due_rows" => claim_takes_due_rows(store).await,
        "per_key_order" => per_key_order(store).await,
        "fencing" => fencing(store).await,
        "failures" => failures(store).await,
        "release_and_unlock" => release_and_unlock(store).await,
        "stale_locks" => stale_locks(store).await,
        "retention" => retention(store).await,
        _ => requeue(store).await,
    })
    .await
}

/// Runs the inbox cases ([`INBOX_CASES`]), each on a store from `fresh`
/// (an empty inbox).
pub async fn inbox_store<S: InboxStore>(
    fresh: impl AsyncFn() -> S,
) -> std::result::Result<usize, Violation> {
    run_cases(INBOX_CASES, fresh, async |_, store: &S| {
        deduplication(store).await
    })
    .await
}

/// Runs the consumer's cases ([`CONSUMER_CASES`]), each on a store from
/// `fresh` (an empty inbox).
pub async fn consumer_store<S: ConsumerStore>(
    fresh: impl AsyncFn() -> S,
) -> std::result::Result<usize, Violation> {
    run_cases(CONSUMER_CASES, fresh, async |case, store: &S| match case {
        "unit_of_work" => unit_of_work(store).await,
        _ => redelivered_rows(store).await,
    })
    .await
}

/// A worker id.
fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).expect("a valid worker id")
}

/// A new outbox event of `key` (number `n`).
fn outbox_event(key: &str, n: u32, edit: impl FnOnce(&mut NewOutboxEvent)) -> OutboxEvent {
    let mut new = NewOutboxEvent::new(
        "order",
        Uuid::now_v7(),
        "order.created",
        "orders",
        key,
        json!({"key": key, "n": n}),
    );
    edit(&mut new);
    DomainService::default()
        .create_outbox_event(new)
        .expect("a valid event")
}

/// A new inbox event of message `id` in `group`.
fn inbox_event(id: &str, group: &str, edit: impl FnOnce(&mut NewInboxEvent)) -> InboxEvent {
    let mut new = NewInboxEvent::new(id, group, "billing", "refund.issued", json!({"id": id}));
    edit(&mut new);
    DomainService::default()
        .create_inbox_event(new)
        .expect("a valid event")
}

/// The ids of `events`.
fn ids<R: crate::model::Route>(events: &[crate::model::Event<R>]) -> Vec<Uuid> {
    events.iter().map(|e| e.id()).collect()
}

/// Writes `events`, checking none existed.
async fn seed<S: OutboxStore>(store: &S, events: &[OutboxEvent]) -> Check {
    let outcomes = call!(store.create_many(events), "create_many");
    ensure!(
        outcomes.len() == events.len() && outcomes.iter().all(|o| !o.existing),
        "create_many of {} new events reported {outcomes:?}",
        events.len()
    );
    Ok(())
}

/// A claim of up to `limit` rows by `name`.
async fn claim<S: EventStore<R>, R: crate::model::Route>(
    store: &S,
    name: &str,
    limit: u32,
) -> std::result::Result<crate::store::Claim<R>, String> {
    Ok(call!(
        store.claim(&ClaimOptions::new(worker(name), limit)),
        "claim"
    ))
}

/// Rows come back as written; `seq` follows insertion; an idempotency key
/// met again returns the existing row.
async fn round_trip<S: OutboxStore>(store: &S) -> Check {
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
async fn claim_takes_due_rows<S: OutboxStore>(store: &S) -> Check {
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
async fn per_key_order<S: OutboxStore>(store: &S) -> Check {
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
async fn fencing<S: OutboxStore>(store: &S) -> Check {
    let e = outbox_event("k", 0, |_| {});
    seed(store, std::slice::from_ref(&e)).await?;
    let old = call!(
        store.claim(&ClaimOptions::new(worker("relay"), 1).lease(Duration::from_millis(5))),
        "claim"
    );
    ensure!(old.events.len() == 1, "the row must be claimed");
    tokio::time::sleep(Duration::from_millis(50)).await;
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
async fn failures<S: OutboxStore>(store: &S) -> Check {
    let e = outbox_event("k", 0, |e| e.max_attempts = Some(2));
    let t = outbox_event("t", 0, |_| {});
    let d = outbox_event("d", 0, |_| {});
    seed(store, &[e.clone(), t.clone(), d.clone()]).await?;
    let c = claim(store, "w1", 10).await?;
    ensure!(c.events.len() == 3, "3 rows are due");
    let retry = time::now() - chrono::Duration::milliseconds(1);
    let later = time::now() + chrono::Duration::hours(1);
    let report = call!(
        store.fail(
            &c.token,
            &[
                Failure::counted(e.id(), "boom", retry),
                Failure::transient(t.id(), "broker unreachable", later),
                Failure::dead(d.id(), "poison"),
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
        (counts.pending, counts.failed) == (1, 2),
        "1 pending and 2 failed: {counts:?}"
    );
    Ok(())
}

/// A release returns rows untried; a forced unlock records its reason and
/// fences the old claim off.
async fn release_and_unlock<S: OutboxStore>(store: &S) -> Check {
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
async fn stale_locks<S: OutboxStore>(store: &S) -> Check {
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
    tokio::time::sleep(Duration::from_millis(50)).await;
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
async fn retention<S: OutboxStore>(store: &S) -> Check {
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
    tokio::time::sleep(Duration::from_millis(10)).await;
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
async fn requeue<S: OutboxStore>(store: &S) -> Check {
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
            ids: vec![e.id()],
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

/// Inbox rows are unique by `(message_id, consumer_group)`; a message met
/// again is reported existing with the first row's id.
async fn deduplication<S: InboxStore>(store: &S) -> Check {
    let m1 = inbox_event("m-1", "g1", |_| {});
    let m2 = inbox_event("m-2", "g1", |_| {});
    let out = call!(store.insert_many(&[m1.clone(), m2.clone()]), "insert_many");
    ensure!(
        out.iter().map(|o| (o.id, o.existing)).collect::<Vec<_>>()
            == vec![(m1.id(), false), (m2.id(), false)],
        "two new messages: {out:?}"
    );
    let m1_other_group = inbox_event("m-1", "g2", |_| {});
    let m1_again = inbox_event("m-1", "g1", |_| {});
    let out = call!(
        store.insert_many(&[m1_again, m1_other_group.clone()]),
        "insert_many"
    );
    ensure!(
        out.len() == 2
            && out[0].existing
            && out[0].id == m1.id()
            && !out[1].existing
            && out[1].id == m1_other_group.id(),
        "m-1 in g1 again is existing (with its first id); m-1 in g2 is new: {out:?}"
    );
    let row = call!(store.get_by_message_id("m-1", "g2"), "get_by_message_id");
    ensure!(
        row.map(|r| r.id()) == Some(m1_other_group.id()),
        "get_by_message_id(m-1, g2) must find the g2 row"
    );
    let none = call!(store.get_by_message_id("m-3", "g1"), "get_by_message_id");
    ensure!(
        none.is_none(),
        "get_by_message_id of an unknown message found {none:?}"
    );
    let c = claim(store, "p1", 10).await?;
    ensure!(
        c.events.len() == 3,
        "3 inbox rows are due, claimed {}",
        c.events.len()
    );
    call!(store.complete(&c.token, &ids(&c.events)), "complete");
    let counts = call!(store.counts(), "counts");
    ensure!(counts.completed == 3, "counts: {counts:?}");
    Ok(())
}

/// A token of the consumer `name`, as a claim would make it.
fn token(name: &str) -> ClaimToken {
    ClaimToken {
        worker: worker(name),
        locked_at: time::now(),
        lease: Duration::from_secs(60),
    }
}

/// Writes in a unit take effect at commit, none after a rollback.
async fn unit_of_work<S: ConsumerStore>(store: &S) -> Check {
    let m1 = inbox_event("m-1", "g", |_| {});
    let m2 = inbox_event("m-2", "g", |_| {});
    let m3 = inbox_event("m-3", "g", |_| {});
    let mut tx = call!(store.begin(), "begin");
    call!(tx.insert(std::slice::from_ref(&m1)), "insert");
    call!(tx.rollback(), "rollback");
    ensure!(
        call!(store.get(m1.id()), "get").is_none(),
        "a rolled back insert must leave no row"
    );
    let consumer = token("consumer-1");
    let mut tx = call!(store.begin(), "begin");
    let out = call!(tx.insert(&[m1.clone(), m2.clone()]), "insert");
    ensure!(out.iter().all(|o| !o.existing), "two new messages: {out:?}");
    call!(tx.complete(&[m1.id()]), "complete");
    call!(tx.lock(&[m2.id()], &consumer), "lock");
    ensure!(
        call!(store.get(m1.id()), "get").is_none(),
        "a write must not show before commit"
    );
    call!(tx.commit(), "commit");
    let row = call!(store.get(m1.id()), "get").ok_or("m-1 is gone after commit")?;
    ensure!(
        row.status() == EventStatus::Completed,
        "m-1 completed in the unit: {row:?}"
    );
    let row = call!(store.get(m2.id()), "get").ok_or("m-2 is gone after commit")?;
    ensure!(
        row.locked_by() == Some("consumer-1") && row.status() == EventStatus::Pending,
        "m-2 locked in the unit: {row:?}"
    );
    let mut tx = call!(store.begin(), "begin");
    let out = call!(tx.insert(&[m1.clone(), m3.clone()]), "insert");
    ensure!(
        out.len() == 2 && out[0].existing && out[0].id == m1.id() && !out[1].existing,
        "m-1 again is existing, m-3 is new: {out:?}"
    );
    let taken = call!(tx.take(&[m1.id()], &consumer), "take");
    ensure!(
        taken.is_empty(),
        "a completed row is a duplicate, never taken: {taken:?}"
    );
    call!(tx.delete(&[m3.id()]), "delete");
    call!(tx.commit(), "commit");
    ensure!(
        call!(store.get(m3.id()), "get").is_none(),
        "a row deleted in its unit must be gone"
    );
    Ok(())
}

/// A pending row met again is taken when due and free, waited for
/// otherwise; `complete_claimed` completes it only under the claim it was
/// taken with.
async fn redelivered_rows<S: ConsumerStore>(store: &S) -> Check {
    let later = time::now() + chrono::Duration::hours(1);
    let due = inbox_event("m-1", "g", |_| {});
    let waiting = inbox_event("m-2", "g", |e| e.scheduled_at = Some(later));
    call!(
        store.insert_many(&[due.clone(), waiting.clone()]),
        "insert_many"
    );
    let consumer = token("consumer-1");
    let mut tx = call!(store.begin(), "begin");
    let mut taken = call!(tx.take(&[due.id(), waiting.id()], &consumer), "take");
    match taken.remove(&waiting.id()) {
        Some(Redelivered::Wait(until)) if until == time::truncate(later) => {}
        other => {
            return Err(format!(
                "a row due in an hour must say Wait(its scheduled time), got {other:?}"
            ));
        }
    }
    let Some(Redelivered::Taken(event)) = taken.remove(&due.id()) else {
        return Err("a due, free row must be Taken".into());
    };
    ensure!(
        event.locked_by() == Some("consumer-1"),
        "a taken row is locked by the consumer's token: {event:?}"
    );
    let mut stale = (*event).clone();
    let mut state = stale.state();
    if let Some(lock) = &mut state.lock {
        lock.at -= chrono::Duration::seconds(5);
    }
    stale = stale.with_state(state).map_err(|e| e.to_string())?;
    ensure!(
        !call!(tx.complete_claimed(&stale), "complete_claimed"),
        "complete_claimed with another lock time must not complete the row"
    );
    ensure!(
        call!(tx.complete_claimed(&event), "complete_claimed"),
        "complete_claimed under the taking claim must complete the row"
    );
    call!(tx.commit(), "commit");
    let row = call!(store.get(due.id()), "get").ok_or("m-1 is gone")?;
    ensure!(
        row.status() == EventStatus::Completed && !row.is_locked(),
        "m-1 completed and unlocked: {row:?}"
    );
    let mut tx = call!(store.begin(), "begin");
    let other = token("consumer-2");
    let taken = call!(tx.take(&[waiting.id()], &other), "take");
    ensure!(
        matches!(taken.get(&waiting.id()), Some(Redelivered::Wait(_))),
        "still waiting: {taken:?}"
    );
    call!(tx.rollback(), "rollback");
    Ok(())
}
