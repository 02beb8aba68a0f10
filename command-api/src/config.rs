//! Configuration from the environment, overridable by flags, with the
//! defaults of shared/BRIEF.md. The flags every HTTP service takes are
//! `http_kit::ServerConfig`'s.

use std::net::SocketAddr;
use std::path::PathBuf;

use chrono::TimeDelta;
use domain::journeys::Deadlines;
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

    /// Escrow goes to the seller this long after shipment when the buyer
    /// never confirms delivery (humantime: `7d`, `30s`).
    #[arg(long, env = "SOUK_ESCROW_RELEASE_AFTER", default_value = "7d", value_parser = duration)]
    pub escrow_release_after: TimeDelta,

    /// A delivered order accepts returns this long, then completes by itself.
    #[arg(long, env = "SOUK_RETURN_WINDOW", default_value = "14d", value_parser = duration)]
    pub return_window: TimeDelta,

    /// A bank transfer must arrive within this, or its order is cancelled.
    #[arg(long, env = "SOUK_UNPAID_ORDER_AFTER", default_value = "3d", value_parser = duration)]
    pub unpaid_order_after: TimeDelta,

    /// A confirmed order not shipped within this is cancelled and refunded.
    #[arg(long, env = "SOUK_SHIP_BY", default_value = "7d", value_parser = duration)]
    pub ship_by: TimeDelta,

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

    /// Most group-commit statements in flight at once: commands that need
    /// no transaction of their own are written together, several lanes'
    /// units per statement (see event-store's `group_commit`).
    #[arg(
        long,
        env = "SOUK_STORE_WRITERS",
        default_value_t = event_store::store::DEFAULT_WRITERS,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    pub store_writers: u16,
}

/// Longest duration a clock of an order may be set to.
const MAX_DEADLINE: TimeDelta = TimeDelta::days(3650);

/// Parses a humantime duration (`7d`, `36h`, `30s`) of one second to ten
/// years.
fn duration(text: &str) -> Result<TimeDelta, String> {
    let parsed = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    TimeDelta::from_std(parsed)
        .ok()
        .filter(|delta| *delta >= TimeDelta::seconds(1) && *delta <= MAX_DEADLINE)
        .ok_or_else(|| format!("{text}: a duration from 1s to {}d", MAX_DEADLINE.num_days()))
}

impl Config {
    /// The clocks of an order.
    pub fn deadlines(&self) -> Deadlines {
        Deadlines {
            escrow_release_after: self.escrow_release_after,
            return_window: self.return_window,
            unpaid_order_after: self.unpaid_order_after,
            ship_by: self.ship_by,
        }
    }

    /// A configuration for tests: port 0, the given database and keys, and
    /// a JetStream stream of its own on `NATS_URL` (or the local server).
    pub fn for_tests(database_url: &str, jwt_public_key: PathBuf) -> Self {
        let defaults = Deadlines::default();
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            server: ServerConfig::for_tests(database_url, jwt_public_key),
            escrow_release_after: defaults.escrow_release_after,
            return_window: defaults.return_window,
            unpaid_order_after: defaults.unpaid_order_after,
            ship_by: defaults.ship_by,
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
            store_writers: event_store::store::DEFAULT_WRITERS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_humantime_durations_within_bounds() {
        assert_eq!(duration("7d"), Ok(TimeDelta::days(7)));
        assert_eq!(duration("2s"), Ok(TimeDelta::seconds(2)));
        assert_eq!(duration("1h 30m"), Ok(TimeDelta::minutes(90)));
        assert!(duration("0s").is_err());
        assert!(duration("soon").is_err());
        assert!(duration("20000d").is_err());
    }
}
