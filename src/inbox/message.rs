//! A message as a source delivers it ([`RawMessage`]), before it is
//! normalised into an inbox event.

use crate::model::{limits, validate};

/// A message as a source delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct RawMessage {
    /// Topic (for a file source: the line's `topic`).
    pub topic: String,
    /// Partition (0 for a file).
    pub partition: i32,
    /// Offset (for a file: the line number).
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The value.
    pub payload: Option<Vec<u8>>,
    /// The position identifies the message across runs (Kafka). False for
    /// files and stdin, whose line numbers start over with every input: a
    /// message of theirs without a `message_id` header is identified by its
    /// content instead (see [`content_id`](Self::content_id)).
    pub position_is_identity: bool,
    /// Set when the source could not keep the whole value (a file line
    /// over its length limit): `payload` holds its start only.
    pub cut: Option<Truncated>,
    /// Where a file source read it (`stdin`, `file:PATH`), for messages
    /// (`stdin line 3`); `None` for a broker, whose `topic:partition:offset`
    /// says where.
    pub origin: Option<String>,
    /// Set when the source could read the bytes but not a message from them
    /// (a file line in the sink's format whose key or headers are not
    /// strings): the message is poison with this reason, `payload` holding
    /// the bytes as read.
    pub defect: Option<String>,
}

/// What is known of a value the source cut short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncated {
    /// The whole value's length in bytes.
    pub len: u64,
    /// The longest value the source keeps, in bytes.
    pub limit: u64,
    /// Hex SHA-256 of the whole value.
    pub sha256: String,
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// `bytes` as lower-case hexadecimal.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl RawMessage {
    /// The bytes it holds: value, key and headers (what a batch's byte
    /// budget counts).
    pub fn size(&self) -> usize {
        self.payload.as_ref().map_or(0, Vec::len)
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Where the message was read: `topic:partition:offset`, or for a file
    /// source `stdin line N` / `file:PATH line N`.
    pub fn coordinates(&self) -> String {
        match &self.origin {
            Some(origin) => format!("{origin} line {}", self.offset),
            None => self.position(),
        }
    }

    /// `topic:partition:offset`.
    fn position(&self) -> String {
        format!("{}:{}:{}", self.topic, self.partition, self.offset)
    }

    /// `sha256:` and the hex SHA-256 of the message's topic, key, id header
    /// and value (each length-prefixed): the id of a message that has no
    /// usable id of its own. Equal content, equal id; one changed byte, a
    /// different id.
    pub fn content_id(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut part = |bytes: Option<&[u8]>| match bytes {
            Some(b) => {
                h.update([1u8]);
                h.update((b.len() as u64).to_be_bytes());
                h.update(b);
            }
            None => h.update([0u8]),
        };
        part(Some(self.topic.as_bytes()));
        part(self.key.as_deref());
        part(
            self.header_bytes("message_id")
                .or_else(|| self.header_bytes("event_id")),
        );
        part(self.payload.as_deref());
        format!("sha256:{}", hex(&h.finalize()))
    }

    /// The producing service (`source` or `source_service` header), else
    /// the topic.
    pub(super) fn source(&self) -> String {
        self.header("source")
            .or_else(|| self.header("source_service"))
            .unwrap_or_else(|| self.topic.clone())
    }

    /// The id when the position identifies the message and fits the id's
    /// rules, else the content id.
    pub(super) fn fallback_id(&self) -> String {
        let c = self.position();
        if self.position_is_identity
            && validate::exact("message_id", &c, limits::MESSAGE_ID_MAX_LENGTH).is_ok()
        {
            c
        } else {
            self.content_id()
        }
    }

    pub(super) fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    pub(super) fn header(&self, name: &str) -> Option<String> {
        self.header_bytes(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }
}
