//! `/sellers/{id}/stats`, from the "orders" projection, for any signed-in
//! user. A seller without orders (or an id that is no seller) has zero
//! counts and no rates: the read model cannot tell the two apart, so
//! neither is a 404.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use http_kit::ApiError;
use http_kit::AuthUser;
use http_kit::IdPath;
use serde_json::{Value, json};
use uuid::Uuid;

use super::db_error;
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::params::QueryParams;

pub fn routes() -> axum::Router<AppState> {
    Router::new().route("/sellers/{id}/stats", get(stats))
}

#[derive(Debug, Default, sqlx::FromRow)]
struct StatsRow {
    orders_placed: i64,
    orders_confirmed: i64,
    orders_shipped: i64,
    orders_delivered: i64,
    orders_cancelled: i64,
    orders_returned: i64,
    fulfillment_seconds_sum: f64,
    rating_sum: i64,
    rating_count: i64,
}

/// `part / whole` within 0..=1, or `None` when `whole` is 0.
fn rate(part: i64, whole: i64) -> Option<f64> {
    (whole > 0).then(|| (part.max(0) as f64 / whole as f64).clamp(0.0, 1.0))
}

impl StatsRow {
    fn to_json(&self, seller_id: Uuid) -> Value {
        let average_fulfillment_seconds = (self.orders_delivered > 0)
            .then(|| (self.fulfillment_seconds_sum / self.orders_delivered as f64).max(0.0))
            .filter(|seconds| seconds.is_finite());
        let average_rating = (self.rating_count > 0)
            .then(|| (self.rating_sum as f64 / self.rating_count as f64).clamp(1.0, 5.0));
        json!({
            "seller_id": seller_id,
            "orders": {
                "placed": self.orders_placed,
                "confirmed": self.orders_confirmed,
                "shipped": self.orders_shipped,
                "delivered": self.orders_delivered,
                "cancelled": self.orders_cancelled,
                "returned": self.orders_returned,
            },
            // Of the orders confirmed, the share delivered.
            "fulfillment_rate": rate(self.orders_delivered, self.orders_confirmed),
            // Of the orders delivered, the share returned.
            "return_rate": rate(self.orders_returned, self.orders_delivered),
            "average_fulfillment_seconds": average_fulfillment_seconds,
            "rating": {"average": average_rating, "count": self.rating_count},
        })
    }
}

async fn stats(
    State(state): State<AppState>,
    _user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<Value>, ApiError> {
    let params = query.accept(&["after"])?;
    let after = params.after()?;
    state.read_after(after, &[Projection::Orders]).await?;
    let row: Option<StatsRow> = sqlx::query_as(
        "SELECT orders_placed, orders_confirmed, orders_shipped, orders_delivered,
                orders_cancelled, orders_returned, fulfillment_seconds_sum, rating_sum,
                rating_count
           FROM rm_seller_stats WHERE seller_id = $1",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    Ok(Json(row.unwrap_or_default().to_json(id)))
}
