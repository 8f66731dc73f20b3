//! `omnibox cleanup`: delete completed (and optionally failed) rows past retention.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::store::AnyStore;
use omnibox::store::audit::AuditEntry;
use omnibox::{EventStatus, MaintenanceStore, Route, Table};
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
    #[command(flatten)]
    safety: SafetyArgs,
}

/// The shortest retention `cleanup` takes without --force.
const MIN_RETENTION: Duration = Duration::from_secs(3600);

/// The shortest audit retention `cleanup` takes without --force: the trail
/// is the record of what operators changed, the first thing read after an
/// incident.
const MIN_AUDIT_RETENTION: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Default, serde::Serialize)]
struct Counts {
    table: String,
    completed: u64,
    failed: u64,
    bounded: bool,
}

pub async fn run(args: CleanupArgs, ctx: &Context) -> Result<ExitStatus> {
    let tables: Vec<Table> = match args.table {
        Some(t) => vec![Table::from(t)],
        None => vec![Table::Outbox, Table::Inbox],
    };
    let shortest = if args.include_failed {
        args.older_than.min(args.failed_older_than)
    } else {
        args.older_than
    };
    if shortest < MIN_RETENTION && !args.force {
        return Err(UsageError(format!(
            "refusing a retention of {}: rows just completed would go at once (an outbox row's idempotency key with it, so a retried enqueue gets in again); use at least {}, or add --force",
            human_duration(shortest),
            human_duration(MIN_RETENTION)
        ))
        .into());
    }
    if args.audit_older_than < MIN_AUDIT_RETENTION && !args.force {
        return Err(UsageError(format!(
            "refusing an audit retention of {}: the audit trail records what operators changed; keep it at least {}, or add --force",
            human_duration(args.audit_older_than),
            human_duration(MIN_AUDIT_RETENTION)
        ))
        .into());
    }
    let started = std::time::Instant::now();
    let dedup_window = ctx.settings.dedup_window;
    if tables.contains(&Table::Inbox) && shortest < dedup_window {
        return Err(UsageError(format!(
            "refusing to delete inbox rows younger than the deduplication window ({}): a redelivered message would be stored again as new; use a retention of at least {} (or --table outbox, or a shorter --dedup-window / OMNIBOX_DEDUP_WINDOW / dedup_window in omnibox.toml)",
            human_duration(dedup_window),
            human_duration(dedup_window)
        ))
        .into());
    }
    // The audit row is checked before anything changes.
    omnibox::store::audit::check(&AuditEntry::new(args.safety.actor(), "cleanup"))?;
    let store = ctx.store().await?;
    let mut plan = Vec::new();
    for t in &tables {
        let (c, f) = match t {
            Table::Outbox => past_retention(&store.outbox(), &args).await?,
            Table::Inbox => past_retention(&store.inbox(), &args).await?,
        };
        plan.push(Counts {
            table: t.to_string(),
            completed: c,
            failed: f,
            bounded: false,
        });
    }
    let total: u64 = plan.iter().map(|c| c.completed + c.failed).sum();
    if args.safety.dry_run || total == 0 {
        if total == 0 && args.safety.yes && !args.safety.dry_run {
            trim_trails(&store, &args, started).await?;
        }
        return report(ctx, &plan, args.safety.dry_run);
    }
    if !args.safety.confirm(&format!("delete {total} row(s)"))? {
        crate::cli::output::notice!("omnibox: nothing changed");
        return Ok(ExitStatus::No);
    }
    let bar =
        (!ctx.quiet && std::io::stderr().is_terminal()).then(|| indicatif::ProgressBar::new(total));
    let mut done = Vec::new();
    for t in &tables {
        let mut counts = match t {
            Table::Outbox => delete_past_retention(&store.outbox(), &args, bar.as_ref()).await?,
            Table::Inbox => delete_past_retention(&store.inbox(), &args, bar.as_ref()).await?,
        };
        counts.table = t.to_string();
        if counts.completed + counts.failed > 0 {
            let mut entry = AuditEntry::new(args.safety.actor(), "cleanup");
            entry.table = Some(t.to_string());
            entry.count = counts.completed + counts.failed;
            entry.details = json!({
                "completed": counts.completed, "failed": counts.failed,
                "older_than_seconds": args.older_than.as_secs_f64(),
                "failed_older_than_seconds": args.include_failed.then_some(args.failed_older_than.as_secs_f64()),
                "stopped_at_max_iterations": counts.bounded,
            });
            store.record_audit(&entry).await?;
        }
        done.push(counts);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    trim_trails(&store, &args, started).await?;
    report(ctx, &done, false)?;
    if done.iter().any(|c| c.bounded) {
        crate::cli::output::notice!(
            "omnibox: stopped at --max-iterations; rows past retention remain (run again)"
        );
    }
    Ok(ExitStatus::Success)
}

/// The audit trail and the replayed dead letters have retentions of their
/// own (trimmed after this run's audit rows went in).
/// The audit rows this run wrote are never among them, whatever the
/// retention (`started`: when the run began).
async fn trim_trails(
    store: &AnyStore,
    args: &CleanupArgs,
    started: std::time::Instant,
) -> Result<()> {
    let keep = args
        .audit_older_than
        .max(started.elapsed() + Duration::from_secs(1));
    let audit = store.delete_audit_older(keep, args.batch_size).await?;
    if audit > 0 {
        crate::cli::output::notice!(
            "omnibox: deleted {audit} audit row(s) older than {} (--audit-older-than)",
            human_duration(keep)
        );
    }
    let letters = store
        .dead_letters()
        .delete_replayed_older(args.dead_letters_older_than, args.batch_size)
        .await?;
    if letters > 0 {
        tracing::info!(
            rows = letters,
            "deleted replayed dead letters past their retention"
        );
    }
    Ok(())
}

/// One table's rows past retention: (completed, failed).
async fn past_retention<R: Route, T: MaintenanceStore<R>>(
    table: &T,
    args: &CleanupArgs,
) -> Result<(u64, u64)> {
    let completed = table
        .count_older(EventStatus::Completed, args.older_than)
        .await?;
    let failed = if args.include_failed {
        table
            .count_older(EventStatus::Failed, args.failed_older_than)
            .await?
    } else {
        0
    };
    Ok((completed, failed))
}

/// Deletes one table's rows past retention, `--batch-size` rows per
/// statement and at most `--max-iterations` statements per status.
async fn delete_past_retention<R: Route, T: MaintenanceStore<R>>(
    table: &T,
    args: &CleanupArgs,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<Counts> {
    let mut counts = Counts::default();
    for (status, older_than) in [
        (EventStatus::Completed, args.older_than),
        (EventStatus::Failed, args.failed_older_than),
    ] {
        if status == EventStatus::Failed && !args.include_failed {
            continue;
        }
        let mut iterations = 0;
        loop {
            if iterations >= args.max_iterations {
                // The last batch was full: are there more?
                counts.bounded |= table.count_older(status, older_than).await? > 0;
                break;
            }
            let n = match status {
                EventStatus::Completed => {
                    table.delete_completed(older_than, args.batch_size).await?
                }
                _ => table.delete_failed(older_than, args.batch_size).await?,
            };
            iterations += 1;
            if let Some(b) = bar {
                b.inc(n);
            }
            match status {
                EventStatus::Completed => counts.completed += n,
                _ => counts.failed += n,
            }
            // A short batch: nothing more past retention (or only rows
            // another cleanup is deleting right now).
            if n < u64::from(args.batch_size) {
                break;
            }
        }
    }
    Ok(counts)
}

fn report(ctx: &Context, counts: &[Counts], dry_run: bool) -> Result<ExitStatus> {
    match ctx.format() {
        Format::Json => output::json(&json!({"dry_run": dry_run, "tables": counts}))?,
        Format::Table => {
            let (c, f) = if dry_run {
                ("completed to delete", "failed to delete")
            } else {
                ("completed deleted", "failed deleted")
            };
            let mut t = output::table(["table", c, f]);
            for x in counts {
                t.add_row(vec![
                    x.table.clone(),
                    x.completed.to_string(),
                    x.failed.to_string(),
                ]);
            }
            output::line(t)?;
        }
    }
    Ok(ExitStatus::Success)
}
