//! Kafka: a consumer group (rdkafka), manual offset commits after the inbox
//! transaction commits, seek back to redeliver, pause while the consumer
//! waits (a slow handler, a retry's backoff) so the group keeps the member,
//! and rebalances tracked so a revoked partition is neither handled nor
//! committed here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::error::{Error, Result};
use crate::inbox::RawMessage;

mod poll;
mod rebalance;

use rebalance::{InboxContext, Rebalances};

/// Reads from Kafka topics in a consumer group.
pub struct KafkaSource {
    consumer: StreamConsumer<InboxContext>,
    rebalances: Arc<Rebalances>,
    brokers: String,
    group: String,
    topics: Vec<String>,
    /// Next offset to read per partition, as far as this consumer has read.
    seen: HashMap<(String, i32), i64>,
    /// Partitions librdkafka said were read to their end (a partition EOF
    /// event), with no message taken from them since.
    ended: HashSet<(String, i32)>,
    /// Partitions that may have been read to their end: an EOF event named
    /// their partition number, which more than one assigned topic has
    /// (librdkafka's event names the topic, rust-rdkafka passes on only the
    /// number). The broker is asked about them.
    unsure: HashSet<(String, i32)>,
    /// Offsets committed asynchronously since the last synchronous commit,
    /// by partition: committed synchronously before a poll tells the end.
    unconfirmed: BTreeMap<(String, i32), i64>,
    /// The last poll answered that every partition was at its end, and no
    /// message came since: the next one waits for messages before it says
    /// so again (a consumer that keeps running does not spin).
    end_told: bool,
    /// The assigned partitions are paused ([`Source::idle`]).
    paused: bool,
    /// A message read but not handed over: it would have passed a poll's
    /// byte budget. The next poll starts with it; its partition's read
    /// position (`seen`) is its offset, so a seek (resume, rewind) that
    /// reads it again drops it here.
    held: Option<RawMessage>,
}

impl std::fmt::Debug for KafkaSource {
    /// Shows the brokers (credentials masked), the group and the topics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("brokers", &crate::redact::url(&self.brokers))
            .field("group", &self.group)
            .field("topics", &self.topics)
            .finish()
    }
}

/// A client that cannot be set up (a bad property, a bad topic): a
/// configuration error.
fn kafka_err(what: &str, e: KafkaError) -> Error {
    Error::Config(format!("{what}: {e}"))
}

/// A broker that does not answer or refuses: an outage, retried.
pub(super) fn broker_err(what: &str, e: KafkaError) -> Error {
    Error::Broker(format!("{what}: {e}"))
}

/// A commit refused because the group is rebalancing or this member was
/// evicted: the partitions' new owners read the messages again (and find
/// their rows), so it is not fatal.
pub(super) fn lost_membership(e: &KafkaError) -> bool {
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

/// A commit's result: `true` committed, `false` refused because this member
/// lost its partitions ([`lost_membership`]: said in a warning, not fatal).
pub(super) fn committed(result: rdkafka::error::KafkaResult<()>) -> Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if lost_membership(&e) => {
            tracing::warn!(
                error = %e,
                "offsets not committed: the group is rebalancing or this member was evicted; \
                 the messages are read again by their partition's owner and deduplicated"
            );
            Ok(false)
        }
        Err(e) => Err(broker_err("cannot commit offsets", e)),
    }
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
            .set("client.id", "omnibox-inbox")
            // Commits, heartbeats and small fetches go out at once instead of
            // waiting for the acknowledgement of the previous segment.
            .set("socket.nagle.disable", "true");
        for (k, v) in properties {
            config.set(k, v);
        }
        // How the source knows a partition without new messages is at its
        // end (`--once`) without asking the broker: not to be turned off.
        config.set("enable.partition.eof", "true");
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
            ended: HashSet::new(),
            unsure: HashSet::new(),
            unconfirmed: BTreeMap::new(),
            end_told: false,
            held: None,
        })
    }

    /// Copies a fetched message out of librdkafka's buffer (a header without a value
    /// becomes empty bytes); its topic, partition and offset identify it.
    fn to_raw(m: &rdkafka::message::BorrowedMessage<'_>) -> RawMessage {
        let headers = headers_of(m);
        RawMessage {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            headers,
            payload: m.payload().map(<[u8]>::to_vec),
            position_is_identity: true,
            cut: None,
            origin: None,
            defect: None,
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
            self.ended.remove(&key);
            self.unsure.remove(&key);
            self.unconfirmed.remove(&key);
        }
    }

    /// Records a message taken from a partition: it is read up to there,
    /// and perhaps not to its end any more.
    fn took(&mut self, m: &RawMessage) {
        let key = (m.topic.clone(), m.partition);
        self.ended.remove(&key);
        self.unsure.remove(&key);
        self.seen.insert(key, m.offset + 1);
        self.end_told = false;
    }

    /// A partition EOF event: librdkafka fetched the partition up to its
    /// end and handed over every message before it.
    fn reached_end(&mut self, partition: i32) {
        let candidates: Vec<(String, i32)> = match self.rebalances.assigned.lock() {
            Ok(a) => a.iter().filter(|(_, p)| *p == partition).cloned().collect(),
            Err(_) => return,
        };
        if let [only] = candidates.as_slice() {
            self.ended.insert(only.clone());
        } else {
            self.unsure.extend(candidates);
        }
    }

    /// The high watermark of the partition's last fetch response, as
    /// librdkafka keeps it: no request to the broker.
    fn cached_high(&self, topic: &str, partition: i32) -> Option<i64> {
        let topic = std::ffi::CString::new(topic).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client handle lives as long as `self.consumer`; the
        // call reads two numbers under librdkafka's partition lock into the
        // two locals; `topic` is a NUL-terminated string that outlives it.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
            .then_some(high)
    }

    /// True when every assigned partition has been read to its end, from
    /// what the consumer knows already: an EOF event, or a position at the
    /// high watermark of the partition's last fetch response. No request
    /// goes to the broker then (a ListOffsets request waits behind the
    /// fetch the broker holds open for new messages, up to
    /// fetch.wait.max.ms per partition). Only partitions left unsure by an
    /// EOF event shared by several topics are checked with the broker.
    fn at_end(&self) -> bool {
        let parts: Vec<(String, i32)> = match self.rebalances.assigned.lock() {
            Ok(a) => a.iter().cloned().collect(),
            Err(_) => return false,
        };
        if parts.is_empty() {
            return false;
        }
        // librdkafka's positions move past transaction markers too; read
        // once, when the offsets taken do not settle it.
        let mut positions: Option<HashMap<(String, i32), i64>> = None;
        let mut unsure = Vec::new();
        for key in parts {
            if self.ended.contains(&key) {
                continue;
            }
            let high = self.cached_high(&key.0, key.1);
            let at = |o: Option<i64>| matches!((o, high), (Some(o), Some(h)) if o >= h);
            if at(self.seen.get(&key).copied()) {
                continue;
            }
            let positions = positions.get_or_insert_with(|| self.positions());
            if at(positions.get(&key).copied()) {
                continue;
            }
            if self.unsure.contains(&key) {
                unsure.push(key);
                continue;
            }
            return false;
        }
        unsure.is_empty() || tokio::task::block_in_place(|| self.caught_up(&unsure))
    }

    /// librdkafka's position (the offset after the last message handed
    /// over) of each assigned partition that has one.
    fn positions(&self) -> HashMap<(String, i32), i64> {
        let Ok(tpl) = self.consumer.position() else {
            return HashMap::new();
        };
        tpl.elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                _ => None,
            })
            .collect()
    }

    /// The partitions librdkafka has assigned to this consumer; a broker error
    /// (retried as an outage) when it cannot say.
    fn assigned(&self) -> Result<TopicPartitionList> {
        self.consumer
            .assignment()
            .map_err(|e| broker_err("cannot read the partition assignment", e))
    }

    /// Commits synchronously the offsets committed asynchronously since
    /// the last time, of the partitions still assigned.
    fn confirm_commits(&mut self) -> Result<()> {
        if self.unconfirmed.is_empty() {
            return Ok(());
        }
        let assigned = self.assigned()?;
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &self.unconfirmed {
            if assigned.find_partition(t, *p).is_some() {
                tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                    .map_err(|e| broker_err("bad offset", e))?;
            }
        }
        drop(assigned);
        let result = if tpl.count() == 0 {
            Ok(())
        } else {
            tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync))
        };
        drop(tpl);
        committed(result)?;
        self.unconfirmed.clear();
        Ok(())
    }

    /// True when each of `parts` has been read to its end, asking the
    /// broker (its committed offsets and high watermarks).
    fn caught_up(&self, parts: &[(String, i32)]) -> bool {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in parts {
            tpl.add_partition(t, *p);
        }
        let committed: BTreeMap<(String, i32), i64> =
            match self.consumer.committed_offsets(tpl, Duration::from_secs(5)) {
                Ok(tpl) => tpl
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                        _ => None,
                    })
                    .collect(),
                Err(_) => return false,
            };
        let positions = self.positions();
        parts.iter().all(|key| {
            let Ok((low, high)) =
                self.consumer
                    .fetch_watermarks(&key.0, key.1, Duration::from_secs(5))
            else {
                return false;
            };
            let position = self
                .seen
                .get(key)
                .copied()
                .max(positions.get(key).copied())
                .or_else(|| committed.get(key).copied())
                .unwrap_or(low);
            position >= high
        })
    }
}

/// The headers of a fetched message, in order; a name that is not UTF-8
/// is read with its invalid bytes replaced (U+FFFD). rdkafka's own reader
/// panics on such a name, and a producer other than the Java client can
/// send one: read through it, one message would stop the consumer at the
/// same offset after every restart.
fn headers_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Vec<(String, Vec<u8>)> {
    use rdkafka::bindings as rd;
    use rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR as OK;
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m` is a live message for this whole function; librdkafka
    // returns a pointer to headers the message owns (not copied, not to be
    // freed), or an error when it has none.
    if unsafe { rd::rd_kafka_message_headers(m.ptr(), &mut hdrs) } != OK || hdrs.is_null() {
        return Vec::new();
    }
    // SAFETY: `hdrs` is the message's header list, valid while `m` is.
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    (0..count)
        .filter_map(|i| {
            let mut name: *const std::ffi::c_char = std::ptr::null();
            let mut value: *const std::ffi::c_void = std::ptr::null();
            let mut size = 0usize;
            // SAFETY: `i` is below the count; the out-pointers are locals.
            // librdkafka points `name` at a NUL-terminated copy and `value`
            // at `size` bytes (or NULL), both owned by the message.
            let err =
                unsafe { rd::rd_kafka_header_get_all(hdrs, i, &mut name, &mut value, &mut size) };
            if err != OK || name.is_null() {
                return None;
            }
            // SAFETY: as above; both are copied before `m` can go.
            let name = unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned();
            let value = if value.is_null() {
                Vec::new()
            } else {
                // SAFETY: as above.
                unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
            };
            Some((name, value))
        })
        .collect()
}
