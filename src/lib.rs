//! # omnibox
//!
//! The Transactional Outbox and Inbox patterns for services on PostgreSQL or
//! SQLite: a service writes its business rows and an outbox row in one
//! database transaction; a relay publishes the outbox rows to a broker in
//! per-key order; an inbox turns the broker's at-least-once delivery into
//! exactly-once handling. The `omnibox` binary wraps all of it; this crate
//! is the engine, for Rust services. Everything a service needs is at the
//! crate root and in [`prelude`].
//!
//! ```text
//!  service transaction                              relay (publish)
//!  business rows + outbox row ──► outbox_events ──claim──► broker ──► complete / fail
//!
//!  broker ──► inbox consumer ──insert (dedup)──► inbox_events ──claim──► handler
//! ```
//!
//! ## 1. Write an event in your transaction
//!
//! Create the event with the [`DomainService`] (it validates it), then write
//! it with [`insert_outbox`] on the same transaction as your own rows: both
//! commit or neither does.
//!
//! ```no_run
//! use omnibox::prelude::*;
//!
//! # async fn place_order(store: &PgStore) -> Result<(), Box<dyn std::error::Error>> {
//! let order_id = uuid::Uuid::now_v7();
//! let event = DomainService::default().create_outbox_event(NewOutboxEvent::new(
//!     "order",                                  // aggregate type
//!     order_id,                                 // aggregate id
//!     "order.created",                          // event type
//!     "orders",                                 // topic
//!     order_id.to_string(),                     // partition key: per-key order
//!     serde_json::json!({"total": 12.5}),
//! ))?;
//! let mut tx = store.pool().begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
//!     .bind(order_id)
//!     .bind(12.5)
//!     .execute(&mut *tx)
//!     .await?;
//! insert_outbox(&mut tx, &[event]).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! The stores: [`PgStore`], [`SqliteStore`], or [`AnyStore`] chosen by URL;
//! `migrate()` creates the tables. Services in other languages write the
//! same row with plain SQL (the README's SQL contract).
//!
//! ## 2. Relay the outbox
//!
//! [`relay::publisher`] builds a [`Processor`](pipeline::Processor) that
//! claims due rows (per-key order kept across relays, leases fenced by a
//! token), publishes them through a [`Sink`](relay::Sink) (Kafka, a file,
//! stdout) and writes the results; [`pipeline::run`] loops over batches
//! until nothing is due or until shutdown.
//!
//! ```no_run
//! use std::{sync::Arc, time::Duration};
//! use omnibox::prelude::*;
//!
//! # async fn relay(store: AnyStore) -> Result<(), Box<dyn std::error::Error>> {
//! let sink = Arc::new(AnySink::from_url("kafka://127.0.0.1:9092", &[], Duration::from_secs(30))?);
//! let options = ProcessorOptions::new(WorkerId::new("relay-1")?);
//! let relay = publisher(store.outbox(), sink, options, Duration::from_secs(30)).build();
//! let (_stop, shutdown) = tokio::sync::watch::channel(false);
//! let run_options = RunOptions { mode: RunMode::Once, ..RunOptions::default() };
//! let report = run(&relay, &run_options, shutdown, &mut Sleep, |_batch| {}).await?;
//! println!("published {}", report.completed);
//! # Ok(()) }
//! ```
//!
//! ## 3. Consume exactly once
//!
//! An [`InboxConsumer`] reads a [`Source`](inbox::Source) (Kafka, a file),
//! stores each message once per `(message_id, consumer_group)`, and runs a
//! [`Handler`] on it; with a transactional handler ([`inbox::tx_handler`])
//! the handler's writes commit with the inbox row, so a redelivered message
//! never runs twice. Handlers answer with an [`Outcome`]; the
//! [`EventRouter`](inbox::router::EventRouter) dispatches by event type and
//! schema version. Runnable: `examples/inbox_transactional.rs`,
//! `examples/outbox_service.rs`, `examples/dead_letters.rs`,
//! `examples/router_versions.rs`, `examples/custom_step.rs`,
//! `examples/custom_store.rs` (`cargo run --example NAME`).
//!
//! ## A store of your own
//!
//! The relay, the processor and the consumer run on the store traits: a
//! service on another driver implements [`EventStore`] and [`OutboxStore`]
//! (the relay), [`InboxStore`] and [`ConsumerStore`] (the consumer), keeps
//! each event's [`EventState`] beside its fields and reads rows back with
//! [`Event::with_state`]; [`testkit`] checks it keeps the contract the
//! engine relies on. `examples/custom_store.rs` is an in-memory outbox
//! that passes the kit and runs the relay.
//!
//! ## The modules
//!
//! * [`model`]: the entities ([`OutboxEvent`], [`InboxEvent`],
//!   [`EventStatus`]), their limits and validation rules, UTC timestamps.
//! * [`domain`]: the [`DomainService`]: validated events and the pure state
//!   transitions (lock, complete, fail counted or not, backoff, requeue).
//! * [`store`]: the store traits ([`EventStore`], [`OutboxStore`],
//!   [`InboxStore`]), one driver per backend (`store::postgres`,
//!   `store::sqlite`) with its migrations, the audit trail and the
//!   dead-letter table.
//! * [`pipeline`]: the batch processor both the relay and the inbox
//!   processor run on: claim, handle, write the results; steps, dead
//!   letters, metrics, the run loop.
//! * [`relay`]: the outbox publisher, its messages and sinks.
//! * [`inbox`]: the consumer, its sources, handlers and the router.
//! * [`metrics`] (Prometheus) and [`telemetry`] (W3C trace context,
//!   OpenTelemetry spans).
//! * [`ops`]: the operations commands as a library (replay, unlock,
//!   release, cleanup, status, doctor's diagnostics).
//! * [`testkit`]: the store contract as checks for stores of your own.
//! * [`Error`]: one error enum whose variants mirror the reference's
//!   exceptions.
//!
//! The library emits `tracing` events only; installing a subscriber is up to
//! the application (the `omnibox` binary does it on stderr).

#![deny(missing_docs)]

pub mod domain;
pub mod error;
pub mod inbox;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod redact;
pub mod relay;
pub mod store;
pub mod telemetry;
pub mod testkit;

pub use domain::{Backoff, DomainService, Retry};
pub use error::{Error, Result};
pub use inbox::{ConsumerStore, ConsumerTx, Handler, InboxConsumer};
pub use model::{
    Event, EventLock, EventState, EventStatus, Headers, InboxEvent, InboxRoute, Limits,
    NewInboxEvent, NewOutboxEvent, OutboxEvent, OutboxRoute, Payload, Route, Table, Timestamp,
    UnlockReason, WorkerId, time,
};
pub use pipeline::{Outcome, ProcessorBuilder};
pub use store::{
    AnyStore, BulkOutcome, Capabilities, Claim, ClaimOptions, ClaimToken, Created, EventConnection,
    EventSelector, EventStore, FailReport, Failure, FailureSelector, FetchFilters, InboxStore,
    ListFilter, MaintenanceStore, OutboxStore, PgStore, RequeueFilter, SqliteStore, TableCounts,
    TimeWindow, insert_inbox, insert_outbox,
};

/// What a service needs, in one import: `use omnibox::prelude::*;`.
pub mod prelude {
    pub use crate::domain::{Backoff, DomainService, Retry};
    pub use crate::error::{Error, Result};
    pub use crate::inbox::router::EventRouter;
    pub use crate::inbox::{
        AckStrategy, AnyHandler, ConsumeOne, ConsumeOptions, ConsumerStore, ConsumerTx,
        Dependencies, FileSource, Handler, HandlerContext, HandlerStep, InboxConsumer, KafkaSource,
        Tx, tx_handler,
    };
    pub use crate::model::{
        EventLock, EventState, EventStatus, InboxEvent, InboxRoute, NewInboxEvent, NewOutboxEvent,
        OutboxEvent, OutboxRoute, Table, WorkerId,
    };
    pub use crate::pipeline::{
        IntoOutcome, Outcome, ProcessorBuilder, ProcessorOptions, RunMode, RunOptions, Sleep, Step,
        StepExt, run,
    };
    pub use crate::relay::{AnySink, publisher};
    pub use crate::store::audit::AuditEntry;
    pub use crate::store::dead_letters::{DeadLetterFilter, DeadLetterTable};
    pub use crate::store::postgres::PgOptions;
    pub use crate::store::{
        AnyStore, EventConnection, EventStore, InboxStore, MaintenanceStore, OutboxStore, PgStore,
        SqliteStore, insert_inbox, insert_outbox,
    };
}
