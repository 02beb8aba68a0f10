//! Wallet routes: open, deposit (the payment provider, as admin), withdraw.

use axum::extract::State;
use axum::response::Response;
use domain::values::{Currency, Reference, WalletId};
use domain::wallet::{Wallet, WalletCommand};
use http_kit::openapi::Routes;
use http_kit::openapi::{AcceptedBody, FieldDocs, text};
use http_kit::{ApiError, AuthUser, IdPath, JsonBody, RequestMeta};
use serde::Deserialize;
use utoipa::{OpenApi, ToSchema};

use super::{MoneyBody, created_reply, field, ok_reply, single};
use crate::app::AppState;
use crate::openapi::ACCEPTED;

const WALLET_ID: &str = "The wallet. Anything but a UUID is 400 `invalid_id`.";

/// The OpenAPI description of these routes.
#[derive(OpenApi)]
#[openapi(paths(open, deposit, withdraw), modifiers(&FIELDS))]
pub(super) struct Api;

/// What the fields of these request bodies mean, where a function gives
/// the field's schema (utoipa drops those fields' doc comments).
const FIELDS: FieldDocs = FieldDocs(&[
    ("OpenWallet", "currency", "The wallet's currency, for good."),
    (
        "Movement",
        "reference",
        "The payment provider's or bank's reference.",
    ),
]);

pub fn routes() -> Routes<AppState> {
    Routes::new()
        .post("/wallets", open)
        .post("/wallets/{id}/deposits", deposit)
        .post("/wallets/{id}/withdrawals", withdraw)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenWallet {
    #[schema(schema_with = http_kit::openapi::currency)]
    currency: String,
}

/// Open a wallet
///
/// Opens a wallet owned by the caller in one currency. 201 with the new
/// wallet's id.
#[utoipa::path(post, path = "/wallets", operation_id = "openWallet", tag = "wallets",
    request_body = OpenWallet,
    responses((status = 201, description = ACCEPTED, body = AcceptedBody)))]
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Movement {
    /// How much.
    amount: MoneyBody,
    #[schema(schema_with = text::<Reference>)]
    reference: String,
}

/// Deposit into a wallet
///
/// Credits the available balance (the payment provider, as an admin).
#[utoipa::path(post, path = "/wallets/{id}/deposits", operation_id = "deposit", tag = "wallets",
    params(("id" = Uuid, Path, description = WALLET_ID)),
    request_body = Movement,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
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

/// Withdraw from a wallet
///
/// Debits the available balance (the owner); held and pending funds cannot
/// be withdrawn.
#[utoipa::path(post, path = "/wallets/{id}/withdrawals", operation_id = "withdraw", tag = "wallets",
    params(("id" = Uuid, Path, description = WALLET_ID)),
    request_body = Movement,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
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
