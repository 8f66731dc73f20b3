//! `--exec`: a handler that runs a command per event, the event on its
//! stdin, its exit code the outcome.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::model::InboxEvent;
use crate::pipeline::Outcome;

use super::{EXIT_SKIPPED, EXIT_TEMPFAIL, Handler, counted, transient};
use crate::inbox::context::HandlerContext;

/// The JSON an external handler receives: the whole inbox row.
pub fn event_json(event: &InboxEvent) -> String {
    serde_json::to_string(event).expect("an event serialises")
}

/// Runs a command per event (`sh -c CMD`): the event as JSON on stdin and
/// `OMNIBOX_*` variables in the environment. Exit 0 → completed; 3 →
/// skipped; 75 → transient (no attempt spent); any other → counted failure
/// with the tail of stderr; still running at the timeout → killed, counted.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    command: String,
    timeout: Duration,
}

impl ExecHandler {
    /// A handler running `command` through `sh -c`, killed after `timeout`.
    pub fn new(command: impl Into<String>, timeout: Duration) -> Self {
        ExecHandler {
            command: command.into(),
            timeout,
        }
    }
}

/// Most bytes of a handler's output kept (its end).
const OUTPUT_TAIL: usize = 64 * 1024;

/// Reads a pipe to its end, keeping the last [`OUTPUT_TAIL`] bytes.
async fn read_tail<R: tokio::io::AsyncRead + Unpin>(mut pipe: R) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * OUTPUT_TAIL {
                    kept.drain(..kept.len() - OUTPUT_TAIL);
                }
            }
        }
    }
}

/// Kills a handler's process group when the handler's future is dropped
/// before it finished (an outer timeout, a shutdown): `kill_on_drop` alone
/// would end only `sh`, leaving what it started running, orphaned.
struct GroupGuard(Option<u32>);

impl GroupGuard {
    /// The handler finished: its group is left as the run left it.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    /// Kills the group unless `disarm` ran first.
    fn drop(&mut self) {
        kill_group(self.0.take());
    }
}

/// Kills the process group a handler runs in (its id is the handler's pid).
fn kill_group(group: Option<u32>) {
    let Some(pid) = group.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals that process group; it
    // touches no memory of this process.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// The last `max` bytes of a command's output as text (trimmed, cut on a
/// character boundary), for the error a failure records.
pub(super) fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let start = text.len().saturating_sub(max);
    let mut start = start;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

impl Handler for ExecHandler {
    /// An external command: never run inside the inbox's transaction.
    fn in_transaction(&self) -> bool {
        false
    }

    /// Runs the command in a process group of its own and maps its exit code, as the
    /// type's documentation says; the context is unused.
    async fn handle(&self, event: &InboxEvent, _cx: &mut HandlerContext<'_>) -> Outcome {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("OMNIBOX_EVENT_ID", event.id().to_string())
            .env("OMNIBOX_EVENT_TYPE", event.event_type())
            .env("OMNIBOX_MESSAGE_ID", event.message_id())
            .env("OMNIBOX_CONSUMER_GROUP", event.consumer_group())
            .env("OMNIBOX_SOURCE", event.source())
            .env("OMNIBOX_ATTEMPT", (event.attempts_made() + 1).to_string());
        for (name, value) in crate::relay::passed_on(event) {
            if let Some(v) = value {
                cmd.env(format!("OMNIBOX_{}", name.to_ascii_uppercase()), v);
            }
        }
        // The W3C trace context: the handler span's, or the event's own.
        for (name, value) in crate::telemetry::outgoing(event.headers()) {
            cmd.env(name.to_ascii_uppercase(), value);
        }
        // Its own process group: a timeout kills everything it started,
        // not only `sh`.
        cmd.process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return transient(
                    format!("cannot start the handler `{}`: {e}", self.command),
                    Duration::from_secs(5),
                );
            }
        };
        let group = child.id();
        let guard = GroupGuard(group);
        let input = event_json(event);
        // All three pipes were set to `piped` above, so `take` finds them.
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            kill_group(group);
            return counted("handler's pipes could not be opened");
        };
        // Write stdin while reading stdout and stderr: a handler may write
        // more than a pipe holds before it reads its input.
        let io = async move {
            let write = async move {
                // A handler that does not read its stdin is fine.
                let _ = stdin.write_all(input.as_bytes()).await;
                drop(stdin);
            };
            let ((), err, _) = tokio::join!(write, read_tail(stderr), read_tail(stdout));
            err
        };
        let run = async {
            tokio::pin!(io);
            let mut err = None;
            let status = loop {
                tokio::select! {
                e = &mut io, if err.is_none() => err = Some(e),
                s = child.wait() => break s}
            };
            let err = match err {
                Some(e) => e,
                // Exited, but something it started holds its output open:
                // that is part of the handler; give it a moment, then end it.
                None => match tokio::time::timeout(Duration::from_secs(1), &mut io).await {
                    Ok(e) => e,
                    Err(_) => {
                        kill_group(group);
                        io.await
                    }
                },
            };
            (status, err)
        };
        let finished = tokio::time::timeout(self.timeout, run).await;
        guard.disarm();
        match finished {
            Err(_) => {
                kill_group(group);
                counted(format!(
                    "handler timed out after {:?} and was killed with every process it started",
                    self.timeout
                ))
            }
            Ok((Err(e), _)) => counted(format!("handler failed to run: {e}")),
            Ok((Ok(status), err)) => match status.code() {
                Some(0) => Outcome::Completed,
                Some(EXIT_SKIPPED) => Outcome::Skipped,
                Some(EXIT_TEMPFAIL) => transient(
                    format!(
                        "handler asked to retry later (exit 75): {}",
                        tail(&err, 1500)
                    ),
                    crate::model::limits::DEFAULT_TRANSIENT_RETRY_DELAY,
                ),
                Some(code) => counted(format!("handler exited with {code}: {}", tail(&err, 1500))),
                None => counted(format!(
                    "handler was killed by a signal: {}",
                    tail(&err, 1500)
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainService;
    use crate::model::NewInboxEvent;

    /// The command's environment names the event and passes its optional
    /// ids on as `OMNIBOX_<NAME>` (docs/cli.md lists them); an id the event
    /// lacks is not set.
    #[tokio::test]
    async fn the_command_gets_the_events_ids_in_its_environment() {
        let mut n = NewInboxEvent::new(
            "m-1",
            "billing",
            "shop",
            "order.created",
            serde_json::json!({"id": 1}),
        );
        n.schema_version = Some("2".into());
        n.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        n.correlation_id = Some("corr-1".into());
        let event = DomainService::default().create_inbox_event(n).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let names = "OMNIBOX_MESSAGE_ID OMNIBOX_CONSUMER_GROUP OMNIBOX_SOURCE \
                     OMNIBOX_EVENT_TYPE OMNIBOX_ATTEMPT OMNIBOX_SCHEMA_VERSION \
                     OMNIBOX_TRACE_ID OMNIBOX_CORRELATION_ID OMNIBOX_CAUSATION_ID";
        let command = format!(
            "for n in {names}; do eval \"echo $n=\\${{$n-unset}}\"; done > '{}'",
            out.display()
        );
        let handler = ExecHandler::new(command, Duration::from_secs(10));
        let mut cx = HandlerContext::detached(crate::inbox::Dependencies::new());
        let outcome = handler.handle(&event, &mut cx).await;
        assert!(matches!(outcome, Outcome::Completed), "{outcome:?}");
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            got.lines().collect::<Vec<_>>(),
            [
                "OMNIBOX_MESSAGE_ID=m-1",
                "OMNIBOX_CONSUMER_GROUP=billing",
                "OMNIBOX_SOURCE=shop",
                "OMNIBOX_EVENT_TYPE=order.created",
                "OMNIBOX_ATTEMPT=1",
                "OMNIBOX_SCHEMA_VERSION=2",
                "OMNIBOX_TRACE_ID=4bf92f3577b34da6a3ce929d0e0e4736",
                "OMNIBOX_CORRELATION_ID=corr-1",
                "OMNIBOX_CAUSATION_ID=unset",
            ]
        );
    }
}
