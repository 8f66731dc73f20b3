//! What a service asks to publish or store: [`NewOutboxEvent`] and
//! [`NewInboxEvent`], turned into validated events by the
//! [`DomainService`](crate::domain::DomainService).

use serde_json::Value;
use uuid::Uuid;

use super::event::Headers;
use super::time::Timestamp;

/// Input for a new outbox event; turned into an [`OutboxEvent`](super::OutboxEvent) by
/// [`DomainService::create_outbox_event`](crate::domain::DomainService::create_outbox_event),
/// which applies every rule of docs/design.md, "Event lifecycle and rules".
#[derive(Debug, Clone, PartialEq)]
pub struct NewOutboxEvent {
    /// Required: kind of aggregate (1..50 characters).
    pub aggregate_type: String,
    /// Required: the aggregate's id.
    pub aggregate_id: Uuid,
    /// Required: event type (1..100 characters).
    pub event_type: String,
    /// Required: broker topic (1..255 characters).
    pub topic: String,
    /// Required: broker key (1..255 characters).
    pub partition_key: String,
    /// Required: a non-empty JSON object.
    pub payload: Value,
    /// Optional headers.
    pub headers: Option<Headers>,
    /// Explicit id; a UUIDv7 by default.
    pub id: Option<Uuid>,
    /// Idempotency key: a second event with the same key is not inserted.
    pub idempotency_key: Option<String>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Causation id.
    pub causation_id: Option<String>,
    /// Payload schema version.
    pub schema_version: Option<String>,
    /// Counted failures allowed (default 6).
    pub max_attempts: Option<i32>,
    /// Not published before this time (default: now).
    pub scheduled_at: Option<Timestamp>,
    /// Creation time (default: now).
    pub created_at: Option<Timestamp>,
}

impl NewOutboxEvent {
    /// An event with the required fields; the rest default.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: Uuid,
        event_type: impl Into<String>,
        topic: impl Into<String>,
        partition_key: impl Into<String>,
        payload: Value,
    ) -> Self {
        NewOutboxEvent {
            aggregate_type: aggregate_type.into(),
            aggregate_id,
            event_type: event_type.into(),
            topic: topic.into(),
            partition_key: partition_key.into(),
            payload,
            headers: None,
            id: None,
            idempotency_key: None,
            trace_id: None,
            correlation_id: None,
            causation_id: None,
            schema_version: None,
            max_attempts: None,
            scheduled_at: None,
            created_at: None,
        }
    }
}

/// Input for a new inbox event; see
/// [`DomainService::create_inbox_event`](crate::domain::DomainService::create_inbox_event).
#[derive(Debug, Clone, PartialEq)]
pub struct NewInboxEvent {
    /// Required: broker message id (1..255 characters).
    pub message_id: String,
    /// Required: consumer group (1..255 characters).
    pub consumer_group: String,
    /// Required: producing service or topic (1..255 characters).
    pub source: String,
    /// Required: event type (1..100 characters).
    pub event_type: String,
    /// Required: a non-empty JSON object.
    pub payload: Value,
    /// Optional headers.
    pub headers: Option<Headers>,
    /// Explicit id; a UUIDv7 by default.
    pub id: Option<Uuid>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Causation id.
    pub causation_id: Option<String>,
    /// Payload schema version.
    pub schema_version: Option<String>,
    /// Counted failures allowed (default 6).
    pub max_attempts: Option<i32>,
    /// Not processed before this time (default: now).
    pub scheduled_at: Option<Timestamp>,
    /// Creation time (default: now).
    pub created_at: Option<Timestamp>,
}

impl NewInboxEvent {
    /// An event with the required fields; the rest default.
    pub fn new(
        message_id: impl Into<String>,
        consumer_group: impl Into<String>,
        source: impl Into<String>,
        event_type: impl Into<String>,
        payload: Value,
    ) -> Self {
        NewInboxEvent {
            message_id: message_id.into(),
            consumer_group: consumer_group.into(),
            source: source.into(),
            event_type: event_type.into(),
            payload,
            headers: None,
            id: None,
            trace_id: None,
            correlation_id: None,
            causation_id: None,
            schema_version: None,
            max_attempts: None,
            scheduled_at: None,
            created_at: None,
        }
    }
}
