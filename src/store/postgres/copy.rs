//! Outbox rows through `COPY ... (FORMAT binary)`: the rows' encoding in
//! COPY's binary format, and the COPY of a chunk.

use sqlx::PgConnection;

use super::sql;
use crate::error::{Error, Result, storage};
use crate::model::{OutboxEvent, Timestamp};

/// Rows in COPY's binary format (PostgreSQL's documentation of `COPY`,
/// "Binary Format"): a header, then per row its field count and each
/// field as a length (-1: NULL) and the value in the type's binary form,
/// then a trailer. The server reads no text: no quoting, no parsing of
/// ids, numbers and times (a fifth less of its time than CSV here).
pub(super) mod binary {
    use crate::model::Timestamp;

    /// The signature, no flags, no header extension.
    pub(in crate::store::postgres) const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
    /// The end of the data: a field count of -1.
    pub(in crate::store::postgres) const TRAILER: &[u8] = &(-1i16).to_be_bytes();
    /// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

    /// Starts a row of `fields` fields.
    pub(super) fn row(buf: &mut Vec<u8>, fields: i16) {
        buf.extend_from_slice(&fields.to_be_bytes());
    }

    fn field(buf: &mut Vec<u8>, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        // A field over 2 GiB cannot be sent; the server refuses far smaller
        // ones (1 GB), and with this length it says so.
        let len = i32::try_from(len).unwrap_or(i32::MAX);
        buf.extend_from_slice(&len.to_be_bytes());
        for p in parts {
            buf.extend_from_slice(p);
        }
    }

    /// NULL.
    pub(super) fn null(buf: &mut Vec<u8>) {
        buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    /// `text`, `varchar`.
    pub(super) fn text(buf: &mut Vec<u8>, v: &str) {
        field(buf, &[v.as_bytes()]);
    }

    /// A nullable `text`, `varchar`.
    pub(super) fn opt_text(buf: &mut Vec<u8>, v: Option<&str>) {
        match v {
            Some(v) => text(buf, v),
            None => null(buf),
        }
    }

    /// `jsonb` from its JSON text (format version 1, then the text).
    pub(super) fn jsonb(buf: &mut Vec<u8>, json: &str) {
        field(buf, &[&[1], json.as_bytes()]);
    }

    /// `uuid`.
    pub(super) fn uuid(buf: &mut Vec<u8>, v: &uuid::Uuid) {
        field(buf, &[v.as_bytes()]);
    }

    /// `integer`.
    pub(super) fn int4(buf: &mut Vec<u8>, v: i32) {
        field(buf, &[&v.to_be_bytes()]);
    }

    /// `timestamptz`: microseconds from 2000-01-01 UTC (finer digits are
    /// dropped, as the text form this store writes drops them).
    pub(super) fn timestamptz(buf: &mut Vec<u8>, t: &Timestamp) {
        let micros = t.timestamp_micros().saturating_sub(PG_EPOCH_MICROS);
        field(buf, &[&micros.to_be_bytes()]);
    }
}

/// One row of [`sql::COPY_OUTBOX`] in COPY's binary format. An event whose
/// caller set no time gets `now` (the database's clock) as `scheduled_at`
/// and `created_at`.
pub(super) fn copy_outbox_row(
    buf: &mut Vec<u8>,
    e: &OutboxEvent,
    now: Option<&Timestamp>,
) -> Result<()> {
    e.validate_invariants()?;
    if e.locked_at.is_some() {
        return Err(Error::validation(
            "locked_at",
            "a new event cannot be inserted locked",
        ));
    }
    let payload = serde_json::to_string(&e.payload).expect("a JSON map serialises");
    let headers = e
        .headers
        .as_ref()
        .map(|h| serde_json::to_string(h).expect("a string map serialises"));
    binary::row(buf, 22);
    binary::uuid(buf, &e.id);
    binary::text(buf, &e.event_type);
    binary::jsonb(buf, &payload);
    match &headers {
        Some(h) => binary::jsonb(buf, h),
        None => binary::null(buf),
    }
    for v in [
        &e.trace_id,
        &e.idempotency_key,
        &e.correlation_id,
        &e.causation_id,
        &e.schema_version,
    ] {
        binary::opt_text(buf, v.as_deref());
    }
    binary::text(buf, e.status.as_str());
    binary::int4(buf, e.attempts_made);
    binary::int4(buf, e.max_attempts);
    binary::opt_text(buf, e.last_error.as_deref());
    let time = |t: &'_ Timestamp, db_clock: bool| match now {
        Some(now) if db_clock => *now,
        _ => *t,
    };
    binary::timestamptz(buf, &time(&e.scheduled_at, e.clock_default.scheduled_at));
    match &e.completed_at {
        Some(t) => binary::timestamptz(buf, t),
        None => binary::null(buf),
    }
    let created = time(&e.created_at, e.clock_default.created_at);
    binary::timestamptz(buf, &created);
    binary::timestamptz(buf, &created);
    binary::text(buf, &e.route.aggregate_type);
    binary::uuid(buf, &e.route.aggregate_id);
    binary::text(buf, &e.route.topic);
    binary::text(buf, &e.route.partition_key);
    binary::int4(buf, payload_bytes(&payload));
    Ok(())
}

/// The `payload_bytes` column of a payload serialised as `payload`.
pub(super) fn payload_bytes(payload: &str) -> i32 {
    i32::try_from(payload.len()).unwrap_or(i32::MAX)
}

/// Inserts a chunk without idempotency keys with COPY; `now` is the
/// database's clock, for events whose caller set no time.
pub(super) async fn copy_outbox(
    conn: &mut PgConnection,
    chunk: &[OutboxEvent],
    now: Option<Timestamp>,
) -> Result<()> {
    let mut buf = Vec::with_capacity(chunk.len() * 512);
    buf.extend_from_slice(binary::HEADER);
    for e in chunk {
        copy_outbox_row(&mut buf, e, now.as_ref())?;
    }
    buf.extend_from_slice(binary::TRAILER);
    let mut copy = conn.copy_in_raw(sql::COPY_OUTBOX).await.map_err(storage)?;
    if let Err(e) = copy.send(buf).await {
        let _ = copy.abort("send failed").await;
        return Err(storage(e));
    }
    copy.finish().await.map_err(storage)?;
    Ok(())
}
