//! `omnibox status`: counts per table and status, and health checks.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::ops::status::{self, Limits, Snapshot};
use omnibox::store::TableCounts;
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
///   omnibox status --watch --interval 5s                 # like top: rates and lag
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
    /// Refresh every --interval until interrupted, with rates (like top); on
    /// a terminal the screen is redrawn, otherwise each report is printed in
    /// turn (one JSON object per line with --format json)
    #[arg(long, conflicts_with = "check")]
    watch: bool,
    /// With --watch: the time between reports
    #[arg(long, allow_hyphen_values = true, default_value = "2s", value_parser = args::duration, value_name = "DURATION", requires = "watch")]
    interval: Duration,
}

pub async fn run(args: StatusArgs, ctx: &Context) -> Result<ExitStatus> {
    let store = ctx.store().await?;
    if !args.watch {
        return report(&args, ctx, &store, None).await.map(|(s, _)| s);
    }
    if args.interval < Duration::from_millis(100) {
        return Err(super::UsageError("--interval must be at least 100ms".into()).into());
    }
    let mut shutdown = super::signals::stop_channel();
    let mut last: Option<Snapshot> = None;
    // When the database stopped answering (a watch outlives outages).
    let mut down_since: Option<std::time::Instant> = None;
    let mut reported = false;
    loop {
        match report(&args, ctx, &store, last.as_ref()).await {
            Ok((_, snapshot)) => {
                if let Some(since) = down_since.take() {
                    outage_line(ctx, true, since, None)?;
                }
                last = Some(snapshot);
                reported = true;
            }
            // The first report failing is the command failing.
            Err(e) if !reported => return Err(e),
            Err(e) => {
                if down_since.is_none() {
                    let since = std::time::Instant::now();
                    down_since = Some(since);
                    outage_line(ctx, false, since, Some(&e))?;
                }
                // Rates start over once it is back.
                last = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = shutdown.changed() => return Ok(ExitStatus::Success),
        }
    }
}

/// A watch's line about an outage: when it begins (with the error) and
/// when it ends; with --format json, an NDJSON object in the stream.
fn outage_line(
    ctx: &Context,
    back: bool,
    since: std::time::Instant,
    error: Option<&anyhow::Error>,
) -> Result<()> {
    let error = error.map(|e| omnibox::redact::text(&super::chain_text(e)));
    match ctx.format() {
        Format::Json => output::line(
            serde_json::json!({
                "database": if back { "back" } else { "unreachable" },
                "error": error,
                "down_for_seconds": back.then(|| since.elapsed().as_secs_f64()),
            })
            .to_string(),
        ),
        Format::Table if back => output::line(format!(
            "database back after {}",
            human_duration(since.elapsed())
        )),
        Format::Table => output::line(format!(
            "database unreachable: {}; still watching (reports resume when it answers)",
            error.unwrap_or_default()
        )),
    }
}

/// One report; with `last`, rates since then (watch mode).
async fn report(
    args: &StatusArgs,
    ctx: &Context,
    store: &omnibox::store::AnyStore,
    last: Option<&Snapshot>,
) -> Result<(ExitStatus, Snapshot)> {
    let since = last.map_or_else(omnibox::time::now, Snapshot::now);
    let snap = status::snapshot(store, args.stale_after, since).await?;
    let rates = last.map(|l| snap.rates_since(l));
    let violations = snap.violations(&Limits {
        max_pending_age: args.max_pending_age,
        max_failed: args.max_failed,
        max_stale_locks: args.max_stale_locks,
        stale_after: args.stale_after,
    });
    let tables = snap.tables.clone().map(|t| t.counts);
    let stale = snap.tables.each_ref().map(|t| t.stale_locks);
    let failed_by_type = snap.tables.each_ref().map(|t| &t.failed_by_event_type);
    let blocked = &snap.blocked_keys;
    let dead_letters_open = snap.dead_letters_open;
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
            let mut out = json!({ "tables": tables, "blocked_keys": blocked, "dead_letters_open": dead_letters_open });
            if args.check {
                out["check"] = json!({"ok": violations.is_empty(), "violations": violations});
            }
            if args.watch {
                out["at"] = json!(omnibox::time::format(&snap.now()));
                out["rates"] = json!(rates.map(|r| json!({"outbox": r[0], "inbox": r[1]})));
                // One object per line: a stream a script can read.
                output::line(out.to_string())?;
            } else {
                output::json(&out)?;
            }
        }
        Format::Table => {
            if args.watch {
                if std::io::stdout().is_terminal() {
                    // Redraw in place, like top.
                    output::line("\x1b[2J\x1b[H")?;
                }
                output::line(format!(
                    "omnibox status at {}, every {} (Ctrl-C stops)",
                    omnibox::time::format(&snap.now()),
                    human_duration(args.interval)
                ))?;
            }
            let t = counts_table(&tables, Some(&stale));
            output::line(t)?;
            if dead_letters_open > 0 {
                output::line(format!(
                    "Open dead letters: {dead_letters_open} (omnibox list --table dead-letters; omnibox replay --table dead-letters)"
                ))?;
            }
            if args.watch {
                let mut t = output::table(["table", "new rows/s", "completed/s", "lag"]);
                for (i, c) in tables.iter().enumerate() {
                    let (new, done) = match &rates {
                        Some(r) => (
                            format!("{:.1}", r[i].inserted_per_second),
                            format!("{:.1}", r[i].completed_per_second),
                        ),
                        None => ("-".into(), "-".into()),
                    };
                    t.add_row(vec![
                        c.table.to_string(),
                        new,
                        done,
                        c.oldest_pending_age()
                            .map(human_duration)
                            .unwrap_or_else(|| "-".into()),
                    ]);
                }
                output::line(t)?;
            }
            if failed_by_type.iter().any(|v| !v.is_empty()) {
                let mut t = output::table(["table", "failed event type", "count"]);
                for (i, rows) in failed_by_type.iter().enumerate() {
                    for (event_type, n) in rows.iter() {
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
                for b in blocked {
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
            crate::cli::output::notice!("omnibox: check failed: {v}");
        }
        if !violations.is_empty() {
            return Ok((ExitStatus::No, snap));
        }
    }
    Ok((ExitStatus::Success, snap))
}

/// The counts of `tables` as `status` shows them; `stale`, each table's
/// stale locks (a column of its own when given).
pub(crate) fn counts_table(tables: &[TableCounts], stale: Option<&[u64]>) -> comfy_table::Table {
    let mut header = vec![
        "table",
        "pending",
        "locked",
        "due now",
        "oldest pending",
        "completed",
        "failed",
    ];
    if stale.is_some() {
        header.push("stale locks");
    }
    let mut t = output::table(header);
    for (i, c) in tables.iter().enumerate() {
        let oldest = c
            .oldest_pending_age()
            .map_or_else(|| "-".into(), human_duration);
        let completed = if c.completed_is_estimate {
            format!("~{}", c.completed)
        } else {
            c.completed.to_string()
        };
        let mut row = vec![
            c.table.to_string(),
            c.pending.to_string(),
            c.locked.to_string(),
        ];
        row.extend([
            c.due_now.to_string(),
            oldest,
            completed,
            c.failed.to_string(),
        ]);
        row.extend(stale.map(|s| s[i].to_string()));
        t.add_row(row);
    }
    t
}
