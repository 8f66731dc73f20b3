//! Where the tables stand: counts per status, stale locks, failures by
//! event type, keys blocked behind a failing head, open dead letters, and
//! the health limits an alert checks (`omnibox status --check`).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::model::Timestamp;
use crate::model::time::human_duration;
use crate::store::{AnyStore, BlockedKey, MaintenanceStore, OutboxStore, TableCounts};

/// One event table's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStatus {
    /// Counts per status (see [`TableCounts`]).
    pub counts: TableCounts,
    /// Rows whose lock is older than the snapshot's `stale_after`.
    pub stale_locks: u64,
    /// Failed rows per event type.
    pub failed_by_event_type: Vec<(String, u64)>,
    /// The highest `seq`: rows ever inserted, gaps aside.
    pub max_seq: i64,
    /// Rows completed after the snapshot's `since`.
    pub completed_since: u64,
}

/// Both event tables at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The outbox, then the inbox.
    pub tables: [TableStatus; 2],
    /// Up to ten outbox keys waiting behind a failing head.
    pub blocked_keys: Vec<BlockedKey>,
    /// Dead letters not replayed yet.
    pub dead_letters_open: u64,
    /// When it was taken, by this process's clock (for rates).
    pub taken: Instant,
}

/// Reads a [`Snapshot`]: locks older than `stale_after` count as stale;
/// `completed_since` counts from `since` (the previous snapshot's database
/// time, for rates).
pub async fn snapshot(
    store: &AnyStore,
    stale_after: Duration,
    since: Timestamp,
) -> Result<Snapshot> {
    let (outbox, inbox) = (store.outbox(), store.inbox());
    let progress = [outbox.progress(since).await?, inbox.progress(since).await?];
    let counts = [outbox.status_counts().await?, inbox.status_counts().await?];
    let stale = [
        outbox.count_stale_locks(stale_after).await?,
        inbox.count_stale_locks(stale_after).await?,
    ];
    let failed = [
        outbox.failed_by_event_type().await?,
        inbox.failed_by_event_type().await?,
    ];
    let blocked_keys = outbox.blocked_keys(10).await?;
    let dead_letters_open = store.dead_letters().count_open(None).await?;
    let [c0, c1] = counts;
    let [f0, f1] = failed;
    let table = |counts, i: usize, failed| TableStatus {
        counts,
        stale_locks: stale[i],
        failed_by_event_type: failed,
        max_seq: progress[i].0,
        completed_since: progress[i].1,
    };
    Ok(Snapshot {
        tables: [table(c0, 0, f0), table(c1, 1, f1)],
        blocked_keys,
        dead_letters_open,
        taken: Instant::now(),
    })
}

/// Rows per second between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    /// New rows.
    pub inserted_per_second: f64,
    /// Completed rows.
    pub completed_per_second: f64,
}

impl Snapshot {
    /// The database's clock when the snapshot was taken.
    pub fn now(&self) -> Timestamp {
        self.tables[0].counts.now
    }

    /// Rates since `earlier` (whose database time this snapshot's
    /// `completed_since` counted from), per table.
    pub fn rates_since(&self, earlier: &Snapshot) -> [Rates; 2] {
        let secs = self
            .taken
            .duration_since(earlier.taken)
            .as_secs_f64()
            .max(0.001);
        let rate = |i: usize| Rates {
            inserted_per_second: (self.tables[i].max_seq - earlier.tables[i].max_seq).max(0) as f64
                / secs,
            completed_per_second: self.tables[i].completed_since as f64 / secs,
        };
        [rate(0), rate(1)]
    }

    /// The limits this snapshot breaks, one sentence each.
    pub fn violations(&self, limits: &Limits) -> Vec<String> {
        let mut out = Vec::new();
        for t in &self.tables {
            let c = &t.counts;
            if let (Some(max), Some(age)) = (limits.max_pending_age, c.oldest_pending_age())
                && age > max
            {
                out.push(format!(
                    "{}: the oldest pending event is {} old (limit {})",
                    c.table,
                    human_duration(age),
                    human_duration(max)
                ));
            }
            if let Some(max) = limits.max_failed
                && c.failed > max
            {
                out.push(format!(
                    "{}: {} failed events (limit {max})",
                    c.table, c.failed
                ));
            }
            if let Some(max) = limits.max_stale_locks
                && t.stale_locks > max
            {
                out.push(format!(
                    "{}: {} locks older than {} (limit {max})",
                    c.table,
                    t.stale_locks,
                    human_duration(limits.stale_after)
                ));
            }
        }
        out
    }
}

/// Health limits for [`Snapshot::violations`]; `None` checks nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The oldest pending row's age.
    pub max_pending_age: Option<Duration>,
    /// Failed rows per table.
    pub max_failed: Option<u64>,
    /// Stale locks per table.
    pub max_stale_locks: Option<u64>,
    /// The age that made a lock stale in the snapshot (for the message).
    pub stale_after: Duration,
}
