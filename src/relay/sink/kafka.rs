//! Kafka through rdkafka (librdkafka): an idempotent producer with
//! `acks=all` and librdkafka's gap-less guarantee; every message of a batch
//! is in flight at once, and the delivery reports are awaited together.
//!
//! Order: with the idempotent producer a broker appends a partition's
//! batches in order, and with `enable.gapless.guarantee` a batch the broker
//! rejects stops every later batch of the producer (a fatal error): nothing
//! of a key after a rejected message is appended. The producer is then
//! built anew for the next batch. The relay keeps its own rule on top
//! (`relay::outcomes`), whatever the broker does.
//!
//! Topics: a topic not seen before is looked up in the broker's metadata
//! before its messages are sent, so a missing topic is reported at once
//! (and by name) instead of after the publish timeout.
//!
//! Outages and restarts: once librdkafka reports every broker connection
//! down, no message is queued until a metadata request is answered again:
//! messages queued into an outage would only time out there, and a timed-out
//! idempotent batch makes librdkafka bump the producer epoch, which a broker
//! that lost its producer state (a restarted one) may refuse. A batch whose
//! messages time out while the broker is connected means the broker answers
//! but does not take this producer's records (for example `UnknownProducerId`
//! after a restart): the producer is built anew, with a new producer id, and
//! the failure says so instead of reporting silence.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{Delivery, Sink};
use crate::error::{Error, Result};
use crate::relay::Message;

/// A producer and what its context saw.
struct Kafka {
    producer: FutureProducer<Watch>,
    watch: Arc<WatchState>,
}

/// The producer's context: keeps what it sees in a [`WatchState`].
struct Watch(Arc<WatchState>);

/// The producer's global errors: whether every broker connection is down,
/// and the last error, for the outage's report.
#[derive(Default)]
struct WatchState {
    down: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl WatchState {
    /// The last producer error librdkafka reported (other than "all brokers down").
    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ClientContext for Watch {
    /// Marks the brokers down on `AllBrokersDown`; keeps any other error as the last
    /// one (logged at debug: librdkafka repeats it on every reconnection attempt).
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            // Says nothing of why: keep the error that does (a refused
            // connection, a failed authentication).
            self.0.down.store(true, Ordering::SeqCst);
            return;
        }
        // librdkafka repeats these for every reconnection attempt; the relay
        // reports an outage once, with the last of them.
        tracing::debug!(target: "librdkafka", error = %error, reason, "Kafka producer error");
        *self.0.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(format!("{error}: {reason}"));
    }
}

/// Publishes to Kafka.
pub struct KafkaSink {
    config: ClientConfig,
    producer: Mutex<Arc<Kafka>>,
    /// Topics the broker's metadata (or a delivery) showed to exist.
    known_topics: Mutex<HashSet<String>>,
    brokers: String,
}

impl std::fmt::Debug for KafkaSink {
    /// Shows the brokers with their credentials masked.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("brokers", &crate::redact::url(&self.brokers))
            .finish()
    }
}

/// The largest record the producer sends by default (value, key and
/// headers): the Java client's `max.request.size`.
pub const MAX_RECORD_BYTES: usize = 1_048_576;

impl KafkaSink {
    /// A producer for `brokers` (`host:port[,host:port]`). `timeout` bounds
    /// each message's delivery (`message.timeout.ms`); `properties` override
    /// any librdkafka setting.
    pub fn new(brokers: &str, properties: &[(String, String)], timeout: Duration) -> Result<Self> {
        if brokers.trim().is_empty() {
            return Err(Error::Config(
                "kafka:// needs at least one HOST:PORT".into(),
            ));
        }
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("enable.gapless.guarantee", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            // librdkafka leaves Nagle's algorithm on by default: a small
            // request written while an earlier one is unacknowledged waits
            // for the broker's delayed ACK (up to 40 ms) across a network.
            .set("socket.nagle.disable", "true")
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string())
            // A topic the broker does not know fails its messages after this
            // long rather than after the message timeout.
            .set("topic.metadata.propagation.max.ms", "1000")
            // librdkafka refuses a record over 1,000,000 bytes (value, key
            // and headers) before sending it, while a valid event's payload
            // alone may be 1,000,000 bytes: its envelope would be rejected
            // for ever. The Java client's limit (max.request.size), under
            // a broker's default message.max.bytes (1,048,588): an event
            // whose envelope is larger is refused by whichever limit it
            // passes first, a rejection either way (-X raises it for a
            // broker that takes more).
            .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
            .set("client.id", "omnibox-relay");
        for (k, v) in properties {
            config.set(k, v);
        }
        let producer = create(&config)?;
        Ok(KafkaSink {
            config,
            producer: Mutex::new(Arc::new(producer)),
            known_topics: Mutex::new(HashSet::new()),
            brokers: brokers.to_string(),
        })
    }

    /// Waits for every queued message (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer().producer.flush(timeout);
    }

    /// A record refused for its size says how large it was, which limits
    /// apply, and what to change.
    fn explain_size(&self, m: &Message, e: &KafkaError, d: Delivery) -> Delivery {
        let Delivery::Rejected(text) = d else {
            return d;
        };
        if !matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
        ) {
            return Delivery::Rejected(text);
        }
        let size = m.value.get().len()
            + m.key.len()
            + m.headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let limit = self.config.get("message.max.bytes").unwrap_or("1000000");
        Delivery::Rejected(format!(
            "{text}: the record is {size} bytes (value, key and headers, without the protocol's framing); the producer sends at most message.max.bytes ({limit}) and the topic accepts at most its max.message.bytes: raise both (-X message.max.bytes=N and the topic's setting) or make the event smaller"
        ))
    }

    /// The producer in use now (a later `renew` may replace it; this handle stays valid).
    fn producer(&self) -> Arc<Kafka> {
        self.producer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces `used` by a new producer (a new producer id), unless another
    /// batch did already. Returns whether this call replaced it.
    fn renew(&self, used: &Arc<Kafka>, why: &str) -> bool {
        let mut slot = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&slot, used) {
            return false; // another batch renewed it already
        }
        match create(&self.config) {
            Ok(fresh) => {
                tracing::warn!(reason = %why, "using a new Kafka producer");
                *slot = Arc::new(fresh);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, reason = %why, "a new Kafka producer cannot be created; keeping the old one");
                false
            }
        }
    }

    /// Asks the broker for its metadata: whether any broker answers. The
    /// error says why not.
    async fn probe(
        &self,
        producer: &Arc<Kafka>,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let p = producer.clone();
        let wait = timeout.min(Duration::from_secs(5));
        let answer = tokio::task::spawn_blocking(move || {
            p.producer.client().fetch_metadata(None, wait).map(|_| ())
        })
        .await;
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(producer.watch.last_error().unwrap_or_else(|| e.to_string())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Looks up the topics not known yet in the broker's metadata. Returns
    /// the ones the broker says are missing or unusable, with why. A broker
    /// that does not answer says nothing here: the sends will tell.
    async fn check_topics(
        &self,
        producer: &Arc<Kafka>,
        messages: &[Message],
        timeout: Duration,
    ) -> HashMap<String, String> {
        let unknown: Vec<String> = {
            let known = self.known_topics.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen = HashSet::new();
            messages
                .iter()
                .filter(|m| !known.contains(&m.topic) && seen.insert(m.topic.as_str()))
                .map(|m| m.topic.clone())
                .collect()
        };
        let mut troubled = HashMap::new();
        for topic in unknown {
            let p = producer.clone();
            let t = topic.clone();
            let wait = timeout.min(Duration::from_secs(5));
            let md = tokio::task::spawn_blocking(move || {
                p.producer
                    .client()
                    .fetch_metadata(Some(&t), wait)
                    .map(|md| {
                        md.topics()
                            .iter()
                            .find(|mt| mt.name() == t)
                            .map(|mt| (mt.error(), mt.partitions().len()))
                    })
            })
            .await;
            match md {
                Ok(Ok(Some((None, n)))) if n > 0 => {
                    self.known_topics
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(topic);
                }
                Ok(Ok(Some((Some(err), _)))) => {
                    // Only "the topic is not there (yet)" holds its messages
                    // back here; any other answer (not authorised, say) is
                    // the sends' to report, as a rejection.
                    let code: RDKafkaErrorCode = err.into();
                    if is_unavailable(code) {
                        troubled.insert(topic.clone(), topic_trouble(&topic, code));
                    }
                }
                Ok(Ok(_)) => {
                    troubled.insert(
                        topic.clone(),
                        format!("topic {topic:?} has no partitions on the broker yet"),
                    );
                }
                // Not answered: let the sends report it.
                Ok(Err(_)) | Err(_) => {}
            }
        }
        troubled
    }
}

/// The producer for `config`, with the context that records the broker's
/// connection state; a bad property is a configuration error.
fn create(config: &ClientConfig) -> Result<Kafka> {
    let watch = Arc::new(WatchState::default());
    config
        .create_with_context(Watch(watch.clone()))
        .map(|producer| Kafka { producer, watch })
        .map_err(|e| Error::Config(format!("cannot create the Kafka producer: {e}")))
}

/// Codes that say a topic cannot take messages *now* (and may later).
fn is_unavailable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::UnknownTopic
            | C::UnknownPartition
            | C::UnknownTopicOrPartition
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
    )
}

/// What to tell an operator about a topic the broker cannot take messages for.
fn topic_trouble(topic: &str, code: RDKafkaErrorCode) -> String {
    use RDKafkaErrorCode as C;
    match code {
        C::UnknownTopicOrPartition | C::UnknownTopic => format!(
            "topic {topic:?} does not exist on the broker ({code}): create it, or enable automatic topic creation"
        ),
        C::LeaderNotAvailable | C::NotLeaderForPartition => format!(
            "topic {topic:?} has no leader available ({code}): the broker is electing one, or the topic is being created"
        ),
        C::NotEnoughReplicas | C::NotEnoughReplicasAfterAppend => format!(
            "topic {topic:?} has too few in-sync replicas for acks=all ({code}): check the brokers holding it and min.insync.replicas"
        ),
        other => format!("topic {topic:?} cannot take messages ({other})"),
    }
}

/// Sorts a Kafka error into transient (the broker did not answer),
/// unavailable (this message's topic cannot take it now) and rejected (the
/// broker said no to the record).
pub fn classify(topic: &str, e: &KafkaError) -> Delivery {
    use RDKafkaErrorCode as C;
    let text = e.to_string();
    let Some(code) = e.rdkafka_error_code() else {
        return Delivery::Transient(text);
    };
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::InvalidTopic
        | C::MessageBatchTooLarge
        | C::InvalidRecord
        | C::PolicyViolation
        | C::InvalidArgument
        | C::UnsupportedForMessageFormat
        | C::InvalidRequiredAcks => Delivery::Rejected(text),
        c if is_unavailable(c) => Delivery::Unavailable(topic_trouble(topic, c)),
        C::MessageTimedOut
        | C::AllBrokersDown
        | C::BrokerTransportFailure
        | C::Resolve
        | C::QueueFull
        | C::PurgeQueue
        | C::PurgeInflight
        | C::RequestTimedOut
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::KafkaStorageError
        | C::Fatal => Delivery::Transient(text),
        // librdkafka's own (negative) codes are about the client and its
        // connections; a broker's codes are answers about the record.
        other if (other as i32) < 0 => Delivery::Transient(text),
        _ => Delivery::Rejected(text),
    }
}

impl Sink for KafkaSink {
    /// `kafka://BROKERS`, credentials masked.
    fn describe(&self) -> String {
        crate::redact::url(&format!("kafka://{}", self.brokers))
    }

    /// Sends the batch with librdkafka, all in flight at once, after a probe when the
    /// brokers were down and a metadata check of new topics. Messages of an unavailable
    /// topic, and of a key after a failed hand-over, are not sent; a producer that
    /// stopped or whose records time out while connected is replaced for the next batch.
    async fn send(&self, messages: &[Message], timeout: Duration) -> Vec<Delivery> {
        let producer = self.producer();
        let watch = &producer.watch;
        if watch.down.load(Ordering::SeqCst) {
            // Queue nothing into an outage: the broker must answer first.
            match self.probe(&producer, timeout).await {
                Ok(()) => watch.down.store(false, Ordering::SeqCst),
                Err(why) => {
                    return vec![
                        Delivery::Transient(format!("no Kafka broker reachable: {why}"));
                        messages.len()
                    ];
                }
            }
        }
        let troubled = self.check_topics(&producer, messages, timeout).await;
        let mut out = vec![Delivery::NotSent; messages.len()];
        let mut pending = Vec::with_capacity(messages.len());
        let mut failed_keys: HashSet<(&str, &str)> = HashSet::new();
        for (i, m) in messages.iter().enumerate() {
            if let Some(why) = troubled.get(&m.topic) {
                out[i] = Delivery::Unavailable(why.clone());
                continue;
            }
            let key = (m.topic.as_str(), m.key.as_str());
            if failed_keys.contains(&key) {
                continue;
            }
            let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
            for (k, v) in &m.headers {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_str()),
                });
            }
            let record = FutureRecord::to(&m.topic)
                .key(m.key.as_bytes())
                .payload(m.value.get().as_bytes())
                .headers(headers);
            match producer.producer.send_result(record) {
                Ok(future) => pending.push((i, future)),
                Err((e, _)) => {
                    out[i] = self.explain_size(m, &e, classify(&m.topic, &e));
                    failed_keys.insert(key);
                }
            }
        }
        // message.timeout.ms bounds each delivery; this outer bound only
        // guards against a report that never comes.
        let grace = timeout + Duration::from_secs(10);
        let (indexes, futures): (Vec<usize>, Vec<_>) = pending.into_iter().unzip();
        let mut timed_out = Vec::new();
        match tokio::time::timeout(grace, join_all(futures)).await {
            Ok(reports) => {
                for (i, report) in indexes.into_iter().zip(reports) {
                    out[i] = match report {
                        Ok(Ok(_)) => Delivery::Delivered,
                        Ok(Err((e, _))) => {
                            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut) {
                                timed_out.push(i);
                            }
                            self.explain_size(&messages[i], &e, classify(&messages[i].topic, &e))
                        }
                        Err(_) => {
                            Delivery::Transient("the producer dropped the delivery report".into())
                        }
                    };
                }
            }
            Err(_) => {
                for i in indexes {
                    out[i] = Delivery::Transient(format!("no delivery report within {grace:?}"));
                }
            }
        }
        {
            let mut known = self.known_topics.lock().unwrap_or_else(|p| p.into_inner());
            for (m, d) in messages.iter().zip(&out) {
                match d {
                    Delivery::Delivered if !known.contains(&m.topic) => {
                        known.insert(m.topic.clone());
                    }
                    // Look it up again before its next messages go out.
                    Delivery::Unavailable(_) => {
                        known.remove(&m.topic);
                    }
                    _ => {}
                }
            }
        }
        // A producer that stopped (the gap-less guarantee, or fenced by the
        // broker) is unusable; one whose records time out while the broker
        // is connected is refused by it (its producer state lost, say): use a
        // new producer for the next batch and say what happened.
        let renewed = if let Some((code, reason)) = producer.producer.client().fatal_error() {
            let why = format!("the Kafka producer stopped on a fatal error ({code:?}: {reason})");
            for d in &mut out {
                if let Delivery::Transient(t) = d {
                    *t = format!("{why}; a new producer takes the next batch");
                }
            }
            self.renew(&producer, &why)
        } else if !timed_out.is_empty() && !watch.down.load(Ordering::SeqCst) {
            let why = format!(
                "the broker is connected but acknowledged none of {} record(s) within {timeout:?}{}",
                timed_out.len(),
                watch
                    .last_error()
                    .map(|e| format!(" (last producer error: {e})"))
                    .unwrap_or_default()
            );
            for &i in &timed_out {
                out[i] = Delivery::Transient(format!("{why}; a new producer takes the next batch"));
            }
            self.renew(&producer, &why)
        } else {
            false
        };
        if renewed {
            // The last handle of the old producer: dropping it flushes
            // (purges, then waits up to 500 ms), so not on this thread.
            tokio::task::spawn_blocking(move || drop(producer));
        }
        out
    }
}
