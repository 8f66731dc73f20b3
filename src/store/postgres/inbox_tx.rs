//! The inbox consumer's transaction statements: lock, take, unlock,
//! complete and delete inbox rows on the caller's connection.

use std::collections::HashMap;

use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::decode;
use crate::error::{Result, storage};
use crate::model::{InboxEvent, Timestamp};
use crate::store::dialect::{self, Pg};
use crate::store::shared::run;

/// Locks inbox rows for `token` (inside the consumer's transaction).
pub async fn lock_inbox(
    conn: &mut PgConnection,
    ids: &[Uuid],
    token: &crate::store::ClaimToken,
) -> Result<()> {
    let q = sqlx::query(
        "UPDATE inbox_events SET locked_at = $2, locked_by = $3, locked_until = $2 + make_interval(secs => $4), \
         updated_at = now() WHERE id = ANY($1)",
    )
    .bind(ids)
    .bind(token.locked_at)
    .bind(token.worker.as_str())
    .bind(crate::store::secs(token.lease));
    run(conn, q).await.map(drop)
}

/// Pending inbox rows met again by the consumer (inside its
/// transaction): each is locked for `token` when it is due and not held by a
/// live lease; see [`crate::store::Redelivered`].
pub async fn take_inbox(
    conn: &mut PgConnection,
    ids: &[Uuid],
    token: &crate::store::ClaimToken,
) -> Result<HashMap<Uuid, crate::store::Redelivered>> {
    let rows = sqlx::query(
        "SELECT *, now() AS db_now FROM inbox_events WHERE id = ANY($1) AND status = 'pending' FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(storage)?;
    let now: Timestamp = match rows.first() {
        Some(r) => r.try_get("db_now").map_err(storage)?,
        None => return Ok(HashMap::new()),
    };
    let events = rows
        .iter()
        .map(decode)
        .collect::<Result<Vec<InboxEvent>>>()?;
    let (takeable, out) = crate::store::sort_existing(events, token, now);
    if !takeable.is_empty() {
        lock_inbox(conn, &takeable, token).await?;
    }
    Ok(out)
}

/// Unlocks inbox rows (inside the consumer's transaction).
pub async fn unlock_inbox(conn: &mut PgConnection, ids: &[Uuid]) -> Result<()> {
    dialect::execute(conn, dialect::unlock_inbox::<Pg>(ids, &())).await
}

/// Marks inbox rows completed (inside the consumer's transaction).
pub async fn complete_inbox(conn: &mut PgConnection, ids: &[Uuid]) -> Result<()> {
    dialect::execute(conn, dialect::complete_inbox::<Pg>(ids, &())).await
}

/// Marks one claimed inbox row completed inside `conn`'s transaction, if
/// `worker` still holds it under the claim that locked it at `locked_at`.
/// Returns whether it did.
pub async fn complete_claimed_inbox(
    conn: &mut PgConnection,
    id: Uuid,
    worker: &str,
    locked_at: &crate::model::Timestamp,
) -> Result<bool> {
    let q = sqlx::query(
        "UPDATE inbox_events SET status = 'completed', completed_at = now(), locked_at = NULL, locked_by = NULL, \
         locked_until = NULL, updated_at = now() WHERE id = $1 AND status = 'pending' AND locked_by = $2 AND locked_at = $3",
    )
    .bind(id)
    .bind(worker)
    .bind(locked_at);
    Ok(run(conn, q).await?.rows_affected() == 1)
}

/// Deletes inbox rows (inside the consumer's transaction).
pub async fn delete_inbox(conn: &mut PgConnection, ids: &[Uuid]) -> Result<()> {
    dialect::execute(conn, dialect::delete_inbox::<Pg>(ids)).await
}
