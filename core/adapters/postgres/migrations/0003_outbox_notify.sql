-- Wake the outbox relay when events are staged, so it need not busy-poll. One notification per
-- statement (and PostgreSQL folds identical notifications within a transaction); it is delivered only
-- when the inserting transaction commits, so a rolled-back unit of work wakes nobody. The relay reads
-- the table itself: the payload is empty, and a lost notification only delays until its fallback poll.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cleanledger_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
