//! Retention by partition: `cleanup` drops a partition whose every row is
//! past retention.

use sqlx::{Connection, PgConnection, Row};

use super::*;
use crate::error::{Result, storage};
use crate::model::Table;
use crate::store::postgres::PgStore;

impl PgStore {
    /// Drops `table`'s partitions whose whole range is older than
    /// `older_than` and whose every row is past retention: completed more
    /// than `older_than` ago, or (with `include_failed`) failed more than
    /// `failed_older_than` ago. A partition holding a pending row, a
    /// failed row kept, or a row completed since is kept, with why (the
    /// row-by-row cleanup then deletes what is past retention in it).
    ///
    /// Each drop is one transaction: the partition is detached (a lock on
    /// the table, waited for at most `lock_timeout`), checked again under
    /// that lock (a `replay` may have requeued a row meanwhile), and
    /// dropped; a kill at any moment leaves it attached or gone, never
    /// detached. The outbox's idempotency keys of its rows are released
    /// first (as deleting the rows would).
    pub async fn retire_partitions(&self, table: Table, opts: &RetireOptions) -> Result<Retired> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        let mut retired = Retired::default();
        let Some(p) = recorded(&mut conn)
            .await?
            .into_iter()
            .find(|p| p.table == table)
        else {
            return Ok(retired);
        };
        let parent = table.sql_name();
        let now = db_now(&mut conn).await?;
        // A retention longer than time itself retires nothing.
        let Some(cutoff) = chrono::Duration::from_std(opts.older_than)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
        else {
            return Ok(retired);
        };
        let parts: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = to_regclass($1) ORDER BY c.relname",
        )
        .bind(parent)
        .fetch_all(&mut *conn)
        .await
        .map_err(storage)?;
        let prefix = format!("{parent}_p");
        for name in parts {
            let Some(start) = name
                .strip_prefix(&prefix)
                .and_then(|s| p.period.parse_suffix(s))
            else {
                continue;
            };
            let end = start + p.period.length();
            if end > cutoff {
                continue;
            }
            // A partition another cleanup dropped meanwhile is skipped.
            let gone = |e: &Error| sqlstate(e).is_some_and(|c| c == "42P01");
            match blocker(&mut conn, &name, opts).await {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    retired.kept.push(KeptPartition { name, reason });
                    continue;
                }
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            }
            let counted: Result<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed') FROM {name}"
            )))
            .fetch_one(&mut *conn)
            .await
            .map_err(storage);
            let (completed, failed) = match counted {
                Ok(c) => c,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if !opts.dry_run {
                let mut tx = conn.begin().await.map_err(storage)?;
                exec(
                    &mut tx,
                    format!(
                        "SET LOCAL lock_timeout = {}",
                        lock_timeout_ms(opts.lock_timeout)
                    ),
                )
                .await?;
                let detached = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE {parent} DETACH PARTITION {name}"
                )))
                .execute(&mut *tx)
                .await;
                if let Err(e) = detached {
                    let busy = e
                        .as_database_error()
                        .and_then(|d| d.code())
                        .is_some_and(|c| c == "55P03");
                    if busy {
                        // Each wait queues every producer and relay behind
                        // it: one is enough for this run.
                        retired.kept.push(KeptPartition {
                            name,
                            reason: format!(
                                "the table stayed busy for {} ms (lock_timeout): this and older partitions wait for the next cleanup",
                                opts.lock_timeout.as_millis()
                            ),
                        });
                        break;
                    }
                    // Detached or dropped by another cleanup meanwhile.
                    let e = storage(e);
                    if gone(&e) {
                        continue;
                    }
                    return Err(e);
                }
                if let Some(reason) = blocker(&mut tx, &name, opts).await? {
                    tx.rollback().await.map_err(storage)?;
                    retired.kept.push(KeptPartition { name, reason });
                    continue;
                }
                if table == Table::Outbox {
                    // The keys of its rows go with them, in the same
                    // transaction (a drop rolled back keeps them). Read
                    // from the partition's key index: cheap without keys.
                    exec(
                        &mut tx,
                        format!(
                            "DELETE FROM omnibox_outbox_keys k USING {name} o
                              WHERE o.idempotency_key IS NOT NULL
                                AND k.idempotency_key = o.idempotency_key AND k.event_id = o.id"
                        ),
                    )
                    .await?;
                }
                exec(&mut tx, format!("DROP TABLE {name}")).await?;
                tx.commit().await.map_err(storage)?;
            }
            retired.completed += u64::try_from(completed).unwrap_or(0);
            retired.failed += u64::try_from(failed).unwrap_or(0);
            retired.partitions.push(name);
        }
        Ok(retired)
    }
}

/// Why partition `name` must stay, if it must: it holds a pending row, a
/// failed row not past retention not past retention, or a row completed within it. Each test
/// reads one of the table's small partial indexes.
async fn blocker(
    conn: &mut PgConnection,
    name: &str,
    opts: &RetireOptions,
) -> Result<Option<String>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM {name} WHERE status = 'pending') AS pending,
                EXISTS (SELECT 1 FROM {name} WHERE status = 'failed'
                         AND NOT ($1 AND updated_at < now() - make_interval(secs => $2))) AS failed,
                EXISTS (SELECT 1 FROM {name} WHERE status = 'completed'
                         AND completed_at >= now() - make_interval(secs => $3)) AS young"
    )))
    .bind(opts.include_failed)
    .bind(opts.failed_older_than.as_secs_f64())
    .bind(opts.older_than.as_secs_f64())
    .fetch_one(&mut *conn)
    .await
    .map_err(storage)?;
    let flag = |c: &str| row.try_get::<bool, _>(c).map_err(storage);
    Ok(if flag("pending")? {
        Some("it holds pending rows".to_string())
    } else if flag("failed")? {
        Some(if opts.include_failed {
            "it holds failed rows younger than --failed-older-than".to_string()
        } else {
            "it holds failed rows (add --include-failed to retire them)".to_string()
        })
    } else if flag("young")? {
        Some("it holds rows completed within the retention".to_string())
    } else {
        None
    })
}
