//! How committed events are fanned out over NATS JetStream: which subject an
//! event goes to, and which partition an aggregate belongs to. The relay
//! (publisher) and the projectors (consumers) both use these, so they always
//! agree.
//!
//! Subjects are `<stream>.events.<AggregateType>.<partition>`; a projector
//! partition consumes `<stream>.events.*.<partition>`. An aggregate's events
//! always go to one partition, in global order; events of different
//! aggregates may be consumed in parallel.

/// Default number of partitions.
pub const DEFAULT_PARTITIONS: u32 = 4;

/// Largest number of partitions accepted from configuration.
pub const MAX_PARTITIONS: u32 = 256;

/// The partition of `aggregate_id`: FNV-1a (64-bit) of its text, modulo
/// `partitions`. Stable across processes, versions and machines.
pub fn partition_of(aggregate_id: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in aggregate_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
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
    fn subjects_match_their_filters() {
        assert_eq!(event_subject("souk", "Order", 3), "souk.events.Order.3");
        assert_eq!(partition_filter("souk", 3), "souk.events.*.3");
        assert_eq!(stream_subjects("souk"), "souk.events.>");
    }
}
