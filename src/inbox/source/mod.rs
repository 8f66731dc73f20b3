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

    /// Up to `max` messages holding at most `budget` bytes
    /// ([`RawMessage::size`]): the poll ends before a message that would
    /// pass the budget (kept for the next poll), and returns at least one
    /// message, however large. The inbox consumer polls with this. The
    /// default ignores `budget` (a source that cannot tell); omnibox's
    /// file and Kafka sources keep to it.
    fn poll_within(
        &mut self,
        max: usize,
        budget: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Polled>> + Send {
        let _ = budget;
        self.poll(max, wait)
    }

    /// Commits (acknowledges) everything up to and including these messages.
    fn commit(&mut self, through: &[RawMessage]) -> impl Future<Output = Result<()>> + Send;

    /// Delivers these messages again (in order) on the next polls.
    fn rewind(&mut self, from: &[RawMessage]) -> impl Future<Output = Result<()>> + Send;

    /// Waits up to `wait` without taking new messages, keeping the source
    /// alive meanwhile (Kafka: the partitions are paused and the consumer
    /// keeps polling, so a slow handler or a retry's backoff does not cost
    /// it its group membership). The next [`poll`](Source::poll) or
    /// [`resume`](Source::resume) goes on where the consumer was.
    fn idle(&mut self, wait: Duration) -> impl Future<Output = Result<()>> + Send {
        async move {
            tokio::time::sleep(wait).await;
            Ok(())
        }
    }

    /// Ends an [`idle`](Source::idle) stretch: reading goes on from where
    /// it was.
    fn resume(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// False when the message's partition was taken from this consumer
    /// (a Kafka rebalance) since it was read: its handler must not run and
    /// its offset must not be committed here; its new owner reads it again.
    fn owns(&self, message: &RawMessage) -> bool {
        let _ = message;
        true
    }

    /// The messages a poll had read but not handed over when it was
    /// cancelled (a shutdown arriving while the poll waited for more
    /// input); they are the caller's now. A consumer that stops stores
    /// them before it exits: a source that cannot read them again (stdin)
    /// would lose them otherwise. The default has none (a source that
    /// keeps nothing between polls, or whose broker delivers again what was
    /// not committed).
    fn held(&mut self) -> Vec<RawMessage> {
        Vec::new()
    }

    /// True when the consumer may poll the next batch while it stores the
    /// one before (exactly-once without a handler, where a batch is never
    /// given back): the source must not tie anything to the order of its
    /// polls and commits (a file's commit does nothing; a Kafka source's
    /// end-of-partition report confirms the commits made before it, so it
    /// does not read ahead). The early poll waits for nothing.
    fn read_ahead(&self) -> bool {
        false
    }

    /// Whether what was read and not committed comes again to the next
    /// run (a broker's consumer group, a file read from its start): a
    /// consumer whose database connection is lost may then stop and be
    /// started again. False (the default) for a source that cannot be read
    /// again (stdin, a pipe): its consumer retries on a new connection
    /// instead.
    fn replays(&self) -> bool {
        false
    }
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
    /// The chosen source's description.
    fn describe(&self) -> String {
        match self {
            AnySource::Kafka(s) => s.describe(),
            AnySource::File(s) => s.describe(),
        }
    }

    /// Polls the chosen source.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled> {
        match self {
            AnySource::Kafka(s) => s.poll(max, wait).await,
            AnySource::File(s) => s.poll(max, wait).await,
        }
    }

    /// Polls the chosen source within its byte budget (both variants keep to it).
    async fn poll_within(&mut self, max: usize, budget: usize, wait: Duration) -> Result<Polled> {
        match self {
            AnySource::Kafka(s) => s.poll_within(max, budget, wait).await,
            AnySource::File(s) => s.poll_within(max, budget, wait).await,
        }
    }

    /// Commits on the chosen source.
    async fn commit(&mut self, through: &[RawMessage]) -> Result<()> {
        match self {
            AnySource::Kafka(s) => s.commit(through).await,
            AnySource::File(s) => s.commit(through).await,
        }
    }

    /// Rewinds the chosen source to `from`.
    async fn rewind(&mut self, from: &[RawMessage]) -> Result<()> {
        match self {
            AnySource::Kafka(s) => s.rewind(from).await,
            AnySource::File(s) => s.rewind(from).await,
        }
    }

    /// Idles the chosen source (Kafka pauses its partitions; a file only sleeps).
    async fn idle(&mut self, wait: Duration) -> Result<()> {
        match self {
            AnySource::Kafka(s) => s.idle(wait).await,
            AnySource::File(s) => s.idle(wait).await,
        }
    }

    /// Resumes the chosen source after `idle`.
    async fn resume(&mut self) -> Result<()> {
        match self {
            AnySource::Kafka(s) => s.resume().await,
            AnySource::File(s) => s.resume().await,
        }
    }

    /// Whether the chosen source still owns the message's partition (a file always
    /// does).
    fn owns(&self, message: &RawMessage) -> bool {
        match self {
            AnySource::Kafka(s) => s.owns(message),
            AnySource::File(s) => s.owns(message),
        }
    }

    /// What the chosen source read and a cancelled poll did not hand over.
    fn held(&mut self) -> Vec<RawMessage> {
        match self {
            AnySource::Kafka(s) => s.held(),
            AnySource::File(s) => s.held(),
        }
    }

    /// Whether the chosen source reads ahead.
    fn read_ahead(&self) -> bool {
        match self {
            AnySource::Kafka(s) => s.read_ahead(),
            AnySource::File(s) => s.read_ahead(),
        }
    }

    /// Whether the chosen source gives again what was not committed.
    fn replays(&self) -> bool {
        match self {
            AnySource::Kafka(s) => s.replays(),
            AnySource::File(s) => s.replays(),
        }
    }
}
