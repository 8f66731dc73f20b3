//! The statements of an SQLite table ([`TableBackend`], on which the store
//! traits are written once) and the outbox's claim.

use std::time::Duration;

use serde_json::json;
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::{SqliteRoute, SqliteTable, changed_ids, decode, id_array, sql, ts};
use crate::domain::chrono_dur;
use crate::error::{Error, Result, storage};
use crate::model::{Event, UnlockReason, time};
use crate::store::claim::{self, Scanned, WalkRow};
use crate::store::dialect::Lite;
use crate::store::table::{TableBackend, decode_all, exact_counts};
use crate::store::{Claim, ClaimOptions, ClaimToken, FailedErrors, Failure, FetchFilters};
use crate::store::{RetryAt, TableCounts, stored_error};

impl<R: SqliteRoute> TableBackend for SqliteTable<R> {
    type R = R;
    type D = Lite;

    async fn count_rows(&self) -> Result<TableCounts> {
        let now = time::now();
        let row = sqlx::query(Self::sql().counts)
            .bind(ts(&now))
            .fetch_one(&self.pool)
            .await
            .map_err(storage)?;
        let count = |name: &str| -> Result<u64> {
            Ok(row.try_get::<i64, _>(name).map_err(storage)? as u64)
        };
        let oldest: Option<String> = row.try_get("oldest_pending").map_err(storage)?;
        let oldest = oldest.as_deref().and_then(|s| time::parse_stored(s).ok());
        exact_counts(R::TABLE, count, oldest, now)
    }

    async fn claim_rows(&self, opts: &ClaimOptions) -> Result<Claim<R>> {
        if Self::KEY_ORDER {
            return self.claim_in_key_order(opts).await;
        }
        let now = time::now();
        let until = now + chrono_dur(opts.lease);
        let mut tx = super::write_tx(&self.pool).await?;
        let seqs: Vec<i64> = sqlx::query_scalar(Self::sql().claim)
            .bind(ts(&now))
            .bind(ts(&until))
            .bind(i64::from(opts.limit))
            .bind(opts.worker.as_str())
            .bind(FetchFilters::sqlite(&opts.filters.sources))
            .bind(FetchFilters::sqlite(&opts.filters.event_types))
            .bind(opts.byte_budget())
            .bind(FetchFilters::sqlite(&opts.filters.consumer_groups))
            .fetch_all(&mut *tx)
            .await
            .map_err(storage)?;
        let events = if seqs.is_empty() {
            Vec::new()
        } else {
            // Only the inbox claims without per-key order.
            let seqs = serde_json::Value::from(seqs).to_string();
            let rows = sqlx::query(sql::INBOX_CLAIMED_BY_SEQ)
                .bind(seqs)
                .fetch(&mut *tx);
            decode_all(rows, decode).await?
        };
        tx.commit().await.map_err(storage)?;
        Ok(claim::claimed(opts, Some(now), events, false, None))
    }

    async fn claimable(&self, filters: &FetchFilters) -> Result<bool> {
        let now = time::now();
        let mut q = sqlx::query_scalar(Self::sql().claimable_exists).bind(ts(&now));
        if Self::KEY_ORDER {
            q = q
                .bind(ts(&(now + chrono_dur(claim::KEY_ORDER_GRACE))))
                .bind(FetchFilters::sqlite(&filters.topics));
        } else {
            q = q
                .bind(FetchFilters::sqlite(&filters.sources))
                .bind(FetchFilters::sqlite(&filters.event_types))
                .bind(FetchFilters::sqlite(&filters.consumer_groups));
        }
        q.fetch_one(&self.pool).await.map_err(storage)
    }

    async fn update_claimed(
        &self,
        sql: &'static str,
        token: &ClaimToken,
        ids: &[Uuid],
        lease: Option<Duration>,
    ) -> Result<Vec<Uuid>> {
        let now = time::now();
        let mut q = sqlx::query(sql)
            .bind(id_array(ids))
            .bind(ts(&now))
            .bind(token.worker.as_str())
            .bind(ts(&token.locked_at));
        if let Some(lease) = lease {
            q = q.bind(ts(&(now + chrono_dur(lease))));
        }
        changed_ids(&q.fetch_all(&self.pool).await.map_err(storage)?)
    }

    async fn fail_rows(
        &self,
        token: &ClaimToken,
        failures: &[Failure],
    ) -> Result<Vec<(Uuid, String)>> {
        let list: Vec<serde_json::Value> = failures
            .iter()
            .map(|f| {
                let retry_at = match f.retry {
                    RetryAt::At(t) => t,
                    // SQLite's clock is this machine's.
                    RetryAt::After(d) => time::now() + chrono_dur(d),
                };
                json!({
                    "id": f.id.to_string(),
                    "error": stored_error(&f.error),
                    "counted": i32::from(f.counted),
                    "dead": i32::from(f.dead),
                    "retry_at": ts(&time::truncate(retry_at))})
            })
            .collect();
        let rows = sqlx::query(Self::sql().fail)
            .bind(serde_json::Value::Array(list).to_string())
            .bind(ts(&time::now()))
            .bind(token.worker.as_str())
            .bind(ts(&token.locked_at))
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        let changed = changed_ids(&rows)?;
        rows.iter()
            .zip(changed)
            .map(|(row, id)| Ok((id, row.try_get(1).map_err(storage)?)))
            .collect()
    }

    async fn unlock_row(&self, id: Uuid, reason: &UnlockReason) -> Result<Option<Event<R>>> {
        let q = unlock(Self::sql().force_unlock, id.to_string(), reason);
        let row = q.fetch_optional(&self.pool).await.map_err(storage)?;
        row.as_ref().map(decode).transpose()
    }

    async fn unlock_worker(&self, worker: &str, reason: &UnlockReason) -> Result<Vec<Uuid>> {
        let q = unlock(Self::sql().unlock_worker, worker.to_string(), reason);
        changed_ids(&q.fetch_all(&self.pool).await.map_err(storage)?)
    }

    async fn release_stale_batch(&self, older_than: Duration, batch: i64) -> Result<u64> {
        let now = time::now();
        Ok(sqlx::query(Self::sql().release_stale)
            .bind(ts(&now))
            .bind(ts(&(now - chrono_dur(older_than))))
            .bind(batch)
            .execute(&self.pool)
            .await
            .map_err(storage)?
            .rows_affected())
    }

    async fn count_stale(&self, older_than: Duration) -> Result<i64> {
        let now = time::now();
        sqlx::query_scalar(Self::sql().count_stale)
            .bind(ts(&(now - chrono_dur(older_than))))
            .bind(ts(&now))
            .fetch_one(&self.pool)
            .await
            .map_err(storage)
    }

    async fn requeue(&self, mut qb: QueryBuilder<Sqlite>, now: String) -> Result<Vec<Uuid>> {
        let mut tx = super::write_tx(&self.pool).await?;
        let rows = qb.build().fetch_all(&mut *tx).await.map_err(storage)?;
        let ids = changed_ids(&rows)?;
        // The requeued events are back: their open dead letters are done.
        super::driver::mark_replayed(&mut tx, R::TABLE, &ids, &now).await?;
        tx.commit().await.map_err(storage)?;
        Ok(ids)
    }

    async fn failed_groups(&self, each: &mut (dyn FnMut(FailedErrors) + Send)) -> Result<()> {
        super::maintenance::failed_errors(self, each).await
    }
}

/// An unlock statement `sql` (`force_unlock`, `unlock_worker`) of `who`
/// (the row's id, or the worker) for `reason`: ?1 who, ?2 the error the
/// rows keep, ?3 now.
fn unlock(
    sql: &'static str,
    who: String,
    reason: &UnlockReason,
) -> sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments> {
    sqlx::query(sql)
        .bind(who)
        .bind(reason.last_error())
        .bind(ts(&time::now()))
}

/// Reads one key's walk, a JSON array of `[id, seq, ready, tried, locked,
/// bytes]`.
fn walk_rows(key: i64, json: &str, out: &mut Vec<WalkRow>) -> Result<()> {
    let corrupt = |message: String| Error::CorruptRow {
        id: "?".into(),
        message,
    };
    let rows: Vec<(String, i64, i64, i64, i64, Option<i64>)> =
        serde_json::from_str(json).map_err(|e| corrupt(format!("claim walk: {e}")))?;
    for (id, seq, ready, tried, locked, bytes) in rows {
        out.push(WalkRow {
            key,
            id: Uuid::parse_str(&id)
                .map_err(|e| corrupt(format!("claim walk: bad id {id:?}: {e}")))?,
            seq,
            ready: ready != 0,
            tried: tried != 0,
            locked: locked != 0,
            bytes: bytes.unwrap_or(0).max(0) as u64,
        });
    }
    Ok(())
}

impl<R: SqliteRoute> SqliteTable<R> {
    /// The outbox claim (see `store/claim.rs`) in one write transaction:
    /// discover open keys and walk them (reading keys only until enough
    /// rows are in hand), plan the runs, mark them claimed.
    async fn claim_in_key_order(&self, opts: &ClaimOptions) -> Result<Claim<R>> {
        use futures_util::TryStreamExt;
        let limit = opts.limit as usize;
        let examine = opts.examine_limit();
        let start = claim::start(opts);
        let mut tx = super::write_tx(&self.pool).await?;
        // The clock is read once the write lock is held: every row committed
        // before is then due by it if it was due when written.
        let now = time::now();
        let (keys, next) = if opts.keys.is_empty() {
            let scanned = sqlx::query(sql::OUTBOX_SCAN)
                .bind(ts(&now))
                .bind(ts(&start.scheduled_at))
                .bind(start.seq)
                .bind(i64::from(examine))
                .bind(i64::from(opts.limit))
                .bind(claim::spread_skip(opts.limit, opts.spread))
                .bind(FetchFilters::sqlite(&opts.filters.topics))
                .fetch_all(&mut *tx)
                .await
                .map_err(storage)?
                .iter()
                .map(|r| {
                    let at: String = r.try_get("scheduled_at").map_err(storage)?;
                    Ok(Scanned {
                        topic: r.try_get("topic").map_err(storage)?,
                        partition_key: r.try_get("partition_key").map_err(storage)?,
                        scheduled_at: time::parse_stored(&at).map_err(|m| Error::CorruptRow {
                            id: "?".into(),
                            message: m,
                        })?,
                        seq: r.try_get("seq").map_err(storage)?,
                        expired: r.try_get::<i64, _>("expired").map_err(storage)? != 0,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            claim::candidates(&scanned, examine as usize)
        } else {
            claim::given(opts)
        };
        let mut walked = Vec::new();
        if !keys.is_empty() {
            let keys: Vec<(String, String, Option<i64>, Option<i64>)> = keys
                .into_iter()
                .map(|k| {
                    let own = opts.own.get(&k).copied();
                    (k.0, k.1, own.map(|o| o.0), own.map(|o| o.1))
                })
                .collect();
            let keys = serde_json::to_string(&keys).map_err(|e| Error::CorruptRow {
                id: "?".into(),
                message: e.to_string(),
            })?;
            let mut rows = sqlx::query(sql::OUTBOX_WALK)
                .bind(ts(&now))
                .bind(keys)
                .bind(i64::from(opts.limit))
                .bind(ts(&(now + chrono_dur(claim::KEY_ORDER_GRACE))))
                .bind(opts.worker.as_str())
                .fetch(&mut *tx);
            // A key may return one row past its run (the look at the row
            // after its head), so read a row more per key.
            let mut keys_read = 0;
            while walked.len() < limit + keys_read {
                let Some(row) = rows.try_next().await.map_err(storage)? else {
                    break;
                };
                keys_read += 1;
                let key: i64 = row.try_get("ord").map_err(storage)?;
                let json: String = row.try_get("walk").map_err(storage)?;
                walk_rows(key, &json, &mut walked)?;
            }
        }
        let runs = claim::plan(&walked, limit, opts.max_bytes);
        if runs.is_empty() {
            tx.commit().await.map_err(storage)?;
            return Ok(claim::claimed(opts, Some(now), Vec::new(), false, next));
        }
        let ids: Vec<Uuid> = runs.iter().flat_map(|r| r.ids.iter().copied()).collect();
        let ids = id_array(&ids);
        sqlx::query(sql::OUTBOX_MARK)
            .bind(ts(&now))
            .bind(opts.worker.as_str())
            .bind(ts(&(now + chrono_dur(opts.lease))))
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
        let rows = sqlx::query(sql::OUTBOX_CLAIMED).bind(&ids).fetch(&mut *tx);
        let events = decode_all(rows, decode).await?;
        tx.commit().await.map_err(storage)?;
        Ok(claim::claimed(opts, Some(now), events, false, next))
    }
}
