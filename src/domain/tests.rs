use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::model::{Headers, NewInboxEvent, NewOutboxEvent};

fn svc() -> DomainService {
    DomainService::default()
}

fn at(s: &str) -> Timestamp {
    time::parse("t", s).unwrap()
}

fn new_outbox() -> NewOutboxEvent {
    let mut n = NewOutboxEvent::new(
        " order ",
        Uuid::from_u128(7),
        " order.created ",
        " orders ",
        " key-1 ",
        json!({"total": 12.5, "items": [1, 2]}),
    );
    n.created_at = Some(at("2026-01-01T00:00:00Z"));
    n
}

fn worker(s: &str) -> WorkerId {
    WorkerId::new(s).unwrap()
}

/// Records a failure of `e` as worker w1, the holder of [`locked`]'s lock.
fn fail_as_w1(e: &OutboxEvent, error: &str, retry: Retry, now: Timestamp) -> Result<OutboxEvent> {
    svc().mark_failed(e, error, &worker("w1"), retry, now)
}

/// A new, unlocked outbox event allowed `max_attempts` counted failures.
fn allowing_attempts(max_attempts: i32) -> OutboxEvent {
    let mut n = new_outbox();
    n.max_attempts = Some(max_attempts);
    svc().create_outbox_event(n).unwrap()
}

fn locked() -> OutboxEvent {
    let e = svc().create_outbox_event(new_outbox()).unwrap();
    svc()
        .lock(&e, &worker("w1"), at("2026-01-01T00:00:10Z"))
        .unwrap()
}

#[test]
fn create_outbox_event_trims_and_defaults() {
    let e = svc().create_outbox_event(new_outbox()).unwrap();
    assert_eq!(e.aggregate_type(), "order");
    assert_eq!(e.event_type(), "order.created");
    assert_eq!(e.topic(), "orders");
    assert_eq!(e.partition_key(), "key-1");
    assert_eq!(e.status(), EventStatus::Pending);
    assert_eq!(e.attempts_made(), 0);
    assert_eq!(e.max_attempts(), 6);
    assert_eq!(e.scheduled_at(), e.created_at());
    assert_eq!(e.id().get_version_num(), 7, "ids default to UUIDv7");
    assert_eq!(e.seq(), None);
    assert!(!e.is_locked());
    assert!(e.can_retry());
    assert_eq!(e.attempts_left(), 6);
    e.validate_invariants().unwrap();
}

#[test]
fn create_outbox_event_rejects_each_bad_field() {
    type Mutation = Box<dyn Fn(&mut NewOutboxEvent)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|n| n.aggregate_type = " ".into()),
            "aggregate_type: must not be empty",
        ),
        (
            Box::new(|n| n.aggregate_type = "a".repeat(51)),
            "aggregate_type: is 51 characters long",
        ),
        (
            Box::new(|n| n.event_type = "".into()),
            "event_type: must not be empty",
        ),
        (
            Box::new(|n| n.event_type = "e".repeat(101)),
            "event_type: is 101 characters long",
        ),
        (
            Box::new(|n| n.topic = "t".repeat(256)),
            "topic: is 256 characters long",
        ),
        (
            Box::new(|n| n.partition_key = "".into()),
            "partition_key: must not be empty",
        ),
        (
            Box::new(|n| n.payload = json!([])),
            "payload: must be a JSON object, got an array",
        ),
        (
            Box::new(|n| n.payload = json!({})),
            "payload: must not be empty",
        ),
        (
            Box::new(|n| n.trace_id = Some("t".repeat(65))),
            "trace_id: is 65 characters long",
        ),
        (
            Box::new(|n| n.idempotency_key = Some("k".repeat(129))),
            "idempotency_key: is 129 characters long",
        ),
        (
            Box::new(|n| n.idempotency_key = Some("  ".into())),
            "idempotency_key: must not be empty",
        ),
        (
            Box::new(|n| n.correlation_id = Some("c".repeat(65))),
            "correlation_id: is 65",
        ),
        (
            Box::new(|n| n.causation_id = Some("c".repeat(65))),
            "causation_id: is 65",
        ),
        (
            Box::new(|n| n.schema_version = Some("1".repeat(51))),
            "schema_version: is 51",
        ),
        (
            Box::new(|n| n.max_attempts = Some(0)),
            "max_attempts: must be at least 1",
        ),
        (
            Box::new(|n| n.scheduled_at = Some(at("2025-12-31T23:58:00Z"))),
            "scheduled_at: 2025-12-31T23:58:00.000000Z is more than 60 s before created_at",
        ),
        (
            Box::new(|n| n.scheduled_at = Some(at("2027-06-01T00:00:00Z"))),
            "scheduled_at: 2027-06-01T00:00:00.000000Z is too far in the future",
        ),
        (
            Box::new(|n| {
                let mut h = Headers::new();
                h.insert("Trace".into(), "1".into());
                h.insert("trace".into(), "2".into());
                n.headers = Some(h);
            }),
            "headers: keys",
        ),
    ];
    for (mutate, expected) in cases {
        let mut n = new_outbox();
        mutate(&mut n);
        let err = svc().create_outbox_event(n).unwrap_err();
        assert!(
            matches!(err, Error::Validation { .. }),
            "expected a validation error for {expected}, got {err:?}"
        );
        assert!(
            err.to_string().starts_with(expected),
            "{err} does not start with {expected}"
        );
    }
}

#[test]
fn create_inbox_event_validates_routing() {
    let n = NewInboxEvent::new(" m-1 ", "g", " svc ", "t", json!({"a": 1}));
    let e = svc().create_inbox_event(n).unwrap();
    assert_eq!(
        (e.message_id(), e.consumer_group(), e.source()),
        ("m-1", "g", "svc")
    );
    // The consumer group is half of the deduplication key: taken exactly,
    // as the consumer takes it; a padded one is refused, not trimmed.
    let padded = NewInboxEvent::new("m-1", " g ", "svc", "t", json!({"a": 1}));
    let err = svc().create_inbox_event(padded).unwrap_err().to_string();
    assert!(err.starts_with("consumer_group: "), "{err}");
    assert!(err.contains("whitespace"), "{err}");
    assert_eq!(e.idempotency_key(), None);
    let bad = NewInboxEvent::new("m", "", "svc", "t", json!({"a": 1}));
    assert_eq!(
        svc().create_inbox_event(bad).unwrap_err().to_string(),
        "consumer_group: must not be empty or blank"
    );
    let bad = NewInboxEvent::new("m".repeat(256), "g", "svc", "t", json!({"a": 1}));
    assert!(svc().create_inbox_event(bad).is_err());
}

#[test]
fn custom_limits_apply() {
    let limits = Limits {
        max_attempts: 3,
        payload_max_bytes: 10,
        ..Limits::default()
    };
    let s = DomainService::new(limits, Backoff::default());
    let mut n = new_outbox();
    n.payload = json!({"a": 1});
    assert_eq!(s.create_outbox_event(n).unwrap().max_attempts(), 3);
    assert!(
        s.create_outbox_event(new_outbox()).is_err(),
        "payload over 10 bytes"
    );
}

#[test]
fn lock_sets_owner_and_rejects_double_lock_and_non_pending() {
    let e = locked();
    assert_eq!(e.locked_by(), Some("w1"));
    assert_eq!(e.locked_at(), Some(at("2026-01-01T00:00:10Z")));
    e.validate_invariants().unwrap();
    let err = svc()
        .lock(&e, &worker("w2"), at("2026-01-01T00:00:11Z"))
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyLocked { ref locked_by, .. } if locked_by == "w1"));

    let done = svc()
        .mark_completed(&e, at("2026-01-01T00:00:12Z"), &worker("w1"))
        .unwrap();
    let err = svc()
        .lock(&done, &worker("w1"), at("2026-01-01T00:00:13Z"))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidState { .. }), "{err:?}");
}

#[test]
fn refresh_and_unlock_need_the_owner() {
    let e = locked();
    let r = svc()
        .refresh_lock(&e, &worker("w1"), at("2026-01-01T00:01:00Z"))
        .unwrap();
    assert_eq!(r.locked_at(), e.locked_at(), "the fencing token stays");
    assert_eq!(r.locked_until(), Some(at("2026-01-01T00:06:00Z")));
    let err = svc()
        .refresh_lock(&e, &worker("w2"), at("2026-01-01T00:01:00Z"))
        .unwrap_err();
    assert!(matches!(err, Error::LockedByAnotherWorker { .. }));
    assert!(
        err.to_string()
            .ends_with("is locked by w1, but the operation was attempted by w2"),
        "{err}"
    );

    let u = svc().unlock(&e, &worker("w1")).unwrap();
    assert!(!u.is_locked());
    assert_eq!(u.last_error(), None);
    assert!(matches!(
        svc().unlock(&u, &worker("w1")).unwrap_err(),
        Error::NotLocked { .. }
    ));
    assert!(matches!(
        svc().unlock(&e, &worker("w2")).unwrap_err(),
        Error::LockedByAnotherWorker { .. }
    ));
}

#[test]
fn force_unlock_records_the_reason_and_needs_a_lock() {
    let e = locked();
    let reason = UnlockReason::new("worker w1 died").unwrap();
    let u = svc().force_unlock(&e, &reason).unwrap();
    assert!(!u.is_locked());
    assert_eq!(u.last_error(), Some("Force unlock: worker w1 died"));
    assert!(matches!(
        svc().force_unlock(&u, &reason).unwrap_err(),
        Error::NotLocked { .. }
    ));
    // A row's own error is kept: the operator must still see it.
    let mut e = locked();
    e.last_error = Some("broker rejected the record".into());
    let u = svc().force_unlock(&e, &reason).unwrap();
    assert!(!u.is_locked());
    assert_eq!(u.last_error(), Some("broker rejected the record"));
}

#[test]
fn is_lock_stale_compares_with_the_timeout() {
    let e = locked();
    let s = svc();
    assert!(!s.is_lock_stale(&e, at("2026-01-01T00:05:10Z"), Duration::from_secs(300)));
    assert!(s.is_lock_stale(&e, at("2026-01-01T00:05:11Z"), Duration::from_secs(300)));
    let unlocked = s.create_outbox_event(new_outbox()).unwrap();
    assert!(!s.is_lock_stale(
        &unlocked,
        at("2030-01-01T00:00:00Z"),
        Duration::from_secs(1)
    ));
}

#[test]
fn mark_completed_clears_the_lock() {
    let e = locked();
    let c = svc()
        .mark_completed(&e, at("2026-01-01T00:00:20Z"), &worker("w1"))
        .unwrap();
    assert_eq!(c.status(), EventStatus::Completed);
    assert_eq!(c.completed_at(), Some(at("2026-01-01T00:00:20Z")));
    assert!(!c.is_locked());
    assert_eq!(c.attempts_left(), 0);
    c.validate_invariants().unwrap();
    assert!(matches!(
        svc()
            .mark_completed(&e, at("2026-01-01T00:00:20Z"), &worker("w2"))
            .unwrap_err(),
        Error::LockedByAnotherWorker { .. }
    ));
    let err = svc()
        .mark_completed(&e, at("2025-12-31T00:00:00Z"), &worker("w1"))
        .unwrap_err();
    assert!(err.to_string().contains("is before created_at"), "{err}");
    let unlocked = svc().create_outbox_event(new_outbox()).unwrap();
    assert!(matches!(
        svc()
            .mark_completed(&unlocked, at("2026-01-01T00:00:20Z"), &worker("w1"))
            .unwrap_err(),
        Error::NotLocked { .. }
    ));
}

#[test]
fn counted_failure_spends_an_attempt_and_backs_off() {
    let e = locked();
    let now = at("2026-01-01T00:00:20Z");
    let f = fail_as_w1(&e, "  broker said no  ", Retry::Counted(None), now).unwrap();
    assert_eq!(f.status(), EventStatus::Pending);
    assert_eq!(f.attempts_made(), 1);
    assert_eq!(f.last_error(), Some("broker said no"));
    assert!(!f.is_locked());
    // First retry: base 10 s with equal jitter, so between 5 and 10 s later.
    let delay = (f.scheduled_at() - now).num_milliseconds();
    assert!((5_000..=10_000).contains(&delay), "{delay}");
    f.validate_invariants().unwrap();
}

#[test]
fn counted_failure_at_max_attempts_becomes_failed() {
    let s = svc();
    let w = worker("w1");
    let mut e = allowing_attempts(2);
    let mut now = at("2026-01-01T00:00:10Z");
    for round in 1..=2 {
        e = s.lock(&e, &w, now).unwrap();
        let retry_at = now + chrono::Duration::seconds(30);
        e = s
            .mark_failed(&e, "boom", &w, Retry::Counted(Some(retry_at)), now)
            .unwrap();
        assert_eq!(e.attempts_made(), round);
        now = retry_at;
    }
    assert_eq!(e.status(), EventStatus::Failed);
    assert_eq!(e.failure_count(), 2);
    assert!(!e.can_retry());
    e.validate_invariants().unwrap();
    assert!(matches!(
        s.lock(&e, &w, now).unwrap_err(),
        Error::InvalidState { .. }
    ));
}

#[test]
fn not_counted_failure_only_reschedules() {
    let e = locked();
    let now = at("2026-01-01T00:00:20Z");
    let retry = now + chrono::Duration::seconds(1);
    let f = fail_as_w1(&e, "broker down", Retry::NotCounted(retry), now).unwrap();
    assert_eq!(f.attempts_made(), 0);
    assert_eq!(f.status(), EventStatus::Pending);
    assert_eq!(f.scheduled_at(), retry);
    assert_eq!(f.last_error(), Some("broker down"));
}

#[test]
fn mark_failed_rejections() {
    let e = locked();
    let now = at("2026-01-01T00:00:20Z");
    let s = svc();
    assert!(fail_as_w1(&e, "  ", Retry::Counted(None), now).is_err());
    assert!(matches!(
        s.mark_failed(&e, "x", &worker("w2"), Retry::Counted(None), now)
            .unwrap_err(),
        Error::LockedByAnotherWorker { .. }
    ));
    // Each case: a retry time out of bounds, and what its error must say.
    type Check = fn(&str) -> bool;
    let cases: [(&str, Check); 2] = [
        ("2025-01-01T00:00:00Z", |m| m.starts_with("next_retry_at:")),
        ("2028-01-01T00:00:00Z", |m| {
            m.contains("too far in the future")
        }),
    ];
    for (retry_at, expected) in cases {
        let err = fail_as_w1(&e, "x", Retry::NotCounted(at(retry_at)), now).unwrap_err();
        assert!(expected(&err.to_string()), "{err}");
    }
}

#[test]
fn long_errors_are_truncated_on_a_char_boundary() {
    let e = locked();
    let msg = "ü".repeat(3000);
    let f = fail_as_w1(&e, &msg, Retry::Counted(None), at("2026-01-01T00:00:20Z")).unwrap();
    let stored = f.last_error().unwrap();
    assert!(stored.len() <= 2000);
    assert!(stored.ends_with("... [TRUNCATED]"));
}

#[test]
fn requeue_resets_a_failed_event() {
    let s = svc();
    let w = worker("w1");
    let e = allowing_attempts(1);
    let e = s.lock(&e, &w, at("2026-01-01T00:00:10Z")).unwrap();
    let e = fail_as_w1(&e, "boom", Retry::Counted(None), at("2026-01-01T00:00:11Z")).unwrap();
    assert_eq!(e.status(), EventStatus::Failed);
    let r = s.requeue(&e, at("2026-01-02T00:00:00Z")).unwrap();
    assert_eq!(r.status(), EventStatus::Pending);
    assert_eq!(r.attempts_made(), 0);
    assert_eq!(r.last_error(), None);
    assert_eq!(r.scheduled_at(), at("2026-01-02T00:00:00Z"));
    assert!(matches!(
        s.requeue(&r, at("2026-01-02T00:00:00Z")).unwrap_err(),
        Error::InvalidState { .. }
    ));
}

#[test]
fn backoff_doubles_caps_and_jitters_equally() {
    let b = Backoff::default();
    assert_eq!(b.ceiling(0), Duration::from_secs(10));
    assert_eq!(b.ceiling(1), Duration::from_secs(20));
    assert_eq!(b.ceiling(5), Duration::from_secs(320));
    assert_eq!(b.ceiling(9), Duration::from_secs(3600), "capped");
    assert_eq!(b.ceiling(1000), Duration::from_secs(3600), "no overflow");
    assert_eq!(b.delay_with(0, 0.0), Duration::from_secs(5));
    assert_eq!(b.delay_with(0, 1.0), Duration::from_secs(10));
    assert_eq!(b.delay_with(2, 0.5), Duration::from_secs(30));
    for _ in 0..100 {
        let d = b.delay(3);
        assert!(
            d >= Duration::from_secs(40) && d <= Duration::from_secs(80),
            "{d:?}"
        );
    }
}

#[test]
fn invariants_catch_inconsistent_rows() {
    // Each case: a locked row changed one way, and the error it must give.
    type Change = fn(&mut OutboxEvent);
    let cases: [(Change, &str); 5] = [
        (
            |e| e.status = EventStatus::Completed,
            "completed_at must be set",
        ),
        (|e| e.locked_by = None, "all set or all empty"),
        (|e| e.locked_until = None, "all set or all empty"),
        (|e| e.attempts_made = 7, "cannot exceed"),
        (
            |e| {
                e.status = EventStatus::Failed;
                e.attempts_made = 6;
            },
            "locked event must be pending",
        ),
    ];
    for (change, expected) in cases {
        let mut e = locked();
        change(&mut e);
        let error = e.validate_invariants().unwrap_err().to_string();
        assert!(error.contains(expected), "{error} (expected: {expected})");
    }
}
