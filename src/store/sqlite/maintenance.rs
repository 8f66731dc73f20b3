//! [`MaintenanceStore`] for SQLite tables: listing, requeueing, counting and
//! deleting rows.

use std::time::Duration;

use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::{SqliteRoute, SqliteTable, changed_ids, decode, ts};
use crate::domain::chrono_dur;
use crate::error::{Error, Result, storage};
use crate::model::{Event, EventStatus, UnlockReason, time};
use crate::store::dialect::{self, Lite};
use crate::store::{MaintenanceStore, RequeueFilter};

impl<R: SqliteRoute> MaintenanceStore<R> for SqliteTable<R> {
    async fn list_failed(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(R::sql().failed_head);
        dialect::push_failed::<Lite>(&mut qb, R::TABLE, filter);
        let rows = qb.build().fetch_all(&self.pool).await.map_err(storage)?;
        rows.iter().map(decode).collect()
    }

    async fn list_waiting(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(R::sql().waiting_head);
        qb.push_bind(ts(&time::now()));
        dialect::push_failed::<Lite>(&mut qb, R::TABLE, filter);
        let rows = qb.build().fetch_all(&self.pool).await.map_err(storage)?;
        rows.iter().map(decode).collect()
    }

    async fn force_unlock_worker(&self, worker: &str, reason: &UnlockReason) -> Result<Vec<Uuid>> {
        let rows = sqlx::query(R::sql().unlock_worker)
            .bind(worker.to_string())
            .bind(reason.last_error())
            .bind(ts(&time::now()))
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        changed_ids(&rows)
    }

    async fn count_stale_locks(&self, older_than: Duration) -> Result<u64> {
        let now = time::now();
        let cutoff = now - chrono_dur(older_than);
        let n: i64 = sqlx::query_scalar(R::sql().count_stale)
            .bind(ts(&cutoff))
            .bind(ts(&now))
            .fetch_one(&self.pool)
            .await
            .map_err(storage)?;
        Ok(n as u64)
    }

    async fn count_older(&self, status: EventStatus, older_than: Duration) -> Result<u64> {
        let sql = match status {
            EventStatus::Completed => R::sql().count_completed_older,
            EventStatus::Failed => R::sql().count_failed_older,
            EventStatus::Pending => {
                return Err(Error::validation(
                    "status",
                    "only completed or failed rows age out",
                ));
            }
        };
        let cutoff = time::now() - chrono_dur(older_than);
        let n: i64 = sqlx::query_scalar(sql)
            .bind(ts(&cutoff))
            .fetch_one(&self.pool)
            .await
            .map_err(storage)?;
        Ok(n as u64)
    }

    async fn delete_failed(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        let cutoff = time::now() - chrono_dur(older_than);
        Ok(sqlx::query(R::sql().delete_failed)
            .bind(ts(&cutoff))
            .bind(i64::from(batch_size.max(1)))
            .execute(&self.pool)
            .await
            .map_err(storage)?
            .rows_affected())
    }

    async fn failed_by_event_type(&self) -> Result<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(R::sql().failed_by_type)
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        Ok(rows.into_iter().map(|(t, n)| (t, n as u64)).collect())
    }

    async fn failed_errors(&self) -> Result<Vec<crate::store::FailedErrors>> {
        let t = R::TABLE.sql_name();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT event_type, last_error, count(*) AS n, min(updated_at) AS first_seen,
                    max(updated_at) AS last_seen, min(id) AS sample_id
             FROM {t} WHERE status = 'failed' GROUP BY event_type, last_error"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(storage)?;
        let stamp = |r: &sqlx::sqlite::SqliteRow, name: &str| -> Result<time::Timestamp> {
            let text: String = r.try_get(name).map_err(storage)?;
            time::parse_stored(&text).map_err(|m| Error::CorruptRow {
                id: "failed_errors".into(),
                message: m,
            })
        };
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("sample_id").map_err(storage)?;
                Ok(crate::store::FailedErrors {
                    event_type: r.try_get("event_type").map_err(storage)?,
                    error: r.try_get("last_error").map_err(storage)?,
                    count: r.try_get::<i64, _>("n").map_err(storage)?.max(0) as u64,
                    first_seen: stamp(r, "first_seen")?,
                    last_seen: stamp(r, "last_seen")?,
                    sample_id: Uuid::parse_str(&id).map_err(|e| Error::CorruptRow {
                        id,
                        message: e.to_string(),
                    })?,
                })
            })
            .collect()
    }
}
