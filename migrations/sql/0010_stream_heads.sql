-- Stream heads: the last sequence and hash of every aggregate, written by the
-- database itself in the statement that appends the events.
--
-- A hash chain proves that what is there was not altered, removed from the
-- middle or reordered; it cannot see events cut from the end of a stream, or
-- a whole stream removed, because what remains is still a valid chain. The
-- head of each stream, kept apart from the events and advanced by the same
-- statement that appends them, remembers how far every chain went:
-- `replay-tool verify` checks each chain ends exactly at its head, and that
-- every head still has its chain.
--
-- The head is written by an AFTER INSERT statement trigger over the inserted
-- rows (a transition table), so a plain command's single INSERT statement,
-- outside an explicit transaction, still appends and advances the head
-- atomically, and a batch of many events costs one upsert, not one per row.
-- The table refuses every write that does not come from that trigger.
CREATE TABLE stream_heads (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL CHECK (sequence >= 1),
    hash           bytea  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

INSERT INTO stream_heads (aggregate_type, aggregate_id, sequence, hash)
SELECT DISTINCT ON (aggregate_type, aggregate_id) aggregate_type, aggregate_id, sequence, hash
  FROM events
 ORDER BY aggregate_type, aggregate_id, sequence DESC;

CREATE FUNCTION souk_advance_stream_heads() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stream_heads AS h (aggregate_type, aggregate_id, sequence, hash)
    SELECT DISTINCT ON (aggregate_type, aggregate_id) aggregate_type, aggregate_id, sequence, hash
      FROM souk_new_events
     ORDER BY aggregate_type, aggregate_id, sequence DESC
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
       SET sequence = excluded.sequence, hash = excluded.hash
     WHERE h.sequence < excluded.sequence;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_stream_heads
    AFTER INSERT ON events
    REFERENCING NEW TABLE AS souk_new_events
    FOR EACH STATEMENT EXECUTE FUNCTION souk_advance_stream_heads();

-- Only the trigger above writes heads (it runs one trigger level deeper than
-- any statement a client sends); a head never moves back and is never removed.
CREATE FUNCTION souk_guard_stream_heads() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'stream_heads is written only by appending events: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.sequence <= OLD.sequence THEN
        RAISE EXCEPTION 'a stream head never moves back'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER stream_heads_guard
    BEFORE INSERT OR UPDATE OR DELETE ON stream_heads
    FOR EACH ROW EXECUTE FUNCTION souk_guard_stream_heads();

CREATE TRIGGER stream_heads_no_truncate
    BEFORE TRUNCATE ON stream_heads
    FOR EACH STATEMENT EXECUTE FUNCTION souk_refuse_event_change();
