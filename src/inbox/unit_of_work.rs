//! The inbox consumer's unit of work: the store traits a store implements
//! so that [`InboxConsumer`](crate::inbox::InboxConsumer) can run on it
//! ([`ConsumerStore`], [`ConsumerTx`]), and their implementation for the
//! built-in stores ([`AnyTable`], with [`InboxTx`]).

use std::collections::HashMap;
use std::future::Future;

use uuid::Uuid;

use super::{Dependencies, HandlerContext};
use crate::error::Result;
use crate::model::{InboxEvent, InboxRoute};
use crate::store::{AnyTable, BulkOutcome, ClaimToken, InboxStore, InboxTx, Redelivered};

/// A store the inbox consumer can write to: the inbox table's traits, and
/// a unit of work ([`ConsumerTx`]) in which the consumer stores a batch,
/// takes the rows of redelivered messages, runs the handlers and marks the
/// rows completed, all of which commit together or not at all. That unit
/// is what makes exactly-once hold: a handler's effects and the row's
/// completion cannot be split by a crash.
///
/// The built-in stores implement it ([`AnyTable<InboxRoute>`], a database
/// transaction). A store of your own implements it over its own unit of
/// work; `omnibox::testkit::consumer_store` checks it does what the
/// consumer relies on.
pub trait ConsumerStore: InboxStore {
    /// The unit of work.
    type Tx: ConsumerTx;

    /// Opens a unit of work.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx>> + Send;
}

/// One unit of work of a [`ConsumerStore`]: every write in it takes effect
/// at [`commit`](ConsumerTx::commit), none if it is dropped or rolled back.
pub trait ConsumerTx: Send + 'static {
    /// Inserts `events` in order; a row whose `(message_id,
    /// consumer_group)` exists already is reported as existing (with the
    /// existing row's id) and not written.
    fn insert(
        &mut self,
        events: &[InboxEvent],
    ) -> impl Future<Output = Result<Vec<BulkOutcome>>> + Send;

    /// Locks the rows `ids` (inserted in this unit) for `token`, so that no
    /// processor claims them while their handler runs outside it.
    fn lock(&mut self, ids: &[Uuid], token: &ClaimToken)
    -> impl Future<Output = Result<()>> + Send;

    /// The pending rows among `ids` (messages delivered again): each one
    /// that is due and not held by a live lease is locked for `token` and
    /// returned [`Redelivered::Taken`]; the others say until when to wait.
    /// Completed and failed rows are left out (duplicates).
    fn take(
        &mut self,
        ids: &[Uuid],
        token: &ClaimToken,
    ) -> impl Future<Output = Result<HashMap<Uuid, Redelivered>>> + Send;

    /// Unlocks rows taken and then not handled.
    fn unlock(&mut self, ids: &[Uuid]) -> impl Future<Output = Result<()>> + Send;

    /// Marks rows completed (and unlocked).
    fn complete(&mut self, ids: &[Uuid]) -> impl Future<Output = Result<()>> + Send;

    /// Marks the row of `event` completed if the claim it was read with
    /// (its `locked_by` and `locked_at`) still holds it; returns whether it
    /// did.
    fn complete_claimed(&mut self, event: &InboxEvent)
    -> impl Future<Output = Result<bool>> + Send;

    /// Deletes rows inserted in this unit (their message comes again).
    fn delete(&mut self, ids: &[Uuid]) -> impl Future<Output = Result<()>> + Send;

    /// Makes every write of the unit take effect.
    fn commit(self) -> impl Future<Output = Result<()>> + Send;

    /// Discards every write of the unit.
    fn rollback(self) -> impl Future<Output = Result<()>> + Send;

    /// The context a handler that runs inside the unit gets: the built-in
    /// stores give it their database transaction
    /// ([`HandlerContext::tx`]); the default gives none (a handler asking
    /// for one gets an error it reports as a failure).
    fn handler_context(&mut self, deps: Dependencies) -> HandlerContext<'_> {
        HandlerContext::detached(deps)
    }
}

impl ConsumerStore for AnyTable<InboxRoute> {
    type Tx = InboxTx;

    /// A database transaction (`BEGIN IMMEDIATE` on SQLite).
    async fn begin(&self) -> Result<InboxTx> {
        AnyTable::begin(self).await
    }
}

impl ConsumerTx for InboxTx {
    async fn insert(&mut self, events: &[InboxEvent]) -> Result<Vec<BulkOutcome>> {
        InboxTx::insert(self, events).await
    }

    async fn lock(&mut self, ids: &[Uuid], token: &ClaimToken) -> Result<()> {
        InboxTx::lock(self, ids, token).await
    }

    async fn take(
        &mut self,
        ids: &[Uuid],
        token: &ClaimToken,
    ) -> Result<HashMap<Uuid, Redelivered>> {
        InboxTx::take(self, ids, token).await
    }

    async fn unlock(&mut self, ids: &[Uuid]) -> Result<()> {
        InboxTx::unlock(self, ids).await
    }

    async fn complete(&mut self, ids: &[Uuid]) -> Result<()> {
        InboxTx::complete(self, ids).await
    }

    async fn complete_claimed(&mut self, event: &InboxEvent) -> Result<bool> {
        InboxTx::complete_claimed(self, event).await
    }

    async fn delete(&mut self, ids: &[Uuid]) -> Result<()> {
        InboxTx::delete(self, ids).await
    }

    async fn commit(self) -> Result<()> {
        InboxTx::commit(self).await
    }

    async fn rollback(self) -> Result<()> {
        InboxTx::rollback(self).await
    }

    /// The transaction itself: the handler's writes commit or roll back
    /// with the row (in a savepoint of their own).
    fn handler_context(&mut self, deps: Dependencies) -> HandlerContext<'_> {
        HandlerContext::in_transaction(self.bulk(), deps)
    }
}
