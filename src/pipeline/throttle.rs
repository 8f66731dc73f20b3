//! Rate limit of a repeated warning: the inbox consumer's handler failures
//! (repeated on every redelivery) and the processor's failed events (every
//! batch of `inbox process` or `publish` while a handler or a broker says
//! no) are logged at most once per period; the ones left out are counted
//! and reported with the next.

use std::time::{Duration, Instant};

/// Rate limit of a repeated warning.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// The shortest time between two logged warnings.
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    /// Some(number suppressed since the last one) when this one may be logged.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < Self::EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warning repeated on every redelivery is logged once per period,
    /// the next one saying how many were left out.
    #[test]
    fn repeated_warnings_are_throttled() {
        let mut t = Throttle::default();
        assert_eq!(t.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.allow(), None);
        }
        t.last = Some(Instant::now() - Throttle::EVERY);
        assert_eq!(t.allow(), Some(1000));
        assert_eq!(t.allow(), None);
    }
}
