//! What a service asks to publish or store: [`NewOutboxEvent`] and
//! [`NewInboxEvent`], turned into validated events by the
//! [`DomainService`](crate::domain::DomainService).

use serde_json::Value;
use uuid::Uuid;

use super::event::Headers;
use super::time::Timestamp;

/// Declares a new-event input: its required fields, each a parameter of
/// `new` (converted with `Into`), then the optional fields every new event
/// has, which `new` leaves unset. The fields after `..` are optional ones of
/// this kind alone (placed after `id`); `scheduled_at` documents when the
/// event is due.
macro_rules! new_event {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$required_doc:meta])* pub $required:ident: $ty:ty = $param:ty, )+
            ..
            $( $(#[$own_doc:meta])* pub $own:ident: Option<$own_ty:ty>, )*
            scheduled_at: $scheduled_doc:literal $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$required_doc])* pub $required: $ty, )+
            /// Optional headers.
            pub headers: Option<Headers>,
            /// Explicit id; a UUIDv7 by default.
            pub id: Option<Uuid>,
            $( $(#[$own_doc])* pub $own: Option<$own_ty>, )*
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
            #[doc = $scheduled_doc]
            pub scheduled_at: Option<Timestamp>,
            /// Creation time (default: now).
            pub created_at: Option<Timestamp>,
        }

        impl $name {
            /// An event with the required fields; the rest default.
            pub fn new($($required: $param),+) -> Self {
                $name {
                    $( $required: $required.into(), )+
                    headers: None,
                    id: None,
                    $( $own: None, )*
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
    };
}

new_event! {
    /// Input for a new outbox event; turned into an [`OutboxEvent`](super::OutboxEvent) by
    /// [`DomainService::create_outbox_event`](crate::domain::DomainService::create_outbox_event),
    /// which applies every rule of docs/design.md, "Event lifecycle and rules".
    pub struct NewOutboxEvent {
        /// Required: kind of aggregate (1..50 characters).
        pub aggregate_type: String = impl Into<String>,
        /// Required: the aggregate's id.
        pub aggregate_id: Uuid = Uuid,
        /// Required: event type (1..100 characters).
        pub event_type: String = impl Into<String>,
        /// Required: broker topic (1..255 characters).
        pub topic: String = impl Into<String>,
        /// Required: broker key (1..255 characters).
        pub partition_key: String = impl Into<String>,
        /// Required: a non-empty JSON object.
        pub payload: Value = Value,
        ..
        /// Idempotency key: a second event with the same key is not inserted.
        pub idempotency_key: Option<String>,
        scheduled_at: " Not published before this time (default: now).",
    }
}

new_event! {
    /// Input for a new inbox event; see
    /// [`DomainService::create_inbox_event`](crate::domain::DomainService::create_inbox_event).
    pub struct NewInboxEvent {
        /// Required: broker message id (1..255 characters).
        pub message_id: String = impl Into<String>,
        /// Required: consumer group (1..255 characters).
        pub consumer_group: String = impl Into<String>,
        /// Required: producing service or topic (1..255 characters).
        pub source: String = impl Into<String>,
        /// Required: event type (1..100 characters).
        pub event_type: String = impl Into<String>,
        /// Required: a non-empty JSON object.
        pub payload: Value = Value,
        ..
        scheduled_at: " Not processed before this time (default: now).",
    }
}
