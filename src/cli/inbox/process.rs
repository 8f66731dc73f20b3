//! `omnibox inbox process`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::inbox::HandlerStep;
use omnibox::pipeline::{self, ProcessorBuilder, RunMode, RunOptions, RunReport};
use omnibox::relay::{AnySink, DeadLetterTopic};
use omnibox::{Table, WorkerId};
use serde_json::json;

use super::HandlerArgs;
use crate::cli::output::{self, Format};
use crate::cli::{Context, ExitStatus, UsageError, args, running, signals};

/// Run a handler on pending inbox rows (the batch pipeline, like publish)
///
/// Claims due inbox rows in batches and runs the handler on each: completed,
/// skipped, or failed (counted, with backoff; `failed` at max_attempts and
/// then kept as a dead letter: --dlq table and/or --dlq-topic; exit 75 or
/// HTTP 429/502/503/504 retry without spending an attempt). Without --once it runs until SIGINT/SIGTERM, and on
/// PostgreSQL wakes as soon as rows are inserted.
///
/// Examples:
///   omnibox inbox process --exec './apply-event.sh' --once
///   omnibox inbox process --webhook http://127.0.0.1:8080/events --concurrency 8
///   omnibox inbox process --exec ./refunds.sh --source billing --event-type refund.issued
///   omnibox inbox process --exec ./audit.sh --consumer-group audit   # the rows of one consumer group
///   omnibox inbox process --exec ./apply-event.sh --dlq table   # see: omnibox list --table dead-letters
///   omnibox inbox process --exec ./apply-event.sh --batch-bytes 8MiB   # large events: claims stop at 8 MiB
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ProcessArgs {
    #[command(flatten)]
    handler: HandlerArgs,
    #[command(flatten)]
    circuit: args::CircuitArgs,
    /// Rows per claim
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// Payload bytes per claim, e.g. 64MiB: a claim stops before the row that would pass it (one row at least, however large) [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]
    #[arg(long, value_name = "SIZE", value_parser = args::bytes)]
    batch_bytes: Option<u64>,
    /// Handle only rows from this source (the producing service, or the
    /// topic; repeatable)
    #[arg(long = "source", value_name = "SOURCE", value_parser = args::filter_value)]
    sources: Vec<String>,
    /// Handle only rows of this event type (repeatable)
    #[arg(long = "event-type", value_name = "TYPE", value_parser = args::filter_value)]
    event_types: Vec<String>,
    /// Handle only rows of this consumer group (what `inbox consume --group`
    /// stored them under; repeatable)
    #[arg(long = "consumer-group", value_name = "GROUP", value_parser = args::consumer_group)]
    consumer_groups: Vec<String>,
    /// Handler calls running at once
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    concurrency: u32,
    /// Process what is due, then exit
    #[arg(long)]
    once: bool,
    /// This worker's id [default: HOST:PID]
    #[arg(long, value_name = "ID", value_parser = args::worker)]
    worker_id: Option<WorkerId>,
    /// Lease of a claim (extended while handlers run) [default: OMNIBOX_LEASE, lease in omnibox.toml, or 5m]
    #[arg(long, allow_hyphen_values = true, value_parser = args::duration, value_name = "DURATION")]
    lease: Option<Duration>,
    /// Also write rows that end up failed to this topic
    #[arg(long, value_name = "TOPIC")]
    dlq_topic: Option<String>,
    /// Also keep rows that end up failed as dead letters here (replay them with `omnibox replay --table dead-letters`)
    #[arg(long, value_enum, value_name = "WHERE")]
    dlq: Option<args::DlqArg>,
    /// Where the DLQ topic lives [default: file:omnibox-dlq.jsonl]
    #[arg(long, value_name = "URL", requires = "dlq_topic")]
    dlq_broker: Option<String>,
    /// Longest idle wait between polls when nothing is due
    #[arg(long, allow_hyphen_values = true, default_value = "1s", value_parser = args::duration, value_name = "DURATION")]
    poll_interval: Duration,
    /// With --once: give up (exit 1) when the database stays unreachable this long; a running one waits however long
    #[arg(long, allow_hyphen_values = true, default_value = "60s", value_parser = args::duration, value_name = "DURATION")]
    outage_limit: Duration,
    /// Serve Prometheus metrics on this address
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

pub async fn run(args: ProcessArgs, ctx: &Context) -> Result<ExitStatus> {
    let circuit = args.circuit.config()?;
    let Some(handler) = args.handler.handler()? else {
        return Err(UsageError(
            "inbox process needs a handler: --exec CMD or --webhook URL".into(),
        )
        .into());
    };
    let lease = args.lease.unwrap_or(ctx.settings.lease);
    if lease < Duration::from_secs(1) {
        return Err(UsageError("--lease must be at least 1s".into()).into());
    }
    if lease <= args.handler.timeout {
        return Err(UsageError(
            "--lease must be longer than --timeout, or a slow handler loses its rows".into(),
        )
        .into());
    }
    let store = ctx.store().await?;
    let worker = running::worker_id(&args.worker_id);
    let mut options =
        running::processor_options(ctx, worker.clone(), args.batch, args.batch_bytes, lease);
    options.filters.sources = args.sources.clone();
    options.filters.event_types = args.event_types.clone();
    options.filters.consumer_groups = args.consumer_groups.clone();
    let metrics = running::metrics("inbox");
    let step = HandlerStep::new(handler, args.concurrency as usize, args.handler.timeout)
        .metrics(metrics.clone());
    let mut builder = ProcessorBuilder::new(store.inbox(), step, options)
        .job("inbox_processor")
        .metrics(metrics.clone())
        .circuit(circuit);
    if let Some(topic) = &args.dlq_topic {
        let url = args
            .dlq_broker
            .clone()
            .unwrap_or_else(|| "file:omnibox-dlq.jsonl".to_string());
        let props = if url.starts_with("kafka://") {
            ctx.settings.kafka_properties.clone()
        } else {
            Vec::new()
        };
        builder = builder.dead_letter_store(Arc::new(DeadLetterTopic::new(
            Arc::new(AnySink::from_url(&url, &props, Duration::from_secs(30))?),
            topic.clone(),
        )));
    }
    if let Some(table) = running::dead_letter_table(&args.dlq, &store) {
        builder = builder.dead_letter_store(table);
    }
    let processor = builder.build();
    let _server = running::serve_metrics(args.metrics_addr, &metrics, &store).await?;
    let _partitions = running::keep_partitions(&store).await;
    let mode = running::run_mode(args.once);
    if !ctx.quiet && mode == RunMode::Watch {
        crate::cli::output::notice!(
            "omnibox: processing inbox rows as {worker}; SIGINT or SIGTERM stops after the current batch"
        );
    }
    let mut wakeup = store.wakeup(Table::Inbox).await?;
    let run_options = RunOptions {
        mode,
        idle_max: args.poll_interval,
        outage_limit: args.outage_limit,
        ..RunOptions::default()
    };
    let progress = if running::shows_progress(ctx, mode) {
        Some(running::progress_bar(
            omnibox::EventStore::counts(&store.inbox()).await?.due_now,
        ))
    } else {
        None
    };
    let report = pipeline::run(
        &processor,
        &run_options,
        signals::shutdown_channel(),
        &mut wakeup,
        |b| {
            if let Some(bar) = &progress {
                bar.inc((b.completed + b.skipped + b.failed + b.dead + b.transient) as u64);
            }
        },
    )
    .await?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    print_summary(ctx, &report, &worker)?;
    let mut ok = report.commit_errors == 0;
    ok &= running::stopped_notice(&report);
    if mode == RunMode::Once && report.transient > 0 && report.completed + report.skipped == 0 {
        // As `publish --once` when the broker does not answer.
        running::unanswered_notice("the handler", report.transient, &report);
        ok = false;
    }
    Ok(crate::cli::run_exit(ok, mode, &report))
}

fn print_summary(ctx: &Context, r: &RunReport, worker: &WorkerId) -> Result<()> {
    match ctx.format() {
        Format::Json => {
            let mut v = serde_json::to_value(r)?;
            v["worker_id"] = json!(worker.as_str());
            output::json(&v)
        }
        Format::Table => {
            let t = running::summary_table(r, "processed", &[("skipped", r.skipped)], &[]);
            output::line(t)
        }
    }
}
