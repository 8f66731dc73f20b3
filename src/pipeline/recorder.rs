//! The metrics a processor and the inbox consumer report, as a trait the
//! caller's metrics back end implements (the Prometheus one is
//! `omnibox::metrics::Metrics`).

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
}
