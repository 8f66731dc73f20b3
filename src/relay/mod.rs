//! The outbox relay (`omnibox publish`, the reference's `OutboxPublisher`):
//! claim due outbox rows, publish them through a [`Sink`], write the results.
//!
//! A batch's messages are all in flight at once; events of one key are sent
//! in insertion order, and a key stops at its first failure: the failed event
//! is rescheduled (transient: no attempt spent, retried in about a second;
//! rejected: counted, with backoff, `failed` at `max_attempts` and then
//! dead-lettered), and the rest of the key's run is released untried.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Retry, chrono_dur};
use crate::model::{OutboxEvent, OutboxRoute, time};
use crate::pipeline::{
    BatchHandler, DeadLetter, Outcome, Processor, ProcessorBuilder, ProcessorOptions,
};
use crate::store::OutboxStore;

mod message;
pub mod sink;

pub use message::{DEFAULT_SCHEMA_VERSION, Message, envelope, headers};
pub use sink::{AnySink, Delivery, Sink};

/// Default bound on one message's delivery.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

impl DeadLetter for OutboxEvent {
    fn dead_letter(&self, topic: &str, error: &str) -> Message {
        let mut m = Message::dead_letter(self, topic);
        if !error.is_empty() {
            let e: String = error
                .chars()
                .filter(|c| !c.is_control())
                .take(512)
                .collect();
            m.headers.insert("dlq_error".into(), e);
        }
        m.headers.insert(
            "dlq_attempts".into(),
            (self.attempts_made() + 1).to_string(),
        );
        m
    }
}

/// The handler step of the relay: publish the batch through the sink.
pub struct PublishHandler<K: Sink> {
    sink: Arc<K>,
    timeout: Duration,
    transient_delay: Duration,
}

impl<K: Sink> PublishHandler<K> {
    /// Publishes through `sink`, each message bounded by `timeout`.
    pub fn new(sink: Arc<K>, timeout: Duration) -> Self {
        PublishHandler {
            sink,
            timeout,
            transient_delay: crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
        }
    }
}

impl<K: Sink> BatchHandler<OutboxRoute> for PublishHandler<K> {
    async fn handle(&self, events: &[OutboxEvent]) -> Vec<Outcome> {
        let messages: Vec<Message> = events.iter().map(Message::from_event).collect();
        let deliveries = self.sink.send(&messages, self.timeout).await;
        outcomes(events, &deliveries, self.transient_delay)
    }
}

/// Turns deliveries into outcomes, key by key: everything before a key's
/// first failure is completed, the failure is recorded, the rest of the key
/// is released untried.
pub fn outcomes(
    events: &[OutboxEvent],
    deliveries: &[Delivery],
    transient_delay: Duration,
) -> Vec<Outcome> {
    let retry_transient = time::now() + chrono_dur(transient_delay);
    let mut broken: HashSet<(&str, &str)> = HashSet::new();
    events
        .iter()
        .zip(deliveries.iter().chain(std::iter::repeat(&Delivery::NotSent)))
        .map(|(event, delivery)| {
            let key = (event.topic(), event.partition_key());
            if broken.contains(&key) {
                if *delivery == Delivery::Delivered {
                    // Sent before the sink learnt of the earlier failure:
                    // it is on the broker, so it counts as published.
                    tracing::warn!(
                        event_id = %event.id(), key = event.partition_key(),
                        "published after an earlier event of its key failed; that key is out of order on the broker"
                    );
                    return Outcome::Completed;
                }
                return Outcome::Released;
            }
            match delivery {
                Delivery::Delivered => Outcome::Completed,
                Delivery::Transient(e) => {
                    broken.insert(key);
                    Outcome::Failed {
                        error: format!("broker not answering: {e}"),
                        retry: Retry::NotCounted(retry_transient),
                    }
                }
                Delivery::Rejected(e) => {
                    broken.insert(key);
                    Outcome::Failed {
                        error: format!("broker rejected the record: {e}"),
                        retry: Retry::Counted(None),
                    }
                }
                Delivery::NotSent => {
                    broken.insert(key);
                    Outcome::Released
                }
            }
        })
        .collect()
}

/// The relay: a [`Processor`] over the outbox with a [`PublishHandler`].
pub type OutboxPublisher<S, K> = Processor<OutboxRoute, S, PublishHandler<K>>;

/// Builds an [`OutboxPublisher`] for `store` publishing through `sink`.
pub fn publisher<S: OutboxStore, K: Sink>(
    store: S,
    sink: Arc<K>,
    options: ProcessorOptions,
    publish_timeout: Duration,
) -> ProcessorBuilder<OutboxRoute, S, PublishHandler<K>> {
    ProcessorBuilder::new(store, PublishHandler::new(sink, publish_timeout), options)
        .job("outbox_publisher")
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::{DomainService, NewOutboxEvent};

    fn ev(key: &str) -> OutboxEvent {
        DomainService::default()
            .create_outbox_event(NewOutboxEvent::new(
                "a",
                Uuid::now_v7(),
                "t",
                "orders",
                key,
                json!({"a": 1}),
            ))
            .unwrap()
    }

    #[test]
    fn a_key_stops_at_its_first_failure() {
        let events = vec![ev("a"), ev("b"), ev("a"), ev("a"), ev("b"), ev("c")];
        let d = vec![
            Delivery::Delivered,
            Delivery::Transient("down".into()),
            Delivery::Rejected("too large".into()),
            Delivery::NotSent,
            Delivery::Delivered,
            Delivery::Delivered,
        ];
        let o = outcomes(&events, &d, Duration::from_secs(1));
        assert_eq!(o[0], Outcome::Completed);
        assert!(
            matches!(&o[1], Outcome::Failed { retry: Retry::NotCounted(_), error } if error.contains("down"))
        );
        assert!(
            matches!(&o[2], Outcome::Failed { retry: Retry::Counted(None), error } if error.contains("too large"))
        );
        assert_eq!(o[3], Outcome::Released);
        assert_eq!(o[4], Outcome::Completed, "already on the broker");
        assert_eq!(o[5], Outcome::Completed);
    }

    #[test]
    fn dead_letters_carry_the_error_and_origin() {
        let e = ev("k");
        let m = e.dead_letter("orders.dlq", "broker rejected the record: too large");
        assert_eq!(m.topic, "orders.dlq");
        assert_eq!(m.key, "k");
        assert_eq!(m.headers["dlq_original_topic"], "orders");
        assert_eq!(
            m.headers["dlq_error"],
            "broker rejected the record: too large"
        );
        assert_eq!(m.headers["dlq_attempts"], "1");
        assert_eq!(m.headers["event_id"], e.id().to_string());
    }
}
