//! Force-unlocking rows: one row whose holder the operator confirmed, or
//! every row a dead worker holds. The lock is cleared whoever holds it;
//! the old holder can no longer write its result (its claim token no
//! longer matches). The row's `last_error` is kept; a row without one gets
//! `Force unlock: <reason>`.

use serde_json::json;
use uuid::Uuid;

use super::on_table;
use crate::error::Result;
use crate::model::{Route, Table, UnlockReason, WorkerId};
use crate::store::audit::{AuditEntry, AuditedChange, check};
use crate::store::{AnyStore, EventStore, ListFilter};

/// Where one event's lock stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lock {
    /// No row with that id in the tables searched.
    Missing,
    /// The row exists and nobody holds it.
    Free(Table),
    /// The row is held by this worker.
    Held {
        /// The table holding the row.
        table: Table,
        /// The worker holding it.
        holder: String,
    },
}

/// Finds event `id` in `tables` (in that order) and says who holds it.
pub async fn find(store: &AnyStore, id: Uuid, tables: &[Table]) -> Result<Lock> {
    for &t in tables {
        let row = on_table!(store, t, table => table
            .get(id)
            .await?
            .map(|e| e.locked_by().map(str::to_string)));
        match row {
            Some(Some(holder)) => return Ok(Lock::Held { table: t, holder }),
            Some(None) => return Ok(Lock::Free(t)),
            None => {}
        }
    }
    Ok(Lock::Missing)
}

/// Unlocks event `id` of `table` only if `holder` (the one the operator
/// confirmed) still holds it, with `entry` (action `unlock`) recorded in
/// the same transaction. Returns whether it was unlocked: `false` when the
/// row finished or changed hands meanwhile (nothing written).
pub async fn one(
    store: &AnyStore,
    table: Table,
    id: Uuid,
    holder: &str,
    reason: &UnlockReason,
    mut entry: AuditEntry,
) -> Result<bool> {
    entry.reason = Some(reason.as_str().to_string());
    entry.details = json!({"previous_holder": holder});
    check(&entry)?;
    let ids = store
        .change_audited(
            table,
            AuditedChange::UnlockOne { id, holder, reason },
            entry,
        )
        .await?;
    Ok(!ids.is_empty())
}

/// The ids of every row of `table` that `worker` holds, paged by `seq`.
pub async fn held_by(store: &AnyStore, table: Table, worker: &WorkerId) -> Result<Vec<Uuid>> {
    on_table!(store, table, t => held_in(&t, worker.as_str()).await)
}

async fn held_in<R: Route, T: EventStore<R>>(table: &T, worker: &str) -> Result<Vec<Uuid>> {
    const PAGE: u32 = 10_000;
    let mut ids = Vec::new();
    let mut filter = ListFilter {
        locked_by: Some(worker.to_string()),
        limit: Some(PAGE),
        ..Default::default()
    };
    loop {
        let page = table.list(&filter).await?;
        ids.extend(page.iter().map(|e| e.id()));
        match page.last().and_then(|e| e.seq()) {
            Some(seq) if page.len() == PAGE as usize => filter.after_seq = Some(seq),
            _ => break,
        }
    }
    Ok(ids)
}

/// Unlocks every row of `tables` that `worker` holds, each table's change
/// and its audit row (`entry`, action `unlock-worker`) in one transaction.
/// Returns the ids unlocked per table (empty where it held none).
pub async fn worker(
    store: &AnyStore,
    tables: &[Table],
    worker: &WorkerId,
    reason: &UnlockReason,
    mut entry: AuditEntry,
) -> Result<Vec<(Table, Vec<Uuid>)>> {
    entry.reason = Some(reason.as_str().to_string());
    entry.details = json!({"worker": worker.as_str()});
    check(&entry)?;
    let mut changed = Vec::with_capacity(tables.len());
    for &t in tables {
        let ids = store
            .change_audited(
                t,
                AuditedChange::UnlockWorker {
                    worker: worker.as_str(),
                    reason,
                },
                entry.clone(),
            )
            .await?;
        changed.push((t, ids));
    }
    Ok(changed)
}
