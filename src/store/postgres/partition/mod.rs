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

mod ahead;
mod convert;
mod retire;

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveTime, TimeZone, Utc};
use serde::Serialize;
use sqlx::{PgConnection, Row};

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
