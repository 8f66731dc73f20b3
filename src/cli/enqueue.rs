//! `omnibox enqueue`: insert outbox events from flags or JSON lines.

use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;
use omnibox::store::BulkOutcome;
use omnibox::{DomainService, Headers, NewOutboxEvent, OutboxEvent, OutboxStore, Timestamp, time};
use uuid::Uuid;

use super::output::{self, Format};
use super::{Context, ExitStatus, UsageError, args};

/// Rows per insert statement and per hand-over from the parser.
const CHUNK: usize = 1000;
/// Input bytes per hand-over from the parser: a chunk of large events ends
/// once its lines hold this much, so the parser's chunk, the one waiting in
/// the channel and the one being inserted stay a few MiB, whatever the size
/// of the input (the transaction stays one).
const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Longest accepted input line (a payload is at most 1,000,000 bytes).
const MAX_LINE: u64 = 4 * 1024 * 1024;
/// Ids kept in memory for `--format json`; past this they go to a
/// temporary file, so the report of any input fits in bounded memory.
const IDS_IN_MEMORY: usize = 65_536;

/// Insert outbox events: one from flags, or many as JSON lines
///
/// With --jsonl, each line of the input is one event: an object with the
/// fields aggregate_type, aggregate_id (UUID), event_type, topic,
/// partition_key and payload (object), and optionally id, headers,
/// idempotency_key, trace_id, correlation_id, causation_id, schema_version,
/// max_attempts and scheduled_at (RFC 3339 with an offset). The input is
/// validated and inserted in one transaction: a bad line is reported with
/// its number and nothing of the input is written. An event whose
/// idempotency key exists already is not inserted again.
///
/// Examples:
///   omnibox enqueue --aggregate-type order --aggregate-id 0190f1d2-7a3b-7cde-8f00-123456789abc \
///       --event-type order.created --topic orders --partition-key order-42 --payload '{"total": 12.5}'
///   omnibox enqueue --jsonl events.jsonl
///   generate-events | omnibox enqueue --jsonl
///   omnibox enqueue < events.jsonl          # no event flags, stdin piped: JSON lines
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct EnqueueArgs {
    /// Read events as JSON lines from PATH, or from stdin when PATH is - or omitted
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "-")]
    jsonl: Option<PathBuf>,

    /// Kind of aggregate, e.g. order
    #[arg(long, value_name = "TYPE", conflicts_with = "jsonl")]
    aggregate_type: Option<String>,
    /// The aggregate's id (UUID)
    #[arg(long, value_name = "UUID", value_parser = args::uuid, conflicts_with = "jsonl")]
    aggregate_id: Option<Uuid>,
    /// Event type, e.g. order.created
    #[arg(long, value_name = "TYPE", conflicts_with = "jsonl")]
    event_type: Option<String>,
    /// Broker topic
    #[arg(long, conflicts_with = "jsonl")]
    topic: Option<String>,
    /// Broker key; events of one key are published in order
    #[arg(long, value_name = "KEY", conflicts_with = "jsonl")]
    partition_key: Option<String>,
    /// The payload: a JSON object, or @PATH to read it from a file
    #[arg(long, value_name = "JSON", conflicts_with = "jsonl")]
    payload: Option<String>,
    /// A header KEY=VALUE (repeatable)
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header, conflicts_with = "jsonl")]
    headers: Vec<(String, String)>,
    /// Event id [default: a new UUIDv7]
    #[arg(long, value_parser = args::uuid, conflicts_with = "jsonl")]
    id: Option<Uuid>,
    /// Idempotency key: an event with an existing key is not inserted again
    #[arg(long, value_name = "KEY", conflicts_with = "jsonl")]
    idempotency_key: Option<String>,
    /// Trace id
    #[arg(long, conflicts_with = "jsonl")]
    trace_id: Option<String>,
    /// Correlation id
    #[arg(long, conflicts_with = "jsonl")]
    correlation_id: Option<String>,
    /// Causation id
    #[arg(long, conflicts_with = "jsonl")]
    causation_id: Option<String>,
    /// Payload schema version, e.g. 1.0.0
    #[arg(long, value_name = "VERSION", conflicts_with = "jsonl")]
    schema_version: Option<String>,
    /// Counted failures before the event is failed [default: 6]
    #[arg(long, value_name = "N", conflicts_with = "jsonl")]
    max_attempts: Option<i32>,
    /// Publish no earlier than this time (RFC 3339 with an offset)
    #[arg(long, value_name = "TIME", value_parser = parse_time, conflicts_with = "jsonl")]
    scheduled_at: Option<Timestamp>,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    time::parse("scheduled_at", s).map_err(args::refusal)
}

/// What enqueue reports: `{"inserted", "existing", "ids"}` with
/// `--format json`.
#[derive(Debug, Default)]
struct Report {
    /// Rows written.
    inserted: u64,
    /// Inputs whose idempotency key existed (nothing written).
    existing: u64,
    /// The first input's row id (the table report names it when there is
    /// one input).
    first: Option<Uuid>,
    /// Id of each input's row, in input order (the existing row's id for
    /// an existing key), kept for `--format json` only.
    ids: Option<Ids>,
}

/// Ids in input order: the first [`IDS_IN_MEMORY`] in memory, the rest in
/// an unnamed temporary file (16 bytes each).
#[derive(Debug, Default)]
struct Ids {
    memory: Vec<Uuid>,
    spill: Option<std::io::BufWriter<std::fs::File>>,
    spilled: u64,
    /// The temporary file could not be made: everything stays in memory.
    no_spill: bool,
}

impl Ids {
    fn push(&mut self, id: Uuid) -> std::io::Result<()> {
        use std::io::Write as _;
        if self.spill.is_none() && !self.no_spill && self.memory.len() >= IDS_IN_MEMORY {
            match unnamed_temp_file() {
                Ok(f) => self.spill = Some(std::io::BufWriter::with_capacity(1 << 16, f)),
                Err(e) => {
                    tracing::debug!(error = %e, "no temporary file for the ids; keeping them in memory");
                    self.no_spill = true;
                }
            }
        }
        match &mut self.spill {
            Some(w) => {
                w.write_all(id.as_bytes())?;
                self.spilled += 1;
            }
            None => self.memory.push(id),
        }
        Ok(())
    }

    /// Calls `each` with every id in order.
    fn for_each(mut self, mut each: impl FnMut(Uuid) -> Result<()>) -> Result<()> {
        use std::io::{Read as _, Seek as _};
        for id in self.memory.drain(..) {
            each(id)?;
        }
        let Some(w) = self.spill.take() else {
            return Ok(());
        };
        let mut f = w.into_inner().map_err(|e| e.into_error())?;
        f.seek(std::io::SeekFrom::Start(0))?;
        let mut r = std::io::BufReader::with_capacity(1 << 16, f);
        let mut buf = [0u8; 16];
        for _ in 0..self.spilled {
            r.read_exact(&mut buf)?;
            each(Uuid::from_bytes(buf))?;
        }
        Ok(())
    }
}

/// A temporary file that is gone once closed (removed from its directory
/// at once).
fn unnamed_temp_file() -> std::io::Result<std::fs::File> {
    let dir = std::env::temp_dir();
    for attempt in 0..16u32 {
        let path = dir.join(format!(
            "omnibox-enqueue-{}-{}-{attempt}",
            std::process::id(),
            fastrand::u64(..)
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => {
                let _ = std::fs::remove_file(&path);
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary file name"))
}

impl Report {
    /// A report; `ids`: keep every id (for `--format json`).
    fn new(ids: bool) -> Self {
        Report {
            ids: ids.then(Ids::default),
            ..Report::default()
        }
    }

    fn count(&self) -> u64 {
        self.inserted + self.existing
    }

    fn add(&mut self, outcomes: &[BulkOutcome]) -> std::io::Result<()> {
        for o in outcomes {
            if o.existing {
                self.existing += 1;
            } else {
                self.inserted += 1;
            }
            self.first.get_or_insert(o.id);
            if let Some(ids) = &mut self.ids {
                ids.push(o.id)?;
            }
        }
        Ok(())
    }

    /// The JSON report, as `output::json` prints a value (pretty), written
    /// as the ids are read back.
    fn print_json(self) -> Result<()> {
        use std::io::Write as _;
        if output::quiet() {
            // Written only after the commit: nothing to release on failure.
            return Ok(());
        }
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        write!(
            out,
            "{{\n  \"inserted\": {},\n  \"existing\": {},\n  \"ids\": [",
            self.inserted, self.existing
        )?;
        let mut first = true;
        if let Some(ids) = self.ids {
            ids.for_each(|id| {
                write!(out, "{}\n    \"{id}\"", if first { "" } else { "," })?;
                first = false;
                Ok(())
            })?;
        }
        if first {
            writeln!(out, "]\n}}")?;
        } else {
            writeln!(out, "\n  ]\n}}")?;
        }
        out.flush()?;
        Ok(())
    }
}

/// The flags one event needs, by name, with whether each was given.
fn event_flags(args: &EnqueueArgs) -> [(&'static str, bool); 6] {
    [
        ("--aggregate-type", args.aggregate_type.is_some()),
        ("--aggregate-id", args.aggregate_id.is_some()),
        ("--event-type", args.event_type.is_some()),
        ("--topic", args.topic.is_some()),
        ("--partition-key", args.partition_key.is_some()),
        ("--payload", args.payload.is_some()),
    ]
}

pub async fn run(args: EnqueueArgs, ctx: &Context) -> Result<ExitStatus> {
    let flags = event_flags(&args);
    let jsonl = match args.jsonl.clone() {
        Some(path) => Some(path),
        // `omnibox enqueue < events.jsonl`: no event flags and a piped stdin
        // mean JSON lines.
        None if flags.iter().all(|(_, given)| !given) => {
            if std::io::stdin().is_terminal() {
                return Err(UsageError(
                    "enqueue needs an event: --aggregate-type, --aggregate-id, --event-type, --topic, --partition-key and --payload, or --jsonl PATH (JSON lines; stdin when piped)".into(),
                )
                .into());
            }
            Some(PathBuf::from("-"))
        }
        None => {
            let missing: Vec<&str> = flags
                .iter()
                .filter(|(_, given)| !given)
                .map(|(name, _)| *name)
                .collect();
            if !missing.is_empty() {
                return Err(UsageError(format!(
                    "an event from flags also needs {} (or give --jsonl for JSON lines)",
                    missing.join(", ")
                ))
                .into());
            }
            None
        }
    };
    let json = ctx.format() == Format::Json;
    let report = match jsonl {
        Some(path) => from_lines(path, ctx, json).await?,
        None => from_flags(args, ctx, json).await?,
    };
    if report.count() == 0 {
        if json {
            report.print_json()?;
        }
        crate::cli::output::notice!("omnibox: the input held no events; nothing was enqueued");
        return Ok(ExitStatus::No);
    }
    match ctx.format() {
        Format::Json => report.print_json()?,
        Format::Table => {
            let noun = if report.inserted == 1 {
                "event"
            } else {
                "events"
            };
            let mut msg = format!("Enqueued {} {noun}", report.inserted);
            if report.existing > 0 {
                msg.push_str(&format!(
                    "; {} already existed (same idempotency key)",
                    report.existing
                ));
            }
            if let (1, Some(id)) = (report.count(), report.first) {
                msg.push_str(&format!(": {id}"));
            }
            output::line(format!("{msg}."))?;
        }
    }
    Ok(ExitStatus::Success)
}

async fn from_flags(args: EnqueueArgs, ctx: &Context, json: bool) -> Result<Report> {
    // `run` checked that every event flag is given.
    let Some(payload_text) = args.payload else {
        return Err(UsageError("--payload is required".into()).into());
    };
    let payload_text = match payload_text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the payload file {path}"))?,
        None => payload_text,
    };
    let payload: serde_json::Value = serde_json::from_str(&payload_text).map_err(|e| {
        let msg = omnibox::model::input::json_error(e).to_string();
        UsageError(format!("--payload: {}", msg.trim_start_matches("json: ")))
    })?;
    let headers: Option<Headers> = if args.headers.is_empty() {
        None
    } else {
        let mut headers = Headers::new();
        for (k, v) in args.headers {
            if headers.contains_key(&k) {
                return Err(UsageError(format!(
                    "--header {k} is given twice; give each header once"
                ))
                .into());
            }
            headers.insert(k, v);
        }
        Some(headers)
    };
    let (
        Some(aggregate_type),
        Some(aggregate_id),
        Some(event_type),
        Some(topic),
        Some(partition_key),
    ) = (
        args.aggregate_type,
        args.aggregate_id,
        args.event_type,
        args.topic,
        args.partition_key,
    )
    else {
        return Err(UsageError("an event from flags needs every event flag".into()).into());
    };
    let new = NewOutboxEvent {
        aggregate_type,
        aggregate_id,
        event_type,
        topic,
        partition_key,
        payload,
        headers,
        id: args.id,
        idempotency_key: args.idempotency_key,
        trace_id: args.trace_id,
        correlation_id: args.correlation_id,
        causation_id: args.causation_id,
        schema_version: args.schema_version,
        max_attempts: args.max_attempts,
        scheduled_at: args.scheduled_at,
        created_at: None,
    };
    let event = DomainService::default().create_outbox_event(new)?;
    let store = ctx.store().await?;
    let created = store.outbox().create(&event).await?;
    let mut report = Report::new(json);
    report.add(&[BulkOutcome {
        existing: !created.is_inserted(),
        id: created.into_inner().id(),
    }])?;
    Ok(report)
}

/// Parses and validates on a blocking thread while the previous chunk is
/// inserted; everything goes into one transaction. Memory stays bounded
/// whatever the input's size: chunks of at most [`CHUNK`] rows and about
/// [`CHUNK_BYTES`] of input, one of them parsed while one waits and one is
/// inserted, and the report keeps counts (and, for JSON, ids spilled to a
/// temporary file past [`IDS_IN_MEMORY`]).
async fn from_lines(path: PathBuf, ctx: &Context, json: bool) -> Result<Report> {
    let input: Box<dyn Read + Send> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&path)
                .map_err(|e| UsageError(format!("cannot open {}: {e}", path.display())))?,
        )
    };
    let store = ctx.store().await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<omnibox::Result<Vec<OutboxEvent>>>(1);
    let parser = tokio::task::spawn_blocking(move || parse_lines(input, tx));
    let outbox = store.outbox();
    let mut writer = outbox.begin_bulk().await?;
    let started = std::time::Instant::now();
    let chunks = tokio_stream_from(rx);
    let mut report = Report::new(json);
    let mut spill_error: Option<std::io::Error> = None;
    let inserted = writer
        .insert_stream_with(chunks, |outcomes| {
            if spill_error.is_none()
                && let Err(e) = report.add(outcomes)
            {
                spill_error = Some(e);
            }
        })
        .await;
    let inserted = match (inserted, spill_error) {
        (Ok(()), None) => Ok(()),
        (Err(e), _) => Err(anyhow::Error::from(e)),
        (Ok(()), Some(e)) => {
            Err(anyhow::Error::from(e).context("cannot keep the ids to report (temporary file)"))
        }
    };
    if let Err(e) = inserted {
        writer.rollback().await?;
        return Err(e);
    }
    parser.await?;
    writer.commit().await?;
    tracing::debug!(elapsed = ?started.elapsed(), events = report.count(), "enqueued");
    Ok(report)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A bad line: an input error naming the line (exit 2).
fn line_error(number: u64, message: impl std::fmt::Display) -> omnibox::Error {
    omnibox::Error::validation(format!("line {number}"), message.to_string())
}

fn parse_lines(
    input: Box<dyn Read + Send>,
    tx: tokio::sync::mpsc::Sender<omnibox::Result<Vec<OutboxEvent>>>,
) {
    let domain = DomainService::default();
    let mut reader = BufReader::with_capacity(1 << 16, input);
    let mut buf = Vec::new();
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut chunk_bytes = 0usize;
    let mut number = 0u64;
    loop {
        number += 1;
        buf.clear();
        let read = match (&mut reader).take(MAX_LINE + 1).read_until(b'\n', &mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.blocking_send(Err(line_error(
                    number,
                    format!("cannot read the input: {e}"),
                )));
                return;
            }
        };
        if read == 0 {
            break;
        }
        if buf.len() as u64 > MAX_LINE {
            let _ = tx.blocking_send(Err(line_error(
                number,
                format!("longer than {MAX_LINE} bytes; a payload may be at most 1000000 bytes"),
            )));
            return;
        }
        let line = match std::str::from_utf8(&buf) {
            Ok(s) => s.trim(),
            Err(e) => {
                let _ = tx.blocking_send(Err(line_error(number, format!("not valid UTF-8 ({e})"))));
                return;
            }
        };
        if line.is_empty() {
            continue;
        }
        match NewOutboxEvent::from_json(line).and_then(|n| domain.create_outbox_event(n)) {
            Ok(event) => chunk.push(event),
            Err(e) => {
                let _ = tx.blocking_send(Err(line_error(number, e)));
                return;
            }
        }
        chunk_bytes += line.len();
        if chunk.len() == CHUNK || chunk_bytes >= CHUNK_BYTES {
            chunk_bytes = 0;
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
            if tx.blocking_send(Ok(full)).is_err() {
                return;
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(Ok(chunk));
    }
}
