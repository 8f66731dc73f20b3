//! A circuit breaker for a relay or processor whose downstream is out: after
//! `threshold` consecutive failing batches it opens and asks the runner to
//! pause, doubling the pause up to `max` while failures go on (the
//! reference's `CircuitBreakerStep`, with exponential recovery).

use std::time::{Duration, Instant};

/// Settings of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Consecutive failing batches before the circuit opens.
    pub threshold: u32,
    /// First pause once open.
    pub base: Duration,
    /// Longest pause.
    pub max: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
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
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: CircuitConfig) -> Self {
        CircuitBreaker {
            config,
            failures: 0,
            open_until: None,
        }
    }

    /// Records a batch whose downstream did not answer.
    pub fn record_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.config.threshold.max(1) {
            let doublings = (self.failures - self.config.threshold.max(1)).min(16);
            let pause = self
                .config
                .base
                .saturating_mul(1 << doublings)
                .min(self.config.max);
            self.open_until = Some(Instant::now() + pause);
        }
    }

    /// Records a batch that went through: the circuit closes.
    pub fn record_success(&mut self) {
        self.failures = 0;
        self.open_until = None;
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
            threshold: 2,
            base: Duration::from_secs(1),
            max: Duration::from_secs(3),
        });
        assert!(b.pause().is_none());
        b.record_failure();
        assert!(b.pause().is_none(), "below the threshold");
        b.record_failure();
        let p = b.pause().unwrap();
        assert!(p > Duration::from_millis(900) && p <= Duration::from_secs(1));
        b.record_failure();
        assert!(b.pause().unwrap() > Duration::from_millis(1900));
        b.record_failure();
        assert!(b.pause().unwrap() <= Duration::from_secs(3), "capped");
        b.record_success();
        assert!(b.pause().is_none());
        assert_eq!(b.failures(), 0);
    }
}
