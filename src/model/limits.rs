//! Limits and defaults of docs/design.md, "Event lifecycle and rules", with the reference's names.

use std::time::Duration;

/// `event_type` column length (characters).
pub const EVENT_TYPE_MAX_LENGTH: usize = 100;
/// `trace_id` column length.
pub const TRACE_ID_MAX_LENGTH: usize = 64;
/// `idempotency_key` column length.
pub const IDEMPOTENCY_KEY_MAX_LENGTH: usize = 128;
/// `correlation_id` column length.
pub const CORRELATION_ID_MAX_LENGTH: usize = 64;
/// `causation_id` column length.
pub const CAUSATION_ID_MAX_LENGTH: usize = 64;
/// `schema_version` column length.
pub const SCHEMA_VERSION_MAX_LENGTH: usize = 50;
/// `aggregate_type` column length (outbox).
pub const AGGREGATE_TYPE_MAX_LENGTH: usize = 50;
/// `topic` column length (outbox).
pub const TOPIC_MAX_LENGTH: usize = 255;
/// `partition_key` column length (outbox).
pub const PARTITION_KEY_MAX_LENGTH: usize = 255;
/// `message_id` column length (inbox).
pub const MESSAGE_ID_MAX_LENGTH: usize = 255;
/// `consumer_group` column length (inbox).
pub const CONSUMER_GROUP_MAX_LENGTH: usize = 255;
/// `source` column length (inbox).
pub const SOURCE_MAX_LENGTH: usize = 255;
/// `locked_by` column length and the longest worker id.
pub const WORKER_ID_MAX_LENGTH: usize = 255;
/// `last_error` column length, in bytes (errors are truncated to fit).
pub const LAST_ERROR_MAX_LENGTH: usize = 2000;
/// Appended to an error message that was truncated.
pub const DEFAULT_TRUNCATION_SUFFIX: &str = "... [TRUNCATED]";
/// Longest reason accepted by a force unlock (characters).
pub const FORCE_UNLOCK_REASON_MAX_LENGTH: usize = 255;

/// Default `max_attempts` of a new event.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 6;
/// Largest payload, in bytes of its compact JSON form.
pub const DEFAULT_PAYLOAD_MAX_BYTES: usize = 1_000_000;
/// Most headers an event may carry.
pub const DEFAULT_HEADERS_MAX_COUNT: usize = 100;
/// Longest header key (characters).
pub const DEFAULT_HEADER_KEY_MAX_LENGTH: usize = 64;
/// Longest header value (characters).
pub const DEFAULT_HEADER_VALUE_MAX_LENGTH: usize = 512;
/// How far `scheduled_at` may lie before `created_at` (clock skew allowance).
pub const DEFAULT_SCHEDULE_AT_SKEW_SECONDS: i64 = 60;
/// How far `scheduled_at` may lie after `created_at`.
pub const DEFAULT_SCHEDULE_AT_MAX_FUTURE_SECONDS: i64 = 365 * 24 * 3600;
/// Default lease of a claim: after this long a lock counts as stale.
pub const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default base of the exponential backoff.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(10);
/// Default cap of the exponential backoff.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(3600);
/// Delay before a transient failure (broker not answering) is retried.
pub const DEFAULT_TRANSIENT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Default byte budget of one batch (a claim of the relay or of `inbox
/// process`, a batch of the inbox consumer): its events' payloads, as
/// compact JSON, add up to at most this many bytes (a batch holds at least
/// one event, however large).
pub const DEFAULT_BATCH_BYTES: u64 = 16 * 1024 * 1024;

/// The validation limits a [`DomainService`](crate::domain::DomainService) applies;
/// `Limits::default()` is docs/design.md, "Event lifecycle and rules".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Default `max_attempts` of new events.
    pub max_attempts: i32,
    /// Largest compact payload in bytes.
    pub payload_max_bytes: usize,
    /// Most headers per event.
    pub headers_max_count: usize,
    /// Longest header key in characters.
    pub header_key_max_length: usize,
    /// Longest header value in characters.
    pub header_value_max_length: usize,
    /// Allowed skew of `scheduled_at` before `created_at`, seconds.
    pub scheduled_at_skew_seconds: i64,
    /// Furthest `scheduled_at` after `created_at`, seconds.
    pub scheduled_at_max_future_seconds: i64,
    /// Longest stored error in bytes.
    pub last_error_max_bytes: usize,
    /// Suffix of a truncated error.
    pub truncation_suffix: String,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            payload_max_bytes: DEFAULT_PAYLOAD_MAX_BYTES,
            headers_max_count: DEFAULT_HEADERS_MAX_COUNT,
            header_key_max_length: DEFAULT_HEADER_KEY_MAX_LENGTH,
            header_value_max_length: DEFAULT_HEADER_VALUE_MAX_LENGTH,
            scheduled_at_skew_seconds: DEFAULT_SCHEDULE_AT_SKEW_SECONDS,
            scheduled_at_max_future_seconds: DEFAULT_SCHEDULE_AT_MAX_FUTURE_SECONDS,
            last_error_max_bytes: LAST_ERROR_MAX_LENGTH,
            truncation_suffix: DEFAULT_TRUNCATION_SUFFIX.to_string(),
        }
    }
}

/// The longest duration any setting or filter may have (100 years): every
/// time computed from one (`now()` minus an age, plus a lease) stays within
/// what both databases and the clock types hold.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);
