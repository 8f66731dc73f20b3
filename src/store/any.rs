//! A store chosen by URL at run time: what the CLI uses.

use crate::store::FetchFilters;
use std::time::Duration;

use uuid::Uuid;

use super::migrate::{MigrationReport, MigrationScript};
use super::postgres::{PgOptions, PgRoute, PgTable};
use super::sqlite::{SqliteRoute, SqliteTable};
use super::{
    BulkOutcome, Capabilities, Claim, ClaimOptions, ClaimToken, EventStore, FailReport, Failure,
    InboxStore, ListFilter, OutboxStore, PgStore, RequeueFilter, SqliteStore, TableCounts,
    redact_url,
};
use crate::error::{Error, Result};
use crate::model::{Event, InboxEvent, InboxRoute, OutboxEvent, OutboxRoute, UnlockReason};

/// Runs `$body` with `$d` bound to the backend of an [`AnyStore`] (a
/// `&PgStore` or a `&SqliteStore`): the one place the features written
/// once against [`Driver`](super::driver::Driver) switch on the backend.
macro_rules! with_driver {
    ($store:expr, $d:ident => $body:expr) => {
        match $store {
            $crate::store::AnyStore::Postgres($d) => $body,
            $crate::store::AnyStore::Sqlite($d) => $body,
        }
    };
}
pub(crate) use with_driver;

/// The backends a URL can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `sqlite://PATH` or `sqlite:PATH`.
    Sqlite,
}

impl Backend {
    /// The backend a database URL names.
    pub fn from_url(url: &str) -> Result<Self> {
        let scheme = url
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql"
                if !url
                    .get(scheme.len() + 1..)
                    .is_some_and(|rest| rest.starts_with("//")) =>
            {
                // `postgres:/u:pw@h/db` would be read as a Unix socket path
                // and a user named "anonymous".
                Err(Error::Config(format!(
                    "invalid database URL {}: a PostgreSQL URL starts with {scheme}:// (two slashes), as in postgres://USER:PASSWORD@HOST:5432/DB",
                    redact_url(url)
                )))
            }
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            "sqlite" => Ok(Backend::Sqlite),
            _ => Err(Error::Config(format!(
                "unsupported database URL {}: use sqlite://PATH or postgres://USER:PASSWORD@HOST/DB",
                redact_url(url)
            ))),
        }
    }

    /// `postgres` or `sqlite`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }

    /// The DDL of the table that records migrations (`omnibox_migrations`).
    pub fn migrations_table_sql(self) -> String {
        super::migrate::migrations_table_sql(matches!(self, Backend::Postgres))
    }

    /// The embedded migrations of this backend.
    pub fn migrations(self) -> Vec<MigrationScript> {
        match self {
            Backend::Postgres => PgStore::migrations(),
            Backend::Sqlite => SqliteStore::migrations(),
        }
    }
}

/// Options of [`AnyStore::connect`].
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// PostgreSQL schema holding the tables.
    pub schema: Option<String>,
    /// Pool size (PostgreSQL).
    pub max_connections: Option<u32>,
    /// Longest a statement may run (PostgreSQL `statement_timeout`);
    /// `None` keeps the server's setting.
    pub statement_timeout: Option<Duration>,
    /// Longest a transaction may stay idle before the server ends it
    /// (PostgreSQL `idle_in_transaction_session_timeout`); `None` keeps
    /// the server's setting.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// Longest wait for a connection from the pool, a new one included
    /// (PostgreSQL); `None` keeps the pool's default (30 s). A database
    /// that is down fails a statement after this long.
    pub acquire_timeout: Option<Duration>,
}

/// Either backend.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyStore {
    /// PostgreSQL.
    Postgres(PgStore),
    /// SQLite.
    Sqlite(SqliteStore),
}

impl From<PgStore> for AnyStore {
    fn from(s: PgStore) -> Self {
        AnyStore::Postgres(s)
    }
}

impl From<SqliteStore> for AnyStore {
    fn from(s: SqliteStore) -> Self {
        AnyStore::Sqlite(s)
    }
}

impl AnyStore {
    /// Connects to the database named by `url`.
    pub async fn connect(url: &str, opts: &StoreOptions) -> Result<Self> {
        match Backend::from_url(url)? {
            Backend::Postgres => {
                let mut pg = PgOptions {
                    schema: opts.schema.clone(),
                    ..PgOptions::default()
                };
                if let Some(n) = opts.max_connections {
                    pg.max_connections = n;
                }
                pg.statement_timeout = opts.statement_timeout;
                pg.idle_in_transaction_timeout = opts.idle_in_transaction_timeout;
                if let Some(t) = opts.acquire_timeout {
                    pg.acquire_timeout = t;
                }
                Ok(AnyStore::Postgres(PgStore::connect(url, &pg).await?))
            }
            Backend::Sqlite => {
                if opts.schema.is_some() {
                    return Err(Error::Config(
                        "a schema applies to PostgreSQL only; remove it or use a postgres:// URL"
                            .into(),
                    ));
                }
                Ok(AnyStore::Sqlite(SqliteStore::connect(url).await?))
            }
        }
    }

    /// Closes the store's connections cleanly (see [`PgStore::close`]).
    /// Every clone shares the pool, so this closes them all.
    pub async fn close(&self) {
        match self {
            AnyStore::Postgres(s) => s.close().await,
            AnyStore::Sqlite(s) => s.close().await,
        }
    }

    /// Which backend.
    pub fn backend(&self) -> Backend {
        match self {
            AnyStore::Postgres(_) => Backend::Postgres,
            AnyStore::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<MigrationReport> {
        match self {
            AnyStore::Postgres(s) => s.migrate().await,
            AnyStore::Sqlite(s) => s.migrate().await,
        }
    }

    /// The recorded migrations against the objects that exist.
    pub async fn schema_state(&self) -> Result<super::SchemaState> {
        match self {
            AnyStore::Postgres(s) => s.schema_state().await,
            AnyStore::Sqlite(s) => s.schema_state().await,
        }
    }

    /// Fails with a hint when the schema is missing or old.
    pub async fn ensure_migrated(&self) -> Result<()> {
        match self {
            AnyStore::Postgres(s) => s.ensure_migrated().await,
            AnyStore::Sqlite(s) => s.ensure_migrated().await,
        }
    }

    /// What the store supports.
    pub fn capabilities(&self) -> Capabilities {
        match self {
            AnyStore::Postgres(s) => s.capabilities(),
            AnyStore::Sqlite(s) => s.capabilities(),
        }
    }

    /// The outbox table.
    pub fn outbox(&self) -> AnyTable<OutboxRoute> {
        match self {
            AnyStore::Postgres(s) => AnyTable::Postgres(s.outbox()),
            AnyStore::Sqlite(s) => AnyTable::Sqlite(s.outbox()),
        }
    }

    /// The inbox table.
    pub fn inbox(&self) -> AnyTable<InboxRoute> {
        match self {
            AnyStore::Postgres(s) => AnyTable::Postgres(s.inbox()),
            AnyStore::Sqlite(s) => AnyTable::Sqlite(s.inbox()),
        }
    }
}

/// One table of either backend.
#[derive(Debug)]
pub enum AnyTable<R> {
    /// PostgreSQL.
    Postgres(PgTable<R>),
    /// SQLite.
    Sqlite(SqliteTable<R>),
}

impl<R> Clone for AnyTable<R> {
    fn clone(&self) -> Self {
        match self {
            AnyTable::Postgres(t) => AnyTable::Postgres(t.clone()),
            AnyTable::Sqlite(t) => AnyTable::Sqlite(t.clone()),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            AnyTable::Postgres($t) => $e.await,
            AnyTable::Sqlite($t) => $e.await,
        }
    };
}

impl<R: PgRoute + SqliteRoute> EventStore<R> for AnyTable<R> {
    fn capabilities(&self) -> Capabilities {
        match self {
            AnyTable::Postgres(t) => t.capabilities(),
            AnyTable::Sqlite(t) => t.capabilities(),
        }
    }
    async fn get(&self, id: Uuid) -> Result<Option<Event<R>>> {
        delegate!(self, t => t.get(id))
    }
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Event<R>>> {
        delegate!(self, t => t.list(filter))
    }
    async fn counts(&self) -> Result<TableCounts> {
        delegate!(self, t => t.counts())
    }
    async fn claim(&self, opts: &ClaimOptions) -> Result<Claim<R>> {
        delegate!(self, t => t.claim(opts))
    }
    async fn claimable_exists_for(&self, filters: &FetchFilters) -> Result<bool> {
        delegate!(self, t => t.claimable_exists_for(filters))
    }
    async fn extend_lease(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<usize> {
        delegate!(self, t => t.extend_lease(token, ids, lease))
    }
    async fn complete(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        delegate!(self, t => t.complete(token, ids))
    }
    async fn fail(&self, token: &ClaimToken, failures: &[Failure]) -> Result<FailReport> {
        delegate!(self, t => t.fail(token, failures))
    }
    async fn release(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        delegate!(self, t => t.release(token, ids))
    }
    async fn force_unlock(&self, id: Uuid, reason: &UnlockReason) -> Result<Event<R>> {
        delegate!(self, t => t.force_unlock(id, reason))
    }
    async fn release_stale_locks(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        delegate!(self, t => t.release_stale_locks(older_than, batch_size))
    }
    async fn delete_completed(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        delegate!(self, t => t.delete_completed(older_than, batch_size))
    }
    async fn requeue_failed(&self, filter: &RequeueFilter) -> Result<Vec<Uuid>> {
        delegate!(self, t => t.requeue_failed(filter))
    }
}

impl<R: PgRoute + SqliteRoute> super::MaintenanceStore<R> for AnyTable<R> {
    async fn list_failed(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        delegate!(self, t => t.list_failed(filter))
    }

    async fn list_waiting(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        delegate!(self, t => t.list_waiting(filter))
    }
    async fn force_unlock_worker(&self, worker: &str, reason: &UnlockReason) -> Result<Vec<Uuid>> {
        delegate!(self, t => t.force_unlock_worker(worker, reason))
    }
    async fn count_stale_locks(&self, older_than: Duration) -> Result<u64> {
        delegate!(self, t => t.count_stale_locks(older_than))
    }
    async fn count_older(
        &self,
        status: crate::model::EventStatus,
        older_than: Duration,
    ) -> Result<u64> {
        delegate!(self, t => t.count_older(status, older_than))
    }
    async fn delete_failed(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        delegate!(self, t => t.delete_failed(older_than, batch_size))
    }
    async fn failed_by_event_type(&self) -> Result<Vec<(String, u64)>> {
        delegate!(self, t => t.failed_by_event_type())
    }

    async fn failed_errors(
        &self,
        each: &mut (dyn FnMut(super::FailedErrors) + Send),
    ) -> Result<()> {
        delegate!(self, t => t.failed_errors(each))
    }
}

impl OutboxStore for AnyTable<OutboxRoute> {
    async fn blocked_keys(&self, limit: u32) -> Result<Vec<super::BlockedKey>> {
        delegate!(self, t => t.blocked_keys(limit))
    }

    async fn create_many(&self, events: &[OutboxEvent]) -> Result<Vec<BulkOutcome>> {
        delegate!(self, t => t.create_many(events))
    }
}

impl InboxStore for AnyTable<InboxRoute> {
    async fn insert_many(&self, events: &[InboxEvent]) -> Result<Vec<BulkOutcome>> {
        delegate!(self, t => t.insert_many(events))
    }

    async fn get_by_message_id(
        &self,
        message_id: &str,
        consumer_group: &str,
    ) -> Result<Option<InboxEvent>> {
        delegate!(self, t => t.get_by_message_id(message_id, consumer_group))
    }
}
