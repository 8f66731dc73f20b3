-- omnibox schema, version 6: dead letters kept in the database
-- (`publish --dlq table`, `inbox process --dlq table`; docs/design.md,
-- "Dead letters"). A row is a copy of an event that became `failed`, taken
-- when it failed: it outlives `cleanup --include-failed`, and `omnibox
-- replay --table dead-letters` puts the event back (requeued if its row is
-- still there, re-inserted from the copy if not).
CREATE TABLE omnibox_dead_letters (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL UNIQUE CHECK (length(id) = 36 AND id = lower(id)),
    origin        TEXT    NOT NULL CHECK (origin IN ('outbox', 'inbox')),
    event_id      TEXT    NOT NULL CHECK (length(event_id) = 36 AND event_id = lower(event_id)),
    event_type    TEXT    NOT NULL CHECK (length(event_type) BETWEEN 1 AND 100),
    topic         TEXT    NOT NULL CHECK (length(topic) BETWEEN 1 AND 255),
    attempts_made INTEGER NOT NULL,
    error         TEXT    NOT NULL CHECK (length(CAST(error AS BLOB)) <= 2000),
    event         TEXT    NOT NULL CHECK (json_valid(event) AND json_type(event) = 'object'),
    dead_at       TEXT    NOT NULL,
    replayed_at   TEXT
);
-- One open (not replayed) letter per event: a retried write keeps one; an
-- event replayed and failed again gets a new letter.
CREATE UNIQUE INDEX omnibox_dead_letters_open ON omnibox_dead_letters (origin, event_id)
    WHERE replayed_at IS NULL;
