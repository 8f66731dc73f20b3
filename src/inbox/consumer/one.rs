//! One message at a time: [`InboxConsumer::process_one`], for a service
//! that drives the consumer's loop itself (the reference's `process_one`
//! and `InboxConsumeResult`).

use std::time::Instant;

use uuid::Uuid;

use super::InboxConsumer;
use super::options::ConsumeReport;
use crate::error::Result;
use crate::inbox::handler::Handler;
use crate::inbox::source::Source;
use crate::inbox::unit_of_work::ConsumerStore;

/// What [`InboxConsumer::process_one`] did with one message (the
/// reference's `InboxConsumeResult`).
#[derive(Debug, Clone)]
pub struct ConsumeOne {
    /// The message's id (a poison message's is derived from its position).
    pub message_id: String,
    /// The id of its inbox row.
    pub event_id: Uuid,
    /// True when the source's position was committed through it.
    pub committed: bool,
    /// True when the handler completed or skipped it in this call.
    pub processed: bool,
    /// True when its row was done already (a delivery handled before).
    pub duplicate: bool,
    /// True when it could not be parsed (stored as a `failed` row).
    pub poison: bool,
    /// Its counts, as [`InboxConsumer::run`] reports them (failures,
    /// retries, redeliveries).
    pub report: ConsumeReport,
}

impl<S: Source, H: Handler, T: ConsumerStore> InboxConsumer<S, H, T> {
    /// Reads one message from the source and consumes it under the ack
    /// strategy, as [`run`](Self::run) does with a batch; `None` when no
    /// message came within the options' `poll_wait` (or the consumer is
    /// paused until a failed message's retry time, or a file source ended).
    /// For a service that drives the loop itself: call it again and again;
    /// a database error is returned, and the message is given back to the
    /// source (nothing of it was committed), so the next call takes it
    /// again. A source at its end answers `None` too:
    /// [`source_ended`](Self::source_ended) tells it apart.
    pub async fn process_one(&mut self) -> Result<Option<ConsumeOne>> {
        crate::model::validate::consumer_group(&self.options.group)?;
        self.stop_reading_ahead().await?;
        self.ended = false;
        if let Some(at) = self.resume_at {
            let now = Instant::now();
            if now < at {
                self.source
                    .idle((at - now).min(self.options.poll_wait))
                    .await?;
                return Ok(None);
            }
            self.resume_at = None;
        }
        let polled = self
            .source
            .poll_within(1, usize::MAX, self.options.poll_wait)
            .await?;
        self.ended = polled.end && polled.messages.is_empty();
        let Some(message) = polled.messages.into_iter().next() else {
            return Ok(None);
        };
        let parsed = self
            .parser
            .parse(&self.domain, &message, &self.options.group);
        let mut report = ConsumeReport::default();
        if let Err(e) = self
            .consume_batch(std::slice::from_ref(&message), &mut report)
            .await
        {
            // Nothing of it was committed: the source gives it again on the
            // next call, not the message after it.
            self.source.rewind(std::slice::from_ref(&message)).await?;
            return Err(e);
        }
        let event = parsed.event();
        Ok(Some(ConsumeOne {
            message_id: event.message_id().to_string(),
            event_id: event.id(),
            committed: report.commits > 0,
            processed: report.processed + report.skipped > 0,
            duplicate: report.duplicates > 0,
            poison: parsed.is_poison(),
            report,
        }))
    }

    /// True when the last [`process_one`](Self::process_one) answered
    /// `None` because the source is at its end ([`Polled::end`](crate::inbox::Polled::end):
    /// a file read to its end, or Kafka caught up with the end of every
    /// assigned partition), not because the consumer waits for a retry.
    pub fn source_ended(&self) -> bool {
        self.ended
    }
}
