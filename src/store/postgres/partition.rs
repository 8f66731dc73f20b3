//! Partitioned tables: the outbox and inbox range-partitioned by
//! `created_at` (`omnibox migrate --partitioned`), partitions made ahead of
//! time (`omnibox partitions create`, and every relay and inbox processor
//! while it runs), and retention that drops a whole partition once every
//! row in it is past retention (`omnibox cleanup`). docs/partitioning.md
//! has the rules; docs/design.md the invariants.
//!
//! What uniqueness becomes. PostgreSQL enforces a unique index on a
//! partitioned table only when it holds the partition key, so:
//! - each partition has its own primary key on `id` (the partitioned
//!   table has none): an id is unique within its partition (ids omnibox
//!   makes are UUIDv7; a caller that passes its own id twice, on different
//!   days, gets two rows);
//! - the outbox's idempotency key stays unique across partitions: a row
//!   trigger records each key in `omnibox_outbox_keys` (one plain table)
//!   and skips a row whose key is taken, as `ON CONFLICT DO NOTHING` did;
//! - the inbox's `(message_id, consumer_group)` stays unique for as long as
//!   the first row is kept (what the dedup window asks): a row trigger takes
//!   an advisory transaction lock on the pair and skips the row when any
//!   partition holds it;
//! - the inbox's idempotency key is no longer unique (the inbox
//!   deduplicates by message id).
//!
//! Every name pasted into DDL here is one omnibox makes (`outbox_events`,
//! `inbox_events`, a partition name of digits) or one the catalog returns,
//! quoted by PostgreSQL's own `quote_ident`/`format('%I')`.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveTime, TimeZone, Utc};
use serde::Serialize;
use sqlx::{Connection, PgConnection, Row};

use super::PgStore;
use crate::error::{Error, Result, storage};
use crate::model::Table;

/// The range each partition covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// One hour (UTC).
    Hour,
    /// One day (UTC midnight to midnight).
    Day,
    /// One week, Monday to Monday (UTC).
    Week,
}

impl Period {
    /// `hour`, `day` or `week`.
    pub fn parse(text: &str) -> Option<Period> {
        match text {
            "hour" => Some(Period::Hour),
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            _ => None,
        }
    }

    /// The name `parse` reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
        }
    }

    /// How long one partition's range is.
    pub fn length(self) -> chrono::Duration {
        match self {
            Period::Hour => chrono::Duration::hours(1),
            Period::Day => chrono::Duration::days(1),
            Period::Week => chrono::Duration::days(7),
        }
    }

    /// The start of the range holding `t`.
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let day = t.date_naive();
        let start = match self {
            Period::Hour => {
                day.and_time(NaiveTime::MIN)
                    + chrono::Duration::hours(i64::from(chrono::Timelike::hour(&t)))
            }
            Period::Day => day.and_time(NaiveTime::MIN),
            Period::Week => (day
                - chrono::Duration::days(i64::from(day.weekday().num_days_from_monday())))
            .and_time(NaiveTime::MIN),
        };
        Utc.from_utc_datetime(&start)
    }

    /// The starts of the partitions from the one holding `from` (at most
    /// `now`) to `ahead` past the one holding `now`, oldest first.
    fn starts(
        self,
        from: DateTime<Utc>,
        now: DateTime<Utc>,
        ahead: u32,
    ) -> impl Iterator<Item = DateTime<Utc>> {
        let last = self.floor(now) + self.length() * i32::try_from(ahead).unwrap_or(0);
        std::iter::successors(Some(self.floor(from.min(now))), move |s| {
            Some(*s + self.length())
        })
        .take_while(move |s| *s <= last)
    }

    /// The suffix of the partition starting at `start`: `YYYYMMDDHH` for
    /// hours, `YYYYMMDD` for days and weeks.
    fn suffix(self, start: DateTime<Utc>) -> String {
        match self {
            Period::Hour => start.format("%Y%m%d%H").to_string(),
            Period::Day | Period::Week => start.format("%Y%m%d").to_string(),
        }
    }

    /// The start a suffix names, if it is one of this period's.
    fn parse_suffix(self, suffix: &str) -> Option<DateTime<Utc>> {
        if !suffix.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (date, hour) = match (self, suffix.len()) {
            (Period::Hour, 10) => (&suffix[..8], suffix[8..].parse::<u32>().ok()?),
            (Period::Day | Period::Week, 8) => (suffix, 0),
            _ => return None,
        };
        let day = chrono::NaiveDate::parse_from_str(date, "%Y%m%d").ok()?;
        let start = Utc.from_utc_datetime(&day.and_hms_opt(hour, 0, 0)?);
        (self.floor(start) == start).then_some(start)
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name of `table`'s partition starting at `start`.
fn partition_name(table: Table, period: Period, start: DateTime<Utc>) -> String {
    format!("{}_p{}", table.sql_name(), period.suffix(start))
}

/// A bound as a `timestamptz` literal (made here, from a time).
fn literal(t: DateTime<Utc>) -> String {
    format!("'{}'", t.format("%Y-%m-%d %H:%M:%S+00"))
}

/// How `migrate --partitioned` lays the tables out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOptions {
    /// The range of one partition.
    pub period: Period,
    /// Partitions kept ready past the current one.
    pub ahead: u32,
    /// Rows a table may hold and still be converted (they are copied under
    /// a write lock); `None` for any number.
    pub copy_limit: Option<u64>,
}

impl Default for PartitionOptions {
    /// Daily partitions, two ahead, tables of up to a million rows.
    fn default() -> Self {
        PartitionOptions {
            period: Period::Day,
            ahead: 2,
            copy_limit: Some(1_000_000),
        }
    }
}

/// How long the conversion waits for a table's lock.
const CONVERT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The most partitions kept ahead.
pub const MAX_AHEAD: u32 = 1000;

/// What `partition_tables` did to one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TablePartitioning {
    /// `outbox` or `inbox`.
    pub table: String,
    /// Converted now (false: it was partitioned already).
    pub converted: bool,
    /// Rows copied into the partitioned table.
    pub rows_copied: u64,
    /// The period of its partitions.
    pub period: Period,
    /// Partitions kept ahead.
    pub ahead: u32,
    /// Partitions created.
    pub created: Vec<String>,
}

/// One table's partitioning, as recorded in `omnibox_partitioning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Partitioning {
    /// The table.
    pub table: Table,
    /// The range of one partition.
    pub period: Period,
    /// Partitions kept ready past the current one.
    pub ahead: u32,
}

/// One partition, as `omnibox partitions` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionInfo {
    /// `outbox` or `inbox`.
    pub table: String,
    /// The partition's table name.
    pub name: String,
    /// Its range's start, for partitions omnibox named.
    pub from: Option<DateTime<Utc>>,
    /// Its range's end (exclusive).
    pub to: Option<DateTime<Utc>>,
    /// The range as PostgreSQL states it.
    pub bound: String,
    /// The planner's estimate of its rows (0 before its first ANALYZE).
    pub rows_estimate: u64,
    /// Its size on disk, indexes included.
    pub bytes: u64,
    /// It has a unique index on `id` alone (omnibox's partitions have
    /// their primary key there; one made by hand may lack it).
    pub keyed: bool,
}

/// What a cleanup may retire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetireOptions {
    /// Completed rows older than this go.
    pub older_than: Duration,
    /// Failed rows go too, older than `failed_older_than`.
    pub include_failed: bool,
    /// The age of failed rows that go.
    pub failed_older_than: Duration,
    /// Count, change nothing.
    pub dry_run: bool,
    /// How long to wait for the table's lock before leaving a partition
    /// for the next run.
    pub lock_timeout: Duration,
}

/// A partition a cleanup left, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptPartition {
    /// The partition.
    pub name: String,
    /// Why it stays.
    pub reason: String,
}

/// What a cleanup retired (or would, in a dry run) in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Retired {
    /// The partitions dropped (or to drop).
    pub partitions: Vec<String>,
    /// Completed rows they held.
    pub completed: u64,
    /// Failed rows they held.
    pub failed: u64,
    /// Partitions past retention that stay.
    pub kept: Vec<KeptPartition>,
}

async fn exec(conn: &mut PgConnection, sql: String) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map_err(storage)?;
    Ok(())
}

async fn db_now(conn: &mut PgConnection) -> Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await
        .map_err(storage)
}

/// The recorded partitioning of each partitioned table (empty when none is,
/// or the bookkeeping table does not exist).
async fn recorded(conn: &mut PgConnection) -> Result<Vec<Partitioning>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('omnibox_partitioning') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(storage)?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT p.table_name, p.period, p.ahead FROM omnibox_partitioning p
          JOIN pg_class c ON c.oid = to_regclass(p.table_name) AND c.relkind = 'p'
          ORDER BY p.table_name DESC",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(storage)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let name: String = r.try_get(0).map_err(storage)?;
        let period: String = r.try_get(1).map_err(storage)?;
        let ahead: i32 = r.try_get(2).map_err(storage)?;
        let table = match name.as_str() {
            "outbox_events" => Table::Outbox,
            "inbox_events" => Table::Inbox,
            _ => continue,
        };
        let Some(period) = Period::parse(&period) else {
            continue;
        };
        out.push(Partitioning {
            table,
            period,
            ahead: u32::try_from(ahead).unwrap_or(0),
        });
    }
    Ok(out)
}

/// Creates the partition `name` of `parent` for `[start, end)`, with its
/// primary key on `id`. The key is the partition's own: a partitioned
/// table's key would have to hold `created_at`, and then the planner,
/// without statistics (a new partition has none until autovacuum analyzes
/// it), could not tell that an id matches one row, and read the partition
/// whole to find a batch's ids.
async fn create_partition(
    conn: &mut PgConnection,
    parent: &str,
    name: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<()> {
    exec(
        conn,
        format!(
            "CREATE TABLE {name} PARTITION OF {parent} FOR VALUES FROM ({}) TO ({})",
            literal(start),
            literal(end)
        ),
    )
    .await?;
    exec(
        conn,
        format!("ALTER TABLE {name} ADD CONSTRAINT {name}_pkey PRIMARY KEY (id)"),
    )
    .await
}

/// Creates `table`'s partitions from the one holding `from` to `ahead`
/// past the one holding `now`, skipping those that exist. Returns the
/// names created.
async fn create_range(
    conn: &mut PgConnection,
    table: Table,
    period: Period,
    from: DateTime<Utc>,
    now: DateTime<Utc>,
    ahead: u32,
) -> Result<Vec<String>> {
    let parent = table.sql_name();
    let mut created = Vec::new();
    for start in period.starts(from, now, ahead) {
        let end = start + period.length();
        let name = partition_name(table, period, start);
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&name)
            .fetch_one(&mut *conn)
            .await
            .map_err(storage)?;
        if !exists {
            create_partition(conn, parent, &name, start, end).await?;
            created.push(name);
        }
    }
    Ok(created)
}

/// The DDL of the trigger functions a partitioned table needs, with the
/// schema's name pinned (`search_path`) so that a session with another
/// search path inserting into `schema.outbox_events` still finds
/// `omnibox_outbox_keys`.
fn trigger_functions(schema_ident: &str) -> [String; 3] {
    [
        format!(
            "CREATE OR REPLACE FUNCTION omnibox_outbox_key() RETURNS trigger LANGUAGE plpgsql
             SET search_path = {schema_ident} AS $$
             BEGIN
                 -- A row whose id is taken is not inserted: its key must not
                 -- be recorded either (it would point at another event).
                 IF EXISTS (SELECT 1 FROM outbox_events WHERE id = NEW.id) THEN
                     RETURN NULL;
                 END IF;
                 INSERT INTO omnibox_outbox_keys (idempotency_key, event_id, created_at)
                     VALUES (NEW.idempotency_key, NEW.id, NEW.created_at)
                     ON CONFLICT DO NOTHING;
                 IF NOT FOUND THEN
                     RETURN NULL;
                 END IF;
                 RETURN NEW;
             END
             $$"
        ),
        format!(
            "CREATE OR REPLACE FUNCTION omnibox_outbox_key_gone() RETURNS trigger LANGUAGE plpgsql
             SET search_path = {schema_ident} AS $$
             BEGIN
                 DELETE FROM omnibox_outbox_keys
                  WHERE idempotency_key = OLD.idempotency_key AND event_id = OLD.id;
                 RETURN NULL;
             END
             $$"
        ),
        format!(
            "CREATE OR REPLACE FUNCTION omnibox_inbox_dedup() RETURNS trigger LANGUAGE plpgsql
             SET search_path = {schema_ident} AS $$
             BEGIN
                 PERFORM pg_advisory_xact_lock(hashtextextended(
                     'omnibox_inbox' || chr(1) || NEW.consumer_group || chr(1) || NEW.message_id, 0));
                 IF EXISTS (SELECT 1 FROM inbox_events
                             WHERE message_id = NEW.message_id AND consumer_group = NEW.consumer_group) THEN
                     RETURN NULL;
                 END IF;
                 RETURN NEW;
             END
             $$"
        ),
    ]
}

/// Makes `table` range-partitioned by `created_at` on `conn` (inside a
/// transaction, under the migration lock). Everything the plain table
/// carried comes along: columns, defaults, checks, the identity, its
/// indexes (unique ones become plain, see the module's text), triggers,
/// grants and publications; its rows are copied.
async fn convert(
    conn: &mut PgConnection,
    table: Table,
    opts: &PartitionOptions,
) -> Result<TablePartitioning> {
    let t = table.sql_name();
    let kind: Option<String> =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)")
            .bind(t)
            .fetch_optional(&mut *conn)
            .await
            .map_err(storage)?;
    let mut report = TablePartitioning {
        table: table.to_string(),
        converted: false,
        rows_copied: 0,
        period: opts.period,
        ahead: opts.ahead,
        created: Vec::new(),
    };
    match kind.as_deref() {
        None => {
            return Err(Error::Config(format!(
                "there is no table {t}: run omnibox migrate first"
            )));
        }
        Some("p") => {
            let had: Option<String> =
                sqlx::query_scalar("SELECT period FROM omnibox_partitioning WHERE table_name = $1")
                    .bind(t)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(storage)?;
            if let Some(had) = had
                && had != opts.period.as_str()
            {
                return Err(Error::Config(format!(
                    "{t} is partitioned by {had} already; its period cannot change (run with --partition-period {had})"
                )));
            }
        }
        Some(_) => {
            convert_plain(conn, table, opts, &mut report).await?;
        }
    }
    sqlx::query(
        "INSERT INTO omnibox_partitioning (table_name, period, ahead) VALUES ($1, $2, $3)
         ON CONFLICT (table_name) DO UPDATE SET ahead = EXCLUDED.ahead",
    )
    .bind(t)
    .bind(opts.period.as_str())
    .bind(i32::try_from(opts.ahead).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await
    .map_err(storage)?;
    let now = db_now(conn).await?;
    report
        .created
        .extend(create_range(conn, table, opts.period, now, now, opts.ahead).await?);
    Ok(report)
}

async fn convert_plain(
    conn: &mut PgConnection,
    table: Table,
    opts: &PartitionOptions,
    report: &mut TablePartitioning,
) -> Result<()> {
    let t = table.sql_name();
    let new = format!("omnibox_new_{t}");
    exec(conn, format!("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE")).await?;
    let (rows, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(sqlx::AssertSqlSafe(
        format!("SELECT count(*), min(created_at) FROM {t}"),
    ))
    .fetch_one(&mut *conn)
    .await
    .map_err(storage)?;
    let rows = u64::try_from(rows).unwrap_or(0);
    let now = db_now(conn).await?;
    if let Some(oldest) = oldest {
        let span = (opts.period.floor(now) - opts.period.floor(oldest.min(now))).num_seconds()
            / opts.period.length().num_seconds().max(1);
        if span > i64::from(MAX_AHEAD) {
            return Err(Error::Config(format!(
                "{t}'s oldest row was created {}: partitions by {} from then would be {span}, and at most {MAX_AHEAD} are made; clean up the old rows (omnibox cleanup), or choose a longer --partition-period",
                oldest.format("%Y-%m-%d %H:%M"),
                opts.period
            )));
        }
    }
    if let Some(limit) = opts.copy_limit
        && rows > limit
    {
        return Err(Error::Config(format!(
            "{t} holds {rows} rows: converting copies them under a write lock that stops producers and relays meanwhile (about 10 s per million rows); run omnibox cleanup first, or add --force in a maintenance window"
        )));
    }
    // What the plain table carries beside its columns, read before it goes.
    let indexes: Vec<(String, bool)> = sqlx::query_as(
        "SELECT pg_get_indexdef(indexrelid), indisprimary FROM pg_index
          WHERE indrelid = to_regclass($1) ORDER BY indexrelid",
    )
    .bind(t)
    .fetch_all(&mut *conn)
    .await
    .map_err(storage)?;
    let triggers: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger
          WHERE tgrelid = to_regclass($1) AND NOT tgisinternal ORDER BY tgname",
    )
    .bind(t)
    .fetch_all(&mut *conn)
    .await
    .map_err(storage)?;
    let grants: Vec<String> = sqlx::query_scalar(
        "SELECT format('GRANT %s ON %I TO %s', a.privilege_type, c.relname,
                       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END)
           FROM pg_class c, aclexplode(c.relacl) a
          WHERE c.oid = to_regclass($1) AND a.grantee <> c.relowner",
    )
    .bind(t)
    .fetch_all(&mut *conn)
    .await
    .map_err(storage)?;
    let publications: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(pubname) FROM pg_publication_tables
          WHERE schemaname = current_schema() AND tablename = $1",
    )
    .bind(t)
    .fetch_all(&mut *conn)
    .await
    .map_err(storage)?;

    exec(
        conn,
        format!(
            "CREATE TABLE {new} (LIKE {t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY
                 INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY RANGE (created_at)"
        ),
    )
    .await?;
    // Partitions from the oldest row's on; created under the new parent's
    // name-to-be, so they keep their names after the rename below.
    for start in opts.period.starts(oldest.unwrap_or(now), now, opts.ahead) {
        let end = start + opts.period.length();
        let name = partition_name(table, opts.period, start);
        create_partition(conn, &new, &name, start, end).await?;
        report.created.push(name);
    }
    if rows > 0 {
        exec(
            conn,
            format!("INSERT INTO {new} OVERRIDING SYSTEM VALUE SELECT * FROM {t}"),
        )
        .await?;
        report.rows_copied = rows;
    }
    // The identity goes on from where the plain table's stopped.
    exec(
        conn,
        format!(
            "SELECT setval(pg_get_serial_sequence('{new}', 'seq'), v)
               FROM (SELECT greatest(pg_sequence_last_value(pg_get_serial_sequence('{t}', 'seq')::regclass),
                                     (SELECT max(seq) FROM {t})) AS v) s
              WHERE v IS NOT NULL"
        ),
    )
    .await?;
    if table == Table::Outbox {
        exec(
            conn,
            "INSERT INTO omnibox_outbox_keys (idempotency_key, event_id, created_at)
             SELECT idempotency_key, id, created_at FROM outbox_events
              WHERE idempotency_key IS NOT NULL"
                .to_string(),
        )
        .await?;
    }
    exec(conn, format!("DROP TABLE {t}")).await?;
    exec(conn, format!("ALTER TABLE {new} RENAME TO {t}")).await?;
    let seq: Option<String> = sqlx::query_scalar("SELECT pg_get_serial_sequence($1, 'seq')")
        .bind(t)
        .fetch_one(&mut *conn)
        .await
        .map_err(storage)?;
    if let Some(seq) = seq {
        // A name the catalog returned, quoted by it.
        exec(conn, format!("ALTER SEQUENCE {seq} RENAME TO {t}_seq_seq")).await?;
    }
    for (def, primary) in indexes {
        if primary {
            continue;
        }
        // Unique indexes cannot hold across partitions without the
        // partition key: they become plain (the triggers below keep what
        // they guaranteed).
        let def = match def.strip_prefix("CREATE UNIQUE INDEX ") {
            Some(rest) => format!("CREATE INDEX {rest}"),
            None => def,
        };
        exec(conn, def).await?;
    }
    for def in triggers {
        exec(conn, def).await?;
    }
    match table {
        Table::Outbox => {
            exec(
                conn,
                "CREATE TRIGGER outbox_events_key BEFORE INSERT ON outbox_events FOR EACH ROW
                  WHEN (NEW.idempotency_key IS NOT NULL) EXECUTE FUNCTION omnibox_outbox_key()"
                    .to_string(),
            )
            .await?;
            exec(
                conn,
                "CREATE TRIGGER outbox_events_key_gone AFTER DELETE ON outbox_events FOR EACH ROW
                  WHEN (OLD.idempotency_key IS NOT NULL) EXECUTE FUNCTION omnibox_outbox_key_gone()"
                    .to_string(),
            )
            .await?;
        }
        Table::Inbox => {
            exec(
                conn,
                "CREATE TRIGGER inbox_events_dedup BEFORE INSERT ON inbox_events FOR EACH ROW
                  EXECUTE FUNCTION omnibox_inbox_dedup()"
                    .to_string(),
            )
            .await?;
        }
    }
    for grant in grants {
        exec(conn, grant).await?;
    }
    for publication in publications {
        exec(
            conn,
            format!("ALTER PUBLICATION {publication} ADD TABLE {t}"),
        )
        .await?;
        exec(
            conn,
            format!("ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"),
        )
        .await?;
    }
    report.converted = true;
    Ok(())
}

/// The SQLSTATE of a database error.
fn sqlstate(e: &Error) -> Option<String> {
    let source = match e {
        Error::Storage(s)
        | Error::StorageIntegrity(s)
        | Error::StorageTimeout(s)
        | Error::StorageTransaction(s) => s,
        _ => return None,
    };
    source
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

/// A `lock_timeout` setting from a duration (at least a millisecond).
fn lock_timeout_ms(d: Duration) -> String {
    d.as_millis().clamp(1, i32::MAX as u128).to_string()
}

impl PgStore {
    /// Makes the outbox and inbox range-partitioned by `created_at`
    /// (`omnibox migrate --partitioned`; the schema must be migrated).
    /// Tables already partitioned keep their partitions (`ahead` is
    /// updated; another period is refused). A plain table is rebuilt in
    /// one transaction, its rows copied: it holds a write lock meanwhile,
    /// and a table of more than `copy_limit` rows is refused. Partitions
    /// from the current one to `ahead` past it are created.
    pub async fn partition_tables(
        &self,
        opts: &PartitionOptions,
    ) -> Result<Vec<TablePartitioning>> {
        if opts.ahead == 0 || opts.ahead > MAX_AHEAD {
            return Err(Error::Config(format!(
                "partitions ahead must be 1 to {MAX_AHEAD}, not {}",
                opts.ahead
            )));
        }
        let mut conn = super::lock_migrations(&self.pool).await?;
        let result = async {
            let schema_ident: String = sqlx::query_scalar("SELECT quote_ident(current_schema())")
                .fetch_one(&mut *conn)
                .await
                .map_err(storage)?;
            let mut tx = conn.begin().await.map_err(storage)?;
            // Producers and relays wait behind the conversion's locks: a
            // lock not granted soon ends it (nothing changed) rather than
            // queueing them for the statement timeout.
            exec(
                &mut tx,
                format!("SET LOCAL lock_timeout = {}", lock_timeout_ms(CONVERT_LOCK_TIMEOUT)),
            )
            .await?;
            for ddl in [
                "CREATE TABLE IF NOT EXISTS omnibox_partitioning (
                    table_name varchar(20) PRIMARY KEY
                        CHECK (table_name IN ('outbox_events', 'inbox_events')),
                    period     varchar(10) NOT NULL CHECK (period IN ('hour', 'day', 'week')),
                    ahead      integer     NOT NULL CHECK (ahead BETWEEN 1 AND 1000)
                )",
                "CREATE TABLE IF NOT EXISTS omnibox_outbox_keys (
                    idempotency_key varchar(128) PRIMARY KEY,
                    event_id        uuid         NOT NULL,
                    created_at      timestamptz  NOT NULL
                )",
                "CREATE INDEX IF NOT EXISTS omnibox_outbox_keys_created ON omnibox_outbox_keys (created_at)",
            ] {
                exec(&mut tx, ddl.to_string()).await?;
            }
            for ddl in trigger_functions(&schema_ident) {
                exec(&mut tx, ddl).await?;
            }
            let mut out = Vec::with_capacity(2);
            for table in Table::ALL {
                out.push(convert(&mut tx, table, opts).await?);
            }
            tx.commit().await.map_err(storage)?;
            Ok(out)
        }
        .await;
        super::unlock_migrations(&mut conn).await;
        result.map_err(|e| {
            if sqlstate(&e).is_some_and(|c| c == "55P03") {
                Error::Config(format!(
                    "the outbox or inbox table stayed in use for {} s, so nothing changed: run migrate --partitioned when producers and relays are quiet (or stopped)",
                    CONVERT_LOCK_TIMEOUT.as_secs()
                ))
            } else {
                e
            }
        })
    }

    /// What `partition_tables` would refuse that can be told before the
    /// migrations run (so that a refusal changes nothing): another period
    /// than the recorded one, or a plain table over `copy_limit` rows.
    pub async fn check_partitioning(&self, opts: &PartitionOptions) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        for p in recorded(&mut conn).await? {
            if p.period != opts.period {
                return Err(Error::Config(format!(
                    "{} is partitioned by {} already; its period cannot change (run with --partition-period {})",
                    p.table.sql_name(),
                    p.period,
                    p.period
                )));
            }
        }
        let Some(limit) = opts.copy_limit else {
            return Ok(());
        };
        for table in Table::ALL {
            let t = table.sql_name();
            let plain: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass($1) AND relkind = 'r')",
            )
            .bind(t)
            .fetch_one(&mut *conn)
            .await
            .map_err(storage)?;
            if !plain {
                continue;
            }
            // Counted up to the limit only: cheap on a table of any size.
            let over: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) > $1 FROM (SELECT 1 FROM {t} LIMIT $1 + 1) s"
            )))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX - 1))
            .fetch_one(&mut *conn)
            .await
            .map_err(storage)?;
            if over {
                return Err(Error::Config(format!(
                    "{t} holds more than {limit} rows: converting copies them under a write lock that stops producers and relays meanwhile (about 10 s per million rows); run omnibox cleanup first, or add --force in a maintenance window"
                )));
            }
        }
        Ok(())
    }

    /// The partitioned tables and their settings (empty when neither is).
    pub async fn partitioning(&self) -> Result<Vec<Partitioning>> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        recorded(&mut conn).await
    }

    /// Creates the partitions missing from the current one to `ahead` past
    /// it, for each partitioned table; returns their names. Cheap when
    /// nothing is missing (one catalog lookup per partition). Each
    /// creation waits at most `lock_timeout` for the table's lock.
    pub async fn ensure_partitions(&self, lock_timeout: Duration) -> Result<Vec<String>> {
        self.ensure_partitions_from(None, lock_timeout).await
    }

    /// As [`PgStore::ensure_partitions`], from the partition holding `from`
    /// (earlier than now: for rows written with an older `created_at`,
    /// such as an event re-inserted from its dead letter). More than
    /// [`MAX_AHEAD`] partitions to create is refused.
    pub async fn ensure_partitions_from(
        &self,
        from: Option<DateTime<Utc>>,
        lock_timeout: Duration,
    ) -> Result<Vec<String>> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        let mut created = Vec::new();
        for p in recorded(&mut conn).await? {
            let mut tx = conn.begin().await.map_err(storage)?;
            exec(
                &mut tx,
                format!("SET LOCAL lock_timeout = {}", lock_timeout_ms(lock_timeout)),
            )
            .await?;
            let now = db_now(&mut tx).await?;
            let from = from.unwrap_or(now).min(now);
            let span = (p.period.floor(now) - p.period.floor(from)).num_seconds()
                / p.period.length().num_seconds().max(1);
            if span > i64::from(MAX_AHEAD) {
                return Err(Error::Config(format!(
                    "from {} to now is {span} partitions of {} by {}: at most {MAX_AHEAD} are created at once; give a later date",
                    from.format("%Y-%m-%d %H:%M"),
                    p.table,
                    p.period
                )));
            }
            tx.commit().await.map_err(storage)?;
            // One transaction per partition: a creation that meets another
            // process's (a relay's, a cron's) leaves the rest to do.
            for start in p.period.starts(from, now, p.ahead) {
                let end = start + p.period.length();
                let name = partition_name(p.table, p.period, start);
                let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                    .bind(&name)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(storage)?;
                if exists {
                    continue;
                }
                let mut tx = conn.begin().await.map_err(storage)?;
                exec(
                    &mut tx,
                    format!("SET LOCAL lock_timeout = {}", lock_timeout_ms(lock_timeout)),
                )
                .await?;
                match create_partition(
                    &mut tx,
                    p.table.sql_name(),
                    &name,
                    end - p.period.length(),
                    end,
                )
                .await
                {
                    Ok(()) => {
                        tx.commit().await.map_err(storage)?;
                        created.push(name);
                    }
                    // Made by another process meanwhile (42P07, or 23505 on
                    // the catalog when both created it at once), or the range
                    // is covered by a partition made by hand (42P17).
                    Err(e)
                        if sqlstate(&e)
                            .is_some_and(|c| c == "42P07" || c == "23505" || c == "42P17") =>
                    {
                        tx.rollback().await.map_err(storage)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(created)
    }

    /// Every partition of the outbox and inbox, oldest first per table.
    pub async fn partitions(&self) -> Result<Vec<PartitionInfo>> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        let periods = recorded(&mut conn).await?;
        let rows = sqlx::query(
            "SELECT p.relname AS parent, c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound,
                    greatest(c.reltuples, 0)::int8 AS rows, pg_total_relation_size(c.oid) AS bytes,
                    EXISTS (SELECT 1 FROM pg_index x JOIN pg_attribute a
                              ON a.attrelid = c.oid AND a.attnum = x.indkey[0] AND a.attname = 'id'
                             WHERE x.indrelid = c.oid AND x.indisunique AND x.indnkeyatts = 1) AS keyed
               FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
              WHERE i.inhparent IN (to_regclass('outbox_events'), to_regclass('inbox_events'))
              ORDER BY p.relname DESC, c.relname",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(storage)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let parent: String = r.try_get("parent").map_err(storage)?;
            let name: String = r.try_get("name").map_err(storage)?;
            let table = if parent == "outbox_events" {
                Table::Outbox
            } else {
                Table::Inbox
            };
            let start = periods.iter().find(|p| p.table == table).and_then(|p| {
                Some((
                    p.period,
                    p.period
                        .parse_suffix(name.strip_prefix(&format!("{parent}_p"))?)?,
                ))
            });
            out.push(PartitionInfo {
                table: table.to_string(),
                from: start.map(|(_, s)| s),
                to: start.map(|(p, s)| s + p.length()),
                bound: r.try_get("bound").map_err(storage)?,
                rows_estimate: u64::try_from(r.try_get::<i64, _>("rows").map_err(storage)?)
                    .unwrap_or(0),
                bytes: u64::try_from(r.try_get::<i64, _>("bytes").map_err(storage)?).unwrap_or(0),
                keyed: r.try_get("keyed").map_err(storage)?,
                name,
            });
        }
        Ok(out)
    }

    /// Drops `table`'s partitions whose whole range is older than
    /// `older_than` and whose every row is past retention: completed more
    /// than `older_than` ago, or (with `include_failed`) failed more than
    /// `failed_older_than` ago. A partition holding a pending row, a
    /// failed row kept, or a row completed since is kept, with why (the
    /// row-by-row cleanup then deletes what is past retention in it).
    ///
    /// Each drop is one transaction: the partition is detached (a lock on
    /// the table, waited for at most `lock_timeout`), checked again under
    /// that lock (a `replay` may have requeued a row meanwhile), and
    /// dropped; a kill at any moment leaves it attached or gone, never
    /// detached. The outbox's idempotency keys of its rows are released
    /// first (as deleting the rows would).
    pub async fn retire_partitions(&self, table: Table, opts: &RetireOptions) -> Result<Retired> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        let mut retired = Retired::default();
        let Some(p) = recorded(&mut conn)
            .await?
            .into_iter()
            .find(|p| p.table == table)
        else {
            return Ok(retired);
        };
        let parent = table.sql_name();
        let now = db_now(&mut conn).await?;
        // A retention longer than time itself retires nothing.
        let Some(cutoff) = chrono::Duration::from_std(opts.older_than)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
        else {
            return Ok(retired);
        };
        let parts: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = to_regclass($1) ORDER BY c.relname",
        )
        .bind(parent)
        .fetch_all(&mut *conn)
        .await
        .map_err(storage)?;
        let prefix = format!("{parent}_p");
        for name in parts {
            let Some(start) = name
                .strip_prefix(&prefix)
                .and_then(|s| p.period.parse_suffix(s))
            else {
                continue;
            };
            let end = start + p.period.length();
            if end > cutoff {
                continue;
            }
            // A partition another cleanup dropped meanwhile is skipped.
            let gone = |e: &Error| sqlstate(e).is_some_and(|c| c == "42P01");
            match blocker(&mut conn, &name, opts).await {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    retired.kept.push(KeptPartition { name, reason });
                    continue;
                }
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            }
            let counted: Result<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed') FROM {name}"
            )))
            .fetch_one(&mut *conn)
            .await
            .map_err(storage);
            let (completed, failed) = match counted {
                Ok(c) => c,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if !opts.dry_run {
                let mut tx = conn.begin().await.map_err(storage)?;
                exec(
                    &mut tx,
                    format!(
                        "SET LOCAL lock_timeout = {}",
                        lock_timeout_ms(opts.lock_timeout)
                    ),
                )
                .await?;
                let detached = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE {parent} DETACH PARTITION {name}"
                )))
                .execute(&mut *tx)
                .await;
                if let Err(e) = detached {
                    let busy = e
                        .as_database_error()
                        .and_then(|d| d.code())
                        .is_some_and(|c| c == "55P03");
                    if busy {
                        // Each wait queues every producer and relay behind
                        // it: one is enough for this run.
                        retired.kept.push(KeptPartition {
                            name,
                            reason: format!(
                                "the table stayed busy for {} ms (lock_timeout): this and older partitions wait for the next cleanup",
                                opts.lock_timeout.as_millis()
                            ),
                        });
                        break;
                    }
                    // Detached or dropped by another cleanup meanwhile.
                    let e = storage(e);
                    if gone(&e) {
                        continue;
                    }
                    return Err(e);
                }
                if let Some(reason) = blocker(&mut tx, &name, opts).await? {
                    tx.rollback().await.map_err(storage)?;
                    retired.kept.push(KeptPartition { name, reason });
                    continue;
                }
                if table == Table::Outbox {
                    // The keys of its rows go with them, in the same
                    // transaction (a drop rolled back keeps them). Read
                    // from the partition's key index: cheap without keys.
                    exec(
                        &mut tx,
                        format!(
                            "DELETE FROM omnibox_outbox_keys k USING {name} o
                              WHERE o.idempotency_key IS NOT NULL
                                AND k.idempotency_key = o.idempotency_key AND k.event_id = o.id"
                        ),
                    )
                    .await?;
                }
                exec(&mut tx, format!("DROP TABLE {name}")).await?;
                tx.commit().await.map_err(storage)?;
            }
            retired.completed += u64::try_from(completed).unwrap_or(0);
            retired.failed += u64::try_from(failed).unwrap_or(0);
            retired.partitions.push(name);
        }
        Ok(retired)
    }
}

/// Why partition `name` must stay, if it must: it holds a pending row, a
/// failed row not past retention, or a row completed within it. Each test
/// reads one of the table's small partial indexes.
async fn blocker(
    conn: &mut PgConnection,
    name: &str,
    opts: &RetireOptions,
) -> Result<Option<String>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM {name} WHERE status = 'pending') AS pending,
                EXISTS (SELECT 1 FROM {name} WHERE status = 'failed'
                         AND NOT ($1 AND updated_at < now() - make_interval(secs => $2))) AS failed,
                EXISTS (SELECT 1 FROM {name} WHERE status = 'completed'
                         AND completed_at >= now() - make_interval(secs => $3)) AS young"
    )))
    .bind(opts.include_failed)
    .bind(opts.failed_older_than.as_secs_f64())
    .bind(opts.older_than.as_secs_f64())
    .fetch_one(&mut *conn)
    .await
    .map_err(storage)?;
    let flag = |c: &str| row.try_get::<bool, _>(c).map_err(storage);
    Ok(if flag("pending")? {
        Some("it holds pending rows".to_string())
    } else if flag("failed")? {
        Some(if opts.include_failed {
            "it holds failed rows younger than --failed-older-than".to_string()
        } else {
            "it holds failed rows (add --include-failed to retire them)".to_string()
        })
    } else if flag("young")? {
        Some("it holds rows completed within the retention".to_string())
    } else {
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn periods_floor_name_and_read_back() {
        let t = at("2026-12-09T13:45:10Z"); // a Wednesday
        assert_eq!(Period::Hour.floor(t), at("2026-12-09T13:00:00Z"));
        assert_eq!(Period::Day.floor(t), at("2026-12-09T00:00:00Z"));
        assert_eq!(Period::Week.floor(t), at("2026-12-07T00:00:00Z"));
        for p in [Period::Hour, Period::Day, Period::Week] {
            let start = p.floor(t);
            let name = partition_name(Table::Outbox, p, start);
            let suffix = name.strip_prefix("outbox_events_p").unwrap();
            assert_eq!(p.parse_suffix(suffix), Some(start), "{name}");
            assert_eq!(p.floor(start + p.length()), start + p.length());
            assert_eq!(Period::parse(p.as_str()), Some(p));
        }
        assert_eq!(
            partition_name(Table::Inbox, Period::Hour, at("2026-12-09T07:00:00Z")),
            "inbox_events_p2026120907"
        );
        // Names that are not a period's own are not read as one.
        for (p, s) in [
            (Period::Day, "2026120"),
            (Period::Day, "2026129a"),
            (Period::Day, "20261399"),
            (Period::Hour, "2026120925"),
            (Period::Week, "20261209"), // a Wednesday: no week starts there
            (Period::Day, "2026120907"),
            (Period::Day, ""),
            (Period::Day, "+2026120"),
        ] {
            assert_eq!(p.parse_suffix(s), None, "{p} {s}");
        }
        assert_eq!(
            literal(at("2026-12-09T00:00:00Z")),
            "'2026-12-09 00:00:00+00'"
        );
    }
}
