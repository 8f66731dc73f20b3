//! `omnibox status`: counts per table and status.

use anyhow::Result;
use clap::Args;
use omnibox::EventStore;
use serde_json::json;

use super::output::{self, Format, human_duration};
use super::{Context, ExitStatus};

/// Show counts per table and status, locks, the oldest pending event, and what is due
///
/// Examples:
///   omnibox status
///   omnibox status --format json | jq '.tables[] | select(.table == "outbox") | .pending'
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct StatusArgs {}

pub async fn run(_args: StatusArgs, ctx: &Context) -> Result<ExitStatus> {
    let store = ctx.store().await?;
    let tables = vec![
        store.outbox().counts().await?,
        store.inbox().counts().await?,
    ];
    match ctx.format() {
        Format::Json => {
            let tables: Vec<_> = tables
                .iter()
                .map(|c| {
                    let mut v = serde_json::to_value(c).expect("counts serialise");
                    v["oldest_pending_age_seconds"] =
                        json!(c.oldest_pending_age().map(|d| d.as_secs_f64()));
                    v
                })
                .collect();
            output::json(&json!({ "tables": tables }))?;
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
            ]);
            for c in &tables {
                t.add_row(vec![
                    c.table.to_string(),
                    c.pending.to_string(),
                    c.locked.to_string(),
                    c.due_now.to_string(),
                    c.oldest_pending_age()
                        .map(human_duration)
                        .unwrap_or_else(|| "-".into()),
                    c.completed.to_string(),
                    c.failed.to_string(),
                ]);
            }
            output::line(t)?;
        }
    }
    Ok(ExitStatus::Success)
}
