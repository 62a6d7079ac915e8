//! The client side of the protocol as a state machine. The element's network
//! task feeds it datagrams and the time and sends what it returns.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::buffering::{self, BufferingCause, BufferingLevel, FlowState};
use super::catalog::{self, CatalogEntry};
use super::crypto::{Psk, SessionKeys};
use super::media_index::MAX_INDEX_BYTES;
use super::ranges::RangeSet;
use super::read_ahead::{self, ReadAhead, ReadAheadPolicy};
use super::receiver::{AckTracker, StreamReceiver};
use super::rtt::RttEstimator;
use super::wire::{
    Body, CloseReason, ConnectionId, DataView, DecodeError, MAX_DATAGRAM_SIZE, MAX_UDP_PAYLOAD,
    OpenErrorKind, OpenRequest, Packet, TransferKind, VERSION,
};

/// First resend of an unanswered Hello or Open.
pub const INITIAL_RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// An Open is not repeated sooner than this, however short the path: the
/// server may be fetching the file's first bytes (object storage).
pub const MIN_OPEN_RETRY_INTERVAL: Duration = Duration::from_millis(20);
/// On a fast link the window is told once it moved by this much, or by an
/// eighth of the read-ahead if that is more, and at most a quarter of it
/// (see `ClientTransfer::window_moved_a_step`). Each move is a refill for
/// the server: the update wakes it, it sends, the burst's ACKs wake it
/// again. A real player's read-ahead is about a second of media (its
/// pipeline's queues hold the rest), and an eighth of it was 45 datagrams
/// of a 4 Mbit/s stream, eight refills a second; 128 KiB is two full GSO
/// sends. Ten real players, alternated, per 15 s: server wake-ups
/// 1,164-1,288 against 1,850-1,868, `sendmsg` 1,594-1,759 against
/// 1,964-2,018.
pub const BATCHED_WINDOW_STEP_BYTES: u64 = 128 * 1024;
/// A window update that moved less than a step of the read-ahead waits
/// only on a link measured at least this many times faster than the media
/// (see `ClientConnection::window_worth_telling`). The link rate is
/// measured while the window is open, so a window that creeps on measures
/// about the media's rate, and a tail loss whose resend comes a probe
/// timeout later reads slower: at 5 % loss with a link barely above the
/// media (as measured), the updates held back read as a link slower than
/// the media, and the read-ahead jumped for the slow-link goal (0.9 MB
/// more sent beyond what was played in the simulation's 15 s stop).
pub const BATCHED_WINDOW_LINK_FACTOR: f64 = 2.0;
/// Resends back off to at most this interval.
pub const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// With an open window and no data for a while, the client repeats its
/// window (and pings), in case the update that opened it was lost: without
/// this, a lost window update would leave both sides waiting forever. The
/// wait is two smoothed RTTs plus four variances (data should have come by
/// then), at least [`MIN_WINDOW_PROBE_INTERVAL`] and at most
/// [`WINDOW_PROBE_INTERVAL`]: on a LAN a lost update then costs
/// milliseconds, not a fixed 200 ms.
pub const WINDOW_PROBE_INTERVAL: Duration = Duration::from_millis(200);
pub const MIN_WINDOW_PROBE_INTERVAL: Duration = Duration::from_millis(5);
/// A server's burst, in datagrams (see `window_probe_interval`).
const BURST_PAUSE_PACKETS: u64 = 8;
/// Two burst pauses longer than this are not waited for (see
/// `window_probe_interval`): 64 short transfers through 10 Mbit/s took
/// 1.23-1.27x the ideal time waiting up to 200 ms, 1.19x with this cut.
const MAX_BURST_PAUSE_WAIT: Duration = Duration::from_millis(400);
/// How often the client pings to measure the round-trip time (the server
/// measures its own from ACKs; the client needs one for its stats and its
/// adaptive choices). Two tiny datagrams a second cost nothing.
pub const RTT_PING_INTERVAL: Duration = Duration::from_secs(1);
/// A player that read nothing for this long, with nothing on its way to
/// it, is paused: its RTT pings wait for the keepalive (see
/// `ClientConnection::rtt_ping_interval`).
pub const PAUSED_AFTER: Duration = Duration::from_secs(2);
/// With another server to move to, a server that answers none of this many
/// pings in a row is given up: one lost ping or pong is not a dead server.
/// At 10 % loss each way a round trip fails 19 % of the time; four in a
/// row (once in 770 tries) took a paused viewer, whose keepalive is one
/// try every 10 s, to another server every two hours or so, and failed
/// the simulation of a minute at that loss once its draws moved. Six in a
/// row happen once in 21,000 tries, and a dead server costs two probe
/// timeouts more (0.59 s in all at 40 ms RTT).
pub const UNANSWERED_PINGS_BEFORE_FAILOVER: u32 = 6;
/// With another server to move to, a handshake unanswered this long moves
/// on: the Hello went out four times (250 ms apart at first).
pub const HANDSHAKE_FAILOVER_TIMEOUT: Duration = Duration::from_secs(1);
/// Pings that check a silent server is alive go one probe timeout apart,
/// within these bounds: a dead server is noticed within a few hundred
/// milliseconds, well inside the seconds of read-ahead a player holds.
pub const MIN_LIVENESS_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_LIVENESS_INTERVAL: Duration = Duration::from_millis(500);
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// What the server may send beyond what was consumed.
    pub read_ahead: ReadAhead,
    /// With a passphrase, the session is authenticated and encrypted, and a
    /// server without the same passphrase is refused.
    pub passphrase: Option<Psk>,
    /// The largest datagram the route to the server carries, as the
    /// driver found it (`None`: not known). Offered to the server when it
    /// is more than [`MAX_DATAGRAM_SIZE`]; the server tries one that large
    /// before it uses it, so a router further on that carries less costs
    /// one datagram.
    pub path_max_datagram: Option<usize>,
}

/// What happened, for the element to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    Connected,
    Opened {
        transfer_id: u32,
        size: u64,
        content_tag: u64,
        offset: u64,
    },
    OpenFailed {
        transfer_id: u32,
        kind: OpenErrorKind,
        message: String,
    },
    Catalog(Vec<CatalogEntry>),
    Closed {
        reason: CloseReason,
        message: String,
    },
    VersionMismatch {
        server_supports: Vec<u8>,
    },
    ProtocolError(String),
    /// The passphrases do not match, or only one side has one.
    AuthenticationFailed(String),
    /// Only with [`ClientConnection::set_fast_failover`]: the server
    /// answered neither the handshake nor [`UNANSWERED_PINGS_BEFORE_FAILOVER`]
    /// pings; the connection is closed so another server can take over.
    Unresponsive {
        silent_for: Duration,
    },
}

/// A resend timer with exponential backoff.
#[derive(Debug, Clone)]
struct RetryTimer {
    next: Option<Instant>,
    interval: Duration,
    initial: Duration,
    /// The interval doubles up to this (or stays at the initial one).
    max: Duration,
}

impl RetryTimer {
    fn new(initial: Duration) -> Self {
        RetryTimer {
            next: None,
            interval: initial,
            initial,
            max: MAX_RETRY_INTERVAL,
        }
    }
    /// A timer that repeats at its initial interval, never backing off.
    fn fixed(initial: Duration) -> Self {
        RetryTimer {
            max: Duration::ZERO,
            ..Self::new(initial)
        }
    }
    fn start(&mut self, now: Instant) {
        self.interval = self.initial;
        self.next = Some(now + self.interval);
    }
    /// Starts with a new initial interval.
    fn start_with(&mut self, now: Instant, initial: Duration) {
        self.initial = initial;
        self.start(now);
    }
    fn stop(&mut self) {
        self.next = None;
    }
    /// True when due; re-arms with a doubled interval.
    fn fire(&mut self, now: Instant) -> bool {
        match self.next {
            Some(t) if t <= now => {
                self.interval = (self.interval * 2).min(self.max.max(self.initial));
                self.next = Some(now + self.interval);
                true
            }
            _ => false,
        }
    }
}

/// Every Open leaves twice, first or repeated: a seek waits on this one
/// small datagram, and at 10 % loss (80 ms RTT) one Open in ten was lost
/// and cost the seek a timeout, and a single repeat, or the single answer
/// it drew, was lost as often and waited a doubled timeout (650 ms where
/// 250 is usual). Two copies are lost together one time in a hundred, for
/// a hundred bytes; the server answers a repeat with the answer alone.
fn push_open_twice(out: &mut VecDeque<Body>, request: OpenRequest) {
    out.push_back(Body::Open(request.clone()));
    out.push_back(Body::Open(request));
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Handshake { cookie: Vec<u8> },
    Established,
    Closed,
}

#[derive(Debug)]
struct ClientTransfer {
    id: u32,
    kind: TransferKind,
    path: String,
    start: u64,
    opened: bool,
    content_tag: u64,
    open_timer: RetryTimer,
    /// The Open was sent again because its data came without its answer.
    open_reasked: bool,
    probe_timer: RetryTimer,
    /// Repeats the ACK (and window) at the window probe's first interval
    /// while bytes below the window are missing, where the probe backs
    /// off: see [`ClientConnection::handle_timeout`].
    ack_repeat_timer: RetryTimer,
    receiver: StreamReceiver,
    catalog_delivered: bool,
    last_data: Option<Instant>,
    /// After the last data, the server could send more: not everything up
    /// to the window it was told of had arrived.
    expecting_more: bool,
    /// The file's index, when the server sends it ahead of the stream.
    index: Option<IndexSentAhead>,
    /// The next ACK tells the whole window, however little it moved: the
    /// buffering goal needs it.
    window_due: bool,
    /// The largest payload a datagram of this transfer brought: the size
    /// the server cuts new data in (see [`ClientTransfer::window_in_whole_datagrams`]).
    datagram_payload: u64,
}

/// The bytes of a file's index that the server sends ahead of the stream
/// (announced in `OpenOk`, see `media_index.rs`), kept apart from the
/// reassembly window: the demuxer reads them from here instead of making
/// the server jump to them and back. The stream itself still carries these
/// bytes when it gets there, so nothing depends on this copy being
/// complete: a read that finds it stalled goes to the server instead.
#[derive(Debug)]
struct IndexSentAhead {
    range: std::ops::Range<u64>,
    bytes: Vec<u8>,
    received: RangeSet,
}

impl IndexSentAhead {
    /// Stores what of `payload` at `offset` falls in the index; returns
    /// how many bytes were new.
    fn insert(&mut self, offset: u64, payload: &[u8]) -> u64 {
        let end = offset.saturating_add(payload.len() as u64);
        let (from, to) = (offset.max(self.range.start), end.min(self.range.end));
        if from >= to {
            return 0;
        }
        let before = self.received.covered();
        let at = (from - self.range.start) as usize;
        let src = (from - offset) as usize;
        let len = (to - from) as usize;
        self.bytes[at..at + len].copy_from_slice(&payload[src..src + len]);
        self.received.insert(from..to);
        self.received.covered() - before
    }
}

impl ClientTransfer {
    /// Bytes below the window the server was told have not arrived, a
    /// hole included: a hole at the read offset stalls the player as surely
    /// as a window not yet filled, and its resend needs the server to hear
    /// of it. A window moved here but not yet told misses nothing: the
    /// server cannot send into it, and `maybe_update_window` tells it when
    /// it matters.
    fn misses_bytes(&self) -> bool {
        self.opened
            && !self.receiver.is_fully_received()
            && self.receiver.advertised() > self.receiver.received_up_to()
    }

    /// The window moved by a step since the server was last told:
    /// [`BATCHED_WINDOW_STEP_BYTES`], between an eighth and a quarter of
    /// the read-ahead. Always worth telling, at once.
    fn window_moved_a_step(&self) -> bool {
        let moved = self
            .receiver
            .window()
            .saturating_sub(self.receiver.advertised());
        let read_ahead = self.receiver.read_ahead();
        moved
            >= BATCHED_WINDOW_STEP_BYTES
                .clamp(read_ahead / 8, read_ahead / 4)
                .max(1)
    }

    /// The window cut to a whole number of the server's datagrams past the
    /// highest byte that arrived, for a move held back to a step of the
    /// read-ahead. The server holds back a sliver of a datagram at the
    /// window's edge while packets are in flight (RFC 1122's sender-side
    /// silly window avoidance) and sends it once they are all
    /// acknowledged: for a real player on a fast link that was a third
    /// turn of the server, and a third ACK, in every refill. What is cut
    /// (less than a datagram) goes with the next move.
    fn window_in_whole_datagrams(&self) -> u64 {
        let window = self.receiver.window();
        let base = self.receiver.highest_received();
        let size = self.datagram_payload;
        if size == 0 || window <= base || self.receiver.end().is_some_and(|e| window >= e) {
            return window;
        }
        let whole = base + (window - base) / size * size;
        if whole > self.receiver.advertised() {
            whole
        } else {
            window
        }
    }

    /// The request that opens this transfer, in an `Open` or a `Hello`,
    /// first or repeated: the window it carries counts as told.
    fn open_request(&mut self) -> OpenRequest {
        let window = self.receiver.window();
        self.receiver.mark_advertised(window);
        OpenRequest {
            transfer_id: self.id,
            kind: self.kind,
            offset: self.start,
            window,
            path: self.path.clone(),
        }
    }
}

/// Counters for stats and logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientStats {
    pub packets_received: u64,
    pub packets_sent: u64,
    pub data_packets: u64,
    pub duplicate_packets: u64,
    pub stale_packets: u64,
    pub bytes_received: u64,
    pub bytes_delivered: u64,
    /// Payload bytes that brought nothing new: they had arrived (or been
    /// delivered) already, so the server resent what was not lost.
    pub bytes_redundant: u64,
    /// Server packets never seen: gaps in its packet numbers.
    pub packets_lost: u64,
    pub smoothed_rtt: Duration,
    pub rtt_variance: Duration,
    pub transfers: u64,
}

pub struct ClientConnection {
    config: ClientConfig,
    phase: Phase,
    nonce: u64,
    connection_id: ConnectionId,
    next_packet_number: u64,
    hello_timer: RetryTimer,
    /// One Hello at a time, unlike the Open (see [`push_open_twice`]): a
    /// second copy would spare a start the 250 ms retry when a Hello or
    /// its Welcome is lost (the server answers each copy), but with two,
    /// `gst-play-1.0` on a link at 0.75x the media's rate paused 14 times
    /// in 3 runs of 5 instead of once (cause not found).
    send_hello: bool,
    transfer: Option<ClientTransfer>,
    next_transfer_id: u32,
    acks: AckTracker,
    out: VecDeque<Body>,
    events: VecDeque<ClientEvent>,
    last_received: Option<Instant>,
    last_sent: Instant,
    keepalive_interval: Duration,
    /// The server's idle timeout: silence this long means the session is gone.
    idle_timeout: Duration,
    stats: ClientStats,
    rtt: RttEstimator,
    /// When the Ping that the next Pong is timed from left: the oldest
    /// one outstanding, unless its Pong is overdue (see
    /// [`Self::awaiting_pong`]).
    rtt_ping_sent: Option<Instant>,
    next_rtt_ping: Instant,
    /// When the player last took bytes.
    last_read: Option<Instant>,
    largest_server_pn: Option<u64>,
    read_ahead: ReadAheadPolicy,
    keys: Option<SessionKeys>,
    /// When the last new byte of a file arrived (pings and repeats do not
    /// count): what "no progress" is measured from.
    last_new_data: Option<Instant>,
    /// Another server can take over: report a silent one quickly.
    fast_failover: bool,
    created_at: Instant,
    /// Pings sent since the server was last heard from.
    unanswered_pings: u32,
    /// With fast failover, when the next ping checks a silent server.
    next_liveness_ping: Option<Instant>,
}

impl ClientConnection {
    /// Starts the handshake. `nonce` must be random: it ties the server's
    /// replies to this client.
    pub fn new(config: ClientConfig, nonce: u64, now: Instant) -> Self {
        let read_ahead_mode = config.read_ahead;
        let mut hello_timer = RetryTimer::new(INITIAL_RETRY_INTERVAL);
        hello_timer.start(now);
        ClientConnection {
            config,
            phase: Phase::Handshake { cookie: Vec::new() },
            nonce,
            connection_id: 0,
            next_packet_number: 0,
            hello_timer,
            send_hello: true,
            transfer: None,
            next_transfer_id: 1,
            acks: AckTracker::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            last_received: None,
            last_sent: now,
            keepalive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            stats: ClientStats::default(),
            rtt: RttEstimator::new(),
            rtt_ping_sent: None,
            next_rtt_ping: now,
            last_read: None,
            largest_server_pn: None,
            read_ahead: ReadAheadPolicy::new(read_ahead_mode),
            keys: None,
            last_new_data: None,
            fast_failover: false,
            created_at: now,
            unanswered_pings: 0,
            next_liveness_ping: None,
        }
    }

    /// Another server can take over if this one goes silent: the
    /// connection then pings a silent server every probe timeout and gives
    /// up with [`ClientEvent::Unresponsive`] after
    /// [`UNANSWERED_PINGS_BEFORE_FAILOVER`] unanswered pings, or after
    /// [`HANDSHAKE_FAILOVER_TIMEOUT`] without a Welcome. Without it only the
    /// idle timeout ends a silent session, as a lone server may be
    /// restarting.
    pub fn set_fast_failover(&mut self, on: bool) {
        self.fast_failover = on;
    }

    fn liveness_interval(&self) -> Duration {
        self.rtt
            .probe_timeout()
            .clamp(MIN_LIVENESS_INTERVAL, MAX_LIVENESS_INTERVAL)
    }

    /// Anything from the server proves it alive.
    fn heard(&mut self, now: Instant) {
        self.last_received = Some(now);
        self.unanswered_pings = 0;
        self.next_liveness_ping = None;
    }

    fn report_unresponsive(&mut self, now: Instant) {
        let since = self.last_received.unwrap_or(self.created_at);
        self.events.push_back(ClientEvent::Unresponsive {
            silent_for: now.saturating_duration_since(since),
        });
        self.phase = Phase::Closed;
    }

    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    pub fn connection_id(&self) -> ConnectionId {
        self.connection_id
    }

    pub fn stats(&self) -> ClientStats {
        let mut s = self.stats;
        s.duplicate_packets = self.acks.duplicates();
        let unique = s.packets_received.saturating_sub(s.duplicate_packets);
        s.packets_lost = self
            .largest_server_pn
            .map_or(0, |l| (l + 1).saturating_sub(unique));
        s.smoothed_rtt = self.rtt.smoothed();
        s.rtt_variance = self.rtt.variance();
        s
    }

    /// Round-trip time as measured by the client's pings.
    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Asks for the catalog; the answer comes as [`ClientEvent::Catalog`].
    pub fn open_catalog(&mut self, now: Instant) -> u32 {
        self.start_transfer(now, TransferKind::Catalog, String::new(), 0)
    }

    /// Opens `path` at `offset`, replacing any current transfer (a seek).
    pub fn open_file(&mut self, now: Instant, path: &str, offset: u64) -> u32 {
        self.start_transfer(now, TransferKind::File, path.to_owned(), offset)
    }

    fn start_transfer(
        &mut self,
        now: Instant,
        kind: TransferKind,
        path: String,
        offset: u64,
    ) -> u32 {
        let id = self.next_transfer_id;
        self.next_transfer_id = self.next_transfer_id.wrapping_add(1).max(1);
        self.stats.transfers += 1;
        self.read_ahead.on_new_transfer();
        self.acks.on_new_transfer();
        let receiver = StreamReceiver::new(offset, self.current_read_ahead(now));
        self.transfer = Some(ClientTransfer {
            id,
            kind,
            path,
            start: offset,
            opened: false,
            content_tag: 0,
            open_timer: RetryTimer::new(INITIAL_RETRY_INTERVAL),
            open_reasked: false,
            probe_timer: RetryTimer::new(WINDOW_PROBE_INTERVAL),
            ack_repeat_timer: RetryTimer::fixed(WINDOW_PROBE_INTERVAL),
            receiver,
            catalog_delivered: false,
            last_data: None,
            expecting_more: false,
            index: None,
            window_due: false,
            datagram_payload: 0,
        });
        if self.phase == Phase::Established {
            self.queue_open(now);
        }
        id
    }

    /// The transfer to ask for in the Hello, saving the round trip of an
    /// Open after the Welcome. Not on passphrase sessions: the Hello is not
    /// encrypted, and the path would travel in the clear.
    fn early_open(&mut self) -> Option<OpenRequest> {
        if self.config.passphrase.is_some() {
            return None;
        }
        Some(self.transfer.as_mut().filter(|t| !t.opened)?.open_request())
    }

    /// How long an Open waits for its answer before it is sent again:
    /// 1.5 smoothed RTTs, at most the fixed interval used before any RTT
    /// sample. An Open is two tiny idempotent datagrams, so a spurious
    /// repeat costs nothing, while the probe timeout (which counts four
    /// RTT variances) reached 250 ms at 80 ms RTT and 10 % loss: a seek
    /// whose two Opens were both lost waited that long.
    fn open_retry_interval(&self) -> Duration {
        (self.rtt.smoothed() * 3 / 2).clamp(MIN_OPEN_RETRY_INTERVAL, INITIAL_RETRY_INTERVAL)
    }

    fn queue_open(&mut self, now: Instant) {
        let interval = self.open_retry_interval();
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        t.open_timer.start_with(now, interval);
        push_open_twice(&mut self.out, t.open_request());
    }

    pub fn set_read_ahead(&mut self, now: Instant, read_ahead: ReadAhead) {
        self.config.read_ahead = read_ahead;
        self.read_ahead.set_mode(read_ahead);
        self.apply_read_ahead(now);
    }

    /// The media's rate in bytes per second of playback (file size /
    /// duration), once the player knows the duration: what a link slower
    /// than the media is measured against.
    pub fn set_media_rate(&mut self, now: Instant, bytes_per_second: Option<f64>) {
        self.read_ahead.set_media_rate(bytes_per_second);
        self.apply_read_ahead(now);
    }

    /// Bytes per second the link delivered recently while the server was
    /// free to send, once measured.
    pub fn link_rate(&self, now: Instant) -> Option<f64> {
        self.read_ahead.link_rate(now)
    }

    /// Bytes per second the player consumed recently, once known.
    pub fn consumption_rate(&self, now: Instant) -> Option<f64> {
        self.read_ahead.consumption_rate(now)
    }

    /// The player holds `bytes` it took but has not played yet (queues
    /// between the source and playback); the adaptive read-ahead counts them.
    pub fn set_held_downstream(&mut self, now: Instant, bytes: u64) {
        self.read_ahead.on_held_downstream(now, bytes);
        self.apply_read_ahead(now);
    }

    /// The read-ahead in bytes the policy chooses now.
    pub fn current_read_ahead(&self, now: Instant) -> u64 {
        self.read_ahead
            .read_ahead(now, self.rtt.smoothed(), self.rtt.variance())
    }

    /// Makes the policy's current choice the transfer's read-ahead, the one
    /// number both the window and the buffering goal derive from. Runs on
    /// every read and every timer, so a choice that changes with time alone
    /// (the rate becoming known, an RTT sample, a gap decaying) reaches the
    /// server even while the player is paused.
    fn apply_read_ahead(&mut self, now: Instant) {
        let remaining = self.remaining();
        self.read_ahead.set_remaining(remaining);
        let bytes = self.current_read_ahead(now);
        if let Some(t) = self.transfer.as_mut() {
            if t.receiver.read_ahead() != bytes {
                t.receiver.set_read_ahead(bytes);
            }
        }
        self.maybe_update_window(now);
    }

    /// The read-ahead in effect for the current transfer: what the window
    /// and the buffering goal are computed from.
    pub fn read_ahead(&self) -> u64 {
        self.transfer
            .as_ref()
            .map_or(0, |t| t.receiver.read_ahead())
    }

    /// How far the player's buffering got, for `cause`. Also keeps the
    /// invariant that 100 % is reachable: the window the server was last
    /// told covers the goal, and a grown window leaves at once (a paused
    /// pipeline reads nothing, so nothing else would send it).
    /// `held_downstream`: bytes the player took and still holds unplayed;
    /// they count as buffered (only the element knows them).
    pub fn buffering_level(
        &mut self,
        now: Instant,
        cause: BufferingCause,
        held_downstream: u64,
    ) -> BufferingLevel {
        self.apply_read_ahead(now);
        let Some(t) = self.transfer.as_ref() else {
            return BufferingLevel {
                cause,
                percent: 100,
                available: 0,
                goal: 0,
                full_at: 0,
            };
        };
        let r = &t.receiver;
        let read_offset = r.read_offset();
        let remaining = if t.opened {
            r.end().map_or(u64::MAX, |e| e.saturating_sub(read_offset))
        } else {
            u64::MAX
        };
        let slow = self.read_ahead.slow_link_goal(now);
        let wanted = buffering::buffering_goal(cause, r.read_ahead(), slow, remaining, u64::MAX);
        let goal_beyond_told =
            r.advertised() < read_offset.saturating_add(wanted) && r.window() > r.advertised();
        let advertised_ahead = r.advertised().saturating_sub(read_offset);
        let goal =
            buffering::buffering_goal(cause, r.read_ahead(), slow, remaining, advertised_ahead);
        let available = r.available();
        if goal_beyond_told {
            self.acks.request_immediate(now);
            if let Some(t) = self.transfer.as_mut() {
                t.window_due = true;
            }
        }
        // What the player holds counts only on a link clearly faster than
        // the media: on one barely faster, starting on it left too little
        // ahead and the first reads after the start paused the player (1
        // run in 3 at 2x the media rate); on a slow link the goal already
        // counts it (the download-time estimate).
        let link = self.link_rate(now).or_else(|| {
            (cause == BufferingCause::Start)
                .then(|| {
                    self.read_ahead
                        .recent_link_rate(now, read_ahead::START_LINK_RATE_SPAN)
                })
                .flatten()
        });
        let fast = match (self.read_ahead.media_rate(), link) {
            (Some(media), Some(link)) => link >= media * buffering::FAST_LINK_FACTOR,
            _ => false,
        };
        let held = if fast { held_downstream } else { 0 };
        BufferingLevel {
            cause,
            percent: buffering::buffering_percent(available.saturating_add(held), goal),
            available,
            goal,
            full_at: goal.saturating_sub(held),
        }
    }

    /// When the last packet of this session arrived, of any kind.
    pub fn last_received(&self) -> Option<Instant> {
        self.last_received
    }

    /// When the last new byte of a file arrived.
    pub fn last_new_data(&self) -> Option<Instant> {
        self.last_new_data
    }

    /// The flow-control state, for stats and for an error that says why a
    /// stream stopped.
    pub fn flow_state(&self, now: Instant) -> FlowState {
        let state = match self.transfer.as_ref() {
            Some(t) => {
                let r = &t.receiver;
                let read_offset = r.read_offset();
                FlowState {
                    read_offset,
                    window: r.advertised().saturating_sub(read_offset),
                    buffered: r.buffered(),
                    available: r.available(),
                    // Every byte held lies inside the window (the
                    // receiver drops what is beyond it).
                    outstanding: r
                        .advertised()
                        .saturating_sub(read_offset)
                        .saturating_sub(r.buffered()),
                    since_last_data: None,
                    buffering: None,
                }
            }
            None => FlowState::default(),
        };
        state.since(self.last_new_data, now)
    }

    /// Bytes ready to read at the current offset.
    pub fn available(&self) -> u64 {
        self.transfer.as_ref().map_or(0, |t| t.receiver.available())
    }

    /// Window last sent to the server (absolute offset).
    pub fn advertised_window(&self) -> Option<u64> {
        self.transfer.as_ref().map(|t| t.receiver.advertised())
    }

    /// Bytes held for the current transfer, in order or not.
    pub fn buffered(&self) -> u64 {
        self.transfer.as_ref().map_or(0, |t| t.receiver.buffered())
    }

    pub fn read_offset(&self) -> Option<u64> {
        self.transfer.as_ref().map(|t| t.receiver.read_offset())
    }

    /// Bytes of the open file between the read offset and the end of the
    /// transfer, once the server said where it ends.
    pub fn remaining(&self) -> Option<u64> {
        self.transfer
            .as_ref()
            .filter(|t| t.opened && t.kind == TransferKind::File)
            .and_then(|t| Some(t.receiver.end()?.saturating_sub(t.receiver.read_offset())))
    }

    /// Every byte of the current transfer has been read.
    pub fn is_finished(&self) -> bool {
        self.transfer
            .as_ref()
            .is_some_and(|t| t.opened && t.receiver.is_finished())
    }

    /// The range of the file's index the server sends ahead, if it does.
    pub fn index_range(&self) -> Option<std::ops::Range<u64>> {
        self.transfer
            .as_ref()?
            .index
            .as_ref()
            .map(|i| i.range.clone())
    }

    /// The index bytes that arrived contiguously from `offset`, at most
    /// `max`; empty when `offset` is outside the index or not there yet.
    pub fn index_bytes(&self, offset: u64, max: usize) -> &[u8] {
        let Some(i) = self.transfer.as_ref().and_then(|t| t.index.as_ref()) else {
            return &[];
        };
        if !i.range.contains(&offset) {
            return &[];
        }
        let end = i
            .received
            .contiguous_end(offset)
            .min(offset.saturating_add(max as u64));
        let at = (offset - i.range.start) as usize;
        &i.bytes[at..at + (end - offset) as usize]
    }

    /// Takes up to `max` bytes in order from the current file transfer.
    pub fn read(&mut self, now: Instant, max: usize) -> Option<Bytes> {
        let t = self.transfer.as_mut()?;
        if t.kind != TransferKind::File {
            return None;
        }
        let chunk = t.receiver.read(max)?;
        // Back from a pause: measure the path again now, not at the next
        // keepalive.
        if self.is_paused(now) {
            self.next_rtt_ping = self.next_rtt_ping.min(now);
        }
        self.last_read = Some(now);
        self.stats.bytes_delivered += chunk.len() as u64;
        self.read_ahead.on_consumed(now, chunk.len() as u64);
        self.apply_read_ahead(now);
        Some(chunk)
    }

    /// What arrived in order at the read offset, taken out without counting
    /// as the player's consumption: the transfer is about to be replaced
    /// by a jump, and the caller keeps these bytes in case the demuxer
    /// comes back. Returns the chunk's offset too.
    pub fn salvage(&mut self, max: usize) -> Option<(u64, Bytes)> {
        let t = self.transfer.as_mut()?;
        if t.kind != TransferKind::File {
            return None;
        }
        let offset = t.receiver.read_offset();
        let chunk = t.receiver.read(max)?;
        Some((offset, chunk))
    }

    /// Whether the window moved enough to be worth telling the server (in
    /// the next ACK): by a step (at most a quarter of the read-ahead, see
    /// [`BATCHED_WINDOW_STEP_BYTES`]), or to the end of the file. A smaller
    /// move waits while the link measures at least
    /// [`BATCHED_WINDOW_LINK_FACTOR`] times the media's rate, even when the
    /// server has sent up to the old window: the player still holds three
    /// quarters of the read-ahead or more, and the link refills the step
    /// at least twice as fast as it is played.
    /// Told in every ACK and at each read, the window crept on by a read's
    /// worth and the server sent a read's worth for each (Clark's silly
    /// window, RFC 813): a `gst-launch-1.0 udpvidsrc ! decodebin` viewer of
    /// 4 Mbit/s cost the server an ACK and a `sendmsg` for every five or
    /// six datagrams. On a slower link (or one not measured yet) every move
    /// is told, as each moment the server waits there may be lost for good.
    fn window_worth_telling(&self, now: Instant) -> bool {
        self.window_to_tell(now).is_some()
    }

    /// The window the next ACK should tell, if it is worth telling: the
    /// whole window, or on a fast link, where moves are held back to a
    /// step, the window in whole datagrams.
    fn window_to_tell(&self, now: Instant) -> Option<u64> {
        let t = self.transfer.as_ref()?;
        let window = t.receiver.window();
        if window <= t.receiver.advertised() {
            return None;
        }
        let whole = t.receiver.end().is_some_and(|e| window >= e)
            || t.kind != TransferKind::File
            || t.window_due
            || !self
                .read_ahead
                .link_outpaces_media(now, BATCHED_WINDOW_LINK_FACTOR);
        if whole {
            Some(window)
        } else if t.window_moved_a_step() {
            Some(t.window_in_whole_datagrams())
        } else {
            None
        }
    }

    /// Sends the window at once when it is worth telling and the server
    /// waits for it, or moved by a step of the read-ahead.
    fn maybe_update_window(&mut self, now: Instant) {
        let repeat_interval = self.ack_repeat_interval();
        let Some(t) = self.transfer.as_ref() else {
            return;
        };
        if !t.opened || self.phase != Phase::Established {
            return;
        }
        let sender_waiting = t.receiver.highest_received() >= t.receiver.advertised();
        if !self.window_worth_telling(now) {
            return;
        }
        if sender_waiting || t.window_moved_a_step() {
            self.acks.request_immediate(now);
            // Data is awaited again: the ACK repeat (stopped while nothing
            // below the told window was missing) covers this update's loss.
            if let Some(t) = self.transfer.as_mut() {
                if t.ack_repeat_timer.next.is_none() {
                    t.ack_repeat_timer.start_with(now, repeat_interval);
                }
            }
        }
    }

    fn ack_repeat_interval(&self) -> Duration {
        (self.rtt.smoothed() * 2 + self.rtt.variance() * 4)
            .clamp(MIN_WINDOW_PROBE_INTERVAL, WINDOW_PROBE_INTERVAL)
    }

    fn window_probe_interval(&self, now: Instant) -> Duration {
        let rtts = self.ack_repeat_interval();
        rtts.max(self.burst_pauses(now))
            .clamp(MIN_WINDOW_PROBE_INTERVAL, WINDOW_PROBE_INTERVAL)
    }

    /// Two of a pacing server's pauses between bursts at the rate data
    /// came at (zero when unknown or past [`MAX_BURST_PAUSE_WAIT`]).
    fn burst_pauses(&self, now: Instant) -> Duration {
        // A pause between two bursts is no stall, and a probe in it earns
        // a Pong, a send of its own (3,700 a second at 200 paced pulls).
        // Pauses longer than `MAX_BURST_PAUSE_WAIT` are a narrow link's
        // many sessions, whose lost tails the probes recover.
        let pauses = self
            .link_rate(now)
            .filter(|r| *r > 0.0)
            .map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(2.0 * (BURST_PAUSE_PACKETS * 1400) as f64 / r)
            });
        if pauses > MAX_BURST_PAUSE_WAIT {
            Duration::ZERO
        } else {
            pauses
        }
    }

    fn auth_failed(&mut self, why: &str) {
        self.events
            .push_back(ClientEvent::AuthenticationFailed(why.to_owned()));
        self.phase = Phase::Closed;
    }

    /// The session is authenticated and encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// Ends the session; a Close goes out with the next transmit.
    pub fn close(&mut self) {
        if self.phase == Phase::Established {
            self.out.push_back(Body::Close {
                reason: CloseReason::Normal,
                message: String::new(),
            });
        }
        self.phase = Phase::Closed;
    }

    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        let opened;
        let mut datagram = datagram;
        if let Some(keys) = &self.keys {
            match keys.open(datagram) {
                Some(plain) => {
                    opened = plain;
                    datagram = &opened;
                }
                // Only one unsealed message is accepted: a restarted server
                // saying it no longer knows us (it has no keys to seal with);
                // at worst a forged one makes us reconnect and authenticate again.
                None => match Packet::decode(datagram) {
                    Ok(Packet {
                        connection_id,
                        body:
                            Body::Close {
                                reason: CloseReason::UnknownConnection,
                                message,
                            },
                        ..
                    }) if connection_id == self.connection_id => {
                        self.events.push_back(ClientEvent::Closed {
                            reason: CloseReason::UnknownConnection,
                            message,
                        });
                        self.phase = Phase::Closed;
                        return;
                    }
                    _ => return,
                },
            }
        }
        // Nearly every datagram is Data: its payload goes from the receive
        // buffer into reassembly without an intermediate copy.
        if let Some(d) = DataView::parse(datagram) {
            if self.phase == Phase::Established && d.connection_id == self.connection_id {
                self.on_packet_received(now, d.packet_number);
                self.on_data(now, d.packet_number, d.transfer_id, d.offset, d.payload);
            }
            return;
        }
        let packet = match Packet::decode(datagram) {
            Ok(p) => p,
            Err(DecodeError::UnsupportedVersion(v)) => {
                if matches!(self.phase, Phase::Handshake { .. }) {
                    self.events.push_back(ClientEvent::VersionMismatch {
                        server_supports: vec![v],
                    });
                    self.phase = Phase::Closed;
                }
                return;
            }
            Err(_) => return,
        };
        match (&self.phase, packet.body) {
            (Phase::Closed, _) => {}
            (
                Phase::Handshake { .. },
                Body::Retry {
                    client_nonce,
                    cookie,
                },
            ) if client_nonce == self.nonce => {
                self.heard(now);
                self.phase = Phase::Handshake { cookie };
                self.send_hello = true;
            }
            (
                Phase::Handshake { .. },
                Body::Welcome {
                    client_nonce,
                    idle_timeout_ms,
                    server_random,
                    auth_tag,
                    early_open_accepted,
                    ..
                },
            ) if client_nonce == self.nonce && packet.connection_id != 0 => {
                self.heard(now);
                let id = packet.connection_id;
                match (&self.config.passphrase, auth_tag) {
                    (None, None) => {}
                    (Some(psk), Some(tag))
                        if psk.verify_welcome(client_nonce, id, &server_random, &tag) =>
                    {
                        self.keys = Some(psk.session_keys(client_nonce, id, &server_random, false));
                    }
                    (Some(_), Some(_)) => return self.auth_failed("wrong passphrase"),
                    (Some(_), None) => {
                        return self.auth_failed(
                            "the server does not use a passphrase, but one was given",
                        );
                    }
                    (None, Some(_)) => return self.auth_failed("the server requires a passphrase"),
                }
                self.connection_id = packet.connection_id;
                self.phase = Phase::Established;
                self.hello_timer.stop();
                self.send_hello = false;
                // Ping well inside the server's idle timeout.
                self.idle_timeout =
                    Duration::from_millis(idle_timeout_ms as u64).max(Duration::from_millis(300));
                self.keepalive_interval = (Duration::from_millis(idle_timeout_ms as u64) / 3)
                    .max(Duration::from_millis(100));
                self.events.push_back(ClientEvent::Connected);
                let interval = self.open_retry_interval();
                match self.transfer.as_mut() {
                    // The answer is on its way; the Open is sent again only
                    // if it does not come.
                    Some(t) if early_open_accepted && !t.opened => {
                        t.open_timer.start_with(now, interval)
                    }
                    Some(_) => self.queue_open(now),
                    None => {}
                }
            }
            // One listing this client's own version answered some other
            // datagram: an earlier socket's on this port (the OS reuses
            // ports), or a forged one. RFC 9000 (6.2) has clients drop
            // such lists too.
            (Phase::Handshake { .. }, Body::VersionNegotiation { supported })
                if !supported.contains(&VERSION) =>
            {
                self.events.push_back(ClientEvent::VersionMismatch {
                    server_supports: supported,
                });
                self.phase = Phase::Closed;
            }
            (
                Phase::Handshake { .. },
                Body::Close {
                    reason: CloseReason::AuthenticationRequired,
                    ..
                },
            ) if packet.connection_id == 0 => {
                self.heard(now);
                self.auth_failed("the server requires a passphrase");
            }
            // An unknown-connection Close answers a packet with a
            // connection id, which a handshaking client has not sent: it
            // is meant for an earlier socket on this port.
            (Phase::Handshake { .. }, Body::Close { reason, message })
                if packet.connection_id == 0 && reason != CloseReason::UnknownConnection =>
            {
                self.heard(now);
                self.events
                    .push_back(ClientEvent::Closed { reason, message });
                self.phase = Phase::Closed;
            }
            (Phase::Handshake { .. }, _) => {}
            (Phase::Established, body) => {
                if packet.connection_id != self.connection_id {
                    return;
                }
                let pn = packet.packet_number;
                self.on_packet_received(now, pn);
                self.handle_established(now, pn, body);
            }
        }
    }

    /// Every packet of the session that arrived, of any kind.
    fn on_packet_received(&mut self, now: Instant, pn: u64) {
        self.heard(now);
        self.stats.packets_received += 1;
        self.largest_server_pn = Some(self.largest_server_pn.map_or(pn, |l| l.max(pn)));
    }

    fn on_data(&mut self, now: Instant, pn: u64, transfer_id: u32, offset: u64, payload: &[u8]) {
        let probe_interval = self.window_probe_interval(now);
        let repeat_interval = self.ack_repeat_interval();
        self.stats.data_packets += 1;
        self.acks.on_packet(now, pn, self.rtt.ack_delay());
        let Some(t) = self.transfer.as_mut().filter(|t| t.id == transfer_id) else {
            self.stats.stale_packets += 1;
            return;
        };
        self.stats.bytes_received += payload.len() as u64;
        // The server answers an Open before it sends the first byte, so its
        // data without the answer means the answer was lost: ask again now.
        // The retry timer (a probe timeout: 250-400 ms at 10 % loss and
        // 80 ms RTT) kept a seek waiting with its bytes already here, as
        // the element waits for the answer before it reads.
        if !t.opened && !t.open_reasked {
            t.open_reasked = true;
            push_open_twice(&mut self.out, t.open_request());
        }
        let mut gap_recorded = false;
        // A long silence while the window was open is a stall the
        // link can cause again: the read-ahead should cover it.
        // (None within one receive: its datagrams share the instant.)
        if let Some(last) = t.last_data.filter(|&l| t.expecting_more && l != now) {
            let gap = now.saturating_duration_since(last);
            if gap > (self.rtt.smoothed() * 2).max(Duration::from_millis(20)) {
                self.read_ahead.on_delivery_gap(now, gap);
                gap_recorded = true;
            }
        }
        // Was the server free to send this? Then it measures the link.
        let window_open = t.receiver.window() > t.receiver.highest_received();
        let ahead = t.index.as_mut().map_or(0, |i| i.insert(offset, payload));
        if ahead > 0 {
            self.last_new_data = Some(now);
        }
        let new = t.receiver.insert(offset, payload);
        t.datagram_payload = t.datagram_payload.max(payload.len() as u64);
        self.stats.bytes_redundant += (payload.len() as u64).saturating_sub(new);
        let sender_blocked = t.receiver.window_used_up();
        if new > 0 && t.kind == TransferKind::File {
            self.last_new_data = Some(now);
            if window_open {
                self.read_ahead.on_arrival(now, new);
            }
            // Reached even with a hole behind: at 1 % loss four window
            // updates in ten came with one, and the wait for the next update
            // counted as link time read as a link slower than the media.
            self.read_ahead
                .set_window_filled(t.receiver.sender_reached_window());
        }
        t.last_data = Some(now);
        // More is expected only if the server may send it: the window moved
        // here but not yet told is ours to send, and the silence until then
        // is no stall of the link (it grew the read-ahead by the time to
        // consume a step of it, a quarter second or more).
        t.expecting_more = !t.receiver.is_fully_received() && !sender_blocked;
        // A hole is repaired at the round trip's pace; only a clean
        // stream's pauses are a pacing server's bursts.
        let holes = t.receiver.highest_received() > t.receiver.received_up_to();
        t.probe_timer.start_with(
            now,
            if holes {
                repeat_interval
            } else {
                probe_interval
            },
        );
        // The ACK repeat waits out a pacing server's pauses too: each
        // repeat in them acknowledged nothing new yet cost the server a
        // receive and a pass through the session's recovery (200 paced
        // pulls: three ACKs in four from the clients, 3,300 a second).
        t.ack_repeat_timer.start_with(now, probe_interval);
        self.deliver_catalog();
        if gap_recorded {
            self.apply_read_ahead(now);
        }
    }

    fn handle_established(&mut self, now: Instant, pn: u64, body: Body) {
        match body {
            Body::Data {
                transfer_id,
                offset,
                payload,
            } => self.on_data(now, pn, transfer_id, offset, &payload),
            Body::OpenOk {
                transfer_id,
                size,
                content_tag,
                offset,
                index,
            } => {
                let read_ahead = self.current_read_ahead(now);
                let probe_interval = self.window_probe_interval(now);
                let repeat_interval = self.ack_repeat_interval();
                let Some(t) = self.transfer.as_mut().filter(|t| t.id == transfer_id) else {
                    return;
                };
                if t.opened {
                    return;
                }
                t.opened = true;
                t.content_tag = content_tag;
                t.open_timer.stop();
                t.probe_timer.start_with(now, probe_interval);
                t.ack_repeat_timer.start_with(now, repeat_interval);
                if offset != t.start {
                    // The server clamped an offset past the end.
                    t.start = offset;
                    t.receiver = StreamReceiver::new(offset, read_ahead);
                }
                t.receiver.set_end(size);
                // Bounded here too: the length comes from the network.
                t.index = index
                    .filter(|r| r.end - r.start <= MAX_INDEX_BYTES)
                    .map(|range| IndexSentAhead {
                        bytes: vec![0; (range.end - range.start) as usize],
                        range,
                        received: RangeSet::new(),
                    });
                self.events.push_back(ClientEvent::Opened {
                    transfer_id,
                    size,
                    content_tag,
                    offset,
                });
                self.deliver_catalog();
                self.maybe_update_window(now);
            }
            Body::OpenError {
                transfer_id,
                kind,
                message,
            } if self.transfer.as_ref().is_some_and(|t| t.id == transfer_id) => {
                self.transfer = None;
                self.events.push_back(ClientEvent::OpenFailed {
                    transfer_id,
                    kind,
                    message,
                });
            }
            Body::Close { reason, message } => {
                self.events
                    .push_back(ClientEvent::Closed { reason, message });
                self.phase = Phase::Closed;
            }
            Body::Ping => self.out.push_back(Body::Pong),
            Body::Pong => {
                if let Some(sent) = self.rtt_ping_sent.take() {
                    self.rtt
                        .update(now.saturating_duration_since(sent), Duration::ZERO);
                    // The read-ahead counts the RTT.
                    self.apply_read_ahead(now);
                }
            }
            // Pongs only refresh `last_received`; replies to our handshake
            // repeated after it completed, and client-only messages, are ignored.
            _ => {}
        }
    }

    fn deliver_catalog(&mut self) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        if t.kind != TransferKind::Catalog || !t.opened || t.catalog_delivered {
            return;
        }
        if !t.receiver.is_fully_received() {
            return;
        }
        t.catalog_delivered = true;
        let mut bytes = Vec::new();
        while let Some(chunk) = t.receiver.read(usize::MAX) {
            bytes.extend_from_slice(&chunk);
        }
        match catalog::decode(&bytes) {
            Ok(entries) => self.events.push_back(ClientEvent::Catalog(entries)),
            Err(e) => self
                .events
                .push_back(ClientEvent::ProtocolError(e.to_string())),
        }
    }

    /// What the Hello offers: the path's datagram size when it is worth a
    /// trial (twice Ethernet's at least).
    fn large_datagram_offer(&self) -> Option<u16> {
        self.config
            .path_max_datagram
            .filter(|&m| m >= 2 * MAX_DATAGRAM_SIZE)
            .map(|m| m.min(MAX_UDP_PAYLOAD).min(u16::MAX as usize) as u16)
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if let Phase::Handshake { cookie } = &self.phase {
            if self.send_hello {
                self.send_hello = false;
                let body = Body::Hello {
                    client_nonce: self.nonce,
                    cookie: cookie.clone(),
                    wants_auth: self.config.passphrase.is_some(),
                    early_open: self.early_open(),
                    max_datagram: self.large_datagram_offer(),
                };
                return Some(self.emit(now, body));
            }
            return None;
        }
        if let Some(body) = self.out.pop_front() {
            return Some(self.emit(now, body));
        }
        if self.phase != Phase::Established {
            return None;
        }
        if self.acks.ack_deadline().is_some_and(|d| d <= now) {
            let body = self.build_ack(now);
            return Some(self.emit(now, body));
        }
        None
    }

    fn build_ack(&mut self, now: Instant) -> Body {
        let (ranges, delay) = self.acks.build(now);
        let tell = self.window_to_tell(now);
        let (transfer_id, window, received_up_to) = match self.transfer.as_mut() {
            Some(t) => {
                let w = match tell {
                    Some(w) => {
                        t.window_due = false;
                        w
                    }
                    None => t.receiver.advertised(),
                };
                t.receiver.mark_advertised(w);
                (t.id, w, t.receiver.received_up_to())
            }
            None => (0, 0, 0),
        };
        Body::Ack {
            transfer_id,
            window,
            received_up_to,
            ack_delay_micros: delay.as_micros().min(u32::MAX as u128) as u32,
            ranges,
        }
    }

    fn emit(&mut self, now: Instant, body: Body) -> Vec<u8> {
        if body == Body::Ping {
            // A Pong carries no Ping's number: it is timed from the oldest
            // Ping outstanding, the right one while none is lost. One
            // whose Pong is overdue was lost (or its Pong was), and the
            // next Pong, this Ping's, timed from it would add the gap
            // between them: at 5 % loss both ways one seed of twelve of
            // an 80 ms path had its smoothed RTT at 257 ms after 15 s, and
            // the read-ahead, which counts it, sent 1.4 MB more beyond
            // what was played. Skipping the sample instead (Karn's rule)
            // starves a slow link's client, whose Pings always overlap.
            if !self.awaiting_pong(now) {
                self.rtt_ping_sent = Some(now);
            }
            self.unanswered_pings += 1;
            if self.fast_failover {
                self.next_liveness_ping = Some(now + self.liveness_interval());
            }
        }
        let pn = self.next_packet_number;
        self.next_packet_number += 1;
        self.last_sent = now;
        self.stats.packets_sent += 1;
        let mut d = Packet::new(self.connection_id, pn, body).encode();
        if let Some(keys) = &self.keys {
            keys.seal(&mut d);
        }
        d
    }

    /// The player reads nothing and expects nothing: everything up to the
    /// window the server was told of is here (or the file is), and nothing
    /// was read for [`PAUSED_AFTER`].
    fn is_paused(&self, now: Instant) -> bool {
        let reading = self
            .last_read
            .is_some_and(|t| now.saturating_duration_since(t) < PAUSED_AFTER);
        let data_coming = self.transfer.as_ref().is_some_and(|t| {
            !t.opened || (!t.receiver.is_fully_received() && !t.receiver.window_used_up())
        });
        !reading && !data_coming
    }

    /// Whether a Ping's Pong may still come: one was sent, less than a
    /// probe timeout and less than twice the smoothed RTT ago (a round
    /// trip that grew as much within one Ping gives, at worst, one sample
    /// too short). Past that it was lost.
    fn awaiting_pong(&self, now: Instant) -> bool {
        let overdue_after = self.rtt.probe_timeout().max(self.rtt.smoothed() * 2);
        self.rtt_ping_sent
            .is_some_and(|t| now.saturating_duration_since(t) <= overdue_after)
    }

    /// Every [`RTT_PING_INTERVAL`] while data flows or the player reads; a
    /// paused player pings only as its keepalive: two datagrams a second
    /// per paused session cost a server with 2000 of them 9 % of a core
    /// (`load paused 2000 60`), for RTT samples nobody used.
    fn rtt_ping_interval(&self, now: Instant) -> Duration {
        if self.is_paused(now) {
            self.keepalive_interval.max(RTT_PING_INTERVAL)
        } else {
            RTT_PING_INTERVAL
        }
    }

    /// Acknowledges at once what arrived and is not yet acknowledged: for
    /// a driver that let datagrams wait in the socket for a while (the
    /// blocking client's coalesced looks), so their ACK delay was spent
    /// there and waiting again would take it past what the sender allows.
    pub fn acknowledge_now(&mut self, now: Instant) {
        self.acks.hurry(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        match self.phase {
            Phase::Closed => return None,
            Phase::Handshake { .. } => {
                consider(self.hello_timer.next);
                if self.fast_failover {
                    consider(Some(self.created_at + HANDSHAKE_FAILOVER_TIMEOUT));
                }
            }
            Phase::Established => {
                consider(self.acks.ack_deadline());
                consider(self.next_liveness_ping);
                consider(Some(self.last_sent + self.keepalive_interval));
                consider(self.last_received.map(|t| t + self.idle_timeout));
                consider(Some(self.next_rtt_ping));
                if let Some(t) = &self.transfer {
                    consider(t.open_timer.next);
                    if t.opened && !t.receiver.is_fully_received() {
                        consider(t.probe_timer.next);
                        consider(t.ack_repeat_timer.next);
                    }
                }
            }
        }
        next
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Closed => {}
            Phase::Handshake { .. } => {
                if self.fast_failover
                    && now.saturating_duration_since(self.created_at) >= HANDSHAKE_FAILOVER_TIMEOUT
                {
                    return self.report_unresponsive(now);
                }
                if self.hello_timer.fire(now) {
                    self.send_hello = true;
                }
            }
            Phase::Established => {
                if self
                    .last_received
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.idle_timeout)
                {
                    // The server has certainly dropped us by now.
                    self.events.push_back(ClientEvent::Closed {
                        reason: CloseReason::IdleTimeout,
                        message: format!(
                            "nothing from the server for {:.1} s",
                            self.idle_timeout.as_secs_f64()
                        ),
                    });
                    self.phase = Phase::Closed;
                    return;
                }
                if self.next_liveness_ping.is_some_and(|t| t <= now) {
                    if self.unanswered_pings >= UNANSWERED_PINGS_BEFORE_FAILOVER {
                        return self.report_unresponsive(now);
                    }
                    self.next_liveness_ping = None;
                    if !self.out.contains(&Body::Ping) {
                        self.out.push_back(Body::Ping);
                    }
                }
                let mut resend_open = false;
                let mut probe = false;
                let mut repeat_ack = false;
                if let Some(t) = self.transfer.as_mut() {
                    resend_open = t.open_timer.fire(now);
                    // Data stopped although the window is open: repeat the
                    // window in case the update that opened it was lost.
                    let streaming = t.opened && !t.receiver.is_fully_received();
                    let waiting =
                        streaming && t.receiver.advertised() > t.receiver.highest_received();
                    // The probe fires (and re-arms) whether or not the
                    // window is open, as it always did. The ACK repeat
                    // stops while nothing is missing (a paused player's
                    // window used up): on a LAN its interval is 5 ms.
                    // `maybe_update_window` starts it again when the window
                    // opens past what arrived.
                    let probe_due = streaming && {
                        let p = t.probe_timer.fire(now);
                        repeat_ack = t.ack_repeat_timer.fire(now);
                        p
                    };
                    probe = waiting && probe_due;
                    let missing = t.misses_bytes();
                    if repeat_ack && !missing {
                        t.ack_repeat_timer.stop();
                    }
                    repeat_ack &= missing;
                }
                if resend_open {
                    if let Some(t) = self.transfer.as_mut() {
                        push_open_twice(&mut self.out, t.open_request());
                    }
                }
                if probe {
                    self.acks.request_immediate(now);
                    // A Ping gets an answer, so a paused-but-alive server is
                    // told apart from a dead one. A pacing server heard from
                    // lately is alive, and its Pong would be a send of its
                    // own: the ACK alone earns the same probe if one is due
                    // (`LossRecovery::on_peer_waiting`). 200 paced pulls:
                    // ~700 Pongs a second, a third of the server's sends.
                    // Without the pause rule (a narrow link's many
                    // sessions) the Ping stays: the simulation of 64 short
                    // transfers dropped 33 % and took 1.39x without it.
                    let paced = self.burst_pauses(now) > self.ack_repeat_interval();
                    let heard_lately = self
                        .last_received
                        .is_some_and(|t| now.saturating_duration_since(t) < WINDOW_PROBE_INTERVAL);
                    if !(paced && heard_lately) {
                        self.out.push_back(Body::Ping);
                    }
                } else if repeat_ack {
                    // The ACK alone, without backing off: when the server
                    // stopped because our ACKs were lost (its window full
                    // of packets we hold), the next one that gets through
                    // lets it send again. The probe's backoff left a viewer
                    // on a link with bursts of loss waiting up to 10 s for
                    // it (simulation, 3 % loss in bursts of 8 both ways: 7
                    // stalls in 20 runs of 59 s, the longest 10.2 s; 5, the
                    // longest 2.5 s, with the ACK repeated). An ACK earns
                    // the server nothing to send unless it acknowledges
                    // something new, so a bottleneck shared by too many is
                    // not fed more, as pings at that rate did (each earns a
                    // probe).
                    self.acks.request_immediate(now);
                }
                // The policy's choice moves with time alone (the rate
                // window filling, a remembered gap decaying): keep the
                // window in step even when nothing is read.
                self.apply_read_ahead(now);
                if self.next_rtt_ping <= now {
                    self.next_rtt_ping = now + self.rtt_ping_interval(now);
                    // A ping whose Pong is overdue was lost: measure anew
                    // (`emit` times the next Pong from the new one).
                    if !self.awaiting_pong(now) && !self.out.contains(&Body::Ping) {
                        self.out.push_back(Body::Ping);
                    }
                }
                if now.saturating_duration_since(self.last_sent) >= self.keepalive_interval
                    && !self.out.contains(&Body::Ping)
                {
                    self.out.push_back(Body::Ping);
                }
            }
        }
    }
}
