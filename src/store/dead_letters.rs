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
use uuid::Uuid;

use super::any::with_driver;
use super::audit::{AuditEntry, check};
use super::driver::{Driver, FeatureTx, Retention, delete_older_in_batches};
use super::{AnyStore, BulkOutcome, stored_error, topic_column};
use crate::error::{Error, Result};
use crate::model::{Event, EventStatus, InboxRoute, OutboxRoute, Route, Table, Timestamp};

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
        with_driver!(&self.store, d => d.list_letters(filter).await)
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
        with_driver!(&self.store, d => replay(d, ids, entry).await)
    }

    /// How many letters are open (not replayed), of `origin`'s events or
    /// of all: failures nobody has dealt with yet (read from the
    /// open-letter index).
    pub async fn count_open(&self, origin: Option<Table>) -> Result<u64> {
        with_driver!(&self.store, d => d.count_open_letters(origin).await)
    }

    /// Deletes letters replayed more than `older_than` ago, `batch_size`
    /// per statement; returns how many (run by `cleanup`). Open letters are
    /// never deleted here: they are failures nobody has dealt with yet.
    pub async fn delete_replayed_older(
        &self,
        older_than: std::time::Duration,
        batch_size: u32,
    ) -> Result<u64> {
        with_driver!(&self.store, d => {
            delete_older_in_batches(d, Retention::ReplayedLetters, older_than, batch_size).await
        })
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
        with_driver!(&self.store, d => d.insert_letters(table, rows).await)
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
pub(crate) struct NewLetter {
    pub(crate) id: Uuid,
    pub(crate) origin: Table,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: String,
    pub(crate) topic: String,
    pub(crate) attempts_made: i32,
    pub(crate) error: String,
    pub(crate) event: String,
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

/// [`DeadLetterTable::replay`] on one backend, in one write transaction.
async fn replay<D: Driver>(
    driver: &D,
    ids: &[Uuid],
    mut entry: AuditEntry,
) -> Result<DeadLetterReplay> {
    let mut tx = driver.begin().await?;
    let letters = tx.lock_open_letters(ids).await?;
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
        let requeued = tx.requeue_failed(table, &events).await?;
        let present = tx.statuses(table, &events).await?;
        let missing = missing_events(&letters, table, &present);
        let inserted = match table {
            Table::Outbox => tx.insert_outbox(&revive::<OutboxRoute>(&missing)?).await?,
            Table::Inbox => tx.insert_inbox(&revive::<InboxRoute>(&missing)?).await?,
        };
        settle(table, &requeued, &present, &missing, &inserted, &mut back);
    }
    let report = split(letters, back);
    if report.replayed.is_empty() && report.closed.is_empty() {
        tx.rollback().await?;
        return Ok(report);
    }
    tx.close_letters(&report.done()).await?;
    fill_entry(&mut entry, &report);
    tx.insert_audit(&entry).await?;
    tx.commit().await?;
    Ok(report)
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

/// The table a stored `origin` names.
pub(crate) fn parse_origin(s: &str) -> std::result::Result<Table, String> {
    match s {
        "outbox" => Ok(Table::Outbox),
        "inbox" => Ok(Table::Inbox),
        other => Err(format!("column origin: unknown table {other:?}")),
    }
}
