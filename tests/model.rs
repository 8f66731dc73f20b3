//! A randomized, model-based test of the relay on both stores.
//!
//! Each *schedule* is drawn from a seed: keys (one to one per row), due
//! times in the past, now and the near future, `max_attempts`, a sink that
//! fails at random (broker not answering, record rejected, a topic that
//! goes away, and acknowledgements of a key's later messages after an
//! earlier one failed, as a broker with all messages in flight can give),
//! one to four relays in `--once` or watch mode with random batches and
//! leases, and an operator and the world acting meanwhile: rows inserted,
//! failed rows replayed, locked rows force-unlocked, a relay that claims and
//! dies. Then the sink turns healthy and one to four `--once` relays run
//! together. After every schedule:
//!
//! * every row is completed or failed: `--once` relays together drained
//!   every due row, and no row is left locked;
//! * nothing is completed that the sink did not deliver;
//! * per key, first deliveries follow `seq` (exempt as the earlier row: one
//!   that was failed or replayed at some point, since a dead letter no
//!   longer holds its key and a replay sends it again by an operator's
//!   decision, and one scheduled for later when written, since a row
//!   scheduled for later and never tried does not hold its key up);
//! * a row is `failed` only after `max_attempts` counted failures (or by the
//!   rule that a failure before an acknowledged later message of its key is
//!   not retried), and no row spent more attempts than the sink gave counted
//!   failures (an outage spends none).
//!
//! `OMNIBOX_MODEL_SCHEDULES` (default 200 per store) sets the budget,
//! `OMNIBOX_MODEL_SOAK=SECONDS` runs schedules until that much time has
//! passed, and `OMNIBOX_MODEL_SEED=N` replays one schedule. A failure
//! prints the seed. Interleavings depend on timing, so a replay draws the
//! same schedule and the same sink answers per event and try, not the same
//! race. `OMNIBOX_TEST_LOG=omnibox=debug` prints the library's logs of the
//! PostgreSQL schedules.
//!
//! Each relay holds its claims in their transaction (`hold_claims`) or
//! writes leases, at random: the two kinds share the table.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omnibox::pipeline::{FedRow, KeyFeed, ProcessorOptions, RunMode, RunOptions, Sleep, run};
use omnibox::relay::{self, Delivery, Message, PublishOptions, Sink};
use omnibox::store::{AnyStore, AnyTable, ListFilter, RequeueFilter};
use omnibox::{
    Backoff, ClaimOptions, DomainService, EventStatus, EventStore, NewOutboxEvent, OutboxEvent,
    OutboxRoute, OutboxStore, UnlockReason, WorkerId,
};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

/// What the schedules exercised (printed at the end, so a run shows that
/// failures, late acknowledgements, replays, unlocks and dead relays did
/// happen).
#[derive(Debug, Default)]
struct Exercised {
    rows: AtomicU64,
    delivered: AtomicU64,
    rejected: AtomicU64,
    transient: AtomicU64,
    unavailable: AtomicU64,
    late_acks: AtomicU64,
    reorder_dead: AtomicU64,
    failed: AtomicU64,
    replays: AtomicU64,
    unlocks: AtomicU64,
    dead_relays: AtomicU64,
    fed_rows: AtomicU64,
}

static EXERCISED: Exercised = Exercised {
    rows: AtomicU64::new(0),
    delivered: AtomicU64::new(0),
    rejected: AtomicU64::new(0),
    transient: AtomicU64::new(0),
    unavailable: AtomicU64::new(0),
    late_acks: AtomicU64::new(0),
    reorder_dead: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    replays: AtomicU64::new(0),
    unlocks: AtomicU64::new(0),
    dead_relays: AtomicU64::new(0),
    fed_rows: AtomicU64::new(0),
};

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What the sink did for one row.
#[derive(Debug, Default, Clone)]
struct RowLog {
    /// Position of each delivery in the sink's global order.
    delivered: Vec<u64>,
    /// Failures that may spend an attempt (rejections, an unavailable
    /// topic), since the row was last replayed.
    countable: u32,
}

/// A sink whose answers are drawn from the schedule's seed, per event and
/// try, so a replayed seed gives the same answers.
struct Scripted {
    seed: u64,
    p_transient: f64,
    p_reject: f64,
    p_late_ack: f64,
    healthy: AtomicBool,
    down: Mutex<HashSet<String>>,
    tries: Mutex<HashMap<Uuid, u64>>,
    log: Mutex<HashMap<Uuid, RowLog>>,
    clock: AtomicU64,
    /// Every answer, in order, for the failure report.
    sends: Mutex<Vec<(u64, Uuid, String)>>,
}

impl Scripted {
    fn draw(&self, id: Uuid, salt: u64) -> f64 {
        let try_no = {
            let mut t = self.tries.lock().unwrap();
            let n = t.entry(id).or_insert(0);
            *n += 1;
            *n
        };
        let mut rng = fastrand::Rng::with_seed(
            self.seed ^ (id.as_u128() as u64) ^ try_no.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt,
        );
        rng.f64()
    }

    fn record(&self, id: Uuid, d: &Delivery) {
        match d {
            Delivery::Delivered => bump(&EXERCISED.delivered, 1),
            Delivery::Rejected(_) => bump(&EXERCISED.rejected, 1),
            Delivery::Transient(_) => bump(&EXERCISED.transient, 1),
            Delivery::Unavailable(_) => bump(&EXERCISED.unavailable, 1),
            _ => {}
        }
        let mut log = self.log.lock().unwrap();
        let row = log.entry(id).or_default();
        match d {
            Delivery::Delivered => row
                .delivered
                .push(self.clock.fetch_add(1, Ordering::SeqCst)),
            Delivery::Rejected(_) | Delivery::Unavailable(_) => row.countable += 1,
            _ => {}
        }
    }
}

impl Sink for Scripted {
    fn describe(&self) -> String {
        "scripted".into()
    }

    async fn send(&self, messages: &[Message], _timeout: Duration) -> Vec<Delivery> {
        // Let other relays interleave.
        tokio::task::yield_now().await;
        let healthy = self.healthy.load(Ordering::SeqCst);
        let down = self.down.lock().unwrap().clone();
        let mut failed_keys: HashSet<(&str, &str)> = HashSet::new();
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            let key = (m.topic.as_str(), m.key.as_str());
            let r = self.draw(m.event_id, 0);
            let d = if healthy {
                Delivery::Delivered
            } else if failed_keys.contains(&key) {
                // A later message of a key after an earlier one failed: a
                // broker with everything in flight may still take it.
                if self.draw(m.event_id, 1) < self.p_late_ack {
                    bump(&EXERCISED.late_acks, 1);
                    Delivery::Delivered
                } else {
                    Delivery::NotSent
                }
            } else if down.contains(&m.topic) {
                Delivery::Unavailable(format!("topic {:?} is down", m.topic))
            } else if r < self.p_transient {
                Delivery::Transient("no answer".into())
            } else if r < self.p_transient + self.p_reject {
                Delivery::Rejected("invalid record".into())
            } else {
                Delivery::Delivered
            };
            if !matches!(d, Delivery::Delivered) {
                failed_keys.insert(key);
            }
            self.record(m.event_id, &d);
            self.sends.lock().unwrap().push((
                self.clock.load(Ordering::SeqCst),
                m.event_id,
                format!("{d:?}"),
            ));
            out.push(d);
        }
        out
    }
}

/// Which rows a schedule dates a day back (`Plan::backdate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backdate {
    Never,
    Any,
    Meanwhile,
}

/// The knobs of one schedule, drawn from its seed.
#[derive(Debug, Clone)]
struct Plan {
    rows: usize,
    keys: usize,
    topics: usize,
    relays: usize,
    final_relays: usize,
    chaos: Duration,
    max_attempts: i32,
    /// Partitioned tables: a quarter of the rows are dated a day back (in
    /// yesterday's partition), so the claim's walk reads keys over two
    /// partitions, and its range of partitions with pending rows moves;
    /// in half the schedules only rows inserted while the relays run, so
    /// the walk's range hint (read while yesterday held none) goes stale.
    backdate: Backdate,
}

fn event(rng: &mut fastrand::Rng, plan: &Plan, n: usize, meanwhile: bool) -> OutboxEvent {
    let key = rng.usize(0..plan.keys);
    let topic = format!("t{}", rng.usize(0..plan.topics));
    let mut e = NewOutboxEvent::new(
        "order",
        Uuid::from_u128(n as u128 + 1),
        "order.updated",
        topic,
        format!("k{key}"),
        json!({ "n": n }),
    );
    e.max_attempts = Some(rng.i32(1..=plan.max_attempts));
    let now = omnibox::time::now();
    let backdate = match plan.backdate {
        Backdate::Never => false,
        Backdate::Any => true,
        Backdate::Meanwhile => meanwhile,
    };
    if backdate && rng.u8(0..4) == 0 {
        e.created_at = Some(now - chrono::Duration::hours(24));
    }
    e.scheduled_at = match rng.u8(0..20) {
        0..=2 => Some(now - chrono::Duration::milliseconds(rng.i64(1..50_000))),
        3..=5 => Some(now + chrono::Duration::milliseconds(rng.i64(5..250))),
        _ => None,
    };
    DomainService::default().create_outbox_event(e).unwrap()
}

/// Rows written with a due time still to come.
fn note_later(batch: &[OutboxEvent], later: &mut HashSet<Uuid>) {
    let now = omnibox::time::now();
    later.extend(
        batch
            .iter()
            .filter(|e| e.scheduled_at() > now)
            .map(|e| e.id()),
    );
}

fn relay_options(rng: &mut fastrand::Rng, name: &str) -> ProcessorOptions {
    let mut o = ProcessorOptions::new(WorkerId::new(name).unwrap());
    o.batch = rng.u32(1..=40);
    o.lease = Duration::from_millis(rng.u64(400..2000));
    o.backoff = Backoff {
        base: Duration::from_millis(5),
        cap: Duration::from_millis(30),
    };
    o.transient_delay = Duration::from_millis(5);
    o.commit_retry_for = Duration::from_secs(5);
    // Held claims (PostgreSQL; SQLite writes the lease whatever this says)
    // beside leased ones: the mixed mode keeps every invariant.
    o.hold_claims = rng.bool();
    o
}

fn spawn_relay(
    table: AnyTable<OutboxRoute>,
    sink: Arc<Scripted>,
    options: ProcessorOptions,
    mode: RunMode,
    unavailable_limit: Duration,
    shutdown: watch::Receiver<bool>,
    feed: Option<Arc<KeyFeed>>,
) -> tokio::task::JoinHandle<Result<omnibox::pipeline::RunReport, String>> {
    tokio::spawn(async move {
        let publish = PublishOptions {
            timeout: Duration::from_secs(5),
            transient_delay: options.transient_delay,
            unavailable_limit,
            topic_retry_min: Duration::from_millis(5),
            topic_retry_max: Duration::from_millis(40),
            ..PublishOptions::default()
        };
        let mut b = relay::publisher_with(table, sink, options, publish);
        if let Some(feed) = feed {
            b = b.key_feed(feed);
        }
        let p = b.build();
        let opts = RunOptions {
            mode,
            idle_min: Duration::from_millis(1),
            idle_max: Duration::from_millis(20),
            contention_limit: Duration::from_secs(20),
            max_rows: None,
            outage_limit: Duration::from_secs(20),
            stall_limit: None,
        };
        run(&p, &opts, shutdown, &mut Sleep, |_| {})
            .await
            .map_err(|e| e.to_string())
    })
}

async fn all_rows(table: &AnyTable<OutboxRoute>) -> Vec<OutboxEvent> {
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let page = table
            .list(&ListFilter {
                after_seq: after,
                limit: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq();
        rows.extend(page);
    }
    rows
}

/// Runs one schedule on `store` (emptied first); an error describes the
/// broken invariant.
async fn schedule(store: &AnyStore, seed: u64) -> Result<Plan, String> {
    let table = store.outbox();
    let mut partitioned = false;
    match store {
        AnyStore::Postgres(s) => {
            sqlx::query("TRUNCATE outbox_events RESTART IDENTITY")
                .execute(s.pool())
                .await
                .unwrap();
            partitioned = sqlx::query_scalar(omnibox::store::postgres::OUTBOX_IS_PARTITIONED)
                .fetch_one(s.pool())
                .await
                .unwrap();
        }
        AnyStore::Sqlite(s) => {
            sqlx::query("DELETE FROM outbox_events")
                .execute(s.pool())
                .await
                .unwrap();
        }
        _ => unreachable!(),
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let rows = rng.usize(1..=60);
    let plan = Plan {
        rows,
        keys: rng.usize(1..=rows),
        topics: rng.usize(1..=3),
        relays: rng.usize(1..=4),
        final_relays: rng.usize(1..=4),
        chaos: Duration::from_millis(rng.u64(50..400)),
        max_attempts: rng.i32(1..=4),
        backdate: match (partitioned, rng.bool()) {
            (false, _) => Backdate::Never,
            (true, true) => Backdate::Any,
            (true, false) => Backdate::Meanwhile,
        },
    };
    let sink = Arc::new(Scripted {
        seed,
        p_transient: [0.0, 0.05, 0.2][rng.usize(0..3)],
        p_reject: [0.0, 0.05, 0.2][rng.usize(0..3)],
        p_late_ack: [0.0, 0.0, 0.5][rng.usize(0..3)],
        healthy: AtomicBool::new(false),
        down: Mutex::new(HashSet::new()),
        tries: Mutex::new(HashMap::new()),
        log: Mutex::new(HashMap::new()),
        clock: AtomicU64::new(0),
        sends: Mutex::new(Vec::new()),
    });
    let mut n = 0;
    let mut seeded = Vec::new();
    let mut scheduled_later: HashSet<Uuid> = HashSet::new();
    while seeded.len() < plan.rows {
        let chunk = rng.usize(1..=(plan.rows - seeded.len()));
        let batch: Vec<OutboxEvent> = (0..chunk)
            .map(|_| {
                n += 1;
                event(&mut rng, &plan, n, false)
            })
            .collect();
        note_later(&batch, &mut scheduled_later);
        table.create_many(&batch).await.unwrap();
        seeded.extend(batch);
    }
    // Relays at work while the world changes.
    let (stop, shutdown) = watch::channel(false);
    let unavailable_limit = if rng.bool() {
        Duration::from_millis(rng.u64(20..200))
    } else {
        Duration::from_secs(3600)
    };
    let mut relays = Vec::new();
    // Relays told of new rows as the WAL relay is (mixed mode): their
    // claims walk the keys of the rows inserted, and scan now and then.
    let mut feeds: Vec<Arc<KeyFeed>> = Vec::new();
    let mut lsn = 0u64;
    for r in 0..plan.relays {
        let mode = if rng.bool() {
            RunMode::Once
        } else {
            RunMode::Watch
        };
        let feed = (mode == RunMode::Watch && rng.bool())
            .then(|| KeyFeed::new(Duration::from_millis(rng.u64(5..100)), 0));
        feeds.extend(feed.clone());
        relays.push(spawn_relay(
            table.clone(),
            sink.clone(),
            relay_options(&mut rng, &format!("relay-{r}")),
            mode,
            unavailable_limit,
            shutdown.clone(),
            feed,
        ));
    }
    let mut replayed: HashSet<Uuid> = HashSet::new();
    let mut ever_failed: HashSet<Uuid> = HashSet::new();
    let mut longest_lease = Instant::now();
    let until = Instant::now() + plan.chaos;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.u64(1..25))).await;
        match rng.u8(0..10) {
            0 | 1 => {
                let batch: Vec<OutboxEvent> = (0..rng.usize(1..5))
                    .map(|_| {
                        n += 1;
                        event(&mut rng, &plan, n, true)
                    })
                    .collect();
                note_later(&batch, &mut scheduled_later);
                table.create_many(&batch).await.unwrap();
                // The stream: each insert once, now and then twice (a
                // stream resumed from an earlier position sends it again).
                lsn += 1;
                let fed: Vec<FedRow> = batch
                    .iter()
                    .map(|e| FedRow {
                        id: e.id(),
                        topic: e.topic().to_string(),
                        partition_key: e.partition_key().to_string(),
                    })
                    .collect();
                for f in &feeds {
                    bump(&EXERCISED.fed_rows, fed.len() as u64);
                    f.push(lsn, fed.clone());
                    if rng.u8(0..5) == 0 {
                        f.push(lsn, fed.clone());
                    }
                }
            }
            2 => {
                let topic = format!("t{}", rng.usize(0..plan.topics));
                let mut down = sink.down.lock().unwrap();
                if !down.remove(&topic) {
                    down.insert(topic);
                }
            }
            3 => {
                // An operator replays every failed row. The sink's count of
                // counted failures starts over for them (before the replay:
                // once replayed, a relay may take them at once). A failed
                // row another transaction holds at that moment (its dead
                // letter being written) is skipped by the replay and keeps
                // its count.
                let failed: Vec<Uuid> = all_rows(&table)
                    .await
                    .iter()
                    .filter(|e| e.status() == EventStatus::Failed)
                    .map(|e| e.id())
                    .collect();
                ever_failed.extend(failed.iter().copied());
                let mut before: HashMap<Uuid, u32> = HashMap::new();
                {
                    let mut log = sink.log.lock().unwrap();
                    for id in &failed {
                        let row = log.entry(*id).or_default();
                        before.insert(*id, row.countable);
                        row.countable = 0;
                    }
                }
                {
                    let mut sends = sink.sends.lock().unwrap();
                    let at = sink.clock.load(Ordering::SeqCst);
                    sends.extend(failed.iter().map(|id| (at, *id, "replayed".to_string())));
                }
                let ids = table
                    .requeue_failed(&RequeueFilter {
                        all: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                bump(&EXERCISED.replays, ids.len() as u64);
                {
                    let requeued: HashSet<&Uuid> = ids.iter().collect();
                    let mut log = sink.log.lock().unwrap();
                    let mut sends = sink.sends.lock().unwrap();
                    let at = sink.clock.load(Ordering::SeqCst);
                    for (id, n) in before.iter().filter(|(id, _)| !requeued.contains(id)) {
                        log.entry(*id).or_default().countable += n;
                        sends.push((at, *id, "skipped by the replay".to_string()));
                    }
                }
                replayed.extend(ids);
            }
            4 => {
                // An operator force-unlocks a row a relay holds.
                let locked: Vec<Uuid> = all_rows(&table)
                    .await
                    .iter()
                    .filter(|e| e.is_locked())
                    .map(|e| e.id())
                    .collect();
                if !locked.is_empty() {
                    let id = locked[rng.usize(0..locked.len())];
                    if table
                        .force_unlock(id, &UnlockReason::new("model test").unwrap())
                        .await
                        .is_ok()
                    {
                        bump(&EXERCISED.unlocks, 1);
                    }
                }
            }
            5 => {
                // A relay claims and dies: its rows wait for the lease.
                let lease = Duration::from_millis(rng.u64(20..150));
                let c = table
                    .claim(
                        &ClaimOptions::new(WorkerId::new("dead-relay").unwrap(), rng.u32(1..10))
                            .lease(lease),
                    )
                    .await
                    .unwrap();
                if !c.is_empty() {
                    bump(&EXERCISED.dead_relays, 1);
                    longest_lease = longest_lease.max(Instant::now() + lease);
                }
            }
            _ => {}
        }
    }
    // The world settles: a healthy sink, and every retry and lease due.
    sink.healthy.store(true, Ordering::SeqCst);
    sink.down.lock().unwrap().clear();
    let _ = stop.send(true);
    for r in relays {
        r.await
            .map_err(|e| format!("relay task: {e}"))?
            .map_err(|e| format!("relay: {e}"))?;
    }
    for e in all_rows(&table).await {
        if e.status() == EventStatus::Failed {
            ever_failed.insert(e.id());
        }
    }
    tokio::time::sleep_until((longest_lease + Duration::from_millis(20)).into()).await;
    let latest = all_rows(&table)
        .await
        .iter()
        .filter(|e| e.status() == EventStatus::Pending)
        .map(|e| e.scheduled_at())
        .max();
    if let Some(t) = latest
        && let Ok(wait) = (t - omnibox::time::now()).to_std()
    {
        tokio::time::sleep(wait + Duration::from_millis(5)).await;
    }
    // `--once` relays together drain everything due.
    let (_keep, idle) = watch::channel(false);
    let finals: Vec<_> = (0..plan.final_relays)
        .map(|r| {
            spawn_relay(
                table.clone(),
                sink.clone(),
                relay_options(&mut rng, &format!("final-{r}")),
                RunMode::Once,
                unavailable_limit,
                idle.clone(),
                None,
            )
        })
        .collect();
    for r in finals {
        r.await
            .map_err(|e| format!("final relay task: {e}"))?
            .map_err(|e| format!("final relay: {e}"))?;
    }
    check(&table, &sink, &replayed, &ever_failed, &scheduled_later).await?;
    Ok(plan)
}

async fn check(
    table: &AnyTable<OutboxRoute>,
    sink: &Scripted,
    replayed: &HashSet<Uuid>,
    ever_failed: &HashSet<Uuid>,
    scheduled_later: &HashSet<Uuid>,
) -> Result<(), String> {
    let rows = all_rows(table).await;
    let log = sink.log.lock().unwrap().clone();
    bump(&EXERCISED.rows, rows.len() as u64);
    for e in &rows {
        if e.status() == EventStatus::Failed {
            bump(&EXERCISED.failed, 1);
            if e.last_error()
                .is_some_and(|m| m.contains("not retried: a later event of its key"))
            {
                bump(&EXERCISED.reorder_dead, 1);
            }
        }
    }
    let mut by_key: HashMap<(String, String), Vec<&OutboxEvent>> = HashMap::new();
    for e in &rows {
        if e.status() == EventStatus::Pending {
            return Err(format!(
                "--once relays with a healthy sink left a row pending: {} (key {}, scheduled {}, attempts {}, locked by {:?} until {:?}, last error {:?})",
                e.id(),
                e.partition_key(),
                e.scheduled_at(),
                e.attempts_made(),
                e.locked_by(),
                e.locked_until(),
                e.last_error()
            ));
        }
        if e.is_locked() {
            return Err(format!("row {} left locked", e.id()));
        }
        let l = log.get(&e.id()).cloned().unwrap_or_default();
        if e.status() == EventStatus::Completed && l.delivered.is_empty() {
            return Err(format!("row {} completed but never delivered", e.id()));
        }
        let reordered = e
            .last_error()
            .is_some_and(|m| m.contains("not retried: a later event of its key"));
        if e.attempts_made() as u32 > l.countable + u32::from(reordered) {
            let sends: Vec<String> = sink
                .sends
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, id, _)| *id == e.id())
                .map(|(at, _, d)| format!("{at}: {d}"))
                .collect();
            return Err(format!(
                "row {} spent {} attempts, the sink gave {} counted failures (status {:?}, last error {:?}, replayed {}, ever failed {})\n  sends:\n    {}",
                e.id(),
                e.attempts_made(),
                l.countable,
                e.status(),
                e.last_error(),
                replayed.contains(&e.id()),
                ever_failed.contains(&e.id()),
                sends.join("\n    ")
            ));
        }
        if e.status() == EventStatus::Failed && e.attempts_made() < e.max_attempts() && !reordered {
            return Err(format!(
                "row {} failed after {} of {} attempts: {:?}",
                e.id(),
                e.attempts_made(),
                e.max_attempts(),
                e.last_error()
            ));
        }
        by_key
            .entry((e.topic().to_string(), e.partition_key().to_string()))
            .or_default()
            .push(e);
    }
    for ((topic, key), mut rows) in by_key {
        rows.sort_by_key(|e| e.seq());
        let first = |e: &OutboxEvent| log.get(&e.id()).and_then(|l| l.delivered.first().copied());
        for (i, earlier) in rows.iter().enumerate() {
            let exempt = replayed.contains(&earlier.id())
                || ever_failed.contains(&earlier.id())
                || scheduled_later.contains(&earlier.id())
                || earlier.status() == EventStatus::Failed;
            if exempt {
                continue;
            }
            let Some(a) = first(earlier) else { continue };
            for later in &rows[i + 1..] {
                if let Some(b) = first(later)
                    && b < a
                {
                    let history: Vec<String> = rows
                        .iter()
                        .map(|e| {
                            format!(
                                "seq {:?} {} attempts {}/{} delivered {:?} replayed {} ever-failed {} later {} created {} scheduled {} error {:?}",
                                e.seq(),
                                e.status(),
                                e.attempts_made(),
                                e.max_attempts(),
                                log.get(&e.id()).map(|l| l.delivered.clone()),
                                replayed.contains(&e.id()),
                                ever_failed.contains(&e.id()),
                                scheduled_later.contains(&e.id()),
                                e.created_at(),
                                e.scheduled_at(),
                                e.last_error()
                            )
                        })
                        .collect();
                    let ids: HashSet<Uuid> = rows.iter().map(|e| e.id()).collect();
                    let seq_of: HashMap<Uuid, Option<i64>> =
                        rows.iter().map(|e| (e.id(), e.seq())).collect();
                    let sends: Vec<String> = sink
                        .sends
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|(_, id, _)| ids.contains(id))
                        .map(|(clock, id, d)| format!("@{clock} seq {:?}: {d}", seq_of[id]))
                        .collect();
                    return Err(format!(
                        "key {topic}/{key}: row {} (seq {:?}) was first delivered after row {} (seq {:?})\n  {}\n  sends:\n    {}",
                        earlier.id(),
                        earlier.seq(),
                        later.id(),
                        later.seq(),
                        history.join("\n  "),
                        sends.join("\n    ")
                    ));
                }
            }
        }
    }
    Ok(())
}

fn budget() -> (usize, Option<Duration>) {
    let n = std::env::var("OMNIBOX_MODEL_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let soak = std::env::var("OMNIBOX_MODEL_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    (n, soak)
}

/// Runs schedules on `stores` (one schedule at a time per store, the stores
/// side by side) and panics with the failing seed.
async fn run_schedules(backend: &str, stores: Vec<AnyStore>, share: usize) {
    if let Ok(seed) = std::env::var("OMNIBOX_MODEL_SEED") {
        let seed: u64 = seed.parse().expect("OMNIBOX_MODEL_SEED is a number");
        match schedule(&stores[0], seed).await {
            Ok(plan) => eprintln!("{backend}: seed {seed} passed: {plan:?}"),
            Err(e) => panic!("{backend}: OMNIBOX_MODEL_SEED={seed}: {e}"),
        }
        return;
    }
    let (count, soak) = budget();
    let count = count / share.max(1);
    let base: u64 = fastrand::u64(..);
    eprintln!("{backend}: base seed {base}");
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for store in stores {
        let next = next.clone();
        let backend = backend.to_string();
        workers.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let more = match soak {
                    Some(limit) => started.elapsed() < limit,
                    None => (i as usize) < count,
                };
                if !more {
                    return done;
                }
                let seed = base.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                if let Err(e) = schedule(&store, seed).await {
                    panic!(
                        "{backend}: schedule {i} failed: {e}\n  replay: OMNIBOX_MODEL_SEED={seed} cargo nextest run --test model model_schedules_{backend}"
                    );
                }
                done += 1;
            }
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
    eprintln!(
        "{backend}: {total} schedules passed in {:.1}s; exercised so far: {EXERCISED:?}",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_schedules_sqlite() {
    let mut dbs = Vec::new();
    for _ in 0..3 {
        dbs.push(common::sqlite().await);
    }
    let stores = dbs.iter().map(|d| d.store.clone()).collect();
    run_schedules("sqlite", stores, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_schedules_postgres() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("OMNIBOX_TEST_LOG").unwrap_or_else(|_| "off".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let mut dbs = Vec::new();
    for _ in 0..4 {
        let Some(db) = common::postgres().await else {
            return;
        };
        dbs.push(db);
    }
    let stores = dbs.iter().map(|d| d.store.clone()).collect();
    run_schedules("postgres", stores, 1).await;
}

/// The same schedules on partitioned tables (`migrate --partitioned`: the
/// claim reads the partitions that hold pending rows, ids are keyed per
/// partition, a quarter of the rows dated into yesterday's), half as many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_schedules_postgres_partitioned() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("OMNIBOX_TEST_LOG").unwrap_or_else(|_| "off".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let mut dbs = Vec::new();
    for _ in 0..2 {
        let Some(db) = common::postgres().await else {
            return;
        };
        let AnyStore::Postgres(pg) = &db.store else {
            unreachable!()
        };
        pg.partition_tables(&omnibox::store::postgres::partition::PartitionOptions::default())
            .await
            .unwrap();
        // Yesterday's partition, for the rows dated back (`Plan::backdate`).
        pg.ensure_partitions_from(
            Some(chrono::Utc::now() - chrono::Duration::days(1)),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        dbs.push(db);
    }
    let stores = dbs.iter().map(|d| d.store.clone()).collect();
    run_schedules("postgres_partitioned", stores, 2).await;
}
