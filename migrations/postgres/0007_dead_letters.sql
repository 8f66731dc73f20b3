-- omnibox schema, version 7: dead letters kept in the database
-- (`publish --dlq table`, `inbox process --dlq table`; docs/design.md,
-- "Dead letters"). A row is a copy of an event that became `failed`, taken
-- when it failed: it outlives `cleanup --include-failed`, and `omnibox
-- replay --table dead-letters` puts the event back (requeued if its row is
-- still there, re-inserted from the copy if not).
CREATE TABLE omnibox_dead_letters (
    id            uuid          PRIMARY KEY,
    seq           bigint        GENERATED ALWAYS AS IDENTITY,
    origin        varchar(10)   NOT NULL,
    event_id      uuid          NOT NULL,
    event_type    varchar(100)  NOT NULL,
    topic         varchar(255)  NOT NULL,
    attempts_made integer       NOT NULL,
    error         varchar(2000) NOT NULL,
    event         jsonb         NOT NULL,
    dead_at       timestamptz   NOT NULL DEFAULT now(),
    replayed_at   timestamptz,
    CONSTRAINT omnibox_dead_letters_origin_valid CHECK (origin IN ('outbox', 'inbox')),
    CONSTRAINT omnibox_dead_letters_event_object CHECK (jsonb_typeof(event) = 'object')
);
-- One open (not replayed) letter per event: a retried write keeps one; an
-- event replayed and failed again gets a new letter.
CREATE UNIQUE INDEX omnibox_dead_letters_open ON omnibox_dead_letters (origin, event_id)
    WHERE replayed_at IS NULL;
-- Listing and paging in the order letters were written.
CREATE UNIQUE INDEX omnibox_dead_letters_seq ON omnibox_dead_letters (seq);
