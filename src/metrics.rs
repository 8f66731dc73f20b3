//! Prometheus metrics (docs/design.md) and a minimal `/metrics` endpoint for
//! long-running commands (`--metrics-addr`).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;

use crate::domain::Retry;
use crate::model::Table;
use crate::pipeline::{BatchReport, Outcome};
pub use crate::pipeline::{EventOutcome, MetricsRecorder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};

/// Labels of the per-event counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `outbox` or `inbox`.
    pub table: String,
    /// The event type.
    pub event_type: String,
}

/// Labels of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `outbox` or `inbox`.
    pub table: String,
    /// The event type.
    pub event_type: String,
    /// `counted`, `transient` or `dead` (reached max_attempts).
    pub kind: String,
}

/// Labels of per-table series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// `outbox` or `inbox`.
    pub table: String,
}

/// Every metric the engine records.
pub struct Metrics {
    registry: Registry,
    /// Events completed (published, or processed by a handler).
    pub completed: Family<EventLabels, Counter>,
    /// Events a handler skipped (completed, not processed).
    pub skipped: Family<EventLabels, Counter>,
    /// Failures by kind.
    pub failed: Family<FailureLabels, Counter>,
    /// Events released untried (run stopped at a failure, circuit open, shutdown).
    pub released: Family<TableLabels, Counter>,
    /// Rows whose lease was lost before their result was written.
    pub lease_lost: Family<TableLabels, Counter>,
    /// Result writes that failed after all retries.
    pub commit_failed: Family<TableLabels, Counter>,
    /// Rows per claimed batch.
    pub batch_size: Family<TableLabels, Histogram>,
    /// Time to publish or handle one batch, seconds.
    pub batch_latency: Family<TableLabels, Histogram>,
    /// Age of the oldest event of the last claimed batch (how late it was handled), seconds.
    pub lag_seconds: Family<TableLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Free-form counters of other components (inbox consumer and the like).
    pub counters: Family<CounterLabels, Counter>,
    /// Locked rows whose lease ran out (their worker stopped), per table;
    /// set every 30 s by the long-running commands.
    pub stale_locks: Family<TableLabels, Gauge>,
    /// Dead letters not replayed yet (`--dlq table`), per table of their
    /// events; set every 30 s by the long-running commands.
    pub dead_letters_open: Family<TableLabels, Gauge>,
    /// Rows of the last batch written (the reference's
    /// `locked_batch_size`); an idle worker keeps showing its last batch.
    pub locked_batch_size: Family<TableLabels, Gauge>,
    /// Time one handler took on one event, seconds (inbox consumer and
    /// inbox processor).
    pub handler_duration: Family<EventLabels, Histogram>,
    /// WAL relay: outbox rows the replication stream reported inserted.
    pub wal_rows: Counter,
    /// WAL relay: keys reported and not yet walked by a claim.
    pub wal_keys_waiting: Gauge,
    /// WAL relay: the position confirmed to the slot, as a number (its
    /// rate is the WAL confirmed per second; the server's
    /// `pg_current_wal_lsn()` less it is the lag in bytes).
    pub wal_confirmed_lsn: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The event types that have series of their own (see
    /// [`Metrics::type_label`]).
    event_types: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Event types given series of their own; later ones share the label
/// [`OTHER_EVENT_TYPES`]. An inbox's event types come from its messages, so a producer
/// sending a new type per message would otherwise grow the registry, and
/// every scrape, without bound.
pub const EVENT_TYPE_LABELS: usize = 200;

/// The `event_type` label of the types past [`EVENT_TYPE_LABELS`]: `" other"`,
/// with a leading space, which no event type has (they are trimmed), so it
/// never mixes with a real type's counts.
pub const OTHER_EVENT_TYPES: &str = " other";

/// Labels of [`Metrics::counters`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabels {
    /// What is counted, e.g. `consumed`, `duplicate`, `committed`.
    pub name: String,
}

/// Registers `metric` in `registry` as `name` with `help`, and gives it back
/// (a metric is a handle: the registered copy shares its values).
fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Buckets of `batch_size`: 1 to 4^7 rows, by factors of 4.
fn batch_rows() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 8))
}

/// Buckets of `batch_latency_seconds`: 1 ms to about 33 s, doubling.
fn batch_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Buckets of `handler_duration_seconds`: 0.5 ms to about 66 s, doubling.
fn handler_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Default for Metrics {
    /// A fresh registry, as `Metrics::new`.
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family registered under the `omnibox_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("omnibox");
        let r = &mut registry;
        // Each metric once: its field, its name and help, its buckets; in the
        // order the scrape lists them.
        Metrics {
            locked_batch_size: add(
                r,
                "locked_batch_size",
                "Rows of the last batch written (the rows its claim locked)",
                Family::default(),
            ),
            wal_rows: add(
                r,
                "wal_rows",
                "Outbox rows the replication stream reported inserted (publish --source wal)",
                Counter::default(),
            ),
            wal_keys_waiting: add(
                r,
                "wal_keys_waiting",
                "Keys the replication stream reported that no claim has walked yet (publish --source wal)",
                Gauge::default(),
            ),
            wal_confirmed_lsn: add(
                r,
                "wal_confirmed_lsn",
                "The position confirmed to the replication slot, as a number (publish --source wal)",
                Gauge::default(),
            ),
            handler_duration: add(
                r,
                "handler_duration_seconds",
                "Time one handler took on one event",
                Family::new_with_constructor(handler_seconds),
            ),
            dead_letters_open: add(
                r,
                "dead_letters_open",
                "Dead letters kept in the database and not replayed yet",
                Family::default(),
            ),
            stale_locks: add(
                r,
                "stale_locks",
                "Locked rows whose lease ran out (their worker stopped)",
                Family::default(),
            ),
            completed: add(
                r,
                "events_completed",
                "Events published or processed",
                Family::default(),
            ),
            skipped: add(
                r,
                "events_skipped",
                "Events a handler chose not to process",
                Family::default(),
            ),
            failed: add(
                r,
                "events_failed",
                "Failed attempts by kind (counted, transient, dead)",
                Family::default(),
            ),
            released: add(
                r,
                "events_released",
                "Events released untried",
                Family::default(),
            ),
            lease_lost: add(
                r,
                "lease_lost",
                "Rows whose lease was lost before the result was written",
                Family::default(),
            ),
            commit_failed: add(
                r,
                "commit_failed",
                "Result writes that failed after every retry",
                Family::default(),
            ),
            batch_size: add(
                r,
                "batch_size",
                "Rows per claimed batch",
                Family::new_with_constructor(batch_rows),
            ),
            batch_latency: add(
                r,
                "batch_latency_seconds",
                "Time to publish or handle a batch",
                Family::new_with_constructor(batch_seconds),
            ),
            lag_seconds: add(
                r,
                "lag_seconds",
                "Age of the oldest due event when claimed",
                Family::default(),
            ),
            counters: add(
                r,
                "component",
                "Counters of the inbox consumer and other components",
                Family::default(),
            ),
            event_types: Default::default(),
            registry,
        }
    }

    /// The `event_type` label of `event_type`: itself for the first
    /// [`EVENT_TYPE_LABELS`] types seen, [`OTHER_EVENT_TYPES`] after.
    pub fn type_label(&self, event_type: &str) -> String {
        let Ok(mut known) = self.event_types.lock() else {
            return OTHER_EVENT_TYPES.into();
        };
        if known.contains(event_type) {
            return event_type.to_string();
        }
        if known.len() < EVENT_TYPE_LABELS {
            known.insert(event_type.to_string());
            return event_type.to_string();
        }
        OTHER_EVENT_TYPES.into()
    }

    /// Creates every series of `table` at zero, so a scrape shows every
    /// family from the start and `rate()` / `increase()` have a baseline
    /// (series of an event type appear with its first event; these carry
    /// an empty `event_type`).
    pub fn prime(&self, table: &str) {
        let t = TableLabels {
            table: table.to_string(),
        };
        let e = EventLabels {
            table: table.to_string(),
            event_type: String::new(),
        };
        let _ = self.completed.get_or_create(&e);
        let _ = self.skipped.get_or_create(&e);
        for kind in ["counted", "transient", "dead"] {
            let _ = self.failed.get_or_create(&FailureLabels {
                table: table.to_string(),
                event_type: String::new(),
                kind: kind.to_string(),
            });
        }
        let _ = self.released.get_or_create(&t);
        let _ = self.lease_lost.get_or_create(&t);
        let _ = self.commit_failed.get_or_create(&t);
        let _ = self.batch_size.get_or_create(&t);
        let _ = self.batch_latency.get_or_create(&t);
        let _ = self.lag_seconds.get_or_create(&t);
        let _ = self.stale_locks.get_or_create(&t);
        let _ = self.dead_letters_open.get_or_create(&t);
        for name in [
            "consumed",
            "stored",
            "duplicate",
            "poison",
            "processed",
            "committed",
        ] {
            self.count(name, 0);
        }
    }

    /// Every 30 s until the task is dropped, counts the rows whose lease ran
    /// out in each table into [`stale_locks`](Self::stale_locks).
    pub fn watch_stale_locks(
        self: &Arc<Self>,
        store: crate::store::AnyStore,
    ) -> tokio::task::JoinHandle<()> {
        use crate::store::MaintenanceStore;
        let metrics = self.clone();
        tokio::spawn(async move {
            loop {
                for (table, n) in [
                    (
                        "outbox",
                        store
                            .outbox()
                            .count_stale_locks(std::time::Duration::ZERO)
                            .await,
                    ),
                    (
                        "inbox",
                        store
                            .inbox()
                            .count_stale_locks(std::time::Duration::ZERO)
                            .await,
                    ),
                ] {
                    match n {
                        Ok(n) => set_count(&metrics.stale_locks, table, n),
                        Err(e) => tracing::debug!(error = %e, "could not count stale locks"),
                    }
                }
                for table in [crate::model::Table::Outbox, crate::model::Table::Inbox] {
                    match store.dead_letters().count_open(Some(table)).await {
                        Ok(n) => set_count(&metrics.dead_letters_open, table.as_str(), n),
                        Err(e) => tracing::debug!(error = %e, "could not count dead letters"),
                    }
                }
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            }
        })
    }

    /// Counts the failure of `e` in `events_failed`, by kind: `transient`,
    /// `unavailable`, `dead` (including a last counted attempt) or
    /// `counted`.
    fn count_failure(&self, table: &str, e: &EventOutcome<'_>) {
        let kind = match e.outcome {
            Outcome::Unavailable { .. } => "unavailable",
            Outcome::Dead { .. } => "dead",
            Outcome::Failed {
                retry: Retry::NotCounted(_) | Retry::NotCountedAfter(_),
                ..
            } => "transient",
            _ if e.attempts_made + 1 >= e.max_attempts => "dead",
            _ => "counted",
        };
        self.failed
            .get_or_create(&FailureLabels {
                table: table.to_string(),
                event_type: self.type_label(e.event_type),
                kind: kind.into(),
            })
            .inc();
    }

    /// Increments a [`counters`](Self::counters) entry.
    pub fn count(&self, name: &str, n: u64) {
        self.counters
            .get_or_create(&CounterLabels {
                name: name.to_string(),
            })
            .inc_by(n);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Most metrics connections served at once.
const METRICS_CONNECTIONS: usize = 32;

/// Serves `GET /metrics` (any path, in fact) on `addr` until the task is
/// dropped: at most 32 connections at once, each given 2 s to send its
/// request and 10 s to take the reply.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {addr} for metrics: {e}")))?;
    tracing::info!(%addr, "serving Prometheus metrics");
    // A scraper is one or two clients: more connections at once than this
    // are closed unanswered, so a flood cannot run the process out of file
    // descriptors.
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let mut socket = match listener.accept().await {
                Ok((socket, _)) => socket,
                Err(e) => {
                    // Out of file descriptors, say: retrying at once would
                    // spin a core.
                    tracing::warn!(error = %e, "metrics: cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(socket);
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let wait = std::time::Duration::from_secs(2);
                let mut buf = [0u8; 1024];
                // Read the request head; its content does not matter.
                let _ = tokio::time::timeout(wait, socket.read(&mut buf)).await;
                let body = metrics.render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                // A client that does not read is dropped, not waited for.
                let _ = tokio::time::timeout(wait.saturating_mul(5), async {
                    socket.write_all(head.as_bytes()).await?;
                    socket.write_all(body.as_bytes()).await?;
                    socket.shutdown().await
                })
                .await;
            });
        }
    }))
}

impl MetricsRecorder for Metrics {
    /// Records the batch's size, latency, lag, released, lease-lost and commit-failure
    /// counts, and one completed, skipped or failed count per event; a failure's `kind`
    /// label is `transient`, `unavailable`, `dead` (including a last counted attempt)
    /// or `counted`.
    fn batch(&self, table: Table, report: &BatchReport, events: &[EventOutcome<'_>]) {
        let m = self;
        let table = table.to_string();
        let t = TableLabels {
            table: table.clone(),
        };
        m.batch_size
            .get_or_create(&t)
            .observe(report.claimed as f64);
        m.locked_batch_size
            .get_or_create(&t)
            .set(i64::try_from(report.claimed).unwrap_or(i64::MAX));
        m.batch_latency
            .get_or_create(&t)
            .observe(report.handle_time.as_secs_f64());
        m.lag_seconds
            .get_or_create(&t)
            .set(report.lag.as_secs_f64());
        m.released.get_or_create(&t).inc_by(report.released as u64);
        m.lease_lost
            .get_or_create(&t)
            .inc_by(report.lease_lost as u64);
        if report.commit_error.is_some() {
            m.commit_failed.get_or_create(&t).inc();
        }
        for e in events {
            let labels = EventLabels {
                table: table.clone(),
                event_type: m.type_label(e.event_type),
            };
            match e.outcome {
                Outcome::Completed | Outcome::Committed => {
                    m.completed.get_or_create(&labels).inc();
                }
                Outcome::Skipped => {
                    m.skipped.get_or_create(&labels).inc();
                }
                Outcome::Failed { .. } | Outcome::Unavailable { .. } | Outcome::Dead { .. } => {
                    m.count_failure(&table, e);
                }
                Outcome::Released => {}
            }
        }
    }

    /// Observes `handler_duration_seconds`.
    fn handler_time(&self, table: Table, event_type: &str, took: std::time::Duration) {
        self.handler_duration
            .get_or_create(&EventLabels {
                table: table.to_string(),
                event_type: self.type_label(event_type),
            })
            .observe(took.as_secs_f64());
    }

    /// Observes the handler's time and counts a failure in `events_failed`
    /// by kind (the consumer's completions are its `processed` counter).
    fn handled(&self, table: Table, event: &EventOutcome<'_>, took: std::time::Duration) {
        self.handler_time(table, event.event_type, took);
        if matches!(
            event.outcome,
            Outcome::Failed { .. } | Outcome::Unavailable { .. } | Outcome::Dead { .. }
        ) {
            self.count_failure(&table.to_string(), event);
        }
    }

    /// Adds `n` to the `counters` series labelled `name`, as `Metrics::count`.
    fn count(&self, name: &str, n: u64) {
        Metrics::count(self, name, n);
    }
}

/// Sets `table`'s gauge of `family` to `n`.
fn set_count(family: &Family<TableLabels, Gauge>, table: &str, n: u64) {
    let labels = TableLabels {
        table: table.to_string(),
    };
    family
        .get_or_create(&labels)
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_and_serves() {
        let m = Arc::new(Metrics::new());
        m.completed
            .get_or_create(&EventLabels {
                table: "outbox".into(),
                event_type: "order.created".into(),
            })
            .inc_by(3);
        let text = m.render();
        assert!(
            text.contains(
                r#"omnibox_events_completed_total{table="outbox",event_type="order.created"} 3"#
            ),
            "{text}"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let _server = serve(addr, m).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"));
        assert!(resp.contains("omnibox_events_completed_total"));
    }

    /// Past 200 event types, new ones share the label `" other"`: a producer
    /// sending a type per message cannot grow the registry without bound.
    #[test]
    fn event_type_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..EVENT_TYPE_LABELS + 50 {
            m.handler_time(
                Table::Inbox,
                &format!("t{i}"),
                std::time::Duration::from_millis(1),
            );
        }
        assert_eq!(m.type_label("t0"), "t0");
        assert_eq!(
            m.type_label(&format!("t{}", EVENT_TYPE_LABELS - 1)),
            format!("t{}", EVENT_TYPE_LABELS - 1)
        );
        assert_eq!(
            m.type_label(&format!("t{EVENT_TYPE_LABELS}")),
            OTHER_EVENT_TYPES
        );
        // The overflow label is not a name a real type can have: a type
        // named "other" seen past the first 200 is counted as overflow,
        // and nothing else is ever counted under "other".
        assert_eq!(m.type_label("other"), OTHER_EVENT_TYPES);
        assert_ne!(OTHER_EVENT_TYPES, OTHER_EVENT_TYPES.trim());
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("omnibox_handler_duration_seconds_count{"))
            .count();
        assert_eq!(series, EVENT_TYPE_LABELS + 1, "200 types and other");
        assert!(text.contains(r#"event_type=" other""#));
    }

    /// Clients that connect and send nothing hold at most 32 connections;
    /// one more is closed at once, and once they go the endpoint answers.
    #[tokio::test]
    async fn a_flood_of_idle_clients_is_bounded() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let _server = serve(addr, Arc::new(Metrics::new())).await.unwrap();
        let mut idle = Vec::new();
        for _ in 0..METRICS_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Accepted in order: give the server a moment to take them all.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            extra.read_to_end(&mut buf),
        )
        .await
        .expect("the connection over the limit is closed at once")
        .unwrap_or(0);
        assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf));
        drop(idle);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    }
}
