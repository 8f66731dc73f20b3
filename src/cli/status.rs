//! `omnibox status`: counts per table and status, and health checks.

use std::io::IsTerminal;
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

/// Where the last report stood, for rates.
struct Tick {
    at: std::time::Instant,
    /// The database's clock at the last report.
    db_now: omnibox::Timestamp,
    /// Highest seq per table.
    seq: [i64; 2],
}

/// Rows per second since the last report, per table.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Rates {
    /// New rows (enqueued into the outbox, stored by the inbox).
    inserted_per_second: f64,
    /// Rows completed (published by relays, handled by the inbox).
    completed_per_second: f64,
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
    let mut last: Option<Tick> = None;
    // When the database stopped answering (a watch outlives outages).
    let mut down_since: Option<std::time::Instant> = None;
    let mut reported = false;
    loop {
        match report(&args, ctx, &store, last.as_ref()).await {
            Ok((_, tick)) => {
                if let Some(since) = down_since.take() {
                    outage_line(ctx, true, since, None)?;
                }
                last = Some(tick);
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
    last: Option<&Tick>,
) -> Result<(ExitStatus, Tick)> {
    let since = last.map_or_else(omnibox::time::now, |l| l.db_now);
    let progress = [
        store.outbox().progress(since).await?,
        store.inbox().progress(since).await?,
    ];
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
    let dead_letters_open = store.dead_letters().count_open(None).await?;
    let tick = Tick {
        at: std::time::Instant::now(),
        db_now: tables[0].now,
        seq: [progress[0].0, progress[1].0],
    };
    let rates: Option<[Rates; 2]> = last.map(|l| {
        let secs = tick.at.duration_since(l.at).as_secs_f64().max(0.001);
        let rate = |i: usize| Rates {
            inserted_per_second: (tick.seq[i] - l.seq[i]).max(0) as f64 / secs,
            completed_per_second: progress[i].1 as f64 / secs,
        };
        [rate(0), rate(1)]
    });
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
            let mut out = json!({ "tables": tables, "blocked_keys": blocked, "dead_letters_open": dead_letters_open });
            if args.check {
                out["check"] = json!({"ok": violations.is_empty(), "violations": violations});
            }
            if args.watch {
                out["at"] = json!(omnibox::time::format(&tick.db_now));
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
                    omnibox::time::format(&tick.db_now),
                    human_duration(args.interval)
                ))?;
            }
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
            crate::cli::output::notice!("omnibox: check failed: {v}");
        }
        if !violations.is_empty() {
            return Ok((ExitStatus::No, tick));
        }
    }
    Ok((ExitStatus::Success, tick))
}
