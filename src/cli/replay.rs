//! `omnibox replay`: failed rows (or dead letters) back to pending.

use anyhow::Result;
use clap::Args;
use omnibox::ops::replay::{self, Candidate, Selection};
use omnibox::store::audit::AuditEntry;
use omnibox::store::{AnyStore, FailureSelector, TimeWindow};
use omnibox::{RequeueFilter, Table, Timestamp, time};
use serde_json::json;
use uuid::Uuid;

use super::list::{FilterWording, RowFilterArgs, RowsArg, letter_table, tables_name};
use super::output::{self, Format, ellipsize};
use super::safety::SafetyArgs;
use super::{Context, ExitStatus, UsageError, args};
use omnibox::store::dead_letters::{
    DEAD_LETTERS, DeadLetterFilter, DeadLetterRecord, DeadLetterReplay,
};

/// Put failed events back to pending (attempts reset, error cleared, due now)
///
/// With --pending, pending events waiting for a retry (a handler or the
/// broker failed, and the backoff has not run out) are made due now
/// instead, keeping their attempts and last error: what to run once the
/// cause is fixed, rather than wait for the backoff.
///
/// Select rows with at least one selector, or --all. Without --table both
/// event tables are searched, unless a selector belongs to one: --topic to
/// the outbox, --source and --consumer-group to the inbox. --dry-run lists
/// what would change. --rate spreads a large replay over time so that it does not
/// flood the broker. Every replay is recorded in the audit trail (omnibox audit).
///
/// --table dead-letters replays the open dead letters kept by --dlq table
/// (selectors apply to the letters; --id takes a letter's or its event's
/// id): an event whose row is still failed is requeued, one whose row was
/// deleted (cleanup --include-failed) is inserted again from the letter's
/// copy; the letters are then marked replayed.
///
/// Examples:
///   omnibox replay --event-type order.created --since 2h --dry-run
///   omnibox replay --fingerprint 3fa2b91c0d4e --reason "schema fixed in v2.3" --yes
///   omnibox replay --table inbox --source billing --error-contains timeout --rate 100
///   omnibox replay --consumer-group billing --event-type refund.issued --dry-run
///   omnibox replay --pending --event-type refund.issued --reason "ledger back" --yes
///   omnibox replay --id 0190f1d2-7a3b-7cde-8f00-123456789abc --reason "retry by hand"
///   omnibox replay --table dead-letters --since 1d --reason "broker ACL fixed" --yes
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ReplayArgs {
    /// Which table [default: both event tables, or the one a selector belongs to]
    #[arg(long, value_enum)]
    table: Option<RowsArg>,
    /// This row (repeatable)
    #[arg(long = "id", value_name = "UUID", value_parser = args::uuid)]
    ids: Vec<Uuid>,
    #[command(flatten)]
    rows: RowFilterArgs<Wording>,
    /// Rows whose last error contains this text
    #[arg(long, value_name = "TEXT")]
    error_contains: Option<String>,
    /// Inbox rows of this consumer group (the outbox has none)
    #[arg(long, value_name = "GROUP", value_parser = args::consumer_group)]
    consumer_group: Option<String>,
    /// Rows of this failure group: its fingerprint (see omnibox failures)
    #[arg(long, value_name = "FINGERPRINT")]
    fingerprint: Option<String>,
    /// Not a selector here: --fingerprint or --consumer-group says which
    #[arg(long, hide = true, value_name = "VALUE")]
    group: Option<String>,
    /// Rows that failed at or after this time (RFC 3339, or a duration ago such as 2h)
    #[arg(long, allow_hyphen_values = true, value_parser = args::since, value_name = "TIME")]
    since: Option<Timestamp>,
    /// Rows that failed before this time
    #[arg(long, allow_hyphen_values = true, value_parser = args::since, value_name = "TIME")]
    until: Option<Timestamp>,
    /// Every failed row (explicitly)
    #[arg(long)]
    all: bool,
    /// Select pending rows waiting for a retry instead of failed ones, and
    /// make them due now (attempts and last error stay)
    #[arg(long)]
    pending: bool,
    /// At most this many rows
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    /// At most this many rows per second
    #[arg(long, value_name = "ROWS_PER_SECOND", value_parser = clap::value_parser!(u32).range(1..))]
    rate: Option<u32>,
    /// Why (recorded in the audit trail)
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    #[command(flatten)]
    safety: SafetyArgs,
}

/// `replay`'s rows in the help: "Rows of this event type".
#[derive(Debug)]
struct Wording;

impl FilterWording for Wording {
    const ROWS: &'static str = "Rows of this";
}

impl ReplayArgs {
    /// The audit entry of this replay: the selectors and how many rows
    /// they picked.
    fn audit_entry(&self, selected: usize) -> AuditEntry {
        let mut entry = AuditEntry::new(self.safety.actor(), self.action());
        entry.reason = self.reason.clone();
        entry.details = json!({
            "event_type": self.rows.event_type, "topic": self.rows.topic, "source": self.rows.source, "error_contains": self.error_contains,
            "consumer_group": self.consumer_group, "fingerprint": self.fingerprint, "since": self.since.map(|t| time::format(&t)), "until": self.until.map(|t| time::format(&t)),
            "all": self.all, "limit": self.limit, "rate": self.rate, "selected": selected,
        });
        entry
    }

    /// The audit trail's action: `replay`, or `replay-pending`.
    fn action(&self) -> &'static str {
        if self.pending {
            "replay-pending"
        } else {
            "replay"
        }
    }

    fn that_id(&self) -> &'static str {
        if self.ids.len() == 1 {
            "that id"
        } else {
            "those ids"
        }
    }
}

pub async fn run(args: ReplayArgs, ctx: &Context) -> Result<ExitStatus> {
    if let Some(value) = &args.group {
        // `--group` is a consumer group in `inbox consume`: here it would
        // silently match nothing for the one or the other meaning.
        return Err(UsageError(format!(
            "replay has no --group: write --fingerprint {value} for a failure group (see `omnibox failures`), or --consumer-group {value} for the inbox rows of a consumer group"
        ))
        .into());
    }
    let table = match args.table {
        Some(RowsArg::Outbox) => Some(Table::Outbox),
        Some(RowsArg::Inbox) => Some(Table::Inbox),
        Some(RowsArg::DeadLetters) | None => None,
    };
    let tables = args.rows.covered(table, &args.consumer_group)?;
    let filter = RequeueFilter {
        failures: FailureSelector {
            ids: args.ids.clone(),
            select: args.rows.selector(&args.consumer_group),
            error_contains: args.error_contains.clone(),
            window: TimeWindow {
                since: args.since,
                until: args.until,
            },
        },
        all: args.all,
        limit: None,
    };
    if filter.selects_nothing() && args.fingerprint.is_none() && !args.all {
        return Err(UsageError(
            "replay needs a selector: --id, --event-type, --topic/--source, --consumer-group, --error-contains, --fingerprint, --since/--until, or --all"
                .into(),
        )
        .into());
    }
    if args.pending && args.table == Some(RowsArg::DeadLetters) {
        return Err(UsageError(
            "--pending selects pending event rows waiting for a retry; dead letters are failed events (replay them without --pending)".into(),
        )
        .into());
    }
    // The audit row is checked before anything changes.
    let mut probe = AuditEntry::new(args.safety.actor(), args.action());
    probe.reason = args.reason.clone();
    omnibox::store::audit::check(&probe)?;
    let store = ctx.store().await?;
    if args.table == Some(RowsArg::DeadLetters) {
        return replay_letters(&store, &args, DeadLetterFilter::of_events(&filter), ctx).await;
    }
    replay(&store, &tables, &args, filter, ctx).await
}

async fn replay_letters(
    store: &AnyStore,
    args: &ReplayArgs,
    filter: DeadLetterFilter,
    ctx: &Context,
) -> Result<ExitStatus> {
    let letters =
        replay::select_letters(store, &filter, args.fingerprint.as_deref(), args.limit).await?;
    if letters.is_empty() {
        print_letters(ctx, &[], &[], args.safety.dry_run, 0)?;
        if !args.ids.is_empty() {
            crate::cli::output::notice!(
                "omnibox: no open dead letter with {} (`omnibox list --table dead-letters` shows them; replayed ones are not replayed twice)",
                args.that_id()
            );
        }
        return Ok(ExitStatus::No);
    }
    if args.safety.dry_run {
        print_letters(ctx, &letters, &[], true, letters.len())?;
        return Ok(ExitStatus::Success);
    }
    if !args
        .safety
        .confirm(&format!("replay {} dead letter(s)", letters.len()))?
    {
        crate::cli::output::notice!("omnibox: nothing changed");
        return Ok(ExitStatus::No);
    }
    let ids: Vec<Uuid> = letters.iter().map(|l| l.id).collect();
    let DeadLetterReplay {
        replayed,
        closed,
        left,
    } = replay::letters(store, &ids, args.rate, &args.audit_entry(ids.len())).await?;
    print_letters(ctx, &replayed, &closed, false, ids.len())?;
    for (l, why) in &closed {
        crate::cli::output::notice!(
            "omnibox: dead letter {} (event {}) closed without a replay: {why}",
            l.id,
            l.event_id
        );
    }
    if replayed.len() + closed.len() < ids.len() {
        for (l, why) in &left {
            crate::cli::output::notice!(
                "omnibox: dead letter {} (event {}) left open: {why}",
                l.id,
                l.event_id
            );
        }
        let gone = ids.len() - replayed.len() - closed.len() - left.len();
        if gone > 0 {
            crate::cli::output::notice!(
                "omnibox: {gone} selected dead letter(s) were replayed meanwhile and were left alone"
            );
        }
        return Ok(ExitStatus::Partial);
    }
    Ok(ExitStatus::Success)
}

fn print_letters(
    ctx: &Context,
    letters: &[DeadLetterRecord],
    closed: &[(DeadLetterRecord, String)],
    dry_run: bool,
    selected: usize,
) -> Result<()> {
    match ctx.format() {
        Format::Json => output::json(&json!({
            "table": DEAD_LETTERS,
            "dry_run": dry_run,
            "replayed": if dry_run { 0 } else { letters.len() },
            "selected": selected,
            "ids": letters.iter().map(|l| l.id).collect::<Vec<_>>(),
            "event_ids": letters.iter().map(|l| l.event_id).collect::<Vec<_>>(),
            "closed": closed.iter().map(|(l, why)| json!({"id": l.id, "event_id": l.event_id, "why": why})).collect::<Vec<_>>(),
        })),
        Format::Table => {
            if letters.is_empty() && closed.is_empty() {
                return output::line("No open dead letters match.");
            }
            if !letters.is_empty() {
                output::line(letter_table(letters))?;
            }
            if dry_run {
                output::line(format!(
                    "Dry run: {} dead letter(s) would be replayed; nothing changed.",
                    letters.len()
                ))
            } else {
                output::line(format!(
                    "Replayed {} dead letter(s): their events are pending again.",
                    letters.len()
                ))
            }
        }
    }
}

/// "2 failed outbox event(s)", or "3 failed event(s) (2 outbox, 1 inbox)"
/// when rows of both tables are among `rows`.
fn count_text(rows: &[Candidate], adjective: &str) -> String {
    let outbox = rows.iter().filter(|r| r.table == Table::Outbox).count();
    let inbox = rows.len() - outbox;
    match (outbox, inbox) {
        (n, 0) if n > 0 => format!("{n} {adjective}outbox event(s)"),
        (0, n) if n > 0 => format!("{n} {adjective}inbox event(s)"),
        (o, i) => format!("{} {adjective}event(s) ({o} outbox, {i} inbox)", o + i),
    }
}

async fn replay(
    store: &AnyStore,
    tables: &[Table],
    args: &ReplayArgs,
    filter: RequeueFilter,
    ctx: &Context,
) -> Result<ExitStatus> {
    let selection = Selection {
        tables: tables.to_vec(),
        filter,
        fingerprint: args.fingerprint.clone(),
        pending: args.pending,
        limit: args.limit,
    };
    let rows = replay::select(store, &selection).await?;
    let names = crate::cli::output::join(tables.iter(), " or ");
    if rows.is_empty() {
        print(ctx, args, tables, &rows, args.safety.dry_run, 0)?;
        if !args.ids.is_empty() {
            if args.pending {
                crate::cli::output::notice!(
                    "omnibox: no pending {names} event waiting for a retry with {} (--pending takes unlocked pending rows that failed and wait for their backoff; `omnibox show ID` tells where a row stands)",
                    args.that_id()
                );
            } else {
                crate::cli::output::notice!(
                    "omnibox: no failed {names} event with {} (replay requeues failed rows; --pending retries pending ones waiting for their backoff now; `omnibox show ID` tells where a row stands)",
                    args.that_id()
                );
            }
        }
        return Ok(ExitStatus::No);
    }
    if args.safety.dry_run {
        print(ctx, args, tables, &rows, true, 0)?;
        return Ok(ExitStatus::Success);
    }
    let question = if args.pending {
        format!("make {} due now", count_text(&rows, "pending "))
    } else {
        format!("replay {}", count_text(&rows, "failed "))
    };
    if !args.safety.confirm(&question)? {
        crate::cli::output::notice!("omnibox: nothing changed");
        return Ok(ExitStatus::No);
    }
    // Requeue by id, in chunks paced by --rate; each chunk of a table and
    // its audit row commit together.
    let selected = rows.len();
    let done = replay::requeue(
        store,
        &rows,
        args.pending,
        args.rate,
        &args.audit_entry(selected),
    )
    .await?;
    let replayed: Vec<Candidate> = rows.into_iter().filter(|r| done.contains(&r.id)).collect();
    print(ctx, args, tables, &replayed, false, selected)?;
    if done.len() < selected {
        crate::cli::output::notice!(
            "omnibox: {} of {selected} selected rows changed meanwhile (no longer {}) and were left alone",
            selected - done.len(),
            if args.pending {
                "pending, unlocked and due later"
            } else {
                "failed"
            }
        );
        return Ok(ExitStatus::Partial);
    }
    Ok(ExitStatus::Success)
}

fn print(
    ctx: &Context,
    args: &ReplayArgs,
    tables: &[Table],
    rows: &[Candidate],
    dry_run: bool,
    selected: usize,
) -> Result<()> {
    match ctx.format() {
        Format::Json => {
            let mut v = json!({
                "table": tables_name(tables),
                "dry_run": dry_run,
                "replayed": if dry_run { 0 } else { rows.len() },
                "selected": if dry_run { rows.len() } else { selected },
                "ids": rows.iter().map(|r| r.id).collect::<Vec<_>>(),
                "tables": tables.iter().map(|t| json!({
                    "table": t,
                    "ids": rows.iter().filter(|r| r.table == *t).map(|r| r.id).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            });
            if args.pending {
                v["pending"] = json!(true);
            }
            output::json(&v)
        }
        Format::Table => {
            if rows.is_empty() {
                return output::line(if args.pending {
                    "No pending events waiting for a retry match."
                } else {
                    "No failed events match."
                });
            }
            let mut header = vec!["table", "id", "event type", "attempts", "failed at"];
            if args.pending {
                header.push("due at");
            }
            header.push("last error");
            let mut t = output::table(header);
            for r in rows {
                let mut cells = vec![
                    r.table.to_string(),
                    r.id.to_string(),
                    r.event_type.clone(),
                    format!("{}/{}", r.attempts_made, r.max_attempts),
                    time::format(&r.updated_at),
                ];
                if args.pending {
                    cells.push(time::format(&r.scheduled_at));
                }
                cells.push(ellipsize(r.last_error.as_deref().unwrap_or("-"), 60));
                t.add_row(cells);
            }
            output::line(t)?;
            match (dry_run, args.pending) {
                (true, false) => output::line(format!(
                    "Dry run: {} would be replayed; nothing changed.",
                    count_text(rows, "")
                )),
                (false, false) => output::line(format!("Replayed {}.", count_text(rows, ""))),
                (true, true) => output::line(format!(
                    "Dry run: {} would be due now; nothing changed.",
                    count_text(rows, "pending ")
                )),
                (false, true) => output::line(format!(
                    "Made {} due now (attempts and last error kept).",
                    count_text(rows, "pending ")
                )),
            }
        }
    }
}
