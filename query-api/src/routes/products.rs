//! `/products/{id}/timeline`: the life story of one product, oldest entry
//! first, from the "timelines" projection, for any signed-in user.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use http_kit::openapi::{ErrorBody, Routes};
use http_kit::{ApiError, AuthUser, IdPath};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{db_error, not_found, page_items, time};
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::openapi::{After, TimelinePaging};
use crate::params::{CursorKind, QueryParams, page};

pub fn routes() -> Routes<AppState> {
    Routes::new().get("/products/{id}/timeline", timeline)
}

/// A page of a product's timeline, oldest entry first, with the product.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Timeline)]
pub(crate) struct TimelineView {
    /// The product.
    product_id: Uuid,
    /// Its current owner.
    owner_id: Uuid,
    /// Entries in the whole timeline.
    #[schema(minimum = 0)]
    entries: i64,
    /// Its last entry.
    #[serde(serialize_with = "time")]
    updated_at: DateTime<Utc>,
    #[schema(schema_with = page_items::<TimelineEntryView>)]
    items: Vec<TimelineEntryView>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// One entry of a product's timeline.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[schema(as = TimelineEntry)]
pub(crate) struct TimelineEntryView {
    /// The entry's sequence number.
    #[schema(minimum = 0)]
    sequence: i64,
    /// listed, price_changed, reserved, sold, shipped, delivered, returned,
    /// relisted, story, ownership_transferred, customization_*
    kind: String,
    /// The entry's details (JSON, by kind).
    data: Value,
    /// Who caused it.
    actor_id: Option<Uuid>,
    /// When it was recorded.
    #[serde(serialize_with = "time")]
    recorded_at: DateTime<Utc>,
}

#[derive(Debug, sqlx::FromRow)]
struct ProductRow {
    product_id: Uuid,
    owner_id: Uuid,
    entries: i64,
    updated_at: DateTime<Utc>,
}

/// A product's timeline, oldest entry first
///
/// The life story of one physical product across owners and relistings.
/// 404 `product_not_found`.
#[utoipa::path(
    get,
    path = "/products/{id}/timeline",
    operation_id = "getProductTimeline",
    tag = "products",
    params(("id" = Uuid, Path, description = "The product. Anything but a UUID is 400 `invalid_id`."), TimelinePaging, After),
    responses(
        (status = 200, description = "The read model's answer.", body = TimelineView),
        (status = 404, description = "Not in the read model (`product_not_found`; pass a write's position as `after`).", body = ErrorBody),
    ),
)]
pub(crate) async fn timeline(
    State(state): State<AppState>,
    _user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<TimelineView>, ApiError> {
    let params = query.accept(&["after", "limit", "cursor"])?;
    let after = params.after()?;
    let limit = params.limit()?;
    let since: Option<i64> = params.cursor(CursorKind::Timeline)?;
    state
        .read_after_of(after, &[Projection::Timelines], id)
        .await?;
    let product: Option<ProductRow> = sqlx::query_as(
        "SELECT product_id, owner_id, entries, updated_at FROM rm_products WHERE product_id = $1",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    let product = product.ok_or_else(|| not_found("product_not_found", "product not found"))?;
    let rows: Vec<TimelineEntryView> = sqlx::query_as(
        "SELECT sequence, kind, data, actor_id, recorded_at
           FROM rm_timeline
          WHERE product_id = $1 AND ($2::bigint IS NULL OR sequence > $2)
          ORDER BY sequence
          LIMIT $3",
    )
    .bind(id)
    .bind(since)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    let (rows, next) = page(rows, limit, CursorKind::Timeline, |row| row.sequence);
    Ok(Json(TimelineView {
        product_id: product.product_id,
        owner_id: product.owner_id,
        entries: product.entries,
        updated_at: product.updated_at,
        items: rows,
        next_cursor: next,
    }))
}
