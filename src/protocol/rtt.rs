//! Round-trip time estimation (RFC 6298 arithmetic, with RFC 9002's use of
//! the peer's reported ACK delay).

use std::time::Duration;

/// RTT assumed before the first sample (RFC 9002 §6.2.2 uses 333 ms; we serve
/// mostly LAN and broadband paths, and a too-high guess only delays the first
/// retransmission, so we keep QUIC's value).
pub const INITIAL_RTT: Duration = Duration::from_millis(333);
/// Timer granularity: no timer is armed closer than this (RFC 9002 kGranularity).
pub const GRANULARITY: Duration = Duration::from_millis(1);
/// The most a receiver delays an ACK; it adds to the probe timeout. QUIC
/// uses 25 ms; ours is 5 ms because on a LAN the probe timeout is
/// otherwise all ACK delay, and every tail loss at the edge of the receive
/// window waits for it (the cost: at most 200 lone ACKs a second).
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct RttEstimator {
    latest: Duration,
    smoothed: Duration,
    variance: Duration,
    min: Duration,
    has_sample: bool,
}

impl Default for RttEstimator {
    fn default() -> Self {
        Self::new()
    }
}

impl RttEstimator {
    pub fn new() -> Self {
        RttEstimator {
            latest: INITIAL_RTT,
            smoothed: INITIAL_RTT,
            variance: INITIAL_RTT / 2,
            min: INITIAL_RTT,
            has_sample: false,
        }
    }

    /// Feeds one sample: the time from sending the largest newly acknowledged
    /// packet to receiving its ACK, and the delay the receiver says it added.
    pub fn update(&mut self, sample: Duration, ack_delay: Duration) {
        self.latest = sample;
        if !self.has_sample {
            self.has_sample = true;
            self.min = sample;
            self.smoothed = sample;
            self.variance = sample / 2;
            return;
        }
        self.min = self.min.min(sample);
        // Subtract the peer's ACK delay only when that cannot push the sample
        // below the path's minimum (RFC 9002 §5.3).
        let ack_delay = ack_delay.min(MAX_ACK_DELAY);
        let adjusted = if sample >= self.min + ack_delay {
            sample - ack_delay
        } else {
            sample
        };
        let diff = self.smoothed.abs_diff(adjusted);
        // rttvar = 3/4 rttvar + 1/4 |srtt - sample|; srtt = 7/8 srtt + 1/8 sample.
        self.variance = (self.variance * 3 + diff) / 4;
        self.smoothed = (self.smoothed * 7 + adjusted) / 8;
    }

    pub fn smoothed(&self) -> Duration {
        self.smoothed
    }
    pub fn variance(&self) -> Duration {
        self.variance
    }
    pub fn latest(&self) -> Duration {
        self.latest
    }
    pub fn min(&self) -> Duration {
        self.min
    }
    pub fn has_sample(&self) -> bool {
        self.has_sample
    }

    /// Probe timeout before backoff: srtt + max(4 rttvar, granularity) + max_ack_delay.
    pub fn probe_timeout(&self) -> Duration {
        self.smoothed + (self.variance * 4).max(GRANULARITY) + MAX_ACK_DELAY
    }

    /// How long after a later packet was acknowledged an earlier one counts as
    /// lost: 9/8 of max(srtt, latest), at least the granularity (RFC 9002 §6.1.2).
    pub fn loss_delay(&self) -> Duration {
        (self.smoothed.max(self.latest) * 9 / 8).max(GRANULARITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_sets_everything() {
        let mut r = RttEstimator::new();
        r.update(Duration::from_millis(100), Duration::ZERO);
        assert_eq!(r.smoothed(), Duration::from_millis(100));
        assert_eq!(r.variance(), Duration::from_millis(50));
        assert_eq!(
            r.probe_timeout(),
            Duration::from_millis(100 + 200) + MAX_ACK_DELAY
        );
    }

    #[test]
    fn converges_and_ignores_ack_delay_below_min() {
        let mut r = RttEstimator::new();
        for _ in 0..50 {
            r.update(Duration::from_millis(80), Duration::from_millis(5));
        }
        // 80 ms samples with 5 ms ack delay: min is 80, so 80 - 5 < min and the
        // delay is not subtracted.
        let s = r.smoothed().as_millis();
        assert!((79..=81).contains(&s), "{s}");
        assert!(r.variance() < Duration::from_millis(5));
        assert_eq!(r.loss_delay(), Duration::from_millis(90));
    }
}
