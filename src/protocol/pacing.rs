//! Pacing: spreads a window's packets over the round trip instead of
//! sending them in one line-rate burst that overflows shallow queues.
//!
//! A token bucket refilled at the controller's pacing rate; its depth
//! allows a short burst ([`PACING_BURST`] of the rate, at least two
//! datagrams) because the drivers' timers tick at about a millisecond.

use std::time::{Duration, Instant};

/// Burst allowance in time at the pacing rate.
pub const PACING_BURST: Duration = Duration::from_millis(2);
/// Datagrams that may always leave back to back.
pub const MIN_BURST_PACKETS: f64 = 2.0;

#[derive(Debug, Clone)]
pub struct Pacer {
    tokens: f64,
    last: Option<Instant>,
    rate: f64,
    capacity: f64,
}

impl Pacer {
    pub fn new(max_datagram: u64) -> Self {
        Pacer {
            tokens: MIN_BURST_PACKETS * max_datagram as f64,
            last: None,
            rate: 0.0,
            capacity: MIN_BURST_PACKETS * max_datagram as f64,
        }
    }

    /// Refills the bucket up to `now` at `rate` bytes per second (`None`:
    /// the controller does not pace, the bucket is always full).
    pub fn refill(&mut self, now: Instant, rate: Option<f64>, max_datagram: u64) {
        let floor = MIN_BURST_PACKETS * max_datagram as f64;
        let Some(rate) = rate.filter(|r| *r > 0.0) else {
            self.rate = 0.0;
            self.tokens = f64::MAX;
            self.last = Some(now);
            return;
        };
        self.capacity = (rate * PACING_BURST.as_secs_f64()).max(floor);
        if self.rate == 0.0 {
            self.tokens = self.capacity;
        } else if let Some(last) = self.last {
            self.tokens += rate * now.saturating_duration_since(last).as_secs_f64();
        }
        self.tokens = self.tokens.min(self.capacity);
        self.rate = rate;
        self.last = Some(now);
    }

    pub fn allows(&self, size: u64) -> bool {
        self.tokens >= size as f64
    }

    pub fn on_sent(&mut self, size: u64) {
        self.tokens -= size as f64;
    }

    /// When a packet of `size` bytes may leave, if pacing holds it back.
    pub fn next_send_time(&self, size: u64) -> Option<Instant> {
        if self.allows(size) || self.rate <= 0.0 {
            return None;
        }
        let wait = (size as f64 - self.tokens) / self.rate;
        // Rounded up: a deadline a nanosecond early refills a hair too
        // little, and the driver would wake twice (or, in a simulation that
        // jumps to the deadline, forever).
        self.last
            .map(|t| t + Duration::from_nanos((wait * 1e9).ceil() as u64 + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_packets_at_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000);
        // 1 MB/s: 2 ms of burst is 2000 bytes, then one packet per ms.
        p.refill(t0, Some(1_000_000.0), 1000);
        assert!(p.allows(1000));
        p.on_sent(1000);
        p.on_sent(1000);
        assert!(!p.allows(1000));
        let next = p.next_send_time(1000).expect("paced");
        let exact = t0 + Duration::from_millis(1);
        assert!(next >= exact && next <= exact + Duration::from_micros(1));
        p.refill(next, Some(1_000_000.0), 1000);
        assert!(p.allows(1000));
        // Without a rate nothing is held back.
        p.refill(next, None, 1000);
        assert!(p.next_send_time(1_000_000).is_none());
    }
}
