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
}

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
    let file_duration = |key: &str, value: &Option<String>| -> Result<Option<Duration>> {
        value
            .as_deref()
            .map(|v| {
                super::args::duration(v).map_err(|e| {
                    super::UsageError(format!(
                        "config file {}: {key}: {e}",
                        path.as_deref().unwrap_or(Path::new(DEFAULT_FILE)).display()
                    ))
                    .into()
                })
            })
            .transpose()
    };
    let env_duration = |name: &str| -> Result<Option<Duration>> {
        match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => super::args::duration(&v)
                .map(Some)
                .map_err(|e| super::UsageError(format!("{name}: {e}")).into()),
            _ => Ok(None),
        }
    };
    let dedup_window = global
        .dedup_window
        .or(file_duration("dedup_window", &file.dedup_window)?)
        .unwrap_or(DEFAULT_DEDUP_WINDOW);
    let lease = env_duration(super::env::LEASE)?
        .or(file_duration("lease", &file.lease)?)
        .unwrap_or(omnibox::model::limits::DEFAULT_LEASE_TIMEOUT);
    let batch_bytes = match std::env::var(super::env::BATCH_BYTES) {
        Ok(v) if !v.trim().is_empty() => Some(
            super::args::bytes(&v)
                .map_err(|e| super::UsageError(format!("{}: {e}", super::env::BATCH_BYTES)))?,
        ),
        _ => None,
    };
    let batch_bytes = match batch_bytes {
        Some(b) => b,
        None => file
            .batch_bytes
            .as_deref()
            .map(|v| {
                super::args::bytes(v).map_err(|e| {
                    super::UsageError(format!(
                        "config file {}: batch_bytes: {e}",
                        path.as_deref().unwrap_or(Path::new(DEFAULT_FILE)).display()
                    ))
                })
            })
            .transpose()?
            .unwrap_or(omnibox::model::limits::DEFAULT_BATCH_BYTES),
    };
    let set = |v: bool| v.then_some(Source::Environment);
    let env_set = |name: &str| set(std::env::var(name).is_ok_and(|v| !v.trim().is_empty()));
    let file_set = |v: bool| v.then_some(Source::File);
    let mut sources = std::collections::BTreeMap::new();
    let mut source = |key: &'static str, arg: Option<Source>, file: Option<Source>| {
        sources.insert(key, arg.or(file).unwrap_or(Source::Default));
    };
    source(
        "database_url",
        args.get("database_url").copied(),
        file_set(file.database_url.is_some()),
    );
    source(
        "schema",
        args.get("schema").copied(),
        file_set(file.schema.is_some()),
    );
    source(
        "format",
        args.get("format").copied(),
        file_set(file.format.is_some()),
    );
    source(
        "dedup_window",
        args.get("dedup_window").copied(),
        file_set(file.dedup_window.is_some()),
    );
    source(
        "lease",
        env_set(super::env::LEASE),
        file_set(file.lease.is_some()),
    );
    source(
        "batch_bytes",
        env_set(super::env::BATCH_BYTES),
        file_set(file.batch_bytes.is_some()),
    );
    source(
        "broker",
        env_set(super::env::BROKER),
        file_set(file.broker.is_some()),
    );
    source("kafka", None, file_set(!file.kafka.is_empty()));
    Ok(Settings {
        sources,
        dedup_window,
        lease,
        batch_bytes,
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

fn read(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        super::UsageError(format!("config file {}: {}", path.display(), e.message())).into()
    })
}
