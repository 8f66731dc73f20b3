//! The `latency` scenario: how long an event waits between its INSERT and
//! its publication while a relay runs as users run it (`omnibox publish`,
//! watch mode, woken by LISTEN/NOTIFY, null sink).
//!
//! Rows are inserted by plain SQL at a steady rate (`--rate`, events/s) for
//! `--seconds`, each in its own transaction on one of 16 connections, with
//! `created_at` from the database clock (the column's default, `now()`).
//! The relay is started before the first insert and runs throughout. When
//! the inserts stop and every row is completed, the percentiles of
//! `completed_at - created_at` are read from the table (`completed_at` is
//! the database clock when the relay's completion statement started, after
//! the sink took the message).
//!
//! The breakdown: a trigger on the bench schema's table keeps each row's
//! claim time (`locked_at` when it was claimed), so the wait splits into
//! insert → claimed (the insert's commit, the notification, the relay's
//! wake-up and its claim) and claimed → completed (the sink and the
//! pipeline up to the completion). The inserting client also times each
//! INSERT's statement (its commit included), and notes when the INSERT's
//! commit was acknowledged: committed → completed, from that moment to
//! `completed_at`, is the relay's share of the wait (`created_at` is the
//! transaction's start, so insert → completed also holds the INSERT's own
//! commit, which on a busy disk stalls for tens of milliseconds).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Args, Conn, bin, results_file};

/// The trigger that keeps each row's claim time (bench schema only).
const CLAIM_TIME_TRIGGER: &[&str] = &[
    "ALTER TABLE outbox_events ADD COLUMN bench_claimed_at timestamptz",
    "CREATE FUNCTION bench_claimed_at() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
        IF NEW.locked_at IS NOT NULL AND OLD.locked_at IS NULL AND OLD.bench_claimed_at IS NULL THEN
            NEW.bench_claimed_at := NEW.locked_at;
        END IF;
        RETURN NEW;
     END $$",
    "CREATE TRIGGER bench_claimed_at BEFORE UPDATE ON outbox_events
        FOR EACH ROW EXECUTE FUNCTION bench_claimed_at()",
];

pub fn latency(args: &Args, conn: &Conn) {
    // The relay connects as the connection kind says; the inserts (the
    // application) and the checks connect directly.
    let (url, relay_url) = (conn.setup.as_str(), conn.url.as_str());
    use omnibox::store::postgres::{PgOptions, PgStore};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rate = args.rate.max(1);
    let seconds = args.seconds.max(1);
    let wal = args.relay_source == "wal";
    let command = format!(
        "bench/run.sh latency --rate {rate} --seconds {seconds} --batch {} --conn {}{}",
        args.batch,
        args.conn,
        if wal {
            " --relay-source wal".to_string()
        } else {
            format!(" --hold {}", args.hold)
        }
    );
    let mut results = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(results_file())
        .unwrap();
    let mut p99s = Vec::new();
    for round in 1..=args.rounds {
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let store = rt.block_on(async {
            let opts = PgOptions {
                schema: Some(schema.clone()),
                max_connections: 16,
                ..PgOptions::default()
            };
            let store = PgStore::connect(url, &opts).await.expect("connect");
            store.migrate().await.expect("migrate");
            for sql in CLAIM_TIME_TRIGGER {
                sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                    .execute(store.pool())
                    .await
                    .expect("bench trigger");
            }
            store
        });
        // The relay, as users run it: watch mode, notifications (or the
        // write-ahead log, a slot of the round's own), null sink.
        let mut relay = Command::new(bin())
            .args([
                "publish",
                "--broker",
                "null",
                "--batch",
                &args.batch.to_string(),
            ])
            .args(if wal {
                vec![
                    "--source",
                    "wal",
                    "--slot",
                    &schema,
                    "--publication",
                    &schema,
                ]
            } else {
                vec!["--hold", args.hold.as_str()]
            })
            .env("OMNIBOX_DATABASE_URL", relay_url)
            .env("OMNIBOX_DATABASE_SCHEMA", &schema)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the relay");
        // Let it connect and LISTEN (or hold its slot) before the first
        // insert.
        std::thread::sleep(Duration::from_secs(1));
        if wal {
            rt.block_on(async {
                for _ in 0..100 {
                    let active: Option<bool> = sqlx::query_scalar(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    )
                    .bind(&schema)
                    .fetch_optional(store.pool())
                    .await
                    .unwrap();
                    if active == Some(true) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("the WAL relay did not hold its slot within 10 s");
            });
        }

        let inserted = Arc::new(AtomicU64::new(0));
        let (insert_times, elapsed) = rt.block_on(async {
            let limit = Arc::new(tokio::sync::Semaphore::new(64));
            let total = rate * seconds;
            let started = Instant::now();
            let mut handles = Vec::with_capacity(total as usize);
            let mut interval = tokio::time::interval(Duration::from_millis(1));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut issued = 0u64;
            while issued < total {
                interval.tick().await;
                let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
                while issued < due {
                    let permit = Arc::clone(&limit).acquire_owned().await.unwrap();
                    let pool = store.pool().clone();
                    let inserted = Arc::clone(&inserted);
                    let n = issued;
                    handles.push(tokio::spawn(async move {
                        let id = uuid::Uuid::now_v7();
                        let t = Instant::now();
                        sqlx::query(
                            "INSERT INTO outbox_events (id, event_type, payload, aggregate_type,
                                 aggregate_id, topic, partition_key)
                             VALUES ($1, 'order.created', $2, 'order', $1, 'bench-latency', $3)",
                        )
                        .bind(id)
                        .bind(json!({"order_id": id, "seq": n, "amount_cents": 1000 + n % 5000}))
                        .bind(id.to_string())
                        .execute(&pool)
                        .await
                        .expect("insert");
                        // The commit as the application saw it: its
                        // acknowledgement (the database clock is this
                        // machine's clock).
                        let acked = std::time::SystemTime::now();
                        inserted.fetch_add(1, Ordering::Relaxed);
                        drop(permit);
                        (id, t.elapsed(), acked)
                    }));
                    issued += 1;
                }
            }
            let mut times = Vec::with_capacity(handles.len());
            for h in handles {
                times.push(h.await.unwrap());
            }
            let elapsed = started.elapsed();
            (times, elapsed)
        });
        let inserted = inserted.load(Ordering::Relaxed);
        // Wait for the relay to complete every row.
        let drained = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let pending: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM outbox_events WHERE status <> 'completed'",
                )
                .fetch_one(store.pool())
                .await
                .unwrap();
                if pending == 0 {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let _ = Command::new("kill")
            .args(["-TERM", &relay.id().to_string()])
            .status();
        let _ = relay.wait();
        if wal {
            rt.block_on(async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
                    .bind(&schema)
                    .execute(store.pool())
                    .await;
                let ddl = format!("DROP PUBLICATION IF EXISTS {schema}");
                let _ = sqlx::query(sqlx::AssertSqlSafe(ddl))
                    .execute(store.pool())
                    .await;
            });
        }
        let stats: Vec<f64> = rt.block_on(async {
            let q = |expr: &'static str| {
                let pool = store.pool().clone();
                async move {
                    let sql = format!(
                        "SELECT ARRAY[
                           percentile_cont(0.5) WITHIN GROUP (ORDER BY v),
                           percentile_cont(0.9) WITHIN GROUP (ORDER BY v),
                           percentile_cont(0.99) WITHIN GROUP (ORDER BY v),
                           max(v)]::float8[]
                         FROM (SELECT 1000 * extract(epoch FROM {expr})::float8 AS v
                                 FROM outbox_events WHERE status = 'completed') s"
                    );
                    sqlx::query_scalar::<_, Vec<f64>>(sqlx::AssertSqlSafe(sql))
                        .fetch_one(&pool)
                        .await
                        .unwrap()
                }
            };
            let mut all = q("completed_at - created_at").await;
            all.extend(q("bench_claimed_at - created_at").await);
            all.extend(q("completed_at - bench_claimed_at").await);
            all
        });
        // Committed → completed: from the INSERT's acknowledgement to the
        // relay's completion, the relay's share (the INSERT's own commit,
        // which the relay cannot shorten, left out). Negative when the
        // relay completed the row before the acknowledgement reached the
        // inserting client; counted as 0.
        let completed: std::collections::HashMap<uuid::Uuid, f64> = rt.block_on(async {
            sqlx::query_as::<_, (uuid::Uuid, f64)>(
                "SELECT id, extract(epoch FROM completed_at)::float8 FROM outbox_events
                  WHERE status = 'completed'",
            )
            .fetch_all(store.pool())
            .await
            .unwrap()
            .into_iter()
            .collect()
        });
        let mut after_commit: Vec<f64> = insert_times
            .iter()
            .filter_map(|(id, _, acked)| {
                let acked = acked
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs_f64();
                completed
                    .get(id)
                    .map(|done| ((done - acked) * 1000.0).max(0.0))
            })
            .collect();
        after_commit.sort_by(|a, b| a.total_cmp(b));
        let mut times: Vec<f64> = insert_times
            .iter()
            .map(|(_, d, _)| d.as_secs_f64() * 1000.0)
            .collect();
        times.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
        let pct_after = |p: f64| {
            after_commit
                .get(
                    ((after_commit.len() as f64 * p) as usize)
                        .min(after_commit.len().saturating_sub(1)),
                )
                .copied()
                .unwrap_or(f64::NAN)
        };
        let achieved = inserted as f64 / elapsed.as_secs_f64();
        println!(
            "latency round {round}: {inserted} rows at {achieved:.0}/s (asked {rate}/s) for {seconds} s; \
             insert→completed p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
             insert→claimed p50 {:.1} / p99 {:.1} / max {:.1} ms; claimed→completed p50 {:.1} / p99 {:.1} / max {:.1} ms; \
             INSERT statement (commit included) p50 {:.1} / p99 {:.1} ms; \
             committed→completed (from the INSERT's acknowledgement) p50 {:.1} / p99 {:.1} / max {:.1} ms{}",
            stats[0],
            stats[1],
            stats[2],
            stats[3],
            stats[4],
            stats[6],
            stats[7],
            stats[8],
            stats[10],
            stats[11],
            pct(0.5),
            pct(0.99),
            pct_after(0.5),
            pct_after(0.99),
            pct_after(1.0),
            if drained {
                ""
            } else {
                " (NOT all rows completed within 60 s)"
            }
        );
        writeln!(
            results,
            "{}",
            json!({
                "scenario": "latency", "round": round, "rate": rate, "achieved_rate": achieved,
                "seconds": seconds, "batch": args.batch, "rows": inserted, "drained": drained,
                "p50_ms": stats[0], "p90_ms": stats[1], "p99_ms": stats[2], "max_ms": stats[3],
                "claim_p50_ms": stats[4], "claim_p99_ms": stats[6], "claim_max_ms": stats[7],
                "after_claim_p50_ms": stats[8], "after_claim_p99_ms": stats[10],
                "after_claim_max_ms": stats[11],
                "insert_p50_ms": pct(0.5), "insert_p99_ms": pct(0.99),
                "committed_p50_ms": pct_after(0.5), "committed_p99_ms": pct_after(0.99),
                "committed_max_ms": pct_after(1.0),
                "command": command, "conn": conn.kind, "conn_detail": conn.detail,
            })
        )
        .unwrap();
        p99s.push(stats[2]);
        rt.block_on(async {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(store.pool())
                .await
                .ok();
            store.close().await;
        });
    }
    p99s.sort_by(|a, b| a.total_cmp(b));
    println!(
        "latency: median p99 {:.1} ms (min {:.1}, max {:.1}, {} rounds)\n  command: {command}",
        p99s[p99s.len() / 2],
        p99s[0],
        p99s[p99s.len() - 1],
        p99s.len()
    );
}

use std::io::Write as _;
