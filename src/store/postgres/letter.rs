//! Reading a dead letter's row (`omnibox_dead_letters`) on PostgreSQL.

use sqlx::Row;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::dead_letters::{self, DeadLetterRecord};

/// A letter row; a row that cannot be read is a corrupt-row error naming it.
pub(crate) fn decode_letter(r: &sqlx::postgres::PgRow) -> Result<DeadLetterRecord> {
    let inner = || -> std::result::Result<DeadLetterRecord, String> {
        let s = |e: sqlx::Error| e.to_string();
        let event: String = r.try_get("event").map_err(s)?;
        Ok(DeadLetterRecord {
            id: r.try_get("id").map_err(s)?,
            seq: r.try_get("seq").map_err(s)?,
            origin: dead_letters::parse_origin(&r.try_get::<String, _>("origin").map_err(s)?)?,
            event_id: r.try_get("event_id").map_err(s)?,
            event_type: r.try_get("event_type").map_err(s)?,
            topic: r.try_get("topic").map_err(s)?,
            attempts_made: r.try_get("attempts_made").map_err(s)?,
            error: r.try_get("error").map_err(s)?,
            event: serde_json::from_str(&event).map_err(|e| e.to_string())?,
            dead_at: r.try_get("dead_at").map_err(s)?,
            replayed_at: r.try_get("replayed_at").map_err(s)?,
        })
    };
    inner().map_err(|message| Error::CorruptRow {
        id: r
            .try_get::<Uuid, _>("id")
            .map_or_else(|_| "?".into(), |id| id.to_string()),
        message,
    })
}
