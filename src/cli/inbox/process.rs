//! `omnibox inbox process`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::inbox::HandlerStep;
use omnibox::pipeline::{self, ProcessorBuilder, RunMode, RunReport};
use omnibox::relay::DeadLetterTopic;
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
    claim: running::ClaimArgs<Wording>,
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
    #[command(flatten)]
    dead_letters: running::DlqArgs<Wording>,
    #[command(flatten)]
    watch: running::WatchArgs<Wording>,
}

/// The help of the shared flags: as [`running::Wording`] has it.
#[derive(Debug)]
struct Wording;

impl running::Wording for Wording {}

pub async fn run(args: ProcessArgs, ctx: &Context) -> Result<ExitStatus> {
    let circuit = args.claim.circuit.config()?;
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
    let mut options = args.claim.processor_options(ctx, worker.clone(), lease);
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
    let dlq = &args.dead_letters;
    if let Some((sink, topic)) = dlq.topic(None, &ctx.settings.kafka_properties)? {
        builder = builder.dead_letter_store(Arc::new(DeadLetterTopic::new(sink, topic)));
    }
    if let Some(table) = running::dead_letter_table(&dlq.dlq, &store) {
        builder = builder.dead_letter_store(table);
    }
    let processor = builder.build();
    let _beside = running::beside(args.watch.metrics_addr, &metrics, &store).await?;
    let mode = running::run_mode(args.once);
    if !ctx.quiet && mode == RunMode::Watch {
        crate::cli::output::notice!(
            "omnibox: processing inbox rows as {worker}; SIGINT or SIGTERM stops after the current batch"
        );
    }
    let mut wakeup = store.wakeup(Table::Inbox).await?;
    let progress = running::Progress::of(ctx, mode, &store.inbox()).await?;
    let report = pipeline::run(
        &processor,
        &args.watch.run_options(mode, ctx),
        signals::shutdown_channel(),
        &mut wakeup,
        |b| {
            let done = b.completed + b.skipped + b.failed + b.dead + b.transient;
            progress.advance(done as u64, None);
        },
    )
    .await?;
    progress.finish();
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
