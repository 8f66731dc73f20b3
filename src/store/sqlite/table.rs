//! [`EventStore`], [`OutboxStore`] and [`InboxStore`] for SQLite tables.

use crate::store::FetchFilters;
use std::time::Duration;

use serde_json::json;
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::{SqliteRoute, SqliteTable, changed_ids, decode, id_array, sql, ts};
use crate::domain::chrono_dur;
use crate::error::{Error, Result, storage};
use crate::model::{Event, EventStatus, UnlockReason, time};
use crate::store::ClaimCursor;
use crate::store::claim::{self, Scanned, WalkRow};
use crate::store::dialect::{self, Lite};
use crate::store::{
    Capabilities, Claim, ClaimOptions, ClaimToken, EventStore, FailReport, Failure, ListFilter,
    RequeueFilter, RetryAt, TableCounts, guard_result, stored_error,
};

impl<R: SqliteRoute> EventStore<R> for SqliteTable<R> {
    fn capabilities(&self) -> Capabilities {
        super::CAPABILITIES
    }

    async fn get(&self, id: Uuid) -> Result<Option<Event<R>>> {
        let row = sqlx::query(R::sql().get)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(storage)?;
        row.as_ref().map(decode).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(R::sql().select_all);
        dialect::push_list::<Lite>(&mut qb, R::TABLE, filter);
        let rows = qb.build().fetch_all(&self.pool).await.map_err(storage)?;
        rows.iter().map(decode).collect()
    }

    async fn counts(&self) -> Result<TableCounts> {
        let now = time::now();
        let row = sqlx::query(R::sql().counts)
            .bind(ts(&now))
            .fetch_one(&self.pool)
            .await
            .map_err(storage)?;
        let count = |name: &str| -> Result<u64> {
            Ok(row.try_get::<i64, _>(name).map_err(storage)? as u64)
        };
        let oldest: Option<String> = row.try_get("oldest_pending").map_err(storage)?;
        Ok(TableCounts {
            table: R::TABLE,
            pending: count("pending")?,
            completed: count("completed")?,
            failed: count("failed")?,
            locked: count("locked")?,
            due_now: count("due_now")?,
            oldest_pending_created_at: oldest.as_deref().and_then(|s| time::parse_stored(s).ok()),
            now,
            completed_is_estimate: false,
        })
    }

    async fn claim(&self, opts: &ClaimOptions) -> Result<Claim<R>> {
        opts.check()?;
        opts.filters.check_for(R::TABLE)?;
        if R::KEY_ORDER {
            return self.claim_in_key_order(opts).await;
        }
        let now = time::now();
        let until = now + chrono_dur(opts.lease);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(storage)?;
        let seqs: Vec<i64> = sqlx::query_scalar(R::sql().claim)
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
            let seqs = serde_json::Value::from(seqs).to_string();
            decode_all(
                sqlx::query(R::sql().claimed_by_seq)
                    .bind(seqs)
                    .fetch(&mut *tx),
            )
            .await?
        };
        tx.commit().await.map_err(storage)?;
        Ok(claimed(opts, now, events, None))
    }

    async fn claimable_exists_for(&self, filters: &FetchFilters) -> Result<bool> {
        filters.check_for(R::TABLE)?;
        let now = time::now();
        let mut q = sqlx::query_scalar(R::sql().claimable_exists).bind(ts(&now));
        if R::KEY_ORDER {
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

    async fn extend_lease(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let now = time::now();
        let rows = sqlx::query(R::sql().extend_lease)
            .bind(id_array(ids))
            .bind(ts(&now))
            .bind(token.worker.as_str())
            .bind(ts(&token.locked_at))
            .bind(ts(&(now + chrono_dur(lease))))
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        Ok(rows.len())
    }

    async fn complete(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let rows = sqlx::query(R::sql().complete)
            .bind(id_array(ids))
            .bind(ts(&time::now()))
            .bind(token.worker.as_str())
            .bind(ts(&token.locked_at))
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        let changed = changed_ids(&rows)?;
        guard_result(ids, &changed)?;
        Ok(changed.len())
    }

    async fn fail(&self, token: &ClaimToken, failures: &[Failure]) -> Result<FailReport> {
        if failures.is_empty() {
            return Ok(FailReport::default());
        }
        let ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
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
        let rows = sqlx::query(R::sql().fail)
            .bind(serde_json::Value::Array(list).to_string())
            .bind(ts(&time::now()))
            .bind(token.worker.as_str())
            .bind(ts(&token.locked_at))
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        let mut report = FailReport::default();
        let changed = changed_ids(&rows)?;
        for (row, id) in rows.iter().zip(&changed) {
            let status: String = row.try_get(1).map_err(storage)?;
            if status == EventStatus::Failed.as_str() {
                report.failed.push(*id);
            } else {
                report.rescheduled.push(*id);
            }
        }
        guard_result(&ids, &changed)?;
        Ok(report)
    }

    async fn release(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let rows = sqlx::query(R::sql().release)
            .bind(id_array(ids))
            .bind(ts(&time::now()))
            .bind(token.worker.as_str())
            .bind(ts(&token.locked_at))
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        let changed = changed_ids(&rows)?;
        guard_result(ids, &changed)?;
        Ok(changed.len())
    }

    async fn force_unlock(&self, id: Uuid, reason: &UnlockReason) -> Result<Event<R>> {
        let row = sqlx::query(R::sql().force_unlock)
            .bind(id.to_string())
            .bind(reason.last_error())
            .bind(ts(&time::now()))
            .fetch_optional(&self.pool)
            .await
            .map_err(storage)?;
        match row {
            Some(row) => decode(&row),
            None => match self.get(id).await? {
                None => Err(Error::NotFound { id }),
                Some(_) => Err(Error::NotLocked { id }),
            },
        }
    }

    async fn release_stale_locks(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        let batch = i64::from(batch_size.max(1));
        let mut total = 0;
        loop {
            let now = time::now();
            let n = sqlx::query(R::sql().release_stale)
                .bind(ts(&now))
                .bind(ts(&(now - chrono_dur(older_than))))
                .bind(batch)
                .execute(&self.pool)
                .await
                .map_err(storage)?
                .rows_affected();
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }

    async fn delete_completed(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        let cutoff = time::now() - chrono_dur(older_than);
        let n = sqlx::query(R::sql().delete_completed)
            .bind(ts(&cutoff))
            .bind(i64::from(batch_size.max(1)))
            .execute(&self.pool)
            .await
            .map_err(storage)?
            .rows_affected();
        Ok(n)
    }

    async fn requeue_failed(&self, filter: &RequeueFilter) -> Result<Vec<Uuid>> {
        filter.check(R::TABLE)?;
        let now = ts(&time::now());
        let now_text = now.clone();
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(R::sql().requeue_head);
        qb.push_bind(now.clone())
            .push(", updated_at = ")
            .push_bind(now);
        qb.push(R::sql().requeue_where);
        dialect::push_failed::<Lite>(&mut qb, R::TABLE, filter);
        qb.push(") RETURNING id");
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(storage)?;
        let rows = qb.build().fetch_all(&mut *tx).await.map_err(storage)?;
        let ids = changed_ids(&rows)?;
        // The requeued events are back: their open dead letters are done.
        super::driver::mark_replayed(&mut tx, R::TABLE, &ids, &now_text).await?;
        tx.commit().await.map_err(storage)?;
        Ok(ids)
    }
}

/// A claim's result: events in `seq` order and the claim's token.
fn claimed<R: SqliteRoute>(
    opts: &ClaimOptions,
    locked_at: time::Timestamp,
    mut events: Vec<Event<R>>,
    next: Option<ClaimCursor>,
) -> Claim<R> {
    events.sort_by_key(|e| e.seq);
    Claim {
        token: ClaimToken {
            worker: opts.worker.clone(),
            locked_at,
            lease: opts.lease,
        },
        events,
        contended: false,
        next,
    }
}

/// Decodes rows as they arrive (see the PostgreSQL twin).
async fn decode_all<R: SqliteRoute>(
    rows: impl futures_util::Stream<Item = std::result::Result<sqlx::sqlite::SqliteRow, sqlx::Error>>,
) -> Result<Vec<Event<R>>> {
    use futures_util::TryStreamExt;
    let mut rows = std::pin::pin!(rows);
    let mut events = Vec::new();
    while let Some(row) = rows.try_next().await.map_err(storage)? {
        events.push(decode(&row)?);
    }
    Ok(events)
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
        let start = opts.after.unwrap_or(ClaimCursor {
            scheduled_at: claim::BEGINNING,
            seq: 0,
        });
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(storage)?;
        // The clock is read once the write lock is held: every row committed
        // before is then due by it if it was due when written.
        let now = time::now();
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
        let (keys, next) = claim::candidates(&scanned, examine as usize);
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
            return Ok(claimed(opts, now, Vec::new(), next));
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
        let events =
            decode_all(sqlx::query(sql::OUTBOX_CLAIMED).bind(&ids).fetch(&mut *tx)).await?;
        tx.commit().await.map_err(storage)?;
        Ok(claimed(opts, now, events, next))
    }
}
