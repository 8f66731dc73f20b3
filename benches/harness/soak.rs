//! The `soak` scenario: sustained load as production has it, to find what
//! drifts. For `--seconds` (1800), rows are inserted by SQL at `--rate`
//! (2,000 events/s: multi-row INSERTs every 10 ms on 8 connections), while
//!
//! * `omnibox publish --broker file:PATH` relays them (watch mode),
//! * `omnibox inbox consume --from file:PATH --follow` reads that file into
//!   the inbox (exactly-once, no handler) and `omnibox inbox process
//!   --webhook URL` hands the rows to a local endpoint answering 200, so
//!   they complete as a service's would, and
//! * `omnibox cleanup --older-than 2m` runs every minute as cron would
//!   (the inbox's deduplication window set to 1m for it, so it deletes).
//!
//! Every `--every` seconds (300) it prints one line: rows inserted,
//! published and consumed in the window (events/s), the insert→completed
//! p50/p99 of the rows the relay completed in the window's last minute,
//! the pending backlog, and for both tables the heap and index sizes, live
//! and dead tuples and autovacuum runs so far. At the end it compares the
//! first window with the last: a figure that moved by more than 20 % is
//! flagged DRIFT.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Args, Conn, bin, results_file};

/// A webhook endpoint on 127.0.0.1 that answers every request with 200
/// (HTTP/1.1, keep-alive), for the consumer's handler.
fn ok_endpoint() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the webhook endpoint");
    let addr = listener.local_addr().expect("its address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || answer_ok(stream));
        }
    });
    addr
}

fn answer_ok(mut s: std::net::TcpStream) {
    use std::io::{Read, Write};
    let _ = s.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let total = head_end + 4 + len;
        while buf.len() < total {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..total);
        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Window {
    inserted_per_s: f64,
    published_per_s: f64,
    consumed_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    backlog: i64,
    outbox_heap_mb: f64,
    outbox_index_mb: f64,
    outbox_dead: i64,
    inbox_heap_mb: f64,
    inbox_index_mb: f64,
    inbox_dead: i64,
    autovacuums: i64,
}

pub fn soak(args: &Args, conn: &Conn) {
    // omnibox connects as the connection kind says; the inserts (the
    // application) and the checks connect directly.
    let (url, omnibox_url) = (conn.setup.as_str(), conn.url.as_str());
    use omnibox::store::postgres::{PgOptions, PgStore};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rate = args.rate.max(1);
    let seconds = args.seconds.max(1);
    let every = args.every.clamp(1, seconds);
    let command = format!(
        "bench/run.sh soak --rate {rate} --seconds {seconds} --every {every} --conn {} --hold {}",
        args.conn, args.hold
    );
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, "").unwrap();
    let store = rt.block_on(async {
        let opts = PgOptions {
            schema: Some(schema.clone()),
            max_connections: 10,
            ..PgOptions::default()
        };
        let store = PgStore::connect(url, &opts).await.expect("connect");
        store.migrate().await.expect("migrate");
        store
    });
    let spawn = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .env("OMNIBOX_DATABASE_URL", omnibox_url)
            .env("OMNIBOX_DATABASE_SCHEMA", &schema)
            .env("OMNIBOX_DEDUP_WINDOW", "1m")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start omnibox")
    };
    let broker = format!("file:{}", file.display());
    // The consumer stores the messages (exactly-once, no handler) and
    // `inbox process` hands them to a webhook endpoint answering 200, so
    // the rows complete (and cleanup deletes them) as a service's would;
    // without it they would stay pending and the inbox would only grow.
    let webhook = format!("http://{}/handled", ok_endpoint());
    let children = Killed(vec![
        spawn(&["publish", "--broker", &broker, "--hold", &args.hold]),
        spawn(&["inbox", "consume", "--from", &broker, "--follow"]),
        spawn(&[
            "inbox",
            "process",
            "--webhook",
            &webhook,
            "--batch",
            "500",
            "--concurrency",
            "16",
        ]),
    ]);
    std::thread::sleep(Duration::from_secs(1));
    let stop = Arc::new(AtomicBool::new(false));
    let inserted = Arc::new(AtomicU64::new(0));
    // The inserters: every 10 ms the rows due by then, in one statement.
    let inserter = {
        let pool = store.pool().clone();
        let stop = Arc::clone(&stop);
        let inserted = Arc::clone(&inserted);
        rt.spawn(async move {
            let started = Instant::now();
            let limit = Arc::new(tokio::sync::Semaphore::new(8));
            let mut interval = tokio::time::interval(Duration::from_millis(10));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut issued = 0u64;
            while !stop.load(Ordering::Relaxed) {
                interval.tick().await;
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                if due <= issued {
                    continue;
                }
                let n = due - issued;
                issued = due;
                let permit = Arc::clone(&limit).acquire_owned().await.unwrap();
                let pool = pool.clone();
                let inserted = Arc::clone(&inserted);
                tokio::spawn(async move {
                    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
                    let keys: Vec<String> = ids.iter().map(|i| format!("k{}", i.as_u128() % 1000)).collect();
                    let r = sqlx::query(
                        "INSERT INTO outbox_events (id, event_type, payload, aggregate_type,
                             aggregate_id, topic, partition_key)
                         SELECT id, 'order.created',
                                jsonb_build_object('order_id', id, 'amount_cents', 1000, 'currency', 'EUR'),
                                'order', id, 'orders', key
                           FROM unnest($1::uuid[], $2::text[]) AS t(id, key)",
                    )
                    .bind(&ids)
                    .bind(&keys)
                    .execute(&pool)
                    .await;
                    if r.is_ok() {
                        inserted.fetch_add(n, Ordering::Relaxed);
                    }
                    drop(permit);
                });
            }
        })
    };
    let mut results = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(results_file())
        .unwrap();
    let started = Instant::now();
    let mut last_cleanup = Instant::now();
    let mut windows: Vec<Window> = Vec::new();
    let (mut backlog_before, mut consumed_total, mut inserted_total) = (0i64, 0i64, 0u64);
    let mut window_start = Instant::now();
    let mut cleanups = 0u32;
    // Every window is reported, the last included.
    let wanted = (seconds / every).max(1) as usize;
    while windows.len() < wanted {
        std::thread::sleep(Duration::from_millis(500));
        if last_cleanup.elapsed() >= Duration::from_secs(60) {
            last_cleanup = Instant::now();
            let out = Command::new(bin())
                .args([
                    "cleanup",
                    "--older-than",
                    "2m",
                    "--force",
                    "--yes",
                    "--quiet",
                ])
                .env("OMNIBOX_DATABASE_URL", omnibox_url)
                .env("OMNIBOX_DATABASE_SCHEMA", &schema)
                .env("OMNIBOX_DEDUP_WINDOW", "1m")
                .output()
                .expect("cleanup");
            if !out.status.success() {
                eprintln!("cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            cleanups += 1;
        }
        if window_start.elapsed() < Duration::from_secs(every) {
            continue;
        }
        let secs = window_start.elapsed().as_secs_f64();
        window_start = Instant::now();
        let w = rt.block_on(async {
            let pool = store.pool();
            // The inbox's insert counter survives cleanup's deletes.
            let consumed: i64 = sqlx::query_scalar(
                "SELECT coalesce(n_tup_ins, 0)::int8 FROM pg_stat_user_tables WHERE relid = 'inbox_events'::regclass",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            let lat: Vec<Option<f64>> = sqlx::query_scalar(
                "SELECT ARRAY[
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY v),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY v)]::float8[]
                   FROM (SELECT 1000 * extract(epoch FROM completed_at - created_at)::float8 AS v
                           FROM outbox_events
                          WHERE status = 'completed' AND completed_at > now() - interval '60 seconds') s",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            let backlog: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox_events WHERE status = 'pending'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            let size = |t: &'static str| {
                let pool = pool.clone();
                async move {
                    sqlx::query_as::<_, (i64, i64, i64, i64)>(sqlx::AssertSqlSafe(format!(
                        "SELECT pg_relation_size('{t}'), pg_indexes_size('{t}'), n_dead_tup,
                                autovacuum_count + vacuum_count
                           FROM pg_stat_user_tables WHERE relid = '{t}'::regclass"
                    )))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                }
            };
            let o = size("outbox_events").await;
            let i = size("inbox_events").await;
            (consumed, lat, backlog, o, i)
        });
        let (consumed, lat, backlog, o, i) = w;
        let ins = inserted.load(Ordering::Relaxed);
        // Published in the window: inserted, less what the backlog grew.
        let published_rows = (ins - inserted_total) as i64 - (backlog - backlog_before);
        backlog_before = backlog;
        let window = Window {
            inserted_per_s: (ins - inserted_total) as f64 / secs,
            published_per_s: published_rows as f64 / secs,
            consumed_per_s: (consumed - consumed_total) as f64 / secs,
            p50_ms: lat.first().copied().flatten().unwrap_or(f64::NAN),
            p99_ms: lat.get(1).copied().flatten().unwrap_or(f64::NAN),
            backlog,
            outbox_heap_mb: o.0 as f64 / 1048576.0,
            outbox_index_mb: o.1 as f64 / 1048576.0,
            outbox_dead: o.2,
            inbox_heap_mb: i.0 as f64 / 1048576.0,
            inbox_index_mb: i.1 as f64 / 1048576.0,
            inbox_dead: i.2,
            autovacuums: o.3 + i.3,
        };
        consumed_total = consumed;
        inserted_total = ins;
        let minute = started.elapsed().as_secs() / 60;
        println!(
            "soak t={minute:>3} min: inserted {:.0}/s, published {:.0}/s, consumed {:.0}/s; p50 {:.1} ms, p99 {:.1} ms; backlog {}; \
             outbox heap {:.1} MB, indexes {:.1} MB, dead {}; inbox heap {:.1} MB, indexes {:.1} MB, dead {}; vacuums {}; cleanups {cleanups}",
            window.inserted_per_s,
            window.published_per_s,
            window.consumed_per_s,
            window.p50_ms,
            window.p99_ms,
            window.backlog,
            window.outbox_heap_mb,
            window.outbox_index_mb,
            window.outbox_dead,
            window.inbox_heap_mb,
            window.inbox_index_mb,
            window.inbox_dead,
            window.autovacuums
        );
        writeln!(
            results,
            "{}",
            json!({
                "scenario": "soak", "minute": minute, "rate": rate,
                "inserted_per_s": window.inserted_per_s, "published_per_s": window.published_per_s,
                "consumed_per_s": window.consumed_per_s, "p50_ms": window.p50_ms, "p99_ms": window.p99_ms,
                "backlog": window.backlog,
                "outbox_heap_mb": window.outbox_heap_mb, "outbox_index_mb": window.outbox_index_mb,
                "outbox_dead": window.outbox_dead, "inbox_heap_mb": window.inbox_heap_mb,
                "inbox_index_mb": window.inbox_index_mb, "inbox_dead": window.inbox_dead,
                "vacuums": window.autovacuums, "command": command, "conn": conn.kind, "conn_detail": conn.detail,
            })
        )
        .unwrap();
        windows.push(window);
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        let _ = inserter.await;
    });
    drop(children);
    if let (Some(first), Some(last)) = (windows.first(), windows.last())
        && windows.len() > 1
    {
        let figures: [(&str, f64, f64); 8] = [
            ("published/s", first.published_per_s, last.published_per_s),
            ("p99 ms", first.p99_ms, last.p99_ms),
            ("outbox heap MB", first.outbox_heap_mb, last.outbox_heap_mb),
            (
                "outbox indexes MB",
                first.outbox_index_mb,
                last.outbox_index_mb,
            ),
            (
                "outbox dead tuples",
                first.outbox_dead as f64,
                last.outbox_dead as f64,
            ),
            ("inbox heap MB", first.inbox_heap_mb, last.inbox_heap_mb),
            (
                "inbox indexes MB",
                first.inbox_index_mb,
                last.inbox_index_mb,
            ),
            (
                "inbox dead tuples",
                first.inbox_dead as f64,
                last.inbox_dead as f64,
            ),
        ];
        println!("soak: first window against the last:");
        for (name, a, b) in figures {
            let drift = if a.abs() > f64::EPSILON {
                (b - a) / a * 100.0
            } else {
                0.0
            };
            println!(
                "  {name:<20} {a:>10.1} -> {b:>10.1} ({drift:+.0} %){}",
                if drift.abs() > 20.0 { "  DRIFT" } else { "" }
            );
        }
    }
    println!("  command: {command}");
    rt.block_on(async {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(store.pool())
            .await
            .ok();
        store.close().await;
    });
}

use std::io::Write as _;
