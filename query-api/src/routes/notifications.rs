//! `/notifications/stream`: server-sent events for the signed-in user (see
//! `crate::notifications` for what is sent and the limits).

use axum::Router;
use axum::extract::State;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_kit::ApiError;
use http_kit::AuthUser;

use crate::app::AppState;
use crate::catch_up::Projection;
use crate::params::QueryParams;

pub fn routes() -> axum::Router<AppState> {
    Router::new().route("/notifications/stream", get(stream))
}

async fn stream(
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
