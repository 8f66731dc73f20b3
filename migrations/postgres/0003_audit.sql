-- omnibox schema, version 3: the audit trail of operator actions (replay,
-- unlock, release of stale locks, cleanup): who, when, what, why.
CREATE TABLE omnibox_audit (
    id         bigint        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz   NOT NULL DEFAULT now(),
    actor      varchar(255)  NOT NULL,
    action     varchar(50)   NOT NULL,
    table_name varchar(20),
    row_count  bigint        NOT NULL CHECK (row_count >= 0),
    ids        jsonb         NOT NULL CHECK (jsonb_typeof(ids) = 'array'),
    reason     varchar(1000),
    details    jsonb         CHECK (details IS NULL OR jsonb_typeof(details) = 'object')
);
CREATE INDEX omnibox_audit_at ON omnibox_audit (at);
