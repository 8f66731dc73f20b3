-- omnibox schema, version 4: failed rows in insertion order, so `list
-- --status failed` and its paging read only them (`seq` is the rowid, so
-- plain listing is already in index order).
CREATE INDEX IF NOT EXISTS outbox_events_failed_seq ON outbox_events (seq) WHERE status = 'failed';
CREATE INDEX IF NOT EXISTS inbox_events_failed_seq ON inbox_events (seq) WHERE status = 'failed';
