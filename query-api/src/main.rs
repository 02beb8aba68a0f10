//! The `query-api` binary: configuration in, app out.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = query_api::Config::parse();
    http_kit::telemetry::init_tracing(config.server.log_json);
    let app = query_api::build(config).await?;
    app.run_until_stopped().await
}
