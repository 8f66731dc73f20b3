//! Test databases: a fresh SQLite file per test, and a fresh schema per test
//! in the PostgreSQL named by OMNIBOX_TEST_DATABASE_URL. Without that
//! variable the PostgreSQL tests skip with a message, except under CI=true,
//! where they fail.

#![allow(dead_code)]

pub mod kafka;
pub mod run;
pub mod tansu;

use omnibox::store::postgres::PgOptions;
use omnibox::store::{AnyStore, PgStore, SqliteStore};

pub struct TestDb {
    pub store: AnyStore,
    pub url: String,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub fn is_postgres(&self) -> bool {
        matches!(self.store, AnyStore::Postgres(_))
    }

    /// The PostgreSQL schema of this test (for OMNIBOX_DATABASE_SCHEMA of a CLI run).
    pub fn schema(&self) -> &str {
        self.schema.as_deref().expect("a PostgreSQL test database")
    }
}

pub fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "false" && v != "0")
        .unwrap_or(false)
}

pub fn pg_url() -> Option<String> {
    match std::env::var("OMNIBOX_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if under_ci() => panic!(
            "OMNIBOX_TEST_DATABASE_URL is not set, and under CI the PostgreSQL tests must run: \
             use scripts/test.sh, which starts PostgreSQL"
        ),
        _ => {
            eprintln!("SKIPPED: OMNIBOX_TEST_DATABASE_URL is not set (scripts/test.sh sets it)");
            None
        }
    }
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let store = SqliteStore::connect(&url).await.expect("open sqlite");
    store.migrate().await.expect("migrate sqlite");
    TestDb {
        store: AnyStore::Sqlite(store),
        url,
        schema: None,
        _dir: Some(dir),
    }
}

/// A PostgreSQL store in a schema of its own, dropped when the value is dropped.
pub async fn postgres() -> Option<TestDb> {
    let url = pg_url()?;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let opts = PgOptions {
        schema: Some(schema.clone()),
        max_connections: 8,
        ..PgOptions::default()
    };
    let store = PgStore::connect(&url, &opts)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL: {e}"));
    store.migrate().await.expect("migrate postgres");
    Some(TestDb {
        store: AnyStore::Postgres(store),
        url,
        schema: Some(schema),
        _dir: None,
    })
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(schema) = self.schema.take() else {
            return;
        };
        let url = self.url.clone();
        // Drop runs outside async; a short-lived runtime on its own thread
        // removes the schema.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let pool = sqlx::PgPool::connect(&url).await.ok()?;
                let ddl = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                sqlx::query(sqlx::AssertSqlSafe(ddl))
                    .execute(&pool)
                    .await
                    .ok()?;
                pool.close().await;
                Some(())
            })
        })
        .join();
    }
}

/// Runs the body once per backend: `backend_tests!(name, |db| async move { ... })`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::common::sqlite().await;
                    $crate::cases::$name(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::common::postgres().await else { return };
                    $crate::cases::$name(&db).await;
                }
            )*
        }
    };
}

/// A child process that is killed when dropped (a failing test leaves no
/// process behind) unless taken back first.
pub struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    pub fn new(child: std::process::Child) -> Self {
        KillOnDrop(Some(child))
    }

    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }

    /// The child, no longer killed on drop.
    pub fn take(mut self) -> std::process::Child {
        self.0.take().expect("taken once")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A local address no one listens on now (`127.0.0.1:PORT`), for a server a
/// test starts (a relay's `--metrics-addr`).
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port();
    format!("127.0.0.1:{port}")
}
