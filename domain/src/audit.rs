//! The business invariants an auditor checks by replaying the log, as pure
//! logic: the caller (event-store's `verify`) feeds the events of one
//! aggregate after another, each aggregate's in sequence order, and this
//! module replays them through each aggregate's own `apply` and says what
//! is wrong.
//!
//! Checked on each event (a [`Finding`] names the event it is about):
//! - the payload decodes as an event of its aggregate, of the type and
//!   version its envelope says, and the aggregate exists (or is created by it);
//! - wallets: the balances an event records follow from the balances before
//!   it and its amount, and none is ever negative; a hold is captured or
//!   refunded at most once, and only while it is open; a seller receives an
//!   order's escrow at most once (from its legacy expected entry while that
//!   is open, else straight from the captured hold); the same for returned
//!   payments and received refunds;
//! - reservations: a hold is placed only on available stock, confirmed,
//!   released or expired at most once, and active holds never exceed the
//!   stock (nothing is sold beyond it); the `available` an event records is
//!   the pool's;
//! - orders: every status change is a legal transition ([`order_transition`]).
//!
//! Checked at the end ([`Auditor::finish`]), in constant memory: per
//! currency, the money in all wallets (available plus held, so escrow in
//! flight is included) equals deposits minus withdrawals; and the two sides
//! of every movement between wallets match (each capture a receipt, each
//! returned payment a received refund, and for the holds of checkouts
//! recorded before pending funds became a read model, `FundsHeld` version 1,
//! whose seller's wallet expected them: each such refunded hold a cancelled
//! incoming, each such open hold an open incoming), compared as multisets
//! through an additive hash. A hold of a newer checkout has no seller side
//! until it is captured. A mismatch there is reported per currency or
//! movement, not per event: finding the event takes memory proportional to
//! the log.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::listing::Listing;
use crate::order::{Order, OrderEvent, OrderStatus, PaymentMethod};
use crate::reservation::{Reservation, ReservationEvent};
use crate::timeline::ProductTimeline;
use crate::wallet::{Wallet, WalletEvent};
use crate::{Aggregate, Decide, DomainEvent};

/// What is wrong, with a stable code.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub message: String,
}

impl Finding {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Decodes a stored event of `A`, checking that the envelope's type and
/// version are the payload's.
pub fn decode<A: Aggregate>(
    event_type: &str,
    event_version: &str,
    payload: &str,
) -> Result<A::Event, Finding> {
    A::Event::decode(event_type, event_version, payload).map_err(|error| {
        Finding::new(
            "undecodable",
            format!("{} {event_type} version {event_version}: {error}", A::TYPE),
        )
    })
}

/// The statuses an order may be in when an event of `event_type` happens to
/// it (`None`: the event does not change the order's status and is checked
/// otherwise). `OrderPlaced` starts an order and is legal only first.
pub fn order_transition(event_type: &str) -> Option<&'static [OrderStatus]> {
    use OrderStatus::*;
    Some(match event_type {
        "OrderRejected" | "OrderAwaitingPayment" | "OrderConfirmed" => &[Placed],
        "PaymentConfirmed" => &[AwaitingPayment],
        "OrderShipped" => &[Confirmed],
        "OrderDelivered" => &[Shipped],
        "EscrowReleased" => &[Shipped, Delivered],
        "OrderCompleted" | "ReturnRequested" => &[Delivered],
        "OrderCancelled" => &[Placed, AwaitingPayment, Confirmed],
        "OrderReturned" => &[ReturnRequested],
        "OrderRefunded" => &[Returned],
        "SellerReviewed" => &[Delivered, Completed, ReturnRequested, Returned, Refunded],
        _ => return None,
    })
}

/// One side of a movement between wallets, hashed into a multiset sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Movement {
    /// A legacy buyer's hold that is still open at the end / its seller's
    /// expected incoming.
    OpenEscrow,
    /// A captured hold / the escrow the seller received.
    Captured,
    /// A refunded legacy hold / the incoming the seller no longer expects.
    Refunded,
    /// A payment a seller gave back / the refund the buyer received.
    Returned,
}

impl Movement {
    fn name(self) -> &'static str {
        match self {
            Self::OpenEscrow => "open escrow holds and expected incoming escrow",
            Self::Captured => "captured holds and received escrow",
            Self::Refunded => "refunded holds and cancelled incoming escrow",
            Self::Returned => "returned payments and received refunds",
        }
    }
}

/// A multiset of movements: count, amounts and an additive 128-bit hash of
/// each `(order, amount, from wallet, to wallet)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Side {
    count: u64,
    amount: i128,
    hash: u128,
}

impl Side {
    fn add(&mut self, key: (uuid::Uuid, i64, uuid::Uuid, uuid::Uuid)) {
        let half = |salt: u8| {
            let mut hasher = DefaultHasher::new();
            salt.hash(&mut hasher);
            key.hash(&mut hasher);
            hasher.finish()
        };
        let hash = (u128::from(half(1)) << 64) | u128::from(half(2));
        self.count += 1;
        self.amount += i128::from(key.1);
        self.hash = self.hash.wrapping_add(hash);
    }

    fn merge(&mut self, other: &Side) {
        self.count += other.count;
        self.amount += other.amount;
        self.hash = self.hash.wrapping_add(other.hash);
    }
}

/// Money of one currency over all wallets.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    deposited: i128,
    withdrawn: i128,
    available: i128,
    held: i128,
    pending_incoming: i128,
}

/// The aggregate being replayed.
#[derive(Debug)]
enum Current {
    Wallet(Wallet),
    Order(Order),
    Reservation(Reservation),
    Listing(Listing),
    Timeline(ProductTimeline),
}

/// Replays aggregates one after the other and collects what is wrong.
#[derive(Debug, Default)]
pub struct Auditor {
    current: Option<Current>,
    totals: BTreeMap<String, Totals>,
    /// Per movement: the payer's side and the payee's side.
    movements: BTreeMap<Movement, (Side, Side)>,
    aggregates: u64,
}

/// The aggregate types [`Auditor`] replays.
pub const AGGREGATE_TYPES: &[&str] = &[
    Wallet::TYPE,
    Order::TYPE,
    Reservation::TYPE,
    Listing::TYPE,
    ProductTimeline::TYPE,
];

impl Auditor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the next aggregate (ending the one before).
    pub fn start(&mut self, aggregate_type: &str) -> Result<(), Finding> {
        self.end();
        self.aggregates += 1;
        self.current = Some(match aggregate_type {
            Wallet::TYPE => Current::Wallet(Wallet::default()),
            Order::TYPE => Current::Order(Order::default()),
            Reservation::TYPE => Current::Reservation(Reservation::default()),
            Listing::TYPE => Current::Listing(Listing::default()),
            ProductTimeline::TYPE => Current::Timeline(ProductTimeline::default()),
            other => {
                return Err(Finding::new(
                    "unknown_aggregate_type",
                    format!("`{other}` is not an aggregate type of Souk"),
                ));
            }
        });
        Ok(())
    }

    /// Replays the next event of the current aggregate; returns what is
    /// wrong with it (nothing, usually). An event that does not decode is
    /// not applied.
    pub fn event(&mut self, event_type: &str, event_version: &str, payload: &str) -> Vec<Finding> {
        let mut findings = Vec::new();
        let Some(current) = self.current.as_mut() else {
            return findings;
        };
        let outcome = match current {
            Current::Wallet(state) => {
                decode::<Wallet>(event_type, event_version, payload).map(|event| {
                    wallet_event(
                        state,
                        event,
                        &mut self.totals,
                        &mut self.movements,
                        &mut findings,
                    )
                })
            }
            Current::Order(state) => decode::<Order>(event_type, event_version, payload)
                .map(|event| order_event(state, event, &mut findings)),
            Current::Reservation(state) => {
                decode::<Reservation>(event_type, event_version, payload)
                    .map(|event| reservation_event(state, event, &mut findings))
            }
            Current::Listing(state) => decode::<Listing>(event_type, event_version, payload)
                .map(|event| plain_event(state, event, &mut findings)),
            Current::Timeline(state) => {
                decode::<ProductTimeline>(event_type, event_version, payload)
                    .map(|event| plain_event(state, event, &mut findings))
            }
        };
        if let Err(finding) = outcome {
            findings.push(finding);
        }
        findings
    }

    /// Ends the current aggregate: a wallet's final balances and open
    /// escrow join the totals.
    fn end(&mut self) {
        if let Some(Current::Wallet(wallet)) = self.current.take()
            && wallet.exists()
        {
            let totals = self
                .totals
                .entry(wallet.currency().as_str().to_owned())
                .or_default();
            totals.available += i128::from(wallet.available());
            totals.held += i128::from(wallet.held());
            totals.pending_incoming += i128::from(wallet.pending_incoming());
            let me = wallet.wallet_id().as_uuid();
            for (order, hold) in wallet.holds().iter().filter(|(_, h)| h.incoming_expected) {
                self.movements
                    .entry(Movement::OpenEscrow)
                    .or_default()
                    .0
                    .add((
                        order.as_uuid(),
                        hold.amount,
                        me,
                        hold.payee_wallet.as_uuid(),
                    ));
            }
            for (order, incoming) in wallet.incoming() {
                self.movements
                    .entry(Movement::OpenEscrow)
                    .or_default()
                    .1
                    .add((
                        order.as_uuid(),
                        incoming.amount,
                        incoming.payer_wallet.as_uuid(),
                        me,
                    ));
            }
        }
    }

    /// Takes in what `other` replayed: the caller may split the log into
    /// disjoint ranges of aggregates, replay each with an auditor of its
    /// own (in parallel) and merge them before [`Auditor::finish`]. The
    /// end-of-log checks are sums, so they do not depend on the split.
    pub fn merge(&mut self, mut other: Auditor) {
        self.end();
        other.end();
        for (currency, theirs) in other.totals {
            let ours = self.totals.entry(currency).or_default();
            ours.deposited += theirs.deposited;
            ours.withdrawn += theirs.withdrawn;
            ours.available += theirs.available;
            ours.held += theirs.held;
            ours.pending_incoming += theirs.pending_incoming;
        }
        for (movement, (payers, payees)) in other.movements {
            let ours = self.movements.entry(movement).or_default();
            ours.0.merge(&payers);
            ours.1.merge(&payees);
        }
        self.aggregates += other.aggregates;
    }

    /// How many aggregates were replayed.
    pub fn aggregates(&self) -> u64 {
        self.aggregates
    }

    /// The checks over all wallets (see the module doc).
    pub fn finish(mut self) -> Vec<Finding> {
        self.end();
        let mut findings = Vec::new();
        for (currency, totals) in &self.totals {
            let in_wallets = totals.available + totals.held;
            let external = totals.deposited - totals.withdrawn;
            if in_wallets != external {
                findings.push(Finding::new(
                    "money_not_conserved",
                    format!(
                        "{currency}: wallets hold {in_wallets} (available {}, held in escrow {}) \
                         but deposits minus withdrawals are {external} ({} - {})",
                        totals.available, totals.held, totals.deposited, totals.withdrawn
                    ),
                ));
            }
        }
        for (movement, (payers, payees)) in &self.movements {
            if payers != payees {
                findings.push(Finding::new(
                    "unmatched_movement",
                    format!(
                        "{}: {} on the payers' side for {} minor units, {} on the payees' side \
                         for {}, or they name different orders, amounts or wallets",
                        movement.name(),
                        payers.count,
                        payers.amount,
                        payees.count,
                        payees.amount
                    ),
                ));
            }
        }
        findings
    }
}

/// Applies an event to an aggregate that has no invariant of its own beyond
/// existing.
fn plain_event<A: Decide>(state: &mut A, event: A::Event, findings: &mut Vec<Finding>) {
    let existed = state.exists();
    state.apply(event);
    if !existed && !state.exists() {
        findings.push(Finding::new(
            "no_such_aggregate",
            format!("an event of a {} that was never created", A::TYPE),
        ));
    }
}

fn expect_balance(findings: &mut Vec<Finding>, name: &str, recorded: i64, expected: Option<i64>) {
    match expected {
        Some(expected) if expected == recorded => {}
        Some(expected) => findings.push(Finding::new(
            "balance_mismatch",
            format!(
                "records {name} {recorded} but the balance before and the amount make {expected}"
            ),
        )),
        None => findings.push(Finding::new(
            "balance_mismatch",
            format!("records {name} {recorded} but the balance before and the amount overflow"),
        )),
    }
}

fn wallet_event(
    wallet: &mut Wallet,
    event: WalletEvent,
    totals: &mut BTreeMap<String, Totals>,
    movements: &mut BTreeMap<Movement, (Side, Side)>,
    findings: &mut Vec<Finding>,
) {
    let existed = wallet.exists();
    let (available, held, pending) = (wallet.available(), wallet.held(), wallet.pending_incoming());
    let me = wallet.wallet_id().as_uuid();
    let mut moved = |movement: Movement, payee_side: bool, key| {
        let sides = movements.entry(movement).or_default();
        if payee_side {
            sides.1.add(key);
        } else {
            sides.0.add(key);
        }
    };
    match (&event, existed) {
        (WalletEvent::WalletOpened { .. }, true) => {
            findings.push(Finding::new(
                "illegal_event",
                "the wallet is opened a second time",
            ));
        }
        (WalletEvent::WalletOpened { .. }, false) => {}
        (_, false) => {
            findings.push(Finding::new(
                "no_such_aggregate",
                "an event of a wallet that was never opened",
            ));
        }
        (_, true) => {}
    }
    let positive = |amount: i64, findings: &mut Vec<Finding>| {
        if amount <= 0 {
            findings.push(Finding::new(
                "invalid_amount",
                format!("moves {amount} minor units (amounts are positive)"),
            ));
        }
    };
    match &event {
        WalletEvent::WalletOpened { .. } => {}
        WalletEvent::FundsDeposited {
            amount,
            available: after,
            ..
        } => {
            positive(*amount, findings);
            expect_balance(
                findings,
                "available",
                *after,
                available.checked_add(*amount),
            );
            if existed {
                totals
                    .entry(wallet.currency().as_str().to_owned())
                    .or_default()
                    .deposited += i128::from(*amount);
            }
        }
        WalletEvent::FundsWithdrawn {
            amount,
            available: after,
            ..
        } => {
            positive(*amount, findings);
            expect_balance(
                findings,
                "available",
                *after,
                available.checked_sub(*amount),
            );
            if existed {
                totals
                    .entry(wallet.currency().as_str().to_owned())
                    .or_default()
                    .withdrawn += i128::from(*amount);
            }
        }
        WalletEvent::FundsHeld {
            order_id,
            amount,
            available: available_after,
            held: held_after,
            ..
        } => {
            positive(*amount, findings);
            if wallet.holds().contains_key(order_id) || wallet.settled_holds().contains(order_id) {
                findings.push(Finding::new(
                    "double_settlement",
                    format!("funds are held a second time for order {order_id}"),
                ));
            }
            expect_balance(
                findings,
                "available",
                *available_after,
                available.checked_sub(*amount),
            );
            expect_balance(findings, "held", *held_after, held.checked_add(*amount));
        }
        WalletEvent::IncomingExpected {
            order_id,
            amount,
            pending_incoming: after,
            ..
        } => {
            positive(*amount, findings);
            if wallet.incoming().contains_key(order_id)
                || wallet.settled_incoming().contains(order_id)
            {
                findings.push(Finding::new(
                    "double_settlement",
                    format!("escrow is expected a second time for order {order_id}"),
                ));
            }
            expect_balance(
                findings,
                "pending_incoming",
                *after,
                pending.checked_add(*amount),
            );
        }
        WalletEvent::HoldCaptured {
            order_id,
            amount,
            payee_wallet,
            held: after,
        } => {
            settle_hold(wallet, order_id, *amount, "captured", findings);
            expect_balance(findings, "held", *after, held.checked_sub(*amount));
            moved(
                Movement::Captured,
                false,
                (order_id.as_uuid(), *amount, me, payee_wallet.as_uuid()),
            );
        }
        WalletEvent::HoldRefunded {
            order_id,
            amount,
            available: available_after,
            held: held_after,
        } => {
            let hold = wallet.holds().get(order_id).cloned();
            settle_hold(wallet, order_id, *amount, "refunded", findings);
            expect_balance(
                findings,
                "available",
                *available_after,
                available.checked_add(*amount),
            );
            expect_balance(findings, "held", *held_after, held.checked_sub(*amount));
            // Only a legacy hold has a seller's side to cancel.
            if let Some(hold) = hold.filter(|hold| hold.incoming_expected) {
                moved(
                    Movement::Refunded,
                    false,
                    (order_id.as_uuid(), *amount, me, hold.payee_wallet.as_uuid()),
                );
            }
        }
        WalletEvent::EscrowReceived {
            order_id,
            amount,
            payer_wallet,
            available: available_after,
            pending_incoming: pending_after,
        } => {
            // Straight from a captured hold, unless a legacy entry expected
            // it: then from that entry, which it settles.
            let legacy = wallet.incoming().contains_key(order_id);
            if legacy {
                settle_incoming(wallet, order_id, *amount, "received", findings);
            } else if wallet.settled_incoming().contains(order_id) {
                findings.push(Finding::new(
                    "double_settlement",
                    format!("the escrow for order {order_id} is received a second time"),
                ));
            }
            positive(*amount, findings);
            expect_balance(
                findings,
                "available",
                *available_after,
                available.checked_add(*amount),
            );
            expect_balance(
                findings,
                "pending_incoming",
                *pending_after,
                if legacy {
                    pending.checked_sub(*amount)
                } else {
                    Some(pending)
                },
            );
            moved(
                Movement::Captured,
                true,
                (order_id.as_uuid(), *amount, payer_wallet.as_uuid(), me),
            );
        }
        WalletEvent::IncomingCancelled {
            order_id,
            amount,
            pending_incoming: after,
        } => {
            let payer = wallet
                .incoming()
                .get(order_id)
                .map(|i| i.payer_wallet.as_uuid());
            settle_incoming(wallet, order_id, *amount, "cancelled", findings);
            expect_balance(
                findings,
                "pending_incoming",
                *after,
                pending.checked_sub(*amount),
            );
            moved(
                Movement::Refunded,
                true,
                (order_id.as_uuid(), *amount, payer.unwrap_or_default(), me),
            );
        }
        WalletEvent::PaymentReturned {
            order_id,
            amount,
            to_wallet,
            available: after,
        } => {
            positive(*amount, findings);
            expect_balance(
                findings,
                "available",
                *after,
                available.checked_sub(*amount),
            );
            moved(
                Movement::Returned,
                false,
                (order_id.as_uuid(), *amount, me, to_wallet.as_uuid()),
            );
        }
        WalletEvent::RefundReceived {
            order_id,
            amount,
            from_wallet,
            available: after,
        } => {
            positive(*amount, findings);
            expect_balance(
                findings,
                "available",
                *after,
                available.checked_add(*amount),
            );
            moved(
                Movement::Returned,
                true,
                (order_id.as_uuid(), *amount, from_wallet.as_uuid(), me),
            );
        }
    }
    let again = match &event {
        WalletEvent::PaymentReturned { order_id, .. } => wallet
            .returned_payments()
            .contains(order_id)
            .then(|| format!("the payment of order {order_id} is returned a second time")),
        WalletEvent::RefundReceived { order_id, .. } => wallet
            .received_refunds()
            .contains(order_id)
            .then(|| format!("the refund of order {order_id} is received a second time")),
        _ => None,
    };
    if let Some(message) = again {
        findings.push(Finding::new("double_settlement", message));
    }
    wallet.apply(event);
    for (name, value) in [
        ("available", wallet.available()),
        ("held", wallet.held()),
        ("pending_incoming", wallet.pending_incoming()),
    ] {
        if value < 0 {
            findings.push(Finding::new(
                "negative_balance",
                format!("leaves the wallet's {name} balance at {value}"),
            ));
        }
    }
}

fn settle_hold(
    wallet: &Wallet,
    order_id: &crate::values::OrderId,
    amount: i64,
    what: &str,
    findings: &mut Vec<Finding>,
) {
    match wallet.holds().get(order_id) {
        Some(hold) if hold.amount == amount => {}
        Some(hold) => findings.push(Finding::new(
            "balance_mismatch",
            format!(
                "{what} {amount} of the hold for order {order_id}, which holds {}",
                hold.amount
            ),
        )),
        None if wallet.settled_holds().contains(order_id) => findings.push(Finding::new(
            "double_settlement",
            format!("the hold for order {order_id} is {what} a second time"),
        )),
        None => findings.push(Finding::new(
            "double_settlement",
            format!("{what} a hold for order {order_id} that was never placed"),
        )),
    }
}

fn settle_incoming(
    wallet: &Wallet,
    order_id: &crate::values::OrderId,
    amount: i64,
    what: &str,
    findings: &mut Vec<Finding>,
) {
    match wallet.incoming().get(order_id) {
        Some(incoming) if incoming.amount == amount => {}
        Some(incoming) => findings.push(Finding::new(
            "balance_mismatch",
            format!(
                "{what} {amount} of the escrow expected for order {order_id}, which is {}",
                incoming.amount
            ),
        )),
        None if wallet.settled_incoming().contains(order_id) => findings.push(Finding::new(
            "double_settlement",
            format!("the escrow for order {order_id} is {what} a second time"),
        )),
        None => findings.push(Finding::new(
            "double_settlement",
            format!("{what} escrow for order {order_id} that was never expected"),
        )),
    }
}

fn order_event(order: &mut Order, event: OrderEvent, findings: &mut Vec<Finding>) {
    let event_type = event.event_type();
    let status = order.status();
    match (&event, order.exists()) {
        (OrderEvent::OrderPlaced { .. }, false) => {}
        (OrderEvent::OrderPlaced { .. }, true) => findings.push(Finding::new(
            "illegal_transition",
            format!("OrderPlaced on an order that is already {status}"),
        )),
        (_, false) => findings.push(Finding::new(
            "no_such_aggregate",
            format!("{event_type} on an order that was never placed"),
        )),
        (_, true) => {
            if let Some(from) = order_transition(&event_type)
                && !from.contains(&status)
            {
                findings.push(Finding::new(
                    "illegal_transition",
                    format!("{event_type} on an order that is {status}"),
                ));
            }
        }
    }
    let escrow = order.payment_method() == PaymentMethod::WalletEscrow;
    match &event {
        OrderEvent::EscrowReleased { amount, .. } if order.exists() => {
            if !escrow || order.escrow_released() {
                findings.push(Finding::new(
                    "double_settlement",
                    "escrow released twice, or for an order not paid by wallet escrow",
                ));
            }
            if amount != order.total() {
                findings.push(Finding::new(
                    "balance_mismatch",
                    format!(
                        "releases {} of an order of {}",
                        amount.amount(),
                        order.total().amount()
                    ),
                ));
            }
        }
        OrderEvent::OrderDelivered {
            escrow_to_release: Some(amount),
            ..
        } if order.exists() && (order.escrow_released() || !escrow || amount != order.total()) => {
            findings.push(Finding::new(
                "double_settlement",
                "delivery releases escrow that was released already or is not the order's",
            ));
        }
        OrderEvent::OrderAwaitingPayment
            if order.payment_method() != PaymentMethod::BankTransfer =>
        {
            findings.push(Finding::new(
                "illegal_transition",
                "awaits a payment of an order not paid by bank transfer",
            ));
        }
        OrderEvent::SellerReviewed { .. } if order.reviewed() => {
            findings.push(Finding::new(
                "illegal_transition",
                "the seller is reviewed twice",
            ));
        }
        _ => {}
    }
    order.apply(event);
}

fn reservation_event(pool: &mut Reservation, event: ReservationEvent, findings: &mut Vec<Finding>) {
    let existed = pool.exists();
    match (&event, existed) {
        (ReservationEvent::PoolOpened { .. }, true) => {
            findings.push(Finding::new(
                "illegal_event",
                "the stock pool is opened a second time",
            ));
        }
        (ReservationEvent::PoolOpened { .. }, false) => {}
        (_, false) => findings.push(Finding::new(
            "no_such_aggregate",
            "an event of a stock pool that was never opened",
        )),
        (_, true) => {}
    }
    let recorded_available = match &event {
        ReservationEvent::HoldPlaced {
            hold_id, quantity, ..
        } => {
            if pool.hold(*hold_id).is_some() {
                findings.push(Finding::new(
                    "double_settlement",
                    format!("hold {hold_id} is placed a second time"),
                ));
            }
            if *quantity > pool.available() {
                findings.push(Finding::new(
                    "oversold",
                    format!(
                        "holds {quantity} units when {} are available",
                        pool.available()
                    ),
                ));
            }
            event_available(&event)
        }
        ReservationEvent::HoldConfirmed {
            hold_id,
            quantity,
            stock,
            ..
        } => {
            match pool.hold(*hold_id) {
                Some(hold) if hold.quantity == *quantity => {}
                Some(hold) => findings.push(Finding::new(
                    "oversold",
                    format!("confirms {quantity} units of hold {hold_id}, which holds {}", hold.quantity),
                )),
                None => findings.push(Finding::new(
                    "double_settlement",
                    format!("confirms hold {hold_id}, which is not active (ended before or never placed)"),
                )),
            }
            if *quantity > pool.stock() {
                findings.push(Finding::new(
                    "oversold",
                    format!("sells {quantity} units of a stock of {}", pool.stock()),
                ));
            } else if *stock != pool.stock() - quantity {
                findings.push(Finding::new(
                    "balance_mismatch",
                    format!(
                        "records a stock of {stock} but {} minus {quantity} sold make {}",
                        pool.stock(),
                        pool.stock() - quantity
                    ),
                ));
            }
            event_available(&event)
        }
        ReservationEvent::HoldReleased { hold_id, .. }
        | ReservationEvent::HoldExpired { hold_id, .. } => {
            if pool.hold(*hold_id).is_none() {
                findings.push(Finding::new(
                    "double_settlement",
                    format!(
                        "ends hold {hold_id}, which is not active (ended before or never placed)"
                    ),
                ));
            }
            event_available(&event)
        }
        ReservationEvent::StockSet { .. } => event_available(&event),
        ReservationEvent::PoolOpened { .. } => None,
    };
    pool.apply(event);
    if pool.held() > pool.stock() {
        findings.push(Finding::new(
            "oversold",
            format!(
                "active holds of {} units exceed the stock of {}",
                pool.held(),
                pool.stock()
            ),
        ));
    }
    if let Some(recorded) = recorded_available
        && recorded != pool.available()
    {
        findings.push(Finding::new(
            "balance_mismatch",
            format!(
                "records {recorded} units available but the pool has {}",
                pool.available()
            ),
        ));
    }
}

fn event_available(event: &ReservationEvent) -> Option<u32> {
    match event {
        ReservationEvent::StockSet { available, .. }
        | ReservationEvent::HoldPlaced { available, .. }
        | ReservationEvent::HoldConfirmed { available, .. }
        | ReservationEvent::HoldReleased { available, .. }
        | ReservationEvent::HoldExpired { available, .. } => Some(*available),
        ReservationEvent::PoolOpened { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeDelta, TimeZone, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::order::{OrderCommand, OrderLine, Rating, ShippingAddress};
    use crate::reservation::Hold;
    use crate::values::{
        Actor, CheckoutId, Comment, Currency, HoldId, Label, ListingId, Money, OrderId, ProductId,
        Reason, Reference, Role, UserId, WalletId,
    };

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }
    fn wallet(n: u128) -> WalletId {
        WalletId::from_uuid(id(n))
    }
    fn order_id(n: u128) -> OrderId {
        OrderId::from_uuid(id(n))
    }
    fn eur(amount: i64) -> Money {
        Money::parse_positive(amount, "EUR").unwrap()
    }
    fn t(days: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0).unwrap() + TimeDelta::days(days)
    }

    /// Replays aggregates (each a type and its events) and returns every
    /// finding, those of `finish` last, as (aggregate index, event index, code).
    fn audit(aggregates: Vec<(&str, Vec<(String, String)>)>) -> Vec<(usize, usize, &'static str)> {
        let mut auditor = Auditor::new();
        let mut found = Vec::new();
        for (index, (aggregate_type, events)) in aggregates.into_iter().enumerate() {
            auditor.start(aggregate_type).unwrap();
            for (sequence, (version, payload)) in events.iter().enumerate() {
                let value: serde_json::Value = serde_json::from_str(payload).unwrap();
                let event_type = value.as_object().unwrap().keys().next().unwrap().clone();
                for finding in auditor.event(&event_type, version, payload) {
                    found.push((index, sequence, finding.code));
                }
            }
        }
        for finding in auditor.finish() {
            found.push((usize::MAX, 0, finding.code));
        }
        found
    }

    /// Each event as the store keeps it: its version and its payload.
    fn json<E: DomainEvent>(events: Vec<E>) -> Vec<(String, String)> {
        events
            .iter()
            .map(|e| (e.event_version(), serde_json::to_string(e).unwrap()))
            .collect()
    }

    /// `FundsHeld` as checkouts wrote it before pending funds became a read
    /// model: version 1, without `incoming_expected`.
    fn legacy(events: Vec<WalletEvent>) -> Vec<(String, String)> {
        json(events)
            .into_iter()
            .map(|(version, payload)| {
                let mut value: serde_json::Value = serde_json::from_str(&payload).unwrap();
                match value.get_mut("FundsHeld").and_then(|v| v.as_object_mut()) {
                    Some(fields) => {
                        fields.remove("incoming_expected");
                        ("1".to_owned(), value.to_string())
                    }
                    None => (version, payload),
                }
            })
            .collect()
    }

    fn reference() -> Reference {
        Reference::parse("reference", "r").unwrap()
    }

    fn opened(n: u128) -> WalletEvent {
        WalletEvent::WalletOpened {
            wallet_id: wallet(n),
            owner: UserId::from_uuid(id(n + 1000)),
            currency: Currency::parse("EUR").unwrap(),
        }
    }

    /// A buyer (wallet 1) pays a seller (wallet 2) 300 in escrow for order 9,
    /// as checkouts do now: the seller's wallet is written once, at capture.
    fn escrow_paid() -> (Vec<WalletEvent>, Vec<WalletEvent>) {
        use WalletEvent as E;
        let buyer = vec![
            opened(1),
            E::FundsDeposited {
                amount: 1_000,
                reference: reference(),
                available: 1_000,
            },
            E::FundsHeld {
                order_id: order_id(9),
                amount: 300,
                payee_wallet: wallet(2),
                available: 700,
                held: 300,
                incoming_expected: false,
            },
            E::HoldCaptured {
                order_id: order_id(9),
                amount: 300,
                payee_wallet: wallet(2),
                held: 0,
            },
        ];
        let seller = vec![
            opened(2),
            E::EscrowReceived {
                order_id: order_id(9),
                amount: 300,
                payer_wallet: wallet(1),
                available: 300,
                pending_incoming: 0,
            },
            E::FundsWithdrawn {
                amount: 100,
                reference: reference(),
                available: 200,
            },
        ];
        (buyer, seller)
    }

    /// The same escrow as a log written before the change holds it: the
    /// seller's wallet expected it at checkout (`FundsHeld` version 1).
    fn legacy_escrow_paid() -> (Vec<WalletEvent>, Vec<WalletEvent>) {
        use WalletEvent as E;
        let buyer = vec![
            opened(1),
            E::FundsDeposited {
                amount: 1_000,
                reference: reference(),
                available: 1_000,
            },
            E::FundsHeld {
                order_id: order_id(9),
                amount: 300,
                payee_wallet: wallet(2),
                available: 700,
                held: 300,
                incoming_expected: true,
            },
            E::HoldCaptured {
                order_id: order_id(9),
                amount: 300,
                payee_wallet: wallet(2),
                held: 0,
            },
        ];
        let seller = vec![
            opened(2),
            E::IncomingExpected {
                order_id: order_id(9),
                amount: 300,
                payer_wallet: wallet(1),
                pending_incoming: 300,
            },
            E::EscrowReceived {
                order_id: order_id(9),
                amount: 300,
                payer_wallet: wallet(1),
                available: 300,
                pending_incoming: 0,
            },
            E::FundsWithdrawn {
                amount: 100,
                reference: reference(),
                available: 200,
            },
        ];
        (buyer, seller)
    }

    #[test]
    fn an_escrow_paid_in_full_conserves_money_and_passes() {
        let (buyer, seller) = escrow_paid();
        assert_eq!(
            audit(vec![("Wallet", json(buyer)), ("Wallet", json(seller))]),
            vec![]
        );
    }

    /// The end-of-log checks of two auditors that replayed disjoint halves
    /// of the wallets, merged, are those of one auditor that replayed all.
    #[test]
    fn auditors_of_disjoint_halves_merged_find_what_one_auditor_finds() {
        let split = |buyer: Vec<WalletEvent>, seller: Vec<WalletEvent>| {
            let replay = |auditor: &mut Auditor, events: Vec<WalletEvent>| {
                auditor.start("Wallet").unwrap();
                for (version, payload) in json(events) {
                    let value: serde_json::Value = serde_json::from_str(&payload).unwrap();
                    let event_type = value.as_object().unwrap().keys().next().unwrap().clone();
                    assert_eq!(auditor.event(&event_type, &version, &payload), vec![]);
                }
            };
            let (mut first, mut second) = (Auditor::new(), Auditor::new());
            replay(&mut first, buyer);
            replay(&mut second, seller);
            first.merge(second);
            assert_eq!(first.aggregates(), 2);
            let mut codes: Vec<&str> = first.finish().iter().map(|f| f.code).collect();
            codes.sort_unstable();
            codes
        };
        let (buyer, seller) = escrow_paid();
        assert_eq!(split(buyer, seller), Vec::<&str>::new());
        // The capture is gone: neither half alone can tell.
        let (mut buyer, seller) = escrow_paid();
        buyer.pop();
        assert_eq!(
            split(buyer, seller),
            vec!["money_not_conserved", "unmatched_movement"]
        );
    }

    #[test]
    fn escrow_in_flight_counts_as_money_before_the_seller_is_paid() {
        let (mut buyer, mut seller) = escrow_paid();
        buyer.truncate(3);
        seller.truncate(1);
        assert_eq!(
            audit(vec![("Wallet", json(buyer)), ("Wallet", json(seller))]),
            vec![]
        );
        // Refunded: the seller's wallet never hears of it.
        let (mut buyer, mut seller) = escrow_paid();
        buyer[3] = WalletEvent::HoldRefunded {
            order_id: order_id(9),
            amount: 300,
            available: 1_000,
            held: 0,
        };
        seller.truncate(1);
        assert_eq!(
            audit(vec![("Wallet", json(buyer)), ("Wallet", json(seller))]),
            vec![]
        );
    }

    /// Logs written before pending funds became a read model still pass,
    /// paid, in flight or refunded; and their two sides must still match.
    #[test]
    fn an_old_log_with_expected_escrow_still_passes_and_still_pairs() {
        let (buyer, seller) = legacy_escrow_paid();
        assert_eq!(
            audit(vec![("Wallet", legacy(buyer)), ("Wallet", legacy(seller))]),
            vec![]
        );
        let (mut buyer, mut seller) = legacy_escrow_paid();
        buyer.truncate(3);
        seller.truncate(2);
        assert_eq!(
            audit(vec![
                ("Wallet", legacy(buyer.clone())),
                ("Wallet", legacy(seller.clone()))
            ]),
            vec![]
        );
        // The seller's expectation lost: the open legacy hold is unmatched.
        let found = audit(vec![
            ("Wallet", legacy(buyer.clone())),
            ("Wallet", legacy(vec![opened(2)])),
        ]);
        assert_eq!(found, vec![(usize::MAX, 0, "unmatched_movement")]);
        // Refunded on both sides.
        buyer.push(WalletEvent::HoldRefunded {
            order_id: order_id(9),
            amount: 300,
            available: 1_000,
            held: 0,
        });
        seller.push(WalletEvent::IncomingCancelled {
            order_id: order_id(9),
            amount: 300,
            pending_incoming: 0,
        });
        assert_eq!(
            audit(vec![("Wallet", legacy(buyer)), ("Wallet", legacy(seller))]),
            vec![]
        );
    }

    #[test]
    fn escrow_received_twice_is_a_double_settlement() {
        let (buyer, mut seller) = escrow_paid();
        seller.insert(
            2,
            WalletEvent::EscrowReceived {
                order_id: order_id(9),
                amount: 300,
                payer_wallet: wallet(1),
                available: 600,
                pending_incoming: 0,
            },
        );
        seller[3] = WalletEvent::FundsWithdrawn {
            amount: 100,
            reference: reference(),
            available: 500,
        };
        let found = audit(vec![("Wallet", json(buyer)), ("Wallet", json(seller))]);
        assert!(found.contains(&(1, 2, "double_settlement")), "{found:?}");
        assert!(
            found.contains(&(usize::MAX, 0, "money_not_conserved")),
            "{found:?}"
        );
    }

    #[test]
    fn a_balance_that_does_not_follow_from_the_amount_is_named() {
        let (mut buyer, seller) = escrow_paid();
        buyer[1] = WalletEvent::FundsDeposited {
            amount: 2_000,
            reference: reference(),
            available: 1_000,
        };
        let found = audit(vec![("Wallet", json(buyer)), ("Wallet", json(seller))]);
        assert!(found.contains(&(0, 1, "balance_mismatch")), "{found:?}");
    }

    #[test]
    fn a_hold_captured_twice_and_a_negative_balance_are_named() {
        let (mut buyer, seller) = escrow_paid();
        buyer.push(WalletEvent::HoldCaptured {
            order_id: order_id(9),
            amount: 300,
            payee_wallet: wallet(2),
            held: -300,
        });
        let found = audit(vec![("Wallet", json(buyer)), ("Wallet", json(seller))]);
        assert!(found.contains(&(0, 4, "double_settlement")), "{found:?}");
        assert!(found.contains(&(0, 4, "negative_balance")), "{found:?}");
        assert!(
            found.contains(&(usize::MAX, 0, "unmatched_movement")),
            "{found:?}"
        );
    }

    #[test]
    fn a_receipt_without_its_capture_breaks_conservation() {
        let (mut buyer, seller) = escrow_paid();
        // The capture is gone: the buyer still holds 300 in escrow, and the
        // seller received it too.
        buyer.pop();
        let found = audit(vec![("Wallet", json(buyer)), ("Wallet", json(seller))]);
        assert!(
            found.contains(&(usize::MAX, 0, "money_not_conserved")),
            "{found:?}"
        );
        assert!(
            found.contains(&(usize::MAX, 0, "unmatched_movement")),
            "{found:?}"
        );
    }

    #[test]
    fn a_hold_beyond_the_stock_is_overselling() {
        use ReservationEvent as E;
        let hold = |n: u128, available: u32| E::HoldPlaced {
            hold_id: HoldId::from_uuid(id(n)),
            holder: UserId::from_uuid(id(50)),
            quantity: 1,
            expires_at: t(1),
            order_id: None,
            available,
        };
        let events = vec![
            E::PoolOpened {
                listing_id: ListingId::from_uuid(id(7)),
                seller: UserId::from_uuid(id(8)),
                quantity: 1,
            },
            hold(1, 0),
            E::HoldConfirmed {
                hold_id: HoldId::from_uuid(id(1)),
                quantity: 1,
                order_id: None,
                stock: 0,
                available: 0,
            },
            hold(2, 0),
        ];
        let found = audit(vec![("Reservation", json(events))]);
        assert!(found.contains(&(0, 3, "oversold")), "{found:?}");
        assert!(found.iter().all(|(_, event, _)| *event == 3), "{found:?}");
        let _ = Hold {
            holder: UserId::from_uuid(id(1)),
            quantity: 1,
            expires_at: t(0),
            order_id: None,
        };
    }

    fn placed() -> OrderEvent {
        OrderEvent::OrderPlaced {
            order_id: order_id(9),
            checkout_id: CheckoutId::from_uuid(id(10)),
            buyer: UserId::from_uuid(id(1001)),
            seller: UserId::from_uuid(id(1002)),
            lines: vec![OrderLine {
                listing_id: ListingId::from_uuid(id(7)),
                product_id: ProductId::from_uuid(id(6)),
                quantity: 1,
                unit_price: eur(300),
                hold_id: HoldId::from_uuid(id(5)),
            }],
            shipping_address: ShippingAddress::parse("A", "1 street", None, "Tunis", "1000", "TN")
                .unwrap(),
            payment_method: PaymentMethod::WalletEscrow,
            buyer_wallet: Some(wallet(1)),
            seller_wallet: Some(wallet(2)),
            total: eur(300),
        }
    }

    #[test]
    fn an_order_shipped_before_it_was_confirmed_is_an_illegal_transition() {
        let shipped = OrderEvent::OrderShipped {
            carrier: Label::parse("carrier", "La Poste").unwrap(),
            tracking_number: Label::parse("tracking", "LP1").unwrap(),
            shipped_at: t(0),
            auto_release_at: t(7),
        };
        let found = audit(vec![("Order", json(vec![placed(), shipped]))]);
        assert_eq!(found, vec![(0, 1, "illegal_transition")]);
    }

    #[test]
    fn an_event_that_is_not_its_aggregates_is_undecodable() {
        let mut auditor = Auditor::new();
        auditor.start("Wallet").unwrap();
        let found = auditor.event("OrderConfirmed", "1", "\"OrderConfirmed\"");
        assert_eq!(found[0].code, "undecodable");
        assert!(auditor.start("Spaceship").is_err());
    }

    /// Every event the domain's own `decide` produces, from every status an
    /// order reaches, is legal for the transition table.
    #[test]
    fn the_transition_table_allows_exactly_what_decide_does_from_each_status() {
        use OrderStatus::*;
        let buyer = Actor::new(UserId::from_uuid(id(1001)), Role::Buyer);
        let seller = Actor::new(UserId::from_uuid(id(1002)), Role::Seller);
        let admin = Actor::new(UserId::from_uuid(id(3)), Role::Admin);
        let reason = || Reason::parse("reason", "r").unwrap();
        let commands = |now: DateTime<Utc>| -> Vec<OrderCommand> {
            let mut all = Vec::new();
            for actor in [buyer, seller, admin, Actor::system()] {
                all.extend([
                    OrderCommand::Reject {
                        actor,
                        code: "insufficient_stock",
                        reason: "r".into(),
                    },
                    OrderCommand::Confirm { actor },
                    OrderCommand::ConfirmPayment {
                        actor,
                        reference: reference(),
                    },
                    OrderCommand::Ship {
                        actor,
                        carrier: Label::parse("c", "c").unwrap(),
                        tracking_number: Label::parse("t", "t").unwrap(),
                        now,
                        release_after: crate::order::AUTO_RELEASE_AFTER,
                    },
                    OrderCommand::Deliver {
                        actor,
                        now,
                        return_window: crate::order::RETURN_WINDOW,
                    },
                    OrderCommand::ReleaseEscrow { actor, now },
                    OrderCommand::Complete { actor, now },
                    OrderCommand::Cancel {
                        actor,
                        reason: reason(),
                    },
                    OrderCommand::RequestReturn {
                        actor,
                        reason: reason(),
                        now,
                    },
                    OrderCommand::MarkReturned { actor },
                    OrderCommand::Refund { actor },
                    OrderCommand::Review {
                        actor,
                        rating: Rating::parse(5).unwrap(),
                        comment: Comment::parse("comment", "ok").unwrap(),
                    },
                ]);
            }
            all
        };
        // Walk every reachable state breadth first (a few levels deep).
        let mut frontier = vec![{
            let mut order = Order::default();
            order.apply(placed());
            order
        }];
        let mut seen_statuses = std::collections::BTreeSet::from([("placed", false, false)]);
        for _ in 0..8 {
            let mut next = Vec::new();
            for order in &frontier {
                for now in [t(1), t(30)] {
                    for command in commands(now) {
                        let Ok(events) = order.decide(command) else {
                            continue;
                        };
                        let mut after = order.clone();
                        for event in events {
                            let event_type = event.event_type();
                            if let Some(from) = order_transition(&event_type) {
                                assert!(
                                    from.contains(&after.status()),
                                    "decide makes {event_type} from {}",
                                    after.status()
                                );
                            }
                            let mut findings = Vec::new();
                            order_event(&mut after, event, &mut findings);
                            assert_eq!(findings, vec![], "from {}", order.status());
                        }
                        if seen_statuses.insert((
                            after.status().as_str(),
                            after.escrow_released(),
                            after.reviewed(),
                        )) {
                            next.push(after);
                        }
                    }
                }
            }
            frontier = next;
        }
        let statuses: std::collections::BTreeSet<&str> =
            seen_statuses.iter().map(|(status, _, _)| *status).collect();
        for status in [
            Placed,
            Confirmed,
            Shipped,
            Delivered,
            Completed,
            Cancelled,
            ReturnRequested,
            Returned,
            Refunded,
            Rejected,
        ] {
            assert!(
                statuses.contains(status.as_str()),
                "{status} never reached: {statuses:?}"
            );
        }
    }
}
