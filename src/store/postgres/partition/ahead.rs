//! Partitions made ahead of time, and what is there: the recorded
//! settings and the list of partitions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, Row};

use super::*;
use crate::error::{Result, storage};
use crate::model::Table;
use crate::store::postgres::PgStore;

/// Creates the partition `name` of `parent` for `[start, end)`, with its
/// primary key on `id`. The key is the partition's own: a partitioned
/// table's key would have to hold `created_at`, and then the planner,
/// without statistics (a new partition has none until autovacuum analyzes
/// it), could not tell that an id matches one row, and read the partition
/// whole to find a batch's ids.
pub(super) async fn create_partition(
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
pub(super) async fn create_range(
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

impl PgStore {
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
}
