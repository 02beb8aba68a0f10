//! Checkout: for each seller of the cart (mall mode) place an order, put
//! stock aside for every line (a new hold, or the buyer's own hold named by
//! the line's `reservation`), hold the buyer's funds (wallet escrow) and
//! confirm the order. When stock, funds or the named hold fall short, what
//! that order staged is rolled back and the order is recorded as rejected
//! with the refusal's code as its reason; other refusals fail the request.
//! Nothing half-done reaches the log, so no compensation runs later.
//!
//! A checkout writes the order, each line's stock pool and product
//! timeline, and the buyer's wallet. It does not touch the seller's wallet:
//! the hold names it as payee, the seller's pending funds are derived from
//! the open holds (the `wallets` projection), and the wallet is credited
//! once, at capture. So the checkouts of one seller share no aggregate;
//! those of one listing share its stock pool (the decision), its product's
//! timeline and the listing they read, all three per listing. The payout
//! wallet's currency is the price's (checked when the listing is created; a
//! price never changes currency), so the capture can always credit it.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use super::{CONFIRMED_ORDER_HOLD, Deadlines, JourneyError, Stage, Stream, Timer, key};
use crate::Decide;
use crate::listing::{Listing, ListingStatus};
use crate::order::{Order, OrderCommand, OrderLine, OrderStatus, PaymentMethod, ShippingAddress};
use crate::reservation::{Reservation, ReservationCommand};
use crate::timeline::TimelineEntry;
use crate::values::{
    Actor, CheckoutId, HoldId, ListingId, OrderId, ProductId, Reason, UserId, WalletId,
};
use crate::wallet::{Wallet, WalletCommand};

/// One line of a cart, as the buyer sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckoutLine {
    pub listing_id: ListingId,
    pub quantity: u32,
    /// The buyer's own hold on the listing, to be used instead of a new one.
    pub reservation: Option<HoldId>,
}

/// A cart, parsed.
#[derive(Debug, Clone)]
pub struct CheckoutRequest {
    pub buyer: Actor,
    pub lines: Vec<CheckoutLine>,
    pub shipping_address: ShippingAddress,
    pub payment_method: PaymentMethod,
    pub buyer_wallet: Option<WalletId>,
}

/// One line of a planned order, with what was learnt of its listing.
#[derive(Debug, Clone)]
struct PlannedLine {
    listing_id: ListingId,
    product_id: ProductId,
    quantity: u32,
    hold_id: HoldId,
    /// Whether `hold_id` is the buyer's existing hold.
    adopted: bool,
}

/// One order of a checkout: the lines of one seller.
#[derive(Debug, Clone)]
pub struct PlannedOrder {
    pub order_id: OrderId,
    pub seller: UserId,
    pub seller_wallet: Option<WalletId>,
    lines: Vec<PlannedLine>,
}

/// What became of one order of a checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderOutcome {
    pub order_id: OrderId,
    pub status: OrderStatus,
    /// The code of the refusal that rejected it.
    pub reason: Option<&'static str>,
}

/// A checkout planned from the listings it names: who sells what, and the
/// ids of its orders and holds (fixed here, so that running it again after
/// a concurrency conflict creates the same ones).
#[derive(Debug, Clone)]
pub struct Checkout {
    pub checkout_id: CheckoutId,
    request: CheckoutRequest,
    orders: Vec<PlannedOrder>,
}

impl Checkout {
    /// Splits the cart per seller (sellers in id order, lines in the buyer's
    /// order). `listings` holds the state of every listing of the cart;
    /// sellers, products and payout wallets never change, so they may come
    /// from a cache; prices and status are read again under lock by `run`.
    pub fn plan(
        request: CheckoutRequest,
        listings: &BTreeMap<ListingId, Listing>,
    ) -> Result<Self, JourneyError> {
        if request.lines.is_empty() {
            return Err(JourneyError::NoLines);
        }
        let mut seen = BTreeSet::new();
        let mut orders: BTreeMap<UserId, PlannedOrder> = BTreeMap::new();
        for line in &request.lines {
            if !seen.insert(line.listing_id) {
                return Err(JourneyError::DuplicateLine(line.listing_id));
            }
            let listing = listings
                .get(&line.listing_id)
                .filter(|listing| listing.exists())
                .ok_or(JourneyError::ListingNotFound(line.listing_id))?;
            let order = orders
                .entry(listing.seller())
                .or_insert_with(|| PlannedOrder {
                    order_id: OrderId::new(),
                    seller: listing.seller(),
                    seller_wallet: listing.payout_wallet(),
                    lines: Vec::new(),
                });
            order.lines.push(PlannedLine {
                listing_id: line.listing_id,
                product_id: listing.product_id(),
                quantity: line.quantity,
                hold_id: line.reservation.unwrap_or_else(HoldId::new),
                adopted: line.reservation.is_some(),
            });
        }
        let orders: Vec<PlannedOrder> = orders.into_values().collect();
        if request.payment_method == PaymentMethod::WalletEscrow
            && let Some(order) = orders.iter().find(|order| order.seller_wallet.is_none())
        {
            return Err(JourneyError::SellerWalletMissing(order.seller));
        }
        Ok(Self {
            checkout_id: CheckoutId::new(),
            request,
            orders,
        })
    }

    pub fn orders(&self) -> &[PlannedOrder] {
        &self.orders
    }

    fn escrow(&self) -> bool {
        self.request.payment_method == PaymentMethod::WalletEscrow
    }

    /// Every stream the checkout reads or writes.
    pub fn streams(&self) -> Vec<Stream> {
        let mut streams = Vec::new();
        for order in &self.orders {
            streams.push(Stream::Order(order.order_id));
            for line in &order.lines {
                streams.push(Stream::Listing(line.listing_id));
                streams.push(Stream::Reservation(line.listing_id));
                streams.push(Stream::Timeline(line.product_id));
            }
        }
        if let Some(wallet) = self.request.buyer_wallet {
            streams.push(Stream::Wallet(wallet));
        }
        streams
    }

    /// The streams the checkout creates: its orders, whose ids `plan` has
    /// just generated, so they have no events yet (an executor may skip
    /// loading them).
    pub fn created_streams(&self) -> Vec<Stream> {
        self.orders
            .iter()
            .map(|order| Stream::Order(order.order_id))
            .collect()
    }

    /// Places every order of the checkout at `now`.
    pub fn run<S: Stage>(
        &self,
        stage: &mut S,
        now: DateTime<Utc>,
        deadlines: &Deadlines,
    ) -> Result<Vec<OrderOutcome>, JourneyError> {
        if let Some(wallet_id) = self.request.buyer_wallet {
            let wallet = stage.state::<Wallet>(&key(wallet_id))?;
            if !wallet.exists() {
                return Err(JourneyError::WalletNotFound);
            }
            if wallet.owner() != self.request.buyer.user_id {
                return Err(JourneyError::WalletNotYours);
            }
        }
        self.orders
            .iter()
            .map(|order| self.place(stage, order, now, deadlines))
            .collect()
    }

    fn place<S: Stage>(
        &self,
        stage: &mut S,
        order: &PlannedOrder,
        now: DateTime<Utc>,
        deadlines: &Deadlines,
    ) -> Result<OrderOutcome, JourneyError> {
        let request = &self.request;
        let mut lines = Vec::with_capacity(order.lines.len());
        for line in &order.lines {
            let listing = stage.state::<Listing>(&key(line.listing_id))?;
            if listing.status() != ListingStatus::Active {
                return Err(JourneyError::ListingUnavailable {
                    listing_id: line.listing_id,
                    status: listing.status().as_str(),
                });
            }
            lines.push(OrderLine {
                listing_id: line.listing_id,
                product_id: line.product_id,
                quantity: line.quantity,
                unit_price: listing.price().clone(),
                hold_id: line.hold_id,
            });
        }
        let escrow = self.escrow();
        stage.decide::<Order>(
            &key(order.order_id),
            OrderCommand::Place {
                actor: request.buyer,
                order_id: order.order_id,
                checkout_id: self.checkout_id,
                seller: order.seller,
                lines,
                shipping_address: request.shipping_address.clone(),
                payment_method: request.payment_method,
                buyer_wallet: request.buyer_wallet.filter(|_| escrow),
                seller_wallet: order.seller_wallet.filter(|_| escrow),
            },
        )?;
        let savepoint = stage.savepoint();
        match self.secure(stage, order, now, deadlines) {
            Ok(()) => Ok(OrderOutcome {
                order_id: order.order_id,
                status: stage.state::<Order>(&key(order.order_id))?.status(),
                reason: None,
            }),
            Err(error) if error.rejects_order() => {
                stage.rollback_to(savepoint);
                let reason = crate::DomainError::code(&error);
                stage.decide::<Order>(
                    &key(order.order_id),
                    OrderCommand::Reject {
                        actor: Actor::system(),
                        code: reason,
                        reason: error.to_string(),
                    },
                )?;
                Ok(OrderOutcome {
                    order_id: order.order_id,
                    status: OrderStatus::Rejected,
                    reason: Some(reason),
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Reserves the stock, holds the funds and confirms `order`.
    fn secure<S: Stage>(
        &self,
        stage: &mut S,
        order: &PlannedOrder,
        now: DateTime<Utc>,
        deadlines: &Deadlines,
    ) -> Result<(), JourneyError> {
        let request = &self.request;
        let buyer = request.buyer;
        let bank_transfer = request.payment_method == PaymentMethod::BankTransfer;
        let hold_until = now
            + if bank_transfer {
                deadlines.unpaid_order_after
            } else {
                CONFIRMED_ORDER_HOLD
            };
        for line in &order.lines {
            let pool = key(line.listing_id);
            if line.adopted {
                adopt_hold(stage, &pool, line, buyer.user_id, now)?;
            }
            stage.decide::<Reservation>(
                &pool,
                ReservationCommand::Reserve {
                    actor: buyer,
                    hold_id: line.hold_id,
                    holder: buyer.user_id,
                    quantity: line.quantity,
                    expires_at: hold_until,
                    order_id: Some(order.order_id),
                    now,
                },
            )?;
            stage.decide::<crate::timeline::ProductTimeline>(
                &key(line.product_id),
                crate::timeline::TimelineCommand::Record {
                    actor: Actor::system(),
                    product_id: line.product_id,
                    entry: TimelineEntry::Reserved {
                        listing_id: line.listing_id,
                        order_id: order.order_id,
                    },
                },
            )?;
        }
        if bank_transfer {
            stage.schedule(
                Timer::UnpaidOrder {
                    order_id: order.order_id,
                },
                hold_until,
            );
        }
        if let (true, Some(buyer_wallet), Some(seller_wallet)) =
            (self.escrow(), request.buyer_wallet, order.seller_wallet)
        {
            // The buyer's side only: the seller's wallet is credited at
            // capture, and its pending funds are derived from this hold.
            let total = stage.state::<Order>(&key(order.order_id))?.total().clone();
            stage.decide::<Wallet>(
                &key(buyer_wallet),
                WalletCommand::HoldFunds {
                    actor: buyer,
                    order_id: order.order_id,
                    amount: total,
                    payee_wallet: seller_wallet,
                },
            )?;
        }
        stage.decide::<Order>(
            &key(order.order_id),
            OrderCommand::Confirm {
                actor: Actor::system(),
            },
        )?;
        if !bank_transfer {
            stage.schedule(
                Timer::ShipBy {
                    order_id: order.order_id,
                },
                now + deadlines.ship_by,
            );
        }
        Ok(())
    }
}

/// Checks that the line's hold is the buyer's own, active, unexpired and of
/// the line's quantity, and frees it so that the order's hold replaces it
/// under the same id (with the order's expiry and the order's id).
fn adopt_hold<S: Stage>(
    stage: &mut S,
    pool: &str,
    line: &PlannedLine,
    buyer: UserId,
    now: DateTime<Utc>,
) -> Result<(), JourneyError> {
    let hold = stage
        .state::<Reservation>(pool)?
        .hold(line.hold_id)
        .cloned()
        .ok_or(JourneyError::ReservationNotActive(line.hold_id))?;
    if hold.holder != buyer {
        return Err(JourneyError::ReservationNotYours(line.hold_id));
    }
    if hold.order_id.is_some() {
        return Err(JourneyError::ReservationNotActive(line.hold_id));
    }
    if hold.expires_at <= now {
        return Err(JourneyError::ReservationExpired(line.hold_id));
    }
    if hold.quantity != line.quantity {
        return Err(JourneyError::ReservationQuantityMismatch {
            hold_id: line.hold_id,
            held: hold.quantity,
            ordered: line.quantity,
        });
    }
    stage.decide::<Reservation>(
        pool,
        ReservationCommand::Release {
            actor: Actor::system(),
            hold_id: line.hold_id,
            reason: Reason::parse("reason", "taken into an order").unwrap_or_default(),
        },
    )
}
