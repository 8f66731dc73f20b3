use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::domain::DomainService;
use crate::model::NewOutboxEvent;

fn ev(key: &str) -> OutboxEvent {
    DomainService::default()
        .create_outbox_event(NewOutboxEvent::new(
            "a",
            Uuid::now_v7(),
            "t",
            "orders",
            key,
            json!({"a": 1}),
        ))
        .unwrap()
}

#[test]
fn a_key_stops_at_its_first_failure() {
    let events = vec![ev("a"), ev("b"), ev("a"), ev("a"), ev("b"), ev("c")];
    let d = vec![
        Delivery::Delivered,
        Delivery::Transient("down".into()),
        Delivery::Rejected("too large".into()),
        Delivery::NotSent,
        Delivery::NotSent,
        Delivery::Delivered,
    ];
    let o = outcomes(&events, &d, Duration::from_secs(1), &HashMap::new());
    assert_eq!(o[0], Outcome::Completed);
    assert!(
        matches!(&o[1], Outcome::Failed { retry: Retry::NotCountedAfter(_), error } if error.contains("down"))
    );
    assert!(
        matches!(&o[2], Outcome::Failed { retry: Retry::Counted(None), error } if error.contains("too large"))
    );
    assert_eq!(o[3], Outcome::Released);
    assert_eq!(o[4], Outcome::Released);
    assert_eq!(o[5], Outcome::Completed);
}

#[test]
fn a_failure_before_an_acknowledged_message_of_its_key_is_dead() {
    // k1 rejected, k2 and k3 acknowledged anyway (all were in flight),
    // k4 timed out: k1 cannot be retried without reordering the key.
    let events = vec![ev("k"), ev("k"), ev("k"), ev("k"), ev("o")];
    let d = vec![
        Delivery::Rejected("invalid record".into()),
        Delivery::Delivered,
        Delivery::Delivered,
        Delivery::Transient("purged".into()),
        Delivery::Rejected("too large".into()),
    ];
    let o = outcomes(&events, &d, Duration::from_secs(1), &HashMap::new());
    assert!(
        matches!(&o[0], Outcome::Dead { error } if error.contains("invalid record") && error.contains(&events[2].id().to_string())),
        "{:?}",
        o[0]
    );
    assert_eq!(o[1], Outcome::Completed);
    assert_eq!(o[2], Outcome::Completed);
    assert!(matches!(
        &o[3],
        Outcome::Failed {
            retry: Retry::NotCountedAfter(_),
            ..
        }
    ));
    assert!(matches!(
        &o[4],
        Outcome::Failed {
            retry: Retry::Counted(None),
            ..
        }
    ));
}

#[test]
fn an_unavailable_topic_backs_off_alone_then_spends_attempts() {
    let events = vec![ev("a"), ev("b")];
    let mut bad = events.clone();
    bad[1].route.topic = "missing".into();
    let d = vec![
        Delivery::Delivered,
        Delivery::Unavailable("topic \"missing\" does not exist".into()),
    ];
    let mut topics = HashMap::new();
    topics.insert(
        "missing".to_string(),
        TopicVerdict::Wait(Duration::from_secs(4)),
    );
    let o = outcomes(&bad, &d, Duration::from_secs(1), &topics);
    assert_eq!(o[0], Outcome::Completed);
    assert_eq!(
        o[1],
        Outcome::Unavailable {
            error: "topic \"missing\" does not exist".into(),
            retry_after: Duration::from_secs(4)
        }
    );
    topics.insert(
        "missing".to_string(),
        TopicVerdict::GiveUp("gone for 5m".into()),
    );
    let o = outcomes(&bad, &d, Duration::from_secs(1), &topics);
    assert!(
        matches!(&o[1], Outcome::Failed { retry: Retry::Counted(None), error } if error == "gone for 5m")
    );
}

#[test]
fn topic_backoff_doubles_and_resets_on_a_delivery() {
    let h = PublishHandler::with_options(
        Arc::new(sink::NullSink),
        PublishOptions {
            unavailable_limit: Duration::from_secs(3600),
            ..PublishOptions::default()
        },
    );
    let m = |t: &str| {
        let mut e = ev("k");
        e.route.topic = t.into();
        Message::from_event(&e)
    };
    let msgs = vec![m("x"), m("y")];
    let d = vec![Delivery::Unavailable("no".into()), Delivery::Delivered];
    let waits: Vec<TopicVerdict> = (0..9)
        .map(|_| h.track_topics(&msgs, &d)["x"].clone())
        .collect();
    let secs: Vec<u64> = waits
        .iter()
        .map(|v| match v {
            TopicVerdict::Wait(d) => d.as_secs(),
            TopicVerdict::GiveUp(_) => 0,
        })
        .collect();
    assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 64, 64, 64]);
    assert_eq!(h.unavailable_topics().len(), 1);
    h.track_topics(&msgs[..1], &[Delivery::Delivered]);
    assert!(h.unavailable_topics().is_empty());
}

#[test]
fn dead_letters_carry_the_error_and_origin() {
    let e = ev("k");
    let m = e.dead_letter("orders.dlq", "broker rejected the record: too large");
    assert_eq!(m.topic, "orders.dlq");
    assert_eq!(m.key, "k");
    assert_eq!(m.headers["dlq_original_topic"], "orders");
    assert_eq!(
        m.headers["dlq_error"],
        "broker rejected the record: too large"
    );
    assert_eq!(m.headers["dlq_attempts"], "1");
    assert_eq!(m.headers["event_id"], e.id().to_string());
}
