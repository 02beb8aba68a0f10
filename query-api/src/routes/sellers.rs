//! `/sellers/{id}/stats`, from the "orders" projection, for any signed-in
//! user. A seller without orders (or an id that is no seller) has zero
//! counts and no rates: the read model cannot tell the two apart, so
//! neither is a 404.

use axum::Json;
use axum::extract::State;
use http_kit::openapi::Routes;
use http_kit::{ApiError, AuthUser, IdPath};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::db_error;
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::openapi::After;
use crate::params::QueryParams;

pub fn routes() -> Routes<AppState> {
    Routes::new().get("/sellers/{id}/stats", stats)
}

/// A seller's statistics.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SellerStats)]
pub(crate) struct SellerStatsView {
    /// The seller.
    seller_id: Uuid,
    orders: OrderCounts,
    /// Delivered / confirmed; null without confirmed orders.
    #[schema(minimum = 0, maximum = 1)]
    fulfillment_rate: Option<f64>,
    /// Returned / delivered; null without delivered orders.
    #[schema(minimum = 0, maximum = 1)]
    return_rate: Option<f64>,
    /// Mean time from confirmation to delivery; null without delivered
    /// orders.
    #[schema(minimum = 0)]
    average_fulfillment_seconds: Option<f64>,
    rating: RatingView,
}

/// A seller's orders by how far they went.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OrderCounts {
    /// Orders placed with the seller.
    #[schema(minimum = 0)]
    placed: i64,
    /// Orders confirmed.
    #[schema(minimum = 0)]
    confirmed: i64,
    /// Orders shipped.
    #[schema(minimum = 0)]
    shipped: i64,
    /// Orders delivered.
    #[schema(minimum = 0)]
    delivered: i64,
    /// Orders cancelled.
    #[schema(minimum = 0)]
    cancelled: i64,
    /// Orders returned.
    #[schema(minimum = 0)]
    returned: i64,
}

/// The reviews a seller received.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Rating)]
pub(crate) struct RatingView {
    #[schema(minimum = 1, maximum = 5)]
    average: Option<f64>,
    /// Reviews received.
    #[schema(minimum = 0)]
    count: i64,
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
    fn view(&self, seller_id: Uuid) -> SellerStatsView {
        let average_fulfillment_seconds = (self.orders_delivered > 0)
            .then(|| (self.fulfillment_seconds_sum / self.orders_delivered as f64).max(0.0))
            .filter(|seconds| seconds.is_finite());
        let average_rating = (self.rating_count > 0)
            .then(|| (self.rating_sum as f64 / self.rating_count as f64).clamp(1.0, 5.0));
        SellerStatsView {
            seller_id,
            orders: OrderCounts {
                placed: self.orders_placed,
                confirmed: self.orders_confirmed,
                shipped: self.orders_shipped,
                delivered: self.orders_delivered,
                cancelled: self.orders_cancelled,
                returned: self.orders_returned,
            },
            // Of the orders confirmed, the share delivered.
            fulfillment_rate: rate(self.orders_delivered, self.orders_confirmed),
            // Of the orders delivered, the share returned.
            return_rate: rate(self.orders_returned, self.orders_delivered),
            average_fulfillment_seconds,
            rating: RatingView {
                average: average_rating,
                count: self.rating_count,
            },
        }
    }
}

/// A seller's statistics
///
/// A seller without orders has zero counts and null rates (never 404: the
/// read model cannot tell a seller without orders from any other user).
#[utoipa::path(
    get,
    path = "/sellers/{id}/stats",
    operation_id = "getSellerStats",
    tag = "sellers",
    params(("id" = Uuid, Path, description = "The seller (a user id). Anything but a UUID is 400 `invalid_id`."), After),
    responses((status = 200, description = "The read model's answer.", body = SellerStatsView)),
)]
pub(crate) async fn stats(
    State(state): State<AppState>,
    _user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<SellerStatsView>, ApiError> {
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
    Ok(Json(row.unwrap_or_default().view(id)))
}
