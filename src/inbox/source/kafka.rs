//! Kafka: a consumer group (rdkafka), manual offset commits after the inbox
//! transaction commits, seek back to redeliver.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{Polled, Source};
use crate::error::{Error, Result};
use crate::inbox::RawMessage;

/// Reads from Kafka topics in a consumer group.
pub struct KafkaSource {
    consumer: StreamConsumer,
    brokers: String,
    group: String,
    topics: Vec<String>,
    /// Next offset to read per partition, as far as this consumer has read.
    seen: HashMap<(String, i32), i64>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("brokers", &self.brokers)
            .field("group", &self.group)
            .field("topics", &self.topics)
            .finish()
    }
}

fn kafka_err(what: &str, e: rdkafka::error::KafkaError) -> Error {
    Error::Config(format!("{what}: {e}"))
}

impl KafkaSource {
    /// Joins `group` on `brokers` and subscribes to `topics`; `properties`
    /// override any librdkafka consumer setting.
    pub fn new(
        brokers: &str,
        group: &str,
        topics: &[String],
        properties: &[(String, String)],
    ) -> Result<Self> {
        if topics.is_empty() {
            return Err(Error::Config(
                "a Kafka source needs at least one --topic".into(),
            ));
        }
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("client.id", "omnibox-inbox");
        for (k, v) in properties {
            config.set(k, v);
        }
        let consumer: StreamConsumer = config
            .create()
            .map_err(|e| kafka_err("cannot create the Kafka consumer", e))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| kafka_err("cannot subscribe", e))?;
        Ok(KafkaSource {
            consumer,
            brokers: brokers.to_string(),
            group: group.to_string(),
            topics: topics.to_vec(),
            seen: HashMap::new(),
        })
    }

    fn to_raw(m: &rdkafka::message::BorrowedMessage<'_>) -> RawMessage {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        RawMessage {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            headers,
            payload: m.payload().map(<[u8]>::to_vec),
            position_is_identity: true,
            cut: None,
        }
    }

    /// True when every assigned partition has been read to its end.
    fn caught_up(&self) -> bool {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(_) => return false,
        };
        let parts: Vec<(String, i32)> = assignment
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        drop(assignment);
        if parts.is_empty() {
            return false;
        }
        let committed: BTreeMap<(String, i32), i64> =
            match self.consumer.committed(Duration::from_secs(5)) {
                Ok(tpl) => {
                    let map = tpl
                        .elements()
                        .iter()
                        .filter_map(|e| match e.offset() {
                            Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                            _ => None,
                        })
                        .collect();
                    drop(tpl);
                    map
                }
                Err(_) => return false,
            };
        parts.iter().all(|(t, p)| {
            let Ok((low, high)) = self
                .consumer
                .fetch_watermarks(t, *p, Duration::from_secs(5))
            else {
                return false;
            };
            let position = self
                .seen
                .get(&(t.clone(), *p))
                .copied()
                .or_else(|| committed.get(&(t.clone(), *p)).copied())
                .unwrap_or(low);
            position >= high
        })
    }
}

impl Source for KafkaSource {
    fn describe(&self) -> String {
        format!(
            "kafka://{} (group {}, topics {})",
            self.brokers,
            self.group,
            self.topics.join(",")
        )
    }

    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled> {
        let mut out = Vec::new();
        let first = tokio::time::timeout(wait, self.consumer.recv()).await;
        match first {
            Err(_) => {
                let end = tokio::task::block_in_place(|| self.caught_up());
                return Ok(Polled { messages: out, end });
            }
            Ok(Err(e)) => return Err(kafka_err("cannot read from Kafka", e)),
            Ok(Ok(m)) => out.push(Self::to_raw(&m)),
        }
        while out.len() < max {
            match tokio::time::timeout(Duration::from_millis(2), self.consumer.recv()).await {
                Ok(Ok(m)) => out.push(Self::to_raw(&m)),
                Ok(Err(e)) => return Err(kafka_err("cannot read from Kafka", e)),
                Err(_) => break,
            }
        }
        for m in &out {
            self.seen
                .insert((m.topic.clone(), m.partition), m.offset + 1);
        }
        Ok(Polled {
            messages: out,
            end: false,
        })
    }

    async fn commit(&mut self, through: &[RawMessage]) -> Result<()> {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for m in through {
            let e = next
                .entry((m.topic.as_str(), m.partition))
                .or_insert(m.offset + 1);
            *e = (*e).max(m.offset + 1);
        }
        if next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &next {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                .map_err(|e| kafka_err("bad offset", e))?;
        }
        let result = tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync));
        drop(tpl);
        result.map_err(|e| kafka_err("cannot commit offsets", e))
    }

    async fn rewind(&mut self, from: &[RawMessage]) -> Result<()> {
        let mut first: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in from {
            let e = first
                .entry((m.topic.clone(), m.partition))
                .or_insert(m.offset);
            *e = (*e).min(m.offset);
        }
        for ((t, p), o) in first {
            tokio::task::block_in_place(|| {
                self.consumer
                    .seek(&t, p, Offset::Offset(o), Duration::from_secs(10))
            })
            .map_err(|e| kafka_err("cannot seek back to redeliver", e))?;
            self.seen.insert((t, p), o);
        }
        Ok(())
    }
}
