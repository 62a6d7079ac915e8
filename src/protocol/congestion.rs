//! Congestion control.
//!
//! The default is [`Bbr`], a model-based controller after BBR v1
//! (Cardwell et al., "BBR: Congestion-Based Congestion Control", ACM Queue
//! 2016; draft-cardwell-iccrg-bbr-congestion-control). We chose it over
//! loss-based CUBIC or NewReno because udpvid's users sit on Wi-Fi and 4G,
//! where packets are lost at random and not because a queue overflowed: a
//! loss-based window halves on each such loss and, at 10 % loss and 80 ms
//! RTT, NewReno falls to ~70 KB/s, below any video's bitrate. BBR instead
//! measures the bottleneck rate (the best delivery rate of the last ten
//! round trips) and the path's minimum RTT, paces at that rate and keeps
//! about two bandwidth-delay products in flight, so random loss barely
//! moves it while a growing queue (RTT above the minimum) and heavy loss
//! (a share per round above [`BBR_LOSS_THRESHOLD`], which random loss on
//! a usable link does not reach) pull it back.
//!
//! [`NewReno`] (RFC 9002 §7) stays as the simple reference controller.
//! Both sit behind [`CongestionController`].

use std::time::{Duration, Instant};

/// Initial window: 10 full datagrams (RFC 9002 §7.2).
pub const INITIAL_WINDOW_PACKETS: u64 = 10;
/// The window never shrinks below 2 datagrams (RFC 9002 kMinimumWindow).
pub const MINIMUM_WINDOW_PACKETS: u64 = 2;
/// The window never grows past this many bytes. It bounds a session's
/// in-flight bookkeeping (and so the server's memory per session) whatever
/// window a client advertises; 16 MiB fills 1 Gbit/s at 130 ms RTT.
pub const MAXIMUM_WINDOW_BYTES: u64 = 16 * 1024 * 1024;
/// Multiplicative decrease on loss (RFC 9002 kLossReductionFactor = 0.5).
pub const LOSS_REDUCTION_DIVISOR: u64 = 2;

/// One delivery-rate sample (draft-cheng-iccrg-delivery-rate-estimation).
#[derive(Debug, Clone, Copy)]
pub struct RateSample {
    /// Bytes per second delivered over the sample's interval.
    pub delivery_rate: f64,
    /// The sender was limited by the receiver's window, not the network:
    /// the rate says only that the path can do at least this much.
    pub app_limited: bool,
}

/// What one ACK told the sender.
#[derive(Debug, Clone, Copy)]
pub struct AckEvent {
    pub now: Instant,
    pub acked_bytes: u64,
    /// When the newest packet this ACK acknowledged was sent.
    pub largest_acked_sent: Instant,
    pub bytes_in_flight: u64,
    /// The RTT of the newest acknowledged packet, if it gave a sample.
    pub rtt_sample: Option<Duration>,
    /// The round trip now ([`super::rtt::RttEstimator::current`]).
    pub current_rtt: Duration,
    pub rate: Option<RateSample>,
    /// The newest acknowledged packet was sent while window-limited.
    pub app_limited: bool,
    /// Total bytes acknowledged so far, to count round trips.
    pub delivered: u64,
    /// `delivered` when the newest acknowledged packet was sent.
    pub prior_delivered: u64,
}

pub trait CongestionController: Send + std::fmt::Debug {
    /// Bytes that may be in flight now.
    fn window(&self) -> u64;
    /// Bytes per second to pace at, if the controller paces.
    fn pacing_rate(&self) -> Option<f64>;
    fn on_ack(&mut self, ack: &AckEvent);
    /// Packets totalling `lost_bytes` were declared lost; the newest of them
    /// was sent at `largest_lost_sent`.
    fn on_loss(&mut self, now: Instant, lost_bytes: u64, largest_lost_sent: Instant);
    /// No ACK for several probe timeouts in a row: start over.
    fn on_persistent_congestion(&mut self);
    /// The first ACK after a persistent congestion came. `spurious`: it
    /// acknowledged packets sent before the silence began, so the path
    /// carried them and only the ACKs were missing (lost in a burst on the
    /// way back, or late): what `on_persistent_congestion` forgot may come
    /// back.
    fn on_persistent_congestion_ended(&mut self, _spurious: bool) {}
    /// A new transfer replaced the old one (a seek): demand jumps from
    /// what the receive window allowed to as fast as possible.
    fn on_new_transfer(&mut self, _now: Instant) {}
    /// The path carries datagrams this large: what is counted in datagrams
    /// (the floors of the window) is counted in these.
    fn set_max_datagram(&mut self, max_datagram: u64);
    /// Short name for logs and stats.
    fn name(&self) -> &'static str;
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

    fn pacing_rate(&self) -> Option<f64> {
        None
    }

    fn on_ack(&mut self, ack: &AckEvent) {
        if self
            .recovery_start
            .is_some_and(|start| ack.largest_acked_sent <= start)
        {
            return;
        }
        // A flow limited by the receiver window, not the network, has not
        // shown that a bigger window is safe (RFC 9002 §7.8).
        if ack.app_limited {
            return;
        }
        if self.in_slow_start() {
            self.window += ack.acked_bytes;
        } else {
            self.bytes_acked += ack.acked_bytes;
            if self.bytes_acked >= self.window {
                self.bytes_acked -= self.window;
                self.window += self.max_datagram;
            }
        }
        self.window = self.window.min(MAXIMUM_WINDOW_BYTES);
    }

    fn on_loss(&mut self, now: Instant, _lost_bytes: u64, largest_lost_sent: Instant) {
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

    fn set_max_datagram(&mut self, max_datagram: u64) {
        self.max_datagram = max_datagram;
        self.window = self.window.max(self.minimum_window());
    }

    fn name(&self) -> &'static str {
        "newreno"
    }
}

/// Startup gain 2/ln 2: doubles the delivery rate every round trip.
pub const BBR_HIGH_GAIN: f64 = 2.885;
/// Pacing gains of ProbeBW's eight phases: probe up, drain, cruise.
pub const BBR_PACING_CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// In ProbeBW the window is twice the bandwidth-delay product, leaving
/// room for delayed and aggregated ACKs.
pub const BBR_CWND_GAIN: f64 = 2.0;
/// Round trips over which the bottleneck rate is the maximum sample.
pub const BBR_BW_WINDOW_ROUNDS: u64 = 10;
/// How long a minimum RTT sample stays valid.
pub const BBR_MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Startup ends after this many rounds without 25 % rate growth.
pub const BBR_FULL_BW_ROUNDS: u32 = 3;
pub const BBR_FULL_BW_GROWTH: f64 = 1.25;
/// A round that lost more than this share of its packets was congestion,
/// not noise: random loss on a link still worth using stays below it.
pub const BBR_LOSS_THRESHOLD: f64 = 0.2;
/// On such a round the rate estimate is cut to this share (BBR v2's beta).
pub const BBR_LOSS_BETA: f64 = 0.7;
/// A round is judged on its loss share only with at least this many
/// datagrams in it: 3 lost of 10 is noise at 10 % random loss, 30 of 100
/// is congestion.
pub const BBR_LOSS_MIN_PACKETS: u64 = 20;
/// In startup a heavy round must also have lost at least this many
/// datagrams (BBRv2's loss-event count does the same): at 10 % random loss
/// one early round of twenty-odd datagrams in twenty-five loses more than
/// a fifth by chance, and ending startup there left a 20 Mbit/s link at a
/// fifth of its rate for seconds; startup's own overshoot into a queue
/// loses far more.
pub const BBR_STARTUP_LOSS_MIN_PACKETS: u64 = 8;
/// After this many heavily lossy rounds (a lossy spell, not one overshoot),
/// the first round without any loss sends startup probing for the link
/// again: the rate samples only know the capped rate.
pub const BBR_REPROBE_ROUNDS: u32 = 3;
/// Each round without heavy loss lifts a loss cap by this factor, as
/// ProbeBW's up-phase probes above the estimate.
pub const BBR_CAP_GROWTH: f64 = 1.25;
/// When the smoothed RTT exceeds the minimum by this factor, a queue is
/// standing at the bottleneck: cruise below the estimate until it drains.
pub const BBR_QUEUE_RTT_FACTOR: f64 = 1.5;
/// Pacing gain used while a standing queue is seen.
pub const BBR_QUEUE_DRAIN_GAIN: f64 = 0.85;
/// Startup also ends when a round's smallest RTT sample exceeds the
/// previous round's by clamp(prev/8, 4 ms, 16 ms), HyStart++'s
/// delay-increase test (RFC 9406): the bottleneck queue is filling, the
/// rate is found. The round's *smallest* of at least this many samples, so
/// one slow ACK (a busy receiver) does not end it...
pub const BBR_STARTUP_DELAY_SAMPLES: u32 = 8;
/// ...and only once the window holds this many datagrams (Linux's
/// hystart_low_window): in the first round trips a few late ACKs say
/// nothing about a queue.
pub const BBR_STARTUP_DELAY_MIN_WINDOW_PACKETS: u64 = 16;
/// Time beyond the path's round trip an ACK can take to come back: the
/// receiver's largest ACK delay on a path of `min_rtt` (see
/// [`super::rtt::ack_delay_allowance_for`]) plus one timer tick of the
/// drivers.
pub fn bbr_ack_feedback_delay(min_rtt: Duration) -> Duration {
    super::rtt::ack_delay_allowance_for(Some(min_rtt)) + Duration::from_millis(1)
}
/// A ProbeBW up-phase (gain 1.25) whose delivery rate grew at least this
/// much found a link with room: startup probes again (see `judge_probe`).
pub const BBR_PROBE_ROOM_GROWTH: f64 = 1.2;
/// The window never falls below four datagrams (BBR's floor).
pub const BBR_MIN_WINDOW_PACKETS: u64 = 4;
/// ACKs that come in bunches are allowed for over this many round trips
/// (the maximum of two halves, as Linux BBR's `extra_acked`)...
pub const BBR_EXTRA_ACKED_ROUNDS: u64 = 10;
/// ...up to this long at the estimated rate...
pub const BBR_EXTRA_ACKED_MAX: Duration = Duration::from_millis(100);
/// ...and only while those round trips lost less than this share of the
/// bytes: a path that loses is overflowing a queue, and more in flight
/// only overflows it more (64 sessions through one 160 KB queue dropped
/// 43 % of the datagrams with the allowance, 40 % without)...
pub const BBR_EXTRA_ACKED_MAX_LOSS: f64 = 0.02;
/// ...nor within this long of a half that lost more: at a drop-tail queue
/// shared by many, one session's losses come in spells, and ten round
/// trips without one said nothing (45 % dropped).
pub const BBR_EXTRA_ACKED_LOSS_MEMORY: Duration = Duration::from_secs(1);
/// A round that lost packets while the sender was busy, and delivered less
/// than the estimate over this factor, shows the estimate was never the
/// bottleneck's: samples above this multiple of the round's delivery rate
/// are cut to it (see `Bbr::forget_bursts`). Random loss cannot trip it: a
/// busy round delivers at least (1 - loss) × 0.75 (ProbeBW's drain phase)
/// of the estimate, more than a third below 55 % loss.
pub const BBR_OVERESTIMATE_FACTOR: f64 = 3.0;
/// How long the rate the link delivered when the sender last filled it
/// stays the starting point of a seek (see `Bbr::on_new_transfer`). A link
/// rarely loses two thirds of its rate within this long, and short of that
/// pacing at the remembered rate overshoots less than startup does.
pub const BBR_LINK_RATE_LIFETIME: Duration = Duration::from_secs(30);
/// A heavy-loss round lowers the remembered link rate only when the
/// estimate stood at least at this share of it: sent at a lower rate, the
/// round says nothing about the link, and random loss trips a round in a
/// few dozen, so a looser test ratcheted the rate down round after round
/// while playback let the estimate decay (a simulated seek then started
/// at a quarter of the link).
pub const BBR_LINK_RATE_LOSS_SHARE: f64 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BbrMode {
    Startup,
    Drain,
    ProbeBw,
}

/// The best delivery rate of the last rounds: (round, best rate of that
/// round), one entry per round, so at most the window's rounds (ACKs on a
/// fast link come by the thousand per round). The maximum is kept, not
/// searched for: the window, the pacing rate and the BDP read it several
/// times per ACK and per send.
#[derive(Debug, Clone, Default)]
struct MaxBwFilter {
    samples: std::collections::VecDeque<(u64, f64)>,
    max: f64,
}

impl MaxBwFilter {
    fn max(&self) -> f64 {
        self.max
    }

    /// Adds `rate`, measured in `round`, and forgets rounds before `oldest`.
    fn add(&mut self, round: u64, rate: f64, oldest: u64) {
        match self.samples.back_mut() {
            Some((r, best)) if *r == round => *best = best.max(rate),
            _ => self.samples.push_back((round, rate)),
        }
        while self.samples.front().is_some_and(|&(r, _)| r < oldest) {
            self.samples.pop_front();
        }
        self.refresh();
    }

    /// Lowers every sample to at most `ceiling`.
    fn cap(&mut self, ceiling: f64) {
        for (_, rate) in self.samples.iter_mut() {
            *rate = rate.min(ceiling);
        }
        self.refresh();
    }

    fn clear(&mut self) {
        self.samples.clear();
        self.max = 0.0;
    }

    fn refresh(&mut self) {
        self.max = self.samples.iter().map(|&(_, r)| r).fold(0.0, f64::max);
    }
}

#[derive(Debug, Clone)]
pub struct Bbr {
    max_datagram: u64,
    mode: BbrMode,
    bw_samples: MaxBwFilter,
    min_rtt: Option<(Duration, Instant)>,
    round: u64,
    next_round_delivered: u64,
    round_lost: u64,
    round_delivered: u64,
    /// When the current round began (the ACK that started it).
    round_started: Option<Instant>,
    /// Some ACK of the current round was for a packet sent while the
    /// sender had nothing more it could send (the receive window held it).
    round_app_limited: bool,
    full_bw: f64,
    full_bw_rounds: u32,
    cycle_index: usize,
    cycle_start: Option<Instant>,
    current_rtt: Duration,
    window: u64,
    /// Upper bound on the rate after a heavily lossy round.
    bw_cap: Option<f64>,
    /// Heavily lossy rounds since startup last probed.
    heavy_loss_rounds: u32,
    queue_standing: bool,
    /// Smallest RTT sample of the current round and how many were seen.
    round_min_rtt: Option<Duration>,
    round_rtt_samples: u32,
    /// The previous round's smallest sample, if it had enough samples.
    last_round_min_rtt: Option<Duration>,
    /// The estimate when ProbeBW's up-phase began.
    probe_base_bw: Option<f64>,
    /// The rate the link delivered when the sender last filled it (the
    /// estimate on a busy ACK in ProbeBW), and when: playback at the
    /// media's rate lets the estimate decay, a seek wants this.
    link_rate: Option<(f64, Instant)>,
    /// The current ACK-aggregation epoch: when it began and what was
    /// acknowledged since.
    ack_epoch: Option<(Instant, u64)>,
    /// The most acknowledged beyond the estimated rate in one epoch, for
    /// the current and the previous half of [`BBR_EXTRA_ACKED_ROUNDS`],
    /// the current half's index and the round it began.
    extra_acked: [u64; 2],
    extra_acked_half: usize,
    extra_acked_round: u64,
    /// Bytes lost and acknowledged in those halves.
    half_lost: [u64; 2],
    half_acked: [u64; 2],
    /// When a half last ended with more than [`BBR_EXTRA_ACKED_MAX_LOSS`].
    lossy_half_at: Option<Instant>,
    /// What the window adds for ACKs that come in bunches, as of the last ACK.
    aggregation_allowance: u64,
    /// The estimate was found at the link's limit: startup ended on a
    /// plateau or a growing queue. A startup cut short by a lossy round
    /// (random loss can do that) leaves the estimate below the link, and a
    /// seek probes again. A ProbeBW up-phase that found no room does not
    /// confirm it: during playback its ACKs are a short burst's, after the
    /// window opened, and a simulated seek cruised at a quarter of the link.
    link_rate_confirmed: bool,
    /// The state a persistent congestion reset, until the first ACK after
    /// it tells whether the congestion was real.
    before_persistent_congestion: Option<Box<Bbr>>,
    /// [`Bbr::compute_pacing_rate`] as of the last event.
    pacing_rate: Option<f64>,
}

impl Bbr {
    pub fn new(max_datagram: u64) -> Self {
        Bbr {
            max_datagram,
            mode: BbrMode::Startup,
            bw_samples: Default::default(),
            min_rtt: None,
            round: 0,
            next_round_delivered: 0,
            round_lost: 0,
            round_delivered: 0,
            round_started: None,
            round_app_limited: false,
            full_bw: 0.0,
            full_bw_rounds: 0,
            cycle_index: 0,
            cycle_start: None,
            current_rtt: super::rtt::INITIAL_RTT,
            window: INITIAL_WINDOW_PACKETS * max_datagram,
            bw_cap: None,
            heavy_loss_rounds: 0,
            queue_standing: false,
            round_min_rtt: None,
            round_rtt_samples: 0,
            last_round_min_rtt: None,
            probe_base_bw: None,
            link_rate: None,
            link_rate_confirmed: false,
            before_persistent_congestion: None,
            ack_epoch: None,
            extra_acked: [0; 2],
            extra_acked_half: 0,
            extra_acked_round: 0,
            half_lost: [0; 2],
            half_acked: [0; 2],
            lossy_half_at: None,
            aggregation_allowance: 0,
            pacing_rate: None,
        }
    }

    /// Measures how far ACKs run ahead of the estimated rate when they
    /// come in bunches (Linux BBR's `extra_acked`). A receiver that takes
    /// its datagrams every 20 ms (a busy machine, a Wi-Fi link that
    /// aggregates) acknowledges 20 ms of data at once, then nothing: with a
    /// window of twice the BDP at the 2 ms minimum RTT the sender waited
    /// out most of each 20 ms, the delivery rate it then measured lowered
    /// the estimate and the window with it, and a 50 Mbit/s link carried 4.
    fn update_ack_aggregation(&mut self, ack: &AckEvent) {
        let bw = self.bottleneck_bw();
        if bw <= 0.0 || ack.acked_bytes == 0 {
            return;
        }
        if self.round >= self.extra_acked_round + BBR_EXTRA_ACKED_ROUNDS / 2 {
            if self.half_lossy(self.extra_acked_half) {
                self.lossy_half_at = Some(ack.now);
            }
            self.extra_acked_round = self.round;
            self.extra_acked_half ^= 1;
            self.extra_acked[self.extra_acked_half] = 0;
            self.half_lost[self.extra_acked_half] = 0;
            self.half_acked[self.extra_acked_half] = 0;
        }
        self.half_acked[self.extra_acked_half] += ack.acked_bytes;
        let (start, acked) = self.ack_epoch.get_or_insert((ack.now, 0));
        let mut expected = bw * ack.now.saturating_duration_since(*start).as_secs_f64();
        // ACKs at or behind the rate: the bunch is over, a new epoch begins.
        if *acked as f64 <= expected {
            (*start, *acked, expected) = (ack.now, 0, 0.0);
        }
        *acked += ack.acked_bytes;
        let extra =
            (*acked as f64 - expected).clamp(0.0, bw * BBR_EXTRA_ACKED_MAX.as_secs_f64()) as u64;
        let extra = extra.min(self.window);
        let half = &mut self.extra_acked[self.extra_acked_half];
        *half = (*half).max(extra);
        self.aggregation_allowance = self.compute_aggregation_allowance(ack.now);
    }

    fn half_lossy(&self, half: usize) -> bool {
        let (lost, acked) = (self.half_lost[half], self.half_acked[half]);
        lost as f64 > (lost + acked) as f64 * BBR_EXTRA_ACKED_MAX_LOSS
    }

    /// The window's allowance for ACKs that come in bunches (none while
    /// the path loses, see [`BBR_EXTRA_ACKED_MAX_LOSS`]).
    fn compute_aggregation_allowance(&self, now: Instant) -> u64 {
        let lossy_lately = self
            .lossy_half_at
            .is_some_and(|at| now.saturating_duration_since(at) < BBR_EXTRA_ACKED_LOSS_MEMORY);
        if lossy_lately || self.half_lossy(0) || self.half_lossy(1) {
            return 0;
        }
        self.extra_acked[0].max(self.extra_acked[1])
    }

    /// The remembered link rate, if recent enough to start from.
    fn fresh_link_rate(&self, now: Instant) -> Option<f64> {
        self.link_rate
            .filter(|(_, at)| now.saturating_duration_since(*at) <= BBR_LINK_RATE_LIFETIME)
            .map(|(rate, _)| rate)
    }

    /// On a busy ACK in ProbeBW the estimate is the link's: remember it.
    /// A lower estimate does not replace a recent one: once playback let
    /// the estimate decay, the sender paces at it and delivers no more, so
    /// a busy ACK then shows the pacing, not the link. Only heavy loss at
    /// about the remembered rate lowers it (see `on_round_start`).
    fn remember_link_rate(&mut self, ack: &AckEvent) {
        if self.mode != BbrMode::ProbeBw || ack.app_limited {
            return;
        }
        let estimate = self.bottleneck_bw();
        if self.fresh_link_rate(ack.now).is_none_or(|r| estimate >= r) {
            self.link_rate = Some((estimate, ack.now));
        }
    }

    /// Probes for the link again from the current estimate, as at the start.
    fn restart_startup(&mut self) {
        self.mode = BbrMode::Startup;
        self.link_rate_confirmed = false;
        self.full_bw = 0.0;
        self.full_bw_rounds = 0;
        self.last_round_min_rtt = None;
    }

    /// ProbeBW's up-phase asks for 1.25× the estimate; its ACKs come back
    /// during the next phase. When that probe got nearly all it asked for,
    /// the link has room the estimate does not know (after a lossy spell
    /// or persistent congestion cut it), and 1.25× every eight rounds would
    /// take seconds to find it: probe as at the start. On a full link the
    /// probe only builds a queue and the estimate stays. Judged on the
    /// delivery samples, not the loss cap, whose own growth is no sign of
    /// room.
    fn judge_probe(&mut self, ack: &AckEvent) {
        match self.cycle_index {
            0 => self.probe_base_bw = Some(self.max_bw_sample()),
            2 => {
                let base = self.probe_base_bw.take();
                if let Some(base) = base.filter(|b| *b > 0.0) {
                    if !ack.app_limited && self.max_bw_sample() >= base * BBR_PROBE_ROOM_GROWTH {
                        self.bw_cap = None;
                        self.heavy_loss_rounds = 0;
                        self.restart_startup();
                    }
                }
            }
            _ => {}
        }
    }

    /// HyStart++'s test, at the end of a round in startup.
    fn round_delay_increased(&mut self) -> bool {
        let enough = self.round_rtt_samples >= BBR_STARTUP_DELAY_SAMPLES;
        let current = self.round_min_rtt.take().filter(|_| enough);
        self.round_rtt_samples = 0;
        let increased = match (current, self.last_round_min_rtt) {
            (Some(now), Some(before)) => {
                let eta = (before / 8).clamp(Duration::from_millis(4), Duration::from_millis(16));
                now >= before + eta
                    && self.window >= BBR_STARTUP_DELAY_MIN_WINDOW_PACKETS * self.max_datagram
            }
            _ => false,
        };
        if current.is_some() {
            self.last_round_min_rtt = current;
        }
        increased
    }

    pub fn mode(&self) -> BbrMode {
        self.mode
    }

    /// Bottleneck rate estimate, bytes per second.
    pub fn bottleneck_bw(&self) -> f64 {
        let bw = self.max_bw_sample();
        self.bw_cap.map_or(bw, |cap| bw.min(cap))
    }

    /// The best delivery rate of the window, ignoring any loss cap.
    fn max_bw_sample(&self) -> f64 {
        self.bw_samples.max()
    }

    /// The path's minimum RTT, never below one datagram's time at the
    /// bottleneck rate: a full datagram's round trip includes it, unless a
    /// token-bucket shaper let it through on stored tokens (100 µs where a
    /// 2 Mbit/s link takes 6 ms). Below it the BDP, ProbeBW's phases and
    /// the standing-queue test would all read a shaper as an empty LAN.
    fn min_rtt(&self) -> Duration {
        let measured = self.min_rtt.map_or(self.current_rtt, |(r, _)| r);
        let bw = self.bottleneck_bw();
        if bw <= 0.0 {
            return measured;
        }
        measured.max(Duration::from_secs_f64(
            (self.max_datagram as f64 / bw).min(1.0),
        ))
    }

    fn bdp(&self) -> u64 {
        (self.bottleneck_bw() * self.min_rtt().as_secs_f64()) as u64
    }

    fn pacing_gain(&self) -> f64 {
        match self.mode {
            BbrMode::Startup => BBR_HIGH_GAIN,
            BbrMode::Drain => 1.0 / BBR_HIGH_GAIN,
            // At the window's floor the queue is the floor's own (four
            // datagrams on a link whose BDP is one): pacing below the
            // rate would idle the link without draining anything.
            BbrMode::ProbeBw if self.queue_standing && self.target_window() > self.min_window() => {
                BBR_QUEUE_DRAIN_GAIN
            }
            BbrMode::ProbeBw => BBR_PACING_CYCLE[self.cycle_index],
        }
    }

    fn min_window(&self) -> u64 {
        BBR_MIN_WINDOW_PACKETS * self.max_datagram
    }

    fn target_window(&self) -> u64 {
        let gain = match self.mode {
            BbrMode::Startup | BbrMode::Drain => BBR_HIGH_GAIN,
            BbrMode::ProbeBw => BBR_CWND_GAIN,
        };
        // The receiver may hold an ACK back for up to its ACK delay, and the
        // drivers' timers tick in milliseconds: on a LAN, where the path's
        // round trip is tens of microseconds, a window of gain × BDP would be
        // the four-datagram floor, every loss would wait for a probe timeout
        // and the link would idle between ACKs. The window covers the rate
        // over that feedback delay too (at 20 Mbit/s it adds 15 KB on a LAN,
        // 52 KB on a 80 ms path).
        let feedback =
            (self.bottleneck_bw() * bbr_ack_feedback_delay(self.min_rtt()).as_secs_f64()) as u64;
        // Startup grows the window by what is acknowledged anyway.
        let aggregation = match self.mode {
            BbrMode::Startup => 0,
            _ => self.aggregation_allowance,
        };
        ((self.bdp() as f64 * gain) as u64 + feedback + aggregation)
            .clamp(self.min_window(), MAXIMUM_WINDOW_BYTES)
    }

    fn update_bw(&mut self, rate: RateSample) {
        let current = self.bottleneck_bw();
        // App-limited samples only count when they show more than we know.
        if rate.app_limited && rate.delivery_rate <= current {
            return;
        }
        self.bw_samples.add(
            self.round,
            rate.delivery_rate,
            self.round.saturating_sub(BBR_BW_WINDOW_ROUNDS),
        );
    }

    /// Behind a token-bucket shaper (tc tbf, an ISP's policer) the first
    /// datagrams after an idle spell leave at line rate: one delivered in
    /// 50 µs reads as 30 MB/s on a 2 Mbit/s link, and the max filter keeps
    /// that for ten rounds, so the window and pacing overflow the shaper's
    /// queue round after round (5 % of the datagrams lost through a 4 KB
    /// bucket at 2 Mbit/s, where the loss cap's floor could not bring it
    /// down). A busy round that lost packets tells the truth: cut every
    /// sample to a few times what it delivered.
    ///
    /// Judged only on a round of many datagrams (`judged`), as heavy loss
    /// is: a round of a few (a probe timeout's, a window-limited
    /// trickle's) says nothing about the link's rate. Nor on a round in
    /// which the receive window held the sender back: what it delivered
    /// over the round is the player's pace, not the link's. Judged on the
    /// ACK that ended it alone, a real-time viewer at 1 % loss had every
    /// sample cut to 3x its media rate, the server paced each window
    /// update at about that rate, the viewer measured its link at the
    /// media's rate, took it for a slow one and opened its window to
    /// 16 MiB (11 MiB wasted in the bench's 10 s stop, 1.45 without loss).
    fn forget_bursts(&mut self, ack: &AckEvent, judged: bool) {
        let Some(started) = self.round_started else {
            return;
        };
        let elapsed = ack.now.saturating_duration_since(started).as_secs_f64();
        if !judged || self.round_lost == 0 || self.round_app_limited || elapsed <= 0.0 {
            return;
        }
        let ceiling = self.round_delivered as f64 / elapsed * BBR_OVERESTIMATE_FACTOR;
        self.bw_samples.cap(ceiling);
    }

    fn on_round_start(&mut self, ack: &AckEvent) {
        self.round += 1;
        let was_probing = self.mode == BbrMode::ProbeBw;
        // A queue building up during startup means the rate was found:
        // leave before the queue overflows.
        if self.round_delay_increased() && self.mode == BbrMode::Startup && !ack.app_limited {
            self.mode = BbrMode::Drain;
            self.link_rate_confirmed = true;
        }
        let total = self.round_lost + self.round_delivered;
        let judged = total >= BBR_LOSS_MIN_PACKETS * self.max_datagram;
        self.forget_bursts(ack, judged);
        self.round_started = Some(ack.now);
        // Heavy loss in the round that just ended: congestion.
        let heavy = judged
            && self.round_lost as f64 / total as f64 > BBR_LOSS_THRESHOLD
            && (self.mode != BbrMode::Startup
                || self.round_lost >= BBR_STARTUP_LOSS_MIN_PACKETS * self.max_datagram);
        if heavy {
            let floor = BBR_MIN_WINDOW_PACKETS as f64 * self.max_datagram as f64
                / self.min_rtt().as_secs_f64().max(0.001);
            let before = self.bottleneck_bw();
            let cap = (before * BBR_LOSS_BETA).max(floor);
            self.bw_cap = Some(cap);
            // Only a busy round sent at about the remembered rate says the
            // link lost it. While playback holds the sender below the link
            // the estimate decays toward the media's rate, and at 10 %
            // random loss one round in a few dozen loses a fifth: cutting
            // the remembered rate to 0.7x a decayed estimate sent seeks
            // off at a third of the link.
            if let Some((rate, at)) = self
                .link_rate
                .as_mut()
                .filter(|(rate, _)| !ack.app_limited && before >= *rate * BBR_LINK_RATE_LOSS_SHARE)
            {
                if *rate > cap {
                    (*rate, *at) = (cap, ack.now);
                }
            }
            if self.mode == BbrMode::Startup {
                self.mode = BbrMode::Drain;
            }
        } else if let Some(cap) = self.bw_cap {
            let grown = cap * BBR_CAP_GROWTH;
            let uncapped = self.max_bw_sample();
            self.bw_cap = (grown < uncapped).then_some(grown);
        }
        // Startup's own overshoot is expected loss, not a lossy spell.
        if heavy && was_probing {
            self.heavy_loss_rounds += 1;
        } else if self.round_lost == 0 && self.heavy_loss_rounds >= BBR_REPROBE_ROUNDS {
            // A lossy spell cut the rate again and again; now a round went
            // by without loss, but the samples only know the cut rate, and
            // ProbeBW's 1.25× every eight rounds would take seconds to find
            // the link again: probe as at the start.
            self.heavy_loss_rounds = 0;
            self.bw_cap = None;
            self.restart_startup();
        }
        self.round_lost = 0;
        self.round_delivered = 0;
        self.round_app_limited = false;
        if self.mode == BbrMode::Startup && !ack.app_limited {
            let bw = self.bottleneck_bw();
            if bw >= self.full_bw * BBR_FULL_BW_GROWTH {
                self.full_bw = bw;
                self.full_bw_rounds = 0;
            } else {
                self.full_bw_rounds += 1;
                if self.full_bw_rounds >= BBR_FULL_BW_ROUNDS {
                    self.mode = BbrMode::Drain;
                    self.link_rate_confirmed = true;
                }
            }
        }
    }
}

/// The controller's reactions. Each is followed by a new pacing rate (see
/// the trait's implementation below).
impl Bbr {
    fn compute_pacing_rate(&self) -> Option<f64> {
        // Before any RTT sample the initial window leaves as one burst, as
        // TCP's and QUIC's do (RFC 9002 §7.7): spread over the 333 ms RTT
        // guess it took four times the real 80 ms round trip.
        self.min_rtt?;
        let rtt = self.current_rtt.as_secs_f64().max(0.001);
        let bw = self.bottleneck_bw();
        if self.mode == BbrMode::Startup {
            // Startup never paces below the initial window per round trip
            // (Linux BBR's rate from the initial window, which only rises in
            // startup): the first round's sample is what the handshake's
            // anti-amplification budget let out, two datagrams, and growing
            // 2.885× per round from there took ten round trips to fetch the
            // 20 KB `moov` of an MP4.
            let initial = (INITIAL_WINDOW_PACKETS * self.max_datagram) as f64;
            return Some(BBR_HIGH_GAIN * bw.max(initial / rtt));
        }
        if bw <= 0.0 {
            return Some(BBR_HIGH_GAIN * self.window as f64 / rtt);
        }
        // Never slower than the window's floor per round trip: below that
        // the floor, not the pacer, bounds what waits in a queue (it adds
        // at most the floor to one, as a window-limited sender would), and
        // a slower pacer starves the estimate of what would correct it.
        // Paced at a rate measured while a flood of junk held the server's
        // socket 250 ms behind, each datagram left alone and came back
        // within a fraction of that stale round-trip average: too short a
        // sample to count (`LossRecovery::on_ack_received`), one sample
        // per datagram to bring the average down, so the rate never rose
        // (2 MB at 3 KB/s over a loopback for five minutes).
        let floor = self.min_window() as f64 / rtt;
        Some((self.pacing_gain() * bw).max(floor))
    }

    fn react_to_ack(&mut self, ack: &AckEvent) {
        self.current_rtt = ack.current_rtt;
        if let Some(sample) = ack.rtt_sample {
            let expired = self
                .min_rtt
                .is_none_or(|(_, at)| ack.now.saturating_duration_since(at) > BBR_MIN_RTT_WINDOW);
            if expired || self.min_rtt.is_some_and(|(r, _)| sample <= r) {
                self.min_rtt = Some((sample, ack.now));
            }
        }
        self.round_delivered += ack.acked_bytes;
        self.round_app_limited |= ack.app_limited;
        if ack.prior_delivered >= self.next_round_delivered {
            self.next_round_delivered = ack.delivered;
            self.on_round_start(ack);
        }
        if let Some(rate) = ack.rate {
            self.update_bw(rate);
        }
        self.update_ack_aggregation(ack);
        if let Some(sample) = ack.rtt_sample {
            self.round_min_rtt = Some(self.round_min_rtt.map_or(sample, |m| m.min(sample)));
            self.round_rtt_samples += 1;
        }
        let min = self.min_rtt();
        self.queue_standing = self.min_rtt.is_some_and(|_| {
            ack.current_rtt.as_secs_f64() > min.as_secs_f64() * BBR_QUEUE_RTT_FACTOR
                && ack.current_rtt > min + Duration::from_millis(5)
        });
        match self.mode {
            BbrMode::Drain if ack.bytes_in_flight <= self.bdp() => {
                self.mode = BbrMode::ProbeBw;
                self.cycle_index = 2;
                self.cycle_start = Some(ack.now);
            }
            BbrMode::ProbeBw => {
                let phase = self.min_rtt().max(Duration::from_millis(1));
                if self
                    .cycle_start
                    .is_none_or(|s| ack.now.saturating_duration_since(s) >= phase)
                {
                    self.cycle_index = (self.cycle_index + 1) % BBR_PACING_CYCLE.len();
                    self.cycle_start = Some(ack.now);
                    self.judge_probe(ack);
                }
            }
            _ => {}
        }
        self.remember_link_rate(ack);
        let target = self.target_window();
        if self.mode == BbrMode::Startup || self.window < target {
            // Grow by what was acknowledged, as slow start does, up to the target.
            self.window = (self.window + ack.acked_bytes).min(target.max(self.window));
        } else {
            self.window = target;
        }
        self.window = self.window.clamp(self.min_window(), MAXIMUM_WINDOW_BYTES);
    }

    fn react_to_loss(&mut self, lost_bytes: u64) {
        self.round_lost += lost_bytes;
        self.half_lost[self.extra_acked_half] += lost_bytes;
    }

    fn react_to_new_transfer(&mut self, now: Instant) {
        // Playback keeps the sender window-limited, so the estimate only
        // knows the media's bitrate (app-limited samples never raise it
        // past what was sent); ProbeBW would take seconds to find the link
        // for the burst a seek needs. When the link's rate is known from
        // the last time the sender filled it, the seek cruises at it:
        // startup's 2.9x overshoot filled a 256 KB bottleneck queue in two
        // rounds, and each resend of the seek's lost datagrams waited
        // 60-100 ms behind it (seeks at 10 % loss took 2-3x the clean
        // time). Otherwise (no recent busy spell, or an estimate never
        // found at the link's limit) startup finds the rate in a few rounds.
        if self.mode != BbrMode::ProbeBw {
            return;
        }
        match self
            .fresh_link_rate(now)
            .filter(|_| self.link_rate_confirmed)
        {
            Some(rate) if rate > self.bottleneck_bw() => {
                self.bw_samples.clear();
                self.bw_samples.add(self.round, rate, self.round);
                self.bw_cap = None;
                self.cycle_index = 2;
                self.cycle_start = None;
                self.window = self.target_window().max(self.window);
            }
            Some(_) => {}
            None => self.restart_startup(),
        }
    }

    fn react_to_persistent_congestion(&mut self) {
        if self.before_persistent_congestion.is_none() {
            self.before_persistent_congestion = Some(Box::new(Bbr {
                before_persistent_congestion: None,
                ..self.clone()
            }));
        }
        self.link_rate_confirmed = false;
        self.extra_acked = [0; 2];
        self.ack_epoch = None;
        self.half_lost = [0; 2];
        self.half_acked = [0; 2];
        self.aggregation_allowance = 0;
        self.window = self.min_window();
        self.bw_samples.clear();
        self.full_bw = 0.0;
        self.full_bw_rounds = 0;
        self.mode = BbrMode::Startup;
    }

    fn react_to_persistent_congestion_ended(&mut self, spurious: bool) {
        let before = self.before_persistent_congestion.take();
        if let (true, Some(before)) = (spurious, before) {
            *self = *before;
            // The ACK that ends the silence acknowledges all of it at
            // once: no measure of how ACKs bunch.
            self.ack_epoch = None;
        }
    }
}

/// The pacing rate is computed once per event, when the state it depends
/// on changes, not on each send's question (`has_room_for` asks it for
/// every datagram, and each answer walked the target window: with 20
/// paced pulls `Bbr::target_window` alone was 1.3 % of the server's CPU).
impl CongestionController for Bbr {
    fn window(&self) -> u64 {
        self.window
    }

    fn pacing_rate(&self) -> Option<f64> {
        self.pacing_rate
    }

    fn on_ack(&mut self, ack: &AckEvent) {
        self.react_to_ack(ack);
        self.pacing_rate = self.compute_pacing_rate();
    }

    fn on_loss(&mut self, _now: Instant, lost_bytes: u64, _largest_lost_sent: Instant) {
        self.react_to_loss(lost_bytes);
        self.pacing_rate = self.compute_pacing_rate();
    }

    fn on_new_transfer(&mut self, now: Instant) {
        self.react_to_new_transfer(now);
        self.pacing_rate = self.compute_pacing_rate();
    }

    fn on_persistent_congestion(&mut self) {
        self.react_to_persistent_congestion();
        self.pacing_rate = self.compute_pacing_rate();
    }

    fn on_persistent_congestion_ended(&mut self, spurious: bool) {
        self.react_to_persistent_congestion_ended(spurious);
        self.pacing_rate = self.compute_pacing_rate();
    }

    fn set_max_datagram(&mut self, max_datagram: u64) {
        self.max_datagram = max_datagram;
        self.window = self.window.max(self.min_window());
        self.pacing_rate = self.compute_pacing_rate();
    }

    fn name(&self) -> &'static str {
        "bbr"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(now: Instant, bytes: u64, app_limited: bool) -> AckEvent {
        AckEvent {
            now,
            acked_bytes: bytes,
            largest_acked_sent: now,
            bytes_in_flight: 0,
            rtt_sample: Some(Duration::from_millis(50)),
            current_rtt: Duration::from_millis(50),
            rate: None,
            app_limited,
            delivered: 0,
            prior_delivered: 0,
        }
    }

    #[test]
    fn newreno_slow_start_then_halves_once_per_episode() {
        let t0 = Instant::now();
        let mut cc = NewReno::new(1000);
        assert_eq!(cc.window(), 10_000);
        cc.on_ack(&ack(t0, 10_000, false));
        assert_eq!(cc.window(), 20_000);
        let t1 = t0 + Duration::from_millis(10);
        cc.on_loss(t1, 1000, t0);
        assert_eq!(cc.window(), 10_000);
        // A second loss from the same flight does not halve again.
        cc.on_loss(t1 + Duration::from_millis(1), 1000, t0);
        assert_eq!(cc.window(), 10_000);
        let t2 = t1 + Duration::from_millis(20);
        cc.on_ack(&ack(t2, 10_000, false));
        assert_eq!(cc.window(), 11_000);
        cc.on_persistent_congestion();
        assert_eq!(cc.window(), 2_000);
        // App-limited ACKs do not grow the window.
        cc.on_ack(&ack(t2, 5_000, true));
        assert_eq!(cc.window(), 2_000);
    }

    #[test]
    fn a_persistent_congestion_the_next_ack_shows_spurious_is_undone() {
        let t0 = Instant::now();
        let mut cc = Bbr::new(1400);
        // 2.5 MB/s for 40 rounds: the estimate and window of a busy link.
        let now = steady(&mut cc, t0, 40, 2_500_000.0, 0.0);
        let (window, rate) = (cc.window(), cc.pacing_rate());
        assert!(window > 100_000, "{window}");
        // The ACKs stop (a burst of loss on the way back): three probe
        // timeouts, and the controller starts over...
        cc.on_persistent_congestion();
        assert_eq!(cc.window(), cc.min_window());
        // ... until the first ACK shows the packets got through.
        let mut undone = cc.clone();
        undone.on_persistent_congestion_ended(true);
        assert_eq!(undone.window(), window);
        assert_eq!(undone.pacing_rate(), rate);
        // A real congestion keeps the reset, and a later one is judged on
        // its own.
        cc.on_persistent_congestion_ended(false);
        assert_eq!(cc.window(), cc.min_window());
        cc.on_persistent_congestion_ended(true);
        assert_eq!(cc.window(), cc.min_window());
        steady(&mut cc, now, 40, 1_000_000.0, 0.0);
        let window = cc.window();
        cc.on_persistent_congestion();
        cc.on_persistent_congestion_ended(true);
        assert_eq!(cc.window(), window);
    }

    /// Feeds BBR one ACK per 50 ms round at a steady delivery rate.
    fn steady(cc: &mut Bbr, t0: Instant, rounds: u64, rate: f64, loss_share: f64) -> Instant {
        steady_at(cc, t0, rounds, rate, loss_share, Duration::from_millis(50))
    }

    /// Feeds BBR one ACK per round of `rtt` at a steady delivery rate.
    fn steady_at(
        cc: &mut Bbr,
        t0: Instant,
        rounds: u64,
        rate: f64,
        loss_share: f64,
        rtt: Duration,
    ) -> Instant {
        let per_round = (rate * rtt.as_secs_f64()) as u64;
        let mut delivered = cc.next_round_delivered;
        let mut now = t0;
        for _ in 0..rounds {
            now += rtt;
            let prior = delivered;
            delivered += per_round;
            cc.on_loss(now, (per_round as f64 * loss_share) as u64, now);
            cc.on_ack(&AckEvent {
                now,
                acked_bytes: per_round,
                largest_acked_sent: now - rtt,
                bytes_in_flight: per_round,
                rtt_sample: Some(rtt),
                current_rtt: rtt,
                rate: Some(RateSample {
                    delivery_rate: rate,
                    app_limited: false,
                }),
                app_limited: false,
                delivered,
                prior_delivered: prior,
            });
        }
        now
    }

    #[test]
    fn bbr_converges_on_the_delivery_rate_and_ignores_random_loss() {
        let t0 = Instant::now();
        let mut cc = Bbr::new(1400);
        let now = steady(&mut cc, t0, 20, 2_500_000.0, 0.0);
        assert_eq!(cc.mode(), BbrMode::ProbeBw);
        assert!((cc.bottleneck_bw() - 2_500_000.0).abs() < 1.0);
        let bdp = 2_500_000.0 * 0.05;
        let feedback =
            2_500_000.0 * bbr_ack_feedback_delay(Duration::from_millis(50)).as_secs_f64();
        // One ACK a round acknowledges a whole round's bytes at once, a
        // bunch the window allows for on top of twice the BDP.
        let bunch = bdp;
        assert!(
            (cc.window() as f64 - 2.0 * bdp - feedback - bunch).abs() < bdp * 0.1,
            "{}",
            cc.window()
        );
        // 10 % random loss leaves the estimate where it is.
        steady(&mut cc, now, 20, 2_500_000.0, 0.1);
        assert!((cc.bottleneck_bw() - 2_500_000.0).abs() < 1.0);
        let rate = cc.pacing_rate().expect("paces");
        assert!(rate > 0.7 * 2_500_000.0, "{rate}");
        // A path that loses gets no allowance for bunched ACKs: more in
        // flight would only overflow its queue more.
        assert!(
            (cc.window() as f64 - 2.0 * bdp - feedback).abs() < bdp * 0.1,
            "{}",
            cc.window()
        );
    }

    #[test]
    fn bbr_probes_as_at_the_start_when_the_link_shows_room() {
        let t0 = Instant::now();
        let mut cc = Bbr::new(1400);
        let mut now = steady(&mut cc, t0, 20, 1_000_000.0, 0.0);
        assert_eq!(cc.mode(), BbrMode::ProbeBw);
        // A full link: the up-phases find nothing more, ProbeBW stays.
        for _ in 0..16 {
            now = steady(&mut cc, now, 1, 1_000_000.0, 0.0);
            assert_eq!(cc.mode(), BbrMode::ProbeBw);
        }
        // The link has room (a lossy spell that cut the estimate ended):
        // delivery follows sending, so the next up-phase gets its 1.25×.
        let mut restarted = false;
        for _ in 0..16 {
            let rate = cc.pacing_rate().expect("paces").min(20_000_000.0);
            now = steady(&mut cc, now, 1, rate, 0.0);
            restarted |= cc.mode() == BbrMode::Startup;
        }
        assert!(restarted, "ProbeBW never went back to startup");
    }

    #[test]
    fn bbr_window_covers_the_ack_delay_on_a_lan() {
        // 60 µs round trips at 100 MB/s: the path's BDP is four datagrams,
        // but ACKs may come back 6 ms later; a window of four datagrams
        // would idle the link and leave every loss to a probe timeout.
        let t0 = Instant::now();
        let mut cc = Bbr::new(1400);
        let rate = 100_000_000.0;
        steady_at(&mut cc, t0, 200, rate, 0.0, Duration::from_micros(60));
        let over_feedback = rate * bbr_ack_feedback_delay(Duration::from_micros(60)).as_secs_f64();
        assert!(cc.window() as f64 >= over_feedback, "{}", cc.window());
    }

    /// Startup rounds of `per_round` ACKs of 1400 bytes, the rate doubling
    /// each round; `rtt(round, i)` gives each ACK's sample.
    fn startup_rounds(
        cc: &mut Bbr,
        rounds: u64,
        per_round: u64,
        rtt: impl Fn(u64, u64) -> Duration,
    ) {
        let mut now = Instant::now();
        let mut delivered = 0;
        for round in 0..rounds {
            let round_start = delivered;
            for i in 0..per_round {
                now += Duration::from_millis(80) / per_round as u32;
                delivered += 1400;
                cc.on_ack(&AckEvent {
                    now,
                    acked_bytes: 1400,
                    largest_acked_sent: now,
                    bytes_in_flight: 0,
                    rtt_sample: Some(rtt(round, i)),
                    current_rtt: Duration::from_millis(80),
                    rate: Some(RateSample {
                        delivery_rate: 100_000.0 * 2f64.powi(round as i32),
                        app_limited: false,
                    }),
                    app_limited: false,
                    delivered,
                    prior_delivered: if i == 0 {
                        round_start.max(1)
                    } else {
                        round_start
                    },
                });
            }
        }
    }

    #[test]
    fn bbr_startup_survives_late_acks_and_leaves_on_a_growing_queue() {
        // A busy receiver: three ACKs of every round come 12 ms late. The
        // round's smallest sample does not move: still startup.
        let mut cc = Bbr::new(1400);
        startup_rounds(&mut cc, 6, 20, |_, i| {
            Duration::from_millis(if i < 3 { 92 } else { 80 })
        });
        assert_eq!(cc.mode(), BbrMode::Startup);
        // A queue: from round 4 on every sample is 15 ms later than before.
        let mut cc = Bbr::new(1400);
        startup_rounds(&mut cc, 6, 20, |round, _| {
            Duration::from_millis(if round >= 4 { 95 } else { 80 })
        });
        assert_ne!(cc.mode(), BbrMode::Startup);
    }

    #[test]
    fn bbr_seek_starts_at_the_link_rate_it_knew_not_at_a_decayed_estimate() {
        let rtt = Duration::from_millis(50);
        let t0 = Instant::now();
        let mut cc = Bbr::new(1400);
        let now = steady(&mut cc, t0, 20, 2_500_000.0, 0.0);
        assert_eq!(cc.mode(), BbrMode::ProbeBw);
        // Playback: the sender delivers the media's rate and the estimate
        // follows it down; then a round at that rate loses two fifths.
        let now = steady_at(&mut cc, now, 15, 800_000.0, 0.0, rtt);
        let now = steady_at(&mut cc, now, 2, 800_000.0, 0.4, rtt);
        assert!(cc.bottleneck_bw() < 800_000.0, "{}", cc.bottleneck_bw());
        cc.on_new_transfer(now);
        assert_eq!(cc.mode(), BbrMode::ProbeBw);
        assert!(
            (cc.bottleneck_bw() - 2_500_000.0).abs() < 1.0,
            "{}",
            cc.bottleneck_bw()
        );
        let pacing = cc.pacing_rate().expect("paces");
        assert!(pacing <= 2_500_000.0 * 1.01, "{pacing}");
        // Heavy loss at the link's own rate lowers what the next seek
        // starts at.
        let now = steady_at(&mut cc, now, 2, 2_500_000.0, 0.4, rtt);
        cc.on_new_transfer(now);
        assert!(
            cc.bottleneck_bw() <= 2_500_000.0 * BBR_LOSS_BETA + 1.0,
            "{}",
            cc.bottleneck_bw()
        );
        // Long after the last busy spell, a seek probes as at the start.
        cc.on_new_transfer(now + BBR_LINK_RATE_LIFETIME + Duration::from_secs(1));
        assert_eq!(cc.mode(), BbrMode::Startup);
    }

    #[test]
    fn bbr_startup_is_not_ended_by_chance_loss_in_a_small_round_but_is_by_an_overflow() {
        let t0 = Instant::now();
        let mut cc = Bbr::new(1400);
        let small = 25.0 * 1400.0 / 0.05;
        let now = steady(&mut cc, t0, 1, small, 0.0);
        // 25 datagrams delivered and 7 lost (23 %): 10 % random loss does
        // that to one round of this size in about twenty.
        let now = steady(&mut cc, now, 1, small, 0.3);
        assert_eq!(cc.mode(), BbrMode::Startup);
        assert!(cc.bw_cap.is_none());
        // 100 delivered and 40 lost: the queue startup overfilled.
        steady(&mut cc, now, 1, 100.0 * 1400.0 / 0.05, 0.4);
        assert_ne!(cc.mode(), BbrMode::Startup);
    }

    #[test]
    fn bbr_backs_off_on_heavy_loss() {
        let t0 = Instant::now();
        let mut cc = Bbr::new(1400);
        let now = steady(&mut cc, t0, 20, 2_500_000.0, 0.0);
        steady(&mut cc, now, 2, 2_500_000.0, 0.4);
        assert!(
            cc.bottleneck_bw() < 2_500_000.0 * 0.8,
            "{}",
            cc.bottleneck_bw()
        );
    }
}
