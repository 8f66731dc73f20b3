-- omnibox schema, version 2: the audit trail of operator actions (replay,
-- unlock, release of stale locks, cleanup): who, when, what, why.
CREATE TABLE omnibox_audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT    NOT NULL,
    actor      TEXT    NOT NULL CHECK (length(actor) BETWEEN 1 AND 255),
    action     TEXT    NOT NULL CHECK (length(action) BETWEEN 1 AND 50),
    table_name TEXT,
    row_count  INTEGER NOT NULL CHECK (row_count >= 0),
    ids        TEXT    NOT NULL CHECK (json_valid(ids) AND json_type(ids) = 'array'),
    reason     TEXT    CHECK (length(reason) <= 1000),
    details    TEXT    CHECK (details IS NULL OR (json_valid(details) AND json_type(details) = 'object'))
);
CREATE INDEX omnibox_audit_at ON omnibox_audit (at);
