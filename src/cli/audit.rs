//! `omnibox audit`: the recorded operator actions.

use anyhow::Result;
use clap::Args;
use omnibox::store::audit::AuditFilter;
use omnibox::{Timestamp, time};
use uuid::Uuid;

use super::output::{self, Format, ellipsize};
use super::{Context, ExitStatus, args};

/// Show recorded replays, unlocks, stale-lock releases and cleanups
///
/// Examples:
///   omnibox audit
///   omnibox audit --action unlock --since 24h
///   omnibox audit --id 0190f1d2-7a3b-7cde-8f00-123456789abc --format json
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct AuditArgs {
    /// Only this action: replay, unlock, unlock-worker, release-stale-locks, cleanup
    #[arg(long)]
    action: Option<String>,
    /// Only entries since: RFC 3339 or a duration ago (24h)
    #[arg(long, allow_hyphen_values = true, value_parser = args::since, value_name = "TIME")]
    since: Option<Timestamp>,
    /// Only entries that touched this event
    #[arg(long, value_parser = args::uuid, value_name = "UUID")]
    id: Option<Uuid>,
    /// Most entries, newest first
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

pub async fn run(args: AuditArgs, ctx: &Context) -> Result<ExitStatus> {
    let store = ctx.store().await?;
    let entries = store
        .audit(&AuditFilter {
            action: args.action,
            since: args.since,
            id: args.id,
            limit: Some(args.limit),
        })
        .await?;
    match ctx.format() {
        Format::Json => output::json(&serde_json::json!({ "entries": entries }))?,
        Format::Table => {
            if entries.is_empty() {
                output::line("No recorded actions.")?;
            } else {
                let mut t = output::table(["at", "actor", "action", "table", "rows", "reason"]);
                for e in &entries {
                    t.add_row(vec![
                        time::format(&e.at),
                        e.actor.clone(),
                        e.action.clone(),
                        e.table.clone().unwrap_or_else(|| "-".into()),
                        e.count.to_string(),
                        ellipsize(e.reason.as_deref().unwrap_or("-"), 50),
                    ]);
                }
                output::line(t)?;
            }
        }
    }
    Ok(ExitStatus::Success)
}
