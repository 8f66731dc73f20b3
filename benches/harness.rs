//! omnibox's benchmark harness: `bench/run.sh` (or `cargo bench --bench
//! harness -- SCENARIO ...`). Prints events/s with the exact command behind
//! each figure, and appends one JSON line per round to bench/results/ in the
//! shape of the Python reference's own benchmark script, for side-by-side tables.
//!
//! Scenarios:
//!   enqueue  `omnibox enqueue --jsonl` of N events into PostgreSQL (the
//!            release binary, in a fresh schema per round; includes process
//!            start, JSON parsing, validation and the inserts).
//!   inbox    exactly-once ingest of N distinct messages plus N/10
//!            redeliveries into PostgreSQL from an in-memory source (as the
//!            peer's inbox_consume), without a handler and with a trivial one.
//!            `--source file`: the same messages as a JSON lines file through
//!            `omnibox inbox consume --from file:... --once` (the release
//!            binary, whole process); `--exec CMD` adds a run with that handler.
//!            `--source kafka`: the same messages produced to a 4-partition
//!            topic (OMNIBOX_BENCH_BROKERS) and read by `omnibox inbox consume
//!            --from kafka://... --once` (whole process), beside a plain
//!            rdkafka consumer of the same topic with default settings.
//!   produce  the broker's own rate for the relay's producer settings: N
//!            messages of the same shape through the Kafka sink, B in flight
//!            at a time, no database (OMNIBOX_BENCH_BROKERS).
//!   publish  R `omnibox publish --once` processes (the release binary: what
//!            users run) draining N pending rows, batch B, K keys, to the
//!            null sink or Kafka (OMNIBOX_BENCH_BROKERS), timed from spawn
//!            to exit. Rows are seeded outside the timed region and the
//!            table is NOT analyzed (as right after a user's bulk enqueue).
//!            `--backlog M` seeds M rows and times the first N (`--limit`);
//!            `--hot H` adds one key with H rows before the others.
//!            Labelled variants: `--analyze` runs VACUUM ANALYZE before the
//!            timed part; `--mode library` runs the relays in this process.
//!
//!   latency  rows inserted by SQL at a steady `--rate` for `--seconds`
//!            while `omnibox publish --broker null` runs (watch mode,
//!            LISTEN/NOTIFY): insert→completed p50/p90/p99/max and where
//!            the time goes (see benches/harness/latency.rs).
//!
//!   soak     sustained load: `--rate` inserted for `--seconds` with a
//!            relay to a file, `inbox consume --follow` of that file and
//!            `cleanup` every minute; a report line every `--every` seconds
//!            and the drift between the first and the last (benches/harness/soak.rs).
//!
//!   proxy    only the delay proxy: `proxy --target HOST:PORT [--listen-port P]
//!            [--latency-ms 0.5]` forwards 127.0.0.1:P to the target with the
//!            delay each way until killed (or until the process that started
//!            it ends), for the Python reference's runs under latency.
//!
//!   memory   peak RSS of enqueue, publish (default batch, --batch 1000,
//!            the file sink) and inbox consume on 1,000 events of 500 KB,
//!            on PostgreSQL and SQLite (see benches/harness/memory.rs).
//!
//!   ops      the operations commands (status, list and its paging,
//!            failures, replay of 50,000 rows, unlock --dry-run, cleanup) on an
//!            outbox of N rows (`--events 10000000`): 99% completed, 50,000
//!            failed in 200 causes, 50,000 pending; each timed as a process.
//!
//! Connection kinds (`--conn`, every scenario but proxy): `plain` is the
//! URL with sslmode=disable; `tls` is the URL without an sslmode parameter
//! (sqlx's default, prefer: TLS when the server offers it, as a user's URL
//! does) and the harness checks that the server did negotiate TLS;
//! `tls-latency` is `tls` through a TCP delay proxy in this process
//! (`--latency-ms`, default 0.5 each way; see proxy.rs), and the Kafka
//! broker through a second one (the broker must advertise
//! 127.0.0.1:$OMNIBOX_BENCH_BROKERS_PROXY_PORT, where that proxy listens;
//! bench/run.sh starts tansu so). Only the timed parts use the kind's
//! connection: seeding and checks connect directly. Each result line and
//! JSON line names the kind.
//!
//! Needs OMNIBOX_BENCH_DATABASE_URL (bench/run.sh starts a server when unset).
//! OMNIBOX_BENCH_BIN replaces the omnibox binary cargo built (bench/conditions.sh
//! runs copies of both, so that a build during a long run changes nothing).

#[path = "harness/latency.rs"]
mod latency;
#[path = "harness/soak.rs"]
mod soak;

#[path = "harness/memory.rs"]
mod memory;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;
use serde_json::json;

#[path = "harness/proxy.rs"]
mod proxy;

#[derive(Debug, Parser)]
#[command(about = "omnibox benchmark harness")]
struct Args {
    /// Scenario to run
    #[arg(value_parser = ["enqueue", "publish", "produce", "inbox", "ops", "proxy", "latency", "soak", "memory", "topic"])]
    scenario: String,
    /// Events per round
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Rounds (the median is reported)
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Distinct partition keys (0 = one per event, like the peer's keys=unique)
    #[arg(long, default_value_t = 0)]
    keys: usize,
    /// Give every event an idempotency key (the INSERT ... ON CONFLICT path
    /// instead of COPY)
    #[arg(long)]
    idempotency_keys: bool,
    /// publish: relays working at once
    #[arg(long, default_value_t = 1)]
    relays: usize,
    /// publish: rows per claim
    #[arg(long, default_value_t = 1000)]
    batch: u32,
    /// publish: null or kafka
    #[arg(long, default_value = "null", value_parser = ["null", "kafka"])]
    sink: String,
    /// publish, latency, soak: how claims hold their rows (`omnibox publish
    /// --hold`); the default is the relay's own on PostgreSQL
    #[arg(long, default_value = "transaction", value_parser = ["lease", "transaction"])]
    hold: String,
    /// publish: rows pending before the timed run (default: --events)
    #[arg(long)]
    backlog: Option<usize>,
    /// publish: one more key with this many rows, seeded before the others
    #[arg(long, default_value_t = 0)]
    hot: usize,
    /// publish: `process` (omnibox publish processes) or `library` (relays in this process)
    #[arg(long, default_value = "process", value_parser = ["process", "library"])]
    mode: String,
    /// publish: VACUUM ANALYZE the table before timing (a labelled variant; users' relays
    /// meet tables their bulk enqueue just filled)
    #[arg(long)]
    analyze: bool,
    /// publish: after each round, time the server alone doing the same rows'
    /// claim and completion (the relay's scan, mark and complete statements
    /// in a PL/pgSQL loop, a commit per batch, no client round trips, no
    /// per-key walk) on a fresh copy of the same rows; reports the relay's
    /// rate as a share of it
    #[arg(long)]
    ceiling: bool,
    /// inbox: `memory` (the library, an in-memory source, without and with a
    /// trivial in-process handler), `file` (`omnibox inbox consume --from
    /// file:... --once`, the release binary, timed from spawn to exit) or
    /// `kafka` (the same from a topic, beside a plain consumer)
    #[arg(long, default_value = "memory", value_parser = ["memory", "file", "kafka"])]
    source: String,
    /// inbox --source file: also run with this `--exec` handler
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// publish --mode process: export OpenTelemetry spans (`--otlp-endpoint`)
    /// to an OTLP/HTTP receiver in this harness (a labelled variant)
    #[arg(long)]
    otlp: bool,
    /// latency: how the relay finds new rows, `poll` or `wal` (`publish
    /// --source wal`; bench/run.sh then starts its server with wal_level =
    /// logical)
    #[arg(long, default_value = "poll", value_parser = ["poll", "wal"])]
    relay_source: String,
    /// latency, soak: events inserted per second
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// latency, soak: how long rows are inserted
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// soak: seconds between two report lines
    #[arg(long, default_value_t = 300)]
    every: u64,
    /// Connection kind of the timed part: `plain` (sslmode=disable), `tls`
    /// (no sslmode: sqlx's prefer, against a server offering TLS) or
    /// `tls-latency` (tls through the delay proxy, and Kafka through one too)
    #[arg(long, default_value = "plain", value_parser = ["plain", "tls", "tls-latency"])]
    conn: String,
    /// tls-latency and proxy: delay of each direction, in milliseconds (0: no proxy)
    #[arg(long, default_value_t = 0.5)]
    latency_ms: f64,
    /// proxy: port to listen on (127.0.0.1; 0 = an ephemeral port)
    #[arg(long, default_value_t = 0)]
    listen_port: u16,
    /// proxy: HOST:PORT to forward to
    #[arg(long)]
    target: Option<String>,
    /// Accepted for `cargo bench` compatibility
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    if args.scenario == "proxy" {
        return proxy_only(&args);
    }
    let url = std::env::var("OMNIBOX_BENCH_DATABASE_URL").unwrap_or_else(|_| {
        eprintln!(
            "OMNIBOX_BENCH_DATABASE_URL is not set; run bench/run.sh, which starts PostgreSQL"
        );
        std::process::exit(2);
    });
    let conn = Conn::new(&args, &url);
    match args.scenario.as_str() {
        "enqueue" => enqueue(&args, &conn),
        "publish" => publish(&args, &conn),
        "produce" => produce(&args, &conn),
        // A 4-partition topic named by OMNIBOX_BENCH_TOPIC on
        // OMNIBOX_BENCH_BROKERS (bench/wal.sh --sink kafka).
        "topic" => {
            let brokers = std::env::var("OMNIBOX_BENCH_BROKERS").expect("OMNIBOX_BENCH_BROKERS");
            let topic = std::env::var("OMNIBOX_BENCH_TOPIC").expect("OMNIBOX_BENCH_TOPIC");
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(create_topic(&brokers, &topic));
        }
        "inbox" => inbox(&args, &conn),
        "ops" => ops(&args, &conn),
        "latency" => latency::latency(&args, &conn),
        "soak" => soak::soak(&args, &conn),
        "memory" => memory::memory(&args, &conn.url),
        _ => unreachable!(),
    }
}

fn latency(args: &Args) -> std::time::Duration {
    if !(args.latency_ms >= 0.0 && args.latency_ms < 10_000.0) {
        eprintln!("--latency-ms must be between 0 and 10000");
        std::process::exit(2);
    }
    std::time::Duration::from_secs_f64(args.latency_ms / 1000.0)
}

/// The `proxy` scenario: the delay proxy alone, until killed or until the
/// process that started it is gone (checked every 200 ms; start it as a
/// child of a process that waits, as bench/conditions.sh does, not through
/// a subshell that exits at once).
fn proxy_only(args: &Args) {
    let Some(target) = &args.target else {
        eprintln!("proxy needs --target HOST:PORT");
        std::process::exit(2);
    };
    let p = proxy::start(args.listen_port, target, latency(args)).unwrap_or_else(|e| {
        eprintln!(
            "proxy: cannot listen on 127.0.0.1:{}: {e}",
            args.listen_port
        );
        std::process::exit(1);
    });
    println!(
        "proxy: listening on {}, forwarding to {target}, {} ms each way",
        p.addr, args.latency_ms
    );
    std::io::stdout().flush().unwrap();
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    while unsafe { libc::getppid() } == parent {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `url` without its sslmode parameter, with `sslmode=MODE` when given.
fn with_sslmode(url: &str, mode: Option<&str>) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("sslmode="))
        .map(str::to_string)
        .collect();
    if let Some(mode) = mode {
        params.push(format!("sslmode={mode}"));
    }
    if params.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", params.join("&"))
    }
}

/// The byte range of HOST:PORT in a postgres://user:password@HOST:PORT/db URL.
fn host_range(url: &str) -> std::ops::Range<usize> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let host = url[start..end].rfind('@').map_or(start, |i| start + i + 1);
    host..end
}

/// How the timed part of a scenario connects (`--conn`).
struct Conn {
    kind: String,
    /// The URL of the timed part
    url: String,
    /// A direct URL of the same kind (no proxy), for seeding and checks
    setup: String,
    /// The Kafka bootstrap servers of the timed part
    brokers: Option<String>,
    /// For the JSON lines: TLS version and cipher, delay, measured round trip
    detail: serde_json::Value,
    /// For the result lines
    label: String,
    _proxies: Vec<proxy::Proxy>,
}

impl Conn {
    fn new(args: &Args, url: &str) -> Conn {
        let delay = latency(args);
        let tls = args.conn != "plain";
        let setup = with_sslmode(url, (!tls).then_some("disable"));
        let mut proxies = Vec::new();
        let mut url = setup.clone();
        let proxied = args.conn == "tls-latency" && !delay.is_zero();
        if proxied {
            let hosts = host_range(&setup);
            let mut target = setup[hosts.clone()].to_string();
            if target.is_empty() || target.contains(',') {
                eprintln!("--conn tls-latency needs one HOST[:PORT] in the URL");
                std::process::exit(2);
            }
            if !target.contains(':') || target.ends_with(']') {
                target.push_str(":5432");
            }
            let p = proxy::start(0, &target, delay).expect("start the PostgreSQL delay proxy");
            url.replace_range(hosts, &p.addr.to_string());
            proxies.push(p);
        }
        let mut brokers = std::env::var("OMNIBOX_BENCH_BROKERS")
            .ok()
            .filter(|b| !b.is_empty());
        let kafka_used = args.scenario == "produce" || args.sink == "kafka";
        let advertised: Option<u16> = std::env::var("OMNIBOX_BENCH_BROKERS_PROXY_PORT")
            .ok()
            .and_then(|p| p.parse().ok());
        if let (true, true, Some(b)) = (args.conn == "tls-latency", kafka_used, &brokers) {
            // Kafka clients follow the addresses the broker advertises, so the
            // broker must advertise the proxy's port (with --latency-ms 0 too).
            let Some(port) = advertised else {
                eprintln!(
                    "--conn tls-latency with Kafka needs a broker advertising 127.0.0.1:$OMNIBOX_BENCH_BROKERS_PROXY_PORT (bench/run.sh starts tansu so)"
                );
                std::process::exit(2);
            };
            let p = proxy::start(port, b, delay).expect("start the Kafka delay proxy");
            brokers = Some(p.addr.to_string());
            proxies.push(p);
        }
        // What the timed part's connection is: checked, not assumed.
        let db = Db::new(&url);
        let (ssl, version, cipher) = db.rt.block_on(async {
            sqlx::query_as::<_, (bool, Option<String>, Option<String>)>(
                "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            )
            .fetch_one(&db.pool)
            .await
            .expect("read pg_stat_ssl")
        });
        if ssl != tls {
            eprintln!(
                "--conn {}: the connection {} TLS{}",
                args.conn,
                if ssl { "uses" } else { "does not use" },
                if tls {
                    " (does the server offer it? bench/run.sh starts one that does)"
                } else {
                    ""
                }
            );
            std::process::exit(2);
        }
        // On one connection: a pool's acquire pings the connection first.
        let mut trips: Vec<f64> = db.rt.block_on(async {
            let mut c = db.pool.acquire().await.expect("connect");
            let mut trips = Vec::new();
            for _ in 0..50 {
                let start = Instant::now();
                sqlx::query("SELECT 1")
                    .execute(&mut *c)
                    .await
                    .expect("SELECT 1");
                trips.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            trips
        });
        trips.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let round_trip = trips[trips.len() / 2];
        drop(db);
        let latency_ms = if proxied { args.latency_ms } else { 0.0 };
        let tls_text = if ssl {
            format!(
                "{} {}",
                version.clone().unwrap_or_default(),
                cipher.clone().unwrap_or_default()
            )
        } else {
            "no TLS".to_string()
        };
        let label = format!(
            "{}: {tls_text}{}, SELECT 1 round trip {round_trip:.2} ms",
            args.conn,
            if proxied {
                format!(
                    ", {latency_ms} ms each way through a delay proxy{}",
                    if brokers.is_some() && proxies.len() > 1 {
                        " (the Kafka broker through one too)"
                    } else {
                        ""
                    }
                )
            } else {
                String::new()
            }
        );
        println!("conn {label}");
        let detail = json!({
            "tls": ssl.then(|| json!({"version": version, "cipher": cipher})),
            "latency_ms_each_way": latency_ms,
            "kafka_proxied": proxies.len() > 1,
            "select1_round_trip_ms": round_trip,
        });
        Conn {
            kind: args.conn.clone(),
            url,
            setup,
            brokers,
            detail,
            label,
            _proxies: proxies,
        }
    }

    /// The fields every JSON line gets.
    fn tag(&self, line: &mut serde_json::Value) {
        line["conn"] = json!(self.kind);
        line["conn_detail"] = self.detail.clone();
    }

    /// `--conn KIND` for the commands printed, empty for plain.
    fn flag(&self) -> String {
        if self.kind == "plain" {
            String::new()
        } else if self.kind == "tls-latency" {
            format!(
                " --conn {} --latency-ms {}",
                self.kind, self.detail["latency_ms_each_way"]
            )
        } else {
            format!(" --conn {}", self.kind)
        }
    }
}

/// The omnibox binary measured: cargo's, or OMNIBOX_BENCH_BIN (a copy that
/// a long run keeps from being rebuilt under it).
fn bin() -> PathBuf {
    std::env::var_os("OMNIBOX_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_omnibox")))
}

fn results_file() -> PathBuf {
    if let Ok(p) = std::env::var("OMNIBOX_BENCH_RESULTS") {
        return PathBuf::from(p);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&dir).expect("create bench/results");
    dir.join("results.jsonl")
}

/// The peer's row shape: topic orders.events, ~157-character payload, one header.
fn write_events(path: &Path, n: usize, keys: usize, idempotency_keys: bool) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    for i in 0..n {
        let key_no = if keys == 0 { i } else { i % keys };
        let aggregate = format!("00000000-0000-7000-8000-{key_no:012}");
        let mut line = json!({
            "aggregate_type": "order",
            "aggregate_id": aggregate,
            "event_type": "order.created",
            "topic": "orders.events",
            "partition_key": aggregate,
            "headers": {"source": "bench"},
            "payload": {
                "order_id": aggregate,
                "customer_id": format!("customer-{:06}", i % 1000),
                "amount_cents": 1000 + i % 5000,
                "currency": "EUR",
                "items": [{"sku": "SKU-1", "qty": 1}],
                "seq": i
            }
        });
        if idempotency_keys {
            line["idempotency_key"] = json!(format!("bench-{i}"));
        }
        writeln!(out, "{line}").expect("write input");
    }
}

fn omnibox(url: &str, schema: &str, args: &[&str], stdin: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("OMNIBOX_DATABASE_URL", url)
        .env("OMNIBOX_DATABASE_SCHEMA", schema)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = stdin {
        cmd.stdin(std::fs::File::open(path).expect("open input"));
    }
    let out = cmd.output().expect("run omnibox");
    if !out.status.success() {
        panic!(
            "omnibox {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A connection for checks outside the timed region.
struct Db {
    rt: tokio::runtime::Runtime,
    pool: sqlx::PgPool,
}

impl Db {
    fn new(url: &str) -> Db {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pool = rt.block_on(sqlx::PgPool::connect(url)).expect("connect");
        Db { rt, pool }
    }

    fn scalar(&self, sql: String) -> String {
        self.rt
            .block_on(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&self.pool))
            .expect("query")
    }

    fn exec(&self, sql: String) {
        self.rt
            .block_on(sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&self.pool))
            .expect("statement");
    }
}

fn enqueue(args: &Args, conn: &Conn) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    write_events(&input, args.events, args.keys, args.idempotency_keys);
    let db = Db::new(&conn.setup);
    let mut rates = Vec::new();
    let mut results = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(results_file())
        .unwrap();
    let command = format!(
        "OMNIBOX_DATABASE_URL=<url> OMNIBOX_DATABASE_SCHEMA=<fresh> omnibox enqueue --jsonl < events.jsonl  # {} events{}, bench/run.sh enqueue{}",
        args.events,
        if args.idempotency_keys {
            ", each with an idempotency key"
        } else {
            ""
        },
        conn.flag()
    );
    for round in 1..=args.rounds {
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        omnibox(&conn.setup, &schema, &["migrate", "-q"], None);
        let start = Instant::now();
        omnibox(
            &conn.url,
            &schema,
            &["enqueue", "--jsonl", "-q"],
            Some(&input),
        );
        let secs = start.elapsed().as_secs_f64();
        let count = db.scalar(format!("SELECT count(*)::text FROM {schema}.outbox_events"));
        let verified = count == args.events.to_string();
        db.exec(format!("DROP SCHEMA {schema} CASCADE"));
        let rate = args.events as f64 / secs;
        rates.push(rate);
        println!(
            "enqueue round {round}: {} events in {secs:.3} s = {rate:.0} events/s (rows in table: {count}, conn {}, verified: {verified})",
            args.events, conn.kind
        );
        let mut line = json!({
            "scenario": "omnibox_enqueue",
            "events": args.events,
            "seconds": secs,
            "events_per_s": rate,
            "params": {
                "keys": if args.keys == 0 { json!("unique") } else { json!(args.keys) },
                "idempotency_keys": args.idempotency_keys,
                "round": round,
                "transactions": 1,
            },
            "verified": verified,
        });
        conn.tag(&mut line);
        writeln!(results, "{line}").unwrap();
        assert!(verified, "expected {} rows, found {count}", args.events);
    }
    report("enqueue", &rates, &command, conn);
}

fn report(name: &str, rates: &[f64], command: &str, conn: &Conn) {
    let mut sorted = rates.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted[sorted.len() / 2];
    println!(
        "{name}: median {median:.0} events/s (min {:.0}, max {:.0}, {} rounds; conn {})\n  command: {command}",
        sorted[0],
        sorted[sorted.len() - 1],
        sorted.len(),
        conn.label
    );
}

/// An OTLP/HTTP receiver that accepts every export (and reads it whole);
/// returns its base URL.
fn otlp_receiver() -> String {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end().to_ascii_lowercase();
                        if h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    url
}

fn publish(args: &Args, conn: &Conn) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use omnibox::WorkerId;
    use omnibox::pipeline::{ProcessorOptions, RunMode, RunOptions, Sleep, run};
    use omnibox::relay::{self, AnySink};
    use omnibox::store::postgres::{PgOptions, PgStore};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let backlog = args.backlog.unwrap_or(args.events).max(args.events);
    let limited = backlog > args.events;
    let keys = if args.keys == 0 {
        "unique".to_string()
    } else {
        args.keys.to_string()
    };
    let brokers = conn.brokers.clone();
    if args.sink == "kafka" && brokers.is_none() {
        eprintln!("--sink kafka needs OMNIBOX_BENCH_BROKERS (bench/run.sh starts tansu for it)");
        std::process::exit(2);
    }
    let otlp = args.otlp.then(otlp_receiver);
    let command = format!(
        "bench/run.sh publish --events {} --backlog {backlog} --hot {} --relays {} --batch {} --keys {} --sink {} --mode {}{}{}{}{}",
        args.events,
        args.hot,
        args.relays,
        args.batch,
        args.keys,
        args.sink,
        args.mode,
        if args.hold == "lease" {
            " --hold lease"
        } else {
            ""
        },
        if args.analyze { " --analyze" } else { "" },
        if args.otlp { " --otlp" } else { "" },
        conn.flag()
    );
    let label = format!(
        "{} relays, {}{}{}{}",
        args.mode,
        if args.hold == "lease" {
            "leases, "
        } else {
            "held claims, "
        },
        if args.analyze {
            "VACUUM ANALYZE before timing"
        } else {
            "no ANALYZE"
        },
        if args.hot > 0 {
            format!(", hot key {} rows", args.hot)
        } else {
            String::new()
        },
        if args.otlp {
            ", spans exported with OTLP/HTTP to an in-harness receiver"
        } else {
            ""
        }
    );
    let mut rates = Vec::new();
    let mut ceilings = Vec::new();
    let mut results = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(results_file())
        .unwrap();
    for round in 1..=args.rounds {
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let topic = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let store = seed_publish(&rt, args, conn, &schema, &topic, backlog);
        // Library relays connect with the kind's URL (before timing, as a
        // long-running process's pool would be).
        let relay_store = (args.mode == "library" && conn.url != conn.setup).then(|| {
            rt.block_on(async {
                let opts = PgOptions {
                    schema: Some(schema.clone()),
                    max_connections: (args.relays as u32 + 2).max(4),
                    ..PgOptions::default()
                };
                PgStore::connect(&conn.url, &opts).await.expect("connect")
            })
        });
        let t0: chrono::DateTime<chrono::Utc> = rt
            .block_on(sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(store.pool()))
            .unwrap();
        let start = Instant::now();
        let timed = (args.hot + args.events) as u64;
        if args.mode == "process" {
            let broker = match (&brokers, args.sink.as_str()) {
                (Some(b), "kafka") => format!("kafka://{b}"),
                _ => "null".to_string(),
            };
            let limit = timed.div_ceil(args.relays as u64).to_string();
            let batch = args.batch.to_string();
            let children: Vec<_> = (0..args.relays)
                .map(|r| {
                    let worker = format!("bench-{r}");
                    let mut a = vec![
                        "publish",
                        "--once",
                        "--broker",
                        &broker,
                        "--batch",
                        &batch,
                        "--worker-id",
                        &worker,
                        "--hold",
                        &args.hold,
                        "-q",
                    ];
                    if limited {
                        a.extend(["--limit", &limit]);
                    }
                    if let Some(endpoint) = &otlp {
                        a.extend(["--otlp-endpoint", endpoint]);
                    }
                    Command::new(bin())
                        .args(&a)
                        .env("OMNIBOX_DATABASE_URL", &conn.url)
                        .env("OMNIBOX_DATABASE_SCHEMA", &schema)
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("run omnibox publish")
                })
                .collect();
            for c in children {
                let out = c.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "omnibox publish failed: {}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        } else {
            rt.block_on(async {
                let sink = Arc::new(match &brokers {
                    Some(b) if args.sink == "kafka" => AnySink::from_url(
                        &format!("kafka://{b}"),
                        &[],
                        std::time::Duration::from_secs(30),
                    )
                    .unwrap(),
                    _ => {
                        AnySink::from_url("null", &[], std::time::Duration::from_secs(30)).unwrap()
                    }
                });
                let done = Arc::new(AtomicU64::new(0));
                let (tx, rx) = tokio::sync::watch::channel(false);
                let tx = Arc::new(tx);
                let mut tasks = Vec::new();
                for r in 0..args.relays {
                    let mut o = ProcessorOptions::new(WorkerId::new(format!("bench-{r}")).unwrap());
                    o.batch = args.batch;
                    let p = relay::publisher(
                        relay_store.as_ref().unwrap_or(&store).outbox(),
                        sink.clone(),
                        o,
                        std::time::Duration::from_secs(30),
                    )
                    .build();
                    let rx = rx.clone();
                    let tx = tx.clone();
                    let done = done.clone();
                    tasks.push(tokio::spawn(async move {
                        let opts = RunOptions {
                            mode: if limited {
                                RunMode::Watch
                            } else {
                                RunMode::Once
                            },
                            ..RunOptions::default()
                        };
                        run(&p, &opts, rx, &mut Sleep, |b| {
                            if done.fetch_add(b.completed as u64, Ordering::SeqCst)
                                + b.completed as u64
                                >= timed
                            {
                                let _ = tx.send(true);
                            }
                        })
                        .await
                        .unwrap();
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            });
        }
        let secs = start.elapsed().as_secs_f64();
        let stats = rt.block_on(async {
            let q = |sql: &str| {
                let sql = sql.to_string();
                let pool = store.pool().clone();
                async move {
                    sqlx::query_scalar::<_, Option<f64>>(sqlx::AssertSqlSafe(sql))
                        .bind(t0)
                        .fetch_one(&pool)
                        .await
                        .unwrap()
                        .unwrap_or(0.0)
                }
            };
            let completed = q("SELECT count(*)::float8 FROM outbox_events WHERE status = 'completed' AND $1 IS NOT NULL").await;
            let pending = q("SELECT count(*)::float8 FROM outbox_events WHERE status <> 'completed' AND $1 IS NOT NULL").await;
            let p50 = q("SELECT 1000 * extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY completed_at - $1))::float8 FROM outbox_events WHERE status = 'completed'").await;
            let p99 = q("SELECT 1000 * extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY completed_at - $1))::float8 FROM outbox_events WHERE status = 'completed'").await;
            let small_done = q(&format!(
                "SELECT extract(epoch FROM max(completed_at) - $1)::float8 FROM outbox_events WHERE partition_key <> '{}'",
                uuid::Uuid::from_u128(u128::MAX.wrapping_add(1))
            ))
            .await;
            let hot_done = q(&format!(
                "SELECT extract(epoch FROM max(completed_at) - $1)::float8 FROM outbox_events WHERE partition_key = '{}'",
                uuid::Uuid::from_u128(u128::MAX.wrapping_add(1))
            ))
            .await;
            // Per-key order: completion order follows seq within every key.
            let disorder = q("SELECT count(*)::float8 FROM (SELECT seq, completed_at, lag(completed_at) OVER (PARTITION BY partition_key ORDER BY seq) AS prev FROM outbox_events WHERE status = 'completed') x WHERE prev > completed_at AND $1 IS NOT NULL").await;
            store.pool().close().await;
            (completed as u64, pending as u64, p50, p99, small_done, hot_done, disorder as u64)
        });
        let (completed, pending, p50, p99, small_done, hot_done, disorder) = stats;
        if let Some(s) = relay_store {
            rt.block_on(s.pool().close());
        }
        let db = Db::new(&conn.setup);
        db.exec(format!("DROP SCHEMA {schema} CASCADE"));
        let verified = disorder == 0
            && if limited {
                completed >= timed
            } else {
                completed == timed && pending == 0
            };
        let rate = completed as f64 / secs;
        rates.push(rate);
        let hot_note = if args.hot > 0 {
            format!("; small keys drained at {small_done:.2} s, hot key at {hot_done:.2} s")
        } else {
            String::new()
        };
        println!(
            "publish round {round}: {completed} events in {secs:.3} s = {rate:.0} events/s; drain latency p50 {p50:.0} ms, p99 {p99:.0} ms{hot_note} (keys {keys}, relays {}, batch {}, sink {}, backlog {backlog}, {label}, conn {}, verified {verified})",
            args.relays, args.batch, args.sink, conn.kind
        );
        let mut line = json!({
            "scenario": "omnibox_publish",
            "events": completed,
            "seconds": secs,
            "events_per_s": rate,
            "params": {"batch_size": args.batch, "workers": args.relays, "keys": keys, "sink": args.sink,
                       "hold": args.hold, "backlog": backlog, "hot": args.hot, "mode": args.mode, "analyze": args.analyze,
                       "round": round, "drain_latency_p50_ms": p50, "drain_latency_p99_ms": p99,
                       "small_keys_done_s": small_done, "hot_key_done_s": hot_done},
            "verified": verified,
        });
        conn.tag(&mut line);
        writeln!(results, "{line}").unwrap();
        assert!(
            verified,
            "completed {completed} of {timed}, {pending} not completed, {disorder} rows completed before an earlier row of their key"
        );
        if args.ceiling {
            let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
            let store = seed_publish(&rt, args, conn, &schema, &topic, backlog);
            let (done, secs) = ceiling_round(&rt, &store, args.batch as usize);
            rt.block_on(store.pool().close());
            Db::new(&conn.setup).exec(format!("DROP SCHEMA {schema} CASCADE"));
            let total = (args.hot + backlog) as u64;
            assert_eq!(
                done, total,
                "the ceiling loop completed {done} of {total} rows"
            );
            let ceiling = done as f64 / secs;
            ceilings.push(ceiling);
            println!(
                "ceiling round {round}: {done} rows in {secs:.3} s = {ceiling:.0} rows/s (the server alone: scan, mark, commit, complete, commit per batch of {}; no walk, no client); the relay's round: {:.0} %",
                args.batch,
                100.0 * rate / ceiling
            );
            let mut line = json!({
                "scenario": "server_ceiling",
                "events": done,
                "seconds": secs,
                "events_per_s": ceiling,
                "params": {"batch_size": args.batch, "keys": keys, "backlog": backlog, "hot": args.hot,
                           "round": round, "relay_events_per_s": rate},
                "verified": true,
            });
            conn.tag(&mut line);
            writeln!(results, "{line}").unwrap();
        }
    }
    report("publish", &rates, &command, conn);
    if args.ceiling {
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        println!(
            "server ceiling: median {:.0} rows/s ({} rounds, interleaved with the relay's); the relay's median is {:.0} % of it\n  command: {command} --ceiling",
            median(&ceilings),
            ceilings.len(),
            100.0 * median(&rates) / median(&ceilings)
        );
    }
}

/// A fresh schema holding the publish scenario's rows (the hot key first,
/// then the others, in the peer's row shape), migrated and seeded outside
/// any timed region.
fn seed_publish(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    conn: &Conn,
    schema: &str,
    topic: &str,
    backlog: usize,
) -> omnibox::store::postgres::PgStore {
    use omnibox::store::postgres::{PgOptions, PgStore, insert_outbox};
    use omnibox::{DomainService, NewOutboxEvent};
    let brokers = conn.brokers.clone();
    rt.block_on(async {
        let opts = PgOptions {
            schema: Some(schema.to_string()),
            max_connections: (args.relays as u32 + 2).max(4),
            ..PgOptions::default()
        };
        let store = PgStore::connect(&conn.setup, &opts).await.expect("connect");
        store.migrate().await.expect("migrate");
        // Seed outside the timed region, in the peer's row shape: the
        // hot key first, then the others.
        let domain = DomainService::default();
        let mut conn = store.pool().acquire().await.unwrap();
        let total = args.hot + backlog;
        let mut i = 0;
        while i < total {
            let chunk: Vec<_> = (i..(i + 10_000).min(total))
                .map(|n| {
                    let key_no = if n < args.hot {
                        u128::MAX
                    } else if args.keys == 0 {
                        (n - args.hot) as u128
                    } else {
                        ((n - args.hot) % args.keys) as u128
                    };
                    let aggregate = uuid::Uuid::from_u128(key_no.wrapping_add(1));
                    let mut e = NewOutboxEvent::new(
                        "order",
                        aggregate,
                        "order.created",
                        topic.to_string(),
                        aggregate.to_string(),
                        json!({"order_id": aggregate, "customer_id": format!("customer-{:06}", n % 1000),
                               "amount_cents": 1000 + n % 5000, "currency": "EUR",
                               "items": [{"sku": "SKU-1", "qty": 1}], "seq": n}),
                    );
                    e.headers = Some([("source".to_string(), "bench".to_string())].into());
                    domain.create_outbox_event(e).unwrap()
                })
                .collect();
            insert_outbox(&mut conn, &chunk).await.expect("seed");
            i += chunk.len();
        }
        drop(conn);
        if args.analyze {
            sqlx::query("VACUUM ANALYZE outbox_events")
                .execute(store.pool())
                .await
                .unwrap();
        }
        if let (Some(b), "kafka") = (&brokers, args.sink.as_str()) {
            create_topic(b, topic).await;
        }
        store
    })
}

/// The server alone doing the relay's database work for the rows of
/// `schema`: per batch the claim index's scan (`FOR UPDATE SKIP LOCKED`),
/// the relay's mark `UPDATE` and a commit, its complete `UPDATE` and a commit,
/// in one PL/pgSQL loop on one connection (no client round trips, no per-key
/// walk, no lock step). Returns the rows completed and the seconds taken.
fn ceiling_round(
    rt: &tokio::runtime::Runtime,
    store: &omnibox::store::postgres::PgStore,
    batch: usize,
) -> (u64, f64) {
    let sql = format!(
        "DO $$
DECLARE ids uuid[];
BEGIN
  LOOP
    SELECT array_agg(id) INTO ids FROM (
      SELECT id FROM outbox_events
       WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= now()
       ORDER BY scheduled_at, seq LIMIT {batch} FOR UPDATE SKIP LOCKED) s;
    EXIT WHEN ids IS NULL;
    UPDATE outbox_events SET locked_at = now(), locked_by = 'ceiling',
           locked_until = now() + make_interval(secs => 300), updated_at = now()
     WHERE id = ANY(ids);
    COMMIT;
    UPDATE outbox_events SET status = 'completed', completed_at = now(), locked_at = NULL,
           locked_by = NULL, locked_until = NULL, updated_at = now()
     WHERE id = ANY(ids) AND locked_by = 'ceiling';
    COMMIT;
  END LOOP;
END $$"
    );
    rt.block_on(async {
        let mut c = store.pool().acquire().await.unwrap();
        let start = Instant::now();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *c)
            .await
            .expect("ceiling loop");
        let secs = start.elapsed().as_secs_f64();
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE status = 'completed'")
                .fetch_one(&mut *c)
                .await
                .unwrap();
        (done as u64, secs)
    })
}

fn produce(args: &Args, conn: &Conn) {
    use std::sync::Arc;

    use omnibox::relay::{AnySink, Message, Sink};
    use omnibox::{DomainService, NewOutboxEvent};

    let brokers = conn.brokers.clone().unwrap_or_else(|| {
        eprintln!(
            "produce needs OMNIBOX_BENCH_BROKERS (bench/run.sh produce --sink kafka starts tansu)"
        );
        std::process::exit(2);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rates = Vec::new();
    for round in 1..=args.rounds {
        let topic = format!(
            "produce-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let messages: Vec<Message> = (0..args.events)
            .map(|n| {
                let aggregate = uuid::Uuid::from_u128(n as u128 + 1);
                let mut e = NewOutboxEvent::new(
                    "order",
                    aggregate,
                    "order.created",
                    topic.clone(),
                    aggregate.to_string(),
                    json!({"order_id": aggregate, "customer_id": format!("customer-{:06}", n % 1000),
                           "amount_cents": 1000 + n % 5000, "currency": "EUR",
                           "items": [{"sku": "SKU-1", "qty": 1}], "seq": n}),
                );
                e.headers = Some([("source".to_string(), "bench".to_string())].into());
                Message::from_event(&DomainService::default().create_outbox_event(e).unwrap())
            })
            .collect();
        let secs = rt.block_on(async {
            create_topic(&brokers, &topic).await;
            let sink = Arc::new(
                AnySink::from_url(
                    &format!("kafka://{brokers}"),
                    &[],
                    std::time::Duration::from_secs(30),
                )
                .unwrap(),
            );
            let start = Instant::now();
            for chunk in messages.chunks(args.batch as usize) {
                let d = sink.send(chunk, std::time::Duration::from_secs(30)).await;
                assert!(
                    d.iter().all(|d| *d == omnibox::relay::Delivery::Delivered),
                    "{:?}",
                    d.first()
                );
            }
            start.elapsed().as_secs_f64()
        });
        let rate = args.events as f64 / secs;
        rates.push(rate);
        println!(
            "produce round {round}: {} messages in {secs:.3} s = {rate:.0} messages/s ({} in flight at a time, conn {})",
            args.events, args.batch, conn.kind
        );
    }
    report(
        "produce",
        &rates,
        &format!(
            "bench/run.sh produce --sink kafka --events {} --batch {}{}",
            args.events,
            args.batch,
            conn.flag()
        ),
        conn,
    );
}

/// Creates a 4-partition topic (tansu implements CreateTopics).
async fn create_topic(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let new = NewTopic::new(topic, 4, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(30)));
    for r in admin
        .create_topics([&new], &opts)
        .await
        .expect("create topic")
    {
        r.expect("create topic");
    }
}

/// An in-memory source for the inbox benchmark (the peer uses one too).
struct MemorySource(std::collections::VecDeque<omnibox::inbox::RawMessage>);

impl omnibox::inbox::Source for MemorySource {
    fn describe(&self) -> String {
        "memory".into()
    }
    async fn poll(
        &mut self,
        max: usize,
        _wait: std::time::Duration,
    ) -> omnibox::Result<omnibox::inbox::Polled> {
        let n = max.min(self.0.len());
        Ok(omnibox::inbox::Polled {
            messages: self.0.drain(..n).collect(),
            end: self.0.is_empty(),
        })
    }
    async fn commit(&mut self, _through: &[omnibox::inbox::RawMessage]) -> omnibox::Result<()> {
        Ok(())
    }
    async fn rewind(&mut self, from: &[omnibox::inbox::RawMessage]) -> omnibox::Result<()> {
        for m in from.iter().rev() {
            self.0.push_front(m.clone());
        }
        Ok(())
    }
}

fn inbox(args: &Args, conn: &Conn) {
    use std::sync::Arc;

    use omnibox::inbox::{AckStrategy, ConsumeOptions, InboxConsumer, RawMessage};
    use omnibox::pipeline::Outcome;
    use omnibox::store::AnyStore;
    use omnibox::store::postgres::{PgOptions, PgStore};
    use omnibox::{InboxEvent, WorkerId};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = args.events;
    let mut messages: Vec<RawMessage> = (0..n)
        .map(|i| RawMessage {
            topic: "orders.events".into(),
            partition: 0,
            offset: i as i64,
            key: None,
            headers: vec![
                ("event_id".into(), format!("msg-{i:08}").into_bytes()),
                ("event_type".into(), b"order.created".to_vec()),
            ],
            payload: Some(
                json!({"order_id": format!("{i:08}"), "customer_id": format!("customer-{:06}", i % 1000),
                       "amount_cents": 1000 + i % 5000, "currency": "EUR", "items": [{"sku": "SKU-1", "qty": 1}]})
                .to_string()
                .into_bytes(),
            ),
            position_is_identity: true,
            cut: None,
            origin: None,
            defect: None,
        })
        .collect();
    let mut rng = fastrand::Rng::with_seed(7);
    for k in 0..n / 10 {
        let mut m = messages[rng.usize(..n)].clone();
        m.offset = (n + k) as i64;
        messages.push(m);
    }
    let total = messages.len();
    if args.source == "file" {
        return inbox_file(args, conn, &messages);
    }
    if args.source == "kafka" {
        return inbox_kafka(args, conn, &messages);
    }
    for handler in [false, true] {
        let mut rates = Vec::new();
        let command = format!(
            "bench/run.sh inbox --events {n} --batch {}{}{}",
            args.batch,
            conn.flag(),
            if handler {
                "  # with a trivial handler"
            } else {
                ""
            }
        );
        for round in 1..=args.rounds {
            let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
            let (secs, report) = rt.block_on(async {
                let opts = PgOptions {
                    schema: Some(schema.clone()),
                    ..PgOptions::default()
                };
                let pg = PgStore::connect(&conn.url, &opts).await.expect("connect");
                pg.migrate().await.expect("migrate");
                let store = AnyStore::Postgres(pg);
                let mut o = ConsumeOptions::new("bench", WorkerId::new("bench").unwrap());
                o.ack = AckStrategy::ExactlyOnce;
                o.batch = args.batch as usize;
                let h = handler.then(|| Arc::new(|_e: InboxEvent| async { Outcome::Completed }));
                let source = MemorySource(messages.clone().into());
                let mut consumer = InboxConsumer::new(source, store.inbox(), h, o);
                let (_tx, rx) = tokio::sync::watch::channel(false);
                let start = Instant::now();
                let report = consumer.run(true, rx).await.expect("consume");
                (start.elapsed().as_secs_f64(), report)
            });
            let db = Db::new(&conn.setup);
            let rows = db.scalar(format!("SELECT count(*)::text FROM {schema}.inbox_events"));
            let completed = db.scalar(format!(
                "SELECT count(*)::text FROM {schema}.inbox_events WHERE status = 'completed'"
            ));
            db.exec(format!("DROP SCHEMA {schema} CASCADE"));
            let distinct = report.stored;
            let verified = rows == distinct.to_string()
                && report.duplicates as usize == total - distinct as usize
                && (!handler || completed == rows);
            let rate = total as f64 / secs;
            rates.push(rate);
            println!(
                "inbox round {round}: {total} messages ({distinct} distinct, {} duplicates) in {secs:.3} s = {rate:.0} messages/s; handler: {handler}; rows {rows}, completed {completed}, conn {}, verified {verified}",
                report.duplicates, conn.kind
            );
            let mut line = json!({
                "scenario": "omnibox_inbox_consume",
                "events": total,
                "seconds": secs,
                "events_per_s": rate,
                "params": {"batch_size": args.batch, "handler": handler, "distinct": distinct, "duplicates": report.duplicates, "round": round},
                "verified": verified,
            });
            conn.tag(&mut line);
            let mut results = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(results_file())
                .unwrap();
            writeln!(results, "{line}").unwrap();
            assert!(verified);
        }
        report(
            if handler {
                "inbox (trivial handler)"
            } else {
                "inbox (no handler)"
            },
            &rates,
            &command,
            conn,
        );
    }
}

/// `omnibox inbox consume --from file:... --once`: the messages as the file
/// sink writes them, the whole process timed.
fn inbox_file(args: &Args, conn: &Conn, messages: &[omnibox::inbox::RawMessage]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        for m in messages {
            let headers: serde_json::Map<String, serde_json::Value> = m
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), json!(String::from_utf8_lossy(v))))
                .collect();
            let value: serde_json::Value =
                serde_json::from_slice(m.payload.as_deref().unwrap_or(b"{}")).unwrap();
            writeln!(
                out,
                "{}",
                json!({"topic": m.topic, "key": null, "headers": headers, "value": value})
            )
            .unwrap();
        }
    }
    let total = messages.len();
    let db = Db::new(&conn.setup);
    let mut runs: Vec<Option<&str>> = vec![None];
    if let Some(cmd) = &args.exec {
        runs.push(Some(cmd.as_str()));
    }
    for exec in runs {
        let mut rates = Vec::new();
        let command = format!(
            "omnibox inbox consume --from file:events.jsonl --once --group bench --batch {}{}  # {total} lines, {} distinct; bench/run.sh inbox --source file{}",
            args.batch,
            exec.map(|c| format!(" --exec '{c}'")).unwrap_or_default(),
            args.events,
            conn.flag()
        );
        for round in 1..=args.rounds {
            let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
            omnibox(&conn.setup, &schema, &["migrate", "-q"], None);
            let from = format!("file:{}", input.display());
            let batch = args.batch.to_string();
            let mut argv = vec![
                "inbox", "consume", "--from", &from, "--once", "--group", "bench", "--batch",
                &batch, "-q",
            ];
            if let Some(cmd) = exec {
                argv.extend(["--exec", cmd]);
            }
            let start = Instant::now();
            omnibox(&conn.url, &schema, &argv, None);
            let secs = start.elapsed().as_secs_f64();
            let rows = db.scalar(format!("SELECT count(*)::text FROM {schema}.inbox_events"));
            let completed = db.scalar(format!(
                "SELECT count(*)::text FROM {schema}.inbox_events WHERE status = 'completed'"
            ));
            db.exec(format!("DROP SCHEMA {schema} CASCADE"));
            let distinct: usize = {
                let mut ids: Vec<&[u8]> =
                    messages.iter().map(|m| m.headers[0].1.as_slice()).collect();
                ids.sort();
                ids.dedup();
                ids.len()
            };
            let verified = rows == distinct.to_string() && (exec.is_none() || completed == rows);
            let rate = total as f64 / secs;
            rates.push(rate);
            println!(
                "inbox file round {round}: {total} lines ({distinct} distinct) in {secs:.3} s = {rate:.0} messages/s; exec: {}; rows {rows}, completed {completed}, conn {}, verified {verified}",
                exec.unwrap_or("none"),
                conn.kind
            );
            let mut line = json!({
                "scenario": "omnibox_inbox_consume_file",
                "events": total,
                "seconds": secs,
                "events_per_s": rate,
                "params": {"batch_size": args.batch, "exec": exec, "distinct": distinct, "round": round},
                "verified": verified,
            });
            conn.tag(&mut line);
            let mut results = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(results_file())
                .unwrap();
            writeln!(results, "{line}").unwrap();
            assert!(verified);
        }
        report(
            &match exec {
                Some(c) => format!("inbox file (--exec '{c}')"),
                None => "inbox file (no handler)".to_string(),
            },
            &rates,
            &command,
            conn,
        );
    }
}

/// `omnibox inbox consume --from kafka://... --once` (the release binary,
/// timed from spawn to exit) of the messages produced to a fresh 4-partition
/// topic (outside the timed part), and a plain rdkafka consumer of the same
/// topic on the same broker: a `BaseConsumer` with librdkafka's default
/// settings (only `auto.offset.reset=earliest`, to read what is there),
/// timed from its creation (group join included) to the last message, and
/// from its first message. The order of the two alternates by round.
/// OMNIBOX_BENCH_BIN runs another build of omnibox for the timed part.
fn inbox_kafka(args: &Args, conn: &Conn, messages: &[omnibox::inbox::RawMessage]) {
    // Seeding and checks connect directly; the timed consumer as the kind says.
    let url = conn.setup.as_str();
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    const PARTITIONS: i32 = 4;
    let brokers = std::env::var("OMNIBOX_BENCH_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| {
            eprintln!("inbox --source kafka needs OMNIBOX_BENCH_BROKERS (bench/run.sh inbox --source kafka starts tansu)");
            std::process::exit(2);
        });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let total = messages.len();
    let distinct = {
        let mut ids: Vec<&[u8]> = messages.iter().map(|m| m.headers[0].1.as_slice()).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    let db = Db::new(url);
    let from = format!("kafka://{brokers}");
    let batch = args.batch.to_string();
    let command = format!(
        "omnibox inbox consume --from kafka://{brokers} --topic T --once --group bench --batch {}  # {total} messages ({} distinct) on {PARTITIONS} partitions",
        args.batch, args.events
    );
    let (mut rates, mut plain_rates, mut plain_after_first) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let topic = format!("inbox-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        rt.block_on(async {
            create_topic(&brokers, &topic).await;
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "5")
                .create()
                .expect("producer");
            let sends: Vec<_> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut headers = OwnedHeaders::new();
                    for (k, v) in &m.headers {
                        headers = headers.insert(Header {
                            key: k,
                            value: Some(v),
                        });
                    }
                    let record = FutureRecord::<(), _>::to(&topic)
                        .partition(i as i32 % PARTITIONS)
                        .payload(m.payload.as_deref().unwrap_or_default())
                        .headers(headers);
                    producer
                        .send_result(record)
                        .map_err(|(e, _)| e)
                        .expect("enqueue")
                })
                .collect();
            for s in sends {
                s.await
                    .expect("delivery")
                    .map_err(|(e, _)| e)
                    .expect("produce");
            }
        });
        // The plain consumer: counts the messages, nothing else.
        let plain = || {
            let start = Instant::now();
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set(
                    "group.id",
                    format!("plain-{}", uuid::Uuid::new_v4().simple()),
                )
                .set("auto.offset.reset", "earliest")
                .create()
                .expect("plain consumer");
            consumer.subscribe(&[&topic]).expect("subscribe");
            let (mut n, mut first) = (0usize, None);
            while n < total {
                assert!(
                    start.elapsed().as_secs() < 120,
                    "the plain consumer read {n} of {total}"
                );
                match consumer.poll(std::time::Duration::from_millis(100)) {
                    Some(Ok(_)) => {
                        first.get_or_insert_with(Instant::now);
                        n += 1;
                    }
                    Some(Err(e)) => eprintln!("plain consumer: {e}"),
                    None => {}
                }
            }
            let secs = start.elapsed().as_secs_f64();
            let after_first = first.map_or(secs, |f| f.elapsed().as_secs_f64());
            (secs, after_first)
        };
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        omnibox(url, &schema, &["migrate", "-q"], None);
        let argv = [
            "inbox", "consume", "--from", &from, "--topic", &topic, "--once", "--group", "bench",
            "--batch", &batch, "-q",
        ];
        // OMNIBOX_BENCH_BIN: another build's binary (a before/after comparison).
        let binary = std::env::var_os("OMNIBOX_BENCH_BIN").map_or_else(bin, PathBuf::from);
        let run = || {
            let start = Instant::now();
            let out = Command::new(&binary)
                .args(argv)
                .env("OMNIBOX_DATABASE_URL", &conn.url)
                .env("OMNIBOX_DATABASE_SCHEMA", &schema)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .expect("run omnibox");
            let secs = start.elapsed().as_secs_f64();
            assert!(
                out.status.success(),
                "omnibox {argv:?} failed: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            secs
        };
        let (secs, (plain_secs, plain_first)) = if round % 2 == 1 {
            let s = run();
            (s, plain())
        } else {
            let p = plain();
            (run(), p)
        };
        let rows = db.scalar(format!("SELECT count(*)::text FROM {schema}.inbox_events"));
        db.exec(format!("DROP SCHEMA {schema} CASCADE"));
        // Every partition's committed offset is its end.
        let committed_at_end = {
            let check: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "bench")
                .create()
                .expect("check consumer");
            let mut tpl = rdkafka::TopicPartitionList::new();
            for p in 0..PARTITIONS {
                tpl.add_partition(&topic, p);
            }
            let timeout = std::time::Duration::from_secs(10);
            let committed = check
                .committed_offsets(tpl, timeout)
                .expect("committed offsets");
            (0..PARTITIONS).all(|p| {
                let (_, high) = check
                    .fetch_watermarks(&topic, p, timeout)
                    .expect("watermarks");
                committed
                    .find_partition(&topic, p)
                    .is_some_and(|e| e.offset() == rdkafka::Offset::Offset(high))
            })
        };
        let verified = rows == distinct.to_string() && committed_at_end;
        let rate = total as f64 / secs;
        let plain_rate = total as f64 / plain_secs;
        rates.push(rate);
        plain_rates.push(plain_rate);
        plain_after_first.push(total as f64 / plain_first);
        println!(
            "inbox kafka round {round}: {total} messages ({distinct} distinct) in {secs:.3} s = {rate:.0} messages/s; plain consumer {plain_secs:.3} s = {plain_rate:.0} messages/s ({:.0} after its first message); rows {rows}, offsets committed at the end {committed_at_end}, verified {verified}",
            total as f64 / plain_first
        );
        let line = json!({
            "scenario": "omnibox_inbox_consume_kafka",
            "events": total,
            "seconds": secs,
            "events_per_s": rate,
            "params": {"batch_size": args.batch, "distinct": distinct, "partitions": PARTITIONS, "round": round,
                       "plain_consumer_seconds": plain_secs, "plain_consumer_events_per_s": plain_rate,
                       "plain_consumer_after_first_events_per_s": total as f64 / plain_first},
            "verified": verified,
        });
        let mut results = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(results_file())
            .unwrap();
        writeln!(results, "{line}").unwrap();
        assert!(
            verified,
            "rows {rows} of {distinct}, offsets committed at the end: {committed_at_end}"
        );
    }
    report("inbox kafka (no handler)", &rates, &command, conn);
    report(
        "plain rdkafka consumer, from its creation",
        &plain_rates,
        "BaseConsumer, default settings, auto.offset.reset=earliest, same topic and broker",
        conn,
    );
    report(
        "plain rdkafka consumer, after its first message",
        &plain_after_first,
        "the same runs",
        conn,
    );
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        s[s.len() / 2]
    };
    println!(
        "inbox kafka / plain consumer (medians): {:.0} %",
        100.0 * median(&rates) / median(&plain_rates)
    );
}

/// The operations commands on a 10-million-row outbox (PostgreSQL): 9.9 M
/// completed, 50,000 failed with 200 distinct causes (one event type),
/// 50,000 pending. Seeded with SQL outside the timed part, then analyzed
/// (a table that grew to this size has been analyzed by autovacuum; the
/// seeding is one statement, which autovacuum would not see in time).
/// Each command is the release binary, timed from spawn to exit.
fn ops(args: &Args, conn: &Conn) {
    let total = args.events.max(100_000);
    let failed = 50_000usize.min(total / 20);
    let pending = 50_000usize.min(total / 20);
    let completed = total - failed - pending;
    let old = completed / 10;
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    omnibox(&conn.setup, &schema, &["migrate", "-q"], None);
    let db = Db::new(&conn.setup);
    let started = Instant::now();
    let t = format!("{schema}.outbox_events");
    // Completed rows, the oldest tenth completed 40 days ago (for cleanup);
    // failed rows spread through the table; pending rows last.
    db.exec(format!(
        "INSERT INTO {t} (id, event_type, payload, status, attempts_made, max_attempts, last_error,
                          scheduled_at, completed_at, created_at, updated_at,
                          aggregate_type, aggregate_id, topic, partition_key)
         SELECT gen_random_uuid(),
                CASE WHEN g % {step} = 0 THEN 'payment.failed' ELSE 'order.created' END,
                jsonb_build_object('order_id', g, 'customer_id', 'customer-' || (g % 1000),
                                   'amount_cents', 1000 + g % 5000, 'currency', 'EUR'),
                CASE WHEN g % {step} = 0 THEN 'failed' ELSE 'completed' END,
                CASE WHEN g % {step} = 0 THEN 6 ELSE 1 END, 6,
                CASE WHEN g % {step} = 0
                     THEN 'broker rejected the record: cause ' || chr(97 + (g / {step}) % 200 / 26) || chr(97 + (g / {step}) % 200 % 26)
                END,
                now() - interval '50 days', 
                CASE WHEN g % {step} = 0 THEN NULL
                     WHEN g <= {old} THEN now() - interval '40 days' ELSE now() - interval '1 day' END,
                now() - interval '50 days', now() - interval '1 day',
                'order', gen_random_uuid(), 'orders.events', 'key-' || g
         FROM generate_series(1, {n}) g",
        step = (completed + failed) / failed,
        n = completed + failed,
    ));
    db.exec(format!(
        "INSERT INTO {t} (id, event_type, payload, aggregate_type, aggregate_id, topic, partition_key)
         SELECT gen_random_uuid(), 'order.created', jsonb_build_object('order_id', g), 'order',
                gen_random_uuid(), 'orders.events', 'pending-' || g
         FROM generate_series(1, {pending}) g"
    ));
    db.exec(format!("ANALYZE {t}"));
    let counts = db.scalar(format!(
        "SELECT count(*) FILTER (WHERE status = 'completed') || ' completed, ' ||
                count(*) FILTER (WHERE status = 'failed') || ' failed, ' ||
                count(*) FILTER (WHERE status = 'pending') || ' pending' FROM {t}"
    ));
    println!(
        "ops: seeded {counts} in {:.1} s (schema {schema})",
        started.elapsed().as_secs_f64()
    );
    let time = |label: &str, argv: &[&str]| -> (f64, std::process::Output) {
        let start = Instant::now();
        let mut cmd = Command::new(bin());
        cmd.args(argv)
            .env("OMNIBOX_DATABASE_URL", &conn.url)
            .env("OMNIBOX_DATABASE_SCHEMA", &schema)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = cmd.output().expect("run omnibox");
        let secs = start.elapsed().as_secs_f64();
        println!(
            "ops: {label}: {:.0} ms (exit {}, conn {})\n  command: omnibox {}",
            secs * 1000.0,
            out.status.code().unwrap_or(-1),
            conn.kind,
            argv.join(" ")
        );
        let mut line = json!({
            "scenario": "omnibox_ops", "command": argv.join(" "), "seconds": secs,
            "rows": total, "exit": out.status.code(),
        });
        conn.tag(&mut line);
        let mut results = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(results_file())
            .unwrap();
        writeln!(results, "{line}").unwrap();
        (secs, out)
    };
    time("status", &["status"]);
    time(
        "status --check",
        &[
            "status",
            "--check",
            "--max-failed",
            "1000000",
            "--max-pending-age",
            "100d",
        ],
    );
    let (_, out) = time(
        "list failed, first page",
        &[
            "list", "--table", "outbox", "--status", "failed", "--limit", "50", "--format", "json",
        ],
    );
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let last = page["events"]
        .as_array()
        .and_then(|a| a.last())
        .and_then(|e| e["seq"].as_i64())
        .unwrap_or(0);
    let after = last.to_string();
    time(
        "list failed, next page (--after)",
        &[
            "list", "--table", "outbox", "--status", "failed", "--limit", "50", "--after", &after,
            "--format", "json",
        ],
    );
    time(
        "list, first page",
        &[
            "list", "--table", "outbox", "--limit", "50", "--format", "json",
        ],
    );
    let mid = (total / 2).to_string();
    time(
        "list, a page in the middle (--after)",
        &[
            "list", "--table", "outbox", "--limit", "50", "--after", &mid, "--format", "json",
        ],
    );
    time(
        "unlock --worker --dry-run",
        &[
            "unlock",
            "--worker",
            "gone:1",
            "--reason",
            "bench",
            "--dry-run",
        ],
    );
    let (_, out) = time("failures", &["failures", "--format", "json"]);
    let groups: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let n_groups = groups["groups"].as_array().map_or(0, Vec::len);
    let grouped: u64 = groups["groups"]
        .as_array()
        .map(|a| a.iter().filter_map(|g| g["count"].as_u64()).sum())
        .unwrap_or(0);
    println!("ops: failures: {n_groups} groups holding {grouped} rows (expected 200 and {failed})");
    let (secs, _) = time(
        "replay --event-type payment.failed --yes",
        &[
            "replay",
            "--event-type",
            "payment.failed",
            "--yes",
            "--reason",
            "bench",
            "-q",
        ],
    );
    let replayed = db.scalar(format!(
        "SELECT count(*)::text FROM {t} WHERE event_type = 'payment.failed' AND status = 'pending'"
    ));
    println!(
        "ops: replay: {replayed} rows requeued, {:.0} rows/s",
        replayed.parse::<f64>().unwrap_or(0.0) / secs
    );
    let (secs, _) = time(
        "cleanup --older-than 30d",
        &[
            "cleanup",
            "--older-than",
            "30d",
            "--table",
            "outbox",
            "--yes",
            "--max-iterations",
            "100000",
            "-q",
        ],
    );
    println!(
        "ops: cleanup: {old} rows deleted, {:.0} rows/s",
        old as f64 / secs
    );
    db.exec(format!("DROP SCHEMA {schema} CASCADE"));
}
