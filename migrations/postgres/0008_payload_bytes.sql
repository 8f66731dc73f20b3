-- omnibox schema, version 8: each row's payload size, for claims bounded by
-- bytes (`publish --batch-bytes`, `inbox process --batch-bytes`;
-- docs/design.md, "The claim"). The size of the payload as compact JSON
-- text, written by omnibox's inserts; a row written by other means leaves
-- it NULL, and the claim then measures the payload itself (slower: it
-- renders the JSON). Adding a nullable column without a default changes no
-- row: it takes a moment whatever the table's size.
ALTER TABLE outbox_events ADD COLUMN payload_bytes integer;
ALTER TABLE inbox_events ADD COLUMN payload_bytes integer;
