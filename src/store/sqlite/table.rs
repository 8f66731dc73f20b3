//! [`EventStore`], [`OutboxStore`] and [`InboxStore`] for SQLite tables.

use crate::store::FetchFilters;
use std::time::Duration;

use serde_json::json;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{SqliteRoute, SqliteTable, decode, id_array, sql};
use crate::domain::chrono_dur;
use crate::error::{Error, Result, storage};
use crate::model::{
    Event, EventStatus, InboxEvent, InboxRoute, OutboxEvent, OutboxRoute, Route, UnlockReason, time,
};
use crate::store::ClaimCursor;
use crate::store::claim::{self, Scanned, WalkRow};
use crate::store::{
    BulkOutcome, Capabilities, Claim, ClaimOptions, ClaimToken, Created, DEFAULT_LIST_LIMIT,
    EventStore, FailReport, Failure, InboxStore, ListFilter, MaintenanceStore, OutboxStore,
    RequeueFilter, RetryAt, TableCounts, guard_result, stored_error, topic_column,
};

fn ts(t: &time::Timestamp) -> String {
    time::format(t)
}

fn changed_ids(rows: &[sqlx::sqlite::SqliteRow]) -> Result<Vec<Uuid>> {
    rows.iter()
        .map(|r| {
            let s: String = r.try_get(0).map_err(storage)?;
            Uuid::parse_str(&s).map_err(|e| Error::CorruptRow {
                id: s.clone(),
                message: e.to_string(),
            })
        })
        .collect()
}

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
        if let Some(status) = filter.status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(t) = &filter.event_type {
            qb.push(" AND event_type = ").push_bind(t.clone());
        }
        if let Some(t) = &filter.topic {
            qb.push(" AND ")
                .push(topic_column(R::TABLE))
                .push(" = ")
                .push_bind(t.clone());
        }
        if let Some(g) = &filter.consumer_group {
            // Checked above: inbox only.
            qb.push(" AND consumer_group = ").push_bind(g.clone());
        }
        if let Some(since) = filter.since {
            qb.push(" AND created_at >= ").push_bind(ts(&since));
        }
        if let Some(after) = filter.after_seq {
            qb.push(" AND seq > ").push_bind(after);
        }
        if let Some(worker) = &filter.locked_by {
            // `locked_until IS NOT NULL` holds for every locked row; it lets
            // the small index of locked rows serve the filter.
            qb.push(" AND locked_until IS NOT NULL AND locked_by = ")
                .push_bind(worker.clone());
        }
        qb.push(" ORDER BY seq LIMIT ")
            .push_bind(i64::from(filter.limit.unwrap_or(DEFAULT_LIST_LIMIT)));
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
                    "retry_at": ts(&time::truncate(retry_at)),
                })
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
        push_failed_filters::<R>(&mut qb, filter);
        qb.push(") RETURNING id");
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(storage)?;
        let rows = qb.build().fetch_all(&mut *tx).await.map_err(storage)?;
        let ids = changed_ids(&rows)?;
        // The requeued events are back: their open dead letters are done.
        super::dead_letters::mark_replayed(&mut tx, R::TABLE, &ids, &now_text).await?;
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

/// The `AND ...` filters of a failed-row selection, then `ORDER BY seq [LIMIT]`.
fn push_failed_filters<R: SqliteRoute>(qb: &mut QueryBuilder<Sqlite>, filter: &RequeueFilter) {
    {
        if !filter.ids.is_empty() {
            qb.push(" AND id IN (SELECT value FROM json_each(")
                .push_bind(id_array(&filter.ids))
                .push("))");
        }
        if let Some(t) = &filter.event_type {
            qb.push(" AND event_type = ").push_bind(t.clone());
        }
        if let Some(t) = &filter.topic {
            qb.push(" AND ")
                .push(topic_column(R::TABLE))
                .push(" = ")
                .push_bind(t.clone());
        }
        if let Some(g) = &filter.consumer_group {
            // Checked by the caller: inbox only.
            qb.push(" AND consumer_group = ").push_bind(g.clone());
        }
        if let Some(text) = &filter.error_contains {
            qb.push(" AND instr(last_error, ")
                .push_bind(text.clone())
                .push(") > 0");
        }
        if let Some(since) = filter.since {
            qb.push(" AND updated_at >= ").push_bind(ts(&since));
        }
        if let Some(until) = filter.until {
            qb.push(" AND updated_at < ").push_bind(ts(&until));
        }
        qb.push(" ORDER BY seq");
        if let Some(limit) = filter.limit {
            qb.push(" LIMIT ").push_bind(i64::from(limit));
        }
    }
}

impl<R: SqliteRoute> MaintenanceStore<R> for SqliteTable<R> {
    async fn list_failed(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(R::sql().failed_head);
        push_failed_filters::<R>(&mut qb, filter);
        let rows = qb.build().fetch_all(&self.pool).await.map_err(storage)?;
        rows.iter().map(decode).collect()
    }

    async fn list_waiting(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(R::sql().waiting_head);
        qb.push_bind(ts(&time::now()));
        push_failed_filters::<R>(&mut qb, filter);
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

/// Binds the common columns (?1..?16) of an insert.
fn bind_common<'q, R: Route>(
    q: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
    e: &Event<R>,
) -> Result<sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>> {
    e.validate_invariants()?;
    if e.locked_at.is_some() {
        return Err(Error::validation(
            "locked_at",
            "a new event cannot be inserted locked",
        ));
    }
    Ok(q.bind(e.id.to_string())
        .bind(e.event_type.clone())
        .bind(serde_json::to_string(&e.payload).expect("a JSON map serialises"))
        .bind(
            e.headers
                .as_ref()
                .map(|h| serde_json::to_string(h).expect("a string map serialises")),
        )
        .bind(e.trace_id.clone())
        .bind(e.idempotency_key.clone())
        .bind(e.correlation_id.clone())
        .bind(e.causation_id.clone())
        .bind(e.schema_version.clone())
        .bind(e.status.as_str())
        .bind(e.attempts_made)
        .bind(e.max_attempts)
        .bind(e.last_error.clone())
        .bind(ts(&e.scheduled_at))
        .bind(e.completed_at.as_ref().map(ts))
        .bind(ts(&e.created_at)))
}

/// Inserts outbox events on `conn` (a connection or an open transaction) in
/// order, respecting idempotency keys. Nothing is committed here.
pub async fn insert_outbox(
    conn: &mut SqliteConnection,
    events: &[OutboxEvent],
) -> Result<Vec<BulkOutcome>> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let q = bind_common(sqlx::query(sql::OUTBOX.insert), e)?
            .bind(e.route.aggregate_type.clone())
            .bind(e.route.aggregate_id.to_string())
            .bind(e.route.topic.clone())
            .bind(e.route.partition_key.clone());
        let inserted = q.fetch_optional(&mut *conn).await.map_err(storage)?;
        if inserted.is_some() {
            out.push(BulkOutcome {
                id: e.id,
                existing: false,
            });
            continue;
        }
        let key = e.idempotency_key.clone().unwrap_or_default();
        let existing: String = sqlx::query_scalar(sql::OUTBOX_BY_IDEMPOTENCY_KEY)
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .map_err(storage)?;
        let id = Uuid::parse_str(&existing).map_err(|err| Error::CorruptRow {
            id: existing.clone(),
            message: err.to_string(),
        })?;
        out.push(BulkOutcome { id, existing: true });
    }
    Ok(out)
}

/// Inserts inbox events on `conn` in order; an existing
/// `(message_id, consumer_group)` is reported as existing. Nothing is committed here.
pub async fn insert_inbox(
    conn: &mut SqliteConnection,
    events: &[InboxEvent],
) -> Result<Vec<BulkOutcome>> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let q = bind_common(sqlx::query(sql::INBOX.insert), e)?
            .bind(e.route.message_id.clone())
            .bind(e.route.consumer_group.clone())
            .bind(e.route.source.clone());
        let inserted = q.fetch_optional(&mut *conn).await.map_err(storage)?;
        if inserted.is_some() {
            out.push(BulkOutcome {
                id: e.id,
                existing: false,
            });
            continue;
        }
        let row = sqlx::query(sql::INBOX_BY_MESSAGE)
            .bind(e.route.message_id.clone())
            .bind(e.route.consumer_group.clone())
            .fetch_one(&mut *conn)
            .await
            .map_err(storage)?;
        let existing: InboxEvent = decode(&row)?;
        out.push(BulkOutcome {
            id: existing.id,
            existing: true,
        });
    }
    Ok(out)
}

impl OutboxStore for SqliteTable<OutboxRoute> {
    async fn blocked_keys(&self, limit: u32) -> Result<Vec<crate::store::BlockedKey>> {
        let rows = sqlx::query(sql::BLOCKED_KEYS)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(2).map_err(storage)?;
                let at: String = r.try_get(5).map_err(storage)?;
                Ok(crate::store::BlockedKey {
                    topic: r.try_get(0).map_err(storage)?,
                    partition_key: r.try_get(1).map_err(storage)?,
                    head_id: Uuid::parse_str(&id).map_err(|e| Error::CorruptRow {
                        id: id.clone(),
                        message: e.to_string(),
                    })?,
                    head_attempts: r.try_get(3).map_err(storage)?,
                    head_error: r.try_get(4).map_err(storage)?,
                    head_retry_at: time::parse_stored(&at).map_err(|m| Error::CorruptRow {
                        id: id.clone(),
                        message: m,
                    })?,
                    waiting: r.try_get::<i64, _>(6).map_err(storage)? as u64,
                })
            })
            .collect()
    }

    async fn create(&self, event: &OutboxEvent) -> Result<Created<OutboxEvent>> {
        let outcome = self.create_many(std::slice::from_ref(event)).await?[0];
        let row = self
            .get(outcome.id)
            .await?
            .ok_or(Error::NotFound { id: outcome.id })?;
        Ok(if outcome.existing {
            Created::Existing(row)
        } else {
            Created::Inserted(row)
        })
    }

    async fn create_many(&self, events: &[OutboxEvent]) -> Result<Vec<BulkOutcome>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(storage)?;
        let outcomes = insert_outbox(&mut tx, events).await?;
        tx.commit().await.map_err(storage)?;
        Ok(outcomes)
    }
}

impl InboxStore for SqliteTable<InboxRoute> {
    async fn insert(&self, event: &InboxEvent) -> Result<Created<InboxEvent>> {
        let outcome = self.insert_many(std::slice::from_ref(event)).await?[0];
        let row = self
            .get(outcome.id)
            .await?
            .ok_or(Error::NotFound { id: outcome.id })?;
        Ok(if outcome.existing {
            Created::Existing(row)
        } else {
            Created::Inserted(row)
        })
    }

    async fn insert_many(&self, events: &[InboxEvent]) -> Result<Vec<BulkOutcome>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(storage)?;
        let outcomes = insert_inbox(&mut tx, events).await?;
        tx.commit().await.map_err(storage)?;
        Ok(outcomes)
    }

    async fn get_by_message_id(
        &self,
        message_id: &str,
        consumer_group: &str,
    ) -> Result<Option<InboxEvent>> {
        let row = sqlx::query(sql::INBOX_BY_MESSAGE)
            .bind(message_id.to_string())
            .bind(consumer_group.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(storage)?;
        row.as_ref().map(decode).transpose()
    }
}

/// Locks inbox rows for `token` (inside the consumer's transaction).
pub async fn lock_inbox(
    conn: &mut SqliteConnection,
    ids: &[Uuid],
    token: &ClaimToken,
) -> Result<()> {
    sqlx::query(
        "UPDATE inbox_events SET locked_at = ?2, locked_by = ?3, locked_until = ?4, updated_at = ?2 \
         WHERE id IN (SELECT value FROM json_each(?1))",
    )
    .bind(id_array(ids))
    .bind(ts(&token.locked_at))
    .bind(token.worker.as_str().to_string())
    .bind(ts(&(token.locked_at + chrono_dur(token.lease))))
    .execute(&mut *conn)
    .await
    .map_err(storage)?;
    Ok(())
}

/// Existing pending inbox rows met again by the consumer (inside its
/// transaction, which holds SQLite's write lock): each is locked for `token`
/// when it is due and not held by a live lease; see [`crate::store::Existing`].
pub async fn take_inbox(
    conn: &mut SqliteConnection,
    ids: &[Uuid],
    token: &ClaimToken,
) -> Result<std::collections::HashMap<Uuid, crate::store::Existing>> {
    let rows = sqlx::query(
        "SELECT * FROM inbox_events WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'pending'",
    )
    .bind(id_array(ids))
    .fetch_all(&mut *conn)
    .await
    .map_err(storage)?;
    let events = rows
        .iter()
        .map(decode)
        .collect::<Result<Vec<InboxEvent>>>()?;
    let (takeable, out) = crate::store::sort_existing(events, token, time::now());
    if !takeable.is_empty() {
        lock_inbox(conn, &takeable, token).await?;
    }
    Ok(out)
}

/// Unlocks inbox rows (inside the consumer's transaction).
pub async fn unlock_inbox(conn: &mut SqliteConnection, ids: &[Uuid]) -> Result<()> {
    sqlx::query(
        "UPDATE inbox_events SET locked_at = NULL, locked_by = NULL, locked_until = NULL, updated_at = ?2 \
         WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'pending'",
    )
    .bind(id_array(ids))
    .bind(ts(&time::now()))
    .execute(&mut *conn)
    .await
    .map_err(storage)?;
    Ok(())
}

/// Marks inbox rows completed (inside the consumer's transaction).
pub async fn complete_inbox(conn: &mut SqliteConnection, ids: &[Uuid]) -> Result<()> {
    sqlx::query(
        "UPDATE inbox_events SET status = 'completed', completed_at = ?2, locked_at = NULL, locked_by = NULL, \
         locked_until = NULL, updated_at = ?2 WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'pending'",
    )
    .bind(id_array(ids))
    .bind(ts(&time::now()))
    .execute(&mut *conn)
    .await
    .map_err(storage)?;
    Ok(())
}

/// Marks one claimed inbox row completed inside `conn`'s transaction, if
/// `worker` still holds it under the claim that locked it at `locked_at`.
/// Returns whether it did.
pub async fn complete_claimed_inbox(
    conn: &mut SqliteConnection,
    id: Uuid,
    worker: &str,
    locked_at: &time::Timestamp,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE inbox_events SET status = 'completed', completed_at = ?2, locked_at = NULL, locked_by = NULL, \
         locked_until = NULL, updated_at = ?2 WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'pending' \
         AND locked_by = ?3 AND locked_at = ?4",
    )
    .bind(id_array(&[id]))
    .bind(ts(&time::now()))
    .bind(worker)
    .bind(ts(locked_at))
    .execute(&mut *conn)
    .await
    .map_err(storage)?;
    Ok(done.rows_affected() == 1)
}

/// Deletes inbox rows (inside the consumer's transaction).
pub async fn delete_inbox(conn: &mut SqliteConnection, ids: &[Uuid]) -> Result<()> {
    sqlx::query("DELETE FROM inbox_events WHERE id IN (SELECT value FROM json_each(?1))")
        .bind(id_array(ids))
        .execute(&mut *conn)
        .await
        .map_err(storage)?;
    Ok(())
}
