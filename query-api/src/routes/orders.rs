//! `/orders/{id}` and `/orders?role=buyer|seller` (newest first), from the
//! "orders" projection. An order is seen by its buyer, its seller, admins
//! and auditors. The list is the caller's orders in that role; admins and
//! auditors may name another user with `user_id`.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use domain::order::{OrderStatus, PaymentMethod};
use http_kit::openapi::{ErrorBody, MoneyBody, Routes, string_enum};
use http_kit::{ApiError, AuthUser, IdPath};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa::openapi::schema::Object;
use uuid::Uuid;

use super::{db_error, not_found, optional_time, page_items, sees_everything, time};
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::openapi::{After, OrderListParams, OrderPaging};
use crate::params::{CursorKind, QueryParams, invalid_query, page};

/// The roles `/orders` lists a user's orders in.
pub const ORDER_ROLES: &[&str] = &["buyer", "seller"];

pub fn routes() -> Routes<AppState> {
    Routes::new()
        .get("/orders", orders)
        .get("/orders/{id}", order)
}

fn order_status_schema() -> Object {
    string_enum(OrderStatus::ALL.iter().map(OrderStatus::as_str)).build()
}

fn payment_method_schema() -> Object {
    string_enum(PaymentMethod::ALL.iter().map(PaymentMethod::as_str)).build()
}

/// An order: one seller's part of a checkout.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Order)]
pub(crate) struct OrderView {
    /// The order.
    id: Uuid,
    /// Shared by the orders of one checkout (one per seller).
    checkout_id: Uuid,
    /// The buyer.
    buyer_id: Uuid,
    /// The seller.
    seller_id: Uuid,
    #[schema(schema_with = order_status_schema)]
    status: String,
    #[schema(schema_with = payment_method_schema)]
    payment_method: String,
    total: MoneyBody,
    /// Listing, quantity and unit price at order time, per line.
    #[schema(value_type = Vec<Object>)]
    lines: Value,
    #[schema(value_type = Object)]
    shipping_address: Value,
    /// The buyer's wallet, for wallet escrow.
    buyer_wallet_id: Option<Uuid>,
    /// The seller's payout wallet, for wallet escrow.
    seller_wallet_id: Option<Uuid>,
    carrier: Option<String>,
    tracking_number: Option<String>,
    reject_reason: Option<String>,
    cancel_reason: Option<String>,
    return_reason: Option<String>,
    escrow_released: bool,
    review: Option<Review>,
    /// When it was placed.
    #[serde(serialize_with = "time")]
    placed_at: DateTime<Utc>,
    /// When it was confirmed.
    #[serde(serialize_with = "optional_time")]
    confirmed_at: Option<DateTime<Utc>>,
    /// When it was shipped.
    #[serde(serialize_with = "optional_time")]
    shipped_at: Option<DateTime<Utc>>,
    /// When it was delivered.
    #[serde(serialize_with = "optional_time")]
    delivered_at: Option<DateTime<Utc>>,
    /// When it was completed.
    #[serde(serialize_with = "optional_time")]
    completed_at: Option<DateTime<Utc>>,
    /// When it was cancelled.
    #[serde(serialize_with = "optional_time")]
    cancelled_at: Option<DateTime<Utc>>,
    /// When it was returned.
    #[serde(serialize_with = "optional_time")]
    returned_at: Option<DateTime<Utc>>,
    /// When it was refunded.
    #[serde(serialize_with = "optional_time")]
    refunded_at: Option<DateTime<Utc>>,
    /// Its last event.
    #[serde(serialize_with = "time")]
    updated_at: DateTime<Utc>,
    /// Its number of events.
    #[schema(minimum = 0)]
    version: i64,
}

/// The buyer's review of the seller.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Review {
    #[schema(minimum = 1, maximum = 5)]
    rating: i16,
    comment: String,
}

/// A page of orders, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OrderPage {
    #[schema(schema_with = page_items::<OrderView>)]
    items: Vec<OrderView>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

const COLUMNS: &str = "order_id, checkout_id, buyer_id, seller_id, status, payment_method, \
    total_amount, currency, lines, shipping_address, buyer_wallet_id, seller_wallet_id, carrier, \
    tracking_number, reject_reason, cancel_reason, return_reason, escrow_released, rating, \
    review_comment, placed_at, confirmed_at, shipped_at, delivered_at, completed_at, cancelled_at, \
    returned_at, refunded_at, updated_at, version";

#[derive(Debug, sqlx::FromRow)]
struct OrderRow {
    order_id: Uuid,
    checkout_id: Uuid,
    buyer_id: Uuid,
    seller_id: Uuid,
    status: String,
    payment_method: String,
    total_amount: i64,
    currency: String,
    lines: Value,
    shipping_address: Value,
    buyer_wallet_id: Option<Uuid>,
    seller_wallet_id: Option<Uuid>,
    carrier: Option<String>,
    tracking_number: Option<String>,
    reject_reason: Option<String>,
    cancel_reason: Option<String>,
    return_reason: Option<String>,
    escrow_released: bool,
    rating: Option<i16>,
    review_comment: Option<String>,
    placed_at: DateTime<Utc>,
    confirmed_at: Option<DateTime<Utc>>,
    shipped_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    cancelled_at: Option<DateTime<Utc>>,
    returned_at: Option<DateTime<Utc>>,
    refunded_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl OrderRow {
    fn view(self) -> OrderView {
        let review = self.rating.map(|rating| Review {
            rating,
            comment: self.review_comment.unwrap_or_default(),
        });
        OrderView {
            id: self.order_id,
            checkout_id: self.checkout_id,
            buyer_id: self.buyer_id,
            seller_id: self.seller_id,
            status: self.status,
            payment_method: self.payment_method,
            total: MoneyBody::new(self.total_amount, self.currency),
            lines: if self.lines.is_array() {
                self.lines
            } else {
                json!([])
            },
            shipping_address: if self.shipping_address.is_object() {
                self.shipping_address
            } else {
                json!({})
            },
            buyer_wallet_id: self.buyer_wallet_id,
            seller_wallet_id: self.seller_wallet_id,
            carrier: self.carrier,
            tracking_number: self.tracking_number,
            reject_reason: self.reject_reason,
            cancel_reason: self.cancel_reason,
            return_reason: self.return_reason,
            escrow_released: self.escrow_released,
            review,
            placed_at: self.placed_at,
            confirmed_at: self.confirmed_at,
            shipped_at: self.shipped_at,
            delivered_at: self.delivered_at,
            completed_at: self.completed_at,
            cancelled_at: self.cancelled_at,
            returned_at: self.returned_at,
            refunded_at: self.refunded_at,
            updated_at: self.updated_at,
            version: self.version,
        }
    }
}

/// One order
///
/// Its buyer, its seller, admins and auditors (403 for others); 404
/// `order_not_found`.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    operation_id = "getOrder",
    tag = "orders",
    params(("id" = Uuid, Path, description = "The order. Anything but a UUID is 400 `invalid_id`."), After),
    responses(
        (status = 200, description = "The read model's answer.", body = OrderView),
        (status = 403, description = "The caller may not see this order (`forbidden`).", body = ErrorBody),
        (status = 404, description = "Not in the read model (`order_not_found`; pass a write's position as `after`).", body = ErrorBody),
    ),
)]
pub(crate) async fn order(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<OrderView>, ApiError> {
    let params = query.accept(&["after"])?;
    let after = params.after()?;
    state
        .read_after_of(after, &[Projection::Orders], id)
        .await?;
    let row: Option<OrderRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM rm_orders WHERE order_id = $1"
    ))
    .bind(id)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    let row = row.ok_or_else(|| not_found("order_not_found", "order not found"))?;
    let me = user.user_id.as_uuid();
    if row.buyer_id != me && row.seller_id != me && !sees_everything(&user) {
        return Err(ApiError::forbidden(
            "only the order's buyer, its seller, an admin or an auditor sees an order",
        ));
    }
    Ok(Json(row.view()))
}

/// The caller's orders in one role, newest first
///
/// `role` is required (missing: 400 `invalid_query`). Admins and auditors
/// may list another user's orders with `user_id`; anyone else naming another
/// user gets 403.
#[utoipa::path(
    get,
    path = "/orders",
    operation_id = "listOrders",
    tag = "orders",
    params(OrderPaging, OrderListParams, After),
    responses(
        (status = 200, description = "The read model's answer.", body = OrderPage),
        (status = 403, description = "Another user's orders, asked by someone who is no admin or auditor (`forbidden`).", body = ErrorBody),
    ),
)]
pub(crate) async fn orders(
    State(state): State<AppState>,
    user: AuthUser,
    query: QueryParams,
) -> Result<Json<OrderPage>, ApiError> {
    let params = query.accept(&["after", "limit", "cursor", "role", "user_id"])?;
    let after = params.after()?;
    let limit = params.limit()?;
    let before: Option<Uuid> = params.cursor(CursorKind::Orders)?;
    let role = params
        .choice("role", ORDER_ROLES)?
        .ok_or_else(|| invalid_query("role is required: buyer or seller"))?;
    let me = user.user_id.as_uuid();
    let subject = params.uuid("user_id")?.unwrap_or(me);
    if subject != me && !sees_everything(&user) {
        return Err(ApiError::forbidden(
            "only admins and auditors list another user's orders",
        ));
    }
    state.read_after(after, &[Projection::Orders]).await?;
    // The column is one of two constants, never the client's text.
    let column = if role == "buyer" {
        "buyer_id"
    } else {
        "seller_id"
    };
    let rows: Vec<OrderRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM rm_orders
          WHERE {column} = $1 AND ($2::uuid IS NULL OR order_id < $2)
          ORDER BY order_id DESC
          LIMIT $3"
    ))
    .bind(subject)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    let (rows, next) = page(rows, limit, CursorKind::Orders, |row| row.order_id);
    Ok(Json(OrderPage {
        items: rows.into_iter().map(OrderRow::view).collect(),
        next_cursor: next,
    }))
}
