//! Building and running the command API: `build(config)` connects, migrates,
//! binds the listener and assembles the router; `App::run_until_stopped`
//! serves until SIGTERM or Ctrl-C and drains in-flight requests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{FromRef, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use event_store::relay::{Relay, RelayConfig};
use event_store::{EventStore, StoreConfig};
use identity::JwtVerifier;
use tokio::net::TcpListener;

use crate::config::Config;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: EventStore,
    pub verifier: Arc<JwtVerifier>,
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
    let pool = config.server.connect().await?;
    let verifier = config.server.verifier()?;

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

    let state = AppState {
        store: EventStore::new(pool, StoreConfig::default()),
        verifier: Arc::new(verifier),
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
        let relay = self.relay.map(|config| {
            let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
            let store = &self.state.store;
            let relay = Relay::new(store.pool().clone(), config).woken_by(store.commit_signal());
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

fn router(state: AppState, config: &Config) -> Router {
    let verifier = state.verifier.clone();
    let routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(http_kit::telemetry::metrics))
        .route("/openapi.json", get(openapi))
        .merge(crate::routes::routes())
        .layer(http_kit::extract::body_limit(config.server.max_body_bytes))
        .with_state(state);
    http_kit::finish_router(routes, &config.server, verifier)
}

async fn health(State(state): State<AppState>) -> Response {
    http_kit::router::health(state.store.pool(), &[]).await
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}
