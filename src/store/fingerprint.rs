//! Error fingerprints: failed rows grouped by cause (`omnibox failures`,
//! `omnibox replay --fingerprint`). The error text is normalised (ids, numbers,
//! quoted values and hex masked, spaces collapsed) so that one cause gives
//! one fingerprint whatever row it hit.

/// The normalised form of an error message.
pub fn normalize_error(error: &str) -> String {
    let mut out = String::with_capacity(error.len().min(300));
    let chars: Vec<char> = error.chars().collect();
    let mut i = 0;
    while i < chars.len() && out.chars().count() < 200 {
        let c = chars[i];
        if (c == '"' || c == '\'')
            && let Some(end) = chars[i + 1..].iter().position(|&x| x == c)
        {
            out.push_str("<str>");
            i += end + 2;
            continue;
        }
        if c.is_ascii_hexdigit() {
            let mut j = i;
            while j < chars.len() && (chars[j].is_ascii_hexdigit() || chars[j] == '-') {
                j += 1;
            }
            let token: String = chars[i..j].iter().collect();
            let word_start = i == 0 || !chars[i - 1].is_alphanumeric();
            let word_end = j == chars.len() || !chars[j].is_alphanumeric();
            if word_start && word_end && token.chars().any(|c| c.is_ascii_digit()) {
                out.push_str(if token.len() >= 8 { "<id>" } else { "<n>" });
                i = j;
                continue;
            }
        }
        if c.is_whitespace() {
            if !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
        i += 1;
    }
    out.trim().to_string()
}

/// A short, stable fingerprint of an event type and its (normalised) error.
pub fn fingerprint(event_type: &str, error: &str) -> String {
    // FNV-1a, 64 bits: stable across versions and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in event_type
        .bytes()
        .chain([0u8])
        .chain(normalize_error(error).bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_cause_same_fingerprint() {
        let a = "broker rejected the record: Message size too large (1048576 > 100000) for 0190f1d2-7a3b-7cde-8f00-123456789abc";
        let b = "broker rejected the record: Message size too large (2000000 > 100000) for 01a219ab-a432-7017-99fc-e3fb65b54e74";
        assert_eq!(
            normalize_error(a),
            "broker rejected the record: Message size too large (<n> > <n>) for <id>"
        );
        assert_eq!(fingerprint("t", a), fingerprint("t", b));
        assert_ne!(
            fingerprint("t", a),
            fingerprint("u", a),
            "the event type is part of it"
        );
        assert_ne!(
            fingerprint("t", a),
            fingerprint("t", "handler exited with 1: boom")
        );
        assert_eq!(
            normalize_error("user 'alice'  not   found"),
            "user <str> not found"
        );
        assert_eq!(fingerprint("t", "x").len(), 12);
    }
}
