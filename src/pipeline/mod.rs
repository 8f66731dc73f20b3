//! The batch pipeline shared by the outbox relay and the inbox processor
//! (the reference's `EventBatchProcessor`, `EventProcessorBuilder`, fetch and
//! commit strategies and steps):
//!
//! * fetch: [`EventStore::claim`](crate::store::EventStore::claim), one short statement;
//! * steps: the [`BatchHandler`] (publish, or run handlers) between a
//!   [`circuit::CircuitBreaker`], the dead-letter step and the metrics step,
//!   all inside one `tracing` span per batch;
//! * commit: bulk completion, failure and release, each one statement
//!   guarded by the claim's token and retried while the database fails.
//!
//! [`runner::run`] loops over batches (once or watching) with idle backoff
//! and graceful shutdown.

mod batch;
pub mod circuit;
mod commit;
mod dead_letter;
mod feed;
mod flight;
mod options;
mod outcome;
mod processor;
mod recorder;
pub mod runner;
pub(crate) mod stall;
mod step;
pub(crate) mod throttle;

pub(crate) use batch::Heartbeat;
pub use batch::{ClaimedBatch, HandledBatch, NextBatch, NextHandled};
pub(crate) use dead_letter::put_dead_letters;
pub use dead_letter::{DeadLetterStore, Letter};
pub use feed::{FedRow, KeyFeed};
pub use options::{BatchIds, BatchReport, ProcessorOptions};
pub(crate) use outcome::Verdict;
pub use outcome::{BatchHandler, HeldRows, IntoOutcome, Outcome, panic_text};
pub use processor::{Processor, ProcessorBuilder};
pub use recorder::{EventOutcome, MetricsRecorder};
pub use runner::{RunMode, RunOptions, RunReport, Sleep, Wakeup, run};
pub use step::{Step, StepExt, WithStep};
