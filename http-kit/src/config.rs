//! The flags every Souk HTTP service takes (environment variables,
//! overridable by flags, with the defaults of shared/BRIEF.md), flattened
//! into each service's own configuration.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use event_store::PoolConfig;
use identity::JwtVerifier;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The longest pause between two attempts to reach Postgres at start.
const MIGRATE_RETRY_MAX: Duration = Duration::from_secs(5);
/// A dependency still away is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The database, the token keys, the limits and the log format.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// Postgres connection string (never logged).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/souk",
        hide_env_values = true
    )]
    pub database_url: String,

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

    /// The identity provider's JWKS (an `http(s)://` URL or a file path):
    /// when set, tokens are verified with the key their `kid` names, and the
    /// PEM key files are not used.
    #[arg(long, env = "SOUK_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// Shortest pause between two fetches of the JWKS that tokens with an
    /// unknown `kid` trigger, in milliseconds.
    #[arg(long, env = "SOUK_JWT_JWKS_MIN_REFETCH_MS", default_value_t = 5000)]
    pub jwt_jwks_min_refetch_ms: u64,

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

    /// Log as JSON lines instead of text.
    #[arg(long, env = "SOUK_LOG_JSON", default_value_t = false)]
    pub log_json: bool,

    /// Origins whose pages may call this API (CORS), comma-separated exact
    /// origins such as `https://shop.example`; none by default.
    #[arg(
        long,
        env = "SOUK_CORS_ORIGINS",
        value_delimiter = ',',
        value_parser = crate::layers::parse_origin
    )]
    pub cors_origins: Vec<String>,

    /// Requests per second each user (or, without a token, each client
    /// address) may make on average; unset: no limit.
    #[arg(long, env = "SOUK_RATE_LIMIT")]
    pub rate_limit: Option<NonZeroU32>,

    /// Requests a client may make at once before the rate applies; the rate
    /// itself when unset.
    #[arg(long, env = "SOUK_RATE_BURST")]
    pub rate_burst: Option<NonZeroU32>,
}

impl ServerConfig {
    /// A configuration for tests: the given database and public key (no
    /// private key: nothing is generated), smaller pools.
    pub fn for_tests(database_url: &str, jwt_public_key: PathBuf) -> Self {
        Self {
            database_url: database_url.to_owned(),
            jwt_private_key: jwt_public_key.with_extension("private-unused"),
            jwt_public_key,
            jwt_jwks_url: None,
            jwt_jwks_min_refetch_ms: 5000,
            jwt_issuer: None,
            jwt_audience: None,
            max_body_bytes: 64 * 1024,
            db_max_connections: 16,
            db_acquire_timeout_ms: 2000,
            max_in_flight: 4096,
            log_json: false,
            cors_origins: Vec::new(),
            rate_limit: None,
            rate_burst: None,
        }
    }

    /// A lazily connecting pool on the database, and whether the pending
    /// migrations are applied (`true` once they are). While Postgres is
    /// unreachable the service starts anyway (its `/health` answers 503) and
    /// applies them in the background as soon as it answers; a migration
    /// the database refuses is an error at once.
    pub async fn connect(&self) -> anyhow::Result<(PgPool, watch::Receiver<bool>)> {
        let pool = self.pool()?;
        let (applied, migrated) = watch::channel(false);
        match event_store::migrate(&pool).await {
            Ok(()) => {
                applied.send_replace(true);
            }
            Err(error) if event_store::migration_unreachable(&error) => {
                tracing::warn!(
                    %error,
                    "Postgres is unreachable; not ready until it answers and the migrations are applied"
                );
                tokio::spawn(migrate_in_background(pool.clone(), applied));
            }
            Err(error) => return Err(error).context("applying database migrations"),
        }
        Ok((pool, migrated))
    }

    /// A lazily connecting pool on the database, without migrations: for a
    /// service that never writes (the query API, which may run on a hot
    /// standby).
    pub fn pool(&self) -> anyhow::Result<PgPool> {
        event_store::pool(
            &self.database_url,
            &PoolConfig {
                max_connections: self.db_max_connections,
                acquire_timeout: Duration::from_millis(self.db_acquire_timeout_ms),
            },
        )
        .context("parsing DATABASE_URL")
    }

    /// The token verifier: over the JWKS when one is configured, else over
    /// the PEM public key (a dev key pair is generated when neither key file
    /// exists).
    pub fn verifier(&self) -> anyhow::Result<JwtVerifier> {
        if let Some(jwks) = &self.jwt_jwks_url {
            return JwtVerifier::from_jwks(
                jwks,
                Duration::from_millis(self.jwt_jwks_min_refetch_ms),
                self.jwt_issuer.clone(),
                self.jwt_audience.clone(),
            )
            .context("configuring the JWKS");
        }
        identity::load_verifier(
            &self.jwt_public_key,
            &self.jwt_private_key,
            self.jwt_issuer.clone(),
            self.jwt_audience.clone(),
        )
    }
}

/// Applies the migrations once Postgres answers, then says so on `applied`.
async fn migrate_in_background(pool: PgPool, applied: watch::Sender<bool>) {
    let mut warned_at = Instant::now();
    let waited = event_store::migrate_when_reachable(&pool, MIGRATE_RETRY_MAX, |error| {
        if warned_at.elapsed() >= WARN_EVERY {
            warned_at = Instant::now();
            tracing::warn!(%error, "Postgres is still unreachable; retrying");
        }
    })
    .await;
    match waited {
        Ok(()) => {
            tracing::info!("Postgres answers; migrations applied, ready");
            applied.send_replace(true);
        }
        Err(error) => {
            tracing::error!(%error, "the database refused the migrations; staying not ready");
        }
    }
}

/// Binds the listener of a service; port 0 picks a free port, returned.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(TcpListener, u16)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let port = listener
        .local_addr()
        .context("reading the bound port")?
        .port();
    Ok((listener, port))
}
