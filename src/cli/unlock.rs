//! `omnibox unlock`: force-unlock a row, or every row of a dead worker.

use anyhow::Result;
use clap::Args;
use omnibox::store::audit::{AuditEntry, AuditedChange};
use omnibox::{EventStore, Route, Table, UnlockReason, WorkerId};
use serde_json::json;
use uuid::Uuid;

use super::list::TableArg;
use super::output::{self, Format};
use super::safety::SafetyArgs;
use super::{Context, ExitStatus, UsageError, args};

/// Force-unlock one event, or every event a dead worker holds
///
/// The lock is cleared whoever holds it; the old holder can no longer write
/// its result (its claim token no longer matches). The reason is recorded
/// in the audit trail (omnibox audit --id ID). The row's last_error is kept,
/// so its real error stays visible; a row without one gets
/// `Force unlock: <reason>`.
///
/// Examples:
///   omnibox unlock 0190f1d2-7a3b-7cde-8f00-123456789abc --reason "relay on host-3 was OOM-killed"
///   omnibox unlock --worker host-3:4121 --reason "host-3 decommissioned" --yes
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct UnlockArgs {
    /// The event to unlock
    #[arg(value_parser = args::uuid, required_unless_present = "worker", conflicts_with = "worker")]
    id: Option<Uuid>,
    /// Unlock every event locked by this worker instead
    #[arg(long, value_name = "WORKER", value_parser = args::worker)]
    worker: Option<WorkerId>,
    /// Why (1..255 characters; recorded in the audit trail, and in last_error when the row has none)
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    /// Which table [default: the one holding the id; both for --worker]
    #[arg(long, value_enum)]
    table: Option<TableArg>,
    #[command(flatten)]
    safety: SafetyArgs,
}

pub async fn run(args: UnlockArgs, ctx: &Context) -> Result<ExitStatus> {
    let Some(reason) = args.reason.as_deref() else {
        return Err(UsageError(
            "unlock needs --reason TEXT: say why, e.g. --reason \"worker host-3 died\"".into(),
        )
        .into());
    };
    let reason = UnlockReason::new(reason)?;
    let action = if args.worker.is_some() {
        "unlock-worker"
    } else {
        "unlock"
    };
    // Everything the audit row needs is checked before anything changes.
    let mut entry = AuditEntry::new(args.safety.actor(), action);
    entry.reason = Some(reason.as_str().to_string());
    omnibox::store::audit::check(&entry)?;
    let store = ctx.store().await?;
    let tables: Vec<Table> = match args.table {
        Some(t) => vec![Table::from(t)],
        None => vec![Table::Outbox, Table::Inbox],
    };
    let mut changed: Vec<(Table, Vec<Uuid>)> = Vec::new();
    if let Some(id) = args.id {
        let mut found = None;
        for t in &tables {
            let locked_by = match t {
                Table::Outbox => store
                    .outbox()
                    .get(id)
                    .await?
                    .map(|e| e.locked_by().map(str::to_string)),
                Table::Inbox => store
                    .inbox()
                    .get(id)
                    .await?
                    .map(|e| e.locked_by().map(str::to_string)),
            };
            if let Some(l) = locked_by {
                found = Some((*t, l));
                break;
            }
        }
        let Some((table, locked_by)) = found else {
            crate::cli::output::notice!(
                "omnibox: no event {id} in {}",
                tables
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            );
            return Ok(ExitStatus::No);
        };
        let Some(holder) = locked_by else {
            crate::cli::output::notice!("omnibox: event {id} is not locked; nothing to do");
            return Ok(ExitStatus::No);
        };
        if args.safety.dry_run {
            report(ctx, &[(table, vec![id])], true)?;
            crate::cli::output::notice!(
                "omnibox: dry run: would unlock {id} (held by {holder}); nothing changed"
            );
            return Ok(ExitStatus::Success);
        }
        if !args
            .safety
            .confirm(&format!("unlock {table} event {id} held by {holder}"))?
        {
            crate::cli::output::notice!("omnibox: nothing changed");
            return Ok(ExitStatus::No);
        }
        // Only if the holder the operator confirmed still holds it, with the
        // audit row in the same transaction.
        entry.details = json!({"previous_holder": holder});
        let ids = store
            .change_audited(
                table,
                AuditedChange::UnlockOne {
                    id,
                    holder: &holder,
                    reason: &reason,
                },
                entry,
            )
            .await?;
        if ids.is_empty() {
            crate::cli::output::notice!(
                "omnibox: event {id} is no longer held by {holder} (it finished, or another worker or operator changed it meanwhile); nothing changed"
            );
            return Ok(ExitStatus::Partial);
        }
        changed.push((table, ids));
    } else if let Some(worker) = &args.worker {
        if args.safety.dry_run {
            let mut would = Vec::new();
            for t in &tables {
                let rows = match t {
                    Table::Outbox => held_by(&store.outbox(), worker.as_str()).await?,
                    Table::Inbox => held_by(&store.inbox(), worker.as_str()).await?,
                };
                would.push((*t, rows));
            }
            report(ctx, &would, true)?;
            return Ok(if would.iter().all(|(_, ids)| ids.is_empty()) {
                ExitStatus::No
            } else {
                ExitStatus::Success
            });
        }
        if !args
            .safety
            .confirm(&format!("unlock every event held by {worker}"))?
        {
            crate::cli::output::notice!("omnibox: nothing changed");
            return Ok(ExitStatus::No);
        }
        entry.details = json!({"worker": worker.as_str()});
        for t in &tables {
            let ids = store
                .change_audited(
                    *t,
                    AuditedChange::UnlockWorker {
                        worker: worker.as_str(),
                        reason: &reason,
                    },
                    entry.clone(),
                )
                .await?;
            changed.push((*t, ids));
        }
    }
    report(ctx, &changed, false)?;
    if changed.iter().all(|(_, ids)| ids.is_empty()) {
        return Ok(ExitStatus::No);
    }
    Ok(ExitStatus::Success)
}

/// The ids of every row `worker` holds, paged by seq.
async fn held_by<R: Route, T: EventStore<R>>(table: &T, worker: &str) -> Result<Vec<Uuid>> {
    let mut ids = Vec::new();
    let mut filter = omnibox::ListFilter {
        locked_by: Some(worker.to_string()),
        limit: Some(10_000),
        ..Default::default()
    };
    loop {
        let page = table.list(&filter).await?;
        ids.extend(page.iter().map(|e| e.id()));
        match page.last().and_then(|e| e.seq()) {
            Some(seq) if page.len() == 10_000 => filter.after_seq = Some(seq),
            _ => break,
        }
    }
    Ok(ids)
}

fn report(ctx: &Context, changed: &[(Table, Vec<Uuid>)], dry_run: bool) -> Result<()> {
    match ctx.format() {
        Format::Json => output::json(&json!({
            "dry_run": dry_run,
            "tables": changed.iter().map(|(t, ids)| json!({"table": t, "unlocked": ids.len(), "ids": ids})).collect::<Vec<_>>(),
        })),
        Format::Table => {
            let verb = if dry_run { "Would unlock" } else { "Unlocked" };
            if changed.iter().all(|(_, ids)| ids.is_empty()) {
                return output::line("No locked events match.");
            }
            for (t, ids) in changed.iter().filter(|(_, ids)| !ids.is_empty()) {
                output::line(format!("{verb} {} {t} event(s).", ids.len()))?;
                for id in ids.iter().take(20) {
                    output::line(format!("  {id}"))?;
                }
            }
            Ok(())
        }
    }
}
