//! `omnibox doctor`: checks what an on-call engineer would check, one line
//! each, with what to do.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::output::{self, Format};
use super::{Context, ExitStatus, args};

mod broker;

use broker::broker_check;
use omnibox::ops::diagnostics::{self, Check, Level, Thresholds};

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
            checks.push(Check::ok(
                "database",
                format!(
                    "reachable ({})",
                    omnibox::redact::url(&ctx.settings.database_url)
                ),
            ));
            Some(s)
        }
        Err(e) => {
            checks.push(Check::fail(
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
    match &store {
        Some(store) => {
            let thresholds = Thresholds {
                max_pending_age: args.max_pending_age,
                dedup_window: ctx.settings.dedup_window,
            };
            checks.extend(diagnostics::database(store, &thresholds).await);
        }
        None => {
            let pg = ctx.settings.database_url.starts_with("postgres");
            checks.extend(diagnostics::not_checked("no database connection", pg));
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
