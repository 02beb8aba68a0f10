//! The journeys: Souk's application layer. A journey is one business step
//! that spans several aggregates (a checkout places orders, reserves stock
//! and holds funds; a delivery captures escrow into the seller's wallet).
//! Each journey is a plain function over a [`Stage`]: it reads the states of
//! the aggregates it declared, decides commands on them and arms timers,
//! and refuses with a typed [`JourneyError`] whose `code()` is what the HTTP
//! API answers. It does no IO: the event store implements [`Stage`] and
//! commits everything a journey staged as one unit of work (one Postgres
//! transaction), and the tests here implement it in memory.
//!
//! Layout: this file holds the shared vocabulary ([`Stage`], [`Stream`],
//! [`JourneyError`], [`Timer`], [`Deadlines`]); `checkout` places orders;
//! `orders` holds the follow-up steps of an order (payment, shipping,
//! delivery, escrow release, completion, cancellation, return, refund);
//! `listings` creates a listing with its stock pool and timeline entry,
//! changes its price and details, and plans a buyer's hold; `holds` releases and expires stock holds; `timers`
//! fires a [`Timer`] through the same code as a user's command.

mod checkout;
mod holds;
mod listings;
mod orders;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod timers;

pub use checkout::{Checkout, CheckoutLine, CheckoutRequest, OrderOutcome, PlannedOrder};
pub use holds::release_hold;
pub use listings::{DetailsUpdate, HoldRequest, NewListing, PlannedHold, PriceChange};
pub use orders::{
    OrderStep, cancel, complete, confirm_payment, deliver, mark_returned, order_streams, refund,
    release_escrow, ship,
};
pub use timers::{Fired, fire};

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::order::OrderLine;
use crate::process::deterministic_command_id;
use crate::timeline::{ProductTimeline, TimelineCommand, TimelineEntry};
use crate::values::{Actor, HoldId, ListingId, OrderId, ProductId, UserId, WalletId};
use crate::{Decide, DomainError, Refusal};

/// The aggregates a journey runs over: it reads and changes them through
/// this, and the executor makes everything staged atomic.
pub trait Stage {
    /// A point the stage can go back to, undoing what was staged after it.
    type Savepoint;

    /// The current (staged) state of `A` `id`, which must have been declared.
    fn state<A: Decide>(&self, id: &str) -> Result<&A, JourneyError>;

    /// Decides `command` on `A` `id` and stages its events; a refusal stages
    /// nothing and comes back as [`JourneyError::Refused`].
    fn decide<A: Decide>(&mut self, id: &str, command: A::Command) -> Result<(), JourneyError>;

    fn savepoint(&mut self) -> Self::Savepoint;

    fn rollback_to(&mut self, savepoint: Self::Savepoint);

    /// Arms `timer` at `due_at`, in the same unit of work.
    fn schedule(&mut self, timer: Timer, due_at: DateTime<Utc>);
}

/// One aggregate instance a journey declares it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    Order(OrderId),
    Wallet(WalletId),
    Listing(ListingId),
    /// The stock pool of a listing (its id is the listing's).
    Reservation(ListingId),
    Timeline(ProductId),
}

/// Why a journey refused. Nothing it staged is written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JourneyError {
    #[error("listing {0} does not exist")]
    ListingNotFound(ListingId),
    #[error("listing {listing_id} is {status}")]
    ListingUnavailable {
        listing_id: ListingId,
        status: &'static str,
    },
    #[error("order {0} does not exist")]
    OrderNotFound(OrderId),
    #[error("the wallet does not exist")]
    WalletNotFound,
    #[error("the wallet is not yours")]
    WalletNotYours,
    /// A listing's payout wallet must hold the currency of its price.
    #[error("the payout wallet's currency differs from the price's")]
    PayoutCurrencyMismatch,
    #[error("seller {0} takes no wallet payments: the listing has no payout wallet")]
    SellerWalletMissing(UserId),
    #[error("an order needs at least one line")]
    NoLines,
    #[error("listing {0} appears on more than one line")]
    DuplicateLine(ListingId),
    /// A checkout line names a hold that is someone else's.
    #[error("reservation {0} is not yours")]
    ReservationNotYours(HoldId),
    /// A checkout line names a hold whose time is up.
    #[error("reservation {0} has expired")]
    ReservationExpired(HoldId),
    /// A checkout line names a hold that was released, sold or never was.
    #[error("reservation {0} is not active on this listing")]
    ReservationNotActive(HoldId),
    #[error("reservation {hold_id} holds {held} units, the line orders {ordered}")]
    ReservationQuantityMismatch {
        hold_id: HoldId,
        held: u32,
        ordered: u32,
    },
    /// A hold that belongs to an order is released by cancelling the order.
    #[error("reservation {0} belongs to an order: cancel the order instead")]
    ReservationInOrder(HoldId),
    /// The order is no longer in the state a timer was armed for.
    #[error("the order moved on")]
    OrderMovedOn,
    /// An aggregate refused one of the journey's commands.
    #[error("{message}")]
    Refused {
        code: &'static str,
        refusal: Refusal,
        message: String,
    },
    /// A bug: a stream that was not declared, or a type mismatch.
    #[error("journey error: {0}")]
    Internal(String),
}

impl JourneyError {
    /// An aggregate's refusal, keeping its code.
    pub fn refused<E: DomainError>(error: &E) -> Self {
        Self::Refused {
            code: error.code(),
            refusal: error.refusal(),
            message: error.to_string(),
        }
    }

    /// Refusals that make a checkout record its order as rejected (with
    /// this code as the reason) instead of failing the request.
    pub fn rejects_order(&self) -> bool {
        matches!(
            self,
            Self::ReservationNotYours(_)
                | Self::ReservationExpired(_)
                | Self::ReservationNotActive(_)
                | Self::ReservationQuantityMismatch { .. }
                | Self::Refused {
                    code: "insufficient_stock" | "insufficient_funds",
                    ..
                }
        )
    }

    /// Refusals that mean "not yet" to a timer: it is tried again later.
    pub fn is_too_early(&self) -> bool {
        matches!(
            self,
            Self::Refused {
                code: "not_yet_due" | "not_yet_expired" | "return_window_open",
                ..
            }
        )
    }
}

impl DomainError for JourneyError {
    fn code(&self) -> &'static str {
        match self {
            Self::ListingNotFound(_) => "listing_not_found",
            Self::ListingUnavailable { .. } => "listing_unavailable",
            Self::OrderNotFound(_) => "order_not_found",
            Self::WalletNotFound => "wallet_not_found",
            Self::WalletNotYours => "forbidden",
            Self::PayoutCurrencyMismatch => "currency_mismatch",
            Self::SellerWalletMissing(_) => "seller_wallet_missing",
            Self::NoLines => "too_short",
            Self::DuplicateLine(_) => "duplicate_line",
            Self::ReservationNotYours(_) => "reservation_not_yours",
            Self::ReservationExpired(_) => "reservation_expired",
            Self::ReservationNotActive(_) => "reservation_not_active",
            Self::ReservationQuantityMismatch { .. } => "reservation_quantity_mismatch",
            Self::ReservationInOrder(_) => "reservation_in_order",
            Self::OrderMovedOn => "illegal_transition",
            Self::Refused { code, .. } => code,
            Self::Internal(_) => "internal",
        }
    }

    fn refusal(&self) -> Refusal {
        match self {
            Self::ListingNotFound(_) | Self::OrderNotFound(_) | Self::WalletNotFound => {
                Refusal::NotFound
            }
            Self::WalletNotYours | Self::ReservationNotYours(_) => Refusal::Forbidden,
            Self::NoLines | Self::DuplicateLine(_) | Self::PayoutCurrencyMismatch => {
                Refusal::Invalid
            }
            Self::Refused { refusal, .. } => *refusal,
            _ => Refusal::Conflict,
        }
    }
}

/// The durable timers of the journeys. Stored as `kind` (the serde tag)
/// plus a JSON `payload` in the `timers` table; the tags and payload shapes
/// are those of the rows written before this enum existed, so old rows
/// still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "payload", rename_all = "snake_case")]
pub enum Timer {
    /// Expires a buyer's hold whose time is up.
    HoldExpiry {
        listing_id: ListingId,
        hold_id: HoldId,
    },
    /// Cancels an order whose bank transfer never arrived.
    UnpaidOrder { order_id: OrderId },
    /// Releases escrow to the seller when the buyer never confirms delivery.
    #[serde(rename = "escrow_auto_release")]
    EscrowRelease { order_id: OrderId },
    /// Completes a delivered order once its return window has closed.
    ReturnWindowEnd { order_id: OrderId },
    /// Cancels and refunds a confirmed order that was not shipped in time.
    ShipBy { order_id: OrderId },
}

impl Timer {
    /// The timer's id, derived from what it is about, so that arming it
    /// twice stores it once.
    pub fn id(&self) -> Uuid {
        match self {
            Self::HoldExpiry { hold_id, .. } => hold_id.as_uuid(),
            Self::UnpaidOrder { order_id } => {
                deterministic_command_id("unpaid-order", &[&order_id.to_string()])
            }
            Self::EscrowRelease { order_id } => {
                deterministic_command_id("escrow-auto-release", &[&order_id.to_string()])
            }
            Self::ReturnWindowEnd { order_id } => {
                deterministic_command_id("return-window-end", &[&order_id.to_string()])
            }
            Self::ShipBy { order_id } => {
                deterministic_command_id("ship-by", &[&order_id.to_string()])
            }
        }
    }

    /// The stored `kind` column.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::HoldExpiry { .. } => "hold_expiry",
            Self::UnpaidOrder { .. } => "unpaid_order",
            Self::EscrowRelease { .. } => "escrow_auto_release",
            Self::ReturnWindowEnd { .. } => "return_window_end",
            Self::ShipBy { .. } => "ship_by",
        }
    }

    /// The stored `payload` column.
    pub fn payload(&self) -> serde_json::Value {
        serde_json::to_value(self)
            .ok()
            .and_then(|mut value| value.get_mut("payload").map(serde_json::Value::take))
            .unwrap_or_default()
    }

    /// Reads a stored row back.
    pub fn from_row(kind: &str, payload: &serde_json::Value) -> Result<Self, String> {
        serde_json::from_value(serde_json::json!({"kind": kind, "payload": payload}))
            .map_err(|error| format!("unreadable {kind} timer: {error}"))
    }
}

/// How long the clocks of an order run (configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Escrow goes to the seller this long after shipment.
    pub escrow_release_after: TimeDelta,
    /// A delivered order accepts returns this long, then completes.
    pub return_window: TimeDelta,
    /// A bank transfer must arrive within this.
    pub unpaid_order_after: TimeDelta,
    /// A confirmed order not shipped within this is cancelled and refunded.
    pub ship_by: TimeDelta,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            escrow_release_after: crate::order::AUTO_RELEASE_AFTER,
            return_window: crate::order::RETURN_WINDOW,
            unpaid_order_after: TimeDelta::days(3),
            ship_by: TimeDelta::days(7),
        }
    }
}

/// Stock of a confirmed order stays held until it ships; this bounds it.
pub const CONFIRMED_ORDER_HOLD: TimeDelta = TimeDelta::days(365);

/// The id of aggregate stream `id` as the store keys it.
pub(crate) fn key(id: impl ToString) -> String {
    id.to_string()
}

/// Records `entry(line)` on the timeline of every line's product.
pub(crate) fn record_on_products<S: Stage>(
    stage: &mut S,
    lines: &[OrderLine],
    entry: impl Fn(&OrderLine) -> TimelineEntry,
) -> Result<(), JourneyError> {
    for line in lines {
        stage.decide::<ProductTimeline>(
            &key(line.product_id),
            TimelineCommand::Record {
                actor: Actor::system(),
                product_id: line.product_id,
                entry: entry(line),
            },
        )?;
    }
    Ok(())
}
