//! Claims held by row locks in their open transaction
//! ([`ClaimOptions::hold`](super::ClaimOptions::hold)), kept per store by
//! their token; the statements are the backend's (`postgres/held.rs`).

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::ClaimToken;
use crate::model::Timestamp;

/// A claim whose rows are held by row locks in its open transaction
/// ([`ClaimOptions::hold`](super::ClaimOptions::hold)).
pub(crate) struct Held<DB: sqlx::Database> {
    pub(crate) tx: sqlx::Transaction<'static, DB>,
    /// The rows claimed.
    pub(crate) ids: Vec<Uuid>,
    /// When a statement last ran on `tx` (the server ends it after a
    /// lease of idleness).
    pub(crate) touched: std::time::Instant,
    /// The claim's lease.
    pub(crate) lease: Duration,
}

/// One held claim: taken (`None`) once it is written or leased. Its lock
/// keeps the writes of one claim (the heartbeat's, the results') in turn.
pub(crate) type HeldCell<DB> = Arc<tokio::sync::Mutex<Option<Held<DB>>>>;

type HeldMap<DB> = std::collections::HashMap<(String, Timestamp), HeldCell<DB>>;

/// The held claims of one store, by their token's worker and `locked_at`.
pub(crate) struct HeldClaims<DB: sqlx::Database>(std::sync::Mutex<HeldMap<DB>>);

impl<DB: sqlx::Database> std::fmt::Debug for HeldClaims<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeldClaims({})", self.len())
    }
}

impl<DB: sqlx::Database> Default for HeldClaims<DB> {
    fn default() -> Self {
        HeldClaims(std::sync::Mutex::new(std::collections::HashMap::new()))
    }
}

fn key(token: &ClaimToken) -> (String, Timestamp) {
    (token.worker.as_str().to_string(), token.locked_at)
}

impl<DB: sqlx::Database> HeldClaims<DB> {
    fn map(&self) -> std::sync::MutexGuard<'_, HeldMap<DB>> {
        // A panic while the lock was held left the map whole (inserts and
        // removes only).
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `held` for the claim of `token`. Claims nothing touched for
    /// twice their lease are dropped first (rolled back: the server has
    /// ended their transaction by then, and a batch that was never written
    /// must not keep a connection of the pool).
    pub(crate) fn put(&self, token: &ClaimToken, held: Held<DB>) {
        let mut map = self.map();
        map.retain(|_, cell| match cell.try_lock() {
            Ok(h) => h
                .as_ref()
                .is_some_and(|h| h.touched.elapsed() < h.lease.saturating_mul(2)),
            Err(_) => true,
        });
        map.insert(key(token), Arc::new(tokio::sync::Mutex::new(Some(held))));
    }

    /// The held claim of `token`, if it is one.
    pub(crate) fn cell(&self, token: &ClaimToken) -> Option<HeldCell<DB>> {
        self.map().get(&key(token)).cloned()
    }

    /// Forgets the claim of `token` (written or leased).
    pub(crate) fn remove(&self, token: &ClaimToken) {
        self.map().remove(&key(token));
    }

    /// How many claims are held (each keeps a connection of the pool).
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// True when the claim of `token` is held.
    pub(crate) fn holds(&self, token: &ClaimToken) -> bool {
        self.map().contains_key(&key(token))
    }

    /// Rolls every held claim back (its rows are free again).
    pub(crate) fn clear(&self) {
        let all: Vec<HeldCell<DB>> = self.map().drain().map(|(_, h)| h).collect();
        drop(all);
    }
}
