//! The Wallet aggregate: one user's money in one currency, and the escrow
//! that moves it from a buyer to a seller.
//!
//! Three balances, in minor units, none ever negative:
//! - `available`: what the owner may spend or withdraw;
//! - `held`: escrow locked on the buyer's side, one hold per order;
//! - `pending_incoming`: escrow a seller was told to expect by checkouts
//!   recorded before pending funds became a read model (legacy; see below).
//!
//! An escrow is driven by Souk's journeys. Checkout writes only the buyer's
//! side (`HoldFunds`): the seller's wallet is not touched, so the checkouts
//! of one seller do not queue on one aggregate. What a seller will receive
//! (the `pending_incoming` the query API serves) is derived from the open
//! holds naming the seller's wallet as payee (the `wallets` projection's
//! `rm_escrows`). The seller's wallet is written once, when the escrow is
//! captured: `CaptureHold` on the buyer's side with `ReceiveEscrow` on the
//! seller's, which credits the amount to available. A refund is
//! `RefundHold` alone. Each side settles an order exactly once and
//! remembers that it did, so a replayed step is refused instead of paying
//! twice; pending funds are never in `available`, so they cannot be
//! withdrawn.
//!
//! Logs written before that change also hold the seller's side of each
//! checkout: `IncomingExpected` (and later `EscrowReceived` from it or
//! `IncomingCancelled`). Those still apply exactly as they did, so an old
//! log replays to the same balances; `FundsHeld` of that time (version 1)
//! reads as `incoming_expected: true`, which lets the auditor pair each such
//! hold with its expected escrow. An order whose seller side is such a
//! legacy entry is settled through it (`ReceiveEscrow` takes the entry,
//! `CancelIncoming` drops it).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::values::{
    Actor, Currency, MAX_AMOUNT, Money, OrderId, Reference, Role, UserId, WalletId,
};
use crate::{Aggregate, Decide, DecodeError, DomainError, DomainEvent, Refusal};

/// Escrow locked in a buyer's wallet for one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowHold {
    pub amount: i64,
    pub payee_wallet: WalletId,
    /// Whether the payee's wallet also recorded it as expected incoming
    /// (holds placed before pending funds became a read model).
    #[serde(default)]
    pub incoming_expected: bool,
}

/// Escrow a seller's wallet expects for one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    pub amount: i64,
    pub payer_wallet: WalletId,
}

/// State of one wallet. Meaningful only once [`Decide::exists`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Wallet {
    opened: bool,
    wallet_id: WalletId,
    owner: UserId,
    currency: Currency,
    available: i64,
    held: i64,
    pending_incoming: i64,
    holds: BTreeMap<OrderId, EscrowHold>,
    incoming: BTreeMap<OrderId, Incoming>,
    settled_holds: BTreeSet<OrderId>,
    settled_incoming: BTreeSet<OrderId>,
    /// Orders whose payment this (seller's) wallet gave back after a return.
    #[serde(default)]
    returned_payments: BTreeSet<OrderId>,
    /// Orders whose refund this (buyer's) wallet received after a return.
    #[serde(default)]
    received_refunds: BTreeSet<OrderId>,
}

impl Wallet {
    pub fn wallet_id(&self) -> WalletId {
        self.wallet_id
    }

    pub fn owner(&self) -> UserId {
        self.owner
    }

    pub fn currency(&self) -> &Currency {
        &self.currency
    }

    /// Minor units the owner may spend or withdraw.
    pub fn available(&self) -> i64 {
        self.available
    }

    /// Minor units locked in escrow holds (buyer side).
    pub fn held(&self) -> i64 {
        self.held
    }

    /// Minor units expected from escrow recorded in this (seller's) wallet
    /// by checkouts before pending funds became a read model; new escrows
    /// never add to it (the query API derives a seller's pending funds from
    /// the open holds instead).
    pub fn pending_incoming(&self) -> i64 {
        self.pending_incoming
    }

    /// Open escrow holds by order.
    pub fn holds(&self) -> &BTreeMap<OrderId, EscrowHold> {
        &self.holds
    }

    /// Open expected escrow by order (legacy entries only).
    pub fn incoming(&self) -> &BTreeMap<OrderId, Incoming> {
        &self.incoming
    }

    /// Orders whose hold was captured or refunded.
    pub fn settled_holds(&self) -> &BTreeSet<OrderId> {
        &self.settled_holds
    }

    /// Orders whose expected escrow was received or cancelled.
    pub fn settled_incoming(&self) -> &BTreeSet<OrderId> {
        &self.settled_incoming
    }

    /// Orders whose captured payment this (seller's) wallet gave back.
    pub fn returned_payments(&self) -> &BTreeSet<OrderId> {
        &self.returned_payments
    }

    /// Orders whose refund this (buyer's) wallet received.
    pub fn received_refunds(&self) -> &BTreeSet<OrderId> {
        &self.received_refunds
    }
}

#[derive(Debug, Clone)]
pub enum WalletCommand {
    /// Any signed-in buyer, seller or admin opens a wallet of their own.
    Open {
        actor: Actor,
        wallet_id: WalletId,
        currency: Currency,
    },
    /// An admin (the payment provider's webhook) or Souk.
    Deposit {
        actor: Actor,
        amount: Money,
        reference: Reference,
    },
    /// The owner, from the available balance only.
    Withdraw {
        actor: Actor,
        amount: Money,
        reference: Reference,
    },
    /// The owner or Souk (checkout): available to held, for one order.
    HoldFunds {
        actor: Actor,
        order_id: OrderId,
        amount: Money,
        payee_wallet: WalletId,
    },
    /// Souk or an admin: the held funds leave for the seller.
    CaptureHold { actor: Actor, order_id: OrderId },
    /// Souk or an admin, on the seller's side, with the buyer's
    /// `CaptureHold`: the captured hold (`amount` from `payer_wallet`)
    /// becomes available, once per order. An order this wallet still
    /// expects as a legacy entry is settled from that entry.
    ReceiveEscrow {
        actor: Actor,
        order_id: OrderId,
        amount: Money,
        payer_wallet: WalletId,
    },
    /// Souk or an admin: the held funds return to available.
    RefundHold { actor: Actor, order_id: OrderId },
    /// Souk or an admin: legacy expected funds (an `IncomingExpected` of a
    /// checkout recorded before the change) will not come.
    CancelIncoming { actor: Actor, order_id: OrderId },
    /// Souk or an admin, on the seller's side, when a returned order is
    /// refunded: the captured payment leaves the seller's available funds.
    ReturnPayment {
        actor: Actor,
        order_id: OrderId,
        amount: Money,
        to_wallet: WalletId,
    },
    /// Souk or an admin, on the buyer's side: the refund of a returned order
    /// arrives in the buyer's available funds.
    ReceiveRefund {
        actor: Actor,
        order_id: OrderId,
        amount: Money,
        from_wallet: WalletId,
    },
}

/// Amounts are minor units in the wallet's currency; balances are the
/// wallet's values after the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WalletEvent {
    WalletOpened {
        wallet_id: WalletId,
        owner: UserId,
        currency: Currency,
    },
    FundsDeposited {
        amount: i64,
        reference: Reference,
        available: i64,
    },
    FundsWithdrawn {
        amount: i64,
        reference: Reference,
        available: i64,
    },
    /// Version 2. Version 1 had no `incoming_expected`: every such hold was
    /// mirrored by an `IncomingExpected` in the payee's wallet, so it reads
    /// as `true`.
    FundsHeld {
        order_id: OrderId,
        amount: i64,
        payee_wallet: WalletId,
        available: i64,
        held: i64,
        incoming_expected: bool,
    },
    /// Legacy: written by checkouts before pending funds became a read
    /// model; still applied, never decided any more.
    IncomingExpected {
        order_id: OrderId,
        amount: i64,
        payer_wallet: WalletId,
        pending_incoming: i64,
    },
    HoldCaptured {
        order_id: OrderId,
        amount: i64,
        payee_wallet: WalletId,
        held: i64,
    },
    EscrowReceived {
        order_id: OrderId,
        amount: i64,
        payer_wallet: WalletId,
        available: i64,
        pending_incoming: i64,
    },
    HoldRefunded {
        order_id: OrderId,
        amount: i64,
        available: i64,
        held: i64,
    },
    IncomingCancelled {
        order_id: OrderId,
        amount: i64,
        pending_incoming: i64,
    },
    PaymentReturned {
        order_id: OrderId,
        amount: i64,
        to_wallet: WalletId,
        available: i64,
    },
    RefundReceived {
        order_id: OrderId,
        amount: i64,
        from_wallet: WalletId,
        available: i64,
    },
}

impl DomainEvent for WalletEvent {
    fn event_type(&self) -> String {
        match self {
            Self::WalletOpened { .. } => "WalletOpened",
            Self::FundsDeposited { .. } => "FundsDeposited",
            Self::FundsWithdrawn { .. } => "FundsWithdrawn",
            Self::FundsHeld { .. } => "FundsHeld",
            Self::IncomingExpected { .. } => "IncomingExpected",
            Self::HoldCaptured { .. } => "HoldCaptured",
            Self::EscrowReceived { .. } => "EscrowReceived",
            Self::HoldRefunded { .. } => "HoldRefunded",
            Self::IncomingCancelled { .. } => "IncomingCancelled",
            Self::PaymentReturned { .. } => "PaymentReturned",
            Self::RefundReceived { .. } => "RefundReceived",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        match self {
            Self::FundsHeld { .. } => "2",
            _ => "1",
        }
        .to_owned()
    }

    fn decode(event_type: &str, event_version: &str, payload: &str) -> Result<Self, DecodeError> {
        match (event_type, event_version) {
            ("FundsHeld", "1") => upcast_funds_held_v1(payload),
            _ => crate::decode_current(event_type, event_version, payload),
        }
    }
}

/// `FundsHeld` version 1, as checkouts wrote it while they also wrote the
/// payee's `IncomingExpected`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
enum FundsHeldV1 {
    FundsHeld {
        order_id: OrderId,
        amount: i64,
        payee_wallet: WalletId,
        available: i64,
        held: i64,
    },
}

fn upcast_funds_held_v1(payload: &str) -> Result<WalletEvent, DecodeError> {
    let FundsHeldV1::FundsHeld {
        order_id,
        amount,
        payee_wallet,
        available,
        held,
    } = serde_json::from_str(payload).map_err(|error| {
        DecodeError(format!(
            "the payload is not a FundsHeld version 1 event: {error}"
        ))
    })?;
    Ok(WalletEvent::FundsHeld {
        order_id,
        amount,
        payee_wallet,
        available,
        held,
        incoming_expected: true,
    })
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WalletError {
    #[error("wallet not found")]
    NotFound,
    #[error("wallet already exists")]
    AlreadyExists,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("the wallet holds {wallet}, not {given}")]
    CurrencyMismatch { wallet: Currency, given: Currency },
    #[error("an amount must be positive")]
    InvalidAmount,
    #[error("the balance would exceed {MAX_AMOUNT} minor units")]
    AmountTooLarge,
    #[error("{requested} requested, {available} available")]
    InsufficientFunds { requested: i64, available: i64 },
    #[error("funds for order {0} were already held")]
    AlreadyHeld(OrderId),
    #[error("no hold for order {0}")]
    NoSuchHold(OrderId),
    #[error("the hold for order {0} was already settled")]
    HoldAlreadySettled(OrderId),
    #[error("no incoming funds for order {0}")]
    NoSuchIncoming(OrderId),
    #[error("the incoming funds for order {0} were already settled")]
    IncomingAlreadySettled(OrderId),
    #[error("the refund for order {0} was already made")]
    AlreadyRefunded(OrderId),
}

impl DomainError for WalletError {
    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "wallet_not_found",
            Self::AlreadyExists => "already_exists",
            Self::Forbidden(_) => "forbidden",
            Self::CurrencyMismatch { .. } => "currency_mismatch",
            Self::InvalidAmount => "invalid_amount",
            Self::AmountTooLarge => "amount_too_large",
            Self::InsufficientFunds { .. } => "insufficient_funds",
            Self::AlreadyHeld(_) => "already_held",
            Self::NoSuchHold(_) => "no_such_hold",
            Self::HoldAlreadySettled(_) => "hold_already_settled",
            Self::NoSuchIncoming(_) => "no_such_incoming",
            Self::IncomingAlreadySettled(_) => "incoming_already_settled",
            Self::AlreadyRefunded(_) => "already_refunded",
        }
    }

    fn refusal(&self) -> Refusal {
        match self {
            Self::NotFound => Refusal::NotFound,
            Self::Forbidden(_) => Refusal::Forbidden,
            Self::CurrencyMismatch { .. } | Self::InvalidAmount | Self::AmountTooLarge => {
                Refusal::Invalid
            }
            Self::AlreadyExists
            | Self::InsufficientFunds { .. }
            | Self::AlreadyHeld(_)
            | Self::NoSuchHold(_)
            | Self::HoldAlreadySettled(_)
            | Self::NoSuchIncoming(_)
            | Self::IncomingAlreadySettled(_)
            | Self::AlreadyRefunded(_) => Refusal::Conflict,
        }
    }
}

/// `a + b`, refused past [`MAX_AMOUNT`] rather than wrapping or saturating:
/// a balance that silently stopped growing would destroy money.
fn add(a: i64, b: i64) -> Result<i64, WalletError> {
    a.checked_add(b)
        .filter(|sum| *sum <= MAX_AMOUNT)
        .ok_or(WalletError::AmountTooLarge)
}

/// `a - b`, refused below zero.
fn sub(a: i64, b: i64) -> Result<i64, WalletError> {
    a.checked_sub(b)
        .filter(|difference| *difference >= 0)
        .ok_or(WalletError::InsufficientFunds {
            requested: b,
            available: a,
        })
}

impl Wallet {
    fn open(&self) -> Result<(), WalletError> {
        if self.opened {
            Ok(())
        } else {
            Err(WalletError::NotFound)
        }
    }

    fn system_or_admin(&self, actor: &Actor) -> Result<(), WalletError> {
        self.open()?;
        if actor.is_system() || actor.is_admin() {
            Ok(())
        } else {
            Err(WalletError::Forbidden("only Souk or an admin may do this"))
        }
    }

    /// The amount of `money` in minor units, if it is a positive amount of
    /// this wallet's currency.
    fn amount_of(&self, money: &Money) -> Result<i64, WalletError> {
        if money.currency() != &self.currency {
            return Err(WalletError::CurrencyMismatch {
                wallet: self.currency.clone(),
                given: money.currency().clone(),
            });
        }
        if money.amount() <= 0 {
            return Err(WalletError::InvalidAmount);
        }
        Ok(money.amount())
    }

    fn open_hold(&self, order_id: OrderId) -> Result<&EscrowHold, WalletError> {
        if self.settled_holds.contains(&order_id) {
            return Err(WalletError::HoldAlreadySettled(order_id));
        }
        self.holds
            .get(&order_id)
            .ok_or(WalletError::NoSuchHold(order_id))
    }

    fn open_incoming(&self, order_id: OrderId) -> Result<&Incoming, WalletError> {
        if self.settled_incoming.contains(&order_id) {
            return Err(WalletError::IncomingAlreadySettled(order_id));
        }
        self.incoming
            .get(&order_id)
            .ok_or(WalletError::NoSuchIncoming(order_id))
    }
}

impl Decide for Wallet {
    fn decide(&self, command: WalletCommand) -> Result<Vec<WalletEvent>, WalletError> {
        let event = match command {
            WalletCommand::Open {
                actor,
                wallet_id,
                currency,
            } => {
                if self.opened {
                    return Err(WalletError::AlreadyExists);
                }
                if !matches!(actor.role, Role::Buyer | Role::Seller | Role::Admin) {
                    return Err(WalletError::Forbidden(
                        "only buyers, sellers and admins own wallets",
                    ));
                }
                WalletEvent::WalletOpened {
                    wallet_id,
                    owner: actor.user_id,
                    currency,
                }
            }
            WalletCommand::Deposit {
                actor,
                amount,
                reference,
            } => {
                self.system_or_admin(&actor)?;
                let amount = self.amount_of(&amount)?;
                WalletEvent::FundsDeposited {
                    amount,
                    reference,
                    available: add(self.available, amount)?,
                }
            }
            WalletCommand::Withdraw {
                actor,
                amount,
                reference,
            } => {
                self.open()?;
                if !actor.is_user(self.owner) {
                    return Err(WalletError::Forbidden("only the owner may withdraw"));
                }
                let amount = self.amount_of(&amount)?;
                WalletEvent::FundsWithdrawn {
                    amount,
                    reference,
                    available: sub(self.available, amount)?,
                }
            }
            WalletCommand::HoldFunds {
                actor,
                order_id,
                amount,
                payee_wallet,
            } => {
                self.open()?;
                if !(actor.is_user(self.owner) || actor.is_system()) {
                    return Err(WalletError::Forbidden(
                        "only the owner or Souk may hold funds",
                    ));
                }
                let amount = self.amount_of(&amount)?;
                if self.holds.contains_key(&order_id) || self.settled_holds.contains(&order_id) {
                    return Err(WalletError::AlreadyHeld(order_id));
                }
                WalletEvent::FundsHeld {
                    order_id,
                    amount,
                    payee_wallet,
                    available: sub(self.available, amount)?,
                    held: add(self.held, amount)?,
                    incoming_expected: false,
                }
            }
            WalletCommand::CaptureHold { actor, order_id } => {
                self.system_or_admin(&actor)?;
                let hold = self.open_hold(order_id)?;
                WalletEvent::HoldCaptured {
                    order_id,
                    amount: hold.amount,
                    payee_wallet: hold.payee_wallet,
                    held: sub(self.held, hold.amount)?,
                }
            }
            WalletCommand::ReceiveEscrow {
                actor,
                order_id,
                amount,
                payer_wallet,
            } => {
                self.system_or_admin(&actor)?;
                let amount = self.amount_of(&amount)?;
                if self.settled_incoming.contains(&order_id) {
                    return Err(WalletError::IncomingAlreadySettled(order_id));
                }
                match self.incoming.get(&order_id) {
                    // A legacy entry: settled from what it expected.
                    Some(incoming) => WalletEvent::EscrowReceived {
                        order_id,
                        amount: incoming.amount,
                        payer_wallet: incoming.payer_wallet,
                        available: add(self.available, incoming.amount)?,
                        pending_incoming: sub(self.pending_incoming, incoming.amount)?,
                    },
                    None => WalletEvent::EscrowReceived {
                        order_id,
                        amount,
                        payer_wallet,
                        available: add(self.available, amount)?,
                        pending_incoming: self.pending_incoming,
                    },
                }
            }
            WalletCommand::RefundHold { actor, order_id } => {
                self.system_or_admin(&actor)?;
                let hold = self.open_hold(order_id)?;
                WalletEvent::HoldRefunded {
                    order_id,
                    amount: hold.amount,
                    available: add(self.available, hold.amount)?,
                    held: sub(self.held, hold.amount)?,
                }
            }
            WalletCommand::CancelIncoming { actor, order_id } => {
                self.system_or_admin(&actor)?;
                let incoming = self.open_incoming(order_id)?;
                WalletEvent::IncomingCancelled {
                    order_id,
                    amount: incoming.amount,
                    pending_incoming: sub(self.pending_incoming, incoming.amount)?,
                }
            }
            WalletCommand::ReturnPayment {
                actor,
                order_id,
                amount,
                to_wallet,
            } => {
                self.system_or_admin(&actor)?;
                let amount = self.amount_of(&amount)?;
                if self.returned_payments.contains(&order_id) {
                    return Err(WalletError::AlreadyRefunded(order_id));
                }
                WalletEvent::PaymentReturned {
                    order_id,
                    amount,
                    to_wallet,
                    available: sub(self.available, amount)?,
                }
            }
            WalletCommand::ReceiveRefund {
                actor,
                order_id,
                amount,
                from_wallet,
            } => {
                self.system_or_admin(&actor)?;
                let amount = self.amount_of(&amount)?;
                if self.received_refunds.contains(&order_id) {
                    return Err(WalletError::AlreadyRefunded(order_id));
                }
                WalletEvent::RefundReceived {
                    order_id,
                    amount,
                    from_wallet,
                    available: add(self.available, amount)?,
                }
            }
        };
        Ok(vec![event])
    }

    fn exists(&self) -> bool {
        self.opened
    }

    /// 2: holds remember `incoming_expected`.
    const STATE_VERSION: i32 = 2;
}

impl Aggregate for Wallet {
    const TYPE: &'static str = "Wallet";
    type Command = WalletCommand;
    type Event = WalletEvent;
    type Error = WalletError;
    /// Balances are taken from the events, which `decide` computed with
    /// checked arithmetic: replaying history never recomputes money.
    fn apply(&mut self, event: WalletEvent) {
        match event {
            WalletEvent::WalletOpened {
                wallet_id,
                owner,
                currency,
            } => {
                self.opened = true;
                self.wallet_id = wallet_id;
                self.owner = owner;
                self.currency = currency;
            }
            WalletEvent::FundsDeposited { available, .. }
            | WalletEvent::FundsWithdrawn { available, .. } => self.available = available,
            WalletEvent::FundsHeld {
                order_id,
                amount,
                payee_wallet,
                available,
                held,
                incoming_expected,
            } => {
                self.holds.insert(
                    order_id,
                    EscrowHold {
                        amount,
                        payee_wallet,
                        incoming_expected,
                    },
                );
                self.available = available;
                self.held = held;
            }
            WalletEvent::IncomingExpected {
                order_id,
                amount,
                payer_wallet,
                pending_incoming,
            } => {
                self.incoming.insert(
                    order_id,
                    Incoming {
                        amount,
                        payer_wallet,
                    },
                );
                self.pending_incoming = pending_incoming;
            }
            WalletEvent::HoldCaptured { order_id, held, .. } => {
                self.holds.remove(&order_id);
                self.settled_holds.insert(order_id);
                self.held = held;
            }
            WalletEvent::HoldRefunded {
                order_id,
                available,
                held,
                ..
            } => {
                self.holds.remove(&order_id);
                self.settled_holds.insert(order_id);
                self.available = available;
                self.held = held;
            }
            WalletEvent::EscrowReceived {
                order_id,
                available,
                pending_incoming,
                ..
            } => {
                self.incoming.remove(&order_id);
                self.settled_incoming.insert(order_id);
                self.available = available;
                self.pending_incoming = pending_incoming;
            }
            WalletEvent::IncomingCancelled {
                order_id,
                pending_incoming,
                ..
            } => {
                self.incoming.remove(&order_id);
                self.settled_incoming.insert(order_id);
                self.pending_incoming = pending_incoming;
            }
            WalletEvent::PaymentReturned {
                order_id,
                available,
                ..
            } => {
                self.returned_payments.insert(order_id);
                self.available = available;
            }
            WalletEvent::RefundReceived {
                order_id,
                available,
                ..
            } => {
                self.received_refunds.insert(order_id);
                self.available = available;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::given;

    use WalletCommand as C;
    use WalletEvent as E;

    fn user(n: u128) -> UserId {
        UserId::from_uuid(uuid::Uuid::from_u128(n))
    }
    fn owner() -> Actor {
        Actor::new(user(1), Role::Buyer)
    }
    fn stranger() -> Actor {
        Actor::new(user(2), Role::Buyer)
    }
    fn admin() -> Actor {
        Actor::new(user(3), Role::Admin)
    }
    fn wallet_id(n: u128) -> WalletId {
        WalletId::from_uuid(uuid::Uuid::from_u128(n))
    }
    fn order(n: u128) -> OrderId {
        OrderId::from_uuid(uuid::Uuid::from_u128(n))
    }
    fn eur(amount: i64) -> Money {
        Money::parse_positive(amount, "EUR").unwrap()
    }
    fn reference() -> Reference {
        Reference::parse("reference", "psp-123").unwrap()
    }
    fn payee() -> WalletId {
        wallet_id(2)
    }
    fn payer() -> WalletId {
        wallet_id(3)
    }

    fn opened() -> E {
        E::WalletOpened {
            wallet_id: wallet_id(1),
            owner: owner().user_id,
            currency: Currency::parse("EUR").unwrap(),
        }
    }
    fn deposited(amount: i64, available: i64) -> E {
        E::FundsDeposited {
            amount,
            reference: reference(),
            available,
        }
    }
    /// 10,000 available, then 3,000 of it held for order 1.
    fn with_hold() -> Vec<E> {
        vec![
            opened(),
            deposited(10_000, 10_000),
            E::FundsHeld {
                order_id: order(1),
                amount: 3_000,
                payee_wallet: payee(),
                available: 7_000,
                held: 3_000,
                incoming_expected: false,
            },
        ]
    }
    /// 500 available, 3,000 expected for order 1 (a legacy entry).
    fn with_incoming() -> Vec<E> {
        vec![
            opened(),
            deposited(500, 500),
            E::IncomingExpected {
                order_id: order(1),
                amount: 3_000,
                payer_wallet: payer(),
                pending_incoming: 3_000,
            },
        ]
    }

    #[test]
    fn a_signed_in_user_opens_a_wallet_of_their_own() {
        for role in [Role::Buyer, Role::Seller, Role::Admin] {
            let actor = Actor::new(owner().user_id, role);
            let wallet = given::<Wallet>([])
                .when(C::Open {
                    actor,
                    wallet_id: wallet_id(1),
                    currency: Currency::parse("EUR").unwrap(),
                })
                .then(vec![opened()]);
            assert_eq!(wallet.owner(), owner().user_id);
            assert_eq!(wallet.wallet_id(), wallet_id(1));
            assert_eq!(wallet.currency().as_str(), "EUR");
            assert_eq!(
                (wallet.available(), wallet.held(), wallet.pending_incoming()),
                (0, 0, 0)
            );
        }
        for role in [Role::Auditor, Role::Operator, Role::System] {
            given::<Wallet>([])
                .when(C::Open {
                    actor: Actor::new(owner().user_id, role),
                    wallet_id: wallet_id(1),
                    currency: Currency::parse("EUR").unwrap(),
                })
                .then_refused("forbidden");
        }
        given::<Wallet>([opened()])
            .when(C::Open {
                actor: owner(),
                wallet_id: wallet_id(1),
                currency: Currency::parse("EUR").unwrap(),
            })
            .then_refused("already_exists");
    }

    #[test]
    fn commands_on_a_missing_wallet_are_not_found() {
        let error = given::<Wallet>([])
            .when(C::Deposit {
                actor: admin(),
                amount: eur(1),
                reference: reference(),
            })
            .then_refused("wallet_not_found");
        assert_eq!(error.refusal(), Refusal::NotFound);
    }

    #[test]
    fn an_admin_or_souk_deposits_and_nobody_else() {
        for actor in [admin(), Actor::system()] {
            let wallet = given::<Wallet>([opened(), deposited(100, 100)])
                .when(C::Deposit {
                    actor,
                    amount: eur(250),
                    reference: reference(),
                })
                .then(vec![deposited(250, 350)]);
            assert_eq!(wallet.available(), 350);
        }
        let error = given::<Wallet>([opened()])
            .when(C::Deposit {
                actor: owner(),
                amount: eur(250),
                reference: reference(),
            })
            .then_refused("forbidden");
        assert_eq!(error.refusal(), Refusal::Forbidden);
    }

    #[test]
    fn money_in_another_currency_is_refused() {
        let error = given::<Wallet>([opened()])
            .when(C::Deposit {
                actor: admin(),
                amount: Money::parse_positive(250, "USD").unwrap(),
                reference: reference(),
            })
            .then_refused("currency_mismatch");
        assert_eq!(error.refusal(), Refusal::Invalid);
        given::<Wallet>([opened(), deposited(100, 100)])
            .when(C::HoldFunds {
                actor: owner(),
                order_id: order(1),
                amount: Money::parse_positive(50, "USD").unwrap(),
                payee_wallet: payee(),
            })
            .then_refused("currency_mismatch");
    }

    #[test]
    fn a_zero_amount_is_refused() {
        let zero = Money::zero(Currency::parse("EUR").unwrap());
        given::<Wallet>([opened()])
            .when(C::Deposit {
                actor: admin(),
                amount: zero.clone(),
                reference: reference(),
            })
            .then_refused("invalid_amount");
        given::<Wallet>([opened()])
            .when(C::Withdraw {
                actor: owner(),
                amount: zero,
                reference: reference(),
            })
            .then_refused("invalid_amount");
    }

    #[test]
    fn a_balance_never_exceeds_the_largest_amount() {
        let error = given::<Wallet>([opened(), deposited(MAX_AMOUNT, MAX_AMOUNT)])
            .when(C::Deposit {
                actor: admin(),
                amount: eur(1),
                reference: reference(),
            })
            .then_refused("amount_too_large");
        assert_eq!(error.refusal(), Refusal::Invalid);
        given::<Wallet>([opened(), deposited(MAX_AMOUNT, MAX_AMOUNT)])
            .when(C::ReceiveEscrow {
                actor: Actor::system(),
                order_id: order(2),
                amount: eur(1),
                payer_wallet: payer(),
            })
            .then_refused("amount_too_large");
        given::<Wallet>([
            opened(),
            deposited(MAX_AMOUNT, MAX_AMOUNT),
            E::IncomingExpected {
                order_id: order(1),
                amount: 1,
                payer_wallet: payer(),
                pending_incoming: 1,
            },
        ])
        .when(C::ReceiveEscrow {
            actor: Actor::system(),
            order_id: order(1),
            amount: eur(1),
            payer_wallet: payer(),
        })
        .then_refused("amount_too_large");
    }

    #[test]
    fn the_owner_withdraws_from_what_is_available() {
        let wallet = given::<Wallet>(with_hold())
            .when(C::Withdraw {
                actor: owner(),
                amount: eur(7_000),
                reference: reference(),
            })
            .then(vec![E::FundsWithdrawn {
                amount: 7_000,
                reference: reference(),
                available: 0,
            }]);
        assert_eq!((wallet.available(), wallet.held()), (0, 3_000));

        let error = given::<Wallet>(with_hold())
            .when(C::Withdraw {
                actor: owner(),
                amount: eur(7_001),
                reference: reference(),
            })
            .then_refused("insufficient_funds");
        assert_eq!(error.refusal(), Refusal::Conflict);
        for actor in [stranger(), admin(), Actor::system()] {
            given::<Wallet>(with_hold())
                .when(C::Withdraw {
                    actor,
                    amount: eur(1),
                    reference: reference(),
                })
                .then_refused("forbidden");
        }
    }

    #[test]
    fn a_seller_cannot_withdraw_pending_funds() {
        given::<Wallet>(with_incoming())
            .when(C::Withdraw {
                actor: owner(),
                amount: eur(501),
                reference: reference(),
            })
            .then_refused("insufficient_funds");
    }

    #[test]
    fn the_owner_or_souk_holds_funds_once_per_order() {
        for actor in [owner(), Actor::system()] {
            let wallet = given::<Wallet>([opened(), deposited(10_000, 10_000)])
                .when(C::HoldFunds {
                    actor,
                    order_id: order(1),
                    amount: eur(3_000),
                    payee_wallet: payee(),
                })
                .then(vec![with_hold()[2].clone()]);
            assert_eq!((wallet.available(), wallet.held()), (7_000, 3_000));
            assert_eq!(wallet.holds()[&order(1)].payee_wallet, payee());
        }
        for actor in [stranger(), admin()] {
            given::<Wallet>([opened(), deposited(10_000, 10_000)])
                .when(C::HoldFunds {
                    actor,
                    order_id: order(1),
                    amount: eur(3_000),
                    payee_wallet: payee(),
                })
                .then_refused("forbidden");
        }
        let hold_again = || C::HoldFunds {
            actor: Actor::system(),
            order_id: order(1),
            amount: eur(1),
            payee_wallet: payee(),
        };
        let error = given::<Wallet>(with_hold())
            .when(hold_again())
            .then_refused("already_held");
        assert_eq!(error.refusal(), Refusal::Conflict);
        let mut settled = with_hold();
        settled.push(E::HoldRefunded {
            order_id: order(1),
            amount: 3_000,
            available: 10_000,
            held: 0,
        });
        given::<Wallet>(settled)
            .when(hold_again())
            .then_refused("already_held");
    }

    #[test]
    fn holding_more_than_is_available_is_refused() {
        given::<Wallet>(with_hold())
            .when(C::HoldFunds {
                actor: owner(),
                order_id: order(2),
                amount: eur(7_001),
                payee_wallet: payee(),
            })
            .then_refused("insufficient_funds");
    }

    #[test]
    fn a_hold_never_touches_the_payees_wallet() {
        let wallet = given::<Wallet>([opened(), deposited(10_000, 10_000)])
            .when(C::HoldFunds {
                actor: owner(),
                order_id: order(1),
                amount: eur(3_000),
                payee_wallet: payee(),
            })
            .then(vec![with_hold()[2].clone()]);
        assert!(!wallet.holds()[&order(1)].incoming_expected);
        assert_eq!(with_hold()[2].event_version(), "2");
    }

    /// A log written before pending funds became a read model: the seller's
    /// wallet expected each escrow. It replays to the balances it had, and
    /// its escrows settle through their legacy entries.
    #[test]
    fn an_old_log_replays_to_the_same_balances_and_settles_its_escrow() {
        let v1 = |payload: serde_json::Value| {
            WalletEvent::decode("FundsHeld", "1", &payload.to_string()).unwrap()
        };
        let held = v1(serde_json::json!({"FundsHeld": {
            "order_id": order(1), "amount": 3_000, "payee_wallet": payee(),
            "available": 7_000, "held": 3_000}}));
        assert_eq!(
            held,
            E::FundsHeld {
                order_id: order(1),
                amount: 3_000,
                payee_wallet: payee(),
                available: 7_000,
                held: 3_000,
                incoming_expected: true,
            }
        );
        assert!(WalletEvent::decode("FundsHeld", "2", "{\"FundsHeld\": {}}").is_err());
        let mut buyer = Wallet::default();
        for event in [opened(), deposited(10_000, 10_000), held] {
            buyer.apply(event);
        }
        assert!(buyer.holds()[&order(1)].incoming_expected);
        assert_eq!((buyer.available(), buyer.held()), (7_000, 3_000));

        // The seller's legacy side: received from its entry, whatever the
        // command says, and only once.
        let received = E::EscrowReceived {
            order_id: order(1),
            amount: 3_000,
            payer_wallet: payer(),
            available: 3_500,
            pending_incoming: 0,
        };
        let seller = given::<Wallet>(with_incoming())
            .when(C::ReceiveEscrow {
                actor: Actor::system(),
                order_id: order(1),
                amount: eur(3_000),
                payer_wallet: payer(),
            })
            .then(vec![received.clone()]);
        assert_eq!((seller.available(), seller.pending_incoming()), (3_500, 0));
        let mut history = with_incoming();
        history.push(received);
        given::<Wallet>(history)
            .when(C::ReceiveEscrow {
                actor: Actor::system(),
                order_id: order(1),
                amount: eur(3_000),
                payer_wallet: payer(),
            })
            .then_refused("incoming_already_settled");
    }

    #[test]
    fn capturing_a_hold_pays_it_out_exactly_once() {
        let captured = E::HoldCaptured {
            order_id: order(1),
            amount: 3_000,
            payee_wallet: payee(),
            held: 0,
        };
        for actor in [Actor::system(), admin()] {
            let wallet = given::<Wallet>(with_hold())
                .when(C::CaptureHold {
                    actor,
                    order_id: order(1),
                })
                .then(vec![captured.clone()]);
            assert_eq!((wallet.available(), wallet.held()), (7_000, 0));
            assert!(wallet.settled_holds().contains(&order(1)));
            assert!(wallet.holds().is_empty());
        }
        given::<Wallet>(with_hold())
            .when(C::CaptureHold {
                actor: owner(),
                order_id: order(1),
            })
            .then_refused("forbidden");
        let mut history = with_hold();
        history.push(captured);
        for command in [
            C::CaptureHold {
                actor: Actor::system(),
                order_id: order(1),
            },
            C::RefundHold {
                actor: Actor::system(),
                order_id: order(1),
            },
        ] {
            let error = given::<Wallet>(history.clone())
                .when(command)
                .then_refused("hold_already_settled");
            assert_eq!(error.refusal(), Refusal::Conflict);
        }
        let error = given::<Wallet>(with_hold())
            .when(C::CaptureHold {
                actor: Actor::system(),
                order_id: order(9),
            })
            .then_refused("no_such_hold");
        assert_eq!(error.refusal(), Refusal::Conflict);
    }

    #[test]
    fn refunding_a_hold_returns_it_to_available_exactly_once() {
        let wallet = given::<Wallet>(with_hold())
            .when(C::RefundHold {
                actor: admin(),
                order_id: order(1),
            })
            .then(vec![E::HoldRefunded {
                order_id: order(1),
                amount: 3_000,
                available: 10_000,
                held: 0,
            }]);
        assert_eq!((wallet.available(), wallet.held()), (10_000, 0));
        given::<Wallet>(with_hold())
            .when(C::RefundHold {
                actor: stranger(),
                order_id: order(1),
            })
            .then_refused("forbidden");
        given::<Wallet>(with_hold())
            .when(C::RefundHold {
                actor: Actor::system(),
                order_id: order(9),
            })
            .then_refused("no_such_hold");
    }

    #[test]
    fn a_returned_order_moves_the_payment_back_exactly_once() {
        let seller = given::<Wallet>(vec![opened(), deposited(5_000, 5_000)])
            .when(C::ReturnPayment {
                actor: Actor::system(),
                order_id: order(1),
                amount: eur(3_000),
                to_wallet: payer(),
            })
            .then(vec![E::PaymentReturned {
                order_id: order(1),
                amount: 3_000,
                to_wallet: payer(),
                available: 2_000,
            }]);
        assert_eq!(seller.available(), 2_000);
        let returned = E::PaymentReturned {
            order_id: order(1),
            amount: 3_000,
            to_wallet: payer(),
            available: 2_000,
        };
        given::<Wallet>(vec![opened(), deposited(5_000, 5_000), returned])
            .when(C::ReturnPayment {
                actor: Actor::system(),
                order_id: order(1),
                amount: eur(3_000),
                to_wallet: payer(),
            })
            .then_refused("already_refunded");
        // The seller must have the money: a refund never makes a balance negative.
        given::<Wallet>(vec![opened(), deposited(1_000, 1_000)])
            .when(C::ReturnPayment {
                actor: Actor::system(),
                order_id: order(1),
                amount: eur(3_000),
                to_wallet: payer(),
            })
            .then_refused("insufficient_funds");
        given::<Wallet>(vec![opened(), deposited(5_000, 5_000)])
            .when(C::ReturnPayment {
                actor: owner(),
                order_id: order(1),
                amount: eur(3_000),
                to_wallet: payer(),
            })
            .then_refused("forbidden");

        let buyer = given::<Wallet>(vec![opened()])
            .when(C::ReceiveRefund {
                actor: admin(),
                order_id: order(1),
                amount: eur(3_000),
                from_wallet: payee(),
            })
            .then(vec![E::RefundReceived {
                order_id: order(1),
                amount: 3_000,
                from_wallet: payee(),
                available: 3_000,
            }]);
        assert_eq!(buyer.available(), 3_000);
        let received = E::RefundReceived {
            order_id: order(1),
            amount: 3_000,
            from_wallet: payee(),
            available: 3_000,
        };
        given::<Wallet>(vec![opened(), received])
            .when(C::ReceiveRefund {
                actor: admin(),
                order_id: order(1),
                amount: eur(3_000),
                from_wallet: payee(),
            })
            .then_refused("already_refunded");
        given::<Wallet>(vec![opened()])
            .when(C::ReceiveRefund {
                actor: Actor::system(),
                order_id: order(1),
                amount: Money::parse_positive(3_000, "USD").unwrap(),
                from_wallet: payee(),
            })
            .then_refused("currency_mismatch");
    }

    #[test]
    fn receiving_escrow_makes_it_available_exactly_once() {
        let receive = |actor| C::ReceiveEscrow {
            actor,
            order_id: order(1),
            amount: eur(3_000),
            payer_wallet: payer(),
        };
        let received = E::EscrowReceived {
            order_id: order(1),
            amount: 3_000,
            payer_wallet: payer(),
            available: 3_500,
            pending_incoming: 0,
        };
        let wallet = given::<Wallet>([opened(), deposited(500, 500)])
            .when(receive(Actor::system()))
            .then(vec![received.clone()]);
        assert_eq!((wallet.available(), wallet.pending_incoming()), (3_500, 0));
        assert!(wallet.settled_incoming().contains(&order(1)));

        given::<Wallet>([opened(), deposited(500, 500)])
            .when(receive(owner()))
            .then_refused("forbidden");
        let history = vec![opened(), deposited(500, 500), received];
        let error = given::<Wallet>(history.clone())
            .when(receive(admin()))
            .then_refused("incoming_already_settled");
        assert_eq!(error.refusal(), Refusal::Conflict);
        // Nothing to cancel: only legacy entries are cancelled.
        given::<Wallet>(history)
            .when(C::CancelIncoming {
                actor: admin(),
                order_id: order(1),
            })
            .then_refused("incoming_already_settled");
        given::<Wallet>([opened()])
            .when(C::ReceiveEscrow {
                actor: Actor::system(),
                order_id: order(1),
                amount: Money::parse_positive(3_000, "USD").unwrap(),
                payer_wallet: payer(),
            })
            .then_refused("currency_mismatch");
    }

    #[test]
    fn cancelling_incoming_escrow_drops_it_exactly_once() {
        let wallet = given::<Wallet>(with_incoming())
            .when(C::CancelIncoming {
                actor: Actor::system(),
                order_id: order(1),
            })
            .then(vec![E::IncomingCancelled {
                order_id: order(1),
                amount: 3_000,
                pending_incoming: 0,
            }]);
        assert_eq!((wallet.available(), wallet.pending_incoming()), (500, 0));
        given::<Wallet>(with_incoming())
            .when(C::CancelIncoming {
                actor: owner(),
                order_id: order(1),
            })
            .then_refused("forbidden");
        given::<Wallet>(with_incoming())
            .when(C::CancelIncoming {
                actor: Actor::system(),
                order_id: order(9),
            })
            .then_refused("no_such_incoming");
    }

    /// A buyer's and a seller's wallet under a long pseudo-random run of
    /// deposits, withdrawals and escrows (many refused: too much, twice, the
    /// wrong order). A capture runs on both sides, as the journeys run it;
    /// a hold and a refund only on the buyer's. No balance ever goes
    /// negative and money is conserved.
    #[test]
    fn money_is_conserved_and_never_negative_under_random_commands() {
        let mut seed: u64 = 42;
        let mut next = |bound: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % bound
        };
        let seller = Actor::new(user(9), Role::Seller);
        let mut buyer_wallet = Wallet::default();
        let mut seller_wallet = Wallet::default();
        buyer_wallet.apply(opened());
        seller_wallet.apply(E::WalletOpened {
            wallet_id: payee(),
            owner: seller.user_id,
            currency: Currency::parse("EUR").unwrap(),
        });

        // Decides and applies; returns whether the command was accepted.
        fn run(wallet: &mut Wallet, command: C) -> bool {
            match wallet.decide(command) {
                Ok(events) => {
                    for event in events {
                        wallet.apply(event);
                    }
                    true
                }
                Err(_) => false,
            }
        }

        let (mut deposits, mut withdrawals, mut accepted) = (0i64, 0i64, 0);
        for _ in 0..20_000 {
            let amount = eur(1 + i64::try_from(next(5_000)).unwrap());
            let order_id = order(u128::from(next(300)));
            let system = Actor::system();
            let ok = match next(8) {
                0 | 1 => {
                    let ok = run(
                        &mut buyer_wallet,
                        C::Deposit {
                            actor: admin(),
                            amount: amount.clone(),
                            reference: reference(),
                        },
                    );
                    deposits += if ok { amount.amount() } else { 0 };
                    ok
                }
                2 | 3 => {
                    let (wallet, actor) = if next(2) == 0 {
                        (&mut buyer_wallet, owner())
                    } else {
                        (&mut seller_wallet, seller)
                    };
                    let ok = run(
                        wallet,
                        C::Withdraw {
                            actor,
                            amount: amount.clone(),
                            reference: reference(),
                        },
                    );
                    withdrawals += if ok { amount.amount() } else { 0 };
                    ok
                }
                4 | 5 => run(
                    &mut buyer_wallet,
                    C::HoldFunds {
                        actor: owner(),
                        order_id,
                        amount,
                        payee_wallet: payee(),
                    },
                ),
                6 => {
                    let hold = buyer_wallet.holds().get(&order_id).cloned();
                    let captured = run(
                        &mut buyer_wallet,
                        C::CaptureHold {
                            actor: system,
                            order_id,
                        },
                    );
                    if captured {
                        let received = run(
                            &mut seller_wallet,
                            C::ReceiveEscrow {
                                actor: system,
                                order_id,
                                amount: eur(hold.map_or(0, |hold| hold.amount)),
                                payer_wallet: wallet_id(1),
                            },
                        );
                        assert!(received);
                    }
                    captured
                }
                _ => run(
                    &mut buyer_wallet,
                    C::RefundHold {
                        actor: system,
                        order_id,
                    },
                ),
            };
            accepted += usize::from(ok);

            for wallet in [&buyer_wallet, &seller_wallet] {
                assert!(wallet.available() >= 0 && wallet.held() >= 0);
                let holds: i64 = wallet.holds().values().map(|h| h.amount).sum();
                assert_eq!(wallet.held(), holds);
            }
            // The seller's wallet never expects anything: its pending funds
            // are the buyer's open holds naming it.
            assert_eq!(seller_wallet.pending_incoming(), 0);
            assert!(seller_wallet.incoming().is_empty());
            assert_eq!(
                buyer_wallet.available() + buyer_wallet.held() + seller_wallet.available(),
                deposits - withdrawals,
                "money is conserved"
            );
        }
        assert!(accepted > 5_000 && seller_wallet.settled_incoming().len() > 50);
    }
}
