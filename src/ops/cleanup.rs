//! Retention: deleting completed (and optionally failed) rows past their
//! age in bounded batches, then trimming the audit trail and the replayed
//! dead letters. The safety rules a cleanup must respect (a minimum age,
//! the inbox's deduplication window) are here too, so every caller refuses
//! the same mistakes.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::on_table;
use crate::error::Result;
use crate::model::time::human_duration;
use crate::model::{EventStatus, Route, Table};
use crate::store::audit::{AuditEntry, check};
use crate::store::postgres::partition::{KeptPartition, RetireOptions, Retired};
use crate::store::{AnyStore, MaintenanceStore};

/// The youngest retention accepted without `force`: rows just completed
/// would otherwise go at once, an outbox row's idempotency key with it.
pub const MIN_RETENTION: Duration = Duration::from_secs(3600);

/// The shortest audit retention accepted without `force`.
pub const MIN_AUDIT_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// What a cleanup deletes and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Completed rows older than this go.
    pub older_than: Duration,
    /// Failed rows go too (older than `failed_older_than`).
    pub include_failed: bool,
    /// The age of failed rows that go, with `include_failed`.
    pub failed_older_than: Duration,
    /// Rows per `DELETE`.
    pub batch_size: u32,
    /// Batches per table and status at most; past it the cleanup stops
    /// and says that rows remain.
    pub max_iterations: u32,
    /// Audit rows older than this go.
    pub audit_older_than: Duration,
    /// Replayed dead letters older than this go.
    pub dead_letters_older_than: Duration,
    /// On a partitioned table, how long to wait for the table's lock to
    /// drop a partition (past it, the partition is left for the next run).
    pub lock_timeout: Duration,
}

impl Retention {
    /// Completed rows older than `older_than`; failed rows kept; batches
    /// of 1,000, at most 1,000 of them; audit rows kept a year, replayed
    /// dead letters 90 days.
    pub fn new(older_than: Duration) -> Self {
        Retention {
            older_than,
            include_failed: false,
            failed_older_than: Duration::from_secs(30 * 86_400),
            batch_size: 1000,
            max_iterations: 1000,
            audit_older_than: Duration::from_secs(365 * 86_400),
            dead_letters_older_than: Duration::from_secs(90 * 86_400),
            lock_timeout: Duration::from_secs(5),
        }
    }

    /// The shortest age of a row this retention deletes.
    pub fn shortest(&self) -> Duration {
        if self.include_failed {
            self.older_than.min(self.failed_older_than)
        } else {
            self.older_than
        }
    }

    /// Why this retention is unsafe for `tables`, if it is: younger than
    /// [`MIN_RETENTION`] or [`MIN_AUDIT_RETENTION`] (what `force`
    /// overrides), or, for the inbox, younger than the deduplication
    /// window `dedup_window` (never overridden: a redelivered message
    /// would be stored again as new). The text says what to do instead.
    pub fn refusal(&self, tables: &[Table], dedup_window: Duration, force: bool) -> Option<String> {
        let shortest = self.shortest();
        if shortest < MIN_RETENTION && !force {
            return Some(format!(
                "refusing a retention of {}: rows just completed would go at once (an outbox row's idempotency key with it, so a retried enqueue gets in again); use at least {}, or add --force",
                human_duration(shortest),
                human_duration(MIN_RETENTION)
            ));
        }
        if self.audit_older_than < MIN_AUDIT_RETENTION && !force {
            return Some(format!(
                "refusing an audit retention of {}: the audit trail records what operators changed; keep it at least {}, or add --force",
                human_duration(self.audit_older_than),
                human_duration(MIN_AUDIT_RETENTION)
            ));
        }
        if tables.contains(&Table::Inbox) && shortest < dedup_window {
            return Some(format!(
                "refusing to delete inbox rows younger than the deduplication window ({}): a redelivered message would be stored again as new; use a retention of at least {} (or --table outbox, or a shorter --dedup-window / OMNIBOX_DEDUP_WINDOW / dedup_window in omnibox.toml)",
                human_duration(dedup_window),
                human_duration(dedup_window)
            ));
        }
        None
    }

    /// The statuses this retention deletes, each with its age.
    fn statuses(&self) -> Vec<(EventStatus, Duration)> {
        let mut s = vec![(EventStatus::Completed, self.older_than)];
        if self.include_failed {
            s.push((EventStatus::Failed, self.failed_older_than));
        }
        s
    }
}

/// What a cleanup found or deleted in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Deleted {
    /// `outbox` or `inbox`.
    pub table: String,
    /// Completed rows.
    pub completed: u64,
    /// Failed rows.
    pub failed: u64,
    /// The cleanup stopped at `max_iterations` with rows past retention
    /// left.
    pub bounded: bool,
    /// Partitions dropped whole (or to drop), on a partitioned table; their
    /// rows are counted in `completed` and `failed`.
    pub partitions: Vec<String>,
    /// Partitions past retention kept, and why.
    pub kept_partitions: Vec<KeptPartition>,
}

impl Deleted {
    /// Completed and failed rows together.
    pub fn total(&self) -> u64 {
        self.completed + self.failed
    }
}

/// How many rows of each of `tables` are past `retention` (what a dry run
/// shows and a confirmation asks about).
pub async fn count(
    store: &AnyStore,
    tables: &[Table],
    retention: &Retention,
) -> Result<Vec<Deleted>> {
    let mut plan = Vec::with_capacity(tables.len());
    for &t in tables {
        let mut counts = Deleted {
            table: t.to_string(),
            ..Deleted::default()
        };
        for (status, older_than) in retention.statuses() {
            let n = on_table!(store, t, table => table.count_older(status, older_than).await?);
            match status {
                EventStatus::Completed => counts.completed = n,
                _ => counts.failed = n,
            }
        }
        let retired = retire(store, t, retention, true).await?;
        counts.partitions = retired.partitions;
        counts.kept_partitions = retired.kept;
        plan.push(counts);
    }
    Ok(plan)
}

/// Deletes the rows of `tables` past `retention` in batches, calling
/// `progress` with each batch's count, and records `entry` (action
/// `cleanup`; table, count and details filled in) per table that lost
/// rows. Returns what went per table. Does not trim the trails: see
/// [`trim_trails`].
pub async fn delete(
    store: &AnyStore,
    tables: &[Table],
    retention: &Retention,
    entry: &AuditEntry,
    mut progress: impl FnMut(u64),
) -> Result<Vec<Deleted>> {
    check(entry)?;
    let mut done = Vec::with_capacity(tables.len());
    for &t in tables {
        // Whole partitions first (no row is deleted one by one, no dead
        // tuple is left); then the rows past retention in what remains.
        let retired = retire(store, t, retention, false).await?;
        progress(retired.completed + retired.failed);
        let mut counts =
            on_table!(store, t, table => delete_in(&table, retention, &mut progress).await?);
        counts.table = t.to_string();
        counts.completed += retired.completed;
        counts.failed += retired.failed;
        counts.partitions = retired.partitions;
        counts.kept_partitions = retired.kept;
        if counts.total() > 0 {
            let mut entry = entry.clone();
            entry.table = Some(t.to_string());
            entry.count = counts.total();
            entry.details = json!({
                "completed": counts.completed, "failed": counts.failed,
                "older_than_seconds": retention.older_than.as_secs_f64(),
                "failed_older_than_seconds": retention.include_failed.then_some(retention.failed_older_than.as_secs_f64()),
                "stopped_at_max_iterations": counts.bounded,
                "partitions_dropped": counts.partitions,
            });
            store.record_audit(&entry).await?;
        }
        done.push(counts);
    }
    Ok(done)
}

/// Retires `table`'s partitions past `retention` on a partitioned
/// PostgreSQL table (nothing elsewhere).
async fn retire(
    store: &AnyStore,
    table: Table,
    retention: &Retention,
    dry_run: bool,
) -> Result<Retired> {
    match store {
        AnyStore::Postgres(pg) => {
            pg.retire_partitions(
                table,
                &RetireOptions {
                    older_than: retention.older_than,
                    include_failed: retention.include_failed,
                    failed_older_than: retention.failed_older_than,
                    dry_run,
                    lock_timeout: retention.lock_timeout,
                },
            )
            .await
        }
        AnyStore::Sqlite(_) => Ok(Retired::default()),
    }
}

async fn delete_in<R: Route, T: MaintenanceStore<R>>(
    table: &T,
    retention: &Retention,
    progress: &mut impl FnMut(u64),
) -> Result<Deleted> {
    let mut counts = Deleted::default();
    for (status, older_than) in retention.statuses() {
        let mut iterations = 0;
        loop {
            if iterations >= retention.max_iterations {
                // The last batch was full: are there more?
                counts.bounded |= table.count_older(status, older_than).await? > 0;
                break;
            }
            let n = match status {
                EventStatus::Completed => {
                    table
                        .delete_completed(older_than, retention.batch_size)
                        .await?
                }
                _ => {
                    table
                        .delete_failed(older_than, retention.batch_size)
                        .await?
                }
            };
            iterations += 1;
            progress(n);
            match status {
                EventStatus::Completed => counts.completed += n,
                _ => counts.failed += n,
            }
            // A short batch: nothing more past retention (or only rows
            // another cleanup is deleting right now).
            if n < u64::from(retention.batch_size) {
                break;
            }
        }
    }
    Ok(counts)
}

/// What [`trim_trails`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Audit rows.
    pub audit: u64,
    /// The audit retention applied: `audit_older_than`, or longer so that
    /// the rows this cleanup just wrote stay.
    pub audit_kept: Duration,
    /// Replayed dead letters.
    pub dead_letters: u64,
}

/// Deletes audit rows and replayed dead letters past `retention`. The
/// audit rows written since `started` (this cleanup's own) always stay.
pub async fn trim_trails(
    store: &AnyStore,
    retention: &Retention,
    started: Instant,
) -> Result<Trimmed> {
    let keep = retention
        .audit_older_than
        .max(started.elapsed() + Duration::from_secs(1));
    let audit = store.delete_audit_older(keep, retention.batch_size).await?;
    let dead_letters = store
        .dead_letters()
        .delete_replayed_older(retention.dead_letters_older_than, retention.batch_size)
        .await?;
    Ok(Trimmed {
        audit,
        audit_kept: keep,
        dead_letters,
    })
}
