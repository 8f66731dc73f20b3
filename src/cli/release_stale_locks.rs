//! `omnibox release-stale-locks`.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::Table;
use omnibox::ops::{self, release};
use omnibox::store::audit::AuditEntry;
use serde_json::json;

use super::list::TableArg;
use super::output::{self, Format, human_duration};
use super::safety::SafetyArgs;
use super::{Context, ExitStatus, UsageError, args};

/// Unlock rows whose lock is older than a threshold and whose lease ran out
///
/// A row counts as stale when it was locked more than --older-than ago and
/// its lease (`locked_until`, extended while its worker lives) has expired:
/// a live worker's rows are never released. A threshold shorter than the
/// lease (OMNIBOX_LEASE / lease in omnibox.toml, default 5m) needs --force.
/// Batched; on PostgreSQL rows being changed by others are skipped (SKIP
/// LOCKED), so it is safe to run beside live relays. The rows become
/// claimable again; nothing else changes. Recorded in the audit trail.
///
/// Examples:
///   omnibox release-stale-locks --older-than 5m --dry-run
///   omnibox release-stale-locks --older-than 10m --yes        # from cron
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ReleaseArgs {
    /// Locks older than this are stale
    #[arg(long, allow_hyphen_values = true, default_value = "5m", value_parser = args::duration, value_name = "DURATION")]
    older_than: Duration,
    /// Only this table [default: both]
    #[arg(long, value_enum)]
    table: Option<TableArg>,
    /// Rows per statement
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
    /// Accept a threshold shorter than the lease relays take
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    safety: SafetyArgs,
}

pub async fn run(args: ReleaseArgs, ctx: &Context) -> Result<ExitStatus> {
    let lease = ctx.settings.lease;
    if args.older_than < lease && !args.force {
        return Err(UsageError(format!(
            "refusing --older-than {}: relays and `inbox process` hold their rows for a lease of {} (extended while they work), so a lock younger than that may belong to a live worker; use at least {} (set the lease with OMNIBOX_LEASE or lease in omnibox.toml), or add --force",
            human_duration(args.older_than),
            human_duration(lease),
            human_duration(lease)
        ))
        .into());
    }
    // The audit row is checked before anything changes.
    omnibox::store::audit::check(&AuditEntry::new(args.safety.actor(), "release-stale-locks"))?;
    let store = ctx.store().await?;
    let tables = ops::tables(args.table.map(Table::from));
    let counts = release::count(&store, &tables, args.older_than).await?;
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    if args.safety.dry_run || total == 0 {
        return report(ctx, &counts, args.safety.dry_run, args.older_than);
    }
    if !args.safety.confirm(&format!(
        "release {total} lock(s) older than {}",
        human_duration(args.older_than)
    ))? {
        crate::cli::output::notice!("omnibox: nothing changed");
        return Ok(ExitStatus::No);
    }
    let entry = AuditEntry::new(args.safety.actor(), "release-stale-locks");
    let released =
        release::release(&store, &tables, args.older_than, args.batch_size, &entry).await?;
    report(ctx, &released, false, args.older_than)?;
    Ok(ExitStatus::Success)
}

fn report(
    ctx: &Context,
    counts: &[(Table, u64)],
    dry_run: bool,
    older_than: Duration,
) -> Result<ExitStatus> {
    match ctx.format() {
        Format::Json => output::json(&json!({
            "dry_run": dry_run,
            "older_than_seconds": older_than.as_secs_f64(),
            "tables": counts.iter().map(|(t, n)| json!({"table": t, "released": n})).collect::<Vec<_>>(),
        }))?,
        Format::Table => {
            let verb = if dry_run { "would release" } else { "released" };
            let mut t = output::table(["table", verb]);
            for (table, n) in counts {
                t.add_row(vec![table.to_string(), n.to_string()]);
            }
            output::line(t)?;
        }
    }
    Ok(ExitStatus::Success)
}
