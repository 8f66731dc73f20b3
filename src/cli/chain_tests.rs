use super::chain_text;

#[derive(Debug)]
struct Leaf;
impl std::fmt::Display for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("expected to read 5 bytes, got 0 bytes at EOF")
    }
}
impl std::error::Error for Leaf {}

#[derive(Debug)]
struct Io(Leaf);
impl std::fmt::Display for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error communicating with database: {}", self.0)
    }
}
impl std::error::Error for Io {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Each cause once; distinct causes are all kept, in order.
#[test]
fn causes_are_said_once() {
    let e = anyhow::Error::new(Io(Leaf)).context("database transaction failed");
    assert_eq!(
        chain_text(&e),
        "database transaction failed: error communicating with database: expected to read 5 bytes, got 0 bytes at EOF"
    );
    assert_eq!(
        format!("{e:#}").matches("expected to read").count(),
        2,
        "the repetition this removes"
    );
    let e = anyhow::anyhow!("inner").context("middle").context("outer");
    assert_eq!(chain_text(&e), "outer: middle: inner");
}
