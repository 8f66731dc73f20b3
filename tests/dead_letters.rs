//! A randomized, model-based test of the dead-letter table on both stores.
//!
//! Each *schedule* is drawn from a seed: inbox rows with one to three
//! attempts, a handler that completes, skips or fails each try at random,
//! and a sequence of steps: the processor (with the table as its
//! dead-letter store) handles a batch, new rows arrive, failed rows are
//! deleted (as `cleanup --include-failed` does), open letters are replayed
//! (some of them, by id), failed rows are replayed by hand (`replay --table
//! inbox`). After every step:
//!
//! * every `failed` row has exactly one open letter, and every open letter's
//!   event is `failed` or gone (never pending or completed: a replay of
//!   either kind closes it);
//! * each event that became `failed` got exactly one letter (the letters
//!   written equal the processor's `dead` count), and every one was kept;
//! * a letter replay leaves nothing behind: each replayed letter's event is
//!   pending with no attempts (requeued, or re-inserted with its id and
//!   payload).
//!
//! `OMNIBOX_DLQ_SCHEDULES` (default 25 per store) sets the budget and
//! `OMNIBOX_DLQ_SEED=N` replays one schedule; a failure prints its seed.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omnibox::inbox::HandlerStep;
use omnibox::pipeline::{Outcome, ProcessorBuilder, ProcessorOptions};
use omnibox::store::audit::{AuditEntry, AuditedChange};
use omnibox::store::dead_letters::DeadLetterFilter;
use omnibox::store::{AnyStore, EventSelector, FailureSelector, TimeWindow};
use omnibox::{
    DomainService, EventStatus, EventStore, InboxEvent, InboxStore, ListFilter, MaintenanceStore,
    NewInboxEvent, OutboxStore, Retry, Table, WorkerId, time,
};
use serde_json::json;
use uuid::Uuid;

/// The handler's answer for each (message, try), drawn from the seed.
#[derive(Clone)]
struct Answers {
    seed: u64,
    tries: Arc<Mutex<HashMap<String, u64>>>,
}

impl Answers {
    fn answer(&self, e: &InboxEvent) -> Outcome {
        let n = {
            let mut tries = self.tries.lock().unwrap();
            let n = tries.entry(e.message_id().to_string()).or_insert(0);
            *n += 1;
            *n
        };
        let mut h = self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for b in e.message_id().bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        match fastrand::Rng::with_seed(h).u32(0..10) {
            0..=2 => Outcome::Completed,
            3 => Outcome::Skipped,
            _ => Outcome::Failed {
                error: format!("try {n} of {} failed", e.message_id()),
                retry: Retry::Counted(Some(time::now())),
            },
        }
    }
}

async fn schedule(store: &AnyStore, seed: u64) -> Result<String, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let domain = DomainService::default();
    let inbox = store.inbox();
    let letters = store.dead_letters();
    let answers = Answers {
        seed,
        tries: Arc::new(Mutex::new(HashMap::new())),
    };
    let mut next = 0;
    let mut payloads: HashMap<Uuid, serde_json::Value> = HashMap::new();
    let mut add = |n: usize, rng: &mut fastrand::Rng| -> Vec<InboxEvent> {
        (0..n)
            .map(|_| {
                next += 1;
                let mut e = NewInboxEvent::new(
                    format!("m{next}"),
                    "g",
                    "billing",
                    "refund.issued",
                    json!({"n": next}),
                );
                e.max_attempts = Some(rng.i32(1..=3));
                domain.create_inbox_event(e).unwrap()
            })
            .collect()
    };
    let mut dead_total = 0;
    let mut history = Vec::new();
    let first = add(rng.usize(3..12), &mut rng);
    inbox.insert_many(&first).await.map_err(|e| e.to_string())?;
    payloads.extend(first.iter().map(|e| (e.id(), json!(e.payload()))));
    for step in 0..rng.usize(10..40) {
        let what = rng.u32(0..10);
        match what {
            0..=4 => {
                let handler = {
                    let a = answers.clone();
                    Arc::new(move |e: InboxEvent| {
                        let a = a.clone();
                        async move { a.answer(&e) }
                    })
                };
                let mut options = ProcessorOptions::new(WorkerId::new("p").unwrap());
                options.batch = rng.u32(1..6);
                let p = ProcessorBuilder::new(
                    inbox.clone(),
                    HandlerStep::new(handler, 2, Duration::from_secs(5)),
                    options,
                )
                .dead_letter_store(Arc::new(letters.clone()))
                .build();
                let r = p.process_batch().await.map_err(|e| e.to_string())?;
                if r.dead_lettered != r.dead {
                    return Err(format!(
                        "step {step}: {} events failed, {} letters kept",
                        r.dead, r.dead_lettered
                    ));
                }
                dead_total += r.dead;
                history.push(format!("process: {} claimed, {} dead", r.claimed, r.dead));
            }
            5 => {
                let new = add(rng.usize(1..4), &mut rng);
                inbox.insert_many(&new).await.map_err(|e| e.to_string())?;
                payloads.extend(new.iter().map(|e| (e.id(), json!(e.payload()))));
                history.push(format!("{} new rows", new.len()));
            }
            6 => {
                tokio::time::sleep(Duration::from_millis(3)).await;
                let n = inbox
                    .delete_failed(Duration::ZERO, 1000)
                    .await
                    .map_err(|e| e.to_string())?;
                history.push(format!("{n} failed rows deleted"));
            }
            7 | 8 => {
                let open = letters
                    .list(&DeadLetterFilter {
                        open_only: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let ids: Vec<Uuid> = open.iter().filter(|_| rng.bool()).map(|l| l.id).collect();
                let r = letters
                    .replay(&ids, AuditEntry::new("model", "replay"))
                    .await
                    .map_err(|e| e.to_string())?;
                if !r.left.is_empty() || !r.closed.is_empty() || r.replayed.len() != ids.len() {
                    return Err(format!(
                        "step {step}: replay of {} letters: {} replayed, closed {:?}, left {:?}",
                        ids.len(),
                        r.replayed.len(),
                        r.closed,
                        r.left
                    ));
                }
                for l in &r.replayed {
                    let row = inbox
                        .get(l.event_id)
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or(format!(
                            "step {step}: replayed event {} has no row",
                            l.event_id
                        ))?;
                    if (row.status(), row.attempts_made()) != (EventStatus::Pending, 0)
                        || Some(&json!(row.payload())) != payloads.get(&l.event_id)
                    {
                        return Err(format!("step {step}: replayed event came back as {row:?}"));
                    }
                }
                history.push(format!("{} letters replayed", ids.len()));
            }
            _ => {
                let failed = inbox
                    .list(&ListFilter {
                        status: Some(EventStatus::Failed),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let ids: Vec<Uuid> = failed
                    .iter()
                    .filter(|_| rng.bool())
                    .map(|e| e.id())
                    .collect();
                if !ids.is_empty() {
                    store
                        .change_audited(
                            Table::Inbox,
                            AuditedChange::Requeue { ids: &ids },
                            AuditEntry::new("model", "replay"),
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                }
                history.push(format!("{} failed rows requeued", ids.len()));
            }
        }
        check(store, dead_total).await.map_err(|e| {
            format!(
                "after step {step} ({}): {e}\n  {}",
                what,
                history.join("\n  ")
            )
        })?;
    }
    Ok(format!("{} steps, {dead_total} letters", history.len()))
}

async fn check(store: &AnyStore, dead_total: usize) -> Result<(), String> {
    let all = store
        .dead_letters()
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    if all.len() != dead_total {
        return Err(format!("{} letters for {dead_total} failures", all.len()));
    }
    let open: Vec<_> = all.iter().filter(|l| l.replayed_at.is_none()).collect();
    let mut seen = HashSet::new();
    for l in &open {
        if !seen.insert(l.event_id) {
            return Err(format!("two open letters for event {}", l.event_id));
        }
        if let Some(row) = store
            .inbox()
            .get(l.event_id)
            .await
            .map_err(|e| e.to_string())?
            && row.status() != EventStatus::Failed
        {
            return Err(format!(
                "open letter {} but its event is {}",
                l.id,
                row.status()
            ));
        }
    }
    let rows = store
        .inbox()
        .list(&ListFilter {
            status: Some(EventStatus::Failed),
            limit: Some(10_000),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    for row in rows {
        if !seen.contains(&row.id()) {
            return Err(format!("failed row {} has no open letter", row.id()));
        }
    }
    Ok(())
}

async fn run(backend: &str, fresh: impl AsyncFn() -> Option<common::TestDb>) {
    if let Ok(seed) = std::env::var("OMNIBOX_DLQ_SEED") {
        let seed: u64 = seed.parse().expect("OMNIBOX_DLQ_SEED is a number");
        let Some(db) = fresh().await else { return };
        match schedule(&db.store, seed).await {
            Ok(s) => eprintln!("{backend}: seed {seed} passed: {s}"),
            Err(e) => panic!("{backend}: OMNIBOX_DLQ_SEED={seed}: {e}"),
        }
        return;
    }
    let count: u64 = std::env::var("OMNIBOX_DLQ_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let base = fastrand::u64(..);
    eprintln!("{backend}: base seed {base}");
    for i in 0..count {
        let seed = base.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let Some(db) = fresh().await else { return };
        if let Err(e) = schedule(&db.store, seed).await {
            panic!(
                "{backend}: schedule {i} failed: {e}\n  replay: OMNIBOX_DLQ_SEED={seed} cargo nextest run --test dead_letters random_schedules_{backend}"
            );
        }
    }
    eprintln!("{backend}: {count} schedules passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schedules_sqlite() {
    run("sqlite", async || Some(common::sqlite().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schedules_postgres() {
    run("postgres", common::postgres).await;
}

/// A failure's text may quote a remote's reply (a webhook's body echoing
/// the request, a broker's or a database's message): credentials and
/// secret-looking parameters are masked before it reaches the row's
/// `last_error` and the dead letter.
async fn remote_secrets_are_masked(db: common::TestDb) {
    let inbox = db.store.inbox();
    let letters = db.store.dead_letters();
    let mut e = NewInboxEvent::new("m1", "g", "billing", "refund.issued", json!({"n": 1}));
    e.max_attempts = Some(1);
    let e = DomainService::default().create_inbox_event(e).unwrap();
    inbox.insert_many(std::slice::from_ref(&e)).await.unwrap();
    let handler = Arc::new(|_e: InboxEvent| async {
        Outcome::Failed {
            error: "webhook answered 400: bad request to http://user:S3cretUser@hooks.example/x?token=T0kenValue, password=Pa55word".into(),
            retry: Retry::Counted(None),
        }
    });
    let p = ProcessorBuilder::new(
        inbox.clone(),
        HandlerStep::new(handler, 1, Duration::from_secs(5)),
        ProcessorOptions::new(WorkerId::new("p").unwrap()),
    )
    .dead_letter_store(Arc::new(letters.clone()))
    .build();
    let r = p.process_batch().await.unwrap();
    assert_eq!((r.dead, r.dead_lettered), (1, 1), "{r:?}");
    assert_eq!(r.ids.dead, vec![e.id()], "{r:?}");
    assert!(
        r.ids.failed.is_empty() && r.ids.completed.is_empty(),
        "{r:?}"
    );
    let row = inbox.get(e.id()).await.unwrap().unwrap();
    assert_eq!(row.status(), EventStatus::Failed);
    let stored = row.last_error().unwrap().to_string();
    let letter = letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap()
        .pop()
        .unwrap();
    for text in [&stored, &letter.error] {
        for secret in ["S3cretUser", "T0kenValue", "Pa55word"] {
            assert!(!text.contains(secret), "{secret} kept: {text}");
        }
        assert!(text.contains("webhook answered 400"), "{text}");
        assert!(text.contains("user:***@hooks.example"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_secrets_are_masked_sqlite() {
    remote_secrets_are_masked(common::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_secrets_are_masked_postgres() {
    let Some(db) = common::postgres().await else {
        return;
    };
    remote_secrets_are_masked(db).await;
}

/// Every filter of a dead-letter listing, alone and together, on letters of
/// both tables: ids (of the letter or of its event), origin, type, topic,
/// error text, consumer group, time, open only, paging and limit.
async fn letter_filters(db: common::TestDb) {
    use omnibox::pipeline::{DeadLetterStore, Letter};
    let svc = DomainService::default();
    let letters = db.store.dead_letters();
    let order = svc
        .create_outbox_event(omnibox::NewOutboxEvent::new(
            "order",
            Uuid::now_v7(),
            "order.created",
            "orders",
            "order-1",
            json!({"n": 1}),
        ))
        .unwrap();
    let refund = |id: &str, group: &str| {
        svc.create_inbox_event(NewInboxEvent::new(
            id,
            group,
            "billing",
            "refund.issued",
            json!({"n": 2}),
        ))
        .unwrap()
    };
    let (r1, r2) = (refund("m-1", "g1"), refund("m-2", "g2"));
    // A letter is kept only for a row that is failed in its table.
    let outbox = db.store.outbox();
    outbox
        .create_many(std::slice::from_ref(&order))
        .await
        .unwrap();
    let claim = outbox
        .claim(&omnibox::ClaimOptions::new(WorkerId::new("t").unwrap(), 10))
        .await
        .unwrap();
    let dead = [omnibox::Failure::dead(order.id(), "too large")];
    outbox.fail(&claim.token, &dead).await.unwrap();
    let inbox = db.store.inbox();
    inbox.insert_many(&[r1.clone(), r2.clone()]).await.unwrap();
    let claim = inbox
        .claim(&omnibox::ClaimOptions::new(WorkerId::new("t").unwrap(), 10))
        .await
        .unwrap();
    let dead = [
        omnibox::Failure::dead(r1.id(), "timeout"),
        omnibox::Failure::dead(r2.id(), "bad"),
    ];
    inbox.fail(&claim.token, &dead).await.unwrap();
    let before = time::now() - chrono::Duration::seconds(1);
    let put_out = [Letter {
        event: &order,
        error: "broker said: record too large",
    }];
    assert_eq!(DeadLetterStore::put(&letters, &put_out).await.unwrap(), 1);
    let put_in = [
        Letter {
            event: &r1,
            error: "handler: timeout after 5s",
        },
        Letter {
            event: &r2,
            error: "handler: 100% sure it's bad",
        },
    ];
    assert_eq!(DeadLetterStore::put(&letters, &put_in).await.unwrap(), 2);
    let list = |filter: DeadLetterFilter| {
        let letters = letters.clone();
        async move {
            let mut got: Vec<Uuid> = letters
                .list(&filter)
                .await
                .unwrap()
                .iter()
                .map(|l| l.event_id)
                .collect();
            got.sort();
            got
        }
    };
    let sorted = |mut v: Vec<Uuid>| {
        v.sort();
        v
    };
    let letter_of_r2 = letters
        .list(&DeadLetterFilter {
            failures: FailureSelector {
                ids: vec![r2.id()],
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap()[0]
        .clone();
    let ids = |ids| FailureSelector {
        ids,
        ..Default::default()
    };
    let select = |select| FailureSelector {
        select,
        ..Default::default()
    };
    let text = |text: &str| FailureSelector {
        error_contains: Some(text.into()),
        ..Default::default()
    };
    let window = |since, until| FailureSelector {
        window: TimeWindow { since, until },
        ..Default::default()
    };
    let later = time::now() + chrono::Duration::seconds(1);
    let cases = [
        (
            "all",
            FailureSelector::default(),
            vec![order.id(), r1.id(), r2.id()],
        ),
        ("by event", ids(vec![r1.id()]), vec![r1.id()]),
        (
            "by letter",
            ids(vec![letter_of_r2.id, Uuid::now_v7()]),
            vec![r2.id()],
        ),
        (
            "typed",
            select(EventSelector {
                event_type: Some("order.created".into()),
                ..Default::default()
            }),
            vec![order.id()],
        ),
        (
            "topic",
            select(EventSelector {
                topic: Some("billing".into()),
                ..Default::default()
            }),
            vec![r1.id(), r2.id()],
        ),
        // The text is matched literally: `%` and `_` are not patterns.
        ("text", text("100%"), vec![r2.id()]),
        ("no pattern", text("_"), vec![]),
        (
            "group",
            select(EventSelector {
                consumer_group: Some("g1".into()),
                ..Default::default()
            }),
            vec![r1.id()],
        ),
        (
            "in window",
            window(Some(before), Some(later)),
            vec![order.id(), r1.id(), r2.id()],
        ),
        ("later", window(Some(later), None), vec![]),
        ("earlier", window(None, Some(before)), vec![]),
    ];
    for (case, failures, want) in cases {
        let got = list(DeadLetterFilter {
            failures,
            ..Default::default()
        })
        .await;
        assert_eq!(got, sorted(want), "{case}");
    }
    let inbox_only = list(DeadLetterFilter {
        origin: Some(Table::Inbox),
        ..Default::default()
    })
    .await;
    assert_eq!(inbox_only, sorted(vec![r1.id(), r2.id()]));
    let page = letters
        .list(&DeadLetterFilter {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    assert!(page[0].seq < page[1].seq);
    let rest = letters
        .list(&DeadLetterFilter {
            after_seq: Some(page[1].seq),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert!(rest[0].seq > page[1].seq);
    let together = list(DeadLetterFilter {
        failures: FailureSelector {
            error_contains: Some("timeout".into()),
            select: EventSelector {
                event_type: Some("refund.issued".into()),
                consumer_group: Some("g1".into()),
                ..Default::default()
            },
            ..Default::default()
        },
        origin: Some(Table::Inbox),
        open_only: true,
        ..Default::default()
    })
    .await;
    assert_eq!(together, vec![r1.id()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letter_filters_sqlite() {
    letter_filters(common::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letter_filters_postgres() {
    let Some(db) = common::postgres().await else {
        return;
    };
    letter_filters(db).await;
}
