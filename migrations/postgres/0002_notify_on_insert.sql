-- omnibox schema, version 2: wake idle relays and processors on insert.
-- One notification per INSERT statement (not per row), on channel
-- omnibox_outbox or omnibox_inbox, with the table's schema as payload.
-- Notifications are delivered at commit, so a relay never wakes for rows it
-- cannot see yet.

CREATE FUNCTION omnibox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_events_notify AFTER INSERT ON outbox_events
    FOR EACH STATEMENT EXECUTE FUNCTION omnibox_notify('omnibox_outbox');

CREATE TRIGGER inbox_events_notify AFTER INSERT ON inbox_events
    FOR EACH STATEMENT EXECUTE FUNCTION omnibox_notify('omnibox_inbox');
