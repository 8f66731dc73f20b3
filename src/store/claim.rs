//! The outbox claim's plan, shared by every backend (docs/design.md, "The
//! claim").
//!
//! A backend claims in three steps inside one transaction:
//!
//! 1. **Discover keys.** Scan the due, unlocked rows in `(scheduled_at, seq)`
//!    order from the claimer's cursor (and the rows whose lease expired); the
//!    keys of those rows, in the order met, are the claim's candidate keys
//!    ([`candidates`]). The scan examines a bounded number of rows: when it
//!    stops at the bound, the claim says where, and the next claim goes on
//!    from there, so no claim costs more than the bound.
//! 2. **Walk each key**, in that order: one probe of the per-key index finds
//!    its *head* (first active row); a key whose head is held (locked by a
//!    live lease, or tried and waiting for its retry) yields nothing, any
//!    other yields its active rows from the head in `seq` order, until N
//!    rows are in hand (later keys are not even probed); [`plan`] cuts each
//!    key's *run*. Openness is decided once per key, from the head, so the
//!    backlog behind a held head never takes a place in the claim, and a row
//!    scheduled before its head (clock skew, a replayed head) leads the
//!    claim to the head.
//! 3. **Lock and mark** the planned rows (`SKIP LOCKED` on PostgreSQL); rows
//!    another claimer took in the meantime cut their key's run there
//!    ([`keep_locked_prefixes`]), so a key is never handed out with a hole.
//!
//! Terms, for the pending rows of one key `(topic, partition_key)`:
//! * *active*: due (or due within [`KEY_ORDER_GRACE`]), or tried
//!   (`last_error` set), or locked. A row scheduled for later and never
//!   tried is not active: it does not hold its key up.
//! * *ready*: due, and unlocked or its lease (`locked_until`) has passed.
//! * the *head*: the key's first active row (by `seq`).
//! * the *run*: the head and the ready rows right after it, up to the first
//!   active row that is not ready. A tried head is handed out alone (its
//!   successors wait for its outcome), and a tried row after the head ends
//!   the run. A key whose head is free while the row after it is locked by
//!   a live lease (an operator unlocked the head of a run in flight) hands
//!   out nothing until that claim is done.

use std::collections::HashSet;

use uuid::Uuid;

use crate::model::{Event, Timestamp};
use crate::store::{Claim, ClaimCursor, ClaimOptions, ClaimToken};

/// A row due within this long counts as due for its key's order (it holds
/// its key up), though it is handed out only once due: a row written "now"
/// by a transaction that committed while a claim ran must not be taken for
/// one scheduled for later, which would let its successor go first.
pub(crate) const KEY_ORDER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How many due rows a spreading claim skips: at random, up to four batches.
pub(crate) fn spread_skip(limit: u32, spread: bool) -> i64 {
    if spread {
        fastrand::i64(0..=i64::from(limit.saturating_mul(4)))
    } else {
        0
    }
}

/// Before every due time: the cursor of a claim that starts at the oldest
/// due row (year 1, which every database here can store).
pub(crate) const BEGINNING: Timestamp = match chrono::DateTime::from_timestamp(-62_135_596_800, 0) {
    Some(t) => t,
    // Evaluated at compile time: 0001-01-01 is within chrono's range.
    None => panic!("0001-01-01 is a valid time"),
};

/// Where a claim's scan starts: after the cursor the claimer passed, or at
/// the [`BEGINNING`].
pub(crate) fn start(opts: &ClaimOptions) -> ClaimCursor {
    opts.after.unwrap_or(ClaimCursor {
        scheduled_at: BEGINNING,
        seq: 0,
    })
}

/// A claim's result: `events` in `seq` order and the claim's token, whose
/// `locked_at` is `locked_at` or, when `None`, the value the events got
/// (PostgreSQL: the claiming transaction's `now()`; this clock's time when
/// there are none).
pub(crate) fn claimed<R>(
    opts: &ClaimOptions,
    locked_at: Option<Timestamp>,
    mut events: Vec<Event<R>>,
    contended: bool,
    next: Option<ClaimCursor>,
) -> Claim<R> {
    events.sort_by_key(|e| e.seq);
    let locked_at = locked_at.unwrap_or_else(|| {
        events
            .first()
            .and_then(|e| e.locked_at)
            .unwrap_or_else(crate::model::time::now)
    });
    Claim {
        token: ClaimToken {
            worker: opts.worker.clone(),
            locked_at,
            lease: opts.lease,
            created_between: created_between(&events),
        },
        events,
        contended,
        next,
    }
}

/// The earliest and latest `created_at` of `events` (`None` for none).
pub(crate) fn created_between<R>(
    events: &[crate::model::Event<R>],
) -> Option<(Timestamp, Timestamp)> {
    let first = events.iter().map(|e| e.created_at).min()?;
    let last = events.iter().map(|e| e.created_at).max()?;
    Some((first, last))
}

/// One row of step 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// The row's key.
    pub topic: String,
    /// The row's key.
    pub partition_key: String,
    /// Its due time.
    pub scheduled_at: Timestamp,
    /// Its insertion order.
    pub seq: i64,
    /// Found through its expired lease (not the cursor's scan).
    pub expired: bool,
}

/// What step 1 found: the keys to walk, in order (all of them: a held key
/// yields nothing, and step 2 stops once it has enough rows), and where the
/// next claim goes on (`None`: the scan reached the end; the next claim
/// starts over).
pub(crate) fn candidates(
    scanned: &[Scanned],
    examined_limit: usize,
) -> (Vec<(String, String)>, Option<ClaimCursor>) {
    let in_order: Vec<&Scanned> = scanned.iter().filter(|r| !r.expired).collect();
    let next = if in_order.len() >= examined_limit {
        in_order.last().map(|r| ClaimCursor {
            scheduled_at: r.scheduled_at,
            seq: r.seq,
        })
    } else {
        None
    };
    let mut rows: Vec<&Scanned> = scanned.iter().collect();
    rows.sort_by_key(|r| (r.scheduled_at, r.seq));
    let mut seen = HashSet::new();
    let mut keys = Vec::new();
    for r in rows {
        if seen.insert((r.topic.as_str(), r.partition_key.as_str())) {
            keys.push((r.topic.clone(), r.partition_key.clone()));
        }
    }
    (keys, next)
}

/// The keys a claim given its keys (`ClaimOptions::keys`) walks: those of
/// the filtered topics, each once, in the order given. No cursor: there
/// was no scan.
pub(crate) fn given(opts: &ClaimOptions) -> (Vec<(String, String)>, Option<ClaimCursor>) {
    let topics = &opts.filters.topics;
    let mut seen = HashSet::new();
    let keys = opts
        .keys
        .iter()
        .filter(|(t, _)| topics.is_empty() || topics.contains(t))
        .filter(|k| seen.insert(*k))
        .cloned()
        .collect();
    (keys, None)
}

/// One active row of a key, as step 2 reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WalkRow {
    /// The key's position in discovery order (the claim's fairness order).
    pub key: i64,
    /// The row.
    pub id: Uuid,
    /// Its insertion order.
    pub seq: i64,
    /// Due, and unlocked or lease expired.
    pub ready: bool,
    /// Tried before (`last_error` set).
    pub tried: bool,
    /// Locked by a live lease (another claim's, in flight).
    pub locked: bool,
    /// The payload's size (what a byte budget counts).
    pub bytes: u64,
}

/// The rows a key hands out, in `seq` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    /// The key's position in discovery order.
    pub key: i64,
    /// Ids in `seq` order.
    pub ids: Vec<Uuid>,
}

/// Cuts every key's run from the walked rows, keys in discovery order, at
/// most `limit` rows in all. `rows` hold each key's active rows in `seq`
/// order (rows of one key together); a key whose first row is not ready is
/// held and hands out nothing.
///
/// With a byte budget (`max_bytes`, the rows' payload sizes), the claim
/// stops at the first row that would take it past the budget: that row's
/// run ends before it and no later key is taken (a run is cut short, never
/// given a hole: the rows after the cut wait for the next claim, behind the
/// ones handed out). The first row of a claim is always taken, however
/// large, so a single event over the budget still goes out alone.
pub(crate) fn plan(rows: &[WalkRow], limit: usize, max_bytes: Option<u64>) -> Vec<Run> {
    let mut rows: Vec<&WalkRow> = rows.iter().collect();
    // Backends return the rows grouped and ordered already; sorting is cheap
    // insurance, and the order of keys is their discovery order.
    rows.sort_by_key(|r| (r.key, r.seq));
    let mut runs: Vec<Run> = Vec::new();
    let mut budget = limit;
    // Bytes left; `None`: no byte budget.
    let mut bytes_left = max_bytes;
    // Whether the row may be taken by the byte budget (the claim's first
    // row always is); takes its bytes when it may.
    let mut fits = |r: &WalkRow, first: bool| match &mut bytes_left {
        None => true,
        Some(left) if first || r.bytes <= *left => {
            *left = left.saturating_sub(r.bytes);
            true
        }
        Some(_) => false,
    };
    let mut i = 0;
    let mut full = false;
    while i < rows.len() && budget > 0 && !full {
        let key = rows[i].key;
        let end = rows[i..]
            .iter()
            .position(|r| r.key != key)
            .map_or(rows.len(), |n| i + n);
        let key_rows = &rows[i..end];
        i = end;
        // Not empty: `end` is past `i` (the row at `i` has this key).
        let head = key_rows[0];
        if !head.ready {
            continue;
        }
        // The head is free but the row after it is in flight: an operator
        // unlocked the head of a run a live claim is still publishing. The
        // key waits for that claim to finish (it may already have delivered
        // rows after the head).
        if key_rows.get(1).is_some_and(|r| r.locked) {
            continue;
        }
        if !fits(head, runs.is_empty()) {
            break;
        }
        let mut ids = vec![head.id];
        if !head.tried {
            for r in &key_rows[1..] {
                if ids.len() >= budget || !r.ready || r.tried {
                    break;
                }
                if !fits(r, false) {
                    full = true;
                    break;
                }
                ids.push(r.id);
            }
        }
        budget -= ids.len();
        runs.push(Run { key, ids });
    }
    runs
}

/// After step 3 locked what it could: each run keeps its rows up to the
/// first one that could not be locked. Returns the ids to mark, and whether
/// anything was cut (another claimer was at work on the same rows).
pub(crate) fn keep_locked_prefixes(runs: &[Run], locked: &HashSet<Uuid>) -> (Vec<Uuid>, bool) {
    let mut keep = Vec::new();
    let mut cut = false;
    for run in runs {
        for id in &run.ids {
            if !locked.contains(id) {
                cut = true;
                break;
            }
            keep.push(*id);
        }
    }
    (keep, cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: i64, seq: i64, ready: bool, tried: bool) -> WalkRow {
        WalkRow {
            key,
            id: Uuid::from_u128(seq as u128),
            seq,
            ready,
            tried,
            locked: false,
            bytes: 1,
        }
    }

    fn seqs(runs: &[Run]) -> Vec<Vec<u128>> {
        runs.iter()
            .map(|r| r.ids.iter().map(|id| id.as_u128()).collect())
            .collect()
    }

    /// A row of a case of [`runs_follow_the_heads_of_their_keys`].
    #[derive(Clone, Copy)]
    enum Seen {
        /// Ready, never tried.
        Due,
        /// Ready, tried before.
        Retry,
        /// Not ready (locked by someone else, or a retry not yet due).
        Waiting,
        /// Not ready and tried: a head that holds its key.
        Held,
        /// Not ready, locked by a live lease (another claim's, in flight).
        InFlight,
    }

    /// Rows of keys and states, their seqs 1, 2, ... in order.
    fn walk(rows: &[(i64, Seen)]) -> Vec<WalkRow> {
        (1..)
            .zip(rows)
            .map(|(seq, &(key, seen))| {
                let (ready, tried) = match seen {
                    Seen::Due => (true, false),
                    Seen::Retry => (true, true),
                    Seen::Waiting | Seen::InFlight => (false, false),
                    Seen::Held => (false, true),
                };
                WalkRow {
                    locked: matches!(seen, Seen::InFlight),
                    ..row(key, seq, ready, tried)
                }
            })
            .collect()
    }

    /// Which runs `plan` hands out (no bound reached), by rows' seqs.
    #[test]
    fn runs_follow_the_heads_of_their_keys() {
        use Seen::*;
        // What the case shows, its rows, and the runs handed out.
        type Case = (&'static str, &'static [(i64, Seen)], Vec<Vec<u128>>);
        let cases: [Case; 4] = [
            (
                "a free head before a row in flight waits",
                &[(1, Retry), (1, InFlight), (2, Due)],
                vec![vec![3]],
            ),
            (
                "runs stop at the first row that is not ready",
                &[(1, Due), (1, Due), (1, Waiting), (1, Due), (2, Due)],
                vec![vec![1, 2], vec![5]],
            ),
            (
                "a held head hands out nothing",
                &[(1, Held), (1, Due), (2, Due)],
                vec![vec![3]],
            ),
            (
                "a tried head goes alone and a tried row ends a run",
                &[(1, Retry), (1, Due), (2, Due), (2, Retry), (2, Due)],
                vec![vec![1], vec![3]],
            ),
        ];
        for (case, rows, runs) in cases {
            assert_eq!(seqs(&plan(&walk(rows), 100, None)), runs, "{case}");
        }
    }

    #[test]
    fn the_limit_is_filled_key_by_key_in_discovery_order() {
        let mut rows = Vec::new();
        for k in 0..3 {
            for s in 0..5 {
                rows.push(row(k, k * 10 + s, true, false));
            }
        }
        rows.reverse(); // backends may hand rows over in any order
        assert_eq!(
            seqs(&plan(&rows, 7, None)),
            vec![vec![0, 1, 2, 3, 4], vec![10, 11]]
        );
        assert!(plan(&rows, 0, None).is_empty());
    }

    #[test]
    fn a_byte_budget_cuts_a_run_and_ends_the_claim() {
        let sized = |key, seq, bytes| WalkRow {
            bytes,
            ..row(key, seq, true, false)
        };
        let rows = vec![
            sized(1, 1, 40),
            sized(1, 2, 40),
            sized(1, 3, 40), // past 100: the run ends before it
            sized(1, 4, 1),  // fits, but taking it would leave a hole
            sized(2, 5, 1),  // a later key: the claim has stopped
        ];
        assert_eq!(seqs(&plan(&rows, 100, Some(100))), vec![vec![1, 2]]);
        // A key's head that does not fit ends the claim before it.
        let rows = vec![sized(1, 1, 60), sized(2, 2, 60), sized(3, 3, 1)];
        assert_eq!(seqs(&plan(&rows, 100, Some(100))), vec![vec![1]]);
        // The first row goes out whatever its size, alone when it fills
        // the budget.
        let rows = vec![sized(1, 1, 500), sized(1, 2, 1), sized(2, 3, 1)];
        assert_eq!(seqs(&plan(&rows, 100, Some(100))), vec![vec![1]]);
        assert_eq!(seqs(&plan(&rows, 100, Some(0))), vec![vec![1]]);
        // Rows that fit exactly are taken; the row count still applies.
        let rows = vec![sized(1, 1, 50), sized(1, 2, 50), sized(2, 3, 0)];
        assert_eq!(
            seqs(&plan(&rows, 100, Some(100))),
            vec![vec![1, 2], vec![3]]
        );
        assert_eq!(seqs(&plan(&rows, 1, Some(100))), vec![vec![1]]);
        // A held key's rows cost nothing.
        let rows = vec![
            WalkRow {
                bytes: 1000,
                ..row(1, 1, false, true)
            },
            sized(2, 2, 100),
        ];
        assert_eq!(seqs(&plan(&rows, 100, Some(100))), vec![vec![2]]);
    }

    fn scanned(key: &str, seq: i64, expired: bool) -> Scanned {
        Scanned {
            topic: "t".into(),
            partition_key: key.into(),
            scheduled_at: crate::model::time::now(),
            seq,
            expired,
        }
    }

    #[test]
    fn candidates_are_keys_in_order_with_where_to_go_on() {
        let t0 = crate::model::time::now();
        let mut rows = vec![
            scanned("held", 1, false),
            scanned("b", 2, false),
            scanned("held", 3, false),
            scanned("a", 4, false),
            scanned("b", 5, false),
            scanned("dead-relay", 0, true),
        ];
        for (i, r) in rows.iter_mut().enumerate() {
            r.scheduled_at = t0 + chrono::Duration::milliseconds(i as i64);
        }
        rows[5].scheduled_at = t0 - chrono::Duration::seconds(1);
        let (keys, next) = candidates(&rows, 100);
        let names: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        assert_eq!(names, vec!["dead-relay", "held", "b", "a"]);
        assert_eq!(
            next, None,
            "fewer rows than the bound: the scan reached the end"
        );
        // The bound was reached: the next claim goes on after the last row
        // examined (the expired rows are not part of the cursor's scan).
        let (_, next) = candidates(&rows, 5);
        assert_eq!(next.map(|c| c.seq), Some(5));
    }

    #[test]
    fn locked_prefixes_cut_at_the_first_hole() {
        let runs = vec![
            Run {
                key: 1,
                ids: (1..=4).map(Uuid::from_u128).collect(),
            },
            Run {
                key: 2,
                ids: vec![Uuid::from_u128(9)],
            },
        ];
        let all: HashSet<Uuid> = (1..=9).map(Uuid::from_u128).collect();
        assert_eq!(
            keep_locked_prefixes(&runs, &all),
            (
                vec![1, 2, 3, 4, 9]
                    .into_iter()
                    .map(Uuid::from_u128)
                    .collect(),
                false
            )
        );
        let holes: HashSet<Uuid> = [1, 2, 4, 9].into_iter().map(Uuid::from_u128).collect();
        let (keep, cut) = keep_locked_prefixes(&runs, &holes);
        assert_eq!(
            keep,
            vec![1, 2, 9]
                .into_iter()
                .map(Uuid::from_u128)
                .collect::<Vec<_>>()
        );
        assert!(cut);
    }
}
