//! `omnibox migrate`: create or upgrade the schema.

use anyhow::Result;
use clap::Args;
use omnibox::store::Backend;
use serde_json::json;

use super::output::{self, Format};
use super::{Context, ExitStatus};

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
/// Examples:
///   omnibox migrate
///   omnibox migrate --database-url postgres://app:secret@db/app --schema omnibox
///   omnibox migrate --print-sql --database-url postgres://x > omnibox.sql
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct MigrateArgs {
    /// Print the DDL for the database URL's backend instead of applying it
    /// (no connection is made)
    #[arg(long)]
    print_sql: bool,
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
    let store = ctx.connect().await?;
    let report = store.migrate().await?;
    match ctx.format() {
        Format::Json => output::json(&report)?,
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
        }
    }
    Ok(ExitStatus::Success)
}
