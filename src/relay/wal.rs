//! The WAL relay's source (docs/design.md, "The WAL relay"): the outbox rows
//! PostgreSQL's write-ahead log says were inserted, read from a logical
//! replication slot (`pgoutput`, a publication of the outbox table's
//! inserts), pushed to a [`KeyFeed`] transaction by transaction.
//!
//! The stream only says which keys have new rows. The relay's claims walk
//! those keys with the claim's own rules, so what is published, and in
//! which order, is decided by the table as for the polling relay: a
//! message is the same message, per-key order the same order, and polling
//! relays can share the table. The slot's confirmed position follows the
//! feed's (a transaction is confirmed once its rows are published and
//! marked, or written back for later).
//!
//! The protocol is pgwire-replication's (connection, TLS, feedback); pgoutput
//! is decoded by pg_walstream's parser.

use std::sync::Arc;
use std::time::Duration;

use pg_walstream::{EventType, PgOutputDecoder};
use pgwire_replication::{
    Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode, TlsConfig,
};
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::pipeline::{FedRow, KeyFeed};

/// The slot a WAL relay reads by default.
pub const DEFAULT_SLOT: &str = "omnibox_outbox";
/// The publication of the outbox's inserts, by default.
pub const DEFAULT_PUBLICATION: &str = "omnibox_outbox";

/// Settings of the WAL source.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// The logical replication slot (created when missing).
    pub slot: String,
    /// The publication of the outbox table's inserts (created when
    /// missing).
    pub publication: String,
    /// How often the confirmed position is reported to the server.
    pub status_interval: Duration,
    /// When another relay holds the slot: wait for it to be free (a
    /// standby) instead of refusing to start.
    pub standby: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            slot: DEFAULT_SLOT.into(),
            publication: DEFAULT_PUBLICATION.into(),
            status_interval: Duration::from_secs(1),
            standby: false,
        }
    }
}

/// Checks a slot or publication name: PostgreSQL's rule for slot names
/// (lowercase letters, digits and `_`, at most 63), which also makes it a
/// plain identifier.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if crate::store::postgres::is_plain_identifier(name) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid {what} name {name:?}: use lowercase letters, digits and _ (at most 63, not starting with a digit)"
        )))
    }
}

/// What [`prepare`] found or made.
#[derive(Debug, Clone)]
pub struct WalStart {
    /// The slot's confirmed position (where the stream resumes).
    pub confirmed: u64,
    /// The slot was created now: rows committed before it are not in the
    /// stream (the relay's first scans send them).
    pub created_slot: bool,
    /// The publication was created now.
    pub created_publication: bool,
    /// The schema of the outbox table.
    pub schema: String,
}

/// Formats a position as PostgreSQL writes it (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses a position as PostgreSQL writes it.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some((hi << 32) | lo)
}

/// A slot as `pg_replication_slots` shows it: plugin, database, active,
/// active PID, confirmed position.
type SlotRow = (String, Option<String>, bool, Option<i32>, Option<String>);

fn storage(e: sqlx::Error) -> Error {
    Error::Storage(e)
}

/// Checks the server and sets up what the WAL relay reads: `wal_level`
/// must be `logical`; the publication is created when missing (it needs
/// the table's owner), and so is the slot. A slot another relay is reading
/// is refused with the holder's PID (or waited for, with `standby`).
pub async fn prepare(pool: &PgPool, opts: &WalOptions) -> Result<WalStart> {
    check_name("slot", &opts.slot)?;
    check_name("publication", &opts.publication)?;
    let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await
        .map_err(storage)?;
    if level != "logical" {
        return Err(Error::Config(format!(
            "the WAL relay needs wal_level = logical, and this server runs with {level}: run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL (or use the polling relay: omnibox publish without --source wal)"
        )));
    }
    let schema: String = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(pool)
        .await
        .map_err(storage)?;
    let publication: Option<bool> =
        sqlx::query_scalar("SELECT pubinsert FROM pg_publication WHERE pubname = $1")
            .bind(&opts.publication)
            .fetch_optional(pool)
            .await
            .map_err(storage)?;
    let mut created_publication = false;
    match publication {
        None => {
            // Only the columns the relay reads (PostgreSQL 15 and later):
            // the walsender then sends no payloads, so neither the stream
            // nor the relay's buffer carries a row's megabyte.
            let version: i32 =
                sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
                    .fetch_one(pool)
                    .await
                    .map_err(storage)?;
            let columns = if version >= 150_000 {
                " (id, topic, partition_key)"
            } else {
                ""
            };
            // An identifier cannot be bound; the name passed `check_name`.
            let ddl = format!(
                "CREATE PUBLICATION {} FOR TABLE outbox_events{columns} WITH (publish = 'insert', publish_via_partition_root = true)",
                opts.publication
            );
            sqlx::query(sqlx::AssertSqlSafe(ddl.clone())).execute(pool).await.map_err(|e| {
                Error::Config(format!(
                    "cannot create the publication {}: {}; run as the outbox table's owner: {ddl};",
                    opts.publication,
                    crate::redact::text(&e.to_string())
                ))
            })?;
            created_publication = true;
        }
        Some(inserts) => {
            let has_table: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_tables
                  WHERE pubname = $1 AND schemaname = current_schema() AND tablename = 'outbox_events')",
            )
            .bind(&opts.publication)
            .fetch_one(pool)
            .await
            .map_err(storage)?;
            if !inserts || !has_table {
                return Err(Error::Config(format!(
                    "the publication {} does not publish the inserts of {schema}.outbox_events; drop it (DROP PUBLICATION {};) or name another with --publication",
                    opts.publication, opts.publication
                )));
            }
        }
    }
    let (slot, created_slot) = loop {
        let slot: Option<SlotRow> = sqlx::query_as(
            "SELECT plugin::text, database::text, active, active_pid, confirmed_flush_lsn::text
                   FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&opts.slot)
        .fetch_optional(pool)
        .await
        .map_err(storage)?;
        match slot {
            None => {
                let created: std::result::Result<String, sqlx::Error> = sqlx::query_scalar(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                )
                .bind(&opts.slot)
                .fetch_one(pool)
                .await;
                match created {
                    Ok(lsn) => break (lsn, true),
                    // Another relay created it a moment ago: look again
                    // (it is in use: refused, or waited for).
                    Err(e)
                        if e.as_database_error().and_then(|d| d.code()).as_deref()
                            == Some("42710") => {}
                    Err(e) => {
                        return Err(Error::Config(format!(
                            "cannot create the replication slot {}: {} (the user needs the REPLICATION attribute: ALTER ROLE <user> REPLICATION;)",
                            opts.slot,
                            crate::redact::text(&e.to_string())
                        )));
                    }
                }
            }
            Some((plugin, database, active, pid, confirmed)) => {
                let db: String = sqlx::query_scalar("SELECT current_database()")
                    .fetch_one(pool)
                    .await
                    .map_err(storage)?;
                if plugin != "pgoutput" || database.as_deref() != Some(db.as_str()) {
                    return Err(Error::Config(format!(
                        "the replication slot {} exists for {} on database {}, not pgoutput on {db}: name another with --slot",
                        opts.slot,
                        plugin,
                        database.as_deref().unwrap_or("(none)")
                    )));
                }
                if active {
                    let pid = pid.map_or("?".to_string(), |p| p.to_string());
                    if opts.standby {
                        tracing::info!(slot = %opts.slot, pid, "the slot is in use by another relay; waiting (standby)");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    return Err(Error::Config(format!(
                        "the replication slot {} is in use by another WAL relay (server PID {pid}): one relay reads a slot; stop that one, start this one with --standby to take over when it stops, or give it its own --slot",
                        opts.slot
                    )));
                }
                break (confirmed.unwrap_or_else(|| "0/0".into()), false);
            }
        }
    };
    let confirmed = parse_lsn(&slot).ok_or_else(|| {
        Error::Schema(format!(
            "the replication slot {} reports the position {slot:?}",
            opts.slot
        ))
    })?;
    Ok(WalStart {
        confirmed,
        created_slot,
        created_publication,
        schema,
    })
}

/// The replication connection's settings from a PostgreSQL URL (host,
/// port, user, password, database; `sslmode`, `sslrootcert`, `sslcert`,
/// `sslkey`, a `host` parameter naming a socket directory), the password
/// from `PGPASSWORD` when the URL has none.
pub fn replication_config(url: &str, opts: &WalOptions, start: u64) -> Result<ReplicationConfig> {
    let bad = |why: &str| {
        Error::Config(format!(
            "invalid PostgreSQL URL {}: {why}",
            crate::redact::url(url)
        ))
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(bad("the WAL relay needs a postgres:// URL"));
    }
    let decode =
        |s: &str| percent_decode(s).ok_or_else(|| bad("a percent-encoded part is not UTF-8"));
    let mut host = parsed.host_str().map(str::to_string).unwrap_or_default();
    let mut sslmode = "prefer".to_string();
    let (mut root, mut cert, mut key) = (None, None, None);
    let mut user = decode(parsed.username())?;
    let mut password = parsed.password().map(decode).transpose()?;
    let mut database = decode(parsed.path().trim_start_matches('/'))?;
    let mut port = parsed.port().unwrap_or(5432);
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "sslmode" => sslmode = v.into_owned(),
            "sslrootcert" => root = Some(v.into_owned()),
            "sslcert" => cert = Some(v.into_owned()),
            "sslkey" => key = Some(v.into_owned()),
            "host" => host = v.into_owned(),
            "user" => user = v.into_owned(),
            "password" => password = Some(v.into_owned()),
            "dbname" => database = v.into_owned(),
            "port" => port = v.parse().map_err(|_| bad("the port is not a number"))?,
            _ => {}
        }
    }
    if host.is_empty() {
        host = "localhost".into();
    }
    if user.is_empty() {
        user = std::env::var("PGUSER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "postgres".into());
    }
    if database.is_empty() {
        database = user.clone();
    }
    let password = password
        .or_else(|| std::env::var("PGPASSWORD").ok())
        .unwrap_or_default();
    let mut tls = match sslmode.as_str() {
        "disable" => TlsConfig::disabled(),
        "allow" | "prefer" => TlsConfig {
            mode: SslMode::Prefer,
            ..TlsConfig::default()
        },
        "require" => TlsConfig::require(),
        "verify-ca" => TlsConfig::verify_ca(root.clone().map(Into::into)),
        "verify-full" => TlsConfig::verify_full(root.clone().map(Into::into)),
        other => {
            return Err(bad(&format!(
                "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    if let (Some(c), Some(k)) = (cert, key) {
        tls = tls.with_client_cert(c, k);
    }
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        &opts.slot,
        opts.publication.as_str(),
    )
    .with_port(port)
    .with_tls(tls)
    .with_start_lsn(Lsn::from_u64(start))
    .with_ack_lsn(Lsn::from_u64(start))
    .with_status_interval(opts.status_interval)
    .with_buffer_size(STREAM_BUFFER)
    .with_options("-c TimeZone=UTC -c DateStyle=ISO")
    .with_application_name(format!("omnibox-wal-{}", opts.slot)))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(h) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(h);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// How long a replication connection may take to start streaming (a
/// second in unit tests).
#[cfg(not(test))]
const CONNECT_WAIT: Duration = Duration::from_secs(30);
#[cfg(test)]
const CONNECT_WAIT: Duration = Duration::from_secs(1);

/// Keys waiting for a claim past which the rows of new transactions are
/// left to the scans.
const MAX_WAITING: usize = 200_000;

/// Rows of one transaction the stream keeps: a transaction that inserts
/// more (a bulk load of millions) gives its first ones, and the scans find
/// the rest, so the relay's memory does not grow with a transaction.
const MAX_TX_ROWS: usize = 100_000;

/// Replication messages buffered between the connection and the relay:
/// each is a row's three columns (or, from a publication of every column,
/// the whole row).
const STREAM_BUFFER: usize = 1024;

/// Whether a stream failure is the first of its kind since the stream
/// last read (to warn about it; later ones go to debug): its kind is
/// `what` (refused or broke), and whether it is about the slot (missing,
/// 42704, or no longer usable, 55000), which a restart does not mend. A
/// server going down and coming back (closed, refused, starting up) is
/// one outage.
fn first_of_kind(said: &mut Option<String>, what: &str, error: &str) -> bool {
    let slot = ["SQLSTATE 42704", "SQLSTATE 55000"]
        .iter()
        .any(|code| error.contains(code));
    let kind = format!("{what}{}", if slot { " slot" } else { "" });
    if said.as_deref() == Some(kind.as_str()) {
        return false;
    }
    *said = Some(kind);
    true
}

/// A stream's failure: whether it may be retried.
fn slot_busy(e: &pgwire_replication::PgWireError) -> bool {
    e.to_string().contains("55006")
}

/// Reads the slot until `shutdown`, pushing each committed transaction's
/// outbox inserts to `feed` and reporting the feed's position to the
/// server. A broken stream (the server restarted, the network) is
/// reconnected with backoff while the relay's scans go on; it resumes at
/// the slot's confirmed position, so transactions not yet confirmed come
/// again (their rows are already published and marked, or still pending:
/// a claim hands out only pending rows).
pub async fn stream(
    config: ReplicationConfig,
    schema: String,
    feed: Arc<KeyFeed>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = Duration::from_millis(200);
    let mut acked = feed.acked();
    let mut ever_read = false;
    // A stream that stays down is said once (until a session reads again),
    // not at every reconnection: an outage of minutes would log a line
    // every ten seconds. A failure of another kind is said too (the stream
    // ended by an administrator, then the slot found dropped).
    let mut said: Option<String> = None;
    // Whether new transactions' rows are being left to the scans, to say
    // it once while keys stay piled up (across reconnections).
    let mut leaving = false;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let start = *acked.borrow();
        let cfg = config
            .clone()
            .with_start_lsn(Lsn::from_u64(start))
            .with_ack_lsn(Lsn::from_u64(start));
        match read(cfg, &schema, &feed, &mut acked, &mut shutdown, &mut leaving).await {
            Ok(()) => return Ok(()),
            Err(Read::Fatal(e)) => return Err(e),
            // The first session refused by the server (not a network
            // error): a set-up mistake, said at once rather than retried
            // for ever while the relay only scans.
            Err(Read::Refused(e)) if !ever_read => {
                return Err(Error::Config(format!(
                    "the server refused the replication connection: {e} (the WAL relay's user needs the REPLICATION attribute, and pg_hba.conf a line for the replication pseudo-database: see docs/wal-relay.md)"
                )));
            }
            Err(Read::Refused(e)) => {
                if !first_of_kind(&mut said, "refused", &e) {
                    tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64, "the replication connection is still refused");
                } else {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "the server refused the replication connection; the relay goes on scanning the table and retries (logged once until it streams again)");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(Read::Broken(e, got_data)) => {
                ever_read |= got_data;
                if got_data {
                    backoff = Duration::from_millis(200);
                    said = None;
                }
                if !first_of_kind(&mut said, "broke", &e) {
                    tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64, "the replication stream is still down");
                } else {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "the replication stream broke; the relay goes on scanning the table and reconnects (logged once until it streams again)");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

enum Read {
    /// Retry: the error, and whether the stream had delivered anything.
    Broken(String, bool),
    /// The server refused the session (authentication, TLS, permission,
    /// no such slot): fatal for the first session, retried afterwards.
    Refused(String),
    Fatal(Error),
}

async fn read(
    cfg: ReplicationConfig,
    schema: &str,
    feed: &Arc<KeyFeed>,
    acked: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
    leaving: &mut bool,
) -> std::result::Result<(), Read> {
    let broken = |e: pgwire_replication::PgWireError, got: bool| {
        use pgwire_replication::PgWireError as E;
        let text = crate::redact::text(&e.to_string());
        // Authentication, privilege and a missing slot: a refusal, not an
        // outage (a server starting up says 57P03, and is retried).
        let refused = matches!(e, E::Auth(_) | E::Tls(_))
            || ["28000", "28P01", "42501", "42704"]
                .iter()
                .any(|code| text.contains(&format!("SQLSTATE {code}")));
        if slot_busy(&e) {
            Read::Broken(
                format!("the slot is still held by a previous session: {text}"),
                got,
            )
        } else if refused && !got {
            Read::Refused(text)
        } else {
            Read::Broken(text, got)
        }
    };
    // Connecting may wait on an unreachable host: a stop ends the wait,
    // and a server that accepts the connection but never answers is given
    // up on after CONNECT_WAIT (logged, then retried), not waited for in
    // silence while the relay only scans.
    let connect = async {
        let mut client = ReplicationClient::connect(cfg)
            .await
            .map_err(|e| broken(e, false))?;
        match tokio::time::timeout(CONNECT_WAIT, client.wait_started()).await {
            Ok(started) => started.map_err(|e| broken(e, false))?,
            Err(_) => {
                // The client's worker, waiting in the connection, does not
                // see a stop there: end it, and its socket with it, or each
                // retry would leave one behind.
                client.abort();
                return Err(Read::Broken(
                    format!(
                        "the server did not start the stream within {}s",
                        CONNECT_WAIT.as_secs()
                    ),
                    false,
                ));
            }
        }
        Ok::<_, Read>(client)
    };
    let mut stop = shutdown.clone();
    let stopped = async move {
        // A sender gone never stops it.
        if stop.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let mut client = tokio::select! {
        client = connect => client?,
        () = stopped => return Ok(()),
    };
    tracing::info!(start = %format_lsn(*acked.borrow()), "reading the replication stream");
    let mut decoder = PgOutputDecoder::with_protocol_version(1);
    let mut rows: Vec<FedRow> = Vec::new();
    let mut in_tx = false;
    let mut got = false;
    // A closed channel answers at once for ever: stop watching it.
    let (mut shutdown_open, mut acked_open) = (true, true);
    // Keys pile up while claims are paused (the broker down): past a bound
    // the rows of new transactions are left to the table's scans (as a
    // transaction's rows past MAX_TX_ROWS are), and the stream goes on
    // being read, so that the server's requests are answered (a shutdown
    // waits for them).
    loop {
        tokio::select! {
            biased;
            changed = shutdown.changed(), if shutdown_open => {
                shutdown_open = changed.is_ok();
                if *shutdown.borrow() {
                    let _ = client.shutdown().await;
                    return Ok(());
                }
            }
            changed = acked.changed(), if acked_open => {
                acked_open = changed.is_ok();
                if acked_open {
                    client.update_applied_lsn(Lsn::from_u64(*acked.borrow()));
                }
            }
            event = client.recv() => {
                let event = match event {
                    Ok(Some(e)) => e,
                    Ok(None) => return Err(Read::Broken("the server ended the stream".into(), got)),
                    Err(e) => return Err(broken(e, got)),
                };
                got = true;
                match event {
                    ReplicationEvent::Begin { .. } => {
                        rows.clear();
                        in_tx = true;
                    }
                    ReplicationEvent::XLogData { wal_start, data, .. } => {
                        if let Some(row) = decode(&mut decoder, data, wal_start.as_u64(), schema)
                            .map_err(Read::Fatal)?
                            && rows.len() < MAX_TX_ROWS
                        {
                            rows.push(row);
                        }
                    }
                    ReplicationEvent::Commit { end_lsn, .. } => {
                        in_tx = false;
                        let waiting = feed.waiting();
                        if waiting >= MAX_WAITING {
                            if !std::mem::replace(leaving, true) {
                                tracing::warn!(
                                    keys = waiting,
                                    "keys wait for a claim (claims paused: is the broker down?); the rows of new transactions are left to the table's scans until fewer wait"
                                );
                            }
                            rows.clear();
                        } else if std::mem::replace(leaving, false) {
                            tracing::info!("keys are fed from the stream again");
                        }
                        feed.push(end_lsn.as_u64(), std::mem::take(&mut rows));
                    }
                    ReplicationEvent::KeepAlive { wal_end, reply_requested, .. } => {
                        if !in_tx {
                            feed.idle_at(wal_end.as_u64());
                        }
                        // PostgreSQL asks for an answer when it stops: a
                        // fast shutdown waits until each logical client has
                        // confirmed everything it was sent, with no time
                        // limit while the client answers (the client's
                        // worker has answered at once with what it had, and
                        // the server asks again). It asks too when it has
                        // not heard from a client for half its
                        // wal_sender_timeout. The stream's end is confirmed
                        // then: rows not yet settled stay pending in the
                        // table (keys queued here are still walked; after
                        // a restart the scans find them), so nothing is
                        // lost, and the relay does not hold up a shutdown.
                        if reply_requested {
                            tracing::debug!(wal_end = %format_lsn(wal_end.as_u64()), "the server asked for an answer: confirming the stream's end");
                            client.update_applied_lsn(wal_end);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// One pgoutput message: an outbox row when it is an insert into the
/// outbox table. A data message for a relation the stream never described
/// is an error (the decoder would drop it).
fn decode(
    decoder: &mut PgOutputDecoder,
    data: bytes::Bytes,
    lsn: u64,
    schema: &str,
) -> Result<Option<FedRow>> {
    let kind = data.first().copied();
    let event = decoder
        .decode_message(data, pg_walstream::Lsn(lsn))
        .map_err(|e| {
            Error::Schema(format!(
                "cannot decode the replication stream at {}: {e}",
                format_lsn(lsn)
            ))
        })?;
    let Some(event) = event else {
        if kind == Some(b'I') {
            return Err(Error::Schema(format!(
                "the replication stream sent an insert at {} for a table it had not described",
                format_lsn(lsn)
            )));
        }
        return Ok(None);
    };
    let EventType::Insert {
        schema: s,
        table,
        data,
        ..
    } = event.event_type
    else {
        return Ok(None);
    };
    if &*s != schema || &*table != "outbox_events" {
        return Ok(None);
    }
    let text = |name: &str| -> Result<String> {
        data.get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Schema(format!(
                    "an outbox insert at {} has no text value for {name}",
                    format_lsn(lsn)
                ))
            })
    };
    let id = text("id")?;
    let id = Uuid::parse_str(&id).map_err(|e| {
        Error::Schema(format!(
            "an outbox insert at {} has the id {id:?}: {e}",
            format_lsn(lsn)
        ))
    })?;
    Ok(Some(FedRow {
        id,
        topic: text("topic")?,
        partition_key: text("partition_key")?,
    }))
}

#[cfg(test)]
mod tests;
