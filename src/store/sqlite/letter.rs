//! Reading a dead letter's row (`omnibox_dead_letters`) on SQLite: ids and
//! times are stored as text.

use sqlx::Row;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::time;
use crate::store::dead_letters::{self, DeadLetterRecord};

/// A letter row (ids and times stored as text); a row that cannot be read
/// is a corrupt-row error naming it.
pub(crate) fn decode_letter(r: &sqlx::sqlite::SqliteRow) -> Result<DeadLetterRecord> {
    let inner = || -> std::result::Result<DeadLetterRecord, String> {
        let s = |e: sqlx::Error| e.to_string();
        let uuid = |col: &str| -> std::result::Result<Uuid, String> {
            let v: String = r.try_get(col).map_err(s)?;
            Uuid::parse_str(&v).map_err(|e| format!("column {col}: {e}"))
        };
        let ts = |v: String| time::parse_stored(&v).map_err(|e| e.to_string());
        let event: String = r.try_get("event").map_err(s)?;
        let replayed_at: Option<String> = r.try_get("replayed_at").map_err(s)?;
        Ok(DeadLetterRecord {
            id: uuid("id")?,
            seq: r.try_get("seq").map_err(s)?,
            origin: dead_letters::parse_origin(&r.try_get::<String, _>("origin").map_err(s)?)?,
            event_id: uuid("event_id")?,
            event_type: r.try_get("event_type").map_err(s)?,
            topic: r.try_get("topic").map_err(s)?,
            attempts_made: r.try_get("attempts_made").map_err(s)?,
            error: r.try_get("error").map_err(s)?,
            event: serde_json::from_str(&event).map_err(|e| e.to_string())?,
            dead_at: ts(r.try_get("dead_at").map_err(s)?)?,
            replayed_at: replayed_at.map(ts).transpose()?,
        })
    };
    inner().map_err(|message| Error::CorruptRow {
        id: r.try_get::<String, _>("id").unwrap_or_else(|_| "?".into()),
        message,
    })
}
