//! Building and running the query API: `build(config)` prepares its pool
//! (never migrating: see [`build`]), binds the listener and assembles the router; `App::run_until_stopped`
//! serves until SIGTERM or Ctrl-C, ends the notification streams and drains
//! in-flight requests. The layers are `http_kit::finish_router`'s (request
//! ids, metrics, load shedding, catch-panic, JSON 404 and 405) and a limit on
//! the declared body.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{FromRef, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http_kit::ApiError;
use http_kit::openapi::Routes;
use identity::JwtVerifier;
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::catch_up::{CatchUp, Projection, Scope};
use crate::config::Config;
use crate::notifications::Notifications;
use projections::search::SearchIndex;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub verifier: Arc<JwtVerifier>,
    pub catch_up: CatchUp,
    pub notifications: Notifications,
    /// The JetStream stream whose relay checkpoint `/projections` shows.
    pub stream: String,
    /// The search index of `/search`; `None` when search is off.
    pub search: Option<Arc<dyn SearchIndex>>,
    /// The single-use tickets of `/notifications/stream`.
    pub tickets: crate::tickets::Tickets,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl FromRef<AppState> for Arc<JwtVerifier> {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

impl AppState {
    /// Waits for every partition of `projections` to include `after`, when
    /// the request names a position (see `catch_up`): for reads that span
    /// aggregates.
    pub async fn read_after(
        &self,
        after: Option<event_store::Position>,
        projections: &[Projection],
    ) -> Result<(), ApiError> {
        match after {
            Some(position) => self.catch_up.wait(projections, Scope::All, position).await,
            None => Ok(()),
        }
    }

    /// Waits for the partition of `aggregate_id` in `projections` to include
    /// `after`: for reads of rows that only that aggregate's events write
    /// (see [`Scope::Partition`]).
    pub async fn read_after_of(
        &self,
        after: Option<event_store::Position>,
        projections: &[Projection],
        aggregate_id: Uuid,
    ) -> Result<(), ApiError> {
        match after {
            Some(position) => {
                let partition = event_store::fanout::partition_of(
                    &aggregate_id.to_string(),
                    self.catch_up.partitions(),
                );
                self.catch_up
                    .wait(projections, Scope::Partition(partition), position)
                    .await
            }
            None => Ok(()),
        }
    }
}

/// A built query API, bound to its port, not yet serving.
pub struct App {
    listener: TcpListener,
    router: Router,
    port: u16,
    state: AppState,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("port", &self.port).finish()
    }
}

/// Prepares a (lazy) Postgres pool, loads the token key and binds the
/// listener; it neither migrates nor writes. NATS is connected to when the app runs, in the background:
/// reads do not need it.
pub async fn build(config: Config) -> anyhow::Result<App> {
    event_store::nats::server_addrs(&config.nats_url)?;
    // The query API never writes, so it may run on a hot standby: the
    // writers (command-api, projector, replay-tool) apply the migrations.
    let pool = config.server.pool()?;
    let verifier = config.server.verifier()?;

    let search = config
        .search
        .open_reader()
        .context("configuring the search index")?;
    let state = AppState {
        search,
        catch_up: CatchUp::new(
            pool.clone(),
            config.partitions,
            Duration::from_millis(config.catch_up_timeout_ms),
            Duration::from_millis(config.catch_up_poll_ms),
        ),
        notifications: Notifications::new(
            pool.clone(),
            crate::notifications::NotificationConfig::from(&config),
        ),
        pool,
        verifier: Arc::new(verifier),
        stream: config.stream.clone(),
        tickets: crate::tickets::Tickets::new(config.notification_ticket_secret.as_deref()),
    };
    let router = router(state.clone(), &config);
    let (listener, port) = http_kit::bind(config.addr).await?;
    Ok(App {
        listener,
        router,
        port,
        state,
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
        self.run_until(http_kit::shutdown_signal()).await
    }

    /// Serves until `signal` completes, then ends the notification streams
    /// and finishes in-flight requests.
    pub async fn run_until(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "query-api listening");
        let poller = tokio::spawn(self.state.catch_up.clone().run());
        let consumer = tokio::spawn(self.state.notifications.clone().run());
        let notifications = self.state.notifications.clone();
        let served = axum::serve(
            self.listener,
            // The client's address keys the rate limit of unauthenticated requests.
            self.router
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            signal.await;
            // Streams never end on their own; graceful shutdown waits
            // for every open response.
            notifications.stop();
        })
        .await
        .context("serving HTTP");
        poller.abort();
        consumer.abort();
        tracing::info!("query-api stopped");
        served
    }
}

/// Every route this API serves: the service routes and the reads.
pub(crate) fn routes() -> Routes<AppState> {
    Routes::new()
        .get("/health", health)
        .merge(http_kit::router::service_routes(
            crate::openapi::document_json,
        ))
        .merge(crate::routes::routes())
}

fn router(state: AppState, config: &Config) -> Router {
    let verifier = state.verifier.clone();
    let max_body_bytes = config.server.max_body_bytes;
    let routes = routes()
        .into_router()
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            limit_body(max_body_bytes, request, next)
        }))
        .with_state(state);
    http_kit::finish_router(routes, &config.server, verifier)
}

/// Every route is a GET and reads no body; a declared body larger than the
/// limit is refused before any work, as the command API refuses it.
async fn limit_body(max_body_bytes: usize, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max_body_bytes as u64) {
        return ApiError::PayloadTooLarge(max_body_bytes).into_response();
    }
    next.run(request).await
}

/// Whether the API and its database are up
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "service",
    security(()),
    responses(
        (status = 200, description = "Up, database reachable.", body = crate::openapi::Health),
        (status = 503, description = "The database is unreachable (a `Health` body), or the API is shedding load (an `Error` body).",
            body = crate::openapi::HealthOrError,
            headers(("Retry-After" = i32, description = "Seconds to wait before retrying."))),
    ),
)]
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    let notifications = if state.notifications.is_live() {
        "live"
    } else {
        "connecting"
    };
    http_kit::router::health(
        &state.pool,
        true,
        &[("notifications", notifications.into())],
    )
    .await
}
