//! The operations an on-call engineer runs, as a library: what `omnibox
//! replay`, `unlock`, `release-stale-locks`, `cleanup`, `status` and
//! `doctor` call. Each function takes an [`AnyStore`](crate::store::AnyStore), checks what it is
//! given before it changes anything, writes its audit rows in the
//! transaction of its change, and returns what it did; none prints, asks
//! for confirmation or reads flags (the CLI does that around it).
//!
//! ```no_run
//! # async fn demo(store: omnibox::store::AnyStore) -> omnibox::Result<()> {
//! use omnibox::ops::{self, cleanup::Retention};
//! use omnibox::store::audit::AuditEntry;
//! use std::time::Duration;
//!
//! // What a nightly job does: delete completed rows older than a week.
//! let retention = Retention::new(Duration::from_secs(7 * 86_400));
//! let tables = ops::tables(None);
//! let done = ops::cleanup::delete(&store, &tables, &retention, &AuditEntry::new("cron", "cleanup"), |_| {}).await?;
//! for t in &done {
//!     println!("{}: {} completed rows deleted", t.table, t.completed);
//! }
//! # Ok(())
//! # }
//! ```

pub mod cleanup;
pub mod diagnostics;
pub mod release;
pub mod replay;
pub mod status;
pub mod unlock;

use crate::model::Table;

/// The event tables an operation covers: `only`, or both (outbox first).
pub fn tables(only: Option<Table>) -> Vec<Table> {
    match only {
        Some(t) => vec![t],
        None => Table::ALL.to_vec(),
    }
}

/// Merges two lists each in its own order into one, by `key` (stable: on
/// a tie the first list's row comes first).
pub fn merge_by<T, K: Ord>(a: Vec<T>, b: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut a = a.into_iter().peekable();
    let mut b = b.into_iter().peekable();
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => key(x) <= key(y),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return out,
        };
        out.extend(if take_a { a.next() } else { b.next() });
    }
}

/// Runs `$body` with `$t` bound to the [`AnyTable`](crate::store::AnyTable)
/// of `$table` (a [`Table`]) in `$store`: one expression for both event
/// tables, whose row types differ.
macro_rules! on_table {
    ($store:expr, $table:expr, $t:ident => $body:expr) => {
        match $table {
            $crate::model::Table::Outbox => {
                let $t = $store.outbox();
                $body
            }
            $crate::model::Table::Inbox => {
                let $t = $store.inbox();
                $body
            }
        }
    };
}
pub(crate) use on_table;
