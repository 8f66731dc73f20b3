//! Writing events in the caller's own transaction, on either backend: the
//! service's business rows and its outbox rows commit or roll back together.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool, event: omnibox::OutboxEvent) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = pool.begin().await?;
//! // ... the service's own writes on `tx` ...
//! omnibox::insert_outbox(&mut tx, &[event]).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use futures_util::future::BoxFuture;
use sqlx::{PgConnection, Postgres, Sqlite, SqliteConnection, Transaction};

use super::{BulkOutcome, postgres, sqlite};
use crate::error::Result;
use crate::model::{InboxEvent, OutboxEvent};

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::PgConnection {}
    impl Sealed for sqlx::SqliteConnection {}
    impl Sealed for sqlx::Transaction<'_, sqlx::Postgres> {}
    impl Sealed for sqlx::Transaction<'_, sqlx::Sqlite> {}
}

/// A connection, or an open transaction, of a backend omnibox stores events
/// in: `sqlx`'s `PgConnection`, `SqliteConnection`, or a `Transaction` of
/// either. Events written on it with [`insert_outbox`] and [`insert_inbox`]
/// are part of that transaction.
pub trait EventConnection: sealed::Sealed + Send {
    /// See [`insert_outbox`].
    #[doc(hidden)]
    fn write_outbox<'a>(
        &'a mut self,
        events: &'a [OutboxEvent],
    ) -> BoxFuture<'a, Result<Vec<BulkOutcome>>>;

    /// See [`insert_inbox`].
    #[doc(hidden)]
    fn write_inbox<'a>(
        &'a mut self,
        events: &'a [InboxEvent],
    ) -> BoxFuture<'a, Result<Vec<BulkOutcome>>>;
}

/// `EventConnection` for a connection type, through its backend's inserts.
macro_rules! event_connection {
    ($conn:ty, $backend:ident) => {
        impl EventConnection for $conn {
            fn write_outbox<'a>(
                &'a mut self,
                events: &'a [OutboxEvent],
            ) -> BoxFuture<'a, Result<Vec<BulkOutcome>>> {
                Box::pin($backend::insert_outbox(self, events))
            }

            fn write_inbox<'a>(
                &'a mut self,
                events: &'a [InboxEvent],
            ) -> BoxFuture<'a, Result<Vec<BulkOutcome>>> {
                Box::pin($backend::insert_inbox(self, events))
            }
        }
    };
}

event_connection!(PgConnection, postgres);
event_connection!(SqliteConnection, sqlite);
event_connection!(Transaction<'_, Postgres>, postgres);
event_connection!(Transaction<'_, Sqlite>, sqlite);

/// Writes outbox events on `conn` (a connection, or the caller's open
/// transaction: `&mut tx`), in order, so that they commit or roll back with
/// the caller's own writes. Nothing is committed here. An event whose
/// idempotency key is already taken is not written again: its outcome names
/// the row that holds the key (`existing`).
pub async fn insert_outbox<C: EventConnection + ?Sized>(
    conn: &mut C,
    events: &[OutboxEvent],
) -> Result<Vec<BulkOutcome>> {
    conn.write_outbox(events).await
}

/// Writes inbox events on `conn` (a connection, or the caller's open
/// transaction), in order; a message already stored for its consumer group
/// is not written again (its outcome is `existing`). Nothing is committed
/// here.
pub async fn insert_inbox<C: EventConnection + ?Sized>(
    conn: &mut C,
    events: &[InboxEvent],
) -> Result<Vec<BulkOutcome>> {
    conn.write_inbox(events).await
}
