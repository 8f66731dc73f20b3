//! A JSON lines file or stdin. Lines are numbered from 1 (the offset of
//! their message); commits are not persisted: reading a file again is safe,
//! because the inbox drops what it has already stored.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::{Polled, Source};
use crate::error::{Error, Result};
use crate::inbox::RawMessage;
use crate::inbox::normalize::from_json_line;

/// Longest line read (a payload is at most 1,000,000 bytes).
const MAX_LINE: usize = 4 * 1024 * 1024;

/// Reads messages from a file or stdin.
pub struct FileSource {
    name: String,
    reader: BufReader<Box<dyn AsyncRead + Send + Unpin>>,
    follow: bool,
    line: i64,
    eof: bool,
    redeliver: VecDeque<RawMessage>,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("name", &self.name)
            .field("line", &self.line)
            .finish()
    }
}

impl FileSource {
    /// Opens `path` (`-` for stdin); with `follow`, waits for new lines at
    /// the end instead of ending.
    pub async fn open(path: &str, follow: bool) -> Result<Self> {
        let (name, input): (String, Box<dyn AsyncRead + Send + Unpin>) = if path == "-" {
            ("stdin".into(), Box::new(tokio::io::stdin()))
        } else {
            let p = PathBuf::from(path);
            let f = tokio::fs::File::open(&p)
                .await
                .map_err(|e| Error::Config(format!("cannot open {}: {e}", p.display())))?;
            (format!("file:{}", p.display()), Box::new(f))
        };
        Ok(FileSource {
            name,
            reader: BufReader::with_capacity(1 << 16, input),
            follow,
            line: 0,
            eof: false,
            redeliver: VecDeque::new(),
        })
    }

    async fn next_line(&mut self) -> Result<Option<String>> {
        let mut buf = Vec::new();
        loop {
            let n = (&mut self.reader)
                .take((MAX_LINE + 1) as u64)
                .read_until(b'\n', &mut buf)
                .await
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", self.name)))?;
            if n == 0 {
                return Ok(None);
            }
            if buf.ends_with(b"\n") || buf.len() > MAX_LINE {
                break;
            }
            // A partial last line (possible while following a file being written).
            if !self.follow {
                break;
            }
        }
        self.line += 1;
        if buf.len() > MAX_LINE {
            // Skip the rest of an over-long line; it becomes a poison message.
            let mut rest = Vec::new();
            let _ = self.reader.read_until(b'\n', &mut rest).await;
            buf.truncate(MAX_LINE);
        }
        Ok(Some(
            String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ))
    }
}

use tokio::io::AsyncReadExt as _;

impl Source for FileSource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.redeliver.pop_front() {
                Some(m) => out.push(m),
                None => break,
            }
        }
        let deadline = Instant::now() + wait;
        while out.len() < max && !self.eof {
            match self.next_line().await? {
                Some(line) if line.trim().is_empty() => continue,
                Some(line) => out.push(from_json_line(&line, self.line, "file")),
                None if self.follow => {
                    if !out.is_empty() || Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100).min(wait)).await;
                }
                None => self.eof = true,
            }
        }
        Ok(Polled {
            end: self.eof && self.redeliver.is_empty(),
            messages: out,
        })
    }

    async fn commit(&mut self, _through: &[RawMessage]) -> Result<()> {
        Ok(())
    }

    async fn rewind(&mut self, from: &[RawMessage]) -> Result<()> {
        for m in from.iter().rev() {
            self.redeliver.push_front(m.clone());
        }
        Ok(())
    }
}
