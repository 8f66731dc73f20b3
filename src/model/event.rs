//! The event entities: [`OutboxEvent`] and [`InboxEvent`] share the columns of
//! [`Event`] and differ in their routing part ([`OutboxRoute`], [`InboxRoute`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::time::{Timestamp, serde_ts};
use crate::error::{Error, Result};

use super::status::{EventStatus, Table};

/// JSON object payload of an event.
pub type Payload = Map<String, Value>;

/// About the length of `payload` as compact JSON (string escapes and
/// numbers are estimated), without writing it: what chunking by bytes
/// needs.
pub(crate) fn approx_json_len(payload: &Payload) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::Null => 4,
            Value::Bool(_) => 5,
            Value::Number(_) => 8,
            Value::String(s) => s.len() + 2,
            Value::Array(a) => 2 + a.iter().map(|v| value(v) + 1).sum::<usize>(),
            Value::Object(m) => map(m),
        }
    }
    fn map(m: &Payload) -> usize {
        2 + m.iter().map(|(k, v)| k.len() + 4 + value(v)).sum::<usize>()
    }
    map(payload)
}

/// String headers of an event.
pub type Headers = BTreeMap<String, String>;

/// Headers as a row stores them: a JSON object whose values should be
/// strings. A row written by SQL may hold other values (`{"retries": 3}`);
/// each is kept as its JSON text (`3`, `true`, `null`, `{"a":1}`) so the row
/// is published like any other instead of stopping the relay. Anything but
/// an object (or NULL) is refused.
pub(crate) fn headers_from_json(value: Value) -> std::result::Result<Option<Headers>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Object(map) => Ok(Some(
            map.into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect(),
        )),
        other => Err(format!(
            "column headers: a JSON object was expected, not {}",
            match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                _ => "a boolean",
            }
        )),
    }
}

/// Routing part of an outbox event: where it goes on the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRoute {
    /// Kind of aggregate the event belongs to, e.g. `order`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: Uuid,
    /// Broker topic.
    pub topic: String,
    /// Broker message key; events of one `(topic, partition_key)` keep their order.
    pub partition_key: String,
}

/// Routing part of an inbox event: where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxRoute {
    /// The broker message id (deduplication key together with the consumer group).
    pub message_id: String,
    /// The consumer group that stored it.
    pub consumer_group: String,
    /// Producing service or topic.
    pub source: String,
}

/// Marker trait tying a route type to its table.
pub trait Route: Clone + fmt::Debug + Send + Sync + 'static {
    /// The table events with this route live in.
    const TABLE: Table;

    /// The key whose events keep their order (the outbox's topic and
    /// partition key); `None` for tables without one.
    fn order_key(&self) -> Option<(&str, &str)> {
        None
    }
}

impl Route for OutboxRoute {
    const TABLE: Table = Table::Outbox;

    fn order_key(&self) -> Option<(&str, &str)> {
        Some((&self.topic, &self.partition_key))
    }
}

impl Route for InboxRoute {
    const TABLE: Table = Table::Inbox;
}

/// One row of `outbox_events` or `inbox_events`.
///
/// Values are created by the [`DomainService`](crate::domain::DomainService) (which
/// validates them) or read from a store; the state transitions of the domain
/// service return new values. Fields are read through accessors so that a
/// value always satisfies the invariants of docs/design.md, "Event lifecycle and rules".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event<R> {
    pub(crate) id: Uuid,
    /// Insertion order; `None` until the event is stored.
    pub(crate) seq: Option<i64>,
    pub(crate) event_type: String,
    pub(crate) payload: Payload,
    pub(crate) headers: Option<Headers>,
    pub(crate) trace_id: Option<String>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<String>,
    pub(crate) schema_version: Option<String>,
    pub(crate) status: EventStatus,
    pub(crate) attempts_made: i32,
    pub(crate) max_attempts: i32,
    pub(crate) last_error: Option<String>,
    #[serde(with = "serde_ts")]
    pub(crate) scheduled_at: Timestamp,
    #[serde(with = "serde_ts::option")]
    pub(crate) completed_at: Option<Timestamp>,
    #[serde(with = "serde_ts::option")]
    pub(crate) locked_at: Option<Timestamp>,
    pub(crate) locked_by: Option<String>,
    /// When the current lock expires (the claimer's lease; pushed forward
    /// while a slow batch is in flight). Set iff `locked_at` is set.
    #[serde(with = "serde_ts::option")]
    pub(crate) locked_until: Option<Timestamp>,
    #[serde(with = "serde_ts")]
    pub(crate) created_at: Timestamp,
    #[serde(with = "serde_ts")]
    pub(crate) updated_at: Timestamp,
    #[serde(flatten)]
    pub(crate) route: R,
    /// Which times the caller left to the clock: the values above are then
    /// this process's clock, and a store with a clock of its own
    /// (PostgreSQL) stores its `now()` instead, so that producers' clocks
    /// never decide the order in which rows become due.
    #[serde(skip)]
    pub(crate) clock_default: ClockDefault,
}

/// What a dead letter's copy of an event must hold to bring the event back
/// (the rest of the copy describes its failure and is not restored).
#[derive(Deserialize)]
#[serde(bound = "R: DeserializeOwned")]
struct EventCopy<R> {
    id: Uuid,
    event_type: String,
    payload: Payload,
    headers: Option<Headers>,
    trace_id: Option<String>,
    idempotency_key: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    schema_version: Option<String>,
    max_attempts: i32,
    created_at: String,
    #[serde(flatten)]
    route: R,
}

impl<R: Route + DeserializeOwned> Event<R> {
    /// The event a dead letter's copy (the event serialised when it failed)
    /// describes, as a fresh pending row: no attempts, no error, due now
    /// (the store's clock where it has one), created when it was first.
    pub(crate) fn revived(copy: &Value) -> Result<Self> {
        let c: EventCopy<R> = serde_json::from_value(copy.clone()).map_err(|e| {
            Error::validation(
                "event",
                format!("the dead letter's copy of the event cannot be read: {e}"),
            )
        })?;
        if c.event_type.is_empty() || c.max_attempts < 1 {
            return Err(Error::validation(
                "event",
                "the dead letter's copy of the event has no event type or no attempts",
            ));
        }
        let now = super::time::now();
        Ok(Event {
            id: c.id,
            seq: None,
            event_type: c.event_type,
            payload: c.payload,
            headers: c.headers,
            trace_id: c.trace_id,
            idempotency_key: c.idempotency_key,
            correlation_id: c.correlation_id,
            causation_id: c.causation_id,
            schema_version: c.schema_version,
            status: EventStatus::Pending,
            attempts_made: 0,
            max_attempts: c.max_attempts,
            last_error: None,
            scheduled_at: now,
            completed_at: None,
            locked_at: None,
            locked_by: None,
            locked_until: None,
            created_at: super::time::parse("created_at", &c.created_at)?,
            updated_at: now,
            route: c.route,
            clock_default: ClockDefault {
                created_at: false,
                scheduled_at: true,
            },
        })
    }
}

/// Which of an event's times its creator left to the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ClockDefault {
    /// `created_at` was not given.
    pub created_at: bool,
    /// `scheduled_at` was not given, nor `created_at` (it defaults to that).
    pub scheduled_at: bool,
}

impl ClockDefault {
    /// Any time is left to the clock.
    pub fn any(self) -> bool {
        self.created_at || self.scheduled_at
    }
}

/// An event of the outbox table.
pub type OutboxEvent = Event<OutboxRoute>;
/// An event of the inbox table.
pub type InboxEvent = Event<InboxRoute>;

impl<R: Route> Event<R> {
    /// Drops the payload and headers (a processor's batch whose events are
    /// settled keeps only what it writes: ids, types, attempts).
    pub(crate) fn shed_body(&mut self) {
        self.payload = Payload::new();
        self.headers = None;
    }

    /// Primary key (UUIDv7 by default, so ids sort by creation time).
    pub fn id(&self) -> Uuid {
        self.id
    }
    /// Insertion order in its table; `None` before the event is stored.
    pub fn seq(&self) -> Option<i64> {
        self.seq
    }
    /// The key whose events keep their order (see [`Route::order_key`]).
    pub fn order_key(&self) -> Option<(&str, &str)> {
        self.route.order_key()
    }
    /// Event type, e.g. `order.created`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    /// The JSON object payload.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }
    /// Headers, if any.
    pub fn headers(&self) -> Option<&Headers> {
        self.headers.as_ref()
    }
    /// One header's value.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.as_ref()?.get(key).map(String::as_str)
    }
    /// Trace id.
    pub fn trace_id(&self) -> Option<&str> {
        self.trace_id.as_deref()
    }
    /// Idempotency key (unique per table when set).
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
    /// Correlation id.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }
    /// Causation id.
    pub fn causation_id(&self) -> Option<&str> {
        self.causation_id.as_deref()
    }
    /// Schema version of the payload.
    pub fn schema_version(&self) -> Option<&str> {
        self.schema_version.as_deref()
    }
    /// Lifecycle status.
    pub fn status(&self) -> EventStatus {
        self.status
    }
    /// Counted failures so far (a success is not counted).
    pub fn attempts_made(&self) -> i32 {
        self.attempts_made
    }
    /// Counted failures allowed before the event becomes `failed`.
    pub fn max_attempts(&self) -> i32 {
        self.max_attempts
    }
    /// Last error message (truncated to 2000 bytes).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    /// Not processed before this time.
    pub fn scheduled_at(&self) -> Timestamp {
        self.scheduled_at
    }
    /// When it was completed (set iff status is `completed`).
    pub fn completed_at(&self) -> Option<Timestamp> {
        self.completed_at
    }
    /// When the current lock was taken (also the claim's fencing token).
    pub fn locked_at(&self) -> Option<Timestamp> {
        self.locked_at
    }
    /// The worker holding the lock.
    pub fn locked_by(&self) -> Option<&str> {
        self.locked_by.as_deref()
    }
    /// When the current lock expires; any worker may claim the row after it.
    pub fn locked_until(&self) -> Option<Timestamp> {
        self.locked_until
    }
    /// Creation time.
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }
    /// Last change of the row.
    pub fn updated_at(&self) -> Timestamp {
        self.updated_at
    }
    /// The table-specific part.
    pub fn route(&self) -> &R {
        &self.route
    }
    /// The table this event belongs to.
    pub fn table(&self) -> Table {
        R::TABLE
    }
    /// True while a worker holds the event.
    pub fn is_locked(&self) -> bool {
        self.locked_at.is_some()
    }
    /// True when the event may still be processed.
    pub fn can_retry(&self) -> bool {
        self.status == EventStatus::Pending && self.attempts_made < self.max_attempts
    }
    /// Counted failures left before `failed` (0 unless pending).
    pub fn attempts_left(&self) -> i32 {
        if self.status == EventStatus::Pending {
            self.max_attempts - self.attempts_made
        } else {
            0
        }
    }
    /// Failures recorded, when `failed`; else 0.
    pub fn failure_count(&self) -> i32 {
        if self.status == EventStatus::Failed {
            self.attempts_made
        } else {
            0
        }
    }

    /// Checks the cross-field invariants of docs/design.md, "Event lifecycle and rules" (status and completion time,
    /// attempts, lock consistency). Events built by this crate always pass.
    pub fn validate_invariants(&self) -> Result<()> {
        self.invariants(false)
    }

    /// [`validate_invariants`](Self::validate_invariants); with
    /// `spent_pending`, a pending row whose attempts are used up passes (a
    /// stored row can be so, set outside omnibox: the processor fails it
    /// cleanly when it meets it).
    pub(crate) fn invariants(&self, spent_pending: bool) -> Result<()> {
        let invalid = |message: String| Err(Error::validation("event", message));
        match (self.status, self.completed_at) {
            (EventStatus::Completed, None) => {
                return invalid("completed_at must be set when status is completed".into());
            }
            (EventStatus::Completed, Some(_)) | (_, None) => {}
            (status, Some(_)) => {
                return invalid(format!(
                    "completed_at must be empty when status is {status}"
                ));
            }
        }
        if self.attempts_made < 0 {
            return invalid(format!(
                "attempts_made must be >= 0, got {}",
                self.attempts_made
            ));
        }
        if self.max_attempts < 1 {
            return invalid(format!(
                "max_attempts must be >= 1, got {}",
                self.max_attempts
            ));
        }
        if self.attempts_made > self.max_attempts {
            return invalid(format!(
                "attempts_made ({}) cannot exceed max_attempts ({})",
                self.attempts_made, self.max_attempts
            ));
        }
        if !spent_pending
            && self.status == EventStatus::Pending
            && self.attempts_made >= self.max_attempts
        {
            return invalid(format!(
                "status is pending, but attempts_made ({}) has reached max_attempts ({})",
                self.attempts_made, self.max_attempts
            ));
        }
        if self.locked_at.is_some() != self.locked_by.is_some()
            || self.locked_at.is_some() != self.locked_until.is_some()
        {
            return invalid(
                "locked_at, locked_by and locked_until must be all set or all empty".into(),
            );
        }
        if self.is_locked() && self.status != EventStatus::Pending {
            return invalid(format!(
                "a locked event must be pending, got {}",
                self.status
            ));
        }
        Ok(())
    }
}

impl Event<OutboxRoute> {
    /// Kind of aggregate, e.g. `order`.
    pub fn aggregate_type(&self) -> &str {
        &self.route.aggregate_type
    }
    /// The aggregate's id.
    pub fn aggregate_id(&self) -> Uuid {
        self.route.aggregate_id
    }
    /// Broker topic.
    pub fn topic(&self) -> &str {
        &self.route.topic
    }
    /// Broker message key.
    pub fn partition_key(&self) -> &str {
        &self.route.partition_key
    }
}

impl Event<InboxRoute> {
    /// Broker message id.
    pub fn message_id(&self) -> &str {
        &self.route.message_id
    }
    /// Consumer group.
    pub fn consumer_group(&self) -> &str {
        &self.route.consumer_group
    }
    /// Producing service or topic.
    pub fn source(&self) -> &str {
        &self.route.source
    }
    /// Alias of [`completed_at`](Event::completed_at).
    pub fn processed_at(&self) -> Option<Timestamp> {
        self.completed_at
    }
}

#[cfg(test)]
mod revive_tests;
