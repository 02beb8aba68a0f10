//! How committed events are fanned out over NATS JetStream: which subject an
//! event goes to, and which partition an aggregate belongs to. The relay
//! (publisher) and the projectors (consumers) both use these, so they always
//! agree.
//!
//! Subjects are `<stream>.events.<AggregateType>.<partition>`; a projector
//! partition consumes `<stream>.events.*.<partition>`. An aggregate's events
//! always go to one partition, in global order; events of different
//! aggregates may be consumed in parallel.

use std::time::Duration;

/// Longest pause between two attempts of a NATS client of Souk to reconnect
/// (async-nats' own default grows to 4 s): after an outage, publishing and
/// consuming resume within about this long of the server's return. With 1 s,
/// read-bench's relay published its first event 0.99 s after NATS was back,
/// a sixth of a 100,000-event catch-up; an attempt costs a refused TCP
/// connection, so four a second while a server is away cost nothing.
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_millis(250);

/// The pause before reconnect attempt number `attempts` (1 for the first):
/// none for the first, then 100 ms more per attempt up to
/// [`RECONNECT_DELAY_MAX`]. For `ConnectOptions::reconnect_delay_callback`.
pub fn reconnect_delay(attempts: usize) -> Duration {
    let steps = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
    Duration::from_millis(100)
        .saturating_mul(steps)
        .min(RECONNECT_DELAY_MAX)
}

/// Default number of partitions. Each partition of each projection is a task
/// that wakes, fetches and commits on its own, so the per-batch round trips
/// grow with the partition count while the work per event does not. On a
/// two-core machine, read-bench at 1,000 commands/s measured a
/// commit-to-visible p99 of 123, 152 and 250 ms with two partitions against
/// 165, 366, 414 and 420 ms with four (interleaved runs of one build), and
/// both caught up after an outage at over 16,000 events/s. A deployment with
/// more cores or projector processes raises it (every process must agree).
pub const DEFAULT_PARTITIONS: u32 = 2;

/// Largest number of partitions accepted from configuration.
pub const MAX_PARTITIONS: u32 = 256;

/// FNV-1a (64-bit) of `bytes`: stable across processes, versions and
/// machines. Partitions and advisory lock keys are derived from it, so it
/// must never change.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The partition of `aggregate_id`: the [`stable_hash`] of its text, modulo
/// `partitions`.
pub fn partition_of(aggregate_id: &str, partitions: u32) -> u32 {
    (stable_hash(aggregate_id.as_bytes()) % u64::from(partitions.max(1))) as u32
}

/// The subject an event of `aggregate_type` in `partition` is published on.
pub fn event_subject(stream: &str, aggregate_type: &str, partition: u32) -> String {
    format!("{stream}.events.{aggregate_type}.{partition}")
}

/// The subjects the stream `stream` holds.
pub fn stream_subjects(stream: &str) -> String {
    format!("{stream}.events.>")
}

/// What a consumer of `partition` filters on.
pub fn partition_filter(stream: &str, partition: u32) -> String {
    format!("{stream}.events.*.{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Pinned: changing the hash would move aggregates between partitions.
        assert_eq!(partition_of("", 4), (0xcbf2_9ce4_8422_2325_u64 % 4) as u32);
        assert_eq!(partition_of("abc", 7), partition_of("abc", 7));
        let mut counts = [0; 4];
        for n in 0..4000 {
            counts[partition_of(&uuid::Uuid::from_u128(n).to_string(), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|count| *count > 800), "{counts:?}");
        assert_eq!(partition_of("anything", 0), 0);
    }

    #[test]
    fn reconnecting_starts_at_once_and_never_waits_long() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(500), RECONNECT_DELAY_MAX);
        assert_eq!(reconnect_delay(usize::MAX), RECONNECT_DELAY_MAX);
    }

    #[test]
    fn subjects_match_their_filters() {
        assert_eq!(event_subject("souk", "Order", 3), "souk.events.Order.3");
        assert_eq!(partition_filter("souk", 3), "souk.events.*.3");
        assert_eq!(stream_subjects("souk"), "souk.events.>");
    }
}
