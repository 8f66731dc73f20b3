//! `migrate --partitioned`: a plain table rebuilt as a partitioned one, in
//! one transaction, with everything it carried.

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};

use super::ahead::{create_partition, create_range};
use super::*;
use crate::error::{Result, storage};
use crate::model::Table;
use crate::store::postgres::PgStore;

/// The DDL of the trigger functions a partitioned table needs, with the
/// schema's name pinned (`search_path`) so that a session with another
/// search path inserting into `schema.outbox_events` still finds
/// `omnibox_outbox_keys`.
fn trigger_functions(schema_ident: &str) -> [String; 3] {
    [
        ("omnibox_outbox_key", OUTBOX_KEY),
        ("omnibox_outbox_key_gone", OUTBOX_KEY_GONE),
        ("omnibox_inbox_dedup", INBOX_DEDUP),
    ]
    .map(|(name, body)| {
        format!(
            "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql
             SET search_path = {schema_ident} AS $$
             BEGIN
{body}
             END
             $$"
        )
    })
}

/// Records an outbox row's idempotency key as it is inserted; a row whose
/// key or id is taken is not inserted.
const OUTBOX_KEY: &str =
    "                 -- A row whose id is taken is not inserted: its key must not
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
                 RETURN NEW;";

/// Forgets a deleted outbox row's idempotency key.
const OUTBOX_KEY_GONE: &str = "                 DELETE FROM omnibox_outbox_keys
                  WHERE idempotency_key = OLD.idempotency_key AND event_id = OLD.id;
                 RETURN NULL;";

/// Skips an inbox row whose message the consumer group has already.
const INBOX_DEDUP: &str = "                 PERFORM pg_advisory_xact_lock(hashtextextended(
                     'omnibox_inbox' || chr(1) || NEW.consumer_group || chr(1) || NEW.message_id, 0));
                 IF EXISTS (SELECT 1 FROM inbox_events
                             WHERE message_id = NEW.message_id AND consumer_group = NEW.consumer_group) THEN
                     RETURN NULL;
                 END IF;
                 RETURN NEW;";

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
    // One row, or none if there is no such table.
    let sql = "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)";
    let kind = texts_of(conn, sql, t).await?.into_iter().next();
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
            let sql = "SELECT period FROM omnibox_partitioning WHERE table_name = $1";
            let had = texts_of(conn, sql, t).await?.into_iter().next();
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
    let triggers = texts_of(
        conn,
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger
          WHERE tgrelid = to_regclass($1) AND NOT tgisinternal ORDER BY tgname",
        t,
    )
    .await?;
    let grants = texts_of(
        conn,
        "SELECT format('GRANT %s ON %I TO %s', a.privilege_type, c.relname,
                       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END)
           FROM pg_class c, aclexplode(c.relacl) a
          WHERE c.oid = to_regclass($1) AND a.grantee <> c.relowner",
        t,
    )
    .await?;
    let publications = texts_of(
        conn,
        "SELECT quote_ident(pubname) FROM pg_publication_tables
          WHERE schemaname = current_schema() AND tablename = $1",
        t,
    )
    .await?;

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
    let key_triggers: &[&str] = match table {
        Table::Outbox => &[
            "CREATE TRIGGER outbox_events_key BEFORE INSERT ON outbox_events FOR EACH ROW
                  WHEN (NEW.idempotency_key IS NOT NULL) EXECUTE FUNCTION omnibox_outbox_key()",
            "CREATE TRIGGER outbox_events_key_gone AFTER DELETE ON outbox_events FOR EACH ROW
                  WHEN (OLD.idempotency_key IS NOT NULL) EXECUTE FUNCTION omnibox_outbox_key_gone()",
        ],
        Table::Inbox => &["CREATE TRIGGER inbox_events_dedup BEFORE INSERT ON inbox_events FOR EACH ROW
                  EXECUTE FUNCTION omnibox_inbox_dedup()"],
    };
    for def in key_triggers {
        exec(conn, def.to_string()).await?;
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
        let mut conn = crate::store::postgres::lock_migrations(&self.pool).await?;
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
        crate::store::postgres::unlock_migrations(&mut conn).await;
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
}

/// The texts that `sql` reads of table `t` (its one parameter), one a row.
async fn texts_of(conn: &mut PgConnection, sql: &'static str, t: &str) -> Result<Vec<String>> {
    sqlx::query_scalar(sql)
        .bind(t)
        .fetch_all(conn)
        .await
        .map_err(storage)
}
