//! The projector's configuration: environment variables, overridable by
//! flags, with the defaults of the brief.

use std::time::Duration;

use event_store::fanout::{DEFAULT_PARTITIONS, MAX_PARTITIONS};

use crate::search::SearchConfig;

/// Largest batch one partition applies in one transaction.
pub const MAX_BATCH: usize = 5_000;

/// Where the projector reads and writes, and how it paces itself.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "projector",
    version,
    about = "Souk's projector: builds the read models from the events on JetStream"
)]
pub struct ProjectorConfig {
    /// Postgres connection string (never logged).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/souk",
        hide_env_values = true
    )]
    pub database_url: String,

    /// The NATS server, or a comma-separated list of a cluster's servers
    /// (it may carry credentials: never logged).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,

    /// How many servers keep a copy of the stream when this process creates
    /// it (the relay's setting; an existing stream is reported, not changed).
    #[arg(
        long,
        env = "SOUK_STREAM_REPLICAS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=event_store::nats::MAX_REPLICAS as i64)
    )]
    pub stream_replicas: u8,

    /// The JetStream stream the relay publishes to.
    #[arg(long, env = "SOUK_STREAM", default_value = "souk")]
    pub stream: String,

    /// Number of subject partitions; must be the relay's.
    #[arg(
        long,
        env = "SOUK_PARTITIONS",
        default_value_t = DEFAULT_PARTITIONS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PARTITIONS))
    )]
    pub partitions: u32,

    /// The projections this process runs (comma separated); all by default.
    #[arg(long, env = "SOUK_PROJECTIONS", value_delimiter = ',')]
    pub projections: Vec<String>,

    /// Most messages one partition applies in one transaction.
    #[arg(long, env = "SOUK_PROJECTOR_BATCH_MAX", default_value_t = 500)]
    pub batch_max: usize,

    /// The longest an idle partition sleeps before it fetches again when the
    /// relay's checkpoint does not move (it wakes as soon as that moves).
    #[arg(long, env = "SOUK_PROJECTOR_FETCH_WAIT_MS", default_value_t = 25)]
    pub fetch_wait_ms: u64,

    /// How often a partition held by another projector process tries to
    /// take it over.
    #[arg(long, env = "SOUK_PROJECTOR_STANDBY_RETRY_MS", default_value_t = 2_000)]
    pub standby_retry_ms: u64,

    /// The longest delay between two attempts after a failure.
    #[arg(long, env = "SOUK_PROJECTOR_BACKOFF_MAX_MS", default_value_t = 5_000)]
    pub backoff_max_ms: u64,

    /// Serve Prometheus metrics on this address (`/metrics`); off when unset.
    #[arg(long, env = "SOUK_PROJECTOR_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Log as JSON lines.
    #[arg(long, env = "SOUK_LOG_JSON", default_value_t = false)]
    pub log_json: bool,

    /// The search index the projector feeds (when it runs "listings").
    #[command(flatten)]
    pub search: SearchConfig,
}

impl ProjectorConfig {
    /// The defaults, on `database_url` and the JetStream stream `stream`.
    pub fn new(database_url: impl Into<String>, stream: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            stream: stream.into(),
            stream_replicas: 1,
            partitions: DEFAULT_PARTITIONS,
            projections: Vec::new(),
            batch_max: 500,
            fetch_wait_ms: 25,
            standby_retry_ms: 2_000,
            backoff_max_ms: 5_000,
            metrics_addr: None,
            log_json: false,
            search: SearchConfig::embedded("./data/search"),
        }
    }

    pub fn fetch_wait(&self) -> Duration {
        Duration::from_millis(self.fetch_wait_ms.clamp(10, 30_000))
    }

    pub fn standby_retry(&self) -> Duration {
        Duration::from_millis(self.standby_retry_ms.clamp(10, 60_000))
    }

    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms.clamp(100, 60_000))
    }

    pub fn batch_max(&self) -> usize {
        self.batch_max.clamp(1, MAX_BATCH)
    }

    pub fn partitions(&self) -> u32 {
        self.partitions.clamp(1, MAX_PARTITIONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_override_the_defaults_and_values_are_bounded() {
        let config = ProjectorConfig::try_parse_from([
            "projector",
            "--stream",
            "test",
            "--projections",
            "orders,wallets",
            "--batch-max",
            "100000",
        ])
        .expect("parses");
        assert_eq!(config.stream, "test");
        assert_eq!(config.projections, vec!["orders", "wallets"]);
        assert_eq!(config.batch_max(), MAX_BATCH);
        assert!(ProjectorConfig::try_parse_from(["projector", "--partitions", "0"]).is_err());
        let defaults = ProjectorConfig::new("postgres://x", "souk");
        assert_eq!(defaults.partitions(), DEFAULT_PARTITIONS);
        assert_eq!(defaults.fetch_wait(), Duration::from_millis(25));
        let meili = ProjectorConfig::try_parse_from([
            "projector",
            "--search-backend",
            "meilisearch",
            "--meili-url",
            "http://127.0.0.1:7700",
        ])
        .expect("parses");
        assert_eq!(
            meili.search.backend,
            crate::search::SearchBackend::Meilisearch
        );
        assert!(
            ProjectorConfig::try_parse_from(["projector", "--search-backend", "solr"]).is_err()
        );
    }
}
