//! Settings: flag > environment > `omnibox.toml` > default. Flags and
//! environment are resolved by clap (`#[arg(env = ...)]`); this module adds
//! the file and the defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Deserialize;

use super::GlobalArgs;
use super::output::Format;

/// The configuration file's keys. Unknown keys are an error, so a typo does
/// not silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Database URL.
    pub database_url: Option<String>,
    /// PostgreSQL schema.
    pub schema: Option<String>,
    /// Output format.
    pub format: Option<Format>,
    /// Broker URL of `publish`.
    pub broker: Option<String>,
    /// librdkafka properties (`[kafka]` table), overridden by `-X`.
    #[serde(default)]
    pub kafka: std::collections::BTreeMap<String, String>,
    /// The inbox's deduplication window (e.g. "7d").
    pub dedup_window: Option<String>,
    /// The lease of `publish` and `inbox process` (e.g. "5m").
    pub lease: Option<String>,
    /// The byte budget of a batch of `publish`, `inbox process` and `inbox
    /// consume` (e.g. "16MiB").
    pub batch_bytes: Option<String>,
    /// The longest a statement may run (e.g. "5m").
    pub statement_timeout: Option<String>,
}

/// Default of the statement timeout.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(300);

/// Default of the deduplication window.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// The resolved settings every command sees.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub schema: Option<String>,
    pub format: Format,
    pub broker: Option<String>,
    pub kafka_properties: Vec<(String, String)>,
    /// How long the inbox keeps rows so a redelivered message is still a
    /// duplicate: `cleanup` never deletes inbox rows younger than this.
    pub dedup_window: Duration,
    /// The lease relays and `inbox process` take (their `--lease` default),
    /// and the shortest threshold `release-stale-locks` accepts.
    pub lease: Duration,
    /// The byte budget of a batch (the `--batch-bytes` default of `publish`,
    /// `inbox process` and `inbox consume`).
    pub batch_bytes: u64,
    /// The longest a statement may run (PostgreSQL `statement_timeout`);
    /// a claim or results write unanswered well past it ends a relay or
    /// processor (see [`stall_limit`](Settings::stall_limit)).
    pub statement_timeout: Duration,
    /// Where the file settings came from, if any.
    pub config_file: Option<PathBuf>,
    /// Where each setting came from, by its file key (`omnibox config show`).
    pub sources: std::collections::BTreeMap<&'static str, Source>,
}

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// An environment variable.
    Environment,
    /// The configuration file.
    File,
    /// omnibox's default.
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Flag => "flag",
            Source::Environment => "environment",
            Source::File => "file",
            Source::Default => "default",
        })
    }
}

/// Where clap took a global argument from: a flag, its environment
/// variable, or neither.
pub type ArgSources = std::collections::BTreeMap<&'static str, Source>;

/// The sources of the global arguments clap resolved, by argument id.
pub fn arg_sources(matches: &clap::ArgMatches) -> ArgSources {
    let mut out = ArgSources::new();
    for id in ["database_url", "schema", "config", "format", "dedup_window"] {
        let source = match matches.value_source(id) {
            Some(clap::parser::ValueSource::CommandLine) => Source::Flag,
            Some(clap::parser::ValueSource::EnvVariable) => Source::Environment,
            _ => continue,
        };
        out.insert(id, source);
    }
    out
}

pub const DEFAULT_FILE: &str = "omnibox.toml";

pub fn load(global: &GlobalArgs, args: &ArgSources) -> Result<Settings> {
    let (file, path) = match &global.config {
        Some(path) => (read(path)?, Some(path.clone())),
        None if Path::new(DEFAULT_FILE).exists() => (
            read(Path::new(DEFAULT_FILE))?,
            Some(PathBuf::from(DEFAULT_FILE)),
        ),
        None => (FileConfig::default(), None),
    };
    let file_path = path.as_deref().unwrap_or(Path::new(DEFAULT_FILE));
    let dedup_window = global
        .dedup_window
        .or(from_file(
            file_path,
            "dedup_window",
            &file.dedup_window,
            super::args::duration,
        )?)
        .unwrap_or(DEFAULT_DEDUP_WINDOW);
    let lease = from_env(super::env::LEASE, super::args::duration)?
        .or(from_file(
            file_path,
            "lease",
            &file.lease,
            super::args::duration,
        )?)
        .unwrap_or(omnibox::model::limits::DEFAULT_LEASE_TIMEOUT);
    // The file's value is read only when the environment has none.
    let batch_bytes = match from_env(super::env::BATCH_BYTES, super::args::bytes)? {
        Some(b) => b,
        None => from_file(
            file_path,
            "batch_bytes",
            &file.batch_bytes,
            super::args::bytes,
        )?
        .unwrap_or(omnibox::model::limits::DEFAULT_BATCH_BYTES),
    };
    let statement_timeout = from_env(super::env::STATEMENT_TIMEOUT, super::args::duration)?
        .or(from_file(
            file_path,
            "statement_timeout",
            &file.statement_timeout,
            super::args::duration,
        )?)
        .unwrap_or(DEFAULT_STATEMENT_TIMEOUT);
    if statement_timeout < Duration::from_secs(1) {
        return Err(super::UsageError(format!(
            "statement_timeout must be at least 1s (got {statement_timeout:?}; {} or statement_timeout in the configuration file)",
            super::env::STATEMENT_TIMEOUT
        ))
        .into());
    }
    let env_set = |name: &str| {
        std::env::var(name)
            .is_ok_and(|v| !v.trim().is_empty())
            .then_some(Source::Environment)
    };
    // Each setting's flag or environment variable, and whether the file
    // sets it: the first wins, else the default.
    let given = [
        (
            "database_url",
            args.get("database_url").copied(),
            file.database_url.is_some(),
        ),
        ("schema", args.get("schema").copied(), file.schema.is_some()),
        ("format", args.get("format").copied(), file.format.is_some()),
        (
            "dedup_window",
            args.get("dedup_window").copied(),
            file.dedup_window.is_some(),
        ),
        ("lease", env_set(super::env::LEASE), file.lease.is_some()),
        (
            "batch_bytes",
            env_set(super::env::BATCH_BYTES),
            file.batch_bytes.is_some(),
        ),
        (
            "statement_timeout",
            env_set(super::env::STATEMENT_TIMEOUT),
            file.statement_timeout.is_some(),
        ),
        ("broker", env_set(super::env::BROKER), file.broker.is_some()),
        ("kafka", None, !file.kafka.is_empty()),
    ];
    let sources = given
        .into_iter()
        .map(|(key, outside, in_file)| {
            let from_file = in_file.then_some(Source::File);
            (key, outside.or(from_file).unwrap_or(Source::Default))
        })
        .collect();
    Ok(Settings {
        sources,
        dedup_window,
        lease,
        batch_bytes,
        statement_timeout,
        database_url: global
            .database_url
            .clone()
            .or(file.database_url)
            .unwrap_or_else(|| omnibox::store::DEFAULT_DATABASE_URL.to_string()),
        schema: global.schema.clone().or(file.schema),
        format: global.format.or(file.format).unwrap_or(Format::Table),
        broker: file.broker,
        kafka_properties: file.kafka.into_iter().collect(),
        config_file: path,
    })
}

/// The value of environment variable `name` read by `parse`; none when it
/// is unset or blank.
fn from_env<T>(name: &str, parse: fn(&str) -> Result<T, String>) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => parse(&v)
            .map(Some)
            .map_err(|e| super::UsageError(format!("{name}: {e}")).into()),
        _ => Ok(None),
    }
}

/// The value of `key` in the configuration file `path`, if set, read by
/// `parse`.
fn from_file<T>(
    path: &Path,
    key: &str,
    value: &Option<String>,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<T>> {
    value
        .as_deref()
        .map(|v| {
            parse(v).map_err(|e| {
                super::UsageError(format!("config file {}: {key}: {e}", path.display())).into()
            })
        })
        .transpose()
}

fn read(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        super::UsageError(format!("config file {}: {}", path.display(), e.message())).into()
    })
}

impl Settings {
    /// Whether the database is a PostgreSQL server (the store's own
    /// reading of the URL's scheme).
    pub fn is_postgres(&self) -> bool {
        matches!(
            omnibox::store::Backend::from_url(&self.database_url),
            Ok(omnibox::store::Backend::Postgres)
        )
    }

    /// How long `publish`, `inbox process` and `inbox consume` wait for the
    /// database to answer one call (a claim, a results write: a transaction
    /// of a few statements, after a wait for a connection) before they take
    /// its connection for lost and stop with an error: twice the statement
    /// timeout and the pool's wait for a connection. A healthy server
    /// answers each statement by its timeout, if only with an error.
    pub fn stall_limit(&self) -> Duration {
        self.statement_timeout
            .saturating_mul(2)
            .saturating_add(super::ACQUIRE_TIMEOUT)
    }
}
