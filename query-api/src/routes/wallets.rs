//! `/wallets/{id}` (balances) and `/wallets/{id}/entries` (the ledger,
//! newest first), from the "wallets" projection. Only the wallet's owner, an
//! admin or an auditor sees a wallet; others get 403, an unknown wallet 404.
//!
//! `pending_incoming` is derived: the open escrows (`rm_escrows`) naming the
//! wallet as payee. Buyers' wallets write those rows, in any partition, so
//! `?after=` on `/wallets/{id}` waits for every partition of the projection.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use http_kit::openapi::{ErrorBody, Routes};
use http_kit::{ApiError, AuthUser, IdPath};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{db_error, not_found, page_items, sees_everything, time};
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::openapi::{After, WalletEntryPaging};
use crate::params::{CursorKind, QueryParams, page};

pub fn routes() -> Routes<AppState> {
    Routes::new()
        .get("/wallets/{id}", wallet)
        .get("/wallets/{id}/entries", entries)
}

/// A wallet's balances, in minor units of its currency.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[schema(as = Wallet)]
pub(crate) struct WalletView {
    /// The wallet.
    id: Uuid,
    /// Its owner.
    owner_id: Uuid,
    #[schema(schema_with = http_kit::openapi::currency)]
    currency: String,
    /// Spendable and withdrawable, in minor units.
    available: i64,
    /// Escrow locked for the owner's orders.
    held: i64,
    /// Escrow the owner will receive when orders are delivered: the open
    /// escrow holds of buyers naming this wallet as payee. Not withdrawable
    /// until captured into `available`.
    pending_incoming: i64,
    /// When it was opened.
    #[serde(serialize_with = "time")]
    created_at: DateTime<Utc>,
    /// Its last event.
    #[serde(serialize_with = "time")]
    updated_at: DateTime<Utc>,
    /// Its number of events.
    #[schema(minimum = 0)]
    version: i64,
}

/// One entry of a wallet's ledger: a wallet event with the balances after it.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[schema(as = WalletEntry)]
pub(crate) struct WalletEntryView {
    /// The wallet event's sequence number.
    #[schema(minimum = 0)]
    sequence: i64,
    /// The event type (FundsDeposited, FundsHeld, ...).
    kind: String,
    /// The amount moved, in minor units.
    amount: i64,
    /// Available after the event.
    available: i64,
    /// Held after the event.
    held: i64,
    /// The wallet's own expected escrow after the event: moved only by
    /// events of checkouts recorded before pending funds were derived (the
    /// wallet's `pending_incoming` is the open escrows naming it).
    pending_incoming: i64,
    /// The order it is for, if any.
    order_id: Option<Uuid>,
    /// A deposit's or withdrawal's reference.
    reference: Option<String>,
    /// The other wallet of an escrow movement.
    counterparty_wallet_id: Option<Uuid>,
    /// When the event was recorded.
    #[serde(serialize_with = "time")]
    recorded_at: DateTime<Utc>,
}

/// A page of a wallet's ledger, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WalletEntryPage {
    #[schema(schema_with = page_items::<WalletEntryView>)]
    items: Vec<WalletEntryView>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// The wallet, if the caller may see it.
async fn visible_wallet(
    state: &AppState,
    user: &AuthUser,
    id: Uuid,
) -> Result<WalletView, ApiError> {
    let wallet: Option<WalletView> = sqlx::query_as(
        "SELECT wallet_id AS id, owner_id, currency, available, held,
                (SELECT coalesce(sum(amount), 0)::bigint FROM rm_escrows
                  WHERE payee_wallet_id = w.wallet_id AND status = 'open') AS pending_incoming,
                created_at, updated_at, version
           FROM rm_wallets w WHERE wallet_id = $1",
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

/// A wallet's balances
///
/// Available, held (escrow locked for the owner's orders) and pending
/// incoming (escrow the owner will receive), in minor units of the wallet's
/// currency. The owner, admins and auditors only (403 for others); 404
/// `wallet_not_found`.
#[utoipa::path(
    get,
    path = "/wallets/{id}",
    operation_id = "getWallet",
    tag = "wallets",
    params(("id" = Uuid, Path, description = "The wallet. Anything but a UUID is 400 `invalid_id`."), After),
    responses(
        (status = 200, description = "The read model's answer.", body = WalletView),
        (status = 403, description = "The caller may not see this wallet (`forbidden`).", body = ErrorBody),
        (status = 404, description = "Not in the read model (`wallet_not_found`; pass a write's position as `after`).", body = ErrorBody),
    ),
)]
pub(crate) async fn wallet(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<WalletView>, ApiError> {
    let params = query.accept(&["after"])?;
    let after = params.after()?;
    // Every partition: the pending funds come from the buyers' wallets.
    state.read_after(after, &[Projection::Wallets]).await?;
    Ok(Json(visible_wallet(&state, &user, id).await?))
}

/// A wallet's ledger, newest first
///
/// One entry per wallet event with the balances after it. Same access as
/// the wallet.
#[utoipa::path(
    get,
    path = "/wallets/{id}/entries",
    operation_id = "getWalletEntries",
    tag = "wallets",
    params(("id" = Uuid, Path, description = "The wallet. Anything but a UUID is 400 `invalid_id`."), WalletEntryPaging, After),
    responses(
        (status = 200, description = "The read model's answer.", body = WalletEntryPage),
        (status = 403, description = "The caller may not see this wallet (`forbidden`).", body = ErrorBody),
        (status = 404, description = "Not in the read model (`wallet_not_found`).", body = ErrorBody),
    ),
)]
pub(crate) async fn entries(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    query: QueryParams,
) -> Result<Json<WalletEntryPage>, ApiError> {
    let params = query.accept(&["after", "limit", "cursor"])?;
    let after = params.after()?;
    let limit = params.limit()?;
    let before: Option<i64> = params.cursor(CursorKind::WalletEntries)?;
    state
        .read_after_of(after, &[Projection::Wallets], id)
        .await?;
    visible_wallet(&state, &user, id).await?;
    let rows: Vec<WalletEntryView> = sqlx::query_as(
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
    Ok(Json(WalletEntryPage {
        items: rows,
        next_cursor: next,
    }))
}
