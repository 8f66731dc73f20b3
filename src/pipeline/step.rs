//! Steps around a processor's handler (the reference's `add_step`).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use super::outcome::HeldRows;
use super::outcome::{BatchHandler, Outcome};
use crate::model::{Event, Route};

/// A step around a processor's handler (the reference's `add_step` and
/// `additional_steps_before` / `additional_steps_after`): it sees each batch
/// before the handler runs, may decide an event's outcome before the
/// handler sees it (skip it, filter it out, route it elsewhere), and sees
/// each outcome after, which it may change (skip an event, make a failure
/// final, ...). Add it with [`WithStep`]: `handler.with_step(step)`
/// ([`StepExt`]); steps nest, the outer one seeing the inner one's
/// outcomes. `examples/custom_step.rs` shows one.
pub trait Step<R: Route>: Send + Sync + 'static {
    /// Before the handler runs on `events`.
    fn before_batch(&self, events: &[Event<R>]) -> impl Future<Output = ()> + Send {
        let _ = events;
        async {}
    }

    /// Before the handler, once per event: `Some(outcome)` decides the
    /// event here and the handler never sees it (`Outcome::Skipped` to
    /// filter it out, `Outcome::Completed` after routing it elsewhere, a
    /// failure to retry it later); `None` (the default) hands it to the
    /// handler. On a table with per-key order (the outbox), an event this
    /// leaves to be retried (a failure, a release, an unavailable
    /// destination) holds back the rest of its key in the batch: they are
    /// released untried; and once this hands an event of a key to the
    /// handler, the rest of that key in the batch go to the handler too
    /// without being asked here. Either way the key's order holds.
    fn before_event(&self, event: &Event<R>) -> impl Future<Output = Option<Outcome>> + Send {
        let _ = event;
        async { None }
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

/// True when `outcome` leaves its event to be tried again (so, on a table
/// with per-key order, the rest of its key must wait).
fn retried(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Failed { .. } | Outcome::Released | Outcome::Unavailable { .. }
    )
}

/// The outcomes the step decides before the handler, one per event
/// (`None`: the handler's). On a table with per-key order, the rest of a
/// key whose event the step leaves to be retried is released, and once an
/// event of a key goes to the handler the rest of that key go with it
/// (the step is not asked): a step's decision never overtakes the
/// handler's outcome for an earlier event of its key. `Committed` (which
/// only a handler that wrote the row itself may answer) is taken as
/// `Completed`.
async fn decided<R: Route, S: Step<R>>(step: &S, events: &[Event<R>]) -> Vec<Option<Outcome>> {
    step.before_batch(events).await;
    let mut held_back: HashSet<(&str, &str)> = HashSet::new();
    let mut handed: HashSet<(&str, &str)> = HashSet::new();
    let mut decided = Vec::with_capacity(events.len());
    for event in events {
        let key = event.order_key();
        let outcome = match key {
            Some(k) if held_back.contains(&k) => Some(Outcome::Released),
            Some(k) if handed.contains(&k) => None,
            _ => match step.before_event(event).await {
                Some(Outcome::Committed) => {
                    tracing::warn!(id = %event.id(), "a step answered Committed before the handler, where nothing has written the row; taken as Completed");
                    Some(Outcome::Completed)
                }
                o => o,
            },
        };
        match (key, &outcome) {
            (Some(k), Some(o)) if retried(o) => {
                held_back.insert(k);
            }
            (Some(k), None) => {
                handed.insert(k);
            }
            _ => {}
        }
        decided.push(outcome);
    }
    decided
}

/// Runs `handler` (given the events it is to see) on the events the step
/// left undecided; returns every event's outcome, in order.
async fn handled<R: Route, F: Future<Output = Vec<Outcome>>>(
    events: &[Event<R>],
    decided: Vec<Option<Outcome>>,
    handler: impl FnOnce(Option<Vec<Event<R>>>) -> F,
) -> Vec<Outcome> {
    if decided.iter().all(Option::is_none) {
        return handler(None).await;
    }
    let rest: Vec<Event<R>> = events
        .iter()
        .zip(&decided)
        .filter(|(_, d)| d.is_none())
        .map(|(e, _)| e.clone())
        .collect();
    let mut theirs = if rest.is_empty() {
        Vec::new()
    } else {
        handler(Some(rest)).await
    }
    .into_iter();
    decided
        .into_iter()
        .map(|d| {
            d.or_else(|| theirs.next()).unwrap_or_else(|| {
                tracing::error!(
                    "the handler returned fewer outcomes than events; the rest are released untried"
                );
                Outcome::Released
            })
        })
        .collect()
}

impl<R: Route, H: BatchHandler<R>, S: Step<R>> BatchHandler<R> for WithStep<H, S> {
    /// Runs the step's before-hooks, the handler on the events they left
    /// undecided, then the step's after-hooks on every outcome.
    async fn handle(&self, events: &[Event<R>]) -> Vec<Outcome> {
        let decided = decided(&self.step, events).await;
        let outcomes = handled(events, decided, async |rest: Option<Vec<Event<R>>>| {
            self.handler.handle(rest.as_deref().unwrap_or(events)).await
        });
        after_step(&self.step, events, outcomes).await
    }

    /// As `handle`, passing `held` through to the inner handler.
    async fn handle_held(&self, events: &[Event<R>], held: &HeldRows) -> Vec<Outcome> {
        let decided = decided(&self.step, events).await;
        let outcomes = handled(events, decided, async |rest: Option<Vec<Event<R>>>| {
            let rest = rest.as_deref().unwrap_or(events);
            self.handler.handle_held(rest, held).await
        });
        after_step(&self.step, events, outcomes).await
    }
}

/// A shared step (the caller keeps a handle, e.g. to read its counters).
impl<R: Route, S: Step<R>> Step<R> for Arc<S> {
    /// Delegates to the shared step.
    fn before_batch(&self, events: &[Event<R>]) -> impl Future<Output = ()> + Send {
        S::before_batch(self, events)
    }

    /// Delegates to the shared step.
    fn before_event(&self, event: &Event<R>) -> impl Future<Output = Option<Outcome>> + Send {
        S::before_event(self, event)
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::domain::{DomainService, Retry};
    use crate::model::{NewOutboxEvent, OutboxEvent, OutboxRoute};

    /// Completes every event it is given, and records them.
    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);

    impl BatchHandler<OutboxRoute> for Arc<Record> {
        async fn handle(&self, events: &[OutboxEvent]) -> Vec<Outcome> {
            let mut seen = self.0.lock().unwrap();
            seen.extend(events.iter().map(|e| e.event_type().to_string()));
            events.iter().map(|_| Outcome::Completed).collect()
        }
    }

    /// Holds `a-1` back for a retry, skips `b-1`.
    struct Gate;

    impl Step<OutboxRoute> for Gate {
        async fn before_event(&self, event: &OutboxEvent) -> Option<Outcome> {
            match event.event_type() {
                "a-1" => Some(Outcome::Failed {
                    error: "later".into(),
                    retry: Retry::Counted(None),
                }),
                "b-1" => Some(Outcome::Skipped),
                "d-2" => Some(Outcome::Completed),
                "e-1" => Some(Outcome::Committed),
                _ => None,
            }
        }
    }

    fn event(key: &str, name: &str) -> OutboxEvent {
        DomainService::default()
            .create_outbox_event(NewOutboxEvent::new(
                "order",
                uuid::Uuid::now_v7(),
                name,
                "orders",
                key,
                serde_json::json!({"n": 1}),
            ))
            .unwrap()
    }

    /// A step's decisions keep their places; an event it leaves to be
    /// retried holds back the rest of its key (released), while a skip does
    /// not; the handler sees only the rest, in order.
    #[tokio::test]
    async fn a_step_before_the_handler_keeps_key_order() {
        let events = [
            event("a", "a-1"),
            event("b", "b-1"),
            event("a", "a-2"),
            event("b", "b-2"),
            event("c", "c-1"),
        ];
        let record = Arc::new(Record::default());
        let outcomes = record.clone().with_step(Gate).handle(&events).await;
        assert_eq!(outcomes.len(), events.len());
        assert!(
            matches!(outcomes[0], Outcome::Failed { .. }),
            "{outcomes:?}"
        );
        assert_eq!(
            outcomes[1..],
            [
                Outcome::Skipped,
                Outcome::Released,
                Outcome::Completed,
                Outcome::Completed
            ]
        );
        assert_eq!(*record.0.lock().unwrap(), vec!["b-2", "c-1"]);
        // Nothing decided: the handler gets the batch as it is.
        let all = record.clone().with_step(Gate).handle(&events[3..]).await;
        assert_eq!(all, vec![Outcome::Completed, Outcome::Completed]);
        // Once d-1 went to the handler, d-2 goes too (the step would have
        // completed it ahead of d-1's outcome); a step's Committed is
        // taken as Completed.
        record.0.lock().unwrap().clear();
        let more = [event("d", "d-1"), event("d", "d-2"), event("e", "e-1")];
        let outcomes = record.clone().with_step(Gate).handle(&more).await;
        assert_eq!(outcomes, vec![Outcome::Completed; 3]);
        assert_eq!(*record.0.lock().unwrap(), vec!["d-1", "d-2"]);
    }
}
