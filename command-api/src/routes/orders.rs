//! Order routes. A checkout is one transaction per request: for each seller
//! it places an order, reserves the stock of every line, holds the buyer's
//! funds (wallet escrow) and confirms the order; when stock or funds fall
//! short, the steps of that order are undone inside the plan (a savepoint)
//! and the order is recorded as rejected. Nothing half-done ever reaches the
//! log, so no compensation has to run later.
//!
//! Shipping confirms the stock holds (the items are sold) and arms the
//! escrow auto-release timer; delivery and that timer capture the escrow
//! into the seller's wallet; cancellation releases holds and refunds.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, TimeDelta, Utc};
use domain::listing::{Listing, ListingStatus};
use domain::order::{
    AddressLine, OptionalAddressLine, Order, OrderCommand, OrderLine, OrderStatus, PaymentMethod,
    PostalCode, Rating, ShippingAddress,
};
use domain::reservation::{Reservation, ReservationCommand};
use domain::timeline::{ProductTimeline, TimelineCommand, TimelineEntry};
use domain::values::{
    Actor, CheckoutId, Comment, HoldId, Label, ListingId, OrderId, ProductId, Reason, Reference,
    UserId, WalletId,
};
use domain::wallet::{Wallet, WalletCommand};
use domain::{Decide, Refusal};
use event_store::{ExecError, Plan, StreamRef, Timer};
use http_kit::openapi::Routes;
use http_kit::openapi::{AcceptedBody, text, text_or_null};
use http_kit::{ApiError, AuthUser, IdPath, JsonBody, RequestMeta};
use serde::Deserialize;
use serde_json::json;
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use super::listings::{refused, single_body};
use super::{EMPTY_BODY_SHA256, bounded, exec_error, field, ok_reply, respond, single};
use crate::app::AppState;
use crate::openapi::{ACCEPTED, CheckoutAccepted};

const ORDER_ID: &str = "The order. Anything but a UUID is 400 `invalid_id`.";

/// How long the stock of an order awaiting a bank transfer stays held.
pub const BANK_TRANSFER_HOLD: TimeDelta = TimeDelta::days(3);
/// Stock of a confirmed order stays held until it ships; this bounds it.
pub const CONFIRMED_ORDER_HOLD: TimeDelta = TimeDelta::days(365);

/// The OpenAPI description of these routes.
#[derive(OpenApi)]
#[openapi(
    paths(
        checkout,
        confirm_payment,
        ship,
        deliver,
        release_escrow,
        complete,
        cancel,
        request_return,
        mark_returned,
        refund,
        review
    ),
    components(schemas(LineBody))
)]
pub(super) struct Api;

pub fn routes() -> Routes<AppState> {
    Routes::new()
        .post("/orders", checkout)
        .post("/orders/{id}/confirm-payment", confirm_payment)
        .post("/orders/{id}/ship", ship)
        .post("/orders/{id}/deliver", deliver)
        .post("/orders/{id}/release-escrow", release_escrow)
        .post("/orders/{id}/complete", complete)
        .post("/orders/{id}/cancel", cancel)
        .post("/orders/{id}/return", request_return)
        .post("/orders/{id}/returned", mark_returned)
        .post("/orders/{id}/refund", refund)
        .post("/orders/{id}/review", review)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CheckoutLine)]
pub struct LineBody {
    /// An active listing.
    listing_id: Uuid,
    #[schema(schema_with = crate::openapi::line_quantity)]
    quantity: u32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ShippingAddress)]
pub struct AddressBody {
    #[schema(schema_with = text::<Label>)]
    name: String,
    #[schema(schema_with = text::<AddressLine>)]
    line1: String,
    /// Blank is none.
    #[schema(schema_with = text_or_null::<OptionalAddressLine>)]
    line2: Option<String>,
    #[schema(schema_with = text::<Label>)]
    city: String,
    #[schema(schema_with = text::<PostalCode>)]
    postal_code: String,
    #[schema(schema_with = http_kit::openapi::country_code)]
    country: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkout {
    #[schema(schema_with = crate::openapi::lines)]
    lines: Vec<LineBody>,
    shipping_address: AddressBody,
    #[schema(schema_with = crate::openapi::payment_method)]
    payment_method: String,
    /// The buyer's wallet; required for `wallet_escrow` (else 422
    /// `wallet_required`).
    wallet_id: Option<Uuid>,
}

/// One line of a checkout, with what was learnt of its listing.
#[derive(Debug, Clone)]
struct PlannedLine {
    listing_id: ListingId,
    product_id: ProductId,
    quantity: u32,
    hold_id: HoldId,
}

/// One order of a checkout: the lines of one seller.
#[derive(Debug, Clone)]
struct PlannedOrder {
    order_id: OrderId,
    seller: UserId,
    seller_wallet: Option<WalletId>,
    lines: Vec<PlannedLine>,
}

/// Refusals that reject an order (recorded) rather than the request.
const REJECTING_CODES: &[&str] = &["insufficient_stock", "insufficient_funds"];

/// Check out
///
/// Places one order per seller (sharing a checkout id), reserves the stock
/// of every line, holds the buyer's funds for `wallet_escrow` and confirms
/// each order, in one transaction. An order whose stock or funds fall short
/// is recorded as rejected (with the reason) rather than failing the
/// request. 201; `id` and `version` are those of the first order.
#[utoipa::path(post, path = "/orders", operation_id = "checkout", tag = "orders",
    request_body = Checkout,
    responses((status = 201, description = ACCEPTED, body = CheckoutAccepted)))]
async fn checkout(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    body: JsonBody<Checkout>,
) -> Result<Response, ApiError> {
    let request = &body.value;
    bounded("lines", &request.lines, domain::order::MAX_LINES)?;
    if request.lines.is_empty() {
        return Err(ApiError::validation(
            "lines",
            domain::values::ValidationError::new("too_short", "an order needs at least one line"),
        ));
    }
    let shipping_address = field(
        "shipping_address",
        ShippingAddress::parse(
            &request.shipping_address.name,
            &request.shipping_address.line1,
            request.shipping_address.line2.as_deref(),
            &request.shipping_address.city,
            &request.shipping_address.postal_code,
            &request.shipping_address.country,
        ),
    )?;
    let payment_method = field(
        "payment_method",
        PaymentMethod::parse(&request.payment_method),
    )?;
    let buyer_wallet = request.wallet_id.map(WalletId::from_uuid);
    if payment_method == PaymentMethod::WalletEscrow && buyer_wallet.is_none() {
        return Err(ApiError::validation(
            "wallet_id",
            domain::values::ValidationError::new(
                "wallet_required",
                "wallet_escrow needs a wallet_id",
            ),
        ));
    }

    // Read the listings (cached) to learn sellers, products and payout
    // wallets, which never change; prices are read again under lock.
    let mut orders: BTreeMap<UserId, PlannedOrder> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for (index, line) in request.lines.iter().enumerate() {
        let listing_id = ListingId::from_uuid(line.listing_id);
        if !seen.insert(listing_id) {
            return Err(ApiError::validation(
                format!("lines[{index}].listing_id"),
                domain::values::ValidationError::new(
                    "duplicate_line",
                    "each listing may appear once",
                ),
            ));
        }
        let (listing, _) = state
            .store
            .state::<Listing>(&listing_id.to_string())
            .await
            .map_err(exec_error)?;
        if !listing.exists() {
            return Err(ApiError::Domain {
                code: "listing_not_found",
                refusal: Refusal::NotFound,
                message: format!("listing {listing_id} does not exist"),
            });
        }
        let order = orders
            .entry(listing.seller())
            .or_insert_with(|| PlannedOrder {
                order_id: OrderId::new(),
                seller: listing.seller(),
                seller_wallet: listing.payout_wallet(),
                lines: Vec::new(),
            });
        order.lines.push(PlannedLine {
            listing_id,
            product_id: listing.product_id(),
            quantity: line.quantity,
            hold_id: HoldId::new(),
        });
    }
    let orders: Vec<PlannedOrder> = orders.into_values().collect();
    if payment_method == PaymentMethod::WalletEscrow
        && let Some(order) = orders.iter().find(|order| order.seller_wallet.is_none())
    {
        return Err(ApiError::Domain {
            code: "seller_wallet_missing",
            refusal: Refusal::Conflict,
            message: format!(
                "seller {} takes no wallet payments: the listing has no payout wallet",
                order.seller
            ),
        });
    }

    let mut streams = Vec::new();
    for order in &orders {
        streams.push(StreamRef::of::<Order>(order.order_id.to_string()));
        if let Some(wallet) = order
            .seller_wallet
            .filter(|_| payment_method == PaymentMethod::WalletEscrow)
        {
            streams.push(StreamRef::of::<Wallet>(wallet.to_string()));
        }
        for line in &order.lines {
            streams.push(StreamRef::of::<Listing>(line.listing_id.to_string()));
            streams.push(StreamRef::of::<Reservation>(line.listing_id.to_string()));
            streams.push(StreamRef::of::<ProductTimeline>(
                line.product_id.to_string(),
            ));
        }
    }
    if let Some(wallet) = buyer_wallet {
        streams.push(StreamRef::of::<Wallet>(wallet.to_string()));
    }

    let checkout_id = CheckoutId::new();
    let actor = user.actor();
    let now = Utc::now();
    let accepted = state
        .store
        .execute_multi(
            streams,
            meta.context(&user),
            meta.idempotency(&user, &body.sha256),
            move |plan| {
                if let Some(wallet_id) = buyer_wallet {
                    check_buyer_wallet(plan, wallet_id, actor.user_id)?;
                }
                let mut outcomes = Vec::new();
                for order in &orders {
                    let outcome = place_order(
                        plan,
                        order,
                        checkout_id,
                        actor,
                        &shipping_address,
                        payment_method,
                        buyer_wallet,
                        now,
                    )?;
                    outcomes.push(outcome);
                }
                Ok(outcomes)
            },
            move |outcomes, committed| {
                let orders: Vec<_> = outcomes
                    .iter()
                    .map(|(order_id, status, reason)| {
                        let version = committed
                            .stream::<Order>(&order_id.to_string())
                            .map_or(0, |(version, _)| version);
                        json!({
                            "id": order_id.to_string(),
                            "version": version,
                            "status": status.as_str(),
                            "reason": reason,
                        })
                    })
                    .collect();
                let first = &orders[0];
                (
                    201,
                    json!({
                        "id": first["id"],
                        "version": first["version"],
                        "position": committed.last().token(),
                        "checkout_id": checkout_id.to_string(),
                        "orders": orders,
                    }),
                )
            },
        )
        .await
        .map_err(exec_error)?;
    Ok(respond(accepted))
}

fn check_buyer_wallet(plan: &Plan, wallet_id: WalletId, buyer: UserId) -> Result<(), ExecError> {
    let wallet = plan.state::<Wallet>(&wallet_id.to_string())?;
    if !wallet.exists() {
        return Err(refused(
            "wallet_not_found",
            Refusal::NotFound,
            "the wallet does not exist",
        ));
    }
    if wallet.owner() != buyer {
        return Err(refused(
            "forbidden",
            Refusal::Forbidden,
            "the wallet is not yours",
        ));
    }
    Ok(())
}

/// Places, reserves, holds and confirms one seller's order, or records it as
/// rejected when stock or funds fall short. Other refusals fail the request.
#[allow(clippy::too_many_arguments)] // One step of one plan; a struct would only rename them.
fn place_order(
    plan: &mut Plan,
    order: &PlannedOrder,
    checkout_id: CheckoutId,
    buyer: Actor,
    shipping_address: &ShippingAddress,
    payment_method: PaymentMethod,
    buyer_wallet: Option<WalletId>,
    now: DateTime<Utc>,
) -> Result<(OrderId, OrderStatus, Option<String>), ExecError> {
    let order_key = order.order_id.to_string();
    let mut lines = Vec::with_capacity(order.lines.len());
    for line in &order.lines {
        let listing = plan.state::<Listing>(&line.listing_id.to_string())?;
        if listing.status() != ListingStatus::Active {
            return Err(refused(
                "listing_unavailable",
                Refusal::Conflict,
                &format!(
                    "listing {} is {}",
                    line.listing_id,
                    listing.status().as_str()
                ),
            ));
        }
        lines.push(OrderLine {
            listing_id: line.listing_id,
            product_id: line.product_id,
            quantity: line.quantity,
            unit_price: listing.price().clone(),
            hold_id: line.hold_id,
        });
    }
    let escrow = payment_method == PaymentMethod::WalletEscrow;
    plan.decide::<Order>(
        &order_key,
        OrderCommand::Place {
            actor: buyer,
            order_id: order.order_id,
            checkout_id,
            seller: order.seller,
            lines,
            shipping_address: shipping_address.clone(),
            payment_method,
            buyer_wallet: buyer_wallet.filter(|_| escrow),
            seller_wallet: order.seller_wallet.filter(|_| escrow),
        },
    )?;
    let savepoint = plan.savepoint();
    match reserve_and_confirm(plan, order, buyer, payment_method, buyer_wallet, now) {
        Ok(()) => {
            let status = plan.state::<Order>(&order_key)?.status();
            Ok((order.order_id, status, None))
        }
        Err(ExecError::Rejected { code, .. }) if REJECTING_CODES.contains(&code) => {
            plan.rollback_to(savepoint);
            plan.decide::<Order>(
                &order_key,
                OrderCommand::Reject {
                    actor: Actor::system(),
                    reason: code.to_owned(),
                },
            )?;
            Ok((order.order_id, OrderStatus::Rejected, Some(code.to_owned())))
        }
        Err(error) => Err(error),
    }
}

fn reserve_and_confirm(
    plan: &mut Plan,
    order: &PlannedOrder,
    buyer: Actor,
    payment_method: PaymentMethod,
    buyer_wallet: Option<WalletId>,
    now: DateTime<Utc>,
) -> Result<(), ExecError> {
    let hold_for = if payment_method == PaymentMethod::BankTransfer {
        BANK_TRANSFER_HOLD
    } else {
        CONFIRMED_ORDER_HOLD
    };
    for line in &order.lines {
        plan.decide::<Reservation>(
            &line.listing_id.to_string(),
            ReservationCommand::Reserve {
                actor: buyer,
                hold_id: line.hold_id,
                holder: buyer.user_id,
                quantity: line.quantity,
                expires_at: now + hold_for,
                order_id: Some(order.order_id),
                now,
            },
        )?;
        plan.decide::<ProductTimeline>(
            &line.product_id.to_string(),
            TimelineCommand::Record {
                actor: Actor::system(),
                product_id: line.product_id,
                entry: TimelineEntry::Reserved {
                    listing_id: line.listing_id,
                    order_id: order.order_id,
                },
            },
        )?;
    }
    if payment_method == PaymentMethod::BankTransfer {
        plan.schedule(unpaid_order_timer(order.order_id, now + hold_for));
    }
    if let (PaymentMethod::WalletEscrow, Some(buyer_wallet), Some(seller_wallet)) =
        (payment_method, buyer_wallet, order.seller_wallet)
    {
        let total = plan
            .state::<Order>(&order.order_id.to_string())?
            .total()
            .clone();
        plan.decide::<Wallet>(
            &buyer_wallet.to_string(),
            WalletCommand::HoldFunds {
                actor: buyer,
                order_id: order.order_id,
                amount: total.clone(),
                payee_wallet: seller_wallet,
            },
        )?;
        plan.decide::<Wallet>(
            &seller_wallet.to_string(),
            WalletCommand::ExpectIncoming {
                actor: Actor::system(),
                order_id: order.order_id,
                amount: total,
                payer_wallet: buyer_wallet,
            },
        )?;
    }
    plan.decide::<Order>(
        &order.order_id.to_string(),
        OrderCommand::Confirm {
            actor: Actor::system(),
        },
    )?;
    Ok(())
}

/// The timer that expires hold `hold_id` of `listing_id` at `due_at`.
pub(crate) fn hold_expiry_timer(
    listing_id: ListingId,
    hold_id: HoldId,
    due_at: DateTime<Utc>,
) -> Timer {
    Timer {
        timer_id: hold_id.as_uuid(),
        kind: crate::timers::HOLD_EXPIRY.to_owned(),
        due_at,
        payload: json!({"listing_id": listing_id.to_string(), "hold_id": hold_id.to_string()}),
    }
}

/// The timer that cancels an order still awaiting its bank transfer at `due_at`.
fn unpaid_order_timer(order_id: OrderId, due_at: DateTime<Utc>) -> Timer {
    Timer {
        timer_id: domain::process::deterministic_command_id(
            "unpaid-order",
            &[&order_id.to_string()],
        ),
        kind: crate::timers::UNPAID_ORDER.to_owned(),
        due_at,
        payload: json!({"order_id": order_id.to_string()}),
    }
}

/// The timer that releases an order's escrow to the seller at `due_at`.
fn escrow_release_timer(order_id: OrderId, due_at: DateTime<Utc>) -> Timer {
    Timer {
        timer_id: domain::process::deterministic_command_id(
            "escrow-auto-release",
            &[&order_id.to_string()],
        ),
        kind: crate::timers::ESCROW_AUTO_RELEASE.to_owned(),
        due_at,
        payload: json!({"order_id": order_id.to_string()}),
    }
}

/// Runs `plan` in one transaction over order `order_id` and every stream it
/// touches (its lines' stock pools and products, its wallets), answered with
/// the order's id, version and position. A missing order is 404.
pub(crate) async fn order_step<P>(
    store: &event_store::EventStore,
    order_id: OrderId,
    context: event_store::CommandContext,
    idempotency: Option<event_store::IdempotencyKey>,
    plan: P,
) -> Result<event_store::Accepted, ExecError>
where
    P: Fn(&mut Plan) -> Result<(), ExecError> + Send + Sync + 'static,
{
    let (order, _) = store.state::<Order>(&order_id.to_string()).await?;
    if !order.exists() {
        return Err(refused(
            "order_not_found",
            Refusal::NotFound,
            &format!("order {order_id} does not exist"),
        ));
    }
    store
        .execute_multi(
            order_streams(order_id, &order),
            context,
            idempotency,
            plan,
            move |(), committed| single_body::<Order>(200, &order_id.to_string(), committed),
        )
        .await
}

/// The streams an order's follow-up steps touch: the order, its lines'
/// pools and products, and its wallets.
fn order_streams(order_id: OrderId, order: &Order) -> Vec<StreamRef> {
    let mut streams = vec![StreamRef::of::<Order>(order_id.to_string())];
    for line in order.lines() {
        streams.push(StreamRef::of::<Reservation>(line.listing_id.to_string()));
        streams.push(StreamRef::of::<ProductTimeline>(
            line.product_id.to_string(),
        ));
    }
    for wallet in [order.buyer_wallet(), order.seller_wallet()]
        .into_iter()
        .flatten()
    {
        streams.push(StreamRef::of::<Wallet>(wallet.to_string()));
    }
    streams
}

fn record_on_products(
    plan: &mut Plan,
    lines: &[OrderLine],
    entry: impl Fn(&OrderLine) -> TimelineEntry,
) -> Result<(), ExecError> {
    for line in lines {
        plan.decide::<ProductTimeline>(
            &line.product_id.to_string(),
            TimelineCommand::Record {
                actor: Actor::system(),
                product_id: line.product_id,
                entry: entry(line),
            },
        )?;
    }
    Ok(())
}

/// Moves an order's escrow from the buyer's held funds into the seller's
/// wallet (both sides, in the plan's transaction).
pub(crate) fn capture_escrow(
    plan: &mut Plan,
    order_id: OrderId,
    order: &Order,
) -> Result<(), ExecError> {
    if let (Some(buyer_wallet), Some(seller_wallet)) = (order.buyer_wallet(), order.seller_wallet())
    {
        plan.decide::<Wallet>(
            &buyer_wallet.to_string(),
            WalletCommand::CaptureHold {
                actor: Actor::system(),
                order_id,
            },
        )?;
        plan.decide::<Wallet>(
            &seller_wallet.to_string(),
            WalletCommand::ReceiveEscrow {
                actor: Actor::system(),
                order_id,
            },
        )?;
    }
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmPayment {
    /// The bank's reference of the transfer.
    #[schema(schema_with = text::<Reference>)]
    reference: String,
}

/// Confirm a bank transfer
///
/// An admin confirms that a `bank_transfer` order was paid.
#[utoipa::path(post, path = "/orders/{id}/confirm-payment", operation_id = "confirmPayment", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    request_body = ConfirmPayment,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn confirm_payment(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<ConfirmPayment>,
) -> Result<Response, ApiError> {
    let reference = field(
        "reference",
        Reference::parse("reference", &body.value.reference),
    )?;
    let order_id = OrderId::from_uuid(id);
    let actor = user.actor();
    order_step(
        &state.store,
        order_id,
        meta.context(&user),
        meta.idempotency(&user, &body.sha256),
        move |plan| {
            plan.decide::<Order>(
                &order_id.to_string(),
                OrderCommand::ConfirmPayment {
                    actor,
                    reference: reference.clone(),
                },
            )?;
            // The stock stays held until shipment; its bank-transfer
            // expiry no longer applies, so the hold is renewed by
            // swapping it for a long one.
            let order = plan.state::<Order>(&order_id.to_string())?.clone();
            let now = Utc::now();
            for line in order.lines() {
                let pool = line.listing_id.to_string();
                plan.decide::<Reservation>(
                    &pool,
                    ReservationCommand::Release {
                        actor: Actor::system(),
                        hold_id: line.hold_id,
                        reason: Reason::parse("reason", "payment confirmed: renewing the hold")
                            .unwrap_or_default(),
                    },
                )?;
                plan.decide::<Reservation>(
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
            Ok(())
        },
    )
    .await
    .map(respond)
    .map_err(exec_error)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Ship {
    #[schema(schema_with = text::<Label>)]
    carrier: String,
    #[schema(schema_with = text::<Label>)]
    tracking_number: String,
}

/// Ship an order
///
/// The seller ships: the stock holds become sales and, for `wallet_escrow`, the
/// escrow auto-release timer is armed.
#[utoipa::path(post, path = "/orders/{id}/ship", operation_id = "ship", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    request_body = Ship,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn ship(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<Ship>,
) -> Result<Response, ApiError> {
    let carrier = field("carrier", Label::parse("carrier", &body.value.carrier))?;
    let tracking_number = field(
        "tracking_number",
        Label::parse("tracking_number", &body.value.tracking_number),
    )?;
    let order_id = OrderId::from_uuid(id);
    let actor = user.actor();
    let now = Utc::now();
    order_step(
        &state.store,
        order_id,
        meta.context(&user),
        meta.idempotency(&user, &body.sha256),
        move |plan| {
            plan.decide::<Order>(
                &order_id.to_string(),
                OrderCommand::Ship {
                    actor,
                    carrier: carrier.clone(),
                    tracking_number: tracking_number.clone(),
                    now,
                },
            )?;
            let order = plan.state::<Order>(&order_id.to_string())?.clone();
            for line in order.lines() {
                plan.decide::<Reservation>(
                    &line.listing_id.to_string(),
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
            record_on_products(plan, order.lines(), |line| TimelineEntry::Sold {
                order_id,
                buyer: order.buyer(),
                price: price_of(line),
            })?;
            record_on_products(plan, order.lines(), |_| TimelineEntry::Shipped {
                order_id,
                carrier: carrier.clone(),
            })?;
            if order.payment_method() == PaymentMethod::WalletEscrow
                && let Some(due_at) = order.auto_release_at()
            {
                plan.schedule(escrow_release_timer(order_id, due_at));
            }
            Ok(())
        },
    )
    .await
    .map(respond)
    .map_err(exec_error)
}

/// Confirm delivery
///
/// The buyer confirms delivery; the escrow is released to the seller.
#[utoipa::path(post, path = "/orders/{id}/deliver", operation_id = "deliver", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn deliver(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
) -> Result<Response, ApiError> {
    let order_id = OrderId::from_uuid(id);
    let actor = user.actor();
    let now = Utc::now();
    order_step(
        &state.store,
        order_id,
        meta.context(&user),
        meta.idempotency(&user, &EMPTY_BODY_SHA256),
        move |plan| {
            let before = plan
                .state::<Order>(&order_id.to_string())?
                .escrow_released();
            plan.decide::<Order>(&order_id.to_string(), OrderCommand::Deliver { actor, now })?;
            let order = plan.state::<Order>(&order_id.to_string())?.clone();
            if !before && order.escrow_released() {
                capture_escrow(plan, order_id, &order)?;
            }
            record_on_products(plan, order.lines(), |_| TimelineEntry::Delivered {
                order_id,
            })?;
            Ok(())
        },
    )
    .await
    .map(respond)
    .map_err(exec_error)
}

/// Release the escrow
///
/// An admin releases a shipped order's escrow to the seller.
#[utoipa::path(post, path = "/orders/{id}/release-escrow", operation_id = "releaseEscrow", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn release_escrow(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
) -> Result<Response, ApiError> {
    let order_id = OrderId::from_uuid(id);
    let accepted = release_escrow_with(
        &state.store,
        order_id,
        user.actor(),
        meta.context(&user),
        meta.idempotency(&user, &EMPTY_BODY_SHA256),
    )
    .await
    .map_err(exec_error)?;
    Ok(respond(accepted))
}

/// Releases an order's escrow to the seller (admin, or the auto-release timer).
pub(crate) async fn release_escrow_with(
    store: &event_store::EventStore,
    order_id: OrderId,
    actor: Actor,
    context: event_store::CommandContext,
    idempotency: Option<event_store::IdempotencyKey>,
) -> Result<event_store::Accepted, ExecError> {
    let now = Utc::now();
    order_step(store, order_id, context, idempotency, move |plan| {
        plan.decide::<Order>(
            &order_id.to_string(),
            OrderCommand::ReleaseEscrow { actor, now },
        )?;
        let order = plan.state::<Order>(&order_id.to_string())?.clone();
        capture_escrow(plan, order_id, &order)?;
        Ok(())
    })
    .await
}

/// Complete an order
///
/// Closes a delivered order.
#[utoipa::path(post, path = "/orders/{id}/complete", operation_id = "complete", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn complete(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
) -> Result<Response, ApiError> {
    let command = OrderCommand::Complete {
        actor: user.actor(),
        now: Utc::now(),
    };
    single::<Order>(
        &state,
        &user,
        &meta,
        &EMPTY_BODY_SHA256,
        id,
        command,
        ok_reply(id),
    )
    .await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WithReason {
    /// Why.
    #[serde(default)]
    #[schema(schema_with = text::<Reason>)]
    reason: String,
}

/// Cancel an order
///
/// Before shipment: releases the stock holds and refunds the escrow.
#[utoipa::path(post, path = "/orders/{id}/cancel", operation_id = "cancel", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    request_body = WithReason,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn cancel(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<WithReason>,
) -> Result<Response, ApiError> {
    let reason = field("reason", Reason::parse("reason", &body.value.reason))?;
    let order_id = OrderId::from_uuid(id);
    let accepted = cancel_with(
        &state.store,
        order_id,
        user.actor(),
        reason,
        None,
        meta.context(&user),
        meta.idempotency(&user, &body.sha256),
    )
    .await
    .map_err(exec_error)?;
    Ok(respond(accepted))
}

/// Cancels an order, releases its stock holds and refunds its escrow, in one
/// transaction (a user's cancel, or the expiry of an unpaid bank transfer).
pub(crate) async fn cancel_with(
    store: &event_store::EventStore,
    order_id: OrderId,
    actor: Actor,
    reason: Reason,
    only_if: Option<OrderStatus>,
    context: event_store::CommandContext,
    idempotency: Option<event_store::IdempotencyKey>,
) -> Result<event_store::Accepted, ExecError> {
    order_step(store, order_id, context, idempotency, move |plan| {
        let before = plan.state::<Order>(&order_id.to_string())?.clone();
        if only_if.is_some_and(|status| status != before.status()) {
            return Err(refused(
                "illegal_transition",
                Refusal::Conflict,
                "the order moved on",
            ));
        }
        plan.decide::<Order>(
            &order_id.to_string(),
            OrderCommand::Cancel {
                actor,
                reason: reason.clone(),
            },
        )?;
        for line in before.lines() {
            let pool = plan.state::<Reservation>(&line.listing_id.to_string())?;
            // A hold that already expired has given its stock back.
            if pool.hold(line.hold_id).is_some() {
                plan.decide::<Reservation>(
                    &line.listing_id.to_string(),
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
            && plan
                .state::<Wallet>(&buyer_wallet.to_string())?
                .holds()
                .contains_key(&order_id)
        {
            plan.decide::<Wallet>(
                &buyer_wallet.to_string(),
                WalletCommand::RefundHold {
                    actor: Actor::system(),
                    order_id,
                },
            )?;
            plan.decide::<Wallet>(
                &seller_wallet.to_string(),
                WalletCommand::CancelIncoming {
                    actor: Actor::system(),
                    order_id,
                },
            )?;
        }
        Ok(())
    })
    .await
}

/// Request a return
///
/// The buyer asks to return a delivered order within the return window.
#[utoipa::path(post, path = "/orders/{id}/return", operation_id = "requestReturn", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    request_body = WithReason,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn request_return(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<WithReason>,
) -> Result<Response, ApiError> {
    let reason = field("reason", Reason::parse("reason", &body.value.reason))?;
    let command = OrderCommand::RequestReturn {
        actor: user.actor(),
        reason,
        now: Utc::now(),
    };
    single::<Order>(
        &state,
        &user,
        &meta,
        &body.sha256,
        id,
        command,
        ok_reply(id),
    )
    .await
}

/// Mark an order returned
///
/// The seller received the returned items.
#[utoipa::path(post, path = "/orders/{id}/returned", operation_id = "markReturned", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn mark_returned(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
) -> Result<Response, ApiError> {
    let order_id = OrderId::from_uuid(id);
    let actor = user.actor();
    order_step(
        &state.store,
        order_id,
        meta.context(&user),
        meta.idempotency(&user, &EMPTY_BODY_SHA256),
        move |plan| {
            plan.decide::<Order>(&order_id.to_string(), OrderCommand::MarkReturned { actor })?;
            let order = plan.state::<Order>(&order_id.to_string())?.clone();
            record_on_products(plan, order.lines(), |_| TimelineEntry::Returned {
                order_id,
            })?;
            Ok(())
        },
    )
    .await
    .map(respond)
    .map_err(exec_error)
}

/// Refund a returned order
///
/// Moves the payment back from the seller's wallet to the buyer's.
#[utoipa::path(post, path = "/orders/{id}/refund", operation_id = "refund", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn refund(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
) -> Result<Response, ApiError> {
    let order_id = OrderId::from_uuid(id);
    let actor = user.actor();
    order_step(
        &state.store,
        order_id,
        meta.context(&user),
        meta.idempotency(&user, &EMPTY_BODY_SHA256),
        move |plan| {
            plan.decide::<Order>(&order_id.to_string(), OrderCommand::Refund { actor })?;
            let order = plan.state::<Order>(&order_id.to_string())?.clone();
            if let (Some(buyer_wallet), Some(seller_wallet)) =
                (order.buyer_wallet(), order.seller_wallet())
            {
                let amount = order.total().clone();
                plan.decide::<Wallet>(
                    &seller_wallet.to_string(),
                    WalletCommand::ReturnPayment {
                        actor: Actor::system(),
                        order_id,
                        amount: amount.clone(),
                        to_wallet: buyer_wallet,
                    },
                )?;
                plan.decide::<Wallet>(
                    &buyer_wallet.to_string(),
                    WalletCommand::ReceiveRefund {
                        actor: Actor::system(),
                        order_id,
                        amount,
                        from_wallet: seller_wallet,
                    },
                )?;
            }
            Ok(())
        },
    )
    .await
    .map(respond)
    .map_err(exec_error)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Review {
    #[schema(schema_with = crate::openapi::rating)]
    rating: i64,
    /// The review.
    #[serde(default)]
    #[schema(schema_with = text::<Comment>)]
    comment: String,
}

/// Review the seller
///
/// The buyer rates the seller once, after delivery.
#[utoipa::path(post, path = "/orders/{id}/review", operation_id = "review", tag = "orders",
    params(("id" = Uuid, Path, description = ORDER_ID)),
    request_body = Review,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn review(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<Review>,
) -> Result<Response, ApiError> {
    let rating = field("rating", Rating::parse(body.value.rating))?;
    let comment = field("comment", Comment::parse("comment", &body.value.comment))?;
    let command = OrderCommand::Review {
        actor: user.actor(),
        rating,
        comment,
    };
    single::<Order>(
        &state,
        &user,
        &meta,
        &body.sha256,
        id,
        command,
        ok_reply(id),
    )
    .await
}
