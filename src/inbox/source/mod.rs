//! Where the inbox consumer reads from: Kafka (a consumer group with manual
//! commits), or a JSON lines file / stdin in the format the relay's file sink
//! writes.

use std::future::Future;
use std::time::Duration;

use crate::error::Result;
use crate::inbox::RawMessage;

mod file;
mod kafka;

pub use file::FileSource;
pub use kafka::KafkaSource;

/// What a poll returned.
#[derive(Debug, Default)]
pub struct Polled {
    /// The messages, in order.
    pub messages: Vec<RawMessage>,
    /// The source has nothing more for now: end of input (file), or caught up
    /// with the end of every assigned partition (Kafka).
    pub end: bool,
}

/// A source of broker messages.
pub trait Source: Send {
    /// For logs.
    fn describe(&self) -> String;

    /// Up to `max` messages, waiting at most `wait` for the first.
    fn poll(&mut self, max: usize, wait: Duration) -> impl Future<Output = Result<Polled>> + Send;

    /// Commits (acknowledges) everything up to and including these messages.
    fn commit(&mut self, through: &[RawMessage]) -> impl Future<Output = Result<()>> + Send;

    /// Delivers these messages again (in order) on the next polls.
    fn rewind(&mut self, from: &[RawMessage]) -> impl Future<Output = Result<()>> + Send;
}

/// A source chosen by URL (`--from`).
#[derive(Debug)]
#[non_exhaustive]
pub enum AnySource {
    /// `kafka://HOST:PORT[,HOST:PORT]`.
    Kafka(Box<KafkaSource>),
    /// `file:PATH` or `-` (stdin).
    File(FileSource),
}

impl Source for AnySource {
    fn describe(&self) -> String {
        match self {
            AnySource::Kafka(s) => s.describe(),
            AnySource::File(s) => s.describe(),
        }
    }

    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled> {
        match self {
            AnySource::Kafka(s) => s.poll(max, wait).await,
            AnySource::File(s) => s.poll(max, wait).await,
        }
    }

    async fn commit(&mut self, through: &[RawMessage]) -> Result<()> {
        match self {
            AnySource::Kafka(s) => s.commit(through).await,
            AnySource::File(s) => s.commit(through).await,
        }
    }

    async fn rewind(&mut self, from: &[RawMessage]) -> Result<()> {
        match self {
            AnySource::Kafka(s) => s.rewind(from).await,
            AnySource::File(s) => s.rewind(from).await,
        }
    }
}
