//! The `memory` scenario: how much memory the commands that hold events
//! need, on an input of large events. Peak resident set size of each
//! command, as the kernel reports it for the finished process (`wait4`'s
//! `ru_maxrss`, what `/usr/bin/time -v` prints as "Maximum resident set
//! size"), on PostgreSQL and on SQLite:
//!
//! 1. `omnibox enqueue --jsonl FILE` of the whole input (one transaction);
//! 2. `omnibox publish --once --broker null` with the default batch, then
//!    (the rows put back to pending by SQL) with `--batch 1000`;
//! 3. (rows pending again) `omnibox publish --once --broker file:...`,
//!    which writes the input of
//! 4. `omnibox inbox consume --from file:... --once`.
//!
//! The input: `--events` events (1,000 unless given) of
//! `OMNIBOX_BENCH_EVENT_BYTES` bytes of payload each as compact JSON
//! (500,000 by default: a 500 MB input), half of it one long string (an
//! attachment, random letters so PostgreSQL cannot compress it away), half
//! an array of small objects (line items: many small values, the shape
//! that costs most once parsed; `OMNIBOX_BENCH_SHAPE=string` makes all of
//! it the string). 100 keys. Every step is checked (rows in the table, rows
//! completed) before its figure is reported.
//!
//! `OMNIBOX_BENCH_BIN` runs another omnibox binary (an older build, to
//! compare) instead of this tree's release binary; `OMNIBOX_BENCH_ARGS`
//! adds arguments to every publish and consume (e.g. `--batch-bytes 8MiB`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::json;

use super::{Args, Db, results_file};

/// One measured run.
struct Measured {
    max_rss_kib: u64,
    seconds: f64,
}

fn binary() -> PathBuf {
    std::env::var_os("OMNIBOX_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(super::bin)
}

/// Runs omnibox with `args` (and `env`), waits for it with `wait4`, and
/// returns its peak RSS; panics (with its stderr) when it fails.
fn measure(args: &[&str], env: &[(&str, &str)], stdin: Option<&Path>, logs: &Path) -> Measured {
    let stderr_path = logs.join("stderr.txt");
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    cmd.stdin(match stdin {
        Some(p) => Stdio::from(std::fs::File::open(p).expect("open input")),
        None => Stdio::null(),
    });
    let start = Instant::now();
    let child = cmd.spawn().expect("run omnibox");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed is a valid rusage; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    // `child` was reaped by wait4: dropping it does not wait.
    drop(child);
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        panic!(
            "omnibox {args:?} failed (wait status {status}):\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
    }
    Measured {
        // Linux reports ru_maxrss in KiB.
        max_rss_kib: usage.ru_maxrss as u64,
        seconds,
    }
}

/// The input: `n` events of about `bytes` bytes of payload each; `items`:
/// half of each payload in small objects (else all of it one string).
fn write_input(path: &Path, n: usize, bytes: usize, items: bool) -> u64 {
    let mut rng = fastrand::Rng::with_seed(42);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    let letters = |rng: &mut fastrand::Rng, len: usize| -> String {
        (0..len).map(|_| rng.alphanumeric()).collect()
    };
    let mut total = 0u64;
    for i in 0..n {
        let items_bytes = if items { bytes / 2 } else { 0 };
        let mut list = Vec::new();
        let mut used = 0;
        while used < items_bytes {
            let item = json!({
                "sku": format!("SKU-{:06}", rng.u32(..1_000_000)),
                "qty": rng.u32(1..10),
                "price": rng.u32(100..100_000) as f64 / 100.0,
                "note": letters(&mut rng, 150),
            });
            used += item.to_string().len() + 1;
            list.push(item);
        }
        let mut payload = json!({"order": i, "items": list, "attachment": ""});
        let rest = bytes.saturating_sub(payload.to_string().len());
        payload["attachment"] = json!(letters(&mut rng, rest));
        let key = format!("order-{}", i % 100);
        let line = json!({
            "aggregate_type": "order",
            "aggregate_id": format!("00000000-0000-7000-8000-{:012}", i % 100),
            "event_type": "order.archived",
            "topic": "orders.archive",
            "partition_key": key,
            "payload": payload,
        });
        let text = line.to_string();
        total += text.len() as u64 + 1;
        writeln!(out, "{text}").expect("write input");
    }
    out.flush().expect("write input");
    total
}

/// A database the scenario runs on: its URL and schema, and SQL for the
/// checks and resets outside the measured runs.
enum Backend {
    Postgres {
        db: Db,
        url: String,
        schema: String,
    },
    Sqlite {
        rt: tokio::runtime::Runtime,
        pool: sqlx::SqlitePool,
        url: String,
    },
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Postgres { .. } => "postgres",
            Backend::Sqlite { .. } => "sqlite",
        }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        match self {
            Backend::Postgres { url, schema, .. } => vec![
                ("OMNIBOX_DATABASE_URL", url.as_str()),
                ("OMNIBOX_DATABASE_SCHEMA", schema.as_str()),
            ],
            Backend::Sqlite { url, .. } => vec![("OMNIBOX_DATABASE_URL", url.as_str())],
        }
    }

    fn count(&self, table: &str, condition: &str) -> u64 {
        match self {
            Backend::Postgres { db, schema, .. } => db
                .scalar(format!(
                    "SELECT count(*)::text FROM {schema}.{table} WHERE {condition}"
                ))
                .parse()
                .unwrap(),
            Backend::Sqlite { rt, pool, .. } => {
                let n: i64 = rt
                    .block_on(
                        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                            "SELECT count(*) FROM {table} WHERE {condition}"
                        )))
                        .fetch_one(pool),
                    )
                    .expect("count");
                n as u64
            }
        }
    }

    /// Every outbox row back to pending (for the next relay run).
    fn requeue(&self) {
        let sql = "UPDATE {t}outbox_events SET status = 'pending', completed_at = NULL";
        match self {
            Backend::Postgres { db, schema, .. } => {
                db.exec(sql.replace("{t}", &format!("{schema}.")));
                db.exec(format!("VACUUM {schema}.outbox_events"));
            }
            Backend::Sqlite { rt, pool, .. } => {
                rt.block_on(sqlx::query(sqlx::AssertSqlSafe(sql.replace("{t}", ""))).execute(pool))
                    .expect("requeue");
            }
        }
    }

    fn drop_all(self) {
        if let Backend::Postgres { db, schema, .. } = self {
            db.exec(format!("DROP SCHEMA {schema} CASCADE"));
        }
    }
}

pub fn memory(args: &Args, url: &str) {
    // The harness's --events default (20,000) is for small events.
    let given = std::env::args().any(|a| a == "--events" || a.starts_with("--events="));
    let n = if given { args.events } else { 1000 };
    let bytes: usize = std::env::var("OMNIBOX_BENCH_EVENT_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let items = std::env::var("OMNIBOX_BENCH_SHAPE").as_deref() != Ok("string");
    let extra: Vec<String> = std::env::var("OMNIBOX_BENCH_ARGS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let input_bytes = write_input(&input, n, bytes, items);
    println!(
        "memory: {n} events of {bytes} payload bytes{} ({:.0} MiB of JSON lines); binary {}{}",
        if items {
            ", half of it small objects"
        } else {
            ", one string"
        },
        input_bytes as f64 / (1 << 20) as f64,
        binary().display(),
        if extra.is_empty() {
            String::new()
        } else {
            format!("; publish/consume also get {}", extra.join(" "))
        }
    );
    let mut results = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(results_file())
        .unwrap();
    let mut rows: Vec<(String, String, Measured)> = Vec::new();
    for backend_name in ["postgres", "sqlite"] {
        let backend = match backend_name {
            "postgres" => {
                let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
                Backend::Postgres {
                    db: Db::new(url),
                    url: url.to_string(),
                    schema,
                }
            }
            _ => {
                let path = dir.path().join("omnibox.db");
                let url = format!("sqlite://{}", path.display());
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                // Created and migrated by the first command; connected after.
                Backend::Sqlite {
                    pool: rt.block_on(async {
                        sqlx::sqlite::SqlitePoolOptions::new()
                            .connect_lazy(&format!("{url}?mode=rwc"))
                            .expect("sqlite pool")
                    }),
                    rt,
                    url,
                }
            }
        };
        let env = backend.env();
        measure(&["migrate", "-q"], &env, None, dir.path());
        let step = |label: String, argv: Vec<&str>| -> Measured {
            let m = measure(&argv, &env, None, dir.path());
            println!(
                "  {:<8} {label:<60} peak RSS {:>7.1} MiB  ({:.1} s)",
                backend.name(),
                m.max_rss_kib as f64 / 1024.0,
                m.seconds
            );
            m
        };
        let enqueue = step(
            "omnibox enqueue --jsonl events.jsonl".into(),
            vec!["enqueue", "--jsonl", input.to_str().unwrap(), "-q"],
        );
        assert_eq!(backend.count("outbox_events", "true"), n as u64);
        rows.push((backend.name().into(), "enqueue --jsonl".into(), enqueue));
        let sink_file = dir.path().join("published.jsonl");
        let sink = format!("file:{}", sink_file.display());
        let relays: Vec<(String, Vec<&str>)> = vec![
            (
                "publish --once --broker null".into(),
                vec!["publish", "--once", "--broker", "null", "-q"],
            ),
            (
                "publish --once --broker null --batch 1000".into(),
                vec![
                    "publish", "--once", "--broker", "null", "--batch", "1000", "-q",
                ],
            ),
            (
                "publish --once --broker file:published.jsonl".into(),
                vec!["publish", "--once", "--broker", &sink, "-q"],
            ),
        ];
        for (i, (label, mut argv)) in relays.into_iter().enumerate() {
            if i > 0 {
                backend.requeue();
                assert_eq!(
                    backend.count("outbox_events", "status = 'pending'"),
                    n as u64
                );
            }
            argv.extend(extra.iter().copied());
            let m = step(format!("omnibox {label}"), argv);
            assert_eq!(
                backend.count("outbox_events", "status = 'completed'"),
                n as u64,
                "{label}: every event completed"
            );
            rows.push((backend.name().into(), label, m));
        }
        let mut argv = vec![
            "inbox", "consume", "--from", &sink, "--once", "--group", "bench", "-q",
        ];
        argv.extend(extra.iter().copied());
        let m = step(
            "omnibox inbox consume --from file:published.jsonl --once".into(),
            argv,
        );
        assert_eq!(backend.count("inbox_events", "true"), n as u64);
        rows.push((
            backend.name().into(),
            "inbox consume --from file:... --once".into(),
            m,
        ));
        std::fs::remove_file(&sink_file).ok();
        backend.drop_all();
    }
    for (backend, command, m) in &rows {
        let line = json!({
            "scenario": "omnibox_memory",
            "events": n,
            "seconds": m.seconds,
            "max_rss_mib": m.max_rss_kib as f64 / 1024.0,
            "params": {
                "backend": backend,
                "command": command,
                "payload_bytes": bytes,
                "payload_shape": if items { "half items" } else { "string" },
                "input_bytes": input_bytes,
                "extra_args": extra,
            },
            "verified": true,
        });
        writeln!(results, "{line}").unwrap();
    }
    println!(
        "memory: peak RSS per command (MiB)\n  command: bench/run.sh memory{}  # {n} x {bytes} B",
        if given {
            format!(" --events {n}")
        } else {
            String::new()
        }
    );
    println!("  {:<48} {:>10} {:>10}", "", "postgres", "sqlite");
    let commands: Vec<&String> = {
        let mut c: Vec<&String> = Vec::new();
        for (_, command, _) in &rows {
            if !c.contains(&command) {
                c.push(command);
            }
        }
        c
    };
    for command in commands {
        let of = |b: &str| {
            rows.iter()
                .find(|(backend, c, _)| backend == b && c == command)
                .map_or("-".to_string(), |(_, _, m)| {
                    format!("{:.1}", m.max_rss_kib as f64 / 1024.0)
                })
        };
        println!(
            "  {command:<48} {:>10} {:>10}",
            of("postgres"),
            of("sqlite")
        );
    }
}
