//! Dead letters kept in the database: the `omnibox_dead_letters` table
//! (created by `migrate`), a `DeadLetterStore` for the processors and the
//! consumer (`--dlq table` on the CLI), listed by `omnibox list --table
//! dead-letters` and brought back by `omnibox replay --table dead-letters`.
//!
//! A letter is a copy of the event taken when it became `failed` (status,
//! attempts and error as they were then). The event's own row stays the
//! record of the failure; the letter outlives it (`cleanup --include-failed`
//! may delete the row) and is how a failure is found and replayed later.
//! Replaying a letter requeues the event's row if it is still `failed`, or
//! re-inserts the event from the copy if the row is gone, and marks the
//! letter replayed, in one transaction with its audit entry. Requeueing the
//! row itself (`omnibox replay --table outbox`) marks its open letter
//! replayed too.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::Row;
use uuid::Uuid;

use super::audit::{AuditEntry, check, insert_pg, insert_sqlite};
use super::{AnyStore, BulkOutcome, postgres, sqlite, stored_error, topic_column};
use crate::error::{Error, Result, storage};
use crate::model::{Event, EventStatus, InboxRoute, OutboxRoute, Route, Table, Timestamp, time};

/// The table's name.
pub const DEAD_LETTERS_TABLE: &str = "omnibox_dead_letters";

/// Name of the dead-letter "table" in audit entries and CLI output.
pub const DEAD_LETTERS: &str = "dead-letters";

/// One row of `omnibox_dead_letters`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterRecord {
    /// The letter's id.
    pub id: Uuid,
    /// The order letters were written in.
    pub seq: i64,
    /// The table of the event.
    pub origin: Table,
    /// The event's id (its row in `origin`).
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// The event's topic (outbox) or source (inbox).
    pub topic: String,
    /// Counted attempts when it failed.
    pub attempts_made: i32,
    /// The error that made it fail.
    pub error: String,
    /// The event as it was when it failed (the columns of its row, as JSON).
    pub event: Value,
    /// When the letter was written.
    #[serde(with = "crate::model::time::serde_ts")]
    pub dead_at: Timestamp,
    /// When it was replayed; `None` while it is open.
    #[serde(with = "crate::model::time::serde_ts::option")]
    pub replayed_at: Option<Timestamp>,
}

/// Which letters [`DeadLetterTable::list`] returns; every field narrows.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Letters with these ids, or of events with these ids.
    pub ids: Vec<Uuid>,
    /// Letters of this table's events.
    pub origin: Option<Table>,
    /// Letters of this event type.
    pub event_type: Option<String>,
    /// Letters of this topic (outbox) or source (inbox).
    pub topic: Option<String>,
    /// Letters of inbox events of this consumer group.
    pub consumer_group: Option<String>,
    /// Letters whose error contains this text.
    pub error_contains: Option<String>,
    /// Letters written at or after this time.
    pub since: Option<Timestamp>,
    /// Letters written before this time.
    pub until: Option<Timestamp>,
    /// Only letters not replayed yet.
    pub open_only: bool,
    /// Letters after this `seq` (paging).
    pub after_seq: Option<i64>,
    /// Most letters, oldest first; `None` for all.
    pub limit: Option<u32>,
}

/// What [`DeadLetterTable::replay`] did.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterReplay {
    /// Letters whose event is pending again (and which are now replayed).
    pub replayed: Vec<DeadLetterRecord>,
    /// Letters closed without bringing their event back, because it is
    /// back already (its row is pending or completed, or a newer row holds
    /// its idempotency key or message id), with why. They are marked
    /// replayed too: nothing is left to do for them.
    pub closed: Vec<(DeadLetterRecord, String)>,
    /// Letters left open, with why (none in practice: every selected
    /// letter is replayed or closed).
    pub left: Vec<(DeadLetterRecord, String)>,
}

/// The `omnibox_dead_letters` table of a store.
#[derive(Debug, Clone)]
pub struct DeadLetterTable {
    store: AnyStore,
}

impl DeadLetterTable {
    /// The dead letters of `store` (its schema must be migrated).
    pub fn new(store: impl Into<AnyStore>) -> Self {
        DeadLetterTable {
            store: store.into(),
        }
    }

    /// Letters matching `filter`, oldest first.
    pub async fn list(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetterRecord>> {
        let limit = filter.limit.map_or(i64::MAX, i64::from);
        let origin = filter.origin.map(|t| t.to_string());
        match &self.store {
            AnyStore::Postgres(s) => {
                let ids = (!filter.ids.is_empty()).then_some(&filter.ids);
                sqlx::query(
                    "SELECT id, seq, origin, event_id, event_type, topic, attempts_made, error, event::text AS event, dead_at, replayed_at
                     FROM omnibox_dead_letters
                     WHERE ($1::uuid[] IS NULL OR id = ANY($1) OR event_id = ANY($1))
                       AND ($2::text IS NULL OR origin = $2)
                       AND ($3::text IS NULL OR event_type = $3)
                       AND ($4::text IS NULL OR topic = $4)
                       AND ($5::text IS NULL OR strpos(error, $5) > 0)
                       AND ($6::timestamptz IS NULL OR dead_at >= $6)
                       AND ($7::timestamptz IS NULL OR dead_at < $7)
                       AND (NOT $8 OR replayed_at IS NULL)
                       AND ($9::bigint IS NULL OR seq > $9)
                       AND ($11::text IS NULL OR (origin = 'inbox' AND event->>'consumer_group' = $11))
                     ORDER BY seq LIMIT $10",
                )
                .bind(ids)
                .bind(origin)
                .bind(&filter.event_type)
                .bind(&filter.topic)
                .bind(&filter.error_contains)
                .bind(filter.since)
                .bind(filter.until)
                .bind(filter.open_only)
                .bind(filter.after_seq)
                .bind(limit)
                .bind(&filter.consumer_group)
                .fetch_all(s.pool())
                .await
                .map_err(storage)?
                .iter()
                .map(decode_pg)
                .collect()
            }
            AnyStore::Sqlite(s) => {
                let ids = (!filter.ids.is_empty()).then(|| sqlite::id_array(&filter.ids));
                sqlx::query(
                    "SELECT id, seq, origin, event_id, event_type, topic, attempts_made, error, event, dead_at, replayed_at
                     FROM omnibox_dead_letters
                     WHERE (?1 IS NULL OR id IN (SELECT value FROM json_each(?1)) OR event_id IN (SELECT value FROM json_each(?1)))
                       AND (?2 IS NULL OR origin = ?2)
                       AND (?3 IS NULL OR event_type = ?3)
                       AND (?4 IS NULL OR topic = ?4)
                       AND (?5 IS NULL OR instr(error, ?5) > 0)
                       AND (?6 IS NULL OR dead_at >= ?6)
                       AND (?7 IS NULL OR dead_at < ?7)
                       AND (NOT ?8 OR replayed_at IS NULL)
                       AND (?9 IS NULL OR seq > ?9)
                       AND (?11 IS NULL OR (origin = 'inbox' AND json_extract(event, '$.consumer_group') = ?11))
                     ORDER BY seq LIMIT ?10",
                )
                .bind(ids)
                .bind(origin)
                .bind(&filter.event_type)
                .bind(&filter.topic)
                .bind(&filter.error_contains)
                .bind(filter.since.map(|t| time::format(&t)))
                .bind(filter.until.map(|t| time::format(&t)))
                .bind(filter.open_only)
                .bind(filter.after_seq)
                .bind(limit)
                .bind(&filter.consumer_group)
                .fetch_all(s.pool())
                .await
                .map_err(storage)?
                .iter()
                .map(decode_sqlite)
                .collect()
            }
        }
    }

    /// Brings the events of the open letters `ids` back: a row still
    /// `failed` is requeued (attempts reset, error cleared, due now), a
    /// row that is gone is re-inserted from the letter's copy as a new
    /// pending row. The letters done are marked replayed, and `entry`
    /// recorded (with the events' ids), in the same transaction; letters
    /// whose event is back already are closed, with why. Ids of
    /// replayed or unknown letters are ignored.
    pub async fn replay(&self, ids: &[Uuid], mut entry: AuditEntry) -> Result<DeadLetterReplay> {
        check(&entry)?;
        entry.table = Some(DEAD_LETTERS.to_string());
        match &self.store {
            AnyStore::Postgres(s) => {
                let mut tx = s.pool().begin().await.map_err(storage)?;
                let letters: Vec<DeadLetterRecord> = sqlx::query(
                    "SELECT id, seq, origin, event_id, event_type, topic, attempts_made, error, event::text AS event, dead_at, replayed_at
                     FROM omnibox_dead_letters WHERE id = ANY($1) AND replayed_at IS NULL ORDER BY seq FOR UPDATE",
                )
                .bind(ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(storage)?
                .iter()
                .map(decode_pg)
                .collect::<Result<_>>()?;
                let mut back = HashMap::new();
                for table in [Table::Outbox, Table::Inbox] {
                    let events: Vec<Uuid> = letters
                        .iter()
                        .filter(|l| l.origin == table)
                        .map(|l| l.event_id)
                        .collect();
                    if events.is_empty() {
                        continue;
                    }
                    let t = table.sql_name();
                    let requeued: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "UPDATE {t} SET status = 'pending', attempts_made = 0, last_error = NULL, \
                         scheduled_at = now(), updated_at = now() \
                         WHERE id = ANY($1) AND status = 'failed' RETURNING id"
                    )))
                    .bind(&events)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(storage)?;
                    let present: Vec<(Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(
                        format!("SELECT id, status FROM {t} WHERE id = ANY($1)"),
                    ))
                    .bind(&events)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(storage)?;
                    let missing = missing_events(&letters, table, &present);
                    let inserted = match table {
                        Table::Outbox => {
                            let ev = revive::<OutboxRoute>(&missing)?;
                            postgres::insert_outbox(&mut tx, &ev).await?
                        }
                        Table::Inbox => {
                            let ev = revive::<InboxRoute>(&missing)?;
                            postgres::insert_inbox(&mut tx, &ev).await?
                        }
                    };
                    settle(table, &requeued, &present, &missing, &inserted, &mut back);
                }
                let report = split(letters, back);
                if report.replayed.is_empty() && report.closed.is_empty() {
                    tx.rollback().await.map_err(storage)?;
                    return Ok(report);
                }
                let done = report.done();
                sqlx::query(
                    "UPDATE omnibox_dead_letters SET replayed_at = now() WHERE id = ANY($1)",
                )
                .bind(&done)
                .execute(&mut *tx)
                .await
                .map_err(storage)?;
                fill_entry(&mut entry, &report);
                insert_pg(&mut tx, &entry).await?;
                tx.commit().await.map_err(storage)?;
                Ok(report)
            }
            AnyStore::Sqlite(s) => {
                // The write lock first: the letters read are then the ones
                // this transaction changes (no other replay in between).
                let mut tx = s
                    .pool()
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(storage)?;
                let now = time::format(&time::now());
                let letters: Vec<DeadLetterRecord> = sqlx::query(
                    "SELECT id, seq, origin, event_id, event_type, topic, attempts_made, error, event, dead_at, replayed_at
                     FROM omnibox_dead_letters
                     WHERE id IN (SELECT value FROM json_each(?1)) AND replayed_at IS NULL ORDER BY seq",
                )
                .bind(sqlite::id_array(ids))
                .fetch_all(&mut *tx)
                .await
                .map_err(storage)?
                .iter()
                .map(decode_sqlite)
                .collect::<Result<_>>()?;
                let mut back = HashMap::new();
                for table in [Table::Outbox, Table::Inbox] {
                    let events: Vec<Uuid> = letters
                        .iter()
                        .filter(|l| l.origin == table)
                        .map(|l| l.event_id)
                        .collect();
                    if events.is_empty() {
                        continue;
                    }
                    let t = table.sql_name();
                    let requeued: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "UPDATE {t} SET status = 'pending', attempts_made = 0, last_error = NULL, \
                         scheduled_at = ?2, updated_at = ?2 \
                         WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'failed' RETURNING id"
                    )))
                    .bind(sqlite::id_array(&events))
                    .bind(&now)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(storage)?;
                    let present: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(
                        format!(
                            "SELECT id, status FROM {t} WHERE id IN (SELECT value FROM json_each(?1))"
                        ),
                    ))
                    .bind(sqlite::id_array(&events))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(storage)?;
                    let requeued = parse_ids(&requeued)?;
                    let present = present
                        .into_iter()
                        .map(|(id, status)| Ok((parse_id(&id)?, status)))
                        .collect::<Result<Vec<_>>>()?;
                    let missing = missing_events(&letters, table, &present);
                    let inserted = match table {
                        Table::Outbox => {
                            let ev = revive::<OutboxRoute>(&missing)?;
                            sqlite::insert_outbox(&mut tx, &ev).await?
                        }
                        Table::Inbox => {
                            let ev = revive::<InboxRoute>(&missing)?;
                            sqlite::insert_inbox(&mut tx, &ev).await?
                        }
                    };
                    settle(table, &requeued, &present, &missing, &inserted, &mut back);
                }
                let report = split(letters, back);
                if report.replayed.is_empty() && report.closed.is_empty() {
                    tx.rollback().await.map_err(storage)?;
                    return Ok(report);
                }
                let done = report.done();
                sqlx::query(
                    "UPDATE omnibox_dead_letters SET replayed_at = ?2 WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .bind(sqlite::id_array(&done))
                .bind(&now)
                .execute(&mut *tx)
                .await
                .map_err(storage)?;
                fill_entry(&mut entry, &report);
                insert_sqlite(&mut tx, &entry).await?;
                tx.commit().await.map_err(storage)?;
                Ok(report)
            }
        }
    }

    /// How many letters are open (not replayed), of `origin`'s events or
    /// of all: failures nobody has dealt with yet (read from the
    /// open-letter index).
    pub async fn count_open(&self, origin: Option<Table>) -> Result<u64> {
        let origin = origin.map(|t| t.to_string());
        let n: i64 = match &self.store {
            AnyStore::Postgres(s) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM omnibox_dead_letters
                     WHERE replayed_at IS NULL AND ($1::text IS NULL OR origin = $1)",
                )
                .bind(origin)
                .fetch_one(s.pool())
                .await
            }
            AnyStore::Sqlite(s) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM omnibox_dead_letters
                     WHERE replayed_at IS NULL AND (?1 IS NULL OR origin = ?1)",
                )
                .bind(origin)
                .fetch_one(s.pool())
                .await
            }
        }
        .map_err(storage)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Deletes letters replayed more than `older_than` ago, `batch_size`
    /// per statement; returns how many (run by `cleanup`). Open letters are
    /// never deleted here: they are failures nobody has dealt with yet.
    pub async fn delete_replayed_older(
        &self,
        older_than: std::time::Duration,
        batch_size: u32,
    ) -> Result<u64> {
        self.store
            .delete_older_in_batches(
                "DELETE FROM omnibox_dead_letters WHERE id IN (
                     SELECT id FROM omnibox_dead_letters
                     WHERE replayed_at < now() - make_interval(secs => $1)
                     ORDER BY replayed_at LIMIT $2)",
                "DELETE FROM omnibox_dead_letters WHERE seq IN (
                     SELECT seq FROM omnibox_dead_letters
                     WHERE replayed_at < ?1 ORDER BY replayed_at LIMIT ?2)",
                older_than,
                batch_size,
            )
            .await
    }

    /// Writes the letters of `table`'s events whose rows are `failed` now
    /// (a row requeued meanwhile needs no letter: its event is back); the
    /// rows are share-locked (PostgreSQL) or the database write-locked
    /// (SQLite) until the letters are in, so a requeue cannot slip between
    /// the check and the insert. Returns how many letters are settled. A
    /// batch the database refuses is written one letter at a time, so one
    /// bad letter does not cost the others.
    async fn put_rows(&self, table: Table, rows: Vec<NewLetter>) -> Result<usize> {
        if rows.is_empty() {
            return Ok(0);
        }
        let n = rows.len();
        match self.insert_rows(table, &rows).await {
            Ok(()) => Ok(n),
            Err(e) if n > 1 && matches!(e, Error::StorageIntegrity(_)) => {
                let mut kept = 0;
                for r in rows {
                    let id = r.event_id;
                    match self.insert_rows(table, std::slice::from_ref(&r)).await {
                        Ok(()) => kept += 1,
                        Err(e) => {
                            tracing::error!(event_id = %id, error = %e, "the database refused this dead letter (the row is failed in its table)")
                        }
                    }
                }
                Ok(kept)
            }
            Err(e) => Err(e),
        }
    }

    async fn insert_rows(&self, table: Table, rows: &[NewLetter]) -> Result<()> {
        let t = table.sql_name();
        match &self.store {
            AnyStore::Postgres(s) => {
                let mut cols = PgColumns::default();
                for r in rows {
                    cols.push(r);
                }
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "WITH held AS (
                         SELECT id FROM {t} WHERE id = ANY($3) AND status = 'failed' FOR SHARE
                     )
                     INSERT INTO omnibox_dead_letters (id, origin, event_id, event_type, topic, attempts_made, error, event)
                     SELECT l.id, l.origin, l.event_id, l.event_type, l.topic, l.attempts_made, l.error, l.event::jsonb
                     FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::int4[], $7::text[], $8::text[])
                          AS l(id, origin, event_id, event_type, topic, attempts_made, error, event)
                     WHERE l.event_id IN (SELECT id FROM held)
                     ON CONFLICT DO NOTHING"
                )))
                .bind(cols.id)
                .bind(cols.origin)
                .bind(cols.event_id)
                .bind(cols.event_type)
                .bind(cols.topic)
                .bind(cols.attempts_made)
                .bind(cols.error)
                .bind(cols.event)
                .execute(s.pool())
                .await
                .map_err(storage)?;
            }
            AnyStore::Sqlite(s) => {
                let mut tx = s
                    .pool()
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(storage)?;
                let now = time::format(&time::now());
                for r in rows {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "INSERT INTO omnibox_dead_letters (id, origin, event_id, event_type, topic, attempts_made, error, event, dead_at)
                         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9
                         WHERE EXISTS (SELECT 1 FROM {t} WHERE id = ?3 AND status = 'failed')
                         ON CONFLICT DO NOTHING"
                    )))
                    .bind(r.id.to_string())
                    .bind(r.origin.to_string())
                    .bind(r.event_id.to_string())
                    .bind(&r.event_type)
                    .bind(&r.topic)
                    .bind(r.attempts_made)
                    .bind(&r.error)
                    .bind(&r.event)
                    .bind(&now)
                    .execute(&mut *tx)
                    .await
                    .map_err(storage)?;
                }
                tx.commit().await.map_err(storage)?;
            }
        }
        Ok(())
    }
}

impl DeadLetterTable {
    /// Keeps a copy of each event that has just become `failed` (as its
    /// processor claimed it, with the error of its last attempt) in the
    /// table; returns how many are kept. Putting a letter twice keeps it
    /// once.
    pub async fn put_failed<R: Route + Serialize>(
        &self,
        letters: &[(&Event<R>, &str)],
    ) -> Result<usize> {
        self.put_rows(R::TABLE, new_letters(letters)?).await
    }
}

impl AnyStore {
    /// This store's dead-letter table.
    pub fn dead_letters(&self) -> DeadLetterTable {
        DeadLetterTable::new(self.clone())
    }
}

/// A letter to write.
struct NewLetter {
    id: Uuid,
    origin: Table,
    event_id: Uuid,
    event_type: String,
    topic: String,
    attempts_made: i32,
    error: String,
    event: String,
}

#[derive(Default)]
struct PgColumns {
    id: Vec<Uuid>,
    origin: Vec<String>,
    event_id: Vec<Uuid>,
    event_type: Vec<String>,
    topic: Vec<String>,
    attempts_made: Vec<i32>,
    error: Vec<String>,
    event: Vec<String>,
}

impl PgColumns {
    fn push(&mut self, r: &NewLetter) {
        self.id.push(r.id);
        self.origin.push(r.origin.to_string());
        self.event_id.push(r.event_id);
        self.event_type.push(r.event_type.clone());
        self.topic.push(r.topic.clone());
        self.attempts_made.push(r.attempts_made);
        self.error.push(r.error.clone());
        self.event.push(r.event.clone());
    }
}

/// The rows of `letters`: each event as it is once failed (a row the
/// caller has already failed is taken as it is).
fn new_letters<R: Route + Serialize>(letters: &[(&Event<R>, &str)]) -> Result<Vec<NewLetter>> {
    letters
        .iter()
        .map(|&(e, last)| {
            let (attempts, error) = if e.status() == EventStatus::Failed {
                (e.attempts_made(), e.last_error().unwrap_or(last))
            } else {
                ((e.attempts_made() + 1).min(e.max_attempts()), last)
            };
            let error = stored_error(if error.is_empty() {
                "(no error message)"
            } else {
                error
            });
            let mut copy = serde_json::to_value(e)
                .map_err(|err| Error::validation("event", err.to_string()))?;
            let topic = copy
                .get(topic_column(R::TABLE))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if let Some(o) = copy.as_object_mut() {
                o.insert("status".into(), json!("failed"));
                o.insert("attempts_made".into(), json!(attempts));
                o.insert("last_error".into(), json!(error));
                for k in ["locked_at", "locked_by", "locked_until", "completed_at"] {
                    o.insert(k.into(), Value::Null);
                }
            }
            Ok(NewLetter {
                id: Uuid::now_v7(),
                origin: R::TABLE,
                event_id: e.id(),
                event_type: e.event_type().to_string(),
                topic,
                attempts_made: attempts,
                error,
                event: copy.to_string(),
            })
        })
        .collect()
}

/// The letters of `table` whose event has no row.
fn missing_events<'a>(
    letters: &'a [DeadLetterRecord],
    table: Table,
    present: &[(Uuid, String)],
) -> Vec<&'a DeadLetterRecord> {
    let present: HashSet<Uuid> = present.iter().map(|(id, _)| *id).collect();
    letters
        .iter()
        .filter(|l| l.origin == table && !present.contains(&l.event_id))
        .collect()
}

fn revive<R: Route + DeserializeOwned>(letters: &[&DeadLetterRecord]) -> Result<Vec<Event<R>>> {
    letters
        .iter()
        .map(|l| {
            let e = Event::<R>::revived(&l.event).map_err(|e| {
                Error::validation(
                    "event",
                    format!("dead letter {}: {e}; nothing was replayed", l.id),
                )
            })?;
            if e.id() != l.event_id {
                return Err(Error::validation(
                    "event",
                    format!(
                        "dead letter {}: its copy is of event {}, not {}; nothing was replayed",
                        l.id,
                        e.id(),
                        l.event_id
                    ),
                ));
            }
            Ok(e)
        })
        .collect()
}

/// Which letters of `table` came back (`Ok`) or not (`Err(why)`), by
/// event id.
fn settle(
    table: Table,
    requeued: &[Uuid],
    present: &[(Uuid, String)],
    missing: &[&DeadLetterRecord],
    inserted: &[BulkOutcome],
    back: &mut HashMap<(Table, Uuid), std::result::Result<(), String>>,
) {
    for id in requeued {
        back.insert((table, *id), Ok(()));
    }
    for (id, status) in present {
        back.entry((table, *id)).or_insert_with(|| {
            Err(format!(
                "its {table} row is {status}, not failed: the event is back already"
            ))
        });
    }
    for (letter, outcome) in missing.iter().zip(inserted) {
        let result = if outcome.existing {
            Err(format!(
                "its {table} row is gone and row {} now holds its {}: the event is back already",
                outcome.id,
                match table {
                    Table::Outbox => "idempotency key",
                    Table::Inbox => "message id",
                }
            ))
        } else {
            Ok(())
        };
        back.insert((table, letter.event_id), result);
    }
}

fn split(
    letters: Vec<DeadLetterRecord>,
    mut back: HashMap<(Table, Uuid), std::result::Result<(), String>>,
) -> DeadLetterReplay {
    let mut report = DeadLetterReplay::default();
    for l in letters {
        match back.remove(&(l.origin, l.event_id)) {
            Some(Ok(())) => report.replayed.push(l),
            Some(Err(why)) => report.closed.push((l, why)),
            None => report
                .left
                .push((l, "its event could not be found or inserted".into())),
        }
    }
    report
}

impl DeadLetterReplay {
    /// The letters now marked replayed: replayed and closed.
    fn done(&self) -> Vec<Uuid> {
        self.replayed
            .iter()
            .chain(self.closed.iter().map(|(l, _)| l))
            .map(|l| l.id)
            .collect()
    }
}

fn fill_entry(entry: &mut AuditEntry, report: &DeadLetterReplay) {
    entry.count = report.replayed.len() as u64;
    entry.ids = report.replayed.iter().map(|l| l.event_id).collect();
    if let Value::Object(d) = &mut entry.details {
        d.insert(
            "dead_letters".into(),
            json!(report.replayed.iter().map(|l| l.id).collect::<Vec<_>>()),
        );
        if !report.closed.is_empty() {
            d.insert(
                "closed".into(),
                json!(
                    report
                        .closed
                        .iter()
                        .map(|(l, why)| json!({"id": l.id, "event_id": l.event_id, "why": why}))
                        .collect::<Vec<_>>()
                ),
            );
        }
    }
}

fn parse_id(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|e| Error::CorruptRow {
        id: s.to_string(),
        message: e.to_string(),
    })
}

fn parse_ids(ids: &[String]) -> Result<Vec<Uuid>> {
    ids.iter().map(|s| parse_id(s)).collect()
}

fn origin(s: &str) -> std::result::Result<Table, String> {
    match s {
        "outbox" => Ok(Table::Outbox),
        "inbox" => Ok(Table::Inbox),
        other => Err(format!("column origin: unknown table {other:?}")),
    }
}

fn decode_pg(r: &sqlx::postgres::PgRow) -> Result<DeadLetterRecord> {
    let inner = || -> std::result::Result<DeadLetterRecord, String> {
        let s = |e: sqlx::Error| e.to_string();
        let event: String = r.try_get("event").map_err(s)?;
        Ok(DeadLetterRecord {
            id: r.try_get("id").map_err(s)?,
            seq: r.try_get("seq").map_err(s)?,
            origin: origin(&r.try_get::<String, _>("origin").map_err(s)?)?,
            event_id: r.try_get("event_id").map_err(s)?,
            event_type: r.try_get("event_type").map_err(s)?,
            topic: r.try_get("topic").map_err(s)?,
            attempts_made: r.try_get("attempts_made").map_err(s)?,
            error: r.try_get("error").map_err(s)?,
            event: serde_json::from_str(&event).map_err(|e| e.to_string())?,
            dead_at: r.try_get("dead_at").map_err(s)?,
            replayed_at: r.try_get("replayed_at").map_err(s)?,
        })
    };
    inner().map_err(|message| Error::CorruptRow {
        id: r
            .try_get::<Uuid, _>("id")
            .map_or_else(|_| "?".into(), |id| id.to_string()),
        message,
    })
}

fn decode_sqlite(r: &sqlx::sqlite::SqliteRow) -> Result<DeadLetterRecord> {
    let inner = || -> std::result::Result<DeadLetterRecord, String> {
        let s = |e: sqlx::Error| e.to_string();
        let uuid = |col: &str| -> std::result::Result<Uuid, String> {
            let v: String = r.try_get(col).map_err(s)?;
            Uuid::parse_str(&v).map_err(|e| format!("column {col}: {e}"))
        };
        let ts = |v: String| time::parse_stored(&v).map_err(|e| e.to_string());
        let event: String = r.try_get("event").map_err(s)?;
        let replayed_at: Option<String> = r.try_get("replayed_at").map_err(s)?;
        Ok(DeadLetterRecord {
            id: uuid("id")?,
            seq: r.try_get("seq").map_err(s)?,
            origin: origin(&r.try_get::<String, _>("origin").map_err(s)?)?,
            event_id: uuid("event_id")?,
            event_type: r.try_get("event_type").map_err(s)?,
            topic: r.try_get("topic").map_err(s)?,
            attempts_made: r.try_get("attempts_made").map_err(s)?,
            error: r.try_get("error").map_err(s)?,
            event: serde_json::from_str(&event).map_err(|e| e.to_string())?,
            dead_at: ts(r.try_get("dead_at").map_err(s)?)?,
            replayed_at: replayed_at.map(ts).transpose()?,
        })
    };
    inner().map_err(|message| Error::CorruptRow {
        id: r.try_get::<String, _>("id").unwrap_or_else(|_| "?".into()),
        message,
    })
}
