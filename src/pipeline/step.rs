//! Steps around a processor's handler (the reference's `add_step`).

use std::future::Future;
use std::sync::Arc;

use super::outcome::HeldRows;
use super::outcome::{BatchHandler, Outcome};
use crate::model::{Event, Route};

/// A step around a processor's handler (the reference's `add_step` and
/// `additional_steps_before` / `additional_steps_after`): it sees each batch
/// before the handler runs and each outcome after, and may change an
/// outcome (skip an event, make a failure final, ...). Add it with
/// [`WithStep`]: `handler.with_step(step)` ([`StepExt`]); steps nest, the
/// outer one seeing the inner one's outcomes.
pub trait Step<R: Route>: Send + Sync + 'static {
    /// Before the handler runs on `events`.
    fn before_batch(&self, events: &[Event<R>]) -> impl Future<Output = ()> + Send {
        let _ = events;
        async {}
    }

    /// After the handler, once per event: may replace `outcome`.
    fn after_event(
        &self,
        event: &Event<R>,
        outcome: &mut Outcome,
    ) -> impl Future<Output = ()> + Send {
        let _ = (event, outcome);
        async {}
    }

    /// After every outcome of the batch is final, before they are written.
    fn after_batch(
        &self,
        events: &[Event<R>],
        outcomes: &[Outcome],
    ) -> impl Future<Output = ()> + Send {
        let _ = (events, outcomes);
        async {}
    }
}

/// A handler with a [`Step`] around it.
#[derive(Debug)]
pub struct WithStep<H, S> {
    handler: H,
    step: S,
}

/// Adds [`with_step`](StepExt::with_step) to every [`BatchHandler`].
pub trait StepExt<R: Route>: BatchHandler<R> + Sized {
    /// This handler with `step` around it.
    fn with_step<S: Step<R>>(self, step: S) -> WithStep<Self, S> {
        WithStep {
            handler: self,
            step,
        }
    }
}

impl<R: Route, H: BatchHandler<R>> StepExt<R> for H {}

/// Runs the step's after-hooks on the handler's outcomes.
async fn after_step<R: Route, S: Step<R>>(
    step: &S,
    events: &[Event<R>],
    outcomes: impl Future<Output = Vec<Outcome>>,
) -> Vec<Outcome> {
    let mut outcomes = outcomes.await;
    for (event, outcome) in events.iter().zip(outcomes.iter_mut()) {
        step.after_event(event, outcome).await;
    }
    step.after_batch(events, &outcomes).await;
    outcomes
}

impl<R: Route, H: BatchHandler<R>, S: Step<R>> BatchHandler<R> for WithStep<H, S> {
    /// Runs the step's before-hook, the handler, then the step's after-hooks.
    async fn handle(&self, events: &[Event<R>]) -> Vec<Outcome> {
        self.step.before_batch(events).await;
        after_step(&self.step, events, self.handler.handle(events)).await
    }

    /// As `handle`, passing `held` through to the inner handler.
    async fn handle_held(&self, events: &[Event<R>], held: &HeldRows) -> Vec<Outcome> {
        self.step.before_batch(events).await;
        after_step(&self.step, events, self.handler.handle_held(events, held)).await
    }
}

/// A shared step (the caller keeps a handle, e.g. to read its counters).
impl<R: Route, S: Step<R>> Step<R> for Arc<S> {
    /// Delegates to the shared step.
    fn before_batch(&self, events: &[Event<R>]) -> impl Future<Output = ()> + Send {
        S::before_batch(self, events)
    }

    /// Delegates to the shared step.
    fn after_event(
        &self,
        event: &Event<R>,
        outcome: &mut Outcome,
    ) -> impl Future<Output = ()> + Send {
        S::after_event(self, event, outcome)
    }

    /// Delegates to the shared step.
    fn after_batch(
        &self,
        events: &[Event<R>],
        outcomes: &[Outcome],
    ) -> impl Future<Output = ()> + Send {
        S::after_batch(self, events, outcomes)
    }
}
