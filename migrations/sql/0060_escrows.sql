-- Projection "wallets": every escrow hold by order, so that a seller's
-- pending incoming funds are derived (the open holds naming the seller's
-- wallet as payee) instead of written on the seller's wallet by every
-- checkout, which made all checkouts of one seller queue on one aggregate.
-- Written from the buyer's FundsHeld / HoldCaptured / HoldRefunded.
CREATE TABLE rm_escrows (
    order_id         uuid        PRIMARY KEY,
    payer_wallet_id  uuid        NOT NULL,
    payee_wallet_id  uuid        NOT NULL,
    amount           bigint      NOT NULL CHECK (amount > 0),
    status           text        NOT NULL CHECK (status IN ('open', 'captured', 'refunded')),
    held_at          timestamptz NOT NULL,
    settled_at       timestamptz
);
-- `GET /wallets/{id}` sums a payee's open escrows from this index alone.
CREATE INDEX rm_escrows_open_by_payee ON rm_escrows (payee_wallet_id) INCLUDE (amount)
    WHERE status = 'open';

-- The escrows the live projection applied before this table existed, from
-- its ledger (written in the same transactions, so at the same checkpoint).
INSERT INTO rm_escrows (order_id, payer_wallet_id, payee_wallet_id, amount, status, held_at,
                        settled_at)
SELECT held.order_id, held.wallet_id, held.counterparty_wallet_id, held.amount,
       CASE settled.kind WHEN 'HoldCaptured' THEN 'captured'
                         WHEN 'HoldRefunded' THEN 'refunded'
                         ELSE 'open' END,
       held.recorded_at, settled.recorded_at
  FROM rm_wallet_entries held
  LEFT JOIN rm_wallet_entries settled
    ON settled.wallet_id = held.wallet_id AND settled.order_id = held.order_id
   AND settled.kind IN ('HoldCaptured', 'HoldRefunded')
 WHERE held.kind = 'FundsHeld' AND held.order_id IS NOT NULL
   AND held.counterparty_wallet_id IS NOT NULL AND held.amount > 0
ON CONFLICT (order_id) DO NOTHING;
