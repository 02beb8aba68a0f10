//! The read routes, one module per resource. Each handler reads its query
//! string strictly (`crate::params`), waits for `?after=` when given
//! (`AppState::read_after`), reads its read model, then decides whether the
//! caller may see what it read. Each row type becomes one response type
//! (`...View`, `serde::Serialize` and `utoipa::ToSchema`), so the OpenAPI
//! document (`crate::openapi`) is derived from what the handlers answer; each
//! handler's `#[utoipa::path]` says what it takes and can answer.

mod listings;
mod notifications;
mod orders;
mod products;
mod projections;
mod search;
mod sellers;
mod wallets;

pub(crate) use listings::{ListingPage, ListingView, Location, condition_schema, status_schema};
pub(crate) use notifications::TicketView;
pub(crate) use orders::{ORDER_ROLES, OrderPage, OrderView, Review};
pub(crate) use products::{TimelineEntryView, TimelineView};
pub(crate) use projections::{PartitionView, ProjectionView, ProjectionsView, RelayView};
pub(crate) use search::{Facets, SearchPage, search_error};
pub(crate) use sellers::{OrderCounts, RatingView, SellerStatsView};
pub(crate) use wallets::{WalletEntryPage, WalletEntryView, WalletView};

use chrono::{DateTime, Utc};
use domain::values::Role;
use http_kit::openapi::Routes;
use http_kit::{ApiError, AuthUser};
use serde::Serializer;
use utoipa::ToSchema;
use utoipa::openapi::schema::{Array, ArrayBuilder};
use utoipa::openapi::{Ref, RefOr};

use crate::app::AppState;
use crate::params::MAX_LIMIT;

/// The handlers' utoipa paths, for `crate::openapi`'s derive.
pub(crate) mod handlers {
    pub(crate) use super::listings::{__path_listing, __path_listings};
    pub(crate) use super::notifications::{__path_stream, __path_ticket};
    pub(crate) use super::orders::{__path_order, __path_orders};
    pub(crate) use super::products::__path_timeline;
    pub(crate) use super::projections::__path_projections;
    pub(crate) use super::search::__path_search;
    pub(crate) use super::sellers::__path_stats;
    pub(crate) use super::wallets::{__path_entries, __path_wallet};
}

pub fn routes() -> Routes<AppState> {
    Routes::new()
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

/// Serializes a time as RFC 3339 with microseconds, as Postgres stores them
/// (`#[serde(serialize_with = "time")]`).
pub(crate) fn time<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&time_text(*at))
}

/// A time as RFC 3339 with microseconds.
pub(crate) fn time_text(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// [`time`], or null.
pub(crate) fn optional_time<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => time(at, serializer),
        None => serializer.serialize_none(),
    }
}

/// The `items` of a page of `T`: at most [`MAX_LIMIT`] of them.
pub(crate) fn page_items<T: ToSchema>() -> Array {
    ArrayBuilder::new()
        .items(RefOr::Ref(Ref::from_schema_name(T::name())))
        .max_items(Some(MAX_LIMIT as usize))
        .build()
}
