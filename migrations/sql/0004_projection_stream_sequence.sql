-- Where each projection partition resumes reading its JetStream stream: the
-- stream sequence of the last message it committed. Only a hint for where
-- to point the consumer after a restart; which events were applied is
-- decided by position (transaction_id, position), never by this number.
ALTER TABLE projection_checkpoints
    ADD COLUMN stream_sequence bigint NOT NULL DEFAULT 0;
