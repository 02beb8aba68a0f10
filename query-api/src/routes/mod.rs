//! The read routes, one module per resource. Each handler reads its query
//! string strictly (`crate::params`), waits for `?after=` when given
//! (`AppState::read_after`), reads its read model, then decides whether the
//! caller may see what it read. Rows become JSON in one `to_json` per row
//! type, which `crate::openapi` describes field by field.

mod listings;
mod notifications;
mod orders;
mod products;
mod projections;
mod search;
mod sellers;
mod wallets;

pub(crate) use listings::{CONDITIONS, STATUSES};
pub(crate) use projections::LAG_EVENTS_CAP;
pub(crate) use search::search_error;

use axum::Router;
use chrono::{DateTime, Utc};
use domain::values::Role;
use http_kit::ApiError;
use http_kit::AuthUser;
use serde_json::{Value, json};

use crate::app::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(wallets::routes())
        .merge(listings::routes())
        .merge(search::routes())
        .merge(orders::routes())
        .merge(products::routes())
        .merge(sellers::routes())
        .merge(projections::routes())
        .merge(notifications::routes())
}

/// A database failure: 503 when the database cannot be reached (or no
/// connection is free in time), else a 500 logged in full.
pub(crate) fn db_error(error: sqlx::Error) -> ApiError {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => {
            tracing::warn!(%error, "database unavailable");
            ApiError::Unavailable
        }
        error => ApiError::Internal(anyhow::Error::new(error).context("reading a read model")),
    }
}

/// Roles that read everything (an auditor only reads, which is all this API
/// does).
pub(crate) fn sees_everything(user: &AuthUser) -> bool {
    matches!(user.role, Role::Admin | Role::Auditor)
}

/// A 404 with the code of the missing resource (`wallet_not_found`, ...).
pub(crate) fn not_found(code: &'static str, message: &str) -> ApiError {
    ApiError::Domain {
        code,
        refusal: domain::Refusal::NotFound,
        message: message.to_owned(),
    }
}

/// An RFC 3339 timestamp with microseconds, as Postgres stores them.
pub(crate) fn time(at: DateTime<Utc>) -> Value {
    Value::String(at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

pub(crate) fn optional_time(at: Option<DateTime<Utc>>) -> Value {
    at.map_or(Value::Null, time)
}

pub(crate) fn money(amount: i64, currency: &str) -> Value {
    json!({"amount": amount, "currency": currency})
}

/// A page of a list: `{"items": [...], "next_cursor": "..." | null}`.
pub(crate) fn list(items: Vec<Value>, next_cursor: Option<String>) -> Value {
    json!({"items": items, "next_cursor": next_cursor})
}
