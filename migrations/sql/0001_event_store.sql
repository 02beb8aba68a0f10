-- The event store. The first seven columns are postgres-es's own layout, so its
-- repository can still read this table; the rest are Souk's additions.
CREATE TABLE events (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL CHECK (sequence >= 1),
    event_type     text   NOT NULL,
    event_version  text   NOT NULL,
    -- json (not jsonb) keeps the exact bytes that were hashed.
    payload        json   NOT NULL,
    metadata       json   NOT NULL,
    -- Global position: taken from a sequence at INSERT, so it becomes visible
    -- at COMMIT, possibly after larger positions. Readers of the global order
    -- therefore order by (transaction_id, position) and only read transactions
    -- older than the oldest one still running (see event-store's global.rs).
    position       bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    event_id       uuid        NOT NULL DEFAULT gen_random_uuid(),
    -- Per-aggregate hash chain: hash = sha256(prev_hash || canonical event).
    prev_hash      bytea       NOT NULL,
    hash           bytea       NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE INDEX events_global_order ON events (transaction_id, position);
CREATE UNIQUE INDEX events_event_id ON events (event_id);

-- Append-only: the database itself refuses to change or remove an event.
CREATE FUNCTION souk_refuse_event_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION souk_refuse_event_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION souk_refuse_event_change();

-- One snapshot per aggregate: its state after `last_sequence` events. A
-- snapshot is a cache: deleting the table loses nothing.
CREATE TABLE snapshots (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    last_sequence  bigint      NOT NULL CHECK (last_sequence >= 1),
    last_hash      bytea       NOT NULL,
    payload        jsonb       NOT NULL,
    -- The aggregate's Decide::STATE_VERSION when the snapshot was taken.
    state_version  integer     NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- The response of every accepted command that carried an Idempotency-Key (or
-- a deterministic command id), written in the transaction of its events.
CREATE TABLE idempotency (
    scope        text        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    status       smallint    NOT NULL,
    response     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- Durable timers of the process managers (reservation expiry, escrow
-- auto-release). A timer is written in the transaction that arms it and
-- deleted in the transaction that fires it.
CREATE TABLE timers (
    timer_id     uuid        PRIMARY KEY,
    kind         text        NOT NULL,
    due_at       timestamptz NOT NULL,
    payload      jsonb       NOT NULL,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text
);

CREATE INDEX timers_due ON timers (due_at);
