//! Projection "wallets": Wallet events into `rm_wallets` (the balances now),
//! `rm_wallet_entries` (the ledger: one row per event, with the balances
//! after it) and `rm_escrows` (every escrow hold by order: open, captured or
//! refunded).
//!
//! Each Wallet event carries the balances it changed (`available` after a
//! deposit, `held` after a capture, ...); the others are the wallet's row as
//! it was, so an entry always shows all three balances after its event.
//!
//! A seller's pending incoming funds are derived: the open escrows naming
//! the seller's wallet as payee, summed when `GET /wallets/{id}` reads them.
//! Checkouts no longer write the seller's wallet; `pending_incoming` in
//! `rm_wallets` and the entries is the wallet aggregate's own, which only
//! logs written before that change move (their `IncomingExpected` mirrors a
//! buyer's `FundsHeld`, which is in `rm_escrows` too, so it is not counted
//! twice). An escrow row is created by its `FundsHeld` and settled once by
//! `HoldCaptured` or `HoldRefunded`; an event applied again changes nothing
//! (a held escrow already known is kept, a settled one stays settled).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use domain::wallet::WalletEvent;
use event_store::global::RecordedEvent;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::engine::{ApplyError, Refused, aggregate_uuid, parse_event};
use crate::rows::{self, Table};

pub(crate) const WALLETS: Table = Table {
    name: "rm_wallets",
    key: &["wallet_id"],
    columns: &[
        "wallet_id",
        "owner_id",
        "currency",
        "available",
        "held",
        "pending_incoming",
        "created_at",
        "updated_at",
        "version",
    ],
};

pub(crate) const ENTRIES: Table = Table {
    name: "rm_wallet_entries",
    key: &["wallet_id", "sequence"],
    columns: &[
        "wallet_id",
        "sequence",
        "kind",
        "amount",
        "available",
        "held",
        "pending_incoming",
        "order_id",
        "reference",
        "counterparty_wallet_id",
        "recorded_at",
    ],
};

pub(crate) const ESCROWS: Table = Table {
    name: "rm_escrows",
    key: &["order_id"],
    columns: &[
        "order_id",
        "payer_wallet_id",
        "payee_wallet_id",
        "amount",
        "status",
        "held_at",
        "settled_at",
    ],
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EscrowRow {
    order_id: Uuid,
    payer_wallet_id: Uuid,
    payee_wallet_id: Uuid,
    amount: i64,
    /// `open`, `captured` or `refunded`.
    status: String,
    held_at: DateTime<Utc>,
    settled_at: Option<DateTime<Utc>>,
}

/// What one event does to an escrow row.
enum EscrowChange {
    Held {
        order_id: Uuid,
        payee: Uuid,
        amount: i64,
    },
    Settled {
        order_id: Uuid,
        status: &'static str,
    },
}

fn escrow_change(payload: &WalletEvent) -> Option<EscrowChange> {
    match payload {
        WalletEvent::FundsHeld {
            order_id,
            amount,
            payee_wallet,
            ..
        } => Some(EscrowChange::Held {
            order_id: order_id.as_uuid(),
            payee: payee_wallet.as_uuid(),
            amount: *amount,
        }),
        WalletEvent::HoldCaptured { order_id, .. } => Some(EscrowChange::Settled {
            order_id: order_id.as_uuid(),
            status: "captured",
        }),
        WalletEvent::HoldRefunded { order_id, .. } => Some(EscrowChange::Settled {
            order_id: order_id.as_uuid(),
            status: "refunded",
        }),
        _ => None,
    }
}

/// Applies `change` (of wallet `payer`'s event) to the escrows in memory;
/// returns the order whose row changed.
fn apply_escrow(
    escrows: &mut HashMap<Uuid, EscrowRow>,
    payer: Uuid,
    event: &RecordedEvent,
    change: EscrowChange,
) -> Option<Uuid> {
    match change {
        EscrowChange::Held {
            order_id,
            payee,
            amount,
        } => {
            if escrows.contains_key(&order_id) {
                return None;
            }
            escrows.insert(
                order_id,
                EscrowRow {
                    order_id,
                    payer_wallet_id: payer,
                    payee_wallet_id: payee,
                    amount,
                    status: "open".to_owned(),
                    held_at: event.recorded_at,
                    settled_at: None,
                },
            );
            Some(order_id)
        }
        EscrowChange::Settled { order_id, status } => {
            let row = escrows
                .get_mut(&order_id)
                .filter(|row| row.status == "open" && row.payer_wallet_id == payer)?;
            row.status = status.to_owned();
            row.settled_at = Some(event.recorded_at);
            Some(order_id)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WalletRow {
    wallet_id: Uuid,
    owner_id: Uuid,
    currency: String,
    available: i64,
    held: i64,
    pending_incoming: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EntryRow {
    wallet_id: Uuid,
    sequence: i64,
    kind: String,
    amount: i64,
    available: i64,
    held: i64,
    pending_incoming: i64,
    order_id: Option<Uuid>,
    reference: Option<String>,
    counterparty_wallet_id: Option<Uuid>,
    recorded_at: DateTime<Utc>,
}

/// What one event changes, before it is applied to the row.
#[derive(Debug, Default)]
struct Change {
    amount: i64,
    available: Option<i64>,
    held: Option<i64>,
    pending_incoming: Option<i64>,
    order_id: Option<Uuid>,
    reference: Option<String>,
    counterparty: Option<Uuid>,
}

pub(crate) async fn apply(
    conn: &mut PgConnection,
    schema: &str,
    events: &[&RecordedEvent],
) -> Result<Vec<Refused>, sqlx::Error> {
    let mut refused = Vec::new();
    let mut parsed = Vec::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        match aggregate_uuid(event).and_then(|id| Ok((id, parse_event::<WalletEvent>(event)?))) {
            Ok((wallet_id, payload)) => parsed.push((index, *event, wallet_id, payload)),
            Err(why) => refused.push((index, why)),
        }
    }
    let mut ids: Vec<Uuid> = parsed.iter().map(|(_, _, id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut wallets: HashMap<Uuid, WalletRow> =
        rows::load::<WalletRow>(conn, schema, &WALLETS, "wallet_id", &ids)
            .await?
            .into_iter()
            .map(|row| (row.wallet_id, row))
            .collect();
    let mut orders: Vec<Uuid> = parsed
        .iter()
        .filter_map(|(_, _, _, payload)| match escrow_change(payload)? {
            EscrowChange::Held { order_id, .. } | EscrowChange::Settled { order_id, .. } => {
                Some(order_id)
            }
        })
        .collect();
    orders.sort_unstable();
    orders.dedup();
    let mut escrows: HashMap<Uuid, EscrowRow> =
        rows::load::<EscrowRow>(conn, schema, &ESCROWS, "order_id", &orders)
            .await?
            .into_iter()
            .map(|row| (row.order_id, row))
            .collect();
    let mut changed: Vec<Uuid> = Vec::new();
    let mut changed_escrows: Vec<Uuid> = Vec::new();
    let mut entries = Vec::new();
    for (index, event, wallet_id, payload) in parsed {
        let escrow = escrow_change(&payload);
        match apply_one(wallets.get(&wallet_id), wallet_id, event, payload) {
            Ok((row, entry)) => {
                wallets.insert(wallet_id, row);
                changed.push(wallet_id);
                entries.push(entry);
                if let Some(order_id) =
                    escrow.and_then(|change| apply_escrow(&mut escrows, wallet_id, event, change))
                {
                    changed_escrows.push(order_id);
                }
            }
            Err(why) => refused.push((index, why)),
        }
    }
    changed.sort_unstable();
    changed.dedup();
    changed_escrows.sort_unstable();
    changed_escrows.dedup();
    let rows: Vec<&WalletRow> = changed.iter().filter_map(|id| wallets.get(id)).collect();
    rows::upsert(conn, schema, &WALLETS, &rows).await?;
    rows::insert(conn, schema, &ENTRIES, &entries).await?;
    let escrow_rows: Vec<&EscrowRow> = changed_escrows
        .iter()
        .filter_map(|id| escrows.get(id))
        .collect();
    rows::upsert(conn, schema, &ESCROWS, &escrow_rows).await?;
    Ok(refused)
}

/// The wallet's row and its ledger entry after `payload`, or why it cannot
/// be applied. `current` is the row before it (`None`: no wallet yet).
fn apply_one(
    current: Option<&WalletRow>,
    wallet_id: Uuid,
    event: &RecordedEvent,
    payload: WalletEvent,
) -> Result<(WalletRow, EntryRow), ApplyError> {
    let mut row = match (&payload, current) {
        (WalletEvent::WalletOpened { .. }, Some(_)) => {
            return Err(ApplyError::new(format!(
                "wallet {wallet_id} was already opened"
            )));
        }
        (
            WalletEvent::WalletOpened {
                wallet_id: opened,
                owner,
                currency,
            },
            None,
        ) => {
            if opened.as_uuid() != wallet_id {
                return Err(ApplyError::new(format!(
                    "WalletOpened names wallet {opened} in the stream of {wallet_id}"
                )));
            }
            WalletRow {
                wallet_id,
                owner_id: owner.as_uuid(),
                currency: currency.as_str().to_owned(),
                available: 0,
                held: 0,
                pending_incoming: 0,
                created_at: event.recorded_at,
                updated_at: event.recorded_at,
                version: event.sequence,
            }
        }
        (_, None) => {
            return Err(ApplyError::new(format!(
                "{} for wallet {wallet_id}, which was never opened",
                event.event_type
            )));
        }
        (_, Some(row)) => row.clone(),
    };
    let change = change_of(payload);
    if let Some(available) = change.available {
        row.available = available;
    }
    if let Some(held) = change.held {
        row.held = held;
    }
    if let Some(pending_incoming) = change.pending_incoming {
        row.pending_incoming = pending_incoming;
    }
    if row.available < 0 || row.held < 0 || row.pending_incoming < 0 {
        return Err(ApplyError::new(format!(
            "{} would leave wallet {wallet_id} with a negative balance",
            event.event_type
        )));
    }
    row.updated_at = event.recorded_at;
    row.version = event.sequence;
    let entry = EntryRow {
        wallet_id,
        sequence: event.sequence,
        kind: event.event_type.clone(),
        amount: change.amount,
        available: row.available,
        held: row.held,
        pending_incoming: row.pending_incoming,
        order_id: change.order_id,
        reference: change.reference,
        counterparty_wallet_id: change.counterparty,
        recorded_at: event.recorded_at,
    };
    Ok((row, entry))
}

fn change_of(payload: WalletEvent) -> Change {
    match payload {
        WalletEvent::WalletOpened { .. } => Change::default(),
        WalletEvent::FundsDeposited {
            amount,
            reference,
            available,
        }
        | WalletEvent::FundsWithdrawn {
            amount,
            reference,
            available,
        } => Change {
            amount,
            available: Some(available),
            reference: Some(reference.as_str().to_owned()),
            ..Change::default()
        },
        WalletEvent::FundsHeld {
            order_id,
            amount,
            payee_wallet,
            available,
            held,
            ..
        } => Change {
            amount,
            available: Some(available),
            held: Some(held),
            order_id: Some(order_id.as_uuid()),
            counterparty: Some(payee_wallet.as_uuid()),
            ..Change::default()
        },
        WalletEvent::IncomingExpected {
            order_id,
            amount,
            payer_wallet,
            pending_incoming,
        } => Change {
            amount,
            pending_incoming: Some(pending_incoming),
            order_id: Some(order_id.as_uuid()),
            counterparty: Some(payer_wallet.as_uuid()),
            ..Change::default()
        },
        WalletEvent::HoldCaptured {
            order_id,
            amount,
            payee_wallet,
            held,
        } => Change {
            amount,
            held: Some(held),
            order_id: Some(order_id.as_uuid()),
            counterparty: Some(payee_wallet.as_uuid()),
            ..Change::default()
        },
        WalletEvent::EscrowReceived {
            order_id,
            amount,
            payer_wallet,
            available,
            pending_incoming,
        } => Change {
            amount,
            available: Some(available),
            pending_incoming: Some(pending_incoming),
            order_id: Some(order_id.as_uuid()),
            counterparty: Some(payer_wallet.as_uuid()),
            ..Change::default()
        },
        WalletEvent::HoldRefunded {
            order_id,
            amount,
            available,
            held,
        } => Change {
            amount,
            available: Some(available),
            held: Some(held),
            order_id: Some(order_id.as_uuid()),
            ..Change::default()
        },
        WalletEvent::IncomingCancelled {
            order_id,
            amount,
            pending_incoming,
        } => Change {
            amount,
            pending_incoming: Some(pending_incoming),
            order_id: Some(order_id.as_uuid()),
            ..Change::default()
        },
        WalletEvent::PaymentReturned {
            order_id,
            amount,
            to_wallet,
            available,
        } => Change {
            amount,
            available: Some(available),
            order_id: Some(order_id.as_uuid()),
            counterparty: Some(to_wallet.as_uuid()),
            ..Change::default()
        },
        WalletEvent::RefundReceived {
            order_id,
            amount,
            from_wallet,
            available,
        } => Change {
            amount,
            available: Some(available),
            order_id: Some(order_id.as_uuid()),
            counterparty: Some(from_wallet.as_uuid()),
            ..Change::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::assert_columns_match;

    #[test]
    fn rows_carry_exactly_the_columns_of_their_tables() {
        let now = Utc::now();
        assert_columns_match(
            &WALLETS,
            &WalletRow {
                wallet_id: Uuid::nil(),
                owner_id: Uuid::nil(),
                currency: "EUR".into(),
                available: 0,
                held: 0,
                pending_incoming: 0,
                created_at: now,
                updated_at: now,
                version: 1,
            },
        );
        assert_columns_match(
            &ENTRIES,
            &EntryRow {
                wallet_id: Uuid::nil(),
                sequence: 1,
                kind: "WalletOpened".into(),
                amount: 0,
                available: 0,
                held: 0,
                pending_incoming: 0,
                order_id: None,
                reference: None,
                counterparty_wallet_id: None,
                recorded_at: now,
            },
        );
        assert_columns_match(
            &ESCROWS,
            &EscrowRow {
                order_id: Uuid::nil(),
                payer_wallet_id: Uuid::nil(),
                payee_wallet_id: Uuid::nil(),
                amount: 1,
                status: "open".into(),
                held_at: now,
                settled_at: None,
            },
        );
    }
}
