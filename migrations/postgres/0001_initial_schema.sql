-- omnibox schema, version 1: the outbox and inbox tables (docs/design.md).
--
-- Both tables carry `seq`, an identity column giving insertion order (rows of
-- one transaction share created_at, so it cannot give the order), and
-- timestamps are `timestamptz` defaulting to now(): an absolute instant,
-- whatever the session's TimeZone.

CREATE TABLE outbox_events (
    id              uuid         PRIMARY KEY,
    seq             bigint       GENERATED ALWAYS AS IDENTITY,
    event_type      varchar(100) NOT NULL,
    payload         jsonb        NOT NULL,
    headers         jsonb,
    trace_id        varchar(64),
    idempotency_key varchar(128),
    correlation_id  varchar(64),
    causation_id    varchar(64),
    schema_version  varchar(50),
    status          varchar(20)  NOT NULL DEFAULT 'pending',
    attempts_made   integer      NOT NULL DEFAULT 0,
    max_attempts    integer      NOT NULL DEFAULT 6,
    last_error      varchar(2000),
    scheduled_at    timestamptz  NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    locked_at       timestamptz,
    locked_by       varchar(255),
    created_at      timestamptz  NOT NULL DEFAULT now(),
    updated_at      timestamptz  NOT NULL DEFAULT now(),
    aggregate_type  varchar(50)  NOT NULL,
    aggregate_id    uuid         NOT NULL,
    topic           varchar(255) NOT NULL,
    partition_key   varchar(255) NOT NULL,
    CONSTRAINT outbox_events_status_valid CHECK (status IN ('pending', 'completed', 'failed')),
    CONSTRAINT outbox_events_attempts_valid CHECK (attempts_made >= 0 AND max_attempts >= 1 AND attempts_made <= max_attempts),
    CONSTRAINT outbox_events_completed_consistency CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    CONSTRAINT outbox_events_lock_consistency CHECK ((locked_at IS NULL) = (locked_by IS NULL)),
    CONSTRAINT outbox_events_locked_is_pending CHECK (locked_at IS NULL OR status = 'pending'),
    CONSTRAINT outbox_events_payload_object CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT outbox_events_headers_object CHECK (headers IS NULL OR jsonb_typeof(headers) = 'object')
);

-- The claim: unlocked pending rows in (scheduled_at, seq) order. A claimed
-- row leaves this index, so claims do not wade through each other's rows.
CREATE INDEX outbox_events_claim ON outbox_events (scheduled_at, seq)
    WHERE status = 'pending' AND locked_at IS NULL;
-- Per-key order: the pending rows of one (topic, partition_key), oldest first.
CREATE INDEX outbox_events_key_order ON outbox_events (topic, partition_key, seq)
    WHERE status = 'pending';
-- Keys held up by a failure: pending rows that were tried (and wait for a
-- retry). Small, and rows enter it only when something fails; it lets the
-- claim skip rows queued behind a failed head without walking the key.
CREATE INDEX outbox_events_key_held ON outbox_events (topic, partition_key, seq)
    WHERE status = 'pending' AND last_error IS NOT NULL;
-- Lease expiry and stale-lock release.
CREATE INDEX outbox_events_locked ON outbox_events (locked_at)
    WHERE locked_at IS NOT NULL;
-- Cleanup of completed rows.
CREATE INDEX outbox_events_cleanup ON outbox_events (completed_at)
    WHERE status = 'completed';
-- Replay and failure reports.
CREATE INDEX outbox_events_failed ON outbox_events (updated_at)
    WHERE status = 'failed';
CREATE UNIQUE INDEX outbox_events_idempotency_key ON outbox_events (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE inbox_events (
    id              uuid         PRIMARY KEY,
    seq             bigint       GENERATED ALWAYS AS IDENTITY,
    event_type      varchar(100) NOT NULL,
    payload         jsonb        NOT NULL,
    headers         jsonb,
    trace_id        varchar(64),
    idempotency_key varchar(128),
    correlation_id  varchar(64),
    causation_id    varchar(64),
    schema_version  varchar(50),
    status          varchar(20)  NOT NULL DEFAULT 'pending',
    attempts_made   integer      NOT NULL DEFAULT 0,
    max_attempts    integer      NOT NULL DEFAULT 6,
    last_error      varchar(2000),
    scheduled_at    timestamptz  NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    locked_at       timestamptz,
    locked_by       varchar(255),
    created_at      timestamptz  NOT NULL DEFAULT now(),
    updated_at      timestamptz  NOT NULL DEFAULT now(),
    message_id      varchar(255) NOT NULL,
    consumer_group  varchar(255) NOT NULL,
    source          varchar(255) NOT NULL,
    CONSTRAINT inbox_events_dedup UNIQUE (message_id, consumer_group),
    CONSTRAINT inbox_events_status_valid CHECK (status IN ('pending', 'completed', 'failed')),
    CONSTRAINT inbox_events_attempts_valid CHECK (attempts_made >= 0 AND max_attempts >= 1 AND attempts_made <= max_attempts),
    CONSTRAINT inbox_events_completed_consistency CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    CONSTRAINT inbox_events_lock_consistency CHECK ((locked_at IS NULL) = (locked_by IS NULL)),
    CONSTRAINT inbox_events_locked_is_pending CHECK (locked_at IS NULL OR status = 'pending'),
    CONSTRAINT inbox_events_payload_object CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT inbox_events_headers_object CHECK (headers IS NULL OR jsonb_typeof(headers) = 'object')
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
