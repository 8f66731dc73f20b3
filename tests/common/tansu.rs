//! The tansu broker (a real Kafka-protocol broker process) for end-to-end
//! tests: the shared one that scripts/test.sh starts (OMNIBOX_TEST_BROKERS),
//! or a private one a test can stop and restart.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use super::under_ci;

/// The shared broker's address, or None (skip) outside CI.
pub fn shared_brokers() -> Option<String> {
    match std::env::var("OMNIBOX_TEST_BROKERS") {
        Ok(b) if !b.is_empty() => Some(b),
        _ if under_ci() => panic!(
            "OMNIBOX_TEST_BROKERS is not set, and under CI the broker tests must run: use scripts/test.sh"
        ),
        _ => {
            eprintln!("SKIPPED: OMNIBOX_TEST_BROKERS is not set (scripts/test.sh starts tansu)");
            None
        }
    }
}

fn tansu_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("OMNIBOX_TEST_TANSU")
        && !p.is_empty()
    {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let candidate = home.join("bin/tansu");
    if candidate.exists() {
        return Some(candidate);
    }
    if under_ci() {
        panic!(
            "no tansu binary (OMNIBOX_TEST_TANSU unset and ~/.cargo/bin/tansu missing): use scripts/test.sh"
        );
    }
    eprintln!("SKIPPED: tansu is not installed (scripts/kafka.sh install)");
    None
}

/// A private tansu process.
pub struct Tansu {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl Tansu {
    pub async fn start() -> Option<Tansu> {
        Self::start_with(&[]).await
    }

    /// A private broker started with extra arguments (e.g. `--authentication`).
    pub async fn start_with(extra: &[&str]) -> Option<Tansu> {
        let bin = tansu_binary()?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut t = Tansu {
            port,
            bin,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        t.spawn().await;
        Some(t)
    }

    /// The broker's SQLite storage.
    pub fn database(&self) -> PathBuf {
        self.dir.path().join("tansu.db")
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .args(&self.extra)
            .current_dir(self.dir.path())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("SCHEMA_REGISTRY")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // tansu's header table has no index; fetching messages with headers
        // is quadratic without it.
        let url = format!("sqlite://{}", self.dir.path().join("tansu.db").display());
        for _ in 0..200 {
            if let Ok(pool) = sqlx::SqlitePool::connect(&url).await {
                let ok = sqlx::query("CREATE INDEX IF NOT EXISTS header_topition_offset ON header(topition, offset_id)")
                    .execute(&pool)
                    .await
                    .is_ok();
                pool.close().await;
                if ok {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("could not index tansu's header table");
    }

    /// Kills the broker (the port stops answering).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the broker as an operator would (SIGTERM, then waits).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a stopped broker again on the same port, with the same data.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        self.spawn().await;
    }

    /// Starts it again on the same port, with the same data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates a topic (tansu implements CreateTopics).
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    create_topic_with(brokers, topic, partitions, &[]).await
}

/// Creates a topic with extra client properties (SASL, say).
pub async fn create_topic_with(
    brokers: &str,
    topic: &str,
    partitions: i32,
    properties: &[(&str, &str)],
) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        config.set(*k, *v);
    }
    let admin: AdminClient<DefaultClientContext> = config.create().expect("admin client");
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .expect("create_topics");
    for r in results {
        if let Err((name, e)) = r {
            panic!("cannot create topic {name}: {e}");
        }
    }
}
