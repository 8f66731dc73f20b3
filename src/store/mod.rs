//! Storage: the store traits, their request and report types, and one module
//! per backend ([`postgres`], [`sqlite`]), each owning its migrations.
//!
//! A backend's store ([`PgStore`], [`SqliteStore`], or [`AnyStore`] chosen by
//! URL at run time) hands out one *table handle* per table:
//! `store.outbox()` implements [`EventStore<OutboxRoute>`] and [`OutboxStore`],
//! `store.inbox()` implements [`EventStore<InboxRoute>`] and [`InboxStore`].
//!
//! # The claim
//!
//! [`EventStore::claim`] hands out up to N due rows. For the outbox it keeps
//! per-key order: a row is handed out only if every earlier pending row of
//! its `(topic, partition_key)` that is due, tried or locked is handed out in
//! the same claim. It works key first: it finds keys whose head can be
//! handed out (skipping rows behind a held head inside the index scan, so it
//! cannot stall), then takes a *run* of each key from its head, keys in the
//! order their rows became due. See `claim.rs` and docs/design.md.
//!
//! Every claim returns a [`ClaimToken`] (worker id and the claim's
//! `locked_at`); completion, failure and release are guarded by it, so a
//! worker whose lease expired cannot overwrite a newer claim. Each claim
//! writes its own expiry (`locked_until`), and any claimer may take a row
//! once it has passed.

use std::time::Duration;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::Table;

mod any;
mod any_tx;
pub mod audit;
pub(crate) mod claim;
pub mod dead_letters;
pub mod diagnostics;
mod dialect;
mod driver;
pub mod fingerprint;
mod held;
mod migrate;
mod operations;
pub mod postgres;
mod report;
mod request;
pub(crate) mod shared;
pub mod sqlite;
mod table;
mod traits;
mod wakeup;
mod write;

pub use any::{AnyStore, AnyTable, Backend, StoreOptions};
pub(crate) use any_tx::BulkTx;
pub use any_tx::{InboxTx, OutboxBulkWriter};
pub use migrate::{
    AppliedMigration, MIGRATIONS_TABLE, MigrationReport, MigrationScript, MigrationState,
    ProblemKind, SchemaProblem, SchemaState,
};
pub use postgres::PgStore;
pub use report::*;
pub use request::*;
pub use sqlite::SqliteStore;
pub use table::StoreTable;
pub use traits::*;
pub use wakeup::AnyWakeup;
pub use write::{EventConnection, insert_inbox, insert_outbox};

/// The default database: an SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://omnibox.db";

/// Checks the ids of a guarded update (complete, fail, release of rows a
/// claim holds) against the ids it changed: `Ok` when every one changed,
/// else [`Error::ConcurrentUpdate`] naming the ids the claim no longer
/// held. For stores of your own, which must answer so.
pub fn guard_result(expected: &[Uuid], changed: &[Uuid]) -> Result<()> {
    if changed.len() == expected.len() {
        return Ok(());
    }
    let changed: std::collections::HashSet<&Uuid> = changed.iter().collect();
    let missing: Vec<Uuid> = expected
        .iter()
        .filter(|id| !changed.contains(id))
        .copied()
        .collect();
    Err(Error::ConcurrentUpdate {
        expected: expected.len(),
        actual: expected.len() - missing.len(),
        missing,
    })
}

/// Redacts the password of a database URL for messages and logs (see
/// [`crate::redact::url`]).
pub fn redact_url(url: &str) -> String {
    crate::redact::url(url)
}

/// A duration as seconds for SQL, clamped to
/// [`MAX_DURATION`](crate::model::limits::MAX_DURATION) so `now()` plus or
/// minus it stays a valid timestamp.
pub(crate) fn secs(d: Duration) -> f64 {
    d.min(crate::model::limits::MAX_DURATION).as_secs_f64()
}

/// What every store writes as `last_error` (and a dead letter's error):
/// the error with credentials and secret-looking parameters masked (it may
/// quote a remote's reply: a webhook's body echoing the request, a broker's
/// or a database's message), truncated to 2000 bytes on a character
/// boundary; an empty one is `(no error message)`. A store of your own
/// writes failures through it too.
pub fn stored_error(error: &str) -> String {
    use crate::model::limits::{DEFAULT_TRUNCATION_SUFFIX, LAST_ERROR_MAX_LENGTH};
    let error = crate::redact::text(error);
    crate::model::validate::truncate_error(&error, LAST_ERROR_MAX_LENGTH, DEFAULT_TRUNCATION_SUFFIX)
        .unwrap_or_else(|_| "(no error message)".to_string())
}

/// Column of the "topic" filter: `topic` on the outbox, `source` on the inbox.
pub(crate) fn topic_column(table: Table) -> &'static str {
    match table {
        Table::Outbox => "topic",
        Table::Inbox => "source",
    }
}

pub(crate) const DEFAULT_LIST_LIMIT: u32 = 100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        // The rules are `redact::url`'s, tested there.
        for u in [
            "postgres://u:p@ss@h/db",
            "postgres://u@h/db",
            "sqlite://omnibox.db",
        ] {
            assert_eq!(redact_url(u), crate::redact::url(u));
        }
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
    }

    #[test]
    fn guard_reports_missing_rows() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        assert!(guard_result(&[a, b], &[b, a]).is_ok());
        match guard_result(&[a, b], &[b]).unwrap_err() {
            Error::ConcurrentUpdate {
                expected,
                actual,
                missing,
            } => {
                assert_eq!((expected, actual), (2, 1));
                assert_eq!(missing, vec![a]);
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn requeue_filter_needs_a_selector() {
        assert!(RequeueFilter::default().check(Table::Outbox).is_err());
        assert!(
            RequeueFilter {
                all: true,
                ..Default::default()
            }
            .check(Table::Outbox)
            .is_ok()
        );
        let selecting = |select| RequeueFilter {
            failures: FailureSelector {
                select,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(
            selecting(EventSelector {
                event_type: Some("x".into()),
                ..Default::default()
            })
            .check(Table::Outbox)
            .is_ok()
        );
        let group = selecting(EventSelector {
            consumer_group: Some("billing".into()),
            ..Default::default()
        });
        assert!(group.check(Table::Inbox).is_ok());
        let e = group.check(Table::Outbox).unwrap_err().to_string();
        assert!(e.contains("no consumer group"), "{e}");
    }
}
