//! The consumer's settings and report.

use std::time::Duration;

use serde::Serialize;

use crate::domain::Backoff;
use crate::model::WorkerId;
/// When the broker offset is committed (docs/design.md, "The inbox").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AckStrategy {
    /// Before anything else: a crash can lose the message, never repeat it.
    AtMostOnce,
    /// After the row is stored ([`CommitOn::Persist`], also after a handler
    /// error), or after it is stored and handled ([`CommitOn::Success`]).
    AtLeastOnce(CommitOn),
    /// After the row is stored and handled: a handler that works in the
    /// database ([`Handler::in_transaction`](crate::inbox::Handler::in_transaction)) runs inside the transaction
    /// that stores the row and marks it completed; an external one runs
    /// after the row is stored (locked by this consumer) and before it is
    /// marked completed. A duplicate is committed at once. A handler failure
    /// is written to the row (attempts, error, retry time) and the message
    /// is delivered again once its retry time comes, so the attempt count
    /// and the backoff survive restarts and rebalances.
    ExactlyOnce,
}

/// The commit point of [`AckStrategy::AtLeastOnce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommitOn {
    /// Once stored.
    Persist,
    /// Once stored and handled (completed or skipped).
    Success,
}

/// Default of [`ConsumeOptions::transient_limit`].
pub const DEFAULT_TRANSIENT_LIMIT: Duration = Duration::from_secs(3600);
/// Default of [`ConsumeOptions::lease`].
pub const DEFAULT_CONSUMER_LEASE: Duration = Duration::from_secs(30);
/// A handler still running after this long makes the source idle (Kafka:
/// partitions paused, polls go on) until it ends.
pub(super) const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Settings of an [`InboxConsumer`](super::InboxConsumer).
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// The consumer group (part of the deduplication key).
    pub group: String,
    /// This consumer's id (locks rows while a handler runs them).
    pub worker: WorkerId,
    /// The ack strategy.
    pub ack: AckStrategy,
    /// Messages per database transaction.
    pub batch: usize,
    /// Bytes per database transaction ([`RawMessage::size`](crate::inbox::RawMessage::size): value, key and
    /// headers): a batch ends before the message that would pass it, and
    /// holds at least one message ([`Source::poll_within`](crate::inbox::Source::poll_within)). `None`:
    /// messages alone bound a batch.
    pub batch_bytes: Option<u64>,
    /// How long a poll waits for the first message.
    pub poll_wait: Duration,
    /// Bound on one handler run.
    pub handler_timeout: Duration,
    /// Counted failures of a message's handler before its row is `failed`
    /// (so it cannot block its partition): the `max_attempts` of new rows.
    pub max_redeliveries: u32,
    /// Exactly-once: the wait before a message whose handler failed (a
    /// counted failure) is delivered again, by its attempts so far.
    pub backoff: Backoff,
    /// Exactly-once: a message whose handler keeps failing transiently (no
    /// attempt spent: exit 75, HTTP 429/502/503/504, no connection) is
    /// parked as `failed` once this long has passed since its row was stored.
    pub transient_limit: Duration,
    /// Exactly-once with an external handler: how long the rows of a batch
    /// stay locked by this consumer; the lease is extended every third of it
    /// while the batch is handled, so it bounds only how long a consumer
    /// that died holds its rows.
    pub lease: Duration,
    /// A `once` run gives up (with an error) when the database has been
    /// unreachable this long; a running consumer waits for it however long.
    pub outage_limit: Duration,
    /// A database call [`run`](crate::inbox::InboxConsumer::run) has not had
    /// answered for this long ends the run with
    /// [`Error::Outage`](crate::Error::Outage): its connection is taken for
    /// lost without a reset, which no error would ever end. Set it well
    /// above the connections' `statement_timeout`. `None` (the default):
    /// wait however long.
    pub stall_limit: Option<Duration>,
}

impl ConsumeOptions {
    /// Defaults: exactly-once, batches of 500 messages and 16 MiB
    /// ([`DEFAULT_BATCH_BYTES`](crate::model::limits::DEFAULT_BATCH_BYTES)),
    /// 1 s polls, 30 s handler timeout, 6 deliveries.
    pub fn new(group: impl Into<String>, worker: WorkerId) -> Self {
        ConsumeOptions {
            group: group.into(),
            worker,
            ack: AckStrategy::ExactlyOnce,
            batch: 500,
            batch_bytes: Some(crate::model::limits::DEFAULT_BATCH_BYTES),
            poll_wait: Duration::from_secs(1),
            handler_timeout: Duration::from_secs(30),
            max_redeliveries: crate::model::limits::DEFAULT_MAX_ATTEMPTS as u32,
            backoff: Backoff::default(),
            transient_limit: DEFAULT_TRANSIENT_LIMIT,
            lease: DEFAULT_CONSUMER_LEASE,
            outage_limit: Duration::from_secs(60),
            stall_limit: None,
        }
    }
}

/// Totals of a consume run; the `--format json` shape of `inbox consume`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsumeReport {
    /// Messages read.
    pub consumed: u64,
    /// New rows stored.
    pub stored: u64,
    /// Messages already in the inbox for this group.
    pub duplicates: u64,
    /// Messages that could not be parsed (stored as failed rows).
    pub poison: u64,
    /// Handled and completed.
    pub processed: u64,
    /// Handled and skipped by the handler's choice.
    pub skipped: u64,
    /// Handler failures, whatever followed: `retrying` plus `dead`. Kept
    /// because the JSON summary's fields are never renamed; the summary's
    /// table shows the two apart.
    pub failed: u64,
    /// Handler failures that left their row pending, to be tried again
    /// (rows left for retry, or rolled back and redelivered).
    pub retrying: u64,
    /// Handler failures that made their row `failed` (its attempts spent,
    /// or failing transiently past `transient_limit`): what `status`
    /// counts as failed.
    pub dead: u64,
    /// Messages rewound to be delivered again (a handler failure waiting for
    /// its retry time, a row held by another consumer).
    pub redelivered: u64,
    /// Deliveries of a message whose row an earlier delivery stored and that
    /// was handled again (its retry time had come).
    pub retried: u64,
    /// Messages of partitions revoked by a rebalance while they were in
    /// hand: neither handled nor committed here.
    pub revoked: u64,
    /// Offset commits done.
    pub commits: u64,
    /// Seconds the run took.
    pub elapsed_seconds: f64,
    /// Messages read per second.
    pub messages_per_second: f64,
}
