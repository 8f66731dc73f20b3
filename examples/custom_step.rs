//! A custom pipeline step around an inbox processor's handler: it sees each
//! batch before the handler runs, filters out internal events before the
//! handler sees them, and turns the failures of retired event types into
//! skips (completed, not retried). The handler returns a `Result`: `Err` is
//! a counted failure with the error's text.
//!
//! ```sh
//! cargo run --example custom_step
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use omnibox::prelude::*;

/// Retired event types fail in the handler; this step skips them instead.
#[derive(Default)]
struct SkipRetired {
    batches: AtomicUsize,
    skipped: AtomicUsize,
    filtered: AtomicUsize,
}

impl Step<InboxRoute> for SkipRetired {
    async fn before_batch(&self, events: &[InboxEvent]) {
        self.batches.fetch_add(1, Ordering::SeqCst);
        println!("batch of {} event(s)", events.len());
    }

    /// Internal events never reach the handler.
    async fn before_event(&self, event: &InboxEvent) -> Option<Outcome> {
        if event.event_type().starts_with("internal.") {
            println!(
                "{}: {} filtered out",
                event.message_id(),
                event.event_type()
            );
            self.filtered.fetch_add(1, Ordering::SeqCst);
            return Some(Outcome::Skipped);
        }
        None
    }

    async fn after_event(&self, event: &InboxEvent, outcome: &mut Outcome) {
        if event.event_type().starts_with("legacy.") && matches!(outcome, Outcome::Failed { .. }) {
            println!(
                "{}: {} is retired, skipped",
                event.message_id(),
                event.event_type()
            );
            self.skipped.fetch_add(1, Ordering::SeqCst);
            *outcome = Outcome::Skipped;
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("omnibox-example-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let sqlite =
        SqliteStore::connect(&format!("sqlite://{}", dir.join("app.db").display())).await?;
    sqlite.migrate().await?;
    let store = AnyStore::Sqlite(sqlite);

    // Store four messages in the inbox (no handler yet).
    let input = dir.join("in.jsonl");
    let lines: Vec<String> = [
        "order.created",
        "legacy.order.placed",
        "order.paid",
        "internal.ping",
        "order.shipped",
    ]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"topic": "orders", "headers": {"event_id": format!("m{i}"), "event_type": t}, "value": {"n": i}})
                .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n")?;
    let source = FileSource::open(&input.display().to_string(), false).await?;
    InboxConsumer::<_, AnyHandler>::new(
        source,
        store.inbox(),
        None,
        ConsumeOptions::new("billing", WorkerId::new("example")?),
    )
    .run(true, tokio::sync::watch::channel(false).1)
    .await?;

    // The handler knows only current event types.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let handler = Arc::new(move |event: InboxEvent| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if event.event_type().starts_with("legacy.") {
                return Err(format!("unknown event type {}", event.event_type()));
            }
            Ok(())
        }
    });
    let step = Arc::new(SkipRetired::default());
    let processor = ProcessorBuilder::new(
        store.inbox(),
        HandlerStep::new(handler, 4, Duration::from_secs(10)).with_step(step.clone()),
        ProcessorOptions::new(WorkerId::new("example-processor")?),
    )
    .build();
    let report = processor.process_batch().await?;
    println!(
        "completed {}, skipped {}, failed {}",
        report.completed, report.skipped, report.failed
    );
    let counts = store.inbox().counts().await?;
    assert_eq!((counts.completed, counts.pending, counts.failed), (5, 0, 0));
    assert_eq!(step.skipped.load(Ordering::SeqCst), 1);
    assert_eq!(step.filtered.load(Ordering::SeqCst), 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "the handler never saw internal.ping"
    );
    assert_eq!(step.batches.load(Ordering::SeqCst), 1);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
