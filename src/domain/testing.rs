//! What the crate's unit tests share: a valid outbox event to start from,
//! and the cases and seed of a randomized test.

use serde_json::Value;
use uuid::Uuid;

use super::DomainService;
use crate::model::{NewOutboxEvent, OutboxEvent};

/// A valid `order.created` event of order `aggregate_id` for topic `orders`,
/// with key `key` and `payload`.
pub(crate) fn order_created(aggregate_id: Uuid, key: &str, payload: Value) -> OutboxEvent {
    DomainService::default()
        .create_outbox_event(NewOutboxEvent::new(
            "order",
            aggregate_id,
            "order.created",
            "orders",
            key,
            payload,
        ))
        .unwrap()
}

/// A randomized test's number of cases (`OMNIBOX_FUZZ_CASES`, else
/// `default_cases`) and its generator, seeded by `OMNIBOX_FUZZ_SEED` or at
/// random; both are said on stderr under `name`, so a failure can be
/// replayed.
pub(crate) fn fuzz(name: &str, default_cases: usize) -> (usize, fastrand::Rng) {
    let cases: usize = std::env::var("OMNIBOX_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let seed: u64 = std::env::var("OMNIBOX_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{name}: seed {seed} (OMNIBOX_FUZZ_SEED), {cases} cases");
    (cases, fastrand::Rng::with_seed(seed))
}
