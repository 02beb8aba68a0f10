//! Order routes. Each handler parses its request into domain values, runs
//! one journey of `domain::journeys` (checkout, payment, shipping,
//! delivery, escrow release, cancellation, return, refund) as one unit of
//! work of the event store, and answers. What each journey does, and what
//! it refuses, is decided and tested there.

use std::collections::{BTreeMap, HashSet};

use axum::extract::State;
use axum::response::Response;
use chrono::Utc;
use domain::Decide;
use domain::journeys::{self, JourneyError, OrderStep};
use domain::listing::Listing;
use domain::order::{
    AddressLine, OptionalAddressLine, Order, OrderCommand, PaymentMethod, PostalCode, Rating,
    ShippingAddress,
};
use domain::values::{
    Actor, Comment, HoldId, Label, ListingId, OrderId, Reason, Reference, ValidationError, WalletId,
};
use event_store::journey::{stream_refs, stream_refs_creating};
use event_store::{ExecError, Plan};
use http_kit::openapi::Routes;
use http_kit::openapi::{AcceptedBody, FieldDocs, text, text_or_null};
use http_kit::{ApiError, AuthUser, IdPath, JsonBody, RequestMeta};
use serde::Deserialize;
use serde_json::json;
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use super::listings::single_body;
use super::{EMPTY_BODY_SHA256, bounded, exec_error, field, ok_reply, respond, single};
use crate::app::AppState;
use crate::openapi::{ACCEPTED, CheckoutAccepted};

const ORDER_ID: &str = "The order. Anything but a UUID is 400 `invalid_id`.";

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
    components(schemas(LineBody)),
    modifiers(&FIELDS)
)]
pub(super) struct Api;

/// What the fields of these request bodies mean, where a function gives
/// the field's schema (utoipa drops those fields' doc comments).
const FIELDS: FieldDocs = FieldDocs(&[
    ("CheckoutLine", "quantity", "Units of the listing."),
    ("ShippingAddress", "name", "The recipient."),
    ("ShippingAddress", "line1", "The street address."),
    (
        "ShippingAddress",
        "line2",
        "More of the address; blank is none.",
    ),
    ("ShippingAddress", "city", "The city."),
    ("ShippingAddress", "postal_code", "The postal code."),
    ("ShippingAddress", "country", "The country."),
    ("Checkout", "lines", "What to buy, one line per listing."),
    ("Checkout", "payment_method", "How the orders are paid."),
    (
        "ConfirmPayment",
        "reference",
        "The bank's reference of the transfer.",
    ),
    ("Ship", "carrier", "The carrier."),
    ("Ship", "tracking_number", "The carrier's tracking number."),
    ("WithReason", "reason", "Why."),
    ("Review", "rating", "From 1 (worst) to 5 (best)."),
    ("Review", "comment", "The review."),
]);

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
    /// The buyer's own hold on the listing, confirmed by this checkout
    /// instead of a new hold.
    reservation_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ShippingAddress)]
pub struct AddressBody {
    #[schema(schema_with = text::<Label>)]
    name: String,
    #[schema(schema_with = text::<AddressLine>)]
    line1: String,
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
    /// Where the orders go.
    shipping_address: AddressBody,
    #[schema(schema_with = crate::openapi::payment_method)]
    payment_method: String,
    /// The buyer's wallet; required for `wallet_escrow` (else 422
    /// `wallet_required`).
    wallet_id: Option<Uuid>,
}

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
    let request = parse_checkout(&body.value, user.actor())?;
    // The listings (cached) tell sellers, products and payout wallets, which
    // never change; prices and status are read again under lock.
    let mut listings = BTreeMap::new();
    for line in &request.lines {
        let (listing, _) = state
            .store
            .state::<Listing>(&line.listing_id.to_string())
            .await
            .map_err(exec_error)?;
        listings.insert(line.listing_id, listing);
    }
    let checkout = journeys::Checkout::plan(request, &listings).map_err(journey_error)?;
    let checkout_id = checkout.checkout_id;
    let deadlines = state.deadlines;
    let now = Utc::now();
    let accepted = state
        .store
        .execute_multi(
            stream_refs_creating(checkout.streams(), checkout.created_streams()),
            meta.context(&user),
            meta.idempotency(&user, &body.sha256),
            move |plan| Ok(checkout.run(plan, now, &deadlines)?),
            move |outcomes, committed| {
                let orders: Vec<_> = outcomes
                    .iter()
                    .map(|outcome| {
                        let version = committed
                            .stream::<Order>(&outcome.order_id.to_string())
                            .map_or(0, |(version, _)| version);
                        json!({
                            "id": outcome.order_id.to_string(),
                            "version": version,
                            "status": outcome.status.as_str(),
                            "reason": outcome.reason,
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

/// Parses a cart: every field checked, with the field's name in the error.
fn parse_checkout(request: &Checkout, buyer: Actor) -> Result<journeys::CheckoutRequest, ApiError> {
    bounded("lines", &request.lines, domain::order::MAX_LINES)?;
    if request.lines.is_empty() {
        return Err(ApiError::validation(
            "lines",
            ValidationError::new("too_short", "an order needs at least one line"),
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
            ValidationError::new("wallet_required", "wallet_escrow needs a wallet_id"),
        ));
    }
    let mut seen = HashSet::new();
    let mut lines = Vec::with_capacity(request.lines.len());
    for (index, line) in request.lines.iter().enumerate() {
        let listing_id = ListingId::from_uuid(line.listing_id);
        if !seen.insert(listing_id) {
            return Err(ApiError::validation(
                format!("lines[{index}].listing_id"),
                ValidationError::new("duplicate_line", "each listing may appear once"),
            ));
        }
        lines.push(journeys::CheckoutLine {
            listing_id,
            quantity: line.quantity,
            reservation: line.reservation_id.map(HoldId::from_uuid),
        });
    }
    Ok(journeys::CheckoutRequest {
        buyer,
        lines,
        shipping_address,
        payment_method,
        buyer_wallet,
    })
}

/// A journey's refusal as the API answers it.
pub(crate) fn journey_error(error: JourneyError) -> ApiError {
    exec_error(error.into())
}

/// Runs `journey` in one unit of work over order `order_id` and every stream
/// it touches (its lines' stock pools and products, its wallets), answered
/// with the order's id, version and position. A missing order is 404.
pub(crate) async fn order_journey<P, R>(
    store: &event_store::EventStore,
    order_id: OrderId,
    step: OrderStep,
    context: event_store::CommandContext,
    idempotency: Option<event_store::IdempotencyKey>,
    journey: P,
) -> Result<event_store::Accepted, ExecError>
where
    P: Fn(&mut Plan) -> Result<R, JourneyError> + Send + Sync + 'static,
    R: Send + Sync + 'static,
{
    let (order, _) = store.state::<Order>(&order_id.to_string()).await?;
    if !order.exists() {
        return Err(JourneyError::OrderNotFound(order_id).into());
    }
    store
        .execute_multi(
            stream_refs(journeys::order_streams(order_id, &order, step)),
            context,
            idempotency,
            move |plan| Ok(journey(plan)?),
            move |_, committed| single_body::<Order>(200, &order_id.to_string(), committed),
        )
        .await
}

/// Answers an order step run by [`order_journey`].
async fn order_step<P>(
    state: &AppState,
    user: &AuthUser,
    meta: &RequestMeta,
    body_sha256: &[u8; 32],
    order_id: OrderId,
    step: OrderStep,
    journey: P,
) -> Result<Response, ApiError>
where
    P: Fn(&mut Plan) -> Result<(), JourneyError> + Send + Sync + 'static,
{
    order_journey(
        &state.store,
        order_id,
        step,
        meta.context(user),
        meta.idempotency(user, body_sha256),
        journey,
    )
    .await
    .map(respond)
    .map_err(exec_error)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmPayment {
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
    let (order_id, actor, now, deadlines) = (
        OrderId::from_uuid(id),
        user.actor(),
        Utc::now(),
        state.deadlines,
    );
    order_step(
        &state,
        &user,
        &meta,
        &body.sha256,
        order_id,
        OrderStep::ConfirmPayment,
        move |plan| {
            journeys::confirm_payment(plan, order_id, actor, reference.clone(), now, &deadlines)
        },
    )
    .await
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
    let (order_id, actor, now, deadlines) = (
        OrderId::from_uuid(id),
        user.actor(),
        Utc::now(),
        state.deadlines,
    );
    order_step(
        &state,
        &user,
        &meta,
        &body.sha256,
        order_id,
        OrderStep::Ship,
        move |plan| {
            journeys::ship(
                plan,
                order_id,
                actor,
                carrier.clone(),
                tracking_number.clone(),
                now,
                &deadlines,
            )
        },
    )
    .await
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
    let (order_id, actor, now, deadlines) = (
        OrderId::from_uuid(id),
        user.actor(),
        Utc::now(),
        state.deadlines,
    );
    order_step(
        &state,
        &user,
        &meta,
        &EMPTY_BODY_SHA256,
        order_id,
        OrderStep::Deliver,
        move |plan| journeys::deliver(plan, order_id, actor, now, &deadlines),
    )
    .await
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
    let (order_id, actor, now) = (OrderId::from_uuid(id), user.actor(), Utc::now());
    order_step(
        &state,
        &user,
        &meta,
        &EMPTY_BODY_SHA256,
        order_id,
        OrderStep::ReleaseEscrow,
        move |plan| journeys::release_escrow(plan, order_id, actor, now),
    )
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
    let (order_id, actor) = (OrderId::from_uuid(id), user.actor());
    order_step(
        &state,
        &user,
        &meta,
        &body.sha256,
        order_id,
        OrderStep::Cancel,
        move |plan| journeys::cancel(plan, order_id, actor, reason.clone(), None),
    )
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
    let (order_id, actor) = (OrderId::from_uuid(id), user.actor());
    order_step(
        &state,
        &user,
        &meta,
        &EMPTY_BODY_SHA256,
        order_id,
        OrderStep::MarkReturned,
        move |plan| journeys::mark_returned(plan, order_id, actor),
    )
    .await
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
    let (order_id, actor) = (OrderId::from_uuid(id), user.actor());
    order_step(
        &state,
        &user,
        &meta,
        &EMPTY_BODY_SHA256,
        order_id,
        OrderStep::Refund,
        move |plan| journeys::refund(plan, order_id, actor),
    )
    .await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Review {
    #[schema(schema_with = crate::openapi::rating)]
    rating: i64,
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
