//! The real binary, run in a clean environment and a temporary directory;
//! exit code, stdout and stderr compared with snapshots (ids and times masked).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::run::Run;

fn omnibox(dir: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut cmd = common::run::command(dir);
    cmd.args(args).env("COLUMNS", "100");
    for (k, v) in env {
        cmd.env(k, v);
    }
    common::run::run(cmd, stdin)
}

fn run(dir: &Path, args: &[&str]) -> Run {
    omnibox(dir, args, None, &[])
}

macro_rules! snap {
    ($name:expr, $run:expr) => {
        insta::with_settings!({
            filters => vec![
                // Same widths as what they mask, so tables stay aligned.
                (r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"),
                (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", "YYYY-MM-DDTHH:MM:SS.ffffffZ"),
                // An age and the padding after it (its width varies).
                (r"\b(\d+ms|\d+s|\d+m \d+s)\b *", "[AGE] "),
                (r#""oldest_pending_age_seconds": [0-9.e-]+"#, r#""oldest_pending_age_seconds": [AGE]"#),
                (r"omnibox \d+\.\d+\.\d+", "omnibox [VERSION]"),
                (r"\b[0-9a-f]{12}\b", "ffffffffffff"),
            ],
            prepend_module_to_snapshot => false,
        }, {
            insta::assert_snapshot!($name, $run.render());
        });
    };
}

const LINE: &str = r#"{"aggregate_type":"order","aggregate_id":"0190f1d2-7a3b-7cde-8f00-123456789abc","event_type":"order.created","topic":"orders","partition_key":"order-1","payload":{"total":12.5}}"#;

fn pending(dir: &Path) -> u64 {
    let r = run(dir, &["status", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["tables"][0]["pending"].as_u64().unwrap()
}

#[test]
fn help() {
    let dir = tempfile::tempdir().unwrap();
    snap!("help", run(dir.path(), &["--help"]));
    snap!("enqueue_help", run(dir.path(), &["enqueue", "--help"]));
}

#[test]
fn migrate_creates_the_default_database_once() {
    let dir = tempfile::tempdir().unwrap();
    snap!("migrate_first", run(dir.path(), &["migrate"]));
    assert!(dir.path().join("omnibox.db").exists());
    snap!("migrate_again", run(dir.path(), &["migrate"]));
    snap!(
        "migrate_json",
        run(dir.path(), &["migrate", "--format", "json"])
    );
}

#[test]
fn migrate_prints_sql_without_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        dir.path(),
        &[
            "migrate",
            "--print-sql",
            "--database-url",
            "postgres://u:p@127.0.0.1:1/db",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    assert!(
        r.stdout
            .starts_with("-- omnibox schema for postgres (version "),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("\n-- omnibox migration 1: initial schema\n")
    );
    assert!(
        r.stdout
            .contains("CREATE TABLE IF NOT EXISTS omnibox_migrations")
    );
    assert!(r.stdout.contains("CREATE TABLE outbox_events"));
    assert!(r.stdout.contains("FOR UPDATE") || r.stdout.contains("outbox_events_claim"));
    let r = run(dir.path(), &["migrate", "--print-sql"]);
    assert!(
        r.stdout.contains("INTEGER PRIMARY KEY AUTOINCREMENT"),
        "sqlite DDL for the default URL"
    );
    assert!(
        !dir.path().join("omnibox.db").exists(),
        "--print-sql does not touch the database"
    );
}

#[test]
fn enqueue_one_event_then_inspect_it() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        dir.path(),
        &[
            "enqueue",
            "--aggregate-type",
            "order",
            "--aggregate-id",
            "0190f1d2-7a3b-7cde-8f00-123456789abc",
            "--event-type",
            "order.created",
            "--topic",
            "orders",
            "--partition-key",
            "order-42",
            "--payload",
            r#"{"total": 12.5, "items": ["a", "b"]}"#,
            "--header",
            "traceparent=00-abc-def-01",
            "--idempotency-key",
            "order-42-created",
            "--format",
            "json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (v["inserted"].as_u64(), v["existing"].as_u64()),
        (Some(1), Some(0))
    );
    let id = v["ids"][0].as_str().unwrap().to_string();
    snap!("show_table", run(dir.path(), &["show", &id]));
    snap!(
        "show_json",
        run(dir.path(), &["show", &id, "--format", "json"])
    );
    snap!("status_table", run(dir.path(), &["status"]));
    snap!(
        "status_json",
        run(dir.path(), &["status", "--format", "json"])
    );
    snap!("list_table", run(dir.path(), &["list"]));
    // The same idempotency key again: nothing new.
    let again = run(
        dir.path(),
        &[
            "enqueue",
            "--aggregate-type",
            "order",
            "--aggregate-id",
            "0190f1d2-7a3b-7cde-8f00-123456789abc",
            "--event-type",
            "order.created",
            "--topic",
            "orders",
            "--partition-key",
            "order-42",
            "--payload",
            r#"{"total": 99}"#,
            "--idempotency-key",
            "order-42-created",
        ],
    );
    snap!("enqueue_existing", again);
    assert!(
        again.stdout.contains(&id),
        "the existing row's id is reported"
    );
    assert_eq!(pending(dir.path()), 1);
}

#[test]
fn enqueue_json_lines_in_bulk() {
    let dir = tempfile::tempdir().unwrap();
    let mut input = String::new();
    for i in 0..2500 {
        input.push_str(&LINE.replace("order-1", &format!("order-{}", i % 10)));
        input.push('\n');
        if i == 5 {
            input.push('\n'); // blank lines are skipped
        }
    }
    let r = omnibox(dir.path(), &["enqueue", "--jsonl"], Some(&input), &[]);
    snap!("enqueue_jsonl", r);
    assert_eq!(pending(dir.path()), 2500);
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, format!("{LINE}\n{LINE}\n")).unwrap();
    let r = run(
        dir.path(),
        &["enqueue", "--jsonl", "events.jsonl", "--format", "json"],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 2);
    assert_eq!(pending(dir.path()), 2502);
    snap!(
        "list_filtered",
        run(
            dir.path(),
            &[
                "list", "--topic", "orders", "--status", "pending", "--limit", "3", "--after", "10"
            ]
        )
    );
}

/// Each bad input: exit 2, one line naming the problem, nothing written.
#[test]
fn enqueue_rejects_bad_input_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &["migrate"]);
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(1_000_001));
    let cases: Vec<(&str, String)> = vec![
        (
            "malformed_line",
            "{\"aggregate_type\": \"order\",".to_string(),
        ),
        ("oversized_payload", LINE.replace(r#"{"total":12.5}"#, &big)),
        ("empty_payload", LINE.replace(r#"{"total":12.5}"#, "{}")),
        (
            "payload_not_object",
            LINE.replace(r#"{"total":12.5}"#, "[1,2,3]"),
        ),
        (
            "naive_timestamp",
            LINE.replace("}}", r#"},"scheduled_at":"2026-12-01T10:00:00"}"#),
        ),
        (
            "bad_uuid",
            LINE.replace("0190f1d2-7a3b-7cde-8f00-123456789abc", "0190f1d2-nope"),
        ),
        ("unknown_field", LINE.replace("\"topic\"", "\"topik\"")),
        ("nan", LINE.replace("12.5", "NaN")),
        (
            "bad_header",
            LINE.replace("}}", r#"},"headers":{"a":"x","A":"y"}}"#),
        ),
        (
            "repeated_header",
            LINE.replace("}}", r#"},"headers":{"a":"1","a":"2"}}"#),
        ),
    ];
    for (name, bad) in cases {
        // Good lines before and after: all-or-nothing.
        let input = format!("{LINE}\n{LINE}\n{bad}\n{LINE}\n");
        let r = omnibox(dir.path(), &["enqueue", "--jsonl"], Some(&input), &[]);
        assert_eq!(r.code, 2, "{name}: {}", r.render());
        assert_eq!(
            r.stderr.lines().count(),
            1,
            "{name}: one line: {}",
            r.stderr
        );
        assert!(
            r.stderr.starts_with("omnibox: error: line 3: "),
            "{name}: {}",
            r.stderr
        );
        assert!(r.stdout.is_empty());
        if name != "oversized_payload" {
            snap!(format!("reject_{name}"), r);
        } else {
            assert!(
                r.stderr.contains("the limit is 1000000 bytes"),
                "{}",
                r.stderr
            );
        }
        assert_eq!(pending(dir.path()), 0, "{name}: nothing written");
    }
    // The same rules apply to flags.
    let flag_cases: Vec<(&str, Vec<&str>)> = vec![
        ("flag_bad_uuid", vec!["--aggregate-id", "xyz"]),
        (
            "flag_naive_time",
            vec!["--scheduled-at", "2026-12-01 10:00:00"],
        ),
        ("flag_payload_array", vec!["--payload", "[1]"]),
        ("flag_payload_invalid", vec!["--payload", "{oops"]),
        ("flag_empty_topic", vec!["--topic", "  "]),
        (
            "flag_repeated_header",
            vec!["--header", "a=1", "--header", "a=2"],
        ),
    ];
    for (name, overrides) in flag_cases {
        let mut args: Vec<&str> = vec!["enqueue"];
        let defaults = [
            ("--aggregate-type", "order"),
            ("--aggregate-id", "0190f1d2-7a3b-7cde-8f00-123456789abc"),
            ("--event-type", "order.created"),
            ("--topic", "orders"),
            ("--partition-key", "k"),
            ("--payload", r#"{"a":1}"#),
        ];
        for (flag, value) in defaults {
            if !overrides.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend(overrides.iter().copied());
        let r = run(dir.path(), &args);
        assert_eq!(r.code, 2, "{name}: {}", r.render());
        snap!(name, r);
        assert_eq!(pending(dir.path()), 0, "{name}: nothing written");
    }
    snap!(
        "missing_required_flags",
        run(dir.path(), &["enqueue", "--topic", "orders"])
    );
}

#[test]
fn inspection_errors() {
    let dir = tempfile::tempdir().unwrap();
    snap!("show_bad_uuid", run(dir.path(), &["show", "not-a-uuid"]));
    snap!(
        "show_missing",
        run(
            dir.path(),
            &["show", "0190f1d2-7a3b-7cde-8f00-123456789abc"]
        )
    );
    snap!(
        "list_bad_status",
        run(dir.path(), &["list", "--status", "done"])
    );
    snap!(
        "list_naive_since",
        run(dir.path(), &["list", "--since", "2026-01-01T00:00:00"])
    );
    snap!("list_empty", run(dir.path(), &["list", "--table", "inbox"]));
}

/// `config show` names each setting's value and where it came from (flag
/// > environment > file > default), masks secrets, and opens no database.
#[test]
fn config_show_names_each_source_and_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = run(d, &["--format", "json", "config", "show"]);
    assert_eq!(r.code, 0, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["config_file"], serde_json::Value::Null);
    assert_eq!(v["settings"]["format"]["source"], "flag");
    for key in [
        "database_url",
        "lease",
        "batch_bytes",
        "dedup_window",
        "broker",
        "kafka",
    ] {
        assert_eq!(
            v["settings"][key]["source"], "default",
            "{key}: {}",
            r.stdout
        );
    }
    assert_eq!(
        v["settings"]["database_url"]["value"],
        "sqlite://omnibox.db"
    );
    assert_eq!(v["settings"]["batch_bytes"]["value"], "16MiB");
    assert!(
        !d.join("omnibox.db").exists(),
        "config show opens no database"
    );

    std::fs::write(
        d.join("omnibox.toml"),
        "lease = \"2m\"\nbroker = \"kafka://user:brokerpw@h:9092\"\ndedup_window = \"3d\"\n\
         [kafka]\n\"sasl.password\" = \"hunter2\"\n\"client.id\" = \"svc\"\n",
    )
    .unwrap();
    let r = omnibox(
        d,
        &["--format", "json", "--dedup-window", "8d", "config", "show"],
        None,
        &[
            ("OMNIBOX_DATABASE_URL", "postgres://app:dbsecret@db/app"),
            ("OMNIBOX_BATCH_BYTES", "4MiB"),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let s = &v["settings"];
    assert_eq!(v["config_file"], "omnibox.toml");
    assert_eq!(s["database_url"]["source"], "environment");
    assert_eq!(s["batch_bytes"]["source"], "environment");
    assert_eq!(s["batch_bytes"]["value"], "4MiB");
    assert_eq!(s["lease"]["source"], "file");
    assert_eq!(s["lease"]["value"], "2m 0s");
    assert_eq!(
        s["dedup_window"]["source"], "flag",
        "the flag beats the file"
    );
    assert_eq!(s["broker"]["source"], "file");
    assert_eq!(s["kafka"]["source"], "file");
    assert_eq!(s["kafka"]["value"], "client.id=svc, sasl.password=****");
    for secret in ["dbsecret", "brokerpw", "hunter2"] {
        assert!(!r.stdout.contains(secret), "{secret} shown: {}", r.stdout);
    }

    // A bad value in the file is a usage error, as for every command.
    std::fs::write(d.join("omnibox.toml"), "lease = \"soon\"\n").unwrap();
    let r = run(d, &["config", "show"]);
    assert_eq!(r.code, 2, "{}", r.render());
    assert!(r.stderr.contains("lease"), "{}", r.render());
}

#[test]
fn configuration_precedence_flag_env_file_default() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("omnibox.toml"),
        "database_url = \"sqlite://from-file.db\"\nformat = \"json\"\n",
    )
    .unwrap();
    let r = run(d, &["migrate"]);
    assert_eq!(r.code, 0, "{}", r.render());
    assert!(d.join("from-file.db").exists(), "file beats default");
    assert!(
        r.stdout.trim_start().starts_with('{'),
        "format from the file"
    );
    let r = omnibox(
        d,
        &["migrate"],
        None,
        &[("OMNIBOX_DATABASE_URL", "sqlite://from-env.db")],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    assert!(d.join("from-env.db").exists(), "environment beats file");
    let r = omnibox(
        d,
        &[
            "migrate",
            "--database-url",
            "sqlite://from-flag.db",
            "--format",
            "table",
        ],
        None,
        &[("OMNIBOX_DATABASE_URL", "sqlite://from-env2.db")],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    assert!(
        d.join("from-flag.db").exists() && !d.join("from-env2.db").exists(),
        "flag beats environment"
    );
    assert!(
        r.stdout.starts_with("Applied"),
        "flag beats the file's format"
    );

    std::fs::write(d.join("omnibox.toml"), "databse_url = \"x\"\n").unwrap();
    snap!("config_unknown_key", run(d, &["status"]));
}

#[test]
fn connection_errors_are_clear_and_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        dir.path(),
        &[
            "status",
            "--database-url",
            "postgres://app:s3cret@127.0.0.1:1/app",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.render());
    assert!(!r.stderr.contains("s3cret"), "{}", r.stderr);
    assert!(
        r.stderr.contains("postgres://app:***@127.0.0.1:1/app"),
        "{}",
        r.stderr
    );
    snap!(
        "unsupported_url",
        run(dir.path(), &["status", "--database-url", "mysql://x/y"])
    );
    snap!(
        "sqlite_schema",
        run(dir.path(), &["status", "--schema", "x"])
    );
}

#[test]
fn postgres_enqueue_and_status() {
    let Some(url) = common::pg_url() else { return };
    let schema = format!("cli_{}", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("OMNIBOX_DATABASE_URL", url.as_str()),
        ("OMNIBOX_DATABASE_SCHEMA", schema.as_str()),
    ];
    let r = omnibox(dir.path(), &["status"], None, &env);
    assert_eq!(r.code, 2, "{}", r.render());
    assert!(
        r.stderr.contains("run `omnibox migrate` first"),
        "{}",
        r.stderr
    );
    let r = omnibox(dir.path(), &["migrate"], None, &env);
    assert_eq!(r.code, 0, "{}", r.render());
    let input = format!("{LINE}\n{LINE}\n");
    let r = omnibox(dir.path(), &["enqueue", "--jsonl"], Some(&input), &env);
    assert_eq!(r.code, 0, "{}", r.render());
    let bad = format!("{LINE}\n{{\"x\":1}}\n");
    let r = omnibox(dir.path(), &["enqueue", "--jsonl"], Some(&bad), &env);
    assert_eq!(r.code, 2, "{}", r.render());
    let r = omnibox(dir.path(), &["status", "--format", "json"], None, &env);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        v["tables"][0]["pending"], 2,
        "the rejected input wrote nothing"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let ddl = format!("DROP SCHEMA {schema} CASCADE");
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&pool)
            .await
            .unwrap();
    });
}

/// The operations commands' human and JSON output and their errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_output() {
    use omnibox::{
        ClaimOptions, DomainService, EventStore, Failure, NewOutboxEvent, OutboxStore, WorkerId,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = format!("sqlite://{}", d.join("omnibox.db").display());
    {
        let store = omnibox::store::SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let outbox = store.outbox();
        let events: Vec<_> = (0..3)
            .map(|i| {
                let mut n = NewOutboxEvent::new(
                    "order",
                    uuid::Uuid::now_v7(),
                    if i == 2 {
                        "order.refunded"
                    } else {
                        "order.created"
                    },
                    "orders",
                    format!("order-{i}"),
                    serde_json::json!({"n": i}),
                );
                n.max_attempts = Some(1);
                DomainService::default().create_outbox_event(n).unwrap()
            })
            .collect();
        outbox.create_many(&events).await.unwrap();
        let c = outbox
            .claim(&ClaimOptions::new(WorkerId::new("relay-1").unwrap(), 10))
            .await
            .unwrap();
        let failures: Vec<_> = c
            .events
            .iter()
            .map(|e| {
                Failure::counted(
                    e.id(),
                    "broker rejected the record: Message size too large",
                    omnibox::time::now(),
                )
            })
            .collect();
        outbox.fail(&c.token, &failures).await.unwrap();
    }
    let env = [("OMNIBOX_DATABASE_URL", url.as_str()), ("USER", "oncall")];
    let run = |args: &[&str]| omnibox(d, args, None, &env);
    snap!("ops_failures", run(&["failures"]));
    snap!("ops_failures_json", run(&["failures", "--format", "json"]));
    snap!("ops_replay_dry_run", run(&["replay", "--all", "--dry-run"]));
    snap!("ops_replay_no_selector", run(&["replay"]));
    snap!(
        "ops_replay_no_yes",
        run(&["replay", "--event-type", "order.created"])
    );
    snap!(
        "ops_replay",
        run(&[
            "replay",
            "--event-type",
            "order.created",
            "--reason",
            "size limit raised",
            "--yes"
        ])
    );
    snap!(
        "ops_status_check",
        run(&["status", "--check", "--max-failed", "0"])
    );
    snap!(
        "ops_unlock_no_reason",
        run(&["unlock", "0190f1d2-7a3b-7cde-8f00-123456789abc"])
    );
    snap!(
        "ops_unlock_missing",
        run(&[
            "unlock",
            "0190f1d2-7a3b-7cde-8f00-123456789abc",
            "--reason",
            "x",
            "--yes"
        ])
    );
    snap!(
        "ops_release_dry_run",
        run(&["release-stale-locks", "--older-than", "5m", "--dry-run"])
    );
    snap!(
        "ops_cleanup_guard",
        run(&["cleanup", "--older-than", "1d", "--yes"])
    );
    snap!(
        "ops_cleanup_dry_run",
        run(&[
            "cleanup",
            "--older-than",
            "7d",
            "--dry-run",
            "--format",
            "json"
        ])
    );
    snap!(
        "ops_replay_json",
        run(&[
            "replay",
            "--event-type",
            "order.refunded",
            "--dry-run",
            "--format",
            "json"
        ])
    );
    snap!(
        "ops_replay_naive_since",
        run(&["replay", "--since", "2026-11-26T10:00:00", "--dry-run"])
    );
    // A live claim by relay-2 over the two replayed rows, then force-unlocked.
    {
        let store = omnibox::store::SqliteStore::connect(&url).await.unwrap();
        let c = store
            .outbox()
            .claim(&ClaimOptions::new(WorkerId::new("relay-2").unwrap(), 10))
            .await
            .unwrap();
        assert_eq!(c.events.len(), 2);
    }
    snap!(
        "ops_unlock_bad_id",
        run(&["unlock", "not-a-uuid", "--reason", "x", "--yes"])
    );
    let long_reason = "x".repeat(256);
    snap!(
        "ops_unlock_long_reason",
        run(&[
            "unlock",
            "--worker",
            "relay-2",
            "--reason",
            &long_reason,
            "--yes"
        ])
    );
    snap!(
        "ops_unlock_dry_run",
        run(&[
            "unlock",
            "--worker",
            "relay-2",
            "--reason",
            "relay-2 was OOM-killed",
            "--dry-run"
        ])
    );
    snap!(
        "ops_unlock_json",
        run(&[
            "unlock",
            "--worker",
            "relay-2",
            "--reason",
            "relay-2 was OOM-killed",
            "--yes",
            "--format",
            "json"
        ])
    );
    snap!(
        "ops_release_json",
        run(&[
            "release-stale-locks",
            "--older-than",
            "5m",
            "--yes",
            "--format",
            "json"
        ])
    );
    snap!("ops_cleanup_no_retention", run(&["cleanup", "--yes"]));
    snap!(
        "ops_cleanup",
        run(&["cleanup", "--older-than", "7d", "--include-failed", "--yes"])
    );
    snap!("ops_audit", run(&["audit"]));
    snap!("ops_audit_json", run(&["audit", "--format", "json"]));
}

/// completions/ and man/ are what the clap definition generates today.
#[test]
fn completions_and_man_pages_are_current() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(dir.path(), &["generate", "--out", "."]);
    assert_eq!(r.code, 0, "{}", r.render());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["completions", "man"] {
        let fresh: Vec<_> = std::fs::read_dir(dir.path().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let committed: Vec<_> = std::fs::read_dir(repo.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let mut a = fresh.clone();
        let mut b = committed.clone();
        a.sort();
        b.sort();
        assert_eq!(
            a, b,
            "{sub}/ files differ: run `cargo run -- generate --out .` and commit"
        );
        for name in fresh {
            let new = std::fs::read(dir.path().join(sub).join(&name)).unwrap();
            let old = std::fs::read(repo.join(sub).join(&name)).unwrap();
            assert!(
                new == old,
                "{sub}/{} is stale: run `cargo run -- generate --out .` and commit",
                name.to_string_lossy()
            );
        }
    }
    let r = run(dir.path(), &["completions", "bash"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("_omnibox()"),
        "{}",
        &r.stdout[..200.min(r.stdout.len())]
    );
}

/// A consumer group that is empty, blank, padded, too long or holds a
/// control character is refused at start-up (exit 2, one message, nothing
/// read or stored); it used to pass start-up and panic at the first message.
#[test]
fn inbox_consume_refuses_a_bad_group_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let long = "g".repeat(300);
    for group in ["", " ", " billing", long.as_str(), "a\u{1}b"] {
        let r = omnibox(
            dir.path(),
            &[
                "inbox", "consume", "--from", "-", "--once", "--group", group,
            ],
            // No input: the process exits before it would read any.
            None,
            &[],
        );
        assert_eq!(r.code, 2, "{group:?}: {}", r.render());
        assert!(r.stderr.contains("--group"), "{group:?}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{group:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{group:?}: {}", r.stdout);
    }
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing was created"
    );
}

/// Each stdin run numbers its lines from 1; ids derived from line numbers
/// made line 1 of a new input "a duplicate" of line 1 of the last one. A
/// `message_id` header of control characters used to panic (exit 101) and
/// store nothing, on every restart.
#[test]
fn inbox_consume_from_stdin_keeps_distinct_messages_and_survives_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let consume = |line: &str| {
        let r = omnibox(
            dir.path(),
            &["inbox", "consume", "--from", "-", "--format", "json"],
            Some(&format!("{line}\n")),
            &[],
        );
        assert_eq!(r.code, 0, "{}", r.render());
        serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()
    };
    let a = consume(r#"{"topic":"t","value":{"a":1}}"#);
    assert_eq!(
        (a["stored"].as_u64(), a["duplicates"].as_u64()),
        (Some(1), Some(0))
    );
    let b = consume(r#"{"topic":"t","value":{"b":2}}"#);
    assert_eq!(
        (b["stored"].as_u64(), b["duplicates"].as_u64()),
        (Some(1), Some(0))
    );
    let again = consume(r#"{"topic":"t","value":{"a":1}}"#);
    assert_eq!(
        again["duplicates"].as_u64(),
        Some(1),
        "the same message again"
    );
    let bad = consume(r#"{"topic":"t","headers":{"message_id":"\u0001\u0002"},"value":{"c":3}}"#);
    assert_eq!(
        (bad["stored"].as_u64(), bad["poison"].as_u64()),
        (Some(1), Some(1))
    );
}

/// SIGTERM while `inbox consume --from -` waits for more lines on stdin:
/// the lines it had read are stored before it exits (stdin cannot give them
/// again). They used to be dropped with the cancelled poll.
#[test]
fn inbox_consume_from_stdin_stores_what_it_read_before_a_sigterm() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let r = omnibox(dir.path(), &["migrate", "-q"], None, &[]);
    assert_eq!(r.code, 0, "{}", r.render());
    let mut cmd = common::run::command(dir.path());
    cmd.args(["inbox", "consume", "--from", "-", "--format", "json"])
        .stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for n in 1..=3 {
        writeln!(stdin, r#"{{"topic":"t","value":{{"n":{n}}}}}"#).unwrap();
    }
    stdin.flush().unwrap();
    // The lines are read at once; the consumer then waits for the 500th
    // line of its batch, or the end of stdin, which never comes: the
    // signal must arrive during that wait, and a second is ample for three
    // lines to be read.
    std::thread::sleep(std::time::Duration::from_secs(1));
    // SAFETY: kill(2) on the child's pid, which is ours and still running.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let run: Run = out.into();
    assert_eq!(run.code, 0, "{}", run.render());
    let report = run.json();
    assert_eq!(report["stored"].as_u64(), Some(3), "{}", run.render());
    let list = omnibox(
        dir.path(),
        &["list", "--table", "inbox", "--format", "json"],
        None,
        &[],
    );
    assert_eq!(list.code, 0, "{}", list.render());
    let rows = list.json()["events"].as_array().map_or(0, Vec::len);
    assert_eq!(rows, 3, "{}", list.render());
}

/// Poison read from stdin or a file says where it was read (`stdin line
/// 1`, not `file:0:1`); a line over the line limit says so (it used to be
/// "the value is not JSON: EOF while parsing") and keeps as long a start as
/// a row holds, with the whole line's length.
#[test]
fn inbox_poison_from_stdin_and_files_says_where_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = omnibox(
        d,
        &["inbox", "consume", "--from", "-", "--format", "json"],
        Some("not json\n"),
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let long = format!(
        "{{\"topic\":\"t\",\"value\":{{\"x\":\"{}\"}}}}\n",
        "a".repeat(5_000_000)
    );
    std::fs::write(d.join("long.jsonl"), &long).unwrap();
    let r = run(d, &["inbox", "consume", "--from", "file:long.jsonl"]);
    assert_eq!(r.code, 0, "{}", r.render());
    let r = run(d, &["list", "--table", "inbox", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{}", r.stdout.len());
    let error = |i: usize| events[i]["last_error"].as_str().unwrap().to_string();
    let (stdin, file) = if error(0).contains("stdin") {
        (0, 1)
    } else {
        (1, 0)
    };
    assert!(
        error(stdin).starts_with("cannot parse message stdin line 1: the value is not JSON"),
        "{}",
        error(stdin)
    );
    assert_eq!(events[stdin]["payload"]["origin"], "stdin");
    assert_eq!(
        error(file),
        format!(
            "cannot parse message file:long.jsonl line 1: the line is {} bytes, longer than a line may be (4194304 bytes), so it was not parsed",
            long.len() - 1
        )
    );
    let p = &events[file]["payload"];
    assert_eq!(p["raw_bytes"], (long.len() - 1) as u64);
    use base64::Engine as _;
    let prefix = base64::engine::general_purpose::STANDARD
        .decode(p["raw_prefix_base64"].as_str().unwrap())
        .unwrap();
    // As long a start as a row holds (docs/cli.md says so): about 745 KB
    // with the default payload limit of 1,000,000 bytes.
    assert!(
        (740_000..750_000).contains(&prefix.len()),
        "{}",
        prefix.len()
    );
    assert_eq!(&prefix[..], &long.as_bytes()[..prefix.len()]);
}

/// `publish --broker stdout | head`: when stdout's reader goes away the
/// relay stops, as other Unix tools do (it retried "downstream not
/// answering" forever), in watch mode and with --once; what it could not
/// write stays pending with no attempt spent.
#[test]
fn publish_to_stdout_stops_when_the_reader_goes() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lines: String = (0..3000)
        .map(|i| {
            format!(
                "{{\"aggregate_type\":\"o\",\"aggregate_id\":\"{}\",\"event_type\":\"t\",\"topic\":\"t\",\"partition_key\":\"k{i}\",\"payload\":{{\"i\":{i}}}}}\n",
                uuid::Uuid::now_v7()
            )
        })
        .collect();
    let r = omnibox(d, &["enqueue", "--jsonl", "-q"], Some(&lines), &[]);
    assert_eq!(r.code, 0, "{}", r.render());
    for args in [
        &["publish", "--broker", "stdout", "--batch", "100"][..],
        &["publish", "--once", "--broker", "stdout", "--batch", "100"][..],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_omnibox"))
            .args(args)
            .current_dir(d)
            .env_clear()
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert!(first.starts_with("{\"topic\":\"t\""), "{first}");
        drop(out);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{args:?} still running a minute after its reader went"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            stderr.contains("stdout's reader has gone; stopped"),
            "{stderr}"
        );
    }
    let r = run(d, &["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let outbox = &v["tables"][0];
    assert_eq!(outbox["table"], "outbox");
    assert_eq!(outbox["failed"], 0, "{v}");
    assert_eq!(outbox["locked"], 0, "nothing left locked: {v}");
    let (pending, completed) = (
        outbox["pending"].as_u64().unwrap(),
        outbox["completed"].as_u64().unwrap(),
    );
    assert_eq!(pending + completed, 3000, "{v}");
    assert!(pending > 0, "{v}");
    // No attempt was spent on what could not be written.
    let r = run(
        d,
        &[
            "list", "--status", "pending", "--limit", "3000", "--format", "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["attempts_made"] == 0),
        "{}",
        r.stdout.len()
    );
}

/// A duration or time that would overflow is exit 2 with one clear line on
/// every command that takes one (it panicked, or failed at run time with
/// `timestamp out of range`); a negative one is explained; nothing changes.
#[test]
fn overflowing_and_negative_durations_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[&[&str]] = &[
        &["list", "--since"],
        &["replay", "--all", "--dry-run", "--since"],
        &["replay", "--all", "--dry-run", "--until"],
        &["audit", "--since"],
        &["cleanup", "--dry-run", "--older-than"],
        &[
            "cleanup",
            "--dry-run",
            "--older-than",
            "8d",
            "--include-failed",
            "--failed-older-than",
        ],
        &["release-stale-locks", "--dry-run", "--older-than"],
        &["status", "--stale-after"],
        &["status", "--check", "--max-pending-age"],
        &["publish", "--once", "--lease"],
        &["inbox", "process", "--once", "--lease"],
        &["inbox", "consume", "--once", "--lease"],
        &["inbox", "consume", "--once", "--transient-limit"],
        &["inbox", "process", "--once", "--timeout"],
        &["status", "--dedup-window"],
    ];
    for case in cases {
        for value in ["99999999w", "18446744073709551616s", "-5d"] {
            let mut args = case.to_vec();
            args.push(value);
            let r = run(dir.path(), &args);
            assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
            assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
            let expected = if value.starts_with('-') {
                if case.contains(&"--since") || case.contains(&"--until") {
                    "5d"
                } else {
                    "not negative"
                }
            } else {
                "too long"
            };
            assert!(r.stderr.contains(expected), "{args:?}: {}", r.stderr);
        }
    }
    assert!(
        !dir.path().join("omnibox.db").exists(),
        "nothing was opened or created"
    );
}

/// Hostile database URLs (passwords holding `/`, `?`, `#`, `@`, password
/// parameters) never reach stdout or stderr, whichever way they come in:
/// the flag, the environment, the config file; in the error line, the JSON
/// error object and the debug log's `connecting` line.
#[test]
fn hostile_database_urls_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let urls: &[(&str, &str)] = &[
        ("postgres://u:se/cret1@127.0.0.1:1/db", "cret1"),
        ("postgres://u:se?cret2@127.0.0.1:1/db", "cret2"),
        ("postgres://u:se#cret3@127.0.0.1:1/db", "cret3"),
        ("postgres://u:p@ss@cret4@127.0.0.1:1/db", "cret4"),
        ("postgres://u:a:b:cret5@127.0.0.1:1/db", "cret5"),
        (
            "postgres://u@127.0.0.1:1/db?password=cret6&sslmode=disable",
            "cret6",
        ),
        ("postgres://u:x@127.0.0.1:1/db?sslpassword=cret7", "cret7"),
        ("postgres://u:cret8@", "cret8"),
        ("mysql://u:cret9@h/db", "cret9"),
        ("postgres:/weird:cret10@127.0.0.1:1/db", "cret10"),
        ("postgres:weird:cret11@127.0.0.1/db", "cret11"),
        ("weird:cret12%2Fx@h/db", "cret12"),
    ];
    for (url, secret) in urls {
        let config = dir.path().join("omnibox.toml");
        std::fs::write(&config, format!("database_url = {url:?}\n")).unwrap();
        let runs = [
            omnibox(dir.path(), &["--database-url", url, "status"], None, &[]),
            omnibox(
                dir.path(),
                &["status", "-vv", "--log-format", "json", "--format", "json"],
                None,
                &[("OMNIBOX_DATABASE_URL", url)],
            ),
            omnibox(
                dir.path(),
                &["status", "-vv", "--config", config.to_str().unwrap()],
                None,
                &[],
            ),
            omnibox(dir.path(), &["list", "-vv", "--format", "json"], None, &[]),
            omnibox(
                dir.path(),
                &["doctor", "--format", "json"],
                None,
                &[("OMNIBOX_DATABASE_URL", url)],
            ),
        ];
        for r in runs {
            assert_ne!(r.code, 0, "{url}");
            for out in [&r.stdout, &r.stderr] {
                assert!(!out.contains(secret), "{url} printed: {out}");
            }
        }
        std::fs::remove_file(&config).unwrap();
    }
    // Malformed URLs are refused before any connection, saying what to fix.
    for (url, says) in [
        ("postgres:/weird:cret10@127.0.0.1:1/db", "two slashes"),
        ("postgresql:weird:cret11@127.0.0.1/db", "two slashes"),
        // A scheme alone, with or without its colon (this panicked once).
        ("postgres", "two slashes"),
        ("PostgreSQL", "two slashes"),
        ("postgresql:", "two slashes"),
        ("postgres:/", "two slashes"),
        ("postgres://u:se/cret1@127.0.0.1:1/db", "percent-encoded"),
        ("postgres://u:se?cret2@127.0.0.1:1/db", "percent-encoded"),
    ] {
        let r = omnibox(dir.path(), &["--database-url", url, "status"], None, &[]);
        assert_eq!(r.code, 2, "{url}: {}", r.render());
        assert!(r.stderr.contains(says), "{url}: {}", r.render());
        assert_eq!(r.stderr.lines().count(), 1, "{url}: {}", r.render());
    }
}

/// `omnibox enqueue < file` reads JSON lines; empty input is the answer
/// "no" (exit 1); a bad line is exit 2 with a JSON error object under
/// --format json, and nothing is written.
#[test]
fn enqueue_from_a_pipe_and_empty_input() {
    let dir = tempfile::tempdir().unwrap();
    let line = |k: &str| {
        format!(
            r#"{{"aggregate_type":"order","aggregate_id":"0190f1d2-7a3b-7cde-8f00-123456789abc","event_type":"order.created","topic":"orders","partition_key":"{k}","payload":{{"n":1}}}}"#
        )
    };
    let input = format!("{}\n{}\n", line("a"), line("b"));
    let r = omnibox(dir.path(), &["enqueue"], Some(&input), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("Enqueued 2 events"), "{}", r.stdout);
    let r = omnibox(dir.path(), &["enqueue"], Some(""), &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("held no events"), "{}", r.stderr);
    let r = omnibox(
        dir.path(),
        &["enqueue", "--format", "json"],
        Some(&format!("{}\nnot json\n", line("c"))),
        &[],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    let e: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(e["error"]["exit_code"], 2);
    assert!(e["error"]["message"].as_str().unwrap().contains("line 2"));
    let r = omnibox(dir.path(), &["status", "--format", "json"], None, &[]);
    assert!(
        r.stdout.contains("\"pending\": 2") || r.stdout.contains("\"pending\":2"),
        "{}",
        r.stdout
    );
}

/// `omnibox doctor` on the embedded default: each outcome as people see it.
#[test]
fn doctor_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // No database file: doctor says so and creates nothing.
    let r = run(d, &["doctor"]);
    assert_eq!(r.code, 1, "{}", r.render());
    snap!("doctor_no_database", r);
    assert!(
        !d.join("omnibox.db").exists(),
        "doctor created the database"
    );
    // An empty database: the schema check fails, the checks that need the
    // tables say why they did not run; exit 1.
    std::fs::write(d.join("omnibox.db"), b"").unwrap();
    snap!("doctor_no_schema", run(d, &["doctor"]));
    assert_eq!(run(d, &["migrate", "-q"]).code, 0);
    let r = run(d, &["doctor"]);
    assert_eq!(r.code, 0, "{}", r.render());
    snap!("doctor_ok", r);
    // A due event older than the limit, and a broker that does not answer.
    let r = omnibox(d, &["enqueue", "--jsonl"], Some(LINE), &[]);
    assert_eq!(r.code, 0, "{}", r.render());
    std::thread::sleep(std::time::Duration::from_millis(20));
    let r = run(d, &["doctor", "--max-pending-age", "1ms"]);
    assert_eq!(r.code, 0, "a warning leaves exit 0: {}", r.render());
    snap!("doctor_backlog", r);
    let r = run(
        d,
        &[
            "doctor",
            "--format",
            "json",
            "--broker",
            "kafka://127.0.0.1:1",
        ],
    );
    assert_eq!(r.code, 1, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let broker = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "broker")
        .unwrap();
    assert_eq!(broker["status"], "fail", "{broker}");
    assert!(
        broker["message"]
            .as_str()
            .unwrap()
            .contains("does not answer")
    );
}

/// One doctor run lists every problem: a dropped claim index, a deleted
/// migration row and an old backlog all show, and every check runs.
#[test]
fn doctor_lists_every_problem_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(run(d, &["migrate", "-q"]).code, 0);
    let r = omnibox(d, &["enqueue", "--jsonl"], Some(LINE), &[]);
    assert_eq!(r.code, 0, "{}", r.render());
    let url = format!("sqlite://{}", d.join("omnibox.db").display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        for sql in [
            "DROP INDEX outbox_events_claim",
            "DELETE FROM omnibox_migrations WHERE version = (SELECT max(version) FROM omnibox_migrations)",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        pool.close().await;
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    let r = run(
        d,
        &["doctor", "--format", "json", "--max-pending-age", "1ms"],
    );
    assert_eq!(r.code, 1, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let status = |name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {v}"))
            .clone()
    };
    assert_eq!(status("schema")["status"], "fail", "{v}");
    let indexes = status("indexes");
    assert_eq!(indexes["status"], "fail", "{v}");
    assert!(
        indexes["message"]
            .as_str()
            .unwrap()
            .contains("outbox_events_claim"),
        "{indexes}"
    );
    assert_eq!(status("backlog")["status"], "warn", "{v}");
    for name in [
        "database",
        "claim plan",
        "statistics",
        "leases",
        "blocked",
        "retention",
        "broker",
    ] {
        assert_ne!(status(name)["status"], "skip", "{name}: {v}");
    }
}

/// `status --watch` reports again and again with rates; piped, each report
/// is printed in turn (one JSON object per line with --format json); a
/// signal ends it with exit 0.
#[test]
fn status_watch_reports_rates_until_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(run(d, &["migrate", "-q"]).code, 0);
    let child = Command::new(env!("CARGO_BIN_EXE_omnibox"))
        .args([
            "status",
            "--watch",
            "--interval",
            "300ms",
            "--format",
            "json",
        ])
        .current_dir(d)
        .env_clear()
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let lines: String = (0..20)
        .map(|i| format!("{}\n", LINE.replace("order-1", &format!("k{i}"))))
        .collect();
    let r = omnibox(d, &["enqueue", "--jsonl"], Some(&lines), &[]);
    assert_eq!(r.code, 0, "{}", r.render());
    std::thread::sleep(std::time::Duration::from_millis(900));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let reports: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(reports.len() >= 3, "{reports:?}");
    assert!(reports[0]["rates"].is_null(), "no rate in the first report");
    let inserted: f64 = reports
        .iter()
        .filter_map(|r| r["rates"]["outbox"]["inserted_per_second"].as_f64())
        .sum();
    assert!(inserted > 0.0, "{reports:?}");
    assert_eq!(reports.last().unwrap()["tables"][0]["pending"], 20);
}

/// Kafka TLS/SASL shortcuts: a missing file or password is exit 2 before
/// anything runs, and the password is never printed.
#[test]
fn kafka_security_flags_are_checked_and_the_password_stays_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = run(
        d,
        &[
            "publish",
            "--once",
            "--broker",
            "kafka://127.0.0.1:1",
            "--kafka-tls-ca",
            "nope.pem",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.render());
    assert!(r.stderr.contains("--kafka-tls-ca nope.pem"), "{}", r.stderr);
    let r = run(
        d,
        &[
            "publish",
            "--once",
            "--broker",
            "kafka://127.0.0.1:1",
            "--kafka-sasl-mechanism",
            "SCRAM-SHA-512",
            "--kafka-sasl-username",
            "relay",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.render());
    assert!(
        r.stderr.contains("OMNIBOX_KAFKA_SASL_PASSWORD"),
        "{}",
        r.stderr
    );
    assert_eq!(run(d, &["migrate", "-q"]).code, 0);
    let r = omnibox(
        d,
        &[
            "doctor",
            "-vv",
            "--format",
            "json",
            "--broker",
            "kafka://127.0.0.1:1",
            "--kafka-sasl-mechanism",
            "PLAIN",
            "--kafka-sasl-username",
            "relay",
        ],
        None,
        &[("OMNIBOX_KAFKA_SASL_PASSWORD", "hunter2-sasl")],
    );
    assert!(!r.stdout.contains("hunter2-sasl") && !r.stderr.contains("hunter2-sasl"));
    assert!(r.stdout.contains("\"broker\""), "{}", r.render());
}

/// `inbox consume --follow` of a file its writer has not created yet waits
/// for it (as `tail -F`) instead of failing; without --follow a missing
/// file is exit 2.
#[test]
fn follow_waits_for_the_file_to_appear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(run(d, &["migrate", "-q"]).code, 0);
    let r = run(d, &["inbox", "consume", "--from", "file:later.jsonl"]);
    assert_eq!(r.code, 2, "{}", r.render());
    let child = Command::new(env!("CARGO_BIN_EXE_omnibox"))
        .args([
            "inbox",
            "consume",
            "--from",
            "file:later.jsonl",
            "--follow",
            "--group",
            "g",
        ])
        .current_dir(d)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    std::fs::write(
        d.join("later.jsonl"),
        "{\"topic\":\"orders\",\"key\":\"k\",\"headers\":{\"event_id\":\"m-1\"},\"value\":{\"n\":1}}\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    loop {
        let r = run(d, &["status", "--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        if v["tables"][1]["pending"] == 1 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{}",
            r.stdout
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `publish --topic` publishes only its topics and `--once` exits when
/// nothing of them is due (other topics left pending); `inbox process
/// --source/--event-type` handles only matching rows; a blank filter value
/// is an input error.
#[test]
fn filtered_relays_and_processors_take_only_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut input = String::new();
    for (topic, n) in [("orders", 3), ("reports", 2)] {
        for i in 0..n {
            input.push_str(
                &LINE
                    .replace("\"orders\"", &format!("\"{topic}\""))
                    .replace("order-1", &format!("{topic}-{i}")),
            );
            input.push('\n');
        }
    }
    let r = omnibox(d, &["enqueue", "--jsonl"], Some(&input), &[]);
    assert_eq!(r.code, 0, "{}", r.render());
    let r = run(
        d,
        &[
            "publish",
            "--once",
            "--broker",
            "file:out.jsonl",
            "--topic",
            "reports",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let out = std::fs::read_to_string(d.join("out.jsonl")).unwrap();
    let topics: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["topic"].to_string())
        .collect();
    assert_eq!(topics, vec!["\"reports\"", "\"reports\""], "{out}");
    assert_eq!(pending(d), 3, "the orders wait for another relay");
    let r = run(
        d,
        &[
            "publish",
            "--once",
            "--broker",
            "file:none.jsonl",
            "--topic",
            "nothing",
            "--circuit-breaker",
            "off",
            "--circuit-threshold",
            "3",
            "--circuit-recovery",
            "2m",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    // The envelope's default schema version (the events have none).
    let r = run(
        d,
        &[
            "publish",
            "--once",
            "--broker",
            "file:orders.jsonl",
            "--topic",
            "orders",
            "--default-schema-version",
            "2.1",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let orders = std::fs::read_to_string(d.join("orders.jsonl")).unwrap();
    assert_eq!(orders.lines().count(), 3);
    for l in orders.lines() {
        let m: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(m["value"]["schema_version"], "2.1", "{l}");
    }
    let reports = out.clone();
    assert!(
        reports.contains("\"schema_version\":\"1.0.0\""),
        "the default: {reports}"
    );

    // The inbox: consume the published file, then process one source's
    // event type only.
    let mut lines = String::new();
    for (i, (source, kind)) in [
        ("billing", "refund"),
        ("billing", "charge"),
        ("shop", "refund"),
    ]
    .iter()
    .enumerate()
    {
        lines.push_str(&format!(
            "{{\"topic\":\"t\",\"headers\":{{\"event_id\":\"m{i}\",\"source\":\"{source}\",\"event_type\":\"{kind}\"}},\"value\":{{\"n\":{i}}}}}\n"
        ));
    }
    let r = omnibox(
        d,
        &["inbox", "consume", "--from", "-", "--group", "g"],
        Some(&lines),
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let r = run(
        d,
        &[
            "inbox",
            "process",
            "--once",
            "--exec",
            "echo \"$OMNIBOX_MESSAGE_ID\" >> handled.txt",
            "--source",
            "billing",
            "--event-type",
            "refund",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    assert_eq!(
        std::fs::read_to_string(d.join("handled.txt")).unwrap(),
        "m0\n",
        "only billing's refunds"
    );
    for bad in [
        vec!["publish", "--once", "--circuit-recovery", "500ms"],
        vec!["publish", "--once", "--circuit-threshold", "0"],
        vec![
            "inbox",
            "process",
            "--once",
            "--exec",
            "true",
            "--circuit-breaker",
            "maybe",
        ],
        vec!["publish", "--once", "--topic", " orders"],
        vec![
            "inbox", "process", "--once", "--exec", "true", "--source", "",
        ],
    ] {
        let r = run(d, &bad);
        assert_eq!(r.code, 2, "{bad:?}: {}", r.render());
        assert!(r.stderr.contains("error"), "{}", r.render());
    }
}

/// One JSON line of a large event (`pad` bytes of payload), with its id.
fn large_line(i: usize, pad: usize, idempotency_key: bool) -> (uuid::Uuid, String) {
    let id = uuid::Uuid::now_v7();
    let mut line = serde_json::json!({
        "id": id,
        "aggregate_type": "order",
        "aggregate_id": "0190f1d2-7a3b-7cde-8f00-123456789abc",
        "event_type": "order.archived",
        "topic": "orders",
        "partition_key": format!("order-{}", i % 3),
        "payload": {"n": i, "items": [{"note": "y".repeat(100)}], "blob": "x".repeat(pad)},
    });
    if idempotency_key {
        line["idempotency_key"] = serde_json::json!(format!("large-{i}"));
    }
    (id, line.to_string())
}

/// Large events through the CLI on `env`'s database: an input several
/// times enqueue's chunk (4 MiB) whose last line is bad writes nothing;
/// the same input without it goes in whole, ids reported in input order
/// (chunks with idempotency keys between plain ones); a relay with a small
/// byte budget publishes every event, in many claims, each key in order;
/// and the consumer stores every message.
fn large_events_flow(d: &Path, env: &[(&str, &str)]) {
    let r = omnibox(d, &["migrate"], None, env);
    assert_eq!(r.code, 0, "{}", r.render());
    // 45 events of ~300 KB: about 13 MiB, over three of enqueue's chunks;
    // events 15..20 carry idempotency keys (the INSERT path between COPYs).
    let events: Vec<(uuid::Uuid, String)> = (0..45)
        .map(|i| large_line(i, 300_000, (15..20).contains(&i)))
        .collect();
    let mut input: String = events.iter().map(|(_, l)| format!("{l}\n")).collect();
    let bad = format!("{input}{{\"aggregate_type\":\"order\"}}\n");
    let r = omnibox(d, &["enqueue", "--jsonl"], Some(&bad), env);
    assert_eq!(r.code, 2, "{}", r.render());
    assert!(r.stderr.contains("line 46"), "{}", r.render());
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.render());
    let status = |env: &[(&str, &str)]| -> serde_json::Value {
        let r = omnibox(d, &["status", "--format", "json"], None, env);
        assert_eq!(r.code, 0, "{}", r.render());
        serde_json::from_str(&r.stdout).unwrap()
    };
    assert_eq!(
        status(env)["tables"][0]["pending"],
        0,
        "a bad last line writes nothing of the input"
    );
    // The same without the bad line.
    input.push('\n');
    let r = omnibox(
        d,
        &["enqueue", "--jsonl", "--format", "json"],
        Some(&input),
        env,
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["inserted"], 45);
    let ids: Vec<String> = events.iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(v["ids"], serde_json::json!(ids), "ids in input order");
    // The relay: claims of at most 1 MiB (three events), however many rows
    // --batch allows.
    let out = d.join("published.jsonl");
    let sink = format!("file:{}", out.display());
    let r = omnibox(
        d,
        &[
            "publish",
            "--once",
            "--broker",
            &sink,
            "--batch",
            "1000",
            "--batch-bytes",
            "1MiB",
            "--format",
            "json",
        ],
        None,
        env,
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["completed"], 45, "{v}");
    assert!(
        v["batches"].as_u64().unwrap() >= 15,
        "claims of three events at most: {v}"
    );
    assert_eq!(status(env)["tables"][0]["completed"], 45);
    // Every event on the file once, each key in input order.
    let published: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(published.len(), 45);
    for key in ["order-0", "order-1", "order-2"] {
        let of_key: Vec<&str> = published
            .iter()
            .filter(|m| m["key"] == key)
            .map(|m| m["headers"]["event_id"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| format!("order-{}", i % 3) == key)
            .map(|(_, id)| id.as_str())
            .collect();
        assert_eq!(of_key, expected, "{key} in order");
    }
    // The consumer, 1 MiB a transaction.
    let r = omnibox(
        d,
        &[
            "inbox",
            "consume",
            "--from",
            &sink,
            "--once",
            "--batch-bytes",
            "1MiB",
            "--format",
            "json",
        ],
        None,
        env,
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (v["consumed"].clone(), v["stored"].clone()),
        (45.into(), 45.into()),
        "{v}"
    );
    for bad in [
        vec!["publish", "--once", "--batch-bytes", "0"],
        vec!["publish", "--once", "--batch-bytes", "16M"],
        vec![
            "inbox",
            "process",
            "--once",
            "--exec",
            "true",
            "--batch-bytes",
            "lots",
        ],
        vec!["inbox", "consume", "--once", "--batch-bytes", "65GiB"],
    ] {
        let r = omnibox(d, &bad, None, env);
        assert_eq!(r.code, 2, "{bad:?}: {}", r.render());
        assert!(
            r.stderr.starts_with("error: invalid value"),
            "{}",
            r.render()
        );
    }
    let r = omnibox(
        d,
        &["publish", "--once"],
        None,
        &[env, &[("OMNIBOX_BATCH_BYTES", "-1")]].concat(),
    );
    assert_eq!(r.code, 2, "{}", r.render());
    assert_eq!(
        r.stderr.trim(),
        "omnibox: error: OMNIBOX_BATCH_BYTES: \"-1\" is not a size; write e.g. 16MiB, 64MB, 512KiB or 1048576 (bytes)"
    );
}

#[test]
fn large_events_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    large_events_flow(dir.path(), &[]);
}

#[test]
fn large_events_on_postgres() {
    let Some(url) = common::pg_url() else { return };
    let schema = format!("cli_{}", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    large_events_flow(
        dir.path(),
        &[
            ("OMNIBOX_DATABASE_URL", url.as_str()),
            ("OMNIBOX_DATABASE_SCHEMA", schema.as_str()),
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let ddl = format!("DROP SCHEMA {schema} CASCADE");
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&pool)
            .await
            .unwrap();
    });
}

/// `enqueue --format json` reports every id in input order also past the
/// ids it keeps in memory (65,536; the rest go to a temporary file).
#[test]
fn enqueue_reports_many_ids_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let n = 70_000;
    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
    let input: String = ids
        .iter()
        .map(|id| LINE.replacen('{', &format!("{{\"id\":\"{id}\","), 1) + "\n")
        .collect();
    let r = omnibox(
        dir.path(),
        &["enqueue", "--jsonl", "--format", "json"],
        Some(&input),
        &[("TMPDIR", dir.path().to_str().unwrap())],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["inserted"], n);
    let got: Vec<uuid::Uuid> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, ids);
    // The temporary file is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("omnibox-enqueue")
        })
        .collect();
    assert!(left.is_empty());
}

/// `--quiet` is quiet unless something fails (the crontab line in the
/// README): a successful run of each command prints nothing on stdout or
/// stderr; a failing one prints its report and its error.
#[test]
fn quiet_prints_nothing_unless_something_fails() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let silent = |args: &[&str], stdin: Option<&str>| {
        let r = omnibox(d, args, stdin, &[]);
        assert_eq!(
            (r.code, r.stdout.as_str(), r.stderr.as_str()),
            (0, "", ""),
            "{args:?}"
        );
    };
    silent(&["migrate", "-q"], None);
    silent(&["migrate", "--quiet"], None);
    silent(
        &["enqueue", "--jsonl", "-q"],
        Some(&format!("{LINE}\n{LINE}\n")),
    );
    silent(
        &["enqueue", "--jsonl", "-q", "--format", "json"],
        Some(&format!("{LINE}\n")),
    );
    // A check that fails: its report and the failure, exit 1.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let r = run(d, &["status", "--check", "--max-pending-age", "1ms", "-q"]);
    assert_eq!(r.code, 1, "{}", r.render());
    assert!(r.stdout.contains("pending"), "{}", r.render());
    assert!(r.stderr.contains("check failed"), "{}", r.render());
    silent(&["publish", "--once", "-q"], None);
    silent(
        &["status", "--check", "--max-pending-age", "5m", "-q"],
        None,
    );
    silent(&["inbox", "consume", "--once", "-q"], None);
    silent(
        &["inbox", "process", "--once", "--exec", "true", "-q"],
        None,
    );
    silent(&["release-stale-locks", "--yes", "-q"], None);
    silent(&["cleanup", "--older-than", "7d", "--yes", "-q"], None);
    silent(&["cleanup", "--older-than", "7d", "--yes", "--quiet"], None);
    // Nothing to do, said without --quiet.
    let r = run(d, &["release-stale-locks", "--yes"]);
    assert_eq!(r.code, 0, "{}", r.render());
    assert!(
        !r.stderr.is_empty() || !r.stdout.is_empty(),
        "{}",
        r.render()
    );
    // An error is always printed.
    let r = run(d, &["show", "0190f1d2-7a3b-7cde-8f00-000000000000", "-q"]);
    assert_eq!(r.code, 1, "{}", r.render());
    assert!(r.stderr.contains("no event"), "{}", r.render());
    let r = run(d, &["status", "--database-url", "bogus://x", "-q"]);
    assert_eq!(r.code, 2, "{}", r.render());
    assert!(r.stderr.contains("error"), "{}", r.render());
    // The events went through all the same.
    let r = run(d, &["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["tables"][0]["completed"], 3, "{v}");
}

/// `cleanup --audit-older-than` under 30 days needs --force, and even then
/// the cleanup's own audit row stays (it used to erase the whole trail,
/// its own record included, without a word).
#[test]
fn cleanup_keeps_the_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(run(d, &["migrate", "-q"]).code, 0);
    let r = omnibox(d, &["enqueue", "--jsonl"], Some(LINE), &[]);
    assert_eq!(r.code, 0, "{}", r.render());
    assert_eq!(run(d, &["publish", "--once", "-q"]).code, 0);
    let r = run(
        d,
        &[
            "cleanup",
            "--older-than",
            "7d",
            "--audit-older-than",
            "0s",
            "--yes",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.render());
    assert!(r.stderr.contains("audit retention"), "{}", r.render());
    let r = run(
        d,
        &[
            "cleanup",
            "--table",
            "outbox",
            "--older-than",
            "0s",
            "--audit-older-than",
            "0s",
            "--force",
            "--yes",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.render());
    let r = run(d, &["audit", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.render());
    assert!(r.stdout.contains("\"cleanup\""), "{}", r.render());
}

/// PostgreSQL's reserved schema names are a usage error (exit 2), found
/// before connecting.
#[test]
fn reserved_schema_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for schema in ["pg_catalog", "pg_temp_1", "information_schema"] {
        let r = run(
            dir.path(),
            &[
                "--database-url",
                "postgres://u:p@127.0.0.1:1/db",
                "--schema",
                schema,
                "status",
            ],
        );
        assert_eq!(r.code, 2, "{schema}: {}", r.render());
        assert!(r.stderr.contains("reserved"), "{schema}: {}", r.render());
    }
}

/// `inbox consume` without --from, with no relay file here: the error names
/// --from (exit 2, one line).
#[test]
fn consume_without_a_source_names_from() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(run(dir.path(), &["migrate", "-q"]).code, 0);
    let r = run(dir.path(), &["inbox", "consume", "--once"]);
    assert_eq!(r.code, 2, "{}", r.render());
    assert!(r.stderr.contains("--from"), "{}", r.render());
}

/// The README's `doctor` sample is what `doctor` prints on a fresh
/// database (the README cannot drift from the binary).
#[test]
fn readme_doctor_sample_is_current() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("$ omnibox doctor\n")
        .expect("the README has a doctor sample")
        + "$ omnibox doctor\n".len();
    let end = readme[start..].find("\n\n").expect("the sample ends") + start;
    let sample = &readme[start..end];
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(run(dir.path(), &["migrate", "-q"]).code, 0);
    let r = run(dir.path(), &["doctor"]);
    assert_eq!(r.code, 0, "{}", r.render());
    assert_eq!(
        r.stdout.trim_end(),
        sample,
        "update the README's doctor sample"
    );
}

/// Every trace context the README shows (`traceparent=...`) is a valid W3C
/// one, as omnibox's own parser judges it: the relay and the handlers drop
/// an invalid `traceparent`, so a reader copying the example would lose the
/// trace (the enqueue example once read `00-4bf9-00f0-01`).
#[test]
fn readme_traceparents_are_valid_w3c() {
    use opentelemetry::trace::TraceContextExt;
    let readme = include_str!("../README.md");
    let values: Vec<&str> = readme
        .match_indices("traceparent=")
        .map(|(i, m)| {
            readme[i + m.len()..]
                .split(|c: char| c.is_whitespace() || matches!(c, '`' | '\'' | '"'))
                .next()
                .unwrap_or_default()
        })
        .collect();
    assert!(!values.is_empty(), "the README shows a traceparent header");
    for v in values {
        let headers =
            std::collections::BTreeMap::from([("traceparent".to_string(), v.to_string())]);
        let cx = omnibox::telemetry::extract(Some(&headers));
        assert!(
            cx.span().span_context().is_valid(),
            "README: traceparent={v} is not a valid W3C trace context: write 00-<32 hex>-<16 hex>-01"
        );
    }
}
