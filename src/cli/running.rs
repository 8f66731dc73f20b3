//! The wiring `publish`, `inbox process` and `inbox consume` share: the
//! processor's settings, the dead-letter table, the metrics endpoint, the
//! run mode, the progress bar and the notices after a run.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use omnibox::WorkerId;
use omnibox::metrics::Metrics;
use omnibox::pipeline::{ProcessorOptions, RunMode, RunReport};
use omnibox::store::AnyStore;
use omnibox::store::dead_letters::DeadLetterTable;

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

/// A processor's settings from the common flags: the batch, its byte
/// budget (the settings' default), the lease, and a commit retried for
/// half the lease.
pub fn processor_options(
    ctx: &Context,
    worker: WorkerId,
    batch: u32,
    batch_bytes: Option<u64>,
    lease: Duration,
) -> ProcessorOptions {
    let mut options = ProcessorOptions::new(worker);
    options.batch = batch;
    options.batch_bytes = Some(batch_bytes.unwrap_or(ctx.settings.batch_bytes));
    options.lease = lease;
    options.commit_retry_for = lease / 2;
    options
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

/// Whether a run shows a progress bar: `--once`, on a terminal, not quiet.
pub fn shows_progress(ctx: &Context, mode: RunMode) -> bool {
    mode == RunMode::Once && !ctx.quiet && std::io::stderr().is_terminal()
}

/// A progress bar of `due` events.
pub fn progress_bar(due: u64) -> ProgressBar {
    let bar = ProgressBar::new(due);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {pos}/{len} events [{elapsed_precise}] {per_sec} {msg}",
        )
        .expect("valid template"),
    );
    bar
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
