//! SIGINT/SIGTERM: the first asks the running command to stop after the
//! work in hand; the second exits at once (rows left locked are recovered by
//! lease expiry).

use tokio::sync::watch;

/// A channel that turns true on the first SIGINT or SIGTERM.
pub fn shutdown_channel() -> watch::Receiver<bool> {
    channel(Some(
        "omnibox: stopping after the current batch (signal again to exit now)",
    ))
}

/// Like [`shutdown_channel`], for a command with no batch to finish
/// (`status --watch`): the first signal ends it without a word.
pub fn stop_channel() -> watch::Receiver<bool> {
    channel(None)
}

/// A channel that turns true when either `a` or `b` does.
pub fn either(mut a: watch::Receiver<bool>, mut b: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*a.borrow() || *b.borrow());
    tokio::spawn(async move {
        let (mut a_open, mut b_open) = (true, true);
        loop {
            if *a.borrow_and_update() || *b.borrow_and_update() {
                let _ = tx.send(true);
                return;
            }
            if !a_open && !b_open {
                return;
            }
            tokio::select! {
                r = a.changed(), if a_open => a_open = r.is_ok(),
                r = b.changed(), if b_open => b_open = r.is_ok(),
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

fn channel(first: Option<&'static str>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        let mut count = 0;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            count += 1;
            if count == 1 {
                if let Some(text) = first {
                    crate::cli::output::notice!("{text}");
                }
                let _ = tx.send(true);
            } else {
                crate::cli::output::notice!(
                    "omnibox: exiting now; rows of the batch in hand are released when their lease expires"
                );
                std::process::exit(130);
            }
        }
    });
    rx
}
