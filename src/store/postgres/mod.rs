//! PostgreSQL store: pooled, `FOR UPDATE SKIP LOCKED` claims, server-side
//! time for leases and completion, versioned migrations in
//! `migrations/postgres`.
//!
//! Events can be inserted inside the caller's own transaction with
//! [`insert_outbox`] and [`insert_inbox`], so that business rows and outbox
//! rows commit together:
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool, event: omnibox::OutboxEvent) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = pool.begin().await?;
//! // ... the service's own writes on `tx` ...
//! omnibox::store::postgres::insert_outbox(&mut tx, std::slice::from_ref(&event)).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Connection, Row};

use super::dialect::Pg;
use super::migrate::{self, MigrationReport, MigrationScript};
use super::redact_url;
use super::shared;
use crate::error::{Error, Result, storage};
use crate::model::{Event, EventStatus, InboxRoute, OutboxRoute, Payload};

mod copy;
pub(crate) mod driver;
mod held;
mod inbox_tx;
mod insert;
pub(crate) mod letter;
pub(crate) mod maintenance;
pub mod partition;
mod sql;
mod table;

pub use inbox_tx::{
    complete_claimed_inbox, complete_inbox, delete_inbox, lock_inbox, take_inbox, unlock_inbox,
};
pub use insert::{insert_inbox, insert_outbox, insert_outbox_stream};
#[doc(hidden)]
pub use sql::{
    CLAIM_BEGIN, CLAIM_GENERIC_BEGIN, INBOX_CLAIM, OUTBOX_COMPLETE_HELD, OUTBOX_IS_PARTITIONED,
    OUTBOX_LOCK, OUTBOX_LOCK_READ, OUTBOX_MARK, OUTBOX_PENDING_RANGE, OUTBOX_SCAN,
    OUTBOX_SCAN_PARTITIONED, OUTBOX_WALK, OUTBOX_WALK_PARTITIONED,
};

/// Connection settings beyond the URL.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Schema holding the tables (`search_path`); `None` keeps the server's default.
    pub schema: Option<String>,
    /// Pool size.
    pub max_connections: u32,
    /// How long to wait for a pooled connection.
    pub acquire_timeout: Duration,
    /// `application_name` of the connections (default `omnibox`).
    pub application_name: Option<String>,
    /// `statement_timeout` of the connections; `None` keeps the server's.
    pub statement_timeout: Option<Duration>,
    /// `idle_in_transaction_session_timeout` of the connections: the
    /// server ends a transaction left idle this long (its client lost
    /// without a reset, say), releasing its locks; a held claim sets its
    /// own (its lease). `None` keeps the server's.
    pub idle_in_transaction_timeout: Option<Duration>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            schema: None,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(30),
            application_name: None,
            statement_timeout: None,
            idle_in_transaction_timeout: None,
        }
    }
}

/// A pooled connection idle for longer than this is pinged before use.
const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

/// A PostgreSQL database holding the omnibox tables.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    schema: Option<String>,
    held: std::sync::Arc<crate::store::held::HeldClaims<sqlx::Postgres>>,
    layout: std::sync::Arc<crate::store::table::Layout>,
}

/// The features' statements (`driver.rs`) run on the store's pool.
impl crate::store::table::Pooled for PgStore {
    type Db = sqlx::Postgres;

    fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }
}

/// The advisory lock `migrate` holds for its whole run ("omnibox" in
/// ASCII; sqlx's migrator takes a lock of its own inside it).
const MIGRATE_LOCK: i64 = 0x006f_6d6e_6962_6f78;

/// Versions applied so far on this connection's schema (empty on a fresh
/// database).
async fn applied_versions(conn: &mut sqlx::PgConnection) -> Result<Vec<i64>> {
    let exists: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('omnibox_migrations')::text")
            .fetch_one(&mut *conn)
            .await
            .map_err(storage)?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(migrate::APPLIED_VERSIONS)
        .fetch_all(&mut *conn)
        .await
        .map_err(storage)
}

/// What each migration creates (see `migrate::Object`); a test checks it
/// against a migrated database.
const CREATES: &[migrate::Creates] = {
    use migrate::{Creates, FAILED_SEQ_INDEXES as FAILED_SEQ, LEASE_COLUMNS as LEASE, Object::*};
    &[
        Creates::once(1, migrate::INITIAL_OBJECTS),
        Creates::once(
            2,
            &[
                Function("omnibox_notify"),
                Trigger("outbox_events", "outbox_events_notify"),
                Trigger("inbox_events", "inbox_events_notify"),
            ],
        ),
        Creates::once(3, migrate::AUDIT_OBJECTS),
        Creates::once(
            4,
            &[
                LEASE[0],
                LEASE[1],
                Constraint("outbox_events_lease_consistency"),
                Constraint("inbox_events_lease_consistency"),
            ],
        ),
        Creates::rerunnable(
            5,
            &[
                Index("outbox_events_seq"),
                Index("inbox_events_seq"),
                FAILED_SEQ[0],
                FAILED_SEQ[1],
            ],
        ),
        Creates::rerunnable(6, migrate::FILTER_INDEXES),
        Creates::once(
            7,
            &[
                migrate::DEAD_LETTER_OBJECTS[0],
                migrate::DEAD_LETTER_OBJECTS[1],
                Index("omnibox_dead_letters_seq"),
            ],
        ),
        Creates::once(
            8,
            &[
                Column("outbox_events", "payload_bytes"),
                Column("inbox_events", "payload_bytes"),
            ],
        ),
    ]
};

/// The keys (`migrate::Object::key`) of the objects in the connection's
/// current schema.
async fn existing_objects(
    conn: &mut sqlx::PgConnection,
) -> Result<std::collections::HashSet<String>> {
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT CASE WHEN c.relkind IN ('i', 'I') THEN 'index:' ELSE 'table:' END || c.relname
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'i', 'I')
         UNION ALL
         SELECT 'column:' || c.relname || '.' || a.attname
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = current_schema() AND c.relname IN ('outbox_events', 'inbox_events')
            AND a.attnum > 0 AND NOT a.attisdropped
         UNION ALL
         SELECT 'trigger:' || c.relname || '.' || t.tgname
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = current_schema() AND NOT t.tgisinternal
         UNION ALL
         SELECT 'function:' || p.proname
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = current_schema()
         UNION ALL
         SELECT 'constraint:' || co.conname
           FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
          WHERE n.nspname = current_schema()",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(storage)?;
    Ok(keys.into_iter().collect())
}

/// A URL whose user info holds `/`, `?` or `#` unencoded: an `@` comes
/// after the first of them, so the parser took the password for a host,
/// port or path (and said "invalid port number").
fn unencoded_userinfo(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    match rest.find(['/', '?', '#']) {
        Some(i) => rest[i..].contains('@'),
        None => false,
    }
}

impl PgStore {
    /// Connects (failing fast when the server cannot be reached) and opens a pool.
    pub async fn connect(url: &str, opts: &PgOptions) -> Result<Self> {
        let redacted = redact_url(url);
        let mut connect = PgConnectOptions::from_str(url)
            .map_err(|e| {
                if unencoded_userinfo(url) {
                    return Error::Config(format!(
                        "invalid PostgreSQL URL {redacted}: the user name or password holds a character that must be percent-encoded (/ is %2F, ? is %3F, # is %23, @ is %40, : in a user name is %3A)"
                    ));
                }
                Error::Config(format!(
                    "invalid PostgreSQL URL {redacted}: {}",
                    crate::redact::text(&e.to_string())
                ))
            })?
            .application_name(opts.application_name.as_deref().unwrap_or("omnibox"));
        if let Some(schema) = &opts.schema {
            check_schema_name(schema)?;
            connect = connect.options([("search_path", schema.as_str())]);
        }
        if let Some(t) = opts.statement_timeout {
            let ms = t.as_millis().clamp(1, i32::MAX as u128).to_string();
            connect = connect.options([("statement_timeout", ms.as_str())]);
        }
        if let Some(t) = opts.idle_in_transaction_timeout {
            let ms = t.as_millis().clamp(1, i32::MAX as u128).to_string();
            connect = connect.options([("idle_in_transaction_session_timeout", ms.as_str())]);
        }
        connect = connect.log_statements(tracing::log::LevelFilter::Trace);
        // One direct connection first: the pool would retry a refused
        // connection until its acquire timeout instead of reporting it.
        let probe = connect
            .connect()
            .await
            .map_err(|source| Error::StorageConnection {
                url: redacted.clone(),
                source,
            })?;
        probe.close().await.ok();
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            // sqlx pings every connection it hands out: one more round trip
            // per statement, which across a network costs more than the
            // relay's work. A connection used in the last second is handed
            // out as it is (if the server went away meanwhile, the statement
            // fails like any statement in an outage, and is retried);
            // one idle for longer is pinged first.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > IDLE_PING_AFTER {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(connect);
        Ok(PgStore {
            pool,
            schema: opts.schema.clone(),
            held: Default::default(),
            layout: Default::default(),
        })
    }

    /// Wraps a pool the application already has.
    pub fn from_pool(pool: PgPool) -> Self {
        PgStore {
            pool,
            schema: None,
            held: Default::default(),
            layout: Default::default(),
        }
    }

    crate::store::table::store_handles!(PgPool, PgTable, "./migrations/postgres", true);

    /// Creates the schema (if one was configured) and applies pending
    /// migrations, under PostgreSQL's advisory lock, so concurrent callers are safe.
    pub async fn migrate(&self) -> Result<MigrationReport> {
        if let Some(schema) = &self.schema {
            check_schema_name(schema)?;
        }
        // One connection, under a lock of its own, from the schema's
        // creation and the versions read before to those read after:
        // concurrent `migrate` runs each report what they applied, not what
        // the first one did, and do not race to create the schema (`CREATE
        // SCHEMA IF NOT EXISTS` run by two sessions at once fails in one of
        // them on pg_namespace's unique index).
        let mut conn = lock_migrations(&self.pool).await?;
        let result = async {
            if let Some(schema) = &self.schema {
                // An identifier cannot be a bind parameter; the name was
                // checked against ^[a-z_][a-z0-9_]*$ above, so it needs no
                // quoting.
                let ddl = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
                sqlx::query(sqlx::AssertSqlSafe(ddl))
                    .execute(&mut *conn)
                    .await
                    .map_err(storage)?;
            }
            let before = applied_versions(&mut conn).await?;
            let m = Self::migrator();
            let existing = existing_objects(&mut conn).await?;
            let state = migrate::state(&m, CREATES, &before, &existing);
            let mut recorded = Vec::new();
            for mig in migrate::plan(&m, &state)? {
                migrate::record_applied::<Pg>(&mut conn, mig).await?;
                recorded.push(mig.version);
            }
            m.run_direct(None, &mut *conn, false)
                .await
                .map_err(Error::Migration)?;
            let after = applied_versions(&mut conn).await?;
            Ok(migrate::report(&m, &before, &recorded, &after))
        }
        .await;
        unlock_migrations(&mut conn).await;
        result
    }

    /// The recorded migrations against the objects that exist (`doctor`).
    pub async fn schema_state(&self) -> Result<migrate::SchemaState> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        let recorded = applied_versions(&mut conn).await?;
        let existing = existing_objects(&mut conn).await?;
        let m = Self::migrator();
        Ok(migrate::state(&m, CREATES, &recorded, &existing))
    }

    /// Versions applied so far (empty on a fresh database).
    pub async fn applied_versions(&self) -> Result<Vec<i64>> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        let versions = applied_versions(&mut conn).await;
        // Back in the pool before the caller's next statement asks for one:
        // a dropped connection is returned by a task of its own (after a
        // ping), and an acquire that comes first opens a second connection
        // (every CLI command checks the schema, then runs its statements).
        // `return_to_pool` is that task's work, run here (public in sqlx
        // 0.9, though left out of its documentation); bounded, as the
        // ping waits on the server.
        let _ = tokio::time::timeout(RETURN_WAIT, conn.return_to_pool()).await;
        versions
    }
}

/// How long the schema check waits for its connection to be back in the
/// pool (a ping) before it goes on without.
const RETURN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A connection holding the migration lock (an advisory lock), for
/// `migrate` and `migrate --partitioned`: concurrent runs wait for each
/// other.
pub(super) async fn lock_migrations(
    pool: &PgPool,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    let mut conn = pool.acquire().await.map_err(storage)?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(storage)?;
    Ok(conn)
}

/// Releases the migration lock (it ends with the session anyway, if this
/// fails).
pub(super) async fn unlock_migrations(conn: &mut sqlx::PgConnection) {
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut *conn)
        .await;
}

/// Migration 1 as released, before its first line was edited (SHA-384).
const MIGRATION_1_RELEASED: &str = "431a0723b9d556721d08330f4f0332d9e032c22bd078c86c1edbb71b8e2cc138a7f5f91f6516d58792d2da8050c947a2";

/// Migrations whose comments were edited after their release (see
/// `migrate::pin_comment_edits`).
pub(crate) const COMMENT_EDITS: &[migrate::CommentEdit] =
    &[migrate::CommentEdit::released(1, MIGRATION_1_RELEASED)];

const CAPABILITIES: super::Capabilities =
    <super::dialect::Pg as super::dialect::Dialect>::CAPABILITIES;

/// A plain PostgreSQL identifier: lowercase letters, digits and `_`, at
/// most 63, not starting with a digit (safe to interpolate into DDL, and
/// PostgreSQL's own rule for replication slot names).
pub(crate) fn is_plain_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Schema names are interpolated into DDL, so only plain identifiers pass.
fn check_schema_name(schema: &str) -> Result<()> {
    if !is_plain_identifier(schema) {
        return Err(Error::Config(format!(
            "invalid schema name {schema:?}: use lowercase letters, digits and _ (at most 63, not starting with a digit)"
        )));
    }
    // PostgreSQL's own: pg_* are reserved for system schemas.
    if schema.starts_with("pg_") || schema == "information_schema" {
        return Err(Error::Config(format!(
            "schema name {schema:?} is reserved by PostgreSQL (pg_* and information_schema); choose another, e.g. omnibox"
        )));
    }
    Ok(())
}

/// One table of a [`PgStore`]; implements the store traits.
pub type PgTable<R> = crate::store::table::StoreTable<sqlx::Postgres, R>;

mod sealed {
    use sqlx::postgres::PgRow;

    /// Per-table decoding; implemented for the two routes only.
    pub trait PgRoute: crate::model::Route + Sized {
        /// Reads the routing columns.
        fn decode_route(row: &PgRow) -> Result<Self, sqlx::Error>;
    }
}

pub use sealed::PgRoute;

shared::route_columns!(PgRoute(PgRow, sqlx::Error), PgRow::try_get:
    OutboxRoute { aggregate_type, aggregate_id, topic, partition_key }
    InboxRoute { message_id, consumer_group, source }
);

impl<R: PgRoute> crate::store::table::TableOf<Pg> for R {
    fn sql() -> &'static sql::TableSql {
        shared::of_table(R::TABLE, &sql::OUTBOX, &sql::INBOX)
    }
    fn decode(row: &PgRow) -> Result<Event<R>> {
        decode(row)
    }
}

/// The `created_at` bounds of a write by id (see `sql::OUTBOX_MARK`): the
/// rows' own, a second wider each way; without them, every time.
pub(crate) fn created_bounds(
    between: Option<(crate::model::Timestamp, crate::model::Timestamp)>,
) -> (crate::model::Timestamp, crate::model::Timestamp) {
    let second = chrono::Duration::seconds(1);
    match between {
        Some((first, last)) => (first - second, last + second),
        None => (
            chrono::DateTime::from_timestamp(-62_135_596_800, 0).unwrap_or_default(), // 0001-01-01
            chrono::DateTime::from_timestamp(253_402_300_799, 0).unwrap_or_default(), // 9999-12-31
        ),
    }
}

/// An event row of `R`'s table; a row that cannot be read is a corrupt-row
/// error naming its id.
pub(crate) fn decode<R: PgRoute>(row: &PgRow) -> Result<Event<R>> {
    decode_inner(row).map_err(|e| {
        let id = row
            .try_get::<uuid::Uuid, _>("id")
            .map(|id| id.to_string())
            .unwrap_or_else(|_| "?".into());
        Error::CorruptRow {
            id,
            message: e.to_string(),
        }
    })
}

/// [`decode`]'s columns, the first error as sqlx reports it.
fn decode_inner<R: PgRoute>(row: &PgRow) -> Result<Event<R>, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let status =
        EventStatus::from_str(&status).map_err(|e| sqlx::Error::Decode(e.to_string().into()))?;
    Ok(Event {
        id: row.try_get("id")?,
        seq: Some(row.try_get("seq")?),
        event_type: row.try_get("event_type")?,
        payload: row.try_get::<Json<Payload>, _>("payload")?.0,
        headers: match row.try_get::<Option<Json<serde_json::Value>>, _>("headers")? {
            None => None,
            Some(j) => {
                crate::model::headers_from_json(j.0).map_err(|e| sqlx::Error::Decode(e.into()))?
            }
        },
        trace_id: row.try_get("trace_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        correlation_id: row.try_get("correlation_id")?,
        causation_id: row.try_get("causation_id")?,
        schema_version: row.try_get("schema_version")?,
        status,
        attempts_made: row.try_get("attempts_made")?,
        max_attempts: row.try_get("max_attempts")?,
        last_error: row.try_get("last_error")?,
        scheduled_at: row.try_get("scheduled_at")?,
        completed_at: row.try_get("completed_at")?,
        locked_at: row.try_get("locked_at")?,
        locked_by: row.try_get("locked_by")?,
        locked_until: row.try_get("locked_until")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        route: R::decode_route(row)?,
        clock_default: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(check_schema_name("omnibox").is_ok());
        assert!(check_schema_name("t_0123abc").is_ok());
        assert!(check_schema_name("_x").is_ok());
        assert!(check_schema_name("pgx").is_ok());
        for bad in [
            "",
            "1abc",
            "Omnibox",
            "a-b",
            "a;drop table x",
            "a\"b",
            &"a".repeat(64),
            "pg_catalog",
            "pg_toast",
            "pg_mine",
            "information_schema",
        ] {
            assert!(check_schema_name(bad).is_err(), "{bad}");
        }
    }
}
