//! The audit trail: every recorded replay, unlock, stale-lock release and
//! cleanup, with who, when, what and why (`omnibox audit`).

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;

use crate::error::{Error, Result, storage};
use crate::model::{Timestamp, UnlockReason, time};

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

/// Checks an entry before anything is changed ([`AnyStore::change_audited`](super::AnyStore::change_audited)
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

/// A change [`AnyStore::change_audited`](super::AnyStore::change_audited) makes with its audit row.
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
