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

/// A released migration whose comments were edited later: the SHA-384 of
/// its text as released (what databases migrated before the edit recorded).
pub(crate) struct CommentEdit {
    pub version: i64,
    pub released_sha384: &'static str,
}

/// Keeps the checksums of released migrations whose comments were edited:
/// each gets the checksum of its text as released, so databases migrated
/// before the edit still match, and new ones record the same. An edit must
/// change comments only (reviewed with the edit; `git log -p` shows it).
pub(crate) fn pin_comment_edits(m: &mut sqlx::migrate::Migrator, edits: &[CommentEdit]) {
    let migrations: Vec<sqlx::migrate::Migration> = m
        .iter()
        .map(|mig| {
            let mut mig = mig.clone();
            if let Some(e) = edits.iter().find(|e| e.version == mig.version) {
                let bytes: Vec<u8> = (0..e.released_sha384.len())
                    .step_by(2)
                    .filter_map(|i| u8::from_str_radix(e.released_sha384.get(i..i + 2)?, 16).ok())
                    .collect();
                // A malformed constant (not 48 bytes) would leave the
                // computed checksum; the unit test below pins the value.
                if bytes.len() == 48 {
                    mig.checksum = bytes.into();
                }
            }
            mig
        })
        .collect();
    m.migrations = std::borrow::Cow::Owned(migrations);
}

pub(crate) fn latest(m: &sqlx::migrate::Migrator) -> i64 {
    m.iter().map(|m| m.version).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Migration 1's comments were edited after its release: databases
    /// migrated before must still match, so the checksum stays the SHA-384
    /// of the text as released (these hashes are of the released files).
    #[test]
    fn edited_migrations_keep_their_released_checksums() {
        let pg = crate::store::PgStore::migrator_for_tests();
        let sqlite = crate::store::SqliteStore::migrator_for_tests();
        let first = |m: &sqlx::migrate::Migrator| m.iter().next().map(|m| hex(&m.checksum));
        assert_eq!(
            first(&pg).as_deref(),
            Some(
                "431a0723b9d556721d08330f4f0332d9e032c22bd078c86c1edbb71b8e2cc138a7f5f91f6516d58792d2da8050c947a2"
            )
        );
        assert_eq!(
            first(&sqlite).as_deref(),
            Some(
                "44f7c9fc639fb8d87547bca0d16898ade91b5725d8a7e5c7a55787e8b01df9ff9cae0ce224d949ed116b7649308484c9"
            )
        );
    }
}
