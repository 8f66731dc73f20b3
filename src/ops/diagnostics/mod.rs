//! What `omnibox doctor` checks in a database, one finding per check with
//! what to do: the schema and its indexes, the claim's plan, the
//! planner's statistics, expired leases, keys blocked behind a failing
//! head, the backlog, the inbox's retention against the deduplication
//! window, and (PostgreSQL) the tables' size and autovacuum. Read-only.
//! The backends answer the questions (`store::diagnostics`); this module
//! judges the answers.

use std::time::Duration;

use serde::Serialize;

use crate::redact;
use crate::store::{AnyStore, SchemaState};

mod checks;

use checks::{
    backlog_check, blocked_check, health_checks, leases_check, partitions_check, plan_check,
    retention_check, slots_check, statistics_check,
};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Nothing to do.
    Ok,
    /// Worth a look; nothing is broken yet.
    Warn,
    /// Broken: relays or consumers fail, or will.
    Fail,
    /// Not run: something it needs failed (said in its message).
    Skip,
}

/// One check's finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The check's name (`schema`, `claim plan`, ...).
    pub check: &'static str,
    /// Its outcome.
    pub status: Level,
    /// What it found.
    pub message: String,
    /// What to do, for a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    /// A check that passed.
    pub fn ok(check: &'static str, message: impl Into<String>) -> Check {
        Check {
            check,
            status: Level::Ok,
            message: message.into(),
            hint: None,
        }
    }

    /// A check that did not run, and why.
    pub fn skip(check: &'static str, message: impl Into<String>) -> Check {
        Check {
            check,
            status: Level::Skip,
            message: message.into(),
            hint: None,
        }
    }

    /// A warning, with what to do.
    pub fn warn(check: &'static str, message: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            check,
            status: Level::Warn,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// A failure, with what to do.
    pub fn fail(check: &'static str, message: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            check,
            status: Level::Fail,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// A check that could not read what it needs (`error`, redacted).
    pub fn error(check: &'static str, error: &impl std::fmt::Display) -> Check {
        Check::fail(
            check,
            format!("could not check: {}", redact::text(&error.to_string())),
            "see the error; the database user may lack a privilege",
        )
    }
}

/// The limits the database checks judge by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// The backlog check warns when the oldest due pending row is older.
    pub max_pending_age: Duration,
    /// The inbox's deduplication window, which an inbox cleanup's
    /// retention must not undercut.
    pub dedup_window: Duration,
}

/// The names of the checks [`database`] runs after the schema's (the last
/// four on PostgreSQL only).
const AFTER_SCHEMA: [&str; 11] = [
    "indexes",
    "claim plan",
    "statistics",
    "leases",
    "blocked",
    "backlog",
    "retention",
    "outbox table",
    "inbox table",
    "replication slots",
    "partitions",
];

/// Every database check on `store`, in order. Each runs whatever failed
/// before it (one that cannot run says why), so one call lists every
/// problem.
pub async fn database(store: &AnyStore, thresholds: &Thresholds) -> Vec<Check> {
    let mut checks = Vec::new();
    let state = store.schema_state().await;
    let (schema, tables) = schema_check(&state);
    let pg = matches!(store, AnyStore::Postgres(_));
    checks.push(schema);
    if !tables {
        checks.extend(skipped_after_schema("no omnibox tables (see schema)", pg));
        return checks;
    }
    checks.push(indexes_check(&state));
    checks.push(plan_check(store).await);
    checks.push(statistics_check(store).await);
    checks.push(leases_check(store).await);
    checks.push(blocked_check(store).await);
    checks.push(backlog_check(store, thresholds.max_pending_age).await);
    checks.push(retention_check(store, thresholds.dedup_window).await);
    if pg {
        checks.extend(health_checks(store).await);
        checks.push(slots_check(store).await);
        checks.push(partitions_check(store).await);
    }
    checks
}

/// The database checks, each skipped because `why` (no connection): the
/// schema's and those after it (`postgres`: the tables' health too).
pub fn not_checked(why: &str, postgres: bool) -> Vec<Check> {
    let mut checks = vec![Check::skip("schema", format!("not checked: {why}"))];
    checks.extend(skipped_after_schema(why, postgres));
    checks
}

fn skipped_after_schema(why: &str, postgres: bool) -> Vec<Check> {
    let n = if postgres { 11 } else { 7 };
    AFTER_SCHEMA[..n]
        .iter()
        .map(|name| Check::skip(name, format!("not checked: {why}")))
        .collect()
}

/// The schema's check, and whether the outbox table is there to check
/// further. The recorded versions are compared with the objects each
/// migration creates, so a deleted record or a half-applied migration shows
/// here, not as `migrate` failing on "already exists".
fn schema_check(state: &std::result::Result<SchemaState, crate::Error>) -> (Check, bool) {
    let state = match state {
        // When it cannot be told, the other checks run and say what they meet.
        Err(e) => return (Check::error("schema", e), true),
        Ok(s) => s,
    };
    let exists = state.has_tables();
    let (current, latest) = (state.version(), state.latest);
    let problems = state.problems();
    let pending: Vec<String> = state
        .migrations
        .iter()
        .filter(|m| !m.recorded && m.present.is_empty())
        .map(|m| m.version.to_string())
        .collect();
    let check = if !exists && state.recorded.is_empty() {
        Check::fail(
            "schema",
            "no omnibox tables here",
            "run `omnibox migrate` (and check --schema / OMNIBOX_DATABASE_SCHEMA)",
        )
    } else if !problems.is_empty() {
        let mut hints: Vec<&str> = Vec::new();
        for p in &problems {
            if !hints.contains(&p.hint.as_str()) {
                hints.push(&p.hint);
            }
        }
        let mut message: Vec<String> = problems.iter().map(|p| p.message.clone()).collect();
        if !pending.is_empty() {
            message.push(format!("not applied: {}", pending.join(", ")));
        }
        Check::fail("schema", message.join("; "), hints.join("; "))
    } else if !pending.is_empty() {
        let what = if current == 0 {
            format!("no migration applied, this omnibox needs {latest}")
        } else if pending.len() == 1 && current < latest {
            format!("at version {current}, this omnibox needs {latest}")
        } else {
            format!(
                "at version {current}; not applied: {} (this omnibox needs {latest})",
                pending.join(", ")
            )
        };
        Check::fail(
            "schema",
            what,
            "run `omnibox migrate` before starting relays of this version",
        )
    } else if current > latest {
        Check::warn(
            "schema",
            format!("at version {current}, newer than this omnibox ({latest})"),
            "upgrade this binary to the version that migrated the database",
        )
    } else {
        Check::ok(
            "schema",
            format!("at version {current}, as this omnibox expects"),
        )
    };
    (check, exists)
}

fn indexes_check(state: &std::result::Result<SchemaState, crate::Error>) -> Check {
    match state {
        Err(e) => Check::error("indexes", e),
        Ok(state) => {
            let missing = state.missing_indexes();
            if missing.is_empty() {
                Check::ok("indexes", format!("all {} present", state.indexes.len()))
            } else {
                Check::fail(
                    "indexes",
                    format!("missing: {}", missing.join(", ")),
                    "run `omnibox migrate`; if it says up to date, someone dropped them: `omnibox migrate --print-sql` has their definitions",
                )
            }
        }
    }
}
