//! `omnibox inbox consume`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::WorkerId;
use omnibox::inbox::{
    AckStrategy, AnySource, CommitOn, ConsumeOptions, ConsumeReport, FileSource, InboxConsumer,
    KafkaSource,
};
use serde_json::json;

use super::HandlerArgs;
use crate::cli::output::{self, Format, human_duration};
use crate::cli::{Context, ExitStatus, UsageError, args, running, signals};

/// `fetch.wait.max.ms` of a Kafka source under `--once` (librdkafka's
/// default is 500).
const ONCE_FETCH_WAIT_MS: u32 = 100;

/// Consume broker messages into the inbox, once per message id and group
///
/// Reads from Kafka (a consumer group with manual offset commits), from a
/// JSON lines file as `publish --broker file:` writes it, or from stdin.
/// Each message becomes one inbox row per consumer group: a message id seen
/// before is a duplicate and is not stored again. A message that cannot be
/// parsed is stored as a failed row (raw bytes base64-encoded) and committed.
/// A message is recognised as a duplicate as long as its row is kept: at
/// least the deduplication window (--dedup-window, OMNIBOX_DEDUP_WINDOW or
/// dedup_window in omnibox.toml; 7d), which `cleanup` enforces.
///
/// With --exec or --webhook the handler runs on each new row; without one,
/// rows stay pending for `omnibox inbox process`.
///
/// Ack strategies (--ack):
///   exactly-once (default)  offsets are committed once a message's row is stored and
///                           handled; --exec and --webhook run after the row is stored
///                           (locked by this consumer) with no transaction open, and it
///                           is marked completed right after; a failure is written to the
///                           row (attempt, error, retry time) and the message is
///                           delivered again at its retry time, with the same
///                           OMNIBOX_EVENT_ID / Idempotency-Key and the next attempt
///   at-least-once           offsets are committed once stored (--commit-on persist,
///                           also after a handler error) or once handled
///                           (--commit-on success); handler failures stay in the
///                           table for `inbox process`
///   at-most-once            offsets are committed before anything else
///
/// Examples:
///   omnibox inbox consume --once                                 # ./omnibox-events.jsonl
///   omnibox inbox consume --from kafka://127.0.0.1:9092 --topic orders --group billing
///   omnibox inbox consume --from kafka://k:9092 --topic orders --group billing --exec './apply.sh'
///   tail -f events.jsonl | omnibox inbox consume --from - --group audit
///   omnibox inbox consume --from file:big.jsonl --once --batch-bytes 8MiB   # large messages: 8 MiB a transaction
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ConsumeArgs {
    /// kafka://HOST:PORT[,HOST:PORT], file:PATH, or - for stdin [default: the broker's file, file:omnibox-events.jsonl]
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// Kafka topic to consume (repeatable)
    #[arg(long = "topic", value_name = "TOPIC")]
    topics: Vec<String>,
    /// Consumer group: the inbox deduplicates per group (--consumer-group
    /// in the commands that select inbox rows by it)
    #[arg(long, visible_alias = "consumer-group", default_value = "omnibox", value_name = "GROUP", value_parser = args::consumer_group)]
    group: String,
    /// A librdkafka property for the consumer (repeatable)
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = args::property)]
    properties: Vec<(String, String)>,
    #[command(flatten)]
    kafka_security: crate::cli::kafka_security::KafkaSecurityArgs,
    /// Stop at the end of the input (file) or once caught up with the end of every partition (Kafka; the broker's long poll is then cut to 100 ms, fetch.wait.max.ms, unless -X sets it)
    #[arg(long)]
    once: bool,
    /// File source: keep reading as the file grows
    #[arg(long, conflicts_with = "once")]
    follow: bool,
    /// When offsets are committed
    #[arg(long, value_enum, default_value_t = Ack::ExactlyOnce)]
    ack: Ack,
    /// at-least-once: commit once stored, or once handled
    #[arg(long, value_enum, default_value_t = CommitPoint::Persist)]
    commit_on: CommitPoint,
    #[command(flatten)]
    handler: HandlerArgs,
    /// Messages per database transaction
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// Bytes per database transaction (values, keys and headers), e.g. 64MiB: a batch ends before the message that would pass it (one message at least, however large); a Kafka source also prefetches at most this much (queued.max.messages.kbytes, unless -X sets it) [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]
    #[arg(long, value_name = "SIZE", value_parser = args::bytes)]
    batch_bytes: Option<u64>,
    /// Counted handler failures of a message before its row is failed (exactly-once)
    #[arg(long, default_value_t = 6, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_attempts: u32,
    /// A message still failing transiently (exit 75, HTTP 429/502/503/504, no
    /// connection) this long after it was first stored is parked as failed
    #[arg(long, allow_hyphen_values = true, default_value = "1h", value_parser = args::duration, value_name = "DURATION")]
    transient_limit: Duration,
    /// How long this consumer's locks on rows in hand last if it dies
    /// (extended every third of it while it lives; external handlers)
    #[arg(long, allow_hyphen_values = true, default_value = "30s", value_parser = args::duration, value_name = "DURATION")]
    lease: Duration,
    #[command(flatten)]
    dead_letters: running::DlqArgs<Wording>,
    /// This consumer's id [default: HOST:PID]
    #[arg(long, value_name = "ID", value_parser = args::worker)]
    worker_id: Option<WorkerId>,
    /// With --once: give up (exit 1) when the database stays unreachable this long; a running one waits however long
    #[arg(long, allow_hyphen_values = true, default_value = "60s", value_parser = args::duration, value_name = "DURATION")]
    outage_limit: Duration,
    /// Serve Prometheus metrics on this address
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// The help of the shared flags: failed rows and poison messages.
#[derive(Debug)]
struct Wording;

impl running::Wording for Wording {
    const DLQ_TOPIC: &'static str =
        "Also write poison messages and rows that end up failed to this topic";
    const DLQ: &'static str =
        "Also keep poison messages and rows that end up failed as dead letters here";
    const DLQ_BROKER: &'static str = "Where the DLQ topic lives [default: the Kafka source's brokers, else file:omnibox-dlq.jsonl]";
}

// The CLI's names: at-most-once, at-least-once, exactly-once.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Ack {
    AtMostOnce,
    AtLeastOnce,
    ExactlyOnce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CommitPoint {
    Persist,
    Success,
}

pub async fn run(args: ConsumeArgs, ctx: &Context) -> Result<ExitStatus> {
    let from = args.from.clone().unwrap_or_else(|| {
        ctx.settings
            .broker
            .clone()
            .filter(|b| b.starts_with("file:"))
            .unwrap_or_else(|| omnibox::relay::sink::DEFAULT_BROKER_URL.to_string())
    });
    let batch_bytes = args.batch_bytes.unwrap_or(ctx.settings.batch_bytes);
    let mut properties = ctx.settings.kafka_properties.clone();
    properties.extend(args.kafka_security.properties()?);
    properties.extend(args.properties.iter().cloned());
    let source = if let Some(brokers) = from.strip_prefix("kafka://") {
        if args.topics.is_empty() {
            return Err(UsageError("a Kafka source needs at least one --topic".into()).into());
        }
        if args.follow {
            return Err(UsageError(
                "--follow applies to a file source; a Kafka source runs until stopped".into(),
            )
            .into());
        }
        // librdkafka prefetches up to 64 MiB by default: no more than a
        // batch's budget (at least 1 MiB), unless the configuration says
        // otherwise (later properties win).
        let mut consumer_properties = vec![(
            "queued.max.messages.kbytes".to_string(),
            (batch_bytes / 1024).clamp(1024, 2_097_151).to_string(),
        )];
        // A drain (`--once`) does not wait on the broker's long poll: a
        // broker may hold a fetch to its deadline with messages there
        // (tansu held one for 360 ms of the default 500 in the middle of a
        // 22,000-message drain). A consumer that keeps running keeps the
        // default: an idle fetch every 100 ms per broker is a cost there.
        if args.once {
            consumer_properties.push((
                "fetch.wait.max.ms".to_string(),
                ONCE_FETCH_WAIT_MS.to_string(),
            ));
        }
        consumer_properties.extend(properties.iter().cloned());
        AnySource::Kafka(Box::new(KafkaSource::new(
            brokers,
            &args.group,
            &args.topics,
            &consumer_properties,
        )?))
    } else {
        if !args.topics.is_empty() {
            return Err(UsageError(
                "--topic applies to a Kafka source (--from kafka://...)".into(),
            )
            .into());
        }
        let path = match from.as_str() {
            "-" | "stdin" => "-",
            f => f
                .strip_prefix("file:")
                .map(|p| p.strip_prefix("//").unwrap_or(p))
                .ok_or_else(|| {
                    UsageError(format!(
                        "unsupported source {f:?}: use kafka://HOST:PORT, file:PATH or - for stdin"
                    ))
                })?,
        };
        let opened = FileSource::open(path, args.follow).await;
        match opened {
            Ok(s) => AnySource::File(s),
            // Without --from, say where the default came from.
            Err(e) if args.from.is_none() => {
                return Err(UsageError(format!(
                    "{e}; without --from, inbox consume reads the relay's file ({from}): pass --from kafka://HOST:PORT --topic T, --from file:PATH or --from - for stdin"
                ))
                .into());
            }
            Err(e) => return Err(e.into()),
        }
    };
    let handler = args.handler.handler()?;
    let store = ctx.store().await?;
    let worker = running::worker_id(&args.worker_id);
    let mut options = ConsumeOptions::new(args.group.clone(), worker.clone());
    options.batch = args.batch as usize;
    options.batch_bytes = Some(batch_bytes);
    options.handler_timeout = args.handler.timeout;
    options.max_redeliveries = args.max_attempts;
    options.transient_limit = args.transient_limit;
    if args.lease < Duration::from_secs(1) {
        return Err(UsageError(
            "--lease must be at least 1s: a shorter lease expires between its extensions".into(),
        )
        .into());
    }
    options.lease = args.lease;
    options.outage_limit = args.outage_limit;
    options.stall_limit = ctx
        .settings
        .is_postgres()
        .then(|| ctx.settings.stall_limit());
    options.ack = match args.ack {
        Ack::AtMostOnce => AckStrategy::AtMostOnce,
        Ack::AtLeastOnce => AckStrategy::AtLeastOnce(match args.commit_on {
            CommitPoint::Persist => CommitOn::Persist,
            CommitPoint::Success => CommitOn::Success,
        }),
        Ack::ExactlyOnce => AckStrategy::ExactlyOnce,
    };
    let metrics = running::metrics("inbox");
    let describe = omnibox::inbox::Source::describe(&source);
    let mut consumer =
        InboxConsumer::new(source, store.inbox(), handler, options).metrics(metrics.clone());
    let dlq = &args.dead_letters;
    let source_brokers = from.starts_with("kafka://").then_some(from.as_str());
    if let Some((sink, topic)) = dlq.topic(source_brokers, &properties)? {
        consumer = consumer.dead_letter(sink, topic);
    }
    if let Some(table) = running::dead_letter_table(&dlq.dlq, &store) {
        consumer = consumer.dead_letter_store(table);
    }
    let _beside = running::beside(args.metrics_addr, &metrics, &store).await?;
    if !ctx.quiet && !args.once {
        crate::cli::output::notice!(
            "omnibox: consuming {describe} as {worker}; SIGINT or SIGTERM stops after the current batch"
        );
    }
    let once = args.once || (!args.follow && !from.starts_with("kafka://"));
    let report = consumer.run(once, signals::shutdown_channel()).await?;
    print_summary(ctx, &report, &describe, &args.group)?;
    Ok(ExitStatus::Success)
}

fn print_summary(ctx: &Context, r: &ConsumeReport, source: &str, group: &str) -> Result<()> {
    match ctx.format() {
        Format::Json => {
            let mut v = serde_json::to_value(r)?;
            v["source"] = json!(source);
            v["group"] = json!(group);
            output::json(&v)
        }
        Format::Table => {
            let counts = [
                ("consumed", r.consumed),
                ("stored", r.stored),
                ("duplicates", r.duplicates),
                ("poison", r.poison),
                ("processed", r.processed),
                ("skipped", r.skipped),
                ("retrying", r.retrying),
                ("failed", r.dead),
                ("redelivered", r.redelivered),
            ];
            let mut columns: Vec<(&str, String)> =
                counts.map(|(header, n)| (header, n.to_string())).into();
            columns.extend([
                (
                    "elapsed",
                    human_duration(Duration::from_secs_f64(r.elapsed_seconds)),
                ),
                ("msgs/s", format!("{:.0}", r.messages_per_second)),
            ]);
            output::line(output::row_table(columns))
        }
    }
}
