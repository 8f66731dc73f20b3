//! The audit trail: every recorded replay, unlock, stale-lock release and
//! cleanup, with who, when, what and why (`omnibox audit`).

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;

use super::AnyStore;
use super::any::with_driver;
use super::driver::{Driver, FeatureTx, Retention, delete_older_in_batches};
use crate::error::{Error, Result, storage};
use crate::model::{Table, Timestamp, UnlockReason, time};

/// One operator action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// Sequence number (set when stored).
    pub id: Option<i64>,
    /// When.
    #[serde(with = "crate::model::time::serde_ts")]
    pub at: Timestamp,
    /// Who: `--actor`, else the OS user.
    pub actor: String,
    /// What: `replay`, `replay-pending`, `unlock`, `unlock-worker`,
    /// `release-stale-locks`, `cleanup`.
    pub action: String,
    /// Which table (`outbox`, `inbox`), if one.
    pub table: Option<String>,
    /// Rows changed.
    pub count: u64,
    /// Ids of the rows changed (empty for bulk actions such as cleanup).
    pub ids: Vec<Uuid>,
    /// Why, as given.
    pub reason: Option<String>,
    /// Anything else worth keeping (the selectors, thresholds).
    pub details: Value,
}

impl AuditEntry {
    /// A new entry stamped now.
    pub fn new(actor: impl Into<String>, action: impl Into<String>) -> Self {
        AuditEntry {
            id: None,
            at: time::now(),
            actor: actor.into(),
            action: action.into(),
            table: None,
            count: 0,
            ids: Vec::new(),
            reason: None,
            details: Value::Object(Default::default()),
        }
    }
}

/// Which entries `audit` returns.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this action.
    pub action: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<Timestamp>,
    /// Only entries about this row.
    pub id: Option<Uuid>,
    /// Most entries (newest first), default 50.
    pub limit: Option<u32>,
}

/// Checks an entry before anything is changed ([`AnyStore::change_audited`]
/// does; commands call it before they ask for confirmation).
pub fn check(entry: &AuditEntry) -> Result<()> {
    if entry.actor.trim().is_empty() || entry.actor.chars().count() > 255 {
        return Err(Error::validation("actor", "must be 1..255 characters"));
    }
    if entry.actor.chars().any(char::is_control) {
        return Err(Error::validation(
            "actor",
            "must not contain control characters (newlines, escapes)",
        ));
    }
    if entry
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 1000)
    {
        return Err(Error::validation(
            "reason",
            "must be at most 1000 characters",
        ));
    }
    Ok(())
}

impl AnyStore {
    /// Records an operator action.
    pub async fn record_audit(&self, entry: &AuditEntry) -> Result<i64> {
        check(entry)?;
        with_driver!(self, d => record(d, entry).await)
    }

    /// Makes `change` on `table` and records `entry` (its `table`, `count`
    /// and `ids` filled in from what changed) in the **same transaction**:
    /// both happen or neither. The entry is checked before anything is
    /// written. Returns the ids changed; when nothing changed, nothing is
    /// written (no audit row either).
    pub async fn change_audited(
        &self,
        table: Table,
        change: AuditedChange<'_>,
        entry: AuditEntry,
    ) -> Result<Vec<Uuid>> {
        check(&entry)?;
        with_driver!(self, d => change_audited(d, table, change, entry).await)
    }

    /// Deletes audit rows older than `older_than`, `batch_size` per
    /// statement; returns how many (the trail's own retention, run by
    /// `cleanup`).
    pub async fn delete_audit_older(
        &self,
        older_than: std::time::Duration,
        batch_size: u32,
    ) -> Result<u64> {
        with_driver!(self, d => delete_older_in_batches(d, Retention::Audit, older_than, batch_size).await)
    }

    /// Recorded actions, newest first.
    pub async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        with_driver!(self, d => d.list_audit(filter).await)
    }
}

async fn record<D: Driver>(driver: &D, entry: &AuditEntry) -> Result<i64> {
    let mut tx = driver.begin().await?;
    let id = tx.insert_audit(entry).await?;
    tx.commit().await?;
    Ok(id)
}

async fn change_audited<D: Driver>(
    driver: &D,
    table: Table,
    change: AuditedChange<'_>,
    mut entry: AuditEntry,
) -> Result<Vec<Uuid>> {
    entry.table = Some(table.to_string());
    let requeue = matches!(change, AuditedChange::Requeue { .. });
    let mut tx = driver.begin().await?;
    let ids = tx.audited_change(table, change).await?;
    if ids.is_empty() {
        tx.rollback().await?;
        return Ok(ids);
    }
    if requeue {
        tx.mark_replayed(table, &ids).await?;
    }
    entry.count = ids.len() as u64;
    entry.ids = ids.clone();
    tx.insert_audit(&entry).await?;
    tx.commit().await?;
    Ok(ids)
}

/// A change [`AnyStore::change_audited`] makes with its audit row.
#[derive(Debug, Clone, Copy)]
pub enum AuditedChange<'a> {
    /// Unlock one row, only if `holder` still holds it (the holder the
    /// operator saw and confirmed).
    UnlockOne {
        /// The row.
        id: Uuid,
        /// Its holder as shown to the operator.
        holder: &'a str,
        /// Why; recorded in the audit row, and in `last_error` as `Force
        /// unlock: <reason>` only when the row has no error of its own.
        reason: &'a UnlockReason,
    },
    /// Unlock every row `worker` holds.
    UnlockWorker {
        /// The worker.
        worker: &'a str,
        /// Why.
        reason: &'a UnlockReason,
    },
    /// Put these rows back to pending (attempts 0, error cleared, due
    /// now) if they are still failed.
    Requeue {
        /// The rows.
        ids: &'a [Uuid],
    },
    /// Make these pending rows due now if they still wait for a retry
    /// (unlocked and due later); their attempts and last error stay.
    RetryNow {
        /// The rows.
        ids: &'a [Uuid],
    },
}

/// An audit row read back (`at` decoded by the backend).
pub(crate) fn decode<R: Row>(r: &R, at: Timestamp) -> Result<AuditEntry>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database>,
{
    let ids: String = r.try_get("ids").map_err(storage)?;
    let details: Option<String> = r.try_get("details").map_err(storage)?;
    Ok(AuditEntry {
        id: Some(r.try_get("id").map_err(storage)?),
        at,
        actor: r.try_get("actor").map_err(storage)?,
        action: r.try_get("action").map_err(storage)?,
        table: r.try_get("table_name").map_err(storage)?,
        count: r.try_get::<i64, _>("row_count").map_err(storage)? as u64,
        ids: serde_json::from_str(&ids).unwrap_or_default(),
        reason: r.try_get("reason").map_err(storage)?,
        details: details
            .and_then(|d| serde_json::from_str(&d).ok())
            .unwrap_or(Value::Null),
    })
}
