//! The loop around a [`Processor`]: claim batches until nothing is due
//! (`Once`) or forever (`Watch`), idle with backoff (woken early by
//! PostgreSQL notifications), pause while the circuit is open, and stop
//! cleanly on shutdown: the batch in hand is finished and written, never
//! abandoned with rows locked.
//!
//! `Once` ends when nothing due is left that this worker could take: an
//! empty claim ends it only when it was not contended and the store finds
//! no claimable row ([`EventStore::claimable_exists`]). A claim emptied by
//! another worker claiming the same rows at that moment is retried after a
//! short pause; rows held by a live lease are that worker's to finish.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::processor::{BatchHandler, BatchReport, DeadLetter, Fetch, Fetched, Handled, Processor};
use crate::error::Result;
use crate::model::{Event, Route};
use crate::store::EventStore;

/// When the loop ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Drain what is due, then return (jobs, cron).
    Once,
    /// Run until shutdown.
    Watch,
}

/// Settings of [`run`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Once or watch.
    pub mode: RunMode,
    /// First idle wait after an empty claim.
    pub idle_min: Duration,
    /// Longest idle wait (also the polling interval when notifications are on).
    pub idle_max: Duration,
    /// `Once`: how long claims may keep coming back empty while rows that
    /// could be claimed are there (other workers taking them first) before
    /// the run gives up and says so.
    pub contention_limit: Duration,
    /// Stop claiming once this many rows were claimed (whole batches; the
    /// batch in hand is finished). `None`: no limit.
    pub max_rows: Option<u64>,
    /// `Once`: how long the database may stay unreachable (claims failing
    /// for want of a connection) before the run gives up with an error. A
    /// `Watch` run waits for it however long, with one warning per outage.
    pub outage_limit: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            mode: RunMode::Watch,
            idle_min: Duration::from_millis(10),
            idle_max: Duration::from_secs(1),
            contention_limit: Duration::from_secs(60),
            max_rows: None,
            outage_limit: Duration::from_secs(60),
        }
    }
}

/// Totals of a run; `--format json` shape of `publish` and `inbox process`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    /// Batches claimed.
    pub batches: u64,
    /// Rows claimed.
    pub claimed: u64,
    /// Completed (published or processed).
    pub completed: u64,
    /// Skipped by a handler (completed, not processed).
    pub skipped: u64,
    /// Counted failures rescheduled by the backoff.
    pub failed: u64,
    /// Counted failures that reached max_attempts (now `failed`).
    pub dead: u64,
    /// Dead letters written to the DLQ topic.
    pub dead_lettered: u64,
    /// Transient failures (no attempt spent).
    pub transient: u64,
    /// Of those, events whose own destination (topic) was unavailable.
    pub unavailable: u64,
    /// Released untried.
    pub released: u64,
    /// Rows whose lease was lost before their result was written.
    pub lease_lost: u64,
    /// Batches whose results could not be written (rows left to lease expiry).
    pub commit_errors: u64,
    /// Seconds the run took.
    pub elapsed_seconds: f64,
    /// Completed events per second.
    pub events_per_second: f64,
    /// Why the run stopped early, if it did.
    pub stopped_because: Option<String>,
    /// The run stopped on an error after it had started working (the
    /// database failed mid-way): `stopped_because` says which.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub error: bool,
    /// The last transient failure's error (why downstream did not take a
    /// batch), when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transient_error: Option<String>,
}

impl RunReport {
    fn add(&mut self, b: &BatchReport) {
        self.batches += 1;
        self.claimed += b.claimed as u64;
        self.completed += b.completed as u64;
        self.skipped += b.skipped as u64;
        self.failed += b.failed as u64;
        self.dead += b.dead as u64;
        self.dead_lettered += b.dead_lettered as u64;
        self.transient += b.transient as u64;
        self.unavailable += b.unavailable as u64;
        self.released += b.released as u64;
        self.lease_lost += b.lease_lost as u64;
        self.commit_errors += u64::from(b.commit_error.is_some());
        if let Some(e) = &b.transient_error {
            self.transient_error = Some(e.clone());
        }
    }
}

/// Something that can wake an idle loop early (PostgreSQL LISTEN/NOTIFY).
pub trait Wakeup: Send {
    /// Resolves when new rows may be there, or after `max`.
    fn wait(&mut self, max: Duration) -> impl Future<Output = ()> + Send;
}

/// A [`Wakeup`] that only sleeps.
#[derive(Debug, Default)]
pub struct Sleep;

impl Wakeup for Sleep {
    async fn wait(&mut self, max: Duration) {
        tokio::time::sleep(max).await;
    }
}

/// Runs `processor` until done (see [`RunMode`]) or until `shutdown` turns
/// true. `on_batch` sees every batch (progress bars). Errors of the claim
/// end a `Once` run; a `Watch` run logs them and retries with backoff.
pub async fn run<R, S, H, W>(
    processor: &Processor<R, S, H>,
    options: &RunOptions,
    mut shutdown: watch::Receiver<bool>,
    wakeup: &mut W,
    mut on_batch: impl FnMut(&BatchReport),
) -> Result<RunReport>
where
    R: Route,
    S: EventStore<R>,
    H: BatchHandler<R>,
    Event<R>: DeadLetter,
    W: Wakeup,
{
    let started = Instant::now();
    let mut report = RunReport::default();
    let mut idle = options.idle_min;
    let mut claim_errors = 0u32;
    let mut outage_since: Option<Instant> = None;
    let mut contended_since: Option<Instant> = None;
    let mut busy_streak = 0u32;
    // Up to three batches in flight (see the loop): claimed, handled, written.
    let mut fetched: Option<Fetched<R>> = None;
    let mut handled: Option<Handled<R>> = None;
    // The last claim came back empty while batches of this worker were in
    // flight (its keys may be held by them): claim again once they are done.
    let mut wait_for_flight = false;
    let mut finish = |report: &mut RunReport, batch: BatchReport| {
        report.add(&batch);
        on_batch(&batch);
    };
    loop {
        if *shutdown.borrow() {
            report.stopped_because = Some("shutdown requested".into());
            break;
        }
        if let Some(max) = options.max_rows {
            let claimed = report.claimed
                + fetched.as_ref().map_or(0, |f| f.len() as u64)
                + handled.as_ref().map_or(0, |h| h.len() as u64);
            if claimed >= max {
                report.stopped_because = Some(format!("--limit {max} reached"));
                break;
            }
        }
        if let Some(pause) = processor.pause() {
            // Downstream is out: write what is in hand, claim nothing new.
            if fetched.is_some() || handled.is_some() {
                drain(
                    processor,
                    &mut fetched,
                    &mut handled,
                    &mut report,
                    &mut finish,
                )
                .await;
                continue;
            }
            if options.mode == RunMode::Once {
                report.stopped_because = Some("the broker or handler did not answer".into());
                break;
            }
            // The processor warned once when the outage began.
            tracing::debug!(
                pause_ms = pause.as_millis() as u64,
                "downstream still not answering; pausing before the next claim"
            );
            wait_or_shutdown(&mut shutdown, pause).await;
            continue;
        }
        let in_flight = fetched.is_some() || handled.is_some();
        if wait_for_flight && in_flight {
            // Move the batches in flight on without claiming.
            let to_handle = fetched.take();
            let to_write = handled.take();
            let (newly_handled, written) = tokio::join!(
                async {
                    match to_handle {
                        Some(f) => Some(processor.handle(f).await),
                        None => None,
                    }
                },
                async {
                    match to_write {
                        Some(h) => Some(processor.finish(h).await),
                        None => None,
                    }
                }
            );
            if let Some(b) = written {
                finish(&mut report, b);
            }
            handled = newly_handled;
            continue;
        }
        wait_for_flight = false;
        // Up to three batches in flight: claim the next, handle the one
        // claimed before, write the one before that (each stage on its own
        // connection), so a slow broker and the claim overlap. Per-key order
        // holds: the rows of the batches in flight stay locked until
        // written, so a claim never takes anything behind them.
        let to_handle = fetched.take();
        let to_write = handled.take();
        let (next, newly_handled, written) = tokio::join!(
            processor.fetch(),
            async {
                match to_handle {
                    Some(f) => Some(processor.handle(f).await),
                    None => None,
                }
            },
            async {
                match to_write {
                    Some(h) => Some(processor.finish(h).await),
                    None => None,
                }
            }
        );
        if let Some(b) = written {
            finish(&mut report, b);
        }
        handled = newly_handled;
        if next.is_ok()
            && let Some(since) = outage_since.take()
        {
            tracing::warn!(
                down_for_ms = since.elapsed().as_millis() as u64,
                "the database is back; claiming again"
            );
        }
        match next {
            Err(e) if e.is_outage() => {
                let since = *outage_since.get_or_insert_with(|| {
                    tracing::warn!(
                        error = %e,
                        "the database cannot be reached; retrying until it is back (logged once per outage; rows in flight are written when it is, or retaken after their lease)"
                    );
                    Instant::now()
                });
                if options.mode == RunMode::Once && since.elapsed() >= options.outage_limit {
                    drain(
                        processor,
                        &mut fetched,
                        &mut handled,
                        &mut report,
                        &mut finish,
                    )
                    .await;
                    return Err(crate::Error::Outage(format!(
                        "the database was unreachable for {}s (--outage-limit): {e}",
                        since.elapsed().as_secs()
                    )));
                }
                claim_errors += 1;
                let wait = Duration::from_millis(100 * 2u64.pow(claim_errors.min(6)))
                    .min(Duration::from_secs(5));
                wait_or_shutdown(&mut shutdown, wait).await;
            }
            Ok(Fetch::Batch(f)) => {
                claim_errors = 0;
                idle = options.idle_min;
                contended_since = None;
                busy_streak = 0;
                fetched = Some(f);
            }
            // The claim ran while batches of this worker were in flight, so
            // it may have found their keys held: claim again once they are
            // written, before calling it idle.
            Ok(Fetch::Empty { .. }) if in_flight || handled.is_some() => {
                claim_errors = 0;
                wait_for_flight = true;
            }
            // Every row the claim examined was held: go on scanning at once,
            // unless (Once) nothing claimable is left anywhere, which is
            // cheaper to ask than to scan the rest of a held backlog.
            Ok(Fetch::Empty { more: true, .. }) => {
                claim_errors = 0;
                if options.mode == RunMode::Once
                    && !processor
                        .store()
                        .claimable_exists_for(&processor.options().filters)
                        .await
                        .unwrap_or(true)
                {
                    break;
                }
            }
            Ok(Fetch::Empty { contended, .. }) => {
                claim_errors = 0;
                // Empty because another worker was claiming the same rows at
                // that moment, or because nothing is there? Only the latter
                // is idle (and ends a Once run). A failing check counts as
                // "busy": the next claim retries and reports the database's
                // error if it persists.
                let busy = contended
                    || processor
                        .store()
                        .claimable_exists_for(&processor.options().filters)
                        .await
                        .unwrap_or(true);
                if busy {
                    let since = *contended_since.get_or_insert_with(Instant::now);
                    if options.mode == RunMode::Once && since.elapsed() > options.contention_limit {
                        report.stopped_because = Some(format!(
                            "rows were due but every claim for {:?} came back empty (other workers kept taking them first)",
                            options.contention_limit
                        ));
                        report.error = true;
                        break;
                    }
                    // Back off while other workers keep taking the rows
                    // first (one key worked by another relay, say): the
                    // pause doubles, so a worker with nothing of its own to
                    // do costs little, and it ends on progress.
                    let ceiling = 2u64.saturating_mul(1 << busy_streak.min(8)).min(500);
                    busy_streak += 1;
                    let pause = Duration::from_millis(ceiling / 2 + fastrand::u64(0..=ceiling / 2));
                    wait_or_shutdown(&mut shutdown, pause).await;
                    continue;
                }
                contended_since = None;
                if options.mode == RunMode::Once {
                    break;
                }
                tokio::select! {
                    _ = wakeup.wait(idle) => {}
                    _ = shutdown.changed() => {}
                }
                idle = (idle * 2).min(options.idle_max);
            }
            Err(e) if options.mode == RunMode::Watch && !e.is_input_error() => {
                claim_errors += 1;
                let wait = Duration::from_millis(200 * 2u64.pow(claim_errors.min(6)))
                    .min(Duration::from_secs(10));
                tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "claim failed");
                wait_or_shutdown(&mut shutdown, wait).await;
            }
            Err(e) => {
                drain(
                    processor,
                    &mut fetched,
                    &mut handled,
                    &mut report,
                    &mut finish,
                )
                .await;
                if report.batches == 0 {
                    return Err(e);
                }
                // Work was done before the failure: report it, and the error.
                report.stopped_because = Some(format!("the claim failed: {e}"));
                report.error = true;
                break;
            }
        }
    }
    // Never leave a claimed or handled batch unwritten.
    drain(
        processor,
        &mut fetched,
        &mut handled,
        &mut report,
        &mut finish,
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    report.elapsed_seconds = elapsed;
    report.events_per_second = if elapsed > 0.0 {
        report.completed as f64 / elapsed
    } else {
        0.0
    };
    Ok(report)
}

/// Handles and writes whatever is in flight.
async fn drain<R, S, H>(
    processor: &Processor<R, S, H>,
    fetched: &mut Option<Fetched<R>>,
    handled: &mut Option<Handled<R>>,
    report: &mut RunReport,
    finish: &mut impl FnMut(&mut RunReport, BatchReport),
) where
    R: Route,
    S: EventStore<R>,
    H: BatchHandler<R>,
    Event<R>: DeadLetter,
{
    if let Some(h) = handled.take() {
        let b = processor.finish(h).await;
        finish(report, b);
    }
    if let Some(f) = fetched.take() {
        let h = processor.handle(f).await;
        let b = processor.finish(h).await;
        finish(report, b);
    }
}

async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
}
