//! Configuration from the environment, overridable by flags, with the
//! defaults of shared/BRIEF.md. The flags every HTTP service takes are
//! `http_kit::ServerConfig`'s.

use std::net::SocketAddr;
use std::path::PathBuf;

use http_kit::ServerConfig;

/// The command API's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "command-api", about = "Souk's write API")]
pub struct Config {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "COMMAND_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// The database, token keys, limits and log format (shared by every
    /// HTTP service).
    #[command(flatten)]
    pub server: ServerConfig,

    /// How often the timer worker looks for due timers, in milliseconds.
    #[arg(long, env = "SOUK_TIMER_POLL_MS", default_value_t = 1000)]
    pub timer_poll_ms: u64,

    /// NATS server the relay publishes committed events to, or a
    /// comma-separated list of a cluster's servers (it may carry
    /// credentials: never logged).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,

    /// JetStream stream of the events (subjects `<stream>.events.>`).
    #[arg(long, env = "SOUK_STREAM", default_value = "souk")]
    pub stream: String,

    /// How many servers keep a copy of the stream when the relay creates it
    /// (an existing stream with another count is reported, not changed).
    #[arg(
        long,
        env = "SOUK_STREAM_REPLICAS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=event_store::nats::MAX_REPLICAS as i64)
    )]
    pub stream_replicas: u8,

    /// Subject partitions: an aggregate's events go to `hash(id) mod N`.
    #[arg(
        long,
        env = "SOUK_PARTITIONS",
        default_value_t = event_store::fanout::DEFAULT_PARTITIONS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(event_store::fanout::MAX_PARTITIONS))
    )]
    pub partitions: u32,

    /// Run the relay in this process (`false` when it runs elsewhere). Only
    /// one relay per stream publishes at a time, whichever runs it.
    #[arg(
        long,
        env = "SOUK_RELAY",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub relay: bool,

    /// How often the relay polls when no commit notification wakes it, in
    /// milliseconds.
    #[arg(long, env = "SOUK_RELAY_POLL_MS", default_value_t = 500)]
    pub relay_poll_ms: u64,

    /// Most events the relay publishes per batch (one checkpoint each).
    #[arg(
        long,
        env = "SOUK_RELAY_BATCH",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..=event_store::relay::MAX_BATCH as i64)
    )]
    pub relay_batch_max: u32,
}

impl Config {
    /// A configuration for tests: port 0, the given database and keys, and
    /// a JetStream stream of its own on `NATS_URL` (or the local server).
    pub fn for_tests(database_url: &str, jwt_public_key: PathBuf) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            server: ServerConfig::for_tests(database_url, jwt_public_key),
            timer_poll_ms: 200,
            nats_url: std::env::var("NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned()),
            // A stream of its own: tests share the NATS server.
            stream: format!("souk_test_{}", uuid::Uuid::now_v7().simple()),
            stream_replicas: 1,
            partitions: event_store::fanout::DEFAULT_PARTITIONS,
            relay: true,
            relay_poll_ms: 100,
            relay_batch_max: 1000,
        }
    }
}
