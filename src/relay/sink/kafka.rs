//! Kafka through rdkafka (librdkafka): an idempotent producer with
//! `acks=all`; every message of a batch is in flight at once, and the
//! delivery reports are awaited together.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{Delivery, Sink};
use crate::error::{Error, Result};
use crate::relay::Message;

/// Publishes to Kafka.
pub struct KafkaSink {
    producer: FutureProducer,
    brokers: String,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("brokers", &self.brokers)
            .finish()
    }
}

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
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string())
            .set("client.id", "omnibox-relay");
        for (k, v) in properties {
            config.set(k, v);
        }
        let producer: FutureProducer = config
            .create()
            .map_err(|e| Error::Config(format!("cannot create the Kafka producer: {e}")))?;
        Ok(KafkaSink {
            producer,
            brokers: brokers.to_string(),
        })
    }

    /// Waits for every queued message (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

/// Sorts a Kafka error into transient (the broker did not answer) and
/// rejected (the broker said no).
pub fn classify(e: &KafkaError) -> Delivery {
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
        C::MessageTimedOut
        | C::AllBrokersDown
        | C::BrokerTransportFailure
        | C::Resolve
        | C::QueueFull
        | C::PurgeQueue
        | C::PurgeInflight
        | C::UnknownTopic
        | C::UnknownPartition
        | C::UnknownTopicOrPartition
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::RequestTimedOut
        | C::NetworkException
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
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
    fn describe(&self) -> String {
        format!("kafka://{}", self.brokers)
    }

    async fn send(&self, messages: &[Message], timeout: Duration) -> Vec<Delivery> {
        let mut out = vec![Delivery::NotSent; messages.len()];
        let mut pending = Vec::with_capacity(messages.len());
        let mut failed_keys: HashSet<(&str, &str)> = HashSet::new();
        for (i, m) in messages.iter().enumerate() {
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
            match self.producer.send_result(record) {
                Ok(future) => pending.push((i, future)),
                Err((e, _)) => {
                    out[i] = classify(&e);
                    failed_keys.insert(key);
                }
            }
        }
        // message.timeout.ms bounds each delivery; this outer bound only
        // guards against a report that never comes.
        let grace = timeout + Duration::from_secs(10);
        let (indexes, futures): (Vec<usize>, Vec<_>) = pending.into_iter().unzip();
        match tokio::time::timeout(grace, join_all(futures)).await {
            Ok(reports) => {
                for (i, report) in indexes.into_iter().zip(reports) {
                    out[i] = match report {
                        Ok(Ok(_)) => Delivery::Delivered,
                        Ok(Err((e, _))) => classify(&e),
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
        out
    }
}
