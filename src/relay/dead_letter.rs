//! Dead letters on a topic: how a failed event becomes a message
//! ([`DeadLetter`]) and the [`DeadLetterStore`] that sends those messages
//! through a sink ([`DeadLetterTopic`]).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::message::Message;
use super::sink::{AnySink, Delivery, Sink};
use crate::error::Result;
use crate::model::{Event, Route};
use crate::pipeline::{DeadLetterStore, Letter};

/// How a failed event is written to a dead-letter topic.
pub trait DeadLetter {
    /// The message for `topic`, carrying `error`.
    fn dead_letter(&self, topic: &str, error: &str) -> Message;
}

/// Dead letters as messages on a topic, with the original topic (or
/// source), the error and the attempts in headers. Best effort: a message
/// the sink does not deliver is logged and not retried (the row is
/// `failed` in its table either way).
pub struct DeadLetterTopic {
    sink: Arc<AnySink>,
    topic: String,
    timeout: Duration,
}

impl DeadLetterTopic {
    /// Letters to `topic` through `sink`.
    pub fn new(sink: Arc<AnySink>, topic: impl Into<String>) -> Self {
        DeadLetterTopic {
            sink,
            topic: topic.into(),
            timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for DeadLetterTopic {
    /// Shows the topic; the sink is left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterTopic")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl<R: Route> DeadLetterStore<R> for DeadLetterTopic
where
    Event<R>: DeadLetter,
{
    /// `topic NAME`, for logs.
    fn describe(&self) -> String {
        format!("topic {}", self.topic)
    }

    /// Sends every letter through the sink at once, each bounded by 30 s; answers how
    /// many were delivered, logging each one that was not. Never an error.
    fn put<'a>(&'a self, letters: &'a [Letter<'a, R>]) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let messages: Vec<_> = letters
                .iter()
                .map(|l| l.event.dead_letter(&self.topic, l.error))
                .collect();
            let mut kept = 0;
            for (m, d) in messages
                .iter()
                .zip(self.sink.send(&messages, self.timeout).await)
            {
                if d == Delivery::Delivered {
                    kept += 1;
                } else {
                    tracing::error!(event_id = %m.event_id, topic = %self.topic, delivery = ?d, "could not write a dead letter (the row is failed in its table)");
                }
            }
            Ok(kept)
        })
    }
}
