//! Souk's projectors: they consume the events the relay publishes to NATS
//! JetStream and build the Postgres read models the query API serves, and
//! they rebuild those read models from the event store on demand.
//!
//! Layout:
//! - `runtime`: the live projector ([`build`], [`Projector::run_until`]):
//!   one task per projection and partition, a durable pull consumer each,
//!   batches applied in order in one transaction with their checkpoint,
//!   redeliveries skipped, the idle watermark for read-your-writes.
//! - `engine`: the projections ([`PROJECTIONS`]) and the apply loop they
//!   share, which isolates poison events; `park`: the dead-letter table and
//!   what operators do with it ([`retry`], [`skip`]).
//! - `listings`, `orders`, `wallets`, `timelines`: one module per
//!   projection, turning domain events into rows (`rows` moves rows in bulk).
//! - `rebuild`: a projection rebuilt from the global order into a schema of
//!   its own ([`rebuild_into`]) and swapped in atomically ([`rebuild`],
//!   [`rebuild_projections`]: several in one pass, resumable after a kill).
//! - `search`: the listings' search index (embedded tantivy or Meilisearch
//!   behind [`search::SearchIndex`]), fed from `search_pending` by an indexer
//!   task of the projector, and queried by the query API's `/search`.
//! - `config`: [`ProjectorConfig`], the `projector` binary's flags and
//!   environment. The binary (feature `server`, on by default) logs and
//!   serves its optional `/health` and `/metrics` through `http-kit`; the
//!   library links no web framework, so `replay-tool` and `query-api` take
//!   it without default features.
//!
//! Every read-model table belongs to exactly one projection and can be
//! rebuilt from the event store; none is a source of truth.

mod balance;
mod columns;
mod config;
mod engine;
mod listings;
mod orders;
mod park;
mod rebuild;
mod rows;
mod runtime;
pub mod search;
mod timelines;
mod wallets;

pub use config::{MAX_BATCH, ProjectorConfig};
pub use engine::PROJECTIONS;
pub use park::{MAX_REASON_CHARS, ParkedEvent, RetryOutcome, dead_letters, retry, skip};
pub use rebuild::{
    LOCKED_CATCH_UP_TIMEOUT, REBUILD_BATCH_EVENTS, RebuildInProgress, RebuildOptions, RebuildPhase,
    RebuildProgress, RebuildReport, abandon, rebuild, rebuild_into, rebuild_projections,
    rebuild_schema, rebuilds_in_progress,
};
pub use runtime::{Projector, Readiness, build, build_watched, consumer_name};

/// The aggregate types whose events change `projection`, or `None` for an
/// unknown name.
pub fn aggregate_types(projection: &str) -> Option<&'static [&'static str]> {
    engine::Kind::parse(projection).map(engine::Kind::aggregate_types)
}

/// The read-model tables `projection` owns, or `None` for an unknown name.
pub fn tables(projection: &str) -> Option<&'static [&'static str]> {
    engine::Kind::parse(projection).map(engine::Kind::tables)
}
