//! A circuit breaker for a relay or processor whose downstream is out: after
//! `threshold` consecutive failing batches it opens and asks the runner to
//! pause, doubling the pause up to `max` while failures go on (the
//! reference's `CircuitBreakerStep`, with exponential recovery).

use std::time::{Duration, Instant};

/// Settings of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Whether the circuit opens at all (the reference's
    /// `enable_circuit_breaker`). Off, a downstream outage still spends no
    /// attempt and is still reported once, but claims go on at the
    /// transient retry's pace.
    pub enabled: bool,
    /// Consecutive failing batches before the circuit opens (the
    /// reference's `failure_threshold`).
    pub threshold: u32,
    /// First pause once open.
    pub base: Duration,
    /// Longest pause: the pause doubles while failures go on, up to this
    /// (the reference's `recovery_timeout`).
    pub max: Duration,
}

impl Default for CircuitConfig {
    /// Enabled: opens after one failing batch, pausing 1 s, doubling up to 30 s.
    fn default() -> Self {
        CircuitConfig {
            enabled: true,
            threshold: 1,
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

/// Counts consecutive failing batches and says how long to pause.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: CircuitConfig,
    failures: u32,
    open_until: Option<Instant>,
    /// When the first of the consecutive failures happened, and the last
    /// error seen.
    since: Option<Instant>,
    last_error: Option<String>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: CircuitConfig) -> Self {
        CircuitBreaker {
            config,
            failures: 0,
            open_until: None,
            since: None,
            last_error: None,
        }
    }

    /// Records a batch whose downstream did not answer, with why.
    pub fn record_failure(&mut self, error: Option<&str>) {
        self.failures = self.failures.saturating_add(1);
        self.since.get_or_insert_with(Instant::now);
        if let Some(e) = error {
            self.last_error = Some(e.to_string());
        }
        if self.config.enabled && self.failures >= self.config.threshold.max(1) {
            let doublings = (self.failures - self.config.threshold.max(1)).min(16);
            let pause = self
                .config
                .base
                .saturating_mul(1 << doublings)
                .min(self.config.max);
            self.open_until = Some(crate::model::time::instant_after(pause));
        }
    }

    /// Records a batch that went through: the circuit closes.
    pub fn record_success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.since = None;
        self.last_error = None;
    }

    /// The outage in progress (consecutive failures), if any: when it began
    /// and the last error seen.
    pub fn outage(&self) -> Option<(Instant, Option<String>)> {
        Some((self.since?, self.last_error.clone()))
    }

    /// How long to wait before the next claim, if the circuit is open.
    pub fn pause(&self) -> Option<Duration> {
        let until = self.open_until?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Consecutive failing batches.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_doubles_caps_and_closes() {
        let mut b = CircuitBreaker::new(CircuitConfig {
            enabled: true,
            threshold: 2,
            base: Duration::from_secs(1),
            max: Duration::from_secs(3),
        });
        assert!(b.pause().is_none());
        b.record_failure(Some("down"));
        assert!(b.pause().is_none(), "below the threshold");
        b.record_failure(Some("down"));
        let p = b.pause().unwrap();
        assert!(p > Duration::from_millis(900) && p <= Duration::from_secs(1));
        b.record_failure(Some("down"));
        assert!(b.pause().unwrap() > Duration::from_millis(1900));
        b.record_failure(Some("down"));
        assert!(b.pause().unwrap() <= Duration::from_secs(3), "capped");
        assert_eq!(b.outage().unwrap().1.as_deref(), Some("down"));
        b.record_success();
        assert!(b.pause().is_none());
        assert!(b.outage().is_none());
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn disabled_never_pauses_but_still_tracks_the_outage() {
        let mut b = CircuitBreaker::new(CircuitConfig {
            enabled: false,
            ..CircuitConfig::default()
        });
        for _ in 0..5 {
            b.record_failure(Some("down"));
        }
        assert!(b.pause().is_none());
        assert_eq!(b.failures(), 5);
        assert!(b.outage().is_some());
    }
}
