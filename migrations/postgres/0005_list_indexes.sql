-- omnibox schema, version 5: listing by insertion order without reading
-- the table. `list` (and `list --after SEQ`, its paging) reads rows in `seq`
-- order: without an index it scanned and sorted the whole table. Failed
-- rows get their own small index in `seq` order (they are rare, and listing
-- or paging through them must not walk millions of completed rows).
--
-- On a large table the index build holds a write lock for its duration
-- (about 10 s per 10 million rows on a small machine): run `omnibox migrate`
-- in a quiet moment, or create the indexes beforehand with CREATE INDEX
-- CONCURRENTLY under these names (IF NOT EXISTS then skips them).
CREATE INDEX IF NOT EXISTS outbox_events_seq ON outbox_events (seq);
CREATE INDEX IF NOT EXISTS outbox_events_failed_seq ON outbox_events (seq) WHERE status = 'failed';
CREATE INDEX IF NOT EXISTS inbox_events_seq ON inbox_events (seq);
CREATE INDEX IF NOT EXISTS inbox_events_failed_seq ON inbox_events (seq) WHERE status = 'failed';
