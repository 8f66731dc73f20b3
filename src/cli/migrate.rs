//! `omnibox migrate`: create or upgrade the schema.

use anyhow::Result;
use clap::Args;
use omnibox::store::postgres::partition::{PartitionOptions, Period};
use omnibox::store::{AnyStore, Backend};
use serde_json::json;

use super::output::{self, Format};
use super::{Context, ExitStatus, UsageError};

/// Create or upgrade the outbox and inbox tables (idempotent)
///
/// Applies the migrations this binary carries, in order, recording them in
/// the table omnibox_migrations. Safe to run concurrently and repeatedly.
/// A migration whose objects all exist but that is not recorded (its row
/// deleted, or DDL applied by hand) is recorded without running it again; one
/// partly applied is refused (exit 2, nothing changed) with what is missing.
/// --print-sql prints the DDL with the rows that record it, for your own
/// migration tool.
///
/// --partitioned (PostgreSQL) then makes the outbox and inbox
/// range-partitioned by created_at, one partition per --partition-period,
/// --partitions-ahead of them ready; `omnibox cleanup` then drops whole
/// partitions. A plain table's rows are copied in one transaction under a
/// write lock (refused above a million rows without --force). Running it
/// again creates missing partitions and updates --partitions-ahead. See
/// docs/partitioning.md.
///
/// Examples:
///   omnibox migrate
///   omnibox migrate --partitioned --partition-period day --partitions-ahead 7
///   omnibox migrate --database-url postgres://app:secret@db/app --schema omnibox
///   omnibox migrate --print-sql --database-url postgres://x > omnibox.sql
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct MigrateArgs {
    /// Print the DDL for the database URL's backend instead of applying it
    /// (no connection is made)
    #[arg(long, conflicts_with = "partitioned")]
    print_sql: bool,
    /// Partition the outbox and inbox by created_at (PostgreSQL)
    #[arg(long)]
    partitioned: bool,
    /// With --partitioned: the range of one partition
    #[arg(
        long,
        value_enum,
        default_value = "day",
        requires = "partitioned",
        value_name = "PERIOD"
    )]
    partition_period: PeriodArg,
    /// With --partitioned: partitions kept ready past the current one
    #[arg(long, default_value_t = 2, requires = "partitioned", value_parser = clap::value_parser!(u32).range(1..=1000))]
    partitions_ahead: u32,
    /// With --partitioned: convert tables of any size (their rows are
    /// copied under a write lock)
    #[arg(long, requires = "partitioned")]
    force: bool,
}

/// `--partition-period`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PeriodArg {
    /// One partition per hour (UTC)
    Hour,
    /// One partition per day (UTC)
    Day,
    /// One partition per week, from Monday (UTC)
    Week,
}

impl From<PeriodArg> for Period {
    fn from(p: PeriodArg) -> Self {
        match p {
            PeriodArg::Hour => Period::Hour,
            PeriodArg::Day => Period::Day,
            PeriodArg::Week => Period::Week,
        }
    }
}

pub async fn run(args: MigrateArgs, ctx: &Context) -> Result<ExitStatus> {
    if args.print_sql {
        let backend = Backend::from_url(&ctx.settings.database_url)?;
        let scripts = backend.migrations();
        match ctx.format() {
            Format::Json => output::json(&json!({
                "backend": backend.as_str(),
                "migrations_table_sql": backend.migrations_table_sql(),
                "migrations": scripts,
            }))?,
            Format::Table => {
                output::line(format!(
                    "-- omnibox schema for {} (version {}): each migration, then the row that\n\
                     -- records it, so that `omnibox migrate` and every command see it applied.\n\
                     -- Apply it whole, in one transaction (psql: -1 -v ON_ERROR_STOP=1).\n{}",
                    backend.as_str(),
                    scripts.iter().map(|s| s.version).max().unwrap_or(0),
                    backend.migrations_table_sql()
                ))?;
                for s in scripts {
                    output::line(format!(
                        "\n-- omnibox migration {}: {}\n{}\n{}",
                        s.version,
                        s.description,
                        s.sql.trim_end(),
                        s.record_sql
                    ))?;
                }
            }
        }
        return Ok(ExitStatus::Success);
    }
    if args.partitioned && Backend::from_url(&ctx.settings.database_url)? != Backend::Postgres {
        return Err(UsageError(
            "--partitioned needs PostgreSQL (SQLite has no partitioned tables)".into(),
        )
        .into());
    }
    let store = ctx.connect().await?;
    let options = PartitionOptions {
        period: args.partition_period.into(),
        ahead: args.partitions_ahead,
        copy_limit: (!args.force).then_some(1_000_000),
    };
    if let (AnyStore::Postgres(pg), true) = (&store, args.partitioned) {
        // Refused before anything changes.
        pg.check_partitioning(&options).await?;
    }
    let report = store.migrate().await?;
    let partitioned = match (&store, args.partitioned) {
        (AnyStore::Postgres(pg), true) => Some(pg.partition_tables(&options).await?),
        _ => None,
    };
    match ctx.format() {
        Format::Json => {
            let mut value = serde_json::to_value(&report)?;
            if let (Some(p), Some(obj)) = (&partitioned, value.as_object_mut()) {
                obj.insert("partitioned".into(), serde_json::to_value(p)?);
            }
            output::json(&value)?
        }
        Format::Table => {
            if report.applied.is_empty() && report.recorded.is_empty() {
                output::line(format!(
                    "Schema is up to date (version {}).",
                    report.version
                ))?;
            }
            for m in &report.recorded {
                output::line(format!(
                    "Recorded migration {} ({}): its objects were already there.",
                    m.version, m.description
                ))?;
            }
            for m in &report.applied {
                output::line(format!(
                    "Applied migration {} ({}).",
                    m.version, m.description
                ))?;
            }
            for t in partitioned.iter().flatten() {
                let what = if t.converted {
                    format!(
                        "Partitioned {} by {} ({} row(s) copied)",
                        t.table, t.period, t.rows_copied
                    )
                } else {
                    format!("{} is partitioned by {}", t.table, t.period)
                };
                output::line(format!(
                    "{what}: {} partition(s) created, {} kept ahead.",
                    t.created.len(),
                    t.ahead
                ))?;
            }
        }
    }
    Ok(ExitStatus::Success)
}
