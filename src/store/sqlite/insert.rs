//! Inserts, usable on the caller's own connection or transaction, and the
//! [`OutboxStore`] and [`InboxStore`] writes built on them.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::ts;
use super::{SqliteTable, decode, sql};
use crate::error::{Error, Result, storage};
use crate::model::{Event, InboxEvent, InboxRoute, OutboxEvent, OutboxRoute, Route, time};
use crate::store::shared::fetch_decoded;
use crate::store::table::InboxBackend;
use crate::store::{BlockedKey, BulkOutcome, OutboxStore};

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

type Query<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

/// What differs between the two tables' inserts: the statement, the
/// route's columns, and how the row that an insert met is found.
trait Insert: Route + Sized {
    /// `INSERT ... ON CONFLICT DO NOTHING RETURNING id`.
    const INSERT: &'static str;
    /// Binds the route's columns, after the common ones.
    fn bind_route<'q>(&self, q: Query<'q>) -> Query<'q>;
    /// The id of the row whose key (the idempotency key, or the message id
    /// in the consumer group) made `e`'s insert a no-op.
    fn existing(
        conn: &mut SqliteConnection,
        e: &Event<Self>,
    ) -> impl std::future::Future<Output = Result<Uuid>> + Send;
}

impl Insert for OutboxRoute {
    const INSERT: &'static str = sql::INSERT_OUTBOX;

    fn bind_route<'q>(&self, q: Query<'q>) -> Query<'q> {
        q.bind(self.aggregate_type.clone())
            .bind(self.aggregate_id.to_string())
            .bind(self.topic.clone())
            .bind(self.partition_key.clone())
    }

    async fn existing(conn: &mut SqliteConnection, e: &OutboxEvent) -> Result<Uuid> {
        let key = e.idempotency_key.clone().unwrap_or_default();
        let existing: String = sqlx::query_scalar(sql::OUTBOX_BY_IDEMPOTENCY_KEY)
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .map_err(storage)?;
        Uuid::parse_str(&existing).map_err(|err| Error::CorruptRow {
            id: existing.clone(),
            message: err.to_string(),
        })
    }
}

impl Insert for InboxRoute {
    const INSERT: &'static str = sql::INSERT_INBOX;

    async fn existing(conn: &mut SqliteConnection, e: &InboxEvent) -> Result<Uuid> {
        let row = sqlx::query(sql::INBOX_BY_MESSAGE)
            .bind(e.route.message_id.clone())
            .bind(e.route.consumer_group.clone())
            .fetch_one(&mut *conn)
            .await
            .map_err(storage)?;
        let existing: InboxEvent = decode(&row)?;
        Ok(existing.id)
    }

    fn bind_route<'q>(&self, q: Query<'q>) -> Query<'q> {
        q.bind(self.message_id.clone())
            .bind(self.consumer_group.clone())
            .bind(self.source.clone())
    }
}

/// Inserts `events` on `conn` in order, each unless its key exists (then
/// its outcome names the row that does). Nothing is committed here.
async fn insert_rows<R: Insert + Sync>(
    conn: &mut SqliteConnection,
    events: &[Event<R>],
) -> Result<Vec<BulkOutcome>> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let q = e.route.bind_route(bind_common(sqlx::query(R::INSERT), e)?);
        let inserted = q.fetch_optional(&mut *conn).await.map_err(storage)?;
        out.push(match inserted {
            Some(_) => BulkOutcome {
                id: e.id,
                existing: false,
            },
            None => BulkOutcome {
                id: R::existing(conn, e).await?,
                existing: true,
            },
        });
    }
    Ok(out)
}

/// Inserts outbox events on `conn` (a connection or an open transaction) in
/// order, respecting idempotency keys. Nothing is committed here.
pub async fn insert_outbox(
    conn: &mut SqliteConnection,
    events: &[OutboxEvent],
) -> Result<Vec<BulkOutcome>> {
    insert_rows(conn, events).await
}

/// Inserts inbox events on `conn` in order; an existing
/// `(message_id, consumer_group)` is reported as existing. Nothing is committed here.
pub async fn insert_inbox(
    conn: &mut SqliteConnection,
    events: &[InboxEvent],
) -> Result<Vec<BulkOutcome>> {
    insert_rows(conn, events).await
}

impl OutboxStore for SqliteTable<OutboxRoute> {
    async fn blocked_keys(&self, limit: u32) -> Result<Vec<BlockedKey>> {
        let q = sqlx::query(sql::BLOCKED_KEYS).bind(i64::from(limit));
        fetch_decoded(&self.pool, q, blocked_key).await
    }

    async fn create_many(&self, events: &[OutboxEvent]) -> Result<Vec<BulkOutcome>> {
        let mut tx = super::write_tx(&self.pool).await?;
        let outcomes = insert_outbox(&mut tx, events).await?;
        tx.commit().await.map_err(storage)?;
        Ok(outcomes)
    }
}

impl InboxBackend for SqliteTable<InboxRoute> {
    async fn insert_rows(&self, events: &[InboxEvent]) -> Result<Vec<BulkOutcome>> {
        let mut tx = super::write_tx(&self.pool).await?;
        let outcomes = insert_inbox(&mut tx, events).await?;
        tx.commit().await.map_err(storage)?;
        Ok(outcomes)
    }
}

/// A row of [`sql::BLOCKED_KEYS`] (the head's id and time stored as text).
fn blocked_key(r: &SqliteRow) -> Result<BlockedKey> {
    let id: String = r.try_get(2).map_err(storage)?;
    let at: String = r.try_get(5).map_err(storage)?;
    let corrupt = |message| Error::CorruptRow {
        id: id.clone(),
        message,
    };
    Ok(BlockedKey {
        topic: r.try_get(0).map_err(storage)?,
        partition_key: r.try_get(1).map_err(storage)?,
        head_id: Uuid::parse_str(&id).map_err(|e| corrupt(e.to_string()))?,
        head_attempts: r.try_get(3).map_err(storage)?,
        head_error: r.try_get(4).map_err(storage)?,
        head_retry_at: time::parse_stored(&at).map_err(corrupt)?,
        waiting: r.try_get::<i64, _>(6).map_err(storage)? as u64,
    })
}
