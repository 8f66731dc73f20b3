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

/// An object's key (what the catalog queries return) and how `doctor` and
/// `migrate` name it.
#[test]
fn objects_are_keyed_and_described() {
    use super::Object::*;
    let cases = [
        (Table("t"), "table:t", "table t"),
        (Index("i"), "index:i", "index i"),
        (Column("t", "c"), "column:t.c", "column t.c"),
        (Trigger("t", "n"), "trigger:t.n", "trigger n on t"),
        (Function("f"), "function:f", "function f()"),
        (Constraint("c"), "constraint:c", "constraint c"),
    ];
    for (object, key, described) in cases {
        assert_eq!(
            (object.key().as_str(), object.describe().as_str()),
            (key, described)
        );
    }
}
