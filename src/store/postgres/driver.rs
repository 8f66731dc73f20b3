//! The audit trail's and the dead-letter table's statements on PostgreSQL
//! (see `store/driver.rs`).

use std::time::Duration;

use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::PgStore;
use crate::error::{Result, storage};
use crate::model::Table;
use crate::store::audit::{self, AuditEntry, AuditFilter};
use crate::store::dead_letters::{DeadLetterRecord, NewLetter};
use crate::store::diagnostics::{
    ClaimPlan, ReplicationSlot, SMALL_TABLE_PAGES, Statistics, TableHealth,
};
use crate::store::dialect::{Dialect, Pg};
use crate::store::driver::{Driver, FeatureTx, Retention, Unlock};
use crate::store::shared::{self, FeatureTxOf, fetch_decoded, text_at_0};

/// A write transaction for the features.
pub(crate) type PgFeatureTx = FeatureTxOf<Pg>;

impl Driver for PgStore {
    type Tx = PgFeatureTx;
    type D = Pg;

    async fn begin(&self) -> Result<PgFeatureTx> {
        let tx = self.pool().begin().await.map_err(storage)?;
        Ok(FeatureTxOf { tx, now: Pg::now() })
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let q = sqlx::query(
            "SELECT id, at, actor, action, table_name, row_count, ids::text AS ids, reason, details::text AS details
             FROM omnibox_audit
             WHERE ($1::text IS NULL OR action = $1)
               AND ($2::timestamptz IS NULL OR at >= $2)
               AND ($3::text IS NULL OR ids @> jsonb_build_array($3::text))
             ORDER BY id DESC LIMIT $4",
        )
        .bind(&filter.action)
        .bind(filter.since)
        .bind(filter.id.map(|i| i.to_string()))
        .bind(i64::from(filter.limit.unwrap_or(50)));
        fetch_decoded(self.pool(), q, |r| {
            audit::decode(r, r.try_get("at").map_err(storage)?)
        })
        .await
    }

    async fn delete_older(&self, what: Retention, older_than: Duration, batch: i64) -> Result<u64> {
        let sql = match what {
            Retention::Audit => {
                "DELETE FROM omnibox_audit WHERE id IN (
                     SELECT id FROM omnibox_audit WHERE at < now() - make_interval(secs => $1)
                     ORDER BY at LIMIT $2)"
            }
            Retention::ReplayedLetters => {
                "DELETE FROM omnibox_dead_letters WHERE id IN (
                     SELECT id FROM omnibox_dead_letters
                     WHERE replayed_at < now() - make_interval(secs => $1)
                     ORDER BY replayed_at LIMIT $2)"
            }
        };
        Self::D::delete_older(self.pool(), sql, older_than, batch).await
    }

    async fn insert_letters(&self, table: Table, rows: &[NewLetter]) -> Result<()> {
        let t = table.sql_name();
        let mut cols = LetterColumns::default();
        for r in rows {
            cols.push(r);
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH held AS (
                 SELECT id FROM {t} WHERE id = ANY($3) AND status = 'failed' FOR SHARE
             )
             INSERT INTO omnibox_dead_letters (id, origin, event_id, event_type, topic, attempts_made, error, event)
             SELECT l.id, l.origin, l.event_id, l.event_type, l.topic, l.attempts_made, l.error, l.event::jsonb
             FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::int4[], $7::text[], $8::text[])
                  AS l(id, origin, event_id, event_type, topic, attempts_made, error, event)
             WHERE l.event_id IN (SELECT id FROM held)
             ON CONFLICT DO NOTHING"
        )))
        .bind(cols.id)
        .bind(cols.origin)
        .bind(cols.event_id)
        .bind(cols.event_type)
        .bind(cols.topic)
        .bind(cols.attempts_made)
        .bind(cols.error)
        .bind(cols.event)
        .execute(self.pool())
        .await
        .map_err(storage)?;
        Ok(())
    }

    async fn claim_plan(&self) -> Result<ClaimPlan> {
        let beginning = chrono::DateTime::from_timestamp(-62_135_596_800, 0).unwrap_or_default();
        let mut tx = self.pool().begin().await.map_err(storage)?;
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (FORMAT TEXT) {}",
            super::sql::OUTBOX_SCAN
        )))
        .bind(beginning)
        .bind(0_i64)
        .bind(1000_i64)
        .bind(1000_i64)
        .bind(0_i64)
        .bind(None::<String>)
        .bind(None::<Vec<String>>)
        .persistent(false)
        .fetch_all(&mut *tx)
        .await
        .map_err(storage)?;
        tx.rollback().await.map_err(storage)?;
        let text = rows.join("\n");
        // The main scan (alias `r`) must read the claim index in order; the
        // expired-lease branch (`r_1`) reads the few locked rows and may
        // scan a tiny table.
        let uses_claim_index = text
            .contains("Index Scan using outbox_events_claim on outbox_events r ")
            && !text.contains("Seq Scan on outbox_events r ")
            && !text.contains("Sort Key: r.scheduled_at");
        // The table's size matters only when the plan reads it whole.
        let pages: Option<i64> = if uses_claim_index {
            None
        } else {
            sqlx::query_scalar(
                "SELECT pg_relation_size(to_regclass('outbox_events')) / current_setting('block_size')::int8",
            )
            .fetch_one(self.pool())
            .await
            .ok()
        };
        Ok(ClaimPlan {
            text,
            uses_claim_index,
            small_table_pages: pages.filter(|p| *p < SMALL_TABLE_PAGES),
        })
    }

    async fn outbox_statistics(&self) -> Result<Statistics> {
        let row = sqlx::query(
            "SELECT n_live_tup, n_mod_since_analyze,
                    greatest(last_analyze, last_autoanalyze) IS NULL AS never
             FROM pg_stat_user_tables WHERE relid = to_regclass('outbox_events')",
        )
        .fetch_optional(self.pool())
        .await
        .map_err(storage)?;
        Ok(match row {
            None => Statistics::NotCollected,
            Some(r) => Statistics::Collected {
                live: r.try_get("n_live_tup").unwrap_or(0),
                changed: r.try_get("n_mod_since_analyze").unwrap_or(0),
                never: r.try_get("never").unwrap_or(false),
            },
        })
    }

    async fn expired_leases(&self, table: Table) -> Result<i64> {
        let t = table.sql_name();
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {t} WHERE locked_until IS NOT NULL AND locked_until < now()"
        )))
        .fetch_one(self.pool())
        .await
        .map_err(storage)
    }

    async fn table_health(&self, table: Table) -> Result<Option<TableHealth>> {
        // A partitioned table's figures are its partitions' sums.
        let row = sqlx::query(
            "SELECT coalesce(sum(pg_table_size(p.oid)), 0)::int8 AS table_bytes,
                    coalesce(sum(pg_indexes_size(p.oid)), 0)::int8 AS index_bytes,
                    coalesce(sum(st.n_live_tup), 0)::int8 AS live,
                    coalesce(sum(st.n_dead_tup), 0)::int8 AS dead,
                    (SELECT coalesce(array_to_string(reloptions, ','), '') FROM pg_class
                      WHERE oid = to_regclass($1)) AS options,
                    (SELECT CASE WHEN relkind = 'p' THEN (SELECT count(*) FROM pg_inherits
                                                          WHERE inhparent = c.oid) END
                       FROM pg_class c WHERE c.oid = to_regclass($1)) AS partitions
             FROM (SELECT c.oid FROM pg_class c WHERE c.oid = to_regclass($1) AND c.relkind <> 'p'
                   UNION ALL
                   SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass($1)) p
             LEFT JOIN pg_stat_user_tables st ON st.relid = p.oid
             HAVING to_regclass($1) IS NOT NULL",
        )
        .bind(table.sql_name())
        .fetch_optional(self.pool())
        .await
        .map_err(storage)?;
        Ok(row.map(|r| {
            let n = |c: &str| r.try_get::<i64, _>(c).unwrap_or(0);
            TableHealth {
                table_bytes: n("table_bytes"),
                index_bytes: n("index_bytes"),
                live: n("live"),
                dead: n("dead"),
                options: r.try_get("options").unwrap_or_default(),
                partitions: r.try_get("partitions").unwrap_or_default(),
            }
        }))
    }

    async fn pending_topics(&self, limit: i64) -> Result<Vec<String>> {
        let q = sqlx::query(
            "SELECT DISTINCT topic::text FROM outbox_events WHERE status = 'pending' LIMIT $1",
        );
        fetch_decoded(self.pool(), q.bind(limit), text_at_0).await
    }

    async fn replication_slots(&self) -> Result<Vec<ReplicationSlot>> {
        let rows = sqlx::query(
            "SELECT s.slot_name::text AS name, s.slot_type AS kind, s.database::text AS database,
                    s.active, s.wal_status,
                    pg_wal_lsn_diff(
                        CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END,
                        s.restart_lsn)::bigint AS behind,
                    extract(epoch FROM r.replay_lag)::float8 AS lag
             FROM pg_replication_slots s
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
             ORDER BY s.slot_name",
        )
        .fetch_all(self.pool())
        .await
        .map_err(storage)?;
        rows.iter()
            .map(|r| {
                let lag: Option<f64> = r.try_get("lag").map_err(storage)?;
                Ok(ReplicationSlot {
                    name: r.try_get("name").map_err(storage)?,
                    kind: r.try_get("kind").map_err(storage)?,
                    database: r.try_get("database").map_err(storage)?,
                    active: r.try_get("active").map_err(storage)?,
                    behind_bytes: r.try_get("behind").map_err(storage)?,
                    wal_status: r.try_get("wal_status").map_err(storage)?,
                    lag: lag
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(std::time::Duration::from_secs_f64),
                })
            })
            .collect()
    }
}

impl FeatureTx for PgFeatureTx {
    async fn insert_audit(&mut self, entry: &AuditEntry) -> Result<i64> {
        let sql = "INSERT INTO omnibox_audit (at, actor, action, table_name, row_count, ids, reason, details)
             VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::jsonb) RETURNING id";
        shared::insert_audit(&mut *self.tx, sql, entry.at, entry).await
    }

    async fn unlock(&mut self, table: Table, rows: Unlock<'_>) -> Result<Vec<Uuid>> {
        let error = rows.reason.last_error();
        let q = match rows.id {
            Some(id) => sqlx::query_scalar(unlock(table, "id = $1 AND locked_by = $3"))
                .bind(id)
                .bind(error)
                .bind(rows.holder),
            None => sqlx::query_scalar(unlock(table, "locked_by = $1"))
                .bind(rows.holder)
                .bind(error),
        };
        q.fetch_all(&mut *self.tx).await.map_err(storage)
    }

    async fn retry_now(&mut self, table: Table, events: &[Uuid]) -> Result<Vec<Uuid>> {
        let t = table.sql_name();
        self.update_events(
            format!(
                "UPDATE {t} SET scheduled_at = now(), updated_at = now() \
                 WHERE id = ANY($1) AND status = 'pending' AND locked_at IS NULL \
                 AND scheduled_at > now() RETURNING id"
            ),
            events,
        )
        .await
    }

    async fn mark_replayed(&mut self, table: Table, events: &[Uuid]) -> Result<()> {
        mark_replayed(&mut self.tx, table, events).await
    }

    async fn lock_open_letters(&mut self, ids: &[Uuid]) -> Result<Vec<DeadLetterRecord>> {
        let q = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {}
             FROM omnibox_dead_letters WHERE id = ANY($1) AND replayed_at IS NULL ORDER BY seq FOR UPDATE",
            Pg::LETTER_COLUMNS
        )));
        fetch_decoded(&mut *self.tx, q.bind(ids), Pg::decode_letter).await
    }

    async fn requeue_failed(&mut self, table: Table, events: &[Uuid]) -> Result<Vec<Uuid>> {
        let t = table.sql_name();
        self.update_events(
            format!(
                "UPDATE {t} SET status = 'pending', attempts_made = 0, last_error = NULL, \
                 scheduled_at = now(), updated_at = now() \
                 WHERE id = ANY($1) AND status = 'failed' RETURNING id"
            ),
            events,
        )
        .await
    }

    async fn statuses(&mut self, table: Table, events: &[Uuid]) -> Result<Vec<(Uuid, String)>> {
        let t = table.sql_name();
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, status FROM {t} WHERE id = ANY($1)"
        )))
        .bind(events)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(storage)
    }

    shared::feature_tx_common!(Pg);
}

impl PgFeatureTx {
    /// Runs the `UPDATE` `sql` of the rows among `events` ($1); returns the
    /// ids it changed.
    async fn update_events(&mut self, sql: String, events: &[Uuid]) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(events)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(storage)
    }
}

/// An operator's unlock of the rows of `table` that `rows` selects ($2: the
/// error a row without one gets).
fn unlock(table: Table, rows: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(shared::unlock_sql(table, "$2", "now()", rows))
}

/// Marks the open letters of `events` (rows of `table` just requeued)
/// replayed, on the requeue's transaction. A letter locked by a letter
/// replay running now is skipped: that replay finds its event back and
/// closes it, and waiting for it here could deadlock (it holds its letters
/// and waits for these rows).
pub(crate) async fn mark_replayed(
    conn: &mut PgConnection,
    table: Table,
    events: &[Uuid],
) -> Result<()> {
    sqlx::query(
        "UPDATE omnibox_dead_letters SET replayed_at = now() WHERE id IN (
             SELECT id FROM omnibox_dead_letters
             WHERE origin = $1 AND event_id = ANY($2) AND replayed_at IS NULL
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(table.to_string())
    .bind(events)
    .execute(conn)
    .await
    .map_err(storage)?;
    Ok(())
}

/// Letters as column arrays, for one `UNNEST` insert.
#[derive(Default)]
struct LetterColumns {
    id: Vec<Uuid>,
    origin: Vec<String>,
    event_id: Vec<Uuid>,
    event_type: Vec<String>,
    topic: Vec<String>,
    attempts_made: Vec<i32>,
    error: Vec<String>,
    event: Vec<String>,
}

impl LetterColumns {
    fn push(&mut self, r: &NewLetter) {
        self.id.push(r.id);
        self.origin.push(r.origin.to_string());
        self.event_id.push(r.event_id);
        self.event_type.push(r.event_type.clone());
        self.topic.push(r.topic.clone());
        self.attempts_made.push(r.attempts_made);
        self.error.push(r.error.clone());
        self.event.push(r.event.clone());
    }
}
