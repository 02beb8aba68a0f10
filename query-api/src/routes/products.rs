//! `/products/{id}/timeline`: the life story of one product, oldest entry
//! first, from the "timelines" projection, for any signed-in user.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use http_kit::ApiError;
use http_kit::AuthUser;
use http_kit::IdPath;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{db_error, not_found, time};
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::params::{CursorKind, QueryParams, page};

pub fn routes() -> axum::Router<AppState> {
    Router::new().route("/products/{id}/timeline", get(timeline))
}

#[derive(Debug, sqlx::FromRow)]
struct ProductRow {
    product_id: Uuid,
    owner_id: Uuid,
    entries: i64,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, sqlx::FromRow)]
struct EntryRow {
    sequence: i64,
    kind: String,
    data: Value,
    actor_id: Option<Uuid>,
    recorded_at: DateTime<Utc>,
}

impl EntryRow {
    fn to_json(&self) -> Value {
        json!({
            "sequence": self.sequence,
            "kind": self.kind,
            "data": self.data,
            "actor_id": self.actor_id,
            "recorded_at": time(self.recorded_at),
        })
    }
}

async fn timeline(
    State(state): State<AppState>,
    _user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<Value>, ApiError> {
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
    let rows: Vec<EntryRow> = sqlx::query_as(
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
    Ok(Json(json!({
        "product_id": product.product_id,
        "owner_id": product.owner_id,
        "entries": product.entries,
        "updated_at": time(product.updated_at),
        "items": rows.iter().map(EntryRow::to_json).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}
