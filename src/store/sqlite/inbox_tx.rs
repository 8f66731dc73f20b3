//! The inbox consumer's transaction statements: lock, take, unlock, complete
//! and delete inbox rows on the caller's connection.

use sqlx::SqliteConnection;
use uuid::Uuid;

use super::ts;
use super::{decode, id_array};
use crate::domain::chrono_dur;
use crate::error::{Result, storage};
use crate::model::{InboxEvent, time};
use crate::store::ClaimToken;
use crate::store::dialect::{self, Dialect, Lite};
use crate::store::shared::run;

/// Locks inbox rows for `token` (inside the consumer's transaction).
pub async fn lock_inbox(
    conn: &mut SqliteConnection,
    ids: &[Uuid],
    token: &ClaimToken,
) -> Result<()> {
    let q = sqlx::query(
        "UPDATE inbox_events SET locked_at = ?2, locked_by = ?3, locked_until = ?4, updated_at = ?2 \
         WHERE id IN (SELECT value FROM json_each(?1))",
    )
    .bind(id_array(ids))
    .bind(ts(&token.locked_at))
    .bind(token.worker.as_str().to_string())
    .bind(ts(&(token.locked_at + chrono_dur(token.lease))));
    run(conn, q).await.map(drop)
}

/// Pending inbox rows met again by the consumer (inside its
/// transaction, which holds SQLite's write lock): each is locked for `token`
/// when it is due and not held by a live lease; see [`crate::store::Redelivered`].
pub async fn take_inbox(
    conn: &mut SqliteConnection,
    ids: &[Uuid],
    token: &ClaimToken,
) -> Result<std::collections::HashMap<Uuid, crate::store::Redelivered>> {
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
    dialect::execute(conn, dialect::unlock_inbox::<Lite>(ids, &Lite::now())).await
}

/// Marks inbox rows completed (inside the consumer's transaction).
pub async fn complete_inbox(conn: &mut SqliteConnection, ids: &[Uuid]) -> Result<()> {
    dialect::execute(conn, dialect::complete_inbox::<Lite>(ids, &Lite::now())).await
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
    let q = sqlx::query(
        "UPDATE inbox_events SET status = 'completed', completed_at = ?2, locked_at = NULL, locked_by = NULL, \
         locked_until = NULL, updated_at = ?2 WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'pending' \
         AND locked_by = ?3 AND locked_at = ?4",
    )
    .bind(id_array(&[id]))
    .bind(ts(&time::now()))
    .bind(worker)
    .bind(ts(locked_at));
    Ok(run(conn, q).await?.rows_affected() == 1)
}

/// Deletes inbox rows (inside the consumer's transaction).
pub async fn delete_inbox(conn: &mut SqliteConnection, ids: &[Uuid]) -> Result<()> {
    dialect::execute(conn, dialect::delete_inbox::<Lite>(ids)).await
}
