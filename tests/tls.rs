//! PostgreSQL over TLS: a private server (scripts/postgres.sh --tls) with a
//! certificate authority made here, requiring TLS on every TCP connection.
//! `sslmode=verify-full` with the CA works, a wrong CA and a plain
//! connection are refused with exit 2, and a client certificate logs in.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The private server's port: below Linux's ephemeral range (32768 and
/// up), where a concurrent test's client socket once held 54342.
const PORT: &str = "29342";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh")
}

struct Server;

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", "--port", PORT])
            .status();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and certificates it signs: `name.crt` / `name.key`.
fn ca(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ],
    );
}

fn signed(dir: &Path, ca: &str, name: &str, cn: &str, san: Option<&str>) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        match san {
            Some(s) => format!("subjectAltName={s}\n"),
            None => "basicConstraints=CA:FALSE\n".to_string(),
        },
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

fn omnibox(dir: &Path, url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_omnibox"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("OMNIBOX_DATABASE_URL", url)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn postgres_over_tls_verify_full_and_client_certificates() {
    if common::pg_url().is_none() {
        return; // not under CI and no PostgreSQL wanted (said by pg_url)
    }
    let certs = tempfile::tempdir().unwrap();
    let c = certs.path();
    ca(c, "ca");
    ca(c, "other-ca");
    signed(c, "ca", "server", "127.0.0.1", Some("IP:127.0.0.1"));
    signed(c, "ca", "client", "omnibox_cert", None);
    let out = Command::new(script())
        .args(["start", "--port", PORT, "--tls", c.to_str().unwrap()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "postgres.sh start --tls");
    let _server = Server;
    let base = format!("postgres://omnibox:omnibox@127.0.0.1:{PORT}/omnibox");
    let ca_file = c.join("ca.crt");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Verified against the CA: works.
    let verified = format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    );
    let (code, _, err) = omnibox(d, &verified, &["migrate", "-q"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = omnibox(d, &verified, &["status", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"tables\""), "{out}");

    // Without TLS: the server refuses; exit 2, nothing changed.
    let (code, _, err) = omnibox(d, &format!("{base}?sslmode=disable"), &["status"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot connect"), "{err}");
    assert!(
        !err.contains(":omnibox@"),
        "the password is not printed: {err}"
    );

    // A certificate the CA given does not vouch for: refused.
    let wrong = format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        c.join("other-ca.crt").display()
    );
    let (code, _, err) = omnibox(d, &wrong, &["status"]);
    assert_eq!(code, 2, "{err}");

    // A client certificate instead of a password.
    let cert = format!(
        "postgres://omnibox_cert@127.0.0.1:{PORT}/omnibox?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        ca_file.display(),
        c.join("client.crt").display(),
        c.join("client.key").display()
    );
    let (code, out, err) = omnibox(d, &cert, &["status", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"tables\""), "{out}");
}
