-- omnibox schema, version 3 (SQLite): every claim records its own lease.
--
-- `locked_until` is the lock's expiry, written by the claim from the
-- claimer's own lease (and pushed forward while a slow batch is in flight).
-- Any claimer may take a row once `locked_until` has passed, whatever its
-- own lease setting.
ALTER TABLE outbox_events ADD COLUMN locked_until TEXT
    CHECK (locked_until GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z');
ALTER TABLE inbox_events ADD COLUMN locked_until TEXT
    CHECK (locked_until GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z');

-- Rows locked when the migration runs keep the old default lease (5 minutes),
-- in the fixed-width text form (the fraction of locked_at is kept).
UPDATE outbox_events
   SET locked_until = strftime('%Y-%m-%dT%H:%M:%S', locked_at, '+300 seconds') || substr(locked_at, 20)
 WHERE locked_at IS NOT NULL;
UPDATE inbox_events
   SET locked_until = strftime('%Y-%m-%dT%H:%M:%S', locked_at, '+300 seconds') || substr(locked_at, 20)
 WHERE locked_at IS NOT NULL;

-- A table CHECK cannot be added to an existing SQLite table: triggers keep
-- locked_at and locked_until set together.
CREATE TRIGGER outbox_events_lease_insert BEFORE INSERT ON outbox_events
    WHEN (NEW.locked_at IS NULL) <> (NEW.locked_until IS NULL) OR NEW.locked_until < NEW.locked_at
BEGIN SELECT RAISE(ABORT, 'locked_at and locked_until must be set together, locked_until not before locked_at'); END;
CREATE TRIGGER outbox_events_lease_update BEFORE UPDATE OF locked_at, locked_until ON outbox_events
    WHEN (NEW.locked_at IS NULL) <> (NEW.locked_until IS NULL) OR NEW.locked_until < NEW.locked_at
BEGIN SELECT RAISE(ABORT, 'locked_at and locked_until must be set together, locked_until not before locked_at'); END;
CREATE TRIGGER inbox_events_lease_insert BEFORE INSERT ON inbox_events
    WHEN (NEW.locked_at IS NULL) <> (NEW.locked_until IS NULL) OR NEW.locked_until < NEW.locked_at
BEGIN SELECT RAISE(ABORT, 'locked_at and locked_until must be set together, locked_until not before locked_at'); END;
CREATE TRIGGER inbox_events_lease_update BEFORE UPDATE OF locked_at, locked_until ON inbox_events
    WHEN (NEW.locked_at IS NULL) <> (NEW.locked_until IS NULL) OR NEW.locked_until < NEW.locked_at
BEGIN SELECT RAISE(ABORT, 'locked_at and locked_until must be set together, locked_until not before locked_at'); END;

DROP INDEX outbox_events_locked;
CREATE INDEX outbox_events_locked ON outbox_events (locked_until) WHERE locked_until IS NOT NULL;
DROP INDEX inbox_events_locked;
CREATE INDEX inbox_events_locked ON inbox_events (locked_until) WHERE locked_until IS NOT NULL;
