//! Delays between retries: the one schedule every retry loop of Souk uses.
//! The delays come from `backon` (exponential: a first delay, doubling up to
//! a ceiling, optionally with jitter); [`Backoff`] adds what a loop that runs
//! for the life of a process needs: it never runs out, and it starts over
//! after a success ([`Backoff::reset`]).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The first delay after a failure of a background loop (the relay, a
/// projector partition, the search indexer).
pub const FIRST_DELAY: Duration = Duration::from_millis(100);

/// Exponential delays up to a ceiling, for as many retries as it takes.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// [`FIRST_DELAY`], doubling up to `max`: a background loop waiting for
    /// Postgres or NATS to come back.
    pub fn new(max: Duration) -> Self {
        Self::from_builder(
            ExponentialBuilder::new()
                .with_min_delay(FIRST_DELAY)
                .with_max_delay(max.max(FIRST_DELAY))
                .without_max_times(),
        )
    }

    /// Half a millisecond, doubling up to 5 ms, each delay stretched by a
    /// random share of itself so that processes that conflicted on one
    /// aggregate do not retry in lockstep: optimistic-concurrency retries.
    pub fn conflict() -> Self {
        Self::from_builder(
            ExponentialBuilder::new()
                .with_min_delay(Duration::from_micros(500))
                .with_max_delay(Duration::from_millis(5))
                .with_jitter()
                .without_max_times(),
        )
    }

    fn from_builder(builder: ExponentialBuilder) -> Self {
        Self {
            builder,
            delays: builder.build(),
            // Jitter at most doubles a delay.
            max: Duration::from_secs(120),
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// Sleeps [`Self::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts over from the first delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_their_ceiling_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), FIRST_DELAY);
        // A ceiling below the first delay is the first delay.
        let mut tight = Backoff::new(Duration::from_millis(10));
        assert_eq!(tight.next_delay(), FIRST_DELAY);
        assert_eq!(tight.next_delay(), FIRST_DELAY);
    }

    #[test]
    fn conflict_delays_stay_within_milliseconds_and_vary() {
        let mut backoff = Backoff::conflict();
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_micros(500) && delays[0] <= Duration::from_millis(1));
        assert!(
            delays
                .iter()
                .all(|delay| *delay <= Duration::from_millis(10))
        );
        // Past the ceiling every delay is 5 ms plus a random share of it.
        assert!(
            delays[10..]
                .iter()
                .all(|delay| *delay >= Duration::from_millis(5))
        );
        assert!(delays[10..].windows(2).any(|pair| pair[0] != pair[1]));
    }
}
