//! `omnibox publish`: the outbox relay.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::pipeline::{KeyFeed, RunMode, RunOptions, RunReport, Wakeup, run};
use omnibox::relay::{self, AnySink, Sink};
use omnibox::{Table, WorkerId};
use serde_json::json;

use super::output::{self, Format, human_duration};
use super::{Context, ExitStatus, args, env, running};

/// Publish due outbox events to the broker (the relay)
///
/// Claims due events in batches, publishes each batch with every message in
/// flight at once (events of one key in order), then marks them completed.
/// A broker that does not answer costs no attempt: the events are retried in
/// about a second and the relay backs off. A topic the broker does not know
/// (or without a leader) backs off alone, also without spending attempts,
/// while other topics go on; after --topic-unavailable-limit its events
/// spend attempts. A broker that rejects a record counts a failed attempt
/// (retried with backoff; failed at max_attempts, and then also kept as a
/// dead letter: --dlq table and/or --dlq-topic).
///
/// With --once the relay exits when nothing due is left that it could
/// publish (rows other relays hold are theirs to finish); it exits 1 when
/// events were left rescheduled because the broker or a topic was not
/// available, or when results could not be written. Without --once it runs
/// until SIGINT/SIGTERM: it stops claiming, finishes the batch in hand and
/// exits 0 with no row left locked. On PostgreSQL it wakes on LISTEN/NOTIFY
/// as soon as a row is inserted.
///
/// With --broker stdout the messages are the output: the summary goes to
/// stderr.
///
/// With --source wal (PostgreSQL with wal_level = logical) the relay learns
/// of new rows from the write-ahead log, through a logical replication slot
/// (--slot, created with its publication when missing), instead of scanning
/// the table for them; it still scans every --poll-interval for retries,
/// rows scheduled for later and rows written before the slot. Messages,
/// per-key order and the table's statuses are the polling relay's, and
/// polling relays may share the table. One relay reads a slot: a second is
/// refused, or waits to take over with --standby. See docs/wal-relay.md.
///
/// Examples:
///   omnibox publish --batch 100                       # to ./omnibox-events.jsonl
///   omnibox publish --broker kafka://127.0.0.1:9092 --batch 1000 --dlq-topic outbox.dlq
///   omnibox publish --broker kafka://127.0.0.1:9092 --dlq table   # see: omnibox list --table dead-letters
///   omnibox publish --broker kafka://k1:9092,k2:9092 -X compression.type=lz4 --once
///   omnibox publish --broker stdout --once | jq .value.payload
///   omnibox publish --broker kafka://127.0.0.1:9092 --topic reports   # a relay for one slow topic
///   omnibox publish --batch 1000 --batch-bytes 8MiB   # large events: claims stop at 8 MiB
///   omnibox publish --source wal --broker kafka://127.0.0.1:9092 --batch 1000
///   omnibox publish --hold lease                      # a lease on each row in flight (status shows them locked)
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct PublishArgs {
    /// Where to publish: kafka://HOST:PORT[,HOST:PORT], file:PATH, stdout or null [default: file:omnibox-events.jsonl]
    #[arg(long, env = env::BROKER, value_name = "URL", hide_env_values = true)]
    broker: Option<String>,
    /// A librdkafka property for the producer (repeatable), e.g. -X linger.ms=20
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = args::property)]
    properties: Vec<(String, String)>,
    #[command(flatten)]
    kafka_security: crate::cli::kafka_security::KafkaSecurityArgs,
    #[command(flatten)]
    claim: running::ClaimArgs<Wording>,
    /// Publish what is due, then exit (for jobs and cron)
    #[arg(long)]
    once: bool,
    /// Publish only events of this topic (repeatable): a relay dedicated to
    /// some topics, e.g. a slow one, while others take the rest. Per-key
    /// order holds (a key belongs to one topic); --once exits when nothing
    /// of these topics is due
    #[arg(long = "topic", value_name = "TOPIC", value_parser = args::filter_value)]
    topics: Vec<String>,
    /// The envelope's schema_version for events that have none of their own
    #[arg(long, value_name = "VERSION", default_value = omnibox::relay::DEFAULT_SCHEMA_VERSION, value_parser = args::filter_value)]
    default_schema_version: String,
    /// This relay's id in locked_by [default: HOST:PID]
    #[arg(long, value_name = "ID", value_parser = args::worker)]
    worker_id: Option<WorkerId>,
    /// Lease of a claim: a relay that dies leaves its rows to others after this long (extended while a batch is in flight) [default: OMNIBOX_LEASE, lease in omnibox.toml, or 5m]
    #[arg(long, allow_hyphen_values = true, value_parser = args::duration, value_name = "DURATION")]
    lease: Option<Duration>,
    /// Longest wait for one message's acknowledgement
    #[arg(long, allow_hyphen_values = true, default_value = "30s", value_parser = args::duration, value_name = "DURATION")]
    publish_timeout: Duration,
    /// Also write events that end up failed to this topic (best effort)
    #[arg(long, value_name = "TOPIC")]
    dlq_topic: Option<String>,
    /// Also keep events that end up failed as dead letters here (replay them with `omnibox replay --table dead-letters`)
    #[arg(long, value_enum, value_name = "WHERE")]
    dlq: Option<args::DlqArg>,
    /// Stop after claiming this many events (whole batches), e.g. to drain a backlog in chunks
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// How long a topic may stay unavailable (unknown, no leader) before its events spend attempts
    #[arg(long, allow_hyphen_values = true, default_value = "5m", value_parser = args::duration, value_name = "DURATION")]
    topic_unavailable_limit: Duration,
    /// How a claim holds its rows while they are published: transaction (PostgreSQL: row locks in the claim's open transaction, each row written once, when done; status shows rows in flight as pending; a relay that dies frees its rows at once, one that stops answering after the lease) or lease (written on each row: status shows them locked, another relay takes them over when the lease runs out; about two thirds of the rows/s) [default: transaction on PostgreSQL (both sources), lease on SQLite]
    #[arg(long, value_enum, value_name = "HOW")]
    hold: Option<HoldArg>,
    /// How new rows are found: poll (claim them from the table) or wal (PostgreSQL's write-ahead log, through a replication slot)
    #[arg(long, value_enum, default_value = "poll", value_name = "SOURCE")]
    source: SourceArg,
    /// --source wal: the logical replication slot to read (created when missing)
    #[arg(long, default_value = omnibox::relay::wal::DEFAULT_SLOT, value_name = "NAME")]
    slot: String,
    /// --source wal: the publication of the outbox's inserts (created when missing)
    #[arg(long, default_value = omnibox::relay::wal::DEFAULT_PUBLICATION, value_name = "NAME")]
    publication: String,
    /// --source wal: when another relay reads the slot, wait and take over when it stops (instead of refusing to start)
    #[arg(long)]
    standby: bool,
    #[command(flatten)]
    watch: running::WatchArgs<Wording>,
}

/// The help of the shared flags, in the relay's words.
#[derive(Debug)]
struct Wording;

impl running::Wording for Wording {
    const BATCH: &'static str = "Events per claim";
    const BATCH_BYTES: &'static str = "Payload bytes per claim, e.g. 64MiB: a claim stops before the event that would pass it (one event at least, however large); up to three batches are in flight [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]";
    const POLL_INTERVAL: &'static str = "Longest idle wait between polls when nothing is due (with --source wal: between scans of the table)";
    const METRICS_ADDR: &'static str =
        "Serve Prometheus metrics on this address, e.g. 127.0.0.1:9898";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum HoldArg {
    /// A lease written on each claimed row.
    Lease,
    /// Row locks in the claim's open transaction (PostgreSQL).
    Transaction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SourceArg {
    /// Claim new rows from the table.
    Poll,
    /// Learn of new rows from PostgreSQL's write-ahead log.
    Wal,
}

/// What wakes an idle relay: LISTEN/NOTIFY (or a sleep), or the WAL feed.
enum RelayWakeup {
    Store(omnibox::store::AnyWakeup),
    Feed(Arc<KeyFeed>),
}

impl Wakeup for RelayWakeup {
    async fn wait(&mut self, max: Duration) {
        match self {
            RelayWakeup::Store(w) => w.wait(max).await,
            RelayWakeup::Feed(f) => f.wait(max).await,
        }
    }
}

pub async fn run_publish(args: PublishArgs, ctx: &Context) -> Result<ExitStatus> {
    let circuit = args.claim.circuit.config()?;
    let broker = args
        .broker
        .clone()
        .or_else(|| ctx.settings.broker.clone())
        .unwrap_or_else(|| relay::sink::DEFAULT_BROKER_URL.to_string());
    let mut properties = ctx.settings.kafka_properties.clone();
    properties.extend(args.kafka_security.properties()?);
    properties.extend(args.properties.iter().cloned());
    let sink = Arc::new(AnySink::from_url(
        &broker,
        &properties,
        args.publish_timeout,
    )?);
    // The lease of a batch in flight is extended every third of it, so it
    // may be shorter than the publish timeout; below a second it would be
    // extended all the time.
    let lease = args.lease.unwrap_or(ctx.settings.lease);
    if lease < Duration::from_secs(1) {
        return Err(super::UsageError(format!(
            "--lease ({}) must be at least 1s: a relay that dies leaves its rows to others after this long, \
             and the lease of a batch in flight is extended every third of it",
            human_duration(lease)
        ))
        .into());
    }
    let wal = args.source == SourceArg::Wal;
    let postgres = ctx.settings.is_postgres();
    if args.hold == Some(HoldArg::Transaction) && !postgres {
        return Err(super::UsageError(
            "--hold transaction holds rows with PostgreSQL's row locks; this database is SQLite: omit --hold (the lease)".into(),
        )
        .into());
    }
    if wal {
        if args.once {
            return Err(super::UsageError(
                "--once is the polling relay's (it drains the table and exits); --source wal streams until stopped: drop --once, or run omnibox publish --once to drain with the polling relay".into(),
            )
            .into());
        }
        if !postgres {
            return Err(super::UsageError(
                "--source wal reads PostgreSQL's write-ahead log; this database is SQLite: use the polling relay (omit --source)".into(),
            )
            .into());
        }
        for (what, name) in [("slot", &args.slot), ("publication", &args.publication)] {
            omnibox::relay::wal::check_name(what, name)
                .map_err(|e| super::UsageError(format!("--{what}: {e}")))?;
        }
    }
    let store = ctx.store().await?;
    let worker = running::worker_id(&args.worker_id);
    let mut options = args.claim.processor_options(ctx, worker.clone(), lease);
    options.filters.topics = args.topics.clone();
    // Held claims unless asked otherwise, where they exist.
    options.hold_claims = match args.hold {
        Some(hold) => hold == HoldArg::Transaction,
        None => postgres,
    };
    let metrics = running::metrics("outbox");
    let publish = relay::PublishOptions {
        timeout: args.publish_timeout,
        transient_delay: options.transient_delay,
        unavailable_limit: args.topic_unavailable_limit,
        default_schema_version: args.default_schema_version.clone(),
        ..relay::PublishOptions::default()
    };
    let mut builder = relay::publisher_with(store.outbox(), sink.clone(), options, publish)
        .metrics(metrics.clone())
        .circuit(circuit);
    if let Some(topic) = &args.dlq_topic {
        builder = builder.dead_letter_store(Arc::new(relay::DeadLetterTopic::new(
            sink.clone(),
            topic.clone(),
        )));
    }
    if let Some(table) = running::dead_letter_table(&args.dlq, &store) {
        builder = builder.dead_letter_store(table);
    }
    let mut wal_stream = None;
    let mut stop_stream = None;
    let mut shutdown = super::signals::shutdown_channel();
    let mut wakeup = if wal {
        let omnibox::store::AnyStore::Postgres(pg) = &store else {
            return Err(super::UsageError(
                "--source wal reads PostgreSQL's write-ahead log; this database is SQLite: use the polling relay (omit --source)".into(),
            )
            .into());
        };
        let wal_options = omnibox::relay::wal::WalOptions {
            slot: args.slot.clone(),
            publication: args.publication.clone(),
            standby: args.standby,
            ..Default::default()
        };
        // A standby waits here for the slot: a signal ends the wait.
        let mut stop = shutdown.clone();
        let stopped = async move {
            // A sender gone never stops it.
            if stop.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let start = tokio::select! {
            start = omnibox::relay::wal::prepare(pg.pool(), &wal_options) => start?,
            () = stopped => return Ok(ExitStatus::Success),
        };
        if !ctx.quiet {
            crate::cli::output::notice!(
                "omnibox: reading the write-ahead log through slot {}{} at {}{}",
                args.slot,
                if start.created_slot { " (created)" } else { "" },
                omnibox::relay::wal::format_lsn(start.confirmed),
                if start.created_publication {
                    format!("; created the publication {}", args.publication)
                } else {
                    String::new()
                }
            );
        }
        let config = omnibox::relay::wal::replication_config(
            &ctx.settings.database_url,
            &wal_options,
            start.confirmed,
        )?;
        let feed = KeyFeed::new(args.watch.poll_interval, start.confirmed);
        builder = builder.key_feed(feed.clone());
        // The stream ends the relay when it fails for good.
        let (failed_tx, failed_rx) = tokio::sync::watch::channel(false);
        // The stream stops on a signal, or when the run ends for another
        // reason (--limit, stdout's reader gone).
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(omnibox::relay::wal::stream(
            config,
            start.schema,
            feed.clone(),
            super::signals::either(shutdown.clone(), stop_rx),
        ));
        stop_stream = Some(stop_tx);
        let task = tokio::spawn(async move {
            let r = task.await;
            let _ = failed_tx.send(true);
            r
        });
        shutdown = super::signals::either(shutdown, failed_rx);
        wal_stream = Some(task);
        // The stream's metrics, sampled every second.
        let (m, f) = (metrics.clone(), feed.clone());
        tokio::spawn(async move {
            let mut counted = 0;
            loop {
                let pushed = f.pushed();
                m.wal_rows.inc_by(pushed.saturating_sub(counted));
                counted = pushed;
                m.wal_keys_waiting.set(f.waiting() as i64);
                m.wal_confirmed_lsn.set(*f.acked().borrow() as f64);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        RelayWakeup::Feed(feed)
    } else {
        RelayWakeup::Store(store.wakeup(Table::Outbox).await?)
    };
    let processor = builder.build();
    let _beside = running::beside(args.watch.metrics_addr, &metrics, &store).await?;
    let mode = running::run_mode(args.once);
    let run_options = RunOptions {
        max_rows: args.limit,
        ..args.watch.run_options(mode, ctx)
    };
    if !ctx.quiet && mode == RunMode::Watch {
        crate::cli::output::notice!(
            "omnibox: publishing to {} as {worker} (batch {}); SIGINT or SIGTERM stops after the current batch",
            sink.describe(),
            args.claim.batch
        );
    }
    // Stdout's reader gone (`| head`): stop as a signal would, as other
    // Unix tools do, instead of retrying a pipe no one reads.
    if let AnySink::Stdout(out) = &*sink {
        shutdown = super::signals::either(shutdown, out.closed());
    }
    let progress = running::Progress::of(ctx, mode, &store.outbox()).await?;
    let report = run(&processor, &run_options, shutdown, &mut wakeup, |batch| {
        let done = batch.completed + batch.failed + batch.dead + batch.transient;
        let transient = (batch.transient > 0).then(|| format!("{} transient", batch.transient));
        progress.advance(done as u64, transient);
    })
    .await?;
    progress.finish();
    if let Some(stop) = stop_stream {
        let _ = stop.send(true);
    }
    if let Some(task) = wal_stream {
        // Ended by the same shutdown, or failed (and stopped the run).
        match task.await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e.into()),
            Ok(Err(e)) | Err(e) => {
                return Err(anyhow::anyhow!("the replication stream's task failed: {e}"));
            }
        }
    }
    // With the stdout sink, stdout carries the messages.
    let to = if matches!(*sink, AnySink::Stdout(_)) {
        output::Report::Stderr
    } else {
        output::Report::Stdout
    };
    let unavailable = processor.handler().unavailable_topics();
    print_summary(ctx, to, &report, &sink.describe(), &worker, &unavailable)?;
    let mut ok = true;
    if report.commit_errors > 0 {
        crate::cli::output::notice!(
            "omnibox: error: {} batch(es) could not be marked; their rows are published again after the lease expires",
            report.commit_errors
        );
        ok = false;
    }
    ok &= running::stopped_notice(&report);
    if let AnySink::Stdout(out) = &*sink
        && out.is_closed()
    {
        // The reader ended the pipeline: not an error of ours. What was not
        // written stays pending, no attempt spent.
        crate::cli::output::notice!(
            "omnibox: stdout's reader has gone; stopped ({} event(s) published; the batch in hand stays pending)",
            report.completed
        );
        return Ok(ExitStatus::Success);
    }
    if mode == RunMode::Once {
        for (_, reason, _) in &unavailable {
            crate::cli::output::notice!(
                "omnibox: error: {reason}; its events were rescheduled without spending an attempt"
            );
            ok = false;
        }
        let broker_down = report.transient.saturating_sub(report.unavailable);
        if broker_down > 0 && report.completed == 0 {
            running::unanswered_notice("the broker", broker_down, &report);
            ok = false;
        }
    }
    Ok(crate::cli::run_exit(ok, mode, &report))
}

fn print_summary(
    ctx: &Context,
    to: output::Report,
    r: &RunReport,
    broker: &str,
    worker: &WorkerId,
    unavailable: &[(String, String, Duration)],
) -> Result<()> {
    match ctx.format() {
        Format::Json => {
            let mut v = serde_json::to_value(r)?;
            v["broker"] = json!(broker);
            v["worker_id"] = json!(worker.as_str());
            v["unavailable_topics"] = unavailable
                .iter()
                .map(|(topic, reason, since)| {
                    json!({"topic": topic, "reason": reason, "for_seconds": since.as_secs_f64()})
                })
                .collect();
            to.json(&v)
        }
        Format::Table => {
            let t = running::summary_table(
                r,
                "published",
                &[],
                &[("released", r.released), ("lease lost", r.lease_lost)],
            );
            to.line(t)
        }
    }
}
