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

use super::batch::{ClaimedBatch, HandledBatch, NextBatch};
use super::options::BatchReport;
use super::outcome::BatchHandler;
use super::processor::Processor;
use crate::error::Result;
use crate::model::Route;
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
    /// A claim or results write the database has not answered for this
    /// long ends the run with [`Error::Outage`](crate::Error::Outage): its
    /// connection is taken for lost without a reset (a failover that moved
    /// the server's address, a middlebox that dropped its state), which no
    /// error would ever end. Set it well above the connections'
    /// `statement_timeout` (the server answers a slow statement with an
    /// error by then). `None` (the default): wait however long.
    pub stall_limit: Option<Duration>,
}

impl Default for RunOptions {
    /// A `Watch` run idling 10 ms to 1 s between empty claims, with no row limit and
    /// 60 s limits on contention and outages.
    fn default() -> Self {
        RunOptions {
            mode: RunMode::Watch,
            idle_min: Duration::from_millis(10),
            idle_max: Duration::from_secs(1),
            contention_limit: Duration::from_secs(60),
            max_rows: None,
            outage_limit: Duration::from_secs(60),
            stall_limit: None,
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
    /// Counted failures rescheduled by the backoff: the events stay
    /// pending and are tried again (what the summary calls `retrying`).
    pub retrying: u64,
    /// The same as `retrying`, under its first name: kept because the JSON
    /// summary's fields are never renamed. It is not what `status` counts
    /// as failed; that is `dead`.
    pub failed: u64,
    /// Counted failures that reached max_attempts, or were failed at once:
    /// the events are now `failed` (what the summary's table calls
    /// `failed`, as `status` does).
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
    /// Adds one written batch's counts; `retrying` and `failed` both get its counted
    /// failures, and the last transient error is kept.
    fn add(&mut self, b: &BatchReport) {
        self.batches += 1;
        self.claimed += b.claimed as u64;
        self.completed += b.completed as u64;
        self.skipped += b.skipped as u64;
        self.retrying += b.failed as u64;
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

/// Notifications on PostgreSQL, plain sleeps on SQLite.
impl Wakeup for crate::store::AnyWakeup {
    /// Waits for a notification, or `max` at most.
    async fn wait(&mut self, max: Duration) {
        crate::store::AnyWakeup::wait(self, max).await
    }
}

/// Keys pushed to the feed, or a scan due.
impl Wakeup for std::sync::Arc<super::KeyFeed> {
    /// Waits for keys or the next scan, `max` at most.
    async fn wait(&mut self, max: Duration) {
        super::KeyFeed::wait(self, max).await
    }
}

impl Wakeup for Sleep {
    /// Sleeps `max`.
    async fn wait(&mut self, max: Duration) {
        tokio::time::sleep(max).await;
    }
}

/// How long to wait before claiming again after the `streak`-th claim in a
/// row that came back empty while rows were claimable (`None`: claim at
/// once).
///
/// The first time, at once: most often the rows were committed while the
/// claim ran (the idle check after it sees them), and a pause would be
/// added to their latency. At 1,000 events/s this pause was the polling
/// relay's latency tail: insert → published p99 6.9 ms with it, 4.6–5.0 ms
/// without (bench/RESULTS.md). From then on the rows are being taken by
/// other workers (a key another relay works, say): the pause doubles, from
/// 1–2 ms up to 250–500 ms, randomized, so a worker with nothing of its
/// own to do costs little, and it ends on progress.
fn busy_pause(streak: u32) -> Option<Duration> {
    let step = streak.checked_sub(1)?;
    let ceiling = 2u64.saturating_mul(1 << step.min(8)).min(500);
    Some(Duration::from_millis(
        ceiling / 2 + fastrand::u64(0..=ceiling / 2),
    ))
}

/// Runs `processor` until done (see [`RunMode`]) or until `shutdown` turns
/// true. `on_batch` sees every batch (progress bars). Errors of the claim
/// end a `Once` run; a `Watch` run logs them and retries with backoff.
///
/// Up to three batches are in flight, each stage working on its own
/// connection: one being claimed, one being handled (handed to the broker),
/// one being written. The stages run independently: a batch is handled as
/// soon as its claim returns and the handler is free, and written as soon
/// as it is handled and the writer is free, so at a low rate an event waits
/// for one claim, not for three rounds of the slowest stage. Batches are
/// handled and written in claim order (`pipeline/flight.rs` relies on it),
/// and per-key order holds: the rows of the batches in flight stay locked
/// until written, so a claim never takes anything behind them.
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
    W: Wakeup,
{
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;

    let started = Instant::now();
    let mut report = RunReport::default();
    let mut idle = options.idle_min;
    let mut claim_errors = 0u32;
    let mut outage_since: Option<Instant> = None;
    // When the claim in progress began.
    let mut claim_started = Instant::now();
    let mut contended_since: Option<Instant> = None;
    let mut busy_streak = 0u32;
    // Each stage holds at most one future.
    let mut claims = FuturesUnordered::new();
    let mut handles = FuturesUnordered::new();
    let mut writes = FuturesUnordered::new();
    // Claimed, waiting for the handler; handled, waiting for the writer.
    let mut fetched: Option<ClaimedBatch<R>> = None;
    let mut handled: Option<HandledBatch<R>> = None;
    // Rows of batches claimed but not yet written.
    let mut rows_in_flight = 0u64;
    // Whether batches of this worker were in flight while the claim in
    // progress ran (its keys may have been held by them).
    let mut claim_saw_flight = false;
    // The last claim came back empty while batches of this worker were in
    // flight: claim again once they are all written.
    let mut wait_for_flight = false;
    // No claim before this instant (backoff, a pause, contention).
    let mut claim_at: Option<tokio::time::Instant> = None;
    // Nothing to do: wait for a notification (or `idle`) before claiming.
    let mut idling = false;
    // No more claims: write what is in flight, then stop.
    let mut stopping = false;
    let mut shutdown_gone = false;
    // The error the run ends with once what is in flight is written.
    let mut failure: Option<crate::error::Error> = None;
    // The watchdog of calls the database never answers.
    let mut stall_tick = tokio::time::interval(Duration::from_secs(1));
    stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut finish = |report: &mut RunReport, batch: BatchReport| {
        report.add(&batch);
        on_batch(&batch);
    };
    loop {
        // Move batches on, in claim order: a stage takes the next batch
        // when it is free and the slot after it is empty.
        if writes.is_empty()
            && let Some(h) = handled.take()
        {
            writes.push(processor.finish(h));
        }
        if handles.is_empty()
            && handled.is_none()
            && let Some(f) = fetched.take()
        {
            handles.push(processor.handle(f));
        }
        let batches = claims.len()
            + usize::from(fetched.is_some())
            + handles.len()
            + usize::from(handled.is_some())
            + writes.len();
        if !stopping && *shutdown.borrow() {
            report.stopped_because = Some("shutdown requested".into());
            stopping = true;
        }
        if !stopping
            && let Some(max) = options.max_rows
            && report.claimed + rows_in_flight >= max
        {
            report.stopped_because = Some(format!("--limit {max} reached"));
            stopping = true;
        }
        if wait_for_flight && batches == 0 {
            wait_for_flight = false;
        }
        let may_claim = !stopping
            && claims.is_empty()
            && fetched.is_none()
            && batches < 3
            && !wait_for_flight
            && !idling
            && claim_at.is_none_or(|t| t <= tokio::time::Instant::now());
        if may_claim {
            if let Some(pause) = processor.pause() {
                // Downstream is out: write what is in hand, claim nothing new.
                if batches == 0 {
                    if options.mode == RunMode::Once {
                        report.stopped_because =
                            Some("the broker or handler did not answer".into());
                        stopping = true;
                    } else {
                        // The processor warned once when the outage began.
                        tracing::debug!(
                            pause_ms = pause.as_millis() as u64,
                            "downstream still not answering; pausing before the next claim"
                        );
                        claim_at = Some(tokio::time::Instant::now() + pause);
                    }
                }
            } else {
                claim_saw_flight = batches > 0;
                claim_at = None;
                claim_started = Instant::now();
                claims.push(processor.fetch());
            }
        }
        if stopping && batches == 0 {
            break;
        }
        let idle_wait = idle;
        let claim_timer = claim_at;
        tokio::select! {
            Some(next) = claims.next(), if !claims.is_empty() => {
                if next.is_ok()
                    && let Some(since) = outage_since.take()
                {
                    tracing::warn!(
                        down_for_ms = since.elapsed().as_millis() as u64,
                        "the database is back; claiming again"
                    );
                }
                let in_flight = claim_saw_flight
                    || handles.len() + writes.len() > 0
                    || fetched.is_some()
                    || handled.is_some();
                match next {
                    Err(e) if e.is_outage() => {
                        // Measured from the first failed claim's start: the
                        // pool waits for a connection before it gives up.
                        let since = *outage_since.get_or_insert_with(|| {
                            tracing::warn!(
                                error = %e,
                                "the database cannot be reached; retrying until it is back (logged once per outage; rows in flight are written when it is, or retaken after their lease)"
                            );
                            claim_started
                        });
                        if options.mode == RunMode::Once && since.elapsed() >= options.outage_limit {
                            failure = Some(crate::error::Error::Outage(format!(
                                "the database was unreachable for {}s (--outage-limit): {e}",
                                since.elapsed().as_secs()
                            )));
                            stopping = true;
                        } else {
                            claim_errors += 1;
                            let wait = Duration::from_millis(100 * 2u64.pow(claim_errors.min(6)))
                                .min(Duration::from_secs(5));
                            claim_at = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                    Ok(NextBatch::Batch(f)) => {
                        claim_errors = 0;
                        idle = options.idle_min;
                        contended_since = None;
                        busy_streak = 0;
                        rows_in_flight += f.len() as u64;
                        fetched = Some(*f);
                    }
                    // The claim ran while batches of this worker were in
                    // flight, so it may have found their keys held: claim
                    // again once they are written, before calling it idle.
                    Ok(NextBatch::Empty { .. }) if in_flight => {
                        claim_errors = 0;
                        wait_for_flight = true;
                    }
                    // A fed processor (the WAL relay) with nothing to walk
                    // and no scan due, or a scan that found nothing: idle
                    // until keys are pushed or the next scan is due (the
                    // feed's wake-up). Asking whether rows are claimable
                    // would see rows the stream has not delivered yet, and
                    // back off past their arrival.
                    Ok(NextBatch::Empty {
                        contended: false,
                        more: false,
                    }) if processor.feed.is_some() && options.mode == RunMode::Watch => {
                        claim_errors = 0;
                        contended_since = None;
                        idling = true;
                    }
                    // Every row the claim examined was held: go on scanning
                    // at once, unless (Once) nothing claimable is left
                    // anywhere, which is cheaper to ask than to scan the
                    // rest of a held backlog.
                    Ok(NextBatch::Empty { more: true, .. }) => {
                        claim_errors = 0;
                        if options.mode == RunMode::Once && !claimable(processor, options).await {
                            stopping = true;
                        }
                    }
                    Ok(NextBatch::Empty { contended, .. }) => {
                        claim_errors = 0;
                        // Empty because another worker was claiming the same
                        // rows at that moment, or because nothing is there?
                        // Only the latter is idle (and ends a Once run). A
                        // failing check counts as "busy": the next claim
                        // retries and reports the database's error if it
                        // persists.
                        let busy = contended || claimable(processor, options).await;
                        if busy {
                            let since = *contended_since.get_or_insert_with(Instant::now);
                            if options.mode == RunMode::Once
                                && since.elapsed() > options.contention_limit
                            {
                                report.stopped_because = Some(format!(
                                    "rows were due but every claim for {:?} came back empty (other workers kept taking them first)",
                                    options.contention_limit
                                ));
                                report.error = true;
                                stopping = true;
                            } else {
                                // Back off while other workers keep taking
                                // the rows first (one key worked by another
                                // relay, say), from the second empty claim
                                // on (see `busy_pause`).
                                claim_at = busy_pause(busy_streak)
                                    .map(|pause| tokio::time::Instant::now() + pause);
                                busy_streak = busy_streak.saturating_add(1);
                            }
                        } else {
                            contended_since = None;
                            busy_streak = 0;
                            if options.mode == RunMode::Once {
                                stopping = true;
                            } else {
                                idling = true;
                            }
                        }
                    }
                    Err(e) if options.mode == RunMode::Watch && !e.is_input_error() => {
                        claim_errors += 1;
                        let wait = Duration::from_millis(200 * 2u64.pow(claim_errors.min(6)))
                            .min(Duration::from_secs(10));
                        tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "claim failed");
                        claim_at = Some(tokio::time::Instant::now() + wait);
                    }
                    Err(e) => {
                        failure = Some(e);
                        stopping = true;
                    }
                }
            }
            Some(h) = handles.next(), if !handles.is_empty() => {
                handled = Some(h);
            }
            Some(b) = writes.next(), if !writes.is_empty() => {
                rows_in_flight = rows_in_flight.saturating_sub(b.claimed as u64);
                finish(&mut report, b);
            }
            () = wakeup.wait(idle_wait), if idling && !stopping => {
                idling = false;
                idle = (idle * 2).min(options.idle_max);
            }
            () = tokio::time::sleep_until(claim_timer.unwrap_or_else(tokio::time::Instant::now)),
                if claim_timer.is_some() && claims.is_empty() && !stopping => {
                claim_at = None;
            }
            _ = stall_tick.tick(), if options.stall_limit.is_some() => {
                if let Some(limit) = options.stall_limit
                    && let Some(why) = processor.calls.stalled(limit)
                {
                    failure = Some(crate::error::Error::Outage(format!(
                        "{why}; {}",
                        super::stall::STOPPING
                    )));
                    break;
                }
            }
            changed = shutdown.changed(), if !stopping && !shutdown_gone => {
                // The sender is gone: no shutdown will come (do not spin on it).
                shutdown_gone = changed.is_err();
            }
            // Unreachable: when nothing is in flight a claim, a timer or the
            // idle wait is always armed.
            else => break,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    report.elapsed_seconds = elapsed;
    report.events_per_second = if elapsed > 0.0 {
        report.completed as f64 / elapsed
    } else {
        0.0
    };
    match failure {
        Some(e @ crate::error::Error::Outage(_)) => Err(e),
        // The claim failed before anything was done: the error is the result.
        Some(e) if report.batches == 0 => Err(e),
        // Work was done before the failure: report it, and the error.
        Some(e) => {
            report.stopped_because = Some(format!("the claim failed: {e}"));
            report.error = true;
            Ok(report)
        }
        None => Ok(report),
    }
}

/// Whether rows are claimable (a failed check says yes: the next claim
/// retries and reports the database's error if it persists). Bounded by
/// the stall limit: a check on a lost connection says yes too, and the
/// next claim meets the watchdog.
async fn claimable<R, S, H>(processor: &Processor<R, S, H>, options: &RunOptions) -> bool
where
    R: Route,
    S: EventStore<R>,
    H: BatchHandler<R>,
{
    let check = processor
        .store()
        .claimable_exists_for(&processor.options().filters);
    match options.stall_limit {
        Some(limit) => tokio::time::timeout(limit, check)
            .await
            .unwrap_or(Ok(true))
            .unwrap_or(true),
        None => check.await.unwrap_or(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_busy_claim_is_retried_at_once_then_backs_off() {
        assert_eq!(busy_pause(0), None, "the first retry waits for nothing");
        for (streak, lo, hi) in [
            (1, 1, 2),
            (2, 2, 4),
            (3, 4, 8),
            (8, 128, 256),
            (9, 250, 500),
        ] {
            for _ in 0..50 {
                let p = busy_pause(streak).unwrap();
                assert!(
                    p >= Duration::from_millis(lo) && p <= Duration::from_millis(hi),
                    "streak {streak}: {p:?}"
                );
            }
        }
        // Capped, also for a streak that runs very long.
        assert!(busy_pause(u32::MAX).unwrap() <= Duration::from_millis(500));
    }
}
