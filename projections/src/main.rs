//! The `projector` binary: configuration in, projector out, run until
//! SIGTERM or Ctrl-C. `/health` and `/metrics` are served on
//! `SOUK_PROJECTOR_METRICS_ADDR` when it is set (off by default, so that
//! several projector processes can share a machine).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = projections::ProjectorConfig::parse();
    http_kit::telemetry::init_tracing(config.log_json);
    if let Some(addr) = config.metrics_addr {
        http_kit::telemetry::serve_metrics(addr).await?;
    }
    let projector = projections::build(config).await?;
    projector.run_until(http_kit::shutdown_signal()).await
}
