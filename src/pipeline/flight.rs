//! A worker's batches in flight, per key (docs/design.md, "One key in a
//! pipeline").
//!
//! A worker may claim the rows of a key that come after rows it still has
//! in flight (see [`ClaimOptions::own`](crate::store::ClaimOptions::own)), so that
//! one busy key keeps the relay's pipeline full. That is safe only if
//!
//! 1. batches are handed to the broker in claim order (the runner's handle
//!    stage is sequential), and
//! 2. a batch holds back (releases unsent) its rows of every key that an
//!    earlier batch did not settle: a row of the key failed, was released or
//!    was not tried. The claim that took the later rows may have run before
//!    the earlier batch's results were written, so it could not see that the
//!    key is held.
//!
//! This module keeps what rule 2 needs: each batch's number (claims are
//! numbered as they start), the keys it holds with the first and last `seq`
//! of each, its state, and, once handled, its unsettled keys. A written
//! batch's unsettled keys still count for every batch claimed before the
//! write was committed (a claim starting later sees the write).

use std::collections::{BTreeMap, HashMap, HashSet};

/// `(topic, partition_key)`.
pub(crate) type Key = (String, String);

/// A worker's batches by claim number, from the claim's start until no batch still
/// to be handled can need them (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct Flight {
    /// The number the next claim gets.
    next: u64,
    batches: BTreeMap<u64, Batch>,
}

/// One claimed batch: the keys it holds and how far it has got.
#[derive(Debug)]
struct Batch {
    /// Keys held, with the first and last `seq` of each.
    keys: HashMap<Key, (i64, i64)>,
    state: State,
}

/// Where a batch is between its claim and the write of its results; a batch's
/// unsettled keys hold back later batches' rows of those keys.
#[derive(Debug)]
enum State {
    /// Claiming, or claimed and not handled yet.
    Claimed,
    /// Handled; results not written yet.
    Handled { unsettled: HashSet<Key> },
    /// Written (or given up): matters to batches claimed before `visible_from`.
    Written {
        unsettled: HashSet<Key>,
        visible_from: u64,
    },
}

/// Widens `key`'s `(first, last)` range in `ranges` to cover `range`.
pub(crate) fn widen(ranges: &mut HashMap<Key, (i64, i64)>, key: &Key, range: (i64, i64)) {
    match ranges.get_mut(key) {
        Some(r) => *r = (r.0.min(range.0), r.1.max(range.1)),
        None => {
            ranges.insert(key.clone(), range);
        }
    }
}

impl Flight {
    /// A claim starts: its number, and the keys of the batches still in
    /// flight (claimed or handled, not written), first and last `seq` each.
    pub(crate) fn begin_claim(&mut self) -> (u64, HashMap<Key, (i64, i64)>) {
        let no = self.next;
        self.next += 1;
        let mut own: HashMap<Key, (i64, i64)> = HashMap::new();
        for b in self.batches.values() {
            if matches!(b.state, State::Written { .. }) {
                continue;
            }
            for (k, &range) in &b.keys {
                widen(&mut own, k, range);
            }
        }
        self.batches.insert(
            no,
            Batch {
                keys: HashMap::new(),
                state: State::Claimed,
            },
        );
        (no, own)
    }

    /// The claim numbered `no` got these keys (empty: it got nothing, or failed).
    pub(crate) fn claimed(&mut self, no: u64, keys: HashMap<Key, (i64, i64)>) {
        if keys.is_empty() {
            self.batches.remove(&no);
            self.collect();
        } else if let Some(b) = self.batches.get_mut(&no) {
            b.keys = keys;
        }
    }

    /// The keys of batch `no` that must not be sent now: keys an earlier
    /// batch claimed and has not handled, and keys a batch left unsettled
    /// whose write this batch's claim may not have seen.
    pub(crate) fn held_back(&self, no: u64) -> HashSet<Key> {
        let Some(me) = self.batches.get(&no) else {
            return HashSet::new();
        };
        let mut held = HashSet::new();
        for (&other, b) in &self.batches {
            if other == no {
                continue;
            }
            let keys: Box<dyn Iterator<Item = &Key>> = match &b.state {
                State::Claimed if other < no => Box::new(b.keys.keys()),
                State::Claimed => continue,
                State::Handled { unsettled } => Box::new(unsettled.iter()),
                State::Written {
                    unsettled,
                    visible_from,
                } if no < *visible_from => Box::new(unsettled.iter()),
                State::Written { .. } => continue,
            };
            held.extend(keys.filter(|k| me.keys.contains_key(*k)).cloned());
        }
        held
    }

    /// Batch `no` was handled; `unsettled`: its keys with a row that was not
    /// completed.
    pub(crate) fn handled(&mut self, no: u64, unsettled: HashSet<Key>) {
        if let Some(b) = self.batches.get_mut(&no) {
            b.state = State::Handled { unsettled };
        }
    }

    /// Batch `no`'s results were written (or it was dropped: then every key
    /// it held counts as unsettled).
    pub(crate) fn written(&mut self, no: u64) {
        let visible_from = self.next;
        if let Some(b) = self.batches.get_mut(&no) {
            let unsettled = match std::mem::replace(&mut b.state, State::Claimed) {
                State::Handled { unsettled } => unsettled,
                State::Written { unsettled, .. } => unsettled,
                State::Claimed => b.keys.keys().cloned().collect(),
            };
            b.state = State::Written {
                unsettled,
                visible_from,
            };
        }
        self.collect();
    }

    /// Forgets written batches that no batch still to be handled can need.
    fn collect(&mut self) {
        let oldest_claimed = self
            .batches
            .iter()
            .find(|(_, b)| matches!(b.state, State::Claimed))
            .map_or(self.next, |(&no, _)| no);
        self.batches.retain(|_, b| match &b.state {
            State::Written { visible_from, .. } => *visible_from > oldest_claimed,
            _ => true,
        });
    }

    /// Batches remembered (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.batches.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> Key {
        ("t".into(), name.into())
    }

    fn keys(list: &[(&str, i64, i64)]) -> HashMap<Key, (i64, i64)> {
        list.iter().map(|&(n, a, b)| (k(n), (a, b))).collect()
    }

    #[test]
    fn a_claim_sees_the_keys_in_flight_and_not_the_written_ones() {
        let mut f = Flight::default();
        let (a, own) = f.begin_claim();
        assert!(own.is_empty());
        f.claimed(a, keys(&[("x", 1, 10), ("y", 3, 3)]));
        let (b, own) = f.begin_claim();
        assert_eq!(own, keys(&[("x", 1, 10), ("y", 3, 3)]));
        f.claimed(b, keys(&[("x", 11, 20)]));
        f.handled(a, HashSet::new());
        let (c, own) = f.begin_claim();
        assert_eq!(own, keys(&[("x", 1, 20), ("y", 3, 3)]));
        f.claimed(c, HashMap::new());
        f.written(a);
        let (_, own) = f.begin_claim();
        assert_eq!(own, keys(&[("x", 11, 20)]));
    }

    #[test]
    fn an_unsettled_key_holds_back_the_batches_claimed_before_its_write() {
        let mut f = Flight::default();
        let (a, _) = f.begin_claim();
        f.claimed(a, keys(&[("x", 1, 10), ("y", 1, 1)]));
        let (b, _) = f.begin_claim();
        f.claimed(b, keys(&[("x", 11, 20), ("y", 2, 2)]));
        f.handled(a, [k("x")].into());
        // b is handled while a is written: x is held back, y is not.
        assert_eq!(f.held_back(b), [k("x")].into());
        // A claim running while a is written took more of x.
        let (c, _) = f.begin_claim();
        f.written(a);
        f.claimed(c, keys(&[("x", 21, 30)]));
        f.handled(b, [k("x")].into());
        assert_eq!(f.held_back(c), [k("x")].into());
        f.written(b);
        // A claim that starts after both writes sees them in the database.
        let (d, _) = f.begin_claim();
        f.claimed(d, keys(&[("x", 31, 40)]));
        f.handled(c, HashSet::new());
        f.written(c);
        assert!(f.held_back(d).is_empty());
        f.handled(d, HashSet::new());
        f.written(d);
        assert_eq!(f.len(), 0);
    }

    /// Two batches claimed one after the other: `a` of x's rows 1–10, `b`
    /// of `second`.
    fn two_claims(second: &[(&str, i64, i64)]) -> (Flight, u64, u64) {
        let mut f = Flight::default();
        let (a, _) = f.begin_claim();
        f.claimed(a, keys(&[("x", 1, 10)]));
        let (b, _) = f.begin_claim();
        f.claimed(b, keys(second));
        (f, a, b)
    }

    #[test]
    fn a_batch_handled_out_of_order_holds_back_the_keys_of_earlier_ones() {
        let (f, a, b) = two_claims(&[("x", 11, 20), ("z", 1, 1)]);
        assert_eq!(f.held_back(b), [k("x")].into());
        assert!(f.held_back(a).is_empty());
    }

    #[test]
    fn a_dropped_batch_holds_every_key_it_had() {
        let (mut f, a, b) = two_claims(&[("x", 11, 20)]);
        f.written(a);
        assert_eq!(f.held_back(b), [k("x")].into());
    }
}
