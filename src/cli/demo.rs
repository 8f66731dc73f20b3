//! `omnibox demo`: the whole engine end to end on the embedded default.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use omnibox::inbox::{AnySource, ConsumeOptions, FileSource, HandlerStep, InboxConsumer};
use omnibox::pipeline::{
    self, Outcome, ProcessorBuilder, ProcessorOptions, RunMode, RunOptions, Sleep,
};
use omnibox::relay::{self, AnySink};
use omnibox::store::{AnyStore, StoreOptions};
use omnibox::{DomainService, EventStore, InboxEvent, NewOutboxEvent, OutboxStore, WorkerId};
use serde_json::json;

use super::output::{self, human_duration};
use super::{Context, ExitStatus, UsageError};

/// Run the whole engine once, in seconds, with no servers
///
/// In a new directory: creates an SQLite database, enqueues sample outbox
/// events, publishes them with the relay to a JSON lines file, consumes that
/// file into the inbox (exactly once), processes the inbox rows with a small
/// handler, and prints the status table.
///
/// Examples:
///   omnibox demo
///   omnibox demo --dir /tmp/omnibox-demo --events 5000
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct DemoArgs {
    /// Directory to work in (must not exist yet) [default: a new directory under the system's temp dir]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Outbox events to create
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    events: u32,
}

pub async fn run(args: DemoArgs, ctx: &Context) -> Result<ExitStatus> {
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("omnibox-demo-{}", std::process::id()))
    });
    if dir.exists() {
        return Err(UsageError(format!(
            "{} exists already; give a new --dir",
            dir.display()
        ))
        .into());
    }
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let say = |text: String| output::line(text);
    let db = format!("sqlite://{}", dir.join("omnibox.db").display());
    let file = dir.join("omnibox-events.jsonl");
    let store = AnyStore::connect(&db, &StoreOptions::default()).await?;
    ctx.track(&store);
    store.migrate().await?;
    say(format!("1. created {db}"))?;

    let domain = DomainService::default();
    let events: Vec<_> = (0..args.events as usize)
        .map(|i| {
            let order = uuid::Uuid::from_u128(i as u128 % 10 + 1);
            domain.create_outbox_event(NewOutboxEvent::new(
                "order",
                order,
                "order.updated",
                "orders",
                order.to_string(),
                json!({"order": i % 10, "version": i / 10, "total_cents": 100 * (i % 7 + 1)}),
            ))
        })
        .collect::<omnibox::Result<_>>()?;
    let out = store.outbox().create_many(&events).await?;
    say(format!(
        "2. enqueued {} outbox events for 10 orders",
        out.len()
    ))?;

    let sink = Arc::new(AnySink::from_url(
        &format!("file:{}", file.display()),
        &[],
        Duration::from_secs(30),
    )?);
    let worker = WorkerId::default_for_process();
    let mut opts = ProcessorOptions::new(worker.clone());
    opts.batch = 100;
    let publisher = relay::publisher(store.outbox(), sink, opts, Duration::from_secs(30)).build();
    let once = RunOptions {
        mode: RunMode::Once,
        ..RunOptions::default()
    };
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let published = pipeline::run(&publisher, &once, rx.clone(), &mut Sleep, |_| {}).await?;
    say(format!(
        "3. published {} events to {}",
        published.completed,
        file.display()
    ))?;

    // The file into the inbox, twice: the second pass finds only duplicates.
    let mut passes = Vec::new();
    for _ in 0..2 {
        let source = AnySource::File(FileSource::open(&file.to_string_lossy(), false).await?);
        let options = ConsumeOptions::new("demo", worker.clone());
        let mut consumer = InboxConsumer::<_, omnibox::inbox::AnyHandler>::new(
            source,
            store.inbox(),
            None,
            options,
        );
        passes.push(consumer.run(true, rx.clone()).await?);
    }
    let (consumed, duplicates) = (&passes[0], &passes[1]);
    say(format!(
        "4. consumed the file into the inbox: {} stored; read again: {} duplicates, nothing stored twice",
        consumed.stored, duplicates.duplicates
    ))?;

    let total = Arc::new(AtomicU64::new(0));
    let sum = total.clone();
    let handler = Arc::new(move |e: InboxEvent| {
        let sum = sum.clone();
        async move {
            sum.fetch_add(
                e.payload()["total_cents"].as_u64().unwrap_or(0),
                Ordering::Relaxed,
            );
            Outcome::Completed
        }
    });
    let step = HandlerStep::new(handler, 4, Duration::from_secs(30));
    let processor =
        ProcessorBuilder::new(store.inbox(), step, ProcessorOptions::new(worker)).build();
    let processed = pipeline::run(&processor, &once, rx, &mut Sleep, |_| {}).await?;
    say(format!(
        "5. processed {} inbox rows with a small handler (sum of totals: {} cents)",
        processed.completed,
        total.load(Ordering::Relaxed)
    ))?;

    let counts = [
        store.outbox().counts().await?,
        store.inbox().counts().await?,
    ];
    let t = crate::cli::status::counts_table(&counts, None);
    output::line(t)?;
    say(format!(
        "done in {}; look around with: omnibox --database-url {db} status",
        human_duration(started.elapsed())
    ))?;
    let _ = ctx;
    Ok(ExitStatus::Success)
}
