//! The database calls a processor has in progress (claims and results
//! writes), for the runner's watchdog: a call the server has not answered
//! long after its statement timeout is on a connection the network lost
//! without a reset (a failover that moved the address, a middlebox that
//! dropped its state), which no error will ever end. sqlx sets neither TCP
//! keepalives nor a user timeout on its sockets, so such a call would wait
//! for the kernel's retransmission timeout (about 15 minutes on Linux) or,
//! when the request was acknowledged and only the answer is lost, for ever.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Calls in progress: an id, when it began, what it is.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    open: Mutex<Vec<(u64, Instant, &'static str)>>,
    next: std::sync::atomic::AtomicU64,
}

/// One call in progress; it ends when dropped.
pub(crate) struct Call<'a> {
    calls: &'a Calls,
    id: u64,
}

impl Calls {
    /// Records a call beginning now.
    pub(crate) fn begin(&self, what: &'static str) -> Call<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().push((id, Instant::now(), what));
        Call { calls: self, id }
    }

    /// The oldest call in progress: how long it has run, and what it is.
    pub(crate) fn oldest(&self) -> Option<(Duration, &'static str)> {
        self.lock()
            .iter()
            .min_by_key(|(_, at, _)| *at)
            .map(|(_, at, what)| (at.elapsed(), *what))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Instant, &'static str)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Awaits `call` as a call in progress of `calls`.
pub(crate) async fn watched<T>(
    calls: &Calls,
    what: &'static str,
    call: impl std::future::Future<Output = T>,
) -> T {
    let _call = calls.begin(what);
    call.await
}

/// Resolves once the oldest call in progress has run for `limit`, with
/// what [`Calls::stalled`] says (checked every second); never without a
/// limit.
pub(crate) async fn stalled(calls: &Calls, limit: Option<Duration>) -> String {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Some(e) = calls.stalled(limit) {
            return e;
        }
    }
}

/// What a run that stops on a lost connection adds to [`Calls::stalled`].
pub(crate) const STOPPING: &str = "stopping so that the process is started again (rows in flight are retaken after their lease, or once the server ends their transaction)";

impl Calls {
    /// When the oldest call in progress has run for `limit`: what it is,
    /// and that its connection is taken for lost.
    pub(crate) fn stalled(&self, limit: Duration) -> Option<String> {
        let (age, what) = self.oldest()?;
        (age >= limit).then(|| {
            format!(
                "the database has not answered {what} in {}s (the limit is {}s, past the longest a statement may run): its connection is taken for lost without a reset (a failover that moved the server's address, a firewall or NAT that dropped the connection)",
                age.as_secs(),
                limit.as_secs(),
            )
        })
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.calls.lock().retain(|(id, _, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_call_in_progress_is_reported_until_it_ends() {
        let calls = Calls::default();
        assert!(calls.oldest().is_none());
        let first = calls.begin("a claim");
        std::thread::sleep(Duration::from_millis(20));
        let second = calls.begin("a write");
        let (age, what) = calls.oldest().unwrap();
        assert_eq!(what, "a claim");
        assert!(age >= Duration::from_millis(20));
        drop(first);
        assert_eq!(calls.oldest().unwrap().1, "a write");
        drop(second);
        assert!(calls.oldest().is_none());
    }
}
