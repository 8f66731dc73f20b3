//! The consumer context: rebalances tracked, so a revoked partition is
//! neither handled nor committed by this consumer.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};

use super::lost_membership;

/// Partitions revoked by rebalances, for the source to forget its read
/// positions there (the next owner, perhaps this consumer again, starts
/// from the committed offset).
#[derive(Default)]
pub(super) struct Rebalances {
    pub(super) revoked: Mutex<Vec<(String, i32)>>,
    /// The partitions this member holds, as the rebalances said.
    pub(super) assigned: Mutex<HashSet<(String, i32)>>,
}

/// The topic and partition of each element of `tpl`.
fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// The consumer's context: records revocations.
pub(super) struct InboxContext(pub(super) Arc<Rebalances>);

impl ClientContext for InboxContext {
    /// As the default (an error of the librdkafka log target, which the
    /// CLI shows from -vv on), except the end of a partition: with
    /// `enable.partition.eof` librdkafka reports it as an error event too,
    /// and it is no error here.
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::PartitionEOF) => {
                tracing::debug!(target: "librdkafka", "librdkafka: {error}: {reason}")
            }
            _ => tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}"),
        }
    }
}

impl ConsumerContext for InboxContext {
    /// On a revocation: resumes the revoked partitions (a pause would outlive it),
    /// drops them from the assigned set and queues them for the source to forget.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = partitions(tpl);
            tracing::info!(partitions = ?parts, "partitions revoked by a rebalance");
            // librdkafka keeps the source's pause (`idle`) of a partition
            // across its revocation: assigned here again after the source
            // resumed (with no partition assigned, mid-rebalance), it would
            // stay paused and never be read again. Resumed now, it comes
            // back as any newly assigned partition does, unpaused (`idle`
            // pauses those it meets).
            if let Err(e) = consumer.resume(tpl) {
                tracing::warn!(error = %e, "cannot resume the revoked partitions");
            }
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

    /// On an assignment, adds the partitions to the assigned set; a rebalance error is
    /// logged.
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

    /// The outcome of an asynchronous commit ([`KafkaSource::commit`]).
    /// A failed one is made again, synchronously, at the next end of the
    /// partitions (or the consumer's close waits for it); meanwhile the
    /// messages would be read again, and found stored, by a new member.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {}
            Err(e) if lost_membership(&e) => tracing::info!(
                error = %e,
                partitions = offsets.count(),
                "offsets not committed: the group is rebalancing or this member was evicted; \
                 the messages are read again by their partition's owner and deduplicated"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                partitions = offsets.count(),
                "an offset commit failed; the offsets are committed again (the messages are \
                 stored: read again, they are duplicates)"
            ),
        }
    }
}
