//! # omnibox
//!
//! The Transactional Outbox and Inbox patterns for services on PostgreSQL or
//! SQLite, re-implementing the Python library omni-box in Rust.
//!
//! ## Architecture
//!
//! ```text
//!            service transaction                     relay (omnibox publish)
//!  business rows + OutboxEvent ──► outbox_events ──claim──► broker ──► complete / fail
//!
//!            broker ──► inbox consumer ──insert (dedup)──► inbox_events ──claim──► handler
//! ```
//!
//! * [`model`]: the entities ([`OutboxEvent`], [`InboxEvent`], [`EventStatus`]),
//!   the limits and validation rules of docs/design.md, "Event lifecycle and rules", and UTC timestamps.
//! * [`domain`]: the [`DomainService`], which creates validated events and
//!   applies the pure state transitions (lock, refresh, unlock, force unlock,
//!   complete, fail counted or not, backoff with equal jitter, requeue).
//! * [`store`]: the store traits ([`EventStore`], [`OutboxStore`],
//!   [`InboxStore`]) with capability flags, and their PostgreSQL and SQLite
//!   implementations, each with embedded versioned migrations. The claim
//!   hands out due rows from an index in `(scheduled_at, seq)` order, keeps
//!   per-key order for the outbox (taking whole runs of one key), and returns
//!   a [`ClaimToken`] that fences later writes. Events that fail for good
//!   can be kept in the database as dead letters
//!   ([`store::dead_letters::DeadLetterTable`], a
//!   [`pipeline::DeadLetterStore`]), listed and replayed. Runnable:
//!   `examples/dead_letters.rs` (`cargo run --example dead_letters`).
//! * [`inbox`]: the consumer ([`inbox::InboxConsumer`]), its sources, and
//!   handlers: a [`inbox::Handler`] gets the event and a
//!   [`inbox::HandlerContext`] holding the inbox's open transaction (writes
//!   that commit or roll back with the inbox row) and typed
//!   [`inbox::Dependencies`]; the [`inbox::router::EventRouter`] dispatches by
//!   source, event type and schema version. Runnable:
//!   `examples/inbox_transactional.rs` (`cargo run --example inbox_transactional`).
//! * [`telemetry`]: W3C trace context through the relay and the inbox, and
//!   OpenTelemetry spans exported with OTLP.
//! * [`Error`]: one error enum whose variants mirror the reference's exceptions.
//!
//! The library emits `tracing` events only; installing a subscriber is up to
//! the application (the `omnibox` binary does it on stderr).
//!
//! ## Example
//!
//! ```no_run
//! use omnibox::{ClaimOptions, DomainService, EventStore, NewOutboxEvent, OutboxStore, WorkerId};
//! use omnibox::store::SqliteStore;
//!
//! # async fn run() -> omnibox::Result<()> {
//! let store = SqliteStore::connect("sqlite://omnibox.db").await?;
//! store.migrate().await?;
//! let event = DomainService::default().create_outbox_event(NewOutboxEvent::new(
//!     "order",
//!     uuid::Uuid::now_v7(),
//!     "order.created",
//!     "orders",
//!     "order-42",
//!     serde_json::json!({"total": 12.5}),
//! ))?;
//! store.outbox().create(&event).await?;
//!
//! let claim = store.outbox().claim(&ClaimOptions::new(WorkerId::new("relay-1")?, 100)).await?;
//! let ids: Vec<_> = claim.events.iter().map(|e| e.id()).collect();
//! // ... publish them ...
//! store.outbox().complete(&claim.token, &ids).await?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod domain;
pub mod error;
pub mod inbox;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod redact;
pub mod relay;
pub mod store;
pub mod telemetry;

pub use domain::{Backoff, DomainService, Retry};
pub use error::{Error, Result};
pub use model::{
    Event, EventStatus, Headers, InboxEvent, InboxRoute, Limits, NewInboxEvent, NewOutboxEvent,
    OutboxEvent, OutboxRoute, Payload, Route, Table, Timestamp, UnlockReason, WorkerId, time,
};
pub use store::{
    AnyStore, BulkOutcome, Capabilities, Claim, ClaimOptions, ClaimToken, Created, EventStore,
    FailReport, Failure, FetchFilters, InboxStore, ListFilter, MaintenanceStore, OutboxStore,
    RequeueFilter, TableCounts,
};
