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
use crate::inbox::Truncated;
use crate::inbox::normalize::from_json_bytes;

/// Longest line read (a payload is at most 1,000,000 bytes).
const MAX_LINE: usize = 4 * 1024 * 1024;

/// Reads messages from a file or stdin.
pub struct FileSource {
    name: String,
    reader: BufReader<Box<dyn AsyncRead + Send + Sync + Unpin>>,
    follow: bool,
    line: i64,
    eof: bool,
    redeliver: VecDeque<RawMessage>,
    /// The bytes of a line whose newline has not arrived yet (a writer
    /// appending a line in pieces): kept until it does.
    pending: Vec<u8>,
    /// Reading through an over-long line: its first MAX_LINE bytes, and
    /// the length and digest of all of it so far.
    long: Option<Box<LongLine>>,
    /// Messages the poll in progress has read, kept here across each of its
    /// waits: a poll cancelled there (a shutdown while stdin waits for more
    /// lines) leaves them for the next poll, or for [`Source::held`].
    taken: Vec<RawMessage>,
    /// A regular file (not stdin, a pipe or a device): a read of it
    /// never waits for a writer.
    regular: bool,
}

/// A line over `MAX_LINE` bytes read so far: its first `MAX_LINE` bytes (`head`),
/// and the length and SHA-256 of the whole line, without its line ending.
struct LongLine {
    head: Vec<u8>,
    len: u64,
    digest: sha2::Sha256,
}

impl std::fmt::Debug for FileSource {
    /// Shows the source's name and the last line number read, not its buffers.
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
        let mut regular = false;
        let (name, input): (String, Box<dyn AsyncRead + Send + Sync + Unpin>) = if path == "-" {
            ("stdin".into(), Box::new(tokio::io::stdin()))
        } else {
            let p = PathBuf::from(path);
            let mut waited = false;
            let f = loop {
                match tokio::fs::File::open(&p).await {
                    Ok(f) => break f,
                    // Following a file its writer has not created yet (a
                    // consumer started before the relay): wait for it, as
                    // `tail -F` does.
                    Err(e) if follow && e.kind() == std::io::ErrorKind::NotFound => {
                        if !waited {
                            tracing::warn!(path = %p.display(), "the file does not exist yet; waiting for it to appear");
                            waited = true;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    }
                    Err(e) => {
                        return Err(Error::Config(format!("cannot open {}: {e}", p.display())));
                    }
                }
            };
            regular = f.metadata().await.is_ok_and(|m| m.is_file());
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
            long: None,
            taken: Vec::new(),
            regular,
        })
    }

    /// The next whole line, without its line ending. A line whose newline
    /// has not arrived is kept (with `follow`: until it arrives; without:
    /// the end of the input ends it). A line over [`MAX_LINE`] bytes keeps
    /// its first MAX_LINE bytes, with the whole line's length and SHA-256
    /// (it becomes a poison message).
    async fn next_line(&mut self) -> Result<Option<(Vec<u8>, Option<Truncated>)>> {
        use sha2::Digest;
        loop {
            let limit = if self.long.is_some() {
                1 << 16
            } else {
                // `pending` never stays over MAX_LINE.
                (MAX_LINE + 1).saturating_sub(self.pending.len()) as u64
            };
            let n = (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut self.pending)
                .await
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", self.name)))?;
            let ended = self.pending.ends_with(b"\n");
            if self.long.is_none() && !ended && self.pending.len() > MAX_LINE {
                let head = self.pending[..MAX_LINE].to_vec();
                self.long = Some(Box::new(LongLine {
                    head,
                    len: 0,
                    digest: sha2::Sha256::new(),
                }));
            }
            if let Some(long) = &mut self.long {
                let body = self.pending.strip_suffix(b"\n").unwrap_or(&self.pending);
                let body = body.strip_suffix(b"\r").filter(|_| ended).unwrap_or(body);
                long.len += body.len() as u64;
                long.digest.update(body);
                self.pending.clear();
                let at_end = n == 0 && !self.follow;
                if !ended && !at_end {
                    if n == 0 {
                        return Ok(None);
                    }
                    continue;
                }
                // Checked just above: `long` is set.
                let Some(long) = self.long.take() else {
                    continue;
                };
                self.line += 1;
                let cut = Truncated {
                    len: long.len,
                    limit: MAX_LINE as u64,
                    sha256: format!("{:x}", long.digest.finalize()),
                };
                return Ok(Some((long.head, Some(cut))));
            }
            let mut line = if ended {
                std::mem::take(&mut self.pending)
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
            if line.ends_with(b"\n") {
                line.pop();
                if line.ends_with(b"\r") {
                    line.pop();
                }
            }
            self.line += 1;
            return Ok(Some((line, None)));
        }
    }
}

use tokio::io::AsyncReadExt as _;

impl Source for FileSource {
    /// `file:PATH`, or `stdin`.
    fn describe(&self) -> String {
        self.name.clone()
    }

    /// As `poll_within` with no byte budget.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled> {
        self.poll_within(max, usize::MAX, wait).await
    }

    /// Rewound messages first, then new lines (blank ones skipped; an over-long one
    /// becomes a cut poison message). With `follow`, waits up to `wait` for a first
    /// line at the end of the file; without, reads to the end and reports it.
    async fn poll_within(&mut self, max: usize, budget: usize, wait: Duration) -> Result<Polled> {
        // What a cancelled poll had read comes first.
        let mut out = std::mem::take(&mut self.taken);
        let mut bytes = out.iter().map(RawMessage::size).sum::<usize>();
        // Takes `m` if it fits the byte budget (the first always does);
        // otherwise it waits at the front of the queue for the next poll.
        let mut take =
            |m: RawMessage, out: &mut Vec<RawMessage>, queue: &mut VecDeque<RawMessage>| {
                let size = m.size();
                if !out.is_empty() && bytes.saturating_add(size) > budget {
                    queue.push_front(m);
                    return false;
                }
                bytes = bytes.saturating_add(size);
                out.push(m);
                true
            };
        while out.len() < max {
            match self.redeliver.pop_front() {
                Some(m) => {
                    if !take(m, &mut out, &mut self.redeliver) {
                        return Ok(Polled {
                            end: false,
                            messages: out,
                        });
                    }
                }
                None => break,
            }
        }
        let deadline = crate::model::time::instant_after(wait);
        while out.len() < max && !self.eof {
            // Kept in the source while the read waits: a cancelled poll
            // loses none of them (and neither does a failed read).
            self.taken = std::mem::take(&mut out);
            // With lines in hand, a read that waits (a quiet pipe: `tail -f
            // log | omnibox inbox consume --from -`) ends the poll at the
            // deadline, so they are stored now, not when the writer goes
            // on. Lines already buffered are read either way; an unfinished
            // line stays in `pending`.
            // A regular file's read never waits for a writer: read on (a
            // read-ahead polls with a deadline already past, and must not
            // stop at every refill of the buffer).
            let next = if self.taken.is_empty() || self.regular {
                self.next_line().await?
            } else {
                match tokio::time::timeout_at(deadline.into(), self.next_line()).await {
                    Ok(next) => next?,
                    Err(_) => {
                        out = std::mem::take(&mut self.taken);
                        break;
                    }
                }
            };
            out = std::mem::take(&mut self.taken);
            match next {
                Some((line, None)) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Some((line, cut)) => {
                    let mut m = from_json_bytes(&line, self.line, "file");
                    if cut.is_some() {
                        // Not parsed: the line is incomplete.
                        m.payload = Some(line);
                        m.headers.clear();
                        m.key = None;
                        m.defect = None;
                        m.cut = cut;
                    }
                    m.origin = Some(self.name.clone());
                    if !take(m, &mut out, &mut self.redeliver) {
                        break;
                    }
                }
                None if self.follow => {
                    if !out.is_empty() || Instant::now() >= deadline {
                        break;
                    }
                    self.taken = std::mem::take(&mut out);
                    tokio::time::sleep(Duration::from_millis(100).min(wait)).await;
                    out = std::mem::take(&mut self.taken);
                }
                None => self.eof = true,
            }
        }
        Ok(Polled {
            end: self.eof && self.redeliver.is_empty(),
            messages: out,
        })
    }

    /// The lines a cancelled poll had read.
    fn held(&mut self) -> Vec<RawMessage> {
        std::mem::take(&mut self.taken)
    }

    /// A regular file's: its commits do nothing, and a read of it never
    /// waits, so its next lines can be read while the last ones are stored.
    /// Not stdin or a pipe: a read there waits for the writer, and only a
    /// poll of the run loop can be cut short by a shutdown.
    fn read_ahead(&self) -> bool {
        self.regular
    }

    /// A regular file is read again from its start by the next run; stdin
    /// or a pipe is not.
    fn replays(&self) -> bool {
        self.regular
    }

    /// Nothing to do: a file keeps no offsets (reading it again is safe).
    async fn commit(&mut self, _through: &[RawMessage]) -> Result<()> {
        Ok(())
    }

    /// Queues `from` to be delivered again, in order, before any new line.
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

    /// A file being written, and a source following it.
    async fn followed() -> (tempfile::TempDir, std::fs::File, FileSource) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let f = std::fs::File::create(&path).unwrap();
        let src = FileSource::open(path.to_str().unwrap(), true)
            .await
            .unwrap();
        (dir, f, src)
    }

    /// Appends `bytes` to `f` and flushes.
    fn append(f: &mut std::fs::File, bytes: &[u8]) {
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
    }

    async fn poll_all(src: &mut FileSource) -> Vec<String> {
        let p = src.poll(100, Duration::from_millis(50)).await.unwrap();
        p.messages
            .iter()
            .map(|m| String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default()).into_owned())
            .collect()
    }

    /// A regular file fills its batch whatever the poll's deadline (the
    /// read-ahead polls with none left): a read there never waits for a
    /// writer, so the batch does not stop at a refill of the buffer.
    #[tokio::test]
    async fn a_regular_file_fills_its_batch_whatever_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(500));
        std::fs::write(&path, line.repeat(2_000)).unwrap();
        let mut src = FileSource::open(path.to_str().unwrap(), false)
            .await
            .unwrap();
        for _ in 0..2 {
            let p = src.poll(1_000, Duration::ZERO).await.unwrap();
            assert_eq!(p.messages.len(), 1_000);
        }
        assert!(src.poll(1_000, Duration::ZERO).await.unwrap().end);
    }

    /// Lines from a pipe whose writer goes quiet (without closing it) are
    /// handed out at the poll's deadline, not held until more arrive.
    #[tokio::test]
    async fn a_quiet_pipe_hands_out_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let p = path.clone();
        // Opening a FIFO waits for the other end: the writer opens it too.
        let writer = std::thread::spawn(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            w.write_all(b"{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
            w.flush().unwrap();
            std::thread::sleep(Duration::from_secs(3));
            w.write_all(b"3}\n").unwrap();
        });
        let mut src = FileSource::open(path.to_str().unwrap(), false)
            .await
            .unwrap();
        let started = Instant::now();
        let got = tokio::time::timeout(
            Duration::from_secs(2),
            src.poll(100, Duration::from_millis(200)),
        )
        .await
        .expect("the poll does not wait for the writer")
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(got.messages.len(), 2, "{:?}", got.messages);
        assert!(!got.end);
        // The unfinished third line is read whole once its end arrives.
        let next = src.poll(100, Duration::from_millis(200)).await.unwrap();
        assert_eq!(next.messages.len(), 1);
        assert_eq!(next.messages[0].payload.as_deref(), Some(&b"{\"a\":3}"[..]));
        writer.join().unwrap();
        let last = src.poll(100, Duration::from_millis(200)).await.unwrap();
        assert!(last.messages.is_empty() && last.end);
    }

    /// A line appended in pieces is read whole once its newline arrives:
    /// never a poison row holding its second half (two pieces), never lost
    /// (three).
    #[tokio::test]
    async fn follow_keeps_a_line_written_in_pieces() {
        let (_dir, mut f, mut src) = followed().await;
        for piece in [r#"{"topic":"t","#, r#""value":{"a""#, r#":1}}"#] {
            append(&mut f, piece.as_bytes());
            assert!(
                poll_all(&mut src).await.is_empty(),
                "nothing before the newline"
            );
        }
        append(&mut f, b"\n{\"topic\":\"t\",\"value\":{\"b\":2}}\n");
        let got = poll_all(&mut src).await;
        assert_eq!(
            got,
            vec![r#"{"a":1}"#.to_string(), r#"{"b":2}"#.to_string()]
        );
    }

    /// A poll ends before the line that would pass its byte budget (that
    /// line comes first in the next poll), holds one line at least, and a
    /// rewind puts messages back before the held one.
    #[tokio::test]
    async fn polls_keep_to_a_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let line = |n: usize, size: usize| {
            format!(
                "{{\"topic\":\"t\",\"value\":{{\"n\":{n},\"pad\":\"{}\"}}}}\n",
                "x".repeat(size)
            )
        };
        let sizes = [300, 300, 900, 100, 100, 100, 2000, 50];
        let text: String = sizes.iter().enumerate().map(|(n, s)| line(n, *s)).collect();
        std::fs::write(&path, text).unwrap();
        let mut src = FileSource::open(path.to_str().unwrap(), false)
            .await
            .unwrap();
        let offsets = |p: &Polled| p.messages.iter().map(|m| m.offset).collect::<Vec<_>>();
        let wait = Duration::from_millis(50);
        let p = src.poll_within(100, 1000, wait).await.unwrap();
        assert_eq!(offsets(&p), vec![1, 2], "the third would pass 1000 bytes");
        assert!(!p.end);
        let p = src.poll_within(100, 1000, wait).await.unwrap();
        assert_eq!(offsets(&p), vec![3]);
        // Given back: it comes again, before what was read after it.
        src.rewind(&p.messages).await.unwrap();
        let p = src.poll_within(100, 1400, wait).await.unwrap();
        assert_eq!(offsets(&p), vec![3, 4, 5, 6]);
        let p = src.poll_within(100, 1000, wait).await.unwrap();
        assert_eq!(offsets(&p), vec![7], "alone over the budget");
        let p = src.poll_within(100, 1000, wait).await.unwrap();
        assert_eq!(offsets(&p), vec![8]);
        assert!(p.end);
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
        let (_dir, mut f, mut src) = followed().await;
        append(&mut f, &vec![b'x'; MAX_LINE + 10]);
        assert!(
            poll_all(&mut src).await.is_empty(),
            "held until the line ends"
        );
        append(&mut f, b"yyy\n{\"topic\":\"t\",\"value\":{\"b\":2}}\n");
        let p = src.poll(100, Duration::from_millis(50)).await.unwrap();
        assert_eq!(p.messages.len(), 2);
        let cut = p.messages[0].cut.clone().expect("the long line is cut");
        let mut whole = vec![b'x'; MAX_LINE + 10];
        whole.extend_from_slice(b"yyy");
        assert_eq!(cut.len, whole.len() as u64);
        assert_eq!(cut.sha256, crate::inbox::normalize::sha256_hex(&whole));
        assert_eq!(p.messages[0].payload.as_ref().map(Vec::len), Some(MAX_LINE));
        assert_eq!(p.messages[1].payload.as_deref(), Some(&br#"{"b":2}"#[..]));
        assert_eq!(p.messages[1].offset, 2);
    }

    /// A line that is not UTF-8 keeps its exact bytes (it is not
    /// "repaired" with U+FFFD and stored as a normal row).
    #[tokio::test]
    async fn a_line_that_is_not_utf8_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let line: &[u8] = b"{\"topic\":\"t\",\"value\":{\"a\":\"\xff\xfe\"}}";
        std::fs::write(&path, [line, b"\n"].concat()).unwrap();
        let mut src = FileSource::open(path.to_str().unwrap(), false)
            .await
            .unwrap();
        let p = src.poll(100, Duration::from_millis(50)).await.unwrap();
        assert_eq!(p.messages[0].payload.as_deref(), Some(line));
    }
}
