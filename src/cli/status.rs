//! `omnibox status`: counts per table and status, and health checks.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::{MaintenanceStore, OutboxStore};
use serde_json::json;

use super::output::{self, Format, ellipsize, human_duration};
use super::{Context, ExitStatus, args};

/// Show counts per table and status, locks, the oldest pending event, what is
/// due, failures by event type, stale locks and keys held up by a failure
///
/// With --check it is a health check for monitors and Kubernetes probes:
/// exit 1 when a given threshold is crossed (and say which), 0 otherwise.
///
/// Examples:
///   omnibox status
///   omnibox status --format json | jq '.tables[] | select(.table == "outbox") | .pending'
///   omnibox status --check --max-pending-age 5m --max-failed 0 --max-stale-locks 0
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct StatusArgs {
    /// Exit 1 when a threshold below is crossed
    #[arg(long)]
    check: bool,
    /// Threshold: age of the oldest pending event
    #[arg(long, allow_hyphen_values = true, value_parser = args::duration, value_name = "DURATION")]
    max_pending_age: Option<Duration>,
    /// Threshold: failed events (per table)
    #[arg(long, value_name = "N")]
    max_failed: Option<u64>,
    /// Threshold: stale locks (per table)
    #[arg(long, value_name = "N")]
    max_stale_locks: Option<u64>,
    /// A lock older than this counts as stale
    #[arg(long, allow_hyphen_values = true, default_value = "5m", value_parser = args::duration, value_name = "DURATION")]
    stale_after: Duration,
}

pub async fn run(args: StatusArgs, ctx: &Context) -> Result<ExitStatus> {
    let store = ctx.store().await?;
    let tables = [
        store.outbox().status_counts().await?,
        store.inbox().status_counts().await?,
    ];
    let stale = [
        store.outbox().count_stale_locks(args.stale_after).await?,
        store.inbox().count_stale_locks(args.stale_after).await?,
    ];
    let failed_by_type = [
        store.outbox().failed_by_event_type().await?,
        store.inbox().failed_by_event_type().await?,
    ];
    let blocked = store.outbox().blocked_keys(10).await?;
    let mut violations = Vec::new();
    for (i, c) in tables.iter().enumerate() {
        if let (Some(max), Some(age)) = (args.max_pending_age, c.oldest_pending_age())
            && age > max
        {
            violations.push(format!(
                "{}: the oldest pending event is {} old (limit {})",
                c.table,
                human_duration(age),
                human_duration(max)
            ));
        }
        if let Some(max) = args.max_failed
            && c.failed > max
        {
            violations.push(format!(
                "{}: {} failed events (limit {max})",
                c.table, c.failed
            ));
        }
        if let Some(max) = args.max_stale_locks
            && stale[i] > max
        {
            violations.push(format!(
                "{}: {} locks older than {} (limit {max})",
                c.table,
                stale[i],
                human_duration(args.stale_after)
            ));
        }
    }
    match ctx.format() {
        Format::Json => {
            let tables: Vec<_> = tables
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut v = serde_json::to_value(c).expect("counts serialise");
                    v["oldest_pending_age_seconds"] =
                        json!(c.oldest_pending_age().map(|d| d.as_secs_f64()));
                    v["stale_locks"] = json!(stale[i]);
                    v["failed_by_event_type"] = json!(
                        failed_by_type[i]
                            .iter()
                            .map(|(t, n)| json!({"event_type": t, "count": n}))
                            .collect::<Vec<_>>()
                    );
                    v
                })
                .collect();
            let mut out = json!({ "tables": tables, "blocked_keys": blocked });
            if args.check {
                out["check"] = json!({"ok": violations.is_empty(), "violations": violations});
            }
            output::json(&out)?;
        }
        Format::Table => {
            let mut t = output::table([
                "table",
                "pending",
                "locked",
                "due now",
                "oldest pending",
                "completed",
                "failed",
                "stale locks",
            ]);
            for (i, c) in tables.iter().enumerate() {
                t.add_row(vec![
                    c.table.to_string(),
                    c.pending.to_string(),
                    c.locked.to_string(),
                    c.due_now.to_string(),
                    c.oldest_pending_age()
                        .map(human_duration)
                        .unwrap_or_else(|| "-".into()),
                    if c.completed_is_estimate {
                        format!("~{}", c.completed)
                    } else {
                        c.completed.to_string()
                    },
                    c.failed.to_string(),
                    stale[i].to_string(),
                ]);
            }
            output::line(t)?;
            if failed_by_type.iter().any(|v| !v.is_empty()) {
                let mut t = output::table(["table", "failed event type", "count"]);
                for (i, rows) in failed_by_type.iter().enumerate() {
                    for (event_type, n) in rows {
                        t.add_row(vec![
                            tables[i].table.to_string(),
                            event_type.clone(),
                            n.to_string(),
                        ]);
                    }
                }
                output::line(t)?;
            }
            if !blocked.is_empty() {
                let mut t = output::table([
                    "blocked key",
                    "topic",
                    "waiting",
                    "head attempts",
                    "retry at",
                    "head error",
                ]);
                for b in &blocked {
                    t.add_row(vec![
                        ellipsize(&b.partition_key, 40),
                        b.topic.clone(),
                        b.waiting.to_string(),
                        b.head_attempts.to_string(),
                        omnibox::time::format(&b.head_retry_at),
                        ellipsize(b.head_error.as_deref().unwrap_or("-"), 50),
                    ]);
                }
                output::line(t)?;
            }
        }
    }
    if args.check {
        for v in &violations {
            eprintln!("omnibox: check failed: {v}");
        }
        if !violations.is_empty() {
            return Ok(ExitStatus::No);
        }
    }
    Ok(ExitStatus::Success)
}
