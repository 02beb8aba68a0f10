//! What every Souk HTTP API wraps its routes in ([`finish_router`]), and the
//! service routes they share (`/health`).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::ApiError;

/// JSON 404 and 405 answers, request metrics, load shedding past
/// `max_in_flight` requests (503 at once rather than an unbounded queue), a
/// request id set or kept and echoed (`x-request-id`) and carried on the
/// request's span, and a JSON 500 for a handler that panics.
pub fn finish_router(routes: Router, max_in_flight: usize) -> Router {
    // The recorder is installed before the first request, not by the first
    // scrape of `/metrics`: what happens before it is counted too.
    crate::telemetry::metrics_handle();
    let request_id = HeaderName::from_static("x-request-id");
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(crate::telemetry::track_http))
        .layer(middleware::from_fn_with_state(in_flight, shed_load))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let request_id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("");
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path(),
                    request_id,
                )
            }),
        )
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
            },
        ))
}

/// Answers 503 at once when too many requests are in flight.
async fn shed_load(
    State(in_flight): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    match in_flight.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            metrics::counter!("souk_http_shed_total").increment(1);
            ApiError::Unavailable.into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(serde_json::json!({"error": {"code": "method_not_allowed", "message": "this route does not take that method"}})),
    )
        .into_response()
}

/// `/health`: 200 `{"status": "ok", "database": "up", ...}` while Postgres
/// answers and the service says it is `ready` (e.g. its migrations are
/// applied), else 503 `{"status": "degraded", ...}`, with the service's own
/// `extra` fields after those two.
pub async fn health(
    pool: &PgPool,
    ready: bool,
    extra: &[(&'static str, serde_json::Value)],
) -> Response {
    let database = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(pool)
        .await
        .is_ok();
    let up = database && ready;
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::Map::new();
    body.insert(
        "status".to_owned(),
        (if up { "ok" } else { "degraded" }).into(),
    );
    body.insert(
        "database".to_owned(),
        (if database { "up" } else { "down" }).into(),
    );
    for (name, value) in extra {
        body.insert((*name).to_owned(), value.clone());
    }
    (status, Json(serde_json::Value::Object(body))).into_response()
}
