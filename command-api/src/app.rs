//! Building and running the command API: `build(config)` connects, migrates,
//! binds the listener and assembles the router; `App::run_until_stopped`
//! serves until SIGTERM or Ctrl-C and drains in-flight requests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{FromRef, State};
use axum::response::Response;
use domain::journeys::Deadlines;
use event_store::relay::{Relay, RelayConfig, RelayStatus, Role};
use event_store::{EventStore, StoreConfig};
use http_kit::openapi::Routes;
use identity::JwtVerifier;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: EventStore,
    pub verifier: Arc<JwtVerifier>,
    /// The clocks of an order (escrow release, return window, ...).
    pub deadlines: Deadlines,
    /// The state of this process's relay, when it runs one (for `/health`).
    pub relay: Option<watch::Receiver<RelayStatus>>,
    /// Whether the migrations are applied: not ready before.
    pub migrated: watch::Receiver<bool>,
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

/// A built command API, bound to its port, not yet serving.
pub struct App {
    listener: TcpListener,
    router: Router,
    port: u16,
    state: AppState,
    timer_poll: Duration,
    /// The relay this process runs, if it runs one.
    relay: Option<Relay>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("port", &self.port).finish()
    }
}

/// Connects to Postgres, applies migrations, loads the token key and binds
/// the listener.
pub async fn build(config: Config) -> anyhow::Result<App> {
    let (pool, migrated) = config.server.connect().await?;
    let verifier = config.server.verifier()?;

    let relay = if config.relay {
        event_store::relay::validate_stream_name(&config.stream).context("SOUK_STREAM")?;
        event_store::nats::server_addrs(&config.nats_url)?;
        let mut relay = RelayConfig::new(&config.nats_url, &config.stream);
        relay.replicas = usize::from(config.stream_replicas);
        relay.partitions = config.partitions;
        relay.batch_max = config.relay_batch_max as usize;
        relay.poll_interval = Duration::from_millis(config.relay_poll_ms);
        Some(relay)
    } else {
        None
    };

    let store = EventStore::new(
        pool,
        StoreConfig {
            writers: usize::from(config.store_writers),
            ..StoreConfig::default()
        },
    );
    let relay = relay
        .map(|config| Relay::new(store.pool().clone(), config).woken_by(store.commit_signal()));
    let state = AppState {
        store,
        verifier: Arc::new(verifier),
        deadlines: config.deadlines(),
        relay: relay.as_ref().map(Relay::status),
        migrated,
    };
    let router = router(state.clone(), &config);
    let (listener, port) = http_kit::bind(config.addr).await?;
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
        self.run_until(http_kit::shutdown_signal()).await
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
        let relay = self.relay.map(|relay| {
            let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
            let running = tokio::spawn(relay.run_until(async move {
                let _ = relay_stopped.await;
            }));
            (stop_relay, running)
        });
        let served = axum::serve(
            self.listener,
            // The client's address keys the rate limit of unauthenticated requests.
            self.router
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
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

/// Every route the command API serves, listed so that a test can hold them
/// against the OpenAPI document.
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
    let routes = routes()
        .into_router()
        .layer(http_kit::extract::body_limit(config.server.max_body_bytes))
        .with_state(state);
    http_kit::finish_router(routes, &config.server, verifier)
}

/// The database's state, and the relay's when this process runs one: its
/// role, whether it reaches NATS, and a stream whose replica count differs
/// from `SOUK_STREAM_REPLICAS`. Commands need neither NATS nor the relay, so
/// only the database (reachable, migrated) decides the status.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "service",
    security(()),
    responses(
        (status = 200, description = "Up, database reachable.", body = crate::openapi::Health),
        (status = 503, description = "The database is unreachable (a `Health` body), or the API is shedding load (an `Error` body).",
            body = http_kit::openapi::HealthOrError,
            headers(("Retry-After" = i32, description = "Seconds to wait before retrying."))),
    ),
)]
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    let migrated = *state.migrated.borrow();
    let mut extra = vec![(
        "migrations",
        serde_json::Value::from(if migrated { "applied" } else { "pending" }),
    )];
    if let Some(status) = &state.relay {
        extra.push(("relay", relay_health(&status.borrow())));
    }
    http_kit::router::health(state.store.pool(), migrated, &extra).await
}

fn relay_health(status: &RelayStatus) -> serde_json::Value {
    let role = match status.role {
        Role::Starting => "starting",
        Role::Standby => "standby",
        Role::Leader => "leader",
        Role::Stopped => "stopped",
    };
    let mut relay = serde_json::json!({"role": role});
    if status.role == Role::Leader {
        relay["nats"] = (if status.nats_connected {
            "connected"
        } else {
            "unreachable"
        })
        .into();
    }
    if let Some(refused) = &status.refused {
        relay["refused"] = refused.to_string().into();
    }
    if let Some(mismatch) = status.replicas_mismatch {
        relay["stream_replicas"] = serde_json::json!({
            "actual": mismatch.actual,
            "configured": mismatch.configured,
            "message": mismatch.to_string(),
        });
    }
    relay
}
