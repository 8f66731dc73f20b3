//! Handlers that run inside the inbox row's transaction (`tx_handler`):
//! the handler's writes and the row's completion commit together.

use std::time::Duration;

use uuid::Uuid;

use super::options::ConsumeReport;
use super::{Batch, InboxConsumer, retry_wait};
use crate::error::Result;
use crate::inbox::handler::Handler;
use crate::inbox::source::Source;
use crate::inbox::unit_of_work::{ConsumerStore, ConsumerTx};
use crate::model::InboxEvent;
use crate::pipeline::Verdict;
use crate::store::Failure;

impl<S: Source, H: Handler, T: ConsumerStore> InboxConsumer<S, H, T> {
    /// Runs a database handler inside `tx` on each row of the batch's work;
    /// completes the rows it handled and commits. Returns the index of the
    /// message whose failure ends the batch, with the wait before its retry.
    pub(super) async fn handle_in_transaction(
        &mut self,
        mut tx: T::Tx,
        handler: &H,
        batch: Batch<'_>,
        report: &mut ConsumeReport,
    ) -> Result<Option<(usize, Duration)>> {
        let mut completed = Vec::new();
        let mut failures: Vec<(Failure, &InboxEvent)> = Vec::new();
        let mut stop: Option<(usize, usize, Duration)> = None;
        let mut gone_new = Vec::new();
        let mut gone_taken = Vec::new();
        for (k, w) in batch.work.iter().enumerate() {
            if !self.source.owns(&batch.messages[w.index]) {
                report.revoked += 1;
                if w.new {
                    gone_new.push(w.event.id());
                } else {
                    gone_taken.push(w.event.id());
                }
                continue;
            }
            let outcome = {
                let mut cx = tx.handler_context(self.deps.clone());
                self.handle(handler, &w.event, &mut cx).await
            };
            match outcome.verdict() {
                Verdict::Processed => {
                    report.processed += 1;
                    completed.push(w.event.id());
                }
                Verdict::Skipped => {
                    report.skipped += 1;
                    completed.push(w.event.id());
                }
                Verdict::Failed { error, retry } => {
                    report.failed += 1;
                    let failure = self.failure(&w.event, error, retry);
                    let last = Self::is_final(&w.event, &failure);
                    if last {
                        report.dead += 1;
                    } else {
                        report.retrying += 1;
                    }
                    let wait = retry_wait(&failure);
                    if !last {
                        self.warn_failure(&w.event, &failure.error, wait);
                    }
                    failures.push((failure, &w.event));
                    if !last {
                        stop = Some((k, w.index, wait));
                        break;
                    }
                }
            }
        }
        if let Some((k, _, _)) = stop {
            for w in &batch.work[k + 1..] {
                if w.new {
                    gone_new.push(w.event.id());
                } else {
                    gone_taken.push(w.event.id());
                }
            }
        }
        let calls = self.calls.clone();
        crate::pipeline::stall::watched(&calls, "an inbox write", tx.delete(&gone_new)).await?;
        crate::pipeline::stall::watched(&calls, "an inbox write", tx.unlock(&gone_taken)).await?;
        // Failed rows are written through the lease, after the commit:
        // lock the new ones now.
        let failed_new: Vec<Uuid> = failures
            .iter()
            .filter(|(_, e)| batch.work.iter().any(|w| w.new && w.event.id() == e.id()))
            .map(|(f, _)| f.id)
            .collect();
        crate::pipeline::stall::watched(
            &calls,
            "an inbox write",
            tx.lock(&failed_new, batch.token),
        )
        .await?;
        crate::pipeline::stall::watched(&calls, "an inbox write", tx.complete(&completed)).await?;
        crate::pipeline::stall::watched(&calls, "an inbox write", tx.commit()).await?;
        self.count("processed", completed.len() as u64);
        if !failures.is_empty() {
            let list: Vec<Failure> = failures.iter().map(|(f, _)| f.clone()).collect();
            let written = crate::pipeline::stall::watched(
                &calls,
                "an inbox write",
                self.store.fail(batch.token, &list),
            )
            .await?;
            self.forward_failed(&failures, &written.failed).await;
        }
        Ok(stop.map(|(_, i, wait)| (i, wait)))
    }
}
