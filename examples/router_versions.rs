//! An event router with two schema versions of one event type: version 2
//! has its own handler (a struct implementing `Handler`, reading a typed
//! payload), version 1 payloads are migrated to version 2 on the way, and a
//! second registration for the same key is refused.
//!
//! ```sh
//! cargo run --example router_versions
//! ```

use std::sync::{Arc, Mutex};

use omnibox::prelude::*;

/// Version 2 of `order.created`.
#[derive(Debug, serde::Deserialize)]
struct OrderCreatedV2 {
    order_id: String,
    amount_cents: i64,
    currency: String,
}

/// Records what it handled (a struct handler).
struct Ledger(Arc<Mutex<Vec<String>>>);

impl Handler for Ledger {
    async fn handle(&self, event: &InboxEvent, _cx: &mut HandlerContext<'_>) -> Outcome {
        match event.payload_as::<OrderCreatedV2>() {
            Ok(order) => {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!(
                        "{} {} {} (schema {})",
                        order.order_id,
                        order.amount_cents,
                        order.currency,
                        event.schema_version().unwrap_or("-")
                    ));
                Outcome::Completed
            }
            Err(e) => Outcome::Failed {
                error: e.to_string(),
                retry: Retry::Counted(None),
            },
        }
    }
}

fn event(version: &str, payload: serde_json::Value) -> omnibox::Result<InboxEvent> {
    let mut new = NewInboxEvent::new(
        format!("msg-{version}"),
        "billing",
        "shop",
        "order.created",
        payload,
    );
    new.schema_version = Some(version.to_string());
    DomainService::default().create_inbox_event(new)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let handled = Arc::new(Mutex::new(Vec::new()));
    let mut router = EventRouter::new();
    router.on("shop", "order.created", Some("2"), Ledger(handled.clone()))?;
    // Version 1 had `total` in euros and no currency.
    router
        .registry_mut()
        .migration("order.created", "1", "2", |mut p| {
            let total = p
                .remove("total")
                .and_then(|t| t.as_f64())
                .ok_or("no total")?;
            p.insert(
                "amount_cents".into(),
                serde_json::json!((total * 100.0).round() as i64),
            );
            p.insert("currency".into(), serde_json::json!("EUR"));
            Ok(p)
        });
    // A second handler for the same source, type and version is an error.
    match router.on("shop", "order.created", Some("2"), |_| async {
        Outcome::Completed
    }) {
        Err(e @ Error::HandlerAlreadyRegistered { .. }) => println!("refused: {e}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    println!("topics: {:?}", router.topics());
    println!(
        "event types for shop: {:?}",
        router.event_types_for_topic("shop")
    );

    let v1 = event("1", serde_json::json!({"order_id": "o-1", "total": 12.5}))?;
    let v2 = event(
        "2.0",
        serde_json::json!({"order_id": "o-2", "amount_cents": 990, "currency": "SEK"}),
    )?;
    for e in [&v1, &v2] {
        let mut cx = HandlerContext::detached(Dependencies::new());
        let outcome = router.dispatch(e, &mut cx).await;
        println!(
            "{} schema {:?}: {outcome:?}",
            e.message_id(),
            e.schema_version()
        );
        assert_eq!(outcome, Outcome::Completed);
    }
    let handled = handled.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!("ledger: {handled:?}");
    assert_eq!(
        handled,
        vec!["o-1 1250 EUR (schema 2)", "o-2 990 SEK (schema 2.0)"]
    );
    Ok(())
}
