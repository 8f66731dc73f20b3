//! The domain service: creates validated events and applies the pure state
//! transitions of docs/design.md, "Event lifecycle and rules" (the reference's `OmniBoxDomainService`).
//!
//! Nothing here touches a database: stores perform the same transitions in
//! SQL, guarded so that they hold under concurrency; this module is the
//! specification they follow, and what handlers and tests use in memory.

use std::time::Duration;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::limits::{self, Limits};
use crate::model::{
    Event, EventStatus, InboxEvent, InboxRoute, NewInboxEvent, NewOutboxEvent, OutboxEvent,
    OutboxRoute, Route, Timestamp, UnlockReason, WorkerId, time, validate,
};

/// Exponential backoff with equal jitter for counted failures:
/// `d = min(cap, base * 2^attempts_made)`, then a delay uniformly drawn from
/// `[d/2, d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: limits::DEFAULT_BACKOFF_BASE,
            cap: limits::DEFAULT_BACKOFF_CAP,
        }
    }
}

impl Backoff {
    /// The un-jittered delay after `attempts_made` counted failures.
    pub fn ceiling(&self, attempts_made: i32) -> Duration {
        let exp = attempts_made.clamp(0, 62) as u32;
        let factor = 1u64.checked_shl(exp).unwrap_or(u64::MAX);
        let base_ms = self.base.as_millis() as u64;
        Duration::from_millis(base_ms.saturating_mul(factor)).min(self.cap)
    }

    /// The delay with equal jitter: half fixed, half random.
    pub fn delay(&self, attempts_made: i32) -> Duration {
        self.delay_with(attempts_made, fastrand::f64())
    }

    /// The delay for a given random draw in `[0, 1)`, for tests.
    pub fn delay_with(&self, attempts_made: i32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempts_made);
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// How a failure is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A counted failure: `attempts_made + 1`; at `max_attempts` the event
    /// becomes `failed`. `None` schedules the retry by the backoff.
    Counted(Option<Timestamp>),
    /// A transient failure (the broker did not answer): no attempt spent; retry at this time.
    NotCounted(Timestamp),
    /// A transient failure retried this long after it is recorded; stores
    /// with a clock of their own (PostgreSQL) add it to their `now()`.
    NotCountedAfter(Duration),
}

impl Retry {
    /// True when the failure spends an attempt.
    pub fn is_counted(&self) -> bool {
        matches!(self, Retry::Counted(_))
    }
}

/// Creates events with the limits of the design's rules (docs/design.md) and applies the
/// lifecycle's pure transitions. `DomainService::default()` uses the default limits.
#[derive(Debug, Clone, Default)]
pub struct DomainService {
    limits: Limits,
    backoff: Backoff,
}

impl DomainService {
    /// A service with these limits and backoff.
    pub fn new(limits: Limits, backoff: Backoff) -> Self {
        DomainService { limits, backoff }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The backoff in force.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Validates a new outbox event and fills its defaults (UUIDv7 id, now,
    /// pending, 0 attempts).
    pub fn create_outbox_event(&self, new: NewOutboxEvent) -> Result<OutboxEvent> {
        let route = OutboxRoute {
            aggregate_type: validate::required(
                "aggregate_type",
                &new.aggregate_type,
                limits::AGGREGATE_TYPE_MAX_LENGTH,
            )?,
            aggregate_id: new.aggregate_id,
            topic: validate::required("topic", &new.topic, limits::TOPIC_MAX_LENGTH)?,
            partition_key: validate::required(
                "partition_key",
                &new.partition_key,
                limits::PARTITION_KEY_MAX_LENGTH,
            )?,
        };
        let common = event_fields!(new, id: new.id, idempotency_key: new.idempotency_key);
        self.build(common, route)
    }

    /// Validates a new inbox event and fills its defaults. Its id, unless
    /// given, is [`inbox_event_id`] of its consumer group and message id, so
    /// every delivery of one message has the same event id (what a handler
    /// uses to make its external effects idempotent).
    pub fn create_inbox_event(&self, new: NewInboxEvent) -> Result<InboxEvent> {
        let route = InboxRoute {
            message_id: validate::required(
                "message_id",
                &new.message_id,
                limits::MESSAGE_ID_MAX_LENGTH,
            )?,
            // Half of the deduplication key: taken exactly, as the consumer
            // takes it (a padded group is refused, never trimmed).
            consumer_group: {
                validate::consumer_group(&new.consumer_group)?;
                new.consumer_group
            },
            source: validate::required("source", &new.source, limits::SOURCE_MAX_LENGTH)?,
        };
        let id = new
            .id
            .or_else(|| Some(inbox_event_id(&route.consumer_group, &route.message_id)));
        let common = event_fields!(new, id: id, idempotency_key: None);
        self.build(common, route)
    }

    fn build<R: Route>(&self, c: EventFields, route: R) -> Result<Event<R>> {
        let event_type =
            validate::required("event_type", &c.event_type, limits::EVENT_TYPE_MAX_LENGTH)?;
        let payload = validate::payload(c.payload, &self.limits)?;
        let headers = validate::headers(c.headers, &self.limits)?;
        let optional =
            |field, value: &Option<String>, max| validate::optional(field, value.as_deref(), max);
        let trace_id = optional("trace_id", &c.trace_id, limits::TRACE_ID_MAX_LENGTH)?;
        let idempotency_key = optional(
            "idempotency_key",
            &c.idempotency_key,
            limits::IDEMPOTENCY_KEY_MAX_LENGTH,
        )?;
        let correlation_id = optional(
            "correlation_id",
            &c.correlation_id,
            limits::CORRELATION_ID_MAX_LENGTH,
        )?;
        let causation_id = optional(
            "causation_id",
            &c.causation_id,
            limits::CAUSATION_ID_MAX_LENGTH,
        )?;
        let schema_version = optional(
            "schema_version",
            &c.schema_version,
            limits::SCHEMA_VERSION_MAX_LENGTH,
        )?;
        let max_attempts =
            validate::max_attempts(c.max_attempts.unwrap_or(self.limits.max_attempts))?;
        let clock_default = crate::model::ClockDefault {
            created_at: c.created_at.is_none(),
            scheduled_at: c.created_at.is_none() && c.scheduled_at.is_none(),
        };
        let created_at = c.created_at.map(time::truncate).unwrap_or_else(time::now);
        let scheduled_at = c.scheduled_at.map(time::truncate).unwrap_or(created_at);
        validate::scheduled_at(scheduled_at, created_at, &self.limits)?;
        Ok(Event {
            id: c.id.unwrap_or_else(Uuid::now_v7),
            seq: None,
            event_type,
            payload,
            headers,
            trace_id,
            idempotency_key,
            correlation_id,
            causation_id,
            schema_version,
            status: EventStatus::Pending,
            attempts_made: 0,
            max_attempts,
            last_error: None,
            scheduled_at,
            completed_at: None,
            locked_at: None,
            locked_by: None,
            locked_until: None,
            created_at,
            updated_at: created_at,
            route,
            clock_default,
        })
    }

    /// True when the event's lock is older than `timeout` at `now`.
    pub fn is_lock_stale<R: Route>(
        &self,
        event: &Event<R>,
        now: Timestamp,
        timeout: Duration,
    ) -> bool {
        match event.locked_at {
            None => false,
            Some(at) => (now - at)
                .to_std()
                .map(|age| age > timeout)
                .unwrap_or(false),
        }
    }

    /// Fails unless `worker` holds the event's lock.
    pub fn assert_locked_by<R: Route>(&self, event: &Event<R>, worker: &WorkerId) -> Result<()> {
        match event.locked_by.as_deref() {
            None => Err(Error::NotLocked { id: event.id }),
            Some(owner) if owner == worker.as_str() => Ok(()),
            Some(owner) => Err(Error::LockedByAnotherWorker {
                id: event.id,
                locked_by: owner.to_string(),
                worker_id: worker.to_string(),
            }),
        }
    }

    /// Locks a pending, unlocked event for `worker` at `at`.
    pub fn lock<R: Route>(
        &self,
        event: &Event<R>,
        worker: &WorkerId,
        at: Timestamp,
    ) -> Result<Event<R>> {
        require_pending(event, "only pending events can be locked")?;
        if let Some(owner) = &event.locked_by {
            return Err(Error::AlreadyLocked {
                id: event.id,
                locked_by: owner.clone(),
            });
        }
        let at = time::truncate(at);
        let mut next = leased(event, at);
        next.locked_at = Some(at);
        next.locked_by = Some(worker.to_string());
        Ok(next)
    }

    /// Extends the lock held by `worker`: it now expires a lease after `now`.
    /// `locked_at` (the claim's fencing token) does not change.
    pub fn refresh_lock<R: Route>(
        &self,
        event: &Event<R>,
        worker: &WorkerId,
        now: Timestamp,
    ) -> Result<Event<R>> {
        require_pending(event, "only pending events can have their lock refreshed")?;
        self.assert_locked_by(event, worker)?;
        Ok(leased(event, time::truncate(now)))
    }

    /// Releases the lock held by `worker`, changing nothing else.
    pub fn unlock<R: Route>(&self, event: &Event<R>, worker: &WorkerId) -> Result<Event<R>> {
        require_pending(event, "only pending events can be unlocked")?;
        self.assert_locked_by(event, worker)?;
        Ok(unlocked(event))
    }

    /// Releases the lock whoever holds it. The row's `last_error` is kept
    /// (the operator must still see why it failed before); a row without
    /// one gets `Force unlock: <reason>`, so it counts as tried (it goes out
    /// alone, see "the claim" in the design).
    pub fn force_unlock<R: Route>(
        &self,
        event: &Event<R>,
        reason: &UnlockReason,
    ) -> Result<Event<R>> {
        if !event.is_locked() {
            return Err(Error::NotLocked { id: event.id });
        }
        let mut next = unlocked(event);
        next.last_error = Some(
            event
                .last_error
                .clone()
                .unwrap_or_else(|| reason.last_error()),
        );
        Ok(next)
    }

    /// Marks the event held by `worker` completed at `at`.
    pub fn mark_completed<R: Route>(
        &self,
        event: &Event<R>,
        at: Timestamp,
        worker: &WorkerId,
    ) -> Result<Event<R>> {
        self.assert_locked_by(event, worker)?;
        require_pending(event, "only pending events can be completed")?;
        let at = time::truncate(at);
        not_before("completed_at", at, "created_at", event.created_at)?;
        not_before("completed_at", at, "scheduled_at", event.scheduled_at)?;
        let mut next = unlocked(event);
        next.status = EventStatus::Completed;
        next.completed_at = Some(at);
        next.updated_at = at;
        Ok(next)
    }

    /// Records a failure of the event held by `worker` at `now`.
    ///
    /// A counted failure spends an attempt; the event becomes `failed` when
    /// `attempts_made` reaches `max_attempts`, else it is rescheduled (by the
    /// given time or the backoff). A not-counted failure only reschedules.
    pub fn mark_failed<R: Route>(
        &self,
        event: &Event<R>,
        error: &str,
        worker: &WorkerId,
        retry: Retry,
        now: Timestamp,
    ) -> Result<Event<R>> {
        let message = validate::truncate_error(
            error,
            self.limits.last_error_max_bytes,
            &self.limits.truncation_suffix,
        )?;
        self.assert_locked_by(event, worker)?;
        require_pending(event, "only pending events can fail")?;
        let (attempts, retry_at) = match retry {
            Retry::Counted(at) => (
                event.attempts_made + 1,
                at.unwrap_or_else(|| now + chrono_dur(self.backoff.delay(event.attempts_made))),
            ),
            Retry::NotCounted(at) => (event.attempts_made, at),
            Retry::NotCountedAfter(d) => (event.attempts_made, now + chrono_dur(d)),
        };
        if attempts > event.max_attempts {
            return Err(Error::validation(
                "attempts_made",
                format!("cannot exceed max_attempts ({})", event.max_attempts),
            ));
        }
        let retry_at = time::truncate(retry_at);
        not_before("next_retry_at", retry_at, "created_at", event.created_at)?;
        if (retry_at - event.created_at).num_seconds() > self.limits.scheduled_at_max_future_seconds
        {
            return Err(Error::validation(
                "next_retry_at",
                format!("{} is too far in the future", time::format(&retry_at)),
            ));
        }
        let mut next = unlocked(event);
        next.attempts_made = attempts;
        next.status = if attempts == event.max_attempts {
            EventStatus::Failed
        } else {
            EventStatus::Pending
        };
        if next.status == EventStatus::Pending {
            next.scheduled_at = retry_at;
        }
        next.last_error = Some(message);
        next.updated_at = time::truncate(now);
        Ok(next)
    }

    /// Replays a failed event: pending again, attempts reset, error cleared,
    /// scheduled at `now`.
    pub fn requeue<R: Route>(&self, event: &Event<R>, now: Timestamp) -> Result<Event<R>> {
        if event.status != EventStatus::Failed {
            return Err(Error::InvalidState {
                id: event.id,
                current: event.status.to_string(),
                expected: "failed".into(),
                detail: Some("only failed events can be replayed".into()),
            });
        }
        let now = time::truncate(now);
        let mut next = event.clone();
        next.status = EventStatus::Pending;
        next.attempts_made = 0;
        next.last_error = None;
        next.scheduled_at = now;
        next.updated_at = now;
        Ok(next)
    }
}

/// The fields an outbox and an inbox event are both created from.
struct EventFields {
    id: Option<Uuid>,
    event_type: String,
    payload: serde_json::Value,
    headers: Option<crate::model::Headers>,
    trace_id: Option<String>,
    idempotency_key: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    schema_version: Option<String>,
    max_attempts: Option<i32>,
    scheduled_at: Option<Timestamp>,
    created_at: Option<Timestamp>,
}

/// Moves the fields both kinds of new event share out of `$new` (a
/// [`NewOutboxEvent`] or a [`NewInboxEvent`]) into an [`EventFields`], with
/// the given id and idempotency key.
macro_rules! event_fields {
    ($new:ident, id: $id:expr, idempotency_key: $key:expr) => {
        EventFields {
            id: $id,
            event_type: $new.event_type,
            payload: $new.payload,
            headers: $new.headers,
            trace_id: $new.trace_id,
            idempotency_key: $key,
            correlation_id: $new.correlation_id,
            causation_id: $new.causation_id,
            schema_version: $new.schema_version,
            max_attempts: $new.max_attempts,
            scheduled_at: $new.scheduled_at,
            created_at: $new.created_at,
        }
    };
}
use event_fields;

/// A copy of `event` whose lock now expires a lease after `now`, changed at `now`.
fn leased<R: Route>(event: &Event<R>, now: Timestamp) -> Event<R> {
    let mut next = event.clone();
    next.locked_until = Some(now + chrono_dur(limits::DEFAULT_LEASE_TIMEOUT));
    next.updated_at = now;
    next
}

/// Refuses `at` (the value of `field`) when it is earlier than the event's
/// `bound_name` time `bound`.
fn not_before(field: &str, at: Timestamp, bound_name: &str, bound: Timestamp) -> Result<()> {
    if at < bound {
        return Err(Error::validation(
            field,
            format!(
                "{} is before {bound_name} {}",
                time::format(&at),
                time::format(&bound)
            ),
        ));
    }
    Ok(())
}

/// A copy of `event` with its lock cleared (holder, time and lease).
fn unlocked<R: Route>(event: &Event<R>) -> Event<R> {
    let mut next = event.clone();
    next.locked_at = None;
    next.locked_by = None;
    next.locked_until = None;
    next
}

/// Refuses a transition of an event that is not pending, naming what was
/// attempted (`detail`).
fn require_pending<R: Route>(event: &Event<R>, detail: &str) -> Result<()> {
    if event.status == EventStatus::Pending {
        Ok(())
    } else {
        Err(Error::InvalidState {
            id: event.id,
            current: event.status.to_string(),
            expected: "pending".into(),
            detail: Some(detail.into()),
        })
    }
}

/// Converts a std duration to chrono's, saturating.
pub(crate) fn chrono_dur(d: Duration) -> chrono::Duration {
    // Clamped, so adding it to or taking it from a time cannot overflow.
    chrono::Duration::from_std(d.min(limits::MAX_DURATION)).unwrap_or(chrono::Duration::MAX)
}

/// The namespace of inbox event ids (a fixed, random UUID).
const INBOX_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a76ad4f_e272_430f_8e4c_7a7ab8f8f7cc);

/// The id of the inbox event for `message_id` in `consumer_group`: a UUIDv5
/// of both (separated by a NUL, which neither may contain), the same for
/// every delivery of the message, across restarts and rebalances.
pub fn inbox_event_id(consumer_group: &str, message_id: &str) -> Uuid {
    let mut name = Vec::with_capacity(consumer_group.len() + message_id.len() + 1);
    name.extend_from_slice(consumer_group.as_bytes());
    name.push(0);
    name.extend_from_slice(message_id.as_bytes());
    Uuid::new_v5(&INBOX_ID_NAMESPACE, &name)
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
