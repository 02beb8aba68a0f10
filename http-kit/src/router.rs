//! What every Souk HTTP API wraps its routes in ([`finish_router`]), and the
//! service routes they share: the `/health` answer, and `/metrics` and
//! `/openapi.json` ([`service_routes`], documented by [`ServiceApi`]).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use identity::JwtVerifier;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::layers::RateLimit;
use crate::openapi::Routes;

/// JSON 404 and 405 answers, `ETag` and `Cache-Control` on reads, request
/// metrics, load shedding past `max_in_flight` requests (503 at once rather
/// than an unbounded queue), the rate limit per user when configured, gzip
/// for clients that accept it, CORS for the configured origins, a request id
/// set or kept and echoed (`x-request-id`) and carried on the request's span
/// (its path only: query strings, which may carry a notification ticket, are
/// never logged), and a JSON 500 for a handler that panics. `verifier`
/// tells the rate limiter who a request's user is.
pub fn finish_router(routes: Router, server: &ServerConfig, verifier: Arc<JwtVerifier>) -> Router {
    // The recorder is installed before the first request, not by the first
    // scrape of `/metrics`: what happens before it is counted too.
    crate::telemetry::metrics_handle();
    let request_id = HeaderName::from_static("x-request-id");
    let in_flight = Arc::new(Semaphore::new(server.max_in_flight));
    let mut routes = routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(crate::layers::cache))
        .layer(middleware::from_fn(crate::telemetry::track_http))
        .layer(middleware::from_fn_with_state(in_flight, shed_load));
    if let Some(per_second) = server.rate_limit {
        let burst = server.rate_burst.unwrap_or(per_second);
        let limit = RateLimit::new(per_second, burst, verifier);
        routes = routes.layer(middleware::from_fn_with_state(
            limit,
            crate::layers::rate_limit,
        ));
    }
    // Server-sent events and small answers are never compressed (the
    // default predicate).
    routes = routes.layer(CompressionLayer::new().gzip(true));
    if let Some(cors) = crate::layers::cors(&server.cors_origins) {
        routes = routes.layer(cors);
    }
    routes
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

/// `/metrics` and `/openapi.json`, which every Souk API serves without a
/// token; `document` is the API's own OpenAPI document, built once.
pub fn service_routes<S: Clone + Send + Sync + 'static>(
    document: fn() -> &'static serde_json::Value,
) -> Routes<S> {
    Routes::new()
        .get("/metrics", metrics)
        .get("/openapi.json", move || openapi(document))
}

/// The OpenAPI description of [`service_routes`], merged into each API's
/// document (its conventions add the refusals the layers can answer).
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(metrics, openapi))]
pub struct ServiceApi;

/// Prometheus metrics
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "service",
    security(()),
    responses(
        (status = 200, description = "The Prometheus text exposition format.", content_type = "text/plain", body = String),
    ),
)]
async fn metrics() -> Response {
    crate::telemetry::metrics().await
}

/// This document
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "service",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", body = serde_json::Value)),
)]
async fn openapi(document: fn() -> &'static serde_json::Value) -> Json<&'static serde_json::Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    /// Log lines written by the subscriber of one test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_request_log_never_holds_a_query_string() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);

        let mut server = ServerConfig::for_tests("postgres://unused", PathBuf::from("unused.pem"));
        // Every layer on, the rate limiter included.
        server.rate_limit = std::num::NonZeroU32::new(100);
        server.cors_origins = vec!["http://shop.test".to_owned()];
        let verifier = Arc::new(
            JwtVerifier::from_jwks(
                "/nonexistent/jwks.json",
                std::time::Duration::from_secs(5),
                None,
                None,
            )
            .unwrap(),
        );
        let routes = Router::new().route(
            "/notifications/stream",
            get(|| async { ApiError::Unauthorized("the ticket was used already".to_owned()) }),
        );
        let router = finish_router(routes, &server, verifier);
        let response = router
            .oneshot(
                Request::get("/notifications/stream?ticket=SECRET-TICKET-TEXT")
                    .header("origin", "http://shop.test")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("/notifications/stream"), "{logs}");
        assert!(logs.contains("request refused"), "{logs}");
        assert!(!logs.contains("SECRET-TICKET-TEXT"), "{logs}");
        assert!(!logs.contains("ticket="), "{logs}");
    }
}
