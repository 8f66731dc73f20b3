-- omnibox schema, version 5: claims with filters. A relay dedicated to some
-- topics (`publish --topic T`) scans the due rows of those topics in
-- (scheduled_at, seq) order from this index instead of filtering the whole
-- due index; an inbox processor for some sources (`inbox process --source S
-- [--event-type E]`) likewise. Both are partial like the claim indexes: a
-- claimed row leaves them.
--
-- On a large table the index build holds the write lock for its duration:
-- run `omnibox migrate` in a quiet moment.
CREATE INDEX IF NOT EXISTS outbox_events_topic_due ON outbox_events (topic, scheduled_at, seq)
    WHERE status = 'pending' AND locked_at IS NULL;
CREATE INDEX IF NOT EXISTS inbox_events_source_due ON inbox_events (source, event_type, scheduled_at, seq)
    WHERE status = 'pending' AND locked_at IS NULL;
