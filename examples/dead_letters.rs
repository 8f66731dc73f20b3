//! Dead letters kept in the database: an inbox processor whose handler
//! cannot apply one message keeps it in `omnibox_dead_letters` (what
//! `--dlq table` does); the row is then deleted by a cleanup, the handler
//! is fixed, and replaying the letter brings the event back, which is then
//! handled. On SQLite.
//!
//! ```sh
//! cargo run --example dead_letters
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use omnibox::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("omnibox-example-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let sqlite =
        SqliteStore::connect(&format!("sqlite://{}", dir.join("app.db").display())).await?;
    sqlite.migrate().await?;
    let store = AnyStore::Sqlite(sqlite);

    // Two refunds arrive; one names a currency the handler does not know yet.
    let domain = DomainService::default();
    for (id, currency) in [("m1", "EUR"), ("m2", "CHF")] {
        let mut e = NewInboxEvent::new(
            id,
            "billing",
            "payments",
            "refund.issued",
            serde_json::json!({"amount": 10, "currency": currency}),
        );
        e.max_attempts = Some(1);
        store.inbox().insert(&domain.create_inbox_event(e)?).await?;
    }

    let knows_chf = Arc::new(AtomicBool::new(false));
    let handler = {
        let knows_chf = knows_chf.clone();
        Arc::new(move |event: InboxEvent| {
            let knows_chf = knows_chf.load(Ordering::SeqCst);
            async move {
                match event.payload()["currency"].as_str() {
                    Some("EUR") => Outcome::Completed,
                    Some("CHF") if knows_chf => Outcome::Completed,
                    other => Outcome::Failed {
                        error: format!("no exchange rate for {other:?}"),
                        retry: Retry::Counted(None),
                    },
                }
            }
        })
    };
    let letters = Arc::new(store.dead_letters());
    let processor = ProcessorBuilder::new(
        store.inbox(),
        HandlerStep::new(handler, 4, Duration::from_secs(10)),
        ProcessorOptions::new(WorkerId::new("example-processor")?),
    )
    .dead_letter_store(letters.clone())
    .build();

    let report = processor.process_batch().await?;
    println!(
        "completed {}, failed for good {}, dead letters kept {}",
        report.completed, report.dead, report.dead_lettered
    );
    assert_eq!(
        (report.completed, report.dead, report.dead_lettered),
        (1, 1, 1)
    );

    // What failed, as an operator sees it (`omnibox list --table dead-letters`).
    let open = letters
        .list(&DeadLetterFilter {
            open_only: true,
            ..DeadLetterFilter::default()
        })
        .await?;
    for l in &open {
        println!(
            "dead letter {}: {} {}: {}",
            l.id, l.topic, l.event_type, l.error
        );
    }
    assert_eq!(open.len(), 1);
    assert!(open[0].error.contains("CHF"));

    // A month later cleanup deletes the failed row; the letter stays.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.inbox().delete_failed(Duration::ZERO, 100).await?, 1);
    assert!(store.inbox().get(open[0].event_id).await?.is_none());

    // The handler learns CHF; the letter brings the event back.
    knows_chf.store(true, Ordering::SeqCst);
    let mut entry = AuditEntry::new("example", "replay");
    entry.reason = Some("CHF rates added".into());
    let replay = letters.replay(&[open[0].id], entry).await?;
    assert_eq!(replay.replayed.len(), 1);
    let back = store
        .inbox()
        .get(open[0].event_id)
        .await?
        .ok_or("not back")?;
    println!("event {} is {} again", back.id(), back.status());
    assert_eq!(back.status(), EventStatus::Pending);

    let report = processor.process_batch().await?;
    assert_eq!(report.completed, 1);
    let counts = store.inbox().counts().await?;
    assert_eq!((counts.completed, counts.failed), (2, 0));
    println!("both refunds applied");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
