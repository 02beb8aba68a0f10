//! Souk's Postgres event store.
//!
//! - `store`: command execution. Per-aggregate lanes serialize and batch
//!   commands in this process, cache aggregate states, and commit events,
//!   idempotency records and snapshots in one transaction, with optimistic
//!   concurrency checked by the primary key.
//! - `load`: an aggregate's state from its snapshot and later events.
//! - `record`: metadata, positions (and their tokens) and the hash chain.
//! - `global`: the global order, read without ever skipping a late commit.
//! - `verify`: recomputes the hash chains, checks them against the stream
//!   heads and replays the business invariants (tamper evidence);
//!   `anchor`: a running digest over the global order that an auditor keeps.
//! - `cqrs`: the adapter that runs the domain's aggregates on plain cqrs-es.
//! - `fanout`: subjects and partitions of the events published to JetStream.
//! - `relay`: publishes committed events to JetStream in global order (one
//!   leader per stream through an advisory lock; checkpoint after the acks).
//! - `binding`: a stream belongs to one database and one partition count;
//!   the relay and the projectors refuse another.
//! - `nats`: the server list of `NATS_URL` (a cluster's servers, comma
//!   separated) and the stream's replica count.
//! - `backoff`: the delays between retries every retry loop uses.
//! - `leader`: session advisory locks, the single-writer points' election
//!   (the relay, projector partitions, the search indexer).
//! - `signal`: wake-ups after a commit (in process, or a `NOTIFY` sent
//!   outside the writing transaction).
//!
//! The table layout is postgres-es's plus Souk's columns (see
//! `migrations/sql`), so cqrs-es tooling can still read it; the write path is
//! Souk's own because postgres-es cannot put an idempotency record in the
//! transaction of the events, batch a hot aggregate, or keep a hash chain.

pub mod anchor;
pub mod backoff;
pub mod binding;
pub mod cqrs;
pub mod fanout;
pub mod global;
mod group_commit;
pub mod journey;
pub mod leader;
mod load;
pub mod nats;
pub mod record;
pub mod relay;
pub mod signal;
pub mod store;
pub mod verify;

pub use record::{CommandContext, Position};
pub use store::{
    Accepted, Committed, EventStore, ExecError, IdempotencyKey, Plan, Reply, StoreConfig,
    StreamRef, Timer, accepted_body,
};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// Connection pool limits. Every pool is bounded, and so is every wait on it.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_connections: u32,
    /// How long a request waits for a connection before it is answered 503.
    pub acquire_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 32,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// The connection options of `database_url`, as every Souk process connects.
///
/// Postgres's and sqlx's default `sslmode` is `prefer`, and sqlx is built with
/// TLS here (postgres-es asks for it), so a connection to a server on the same
/// host would encrypt every byte it sends, to nobody: whoever can read
/// loopback traffic is root on that host already, and every connection paid
/// for it at both ends (OpenSSL in Postgres, ring in the client, seen in
/// profiles of the write path and of verify's COPY reads). So a loopback host (`localhost`,
/// `127.0.0.0/8`, `::1`) or a Unix socket connects without TLS, unless
/// `sslmode` is set in the URL or in `PGSSLMODE`: an explicit choice is
/// always kept, and any other host keeps `prefer` (or what was asked).
pub fn connect_options(database_url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let options = PgConnectOptions::from_str(database_url)?;
    let explicit = std::env::var_os("PGSSLMODE").is_some() || url_sets_ssl_mode(database_url);
    if !explicit && is_loopback(&options) {
        return Ok(options.ssl_mode(sqlx::postgres::PgSslMode::Disable));
    }
    Ok(options)
}

/// Whether the URL's query names an SSL mode (`sslmode`, or sqlx's
/// `ssl-mode`).
fn url_sets_ssl_mode(database_url: &str) -> bool {
    database_url.split_once('?').is_some_and(|(_, query)| {
        query.split('&').any(|pair| {
            let key = pair.split_once('=').map_or(pair, |(key, _)| key);
            key.eq_ignore_ascii_case("sslmode") || key.eq_ignore_ascii_case("ssl-mode")
        })
    })
}

/// Whether the options reach a server on this host: a Unix socket or a
/// loopback address.
fn is_loopback(options: &PgConnectOptions) -> bool {
    if options.get_socket().is_some() {
        return true;
    }
    let host = options.get_host();
    if host.starts_with('/') || host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|address| address.is_loopback())
}

/// A lazily connecting pool: the process starts (and answers 503) even when
/// the database is down, and reconnects on its own when it returns.
pub fn pool(database_url: &str, config: &PoolConfig) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(database_url)?.application_name("souk");
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(0)
        .acquire_timeout(config.acquire_timeout)
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrations::MIGRATOR.run(pool).await
}

/// Whether `error` says the database is away (unreachable, starting up,
/// shutting down, out of connections) rather than refusing what was asked:
/// the caller waits and tries again instead of giving up.
pub fn is_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        // Class 08 (connection exception), 57P01-03 (shutting down, starting
        // up), 53300 (too many connections).
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }),
        _ => false,
    }
}

/// Whether a migration failed because the database is away (see
/// [`is_unreachable`]).
pub fn migration_unreachable(error: &sqlx::migrate::MigrateError) -> bool {
    matches!(error, sqlx::migrate::MigrateError::Execute(error) if is_unreachable(error))
}

/// Applies every pending migration, waiting for the database while it is
/// away: tries again after each [`backoff::Backoff`] delay (at most
/// `backoff_max`), calling `waiting` with each failure. A migration the
/// database refuses is returned at once.
pub async fn migrate_when_reachable(
    pool: &PgPool,
    backoff_max: Duration,
    mut waiting: impl FnMut(&sqlx::migrate::MigrateError),
) -> Result<(), sqlx::migrate::MigrateError> {
    let mut backoff = backoff::Backoff::new(backoff_max);
    loop {
        match migrate(pool).await {
            Ok(()) => return Ok(()),
            Err(error) if migration_unreachable(&error) => {
                waiting(&error);
                backoff.wait().await;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgSslMode;

    fn loopback(url: &str) -> bool {
        is_loopback(&PgConnectOptions::from_str(url).expect("a valid URL"))
    }

    #[test]
    fn loopback_hosts_and_sockets_are_told_from_other_hosts() {
        assert!(loopback("postgres://postgres@127.0.0.1:5432/souk"));
        assert!(loopback("postgres://postgres@127.0.0.2/souk"));
        assert!(loopback("postgres://postgres@localhost/souk"));
        assert!(loopback("postgres://postgres@[::1]:5432/souk"));
        assert!(loopback("postgres:///souk?host=/var/run/postgresql"));
        assert!(!loopback("postgres://postgres@10.0.0.7:5432/souk"));
        assert!(!loopback("postgres://postgres@db.example.org/souk"));
    }

    #[test]
    fn an_ssl_mode_in_the_url_is_explicit_in_either_spelling() {
        assert!(url_sets_ssl_mode("postgres://h/db?sslmode=require"));
        assert!(url_sets_ssl_mode(
            "postgres://h/db?application_name=x&ssl-mode=prefer"
        ));
        assert!(url_sets_ssl_mode("postgres://h/db?SSLMODE=disable"));
        assert!(!url_sets_ssl_mode("postgres://h/db"));
        assert!(!url_sets_ssl_mode(
            "postgres://h/db?application_name=sslmode"
        ));
    }

    #[test]
    fn loopback_connects_without_tls_unless_the_url_asks_for_it() {
        let asked = connect_options("postgres://postgres@127.0.0.1/souk?sslmode=require")
            .expect("a valid URL");
        assert!(matches!(asked.get_ssl_mode(), PgSslMode::Require));
        // An SSL mode from the environment is an explicit choice too.
        if std::env::var_os("PGSSLMODE").is_none() {
            let local = connect_options("postgres://postgres@127.0.0.1/souk").expect("valid");
            assert!(matches!(local.get_ssl_mode(), PgSslMode::Disable));
            let remote = connect_options("postgres://postgres@10.0.0.7/souk").expect("valid");
            assert!(matches!(remote.get_ssl_mode(), PgSslMode::Prefer));
        }
    }
}
