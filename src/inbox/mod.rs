//! The inbox (docs/design.md, "The inbox"): consume broker messages into `inbox_events`
//! exactly once per `(message_id, consumer_group)`, and handle them.
//!
//! * [`normalize`](mod@normalize) turns a broker message into an inbox event (or a poison row);
//! * [`source`]: Kafka, a JSON lines file, stdin;
//! * [`InboxConsumer`]: a batch of messages per database transaction, with
//!   the ack strategies of [`AckStrategy`], on any [`ConsumerStore`];
//! * [`handler`]: the [`Handler`] trait, `--exec` and `--webhook` handlers,
//!   and the handler step `omnibox inbox process` runs on claimed rows;
//! * [`router`]: [`EventRouter`](router::EventRouter) dispatch by source,
//!   event type and schema version, with payload migrations.

mod consumer;
pub mod context;
pub mod handler;
mod lines;
mod message;
pub mod normalize;
pub mod router;
pub mod source;
mod unit_of_work;

pub use consumer::{
    AckStrategy, CommitOn, ConsumeOne, ConsumeOptions, ConsumeReport, DEFAULT_CONSUMER_LEASE,
    DEFAULT_TRANSIENT_LIMIT, InboxConsumer,
};
pub use context::{Dependencies, HandlerContext, Tx};
pub use handler::{
    AnyHandler, ExecHandler, Handler, HandlerFuture, HandlerStep, TxFn, WebhookHandler,
    redact_http_url, tx_handler,
};
pub use normalize::{
    DefaultEnvelopeParser, EnvelopeParser, Normalized, RawMessage, Truncated, normalize,
};
pub use source::{AnySource, FileSource, KafkaSource, Polled, Source};
pub use unit_of_work::{ConsumerStore, ConsumerTx};
