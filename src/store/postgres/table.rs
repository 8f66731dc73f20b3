//! The statements of a PostgreSQL table ([`TableBackend`], on which the
//! store traits are written once) and the outbox's claim.

use std::time::Duration;

use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::held::Read;
use super::{PgRoute, PgTable, created_bounds, decode};
use crate::error::{Result, storage};
use crate::model::{Event, Timestamp, UnlockReason, time};
use crate::store::claim::{self, Scanned, WalkRow};
use crate::store::dialect::Pg;
use crate::store::table::{Bounds, Layout, TableBackend, decode_all, exact_counts};
use crate::store::{Claim, ClaimOptions, ClaimToken, FailedErrors, Failure, FetchFilters};
use crate::store::{RetryAt, TableCounts, stored_error};

impl<R: PgRoute> TableBackend for PgTable<R> {
    type R = R;
    type D = Pg;

    async fn count_rows(&self) -> Result<TableCounts> {
        let row = sqlx::query(Self::sql().counts)
            .fetch_one(&self.pool)
            .await
            .map_err(storage)?;
        let count = |name: &str| -> Result<u64> {
            Ok(row.try_get::<i64, _>(name).map_err(storage)? as u64)
        };
        let oldest = row.try_get("oldest_pending").map_err(storage)?;
        let now = time::truncate(row.try_get("now").map_err(storage)?);
        exact_counts(R::TABLE, count, oldest, now)
    }

    async fn claim_rows(&self, opts: &ClaimOptions) -> Result<Claim<R>> {
        if Self::KEY_ORDER {
            return self.claim_in_key_order(opts).await;
        }
        let rows = sqlx::query(Self::sql().claim)
            .bind(crate::store::secs(opts.lease))
            .bind(i64::from(opts.limit))
            .bind(opts.worker.as_str())
            .bind(FetchFilters::pg(&opts.filters.sources))
            .bind(FetchFilters::pg(&opts.filters.event_types))
            .bind(opts.byte_budget())
            .bind(FetchFilters::pg(&opts.filters.consumer_groups))
            .persistent(false)
            .fetch(&self.pool);
        let events = decode_all(rows, decode).await?;
        Ok(claim::claimed(opts, None, events, false, None))
    }

    async fn claimable(&self, filters: &FetchFilters) -> Result<bool> {
        let q = sqlx::query_scalar(Self::sql().claimable_exists);
        let q = if Self::KEY_ORDER {
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

    async fn update_claimed(
        &self,
        sql: &'static str,
        token: &ClaimToken,
        ids: &[Uuid],
        lease: Option<Duration>,
    ) -> Result<Vec<Uuid>> {
        if Self::KEY_ORDER && self.held.holds(token) {
            let sqls = Self::sql();
            let held = if sql == sqls.complete {
                self.complete_held(token, ids).await?
            } else if sql == sqls.extend_lease {
                self.touch_held(token, ids).await?
            } else {
                self.lease_held(token).await?;
                None
            };
            if let Some(ids) = held {
                return Ok(ids);
            }
        }
        let q = sqlx::query_scalar(sql)
            .bind(ids)
            .bind(token.worker.as_str())
            .bind(token.locked_at);
        let q = match lease {
            Some(lease) => q.bind(crate::store::secs(lease)),
            None => q,
        };
        let (from, to) = created_bounds(token.created_between);
        q.bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await
            .map_err(storage)
    }

    async fn fail_rows(
        &self,
        token: &ClaimToken,
        failures: &[Failure],
    ) -> Result<Vec<(Uuid, String)>> {
        self.lease_held(token).await?;
        let mut written = self.write_failures(token, failures).await?;
        // A dead failure outside its fence (an operator unlocked the row in
        // flight) skips a row another transaction locks, so as never to wait
        // on a held claim. A lock held for a moment (the unlock's own
        // statement still running, a claim's lock step) would then lose the
        // failure, and the row would be sent again after the later rows of
        // its key that were acknowledged: try those again, briefly. The
        // batch's other rows stay leased meanwhile, so nobody claims the key.
        for wait_ms in [5, 20, 80] {
            let done: std::collections::HashSet<Uuid> = written.iter().map(|(id, _)| *id).collect();
            let missing: Vec<Failure> = failures
                .iter()
                .filter(|f| f.dead && !done.contains(&f.id))
                .cloned()
                .collect();
            if missing.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            written.extend(self.write_failures(token, &missing).await?);
        }
        Ok(written)
    }

    async fn unlock_row(&self, id: Uuid, reason: &UnlockReason) -> Result<Option<Event<R>>> {
        let row = sqlx::query(Self::sql().force_unlock)
            .bind(id)
            .bind(reason.last_error())
            .fetch_optional(&self.pool)
            .await
            .map_err(storage)?;
        row.as_ref().map(decode).transpose()
    }

    async fn unlock_worker(&self, worker: &str, reason: &UnlockReason) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(Self::sql().unlock_worker)
            .bind(worker)
            .bind(reason.last_error())
            .fetch_all(&self.pool)
            .await
            .map_err(storage)
    }

    async fn release_stale_batch(&self, older_than: Duration, batch: i64) -> Result<u64> {
        self.delete_aged(Self::sql().release_stale, older_than, batch)
            .await
    }

    async fn count_stale(&self, older_than: Duration) -> Result<i64> {
        self.count_aged(Self::sql().count_stale, older_than).await
    }

    async fn requeue(&self, mut qb: QueryBuilder<Postgres>, _now: ()) -> Result<Vec<Uuid>> {
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

    async fn failed_groups(&self, each: &mut (dyn FnMut(FailedErrors) + Send)) -> Result<()> {
        super::maintenance::failed_errors(self, each).await
    }
}

/// The earliest and latest `created_at` of `ids` among the walked rows.
fn created_of(
    created: &std::collections::HashMap<Uuid, Timestamp>,
    ids: &[Uuid],
) -> Option<(Timestamp, Timestamp)> {
    let times = ids.iter().filter_map(|id| created.get(id));
    let first = times.clone().min()?;
    let last = times.max()?;
    Some((*first, *last))
}

/// Locks the rows of `ids` that no other transaction holds, and returns
/// those still pending and ready. With `read` (a claim that may be held),
/// the ready rows are read whole into it as they are locked.
async fn lock_ready(
    tx: &mut sqlx::PgConnection,
    ids: &[Uuid],
    created: &std::collections::HashMap<Uuid, Timestamp>,
    taken: &mut usize,
    read: Option<(&mut Read, &ClaimOptions)>,
) -> Result<std::collections::HashSet<Uuid>> {
    use futures_util::TryStreamExt;
    let (from, to) = created_bounds(created_of(created, ids));
    let Some((read, opts)) = read else {
        let rows = sqlx::query_as::<_, (Uuid, bool)>(super::sql::OUTBOX_LOCK)
            .bind(ids)
            .bind(from)
            .bind(to)
            .fetch_all(&mut *tx)
            .await
            .map_err(storage)?;
        // Every row returned is locked, ready or not.
        *taken += rows.len();
        return Ok(rows
            .into_iter()
            .filter_map(|(id, ready)| ready.then_some(id))
            .collect());
    };
    let idle_ms = opts.lease.as_millis().clamp(1_000, i32::MAX as u128);
    let mut rows = sqlx::query(super::sql::OUTBOX_LOCK_READ)
        .bind(ids)
        .bind(from)
        .bind(to)
        .bind(opts.worker.as_str())
        .bind(crate::store::secs(opts.lease))
        .bind(idle_ms.to_string())
        .fetch(&mut *tx);
    let mut ready = std::collections::HashSet::new();
    while let Some(row) = rows.try_next().await.map_err(storage)? {
        // Every row returned is locked, ready or not; only a ready one is
        // kept (the claim may take it).
        *taken += 1;
        if row.try_get::<bool, _>("ready").map_err(storage)? {
            let id: Uuid = row.try_get("id").map_err(storage)?;
            ready.insert(id);
            read.insert(id, row);
        }
    }
    Ok(ready)
}

/// A row of the outbox's walk, its columns in order: ord, id, seq,
/// created_at, ready, tried, locked, bytes.
type WalkColumns = (i64, Uuid, i64, Timestamp, bool, bool, bool, i64, bool);

/// What the claim's walk binds.
struct WalkKeys<'a> {
    topics: Vec<String>,
    partition_keys: Vec<String>,
    limit: i64,
    own_first: Vec<Option<i64>>,
    own_last: Vec<Option<i64>>,
    worker: &'a str,
}

impl<R: PgRoute> PgTable<R> {
    /// Runs the failure statement for `failures` of `token`'s claim;
    /// returns the rows written, with their new status.
    async fn write_failures(
        &self,
        token: &ClaimToken,
        failures: &[Failure],
    ) -> Result<Vec<(Uuid, String)>> {
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
        let (from, to) = created_bounds(token.created_between);
        sqlx::query_as(Self::sql().fail)
            .bind(&ids)
            .bind(errors)
            .bind(counted)
            .bind(retry_at)
            .bind(delay)
            .bind(token.worker.as_str())
            .bind(token.locked_at)
            .bind(failures.iter().map(|f| f.dead).collect::<Vec<bool>>())
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await
            .map_err(storage)
    }

    /// Whether this outbox is partitioned, asked once a minute per store.
    /// A stale answer costs speed, never order: the plain walk is right on
    /// any table, and the partitioned one on a plain table finds no range.
    async fn partitioned(&self, tx: &mut sqlx::Transaction<'_, Postgres>) -> Result<bool> {
        let kept = &self.layout.partitioned;
        if let Some(p) = kept.get(Layout::KEEP_PARTITIONED) {
            return Ok(p);
        }
        let p: bool = sqlx::query_scalar(super::sql::OUTBOX_IS_PARTITIONED)
            .fetch_one(&mut **tx)
            .await
            .map_err(storage)?;
        kept.set(p);
        Ok(p)
    }

    /// The hint of where pending rows lie
    /// ([`OUTBOX_PENDING_RANGE`](super::sql::OUTBOX_PENDING_RANGE)), read
    /// again after a second or once a walk found it stale.
    async fn range_hint(&self, tx: &mut sqlx::Transaction<'_, Postgres>) -> Result<Bounds> {
        let kept = &self.layout.range;
        if let Some(range) = kept.get(Layout::KEEP_RANGE) {
            return Ok(range);
        }
        let range: Bounds = sqlx::query_as(super::sql::OUTBOX_PENDING_RANGE)
            .fetch_one(&mut **tx)
            .await
            .map_err(storage)?;
        kept.set(range);
        Ok(range)
    }

    /// The claim's walk (step 2): on a partitioned table pruned to the
    /// range hint, and walked again without a bound when the walk's own
    /// snapshot says a pending row lies outside it
    /// ([`OUTBOX_WALK_PARTITIONED`](super::sql::OUTBOX_WALK_PARTITIONED)).
    async fn walk(
        &self,
        tx: &mut sqlx::Transaction<'_, Postgres>,
        keys: &WalkKeys<'_>,
        hint: Option<Bounds>,
    ) -> Result<Vec<WalkColumns>> {
        let run = |sql: &'static str, range: Option<Bounds>| {
            let mut q = sqlx::query_as(sql)
                .bind(&keys.topics)
                .bind(&keys.partition_keys)
                .bind(keys.limit)
                .bind(&keys.own_first)
                .bind(&keys.own_last)
                .bind(keys.worker);
            if let Some((lo, hi)) = range {
                q = q.bind(lo).bind(hi);
            }
            q
        };
        let Some(range) = hint else {
            return run(super::sql::OUTBOX_WALK, None)
                .fetch_all(&mut **tx)
                .await
                .map_err(storage);
        };
        let walked: Vec<WalkColumns> = run(super::sql::OUTBOX_WALK_PARTITIONED, Some(range))
            .fetch_all(&mut **tx)
            .await
            .map_err(storage)?;
        if !walked.iter().any(|w| w.8) {
            return Ok(walked);
        }
        tracing::debug!(
            "a pending row lies outside the partitions the claim's range hint named; walking them all"
        );
        self.layout.range.forget();
        run(super::sql::OUTBOX_WALK_PARTITIONED, Some((None, None)))
            .fetch_all(&mut **tx)
            .await
            .map_err(storage)
    }

    /// The outbox claim (see `store/claim.rs`): discover open keys and walk
    /// them, plan the runs, lock what can be locked, mark it claimed; one
    /// transaction. The scan is planned for its own parameters
    /// (`plan_cache_mode = force_custom_plan` for the transaction): a cached
    /// generic plan must not decide how it reads the table. On a plain
    /// table the statements after it run generic plans (see
    /// `CLAIM_GENERIC_BEGIN`); on a partitioned one, custom plans that
    /// prune its partitions. The
    /// statements themselves are prepared once per connection and reused,
    /// so each costs one round trip (an unnamed statement costs two: parse
    /// and describe, then bind and execute).
    async fn claim_in_key_order(&self, opts: &ClaimOptions) -> Result<Claim<R>> {
        let limit = opts.limit as usize;
        let examine = opts.examine_limit();
        let start = claim::start(opts);
        // One round trip opens the transaction and sets it up (see
        // `CLAIM_BEGIN`, `CLAIM_GENERIC_BEGIN`).
        // A claim of given keys on a table known to be plain runs generic
        // plans from the start (it has no scan to plan for its limits).
        let known_plain = self.layout.partitioned.get(Layout::KEEP_PARTITIONED) == Some(false);
        let begin = if known_plain && !opts.keys.is_empty() {
            super::sql::CLAIM_GENERIC_BEGIN
        } else {
            super::sql::CLAIM_BEGIN
        };
        let mut tx = self.pool.begin_with(begin).await.map_err(storage)?;
        // A partitioned outbox: where pending rows lie, a hint the scan
        // and the walk are planned for.
        let hint = if self.partitioned(&mut tx).await? {
            Some(self.range_hint(&mut tx).await?)
        } else {
            None
        };
        let (keys, next) = if opts.keys.is_empty() {
            let scan = match hint {
                Some(_) => super::sql::OUTBOX_SCAN_PARTITIONED,
                None => super::sql::OUTBOX_SCAN,
            };
            let mut scan = sqlx::query(scan)
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
                .bind(FetchFilters::pg(&opts.filters.topics).filter(|t| t.len() > 1));
            if let Some((lo, hi)) = hint {
                scan = scan.bind(lo).bind(hi);
            }
            let scanned = scan
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
            claim::candidates(&scanned, examine as usize)
        } else {
            claim::given(opts)
        };
        if keys.is_empty() {
            tx.commit().await.map_err(storage)?;
            return Ok(claim::claimed(opts, None, Vec::new(), false, next));
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
        let mut created = std::collections::HashMap::new();
        let walk_keys = WalkKeys {
            topics,
            partition_keys,
            limit: i64::from(opts.limit),
            own_first,
            own_last,
            worker: opts.worker.as_str(),
        };
        let walked = self.walk(&mut tx, &walk_keys, hint).await?;
        let walked: Vec<WalkRow> = walked
            .into_iter()
            .map(
                |(key, id, seq, created_at, ready, tried, locked, bytes, _)| {
                    created.insert(id, created_at);
                    let bytes = bytes.max(0) as u64;
                    WalkRow {
                        key,
                        id,
                        seq,
                        ready,
                        tried,
                        locked,
                        bytes,
                    }
                },
            )
            .collect();
        let runs = claim::plan(&walked, limit, opts.max_bytes);
        if runs.is_empty() {
            tx.commit().await.map_err(storage)?;
            return Ok(claim::claimed(opts, None, Vec::new(), false, next));
        }
        // Heads first: a key belongs to the claimer that locks its head;
        // the rest of a run is locked only by the head's holder. (A run
        // always holds its head: `claim::plan` never makes an empty one.)
        let heads: Vec<Uuid> = runs.iter().map(|r| r.ids[0]).collect();
        // A claim that may be held reads its rows whole as it locks them.
        let pool_room = self.held.len() < self.pool.options().get_max_connections() as usize / 2;
        let hold = opts.hold && pool_room;
        let mut read = Read::new();
        let mut taken = 0;
        let mut locked = lock_ready(
            &mut tx,
            &heads,
            &created,
            &mut taken,
            hold.then_some((&mut read, opts)),
        )
        .await?;
        let rest: Vec<Uuid> = runs
            .iter()
            .filter(|r| locked.contains(&r.ids[0]))
            .flat_map(|r| r.ids[1..].iter().copied())
            .collect();
        if !rest.is_empty() {
            let also = hold.then_some((&mut read, opts));
            locked.extend(lock_ready(&mut tx, &rest, &created, &mut taken, also).await?);
        }
        let (ids, contended) = claim::keep_locked_prefixes(&runs, &locked);
        if ids.is_empty() {
            tx.commit().await.map_err(storage)?;
            return Ok(claim::claimed(opts, None, Vec::new(), contended, next));
        }
        let (from, to) = created_bounds(created_of(&created, &ids));
        // A held claim keeps every row lock its transaction took, so only a
        // claim that keeps every row it locked is held: rows locked and left
        // (not ready, or past a gap in their run) could carry another
        // worker's lease, whose writes would then wait for this claim.
        if hold && taken == ids.len() {
            let (events, held) = self.hold(tx, opts, &ids, read, (from, to)).await?;
            let claim = claim::claimed(opts, None, events, contended, next);
            if let Some(held) = held {
                self.held.put(&claim.token, held);
            }
            return Ok(claim);
        }
        // Leased after all: the rows come back from the lease's write.
        drop(read);
        let lease = (opts.worker.as_str(), opts.lease);
        let events = super::held::leased(&mut tx, &ids, lease, (from, to)).await?;
        tx.commit().await.map_err(storage)?;
        Ok(claim::claimed(opts, None, events, contended, next))
    }
}
