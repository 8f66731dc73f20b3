//! `omnibox failures`: failed rows grouped by cause.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;
use omnibox::store::fingerprint;
use omnibox::{MaintenanceStore, Route, Table, Timestamp, time};
use serde::Serialize;
use uuid::Uuid;

use super::list::TableArg;
use super::output::{self, Format, ellipsize};
use super::{Context, ExitStatus};

/// Group failed events by event type and error cause
///
/// The cause is the last error with ids, numbers and quoted values masked;
/// its fingerprint selects the group for `omnibox replay --fingerprint`.
///
/// Examples:
///   omnibox failures
///   omnibox failures --table inbox --format json
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct FailuresArgs {
    /// Which table
    #[arg(long, value_enum, default_value_t = TableArg::Outbox)]
    table: TableArg,
}

/// One group; `--format json` prints `{"table", "groups": [...]}`.
#[derive(Debug, Serialize)]
struct Group {
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
    let store = ctx.store().await?;
    let groups = match Table::from(args.table) {
        Table::Outbox => groups(&store.outbox()).await?,
        Table::Inbox => groups(&store.inbox()).await?,
    };
    let table = Table::from(args.table).to_string();
    match ctx.format() {
        Format::Json => output::json(&serde_json::json!({"table": table, "groups": groups}))?,
        Format::Table => {
            if groups.is_empty() {
                output::line(format!("No failed {table} events."))?;
            } else {
                let mut t = output::table([
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

async fn groups<R: Route, S: MaintenanceStore<R>>(table: &S) -> Result<Vec<Group>> {
    // Grouped by exact error in the database: every failed row counted,
    // no row read; the groups are then folded by fingerprint.
    let mut map: BTreeMap<String, Group> = BTreeMap::new();
    for e in table.failed_errors().await? {
        let error = e.error.as_deref().unwrap_or("");
        let fp = fingerprint::fingerprint(&e.event_type, error);
        let g = map.entry(fp.clone()).or_insert_with(|| Group {
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
    }
    let mut out: Vec<Group> = map.into_values().collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.fingerprint.cmp(&b.fingerprint))
    });
    Ok(out)
}
