//! [`EventStore`] for PostgreSQL tables.

use crate::store::FetchFilters;
use std::time::Duration;

use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{PgRoute, PgTable, decode};
use crate::error::{Error, Result, storage};
use crate::model::{Event, EventStatus, Timestamp, UnlockReason, time};
use crate::store::ClaimCursor;
use crate::store::claim::{self, Scanned, WalkRow};
use crate::store::dialect::{self, Pg};
use crate::store::{
    Capabilities, Claim, ClaimOptions, ClaimToken, EventStore, FailReport, Failure, ListFilter,
    RequeueFilter, RetryAt, TableCounts, guard_result, stored_error,
};

impl<R: PgRoute> EventStore<R> for PgTable<R> {
    fn capabilities(&self) -> Capabilities {
        super::CAPABILITIES
    }

    async fn get(&self, id: Uuid) -> Result<Option<Event<R>>> {
        let row = sqlx::query(R::sql().get)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(storage)?;
        row.as_ref().map(decode).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(R::sql().select_all);
        dialect::push_list::<Pg>(&mut qb, R::TABLE, filter);
        let rows = qb.build().fetch_all(&self.pool).await.map_err(storage)?;
        rows.iter().map(decode).collect()
    }

    async fn counts(&self) -> Result<TableCounts> {
        let row = sqlx::query(R::sql().counts)
            .fetch_one(&self.pool)
            .await
            .map_err(storage)?;
        let count = |name: &str| -> Result<u64> {
            Ok(row.try_get::<i64, _>(name).map_err(storage)? as u64)
        };
        Ok(TableCounts {
            table: R::TABLE,
            pending: count("pending")?,
            completed: count("completed")?,
            failed: count("failed")?,
            locked: count("locked")?,
            due_now: count("due_now")?,
            oldest_pending_created_at: row.try_get("oldest_pending").map_err(storage)?,
            now: time::truncate(row.try_get("now").map_err(storage)?),
            completed_is_estimate: false,
        })
    }

    async fn claim(&self, opts: &ClaimOptions) -> Result<Claim<R>> {
        opts.check()?;
        opts.filters.check_for(R::TABLE)?;
        if R::KEY_ORDER {
            return self.claim_in_key_order(opts).await;
        }
        let rows = sqlx::query(R::sql().claim)
            .bind(crate::store::secs(opts.lease))
            .bind(i64::from(opts.limit))
            .bind(opts.worker.as_str())
            .bind(FetchFilters::pg(&opts.filters.sources))
            .bind(FetchFilters::pg(&opts.filters.event_types))
            .bind(opts.byte_budget())
            .bind(FetchFilters::pg(&opts.filters.consumer_groups))
            .persistent(false)
            .fetch(&self.pool);
        let events = decode_all(rows).await?;
        Ok(claimed(opts, events, false, None))
    }

    async fn claimable_exists_for(&self, filters: &FetchFilters) -> Result<bool> {
        filters.check_for(R::TABLE)?;
        let q = sqlx::query_scalar(R::sql().claimable_exists);
        let q = if R::KEY_ORDER {
            q.bind(FetchFilters::pg(&filters.topics))
        } else {
            q.bind(FetchFilters::pg(&filters.sources))
                .bind(FetchFilters::pg(&filters.event_types))
                .bind(FetchFilters::pg(&filters.consumer_groups))
        };
        q.persistent(false)
            .fetch_one(&self.pool)
            .await
            .map_err(storage)
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
        let changed: Vec<Uuid> = sqlx::query_scalar(R::sql().extend_lease)
            .bind(ids)
            .bind(token.worker.as_str())
            .bind(token.locked_at)
            .bind(crate::store::secs(lease))
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        Ok(changed.len())
    }

    async fn complete(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let changed: Vec<Uuid> = sqlx::query_scalar(R::sql().complete)
            .bind(ids)
            .bind(token.worker.as_str())
            .bind(token.locked_at)
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        guard_result(ids, &changed)?;
        Ok(changed.len())
    }

    async fn fail(&self, token: &ClaimToken, failures: &[Failure]) -> Result<FailReport> {
        if failures.is_empty() {
            return Ok(FailReport::default());
        }
        let ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
        let errors: Vec<String> = failures.iter().map(|f| stored_error(&f.error)).collect();
        let counted: Vec<bool> = failures.iter().map(|f| f.counted).collect();
        let retry_at: Vec<Option<Timestamp>> = failures
            .iter()
            .map(|f| match f.retry {
                RetryAt::At(t) => Some(time::truncate(t)),
                RetryAt::After(_) => None,
            })
            .collect();
        let delay: Vec<Option<f64>> = failures
            .iter()
            .map(|f| match f.retry {
                RetryAt::After(d) => Some(crate::store::secs(d)),
                RetryAt::At(_) => None,
            })
            .collect();
        let rows = sqlx::query(R::sql().fail)
            .bind(&ids)
            .bind(errors)
            .bind(counted)
            .bind(retry_at)
            .bind(delay)
            .bind(token.worker.as_str())
            .bind(token.locked_at)
            .bind(failures.iter().map(|f| f.dead).collect::<Vec<bool>>())
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        let mut report = FailReport::default();
        let mut changed = Vec::with_capacity(rows.len());
        for row in rows {
            let id: Uuid = row.try_get("id").map_err(storage)?;
            let status: String = row.try_get("status").map_err(storage)?;
            changed.push(id);
            if status == EventStatus::Failed.as_str() {
                report.failed.push(id);
            } else {
                report.rescheduled.push(id);
            }
        }
        guard_result(&ids, &changed)?;
        Ok(report)
    }

    async fn release(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let changed: Vec<Uuid> = sqlx::query_scalar(R::sql().release)
            .bind(ids)
            .bind(token.worker.as_str())
            .bind(token.locked_at)
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        guard_result(ids, &changed)?;
        Ok(changed.len())
    }

    async fn force_unlock(&self, id: Uuid, reason: &UnlockReason) -> Result<Event<R>> {
        let row = sqlx::query(R::sql().force_unlock)
            .bind(id)
            .bind(reason.last_error())
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
            let n = sqlx::query(R::sql().release_stale)
                .bind(crate::store::secs(older_than))
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
        let n = sqlx::query(R::sql().delete_completed)
            .bind(crate::store::secs(older_than))
            .bind(i64::from(batch_size.max(1)))
            .execute(&self.pool)
            .await
            .map_err(storage)?
            .rows_affected();
        Ok(n)
    }

    async fn requeue_failed(&self, filter: &RequeueFilter) -> Result<Vec<Uuid>> {
        filter.check(R::TABLE)?;
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(R::sql().requeue_head);
        dialect::push_failed::<Pg>(&mut qb, R::TABLE, filter);
        qb.push(" FOR UPDATE SKIP LOCKED) RETURNING id");
        let mut tx = self.pool.begin().await.map_err(storage)?;
        let ids: Vec<Uuid> = qb
            .build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .map_err(storage)?;
        // The requeued events are back: their open dead letters are done.
        super::driver::mark_replayed(&mut tx, R::TABLE, &ids).await?;
        tx.commit().await.map_err(storage)?;
        Ok(ids)
    }
}

/// A claim's result: events in `seq` order and the claim's token (the
/// `locked_at` all of them got: the claiming transaction's `now()`).
fn claimed<R: PgRoute>(
    opts: &ClaimOptions,
    mut events: Vec<Event<R>>,
    contended: bool,
    next: Option<ClaimCursor>,
) -> Claim<R> {
    events.sort_by_key(|e| e.seq);
    let locked_at = events
        .first()
        .and_then(|e| e.locked_at)
        .unwrap_or_else(time::now);
    Claim {
        token: ClaimToken {
            worker: opts.worker.clone(),
            locked_at,
            lease: opts.lease,
        },
        events,
        contended,
        next,
    }
}

/// Decodes rows as they arrive: a claim of large events holds each row's
/// wire bytes only until it is decoded, not the whole batch's beside the
/// events.
async fn decode_all<R: PgRoute>(
    rows: impl futures_util::Stream<Item = std::result::Result<sqlx::postgres::PgRow, sqlx::Error>>,
) -> Result<Vec<Event<R>>> {
    use futures_util::TryStreamExt;
    let mut rows = std::pin::pin!(rows);
    let mut events = Vec::new();
    while let Some(row) = rows.try_next().await.map_err(storage)? {
        events.push(decode(&row)?);
    }
    Ok(events)
}

/// Locks the rows of `ids` that no other transaction holds, and returns
/// those still pending and ready.
async fn lock_ready(
    tx: &mut sqlx::PgConnection,
    ids: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>> {
    Ok(sqlx::query_as::<_, (Uuid, bool)>(super::sql::OUTBOX_LOCK)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(storage)?
        .into_iter()
        .filter_map(|(id, ready)| ready.then_some(id))
        .collect())
}

impl<R: PgRoute> PgTable<R> {
    /// The outbox claim (see `store/claim.rs`): discover open keys and walk
    /// them, plan the runs, lock what can be locked, mark it claimed; one
    /// transaction. Every statement is planned for its own parameters
    /// (`plan_cache_mode = force_custom_plan` for the transaction): a cached
    /// generic plan must not decide how the claim reads the table. The
    /// statements themselves are prepared once per connection and reused,
    /// so each costs one round trip (an unnamed statement costs two: parse
    /// and describe, then bind and execute).
    async fn claim_in_key_order(&self, opts: &ClaimOptions) -> Result<Claim<R>> {
        let limit = opts.limit as usize;
        let examine = opts.examine_limit();
        let start = opts.after.unwrap_or(ClaimCursor {
            scheduled_at: claim::BEGINNING,
            seq: 0,
        });
        // One round trip opens the transaction and sets it up (see
        // `CLAIM_BEGIN`).
        let mut tx = self
            .pool
            .begin_with(super::sql::CLAIM_BEGIN)
            .await
            .map_err(storage)?;
        let scanned = sqlx::query(super::sql::OUTBOX_SCAN)
            .bind(start.scheduled_at)
            .bind(start.seq)
            .bind(i64::from(examine))
            .bind(i64::from(opts.limit))
            .bind(claim::spread_skip(opts.limit, opts.spread))
            // One topic as a plain equality, so the topic index is read in
            // (scheduled_at, seq) order; several as an array.
            .bind(match opts.filters.topics.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            })
            .bind(FetchFilters::pg(&opts.filters.topics).filter(|t| t.len() > 1))
            .fetch_all(&mut *tx)
            .await
            .map_err(storage)?
            .iter()
            .map(|r| {
                Ok(Scanned {
                    topic: r.try_get("topic")?,
                    partition_key: r.try_get("partition_key")?,
                    scheduled_at: r.try_get("scheduled_at")?,
                    seq: r.try_get("seq")?,
                    expired: r.try_get("expired")?,
                })
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
            .map_err(storage)?;
        let (keys, next) = claim::candidates(&scanned, examine as usize);
        if keys.is_empty() {
            tx.commit().await.map_err(storage)?;
            return Ok(claimed(opts, Vec::new(), false, next));
        }
        let (own_first, own_last): (Vec<Option<i64>>, Vec<Option<i64>>) = keys
            .iter()
            .map(|k| {
                opts.own
                    .get(k)
                    .map_or((None, None), |&(a, b)| (Some(a), Some(b)))
            })
            .unzip();
        let (topics, partition_keys): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
        let walked = sqlx::query(super::sql::OUTBOX_WALK)
            .bind(topics)
            .bind(partition_keys)
            .bind(i64::from(opts.limit))
            .bind(own_first)
            .bind(own_last)
            .bind(opts.worker.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(storage)?
            .iter()
            .map(|r| {
                Ok(WalkRow {
                    key: r.try_get("ord")?,
                    id: r.try_get("id")?,
                    seq: r.try_get("seq")?,
                    ready: r.try_get("ready")?,
                    tried: r.try_get("tried")?,
                    locked: r.try_get("locked")?,
                    bytes: r.try_get::<i64, _>("bytes")?.max(0) as u64,
                })
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
            .map_err(storage)?;
        let runs = claim::plan(&walked, limit, opts.max_bytes);
        if runs.is_empty() {
            tx.commit().await.map_err(storage)?;
            return Ok(claimed(opts, Vec::new(), false, next));
        }
        // Heads first: a key belongs to the claimer that locks its head;
        // the rest of a run is locked only by the head's holder. (A run
        // always holds its head: `claim::plan` never makes an empty one.)
        let heads: Vec<Uuid> = runs.iter().map(|r| r.ids[0]).collect();
        let mut locked = lock_ready(&mut tx, &heads).await?;
        let rest: Vec<Uuid> = runs
            .iter()
            .filter(|r| locked.contains(&r.ids[0]))
            .flat_map(|r| r.ids[1..].iter().copied())
            .collect();
        if !rest.is_empty() {
            locked.extend(lock_ready(&mut tx, &rest).await?);
        }
        let (ids, contended) = claim::keep_locked_prefixes(&runs, &locked);
        if ids.is_empty() {
            tx.commit().await.map_err(storage)?;
            return Ok(claimed(opts, Vec::new(), contended, next));
        }
        let rows = sqlx::query(super::sql::OUTBOX_MARK)
            .bind(&ids)
            .bind(opts.worker.as_str())
            .bind(crate::store::secs(opts.lease))
            .fetch(&mut *tx);
        let events = decode_all(rows).await?;
        tx.commit().await.map_err(storage)?;
        Ok(claimed(opts, events, contended, next))
    }
}
