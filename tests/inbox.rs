//! The inbox consumer and processor: exactly-once under redelivery, a crash
//! between storing and committing, handler failures, the ack strategies'
//! commit points, poison messages, and the --exec and --webhook mappings.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omnibox::inbox::{
    AckStrategy, AnyHandler, CommitOn, ConsumeOptions, ExecHandler, HandlerStep, InboxConsumer,
    Polled, RawMessage, Source, WebhookHandler,
};
use omnibox::pipeline::{Outcome, ProcessorBuilder, ProcessorOptions};
use omnibox::store::AnyTable;
use omnibox::{EventStatus, EventStore, InboxEvent, InboxRoute, InboxStore, Retry, WorkerId};
use tokio::sync::watch;

/// Runs a statement on the test database outside the inbox (a business table).
async fn business(db: &common::TestDb, sql: &'static str) {
    match &db.store {
        omnibox::AnyStore::Postgres(s) => {
            sqlx::query(sql).execute(s.pool()).await.unwrap();
        }
        omnibox::AnyStore::Sqlite(s) => {
            sqlx::query(sql).execute(s.pool()).await.unwrap();
        }
        _ => panic!("a new backend"),
    }
}

/// The invoices table, sorted.
async fn business_rows(db: &common::TestDb) -> Vec<(String, String)> {
    let sql = "SELECT message_id, note FROM invoices ORDER BY message_id";
    match &db.store {
        omnibox::AnyStore::Postgres(s) => sqlx::query_as(sql).fetch_all(s.pool()).await.unwrap(),
        omnibox::AnyStore::Sqlite(s) => sqlx::query_as(sql).fetch_all(s.pool()).await.unwrap(),
        _ => panic!("a new backend"),
    }
}

/// Creates the invoices table the transactional handlers write to.
async fn invoices_table(db: &common::TestDb) {
    business(
        db,
        "CREATE TABLE invoices (message_id TEXT PRIMARY KEY, note TEXT NOT NULL)",
    )
    .await;
}

/// Writes one invoice through the inbox's transaction in `cx`.
async fn write_invoice(
    cx: &mut omnibox::inbox::HandlerContext<'_>,
    id: &str,
    note: &str,
) -> Result<(), sqlx::Error> {
    use omnibox::inbox::Tx;
    match cx.tx().await {
        Ok(Tx::Postgres(c)) => sqlx::query("INSERT INTO invoices VALUES ($1, $2)")
            .bind(id)
            .bind(note)
            .execute(c)
            .await
            .map(|_| ()),
        Ok(Tx::Sqlite(c)) => sqlx::query("INSERT INTO invoices VALUES (?, ?)")
            .bind(id)
            .bind(note)
            .execute(c)
            .await
            .map(|_| ()),
        Ok(_) => panic!("a new backend"),
        Err(e) => panic!("no transaction: {e}"),
    }
}

fn detached() -> omnibox::inbox::HandlerContext<'static> {
    omnibox::inbox::HandlerContext::detached(omnibox::inbox::Dependencies::new())
}

fn msg(id: &str, offset: i64, value: &str) -> RawMessage {
    RawMessage {
        topic: "orders".into(),
        partition: 0,
        offset,
        key: Some(id.as_bytes().to_vec()),
        headers: vec![
            ("event_id".into(), id.as_bytes().to_vec()),
            ("event_type".into(), b"order.created".to_vec()),
        ],
        payload: Some(value.as_bytes().to_vec()),
        position_is_identity: true,
        cut: None,
        origin: None,
        defect: None,
    }
}

fn messages(n: usize) -> Vec<RawMessage> {
    (0..n)
        .map(|i| msg(&format!("m-{i}"), i as i64, &format!(r#"{{"n":{i}}}"#)))
        .collect()
}

/// What the source saw when it was asked to commit.
#[derive(Debug, Clone)]
struct CommitSeen {
    through: i64,
    rows: u64,
    completed: u64,
}

/// An in-memory source that records commits with the inbox's state then.
struct VecSource {
    queue: VecDeque<RawMessage>,
    table: AnyTable<InboxRoute>,
    commits: Arc<Mutex<Vec<CommitSeen>>>,
    fail_commits: usize,
}

impl VecSource {
    fn new(
        messages: Vec<RawMessage>,
        table: AnyTable<InboxRoute>,
    ) -> (Self, Arc<Mutex<Vec<CommitSeen>>>) {
        let commits = Arc::new(Mutex::new(Vec::new()));
        (
            VecSource {
                queue: messages.into(),
                table,
                commits: commits.clone(),
                fail_commits: 0,
            },
            commits,
        )
    }
}

impl Source for VecSource {
    fn describe(&self) -> String {
        "memory".into()
    }
    async fn poll(&mut self, max: usize, _wait: Duration) -> omnibox::Result<Polled> {
        let n = max.min(self.queue.len());
        let messages: Vec<RawMessage> = self.queue.drain(..n).collect();
        Ok(Polled {
            end: self.queue.is_empty(),
            messages,
        })
    }
    async fn commit(&mut self, through: &[RawMessage]) -> omnibox::Result<()> {
        if self.fail_commits > 0 {
            self.fail_commits -= 1;
            return Err(omnibox::Error::Config(
                "simulated crash before the offset commit".into(),
            ));
        }
        let c = self.table.counts().await?;
        self.commits.lock().unwrap().push(CommitSeen {
            through: through.iter().map(|m| m.offset).max().unwrap_or(-1),
            rows: c.pending + c.completed + c.failed,
            completed: c.completed,
        });
        Ok(())
    }
    async fn rewind(&mut self, from: &[RawMessage]) -> omnibox::Result<()> {
        for m in from.iter().rev() {
            self.queue.push_front(m.clone());
        }
        Ok(())
    }
}

type Calls = Arc<Mutex<HashMap<String, u32>>>;

/// A handler that counts calls per message id and fails as told.
fn counting(fail: HashMap<String, u32>) -> (Arc<impl omnibox::inbox::Handler>, Calls) {
    let calls: Calls = Arc::new(Mutex::new(HashMap::new()));
    let c = calls.clone();
    let handler = move |e: InboxEvent| {
        let calls = c.clone();
        let fail = fail.clone();
        async move {
            let n = {
                let mut calls = calls.lock().unwrap();
                let n = calls.entry(e.message_id().to_string()).or_insert(0);
                *n += 1;
                *n
            };
            if fail.get(e.message_id()).is_some_and(|&times| n <= times) {
                Outcome::Failed {
                    error: format!("failure {n}"),
                    retry: Retry::Counted(None),
                }
            } else {
                Outcome::Completed
            }
        }
    };
    (Arc::new(handler), calls)
}

/// Stores `messages` in `group`'s inbox with no handler (exactly-once), as
/// `inbox consume` without a handler does: rows for a processor to claim.
async fn store_only(db: &common::TestDb, messages: Vec<RawMessage>, group: &str) {
    let (source, _) = VecSource::new(messages, db.store.inbox());
    let mut o = options(AckStrategy::ExactlyOnce, 10);
    o.group = group.to_string();
    InboxConsumer::<_, AnyHandler>::new(source, db.store.inbox(), None, o)
        .run(true, stop())
        .await
        .unwrap();
}

fn options(ack: AckStrategy, batch: usize) -> ConsumeOptions {
    let mut o = ConsumeOptions::new("billing", WorkerId::new("consumer-1").unwrap());
    o.ack = ack;
    o.batch = batch;
    o
}

fn stop() -> watch::Receiver<bool> {
    watch::channel(false).1
}

/// What a handler saw of one call.
#[derive(Debug, Clone)]
struct Call {
    message_id: String,
    event_id: uuid::Uuid,
    attempts_made: i32,
    /// The row, read through another connection while the handler ran.
    row: Option<InboxEvent>,
}

type Log = Arc<Mutex<Vec<Call>>>;

/// A handler with external effects (no transaction is held while it runs).
struct Outside<F>(F);

impl<F, Fut> omnibox::inbox::Handler for Outside<F>
where
    F: Fn(InboxEvent) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    fn handle(
        &self,
        event: &InboxEvent,
        _cx: &mut omnibox::inbox::HandlerContext<'_>,
    ) -> impl std::future::Future<Output = Outcome> + Send {
        (self.0)(event.clone())
    }

    fn in_transaction(&self) -> bool {
        false
    }
}

/// A handler that logs each call and answers `answer(message id, call number)`.
fn logging<A>(
    table: AnyTable<InboxRoute>,
    answer: A,
) -> (
    impl Fn(InboxEvent) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>
    + Send
    + Sync
    + 'static,
    Log,
)
where
    A: Fn(&str, usize) -> Option<Outcome> + Send + Sync + 'static,
{
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let answer = Arc::new(answer);
    let f = move |e: InboxEvent| {
        let log = l.clone();
        let table = table.clone();
        let answer = answer.clone();
        Box::pin(async move {
            let row = table
                .get_by_message_id(e.message_id(), e.consumer_group())
                .await
                .unwrap();
            let n = {
                let mut log = log.lock().unwrap();
                log.push(Call {
                    message_id: e.message_id().to_string(),
                    event_id: e.id(),
                    attempts_made: e.attempts_made(),
                    row,
                });
                log.iter()
                    .filter(|c| c.message_id == e.message_id())
                    .count()
            };
            match answer(e.message_id(), n) {
                Some(o) => o,
                // Never ends: a process killed while this handler runs.
                None => std::future::pending().await,
            }
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>
    };
    (f, log)
}

fn calls_of(log: &Log, id: &str) -> Vec<Call> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|c| c.message_id == id)
        .cloned()
        .collect()
}

fn fast_backoff(o: &mut ConsumeOptions) {
    o.backoff = omnibox::domain::Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_millis(400),
    };
}

fn counted_failure(n: usize) -> Outcome {
    Outcome::Failed {
        error: format!("failure {n}"),
        retry: Retry::Counted(None),
    }
}

mod cases {
    use super::*;
    use crate::common::TestDb;

    /// The same messages twice: one row each, the handler ran once each.
    pub async fn exactly_once_under_redelivery(db: &TestDb) {
        let mut all = messages(200);
        all.extend(messages(200).into_iter().step_by(2)); // 100 redeliveries
        let (source, commits) = VecSource::new(all, db.store.inbox());
        let (handler, calls) = counting(HashMap::new());
        let mut consumer = InboxConsumer::new(
            source,
            db.store.inbox(),
            Some(handler),
            options(AckStrategy::ExactlyOnce, 64),
        );
        let r = consumer.run(true, stop()).await.unwrap();
        assert_eq!(
            (r.consumed, r.stored, r.duplicates, r.processed),
            (300, 200, 100, 200)
        );
        {
            let calls = calls.lock().unwrap();
            assert_eq!(calls.len(), 200);
            assert!(calls.values().all(|&n| n == 1), "a handler ran twice");
        }
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!((c.completed, c.pending), (200, 0));
        let seen = commits.lock().unwrap();
        assert!(
            seen.iter().all(|s| s.completed == s.rows),
            "offsets committed only after the rows completed"
        );
        assert_eq!(seen.len(), 5, "300 messages in batches of 64");
        assert_eq!(
            seen.last().unwrap().through,
            198,
            "the redeliveries (offsets 0, 2, ... 198) were committed too"
        );
    }

    /// The process dies after the transaction commits and before the offset
    /// commit: on restart the messages come again, nothing runs twice, nothing is lost.
    pub async fn crash_between_store_and_commit(db: &TestDb) {
        let (handler, calls) = counting(HashMap::new());
        let (mut source, _) = VecSource::new(messages(50), db.store.inbox());
        source.fail_commits = 1;
        let mut consumer = InboxConsumer::new(
            source,
            db.store.inbox(),
            Some(handler.clone()),
            options(AckStrategy::ExactlyOnce, 50),
        );
        let err = consumer.run(true, stop()).await.unwrap_err();
        assert!(err.to_string().contains("simulated crash"));
        assert_eq!(
            db.store.inbox().counts().await.unwrap().completed,
            50,
            "the transaction had committed"
        );
        // Restart: the broker redelivers from the last committed offset (all of it).
        let (source, commits) = VecSource::new(messages(50), db.store.inbox());
        let mut consumer = InboxConsumer::new(
            source,
            db.store.inbox(),
            Some(handler),
            options(AckStrategy::ExactlyOnce, 50),
        );
        let r = consumer.run(true, stop()).await.unwrap();
        assert_eq!((r.duplicates, r.stored, r.processed), (50, 0, 0));
        assert!(
            calls.lock().unwrap().values().all(|&n| n == 1),
            "no duplicate effect"
        );
        assert_eq!(
            commits.lock().unwrap().last().unwrap().through,
            49,
            "committed now"
        );
    }

    /// A handler failure under exactly-once: not committed, delivered again,
    /// completed once the handler succeeds.
    pub async fn handler_failure_is_redelivered_until_it_succeeds(db: &TestDb) {
        let (handler, calls) = counting(HashMap::from([("m-3".to_string(), 2)]));
        let (source, commits) = VecSource::new(messages(10), db.store.inbox());
        let mut o = options(AckStrategy::ExactlyOnce, 10);
        fast_backoff(&mut o);
        let mut consumer = InboxConsumer::new(source, db.store.inbox(), Some(handler), o);
        let started = std::time::Instant::now();
        let r = consumer.run(true, stop()).await.unwrap();
        // Redelivery waits for the backoff (at least half of 100 ms, then
        // of 200 ms): it does not hammer.
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(r.failed, 2);
        assert!(
            r.redelivered >= 2 * 7,
            "m-3 and the messages after it came again: {r:?}"
        );
        {
            let calls = calls.lock().unwrap();
            assert_eq!(calls["m-3"], 3);
            assert_eq!(
                calls["m-2"], 1,
                "messages before the failure were not handled again"
            );
            assert_eq!(
                calls["m-9"], 1,
                "messages after it were rolled back before their handler ran"
            );
        }
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!((c.completed, c.pending, c.failed), (10, 0, 0));
        let seen = commits.lock().unwrap().clone();
        assert_eq!(
            seen[0].through, 2,
            "committed only up to the message before the failure"
        );
        // The failures were written to the row (pending, attempts counted)
        // before anything was committed past it.
        assert!(seen.iter().all(|s| s.rows >= s.completed));
        let row = db
            .store
            .inbox()
            .get_by_message_id("m-3", "billing")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (row.status(), row.attempts_made()),
            (EventStatus::Completed, 2)
        );
    }

    #[derive(Debug)]
    pub struct Note(pub &'static str);

    /// A handler writing one invoice per message through the inbox's
    /// transaction; m-3 fails twice after writing.
    fn invoice_writer(runs: Arc<Mutex<HashMap<String, u32>>>) -> Arc<impl omnibox::inbox::Handler> {
        use omnibox::inbox::tx_handler;
        let seen = runs;
        Arc::new(tx_handler(move |event, cx| {
            let runs = seen.clone();
            Box::pin(async move {
                let run = {
                    let mut r = runs.lock().unwrap();
                    let n = r.entry(event.message_id().to_string()).or_default();
                    *n += 1;
                    *n
                };
                let note = cx.dep::<Note>().map_or("none", |n| n.0).to_string();
                let id = event.message_id().to_string();
                let written = write_invoice(cx, &id, &note).await;
                if let Err(e) = written {
                    return Outcome::Failed {
                        error: e.to_string(),
                        retry: omnibox::Retry::Counted(None),
                    };
                }
                // m-3 fails after writing, twice: its writes must not stay.
                if id == "m-3" && run <= 2 {
                    return Outcome::Failed {
                        error: format!("run {run} fails"),
                        retry: omnibox::Retry::Counted(None),
                    };
                }
                Outcome::Completed
            })
        }))
    }

    /// A handler that writes business rows through the inbox's transaction:
    /// its writes commit with the row's completion, and a failing run's
    /// writes are rolled back (the retry writes again, once); dependencies
    /// reach the handler.
    pub async fn handler_writes_commit_or_roll_back_with_the_row(db: &TestDb) {
        use omnibox::inbox::Dependencies;
        invoices_table(db).await;
        let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let handler = invoice_writer(runs.clone());
        let (source, _) = VecSource::new(messages(10), db.store.inbox());
        let mut o = options(AckStrategy::ExactlyOnce, 10);
        fast_backoff(&mut o);
        let mut consumer = InboxConsumer::new(source, db.store.inbox(), Some(handler), o)
            .with_dependencies(Dependencies::new().with(Note("via deps")));
        let r = consumer.run(true, stop()).await.unwrap();
        assert_eq!((r.processed, r.failed), (10, 2), "{r:?}");
        assert_eq!(runs.lock().unwrap()["m-3"], 3);
        let rows = business_rows(db).await;
        assert_eq!(rows.len(), 10, "one invoice per message: {rows:?}");
        assert!(rows.iter().all(|(_, note)| note == "via deps"), "{rows:?}");
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!((c.completed, c.pending, c.failed), (10, 0, 0));
    }

    /// Handlers may return `Result<(), E>` (`Err`: a counted failure with
    /// the error's text) or nothing (completed), as well as an `Outcome`.
    pub async fn handlers_may_return_a_result_or_nothing(db: &TestDb) {
        let tries: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let seen = tries.clone();
        let handler = Arc::new(move |e: InboxEvent| {
            let tries = seen.clone();
            async move {
                let id = e.message_id().to_string();
                let n = {
                    let mut t = tries.lock().unwrap();
                    let n = t.entry(id.clone()).or_default();
                    *n += 1;
                    *n
                };
                if id == "m-1" && n == 1 {
                    return Err(format!("ledger said no to {id}"));
                }
                Ok(())
            }
        });
        let (source, _) = VecSource::new(messages(3), db.store.inbox());
        let mut o = options(AckStrategy::ExactlyOnce, 10);
        fast_backoff(&mut o);
        let mut consumer = InboxConsumer::new(source, db.store.inbox(), Some(handler), o);
        let r = consumer.run(true, stop()).await.unwrap();
        assert_eq!(r.failed, 1, "{r:?}");
        let row = db
            .store
            .inbox()
            .get_by_message_id("m-1", "billing")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (row.status(), row.attempts_made()),
            (EventStatus::Completed, 1)
        );
        assert_eq!(tries.lock().unwrap()["m-1"], 2);
        // Returning nothing: completed.
        let (source, _) = VecSource::new(vec![msg("n-0", 10, r#"{"n":0}"#)], db.store.inbox());
        let handler = Arc::new(|_e: InboxEvent| async {});
        let mut consumer = InboxConsumer::new(
            source,
            db.store.inbox(),
            Some(handler),
            options(AckStrategy::ExactlyOnce, 10),
        );
        consumer.run(true, stop()).await.unwrap();
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!((c.completed, c.failed, c.pending), (4, 0, 0));
    }

    /// A handler in the inbox's transaction that writes, then panics on
    /// m-1 (an `unwrap` on unexpected input, say): each panic is a counted
    /// failure with its message, its writes are rolled back with its
    /// savepoint, the consumer goes on, and after the last attempt the
    /// row is failed. Nothing unwinds out of `run`.
    pub async fn a_panicking_handler_is_a_counted_failure(db: &TestDb) {
        use omnibox::inbox::tx_handler;
        invoices_table(db).await;
        let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let seen = calls.clone();
        let handler = Arc::new(tx_handler(move |event, cx| {
            let calls = seen.clone();
            Box::pin(async move {
                let id = event.message_id().to_string();
                *calls.lock().unwrap().entry(id.clone()).or_default() += 1;
                write_invoice(cx, &id, "x").await.unwrap();
                let n: usize = id.trim_start_matches("m-").parse().unwrap();
                assert!(n != 1, "index out of range for {id}");
                Outcome::Completed
            })
        }));
        let (source, _) = VecSource::new(messages(3), db.store.inbox());
        let mut o = options(AckStrategy::ExactlyOnce, 10);
        fast_backoff(&mut o);
        let mut consumer = InboxConsumer::new(source, db.store.inbox(), Some(handler), o);
        let r = consumer.run(true, stop()).await.unwrap();
        let row = db
            .store
            .inbox()
            .get_by_message_id("m-1", "billing")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.status(), EventStatus::Failed, "{r:?}");
        assert_eq!(row.attempts_made(), row.max_attempts());
        assert_eq!(calls.lock().unwrap()["m-1"], row.max_attempts() as u32);
        assert_eq!(calls.lock().unwrap()["m-2"], 1);
        assert_eq!(
            row.last_error(),
            Some("handler panicked: index out of range for m-1")
        );
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!((c.completed, c.failed, c.pending), (2, 1, 0));
        let rows: Vec<String> = business_rows(db)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            rows,
            vec!["m-0", "m-2"],
            "the panicking runs' writes were rolled back"
        );
    }

    /// A handler that panics on m-1, under every ack strategy and outside
    /// the inbox's transaction: each panic is a counted failure with its
    /// message on the row, the consumer goes on with m-2, and nothing
    /// unwinds out of `run`.
    pub async fn a_panicking_handler_is_a_failure_under_every_strategy(db: &TestDb) {
        let strategies = [
            ("at-most-once", AckStrategy::AtMostOnce),
            ("on-persist", AckStrategy::AtLeastOnce(CommitOn::Persist)),
            ("on-success", AckStrategy::AtLeastOnce(CommitOn::Success)),
            ("exactly-once", AckStrategy::ExactlyOnce),
        ];
        for (group, ack) in strategies {
            let handler = Arc::new(Outside(|e: InboxEvent| async move {
                let parts: Vec<&str> = e.message_id().split('-').collect();
                let n: usize = parts[1].parse().unwrap();
                assert!(n != 1, "unexpected input in {}", e.message_id());
                Outcome::Completed
            }));
            let (source, _) = VecSource::new(messages(3), db.store.inbox());
            let mut o = options(ack, 1);
            o.group = group.to_string();
            fast_backoff(&mut o);
            let r = InboxConsumer::new(source, db.store.inbox(), Some(handler), o)
                .run(true, stop())
                .await
                .unwrap_or_else(|e| panic!("{group}: {e}"));
            let row = |m: &'static str| async move {
                db.store
                    .inbox()
                    .get_by_message_id(m, group)
                    .await
                    .unwrap()
                    .unwrap()
            };
            let failed = row("m-1").await;
            assert_eq!(
                failed.last_error(),
                Some("handler panicked: unexpected input in m-1"),
                "{group}: {r:?}"
            );
            // Exactly-once redelivers it until its attempts are spent; the
            // others leave it pending for `inbox process`.
            if group == "exactly-once" {
                assert_eq!(failed.status(), EventStatus::Failed, "{failed:?}");
            } else {
                assert_eq!(
                    (failed.status(), failed.attempts_made()),
                    (EventStatus::Pending, 1),
                    "{group}: {failed:?}"
                );
            }
            for m in ["m-0", "m-2"] {
                assert_eq!(
                    row(m).await.status(),
                    EventStatus::Completed,
                    "{group} {m}: {r:?}"
                );
            }
        }
    }

    /// `inbox process` in the library: a handler that panics (in its own
    /// transaction or without one) is a counted failure of its event with
    /// the panic's message; a step that panics fails its batch the same
    /// way; the processor goes on.
    pub async fn a_panicking_handler_or_step_in_process_is_a_failure(db: &TestDb) {
        use omnibox::pipeline::{Step, StepExt};
        struct Explodes;
        impl Step<InboxRoute> for Explodes {
            async fn before_event(&self, event: &InboxEvent) -> Option<Outcome> {
                assert!(event.message_id() != "m-0", "a step bug");
                None
            }
        }
        for group in ["in-tx", "detached", "step"] {
            store_only(db, messages(3), group).await;
            let handler = Arc::new(|e: InboxEvent| async move {
                assert!(e.message_id() != "m-1", "bad input in {}", e.message_id());
                Outcome::Completed
            });
            let mut o = ProcessorOptions::new(WorkerId::new("p1").unwrap());
            o.filters.consumer_groups = vec![group.to_string()];
            let step = HandlerStep::new(handler, 2, Duration::from_secs(5));
            let r = match group {
                "in-tx" => {
                    let step = step.in_transactions(db.store.inbox());
                    ProcessorBuilder::new(db.store.inbox(), step, o)
                        .build()
                        .process_batch()
                        .await
                }
                "detached" => {
                    ProcessorBuilder::new(db.store.inbox(), step, o)
                        .build()
                        .process_batch()
                        .await
                }
                _ => {
                    let step = step.with_step(Explodes);
                    ProcessorBuilder::new(db.store.inbox(), step, o)
                        .build()
                        .process_batch()
                        .await
                }
            }
            .unwrap_or_else(|e| panic!("{group}: {e}"));
            let row = |m: &'static str| async move {
                db.store
                    .inbox()
                    .get_by_message_id(m, group)
                    .await
                    .unwrap()
                    .unwrap()
            };
            if group == "step" {
                assert_eq!((r.claimed, r.failed, r.completed), (3, 3, 0), "{r:?}");
                let e = row("m-2").await;
                assert!(
                    e.last_error()
                        .is_some_and(|m| m.starts_with("handler panicked: a step bug")),
                    "{e:?}"
                );
                continue;
            }
            assert_eq!(
                (r.claimed, r.failed, r.completed),
                (3, 1, 2),
                "{group}: {r:?}"
            );
            let e = row("m-1").await;
            assert_eq!(
                (e.status(), e.attempts_made(), e.last_error()),
                (
                    EventStatus::Pending,
                    1,
                    Some("handler panicked: bad input in m-1")
                ),
                "{group}"
            );
        }
    }

    /// `inbox process` in the library: with `HandlerStep::in_transactions`
    /// each handler writes in a transaction of its own that also marks the
    /// row completed; a failing run's writes are rolled back; the processor
    /// writes nothing more for those rows and reports no lease lost.
    pub async fn process_handlers_write_with_the_row(db: &TestDb) {
        use omnibox::inbox::Dependencies;
        invoices_table(db).await;
        store_only(db, messages(10), "billing").await;
        let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let step = HandlerStep::new(invoice_writer(runs.clone()), 4, Duration::from_secs(10))
            .with_dependencies(Dependencies::new().with(Note("in process")))
            .in_transactions(db.store.inbox());
        let mut o = ProcessorOptions::new(WorkerId::new("p1").unwrap());
        o.backoff = omnibox::domain::Backoff {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(40),
        };
        let p = ProcessorBuilder::new(db.store.inbox(), step, o).build();
        let (mut completed, mut failed, mut lost) = (0, 0, 0);
        for _ in 0..100 {
            let r = p.process_batch().await.unwrap();
            completed += r.completed;
            failed += r.failed;
            lost += r.lease_lost;
            if db.store.inbox().counts().await.unwrap().completed == 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!((completed, failed, lost), (10, 2, 0));
        assert_eq!(runs.lock().unwrap()["m-3"], 3);
        let rows = business_rows(db).await;
        assert_eq!(rows.len(), 10, "one invoice per message: {rows:?}");
        assert!(
            rows.iter().all(|(_, note)| note == "in process"),
            "{rows:?}"
        );
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!((c.completed, c.pending, c.failed, c.locked), (10, 0, 0, 0));
        // Without the table, the same handler gets no transaction.
        let mut cx = omnibox::inbox::HandlerContext::detached(Dependencies::new());
        assert!(cx.tx().await.is_err());
    }

    /// A service's own message format through a custom `EnvelopeParser`
    /// (id, type and payload from its own fields; unreadable messages still
    /// stored, as poison), and a custom `DomainService` (its default
    /// `max_attempts` and payload limit apply to the rows).
    pub async fn custom_parser_and_domain(db: &TestDb) {
        use omnibox::inbox::{EnvelopeParser, Normalized};
        use omnibox::{DomainService, Limits, NewInboxEvent};
        struct Invoices;
        impl EnvelopeParser for Invoices {
            fn parse(&self, domain: &DomainService, raw: &RawMessage, group: &str) -> Normalized {
                let value: serde_json::Value =
                    serde_json::from_slice(raw.payload.as_deref().unwrap_or_default())
                        .unwrap_or_default();
                let (Some(kind), Some(id)) = (value["kind"].as_str(), value["id"].as_str()) else {
                    return Normalized::poison(domain, raw, group, "no kind or id");
                };
                let body = value["body"].clone();
                match domain
                    .create_inbox_event(NewInboxEvent::new(id, group, "invoices", kind, body))
                {
                    Ok(e) => Normalized::Event(Box::new(e)),
                    Err(e) => Normalized::poison(domain, raw, group, &e.to_string()),
                }
            }
        }
        let msg = |i: i64, value: &str| RawMessage {
            topic: "invoices-v2".into(),
            partition: 0,
            offset: i,
            key: None,
            headers: Vec::new(),
            payload: Some(value.as_bytes().to_vec()),
            position_is_identity: true,
            cut: None,
            origin: None,
            defect: None,
        };
        let big = format!(
            r#"{{"kind":"invoice.paid","id":"inv-3","body":{{"pad":"{}"}}}}"#,
            "x".repeat(300)
        );
        let rows = vec![
            msg(
                0,
                r#"{"kind":"invoice.paid","id":"inv-1","body":{"cents":100}}"#,
            ),
            msg(1, r#"{"id":"inv-2"}"#),
            msg(2, &big),
        ];
        let (source, _) = VecSource::new(rows, db.store.inbox());
        let limits = Limits {
            max_attempts: 2,
            payload_max_bytes: 200,
            ..Limits::default()
        };
        let mut consumer = InboxConsumer::<_, AnyHandler>::new(
            source,
            db.store.inbox(),
            None,
            options(AckStrategy::ExactlyOnce, 10),
        )
        .with_parser(Invoices)
        .with_domain(DomainService::new(
            limits,
            omnibox::domain::Backoff::default(),
        ));
        let r = consumer.run(true, stop()).await.unwrap();
        assert_eq!((r.stored, r.poison), (3, 2), "{r:?}");
        let inbox = db.store.inbox();
        let ok = inbox
            .get_by_message_id("inv-1", "billing")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (ok.event_type(), ok.source(), ok.max_attempts()),
            ("invoice.paid", "invoices", 2)
        );
        assert_eq!(ok.payload()["cents"], 100);
        let c = inbox.counts().await.unwrap();
        assert_eq!(
            (c.pending, c.failed),
            (1, 2),
            "the unreadable and the oversized one"
        );
    }

    /// A custom `Step` around the processor's handler sees the batch first
    /// and may change outcomes: here failures of one event type become
    /// skips, and a second, outer step sees the changed outcome.
    pub async fn steps_see_and_change_outcomes(db: &TestDb) {
        use omnibox::pipeline::{Step, StepExt};
        #[derive(Default)]
        struct Forgive(Mutex<Vec<String>>);
        impl Step<InboxRoute> for Forgive {
            async fn before_batch(&self, events: &[InboxEvent]) {
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("before {}", events.len()));
            }
            async fn after_event(&self, event: &InboxEvent, outcome: &mut Outcome) {
                if event.message_id() == "m-1" && matches!(outcome, Outcome::Failed { .. }) {
                    *outcome = Outcome::Skipped;
                }
            }
        }
        #[derive(Default)]
        struct Tally(Mutex<Vec<String>>);
        impl Step<InboxRoute> for Tally {
            async fn after_batch(&self, _: &[InboxEvent], outcomes: &[Outcome]) {
                let skipped = outcomes.iter().filter(|o| **o == Outcome::Skipped).count();
                self.0.lock().unwrap().push(format!("skipped {skipped}"));
            }
        }
        store_only(db, messages(3), "billing").await;
        let handler = Arc::new(|e: InboxEvent| async move {
            if e.message_id() == "m-1" {
                counted_failure(1)
            } else {
                Outcome::Completed
            }
        });
        let forgive = Arc::new(Forgive::default());
        let tally = Arc::new(Tally::default());
        let step = HandlerStep::new(handler, 2, Duration::from_secs(5))
            .with_step(forgive.clone())
            .with_step(tally.clone());
        let p = ProcessorBuilder::new(
            db.store.inbox(),
            step,
            ProcessorOptions::new(WorkerId::new("p1").unwrap()),
        )
        .build();
        let r = p.process_batch().await.unwrap();
        assert_eq!((r.completed, r.skipped, r.failed), (2, 1, 0), "{r:?}");
        assert_eq!(*forgive.0.lock().unwrap(), vec!["before 3"]);
        assert_eq!(*tally.0.lock().unwrap(), vec!["skipped 1"]);
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!((c.completed, c.pending), (3, 0));
    }

    /// A step before the handler decides some events itself: m-0 is
    /// filtered out (skipped), m-1 routed elsewhere (completed), m-2 held
    /// for later (a transient failure); the handler sees only m-3 and m-4.
    pub async fn a_step_before_the_handler_filters_and_routes(db: &TestDb) {
        use omnibox::pipeline::{Step, StepExt};
        #[derive(Default)]
        struct Gate(Mutex<Vec<String>>);
        impl Step<InboxRoute> for Gate {
            async fn before_event(&self, event: &InboxEvent) -> Option<Outcome> {
                match event.message_id() {
                    "m-0" => Some(Outcome::Skipped),
                    "m-1" => {
                        self.0.lock().unwrap().push(event.message_id().into());
                        Some(Outcome::Completed)
                    }
                    "m-2" => Some(Outcome::Failed {
                        error: "held for later".into(),
                        retry: Retry::NotCounted(omnibox::time::now() + chrono::Duration::hours(1)),
                    }),
                    _ => None,
                }
            }
        }
        store_only(db, messages(5), "billing").await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let handler = Arc::new(move |e: InboxEvent| {
            log.lock().unwrap().push(e.message_id().to_string());
            async { Outcome::Completed }
        });
        let gate = Arc::new(Gate::default());
        let p = ProcessorBuilder::new(
            db.store.inbox(),
            HandlerStep::new(handler, 2, Duration::from_secs(5)).with_step(gate.clone()),
            ProcessorOptions::new(WorkerId::new("p1").unwrap()),
        )
        .build();
        let r = p.process_batch().await.unwrap();
        assert_eq!(
            (r.completed, r.skipped, r.failed, r.transient),
            (3, 1, 0, 1),
            "{r:?}"
        );
        let mut handled = seen.lock().unwrap().clone();
        handled.sort();
        assert_eq!(
            handled,
            vec!["m-3", "m-4"],
            "the handler saw only what the step left it"
        );
        // The report names the events of each outcome.
        let mut id = std::collections::HashMap::new();
        for m in ["m-0", "m-1", "m-2", "m-3", "m-4"] {
            let row = db
                .store
                .inbox()
                .get_by_message_id(m, "billing")
                .await
                .unwrap();
            id.insert(m, row.unwrap().id());
        }
        assert_eq!(r.ids.completed, vec![id["m-1"], id["m-3"], id["m-4"]]);
        assert_eq!(r.ids.skipped, vec![id["m-0"]]);
        assert_eq!(r.ids.transient, vec![id["m-2"]]);
        assert!(r.ids.failed.is_empty() && r.ids.dead.is_empty() && r.ids.lease_lost.is_empty());
        assert_eq!(*gate.0.lock().unwrap(), vec!["m-1"]);
        let held = db
            .store
            .inbox()
            .get_by_message_id("m-2", "billing")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (held.status(), held.attempts_made(), held.last_error()),
            (EventStatus::Pending, 0, Some("held for later"))
        );
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!((c.completed, c.pending), (4, 1));
    }

    /// `process_one` consumes one message per call, for a service that
    /// drives the loop itself: a new message is stored, handled and
    /// committed; the same message again is a duplicate (not handled); a
    /// message that cannot be parsed is poison; a failing handler's message
    /// is not committed; an empty source gives nothing.
    pub async fn process_one_consumes_one_message_at_a_time(db: &TestDb) {
        let mut fail = HashMap::new();
        fail.insert("m-2".to_string(), 1);
        let (handler, calls) = counting(fail);
        let input = vec![
            msg("m-0", 0, r#"{"n":0}"#),
            msg("m-0", 1, r#"{"n":0}"#),
            msg("m-1", 2, "not json"),
            msg("m-2", 3, r#"{"n":2}"#),
        ];
        let (source, commits) = VecSource::new(input, db.store.inbox());
        let mut consumer = InboxConsumer::new(
            source,
            db.store.inbox(),
            Some(handler),
            options(AckStrategy::ExactlyOnce, 10),
        );
        let first = consumer.process_one().await.unwrap().expect("a message");
        assert_eq!(first.message_id, "m-0");
        assert!(
            first.processed && first.committed && !first.duplicate && !first.poison,
            "{first:?}"
        );
        let row = db.store.inbox().get(first.event_id).await.unwrap().unwrap();
        assert_eq!(row.status(), EventStatus::Completed);
        let again = consumer.process_one().await.unwrap().expect("a message");
        assert_eq!(again.event_id, first.event_id);
        assert!(
            again.duplicate && again.committed && !again.processed,
            "{again:?}"
        );
        let poison = consumer.process_one().await.unwrap().expect("a message");
        assert!(
            poison.poison && poison.committed && !poison.processed,
            "{poison:?}"
        );
        let failing = consumer.process_one().await.unwrap().expect("a message");
        assert_eq!(failing.message_id, "m-2");
        assert!(!failing.processed && !failing.committed, "{failing:?}");
        assert_eq!(failing.report.retrying, 1, "{failing:?}");
        assert_eq!(
            calls.lock().unwrap().get("m-0"),
            Some(&1),
            "m-0 was handled once"
        );
        let through: Vec<i64> = commits.lock().unwrap().iter().map(|c| c.through).collect();
        assert_eq!(
            through,
            vec![0, 1, 2],
            "the failed message was not committed"
        );
        // m-2 waits for its retry: the consumer is paused, nothing comes,
        // and the source has not ended (m-2 comes again).
        assert!(consumer.process_one().await.unwrap().is_none());
        assert!(!consumer.source_ended());
    }

    /// `process_one` whose commit to the source fails gives the message
    /// back: the next call takes the same message (now a duplicate: stored
    /// and handled once), not the one after it, so nothing is committed
    /// past a message that was not.
    pub async fn process_one_gives_back_a_message_it_could_not_finish(db: &TestDb) {
        let (handler, calls) = counting(HashMap::new());
        let (mut source, commits) = VecSource::new(messages(2), db.store.inbox());
        source.fail_commits = 1;
        let mut consumer = InboxConsumer::new(
            source,
            db.store.inbox(),
            Some(handler),
            options(AckStrategy::ExactlyOnce, 10),
        );
        let err = consumer.process_one().await.unwrap_err();
        assert!(err.to_string().contains("simulated crash"), "{err}");
        let again = consumer.process_one().await.unwrap().expect("a message");
        assert_eq!(again.message_id, "m-0", "the same message comes again");
        assert!(again.duplicate && again.committed, "{again:?}");
        let next = consumer.process_one().await.unwrap().expect("a message");
        assert_eq!(next.message_id, "m-1");
        assert!(!consumer.source_ended());
        assert!(consumer.process_one().await.unwrap().is_none());
        assert!(consumer.source_ended(), "nothing is left in the source");
        assert_eq!(calls.lock().unwrap().get("m-0"), Some(&1), "handled once");
        let through: Vec<i64> = commits.lock().unwrap().iter().map(|c| c.through).collect();
        assert_eq!(through, vec![0, 1]);
    }

    /// A service spawns consumers as tasks: two over JSON lines files, in
    /// two groups, with a handler, run to the end of their input on
    /// `tokio::spawn` and joined.
    pub async fn spawned_consumers_run_as_tasks(db: &TestDb) {
        let dir = tempfile::tempdir().unwrap();
        let mut tasks = Vec::new();
        for group in ["spawned-a", "spawned-b"] {
            let path = dir.path().join(format!("{group}.jsonl"));
            let lines: Vec<String> = (0..3)
                .map(|i| {
                    serde_json::json!({
                        "topic": "orders",
                        "headers": {"event_id": format!("m-{i}"), "event_type": "order.created"},
                        "value": {"n": i},
                    })
                    .to_string()
                })
                .collect();
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            let source = omnibox::inbox::FileSource::open(&path.display().to_string(), false)
                .await
                .unwrap();
            let handler = Arc::new(|_: InboxEvent| async {});
            let mut o = options(AckStrategy::ExactlyOnce, 10);
            o.group = group.to_string();
            let mut consumer = InboxConsumer::new(source, db.store.inbox(), Some(handler), o);
            tasks.push(tokio::spawn(
                async move { consumer.run(true, stop()).await },
            ));
        }
        for task in tasks {
            let report = task.await.expect("the task ran").expect("the consumer ran");
            assert_eq!((report.consumed, report.processed), (3, 3), "{report:?}");
        }
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!((c.completed, c.pending, c.failed), (6, 0, 0));
    }

    /// A file is read ahead (its next batch is read and parsed while the
    /// last one is stored: exactly-once without a handler): across many
    /// small batches every message is stored once, in the file's order,
    /// with its redeliveries counted as duplicates and its poison kept
    /// (stored, and counted as poison too).
    pub async fn a_file_read_ahead_stores_every_line_once_in_order(db: &TestDb) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ahead.jsonl");
        let line = |i: usize| {
            serde_json::json!({
                "topic": "orders",
                "headers": {"event_id": format!("m-{i}"), "event_type": "order.created"},
                "value": {"n": i},
            })
            .to_string()
        };
        let mut lines = Vec::new();
        for i in 0..60 {
            lines.push(line(i));
            if i % 4 == 3 {
                lines.push(line(i / 2)); // delivered again
            }
            if i % 25 == 24 {
                lines.push(format!("not json {i}"));
            }
        }
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let source = omnibox::inbox::FileSource::open(&path.display().to_string(), false)
            .await
            .unwrap();
        let report = InboxConsumer::<_, AnyHandler>::new(
            source,
            db.store.inbox(),
            None,
            options(AckStrategy::ExactlyOnce, 7),
        )
        .run(true, stop())
        .await
        .unwrap();
        assert_eq!(report.consumed, lines.len() as u64, "{report:?}");
        assert_eq!(
            (report.stored, report.duplicates, report.poison),
            (62, 15, 2),
            "{report:?}"
        );
        let mut rows = db
            .store
            .inbox()
            .list(&omnibox::store::ListFilter::default())
            .await
            .unwrap();
        rows.sort_by_key(|r| r.seq());
        let stored: Vec<&str> = rows
            .iter()
            .map(|r| r.message_id())
            .filter(|id| id.starts_with("m-"))
            .collect();
        let expected: Vec<String> = (0..60).map(|i| format!("m-{i}")).collect();
        assert_eq!(stored, expected, "every message once, in the file's order");
        assert_eq!(rows.len(), 62, "the two poison lines are kept");
    }

    /// A service's own metrics back end (`MetricsRecorder`) gets the
    /// consumer's counters and each written batch with every outcome.
    pub async fn a_custom_metrics_backend_is_fed(db: &TestDb) {
        use omnibox::metrics::{EventOutcome, MetricsRecorder};
        use omnibox::pipeline::BatchReport;
        #[derive(Default)]
        struct Seen(Mutex<Vec<String>>);
        impl MetricsRecorder for Seen {
            fn batch(
                &self,
                table: omnibox::Table,
                report: &BatchReport,
                events: &[EventOutcome<'_>],
            ) {
                let done = events
                    .iter()
                    .filter(|e| matches!(e.outcome, Outcome::Completed))
                    .count();
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("{table} batch {} done {done}", report.claimed));
            }
            fn count(&self, name: &str, n: u64) {
                self.0.lock().unwrap().push(format!("{name} {n}"));
            }
        }
        let seen = Arc::new(Seen::default());
        let (source, _) = VecSource::new(messages(4), db.store.inbox());
        InboxConsumer::<_, AnyHandler>::new(
            source,
            db.store.inbox(),
            None,
            options(AckStrategy::ExactlyOnce, 10),
        )
        .metrics(seen.clone())
        .run(true, stop())
        .await
        .unwrap();
        let handler = Arc::new(|_: InboxEvent| async { Outcome::Completed });
        let p = ProcessorBuilder::new(
            db.store.inbox(),
            HandlerStep::new(handler, 2, Duration::from_secs(5)),
            ProcessorOptions::new(WorkerId::new("p1").unwrap()),
        )
        .metrics(seen.clone())
        .build();
        p.process_batch().await.unwrap();
        let seen = seen.0.lock().unwrap().clone();
        assert!(seen.contains(&"stored 4".to_string()), "{seen:?}");
        assert!(
            seen.contains(&"inbox batch 4 done 4".to_string()),
            "{seen:?}"
        );
    }

    /// The Prometheus metrics see every handler: the consumer's failures by
    /// kind and the time of each handler run (consumer and processor), and
    /// the rows the last claim locked.
    pub async fn prometheus_metrics_cover_handlers(db: &TestDb) {
        let metrics = Arc::new(omnibox::metrics::Metrics::new());
        let mut fail = HashMap::new();
        fail.insert("m-1".to_string(), 1);
        let (handler, _) = counting(fail);
        let (source, _) = VecSource::new(messages(2), db.store.inbox());
        let mut consumer = InboxConsumer::new(
            source,
            db.store.inbox(),
            Some(handler),
            options(AckStrategy::ExactlyOnce, 10),
        )
        .metrics(metrics.clone());
        let done = consumer.process_one().await.unwrap().unwrap();
        assert!(done.processed, "{done:?}");
        let failed = consumer.process_one().await.unwrap().unwrap();
        assert_eq!(failed.report.retrying, 1, "{failed:?}");
        let text = metrics.render();
        let line = |prefix: &str| -> Option<String> {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .map(str::to_string)
        };
        assert_eq!(
            line("omnibox_events_failed_total{table=\"inbox\",event_type=\"order.created\",kind=\"counted\"}")
                .as_deref()
                .and_then(|l| l.rsplit(' ').next()),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            line("omnibox_handler_duration_seconds_count{table=\"inbox\",event_type=\"order.created\"}")
                .as_deref()
                .and_then(|l| l.rsplit(' ').next()),
            Some("2"),
            "{text}"
        );

        // The processor's handler step reports its handler's time too.
        let (source, _) = VecSource::new(
            (2..5)
                .map(|i| msg(&format!("m-{i}"), i, r#"{"n":1}"#))
                .collect(),
            db.store.inbox(),
        );
        InboxConsumer::<_, AnyHandler>::new(
            source,
            db.store.inbox(),
            None,
            options(AckStrategy::ExactlyOnce, 10),
        )
        .run(true, stop())
        .await
        .unwrap();
        let handler = Arc::new(|_: InboxEvent| async { Outcome::Completed });
        let p = ProcessorBuilder::new(
            db.store.inbox(),
            HandlerStep::new(handler, 2, Duration::from_secs(5)).metrics(metrics.clone()),
            ProcessorOptions::new(WorkerId::new("p1").unwrap()),
        )
        .metrics(metrics.clone())
        .build();
        let r = p.process_batch().await.unwrap();
        assert_eq!(r.claimed, 3, "{r:?}");
        let text = metrics.render();
        let value = |prefix: &str| -> Option<String> {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        assert_eq!(
            value("omnibox_handler_duration_seconds_count{table=\"inbox\",event_type=\"order.created\"}").as_deref(),
            Some("5"),
            "{text}"
        );
        assert_eq!(
            value("omnibox_locked_batch_size{table=\"inbox\"}").as_deref(),
            Some("3"),
            "{text}"
        );
    }

    /// Consumers sharing a concurrency limit run at most that many handlers
    /// at once between them.
    pub async fn consumers_share_a_concurrency_limit(db: &TestDb) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (running, peak) = (running.clone(), peak.clone());
            Arc::new(Outside(move |_: InboxEvent| {
                let (running, peak) = (running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Outcome::Completed
                }
            }))
        };
        let limit = Arc::new(tokio::sync::Semaphore::new(1));
        let consumer = |prefix: &str, group: &str| {
            let rows: Vec<RawMessage> = (0..4)
                .map(|i| msg(&format!("{prefix}-{i}"), i, r#"{"a":1}"#))
                .collect();
            let (source, _) = VecSource::new(rows, db.store.inbox());
            let mut o = options(AckStrategy::ExactlyOnce, 4);
            o.group = group.to_string();
            InboxConsumer::new(source, db.store.inbox(), Some(handler.clone()), o)
                .with_concurrency_limit(limit.clone())
        };
        let (mut a, mut b) = (consumer("a", "billing"), consumer("b", "shipping"));
        let (ra, rb) = tokio::join!(a.run(true, stop()), b.run(true, stop()));
        assert_eq!((ra.unwrap().processed, rb.unwrap().processed), (4, 4));
        assert_eq!(
            peak.load(Ordering::SeqCst),
            1,
            "one handler at a time between them"
        );
    }

    /// The attempt count and the event id of a message belong to its row:
    /// a consumer that restarts (a new process, a rebalance) goes on
    /// counting, and the redelivery limit holds across restarts.
    pub async fn attempts_survive_a_restart(db: &TestDb) {
        let (f, log) = logging(db.store.inbox(), |id, n| {
            Some(if id == "m-1" {
                counted_failure(n)
            } else {
                Outcome::Completed
            })
        });
        let handler = Arc::new(f);
        for run in 0..3 {
            // A new consumer each time, reading the same messages again.
            let (source, _) = VecSource::new(messages(3), db.store.inbox());
            let mut o = options(AckStrategy::ExactlyOnce, 10);
            o.max_redeliveries = 3;
            fast_backoff(&mut o);
            let mut consumer =
                InboxConsumer::new(source, db.store.inbox(), Some(handler.clone()), o);
            let mut report = omnibox::inbox::ConsumeReport::default();
            // Past the failure's retry time.
            tokio::time::sleep(Duration::from_millis(500)).await;
            consumer
                .consume_batch(&messages(3), &mut report)
                .await
                .unwrap();
            let row = db
                .store
                .inbox()
                .get_by_message_id("m-1", "billing")
                .await
                .unwrap()
                .unwrap();
            assert_eq!(row.attempts_made(), run + 1, "run {run}");
        }
        let calls = calls_of(&log, "m-1");
        assert_eq!(
            calls.iter().map(|c| c.attempts_made).collect::<Vec<_>>(),
            vec![0, 1, 2],
            "OMNIBOX_ATTEMPT counts deliveries across restarts"
        );
        assert!(
            calls.iter().all(|c| c.event_id == calls[0].event_id),
            "one event id for every delivery"
        );
        let row = db
            .store
            .inbox()
            .get_by_message_id("m-1", "billing")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.status(), EventStatus::Failed);
        assert_eq!(row.last_error(), Some("failure 3"));
        assert_eq!(calls_of(&log, "m-0").len(), 1);
        assert_eq!(
            calls_of(&log, "m-2").len(),
            1,
            "handled once m-1 failed for good"
        );
    }

    /// A transient failure (no attempt spent) waits for the time it asked
    /// for, and ends: past the transient limit the message is parked as
    /// failed and the partition goes on.
    pub async fn transient_failures_are_paced_and_end(db: &TestDb) {
        let (f, log) = logging(db.store.inbox(), |id, n| {
            Some(if id == "m-1" {
                Outcome::Failed {
                    error: format!("downstream busy ({n})"),
                    retry: Retry::NotCountedAfter(Duration::from_millis(200)),
                }
            } else {
                Outcome::Completed
            })
        });
        let (source, _) = VecSource::new(messages(3), db.store.inbox());
        let mut o = options(AckStrategy::ExactlyOnce, 10);
        o.transient_limit = Duration::from_secs(1);
        let mut consumer = InboxConsumer::new(source, db.store.inbox(), Some(Arc::new(f)), o);
        let r = tokio::time::timeout(Duration::from_secs(30), consumer.run(true, stop()))
            .await
            .expect("a --once run ends")
            .unwrap();
        let calls = calls_of(&log, "m-1").len();
        assert!(
            (4..=12).contains(&calls),
            "about one delivery per 200 ms for 1 s, not hundreds: {calls} ({r:?})"
        );
        let row = db
            .store
            .inbox()
            .get_by_message_id("m-1", "billing")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.status(), EventStatus::Failed);
        assert!(
            row.last_error()
                .unwrap()
                .contains("gave up after failing transiently"),
            "{:?}",
            row.last_error()
        );
        assert_eq!(calls_of(&log, "m-2").len(), 1);
        assert_eq!(db.store.inbox().counts().await.unwrap().completed, 2);
    }

    /// An external handler runs with no transaction open: its row is
    /// already stored (pending, locked by this consumer) and visible to
    /// every other connection, so other writers are not blocked by it.
    pub async fn external_handlers_run_outside_any_transaction(db: &TestDb) {
        let (f, log) = logging(db.store.inbox(), |_, _| Some(Outcome::Completed));
        let (source, _) = VecSource::new(messages(3), db.store.inbox());
        let mut consumer = InboxConsumer::new(
            source,
            db.store.inbox(),
            Some(Arc::new(Outside(f))),
            options(AckStrategy::ExactlyOnce, 10),
        );
        consumer.run(true, stop()).await.unwrap();
        for call in log.lock().unwrap().iter() {
            let row = call
                .row
                .as_ref()
                .unwrap_or_else(|| panic!("{} not visible while its handler ran", call.message_id));
            assert_eq!(row.status(), EventStatus::Pending);
            assert_eq!(row.locked_by(), Some("consumer-1"));
            assert_eq!(row.id(), call.event_id);
        }
        assert_eq!(db.store.inbox().counts().await.unwrap().completed, 3);
    }

    /// A consumer killed while an external handler runs: on restart only
    /// the handler in flight runs again (once its lease has run out); the
    /// ones already done are duplicates.
    pub async fn a_kill_reruns_only_the_handler_in_flight(db: &TestDb) {
        let (f, log) = logging(db.store.inbox(), |id, n| {
            (id != "m-2" || n > 1).then_some(Outcome::Completed)
        });
        let handler = Arc::new(Outside(f));
        let (source, _) = VecSource::new(Vec::new(), db.store.inbox());
        let mut o = options(AckStrategy::ExactlyOnce, 10);
        o.lease = Duration::from_secs(1);
        let mut first =
            InboxConsumer::new(source, db.store.inbox(), Some(handler.clone()), o.clone());
        let task = tokio::spawn(async move {
            let mut report = omnibox::inbox::ConsumeReport::default();
            first.consume_batch(&messages(5), &mut report).await
        });
        while calls_of(&log, "m-2").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort(); // kill -9: nothing more is written, nothing committed
        let _ = task.await;
        let (source, commits) = VecSource::new(messages(5), db.store.inbox());
        let mut o2 = options(AckStrategy::ExactlyOnce, 10);
        o2.worker = WorkerId::new("consumer-2").unwrap();
        let mut second = InboxConsumer::new(source, db.store.inbox(), Some(handler), o2);
        tokio::time::timeout(Duration::from_secs(30), second.run(true, stop()))
            .await
            .unwrap()
            .unwrap();
        for (id, n) in [("m-0", 1), ("m-1", 1), ("m-2", 2), ("m-3", 1), ("m-4", 1)] {
            assert_eq!(calls_of(&log, id).len(), n, "{id}");
        }
        assert_eq!(db.store.inbox().counts().await.unwrap().completed, 5);
        assert_eq!(commits.lock().unwrap().last().unwrap().through, 4);
    }

    /// A handler that never succeeds does not block the partition forever:
    /// after the redelivery limit the message is stored as failed.
    pub async fn a_hopeless_message_is_stored_failed(db: &TestDb) {
        let (handler, _) = counting(HashMap::from([("m-1".to_string(), 100)]));
        let (source, _) = VecSource::new(messages(3), db.store.inbox());
        let mut o = options(AckStrategy::ExactlyOnce, 10);
        o.max_redeliveries = 3;
        fast_backoff(&mut o);
        let mut consumer = InboxConsumer::new(source, db.store.inbox(), Some(handler), o);
        consumer.run(true, stop()).await.unwrap();
        let row = db
            .store
            .inbox()
            .get_by_message_id("m-1", "billing")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.status(), EventStatus::Failed);
        assert_eq!(row.last_error(), Some("failure 3"));
        assert_eq!(db.store.inbox().counts().await.unwrap().completed, 2);
    }

    /// Where each ack strategy commits, seen from the table at commit time.
    pub async fn ack_strategies_commit_where_they_say(db: &TestDb) {
        async fn run_with(
            db: &TestDb,
            ack: AckStrategy,
            group: &str,
            fail: bool,
        ) -> Vec<CommitSeen> {
            let fails = if fail {
                HashMap::from([("m-1".to_string(), 100)])
            } else {
                HashMap::new()
            };
            let (handler, _) = counting(fails);
            let (source, commits) = VecSource::new(messages(3), db.store.inbox());
            let mut o = options(ack, 10);
            o.group = group.to_string();
            let mut consumer = InboxConsumer::new(source, db.store.inbox(), Some(handler), o);
            consumer.run(true, stop()).await.unwrap();
            commits.lock().unwrap().clone()
        }
        // at-most-once: before anything is stored.
        let s = run_with(db, AckStrategy::AtMostOnce, "g1", false).await;
        assert_eq!((s[0].through, s[0].rows), (2, 0));
        // at-least-once on-persist: once stored, before handling, even when the handler fails.
        let before = db.store.inbox().counts().await.unwrap();
        let s = run_with(db, AckStrategy::AtLeastOnce(CommitOn::Persist), "g2", true).await;
        assert_eq!(s.len(), 1);
        let stored_before = before.pending + before.completed + before.failed;
        assert_eq!(
            (
                s[0].through,
                s[0].rows - stored_before,
                s[0].completed - before.completed
            ),
            (2, 3, 0)
        );
        let row = db
            .store
            .inbox()
            .get_by_message_id("m-1", "g2")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (row.status(), row.attempts_made(), row.is_locked()),
            (EventStatus::Pending, 1, false),
            "left for inbox process"
        );
        // at-least-once on-success: through the message before the failure; the rest comes again.
        let before = db.store.inbox().counts().await.unwrap();
        let s = run_with(db, AckStrategy::AtLeastOnce(CommitOn::Success), "g3", true).await;
        assert_eq!(s[0].through, 0, "{s:?}");
        assert_eq!(
            s[0].completed - before.completed,
            2,
            "handled before the commit"
        );
        // exactly-once: after the transaction (rows stored and completed at commit time).
        let before = db.store.inbox().counts().await.unwrap();
        let s = run_with(db, AckStrategy::ExactlyOnce, "g4", false).await;
        let stored_before = before.pending + before.completed + before.failed;
        assert_eq!(
            (s[0].rows - stored_before, s[0].completed - before.completed),
            (3, 3)
        );
    }

    /// A message that cannot be parsed is stored failed, with its bytes, and committed.
    pub async fn poison_messages_are_stored_and_committed(db: &TestDb) {
        let mut all = messages(2);
        all.push(msg("bad-1", 2, "this is not json"));
        all.push(msg("bad-2", 3, "[1,2,3]"));
        let (source, commits) = VecSource::new(all, db.store.inbox());
        let mut consumer = InboxConsumer::<_, AnyHandler>::new(
            source,
            db.store.inbox(),
            None,
            options(AckStrategy::ExactlyOnce, 10),
        )
        .dead_letter_store(Arc::new(db.store.dead_letters()));
        let r = consumer.run(true, stop()).await.unwrap();
        assert_eq!((r.stored, r.poison), (4, 2));
        // Poison is kept as dead letters too, with the reason.
        let letters = db
            .store
            .dead_letters()
            .list(&Default::default())
            .await
            .unwrap();
        assert_eq!(letters.len(), 2, "{letters:?}");
        assert!(
            letters[0].error.contains("not JSON"),
            "{}",
            letters[0].error
        );
        assert_eq!(letters[0].event["message_id"], "bad-1");
        assert_eq!(letters[1].event["message_id"], "bad-2");
        let bad = db
            .store
            .inbox()
            .get_by_message_id("bad-1", "billing")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bad.status(), EventStatus::Failed);
        assert!(bad.last_error().unwrap().contains("not JSON"));
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(bad.payload()["raw_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(raw, b"this is not json");
        assert_eq!(
            commits.lock().unwrap().last().unwrap().through,
            3,
            "committed"
        );
        let c = db.store.inbox().counts().await.unwrap();
        assert_eq!(
            (c.pending, c.failed),
            (2, 2),
            "without a handler the good rows wait for inbox process"
        );
    }

    /// `inbox process` with --exec: exit 0 completed, 3 skipped, 75 retry
    /// without an attempt, other exit counted with stderr, timeout counted.
    pub async fn exec_handler_exit_codes(db: &TestDb) {
        let rows: Vec<RawMessage> = ["ok", "skip", "later", "boom", "slow"]
            .iter()
            .enumerate()
            .map(|(i, id)| msg(id, i as i64, r#"{"a":1}"#))
            .collect();
        let (source, _) = VecSource::new(rows, db.store.inbox());
        let mut consumer = InboxConsumer::<_, AnyHandler>::new(
            source,
            db.store.inbox(),
            None,
            options(AckStrategy::ExactlyOnce, 10),
        );
        consumer.run(true, stop()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let script = format!(
            r#"cat > "{seen}-$OMNIBOX_MESSAGE_ID"; case "$OMNIBOX_MESSAGE_ID" in ok) exit 0;; skip) exit 3;; later) exit 75;; boom) echo "it broke: $OMNIBOX_EVENT_TYPE" >&2; exit 1;; slow) sleep 5;; esac"#,
            seen = seen.display()
        );
        let handler = Arc::new(AnyHandler::Exec(ExecHandler::new(
            script,
            Duration::from_millis(500),
        )));
        let step = HandlerStep::new(handler, 5, Duration::from_secs(10));
        let p = ProcessorBuilder::new(
            db.store.inbox(),
            step,
            ProcessorOptions::new(WorkerId::new("p1").unwrap()),
        )
        .build();
        let report = p.process_batch().await.unwrap();
        assert_eq!(report.claimed, 5);
        let get = |id: &str| {
            let inbox = db.store.inbox();
            let id = id.to_string();
            async move {
                inbox
                    .get_by_message_id(&id, "billing")
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        assert_eq!(get("ok").await.status(), EventStatus::Completed);
        assert_eq!(get("skip").await.status(), EventStatus::Completed);
        let later = get("later").await;
        assert_eq!(
            (later.status(), later.attempts_made()),
            (EventStatus::Pending, 0)
        );
        let boom = get("boom").await;
        assert_eq!(
            (boom.status(), boom.attempts_made()),
            (EventStatus::Pending, 1)
        );
        assert!(
            boom.last_error()
                .unwrap()
                .contains("exited with 1: it broke: order.created"),
            "{:?}",
            boom.last_error()
        );
        let slow = get("slow").await;
        assert_eq!(slow.attempts_made(), 1);
        assert!(
            slow.last_error().unwrap().contains("timed out"),
            "{:?}",
            slow.last_error()
        );
        // The handler got the event as JSON on stdin.
        let input: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{}-ok", seen.display())).unwrap(),
        )
        .unwrap();
        assert_eq!(input["message_id"], "ok");
        assert_eq!(input["payload"]["a"], 1);
        assert_eq!(input["consumer_group"], "billing");
    }
}

mod process_lease {
    use super::*;

    /// `inbox process`: handlers that run longer than the claim's lease keep
    /// their rows (the lease is extended while they run), so a second
    /// worker claiming meanwhile gets nothing and no handler runs twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_handlers_keep_their_lease() {
        let db = common::sqlite().await;
        store_only(&db, messages(4), "billing").await;
        let (f, log) = logging(db.store.inbox(), |_, _| Some(Outcome::Completed));
        let slow = Arc::new(move |e: InboxEvent| {
            let f = f(e);
            async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                f.await
            }
        });
        let mut o = ProcessorOptions::new(WorkerId::new("p1").unwrap());
        o.lease = Duration::from_millis(900);
        // One handler at a time: four of them outlast the lease four times.
        let p1 = ProcessorBuilder::new(
            db.store.inbox(),
            HandlerStep::new(slow.clone(), 1, Duration::from_secs(10)),
            o.clone(),
        )
        .build();
        let first = tokio::spawn(async move { p1.process_batch().await.unwrap() });
        let mut o2 = o;
        o2.worker = WorkerId::new("p2").unwrap();
        let p2 = ProcessorBuilder::new(
            db.store.inbox(),
            HandlerStep::new(slow, 1, Duration::from_secs(10)),
            o2,
        )
        .build();
        let mut stolen = 0;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            stolen += p2.process_batch().await.unwrap().claimed;
        }
        let report = first.await.unwrap();
        assert_eq!((report.claimed, report.completed), (4, 4), "{report:?}");
        assert_eq!(stolen, 0, "another worker took rows of a batch in flight");
        assert_eq!(log.lock().unwrap().len(), 4, "each handler ran once");
    }
}

backend_tests!(
    exactly_once_under_redelivery,
    handler_writes_commit_or_roll_back_with_the_row,
    process_handlers_write_with_the_row,
    custom_parser_and_domain,
    steps_see_and_change_outcomes,
    a_step_before_the_handler_filters_and_routes,
    process_one_consumes_one_message_at_a_time,
    process_one_gives_back_a_message_it_could_not_finish,
    spawned_consumers_run_as_tasks,
    a_file_read_ahead_stores_every_line_once_in_order,
    a_custom_metrics_backend_is_fed,
    prometheus_metrics_cover_handlers,
    consumers_share_a_concurrency_limit,
    crash_between_store_and_commit,
    handler_failure_is_redelivered_until_it_succeeds,
    a_panicking_handler_is_a_counted_failure,
    a_panicking_handler_is_a_failure_under_every_strategy,
    a_panicking_handler_or_step_in_process_is_a_failure,
    handlers_may_return_a_result_or_nothing,
    attempts_survive_a_restart,
    transient_failures_are_paced_and_end,
    external_handlers_run_outside_any_transaction,
    a_kill_reruns_only_the_handler_in_flight,
    a_hopeless_message_is_stored_failed,
    ack_strategies_commit_where_they_say,
    poison_messages_are_stored_and_committed,
    exec_handler_exit_codes,
);

/// --webhook against a local HTTP server: 2xx completed, 409 skipped,
/// 503 with Retry-After transient, 500 counted, refused transient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_status_mapping() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if got.len() >= head_end + 4 + len {
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&got).to_string();
                let head = text.split("\r\n\r\n").next().unwrap_or("").to_string();
                let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
                seen.lock().unwrap().push(format!("{head}\n{body}"));
                let id = serde_json::from_str::<serde_json::Value>(&body)
                    .map(|v| v["message_id"].as_str().unwrap_or("").to_string())
                    .unwrap_or_default();
                let (status, extra) = match id.as_str() {
                    "ok" => ("200 OK", ""),
                    "dup" => ("409 Conflict", ""),
                    "busy" => ("503 Service Unavailable", "retry-after: 120\r\n"),
                    "now" => ("503 Service Unavailable", "retry-after: 0\r\n"),
                    "moved" => (
                        "302 Found",
                        "location: /elsewhere?token=hidden-location-token\r\n",
                    ),
                    _ => ("500 Internal Server Error", ""),
                };
                // "flood" answers 500 with 16 MiB of body.
                let body = if id == "flood" {
                    "x".repeat(16 << 20)
                } else {
                    "nope".to_string()
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    let db = common::sqlite().await;
    let mut rows: Vec<RawMessage> = ["ok", "dup", "busy", "err", "moved", "now", "flood"]
        .iter()
        .enumerate()
        .map(|(i, id)| msg(id, i as i64, r#"{"a":1}"#))
        .collect();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    rows[0]
        .headers
        .push(("traceparent".into(), traceparent.as_bytes().to_vec()));
    store_only(&db, rows, "billing").await;
    let handler = Arc::new(AnyHandler::Webhook(
        WebhookHandler::new(
            format!("http://hook-user:hook-secret@{addr}/events?token=query-secret&x=1"),
            Duration::from_secs(5),
        )
        .unwrap(),
    ));
    let p = ProcessorBuilder::new(
        db.store.inbox(),
        HandlerStep::new(handler, 4, Duration::from_secs(10)),
        ProcessorOptions::new(WorkerId::new("p1").unwrap()),
    )
    .build();
    let before = omnibox::time::now();
    p.process_batch().await.unwrap();
    let get = |id: &'static str| {
        let inbox = db.store.inbox();
        async move {
            inbox
                .get_by_message_id(id, "billing")
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(get("ok").await.status(), EventStatus::Completed);
    assert_eq!(get("dup").await.status(), EventStatus::Completed);
    let busy = get("busy").await;
    assert_eq!(
        (busy.status(), busy.attempts_made()),
        (EventStatus::Pending, 0)
    );
    assert!(
        (busy.scheduled_at() - before).num_seconds() >= 115,
        "Retry-After honoured: {}",
        busy.scheduled_at()
    );
    // `Retry-After: 0` waits a second all the same (no hot loop).
    let now = get("now").await;
    assert_eq!(
        (now.status(), now.attempts_made()),
        (EventStatus::Pending, 0)
    );
    assert!(
        (now.scheduled_at() - before).num_milliseconds() >= 1000,
        "{} against {before}",
        now.scheduled_at()
    );
    // A huge error body: its tail, read from a bounded start.
    let flood = get("flood").await;
    let error = flood.last_error().unwrap();
    assert!(
        error.starts_with("webhook answered 500: xxx") && error.len() < 1600,
        "{} bytes",
        error.len()
    );
    let err = get("err").await;
    assert_eq!(err.attempts_made(), 1);
    assert!(
        err.last_error()
            .unwrap()
            .contains("webhook answered 500: nope"),
        "{:?}",
        err.last_error()
    );
    assert!(
        bodies
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.contains("\"payload\":{\"a\":1}"))
    );
    // The message's trace context goes on as the W3C header.
    let sent = bodies.lock().unwrap().clone();
    let ok_request = sent
        .iter()
        .find(|b| b.contains("\"message_id\":\"ok\""))
        .unwrap();
    assert!(
        ok_request
            .to_ascii_lowercase()
            .contains(&format!("traceparent: {traceparent}")),
        "{ok_request}"
    );
    let dup_request = sent
        .iter()
        .find(|b| b.contains("\"message_id\":\"dup\""))
        .unwrap();
    assert!(!dup_request.to_ascii_lowercase().contains("traceparent"));
    // A redirect is not followed (the POST would become a GET elsewhere and
    // its 200 would complete the event unhandled): a counted failure that
    // names where it pointed, its query values masked.
    let moved = get("moved").await;
    assert_eq!(
        (moved.status(), moved.attempts_made()),
        (EventStatus::Pending, 1)
    );
    let error = moved.last_error().unwrap();
    assert!(
        error.contains("302") && error.contains("/elsewhere?token=***"),
        "{error}"
    );
    assert!(
        !bodies
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.contains("/elsewhere")),
        "the redirect was not followed"
    );
    // The webhook's credentials and query values appear in no row.
    for row in db
        .store
        .inbox()
        .list(&omnibox::store::ListFilter::default())
        .await
        .unwrap()
    {
        let text = serde_json::to_string(&row).unwrap();
        for secret in ["hook-secret", "query-secret", "hidden-location-token"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
    assert_eq!(
        omnibox::inbox::redact_http_url("https://u:p@w/d@h:1/x?token=t&flag#frag"),
        "https://u:***@h:1/x?token=***&flag"
    );
    let unreachable = WebhookHandler::new(
        "http://someone:hunter2@127.0.0.1:1/x?api_key=k3y",
        Duration::from_secs(2),
    )
    .unwrap();
    let out =
        omnibox::inbox::Handler::handle(&unreachable, &get("ok").await, &mut detached()).await;
    let text = format!("{out:?} {unreachable:?}");
    assert!(!text.contains("hunter2") && !text.contains("k3y"), "{text}");
    // Nobody listening: transient, no attempt spent.
    let refused = WebhookHandler::new("http://127.0.0.1:1/x", Duration::from_secs(2)).unwrap();
    let row = get("ok").await;
    let out = omnibox::inbox::Handler::handle(&refused, &row, &mut detached()).await;
    assert!(
        matches!(
            out,
            Outcome::Failed {
                retry: Retry::NotCounted(_),
                ..
            }
        ),
        "{out:?}"
    );
}

/// An event stored through the consumer, to call handlers with.
async fn stored_event(payload: &str) -> (common::TestDb, InboxEvent) {
    let db = common::sqlite().await;
    store_only(&db, vec![msg("big", 0, payload)], "billing").await;
    let e = db
        .store
        .inbox()
        .get_by_message_id("big", "billing")
        .await
        .unwrap()
        .unwrap();
    (db, e)
}

/// --exec: a timeout kills the handler's whole process group, so what it
/// started cannot finish the effect after the event was given up on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeout_kills_everything_the_handler_started() {
    let (_db, event) = stored_event(r#"{"a":1}"#).await;
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("effect");
    let handler = ExecHandler::new(
        format!("(sleep 2; touch '{}') & wait", mark.display()),
        Duration::from_millis(300),
    );
    let out = omnibox::inbox::Handler::handle(&handler, &event, &mut detached()).await;
    assert!(
        matches!(&out, Outcome::Failed { error, retry: Retry::Counted(None) } if error.contains("timed out")),
        "{out:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !mark.exists(),
        "the handler's child ran on after the timeout"
    );
}

/// --exec under a caller's timeout (`inbox process --timeout`, a shutdown):
/// a handler future dropped before it finished kills the handler's whole
/// process group, not only `sh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_dropped_by_its_caller_kills_everything_the_handler_started() {
    let (_db, event) = stored_event(r#"{"a":1}"#).await;
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("effect");
    let handler = ExecHandler::new(
        format!("(sleep 2; touch '{}') & wait", mark.display()),
        Duration::from_secs(60),
    );
    let mut cx = detached();
    let out = tokio::time::timeout(
        Duration::from_millis(300),
        omnibox::inbox::Handler::handle(&handler, &event, &mut cx),
    )
    .await;
    assert!(out.is_err(), "the caller's timeout ends it: {out:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !mark.exists(),
        "the handler's child ran on after its caller gave up"
    );
}

/// --exec: stdin is written while stdout and stderr are read, so a handler
/// that writes more than a pipe holds before reading its input (or reads
/// a large input while writing) does not deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_large_input_and_output_do_not_deadlock() {
    let big = "x".repeat(300_000);
    let (_db, event) = stored_event(&format!(r#"{{"blob":"{big}"}}"#)).await;
    let handler = ExecHandler::new(
        "head -c 200000 /dev/zero | tr '\\0' e >&2; head -c 200000 /dev/zero; \
         test \"$(wc -c)\" -gt 300000 || exit 9",
        Duration::from_secs(20),
    );
    let started = std::time::Instant::now();
    let out = omnibox::inbox::Handler::handle(&handler, &event, &mut detached()).await;
    assert!(matches!(out, Outcome::Completed), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A failure reports the end of stderr, not all of it.
    let failing = ExecHandler::new(
        "head -c 500000 /dev/zero | tr '\\0' e >&2; echo ' the end' >&2; exit 4",
        Duration::from_secs(20),
    );
    match omnibox::inbox::Handler::handle(&failing, &event, &mut detached()).await {
        Outcome::Failed { error, .. } => {
            assert!(
                error.contains("exited with 4") && error.ends_with("the end"),
                "{}",
                &error[..80]
            );
            assert!(error.len() < 2000);
        }
        other => panic!("{other:?}"),
    }
}

/// A worker paused past its lease between its claim and the send (SIGSTOP,
/// a VM pause: here the whole runtime blocked, heartbeat included) drops
/// the batch unsent: another worker took the rows meanwhile and handled
/// them, and the paused one must not send them again after it.
async fn a_batch_whose_lease_ran_out_is_not_sent(db: common::TestDb) {
    use omnibox::pipeline::NextBatch;
    let inbox = db.store.inbox();
    let domain = omnibox::DomainService::default();
    let events: Vec<_> = (0..5)
        .map(|i| {
            domain
                .create_inbox_event(omnibox::NewInboxEvent::new(
                    format!("paused-{i}"),
                    "g",
                    "billing",
                    "refund.issued",
                    serde_json::json!({"n": i}),
                ))
                .unwrap()
        })
        .collect();
    inbox.insert_many(&events).await.unwrap();
    let sent: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let recorder = |who: &'static str| {
        let sent = sent.clone();
        Arc::new(move |e: InboxEvent| {
            sent.lock()
                .unwrap()
                .push((who.to_string(), e.message_id().to_string()));
            async { Outcome::Completed }
        })
    };
    let mut o = ProcessorOptions::new(WorkerId::new("paused").unwrap());
    o.lease = Duration::from_millis(600);
    let paused = ProcessorBuilder::new(
        inbox.clone(),
        HandlerStep::new(recorder("paused"), 1, Duration::from_secs(5)),
        o.clone(),
    )
    .build();
    let NextBatch::Batch(fetched) = paused.fetch().await.unwrap() else {
        panic!("a batch");
    };
    // The whole runtime stops, as a stopped process does.
    std::thread::sleep(Duration::from_millis(1500));
    o.worker = WorkerId::new("other").unwrap();
    let other = ProcessorBuilder::new(
        inbox.clone(),
        HandlerStep::new(recorder("other"), 1, Duration::from_secs(5)),
        o,
    )
    .build();
    let r = other.process_batch().await.unwrap();
    assert_eq!(r.completed, 5, "{r:?}");
    // The paused worker resumes.
    let handled = paused.handle(*fetched).await;
    let r = paused.finish(handled).await;
    assert_eq!((r.completed, r.lease_lost), (0, 5), "{r:?}");
    assert_eq!(r.ids.lease_lost.len(), 5, "{r:?}");
    assert!(
        r.ids.completed.is_empty() && r.ids.released.is_empty(),
        "{r:?}"
    );
    let sent = sent.lock().unwrap().clone();
    assert!(
        sent.iter().all(|(who, _)| who == "other"),
        "the paused worker sent its batch: {sent:?}"
    );
    assert_eq!(sent.len(), 5);
    assert_eq!(inbox.counts().await.unwrap().completed, 5);
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_whose_lease_ran_out_is_not_sent_sqlite() {
    a_batch_whose_lease_ran_out_is_not_sent(common::sqlite().await).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_whose_lease_ran_out_is_not_sent_postgres() {
    let Some(db) = common::postgres().await else {
        return;
    };
    a_batch_whose_lease_ran_out_is_not_sent(db).await;
}
