//! What the PostgreSQL and the SQLite backend write alike, once for both:
//! statement text as `concat!` macros (the PostgreSQL statements in
//! `postgres/sql.rs` and the SQLite ones in `sqlite/sql.rs` pass what
//! differs, such as the current time, and get the same text around it);
//! the running of a prepared statement and the audit row's insert, generic
//! over the sqlx database; and the features' write transaction with the
//! methods whose bodies are the same.

use crate::error::{Result, storage};
use crate::model::Table;
use crate::store::audit::AuditEntry;
use crate::store::dialect::Dialect;
use crate::store::table::TableSql;

/// A row that can be handed out now (`$a` the table alias, `$now` the
/// current time): due, and unlocked or its lease passed. Used by every
/// claim and walk.
macro_rules! ready {
    ($a:literal, $now:expr) => {
        concat!(
            "((",
            $a,
            ".locked_at IS NULL OR ",
            $a,
            ".locked_until <= ",
            $now,
            ") AND ",
            $a,
            ".scheduled_at <= ",
            $now,
            ")"
        )
    };
}

/// A row that takes part in its key's order (`$soon`: the current time
/// plus a second): due (or due within the next second: a row written "now"
/// by a transaction that committed while the claim ran must not count as
/// scheduled for later), tried, or locked. A row scheduled further ahead
/// and never tried does not hold its key up.
macro_rules! active {
    ($a:literal, $soon:expr) => {
        concat!(
            "(",
            $a,
            ".scheduled_at <= ",
            $soon,
            " OR ",
            $a,
            ".last_error IS NOT NULL OR ",
            $a,
            ".locked_at IS NOT NULL)"
        )
    };
}

/// The counts for `status` of table `$t` (`$now` the current time), and
/// the backend's further columns.
macro_rules! counts {
    ($t:literal, $now:literal $(, $more:literal)?) => {
        concat!(
            "SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                        count(*) FILTER (WHERE status = 'completed') AS completed,
                        count(*) FILTER (WHERE status = 'failed') AS failed,
                        count(*) FILTER (WHERE locked_at IS NOT NULL) AS locked,
                        count(*) FILTER (WHERE status = 'pending' AND ", ready!("t", $now), ") AS due_now,
                        min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending",
            $(",\n                        ", $more,)?
            "\n                FROM ", $t, " t"
        )
    };
}

/// The statements of table `$t`: its claim and claimable check, the
/// backend's own statements (`$name: $sql`), and those whose text is the
/// same on both backends.
macro_rules! table_sql {
    ($t:literal, $claim:expr, $exists:expr, { $($name:ident: $sql:expr,)* }) => {
        $crate::store::table::TableSql {
            claim: $claim,
            claimable_exists: $exists,
            $($name: $sql,)*
            failed_head: concat!("SELECT * FROM ", $t, " WHERE status = 'failed'"),
            waiting_head: concat!(
                "SELECT * FROM ", $t,
                " WHERE status = 'pending' AND locked_at IS NULL AND last_error IS NOT NULL AND scheduled_at > "
            ),
            failed_by_type: concat!(
                "SELECT event_type, count(*) FROM ", $t,
                " WHERE status = 'failed' GROUP BY event_type ORDER BY count(*) DESC, event_type"
            ),
        }
    };
}

/// Implements a backend's sealed route trait `$trait` (rows `$row`,
/// errors `$err`) for each route: `decode_route` reads each field from the
/// column of its name, with `$get` or the field's own reader.
macro_rules! route_columns {
    (@get $get:path) => { $get };
    (@get $get:path, $own:path) => { $own };
    ($trait:ident($row:ty, $err:ty), $get:path:
     $($route:ident { $($field:ident $(: $own:path)?),* })*) => {
        $(impl $trait for $route {
            fn decode_route(row: &$row) -> Result<Self, $err> {
                Ok($route {
                    $($field: $crate::store::shared::route_columns!(@get $get $(, $own)?)(row, stringify!($field))?,)*
                })
            }
        })*
    };
}

pub(crate) use {active, counts, ready, route_columns, table_sql};

/// The statements of `table`: `outbox`'s or `inbox`'s.
#[inline]
pub(crate) fn of_table(
    table: Table,
    outbox: &'static TableSql,
    inbox: &'static TableSql,
) -> &'static TableSql {
    match table {
        Table::Outbox => outbox,
        Table::Inbox => inbox,
    }
}

/// Runs the prepared statement `q` on `conn`; returns its result (rows
/// changed).
pub(crate) async fn run<'c, C, DB>(
    conn: &'c mut C,
    q: sqlx::query::Query<'_, DB, DB::Arguments>,
) -> Result<DB::QueryResult>
where
    DB: sqlx::Database,
    &'c mut C: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    q.execute(conn).await.map_err(storage)
}

/// Runs the prepared statement `q` on `executor`; returns its rows, each
/// read by `decode`.
pub(crate) async fn fetch_decoded<'c, E, DB, T>(
    executor: E,
    q: sqlx::query::Query<'_, DB, DB::Arguments>,
    decode: impl Fn(&DB::Row) -> Result<T>,
) -> Result<Vec<T>>
where
    E: sqlx::Executor<'c, Database = DB>,
    DB: sqlx::Database,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let rows = q.fetch_all(executor).await.map_err(storage)?;
    rows.iter().map(decode).collect()
}

/// Reads a row's first column as text (for [`fetch_decoded`]).
pub(crate) fn text_at_0<R: sqlx::Row>(row: &R) -> Result<String>
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    row.try_get(0).map_err(storage)
}

/// An operator's unlock of the rows of `table` that `rows` selects,
/// returning their ids: each keeps its `last_error`, or gets the one bound
/// as `error` (a parameter); `now` is the current time.
pub(crate) fn unlock_sql(table: Table, error: &str, now: &str, rows: &str) -> String {
    let t = table.sql_name();
    format!(
        "UPDATE {t} SET locked_at = NULL, locked_by = NULL, locked_until = NULL, \
         last_error = COALESCE(last_error, {error}), updated_at = {now} WHERE {rows} RETURNING id"
    )
}

/// Records `entry` on `conn` by `sql`, the backend's insert of an audit
/// row whose parameters are the time `at` (as the backend stores times),
/// the actor, the action, the table, the count, the ids (JSON text), the
/// reason and the details (JSON text). Returns the row's id.
pub(crate) async fn insert_audit<'c, C, DB, At>(
    conn: &'c mut C,
    sql: &'static str,
    at: At,
    entry: &AuditEntry,
) -> Result<i64>
where
    DB: sqlx::Database,
    &'c mut C: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    At: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB> + Send,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let ids = serde_json::to_string(&entry.ids).unwrap_or_else(|_| "[]".into());
    let details = serde_json::to_string(&entry.details).unwrap_or_else(|_| "{}".into());
    sqlx::query_scalar(sql)
        .bind(at)
        .bind(entry.actor.as_str())
        .bind(entry.action.as_str())
        .bind(entry.table.as_deref())
        .bind(entry.count as i64)
        .bind(ids)
        .bind(entry.reason.as_deref())
        .bind(details)
        .fetch_one(conn)
        .await
        .map_err(storage)
}

/// A write transaction for the features (`store/driver.rs`) on dialect
/// `D`, with the time its statements share (SQLite's, taken when it
/// begins; PostgreSQL's is the server's `now()`, nothing to carry).
pub(crate) struct FeatureTxOf<D: Dialect> {
    pub(crate) tx: sqlx::Transaction<'static, D::Db>,
    pub(crate) now: D::Now,
}

/// The `FeatureTx` methods of a [`FeatureTxOf`] whose bodies read the same
/// for both backends, expanded in each impl (where the database is
/// concrete); `$d` is the dialect, and the backend's module has
/// `insert_outbox` and `insert_inbox` on a connection.
macro_rules! feature_tx_common {
    ($d:ty) => {
        async fn insert_outbox(
            &mut self,
            events: &[$crate::model::OutboxEvent],
        ) -> $crate::error::Result<Vec<$crate::store::BulkOutcome>> {
            super::insert_outbox(&mut self.tx, events).await
        }

        async fn insert_inbox(
            &mut self,
            events: &[$crate::model::InboxEvent],
        ) -> $crate::error::Result<Vec<$crate::store::BulkOutcome>> {
            super::insert_inbox(&mut self.tx, events).await
        }

        async fn close_letters(&mut self, ids: &[uuid::Uuid]) -> $crate::error::Result<()> {
            let qb = $crate::store::dialect::close_letters::<$d>(ids, &self.now);
            $crate::store::dialect::execute(&mut *self.tx, qb).await
        }

        async fn commit(self) -> $crate::error::Result<()> {
            self.tx.commit().await.map_err($crate::error::storage)
        }

        async fn rollback(self) -> $crate::error::Result<()> {
            self.tx.rollback().await.map_err($crate::error::storage)
        }
    };
}

pub(crate) use feature_tx_common;
