//! `omnibox cleanup`: delete completed (and optionally failed) rows past retention.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::Table;
use omnibox::ops::{self, cleanup, cleanup::Deleted, cleanup::Retention};
use omnibox::store::AnyStore;
use omnibox::store::audit::AuditEntry;
use serde_json::json;

use super::list::TableArg;
use super::output::{self, Format, human_duration};
use super::safety::SafetyArgs;
use super::{Context, ExitStatus, UsageError, args};

/// Delete completed rows past their retention, in bounded batches
///
/// Deletes completed rows completed more than --older-than ago, --batch-size
/// rows per statement, at most --max-iterations statements per table (so a
/// cron run is bounded); on PostgreSQL rows in use are skipped, so two crons
/// at once are safe. With --include-failed, failed rows that failed more than
/// --failed-older-than ago go too. On the inbox, a retention shorter than
/// the deduplication window (--dedup-window, OMNIBOX_DEDUP_WINDOW or
/// dedup_window in omnibox.toml; 7d) is refused: deleting inbox rows early
/// lets a redelivered message through as new. A retention under an hour
/// needs --force. Dead letters (--dlq table) replayed more than
/// --dead-letters-older-than ago are deleted too; open ones are kept.
///
/// On tables partitioned by `omnibox migrate --partitioned`, a partition
/// whose whole range is older than --older-than and whose every row is past
/// retention is dropped whole (no row-by-row delete, no dead tuples); one
/// holding a pending row, a failed row kept, or a row completed since stays,
/// and its rows past retention are deleted one by one as on a plain table.
///
/// Examples:
///   omnibox cleanup --older-than 7d --dry-run
///   omnibox cleanup --older-than 7d --include-failed --failed-older-than 30d --yes
///   # crontab: 17 3 * * * omnibox cleanup --older-than 7d --yes --quiet
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CleanupArgs {
    /// Keep completed rows for this long
    #[arg(long, allow_hyphen_values = true, value_parser = args::duration, value_name = "DURATION")]
    older_than: Duration,
    /// Also delete failed rows
    #[arg(long)]
    include_failed: bool,
    /// With --include-failed: keep failed rows for this long
    #[arg(long, allow_hyphen_values = true, default_value = "30d", value_parser = args::duration, value_name = "DURATION")]
    failed_older_than: Duration,
    /// Only this table [default: both]
    #[arg(long, value_enum)]
    table: Option<TableArg>,
    /// Rows per DELETE statement
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
    /// Statements per table and kind, at most
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    max_iterations: u32,
    /// Keep audit rows (omnibox audit) for this long; older ones are deleted
    #[arg(long, allow_hyphen_values = true, default_value = "365d", value_parser = args::duration, value_name = "DURATION")]
    audit_older_than: Duration,
    /// Keep replayed dead letters (omnibox list --table dead-letters) for this long; open ones are always kept
    #[arg(long, allow_hyphen_values = true, default_value = "90d", value_parser = args::duration, value_name = "DURATION")]
    dead_letters_older_than: Duration,
    /// Allow a retention shorter than an hour (completed rows also hold
    /// idempotency keys: deleting them at once lets a retried enqueue in
    /// again), and an --audit-older-than shorter than 30 days
    #[arg(long)]
    force: bool,
    /// Partitioned tables: wait this long at most for the table's lock to
    /// drop a partition (past it the partition stays for the next run)
    #[arg(long, default_value = "5s", value_parser = args::duration, value_name = "DURATION")]
    lock_timeout: Duration,
    #[command(flatten)]
    safety: SafetyArgs,
}

pub async fn run(args: CleanupArgs, ctx: &Context) -> Result<ExitStatus> {
    let tables = ops::tables(args.table.map(Table::from));
    let retention = Retention {
        older_than: args.older_than,
        include_failed: args.include_failed,
        failed_older_than: args.failed_older_than,
        batch_size: args.batch_size,
        max_iterations: args.max_iterations,
        audit_older_than: args.audit_older_than,
        dead_letters_older_than: args.dead_letters_older_than,
        lock_timeout: args.lock_timeout,
    };
    if let Some(why) = retention.refusal(&tables, ctx.settings.dedup_window, args.force) {
        return Err(UsageError(why).into());
    }
    let started = std::time::Instant::now();
    // The audit row is checked before anything changes.
    let entry = AuditEntry::new(args.safety.actor(), "cleanup");
    omnibox::store::audit::check(&entry)?;
    let store = ctx.store().await?;
    if args.safety.yes && !args.safety.dry_run {
        // Nothing to ask: delete at once (counting first would read every
        // row past retention twice: a cron run's cost).
        let done = cleanup::delete(&store, &tables, &retention, &entry, |_| {}).await?;
        return finish(ctx, &store, &retention, started, &done).await;
    }
    let plan = cleanup::count(&store, &tables, &retention).await?;
    let total: u64 = plan.iter().map(Deleted::total).sum();
    let partitions: usize = plan.iter().map(|d| d.partitions.len()).sum();
    if args.safety.dry_run || (total == 0 && partitions == 0) {
        return report(ctx, &plan, args.safety.dry_run);
    }
    let what = if partitions > 0 {
        format!("delete {total} row(s), dropping {partitions} partition(s)")
    } else {
        format!("delete {total} row(s)")
    };
    if !args.safety.confirm(&what)? {
        crate::cli::output::notice!("omnibox: nothing changed");
        return Ok(ExitStatus::No);
    }
    let bar =
        (!ctx.quiet && std::io::stderr().is_terminal()).then(|| indicatif::ProgressBar::new(total));
    let done = cleanup::delete(&store, &tables, &retention, &entry, |n| {
        if let Some(b) = &bar {
            b.inc(n);
        }
    })
    .await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    finish(ctx, &store, &retention, started, &done).await
}

/// After the deletes: the trails trimmed, the report, and a notice when
/// rows past retention remain.
async fn finish(
    ctx: &Context,
    store: &AnyStore,
    retention: &Retention,
    started: std::time::Instant,
    done: &[Deleted],
) -> Result<ExitStatus> {
    trim_trails(store, retention, started).await?;
    report(ctx, done, false)?;
    if done.iter().any(|c| c.bounded) {
        crate::cli::output::notice!(
            "omnibox: stopped at --max-iterations; rows past retention remain (run again)"
        );
    }
    Ok(ExitStatus::Success)
}

/// Trims the audit trail and the replayed dead letters, and says so.
async fn trim_trails(
    store: &AnyStore,
    retention: &Retention,
    started: std::time::Instant,
) -> Result<()> {
    let trimmed = cleanup::trim_trails(store, retention, started).await?;
    if trimmed.audit > 0 {
        crate::cli::output::notice!(
            "omnibox: deleted {} audit row(s) older than {} (--audit-older-than)",
            trimmed.audit,
            human_duration(trimmed.audit_kept)
        );
    }
    if trimmed.dead_letters > 0 {
        tracing::info!(
            rows = trimmed.dead_letters,
            "deleted replayed dead letters past their retention"
        );
    }
    Ok(())
}

fn report(ctx: &Context, counts: &[Deleted], dry_run: bool) -> Result<ExitStatus> {
    for x in counts {
        for k in &x.kept_partitions {
            crate::cli::output::notice!("omnibox: kept partition {}: {}", k.name, k.reason);
        }
    }
    let partitioned = counts
        .iter()
        .any(|x| !x.partitions.is_empty() || !x.kept_partitions.is_empty());
    match ctx.format() {
        Format::Json => output::json(&json!({"dry_run": dry_run, "tables": counts}))?,
        Format::Table => {
            let (c, f) = if dry_run {
                ("completed to delete", "failed to delete")
            } else {
                ("completed deleted", "failed deleted")
            };
            let p = if dry_run {
                "partitions to drop"
            } else {
                "partitions dropped"
            };
            let mut header = vec![c, f];
            if partitioned {
                header.push(p);
            }
            let mut t = output::table(std::iter::once("table").chain(header));
            for x in counts {
                let mut row = vec![
                    x.table.clone(),
                    x.completed.to_string(),
                    x.failed.to_string(),
                ];
                if partitioned {
                    row.push(x.partitions.len().to_string());
                }
                t.add_row(row);
            }
            output::line(t)?;
        }
    }
    Ok(ExitStatus::Success)
}
