//! What a store reports back: table counts, inserts' outcomes.

use std::collections::HashMap;

use super::request::ClaimToken;
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::model::{Table, Timestamp};

/// Counts of one table for `omnibox status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableCounts {
    /// Which table.
    pub table: Table,
    /// Pending rows (locked or not).
    pub pending: u64,
    /// Completed rows.
    pub completed: u64,
    /// Failed rows.
    pub failed: u64,
    /// Rows locked by a worker.
    pub locked: u64,
    /// Pending, unlocked rows whose time has come.
    pub due_now: u64,
    /// Creation time of the oldest pending row.
    #[serde(with = "crate::model::time::serde_ts::option")]
    pub oldest_pending_created_at: Option<Timestamp>,
    /// The database's clock when counted.
    #[serde(with = "crate::model::time::serde_ts")]
    pub now: Timestamp,
    /// True when `completed` is the planner's estimate of the table's size
    /// less the exact pending and failed counts
    /// ([`AnyTable::status_counts`](crate::store::AnyTable::status_counts)
    /// on a large PostgreSQL table); the other counts are exact.
    pub completed_is_estimate: bool,
}

impl TableCounts {
    /// Age of the oldest pending row.
    pub fn oldest_pending_age(&self) -> Option<Duration> {
        self.oldest_pending_created_at
            .map(|t| (self.now - t).to_std().unwrap_or(Duration::ZERO))
    }
}

/// The result of creating one outbox event.
#[derive(Debug, Clone, PartialEq)]
pub enum Created<E> {
    /// A new row was written.
    Inserted(E),
    /// A row with the same idempotency key (outbox) or the same
    /// `(message_id, consumer_group)` (inbox) exists; it is returned and nothing was written.
    Existing(E),
}

impl<E> Created<E> {
    /// The row, new or existing.
    pub fn into_inner(self) -> E {
        match self {
            Created::Inserted(e) | Created::Existing(e) => e,
        }
    }
    /// True when a new row was written.
    pub fn is_inserted(&self) -> bool {
        matches!(self, Created::Inserted(_))
    }
}

/// A pending inbox row whose message was delivered again
/// ([`InboxTx::take`](crate::store::InboxTx::take)).
#[derive(Debug, Clone)]
pub enum Redelivered {
    /// Due and free: now locked by the consumer's token; run its handler
    /// (its `attempts_made` counts the deliveries that failed before).
    Taken(Box<crate::model::InboxEvent>),
    /// Not due yet (a failure's retry time) or held by another worker's live
    /// lease: wait until this time, then deliver the message again.
    Wait(crate::model::Timestamp),
}

/// Sorts existing pending inbox rows met again into those to take now and
/// those to wait for (see [`Redelivered`]); returns the ids to lock for
/// `token` with the map. `now` is the database's clock.
pub(crate) fn sort_existing(
    rows: Vec<crate::model::InboxEvent>,
    token: &ClaimToken,
    now: Timestamp,
) -> (Vec<Uuid>, HashMap<Uuid, Redelivered>) {
    let mut out = HashMap::with_capacity(rows.len());
    let mut takeable = Vec::new();
    for mut event in rows {
        let free_at = event
            .locked_until
            .unwrap_or(event.scheduled_at)
            .max(event.scheduled_at);
        // A row this worker holds is left from an attempt of this same
        // consumer that failed midway (the database went away): it is free
        // to take again (nothing of this consumer is in flight at a batch's
        // start).
        let own = event.locked_by.as_deref() == Some(token.worker.as_str());
        if free_at <= now || (own && event.scheduled_at <= now) {
            event.locked_at = Some(token.locked_at);
            event.locked_by = Some(token.worker.as_str().to_string());
            event.locked_until = Some(token.locked_at + crate::domain::chrono_dur(token.lease));
            takeable.push(event.id);
            out.insert(event.id, Redelivered::Taken(Box::new(event)));
        } else {
            out.insert(event.id, Redelivered::Wait(free_at));
        }
    }
    (takeable, out)
}

/// The result of one element of a bulk create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BulkOutcome {
    /// Id of the row: the new one, or the existing row's.
    pub id: Uuid,
    /// True when the row already existed and nothing was written.
    pub existing: bool,
}
