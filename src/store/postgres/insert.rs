//! Bulk inserts, usable on the caller's own connection or transaction:
//! outbox rows without idempotency keys through `COPY` in binary (`copy.rs`), other
//! rows through one `INSERT ... SELECT FROM UNNEST(arrays)` per 1,000 rows.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::PgTable;
use super::copy::{binary, copy_outbox, copy_outbox_row, payload_bytes};
use super::sql;
use crate::error::{Error, Result, storage};
use crate::model::{Event, InboxEvent, InboxRoute, OutboxEvent, OutboxRoute, Route, Timestamp};
use crate::store::table::InboxBackend;
use crate::store::{BlockedKey, BulkOutcome, OutboxStore};

/// Rows per statement.
const CHUNK: usize = 1000;
/// Payload bytes per statement (about): a chunk of large events ends at
/// this size, so the statement's arrays and its encoding stay a few MiB
/// whatever the events (the transaction is the same).
const CHUNK_BYTES: usize = 4 << 20;

/// `events` in chunks of at most [`CHUNK`] rows and about [`CHUNK_BYTES`]
/// of payload (at least one row each).
fn chunks<R>(events: &[Event<R>]) -> impl Iterator<Item = &[Event<R>]> {
    let mut rest = events;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && n < CHUNK && (n == 0 || bytes < CHUNK_BYTES) {
            bytes += crate::model::approx_json_len(&rest[n].payload);
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// The database's clock, for rows whose caller set no time: PostgreSQL's
/// `now()` (in a transaction, the very value a column default would get).
async fn db_now(conn: &mut PgConnection) -> Result<Timestamp> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await
        .map_err(storage)
}

/// `db_now` when some event of `events` takes its times from the database.
async fn db_now_for<R: Route>(
    conn: &mut PgConnection,
    events: &[Event<R>],
) -> Result<Option<Timestamp>> {
    if events.iter().any(|e| e.clock_default.any()) {
        Ok(Some(db_now(conn).await?))
    } else {
        Ok(None)
    }
}

/// Whether any event of `chunk` has an idempotency key (then the chunk goes
/// through the idempotent INSERT, not COPY).
fn has_keys(chunk: &[OutboxEvent]) -> bool {
    chunk.iter().any(|e| e.idempotency_key.is_some())
}

/// Inserts a stream of chunks on `conn`, in order: runs of chunks without
/// idempotency keys go through one streaming COPY (the server inserts while
/// the next chunk is parsed), chunks with keys through the idempotent
/// INSERT. Each chunk's outcomes go to `outcomes` once it is sent (and
/// the chunk is dropped then: only the chunk in hand is held). Stops at
/// the first error (of the stream or of the database); nothing is
/// committed here.
pub async fn insert_outbox_stream<S, F>(
    conn: &mut PgConnection,
    chunks: S,
    mut outcomes: F,
) -> Result<()>
where
    S: futures_util::Stream<Item = Result<Vec<OutboxEvent>>> + Send,
    F: FnMut(&[BulkOutcome]) + Send,
{
    use futures_util::StreamExt;
    let mut chunks = std::pin::pin!(chunks);
    let mut pending: Option<Vec<OutboxEvent>> = None;
    let mut ids: Vec<BulkOutcome> = Vec::new();
    loop {
        let chunk = match pending.take() {
            Some(c) => c,
            None => match chunks.next().await {
                Some(c) => c?,
                None => return Ok(()),
            },
        };
        if has_keys(&chunk) {
            outcomes(&insert_outbox(conn, &chunk).await?);
            continue;
        }
        // A COPY that stays open for every following chunk without keys.
        // The database's clock, read once, for rows whose caller set no time.
        let now = db_now(conn).await?;
        let mut copy = conn.copy_in_raw(sql::COPY_OUTBOX).await.map_err(storage)?;
        let mut buf = Vec::with_capacity(chunk.len() * 512);
        buf.extend_from_slice(binary::HEADER);
        let mut next = Some(chunk);
        let result: Result<()> = async {
            while let Some(chunk) = next.take() {
                for e in &chunk {
                    copy_outbox_row(&mut buf, e, Some(&now))?;
                }
                copy.send(buf.as_slice()).await.map_err(storage)?;
                buf.clear();
                ids.clear();
                ids.extend(chunk.iter().map(|e| BulkOutcome {
                    id: e.id,
                    existing: false,
                }));
                outcomes(&ids);
                drop(chunk);
                match chunks.next().await {
                    Some(Ok(c)) if !has_keys(&c) => next = Some(c),
                    Some(Ok(c)) => pending = Some(c),
                    Some(Err(e)) => return Err(e),
                    None => {}
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                copy.send(binary::TRAILER).await.map_err(storage)?;
                copy.finish().await.map_err(storage)?;
            }
            Err(e) => {
                let _ = copy.abort("input rejected").await;
                return Err(e);
            }
        }
        if pending.is_none() {
            // The stream ended inside the COPY.
            return Ok(());
        }
    }
}

/// The columns every table has, as arrays.
#[derive(Default)]
struct ColumnArrays {
    id: Vec<Uuid>,
    event_type: Vec<String>,
    payload: Vec<String>,
    headers: Vec<Option<String>>,
    trace_id: Vec<Option<String>>,
    idempotency_key: Vec<Option<String>>,
    correlation_id: Vec<Option<String>>,
    causation_id: Vec<Option<String>>,
    schema_version: Vec<Option<String>>,
    status: Vec<&'static str>,
    attempts_made: Vec<i32>,
    max_attempts: Vec<i32>,
    last_error: Vec<Option<String>>,
    /// `None`: the caller set no time; the statement uses `now()`.
    scheduled_at: Vec<Option<Timestamp>>,
    completed_at: Vec<Option<Timestamp>>,
    created_at: Vec<Option<Timestamp>>,
    /// The payload's size (bound after the route's columns).
    payload_bytes: Vec<i32>,
}

/// A query of this module, its arguments bound by value or borrowed for `'q`.
type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// One route column of `chunk`, as an array to bind.
fn column<'e, R: Route, T>(chunk: &'e [Event<R>], value: impl Fn(&'e R) -> T) -> Vec<T> {
    chunk.iter().map(|e| value(&e.route)).collect()
}

/// Inserts `chunk` with `sql` (the common columns, then the route's, which
/// `route` binds, then `payload_bytes`); returns the ids of the rows
/// written (a row that exists already is not).
async fn insert_chunk<'e, R: Route>(
    conn: &mut PgConnection,
    sql: &'static str,
    chunk: &'e [Event<R>],
    route: impl FnOnce(PgQuery<'e>) -> PgQuery<'e>,
) -> Result<Vec<Uuid>> {
    let mut common = ColumnArrays::default();
    for e in chunk {
        common.push(e)?;
    }
    let (q, payload_bytes) = common.bind(sqlx::query(sql));
    route(q)
        .bind(payload_bytes)
        .fetch_all(&mut *conn)
        .await
        .map_err(storage)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(storage)
}

impl ColumnArrays {
    fn push<R: Route>(&mut self, e: &Event<R>) -> Result<()> {
        e.validate_invariants()?;
        if e.locked_at.is_some() {
            return Err(Error::validation(
                "locked_at",
                "a new event cannot be inserted locked",
            ));
        }
        self.id.push(e.id);
        self.event_type.push(e.event_type.clone());
        let payload = serde_json::to_string(&e.payload).expect("a JSON map serialises");
        self.payload_bytes.push(payload_bytes(&payload));
        self.payload.push(payload);
        self.headers.push(
            e.headers
                .as_ref()
                .map(|h| serde_json::to_string(h).expect("a string map serialises")),
        );
        self.trace_id.push(e.trace_id.clone());
        self.idempotency_key.push(e.idempotency_key.clone());
        self.correlation_id.push(e.correlation_id.clone());
        self.causation_id.push(e.causation_id.clone());
        self.schema_version.push(e.schema_version.clone());
        self.status.push(e.status.as_str());
        self.attempts_made.push(e.attempts_made);
        self.max_attempts.push(e.max_attempts);
        self.last_error.push(e.last_error.clone());
        let own = |t: Timestamp, default: bool| (!default).then_some(t);
        self.scheduled_at
            .push(own(e.scheduled_at, e.clock_default.scheduled_at));
        self.completed_at.push(e.completed_at);
        self.created_at
            .push(own(e.created_at, e.clock_default.created_at));
        Ok(())
    }

    /// Binds the common columns ($1..$16); the caller binds the route's,
    /// then the returned `payload_bytes` last.
    fn bind<'q>(self, q: PgQuery<'q>) -> (PgQuery<'q>, Vec<i32>) {
        let q = q
            .bind(self.id)
            .bind(self.event_type)
            .bind(self.payload)
            .bind(self.headers)
            .bind(self.trace_id)
            .bind(self.idempotency_key)
            .bind(self.correlation_id)
            .bind(self.causation_id)
            .bind(self.schema_version)
            .bind(self.status)
            .bind(self.attempts_made)
            .bind(self.max_attempts)
            .bind(self.last_error)
            .bind(self.scheduled_at)
            .bind(self.completed_at)
            .bind(self.created_at);
        (q, self.payload_bytes)
    }
}

/// Inserts outbox events on `conn` (a connection or an open transaction) in
/// order. An event whose idempotency key already exists is not inserted; its
/// outcome names the existing row. Nothing is committed here.
pub async fn insert_outbox(
    conn: &mut PgConnection,
    events: &[OutboxEvent],
) -> Result<Vec<BulkOutcome>> {
    let mut inserted = HashSet::with_capacity(events.len());
    for chunk in chunks(events) {
        if chunk.iter().all(|e| e.idempotency_key.is_none()) {
            let now = db_now_for(conn, chunk).await?;
            copy_outbox(conn, chunk, now).await?;
            inserted.extend(chunk.iter().map(|e| e.id));
            continue;
        }
        let ids = insert_chunk(conn, sql::INSERT_OUTBOX, chunk, |q| {
            q.bind(column(chunk, |r| r.aggregate_type.as_str()))
                .bind(column(chunk, |r| r.aggregate_id))
                .bind(column(chunk, |r| r.topic.as_str()))
                .bind(column(chunk, |r| r.partition_key.as_str()))
        })
        .await?;
        inserted.extend(ids);
    }
    let skipped_keys: Vec<&str> = events
        .iter()
        .filter(|e| !inserted.contains(&e.id))
        .filter_map(|e| e.idempotency_key.as_deref())
        .collect();
    let existing: HashMap<String, Uuid> = if skipped_keys.is_empty() {
        HashMap::new()
    } else {
        sqlx::query(sql::EXISTING_BY_IDEMPOTENCY_KEY)
            .bind(&skipped_keys)
            .fetch_all(&mut *conn)
            .await
            .map_err(storage)?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(storage)?
    };
    events
        .iter()
        .map(|e| {
            if inserted.contains(&e.id) {
                return Ok(BulkOutcome {
                    id: e.id,
                    existing: false,
                });
            }
            e.idempotency_key
                .as_ref()
                .and_then(|k| existing.get(k))
                .map(|&id| BulkOutcome { id, existing: true })
                .ok_or_else(|| {
                    Error::validation(
                        "id",
                        format!("event {} was not inserted: another event has this id", e.id),
                    )
                })
        })
        .collect()
}

/// Inserts inbox events on `conn` in order. An event whose
/// `(message_id, consumer_group)` exists is not inserted; its outcome names
/// the existing row. Nothing is committed here.
pub async fn insert_inbox(
    conn: &mut PgConnection,
    events: &[InboxEvent],
) -> Result<Vec<BulkOutcome>> {
    let mut inserted = HashSet::with_capacity(events.len());
    for chunk in chunks(events) {
        let ids = insert_chunk(conn, sql::INSERT_INBOX, chunk, |q| {
            q.bind(column(chunk, |r| r.message_id.as_str()))
                .bind(column(chunk, |r| r.consumer_group.as_str()))
                .bind(column(chunk, |r| r.source.as_str()))
        })
        .await?;
        inserted.extend(ids);
    }
    // One message twice in a batch has one id (it is derived from the
    // message id and group): only its first occurrence was inserted; the
    // later ones are duplicates of it.
    let mut taken = HashSet::with_capacity(inserted.len());
    let first: Vec<bool> = events
        .iter()
        .map(|e| inserted.contains(&e.id) && taken.insert(e.id))
        .collect();
    let skipped: Vec<&InboxEvent> = events
        .iter()
        .zip(&first)
        .filter(|(_, first)| !**first)
        .map(|(e, _)| e)
        .collect();
    let existing: HashMap<(String, String), Uuid> = if skipped.is_empty() {
        HashMap::new()
    } else {
        let messages: Vec<&str> = skipped
            .iter()
            .map(|e| e.route.message_id.as_str())
            .collect();
        let groups: Vec<&str> = skipped
            .iter()
            .map(|e| e.route.consumer_group.as_str())
            .collect();
        sqlx::query(sql::EXISTING_BY_MESSAGE)
            .bind(messages)
            .bind(groups)
            .fetch_all(&mut *conn)
            .await
            .map_err(storage)?
            .iter()
            .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(storage)?
    };
    events
        .iter()
        .zip(first)
        .map(|(e, first)| {
            if first {
                return Ok(BulkOutcome {
                    id: e.id,
                    existing: false,
                });
            }
            existing
                .get(&(e.route.message_id.clone(), e.route.consumer_group.clone()))
                .map(|&id| BulkOutcome { id, existing: true })
                .ok_or_else(|| {
                    Error::validation(
                        "id",
                        format!(
                            "event {} was not inserted: another event has this id or idempotency key",
                            e.id
                        ),
                    )
                })
        })
        .collect()
}

impl OutboxStore for PgTable<OutboxRoute> {
    async fn blocked_keys(&self, limit: u32) -> Result<Vec<BlockedKey>> {
        let q = sqlx::query(sql::BLOCKED_KEYS).bind(i64::from(limit));
        crate::store::shared::fetch_decoded(&self.pool, q, blocked_key).await
    }

    async fn create_many(&self, events: &[OutboxEvent]) -> Result<Vec<BulkOutcome>> {
        let mut tx = self.pool.begin().await.map_err(storage)?;
        let outcomes = insert_outbox(&mut tx, events).await?;
        tx.commit().await.map_err(storage)?;
        Ok(outcomes)
    }
}

impl InboxBackend for PgTable<InboxRoute> {
    async fn insert_rows(&self, events: &[InboxEvent]) -> Result<Vec<BulkOutcome>> {
        if events.len() <= CHUNK {
            // One INSERT statement is atomic on its own: no BEGIN and
            // COMMIT (two round trips) around it. (The look-up of rows that
            // existed already only reads.)
            let mut conn = self.pool.acquire().await.map_err(storage)?;
            return insert_inbox(&mut conn, events).await;
        }
        let mut tx = self.pool.begin().await.map_err(storage)?;
        let outcomes = insert_inbox(&mut tx, events).await?;
        tx.commit().await.map_err(storage)?;
        Ok(outcomes)
    }
}

/// A row of [`sql::BLOCKED_KEYS`].
fn blocked_key(r: &PgRow) -> Result<BlockedKey> {
    let key = || -> std::result::Result<BlockedKey, sqlx::Error> {
        Ok(BlockedKey {
            topic: r.try_get(0)?,
            partition_key: r.try_get(1)?,
            head_id: r.try_get(2)?,
            head_attempts: r.try_get(3)?,
            head_error: r.try_get(4)?,
            head_retry_at: r.try_get(5)?,
            waiting: r.try_get::<i64, _>(6)? as u64,
        })
    };
    key().map_err(storage)
}
