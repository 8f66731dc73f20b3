//! Store first, then handle: the batch is stored and committed, the
//! offsets acknowledged, then each row handled; a handler failure is a
//! counted failure on a row that stays for `inbox process`.

use uuid::Uuid;

use super::options::{CommitOn, ConsumeReport};
use super::{InboxConsumer, persist_error};
use crate::domain::Retry;
use crate::error::Result;
use crate::inbox::handler::Handler;
use crate::inbox::normalize::{Normalized, RawMessage};
use crate::inbox::source::Source;
use crate::inbox::unit_of_work::{ConsumerStore, ConsumerTx};
use crate::model::InboxEvent;
use crate::pipeline::Heartbeat;
use crate::pipeline::Verdict;
use crate::store::{Failure, RetryAt};

impl<S: Source, H: Handler, T: ConsumerStore> InboxConsumer<S, H, T> {
    /// At-most-once and at-least-once: the batch is stored (new rows locked
    /// by this consumer) in one transaction; then the handler runs and the
    /// results are written with the lock's token. A failure is an attempt
    /// spent; the row stays pending for `inbox process`.
    pub(super) async fn store_then_handle(
        &mut self,
        messages: &[RawMessage],
        normalized: &mut [Normalized],
        commit_on: Option<CommitOn>,
        report: &mut ConsumeReport,
    ) -> Result<()> {
        let events = self.new_rows(normalized);
        let normalized: &[Normalized] = normalized;
        let token = self.token();
        let calls = self.calls.clone();
        let mut tx =
            crate::pipeline::stall::watched(&calls, "an inbox write", self.store.begin()).await?;
        let outcomes =
            crate::pipeline::stall::watched(&calls, "an inbox write", tx.insert(&events))
                .await
                .map_err(|e| persist_error(&events, e))?;
        let fresh: Vec<usize> = (0..normalized.len())
            .filter(|&i| !outcomes[i].existing && !normalized[i].is_poison())
            .collect();
        if self.handler.is_some() {
            let ids: Vec<Uuid> = fresh.iter().map(|&i| outcomes[i].id).collect();
            crate::pipeline::stall::watched(&calls, "an inbox write", tx.lock(&ids, &token))
                .await?;
        }
        crate::pipeline::stall::watched(&calls, "an inbox write", tx.commit()).await?;
        self.tally(normalized, &outcomes, report);
        let poison: Vec<&InboxEvent> = normalized
            .iter()
            .zip(&outcomes)
            .filter(|(n, o)| n.is_poison() && !o.existing)
            .map(|(n, _)| n.event())
            .collect();
        self.forward_dead(&poison).await;
        if commit_on == Some(CommitOn::Persist) {
            self.commit(messages, report).await?;
        }
        let Some(handler) = self.handler.clone() else {
            if commit_on == Some(CommitOn::Success) {
                self.commit(messages, report).await?;
            }
            return Ok(());
        };
        let mut done = Vec::new();
        let mut failures = Vec::new();
        let ids: Vec<Uuid> = fresh.iter().map(|&i| outcomes[i].id).collect();
        let mut heartbeat =
            Heartbeat::for_rows(&self.store, token.clone(), ids, self.options.lease);
        for &i in &fresh {
            let event = &events[i];
            let outcome = self.handle_detached(handler.as_ref(), event).await;
            match outcome.verdict() {
                Verdict::Processed => {
                    report.processed += 1;
                    done.push(outcomes[i].id);
                }
                Verdict::Skipped => {
                    report.skipped += 1;
                    done.push(outcomes[i].id);
                }
                Verdict::Failed { error, retry } => {
                    report.failed += 1;
                    let retry_at = match retry {
                        Retry::Counted(Some(at)) | Retry::NotCounted(at) => RetryAt::At(at),
                        Retry::NotCountedAfter(d) => RetryAt::After(d),
                        Retry::Counted(None) => RetryAt::After(self.backoff.delay(0)),
                    };
                    failures.push(Failure {
                        id: outcomes[i].id,
                        error,
                        counted: retry.is_counted(),
                        retry: retry_at,
                        dead: false,
                    });
                }
            }
        }
        heartbeat.stop();
        self.count("processed", done.len() as u64);
        crate::pipeline::stall::watched(
            &self.calls,
            "an inbox write",
            self.store.complete(&token, &done),
        )
        .await?;
        let failed_ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
        let fail_report = crate::pipeline::stall::watched(
            &self.calls,
            "an inbox write",
            self.store.fail(&token, &failures),
        )
        .await?;
        report.dead += fail_report.failed.len() as u64;
        report.retrying += (failures.len() - fail_report.failed.len()) as u64;
        if !fail_report.failed.is_empty() {
            let rows: Vec<&InboxEvent> = events
                .iter()
                .filter(|e| fail_report.failed.contains(&e.id()))
                .collect();
            self.forward_dead(&rows).await;
        }
        if commit_on == Some(CommitOn::Success) {
            // Commit through the last message before the first failure; the
            // rest is delivered again (its stored rows make it a duplicate).
            let first_failed = fresh
                .iter()
                .copied()
                .find(|&i| failed_ids.contains(&outcomes[i].id));
            match first_failed {
                None => self.commit(messages, report).await?,
                Some(i) => {
                    self.commit(&messages[..i], report).await?;
                    report.redelivered += (messages.len() - i) as u64;
                    self.source.rewind(&messages[i..]).await?;
                }
            }
        }
        Ok(())
    }
}
