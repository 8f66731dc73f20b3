//! What SQLite's operators read beyond the table statements: failed rows
//! grouped by error.

use sqlx::Row;
use uuid::Uuid;

use super::{SqliteRoute, SqliteTable};
use crate::error::{Error, Result, storage};
use crate::model::time;
use crate::store::FailedErrors;

/// Failed rows grouped by event type and error, with a sample id, each
/// handed to `each` as it arrives (not collected).
pub(super) async fn failed_errors<R: SqliteRoute>(
    table: &SqliteTable<R>,
    each: &mut (dyn FnMut(FailedErrors) + Send),
) -> Result<()> {
    use futures_util::TryStreamExt;
    let t = R::TABLE.sql_name();
    let sql = format!(
        "SELECT event_type, last_error, count(*) AS n, min(updated_at) AS first_seen,
                max(updated_at) AS last_seen, min(id) AS sample_id
         FROM {t} WHERE status = 'failed' GROUP BY event_type, last_error"
    );
    let stamp = |r: &sqlx::sqlite::SqliteRow, name: &str| -> Result<time::Timestamp> {
        let text: String = r.try_get(name).map_err(storage)?;
        time::parse_stored(&text).map_err(|m| Error::CorruptRow {
            id: "failed_errors".into(),
            message: m,
        })
    };
    let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&table.pool);
    while let Some(r) = rows.try_next().await.map_err(storage)? {
        let id: String = r.try_get("sample_id").map_err(storage)?;
        each(FailedErrors {
            event_type: r.try_get("event_type").map_err(storage)?,
            error: r.try_get("last_error").map_err(storage)?,
            count: r.try_get::<i64, _>("n").map_err(storage)?.max(0) as u64,
            first_seen: stamp(&r, "first_seen")?,
            last_seen: stamp(&r, "last_seen")?,
            sample_id: Uuid::parse_str(&id).map_err(|e| Error::CorruptRow {
                id,
                message: e.to_string(),
            })?,
        });
    }
    Ok(())
}
