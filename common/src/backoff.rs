//! Capped exponential backoff, the one retry curve of the workspace.
//!
//! Every loop that waits before trying again (a pipeline stage retrying a batch, a subscriber
//! reconnecting, a client reconnecting, a launcher polling a server) uses this, so the curves cannot
//! drift apart. A pause doubles from `first` up to `max`; with jitter each pause is spread over
//! ±50 % so that many clients cut off together do not all come back in the same millisecond.

use std::time::Duration;

/// Capped exponential backoff: `first`, `2·first`, … up to `max`, optionally jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
    jitter: bool,
}

impl Backoff {
    /// Retrying a stage against Redis or MySQL: 50 ms doubling to 5 s.
    pub const RETRY_FIRST: Duration = Duration::from_millis(50);
    pub const RETRY_MAX: Duration = Duration::from_secs(5);

    /// A curve from `first` doubling up to `max`, without jitter.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, max, next: first, jitter: false }
    }

    /// The same curve with each pause spread over ±50 %.
    pub fn jittered(first: Duration, max: Duration) -> Self {
        Backoff { jitter: true, ..Backoff::new(first, max) }
    }

    /// The pause to wait now; the following one doubles (up to the cap).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        if self.jitter {
            pause.mul_f64(0.5 + rand::random::<f64>())
        } else {
            pause
        }
    }

    /// Sleeps for [`Backoff::next_pause`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }

    /// Back to the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

impl Default for Backoff {
    /// The stage-retry curve (50 ms → 5 s, no jitter).
    fn default() -> Self {
        Backoff::new(Self::RETRY_FIRST, Self::RETRY_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_reset_to_the_first() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let pauses: Vec<u128> = (0..5).map(|_| b.next_pause().as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_pause(), Duration::from_millis(100));
    }

    #[test]
    fn jittered_pauses_stay_within_half_and_one_and_a_half_of_the_curve() {
        let mut b = Backoff::jittered(Duration::from_millis(100), Duration::from_millis(100));
        for _ in 0..1000 {
            let p = b.next_pause();
            assert!(p >= Duration::from_millis(50) && p <= Duration::from_millis(150), "{p:?}");
        }
    }
}
