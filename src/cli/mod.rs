//! The command line: arguments, settings, logging, exit codes. Each
//! subcommand lives in its own file with an `XxxArgs` and a `run`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use omnibox::store::{AnyStore, StoreOptions, redact_url};

mod args;
mod audit;
mod cleanup;
mod completions;
mod config;
mod config_show;
mod demo;
mod doctor;
mod enqueue;
mod env;
mod failures;
mod inbox;
mod kafka_security;
mod list;
mod migrate;
mod output;
mod partitions;
mod publish;
mod release_stale_locks;
mod replay;
mod running;
mod safety;
mod show;
mod signals;
mod status;
mod unlock;

use output::Format;

/// Transactional outbox and inbox for PostgreSQL and SQLite: enqueue events,
/// publish them to Kafka, inspect them, and operate the tables.
#[derive(Debug, Parser)]
#[command(
    name = "omnibox",
    version,
    about,
    propagate_version = true,
    max_term_width = 100,
    after_help = "Exit status: 0 success; 1 the command ran and the answer is no (or a runtime failure); \
                  2 usage, input or connection error (nothing changed); 3 partially done (or events \
                  failed for good in a --once run); 4 the message broker failed at run time."
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]
    #[arg(long, global = true, env = env::DATABASE_URL, value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,

    /// PostgreSQL schema that holds the tables (created by `migrate`)
    #[arg(long, global = true, env = env::DATABASE_SCHEMA, value_name = "NAME", hide_env_values = true)]
    schema: Option<String>,

    /// Configuration file [default: ./omnibox.toml when present]
    #[arg(long, global = true, env = env::CONFIG, value_name = "PATH", hide_env_values = true)]
    config: Option<PathBuf>,

    /// Output format: table for people, json for scripts [default: table]
    #[arg(long, global = true, env = env::FORMAT, value_enum, hide_env_values = true)]
    format: Option<Format>,

    /// When to use colour
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,

    /// Log format on stderr
    #[arg(long, global = true, env = env::LOG_FORMAT, value_enum, default_value_t = LogFormat::Text, hide_env_values = true)]
    log_format: LogFormat,

    /// More logging (-v info, -vv debug, -vvv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,

    /// Nothing on stdout or stderr unless the command fails (then its
    /// report and the error); for cron
    #[arg(short, long, global = true)]
    quiet: bool,

    /// The inbox's deduplication window: inbox rows are kept at least this
    /// long (cleanup refuses less), so a message redelivered within it is a
    /// duplicate [default: 7d]
    #[arg(long, global = true, env = env::DEDUP_WINDOW, value_name = "DURATION", allow_hyphen_values = true, value_parser = args::duration, hide_env_values = true)]
    dedup_window: Option<std::time::Duration>,

    /// Export OpenTelemetry spans with OTLP over HTTP to this collector
    /// (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT;
    /// off when neither is set]
    #[arg(long, global = true, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    Migrate(migrate::MigrateArgs),
    Enqueue(Box<enqueue::EnqueueArgs>),
    Publish(Box<publish::PublishArgs>),
    Inbox(inbox::InboxArgs),
    Demo(demo::DemoArgs),
    Status(status::StatusArgs),
    Doctor(doctor::DoctorArgs),
    List(list::ListArgs),
    Show(show::ShowArgs),
    Replay(Box<replay::ReplayArgs>),
    Failures(failures::FailuresArgs),
    Unlock(unlock::UnlockArgs),
    ReleaseStaleLocks(release_stale_locks::ReleaseArgs),
    Cleanup(cleanup::CleanupArgs),
    Partitions(partitions::PartitionsArgs),
    Audit(audit::AuditArgs),
    Config(config_show::ConfigArgs),
    Completions(completions::CompletionsArgs),
    #[command(hide = true)]
    Generate(completions::GenerateArgs),
}

/// What a command hands back: its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: done.
    Success,
    /// 1: the command ran and the answer is "no".
    No,
    /// 3: partially done (some rows changed concurrently).
    Partial,
}

/// The exit of a `publish` or `inbox process` run: 1 when it did not go
/// well (`ok` false), 3 when events failed for good in a `--once` run
/// (said in a line; each was logged at ERROR), else 0.
pub fn run_exit(
    ok: bool,
    mode: omnibox::pipeline::RunMode,
    report: &omnibox::pipeline::RunReport,
) -> ExitStatus {
    if !ok {
        return ExitStatus::No;
    }
    if mode == omnibox::pipeline::RunMode::Once && report.dead > 0 {
        output::notice!(
            "omnibox: error: {} event(s) failed for good in this run (each logged above); see `omnibox failures`",
            report.dead
        );
        return ExitStatus::Partial;
    }
    ExitStatus::Success
}

/// An error in what the user asked for: exit 2, nothing changed.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Shared state of one invocation.
pub struct Context {
    pub settings: config::Settings,
    pub quiet: bool,
    /// Every store this invocation connected, closed by [`main`] before the
    /// process exits whatever the command returned.
    opened: std::sync::Mutex<Vec<AnyStore>>,
}

impl Context {
    pub fn format(&self) -> Format {
        self.settings.format
    }

    /// Connects to the configured database. The embedded SQLite default is
    /// created and migrated on first use; PostgreSQL must be migrated with
    /// `omnibox migrate`.
    pub async fn store(&self) -> Result<AnyStore> {
        let store = self.connect().await?;
        if let AnyStore::Sqlite(_) = store {
            store.migrate().await?;
        } else {
            store.ensure_migrated().await?;
        }
        Ok(store)
    }

    /// Connects without checking the schema.
    pub async fn connect(&self) -> Result<AnyStore> {
        let opts = StoreOptions {
            schema: self.settings.schema.clone(),
            max_connections: None,
            // Every statement of every command is bounded: a maintenance
            // query stuck behind a lock fails instead of hanging a cron job.
            statement_timeout: Some(self.settings.statement_timeout),
            // A transaction whose client was lost without a reset (its
            // claim or batch cut off by the stall watchdog, or a process
            // whose network went away) ends by then, with its locks.
            idle_in_transaction_timeout: Some(self.settings.stall_limit()),
            // An outage is noticed (and warned about) within this, not
            // after the pool's 30 s.
            acquire_timeout: Some(ACQUIRE_TIMEOUT),
        };
        tracing::debug!(url = %redact_url(&self.settings.database_url), "connecting");
        let store = AnyStore::connect(&self.settings.database_url, &opts).await?;
        self.track(&store);
        Ok(store)
    }

    /// Remembers a store connected outside [`Context::connect`], so it is
    /// closed with the others.
    pub fn track(&self, store: &AnyStore) {
        if let Ok(mut opened) = self.opened.lock() {
            opened.push(store.clone());
        }
    }

    /// Closes every store the command connected: each PostgreSQL connection
    /// ends with a Terminate message and a clean TLS and TCP shutdown, so
    /// the server's log gets no `Connection reset by peer` per CLI run.
    /// Bounded: a connection some task still holds is given
    /// [`CLOSE_TIMEOUT`], then the process exits anyway.
    async fn close(&self) {
        let stores = match self.opened.lock() {
            Ok(mut opened) => std::mem::take(&mut *opened),
            Err(_) => return,
        };
        let all = futures_util::future::join_all(stores.iter().map(AnyStore::close));
        if tokio::time::timeout(CLOSE_TIMEOUT, all).await.is_err() {
            tracing::debug!("connections still in use at exit; closing them abruptly");
        }
    }
}

/// How long a statement waits for a connection before the database counts
/// as unreachable.
pub(crate) const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the exit waits for connections still checked out to come back.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Ok((Cli::from_arg_matches(&m)?, config::arg_sources(&m))));
    let (cli, sources) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // clap prints usage errors on stderr (exit 2) and --help/--version on stdout (exit 0).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let color = use_color(cli.global.color);
    init_logging(&cli.global);
    let mut json_errors = cli.global.format == Some(Format::Json);
    let settings = match config::load(&cli.global, &sources) {
        Ok(s) => s,
        Err(e) => return report(&e, color, json_errors),
    };
    json_errors = settings.format == Format::Json;
    if let Some(path) = &settings.config_file {
        tracing::debug!(path = %path.display(), "read the config file");
    }
    if cli.global.quiet {
        output::hold();
    }
    let ctx = Context {
        settings,
        quiet: cli.global.quiet,
        opened: std::sync::Mutex::new(Vec::new()),
    };
    // Before the runtime: the exporter's HTTP client is a blocking one.
    let telemetry =
        match omnibox::telemetry::Telemetry::install(cli.global.otlp_endpoint.as_deref()) {
            Ok(t) => t,
            Err(e) => return report(&e.into(), color, json_errors),
        };
    if let Some(t) = &telemetry {
        tracing::info!(endpoint = %t.endpoint(), "exporting OpenTelemetry spans");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&e.into(), color, json_errors),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Migrate(args) => migrate::run(args, &ctx).await,
            Command::Enqueue(args) => enqueue::run(*args, &ctx).await,
            Command::Status(args) => status::run(args, &ctx).await,
            Command::Doctor(args) => doctor::run(args, &ctx).await,
            Command::List(args) => list::run(args, &ctx).await,
            Command::Show(args) => show::run(args, &ctx).await,
            Command::Replay(args) => replay::run(*args, &ctx).await,
            Command::Failures(args) => failures::run(args, &ctx).await,
            Command::Unlock(args) => unlock::run(args, &ctx).await,
            Command::ReleaseStaleLocks(args) => release_stale_locks::run(args, &ctx).await,
            Command::Cleanup(args) => cleanup::run(args, &ctx).await,
            Command::Partitions(args) => partitions::run(args, &ctx).await,
            Command::Audit(args) => audit::run(args, &ctx).await,
            Command::Config(args) => config_show::run(args, &ctx),
            Command::Completions(args) => completions::run(args, &ctx).await,
            Command::Generate(args) => completions::run_generate(args, &ctx).await,
            Command::Publish(args) => publish::run_publish(*args, &ctx).await,
            Command::Inbox(args) => inbox::run(args, &ctx).await,
            Command::Demo(args) => demo::run(args, &ctx).await,
        }
    });
    runtime.block_on(ctx.close());
    // Every task the command awaited is done. A blocking read nobody waits
    // for any more (stdin, after a SIGTERM stopped `inbox consume --from -`
    // while the pipe stayed open) must not keep the process alive: the
    // runtime's default drop waits for it, forever.
    runtime.shutdown_background();
    if let Some(t) = telemetry {
        t.shutdown(std::time::Duration::from_secs(5));
    }
    if !matches!(result, Ok(ExitStatus::Success)) {
        // Quiet unless something fails: then the report comes with it.
        output::release();
    }
    match result {
        Ok(ExitStatus::Success) => ExitCode::SUCCESS,
        Ok(ExitStatus::No) => ExitCode::from(1),
        Ok(ExitStatus::Partial) => ExitCode::from(3),
        Err(e) => report(&e, color, json_errors),
    }
}

/// An error and its causes, joined by `: `, each said once: a cause whose
/// text the line holds already is left out (a driver's error repeats its
/// source's message, which `{:#}` then printed three or four times).
pub fn chain_text(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause_text(cause);
        let text = text.trim();
        if text.is_empty() || out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out
}

/// One error's own text; a driver error's is its server message alone
/// (see `omnibox::error::db_text`: no "at line N" of the server's source).
pub fn cause_text(cause: &(dyn std::error::Error + 'static)) -> String {
    if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
        omnibox::error::db_text(e)
    } else if let Some(e) = cause.downcast_ref::<sqlx::migrate::MigrateError>() {
        omnibox::error::migrate_text(e)
    } else if let Some(db) = cause.downcast_ref::<Box<dyn sqlx::error::DatabaseError>>() {
        db.message().to_string()
    } else if let Some(db) = cause.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        db.message().to_string()
    } else if let Some(db) = cause.downcast_ref::<sqlx::sqlite::SqliteError>() {
        sqlx::error::DatabaseError::message(db).to_string()
    } else {
        cause.to_string()
    }
}

/// Prints `omnibox: error: ...` (and a hint where there is one) and picks
/// the exit code; with `--format json`, also a JSON error object on stdout
/// (`{"error": {"message", "hint", "exit_code"}}`), so a script reading
/// stdout sees the failure.
fn report(err: &anyhow::Error, color: bool, json: bool) -> ExitCode {
    output::release();
    if is_broken_pipe(err) {
        return ExitCode::SUCCESS;
    }
    let prefix = if color {
        "\x1b[1;31merror:\x1b[0m"
    } else {
        "error:"
    };
    let message = omnibox::redact::text(&chain_text(err));
    let code = exit_code(err);
    eprintln!("omnibox: {prefix} {message}");
    if let Some(hint) = hint(err) {
        eprintln!("omnibox: hint: {hint}");
    }
    if json {
        let object = serde_json::json!({
            "error": {"message": message, "hint": hint(err), "exit_code": code}
        });
        println!("{object}");
    }
    ExitCode::from(code)
}

fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    match err.downcast_ref::<omnibox::Error>() {
        Some(e) if e.is_input_error() || e.is_connection_error() => 2,
        Some(omnibox::Error::Migration(_) | omnibox::Error::Schema(_)) => 2,
        Some(omnibox::Error::ConcurrentUpdate { .. }) => 3,
        Some(omnibox::Error::Broker(_)) => 4,
        _ => 1,
    }
}

fn hint(err: &anyhow::Error) -> Option<&'static str> {
    match err.downcast_ref::<omnibox::Error>()? {
        omnibox::Error::StorageConnection { .. } => {
            Some("check --database-url / OMNIBOX_DATABASE_URL and that the server is up")
        }
        omnibox::Error::ConcurrentUpdate { .. } => {
            Some("another worker or an operator changed these rows meanwhile; nothing was lost")
        }
        omnibox::Error::Broker(_) => Some(
            "offsets committed so far stay; uncommitted messages are delivered again and deduplicated",
        ),
        _ => None,
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn use_color(choice: ColorChoice) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::env::var_os(env::NO_COLOR).is_none_or(|v| v.is_empty())
                && std::io::stderr().is_terminal()
        }
    }
}

/// stderr for log lines, with URLs' credentials and secret parameters
/// masked (omnibox::redact::text), whatever a log line carries.
struct RedactingStderr;

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(omnibox::redact::text(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn init_logging(global: &GlobalArgs) {
    use tracing_subscriber::EnvFilter;
    let level = if global.quiet {
        "error"
    } else {
        match global.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = std::env::var(env::LOG)
        .or_else(|_| std::env::var(env::RUST_LOG))
        .ok()
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| {
            // librdkafka reports every failed connection attempt, sqlx
            // every notice of a server going down and every slow pool wait,
            // and the replication client every broken stream: omnibox says
            // what matters itself (once per outage).
            let quiet = if global.verbose >= 2 { level } else { "off" };
            EnvFilter::new(format!(
                "{level},sqlx=error,librdkafka={quiet},rdkafka={quiet},pgwire_replication={quiet}"
            ))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactingStderr)
        .with_target(false);
    let _ = match global.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_ansi(use_color(global.color)).try_init(),
    };
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod chain_tests;

/// The README's and docs' command examples cannot drift from the binary:
/// every `omnibox ...` line of their `sh` blocks parses with this CLI
/// (flags, values, subcommands). What they print is checked by the
/// snapshot tests and the README sample tests in tests/cli.rs.
#[cfg(test)]
mod doc_examples;
