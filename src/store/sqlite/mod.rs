//! SQLite store: the embedded default. One file, WAL journal, a busy timeout
//! so concurrent writers wait instead of failing, write transactions taken
//! with `BEGIN IMMEDIATE`. Times are computed by this process (SQLite has no
//! server clock) and stored in the fixed text form of [`crate::model::time`].

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row};
use uuid::Uuid;

use super::dialect::Lite;
use super::migrate::{self, MigrationReport, MigrationScript};
use super::shared;
use crate::error::{Error, Result, storage};
use crate::model::{Event, EventStatus, InboxRoute, OutboxRoute, time};

pub(crate) mod driver;
mod inbox_tx;
mod insert;
pub(crate) mod letter;
mod maintenance;
mod sql;
mod table;

pub use inbox_tx::{
    complete_claimed_inbox, complete_inbox, delete_inbox, lock_inbox, take_inbox, unlock_inbox,
};
pub use insert::{insert_inbox, insert_outbox};
#[doc(hidden)]
pub use sql::{OUTBOX_SCAN, OUTBOX_WALK};

/// How long a writer waits for the database lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// An SQLite database file holding the omnibox tables.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    held: std::sync::Arc<crate::store::held::HeldClaims<sqlx::Sqlite>>,
    layout: std::sync::Arc<crate::store::table::Layout>,
}

/// The features' statements (`driver.rs`) run on the store's pool.
impl crate::store::table::Pooled for SqliteStore {
    type Db = sqlx::Sqlite;

    fn pool(&self) -> &sqlx::SqlitePool {
        &self.pool
    }
}

impl SqliteStore {
    /// Opens (creating it if missing) the database at `url`
    /// (`sqlite://PATH`, `sqlite:PATH`).
    pub async fn connect(url: &str) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| {
                Error::Config(format!(
                    "invalid SQLite URL {}: {}",
                    super::redact_url(url),
                    crate::redact::text(&e.to_string())
                ))
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .log_statements(tracing::log::LevelFilter::Trace);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|source| Error::StorageConnection {
                url: super::redact_url(url),
                source,
            })?;
        Ok(SqliteStore::from_pool(pool))
    }

    /// Wraps a pool the application already has.
    pub fn from_pool(pool: SqlitePool) -> Self {
        SqliteStore {
            pool,
            held: Default::default(),
            layout: Default::default(),
        }
    }

    crate::store::table::store_handles!(SqlitePool, SqliteTable, "./migrations/sqlite", false);

    /// Applies pending migrations. Two processes opening a fresh file at
    /// once may both try; the loser finds the schema in place and succeeds.
    pub async fn migrate(&self) -> Result<MigrationReport> {
        let before = self.applied_versions().await?;
        let m = Self::migrator();
        let existing = self.existing_objects().await?;
        let state = migrate::state(&m, CREATES, &before, &existing);
        let mut recorded = Vec::new();
        for mig in migrate::plan(&m, &state)? {
            let mut conn = self.pool.acquire().await.map_err(storage)?;
            migrate::record_applied::<Lite>(&mut conn, mig).await?;
            recorded.push(mig.version);
        }
        if let Err(e) = m.run(&self.pool).await {
            if self.ensure_migrated().await.is_err() {
                return Err(Error::Migration(e));
            }
            tracing::debug!(error = %e, "another process applied the migrations first");
        }
        let after = self.applied_versions().await?;
        Ok(migrate::report(&m, &before, &recorded, &after))
    }

    /// The keys (`migrate::Object::key`) of the objects in the database.
    async fn existing_objects(&self) -> Result<std::collections::HashSet<String>> {
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT CASE type WHEN 'trigger' THEN 'trigger:' || tbl_name || '.' || name
                              ELSE type || ':' || name END
               FROM sqlite_master WHERE type IN ('table', 'index', 'trigger')
             UNION ALL
             SELECT 'column:outbox_events.' || name FROM pragma_table_info('outbox_events')
             UNION ALL
             SELECT 'column:inbox_events.' || name FROM pragma_table_info('inbox_events')",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(storage)?;
        Ok(keys.into_iter().collect())
    }

    /// The recorded migrations against the objects that exist (`doctor`).
    pub async fn schema_state(&self) -> Result<migrate::SchemaState> {
        let recorded = self.applied_versions().await?;
        let existing = self.existing_objects().await?;
        let m = Self::migrator();
        Ok(migrate::state(&m, CREATES, &recorded, &existing))
    }

    /// Versions applied so far.
    pub async fn applied_versions(&self) -> Result<Vec<i64>> {
        let exists: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'omnibox_migrations'",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(storage)?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(migrate::APPLIED_VERSIONS)
            .fetch_all(&self.pool)
            .await
            .map_err(storage)
    }
}

/// What each migration creates (see `migrate::Object`); a test checks it
/// against a migrated database.
const CREATES: &[migrate::Creates] = {
    use migrate::{Creates, LEASE_COLUMNS as LEASE, Object::Trigger};
    &[
        Creates::once(1, migrate::INITIAL_OBJECTS),
        Creates::once(2, migrate::AUDIT_OBJECTS),
        Creates::once(
            3,
            &[
                LEASE[0],
                LEASE[1],
                Trigger("outbox_events", "outbox_events_lease_insert"),
                Trigger("outbox_events", "outbox_events_lease_update"),
                Trigger("inbox_events", "inbox_events_lease_insert"),
                Trigger("inbox_events", "inbox_events_lease_update"),
            ],
        ),
        Creates::rerunnable(4, &migrate::FAILED_SEQ_INDEXES),
        Creates::rerunnable(5, migrate::FILTER_INDEXES),
        Creates::once(6, &migrate::DEAD_LETTER_OBJECTS),
    ]
};

/// Migration 1 as released, before its first line was edited (SHA-384).
const MIGRATION_1_RELEASED: &str = "44f7c9fc639fb8d87547bca0d16898ade91b5725d8a7e5c7a55787e8b01df9ff9cae0ce224d949ed116b7649308484c9";

/// Migrations whose comments were edited after their release (see
/// `migrate::pin_comment_edits`).
pub(crate) const COMMENT_EDITS: &[migrate::CommentEdit] =
    &[migrate::CommentEdit::released(1, MIGRATION_1_RELEASED)];

const CAPABILITIES: super::Capabilities =
    <super::dialect::Lite as super::dialect::Dialect>::CAPABILITIES;

/// One table of an [`SqliteStore`]; implements the store traits.
pub type SqliteTable<R> = crate::store::table::StoreTable<sqlx::Sqlite, R>;

mod sealed {
    use sqlx::sqlite::SqliteRow;

    /// Per-table decoding; implemented for the two routes only.
    pub trait SqliteRoute: crate::model::Route + Sized {
        /// Reads the routing columns.
        fn decode_route(row: &SqliteRow) -> Result<Self, String>;
    }
}

pub use sealed::SqliteRoute;

shared::route_columns!(SqliteRoute(SqliteRow, String), get:
    OutboxRoute { aggregate_type, aggregate_id: uuid_col, topic, partition_key }
    InboxRoute { message_id, consumer_group, source }
);

/// A column's value, the error as text.
fn get<'r, T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
    row: &'r SqliteRow,
    col: &str,
) -> Result<T, String> {
    row.try_get(col).map_err(|e| format!("column {col}: {e}"))
}

/// A uuid column stored as text.
fn uuid_col(row: &SqliteRow, col: &str) -> Result<Uuid, String> {
    let s: String = get(row, col)?;
    Uuid::parse_str(&s).map_err(|e| format!("column {col}: bad UUID {s:?}: {e}"))
}

/// A time column in the stored text form.
fn ts_col(row: &SqliteRow, col: &str) -> Result<time::Timestamp, String> {
    let s: String = get(row, col)?;
    time::parse_stored(&s).map_err(|e| format!("column {col}: {e}"))
}

/// A nullable time column in the stored text form.
fn opt_ts_col(row: &SqliteRow, col: &str) -> Result<Option<time::Timestamp>, String> {
    let s: Option<String> = get(row, col)?;
    s.map(|s| time::parse_stored(&s).map_err(|e| format!("column {col}: {e}")))
        .transpose()
}

/// A JSON column stored as text, parsed into `T`.
fn json_col<T: serde::de::DeserializeOwned>(
    row: &SqliteRow,
    col: &str,
) -> Result<Option<T>, String> {
    let s: Option<String> = get(row, col)?;
    s.map(|s| serde_json::from_str(&s).map_err(|e| format!("column {col}: {e}")))
        .transpose()
}

impl<R: SqliteRoute> crate::store::table::TableOf<Lite> for R {
    fn sql() -> &'static sql::TableSql {
        shared::of_table(R::TABLE, &sql::OUTBOX, &sql::INBOX)
    }
    fn decode(row: &SqliteRow) -> Result<Event<R>> {
        decode(row)
    }
}

/// An event row of `R`'s table; a row that cannot be read is a corrupt-row
/// error naming its id.
pub(crate) fn decode<R: SqliteRoute>(row: &SqliteRow) -> Result<Event<R>> {
    decode_inner(row).map_err(|message| Error::CorruptRow {
        id: row
            .try_get::<String, _>("id")
            .unwrap_or_else(|_| "?".into()),
        message,
    })
}

/// [`decode`]'s columns, the first error as text.
fn decode_inner<R: SqliteRoute>(row: &SqliteRow) -> Result<Event<R>, String> {
    let status: String = get(row, "status")?;
    Ok(Event {
        id: uuid_col(row, "id")?,
        seq: Some(get(row, "seq")?),
        event_type: get(row, "event_type")?,
        payload: json_col(row, "payload")?.ok_or("column payload: null")?,
        headers: match json_col::<serde_json::Value>(row, "headers")? {
            None => None,
            Some(v) => crate::model::headers_from_json(v)?,
        },
        trace_id: get(row, "trace_id")?,
        idempotency_key: get(row, "idempotency_key")?,
        correlation_id: get(row, "correlation_id")?,
        causation_id: get(row, "causation_id")?,
        schema_version: get(row, "schema_version")?,
        status: EventStatus::from_str(&status).map_err(|e| e.to_string())?,
        attempts_made: get(row, "attempts_made")?,
        max_attempts: get(row, "max_attempts")?,
        last_error: get(row, "last_error")?,
        scheduled_at: ts_col(row, "scheduled_at")?,
        completed_at: opt_ts_col(row, "completed_at")?,
        locked_at: opt_ts_col(row, "locked_at")?,
        locked_by: get(row, "locked_by")?,
        locked_until: opt_ts_col(row, "locked_until")?,
        created_at: ts_col(row, "created_at")?,
        updated_at: ts_col(row, "updated_at")?,
        route: R::decode_route(row)?,
        clock_default: Default::default(),
    })
}

pub(crate) use crate::store::dialect::id_array;

/// Opens a write transaction that takes the write lock at once
/// (`BEGIN IMMEDIATE`): what it reads is then what it changes.
pub(crate) async fn write_tx(
    pool: &sqlx::SqlitePool,
) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
    pool.begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(crate::error::storage)
}

/// A time in the stored text form.
pub(crate) fn ts(t: &time::Timestamp) -> String {
    time::format(t)
}

/// The ids in the first column of `rows`.
pub(crate) fn changed_ids(rows: &[sqlx::sqlite::SqliteRow]) -> Result<Vec<Uuid>> {
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
