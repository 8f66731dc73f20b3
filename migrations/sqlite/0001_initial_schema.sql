-- omnibox schema, version 1: the outbox and inbox tables (docs/design.md), SQLite.
--
-- Readable with the sqlite3 shell: UUIDs are lowercase hyphenated TEXT, JSON
-- is TEXT, timestamps are RFC 3339 UTC TEXT in one fixed-width form
-- (2026-11-26T20:45:17.123456Z), so text order is time order.
--
-- `seq` (INTEGER PRIMARY KEY AUTOINCREMENT, SQLite's identity column) gives
-- insertion order and is never reused; `id` is the event's unique key.

CREATE TABLE outbox_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE
                    CHECK (length(id) = 36 AND id = lower(id) AND id GLOB '[0-9a-f]*-[0-9a-f]*-[0-9a-f]*-[0-9a-f]*-[0-9a-f]*'),
    event_type      TEXT    NOT NULL CHECK (length(event_type) BETWEEN 1 AND 100),
    payload         TEXT    NOT NULL CHECK (json_valid(payload) AND json_type(payload) = 'object'),
    headers         TEXT    CHECK (headers IS NULL OR (json_valid(headers) AND json_type(headers) = 'object')),
    trace_id        TEXT    CHECK (length(trace_id) BETWEEN 1 AND 64),
    idempotency_key TEXT    CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    correlation_id  TEXT    CHECK (length(correlation_id) BETWEEN 1 AND 64),
    causation_id    TEXT    CHECK (length(causation_id) BETWEEN 1 AND 64),
    schema_version  TEXT    CHECK (length(schema_version) BETWEEN 1 AND 50),
    status          TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'completed', 'failed')),
    attempts_made   INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL DEFAULT 6,
    last_error      TEXT    CHECK (length(CAST(last_error AS BLOB)) <= 2000),
    scheduled_at    TEXT    NOT NULL CHECK (scheduled_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    completed_at    TEXT    CHECK (completed_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    locked_at       TEXT    CHECK (locked_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    locked_by       TEXT    CHECK (length(locked_by) BETWEEN 1 AND 255),
    created_at      TEXT    NOT NULL CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    updated_at      TEXT    NOT NULL CHECK (updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    aggregate_type  TEXT    NOT NULL CHECK (length(aggregate_type) BETWEEN 1 AND 50),
    aggregate_id    TEXT    NOT NULL CHECK (length(aggregate_id) = 36 AND aggregate_id = lower(aggregate_id)),
    topic           TEXT    NOT NULL CHECK (length(topic) BETWEEN 1 AND 255),
    partition_key   TEXT    NOT NULL CHECK (length(partition_key) BETWEEN 1 AND 255),
    CHECK (attempts_made >= 0 AND max_attempts >= 1 AND attempts_made <= max_attempts),
    CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    CHECK ((locked_at IS NULL) = (locked_by IS NULL)),
    CHECK (locked_at IS NULL OR status = 'pending')
);

CREATE INDEX outbox_events_claim ON outbox_events (scheduled_at, seq)
    WHERE status = 'pending' AND locked_at IS NULL;
CREATE INDEX outbox_events_key_order ON outbox_events (topic, partition_key, seq)
    WHERE status = 'pending';
CREATE INDEX outbox_events_key_held ON outbox_events (topic, partition_key, seq)
    WHERE status = 'pending' AND last_error IS NOT NULL;
CREATE INDEX outbox_events_locked ON outbox_events (locked_at)
    WHERE locked_at IS NOT NULL;
CREATE INDEX outbox_events_cleanup ON outbox_events (completed_at)
    WHERE status = 'completed';
CREATE INDEX outbox_events_failed ON outbox_events (updated_at)
    WHERE status = 'failed';
CREATE UNIQUE INDEX outbox_events_idempotency_key ON outbox_events (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE inbox_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE
                    CHECK (length(id) = 36 AND id = lower(id) AND id GLOB '[0-9a-f]*-[0-9a-f]*-[0-9a-f]*-[0-9a-f]*-[0-9a-f]*'),
    event_type      TEXT    NOT NULL CHECK (length(event_type) BETWEEN 1 AND 100),
    payload         TEXT    NOT NULL CHECK (json_valid(payload) AND json_type(payload) = 'object'),
    headers         TEXT    CHECK (headers IS NULL OR (json_valid(headers) AND json_type(headers) = 'object')),
    trace_id        TEXT    CHECK (length(trace_id) BETWEEN 1 AND 64),
    idempotency_key TEXT    CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    correlation_id  TEXT    CHECK (length(correlation_id) BETWEEN 1 AND 64),
    causation_id    TEXT    CHECK (length(causation_id) BETWEEN 1 AND 64),
    schema_version  TEXT    CHECK (length(schema_version) BETWEEN 1 AND 50),
    status          TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'completed', 'failed')),
    attempts_made   INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL DEFAULT 6,
    last_error      TEXT    CHECK (length(CAST(last_error AS BLOB)) <= 2000),
    scheduled_at    TEXT    NOT NULL CHECK (scheduled_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    completed_at    TEXT    CHECK (completed_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    locked_at       TEXT    CHECK (locked_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    locked_by       TEXT    CHECK (length(locked_by) BETWEEN 1 AND 255),
    created_at      TEXT    NOT NULL CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    updated_at      TEXT    NOT NULL CHECK (updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z'),
    message_id      TEXT    NOT NULL CHECK (length(message_id) BETWEEN 1 AND 255),
    consumer_group  TEXT    NOT NULL CHECK (length(consumer_group) BETWEEN 1 AND 255),
    source          TEXT    NOT NULL CHECK (length(source) BETWEEN 1 AND 255),
    UNIQUE (message_id, consumer_group),
    CHECK (attempts_made >= 0 AND max_attempts >= 1 AND attempts_made <= max_attempts),
    CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    CHECK ((locked_at IS NULL) = (locked_by IS NULL)),
    CHECK (locked_at IS NULL OR status = 'pending')
);

CREATE INDEX inbox_events_claim ON inbox_events (scheduled_at, seq)
    WHERE status = 'pending' AND locked_at IS NULL;
CREATE INDEX inbox_events_locked ON inbox_events (locked_at)
    WHERE locked_at IS NOT NULL;
CREATE INDEX inbox_events_cleanup ON inbox_events (completed_at)
    WHERE status = 'completed';
CREATE INDEX inbox_events_failed ON inbox_events (updated_at)
    WHERE status = 'failed';
CREATE UNIQUE INDEX inbox_events_idempotency_key ON inbox_events (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
