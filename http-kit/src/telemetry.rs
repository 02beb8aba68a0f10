//! Logs and metrics. Logs are `tracing` events with structured fields; the
//! request id of each request is on its span. Metrics are the process-wide
//! Prometheus recorder ([`metrics_handle`]), rendered as text at `/metrics`.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the global tracing subscriber (once; later calls do nothing).
/// `RUST_LOG` filters, `info` by default.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second init (several apps in one test process) is not an error.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full("souk_relay_batch_events".to_owned()),
                        &[
                            1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
                        ],
                    )
                })
                .map(|builder| builder.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder is installed (then we still
            // render ours, just without the global counters).
            let _ = metrics::set_global_recorder(recorder);
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The recorder keeps every histogram sample until it is folded into its
/// buckets, which only a render (a scrape of `/metrics`) or an upkeep does:
/// without one, a process nobody scrapes grows by every sample it records
/// (several per request), and the first scrape then folds them all at once
/// on an async worker. A thread of its own folds them every
/// [`UPKEEP_EVERY`], off the async workers.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the metrics upkeep thread");
    }
}

/// `/metrics`: the Prometheus text of this process's metrics.
pub async fn metrics() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics_handle().render(),
    )
        .into_response()
}

/// Counts requests and measures their latency by route and status.
pub async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let elapsed = started.elapsed().as_secs_f64();
    metrics::counter!("souk_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("souk_http_request_duration_seconds", "route" => route, "method" => method)
        .record(elapsed);
    response
}

/// Serves `/metrics` and `/health` on `addr` in the background, for a
/// process that has no API of its own (the projector). `health` says whether
/// the process is ready (200, else 503) and what to show. Returns the bound
/// address.
pub async fn serve_metrics(
    addr: SocketAddr,
    health: impl Fn() -> (bool, serde_json::Value) + Clone + Send + Sync + 'static,
) -> anyhow::Result<SocketAddr> {
    metrics_handle();
    let app = Router::new().route("/metrics", get(metrics)).route(
        "/health",
        get(move || {
            let (ready, body) = health();
            let status = if ready {
                axum::http::StatusCode::OK
            } else {
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            };
            std::future::ready((status, axum::Json(body)).into_response())
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener
        .local_addr()
        .context("reading the metrics address")?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics server stopped");
        }
    });
    tracing::info!(%bound, "serving metrics");
    Ok(bound)
}
