//! The `query-api` binary: configuration in, app out.

use clap::Parser;

/// mimalloc instead of glibc's malloc, whose bookkeeping (`_int_malloc`,
/// `malloc_consolidate`, ...) took about a sixth of the service's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = query_api::Config::parse();
    http_kit::telemetry::init_tracing(config.server.log_json);
    let app = query_api::build(config).await?;
    app.run_until_stopped().await
}
