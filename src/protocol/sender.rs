//! The sending half of a transfer: which bytes go out next ([`StreamSender`])
//! and which packets are in flight, acknowledged or lost ([`LossRecovery`],
//! RFC 9002 loss detection with a probe timeout).

use std::ops::Range;
use std::time::{Duration, Instant};

use super::congestion::{AckEvent, Bbr, CongestionController, RateSample};
use super::pacing::{MAX_TOLERATED_LATENESS, Pacer};
use super::ranges::RangeSet;
use super::rtt::RttEstimator;
use super::sent_packets::SentPackets;
use super::wire::AckRange;

/// A packet is lost once this many later packets were acknowledged
/// (RFC 9002 kPacketThreshold).
pub const PACKET_THRESHOLD: u64 = 3;
/// Probe timeouts in a row after which the path counts as persistently
/// congested and the window restarts from its minimum.
pub const PERSISTENT_CONGESTION_PTOS: u32 = 3;
/// Largest backoff exponent for the probe timeout: 2^6 x PTO, so a dead peer
/// is still probed about every 20 s instead of never.
pub const MAX_PTO_BACKOFF_EXPONENT: u32 = 6;
/// Packets sent on a probe timeout regardless of the congestion window
/// (RFC 9002 §6.2.4 allows two).
pub const PROBE_PACKETS: u32 = 2;

/// Bytes at the start of a transfer whose resends leave twice on a lossy
/// path (see [`StreamSender::set_resend_twice`]): what a player needs
/// before its first frame after a seek, with room. At 10 % loss it costs
/// about 100 KB per seek; in the simulation a seek at 20 Mbit/s, 80 ms took
/// 1.79x the clean time for its first 150 KB, and 1.52x with it.
pub const RESEND_TWICE_HEAD: u64 = 1 << 20;
/// Bytes at the start of a transfer whose resends leave a third time on
/// such a path: what a seek's first frame needs. A seek waits for its ten
/// or so holes there, and with two copies one seek in ten still lost both
/// copies of one of them and waited another round trip or two, which made
/// it 2x the clean time; three copies are all lost one time in a thousand.
pub const RESEND_THRICE_HEAD: u64 = 256 * 1024;

/// Which bytes of a file go out next, and which are known to have arrived.
///
/// Offsets are absolute file offsets. Bytes below `start` belong to nobody
/// (the client asked to start there).
#[derive(Debug)]
pub struct StreamSender {
    start: u64,
    end: u64,
    next_new: u64,
    window: u64,
    acked: RangeSet,
    to_resend: RangeSet,
    /// Resent bytes to send once more, right after (see
    /// [`StreamSender::set_resend_twice`]).
    resend_again: RangeSet,
    /// Resent bytes to send a third time (see [`RESEND_THRICE_HEAD`]).
    resend_third: RangeSet,
    resend_twice: bool,
    /// The file's index, sent once the stream reaches `ahead_after`,
    /// regardless of the window (the client was told of it in `OpenOk`).
    ahead: RangeSet,
    ahead_after: u64,
    /// Where the chunk `next_chunk` returned last came from.
    last_chunk: ChunkSource,
    /// How far the client said it received everything (see
    /// [`Self::on_received_up_to`]).
    received_up_to: u64,
}

/// Which queue a chunk was taken from, so it can be put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkSource {
    Resend,
    Ahead,
    New,
}

impl StreamSender {
    pub fn new(start: u64, end: u64, window: u64) -> Self {
        let start = start.min(end);
        StreamSender {
            start,
            end,
            next_new: start,
            received_up_to: start,
            window: window.max(start),
            acked: RangeSet::new(),
            to_resend: RangeSet::new(),
            resend_again: RangeSet::new(),
            resend_third: RangeSet::new(),
            resend_twice: false,
            ahead: RangeSet::new(),
            ahead_after: start,
            last_chunk: ChunkSource::New,
        }
    }

    /// Sends `range` (the file's index) right after the stream's first
    /// `head` bytes: the demuxer reads the head, then jumps to the index.
    pub fn send_ahead(&mut self, range: Range<u64>, head: u64) {
        let range = range.start.max(self.start)..range.end.min(self.end);
        if range.start < range.end {
            self.ahead.insert(range);
            self.ahead_after = self.start.saturating_add(head);
        }
    }

    /// The receiver's window only grows: a late, reordered update must not
    /// pull it back.
    pub fn update_window(&mut self, window: u64) {
        self.window = self.window.max(window);
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// Every byte below `offset` arrived. Only what is new since the last
    /// such word is acknowledged: every ACK says it, and acknowledging the
    /// whole prefix again was a walk of four range sets (200 paced pulls:
    /// 2 % of the server's CPU).
    pub fn on_received_up_to(&mut self, offset: u64) {
        let offset = offset.min(self.end);
        if offset > self.received_up_to {
            self.on_acked(self.received_up_to..offset);
            self.received_up_to = offset;
        }
    }

    pub fn on_acked(&mut self, range: Range<u64>) {
        self.acked.insert(range.clone());
        self.resend_again.remove(range.clone());
        self.resend_third.remove(range.clone());
        self.to_resend.remove(range);
    }

    /// On a path that loses a lot, each resend in the first
    /// [`RESEND_TWICE_HEAD`] bytes of a transfer leaves twice: a starting
    /// or seeking player waits in order for every hole, and a resend lost
    /// again costs another round trip and more (at 10 % loss one hole in
    /// ten, and a seek's first frame needs a hundred datagrams). Two copies
    /// are both lost one time in a hundred, and in the first
    /// [`RESEND_THRICE_HEAD`] bytes a third copy makes it one in a
    /// thousand. Later resends leave once: the
    /// read-ahead covers their round trips, and the copies would be waste.
    pub fn set_resend_twice(&mut self, twice: bool) {
        self.resend_twice = twice;
    }

    pub fn on_lost(&mut self, range: Range<u64>) {
        // Only the parts not acknowledged some other way are resent.
        let mut pos = range.start;
        while pos < range.end {
            let acked_end = self.acked.contiguous_end(pos);
            if acked_end > pos {
                pos = acked_end;
                continue;
            }
            let next_acked = self
                .acked
                .next_start_after(pos)
                .map_or(range.end, |s| s.min(range.end));
            self.to_resend.insert(pos..next_acked);
            pos = next_acked;
        }
    }

    /// The next range to send, at most `max_len` bytes: lost data first, then
    /// new data up to the receiver's window.
    ///
    /// A short chunk at the window's edge is held back while packets are in
    /// flight (`nothing_in_flight` false): their ACKs will bring a window
    /// update, and sending slivers would waste a header per sliver (the
    /// "silly window syndrome" of RFC 1122 §4.2.3.4).
    pub fn next_chunk(&mut self, max_len: u64, nothing_in_flight: bool) -> Option<Range<u64>> {
        let copies = if self.resend_again.is_empty() {
            &mut self.resend_third
        } else {
            &mut self.resend_again
        };
        if let Some(first) = copies.first() {
            let chunk = first.start..first.end.min(first.start + max_len);
            copies.remove(chunk.clone());
            // Put back, if at all, as a plain resend.
            self.last_chunk = ChunkSource::Resend;
            return Some(chunk);
        }
        if let Some(first) = self.to_resend.first() {
            let chunk = first.start..first.end.min(first.start + max_len);
            self.to_resend.remove(chunk.clone());
            self.last_chunk = ChunkSource::Resend;
            debug_assert!(!self.acked.intersects(chunk.clone()));
            if self.resend_twice && chunk.start < self.start.saturating_add(RESEND_TWICE_HEAD) {
                self.resend_again.insert(chunk.clone());
                if chunk.start < self.start.saturating_add(RESEND_THRICE_HEAD) {
                    self.resend_third.insert(chunk.clone());
                }
            }
            return Some(chunk);
        }
        let limit = self.end.min(self.window);
        if let Some(first) = self.ahead.first() {
            if self.next_new >= self.ahead_after.min(limit) {
                let chunk = first.start..first.end.min(first.start + max_len);
                self.ahead.remove(chunk.clone());
                self.last_chunk = ChunkSource::Ahead;
                return Some(chunk);
            }
        }
        if self.next_new < limit {
            let short = limit - self.next_new < max_len && limit < self.end;
            if short && !nothing_in_flight {
                return None;
            }
            let chunk = self.next_new..limit.min(self.next_new + max_len);
            self.next_new = chunk.end;
            self.last_chunk = ChunkSource::New;
            return Some(chunk);
        }
        None
    }

    /// Bytes of new data sent so far, from the stream's start.
    pub fn new_data_sent(&self) -> u64 {
        self.next_new - self.start
    }

    /// Whether the next chunk is new data, `len` bytes of it at least:
    /// nothing to resend or to send ahead, and the window open that far.
    pub fn has_new_data_run(&self, len: u64) -> bool {
        self.resend_again.is_empty()
            && self.resend_third.is_empty()
            && self.to_resend.is_empty()
            && self.ahead.is_empty()
            && self.end.min(self.window).saturating_sub(self.next_new) >= len
    }

    pub fn has_data_to_send(&self) -> bool {
        !self.to_resend.is_empty()
            || !self.resend_again.is_empty()
            || !self.resend_third.is_empty()
            || !self.ahead.is_empty()
            || self.next_new < self.end.min(self.window)
    }

    /// New data exists but the receiver's window does not allow it.
    pub fn is_window_blocked(&self) -> bool {
        self.is_window_limited(1)
    }

    /// New data exists, nothing waits to be resent, and the receiver's
    /// window leaves less than `len` bytes of it to send: the window is
    /// used up, or down to a sliver that `next_chunk` holds back while
    /// packets are in flight.
    pub fn is_window_limited(&self, len: u64) -> bool {
        self.to_resend.is_empty()
            && self.resend_again.is_empty()
            && self.resend_third.is_empty()
            && self.ahead.is_empty()
            && self.next_new < self.end
            && self.window < self.end
            && self.window.saturating_sub(self.next_new) < len
    }

    /// The chunk `next_chunk` returned last was index sent ahead: its
    /// packet must say so, because its acknowledgement does not mean the
    /// stream holds those bytes (the client keeps them apart, and the
    /// stream sends them again when it gets there).
    pub fn last_chunk_was_ahead(&self) -> bool {
        self.last_chunk == ChunkSource::Ahead
    }

    /// The chunk `next_chunk` returned last was new data, which leaves in
    /// file order (resends and index sent ahead jump about).
    pub fn last_chunk_was_new(&self) -> bool {
        self.last_chunk == ChunkSource::New
    }

    /// Puts back the chunk `next_chunk` just returned, unsent: its bytes
    /// could not be read yet (content still on its way from storage).
    pub fn unsend(&mut self, chunk: Range<u64>) {
        match self.last_chunk {
            ChunkSource::Resend => self.to_resend.insert(chunk),
            ChunkSource::Ahead => self.ahead.insert(chunk),
            ChunkSource::New => {
                debug_assert_eq!(chunk.end, self.next_new);
                self.next_new = self.next_new.min(chunk.start);
            }
        }
    }

    /// A packet of index sent ahead was lost: send it again, ahead.
    pub fn on_ahead_lost(&mut self, range: Range<u64>) {
        self.ahead.insert(range);
    }

    pub fn is_complete(&self) -> bool {
        self.acked.contains_range(self.start..self.end)
    }

    pub fn is_acked(&self, range: Range<u64>) -> bool {
        self.acked.contains_range(range)
    }
}

/// What a data packet carried, as [`LossRecovery::on_packet_sent`] records it.
#[derive(Debug, Clone)]
pub struct DataSent {
    pub transfer_id: u32,
    pub range: Range<u64>,
    /// Index sent ahead of the stream.
    pub ahead: bool,
    /// See [`SentPacket::app_limited`].
    pub app_limited: bool,
    /// See [`SentPacket::trial`].
    pub trial: bool,
}

/// A packet that carries data and waits for its acknowledgement.
#[derive(Debug, Clone)]
pub struct SentPacket {
    pub packet_number: u64,
    pub time_sent: Instant,
    pub size: u64,
    pub transfer_id: u32,
    pub range: Range<u64>,
    /// Index sent ahead of the stream (see `StreamSender::send_ahead`).
    pub ahead: bool,
    /// The sender had more to send but the receiver's window stopped it,
    /// or left it less than a datagram (see
    /// [`StreamSender::is_window_limited`]): such ACKs say nothing about
    /// the path's capacity.
    pub app_limited: bool,
    /// A trial of a larger datagram than the path was known to carry: its
    /// loss says the path cannot, not that it is congested.
    pub trial: bool,
    /// Delivery-rate bookkeeping at send time
    /// (draft-cheng-iccrg-delivery-rate-estimation).
    pub delivered: u64,
    pub delivered_time: Instant,
    pub first_sent_time: Instant,
}

/// What an ACK or a timer changed.
#[derive(Debug, Default)]
pub struct RecoveryOutcome {
    pub acked: Vec<SentPacket>,
    pub lost: Vec<SentPacket>,
    /// A probe timeout fired: resend these (still unacknowledged) ranges,
    /// ignoring the congestion window for [`PROBE_PACKETS`] packets.
    pub probe: Vec<SentPacket>,
}

/// Counters for logs and stats.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecoveryStats {
    pub packets_sent: u64,
    pub packets_lost: u64,
    pub probe_timeouts: u64,
}

/// RFC 9002 loss detection and congestion control for one session.
#[derive(Debug)]
pub struct LossRecovery {
    sent: SentPackets,
    bytes_in_flight: u64,
    largest_acked: Option<u64>,
    largest_sent: Option<u64>,
    rtt: RttEstimator,
    cc: Box<dyn CongestionController>,
    /// The controller's window and pacing rate as of its last event (see
    /// `note_cc`), which is when they change: asked for every
    /// deadline, turn and refresh walk, the boxed controller was a cache
    /// miss of its own (200 paced pulls: `pacing_rate` alone 3 % of the
    /// server's CPU, in the walk).
    cc_window: u64,
    cc_pacing_rate: Option<f64>,
    pto_count: u32,
    loss_time: Option<Instant>,
    last_sent: Option<Instant>,
    /// What the probe timer counts from: the last send, but not a probe a
    /// waiting peer's ping earned (see [`Self::on_peer_waiting`]).
    probe_timer_base: Option<Instant>,
    probe_credit: u32,
    /// Of `probe_credit`, probes a ping earned.
    ping_probe_credit: u32,
    stats: RecoveryStats,
    max_datagram: u64,
    pacer: Pacer,
    /// Bytes acknowledged so far, and when the last ones were.
    delivered: u64,
    delivered_time: Option<Instant>,
    /// Send time of the packet that started the current delivery interval.
    first_sent_time: Option<Instant>,
    /// When packets were last declared lost.
    last_loss: Option<Instant>,
    /// When the current series of probe timeouts began (no ACK since);
    /// with [`PERSISTENT_CONGESTION_PTOS`] of them, a persistent congestion.
    silence_began: Option<Instant>,
    /// The most the session may pace at, whatever its controller says:
    /// its share of a bottleneck it shares with other sessions (see
    /// [`super::shared_bottleneck`]).
    rate_limit: Option<f64>,
    /// The least window the session may use, whatever its controller's:
    /// set while its address group's window bounds the group's bytes in
    /// flight (see [`super::shared_bottleneck`]), so that it sends whole
    /// bursts; 0 otherwise.
    window_floor: u64,
}

impl LossRecovery {
    pub fn new(max_datagram: u64) -> Self {
        LossRecovery {
            sent: SentPackets::default(),
            bytes_in_flight: 0,
            largest_acked: None,
            largest_sent: None,
            rtt: RttEstimator::new(),
            cc: Box::new(Bbr::new(max_datagram)),
            cc_window: 0,
            cc_pacing_rate: None,
            pto_count: 0,
            loss_time: None,
            last_sent: None,
            probe_timer_base: None,
            probe_credit: 0,
            ping_probe_credit: 0,
            stats: RecoveryStats::default(),
            max_datagram,
            pacer: Pacer::new(max_datagram),
            delivered: 0,
            delivered_time: None,
            first_sent_time: None,
            silence_began: None,
            last_loss: None,
            rate_limit: None,
            window_floor: 0,
        }
        .cc_changed()
    }

    /// [`Self::note_cc`], for the constructors.
    fn cc_changed(mut self) -> Self {
        self.note_cc();
        self
    }

    /// Takes the controller's window and pacing rate after an event of its
    /// (every call into `cc` that may change them is followed by this).
    fn note_cc(&mut self) {
        self.cc_window = self.cc.window();
        self.cc_pacing_rate = self.cc.pacing_rate();
    }

    /// Bounds the pacing rate at `limit`, the session's share of a
    /// bottleneck it shares with other sessions; `None` lifts it.
    pub fn set_rate_limit(&mut self, limit: Option<f64>) {
        self.rate_limit = limit;
    }

    /// Probes wait to leave, which neither the window nor pacing holds.
    pub fn is_probing(&self) -> bool {
        self.probe_credit > 0
    }

    /// See `window_floor`.
    pub fn set_window_floor(&mut self, bytes: u64) {
        self.window_floor = bytes;
    }

    /// The controller's window, at least the floor.
    fn window(&self) -> u64 {
        debug_assert_eq!(self.cc_window, self.cc.window(), "window not noted");
        self.cc_window.max(self.window_floor)
    }

    /// The controller's pacing rate, without the limit.
    pub fn controller_pacing_rate(&self) -> Option<f64> {
        self.cc_pacing_rate
    }

    /// The rate the pacer refills at: the controller's, within the limit.
    pub fn pacing_rate(&self) -> Option<f64> {
        debug_assert_eq!(self.cc_pacing_rate, self.cc.pacing_rate(), "rate not noted");
        let rate = self.cc_pacing_rate;
        match (rate, self.rate_limit) {
            (Some(r), Some(limit)) => Some(r.min(limit)),
            _ => rate,
        }
    }

    /// The path carries datagrams this large (a trial of one came back):
    /// the windows counted in datagrams grow with it.
    pub fn set_max_datagram(&mut self, max_datagram: u64) {
        self.max_datagram = max_datagram;
        self.cc.set_max_datagram(max_datagram);
        self.note_cc();
    }

    /// Replaces the congestion controller (before anything was sent).
    pub fn with_controller(mut self, cc: Box<dyn CongestionController>) -> Self {
        self.cc = cc;
        self.cc_changed()
    }

    pub fn controller(&self) -> &dyn CongestionController {
        self.cc.as_ref()
    }

    /// When pacing next lets a burst leave, if it holds one back.
    pub fn pacing_deadline(&self) -> Option<Instant> {
        // Held back by the window, the next ACK is what wakes the sender;
        // a pacing deadline (stale, as the bucket is only refilled when
        // the window allows a send) would make the driver spin until then.
        if self.probe_credit > 0 {
            return None;
        }
        let room = self.window().saturating_sub(self.bytes_in_flight);
        let goal = self.burst_goal();
        if room < goal {
            return None;
        }
        self.pacer.next_send_time(goal, room)
    }

    /// The room a sender waits for before it starts sending again:
    /// a burst, or a third of the window if that is less, and a single
    /// datagram with nothing in flight (no ACK would come to free more).
    /// An ACK frees the room of the few packets it covers; sending those
    /// at once made every send a few datagrams long (4.5 on average with
    /// 20 paced pulls): a system call, a wake-up and a scan of the ready
    /// sessions per ACK. Linux's TCP holds small sends back the same way
    /// (`tcp_tso_should_defer`), for the same reason.
    fn burst_goal(&self) -> u64 {
        // Taking turns in its group's window, a session waits for a whole
        // burst, whatever it has in flight: that is what the turns are for.
        if self.window_floor > 0 {
            return self.pacer.burst().min(self.window()).max(self.max_datagram);
        }
        if self.bytes_in_flight == 0 {
            return self.max_datagram;
        }
        self.pacer
            .burst()
            .min(self.window() / 3)
            .max(self.max_datagram)
    }

    /// How late the driver may send for this session and take its ACKs
    /// without costing it rate: a quarter of its smoothed RTT (a
    /// window-bound sender, whose window is about two of its path's
    /// delivery per minimum RTT, has that slack), no more than its pacer's
    /// bucket keeps credit for ([`Pacer::slack`]) and at most
    /// [`MAX_TOLERATED_LATENESS`]; nothing before the first RTT sample.
    /// A server with many sessions serves them on a tick that long rather
    /// than at every ACK.
    pub fn tolerated_lateness(&self) -> Duration {
        if !self.rtt.has_sample() {
            return Duration::ZERO;
        }
        let rtt_share = (self.rtt.smoothed() / 4).min(MAX_TOLERATED_LATENESS);
        self.pacer.slack().map_or(rtt_share, |s| s.min(rtt_share))
    }

    /// As [`Self::tolerated_lateness`], for a sender whose sends a window
    /// it shares holds (its address group's, see
    /// `ServerEndpoint::refresh_group_windows`): that window covers
    /// `covered` of lateness besides the round trip, so the sender
    /// tolerates that much too, within its pacer's slack.
    pub fn tolerated_lateness_covering(&self, covered: Duration) -> Duration {
        let own = self.tolerated_lateness();
        if !self.rtt.has_sample() {
            return own;
        }
        let covered = covered.min(MAX_TOLERATED_LATENESS);
        own.max(self.pacer.slack().map_or(covered, |s| s.min(covered)))
    }

    /// See [`Pacer::set_min_burst_packets`].
    pub fn set_min_burst_packets(&mut self, packets: f64) {
        self.pacer.set_min_burst_packets(packets);
    }

    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    pub fn congestion_window(&self) -> u64 {
        self.cc_window
    }

    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight
    }

    /// Packets were declared lost within `period` of `now`.
    pub fn lost_within(&self, now: Instant, period: Duration) -> bool {
        self.last_loss
            .is_some_and(|t| now.saturating_duration_since(t) <= period)
    }

    /// A probe timeout fired since the last ACK: what was in flight is
    /// most likely lost, though not declared so.
    pub fn in_probe_timeout(&self) -> bool {
        self.pto_count > 0
    }

    /// Nothing in flight, and nothing sent for `idle`.
    pub fn is_idle_for(&self, now: Instant, idle: Duration) -> bool {
        self.sent.is_empty()
            && self
                .last_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= idle)
    }

    /// Gives back the memory kept for packets in flight while idle.
    pub fn release_memory(&mut self) {
        self.sent.shrink_to_fit();
    }

    pub fn stats(&self) -> RecoveryStats {
        self.stats
    }

    /// May a run of packets start with one of `size` bytes? As
    /// [`Self::can_send`], and the window and the pacer have room for a
    /// burst (`burst_goal`): the rest of the run then goes out
    /// one `can_send` at a time, in the same turn.
    pub fn can_start_burst(&mut self, now: Instant, size: u64) -> bool {
        let goal = self.burst_goal().max(size);
        self.has_room_for(now, goal)
    }

    /// May a packet of `size` bytes leave now? Probes ignore both the
    /// window and pacing.
    pub fn can_send(&mut self, now: Instant, size: u64) -> bool {
        self.has_room_for(now, size)
    }

    /// Whether the window and the pacer let `bytes` leave now (probes:
    /// always).
    fn has_room_for(&mut self, now: Instant, bytes: u64) -> bool {
        if self.probe_credit > 0 {
            return true;
        }
        if self.bytes_in_flight + bytes > self.window() {
            return false;
        }
        self.pacer
            .refill(now, self.pacing_rate(), self.max_datagram);
        self.pacer.allows(bytes)
    }

    /// Records a data packet that just left.
    pub fn on_packet_sent(&mut self, now: Instant, packet_number: u64, size: u64, data: DataSent) {
        let DataSent {
            transfer_id,
            range,
            ahead,
            app_limited,
            trial,
        } = data;
        if self.sent.is_empty() {
            // A new delivery interval starts with the first packet after idle.
            self.first_sent_time = Some(now);
            self.delivered_time = Some(now);
        }
        self.probe_credit = self.probe_credit.saturating_sub(1);
        if self.ping_probe_credit > 0 {
            self.ping_probe_credit -= 1;
        } else {
            self.probe_timer_base = Some(now);
        }
        self.pacer.on_sent(size);
        self.bytes_in_flight += size;
        self.last_sent = Some(now);
        self.largest_sent = Some(packet_number);
        self.stats.packets_sent += 1;
        self.sent.insert(SentPacket {
            packet_number,
            time_sent: now,
            size,
            transfer_id,
            range,
            ahead,
            app_limited,
            trial,
            delivered: self.delivered,
            delivered_time: self.delivered_time.unwrap_or(now),
            first_sent_time: self.first_sent_time.unwrap_or(now),
        });
    }

    /// Forgets every in-flight packet of transfers other than `keep`: after a
    /// seek their data is useless, and they must not hold the window.
    pub fn discard_other_transfers(&mut self, now: Instant, keep: u32) {
        self.cc.on_new_transfer(now);
        self.note_cc();
        let before = self.sent.len();
        self.sent.retain(|p| p.transfer_id == keep);
        if self.sent.len() != before {
            self.bytes_in_flight = self.sent.iter().map(|p| p.size).sum();
            if self.sent.is_empty() {
                self.loss_time = None;
                if self.pto_count >= PERSISTENT_CONGESTION_PTOS {
                    self.cc.on_persistent_congestion_ended(false);
                    self.note_cc();
                }
                self.pto_count = 0;
                self.silence_began = None;
            }
        }
    }

    /// Processes an ACK's ranges. Ranges naming packets never sent are
    /// ignored (we only look up packets we hold).
    pub fn on_ack_received(
        &mut self,
        now: Instant,
        ranges: &[AckRange],
        ack_delay: Duration,
    ) -> RecoveryOutcome {
        let mut outcome = RecoveryOutcome::default();
        let Some(largest_in_ack) = ranges.first().map(|r| r.largest) else {
            return outcome;
        };
        if self.largest_sent.is_none_or(|l| largest_in_ack > l) {
            // Acknowledges a packet we never sent: ignore the whole ACK
            // rather than let it declare everything else lost.
            return outcome;
        }
        for r in ranges {
            self.sent
                .remove_range(r.smallest, r.largest, &mut outcome.acked);
        }
        let acked_bytes: u64 = outcome.acked.iter().map(|p| p.size).sum();
        self.bytes_in_flight -= acked_bytes;
        if outcome.acked.is_empty() {
            return outcome;
        }
        self.largest_acked = Some(
            self.largest_acked
                .map_or(largest_in_ack, |l| l.max(largest_in_ack)),
        );
        // RTT sample only when the ACK's largest packet is newly acknowledged,
        // so the sample measures that packet (RFC 9002 §5.1).
        let mut rtt_sample = None;
        if let Some(p) = outcome
            .acked
            .iter()
            .find(|p| p.packet_number == largest_in_ack)
        {
            let sample = now.saturating_duration_since(p.time_sent);
            self.rtt.update(sample, ack_delay);
            rtt_sample = Some(sample);
        }
        // Read once: the rate filter and the controller both want it.
        let current_rtt = self.rtt.current();
        self.delivered += acked_bytes;
        self.delivered_time = Some(now);
        // The delivery rate over the interval of the most recently sent
        // acknowledged packet: bytes delivered since it was sent, over the
        // longer of its send and ACK intervals.
        let newest = outcome
            .acked
            .iter()
            .max_by_key(|p| (p.delivered, p.time_sent))
            .cloned();
        let mut rate = None;
        if let Some(p) = &newest {
            self.first_sent_time = Some(p.time_sent);
            let send_elapsed = p.time_sent.saturating_duration_since(p.first_sent_time);
            let ack_elapsed = now.saturating_duration_since(p.delivered_time);
            let interval = send_elapsed.max(ack_elapsed);
            // Shorter than the path's RTT, a sample measures ACK
            // compression, not the bottleneck. Shorter than half the
            // smoothed RTT, it measures the first datagrams after an idle
            // spell crossing a token-bucket shaper at line rate (tc tbf:
            // 2-3 datagrams in 100 µs on a 2 Mbit/s link, whose minimum RTT
            // they also set), which in steady flow no sample does: its
            // interval is the round trip of its packet. Half the current
            // round trip, not the average: a sender paced at a rate it
            // measured during a spell of long round trips sends each
            // datagram alone, whose sample is its round trip, and with the
            // average still high every sample was set aside and the rate
            // never rose (2 MB at 3 KB/s over a loopback for minutes).
            let shortest = self.rtt.min().max(current_rtt / 2);
            if interval >= shortest && !interval.is_zero() {
                rate = Some(RateSample {
                    delivery_rate: (self.delivered - p.delivered) as f64 / interval.as_secs_f64(),
                    app_limited: p.app_limited,
                });
            }
        }
        if let (true, Some(since)) = (
            self.pto_count >= PERSISTENT_CONGESTION_PTOS,
            self.silence_began,
        ) {
            // Packets in flight before the silence began arrived: the path
            // was never down, the ACKs were lost (a burst on the way back
            // is many of a starving receiver's few datagrams) or late. The
            // reset to the minimum window and a new startup took seconds
            // to climb back from in the simulation.
            let spurious = outcome.acked.iter().any(|p| p.time_sent < since);
            self.cc.on_persistent_congestion_ended(spurious);
            self.note_cc();
        }
        self.pto_count = 0;
        self.silence_began = None;
        outcome.lost = self.detect_lost(now);
        if let Some(p) = newest {
            self.cc.on_ack(&AckEvent {
                now,
                acked_bytes,
                largest_acked_sent: p.time_sent,
                bytes_in_flight: self.bytes_in_flight,
                rtt_sample,
                current_rtt,
                rate,
                app_limited: p.app_limited,
                delivered: self.delivered,
                prior_delivered: p.delivered,
            });
            self.note_cc();
        }
        outcome
    }

    fn detect_lost(&mut self, now: Instant) -> Vec<SentPacket> {
        self.loss_time = None;
        let Some(largest_acked) = self.largest_acked else {
            return Vec::new();
        };
        let loss_delay = self.rtt.loss_delay();
        let mut lost_pns = Vec::new();
        for p in self.sent.below(largest_acked) {
            let by_time = now.saturating_duration_since(p.time_sent) >= loss_delay;
            let by_count = largest_acked - p.packet_number >= PACKET_THRESHOLD;
            if by_time || by_count {
                lost_pns.push(p.packet_number);
            } else {
                let when = p.time_sent + loss_delay;
                self.loss_time = Some(self.loss_time.map_or(when, |t| t.min(when)));
            }
        }
        let mut lost = Vec::with_capacity(lost_pns.len());
        for pn in lost_pns {
            if let Some(p) = self.sent.remove(pn) {
                self.bytes_in_flight -= p.size;
                lost.push(p);
            }
        }
        self.stats.packets_lost += lost.len() as u64;
        if let Some(newest) = lost.iter().filter(|p| !p.trial).map(|p| p.time_sent).max() {
            self.last_loss = Some(now);
            let bytes = lost.iter().filter(|p| !p.trial).map(|p| p.size).sum();
            self.cc.on_loss(now, bytes, newest);
            self.note_cc();
        }
        lost
    }

    /// When the next loss or probe timer fires.
    pub fn timeout(&self) -> Option<Instant> {
        if let Some(t) = self.loss_time {
            return Some(t);
        }
        if self.sent.is_empty() {
            return None;
        }
        let backoff = 1u32 << self.pto_count.min(MAX_PTO_BACKOFF_EXPONENT);
        self.probe_timer_base
            .map(|t| t + self.rtt.probe_timeout() * backoff)
    }

    /// The peer says it is still waiting (a ping) while the probe timer is
    /// backing off: one probe of the oldest data still `needed` leaves now,
    /// without backing off further. The ping proves the peer and the path
    /// towards us alive, so the silence is loss on the way down; at a
    /// bottleneck shared by more sessions than its queue holds at their
    /// windows' floor, timers backed off to seconds left transfers silent
    /// past the player's timeout. At most one probe per ping and per
    /// smoothed RTT, whatever the client sends (an honest one pings at
    /// most every 200 ms); the probe timer keeps its schedule.
    pub fn on_peer_waiting(
        &mut self,
        now: Instant,
        needed: impl Fn(&SentPacket) -> bool,
    ) -> RecoveryOutcome {
        let mut outcome = RecoveryOutcome::default();
        let recent = self
            .last_sent
            .is_some_and(|t| now.saturating_duration_since(t) < self.rtt.smoothed());
        if self.pto_count == 0 || self.loss_time.is_some() || recent {
            return outcome;
        }
        if self.sent.iter().any(&needed) {
            let before = self.probe_credit;
            outcome.probe = self.start_probes(now, 1, needed);
            // Its send must not restart the probe timer, which keeps its
            // schedule: pinged every second, a sender whose probes all met
            // a full queue never reached its second timeout (two probes, a
            // longer backoff, a persistent congestion); in the simulation
            // of 200 transfers through one queue such sessions counted one
            // probe timeout in 20 s.
            self.ping_probe_credit = self.probe_credit - before;
        }
        outcome
    }

    /// Lets `count` probes leave regardless of the window and pacing, and
    /// returns the oldest packets whose data is still `needed`, for them
    /// to resend. The probes start a new delivery interval, as a send
    /// after idle does: nothing arrived since the last ACK, and a probe's
    /// rate sample measured over that silence (seconds, after a few
    /// timeouts) gave a few hundred bytes per second. After a persistent
    /// congestion that was the whole estimate, and pacing at it kept a
    /// sender with nothing in flight quiet for tens of seconds.
    fn start_probes(
        &mut self,
        now: Instant,
        count: u32,
        needed: impl Fn(&SentPacket) -> bool,
    ) -> Vec<SentPacket> {
        self.probe_credit = self.probe_credit.max(count);
        self.first_sent_time = Some(now);
        self.delivered_time = Some(now);
        self.sent
            .iter()
            .filter(|p| needed(p))
            .take(count as usize)
            .cloned()
            .collect()
    }

    /// A loss or probe timer fired. The probes resend the oldest packets
    /// whose data is still `needed`: the oldest in flight may carry bytes
    /// acknowledged by another copy (resends leave twice on a lossy path),
    /// and probing those, timeout after timeout, never reached the packet
    /// that carried the missing bytes (a transfer stalled for good 900
    /// bytes before its end in the simulation).
    pub fn on_timeout(
        &mut self,
        now: Instant,
        needed: impl Fn(&SentPacket) -> bool,
    ) -> RecoveryOutcome {
        let mut outcome = RecoveryOutcome::default();
        if self.loss_time.is_some_and(|t| t <= now) {
            outcome.lost = self.detect_lost(now);
            return outcome;
        }
        if self.timeout().is_none_or(|t| t > now) {
            return outcome;
        }
        self.pto_count += 1;
        self.stats.probe_timeouts += 1;
        if self.pto_count == 1 {
            self.silence_began = Some(now);
        }
        if self.pto_count == PERSISTENT_CONGESTION_PTOS {
            self.cc.on_persistent_congestion();
            self.note_cc();
        }
        outcome.probe = self.start_probes(now, PROBE_PACKETS, needed);
        self.ping_probe_credit = 0;
        // The probe timer restarts from now, not from the last send, so a
        // peer that is gone is not probed in a tight loop.
        self.last_sent = Some(now);
        self.probe_timer_base = Some(now);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_index_goes_after_the_head_outside_the_window_and_again_with_the_stream() {
        let mut s = StreamSender::new(0, 100_000, 3000);
        s.send_ahead(90_000..91_000, 2000);
        // The head first, then the index although the window ends at 3000.
        assert_eq!(s.next_chunk(1000, true), Some(0..1000));
        assert!(!s.last_chunk_was_ahead());
        assert_eq!(s.next_chunk(1000, true), Some(1000..2000));
        assert_eq!(s.next_chunk(1000, true), Some(90_000..91_000));
        assert!(s.last_chunk_was_ahead());
        // Lost: it goes ahead again, before the stream.
        s.on_ahead_lost(90_000..91_000);
        assert_eq!(s.next_chunk(1000, true), Some(90_000..91_000));
        assert!(s.last_chunk_was_ahead());
        assert_eq!(s.next_chunk(1000, true), Some(2000..3000));
        assert!(!s.last_chunk_was_ahead());
        // The stream still carries those bytes when the window gets there.
        s.update_window(100_000);
        let mut sent = RangeSet::new();
        while let Some(c) = s.next_chunk(1000, true) {
            sent.insert(c);
        }
        assert!(sent.contains_range(90_000..91_000));
    }

    #[test]
    fn a_chunk_put_back_unsent_comes_again_from_the_same_queue() {
        let mut s = StreamSender::new(0, 10_000, 10_000);
        s.send_ahead(9000..9500, 1000);
        let new = s.next_chunk(1000, true).expect("new");
        s.unsend(new.clone());
        assert_eq!(s.next_chunk(1000, true), Some(new));
        let ahead = s.next_chunk(1000, true).expect("ahead");
        assert!(s.last_chunk_was_ahead());
        s.unsend(ahead.clone());
        assert_eq!(s.next_chunk(1000, true), Some(ahead));
        assert!(s.last_chunk_was_ahead());
        s.on_lost(0..1000);
        let resend = s.next_chunk(1000, true).expect("resend");
        assert_eq!(resend, 0..1000);
        s.unsend(resend.clone());
        assert_eq!(s.next_chunk(1000, true), Some(resend));
        assert_eq!(s.next_chunk(1000, true), Some(1000..2000));
    }

    #[test]
    fn stream_sender_respects_window_and_resends_only_unacked() {
        let mut s = StreamSender::new(100, 10_000, 3_100);
        assert_eq!(s.next_chunk(1000, true), Some(100..1100));
        assert_eq!(s.next_chunk(1000, true), Some(1100..2100));
        assert_eq!(s.next_chunk(1000, true), Some(2100..3100));
        assert_eq!(s.next_chunk(1000, true), None);
        assert!(s.is_window_blocked());
        s.on_acked(1100..2100);
        s.on_lost(100..3100);
        assert_eq!(s.next_chunk(5000, true), Some(100..1100));
        assert_eq!(s.next_chunk(5000, true), Some(2100..3100));
        s.update_window(3_500);
        s.update_window(2_000); // stale update ignored
        assert_eq!(s.next_chunk(1000, true), Some(3100..3500));
        s.on_received_up_to(3_500);
        assert!(s.is_acked(100..3500));
        assert!(!s.is_complete());
    }

    #[test]
    fn a_sender_down_to_a_sliver_of_its_window_is_window_limited() {
        let mut s = StreamSender::new(0, 10_000, 2_500);
        assert!(!s.is_window_limited(1000));
        assert_eq!(s.next_chunk(1000, true), Some(0..1000));
        assert_eq!(s.next_chunk(1000, true), Some(1000..2000));
        // 500 bytes left: a sliver, held back while packets are in flight.
        assert!(s.has_data_to_send());
        assert!(s.is_window_limited(1000));
        assert_eq!(s.next_chunk(1000, false), None);
        // A resend to send is no window's doing.
        s.on_lost(0..1000);
        assert!(!s.is_window_limited(1000));
        assert_eq!(s.next_chunk(1000, false), Some(0..1000));
        // A window at the file's end limits nothing: the file does.
        s.update_window(10_000);
        assert!(!s.is_window_limited(1000));
        let mut end = StreamSender::new(0, 1_500, 1_500);
        assert_eq!(end.next_chunk(1000, true), Some(0..1000));
        assert!(!end.is_window_limited(1000));
    }

    fn send(r: &mut LossRecovery, pn: u64, t: Instant) {
        r.on_packet_sent(
            t,
            pn,
            1000,
            DataSent {
                transfer_id: 1,
                range: pn * 1000..(pn + 1) * 1000,
                ahead: false,
                app_limited: false,
                trial: false,
            },
        );
    }

    #[test]
    fn a_lost_trial_of_a_larger_datagram_is_no_congestion() {
        // Packets 0-9 leave, packet 3 a trial; 4-9 are acknowledged, so 3
        // is lost by the packet threshold. Told of it as a trial, the
        // controller keeps its state; as any packet, it is a loss.
        let outcome = |trial: bool| {
            let mut r = LossRecovery::new(1000);
            let t0 = Instant::now();
            for pn in 0..10 {
                r.on_packet_sent(
                    t0,
                    pn,
                    if pn == 3 && trial { 16_000 } else { 1000 },
                    DataSent {
                        transfer_id: 1,
                        range: pn * 1000..(pn + 1) * 1000,
                        ahead: false,
                        app_limited: false,
                        trial: pn == 3 && trial,
                    },
                );
            }
            let now = t0 + Duration::from_millis(20);
            let acks = [
                AckRange {
                    largest: 9,
                    smallest: 4,
                },
                AckRange {
                    largest: 2,
                    smallest: 0,
                },
            ];
            let lost = r.on_ack_received(now, &acks, Duration::ZERO).lost;
            assert_eq!(
                lost.iter().map(|p| p.packet_number).collect::<Vec<_>>(),
                [3]
            );
            (
                r.lost_within(now, Duration::from_secs(1)),
                r.stats().packets_lost,
            )
        };
        assert_eq!(outcome(true), (false, 1));
        assert_eq!(outcome(false), (true, 1));
    }

    /// Paced sends of 1000-byte packets from 0 until the window is full;
    /// returns the time then and how many were sent.
    fn fill_window(r: &mut LossRecovery) -> (Instant, u64) {
        let mut now = Instant::now();
        let mut pn = 0;
        while r.bytes_in_flight() + 1000 <= r.congestion_window() {
            if r.can_send(now, 1000) {
                send(r, pn, now);
                pn += 1;
            } else {
                now = r.pacing_deadline().expect("paced, not window-limited");
            }
        }
        (now, pn)
    }

    #[test]
    fn the_lateness_a_session_tolerates_follows_its_rtt_within_its_pacer() {
        let mut r = LossRecovery::new(1000);
        assert_eq!(r.tolerated_lateness(), Duration::ZERO, "no RTT yet");
        let (now, _) = fill_window(&mut r);
        // One round trip of 40 ms: a quarter is 10 ms, over the most.
        let acked = now + Duration::from_millis(40);
        r.on_ack_received(
            acked,
            &[AckRange {
                largest: 0,
                smallest: 0,
            }],
            Duration::ZERO,
        );
        assert!(r.pacer.slack().is_none_or(|s| s > MAX_TOLERATED_LATENESS));
        assert_eq!(r.tolerated_lateness(), MAX_TOLERATED_LATENESS);
        // A pacer whose bucket holds less bounds it: at 100 MB/s a burst
        // is 2 ms of the rate.
        r.pacer.refill(acked, Some(100_000_000.0), 1000);
        assert_eq!(
            r.tolerated_lateness(),
            crate::protocol::pacing::PACING_BURST
        );
    }

    #[test]
    fn a_sender_in_a_shared_window_tolerates_what_the_window_covers() {
        let covered = Duration::from_millis(4);
        let mut r = LossRecovery::new(1000);
        assert_eq!(r.tolerated_lateness_covering(covered), Duration::ZERO);
        let (now, _) = fill_window(&mut r);
        // A round trip of 4 ms: a quarter is 1 ms, the window covers 4.
        let acked = now + Duration::from_millis(4);
        let first = AckRange {
            largest: 0,
            smallest: 0,
        };
        r.on_ack_received(acked, &[first], Duration::ZERO);
        assert_eq!(r.tolerated_lateness(), Duration::from_millis(1));
        r.pacer.refill(acked, Some(1_000_000.0), 1000);
        assert_eq!(r.tolerated_lateness_covering(covered), covered);
        // Its own quarter RTT, when more, still stands...
        assert_eq!(
            r.tolerated_lateness_covering(Duration::from_micros(500)),
            Duration::from_millis(1)
        );
        // ...and its pacer's slack bounds what is covered: at 100 MB/s a
        // burst is 2 ms of the rate.
        r.pacer.refill(acked, Some(100_000_000.0), 1000);
        assert_eq!(
            r.tolerated_lateness_covering(covered),
            crate::protocol::pacing::PACING_BURST
        );
    }

    #[test]
    fn a_full_window_sets_no_pacing_deadline() {
        // Paced sends until the congestion window is full: then only an ACK
        // can let more out, and a (stale) pacing deadline would have the
        // driver wake for nothing, again and again.
        let mut r = LossRecovery::new(1000);
        let (now, _) = fill_window(&mut r);
        assert!(!r.can_send(now, 1000));
        assert_eq!(r.pacing_deadline(), None);
    }

    #[test]
    fn a_window_limited_sender_waits_for_room_for_a_burst_not_for_each_ack() {
        // Window-limited: an ACK of one packet frees a datagram or two of
        // room (the window grows in startup). Starting a run then would
        // make every send that short; the sender waits (no pacing
        // deadline: the next ACK wakes it) until a burst fits.
        let mut r = LossRecovery::new(1000);
        let (mut now, pn) = fill_window(&mut r);
        now += Duration::from_millis(50);
        let mut deferred = 0;
        for largest in 0..pn {
            r.on_ack_received(
                now,
                &[AckRange {
                    largest,
                    smallest: 0,
                }],
                Duration::ZERO,
            );
            if r.congestion_window() - r.bytes_in_flight() >= r.burst_goal() {
                break;
            }
            assert!(r.can_send(now, 1000), "room for a datagram after an ACK");
            assert!(!r.can_start_burst(now, 1000), "but not for a burst");
            assert_eq!(r.pacing_deadline(), None, "the next ACK wakes it");
            deferred += 1;
        }
        assert!(deferred > 0, "an ACK freed less than a burst at least once");
        now += Duration::from_secs(1);
        assert!(r.can_start_burst(now, 1000));
        // Nothing in flight: no ACK is coming, one datagram is enough.
        let mut idle = LossRecovery::new(1000);
        assert!(idle.can_start_burst(Instant::now(), 1000));
    }

    #[test]
    fn packet_threshold_declares_loss() {
        let t0 = Instant::now();
        let mut r = LossRecovery::new(1000);
        for pn in 0..5 {
            send(&mut r, pn, t0);
        }
        let out = r.on_ack_received(
            t0 + Duration::from_millis(50),
            &[AckRange {
                largest: 4,
                smallest: 3,
            }],
            Duration::ZERO,
        );
        assert_eq!(out.acked.len(), 2);
        let lost: Vec<u64> = out.lost.iter().map(|p| p.packet_number).collect();
        assert_eq!(lost, vec![0, 1]);
        // Packet 2 is only one behind: lost later by time.
        let t = r.timeout().expect("loss timer armed");
        let out = r.on_timeout(t, |_| true);
        assert_eq!(out.lost.len(), 1);
        assert_eq!(r.bytes_in_flight(), 0);
    }

    #[test]
    fn ack_for_unsent_packet_is_ignored() {
        let t0 = Instant::now();
        let mut r = LossRecovery::new(1000);
        send(&mut r, 0, t0);
        let out = r.on_ack_received(
            t0,
            &[AckRange {
                largest: 1_000_000,
                smallest: 0,
            }],
            Duration::ZERO,
        );
        assert!(out.acked.is_empty() && out.lost.is_empty());
        assert_eq!(r.bytes_in_flight(), 1000);
    }

    /// Drives `r` over a path of `rate` bytes/s and 20 ms round trip that
    /// loses everything sent while `dark(t)` holds; returns the bytes
    /// acknowledged at each ACK.
    fn run_path(
        r: &mut LossRecovery,
        t0: Instant,
        until: Duration,
        rate: f64,
        dark: impl Fn(Duration) -> bool,
    ) -> Vec<(Duration, u64)> {
        let mut now = t0;
        let mut pn = 0;
        let mut link_free = t0;
        let mut acks: BTreeMap<Instant, u64> = BTreeMap::new();
        let mut delivered = Vec::new();
        let mut total = 0;
        while now < t0 + until {
            while r.can_send(now, 1000) {
                send(r, pn, now);
                if !dark(now - t0) {
                    link_free = link_free.max(now) + Duration::from_secs_f64(1000.0 / rate);
                    acks.insert(link_free + Duration::from_millis(20), pn);
                }
                pn += 1;
            }
            let next = [
                acks.keys().next().copied(),
                r.timeout(),
                r.pacing_deadline(),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("something to wait for");
            now = next.max(now);
            while let Some(entry) = acks.first_entry().filter(|e| *e.key() <= now) {
                let acked = entry.remove();
                let out = r.on_ack_received(
                    now,
                    &[AckRange {
                        largest: acked,
                        smallest: acked,
                    }],
                    Duration::ZERO,
                );
                total += out.acked.iter().map(|p| p.size).sum::<u64>();
                delivered.push((now - t0, total));
            }
            if r.timeout().is_some_and(|t| t <= now) {
                r.on_timeout(now, |_| true);
            }
        }
        delivered
    }

    #[test]
    fn after_a_blackout_the_first_answered_probe_brings_the_rate_back() {
        // 200 transfers through one bottleneck whose queue held less than
        // their windows' floors: some lost everything for seconds, and the
        // probe that finally got through measured its bytes over the whole
        // silence (a few hundred bytes per second). Paced at that, the
        // sender waited tens of seconds between bursts with nothing in
        // flight, and its client gave up after 20 s of silence.
        let t0 = Instant::now();
        let rate = 2_500_000.0;
        let mut r = LossRecovery::new(1000);
        let dark = |t: Duration| t >= Duration::from_secs(2) && t < Duration::from_secs(7);
        let delivered = run_path(&mut r, t0, Duration::from_secs(12), rate, dark);
        let back = delivered
            .iter()
            .find(|(t, _)| *t > Duration::from_secs(7))
            .copied()
            .expect("an ACK after the blackout");
        let second_later = delivered
            .iter()
            .take_while(|(t, _)| *t <= back.0 + Duration::from_secs(1))
            .last()
            .map_or(back.1, |d| d.1);
        let got = (second_later - back.1) as f64;
        assert!(
            got > rate * 0.5,
            "{got:.0} bytes in the second after the first ACK at {:?} (link {rate} B/s)",
            back.0
        );
    }

    #[test]
    fn probes_skip_packets_whose_bytes_another_copy_delivered() {
        let t0 = Instant::now();
        let mut r = LossRecovery::new(1000);
        for pn in 0..3 {
            send(&mut r, pn, t0);
        }
        // Packet 0's bytes arrived in another copy; 1 and 2 still matter.
        let needed = |p: &SentPacket| p.packet_number != 0;
        let first = r.timeout().expect("pto armed");
        let out = r.on_timeout(first, needed);
        let probed: Vec<u64> = out.probe.iter().map(|p| p.packet_number).collect();
        assert_eq!(probed, vec![1, 2]);
        // A ping while backing off earns one probe of the oldest needed,
        // once per smoothed RTT.
        let later = first + Duration::from_secs(1);
        let out = r.on_peer_waiting(later, needed);
        let probed: Vec<u64> = out.probe.iter().map(|p| p.packet_number).collect();
        assert_eq!(probed, vec![1]);
        assert!(r.can_send(later, 1000));
        send(&mut r, 3, later);
        assert!(r.on_peer_waiting(later, needed).probe.is_empty());
    }

    #[test]
    fn a_probe_a_ping_earned_leaves_the_probe_timer_on_its_schedule() {
        let t0 = Instant::now();
        let mut r = LossRecovery::new(1000);
        send(&mut r, 0, t0);
        let first = r.timeout().expect("pto armed");
        assert_eq!(r.on_timeout(first, |_| true).probe.len(), 1);
        send(&mut r, 1, first);
        send(&mut r, 2, first);
        let second = r.timeout().expect("pto armed");
        // A ping halfway earns a probe; the timer still fires when it would.
        let ping = first + (second - first) / 2;
        assert_eq!(r.on_peer_waiting(ping, |_| true).probe.len(), 1);
        send(&mut r, 3, ping);
        assert_eq!(r.timeout(), Some(second));
        assert_eq!(r.on_timeout(second, |_| true).probe.len(), 2);
        assert_eq!(r.stats().probe_timeouts, 2);
    }

    #[test]
    fn probe_timeout_backs_off() {
        let t0 = Instant::now();
        let mut r = LossRecovery::new(1000);
        send(&mut r, 0, t0);
        let first = r.timeout().expect("pto armed");
        let out = r.on_timeout(first, |_| true);
        assert_eq!(out.probe.len(), 1);
        assert!(r.can_send(first, u64::MAX / 2));
        let second = r.timeout().expect("pto armed");
        assert!(second - first >= (first - t0) * 2 - Duration::from_millis(1));
    }
}
