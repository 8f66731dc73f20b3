//! The wiring `publish`, `inbox process` and `inbox consume` share: the
//! flags of a claim, of dead letters and of a run, the processor's
//! settings, the dead-letter table and topic, the metrics endpoint, the
//! run mode, the progress bar and the notices after a run.

use std::io::IsTerminal;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use omnibox::metrics::Metrics;
use omnibox::pipeline::{ProcessorOptions, RunMode, RunOptions, RunReport};
use omnibox::relay::AnySink;
use omnibox::store::AnyStore;
use omnibox::store::dead_letters::DeadLetterTable;
use omnibox::{EventStore, Route, WorkerId};

use super::{Context, args};

/// How often a running command creates the partitions missing ahead.
const PARTITIONS_EVERY: Duration = Duration::from_secs(600);

/// A task that stops when this is dropped.
pub struct Background(tokio::task::JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// On PostgreSQL, creates the partitions missing ahead of partitioned
/// tables now (before the command's work starts) and every 10 minutes
/// while it runs; nothing when neither table is partitioned (one catalog
/// lookup each time). A failure is a warning: the partitions ahead cover
/// the time until the next try.
pub async fn keep_partitions(store: &AnyStore) -> Option<Background> {
    let AnyStore::Postgres(pg) = store else {
        return None;
    };
    async fn ensure(pg: &omnibox::store::PgStore) {
        match pg.ensure_partitions(Duration::from_secs(5)).await {
            Ok(created) => {
                for name in created {
                    tracing::info!(partition = %name, "created a partition ahead");
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "could not create the partitions ahead (tried again in 10 minutes; `omnibox partitions create` does it by hand)"
            ),
        }
    }
    ensure(pg).await;
    let pg = pg.clone();
    Some(Background(tokio::spawn(async move {
        loop {
            tokio::time::sleep(PARTITIONS_EVERY).await;
            ensure(&pg).await;
        }
    })))
}

/// `--once` runs until nothing is due; otherwise the command watches.
pub fn run_mode(once: bool) -> RunMode {
    if once { RunMode::Once } else { RunMode::Watch }
}

/// The help of the flags `publish`, `inbox process` and `inbox consume`
/// share, in each command's words: `inbox process`'s unless the command
/// says otherwise.
pub trait Wording: std::fmt::Debug + Send + Sync + 'static {
    /// `--batch`.
    const BATCH: &'static str = "Rows per claim";
    /// `--batch-bytes`.
    const BATCH_BYTES: &'static str = "Payload bytes per claim, e.g. 64MiB: a claim stops before the row that would pass it (one row at least, however large) [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]";
    /// `--dlq-topic`.
    const DLQ_TOPIC: &'static str = "Also write rows that end up failed to this topic";
    /// `--dlq`.
    const DLQ: &'static str = "Also keep rows that end up failed as dead letters here (replay them with `omnibox replay --table dead-letters`)";
    /// `--dlq-broker`.
    const DLQ_BROKER: &'static str = "Where the DLQ topic lives [default: file:omnibox-dlq.jsonl]";
    /// `--poll-interval`.
    const POLL_INTERVAL: &'static str = "Longest idle wait between polls when nothing is due";
    /// `--metrics-addr`.
    const METRICS_ADDR: &'static str = "Serve Prometheus metrics on this address";
}

/// How `publish` and `inbox process` claim: the circuit breaker, the batch
/// and its byte budget.
#[derive(Debug, clap::Args)]
pub struct ClaimArgs<W: Wording> {
    #[command(flatten)]
    pub circuit: args::CircuitArgs,
    /// Rows (events) per claim.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000), help = W::BATCH)]
    pub batch: u32,
    /// The payload bytes a claim stops before passing.
    #[arg(long, value_name = "SIZE", value_parser = args::bytes, help = W::BATCH_BYTES)]
    pub batch_bytes: Option<u64>,
    #[arg(skip)]
    wording: PhantomData<W>,
}

impl<W: Wording> ClaimArgs<W> {
    /// A processor's settings: the batch, its byte budget (the settings'
    /// default), the lease, and a commit retried for half the lease.
    pub fn processor_options(
        &self,
        ctx: &Context,
        worker: WorkerId,
        lease: Duration,
    ) -> ProcessorOptions {
        let mut options = ProcessorOptions::new(worker);
        options.batch = self.batch;
        options.batch_bytes = Some(self.batch_bytes.unwrap_or(ctx.settings.batch_bytes));
        options.lease = lease;
        options.commit_retry_for = lease / 2;
        options
    }
}

/// Where `inbox process` and `inbox consume` keep what ends up failed,
/// besides the row.
#[derive(Debug, clap::Args)]
pub struct DlqArgs<W: Wording> {
    /// The topic failed rows are written to.
    #[arg(long, value_name = "TOPIC", help = W::DLQ_TOPIC)]
    pub dlq_topic: Option<String>,
    /// Where failed rows are kept as dead letters.
    #[arg(long, value_enum, value_name = "WHERE", help = W::DLQ)]
    pub dlq: Option<args::DlqArg>,
    /// The broker of `dlq_topic`.
    #[arg(long, value_name = "URL", requires = "dlq_topic", help = W::DLQ_BROKER)]
    pub dlq_broker: Option<String>,
    #[arg(skip)]
    wording: PhantomData<W>,
}

impl<W: Wording> DlqArgs<W> {
    /// `--dlq-topic` and the sink it is written to: on `--dlq-broker`, else
    /// on `default_broker`, else in `file:omnibox-dlq.jsonl`; a Kafka one
    /// with `kafka_properties`.
    pub fn topic(
        &self,
        default_broker: Option<&str>,
        kafka_properties: &[(String, String)],
    ) -> Result<Option<(Arc<AnySink>, String)>> {
        let Some(topic) = &self.dlq_topic else {
            return Ok(None);
        };
        let url = self
            .dlq_broker
            .as_deref()
            .or(default_broker)
            .unwrap_or("file:omnibox-dlq.jsonl");
        let properties = if url.starts_with("kafka://") {
            kafka_properties
        } else {
            &[]
        };
        let sink = AnySink::from_url(url, properties, Duration::from_secs(30))?;
        Ok(Some((Arc::new(sink), topic.clone())))
    }
}

/// How `publish` and `inbox process` run: the idle poll, the outage a
/// `--once` run bears, the metrics endpoint.
#[derive(Debug, clap::Args)]
pub struct WatchArgs<W: Wording> {
    /// The longest idle wait.
    #[arg(long, allow_hyphen_values = true, default_value = "1s", value_parser = args::duration, value_name = "DURATION", help = W::POLL_INTERVAL)]
    pub poll_interval: Duration,
    /// With --once: give up (exit 1) when the database stays unreachable this long; a running one waits however long
    #[arg(long, allow_hyphen_values = true, default_value = "60s", value_parser = args::duration, value_name = "DURATION")]
    pub outage_limit: Duration,
    /// Where metrics are served.
    #[arg(long, value_name = "ADDR", help = W::METRICS_ADDR)]
    pub metrics_addr: Option<SocketAddr>,
    #[arg(skip)]
    wording: PhantomData<W>,
}

impl<W: Wording> WatchArgs<W> {
    /// A run in `mode` with these flags; on PostgreSQL, a claim or
    /// results write unanswered past the settings' stall limit ends it.
    pub fn run_options(&self, mode: RunMode, ctx: &Context) -> RunOptions {
        RunOptions {
            mode,
            idle_max: self.poll_interval,
            outage_limit: self.outage_limit,
            stall_limit: ctx
                .settings
                .is_postgres()
                .then(|| ctx.settings.stall_limit()),
            ..RunOptions::default()
        }
    }
}

/// Prometheus metrics for `table` (`outbox` or `inbox`), its series
/// present from the start.
pub fn metrics(table: &str) -> Arc<Metrics> {
    let metrics = Arc::new(Metrics::new());
    metrics.prime(table);
    metrics
}

/// `--worker-id`, or this process's default id (`HOST:PID`).
pub fn worker_id(given: &Option<WorkerId>) -> WorkerId {
    given.clone().unwrap_or_else(WorkerId::default_for_process)
}

/// `--dlq table`: the store's dead-letter table.
pub fn dead_letter_table(
    dlq: &Option<args::DlqArg>,
    store: &AnyStore,
) -> Option<Arc<DeadLetterTable>> {
    matches!(dlq, Some(args::DlqArg::Table)).then(|| Arc::new(store.dead_letters()))
}

/// The metrics endpoint while the command runs (`--metrics-addr`), with the
/// stale-lock gauge's watcher; both stop when this is dropped.
pub struct MetricsServer {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves `metrics` on `addr`, if given.
pub async fn serve_metrics(
    addr: Option<SocketAddr>,
    metrics: &Arc<Metrics>,
    store: &AnyStore,
) -> Result<Option<MetricsServer>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    Ok(Some(MetricsServer {
        tasks: vec![
            omnibox::metrics::serve(addr, metrics.clone()).await?,
            metrics.watch_stale_locks(store.clone()),
        ],
    }))
}

/// What runs beside a command's work while it runs: the metrics endpoint
/// (`--metrics-addr`) and the partitions kept ahead; both stop when this
/// is dropped.
pub struct Beside {
    _metrics: Option<MetricsServer>,
    _partitions: Option<Background>,
}

/// Starts what runs beside a command's work: see [`Beside`].
pub async fn beside(
    metrics_addr: Option<SocketAddr>,
    metrics: &Arc<Metrics>,
    store: &AnyStore,
) -> Result<Beside> {
    let metrics = serve_metrics(metrics_addr, metrics, store).await?;
    Ok(Beside {
        _metrics: metrics,
        _partitions: keep_partitions(store).await,
    })
}

/// The progress bar of a run: shown for `--once` on a terminal, unless
/// quiet; otherwise nothing.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar of the events due in `table`, if the run shows one.
    pub async fn of<R: Route>(
        ctx: &Context,
        mode: RunMode,
        table: &impl EventStore<R>,
    ) -> Result<Progress> {
        if mode != RunMode::Once || ctx.quiet || !std::io::stderr().is_terminal() {
            return Ok(Progress(None));
        }
        let bar = ProgressBar::new(table.counts().await?.due_now);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {pos}/{len} events [{elapsed_precise}] {per_sec} {msg}",
            )
            .expect("valid template"),
        );
        Ok(Progress(Some(bar)))
    }

    /// `events` more done; `message`, if any, shown beside.
    pub fn advance(&self, events: u64, message: Option<String>) {
        if let Some(bar) = &self.0 {
            bar.inc(events);
            if let Some(m) = message {
                bar.set_message(m);
            }
        }
    }

    /// The run is over: the bar goes.
    pub fn finish(self) {
        if let Some(bar) = self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Says why a run stopped early, if it did; false when it did.
pub fn stopped_notice(report: &RunReport) -> bool {
    if !report.error {
        return true;
    }
    super::output::notice!(
        "omnibox: error: stopped after {} batch(es): {}",
        report.batches,
        report.stopped_because.as_deref().unwrap_or("unknown error")
    );
    false
}

/// Says that `what` (the broker, the handler) did not answer and `events`
/// were rescheduled without spending an attempt.
pub fn unanswered_notice(what: &str, events: u64, report: &RunReport) {
    let why = report
        .transient_error
        .as_deref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    super::output::notice!(
        "omnibox: error: {what} did not answer{why}; {events} event(s) rescheduled without spending an attempt"
    );
}

/// The one-row table summing up a run of `publish` or `inbox process`:
/// `done` names the completed column, `after_done` and `before_batches`
/// add the command's own counts around the shared ones (retrying, failed,
/// transient), then batches, elapsed time and rate.
pub fn summary_table(
    r: &RunReport,
    done: &str,
    after_done: &[(&str, u64)],
    before_batches: &[(&str, u64)],
) -> comfy_table::Table {
    let mut columns: Vec<(&str, String)> = vec![(done, r.completed.to_string())];
    columns.extend(after_done.iter().map(|(h, n)| (*h, n.to_string())));
    columns.extend([
        ("retrying", r.retrying.to_string()),
        ("failed", r.dead.to_string()),
        ("transient", r.transient.to_string()),
    ]);
    columns.extend(before_batches.iter().map(|(h, n)| (*h, n.to_string())));
    columns.extend([
        ("batches", r.batches.to_string()),
        (
            "elapsed",
            super::output::human_duration(Duration::from_secs_f64(r.elapsed_seconds)),
        ),
        ("events/s", format!("{:.0}", r.events_per_second)),
    ]);
    super::output::row_table(columns)
}
