//! Releasing stale locks: rows whose lock is older than a duration go back
//! to the claimable pool, attempts untouched (a stopped worker is not the
//! event's fault).

use std::time::Duration;

use serde_json::json;

use super::on_table;
use crate::error::Result;
use crate::model::Table;
use crate::store::audit::{AuditEntry, check};
use crate::store::{AnyStore, EventStore, MaintenanceStore};

/// How many rows of each of `tables` hold a lock older than `older_than`.
pub async fn count(
    store: &AnyStore,
    tables: &[Table],
    older_than: Duration,
) -> Result<Vec<(Table, u64)>> {
    let mut counts = Vec::with_capacity(tables.len());
    for &t in tables {
        let n = on_table!(store, t, table => table.count_stale_locks(older_than).await?);
        counts.push((t, n));
    }
    Ok(counts)
}

/// Releases every lock of `tables` older than `older_than`, `batch_size`
/// rows per statement, and records `entry` (action `release-stale-locks`;
/// its table, count and threshold filled in) for each table that had any.
/// Returns how many were released per table.
pub async fn release(
    store: &AnyStore,
    tables: &[Table],
    older_than: Duration,
    batch_size: u32,
    entry: &AuditEntry,
) -> Result<Vec<(Table, u64)>> {
    check(entry)?;
    let mut released = Vec::with_capacity(tables.len());
    for &t in tables {
        let n =
            on_table!(store, t, table => table.release_stale_locks(older_than, batch_size).await?);
        if n > 0 {
            let mut entry = entry.clone();
            entry.table = Some(t.to_string());
            entry.count = n;
            entry.details = json!({"older_than_seconds": older_than.as_secs_f64()});
            store.record_audit(&entry).await?;
        }
        released.push((t, n));
    }
    Ok(released)
}
