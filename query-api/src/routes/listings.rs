//! `/listings` (filtered, newest first) and `/listings/{id}` (with its
//! stock), from the "listings" projection, for any signed-in user.
//!
//! Deleted listings are soft-deleted: they stay in the read model but only
//! their seller, an admin or an auditor sees them (`?status=deleted` in the
//! list, or by id); for anyone else they do not exist.

use std::sync::LazyLock;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use domain::listing::{Condition, ListingStatus};
use domain::values::{Currency, Label, MAX_AMOUNT};
use http_kit::openapi::{ErrorBody, MoneyBody, Routes, string_enum};
use http_kit::{ApiError, AuthUser, IdPath};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{Postgres, QueryBuilder};
use utoipa::ToSchema;
use utoipa::openapi::schema::Object;
use uuid::Uuid;

use super::{db_error, not_found, page_items, sees_everything, time};
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::openapi::{After, ListingFilters, ListingPaging};
use crate::params::{CursorKind, Params, QueryParams, invalid_parameter, page};

/// `domain::listing::Condition::as_str` of every condition.
pub static CONDITIONS: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| Condition::ALL.iter().map(Condition::as_str).collect());
/// `domain::listing::ListingStatus::as_str` of every status.
pub static STATUSES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    ListingStatus::ALL
        .iter()
        .map(ListingStatus::as_str)
        .collect()
});

pub fn routes() -> Routes<AppState> {
    Routes::new()
        .get("/listings", listings)
        .get("/listings/{id}", listing)
}

/// A listing's condition.
pub(crate) fn condition_schema() -> Object {
    string_enum(CONDITIONS.iter().copied()).build()
}

/// A listing's status.
pub(crate) fn status_schema() -> Object {
    string_enum(STATUSES.iter().copied()).build()
}

/// A listing with its stock.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Listing)]
pub(crate) struct ListingView {
    /// The listing.
    id: Uuid,
    /// Its seller.
    seller_id: Uuid,
    /// The product whose timeline tells its story.
    product_id: Uuid,
    title: String,
    description: String,
    category: String,
    subcategory: Option<String>,
    #[schema(schema_with = condition_schema)]
    condition: String,
    price: MoneyBody,
    location: Location,
    /// Free-form attributes: JSON scalars by name.
    #[schema(value_type = Object)]
    attributes: Value,
    #[schema(value_type = Vec<String>)]
    images: Value,
    #[schema(schema_with = status_schema)]
    status: String,
    /// Where the seller is paid, for wallet escrow.
    payout_wallet_id: Option<Uuid>,
    /// Units the seller put in stock.
    #[schema(minimum = 0)]
    stock: i32,
    /// Units held by active reservations.
    #[schema(minimum = 0)]
    held: i32,
    /// Units that can still be reserved.
    #[schema(minimum = 0)]
    available: i32,
    /// When it was listed.
    #[serde(serialize_with = "time")]
    created_at: DateTime<Utc>,
    /// Its last change.
    #[serde(serialize_with = "time")]
    updated_at: DateTime<Utc>,
    /// Its number of events.
    #[schema(minimum = 0)]
    version: i64,
}

/// Where a listed item is.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Location {
    city: String,
    country: String,
    lat: Option<f64>,
    lon: Option<f64>,
}

/// A page of listings, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ListingPage {
    #[schema(schema_with = page_items::<ListingView>)]
    items: Vec<ListingView>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

pub(super) const COLUMNS: &str = "listing_id, seller_id, product_id, title, description, category, \
    subcategory, condition, price_amount, currency, city, country, lat, lon, attributes, images, \
    status, payout_wallet_id, stock, held, available, created_at, updated_at, version";

#[derive(Debug, sqlx::FromRow)]
pub(super) struct ListingRow {
    pub listing_id: Uuid,
    seller_id: Uuid,
    product_id: Uuid,
    title: String,
    description: String,
    category: String,
    subcategory: Option<String>,
    condition: String,
    price_amount: i64,
    currency: String,
    city: String,
    country: String,
    lat: Option<f64>,
    lon: Option<f64>,
    attributes: Value,
    images: Value,
    pub status: String,
    payout_wallet_id: Option<Uuid>,
    stock: i32,
    held: i32,
    available: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl ListingRow {
    pub fn view(self) -> ListingView {
        ListingView {
            id: self.listing_id,
            seller_id: self.seller_id,
            product_id: self.product_id,
            title: self.title,
            description: self.description,
            category: self.category,
            subcategory: self.subcategory,
            condition: self.condition,
            price: MoneyBody::new(self.price_amount, self.currency),
            location: Location {
                city: self.city,
                country: self.country,
                lat: self.lat.filter(|lat| lat.is_finite()),
                lon: self.lon.filter(|lon| lon.is_finite()),
            },
            attributes: if self.attributes.is_object() {
                self.attributes
            } else {
                json!({})
            },
            images: if self.images.is_array() {
                self.images
            } else {
                json!([])
            },
            status: self.status,
            payout_wallet_id: self.payout_wallet_id,
            stock: self.stock,
            held: self.held,
            available: self.available,
            created_at: self.created_at,
            updated_at: self.updated_at,
            version: self.version,
        }
    }
}

/// Whether `user` sees the deleted listings of `seller`.
fn sees_deleted(user: &AuthUser, seller: Option<Uuid>) -> bool {
    sees_everything(user) || seller == Some(user.user_id.as_uuid())
}

/// One listing with its stock
///
/// `stock` is what the seller set, `held` what active reservations hold,
/// `available` the difference. A deleted listing is 404 `listing_not_found`
/// except for its seller, admins and auditors.
#[utoipa::path(
    get,
    path = "/listings/{id}",
    operation_id = "getListing",
    tag = "listings",
    params(("id" = Uuid, Path, description = "The listing. Anything but a UUID is 400 `invalid_id`."), After),
    responses(
        (status = 200, description = "The read model's answer.", body = ListingView),
        (status = 404, description = "Not in the read model (`listing_not_found`; pass a write's position as `after`).", body = ErrorBody),
    ),
)]
pub(crate) async fn listing(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<ListingView>, ApiError> {
    let params = query.accept(&["after"])?;
    let after = params.after()?;
    state
        .read_after_of(after, &[Projection::Listings], id)
        .await?;
    let row: Option<ListingRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM rm_listings WHERE listing_id = $1"
    ))
    .bind(id)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    match row {
        Some(row) if row.status != "deleted" || sees_deleted(&user, Some(row.seller_id)) => {
            Ok(Json(row.view()))
        }
        _ => Err(not_found("listing_not_found", "listing not found")),
    }
}

/// The parameters of [`Filters`].
pub(super) const FILTER_PARAMS: &[&str] = &[
    "category",
    "condition",
    "seller_id",
    "currency",
    "min_price",
    "max_price",
    "status",
];

/// The filters of `/listings` (and `/search`), validated.
#[derive(Debug, Default)]
pub(super) struct Filters {
    pub category: Option<String>,
    pub condition: Option<&'static str>,
    pub seller_id: Option<Uuid>,
    pub currency: Option<String>,
    pub min_price: Option<i64>,
    pub max_price: Option<i64>,
    pub status: Option<&'static str>,
}

impl Filters {
    /// Reads [`FILTER_PARAMS`]; `status=deleted` is for those who may see
    /// the deleted listings asked for (else 403).
    pub fn parse(params: &Params, user: &AuthUser) -> Result<Self, ApiError> {
        let filters = Filters {
            category: params
                .get("category")
                .map(|text| {
                    Label::parse("category", text)
                        .map(|label| label.as_str().to_owned())
                        .map_err(|error| invalid_parameter(error.message))
                })
                .transpose()?,
            condition: params.choice("condition", &CONDITIONS)?,
            seller_id: params.uuid("seller_id")?,
            currency: params
                .get("currency")
                .map(|text| {
                    Currency::parse(text)
                        .map(|currency| currency.as_str().to_owned())
                        .map_err(|error| invalid_parameter(format!("currency: {}", error.message)))
                })
                .transpose()?,
            min_price: params.integer("min_price", 0, MAX_AMOUNT)?,
            max_price: params.integer("max_price", 0, MAX_AMOUNT)?,
            status: params.choice("status", &STATUSES)?,
        };
        if let (Some(min), Some(max)) = (filters.min_price, filters.max_price)
            && min > max
        {
            return Err(invalid_parameter("min_price must not be above max_price"));
        }
        if filters.status == Some("deleted") && !sees_deleted(user, filters.seller_id) {
            return Err(ApiError::forbidden(
                "deleted listings are shown only to their seller (with seller_id), admins and auditors",
            ));
        }
        Ok(filters)
    }

    /// Whether a listing of `status` passes the status filter.
    pub fn admits(&self, status: &str) -> bool {
        match self.status {
            Some(wanted) => status == wanted,
            None => status != "deleted",
        }
    }
}

/// Listings, newest first, filtered
///
/// Every filter is optional; they combine with AND. Without `status`,
/// deleted listings are left out; `status=deleted` is for admins, auditors
/// and a seller naming themselves in `seller_id` (else 403). A filter value
/// out of its rules is 400 `invalid_parameter`.
#[utoipa::path(
    get,
    path = "/listings",
    operation_id = "listListings",
    tag = "listings",
    params(ListingPaging, ListingFilters, After),
    responses(
        (status = 200, description = "The read model's answer.", body = ListingPage),
        (status = 403, description = "`status=deleted` for someone who may not see them (`forbidden`).", body = ErrorBody),
    ),
)]
pub(crate) async fn listings(
    State(state): State<AppState>,
    user: AuthUser,
    query: QueryParams,
) -> Result<Json<ListingPage>, ApiError> {
    let params = query.accept(&[&["after", "limit", "cursor"], FILTER_PARAMS].concat())?;
    let after = params.after()?;
    let limit = params.limit()?;
    let before: Option<Uuid> = params.cursor(CursorKind::Listings)?;
    let filters = Filters::parse(&params, &user)?;
    state.read_after(after, &[Projection::Listings]).await?;

    let mut sql =
        QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM rm_listings WHERE "));
    match filters.status {
        Some(status) => sql.push("status = ").push_bind(status),
        None => sql.push("status <> 'deleted'"),
    };
    if let Some(category) = filters.category {
        sql.push(" AND category = ").push_bind(category);
    }
    if let Some(condition) = filters.condition {
        sql.push(" AND condition = ").push_bind(condition);
    }
    if let Some(seller_id) = filters.seller_id {
        sql.push(" AND seller_id = ").push_bind(seller_id);
    }
    if let Some(currency) = filters.currency {
        sql.push(" AND currency = ").push_bind(currency);
    }
    if let Some(min_price) = filters.min_price {
        sql.push(" AND price_amount >= ").push_bind(min_price);
    }
    if let Some(max_price) = filters.max_price {
        sql.push(" AND price_amount <= ").push_bind(max_price);
    }
    if let Some(before) = before {
        sql.push(" AND listing_id < ").push_bind(before);
    }
    sql.push(" ORDER BY listing_id DESC LIMIT ")
        .push_bind(limit + 1);
    let rows: Vec<ListingRow> = sql
        .build_query_as()
        .fetch_all(&state.pool)
        .await
        .map_err(db_error)?;
    let (rows, next) = page(rows, limit, CursorKind::Listings, |row| row.listing_id);
    Ok(Json(ListingPage {
        items: rows.into_iter().map(ListingRow::view).collect(),
        next_cursor: next,
    }))
}
