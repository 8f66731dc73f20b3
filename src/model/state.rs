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
    /// longer than the store keeps.
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
        self.validate_invariants()?;
        Ok(self)
    }
}
