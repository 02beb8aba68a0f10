//! Configuration from the environment, overridable by flags, with the
//! defaults of shared/BRIEF.md. The flags every HTTP service takes (the
//! database, the token keys, the limits) are `http_kit::ServerConfig`'s.

use std::net::SocketAddr;
use std::path::PathBuf;

use event_store::fanout::{DEFAULT_PARTITIONS, MAX_PARTITIONS};
use http_kit::ServerConfig;
use projections::search::SearchConfig;

/// The query API's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "query-api", about = "Souk's read API")]
pub struct Config {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "QUERY_API_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: SocketAddr,

    /// The database, token keys, limits and log format (shared by every
    /// HTTP service; every route is a GET, so the body limit only refuses
    /// a declared body).
    #[command(flatten)]
    pub server: ServerConfig,

    /// NATS server the notifications are read from (never logged: it may
    /// carry credentials).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,

    /// JetStream stream the relay publishes events to.
    #[arg(long, env = "SOUK_STREAM", default_value = "souk")]
    pub stream: String,

    /// Partitions of every projection; read-your-writes waits for all of
    /// them. Must match the projectors'.
    #[arg(
        long,
        env = "SOUK_PARTITIONS",
        default_value_t = DEFAULT_PARTITIONS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PARTITIONS))
    )]
    pub partitions: u32,

    /// Longest wait of a `?after=` request for the read models to catch up,
    /// in milliseconds; then it is answered 503 `not_caught_up`.
    #[arg(
        long,
        env = "SOUK_CATCH_UP_TIMEOUT_MS",
        default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(0..=60_000)
    )]
    pub catch_up_timeout_ms: u64,

    /// How often the checkpoints are read while requests wait, in
    /// milliseconds (one reader for all waiting requests).
    #[arg(
        long,
        env = "SOUK_CATCH_UP_POLL_MS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=1000)
    )]
    pub catch_up_poll_ms: u64,

    /// Most notification streams open at once, over all users.
    #[arg(long, env = "SOUK_MAX_NOTIFICATION_STREAMS", default_value_t = 1024)]
    pub max_notification_streams: usize,

    /// Most notification streams one user may hold open at once.
    #[arg(long, env = "SOUK_MAX_STREAMS_PER_USER", default_value_t = 8)]
    pub max_streams_per_user: usize,

    /// Notifications buffered per stream; a client that falls further behind
    /// is told so (`event: lagged`) and disconnected.
    #[arg(long, env = "SOUK_NOTIFICATION_BUFFER", default_value_t = 256)]
    pub notification_buffer: usize,

    /// Seconds between keep-alive comments on an idle notification stream.
    #[arg(long, env = "SOUK_NOTIFICATION_KEEP_ALIVE_S", default_value_t = 15)]
    pub notification_keep_alive_s: u64,

    /// The key notification tickets are signed with (never logged). Query
    /// API processes behind one address share it so that a ticket from one
    /// opens a stream on another; unset, each process signs with a random
    /// key of its own.
    #[arg(long, env = "SOUK_NOTIFICATION_TICKET_SECRET", hide_env_values = true)]
    pub notification_ticket_secret: Option<String>,

    /// The search index `/search` reads (the one the projector feeds).
    #[command(flatten)]
    pub search: SearchConfig,
}

impl Config {
    /// A configuration for tests: port 0, the given database and keys, NATS
    /// from `NATS_URL` (or the default), a stream name of the test's own.
    pub fn for_tests(database_url: &str, jwt_public_key: PathBuf) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            server: ServerConfig::for_tests(database_url, jwt_public_key),
            nats_url: std::env::var("NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned()),
            stream: format!("souk_test_{}", uuid::Uuid::new_v4().simple()),
            partitions: DEFAULT_PARTITIONS,
            catch_up_timeout_ms: 5000,
            catch_up_poll_ms: 10,
            max_notification_streams: 64,
            max_streams_per_user: 4,
            notification_buffer: 64,
            notification_keep_alive_s: 15,
            notification_ticket_secret: None,
            search: SearchConfig::embedded("./data/search"),
        }
    }
}
