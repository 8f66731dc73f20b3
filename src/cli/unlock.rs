//! `omnibox unlock`: force-unlock a row, or every row of a dead worker.

use anyhow::Result;
use clap::Args;
use omnibox::ops::{self, unlock, unlock::Lock};
use omnibox::store::audit::AuditEntry;
use omnibox::{Table, UnlockReason, WorkerId};
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
    let tables = ops::tables(args.table.map(Table::from));
    let mut changed: Vec<(Table, Vec<Uuid>)> = Vec::new();
    if let Some(id) = args.id {
        let (table, holder) = match unlock::find(&store, id, &tables).await? {
            Lock::Held { table, holder } => (table, holder),
            Lock::Free(_) => {
                crate::cli::output::notice!("omnibox: event {id} is not locked; nothing to do");
                return Ok(ExitStatus::No);
            }
            Lock::Missing => {
                crate::cli::output::notice!(
                    "omnibox: no event {id} in {}",
                    crate::cli::output::join(&tables, " or ")
                );
                return Ok(ExitStatus::No);
            }
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
        // Only if the holder the operator confirmed still holds it.
        if !unlock::one(&store, table, id, &holder, &reason, entry).await? {
            crate::cli::output::notice!(
                "omnibox: event {id} is no longer held by {holder} (it finished, or another worker or operator changed it meanwhile); nothing changed"
            );
            return Ok(ExitStatus::Partial);
        }
        changed.push((table, vec![id]));
    } else if let Some(worker) = &args.worker {
        if args.safety.dry_run {
            let mut would = Vec::new();
            for &t in &tables {
                would.push((t, unlock::held_by(&store, t, worker).await?));
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
        changed = unlock::worker(&store, &tables, worker, &reason, entry).await?;
    }
    report(ctx, &changed, false)?;
    if changed.iter().all(|(_, ids)| ids.is_empty()) {
        return Ok(ExitStatus::No);
    }
    Ok(ExitStatus::Success)
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
