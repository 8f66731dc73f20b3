//! What the backends share about migrations.

use serde::Serialize;

/// Name of the table that records applied migrations (separate from an
/// application's own `_sqlx_migrations`, which may live in the same schema).
pub const MIGRATIONS_TABLE: &str = "omnibox_migrations";

/// One embedded migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationScript {
    /// Version number (1, 2, ...).
    pub version: i64,
    /// Short description.
    pub description: String,
    /// The DDL.
    pub sql: String,
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationReport {
    /// Migrations applied by this call (empty when the schema was up to date).
    pub applied: Vec<AppliedMigration>,
    /// Schema version after the call.
    pub version: i64,
}

/// One migration applied by a `migrate` call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppliedMigration {
    /// Version number.
    pub version: i64,
    /// Short description.
    pub description: String,
}

pub(crate) fn scripts(m: &sqlx::migrate::Migrator) -> Vec<MigrationScript> {
    m.iter()
        .map(|m| MigrationScript {
            version: m.version,
            description: m.description.to_string(),
            sql: m.sql.as_str().to_string(),
        })
        .collect()
}

pub(crate) fn report(
    m: &sqlx::migrate::Migrator,
    before: &[i64],
    after: &[i64],
) -> MigrationReport {
    let applied = m
        .iter()
        .filter(|m| after.contains(&m.version) && !before.contains(&m.version))
        .map(|m| AppliedMigration {
            version: m.version,
            description: m.description.to_string(),
        })
        .collect();
    MigrationReport {
        applied,
        version: after.iter().copied().max().unwrap_or(0),
    }
}

pub(crate) fn latest(m: &sqlx::migrate::Migrator) -> i64 {
    m.iter().map(|m| m.version).max().unwrap_or(0)
}
