//! Held claims ([`ClaimOptions::hold`]): the outbox claim's transaction
//! stays open with the rows locked, and nothing is written to them until
//! they are done. A completion writes each row once, in that transaction;
//! any other write of the claim first writes the lease the claim would have
//! written (`OUTBOX_MARK`, with the same `locked_at`: `now()` is the
//! transaction's start), commits, and goes on as for a leased claim.

use std::collections::HashSet;
use std::time::Instant;

use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{PgRoute, PgTable, created_bounds, decode};
use crate::error::{Result, storage};
use crate::model::Event;
use crate::store::held::Held;
use crate::store::table::decode_all;
use crate::store::{ClaimOptions, ClaimToken};

/// The ready rows a claim's lock read whole (`sql::OUTBOX_LOCK_READ`), by
/// id, not decoded yet (only those the claim keeps are).
pub(super) type Read = std::collections::HashMap<Uuid, sqlx::postgres::PgRow>;

impl<R: PgRoute> PgTable<R> {
    /// Keeps `tx` open for the claimed rows `ids`, as the claim's lock read
    /// them (`read`, see `sql::OUTBOX_LOCK_READ`); returns the events, and
    /// the claim to keep (`None`: `tx` is committed).
    ///
    /// Only rows without a lease are held. When a row still carries a lease
    /// that ran out, its former holder may yet write it under that lease,
    /// and such a write would wait for this transaction's row lock while
    /// this worker's own writes may wait for that holder's: the claim then
    /// writes its lease on every row, as a leased claim does, and commits.
    pub(super) async fn hold(
        &self,
        mut tx: Transaction<'static, Postgres>,
        opts: &ClaimOptions,
        ids: &[Uuid],
        mut read: Read,
        (from, to): (crate::model::Timestamp, crate::model::Timestamp),
    ) -> Result<(Vec<Event<R>>, Option<Held<Postgres>>)> {
        let mut leased = false;
        let mut events: Vec<Event<R>> = Vec::with_capacity(ids.len());
        for row in ids.iter().filter_map(|id| read.remove(id)) {
            leased |= row.try_get::<bool, _>("leased").unwrap_or(true);
            events.push(decode(&row)?);
        }
        drop(read);
        if leased {
            let lease = (opts.worker.as_str(), opts.lease);
            let events = self::leased(&mut tx, ids, lease, (from, to)).await?;
            tx.commit().await.map_err(storage)?;
            return Ok((events, None));
        }
        if events.is_empty() {
            tx.commit().await.map_err(storage)?;
            return Ok((events, None));
        }
        let held = Held {
            tx,
            ids: events.iter().map(|e| e.id()).collect(),
            touched: Instant::now(),
            lease: opts.lease,
        };
        Ok((events, Some(held)))
    }

    /// Takes the held claim of `token` out for good (its last write);
    /// `None`: not held (any more). The claim's lock is held meanwhile, so a
    /// heartbeat running now finishes first.
    async fn take_held(&self, token: &ClaimToken) -> Option<Held<Postgres>> {
        let cell = self.held.cell(token)?;
        let held = cell.lock().await.take();
        self.held.remove(token);
        held
    }

    /// Completes `ids` of the held claim of `token` in its transaction, and
    /// commits; the claim's other rows get their lease first (their
    /// failures or releases follow as for a leased claim). `None`: the
    /// claim is not held.
    pub(super) async fn complete_held(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
    ) -> Result<Option<Vec<Uuid>>> {
        let Some(mut held) = self.take_held(token).await else {
            return Ok(None);
        };
        let done: HashSet<Uuid> = ids.iter().copied().collect();
        let rest: Vec<Uuid> = held
            .ids
            .iter()
            .filter(|id| !done.contains(id))
            .copied()
            .collect();
        let (from, to) = created_bounds(token.created_between);
        if !rest.is_empty() {
            mark(&mut held.tx, &rest, token).await?;
        }
        let completed: Vec<Uuid> = sqlx::query_scalar(super::sql::OUTBOX_COMPLETE_HELD)
            .bind(ids)
            .bind(from)
            .bind(to)
            .fetch_all(&mut *held.tx)
            .await
            .map_err(storage)?;
        held.tx.commit().await.map_err(storage)?;
        Ok(Some(completed))
    }

    /// The rows among `ids` the held claim of `token` holds, after a
    /// statement on its transaction (which keeps the server's idle timer
    /// from ending it: the lease's heartbeat). `None`: not held.
    pub(super) async fn touch_held(
        &self,
        token: &ClaimToken,
        ids: &[Uuid],
    ) -> Result<Option<Vec<Uuid>>> {
        let Some(cell) = self.held.cell(token) else {
            return Ok(None);
        };
        let mut guard = cell.lock().await;
        let Some(held) = guard.as_mut() else {
            return Ok(None);
        };
        sqlx::query("SELECT 1")
            .execute(&mut *held.tx)
            .await
            .map_err(storage)?;
        held.touched = Instant::now();
        let mine: HashSet<Uuid> = held.ids.iter().copied().collect();
        Ok(Some(
            ids.iter().copied().filter(|id| mine.contains(id)).collect(),
        ))
    }

    /// Turns the held claim of `token`, if it is one, into a leased claim:
    /// writes the lease on its rows and commits.
    pub(super) async fn lease_held(&self, token: &ClaimToken) -> Result<()> {
        if let Some(mut held) = self.take_held(token).await {
            mark(&mut held.tx, &held.ids, token).await?;
            held.tx.commit().await.map_err(storage)?;
        }
        Ok(())
    }
}

/// Writes the lease of `token`'s claim on `ids` (in the claim's
/// transaction: `locked_at` is the token's).
async fn mark(tx: &mut sqlx::PgConnection, ids: &[Uuid], token: &ClaimToken) -> Result<()> {
    let bounds = created_bounds(token.created_between);
    let lease = (token.worker.as_str(), token.lease);
    leased::<crate::model::OutboxRoute>(tx, ids, lease, bounds).await?;
    Ok(())
}

/// Writes the lease `(worker, lease)` on the claimed rows `ids` whose
/// `created_at` lies in `bounds` (`OUTBOX_MARK`: `locked_at` is the
/// transaction's start); returns them.
pub(super) async fn leased<R: PgRoute>(
    tx: &mut sqlx::PgConnection,
    ids: &[Uuid],
    (worker, lease): (&str, std::time::Duration),
    (from, to): (crate::model::Timestamp, crate::model::Timestamp),
) -> Result<Vec<Event<R>>> {
    let rows = sqlx::query(super::sql::OUTBOX_MARK)
        .bind(ids)
        .bind(worker)
        .bind(crate::store::secs(lease))
        .bind(from)
        .bind(to)
        .fetch(&mut *tx);
    decode_all(rows, decode).await
}
