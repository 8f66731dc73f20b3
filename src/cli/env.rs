//! Every environment variable the CLI reads, in one place.

/// Database URL (`--database-url`); default `sqlite://omnibox.db`.
pub const DATABASE_URL: &str = "OMNIBOX_DATABASE_URL";
/// PostgreSQL schema holding the tables (`--schema`).
pub const DATABASE_SCHEMA: &str = "OMNIBOX_DATABASE_SCHEMA";
/// Path of the configuration file (`--config`); default `./omnibox.toml` if present.
pub const CONFIG: &str = "OMNIBOX_CONFIG";
/// Output format of reporting commands (`--format`): `table` or `json`.
pub const FORMAT: &str = "OMNIBOX_FORMAT";
/// Log filter in `tracing` syntax (e.g. `omnibox=debug`); wins over `RUST_LOG`.
pub const LOG: &str = "OMNIBOX_LOG";
/// Log filter used when `OMNIBOX_LOG` is unset.
pub const RUST_LOG: &str = "RUST_LOG";
/// Log format (`--log-format`): `text` or `json`.
pub const LOG_FORMAT: &str = "OMNIBOX_LOG_FORMAT";
/// Any value turns colour off (<https://no-color.org>).
pub const NO_COLOR: &str = "NO_COLOR";
/// Broker URL of `publish` (`--broker`); default `file:omnibox-events.jsonl`.
pub const BROKER: &str = "OMNIBOX_BROKER";
/// The inbox's deduplication window (`--dedup-window`, file `dedup_window`); default 7d.
pub const DEDUP_WINDOW: &str = "OMNIBOX_DEDUP_WINDOW";
/// The lease relays and `inbox process` take (`--lease`, file `lease`); default 5m.
pub const LEASE: &str = "OMNIBOX_LEASE";
/// The byte budget of a batch of `publish`, `inbox process` and `inbox
/// consume` (`--batch-bytes`, file `batch_bytes`); default 16MiB.
pub const BATCH_BYTES: &str = "OMNIBOX_BATCH_BYTES";
/// The longest a database statement may run (file `statement_timeout`);
/// default 5m. `publish`, `inbox process` and `inbox consume` stop with an
/// error when a database call is not answered within twice this and 10 s
/// (its connection lost without a reset).
pub const STATEMENT_TIMEOUT: &str = "OMNIBOX_STATEMENT_TIMEOUT";
/// The Kafka SASL password (`--kafka-sasl-mechanism`), when no
/// `--kafka-sasl-password-file` is given.
pub const KAFKA_SASL_PASSWORD: &str = "OMNIBOX_KAFKA_SASL_PASSWORD";
