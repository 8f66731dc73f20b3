//! What the backends' SQL differs in, for the statements written once for
//! both: how a text, a number, a time and a set of ids are bound, and the
//! name of the substring-position function. Placeholders come from
//! `QueryBuilder` (`$n` or `?`).

use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::{Postgres, QueryBuilder, Sqlite};
use uuid::Uuid;

use super::dead_letters::{DeadLetterFilter, DeadLetterRecord};
use super::request::{EventSelector, ListFilter, RequeueFilter, TimeWindow};
use super::{Capabilities, DEFAULT_LIST_LIMIT, topic_column};
use crate::error::{Result, storage};
use crate::model::{Table, Timestamp, time};

/// A statement run on a pool, boxed: what the features written once over a
/// [`Dialect`] await without naming sqlx's bounds themselves.
pub(crate) type Run<'a, T> = BoxFuture<'a, Result<T>>;

/// The rows of a dialect's database.
pub(crate) type RowOf<D> = <<D as Dialect>::Db as sqlx::Database>::Row;

/// A backend's dialect.
pub(crate) trait Dialect {
    /// Its sqlx database.
    type Db: sqlx::Database;
    /// What the backend supports.
    const CAPABILITIES: Capabilities;
    /// `strpos` or `instr`: the 1-based position of a substring, 0 if absent.
    const POSITION: &'static str;
    /// Binds a text.
    fn text(qb: &mut QueryBuilder<Self::Db>, v: String);
    /// Binds a number.
    fn int(qb: &mut QueryBuilder<Self::Db>, v: i64);
    /// Binds an id.
    fn id(qb: &mut QueryBuilder<Self::Db>, id: Uuid);
    /// Binds a time.
    fn time(qb: &mut QueryBuilder<Self::Db>, t: &Timestamp);
    /// Appends `column` is one of `ids`.
    fn id_in(qb: &mut QueryBuilder<Self::Db>, column: &str, ids: &[Uuid]);
    /// The current time of a statement, taken once for all its uses.
    type Now: Send + Sync + 'static;
    /// Takes the current time (PostgreSQL: the server's `now()`, nothing
    /// to take here).
    fn now() -> Self::Now;
    /// Appends the time `now`.
    fn push_now(qb: &mut QueryBuilder<Self::Db>, now: &Self::Now);
    /// What ends a row selection that skips rows other transactions lock
    /// (empty where one writer holds the whole database).
    const SKIP_LOCKED: &'static str;
    /// The `consumer_group` field of a dead letter's `event` column, as text.
    const LETTER_GROUP: &'static str;
    /// The columns of a dead letter, as [`Dialect::decode_letter`] reads them.
    const LETTER_COLUMNS: &'static str;
    /// Reads one dead letter of [`Dialect::LETTER_COLUMNS`].
    fn decode_letter(row: &RowOf<Self>) -> Result<DeadLetterRecord>;

    // Statements whose text comes from the caller, run on a pool (the
    // bodies are the same for both: `runners!`).

    /// Runs `qb`; returns its rows.
    fn fetch_rows<'a>(
        pool: &'a sqlx::Pool<Self::Db>,
        qb: QueryBuilder<Self::Db>,
    ) -> Run<'a, Vec<RowOf<Self>>>;
    /// Runs `qb`; returns the count in its one row and column.
    fn fetch_count<'a>(pool: &'a sqlx::Pool<Self::Db>, qb: QueryBuilder<Self::Db>) -> Run<'a, u64>;
    /// Runs `sql`, whose rows are a text and a number.
    fn fetch_pairs<'a>(
        pool: &'a sqlx::Pool<Self::Db>,
        sql: &'static str,
    ) -> Run<'a, Vec<(String, i64)>>;
    /// Runs the count `sql`, whose one parameter is the age `older_than`
    /// (see [`Pg::age`], [`Lite::age`]).
    fn count_older<'a>(
        pool: &'a sqlx::Pool<Self::Db>,
        sql: &'static str,
        older_than: Duration,
    ) -> Run<'a, i64>;
    /// Runs the delete `sql`, whose parameters are the age `older_than`
    /// and a batch size; returns how many rows it deleted.
    fn delete_older<'a>(
        pool: &'a sqlx::Pool<Self::Db>,
        sql: &'static str,
        older_than: Duration,
        batch: i64,
    ) -> Run<'a, u64>;
}

/// The [`Dialect`] functions whose bodies read the same for both
/// backends, expanded in each impl (where the database is concrete);
/// `$backend` is the backend's module.
macro_rules! runners {
    ($backend:ident) => {
        fn decode_letter(row: &RowOf<Self>) -> Result<DeadLetterRecord> {
            super::$backend::letter::decode_letter(row)
        }

        fn text(qb: &mut QueryBuilder<Self::Db>, v: String) {
            qb.push_bind(v);
        }

        fn int(qb: &mut QueryBuilder<Self::Db>, v: i64) {
            qb.push_bind(v);
        }

        fn fetch_rows<'a>(
            pool: &'a sqlx::Pool<Self::Db>,
            qb: QueryBuilder<Self::Db>,
        ) -> Run<'a, Vec<RowOf<Self>>> {
            Box::pin(rows(pool, qb))
        }

        fn fetch_count<'a>(
            pool: &'a sqlx::Pool<Self::Db>,
            qb: QueryBuilder<Self::Db>,
        ) -> Run<'a, u64> {
            Box::pin(count(pool, qb))
        }

        fn fetch_pairs<'a>(
            pool: &'a sqlx::Pool<Self::Db>,
            sql: &'static str,
        ) -> Run<'a, Vec<(String, i64)>> {
            Box::pin(async move { sqlx::query_as(sql).fetch_all(pool).await.map_err(storage) })
        }

        fn count_older<'a>(
            pool: &'a sqlx::Pool<Self::Db>,
            sql: &'static str,
            older_than: Duration,
        ) -> Run<'a, i64> {
            let age = Self::age(older_than);
            Box::pin(async move {
                sqlx::query_scalar(sql)
                    .bind(age)
                    .fetch_one(pool)
                    .await
                    .map_err(storage)
            })
        }

        fn delete_older<'a>(
            pool: &'a sqlx::Pool<Self::Db>,
            sql: &'static str,
            older_than: Duration,
            batch: i64,
        ) -> Run<'a, u64> {
            let age = Self::age(older_than);
            Box::pin(async move {
                let done = sqlx::query(sql).bind(age).bind(batch).execute(pool).await;
                Ok(done.map_err(storage)?.rows_affected())
            })
        }
    };
}

/// PostgreSQL: native times and uuid arrays.
pub(crate) struct Pg;

impl Dialect for Pg {
    type Db = Postgres;
    const CAPABILITIES: Capabilities = Capabilities::POSTGRES;
    const POSITION: &'static str = "strpos";

    fn id(qb: &mut QueryBuilder<Postgres>, id: Uuid) {
        qb.push_bind(id);
    }

    fn time(qb: &mut QueryBuilder<Postgres>, t: &Timestamp) {
        qb.push_bind(*t);
    }

    fn id_in(qb: &mut QueryBuilder<Postgres>, column: &str, ids: &[Uuid]) {
        qb.push(column)
            .push(" = ANY(")
            .push_bind(ids.to_vec())
            .push(")");
    }

    type Now = ();
    fn now() {}

    fn push_now(qb: &mut QueryBuilder<Postgres>, _: &()) {
        qb.push("now()");
    }

    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const LETTER_GROUP: &'static str = "event->>'consumer_group'";
    const LETTER_COLUMNS: &'static str = "id, seq, origin, event_id, event_type, topic, attempts_made, error, event::text AS event, dead_at, replayed_at";

    runners!(postgres);
}

impl Pg {
    /// An age parameter: seconds, which the statement subtracts from the
    /// server's `now()` (`now() - make_interval(secs => $1)`).
    pub(crate) fn age(older_than: Duration) -> f64 {
        super::secs(older_than)
    }
}

/// SQLite: times in the stored text form, ids as a JSON array.
pub(crate) struct Lite;

impl Dialect for Lite {
    type Db = Sqlite;
    const CAPABILITIES: Capabilities = Capabilities::SQLITE;
    const POSITION: &'static str = "instr";

    fn id(qb: &mut QueryBuilder<Sqlite>, id: Uuid) {
        qb.push_bind(id.to_string());
    }

    fn time(qb: &mut QueryBuilder<Sqlite>, t: &Timestamp) {
        qb.push_bind(time::format(t));
    }

    fn id_in(qb: &mut QueryBuilder<Sqlite>, column: &str, ids: &[Uuid]) {
        qb.push(column)
            .push(" IN (SELECT value FROM json_each(")
            .push_bind(id_array(ids))
            .push("))");
    }

    /// This process's clock in the stored text form (SQLite has none).
    type Now = String;
    fn now() -> String {
        time::format(&time::now())
    }

    fn push_now(qb: &mut QueryBuilder<Sqlite>, now: &String) {
        qb.push_bind(now.clone());
    }

    const SKIP_LOCKED: &'static str = "";
    const LETTER_GROUP: &'static str = "json_extract(event, '$.consumer_group')";
    const LETTER_COLUMNS: &'static str = "id, seq, origin, event_id, event_type, topic, attempts_made, error, event, dead_at, replayed_at";

    runners!(sqlite);
}

impl Lite {
    /// An age parameter: the time `older_than` before this process's
    /// clock, in the stored text form.
    pub(crate) fn age(older_than: Duration) -> String {
        time::format(&(time::now() - crate::domain::chrono_dur(older_than)))
    }
}

/// Runs `qb` on `pool`; returns its rows.
async fn rows<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    mut qb: QueryBuilder<DB>,
) -> Result<Vec<DB::Row>>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    qb.build().fetch_all(pool).await.map_err(storage)
}

/// Runs `qb` on `pool`; returns the count in its one row and column.
async fn count<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, mut qb: QueryBuilder<DB>) -> Result<u64>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    i64: for<'r> sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let q = qb.build_query_scalar::<i64>().fetch_one(pool);
    Ok(u64::try_from(q.await.map_err(storage)?).unwrap_or(0))
}

/// Runs `qb` on `conn`.
pub(crate) async fn execute<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    mut qb: QueryBuilder<DB>,
) -> Result<()>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let q = qb.build().execute(conn);
    q.await.map_err(storage).map(drop)
}

/// Unlocks the pending inbox rows `ids` (the consumer's transaction).
pub(crate) fn unlock_inbox<D: Dialect>(ids: &[Uuid], now: &D::Now) -> QueryBuilder<D::Db> {
    let mut qb = QueryBuilder::new(
        "UPDATE inbox_events SET locked_at = NULL, locked_by = NULL, locked_until = NULL, updated_at = ",
    );
    D::push_now(&mut qb, now);
    qb.push(" WHERE ");
    D::id_in(&mut qb, "id", ids);
    qb.push(" AND status = 'pending'");
    qb
}

/// Marks the pending inbox rows `ids` completed (the consumer's
/// transaction).
pub(crate) fn complete_inbox<D: Dialect>(ids: &[Uuid], now: &D::Now) -> QueryBuilder<D::Db> {
    let mut qb = QueryBuilder::new(
        "UPDATE inbox_events SET status = 'completed', locked_at = NULL, locked_by = NULL, \
         locked_until = NULL, completed_at = ",
    );
    D::push_now(&mut qb, now);
    qb.push(", updated_at = ");
    D::push_now(&mut qb, now);
    qb.push(" WHERE ");
    D::id_in(&mut qb, "id", ids);
    qb.push(" AND status = 'pending'");
    qb
}

/// Deletes the inbox rows `ids` (the consumer's transaction).
pub(crate) fn delete_inbox<D: Dialect>(ids: &[Uuid]) -> QueryBuilder<D::Db> {
    let mut qb = QueryBuilder::new("DELETE FROM inbox_events WHERE ");
    D::id_in(&mut qb, "id", ids);
    qb
}

/// The letters matching `filter`, oldest first.
pub(crate) fn letters<D: Dialect>(filter: &DeadLetterFilter) -> QueryBuilder<D::Db> {
    let mut qb = QueryBuilder::new("SELECT ");
    qb.push(D::LETTER_COLUMNS)
        .push(" FROM omnibox_dead_letters WHERE true");
    push_letters::<D>(&mut qb, filter);
    qb
}

/// How many letters are open, of `origin`'s events or of all.
pub(crate) fn count_open_letters<D: Dialect>(origin: Option<Table>) -> QueryBuilder<D::Db> {
    let mut qb =
        QueryBuilder::new("SELECT count(*) FROM omnibox_dead_letters WHERE replayed_at IS NULL");
    if let Some(origin) = origin {
        qb.push(" AND origin = ");
        D::text(&mut qb, origin.to_string());
    }
    qb
}

/// Marks the letters `ids` replayed at `now`.
pub(crate) fn close_letters<D: Dialect>(ids: &[Uuid], now: &D::Now) -> QueryBuilder<D::Db> {
    let mut qb = QueryBuilder::new("UPDATE omnibox_dead_letters SET replayed_at = ");
    D::push_now(&mut qb, now);
    qb.push(" WHERE ");
    D::id_in(&mut qb, "id", ids);
    qb
}

/// A dead-letter listing's filters, order (oldest first) and limit, after
/// `SELECT ... FROM omnibox_dead_letters WHERE true`.
fn push_letters<D: Dialect>(qb: &mut QueryBuilder<D::Db>, filter: &DeadLetterFilter) {
    let f = &filter.failures;
    if !f.ids.is_empty() {
        qb.push(" AND (");
        D::id_in(qb, "id", &f.ids);
        qb.push(" OR ");
        D::id_in(qb, "event_id", &f.ids);
        qb.push(")");
    }
    if let Some(origin) = filter.origin {
        qb.push(" AND origin = ");
        D::text(qb, origin.to_string());
    }
    push_eq::<D>(qb, "event_type", f.select.event_type.as_deref());
    push_eq::<D>(qb, "topic", f.select.topic.as_deref());
    push_contains::<D>(qb, "error", f.error_contains.as_deref());
    push_window::<D>(qb, "dead_at", &f.window);
    if filter.open_only {
        qb.push(" AND replayed_at IS NULL");
    }
    if let Some(seq) = filter.after_seq {
        qb.push(" AND seq > ");
        D::int(qb, seq);
    }
    if let Some(group) = &f.select.consumer_group {
        qb.push(" AND origin = 'inbox' AND ")
            .push(D::LETTER_GROUP)
            .push(" = ");
        D::text(qb, group.clone());
    }
    qb.push(" ORDER BY seq LIMIT ");
    D::int(qb, filter.limit.map_or(i64::MAX, i64::from));
}

/// `list`'s filters, order and limit, after the table's
/// `SELECT ... WHERE true`. The filter is checked by the caller.
pub(crate) fn push_list<D: Dialect>(
    qb: &mut QueryBuilder<D::Db>,
    table: Table,
    filter: &ListFilter,
) {
    push_eq::<D>(qb, "status", filter.status.map(|s| s.as_str()));
    push_selectors::<D>(qb, table, &filter.select);
    let window = TimeWindow {
        since: filter.since,
        until: None,
    };
    push_window::<D>(qb, "created_at", &window);
    if let Some(after) = filter.after_seq {
        qb.push(" AND seq > ");
        D::int(qb, after);
    }
    if let Some(worker) = &filter.locked_by {
        // `locked_until IS NOT NULL` holds for every locked row; it lets
        // the small index of locked rows serve the filter.
        qb.push(" AND locked_until IS NOT NULL AND locked_by = ");
        D::text(qb, worker.clone());
    }
    qb.push(" ORDER BY seq LIMIT ");
    D::int(qb, i64::from(filter.limit.unwrap_or(DEFAULT_LIST_LIMIT)));
}

/// The `AND ...` filters of a failed-row selection, then `ORDER BY seq
/// [LIMIT]`. The filter is checked by the caller.
pub(crate) fn push_failed<D: Dialect>(
    qb: &mut QueryBuilder<D::Db>,
    table: Table,
    filter: &RequeueFilter,
) {
    let f = &filter.failures;
    if !f.ids.is_empty() {
        qb.push(" AND ");
        D::id_in(qb, "id", &f.ids);
    }
    push_selectors::<D>(qb, table, &f.select);
    push_contains::<D>(qb, "last_error", f.error_contains.as_deref());
    push_window::<D>(qb, "updated_at", &f.window);
    qb.push(" ORDER BY seq");
    if let Some(limit) = filter.limit {
        qb.push(" LIMIT ");
        D::int(qb, i64::from(limit));
    }
}

/// The event type, topic (outbox) or source (inbox) and consumer group an
/// event selection asks for, each when set, on `table`'s columns (a
/// consumer group is checked by the caller: inbox only).
fn push_selectors<D: Dialect>(qb: &mut QueryBuilder<D::Db>, table: Table, select: &EventSelector) {
    push_eq::<D>(qb, "event_type", select.event_type.as_deref());
    push_eq::<D>(qb, topic_column(table), select.topic.as_deref());
    push_eq::<D>(qb, "consumer_group", select.consumer_group.as_deref());
}

/// ` AND column = value`, when `value` is set.
fn push_eq<D: Dialect>(qb: &mut QueryBuilder<D::Db>, column: &str, value: Option<&str>) {
    if let Some(v) = value {
        qb.push(" AND ").push(column).push(" = ");
        D::text(qb, v.to_string());
    }
}

/// ` AND` `column` contains `text`, when `text` is set.
fn push_contains<D: Dialect>(qb: &mut QueryBuilder<D::Db>, column: &str, text: Option<&str>) {
    if let Some(text) = text {
        qb.push(" AND ")
            .push(D::POSITION)
            .push("(")
            .push(column)
            .push(", ");
        D::text(qb, text.to_string());
        qb.push(") > 0");
    }
}

/// ` AND` `column` at or after the window's `since` and before its
/// `until`, each when set.
fn push_window<D: Dialect>(qb: &mut QueryBuilder<D::Db>, column: &str, window: &TimeWindow) {
    if let Some(since) = &window.since {
        qb.push(" AND ").push(column).push(" >= ");
        D::time(qb, since);
    }
    if let Some(until) = &window.until {
        qb.push(" AND ").push(column).push(" < ");
        D::time(qb, until);
    }
}

/// A JSON array of ids, for `json_each(?)`.
pub(crate) fn id_array(ids: &[Uuid]) -> String {
    serde_json::to_string(&ids.iter().map(|id| id.to_string()).collect::<Vec<_>>())
        .expect("strings serialise")
}
