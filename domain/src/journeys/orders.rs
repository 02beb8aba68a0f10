//! The steps of an order after checkout. Each runs over the order and what
//! it touches ([`order_streams`]): its lines' stock pools and products and
//! its two wallets. Shipping confirms the stock holds (the items are sold)
//! and arms the escrow release; delivery captures the escrow (unless the
//! clock already did) and arms the order's completion at the end of the
//! return window; cancellation releases the holds and refunds the escrow;
//! a refund after a return pays the buyer back from the seller's wallet.

use chrono::{DateTime, Utc};

use super::{Deadlines, JourneyError, Stage, Stream, Timer, key, record_on_products};
use crate::Decide;
use crate::order::{Order, OrderCommand, OrderLine, OrderStatus, PaymentMethod};
use crate::reservation::{Reservation, ReservationCommand};
use crate::timeline::TimelineEntry;
use crate::values::{Actor, Label, Money, OrderId, Reason, Reference};
use crate::wallet::{Wallet, WalletCommand};

use super::CONFIRMED_ORDER_HOLD;

/// A step of an order after checkout: it names the streams the step's unit
/// of work declares ([`order_streams`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStep {
    ConfirmPayment,
    Ship,
    Deliver,
    ReleaseEscrow,
    Complete,
    Cancel,
    MarkReturned,
    Refund,
}

/// The streams `step` of order `order_id` touches, and no more: each one
/// declared is a lane the step queues on. The seller's wallet is written
/// only when money reaches or leaves it (a capture, a refund after a
/// return, and a cancellation, which settles the expected escrow a checkout
/// recorded before pending funds became a read model), so a busy seller's
/// payments confirmations and shipments do not queue on it.
pub fn order_streams(order_id: OrderId, order: &Order, step: OrderStep) -> Vec<Stream> {
    use OrderStep::*;
    let pools = matches!(step, ConfirmPayment | Ship | Cancel);
    let products = matches!(step, Ship | Deliver | MarkReturned);
    let buyer_wallet = matches!(step, Deliver | ReleaseEscrow | Cancel | Refund);
    let seller_wallet = buyer_wallet;
    let mut streams = vec![Stream::Order(order_id)];
    for line in order.lines() {
        if pools {
            streams.push(Stream::Reservation(line.listing_id));
        }
        if products {
            streams.push(Stream::Timeline(line.product_id));
        }
    }
    let wallets = [
        order.buyer_wallet().filter(|_| buyer_wallet),
        order.seller_wallet().filter(|_| seller_wallet),
    ];
    streams.extend(wallets.into_iter().flatten().map(Stream::Wallet));
    streams
}

/// The order's current state; a missing order is refused.
fn existing<S: Stage>(stage: &S, order_id: OrderId) -> Result<Order, JourneyError> {
    let order = stage.state::<Order>(&key(order_id))?;
    if !order.exists() {
        return Err(JourneyError::OrderNotFound(order_id));
    }
    Ok(order.clone())
}

/// An admin confirms a bank transfer. The stock stays held until shipment;
/// its bank-transfer expiry no longer applies, so each hold is renewed by
/// swapping it for a long one. The ship-by clock starts.
pub fn confirm_payment<S: Stage>(
    stage: &mut S,
    order_id: OrderId,
    actor: Actor,
    reference: Reference,
    now: DateTime<Utc>,
    deadlines: &Deadlines,
) -> Result<(), JourneyError> {
    existing(stage, order_id)?;
    stage.decide::<Order>(
        &key(order_id),
        OrderCommand::ConfirmPayment { actor, reference },
    )?;
    let order = existing(stage, order_id)?;
    for line in order.lines() {
        let pool = key(line.listing_id);
        stage.decide::<Reservation>(
            &pool,
            ReservationCommand::Release {
                actor: Actor::system(),
                hold_id: line.hold_id,
                reason: Reason::parse("reason", "payment confirmed: renewing the hold")
                    .unwrap_or_default(),
            },
        )?;
        stage.decide::<Reservation>(
            &pool,
            ReservationCommand::Reserve {
                actor: Actor::system(),
                hold_id: line.hold_id,
                holder: order.buyer(),
                quantity: line.quantity,
                expires_at: now + CONFIRMED_ORDER_HOLD,
                order_id: Some(order_id),
                now,
            },
        )?;
    }
    stage.schedule(Timer::ShipBy { order_id }, now + deadlines.ship_by);
    Ok(())
}

/// The seller ships: the held units are sold, the products' timelines say
/// so, and escrow is due to the seller `escrow_release_after` from now.
pub fn ship<S: Stage>(
    stage: &mut S,
    order_id: OrderId,
    actor: Actor,
    carrier: Label,
    tracking_number: Label,
    now: DateTime<Utc>,
    deadlines: &Deadlines,
) -> Result<(), JourneyError> {
    existing(stage, order_id)?;
    stage.decide::<Order>(
        &key(order_id),
        OrderCommand::Ship {
            actor,
            carrier: carrier.clone(),
            tracking_number,
            now,
            release_after: deadlines.escrow_release_after,
        },
    )?;
    let order = existing(stage, order_id)?;
    for line in order.lines() {
        stage.decide::<Reservation>(
            &key(line.listing_id),
            ReservationCommand::Confirm {
                actor: Actor::system(),
                hold_id: line.hold_id,
            },
        )?;
    }
    let price_of = |line: &OrderLine| {
        line.unit_price
            .times(line.quantity)
            .unwrap_or_else(|| line.unit_price.clone())
    };
    record_on_products(stage, order.lines(), |line| TimelineEntry::Sold {
        order_id,
        buyer: order.buyer(),
        price: price_of(line),
    })?;
    record_on_products(stage, order.lines(), |_| TimelineEntry::Shipped {
        order_id,
        carrier: carrier.clone(),
    })?;
    if order.payment_method() == PaymentMethod::WalletEscrow
        && let Some(due_at) = order.auto_release_at()
    {
        stage.schedule(Timer::EscrowRelease { order_id }, due_at);
    }
    Ok(())
}

/// The buyer (or an admin) confirms delivery: the escrow goes to the seller
/// unless the clock already released it, and the order completes by itself
/// when the return window closes.
pub fn deliver<S: Stage>(
    stage: &mut S,
    order_id: OrderId,
    actor: Actor,
    now: DateTime<Utc>,
    deadlines: &Deadlines,
) -> Result<(), JourneyError> {
    let released_before = existing(stage, order_id)?.escrow_released();
    stage.decide::<Order>(
        &key(order_id),
        OrderCommand::Deliver {
            actor,
            now,
            return_window: deadlines.return_window,
        },
    )?;
    let order = existing(stage, order_id)?;
    if !released_before && order.escrow_released() {
        capture_escrow(stage, order_id, &order)?;
    }
    record_on_products(stage, order.lines(), |_| TimelineEntry::Delivered {
        order_id,
    })?;
    if let Some(ends) = order.return_window_ends_at() {
        stage.schedule(Timer::ReturnWindowEnd { order_id }, ends);
    }
    Ok(())
}

/// Souk's clock (or an admin) releases the escrow to the seller. Whoever
/// comes second, the buyer's delivery or the clock, finds it released and
/// is refused: escrow is captured exactly once.
pub fn release_escrow<S: Stage>(
    stage: &mut S,
    order_id: OrderId,
    actor: Actor,
    now: DateTime<Utc>,
) -> Result<(), JourneyError> {
    existing(stage, order_id)?;
    stage.decide::<Order>(&key(order_id), OrderCommand::ReleaseEscrow { actor, now })?;
    let order = existing(stage, order_id)?;
    capture_escrow(stage, order_id, &order)
}

/// Completes a delivered order (the buyer any time; Souk once the return
/// window has closed).
pub fn complete<S: Stage>(
    stage: &mut S,
    order_id: OrderId,
    actor: Actor,
    now: DateTime<Utc>,
) -> Result<(), JourneyError> {
    existing(stage, order_id)?;
    stage.decide::<Order>(&key(order_id), OrderCommand::Complete { actor, now })
}

/// Moves an order's escrow from the buyer's held funds into the seller's
/// available funds: the one write of the escrow on the seller's wallet (a
/// legacy expected entry, if the checkout wrote one, is settled with it).
fn capture_escrow<S: Stage>(
    stage: &mut S,
    order_id: OrderId,
    order: &Order,
) -> Result<(), JourneyError> {
    if let (Some(buyer_wallet), Some(seller_wallet)) = (order.buyer_wallet(), order.seller_wallet())
    {
        // What leaves the buyer is what the seller receives: the hold.
        let amount = match stage
            .state::<Wallet>(&key(buyer_wallet))?
            .holds()
            .get(&order_id)
        {
            Some(hold) => Money::positive(hold.amount, order.total().currency().clone())
                .map_err(|error| JourneyError::Internal(error.to_string()))?,
            // No open hold: `CaptureHold` refuses below.
            None => order.total().clone(),
        };
        stage.decide::<Wallet>(
            &key(buyer_wallet),
            WalletCommand::CaptureHold {
                actor: Actor::system(),
                order_id,
            },
        )?;
        stage.decide::<Wallet>(
            &key(seller_wallet),
            WalletCommand::ReceiveEscrow {
                actor: Actor::system(),
                order_id,
                amount,
                payer_wallet: buyer_wallet,
            },
        )?;
    }
    Ok(())
}

/// Cancels an order, releases its stock holds and refunds its escrow. A
/// timer passes `only_if`: the status it was armed for; an order that moved
/// on is left alone.
pub fn cancel<S: Stage>(
    stage: &mut S,
    order_id: OrderId,
    actor: Actor,
    reason: Reason,
    only_if: Option<OrderStatus>,
) -> Result<(), JourneyError> {
    let before = existing(stage, order_id)?;
    if only_if.is_some_and(|status| status != before.status()) {
        return Err(JourneyError::OrderMovedOn);
    }
    stage.decide::<Order>(
        &key(order_id),
        OrderCommand::Cancel {
            actor,
            reason: reason.clone(),
        },
    )?;
    for line in before.lines() {
        let pool = stage.state::<Reservation>(&key(line.listing_id))?;
        // A hold that already expired has given its stock back.
        if pool.hold(line.hold_id).is_some() {
            stage.decide::<Reservation>(
                &key(line.listing_id),
                ReservationCommand::Release {
                    actor: Actor::system(),
                    hold_id: line.hold_id,
                    reason: reason.clone(),
                },
            )?;
        }
    }
    if let (Some(buyer_wallet), Some(seller_wallet)) =
        (before.buyer_wallet(), before.seller_wallet())
        && stage
            .state::<Wallet>(&key(buyer_wallet))?
            .holds()
            .contains_key(&order_id)
    {
        stage.decide::<Wallet>(
            &key(buyer_wallet),
            WalletCommand::RefundHold {
                actor: Actor::system(),
                order_id,
            },
        )?;
        // Only a checkout recorded before pending funds became a read model
        // told the seller's wallet to expect the escrow.
        if stage
            .state::<Wallet>(&key(seller_wallet))?
            .incoming()
            .contains_key(&order_id)
        {
            stage.decide::<Wallet>(
                &key(seller_wallet),
                WalletCommand::CancelIncoming {
                    actor: Actor::system(),
                    order_id,
                },
            )?;
        }
    }
    Ok(())
}

/// The seller (or an admin) received the returned item.
pub fn mark_returned<S: Stage>(
    stage: &mut S,
    order_id: OrderId,
    actor: Actor,
) -> Result<(), JourneyError> {
    existing(stage, order_id)?;
    stage.decide::<Order>(&key(order_id), OrderCommand::MarkReturned { actor })?;
    let order = existing(stage, order_id)?;
    record_on_products(stage, order.lines(), |_| TimelineEntry::Returned {
        order_id,
    })
}

/// A returned order is refunded: for wallet escrow, the seller's wallet pays
/// the buyer's back.
pub fn refund<S: Stage>(
    stage: &mut S,
    order_id: OrderId,
    actor: Actor,
) -> Result<(), JourneyError> {
    existing(stage, order_id)?;
    stage.decide::<Order>(&key(order_id), OrderCommand::Refund { actor })?;
    let order = existing(stage, order_id)?;
    if let (Some(buyer_wallet), Some(seller_wallet)) = (order.buyer_wallet(), order.seller_wallet())
    {
        let amount = order.total().clone();
        stage.decide::<Wallet>(
            &key(seller_wallet),
            WalletCommand::ReturnPayment {
                actor: Actor::system(),
                order_id,
                amount: amount.clone(),
                to_wallet: buyer_wallet,
            },
        )?;
        stage.decide::<Wallet>(
            &key(buyer_wallet),
            WalletCommand::ReceiveRefund {
                actor: Actor::system(),
                order_id,
                amount,
                from_wallet: seller_wallet,
            },
        )?;
    }
    Ok(())
}
