//! An inbox handler that writes business rows in the inbox's own
//! transaction: the payment row and "inbox row completed" commit together,
//! and a failing run's writes are rolled back before the retry. A message
//! the handler cannot read makes it panic (an `expect` on unexpected
//! input): that is a counted failure like any other, the consumer goes on,
//! and the message ends `failed` after its attempts.
//!
//! Runs on an SQLite file in a temporary directory, no servers:
//!
//! ```sh
//! cargo run --example inbox_transactional
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use omnibox::prelude::*;

/// A dependency the handler reads (the reference's `**deps`).
struct Currency(&'static str);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("omnibox-example-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let url = format!("sqlite://{}", dir.join("shop.db").display());
    let sqlite = SqliteStore::connect(&url).await?;
    sqlite.migrate().await?;
    sqlx::query("CREATE TABLE payments (order_id TEXT PRIMARY KEY, amount INTEGER NOT NULL, currency TEXT NOT NULL)")
        .execute(sqlite.pool())
        .await?;
    let store = AnyStore::Sqlite(sqlite);

    // Three messages, as a broker would deliver them (a JSON lines file here).
    let input = dir.join("messages.jsonl");
    let mut lines: Vec<String> = (1..=3)
        .map(|n| {
            serde_json::json!({
                "topic": "payments",
                "key": format!("order-{n}"),
                "headers": {"event_id": format!("pay-{n}"), "event_type": "payment.received"},
                "value": {"order_id": format!("order-{n}"), "amount": n * 100},
            })
            .to_string()
        })
        .collect();
    // A producer bug: the amount is text.
    lines.push(
        serde_json::json!({
            "topic": "payments",
            "key": "order-4",
            "headers": {"event_id": "pay-4", "event_type": "payment.received"},
            "value": {"order_id": "order-4", "amount": "four hundred"},
        })
        .to_string(),
    );
    std::fs::write(&input, lines.join("\n") + "\n")?;

    // pay-2's first run fails after writing its payment: that write must
    // not stay, and the retry writes it once.
    let runs = Arc::new(AtomicU32::new(0));
    let seen = runs.clone();
    let handler = Arc::new(tx_handler(move |event, cx| {
        let seen = seen.clone();
        Box::pin(async move {
            let order = event.payload()["order_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let amount = event.payload()["amount"]
                .as_i64()
                .expect("the amount is a number");
            let currency = cx.dep::<Currency>().map_or("EUR", |c| c.0);
            let Ok(Tx::Sqlite(conn)) = cx.tx().await else {
                return Outcome::Failed {
                    error: "this example writes to SQLite".into(),
                    retry: Retry::Counted(None),
                };
            };
            let written = sqlx::query("INSERT INTO payments VALUES (?, ?, ?)")
                .bind(&order)
                .bind(amount)
                .bind(currency)
                .execute(conn)
                .await;
            if let Err(e) = written {
                return Outcome::Failed {
                    error: e.to_string(),
                    retry: Retry::Counted(None),
                };
            }
            if event.message_id() == "pay-2" && seen.fetch_add(1, Ordering::SeqCst) == 0 {
                println!("pay-2: payment written, then the handler fails (rolled back)");
                return Outcome::Failed {
                    error: "the ledger service said no".into(),
                    retry: Retry::Counted(None),
                };
            }
            println!(
                "{}: payment of {amount} {currency} for {order}",
                event.message_id()
            );
            Outcome::Completed
        })
    }));

    let mut options = ConsumeOptions::new("billing", WorkerId::new("example")?);
    options.ack = AckStrategy::ExactlyOnce;
    options.backoff = Backoff {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(100),
    };
    let source = FileSource::open(&input.display().to_string(), false).await?;
    let mut consumer = InboxConsumer::new(source, store.inbox(), Some(handler), options)
        .with_dependencies(Dependencies::new().with(Currency("EUR")));
    let report = consumer
        .run(true, tokio::sync::watch::channel(false).1)
        .await?;
    println!(
        "consumed {}, processed {}, failed runs {}",
        report.consumed, report.processed, report.failed
    );

    let AnyStore::Sqlite(sqlite) = &store else {
        unreachable!("opened as SQLite above")
    };
    let payments: Vec<(String, i64)> =
        sqlx::query_as("SELECT order_id, amount FROM payments ORDER BY order_id")
            .fetch_all(sqlite.pool())
            .await?;
    println!("payments: {payments:?}");
    assert_eq!(payments.len(), 3, "one payment per message, none twice");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "pay-2 ran twice");
    let counts = store.inbox().counts().await?;
    assert_eq!(counts.completed, 3);
    let bad = store
        .inbox()
        .get_by_message_id("pay-4", "billing")
        .await?
        .expect("stored");
    println!(
        "pay-4: {} after {} attempts: {}",
        bad.status(),
        bad.attempts_made(),
        bad.last_error().unwrap_or_default()
    );
    assert_eq!(bad.status(), EventStatus::Failed);
    assert_eq!(
        bad.last_error(),
        Some("handler panicked: the amount is a number")
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
