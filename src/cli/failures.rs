//! `omnibox failures`: failed rows grouped by cause.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;
use omnibox::store::fingerprint;
use omnibox::{MaintenanceStore, Route, Table, Timestamp, time};
use serde::Serialize;
use uuid::Uuid;

use super::list::{TableArg, TableFilters, covered, tables_name};
use super::output::{self, Format, ellipsize};
use super::{Context, ExitStatus};

/// Group failed events by event type and error cause
///
/// The cause is the last error with ids, numbers and quoted values masked;
/// its fingerprint selects the group for `omnibox replay --fingerprint`.
/// Without --table both event tables are grouped, each group with its table.
///
/// Examples:
///   omnibox failures
///   omnibox failures --table inbox --format json
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct FailuresArgs {
    /// Which table [default: both]
    #[arg(long, value_enum)]
    table: Option<TableArg>,
}

/// One group; `--format json` prints `{"table", "groups": [...]}`.
#[derive(Debug, Serialize)]
struct Group {
    table: Table,
    fingerprint: String,
    event_type: String,
    error: String,
    count: u64,
    #[serde(with = "ts")]
    first_seen: Timestamp,
    #[serde(with = "ts")]
    last_seen: Timestamp,
    sample_id: Uuid,
}

mod ts {
    pub fn serialize<S: serde::Serializer>(
        t: &omnibox::Timestamp,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&omnibox::time::format(t))
    }
}

pub async fn run(args: FailuresArgs, ctx: &Context) -> Result<ExitStatus> {
    let tables = covered(args.table.map(Table::from), TableFilters::default())?;
    let store = ctx.store().await?;
    let mut groups = Vec::new();
    for t in &tables {
        groups.extend(match t {
            Table::Outbox => groups_of(&store.outbox()).await?,
            Table::Inbox => groups_of(&store.inbox()).await?,
        });
    }
    // Most rows first, whatever their table.
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.table.as_str().cmp(b.table.as_str()).reverse())
            .then(a.fingerprint.cmp(&b.fingerprint))
    });
    match ctx.format() {
        Format::Json => {
            output::json(&serde_json::json!({"table": tables_name(&tables), "groups": groups}))?
        }
        Format::Table => {
            if groups.is_empty() {
                let names = crate::cli::output::join(tables.iter(), " or ");
                output::line(format!("No failed {names} events."))?;
            } else {
                let mut t = output::table([
                    "table",
                    "fingerprint",
                    "event type",
                    "count",
                    "first seen",
                    "last seen",
                    "sample id",
                    "error",
                ]);
                for g in &groups {
                    t.add_row(vec![
                        g.table.to_string(),
                        g.fingerprint.clone(),
                        g.event_type.clone(),
                        g.count.to_string(),
                        time::format(&g.first_seen),
                        time::format(&g.last_seen),
                        g.sample_id.to_string(),
                        ellipsize(&g.error, 60),
                    ]);
                }
                output::line(t)?;
            }
        }
    }
    Ok(ExitStatus::Success)
}

async fn groups_of<R: Route, S: MaintenanceStore<R>>(table: &S) -> Result<Vec<Group>> {
    // Grouped by exact error in the database: every failed row counted,
    // no row read; the groups are then folded by fingerprint.
    // Folded as they arrive: errors that differ in every row (an id in
    // each) cost one group per fingerprint here, not one per row.
    let mut map: BTreeMap<String, Group> = BTreeMap::new();
    table
        .failed_errors(&mut |e| {
            let error = e.error.as_deref().unwrap_or("");
            let fp = fingerprint::fingerprint(&e.event_type, error);
            let g = map.entry(fp.clone()).or_insert_with(|| Group {
                table: R::TABLE,
                fingerprint: fp,
                event_type: e.event_type.clone(),
                error: fingerprint::normalize_error(error),
                count: 0,
                first_seen: e.first_seen,
                last_seen: e.last_seen,
                sample_id: e.sample_id,
            });
            g.count += e.count;
            g.first_seen = g.first_seen.min(e.first_seen);
            g.last_seen = g.last_seen.max(e.last_seen);
        })
        .await?;
    Ok(map.into_values().collect())
}
