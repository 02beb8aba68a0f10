//! Configuration from the environment, overridable by flags, with the
//! defaults of shared/BRIEF.md.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The command API's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "command-api", about = "Souk's write API")]
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
    #[arg(long, env = "COMMAND_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// PEM file of the RS256 public key that verifies bearer tokens.
    #[arg(
        long,
        env = "SOUK_JWT_PUBLIC_KEY",
        default_value = "./data/keys/jwt-public.pem"
    )]
    pub jwt_public_key: PathBuf,

    /// PEM file of the matching private key. When neither file exists, a dev
    /// key pair is generated at start.
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

    /// Largest request body accepted, in bytes.
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

    /// How often the timer worker looks for due timers, in milliseconds.
    #[arg(long, env = "SOUK_TIMER_POLL_MS", default_value_t = 1000)]
    pub timer_poll_ms: u64,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "SOUK_LOG_JSON", default_value_t = false)]
    pub log_json: bool,

    /// NATS server the relay publishes committed events to (it may carry
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
            database_url: database_url.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            jwt_private_key: jwt_public_key.with_extension("private-unused"),
            jwt_public_key,
            jwt_issuer: None,
            jwt_audience: None,
            max_body_bytes: 64 * 1024,
            db_max_connections: 16,
            db_acquire_timeout_ms: 2000,
            max_in_flight: 4096,
            timer_poll_ms: 200,
            log_json: false,
            nats_url: std::env::var("NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned()),
            // A stream of its own: tests share the NATS server.
            stream: format!("souk_test_{}", uuid::Uuid::now_v7().simple()),
            partitions: event_store::fanout::DEFAULT_PARTITIONS,
            relay: true,
            relay_poll_ms: 100,
            relay_batch_max: 1000,
        }
    }
}
