//! Pacing: spreads a window's packets over the round trip instead of
//! sending them in one line-rate burst that overflows shallow queues.
//!
//! A token bucket refilled at the controller's pacing rate. The sender
//! wakes when a *burst* fits, not a single datagram: at 20 Mbit/s one
//! datagram is 0.57 ms of the rate, and waking for each cost the server
//! (and the client, which wakes for each arrival) a thread wake-up per
//! datagram. Good QUIC stacks do the same (quinn's pacer sends at least
//! ten datagrams a burst). The bucket holds two bursts, so a wake-up
//! that comes late (the drivers' timers tick at about a millisecond) is
//! not credit lost: the rate holds.

use std::time::{Duration, Instant};

/// A burst covers at least this much time at the pacing rate.
pub const PACING_BURST: Duration = Duration::from_millis(2);
/// A burst holds at least this many datagrams: 11 KB, which fits the
/// shallowest queue worth using (a `tc tbf` with 100 ms of latency holds
/// 25 KB even at 2 Mbit/s), and cuts the wake-ups eightfold at video rates.
pub const MIN_BURST_PACKETS: f64 = 8.0;
/// The bucket holds this many bursts: the slack for a late wake-up.
const BURSTS_HELD: f64 = 2.0;
/// The most a sender's lateness may be tolerated (see
/// `LossRecovery::tolerated_lateness`): a driver serving many sessions
/// wakes on a tick up to this long.
pub const MAX_TOLERATED_LATENESS: Duration = Duration::from_millis(8);

#[derive(Debug, Clone)]
pub struct Pacer {
    tokens: f64,
    last: Option<Instant>,
    rate: f64,
    burst: f64,
    /// The floor of a burst in datagrams: [`MIN_BURST_PACKETS`] unless
    /// the sender shares the link with many others (see
    /// [`Self::set_min_burst_packets`]).
    min_burst_packets: f64,
}

impl Pacer {
    pub fn new(max_datagram: u64) -> Self {
        let burst = MIN_BURST_PACKETS * max_datagram as f64;
        Pacer {
            tokens: burst,
            last: None,
            rate: 0.0,
            burst,
            min_burst_packets: MIN_BURST_PACKETS,
        }
    }

    /// How late a wake-up for a burst may come without losing rate: the
    /// time the bucket's second burst takes to earn at the last rate.
    /// `None` when the sender does not pace (the bucket is always full).
    pub fn slack(&self) -> Option<Duration> {
        (self.rate > 0.0)
            .then(|| Duration::from_secs_f64(self.burst * (BURSTS_HELD - 1.0) / self.rate))
    }

    /// Lowers (or restores) the burst's floor, taking effect at the next
    /// refill: a server pacing many sessions whose timers fall on one tick
    /// sends all their bursts back to back, and 200 floors of 8 datagrams
    /// are 2.2 MB at line rate.
    pub fn set_min_burst_packets(&mut self, packets: f64) {
        self.min_burst_packets = packets.clamp(1.0, MIN_BURST_PACKETS);
    }

    /// Refills the bucket up to `now` at `rate` bytes per second (`None`:
    /// the controller does not pace, the bucket is always full).
    pub fn refill(&mut self, now: Instant, rate: Option<f64>, max_datagram: u64) {
        let Some(rate) = rate.filter(|r| *r > 0.0) else {
            self.rate = 0.0;
            self.tokens = f64::MAX;
            self.last = Some(now);
            return;
        };
        self.burst =
            (rate * PACING_BURST.as_secs_f64()).max(self.min_burst_packets * max_datagram as f64);
        let capacity = self.burst * BURSTS_HELD;
        if self.rate == 0.0 {
            self.tokens = self.burst;
        } else if let Some(last) = self.last {
            self.tokens += rate * now.saturating_duration_since(last).as_secs_f64();
        }
        self.tokens = self.tokens.min(capacity);
        self.rate = rate;
        self.last = Some(now);
    }

    /// Bytes a burst holds at the last rate.
    pub fn burst(&self) -> u64 {
        self.burst as u64
    }

    pub fn allows(&self, size: u64) -> bool {
        self.tokens >= size as f64
    }

    pub fn on_sent(&mut self, size: u64) {
        self.tokens -= size as f64;
    }

    /// When the sender should wake to send, if pacing holds back a packet
    /// of `size` bytes: once a burst fits, or `room` bytes (what the
    /// window still lets out) if that is less, so a nearly full window is
    /// not kept waiting for a burst it cannot send.
    pub fn next_send_time(&self, size: u64, room: u64) -> Option<Instant> {
        if self.allows(size) || self.rate <= 0.0 {
            return None;
        }
        let wanted = self.burst.min(room as f64).max(size as f64);
        let wait = (wanted - self.tokens) / self.rate;
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
    fn wakes_for_a_burst_and_keeps_the_rate_when_wake_ups_come_late() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000);
        // 1 MB/s: 2 ms of the rate is 2000 bytes, under the 8-datagram
        // floor, so a burst is 8000 bytes, one wake-up per 8 ms.
        p.refill(t0, Some(1_000_000.0), 1000);
        for _ in 0..8 {
            assert!(p.allows(1000));
            p.on_sent(1000);
        }
        assert!(!p.allows(1000));
        let next = p.next_send_time(1000, u64::MAX).expect("paced");
        let exact = t0 + Duration::from_millis(8);
        assert!(next >= exact && next <= exact + Duration::from_micros(1));
        // A window with room for three datagrams wakes when three fit.
        let three = p.next_send_time(1000, 3000).expect("paced");
        assert!(three >= t0 + Duration::from_millis(3) && three < next);
        // Without a rate nothing is held back.
        let mut free = p.clone();
        free.refill(next, None, 1000);
        assert!(free.next_send_time(1_000_000, u64::MAX).is_none());

        // Every wake-up 3 ms late: the bucket's second burst keeps the
        // credit, and ten seconds send the rate's ten megabytes.
        let mut now = t0;
        let mut sent = 8000u64;
        while now < t0 + Duration::from_secs(10) {
            now = p.next_send_time(1000, u64::MAX).expect("paced") + Duration::from_millis(3);
            p.refill(now, Some(1_000_000.0), 1000);
            while p.allows(1000) {
                p.on_sent(1000);
                sent += 1000;
            }
        }
        let expected = 1_000_000.0 * now.duration_since(t0).as_secs_f64();
        assert!(sent as f64 >= expected * 0.99, "{sent} of {expected}");
        assert!(sent as f64 <= expected + 16_000.0, "{sent} of {expected}");
    }

    #[test]
    fn the_slack_is_the_second_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000);
        assert_eq!(p.slack(), None);
        // 1 MB/s: bursts of the 8-datagram floor, 8 ms of the rate.
        p.refill(t0, Some(1_000_000.0), 1000);
        assert_eq!(p.slack(), Some(Duration::from_millis(8)));
        // 100 MB/s: bursts of 2 ms.
        p.refill(t0, Some(100_000_000.0), 1000);
        assert_eq!(p.slack(), Some(PACING_BURST));
    }
}
