//! Round-trip time estimation (RFC 6298 arithmetic, with RFC 9002's use of
//! the peer's reported ACK delay).

use std::time::Duration;

/// RTT assumed before the first sample (RFC 9002 §6.2.2 uses 333 ms; we serve
/// mostly LAN and broadband paths, and a too-high guess only delays the first
/// retransmission, so we keep QUIC's value).
pub const INITIAL_RTT: Duration = Duration::from_millis(333);
/// Timer granularity: no timer is armed closer than this (RFC 9002 kGranularity).
pub const GRANULARITY: Duration = Duration::from_millis(1);
/// The most a receiver delays an ACK on a short path and before it has an
/// RTT sample. QUIC uses 25 ms; ours is 5 ms because on a LAN the probe
/// timeout is otherwise all ACK delay, and every tail loss at the edge of
/// the receive window waits for it (the cost: at most 200 lone ACKs a
/// second).
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(5);
/// The longest a receiver holds an ACK on a long path, where it waits an
/// eighth of the smallest round trip (see [`ack_delay_for`]).
pub const LONG_PATH_ACK_DELAY: Duration = Duration::from_millis(12);
/// The most a sender allows for, QUIC's default max_ack_delay.
pub const LONG_PATH_ACK_DELAY_ALLOWANCE: Duration = Duration::from_millis(25);

/// How long a receiver may hold an ACK back on a path whose smallest round
/// trip it measured as `min_rtt`: an eighth of it, within [`MAX_ACK_DELAY`]
/// and [`LONG_PATH_ACK_DELAY`]. Each ACK and each wake-up that sends it
/// costs both ends a turn, and on a 80 ms path a 5 ms delay was one every
/// four to seven datagrams at 20 Mbit/s; an eighth of the round trip
/// delays the sender's feedback by as little, relatively, as 5 ms on a
/// 40 ms path does.
pub fn ack_delay_for(min_rtt: Option<Duration>) -> Duration {
    min_rtt.map_or(MAX_ACK_DELAY, |r| {
        (r / 8).clamp(MAX_ACK_DELAY, LONG_PATH_ACK_DELAY)
    })
}

/// The ACK delay a sender allows for (in its probe timeout, its RTT
/// samples and its window) on a path whose smallest round trip it measured
/// as `min_rtt`: a quarter of it, within [`MAX_ACK_DELAY`] and
/// [`LONG_PATH_ACK_DELAY_ALLOWANCE`]. Twice what [`ack_delay_for`] lets the
/// receiver hold, since the two ends measure the round trip apart: a
/// receiver whose smallest sample is up to twice the sender's still stays
/// within the sender's allowance.
pub fn ack_delay_allowance_for(min_rtt: Option<Duration>) -> Duration {
    min_rtt.map_or(MAX_ACK_DELAY, |r| {
        (r / 4).clamp(MAX_ACK_DELAY, LONG_PATH_ACK_DELAY_ALLOWANCE)
    })
}

/// How many of the latest samples [`RttEstimator::current`] looks at.
pub const RECENT_SAMPLES: usize = 4;

#[derive(Debug, Clone)]
pub struct RttEstimator {
    latest: Duration,
    /// The latest samples less the peer's ACK delay, as the average
    /// takes them; the oldest is overwritten first.
    recent: [Duration; RECENT_SAMPLES],
    recent_next: usize,
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
            recent: [INITIAL_RTT; RECENT_SAMPLES],
            recent_next: 0,
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
            self.recent = [sample; RECENT_SAMPLES];
            self.has_sample = true;
            self.min = sample;
            self.smoothed = sample;
            self.variance = sample / 2;
            return;
        }
        self.min = self.min.min(sample);
        // Subtract the peer's ACK delay only when that cannot push the sample
        // below the path's minimum (RFC 9002 §5.3).
        let ack_delay = ack_delay.min(self.peer_ack_delay_allowance());
        let adjusted = if sample >= self.min + ack_delay {
            sample - ack_delay
        } else {
            sample
        };
        self.recent[self.recent_next] = adjusted;
        self.recent_next = (self.recent_next + 1) % RECENT_SAMPLES;
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
    /// The round trip the path takes now: the smoothed average, or the
    /// longest of the last [`RECENT_SAMPLES`] samples if that is shorter.
    /// After a spell of long round trips (a flood of junk queued on the
    /// server's socket) the average remembers it for the few dozen
    /// samples it takes to forget, which a sender paced at the rate it
    /// measured then takes seconds to collect; four short samples in a
    /// row say the spell is over. A spell of short ones does not lower it
    /// below the average.
    pub fn current(&self) -> Duration {
        let recent = self.recent.iter().copied().max().unwrap_or(self.latest);
        self.smoothed.min(recent)
    }
    pub fn has_sample(&self) -> bool {
        self.has_sample
    }

    fn measured_min(&self) -> Option<Duration> {
        self.has_sample.then_some(self.min)
    }

    /// How long this end, receiving, may hold an ACK back on this path.
    pub fn ack_delay(&self) -> Duration {
        ack_delay_for(self.measured_min())
    }

    /// The ACK delay this end, sending, allows the peer on this path.
    pub fn peer_ack_delay_allowance(&self) -> Duration {
        ack_delay_allowance_for(self.measured_min())
    }

    /// Probe timeout before backoff: srtt + max(4 rttvar, granularity) + max_ack_delay.
    pub fn probe_timeout(&self) -> Duration {
        self.smoothed + (self.variance * 4).max(GRANULARITY) + self.peer_ack_delay_allowance()
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
            Duration::from_millis(100 + 200) + LONG_PATH_ACK_DELAY_ALLOWANCE
        );
    }

    #[test]
    fn the_current_round_trip_forgets_a_spell_after_a_few_short_samples() {
        let ms = Duration::from_millis;
        let mut r = RttEstimator::new();
        r.update(ms(250), Duration::ZERO);
        r.update(ms(240), Duration::ZERO);
        // One short sample is not the end of the spell.
        r.update(ms(1), Duration::ZERO);
        assert_eq!(r.current(), r.smoothed());
        for _ in 1..RECENT_SAMPLES {
            r.update(ms(1), Duration::ZERO);
        }
        assert!(r.smoothed() > ms(100), "{:?}", r.smoothed());
        assert_eq!(r.current(), ms(1));
        // Long samples again: the average, not the short past.
        r.update(ms(300), Duration::ZERO);
        assert_eq!(r.current(), r.smoothed());
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

    #[test]
    fn ack_delays_grow_with_the_path_and_the_allowance_covers_twice_the_round_trip() {
        let ms = Duration::from_millis;
        // Before a sample and on a LAN: the short-path delay on both ends.
        assert_eq!(ack_delay_for(None), MAX_ACK_DELAY);
        assert_eq!(ack_delay_allowance_for(None), MAX_ACK_DELAY);
        assert_eq!(
            ack_delay_for(Some(Duration::from_micros(60))),
            MAX_ACK_DELAY
        );
        assert_eq!(
            ack_delay_allowance_for(Some(Duration::from_micros(60))),
            MAX_ACK_DELAY
        );
        assert_eq!(ack_delay_for(Some(ms(80))), ms(10));
        assert_eq!(ack_delay_allowance_for(Some(ms(80))), ms(20));
        assert_eq!(ack_delay_for(Some(ms(600))), LONG_PATH_ACK_DELAY);
        assert_eq!(
            ack_delay_allowance_for(Some(ms(600))),
            LONG_PATH_ACK_DELAY_ALLOWANCE
        );
        // A receiver that measured up to twice the sender's round trip
        // holds its ACKs no longer than the sender allows for.
        for sender_ms in 0..400 {
            let sender = ms(sender_ms);
            for receiver in [sender, sender * 3 / 2, sender * 2] {
                assert!(
                    ack_delay_for(Some(receiver)) <= ack_delay_allowance_for(Some(sender)),
                    "{sender:?} {receiver:?}"
                );
            }
        }
    }

    #[test]
    fn a_long_path_allows_for_its_receiver_s_longer_ack_delay() {
        let mut r = RttEstimator::new();
        for _ in 0..20 {
            r.update(Duration::from_millis(80), Duration::ZERO);
        }
        assert_eq!(r.ack_delay(), Duration::from_millis(10));
        assert_eq!(r.peer_ack_delay_allowance(), Duration::from_millis(20));
        // A 95 ms sample that says it was held 15 ms counts as 80.
        r.update(Duration::from_millis(95), Duration::from_millis(15));
        assert_eq!(r.latest(), Duration::from_millis(95));
        let s = r.smoothed().as_millis();
        assert!((79..=81).contains(&s), "{s}");
    }
}
