//! `omnibox config show`: the effective settings and where each came from.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::config::Source;
use super::output::{self, Format, human_duration};
use super::{Context, ExitStatus, env};

/// Show the effective settings
///
/// Examples:
///   omnibox config show
///   OMNIBOX_LEASE=2m omnibox config show --format json
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Each setting's value and where it came from (flag, environment,
    /// file, default); secrets masked
    ///
    /// Examples:
    ///   omnibox config show
    ///   omnibox --config prod.toml config show --format json
    #[command(verbatim_doc_comment)]
    Show,
}

/// Librdkafka properties whose values are secrets.
fn secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "key.pem", "private"]
        .iter()
        .any(|s| k.contains(s))
}

/// `n` bytes as `--batch-bytes` takes them (16MiB, 512KiB, 1000).
fn bytes(n: u64) -> String {
    const KIB: u64 = 1024;
    match n {
        0 => "0".into(),
        n if n % (KIB * KIB * KIB) == 0 => format!("{}GiB", n / (KIB * KIB * KIB)),
        n if n % (KIB * KIB) == 0 => format!("{}MiB", n / (KIB * KIB)),
        n if n % KIB == 0 => format!("{}KiB", n / KIB),
        n => n.to_string(),
    }
}

pub fn run(args: ConfigArgs, ctx: &Context) -> Result<ExitStatus> {
    let ConfigCommand::Show = args.command;
    let s = &ctx.settings;
    let source = |key: &str| s.sources.get(key).copied().unwrap_or(Source::Default);
    let broker = std::env::var(env::BROKER)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| s.broker.clone())
        .unwrap_or_else(|| omnibox::relay::sink::DEFAULT_BROKER_URL.to_string());
    let kafka: Vec<String> = s
        .kafka_properties
        .iter()
        .map(|(k, v)| {
            let v = if secret(k) {
                "****".to_string()
            } else {
                omnibox::redact::text(v)
            };
            format!("{k}={v}")
        })
        .collect();
    let rows: Vec<(&str, String, Source)> = vec![
        (
            "database_url",
            omnibox::redact::url(&s.database_url),
            source("database_url"),
        ),
        (
            "schema",
            s.schema
                .clone()
                .unwrap_or_else(|| "(the server's search_path)".into()),
            source("schema"),
        ),
        (
            "format",
            match s.format {
                Format::Table => "table",
                Format::Json => "json",
            }
            .to_string(),
            source("format"),
        ),
        ("broker", omnibox::redact::url(&broker), source("broker")),
        ("kafka", kafka.join(", "), source("kafka")),
        (
            "dedup_window",
            human_duration(s.dedup_window),
            source("dedup_window"),
        ),
        ("lease", human_duration(s.lease), source("lease")),
        ("batch_bytes", bytes(s.batch_bytes), source("batch_bytes")),
        (
            "statement_timeout",
            human_duration(s.statement_timeout),
            source("statement_timeout"),
        ),
    ];
    let file = s.config_file.as_ref().map(|p| p.display().to_string());
    match ctx.format() {
        Format::Json => {
            let settings: serde_json::Map<String, serde_json::Value> = rows
                .iter()
                .map(|(k, v, src)| (k.to_string(), json!({"value": v, "source": src})))
                .collect();
            output::json(&json!({"config_file": file, "settings": settings}))?;
        }
        Format::Table => {
            let mut t = output::table(["setting", "value", "source"]);
            for (k, v, src) in rows {
                t.add_row(vec![k.to_string(), v, src.to_string()]);
            }
            output::line(t)?;
            output::line(format!(
                "config file: {}",
                file.as_deref()
                    .unwrap_or("none (no --config, OMNIBOX_CONFIG or ./omnibox.toml)")
            ))?;
        }
    }
    Ok(ExitStatus::Success)
}
