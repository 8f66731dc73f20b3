//! Exactly-once: store and handle a batch in one transaction per message
//! run, poison forwarded, the offsets committed after.

use std::collections::HashSet;

use uuid::Uuid;

use super::options::ConsumeReport;
use super::run::Ahead;
use super::{Batch, InboxConsumer, ToHandle, persist_error};
use crate::error::Result;
use crate::inbox::handler::Handler;
use crate::inbox::normalize::{Normalized, RawMessage};
use crate::inbox::source::Source;
use crate::inbox::unit_of_work::{ConsumerStore, ConsumerTx};
use crate::model::{InboxEvent, time};
use crate::store::Redelivered;

impl<S: Source, H: Handler, T: ConsumerStore> InboxConsumer<S, H, T> {
    /// Exactly-once: see [`AckStrategy::ExactlyOnce`]. A message whose row
    /// exists and is pending is handled again when its retry time has come
    /// and no live lease holds it; otherwise the batch ends before it and
    /// the source pauses until then. A handler failure that leaves the row
    /// pending ends the batch there too (the messages after it are
    /// delivered again, after the retry time), so a partition's messages
    /// are handled in order.
    pub(super) async fn exactly_once(
        &mut self,
        messages: &[RawMessage],
        normalized: &mut [Normalized],
        report: &mut ConsumeReport,
    ) -> Result<()> {
        let events = self.new_rows(normalized);
        let normalized: &[Normalized] = normalized;
        let token = self.token();
        let Some(handler) = self.handler.clone() else {
            // Nothing else to write with the rows: the store inserts them
            // on its own (on PostgreSQL a batch that fits one statement is
            // one round trip, atomic without BEGIN and COMMIT). Meanwhile
            // the run loop's next batch is read, if the source reads ahead.
            let outcomes = self
                .insert_reading_ahead(&events)
                .await
                .map_err(|e| persist_error(&events, e))?;
            self.tally(normalized, &outcomes, report);
            self.forward_dead_poison(normalized, &outcomes).await;
            return self.commit(messages, report).await;
        };
        let calls = self.calls.clone();
        let mut tx =
            crate::pipeline::stall::watched(&calls, "an inbox write", self.store.begin()).await?;
        let outcomes =
            crate::pipeline::stall::watched(&calls, "an inbox write", tx.insert(&events))
                .await
                .map_err(|e| persist_error(&events, e))?;
        let existing: Vec<Uuid> = outcomes
            .iter()
            .filter(|o| o.existing)
            .map(|o| o.id)
            .collect();
        let mut met =
            crate::pipeline::stall::watched(&calls, "an inbox write", tx.take(&existing, &token))
                .await?;
        // Each new row goes to the handler's work list (moved, not copied).
        let mut events: Vec<Option<InboxEvent>> = events.into_iter().map(Some).collect();

        // What to handle, in message order, up to the first message whose
        // row must wait.
        let mut work: Vec<ToHandle> = Vec::new();
        let mut seen = HashSet::with_capacity(outcomes.len());
        let mut end = messages.len();
        let mut wait_until = None;
        for (i, (n, o)) in normalized.iter().zip(&outcomes).enumerate() {
            if !seen.insert(o.id) {
                continue; // the same message twice in the batch
            }
            if !o.existing {
                if !n.is_poison()
                    && let Some(event) = events[i].take()
                {
                    work.push(ToHandle {
                        index: i,
                        event,
                        new: true,
                    });
                }
                continue;
            }
            match met.remove(&o.id) {
                None => {} // completed or failed: a duplicate
                Some(Redelivered::Taken(e)) => work.push(ToHandle {
                    index: i,
                    event: *e,
                    new: false,
                }),
                Some(Redelivered::Wait(until)) => {
                    end = i;
                    wait_until = Some(until);
                    break;
                }
            }
        }
        // Rows taken beyond the end go back as they were.
        let untouched: Vec<Uuid> = met
            .into_iter()
            .filter_map(|(id, m)| matches!(m, Redelivered::Taken(_)).then_some(id))
            .collect();
        crate::pipeline::stall::watched(&calls, "an inbox write", tx.unlock(&untouched)).await?;
        // New rows beyond the end are not kept: they come again.
        let beyond: Vec<Uuid> = (end..messages.len())
            .filter(|&i| !outcomes[i].existing && !normalized[i].is_poison())
            .map(|i| outcomes[i].id)
            .collect();
        crate::pipeline::stall::watched(&calls, "an inbox write", tx.delete(&beyond)).await?;

        let batch = Batch {
            token: &token,
            messages,
            work: &work,
        };
        let settled = if handler.in_transaction() {
            self.handle_in_transaction(tx, handler.as_ref(), batch, report)
                .await?
        } else {
            let fresh: Vec<Uuid> = work
                .iter()
                .filter(|w| w.new)
                .map(|w| w.event.id())
                .collect();
            crate::pipeline::stall::watched(&calls, "an inbox write", tx.lock(&fresh, &token))
                .await?;
            crate::pipeline::stall::watched(&calls, "an inbox write", tx.commit()).await?;
            self.handle_outside(handler.as_ref(), batch, report).await?
        };
        let (end, retry_in) = match settled {
            Some((i, wait)) if i < end => (i, Some(wait)),
            _ => (
                end,
                wait_until.map(|t| (t - time::now()).to_std().unwrap_or_default()),
            ),
        };

        // Count what happened to the messages before the end.
        let taken: HashSet<Uuid> = work
            .iter()
            .filter(|w| !w.new)
            .map(|w| w.event.id())
            .collect();
        let mut counted = HashSet::new();
        for (i, (n, o)) in normalized.iter().zip(&outcomes).enumerate() {
            if i >= end && (o.existing || !n.is_poison()) {
                continue; // comes again (a new poison row is kept)
            }
            if !o.existing {
                if counted.insert(o.id) {
                    report.stored += 1;
                    self.count("stored", 1);
                }
            } else if taken.contains(&o.id) && counted.insert(o.id) {
                report.retried += 1;
            } else {
                report.duplicates += 1;
                self.count("duplicate", 1);
            }
        }
        report.poison += self.forward_new_poison(normalized, &outcomes).await;
        // (A source leaves out of its commit the partitions it lost.)
        let (done, rest) = messages.split_at(end);
        self.commit(done, report).await?;
        if !rest.is_empty() {
            report.redelivered += rest.len() as u64;
            self.source.rewind(rest).await?;
            let wait = retry_in.unwrap_or_default();
            self.pause_for(wait);
        }
        Ok(())
    }

    /// Inserts `events` (no handler: nothing else is written with them).
    /// While [`run`](Self::run) loops over a source that
    /// [reads ahead](Source::read_ahead), the next batch is polled (without
    /// waiting, within a quarter of the batch's byte budget) and parsed
    /// meanwhile, and kept for the loop, whatever the insert's outcome: it
    /// comes next in any case (a batch stored without a handler is never
    /// given back to the source).
    async fn insert_reading_ahead(
        &mut self,
        events: &[InboxEvent],
    ) -> Result<Vec<crate::store::BulkOutcome>> {
        if !self.reading_ahead || self.ahead.is_some() {
            return crate::pipeline::stall::watched(
                &self.calls,
                "an inbox write",
                self.store.insert_many(events),
            )
            .await;
        }
        // A quarter of a batch's bytes at most (one message at least): the
        // batch read ahead is in memory beside the one being stored, and a
        // batch of large messages costs several times its bytes once
        // parsed. Batches of small messages end at their count first.
        let budget = self.batch_budget() / 4;
        let (store, source) = (&self.store, &mut self.source);
        let (parser, domain, options) = (&self.parser, &self.domain, &self.options);
        let read = async {
            let polled = source
                .poll_within(options.batch, budget, std::time::Duration::ZERO)
                .await;
            let normalized = match &polled {
                Ok(p) => p
                    .messages
                    .iter()
                    .map(|m| parser.parse(domain, m, &options.group))
                    .collect(),
                Err(_) => Vec::new(),
            };
            Ahead { polled, normalized }
        };
        let calls = self.calls.clone();
        let (stored, ahead) = tokio::join!(
            crate::pipeline::stall::watched(&calls, "an inbox write", store.insert_many(events)),
            read
        );
        self.ahead = Some(ahead);
        stored
    }

    /// Sends new poison rows to the DLQ and counts them (metrics and the
    /// returned number).
    pub(super) async fn forward_new_poison(
        &mut self,
        normalized: &[Normalized],
        outcomes: &[crate::store::BulkOutcome],
    ) -> u64 {
        let n = self.forward_dead_poison(normalized, outcomes).await;
        self.count("poison", n);
        n
    }

    /// Sends new poison rows to the DLQ; returns how many.
    pub(super) async fn forward_dead_poison(
        &self,
        normalized: &[Normalized],
        outcomes: &[crate::store::BulkOutcome],
    ) -> u64 {
        let mut ids = HashSet::new();
        let poison: Vec<&InboxEvent> = normalized
            .iter()
            .zip(outcomes)
            .filter(|(n, o)| n.is_poison() && !o.existing && ids.insert(o.id))
            .map(|(n, _)| n.event())
            .collect();
        self.forward_dead(&poison).await;
        poison.len() as u64
    }
}
