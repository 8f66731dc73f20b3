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

use super::audit::AuditEntry;
use super::{AnyStore, BulkOutcome, FailureSelector, stored_error, topic_column};
use crate::error::{Error, Result};
use crate::model::{Event, EventStatus, Route, Table, Timestamp};

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
    /// Letters with these ids, or of events with these ids; of this event
    /// type, topic (outbox) or source (inbox), or inbox consumer group;
    /// whose error contains this text; written in this time window.
    pub failures: FailureSelector,
    /// Letters of this table's events.
    pub origin: Option<Table>,
    /// Only letters not replayed yet.
    pub open_only: bool,
    /// Letters after this `seq` (paging).
    pub after_seq: Option<i64>,
    /// Most letters, oldest first; `None` for all.
    pub limit: Option<u32>,
}

impl DeadLetterFilter {
    /// The letters of the events `events` selects: by its ids, event type,
    /// topic or source, consumer group, error text and time range (its
    /// `all` and `limit` play no part).
    pub fn of_events(events: &crate::store::RequeueFilter) -> Self {
        DeadLetterFilter {
            failures: events.failures.clone(),
            ..Self::default()
        }
    }
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
    pub(super) store: AnyStore,
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
pub(super) fn new_letters<R: Route + Serialize>(
    letters: &[(&Event<R>, &str)],
) -> Result<Vec<NewLetter>> {
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
pub(super) fn missing_events<'a>(
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

/// The events kept in `letters`, to insert again; a copy that cannot be
/// read, or is of another event than its letter's, refuses the whole
/// replay.
pub(super) fn revive<R: Route + DeserializeOwned>(
    letters: &[&DeadLetterRecord],
) -> Result<Vec<Event<R>>> {
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
pub(super) fn settle(
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

/// The letters replayed, closed (their event is back already, with why)
/// and left, from what came back of each event.
pub(super) fn split(
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
    pub(super) fn done(&self) -> Vec<Uuid> {
        self.replayed
            .iter()
            .chain(self.closed.iter().map(|(l, _)| l))
            .map(|l| l.id)
            .collect()
    }
}

/// The replay's audit entry: the events brought back, and the letters
/// replayed and closed in its details.
pub(super) fn fill_entry(entry: &mut AuditEntry, report: &DeadLetterReplay) {
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
