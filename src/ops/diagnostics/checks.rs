//! The checks of a database whose schema is current: the claim's plan,
//! statistics, leases, blocked keys, backlog, retention, tables' health,
//! replication slots.

use std::time::Duration;

use super::Check;
use crate::model::Table;
use crate::model::time::human_duration;
use crate::store::diagnostics::{ReplicationSlot, SMALL_TABLE_PAGES, Statistics};
use crate::store::{AnyStore, OutboxStore};

/// Whether the outbox claim's plan reads the claim index in order; a small table
/// read whole passes too. A plan that scans the table fails the check.
pub(super) async fn plan_check(store: &AnyStore) -> Check {
    match store.claim_plan().await {
        Err(e) => Check::error("claim plan", &e),
        Ok(plan) => {
            tracing::debug!(plan = %plan.text, "the claim's scan plan");
            if plan.uses_claim_index {
                Check::ok("claim plan", "the claim reads the claim index in order")
            } else if let Some(pages) = plan.small_table_pages {
                // A table of a few pages is read whole as fast as through
                // the index, and the planner rightly says so.
                Check::ok(
                    "claim plan",
                    format!(
                        "outbox_events is small ({pages} page(s)): the claim may read it whole; the plan is judged from {SMALL_TABLE_PAGES} pages on"
                    ),
                )
            } else {
                Check::fail(
                    "claim plan",
                    "the claim's scan does not use outbox_events_claim (it would read the table)",
                    "check the indexes above; on PostgreSQL run ANALYZE outbox_events and look for settings such as enable_indexscan = off",
                )
            }
        }
    }
}

/// Whether the outbox's planner statistics are fresh: a warning for a large table
/// never analyzed, or one with more rows changed than it holds (PostgreSQL only).
pub(super) async fn statistics_check(store: &AnyStore) -> Check {
    match store.outbox_statistics().await {
        Err(e) => Check::error("statistics", &e),
        Ok(Statistics::NotUsed) => Check::ok(
            "statistics",
            "SQLite: the claim's plan does not use statistics",
        ),
        Ok(Statistics::NotCollected) => Check::ok("statistics", "no statistics collected yet"),
        Ok(Statistics::Collected {
            live,
            changed,
            never,
        }) => {
            let hint = "the claim does not need them, but `status` estimates and other plans do: ANALYZE outbox_events, and check that autovacuum runs";
            if never && live > 100_000 {
                Check::warn(
                    "statistics",
                    format!("outbox_events has about {live} rows and was never analyzed"),
                    hint,
                )
            } else if never {
                Check::ok(
                    "statistics",
                    format!(
                        "not analyzed yet (about {live} rows; the claim's plan does not need statistics)"
                    ),
                )
            } else if changed > live && live > 10_000 {
                Check::warn(
                    "statistics",
                    format!(
                        "{changed} rows changed since the last ANALYZE of outbox_events, which holds about {live}"
                    ),
                    hint,
                )
            } else {
                Check::ok(
                    "statistics",
                    format!(
                        "fresh enough ({changed} rows changed since the last ANALYZE, of about {live})"
                    ),
                )
            }
        }
    }
}

/// Counts locked rows of both tables whose lease has run out; any is a warning.
pub(super) async fn leases_check(store: &AnyStore) -> Check {
    let mut expired = 0i64;
    for t in [Table::Outbox, Table::Inbox] {
        match store.expired_leases(t).await {
            Ok(n) => expired += n,
            Err(e) => return Check::error("leases", &e),
        }
    }
    if expired == 0 {
        Check::ok("leases", "no lease has run out on a locked row")
    } else {
        Check::warn(
            "leases",
            format!("{expired} locked row(s) whose lease ran out (their worker stopped)"),
            "a running relay or `inbox process` takes them again by itself; `omnibox release-stale-locks` shows them unlocked now",
        )
    }
}

/// Outbox keys waiting behind a failing head (looking at five at most); any is a
/// warning naming the first.
pub(super) async fn blocked_check(store: &AnyStore) -> Check {
    match store.outbox().blocked_keys(5).await {
        Err(e) => Check::error("blocked", &e),
        Ok(keys) if keys.is_empty() => Check::ok("blocked", "no key waits behind a failing head"),
        Ok(keys) => {
            let waiting: u64 = keys.iter().map(|k| k.waiting).sum();
            let first = &keys[0];
            Check::warn(
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

/// A warning when rows are due now and the oldest pending outbox row is older
/// than `max`.
pub(super) async fn backlog_check(store: &AnyStore, max: Duration) -> Check {
    match store.outbox().status_counts().await {
        Err(e) => Check::error("backlog", &e),
        Ok(c) => match c.oldest_pending_age() {
            Some(age) if age > max && c.due_now > 0 => Check::warn(
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
            _ => Check::ok(
                "backlog",
                format!("{} pending, {} due now", c.pending, c.due_now),
            ),
        },
    }
}

/// The last inbox cleanup's retention against the deduplication window.
pub(super) async fn retention_check(store: &AnyStore, window: Duration) -> Check {
    let filter = crate::store::audit::AuditFilter {
        action: Some("cleanup".into()),
        limit: Some(50),
        ..Default::default()
    };
    match store.audit(&filter).await {
        Err(e) => Check::error("retention", &e),
        Ok(entries) => {
            let last_inbox = entries
                .iter()
                .find(|e| e.table.as_deref() == Some(Table::Inbox.as_str()));
            // The audit row is the database's word: a value edited by hand
            // (negative, not a number, too large) is reported, not trusted.
            let secs = |e: &crate::store::audit::AuditEntry, k: &str| {
                let v = &e.details[k];
                match v.as_f64().map(Duration::try_from_secs_f64) {
                    None if v.is_null() => Ok(None),
                    Some(Ok(d)) => Ok(Some(d)),
                    _ => Err(format!("{k} = {v}")),
                }
            };
            let kept = last_inbox.map(|e| -> Result<Duration, String> {
                let c = secs(e, "older_than_seconds")?
                    .ok_or_else(|| "no older_than_seconds".to_string())?;
                Ok(secs(e, "failed_older_than_seconds")?.map_or(c, |f| c.min(f)))
            });
            match kept.transpose() {
                Err(what) => Check::warn(
                    "retention",
                    format!("the last inbox cleanup's audit record is unreadable ({what})"),
                    "run `omnibox cleanup` to record its retention again; `omnibox audit --action cleanup` shows the record",
                ),
                Ok(Some(kept)) if kept < window => Check::fail(
                    "retention",
                    format!(
                        "the last inbox cleanup kept rows {} but the deduplication window is {}",
                        human_duration(kept),
                        human_duration(window)
                    ),
                    "a redelivered message older than the retention is stored again as new: raise the cleanup's --older-than, or set the window (--dedup-window / OMNIBOX_DEDUP_WINDOW / dedup_window) to what you keep",
                ),
                Ok(Some(kept)) => Check::ok(
                    "retention",
                    format!(
                        "the last inbox cleanup kept rows {} (window {})",
                        human_duration(kept),
                        human_duration(window)
                    ),
                ),
                Ok(None) => Check::ok(
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
pub(super) async fn health_checks(store: &AnyStore) -> Vec<Check> {
    let mut out = Vec::new();
    for table in [Table::Outbox, Table::Inbox] {
        let t = table.sql_name();
        let check = match table {
            Table::Outbox => "outbox table",
            Table::Inbox => "inbox table",
        };
        let h = match store.table_health(table).await {
            Err(e) => {
                out.push(Check::error(check, &e));
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
        let mut message = format!(
            "{} data, {} indexes, {live} live rows, {:.0}% dead",
            megabytes(h.table_bytes),
            megabytes(h.index_bytes),
            ratio * 100.0
        );
        if let Some(n) = h.partitions {
            message.push_str(&format!(" ({n} partitions)"));
        }
        let tuned = options.contains("autovacuum_vacuum_scale_factor");
        let disabled = options.contains("autovacuum_enabled=false")
            || options.contains("autovacuum_enabled=off")
            || options.contains("autovacuum_enabled=0");
        let settings = "autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 1";
        let suggestion = if h.partitions.is_some() {
            // A partitioned table takes no storage parameters: each
            // partition does.
            format!(
                "every row is updated two or three times (claim, completion): set on each busy partition, e.g. ALTER TABLE {t}_p<DATE> SET ({settings})"
            )
        } else {
            format!(
                "every row is updated two or three times (claim, completion): ALTER TABLE {t} SET ({settings})"
            )
        };
        // Twice the point at which autovacuum (server defaults: 50 rows +
        // 20 %) would have started: it is behind, whatever the table's size.
        let behind = ratio > 0.2 && dead as f64 > 2.0 * (50.0 + 0.2 * live as f64);
        out.push(if disabled {
            Check::warn(
                check,
                format!("{message}; autovacuum is disabled on this table (autovacuum_enabled = false)"),
                format!("dead rows pile up until someone runs VACUUM: ALTER TABLE {t} RESET (autovacuum_enabled)"),
            )
        } else if behind {
            Check::warn(
                check,
                format!("{message}: autovacuum is behind"),
                if tuned {
                    format!("autovacuum settings: {options}; check that autovacuum runs (pg_stat_user_tables.last_autovacuum) and that no long transaction holds it back")
                } else {
                    suggestion
                },
            )
        } else if !tuned && live > 1_000_000 {
            Check::warn(check, format!("{message}; autovacuum has the server's defaults"), suggestion)
        } else {
            Check::ok(
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

/// The server's replication slots (PostgreSQL): an inactive slot keeps
/// every WAL segment since its position until the disk is full, and a slot
/// that lost its WAL cannot be read on; each is named with the statement
/// that drops it.
pub(super) async fn slots_check(store: &AnyStore) -> Check {
    const CHECK: &str = "replication slots";
    let slots = match store.replication_slots().await {
        Ok(s) => s,
        Err(e) => return Check::error(CHECK, &e),
    };
    if slots.is_empty() {
        return Check::ok(CHECK, "none (nothing keeps write-ahead log for a reader)");
    }
    let drop = |names: &[&str]| -> String {
        names
            .iter()
            .map(|n| {
                format!(
                    "SELECT pg_drop_replication_slot('{}');",
                    n.replace('\'', "''")
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let describe = |s: &ReplicationSlot| -> String {
        let mut d = format!("{} ({}", s.name, s.kind);
        if let Some(db) = &s.database {
            d.push_str(&format!(", database {db}"));
        }
        if let Some(b) = s.behind_bytes {
            d.push_str(&format!(", {} of WAL kept", megabytes(b.max(0))));
        }
        if let Some(lag) = s.lag {
            d.push_str(&format!(", {:.1} s behind", lag.as_secs_f64()));
        }
        if let Some(w) = &s.wal_status {
            d.push_str(&format!(", wal_status {w}"));
        }
        d.push(')');
        d
    };
    let with = |keep: fn(&ReplicationSlot) -> bool| -> Vec<&ReplicationSlot> {
        slots.iter().filter(|s| keep(s)).collect()
    };
    // The findings, worst first: how bad, its slots, and what to do about them.
    type Judge = fn(&'static str, String, String) -> Check;
    let findings: [(Judge, &str, Vec<&ReplicationSlot>, &str); 3] = [
        (
            Check::fail,
            "lost the WAL it needed, its reader cannot go on",
            with(|s| s.wal_status.as_deref() == Some("lost")),
            "drop it (as a superuser or a role with REPLICATION), and let its reader start again from a new slot:",
        ),
        (
            Check::warn,
            "not read",
            with(|s| !s.active),
            "a slot nobody reads keeps every WAL segment since its position until the disk is full (cap it with max_slot_wal_keep_size); if nothing will read it again, drop it (as a superuser or a role with REPLICATION):",
        ),
        (
            Check::warn,
            "read, but about to lose WAL it needs",
            with(|s| s.active && s.wal_status.as_deref() == Some("unreserved")),
            "its reader is behind by more than max_slot_wal_keep_size allows; speed the reader up or raise the setting, or the slot will be lost. To give it up instead:",
        ),
    ];
    let finding = findings
        .into_iter()
        .find(|(_, _, found, _)| !found.is_empty());
    if let Some((judge, what, found, todo)) = finding {
        let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
        let listed: Vec<String> = found.iter().map(|s| describe(s)).collect();
        return judge(
            CHECK,
            format!("{what}: {}", listed.join("; ")),
            format!("{todo} {}", drop(&names)),
        );
    }
    Check::ok(
        CHECK,
        format!(
            "{} read: {}",
            slots.len(),
            slots.iter().map(describe).collect::<Vec<_>>().join("; ")
        ),
    )
}

/// `bytes` in mebibytes with one decimal, labelled `MB`.
fn megabytes(bytes: i64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_048_576.0)
}

/// Partitioned tables (PostgreSQL): a partition must exist for the current
/// time (or every insert fails) and should for the next period (so that a
/// relay down over the period's end does not stop producers).
pub(super) async fn partitions_check(store: &AnyStore) -> Check {
    const CHECK: &str = "partitions";
    let AnyStore::Postgres(pg) = store else {
        return Check::skip(CHECK, "PostgreSQL only");
    };
    let settings = match pg.partitioning().await {
        Ok(s) => s,
        Err(e) => return Check::error(CHECK, &e),
    };
    if settings.is_empty() {
        return Check::ok(CHECK, "neither table is partitioned");
    }
    let parts = match pg.partitions().await {
        Ok(p) => p,
        Err(e) => return Check::error(CHECK, &e),
    };
    let now = chrono::Utc::now();
    let mut notes = Vec::new();
    let mut missing_now = Vec::new();
    let mut missing_next = Vec::new();
    for s in &settings {
        let table = s.table.to_string();
        let mine: Vec<_> = parts.iter().filter(|p| p.table == table).collect();
        let holds = |t: chrono::DateTime<chrono::Utc>| {
            mine.iter()
                .any(|p| matches!((p.from, p.to), (Some(f), Some(e)) if f <= t && t < e))
        };
        let ahead = mine
            .iter()
            .filter(|p| p.from.is_some_and(|f| f > now))
            .count();
        if !holds(now) {
            missing_now.push(table.clone());
        } else if !holds(now + s.period.length()) {
            missing_next.push(table.clone());
        }
        notes.push(format!(
            "{table}: {} partitions by {}, {ahead} ahead",
            mine.len(),
            s.period
        ));
    }
    let message = notes.join("; ");
    let unkeyed: Vec<&str> = parts
        .iter()
        .filter(|p| !p.keyed)
        .map(|p| p.name.as_str())
        .collect();
    if !missing_now.is_empty() {
        Check::fail(
            CHECK,
            format!(
                "{message}: no partition holds the current time for {}, so inserts fail",
                missing_now.join(", ")
            ),
            "run omnibox partitions create (and keep a relay, or a cron line running it, going)",
        )
    } else if !unkeyed.is_empty() {
        Check::warn(
            CHECK,
            format!(
                "{message}: {} without a unique key on id (made by hand?)",
                unkeyed.join(", ")
            ),
            format!(
                "without it, a new id may be stored twice and lookups by id read the partition whole: {}",
                unkeyed
                    .iter()
                    .map(|n| format!("ALTER TABLE {n} ADD PRIMARY KEY (id);"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
    } else if !missing_next.is_empty() {
        Check::warn(
            CHECK,
            format!(
                "{message}: no partition for the next period of {}",
                missing_next.join(", ")
            ),
            "run omnibox partitions create; relays and processors create them while they run, and a cron line can too: 7 * * * * omnibox partitions create --quiet",
        )
    } else {
        Check::ok(CHECK, message)
    }
}
