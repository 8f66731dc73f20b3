//! What a batch's handler step decides for each event ([`Outcome`]), and
//! the handler step itself ([`BatchHandler`]).

use std::future::Future;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::domain::Retry;
use crate::model::{Event, Route};

/// What the handler step decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Published or processed.
    Completed,
    /// The handler chose not to process it; it is completed all the same.
    Skipped,
    /// It failed; [`Retry::Counted`] spends an attempt (`None`: retry by the
    /// backoff), [`Retry::NotCounted`] does not.
    Failed {
        /// Why.
        error: String,
        /// How the failure counts.
        retry: Retry,
    },
    /// Not tried (a key's run stopped at an earlier failure, or shutdown):
    /// unlocked, nothing else changes.
    Released,
    /// The event's own destination is unavailable (for the relay: its topic
    /// is unknown to the broker, or has no leader or too few replicas), not
    /// the downstream as a whole: no attempt is spent, the event is retried
    /// after `retry_after`, and the circuit breaker is not touched, so other
    /// destinations keep flowing.
    Unavailable {
        /// Why.
        error: String,
        /// When to try again (by the database's clock).
        retry_after: Duration,
    },
    /// It failed and must not be retried automatically: it becomes `failed`
    /// now, whatever attempts are left (and is dead-lettered).
    Dead {
        /// Why.
        error: String,
    },
    /// Completed, and the row already marked completed by the handler step
    /// in its own transaction, together with the handler's writes: nothing
    /// is left to write (see [`HandlerStep::in_transactions`](crate::inbox::HandlerStep::in_transactions)).
    Committed,
}

/// An [`Outcome`] reduced to what the inbox consumer distinguishes.
pub(crate) enum Verdict {
    Processed,
    /// Skipped by the handler, or released.
    Skipped,
    Failed {
        error: String,
        retry: Retry,
    },
}

impl Outcome {
    /// Processed: the reference's `handler_completed()`.
    pub fn completed() -> Outcome {
        Outcome::Completed
    }

    /// Not processed by the handler's choice, completed all the same: the
    /// reference's `handler_skipped()`.
    pub fn skipped() -> Outcome {
        Outcome::Skipped
    }

    /// Outdated (a newer revision was applied already), so not processed:
    /// the reference's `EventHandlerStatus.STALE`. The row is completed as
    /// a skip is; it counts as skipped.
    pub fn stale() -> Outcome {
        Outcome::Skipped
    }

    /// A failure to try again after the backoff's delay, spending an
    /// attempt (`failed` at the last one): the reference's
    /// `handler_retry(message)`.
    pub fn retry(error: impl Into<String>) -> Outcome {
        Outcome::Failed {
            error: error.into(),
            retry: Retry::Counted(None),
        }
    }

    /// A failure to try again at `at`: the reference's
    /// `handler_retry(message, next_retry_at=at, count_as_attempt=...)`.
    /// Without `count_as_attempt` no attempt is spent.
    pub fn retry_at(
        error: impl Into<String>,
        at: crate::model::Timestamp,
        count_as_attempt: bool,
    ) -> Outcome {
        Outcome::Failed {
            error: error.into(),
            retry: if count_as_attempt {
                Retry::Counted(Some(at))
            } else {
                Retry::NotCounted(at)
            },
        }
    }

    /// [`Outcome::Unavailable`] is a failure that spends no attempt,
    /// [`Outcome::Dead`] one that spends an attempt.
    pub(crate) fn verdict(self) -> Verdict {
        match self {
            Outcome::Completed | Outcome::Committed => Verdict::Processed,
            Outcome::Skipped | Outcome::Released => Verdict::Skipped,
            Outcome::Failed { error, retry } => Verdict::Failed { error, retry },
            Outcome::Unavailable { error, retry_after } => Verdict::Failed {
                error,
                retry: Retry::NotCountedAfter(retry_after),
            },
            Outcome::Dead { error } => Verdict::Failed {
                error,
                retry: Retry::Counted(None),
            },
        }
    }
}

/// The step that does the work for a claimed batch: publish it, or run the
/// application's handler on each event.
pub trait BatchHandler<R: Route>: Send + Sync + 'static {
    /// One outcome per event, in the order given. Events of one key come in
    /// insertion order; a handler that keeps per-key order stops a key at its
    /// first failure and returns [`Outcome::Released`] for the rest.
    fn handle(&self, events: &[Event<R>]) -> impl Future<Output = Vec<Outcome>> + Send;

    /// As [`handle`](Self::handle), with the rows whose lease the processor
    /// keeps extending: a step that settles a row itself (and answers
    /// [`Outcome::Committed`]) takes it out with [`HeldRows::settled`]. The
    /// default ignores `held`.
    fn handle_held(
        &self,
        events: &[Event<R>],
        held: &HeldRows,
    ) -> impl Future<Output = Vec<Outcome>> + Send {
        let _ = held;
        self.handle(events)
    }
}

/// The rows of a batch in flight whose lease the processor keeps extending.
#[derive(Debug, Clone, Default)]
pub struct HeldRows(pub(super) Arc<Mutex<Vec<Uuid>>>);

impl HeldRows {
    /// `id` is settled (written by the step itself): its lease is no longer
    /// extended.
    pub fn settled(&self, id: Uuid) {
        lock(&self.0).retain(|held| *held != id);
    }
}

/// Locks a mutex, going on past a panic in another holder (the data is
/// bookkeeping that stays consistent between statements).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The message a panic was raised with (`panic!("...")`, `unwrap` on an
/// error), or a placeholder for a payload of another type.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// What a handler may return: an [`Outcome`]; `()` (completed: returning
/// nothing means it worked); or `Result<(), E>` (`Ok` completed, `Err` a
/// counted failure with the error's text, retried after the backoff).
pub trait IntoOutcome {
    /// The outcome this value stands for.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Outcome {
    /// The outcome itself.
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for () {
    /// Completed.
    fn into_outcome(self) -> Outcome {
        Outcome::Completed
    }
}

impl<E: std::fmt::Display> IntoOutcome for std::result::Result<(), E> {
    /// `Ok`: completed; `Err`: a counted failure with the error's text.
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(()) => Outcome::Completed,
            Err(e) => Outcome::retry(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's handler results, as constructors.
    #[test]
    fn constructors_are_the_reference_results() {
        assert_eq!(Outcome::completed(), Outcome::Completed);
        assert_eq!(Outcome::skipped(), Outcome::Skipped);
        assert_eq!(Outcome::stale(), Outcome::Skipped);
        assert_eq!(
            Outcome::retry("later"),
            Outcome::Failed {
                error: "later".into(),
                retry: Retry::Counted(None)
            }
        );
        let at = crate::model::time::now();
        assert_eq!(
            Outcome::retry_at("at", at, true),
            Outcome::Failed {
                error: "at".into(),
                retry: Retry::Counted(Some(at))
            }
        );
        assert_eq!(
            Outcome::retry_at("at", at, false),
            Outcome::Failed {
                error: "at".into(),
                retry: Retry::NotCounted(at)
            }
        );
        assert_eq!(().into_outcome(), Outcome::Completed);
        assert_eq!(Ok::<(), String>(()).into_outcome(), Outcome::Completed);
        assert_eq!(
            Err::<(), _>("no stock").into_outcome(),
            Outcome::retry("no stock")
        );
    }
}
