//! What PostgreSQL's operators read beyond the table statements: failed
//! rows grouped by error, and counts that stay fast on large tables.

use sqlx::Row;

use super::{PgRoute, PgTable};
use crate::error::{Result, storage};
use crate::model::time;
use crate::store::{EventStore, FailedErrors, TableCounts};

/// Failed rows grouped by event type and error, with a sample id, each
/// handed to `each` as it arrives (not collected).
pub(super) async fn failed_errors<R: PgRoute>(
    table: &PgTable<R>,
    each: &mut (dyn FnMut(FailedErrors) + Send),
) -> Result<()> {
    use futures_util::TryStreamExt;
    let t = R::TABLE.sql_name();
    let sql = format!(
        "SELECT event_type, last_error, count(*) AS n, min(updated_at) AS first_seen,
                max(updated_at) AS last_seen, min(id::text)::uuid AS sample_id
         FROM {t} WHERE status = 'failed' GROUP BY event_type, last_error"
    );
    let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&table.pool);
    while let Some(r) = rows.try_next().await.map_err(storage)? {
        let group = (|| {
            Ok::<_, sqlx::Error>(FailedErrors {
                event_type: r.try_get("event_type")?,
                error: r.try_get("last_error")?,
                count: r.try_get::<i64, _>("n")?.max(0) as u64,
                first_seen: r.try_get("first_seen")?,
                last_seen: r.try_get("last_seen")?,
                sample_id: r.try_get("sample_id")?,
            })
        })()
        .map_err(storage)?;
        each(group);
    }
    Ok(())
}

/// Tables estimated at fewer rows than this are counted exactly by
/// [`status_counts`].
const EXACT_COUNT_BELOW: f64 = 1_000_000.0;

/// Counts for `status` that stay fast on a table of many millions of rows:
/// pending, locked, due, failed and the oldest pending row come from the
/// small partial indexes (exact); `completed` is the planner's row estimate
/// less those, flagged as an estimate. A table estimated under a million
/// rows (or never analyzed) is counted exactly. A partitioned table's
/// estimate is the sum of its partitions'.
pub(crate) async fn status_counts<R: PgRoute>(table: &PgTable<R>) -> Result<TableCounts> {
    let t = R::TABLE.sql_name();
    let estimate: Option<f32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT CASE WHEN c.relkind = 'p' THEN
                    coalesce((SELECT sum(greatest(k.reltuples, 0))::real FROM pg_inherits i
                       JOIN pg_class k ON k.oid = i.inhrelid WHERE i.inhparent = c.oid), -1)
                ELSE c.reltuples END
           FROM pg_class c WHERE c.oid = to_regclass('{t}')"
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
