use std::sync::Mutex;

use serde_json::json;

use super::*;

fn cx() -> HandlerContext<'static> {
    HandlerContext::detached(crate::inbox::Dependencies::new())
}
use crate::domain::DomainService;
use crate::model::NewInboxEvent;

fn event(source: &str, t: &str, v: Option<&str>, payload: Value) -> InboxEvent {
    let mut n = NewInboxEvent::new("m", "g", source, t, payload);
    n.schema_version = v.map(str::to_string);
    DomainService::default().create_inbox_event(n).unwrap()
}

/// Dispatches `e` detached from any transaction.
async fn send(router: &EventRouter, e: InboxEvent) -> Outcome {
    router.dispatch(&e, &mut cx()).await
}

/// A shop `order.created` event of version `v`.
fn order(v: Option<&str>, payload: Value) -> InboxEvent {
    event("shop", "order.created", v, payload)
}

/// What the recording handlers got: `name:version:payload` a line.
type Log = Arc<Mutex<Vec<String>>>;

/// A router whose `order.created` handlers, one per (source, version,
/// name), record what they get in its log.
fn recording(routes: &[(&str, Option<&str>, &'static str)]) -> (Log, EventRouter) {
    let log = Log::default();
    let mut router = EventRouter::new();
    for &(source, version, name) in routes {
        router
            .on(source, "order.created", version, recorder(&log, name))
            .unwrap();
    }
    (log, router)
}

fn recorder(
    log: &Log,
    name: &'static str,
) -> impl Fn(InboxEvent) -> std::future::Ready<Outcome> + use<> {
    let log = log.clone();
    move |e: InboxEvent| {
        log.lock().unwrap().push(format!(
            "{name}:{}:{}",
            e.schema_version().unwrap_or("-"),
            Value::Object(e.payload().clone())
        ));
        std::future::ready(Outcome::Completed)
    }
}

#[test]
fn prefixes() {
    assert!(version_covers("1", "1.2.3"));
    assert!(version_covers("1.2", "1.2.3"));
    assert!(version_covers("1.2.3", "1.2.3"));
    assert!(!version_covers("1.2", "1.20.0"));
    assert!(!version_covers("1.2.3.4", "1.2.3"));
    let mut r = SchemaRegistry::default();
    r.register("t", "1").register("t", "1.2").register("t", "2");
    assert_eq!(r.resolve("t", "1.2.9"), Some("1.2"));
    assert_eq!(r.resolve("t", "1.3.0"), Some("1"));
    assert_eq!(r.resolve("t", "3.0.0"), None);
}

#[test]
fn payload_types_by_version() {
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct V1 {
        total: f64,
    }
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct V2 {
        amount_cents: i64,
    }
    let mut r = SchemaRegistry::default();
    r.register_type::<V1>("order.created", "1")
        .register_type::<V2>("order.created", "2");
    let v1 = event(
        "shop",
        "order.created",
        Some("1.4.0"),
        json!({"total": 2.5}),
    );
    let v2 = event(
        "shop",
        "order.created",
        Some("2.0"),
        json!({"amount_cents": 250}),
    );
    assert_eq!(
        r.payload_as_registered::<V1>(&v1).unwrap(),
        V1 { total: 2.5 }
    );
    assert_eq!(
        *r.payload_of(&v2).unwrap().downcast::<V2>().unwrap(),
        V2 { amount_cents: 250 }
    );
    let e = r.payload_as_registered::<V1>(&v2).unwrap_err().to_string();
    assert!(e.contains("registered as") && e.contains("V2"), "{e}");
    let bad = event("shop", "order.created", Some("2.1"), json!({"amount": 1}));
    let e = r.payload_of(&bad).unwrap_err().to_string();
    assert!(
        e.contains("does not match") && e.contains("amount_cents"),
        "{e}"
    );
    let none = event("shop", "order.created", Some("3.0"), json!({"a": 1}));
    assert!(
        r.payload_of(&none)
            .unwrap_err()
            .to_string()
            .contains("no payload type")
    );
    let unversioned = event("shop", "order.created", None, json!({"a": 1}));
    assert!(r.payload_of(&unversioned).is_err());
}

#[tokio::test]
async fn registration_rules_and_lookups() {
    let mut router = EventRouter::with_topic_normalizer(|t| t.trim_start_matches("prod.").into());
    router
        .on("prod.shop", "order.created", Some("1"), |_| async {
            Outcome::Completed
        })
        .unwrap();
    // The same (normalized) source, type and version: an error.
    let e = router
        .on("shop", "order.created", Some("1"), |_| async {
            Outcome::Completed
        })
        .err()
        .expect("a second handler for the same key is refused");
    assert!(matches!(e, Error::HandlerAlreadyRegistered { .. }), "{e}");
    assert!(e.to_string().contains("\"order.created\""), "{e}");
    assert!(e.is_input_error());
    // Another version, or any version, is a different key.
    router
        .on("shop", "order.created", Some("2"), |_| async {
            Outcome::Skipped
        })
        .unwrap()
        .on("shop", "order.created", None, |_| async {
            Outcome::Completed
        })
        .unwrap();
    assert!(
        router
            .on("shop", "order.created", None, |_| async {
                Outcome::Completed
            })
            .is_err()
    );
    // A struct handler and a closure with the context.
    struct Refunds;
    impl Handler for Refunds {
        async fn handle(&self, _: &InboxEvent, cx: &mut HandlerContext<'_>) -> Outcome {
            assert!(!cx.has_transaction());
            Outcome::Skipped
        }
    }
    router
        .on("billing", "refund.issued", None, Refunds)
        .unwrap();
    router
        .on(
            "*",
            "ping",
            None,
            crate::inbox::tx_handler(|_, cx| {
                Box::pin(async move {
                    assert!(cx.tx().await.is_err(), "no transaction here");
                    Outcome::Completed
                })
            }),
        )
        .unwrap();
    assert_eq!(router.topics(), vec!["*", "billing", "shop"]);
    assert_eq!(
        router.event_types_for_topic("prod.shop"),
        vec!["order.created", "ping"]
    );
    let prod = event("prod.shop", "order.created", Some("2.1"), json!({"a": 1}));
    let out = send(&router, prod).await;
    assert_eq!(
        out,
        Outcome::Skipped,
        "dispatch normalizes the event's source too"
    );
    let refund = event("billing", "refund.issued", None, json!({"a": 1}));
    assert_eq!(send(&router, refund).await, Outcome::Skipped);
    assert_eq!(
        send(&router, event("anything", "ping", None, json!({"a": 1}))).await,
        Outcome::Completed
    );
}

#[tokio::test]
async fn exact_then_longest_prefix_then_versionless() {
    let (log, router) = recording(&[
        ("shop", Some("1"), "v1"),
        ("shop", Some("1.2"), "v1.2"),
        ("*", None, "any"),
    ]);
    for v in [Some("1.2.5"), Some("1.0.0"), Some("9.0.0"), None] {
        assert_eq!(
            send(&router, order(v, json!({"a": 1}))).await,
            Outcome::Completed
        );
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            r#"v1.2:1.2.5:{"a":1}"#,
            r#"v1:1.0.0:{"a":1}"#,
            r#"any:9.0.0:{"a":1}"#,
            r#"any:-:{"a":1}"#
        ]
    );
}

#[tokio::test]
async fn migrations_chain_breadth_first() {
    let (log, mut router) = recording(&[("shop", Some("3.0.0"), "v3")]);
    router
        .registry_mut()
        .migration("order.created", "1.0.0", "2.0.0", |mut p| {
            let total = p.remove("total").ok_or("no total")?;
            p.insert("amount".into(), total);
            Ok(p)
        })
        .migration("order.created", "2.0.0", "3.0.0", |mut p| {
            p.insert("currency".into(), json!("EUR"));
            Ok(p)
        })
        // A longer detour must not be taken.
        .migration("order.created", "1.0.0", "1.5.0", Ok)
        .migration("order.created", "1.5.0", "2.0.0", Ok);
    let out = send(&router, order(Some("1.0.0"), json!({"total": 5}))).await;
    assert_eq!(out, Outcome::Completed);
    assert_eq!(
        log.lock().unwrap()[0],
        r#"v3:3.0.0:{"amount":5,"currency":"EUR"}"#
    );
    let failed = send(&router, order(Some("1.0.0"), json!({"x": 1}))).await;
    assert!(
        matches!(failed, Outcome::Failed { ref error, .. } if error.contains("no total")),
        "{failed:?}"
    );
    let reg = router.registry_mut().clone();
    assert_eq!(
        reg.migrate(
            "order.created",
            json!({"total": 1}).as_object().unwrap().clone(),
            "1.0.0",
            "3.0.0"
        )
        .unwrap(),
        *json!({"amount": 1, "currency": "EUR"}).as_object().unwrap()
    );
    assert!(
        reg.migrate("order.created", Payload::new(), "3.0.0", "1.0.0")
            .is_err()
    );
}

#[tokio::test]
async fn missing_handlers_are_a_counted_failure_that_says_what_is_missing() {
    let mut router = EventRouter::new();
    router
        .on("shop", "order.created", Some("2"), |_| async {
            Outcome::Completed
        })
        .unwrap();
    let out = send(&router, order(Some("1.0.0"), json!({"a": 1}))).await;
    match out {
        Outcome::Failed {
            error,
            retry: Retry::Counted(None),
        } => {
            assert!(error.contains("schema version \"1.0.0\""), "{error}");
            assert!(error.contains("versions [\"2\"]"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    let out = send(&router, event("billing", "refund", None, json!({"a": 1}))).await;
    assert!(matches!(out, Outcome::Failed { ref error, .. } if error.contains("\"refund\"")));
}

#[test]
fn typed_payloads() {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Order {
        total: f64,
    }
    let e = event("shop", "t", None, json!({"total": 2.5}));
    assert_eq!(e.payload_as::<Order>().unwrap(), Order { total: 2.5 });
    let e = event("shop", "t", None, json!({"x": 1}));
    assert!(e.payload_as::<Order>().is_err());
}
