-- omnibox schema, version 4: every claim records its own lease.
--
-- `locked_until` is the lock's expiry, written by the claim from the
-- claimer's own lease (and pushed forward while a slow batch is in flight).
-- Any claimer may take a row once `locked_until` has passed, whatever its
-- own lease setting. Relays of an older version must be stopped before this
-- migration: they do not write `locked_until`.
ALTER TABLE outbox_events ADD COLUMN locked_until timestamptz;
ALTER TABLE inbox_events ADD COLUMN locked_until timestamptz;

-- Rows locked when the migration runs keep the old default lease (5 minutes).
UPDATE outbox_events SET locked_until = locked_at + interval '5 minutes' WHERE locked_at IS NOT NULL;
UPDATE inbox_events SET locked_until = locked_at + interval '5 minutes' WHERE locked_at IS NOT NULL;

ALTER TABLE outbox_events ADD CONSTRAINT outbox_events_lease_consistency
    CHECK ((locked_at IS NULL) = (locked_until IS NULL) AND (locked_until IS NULL OR locked_until >= locked_at));
ALTER TABLE inbox_events ADD CONSTRAINT inbox_events_lease_consistency
    CHECK ((locked_at IS NULL) = (locked_until IS NULL) AND (locked_until IS NULL OR locked_until >= locked_at));

-- Lease expiry (the claim's second source) and stale-lock reports: the
-- locked rows by expiry. Few rows: only what relays hold right now.
DROP INDEX outbox_events_locked;
CREATE INDEX outbox_events_locked ON outbox_events (locked_until) WHERE locked_until IS NOT NULL;
DROP INDEX inbox_events_locked;
CREATE INDEX inbox_events_locked ON inbox_events (locked_until) WHERE locked_until IS NOT NULL;
