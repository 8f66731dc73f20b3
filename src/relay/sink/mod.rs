//! Where the relay publishes: Kafka, a JSON lines file, stdout, or nowhere.
//!
//! A [`Sink`] takes a batch of [`Message`]s and reports one [`Delivery`] per
//! message. Messages with the same `(topic, key)` are handed over in order;
//! a sink that cannot hand one of them over does not send the ones after it
//! (they come back [`Delivery::NotSent`]), so a key's order survives failures.

use std::future::Future;
use std::time::Duration;

use super::Message;
use crate::error::{Error, Result};

mod file;
mod kafka;

pub use file::{FileSink, StdoutSink};
pub use kafka::KafkaSink;

/// The default sink: a JSON lines file in the working directory.
pub const DEFAULT_BROKER_URL: &str = "file:omnibox-events.jsonl";

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The broker acknowledged it (for Kafka: `acks=all`).
    Delivered,
    /// The broker did not answer (down, unreachable, timed out): the event
    /// is not at fault and spends no attempt.
    Transient(String),
    /// This message's destination cannot take it now (the topic is unknown
    /// to the broker, has no leader, or too few in-sync replicas) while the
    /// broker itself answers: no attempt spent, and only that topic backs off.
    Unavailable(String),
    /// The broker answered "no" (too large, not authorised, invalid): a
    /// counted failure.
    Rejected(String),
    /// Not handed over, because an earlier message of the same key failed.
    NotSent,
}

/// A destination for messages.
pub trait Sink: Send + Sync + 'static {
    /// A description for logs (no secrets), e.g. `kafka://127.0.0.1:9092`.
    fn describe(&self) -> String;

    /// Sends a batch, all messages in flight at once, and waits (at most
    /// `timeout` per message) for the acknowledgements. Returns one delivery
    /// per message, in order.
    fn send(
        &self,
        messages: &[Message],
        timeout: Duration,
    ) -> impl Future<Output = Vec<Delivery>> + Send;
}

/// Discards everything (benchmarks).
#[derive(Debug, Clone, Default)]
pub struct NullSink;

impl Sink for NullSink {
    /// `null`.
    fn describe(&self) -> String {
        "null".into()
    }

    /// Answers `Delivered` for every message without sending anything.
    async fn send(&self, messages: &[Message], _timeout: Duration) -> Vec<Delivery> {
        vec![Delivery::Delivered; messages.len()]
    }
}

/// A sink chosen by URL (`--broker`).
#[derive(Debug)]
#[non_exhaustive]
pub enum AnySink {
    /// `kafka://host:port[,host:port]`.
    Kafka(KafkaSink),
    /// `file:PATH`.
    File(FileSink),
    /// `stdout`.
    Stdout(StdoutSink),
    /// `null`.
    Null(NullSink),
}

impl AnySink {
    /// Opens the sink named by `url`; `properties` are extra librdkafka
    /// settings (`-X key=value`) for Kafka and must be empty otherwise.
    pub fn from_url(url: &str, properties: &[(String, String)], timeout: Duration) -> Result<Self> {
        let url = url.trim();
        let no_properties = |kind: &str| {
            if properties.is_empty() {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "-X properties apply to Kafka only, not to {kind}"
                )))
            }
        };
        if let Some(brokers) = url.strip_prefix("kafka://") {
            return Ok(AnySink::Kafka(KafkaSink::new(
                brokers, properties, timeout,
            )?));
        }
        if let Some(path) = url.strip_prefix("file:") {
            no_properties("a file")?;
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(Error::Config(
                    "file: needs a path, e.g. file:omnibox-events.jsonl".into(),
                ));
            }
            return Ok(AnySink::File(FileSink::open(path)?));
        }
        match url {
            "stdout" | "-" => {
                no_properties("stdout")?;
                Ok(AnySink::Stdout(StdoutSink::default()))
            }
            "null" => {
                no_properties("null")?;
                Ok(AnySink::Null(NullSink))
            }
            other => Err(Error::Config(format!(
                "unsupported broker URL {other:?}: use kafka://HOST:PORT[,HOST:PORT], file:PATH, stdout or null"
            ))),
        }
    }
}

impl Sink for AnySink {
    /// The chosen sink's description.
    fn describe(&self) -> String {
        match self {
            AnySink::Kafka(s) => s.describe(),
            AnySink::File(s) => s.describe(),
            AnySink::Stdout(s) => s.describe(),
            AnySink::Null(s) => s.describe(),
        }
    }

    /// Sends through the chosen sink.
    async fn send(&self, messages: &[Message], timeout: Duration) -> Vec<Delivery> {
        match self {
            AnySink::Kafka(s) => s.send(messages, timeout).await,
            AnySink::File(s) => s.send(messages, timeout).await,
            AnySink::Stdout(s) => s.send(messages, timeout).await,
            AnySink::Null(s) => s.send(messages, timeout).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Duration::from_secs(1);
        assert!(matches!(
            AnySink::from_url("null", &[], t).unwrap(),
            AnySink::Null(_)
        ));
        assert!(matches!(
            AnySink::from_url("stdout", &[], t).unwrap(),
            AnySink::Stdout(_)
        ));
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file:{}", dir.path().join("x.jsonl").display());
        assert!(matches!(
            AnySink::from_url(&url, &[], t).unwrap(),
            AnySink::File(_)
        ));
        assert!(
            AnySink::from_url("amqp://x", &[], t)
                .unwrap_err()
                .to_string()
                .contains("unsupported broker URL")
        );
        assert!(AnySink::from_url("file:", &[], t).is_err());
        let props = vec![("acks".to_string(), "1".to_string())];
        assert!(
            AnySink::from_url("null", &props, t)
                .unwrap_err()
                .to_string()
                .contains("Kafka only")
        );
    }
}
