//! `omnibox list`: rows with filters.

use anyhow::Result;
use clap::Args;
use omnibox::store::dead_letters::{DEAD_LETTERS, DeadLetterFilter, DeadLetterRecord};
use omnibox::store::{AnyStore, EventSelector, FailureSelector, ListFilter, TimeWindow};
use omnibox::{Event, EventStatus, EventStore, Route, Table, Timestamp, time};
use serde_json::json;

use super::output::{self, Format, ellipsize};
use super::{Context, ExitStatus, UsageError, args};

/// List events with filters, oldest first
///
/// Without --table both event tables are listed (oldest first by creation
/// time, each row with its table), unless a filter belongs to one of them:
/// --topic to the outbox, --source and --consumer-group to the inbox.
/// Paging with --after follows one table's seq: it needs that one table.
///
/// Examples:
///   omnibox list --status failed
///   omnibox list --table inbox --since 2h --limit 20
///   omnibox list --topic orders --event-type order.created --format json
///   omnibox list --topic orders --after 1200          # paging: the outbox's seq
///   omnibox list --locked-by host-3:4121              # what a worker holds, in both tables
///   omnibox list --consumer-group billing --status pending   # inbox rows of a group
///   omnibox list --table dead-letters --since 1d     # kept by --dlq table
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ListArgs {
    /// Which table [default: both event tables, or the one a filter belongs to]
    #[arg(long, value_enum)]
    table: Option<RowsArg>,
    /// Only this status: pending, completed or failed
    #[arg(long, value_parser = parse_status)]
    status: Option<EventStatus>,
    #[command(flatten)]
    rows: RowFilterArgs<Wording>,
    /// Only inbox rows of this consumer group (the outbox has none)
    #[arg(long, value_name = "GROUP", value_parser = args::consumer_group)]
    consumer_group: Option<String>,
    /// Only rows created (dead letters: written) since: RFC 3339 (2026-01-31T12:00:00Z) or a duration ago (2h)
    #[arg(long, allow_hyphen_values = true, value_parser = args::since, value_name = "TIME")]
    since: Option<Timestamp>,
    /// Most rows to show
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    limit: u32,
    /// Start after this sequence number of one table (paging: pass the last seq shown)
    #[arg(long, value_name = "SEQ")]
    after: Option<i64>,
    /// Only rows locked by this worker (see `omnibox unlock --worker`)
    #[arg(long, value_name = "WORKER")]
    locked_by: Option<String>,
}

/// `list`'s rows in the help: "Only this event type".
#[derive(Debug)]
struct Wording;

impl FilterWording for Wording {
    const ROWS: &'static str = "Only this";
}

/// How the help of the row filters `list` and `replay` share names the
/// rows they select.
pub trait FilterWording: std::fmt::Debug + Send + Sync + 'static {
    /// What comes before "event type", "topic" or "source".
    const ROWS: &'static str;
}

/// The row filters of `list` and `replay`: the event type, and the topic
/// (an outbox column) or the source (the inbox's, in the same column).
#[derive(Debug, clap::Args)]
pub struct RowFilterArgs<W: FilterWording> {
    /// The event type.
    #[arg(long, value_name = "TYPE", help = format!("{} event type", W::ROWS))]
    pub event_type: Option<String>,
    /// The topic.
    #[arg(long, value_name = "TOPIC", conflicts_with = "source", help = format!("{} topic (the outbox; with --table inbox, the source)", W::ROWS))]
    pub topic: Option<String>,
    /// The source.
    #[arg(long, value_name = "SOURCE", help = format!("{} source (the inbox; with --table outbox, the topic)", W::ROWS))]
    pub source: Option<String>,
    #[arg(skip)]
    wording: std::marker::PhantomData<W>,
}

impl<W: FilterWording> RowFilterArgs<W> {
    /// The event tables these filters and `consumer_group` cover within
    /// `table`: see [`covered`].
    pub fn covered(
        &self,
        table: Option<Table>,
        consumer_group: &Option<String>,
    ) -> Result<Vec<Table>, UsageError> {
        let given = TableFilters {
            topic: self.topic.is_some(),
            source: self.source.is_some(),
            consumer_group: consumer_group.is_some(),
        };
        covered(table, given)
    }

    /// The events these filters and `consumer_group` select: the event
    /// type, the topic (or source) column's value (`--topic`, else
    /// `--source`) and the consumer group.
    pub fn selector(&self, consumer_group: &Option<String>) -> EventSelector {
        EventSelector {
            event_type: self.event_type.clone(),
            topic: self.topic.clone().or_else(|| self.source.clone()),
            consumer_group: consumer_group.clone(),
        }
    }
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

/// The filters that decide which event tables a command covers.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableFilters {
    /// `--topic` was given (an outbox column).
    pub topic: bool,
    /// `--source` was given (an inbox column).
    pub source: bool,
    /// `--consumer-group` was given (an inbox column).
    pub consumer_group: bool,
}

/// The event tables a command covers, one rule for every command: the one
/// `--table` names; else the one a filter belongs to (`--topic`: the
/// outbox; `--source`, `--consumer-group`: the inbox); else both. A
/// consumer group on the outbox, or filters of both tables without
/// `--table`, are refused rather than matching nothing.
pub fn covered(table: Option<Table>, f: TableFilters) -> Result<Vec<Table>, UsageError> {
    let inbox_only = f.source || f.consumer_group;
    match table {
        Some(Table::Outbox) if f.consumer_group => Err(UsageError(
            "--consumer-group selects inbox rows, and outbox rows have no consumer group: use --table inbox (or leave --table out)".into(),
        )),
        Some(t) => Ok(vec![t]),
        None if f.topic && inbox_only => Err(UsageError(
            "--topic is an outbox column and --consumer-group an inbox one: give --table inbox to select the inbox rows of a source (--source) and a consumer group".into(),
        )),
        None if f.topic => Ok(vec![Table::Outbox]),
        None if inbox_only => Ok(vec![Table::Inbox]),
        None => Ok(Table::ALL.to_vec()),
    }
}

/// The `"table"` of a JSON report: the one table, or `"both"`.
pub fn tables_name(tables: &[Table]) -> &'static str {
    match tables {
        [one] => one.as_str(),
        _ => "both",
    }
}

fn parse_status(s: &str) -> Result<EventStatus, String> {
    s.parse::<EventStatus>().map_err(args::refusal)
}

pub async fn run(args: ListArgs, ctx: &Context) -> Result<ExitStatus> {
    let table = match args.table {
        Some(RowsArg::DeadLetters) => return dead_letters(args, ctx).await,
        Some(RowsArg::Outbox) => Some(Table::Outbox),
        Some(RowsArg::Inbox) => Some(Table::Inbox),
        None => None,
    };
    let tables = args.rows.covered(table, &args.consumer_group)?;
    if args.after.is_some() && tables.len() > 1 {
        return Err(UsageError(
            "--after pages one table by its seq: add --table outbox or --table inbox".into(),
        )
        .into());
    }
    let store: AnyStore = ctx.store().await?;
    let filter = ListFilter {
        status: args.status,
        select: args.rows.selector(&args.consumer_group),
        since: args.since,
        after_seq: args.after,
        locked_by: args.locked_by.clone(),
        limit: Some(args.limit),
    };
    let mut outbox = Vec::new();
    let mut inbox = Vec::new();
    for t in &tables {
        match t {
            Table::Outbox => {
                let rows = store.outbox().list(&filter).await?;
                outbox = Listed::all(*t, &rows, |e| (e.topic(), e.partition_key()))?;
            }
            Table::Inbox => {
                let rows = store.inbox().list(&filter).await?;
                inbox = Listed::all(*t, &rows, |e| (e.source(), e.message_id()))?;
            }
        }
    }
    // Each table's rows are in insertion order; both: oldest first.
    let mut rows = omnibox::ops::merge_by(outbox, inbox, |r| r.created_at);
    rows.truncate(args.limit as usize);
    print(ctx, &tables, &rows)
}

/// One listed row, of either table.
struct Listed {
    table: Table,
    created_at: Timestamp,
    /// The event as JSON, with its `"table"`.
    json: serde_json::Value,
    cells: Vec<String>,
}

impl Listed {
    /// `rows` of `table`; `names` gives each one's topic (or source) and key
    /// (or message id).
    fn all<R: Route + serde::Serialize>(
        table: Table,
        rows: &[Event<R>],
        names: impl Fn(&Event<R>) -> (&str, &str),
    ) -> Result<Vec<Listed>> {
        rows.iter()
            .map(|e| {
                let (topic, key) = names(e);
                Listed::of(table, e, topic, key)
            })
            .collect()
    }

    fn of<R: Route + serde::Serialize>(
        table: Table,
        e: &Event<R>,
        topic: &str,
        key: &str,
    ) -> Result<Listed> {
        let mut json = serde_json::to_value(e)?;
        json["table"] = json!(table);
        Ok(Listed {
            table,
            created_at: e.created_at(),
            json,
            cells: vec![
                table.to_string(),
                e.seq().map(|s| s.to_string()).unwrap_or_default(),
                e.id().to_string(),
                e.status().to_string(),
                e.event_type().to_string(),
                topic.to_string(),
                ellipsize(key, 40),
                format!("{}/{}", e.attempts_made(), e.max_attempts()),
                time::format(&e.scheduled_at()),
                e.locked_by().unwrap_or("-").to_string(),
                e.last_error()
                    .map(|m| ellipsize(m, 50))
                    .unwrap_or_else(|| "-".into()),
            ],
        })
    }
}

fn print(ctx: &Context, tables: &[Table], rows: &[Listed]) -> Result<ExitStatus> {
    match ctx.format() {
        Format::Json => output::json(&json!({
            "table": tables_name(tables),
            "events": rows.iter().map(|r| &r.json).collect::<Vec<_>>(),
        }))?,
        Format::Table => {
            let (topic, key) = match tables {
                [Table::Outbox] => ("topic", "key"),
                [Table::Inbox] => ("source", "message id"),
                _ => ("topic/source", "key/message id"),
            };
            let mut t = output::table([
                "table",
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
            for r in rows {
                debug_assert!(tables.contains(&r.table));
                t.add_row(r.cells.clone());
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
            failures: FailureSelector {
                select: args.rows.selector(&args.consumer_group),
                window: TimeWindow {
                    since: args.since,
                    until: None,
                },
                ..FailureSelector::default()
            },
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
