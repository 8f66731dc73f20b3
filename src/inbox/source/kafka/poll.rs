//! [`Source`] for [`KafkaSource`]: polling batches, committing offsets,
//! seeking back, pausing, and the end of each partition under `--once`.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaSource, broker_err, committed};
use crate::error::Result;
use crate::inbox::RawMessage;
use crate::inbox::source::{Polled, Source};

impl Source for KafkaSource {
    /// The group's committed offsets: what was not committed is delivered
    /// again to the next run.
    fn replays(&self) -> bool {
        true
    }

    /// `kafka://BROKERS (group G, topics T1,T2)`, the brokers' credentials masked.
    fn describe(&self) -> String {
        format!(
            "{} (group {}, topics {})",
            crate::redact::url(&format!("kafka://{}", self.brokers)),
            self.group,
            self.topics.join(",")
        )
    }

    /// As `poll_within` with no byte budget.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled> {
        self.poll_within(max, usize::MAX, wait).await
    }

    /// Resumes paused partitions, then takes the held message and waits up to `wait`
    /// for a first one, taking what librdkafka has fetched after it within `max` and
    /// `budget`. `end` is set when nothing came and every partition is at its end
    /// (once per stretch there), after the asynchronous commits are confirmed.
    async fn poll_within(&mut self, max: usize, budget: usize, wait: Duration) -> Result<Polled> {
        self.resume().await?;
        self.forget_revoked();
        let deadline = crate::model::time::tokio_instant_after(wait);
        let mut out = Vec::new();
        let mut end = false;
        let mut bytes = 0usize;
        if let Some(m) = self.held.take() {
            bytes = m.size();
            self.took(&m);
            out.push(m);
        }
        while out.len() < max {
            let step = if out.is_empty() {
                // Nothing in hand: at the end of every partition, say so at
                // once (once per stretch at the end; the next poll waits).
                if !self.end_told && self.at_end() {
                    self.confirm_commits()?;
                    self.end_told = true;
                    end = true;
                    break;
                }
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                // librdkafka fetches ahead: what it has is here at once.
                Duration::from_millis(2)
            };
            match tokio::time::timeout(step, self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    let raw = Self::to_raw(&m);
                    drop(m);
                    let size = raw.size();
                    if !out.is_empty() && bytes.saturating_add(size) > budget {
                        // Not handed over: its partition is read up to it,
                        // and not at its end.
                        let key = (raw.topic.clone(), raw.partition);
                        self.ended.remove(&key);
                        self.unsure.remove(&key);
                        self.seen.insert(key, raw.offset);
                        self.end_told = false;
                        self.held = Some(raw);
                        break;
                    }
                    bytes = bytes.saturating_add(size);
                    self.took(&raw);
                    out.push(raw);
                }
                Ok(Err(KafkaError::PartitionEOF(partition))) => self.reached_end(partition),
                Ok(Err(e)) if out.is_empty() => {
                    return Err(broker_err("cannot read from Kafka", e));
                }
                // The messages read already are the consumer's now: hand
                // them over (dropping them would let a later commit skip
                // them); the error comes back with the next poll if lasting.
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "Kafka error after {} message(s) of a poll", out.len());
                    break;
                }
                Err(_) => {
                    end = out.is_empty() && self.at_end();
                    if end {
                        self.confirm_commits()?;
                    }
                    break;
                }
            }
        }
        // A rebalance served during this poll may have revoked partitions
        // some of these messages came from: `owns` tells.
        self.forget_revoked();
        Ok(Polled { messages: out, end })
    }

    /// Commits asynchronously: the consumer goes on with the next batch
    /// while the broker writes the offsets (a synchronous commit waits a
    /// round trip, which on a busy broker is long: tansu answered commits
    /// made while it served a fetch in 150-230 ms). The rows are stored
    /// already, so a lost
    /// commit costs duplicates, never a message; the offsets are committed
    /// again synchronously before a poll tells that every partition is at
    /// its end, and a closing consumer waits for the commits in flight.
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
        let result = self.consumer.commit(&tpl, CommitMode::Async);
        drop(tpl);
        if committed(result)? {
            for ((t, p), o) in next {
                self.unconfirmed.insert((t.to_string(), p), o);
            }
        }
        Ok(())
    }

    /// Seeks each partition of `from` back to its first offset there, so those messages
    /// (and any after them) are read again; a held message of such a partition is dropped.
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
            self.ended.remove(&(t.clone(), p));
            self.unsure.remove(&(t.clone(), p));
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

    /// Pauses the assigned partitions and polls for up to `wait` to serve heartbeats and
    /// rebalances; a message that still arrives is put back (read again after `resume`).
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
                self.ended.remove(&key);
                self.unsure.remove(&key);
                // A partition assigned during the pause is not paused yet.
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&key.0, key.1);
                self.consumer
                    .pause(&tpl)
                    .map_err(|e| broker_err("cannot pause a partition", e))?;
            }
            // (Every message before it was put back, and `resume` seeks
            // there: the partition's end is told again after that.)
            Ok(Err(KafkaError::PartitionEOF(_))) => {}
            Ok(Err(e)) => return Err(broker_err("cannot read from Kafka", e)),
            Err(_) => {}
        }
        Ok(())
    }

    /// Resumes the partitions paused by `idle` and seeks each back to its read position,
    /// so nothing fetched meanwhile is skipped; nothing to do when not paused.
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
        for key in parts {
            // The seek restarts the partition's fetching: its end (if it is
            // there) is told again.
            self.ended.remove(&key);
            self.unsure.remove(&key);
            let Some(&o) = self.seen.get(&key) else {
                continue;
            };
            tokio::task::block_in_place(|| {
                self.consumer
                    .seek(&key.0, key.1, Offset::Offset(o), Duration::from_secs(10))
            })
            .map_err(|e| broker_err("cannot seek back after a pause", e))?;
        }
        Ok(())
    }

    /// Whether the message's partition is still assigned to this member, as the
    /// rebalance callbacks recorded (false if their lock is poisoned).
    fn owns(&self, message: &RawMessage) -> bool {
        self.rebalances
            .assigned
            .lock()
            .map(|a| a.contains(&(message.topic.clone(), message.partition)))
            .unwrap_or(false)
    }
}
