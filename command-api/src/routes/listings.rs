//! Listing routes: create (`domain::journeys::NewListing`: listing, stock
//! pool and timeline entry in one transaction), price
//! (`domain::journeys::PriceChange`), details (`domain::journeys::DetailsUpdate`),
//! pause/resume/delete, stock, reservations (`domain::journeys::HoldRequest`)
//! and their release (`domain::journeys::release_hold`).

use axum::extract::State;
use axum::response::Response;
use chrono::Utc;
use domain::Decide;
use domain::journeys::{self, JourneyError, Stream};
use domain::listing::{Condition, DetailChanges, Listing, ListingCommand, ListingDetails};
use domain::reservation::{Reservation, ReservationCommand};
use domain::values::{
    Actor, Description, HoldId, Label, ListingId, Location, ProductId, Reason, Title, Url, WalletId,
};
use event_store::Timer;
use event_store::journey::stream_refs;
use http_kit::openapi::Routes;
use http_kit::openapi::{AcceptedBody, FieldDocs, text, text_or_null};
use http_kit::{ApiError, AuthUser, IdPair, IdPath, JsonBody, RequestMeta};
use serde::Deserialize;
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use super::orders::journey_error;
use super::{
    EMPTY_BODY_SHA256, MoneyBody, bounded, created_reply, exec_error, field, ok_reply, respond,
    single,
};
use crate::app::AppState;
use crate::openapi::{ACCEPTED, ListingCreated};

const LISTING_ID: &str = "The listing. Anything but a UUID is 400 `invalid_id`.";

/// Most units a seller can put in one listing's stock.
pub const MAX_STOCK: u32 = 1_000_000;

/// The OpenAPI description of these routes.
#[derive(OpenApi)]
#[openapi(paths(
    create,
    change_price,
    update_details,
    delete,
    pause,
    resume,
    set_stock,
    reserve,
    release_reservation
), modifiers(&FIELDS))]
pub(super) struct Api;

/// What the fields of these request bodies mean, where a function gives
/// the field's schema (utoipa drops those fields' doc comments).
const FIELDS: FieldDocs = FieldDocs(&[
    ("Location", "city", "The city."),
    ("Location", "country", "The country."),
    ("CreateListing", "title", "The listing's title."),
    ("CreateListing", "description", "The listing's description."),
    ("CreateListing", "category", "The category."),
    ("CreateListing", "subcategory", "The subcategory."),
    ("CreateListing", "condition", "The item's condition."),
    (
        "CreateListing",
        "attributes",
        "What else describes the item.",
    ),
    ("CreateListing", "images", "Pictures of the item."),
    ("UpdateListingDetails", "title", "The listing's title."),
    (
        "UpdateListingDetails",
        "description",
        "The listing's description.",
    ),
    ("UpdateListingDetails", "category", "The category."),
    ("UpdateListingDetails", "subcategory", "The subcategory."),
    ("UpdateListingDetails", "condition", "The item's condition."),
    ("UpdateListingDetails", "location", "Where the item is."),
    (
        "UpdateListingDetails",
        "attributes",
        "What else describes the item (replaces them all).",
    ),
    (
        "UpdateListingDetails",
        "images",
        "Pictures of the item (replace them all).",
    ),
    ("Reserve", "quantity", "Units to hold."),
    (
        "Reserve",
        "ttl_seconds",
        "How long the hold lasts before it expires by itself.",
    ),
]);

pub fn routes() -> Routes<AppState> {
    Routes::new()
        .post("/listings", create)
        .post("/listings/{id}/price", change_price)
        .post("/listings/{id}/details", update_details)
        .post("/listings/{id}/delete", delete)
        .post("/listings/{id}/pause", pause)
        .post("/listings/{id}/resume", resume)
        .post("/listings/{id}/stock", set_stock)
        .post("/listings/{id}/reservations", reserve)
        .post(
            "/listings/{id}/reservations/{reservation_id}/release",
            release_reservation,
        )
}

/// `lat` and `lon` go together (both or neither), else 422
/// `invalid_coordinates`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Location)]
pub struct LocationBody {
    #[schema(schema_with = text::<Label>)]
    city: String,
    #[schema(schema_with = http_kit::openapi::country_code)]
    country: String,
    /// Latitude in degrees.
    #[schema(minimum = -90, maximum = 90)]
    lat: Option<f64>,
    /// Longitude in degrees.
    #[schema(minimum = -180, maximum = 180)]
    lon: Option<f64>,
}

impl LocationBody {
    fn parse(&self) -> Result<Location, ApiError> {
        field(
            "location",
            Location::parse(&self.city, &self.country, self.lat, self.lon),
        )
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateListing {
    #[schema(schema_with = text::<Title>)]
    title: String,
    #[serde(default)]
    #[schema(schema_with = text::<Description>)]
    description: String,
    #[schema(schema_with = text::<Label>)]
    category: String,
    #[schema(schema_with = text_or_null::<Label>)]
    subcategory: Option<String>,
    #[schema(schema_with = crate::openapi::condition)]
    condition: String,
    /// The price of one unit.
    price: MoneyBody,
    #[schema(schema_with = crate::openapi::stock_quantity)]
    quantity: u32,
    /// Where the item is.
    location: LocationBody,
    #[serde(default)]
    #[schema(schema_with = crate::openapi::attributes)]
    attributes: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    #[schema(schema_with = crate::openapi::images)]
    images: Vec<String>,
    /// An existing product (relisting something the seller owns).
    product_id: Option<uuid::Uuid>,
    /// The seller's wallet that receives wallet-escrow payments.
    payout_wallet_id: Option<uuid::Uuid>,
}

fn parse_images(images: &[String]) -> Result<Vec<Url>, ApiError> {
    bounded("images", images, domain::listing::MAX_IMAGES)?;
    images
        .iter()
        .enumerate()
        .map(|(index, url)| field(&format!("images[{index}]"), Url::parse("image", url)))
        .collect()
}

fn parse_attributes(
    attributes: &serde_json::Map<String, serde_json::Value>,
) -> Result<domain::listing::Attributes, ApiError> {
    field("attributes", domain::listing::parse_attributes(attributes))
}

fn parse_quantity(quantity: u32) -> Result<u32, ApiError> {
    if quantity > MAX_STOCK {
        return Err(ApiError::validation(
            "quantity",
            domain::values::ValidationError::new(
                "invalid_quantity",
                format!("quantity must be at most {MAX_STOCK}"),
            ),
        ));
    }
    Ok(quantity)
}

/// Create a listing
///
/// Creates the listing, its stock pool and its product timeline entry in
/// one transaction. 201 with the listing's id and its product's id.
#[utoipa::path(post, path = "/listings", operation_id = "createListing", tag = "listings",
    request_body = CreateListing,
    responses((status = 201, description = ACCEPTED, body = ListingCreated)))]
async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    body: JsonBody<CreateListing>,
) -> Result<Response, ApiError> {
    let request = &body.value;
    let details = ListingDetails {
        title: field("title", Title::parse("title", &request.title))?,
        description: field(
            "description",
            Description::parse("description", &request.description),
        )?,
        category: field("category", Label::parse("category", &request.category))?,
        subcategory: request
            .subcategory
            .as_deref()
            .map(|text| field("subcategory", Label::parse("subcategory", text)))
            .transpose()?,
        condition: field("condition", Condition::parse(&request.condition))?,
        location: request.location.parse()?,
        attributes: parse_attributes(&request.attributes)?,
        images: parse_images(&request.images)?,
    };
    let listing = journeys::NewListing {
        seller: user.actor(),
        listing_id: ListingId::new(),
        product_id: request
            .product_id
            .map_or_else(ProductId::new, ProductId::from_uuid),
        details,
        price: request.price.parse("price")?,
        quantity: parse_quantity(request.quantity)?,
        payout_wallet: request.payout_wallet_id.map(WalletId::from_uuid),
    };
    let (listing_id, product_id) = (listing.listing_id, listing.product_id);
    let accepted = state
        .store
        .execute_multi(
            stream_refs(listing.streams()),
            meta.context(&user),
            meta.idempotency(&user, &body.sha256),
            move |plan| Ok(listing.run(plan)?),
            move |(), committed| {
                let (version, _) = committed
                    .stream::<Listing>(&listing_id.to_string())
                    .unwrap_or_default();
                (
                    201,
                    json!({
                        "id": listing_id.to_string(),
                        "version": version,
                        "position": committed.last().token(),
                        "product_id": product_id.to_string(),
                    }),
                )
            },
        )
        .await
        .map_err(exec_error)?;
    Ok(respond(accepted))
}

/// The listing's current state, or 404.
async fn existing_listing(state: &AppState, id: ListingId) -> Result<Listing, ApiError> {
    let (listing, _) = state
        .store
        .state::<Listing>(&id.to_string())
        .await
        .map_err(exec_error)?;
    if !listing.exists() {
        return Err(journey_error(JourneyError::ListingNotFound(id)));
    }
    Ok(listing)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePrice {
    /// The new price of one unit, in the listing's currency.
    price: MoneyBody,
}

/// Change a listing's price
///
/// The seller changes the price; the product timeline records it.
#[utoipa::path(post, path = "/listings/{id}/price", operation_id = "changePrice", tag = "listings",
    params(("id" = Uuid, Path, description = LISTING_ID)),
    request_body = ChangePrice,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn change_price(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<ChangePrice>,
) -> Result<Response, ApiError> {
    let price = body.value.price.parse("price")?;
    let listing_id = ListingId::from_uuid(id);
    let product_id = existing_listing(&state, listing_id).await?.product_id();
    let change = journeys::PriceChange {
        listing_id,
        product_id,
        actor: user.actor(),
        price,
    };
    let accepted = state
        .store
        .execute_multi(
            stream_refs(change.streams()),
            meta.context(&user),
            meta.idempotency(&user, &body.sha256),
            move |plan| Ok(change.run(plan)?),
            move |(), committed| single_body::<Listing>(200, &listing_id.to_string(), committed),
        )
        .await
        .map_err(exec_error)?;
    Ok(respond(accepted))
}

/// `{"id", "version", "position"}` of `A` `id` after a unit of work.
pub(crate) fn single_body<A: Decide>(
    status: u16,
    id: &str,
    committed: &event_store::Committed,
) -> (u16, serde_json::Value) {
    let (version, _) = committed.stream::<A>(id).unwrap_or_default();
    (
        status,
        json!({"id": id, "version": version, "position": committed.last().token()}),
    )
}

/// Details to change; absent or null fields keep their value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = UpdateListingDetails)]
pub struct UpdateDetails {
    #[schema(schema_with = text_or_null::<Title>)]
    title: Option<String>,
    #[schema(schema_with = text_or_null::<Description>)]
    description: Option<String>,
    #[schema(schema_with = text_or_null::<Label>)]
    category: Option<String>,
    #[schema(schema_with = text_or_null::<Label>)]
    subcategory: Option<String>,
    #[schema(schema_with = crate::openapi::condition_or_null)]
    condition: Option<String>,
    location: Option<LocationBody>,
    #[schema(schema_with = crate::openapi::attributes_or_null)]
    attributes: Option<serde_json::Map<String, serde_json::Value>>,
    #[schema(schema_with = crate::openapi::images_or_null)]
    images: Option<Vec<String>>,
}

/// Change a listing's details
///
/// Fields that are absent or null keep their value.
#[utoipa::path(post, path = "/listings/{id}/details", operation_id = "updateListingDetails", tag = "listings",
    params(("id" = Uuid, Path, description = LISTING_ID)),
    request_body = UpdateDetails,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn update_details(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<UpdateDetails>,
) -> Result<Response, ApiError> {
    let request = &body.value;
    let changes = DetailChanges {
        title: request
            .title
            .as_deref()
            .map(|t| field("title", Title::parse("title", t)))
            .transpose()?,
        description: request
            .description
            .as_deref()
            .map(|t| field("description", Description::parse("description", t)))
            .transpose()?,
        category: request
            .category
            .as_deref()
            .map(|t| field("category", Label::parse("category", t)))
            .transpose()?,
        subcategory: request
            .subcategory
            .as_deref()
            .map(|t| field("subcategory", Label::parse("subcategory", t)))
            .transpose()?,
        condition: request
            .condition
            .as_deref()
            .map(|t| field("condition", Condition::parse(t)))
            .transpose()?,
        location: request
            .location
            .as_ref()
            .map(LocationBody::parse)
            .transpose()?,
        attributes: request
            .attributes
            .as_ref()
            .map(parse_attributes)
            .transpose()?,
        images: request.images.as_deref().map(parse_images).transpose()?,
    };
    let listing_id = ListingId::from_uuid(id);
    let update = journeys::DetailsUpdate {
        listing_id,
        actor: user.actor(),
        changes,
    };
    let accepted = state
        .store
        .execute_multi(
            stream_refs(update.streams()),
            meta.context(&user),
            meta.idempotency(&user, &body.sha256),
            move |plan| Ok(update.run(plan)?),
            move |(), committed| single_body::<Listing>(200, &listing_id.to_string(), committed),
        )
        .await
        .map_err(exec_error)?;
    Ok(respond(accepted))
}

/// Delete a listing
///
/// A soft delete: the listing stays in the log.
#[utoipa::path(post, path = "/listings/{id}/delete", operation_id = "deleteListing", tag = "listings",
    params(("id" = Uuid, Path, description = LISTING_ID)),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn delete(
    state: State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    id: IdPath,
) -> Result<Response, ApiError> {
    lifecycle(state, user, meta, id, |actor| ListingCommand::Delete {
        actor,
    })
    .await
}

/// Pause a listing
///
/// A paused listing takes no orders.
#[utoipa::path(post, path = "/listings/{id}/pause", operation_id = "pauseListing", tag = "listings",
    params(("id" = Uuid, Path, description = LISTING_ID)),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn pause(
    state: State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    id: IdPath,
) -> Result<Response, ApiError> {
    lifecycle(state, user, meta, id, |actor| ListingCommand::Pause {
        actor,
    })
    .await
}

/// Resume a paused listing
///
/// The listing takes orders again.
#[utoipa::path(post, path = "/listings/{id}/resume", operation_id = "resumeListing", tag = "listings",
    params(("id" = Uuid, Path, description = LISTING_ID)),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn resume(
    state: State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    id: IdPath,
) -> Result<Response, ApiError> {
    lifecycle(state, user, meta, id, |actor| ListingCommand::Resume {
        actor,
    })
    .await
}

/// A body-less change of a listing's status.
async fn lifecycle(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    command: fn(Actor) -> ListingCommand,
) -> Result<Response, ApiError> {
    let command = command(user.actor());
    single::<Listing>(
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
pub struct SetStock {
    #[schema(schema_with = crate::openapi::stock_quantity)]
    quantity: u32,
}

/// Set a listing's stock
///
/// The seller sets the units in stock; active holds are kept.
#[utoipa::path(post, path = "/listings/{id}/stock", operation_id = "setStock", tag = "listings",
    params(("id" = Uuid, Path, description = LISTING_ID)),
    request_body = SetStock,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn set_stock(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<SetStock>,
) -> Result<Response, ApiError> {
    let quantity = parse_quantity(body.value.quantity)?;
    existing_listing(&state, ListingId::from_uuid(id)).await?;
    let command = ReservationCommand::SetStock {
        actor: user.actor(),
        quantity,
    };
    single::<Reservation>(
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reserve {
    #[schema(schema_with = crate::openapi::hold_quantity)]
    quantity: u32,
    #[schema(schema_with = crate::openapi::hold_ttl_seconds)]
    ttl_seconds: u32,
}

/// Hold stock of an active listing
///
/// Places a hold for the caller that expires after `ttl_seconds`. 201 with
/// the hold's id (and the stock pool's version). 409 `listing_unavailable`
/// when the listing is not active.
#[utoipa::path(post, path = "/listings/{id}/reservations", operation_id = "reserveStock", tag = "listings",
    params(("id" = Uuid, Path, description = LISTING_ID)),
    request_body = Reserve,
    responses((status = 201, description = ACCEPTED, body = AcceptedBody)))]
async fn reserve(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<Reserve>,
) -> Result<Response, ApiError> {
    let now = Utc::now();
    let expires_at = field(
        "ttl_seconds",
        domain::process::hold_expiry(now, body.value.ttl_seconds),
    )?;
    let listing_id = ListingId::from_uuid(id);
    let request = journeys::HoldRequest {
        listing_id,
        holder: user.actor(),
        quantity: body.value.quantity,
        expires_at,
    };
    let (listing, _) = state
        .store
        .state::<Listing>(&listing_id.to_string())
        .await
        .map_err(exec_error)?;
    let hold = request
        .plan(&listing, HoldId::new(), now)
        .map_err(journey_error)?;
    let mut reply = created_reply(hold.hold_id.as_uuid());
    reply.timers.push(Timer::of(hold.timer, hold.due_at));
    single::<Reservation>(&state, &user, &meta, &body.sha256, id, hold.command, reply).await
}

/// Release a stock hold
///
/// Frees a hold: its holder, the listing's seller or an admin. A second
/// release is 409 `hold_not_active`; a hold an order took is released by
/// cancelling the order (409 `reservation_in_order`).
#[utoipa::path(post, path = "/listings/{id}/reservations/{reservation_id}/release",
    operation_id = "releaseReservation", tag = "listings",
    params(
        ("id" = Uuid, Path, description = LISTING_ID),
        ("reservation_id" = Uuid, Path, description = "The hold, as `POST /listings/{id}/reservations` answered it. Anything but a UUID is 400 `invalid_id`.")
    ),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn release_reservation(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPair(listing, hold): IdPair,
) -> Result<Response, ApiError> {
    let (listing_id, hold_id, actor) = (
        ListingId::from_uuid(listing),
        HoldId::from_uuid(hold),
        user.actor(),
    );
    existing_listing(&state, listing_id).await?;
    let reason = Reason::parse("reason", "released by request").unwrap_or_default();
    let accepted = state
        .store
        .execute_multi(
            stream_refs([Stream::Reservation(listing_id)]),
            meta.context(&user),
            meta.idempotency(&user, &EMPTY_BODY_SHA256),
            move |plan| Ok(journeys::release_hold(plan, listing_id, hold_id, actor, reason.clone())?),
            move |(), committed| {
                let (version, _) = committed
                    .stream::<Reservation>(&listing_id.to_string())
                    .unwrap_or_default();
                (
                    200,
                    json!({"id": hold_id.to_string(), "version": version, "position": committed.last().token()}),
                )
            },
        )
        .await
        .map_err(exec_error)?;
    Ok(respond(accepted))
}
