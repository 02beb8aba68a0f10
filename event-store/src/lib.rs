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

/// A lazily connecting pool: the process starts (and answers 503) even when
/// the database is down, and reconnects on its own when it returns.
pub fn pool(database_url: &str, config: &PoolConfig) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(database_url)?.application_name("souk");
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
