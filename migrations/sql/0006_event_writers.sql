-- Readers of the global order wait only for transactions that write events.
--
-- Until now a reader took only events of transactions older than the oldest
-- transaction still running in the whole cluster (pg_snapshot_xmin). Every
-- transaction that writes anything counts there: a projector's batch, the
-- search feed, a report in another database. They held the relay back for as
-- long as they ran, though none of them can ever add an event.
--
-- So a transaction that inserts events now announces itself: before its
-- first insert into `events`, and before it has a transaction id, it takes
-- a shared advisory lock (keys 1399813483 and 1, the two-key form) that it
-- holds until it ends. A reader (event-store's global.rs) looks up the
-- holders of that lock and waits only for their transaction ids. "Before it
-- has a transaction id" is what makes that safe: a writer the reader did not
-- see holding the lock can only get an id newer than the reader's snapshot.
--
-- The trigger takes the lock itself, so a transaction whose first write is
-- an insert into `events` needs nothing more. A transaction that wrote
-- something else first already has an id it did not announce: its insert
-- into `events` is refused.
CREATE FUNCTION souk_join_event_writers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('souk.event_writer', true) IS DISTINCT FROM 'on' THEN
        IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
            RAISE EXCEPTION 'events must be the first write of their transaction'
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'insert into events before writing anything else in the transaction';
        END IF;
        PERFORM pg_advisory_xact_lock_shared(1399813483, 1);
        -- Transaction-local: it ends, or is undone with a rolled-back
        -- savepoint, together with the lock.
        PERFORM set_config('souk.event_writer', 'on', true);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_join_writers
    BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION souk_join_event_writers();
