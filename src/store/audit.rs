//! The audit trail: every recorded replay, unlock, stale-lock release and
//! cleanup, with who, when, what and why (`omnibox audit`).

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;

use super::AnyStore;
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
        match self {
            AnyStore::Postgres(s) => {
                let mut conn = s.pool().acquire().await.map_err(storage)?;
                insert_pg(&mut conn, entry).await
            }
            AnyStore::Sqlite(s) => {
                let mut conn = s.pool().acquire().await.map_err(storage)?;
                insert_sqlite(&mut conn, entry).await
            }
        }
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
        mut entry: AuditEntry,
    ) -> Result<Vec<Uuid>> {
        check(&entry)?;
        let t = table.sql_name();
        entry.table = Some(table.to_string());
        let requeue = matches!(change, AuditedChange::Requeue { .. });
        match self {
            AnyStore::Postgres(s) => {
                let mut tx = s.pool().begin().await.map_err(storage)?;
                let ids: Vec<Uuid> = match change {
                    AuditedChange::UnlockOne { id, holder, reason } => sqlx::query_scalar(
                        sqlx::AssertSqlSafe(format!(
                            "UPDATE {t} SET locked_at = NULL, locked_by = NULL, locked_until = NULL, \
                             last_error = COALESCE(last_error, $2), updated_at = now() WHERE id = $1 AND locked_by = $3 RETURNING id"
                        )),
                    )
                    .bind(id)
                    .bind(reason.last_error())
                    .bind(holder)
                    .fetch_all(&mut *tx)
                    .await,
                    AuditedChange::UnlockWorker { worker, reason } => sqlx::query_scalar(
                        sqlx::AssertSqlSafe(format!(
                            "UPDATE {t} SET locked_at = NULL, locked_by = NULL, locked_until = NULL, \
                             last_error = COALESCE(last_error, $2), updated_at = now() WHERE locked_by = $1 RETURNING id"
                        )),
                    )
                    .bind(worker)
                    .bind(reason.last_error())
                    .fetch_all(&mut *tx)
                    .await,
                    AuditedChange::Requeue { ids } => sqlx::query_scalar(
                        sqlx::AssertSqlSafe(format!(
                            "UPDATE {t} SET status = 'pending', attempts_made = 0, last_error = NULL, \
                             scheduled_at = now(), updated_at = now() \
                             WHERE id = ANY($1) AND status = 'failed' RETURNING id"
                        )),
                    )
                    .bind(ids)
                    .fetch_all(&mut *tx)
                    .await,
                    AuditedChange::RetryNow { ids } => sqlx::query_scalar(
                        sqlx::AssertSqlSafe(format!(
                            "UPDATE {t} SET scheduled_at = now(), updated_at = now() \
                             WHERE id = ANY($1) AND status = 'pending' AND locked_at IS NULL \
                             AND scheduled_at > now() RETURNING id"
                        )),
                    )
                    .bind(ids)
                    .fetch_all(&mut *tx)
                    .await,
                }
                .map_err(storage)?;
                if ids.is_empty() {
                    tx.rollback().await.map_err(storage)?;
                    return Ok(ids);
                }
                if requeue {
                    super::postgres::dead_letters::mark_replayed(&mut tx, table, &ids).await?;
                }
                entry.count = ids.len() as u64;
                entry.ids = ids.clone();
                insert_pg(&mut tx, &entry).await?;
                tx.commit().await.map_err(storage)?;
                Ok(ids)
            }
            AnyStore::Sqlite(s) => {
                let mut tx = s.pool().begin().await.map_err(storage)?;
                let now = time::format(&time::now());
                let rows: Vec<String> = match change {
                    AuditedChange::UnlockOne { id, holder, reason } => sqlx::query_scalar(
                        sqlx::AssertSqlSafe(format!(
                            "UPDATE {t} SET locked_at = NULL, locked_by = NULL, locked_until = NULL, \
                             last_error = COALESCE(last_error, ?2), updated_at = ?4 WHERE id = ?1 AND locked_by = ?3 RETURNING id"
                        )),
                    )
                    .bind(id.to_string())
                    .bind(reason.last_error())
                    .bind(holder)
                    .bind(&now)
                    .fetch_all(&mut *tx)
                    .await,
                    AuditedChange::UnlockWorker { worker, reason } => sqlx::query_scalar(
                        sqlx::AssertSqlSafe(format!(
                            "UPDATE {t} SET locked_at = NULL, locked_by = NULL, locked_until = NULL, \
                             last_error = COALESCE(last_error, ?2), updated_at = ?3 WHERE locked_by = ?1 RETURNING id"
                        )),
                    )
                    .bind(worker)
                    .bind(reason.last_error())
                    .bind(&now)
                    .fetch_all(&mut *tx)
                    .await,
                    AuditedChange::Requeue { ids } => sqlx::query_scalar(
                        sqlx::AssertSqlSafe(format!(
                            "UPDATE {t} SET status = 'pending', attempts_made = 0, last_error = NULL, \
                             scheduled_at = ?2, updated_at = ?2 \
                             WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'failed' RETURNING id"
                        )),
                    )
                    .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
                    .bind(&now)
                    .fetch_all(&mut *tx)
                    .await,
                    AuditedChange::RetryNow { ids } => sqlx::query_scalar(
                        sqlx::AssertSqlSafe(format!(
                            "UPDATE {t} SET scheduled_at = ?2, updated_at = ?2 \
                             WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'pending' \
                             AND locked_at IS NULL AND scheduled_at > ?2 RETURNING id"
                        )),
                    )
                    .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
                    .bind(&now)
                    .fetch_all(&mut *tx)
                    .await,
                }
                .map_err(storage)?;
                let ids: Vec<Uuid> = rows
                    .iter()
                    .map(|r| {
                        Uuid::parse_str(r).map_err(|e| Error::CorruptRow {
                            id: r.clone(),
                            message: e.to_string(),
                        })
                    })
                    .collect::<Result<_>>()?;
                if ids.is_empty() {
                    tx.rollback().await.map_err(storage)?;
                    return Ok(ids);
                }
                if requeue {
                    super::sqlite::dead_letters::mark_replayed(&mut tx, table, &ids, &now).await?;
                }
                entry.count = ids.len() as u64;
                entry.ids = ids.clone();
                insert_sqlite(&mut tx, &entry).await?;
                tx.commit().await.map_err(storage)?;
                Ok(ids)
            }
        }
    }

    /// Deletes audit rows older than `older_than`, `batch_size` per
    /// statement; returns how many (the trail's own retention, run by
    /// `cleanup`).
    pub async fn delete_audit_older(
        &self,
        older_than: std::time::Duration,
        batch_size: u32,
    ) -> Result<u64> {
        self.delete_older_in_batches(
            "DELETE FROM omnibox_audit WHERE id IN (
                 SELECT id FROM omnibox_audit WHERE at < now() - make_interval(secs => $1)
                 ORDER BY at LIMIT $2)",
            "DELETE FROM omnibox_audit WHERE id IN (
                 SELECT id FROM omnibox_audit WHERE at < ?1 ORDER BY at LIMIT ?2)",
            older_than,
            batch_size,
        )
        .await
    }

    /// Runs a retention DELETE until it deletes fewer rows than a batch;
    /// returns how many. The PostgreSQL statement takes the age in seconds
    /// (`$1`) and the batch (`$2`); the SQLite one the cut-off time (`?1`)
    /// and the batch (`?2`).
    pub(super) async fn delete_older_in_batches(
        &self,
        pg: &'static str,
        sqlite: &'static str,
        older_than: std::time::Duration,
        batch_size: u32,
    ) -> Result<u64> {
        let batch = i64::from(batch_size.max(1));
        let mut total = 0;
        loop {
            let n = match self {
                AnyStore::Postgres(s) => sqlx::query(pg)
                    .bind(super::secs(older_than))
                    .bind(batch)
                    .execute(s.pool())
                    .await
                    .map_err(storage)?
                    .rows_affected(),
                AnyStore::Sqlite(s) => sqlx::query(sqlite)
                    .bind(time::format(
                        &(time::now() - crate::domain::chrono_dur(older_than)),
                    ))
                    .bind(batch)
                    .execute(s.pool())
                    .await
                    .map_err(storage)?
                    .rows_affected(),
            };
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }

    /// Recorded actions, newest first.
    pub async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let limit = i64::from(filter.limit.unwrap_or(50));
        let action = filter.action.clone();
        let id = filter.id.map(|i| i.to_string());
        match self {
            AnyStore::Postgres(s) => {
                let rows = sqlx::query(
                    "SELECT id, at, actor, action, table_name, row_count, ids::text AS ids, reason, details::text AS details
                     FROM omnibox_audit
                     WHERE ($1::text IS NULL OR action = $1)
                       AND ($2::timestamptz IS NULL OR at >= $2)
                       AND ($3::text IS NULL OR ids @> jsonb_build_array($3::text))
                     ORDER BY id DESC LIMIT $4",
                )
                .bind(action)
                .bind(filter.since)
                .bind(id)
                .bind(limit)
                .fetch_all(s.pool())
                .await
                .map_err(storage)?;
                rows.iter()
                    .map(|r| decode(r, r.try_get("at").map_err(storage)?))
                    .collect()
            }
            AnyStore::Sqlite(s) => {
                let rows = sqlx::query(
                    "SELECT id, at, actor, action, table_name, row_count, ids, reason, details
                     FROM omnibox_audit
                     WHERE (?1 IS NULL OR action = ?1)
                       AND (?2 IS NULL OR at >= ?2)
                       AND (?3 IS NULL OR EXISTS (SELECT 1 FROM json_each(ids) WHERE value = ?3))
                     ORDER BY id DESC LIMIT ?4",
                )
                .bind(action)
                .bind(filter.since.map(|t| time::format(&t)))
                .bind(id)
                .bind(limit)
                .fetch_all(s.pool())
                .await
                .map_err(storage)?;
                rows.iter()
                    .map(|r| {
                        let at: String = r.try_get("at").map_err(storage)?;
                        let at = time::parse_stored(&at).map_err(|m| Error::CorruptRow {
                            id: "audit".into(),
                            message: m,
                        })?;
                        decode(r, at)
                    })
                    .collect()
            }
        }
    }
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

pub(super) async fn insert_pg(conn: &mut sqlx::PgConnection, entry: &AuditEntry) -> Result<i64> {
    let ids = serde_json::to_string(&entry.ids).unwrap_or_else(|_| "[]".into());
    let details = serde_json::to_string(&entry.details).unwrap_or_else(|_| "{}".into());
    sqlx::query_scalar(
        "INSERT INTO omnibox_audit (at, actor, action, table_name, row_count, ids, reason, details)
         VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::jsonb) RETURNING id",
    )
    .bind(entry.at)
    .bind(&entry.actor)
    .bind(&entry.action)
    .bind(&entry.table)
    .bind(entry.count as i64)
    .bind(ids)
    .bind(&entry.reason)
    .bind(details)
    .fetch_one(&mut *conn)
    .await
    .map_err(storage)
}

pub(super) async fn insert_sqlite(
    conn: &mut sqlx::SqliteConnection,
    entry: &AuditEntry,
) -> Result<i64> {
    let ids = serde_json::to_string(&entry.ids).unwrap_or_else(|_| "[]".into());
    let details = serde_json::to_string(&entry.details).unwrap_or_else(|_| "{}".into());
    sqlx::query_scalar(
        "INSERT INTO omnibox_audit (at, actor, action, table_name, row_count, ids, reason, details)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
    )
    .bind(time::format(&entry.at))
    .bind(&entry.actor)
    .bind(&entry.action)
    .bind(&entry.table)
    .bind(entry.count as i64)
    .bind(ids)
    .bind(&entry.reason)
    .bind(details)
    .fetch_one(&mut *conn)
    .await
    .map_err(storage)
}

fn decode<R: Row>(r: &R, at: Timestamp) -> Result<AuditEntry>
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
