//! Kafka TLS and SASL shortcuts: flags for the librdkafka properties people
//! get wrong, with secrets read from a file or the environment (never a
//! command-line value, which `ps` shows to every user).

use std::path::PathBuf;

use clap::Args;

use super::{UsageError, env};

/// SASL mechanisms librdkafka speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    #[value(name = "PLAIN")]
    Plain,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// `--kafka-tls-*` and `--kafka-sasl-*`.
#[derive(Debug, Args, Clone, Default)]
pub struct KafkaSecurityArgs {
    /// Kafka over TLS, verifying the brokers with this CA certificate (PEM)
    #[arg(long, value_name = "PATH")]
    pub kafka_tls_ca: Option<PathBuf>,
    /// A client certificate for Kafka (PEM; with --kafka-tls-key)
    #[arg(long, value_name = "PATH", requires = "kafka_tls_key")]
    pub kafka_tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM)
    #[arg(long, value_name = "PATH", requires = "kafka_tls_cert")]
    pub kafka_tls_key: Option<PathBuf>,
    /// SASL authentication with Kafka (password from --kafka-sasl-password-file or OMNIBOX_KAFKA_SASL_PASSWORD)
    #[arg(
        long,
        value_enum,
        value_name = "MECHANISM",
        requires = "kafka_sasl_username"
    )]
    pub kafka_sasl_mechanism: Option<SaslMechanism>,
    /// The SASL user name
    #[arg(long, value_name = "NAME", requires = "kafka_sasl_mechanism")]
    pub kafka_sasl_username: Option<String>,
    /// A file holding the SASL password (its first line)
    #[arg(long, value_name = "PATH", requires = "kafka_sasl_mechanism")]
    pub kafka_sasl_password_file: Option<PathBuf>,
}

impl KafkaSecurityArgs {
    /// The librdkafka properties these flags stand for (empty without any).
    /// Files are checked here, so a typo is exit 2 before anything runs.
    pub fn properties(&self) -> Result<Vec<(String, String)>, UsageError> {
        let mut out = Vec::new();
        let readable = |flag: &str, p: &PathBuf| -> Result<String, UsageError> {
            std::fs::metadata(p).map_err(|e| UsageError(format!("{flag} {}: {e}", p.display())))?;
            Ok(p.display().to_string())
        };
        let tls = self.kafka_tls_ca.is_some() || self.kafka_tls_cert.is_some();
        if let Some(ca) = &self.kafka_tls_ca {
            out.push(("ssl.ca.location".into(), readable("--kafka-tls-ca", ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.kafka_tls_cert, &self.kafka_tls_key) {
            out.push((
                "ssl.certificate.location".into(),
                readable("--kafka-tls-cert", cert)?,
            ));
            out.push(("ssl.key.location".into(), readable("--kafka-tls-key", key)?));
        }
        let protocol = match (tls, self.kafka_sasl_mechanism) {
            (false, None) => None,
            (true, None) => Some("SSL"),
            (false, Some(_)) => Some("SASL_PLAINTEXT"),
            (true, Some(_)) => Some("SASL_SSL"),
        };
        if let Some(mechanism) = self.kafka_sasl_mechanism {
            out.push(("sasl.mechanism".into(), mechanism.as_str().into()));
            if let Some(user) = &self.kafka_sasl_username {
                out.push(("sasl.username".into(), user.clone()));
            }
            let password = match &self.kafka_sasl_password_file {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|e| {
                        UsageError(format!("--kafka-sasl-password-file {}: {e}", p.display()))
                    })?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
                None => std::env::var(env::KAFKA_SASL_PASSWORD).map_err(|_| {
                    UsageError(format!(
                        "--kafka-sasl-mechanism needs a password: --kafka-sasl-password-file PATH or {}",
                        env::KAFKA_SASL_PASSWORD
                    ))
                })?,
            };
            if password.is_empty() {
                return Err(UsageError("the Kafka SASL password is empty".into()));
            }
            out.push(("sasl.password".into(), password));
        }
        if let Some(p) = protocol {
            out.push(("security.protocol".into(), p.into()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_librdkafka_properties() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let args = KafkaSecurityArgs {
            kafka_tls_ca: Some(ca.clone()),
            kafka_sasl_mechanism: Some(SaslMechanism::ScramSha512),
            kafka_sasl_username: Some("relay".into()),
            kafka_sasl_password_file: Some(secret),
            ..Default::default()
        };
        let p = args.properties().unwrap();
        let get = |k: &str| p.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        assert_eq!(get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(get("sasl.username"), Some("relay"));
        assert_eq!(get("sasl.password"), Some("s3cret"));
        assert_eq!(get("ssl.ca.location"), Some(ca.to_str().unwrap()));
        let tls_only = KafkaSecurityArgs {
            kafka_tls_ca: Some(ca),
            ..Default::default()
        };
        assert_eq!(
            tls_only.properties().unwrap().last().unwrap().1,
            "SSL".to_string()
        );
        let missing = KafkaSecurityArgs {
            kafka_tls_ca: Some(dir.path().join("nope.pem")),
            ..Default::default()
        };
        assert!(missing.properties().unwrap_err().0.contains("nope.pem"));
        assert!(
            KafkaSecurityArgs::default()
                .properties()
                .unwrap()
                .is_empty()
        );
    }
}
