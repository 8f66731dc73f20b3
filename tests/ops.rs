//! The operations commands as a process, on both stores: replay by each
//! selector, dry runs, refusals, unlock fencing, stale locks, cleanup bounds
//! and the inbox retention guard, status checks, the audit trail.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use omnibox::store::fingerprint;
use omnibox::{
    ClaimOptions, DomainService, EventStatus, EventStore, Failure, InboxStore, NewInboxEvent,
    NewOutboxEvent, OutboxEvent, OutboxStore, WorkerId, time,
};
use serde_json::{Value, json};

use common::TestDb;

use common::run::Run as Out;

fn omnibox(db: &TestDb, args: &[&str]) -> Out {
    omnibox_env(db, args, &[])
}

fn omnibox_env(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Out {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(db, dir.path(), args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    common::run::run(cmd, None)
}

fn command(db: &TestDb, dir: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = common::run::command(dir);
    cmd.args(args)
        .env("USER", "oncall")
        .env("OMNIBOX_DATABASE_URL", &db.url);
    if db.is_postgres() {
        cmd.env("OMNIBOX_DATABASE_SCHEMA", db.schema());
    }
    cmd
}

/// Runs a statement on the test database directly (what omnibox must
/// cope with: a dropped index, a damaged row, a change behind its back).
async fn raw_sql(db: &TestDb, sql: &'static str) {
    match &db.store {
        omnibox::store::AnyStore::Postgres(s) => {
            sqlx::query(sql).execute(s.pool()).await.unwrap();
        }
        omnibox::store::AnyStore::Sqlite(s) => {
            sqlx::query(sql).execute(s.pool()).await.unwrap();
        }
        _ => unreachable!(),
    }
}

/// Runs a script (several statements) on the test database directly.
async fn raw_script(db: &TestDb, sql: String) {
    match &db.store {
        omnibox::store::AnyStore::Postgres(s) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(s.pool())
                .await
                .unwrap();
        }
        omnibox::store::AnyStore::Sqlite(s) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(s.pool())
                .await
                .unwrap();
        }
        _ => unreachable!(),
    }
}

/// The version of the migration whose description holds `what`.
async fn version_of(db: &TestDb, what: &str) -> i64 {
    let state = db.store.schema_state().await.unwrap();
    state
        .migrations
        .iter()
        .find(|m| m.description.contains(what))
        .unwrap_or_else(|| panic!("no {what} migration: {state:?}"))
        .version
}

async fn recorded_versions(db: &TestDb) -> Vec<i64> {
    db.store.schema_state().await.unwrap().recorded
}

/// The doctor check `name` of a `doctor --format json` run.
fn doctor_check(r: &Out, name: &str) -> Value {
    r.json()["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check: {}", r.stdout))
        .clone()
}

fn new_event(event_type: &str, topic: &str, key: &str) -> OutboxEvent {
    let mut n = NewOutboxEvent::new(
        "order",
        uuid::Uuid::now_v7(),
        event_type,
        topic,
        key,
        json!({"k": key}),
    );
    n.max_attempts = Some(1);
    DomainService::default().create_outbox_event(n).unwrap()
}

/// Six failed outbox rows: types a/b, topics t1/t2, two error causes.
async fn failed_rows(db: &TestDb) -> Vec<OutboxEvent> {
    let events = vec![
        new_event("order.a", "t1", "k1"),
        new_event("order.a", "t1", "k2"),
        new_event("order.b", "t1", "k3"),
        new_event("order.b", "t2", "k4"),
        new_event("order.a", "t2", "k5"),
        new_event("order.a", "t2", "k6"),
    ];
    let outbox = db.store.outbox();
    outbox.create_many(&events).await.unwrap();
    let claim = outbox
        .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 10))
        .await
        .unwrap();
    let failures: Vec<Failure> = claim
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let error = if i % 2 == 0 {
                format!("timeout after {i}00 ms talking to {}", e.id())
            } else {
                "schema mismatch".to_string()
            };
            Failure::counted(e.id(), error, time::now())
        })
        .collect();
    outbox.fail(&claim.token, &failures).await.unwrap();
    events
}

/// The cells of a one-row summary table, by column name.
fn summary_cells(table: &str) -> std::collections::HashMap<String, String> {
    let rows: Vec<Vec<String>> = table
        .lines()
        .filter(|l| l.starts_with('│'))
        .map(|l| {
            l.trim_matches('│')
                .split('┆')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 2, "a header and one row: {table}");
    rows[0]
        .iter()
        .cloned()
        .zip(rows[1].iter().cloned())
        .collect()
}

async fn status_of(db: &TestDb, e: &OutboxEvent) -> EventStatus {
    db.store
        .outbox()
        .get(e.id())
        .await
        .unwrap()
        .unwrap()
        .status()
}

mod cases {
    use super::*;

    pub async fn replay_by_each_selector(db: &TestDb) {
        let ev = failed_rows(db).await;
        // --limit without a fingerprint: the oldest rows, in insertion
        // order (the database applies the limit).
        let r = omnibox(
            db,
            &[
                "replay",
                "--all",
                "--limit",
                "2",
                "--dry-run",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let ids: Vec<String> = ev[..2].iter().map(|e| e.id().to_string()).collect();
        assert_eq!(r.json()["ids"], json!(ids), "{}", r.stdout);
        // --id
        let r = omnibox(
            db,
            &[
                "replay",
                "--id",
                &ev[0].id().to_string(),
                "--reason",
                "by hand",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.json()["replayed"], 1);
        assert_eq!(status_of(db, &ev[0]).await, EventStatus::Pending);
        let row = db.store.outbox().get(ev[0].id()).await.unwrap().unwrap();
        assert_eq!((row.attempts_made(), row.last_error()), (0, None));
        // --event-type
        let r = omnibox(
            db,
            &[
                "replay",
                "--event-type",
                "order.b",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.json()["replayed"], 2);
        assert_eq!(status_of(db, &ev[2]).await, EventStatus::Pending);
        // --error-contains (rows 4 has "timeout"; 0 and 2 are already replayed)
        let r = omnibox(
            db,
            &[
                "replay",
                "--error-contains",
                "timeout",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.json()["replayed"], 1);
        assert_eq!(status_of(db, &ev[4]).await, EventStatus::Pending);
        // --fingerprint (the remaining "schema mismatch" rows of order.a: 1 and 5)
        let fp = fingerprint::fingerprint("order.a", "schema mismatch");
        let r = omnibox(
            db,
            &[
                "replay",
                "--fingerprint",
                &fp,
                "--limit",
                "1",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.json()["replayed"], 1, "--limit 1");
        assert_eq!(status_of(db, &ev[1]).await, EventStatus::Pending);
        // --topic and --since: ev[5] is left
        let r = omnibox(
            db,
            &["replay", "--topic", "t1", "--yes", "--format", "json"],
        );
        assert_eq!(r.json()["replayed"], 0);
        let r = omnibox(
            db,
            &[
                "replay",
                "--since",
                "1h",
                "--until",
                "2030-01-01T00:00:00Z",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.json()["replayed"], 1);
        assert_eq!(status_of(db, &ev[5]).await, EventStatus::Pending);
        // --all on nothing
        // --all on nothing: the answer is "no", exit 1.
        let r = omnibox(db, &["replay", "--all", "--yes"]);
        assert_eq!((r.code, r.stdout.trim()), (1, "No failed events match."));
        // The audit trail has each replay, with who and why.
        let a = omnibox(db, &["audit", "--action", "replay", "--format", "json"]).json();
        let entries = a["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 5, "replays that changed rows: {a}");
        let first = entries.last().unwrap();
        assert_eq!(
            (
                first["actor"].as_str(),
                first["reason"].as_str(),
                first["count"].as_u64()
            ),
            (Some("oncall"), Some("by hand"), Some(1))
        );
        assert_eq!(first["ids"][0], ev[0].id().to_string());
        let by_id = omnibox(
            db,
            &["audit", "--id", &ev[0].id().to_string(), "--format", "json"],
        )
        .json();
        assert_eq!(by_id["entries"].as_array().unwrap().len(), 1);
    }

    pub async fn dry_runs_change_nothing(db: &TestDb) {
        let ev = failed_rows(db).await;
        let r = omnibox(db, &["replay", "--all", "--dry-run", "--format", "json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(
            (r.json()["dry_run"].as_bool(), r.json()["selected"].as_u64()),
            (Some(true), Some(6))
        );
        let r = omnibox(db, &["replay", "--all", "--dry-run"]);
        assert!(
            r.stdout
                .contains("Dry run: 6 outbox event(s) would be replayed; nothing changed."),
            "{}",
            r.stdout
        );
        for e in &ev {
            assert_eq!(status_of(db, e).await, EventStatus::Failed);
        }
        let r = omnibox(
            db,
            &[
                "cleanup",
                "--force",
                "--older-than",
                "1ms",
                "--include-failed",
                "--failed-older-than",
                "1ms",
                "--table",
                "outbox",
                "--dry-run",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.json()["tables"][0]["failed"], 6, "{}", r.stdout);
        assert_eq!(db.store.outbox().counts().await.unwrap().failed, 6);
        assert!(
            omnibox(db, &["audit", "--format", "json"]).json()["entries"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }

    pub async fn refusals_exit_2_and_change_nothing(db: &TestDb) {
        failed_rows(db).await;
        let r = omnibox(db, &["replay"]);
        assert_eq!(r.code, 2);
        assert!(r.stderr.contains("replay needs a selector"), "{}", r.stderr);
        let r = omnibox(db, &["replay", "--all"]);
        assert_eq!(r.code, 2, "no terminal and no --yes");
        assert!(
            r.stderr
                .contains("refusing to replay 6 failed outbox event(s) without --yes"),
            "{}",
            r.stderr
        );
        let r = omnibox(db, &["unlock", &uuid::Uuid::now_v7().to_string()]);
        assert_eq!(r.code, 2);
        assert!(r.stderr.contains("needs --reason"), "{}", r.stderr);
        let r = omnibox(
            db,
            &[
                "unlock",
                &uuid::Uuid::now_v7().to_string(),
                "--reason",
                "  ",
            ],
        );
        assert_eq!(r.code, 2);
        let r = omnibox(db, &["cleanup", "--older-than", "1d", "--yes"]);
        assert_eq!(r.code, 2);
        assert!(
            r.stderr.contains("deduplication window (7d 0h)"),
            "{}",
            r.stderr
        );
        let r = omnibox(db, &["release-stale-locks", "--older-than", "bogus"]);
        assert_eq!(r.code, 2);
        assert_eq!(db.store.outbox().counts().await.unwrap().failed, 6);
    }

    pub async fn unlock_fences_the_old_owner(db: &TestDb) {
        let outbox = db.store.outbox();
        let events: Vec<OutboxEvent> = (0..3)
            .map(|i| new_event("t", "t1", &format!("k{i}")))
            .collect();
        outbox.create_many(&events).await.unwrap();
        let claim = outbox
            .claim(&ClaimOptions::new(WorkerId::new("relay-7").unwrap(), 1))
            .await
            .unwrap();
        let id = claim.events[0].id();
        let r = omnibox(
            db,
            &[
                "unlock",
                &id.to_string(),
                "--reason",
                "relay-7 is gone",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let row = outbox.get(id).await.unwrap().unwrap();
        assert_eq!(
            (row.is_locked(), row.last_error()),
            (false, Some("Force unlock: relay-7 is gone"))
        );
        let err = outbox.complete(&claim.token, &[id]).await.unwrap_err();
        assert!(
            matches!(err, omnibox::Error::ConcurrentUpdate { .. }),
            "the old owner is fenced off: {err:?}"
        );
        let r = omnibox(
            db,
            &["unlock", &id.to_string(), "--reason", "again", "--yes"],
        );
        assert_eq!(r.code, 1, "not locked any more");
        // Everything a dead worker holds.
        let claim = outbox
            .claim(&ClaimOptions::new(WorkerId::new("relay-8").unwrap(), 10))
            .await
            .unwrap();
        assert_eq!(claim.len(), 3);
        let listed = omnibox(db, &["list", "--locked-by", "relay-8", "--format", "json"]).json();
        assert_eq!(listed["events"].as_array().unwrap().len(), 3);
        let r = omnibox(
            db,
            &[
                "unlock",
                "--worker",
                "relay-8",
                "--reason",
                "host lost",
                "--dry-run",
                "--format",
                "json",
            ],
        );
        assert_eq!(
            (
                r.json()["dry_run"].as_bool(),
                r.json()["tables"][0]["unlocked"].as_u64()
            ),
            (Some(true), Some(3)),
            "{}",
            r.stdout
        );
        assert_eq!(outbox.counts().await.unwrap().locked, 3, "dry run");
        let r = omnibox(
            db,
            &[
                "unlock",
                "--worker",
                "relay-8",
                "--reason",
                "host lost",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.json()["tables"][0]["unlocked"], 3, "{}", r.stdout);
        assert_eq!(outbox.counts().await.unwrap().locked, 0);
        let a = omnibox(db, &["audit", "--format", "json"]).json();
        let actions: Vec<&str> = a["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, vec!["unlock-worker", "unlock"]);
    }

    pub async fn stale_locks_are_released(db: &TestDb) {
        let outbox = db.store.outbox();
        let events: Vec<OutboxEvent> = (0..4)
            .map(|i| new_event("t", "t1", &format!("k{i}")))
            .collect();
        outbox.create_many(&events).await.unwrap();
        let inbox_event = DomainService::default()
            .create_inbox_event(NewInboxEvent::new("m1", "g", "s", "t", json!({"a": 1})))
            .unwrap();
        db.store.inbox().insert(&inbox_event).await.unwrap();
        // A live relay's batch: its lease is current.
        let live = new_event("t", "t1", "live");
        outbox.create(&live).await.unwrap();
        let short = Duration::from_millis(5);
        outbox
            .claim(&ClaimOptions::new(WorkerId::new("alive").unwrap(), 1))
            .await
            .unwrap();
        outbox
            .claim(&ClaimOptions::new(WorkerId::new("old").unwrap(), 10).lease(short))
            .await
            .unwrap();
        db.store
            .inbox()
            .claim(&ClaimOptions::new(WorkerId::new("old").unwrap(), 10).lease(short))
            .await
            .unwrap();
        let r = omnibox(
            db,
            &[
                "release-stale-locks",
                "--older-than",
                "1h",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.json()["tables"][0]["released"], 0, "not stale yet");
        tokio::time::sleep(Duration::from_millis(30)).await;
        // A threshold shorter than the relays' lease is refused, nothing changes.
        let r = omnibox(db, &["release-stale-locks", "--older-than", "0s", "--yes"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(
            r.stderr.contains("lease") && r.stderr.contains("--force"),
            "{}",
            r.stderr
        );
        assert_eq!(outbox.counts().await.unwrap().locked, 5);
        let r = omnibox(
            db,
            &[
                "release-stale-locks",
                "--older-than",
                "10ms",
                "--force",
                "--dry-run",
                "--format",
                "json",
            ],
        );
        assert_eq!(
            (
                r.json()["tables"][0]["released"].as_u64(),
                r.json()["tables"][1]["released"].as_u64()
            ),
            (Some(4), Some(1))
        );
        assert_eq!(outbox.counts().await.unwrap().locked, 5);
        let r = omnibox(
            db,
            &[
                "release-stale-locks",
                "--older-than",
                "10ms",
                "--force",
                "--batch-size",
                "3",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(
            (
                r.json()["tables"][0]["released"].as_u64(),
                r.json()["tables"][1]["released"].as_u64()
            ),
            (Some(4), Some(1))
        );
        assert_eq!(
            outbox.counts().await.unwrap().locked,
            1,
            "the live relay keeps its row"
        );
        assert_eq!(db.store.inbox().counts().await.unwrap().locked, 0);
    }

    pub async fn cleanup_is_bounded_and_guards_the_inbox(db: &TestDb) {
        let outbox = db.store.outbox();
        let events: Vec<OutboxEvent> = (0..25)
            .map(|i| new_event("t", "t1", &format!("k{i}")))
            .collect();
        outbox.create_many(&events).await.unwrap();
        let claim = outbox
            .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 25))
            .await
            .unwrap();
        outbox
            .complete(
                &claim.token,
                &claim.events.iter().map(|e| e.id()).collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A retention under an hour is refused without --force: nothing goes.
        let r = omnibox(
            db,
            &[
                "cleanup",
                "--older-than",
                "0s",
                "--table",
                "outbox",
                "--yes",
            ],
        );
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("--force"), "{}", r.stderr);
        assert_eq!(outbox.counts().await.unwrap().completed, 25);
        let r = omnibox(db, &["cleanup", "--older-than", "-5d", "--yes"]);
        assert_eq!(r.code, 2);
        assert!(r.stderr.contains("not negative"), "{}", r.stderr);
        let args = [
            "cleanup",
            "--older-than",
            "5ms",
            "--force",
            "--table",
            "outbox",
            "--batch-size",
            "10",
            "--max-iterations",
            "2",
            "--yes",
            "--format",
            "json",
        ];
        let r = omnibox(db, &args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.json()["tables"][0]["completed"], 20, "two batches of 10");
        assert!(
            r.stderr.contains("stopped at --max-iterations"),
            "{}",
            r.stderr
        );
        assert_eq!(outbox.counts().await.unwrap().completed, 5);
        let r = omnibox(db, &args);
        assert_eq!(r.json()["tables"][0]["completed"], 5);
        // The inbox keeps its deduplication window.
        let r = omnibox(
            db,
            &["cleanup", "--older-than", "2d", "--table", "inbox", "--yes"],
        );
        assert_eq!(r.code, 2);
        let r = omnibox(
            db,
            &[
                "cleanup",
                "--older-than",
                "2d",
                "--table",
                "inbox",
                "--dedup-window",
                "1d",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        // The window is one setting: the environment and the file set it too.
        let r = omnibox_env(
            db,
            &[
                "cleanup",
                "--older-than",
                "2d",
                "--table",
                "inbox",
                "--dry-run",
            ],
            &[("OMNIBOX_DEDUP_WINDOW", "1d")],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("omnibox.toml");
        std::fs::write(&config, "dedup_window = \"3d\"\n").unwrap();
        let r = omnibox(
            db,
            &[
                "cleanup",
                "--older-than",
                "2d",
                "--table",
                "inbox",
                "--dry-run",
                "--config",
                config.to_str().unwrap(),
            ],
        );
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("3d"), "{}", r.stderr);
        let a = omnibox(db, &["audit", "--action", "cleanup", "--format", "json"]).json();
        assert_eq!(a["entries"].as_array().unwrap().len(), 2);
        assert_eq!(
            a["entries"][1]["details"]["stopped_at_max_iterations"],
            true
        );
    }

    /// Two crons at once: between them every old completed row goes once,
    /// neither fails, and pending rows are untouched.
    pub async fn two_cleanups_at_once_delete_each_row_once(db: &TestDb) {
        let outbox = db.store.outbox();
        let events: Vec<OutboxEvent> = (0..3000)
            .map(|i| new_event("t", "t1", &format!("k{}", i % 50)))
            .collect();
        outbox.create_many(&events).await.unwrap();
        let mut done = 0;
        while done < 2000 {
            let c = outbox
                .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 500))
                .await
                .unwrap();
            let ids: Vec<_> = c.events.iter().map(|e| e.id()).take(2000 - done).collect();
            let rest: Vec<_> = c.events.iter().map(|e| e.id()).skip(ids.len()).collect();
            outbox.complete(&c.token, &ids).await.unwrap();
            if !rest.is_empty() {
                outbox.release(&c.token, &rest).await.unwrap();
            }
            done += ids.len();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let dir = tempfile::tempdir().unwrap();
        let args = [
            "cleanup",
            "--force",
            "--older-than",
            "5ms",
            "--table",
            "outbox",
            "--batch-size",
            "50",
            "--yes",
            "--format",
            "json",
        ];
        // Started together, so their batches interleave.
        let children: Vec<_> = (0..2)
            .map(|_| {
                command(db, dir.path(), &args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut deleted = 0;
        for child in children {
            let out = child.wait_with_output().unwrap();
            let r = Out {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            };
            assert_eq!(r.code, 0, "{}", r.stderr);
            deleted += r.json()["tables"][0]["completed"].as_u64().unwrap();
        }
        assert_eq!(deleted, 2000, "each old completed row deleted once");
        let c = outbox.counts().await.unwrap();
        assert_eq!((c.completed, c.pending), (0, 1000));
    }

    pub async fn status_checks_exit_1_over_a_threshold(db: &TestDb) {
        let r = omnibox(
            db,
            &[
                "status",
                "--check",
                "--max-failed",
                "0",
                "--max-stale-locks",
                "0",
                "--max-pending-age",
                "1h",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        failed_rows(db).await;
        let r = omnibox(db, &["status", "--check", "--max-failed", "0"]);
        assert_eq!(r.code, 1);
        assert!(
            r.stderr
                .contains("check failed: outbox: 6 failed events (limit 0)"),
            "{}",
            r.stderr
        );
        assert!(
            r.stdout.contains("failed event type"),
            "failures by event type are shown:\n{}",
            r.stdout
        );
        let j = omnibox(
            db,
            &["status", "--check", "--max-failed", "0", "--format", "json"],
        );
        assert_eq!(j.code, 1);
        let v = j.json();
        assert_eq!(v["check"]["ok"], false);
        assert_eq!(v["tables"][0]["failed_by_event_type"][0]["count"], 4);
        // A key held up behind a retrying head.
        let outbox = db.store.outbox();
        let mut head = NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            "t",
            "orders",
            "stuck-key",
            json!({"a": 1}),
        );
        head.max_attempts = Some(5);
        let head = DomainService::default().create_outbox_event(head).unwrap();
        let behind = DomainService::default()
            .create_outbox_event(NewOutboxEvent::new(
                "order",
                uuid::Uuid::now_v7(),
                "t",
                "orders",
                "stuck-key",
                json!({"a": 2}),
            ))
            .unwrap();
        outbox.create_many(&[head.clone(), behind]).await.unwrap();
        let c = outbox
            .claim(&ClaimOptions::new(WorkerId::new("w2").unwrap(), 1))
            .await
            .unwrap();
        outbox
            .fail(
                &c.token,
                &[Failure::counted(
                    head.id(),
                    "broker rejected the record",
                    time::now() + chrono::Duration::hours(1),
                )],
            )
            .await
            .unwrap();
        let v = omnibox(db, &["status", "--format", "json"]).json();
        let b = &v["blocked_keys"][0];
        assert_eq!(
            (b["partition_key"].as_str(), b["waiting"].as_u64()),
            (Some("stuck-key"), Some(1))
        );
        assert_eq!(b["head_id"], head.id().to_string());
    }

    /// The audit row is part of the change: everything is validated before
    /// anything changes, and the row and its audit entry commit together.
    pub async fn audit_is_validated_first_and_atomic(db: &TestDb) {
        let outbox = db.store.outbox();
        let events: Vec<OutboxEvent> = (0..2)
            .map(|i| new_event("t", "t1", &format!("a{i}")))
            .collect();
        outbox.create_many(&events).await.unwrap();
        let claim = outbox
            .claim(&ClaimOptions::new(WorkerId::new("relay-1").unwrap(), 2))
            .await
            .unwrap();
        let id = claim.events[0].id().to_string();
        let audit_rows = || async {
            db.store
                .audit(&omnibox::store::audit::AuditFilter::default())
                .await
                .unwrap()
                .len()
        };
        // An actor that cannot be recorded: exit 2 and the row stays locked.
        for actor in [
            "x".repeat(300),
            "evil\u{1b}[2Jactor".to_string(),
            "two\nlines".to_string(),
        ] {
            let r = omnibox(
                db,
                &["unlock", &id, "--reason", "x", "--actor", &actor, "--yes"],
            );
            assert_eq!(r.code, 2, "{actor:?}: {}", r.stderr);
            assert!(r.stderr.contains("actor"), "{}", r.stderr);
            assert!(
                outbox
                    .get(claim.events[0].id())
                    .await
                    .unwrap()
                    .unwrap()
                    .is_locked()
            );
            for cmd in [
                vec!["replay", "--all", "--yes", "--actor", &actor],
                vec!["cleanup", "--older-than", "30d", "--yes", "--actor", &actor],
                vec!["release-stale-locks", "--yes", "--actor", &actor],
            ] {
                assert_eq!(omnibox(db, &cmd).code, 2, "{cmd:?}");
            }
        }
        assert_eq!(audit_rows().await, 0, "nothing recorded, nothing changed");
        // Under sudo, the person behind it; a single unlock records the holder.
        let r = omnibox_env(
            db,
            &["unlock", &id, "--reason", "relay-1 hung", "--yes"],
            &[("SUDO_USER", "alice"), ("USER", "root")],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let a = omnibox(db, &["audit", "--format", "json"]).json();
        assert_eq!(a["entries"][0]["actor"], "alice via sudo");
        assert_eq!(a["entries"][0]["details"]["previous_holder"], "relay-1");
        assert_eq!(a["entries"][0]["ids"][0], id.as_str());
        // The change applies only while the confirmed holder holds the row.
        let other = claim.events[1].id();
        let reason = omnibox::UnlockReason::new("stale").unwrap();
        let changed = db
            .store
            .change_audited(
                omnibox::Table::Outbox,
                omnibox::store::audit::AuditedChange::UnlockOne {
                    id: other,
                    holder: "relay-2",
                    reason: &reason,
                },
                omnibox::store::audit::AuditEntry::new("oncall", "unlock"),
            )
            .await
            .unwrap();
        assert!(changed.is_empty());
        assert!(outbox.get(other).await.unwrap().unwrap().is_locked());
        assert_eq!(audit_rows().await, 1, "no audit row for no change");
        // Answers that are "no" exit 1.
        let r = omnibox(
            db,
            &["unlock", "--worker", "nobody", "--reason", "x", "--yes"],
        );
        assert_eq!(r.code, 1, "{}", r.stderr);
        let r = omnibox(
            db,
            &["replay", "--id", &uuid::Uuid::now_v7().to_string(), "--yes"],
        );
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("no failed outbox or inbox event"),
            "{}",
            r.stderr
        );
        let r = omnibox(db, &["replay", "--id", &other.to_string(), "--yes"]);
        assert_eq!(r.code, 1, "a pending row is not replayed: {}", r.stderr);
        // With --format json an error is also a JSON object on stdout.
        let r = omnibox(db, &["unlock", &id, "--yes", "--format", "json"]);
        assert_eq!(r.code, 2);
        let e = r.json();
        assert_eq!(e["error"]["exit_code"], 2);
        assert!(e["error"]["message"].as_str().unwrap().contains("--reason"));
    }

    /// `failures` groups every failed row (in the database, by exact error,
    /// then by fingerprint): errors that differ only in an id are one group.
    /// `cleanup` also trims the audit trail by its own retention.
    pub async fn failures_count_every_row_and_cleanup_trims_the_audit(db: &TestDb) {
        let outbox = db.store.outbox();
        let events: Vec<OutboxEvent> = (0..5)
            .map(|i| new_event("pay", "t1", &format!("f{i}")))
            .collect();
        outbox.create_many(&events).await.unwrap();
        let claim = outbox
            .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 10))
            .await
            .unwrap();
        let failures: Vec<Failure> = claim
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let error = if i < 4 {
                    format!("record {} rejected", uuid::Uuid::now_v7())
                } else {
                    "timeout".to_string()
                };
                Failure::dead(e.id(), error)
            })
            .collect();
        outbox.fail(&claim.token, &failures).await.unwrap();
        let r = omnibox(db, &["failures", "--format", "json"]).json();
        let groups = r["groups"].as_array().unwrap();
        let counts: Vec<u64> = groups
            .iter()
            .map(|g| g["count"].as_u64().unwrap())
            .collect();
        assert_eq!(counts, vec![4, 1], "{r}");
        assert_eq!(groups[0]["error"], "record <id> rejected");
        // An audit row past the trail's retention goes with the next cleanup.
        let mut old = omnibox::store::audit::AuditEntry::new("oncall", "replay");
        old.at = time::now() - chrono::Duration::days(400);
        db.store.record_audit(&old).await.unwrap();
        let recent = omnibox::store::audit::AuditEntry::new("oncall", "replay");
        db.store.record_audit(&recent).await.unwrap();
        let r = omnibox(
            db,
            &[
                "cleanup",
                "--older-than",
                "30d",
                "--table",
                "outbox",
                "--yes",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let left = db
            .store
            .audit(&omnibox::store::audit::AuditFilter::default())
            .await
            .unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    /// The recorded migrations against the objects that exist: a migrated
    /// database has every object of every migration; a deleted record is
    /// named by `doctor` and recorded by `migrate` (which used to fail on
    /// "already exists"); a migration partly applied without a record is
    /// refused with what is missing, changing nothing; a recorded
    /// migration's dropped table is named.
    pub async fn migrate_and_doctor_compare_records_with_objects(db: &TestDb) {
        let state = db.store.schema_state().await.unwrap();
        assert!(state.problems().is_empty(), "{:?}", state.problems());
        for m in &state.migrations {
            assert!(m.recorded && m.missing.is_empty(), "{m:?}");
            assert!(
                !m.present.is_empty(),
                "migration {} lists no objects",
                m.version
            );
        }
        let all = recorded_versions(db).await;
        assert_eq!(all.len(), state.migrations.len());
        let audit = version_of(db, "audit").await;
        let letters = version_of(db, "dead letters").await;

        // Two deleted records.
        raw_script(
            db,
            format!("DELETE FROM omnibox_migrations WHERE version IN ({audit}, {letters})"),
        )
        .await;
        let r = omnibox(db, &["doctor", "--format", "json", "--dedup-window", "1d"]);
        assert_eq!(r.code, 1, "{}", r.stdout);
        let schema = doctor_check(&r, "schema");
        assert_eq!(schema["status"], "fail", "{schema}");
        let message = schema["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("migrations {audit}, {letters} are not recorded")),
            "{schema}"
        );
        assert!(
            schema["hint"].as_str().unwrap().contains("omnibox migrate"),
            "{schema}"
        );
        let r = omnibox(db, &["migrate", "--format", "json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let report = r.json();
        let versions = |key: &str| -> Vec<i64> {
            report[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["version"].as_i64().unwrap())
                .collect()
        };
        assert_eq!(versions("recorded"), vec![audit, letters], "{report}");
        assert_eq!(versions("applied"), Vec::<i64>::new(), "{report}");
        assert_eq!(recorded_versions(db).await, all);
        let r = omnibox(db, &["doctor", "--format", "json", "--dedup-window", "1d"]);
        assert_eq!(doctor_check(&r, "schema")["status"], "ok", "{}", r.stdout);
        let r = omnibox(db, &["migrate"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stdout.starts_with("Schema is up to date"), "{}", r.stdout);

        // Partly applied: no record, the table there, an index of it not.
        raw_script(
            db,
            format!(
                "DELETE FROM omnibox_migrations WHERE version = {letters}; DROP INDEX omnibox_dead_letters_open"
            ),
        )
        .await;
        let r = omnibox(db, &["doctor", "--format", "json", "--dedup-window", "1d"]);
        let schema = doctor_check(&r, "schema");
        assert_eq!(schema["status"], "fail", "{schema}");
        let message = schema["message"].as_str().unwrap();
        assert!(message.contains("partly applied"), "{schema}");
        assert!(message.contains("table omnibox_dead_letters"), "{schema}");
        assert!(
            message.contains("index omnibox_dead_letters_open missing"),
            "{schema}"
        );
        assert_eq!(doctor_check(&r, "indexes")["status"], "fail");
        let before = recorded_versions(db).await;
        let r = omnibox(db, &["migrate"]);
        assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains("partly applied"), "{}", r.stderr);
        assert!(r.stderr.contains("nothing was changed"), "{}", r.stderr);
        assert!(r.stderr.contains("--print-sql"), "{}", r.stderr);
        assert_eq!(recorded_versions(db).await, before);
        // The manual step the message names (here: drop what it created),
        // then migrate finishes.
        raw_script(db, "DROP TABLE omnibox_dead_letters".into()).await;
        let r = omnibox(db, &["migrate", "--format", "json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.json()["applied"][0]["version"], letters, "{}", r.stdout);
        let state = db.store.schema_state().await.unwrap();
        assert!(state.problems().is_empty(), "{:?}", state.problems());
        assert!(state.missing_indexes().is_empty());

        // A recorded migration's table dropped: doctor names it, migrate
        // warns and applies nothing.
        raw_script(db, "DROP TABLE omnibox_audit".into()).await;
        let r = omnibox(db, &["doctor", "--format", "json", "--dedup-window", "1d"]);
        let schema = doctor_check(&r, "schema");
        assert_eq!(schema["status"], "fail", "{schema}");
        assert!(
            schema["message"].as_str().unwrap().contains(&format!(
                "migration {audit} (audit) is recorded, but table omnibox_audit is missing"
            )),
            "{schema}"
        );
        let r = omnibox(db, &["migrate"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            r.stderr.contains("table omnibox_audit is missing"),
            "{}",
            r.stderr
        );
    }

    /// A server error reads as the server's message, once: no "error
    /// returned from database", no " at line N" (the line of PostgreSQL's
    /// own C source that raised it), no cause repeated.
    pub async fn server_errors_read_as_their_message_once(db: &TestDb) {
        raw_script(db, "DROP TABLE omnibox_audit".into()).await;
        for format in ["table", "json"] {
            let r = omnibox(db, &["audit", "--format", format]);
            assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
            let line = r
                .stderr
                .lines()
                .find(|l| l.starts_with("omnibox: error:"))
                .unwrap_or_default();
            assert!(
                line.starts_with("omnibox: error: database error: "),
                "{line}"
            );
            assert!(line.contains("omnibox_audit"), "{line}");
            assert_eq!(line.matches("omnibox_audit").count(), 1, "{line}");
            assert!(!line.contains(" at line "), "{line}");
            assert!(!line.contains("error returned from database"), "{line}");
        }
    }

    /// `migrate --print-sql` applied by hand (as a migration tool would)
    /// records its versions: every command then sees the schema current,
    /// and `migrate` says it is up to date (it used to find version 0 and
    /// fail on "already exists"). DDL applied without its records (an older
    /// omnibox's --print-sql) is recorded by `migrate`.
    pub async fn print_sql_records_its_versions(db: &TestDb) {
        let fresh_dir = tempfile::tempdir().unwrap();
        let (env, setup, teardown): (Vec<(String, String)>, String, String) = if db.is_postgres() {
            let schema = format!("p_{}", uuid::Uuid::new_v4().simple());
            (
                vec![("OMNIBOX_DATABASE_SCHEMA".into(), schema.clone())],
                format!("CREATE SCHEMA IF NOT EXISTS {schema}; SET LOCAL search_path TO {schema};"),
                format!("DROP SCHEMA {schema} CASCADE"),
            )
        } else {
            let url = format!("sqlite://{}", fresh_dir.path().join("fresh.db").display());
            (
                vec![("OMNIBOX_DATABASE_URL".into(), url)],
                String::new(),
                String::new(),
            )
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = omnibox_env(db, &["migrate", "--print-sql"], &env);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let ddl = r.stdout.clone();
        assert!(ddl.contains("INSERT INTO omnibox_migrations"), "{ddl}");
        let apply = |script: String| async {
            if db.is_postgres() {
                raw_script(db, format!("BEGIN; {setup} {script} COMMIT;")).await;
            } else {
                let url = env[0].1;
                let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
                let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true))
                    .await
                    .unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(script))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
            }
        };
        apply(ddl).await;
        let r = omnibox_env(
            db,
            &["doctor", "--format", "json", "--dedup-window", "1d"],
            &env,
        );
        let schema = doctor_check(&r, "schema");
        assert_eq!(schema["status"], "ok", "{schema}");
        assert_eq!(doctor_check(&r, "indexes")["status"], "ok", "{}", r.stdout);
        let r = omnibox_env(db, &["migrate", "--format", "json"], &env);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.json()["applied"], json!([]), "{}", r.stdout);
        assert_eq!(r.json()["recorded"], json!([]), "{}", r.stdout);
        let r = omnibox_env(db, &["status", "--format", "json"], &env);
        assert_eq!(r.code, 0, "{}", r.stderr);
        // The same DDL without its records (what an older omnibox printed).
        apply("DELETE FROM omnibox_migrations;".into()).await;
        let r = omnibox_env(db, &["migrate", "--format", "json"], &env);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let recorded = r.json()["recorded"].as_array().unwrap().len();
        assert_eq!(
            recorded,
            db.store.schema_state().await.unwrap().migrations.len()
        );
        let r = omnibox_env(
            db,
            &["doctor", "--format", "json", "--dedup-window", "1d"],
            &env,
        );
        assert_eq!(doctor_check(&r, "schema")["status"], "ok", "{}", r.stdout);
        if db.is_postgres() {
            raw_script(db, teardown).await;
        }
    }

    /// `omnibox doctor` on both stores: the retention check against the
    /// deduplication window, stale leases, blocked keys, a dropped index
    /// (the claim plan fails with it), the broker's topics; exit 1 on a fail.
    pub async fn doctor_finds_what_is_wrong(db: &TestDb) {
        let statuses = |r: &Out| -> Vec<(String, String)> {
            r.json()["checks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["check"].as_str().unwrap().to_string(),
                        c["status"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        let status_of = |r: &Out, check: &str| -> String {
            statuses(r)
                .into_iter()
                .find(|(c, _)| c == check)
                .map(|(_, s)| s)
                .unwrap_or_else(|| panic!("no {check} in {}", r.stdout))
        };
        let r = omnibox(db, &["doctor", "--format", "json"]);
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
        assert!(statuses(&r).iter().all(|(_, s)| s == "ok"), "{}", r.stdout);
        // A cleanup that kept inbox rows for less than the window.
        let mut cleanup = omnibox::store::audit::AuditEntry::new("cron", "cleanup");
        cleanup.table = Some("inbox".into());
        cleanup.count = 3;
        cleanup.details = json!({"older_than_seconds": 86_400.0});
        db.store.record_audit(&cleanup).await.unwrap();
        let r = omnibox(db, &["doctor", "--format", "json"]);
        assert_eq!((r.code, status_of(&r, "retention").as_str()), (1, "fail"));
        let r = omnibox(db, &["doctor", "--format", "json", "--dedup-window", "1d"]);
        assert_eq!((r.code, status_of(&r, "retention").as_str()), (0, "ok"));
        // A record edited by hand is reported, not trusted (and no panic).
        for bad in [json!(-5.0), json!(1e300), json!("1d"), json!({})] {
            cleanup.details =
                json!({"older_than_seconds": 864_000.0, "failed_older_than_seconds": bad});
            db.store.record_audit(&cleanup).await.unwrap();
            let r = omnibox(db, &["doctor", "--format", "json"]);
            let check = doctor_check(&r, "retention");
            assert_eq!(
                (r.code, check["status"].as_str()),
                (0, Some("warn")),
                "{}",
                r.render()
            );
            assert!(
                check["message"]
                    .as_str()
                    .unwrap()
                    .contains("failed_older_than_seconds = "),
                "{}",
                r.stdout
            );
        }
        cleanup.details = json!({"older_than_seconds": 864_000.0});
        db.store.record_audit(&cleanup).await.unwrap();
        let r = omnibox(db, &["doctor", "--format", "json"]);
        assert_eq!((r.code, status_of(&r, "retention").as_str()), (0, "ok"));
        // A worker that died holding rows; a key behind a failing head.
        let outbox = db.store.outbox();
        outbox
            .create(&new_event("t", "orders", "stuck"))
            .await
            .unwrap();
        outbox
            .create(&new_event("t", "orders", "stuck"))
            .await
            .unwrap();
        let head = outbox
            .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 1))
            .await
            .unwrap();
        outbox
            .fail(
                &head.token,
                &[Failure::transient(
                    head.events[0].id(),
                    "boom",
                    time::now() + chrono::Duration::hours(1),
                )],
            )
            .await
            .unwrap();
        assert_eq!(outbox.blocked_keys(5).await.unwrap().len(), 1);
        outbox
            .create(&new_event("t", "orders", "other"))
            .await
            .unwrap();
        outbox
            .claim(
                &ClaimOptions::new(WorkerId::new("dead").unwrap(), 5)
                    .lease(Duration::from_millis(1)),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = omnibox(db, &["doctor", "--format", "json", "--dedup-window", "1d"]);
        assert_eq!(status_of(&r, "leases"), "warn", "{}", r.stdout);
        assert_eq!(status_of(&r, "blocked"), "warn", "{}", r.stdout);
        assert_eq!(r.code, 0, "warnings do not fail: {}", r.stdout);
        // The broker: topics of pending rows must exist.
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let broker = format!("kafka://{}", cluster.bootstrap_servers());
        let doctor_broker = || {
            omnibox(
                db,
                &[
                    "doctor",
                    "--format",
                    "json",
                    "--dedup-window",
                    "1d",
                    "--broker",
                    &broker,
                ],
            )
        };
        let r = doctor_broker();
        assert_eq!(status_of(&r, "broker"), "fail", "{}", r.stdout);
        assert!(r.stdout.contains("orders"), "{}", r.stdout);
        cluster.create_topic("orders", 1, 1).unwrap();
        let r = doctor_broker();
        assert_eq!(status_of(&r, "broker"), "ok", "{}", r.stdout);
        // A dropped claim index.
        raw_sql(db, "DROP INDEX outbox_events_claim").await;
        let r = omnibox(db, &["doctor", "--format", "json", "--dedup-window", "1d"]);
        assert_eq!(r.code, 1);
        assert_eq!(status_of(&r, "indexes"), "fail", "{}", r.stdout);
        // On PostgreSQL a table of a few pages may be read whole: the plan
        // is judged from 1 MiB on (the missing index is the indexes check's).
        let small_pg = matches!(db.store, omnibox::store::AnyStore::Postgres(_));
        assert_eq!(
            status_of(&r, "claim plan"),
            if small_pg { "ok" } else { "fail" },
            "{}",
            r.stdout
        );
    }
    async fn delete_inbox_row(db: &TestDb, id: uuid::Uuid) {
        match &db.store {
            omnibox::store::AnyStore::Postgres(s) => {
                sqlx::query("DELETE FROM inbox_events WHERE id = $1")
                    .bind(id)
                    .execute(s.pool())
                    .await
                    .unwrap();
            }
            omnibox::store::AnyStore::Sqlite(s) => {
                sqlx::query("DELETE FROM inbox_events WHERE id = ?1")
                    .bind(id.to_string())
                    .execute(s.pool())
                    .await
                    .unwrap();
            }
            _ => unreachable!(),
        }
    }

    /// A dead letter put twice is kept once (the processor retries a put
    /// whose answer was lost); a letter whose copy cannot be read makes its
    /// replay fail whole: nothing changes, the letter stays open.
    pub async fn dead_letter_puts_are_idempotent_and_bad_copies_change_nothing(db: &TestDb) {
        use omnibox::pipeline::{DeadLetterStore, Letter};
        let outbox = db.store.outbox();
        let e = new_event("order.created", "orders", "k1");
        outbox.create(&e).await.unwrap();
        let claim = outbox
            .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 1))
            .await
            .unwrap();
        outbox
            .fail(&claim.token, &[Failure::dead(e.id(), "schema rejected")])
            .await
            .unwrap();
        let table = db.store.dead_letters();
        let letter = [Letter {
            event: &claim.events[0],
            error: "schema rejected",
        }];
        assert_eq!(DeadLetterStore::put(&table, &letter).await.unwrap(), 1);
        assert_eq!(DeadLetterStore::put(&table, &letter).await.unwrap(), 1);
        let letters = table.list(&Default::default()).await.unwrap();
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(letters[0].error, "schema rejected");
        raw_sql(db, "UPDATE omnibox_dead_letters SET event = '{\"x\": 1}'").await;
        // Its row gone, the replay would need the copy: it fails, whole.
        tokio::time::sleep(Duration::from_millis(5)).await;
        use omnibox::MaintenanceStore;
        assert_eq!(outbox.delete_failed(Duration::ZERO, 10).await.unwrap(), 1);
        let err = table
            .replay(
                &[letters[0].id],
                omnibox::store::audit::AuditEntry::new("t", "replay"),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
        let open = table
            .list(&omnibox::store::dead_letters::DeadLetterFilter {
                open_only: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(open.len(), 1);
        assert!(outbox.get(e.id()).await.unwrap().is_none());
        let r = omnibox(db, &["replay", "--table", "dead-letters", "--all", "--yes"]);
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains("cannot be read"), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        let audit = omnibox(db, &["audit", "--format", "json"]);
        assert!(
            audit.json()["entries"].as_array().unwrap().is_empty(),
            "{}",
            audit.stdout
        );
    }

    /// Two operators replaying the same letters at once: each letter is
    /// replayed by one of them, each event comes back once (one row, no
    /// duplicate insert), and the audit counts add up to the letters.
    pub async fn concurrent_replays_take_each_letter_once(db: &TestDb) {
        use omnibox::pipeline::{DeadLetterStore, Letter};
        let outbox = db.store.outbox();
        let events: Vec<OutboxEvent> = (0..20)
            .map(|i| new_event("order.created", "orders", &format!("k{i}")))
            .collect();
        outbox.create_many(&events).await.unwrap();
        let claim = outbox
            .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 20))
            .await
            .unwrap();
        let failures: Vec<Failure> = claim
            .events
            .iter()
            .map(|e| Failure::dead(e.id(), "rejected"))
            .collect();
        outbox.fail(&claim.token, &failures).await.unwrap();
        let table = db.store.dead_letters();
        let letters: Vec<Letter<'_, _>> = claim
            .events
            .iter()
            .map(|e| Letter {
                event: e,
                error: "rejected",
            })
            .collect();
        assert_eq!(DeadLetterStore::put(&table, &letters).await.unwrap(), 20);
        // Half the rows are gone (re-inserted on replay), half still failed.
        tokio::time::sleep(Duration::from_millis(5)).await;
        use omnibox::MaintenanceStore;
        assert_eq!(outbox.delete_failed(Duration::ZERO, 10).await.unwrap(), 10);
        let ids: Vec<uuid::Uuid> = table
            .list(&Default::default())
            .await
            .unwrap()
            .iter()
            .map(|l| l.id)
            .collect();
        let run = |ids: Vec<uuid::Uuid>| {
            let table = table.clone();
            tokio::spawn(async move {
                table
                    .replay(&ids, omnibox::store::audit::AuditEntry::new("op", "replay"))
                    .await
            })
        };
        let mut reversed = ids.clone();
        reversed.reverse();
        let (a, b) = (run(ids.clone()), run(reversed));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        // SQLite may refuse the second writer outright (busy): that replay
        // changed nothing and can be run again.
        let mut replayed: Vec<uuid::Uuid> = Vec::new();
        for r in [a, b] {
            match r {
                Ok(r) => {
                    assert!(r.left.is_empty(), "{:?}", r.left);
                    replayed.extend(r.replayed.iter().map(|l| l.id));
                }
                Err(e) => assert!(
                    e.to_string().contains("locked") || e.to_string().contains("busy"),
                    "{e}"
                ),
            }
        }
        replayed.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(replayed, expected, "each letter replayed exactly once");
        let c = outbox.counts().await.unwrap();
        assert_eq!((c.pending, c.failed), (20, 0), "{c:?}");
        for e in &events {
            let row = outbox.get(e.id()).await.unwrap().unwrap();
            assert_eq!(
                (row.status(), row.attempts_made()),
                (EventStatus::Pending, 0)
            );
        }
        let audit = omnibox(db, &["audit", "--format", "json"]);
        let total: u64 = audit.json()["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 20, "{}", audit.stdout);
    }

    /// A letter is kept only while its event is failed: one put after the
    /// row was requeued (the window between the failure and the letter) is
    /// not written, the library's requeue closes open letters like the
    /// CLI's, and a letter whose event is back by a way omnibox did not see
    /// is closed by its replay, not left open for ever.
    pub async fn letters_follow_their_rows(db: &TestDb) {
        use omnibox::pipeline::{DeadLetterStore, Letter};
        use omnibox::store::dead_letters::DeadLetterFilter;
        let outbox = db.store.outbox();
        let table = db.store.dead_letters();
        let e = new_event("order.created", "orders", "k1");
        outbox.create(&e).await.unwrap();
        let fail = || async {
            let claim = outbox
                .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 1))
                .await
                .unwrap();
            assert_eq!(claim.events.len(), 1);
            outbox
                .fail(&claim.token, &[Failure::dead(e.id(), "rejected")])
                .await
                .unwrap();
            claim.events[0].clone()
        };
        let requeue = || async {
            outbox
                .requeue_failed(&omnibox::RequeueFilter {
                    failures: omnibox::store::FailureSelector {
                        ids: vec![e.id()],
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .await
                .unwrap()
        };
        let open = || async {
            table
                .list(&DeadLetterFilter {
                    open_only: true,
                    ..Default::default()
                })
                .await
                .unwrap()
        };
        // Failed, requeued by hand, and only then the letter: none is kept.
        let claimed = fail().await;
        assert_eq!(requeue().await, vec![e.id()]);
        let letter = [Letter {
            event: &claimed,
            error: "rejected",
        }];
        assert_eq!(DeadLetterStore::put(&table, &letter).await.unwrap(), 1);
        assert!(open().await.is_empty(), "a letter for a pending row");
        // Failed again, the letter kept; the library's requeue closes it.
        let claimed = fail().await;
        let letter = [Letter {
            event: &claimed,
            error: "rejected",
        }];
        DeadLetterStore::put(&table, &letter).await.unwrap();
        assert_eq!(open().await.len(), 1);
        assert_eq!(requeue().await, vec![e.id()]);
        assert!(open().await.is_empty(), "the requeue left its letter open");
        // Failed once more; then the row comes back behind omnibox's back.
        let claimed = fail().await;
        let letter = [Letter {
            event: &claimed,
            error: "rejected",
        }];
        DeadLetterStore::put(&table, &letter).await.unwrap();
        let l = open().await.remove(0);
        raw_sql(
            db,
            "UPDATE outbox_events SET status = 'pending', attempts_made = 0",
        )
        .await;
        let r = omnibox(
            db,
            &[
                "replay",
                "--table",
                "dead-letters",
                "--all",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.json()["replayed"], 0, "{}", r.stdout);
        assert_eq!(
            r.json()["closed"][0]["id"],
            l.id.to_string(),
            "{}",
            r.stdout
        );
        assert!(r.stderr.contains("back already"), "{}", r.stderr);
        assert!(open().await.is_empty(), "a letter nothing can close");
        assert_eq!(table.list(&Default::default()).await.unwrap().len(), 2);
    }

    /// A letter replay and a requeue of the same rows at once: both finish
    /// (no deadlock: the replay locks letters then rows, the requeue rows
    /// then the letters it can take), every event is pending once, no
    /// letter is left open.
    pub async fn a_letter_replay_and_a_requeue_at_once(db: &TestDb) {
        use omnibox::pipeline::{DeadLetterStore, Letter};
        use omnibox::store::audit::{AuditEntry, AuditedChange};
        let outbox = db.store.outbox();
        let table = db.store.dead_letters();
        for round in 0..5 {
            let events: Vec<OutboxEvent> = (0..30)
                .map(|i| new_event("order.created", "orders", &format!("r{round}k{i}")))
                .collect();
            outbox.create_many(&events).await.unwrap();
            let claim = outbox
                .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 30))
                .await
                .unwrap();
            let failures: Vec<Failure> = claim
                .events
                .iter()
                .map(|e| Failure::dead(e.id(), "rejected"))
                .collect();
            outbox.fail(&claim.token, &failures).await.unwrap();
            let letters: Vec<Letter<'_, _>> = claim
                .events
                .iter()
                .map(|e| Letter {
                    event: e,
                    error: "rejected",
                })
                .collect();
            DeadLetterStore::put(&table, &letters).await.unwrap();
            let letter_ids: Vec<uuid::Uuid> = table
                .list(&omnibox::store::dead_letters::DeadLetterFilter {
                    open_only: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .iter()
                .map(|l| l.id)
                .collect();
            let mut event_ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id()).collect();
            event_ids.reverse();
            let replay = {
                let table = table.clone();
                tokio::spawn(async move {
                    table
                        .replay(&letter_ids, AuditEntry::new("a", "replay"))
                        .await
                })
            };
            let requeue = {
                let store = db.store.clone();
                tokio::spawn(async move {
                    store
                        .change_audited(
                            omnibox::Table::Outbox,
                            AuditedChange::Requeue { ids: &event_ids },
                            AuditEntry::new("b", "replay"),
                        )
                        .await
                })
            };
            let (a, b) = (replay.await.unwrap(), requeue.await.unwrap());
            let busy = |e: &omnibox::Error| {
                let m = e.to_string();
                m.contains("locked") || m.contains("busy")
            };
            match (&a, &b) {
                (Ok(r), _) => assert!(r.left.is_empty(), "{r:?}"),
                (Err(e), _) => assert!(busy(e), "round {round}: the letter replay failed: {e}"),
            }
            if let Err(e) = &b {
                assert!(busy(e), "round {round}: the requeue failed: {e}");
            }
            // Whatever lost a race on SQLite (busy) is run again.
            if a.is_err() || b.is_err() {
                let open: Vec<uuid::Uuid> = table
                    .list(&omnibox::store::dead_letters::DeadLetterFilter {
                        open_only: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .iter()
                    .map(|l| l.id)
                    .collect();
                table
                    .replay(&open, AuditEntry::new("a", "replay"))
                    .await
                    .unwrap();
            }
            for e in &events {
                let row = outbox.get(e.id()).await.unwrap().unwrap();
                assert_eq!(row.status(), EventStatus::Pending, "round {round}");
            }
            let open = table
                .list(&omnibox::store::dead_letters::DeadLetterFilter {
                    open_only: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            assert!(open.is_empty(), "round {round}: {open:?}");
            // Out of the way for the next round.
            let claim = outbox
                .claim(&ClaimOptions::new(WorkerId::new("w").unwrap(), 30))
                .await
                .unwrap();
            let ids: Vec<uuid::Uuid> = claim.events.iter().map(|e| e.id()).collect();
            outbox.complete(&claim.token, &ids).await.unwrap();
        }
    }

    /// `inbox process --dlq table` keeps the rows that fail as dead
    /// letters; `list --table dead-letters` shows them; `replay --table
    /// dead-letters` requeues a row still failed, re-inserts one that was
    /// deleted, marks the letters replayed, audits it, and does not replay
    /// a letter twice; a requeue of the row itself closes its letter.
    pub async fn dead_letters_are_kept_listed_and_replayed(db: &TestDb) {
        let domain = DomainService::default();
        let mut events = Vec::new();
        for m in ["m1", "m2", "m3"] {
            let mut e = NewInboxEvent::new(m, "g", "billing", "refund.issued", json!({"m": m}));
            e.max_attempts = Some(1);
            let e = domain.create_inbox_event(e).unwrap();
            db.store.inbox().insert(&e).await.unwrap();
            events.push(e);
        }
        let r = omnibox(
            db,
            &[
                "inbox",
                "process",
                "--once",
                "--dlq",
                "table",
                "--exec",
                "echo \"no refund for $OMNIBOX_MESSAGE_ID\" >&2; exit 1",
            ],
        );
        // Events that failed for good in a --once run: exit 3, each logged.
        assert_eq!(r.code, 3, "{}", r.stderr);
        assert_eq!(
            r.stderr.matches("ERROR event failed for good").count(),
            events.len(),
            "{}",
            r.stderr
        );
        for e in &events {
            let row = db.store.inbox().get(e.id()).await.unwrap().unwrap();
            assert_eq!(row.status(), EventStatus::Failed);
        }
        let list = omnibox(db, &["list", "--table", "dead-letters", "--format", "json"]);
        assert_eq!(list.code, 0, "{}", list.stderr);
        let letters = list.json()["dead_letters"].as_array().unwrap().clone();
        assert_eq!(letters.len(), 3, "{}", list.stdout);
        for (l, e) in letters.iter().zip(&events) {
            assert_eq!(l["origin"], "inbox");
            assert_eq!(l["event_id"], e.id().to_string());
            assert_eq!(l["topic"], "billing");
            assert_eq!(l["attempts_made"], 1);
            assert!(
                l["error"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("no refund for {}", e.message_id())),
                "{l}"
            );
            assert_eq!(l["event"]["status"], "failed");
            assert_eq!(l["event"]["payload"], json!({"m": e.message_id()}));
            assert!(l["replayed_at"].is_null());
        }
        let status = omnibox(db, &["status", "--format", "json"]);
        assert_eq!(status.json()["dead_letters_open"], 3, "{}", status.stdout);
        let status = omnibox(db, &["status"]);
        assert!(
            status.stdout.contains("Open dead letters: 3"),
            "{}",
            status.stdout
        );
        let table = omnibox(db, &["list", "--table", "dead-letters"]);
        assert!(table.stdout.contains("refund.issued"), "{}", table.stdout);
        // Event-table filters that mean nothing here are refused.
        let r = omnibox(
            db,
            &["list", "--table", "dead-letters", "--status", "failed"],
        );
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("--status"), "{}", r.stderr);
        // A replay of the inbox row itself closes its letter.
        let id1 = events[0].id().to_string();
        let r = omnibox(db, &["replay", "--table", "inbox", "--id", &id1, "--yes"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let open = db
            .store
            .dead_letters()
            .list(&omnibox::store::dead_letters::DeadLetterFilter {
                open_only: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            open.iter().map(|l| l.event_id).collect::<Vec<_>>(),
            vec![events[1].id(), events[2].id()]
        );
        // m3's row is deleted (as cleanup --include-failed would).
        let m3_stored = db.store.inbox().get(events[2].id()).await.unwrap().unwrap();
        delete_inbox_row(db, events[2].id()).await;
        // `show` finds the event through its letter.
        let m3_id = events[2].id().to_string();
        let shown = omnibox(db, &["show", &m3_id, "--format", "json"]);
        assert_eq!(shown.code, 0, "{}", shown.stderr);
        assert_eq!(shown.json()["table"], "dead-letters");
        assert_eq!(shown.json()["dead_letters"][0]["event"]["message_id"], "m3");
        assert!(
            shown.stderr.contains("replay --table dead-letters"),
            "{}",
            shown.stderr
        );
        let dry = omnibox(
            db,
            &[
                "replay",
                "--table",
                "dead-letters",
                "--all",
                "--dry-run",
                "--format",
                "json",
            ],
        );
        assert_eq!(dry.code, 0, "{}", dry.stderr);
        assert_eq!(dry.json()["selected"], 2, "{}", dry.stdout);
        assert_eq!(dry.json()["replayed"], 0);
        let r = omnibox(
            db,
            &[
                "replay",
                "--table",
                "dead-letters",
                "--all",
                "--reason",
                "refunds fixed",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.json()["replayed"], 2, "{}", r.stdout);
        let m2 = db.store.inbox().get(events[1].id()).await.unwrap().unwrap();
        assert_eq!(
            (m2.status(), m2.attempts_made(), m2.last_error()),
            (EventStatus::Pending, 0, None)
        );
        let m3 = db.store.inbox().get(events[2].id()).await.unwrap().unwrap();
        assert_eq!((m3.status(), m3.attempts_made()), (EventStatus::Pending, 0));
        assert_eq!(m3.message_id(), "m3");
        assert_eq!(m3.payload().get("m"), Some(&json!("m3")));
        assert_eq!(m3.created_at(), m3_stored.created_at());
        let all = db
            .store
            .dead_letters()
            .list(&Default::default())
            .await
            .unwrap();
        assert!(all.iter().all(|l| l.replayed_at.is_some()), "{all:?}");
        let audit = omnibox(db, &["audit", "--format", "json"]);
        let entries = audit.json()["entries"].as_array().unwrap().clone();
        let entry = entries
            .iter()
            .find(|e| e["table"] == "dead-letters")
            .unwrap_or_else(|| panic!("{}", audit.stdout));
        assert_eq!(entry["count"], 2);
        assert_eq!(entry["reason"], "refunds fixed");
        // Nothing open is left: a second replay changes nothing.
        let again = omnibox(db, &["replay", "--table", "dead-letters", "--all", "--yes"]);
        assert_eq!(again.code, 1, "{}", again.stderr);
        // The events run again; failing again, they get new letters.
        let r = omnibox(
            db,
            &[
                "inbox", "process", "--once", "--dlq", "table", "--exec", "exit 1",
            ],
        );
        assert_eq!(r.code, 3, "events died: {}", r.stderr);
        let open = db
            .store
            .dead_letters()
            .list(&omnibox::store::dead_letters::DeadLetterFilter {
                open_only: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(open.len(), 3, "{open:?}");
        assert_eq!(
            db.store
                .dead_letters()
                .list(&Default::default())
                .await
                .unwrap()
                .len(),
            6
        );
        // cleanup trims replayed letters past their retention, never open ones.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let r = omnibox(
            db,
            &[
                "cleanup",
                "--older-than",
                "7d",
                "--dead-letters-older-than",
                "1ms",
                "--yes",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let left = db
            .store
            .dead_letters()
            .list(&Default::default())
            .await
            .unwrap();
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(left.iter().all(|l| l.replayed_at.is_none()));
    }

    /// Consumer groups select inbox rows in `list`, `replay` (also of dead
    /// letters) and `inbox process`; the outbox refuses them; `replay
    /// --group` (a consumer group in `inbox consume`, a fingerprint once
    /// here) is refused with what to write instead, and changes nothing.
    pub async fn consumer_groups_select_inbox_rows(db: &TestDb) {
        let domain = DomainService::default();
        let mut fast = Vec::new();
        let mut slow = Vec::new();
        for i in 0..4 {
            let group = if i % 2 == 0 { "fast" } else { "slow" };
            let mut e = NewInboxEvent::new(format!("m{i}"), group, "billing", "t", json!({"i": i}));
            e.max_attempts = Some(1);
            let e = domain.create_inbox_event(e).unwrap();
            db.store.inbox().insert(&e).await.unwrap();
            if i % 2 == 0 {
                fast.push(e)
            } else {
                slow.push(e)
            }
        }
        let r = omnibox(
            db,
            &[
                "inbox", "process", "--once", "--dlq", "table", "--exec", "exit 1",
            ],
        );
        assert_eq!(r.code, 3, "{}", r.stderr);
        let inbox_status =
            |id| async move { db.store.inbox().get(id).await.unwrap().unwrap().status() };
        for e in fast.iter().chain(&slow) {
            assert_eq!(inbox_status(e.id()).await, EventStatus::Failed);
        }
        // Refused, exit 2, nothing changed.
        let r = omnibox(db, &["replay", "--group", "fast", "--yes"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("--fingerprint fast"), "{}", r.stderr);
        assert!(r.stderr.contains("--consumer-group fast"), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        for args in [
            &[
                "replay",
                "--table",
                "outbox",
                "--consumer-group",
                "fast",
                "--yes",
            ][..],
            &["list", "--table", "outbox", "--consumer-group", "fast"][..],
        ] {
            let r = omnibox(db, args);
            assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
            assert!(r.stderr.contains("no consumer group"), "{}", r.stderr);
            assert_eq!(r.stdout, "", "{args:?}");
        }
        let r = omnibox(
            db,
            &[
                "inbox",
                "process",
                "--once",
                "--consumer-group",
                " ",
                "--exec",
                "true",
            ],
        );
        assert_eq!(r.code, 2, "{}", r.stderr);
        for e in fast.iter().chain(&slow) {
            assert_eq!(inbox_status(e.id()).await, EventStatus::Failed);
        }
        // list: the group's rows only, from the inbox.
        let r = omnibox(
            db,
            &["list", "--consumer-group", "slow", "--format", "json"],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let ids: Vec<String> = r.json()["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            ids,
            slow.iter().map(|e| e.id().to_string()).collect::<Vec<_>>()
        );
        // Dead letters of a group.
        let r = omnibox(
            db,
            &[
                "list",
                "--table",
                "dead-letters",
                "--consumer-group",
                "fast",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let letters: Vec<String> = r.json()["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["event_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            letters,
            fast.iter().map(|e| e.id().to_string()).collect::<Vec<_>>()
        );
        // replay: the group's failed rows only.
        let r = omnibox(
            db,
            &[
                "replay",
                "--consumer-group",
                "fast",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.json()["replayed"], 2, "{}", r.stdout);
        for e in &fast {
            assert_eq!(inbox_status(e.id()).await, EventStatus::Pending);
        }
        for e in &slow {
            assert_eq!(inbox_status(e.id()).await, EventStatus::Failed);
        }
        // Dead letters of the other group, by replay.
        let r = omnibox(
            db,
            &[
                "replay",
                "--table",
                "dead-letters",
                "--consumer-group",
                "slow",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.json()["replayed"], 2, "{}", r.stdout);
        // Now all four are pending: inbox process takes one group's rows.
        let r = omnibox(
            db,
            &[
                "inbox",
                "process",
                "--once",
                "--consumer-group",
                "slow",
                "--exec",
                "cat >/dev/null",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        for e in &slow {
            assert_eq!(inbox_status(e.id()).await, EventStatus::Completed);
        }
        for e in &fast {
            assert_eq!(inbox_status(e.id()).await, EventStatus::Pending);
        }
    }

    /// One table rule: without --table, `failures`, `list` (also
    /// `--locked-by`) and `replay` cover both tables, as `unlock --worker`
    /// does, and say each row's table; a filter of one table picks it;
    /// `--after` pages one table.
    pub async fn commands_cover_both_tables_by_default(db: &TestDb) {
        let domain = DomainService::default();
        let o = new_event("order.a", "t1", "k1");
        db.store.outbox().create(&o).await.unwrap();
        let mut n = NewInboxEvent::new("m1", "g", "billing", "order.a", json!({"m": 1}));
        n.max_attempts = Some(1);
        let i = domain.create_inbox_event(n).unwrap();
        db.store.inbox().insert(&i).await.unwrap();
        let worker = WorkerId::new("w-9").unwrap();
        let oc = db
            .store
            .outbox()
            .claim(&ClaimOptions::new(worker.clone(), 10))
            .await
            .unwrap();
        let ic = db
            .store
            .inbox()
            .claim(&ClaimOptions::new(worker.clone(), 10))
            .await
            .unwrap();
        assert_eq!((oc.events.len(), ic.events.len()), (1, 1));
        // What w-9 holds: both rows, each with its table.
        let r = omnibox(db, &["list", "--locked-by", "w-9", "--format", "json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v = r.json();
        assert_eq!(v["table"], "both");
        let held: Vec<(String, String)> = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["table"].as_str().unwrap().into(),
                    e["id"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            held,
            vec![
                ("outbox".to_string(), o.id().to_string()),
                ("inbox".to_string(), i.id().to_string())
            ]
        );
        let r = omnibox(db, &["list", "--locked-by", "w-9"]);
        assert!(r.stdout.contains("│ table"), "{}", r.stdout);
        assert!(r.stdout.contains("│ inbox"), "{}", r.stdout);
        // Both fail for good with the same error.
        db.store
            .outbox()
            .fail(
                &oc.token,
                &[Failure::counted(o.id(), "no route to host", time::now())],
            )
            .await
            .unwrap();
        db.store
            .inbox()
            .fail(
                &ic.token,
                &[Failure::counted(i.id(), "no route to host", time::now())],
            )
            .await
            .unwrap();
        let r = omnibox(db, &["failures", "--format", "json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v = r.json();
        assert_eq!(v["table"], "both");
        let groups = v["groups"].as_array().unwrap();
        let tables: Vec<&str> = groups
            .iter()
            .map(|g| g["table"].as_str().unwrap())
            .collect();
        assert_eq!(tables, vec!["outbox", "inbox"], "{v}");
        let fp = groups[0]["fingerprint"].as_str().unwrap().to_string();
        assert_eq!(groups[1]["fingerprint"], fp.as_str());
        let r = omnibox(db, &["failures", "--table", "inbox", "--format", "json"]);
        assert_eq!(r.json()["table"], "inbox");
        assert_eq!(r.json()["groups"].as_array().unwrap().len(), 1);
        // list --status failed: both; a filter of one table picks it.
        let r = omnibox(db, &["list", "--status", "failed", "--format", "json"]);
        assert_eq!(
            r.json()["events"].as_array().unwrap().len(),
            2,
            "{}",
            r.stdout
        );
        for (args, table) in [
            (
                &[
                    "list", "--status", "failed", "--topic", "t1", "--format", "json",
                ][..],
                "outbox",
            ),
            (
                &[
                    "list", "--status", "failed", "--source", "billing", "--format", "json",
                ][..],
                "inbox",
            ),
            (
                &["list", "--topic", "t1", "--after", "0", "--format", "json"][..],
                "outbox",
            ),
        ] {
            let r = omnibox(db, args);
            assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
            let v = r.json();
            assert_eq!(v["table"], table, "{args:?}");
            assert_eq!(v["events"].as_array().unwrap().len(), 1, "{args:?}: {v}");
            assert_eq!(v["events"][0]["table"], table, "{args:?}");
        }
        // Paging needs one table's seq.
        let r = omnibox(db, &["list", "--after", "0"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("--table"), "{}", r.stderr);
        assert_eq!(r.stdout, "");
        // replay --fingerprint: the group in both tables, one audit row each.
        let r = omnibox(
            db,
            &[
                "replay",
                "--fingerprint",
                &fp,
                "--dry-run",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.json()["selected"], 2, "{}", r.stdout);
        let r = omnibox(db, &["replay", "--fingerprint", &fp, "--yes"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            r.stdout
                .contains("Replayed 2 event(s) (1 outbox, 1 inbox)."),
            "{}",
            r.stdout
        );
        assert_eq!(status_of(db, &o).await, EventStatus::Pending);
        let row = db.store.inbox().get(i.id()).await.unwrap().unwrap();
        assert_eq!(row.status(), EventStatus::Pending);
        let audit = omnibox(db, &["audit", "--action", "replay", "--format", "json"]);
        let entries = audit.json()["entries"].as_array().unwrap().clone();
        let mut tables: Vec<&str> = entries
            .iter()
            .map(|e| e["table"].as_str().unwrap())
            .collect();
        tables.sort();
        assert_eq!(tables, vec!["inbox", "outbox"], "{}", audit.stdout);
    }

    /// `inbox process` warns when a handler fails and the row stays
    /// pending (it logged nothing, even at -vv, while `inbox consume
    /// --exec` warned), throttled: one warning for a batch of failures.
    pub async fn inbox_process_warns_of_handler_failures(db: &TestDb) {
        let domain = DomainService::default();
        let mut ids = Vec::new();
        for i in 0..5 {
            let e = domain
                .create_inbox_event(NewInboxEvent::new(
                    format!("m{i}"),
                    "g",
                    "s",
                    "t",
                    json!({"i": i}),
                ))
                .unwrap();
            db.store.inbox().insert(&e).await.unwrap();
            ids.push(e.id());
        }
        let r = omnibox(
            db,
            &[
                "inbox",
                "process",
                "--once",
                "--exec",
                "echo 'ledger is read-only' >&2; exit 1",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let warnings: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("event failed"))
            .collect();
        assert_eq!(warnings.len(), 1, "{}", r.stderr);
        assert!(warnings[0].contains("ledger is read-only"), "{}", r.stderr);
        assert!(warnings[0].contains("table=inbox"), "{}", r.stderr);
        assert!(warnings[0].contains("attempt=1"), "{}", r.stderr);
        for id in ids {
            let row = db.store.inbox().get(id).await.unwrap().unwrap();
            assert_eq!(
                (row.status(), row.attempts_made()),
                (EventStatus::Pending, 1)
            );
        }
    }

    /// Run summaries name failed attempts (the event stays pending:
    /// `retrying`) apart from events now `failed` (what `status` counts):
    /// `failed` in a summary's table is the latter; the JSON adds
    /// `retrying` and keeps `failed` as it was.
    pub async fn run_summaries_name_retrying_apart_from_failed(db: &TestDb) {
        let domain = DomainService::default();
        let add = |id: String, max: i32| {
            let mut n = NewInboxEvent::new(id, "g", "s", "t", json!({"a": 1}));
            n.max_attempts = Some(max);
            domain.create_inbox_event(n).unwrap()
        };
        for (i, max) in [1, 1, 6, 6, 6].into_iter().enumerate() {
            db.store
                .inbox()
                .insert(&add(format!("m{i}"), max))
                .await
                .unwrap();
        }
        let r = omnibox(
            db,
            &[
                "inbox", "process", "--once", "--exec", "exit 1", "--format", "json",
            ],
        );
        assert_eq!(r.code, 3, "{}", r.stderr);
        let v = r.json();
        assert_eq!(
            (v["retrying"].as_u64(), v["dead"].as_u64()),
            (Some(3), Some(2)),
            "{v}"
        );
        assert_eq!(v["failed"], 3, "the JSON's first name of retrying: {v}");
        assert_eq!(db.store.inbox().counts().await.unwrap().failed, 2);
        db.store.inbox().insert(&add("m5".into(), 1)).await.unwrap();
        let r = omnibox(db, &["inbox", "process", "--once", "--exec", "exit 1"]);
        let cells = summary_cells(&r.stdout);
        assert_eq!(cells["retrying"], "0", "{}", r.stdout);
        assert_eq!(cells["failed"], "1", "{}", r.stdout);
        assert!(!cells.contains_key("dead"), "{}", r.stdout);
        // publish, then consume what it wrote.
        let dir = tempfile::tempdir().unwrap();
        let file = format!("file:{}", dir.path().join("events.jsonl").display());
        for k in ["k1", "k2"] {
            db.store
                .outbox()
                .create(&new_event("t", "orders", k))
                .await
                .unwrap();
        }
        let r = omnibox(db, &["publish", "--once", "--broker", &file]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let cells = summary_cells(&r.stdout);
        assert_eq!(
            (
                cells["published"].as_str(),
                cells["retrying"].as_str(),
                cells["failed"].as_str()
            ),
            ("2", "0", "0"),
            "{}",
            r.stdout
        );
        let consume = |group: &str, json: bool| {
            let mut args = vec![
                "inbox",
                "consume",
                "--from",
                &file,
                "--once",
                "--group",
                group,
                "--max-attempts",
                "1",
                "--exec",
                "exit 1",
            ];
            if json {
                args.extend(["--format", "json"]);
            }
            omnibox(db, &args)
        };
        let r = consume("c1", true);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v = r.json();
        assert_eq!(
            (v["retrying"].as_u64(), v["dead"].as_u64()),
            (Some(0), Some(2)),
            "{v}"
        );
        assert_eq!(v["failed"], 2, "every handler failure, as before: {v}");
        let r = consume("c2", false);
        let cells = summary_cells(&r.stdout);
        assert_eq!(
            (
                cells["processed"].as_str(),
                cells["retrying"].as_str(),
                cells["failed"].as_str()
            ),
            ("0", "0", "2"),
            "{}",
            r.stdout
        );
    }

    /// `replay --pending`: a pending row waiting for its backoff (the
    /// handler or broker since fixed) is made due now, in both tables,
    /// keeping its attempts and error, with an audit row; rows never tried,
    /// rows in flight and failed rows are left alone.
    pub async fn replay_pending_makes_waiting_rows_due_now(db: &TestDb) {
        let domain = DomainService::default();
        let later = time::now() + chrono::Duration::hours(1);
        let outbox_event = |key: &str| {
            let n = NewOutboxEvent::new(
                "order",
                uuid::Uuid::now_v7(),
                "order.a",
                "t1",
                key,
                json!({"k": key}),
            );
            domain.create_outbox_event(n).unwrap()
        };
        let waiting = outbox_event("k1");
        let in_flight = outbox_event("k2");
        let mut n = NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            "order.a",
            "t1",
            "k3",
            json!({"k": 3}),
        );
        n.scheduled_at = Some(later);
        let untried = domain.create_outbox_event(n).unwrap();
        let outbox = db.store.outbox();
        outbox
            .create_many(&[waiting.clone(), in_flight.clone(), untried.clone()])
            .await
            .unwrap();
        let c = outbox
            .claim(&ClaimOptions::new(WorkerId::new("w1").unwrap(), 10))
            .await
            .unwrap();
        assert_eq!(c.events.len(), 2);
        outbox
            .fail(
                &c.token,
                &[Failure::counted(waiting.id(), "broker said no", later)],
            )
            .await
            .unwrap();
        let inbox_row = domain
            .create_inbox_event(NewInboxEvent::new(
                "m1",
                "g",
                "billing",
                "refund.issued",
                json!({"m": 1}),
            ))
            .unwrap();
        db.store.inbox().insert(&inbox_row).await.unwrap();
        let ic = db
            .store
            .inbox()
            .claim(&ClaimOptions::new(WorkerId::new("p1").unwrap(), 10))
            .await
            .unwrap();
        db.store
            .inbox()
            .fail(
                &ic.token,
                &[Failure::counted(
                    inbox_row.id(),
                    "ledger is read-only",
                    later,
                )],
            )
            .await
            .unwrap();
        // Not failed: plain replay refuses it and says what to use.
        let wid = waiting.id().to_string();
        let r = omnibox(db, &["replay", "--id", &wid, "--yes"]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(r.stderr.contains("--pending"), "{}", r.stderr);
        let r = omnibox(
            db,
            &[
                "replay",
                "--pending",
                "--table",
                "dead-letters",
                "--all",
                "--yes",
            ],
        );
        assert_eq!(r.code, 2, "{}", r.stderr);
        let r = omnibox(
            db,
            &[
                "replay",
                "--pending",
                "--all",
                "--dry-run",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let mut picked: Vec<String> = r.json()["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        picked.sort();
        let mut expected = vec![wid.clone(), inbox_row.id().to_string()];
        expected.sort();
        assert_eq!(picked, expected, "{}", r.stdout);
        assert!(
            outbox
                .get(waiting.id())
                .await
                .unwrap()
                .unwrap()
                .scheduled_at()
                > time::now()
        );
        let r = omnibox(
            db,
            &[
                "replay",
                "--pending",
                "--all",
                "--reason",
                "broker fixed",
                "--yes",
                "--format",
                "json",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v = r.json();
        assert_eq!(
            (v["replayed"].as_u64(), v["pending"].as_bool()),
            (Some(2), Some(true)),
            "{v}"
        );
        let now = time::now();
        let row = outbox.get(waiting.id()).await.unwrap().unwrap();
        assert_eq!(row.status(), EventStatus::Pending);
        assert!(row.scheduled_at() <= now, "due now");
        assert_eq!(
            (row.attempts_made(), row.last_error()),
            (1, Some("broker said no"))
        );
        let row = db.store.inbox().get(inbox_row.id()).await.unwrap().unwrap();
        assert!(row.scheduled_at() <= now, "due now");
        assert_eq!(
            (row.attempts_made(), row.last_error()),
            (1, Some("ledger is read-only"))
        );
        let row = outbox.get(untried.id()).await.unwrap().unwrap();
        assert_eq!(
            row.scheduled_at(),
            untried.scheduled_at(),
            "a row never tried keeps its time"
        );
        assert!(
            outbox
                .get(in_flight.id())
                .await
                .unwrap()
                .unwrap()
                .is_locked()
        );
        // A relay takes it now.
        let c = outbox
            .claim(&ClaimOptions::new(WorkerId::new("w2").unwrap(), 10))
            .await
            .unwrap();
        assert_eq!(
            c.events.iter().map(|e| e.id()).collect::<Vec<_>>(),
            vec![waiting.id()]
        );
        let audit = omnibox(
            db,
            &["audit", "--action", "replay-pending", "--format", "json"],
        );
        let entries = audit.json()["entries"].as_array().unwrap().clone();
        assert_eq!(entries.len(), 2, "one per table: {}", audit.stdout);
        assert!(entries.iter().all(|e| e["reason"] == "broker fixed"));
        // Nothing waits any more.
        let r = omnibox(db, &["replay", "--pending", "--all", "--yes"]);
        assert_eq!(r.code, 1, "{}", r.stderr);
    }

    /// `unlock` keeps the row's real `last_error` (it used to overwrite it
    /// with "Force unlock: ..."); the reason is in the audit row. A row
    /// without an error still gets the reason, as before.
    pub async fn unlock_keeps_the_rows_error(db: &TestDb) {
        let domain = DomainService::default();
        let outbox = db.store.outbox();
        let n = NewOutboxEvent::new(
            "order",
            uuid::Uuid::now_v7(),
            "order.a",
            "t1",
            "k1",
            json!({"k": 1}),
        );
        let e = domain.create_outbox_event(n).unwrap();
        outbox.create(&e).await.unwrap();
        let c = outbox
            .claim(&ClaimOptions::new(WorkerId::new("relay-1").unwrap(), 1))
            .await
            .unwrap();
        outbox
            .fail(
                &c.token,
                &[Failure::counted(
                    e.id(),
                    "broker rejected the record: too large",
                    time::now(),
                )],
            )
            .await
            .unwrap();
        outbox
            .claim(&ClaimOptions::new(WorkerId::new("relay-2").unwrap(), 1))
            .await
            .unwrap();
        let id = e.id().to_string();
        let r = omnibox(
            db,
            &["unlock", &id, "--reason", "relay-2 was OOM-killed", "--yes"],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let row = outbox.get(e.id()).await.unwrap().unwrap();
        assert!(!row.is_locked());
        assert_eq!(
            row.last_error(),
            Some("broker rejected the record: too large")
        );
        let audit = omnibox(db, &["audit", "--id", &id, "--format", "json"]).json();
        assert_eq!(audit["entries"][0]["action"], "unlock");
        assert_eq!(audit["entries"][0]["reason"], "relay-2 was OOM-killed");
        // By worker, an inbox row with an error and an outbox row without.
        let i = domain
            .create_inbox_event(NewInboxEvent::new("m1", "g", "s", "t", json!({"m": 1})))
            .unwrap();
        db.store.inbox().insert(&i).await.unwrap();
        let ic = db
            .store
            .inbox()
            .claim(&ClaimOptions::new(WorkerId::new("p-1").unwrap(), 1))
            .await
            .unwrap();
        db.store
            .inbox()
            .fail(
                &ic.token,
                &[Failure::counted(i.id(), "ledger is read-only", time::now())],
            )
            .await
            .unwrap();
        db.store
            .inbox()
            .claim(&ClaimOptions::new(WorkerId::new("host-9:1").unwrap(), 1))
            .await
            .unwrap();
        let fresh = new_event("t", "t2", "k2");
        outbox.create(&fresh).await.unwrap();
        outbox
            .claim(&ClaimOptions::new(WorkerId::new("host-9:1").unwrap(), 10))
            .await
            .unwrap();
        let r = omnibox(
            db,
            &[
                "unlock",
                "--worker",
                "host-9:1",
                "--reason",
                "host-9 gone",
                "--yes",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let row = db.store.inbox().get(i.id()).await.unwrap().unwrap();
        assert_eq!(
            (row.is_locked(), row.last_error()),
            (false, Some("ledger is read-only"))
        );
        let row = outbox.get(fresh.id()).await.unwrap().unwrap();
        assert_eq!(
            (row.is_locked(), row.last_error()),
            (false, Some("Force unlock: host-9 gone"))
        );
    }
}

backend_tests!(
    commands_cover_both_tables_by_default,
    unlock_keeps_the_rows_error,
    replay_pending_makes_waiting_rows_due_now,
    run_summaries_name_retrying_apart_from_failed,
    inbox_process_warns_of_handler_failures,
    consumer_groups_select_inbox_rows,
    doctor_finds_what_is_wrong,
    migrate_and_doctor_compare_records_with_objects,
    print_sql_records_its_versions,
    server_errors_read_as_their_message_once,
    dead_letters_are_kept_listed_and_replayed,
    letters_follow_their_rows,
    a_letter_replay_and_a_requeue_at_once,
    concurrent_replays_take_each_letter_once,
    dead_letter_puts_are_idempotent_and_bad_copies_change_nothing,
    audit_is_validated_first_and_atomic,
    failures_count_every_row_and_cleanup_trims_the_audit,
    replay_by_each_selector,
    dry_runs_change_nothing,
    refusals_exit_2_and_change_nothing,
    unlock_fences_the_old_owner,
    stale_locks_are_released,
    cleanup_is_bounded_and_guards_the_inbox,
    two_cleanups_at_once_delete_each_row_once,
    status_checks_exit_1_over_a_threshold,
);

/// Eight `migrate` runs at once on a fresh schema: none fails (the schema
/// is created under the migration lock: two sessions running `CREATE SCHEMA
/// IF NOT EXISTS` at once make one fail on pg_namespace's unique index),
/// between them every migration is applied once, and each reports only what
/// it applied (the versions are read under the lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_report_what_each_applied() {
    use omnibox::store::{PgStore, postgres::PgOptions};
    let Some(db) = common::postgres().await else {
        return;
    };
    let schema = format!("m_{}", uuid::Uuid::new_v4().simple());
    let opts = PgOptions {
        schema: Some(schema.clone()),
        max_connections: 1,
        ..PgOptions::default()
    };
    let mut runs = Vec::new();
    for _ in 0..8 {
        let store = PgStore::connect(&db.url, &opts).await.unwrap();
        runs.push(tokio::spawn(async move { store.migrate().await.unwrap() }));
    }
    let mut applied = Vec::new();
    for r in runs {
        applied.extend(r.await.unwrap().applied.into_iter().map(|m| m.version));
    }
    applied.sort();
    let all: Vec<i64> = PgStore::migrations().iter().map(|m| m.version).collect();
    assert_eq!(applied, all, "each migration reported once in all");
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await
        .unwrap();
}

/// `doctor`'s table health on PostgreSQL: a table with autovacuum disabled
/// says so and gives the RESET that fixes it (not scale factors, which
/// would not help), and a small table far past autovacuum's trigger point
/// is not `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_sees_dead_rows_and_disabled_autovacuum() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let omnibox::AnyStore::Postgres(pg) = &db.store else {
        panic!("a PostgreSQL store");
    };
    db.store
        .outbox()
        .create_many(&keyed_events(3000))
        .await
        .unwrap();
    let mut conn = pg.pool().acquire().await.unwrap();
    for sql in [
        "ALTER TABLE outbox_events SET (autovacuum_enabled = false)",
        "ALTER TABLE inbox_events SET (autovacuum_enabled = false)",
        "DELETE FROM outbox_events WHERE partition_key <> 'k1'",
        "SELECT pg_stat_force_next_flush()",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    drop(conn);
    let r = omnibox(&db, &["doctor", "--format", "json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|_| panic!("{}", r.stderr));
    let check = |name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name}: {v}"))
            .clone()
    };
    let outbox = check("outbox table");
    assert_eq!(outbox["status"], "warn", "{outbox}");
    assert!(
        outbox["message"]
            .as_str()
            .unwrap()
            .contains("autovacuum is disabled"),
        "{outbox}"
    );
    assert!(
        outbox["hint"]
            .as_str()
            .unwrap()
            .contains("RESET (autovacuum_enabled)"),
        "{outbox}"
    );
    // Re-enabled, the same dead rows: autovacuum is behind.
    sqlx::query("ALTER TABLE outbox_events RESET (autovacuum_enabled)")
        .execute(pg.pool())
        .await
        .unwrap();
    let r = omnibox(&db, &["doctor", "--format", "json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let outbox = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "outbox table")
        .unwrap()
        .clone();
    assert_eq!(outbox["status"], "warn", "{outbox}");
    assert!(
        outbox["message"].as_str().unwrap().contains("behind"),
        "{outbox}"
    );
    let stats = check("statistics");
    assert!(
        !stats["message"]
            .as_str()
            .unwrap()
            .contains("since its last ANALYZE")
            || !stats["message"].as_str().unwrap().contains("never"),
        "{stats}"
    );
}

/// A small, healthy, analyzed outbox is read whole by the planner, rightly:
/// `doctor` does not cry wolf about the claim's plan there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_accepts_a_small_outbox_read_whole() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let omnibox::AnyStore::Postgres(pg) = &db.store else {
        panic!("a PostgreSQL store");
    };
    db.store
        .outbox()
        .create_many(&keyed_events(22))
        .await
        .unwrap();
    sqlx::query("VACUUM ANALYZE outbox_events")
        .execute(pg.pool())
        .await
        .unwrap();
    let r = omnibox(&db, &["doctor", "--format", "json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|_| panic!("{}", r.stderr));
    let plan = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "claim plan")
        .unwrap()
        .clone();
    assert_eq!(plan["status"], "ok", "{plan}");
}

/// `n` outbox events, each of its own key.
fn keyed_events(n: usize) -> Vec<OutboxEvent> {
    let domain = DomainService::default();
    (0..n)
        .map(|i| {
            domain
                .create_outbox_event(NewOutboxEvent::new(
                    "order",
                    uuid::Uuid::now_v7(),
                    "order.created",
                    "orders",
                    format!("k{i}"),
                    json!({"n": i}),
                ))
                .unwrap()
        })
        .collect()
}
