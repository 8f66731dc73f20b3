//! A feed of keys for the claims (docs/design.md, "The WAL relay").
//!
//! A source that knows which rows were just committed (the WAL relay reads
//! them from a logical replication slot) pushes each transaction's rows
//! here. The processor's claims then walk those keys instead of scanning
//! the table (`ClaimOptions::keys`): the same rules decide what is handed
//! out, so per-key order, leases and every other relay sharing the table
//! stay as they are. When no keys wait, a claim scans as usual every
//! `scan_every` (retries, rows scheduled for later, rows from before the
//! slot), and keeps scanning while the scans find work.
//!
//! A transaction is *settled* once every batch that took its keys has been
//! written (published and marked, or written back for a retry), or its
//! keys' claim handed out nothing (the rows are held, and stay in the table
//! for a later claim). The feed's acknowledged position ([`KeyFeed::acked`])
//! is the end of the last transaction such that it and every earlier one
//! are settled: what a source may confirm upstream. The table, not the
//! feed, holds what is still to do, so a position confirmed too early could
//! only delay a row until a scan finds it, never lose it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use uuid::Uuid;

use super::outcome::lock;

/// One inserted row a source saw committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FedRow {
    /// The row's id.
    pub id: Uuid,
    /// Its key: topic.
    pub topic: String,
    /// Its key: partition key.
    pub partition_key: String,
}

/// The rows of one key in one transaction, waiting for a claim.
#[derive(Debug, Clone)]
struct Entry {
    key: (String, String),
    ids: Vec<Uuid>,
    /// The transaction's end position.
    lsn: u64,
    /// Claims that walked the key without handing out all of these rows.
    tries: u8,
}

/// How long a claim that did not hand out a fed row waits before walking
/// its key again, by try: the stream can deliver a commit a moment before
/// the transaction is visible to other sessions (the walsender reads the
/// flushed WAL; the committing backend then publishes its commit), and a
/// key's earlier row may be about to be written. After the last, the row
/// is left to the scans.
const PARK: [Duration; 3] = [
    Duration::from_millis(2),
    Duration::from_millis(10),
    Duration::from_millis(50),
];

#[derive(Debug)]
struct State {
    queue: VecDeque<Entry>,
    /// Entries a claim did not hand out all of, with when to walk them again.
    parked: Vec<(Instant, Entry)>,
    /// Per transaction end position, its entries not yet settled.
    open: BTreeMap<u64, usize>,
    /// The highest position pushed or reported idle.
    seen: u64,
    next_scan: Instant,
    /// The last scan found rows: scan again at once.
    scanning: bool,
    /// The last claim was a scan: the next one serves waiting keys first,
    /// so scans cannot crowd the keys out.
    last_was_scan: bool,
    /// Rows pushed (for reports).
    pushed: u64,
}

/// Keys to claim, pushed by a source, with the position it may confirm.
#[derive(Debug)]
pub struct KeyFeed {
    state: Mutex<State>,
    notify: Notify,
    acked: watch::Sender<u64>,
    scan_every: Duration,
}

/// What the next claim does.
pub(crate) enum Take {
    /// Walk these keys; the receipt settles them once the batch is written.
    Keys(Vec<(String, String)>, Receipt),
    /// Scan the table as usual.
    Scan,
    /// Nothing to claim now.
    Nothing,
}

impl KeyFeed {
    /// A feed whose claims scan the table every `scan_every` when no keys
    /// wait (and again at once while scans find rows). `start` is the
    /// position already confirmed.
    pub fn new(scan_every: Duration, start: u64) -> Arc<Self> {
        Arc::new(KeyFeed {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                parked: Vec::new(),
                open: BTreeMap::new(),
                seen: start,
                // The first claim scans: rows written before the source
                // started are the table's, not the stream's.
                next_scan: Instant::now(),
                scanning: true,
                last_was_scan: false,
                pushed: 0,
            }),
            notify: Notify::new(),
            acked: watch::Sender::new(start),
            // Never a busy loop of scans.
            scan_every: scan_every.max(Duration::from_millis(10)),
        })
    }

    /// One committed transaction ending at `lsn`, with the rows it inserted
    /// (any order; kept in commit order per key). A transaction without rows
    /// only moves the position; one at or before a position pushed already
    /// is ignored (a stream resumed from the confirmed position sends
    /// transactions again).
    pub fn push(&self, lsn: u64, rows: Vec<FedRow>) {
        let mut s = lock(&self.state);
        // A transaction at or before a position already pushed or passed
        // idle is queued or settled already: a resumed stream sends it again.
        if lsn <= s.seen {
            return;
        }
        s.seen = lsn;
        if rows.is_empty() {
            drop(s);
            self.recompute();
            return;
        }
        s.pushed += rows.len() as u64;
        let mut entries: Vec<Entry> = Vec::new();
        let mut at: HashMap<(String, String), usize> = HashMap::with_capacity(rows.len());
        for r in rows {
            let key = (r.topic, r.partition_key);
            match at.get(&key) {
                Some(&i) => {
                    if let Some(e) = entries.get_mut(i) {
                        e.ids.push(r.id);
                    }
                }
                None => {
                    at.insert(key.clone(), entries.len());
                    entries.push(Entry {
                        key,
                        ids: vec![r.id],
                        lsn,
                        tries: 0,
                    });
                }
            }
        }
        *s.open.entry(lsn).or_default() += entries.len();
        s.queue.extend(entries);
        drop(s);
        self.notify.notify_one();
    }

    /// The source is at `lsn` with nothing more to push before it (an idle
    /// stream's keep-alive): once everything pushed is settled, the
    /// position may move there.
    pub fn idle_at(&self, lsn: u64) {
        {
            let mut s = lock(&self.state);
            s.seen = s.seen.max(lsn);
        }
        self.recompute();
    }

    /// The position a source may confirm: every transaction up to it is
    /// settled.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.acked.subscribe()
    }

    /// Rows pushed so far.
    pub fn pushed(&self) -> u64 {
        lock(&self.state).pushed
    }

    /// Keys waiting for a claim.
    pub fn waiting(&self) -> usize {
        lock(&self.state).queue.len()
    }

    /// Resolves when keys are pushed or a scan is due, or after `max`.
    pub async fn wait(&self, max: Duration) {
        let due = {
            let s = lock(&self.state);
            if !s.queue.is_empty() {
                return;
            }
            let now = Instant::now();
            s.parked
                .iter()
                .map(|(at, _)| *at)
                .chain([s.next_scan])
                .min()
                .unwrap_or(s.next_scan)
                .saturating_duration_since(now)
        };
        let _ = tokio::time::timeout(max.min(due), self.notify.notified()).await;
    }

    /// What the next claim does: a scan when one is due (every
    /// `scan_every`, and at once while scans find rows and no keys wait),
    /// else the waiting keys: whole entries in order while their rows fit
    /// in `limit` (at least one entry).
    pub(crate) fn take(self: &Arc<Self>, limit: u32) -> Take {
        let mut s = lock(&self.state);
        let now = Instant::now();
        if s.parked.iter().any(|(at, _)| *at <= now) {
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut s.parked)
                .into_iter()
                .partition(|(at, _)| *at <= now);
            s.parked = later;
            for (_, e) in due.into_iter().rev() {
                s.queue.push_front(e);
            }
        }
        // A scan when one is due, even while keys wait: retries and rows
        // scheduled for later are found by scans only, so a busy stream
        // must not starve them.
        let keys_first = s.last_was_scan && !s.queue.is_empty();
        if !keys_first && (s.next_scan <= now || (s.queue.is_empty() && s.scanning)) {
            s.next_scan = now + self.scan_every;
            s.last_was_scan = true;
            return Take::Scan;
        }
        s.last_was_scan = false;
        if s.queue.is_empty() {
            return Take::Nothing;
        }
        let mut taken = Vec::new();
        let mut rows = 0usize;
        while let Some(e) = s.queue.front() {
            if !taken.is_empty() && rows + e.ids.len() > limit as usize {
                break;
            }
            rows += e.ids.len();
            if let Some(e) = s.queue.pop_front() {
                taken.push(e);
            }
        }
        let mut seen = HashSet::new();
        let keys = taken
            .iter()
            .filter(|e| seen.insert(&e.key))
            .map(|e| e.key.clone())
            .collect();
        Take::Keys(
            keys,
            Receipt {
                feed: Arc::clone(self),
                entries: taken,
            },
        )
    }

    /// A scan's result: while scans find rows, the next claim scans too.
    pub(crate) fn scanned(&self, found: bool) {
        lock(&self.state).scanning = found;
    }

    fn settle(&self, entries: &[Entry]) {
        {
            let mut s = lock(&self.state);
            for e in entries {
                if let Some(n) = s.open.get_mut(&e.lsn) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        self.recompute();
    }

    /// Entries a claim that was not full did not hand out all of: walked
    /// again after a short wait (`PARK`), then left to the scans.
    fn park(&self, entries: Vec<Entry>) {
        let mut given_up = Vec::new();
        {
            let mut s = lock(&self.state);
            let now = Instant::now();
            for mut e in entries {
                match PARK.get(usize::from(e.tries)) {
                    Some(wait) => {
                        e.tries += 1;
                        s.parked.push((now + *wait, e));
                    }
                    None => given_up.push(e),
                }
            }
        }
        self.settle(&given_up);
        self.notify.notify_one();
    }

    /// One more open entry of the transaction at `lsn` (an entry split).
    fn add_open(&self, lsn: u64) {
        *lock(&self.state).open.entry(lsn).or_default() += 1;
    }

    /// Puts entries back at the front of the queue, in their order.
    fn requeue(&self, entries: Vec<Entry>) {
        {
            let mut s = lock(&self.state);
            for e in entries.into_iter().rev() {
                s.queue.push_front(e);
            }
        }
        self.notify.notify_one();
    }

    fn recompute(&self) {
        let mut s = lock(&self.state);
        let mut acked = *self.acked.borrow();
        while let Some((&lsn, &n)) = s.open.first_key_value() {
            if n > 0 {
                break;
            }
            acked = acked.max(lsn);
            s.open.pop_first();
        }
        if s.open.is_empty() {
            acked = acked.max(s.seen);
        }
        drop(s);
        self.acked.send_if_modified(|a| {
            if acked > *a {
                *a = acked;
                true
            } else {
                false
            }
        });
    }
}

/// The keys one claim took: settled when dropped (the batch written, or
/// nothing handed out).
pub(crate) struct Receipt {
    feed: Arc<KeyFeed>,
    entries: Vec<Entry>,
}

impl Receipt {
    /// The claim handed out `ids`. The rows it handed out settle with this
    /// receipt (an entry partly handed out is split). The others go back to
    /// the queue when the claim was full (`full`: as many rows as it could
    /// take) and their key gave rows or was not reached; otherwise they are
    /// parked (not visible yet, or held: walked again shortly, then left to
    /// the scans). Entries of topics outside `topics` (when not empty) are
    /// never claimed here: they settle.
    pub(crate) fn claimed(&mut self, ids: &HashSet<Uuid>, full: bool, topics: &[String]) {
        // The last entry that got rows: when the claim was full, entries
        // after it that got none were not reached (their keys come later).
        let reached = self
            .entries
            .iter()
            .rposition(|e| e.ids.iter().any(|id| ids.contains(id)));
        let mut keep = Vec::new();
        let (mut back, mut park) = (Vec::new(), Vec::new());
        for (i, e) in std::mem::take(&mut self.entries).into_iter().enumerate() {
            // A topic the claims do not take: nothing to wait for.
            if !topics.is_empty() && !topics.contains(&e.key.0) {
                keep.push(e);
                continue;
            }
            let (given, left): (Vec<Uuid>, Vec<Uuid>) =
                e.ids.iter().partition(|id| ids.contains(id));
            if left.is_empty() {
                keep.push(e);
                continue;
            }
            let got_some = !given.is_empty();
            let rest = Entry {
                ids: left,
                ..e.clone()
            };
            if got_some {
                // Part went out with this batch: that part settles with
                // it, the rest is an entry of its own.
                self.feed.add_open(e.lsn);
                keep.push(Entry { ids: given, ..e });
            }
            // A full claim: a key that gave rows has more to give, and one
            // not reached is still to be walked. Otherwise the rows are held
            // or not visible yet: parked, then left to the scans.
            let not_reached = reached.is_none_or(|r| i > r);
            if full && (got_some || not_reached) {
                back.push(rest);
            } else {
                park.push(rest);
            }
        }
        self.entries = keep;
        if !back.is_empty() {
            self.feed.requeue(back);
        }
        if !park.is_empty() {
            self.feed.park(park);
        }
    }

    /// The claim failed: every entry goes back to the queue, unsettled.
    pub(crate) fn give_back(mut self) {
        let entries = std::mem::take(&mut self.entries);
        self.feed.requeue(entries);
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        self.feed.settle(&self.entries);
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipt")
            .field("entries", &self.entries.len())
            .finish()
    }
}

#[cfg(test)]
mod tests;
