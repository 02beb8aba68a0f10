-- The relay publishes committed events to NATS JetStream in global order.

-- Writers wake the relay after commit (LISTEN souk_events); it also polls,
-- so a lost notification only delays it. One notification per statement,
-- not per row, and Postgres folds identical ones within a transaction.
CREATE FUNCTION souk_notify_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('souk_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION souk_notify_events();

-- How far each relay (one per JetStream stream) has published: the last
-- event whose publish JetStream acknowledged, as (transaction_id, position).
CREATE TABLE relay_checkpoints (
    stream         text        PRIMARY KEY,
    transaction_id bigint      NOT NULL,
    position       bigint      NOT NULL,
    published      bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
