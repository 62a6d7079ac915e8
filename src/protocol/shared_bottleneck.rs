//! Sessions to one client address share one rate: they most likely share
//! that client's bottleneck (a household's access link, one machine's
//! Wi-Fi, a load generator), as the streams of one QUIC connection share
//! one controller, and the Congestion Manager (RFC 3124) shares one among
//! a host's flows.
//!
//! Each session's controller alone cannot find its share of a drop-tail
//! queue it shares with many: every session sees the queue's loss rate
//! whatever its own rate, so congestion looks like the random loss a
//! session must ride out on Wi-Fi; a session's fair share is one or two
//! datagrams a round trip, too few to judge a round's loss on; and its
//! minimum RTT is taken with the queue already full. Sixteen
//! `gst-launch-1.0` pulls through one 20 Mbit/s link dropped 40 % of the
//! server's datagrams at its queue, 200 pulls through 200 Mbit/s 30-50 %.
//!
//! Together the group has what each lacks: its loss over an interval is
//! judged on many datagrams, its delivery rate is the bottleneck's when
//! the queue overflows, and its minimum RTT is the smallest any of its
//! sessions ever saw. When the group loses heavily, or loses at all while
//! even its best round trip shows a standing queue, and the losses are
//! spread over its sessions (one phone's bad Wi-Fi is not the household's
//! queue), its sessions' pacing rates together are capped a little below
//! what the group delivered, so the queue drains; each interval that
//! overflows nothing lets the cap grow again. Heavy loss that a cut did
//! not bring down is random, and cuts no more. The cap is shared out as
//! a water level: a session pacing below its share keeps its rate, the
//! others pace at the level.
//!
//! A group of one session is left to that session's controller.
//!
//! A server's serving threads share the groups ([`PeerGroups`]): the
//! kernel spreads one address's sessions over the threads by port, and
//! with a group per thread two pulls of sixteen from one machine, alone
//! on their thread, ran at three times the others' rate. Each thread
//! tallies its ACKs apart ([`ShardGroups`]) and takes the lock only to
//! hand its tallies over, every `BURST_FLOOR_REFRESH` (the server's).

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::address_map::AddressMap;
use super::pacing::MIN_BURST_PACKETS;

/// An interval lasts at least this long...
pub const GROUP_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// ...at least this many of the group's minimum RTTs (the losses a round
/// trip's sends cause are declared a round trip later)...
pub const GROUP_INTERVAL_RTTS: u32 = 2;
/// ...and is judged only once it acknowledged or lost this many
/// datagrams' bytes: fewer say nothing about a loss rate.
pub const GROUP_INTERVAL_MIN_PACKETS: u64 = 20;
/// An interval that lost more than this share of its bytes overflowed a
/// queue, whatever the delays say (unless the last such cut did not bring
/// the loss down, see `judge`): random loss a link is still worth using
/// for stays below it (the single session's
/// [`super::congestion::BBR_LOSS_THRESHOLD`], judged here on many more
/// datagrams).
pub const GROUP_HEAVY_LOSS: f64 = 0.2;
/// With a standing queue (see [`GROUP_QUEUE_DELAY`]) an interval that
/// lost more than this share overflowed it (BBRv2's loss threshold).
pub const GROUP_QUEUE_LOSS: f64 = 0.02;
/// The group's best round trip of an interval exceeds its minimum by at
/// least this much, and by a quarter of the minimum: a queue stood at the
/// bottleneck the whole interval. Random loss on an idle path leaves the
/// best sample near the minimum. (By half the minimum, sixteen pulls
/// through a 64 KB queue at 50 Mbit/s, 10 ms of queue on a 20 ms path,
/// never showed one, and the queue dropped 35 % of the server's
/// datagrams; 10 % with a quarter.)
pub const GROUP_QUEUE_DELAY: Duration = Duration::from_millis(5);
/// How long the group's minimum RTT stands (as BBR's).
pub const GROUP_MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// On an overflowing interval the cap is set to this share of what the
/// group delivered (the best of the last [`GROUP_DELIVERY_INTERVALS`]):
/// the rate the queue drains at, less enough to drain it (BBR's
/// standing-queue gain).
pub const GROUP_DRAIN_GAIN: f64 = 0.85;
/// The intervals whose best delivery rate is the bottleneck's. Losses are
/// declared a round trip or a timeout after their sends, so an interval
/// that delivered little can still count many: cut to its own delivery
/// rate the cap fell round after round to half a 10 Mbit/s link, whose
/// sessions could then not use even that.
pub const GROUP_DELIVERY_INTERVALS: usize = 8;
/// Each interval without overflow that used the cap lifts it this much.
/// An overflow is seen a round trip after it began, so the cap overshoots
/// by the growth of the intervals between: at 1.25 it swung between 0.85x
/// and 1.4x the link, and 200 pulls through one queue lost 9 % (7 % at
/// 1.1, at the same completion time).
pub const GROUP_CAP_GROWTH: f64 = 1.1;
/// A group nothing was heard of for this long is forgotten, even if a
/// serving thread that has gone idle still counts sessions in it.
pub const GROUP_FORGOTTEN_AFTER: Duration = Duration::from_secs(60);
/// A cut never takes the cap below this share of the group's best
/// delivery rate lately: a queue the group overflows drains well above it
/// (at 0.85x), while loss or delay that no cut can mend (Wi-Fi that drops
/// and jitters on every session of a household) would otherwise ratchet
/// the cap down to a stall.
pub const GROUP_CAP_FLOOR: f64 = 0.5;
/// A session that lost datagrams this recently counts as losing: an
/// overflow is judged only when at least two busy sessions of the group,
/// and half of them, are.
pub const GROUP_LOSS_SPREAD: Duration = Duration::from_secs(1);
/// A session whose client was not heard from for this many of its
/// path's probe timeouts (within [`GROUP_SILENT_FLOOR`] and
/// [`GROUP_SILENT_AFTER`]) is silent and left out of its group (see
/// `ServerEndpoint::refresh_group_windows`): a killed player's session,
/// sending into a dead address, held back the live ones of its host. A
/// live client answers a burst within one round trip and a probe within
/// two; at 1 s flat, a player opened right after four kills took 1.55 s
/// for its first megabyte, 0.75 s with this, 0.80 after four closes
/// (simulation
/// `players_killed_without_closing_do_not_hold_back_the_next_from_their_host`).
pub const GROUP_SILENT_PROBE_TIMEOUTS: u32 = 3;
/// See [`GROUP_SILENT_PROBE_TIMEOUTS`]: on a short path three probe
/// timeouts are tens of milliseconds, and a queue many sessions overfill
/// keeps live clients unheard that long (with 100 ms, 64 transfers from
/// one host through 10 Mbit/s had one silent for 3.0 s instead of 2.2).
pub const GROUP_SILENT_FLOOR: Duration = Duration::from_millis(300);
/// See [`GROUP_SILENT_PROBE_TIMEOUTS`].
pub const GROUP_SILENT_AFTER: Duration = Duration::from_secs(1);
/// While the cap binds, the group's window ([`SharedBottleneck::window`])
/// is its best delivery rate lately over its minimum RTT and this much
/// queue, times [`GROUP_WINDOW_GAIN`]. 200 pulls through a 200 Mbit/s
/// link and a 512 KB queue dropped 5.6-7.5 % with 5 ms at a gain of 1,
/// 7.1-8.1 % with 10 ms at 2 (at the same CPU and throughput).
pub const GROUP_WINDOW_QUEUE: Duration = Duration::from_millis(5);
pub const GROUP_WINDOW_GAIN: f64 = 1.0;
/// The group's window also covers this much lateness of the server's
/// turns, which its sessions then tolerate (see
/// `LossRecovery::tolerated_lateness_covering`) whatever their own round
/// trips: their sends wait for the group's window, not their own. Each
/// session's quarter RTT (1.1-2.1 ms at the least with 200 pulls through
/// one 200 Mbit/s link) held the server to a turn every 2 ms; with 4 ms
/// covered it turns every 4 ms (see the server's `turn_tick`): `load
/// shaped 200 200 4`, alternated, 5 Dec, 400 turns a second and 1.91-2.22
/// s/GB against 670-740 and 2.25-2.80, at the same throughput and drops.
/// A 4 ms tick without the window covering it idled the link: 180 Mbit/s
/// instead of 186.
pub const GROUP_TURN_LATENESS: Duration = Duration::from_millis(4);
/// The group's window is at least this many datagrams: four bursts.
pub const GROUP_WINDOW_MIN_PACKETS: u64 = 32;
/// The cap counts as used when the group sent this share of it (lost
/// datagrams included).
const GROUP_CAP_USED: f64 = 0.8;

/// One client address's shared rate.
#[derive(Debug, Clone)]
pub struct SharedBottleneck {
    max_datagram: u64,
    interval_start: Instant,
    acked: u64,
    lost: u64,
    interval_min_rtt: Option<Duration>,
    min_rtt: Option<(Duration, Instant)>,
    /// The delivery rates of the last intervals, the oldest overwritten.
    delivery: [f64; GROUP_DELIVERY_INTERVALS],
    intervals: usize,
    /// What the group's sessions may pace at together, bytes per second.
    cap: Option<f64>,
    /// The group's best delivery rate of an interval lately (within
    /// [`GROUP_MIN_RTT_WINDOW`]), and when.
    peak_delivery: Option<(f64, Instant)>,
    /// The loss share that last cut the cap on heavy loss alone, until
    /// an interval lost under half of it (see `judge`).
    heavy_cut_loss: Option<f64>,
    /// Each session's share of the cap (the water level), if it binds.
    level: Option<f64>,
    /// Sessions of the group, all threads together, as of each thread's
    /// last [`ShardGroups::refresh`], those of them busy, and those busy
    /// that lost datagrams lately.
    sessions: usize,
    busy: usize,
    lossy: usize,
    /// Each serving thread's sessions' demands, as of its last refresh.
    demands: Vec<Vec<SessionDemand>>,
    last_heard: Instant,
}

/// What one session wants and has: its controller's pacing rate,
/// whether it has data the window or pacing holds back (otherwise it is
/// bound by its reader, the player, and wants only what it used), and
/// whether it lost datagrams within [`GROUP_LOSS_SPREAD`].
#[derive(Debug, Clone, Copy)]
pub struct SessionDemand {
    pub pacing_rate: f64,
    pub busy: bool,
    pub lossy: bool,
}

impl SessionDemand {
    /// How many of `demands` have data for the network.
    fn busy_count(demands: &[SessionDemand]) -> usize {
        demands.iter().filter(|d| d.busy).count()
    }

    /// What the session is counted as wanting of the cap: a session its
    /// reader holds back wants no more than it has, and counting its
    /// controller's rate would keep for it a share it leaves unused (its
    /// controller's rate still bounds it).
    fn want(&self) -> f64 {
        if self.busy { self.pacing_rate } else { 0.0 }
    }
}

impl SharedBottleneck {
    fn new(now: Instant, max_datagram: u64) -> Self {
        SharedBottleneck {
            max_datagram,
            interval_start: now,
            acked: 0,
            lost: 0,
            interval_min_rtt: None,
            min_rtt: None,
            delivery: [0.0; GROUP_DELIVERY_INTERVALS],
            intervals: 0,
            cap: None,
            heavy_cut_loss: None,
            peak_delivery: None,
            level: None,
            sessions: 0,
            busy: 0,
            lossy: 0,
            demands: Vec::new(),
            last_heard: now,
        }
    }

    fn on_ack(&mut self, now: Instant, acked: u64, lost: u64, rtt: Option<Duration>) {
        self.last_heard = now;
        self.acked += acked;
        self.lost += lost;
        if let Some(sample) = rtt {
            self.interval_min_rtt = Some(self.interval_min_rtt.map_or(sample, |m| m.min(sample)));
            let expired = self
                .min_rtt
                .is_none_or(|(_, at)| now.saturating_duration_since(at) > GROUP_MIN_RTT_WINDOW);
            if expired || self.min_rtt.is_some_and(|(m, _)| sample <= m) {
                self.min_rtt = Some((sample, now));
            }
        }
    }

    fn interval(&self) -> Duration {
        self.min_rtt
            .map_or(GROUP_INTERVAL_MIN, |(m, _)| m * GROUP_INTERVAL_RTTS)
            .max(GROUP_INTERVAL_MIN)
    }

    /// The interval's best round trip was well above the group's best.
    fn queue_standing(&self) -> bool {
        match (self.interval_min_rtt, self.min_rtt) {
            (Some(best), Some((min, _))) => best > min + GROUP_QUEUE_DELAY.max(min / 4),
            _ => false,
        }
    }

    /// Judges the interval if it is over and sets the cap for the next.
    fn judge(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.interval_start);
        let total = self.acked + self.lost;
        if elapsed < self.interval() || total < GROUP_INTERVAL_MIN_PACKETS * self.max_datagram {
            return;
        }
        let loss = self.lost as f64 / total as f64;
        let delivered = self.acked as f64 / elapsed.as_secs_f64();
        self.delivery[self.intervals % GROUP_DELIVERY_INTERVALS] = delivered;
        self.intervals += 1;
        let expired = self
            .peak_delivery
            .is_none_or(|(_, at)| now.saturating_duration_since(at) > GROUP_MIN_RTT_WINDOW);
        if expired || self.peak_delivery.is_some_and(|(p, _)| delivered >= p) {
            self.peak_delivery = Some((delivered, now));
        }
        // A queue the group overflows drops some of every busy session's
        // datagrams; one session's bad last hop (a phone's Wi-Fi behind
        // the household's NAT) loses only its own. Capped for it, the
        // group held a clean pull at 20 Mbit/s to 0.7x its rate, and the
        // lossy one's to a sixth. Heavy loss alone cuts again only once
        // an interval lost little since the last such cut: a cut drains
        // the queue a group overflowed, and its loss falls; loss that
        // stays heavy is random (two pulls through Wi-Fi that drops 30 %,
        // cut interval after interval, stalled).
        let spread = self.lossy >= 2 && self.lossy * 2 >= self.busy;
        let heavy = loss > GROUP_HEAVY_LOSS && self.heavy_cut_loss.is_none();
        let overflow = self.sessions >= 2
            && spread
            && (heavy || (loss > GROUP_QUEUE_LOSS && self.queue_standing()));
        if overflow && heavy {
            self.heavy_cut_loss = Some(loss);
        } else if self
            .heavy_cut_loss
            .is_some_and(|at_cut| loss < at_cut / 2.0)
        {
            self.heavy_cut_loss = None;
        }
        // Used: the group sent about its cap, what was lost included (at
        // 30 % random loss what it delivered never reached 0.8x the cap,
        // which then never grew again).
        let offered = total as f64 / elapsed.as_secs_f64();
        let used = self.cap.is_some_and(|c| offered >= c * GROUP_CAP_USED);
        if overflow {
            let best = self.delivery.iter().copied().fold(0.0, f64::max);
            let floor = self.peak_delivery.map_or(0.0, |(p, _)| p * GROUP_CAP_FLOOR);
            self.cap = Some((best * GROUP_DRAIN_GAIN).max(floor));
        } else if let (Some(cap), true) = (self.cap, used) {
            self.cap = Some(cap * GROUP_CAP_GROWTH);
        }
        self.interval_start = now;
        self.acked = 0;
        self.lost = 0;
        self.interval_min_rtt = None;
    }

    /// Shares the cap out among `demands` (the group's sessions): the
    /// level at which the sessions' rates, each at most the level, add up
    /// to the cap. When they want less than the cap altogether, it does not
    /// bind. (Holding each session to 1.25x an even share of it even then,
    /// for fairness among the pulls, left the link a sixth idle: sixteen
    /// pulls through one 50 Mbit/s proxy ended after 91 s instead of 84.)
    fn share_out(&mut self, demands: &mut [f64]) {
        self.level = None;
        let Some(cap) = self.cap else {
            return;
        };
        if self.sessions < 2 {
            return;
        }
        if demands.iter().sum::<f64>() <= cap {
            // The cap stays, the bottleneck's rate as last found: dropped
            // whenever the busy sessions wanted less (at 200 pulls' start
            // many wait on probe timeouts), it let them all burst into the
            // full queue again.
            return;
        }
        demands.sort_by(|a, b| a.total_cmp(b));
        let mut left = cap;
        let mut others = demands.len();
        for &d in demands.iter() {
            let even = left / others as f64;
            if d >= even {
                self.level = Some(even);
                return;
            }
            left -= d;
            others -= 1;
        }
    }

    /// The most one session of the group may pace at, if the cap binds.
    pub fn level(&self) -> Option<f64> {
        self.level
    }

    pub fn cap(&self) -> Option<f64> {
        self.cap
    }

    /// The most the group may have in flight, while its cap binds (see
    /// `ServerEndpoint::refresh_group_windows` for when it is used).
    pub fn window(&self) -> Option<u64> {
        self.level?;
        let (peak, _) = self.peak_delivery?;
        let (min_rtt, _) = self.min_rtt?;
        let bytes = GROUP_WINDOW_GAIN
            * peak
            * (min_rtt + GROUP_WINDOW_QUEUE + GROUP_TURN_LATENESS).as_secs_f64();
        Some((bytes as u64).max(GROUP_WINDOW_MIN_PACKETS * self.max_datagram))
    }
}

/// What one serving thread heard of one address since it last handed over.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    /// When the first of it was heard.
    since: Option<Instant>,
    max_datagram: u64,
    acked: u64,
    lost: u64,
    best_rtt: Option<Duration>,
}

/// The shared rates of a server's client addresses, for all its serving
/// threads.
#[derive(Debug, Default)]
pub struct PeerGroups {
    groups: Mutex<AddressMap<SharedBottleneck>>,
}

impl PeerGroups {
    fn groups(&self) -> MutexGuard<'_, AddressMap<SharedBottleneck>> {
        // Each group is only ever changed whole by one refresh: a holder
        // that panicked leaves nothing half-done that matters.
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group of `ip`, if one is kept.
    pub fn group(&self, ip: IpAddr) -> Option<SharedBottleneck> {
        self.groups().get(&ip).cloned()
    }
}

/// One serving thread's side of the [`PeerGroups`]: its tallies since it
/// last handed over, and the levels it read then.
#[derive(Debug)]
pub struct ShardGroups {
    shared: Arc<PeerGroups>,
    index: usize,
    tallies: AddressMap<Tally>,
    demands: AddressMap<Vec<SessionDemand>>,
    levels: AddressMap<f64>,
    windows: AddressMap<u64>,
    all_demands: Vec<SessionDemand>,
    wants: Vec<f64>,
}

impl ShardGroups {
    /// Serving thread `index`'s view of `shared`.
    pub fn new(shared: Arc<PeerGroups>, index: usize) -> Self {
        ShardGroups {
            shared,
            index,
            tallies: AddressMap::default(),
            demands: AddressMap::default(),
            levels: AddressMap::default(),
            windows: AddressMap::default(),
            all_demands: Vec::new(),
            wants: Vec::new(),
        }
    }

    /// What one ACK (or loss timer) of a session to `ip` acknowledged and
    /// declared lost, with its RTT sample.
    pub fn on_ack(
        &mut self,
        now: Instant,
        ip: IpAddr,
        max_datagram: u64,
        acked: u64,
        lost: u64,
        rtt: Option<Duration>,
    ) {
        if acked == 0 && lost == 0 {
            return;
        }
        let t = self.tallies.entry(ip).or_default();
        t.since.get_or_insert(now);
        t.max_datagram = max_datagram;
        t.acked += acked;
        t.lost += lost;
        if let Some(sample) = rtt {
            t.best_rtt = Some(t.best_rtt.map_or(sample, |b| b.min(sample)));
        }
    }

    /// Hands this thread's tallies and its sessions' demands over, judges
    /// the groups whose interval ended and shares their caps out.
    /// `sessions`: each of this thread's sessions' address and demand. A
    /// group none of whose sessions remain on any thread is forgotten.
    pub fn refresh(
        &mut self,
        now: Instant,
        sessions: impl Iterator<Item = (IpAddr, SessionDemand)>,
    ) {
        for d in self.demands.values_mut() {
            d.clear();
        }
        for (ip, demand) in sessions {
            self.demands.entry(ip).or_default().push(demand);
        }
        self.demands.retain(|_, d| !d.is_empty());
        self.levels.clear();
        self.windows.clear();
        let index = self.index;
        let mut groups = self.shared.groups();
        for (ip, t) in self.tallies.drain() {
            groups
                .entry(ip)
                .or_insert_with(|| SharedBottleneck::new(t.since.unwrap_or(now), t.max_datagram))
                .on_ack(now, t.acked, t.lost, t.best_rtt);
        }
        let (all, wants) = (&mut self.all_demands, &mut self.wants);
        let (demands, levels, windows) = (&mut self.demands, &mut self.levels, &mut self.windows);
        groups.retain(|ip, g| {
            if g.demands.len() <= index {
                g.demands.resize_with(index + 1, Vec::new);
            }
            let mine = &mut g.demands[index];
            mine.clear();
            if let Some(d) = demands.get(ip) {
                mine.extend_from_slice(d);
            }
            all.clear();
            for d in &g.demands {
                all.extend_from_slice(d);
            }
            if all.is_empty() || now.saturating_duration_since(g.last_heard) > GROUP_FORGOTTEN_AFTER
            {
                return false;
            }
            g.sessions = all.len();
            g.busy = SessionDemand::busy_count(all);
            g.lossy = all.iter().filter(|d| d.busy && d.lossy).count();
            g.judge(now);
            wants.clear();
            wants.extend(all.iter().map(SessionDemand::want));
            g.share_out(wants);
            if let (Some(level), true) = (g.level, demands.contains_key(ip)) {
                levels.insert(*ip, level);
                if let Some(w) = g.window() {
                    // This thread's share: its busy sessions', and room
                    // for two bursts whatever the share.
                    let mine = demands.get(ip).map_or(0, |d| SessionDemand::busy_count(d));
                    let share = mine.max(1) as f64 / g.busy.max(1) as f64;
                    let least = 2 * MIN_BURST_PACKETS as u64 * g.max_datagram;
                    windows.insert(*ip, ((w as f64 * share) as u64).max(least));
                }
            }
            true
        });
    }

    /// The most one session to `ip` may pace at, if its group's cap binds
    /// (as of this thread's last refresh).
    pub fn level(&self, ip: IpAddr) -> Option<f64> {
        self.levels.get(&ip).copied()
    }

    /// Whether any address's group has a level (a cap that binds).
    pub fn any_level(&self) -> bool {
        !self.levels.is_empty()
    }

    /// The most this thread's sessions to `ip` may have in flight
    /// together, if their group's cap binds: its share of the group's
    /// window (as of this thread's last refresh).
    pub fn window(&self, ip: IpAddr) -> Option<u64> {
        self.windows.get(&ip).copied()
    }

    /// Each address whose group's cap binds, with this thread's share of
    /// its window and its level.
    pub fn windows(&self) -> impl Iterator<Item = (IpAddr, u64, f64)> + '_ {
        self.windows
            .iter()
            .filter_map(|(&ip, &w)| Some((ip, w, self.level(ip)?)))
    }

    /// This thread's sessions to `ip` with data for the network, as of its
    /// last refresh.
    pub fn busy_here(&self, ip: IpAddr) -> usize {
        self.demands
            .get(&ip)
            .map_or(0, |d| SessionDemand::busy_count(d))
    }

    pub fn shared(&self) -> &Arc<PeerGroups> {
        &self.shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u64 = 1400;

    fn ip() -> IpAddr {
        IpAddr::from([10, 0, 0, 2])
    }

    /// The cap of the group of `ip()`, as all threads see it.
    fn cap(groups: &ShardGroups) -> Option<f64> {
        groups.shared().group(ip()).and_then(|g| g.cap())
    }

    fn busy(rate: f64, n: usize) -> Vec<(IpAddr, SessionDemand)> {
        (0..n)
            .map(|_| {
                (
                    ip(),
                    SessionDemand {
                        pacing_rate: rate,
                        busy: true,
                        lossy: true,
                    },
                )
            })
            .collect()
    }

    /// One interval of 20 ms at `rtt`: `acked` and `lost` datagrams.
    fn interval(
        groups: &mut ShardGroups,
        now: &mut Instant,
        acked: u64,
        lost: u64,
        rtt: Duration,
        sessions: &[(IpAddr, SessionDemand)],
    ) {
        groups.on_ack(*now, ip(), MTU, acked * MTU, lost * MTU, Some(rtt));
        *now += Duration::from_millis(20);
        groups.refresh(*now, sessions.iter().copied());
    }

    #[test]
    fn heavy_loss_caps_the_group_below_what_it_delivered_and_shares_it_evenly() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        let sessions = busy(1e6, 10);
        // 600 datagrams delivered in 20 ms (42 MB/s), 400 lost: 40 %.
        interval(
            &mut groups,
            &mut now,
            600,
            400,
            Duration::from_millis(5),
            &sessions,
        );
        let first = cap(&groups).expect("capped");
        let delivered = 600.0 * MTU as f64 / 0.020;
        assert!(
            (first - delivered * GROUP_DRAIN_GAIN).abs() < 1.0,
            "cap {first}"
        );
        // Ten sessions each wanting 1 MB/s want less than the cap: it does
        // not bind, but stays.
        assert_eq!(groups.level(ip()), None);
        assert_eq!(cap(&groups), Some(first));
        // Wanting 10 MB/s each, they share it evenly. The loss stayed as
        // heavy after the cut: random, not the group's doing, so no new
        // cut; the group sent about its cap, which grows.
        let sessions = busy(10e6, 10);
        interval(
            &mut groups,
            &mut now,
            600,
            400,
            Duration::from_millis(5),
            &sessions,
        );
        let level = groups.level(ip()).expect("binds");
        assert!((level - first * GROUP_CAP_GROWTH / 10.0).abs() < 1.0);
    }

    #[test]
    fn a_bound_groups_window_is_its_delivery_over_its_round_trip_and_some_queue() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        let rtt = Duration::from_millis(5);
        // Capped, but wanting less than the cap: no window.
        interval(&mut groups, &mut now, 600, 400, rtt, &busy(1e6, 10));
        assert_eq!(groups.window(ip()), None);
        // Bound: what it delivered (42 MB/s) over its round trip and the
        // queue it may keep.
        interval(&mut groups, &mut now, 600, 400, rtt, &busy(10e6, 10));
        assert!(groups.level(ip()).is_some());
        let delivered = 600.0 * MTU as f64 / 0.020;
        let expected = delivered
            * (rtt + GROUP_WINDOW_QUEUE + GROUP_TURN_LATENESS).as_secs_f64()
            * GROUP_WINDOW_GAIN;
        let window = groups.window(ip()).expect("a window") as f64;
        assert!(
            (window - expected).abs() < 2.0,
            "{window} against {expected}"
        );
        // A slow group's window is still some bursts deep.
        let mut now = Instant::now();
        let mut slow = ShardGroups::new(Arc::default(), 0);
        interval(&mut slow, &mut now, 30, 20, rtt, &busy(1e3, 10));
        interval(&mut slow, &mut now, 30, 20, rtt, &busy(1e6, 10));
        assert_eq!(slow.window(ip()), Some(GROUP_WINDOW_MIN_PACKETS * MTU));
    }

    #[test]
    fn heavy_loss_cuts_again_once_a_cut_has_brought_the_loss_down() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        let sessions = busy(10e6, 10);
        let rtt = Duration::from_millis(5);
        interval(&mut groups, &mut now, 600, 400, rtt, &sessions);
        let first = cap(&groups).expect("capped");
        // The queue drained: 5 % lost, under half of the 40 % that cut.
        interval(&mut groups, &mut now, 570, 30, rtt, &sessions);
        let grown = cap(&groups).expect("capped");
        assert!(grown > first);
        // Overflowing again: cut again, to 0.85x the best delivery.
        interval(&mut groups, &mut now, 300, 200, rtt, &sessions);
        let best = 600.0 * MTU as f64 / 0.020;
        assert_eq!(cap(&groups), Some(best * GROUP_DRAIN_GAIN));
    }

    #[test]
    fn one_sessions_losses_are_not_its_hosts_congestion() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        // One of two busy sessions loses (a phone on bad Wi-Fi); the
        // other, through the same link, does not.
        let mut sessions = busy(10e6, 2);
        sessions[1].1.lossy = false;
        for _ in 0..10 {
            interval(
                &mut groups,
                &mut now,
                600,
                400,
                Duration::from_millis(5),
                &sessions,
            );
            assert_eq!(cap(&groups), None);
        }
    }

    #[test]
    fn random_loss_on_an_idle_path_does_not_cap_the_group() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        let sessions = busy(10e6, 4);
        // 10 % loss, every interval's best round trip at the path's.
        for _ in 0..50 {
            interval(
                &mut groups,
                &mut now,
                90,
                10,
                Duration::from_millis(20),
                &sessions,
            );
            assert_eq!(cap(&groups), None);
        }
    }

    #[test]
    fn light_loss_behind_a_standing_queue_caps_the_group() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        let sessions = busy(10e6, 4);
        interval(
            &mut groups,
            &mut now,
            100,
            0,
            Duration::from_millis(10),
            &sessions,
        );
        assert_eq!(cap(&groups), None);
        // 5 % loss with the best round trip 20 ms above the path's.
        interval(
            &mut groups,
            &mut now,
            95,
            5,
            Duration::from_millis(30),
            &sessions,
        );
        assert!(cap(&groups).is_some());
    }

    #[test]
    fn a_lone_session_is_left_to_its_own_controller() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        let sessions = busy(10e6, 1);
        interval(
            &mut groups,
            &mut now,
            50,
            50,
            Duration::from_millis(5),
            &sessions,
        );
        assert_eq!(cap(&groups), None);
        assert_eq!(groups.level(ip()), None);
    }

    #[test]
    fn the_cap_grows_back_once_the_group_loses_nothing_and_uses_it() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        let sessions = busy(10e6, 10);
        interval(
            &mut groups,
            &mut now,
            600,
            400,
            Duration::from_millis(5),
            &sessions,
        );
        let first = cap(&groups).expect("capped");
        // The group delivers its cap without loss: the cap grows.
        let at_cap = (first * 0.020 / MTU as f64) as u64 + 1;
        interval(
            &mut groups,
            &mut now,
            at_cap,
            0,
            Duration::from_millis(5),
            &sessions,
        );
        let grown = cap(&groups).expect("capped");
        assert!((grown - first * GROUP_CAP_GROWTH).abs() < 1.0);
        // Delivering far less than the cap (the players hold it back) is
        // no sign the link has room: the cap stays.
        interval(
            &mut groups,
            &mut now,
            30,
            0,
            Duration::from_millis(5),
            &sessions,
        );
        assert_eq!(cap(&groups), Some(grown));
    }

    #[test]
    fn sessions_pacing_below_their_share_keep_it_and_the_rest_share_what_is_left() {
        let mut g = SharedBottleneck::new(Instant::now(), MTU);
        g.cap = Some(10e6);
        g.sessions = 4;
        let mut demands = vec![1e6, 8e6, 0.0, 9e6];
        g.share_out(&mut demands);
        // 1 + 0 keep theirs; 9 MB/s left for the two busy ones.
        assert_eq!(g.level(), Some(4.5e6));
    }

    #[test]
    fn a_group_whose_sessions_ended_is_forgotten() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        interval(
            &mut groups,
            &mut now,
            600,
            400,
            Duration::from_millis(5),
            &busy(10e6, 3),
        );
        assert!(groups.shared().group(ip()).is_some());
        groups.refresh(now, std::iter::empty());
        assert!(groups.shared().group(ip()).is_none());
    }

    #[test]
    fn serving_threads_judge_and_share_one_group_together() {
        let shared: Arc<PeerGroups> = Arc::default();
        let mut a = ShardGroups::new(shared.clone(), 0);
        let mut b = ShardGroups::new(shared.clone(), 1);
        let mut now = Instant::now();
        // Two sessions on one thread, fourteen on the other; each thread
        // alone heard too few datagrams to judge, together 40 % lost.
        for _ in 0..2 {
            a.on_ack(
                now,
                ip(),
                MTU,
                4 * MTU,
                3 * MTU,
                Some(Duration::from_millis(5)),
            );
            b.on_ack(
                now,
                ip(),
                MTU,
                8 * MTU,
                5 * MTU,
                Some(Duration::from_millis(5)),
            );
            now += Duration::from_millis(10);
            a.refresh(now, busy(10e6, 2).into_iter());
            b.refresh(now, busy(10e6, 14).into_iter());
        }
        let cap = shared.group(ip()).and_then(|g| g.cap()).expect("capped");
        a.refresh(now, busy(10e6, 2).into_iter());
        // One level for all sixteen, whichever thread serves them.
        let level = a.level(ip()).expect("binds");
        assert_eq!(b.level(ip()), Some(level));
        assert!((level - cap / 16.0).abs() < 1.0, "{level} of {cap}");
        // The sessions of one thread end: the other's keep the group.
        a.refresh(now, std::iter::empty());
        b.refresh(now, busy(10e6, 14).into_iter());
        assert!(shared.group(ip()).is_some());
        assert_eq!(a.level(ip()), None);
        b.refresh(now, std::iter::empty());
        assert!(shared.group(ip()).is_none());
    }

    #[test]
    fn cuts_that_mend_nothing_stop_at_half_the_best_delivery() {
        let mut now = Instant::now();
        let mut groups = ShardGroups::new(Arc::default(), 0);
        let sessions = busy(10e6, 4);
        interval(
            &mut groups,
            &mut now,
            600,
            0,
            Duration::from_millis(10),
            &sessions,
        );
        let peak = 600.0 * MTU as f64 / 0.020;
        // Then every interval loses 5 % with its best RTT 20 ms above the
        // minimum whatever the cap (Wi-Fi that drops and jitters on every
        // session), delivering ever less.
        for acked in (100..300).rev().step_by(10) {
            let lost = acked / 19;
            interval(
                &mut groups,
                &mut now,
                acked,
                lost,
                Duration::from_millis(30),
                &sessions,
            );
            let capped = cap(&groups).expect("capped");
            assert!(capped >= peak / 2.0 - 1.0, "{capped} of {peak}");
        }
    }
}
