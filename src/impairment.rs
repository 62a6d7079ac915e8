//! A seeded model of a bad network path, for tests, the simulation and the
//! impairment proxy (`examples/impair.rs`): random loss, burst loss
//! (Gilbert–Elliott), delay with jitter, reordering, duplication, and a
//! rate-limited bottleneck with a bounded queue (so a too-fast sender sees
//! queueing delay and tail drops, as on a real bottleneck).
//!
//! Like the protocol core it takes a time and a packet size and returns
//! when (if ever) each copy arrives; the caller moves the bytes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a datagram costs a link beyond its payload: the IPv4 (20) and UDP
/// (8) headers. A rate cap counts them, as a real link does, so a protocol
/// with small datagrams pays for them here too (the benchmark's TCP relay
/// charges TCP's own headers the same way).
pub const IP_UDP_HEADERS: usize = 28;

/// Two-state burst loss: in the bad state packets are lost with
/// `loss_in_bad`; the chain moves good→bad with `p` and bad→good with `r`
/// per packet (mean burst length 1/r packets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    pub p: f64,
    pub r: f64,
    pub loss_in_bad: f64,
}

impl GilbertElliott {
    /// A chain with the given long-run loss rate and mean burst length.
    pub fn with_rate(loss: f64, mean_burst: f64) -> Self {
        let r = 1.0 / mean_burst.max(1.0);
        // Stationary share of the bad state is p / (p + r) = loss.
        let loss = loss.clamp(0.0, 0.99);
        let p = loss * r / (1.0 - loss);
        GilbertElliott {
            p,
            r,
            loss_in_bad: 1.0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImpairmentConfig {
    /// Independent random loss probability.
    pub loss: f64,
    pub burst: Option<GilbertElliott>,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter]`, per packet.
    pub jitter: Duration,
    /// Probability that a packet is held back by `reorder_delay`, so later
    /// packets overtake it.
    pub reorder: f64,
    pub reorder_delay: Duration,
    /// Probability that a packet arrives twice.
    pub duplicate: f64,
    /// Bottleneck rate in bits per second (`None`: unlimited).
    pub rate_bps: Option<u64>,
    /// Bottleneck queue in bytes; a packet that does not fit is dropped.
    pub queue_bytes: usize,
    /// The bottleneck is a token-bucket shaper (`tc tbf`) holding this many
    /// bytes of burst: after an idle spell that much leaves at once, as on
    /// the shaped links of ISPs and tests; 0 is a plain rate.
    pub bucket_bytes: usize,
    /// Largest IP packet the path carries (`None`: any): a larger datagram
    /// is dropped, as a router drops a packet it may not fragment. What
    /// keeps a server's trial of a large datagram honest on loopback.
    pub mtu: Option<usize>,
}

impl ImpairmentConfig {
    pub fn is_clean(&self) -> bool {
        *self == ImpairmentConfig::default()
    }
}

/// What the model did, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImpairmentStats {
    pub packets: u64,
    pub passed: u64,
    pub dropped_random: u64,
    pub dropped_burst: u64,
    pub dropped_queue: u64,
    /// Larger than the path's MTU.
    pub dropped_too_large: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

impl ImpairmentStats {
    pub fn dropped(&self) -> u64 {
        self.dropped_random + self.dropped_burst + self.dropped_queue + self.dropped_too_large
    }
}

impl std::fmt::Display for ImpairmentStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} packets: {} passed, {} dropped ({} random, {} burst, {} queue full, {} too large), {} duplicated, {} reordered",
            self.packets,
            self.passed,
            self.dropped(),
            self.dropped_random,
            self.dropped_burst,
            self.dropped_queue,
            self.dropped_too_large,
            self.duplicated,
            self.reordered
        )
    }
}

#[derive(Debug)]
pub struct Impairment {
    config: ImpairmentConfig,
    rng: StdRng,
    in_bad_state: bool,
    /// When the bottleneck finishes sending what it holds.
    link_free_at: Option<Instant>,
    /// Tokens of a shaper's bucket (see `bucket_bytes`) as of `link_free_at`.
    tokens: f64,
    /// (departure time, size) of packets in the bottleneck queue.
    queue: VecDeque<(Instant, usize)>,
    queued_bytes: usize,
    stats: ImpairmentStats,
}

impl Impairment {
    pub fn new(config: ImpairmentConfig, seed: u64) -> Self {
        Impairment {
            tokens: config.bucket_bytes as f64,
            config,
            rng: StdRng::seed_from_u64(seed),
            in_bad_state: false,
            link_free_at: None,
            queue: VecDeque::new(),
            queued_bytes: 0,
            stats: ImpairmentStats::default(),
        }
    }

    pub fn config(&self) -> &ImpairmentConfig {
        &self.config
    }

    /// Changes the conditions from now on (e.g. loss that stops).
    pub fn set_config(&mut self, config: ImpairmentConfig) {
        self.config = config;
    }

    pub fn stats(&self) -> ImpairmentStats {
        self.stats
    }

    /// Bytes waiting in the bottleneck at `now`.
    pub fn queued_bytes(&mut self, now: Instant) -> usize {
        self.drain_queue(now);
        self.queued_bytes
    }

    fn drain_queue(&mut self, now: Instant) {
        while let Some(&(departs, size)) = self.queue.front() {
            if departs > now {
                break;
            }
            self.queue.pop_front();
            self.queued_bytes -= size;
        }
    }

    /// The fate of one packet of `len` bytes sent at `now`: the arrival time
    /// of each copy, none if it was lost.
    pub fn process(&mut self, now: Instant, len: usize) -> Vec<Instant> {
        self.stats.packets += 1;
        if self
            .config
            .mtu
            .is_some_and(|mtu| len + IP_UDP_HEADERS > mtu)
        {
            self.stats.dropped_too_large += 1;
            return Vec::new();
        }
        if let Some(ge) = self.config.burst {
            let flip: f64 = self.rng.r#gen();
            self.in_bad_state = if self.in_bad_state {
                flip >= ge.r
            } else {
                flip < ge.p
            };
            if self.in_bad_state && self.rng.r#gen::<f64>() < ge.loss_in_bad {
                self.stats.dropped_burst += 1;
                return Vec::new();
            }
        }
        if self.config.loss > 0.0 && self.rng.r#gen::<f64>() < self.config.loss {
            self.stats.dropped_random += 1;
            return Vec::new();
        }
        let mut departs = now;
        if let Some(rate) = self.config.rate_bps.filter(|&r| r > 0) {
            self.drain_queue(now);
            if self.queued_bytes + len > self.config.queue_bytes.max(len) {
                self.stats.dropped_queue += 1;
                return Vec::new();
            }
            let start = self.link_free_at.map_or(now, |t| t.max(now));
            let wire = (len + IP_UDP_HEADERS) as f64;
            if self.config.bucket_bytes == 0 {
                departs = start + Duration::from_secs_f64(wire * 8.0 / rate as f64);
            } else {
                // A shaper: tokens accrue at the rate up to the bucket (which
                // always holds one packet, as tbf's burst must), and a packet
                // leaves as soon as it has its tokens.
                let since = self.link_free_at.map_or(Duration::ZERO, |t| start - t);
                let cap = self.config.bucket_bytes.max(len + IP_UDP_HEADERS) as f64;
                let tokens = (self.tokens + since.as_secs_f64() * rate as f64 / 8.0).min(cap);
                let wait = (wire - tokens).max(0.0);
                departs = start + Duration::from_secs_f64(wait * 8.0 / rate as f64);
                self.tokens = (tokens - wire).max(0.0);
            }
            self.link_free_at = Some(departs);
            self.queue.push_back((departs, len));
            self.queued_bytes += len;
        }
        let mut arrival = departs + self.config.delay;
        if !self.config.jitter.is_zero() {
            arrival += self.config.jitter.mul_f64(self.rng.r#gen::<f64>());
        }
        if self.config.reorder > 0.0 && self.rng.r#gen::<f64>() < self.config.reorder {
            self.stats.reordered += 1;
            arrival += self.config.reorder_delay.max(Duration::from_millis(1));
        }
        self.stats.passed += 1;
        let mut copies = vec![arrival];
        if self.config.duplicate > 0.0 && self.rng.r#gen::<f64>() < self.config.duplicate {
            self.stats.duplicated += 1;
            copies.push(arrival + Duration::from_micros(50));
        }
        copies
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_fate() {
        let cfg = ImpairmentConfig {
            loss: 0.1,
            duplicate: 0.05,
            jitter: Duration::from_millis(5),
            ..Default::default()
        };
        let t = Instant::now();
        let mut a = Impairment::new(cfg.clone(), 42);
        let mut b = Impairment::new(cfg, 42);
        for i in 0..1000u64 {
            let now = t + Duration::from_micros(i * 100);
            assert_eq!(a.process(now, 1000), b.process(now, 1000));
        }
        let s = a.stats();
        assert!((70..130).contains(&s.dropped_random), "{s}");
        assert!((25..80).contains(&s.duplicated), "{s}");
    }

    #[test]
    fn bottleneck_delays_then_tail_drops() {
        // 8 Mbit/s: a 972-byte datagram (1000 with its IP and UDP headers)
        // takes 1 ms; the queue holds 10 of them.
        let cfg = ImpairmentConfig {
            rate_bps: Some(8_000_000),
            queue_bytes: 10_000,
            delay: Duration::from_millis(10),
            ..Default::default()
        };
        let t = Instant::now();
        let mut imp = Impairment::new(cfg, 1);
        let arrivals: Vec<Vec<Instant>> = (0..15).map(|_| imp.process(t, 972)).collect();
        assert_eq!(arrivals[0], vec![t + Duration::from_millis(11)]);
        assert_eq!(arrivals[9], vec![t + Duration::from_millis(20)]);
        assert!(arrivals[10..].iter().all(|a| a.is_empty()));
        assert_eq!(imp.stats().dropped_queue, 5);
        // After the queue drained, packets pass again at the link rate.
        assert_eq!(
            imp.process(t + Duration::from_millis(50), 972),
            vec![t + Duration::from_millis(61)]
        );
    }

    #[test]
    fn burst_loss_has_the_asked_rate_and_comes_in_runs() {
        let cfg = ImpairmentConfig {
            burst: Some(GilbertElliott::with_rate(0.03, 8.0)),
            ..Default::default()
        };
        let t = Instant::now();
        let mut imp = Impairment::new(cfg, 7);
        let mut runs = 0;
        let mut previous_lost = false;
        for _ in 0..100_000 {
            let lost = imp.process(t, 100).is_empty();
            if lost && !previous_lost {
                runs += 1;
            }
            previous_lost = lost;
        }
        let lost = imp.stats().dropped_burst as f64;
        assert!((2_400.0..3_600.0).contains(&lost), "{lost}");
        let mean_run = lost / runs as f64;
        assert!((6.0..10.0).contains(&mean_run), "{mean_run}");
    }

    #[test]
    fn reordered_packets_are_overtaken() {
        let cfg = ImpairmentConfig {
            reorder: 1.0,
            reorder_delay: Duration::from_millis(5),
            ..Default::default()
        };
        let t = Instant::now();
        let mut imp = Impairment::new(cfg, 3);
        let first = imp.process(t, 100)[0];
        imp.set_config(ImpairmentConfig::default());
        let second = imp.process(t + Duration::from_millis(1), 100)[0];
        assert!(second < first);
        assert_eq!(imp.stats().reordered, 1);
    }
}
