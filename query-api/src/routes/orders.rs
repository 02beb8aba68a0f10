//! `/orders/{id}` and `/orders?role=buyer|seller` (newest first), from the
//! "orders" projection. An order is seen by its buyer, its seller, admins
//! and auditors. The list is the caller's orders in that role; admins and
//! auditors may name another user with `user_id`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use http_kit::ApiError;
use http_kit::AuthUser;
use http_kit::IdPath;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{db_error, list, money, not_found, optional_time, sees_everything, time};
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::params::{CursorKind, QueryParams, invalid_query, page};

pub fn routes() -> axum::Router<AppState> {
    Router::new()
        .route("/orders", get(orders))
        .route("/orders/{id}", get(order))
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
    fn to_json(&self) -> Value {
        let review = self.rating.map(|rating| {
            json!({"rating": rating, "comment": self.review_comment.clone().unwrap_or_default()})
        });
        json!({
            "id": self.order_id,
            "checkout_id": self.checkout_id,
            "buyer_id": self.buyer_id,
            "seller_id": self.seller_id,
            "status": self.status,
            "payment_method": self.payment_method,
            "total": money(self.total_amount, &self.currency),
            "lines": if self.lines.is_array() { self.lines.clone() } else { json!([]) },
            "shipping_address": if self.shipping_address.is_object() {
                self.shipping_address.clone()
            } else {
                json!({})
            },
            "buyer_wallet_id": self.buyer_wallet_id,
            "seller_wallet_id": self.seller_wallet_id,
            "carrier": self.carrier,
            "tracking_number": self.tracking_number,
            "reject_reason": self.reject_reason,
            "cancel_reason": self.cancel_reason,
            "return_reason": self.return_reason,
            "escrow_released": self.escrow_released,
            "review": review,
            "placed_at": time(self.placed_at),
            "confirmed_at": optional_time(self.confirmed_at),
            "shipped_at": optional_time(self.shipped_at),
            "delivered_at": optional_time(self.delivered_at),
            "completed_at": optional_time(self.completed_at),
            "cancelled_at": optional_time(self.cancelled_at),
            "returned_at": optional_time(self.returned_at),
            "refunded_at": optional_time(self.refunded_at),
            "updated_at": time(self.updated_at),
            "version": self.version,
        })
    }
}

async fn order(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(row.to_json()))
}

async fn orders(
    State(state): State<AppState>,
    user: AuthUser,
    query: QueryParams,
) -> Result<Json<Value>, ApiError> {
    let params = query.accept(&["after", "limit", "cursor", "role", "user_id"])?;
    let after = params.after()?;
    let limit = params.limit()?;
    let before: Option<Uuid> = params.cursor(CursorKind::Orders)?;
    let role = params
        .choice("role", &["buyer", "seller"])?
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
    Ok(Json(list(
        rows.iter().map(OrderRow::to_json).collect(),
        next,
    )))
}
