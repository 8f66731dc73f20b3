//! Connections the network loses without a reset: `omnibox publish`,
//! `omnibox inbox process` and `omnibox inbox consume` reach PostgreSQL
//! through a proxy in this test that, on a signal, stops forwarding on every
//! connection it carries while keeping them open (what a failover that moved
//! the server's address, or a NAT that dropped its state, looks like to a
//! client: no error, no answer). New connections after it go through. A
//! call in progress then never returns; past the stall limit (twice the
//! statement timeout and 10 s: 12 s with OMNIBOX_STATEMENT_TIMEOUT=1s) the
//! command stops with exit 1 and says why, and a new run finishes every
//! row: nothing lost. A consumer reading a pipe, which cannot be read
//! again, carries on on a new connection instead.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use omnibox::{DomainService, EventStore, InboxStore, NewInboxEvent, NewOutboxEvent, OutboxStore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy whose connections can be frozen: connections opened before
/// [`Proxy::freeze`] forward nothing more (each direction's data is read
/// and dropped) and stay open until [`Proxy::release`] closes them.
struct Proxy {
    addr: SocketAddr,
    /// Connections numbered below this are frozen.
    frozen: watch::Sender<u64>,
    /// Connections numbered below this are closed.
    released: watch::Sender<u64>,
    opened: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, _) = watch::channel(0u64);
        let (released, _) = watch::channel(0u64);
        let opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (f, r, o) = (frozen.clone(), released.clone(), opened.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let no = o.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, no, f.subscribe(), r.subscribe()));
                tokio::spawn(pump(sr, cw, no, f.subscribe(), r.subscribe()));
            }
        });
        Proxy {
            addr,
            frozen,
            released,
            opened,
        }
    }

    /// Freezes every connection opened so far.
    fn freeze(&self) {
        self.frozen.send_replace(self.opened.load(Ordering::SeqCst));
    }

    /// Closes the frozen connections.
    fn release(&self) {
        self.released.send_replace(*self.frozen.borrow());
    }
}

/// A test that fails still closes the frozen connections (the server
/// would keep their sessions, and their locks, otherwise).
impl Drop for Proxy {
    fn drop(&mut self) {
        self.released.send_replace(u64::MAX);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    no: u64,
    mut frozen: watch::Receiver<u64>,
    mut released: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if no < *frozen.borrow() {
            break;
        }
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if no < *frozen.borrow() {
                    break;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            changed = frozen.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
    // Frozen: read and drop whatever comes, answer nothing, keep the
    // connection open until released.
    loop {
        if no < *released.borrow() {
            return;
        }
        tokio::select! {
            read = from.read(&mut buf) => {
                if matches!(read, Ok(0) | Err(_)) {
                    // The peer closed its side; hold ours until released.
                    let _ = released.wait_for(|r| no < *r).await;
                    return;
                }
            }
            changed = released.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// The test database's URL with its host and port replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> String {
    let at = url.rfind('@').expect("a URL with credentials") + 1;
    let end = url[at..].find('/').map_or(url.len(), |i| at + i);
    let host_port = &url[at..end];
    format!("{}{addr}{}", &url[..at], &url[at + host_port.len()..])
}

fn target(url: &str) -> SocketAddr {
    let at = url.rfind('@').expect("a URL with credentials") + 1;
    let end = url[at..].find('/').map_or(url.len(), |i| at + i);
    let host_port = url[at..end].replace("localhost", "127.0.0.1");
    host_port.parse().expect("host:port of the test database")
}

/// A command killed if the test ends before it exits.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn omnibox(dir: &Path, url: &str, schema: &str, args: &[&str], log: &str) -> Running {
    let log = std::fs::File::create(dir.join(log)).unwrap();
    Running(
        Command::new(env!("CARGO_BIN_EXE_omnibox"))
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("NO_COLOR", "1")
            .env("OMNIBOX_DATABASE_URL", url)
            .env("OMNIBOX_DATABASE_SCHEMA", schema)
            .env("OMNIBOX_STATEMENT_TIMEOUT", "1s")
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `run` to exit by itself (the watchdog), at least `after`
/// and at most `limit` after the freeze; returns its exit code.
async fn exits(run: &mut Running, frozen_at: Instant, after: Duration, limit: Duration) -> i32 {
    loop {
        if let Some(status) = run.0.try_wait().unwrap() {
            let took = frozen_at.elapsed();
            assert!(
                took >= after,
                "stopped {took:?} after the freeze, before the stall limit"
            );
            return status.code().unwrap_or(-1);
        }
        assert!(
            frozen_at.elapsed() < limit,
            "still running {limit:?} after its connections were lost"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `run` stops (exit 1, saying why, at least the stall
/// limit after the freeze) or `went_on` (it carried on through new
/// connections, having warned of an outage; then it is stopped here).
async fn stops_or_carries_on<F: std::future::Future<Output = bool>>(
    run: &mut Running,
    frozen_at: Instant,
    dir: &Path,
    log: &str,
    mut went_on: impl FnMut() -> F,
) {
    loop {
        if let Some(status) = run.0.try_wait().unwrap() {
            let took = frozen_at.elapsed();
            assert!(took >= Duration::from_secs(11), "stopped after {took:?}");
            assert_eq!(status.code(), Some(1), "exit code");
            assert_said_why(dir, log);
            return;
        }
        if went_on().await {
            let text = std::fs::read_to_string(dir.join(log)).unwrap();
            assert!(text.contains("the database cannot be reached"), "{text}");
            let _ = run.0.kill();
            let _ = run.0.wait();
            return;
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(45),
            "neither stopped nor went on 45 s after its connections were lost"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_said_why(dir: &Path, log: &str) {
    let text = std::fs::read_to_string(dir.join(log)).unwrap();
    assert!(
        text.contains("the database has not answered a")
            && text.contains("(the limit is 12s")
            && text.contains("taken for lost without a reset"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stops_when_its_connections_are_lost_without_a_reset() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let schema = db.schema().to_string();
    let dir = tempfile::tempdir().unwrap();
    let domain = DomainService::default();

    // The relay, under a steady insert, so that claims and writes are in
    // progress when the connections are lost.
    let proxy = Proxy::start(target(&db.url)).await;
    let via = through(&db.url, proxy.addr);
    let mut relay = omnibox(
        dir.path(),
        &via,
        &schema,
        &["publish", "--broker", "null", "--lease", "10s"],
        "relay.log",
    );
    let inserting = Arc::new(AtomicBool::new(true));
    let inserter = {
        let store = db.store.clone();
        let inserting = inserting.clone();
        let domain = domain.clone();
        tokio::spawn(async move {
            let mut n = 0usize;
            while inserting.load(Ordering::SeqCst) {
                let events: Vec<_> = (0..20)
                    .map(|i| {
                        domain
                            .create_outbox_event(NewOutboxEvent::new(
                                "order",
                                uuid::Uuid::now_v7(),
                                "order.created",
                                "orders",
                                format!("k{}", (n + i) % 7),
                                json!({ "n": n + i }),
                            ))
                            .unwrap()
                    })
                    .collect();
                store.outbox().create_many(&events).await.unwrap();
                n += events.len();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        })
    };
    let outbox = db.store.outbox();
    wait_until("the relay publishes", Duration::from_secs(30), || async {
        outbox.counts().await.unwrap().completed >= 200
    })
    .await;
    let frozen_at = Instant::now();
    proxy.freeze();
    let at_freeze = outbox.counts().await.unwrap().completed;
    // It stops when its next call waits on a lost connection (the usual
    // case: its connections are busy). Had that call gone to a connection
    // idle for over a second, the ping before it would be given up after
    // the pool's 10 s wait, and it would carry on through new connections
    // (the test the_runner_ends_... checks the watchdog deterministically).
    stops_or_carries_on(&mut relay, frozen_at, dir.path(), "relay.log", || async {
        outbox.counts().await.unwrap().completed >= at_freeze + 200
    })
    .await;
    inserting.store(false, Ordering::SeqCst);
    let inserted = inserter.await.unwrap() as u64;
    // A new relay, through new connections, publishes every row, while
    // the lost ones stay open on the server: what they held (a held
    // claim's row locks) is released when the server ends their idle
    // transactions (after the lease, 10 s here, for a held claim; after
    // the stall limit for the others).
    let mut again = omnibox(
        dir.path(),
        &via,
        &schema,
        &["publish", "--broker", "null", "--once", "--lease", "10s"],
        "again.log",
    );
    let code = exits(
        &mut again,
        Instant::now(),
        Duration::ZERO,
        Duration::from_secs(60),
    )
    .await;
    let log = std::fs::read_to_string(dir.path().join("again.log")).unwrap();
    assert_eq!(code, 0, "{log}");
    let counts = outbox.counts().await.unwrap();
    assert_eq!(counts.completed, inserted, "{counts:?}");
    assert_eq!(counts.pending + counts.failed, 0, "{counts:?}");
    proxy.release();
}

/// The same for `inbox process`: a handler run per row, the rows inserted
/// before; its claims and results writes lose their connections halfway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_process_stops_when_its_connections_are_lost_without_a_reset() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let schema = db.schema().to_string();
    let dir = tempfile::tempdir().unwrap();
    let domain = DomainService::default();
    let proxy = Proxy::start(target(&db.url)).await;
    let via = through(&db.url, proxy.addr);
    let rows: Vec<_> = (0..3000)
        .map(|i| {
            domain
                .create_inbox_event(NewInboxEvent::new(
                    format!("m{i}"),
                    "g",
                    "billing",
                    "refund.issued",
                    json!({ "n": i }),
                ))
                .unwrap()
        })
        .collect();
    let inbox = db.store.inbox();
    inbox.insert_many(&rows).await.unwrap();
    // One row a batch: the processor's connections are never idle for a
    // second between its calls, so the call after the freeze waits on a
    // lost one (a connection idle longer is pinged first, and a ping that
    // gets no answer only costs the pool's 10 s wait: no stall).
    let mut processor = omnibox(
        dir.path(),
        &via,
        &schema,
        &["inbox", "process", "--exec", "true", "--batch", "1"],
        "process.log",
    );
    wait_until("inbox process works", Duration::from_secs(60), || async {
        inbox.counts().await.unwrap().completed >= 20
    })
    .await;
    let frozen_at = Instant::now();
    proxy.freeze();
    let at_freeze = inbox.counts().await.unwrap().completed;
    // As for the relay: it stops, or (its next call on a connection idle
    // for over a second, on a machine too busy to run a handler in less)
    // carries on through new connections.
    stops_or_carries_on(
        &mut processor,
        frozen_at,
        dir.path(),
        "process.log",
        || async { inbox.counts().await.unwrap().completed >= at_freeze + 50 },
    )
    .await;
    proxy.release();
    // Nothing was lost: the rows not completed are pending (those of the
    // batch in flight under their lease, retaken when it ends), none
    // failed.
    let counts = inbox.counts().await.unwrap();
    assert_eq!(counts.completed + counts.pending, 3000, "{counts:?}");
    assert_eq!(counts.failed, 0, "{counts:?}");
    assert!(counts.completed < 3000, "{counts:?}");
}

/// `inbox consume`, storing a large file exactly once: it stops halfway,
/// and a second run stores the rest, each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consume_from_a_file_stops_when_its_connections_are_lost_without_a_reset() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let schema = db.schema().to_string();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(target(&db.url)).await;
    let via = through(&db.url, proxy.addr);
    let lines = 200_000;
    let input = dir.path().join("messages.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        for i in 0..lines {
            writeln!(
                f,
                r#"{{"message_id":"c{i}","event_type":"order.created","payload":{{"n":{i}}}}}"#
            )
            .unwrap();
        }
    }
    let from = format!("file:{}", input.display());
    let args = ["inbox", "consume", "--from", from.as_str(), "--group", "c"];
    let stored = || async {
        sqlx_count(
            &db,
            "SELECT count(*) FROM inbox_events WHERE consumer_group = 'c'",
        )
        .await
    };
    let mut consumer = omnibox(dir.path(), &via, &schema, &args, "consume.log");
    wait_until("inbox consume stores", Duration::from_secs(60), || async {
        stored().await >= 5_000
    })
    .await;
    let frozen_at = Instant::now();
    proxy.freeze();
    // It stops when its next call waits on a lost connection; when that
    // call went to a connection idle for over a second, the ping before it
    // is given up after the pool's 10 s wait and it carries on through new
    // connections to the end of the file (exit 0). Neither is a hang.
    let code = exits(
        &mut consumer,
        frozen_at,
        Duration::from_secs(10),
        Duration::from_secs(60),
    )
    .await;
    if code == 0 {
        let log = std::fs::read_to_string(dir.path().join("consume.log")).unwrap();
        assert!(log.contains("the database cannot be reached"), "{log}");
    } else {
        assert_eq!(code, 1, "inbox consume's exit code");
        assert_said_why(dir.path(), "consume.log");
    }
    // The lost connections stay open on the server meanwhile.
    let mut again = omnibox(
        dir.path(),
        &via,
        &schema,
        &[&args[..], &["--once"]].concat(),
        "consume-again.log",
    );
    let code = exits(
        &mut again,
        Instant::now(),
        Duration::ZERO,
        Duration::from_secs(120),
    )
    .await;
    let log = std::fs::read_to_string(dir.path().join("consume-again.log")).unwrap();
    assert_eq!(code, 0, "{log}");
    assert_eq!(stored().await, lines, "each message stored once");
    proxy.release();
}

/// `inbox consume` from a pipe cannot stop (the lines it holds would be
/// lost): it warns and stores its batch again on a new connection, and
/// every line is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consume_from_a_pipe_carries_on_when_its_connections_are_lost_without_a_reset() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let schema = db.schema().to_string();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(target(&db.url)).await;
    let via = through(&db.url, proxy.addr);
    let log = std::fs::File::create(dir.path().join("pipe.log")).unwrap();
    let mut consumer = Running(
        Command::new(env!("CARGO_BIN_EXE_omnibox"))
            .args([
                "inbox", "consume", "--from", "-", "--group", "p", "--batch", "50",
            ])
            .current_dir(dir.path())
            .env_clear()
            .env("NO_COLOR", "1")
            .env("OMNIBOX_DATABASE_URL", &via)
            .env("OMNIBOX_DATABASE_SCHEMA", &schema)
            .env("OMNIBOX_STATEMENT_TIMEOUT", "1s")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut stdin = consumer.0.stdin.take().unwrap();
    let write = |stdin: &mut std::process::ChildStdin, from: usize, to: usize| {
        use std::io::Write;
        for i in from..to {
            writeln!(
                stdin,
                r#"{{"message_id":"p{i}","event_type":"order.created","payload":{{"n":{i}}}}}"#
            )
            .unwrap();
        }
        stdin.flush().unwrap();
    };
    let stored = || async {
        sqlx_count(
            &db,
            "SELECT count(*) FROM inbox_events WHERE consumer_group = 'p'",
        )
        .await
    };
    write(&mut stdin, 0, 1000);
    wait_until("inbox consume stores", Duration::from_secs(60), || async {
        stored().await == 1000
    })
    .await;
    // Lines arrive while the connections are lost: the batch in hand waits
    // on a call that never returns.
    proxy.freeze();
    write(&mut stdin, 1000, 2000);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(
        consumer.0.try_wait().unwrap().is_none(),
        "inbox consume from a pipe stopped: {}",
        std::fs::read_to_string(dir.path().join("pipe.log")).unwrap()
    );
    write(&mut stdin, 2000, 3000);
    drop(stdin);
    let code = exits(
        &mut consumer,
        Instant::now(),
        Duration::ZERO,
        Duration::from_secs(60),
    )
    .await;
    let text = std::fs::read_to_string(dir.path().join("pipe.log")).unwrap();
    assert_eq!(code, 0, "{text}");
    // Said as an outage: the call taken for lost, or (its connection idle
    // for over a second) the ping before it given up.
    assert!(text.contains("the database cannot be reached"), "{text}");
    assert_eq!(stored().await, 3000, "each line stored once");
    proxy.release();
}

/// The watchdog itself, deterministically, in the library: a call that
/// waits (here on a table another session has locked, with no statement
/// timeout on the store) past `RunOptions::stall_limit` ends the run with
/// an outage naming the call; the rows stay pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_ends_a_run_whose_call_waits_past_the_stall_limit() {
    use omnibox::pipeline::{ProcessorOptions, RunMode, RunOptions, Sleep, run};
    let Some(db) = common::postgres().await else {
        return;
    };
    let events: Vec<_> = (0..10)
        .map(|i| {
            DomainService::default()
                .create_outbox_event(NewOutboxEvent::new(
                    "order",
                    uuid::Uuid::now_v7(),
                    "order.created",
                    "orders",
                    format!("k{i}"),
                    json!({ "n": i }),
                ))
                .unwrap()
        })
        .collect();
    db.store.outbox().create_many(&events).await.unwrap();
    let omnibox::AnyStore::Postgres(pg) = &db.store else {
        unreachable!("a PostgreSQL test")
    };
    let mut locker = pg.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE outbox_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let sink =
        Arc::new(omnibox::relay::AnySink::from_url("null", &[], Duration::from_secs(5)).unwrap());
    let processor = omnibox::relay::publisher(
        db.store.outbox(),
        sink,
        ProcessorOptions::new(omnibox::WorkerId::new("stalled").unwrap()),
        Duration::from_secs(5),
    )
    .build();
    let options = RunOptions {
        mode: RunMode::Watch,
        stall_limit: Some(Duration::from_secs(2)),
        ..RunOptions::default()
    };
    let (_tx, rx) = watch::channel(false);
    let started = Instant::now();
    let ran = tokio::time::timeout(
        Duration::from_secs(30),
        run(&processor, &options, rx, &mut Sleep, |_| {}),
    )
    .await
    .expect("the run ended within 30 s");
    let took = started.elapsed();
    let error = ran.expect_err("a stalled run is an error");
    assert!(matches!(error, omnibox::Error::Outage(_)), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("has not answered a claim in 2s (the limit is 2s")
            && text.contains("stopping so that the process is started again"),
        "{text}"
    );
    assert!(took >= Duration::from_secs(2), "{took:?}");
    locker.rollback().await.unwrap();
    wait_until(
        "the claim it left is rolled back",
        Duration::from_secs(10),
        || async {
            let c = db.store.outbox().counts().await.unwrap();
            c.pending == 10 && c.locked == 0
        },
    )
    .await;

    // The consumer's watchdog, on a file (a source that gives its lines
    // again): its insert waits on the locked inbox.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        (0..100)
            .map(|i| {
                format!(
                    "{{\"message_id\":\"m{i}\",\"event_type\":\"e\",\"payload\":{{\"n\":{i}}}}}\n"
                )
            })
            .collect::<String>(),
    )
    .unwrap();
    let mut locker = pg.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE inbox_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let source = omnibox::inbox::FileSource::open(input.to_str().unwrap(), false)
        .await
        .unwrap();
    let mut options =
        omnibox::inbox::ConsumeOptions::new("g", omnibox::WorkerId::new("stalled").unwrap());
    options.stall_limit = Some(Duration::from_secs(2));
    let mut consumer = omnibox::inbox::InboxConsumer::<_, omnibox::inbox::AnyHandler>::new(
        source,
        db.store.inbox(),
        None,
        options,
    );
    let (_tx, rx) = watch::channel(false);
    let ran = tokio::time::timeout(Duration::from_secs(30), consumer.run(true, rx))
        .await
        .expect("the consumer stopped within 30 s");
    let error = ran.expect_err("a stalled consumer is an error");
    let text = error.to_string();
    assert!(
        text.contains("has not answered an inbox write in 2s"),
        "{text}"
    );
    locker.rollback().await.unwrap();
}

async fn sqlx_count(db: &common::TestDb, sql: &'static str) -> u64 {
    let omnibox::AnyStore::Postgres(pg) = &db.store else {
        unreachable!("a PostgreSQL test")
    };
    let n: i64 = sqlx::query_scalar(sql).fetch_one(pg.pool()).await.unwrap();
    n as u64
}
