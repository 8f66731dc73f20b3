//! An event's stored state, apart from what it was created with: how a
//! store of your own writes an event's columns and reads them back into an
//! [`Event`] ([`Event::state`], [`Event::with_state`]).

use super::event::{ClockDefault, Event};
use super::limits::LAST_ERROR_MAX_LENGTH;
use super::status::EventStatus;
use super::time::{self, Timestamp};
use super::validate;
use crate::error::{Error, Result};

/// What a store keeps of an event besides what it was created with
/// ([`DomainService::create_outbox_event`](crate::DomainService::create_outbox_event)
/// and `create_inbox_event` build that part, validated): its place in the
/// table, its status, its attempts and its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventState {
    /// Insertion order, given by the store (`None` until stored). The
    /// outbox's claim hands out a key's events in this order.
    pub seq: Option<i64>,
    /// Pending, completed or failed.
    pub status: EventStatus,
    /// Counted failures so far.
    pub attempts_made: i32,
    /// The last failure's text.
    pub last_error: Option<String>,
    /// When the event is due (a retry moves it).
    pub scheduled_at: Timestamp,
    /// When it was completed (set iff completed).
    pub completed_at: Option<Timestamp>,
    /// Who holds it, if anyone.
    pub lock: Option<EventLock>,
    /// When the row last changed.
    pub updated_at: Timestamp,
}

/// An event's lock: the claim holding it. The worker and the lock time
/// together are the claim's fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLock {
    /// The worker holding it.
    pub by: String,
    /// When it was claimed.
    pub at: Timestamp,
    /// When the claim's lease runs out.
    pub until: Timestamp,
}

impl<R: super::Route> Event<R> {
    /// Its stored state, to write into a store's own columns.
    pub fn state(&self) -> EventState {
        EventState {
            seq: self.seq,
            status: self.status,
            attempts_made: self.attempts_made,
            last_error: self.last_error.clone(),
            scheduled_at: self.scheduled_at,
            completed_at: self.completed_at,
            lock: match (&self.locked_by, self.locked_at, self.locked_until) {
                (Some(by), Some(at), Some(until)) => Some(EventLock {
                    by: by.clone(),
                    at,
                    until,
                }),
                _ => None,
            },
            updated_at: self.updated_at,
        }
    }

    /// The event as a store kept it: this event (as created, its fields
    /// validated by the [`DomainService`](crate::DomainService), with the
    /// id and `created_at` it was stored with) in `state`. A state the
    /// engine could not have written is refused (see
    /// [`validate_invariants`](Event::validate_invariants)): completed
    /// without a completion time, more attempts than allowed, a lock on a
    /// row that is not pending, a worker id that is not one, an error text
    /// longer than the store keeps, a lease that ends before it began. A
    /// pending row whose attempts are used up (a row changed outside
    /// omnibox can be so) is taken: the processor fails it cleanly.
    ///
    /// A store of your own reads its row back with both steps:
    ///
    /// ```
    /// use omnibox::{DomainService, EventLock, EventState, EventStatus, NewOutboxEvent, time};
    ///
    /// # fn main() -> omnibox::Result<()> {
    /// let created = time::now();
    /// let mut new = NewOutboxEvent::new("order", uuid::Uuid::now_v7(), "order.created",
    ///     "orders", "order-1", serde_json::json!({"total": 10}));
    /// new.id = Some(uuid::Uuid::now_v7());
    /// new.created_at = Some(created);
    /// let event = DomainService::default().create_outbox_event(new)?.with_state(EventState {
    ///     seq: Some(7),
    ///     status: EventStatus::Pending,
    ///     attempts_made: 1,
    ///     last_error: Some("broker said no".into()),
    ///     scheduled_at: created,
    ///     completed_at: None,
    ///     lock: Some(EventLock { by: "relay-1".into(), at: created, until: created }),
    ///     updated_at: created,
    /// })?;
    /// assert_eq!((event.seq(), event.attempts_made()), (Some(7), 1));
    /// assert_eq!(event.locked_by(), Some("relay-1"));
    /// # Ok(()) }
    /// ```
    pub fn with_state(mut self, state: EventState) -> Result<Self> {
        if let Some(lock) = &state.lock {
            validate::WorkerId::new(&lock.by)?;
            if lock.until < lock.at {
                return Err(Error::validation(
                    "lock",
                    "its lease cannot end before it was taken (until < at)",
                ));
            }
        }
        if let Some(e) = &state.last_error
            && e.len() > LAST_ERROR_MAX_LENGTH
        {
            return Err(Error::validation(
                "last_error",
                format!(
                    "is {} bytes; a store keeps at most {LAST_ERROR_MAX_LENGTH}",
                    e.len()
                ),
            ));
        }
        self.seq = state.seq;
        self.status = state.status;
        self.attempts_made = state.attempts_made;
        self.last_error = state.last_error;
        self.scheduled_at = time::truncate(state.scheduled_at);
        self.completed_at = state.completed_at.map(time::truncate);
        (self.locked_by, self.locked_at, self.locked_until) = match state.lock {
            Some(l) => (
                Some(l.by),
                Some(time::truncate(l.at)),
                Some(time::truncate(l.until)),
            ),
            None => (None, None, None),
        };
        self.updated_at = time::truncate(state.updated_at);
        self.clock_default = ClockDefault::default();
        // A pending row whose attempts are used up is read as it is: the
        // built-in stores read it too, and the processor fails it cleanly.
        self.invariants(true)?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random states, seeded (`OMNIBOX_STATE_SEED` replays one): a state is
    /// either refused with a validation error or taken whole, and a taken
    /// one reads back the same and keeps every invariant. Never a panic.
    #[test]
    fn with_state_takes_valid_states_whole_and_refuses_the_rest() {
        let seeds: Vec<u64> = match std::env::var("OMNIBOX_STATE_SEED") {
            Ok(s) => vec![s.parse().expect("a number")],
            Err(_) => (0..2000).collect(),
        };
        let created = time::truncate(time::now());
        let base = crate::domain::testing::order_created(
            uuid::Uuid::nil(),
            "k",
            serde_json::json!({"n": 1}),
        );
        let workers = ["relay-1", "", "two words", "a/b:c.d-e", "\u{7}bell"];
        let mut taken = 0;
        for seed in seeds {
            let mut rng = fastrand::Rng::with_seed(seed);
            let at = |rng: &mut fastrand::Rng| {
                created + chrono::Duration::milliseconds(rng.i64(0..5000))
            };
            let status = [
                EventStatus::Pending,
                EventStatus::Completed,
                EventStatus::Failed,
            ][rng.usize(0..3)];
            let state = EventState {
                seq: rng.bool().then(|| rng.i64(1..1000)),
                status,
                attempts_made: rng.i32(-1..8),
                last_error: rng.bool().then(|| "e".repeat(rng.usize(0..2100))),
                scheduled_at: at(&mut rng),
                completed_at: rng.bool().then(|| at(&mut rng)),
                lock: rng.bool().then(|| EventLock {
                    by: workers[rng.usize(0..workers.len())].to_string(),
                    at: at(&mut rng),
                    until: at(&mut rng),
                }),
                updated_at: at(&mut rng),
            };
            match base.clone().with_state(state.clone()) {
                Ok(event) => {
                    taken += 1;
                    assert_eq!(event.state(), state, "seed {seed}");
                    event.invariants(true).unwrap();
                    assert_eq!(event.id(), base.id(), "seed {seed}");
                }
                Err(e) => assert!(
                    matches!(e, crate::error::Error::Validation { .. }),
                    "seed {seed}: {e:?}"
                ),
            }
        }
        if std::env::var("OMNIBOX_STATE_SEED").is_err() {
            assert!(taken > 50, "too few valid states drawn: {taken}");
        }
    }
}
