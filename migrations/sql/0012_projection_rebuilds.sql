-- Rebuilds in progress. A rebuild replays the global order into a schema
-- aside; each of its batches commits the rows it wrote together with this
-- row's position, so a rebuild that was killed resumes exactly where its last
-- batch ended (`replay-tool rebuild` again), or is dropped (`--abandon`) or
-- started over (`--restart`). The row is deleted in the swap's transaction.
CREATE TABLE projection_rebuilds (
    projection     text        PRIMARY KEY,
    schema_name    text        NOT NULL,
    transaction_id bigint      NOT NULL DEFAULT 0,
    position       bigint      NOT NULL DEFAULT 0,
    events_read    bigint      NOT NULL DEFAULT 0,
    events_applied bigint      NOT NULL DEFAULT 0,
    events_parked  bigint      NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
