//! `omnibox partitions`: list the partitions of partitioned tables, and
//! create those missing ahead.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use omnibox::store::postgres::PgStore;
use omnibox::store::{AnyStore, Backend};
use serde_json::json;

use super::output::{self, Format};
use super::{Context, ExitStatus, UsageError, args};

/// List the partitions of the outbox and inbox, or create those missing
///
/// Tables partitioned by `omnibox migrate --partitioned` need partitions
/// ready before rows arrive: an insert whose created_at has no partition
/// fails. Every `publish`, `inbox process` and `inbox consume` creates the
/// missing ones when it starts and every 10 minutes while it runs; `create`
/// does it from cron too. `omnibox cleanup` drops partitions past retention.
///
/// Examples:
///   omnibox partitions
///   omnibox partitions create
///   omnibox partitions create --from 2026-11-01
///   # crontab: 7 * * * * omnibox partitions create --quiet
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct PartitionsArgs {
    #[command(subcommand)]
    command: Option<PartitionsCommand>,
}

#[derive(Debug, Subcommand)]
enum PartitionsCommand {
    /// List the partitions (the default)
    List,
    /// Create the partitions missing from the current one to the
    /// partitions kept ahead
    Create(CreateArgs),
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Also create the partitions from the one holding this date (UTC:
    /// 2026-11-01 or 2026-11-01T13:00:00Z) on, for rows written with an
    /// older created_at (an event replayed from its dead letter keeps its own)
    #[arg(long, value_parser = past_time, value_name = "DATE")]
    from: Option<chrono::DateTime<chrono::Utc>>,
    /// Wait this long at most for the table's lock (creating a partition
    /// locks the table for a moment)
    #[arg(long, default_value = "5s", value_parser = args::duration, value_name = "DURATION")]
    lock_timeout: Duration,
}

async fn postgres(ctx: &Context) -> Result<PgStore> {
    if Backend::from_url(&ctx.settings.database_url)? != Backend::Postgres {
        return Err(UsageError(
            "partitioned tables need PostgreSQL (this database is SQLite)".into(),
        )
        .into());
    }
    match ctx.store().await? {
        AnyStore::Postgres(pg) => Ok(pg),
        _ => Err(
            UsageError("partitioned tables need PostgreSQL (this database is SQLite)".into())
                .into(),
        ),
    }
}

pub async fn run(args: PartitionsArgs, ctx: &Context) -> Result<ExitStatus> {
    let pg = postgres(ctx).await?;
    if pg.partitioning().await?.is_empty() {
        let text = "neither table is partitioned: omnibox migrate --partitioned makes them so";
        match ctx.format() {
            Format::Json => output::json(&json!({"partitioned": [], "partitions": []}))?,
            Format::Table => output::line(text)?,
        }
        return Ok(ExitStatus::Success);
    }
    match args.command.unwrap_or(PartitionsCommand::List) {
        PartitionsCommand::List => list(&pg, ctx).await,
        PartitionsCommand::Create(a) => {
            let created = pg.ensure_partitions_from(a.from, a.lock_timeout).await?;
            match ctx.format() {
                Format::Json => output::json(&json!({"created": created}))?,
                Format::Table if created.is_empty() => {
                    output::line("Every partition ahead exists; nothing created.")?
                }
                Format::Table => {
                    for name in &created {
                        output::line(format!("Created partition {name}."))?;
                    }
                }
            }
            Ok(ExitStatus::Success)
        }
    }
}

async fn list(pg: &PgStore, ctx: &Context) -> Result<ExitStatus> {
    let settings = pg.partitioning().await?;
    let parts = pg.partitions().await?;
    match ctx.format() {
        Format::Json => output::json(&json!({"partitioned": settings, "partitions": parts}))?,
        Format::Table => {
            for s in &settings {
                output::line(format!(
                    "{}: one partition per {}, {} kept ahead",
                    s.table, s.period, s.ahead
                ))?;
            }
            let mut t = output::table(["table", "partition", "from", "to", "rows (est.)", "size"]);
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or_else(
                    || "-".to_string(),
                    |t| t.format("%Y-%m-%d %H:%M").to_string(),
                )
            };
            for p in &parts {
                t.add_row(vec![
                    p.table.clone(),
                    p.name.clone(),
                    if p.from.is_some() {
                        time(p.from)
                    } else {
                        p.bound.clone()
                    },
                    time(p.to),
                    p.rows_estimate.to_string(),
                    size(p.bytes),
                ]);
            }
            output::line(t)?;
        }
    }
    Ok(ExitStatus::Success)
}

/// A size for people: 8 KiB, 1.5 MiB, 2.0 GiB.
fn size(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let n = n as f64;
    if n < KIB * KIB {
        format!("{:.0} KiB", n / KIB)
    } else if n < KIB * KIB * KIB {
        format!("{:.1} MiB", n / (KIB * KIB))
    } else {
        format!("{:.1} GiB", n / (KIB * KIB * KIB))
    }
}

/// `--from`: a date (midnight UTC) or an RFC 3339 time.
fn past_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    use chrono::Datelike;
    let time = match chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        Ok(day) => day.and_time(chrono::NaiveTime::MIN).and_utc(),
        Err(_) => chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|_| {
                format!("{text:?} is not a date: write 2026-11-01 or 2026-11-01T13:00:00Z")
            })?,
    };
    if !(1970..=9999).contains(&time.year()) {
        return Err(format!("{text:?}: give a date from 1970 to 9999"));
    }
    Ok(time)
}
