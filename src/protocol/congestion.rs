//! Congestion control: NewReno slow start and AIMD (RFC 9002 §7), in bytes.
//!
//! It is the floor the issue asks for: one stream can never flood a link,
//! because the window halves on every loss episode. It sits behind the
//! [`CongestionController`] trait so a delay-aware controller can replace it.

use std::time::Instant;

/// Initial window: 10 full datagrams, or 14720 bytes (RFC 9002 §7.2).
pub const INITIAL_WINDOW_PACKETS: u64 = 10;
/// The window never shrinks below 2 datagrams (RFC 9002 kMinimumWindow).
pub const MINIMUM_WINDOW_PACKETS: u64 = 2;
/// The window never grows past this many bytes. It bounds a session's
/// in-flight bookkeeping (and so the server's memory per session) whatever
/// window a client advertises; 16 MiB fills 1 Gbit/s at 130 ms RTT.
pub const MAXIMUM_WINDOW_BYTES: u64 = 16 * 1024 * 1024;
/// Multiplicative decrease on loss (RFC 9002 kLossReductionFactor = 0.5).
pub const LOSS_REDUCTION_DIVISOR: u64 = 2;

pub trait CongestionController: Send + std::fmt::Debug {
    /// Bytes that may be in flight now.
    fn window(&self) -> u64;
    /// `bytes` of a packet sent at `sent` were acknowledged.
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool);
    /// Packets were declared lost; `largest_lost_sent` is when the newest of them left.
    fn on_congestion_event(&mut self, now: Instant, largest_lost_sent: Instant);
    /// No ACK for a long time (several probe timeouts in a row): start over.
    fn on_persistent_congestion(&mut self);
}

#[derive(Debug, Clone)]
pub struct NewReno {
    max_datagram: u64,
    window: u64,
    ssthresh: u64,
    /// Packets sent before this instant do not cause another decrease.
    recovery_start: Option<Instant>,
    /// Bytes acknowledged in congestion avoidance since the last increase.
    bytes_acked: u64,
}

impl NewReno {
    pub fn new(max_datagram: u64) -> Self {
        NewReno {
            max_datagram,
            window: INITIAL_WINDOW_PACKETS * max_datagram,
            ssthresh: u64::MAX,
            recovery_start: None,
            bytes_acked: 0,
        }
    }

    fn minimum_window(&self) -> u64 {
        MINIMUM_WINDOW_PACKETS * self.max_datagram
    }

    pub fn in_slow_start(&self) -> bool {
        self.window < self.ssthresh
    }
}

impl CongestionController for NewReno {
    fn window(&self) -> u64 {
        self.window
    }

    fn on_ack(&mut self, _now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        if self.recovery_start.is_some_and(|start| sent <= start) {
            return;
        }
        // A flow limited by the receiver window, not the network, has not
        // shown that a bigger window is safe (RFC 9002 §7.8).
        if app_limited {
            return;
        }
        if self.in_slow_start() {
            self.window += bytes;
        } else {
            self.bytes_acked += bytes;
            if self.bytes_acked >= self.window {
                self.bytes_acked -= self.window;
                self.window += self.max_datagram;
            }
        }
        self.window = self.window.min(MAXIMUM_WINDOW_BYTES);
    }

    fn on_congestion_event(&mut self, now: Instant, largest_lost_sent: Instant) {
        if self
            .recovery_start
            .is_some_and(|start| largest_lost_sent <= start)
        {
            return;
        }
        self.recovery_start = Some(now);
        self.window = (self.window / LOSS_REDUCTION_DIVISOR).max(self.minimum_window());
        self.ssthresh = self.window;
        self.bytes_acked = 0;
    }

    fn on_persistent_congestion(&mut self) {
        self.window = self.minimum_window();
        self.recovery_start = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn slow_start_then_halves_once_per_episode() {
        let t0 = Instant::now();
        let mut cc = NewReno::new(1000);
        assert_eq!(cc.window(), 10_000);
        cc.on_ack(t0, t0, 10_000, false);
        assert_eq!(cc.window(), 20_000);
        let t1 = t0 + Duration::from_millis(10);
        cc.on_congestion_event(t1, t0);
        assert_eq!(cc.window(), 10_000);
        // A second loss from the same flight does not halve again.
        cc.on_congestion_event(t1 + Duration::from_millis(1), t0);
        assert_eq!(cc.window(), 10_000);
        // Congestion avoidance: one datagram per window acknowledged.
        let t2 = t1 + Duration::from_millis(20);
        cc.on_ack(t2, t2, 10_000, false);
        assert_eq!(cc.window(), 11_000);
        cc.on_persistent_congestion();
        assert_eq!(cc.window(), 2_000);
    }

    #[test]
    fn app_limited_acks_do_not_grow_the_window() {
        let t0 = Instant::now();
        let mut cc = NewReno::new(1000);
        cc.on_ack(t0, t0, 5_000, true);
        assert_eq!(cc.window(), 10_000);
    }
}
