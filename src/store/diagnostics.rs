//! What `omnibox doctor` reads from a database beyond the store traits:
//! the claim's query plan, the planner's statistics, expired leases, the
//! tables' sizes and dead rows, the topics of pending rows, the server's
//! replication slots. Each backend
//! answers in its `driver.rs`; [`AnyStore`](super::AnyStore)'s methods
//! (`store/operations.rs`) ask it.

/// The outbox claim's scan plan as the backend explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPlan {
    /// The plan's text.
    pub text: String,
    /// The main scan reads the claim index (`outbox_events_claim`) in
    /// order, without reading the table whole or sorting it.
    pub uses_claim_index: bool,
    /// The outbox's size in pages when the plan does not use the index and
    /// the table is small enough to be read whole as fast as through it
    /// (PostgreSQL; SQLite's plan does not depend on the table's size).
    pub small_table_pages: Option<i64>,
}

/// Below this many pages a table is read whole as fast as through an index.
pub const SMALL_TABLE_PAGES: i64 = 128;

/// The planner's statistics of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistics {
    /// The backend's claim plan does not use statistics (SQLite).
    NotUsed,
    /// None collected yet.
    NotCollected,
    /// Collected.
    Collected {
        /// Live rows, estimated.
        live: i64,
        /// Rows changed since the last ANALYZE.
        changed: i64,
        /// Never analyzed.
        never: bool,
    },
}

/// A table's size, rows and autovacuum settings (PostgreSQL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableHealth {
    /// Bytes of data.
    pub table_bytes: i64,
    /// Bytes of its indexes.
    pub index_bytes: i64,
    /// Live rows (the statistics' estimate).
    pub live: i64,
    /// Dead rows not vacuumed yet.
    pub dead: i64,
    /// Its storage options, comma-separated (`autovacuum_...=...`).
    pub options: String,
    /// Its partitions, when it is partitioned (sizes and rows are their
    /// sums; options are the parent's).
    pub partitions: Option<i64>,
}

/// A replication slot of the server (PostgreSQL): anything that reads the
/// write-ahead log through it (a logical decoding consumer such as a CDC
/// tool, or a standby) keeps the WAL since the slot's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationSlot {
    /// The slot's name.
    pub name: String,
    /// `logical` or `physical`.
    pub kind: String,
    /// Its database (logical slots).
    pub database: Option<String>,
    /// A connection is reading it now.
    pub active: bool,
    /// Bytes of WAL between the server's current position and the slot's
    /// `restart_lsn`: what the slot keeps on disk.
    pub behind_bytes: Option<i64>,
    /// The server's judgement of the WAL it keeps: `reserved`,
    /// `extended`, `unreserved` (about to be removed) or `lost` (removed: its
    /// reader cannot go on).
    pub wal_status: Option<String>,
    /// How long ago the reader's last position was replayed (an active
    /// slot's `replay_lag`), when the server tells.
    pub lag: Option<std::time::Duration>,
}
