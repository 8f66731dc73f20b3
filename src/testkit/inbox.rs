//! The inbox's and the consumer's cases of the kit
//! ([`INBOX_CASES`](super::INBOX_CASES), [`CONSUMER_CASES`](super::CONSUMER_CASES)).

use std::time::Duration;

use super::{Check, claim, ids, inbox_event, worker};
use crate::inbox::{ConsumerStore, ConsumerTx};
use crate::model::{EventStatus, time};
use crate::store::{ClaimToken, InboxStore, Redelivered};

/// Inbox rows are unique by `(message_id, consumer_group)`; a message met
/// again is reported existing with the first row's id.
pub(super) async fn deduplication<S: InboxStore>(store: &S) -> Check {
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
        created_between: None,
    }
}

/// Writes in a unit take effect at commit, none after a rollback.
pub(super) async fn unit_of_work<S: ConsumerStore>(store: &S) -> Check {
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
    let out = call!(tx.insert(&[m1.clone(), m3.clone(), m3.clone()]), "insert");
    ensure!(
        out.len() == 3 && out[0].existing && out[0].id == m1.id() && !out[1].existing,
        "m-1 again is existing, m-3 is new: {out:?}"
    );
    ensure!(
        out[2].existing && out[2].id == m3.id(),
        "a message twice in one insert: the second is existing, with the first's id: {out:?}"
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
/// otherwise (not due, or held by another consumer's live lease), left out
/// when done (completed or failed); `complete_claimed` completes it only
/// under the claim it was taken with.
pub(super) async fn redelivered_rows<S: ConsumerStore>(store: &S) -> Check {
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
    // A row another consumer holds under a live lease is waited for, not
    // taken; a failed row is done (left out).
    let held = inbox_event("m-3", "g", |_| {});
    let failed = inbox_event("m-4", "g", |_| {});
    call!(
        store.insert_many(&[held.clone(), failed.clone()]),
        "insert_many"
    );
    let mut tx = call!(store.begin(), "begin");
    let taken = call!(tx.take(&[held.id()], &consumer), "take");
    ensure!(
        matches!(taken.get(&held.id()), Some(Redelivered::Taken(_))),
        "a due, free row must be Taken: {taken:?}"
    );
    call!(tx.commit(), "commit");
    let c = claim(store, "processor", 10).await?;
    ensure!(
        ids(&c.events) == vec![failed.id()],
        "only m-4 is free to claim (m-2 is not due, m-3 is held): {:?}",
        ids(&c.events)
    );
    call!(
        store.fail(
            &c.token,
            &[crate::store::Failure::dead(failed.id(), "poison")]
        ),
        "fail"
    );
    let mut tx = call!(store.begin(), "begin");
    let other = token("consumer-2");
    let taken = call!(
        tx.take(&[waiting.id(), held.id(), failed.id()], &other),
        "take"
    );
    ensure!(
        matches!(taken.get(&waiting.id()), Some(Redelivered::Wait(_))),
        "still waiting: {taken:?}"
    );
    ensure!(
        matches!(taken.get(&held.id()), Some(Redelivered::Wait(_))),
        "a row held by another consumer's live lease must be waited for, not taken: {taken:?}"
    );
    ensure!(
        !taken.contains_key(&failed.id()),
        "a failed row is done, never taken: {taken:?}"
    );
    call!(tx.rollback(), "rollback");
    Ok(())
}
