//! `/notifications/stream`: server-sent events for the signed-in user (see
//! `crate::notifications` for what is sent and the limits), and
//! `/notifications/tickets`, the single-use tickets a browser opens it with
//! (see `crate::tickets`).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use http_kit::openapi::{ErrorBody, Routes};
use http_kit::{ApiError, AuthUser};
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::catch_up::Projection;
use crate::notifications::Resume;
use crate::openapi::{After, StreamParams};
use crate::params::{QueryParams, parse_position};

pub fn routes() -> Routes<AppState> {
    Routes::new()
        .get("/notifications/stream", stream)
        .post("/notifications/tickets", ticket)
}

/// Longest `Last-Event-ID` read.
const MAX_LAST_EVENT_ID_LEN: usize = 64;

/// A ticket that opens one notification stream.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TicketView {
    /// Pass it as `ticket` to `/notifications/stream`, once, before
    /// `expires_at`. Never log it.
    #[schema(max_length = 145)]
    pub ticket: String,
    /// When it stops opening a stream (at most 60 s from now).
    #[serde(serialize_with = "super::time")]
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// A single-use ticket for the signed-in user's notification stream
///
/// For clients that cannot send an `Authorization` header with the stream's
/// request (a browser's `EventSource`): `GET
/// /notifications/stream?ticket=...` then opens this user's stream without
/// one. The ticket is valid once, for at most 60 seconds.
#[utoipa::path(
    post,
    path = "/notifications/tickets",
    operation_id = "createNotificationTicket",
    tag = "notifications",
    params(After),
    responses((status = 201, description = "A ticket.", body = TicketView)),
)]
pub(crate) async fn ticket(
    State(state): State<AppState>,
    user: AuthUser,
    query: QueryParams,
) -> Result<Response, ApiError> {
    query.accept(&["after"])?.after()?;
    let ticket = state.tickets.issue(user.user_id.as_uuid())?;
    let view = TicketView {
        ticket: ticket.ticket,
        expires_at: ticket.expires_at,
    };
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Server-sent events for the signed-in user
///
/// A `text/event-stream` that stays open, opened with a bearer token or,
/// without one, with a `ticket` from `POST /notifications/tickets` (single
/// use: a used, expired or forged one is 401). `event: ready` once
/// notifications flow. Then `event: order_status` (`data`: `{order_id,
/// status, event_type, role, position, recorded_at}`) for the user's orders
/// as buyer or seller, and `event: funds_held` / `event: funds_released`
/// (`data`: `{wallet_id, order_id, amount, currency, event_type, position,
/// recorded_at}`) for the user's wallets; each event's `id` is its position
/// token. A client that reconnects with the last `id` it saw (the
/// `Last-Event-ID` header, or `last_event_id` for clients that cannot set
/// it) first gets, in order and once each, the user's notifications after
/// it from the last 24 hours; when they cannot be replayed (older, too
/// many, or an unknown id) it gets `event: reset` instead and must read the
/// current state again. A malformed one is 400 `invalid_last_event_id`.
/// Comments keep the connection alive. A client that falls behind gets
/// `event: lagged` and the stream closes. Too many open streams (in all, or
/// for this user): 503. `after` waits for the orders and wallets
/// projections before the stream opens.
#[utoipa::path(
    get,
    path = "/notifications/stream",
    operation_id = "streamNotifications",
    tag = "notifications",
    params(StreamParams),
    security((), ("bearerAuth" = [])),
    responses(
        (status = 200, description = "The event stream.", content_type = "text/event-stream", body = String),
        (status = 400, description = "A malformed `Last-Event-ID` (`invalid_last_event_id`), or a query parameter the route does not take (`invalid_query`) or a bad `after` (`invalid_position`).", body = ErrorBody),
        (status = 401, description = "No bearer token and no ticket, or a token or ticket that does not verify, was used already or has expired (`unauthorized`).", body = ErrorBody),
    ),
)]
pub(crate) async fn stream(
    State(state): State<AppState>,
    user: Result<AuthUser, ApiError>,
    headers: HeaderMap,
    query: QueryParams,
) -> Result<Response, ApiError> {
    let params = query.accept(&["after", "ticket", "last_event_id"])?;
    let after = params.after()?;
    let last_event_id = last_event_id(&headers, params.get("last_event_id"))?;
    // A ticket opens the stream without a token; with a token and no ticket
    // the token decides.
    let user = match params.get("ticket") {
        Some(ticket) => state.tickets.redeem(ticket)?,
        None => user?.user_id.as_uuid(),
    };
    state
        .read_after(after, &[Projection::Orders, Projection::Wallets])
        .await?;
    let subscription = state.notifications.subscribe(user)?;
    let keep_alive = KeepAlive::new()
        .interval(state.notifications.keep_alive())
        .text("keep-alive");
    let resume = last_event_id.map(|after| Resume { user, after });
    Ok(
        Sse::new(subscription.into_events(state.notifications.clone(), resume))
            .keep_alive(keep_alive)
            .into_response(),
    )
}

/// The position a reconnecting client saw last: the `Last-Event-ID` header,
/// else the `last_event_id` parameter. Empty means none (what a browser
/// sends when no event had an id).
fn last_event_id(
    headers: &HeaderMap,
    parameter: Option<&str>,
) -> Result<Option<event_store::Position>, ApiError> {
    let refuse = || ApiError::BadRequest {
        code: "invalid_last_event_id",
        message: "Last-Event-ID must be the id of an event of this stream (a position token)"
            .to_owned(),
    };
    let mut values = headers.get_all("last-event-id").iter();
    let text = match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().map_err(|_| refuse())?,
        (Some(_), Some(_)) => return Err(refuse()),
        (None, _) => match parameter {
            Some(text) => text,
            None => return Ok(None),
        },
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > MAX_LAST_EVENT_ID_LEN {
        return Err(refuse());
    }
    parse_position(text).map(Some).map_err(|_| refuse())
}
