//! A store of your own: an in-memory outbox that implements the store
//! traits, proves itself with `omnibox::testkit`, and runs the relay's
//! processor with a sink of its own.
//!
//! A real store (another driver, a unit of work of your service) follows
//! the same plan: keep each event's fields ([`DomainService`] validates
//! them when they are created) and its state ([`Event::state`]); read a row
//! back with [`Event::with_state`]; answer guarded writes with
//! [`guard_result`]; write failures through [`stored_error`].
//!
//! ```sh
//! cargo run --example custom_store
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use omnibox::model::limits::MAX_DURATION;
use omnibox::prelude::*;
use omnibox::relay::{Delivery, Message, Sink};
use omnibox::store::{
    BlockedKey, BulkOutcome, Capabilities, Claim, ClaimOptions, ClaimToken, FailReport, Failure,
    FetchFilters, ListFilter, RequeueFilter, RetryAt, TableCounts, guard_result, stored_error,
};
use omnibox::{Event, EventLock, EventState, OutboxRoute, Timestamp, UnlockReason, testkit, time};
use uuid::Uuid;

/// The outbox in memory: rows in insertion order.
#[derive(Clone, Default)]
struct MemoryOutbox {
    rows: Arc<Mutex<Vec<OutboxEvent>>>,
    /// A defect, for showing that the kit finds it: claims forget per-key
    /// order (a held row no longer holds its key).
    unordered: bool,
}

/// `event` in `state`, with `change` applied.
fn changed(event: &OutboxEvent, change: impl FnOnce(&mut EventState)) -> Result<OutboxEvent> {
    let mut state = event.state();
    change(&mut state);
    state.updated_at = time::now();
    event.clone().with_state(state)
}

/// True when `event` is held by the claim of `token`.
fn held(event: &OutboxEvent, token: &ClaimToken) -> bool {
    event.status() == EventStatus::Pending
        && event.locked_by() == Some(token.worker.as_str())
        && event.locked_at() == Some(token.locked_at)
}

/// A duration as a chrono one, for time arithmetic, clamped to the
/// longest the engine uses (so that adding it to a time cannot overflow).
fn span(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d.min(MAX_DURATION)).unwrap_or_default()
}

impl MemoryOutbox {
    /// Runs `write` on each row of `ids` that `token` holds, all or
    /// nothing (every new row is made before any is stored); returns the
    /// ids changed, or the guard's error naming the others.
    fn guarded(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
        mut write: impl FnMut(&OutboxEvent) -> Result<OutboxEvent>,
    ) -> Result<Vec<Uuid>> {
        let mut rows = self.rows.lock().expect("not poisoned");
        let mut new = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if ids.contains(&row.id()) && held(row, token) {
                new.push((i, write(row)?));
            }
        }
        let done: Vec<Uuid> = new.iter().map(|(_, e)| e.id()).collect();
        for (i, row) in new {
            rows[i] = row;
        }
        guard_result(ids, &done).map(|()| done)
    }
}

impl EventStore<OutboxRoute> for MemoryOutbox {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            bulk: false,
            distributed_locking: false,
            retention: true,
            notify: false,
        }
    }

    async fn get(&self, id: Uuid) -> Result<Option<OutboxEvent>> {
        let rows = self.rows.lock().expect("not poisoned");
        Ok(rows.iter().find(|e| e.id() == id).cloned())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<OutboxEvent>> {
        let rows = self.rows.lock().expect("not poisoned");
        Ok(rows
            .iter()
            .filter(|e| filter.status.is_none_or(|s| e.status() == s))
            .filter(|e| {
                filter
                    .select
                    .event_type
                    .as_deref()
                    .is_none_or(|t| e.event_type() == t)
            })
            .filter(|e| {
                filter
                    .select
                    .topic
                    .as_deref()
                    .is_none_or(|t| e.topic() == t)
            })
            .take(filter.limit.map_or(usize::MAX, |n| n as usize))
            .cloned()
            .collect())
    }

    async fn counts(&self) -> Result<TableCounts> {
        let rows = self.rows.lock().expect("not poisoned");
        let now = time::now();
        let of = |s| rows.iter().filter(|e| e.status() == s).count() as u64;
        let pending = rows.iter().filter(|e| e.status() == EventStatus::Pending);
        Ok(TableCounts {
            table: Table::Outbox,
            pending: of(EventStatus::Pending),
            completed: of(EventStatus::Completed),
            failed: of(EventStatus::Failed),
            locked: rows.iter().filter(|e| e.is_locked()).count() as u64,
            due_now: pending.clone().filter(|e| e.scheduled_at() <= now).count() as u64,
            oldest_pending_created_at: pending.map(|e| e.created_at()).min(),
            now,
            completed_is_estimate: false,
        })
    }

    /// Due rows in insertion order; a key whose earliest pending row is
    /// held (by a live lease) or not due yet waits whole, so a key's rows
    /// go out in order. (`opts.own`, a worker's own rows in flight, is not
    /// used: they hold their key as any other worker's do.)
    async fn claim(&self, opts: &ClaimOptions) -> Result<Claim<OutboxRoute>> {
        opts.check()?;
        let now = time::now();
        let token = ClaimToken {
            worker: opts.worker.clone(),
            locked_at: now,
            lease: opts.lease,
            created_between: None,
        };
        let mut rows = self.rows.lock().expect("not poisoned");
        let mut waiting = std::collections::HashSet::new();
        let mut events = Vec::new();
        for row in rows.iter_mut() {
            if row.status() != EventStatus::Pending
                || !opts.filters.topics.is_empty()
                    && !opts.filters.topics.contains(&row.topic().to_string())
            {
                continue;
            }
            let key = (row.topic().to_string(), row.partition_key().to_string());
            let live = row.locked_until().is_some_and(|until| until > now);
            if waiting.contains(&key) || live || row.scheduled_at() > now {
                if !self.unordered {
                    waiting.insert(key);
                }
                continue;
            }
            if events.len() == opts.limit as usize {
                break;
            }
            *row = changed(row, |s| {
                s.lock = Some(EventLock {
                    by: opts.worker.to_string(),
                    at: now,
                    until: now + span(opts.lease),
                });
            })?;
            events.push(row.clone());
        }
        Ok(Claim {
            token,
            events,
            contended: false,
            next: None,
        })
    }

    /// Whether a claim with `filters` would take anything now.
    async fn claimable_exists_for(&self, filters: &FetchFilters) -> Result<bool> {
        let now = time::now();
        let rows = self.rows.lock().expect("not poisoned");
        let mut waiting = std::collections::HashSet::new();
        for row in rows.iter().filter(|e| e.status() == EventStatus::Pending) {
            if !filters.topics.is_empty() && !filters.topics.contains(&row.topic().to_string()) {
                continue;
            }
            let key = (row.topic(), row.partition_key());
            let live = row.locked_until().is_some_and(|until| until > now);
            if waiting.contains(&key) || live || row.scheduled_at() > now {
                waiting.insert(key);
                continue;
            }
            return Ok(true);
        }
        Ok(false)
    }

    async fn extend_lease(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<usize> {
        let until = time::now() + span(lease);
        let mut rows = self.rows.lock().expect("not poisoned");
        let mut n = 0;
        for row in rows
            .iter_mut()
            .filter(|e| ids.contains(&e.id()) && held(e, token))
        {
            *row = changed(row, |s| {
                if let Some(lock) = &mut s.lock {
                    lock.until = until;
                }
            })?;
            n += 1;
        }
        Ok(n)
    }

    async fn complete(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        let now = time::now();
        let done = self.guarded(token, ids, |e| {
            changed(e, |s| {
                s.status = EventStatus::Completed;
                s.completed_at = Some(now);
                s.lock = None;
            })
        })?;
        Ok(done.len())
    }

    /// Counted failures spend an attempt (the last one fails the row),
    /// transient ones none; dead ones fail the row at once.
    async fn fail(&self, token: &ClaimToken, failures: &[Failure]) -> Result<FailReport> {
        let now = time::now();
        let ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
        let mut report = FailReport::default();
        self.guarded(token, &ids, |e| {
            let f = failures
                .iter()
                .find(|f| f.id == e.id())
                .expect("one of the ids");
            let attempts = e.attempts_made() + i32::from(f.counted);
            let failed = f.dead || attempts >= e.max_attempts();
            let error = stored_error(&f.error);
            let next = changed(e, |s| {
                s.attempts_made = attempts;
                s.last_error = Some(error);
                s.lock = None;
                if failed {
                    s.status = EventStatus::Failed;
                } else {
                    s.scheduled_at = match f.retry {
                        RetryAt::At(at) => at,
                        RetryAt::After(d) => now + span(d),
                    };
                }
            })?;
            if failed {
                report.failed.push(e.id());
            } else {
                report.rescheduled.push(e.id());
            }
            Ok(next)
        })?;
        Ok(report)
    }

    async fn release(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        let done = self.guarded(token, ids, |e| changed(e, |s| s.lock = None))?;
        Ok(done.len())
    }

    async fn force_unlock(&self, id: Uuid, reason: &UnlockReason) -> Result<OutboxEvent> {
        let mut rows = self.rows.lock().expect("not poisoned");
        let row = rows
            .iter_mut()
            .find(|e| e.id() == id)
            .ok_or(Error::NotFound { id })?;
        if !row.is_locked() {
            return Err(Error::NotLocked { id });
        }
        *row = changed(row, |s| {
            s.lock = None;
            s.last_error = Some(format!("Force unlock: {}", reason.as_str()));
        })?;
        Ok(row.clone())
    }

    async fn release_stale_locks(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        let now = time::now();
        let mut rows = self.rows.lock().expect("not poisoned");
        let mut n = 0;
        for row in rows.iter_mut() {
            let stale = row.locked_until().is_some_and(|u| u < now)
                && row
                    .locked_at()
                    .is_some_and(|at| at < now - span(older_than));
            if stale && n < u64::from(batch_size) {
                *row = changed(row, |s| s.lock = None)?;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn delete_completed(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        let cutoff = time::now() - span(older_than);
        let mut rows = self.rows.lock().expect("not poisoned");
        let mut n = 0;
        rows.retain(|e| {
            let old = e.completed_at().is_some_and(|at| at < cutoff);
            let delete = old && n < u64::from(batch_size);
            n += u64::from(delete);
            !delete
        });
        Ok(n)
    }

    /// Failed rows back to pending, with their attempts reset (the ids
    /// filter only; the others are not kept by this store).
    async fn requeue_failed(&self, filter: &RequeueFilter) -> Result<Vec<Uuid>> {
        filter.check(Table::Outbox)?;
        let now = time::now();
        let mut rows = self.rows.lock().expect("not poisoned");
        let mut ids = Vec::new();
        for row in rows.iter_mut().filter(|e| {
            e.status() == EventStatus::Failed
                && (filter.all || filter.failures.ids.contains(&e.id()))
        }) {
            *row = DomainService::default().requeue(row, now)?;
            ids.push(row.id());
        }
        Ok(ids)
    }
}

impl OutboxStore for MemoryOutbox {
    /// Not kept by this store (`omnibox failures` lists them on the
    /// built-in ones).
    async fn blocked_keys(&self, _limit: u32) -> Result<Vec<BlockedKey>> {
        Ok(Vec::new())
    }

    /// In order, all or nothing; an idempotency key met again returns the
    /// existing row's id. Each new row gets the next `seq`.
    async fn create_many(&self, events: &[OutboxEvent]) -> Result<Vec<BulkOutcome>> {
        let mut rows = self.rows.lock().expect("not poisoned");
        let mut seq = rows.iter().filter_map(|e| e.seq()).max().unwrap_or(0);
        let mut added: Vec<OutboxEvent> = Vec::new();
        let mut outcomes = Vec::new();
        for event in events {
            let key = event.idempotency_key();
            let existing = rows
                .iter()
                .chain(&added)
                .find(|e| key.is_some() && e.idempotency_key() == key || e.id() == event.id());
            if let Some(e) = existing {
                outcomes.push(BulkOutcome {
                    id: e.id(),
                    existing: true,
                });
                continue;
            }
            seq += 1;
            added.push(changed(event, |s| s.seq = Some(seq))?);
            outcomes.push(BulkOutcome {
                id: event.id(),
                existing: false,
            });
        }
        rows.extend(added);
        Ok(outcomes)
    }
}

/// A sink that keeps what it is sent (a broker of your own would send it).
#[derive(Default)]
struct Kept(Mutex<Vec<(String, String)>>);

impl Sink for Kept {
    fn describe(&self) -> String {
        "memory".into()
    }

    async fn send(&self, messages: &[Message], _timeout: Duration) -> Vec<Delivery> {
        let mut kept = self.0.lock().expect("not poisoned");
        for m in messages {
            kept.push((m.key.clone(), m.value.get().to_string()));
        }
        messages.iter().map(|_| Delivery::Delivered).collect()
    }
}

/// Events of `key`, numbered.
fn order_event(key: &str, n: u32) -> Result<OutboxEvent> {
    DomainService::default().create_outbox_event(NewOutboxEvent::new(
        "order",
        Uuid::now_v7(),
        "order.created",
        "orders",
        key,
        serde_json::json!({"order": key, "n": n}),
    ))
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    // 1. The store proves itself: the contract the relay relies on.
    let passed = testkit::outbox_store(async || MemoryOutbox::default()).await?;
    println!("testkit: {passed} outbox cases passed");
    assert_eq!(passed, testkit::OUTBOX_CASES.len());
    // A store with a defect fails it, naming the case and what went wrong.
    let defective = async || MemoryOutbox {
        unordered: true,
        ..MemoryOutbox::default()
    };
    let violation = testkit::outbox_store(defective)
        .await
        .expect_err("a store that forgets per-key order must fail the kit");
    println!("testkit on a defective store: {violation}");
    assert_eq!(violation.case, "per_key_order");

    // 2. The relay's processor runs on it.
    let store = MemoryOutbox::default();
    let events = [
        order_event("a", 1)?,
        order_event("b", 1)?,
        order_event("a", 2)?,
        order_event("a", 3)?,
    ];
    store.create_many(&events).await?;
    let sink = Arc::new(Kept::default());
    let relay = publisher(
        store.clone(),
        sink.clone(),
        ProcessorOptions::new(WorkerId::new("memory-relay")?),
        Duration::from_secs(5),
    )
    .build();
    let mut completed = 0;
    while completed < events.len() {
        let report = relay.process_batch().await?;
        assert!(
            report.completed > 0,
            "the relay made no progress: {report:?}"
        );
        completed += report.completed;
    }
    let sent = sink.0.lock().expect("not poisoned").clone();
    println!("published {} messages: {sent:?}", sent.len());
    let of_a: Vec<&str> = sent
        .iter()
        .filter(|(key, _)| key == "a")
        .map(|(_, value)| value.as_str())
        .collect();
    assert_eq!(of_a.len(), 3);
    assert!(
        of_a[0].contains("\"n\":1") && of_a[2].contains("\"n\":3"),
        "{of_a:?}"
    );
    let counts = store.counts().await?;
    assert_eq!((counts.completed, counts.pending), (4, 0));
    let row: Event<OutboxRoute> = store.get(events[0].id()).await?.expect("kept");
    let done_at: Option<Timestamp> = row.completed_at();
    assert!(done_at.is_some());
    Ok(())
}
