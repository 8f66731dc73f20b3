//! `omnibox doctor`: checks what an on-call engineer would check, one line
//! each, with what to do.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::store::{AnyStore, SchemaState};
use serde::Serialize;
use serde_json::json;

use super::output::{self, Format};
use super::{Context, ExitStatus, args};

mod broker;
mod database;

use broker::broker_check;
use database::{
    backlog_check, blocked_check, health_checks, leases_check, plan_check, retention_check,
    statistics_check,
};

/// Check the database, the claim's indexes and plan, statistics, the broker,
/// leases, blocked keys, the backlog, retention and table health
///
/// One line per check: ok, warn, FAIL or skip, with what to do. Every check
/// runs whatever failed before it (one that cannot run says why), so one
/// run lists every problem. Exit 1 when a check fails (warnings do not
/// change the exit code). Read-only: it changes nothing, and never creates
/// a database (a missing SQLite file is a failed check).
///
/// Examples:
///   omnibox doctor
///   omnibox doctor --format json
///   omnibox doctor --broker kafka://127.0.0.1:9092 --max-pending-age 2m
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct DoctorArgs {
    /// Check this broker [default: the configured broker (OMNIBOX_BROKER, broker in omnibox.toml)]
    #[arg(long, value_name = "URL", env = super::env::BROKER, hide_env_values = true)]
    broker: Option<String>,
    /// Warn when the oldest due pending event is older than this
    #[arg(long, allow_hyphen_values = true, default_value = "5m", value_parser = args::duration, value_name = "DURATION")]
    max_pending_age: Duration,
    /// A librdkafka property for the broker check (repeatable)
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = args::property)]
    properties: Vec<(String, String)>,
    #[command(flatten)]
    kafka_security: super::kafka_security::KafkaSecurityArgs,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
    /// Not run: something it needs failed (said in its message).
    Skip,
}

#[derive(Debug, Clone, Serialize)]
struct Check {
    check: &'static str,
    status: Level,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

fn ok(check: &'static str, message: impl Into<String>) -> Check {
    Check {
        check,
        status: Level::Ok,
        message: message.into(),
        hint: None,
    }
}

fn skip(check: &'static str, message: impl Into<String>) -> Check {
    Check {
        check,
        status: Level::Skip,
        message: message.into(),
        hint: None,
    }
}

fn warn(check: &'static str, message: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        check,
        status: Level::Warn,
        message: message.into(),
        hint: Some(hint.into()),
    }
}

fn fail(check: &'static str, message: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        check,
        status: Level::Fail,
        message: message.into(),
        hint: Some(hint.into()),
    }
}

pub async fn run(args: DoctorArgs, ctx: &Context) -> Result<ExitStatus> {
    let mut checks = Vec::new();
    let missing = missing_sqlite_file(&ctx.settings.database_url);
    let connected = match &missing {
        // Never create a database: a missing SQLite file is a finding.
        Some(path) => Err(anyhow::anyhow!(
            "no SQLite database at {} (doctor creates nothing)",
            path.display()
        )),
        None => ctx.connect().await,
    };
    let store = match connected {
        Ok(s) => {
            checks.push(ok(
                "database",
                format!(
                    "reachable ({})",
                    omnibox::redact::url(&ctx.settings.database_url)
                ),
            ));
            Some(s)
        }
        Err(e) => {
            checks.push(fail(
                "database",
                format!(
                    "cannot connect: {}",
                    omnibox::redact::text(&super::chain_text(&e))
                ),
                if missing.is_some() {
                    "check --database-url / OMNIBOX_DATABASE_URL and the working directory; `omnibox migrate` creates it"
                } else {
                    "check --database-url / OMNIBOX_DATABASE_URL and that the server is up"
                },
            ));
            None
        }
    };
    // Every check runs, whatever failed before it, so that one run lists
    // every problem; a check that cannot run says why.
    let skipped = |why: &str, checks: &mut Vec<Check>, pg: bool| {
        let mut names = vec![
            "indexes",
            "claim plan",
            "statistics",
            "leases",
            "blocked",
            "backlog",
            "retention",
        ];
        if pg {
            names.extend(["outbox table", "inbox table"]);
        }
        for name in names {
            checks.push(skip(name, format!("not checked: {why}")));
        }
    };
    match &store {
        Some(store) => {
            let state = store.schema_state().await;
            let (schema, tables) = schema_check(&state);
            let pg = matches!(store, AnyStore::Postgres(_));
            checks.push(schema);
            if !tables {
                skipped("no omnibox tables (see schema)", &mut checks, pg);
            } else {
                checks.push(indexes_check(&state));
                checks.push(plan_check(store).await);
                checks.push(statistics_check(store).await);
                checks.push(leases_check(store).await);
                checks.push(blocked_check(store).await);
                checks.push(backlog_check(store, args.max_pending_age).await);
                checks.push(retention_check(store, ctx).await);
                if pg {
                    checks.extend(health_checks(store).await);
                }
            }
        }
        None => {
            checks.push(skip("schema", "not checked: no database connection"));
            let pg = ctx.settings.database_url.starts_with("postgres");
            skipped("no database connection", &mut checks, pg);
        }
    }
    checks.push(broker_check(store.as_ref(), &args, ctx).await);
    let failed = checks.iter().any(|c| c.status == Level::Fail);
    match ctx.format() {
        Format::Json => output::json(&json!({ "ok": !failed, "checks": checks }))?,
        Format::Table => {
            for c in &checks {
                let level = match c.status {
                    Level::Ok => "ok  ",
                    Level::Warn => "warn",
                    Level::Fail => "FAIL",
                    Level::Skip => "skip",
                };
                output::line(format!("{level} {:<11} {}", c.check, c.message))?;
                if let Some(h) = &c.hint {
                    output::line(format!("     {:<11} -> {h}", ""))?;
                }
            }
        }
    }
    Ok(if failed {
        ExitStatus::No
    } else {
        ExitStatus::Success
    })
}

/// The file of an SQLite URL that names a file not there (None for
/// PostgreSQL, an in-memory database, or a URL the connection will judge).
fn missing_sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    use std::str::FromStr;
    if !url.starts_with("sqlite:") {
        return None;
    }
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
    let path = opts.get_filename();
    let name = path.to_string_lossy();
    if name.is_empty() || name == ":memory:" || url.contains("mode=memory") {
        return None;
    }
    (!path.exists()).then(|| path.to_path_buf())
}

fn err_check<E: std::error::Error + 'static>(check: &'static str, e: &E) -> Check {
    fail(
        check,
        format!(
            "could not check: {}",
            omnibox::redact::text(&super::cause_text(e))
        ),
        "see the error; the database user may lack a privilege",
    )
}

/// The schema's check, and whether the outbox table is there to check
/// further. The recorded versions are compared with the objects each
/// migration creates, so a deleted record or a half-applied migration shows
/// here, not as `migrate` failing on "already exists".
fn schema_check(state: &std::result::Result<SchemaState, omnibox::Error>) -> (Check, bool) {
    let state = match state {
        // When it cannot be told, the other checks run and say what they meet.
        Err(e) => return (err_check("schema", e), true),
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
        fail(
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
        fail("schema", message.join("; "), hints.join("; "))
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
        fail(
            "schema",
            what,
            "run `omnibox migrate` before starting relays of this version",
        )
    } else if current > latest {
        warn(
            "schema",
            format!("at version {current}, newer than this omnibox ({latest})"),
            "upgrade this binary to the version that migrated the database",
        )
    } else {
        ok(
            "schema",
            format!("at version {current}, as this omnibox expects"),
        )
    };
    (check, exists)
}

fn indexes_check(state: &std::result::Result<SchemaState, omnibox::Error>) -> Check {
    match state {
        Err(e) => err_check("indexes", e),
        Ok(state) => {
            let missing = state.missing_indexes();
            if missing.is_empty() {
                ok("indexes", format!("all {} present", state.indexes.len()))
            } else {
                fail(
                    "indexes",
                    format!("missing: {}", missing.join(", ")),
                    "run `omnibox migrate`; if it says up to date, someone dropped them: `omnibox migrate --print-sql` has their definitions",
                )
            }
        }
    }
}
