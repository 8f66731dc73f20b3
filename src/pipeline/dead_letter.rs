//! Where events that became `failed` are kept besides their table (the
//! reference's `DLQStorage` and `DLQStep`): a [`DeadLetterStore`], written by
//! the processor after the failure is committed.
//!
//! Two come with omnibox:
//! [`DeadLetterTopic`](crate::relay::DeadLetterTopic) (a message on a
//! dead-letter topic, best effort) and
//! [`DeadLetterTable`](crate::store::dead_letters::DeadLetterTable) (a row of
//! `omnibox_dead_letters`, listable and replayable with the CLI). A service
//! may add its own (an object store, a ticketing system).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::error::Result;
use crate::model::{Event, Route};
use crate::store::dead_letters::{DEAD_LETTERS_TABLE, DeadLetterTable};

/// One event that has just become `failed`, as its processor claimed it,
/// with the error that made it so.
#[derive(Debug)]
pub struct Letter<'a, R> {
    /// The event as claimed (before this failure was written).
    pub event: &'a Event<R>,
    /// The error of its last attempt.
    pub error: &'a str,
}

/// Keeps the events that became `failed` (the reference's `DLQStorage`).
///
/// The processor calls [`put`](DeadLetterStore::put) after the rows are
/// `failed` in their table, so a dead letter is a copy: the row stays the
/// record of the failure whatever happens here. An `Err` is retried (with
/// the same letters) while the processor's commit retry lasts, so `put`
/// must be idempotent: putting a letter twice keeps it once.
pub trait DeadLetterStore<R: Route>: Send + Sync + 'static {
    /// Where the letters go, for logs (`table omnibox_dead_letters`).
    fn describe(&self) -> String;

    /// Keeps `letters`; returns how many are kept. An `Err` means none was
    /// and the call may be retried.
    fn put<'a>(&'a self, letters: &'a [Letter<'a, R>]) -> BoxFuture<'a, Result<usize>>;

    /// Whether `put` is a database call, watched like the processor's own
    /// (see [`RunOptions::stall_limit`](crate::pipeline::RunOptions::stall_limit)):
    /// a broker or HTTP store has timeouts of its own. `false` by default.
    fn is_database(&self) -> bool {
        false
    }
}

/// A shared store.
impl<R: Route, D: DeadLetterStore<R>> DeadLetterStore<R> for Arc<D> {
    /// The shared store's description.
    fn describe(&self) -> String {
        D::describe(self)
    }

    /// Puts the letters into the shared store.
    fn put<'a>(&'a self, letters: &'a [Letter<'a, R>]) -> BoxFuture<'a, Result<usize>> {
        D::put(self, letters)
    }

    /// Whether the shared store is a database.
    fn is_database(&self) -> bool {
        D::is_database(self)
    }
}

/// Rows of `omnibox_dead_letters`.
impl<R: Route + serde::Serialize> DeadLetterStore<R> for DeadLetterTable {
    /// `table omnibox_dead_letters`.
    fn describe(&self) -> String {
        format!("table {DEAD_LETTERS_TABLE}")
    }

    /// Copies each letter's event and error into the table with
    /// `DeadLetterTable::put_failed` (a letter put twice is kept once).
    fn put<'a>(&'a self, letters: &'a [Letter<'a, R>]) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let pairs: Vec<_> = letters.iter().map(|l| (l.event, l.error)).collect();
            self.put_failed(&pairs).await
        })
    }

    /// A table: yes.
    fn is_database(&self) -> bool {
        true
    }
}

/// True when the store refused the letters themselves (a constraint, bad
/// input): trying again cannot help.
fn refused(e: &crate::error::Error) -> bool {
    e.is_input_error() || matches!(e, crate::error::Error::StorageIntegrity(_))
}

/// Puts `letters` into every store, retrying a store's errors for up to
/// `retry_for`; returns how many letters every store kept. A store that
/// still fails is logged: the rows are `failed` in their table either way.
pub(crate) async fn put_dead_letters<R: Route>(
    stores: &[Arc<dyn DeadLetterStore<R>>],
    letters: &[Letter<'_, R>],
    retry_for: Duration,
    calls: Option<&super::stall::Calls>,
) -> usize {
    if letters.is_empty() {
        return 0;
    }
    let mut kept = letters.len();
    for store in stores {
        let deadline = crate::model::time::tokio_instant_after(retry_for);
        let mut wait = Duration::from_millis(100);
        let mut said = false;
        loop {
            let call = calls
                .filter(|_| store.is_database())
                .map(|c| c.begin("a dead-letter write"));
            let put = store.put(letters).await;
            drop(call);
            match put {
                Ok(n) => {
                    kept = kept.min(n);
                    break;
                }
                // A refusal (the data, not the database) is not retried:
                // it would only hold the processor up.
                Err(e) if !refused(&e) && tokio::time::Instant::now() + wait < deadline => {
                    // Said once per batch; the attempts after it at debug.
                    if std::mem::replace(&mut said, true) {
                        tracing::debug!(error = %e, store = %store.describe(), retry_in_ms = wait.as_millis() as u64, "cannot keep dead letters; retrying");
                    } else {
                        tracing::warn!(error = %e, store = %store.describe(), retry_in_ms = wait.as_millis() as u64, "cannot keep dead letters; retrying (logged once per batch)");
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        store = %store.describe(),
                        letters = letters.len(),
                        ids = ?letters.iter().take(10).map(|l| l.event.id()).collect::<Vec<_>>(),
                        "could not keep dead letters (the rows are failed in their table; `omnibox list --status failed` shows them)"
                    );
                    kept = 0;
                    break;
                }
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::domain::DomainService;
    use crate::error::Error;
    use crate::model::{NewOutboxEvent, OutboxEvent, OutboxRoute};

    /// Answers with the errors given, then keeps everything; counts calls.
    struct Scripted {
        errors: Mutex<Vec<Error>>,
        calls: Mutex<u32>,
    }

    impl DeadLetterStore<OutboxRoute> for Scripted {
        fn describe(&self) -> String {
            "scripted".into()
        }

        fn put<'a>(
            &'a self,
            letters: &'a [Letter<'a, OutboxRoute>],
        ) -> BoxFuture<'a, Result<usize>> {
            *self.calls.lock().unwrap() += 1;
            let next = self.errors.lock().unwrap().pop();
            Box::pin(async move {
                match next {
                    Some(e) => Err(e),
                    None => Ok(letters.len()),
                }
            })
        }
    }

    fn event() -> OutboxEvent {
        DomainService::default()
            .create_outbox_event(NewOutboxEvent::new(
                "order",
                uuid::Uuid::now_v7(),
                "order.created",
                "orders",
                "k",
                serde_json::json!({"a": 1}),
            ))
            .unwrap()
    }

    async fn put(errors: Vec<Error>) -> (usize, u32) {
        let store = Arc::new(Scripted {
            errors: Mutex::new(errors),
            calls: Mutex::new(0),
        });
        let stores: Vec<Arc<dyn DeadLetterStore<OutboxRoute>>> = vec![store.clone()];
        let e = event();
        let letters = [Letter {
            event: &e,
            error: "rejected",
        }];
        let kept = put_dead_letters(&stores, &letters, Duration::from_millis(800), None).await;
        let calls = *store.calls.lock().unwrap();
        (kept, calls)
    }

    #[tokio::test]
    async fn an_outage_is_retried_a_refusal_is_not() {
        assert_eq!(put(vec![]).await, (1, 1));
        assert_eq!(
            put(vec![
                Error::Outage("down".into()),
                Error::Outage("down".into())
            ])
            .await,
            (1, 3),
            "retried until the store answers"
        );
        assert_eq!(
            put(vec![Error::validation("event", "too long")]).await,
            (0, 1),
            "a refusal is logged, not retried"
        );
        let many = (0..1000).map(|_| Error::Outage("down".into())).collect();
        let (kept, calls) = put(many).await;
        assert_eq!(kept, 0, "gives up when the retry time is spent");
        assert_eq!(
            calls, 4,
            "100, 200 and 400 ms apart, then 800 ms would pass the limit"
        );
    }
}
