//! `/notifications/stream`: server-sent events for the signed-in user (see
//! `crate::notifications` for what is sent and the limits).

use axum::extract::State;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use http_kit::openapi::Routes;
use http_kit::{ApiError, AuthUser};

use crate::app::AppState;
use crate::catch_up::Projection;
use crate::openapi::After;
use crate::params::QueryParams;

pub fn routes() -> Routes<AppState> {
    Routes::new().get("/notifications/stream", stream)
}

/// Server-sent events for the signed-in user
///
/// A `text/event-stream` that stays open. `event: ready` once notifications
/// flow (the stream reads new events only: after connecting, read the
/// current state from the other routes). Then `event: order_status`
/// (`data`: `{order_id, status, event_type, role, position, recorded_at}`)
/// for the user's orders as buyer or seller, and `event: funds_held` /
/// `event: funds_released` (`data`: `{wallet_id, order_id, amount, currency,
/// event_type, position, recorded_at}`) for the user's wallets; each event's
/// `id` is its position token. Comments keep the connection alive. A client
/// that falls behind gets `event: lagged` and the stream closes. Too many
/// open streams (in all, or for this user): 503. `after` waits for the
/// orders and wallets projections before the stream opens.
#[utoipa::path(
    get,
    path = "/notifications/stream",
    operation_id = "streamNotifications",
    tag = "notifications",
    params(After),
    responses((status = 200, description = "The event stream.", content_type = "text/event-stream", body = String)),
)]
pub(crate) async fn stream(
    State(state): State<AppState>,
    user: AuthUser,
    query: QueryParams,
) -> Result<Response, ApiError> {
    let params = query.accept(&["after"])?;
    let after = params.after()?;
    state
        .read_after(after, &[Projection::Orders, Projection::Wallets])
        .await?;
    let subscription = state.notifications.subscribe(user.user_id.as_uuid())?;
    let keep_alive = KeepAlive::new()
        .interval(state.notifications.keep_alive())
        .text("keep-alive");
    Ok(Sse::new(subscription.into_events())
        .keep_alive(keep_alive)
        .into_response())
}
