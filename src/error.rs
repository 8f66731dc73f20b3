//! The one error type of the library.
//!
//! Variants mirror the reference's exception hierarchy (`OmniBoxError` and its
//! subclasses) and carry the ids involved, so that a caller can act on them
//! without parsing messages. Messages are lowercase without a final period.

use std::fmt;

use uuid::Uuid;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input that breaks a validation rule (docs/design.md, "Event lifecycle and rules"). Nothing was written.
    #[error("{field}: {message}")]
    Validation {
        /// The field (or input element) that is wrong, e.g. `payload`, `headers.x-id`.
        field: String,
        /// What is wrong with it, and where it helps, what to do.
        message: String,
    },

    /// No row with this id.
    #[error("event {id} not found")]
    NotFound {
        /// The id that was looked up.
        id: Uuid,
    },

    /// The operation needs a locked event and the event is not locked.
    #[error("event {id} is not locked")]
    NotLocked {
        /// The event.
        id: Uuid,
    },

    /// The event is already locked (by `locked_by`).
    #[error("event {id} is already locked by {locked_by}")]
    AlreadyLocked {
        /// The event.
        id: Uuid,
        /// The current owner of the lock.
        locked_by: String,
    },

    /// The event is locked by a different worker than the one acting on it.
    #[error("event {id} is locked by {locked_by}, but the operation was attempted by {worker_id}")]
    LockedByAnotherWorker {
        /// The event.
        id: Uuid,
        /// The current owner of the lock (`None` when unlocked).
        locked_by: String,
        /// The worker that attempted the operation.
        worker_id: String,
    },

    /// The event is in a state that does not allow the operation.
    #[error("event {id} is {current}, expected {expected}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    InvalidState {
        /// The event.
        id: Uuid,
        /// Its current status.
        current: String,
        /// The statuses the operation accepts.
        expected: String,
        /// More context, if any.
        detail: Option<String>,
    },

    /// A guarded bulk update changed fewer rows than it was given: the rows in
    /// `missing` are no longer held by this claim (lease expired and re-claimed,
    /// force-unlocked, or already finished). The rows still held were written.
    #[error(
        "concurrent update: expected {expected} rows, updated {actual}; no longer held by this claim: {}",
        IdList(missing)
    )]
    ConcurrentUpdate {
        /// How many rows the update was given.
        expected: usize,
        /// How many rows it changed.
        actual: usize,
        /// The ids it could not change.
        missing: Vec<Uuid>,
    },

    /// The store does not implement an optional capability.
    #[error("{store} does not support {capability}")]
    UnsupportedCapability {
        /// The capability, e.g. `retention`.
        capability: &'static str,
        /// The store's name.
        store: &'static str,
    },

    /// A consumed message could not be stored; its offset must not be committed.
    #[error("failed to persist inbox message {message_id:?}")]
    InboxPersist {
        /// The broker message id.
        message_id: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },

    /// The database URL or another setting is not usable.
    #[error("{0}")]
    Config(String),

    /// A router already has a handler for this source, event type and
    /// schema version (the reference's `HandlerAlreadyRegisteredError`).
    #[error("a handler for source {topic:?}, event type {event_type:?}, schema version {} is registered already", version.as_deref().map_or("(any)".to_string(), |v| format!("{v:?}")))]
    HandlerAlreadyRegistered {
        /// The (normalized) source or topic.
        topic: String,
        /// The event type.
        event_type: String,
        /// The schema version prefix, `None` for any version.
        version: Option<String>,
    },

    /// The database stayed unreachable past a run's bound (`--outage-limit`).
    #[error("{0}")]
    Outage(String),

    /// The message broker failed at run time (reading, committing offsets,
    /// seeking): what was committed stays, the rest is delivered again.
    #[error("{0}")]
    Broker(String),

    /// The database cannot be reached (refused, DNS, TLS, authentication, pool exhausted).
    #[error("cannot connect to the database {url}: {}", db_text(source))]
    StorageConnection {
        /// The database URL with its password redacted.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// A constraint of the database rejected the write (unique, check, not null).
    #[error("the database rejected the write: {}", db_text(.0))]
    StorageIntegrity(#[source] sqlx::Error),

    /// A statement or the pool timed out.
    #[error("database operation timed out: {}", db_text(.0))]
    StorageTimeout(#[source] sqlx::Error),

    /// A transaction failed to commit (serialization failure, deadlock, lost connection).
    #[error("database transaction failed: {}", db_text(.0))]
    StorageTransaction(#[source] sqlx::Error),

    /// Any other database error.
    #[error("database error: {}", db_text(.0))]
    Storage(#[source] sqlx::Error),

    /// Applying the schema migrations failed.
    #[error("migration failed: {}", migrate_text(.0))]
    Migration(#[source] sqlx::migrate::MigrateError),

    /// The schema's objects and its recorded migrations disagree in a way
    /// `migrate` cannot resolve safely (a migration partly applied without a
    /// record); the message says what is inconsistent and how to fix it.
    #[error("{0}")]
    Schema(String),

    /// A row read from the database does not decode into an event (corrupt or
    /// hand-edited row).
    #[error("row {id} cannot be read: {message}")]
    CorruptRow {
        /// The row's id as stored.
        id: String,
        /// What is wrong.
        message: String,
    },
}

impl Error {
    /// A validation error for `field`.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// True for errors caused by the caller's input (usage errors: exit code 2 in the CLI).
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            Error::Validation { .. }
                | Error::Config(_)
                | Error::NotFound { .. }
                | Error::HandlerAlreadyRegistered { .. }
        )
    }

    /// True when the failure is about reaching the database, not about the data.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::StorageConnection { .. } | Error::StorageTimeout(_)
        )
    }

    /// True when the database went away (restart, network, pool exhausted
    /// by an outage) rather than refused the statement: the work is retried
    /// once it is back, and nothing of the failed transaction was applied.
    pub fn is_outage(&self) -> bool {
        match self {
            Error::StorageConnection { .. }
            | Error::StorageTimeout(_)
            | Error::StorageTransaction(_)
            | Error::Outage(_) => true,
            Error::Storage(e) => is_shutdown_error(e),
            Error::InboxPersist { source, .. } => source.is_outage(),
            _ => false,
        }
    }
}

/// A driver error as an operator reads it: a server error by its message
/// alone (sqlx's text adds "error returned from database: " and, for
/// PostgreSQL, " at line N", the line of the server's own C source that
/// raised it, which means nothing to a reader), anything else as the driver
/// says it.
pub fn db_text(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_string(),
        other => other.to_string(),
    }
}

/// [`db_text`] for a migration's error.
pub fn migrate_text(e: &sqlx::migrate::MigrateError) -> String {
    use sqlx::migrate::MigrateError as M;
    match e {
        M::Execute(e) => db_text(e),
        M::ExecuteMigration(e, version) => {
            format!("while executing migration {version}: {}", db_text(e))
        }
        other => other.to_string(),
    }
}

/// A server error sent while PostgreSQL shuts down or restarts
/// (admin_shutdown, crash_shutdown, cannot_connect_now, ...).
fn is_shutdown_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        _ => false,
    }
}

/// Maps a driver error to the storage variants.
pub(crate) fn storage(err: sqlx::Error) -> Error {
    use sqlx::Error as E;
    match &err {
        E::PoolTimedOut => Error::StorageTimeout(err),
        E::Io(_) | E::Tls(_) | E::PoolClosed | E::WorkerCrashed => Error::StorageTransaction(err),
        E::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if code.starts_with("23") || db.kind() != sqlx::error::ErrorKind::Other {
                Error::StorageIntegrity(err)
            } else if code == "57014" {
                Error::StorageTimeout(err)
            } else if code == "40001" || code == "40P01" {
                Error::StorageTransaction(err)
            } else {
                Error::Storage(err)
            }
        }
        _ => Error::Storage(err),
    }
}

/// Shows up to ten ids, then how many more.
struct IdList<'a>(&'a [Uuid]);

impl fmt::Display for IdList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, id) in self.0.iter().take(10).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        if self.0.len() > 10 {
            write!(f, ", ... {} more", self.0.len() - 10)?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_update_names_rows_and_caps_the_list() {
        let ids: Vec<Uuid> = (0..12).map(|i| Uuid::from_u128(i + 1)).collect();
        let err = Error::ConcurrentUpdate {
            expected: 12,
            actual: 0,
            missing: ids,
        };
        let msg = err.to_string();
        assert!(msg.starts_with("concurrent update: expected 12 rows, updated 0"));
        assert!(msg.contains("00000000-0000-0000-0000-000000000001"));
        assert!(msg.ends_with(", ... 2 more]"), "{msg}");
    }

    #[test]
    fn invalid_state_includes_detail_when_given() {
        let err = Error::InvalidState {
            id: Uuid::nil(),
            current: "failed".into(),
            expected: "pending".into(),
            detail: Some("only pending events can be locked".into()),
        };
        assert_eq!(
            err.to_string(),
            "event 00000000-0000-0000-0000-000000000000 is failed, expected pending: only pending events can be locked"
        );
    }
}
