//! The outbox relay (`omnibox publish`, the reference's `OutboxPublisher`):
//! claim due outbox rows, publish them through a [`Sink`], write the results.
//!
//! A batch's messages are all in flight at once; events of one key are sent
//! in insertion order. What a key's deliveries become ([`outcomes`]):
//!
//! * everything acknowledged is completed (it is on the broker);
//! * the first failure after the key's last acknowledged message keeps its
//!   kind: transient (no attempt spent, retried in about a second), topic
//!   unavailable (no attempt spent, that topic backs off), or rejected
//!   (counted, with backoff; `failed` at `max_attempts`, then dead-lettered);
//!   the rest of the key's run is released untried and goes out after it;
//! * a failure *before* a message of its key that the broker nevertheless
//!   acknowledged (possible when all are in flight at once) is not retried:
//!   a retry would deliver it after its successors. It becomes `failed` at
//!   once and is dead-lettered, with a reason saying so. No later event of a
//!   key is ever delivered before an earlier one that will still be retried.
//!
//! A topic the broker does not know (or that has no leader, or too few
//! replicas) backs off on its own (1 s doubling to 1 min), without spending
//! attempts and without pausing other topics; once it has been unavailable
//! for longer than [`PublishOptions::unavailable_limit`], its events spend
//! attempts, so they reach `failed` and the dead-letter topic instead of
//! waiting forever.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::domain::Retry;
use crate::model::{OutboxEvent, OutboxRoute};
use crate::pipeline::{BatchHandler, Outcome, Processor, ProcessorBuilder, ProcessorOptions};
use crate::store::OutboxStore;

mod dead_letter;
mod message;
pub mod sink;
pub mod wal;

pub use dead_letter::{DeadLetter, DeadLetterTopic};

pub(crate) use message::passed_on;
pub use message::{DEFAULT_SCHEMA_VERSION, Message, envelope, envelope_with, headers};
pub use sink::{AnySink, Delivery, Sink};

/// Default bound on one message's delivery.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time a topic may stay unavailable before its events spend attempts.
pub const DEFAULT_UNAVAILABLE_LIMIT: Duration = Duration::from_secs(300);

impl DeadLetter for OutboxEvent {
    /// The event's own message bound for `topic` (with `dlq_original_topic`), plus
    /// `dlq_error` (control characters dropped, at most 512 characters; left out when
    /// empty) and `dlq_attempts` (this attempt included, at most `max_attempts`).
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
            (self.attempts_made() + 1)
                .min(self.max_attempts())
                .to_string(),
        );
        m
    }
}

/// Settings of a [`PublishHandler`].
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Bound on one message's delivery.
    pub timeout: Duration,
    /// Delay of a transient failure's retry.
    pub transient_delay: Duration,
    /// How long a topic may stay unavailable before its events spend
    /// attempts (and so reach `failed` and the dead-letter topic).
    pub unavailable_limit: Duration,
    /// First wait of an unavailable topic's events; it doubles with every
    /// batch that finds the topic unavailable, up to `topic_retry_max`.
    pub topic_retry_min: Duration,
    /// Longest wait of an unavailable topic's events.
    pub topic_retry_max: Duration,
    /// The envelope's `schema_version` for events without one of their own.
    pub default_schema_version: String,
}

impl Default for PublishOptions {
    /// The default timeouts and limits; an unavailable topic waits 1 s, doubling up to
    /// 64 s, and events without a schema version get `DEFAULT_SCHEMA_VERSION`.
    fn default() -> Self {
        PublishOptions {
            timeout: DEFAULT_PUBLISH_TIMEOUT,
            transient_delay: crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
            unavailable_limit: DEFAULT_UNAVAILABLE_LIMIT,
            topic_retry_min: Duration::from_secs(1),
            topic_retry_max: Duration::from_secs(64),
            default_schema_version: DEFAULT_SCHEMA_VERSION.to_string(),
        }
    }
}

/// A topic that could not take messages, since when, and why.
#[derive(Debug, Clone)]
struct TopicTrouble {
    since: Instant,
    batches: u32,
    reason: String,
}

/// The handler step of the relay: publish the batch through the sink.
pub struct PublishHandler<K: Sink> {
    sink: Arc<K>,
    options: PublishOptions,
    topics: Mutex<HashMap<String, TopicTrouble>>,
}

impl<K: Sink> PublishHandler<K> {
    /// Publishes through `sink`, each message bounded by `timeout`.
    pub fn new(sink: Arc<K>, timeout: Duration) -> Self {
        Self::with_options(
            sink,
            PublishOptions {
                timeout,
                ..PublishOptions::default()
            },
        )
    }

    /// Publishes through `sink` with `options`.
    pub fn with_options(sink: Arc<K>, options: PublishOptions) -> Self {
        PublishHandler {
            sink,
            options,
            topics: Mutex::new(HashMap::new()),
        }
    }

    /// Topics that are unavailable now, with the reason and for how long.
    pub fn unavailable_topics(&self) -> Vec<(String, String, Duration)> {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = topics
            .iter()
            .map(|(t, tr)| (t.clone(), tr.reason.clone(), tr.since.elapsed()))
            .collect();
        v.sort();
        v
    }

    /// Updates the per-topic state from a batch's deliveries and says, per
    /// unavailable topic, how long to wait (or that the limit has passed).
    fn track_topics(
        &self,
        messages: &[Message],
        deliveries: &[Delivery],
    ) -> HashMap<String, TopicVerdict> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let mut reasons: HashMap<&str, &str> = HashMap::new();
        let mut delivered: HashSet<&str> = HashSet::new();
        for (m, d) in messages.iter().zip(deliveries) {
            match d {
                Delivery::Unavailable(why) => {
                    reasons.entry(m.topic.as_str()).or_insert(why.as_str());
                }
                Delivery::Delivered => {
                    delivered.insert(m.topic.as_str());
                }
                _ => {}
            }
        }
        for t in &delivered {
            if topics.remove(*t).is_some() {
                tracing::info!(topic = %t, "topic available again");
            }
        }
        let mut verdicts = HashMap::new();
        for (topic, why) in reasons {
            let trouble = topics.entry(topic.to_string()).or_insert_with(|| {
                tracing::warn!(topic = %topic, reason = %why, "topic unavailable; its events back off without spending attempts, other topics go on");
                TopicTrouble {
                    since: Instant::now(),
                    batches: 0,
                    reason: why.to_string(),
                }
            });
            trouble.batches = trouble.batches.saturating_add(1);
            trouble.reason = why.to_string();
            let verdict = if trouble.since.elapsed() >= self.options.unavailable_limit {
                TopicVerdict::GiveUp(format!(
                    "{why}; unavailable for {}s, longer than the limit of {}s, so attempts are spent",
                    trouble.since.elapsed().as_secs(),
                    self.options.unavailable_limit.as_secs()
                ))
            } else {
                let exp = trouble.batches.saturating_sub(1).min(16);
                TopicVerdict::Wait(
                    self.options
                        .topic_retry_min
                        .saturating_mul(1 << exp)
                        .min(self.options.topic_retry_max),
                )
            };
            verdicts.insert(topic.to_string(), verdict);
        }
        verdicts
    }
}

/// The spans of one published batch: `publish` for the batch and
/// `publish TOPIC` per event, the event's own trace context (its
/// `traceparent` header) as parent when it has one; each message carries its
/// span's context on to the broker.
struct PublishSpans {
    batch: opentelemetry::Context,
    each: Vec<opentelemetry::Context>,
}

impl PublishSpans {
    /// Starts the batch's span and one span per event, and writes each event span's
    /// context into its message's headers (`traceparent`, `tracestate`).
    fn start(sink: &str, events: &[OutboxEvent], messages: &mut [Message]) -> Self {
        use crate::telemetry::{self, attr};
        use opentelemetry::trace::{SpanKind, TraceContextExt};
        let system = telemetry::system_of(sink);
        let mut batch_attrs = vec![
            attr("messaging.system", system),
            attr("messaging.operation.type", "send"),
            attr("messaging.operation.name", "publish"),
            attr("messaging.batch.message_count", events.len() as i64),
        ];
        if let Some(first) = events.first()
            && events.iter().all(|e| e.topic() == first.topic())
        {
            batch_attrs.push(attr(
                "messaging.destination.name",
                first.topic().to_string(),
            ));
        }
        let batch = telemetry::start(
            "publish".into(),
            SpanKind::Producer,
            &opentelemetry::Context::new(),
            batch_attrs,
        );
        let each = events
            .iter()
            .zip(messages.iter_mut())
            .map(|(event, message)| {
                let own = telemetry::extract(event.headers());
                let parent = if own.span().span_context().is_valid() {
                    &own
                } else {
                    &batch
                };
                let mut attrs = vec![
                    attr("messaging.system", system),
                    attr("messaging.destination.name", event.topic().to_string()),
                    attr("messaging.message.id", event.id().to_string()),
                    attr("messaging.operation.type", "send"),
                    attr("messaging.operation.name", "publish"),
                    attr("omnibox.event_type", event.event_type().to_string()),
                    attr("omnibox.attempt", i64::from(event.attempts_made()) + 1),
                ];
                if system == "kafka" {
                    attrs.push(attr(
                        "messaging.kafka.message.key",
                        event.partition_key().to_string(),
                    ));
                }
                let cx = telemetry::start(
                    format!("publish {}", event.topic()),
                    SpanKind::Producer,
                    parent,
                    attrs,
                );
                telemetry::inject(&cx, &mut message.headers);
                cx
            })
            .collect();
        PublishSpans { batch, each }
    }

    /// Ends each event's span with its delivery's error, if any, then the batch's span
    /// with the count not delivered.
    fn end(self, deliveries: &[Delivery]) {
        let mut failed = 0usize;
        for (cx, d) in self.each.iter().zip(deliveries) {
            let error = match d {
                Delivery::Delivered => None,
                Delivery::Transient(e) | Delivery::Unavailable(e) => Some(e.clone()),
                Delivery::Rejected(e) => Some(format!("broker rejected the record: {e}")),
                Delivery::NotSent => Some("not sent: an earlier event of its key failed".into()),
            };
            failed += usize::from(error.is_some());
            crate::telemetry::end(cx, error.as_deref());
        }
        let error = (failed > 0).then(|| format!("{failed} of {} not delivered", deliveries.len()));
        crate::telemetry::end(&self.batch, error.as_deref());
    }
}

/// What to do with the events of an unavailable topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicVerdict {
    /// Retry after this long; no attempt spent.
    Wait(Duration),
    /// Unavailable for too long: a counted failure with this error.
    GiveUp(String),
}

impl<K: Sink> BatchHandler<OutboxRoute> for PublishHandler<K> {
    /// Sends the whole batch through the sink at once (in spans when telemetry is on),
    /// updates the unavailable topics, and turns the deliveries into outcomes key by key.
    async fn handle(&self, events: &[OutboxEvent]) -> Vec<Outcome> {
        let mut messages: Vec<Message> = events
            .iter()
            .map(|e| Message::from_event_with(e, &self.options.default_schema_version))
            .collect();
        let spans = crate::telemetry::enabled()
            .then(|| PublishSpans::start(&self.sink.describe(), events, &mut messages));
        let deliveries = self.sink.send(&messages, self.options.timeout).await;
        if let Some(spans) = spans {
            spans.end(&deliveries);
        }
        let topics = self.track_topics(&messages, &deliveries);
        outcomes(events, &deliveries, self.options.transient_delay, &topics)
    }
}

/// Turns deliveries into outcomes, key by key (see the module documentation):
/// everything acknowledged is completed; the first failure after the key's
/// last acknowledged message is recorded as what it is and the rest of the
/// key is released untried; a failure before an acknowledged message of its
/// key is dead (a retry would reorder the key).
pub fn outcomes(
    events: &[OutboxEvent],
    deliveries: &[Delivery],
    transient_delay: Duration,
    topics: &HashMap<String, TopicVerdict>,
) -> Vec<Outcome> {
    let deliveries: Vec<&Delivery> = deliveries
        .iter()
        .chain(std::iter::repeat(&Delivery::NotSent))
        .take(events.len())
        .collect();
    // The last acknowledged message of each key.
    let mut last_delivered: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, (e, d)) in events.iter().zip(&deliveries).enumerate() {
        if **d == Delivery::Delivered {
            last_delivered.insert((e.topic(), e.partition_key()), i);
        }
    }
    let mut broken: HashSet<(&str, &str)> = HashSet::new();
    events
        .iter()
        .zip(deliveries)
        .enumerate()
        .map(|(i, (event, delivery))| {
            let key = (event.topic(), event.partition_key());
            let before_a_delivered = last_delivered.get(&key).is_some_and(|&l| i < l);
            if *delivery == Delivery::Delivered {
                return Outcome::Completed;
            }
            if before_a_delivered {
                let later = last_delivered[&key];
                let why = match delivery {
                    Delivery::Rejected(e) => format!("broker rejected the record: {e}"),
                    Delivery::Transient(e) | Delivery::Unavailable(e) => e.clone(),
                    Delivery::NotSent => "not sent".into(),
                    Delivery::Delivered => String::new(),
                };
                tracing::error!(
                    event_id = %event.id(), key = event.partition_key(), later = %events[later].id(),
                    "an event failed after a later event of its key was acknowledged; it is failed now, not retried"
                );
                return Outcome::Dead {
                    error: format!(
                        "{why}; not retried: a later event of its key ({}) was already acknowledged by the broker, \
                         so a retry would deliver this one out of order (replay it deliberately if wanted)",
                        events[later].id()
                    ),
                };
            }
            if broken.contains(&key) {
                return Outcome::Released;
            }
            broken.insert(key);
            match delivery {
                Delivery::Delivered => Outcome::Completed,
                Delivery::Transient(e) => Outcome::Failed {
                    error: format!("broker not answering: {e}"),
                    retry: Retry::NotCountedAfter(transient_delay),
                },
                Delivery::Unavailable(e) => match topics.get(event.topic()) {
                    Some(TopicVerdict::GiveUp(why)) => Outcome::Failed {
                        error: why.clone(),
                        retry: Retry::Counted(None),
                    },
                    Some(TopicVerdict::Wait(d)) => Outcome::Unavailable {
                        error: e.clone(),
                        retry_after: *d,
                    },
                    None => Outcome::Unavailable {
                        error: e.clone(),
                        retry_after: transient_delay,
                    },
                },
                Delivery::Rejected(e) => Outcome::Failed {
                    error: format!("broker rejected the record: {e}"),
                    retry: Retry::Counted(None),
                },
                Delivery::NotSent => Outcome::Released,
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
    let publish = PublishOptions {
        timeout: publish_timeout,
        transient_delay: options.transient_delay,
        ..PublishOptions::default()
    };
    publisher_with(store, sink, options, publish)
}

/// Builds an [`OutboxPublisher`] with all publish settings.
pub fn publisher_with<S: OutboxStore, K: Sink>(
    store: S,
    sink: Arc<K>,
    options: ProcessorOptions,
    publish: PublishOptions,
) -> ProcessorBuilder<OutboxRoute, S, PublishHandler<K>> {
    ProcessorBuilder::new(store, PublishHandler::with_options(sink, publish), options)
        .job("outbox_publisher")
}

#[cfg(test)]
mod tests;
