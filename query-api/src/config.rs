//! Configuration from the environment, overridable by flags, with the
//! defaults of shared/BRIEF.md. The names shared with the command API (the
//! database, the token keys, the limits) mean the same there.

use std::net::SocketAddr;
use std::path::PathBuf;

use event_store::fanout::{DEFAULT_PARTITIONS, MAX_PARTITIONS};
use projections::search::SearchConfig;

/// The query API's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "query-api", about = "Souk's read API")]
pub struct Config {
    /// Postgres connection string (never logged).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/souk",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "QUERY_API_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: SocketAddr,

    /// PEM file of the RS256 public key that verifies bearer tokens.
    #[arg(
        long,
        env = "SOUK_JWT_PUBLIC_KEY",
        default_value = "./data/keys/jwt-public.pem"
    )]
    pub jwt_public_key: PathBuf,

    /// PEM file of the matching private key. When neither file exists, a dev
    /// key pair is generated at start (as the command API does).
    #[arg(
        long,
        env = "SOUK_JWT_PRIVATE_KEY",
        default_value = "./data/keys/jwt-private.pem"
    )]
    pub jwt_private_key: PathBuf,

    /// Required `iss` claim, when set.
    #[arg(long, env = "SOUK_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, when set.
    #[arg(long, env = "SOUK_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

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

    /// Largest request body accepted, in bytes (every route is a GET).
    #[arg(long, env = "SOUK_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Most Postgres connections of this process.
    #[arg(long, env = "SOUK_DB_MAX_CONNECTIONS", default_value_t = 32)]
    pub db_max_connections: u32,

    /// How long a request waits for a database connection before a 503.
    #[arg(long, env = "SOUK_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 3000)]
    pub db_acquire_timeout_ms: u64,

    /// Most requests handled at once; more are answered 503 at once.
    #[arg(long, env = "SOUK_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,

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

    /// Log as JSON lines instead of text.
    #[arg(long, env = "SOUK_LOG_JSON", default_value_t = false)]
    pub log_json: bool,

    /// The search index `/search` reads (the one the projector feeds).
    #[command(flatten)]
    pub search: SearchConfig,
}

impl Config {
    /// A configuration for tests: port 0, the given database and keys, NATS
    /// from `NATS_URL` (or the default), a stream name of the test's own.
    pub fn for_tests(database_url: &str, jwt_public_key: PathBuf) -> Self {
        Self {
            database_url: database_url.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            jwt_private_key: jwt_public_key.with_extension("private-unused"),
            jwt_public_key,
            jwt_issuer: None,
            jwt_audience: None,
            nats_url: std::env::var("NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned()),
            stream: format!("souk_test_{}", uuid::Uuid::new_v4().simple()),
            partitions: DEFAULT_PARTITIONS,
            max_body_bytes: 64 * 1024,
            db_max_connections: 16,
            db_acquire_timeout_ms: 2000,
            max_in_flight: 4096,
            catch_up_timeout_ms: 5000,
            catch_up_poll_ms: 10,
            max_notification_streams: 64,
            max_streams_per_user: 4,
            notification_buffer: 64,
            notification_keep_alive_s: 15,
            log_json: false,
            search: SearchConfig::embedded("./data/search"),
        }
    }
}
