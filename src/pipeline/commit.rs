//! Writing a batch's results: completions, failures and releases in bulk,
//! each statement guarded by the claim's token and retried while the
//! database fails; then dead letters and metrics.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::dead_letter::{Letter, put_dead_letters};
use super::options::{BatchIds, BatchReport};
use super::outcome::lock;
use super::outcome::{BatchHandler, Outcome};
use super::processor::Processor;
use super::recorder::EventOutcome;
use crate::domain::Retry;
use crate::error::{Error, Result};
use crate::model::{Event, Route, time};
use crate::store::{Claim, EventStore, Failure, RetryAt};

/// How a guarded write ended.
pub(super) enum Written<T> {
    Done(T),
    /// The lease of these rows was lost; the rest was written.
    Lost(Vec<Uuid>),
    /// An attempt whose answer was lost had already written every row (the
    /// retry found none of them held any more): done, nothing to report.
    ByALostAttempt,
    /// The database kept failing.
    Failed,
}

impl<R, S, H> Processor<R, S, H>
where
    R: Route,
    S: EventStore<R>,
    H: BatchHandler<R>,
{
    /// Writes the outcomes: completions, failures, releases, each one bulk
    /// statement guarded by the claim's token, retried while the database
    /// fails.
    pub(super) async fn commit(&self, claim: &Claim<R>, outcomes: &[Outcome]) -> BatchReport {
        let mut report = BatchReport {
            claimed: claim.events.len(),
            ..BatchReport::default()
        };
        // Rows to complete now: completed or skipped (a `Committed` row was
        // completed in its handler's transaction).
        let mut done = Vec::new();
        // Completed by the handler or written by it, in claim order.
        let mut completed = Vec::new();
        let mut skipped = Vec::new();
        let mut released = Vec::new();
        let mut failures = Vec::new();
        let mut errors: HashMap<Uuid, String> = HashMap::new();
        // Events that failed (a handler or the broker said no, or asked for
        // a retry) and may stay pending: warned about once written.
        let mut retrying: HashSet<Uuid> = HashSet::new();
        for (event, outcome) in claim.events.iter().zip(outcomes) {
            if matches!(outcome, Outcome::Completed | Outcome::Skipped) {
                done.push(event.id());
            }
            match outcome {
                Outcome::Completed | Outcome::Committed => {
                    report.completed += 1;
                    completed.push(event.id());
                }
                Outcome::Skipped => {
                    report.skipped += 1;
                    skipped.push(event.id());
                }
                Outcome::Released => {
                    report.released += 1;
                    released.push(event.id());
                }
                Outcome::Unavailable { error, retry_after } => {
                    report.transient += 1;
                    report.unavailable += 1;
                    errors.insert(event.id(), crate::redact::text(error));
                    failures.push(Failure::transient(event.id(), error.clone(), *retry_after));
                }
                Outcome::Dead { error } => {
                    errors.insert(event.id(), crate::redact::text(error));
                    failures.push(Failure::dead(event.id(), error.clone()));
                }
                Outcome::Failed { error, retry } => {
                    let retry_at = match retry {
                        Retry::Counted(Some(at)) | Retry::NotCounted(at) => RetryAt::At(*at),
                        Retry::NotCountedAfter(d) => RetryAt::After(*d),
                        Retry::Counted(None) => {
                            RetryAt::After(self.options.backoff.delay(event.attempts_made()))
                        }
                    };
                    let counted = retry.is_counted();
                    if !counted {
                        report.transient += 1;
                        if report.transient_error.is_none() {
                            report.transient_error = Some(crate::redact::text(error));
                        }
                    }
                    errors.insert(event.id(), crate::redact::text(error));
                    retrying.insert(event.id());
                    failures.push(Failure {
                        id: event.id(),
                        error: error.clone(),
                        counted,
                        retry: retry_at,
                        dead: false,
                    });
                }
            }
        }
        let token = &claim.token;
        // Failures first: a row that is failed now because a later row of
        // its key was acknowledged must be failed before that later row is
        // completed (and its key freed), or another relay could take it.
        let mut dead = Vec::new();
        let mut lost: HashSet<Uuid> = HashSet::new();
        if !failures.is_empty() {
            let counted = failures.iter().filter(|f| f.counted).count();
            let mut unwritten: Option<Vec<Uuid>> = None;
            match self
                .write(&mut report, "fail", || self.store.fail(token, &failures))
                .await
            {
                Written::Done(r) => dead = r.failed,
                Written::ByALostAttempt => {
                    // The report of the attempt that wrote them was lost:
                    // read back which rows are failed now.
                    for f in failures.iter().filter(|f| f.counted) {
                        if let Ok(Some(row)) = super::stall::watched(
                            &self.calls,
                            "a results read-back",
                            self.store.get(f.id),
                        )
                        .await
                            && row.status() == crate::model::EventStatus::Failed
                        {
                            dead.push(f.id);
                        }
                    }
                }
                Written::Lost(lost) => {
                    let lost_counted = failures
                        .iter()
                        .filter(|f| f.counted && lost.contains(&f.id))
                        .count();
                    report.transient -= lost.len() - lost_counted;
                    tracing::warn!(
                        "some failures were written without a dead-letter report; check `omnibox list --status failed`"
                    );
                    unwritten = Some(lost);
                }
                Written::Failed => unwritten = Some(failures.iter().map(|f| f.id).collect()),
            }
            report.dead = dead.len();
            report.failed = counted.saturating_sub(report.dead);
            if let Some(u) = &unwritten
                && report.commit_error.is_none()
            {
                lost.extend(u.iter().copied());
                report.failed = failures
                    .iter()
                    .filter(|f| f.counted && !dead.contains(&f.id) && !lost.contains(&f.id))
                    .count();
            }
            // A batch downstream did not take at all has its one warning
            // per outage (see `finish`); other failures that leave their
            // event pending are warned about here, throttled.
            let outage = report.all_transient();
            for f in &failures {
                if !retrying.contains(&f.id)
                    || dead.contains(&f.id)
                    || unwritten.as_ref().is_some_and(|u| u.contains(&f.id))
                    || (outage && !f.counted)
                {
                    continue;
                }
                if let Some(e) = claim.events.iter().find(|e| e.id() == f.id) {
                    let error = errors.get(&f.id).map(String::as_str).unwrap_or("");
                    self.warn_retrying(e, f, error);
                }
            }
            for id in &dead {
                let Some(e) = claim.events.iter().find(|e| e.id() == *id) else {
                    continue;
                };
                let (topic, key) = e.order_key().unwrap_or(("", ""));
                tracing::error!(
                    table = %R::TABLE,
                    id = %id,
                    event_type = e.event_type(),
                    topic,
                    key,
                    attempts = e.attempts_made() + 1,
                    error = %crate::redact::text(errors.get(id).map(String::as_str).unwrap_or("")),
                    "event failed for good: it is now `failed`{}; fix the cause, then `omnibox replay --id {id}`",
                    if self.dlq.is_empty() { "" } else { " and dead-lettered" }
                );
            }
        }
        if let Written::Lost(gone) = self
            .write(&mut report, "complete", || {
                self.store.complete(token, &done)
            })
            .await
        {
            let lost_skipped = gone.iter().filter(|id| skipped.contains(id)).count();
            report.skipped -= lost_skipped;
            report.completed -= gone.len() - lost_skipped;
            lost.extend(gone);
        }
        if let Written::Lost(gone) = self
            .write(&mut report, "release", || {
                self.store.release(token, &released)
            })
            .await
        {
            report.released -= gone.len().min(report.released);
            lost.extend(gone);
        }
        if !dead.is_empty() {
            self.dead_letter(claim, &dead, &errors, &mut report).await;
        }
        let kept = |ids: Vec<Uuid>| -> Vec<Uuid> {
            ids.into_iter().filter(|id| !lost.contains(id)).collect()
        };
        let (counted, transient): (Vec<&Failure>, Vec<&Failure>) =
            failures.iter().partition(|f| f.counted);
        let dead_set: HashSet<Uuid> = dead.iter().copied().collect();
        let alive = |list: &[&Failure]| -> Vec<Uuid> {
            list.iter()
                .map(|f| f.id)
                .filter(|id| !dead_set.contains(id))
                .collect()
        };
        report.ids = BatchIds {
            completed: kept(completed),
            skipped: kept(skipped),
            failed: kept(alive(&counted)),
            transient: kept(alive(&transient)),
            dead,
            released: kept(released),
            lease_lost: claim
                .events
                .iter()
                .map(|e| e.id())
                .filter(|id| lost.contains(id))
                .collect(),
        };
        report
    }

    /// Logs a failure that leaves its event pending, at most once per
    /// [`Throttle::EVERY`](super::throttle::Throttle::EVERY), the next
    /// warning saying how many were left out (the rest at debug level).
    fn warn_retrying(&self, e: &Event<R>, f: &Failure, error: &str) {
        let Some(suppressed) = lock(&self.warnings).allow() else {
            tracing::debug!(table = %R::TABLE, id = %e.id(), error = %error, "event failed again");
            return;
        };
        let retry_in_ms = match f.retry {
            RetryAt::After(d) => d.as_millis() as u64,
            RetryAt::At(t) => (t - time::now()).to_std().unwrap_or_default().as_millis() as u64,
        };
        if f.counted {
            tracing::warn!(
                table = %R::TABLE,
                id = %e.id(),
                event_type = e.event_type(),
                attempt = e.attempts_made() + 1,
                max_attempts = e.max_attempts(),
                retry_in_ms,
                suppressed,
                error = %error,
                "event failed; it stays pending and is tried again after its backoff \
                 (once the cause is fixed, `omnibox replay --pending --id {}` tries it now)",
                e.id()
            );
        } else {
            tracing::warn!(
                table = %R::TABLE,
                id = %e.id(),
                event_type = e.event_type(),
                retry_in_ms,
                suppressed,
                error = %error,
                "event not taken, no attempt spent; it stays pending and is tried again shortly"
            );
        }
    }

    /// A batch whose lease ran out before it was sent: its rows go back to
    /// pending where this claim still holds them; rows another worker took
    /// meanwhile (and perhaps completed) are its business, not a lost lease
    /// to warn about.
    pub(super) async fn give_back(&self, claim: &Claim<R>) -> BatchReport {
        let ids: Vec<Uuid> = claim.events.iter().map(|e| e.id()).collect();
        let mut report = BatchReport {
            claimed: ids.len(),
            released: ids.len(),
            ..BatchReport::default()
        };
        report.ids.released = ids.clone();
        match super::stall::watched(
            &self.calls,
            "a results write",
            self.store.release(&claim.token, &ids),
        )
        .await
        {
            Ok(_) => {}
            Err(Error::ConcurrentUpdate { missing, .. }) => {
                tracing::debug!(
                    rows = missing.len(),
                    "rows of the dropped batch were taken by another worker meanwhile"
                );
                report.released -= missing.len().min(report.released);
                report.lease_lost += missing.len();
                report.ids.released.retain(|id| !missing.contains(id));
                report.ids.lease_lost = missing;
            }
            Err(e) => tracing::warn!(
                error = %e,
                "could not give back the rows of the dropped batch; their lease has run out, so other workers take them anyway"
            ),
        }
        report
    }

    /// Runs one guarded write with retries while the database fails.
    ///
    /// A write is one statement, so it applies to all its rows or to none.
    /// When an attempt fails without an answer (the connection dropped, say)
    /// it may still have been applied; if the retry then finds that none of
    /// the rows is held by this claim any more, the earlier attempt wrote
    /// them, and that is not a lost lease.
    async fn write<T, F, Fut>(&self, report: &mut BatchReport, what: &str, mut op: F) -> Written<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let started = Instant::now();
        let deadline = crate::model::time::instant_after(self.options.commit_retry_for);
        let mut wait = Duration::from_millis(100);
        let mut unanswered = false;
        loop {
            let call = self.calls.begin("a results write");
            let result = op().await;
            drop(call);
            match result {
                Ok(v) => return Written::Done(v),
                Err(Error::ConcurrentUpdate {
                    expected,
                    actual: 0,
                    ..
                }) if unanswered && expected > 0 => {
                    tracing::debug!(
                        "{what}: an earlier attempt whose answer was lost had written the rows"
                    );
                    return Written::ByALostAttempt;
                }
                Err(Error::ConcurrentUpdate { missing, .. }) => {
                    tracing::warn!(
                        rows = missing.len(),
                        ids = ?missing.iter().take(10).collect::<Vec<_>>(),
                        "{what}: the lease of these rows was lost (another worker or an operator took them); \
                         they will be handled again"
                    );
                    report.lease_lost += missing.len();
                    return Written::Lost(missing);
                }
                Err(e) if Instant::now() + wait < deadline => {
                    // Said once per write (an outage fails every attempt
                    // alike); the attempts after it are at debug level.
                    if unanswered {
                        tracing::debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what}: cannot write the results; retrying");
                    } else {
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what}: cannot write the results; retrying (logged once for this write)");
                    }
                    unanswered = true;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    let msg = format!(
                        "{what}: cannot write the results after retrying for {}s: {e}; the batch's rows stay locked by {} \
                         until their lease expires ({:?}), then they are handled again",
                        // The time it took, not the budget: the last attempt
                        // may have waited for a connection beyond it.
                        started.elapsed().as_secs().max(1),
                        self.options.worker,
                        self.options.lease
                    );
                    tracing::error!("{msg}");
                    report.commit_error = Some(msg);
                    return Written::Failed;
                }
            }
        }
    }

    /// Puts the claimed events listed in `dead` into every dead-letter store, each with
    /// its error, retrying for up to `commit_retry_for`; adds the letters every store
    /// kept to `report.dead_lettered`.
    async fn dead_letter(
        &self,
        claim: &Claim<R>,
        dead: &[Uuid],
        errors: &HashMap<Uuid, String>,
        report: &mut BatchReport,
    ) {
        if self.dlq.is_empty() {
            return;
        }
        let letters: Vec<Letter<'_, R>> = claim
            .events
            .iter()
            .filter(|e| dead.contains(&e.id()))
            .map(|e| Letter {
                event: e,
                error: errors.get(&e.id()).map(String::as_str).unwrap_or(""),
            })
            .collect();
        report.dead_lettered += put_dead_letters(
            &self.dlq,
            &letters,
            self.options.commit_retry_for,
            Some(&self.calls),
        )
        .await;
    }

    /// Hands the batch's report and each event's outcome (with its attempts as claimed)
    /// to the metrics recorder, if there is one.
    pub(super) fn record_metrics(
        &self,
        claim: &Claim<R>,
        outcomes: &[Outcome],
        report: &BatchReport,
    ) {
        let Some(m) = &self.metrics else { return };
        let events: Vec<EventOutcome<'_>> = claim
            .events
            .iter()
            .zip(outcomes)
            .map(|(e, outcome)| EventOutcome {
                event_type: e.event_type(),
                attempts_made: e.attempts_made(),
                max_attempts: e.max_attempts(),
                outcome,
            })
            .collect();
        m.batch(R::TABLE, report, &events);
    }
}
