//! The dead-letter table's statements on SQLite.

use uuid::Uuid;

use crate::error::{Result, storage};
use crate::model::Table;

/// Marks the open letters of `events` (rows of `table` just requeued)
/// replayed, on the requeue's transaction, at `now`.
pub(crate) async fn mark_replayed(
    conn: &mut sqlx::SqliteConnection,
    table: Table,
    events: &[Uuid],
    now: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE omnibox_dead_letters SET replayed_at = ?3
         WHERE origin = ?1 AND event_id IN (SELECT value FROM json_each(?2)) AND replayed_at IS NULL",
    )
    .bind(table.to_string())
    .bind(super::id_array(events))
    .bind(now)
    .execute(conn)
    .await
    .map_err(storage)?;
    Ok(())
}
