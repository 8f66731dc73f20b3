//! The audit trail's and the dead-letter table's statements on SQLite (see
//! `store/driver.rs`). Times are this process's clock in the stored text
//! form; a write transaction takes the write lock at once
//! (`BEGIN IMMEDIATE`), and its statements share one `now`.

use std::time::Duration;

use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use super::{SqliteStore, id_array};
use crate::error::{Error, Result, storage};
use crate::model::{Table, time};
use crate::store::audit::{self, AuditEntry, AuditFilter};
use crate::store::dead_letters::{DeadLetterRecord, NewLetter};
use crate::store::diagnostics::{ClaimPlan, ReplicationSlot, Statistics, TableHealth};
use crate::store::dialect::{Dialect, Lite};
use crate::store::driver::{Driver, FeatureTx, Retention, Unlock};
use crate::store::shared::{self, FeatureTxOf, fetch_decoded, text_at_0};

/// A write transaction for the features, with its time.
pub(crate) type SqliteFeatureTx = FeatureTxOf<Lite>;

impl Driver for SqliteStore {
    type Tx = SqliteFeatureTx;
    type D = Lite;

    async fn begin(&self) -> Result<SqliteFeatureTx> {
        let tx = super::write_tx(self.pool()).await?;
        Ok(FeatureTxOf {
            tx,
            now: Lite::now(),
        })
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let q = sqlx::query(
            "SELECT id, at, actor, action, table_name, row_count, ids, reason, details
             FROM omnibox_audit
             WHERE (?1 IS NULL OR action = ?1)
               AND (?2 IS NULL OR at >= ?2)
               AND (?3 IS NULL OR EXISTS (SELECT 1 FROM json_each(ids) WHERE value = ?3))
             ORDER BY id DESC LIMIT ?4",
        )
        .bind(&filter.action)
        .bind(filter.since.map(|t| time::format(&t)))
        .bind(filter.id.map(|i| i.to_string()))
        .bind(i64::from(filter.limit.unwrap_or(50)));
        fetch_decoded(self.pool(), q, |r| {
            let at: String = r.try_get("at").map_err(storage)?;
            let at = time::parse_stored(&at).map_err(|m| Error::CorruptRow {
                id: "audit".into(),
                message: m,
            })?;
            audit::decode(r, at)
        })
        .await
    }

    async fn delete_older(&self, what: Retention, older_than: Duration, batch: i64) -> Result<u64> {
        let sql = match what {
            Retention::Audit => {
                "DELETE FROM omnibox_audit WHERE id IN (
                     SELECT id FROM omnibox_audit WHERE at < ?1 ORDER BY at LIMIT ?2)"
            }
            Retention::ReplayedLetters => {
                "DELETE FROM omnibox_dead_letters WHERE seq IN (
                     SELECT seq FROM omnibox_dead_letters
                     WHERE replayed_at < ?1 ORDER BY replayed_at LIMIT ?2)"
            }
        };
        Self::D::delete_older(self.pool(), sql, older_than, batch).await
    }

    async fn insert_letters(&self, table: Table, rows: &[NewLetter]) -> Result<()> {
        let t = table.sql_name();
        let mut tx = self.begin().await?;
        for r in rows {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO omnibox_dead_letters (id, origin, event_id, event_type, topic, attempts_made, error, event, dead_at)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9
                 WHERE EXISTS (SELECT 1 FROM {t} WHERE id = ?3 AND status = 'failed')
                 ON CONFLICT DO NOTHING"
            )))
            .bind(r.id.to_string())
            .bind(r.origin.to_string())
            .bind(r.event_id.to_string())
            .bind(&r.event_type)
            .bind(&r.topic)
            .bind(r.attempts_made)
            .bind(&r.error)
            .bind(&r.event)
            .bind(&tx.now)
            .execute(&mut *tx.tx)
            .await
            .map_err(storage)?;
        }
        tx.commit().await
    }

    async fn claim_plan(&self) -> Result<ClaimPlan> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {}",
            super::sql::OUTBOX_SCAN
        )))
        .bind(time::format(&time::now()))
        .bind("0001-01-01T00:00:00.000000Z")
        .bind(0_i64)
        .bind(1000_i64)
        .bind(1000_i64)
        .bind(0_i64)
        .bind(None::<String>)
        .fetch_all(self.pool())
        .await
        .map_err(storage)?;
        let text = rows
            .iter()
            .map(|r| r.try_get::<String, _>("detail").unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let uses_claim_index = text.contains("USING INDEX outbox_events_claim")
            && !text.lines().any(|l| l.trim() == "SCAN r");
        Ok(ClaimPlan {
            text,
            uses_claim_index,
            small_table_pages: None,
        })
    }

    async fn outbox_statistics(&self) -> Result<Statistics> {
        Ok(Statistics::NotUsed)
    }

    async fn expired_leases(&self, table: Table) -> Result<i64> {
        let t = table.sql_name();
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {t} WHERE locked_until IS NOT NULL AND locked_until < ?1"
        )))
        .bind(time::format(&time::now()))
        .fetch_one(self.pool())
        .await
        .map_err(storage)
    }

    async fn table_health(&self, _table: Table) -> Result<Option<TableHealth>> {
        Ok(None)
    }

    async fn replication_slots(&self) -> Result<Vec<ReplicationSlot>> {
        Ok(Vec::new())
    }

    async fn pending_topics(&self, limit: i64) -> Result<Vec<String>> {
        let q = sqlx::query(
            "SELECT DISTINCT topic FROM outbox_events WHERE status = 'pending' LIMIT ?1",
        );
        fetch_decoded(self.pool(), q.bind(limit), text_at_0).await
    }
}

impl FeatureTx for SqliteFeatureTx {
    async fn insert_audit(&mut self, entry: &AuditEntry) -> Result<i64> {
        let sql = "INSERT INTO omnibox_audit (at, actor, action, table_name, row_count, ids, reason, details)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id";
        shared::insert_audit(&mut *self.tx, sql, time::format(&entry.at), entry).await
    }

    async fn unlock(&mut self, table: Table, rows: Unlock<'_>) -> Result<Vec<Uuid>> {
        // The current time is the last parameter of each.
        let error = rows.reason.last_error();
        let q = match rows.id {
            Some(id) => sqlx::query_scalar(unlock(table, "?4", "id = ?1 AND locked_by = ?3"))
                .bind(id.to_string())
                .bind(error)
                .bind(rows.holder),
            None => sqlx::query_scalar(unlock(table, "?3", "locked_by = ?1"))
                .bind(rows.holder)
                .bind(error),
        };
        let ids: Vec<String> = q
            .bind(&self.now)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(storage)?;
        parse_ids(&ids)
    }

    async fn retry_now(&mut self, table: Table, events: &[Uuid]) -> Result<Vec<Uuid>> {
        let t = table.sql_name();
        self.update_events(
            format!(
                "UPDATE {t} SET scheduled_at = ?2, updated_at = ?2 \
                 WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'pending' \
                 AND locked_at IS NULL AND scheduled_at > ?2 RETURNING id"
            ),
            events,
        )
        .await
    }

    async fn mark_replayed(&mut self, table: Table, events: &[Uuid]) -> Result<()> {
        mark_replayed(&mut self.tx, table, events, &self.now).await
    }

    async fn lock_open_letters(&mut self, ids: &[Uuid]) -> Result<Vec<DeadLetterRecord>> {
        // The transaction holds the write lock: no other replay reads these
        // letters before it ends.
        let q = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {}
             FROM omnibox_dead_letters
             WHERE id IN (SELECT value FROM json_each(?1)) AND replayed_at IS NULL ORDER BY seq",
            Lite::LETTER_COLUMNS
        )));
        fetch_decoded(&mut *self.tx, q.bind(id_array(ids)), Lite::decode_letter).await
    }

    async fn requeue_failed(&mut self, table: Table, events: &[Uuid]) -> Result<Vec<Uuid>> {
        let t = table.sql_name();
        self.update_events(
            format!(
                "UPDATE {t} SET status = 'pending', attempts_made = 0, last_error = NULL, \
                 scheduled_at = ?2, updated_at = ?2 \
                 WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'failed' RETURNING id"
            ),
            events,
        )
        .await
    }

    async fn statuses(&mut self, table: Table, events: &[Uuid]) -> Result<Vec<(Uuid, String)>> {
        let t = table.sql_name();
        let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, status FROM {t} WHERE id IN (SELECT value FROM json_each(?1))"
        )))
        .bind(id_array(events))
        .fetch_all(&mut *self.tx)
        .await
        .map_err(storage)?;
        rows.into_iter()
            .map(|(id, status)| Ok((parse_id(&id)?, status)))
            .collect()
    }

    shared::feature_tx_common!(Lite);
}

impl SqliteFeatureTx {
    /// Runs the `UPDATE` `sql` of the rows among `events` (?1) at this
    /// transaction's time (?2); returns the ids it changed.
    async fn update_events(&mut self, sql: String, events: &[Uuid]) -> Result<Vec<Uuid>> {
        let ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(id_array(events))
            .bind(&self.now)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(storage)?;
        parse_ids(&ids)
    }
}

/// An operator's unlock of the rows of `table` that `rows` selects, at the
/// time `now` (?2: the error a row without one gets).
fn unlock(table: Table, now: &str, rows: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(shared::unlock_sql(table, "?2", now, rows))
}

/// Marks the open letters of `events` (rows of `table` just requeued)
/// replayed, on the requeue's transaction, at `now`.
pub(crate) async fn mark_replayed(
    conn: &mut SqliteConnection,
    table: Table,
    events: &[Uuid],
    now: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE omnibox_dead_letters SET replayed_at = ?3
         WHERE origin = ?1 AND event_id IN (SELECT value FROM json_each(?2)) AND replayed_at IS NULL",
    )
    .bind(table.to_string())
    .bind(id_array(events))
    .bind(now)
    .execute(conn)
    .await
    .map_err(storage)?;
    Ok(())
}

/// An id stored as text; anything else is a corrupt row.
fn parse_id(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|e| Error::CorruptRow {
        id: s.to_string(),
        message: e.to_string(),
    })
}

/// Ids stored as text.
fn parse_ids(ids: &[String]) -> Result<Vec<Uuid>> {
    ids.iter().map(|s| parse_id(s)).collect()
}
