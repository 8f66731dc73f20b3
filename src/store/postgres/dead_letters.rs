//! The dead-letter table's statements on PostgreSQL.

use uuid::Uuid;

use crate::error::{Result, storage};
use crate::model::Table;

/// Marks the open letters of `events` (rows of `table` just requeued)
/// replayed, on the requeue's transaction (PostgreSQL). A letter locked by
/// a letter replay running now is skipped: that replay finds its event
/// back and closes it, and waiting for it here could deadlock (it holds
/// its letters and waits for these rows).
pub(crate) async fn mark_replayed(
    conn: &mut sqlx::PgConnection,
    table: Table,
    events: &[Uuid],
) -> Result<()> {
    sqlx::query(
        "UPDATE omnibox_dead_letters SET replayed_at = now() WHERE id IN (
             SELECT id FROM omnibox_dead_letters
             WHERE origin = $1 AND event_id = ANY($2) AND replayed_at IS NULL
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(table.to_string())
    .bind(events)
    .execute(conn)
    .await
    .map_err(storage)?;
    Ok(())
}
