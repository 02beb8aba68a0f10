-- What operators did about dead letters, for auditors: every retry and every
-- skip, with who (the name given to replay-tool and the database user), when
-- and why. Append-only, like the events. A skipped event leaves
-- `dead_letters` and stays here; `replay-tool verify` lists the skips.
CREATE TABLE dead_letter_actions (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection     text        NOT NULL,
    event_id       uuid        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    event_type     text        NOT NULL,
    transaction_id bigint      NOT NULL,
    position       bigint      NOT NULL,
    action         text        NOT NULL CHECK (action IN ('retried', 'skipped')),
    -- A retry: 'applied', or 'refused' (the letter stays, with the new error).
    outcome        text        NOT NULL,
    -- The error the event was parked with.
    error          text        NOT NULL,
    operator       text        NOT NULL,
    db_user        text        NOT NULL DEFAULT current_user,
    reason         text,
    acted_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letter_actions_event ON dead_letter_actions (projection, event_id);

CREATE FUNCTION souk_refuse_history_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER dead_letter_actions_append_only
    BEFORE UPDATE OR DELETE ON dead_letter_actions
    FOR EACH ROW EXECUTE FUNCTION souk_refuse_history_change();

CREATE TRIGGER dead_letter_actions_no_truncate
    BEFORE TRUNCATE ON dead_letter_actions
    FOR EACH STATEMENT EXECUTE FUNCTION souk_refuse_history_change();

-- How often a letter was retried in vain, and when last.
ALTER TABLE dead_letters
    ADD COLUMN attempts      integer     NOT NULL DEFAULT 0,
    ADD COLUMN last_retry_at timestamptz;
