//! The metrics a processor and the inbox consumer report, as a trait the
//! caller's metrics back end implements (the Prometheus one is
//! `omnibox::metrics::Metrics`).

use std::time::Duration;

use super::options::BatchReport;
use super::outcome::Outcome;
use crate::model::Table;

/// One claimed event of a written batch, for a [`MetricsRecorder`].
#[derive(Debug, Clone, Copy)]
pub struct EventOutcome<'a> {
    /// Its event type.
    pub event_type: &'a str,
    /// Attempts made before this one.
    pub attempts_made: i32,
    /// Its attempt limit.
    pub max_attempts: i32,
    /// What happened to it.
    pub outcome: &'a Outcome,
}

/// What processors and the inbox consumer report, for the metrics back end
/// a service chooses. The Prometheus `omnibox::metrics::Metrics` (served by
/// `--metrics-addr`) is the default.
pub trait MetricsRecorder: Send + Sync + 'static {
    /// A batch's results were written: its report, and each claimed event
    /// with its outcome.
    fn batch(&self, table: Table, report: &BatchReport, events: &[EventOutcome<'_>]);

    /// A counter of the inbox consumer went up by `n` (`consumed`,
    /// `stored`, `duplicates`, `poison`, `processed`, ...).
    fn count(&self, name: &str, n: u64);

    /// A handler took `took` on one event of `event_type` (every handler
    /// run: the inbox consumer's and a processor's handler step). The
    /// default ignores it.
    fn handler_time(&self, table: Table, event_type: &str, took: Duration) {
        let _ = (table, event_type, took);
    }

    /// The inbox consumer's handler ran on one event: what it answered and
    /// how long it took (a processor's outcomes come with its batch). The
    /// default passes the time to [`handler_time`](Self::handler_time).
    fn handled(&self, table: Table, event: &EventOutcome<'_>, took: Duration) {
        self.handler_time(table, event.event_type, took);
    }
}
