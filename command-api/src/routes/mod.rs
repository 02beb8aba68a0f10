//! The command routes. Each handler parses its body into domain values
//! (every field checked, with the field's name in the error) and either
//! hands one domain command to the event store (`single`, for one
//! aggregate) or runs one journey of `domain::journeys` as a unit of work
//! (checkout, shipping, delivery, cancellation, hold release, ...).

mod listings;
mod orders;
mod products;
mod wallets;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use domain::Decide;
use domain::values::{Currency, Money, ValidationError};
use event_store::{Accepted, ExecError, Reply};
use http_kit::openapi::Routes;
use http_kit::{ApiError, AuthUser, RequestMeta};
use serde::Deserialize;
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use crate::app::AppState;

pub(crate) use listings::MAX_STOCK;

/// The OpenAPI description of the command routes (`crate::openapi`
/// completes it into the served document).
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    let mut document = wallets::Api::openapi();
    document.merge(listings::Api::openapi());
    document.merge(orders::Api::openapi());
    document.merge(products::Api::openapi());
    document
}

pub fn routes() -> Routes<AppState> {
    Routes::new()
        .merge(wallets::routes())
        .merge(listings::routes())
        .merge(orders::routes())
        .merge(products::routes())
}

/// The hash of an empty body, for routes that take none.
pub(crate) const EMPTY_BODY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Money as clients send it: `{"amount": 1999, "currency": "EUR"}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Money)]
pub(crate) struct MoneyBody {
    #[schema(schema_with = crate::openapi::amount)]
    pub amount: i64,
    #[schema(schema_with = http_kit::openapi::currency)]
    pub currency: String,
}

impl MoneyBody {
    pub fn parse(&self, field: &str) -> Result<Money, ApiError> {
        let currency = Currency::parse(&self.currency)
            .map_err(|e| ApiError::validation(format!("{field}.currency"), e))?;
        Money::positive(self.amount, currency)
            .map_err(|e| ApiError::validation(format!("{field}.amount"), e))
    }
}

/// Names the field a validation error is about.
pub(crate) fn field<T>(name: &str, result: Result<T, ValidationError>) -> Result<T, ApiError> {
    result.map_err(|error| ApiError::validation(name, error))
}

pub(crate) fn exec_error(error: ExecError) -> ApiError {
    match error {
        ExecError::Rejected {
            code,
            refusal,
            message,
        } => ApiError::Domain {
            code,
            refusal,
            message,
        },
        ExecError::Conflict(_) => ApiError::Conflict,
        ExecError::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
        ExecError::Overloaded | ExecError::Unavailable(_) => ApiError::Unavailable,
        ExecError::Internal(message) => ApiError::Internal(anyhow::anyhow!(message)),
    }
}

/// The HTTP response of an accepted (or replayed) command.
pub(crate) fn respond(accepted: Accepted) -> Response {
    let status = StatusCode::from_u16(accepted.status).unwrap_or(StatusCode::OK);
    let mut response = (status, Json(accepted.body)).into_response();
    if accepted.replayed {
        response.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    response
}

/// Executes one command on one aggregate.
pub(crate) async fn single<A: Decide>(
    state: &AppState,
    user: &AuthUser,
    meta: &RequestMeta,
    body_sha256: &[u8; 32],
    aggregate_id: Uuid,
    command: A::Command,
    reply: Reply,
) -> Result<Response, ApiError> {
    let accepted = state
        .store
        .execute::<A>(
            &aggregate_id.to_string(),
            command,
            meta.context(user),
            meta.idempotency(user, body_sha256),
            reply,
        )
        .await
        .map_err(exec_error)?;
    Ok(respond(accepted))
}

pub(crate) fn ok_reply(id: Uuid) -> Reply {
    Reply::new(200, id.to_string())
}

pub(crate) fn created_reply(id: Uuid) -> Reply {
    Reply::new(201, id.to_string())
}

/// Refuses a list longer than `max` before any element is looked at.
pub(crate) fn bounded<T>(name: &str, list: &[T], max: usize) -> Result<(), ApiError> {
    if list.len() > max {
        return Err(ApiError::validation(
            name,
            ValidationError::new("too_many", format!("{name} takes at most {max} items")),
        ));
    }
    Ok(())
}
