//! `omnibox list`: rows with filters.

use anyhow::Result;
use clap::Args;
use omnibox::store::dead_letters::{DEAD_LETTERS, DeadLetterFilter, DeadLetterRecord};
use omnibox::store::{AnyStore, ListFilter};
use omnibox::{Event, EventStatus, EventStore, Route, Table, Timestamp, time};
use serde_json::json;

use super::output::{self, Format, ellipsize};
use super::{Context, ExitStatus, UsageError, args};

/// List events with filters, oldest first
///
/// Examples:
///   omnibox list --status failed
///   omnibox list --table inbox --since 2h --limit 20
///   omnibox list --topic orders --event-type order.created --format json
///   omnibox list --consumer-group billing --status pending   # inbox rows of a group
///   omnibox list --table dead-letters --since 1d     # kept by --dlq table
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ListArgs {
    /// Which table [default: outbox; inbox with --consumer-group]
    #[arg(long, value_enum)]
    table: Option<RowsArg>,
    /// Only this status: pending, completed or failed
    #[arg(long, value_parser = parse_status)]
    status: Option<EventStatus>,
    /// Only this event type
    #[arg(long, value_name = "TYPE")]
    event_type: Option<String>,
    /// Only this topic (outbox) or source (inbox)
    #[arg(long, alias = "source")]
    topic: Option<String>,
    /// Only inbox rows of this consumer group (the outbox has none)
    #[arg(long, value_name = "GROUP", value_parser = args::consumer_group)]
    consumer_group: Option<String>,
    /// Only rows created (dead letters: written) since: RFC 3339 (2026-01-31T12:00:00Z) or a duration ago (2h)
    #[arg(long, allow_hyphen_values = true, value_parser = args::since, value_name = "TIME")]
    since: Option<Timestamp>,
    /// Most rows to show
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    limit: u32,
    /// Start after this sequence number (paging: pass the last seq shown)
    #[arg(long, value_name = "SEQ")]
    after: Option<i64>,
    /// Only rows locked by this worker (see `omnibox unlock --worker`)
    #[arg(long, value_name = "WORKER")]
    locked_by: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TableArg {
    Outbox,
    Inbox,
}

/// The tables `list` and `replay` read: the event tables, or the dead
/// letters kept by `--dlq table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RowsArg {
    Outbox,
    Inbox,
    /// omnibox_dead_letters (copies of events that failed, kept by --dlq table)
    DeadLetters,
}

impl From<TableArg> for Table {
    fn from(t: TableArg) -> Table {
        match t {
            TableArg::Outbox => Table::Outbox,
            TableArg::Inbox => Table::Inbox,
        }
    }
}

fn parse_status(s: &str) -> Result<EventStatus, String> {
    s.parse::<EventStatus>().map_err(|e| match e {
        omnibox::Error::Validation { message, .. } => message,
        other => other.to_string(),
    })
}

pub async fn run(args: ListArgs, ctx: &Context) -> Result<ExitStatus> {
    let table = match (args.table, &args.consumer_group) {
        (Some(RowsArg::Outbox), Some(_)) => {
            return Err(UsageError(
                "--consumer-group selects inbox rows, and outbox rows have no consumer group: use --table inbox (or leave --table out)".into(),
            )
            .into());
        }
        (Some(RowsArg::DeadLetters), _) => return dead_letters(args, ctx).await,
        (Some(RowsArg::Outbox), None) | (None, None) => Table::Outbox,
        (Some(RowsArg::Inbox), _) | (None, Some(_)) => Table::Inbox,
    };
    let store: AnyStore = ctx.store().await?;
    let filter = ListFilter {
        status: args.status,
        event_type: args.event_type.clone(),
        topic: args.topic.clone(),
        consumer_group: args.consumer_group.clone(),
        since: args.since,
        after_seq: args.after,
        locked_by: args.locked_by.clone(),
        limit: Some(args.limit),
    };
    match table {
        Table::Outbox => {
            let rows = store.outbox().list(&filter).await?;
            print(ctx, table, &rows, |e| {
                (e.topic().to_string(), e.partition_key().to_string())
            })
        }
        Table::Inbox => {
            let rows = store.inbox().list(&filter).await?;
            print(ctx, table, &rows, |e| {
                (e.source().to_string(), e.message_id().to_string())
            })
        }
    }
}

fn print<R: Route + serde::Serialize>(
    ctx: &Context,
    table: Table,
    rows: &[Event<R>],
    route: impl Fn(&Event<R>) -> (String, String),
) -> Result<ExitStatus> {
    match ctx.format() {
        Format::Json => output::json(&json!({ "table": table, "events": rows }))?,
        Format::Table => {
            let (topic, key) = match table {
                Table::Outbox => ("topic", "key"),
                Table::Inbox => ("source", "message id"),
            };
            let mut t = output::table([
                "seq",
                "id",
                "status",
                "event type",
                topic,
                key,
                "attempts",
                "scheduled at",
                "locked by",
                "last error",
            ]);
            for e in rows {
                let (topic, key) = route(e);
                t.add_row(vec![
                    e.seq().map(|s| s.to_string()).unwrap_or_default(),
                    e.id().to_string(),
                    e.status().to_string(),
                    e.event_type().to_string(),
                    topic,
                    ellipsize(&key, 40),
                    format!("{}/{}", e.attempts_made(), e.max_attempts()),
                    time::format(&e.scheduled_at()),
                    e.locked_by().unwrap_or("-").to_string(),
                    e.last_error()
                        .map(|m| ellipsize(m, 50))
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            if rows.is_empty() {
                output::line("No events match.")?;
            } else {
                output::line(t)?;
            }
        }
    }
    Ok(ExitStatus::Success)
}

async fn dead_letters(args: ListArgs, ctx: &Context) -> Result<ExitStatus> {
    if args.status.is_some() || args.locked_by.is_some() {
        return Err(UsageError(
            "--status and --locked-by apply to the outbox and inbox tables; dead letters are failed events (replayed ones show a replayed time)".into(),
        )
        .into());
    }
    let store: AnyStore = ctx.store().await?;
    let letters = store
        .dead_letters()
        .list(&DeadLetterFilter {
            event_type: args.event_type.clone(),
            topic: args.topic.clone(),
            consumer_group: args.consumer_group.clone(),
            since: args.since,
            after_seq: args.after,
            limit: Some(args.limit),
            ..DeadLetterFilter::default()
        })
        .await?;
    match ctx.format() {
        Format::Json => output::json(&json!({ "table": DEAD_LETTERS, "dead_letters": letters }))?,
        Format::Table => {
            if letters.is_empty() {
                output::line("No dead letters match.")?;
            } else {
                output::line(letter_table(&letters))?;
            }
        }
    }
    Ok(ExitStatus::Success)
}

/// Dead letters as a table (shared with `replay`).
pub fn letter_table(letters: &[DeadLetterRecord]) -> comfy_table::Table {
    let mut t = output::table([
        "seq",
        "id",
        "table",
        "event id",
        "event type",
        "topic/source",
        "attempts",
        "dead at",
        "replayed at",
        "error",
    ]);
    for l in letters {
        t.add_row(vec![
            l.seq.to_string(),
            l.id.to_string(),
            l.origin.to_string(),
            l.event_id.to_string(),
            l.event_type.clone(),
            ellipsize(&l.topic, 40),
            l.attempts_made.to_string(),
            time::format(&l.dead_at),
            l.replayed_at
                .map_or_else(|| "-".into(), |t| time::format(&t)),
            ellipsize(&l.error, 50),
        ]);
    }
    t
}
