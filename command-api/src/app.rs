//! Building and running the command API: `build(config)` connects, migrates,
//! binds the listener and assembles the router; `App::run_until_stopped`
//! serves until SIGTERM or Ctrl-C and drains in-flight requests.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, FromRef, Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use event_store::relay::{Relay, RelayConfig};
use event_store::{EventStore, PoolConfig, StoreConfig};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth::JwtVerifier;
use crate::config::Config;
use crate::error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: EventStore,
    pub verifier: Arc<JwtVerifier>,
    pub metrics: PrometheusHandle,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl FromRef<AppState> for Arc<JwtVerifier> {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

static BODY_LIMIT: OnceLock<usize> = OnceLock::new();

/// The configured body limit (for error messages).
pub(crate) fn body_limit() -> usize {
    BODY_LIMIT.get().copied().unwrap_or(64 * 1024)
}

/// A built command API, bound to its port, not yet serving.
pub struct App {
    listener: TcpListener,
    router: Router,
    port: u16,
    state: AppState,
    timer_poll: Duration,
    /// The relay this process runs, if it runs one.
    relay: Option<RelayConfig>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("port", &self.port).finish()
    }
}

/// Connects to Postgres, applies migrations, loads the token key and binds
/// the listener.
pub async fn build(config: Config) -> anyhow::Result<App> {
    let pool = event_store::pool(
        &config.database_url,
        &PoolConfig {
            max_connections: config.db_max_connections,
            acquire_timeout: Duration::from_millis(config.db_acquire_timeout_ms),
        },
    )
    .context("parsing DATABASE_URL")?;
    event_store::migrate(&pool)
        .await
        .context("applying database migrations")?;

    if !config.jwt_public_key.exists() && !config.jwt_private_key.exists() {
        crate::auth::ensure_dev_key_pair(&config.jwt_private_key, &config.jwt_public_key)
            .context("generating a dev key pair")?;
        tracing::warn!(
            public_key = %config.jwt_public_key.display(),
            "no token key configured: generated a dev key pair"
        );
    }
    let verifier = JwtVerifier::from_public_pem_file(
        &config.jwt_public_key,
        config.jwt_issuer.clone(),
        config.jwt_audience.clone(),
    )
    .context("loading the token public key")?;

    let relay = if config.relay {
        event_store::relay::validate_stream_name(&config.stream).context("SOUK_STREAM")?;
        let mut relay = RelayConfig::new(&config.nats_url, &config.stream);
        relay.partitions = config.partitions;
        relay.batch_max = config.relay_batch_max as usize;
        relay.poll_interval = Duration::from_millis(config.relay_poll_ms);
        Some(relay)
    } else {
        None
    };

    let _ = BODY_LIMIT.set(config.max_body_bytes);
    let state = AppState {
        store: EventStore::new(pool, StoreConfig::default()),
        verifier: Arc::new(verifier),
        metrics: crate::telemetry::metrics_handle(),
    };
    let router = router(state.clone(), &config);
    let listener = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    let port = listener
        .local_addr()
        .context("reading the bound port")?
        .port();
    Ok(App {
        listener,
        router,
        port,
        state,
        timer_poll: Duration::from_millis(config.timer_poll_ms.max(10)),
        relay,
    })
}

impl App {
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until SIGTERM or Ctrl-C, then finishes in-flight requests.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `signal` completes, then finishes in-flight requests.
    pub async fn run_until(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "command-api listening");
        let timers = tokio::spawn(crate::timers::run(
            self.state.store.clone(),
            self.timer_poll,
        ));
        // The relay runs beside the API: no command waits on it or on NATS.
        // Dropping `stop_relay` (this future dropped) stops it too.
        let relay = self.relay.map(|config| {
            let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
            let store = &self.state.store;
            let relay = Relay::new(store.pool().clone(), config).woken_by(store.commit_signal());
            let running = tokio::spawn(relay.run_until(async move {
                let _ = relay_stopped.await;
            }));
            (stop_relay, running)
        });
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(signal)
            .await
            .context("serving HTTP");
        timers.abort();
        if let Some((stop_relay, mut running)) = relay {
            let _ = stop_relay.send(());
            if tokio::time::timeout(Duration::from_secs(5), &mut running)
                .await
                .is_err()
            {
                running.abort();
            }
        }
        tracing::info!("command-api stopped");
        served
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}

fn router(state: AppState, config: &Config) -> Router {
    let routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .merge(crate::routes::routes())
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state);
    finish_router(routes, config.max_in_flight)
}

/// What every Souk HTTP API wraps its routes in: JSON 404 and 405 answers,
/// request metrics, load shedding past `max_in_flight` requests (503 at
/// once rather than an unbounded queue), a request id set or kept and echoed
/// (`x-request-id`) and carried on the request's span, and a JSON 500 for a
/// handler that panics.
pub fn finish_router(routes: Router, max_in_flight: usize) -> Router {
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

async fn health(State(state): State<AppState>) -> Response {
    let database = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(state.store.pool())
        .await
        .is_ok();
    let status = if database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "status": if database { "ok" } else { "degraded" },
            "database": if database { "up" } else { "down" },
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
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
