//! When things happen in a run, on one monotonic clock, and how a message carries its send time.
//!
//! The sender writes the send time (µs since the run's epoch) at the front of the body, so the
//! receiver computes end-to-end latency without any shared map or clock sync.

use std::time::Duration;

use tokio::time::Instant;

/// When things happen in a run, on the monotonic clock.
#[derive(Debug)]
pub(super) struct Schedule {
    pub epoch: Instant,
    /// Sending starts.
    pub start: Instant,
    pub window_start: Instant,
    /// Sending stops; the window ends.
    pub stop: Instant,
    pub interval: Duration,
    pub closed_loop: bool,
    pub body_bytes: usize,
    /// A sender stops after this many messages (`None`: it sends until `stop`).
    pub messages_per_sender: Option<usize>,
}

impl Schedule {
    pub fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Whether a message sent at `sent_at_us` belongs to the measured window.
    pub fn measured(&self, sent_at_us: u64) -> bool {
        (self.us(self.window_start)..self.us(self.stop)).contains(&sent_at_us)
    }

    /// Time from `sent_at_us` to `now`.
    pub fn since(&self, sent_at_us: u64, now: Instant) -> Duration {
        Duration::from_micros(self.us(now).saturating_sub(sent_at_us))
    }

    /// Whether a sender that has sent `sent` messages and is next due at `next` sends again.
    pub fn sends_at(&self, next: Instant, sent: usize) -> bool {
        next < self.stop && self.messages_per_sender.is_none_or(|limit| sent < limit)
    }
}

/// The body of a message: its send time, then padding to `bytes`.
pub(super) fn message_body(sent_at_us: u64, bytes: usize) -> String {
    let mut body = format!("{sent_at_us}|");
    if body.len() < bytes {
        body.extend(std::iter::repeat_n('x', bytes - body.len()));
    }
    body
}

/// The send time carried by a body made by [`message_body`].
pub(super) fn body_sent_at(body: &str) -> Option<u64> {
    body.split_once('|')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_send_time_and_have_the_requested_size() {
        let body = message_body(123_456, 64);
        assert_eq!(body.len(), 64);
        assert_eq!(body_sent_at(&body), Some(123_456));
        // Too small a size still carries the time.
        assert_eq!(body_sent_at(&message_body(99, 1)), Some(99));
        assert_eq!(body_sent_at("hello"), None);
    }
}
