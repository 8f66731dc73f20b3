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
    /// The statement that records it in `omnibox_migrations` as `migrate`
    /// does, so that a later `omnibox migrate` sees it applied.
    pub record_sql: String,
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationReport {
    /// Migrations applied by this call (empty when the schema was up to date).
    pub applied: Vec<AppliedMigration>,
    /// Migrations this call recorded without running them: their objects
    /// were all there already (applied from `migrate --print-sql` of an older
    /// omnibox, or their row was deleted).
    pub recorded: Vec<AppliedMigration>,
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

/// Each migration's SQL and the statement recording it, for `migrate
/// --print-sql` (`pg`: PostgreSQL's record syntax, else SQLite's).
pub(crate) fn scripts(m: &sqlx::migrate::Migrator, pg: bool) -> Vec<MigrationScript> {
    m.iter()
        .map(|m| MigrationScript {
            version: m.version,
            description: m.description.to_string(),
            sql: m.sql.as_str().to_string(),
            record_sql: record_sql(pg, m),
        })
        .collect()
}

/// What a `migrate` run did: the migrations it applied and those it
/// recorded without running (their objects were there), and the version
/// after it.
pub(crate) fn report(
    m: &sqlx::migrate::Migrator,
    before: &[i64],
    recorded: &[i64],
    after: &[i64],
) -> MigrationReport {
    let pick = |keep: &dyn Fn(i64) -> bool| {
        m.iter()
            .filter(|m| keep(m.version))
            .map(|m| AppliedMigration {
                version: m.version,
                description: m.description.to_string(),
            })
            .collect()
    };
    MigrationReport {
        applied: pick(&|v| after.contains(&v) && !before.contains(&v) && !recorded.contains(&v)),
        recorded: pick(&|v| recorded.contains(&v)),
        version: after.iter().copied().max().unwrap_or(0),
    }
}

/// Before applying: refuses a schema `migrate` cannot finish safely (a
/// migration partly applied without a record), warns of objects of recorded
/// migrations that are gone, and returns the migrations to record without
/// running them (their objects all exist: running them would fail on
/// "already exists").
pub(crate) fn plan<'m>(
    m: &'m sqlx::migrate::Migrator,
    state: &SchemaState,
) -> crate::error::Result<Vec<&'m sqlx::migrate::Migration>> {
    let problems = state.problems();
    if let Some(p) = problems.iter().find(|p| p.kind == ProblemKind::Partial) {
        return Err(crate::error::Error::Schema(format!(
            "{}; nothing was changed; to fix it, {}",
            p.message, p.hint
        )));
    }
    for p in problems.iter().filter(|p| p.kind == ProblemKind::Gone) {
        tracing::warn!("{}; {}", p.message, p.hint);
    }
    Ok(state
        .migrations
        .iter()
        .filter(|s| s.unrecorded())
        .filter_map(|s| m.iter().find(|x| x.version == s.version))
        .collect())
}

/// A released migration whose comments were edited later: the SHA-384 of
/// its text as released (what databases migrated before the edit recorded).
pub(crate) struct CommentEdit {
    pub version: i64,
    pub released_sha384: &'static str,
}

impl CommentEdit {
    /// Migration `version`, released with the SHA-384 (hex) `released_sha384`.
    pub(crate) const fn released(version: i64, released_sha384: &'static str) -> Self {
        CommentEdit {
            version,
            released_sha384,
        }
    }
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

/// The versions recorded as applied, in order (both backends).
pub(crate) const APPLIED_VERSIONS: &str =
    "SELECT version FROM omnibox_migrations WHERE success ORDER BY version";

/// Records `mig` as applied without running it (its objects exist),
/// creating the migrations table first if need be.
pub(crate) async fn record_applied<D: crate::store::dialect::Dialect>(
    conn: &mut <D::Db as sqlx::Database>::Connection,
    mig: &sqlx::migrate::Migration,
) -> crate::error::Result<()>
where
    <D::Db as sqlx::Database>::Connection: sqlx::migrate::Migrate,
    <D::Db as sqlx::Database>::Arguments: sqlx::IntoArguments<D::Db>,
    for<'c> &'c mut <D::Db as sqlx::Database>::Connection: sqlx::Executor<'c, Database = D::Db>,
    i64: sqlx::Encode<'static, D::Db> + sqlx::Type<D::Db>,
    String: sqlx::Encode<'static, D::Db> + sqlx::Type<D::Db>,
    Vec<u8>: sqlx::Encode<'static, D::Db> + sqlx::Type<D::Db>,
{
    use sqlx::migrate::Migrate;
    conn.ensure_migrations_table(MIGRATIONS_TABLE)
        .await
        .map_err(crate::error::Error::Migration)?;
    let mut qb = sqlx::QueryBuilder::<D::Db>::new(format!(
        "INSERT INTO {MIGRATIONS_TABLE} (version, description, success, checksum, execution_time) VALUES ("
    ));
    qb.push_bind(mig.version)
        .push(", ")
        .push_bind(mig.description.to_string())
        .push(", TRUE, ")
        .push_bind(mig.checksum.to_vec())
        .push(", 0) ON CONFLICT (version) DO NOTHING");
    qb.build()
        .execute(conn)
        .await
        .map_err(crate::error::storage)?;
    Ok(())
}

/// A backend's embedded migrations, recorded in [`MIGRATIONS_TABLE`], with
/// the checksums of `edits` pinned (see [`pin_comment_edits`]).
pub(crate) fn configured(
    mut m: sqlx::migrate::Migrator,
    edits: &[CommentEdit],
) -> sqlx::migrate::Migrator {
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    pin_comment_edits(&mut m, edits);
    m
}

/// Fails with a hint when the versions `applied` end before `m`'s latest
/// (the schema is missing or older than this binary).
pub(crate) fn ensure_current(
    applied: &[i64],
    m: &sqlx::migrate::Migrator,
) -> crate::error::Result<()> {
    let current = applied.iter().copied().max().unwrap_or(0);
    let latest = latest(m);
    if current < latest {
        return Err(crate::error::Error::Config(format!(
            "the database schema is at version {current}, this omnibox needs version {latest}; run `omnibox migrate` first"
        )));
    }
    Ok(())
}

/// The highest version `m` carries: the schema version this binary expects.
pub(crate) fn latest(m: &sqlx::migrate::Migrator) -> i64 {
    m.iter().map(|m| m.version).max().unwrap_or(0)
}

/// An object a migration creates: how `doctor` and `migrate` tell whether
/// a migration's work is in the database, whatever `omnibox_migrations`
/// records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Object {
    Table(&'static str),
    Index(&'static str),
    /// Table, column.
    Column(&'static str, &'static str),
    /// Table, trigger.
    Trigger(&'static str, &'static str),
    Function(&'static str),
    Constraint(&'static str),
}

impl Object {
    /// The key the backends' catalog queries return for an existing object
    /// (`PgStore::existing_objects`, `SqliteStore::existing_objects`).
    pub(crate) fn key(&self) -> String {
        match self {
            Object::Table(t) => format!("table:{t}"),
            Object::Index(i) => format!("index:{i}"),
            Object::Column(t, c) => format!("column:{t}.{c}"),
            Object::Trigger(t, n) => format!("trigger:{t}.{n}"),
            Object::Function(f) => format!("function:{f}"),
            Object::Constraint(c) => format!("constraint:{c}"),
        }
    }

    /// The object for a reader: its [`key`](Self::key) with a space after
    /// the kind, but a trigger named before its table and a function with
    /// `()`.
    fn describe(&self) -> String {
        match self {
            Object::Trigger(t, n) => format!("trigger {n} on {t}"),
            Object::Function(f) => format!("function {f}()"),
            _ => self.key().replacen(':', " ", 1),
        }
    }
}

/// What migration 1 creates, the same on both backends: the two tables and
/// their first indexes (`*_locked` is dropped and created again by the
/// lease migration, under the same name).
pub(crate) const INITIAL_OBJECTS: &[Object] = {
    use Object::*;
    &[
        Table("outbox_events"),
        Table("inbox_events"),
        Index("outbox_events_claim"),
        Index("outbox_events_key_order"),
        Index("outbox_events_key_held"),
        Index("outbox_events_locked"),
        Index("outbox_events_cleanup"),
        Index("outbox_events_failed"),
        Index("outbox_events_idempotency_key"),
        Index("inbox_events_claim"),
        Index("inbox_events_locked"),
        Index("inbox_events_cleanup"),
        Index("inbox_events_failed"),
        Index("inbox_events_idempotency_key"),
    ]
};

/// The audit table, the same on both backends.
pub(crate) const AUDIT_OBJECTS: &[Object] = &[
    Object::Table("omnibox_audit"),
    Object::Index("omnibox_audit_at"),
];

/// The lease columns, the same on both backends (each adds its own checks).
pub(crate) const LEASE_COLUMNS: [Object; 2] = [
    Object::Column("outbox_events", "locked_until"),
    Object::Column("inbox_events", "locked_until"),
];

/// The partial indexes of failed rows in `seq` order, on both backends.
pub(crate) const FAILED_SEQ_INDEXES: [Object; 2] = [
    Object::Index("outbox_events_failed_seq"),
    Object::Index("inbox_events_failed_seq"),
];

/// The claim filters' indexes, the same on both backends.
pub(crate) const FILTER_INDEXES: &[Object] = &[
    Object::Index("outbox_events_topic_due"),
    Object::Index("inbox_events_source_due"),
];

/// The dead-letter table and its index of open letters, on both backends.
pub(crate) const DEAD_LETTER_OBJECTS: [Object; 2] = [
    Object::Table("omnibox_dead_letters"),
    Object::Index("omnibox_dead_letters_open"),
];

/// What one migration creates. `rerunnable`: every statement of it is
/// `... IF NOT EXISTS`, so running it again over a part of its objects is
/// safe.
pub(crate) struct Creates {
    pub version: i64,
    pub rerunnable: bool,
    pub objects: &'static [Object],
}

impl Creates {
    /// A migration that must not run twice.
    pub(crate) const fn once(version: i64, objects: &'static [Object]) -> Self {
        Creates {
            version,
            rerunnable: false,
            objects,
        }
    }

    /// A migration of `... IF NOT EXISTS` statements only.
    pub(crate) const fn rerunnable(version: i64, objects: &'static [Object]) -> Self {
        Creates {
            rerunnable: true,
            ..Self::once(version, objects)
        }
    }
}

/// How one migration's record compares with the objects it creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationState {
    /// Version number.
    pub version: i64,
    /// Short description.
    pub description: String,
    /// Recorded (successfully) in `omnibox_migrations`.
    pub recorded: bool,
    /// Its objects that exist ("table omnibox_audit", "index ...").
    pub present: Vec<String>,
    /// Its objects that do not.
    pub missing: Vec<String>,
    /// Running it again over some of its objects is safe.
    pub rerunnable: bool,
    /// Its missing objects that are indexes (names only).
    #[serde(skip)]
    pub missing_indexes: Vec<String>,
}

/// The recorded versions against the objects in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SchemaState {
    /// Versions recorded in `omnibox_migrations`.
    pub recorded: Vec<i64>,
    /// The newest version this binary carries.
    pub latest: i64,
    /// One entry per migration this binary carries, in order.
    pub migrations: Vec<MigrationState>,
    /// The indexes the migrations create.
    #[serde(skip)]
    pub indexes: Vec<String>,
}

/// One inconsistency between the records and the objects, with its fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    /// What is wrong.
    pub message: String,
    /// What fixes it.
    pub hint: String,
    /// Which kind.
    pub kind: ProblemKind,
}

/// The kinds of [`SchemaProblem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// A migration's objects all exist but it is not recorded: `migrate`
    /// records it.
    Unrecorded,
    /// A migration's objects partly exist and it is not recorded: `migrate`
    /// refuses until someone finishes or undoes it.
    Partial,
    /// A recorded migration's table, column, trigger, function or
    /// constraint is gone.
    Gone,
}

impl MigrationState {
    /// Not recorded, and every object there: applied without a record
    /// (DDL printed by `migrate --print-sql` of an older omnibox, a deleted
    /// row). `migrate` records it.
    pub fn unrecorded(&self) -> bool {
        !self.recorded && self.missing.is_empty() && !self.present.is_empty()
    }

    /// Not recorded, some of its objects there and some not, and not safe
    /// to run again.
    pub fn partial(&self) -> bool {
        !self.recorded && !self.present.is_empty() && !self.missing.is_empty() && !self.rerunnable
    }

    fn label(&self) -> String {
        format!("migration {} ({})", self.version, self.description)
    }
}

impl SchemaState {
    /// The highest recorded version (0 when none).
    pub fn version(&self) -> i64 {
        self.recorded.iter().copied().max().unwrap_or(0)
    }

    /// Whether the outbox table exists.
    pub fn has_tables(&self) -> bool {
        self.migrations
            .first()
            .is_some_and(|m| m.present.iter().any(|o| o == "table outbox_events"))
    }

    /// The migrations' indexes that are missing.
    pub fn missing_indexes(&self) -> Vec<String> {
        self.migrations
            .iter()
            .flat_map(|m| m.missing_indexes.iter().cloned())
            .collect()
    }

    /// Every inconsistency between the records and the objects, in the
    /// migrations' order. Missing indexes of recorded migrations are left to
    /// the caller (doctor's index check): they block nothing.
    pub fn problems(&self) -> Vec<SchemaProblem> {
        let mut out = Vec::new();
        let unrecorded: Vec<&MigrationState> =
            self.migrations.iter().filter(|m| m.unrecorded()).collect();
        if !unrecorded.is_empty() {
            let versions: Vec<String> = unrecorded.iter().map(|m| m.version.to_string()).collect();
            let (noun, verb) = if unrecorded.len() == 1 {
                ("migration", "is")
            } else {
                ("migrations", "are")
            };
            out.push(SchemaProblem {
                message: format!(
                    "{noun} {} {verb} not recorded in {MIGRATIONS_TABLE}, but {} objects exist",
                    versions.join(", "),
                    if unrecorded.len() == 1 { "its" } else { "their" }
                ),
                hint: "run `omnibox migrate`: it records a migration whose objects all exist and applies the rest".into(),
                kind: ProblemKind::Unrecorded,
            });
        }
        for m in self.migrations.iter().filter(|m| m.partial()) {
            out.push(SchemaProblem {
                message: format!(
                    "{} is partly applied and not recorded: {} exist, {} missing",
                    m.label(),
                    m.present.join(", "),
                    m.missing.join(", ")
                ),
                hint: format!(
                    "create the missing objects with migration {v}'s DDL (`omnibox migrate --print-sql`), or drop the ones it created; then run `omnibox migrate`",
                    v = m.version
                ),
                kind: ProblemKind::Partial,
            });
        }
        for m in self.migrations.iter().filter(|m| m.recorded) {
            let gone: Vec<&String> = m
                .missing
                .iter()
                .filter(|o| !o.starts_with("index "))
                .collect();
            if gone.is_empty() {
                continue;
            }
            let gone: Vec<&str> = gone.iter().map(|s| s.as_str()).collect();
            out.push(SchemaProblem {
                message: format!(
                    "{} is recorded, but {} missing",
                    m.label(),
                    if gone.len() == 1 {
                        format!("{} is", gone[0])
                    } else {
                        format!("{} are", gone.join(", "))
                    }
                ),
                hint: format!(
                    "someone dropped it: recreate it from migration {}'s DDL (`omnibox migrate --print-sql`)",
                    m.version
                ),
                kind: ProblemKind::Gone,
            });
        }
        out
    }
}

/// Compares the records with the objects. `existing` holds the keys
/// ([`Object::key`]) of the objects in the database.
pub(crate) fn state(
    m: &sqlx::migrate::Migrator,
    creates: &[Creates],
    recorded: &[i64],
    existing: &std::collections::HashSet<String>,
) -> SchemaState {
    let mut indexes = Vec::new();
    let migrations = m
        .iter()
        .map(|mig| {
            let c = creates.iter().find(|c| c.version == mig.version);
            let objects = c.map_or(&[][..], |c| c.objects);
            let (mut present, mut missing, mut missing_indexes) = (vec![], vec![], vec![]);
            for o in objects {
                if let Object::Index(name) = o {
                    indexes.push(name.to_string());
                }
                if existing.contains(&o.key()) {
                    present.push(o.describe());
                } else {
                    missing.push(o.describe());
                    if let Object::Index(name) = o {
                        missing_indexes.push(name.to_string());
                    }
                }
            }
            MigrationState {
                version: mig.version,
                description: mig.description.to_string(),
                recorded: recorded.contains(&mig.version),
                present,
                missing,
                rerunnable: c.is_some_and(|c| c.rerunnable),
                missing_indexes,
            }
        })
        .collect();
    SchemaState {
        recorded: recorded.to_vec(),
        latest: latest(m),
        migrations,
        indexes,
    }
}

/// The statement that records a migration as applied, for
/// `migrate --print-sql` (`checksum` as sqlx computes it, so that a later
/// `omnibox migrate` validates the record).
pub(crate) fn record_sql(backend_pg: bool, m: &sqlx::migrate::Migration) -> String {
    let hex: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
    let checksum = if backend_pg {
        format!("decode('{hex}', 'hex')")
    } else {
        format!("X'{hex}'")
    };
    format!(
        "INSERT INTO {MIGRATIONS_TABLE} (version, description, success, checksum, execution_time) VALUES ({}, '{}', TRUE, {checksum}, 0) ON CONFLICT (version) DO NOTHING;",
        m.version,
        m.description.replace('\'', "''")
    )
}

/// The table that records migrations, as sqlx creates it.
pub(crate) fn migrations_table_sql(backend_pg: bool) -> String {
    let (at, bytes) = if backend_pg {
        ("TIMESTAMPTZ NOT NULL DEFAULT now()", "BYTEA")
    } else {
        ("TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP", "BLOB")
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (\n    version BIGINT PRIMARY KEY,\n    description TEXT NOT NULL,\n    installed_on {at},\n    success BOOLEAN NOT NULL,\n    checksum {bytes} NOT NULL,\n    execution_time BIGINT NOT NULL\n);"
    )
}

#[cfg(test)]
mod tests;
