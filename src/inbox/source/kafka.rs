//! Kafka: a consumer group (rdkafka), manual offset commits after the inbox
//! transaction commits, seek back to redeliver, pause while the consumer
//! waits (a slow handler, a retry's backoff) so the group keeps the member,
//! and rebalances tracked so a revoked partition is neither handled nor
//! committed here.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{Polled, Source};
use crate::error::{Error, Result};
use crate::inbox::RawMessage;

/// Partitions revoked by rebalances, for the source to forget its read
/// positions there (the next owner, perhaps this consumer again, starts
/// from the committed offset).
#[derive(Default)]
struct Rebalances {
    revoked: Mutex<Vec<(String, i32)>>,
    /// The partitions this member holds, as the rebalances said.
    assigned: Mutex<std::collections::HashSet<(String, i32)>>,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// The consumer's context: records revocations.
struct InboxContext(Arc<Rebalances>);

impl ClientContext for InboxContext {}

impl ConsumerContext for InboxContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = partitions(tpl);
            tracing::info!(partitions = ?parts, "partitions revoked by a rebalance");
            if let Ok(mut a) = self.0.assigned.lock() {
                for p in &parts {
                    a.remove(p);
                }
            }
            if let Ok(mut r) = self.0.revoked.lock() {
                r.extend(parts);
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = partitions(tpl);
                tracing::info!(partitions = ?parts, "partitions assigned");
                if let Ok(mut a) = self.0.assigned.lock() {
                    a.extend(parts);
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Reads from Kafka topics in a consumer group.
pub struct KafkaSource {
    consumer: StreamConsumer<InboxContext>,
    rebalances: Arc<Rebalances>,
    brokers: String,
    group: String,
    topics: Vec<String>,
    /// Next offset to read per partition, as far as this consumer has read.
    seen: HashMap<(String, i32), i64>,
    /// The assigned partitions are paused ([`Source::idle`]).
    paused: bool,
    /// A message read but not handed over: it would have passed a poll's
    /// byte budget. The next poll starts with it; its partition's read
    /// position (`seen`) is its offset, so a seek (resume, rewind) that
    /// reads it again drops it here.
    held: Option<RawMessage>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("brokers", &crate::redact::url(&self.brokers))
            .field("group", &self.group)
            .field("topics", &self.topics)
            .finish()
    }
}

fn kafka_err(what: &str, e: KafkaError) -> Error {
    Error::Config(format!("{what}: {e}"))
}

fn broker_err(what: &str, e: KafkaError) -> Error {
    Error::Broker(format!("{what}: {e}"))
}

/// A commit refused because the group is rebalancing or this member was
/// evicted: the partitions' new owners read the messages again (and find
/// their rows), so it is not fatal.
fn lost_membership(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::AssignmentLost
                | RDKafkaErrorCode::StaleMemberEpoch
        )
    )
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
        let rebalances = Arc::new(Rebalances::default());
        let consumer: StreamConsumer<InboxContext> = config
            .create_with_context(InboxContext(rebalances.clone()))
            .map_err(|e| kafka_err("cannot create the Kafka consumer", e))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| kafka_err("cannot subscribe", e))?;
        Ok(KafkaSource {
            consumer,
            rebalances,
            paused: false,
            brokers: brokers.to_string(),
            group: group.to_string(),
            topics: topics.to_vec(),
            seen: HashMap::new(),
            held: None,
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

    /// Forgets the read positions of partitions revoked since the last call.
    fn forget_revoked(&mut self) {
        let revoked: Vec<(String, i32)> = match self.rebalances.revoked.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(_) => return,
        };
        for key in revoked {
            if self
                .held
                .as_ref()
                .is_some_and(|h| (&h.topic, h.partition) == (&key.0, key.1))
            {
                // Its new owner reads it.
                self.held = None;
            }
            self.seen.remove(&key);
        }
    }

    fn assigned(&self) -> Result<TopicPartitionList> {
        self.consumer
            .assignment()
            .map_err(|e| broker_err("cannot read the partition assignment", e))
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
            "{} (group {}, topics {})",
            crate::redact::url(&format!("kafka://{}", self.brokers)),
            self.group,
            self.topics.join(",")
        )
    }

    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled> {
        self.poll_within(max, usize::MAX, wait).await
    }

    async fn poll_within(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Polled> {
        self.resume().await?;
        self.forget_revoked();
        let mut out = Vec::new();
        let mut bytes = match self.held.take() {
            Some(m) => {
                let size = m.size();
                out.push(m);
                size
            }
            None => {
                let first = tokio::time::timeout(wait, self.consumer.recv()).await;
                match first {
                    Err(_) => {
                        let end = tokio::task::block_in_place(|| self.caught_up());
                        return Ok(Polled { messages: out, end });
                    }
                    Ok(Err(e)) => return Err(broker_err("cannot read from Kafka", e)),
                    Ok(Ok(m)) => {
                        let m = Self::to_raw(&m);
                        let size = m.size();
                        out.push(m);
                        size
                    }
                }
            }
        };
        while out.len() < max {
            match tokio::time::timeout(Duration::from_millis(2), self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    let m = Self::to_raw(&m);
                    let size = m.size();
                    if bytes.saturating_add(size) > max_bytes {
                        self.held = Some(m);
                        break;
                    }
                    bytes += size;
                    out.push(m);
                }
                // The messages read already are the consumer's now: hand
                // them over (dropping them would let a later commit skip
                // them); the error comes back with the next poll if lasting.
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "Kafka error after {} message(s) of a poll", out.len());
                    break;
                }
                Err(_) => break,
            }
        }
        // A rebalance served during this poll may have revoked partitions
        // some of these messages came from: `owns` tells.
        self.forget_revoked();
        for m in &out {
            self.seen
                .insert((m.topic.clone(), m.partition), m.offset + 1);
        }
        if let Some(h) = &self.held {
            // Not handed over: its partition is read from it on.
            self.seen.insert((h.topic.clone(), h.partition), h.offset);
        }
        Ok(Polled {
            messages: out,
            end: false,
        })
    }

    async fn commit(&mut self, through: &[RawMessage]) -> Result<()> {
        let assigned = self.assigned()?;
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        let mut revoked = 0usize;
        for m in through {
            if assigned.find_partition(&m.topic, m.partition).is_none() {
                revoked += 1;
                continue;
            }
            let e = next
                .entry((m.topic.as_str(), m.partition))
                .or_insert(m.offset + 1);
            *e = (*e).max(m.offset + 1);
        }
        drop(assigned);
        if revoked > 0 {
            tracing::info!(
                messages = revoked,
                "not committing messages of partitions revoked meanwhile (their new owner reads them again)"
            );
        }
        if next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &next {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                .map_err(|e| broker_err("bad offset", e))?;
        }
        let result = tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync));
        drop(tpl);
        match result {
            Ok(()) => Ok(()),
            Err(e) if lost_membership(&e) => {
                tracing::warn!(
                    error = %e,
                    "offsets not committed: the group is rebalancing or this member was evicted; \
                     the messages are read again by their partition's owner and deduplicated"
                );
                Ok(())
            }
            Err(e) => Err(broker_err("cannot commit offsets", e)),
        }
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
            .map_err(|e| broker_err("cannot seek back to redeliver", e))?;
            if self
                .held
                .as_ref()
                .is_some_and(|h| (&h.topic, h.partition) == (&t, p))
            {
                // Read again from the new position.
                self.held = None;
            }
            self.seen.insert((t, p), o);
        }
        Ok(())
    }

    async fn idle(&mut self, wait: Duration) -> Result<()> {
        if !self.paused {
            let assigned = self.assigned()?;
            self.consumer
                .pause(&assigned)
                .map_err(|e| broker_err("cannot pause the partitions", e))?;
            drop(assigned);
            self.paused = true;
        }
        // Polling serves the group's heartbeats and rebalances. A message
        // already fetched (or from a partition assigned meanwhile, which is
        // not paused) is put back: it is read again after `resume`.
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Ok(Ok(m)) => {
                let (key, offset) = ((m.topic().to_string(), m.partition()), m.offset());
                drop(m);
                self.forget_revoked();
                self.seen.entry(key.clone()).or_insert(offset);
                // A partition assigned during the pause is not paused yet.
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&key.0, key.1);
                self.consumer
                    .pause(&tpl)
                    .map_err(|e| broker_err("cannot pause a partition", e))?;
            }
            Ok(Err(e)) => return Err(broker_err("cannot read from Kafka", e)),
            Err(_) => {}
        }
        Ok(())
    }

    async fn resume(&mut self) -> Result<()> {
        if !self.paused {
            return Ok(());
        }
        self.forget_revoked();
        let assigned = self.assigned()?;
        self.consumer
            .resume(&assigned)
            .map_err(|e| broker_err("cannot resume the partitions", e))?;
        let parts: Vec<(String, i32)> = assigned
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        drop(assigned);
        self.paused = false;
        // Every partition goes back to its read position, the held
        // message's to its offset: it is read again.
        self.held = None;
        for (t, p) in parts {
            let Some(&o) = self.seen.get(&(t.clone(), p)) else {
                continue;
            };
            tokio::task::block_in_place(|| {
                self.consumer
                    .seek(&t, p, Offset::Offset(o), Duration::from_secs(10))
            })
            .map_err(|e| broker_err("cannot seek back after a pause", e))?;
        }
        Ok(())
    }

    fn owns(&self, message: &RawMessage) -> bool {
        self.rebalances
            .assigned
            .lock()
            .map(|a| a.contains(&(message.topic.clone(), message.partition)))
            .unwrap_or(false)
    }
}
