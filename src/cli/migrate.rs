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
            Format::Json => {
                output::json(&json!({ "backend": backend.as_str(), "migrations": scripts }))?
            }
            Format::Table => {
                for s in scripts {
                    output::line(format!(
                        "-- omnibox migration {}: {}\n{}",
                        s.version,
                        s.description,
                        s.sql.trim_end()
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
            if report.applied.is_empty() {
                output::line(format!(
                    "Schema is up to date (version {}).",
                    report.version
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
