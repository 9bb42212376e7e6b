//! Exponential delays with jitter for every retry and restart loop: the
//! sidecar's sides, the apply pipelines and their batches, the DR vault.
//!
//! Each delay lies within `[min, max]`. Step `n` is `min * 2^n`, at most
//! `max / 2`, plus a random part of up to one more step (the first delay in
//! `[min, 2 * min)`, late ones in `[max / 2, max)`), so pipelines and
//! sidecars that failed together do not retry together. After a success the
//! caller resets the delay to `min`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays for one retry loop (see the module doc).
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    delays: ExponentialBackoff,
}

impl Backoff {
    /// Delays from `min` up to `max` (`max` below `min` is taken as `min`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        Backoff {
            min,
            max,
            delays: Self::build(min, max),
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // backon adds up to one more step to each delay, which caps at
        // max / 2: the result lies in [min, max) but for rounding (and for
        // min above max / 2); clamped to the bounds
        self.delays
            .next()
            .unwrap_or(self.max)
            .clamp(self.min, self.max)
    }

    /// Back to `min`, after a success.
    pub fn reset(&mut self) {
        self.delays = Self::build(self.min, self.max);
    }

    fn build(min: Duration, max: Duration) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .without_max_times()
            .with_jitter()
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn every_delay_lies_within_the_bounds() {
        for _ in 0..200 {
            let mut b = Backoff::new(MIN, MAX);
            for _ in 0..40 {
                let d = b.next_delay();
                assert!((MIN..=MAX).contains(&d), "{d:?}");
            }
        }
    }

    #[test]
    fn delays_grow_to_the_upper_half_of_max() {
        let mut b = Backoff::new(MIN, MAX);
        let first = b.next_delay();
        assert!(first < MIN * 2, "{first:?}");
        // past log2(max / min) steps every delay is at least half of max
        let late: Vec<Duration> = (0..20).map(|_| b.next_delay()).skip(10).collect();
        assert!(late.iter().all(|d| *d >= MAX / 2), "{late:?}");
        // each step at least as long as the fixed half of the one before
        let mut b = Backoff::new(MIN, MAX);
        let steps: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in steps.iter().enumerate() {
            let floor = (MIN * 2u32.pow(i as u32)).min(MAX / 2);
            assert!(*d >= floor, "step {i}: {d:?} < {floor:?} ({steps:?})");
        }
    }

    #[test]
    fn delays_are_spread() {
        let mut b = Backoff::new(MIN, MAX);
        let late: Vec<Duration> = (0..40).map(|_| b.next_delay()).skip(20).collect();
        assert!(late.iter().any(|d| *d != late[0]), "{late:?}");
        // first delays too: loops that failed together retry apart
        let first: Vec<Duration> = (0..20)
            .map(|_| Backoff::new(MIN, MAX).next_delay())
            .collect();
        assert!(first.iter().any(|d| *d != first[0]), "{first:?}");
    }

    #[test]
    fn reset_starts_again_from_min() {
        let mut b = Backoff::new(MIN, MAX);
        for _ in 0..20 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() < MIN * 2);
    }

    #[test]
    fn equal_bounds_give_that_delay() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        assert!((0..10).all(|_| b.next_delay() == Duration::from_secs(1)));
    }
}
