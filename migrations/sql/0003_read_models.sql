-- Read models, built by the projectors (projections crate) from the events
-- on JetStream, served by query-api. Every table here can be rebuilt from
-- the event store; none is a source of truth.

-- Where each projection's partition is: the last event it applied, and the
-- position up to which it has applied every event of its partition
-- (caught_up_to: also advanced while idle, from the relay's checkpoint, so
-- that read-your-writes can wait on partitions that see no new events).
CREATE TABLE projection_checkpoints (
    projection             text        NOT NULL,
    partition              integer     NOT NULL,
    transaction_id         bigint      NOT NULL DEFAULT 0,
    position               bigint      NOT NULL DEFAULT 0,
    caught_up_transaction  bigint      NOT NULL DEFAULT 0,
    caught_up_position     bigint      NOT NULL DEFAULT 0,
    events_applied         bigint      NOT NULL DEFAULT 0,
    last_event_recorded_at timestamptz,
    updated_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, partition)
);

-- Events a projection could not apply: parked here, counted in metrics and
-- shown by /projections, never silently skipped.
CREATE TABLE dead_letters (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection     text        NOT NULL,
    partition      integer     NOT NULL,
    event_id       uuid        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    event_type     text        NOT NULL,
    transaction_id bigint      NOT NULL,
    position       bigint      NOT NULL,
    error          text        NOT NULL,
    envelope       jsonb       NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (projection, event_id)
);

-- Projection "listings": Listing and Reservation events.
CREATE TABLE rm_listings (
    listing_id       uuid        PRIMARY KEY,
    seller_id        uuid        NOT NULL,
    product_id       uuid        NOT NULL,
    title            text        NOT NULL,
    description      text        NOT NULL,
    category         text        NOT NULL,
    subcategory      text,
    condition        text        NOT NULL,
    price_amount     bigint      NOT NULL,
    currency         text        NOT NULL,
    city             text        NOT NULL,
    country          text        NOT NULL,
    lat              double precision,
    lon              double precision,
    attributes       jsonb       NOT NULL DEFAULT '{}',
    images           jsonb       NOT NULL DEFAULT '[]',
    status           text        NOT NULL,
    payout_wallet_id uuid,
    stock            integer     NOT NULL DEFAULT 0,
    held             integer     NOT NULL DEFAULT 0,
    available        integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    version          bigint      NOT NULL
);
CREATE INDEX rm_listings_category ON rm_listings (category, listing_id);
CREATE INDEX rm_listings_seller ON rm_listings (seller_id, listing_id);
CREATE INDEX rm_listings_price ON rm_listings (price_amount, listing_id);

CREATE TABLE rm_reservations (
    hold_id    uuid        PRIMARY KEY,
    listing_id uuid        NOT NULL,
    holder_id  uuid        NOT NULL,
    quantity   integer     NOT NULL,
    status     text        NOT NULL, -- active, confirmed, released, expired
    expires_at timestamptz NOT NULL,
    order_id   uuid,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX rm_reservations_listing ON rm_reservations (listing_id, hold_id);

-- Projection "orders": Order events.
CREATE TABLE rm_orders (
    order_id            uuid        PRIMARY KEY,
    checkout_id         uuid        NOT NULL,
    buyer_id            uuid        NOT NULL,
    seller_id           uuid        NOT NULL,
    status              text        NOT NULL,
    payment_method      text        NOT NULL,
    total_amount        bigint      NOT NULL,
    currency            text        NOT NULL,
    lines               jsonb       NOT NULL,
    shipping_address    jsonb       NOT NULL,
    buyer_wallet_id     uuid,
    seller_wallet_id    uuid,
    carrier             text,
    tracking_number     text,
    reject_reason       text,
    cancel_reason       text,
    return_reason       text,
    escrow_released     boolean     NOT NULL DEFAULT false,
    rating              smallint,
    review_comment      text,
    placed_at           timestamptz NOT NULL,
    confirmed_at        timestamptz,
    shipped_at          timestamptz,
    delivered_at        timestamptz,
    completed_at        timestamptz,
    cancelled_at        timestamptz,
    returned_at         timestamptz,
    refunded_at         timestamptz,
    updated_at          timestamptz NOT NULL,
    version             bigint      NOT NULL
);
CREATE INDEX rm_orders_buyer ON rm_orders (buyer_id, order_id);
CREATE INDEX rm_orders_seller ON rm_orders (seller_id, order_id);

CREATE TABLE rm_seller_stats (
    seller_id                uuid   PRIMARY KEY,
    orders_placed            bigint NOT NULL DEFAULT 0,
    orders_confirmed         bigint NOT NULL DEFAULT 0,
    orders_shipped           bigint NOT NULL DEFAULT 0,
    orders_delivered         bigint NOT NULL DEFAULT 0,
    orders_cancelled         bigint NOT NULL DEFAULT 0,
    orders_returned          bigint NOT NULL DEFAULT 0,
    -- Σ (delivered_at - confirmed_at) over delivered orders, in seconds.
    fulfillment_seconds_sum  double precision NOT NULL DEFAULT 0,
    rating_sum               bigint NOT NULL DEFAULT 0,
    rating_count             bigint NOT NULL DEFAULT 0
);

-- Projection "wallets": Wallet events.
CREATE TABLE rm_wallets (
    wallet_id        uuid        PRIMARY KEY,
    owner_id         uuid        NOT NULL,
    currency         text        NOT NULL,
    available        bigint      NOT NULL DEFAULT 0,
    held             bigint      NOT NULL DEFAULT 0,
    pending_incoming bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    version          bigint      NOT NULL
);
CREATE INDEX rm_wallets_owner ON rm_wallets (owner_id, wallet_id);

-- One row per wallet event: the ledger, with the balances after it.
CREATE TABLE rm_wallet_entries (
    wallet_id         uuid        NOT NULL,
    sequence          bigint      NOT NULL,
    kind              text        NOT NULL, -- the event type
    amount            bigint      NOT NULL,
    available         bigint      NOT NULL,
    held              bigint      NOT NULL,
    pending_incoming  bigint      NOT NULL,
    order_id          uuid,
    reference         text,
    counterparty_wallet_id uuid,
    recorded_at       timestamptz NOT NULL,
    PRIMARY KEY (wallet_id, sequence)
);

-- Projection "timelines": ProductTimeline events.
CREATE TABLE rm_products (
    product_id  uuid        PRIMARY KEY,
    owner_id    uuid        NOT NULL,
    entries     bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE rm_timeline (
    product_id  uuid        NOT NULL,
    sequence    bigint      NOT NULL,
    kind        text        NOT NULL, -- an entry kind (listed, sold, ...) or story, ownership_transferred, customization_*
    data        jsonb       NOT NULL,
    actor_id    uuid,
    recorded_at timestamptz NOT NULL,
    PRIMARY KEY (product_id, sequence)
);
