//! Replay: failed rows back to pending (attempts reset, error cleared, due
//! now), pending rows waiting for a retry made due now, and open dead
//! letters brought back. Selection and change are separate steps, so a
//! caller can show what a selection picks (a dry run, a confirmation)
//! before anything changes; the change is by id, in chunks paced by a
//! rate, each chunk and its audit row in one transaction, and it touches
//! only rows still in the state they were selected in.

use std::collections::HashSet;
use std::time::Duration;

use uuid::Uuid;

use super::{merge_by, on_table};
use crate::error::Result;
use crate::model::{Event, Route, Table, Timestamp};
use crate::store::audit::{AuditEntry, AuditedChange, check};
use crate::store::dead_letters::{DeadLetterFilter, DeadLetterRecord, DeadLetterReplay};
use crate::store::{AnyStore, MaintenanceStore, RequeueFilter, fingerprint};

/// Which rows a replay picks.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// The event tables searched.
    pub tables: Vec<Table>,
    /// The selectors (its `all` and `limit` are not used: every row the
    /// selectors match is listed, then `limit` applies across tables).
    pub filter: RequeueFilter,
    /// Only rows of this failure group (see `omnibox failures`).
    pub fingerprint: Option<String>,
    /// Pending rows waiting for a retry instead of failed ones.
    pub pending: bool,
    /// At most this many rows, oldest first.
    pub limit: Option<u32>,
}

/// One selected row, of either table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its table.
    pub table: Table,
    /// Its id.
    pub id: Uuid,
    /// Its event type.
    pub event_type: String,
    /// Attempts made so far.
    pub attempts_made: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it last changed (for a failed row: when it failed).
    pub updated_at: Timestamp,
    /// When it was written.
    pub created_at: Timestamp,
    /// When it is due.
    pub scheduled_at: Timestamp,
    /// Its last error.
    pub last_error: Option<String>,
}

/// The rows `selection` picks: each table's in insertion order, merged by
/// creation time, at most `limit`.
pub async fn select(store: &AnyStore, selection: &Selection) -> Result<Vec<Candidate>> {
    let mut outbox = Vec::new();
    let mut inbox = Vec::new();
    for &t in &selection.tables {
        let rows = on_table!(store, t, table => pick(&table, selection).await?);
        match t {
            Table::Outbox => outbox = rows,
            Table::Inbox => inbox = rows,
        }
    }
    let mut rows = merge_by(outbox, inbox, |r| r.created_at);
    if let Some(limit) = selection.limit {
        rows.truncate(limit as usize);
    }
    Ok(rows)
}

/// The rows of one table the selection picks: pending rows waiting for a retry
/// (with `pending`) or failed ones, in insertion order, at most the limit
/// (applied again after the merge), narrowed to the error fingerprint when
/// one is given (every match is read then).
async fn pick<R, S>(table: &S, selection: &Selection) -> Result<Vec<Candidate>>
where
    R: Route,
    S: MaintenanceStore<R>,
{
    let mut filter = selection.filter.clone();
    filter.all = true;
    // Without a fingerprint (matched here, not in the database) the limit
    // is the database's: each table gives at most that many rows, in the
    // order the merge takes them, so `replay --limit 10` over a million
    // failed rows reads 10 a table, not all.
    filter.limit = match &selection.fingerprint {
        None => selection.limit,
        Some(_) => None,
    };
    let rows: Vec<Event<R>> = if selection.pending {
        table.list_waiting(&filter).await?
    } else {
        table.list_failed(&filter).await?
    };
    Ok(rows
        .into_iter()
        .filter(|e| {
            selection.fingerprint.as_ref().is_none_or(|fp| {
                fingerprint::fingerprint(e.event_type(), e.last_error().unwrap_or("")) == *fp
            })
        })
        .map(|e| Candidate {
            table: R::TABLE,
            id: e.id(),
            event_type: e.event_type().to_string(),
            attempts_made: e.attempts_made(),
            max_attempts: e.max_attempts(),
            updated_at: e.updated_at(),
            created_at: e.created_at(),
            scheduled_at: e.scheduled_at(),
            last_error: e.last_error().map(str::to_string),
        })
        .collect())
}

/// The ids in chunks of `rate` (all in one without a rate), waiting a
/// second before each chunk after the first.
struct Paced<'a, T> {
    chunks: std::slice::Chunks<'a, T>,
    first: bool,
}

impl<'a, T> Paced<'a, T> {
    /// Chunks of `rate` items (a rate of 0 counts as 1), or one chunk without a rate.
    fn new(items: &'a [T], rate: Option<u32>) -> Self {
        let size = rate.map_or(items.len(), |r| r as usize).max(1);
        Paced {
            chunks: items.chunks(size),
            first: true,
        }
    }

    /// The next chunk, after a one-second wait unless it is the first; `None` at the end.
    async fn next(&mut self) -> Option<&'a [T]> {
        let chunk = self.chunks.next()?;
        if !std::mem::take(&mut self.first) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Some(chunk)
    }
}

/// Requeues `rows` (with `pending`: makes them due now, attempts and last
/// error kept), at most `rate` rows a second, recording `entry` per chunk
/// and table in the chunk's transaction. Returns the ids changed: a row
/// that left its selected state meanwhile is left alone.
pub async fn requeue(
    store: &AnyStore,
    rows: &[Candidate],
    pending: bool,
    rate: Option<u32>,
    entry: &AuditEntry,
) -> Result<HashSet<Uuid>> {
    check(entry)?;
    let mut done = HashSet::with_capacity(rows.len());
    let mut chunks = Paced::new(rows, rate);
    while let Some(part) = chunks.next().await {
        for t in Table::ALL {
            let ids: Vec<Uuid> = part.iter().filter(|r| r.table == t).map(|r| r.id).collect();
            if ids.is_empty() {
                continue;
            }
            let change = if pending {
                AuditedChange::RetryNow { ids: &ids }
            } else {
                AuditedChange::Requeue { ids: &ids }
            };
            done.extend(store.change_audited(t, change, entry.clone()).await?);
        }
    }
    Ok(done)
}

/// The open dead letters `filter` picks, of the failure group
/// `fingerprint` if given, oldest first, at most `limit`.
pub async fn select_letters(
    store: &AnyStore,
    filter: &DeadLetterFilter,
    fingerprint: Option<&str>,
    limit: Option<u32>,
) -> Result<Vec<DeadLetterRecord>> {
    let mut filter = filter.clone();
    filter.open_only = true;
    // The database applies the limit unless a fingerprint is matched here.
    if fingerprint.is_none() {
        filter.limit = limit;
    }
    let mut letters = store.dead_letters().list(&filter).await?;
    if let Some(fp) = fingerprint {
        letters.retain(|l| fingerprint::fingerprint(&l.event_type, &l.error) == fp);
    }
    if let Some(limit) = limit {
        letters.truncate(limit as usize);
    }
    Ok(letters)
}

/// Replays the open letters `ids` (see
/// [`DeadLetterTable::replay`](crate::store::dead_letters::DeadLetterTable::replay)),
/// at most `rate` a second, each chunk with its audit row (`entry`).
pub async fn letters(
    store: &AnyStore,
    ids: &[Uuid],
    rate: Option<u32>,
    entry: &AuditEntry,
) -> Result<DeadLetterReplay> {
    check(entry)?;
    let table = store.dead_letters();
    let mut all = DeadLetterReplay::default();
    let mut chunks = Paced::new(ids, rate);
    while let Some(part) = chunks.next().await {
        let r = table.replay(part, entry.clone()).await?;
        all.replayed.extend(r.replayed);
        all.closed.extend(r.closed);
        all.left.extend(r.left);
    }
    Ok(all)
}
