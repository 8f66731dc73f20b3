//! Handlers that run outside the database transaction: the rows are
//! claimed, handled, then completed or failed.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::options::ConsumeReport;
use super::{Batch, InboxConsumer, retry_wait};
use crate::error::{Error, Result};
use crate::inbox::handler::Handler;
use crate::inbox::source::Source;
use crate::inbox::unit_of_work::ConsumerStore;
use crate::model::InboxEvent;
use crate::pipeline::Heartbeat;
use crate::pipeline::Verdict;
use crate::store::{ClaimToken, Failure};

impl<S: Source, H: Handler, T: ConsumerStore> InboxConsumer<S, H, T> {
    /// Runs an external handler on each row of the batch's work (stored and
    /// locked by its token) with no transaction open, writing each result
    /// before the next handler starts. Returns the index of the message whose
    /// failure ends the batch, with the wait before its retry.
    pub(super) async fn handle_outside(
        &mut self,
        handler: &H,
        batch: Batch<'_>,
        report: &mut ConsumeReport,
    ) -> Result<Option<(usize, Duration)>> {
        let held = Arc::new(std::sync::Mutex::new(
            batch
                .work
                .iter()
                .map(|w| w.event.id())
                .collect::<Vec<Uuid>>(),
        ));
        let mut heartbeat = Heartbeat::for_shared(
            &self.store,
            batch.token.clone(),
            held.clone(),
            self.options.lease,
        );
        let mut stop = None;
        let mut k = 0;
        while k < batch.work.len() {
            let w = &batch.work[k];
            k += 1;
            if let Ok(mut h) = held.lock()
                && k > 1
            {
                // The rows before this one are settled.
                h.retain(|id| *id != batch.work[k - 2].event.id());
            }
            if !self.source.owns(&batch.messages[w.index]) {
                report.revoked += 1;
                self.release(batch.token, &[w.event.id()]).await?;
                continue;
            }
            let outcome = self.handle_detached(handler, &w.event).await;
            match outcome.verdict() {
                verdict @ (Verdict::Processed | Verdict::Skipped) => {
                    match crate::pipeline::stall::watched(
                        &self.calls,
                        "an inbox write",
                        self.store.complete(batch.token, &[w.event.id()]),
                    )
                    .await
                    {
                        Ok(_) if matches!(verdict, Verdict::Skipped) => report.skipped += 1,
                        Ok(_) => {
                            report.processed += 1;
                            self.count("processed", 1);
                        }
                        Err(Error::ConcurrentUpdate { .. }) => tracing::warn!(
                            message_id = w.event.message_id(),
                            "the handler finished after this consumer lost the row's lease \
                             (an operator unlocked it, or it ran past the lease); it is not \
                             marked completed here and may run again"
                        ),
                        Err(e) => return Err(e),
                    }
                }
                Verdict::Failed { error, retry } => {
                    report.failed += 1;
                    let failure = self.failure(&w.event, error, retry);
                    let wait = retry_wait(&failure);
                    let written = match crate::pipeline::stall::watched(
                        &self.calls,
                        "an inbox write",
                        self.store.fail(batch.token, std::slice::from_ref(&failure)),
                    )
                    .await
                    {
                        Ok(w) => w,
                        Err(Error::ConcurrentUpdate { .. }) => {
                            tracing::warn!(
                                message_id = w.event.message_id(),
                                "the handler failed after this consumer lost the row's lease"
                            );
                            crate::store::FailReport::default()
                        }
                        Err(e) => return Err(e),
                    };
                    if !written.failed.is_empty() {
                        report.dead += 1;
                        self.forward_failed(&[(failure, &w.event)], &written.failed)
                            .await;
                        continue;
                    }
                    report.retrying += 1;
                    self.warn_failure(&w.event, &failure.error, wait);
                    stop = Some((w.index, wait));
                    break;
                }
            }
        }
        heartbeat.stop();
        let rest: Vec<Uuid> = batch.work[k..].iter().map(|w| w.event.id()).collect();
        self.release(batch.token, &rest).await?;
        Ok(stop)
    }

    /// Unlocks `ids` untried so they are claimed again; rows this token no longer holds
    /// (`ConcurrentUpdate`) are not an error, they belong to another worker now.
    pub(super) async fn release(&self, token: &ClaimToken, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match crate::pipeline::stall::watched(
            &self.calls,
            "an inbox write",
            self.store.release(token, ids),
        )
        .await
        {
            Ok(_) | Err(Error::ConcurrentUpdate { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Rows that ended `failed`: logged and sent to the DLQ.
    pub(super) async fn forward_failed(
        &self,
        failures: &[(Failure, &InboxEvent)],
        failed: &[Uuid],
    ) {
        let rows: Vec<InboxEvent> = failures
            .iter()
            .filter(|(f, _)| failed.contains(&f.id))
            .map(|(f, e)| {
                let mut e = (*e).clone();
                e.status = crate::model::EventStatus::Failed;
                e.attempts_made = (e.attempts_made + 1).min(e.max_attempts);
                e.last_error = Some(crate::store::stored_error(&f.error));
                tracing::error!(
                    message_id = e.message_id(),
                    attempts = e.attempts_made,
                    error = %f.error,
                    "handler failed for good; the row is failed (omnibox replay retries it)"
                );
                e
            })
            .collect();
        self.forward_dead(&rows.iter().collect::<Vec<_>>()).await;
    }
}
