//! Per-connection rate limit: a token bucket, so a client may burst briefly but not sustain more
//! than `gateway.rate_limit_per_sec` frames (beyond it: `ERROR too_many_requests`).

use std::time::Instant;

/// Token bucket: `rate` frames per second sustained, `burst` at once.
pub struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket of `burst` tokens refilling at `rate` per second.
    pub fn new(rate: u32, burst: u32) -> Self {
        RateLimit { tokens: f64::from(burst), rate: f64::from(rate), burst: f64::from(burst), last: Instant::now() }
    }

    /// Takes a token if there is one.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_frames_are_refused_until_tokens_refill() {
        let mut limit = RateLimit::new(100, 5);
        assert!((0..5).all(|_| limit.allow()), "the burst was refused");
        assert!(!limit.allow(), "a sixth frame passed a burst of five");
        let slept = Instant::now();
        std::thread::sleep(Duration::from_millis(25)); // 100/s: at least two tokens back
        let refilled = (0..5).filter(|_| limit.allow()).count();
        let allowed_at_most = (slept.elapsed().as_secs_f64() * 100.0) as usize;
        assert!(refilled >= 2 && refilled <= allowed_at_most.min(5), "{refilled} tokens after {:?}", slept.elapsed());
    }

    #[test]
    fn an_idle_bucket_refills_only_up_to_the_burst() {
        let mut limit = RateLimit::new(1000, 3);
        std::thread::sleep(Duration::from_millis(20)); // 20 tokens' worth of time
        assert_eq!((0..10).filter(|_| limit.allow()).count(), 3);
    }
}
