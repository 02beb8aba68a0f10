-- Souk past one machine: which JetStream streams this database feeds, and
-- how their subjects are partitioned. A stream is bound to one database (its
-- description names the database's id) and its partition count is fixed
-- once events flow: the relay and every projector check both at start and
-- refuse a mismatch instead of silently splitting the work another way.

-- This database's identity, written once.
CREATE TABLE database_identity (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    database_id uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO database_identity DEFAULT VALUES;

-- The streams this database feeds, with the partition count the first
-- relay or projector bound them to.
CREATE TABLE stream_bindings (
    stream     text        PRIMARY KEY,
    partitions integer     NOT NULL CHECK (partitions > 0),
    bound_at   timestamptz NOT NULL DEFAULT now()
);
