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
    /// The bytes of a line whose newline has not arrived yet (a writer
    /// appending a line in pieces): kept until it does.
    pending: Vec<u8>,
    /// Skipping the rest of an over-long line already handed out.
    discard: bool,
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
            pending: Vec::new(),
            discard: false,
        })
    }

    /// The next whole line, without its line ending. A line whose newline
    /// has not arrived is kept (with `follow`: until it arrives; without:
    /// the end of the input ends it). A line over [`MAX_LINE`] bytes is cut
    /// there (it becomes a poison message) and the rest of it is skipped.
    async fn next_line(&mut self) -> Result<Option<String>> {
        loop {
            let limit = if self.discard {
                1 << 16
            } else {
                // Not negative: `pending` never stays over MAX_LINE.
                (MAX_LINE + 1).saturating_sub(self.pending.len()) as u64
            };
            let n = (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut self.pending)
                .await
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", self.name)))?;
            if self.discard {
                if self.pending.ends_with(b"\n") {
                    self.discard = false;
                }
                self.pending.clear();
                if n == 0 {
                    return Ok(None);
                }
                continue;
            }
            let line = if self.pending.ends_with(b"\n") {
                std::mem::take(&mut self.pending)
            } else if self.pending.len() > MAX_LINE {
                self.discard = true;
                let mut line = std::mem::take(&mut self.pending);
                line.truncate(MAX_LINE);
                line
            } else if n == 0 {
                // The end of the input, for now.
                if self.pending.is_empty() || self.follow {
                    return Ok(None);
                }
                std::mem::take(&mut self.pending)
            } else {
                // Read up to the end of the input without a newline: the
                // next read tells whether more is coming.
                continue;
            };
            self.line += 1;
            return Ok(Some(
                String::from_utf8_lossy(&line)
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ));
        }
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    async fn poll_all(src: &mut FileSource) -> Vec<String> {
        let p = src.poll(100, Duration::from_millis(50)).await.unwrap();
        p.messages
            .iter()
            .map(|m| String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default()).into_owned())
            .collect()
    }

    /// A line appended in pieces is read whole once its newline arrives;
    /// it used to become a poison row holding its second half (two pieces)
    /// or vanish (three).
    #[tokio::test]
    async fn follow_keeps_a_line_written_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut src = FileSource::open(path.to_str().unwrap(), true)
            .await
            .unwrap();
        for piece in [r#"{"topic":"t","#, r#""value":{"a""#, r#":1}}"#] {
            f.write_all(piece.as_bytes()).unwrap();
            f.flush().unwrap();
            assert!(
                poll_all(&mut src).await.is_empty(),
                "nothing before the newline"
            );
        }
        f.write_all(b"\n{\"topic\":\"t\",\"value\":{\"b\":2}}\n")
            .unwrap();
        f.flush().unwrap();
        let got = poll_all(&mut src).await;
        assert_eq!(
            got,
            vec![r#"{"a":1}"#.to_string(), r#"{"b":2}"#.to_string()]
        );
    }

    /// Without --follow, a last line without a newline is a line.
    #[tokio::test]
    async fn a_last_line_without_newline_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        std::fs::write(
            &path,
            "{\"topic\":\"t\",\"value\":{\"a\":1}}\n{\"topic\":\"t\",\"value\":{\"b\":2}}",
        )
        .unwrap();
        let mut src = FileSource::open(path.to_str().unwrap(), false)
            .await
            .unwrap();
        let p = src.poll(100, Duration::from_millis(50)).await.unwrap();
        assert_eq!(p.messages.len(), 2);
        assert_eq!(p.messages[1].offset, 2);
        assert!(p.end);
    }

    /// An over-long line is cut and the rest of it skipped, also when the
    /// rest arrives later; the next line is read whole.
    #[tokio::test]
    async fn an_over_long_line_is_cut_and_its_rest_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut src = FileSource::open(path.to_str().unwrap(), true)
            .await
            .unwrap();
        f.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        f.flush().unwrap();
        let p = src.poll(100, Duration::from_millis(50)).await.unwrap();
        assert_eq!(p.messages.len(), 1, "the cut line");
        f.write_all(b"yyy\n{\"topic\":\"t\",\"value\":{\"b\":2}}\n")
            .unwrap();
        f.flush().unwrap();
        assert_eq!(poll_all(&mut src).await, vec![r#"{"b":2}"#.to_string()]);
    }
}
