//! `omnibox show ID`: one row in full.

use anyhow::Result;
use clap::Args;
use omnibox::{Event, EventStore, InboxRoute, OutboxRoute, Route, Table, time};
use serde_json::json;
use uuid::Uuid;

use super::list::{TableArg, letter_table};
use super::output::{self, Format};
use super::{Context, ExitStatus, args};
use omnibox::store::FailureSelector;
use omnibox::store::dead_letters::{DEAD_LETTERS, DeadLetterFilter};

/// Show one event in full, with its payload as pretty JSON
///
/// Looks in the outbox, then the inbox, unless --table is given. An event
/// whose row is gone (cleanup) but which was kept as a dead letter (--dlq
/// table) shows its letters. Exits 1 when no event has this id.
///
/// Examples:
///   omnibox show 0190f1d2-7a3b-7cde-8f00-123456789abc
///   omnibox show 0190f1d2-7a3b-7cde-8f00-123456789abc --format json | jq .payload
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ShowArgs {
    /// The event id (a UUID)
    #[arg(value_parser = args::uuid)]
    id: Uuid,
    /// Look only in this table
    #[arg(long, value_enum)]
    table: Option<TableArg>,
}

/// A row's route fields, as `show` lists them after its event type: each
/// field's name and how to read it.
type RouteFields<R> = &'static [(&'static str, fn(&Event<R>) -> String)];

/// An outbox row's route fields.
const OUTBOX_ROUTE: RouteFields<OutboxRoute> = &[
    ("aggregate type", |e| e.aggregate_type().to_string()),
    ("aggregate id", |e| e.aggregate_id().to_string()),
    ("topic", |e| e.topic().to_string()),
    ("partition key", |e| e.partition_key().to_string()),
];

/// An inbox row's route fields.
const INBOX_ROUTE: RouteFields<InboxRoute> = &[
    ("message id", |e| e.message_id().to_string()),
    ("consumer group", |e| e.consumer_group().to_string()),
    ("source", |e| e.source().to_string()),
];

pub async fn run(args: ShowArgs, ctx: &Context) -> Result<ExitStatus> {
    let store = ctx.store().await?;
    let want = |t: Table| args.table.is_none_or(|a| Table::from(a) == t);
    if want(Table::Outbox)
        && let Some(e) = store.outbox().get(args.id).await?
    {
        return print(ctx, &e, OUTBOX_ROUTE);
    }
    if want(Table::Inbox)
        && let Some(e) = store.inbox().get(args.id).await?
    {
        return print(ctx, &e, INBOX_ROUTE);
    }
    if args.table.is_none() {
        let letters = store
            .dead_letters()
            .list(&DeadLetterFilter {
                failures: FailureSelector {
                    ids: vec![args.id],
                    ..FailureSelector::default()
                },
                ..DeadLetterFilter::default()
            })
            .await?;
        if !letters.is_empty() {
            match ctx.format() {
                Format::Json => {
                    output::json(&json!({ "table": DEAD_LETTERS, "dead_letters": letters }))?
                }
                Format::Table => {
                    output::line(letter_table(&letters))?;
                    for l in &letters {
                        output::line(format!(
                            "event {} as it failed:\n{}",
                            l.event_id,
                            serde_json::to_string_pretty(&l.event)?
                        ))?;
                    }
                }
            }
            if letters.iter().any(|l| l.replayed_at.is_none()) {
                crate::cli::output::notice!(
                    "omnibox: no row has this id any more; `omnibox replay --table dead-letters --id {}` brings the event back",
                    args.id
                );
            }
            return Ok(ExitStatus::Success);
        }
    }
    let place = match args.table {
        Some(t) => Table::from(t).to_string(),
        None => "the outbox, the inbox or the dead letters".to_string(),
    };
    crate::cli::output::notice!("omnibox: no event {} in {place}", args.id);
    Ok(ExitStatus::No)
}

fn print<R: Route + serde::Serialize>(
    ctx: &Context,
    e: &Event<R>,
    route: RouteFields<R>,
) -> Result<ExitStatus> {
    match ctx.format() {
        Format::Json => {
            let mut v = serde_json::to_value(e)?;
            v["table"] = json!(e.table());
            output::json(&v)?;
        }
        Format::Table => {
            let opt = |v: Option<&str>| v.unwrap_or("-").to_string();
            let ts = |v: Option<omnibox::Timestamp>| {
                v.map(|t| time::format(&t)).unwrap_or_else(|| "-".into())
            };
            let mut rows: Vec<(&str, String)> = vec![
                ("table", e.table().to_string()),
                ("id", e.id().to_string()),
                ("seq", e.seq().map(|s| s.to_string()).unwrap_or_default()),
                ("status", e.status().to_string()),
                ("event type", e.event_type().to_string()),
            ];
            rows.extend(route.iter().map(|(name, read)| (*name, read(e))));
            rows.extend([
                (
                    "attempts",
                    format!("{}/{}", e.attempts_made(), e.max_attempts()),
                ),
                ("last error", opt(e.last_error())),
                ("created at", time::format(&e.created_at())),
                ("scheduled at", time::format(&e.scheduled_at())),
                ("completed at", ts(e.completed_at())),
                ("locked at", ts(e.locked_at())),
                ("locked by", opt(e.locked_by())),
                ("updated at", time::format(&e.updated_at())),
                ("idempotency key", opt(e.idempotency_key())),
                ("trace id", opt(e.trace_id())),
                ("correlation id", opt(e.correlation_id())),
                ("causation id", opt(e.causation_id())),
                ("schema version", opt(e.schema_version())),
            ]);
            let mut t = output::table(["field", "value"]);
            for (k, v) in rows {
                t.add_row(vec![k.to_string(), v]);
            }
            output::line(t)?;
            if let Some(h) = e.headers() {
                output::line(format!("headers:\n{}", serde_json::to_string_pretty(h)?))?;
            }
            output::line(format!(
                "payload:\n{}",
                serde_json::to_string_pretty(e.payload())?
            ))?;
        }
    }
    Ok(ExitStatus::Success)
}
