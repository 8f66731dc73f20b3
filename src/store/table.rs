//! [`EventStore`] and [`MaintenanceStore`] written once for both backends,
//! over [`TableBackend`]: a backend's table handle runs each statement of
//! its table, binding values in its own form (ids, times, leases), and the
//! logic around the statements (checks, guards, batches, reports, the
//! filters of `list` and `requeue`) lives here. The statements themselves
//! live in the backends (`postgres/sql.rs`, `sqlite/sql.rs`), one
//! [`TableSql`] per table.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use sqlx::QueryBuilder;
use uuid::Uuid;

use super::dialect::{self, Dialect, RowOf};
use super::{
    BulkOutcome, Capabilities, Claim, ClaimOptions, ClaimToken, EventStore, FailReport,
    FailedErrors, Failure, FetchFilters, InboxStore, ListFilter, MaintenanceStore, RequeueFilter,
    TableCounts, guard_result,
};
use crate::error::{Error, Result, storage};
use crate::model::{
    Event, EventStatus, InboxEvent, InboxRoute, Route, Table, Timestamp, UnlockReason,
};

/// One table's statements on one backend. Each is static text; values are
/// bind parameters, in the order the backend's [`TableBackend`] binds them.
/// A `*_head` is the start of a statement that [`push_list`] or
/// [`push_failed`](dialect::push_failed) completes.
///
/// [`push_list`]: dialect::push_list
pub struct TableSql {
    /// The claim of a table without per-key order (the inbox).
    pub claim: &'static str,
    /// Whether anything is claimable now.
    pub claimable_exists: &'static str,
    /// Marks claimed rows completed, guarded by the claim's token.
    pub complete: &'static str,
    /// Records failures of claimed rows, guarded by the claim's token.
    pub fail: &'static str,
    /// Unlocks claimed rows, guarded by the claim's token.
    pub release: &'static str,
    /// Pushes the lease of claimed rows forward.
    pub extend_lease: &'static str,
    /// Unlocks one row whoever holds it.
    pub force_unlock: &'static str,
    /// Unlocks a batch of rows whose lease ran out long enough ago.
    pub release_stale: &'static str,
    /// Deletes a batch of rows completed long enough ago.
    pub delete_completed: &'static str,
    /// Counts for `status`.
    pub counts: &'static str,
    /// `SELECT` of every row, before `list`'s filters.
    pub select_all: &'static str,
    /// `UPDATE` of failed rows back to pending, up to `scheduled_at = `
    /// (then the time, `, updated_at = `, the time, [`requeue_where`]).
    ///
    /// [`requeue_where`]: TableSql::requeue_where
    pub requeue_head: &'static str,
    /// The requeue's row selection, before its filters.
    pub requeue_where: &'static str,
    /// `SELECT` of the failed rows, before their filters.
    pub failed_head: &'static str,
    /// `SELECT` of the rows waiting for a retry, up to `scheduled_at > `
    /// (then the time and the filters).
    pub waiting_head: &'static str,
    /// Unlocks the rows of one worker.
    pub unlock_worker: &'static str,
    /// Counts rows whose lease ran out long enough ago.
    pub count_stale: &'static str,
    /// Counts rows completed long enough ago.
    pub count_completed_older: &'static str,
    /// Counts rows failed long enough ago.
    pub count_failed_older: &'static str,
    /// Deletes a batch of rows failed long enough ago.
    pub delete_failed: &'static str,
    /// Failed rows per event type, most first.
    pub failed_by_type: &'static str,
}

/// One table of a store on sqlx database `DB`, for route `R` (which
/// table): the handle the store traits are implemented on. Each backend
/// names it: [`PgTable`](super::postgres::PgTable),
/// [`SqliteTable`](super::sqlite::SqliteTable).
pub struct StoreTable<DB: sqlx::Database, R> {
    pub(super) pool: sqlx::Pool<DB>,
    pub(super) held: Arc<super::held::HeldClaims<DB>>,
    pub(super) layout: Arc<Layout>,
    route: PhantomData<fn() -> R>,
}

/// What a store's claims learned of its outbox's layout, shared by the
/// store's table handles: whether the table is partitioned (PostgreSQL),
/// asked again a minute later (`migrate --partitioned` may convert it
/// while relays run), and where its pending rows lie, a hint kept a second.
/// Neither can cost a row or an order when stale, only speed: see
/// `postgres/sql.rs`, `OUTBOX_WALK_PARTITIONED`.
#[derive(Debug, Default)]
pub(crate) struct Layout {
    /// Whether the outbox is partitioned.
    pub(super) partitioned: Kept<bool>,
    /// Where pending rows lie (a partitioned outbox): a hint the walk
    /// checks.
    pub(super) range: Kept<Bounds>,
}

impl Layout {
    /// How long whether the outbox is partitioned is kept.
    pub(super) const KEEP_PARTITIONED: Duration = Duration::from_secs(60);
    /// How long a range hint is kept.
    pub(super) const KEEP_RANGE: Duration = Duration::from_secs(1);
}

/// A `created_at` range (NULL: no bound).
pub(crate) type Bounds = (Option<Timestamp>, Option<Timestamp>);

/// A value read from the database, kept for a while.
#[derive(Debug)]
pub(crate) struct Kept<T>(std::sync::Mutex<Option<(std::time::Instant, T)>>);

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept(std::sync::Mutex::new(None))
    }
}

impl<T: Copy> Kept<T> {
    /// The value, when read less than `keep` ago.
    pub(super) fn get(&self, keep: Duration) -> Option<T> {
        let cell = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cell.filter(|(at, _)| at.elapsed() < keep).map(|(_, v)| v)
    }

    /// Records the value just read.
    pub(super) fn set(&self, value: T) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), value));
    }

    /// Drops the value (found stale).
    pub(super) fn forget(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl<DB: sqlx::Database, R> std::fmt::Debug for StoreTable<DB, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTable")
            .field("pool", &self.pool)
            .finish()
    }
}

impl<DB: sqlx::Database, R> Clone for StoreTable<DB, R> {
    fn clone(&self) -> Self {
        StoreTable::new(self.pool.clone(), self.held.clone(), self.layout.clone())
    }
}

impl<DB: sqlx::Database, R> StoreTable<DB, R> {
    /// The handle of `R`'s table on `pool`, with its store's held claims
    /// and what its claims learned of the layout.
    pub(super) fn new(
        pool: sqlx::Pool<DB>,
        held: Arc<super::held::HeldClaims<DB>>,
        layout: Arc<Layout>,
    ) -> Self {
        StoreTable {
            pool,
            held,
            layout,
            route: PhantomData,
        }
    }

    /// The pool.
    pub fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }
}

/// The accessors a backend's store shares with the other: its pool, closing
/// it, its two tables and its embedded migrations (`$dir`, the migrations
/// folder; `$postgres`, whether they run in one transaction each).
macro_rules! store_handles {
    ($pool:ty, $table:ident, $dir:literal, $postgres:expr) => {
        /// The pool, for the application's own queries.
        pub fn pool(&self) -> &$pool {
            &self.pool
        }

        /// Closes the pool: waits for checked-out connections to come back
        /// and says goodbye to the database on each connection (PostgreSQL
        /// logs no `Connection reset by peer`; SQLite's last connection
        /// checkpoints the WAL). Later uses of the store fail with a
        /// closed-pool error.
        pub async fn close(&self) {
            // Held claims not written by now are rolled back (their rows are
            // free again) rather than waited for.
            self.held.clear();
            self.pool.close().await;
        }

        /// The outbox table.
        pub fn outbox(&self) -> $table<OutboxRoute> {
            $table::new(self.pool.clone(), self.held.clone(), self.layout.clone())
        }

        /// The inbox table.
        pub fn inbox(&self) -> $table<InboxRoute> {
            $table::new(self.pool.clone(), self.held.clone(), self.layout.clone())
        }

        fn migrator() -> sqlx::migrate::Migrator {
            migrate::configured(sqlx::migrate!($dir), COMMENT_EDITS)
        }

        #[cfg(test)]
        pub(crate) fn migrator_for_tests() -> sqlx::migrate::Migrator {
            Self::migrator()
        }

        /// The embedded migrations, for `migrate --print-sql`.
        pub fn migrations() -> Vec<MigrationScript> {
            migrate::scripts(&Self::migrator(), $postgres)
        }

        /// Fails with a hint when the schema is missing or older than this binary.
        pub async fn ensure_migrated(&self) -> Result<()> {
            migrate::ensure_current(&self.applied_versions().await?, &Self::migrator())
        }

        /// What this store supports.
        pub fn capabilities(&self) -> super::Capabilities {
            CAPABILITIES
        }
    };
}
pub(crate) use store_handles;

/// The inbox row of `message_id` in `consumer_group` (unique together), on
/// either backend.
pub(crate) async fn by_message_id<T: TableBackend<R = InboxRoute>>(
    table: &T,
    message_id: &str,
    consumer_group: &str,
) -> Result<Option<Event<InboxRoute>>> {
    let mut qb = QueryBuilder::new(T::sql().select_all);
    qb.push(" AND message_id = ");
    T::D::text(&mut qb, message_id.to_string());
    qb.push(" AND consumer_group = ");
    T::D::text(&mut qb, consumer_group.to_string());
    Ok(table.select(qb).await?.pop())
}

/// The sqlx database of `T`'s dialect.
pub(crate) type Db<T> = <<T as TableBackend>::D as Dialect>::Db;

/// A route's table on dialect `D`: its statements and how a row reads
/// (each backend implements it for the routes of its sealed route trait).
pub(crate) trait TableOf<D: Dialect>: Route {
    /// The table's statements.
    fn sql() -> &'static TableSql;
    /// Reads one whole row.
    fn decode(row: &RowOf<D>) -> Result<Event<Self>>;
}

/// A handle on a pool (every [`StoreTable`]).
pub(crate) trait Pooled {
    /// Its sqlx database.
    type Db: sqlx::Database;
    /// The pool.
    fn pool(&self) -> &sqlx::Pool<Self::Db>;
}

impl<DB: sqlx::Database, R> Pooled for StoreTable<DB, R> {
    type Db = DB;

    fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }
}

/// A backend's table handle: each method runs one statement of the table
/// (or, for the claim and the counts, the backend's whole procedure) and
/// returns what it read, for the store traits written once below.
pub(crate) trait TableBackend: Pooled + Clone + Send + Sync + 'static {
    /// The table's route (which table).
    type R: TableOf<Self::D>;
    /// The backend's dialect.
    type D: Dialect<Db = <Self as Pooled>::Db>;
    /// True when the claim keeps per-key order (the outbox).
    const KEY_ORDER: bool = matches!(<Self::R as Route>::TABLE, Table::Outbox);
    /// The table's statements.
    fn sql() -> &'static TableSql {
        <Self::R as TableOf<Self::D>>::sql()
    }
    /// Reads one whole row.
    fn decode(row: &RowOf<Self::D>) -> Result<Event<Self::R>> {
        <Self::R as TableOf<Self::D>>::decode(row)
    }
    /// Runs a `SELECT` of whole rows built on the table's statements.
    fn select(
        &self,
        qb: QueryBuilder<Db<Self>>,
    ) -> impl Future<Output = Result<Vec<Event<Self::R>>>> + Send {
        async move {
            let rows = Self::D::fetch_rows(self.pool(), qb).await?;
            rows.iter().map(Self::decode).collect()
        }
    }
    /// Exact counts for `status`.
    fn count_rows(&self) -> impl Future<Output = Result<TableCounts>> + Send;
    /// Claims rows (the options are checked).
    fn claim_rows(
        &self,
        opts: &ClaimOptions,
    ) -> impl Future<Output = Result<Claim<Self::R>>> + Send;
    /// Whether anything is claimable with `filters` (checked).
    fn claimable(&self, filters: &FetchFilters) -> impl Future<Output = Result<bool>> + Send;
    /// Runs `sql` (complete, release, or with a `lease`, extend) on the
    /// rows of `ids` that `token` holds; returns the ids changed.
    fn update_claimed(
        &self,
        sql: &'static str,
        token: &ClaimToken,
        ids: &[Uuid],
        lease: Option<Duration>,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;
    /// Records `failures` (not empty) of rows `token` holds; returns the
    /// ids changed with their new status.
    fn fail_rows(
        &self,
        token: &ClaimToken,
        failures: &[Failure],
    ) -> impl Future<Output = Result<Vec<(Uuid, String)>>> + Send;
    /// Unlocks row `id` if it is locked; returns it.
    fn unlock_row(
        &self,
        id: Uuid,
        reason: &UnlockReason,
    ) -> impl Future<Output = Result<Option<Event<Self::R>>>> + Send;
    /// Unlocks the rows `worker` holds; returns their ids.
    fn unlock_worker(
        &self,
        worker: &str,
        reason: &UnlockReason,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;
    /// Unlocks up to `batch` rows whose lease ran out, locked longer ago
    /// than `older_than`; returns how many.
    fn release_stale_batch(
        &self,
        older_than: Duration,
        batch: i64,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Rows whose lease ran out, locked longer ago than `older_than`.
    fn count_stale(&self, older_than: Duration) -> impl Future<Output = Result<i64>> + Send;
    /// Runs the count `sql` of rows older than `older_than`.
    fn count_aged(
        &self,
        sql: &'static str,
        older_than: Duration,
    ) -> impl Future<Output = Result<i64>> + Send {
        Self::D::count_older(self.pool(), sql, older_than)
    }
    /// Runs the delete `sql` of up to `batch` rows older than `older_than`;
    /// returns how many.
    fn delete_aged(
        &self,
        sql: &'static str,
        older_than: Duration,
        batch: i64,
    ) -> impl Future<Output = Result<u64>> + Send {
        Self::D::delete_older(self.pool(), sql, older_than, batch)
    }
    /// Runs the requeue `qb` (written with the time `now`) in a
    /// transaction that also marks the requeued events' open dead letters
    /// replayed; returns the requeued ids.
    fn requeue(
        &self,
        qb: QueryBuilder<Db<Self>>,
        now: <Self::D as Dialect>::Now,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;
    /// Failed rows per event type, most first.
    fn failed_by_type(&self) -> impl Future<Output = Result<Vec<(String, i64)>>> + Send {
        Self::D::fetch_pairs(self.pool(), Self::sql().failed_by_type)
    }
    /// Failed rows grouped by event type and error, each handed to `each`
    /// as it is read.
    fn failed_groups(
        &self,
        each: &mut (dyn FnMut(FailedErrors) + Send),
    ) -> impl Future<Output = Result<()>> + Send;
}

/// A backend's inbox table: its insert, on which the rest of
/// [`InboxStore`] is written once.
pub(crate) trait InboxBackend: TableBackend<R = InboxRoute> {
    /// Inserts `events`, each unless its `(message_id, consumer_group)`
    /// exists (see [`InboxStore::insert_many`]).
    fn insert_rows(
        &self,
        events: &[InboxEvent],
    ) -> impl Future<Output = Result<Vec<BulkOutcome>>> + Send;
}

impl<T: InboxBackend> InboxStore for T {
    fn insert_many(
        &self,
        events: &[InboxEvent],
    ) -> impl Future<Output = Result<Vec<BulkOutcome>>> + Send {
        self.insert_rows(events)
    }

    async fn get_by_message_id(
        &self,
        message_id: &str,
        consumer_group: &str,
    ) -> Result<Option<InboxEvent>> {
        by_message_id(self, message_id, consumer_group).await
    }
}

impl<R: Route, T: TableBackend<R = R>> EventStore<R> for T {
    fn capabilities(&self) -> Capabilities {
        T::D::CAPABILITIES
    }

    async fn get(&self, id: Uuid) -> Result<Option<Event<R>>> {
        let mut qb = QueryBuilder::new(T::sql().select_all);
        qb.push(" AND id = ");
        T::D::id(&mut qb, id);
        Ok(self.select(qb).await?.pop())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb = QueryBuilder::new(T::sql().select_all);
        dialect::push_list::<T::D>(&mut qb, R::TABLE, filter);
        self.select(qb).await
    }

    async fn counts(&self) -> Result<TableCounts> {
        self.count_rows().await
    }

    async fn claim(&self, opts: &ClaimOptions) -> Result<Claim<R>> {
        opts.check()?;
        opts.filters.check_for(R::TABLE)?;
        self.claim_rows(opts).await
    }

    async fn claimable_exists_for(&self, filters: &FetchFilters) -> Result<bool> {
        filters.check_for(R::TABLE)?;
        self.claimable(filters).await
    }

    async fn extend_lease(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let sql = T::sql().extend_lease;
        Ok(self
            .update_claimed(sql, token, ids, Some(lease))
            .await?
            .len())
    }

    async fn complete(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        guarded(
            ids,
            self.update_claimed(T::sql().complete, token, ids, None),
        )
        .await
    }

    async fn fail(&self, token: &ClaimToken, failures: &[Failure]) -> Result<FailReport> {
        if failures.is_empty() {
            return Ok(FailReport::default());
        }
        let ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
        let rows = self.fail_rows(token, failures).await?;
        let mut report = FailReport::default();
        let mut changed = Vec::with_capacity(rows.len());
        for (id, status) in rows {
            changed.push(id);
            if status == EventStatus::Failed.as_str() {
                report.failed.push(id);
            } else {
                report.rescheduled.push(id);
            }
        }
        guard_result(&ids, &changed)?;
        Ok(report)
    }

    async fn release(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<usize> {
        guarded(ids, self.update_claimed(T::sql().release, token, ids, None)).await
    }

    async fn force_unlock(&self, id: Uuid, reason: &UnlockReason) -> Result<Event<R>> {
        match self.unlock_row(id, reason).await? {
            Some(event) => Ok(event),
            None => match self.get(id).await? {
                None => Err(Error::NotFound { id }),
                Some(_) => Err(Error::NotLocked { id }),
            },
        }
    }

    async fn release_stale_locks(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        in_batches(batch_size, |batch| {
            self.release_stale_batch(older_than, batch)
        })
        .await
    }

    async fn delete_completed(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        let batch = i64::from(batch_size.max(1));
        self.delete_aged(T::sql().delete_completed, older_than, batch)
            .await
    }

    async fn requeue_failed(&self, filter: &RequeueFilter) -> Result<Vec<Uuid>> {
        filter.check(R::TABLE)?;
        let now = T::D::now();
        let mut qb = QueryBuilder::new(T::sql().requeue_head);
        T::D::push_now(&mut qb, &now);
        qb.push(", updated_at = ");
        T::D::push_now(&mut qb, &now);
        qb.push(T::sql().requeue_where);
        dialect::push_failed::<T::D>(&mut qb, R::TABLE, filter);
        qb.push(T::D::SKIP_LOCKED).push(") RETURNING id");
        self.requeue(qb, now).await
    }
}

impl<R: Route, T: TableBackend<R = R>> MaintenanceStore<R> for T {
    async fn list_failed(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb = QueryBuilder::new(T::sql().failed_head);
        dialect::push_failed::<T::D>(&mut qb, R::TABLE, filter);
        self.select(qb).await
    }

    async fn list_waiting(&self, filter: &RequeueFilter) -> Result<Vec<Event<R>>> {
        filter.check(R::TABLE)?;
        let mut qb = QueryBuilder::new(T::sql().waiting_head);
        T::D::push_now(&mut qb, &T::D::now());
        dialect::push_failed::<T::D>(&mut qb, R::TABLE, filter);
        self.select(qb).await
    }

    async fn force_unlock_worker(&self, worker: &str, reason: &UnlockReason) -> Result<Vec<Uuid>> {
        self.unlock_worker(worker, reason).await
    }

    async fn count_stale_locks(&self, older_than: Duration) -> Result<u64> {
        Ok(self.count_stale(older_than).await? as u64)
    }

    async fn count_older(&self, status: EventStatus, older_than: Duration) -> Result<u64> {
        let sql = match status {
            EventStatus::Completed => T::sql().count_completed_older,
            EventStatus::Failed => T::sql().count_failed_older,
            EventStatus::Pending => {
                return Err(Error::validation(
                    "status",
                    "only completed or failed rows age out",
                ));
            }
        };
        Ok(self.count_aged(sql, older_than).await? as u64)
    }

    async fn delete_failed(&self, older_than: Duration, batch_size: u32) -> Result<u64> {
        let batch = i64::from(batch_size.max(1));
        self.delete_aged(T::sql().delete_failed, older_than, batch)
            .await
    }

    async fn failed_by_event_type(&self) -> Result<Vec<(String, u64)>> {
        let rows = self.failed_by_type().await?;
        Ok(rows.into_iter().map(|(t, n)| (t, n as u64)).collect())
    }

    async fn failed_errors(&self, each: &mut (dyn FnMut(FailedErrors) + Send)) -> Result<()> {
        self.failed_groups(each).await
    }
}

/// Runs a guarded update of `ids` (nothing when there are none): every id
/// must have changed, else [`Error::ConcurrentUpdate`]. Returns how many did.
async fn guarded(ids: &[Uuid], update: impl Future<Output = Result<Vec<Uuid>>>) -> Result<usize> {
    if ids.is_empty() {
        return Ok(0);
    }
    let changed = update.await?;
    guard_result(ids, &changed)?;
    Ok(changed.len())
}

/// Runs `step` with a batch size (at least 1) until it affects fewer rows
/// than a batch; returns how many it affected in all.
pub(crate) async fn in_batches<F, Fut>(batch_size: u32, mut step: F) -> Result<u64>
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = Result<u64>>,
{
    let batch = i64::from(batch_size.max(1));
    let mut total = 0;
    loop {
        let n = step(batch).await?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}

/// Decodes rows as they arrive: a claim of large events holds each row's
/// wire bytes only until it is decoded, not the whole batch's beside the
/// events.
pub(crate) async fn decode_all<Row, R>(
    rows: impl futures_util::Stream<Item = std::result::Result<Row, sqlx::Error>>,
    decode: impl Fn(&Row) -> Result<Event<R>>,
) -> Result<Vec<Event<R>>> {
    use futures_util::TryStreamExt;
    let mut rows = std::pin::pin!(rows);
    let mut events = Vec::new();
    while let Some(row) = rows.try_next().await.map_err(storage)? {
        events.push(decode(&row)?);
    }
    Ok(events)
}

/// Exact counts of `table` from a counting row (`count` reads one of its
/// counts by name).
pub(crate) fn exact_counts(
    table: Table,
    count: impl Fn(&str) -> Result<u64>,
    oldest_pending_created_at: Option<Timestamp>,
    now: Timestamp,
) -> Result<TableCounts> {
    Ok(TableCounts {
        table,
        pending: count("pending")?,
        completed: count("completed")?,
        failed: count("failed")?,
        locked: count("locked")?,
        due_now: count("due_now")?,
        oldest_pending_created_at,
        now,
        completed_is_estimate: false,
    })
}
