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
            statement_timeout: Some(STATEMENT_TIMEOUT),
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
const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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

/// The longest any statement of the CLI may run (PostgreSQL).
const STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

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
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_readme() {
        let code = |e: omnibox::Error| exit_code(&anyhow::Error::from(e));
        assert_eq!(code(omnibox::Error::Broker("commit failed".into())), 4);
        assert_eq!(code(omnibox::Error::Config("bad".into())), 2);
        assert_eq!(exit_code(&anyhow::Error::from(UsageError("x".into()))), 2);
    }
}

#[cfg(test)]
mod chain_tests {
    use super::chain_text;

    #[derive(Debug)]
    struct Leaf;
    impl std::fmt::Display for Leaf {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("expected to read 5 bytes, got 0 bytes at EOF")
        }
    }
    impl std::error::Error for Leaf {}

    #[derive(Debug)]
    struct Io(Leaf);
    impl std::fmt::Display for Io {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error communicating with database: {}", self.0)
        }
    }
    impl std::error::Error for Io {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Each cause once; distinct causes are all kept, in order.
    #[test]
    fn causes_are_said_once() {
        let e = anyhow::Error::new(Io(Leaf)).context("database transaction failed");
        assert_eq!(
            chain_text(&e),
            "database transaction failed: error communicating with database: expected to read 5 bytes, got 0 bytes at EOF"
        );
        assert_eq!(
            format!("{e:#}").matches("expected to read").count(),
            2,
            "the repetition this removes"
        );
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(chain_text(&e), "outer: middle: inner");
    }
}

/// The README's and docs' command examples cannot drift from the binary:
/// every `omnibox ...` line of their `sh` blocks parses with this CLI
/// (flags, values, subcommands). What they print is checked by the
/// snapshot tests and the README sample tests in tests/cli.rs.
#[cfg(test)]
mod doc_examples {
    use clap::Parser;

    /// Splits a shell line into words: single and double quotes, `\` escapes;
    /// stops at an unquoted `#` comment, `|`, `>`, `<`, `&&`, `;` or `&`.
    fn words(line: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut has = false;
        let mut chars = line.chars().peekable();
        let mut quote: Option<char> = None;
        while let Some(c) = chars.next() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some('"'), '\\') => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                (Some(_), c) => cur.push(c),
                (None, '\'' | '"') => {
                    quote = Some(c);
                    has = true;
                }
                (None, '\\') => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                        has = true;
                    }
                }
                (None, c) if c.is_whitespace() => {
                    if has || !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                        has = false;
                    }
                }
                (None, '#') if cur.is_empty() && !has => break,
                (None, '|' | '>' | '<' | ';' | '&') => break,
                (None, c) => cur.push(c),
            }
        }
        if has || !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// The `omnibox ...` commands of a markdown text's `sh` blocks, with
    /// `\`-continued lines joined, `$(...)` and env assignments before the
    /// command left out.
    fn commands(text: &str) -> Vec<(usize, Vec<String>)> {
        let mut out = Vec::new();
        let mut in_sh = false;
        let mut pending: Option<(usize, String)> = None;
        for (n, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("```") {
                in_sh = matches!(
                    t.trim_start_matches('`'),
                    "sh" | "bash" | "shell" | "console" | "crontab"
                );
                continue;
            }
            if !in_sh {
                // Inline code spans that are a whole command.
                for (i, span) in line.split('`').enumerate() {
                    if i % 2 == 1 && span.starts_with("omnibox ") {
                        // `[--flag]`: optional syntax, not an argument.
                        let w = words(span)
                            .into_iter()
                            .filter(|w| !(w.starts_with('[') && w.ends_with(']')))
                            .collect();
                        out.push((n + 1, w));
                    }
                }
                continue;
            }
            let (start, mut joined) = pending.take().unwrap_or((n + 1, String::new()));
            joined.push_str(t.trim_start_matches("$ "));
            if let Some(stripped) = joined.strip_suffix('\\') {
                pending = Some((start, format!("{stripped} ")));
                continue;
            }
            let mut w = words(&joined);
            // Leading VAR=value assignments and `sudo`, `exec`, `timeout N`.
            while let Some(first) = w.first() {
                let assign = first.split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                });
                if assign || first == "sudo" || first == "exec" {
                    w.remove(0);
                } else {
                    break;
                }
            }
            // From the word that runs omnibox (after a crontab line's
            // schedule, or a path such as target/release/omnibox).
            if let Some(i) = w
                .iter()
                .position(|c| c == "omnibox" || c.ends_with("/omnibox"))
                && !joined.contains("$(")
            {
                let mut w = w.split_off(i);
                w[0] = "omnibox".into();
                out.push((start, w));
            }
        }
        out
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            words(r#"omnibox list --since "2 h" 'a b' x\ y # comment"#),
            ["omnibox", "list", "--since", "2 h", "a b", "x y"]
        );
        assert_eq!(words("omnibox status | jq ."), ["omnibox", "status"]);
        assert_eq!(
            words(r#"omnibox x --header "k=\"v\"""#),
            ["omnibox", "x", "--header", r#"k="v""#]
        );
    }

    #[test]
    fn every_documented_command_parses() {
        let docs = [
            ("README.md", include_str!("../../README.md")),
            ("docs/cli.md", include_str!("../../docs/cli.md")),
            ("docs/semantics.md", include_str!("../../docs/semantics.md")),
            (
                "docs/operations.md",
                include_str!("../../docs/operations.md"),
            ),
            (
                "docs/production.md",
                include_str!("../../docs/production.md"),
            ),
            ("docs/library.md", include_str!("../../docs/library.md")),
            ("docs/wal-relay.md", include_str!("../../docs/wal-relay.md")),
            (
                "docs/partitioning.md",
                include_str!("../../docs/partitioning.md"),
            ),
            ("docs/design.md", include_str!("../../docs/design.md")),
            ("CONTRIBUTING.md", include_str!("../../CONTRIBUTING.md")),
            ("CHANGELOG.md", include_str!("../../CHANGELOG.md")),
            ("bench/RESULTS.md", include_str!("../../bench/RESULTS.md")),
        ];
        let mut failures = Vec::new();
        let mut count = 0;
        for (name, text) in docs {
            for (line, args) in commands(text) {
                count += 1;
                if let Err(e) = super::Cli::try_parse_from(&args) {
                    use clap::error::ErrorKind::*;
                    if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                        continue;
                    }
                    // A placeholder (`omnibox show ID`, `--batch B`) stands
                    // for a value; prose may name a command without its
                    // required arguments (`omnibox unlock`, `omnibox inbox`).
                    let text = e.to_string();
                    let placeholder = args.iter().any(|a| {
                        !a.starts_with('-')
                            && a.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                            && text.contains(&format!("'{a}'"))
                    });
                    let partial = matches!(
                        e.kind(),
                        MissingRequiredArgument | DisplayHelpOnMissingArgumentOrSubcommand
                    ) || text.contains("a value is required");
                    if placeholder || partial {
                        continue;
                    }
                    let first = e.to_string().lines().next().unwrap_or_default().to_string();
                    failures.push(format!("{name}:{line}: {}: {first}", args.join(" ")));
                }
            }
        }
        // The examples of every command's --help (and so its man page).
        fn help_texts(cmd: &clap::Command, out: &mut Vec<(String, String)>) {
            let about = cmd
                .get_long_about()
                .or(cmd.get_about())
                .map(|a| a.to_string())
                .unwrap_or_default();
            let after = cmd
                .get_after_long_help()
                .or(cmd.get_after_help())
                .map(|a| a.to_string())
                .unwrap_or_default();
            out.push((cmd.get_name().to_string(), format!("{about}\n{after}")));
            for sub in cmd.get_subcommands() {
                help_texts(sub, out);
            }
        }
        let mut helps = Vec::new();
        help_texts(&<super::Cli as clap::CommandFactory>::command(), &mut helps);
        let mut from_help = 0;
        for (name, text) in &helps {
            for (n, line) in text.lines().enumerate() {
                let t = line.trim_start();
                if !t.starts_with("omnibox ") {
                    continue;
                }
                from_help += 1;
                let args = words(t);
                if let Err(e) = super::Cli::try_parse_from(&args) {
                    use clap::error::ErrorKind::*;
                    if !matches!(e.kind(), DisplayHelp | DisplayVersion) {
                        let first = e.to_string().lines().next().unwrap_or_default().to_string();
                        failures.push(format!(
                            "--help of {name}, line {}: {}: {first}",
                            n + 1,
                            args.join(" ")
                        ));
                    }
                }
            }
        }
        count += from_help;
        assert!(from_help > 30, "only {from_help} help examples found");
        assert!(
            count > 50,
            "only {count} commands found: is the parser right?"
        );
        assert!(
            failures.is_empty(),
            "{} of {count} documented commands do not parse:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
