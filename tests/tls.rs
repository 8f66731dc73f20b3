//! PostgreSQL over TLS: private servers (scripts/postgres.sh --tls) with a
//! certificate authority made here, requiring TLS on every TCP connection.
//! `sslmode=verify-full` with the CA works, a wrong CA and a plain
//! connection are refused with exit 2, and a client certificate logs in.
//! Statements over TLS never wait for a delayed ACK (TCP_NODELAY), no
//! command leaves a `Connection reset by peer` in the server's log (nor
//! opens a connection it need not), and the
//! binary's TLS library does not gather CPU jitter entropy at start.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The private servers' ports (one per test: nextest runs them at once):
/// below Linux's ephemeral range (32768 and up), where a concurrent test's
/// client socket once held 54342.
const PORT: &str = "29342";
const RTT_PORT: &str = "29343";
const LOG_PORT: &str = "29344";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh")
}

struct Server(&'static str);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", "--port", self.0])
            .status();
    }
}

/// Starts a private server on `port` that requires TLS, with a CA and a
/// server certificate for 127.0.0.1 made in `certs`.
fn tls_server(certs: &Path, port: &'static str) -> Server {
    ca(certs, "ca");
    signed(certs, "ca", "server", "127.0.0.1", Some("IP:127.0.0.1"));
    let out = Command::new(script())
        .args(["start", "--port", port, "--tls", certs.to_str().unwrap()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "postgres.sh start --tls");
    Server(port)
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and certificates it signs: `name.crt` / `name.key`.
fn ca(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ],
    );
}

fn signed(dir: &Path, ca: &str, name: &str, cn: &str, san: Option<&str>) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        match san {
            Some(s) => format!("subjectAltName={s}\n"),
            None => "basicConstraints=CA:FALSE\n".to_string(),
        },
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

fn omnibox(dir: &Path, url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_omnibox"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("OMNIBOX_DATABASE_URL", url)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn postgres_over_tls_verify_full_and_client_certificates() {
    if common::pg_url().is_none() {
        return; // not under CI and no PostgreSQL wanted (said by pg_url)
    }
    let certs = tempfile::tempdir().unwrap();
    let c = certs.path();
    ca(c, "ca");
    ca(c, "other-ca");
    signed(c, "ca", "server", "127.0.0.1", Some("IP:127.0.0.1"));
    signed(c, "ca", "client", "omnibox_cert", None);
    let out = Command::new(script())
        .args(["start", "--port", PORT, "--tls", c.to_str().unwrap()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "postgres.sh start --tls");
    let _server = Server(PORT);
    let base = format!("postgres://omnibox:omnibox@127.0.0.1:{PORT}/omnibox");
    let ca_file = c.join("ca.crt");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Verified against the CA: works.
    let verified = format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    );
    let (code, _, err) = omnibox(d, &verified, &["migrate", "-q"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = omnibox(d, &verified, &["status", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"tables\""), "{out}");

    // Without TLS: the server refuses; exit 2, nothing changed.
    let (code, _, err) = omnibox(d, &format!("{base}?sslmode=disable"), &["status"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot connect"), "{err}");
    assert!(
        !err.contains(":omnibox@"),
        "the password is not printed: {err}"
    );

    // A certificate the CA given does not vouch for: refused.
    let wrong = format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        c.join("other-ca.crt").display()
    );
    let (code, _, err) = omnibox(d, &wrong, &["status"]);
    assert_eq!(code, 2, "{err}");

    // A client certificate instead of a password.
    let cert = format!(
        "postgres://omnibox_cert@127.0.0.1:{PORT}/omnibox?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        ca_file.display(),
        c.join("client.crt").display(),
        c.join("client.key").display()
    );
    let (code, out, err) = omnibox(d, &cert, &["status", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"tables\""), "{out}");
}

/// sqlx 0.9.0 stopped setting TCP_NODELAY: over TLS a statement's records
/// then waited for the server's delayed ACK (about 40 ms) and the relay ran
/// at a fifth of its speed. Hundreds of statements on one connection of
/// the store omnibox opens, the default URL (TLS negotiated): the mean
/// round trip stays far below that stall (a coarse bound, so a loaded CI
/// machine does not fail it, while an update that brings the stall back
/// does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_over_tls_do_not_wait_for_delayed_acks() {
    if common::pg_url().is_none() {
        return; // not under CI and no PostgreSQL wanted (said by pg_url)
    }
    let certs = tempfile::tempdir().unwrap();
    let _server = tls_server(certs.path(), RTT_PORT);
    // The URL as users write it: no sslmode, so TLS is negotiated (prefer).
    let url = format!("postgres://omnibox:omnibox@127.0.0.1:{RTT_PORT}/omnibox");
    let store = omnibox::store::PgStore::connect(&url, &Default::default())
        .await
        .expect("connect over TLS");
    let pool = store.pool();
    let mut conn = pool.acquire().await.unwrap();
    let tls: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(tls, "the default URL negotiates TLS");
    // Statements like the relay's: a small one, and one binding 1,000 ids
    // (about 17 KB: more than one TLS record), inside transactions.
    let ids: Vec<uuid::Uuid> = (0..1000u128).map(uuid::Uuid::from_u128).collect();
    const ROUNDS: u32 = 100;
    let started = std::time::Instant::now();
    let mut statements = 0u32;
    for i in 0..ROUNDS {
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT $1::int8 + 1")
            .bind(i64::from(i))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, i64::from(i) + 1);
        let n: i64 = sqlx::query_scalar("SELECT cardinality($1::uuid[])::int8")
            .bind(&ids)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 1000);
        tx.commit().await.unwrap();
        statements += 4; // BEGIN, two statements, COMMIT
    }
    let mean = started.elapsed() / statements;
    eprintln!("mean round trip over TLS: {mean:?} ({statements} statements)");
    drop(conn);
    store.close().await;
    assert!(
        mean < std::time::Duration::from_millis(5),
        "mean round trip over TLS {mean:?} for {statements} statements: \
         sockets without TCP_NODELAY wait ~40 ms for the server's delayed ACK"
    );
}

/// Lines a server logs when a client goes away without closing its
/// connection (no Terminate, a reset instead of a clean shutdown).
const ABRUPT: [&str; 3] = [
    "could not receive data from client",
    "unexpected EOF on client connection",
    "Connection reset by peer",
];

/// Every command closes its connections before it exits: after each one,
/// the server's log has no line of a client that vanished (operators alert
/// on them). The default URL, TLS negotiated, as a managed server has it.
#[test]
fn commands_leave_no_reset_connections_in_the_server_log() {
    if common::pg_url().is_none() {
        return; // not under CI and no PostgreSQL wanted (said by pg_url)
    }
    let certs = tempfile::tempdir().unwrap();
    let _server = tls_server(certs.path(), LOG_PORT);
    let pg_dir = format!("/tmp/omnibox-pg-{LOG_PORT}");
    let log = PathBuf::from(format!("{pg_dir}/server.log"));
    // Each line names its session's application, so only omnibox's own
    // connections are judged (not a tool's or the server's start-up).
    let out = Command::new("psql")
        .args([
            "-h", &pg_dir, "-p", LOG_PORT, "-U", "postgres", "-d", "postgres", "-q",
        ])
        .args(["-c", "ALTER SYSTEM SET log_line_prefix = '%m [%p] app=%a '"])
        .args(["-c", "ALTER SYSTEM SET log_connections = on"])
        .args(["-c", "ALTER SYSTEM SET log_disconnections = on"])
        .args(["-c", "SELECT pg_reload_conf()"])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let url = format!("postgres://omnibox:omnibox@127.0.0.1:{LOG_PORT}/omnibox");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let events = d.join("events.jsonl");
    let mut lines = String::new();
    for i in 0..50 {
        lines.push_str(&format!(
            "{{\"aggregate_type\":\"order\",\"aggregate_id\":\"{}\",\"event_type\":\"order.created\",\"topic\":\"orders\",\"partition_key\":\"k{}\",\"payload\":{{\"n\":{i}}}}}\n",
            uuid::Uuid::from_u128(i + 1),
            i % 7
        ));
    }
    std::fs::write(&events, lines).unwrap();
    let published = d.join("published.jsonl");
    let published_arg = format!("file:{}", published.display());
    let from_arg = format!("file:{}", published.display());
    let commands: Vec<Vec<&str>> = vec![
        vec!["migrate", "-q"],
        vec!["status"],
        vec!["enqueue", "--jsonl", events.to_str().unwrap()],
        vec!["list", "--limit", "5"],
        vec!["publish", "--once", "--broker", &published_arg],
        vec!["inbox", "consume", "--from", &from_arg, "--once"],
        vec!["inbox", "process", "--exec", "true", "--once"],
        vec!["failures"],
        vec!["release-stale-locks"],
        vec!["cleanup", "--older-than", "7d"],
        vec!["doctor"],
        vec!["status", "--format", "json"],
    ];
    // omnibox's sessions begun and ended so far, by the server's log.
    let sessions = |text: &str| {
        let begun = text
            .lines()
            .filter(|l| {
                l.contains("connection authorized") && l.contains("application_name=omnibox")
            })
            .count();
        let ended = text
            .lines()
            .filter(|l| l.contains("app=omnibox") && l.contains("disconnection:"))
            .count();
        (begun, ended)
    };
    let mut seen = std::fs::read_to_string(&log).unwrap_or_default().len();
    for args in &commands {
        let (code, out, err) = omnibox(d, &url, args);
        assert!(
            code == 0 || (args[0] == "doctor" && code == 1),
            "omnibox {args:?} exited {code}: {out}{err}"
        );
        // The server logs a vanished client, then its session's end, when
        // its backend notices: wait until every session it logged begun
        // has ended, so the next command's window holds only its own.
        let started = std::time::Instant::now();
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let (begun, ended) = sessions(&text);
            if begun == ended || started.elapsed() > std::time::Duration::from_secs(20) {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let new = &text[seen.min(text.len())..];
        assert!(
            !new.lines().any(|line| line.contains("app=omnibox")
                && ABRUPT.iter().any(|a| line.contains(a))),
            "after omnibox {args:?} the server logged:\n{new}"
        );
        let (begun, ended) = sessions(new);
        assert_eq!(begun, ended, "omnibox {args:?} left sessions open:\n{new}");
        // enqueue: the connection that reports a refused server at once,
        // then one for the schema check and the COPY (the check's
        // connection is back in the pool before the COPY asks for one).
        if args[0] == "enqueue" {
            assert_eq!(begun, 2, "omnibox {args:?} connected {begun} times:\n{new}");
        }
        seen = text.len();
    }
    let published = std::fs::read_to_string(&published).unwrap();
    assert_eq!(published.lines().count(), 50, "every event was published");
}

/// aws-lc (rustls' cryptography) gathers CPU jitter entropy the first time
/// a process needs randomness unless it is built without it
/// (`.cargo/config.toml`): 20-30 ms of CPU at the start of every command
/// that opens a TLS connection. Its collector's code must not be in the
/// binary, so that a dependency update or a lost setting cannot bring the
/// cost back unnoticed.
#[test]
fn the_binary_carries_no_cpu_jitter_entropy_collector() {
    let binary = std::fs::read(env!("CARGO_BIN_EXE_omnibox")).unwrap();
    assert!(
        binary.len() > 1_000_000,
        "the binary is {} bytes: not the omnibox binary",
        binary.len()
    );
    // A symbol of aws-lc's CPU jitter entropy source (present in a build
    // without AWS_LC_SYS_NO_JITTER_ENTROPY=1, symbol table and all).
    let needle = b"jent_entropy_collector_alloc";
    let found = binary.windows(needle.len()).any(|w| w == needle);
    assert!(
        !found,
        "the omnibox binary links aws-lc's CPU jitter entropy source: build it with \
         AWS_LC_SYS_NO_JITTER_ENTROPY=1 (.cargo/config.toml)"
    );
}
