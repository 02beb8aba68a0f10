//! The `projector` binary: configuration in, projector out, run until
//! SIGTERM or Ctrl-C. `/health` and `/metrics` are served on
//! `SOUK_PROJECTOR_METRICS_ADDR` when it is set (off by default, so that
//! several projector processes can share a machine); `/health` answers 503
//! while Postgres or NATS is away, which the projector waits for.

use clap::Parser;

/// mimalloc instead of glibc's malloc, whose bookkeeping (`_int_malloc`,
/// `malloc_consolidate`, ...) took about a sixth of the service's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = projections::ProjectorConfig::parse();
    http_kit::telemetry::init_tracing(config.log_json);
    let readiness = projections::Readiness::channel();
    if let Some(addr) = config.metrics_addr {
        let watched = readiness.subscribe();
        http_kit::telemetry::serve_metrics(addr, move || {
            let readiness = watched.borrow();
            (readiness.ready(), readiness.json())
        })
        .await?;
    }
    let projector = tokio::select! {
        built = projections::build_watched(config, readiness) => built?,
        () = http_kit::shutdown_signal() => return Ok(()),
    };
    projector.run_until(http_kit::shutdown_signal()).await
}
