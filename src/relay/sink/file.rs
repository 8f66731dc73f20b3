//! JSON lines sinks: a file (the embedded default) and stdout. A line is
//! `{"topic", "key", "headers", "value"}`; `omnibox inbox consume --from
//! file:PATH` reads the same format.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Delivery, Sink};
use crate::error::{Error, Result};
use crate::relay::Message;

/// Lines are written in pieces of about this size, so a batch of large
/// messages is not copied whole into one buffer beside the messages.
const WRITE_CHUNK: usize = 1 << 20;

/// Appends `m`'s line ([`Message::to_json_line`]) to `buf`.
fn push_line(buf: &mut Vec<u8>, m: &Message) {
    serde_json::to_writer(&mut *buf, m).expect("a message serialises");
    buf.push(b'\n');
}

/// Appends messages to a file, synced to disk before they count as delivered.
#[derive(Debug, Clone)]
pub struct FileSink {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl FileSink {
    /// Opens (creating it if needed) `path` for appending.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                Error::Config(format!("cannot open {} for appending: {e}", path.display()))
            })?;
        Ok(FileSink {
            path,
            file: Arc::new(Mutex::new(file)),
        })
    }
}

impl Sink for FileSink {
    /// `file:PATH`.
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    /// Appends the batch's lines in chunks of about `WRITE_CHUNK` bytes and syncs the
    /// file after the last; any write error makes the whole batch `Transient` (lines
    /// written already come again: at least once). `_timeout` is not used.
    async fn send(&self, messages: &[Message], _timeout: Duration) -> Vec<Delivery> {
        if messages.is_empty() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            push_line(&mut buf, m);
            let last = i + 1 == messages.len();
            if buf.len() < WRITE_CHUNK && !last {
                continue;
            }
            let chunk = std::mem::take(&mut buf);
            let file = self.file.clone();
            let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                f.write_all(&chunk)?;
                if last { f.sync_data() } else { Ok(()) }
            })
            .await;
            let why = match written {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => format!("cannot write {}: {e}", self.path.display()),
                Err(e) => format!("writer task failed: {e}"),
            };
            // Lines written before are sent again with the rest (at least
            // once: the consumer deduplicates them).
            return vec![Delivery::Transient(why); messages.len()];
        }
        vec![Delivery::Delivered; messages.len()]
    }
}

/// Writes messages to stdout as JSON lines. When stdout's reader goes away
/// (`omnibox publish --broker stdout | head`), the batch is not delivered
/// (its rows stay pending, no attempt spent) and [`closed`](Self::closed)
/// turns true, so the run can end as other Unix tools do instead of
/// retrying a pipe no one reads.
#[derive(Debug, Clone)]
pub struct StdoutSink {
    closed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for StdoutSink {
    /// Standard output, not closed yet.
    fn default() -> Self {
        StdoutSink {
            closed: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

impl StdoutSink {
    /// Turns true once a write found stdout's reader gone (a broken pipe).
    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Whether stdout's reader has gone.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

impl Sink for StdoutSink {
    /// `stdout`.
    fn describe(&self) -> String {
        "stdout".into()
    }

    /// Writes the batch's lines to stdout and flushes; an error (a broken pipe also
    /// marks the sink closed) makes the whole batch `Transient`, as does a closed sink.
    async fn send(&self, messages: &[Message], _timeout: Duration) -> Vec<Delivery> {
        if self.is_closed() {
            return vec![Delivery::Transient("stdout's reader has gone".into()); messages.len()];
        }
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        let mut line = Vec::new();
        let written = messages
            .iter()
            .try_for_each(|m| {
                line.clear();
                push_line(&mut line, m);
                out.write_all(&line)
            })
            .and_then(|()| out.flush());
        match written {
            Ok(()) => vec![Delivery::Delivered; messages.len()],
            Err(e) => {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    self.closed.send_replace(true);
                }
                // Lines of the batch may have reached the reader before the
                // error: they come again (at least once).
                vec![Delivery::Transient(format!("cannot write to stdout: {e}")); messages.len()]
            }
        }
    }
}
