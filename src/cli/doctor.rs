//! `omnibox doctor`: checks what an on-call engineer would check, one line
//! each, with what to do.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use omnibox::store::diagnostics::{SMALL_TABLE_PAGES, Statistics};
use omnibox::store::{AnyStore, SchemaState};
use omnibox::{OutboxStore, Table};
use serde::Serialize;
use serde_json::json;

use super::output::{self, Format, human_duration};
use super::{Context, ExitStatus, args};

/// Check the database, the claim's indexes and plan, statistics, the broker,
/// leases, blocked keys, the backlog, retention and table health
///
/// One line per check: ok, warn, FAIL or skip, with what to do. Every check
/// runs whatever failed before it (one that cannot run says why), so one
/// run lists every problem. Exit 1 when a check fails (warnings do not
/// change the exit code). Read-only: it changes nothing, and never creates
/// a database (a missing SQLite file is a failed check).
///
/// Examples:
///   omnibox doctor
///   omnibox doctor --format json
///   omnibox doctor --broker kafka://127.0.0.1:9092 --max-pending-age 2m
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct DoctorArgs {
    /// Check this broker [default: the configured broker (OMNIBOX_BROKER, broker in omnibox.toml)]
    #[arg(long, value_name = "URL", env = super::env::BROKER, hide_env_values = true)]
    broker: Option<String>,
    /// Warn when the oldest due pending event is older than this
    #[arg(long, allow_hyphen_values = true, default_value = "5m", value_parser = args::duration, value_name = "DURATION")]
    max_pending_age: Duration,
    /// A librdkafka property for the broker check (repeatable)
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = args::property)]
    properties: Vec<(String, String)>,
    #[command(flatten)]
    kafka_security: super::kafka_security::KafkaSecurityArgs,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
    /// Not run: something it needs failed (said in its message).
    Skip,
}

#[derive(Debug, Clone, Serialize)]
struct Check {
    check: &'static str,
    status: Level,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

fn ok(check: &'static str, message: impl Into<String>) -> Check {
    Check {
        check,
        status: Level::Ok,
        message: message.into(),
        hint: None,
    }
}

fn skip(check: &'static str, message: impl Into<String>) -> Check {
    Check {
        check,
        status: Level::Skip,
        message: message.into(),
        hint: None,
    }
}

fn warn(check: &'static str, message: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        check,
        status: Level::Warn,
        message: message.into(),
        hint: Some(hint.into()),
    }
}

fn fail(check: &'static str, message: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        check,
        status: Level::Fail,
        message: message.into(),
        hint: Some(hint.into()),
    }
}

pub async fn run(args: DoctorArgs, ctx: &Context) -> Result<ExitStatus> {
    let mut checks = Vec::new();
    let missing = missing_sqlite_file(&ctx.settings.database_url);
    let connected = match &missing {
        // Never create a database: a missing SQLite file is a finding.
        Some(path) => Err(anyhow::anyhow!(
            "no SQLite database at {} (doctor creates nothing)",
            path.display()
        )),
        None => ctx.connect().await,
    };
    let store = match connected {
        Ok(s) => {
            checks.push(ok(
                "database",
                format!(
                    "reachable ({})",
                    omnibox::redact::url(&ctx.settings.database_url)
                ),
            ));
            Some(s)
        }
        Err(e) => {
            checks.push(fail(
                "database",
                format!(
                    "cannot connect: {}",
                    omnibox::redact::text(&super::chain_text(&e))
                ),
                if missing.is_some() {
                    "check --database-url / OMNIBOX_DATABASE_URL and the working directory; `omnibox migrate` creates it"
                } else {
                    "check --database-url / OMNIBOX_DATABASE_URL and that the server is up"
                },
            ));
            None
        }
    };
    // Every check runs, whatever failed before it, so that one run lists
    // every problem; a check that cannot run says why.
    let skipped = |why: &str, checks: &mut Vec<Check>, pg: bool| {
        let mut names = vec![
            "indexes",
            "claim plan",
            "statistics",
            "leases",
            "blocked",
            "backlog",
            "retention",
        ];
        if pg {
            names.extend(["outbox table", "inbox table"]);
        }
        for name in names {
            checks.push(skip(name, format!("not checked: {why}")));
        }
    };
    match &store {
        Some(store) => {
            let state = store.schema_state().await;
            let (schema, tables) = schema_check(&state);
            let pg = matches!(store, AnyStore::Postgres(_));
            checks.push(schema);
            if !tables {
                skipped("no omnibox tables (see schema)", &mut checks, pg);
            } else {
                checks.push(indexes_check(&state));
                checks.push(plan_check(store).await);
                checks.push(statistics_check(store).await);
                checks.push(leases_check(store).await);
                checks.push(blocked_check(store).await);
                checks.push(backlog_check(store, args.max_pending_age).await);
                checks.push(retention_check(store, ctx).await);
                if pg {
                    checks.extend(health_checks(store).await);
                }
            }
        }
        None => {
            checks.push(skip("schema", "not checked: no database connection"));
            let pg = ctx.settings.database_url.starts_with("postgres");
            skipped("no database connection", &mut checks, pg);
        }
    }
    checks.push(broker_check(store.as_ref(), &args, ctx).await);
    let failed = checks.iter().any(|c| c.status == Level::Fail);
    match ctx.format() {
        Format::Json => output::json(&json!({ "ok": !failed, "checks": checks }))?,
        Format::Table => {
            for c in &checks {
                let level = match c.status {
                    Level::Ok => "ok  ",
                    Level::Warn => "warn",
                    Level::Fail => "FAIL",
                    Level::Skip => "skip",
                };
                output::line(format!("{level} {:<11} {}", c.check, c.message))?;
                if let Some(h) = &c.hint {
                    output::line(format!("     {:<11} -> {h}", ""))?;
                }
            }
        }
    }
    Ok(if failed {
        ExitStatus::No
    } else {
        ExitStatus::Success
    })
}

/// The file of an SQLite URL that names a file not there (None for
/// PostgreSQL, an in-memory database, or a URL the connection will judge).
fn missing_sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    use std::str::FromStr;
    if !url.starts_with("sqlite:") {
        return None;
    }
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
    let path = opts.get_filename();
    let name = path.to_string_lossy();
    if name.is_empty() || name == ":memory:" || url.contains("mode=memory") {
        return None;
    }
    (!path.exists()).then(|| path.to_path_buf())
}

fn err_check<E: std::error::Error + 'static>(check: &'static str, e: &E) -> Check {
    fail(
        check,
        format!(
            "could not check: {}",
            omnibox::redact::text(&super::cause_text(e))
        ),
        "see the error; the database user may lack a privilege",
    )
}

/// The schema's check, and whether the outbox table is there to check
/// further. The recorded versions are compared with the objects each
/// migration creates, so a deleted record or a half-applied migration shows
/// here, not as `migrate` failing on "already exists".
fn schema_check(state: &std::result::Result<SchemaState, omnibox::Error>) -> (Check, bool) {
    let state = match state {
        // When it cannot be told, the other checks run and say what they meet.
        Err(e) => return (err_check("schema", e), true),
        Ok(s) => s,
    };
    let exists = state.has_tables();
    let (current, latest) = (state.version(), state.latest);
    let problems = state.problems();
    let pending: Vec<String> = state
        .migrations
        .iter()
        .filter(|m| !m.recorded && m.present.is_empty())
        .map(|m| m.version.to_string())
        .collect();
    let check = if !exists && state.recorded.is_empty() {
        fail(
            "schema",
            "no omnibox tables here",
            "run `omnibox migrate` (and check --schema / OMNIBOX_DATABASE_SCHEMA)",
        )
    } else if !problems.is_empty() {
        let mut hints: Vec<&str> = Vec::new();
        for p in &problems {
            if !hints.contains(&p.hint.as_str()) {
                hints.push(&p.hint);
            }
        }
        let mut message: Vec<String> = problems.iter().map(|p| p.message.clone()).collect();
        if !pending.is_empty() {
            message.push(format!("not applied: {}", pending.join(", ")));
        }
        fail("schema", message.join("; "), hints.join("; "))
    } else if !pending.is_empty() {
        let what = if current == 0 {
            format!("no migration applied, this omnibox needs {latest}")
        } else if pending.len() == 1 && current < latest {
            format!("at version {current}, this omnibox needs {latest}")
        } else {
            format!(
                "at version {current}; not applied: {} (this omnibox needs {latest})",
                pending.join(", ")
            )
        };
        fail(
            "schema",
            what,
            "run `omnibox migrate` before starting relays of this version",
        )
    } else if current > latest {
        warn(
            "schema",
            format!("at version {current}, newer than this omnibox ({latest})"),
            "upgrade this binary to the version that migrated the database",
        )
    } else {
        ok(
            "schema",
            format!("at version {current}, as this omnibox expects"),
        )
    };
    (check, exists)
}

fn indexes_check(state: &std::result::Result<SchemaState, omnibox::Error>) -> Check {
    match state {
        Err(e) => err_check("indexes", e),
        Ok(state) => {
            let missing = state.missing_indexes();
            if missing.is_empty() {
                ok("indexes", format!("all {} present", state.indexes.len()))
            } else {
                fail(
                    "indexes",
                    format!("missing: {}", missing.join(", ")),
                    "run `omnibox migrate`; if it says up to date, someone dropped them: `omnibox migrate --print-sql` has their definitions",
                )
            }
        }
    }
}

/// The claim's scan plan: an index scan of the claim index, never a
/// sequential scan of the table (one of a few pages may be read whole).
async fn plan_check(store: &AnyStore) -> Check {
    match store.claim_plan().await {
        Err(e) => err_check("claim plan", &e),
        Ok(plan) => {
            tracing::debug!(plan = %plan.text, "the claim's scan plan");
            if plan.uses_claim_index {
                ok("claim plan", "the claim reads the claim index in order")
            } else if let Some(pages) = plan.small_table_pages {
                // A table of a few pages is read whole as fast as through
                // the index, and the planner rightly says so.
                ok(
                    "claim plan",
                    format!(
                        "outbox_events is small ({pages} page(s)): the claim may read it whole; the plan is judged from {SMALL_TABLE_PAGES} pages on"
                    ),
                )
            } else {
                fail(
                    "claim plan",
                    "the claim's scan does not use outbox_events_claim (it would read the table)",
                    "check the indexes above; on PostgreSQL run ANALYZE outbox_events and look for settings such as enable_indexscan = off",
                )
            }
        }
    }
}

async fn statistics_check(store: &AnyStore) -> Check {
    match store.outbox_statistics().await {
        Err(e) => err_check("statistics", &e),
        Ok(Statistics::NotUsed) => ok(
            "statistics",
            "SQLite: the claim's plan does not use statistics",
        ),
        Ok(Statistics::NotCollected) => ok("statistics", "no statistics collected yet"),
        Ok(Statistics::Collected {
            live,
            changed,
            never,
        }) => {
            let hint = "the claim does not need them, but `status` estimates and other plans do: ANALYZE outbox_events, and check that autovacuum runs";
            if never && live > 100_000 {
                warn(
                    "statistics",
                    format!("outbox_events has about {live} rows and was never analyzed"),
                    hint,
                )
            } else if never {
                ok(
                    "statistics",
                    format!(
                        "not analyzed yet (about {live} rows; the claim's plan does not need statistics)"
                    ),
                )
            } else if changed > live && live > 10_000 {
                warn(
                    "statistics",
                    format!(
                        "{changed} rows changed since the last ANALYZE of outbox_events, which holds about {live}"
                    ),
                    hint,
                )
            } else {
                ok(
                    "statistics",
                    format!(
                        "fresh enough ({changed} rows changed since the last ANALYZE, of about {live})"
                    ),
                )
            }
        }
    }
}

async fn leases_check(store: &AnyStore) -> Check {
    let mut expired = 0i64;
    for t in [Table::Outbox, Table::Inbox] {
        match store.expired_leases(t).await {
            Ok(n) => expired += n,
            Err(e) => return err_check("leases", &e),
        }
    }
    if expired == 0 {
        ok("leases", "no lease has run out on a locked row")
    } else {
        warn(
            "leases",
            format!("{expired} locked row(s) whose lease ran out (their worker stopped)"),
            "a running relay or `inbox process` takes them again by itself; `omnibox release-stale-locks` shows them unlocked now",
        )
    }
}

async fn blocked_check(store: &AnyStore) -> Check {
    match store.outbox().blocked_keys(5).await {
        Err(e) => err_check("blocked", &e),
        Ok(keys) if keys.is_empty() => ok("blocked", "no key waits behind a failing head"),
        Ok(keys) => {
            let waiting: u64 = keys.iter().map(|k| k.waiting).sum();
            let first = &keys[0];
            warn(
                "blocked",
                format!(
                    "{} key(s) wait behind a failing head ({waiting} rows), e.g. {}/{} after {} attempt(s)",
                    keys.len(),
                    first.topic,
                    first.partition_key,
                    first.head_attempts
                ),
                "`omnibox status` lists them, `omnibox show ID` shows the head's error; fix the cause, or let it fail and `omnibox replay`",
            )
        }
    }
}

async fn backlog_check(store: &AnyStore, max: Duration) -> Check {
    match store.outbox().status_counts().await {
        Err(e) => err_check("backlog", &e),
        Ok(c) => match c.oldest_pending_age() {
            Some(age) if age > max && c.due_now > 0 => warn(
                "backlog",
                format!(
                    "{} pending, {} due now; the oldest is {} old (more than {})",
                    c.pending,
                    c.due_now,
                    human_duration(age),
                    human_duration(max)
                ),
                "is a relay running (`omnibox publish`)? are events failing (`omnibox failures`)?",
            ),
            _ => ok(
                "backlog",
                format!("{} pending, {} due now", c.pending, c.due_now),
            ),
        },
    }
}

/// The last inbox cleanup's retention against the deduplication window.
async fn retention_check(store: &AnyStore, ctx: &Context) -> Check {
    let window = ctx.settings.dedup_window;
    let filter = omnibox::store::audit::AuditFilter {
        action: Some("cleanup".into()),
        limit: Some(50),
        ..Default::default()
    };
    match store.audit(&filter).await {
        Err(e) => err_check("retention", &e),
        Ok(entries) => {
            let last_inbox = entries
                .iter()
                .find(|e| e.table.as_deref() == Some(Table::Inbox.as_str()));
            let kept = last_inbox.and_then(|e| {
                let c = e.details["older_than_seconds"].as_f64()?;
                let f = e.details["failed_older_than_seconds"].as_f64();
                Some(f.map_or(c, |f| c.min(f)))
            });
            match kept {
                Some(secs) if Duration::from_secs_f64(secs) < window => fail(
                    "retention",
                    format!(
                        "the last inbox cleanup kept rows {} but the deduplication window is {}",
                        human_duration(Duration::from_secs_f64(secs)),
                        human_duration(window)
                    ),
                    "a redelivered message older than the retention is stored again as new: raise the cleanup's --older-than, or set the window (--dedup-window / OMNIBOX_DEDUP_WINDOW / dedup_window) to what you keep",
                ),
                Some(secs) => ok(
                    "retention",
                    format!(
                        "the last inbox cleanup kept rows {} (window {})",
                        human_duration(Duration::from_secs_f64(secs)),
                        human_duration(window)
                    ),
                ),
                None => ok(
                    "retention",
                    format!(
                        "no inbox cleanup recorded yet (window {})",
                        human_duration(window)
                    ),
                ),
            }
        }
    }
}

/// Sizes, dead tuples and autovacuum settings of the two tables.
async fn health_checks(store: &AnyStore) -> Vec<Check> {
    let mut out = Vec::new();
    for table in [Table::Outbox, Table::Inbox] {
        let t = table.sql_name();
        let check = match table {
            Table::Outbox => "outbox table",
            Table::Inbox => "inbox table",
        };
        let h = match store.table_health(table).await {
            Err(e) => {
                out.push(err_check(check, &e));
                continue;
            }
            Ok(None) => continue,
            Ok(Some(h)) => h,
        };
        let live = h.live;
        let dead = h.dead;
        let options = h.options;
        let ratio = if live + dead > 0 {
            dead as f64 / (live + dead) as f64
        } else {
            0.0
        };
        let message = format!(
            "{} data, {} indexes, {live} live rows, {:.0}% dead",
            megabytes(h.table_bytes),
            megabytes(h.index_bytes),
            ratio * 100.0
        );
        let tuned = options.contains("autovacuum_vacuum_scale_factor");
        let disabled = options.contains("autovacuum_enabled=false")
            || options.contains("autovacuum_enabled=off")
            || options.contains("autovacuum_enabled=0");
        let suggestion = format!(
            "every row is updated two or three times (claim, completion): ALTER TABLE {t} SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 1)"
        );
        // Twice the point at which autovacuum (server defaults: 50 rows +
        // 20 %) would have started: it is behind, whatever the table's size.
        let behind = ratio > 0.2 && dead as f64 > 2.0 * (50.0 + 0.2 * live as f64);
        out.push(if disabled {
            warn(
                check,
                format!("{message}; autovacuum is disabled on this table (autovacuum_enabled = false)"),
                format!("dead rows pile up until someone runs VACUUM: ALTER TABLE {t} RESET (autovacuum_enabled)"),
            )
        } else if behind {
            warn(
                check,
                format!("{message}: autovacuum is behind"),
                if tuned {
                    format!("autovacuum settings: {options}; check that autovacuum runs (pg_stat_user_tables.last_autovacuum) and that no long transaction holds it back")
                } else {
                    suggestion
                },
            )
        } else if !tuned && live > 1_000_000 {
            warn(check, format!("{message}; autovacuum has the server's defaults"), suggestion)
        } else {
            ok(
                check,
                if tuned {
                    format!("{message}; autovacuum: {options}")
                } else {
                    message
                },
            )
        });
    }
    out
}

fn megabytes(bytes: i64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_048_576.0)
}

/// The broker answers and holds the topics of pending rows.
async fn broker_check(store: Option<&AnyStore>, args: &DoctorArgs, ctx: &Context) -> Check {
    let Some(url) = args.broker.clone().or_else(|| ctx.settings.broker.clone()) else {
        return ok(
            "broker",
            "none configured (publish's default is the local file sink)",
        );
    };
    let Some(brokers) = url.strip_prefix("kafka://").map(str::to_string) else {
        return ok(
            "broker",
            format!("{} (no server to reach)", omnibox::redact::url(&url)),
        );
    };
    // The topics of pending rows, when the database can tell them: the
    // broker is checked either way.
    let topics = match store {
        Some(s) => Some(s.pending_topics(1000).await),
        None => None,
    };
    let (topics, topics_known) = match topics {
        Some(Ok(t)) => (t, true),
        _ => (Vec::new(), false),
    };
    let mut properties = ctx.settings.kafka_properties.clone();
    match args.kafka_security.properties() {
        Ok(p) => properties.extend(p),
        Err(e) => {
            return fail(
                "broker",
                e.0,
                "fix the --kafka-tls-* / --kafka-sasl-* flags",
            );
        }
    }
    properties.extend(args.properties.iter().cloned());
    let shown = omnibox::redact::url(&url);
    let metadata =
        tokio::task::spawn_blocking(move || -> std::result::Result<Vec<String>, String> {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let mut config = rdkafka::ClientConfig::new();
            config.set("bootstrap.servers", &brokers);
            for (k, v) in &properties {
                config.set(k, v);
            }
            let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
            let md = consumer
                .fetch_metadata(None, Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            Ok(md.topics().iter().map(|t| t.name().to_string()).collect())
        })
        .await;
    match metadata {
        Ok(Ok(present)) => {
            let missing: Vec<&String> = topics.iter().filter(|t| !present.contains(t)).collect();
            if !topics_known {
                ok(
                    "broker",
                    format!(
                        "{shown} answers (the topics of pending rows were not checked: the outbox could not be read)"
                    ),
                )
            } else if missing.is_empty() {
                ok(
                    "broker",
                    format!(
                        "{shown} answers; the {} topic(s) of pending rows exist",
                        topics.len()
                    ),
                )
            } else {
                fail(
                    "broker",
                    format!(
                        "{shown} answers, but topic(s) of pending rows are missing: {}",
                        missing
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "create the topics (the relay backs off on them, then fails their rows after --topic-unavailable-limit)",
                )
            }
        }
        Ok(Err(e)) => fail(
            "broker",
            format!("{shown} does not answer: {}", omnibox::redact::text(&e)),
            "check the address, the network and -X security settings",
        ),
        Err(e) => err_check("broker", &e),
    }
}
