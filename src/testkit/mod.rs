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
//!   over is refused with [`Error::ConcurrentUpdate`](crate::Error::ConcurrentUpdate), even from the same
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

use serde_json::json;
use uuid::Uuid;

use crate::domain::DomainService;
use crate::inbox::ConsumerStore;
use crate::model::{InboxEvent, NewInboxEvent, NewOutboxEvent, OutboxEvent, WorkerId};
use crate::store::{ClaimOptions, EventStore, InboxStore, OutboxStore};

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

mod inbox;
mod outbox;

use inbox::{deduplication, redelivered_rows, unit_of_work};
use outbox::{
    claim_takes_due_rows, failures, fencing, per_key_order, release_and_unlock, requeue, retention,
    round_trip, stale_locks,
};

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

/// Waits until `until` (a lease's end, a completion time) has passed by
/// this process's clock, for at most 10 s: the cases wait for what the
/// store wrote, whatever precision its times have.
async fn wait_past(until: Option<crate::model::Timestamp>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Some(t) = until
        && crate::model::time::now() <= t + chrono::Duration::milliseconds(1)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
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
