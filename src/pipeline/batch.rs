//! A batch between its claim and its written results: its stages
//! ([`ClaimedBatch`], [`HandledBatch`]) and the lease heartbeat that keeps its rows
//! while it is in flight.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::flight::Flight;
use super::outcome::{HeldRows, Outcome, lock};
use crate::model::Route;
use crate::store::{Claim, ClaimToken, EventStore};

/// A claimed and handled batch whose results are not written yet. Its
/// lease is kept alive until the results are written.
#[derive(Debug)]
pub struct HandledBatch<R> {
    pub(super) claim: Claim<R>,
    pub(super) outcomes: Vec<Outcome>,
    pub(super) handle_time: Duration,
    pub(super) lag: Duration,
    pub(super) heartbeat: Heartbeat,
    pub(super) ticket: Ticket,
    /// The lease ran out before the batch was sent: it was not sent, and
    /// its rows may be another worker's now.
    pub(super) forfeited: bool,
}

/// A claimed batch not handled yet (see [`Processor::fetch`](super::Processor::fetch)). Its lease is
/// kept alive from the claim on.
#[derive(Debug)]
pub struct ClaimedBatch<R> {
    pub(super) claim: Claim<R>,
    pub(super) lag: Duration,
    pub(super) heartbeat: Heartbeat,
    pub(super) held: HeldRows,
    pub(super) ticket: Ticket,
}

/// A batch's place in the worker's [`Flight`]: dropped once its results
/// are written (or the batch is given up), which tells the flight.
#[derive(Debug)]
pub(super) struct Ticket {
    pub(super) flight: Arc<Mutex<Flight>>,
    pub(super) no: u64,
    /// The keys of a fed claim, settled when the batch is written (after
    /// the flight is: fields drop after `drop`).
    pub(super) receipt: Option<super::feed::Receipt>,
}

impl Drop for Ticket {
    /// Marks the batch written in the flight (every key unsettled if it never got
    /// handled), whatever way the batch ends.
    fn drop(&mut self) {
        lock(&self.flight).written(self.no);
    }
}

impl<R> ClaimedBatch<R> {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.claim.events.len()
    }

    /// True when the batch is empty (never, in practice).
    pub fn is_empty(&self) -> bool {
        self.claim.events.is_empty()
    }
}

/// What [`Processor::fetch`](super::Processor::fetch) got.
#[derive(Debug)]
pub enum NextBatch<R> {
    /// A batch, to be handled with [`Processor::handle`](super::Processor::handle).
    Batch(Box<ClaimedBatch<R>>),
    /// Nothing was handed out (see `NextHandled::Empty`).
    Empty {
        /// Rows were lost to a concurrent claim.
        contended: bool,
        /// The scan stopped at its bound; claim again to go on.
        more: bool,
    },
}

/// What [`Processor::claim_and_handle`](super::Processor::claim_and_handle) got.
#[derive(Debug)]
pub enum NextHandled<R> {
    /// A batch, handled, to be written with [`Processor::finish`](super::Processor::finish).
    Batch(Box<HandledBatch<R>>),
    /// Nothing was handed out. `contended`: rows were wanted that another
    /// worker was claiming at the same moment (so it is worth trying again).
    /// `more`: the claim examined as many due rows as it may and all were
    /// held; the next claim goes on after them (so claim again at once).
    Empty {
        /// Rows were lost to a concurrent claim.
        contended: bool,
        /// The scan stopped at its bound; claim again to go on.
        more: bool,
    },
}

/// Keeps a batch's lease alive while it is in flight: every third of the
/// lease, the rows' `locked_until` is pushed a lease ahead. A process that
/// dies stops extending, and its rows come free when the lease runs out.
/// It also knows, by this process's clock, until when the lease is surely
/// held: a process paused (SIGSTOP, a VM pause) past it must not send the
/// batch, which may be another worker's by then.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
    pub(super) valid_until: Arc<Mutex<Instant>>,
}

impl Heartbeat {
    /// Extends the lease of `ids`, held by `token`, every third of `lease`
    /// until stopped or dropped.
    pub(crate) fn for_rows<R: Route, S: EventStore<R>>(
        store: &S,
        token: ClaimToken,
        ids: Vec<Uuid>,
        lease: Duration,
    ) -> Self {
        Self::for_shared(store, token, Arc::new(Mutex::new(ids)), lease)
    }

    /// Like [`for_rows`](Heartbeat::for_rows), for the rows in `ids` at each
    /// beat: the caller removes the rows it has settled.
    pub(crate) fn for_shared<R: Route, S: EventStore<R>>(
        store: &S,
        token: ClaimToken,
        ids: Arc<Mutex<Vec<Uuid>>>,
        lease: Duration,
    ) -> Self {
        // The claim was taken just before: its lease runs from about now.
        let valid_until = Arc::new(Mutex::new(
            Instant::now()
                .checked_add(lease)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365)),
        ));
        let period = lease / 3;
        if period.is_zero() || ids.lock().map(|i| i.is_empty()).unwrap_or(true) {
            return Heartbeat {
                task: None,
                valid_until,
            };
        }
        let store = store.clone();
        let until = valid_until.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let ids: Vec<Uuid> = match ids.lock() {
                    Ok(i) => i.clone(),
                    Err(_) => return,
                };
                if ids.is_empty() {
                    continue;
                }
                let beat = Instant::now();
                match store.extend_lease(&token, &ids, lease).await {
                    Ok(held) if held < ids.len() => tracing::warn!(
                        held,
                        claimed = ids.len(),
                        "some rows of the batch in flight are no longer held by this worker \
                         (an operator unlocked them, or the lease ran out)"
                    ),
                    Ok(_) => {
                        if let (Ok(mut u), Some(t)) = (until.lock(), beat.checked_add(lease)) {
                            *u = t;
                        }
                        tracing::debug!(rows = ids.len(), "lease extended")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not extend the lease of the batch in flight")
                    }
                }
            }
        });
        Heartbeat {
            task: Some(task),
            valid_until,
        }
    }

    /// True once the lease may have run out, by this process's clock.
    pub(crate) fn expired(&self) -> bool {
        self.valid_until
            .lock()
            .map(|u| Instant::now() >= *u)
            .unwrap_or(false)
    }

    /// Stops extending the lease (aborts the task); the rows stay locked until their
    /// lease runs out or their results are written. Calling it again does nothing.
    pub(crate) fn stop(&mut self) {
        if let Some(h) = self.task.take() {
            h.abort();
        }
    }
}

impl Drop for Heartbeat {
    /// Stops the lease extension, so a dropped batch's rows come free with their lease.
    fn drop(&mut self) {
        self.stop();
    }
}

impl<R> HandledBatch<R> {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.claim.events.len()
    }

    /// True when the batch is empty (never, in practice).
    pub fn is_empty(&self) -> bool {
        self.claim.events.is_empty()
    }
}
