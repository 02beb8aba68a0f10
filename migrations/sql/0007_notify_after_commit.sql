-- Writers no longer NOTIFY inside the transaction that inserts events.
--
-- A transaction that has queued a notification takes Postgres's single,
-- cluster-wide notification lock at COMMIT and keeps it through its WAL
-- flush, so the `events_notify` trigger of 0002 made every command commit
-- one after another. Under load that queue was the largest wait on the
-- write path, and a writer waiting in it holds the relay's horizon back.
-- Souk's event store now wakes the relay after the commit instead: in
-- process directly, and with a `NOTIFY souk_events` sent in a transaction
-- of its own (which writes nothing and flushes nothing) when the relay
-- leads elsewhere. The relay still polls, so other writers are seen too.
DROP TRIGGER events_notify ON events;
DROP FUNCTION souk_notify_events();
