//! `/wallets/{id}` (balances) and `/wallets/{id}/entries` (the ledger,
//! newest first), from the "wallets" projection. Only the wallet's owner, an
//! admin or an auditor sees a wallet; others get 403, an unknown wallet 404.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use http_kit::ApiError;
use http_kit::AuthUser;
use http_kit::IdPath;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{db_error, list, not_found, sees_everything, time};
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::params::{CursorKind, QueryParams, page};

pub fn routes() -> axum::Router<AppState> {
    Router::new()
        .route("/wallets/{id}", get(wallet))
        .route("/wallets/{id}/entries", get(entries))
}

#[derive(Debug, sqlx::FromRow)]
struct WalletRow {
    wallet_id: Uuid,
    owner_id: Uuid,
    currency: String,
    available: i64,
    held: i64,
    pending_incoming: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl WalletRow {
    fn to_json(&self) -> Value {
        json!({
            "id": self.wallet_id,
            "owner_id": self.owner_id,
            "currency": self.currency,
            "available": self.available,
            "held": self.held,
            "pending_incoming": self.pending_incoming,
            "created_at": time(self.created_at),
            "updated_at": time(self.updated_at),
            "version": self.version,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
struct EntryRow {
    sequence: i64,
    kind: String,
    amount: i64,
    available: i64,
    held: i64,
    pending_incoming: i64,
    order_id: Option<Uuid>,
    reference: Option<String>,
    counterparty_wallet_id: Option<Uuid>,
    recorded_at: DateTime<Utc>,
}

impl EntryRow {
    fn to_json(&self) -> Value {
        json!({
            "sequence": self.sequence,
            "kind": self.kind,
            "amount": self.amount,
            "available": self.available,
            "held": self.held,
            "pending_incoming": self.pending_incoming,
            "order_id": self.order_id,
            "reference": self.reference,
            "counterparty_wallet_id": self.counterparty_wallet_id,
            "recorded_at": time(self.recorded_at),
        })
    }
}

/// The wallet, if the caller may see it.
async fn visible_wallet(
    state: &AppState,
    user: &AuthUser,
    id: Uuid,
) -> Result<WalletRow, ApiError> {
    let wallet: Option<WalletRow> = sqlx::query_as(
        "SELECT wallet_id, owner_id, currency, available, held, pending_incoming, created_at,
                updated_at, version
           FROM rm_wallets WHERE wallet_id = $1",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    let wallet = wallet.ok_or_else(|| not_found("wallet_not_found", "wallet not found"))?;
    if wallet.owner_id != user.user_id.as_uuid() && !sees_everything(user) {
        return Err(ApiError::forbidden(
            "only the wallet's owner, an admin or an auditor sees a wallet",
        ));
    }
    Ok(wallet)
}

async fn wallet(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<Value>, ApiError> {
    let params = query.accept(&["after"])?;
    let after = params.after()?;
    state
        .read_after_of(after, &[Projection::Wallets], id)
        .await?;
    Ok(Json(visible_wallet(&state, &user, id).await?.to_json()))
}

async fn entries(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<Value>, ApiError> {
    let params = query.accept(&["after", "limit", "cursor"])?;
    let after = params.after()?;
    let limit = params.limit()?;
    let before: Option<i64> = params.cursor(CursorKind::WalletEntries)?;
    state
        .read_after_of(after, &[Projection::Wallets], id)
        .await?;
    visible_wallet(&state, &user, id).await?;
    let rows: Vec<EntryRow> = sqlx::query_as(
        "SELECT sequence, kind, amount, available, held, pending_incoming, order_id, reference,
                counterparty_wallet_id, recorded_at
           FROM rm_wallet_entries
          WHERE wallet_id = $1 AND ($2::bigint IS NULL OR sequence < $2)
          ORDER BY sequence DESC
          LIMIT $3",
    )
    .bind(id)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    let (rows, next) = page(rows, limit, CursorKind::WalletEntries, |row| row.sequence);
    Ok(Json(list(
        rows.iter().map(EntryRow::to_json).collect(),
        next,
    )))
}
