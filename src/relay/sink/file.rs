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

fn lines(messages: &[Message]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(messages.len() * 512);
    for m in messages {
        buf.extend_from_slice(m.to_json_line().as_bytes());
        buf.push(b'\n');
    }
    buf
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
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn send(&self, messages: &[Message], _timeout: Duration) -> Vec<Delivery> {
        if messages.is_empty() {
            return Vec::new();
        }
        let buf = lines(messages);
        let file = self.file.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(&buf)?;
            f.sync_data()
        })
        .await;
        match written {
            Ok(Ok(())) => vec![Delivery::Delivered; messages.len()],
            Ok(Err(e)) => {
                let why = format!("cannot write {}: {e}", self.path.display());
                vec![Delivery::Transient(why); messages.len()]
            }
            Err(e) => vec![Delivery::Transient(format!("writer task failed: {e}")); messages.len()],
        }
    }
}

/// Writes messages to stdout as JSON lines.
#[derive(Debug, Clone, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn describe(&self) -> String {
        "stdout".into()
    }

    async fn send(&self, messages: &[Message], _timeout: Duration) -> Vec<Delivery> {
        let buf = lines(messages);
        let mut out = std::io::stdout().lock();
        match out.write_all(&buf).and_then(|()| out.flush()) {
            Ok(()) => vec![Delivery::Delivered; messages.len()],
            Err(e) => {
                vec![Delivery::Transient(format!("cannot write to stdout: {e}")); messages.len()]
            }
        }
    }
}
