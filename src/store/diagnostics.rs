//! What `omnibox doctor` reads from a database beyond the store traits:
//! the claim's query plan, the planner's statistics, expired leases, the
//! tables' sizes and dead rows, the topics of pending rows. Each backend
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
}
