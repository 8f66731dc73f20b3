//! [`MaintenanceStore`] for PostgreSQL tables: listing, requeueing,
//! counting and deleting rows.

use std::time::Duration;

use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{PgRoute, PgTable, decode};
use crate::error::{Error, Result, storage};
use crate::model::{Event, EventStatus, UnlockReason, time};
use crate::store::MaintenanceStore;
use crate::store::dialect::{self, Pg};
use crate::store::{EventStore, RequeueFilter, TableCounts};

impl<R: PgRoute> MaintenanceStore<R> for PgTable<R> {
    async fn list_failed(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(R::sql().failed_head);
        dialect::push_failed::<Pg>(&mut qb, R::TABLE, filter);
        let rows = qb.build().fetch_all(&self.pool).await.map_err(storage)?;
        rows.iter().map(decode).collect()
    }

    async fn list_waiting(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(R::sql().waiting_head);
        dialect::push_failed::<Pg>(&mut qb, R::TABLE, filter);
        let rows = qb.build().fetch_all(&self.pool).await.map_err(storage)?;
        rows.iter().map(decode).collect()
    }

    async fn force_unlock_worker(&self, worker: &str, reason: &UnlockReason) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(R::sql().unlock_worker)
            .bind(worker)
            .bind(reason.last_error())
            .fetch_all(&self.pool)
            .await
            .map_err(storage)
    }

    async fn count_stale_locks(&self, older_than: Duration) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(R::sql().count_stale)
            .bind(crate::store::secs(older_than))
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
        let n: i64 = sqlx::query_scalar(sql)
            .bind(crate::store::secs(older_than))
            .fetch_one(&self.pool)
            .await
            .map_err(storage)?;
        Ok(n as u64)
    }

    async fn delete_failed(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        Ok(sqlx::query(R::sql().delete_failed)
            .bind(crate::store::secs(older_than))
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
                    max(updated_at) AS last_seen, min(id::text)::uuid AS sample_id
             FROM {t} WHERE status = 'failed' GROUP BY event_type, last_error"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(storage)?;
        rows.iter()
            .map(|r| {
                Ok(crate::store::FailedErrors {
                    event_type: r.try_get("event_type")?,
                    error: r.try_get("last_error")?,
                    count: r.try_get::<i64, _>("n")?.max(0) as u64,
                    first_seen: r.try_get("first_seen")?,
                    last_seen: r.try_get("last_seen")?,
                    sample_id: r.try_get("sample_id")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(storage)
    }
}

/// Tables estimated at fewer rows than this are counted exactly by
/// [`status_counts`].
const EXACT_COUNT_BELOW: f64 = 1_000_000.0;

/// Counts for `status` that stay fast on a table of many millions of rows:
/// pending, locked, due, failed and the oldest pending row come from the
/// small partial indexes (exact); `completed` is the planner's row estimate
/// less those, flagged as an estimate. A table estimated under a million
/// rows (or never analyzed) is counted exactly.
pub(crate) async fn status_counts<R: PgRoute>(table: &PgTable<R>) -> Result<TableCounts> {
    let t = R::TABLE.sql_name();
    let estimate: Option<f32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT reltuples FROM pg_class WHERE oid = to_regclass('{t}')"
    )))
    .fetch_optional(&table.pool)
    .await
    .map_err(storage)?;
    let estimate = f64::from(estimate.unwrap_or(-1.0));
    if estimate < EXACT_COUNT_BELOW {
        return table.counts().await;
    }
    // Every locked row is pending (a constraint), and `locked_until` is set
    // exactly on locked rows: the unlocked pending rows (the claim index)
    // plus the locked ones (the lock index) are all the pending rows.
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT p.n + l.n AS pending, l.n AS locked, d.n + l.due AS due_now, f.n AS failed,
                least(p.oldest, l.oldest) AS oldest_pending, now() AS now
         FROM (SELECT count(*) AS n, min(created_at) AS oldest FROM {t}
               WHERE status = 'pending' AND locked_at IS NULL) p,
              (SELECT count(*) AS n, min(created_at) AS oldest,
                      count(*) FILTER (WHERE locked_until <= now() AND scheduled_at <= now()) AS due
               FROM {t} WHERE locked_until IS NOT NULL) l,
              (SELECT count(*) AS n FROM {t}
               WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= now()) d,
              (SELECT count(*) AS n FROM {t} WHERE status = 'failed') f"
    )))
    .fetch_one(&table.pool)
    .await
    .map_err(storage)?;
    let count = |name: &str| -> Result<u64> {
        Ok(row.try_get::<i64, _>(name).map_err(storage)?.max(0) as u64)
    };
    let pending = count("pending")?;
    let failed = count("failed")?;
    Ok(TableCounts {
        table: R::TABLE,
        pending,
        completed: (estimate as u64).saturating_sub(pending + failed),
        failed,
        locked: count("locked")?,
        due_now: count("due_now")?,
        oldest_pending_created_at: row.try_get("oldest_pending").map_err(storage)?,
        now: time::truncate(row.try_get("now").map_err(storage)?),
        completed_is_estimate: true,
    })
}
