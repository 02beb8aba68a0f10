//! The Order aggregate: what one buyer bought from one seller in one
//! checkout, and its life cycle:
//!
//! ```text
//! placed ──► confirmed ──► shipped ──► delivered ──► completed
//!   │ └──► awaiting_payment ──► confirmed      └──► return_requested ──► returned ──► refunded
//!   └──► rejected
//! placed, awaiting_payment, confirmed ──► cancelled
//! ```
//!
//! Stock and money are not here: the checkout process manager reserves
//! stock (Reservation) and holds funds (Wallet) between `Place` and
//! `Confirm`, and the events of this aggregate tell the process managers
//! what to move next (`OrderDelivered::escrow_to_release`,
//! `OrderCancelled::refund`, `OrderRefunded::amount`). Unit prices are
//! copied into the order when it is placed, so a later price change never
//! alters it.

use std::collections::BTreeSet;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::values::{
    Actor, CheckoutId, Comment, CountryCode, Currency, HoldId, Label, ListingId, Money, OrderId,
    ProductId, Reason, Reference, Role, Text, UserId, ValidationError, WalletId,
};
use crate::{Aggregate, Decide, DecodeError, DomainError, DomainEvent, Refusal};

/// Escrow goes to the seller this long after shipment if the buyer never
/// confirms delivery.
pub const AUTO_RELEASE_AFTER: TimeDelta = TimeDelta::days(7);
/// The buyer may ask to return an order this long after delivery.
pub const RETURN_WINDOW: TimeDelta = TimeDelta::days(14);
/// Most lines one order may have.
pub const MAX_LINES: usize = 50;
/// Most units of one listing one line may order (the most one stock hold takes).
pub const MAX_LINE_QUANTITY: u32 = crate::reservation::MAX_HOLD_QUANTITY;
/// Longest rejection reason kept, in characters.
pub const MAX_REJECT_REASON_LEN: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentMethod {
    /// Funds held in the buyer's wallet and released to the seller's.
    #[default]
    WalletEscrow,
    /// Paid outside Souk; an admin confirms the payment.
    BankTransfer,
    /// Cash on delivery.
    Cod,
}

impl PaymentMethod {
    /// Every payment method.
    pub const ALL: [Self; 3] = [Self::WalletEscrow, Self::BankTransfer, Self::Cod];

    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        match text {
            "wallet_escrow" => Ok(Self::WalletEscrow),
            "bank_transfer" => Ok(Self::BankTransfer),
            "cod" => Ok(Self::Cod),
            _ => Err(ValidationError::new(
                "invalid_payment_method",
                format!("`{text}` is not one of wallet_escrow, bank_transfer, cod"),
            )),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::WalletEscrow => "wallet_escrow",
            Self::BankTransfer => "bank_transfer",
            Self::Cod => "cod",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    #[default]
    Placed,
    AwaitingPayment,
    Confirmed,
    Rejected,
    Shipped,
    Delivered,
    Completed,
    Cancelled,
    ReturnRequested,
    Returned,
    Refunded,
}

impl OrderStatus {
    /// Every status, in life-cycle order.
    pub const ALL: [Self; 11] = [
        Self::Placed,
        Self::AwaitingPayment,
        Self::Confirmed,
        Self::Rejected,
        Self::Shipped,
        Self::Delivered,
        Self::Completed,
        Self::Cancelled,
        Self::ReturnRequested,
        Self::Returned,
        Self::Refunded,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::AwaitingPayment => "awaiting_payment",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Shipped => "shipped",
            Self::Delivered => "delivered",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::ReturnRequested => "return_requested",
            Self::Returned => "returned",
            Self::Refunded => "refunded",
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One listing in an order, at the price it had when the order was placed,
/// with the stock hold the checkout placed for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub listing_id: ListingId,
    pub product_id: ProductId,
    pub quantity: u32,
    pub unit_price: Money,
    pub hold_id: HoldId,
}

/// The first line of a shipping address.
pub type AddressLine = Text<1, 200>;
/// The second line of a shipping address: blank is none.
pub type OptionalAddressLine = Text<0, 200>;
/// A postal code.
pub type PostalCode = Text<1, 20>;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShippingAddress {
    pub name: Label,
    pub line1: AddressLine,
    pub line2: Option<OptionalAddressLine>,
    pub city: Label,
    pub postal_code: PostalCode,
    pub country: CountryCode,
}

impl ShippingAddress {
    /// Parses outside input; a blank `line2` is no `line2`.
    pub fn parse(
        name: &str,
        line1: &str,
        line2: Option<&str>,
        city: &str,
        postal_code: &str,
        country: &str,
    ) -> Result<Self, ValidationError> {
        let line2 = match line2.map(str::trim) {
            None | Some("") => None,
            Some(line2) => Some(Text::parse("shipping_address.line2", line2)?),
        };
        Ok(Self {
            name: Label::parse("shipping_address.name", name)?,
            line1: Text::parse("shipping_address.line1", line1)?,
            line2,
            city: Label::parse("shipping_address.city", city)?,
            postal_code: Text::parse("shipping_address.postal_code", postal_code)?,
            country: CountryCode::parse(country)?,
        })
    }
}

/// A buyer's rating of a seller, 1 to 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rating(u8);

impl Rating {
    /// The lowest rating.
    pub const MIN: u8 = 1;
    /// The highest rating.
    pub const MAX: u8 = 5;

    /// Takes any integer so that out-of-range input (`0`, `300`, `-1`) is
    /// refused here with a clear code rather than by a number conversion.
    pub fn parse(value: i64) -> Result<Self, ValidationError> {
        match u8::try_from(value) {
            Ok(rating @ Self::MIN..=Self::MAX) => Ok(Self(rating)),
            _ => Err(ValidationError::new(
                "invalid_rating",
                "a rating is a whole number from 1 to 5",
            )),
        }
    }

    pub fn value(&self) -> u8 {
        self.0
    }
}

/// State of one order. Meaningful only once [`Decide::exists`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    placed: bool,
    order_id: OrderId,
    checkout_id: CheckoutId,
    buyer: UserId,
    seller: UserId,
    lines: Vec<OrderLine>,
    shipping_address: ShippingAddress,
    payment_method: PaymentMethod,
    buyer_wallet: Option<WalletId>,
    seller_wallet: Option<WalletId>,
    total: Money,
    status: OrderStatus,
    payment_reference: Option<Reference>,
    carrier: Option<Label>,
    tracking_number: Option<Label>,
    shipped_at: Option<DateTime<Utc>>,
    auto_release_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    return_window_ends_at: Option<DateTime<Utc>>,
    escrow_released: bool,
    reviewed: bool,
}

impl Order {
    pub fn order_id(&self) -> OrderId {
        self.order_id
    }
    pub fn checkout_id(&self) -> CheckoutId {
        self.checkout_id
    }
    pub fn buyer(&self) -> UserId {
        self.buyer
    }
    pub fn seller(&self) -> UserId {
        self.seller
    }
    pub fn lines(&self) -> &[OrderLine] {
        &self.lines
    }
    pub fn shipping_address(&self) -> &ShippingAddress {
        &self.shipping_address
    }
    pub fn payment_method(&self) -> PaymentMethod {
        self.payment_method
    }
    pub fn buyer_wallet(&self) -> Option<WalletId> {
        self.buyer_wallet
    }
    pub fn seller_wallet(&self) -> Option<WalletId> {
        self.seller_wallet
    }
    pub fn total(&self) -> &Money {
        &self.total
    }
    pub fn status(&self) -> OrderStatus {
        self.status
    }
    /// The reference an admin gave when confirming a bank transfer.
    pub fn payment_reference(&self) -> Option<&Reference> {
        self.payment_reference.as_ref()
    }
    pub fn carrier(&self) -> Option<&Label> {
        self.carrier.as_ref()
    }
    pub fn tracking_number(&self) -> Option<&Label> {
        self.tracking_number.as_ref()
    }
    pub fn shipped_at(&self) -> Option<DateTime<Utc>> {
        self.shipped_at
    }
    /// When the escrow goes to the seller if the buyer never confirms delivery.
    pub fn auto_release_at(&self) -> Option<DateTime<Utc>> {
        self.auto_release_at
    }
    pub fn delivered_at(&self) -> Option<DateTime<Utc>> {
        self.delivered_at
    }
    pub fn return_window_ends_at(&self) -> Option<DateTime<Utc>> {
        self.return_window_ends_at
    }
    /// Whether the escrow went to the seller (on delivery or automatically).
    pub fn escrow_released(&self) -> bool {
        self.escrow_released
    }
    pub fn reviewed(&self) -> bool {
        self.reviewed
    }
}

#[derive(Debug, Clone)]
pub enum OrderCommand {
    /// The buyer (the actor) orders from one seller. The checkout process
    /// manager has already placed one stock hold per line.
    Place {
        actor: Actor,
        order_id: OrderId,
        checkout_id: CheckoutId,
        seller: UserId,
        lines: Vec<OrderLine>,
        shipping_address: ShippingAddress,
        payment_method: PaymentMethod,
        buyer_wallet: Option<WalletId>,
        seller_wallet: Option<WalletId>,
    },
    /// Souk: stock, funds or the buyer's hold could not be secured; `code`
    /// is the refusal's, `reason` says it in a sentence.
    Reject {
        actor: Actor,
        code: &'static str,
        reason: String,
    },
    /// Souk: stock (and funds, for wallet escrow) are secured.
    Confirm { actor: Actor },
    /// An admin: the bank transfer arrived.
    ConfirmPayment { actor: Actor, reference: Reference },
    /// The seller.
    /// Escrow is due to the seller `release_after` from `now`.
    Ship {
        actor: Actor,
        carrier: Label,
        tracking_number: Label,
        now: DateTime<Utc>,
        release_after: TimeDelta,
    },
    /// The buyer, an admin or Souk (a carrier's webhook). Returns are
    /// accepted for `return_window` from `now`.
    Deliver {
        actor: Actor,
        now: DateTime<Utc>,
        return_window: TimeDelta,
    },
    /// Souk's auto-release timer or an admin.
    ReleaseEscrow { actor: Actor, now: DateTime<Utc> },
    /// The buyer at any time after delivery; Souk or an admin once the
    /// return window has closed.
    Complete { actor: Actor, now: DateTime<Utc> },
    /// The buyer, the seller or an admin, before shipment.
    Cancel { actor: Actor, reason: Reason },
    /// The buyer, within the return window.
    RequestReturn {
        actor: Actor,
        reason: Reason,
        now: DateTime<Utc>,
    },
    /// The seller or an admin: the returned item arrived.
    MarkReturned { actor: Actor },
    /// The seller, an admin or Souk.
    Refund { actor: Actor },
    /// The buyer, once, after delivery.
    Review {
        actor: Actor,
        rating: Rating,
        comment: Comment,
    },
}

// `OrderPlaced` is much larger than the other variants; boxing it would
// change the shape every projector matches on, to save bytes on a value that
// lives for one command.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderEvent {
    OrderPlaced {
        order_id: OrderId,
        checkout_id: CheckoutId,
        buyer: UserId,
        seller: UserId,
        lines: Vec<OrderLine>,
        shipping_address: ShippingAddress,
        payment_method: PaymentMethod,
        buyer_wallet: Option<WalletId>,
        seller_wallet: Option<WalletId>,
        total: Money,
    },
    /// Version 2: `code` is the stable code of the refusal, `reason` says
    /// it in a sentence (version 1 had `reason` only, holding the code).
    OrderRejected {
        code: String,
        reason: String,
    },
    OrderAwaitingPayment,
    /// An admin confirmed a bank transfer; the order is confirmed.
    PaymentConfirmed {
        reference: Reference,
    },
    OrderConfirmed,
    OrderShipped {
        carrier: Label,
        tracking_number: Label,
        shipped_at: DateTime<Utc>,
        auto_release_at: DateTime<Utc>,
    },
    /// `escrow_to_release` is what the process manager moves from the
    /// buyer's hold to the seller: `Some(total)` for wallet escrow not yet
    /// released automatically.
    OrderDelivered {
        delivered_at: DateTime<Utc>,
        return_window_ends_at: DateTime<Utc>,
        escrow_to_release: Option<Money>,
    },
    EscrowReleased {
        amount: Money,
        automatic: bool,
    },
    OrderCompleted,
    /// `refund` is what the process manager returns to the buyer's wallet:
    /// `Some(total)` for a confirmed wallet-escrow order.
    OrderCancelled {
        reason: Reason,
        by: Role,
        refund: Option<Money>,
    },
    ReturnRequested {
        reason: Reason,
    },
    OrderReturned,
    OrderRefunded {
        amount: Money,
    },
    SellerReviewed {
        seller: UserId,
        rating: u8,
        comment: Comment,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        match self {
            Self::OrderPlaced { .. } => "OrderPlaced",
            Self::OrderRejected { .. } => "OrderRejected",
            Self::OrderAwaitingPayment => "OrderAwaitingPayment",
            Self::PaymentConfirmed { .. } => "PaymentConfirmed",
            Self::OrderConfirmed => "OrderConfirmed",
            Self::OrderShipped { .. } => "OrderShipped",
            Self::OrderDelivered { .. } => "OrderDelivered",
            Self::EscrowReleased { .. } => "EscrowReleased",
            Self::OrderCompleted => "OrderCompleted",
            Self::OrderCancelled { .. } => "OrderCancelled",
            Self::ReturnRequested { .. } => "ReturnRequested",
            Self::OrderReturned => "OrderReturned",
            Self::OrderRefunded { .. } => "OrderRefunded",
            Self::SellerReviewed { .. } => "SellerReviewed",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        match self {
            Self::OrderRejected { .. } => "2",
            _ => "1",
        }
        .to_owned()
    }

    fn decode(event_type: &str, event_version: &str, payload: &str) -> Result<Self, DecodeError> {
        match (event_type, event_version) {
            ("OrderRejected", "1") => upcast_order_rejected_v1(payload),
            _ => crate::decode_current(event_type, event_version, payload),
        }
    }
}

/// Version 1 of `OrderRejected` had only `reason`, which always held the
/// code of the refusal (`insufficient_stock`); version 2 keeps the code and
/// a sentence apart.
fn upcast_order_rejected_v1(payload: &str) -> Result<OrderEvent, DecodeError> {
    #[derive(Deserialize)]
    enum V1 {
        OrderRejected { reason: String },
    }
    let V1::OrderRejected { reason } = serde_json::from_str(payload).map_err(|error| {
        DecodeError(format!(
            "the payload is not an OrderRejected version 1 event: {error}"
        ))
    })?;
    Ok(OrderEvent::OrderRejected {
        code: reason.clone(),
        reason,
    })
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OrderError {
    #[error("order not found")]
    NotFound,
    #[error("order already exists")]
    AlreadyExists,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    InvalidOrder(String),
    #[error("a line orders 1 to {MAX_LINE_QUANTITY} units, got {0}")]
    InvalidQuantity(u32),
    #[error("unit prices must be positive")]
    InvalidAmount,
    #[error("all lines must be priced in one currency, got {0} and {1}")]
    CurrencyMismatch(Currency, Currency),
    #[error("the order total exceeds the largest amount Souk accepts")]
    AmountTooLarge,
    #[error("a buyer may not order from themselves")]
    OwnListing,
    #[error("wallet escrow needs the buyer's and the seller's wallet")]
    WalletRequired,
    #[error("the date is out of range")]
    InvalidTime,
    #[error("cannot {action} an order that is {status}")]
    IllegalTransition {
        action: &'static str,
        status: OrderStatus,
    },
    #[error("this order is not paid by wallet escrow")]
    NotEscrow,
    #[error("the escrow is released automatically at {0}")]
    NotYetDue(DateTime<Utc>),
    #[error("the escrow was already released")]
    EscrowAlreadyReleased,
    #[error("the return window is open until {0}")]
    ReturnWindowOpen(DateTime<Utc>),
    #[error("the return window closed at {0}")]
    ReturnWindowClosed(DateTime<Utc>),
    #[error("the buyer already reviewed this order")]
    AlreadyReviewed,
}

impl DomainError for OrderError {
    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "order_not_found",
            Self::AlreadyExists => "already_exists",
            Self::Forbidden(_) => "forbidden",
            Self::InvalidOrder(_) => "invalid_order",
            Self::InvalidQuantity(_) => "invalid_quantity",
            Self::InvalidAmount => "invalid_amount",
            Self::CurrencyMismatch(..) => "currency_mismatch",
            Self::AmountTooLarge => "amount_too_large",
            Self::OwnListing => "own_listing",
            Self::WalletRequired => "wallet_required",
            Self::InvalidTime => "invalid_time",
            Self::IllegalTransition { .. } => "illegal_transition",
            Self::NotEscrow => "not_escrow",
            Self::NotYetDue(_) => "not_yet_due",
            Self::EscrowAlreadyReleased => "escrow_already_released",
            Self::ReturnWindowOpen(_) => "return_window_open",
            Self::ReturnWindowClosed(_) => "return_window_closed",
            Self::AlreadyReviewed => "already_reviewed",
        }
    }

    fn refusal(&self) -> Refusal {
        match self {
            Self::NotFound => Refusal::NotFound,
            Self::Forbidden(_) | Self::OwnListing => Refusal::Forbidden,
            Self::InvalidOrder(_)
            | Self::InvalidQuantity(_)
            | Self::InvalidAmount
            | Self::CurrencyMismatch(..)
            | Self::AmountTooLarge
            | Self::WalletRequired
            | Self::InvalidTime => Refusal::Invalid,
            Self::AlreadyExists
            | Self::IllegalTransition { .. }
            | Self::NotEscrow
            | Self::NotYetDue(_)
            | Self::EscrowAlreadyReleased
            | Self::ReturnWindowOpen(_)
            | Self::ReturnWindowClosed(_)
            | Self::AlreadyReviewed => Refusal::Conflict,
        }
    }
}

/// Σ unit_price × quantity of valid lines, in their one currency.
fn total_of(lines: &[OrderLine]) -> Result<Money, OrderError> {
    let Some(first) = lines.first() else {
        return Err(OrderError::InvalidOrder(
            "an order has at least one line".to_owned(),
        ));
    };
    let currency = first.unit_price.currency();
    let mut total = Money::zero(currency.clone());
    let mut holds = BTreeSet::new();
    for line in lines {
        if !(1..=MAX_LINE_QUANTITY).contains(&line.quantity) {
            return Err(OrderError::InvalidQuantity(line.quantity));
        }
        if line.unit_price.amount() <= 0 {
            return Err(OrderError::InvalidAmount);
        }
        if line.unit_price.currency() != currency {
            return Err(OrderError::CurrencyMismatch(
                currency.clone(),
                line.unit_price.currency().clone(),
            ));
        }
        // Each line settles its own stock hold; two lines on one hold would
        // confirm or release it twice.
        if !holds.insert(line.hold_id) {
            return Err(OrderError::InvalidOrder(format!(
                "hold {} appears on two lines",
                line.hold_id
            )));
        }
        let amount = line
            .unit_price
            .times(line.quantity)
            .ok_or(OrderError::AmountTooLarge)?;
        total = total.plus(&amount).ok_or(OrderError::AmountTooLarge)?;
    }
    Ok(total)
}

fn later(now: DateTime<Utc>, delta: TimeDelta) -> Result<DateTime<Utc>, OrderError> {
    now.checked_add_signed(delta).ok_or(OrderError::InvalidTime)
}

impl Order {
    fn found(&self) -> Result<(), OrderError> {
        if self.placed {
            Ok(())
        } else {
            Err(OrderError::NotFound)
        }
    }

    fn allow(&self, allowed: bool, why: &'static str) -> Result<(), OrderError> {
        self.found()?;
        if allowed {
            Ok(())
        } else {
            Err(OrderError::Forbidden(why))
        }
    }

    fn expect(&self, action: &'static str, from: &[OrderStatus]) -> Result<(), OrderError> {
        if from.contains(&self.status) {
            Ok(())
        } else {
            Err(OrderError::IllegalTransition {
                action,
                status: self.status,
            })
        }
    }

    fn is_escrow(&self) -> bool {
        self.payment_method == PaymentMethod::WalletEscrow
    }

    #[allow(clippy::too_many_arguments)] // The fields of `Place`, unpacked.
    fn place(
        &self,
        actor: Actor,
        order_id: OrderId,
        checkout_id: CheckoutId,
        seller: UserId,
        lines: Vec<OrderLine>,
        shipping_address: ShippingAddress,
        payment_method: PaymentMethod,
        buyer_wallet: Option<WalletId>,
        seller_wallet: Option<WalletId>,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        if self.placed {
            return Err(OrderError::AlreadyExists);
        }
        if actor.role != Role::Buyer {
            return Err(OrderError::Forbidden("only buyers place orders"));
        }
        if lines.is_empty() || lines.len() > MAX_LINES {
            return Err(OrderError::InvalidOrder(format!(
                "an order has 1 to {MAX_LINES} lines, got {}",
                lines.len()
            )));
        }
        let total = total_of(&lines)?;
        if actor.user_id == seller {
            return Err(OrderError::OwnListing);
        }
        if payment_method == PaymentMethod::WalletEscrow
            && (buyer_wallet.is_none() || seller_wallet.is_none())
        {
            return Err(OrderError::WalletRequired);
        }
        Ok(vec![OrderEvent::OrderPlaced {
            order_id,
            checkout_id,
            buyer: actor.user_id,
            seller,
            lines,
            shipping_address,
            payment_method,
            buyer_wallet,
            seller_wallet,
            total,
        }])
    }
}

impl Decide for Order {
    fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus::*;

        let event = match command {
            OrderCommand::Place {
                actor,
                order_id,
                checkout_id,
                seller,
                lines,
                shipping_address,
                payment_method,
                buyer_wallet,
                seller_wallet,
            } => {
                return self.place(
                    actor,
                    order_id,
                    checkout_id,
                    seller,
                    lines,
                    shipping_address,
                    payment_method,
                    buyer_wallet,
                    seller_wallet,
                );
            }
            OrderCommand::Reject {
                actor,
                code,
                reason,
            } => {
                self.allow(actor.is_system(), "only Souk rejects orders")?;
                self.expect("reject", &[Placed])?;
                // A compensation step must not fail over the length of its
                // message, so an overlong reason is cut rather than refused.
                OrderEvent::OrderRejected {
                    code: code.to_owned(),
                    reason: reason.chars().take(MAX_REJECT_REASON_LEN).collect(),
                }
            }
            OrderCommand::Confirm { actor } => {
                self.allow(actor.is_system(), "only Souk confirms orders")?;
                self.expect("confirm", &[Placed])?;
                if self.payment_method == PaymentMethod::BankTransfer {
                    OrderEvent::OrderAwaitingPayment
                } else {
                    OrderEvent::OrderConfirmed
                }
            }
            OrderCommand::ConfirmPayment { actor, reference } => {
                self.allow(actor.is_admin(), "only an admin confirms payments")?;
                self.expect("confirm the payment of", &[AwaitingPayment])?;
                OrderEvent::PaymentConfirmed { reference }
            }
            OrderCommand::Ship {
                actor,
                carrier,
                tracking_number,
                now,
                release_after,
            } => {
                self.allow(actor.is_user(self.seller), "only the seller ships")?;
                self.expect("ship", &[Confirmed])?;
                OrderEvent::OrderShipped {
                    carrier,
                    tracking_number,
                    shipped_at: now,
                    auto_release_at: later(now, release_after)?,
                }
            }
            OrderCommand::Deliver {
                actor,
                now,
                return_window,
            } => {
                self.allow(
                    actor.is_user(self.buyer) || actor.is_admin() || actor.is_system(),
                    "only the buyer, an admin or Souk confirms delivery",
                )?;
                self.expect("deliver", &[Shipped])?;
                OrderEvent::OrderDelivered {
                    delivered_at: now,
                    return_window_ends_at: later(now, return_window)?,
                    escrow_to_release: (self.is_escrow() && !self.escrow_released)
                        .then(|| self.total.clone()),
                }
            }
            OrderCommand::ReleaseEscrow { actor, now } => {
                self.allow(
                    actor.is_system() || actor.is_admin(),
                    "only Souk or an admin releases escrow",
                )?;
                if !self.is_escrow() {
                    return Err(OrderError::NotEscrow);
                }
                if self.escrow_released {
                    return Err(OrderError::EscrowAlreadyReleased);
                }
                self.expect("release the escrow of", &[Shipped, Delivered])?;
                let automatic = self.status == Shipped;
                if let (true, Some(due)) = (automatic, self.auto_release_at)
                    && now < due
                {
                    return Err(OrderError::NotYetDue(due));
                }
                OrderEvent::EscrowReleased {
                    amount: self.total.clone(),
                    automatic,
                }
            }
            OrderCommand::Complete { actor, now } => {
                let by_buyer = actor.is_user(self.buyer);
                self.allow(
                    by_buyer || actor.is_admin() || actor.is_system(),
                    "only the buyer, an admin or Souk completes an order",
                )?;
                self.expect("complete", &[Delivered])?;
                if let (false, Some(ends)) = (by_buyer, self.return_window_ends_at)
                    && now <= ends
                {
                    return Err(OrderError::ReturnWindowOpen(ends));
                }
                OrderEvent::OrderCompleted
            }
            OrderCommand::Cancel { actor, reason } => {
                // Souk itself cancels only an order whose bank transfer
                // never arrived (the unpaid-order timer) or that was not
                // shipped in time (the ship-by timer).
                self.allow(
                    actor.is_user(self.buyer)
                        || actor.is_user(self.seller)
                        || actor.is_admin()
                        || (actor.is_system()
                            && matches!(self.status, AwaitingPayment | Confirmed)),
                    "only the buyer, the seller or an admin cancels an order",
                )?;
                self.expect("cancel", &[Placed, AwaitingPayment, Confirmed])?;
                OrderEvent::OrderCancelled {
                    reason,
                    by: actor.role,
                    refund: (self.is_escrow() && self.status == Confirmed)
                        .then(|| self.total.clone()),
                }
            }
            OrderCommand::RequestReturn { actor, reason, now } => {
                self.allow(
                    actor.is_user(self.buyer),
                    "only the buyer requests a return",
                )?;
                self.expect("request the return of", &[Delivered])?;
                if let Some(ends) = self.return_window_ends_at
                    && now > ends
                {
                    return Err(OrderError::ReturnWindowClosed(ends));
                }
                OrderEvent::ReturnRequested { reason }
            }
            OrderCommand::MarkReturned { actor } => {
                self.allow(
                    actor.is_user(self.seller) || actor.is_admin(),
                    "only the seller or an admin marks an order returned",
                )?;
                self.expect("mark returned", &[ReturnRequested])?;
                OrderEvent::OrderReturned
            }
            OrderCommand::Refund { actor } => {
                self.allow(
                    actor.is_user(self.seller) || actor.is_admin() || actor.is_system(),
                    "only the seller, an admin or Souk refunds an order",
                )?;
                self.expect("refund", &[Returned])?;
                OrderEvent::OrderRefunded {
                    amount: self.total.clone(),
                }
            }
            OrderCommand::Review {
                actor,
                rating,
                comment,
            } => {
                self.allow(
                    actor.is_user(self.buyer),
                    "only the buyer reviews the seller",
                )?;
                self.expect(
                    "review",
                    &[Delivered, Completed, ReturnRequested, Returned, Refunded],
                )?;
                if self.reviewed {
                    return Err(OrderError::AlreadyReviewed);
                }
                OrderEvent::SellerReviewed {
                    seller: self.seller,
                    rating: rating.value(),
                    comment,
                }
            }
        };
        Ok(vec![event])
    }

    fn exists(&self) -> bool {
        self.placed
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "Order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    fn apply(&mut self, event: OrderEvent) {
        match event {
            OrderEvent::OrderPlaced {
                order_id,
                checkout_id,
                buyer,
                seller,
                lines,
                shipping_address,
                payment_method,
                buyer_wallet,
                seller_wallet,
                total,
            } => {
                *self = Self {
                    placed: true,
                    order_id,
                    checkout_id,
                    buyer,
                    seller,
                    lines,
                    shipping_address,
                    payment_method,
                    buyer_wallet,
                    seller_wallet,
                    total,
                    status: OrderStatus::Placed,
                    ..Self::default()
                };
            }
            OrderEvent::OrderRejected { .. } => self.status = OrderStatus::Rejected,
            OrderEvent::OrderAwaitingPayment => self.status = OrderStatus::AwaitingPayment,
            OrderEvent::PaymentConfirmed { reference } => {
                self.payment_reference = Some(reference);
                self.status = OrderStatus::Confirmed;
            }
            OrderEvent::OrderConfirmed => self.status = OrderStatus::Confirmed,
            OrderEvent::OrderShipped {
                carrier,
                tracking_number,
                shipped_at,
                auto_release_at,
            } => {
                self.carrier = Some(carrier);
                self.tracking_number = Some(tracking_number);
                self.shipped_at = Some(shipped_at);
                self.auto_release_at = Some(auto_release_at);
                self.status = OrderStatus::Shipped;
            }
            OrderEvent::OrderDelivered {
                delivered_at,
                return_window_ends_at,
                escrow_to_release,
            } => {
                self.delivered_at = Some(delivered_at);
                self.return_window_ends_at = Some(return_window_ends_at);
                self.escrow_released |= escrow_to_release.is_some();
                self.status = OrderStatus::Delivered;
            }
            OrderEvent::EscrowReleased { .. } => self.escrow_released = true,
            OrderEvent::OrderCompleted => self.status = OrderStatus::Completed,
            OrderEvent::OrderCancelled { .. } => self.status = OrderStatus::Cancelled,
            OrderEvent::ReturnRequested { .. } => self.status = OrderStatus::ReturnRequested,
            OrderEvent::OrderReturned => self.status = OrderStatus::Returned,
            OrderEvent::OrderRefunded { .. } => self.status = OrderStatus::Refunded,
            OrderEvent::SellerReviewed { .. } => self.reviewed = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::given;
    use chrono::TimeZone;

    use OrderCommand as C;
    use OrderEvent as E;

    fn user(n: u128) -> UserId {
        UserId::from_uuid(uuid::Uuid::from_u128(n))
    }
    fn buyer() -> Actor {
        Actor::new(user(1), Role::Buyer)
    }
    fn seller() -> Actor {
        Actor::new(user(2), Role::Seller)
    }
    fn stranger() -> Actor {
        Actor::new(user(3), Role::Buyer)
    }
    fn admin() -> Actor {
        Actor::new(user(4), Role::Admin)
    }
    fn system() -> Actor {
        Actor::system()
    }
    fn id(n: u128) -> uuid::Uuid {
        uuid::Uuid::from_u128(n)
    }
    fn eur(amount: i64) -> Money {
        Money::parse_positive(amount, "EUR").unwrap()
    }
    fn t(days: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0).unwrap() + TimeDelta::days(days)
    }
    fn reason() -> Reason {
        Reason::parse("reason", "does not fit").unwrap()
    }
    fn label(text: &str) -> Label {
        Label::parse("label", text).unwrap()
    }
    fn address() -> ShippingAddress {
        ShippingAddress::parse(
            "Amira B.",
            "12 rue de Marseille",
            None,
            "Tunis",
            "1000",
            "TN",
        )
        .unwrap()
    }
    fn line(n: u128, quantity: u32, unit_price: Money) -> OrderLine {
        OrderLine {
            listing_id: ListingId::from_uuid(id(100 + n)),
            product_id: ProductId::from_uuid(id(200 + n)),
            quantity,
            unit_price,
            hold_id: HoldId::from_uuid(id(300 + n)),
        }
    }
    fn lines() -> Vec<OrderLine> {
        vec![line(1, 2, eur(1_500)), line(2, 1, eur(700))]
    }

    fn place_with(payment_method: PaymentMethod, lines: Vec<OrderLine>) -> C {
        C::Place {
            actor: buyer(),
            order_id: OrderId::from_uuid(id(10)),
            checkout_id: CheckoutId::from_uuid(id(11)),
            seller: seller().user_id,
            lines,
            shipping_address: address(),
            payment_method,
            buyer_wallet: Some(WalletId::from_uuid(id(20))),
            seller_wallet: Some(WalletId::from_uuid(id(21))),
        }
    }

    fn placed(payment_method: PaymentMethod) -> E {
        E::OrderPlaced {
            order_id: OrderId::from_uuid(id(10)),
            checkout_id: CheckoutId::from_uuid(id(11)),
            buyer: buyer().user_id,
            seller: seller().user_id,
            lines: lines(),
            shipping_address: address(),
            payment_method,
            buyer_wallet: Some(WalletId::from_uuid(id(20))),
            seller_wallet: Some(WalletId::from_uuid(id(21))),
            total: eur(3_700),
        }
    }

    fn shipped() -> E {
        E::OrderShipped {
            carrier: label("La Poste"),
            tracking_number: label("LP123"),
            shipped_at: t(0),
            auto_release_at: t(7),
        }
    }
    fn delivered(escrow_to_release: Option<Money>) -> E {
        E::OrderDelivered {
            delivered_at: t(2),
            return_window_ends_at: t(16),
            escrow_to_release,
        }
    }

    /// History of an escrow order up to `status`.
    fn escrow_order_until(status: OrderStatus) -> Vec<E> {
        use OrderStatus::*;
        let path = [
            (Placed, placed(PaymentMethod::WalletEscrow)),
            (Confirmed, E::OrderConfirmed),
            (Shipped, shipped()),
            (Delivered, delivered(Some(eur(3_700)))),
            (ReturnRequested, E::ReturnRequested { reason: reason() }),
            (Returned, E::OrderReturned),
            (Refunded, E::OrderRefunded { amount: eur(3_700) }),
        ];
        let end = path
            .iter()
            .position(|(s, _)| *s == status)
            .expect("a status on the return path");
        path.into_iter().take(end + 1).map(|(_, e)| e).collect()
    }

    #[test]
    fn a_buyer_places_an_order_with_prices_fixed_at_order_time() {
        let order = given::<Order>([])
            .when(place_with(PaymentMethod::WalletEscrow, lines()))
            .then(vec![placed(PaymentMethod::WalletEscrow)]);
        assert_eq!(order.status(), OrderStatus::Placed);
        assert_eq!(order.total(), &eur(3_700));
        assert_eq!(order.buyer(), buyer().user_id);
        assert_eq!(order.seller(), seller().user_id);
        assert_eq!(order.lines(), lines().as_slice());
        assert_eq!(order.payment_method(), PaymentMethod::WalletEscrow);
        assert_eq!(order.buyer_wallet(), Some(WalletId::from_uuid(id(20))));
        assert_eq!(order.seller_wallet(), Some(WalletId::from_uuid(id(21))));
        assert_eq!(order.checkout_id(), CheckoutId::from_uuid(id(11)));
        assert_eq!(order.order_id(), OrderId::from_uuid(id(10)));
        assert_eq!(order.shipping_address(), &address());
    }

    #[test]
    fn placing_refuses_what_is_not_a_buyers_valid_order() {
        let refused = |command: C, code: &str| {
            given::<Order>([]).when(command).then_refused(code);
        };
        refused(place_with(PaymentMethod::Cod, vec![]), "invalid_order");
        let too_many = (0..51).map(|n| line(n, 1, eur(1))).collect();
        refused(place_with(PaymentMethod::Cod, too_many), "invalid_order");
        let mut same_hold = lines();
        same_hold[1].hold_id = same_hold[0].hold_id;
        refused(place_with(PaymentMethod::Cod, same_hold), "invalid_order");
        refused(
            place_with(PaymentMethod::Cod, vec![line(1, 0, eur(1))]),
            "invalid_quantity",
        );
        refused(
            place_with(PaymentMethod::Cod, vec![line(1, 1001, eur(1))]),
            "invalid_quantity",
        );
        let zero = Money::zero(Currency::parse("EUR").unwrap());
        refused(
            place_with(PaymentMethod::Cod, vec![line(1, 1, zero)]),
            "invalid_amount",
        );
        let mixed = vec![
            line(1, 1, eur(1)),
            line(2, 1, Money::parse_positive(1, "USD").unwrap()),
        ];
        refused(place_with(PaymentMethod::Cod, mixed), "currency_mismatch");
        let huge = vec![line(1, 2, eur(crate::values::MAX_AMOUNT))];
        refused(place_with(PaymentMethod::Cod, huge), "amount_too_large");
        let big = crate::values::MAX_AMOUNT / 2 + 1;
        let overflowing = vec![line(1, 1, eur(big)), line(2, 1, eur(big))];
        refused(
            place_with(PaymentMethod::Cod, overflowing),
            "amount_too_large",
        );

        let C::Place {
            order_id,
            checkout_id,
            lines,
            shipping_address,
            buyer_wallet,
            seller_wallet,
            ..
        } = place_with(PaymentMethod::WalletEscrow, lines())
        else {
            unreachable!()
        };
        let own = C::Place {
            actor: Actor::new(seller().user_id, Role::Buyer),
            order_id,
            checkout_id,
            seller: seller().user_id,
            lines: lines.clone(),
            shipping_address: shipping_address.clone(),
            payment_method: PaymentMethod::Cod,
            buyer_wallet,
            seller_wallet,
        };
        let error = given::<Order>([]).when(own).then_refused("own_listing");
        assert_eq!(error.refusal(), Refusal::Forbidden);
        for (buyer_wallet, seller_wallet) in [(None, seller_wallet), (buyer_wallet, None)] {
            let error = given::<Order>([])
                .when(C::Place {
                    actor: buyer(),
                    order_id,
                    checkout_id,
                    seller: seller().user_id,
                    lines: lines.clone(),
                    shipping_address: shipping_address.clone(),
                    payment_method: PaymentMethod::WalletEscrow,
                    buyer_wallet,
                    seller_wallet,
                })
                .then_refused("wallet_required");
            assert_eq!(error.refusal(), Refusal::Invalid);
        }
        let by_seller = C::Place {
            actor: seller(),
            order_id,
            checkout_id,
            seller: user(9),
            lines,
            shipping_address,
            payment_method: PaymentMethod::Cod,
            buyer_wallet,
            seller_wallet,
        };
        refused(by_seller, "forbidden");
    }

    #[test]
    fn an_order_is_placed_once() {
        given::<Order>([placed(PaymentMethod::Cod)])
            .when(place_with(PaymentMethod::Cod, lines()))
            .then_refused("already_exists");
    }

    #[test]
    fn commands_on_a_missing_order_are_not_found() {
        let error = given::<Order>([])
            .when(C::Confirm { actor: system() })
            .then_refused("order_not_found");
        assert_eq!(error.refusal(), Refusal::NotFound);
    }

    #[test]
    fn souk_confirms_or_rejects_a_placed_order() {
        let order = given::<Order>([placed(PaymentMethod::WalletEscrow)])
            .when(C::Confirm { actor: system() })
            .then(vec![E::OrderConfirmed]);
        assert_eq!(order.status(), OrderStatus::Confirmed);
        given::<Order>([placed(PaymentMethod::Cod)])
            .when(C::Confirm { actor: system() })
            .then(vec![E::OrderConfirmed]);

        let long = "x".repeat(5_000);
        let order = given::<Order>([placed(PaymentMethod::Cod)])
            .when(C::Reject {
                actor: system(),
                code: "insufficient_stock",
                reason: long,
            })
            .then(vec![E::OrderRejected {
                code: "insufficient_stock".to_owned(),
                reason: "x".repeat(MAX_REJECT_REASON_LEN),
            }]);
        assert_eq!(order.status(), OrderStatus::Rejected);

        for actor in [buyer(), admin()] {
            given::<Order>([placed(PaymentMethod::Cod)])
                .when(C::Confirm { actor })
                .then_refused("forbidden");
            given::<Order>([placed(PaymentMethod::Cod)])
                .when(C::Reject {
                    actor,
                    code: "insufficient_stock",
                    reason: String::new(),
                })
                .then_refused("forbidden");
        }
        let error = given::<Order>([placed(PaymentMethod::Cod), E::OrderConfirmed])
            .when(C::Reject {
                actor: system(),
                code: "insufficient_stock",
                reason: String::new(),
            })
            .then_refused("illegal_transition");
        assert_eq!(error.refusal(), Refusal::Conflict);
        assert!(error.to_string().contains("confirmed"));
        given::<Order>([placed(PaymentMethod::Cod), E::OrderConfirmed])
            .when(C::Confirm { actor: system() })
            .then_refused("illegal_transition");
    }

    #[test]
    fn a_bank_transfer_waits_for_an_admin_to_confirm_the_payment() {
        let history = [placed(PaymentMethod::BankTransfer)];
        let awaiting = given::<Order>(history.clone())
            .when(C::Confirm { actor: system() })
            .then(vec![E::OrderAwaitingPayment]);
        assert_eq!(awaiting.status(), OrderStatus::AwaitingPayment);

        let history = [placed(PaymentMethod::BankTransfer), E::OrderAwaitingPayment];
        let reference = Reference::parse("reference", "SEPA-42").unwrap();
        let confirmed = given::<Order>(history.clone())
            .when(C::ConfirmPayment {
                actor: admin(),
                reference: reference.clone(),
            })
            .then(vec![E::PaymentConfirmed {
                reference: reference.clone(),
            }]);
        assert_eq!(confirmed.status(), OrderStatus::Confirmed);
        assert_eq!(confirmed.payment_reference(), Some(&reference));

        for actor in [buyer(), seller(), system()] {
            given::<Order>(history.clone())
                .when(C::ConfirmPayment {
                    actor,
                    reference: reference.clone(),
                })
                .then_refused("forbidden");
        }
        given::<Order>([placed(PaymentMethod::BankTransfer)])
            .when(C::ConfirmPayment {
                actor: admin(),
                reference,
            })
            .then_refused("illegal_transition");
    }

    #[test]
    fn the_seller_ships_a_confirmed_order() {
        let ship = |actor| C::Ship {
            actor,
            carrier: label("La Poste"),
            tracking_number: label("LP123"),
            now: t(0),
            release_after: AUTO_RELEASE_AFTER,
        };
        let order = given::<Order>(escrow_order_until(OrderStatus::Confirmed))
            .when(ship(seller()))
            .then(vec![shipped()]);
        assert_eq!(order.status(), OrderStatus::Shipped);
        assert_eq!(order.auto_release_at(), Some(t(7)));
        assert_eq!(order.shipped_at(), Some(t(0)));
        assert_eq!(order.carrier(), Some(&label("La Poste")));
        assert_eq!(order.tracking_number(), Some(&label("LP123")));

        for actor in [
            buyer(),
            admin(),
            system(),
            Actor::new(user(9), Role::Seller),
        ] {
            given::<Order>(escrow_order_until(OrderStatus::Confirmed))
                .when(ship(actor))
                .then_refused("forbidden");
        }
        given::<Order>(escrow_order_until(OrderStatus::Placed))
            .when(ship(seller()))
            .then_refused("illegal_transition");
        given::<Order>(escrow_order_until(OrderStatus::Confirmed))
            .when(C::Ship {
                actor: seller(),
                carrier: label("La Poste"),
                tracking_number: label("LP123"),
                now: DateTime::<Utc>::MAX_UTC,
                release_after: AUTO_RELEASE_AFTER,
            })
            .then_refused("invalid_time");
    }

    #[test]
    fn delivery_of_an_escrow_order_releases_the_escrow() {
        for actor in [buyer(), admin(), system()] {
            let order = given::<Order>(escrow_order_until(OrderStatus::Shipped))
                .when(C::Deliver {
                    actor,
                    now: t(2),
                    return_window: RETURN_WINDOW,
                })
                .then(vec![delivered(Some(eur(3_700)))]);
            assert_eq!(order.status(), OrderStatus::Delivered);
            assert!(order.escrow_released());
            assert_eq!(order.delivered_at(), Some(t(2)));
            assert_eq!(order.return_window_ends_at(), Some(t(16)));
        }
        given::<Order>(escrow_order_until(OrderStatus::Shipped))
            .when(C::Deliver {
                actor: seller(),
                now: t(2),
                return_window: RETURN_WINDOW,
            })
            .then_refused("forbidden");
        given::<Order>(escrow_order_until(OrderStatus::Confirmed))
            .when(C::Deliver {
                actor: buyer(),
                now: t(2),
                return_window: RETURN_WINDOW,
            })
            .then_refused("illegal_transition");
    }

    #[test]
    fn delivery_releases_nothing_without_escrow_or_after_auto_release() {
        given::<Order>([placed(PaymentMethod::Cod), E::OrderConfirmed, shipped()])
            .when(C::Deliver {
                actor: buyer(),
                now: t(2),
                return_window: RETURN_WINDOW,
            })
            .then(vec![delivered(None)]);
        let mut history = escrow_order_until(OrderStatus::Shipped);
        history.push(E::EscrowReleased {
            amount: eur(3_700),
            automatic: true,
        });
        given::<Order>(history)
            .when(C::Deliver {
                actor: buyer(),
                now: t(2),
                return_window: RETURN_WINDOW,
            })
            .then(vec![delivered(None)]);
    }

    #[test]
    fn escrow_is_released_automatically_seven_days_after_shipment() {
        let history = escrow_order_until(OrderStatus::Shipped);
        let order = given::<Order>(history.clone())
            .when(C::ReleaseEscrow {
                actor: system(),
                now: t(7),
            })
            .then(vec![E::EscrowReleased {
                amount: eur(3_700),
                automatic: true,
            }]);
        assert!(order.escrow_released());
        assert_eq!(order.status(), OrderStatus::Shipped);

        let error = given::<Order>(history.clone())
            .when(C::ReleaseEscrow {
                actor: system(),
                now: t(7) - TimeDelta::seconds(1),
            })
            .then_refused("not_yet_due");
        assert_eq!(error.refusal(), Refusal::Conflict);
        for actor in [buyer(), seller()] {
            given::<Order>(history.clone())
                .when(C::ReleaseEscrow { actor, now: t(8) })
                .then_refused("forbidden");
        }
    }

    #[test]
    fn escrow_is_released_only_once_and_only_for_escrow_orders() {
        let mut history = escrow_order_until(OrderStatus::Shipped);
        history.push(E::EscrowReleased {
            amount: eur(3_700),
            automatic: true,
        });
        let error = given::<Order>(history)
            .when(C::ReleaseEscrow {
                actor: admin(),
                now: t(9),
            })
            .then_refused("escrow_already_released");
        assert_eq!(error.refusal(), Refusal::Conflict);
        // Delivery already released it.
        given::<Order>(escrow_order_until(OrderStatus::Delivered))
            .when(C::ReleaseEscrow {
                actor: system(),
                now: t(9),
            })
            .then_refused("escrow_already_released");

        given::<Order>([placed(PaymentMethod::Cod), E::OrderConfirmed, shipped()])
            .when(C::ReleaseEscrow {
                actor: system(),
                now: t(9),
            })
            .then_refused("not_escrow");
        given::<Order>(escrow_order_until(OrderStatus::Confirmed))
            .when(C::ReleaseEscrow {
                actor: system(),
                now: t(9),
            })
            .then_refused("illegal_transition");
    }

    #[test]
    fn a_delivered_order_recorded_before_release_can_still_be_released_by_hand() {
        // Events recorded by a version that did not release on delivery.
        let mut history = escrow_order_until(OrderStatus::Shipped);
        history.push(delivered(None));
        given::<Order>(history)
            .when(C::ReleaseEscrow {
                actor: admin(),
                now: t(3),
            })
            .then(vec![E::EscrowReleased {
                amount: eur(3_700),
                automatic: false,
            }]);
    }

    #[test]
    fn the_buyer_completes_any_time_and_souk_after_the_return_window() {
        let history = escrow_order_until(OrderStatus::Delivered);
        let order = given::<Order>(history.clone())
            .when(C::Complete {
                actor: buyer(),
                now: t(3),
            })
            .then(vec![E::OrderCompleted]);
        assert_eq!(order.status(), OrderStatus::Completed);

        for actor in [system(), admin()] {
            let error = given::<Order>(history.clone())
                .when(C::Complete { actor, now: t(16) })
                .then_refused("return_window_open");
            assert_eq!(error.refusal(), Refusal::Conflict);
            given::<Order>(history.clone())
                .when(C::Complete {
                    actor,
                    now: t(16) + TimeDelta::seconds(1),
                })
                .then(vec![E::OrderCompleted]);
        }
        given::<Order>(history)
            .when(C::Complete {
                actor: seller(),
                now: t(30),
            })
            .then_refused("forbidden");
        given::<Order>(escrow_order_until(OrderStatus::Shipped))
            .when(C::Complete {
                actor: buyer(),
                now: t(3),
            })
            .then_refused("illegal_transition");
    }

    #[test]
    fn an_order_is_cancelled_before_shipment_with_a_refund_of_held_escrow() {
        for actor in [buyer(), seller(), admin()] {
            let order = given::<Order>(escrow_order_until(OrderStatus::Confirmed))
                .when(C::Cancel {
                    actor,
                    reason: reason(),
                })
                .then(vec![E::OrderCancelled {
                    reason: reason(),
                    by: actor.role,
                    refund: Some(eur(3_700)),
                }]);
            assert_eq!(order.status(), OrderStatus::Cancelled);
        }
        given::<Order>([placed(PaymentMethod::BankTransfer), E::OrderAwaitingPayment])
            .when(C::Cancel {
                actor: buyer(),
                reason: reason(),
            })
            .then(vec![E::OrderCancelled {
                reason: reason(),
                by: Role::Buyer,
                refund: None,
            }]);
        given::<Order>([placed(PaymentMethod::WalletEscrow)])
            .when(C::Cancel {
                actor: buyer(),
                reason: reason(),
            })
            .then(vec![E::OrderCancelled {
                reason: reason(),
                by: Role::Buyer,
                refund: None,
            }]);
        given::<Order>(escrow_order_until(OrderStatus::Confirmed))
            .when(C::Cancel {
                actor: stranger(),
                reason: reason(),
            })
            .then_refused("forbidden");
        // Souk cancels a confirmed order that was not shipped in time.
        given::<Order>(escrow_order_until(OrderStatus::Confirmed))
            .when(C::Cancel {
                actor: system(),
                reason: reason(),
            })
            .then(vec![E::OrderCancelled {
                reason: reason(),
                by: Role::System,
                refund: Some(eur(3_700)),
            }]);
        // Souk cancels an unpaid bank transfer too.
        given::<Order>([placed(PaymentMethod::BankTransfer), E::OrderAwaitingPayment])
            .when(C::Cancel {
                actor: system(),
                reason: reason(),
            })
            .then(vec![E::OrderCancelled {
                reason: reason(),
                by: Role::System,
                refund: None,
            }]);
        for status in [OrderStatus::Shipped, OrderStatus::Delivered] {
            given::<Order>(escrow_order_until(status))
                .when(C::Cancel {
                    actor: buyer(),
                    reason: reason(),
                })
                .then_refused("illegal_transition");
        }
    }

    #[test]
    fn a_return_is_requested_within_fourteen_days_of_delivery() {
        let history = escrow_order_until(OrderStatus::Delivered);
        let order = given::<Order>(history.clone())
            .when(C::RequestReturn {
                actor: buyer(),
                reason: reason(),
                now: t(16),
            })
            .then(vec![E::ReturnRequested { reason: reason() }]);
        assert_eq!(order.status(), OrderStatus::ReturnRequested);

        let error = given::<Order>(history.clone())
            .when(C::RequestReturn {
                actor: buyer(),
                reason: reason(),
                now: t(16) + TimeDelta::seconds(1),
            })
            .then_refused("return_window_closed");
        assert_eq!(error.refusal(), Refusal::Conflict);
        for actor in [seller(), admin()] {
            given::<Order>(history.clone())
                .when(C::RequestReturn {
                    actor,
                    reason: reason(),
                    now: t(3),
                })
                .then_refused("forbidden");
        }
        given::<Order>(escrow_order_until(OrderStatus::Shipped))
            .when(C::RequestReturn {
                actor: buyer(),
                reason: reason(),
                now: t(1),
            })
            .then_refused("illegal_transition");
    }

    #[test]
    fn a_returned_order_is_refunded() {
        for actor in [seller(), admin()] {
            let order = given::<Order>(escrow_order_until(OrderStatus::ReturnRequested))
                .when(C::MarkReturned { actor })
                .then(vec![E::OrderReturned]);
            assert_eq!(order.status(), OrderStatus::Returned);
        }
        given::<Order>(escrow_order_until(OrderStatus::ReturnRequested))
            .when(C::MarkReturned { actor: buyer() })
            .then_refused("forbidden");
        given::<Order>(escrow_order_until(OrderStatus::Delivered))
            .when(C::MarkReturned { actor: seller() })
            .then_refused("illegal_transition");

        for actor in [seller(), admin(), system()] {
            let order = given::<Order>(escrow_order_until(OrderStatus::Returned))
                .when(C::Refund { actor })
                .then(vec![E::OrderRefunded { amount: eur(3_700) }]);
            assert_eq!(order.status(), OrderStatus::Refunded);
        }
        given::<Order>(escrow_order_until(OrderStatus::Returned))
            .when(C::Refund { actor: buyer() })
            .then_refused("forbidden");
        given::<Order>(escrow_order_until(OrderStatus::Refunded))
            .when(C::Refund { actor: seller() })
            .then_refused("illegal_transition");
    }

    #[test]
    fn the_buyer_reviews_the_seller_once_after_delivery() {
        let review = |actor| C::Review {
            actor,
            rating: Rating::parse(4).unwrap(),
            comment: Comment::parse("comment", "Fast and friendly").unwrap(),
        };
        let reviewed = E::SellerReviewed {
            seller: seller().user_id,
            rating: 4,
            comment: Comment::parse("comment", "Fast and friendly").unwrap(),
        };
        use OrderStatus::*;
        for status in [Delivered, ReturnRequested, Returned, Refunded] {
            let order = given::<Order>(escrow_order_until(status))
                .when(review(buyer()))
                .then(vec![reviewed.clone()]);
            assert!(order.reviewed());
        }
        let mut completed = escrow_order_until(Delivered);
        completed.push(E::OrderCompleted);
        given::<Order>(completed.clone())
            .when(review(buyer()))
            .then(vec![reviewed.clone()]);

        completed.push(reviewed);
        let error = given::<Order>(completed)
            .when(review(buyer()))
            .then_refused("already_reviewed");
        assert_eq!(error.refusal(), Refusal::Conflict);
        given::<Order>(escrow_order_until(Shipped))
            .when(review(buyer()))
            .then_refused("illegal_transition");
        for actor in [seller(), admin(), stranger()] {
            given::<Order>(escrow_order_until(Delivered))
                .when(review(actor))
                .then_refused("forbidden");
        }
    }

    #[test]
    fn values_parse_outside_input() {
        for rating in 1..=5 {
            assert_eq!(i64::from(Rating::parse(rating).unwrap().value()), rating);
        }
        for rating in [0, 6, -1, 300] {
            assert_eq!(Rating::parse(rating).unwrap_err().code, "invalid_rating");
        }
        for method in ["wallet_escrow", "bank_transfer", "cod"] {
            assert_eq!(PaymentMethod::parse(method).unwrap().as_str(), method);
        }
        assert_eq!(
            PaymentMethod::parse("card").unwrap_err().code,
            "invalid_payment_method"
        );
        use OrderStatus::*;
        for status in [
            Placed,
            AwaitingPayment,
            Confirmed,
            Rejected,
            Shipped,
            Delivered,
            Completed,
            Cancelled,
            ReturnRequested,
            Returned,
            Refunded,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        for method in [
            PaymentMethod::WalletEscrow,
            PaymentMethod::BankTransfer,
            PaymentMethod::Cod,
        ] {
            assert_eq!(serde_json::to_value(method).unwrap(), method.as_str());
        }
        let address =
            ShippingAddress::parse("A", "1 Main St", Some("  "), "Sfax", "3000", "TN").unwrap();
        assert_eq!(address.line2, None);
        let address =
            ShippingAddress::parse("A", "1 Main St", Some("Apt 2"), "Sfax", "3000", "TN").unwrap();
        assert_eq!(address.line2.unwrap().as_str(), "Apt 2");
        assert_eq!(
            ShippingAddress::parse("A", "", None, "Sfax", "3000", "TN")
                .unwrap_err()
                .code,
            "too_short"
        );
        assert_eq!(
            ShippingAddress::parse("A", "1 Main St", None, "Sfax", "3000", "tn")
                .unwrap_err()
                .code,
            "invalid_country"
        );
    }

    #[test]
    fn an_order_rejected_of_version_1_reads_as_version_2() {
        let old = r#"{"OrderRejected":{"reason":"insufficient_stock"}}"#;
        assert_eq!(
            OrderEvent::decode("OrderRejected", "1", old),
            Ok(E::OrderRejected {
                code: "insufficient_stock".to_owned(),
                reason: "insufficient_stock".to_owned(),
            })
        );
        let current = E::OrderRejected {
            code: "reservation_expired".to_owned(),
            reason: "reservation 1 has expired".to_owned(),
        };
        let text = serde_json::to_string(&current).unwrap();
        assert_eq!(current.event_version(), "2");
        assert_eq!(OrderEvent::decode("OrderRejected", "2", &text), Ok(current));
        assert!(OrderEvent::decode("OrderRejected", "3", &text).is_err());
        assert!(OrderEvent::decode("OrderRejected", "1", r#"{"OrderConfirmed":null}"#).is_err());
        assert!(OrderEvent::decode("OrderConfirmed", "1", old).is_err());
    }
}
