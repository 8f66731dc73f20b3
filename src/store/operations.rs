//! The operator changes recorded in the audit trail (unlock, requeue,
//! retry now, each in one transaction with its audit row) and the
//! dead-letter table's reads, writes and replay: written once against
//! [`Driver`], for both backends.

use std::collections::HashMap;

use serde::Serialize;
use uuid::Uuid;

use super::AnyStore;
use super::any::with_driver;
use super::audit::{AuditEntry, AuditFilter, AuditedChange, check};
use super::dead_letters::{
    DEAD_LETTERS, DeadLetterFilter, DeadLetterRecord, DeadLetterReplay, DeadLetterTable, NewLetter,
    fill_entry, missing_events, new_letters, revive, settle, split,
};
use super::diagnostics::{ClaimPlan, ReplicationSlot, Statistics, TableHealth};
use super::driver::{Driver, FeatureTx, Retention, delete_older_in_batches};
use crate::error::{Error, Result};
use crate::model::{Event, InboxRoute, OutboxRoute, Route, Table};

impl AnyStore {
    /// Records an operator action.
    pub async fn record_audit(&self, entry: &AuditEntry) -> Result<i64> {
        check(entry)?;
        with_driver!(self, d => record(d, entry).await)
    }

    /// Makes `change` on `table` and records `entry` (its `table`, `count`
    /// and `ids` filled in from what changed) in the **same transaction**:
    /// both happen or neither. The entry is checked before anything is
    /// written. Returns the ids changed; when nothing changed, nothing is
    /// written (no audit row either).
    pub async fn change_audited(
        &self,
        table: Table,
        change: AuditedChange<'_>,
        entry: AuditEntry,
    ) -> Result<Vec<Uuid>> {
        check(&entry)?;
        with_driver!(self, d => change_audited(d, table, change, entry).await)
    }

    /// Deletes audit rows older than `older_than`, `batch_size` per
    /// statement; returns how many (the trail's own retention, run by
    /// `cleanup`).
    pub async fn delete_audit_older(
        &self,
        older_than: std::time::Duration,
        batch_size: u32,
    ) -> Result<u64> {
        with_driver!(self, d => delete_older_in_batches(d, Retention::Audit, older_than, batch_size).await)
    }

    /// Recorded actions, newest first.
    pub async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        with_driver!(self, d => d.list_audit(filter).await)
    }
}

/// Records `entry` in its own transaction; returns its id.
async fn record<D: Driver>(driver: &D, entry: &AuditEntry) -> Result<i64> {
    let mut tx = driver.begin().await?;
    let id = tx.insert_audit(entry).await?;
    tx.commit().await?;
    Ok(id)
}

/// [`AnyStore::change_audited`] on one backend: the change, the open
/// letters of requeued rows, and the audit row, in one transaction.
async fn change_audited<D: Driver>(
    driver: &D,
    table: Table,
    change: AuditedChange<'_>,
    mut entry: AuditEntry,
) -> Result<Vec<Uuid>> {
    entry.table = Some(table.to_string());
    let requeue = matches!(change, AuditedChange::Requeue { .. });
    let mut tx = driver.begin().await?;
    let ids = tx.audited_change(table, change).await?;
    if ids.is_empty() {
        tx.rollback().await?;
        return Ok(ids);
    }
    if requeue {
        tx.mark_replayed(table, &ids).await?;
    }
    entry.count = ids.len() as u64;
    entry.ids = ids.clone();
    tx.insert_audit(&entry).await?;
    tx.commit().await?;
    Ok(ids)
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

/// What `omnibox doctor` reads (see `store/diagnostics.rs`).
impl AnyStore {
    /// The outbox claim's scan plan, as the backend explains it.
    pub async fn claim_plan(&self) -> Result<ClaimPlan> {
        with_driver!(self, d => d.claim_plan().await)
    }

    /// The planner's statistics of the outbox.
    pub async fn outbox_statistics(&self) -> Result<Statistics> {
        with_driver!(self, d => d.outbox_statistics().await)
    }

    /// Locked rows of `table` whose lease has run out (their worker stopped).
    pub async fn expired_leases(&self, table: Table) -> Result<i64> {
        with_driver!(self, d => d.expired_leases(table).await)
    }

    /// `table`'s size, rows and autovacuum settings (PostgreSQL; `None` on
    /// SQLite).
    pub async fn table_health(&self, table: Table) -> Result<Option<TableHealth>> {
        with_driver!(self, d => d.table_health(table).await)
    }

    /// The server's replication slots (PostgreSQL; none on SQLite).
    pub async fn replication_slots(&self) -> Result<Vec<ReplicationSlot>> {
        with_driver!(self, d => d.replication_slots().await)
    }

    /// Up to `limit` distinct topics of pending outbox rows.
    pub async fn pending_topics(&self, limit: i64) -> Result<Vec<String>> {
        with_driver!(self, d => d.pending_topics(limit).await)
    }
}
