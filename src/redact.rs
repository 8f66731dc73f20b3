//! Masking secrets in anything printed: URLs' user info and password-like
//! parameters. Deliberately not a URL parser: a password may hold `/`, `?`,
//! `#` or `@`, which make parsers cut the authority short and print the
//! secret as a host or a path. The rule is textual: everything between
//! `://` and the **last** `@` of a URL is user info (the user name is kept,
//! the rest masked), and the value of a `password=` or `sslpassword=` (or
//! token-, secret- or key-like) parameter is masked.

/// A URL for messages: `postgres://app:***@db/app?sslpassword=***`.
pub fn url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return params(&malformed_url(url));
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let masked = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            if userinfo.ends_with(":PASSWORD") {
                // The placeholder of a hint (`postgres://USER:PASSWORD@HOST/DB`).
                url.to_string()
            } else if userinfo.contains(':') {
                let user = userinfo.split([':', '/', '?', '#']).next().unwrap_or("");
                format!("{head}{user}:***{}", &rest[at..])
            } else {
                url.to_string()
            }
        }
        None => url.to_string(),
    };
    params(&masked)
}

/// A URL without `://` (`postgres:/u:pw@h/db`, `postgres:u:pw@h`,
/// `u:pw@h/db`): whatever stands between the user's name and the last `@`
/// is masked. A known scheme and the slashes after it are not the user.
fn malformed_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_string();
    };
    let lower = url.to_ascii_lowercase();
    let mut start = [
        "postgresql:",
        "postgres:",
        "sqlite:",
        "kafka:",
        "https:",
        "http:",
    ]
    .iter()
    .find(|s| lower.starts_with(*s))
    .map_or(0, |s| s.len());
    while url[start..].starts_with('/') {
        start += 1;
    }
    if start >= at {
        return url.to_string();
    }
    match url[start..at].find(':') {
        Some(colon) => format!("{}:***{}", &url[..start + colon], &url[at..]),
        None => url.to_string(),
    }
}

/// [`url()`], with every query value masked too (a webhook's token may travel
/// in any parameter) and the fragment dropped:
/// `https://u:***@h/p?token=***&flag`.
pub fn url_and_query(u: &str) -> String {
    let (u, _) = u.split_once('#').unwrap_or((u, ""));
    let (base, query) = match u.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (u, None),
    };
    let mut out = url(base);
    if let Some(q) = query {
        out.push('?');
        let masked: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) => format!("{k}=***"),
                None => kv.to_string(),
            })
            .collect();
        out.push_str(&masked.join("&"));
    }
    out
}

/// Keys whose values are masked wherever `key=value` appears.
fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "apikey",
        "api_key",
        "access_key",
        "signature",
    ]
    .iter()
    .any(|s| k.ends_with(s))
}

/// Where the word that ends `s` starts: a word is ASCII letters and digits
/// and the characters of `also` (a parameter's key, a URL's scheme).
fn word_start(s: &str, also: &[char]) -> usize {
    s.char_indices()
        .rfind(|&(_, c)| !(c.is_ascii_alphanumeric() || also.contains(&c)))
        .map_or(0, |(i, c)| i + c.len_utf8())
}

/// Masks `key=value` pairs with a secret-looking key (in a query string or a
/// `key=value ...` connection string).
fn params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let key_start = word_start(&rest[..eq], &['_', '-', '.']);
        let key = &rest[key_start..eq];
        out.push_str(&rest[..=eq]);
        rest = &rest[eq + 1..];
        if secret_key(key) {
            let end = rest
                .find(|c: char| c == '&' || c == ';' || c.is_whitespace() || c == '"' || c == '\'')
                .unwrap_or(rest.len());
            if end > 0 {
                out.push_str("***");
            }
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// A log line naming a secret parameter and its value in two fields
/// (`key=sslpassword value=...`, or `"key":"sslpassword","value":"..."` in
/// JSON logs, as sqlx warns about connect parameters it does not know):
/// the value is masked.
fn key_value_fields(text: &str) -> String {
    let mut out = text.to_string();
    for (key_prefix, value_prefix, end) in [
        ("key=", "value=", &[' ', '\t', '\n'][..]),
        ("\"key\":\"", "\"value\":\"", &['"'][..]),
    ] {
        let Some(k) = out.find(key_prefix) else {
            continue;
        };
        let key_start = k + key_prefix.len();
        let key_end = out[key_start..]
            .find(|c: char| end.contains(&c) || c == '"')
            .map_or(out.len(), |i| key_start + i);
        if !secret_key(&out[key_start..key_end]) {
            continue;
        }
        let Some(v) = out[key_end..].find(value_prefix) else {
            continue;
        };
        let value_start = key_end + v + value_prefix.len();
        let value_end = out[value_start..]
            .find(|c: char| end.contains(&c))
            .map_or(out.len(), |i| value_start + i);
        out.replace_range(value_start..value_end, "***");
    }
    out
}

/// Masks every URL's user info and every secret parameter in a message or
/// log line. A URL runs from its scheme to the next whitespace or quote.
pub fn text(text: &str) -> String {
    if !text.contains("://") && !text.contains('=') && !text.contains("\"key\"") {
        return text.to_string();
    }
    let owned = key_value_fields(text);
    let text = owned.as_str();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = word_start(&rest[..i], &['+', '-', '.']);
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .map_or(rest.len(), |j| i + j);
        out.push_str(&params(&rest[..start]));
        out.push_str(&url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(&params(rest));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile URLs: no part of the password survives.
    pub(crate) const HOSTILE: &[(&str, &str)] = &[
        ("postgres://u:se/cret@127.0.0.1:5432/db", "se/cret"),
        ("postgres://u:se?cret@127.0.0.1:5432/db", "se?cret"),
        ("postgres://u:se#cret@127.0.0.1:5432/db", "se#cret"),
        ("postgres://u:p@ss@w0rd@h/db", "ss@w0rd"),
        ("postgres://u:%2Fs3cr3t%40@h/db", "s3cr3t"),
        ("postgresql://u:a:b:c@h/db", "a:b:c"),
        (
            "postgres://h/db?password=hunter2&sslmode=require",
            "hunter2",
        ),
        (
            "postgres://h/db?sslmode=require&sslpassword=hunter3",
            "hunter3",
        ),
        ("postgres://u:pw@h/db?sslpassword=k3y", "k3y"),
        ("kafka://user:brokerpass@k1:9092,k2:9092", "brokerpass"),
        (
            "https://hook:webhookpass@example.com/x?token=tok3n",
            "webhookpass",
        ),
    ];

    /// URLs without `://`: the part after the user's name goes.
    #[test]
    fn malformed_urls_lose_their_secrets() {
        for (u, secret, shown) in [
            (
                "postgres:/weird:S3cr@127.0.0.1:5432/db",
                "S3cr",
                "postgres:/weird:***@127.0.0.1:5432/db",
            ),
            (
                "postgres:weird:pw12@host/db",
                "pw12",
                "postgres:weird:***@host/db",
            ),
            ("weird:S3cr%2Fx@host/db", "S3cr", "weird:***@host/db"),
            ("POSTGRESQL:u:a:b:c@h/db", "a:b:c", "POSTGRESQL:u:***@h/db"),
        ] {
            let r = url(u);
            assert!(!r.contains(secret), "{u} -> {r}");
            assert_eq!(r, shown);
        }
        assert_eq!(url("sqlite:omnibox.db"), "sqlite:omnibox.db");
        assert_eq!(url("user@host"), "user@host");
    }

    #[test]
    fn urls_lose_their_secrets() {
        for (u, secret) in HOSTILE {
            let r = url(u);
            assert!(!r.contains(secret), "{u} -> {r}");
            let t = text(&format!("cannot connect to {u}: refused"));
            assert!(!t.contains(secret), "{u} -> {t}");
            let t = text(&format!("{{\"url\":\"{u}\"}}"));
            assert!(!t.contains(secret), "{u} -> {t}");
        }
        assert_eq!(
            url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            url("postgres://h/db?password=x&a=1"),
            "postgres://h/db?password=***&a=1"
        );
        assert_eq!(url("sqlite://omnibox.db"), "sqlite://omnibox.db");
        assert_eq!(url("postgres://u:se/cret@h/db"), "postgres://u:***@h/db");
        assert_eq!(url("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        // A hint's placeholder is not a secret.
        assert_eq!(
            text("use postgres://USER:PASSWORD@HOST/DB"),
            "use postgres://USER:PASSWORD@HOST/DB"
        );
        assert_eq!(
            text("host=h user=u password=s3 dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(text("no secrets here"), "no secrets here");
        assert_eq!(
            text("WARN ignoring unrecognized connect parameter key=sslpassword value=s3 x=1"),
            "WARN ignoring unrecognized connect parameter key=sslpassword value=*** x=1"
        );
        assert_eq!(
            text(r#"{"fields":{"key":"sslpassword","value":"s3"}}"#),
            r#"{"fields":{"key":"sslpassword","value":"***"}}"#
        );
    }

    /// A word that follows a character of several bytes is cut at that
    /// character's end, not inside it.
    #[test]
    fn words_after_wide_characters() {
        assert_eq!(text("größe=5 é=1"), "größe=5 é=1");
        assert_eq!(text("ü password=s3"), "ü password=***");
        assert_eq!(text("ßpostgres://u:s3@h/db"), "ßpostgres://u:***@h/db");
    }
}
