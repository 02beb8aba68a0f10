//! The `projector` binary: configuration in, projector out, run until
//! SIGTERM or Ctrl-C.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = projections::ProjectorConfig::parse();
    projections::telemetry::init_tracing(config.log_json);
    if let Some(addr) = config.metrics_addr {
        projections::telemetry::serve_metrics(addr).await?;
    }
    let projector = projections::build(config).await?;
    projector.run_until_stopped().await
}
