//! What a handler gets besides the event: the inbox's open transaction, for
//! business writes that must commit or roll back together with the inbox
//! row, and typed dependencies (a database pool, a client, settings).
//!
//! ```no_run
//! use omnibox::inbox::{Handler, HandlerContext};
//! use omnibox::pipeline::Outcome;
//! use omnibox::InboxEvent;
//!
//! /// Writes an invoice row in the inbox's transaction.
//! struct CreateInvoice;
//!
//! impl Handler for CreateInvoice {
//!     async fn handle(&self, event: &InboxEvent, cx: &mut HandlerContext<'_>) -> Outcome {
//!         let total = event.payload()["total"].as_f64().unwrap_or(0.0);
//!         let written = match cx.postgres().await {
//!             Ok(conn) => sqlx::query("INSERT INTO invoices (event_id, total) VALUES ($1, $2)")
//!                 .bind(event.id())
//!                 .bind(total)
//!                 .execute(conn)
//!                 .await
//!                 .map(|_| ())
//!                 .map_err(|e| e.to_string()),
//!             Err(e) => Err(e.to_string()),
//!         };
//!         match written {
//!             Ok(()) => Outcome::Completed,
//!             // The insert is rolled back with the failure; the row is retried.
//!             Err(error) => Outcome::Failed { error, retry: omnibox::Retry::Counted(None) },
//!         }
//!     }
//! }
//! ```

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::store::BulkTx;

/// The inbox's open transaction, as the backend's connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum Tx<'a> {
    /// PostgreSQL.
    Postgres(&'a mut sqlx::PgConnection),
    /// SQLite.
    Sqlite(&'a mut sqlx::SqliteConnection),
}

/// Typed dependencies handed to every handler (the reference's
/// `dependencies`): one value per type, shared (cheap to clone).
#[derive(Clone, Default)]
pub struct Dependencies {
    values: Arc<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for Dependencies {
    /// Shows how many dependencies there are, not their values (which need not be
    /// `Debug`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dependencies")
            .field("values", &self.values.len())
            .finish()
    }
}

impl Dependencies {
    /// No dependencies.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value` (replacing one of the same type).
    pub fn with<T: Any + Send + Sync>(mut self, value: T) -> Self {
        self.insert(value);
        self
    }

    /// Adds `value` (replacing one of the same type).
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        Arc::make_mut(&mut self.values).insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`, if one was added.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.values
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
    }
}

/// The savepoint around one handler's writes in a batch's transaction.
const OPEN: &str = "SAVEPOINT omnibox_handler";
/// Keeps the handler's writes: ends the savepoint, its changes staying in the
/// transaction.
const RELEASE: &str = "RELEASE SAVEPOINT omnibox_handler";
/// Undoes the handler's writes; the savepoint stays open until released.
const ROLLBACK: &str = "ROLLBACK TO SAVEPOINT omnibox_handler";

/// What a [`Handler`](super::Handler) gets with each event.
///
/// [`tx`](Self::tx) is the inbox's transaction when the handler runs in it:
/// under exactly-once in [`InboxConsumer`](super::InboxConsumer) (the row is
/// stored and marked completed in that transaction) and in a
/// [`HandlerStep`](super::HandlerStep) built with
/// [`in_transactions`](super::HandlerStep::in_transactions) (the processor
/// of claimed rows: each event gets a transaction of its own, in which the
/// row is marked completed). The first call opens a savepoint: when the
/// handler fails (or its SQL failed), its writes are rolled back and the
/// failure is recorded; when it succeeds they commit with the row's
/// completion. Handlers that never call it cost nothing. External handlers
/// (`--exec`, `--webhook`) get no transaction.
pub struct HandlerContext<'a> {
    tx: Option<&'a mut BulkTx>,
    savepoint: bool,
    deps: Dependencies,
}

impl std::fmt::Debug for HandlerContext<'_> {
    /// Shows whether there is a transaction (not the connection itself) and the
    /// dependencies.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerContext")
            .field("transaction", &self.tx.is_some())
            .field("deps", &self.deps)
            .finish()
    }
}

impl<'a> HandlerContext<'a> {
    /// A context with no transaction (an external handler, or a test).
    pub fn detached(deps: Dependencies) -> HandlerContext<'static> {
        HandlerContext {
            tx: None,
            savepoint: false,
            deps,
        }
    }

    /// A context whose handler may write in `tx`, the inbox's open transaction; no
    /// savepoint is opened until the handler first calls `tx`.
    pub(crate) fn in_transaction(tx: &'a mut BulkTx, deps: Dependencies) -> Self {
        HandlerContext {
            tx: Some(tx),
            savepoint: false,
            deps,
        }
    }

    /// Whether the handler runs in the inbox's transaction.
    pub fn has_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// The dependency of type `T`, if one was given.
    pub fn dep<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.deps.get::<T>()
    }

    /// All dependencies.
    pub fn dependencies(&self) -> &Dependencies {
        &self.deps
    }

    /// The inbox's open transaction (see the type's documentation). An
    /// error when the handler runs without one.
    pub async fn tx(&mut self) -> Result<Tx<'_>> {
        let Some(tx) = self.tx.as_deref_mut() else {
            return Err(Error::Config(
                "this handler runs without the inbox's transaction (an external handler, \
                 or a consumer whose ack strategy stores rows before handling)"
                    .into(),
            ));
        };
        if !self.savepoint {
            savepoint(tx, OPEN).await?;
            self.savepoint = true;
        }
        Ok(match tx {
            BulkTx::Postgres(t) => Tx::Postgres(t),
            BulkTx::Sqlite(t) => Tx::Sqlite(t),
        })
    }

    /// The transaction's PostgreSQL connection; an error on SQLite or
    /// without a transaction.
    pub async fn postgres(&mut self) -> Result<&mut sqlx::PgConnection> {
        match self.tx().await? {
            Tx::Postgres(c) => Ok(c),
            Tx::Sqlite(_) => Err(Error::Config(
                "the inbox is on SQLite, not PostgreSQL".into(),
            )),
        }
    }

    /// The transaction's SQLite connection; an error on PostgreSQL or
    /// without a transaction.
    pub async fn sqlite(&mut self) -> Result<&mut sqlx::SqliteConnection> {
        match self.tx().await? {
            Tx::Sqlite(c) => Ok(c),
            Tx::Postgres(_) => Err(Error::Config(
                "the inbox is on PostgreSQL, not SQLite".into(),
            )),
        }
    }

    /// Ends the handler's savepoint, if it opened one: kept when `keep`
    /// (and its writes went through), else rolled back. Returns why the
    /// writes could not be kept, if they could not (the handler reported
    /// success but a statement of it failed: on PostgreSQL the savepoint is
    /// then unusable until rolled back).
    pub(crate) async fn settle(&mut self, keep: bool) -> Result<Option<String>> {
        if !self.savepoint {
            return Ok(None);
        }
        self.savepoint = false;
        let Some(tx) = self.tx.as_deref_mut() else {
            return Ok(None);
        };
        let why = if keep {
            match savepoint(tx, RELEASE).await {
                Ok(()) => return Ok(None),
                Err(e) => Some(format!(
                    "the handler succeeded but its writes could not be kept (rolled back): {e}"
                )),
            }
        } else {
            None
        };
        savepoint(tx, ROLLBACK).await?;
        savepoint(tx, RELEASE).await?;
        Ok(why)
    }
}

/// Runs a savepoint statement (`SAVEPOINT`, `RELEASE`, `ROLLBACK TO`) on the
/// consumer's transaction.
async fn savepoint(tx: &mut BulkTx, sql: &'static str) -> Result<()> {
    match tx {
        BulkTx::Postgres(t) => sqlx::query(sql).execute(&mut **t).await.map(|_| ()),
        BulkTx::Sqlite(t) => sqlx::query(sql).execute(&mut **t).await.map(|_| ()),
    }
    .map_err(crate::error::storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_by_type() {
        #[derive(Debug, PartialEq)]
        struct Rate(u32);
        let deps = Dependencies::new().with(Rate(7)).with("name".to_string());
        assert_eq!(deps.get::<Rate>(), Some(&Rate(7)));
        assert_eq!(deps.get::<String>().map(String::as_str), Some("name"));
        assert!(deps.get::<u64>().is_none());
        let cx = HandlerContext::detached(deps.clone().with(Rate(8)));
        assert_eq!(cx.dep::<Rate>(), Some(&Rate(8)), "replaced in the copy");
        assert_eq!(deps.get::<Rate>(), Some(&Rate(7)), "not in the original");
        assert!(!cx.has_transaction());
    }

    #[tokio::test]
    async fn no_transaction_is_an_error_not_a_panic() {
        let mut cx = HandlerContext::detached(Dependencies::new());
        let e = cx.tx().await.unwrap_err().to_string();
        assert!(e.contains("without the inbox's transaction"), "{e}");
        assert_eq!(cx.settle(true).await.unwrap(), None);
    }
}
