//! Wallet routes: open, deposit (the payment provider, as admin), withdraw.

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use domain::values::{Currency, Reference, WalletId};
use domain::wallet::{Wallet, WalletCommand};
use http_kit::{ApiError, AuthUser, IdPath, JsonBody, RequestMeta};
use serde::Deserialize;

use super::{MoneyBody, created_reply, field, ok_reply, single};
use crate::app::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/wallets", post(open))
        .route("/wallets/{id}/deposits", post(deposit))
        .route("/wallets/{id}/withdrawals", post(withdraw))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenWallet {
    currency: String,
}

async fn open(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    body: JsonBody<OpenWallet>,
) -> Result<Response, ApiError> {
    let currency = field("currency", Currency::parse(&body.value.currency))?;
    let wallet_id = WalletId::new();
    let command = WalletCommand::Open {
        actor: user.actor(),
        wallet_id,
        currency,
    };
    // With an Idempotency-Key, a retry must land on the same wallet: the
    // stored response (with the first id) is returned before this id is used.
    single::<Wallet>(
        &state,
        &user,
        &meta,
        &body.sha256,
        wallet_id.as_uuid(),
        command,
        created_reply(wallet_id.as_uuid()),
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Movement {
    amount: MoneyBody,
    reference: String,
}

async fn deposit(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<Movement>,
) -> Result<Response, ApiError> {
    let amount = body.value.amount.parse("amount")?;
    let reference = field(
        "reference",
        Reference::parse("reference", &body.value.reference),
    )?;
    let command = WalletCommand::Deposit {
        actor: user.actor(),
        amount,
        reference,
    };
    single::<Wallet>(
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

async fn withdraw(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<Movement>,
) -> Result<Response, ApiError> {
    let amount = body.value.amount.parse("amount")?;
    let reference = field(
        "reference",
        Reference::parse("reference", &body.value.reference),
    )?;
    let command = WalletCommand::Withdraw {
        actor: user.actor(),
        amount,
        reference,
    };
    single::<Wallet>(
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
