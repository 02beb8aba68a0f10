-- The search index's to-do list: the listings whose search document may be
-- behind rm_listings. The live "listings" projection upserts a row in the
-- transaction of the batch that changed the listing, so a change is either
-- here or already indexed, never neither. The search indexer reads rows with
-- their rm_listings row, writes the documents, makes them durable, and only
-- then deletes each row whose `seq` it read (a row changed meanwhile got a
-- new `seq` and stays).
--
-- (transaction_id, position) is the earliest change not yet indexed: a read
-- that must include position P waits while any row is at or before P.
CREATE SEQUENCE search_pending_seq;

CREATE TABLE search_pending (
    listing_id     uuid   PRIMARY KEY,
    transaction_id bigint NOT NULL,
    position       bigint NOT NULL,
    seq            bigint NOT NULL DEFAULT nextval('search_pending_seq')
);
CREATE INDEX search_pending_position ON search_pending (transaction_id, position);
