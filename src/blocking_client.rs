//! A blocking driver for [`ClientConnection`]: one UDP socket and one network
//! thread, with cancellable waits for the element's streaming thread (and
//! for simple tools such as the catalog example).
//!
//! The network thread receives datagrams and runs timers; any thread that
//! changes the connection (reading, seeking) sends what the change produced
//! itself, so a window update leaves at once instead of at the next tick.

use std::fmt;
use std::io::{IoSliceMut, Write};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn_udp::{RecvMeta, UdpSocketState};

use crate::location::{self, MAX_SERVERS};
use crate::protocol::buffering::{BufferingCause, BufferingLevel, FlowState};
use crate::protocol::catalog::CatalogEntry;
use crate::protocol::client::{ClientConfig, ClientConnection, ClientEvent, ClientStats};
use crate::protocol::read_ahead::ReadAhead;
use crate::protocol::wire::{CloseReason, OpenErrorKind, VERSION};

/// The network thread never sleeps longer than this without looking at its
/// connection (a safety net: timers and a stop request wake it earlier).
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Receive buffer we ask for: a read-ahead's worth of datagrams in flight.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Bytes already handed out that are kept, so a demuxer that reads a little
/// backwards (qtdemux alternating between audio and video chunks does) is
/// served locally instead of making the server start again.
pub const HISTORY_BYTES: usize = 2 * 1024 * 1024;
/// A forward jump this short is made by consuming the bytes in between,
/// those that arrived and those on their way, instead of asking the server
/// to start again: at this distance they arrive sooner than a new transfer
/// would start (one RTT plus slow start). Beyond it (qtdemux jumping to a
/// `moov` at the end, say) the server is asked.
pub const LOCAL_SKIP_LIMIT: u64 = 256 * 1024;
/// A jump the server must serve starts this far before the asked offset:
/// demuxers land on a keyframe and then read the audio just before it
/// (qtdemux: about 2 KiB back in two seeks out of three), which would
/// otherwise cost a second round trip. Kept well under the first flight
/// (ten datagrams) so the asked bytes still come in it.
pub const SEEK_BACK_MARGIN: u64 = 8 * 1024;

/// How long a read of the index sent ahead waits with no new bytes
/// arriving (at least; four RTTs on a slow path) before it asks the server.
pub const INDEX_PATIENCE: Duration = Duration::from_millis(200);
/// The longest a read waits for the index sent ahead, however well the
/// stream flows.
pub const INDEX_MAX_WAIT: Duration = Duration::from_secs(2);

/// A forward jump from the stream's `current` offset to `offset` is made by
/// consuming the bytes in between (see [`LOCAL_SKIP_LIMIT`]): those `ready`
/// and, up to the limit, those the read-ahead brings anyway.
fn skips_locally(current: u64, offset: u64, ready: u64, read_ahead: u64) -> bool {
    offset >= current && offset - current <= ready.max(read_ahead.min(LOCAL_SKIP_LIMIT))
}

/// One contiguous range of the file, as the chunks handed out.
#[derive(Debug, Default)]
struct Segment {
    start: u64,
    chunks: std::collections::VecDeque<Bytes>,
    len: usize,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.len as u64
    }

    fn contains(&self, offset: u64) -> bool {
        offset >= self.start && offset < self.end()
    }

    fn copy_into(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> usize {
        if !self.contains(offset) {
            return 0;
        }
        let before = out.len();
        let mut skip = (offset - self.start) as usize;
        let mut left = len;
        for chunk in &self.chunks {
            if left == 0 {
                break;
            }
            if skip >= chunk.len() {
                skip -= chunk.len();
                continue;
            }
            let take = (chunk.len() - skip).min(left);
            out.extend_from_slice(&chunk[skip..skip + take]);
            left -= take;
            skip = 0;
        }
        out.len() - before
    }
}

/// The most recent bytes handed out: the current contiguous range of the
/// file and the one before the last jump, as the chunks themselves, shared
/// with the buffers that went downstream, so keeping them costs no copy.
/// The range before the jump serves the demuxer that looks somewhere else
/// and comes back (matroskademux reads a cluster in the middle of the file
/// and then plays from the first one).
#[derive(Debug, Default)]
pub struct RecentBytes {
    current: Segment,
    previous: Segment,
    limit: usize,
}

impl RecentBytes {
    pub fn new(limit: usize) -> Self {
        RecentBytes {
            limit,
            ..Default::default()
        }
    }

    pub fn end(&self) -> u64 {
        self.current.end()
    }

    /// Records `data` handed out at `offset`; a gap starts a new range and
    /// the current one becomes the previous. Whole chunks are dropped from
    /// the front while the rest still holds `limit` bytes.
    pub fn push(&mut self, offset: u64, data: Bytes) {
        if offset != self.current.end() {
            let old = std::mem::take(&mut self.current);
            if old.len > 0 {
                self.previous = old;
            }
            self.current.start = offset;
        }
        let s = &mut self.current;
        s.len += data.len();
        s.chunks.push_back(data);
        while let Some(front) = s.chunks.front() {
            if s.len - front.len() < self.limit {
                break;
            }
            s.start += front.len() as u64;
            s.len -= front.len();
            s.chunks.pop_front();
        }
    }

    /// Appends to `out` what is held of `[offset, offset + len)`, from
    /// `offset` on; returns how many bytes that was.
    pub fn copy_into(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> usize {
        if self.current.contains(offset) {
            return self.current.copy_into(offset, len, out);
        }
        let n = self.previous.copy_into(offset, len, out);
        // The previous range may run into the current one.
        if n > 0 && n < len && self.current.contains(offset + n as u64) {
            return n + self.current.copy_into(offset + n as u64, len - n, out);
        }
        n
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.current.contains(offset) || self.previous.contains(offset)
    }
}

/// Why a wait ended without its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    /// `cancel()` was called (the element is flushing or stopping).
    Cancelled,
    /// Nothing from the server for the whole timeout.
    Timeout { waited: Duration },
    /// The player wanted bytes and none came for the whole timeout (pings
    /// do not count as progress). `server_silent`: nothing at all came, so
    /// the server is down or unreachable rather than not sending.
    Stalled {
        waited: Duration,
        state: FlowState,
        server_silent: bool,
    },
    /// The server refused to open the file.
    Open {
        kind: OpenErrorKind,
        message: String,
    },
    /// The server speaks another protocol version.
    VersionMismatch { server_supports: Vec<u8> },
    /// The server ended the session.
    Closed {
        reason: CloseReason,
        message: String,
    },
    /// The server sent something we cannot use.
    Protocol(String),
    /// After reconnecting, the file on the server is not the one we were
    /// playing (its size or modification time changed).
    ContentChanged { path: String },
    /// Passphrases differ, or only one side has one.
    AuthenticationFailed(String),
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::Cancelled => write!(f, "cancelled"),
            WaitError::Timeout { waited } => write!(
                f,
                "no answer from the server for {:.1} s",
                waited.as_secs_f64()
            ),
            WaitError::Stalled {
                waited,
                state,
                server_silent,
            } => write!(
                f,
                "no new data from the server for {:.1} s{} ({state})",
                waited.as_secs_f64(),
                if *server_silent {
                    " and no answer either"
                } else {
                    ""
                }
            ),
            WaitError::Open { kind, message } => write!(f, "{kind}: {message}"),
            WaitError::VersionMismatch { server_supports } => write!(
                f,
                "protocol version mismatch: this client speaks udpvid v{VERSION}, the server speaks {:?}",
                server_supports
            ),
            WaitError::Closed { reason, message } if message.is_empty() => {
                write!(f, "server ended the session: {reason}")
            }
            WaitError::Closed { reason, message } => {
                write!(f, "server ended the session: {reason} ({message})")
            }
            WaitError::Protocol(m) => write!(f, "protocol error: {m}"),
            WaitError::AuthenticationFailed(why) => write!(f, "authentication failed: {why}"),
            WaitError::ContentChanged { path } => write!(
                f,
                "{path} changed on the server while it was being played; start again to play the new version"
            ),
        }
    }
}

impl std::error::Error for WaitError {}

/// A consistent view of the client for stats and buffering.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientSnapshot {
    pub stats: ClientStats,
    /// Next offset the pipeline gets.
    pub read_offset: u64,
    /// Contiguous bytes ready at `read_offset`.
    pub available: u64,
    /// Bytes held, in order or not.
    pub buffered: u64,
    /// Bytes the server may still send beyond `read_offset`.
    pub window: u64,
    pub read_ahead: u64,
    pub reconnects: u64,
    /// The server in use.
    pub server: Option<SocketAddr>,
    /// Moves to the next server of the list after the one in use failed.
    pub failovers: u64,
}

/// What the server said about an opened file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedFile {
    pub size: u64,
    pub content_tag: u64,
    pub offset: u64,
}

#[derive(Default)]
struct Outcomes {
    opened: Option<(u32, OpenedFile)>,
    open_failed: Option<(u32, OpenErrorKind, String)>,
    catalog: Option<Vec<CatalogEntry>>,
    fatal: Option<WaitError>,
}

/// The file being played, so a lost session can be resumed.
#[derive(Clone)]
struct Resume {
    path: String,
    content_tag: u64,
}

struct Inner {
    conn: ClientConnection,
    history: RecentBytes,
    config: ClientConfig,
    outcomes: Outcomes,
    resume: Option<Resume>,
    /// Transfer whose answer `open` waits for (a reconnect replaces it).
    awaited_open: Option<(u32, String, u64)>,
    /// Set while the transfer re-opened after a reconnect is unanswered.
    reopening: Option<u32>,
    reconnects: u64,
    /// Last progress (a new byte of the file, or an answer), across
    /// reconnects.
    last_heard: Option<Instant>,
    /// The connection's `last_new_data` when progress was last noted.
    data_seen: Option<Instant>,
    /// When buffering last replaced a lost session.
    last_reconnect: Option<Instant>,
    /// What the player said of the media's rate, for a replaced session too.
    media_rate: Option<f64>,
    /// Where the session may go, in the order given; never empty. In the
    /// socket's address family (IPv4 mapped into IPv6 on a dual socket).
    servers: Vec<SocketAddr>,
    /// Index in `servers` of the one in use.
    current: usize,
    failovers: u64,
    /// The server in use failed and another one is to take over.
    failover_due: bool,
    /// A catalog is being waited for: a new session asks for it again.
    catalog_wanted: bool,
    /// Bytes ready at the read offset that a [`BlockingClient::wait_for_buffered`]
    /// waits for.
    buffered_waiter: Option<u64>,
    /// Bytes ready at the read offset that a reader gathering a larger
    /// chunk ([`BlockingClient::read_some_at`]'s `gather`) waits for.
    gather_goal: Option<u64>,
    /// Readers waiting on `Shared::changed`: with none, the network thread
    /// does not tell it (a futex system call on every wake-up, whoever
    /// listens).
    changed_waiters: u32,
}

impl Inner {
    fn server(&self) -> SocketAddr {
        self.servers[self.current]
    }

    fn has_alternatives(&self) -> bool {
        self.servers.len() > 1
    }
}

/// A new session to `server`; with alternatives to move to, a silent
/// server is given up quickly.
fn new_connection(
    config: &ClientConfig,
    server: SocketAddr,
    alternatives: bool,
    now: Instant,
) -> ClientConnection {
    let config = ClientConfig {
        path_max_datagram: path_max_datagram(server),
        ..config.clone()
    };
    let mut conn = ClientConnection::new(config, rand::random(), now);
    conn.set_fast_failover(alternatives);
    conn
}

/// The largest UDP payload the route to `server` carries as far as this
/// host knows: its interface's MTU (65,536 on loopback, 9,000 with jumbo
/// frames) less the IP and UDP headers. `None` if the kernel cannot say.
fn path_max_datagram(server: SocketAddr) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let server = canonical(server);
    let (bind, level, option, headers) = match server {
        SocketAddr::V4(_) => (
            SocketAddr::from(([0, 0, 0, 0], 0)),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            28,
        ),
        SocketAddr::V6(_) => (
            SocketAddr::from(([0u16; 8], 0)),
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU,
            48,
        ),
    };
    // Connecting a UDP socket sends nothing; it only looks up the route.
    let probe = UdpSocket::bind(bind).ok()?;
    probe.connect(server).ok()?;
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid descriptor owned by `probe`, which outlives the call,
    // and an int-sized output with its size.
    let rc = unsafe {
        libc::getsockopt(
            probe.as_raw_fd(),
            level,
            option,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0 && mtu > headers).then(|| (mtu - headers) as usize)
}

/// The same address whether it came from an IPv4 or a dual-stack socket.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Every address of every entry of a `host[:port],…` list, in order,
/// without repeats: a name with several addresses is several servers. An
/// entry that does not resolve is skipped if another one does.
fn resolve_servers(hosts: &str, default_port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let list = location::parse_host_list(hosts, default_port)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut failure = None;
    for entry in &list {
        match (entry.host.as_str(), entry.port).to_socket_addrs() {
            Ok(found) => {
                for a in found {
                    if !addrs.contains(&a) && addrs.len() < MAX_SERVERS {
                        addrs.push(a);
                    }
                }
            }
            Err(e) => {
                failure = Some(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", entry.host),
                ))
            }
        }
    }
    if addrs.is_empty() {
        return Err(failure.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{hosts} has no address"),
            )
        }));
    }
    Ok(addrs)
}

/// Session ends after which a new session is opened transparently: the
/// server restarted, or forgot us after an idle period.
fn is_resumable(err: &WaitError) -> bool {
    matches!(
        err,
        WaitError::Closed {
            reason: CloseReason::UnknownConnection
                | CloseReason::IdleTimeout
                | CloseReason::Shutdown,
            ..
        }
    )
}
/// With another server to move to, these ends of a session move to it
/// instead: the server is busy, going away, or forgot us.
fn moves_to_next_server(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::ServerBusy
            | CloseReason::Shutdown
            | CloseReason::UnknownConnection
            | CloseReason::IdleTimeout
    )
}

/// Reconnects within one wait before giving up: a server that keeps
/// dropping us is broken, not restarting.
const MAX_RECONNECTS_PER_WAIT: u32 = 3;

struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Told when `Inner::buffered_waiter`'s level is reached (or anything
    /// but data happened): a buffering monitor woken by every datagram
    /// cost the element a third of its CPU on a link slower than the
    /// pipeline, where it buffers most of the time.
    buffered: Condvar,
    /// Told when `Inner::gather_goal`'s level is reached (or anything but
    /// data happened), so a gathering reader sleeps through the arrivals
    /// before it instead of waking for each.
    gathered: Condvar,
    cancelled: AtomicBool,
    stop: AtomicBool,
}

pub struct BlockingClient {
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Written to on close, so the network thread's wait ends at once
    /// (stopping a pipeline would otherwise wait out the poll interval).
    stop_waker: UnixStream,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    // A panic on another thread while holding the lock leaves consistent
    // enough state for a shutdown; do not propagate the poison.
    shared.inner.lock().unwrap_or_else(|p| p.into_inner())
}

fn flush(socket: &UdpSocket, inner: &mut Inner) {
    let now = Instant::now();
    let server = inner.server();
    while let Some(d) = inner.conn.poll_transmit(now) {
        // A send error (e.g. ICMP unreachable reported back) is the same as
        // a lost datagram: timers resend, the timeout reports.
        let _ = socket.send_to(&d, server);
    }
}

fn collect_events(inner: &mut Inner) -> bool {
    let mut any = false;
    let alternatives = inner.has_alternatives();
    // Progress is new data or a new answer, not any packet: a server that
    // answers pings (or repeats old data) but never delivers must still
    // time out.
    let data = inner.conn.last_new_data();
    if data != inner.data_seen {
        inner.data_seen = data;
        inner.last_heard = Some(Instant::now());
    }
    while let Some(event) = inner.conn.poll_event() {
        any = true;
        inner.last_heard = Some(Instant::now());
        let o = &mut inner.outcomes;
        match event {
            ClientEvent::Connected => {}
            ClientEvent::Opened {
                transfer_id,
                size,
                content_tag,
                offset,
            } => {
                if inner.reopening == Some(transfer_id) {
                    inner.reopening = None;
                    if let Some(r) = inner
                        .resume
                        .as_ref()
                        .filter(|r| r.content_tag != content_tag)
                    {
                        o.fatal.get_or_insert(WaitError::ContentChanged {
                            path: r.path.clone(),
                        });
                    }
                }
                o.opened = Some((
                    transfer_id,
                    OpenedFile {
                        size,
                        content_tag,
                        offset,
                    },
                ))
            }
            ClientEvent::OpenFailed {
                transfer_id,
                kind,
                message,
            } => {
                // Nobody waits for an open: the transfer being read failed
                // on the server (the file shrank, the disk failed). That
                // ends the reading with the server's reason.
                if inner.awaited_open.is_none() {
                    o.fatal.get_or_insert(WaitError::Open {
                        kind,
                        message: message.clone(),
                    });
                }
                o.open_failed = Some((transfer_id, kind, message));
            }
            ClientEvent::Catalog(entries) => o.catalog = Some(entries),
            ClientEvent::Closed { reason, .. } if alternatives && moves_to_next_server(reason) => {
                inner.failover_due = true;
            }
            ClientEvent::Closed { reason, message } => {
                o.fatal.get_or_insert(WaitError::Closed { reason, message });
            }
            ClientEvent::Unresponsive { .. } if alternatives => inner.failover_due = true,
            ClientEvent::Unresponsive { silent_for } => {
                o.fatal
                    .get_or_insert(WaitError::Timeout { waited: silent_for });
            }
            ClientEvent::VersionMismatch { server_supports } => {
                o.fatal
                    .get_or_insert(WaitError::VersionMismatch { server_supports });
            }
            ClientEvent::ProtocolError(m) => {
                o.fatal.get_or_insert(WaitError::Protocol(m));
            }
            ClientEvent::AuthenticationFailed(why) => {
                o.fatal.get_or_insert(WaitError::AuthenticationFailed(why));
            }
        }
    }
    any
}

/// Datagrams handled under one lock before the waiters are woken.
const MAX_RECV_BATCH: usize = 256;
/// Receive buffers per system call; each holds a GRO train of datagrams.
const RECV_SLOTS: usize = 8;

/// A look at the socket that found at least one datagram but fewer than
/// this many found a stream arriving spaced by a link slower than this
/// thread: the next look waits a while (see [`coalesce_for`]) instead of
/// waking on the next datagram. At 20 Mbit/s a datagram comes every
/// 0.57 ms, and a wake-up for each was two thirds of the element's CPU; a
/// bulk stream on a fast link fills whole batches and is read at once.
/// 64 datagrams in the longest wait (11 ms) is 68 Mbit/s, and 90 KiB for
/// the socket's buffer to hold.
const COALESCE_BELOW: usize = 64;
/// Paths shorter than this are not coalesced: on a LAN the first flights of
/// a fast pull also come in small batches, and a wait slowed a loopback
/// pull by a third.
const COALESCE_MIN_RTT: Duration = Duration::from_millis(16);

/// How long the next look may wait on this path: the ACK delay the path
/// allows less a millisecond, so the ACK the datagrams earn still goes out
/// in time (9 ms at 80 ms), and at most an eighth of the round trip, so
/// the wait never matters to the transfer. The look after a wait
/// acknowledges at once. Each look is a wake-up, a receive and an ACK: at
/// 20 Mbit/s and 80 ms, a wait of 4 ms (a sixteenth of the round trip,
/// within the 5 ms the sender used to allow) still cost as much CPU as
/// souphttpsrc's whole pull.
fn coalesce_for(conn: &ClientConnection) -> Option<Duration> {
    let rtt = conn.rtt();
    if !rtt.has_sample() || rtt.min() < COALESCE_MIN_RTT {
        return None;
    }
    let wait = rtt
        .ack_delay()
        .saturating_sub(Duration::from_millis(1))
        .min(rtt.min() / 8);
    // poll(2) counts in milliseconds.
    (wait >= Duration::from_millis(1)).then_some(wait)
}

/// Waits until `socket` (if given) or `stop` is readable or `timeout`
/// passed (rounded up to a millisecond). An error ends the wait too: the
/// following receive reports it or finds nothing.
fn wait_readable(socket: Option<&UdpSocket>, stop: &UnixStream, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut fds = [stop.as_raw_fd(), socket.map_or(-1, |s| s.as_raw_fd())].map(|fd| {
        // poll(2) skips negative descriptors.
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }
    });
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: a valid array of pollfds that lives across the call; both
    // descriptors stay open because the caller borrows their owners.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

/// The network thread's receive path: as few system calls as the kernel
/// allows (recvmmsg, and GRO trains of datagrams cut up here), as the
/// server does: one `recv_from` per datagram is a system call per 1.4 KB.
struct BatchReceiver {
    state: UdpSocketState,
    slot: usize,
    bufs: Vec<u8>,
    metas: [RecvMeta; RECV_SLOTS],
}

impl BatchReceiver {
    fn new(socket: &UdpSocket) -> std::io::Result<Self> {
        let state = UdpSocketState::new(socket.into())?;
        // A GRO train is one UDP payload for the kernel, so never more than
        // 64 KiB: room for the largest possible datagram fits every train
        // (the segment count times our datagram size would be 90 KiB).
        let slot = u16::MAX as usize;
        Ok(BatchReceiver {
            state,
            slot,
            bufs: vec![0; slot * RECV_SLOTS],
            metas: [RecvMeta::default(); RECV_SLOTS],
        })
    }

    /// Hands what is queued on the non-blocking `socket` from `server` to
    /// the connection; returns how many datagrams that was.
    fn drain(&mut self, socket: &UdpSocket, inner: &mut Inner) -> usize {
        let mut handled = 0;
        let server = canonical(inner.server());
        while handled < MAX_RECV_BATCH {
            let count = {
                let mut iovs: Vec<IoSliceMut<'_>> = self
                    .bufs
                    .chunks_mut(self.slot)
                    .map(IoSliceMut::new)
                    .collect();
                match self.state.recv(socket.into(), &mut iovs, &mut self.metas) {
                    Ok(n) => n,
                    // Nothing queued (WouldBlock) or an ICMP error from a
                    // vanished server: timers and the timeout handle both.
                    Err(_) => break,
                }
            };
            let now = Instant::now();
            for (meta, buf) in self
                .metas
                .iter()
                .zip(self.bufs.chunks(self.slot))
                .take(count)
            {
                // Datagrams from anyone but the server are ignored.
                if canonical(meta.addr) != server {
                    continue;
                }
                let stride = meta.stride.max(1);
                for datagram in buf[..meta.len].chunks(stride) {
                    inner.conn.handle_datagram(now, datagram);
                    handled += 1;
                }
            }
            // Slots to spare: the queue was empty, and asking again would
            // only hear so (a system call per wake-up, a fifth of them at
            // 20 Mbit/s). What comes meanwhile makes the next poll return.
            if count < RECV_SLOTS.min(quinn_udp::BATCH_SIZE) {
                break;
            }
        }
        handled
    }
}

fn network_loop(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    mut receiver: BatchReceiver,
    stop: UnixStream,
) {
    let mut coalesce = None;
    while !shared.stop.load(Ordering::Acquire) {
        let wait = {
            let mut inner = lock(&shared);
            flush(&socket, &mut inner);
            let now = Instant::now();
            inner
                .conn
                .poll_timeout()
                .map_or(MAX_POLL_INTERVAL, |t| t.saturating_duration_since(now))
                .clamp(Duration::from_millis(1), MAX_POLL_INTERVAL)
        };
        match coalesce {
            Some(pause) => wait_readable(None, &stop, wait.min(pause)),
            None => wait_readable(Some(&socket), &stop, wait),
        }
        let mut inner = lock(&shared);
        // A burst is handled under one lock, so it costs one wake-up of the
        // streaming thread, not one per datagram.
        let drained = receiver.drain(&socket, &mut inner);
        if coalesce.is_some() && drained > 0 {
            inner.conn.acknowledge_now(Instant::now());
        }
        coalesce = if (1..COALESCE_BELOW).contains(&drained) {
            coalesce_for(&inner.conn)
        } else {
            None
        };
        let data = drained > 0;
        let now = Instant::now();
        if inner.conn.poll_timeout().is_some_and(|t| t <= now) {
            inner.conn.handle_timeout(now);
        }
        let events = collect_events(&mut inner);
        if std::mem::take(&mut inner.failover_due) {
            BlockingClient::fail_over(&mut inner);
        }
        flush(&socket, &mut inner);
        let buffered = inner
            .buffered_waiter
            .is_some_and(|w| events || inner.conn.available() >= w);
        let gathered = inner
            .gather_goal
            .is_some_and(|w| events || inner.conn.available() >= w);
        let changed = (data || events) && inner.changed_waiters > 0;
        drop(inner);
        if changed {
            shared.changed.notify_all();
        }
        if buffered {
            shared.buffered.notify_all();
        }
        if gathered {
            shared.gathered.notify_all();
        }
    }
}

impl BlockingClient {
    /// Resolves `host`, binds a socket and starts the handshake. `host` may
    /// list several servers, `host[:port],host[:port]…` (entries without a
    /// port use `port`): they are tried in order, and if the one in use
    /// fails the session moves to the next, resuming where it was.
    pub fn connect(host: &str, port: u16, config: ClientConfig) -> std::io::Result<Self> {
        Self::connect_inner(host, port, config, None)
    }

    /// Like [`BlockingClient::connect`], and asks for `path` at `offset` in
    /// the handshake itself, so the file's first bytes come a round trip
    /// sooner. [`BlockingClient::open`] with the same path and offset then
    /// waits for that answer.
    pub fn connect_and_open(
        host: &str,
        port: u16,
        config: ClientConfig,
        path: &str,
        offset: u64,
    ) -> std::io::Result<Self> {
        Self::connect_inner(host, port, config, Some((path, offset)))
    }

    fn connect_inner(
        host: &str,
        port: u16,
        config: ClientConfig,
        initial_open: Option<(&str, u64)>,
    ) -> std::io::Result<Self> {
        let resolved = resolve_servers(host, port)?;
        // One socket reaches every server: a dual-stack one when the list
        // mixes families, with IPv4 servers in their mapped form.
        let dual =
            resolved.iter().any(SocketAddr::is_ipv6) && resolved.iter().any(SocketAddr::is_ipv4);
        let servers: Vec<SocketAddr> = resolved
            .into_iter()
            .map(|a| match a {
                SocketAddr::V4(v4) if dual => {
                    SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
                }
                a => a,
            })
            .collect();
        let bind: SocketAddr = if servers[0].is_ipv6() {
            "[::]:0".parse().map_err(std::io::Error::other)?
        } else {
            "0.0.0.0:0".parse().map_err(std::io::Error::other)?
        };
        let socket = {
            use socket2::{Domain, Protocol, Socket, Type};
            let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
            let _ = s.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
            if dual {
                s.set_only_v6(false)?;
            }
            s.bind(&bind.into())?;
            // The network thread waits with poll(2) and then drains the
            // queue; sends of other threads never wait either (a full send
            // buffer is a lost datagram, which timers repair).
            s.set_nonblocking(true)?;
            UdpSocket::from(s)
        };
        let now = Instant::now();
        let mut conn = new_connection(&config, servers[0], servers.len() > 1, now);
        // Before the network thread sends the Hello, so it carries the open.
        let awaited_open = initial_open.map(|(path, offset)| {
            let id = conn.open_file(now, path, offset);
            (id, path.to_owned(), offset)
        });
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                conn,
                history: RecentBytes::new(HISTORY_BYTES),
                config,
                outcomes: Outcomes::default(),
                resume: None,
                awaited_open,
                reopening: None,
                reconnects: 0,
                last_heard: None,
                data_seen: None,
                last_reconnect: None,
                media_rate: None,
                servers,
                current: 0,
                failovers: 0,
                failover_due: false,
                catalog_wanted: false,
                buffered_waiter: None,
                gather_goal: None,
                changed_waiters: 0,
            }),
            changed: Condvar::new(),
            buffered: Condvar::new(),
            gathered: Condvar::new(),
            cancelled: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let receiver = BatchReceiver::new(&socket)?;
        let (stop_waker, stop_wait) = UnixStream::pair()?;
        let socket = Arc::new(socket);
        let thread = {
            let shared = shared.clone();
            let socket = socket.clone();
            std::thread::Builder::new()
                .name("udpvid-net".into())
                .spawn(move || network_loop(shared, socket, receiver, stop_wait))?
        };
        Ok(BlockingClient {
            shared,
            socket,
            thread: Mutex::new(Some(thread)),
            stop_waker,
        })
    }

    /// The server in use.
    pub fn server_addr(&self) -> SocketAddr {
        canonical(lock(&self.shared).server())
    }

    /// Makes every current and future wait return [`WaitError::Cancelled`]
    /// until [`BlockingClient::resume`].
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::Release);
        // Take the lock so a waiter between its check and its wait sees it.
        drop(lock(&self.shared));
        self.shared.changed.notify_all();
        self.shared.buffered.notify_all();
        self.shared.gathered.notify_all();
    }

    pub fn resume(&self) {
        self.shared.cancelled.store(false, Ordering::Release);
    }

    /// Runs `f` on the connection and sends what it produced.
    fn with_conn<R>(&self, f: impl FnOnce(&mut ClientConnection, Instant) -> R) -> R {
        self.with_conn_inner(|inner, now| f(&mut inner.conn, now))
    }

    fn with_conn_inner<R>(&self, f: impl FnOnce(&mut Inner, Instant) -> R) -> R {
        let mut inner = lock(&self.shared);
        let r = f(&mut inner, Instant::now());
        flush(&self.socket, &mut inner);
        r
    }

    /// Waits until `ready` yields a value, an error is fatal, the wait is
    /// cancelled, or nothing arrived from the server for `timeout`. A session
    /// the server lost (restart, idle expiry) is replaced on the way.
    fn wait_for<R>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&mut Inner) -> Option<Result<R, WaitError>>,
    ) -> Result<R, WaitError> {
        let started = Instant::now();
        let mut reconnects = 0;
        let mut inner = lock(&self.shared);
        loop {
            if self.shared.cancelled.load(Ordering::Acquire) {
                return Err(WaitError::Cancelled);
            }
            // A fatal outcome goes first, even with bytes ready: after a
            // reconnection the new session's first data arrives with its
            // answer, and if the file changed meanwhile those bytes are not
            // the file being played.
            if let Some(e) = inner.outcomes.fatal.clone() {
                if is_resumable(&e)
                    && reconnects < MAX_RECONNECTS_PER_WAIT
                    && Self::reconnect(&mut inner)
                {
                    reconnects += 1;
                    flush(&self.socket, &mut inner);
                    continue;
                }
                return Err(e);
            }
            if let Some(r) = ready(&mut inner) {
                flush(&self.socket, &mut inner);
                return r;
            }
            let now = Instant::now();
            // Progress is anything heard from the server since the wait began.
            let last_heard = inner.last_heard.map_or(started, |t| t.max(started));
            let deadline = last_heard + timeout;
            if now >= deadline {
                return Err(WaitError::Timeout {
                    waited: now - last_heard,
                });
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            inner.changed_waiters += 1;
            inner = self
                .shared
                .changed
                .wait_timeout(inner, slice)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            inner.changed_waiters -= 1;
        }
    }

    /// What a new session must re-open: the open being waited for, or the
    /// file being read at its offset.
    fn resume_target(inner: &Inner) -> Option<(String, u64)> {
        match (&inner.awaited_open, &inner.resume) {
            (Some((_, path, offset)), _) => Some((path.clone(), *offset)),
            (None, Some(r)) => inner.conn.read_offset().map(|o| (r.path.clone(), o)),
            (None, None) => None,
        }
    }

    /// Replaces a lost session with a new one to the same server and
    /// re-opens what was being read (or the open being waited for). False
    /// when there is nothing to resume.
    fn reconnect(inner: &mut Inner) -> bool {
        if Self::resume_target(inner).is_none() {
            return false;
        }
        inner.reconnects += 1;
        Self::replace_session(inner);
        true
    }

    /// The server in use failed: the next one of the list takes over where
    /// it was. Its answer for the file must carry the same content tag,
    /// or reading ends with [`WaitError::ContentChanged`].
    fn fail_over(inner: &mut Inner) {
        inner.current = (inner.current + 1) % inner.servers.len();
        inner.failovers += 1;
        Self::replace_session(inner);
    }

    fn replace_session(inner: &mut Inner) {
        let target = Self::resume_target(inner);
        let now = Instant::now();
        inner.conn = new_connection(&inner.config, inner.server(), inner.has_alternatives(), now);
        inner.data_seen = None;
        inner.outcomes = Outcomes::default();
        let media_rate = inner.media_rate;
        inner.conn.set_media_rate(now, media_rate);
        if inner.catalog_wanted {
            inner.conn.open_catalog(now);
        }
        let Some((path, offset)) = target else {
            return;
        };
        let id = inner.conn.open_file(now, &path, offset);
        if let Some(awaited) = inner.awaited_open.as_mut() {
            awaited.0 = id;
        } else {
            inner.reopening = Some(id);
        }
    }

    /// Sessions replaced after the server lost them.
    pub fn reconnects(&self) -> u64 {
        lock(&self.shared).reconnects
    }

    /// Opens `path` at `offset` (replacing any current transfer) and waits for
    /// the server's answer.
    pub fn open(
        &self,
        path: &str,
        offset: u64,
        timeout: Duration,
    ) -> Result<OpenedFile, WaitError> {
        self.with_conn_inner(|inner, now| {
            // Already asked for in the handshake: wait for that answer.
            let asked = inner
                .awaited_open
                .as_ref()
                .is_some_and(|(_, p, o)| p == path && *o == offset);
            if !asked {
                let id = inner.conn.open_file(now, path, offset);
                inner.awaited_open = Some((id, path.to_owned(), offset));
            }
        });
        let result = self.wait_for(timeout, |inner| {
            let (id, _, _) = inner.awaited_open.clone()?;
            if let Some((tid, file)) = inner.outcomes.opened {
                if tid == id {
                    return Some(Ok(file));
                }
            }
            if let Some((tid, kind, message)) = inner.outcomes.open_failed.clone() {
                if tid == id {
                    return Some(Err(WaitError::Open { kind, message }));
                }
            }
            None
        });
        let mut inner = lock(&self.shared);
        inner.awaited_open = None;
        if let Ok(file) = &result {
            match &inner.resume {
                // A seek in the same file: the content must still be the one we play.
                Some(r) if r.path == path && r.content_tag != file.content_tag => {
                    return Err(WaitError::ContentChanged {
                        path: path.to_owned(),
                    });
                }
                _ => {
                    inner.resume = Some(Resume {
                        path: path.to_owned(),
                        content_tag: file.content_tag,
                    })
                }
            }
        }
        result
    }

    /// Asks for the catalog and waits for all of it.
    pub fn catalog(&self, timeout: Duration) -> Result<Vec<CatalogEntry>, WaitError> {
        // Cleared before asking, under the same lock: on loopback the answer
        // can arrive before a later clear would run, and be lost.
        self.with_conn_inner(|inner, now| {
            inner.outcomes.catalog = None;
            inner.catalog_wanted = true;
            inner.conn.open_catalog(now);
        });
        let result = self.wait_for(timeout, |inner| inner.outcomes.catalog.take().map(Ok));
        lock(&self.shared).catalog_wanted = false;
        result
    }

    /// Reads up to `max` bytes at the current offset, waiting for at least
    /// one. `Ok(None)` at the end of the file.
    /// Everything contiguous that is there comes in one chunk, not one
    /// datagram's worth: a consumer that takes any amount gets full
    /// buffers when it is the slower side.
    pub fn read(&self, max: usize, timeout: Duration) -> Result<Option<Bytes>, WaitError> {
        let result = self.wait_for(timeout, |inner| {
            if inner.conn.is_finished() {
                return Some(Ok(None));
            }
            let offset = inner.conn.read_offset()?;
            let chunk = inner.conn.read(Instant::now(), max)?;
            inner.history.push(offset, chunk.clone());
            Some(Ok(Some(chunk)))
        });
        self.say_where_stalled(result)
    }

    /// A timeout says where the flow stopped, and whether the server still
    /// answers at all.
    fn say_where_stalled<R>(&self, result: Result<R, WaitError>) -> Result<R, WaitError> {
        match result {
            Err(WaitError::Timeout { waited }) => {
                let inner = lock(&self.shared);
                Err(Self::stalled(&inner, Instant::now(), waited))
            }
            other => other,
        }
    }

    /// Waits, as [`read`](Self::read) does, for a first byte at the read
    /// offset, then up to `gather` longer for `want` bytes, the end of
    /// the transfer, or anything but data (an answer, an error, a cancel).
    fn gather(&self, want: u64, gather: Duration, timeout: Duration) -> Result<(), WaitError> {
        let first = self.wait_for(timeout, |inner| {
            (inner.conn.is_finished() || inner.conn.available() > 0).then_some(Ok(()))
        });
        self.say_where_stalled(first)?;
        let until = Instant::now() + gather;
        let mut inner = lock(&self.shared);
        loop {
            let now = Instant::now();
            let ends_sooner = inner
                .conn
                .remaining()
                .is_some_and(|r| r <= inner.conn.available());
            if now >= until
                || ends_sooner
                || inner.conn.available() >= want
                || inner.outcomes.fatal.is_some()
                || self.shared.cancelled.load(Ordering::Acquire)
            {
                return Ok(());
            }
            inner.gather_goal = Some(want);
            inner = self
                .shared
                .gathered
                .wait_timeout(inner, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            inner.gather_goal = None;
        }
    }

    /// How far the player's buffering got; a window the goal needs leaves
    /// at once (see [`ClientConnection::buffering_level`]). While the
    /// application holds the pipeline paused on buffering nobody reads, so
    /// this is also where a lost session is replaced (at most once a
    /// second) and where the end of the session is reported.
    pub fn buffering_level(
        &self,
        cause: BufferingCause,
        held_downstream: u64,
    ) -> Result<BufferingLevel, WaitError> {
        self.with_conn_inner(|inner, now| {
            if let Some(e) = inner.outcomes.fatal.clone() {
                let recently = inner
                    .last_reconnect
                    .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1));
                if !is_resumable(&e) {
                    return Err(e);
                }
                if !recently && Self::reconnect(inner) {
                    inner.last_reconnect = Some(now);
                }
            }
            Ok(inner.conn.buffering_level(now, cause, held_downstream))
        })
    }

    /// The link's recent rate in bytes per second, once measured.
    pub fn link_rate(&self) -> Option<f64> {
        lock(&self.shared).conn.link_rate(Instant::now())
    }

    /// See [`ClientConnection::set_media_rate`].
    pub fn set_media_rate(&self, bytes_per_second: Option<f64>) {
        self.with_conn_inner(|inner, now| {
            inner.media_rate = bytes_per_second;
            inner.conn.set_media_rate(now, bytes_per_second);
        });
    }

    /// The flow-control state, for stats and errors.
    pub fn flow_state(&self) -> FlowState {
        lock(&self.shared).conn.flow_state(Instant::now())
    }

    /// A stall error if the player has wanted bytes since `wanting_since`
    /// and no progress came for `timeout` since then.
    pub fn stall(&self, wanting_since: Instant, timeout: Duration) -> Option<WaitError> {
        let inner = lock(&self.shared);
        let now = Instant::now();
        let last = inner
            .last_heard
            .map_or(wanting_since, |t| t.max(wanting_since));
        let waited = now.saturating_duration_since(last);
        (waited >= timeout).then(|| Self::stalled(&inner, now, waited))
    }

    fn stalled(inner: &Inner, now: Instant, waited: Duration) -> WaitError {
        WaitError::Stalled {
            waited,
            state: inner.conn.flow_state(now),
            server_silent: inner
                .conn
                .last_received()
                .is_none_or(|t| now.saturating_duration_since(t) >= waited),
        }
    }

    /// The bytes of `[offset, offset + len)` of the open file (fewer only at
    /// its end): from what was recently handed out, from what already
    /// arrived ahead, or else by asking the server to continue from there.
    pub fn read_at(&self, offset: u64, len: usize, timeout: Duration) -> Result<Bytes, WaitError> {
        self.read_some_at(offset, len, len, Duration::ZERO, timeout)
    }

    /// Like [`read_at`](Self::read_at), but returns as soon as `min` bytes
    /// (at least one) are there, with as many more up to `len` as are
    /// ready: a consumer that takes any amount starts on the first
    /// datagram instead of waiting for a whole block in slow start.
    ///
    /// With a non-zero `gather`, reading on from the stream's read offset
    /// waits up to that long past the first byte for all of `len`: a
    /// consumer faster than the link otherwise wakes and takes a small
    /// chunk for every burst that arrives (250 a second at 20 Mbit/s, each
    /// a buffer through the whole pipeline).
    pub fn read_some_at(
        &self,
        offset: u64,
        len: usize,
        min: usize,
        gather: Duration,
        timeout: Duration,
    ) -> Result<Bytes, WaitError> {
        let min = min.clamp(1, len.max(1));
        let mut out = Vec::new();
        lock(&self.shared).history.copy_into(offset, len, &mut out);
        if out.len() >= min {
            return Ok(out.into());
        }
        if out.is_empty() {
            if let Some(index) = self.index_sent_ahead(offset, len, timeout)? {
                out = index;
                if out.len() >= min {
                    return Ok(out.into());
                }
            }
        }
        self.move_to(offset + out.len() as u64, timeout)?;
        // The common case, reading on from where the stream is: the chunk
        // itself goes out, shared with the history, uncopied.
        if out.is_empty() {
            if !gather.is_zero() {
                self.gather(len as u64, gather, timeout)?;
            }
            match self.read(len, timeout)? {
                Some(chunk) if chunk.len() >= min => return Ok(chunk),
                Some(chunk) => out.extend_from_slice(&chunk),
                None => return Ok(Bytes::new()),
            }
        }
        while out.len() < min {
            match self.read(len - out.len(), timeout)? {
                Some(chunk) => out.extend_from_slice(&chunk),
                None => break,
            }
        }
        Ok(out.into())
    }

    /// The bytes at `offset` (up to `len`, within the index) from the
    /// index the server sends ahead, waiting for them while they keep
    /// coming. `None` outside the index, or when its bytes stopped coming
    /// (lost before the transfer was open, say): the caller then asks the
    /// server, as without an index.
    fn index_sent_ahead(
        &self,
        offset: u64,
        len: usize,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, WaitError> {
        let asked = Instant::now();
        self.wait_for(timeout, |inner| {
            let Some(range) = inner.conn.index_range().filter(|r| r.contains(&offset)) else {
                return Some(Ok(None));
            };
            let want = (len as u64).min(range.end - offset) as usize;
            let got = inner.conn.index_bytes(offset, want);
            if got.len() == want {
                return Some(Ok(Some(got.to_vec())));
            }
            // The server sends the index right after the stream's first
            // bytes, so it is coming while the stream moves (slow start
            // takes a few RTTs over those first bytes). A stream that stops
            // for a few RTTs, or a wait past INDEX_MAX_WAIT, means these
            // bytes are not coming (they came before the open's answer
            // and were dropped, say): ask the server.
            let patience = (inner.conn.stats().smoothed_rtt * 4).max(INDEX_PATIENCE);
            let last = inner.conn.last_new_data().map_or(asked, |t| t.max(asked));
            (last.elapsed() > patience || asked.elapsed() > INDEX_MAX_WAIT).then_some(Ok(None))
        })
    }

    /// `offset` is held here: in the recent bytes or the index sent ahead.
    fn held_locally(inner: &Inner, offset: u64) -> bool {
        inner.history.contains(offset) || !inner.conn.index_bytes(offset, 1).is_empty()
    }

    /// True when `offset` can be served without waiting for the network.
    pub fn is_ready(&self, offset: u64) -> bool {
        let inner = lock(&self.shared);
        if Self::held_locally(&inner, offset) {
            return true;
        }
        inner
            .conn
            .read_offset()
            .is_some_and(|o| offset >= o && offset < o + inner.conn.available())
    }

    /// True when a read at `offset` continues the current transfer (from the
    /// recent bytes, the index sent ahead, or a short forward skip over
    /// bytes that are coming) instead of asking the server to start again.
    pub fn continues_stream(&self, offset: u64) -> bool {
        let inner = lock(&self.shared);
        if Self::held_locally(&inner, offset) {
            return true;
        }
        let Some(current) = inner.conn.read_offset() else {
            return false;
        };
        skips_locally(
            current,
            offset,
            inner.conn.available(),
            inner.conn.current_read_ahead(Instant::now()),
        )
    }

    /// Puts the network stream at `offset`. A forward jump within what the
    /// server is sending anyway (the read-ahead) is made by consuming the
    /// bytes in between as they arrive; they stay in the recent bytes, so a
    /// jump back into them is local too. Anything else asks the server.
    fn move_to(&self, offset: u64, timeout: Duration) -> Result<(), WaitError> {
        let (current, ready, read_ahead, path) = {
            let inner = lock(&self.shared);
            let Some(current) = inner.conn.read_offset() else {
                // The transfer ended on the server: report why.
                return Err(inner
                    .outcomes
                    .fatal
                    .clone()
                    .unwrap_or_else(|| WaitError::Protocol("no file is open".into())));
            };
            (
                current,
                inner.conn.available(),
                inner.conn.current_read_ahead(Instant::now()),
                inner.resume.as_ref().map(|r| r.path.clone()),
            )
        };
        if offset == current {
            return Ok(());
        }
        if skips_locally(current, offset, ready, read_ahead) {
            return self.consume(current, offset, timeout);
        }
        let path = path.ok_or_else(|| WaitError::Protocol("no file is open".into()))?;
        self.keep_what_arrived();
        let start = offset.saturating_sub(SEEK_BACK_MARGIN);
        self.open(&path, start, timeout)?;
        // The margin goes to the recent bytes, for the jump back.
        self.consume(start, offset, timeout)
    }

    /// Before a jump drops the transfer, what already arrived in order
    /// goes to the recent bytes (up to their limit), so a jump back to
    /// just after where the stream was is served locally.
    fn keep_what_arrived(&self) {
        let mut inner = lock(&self.shared);
        let mut kept = 0;
        while kept < HISTORY_BYTES {
            let Some((offset, chunk)) = inner.conn.salvage(HISTORY_BYTES - kept) else {
                break;
            };
            kept += chunk.len();
            inner.history.push(offset, chunk);
        }
    }

    /// Reads the stream from `from` up to `to` as it arrives; the bytes stay
    /// in the recent bytes, so a jump back into them is served locally.
    fn consume(&self, from: u64, to: u64, timeout: Duration) -> Result<(), WaitError> {
        let mut at = from;
        while at < to {
            let want = (to - at).min(1 << 20) as usize;
            match self.read(want, timeout)? {
                Some(chunk) => at += chunk.len() as u64,
                None => break,
            }
        }
        Ok(())
    }

    /// See [`ClientConnection::set_held_downstream`].
    pub fn set_held_downstream(&self, bytes: u64) {
        self.with_conn(|c, now| c.set_held_downstream(now, bytes));
    }

    pub fn set_read_ahead(&self, read_ahead: ReadAhead) {
        self.with_conn_inner(|inner, now| {
            inner.config.read_ahead = read_ahead;
            inner.conn.set_read_ahead(now, read_ahead)
        });
    }

    pub fn stats(&self) -> ClientStats {
        lock(&self.shared).conn.stats()
    }

    /// Waits until `available` bytes are ready at the read offset, anything
    /// but data happens (an answer, an error), or `timeout` passes.
    pub fn wait_for_buffered(&self, available: u64, timeout: Duration) {
        let mut inner = lock(&self.shared);
        if inner.conn.available() >= available {
            return;
        }
        inner.buffered_waiter = Some(available);
        let (mut inner, _) = self
            .shared
            .buffered
            .wait_timeout(inner, timeout)
            .unwrap_or_else(|p| p.into_inner());
        inner.buffered_waiter = None;
    }

    /// Everything the element reports, read under one lock.
    pub fn snapshot(&self) -> ClientSnapshot {
        let inner = lock(&self.shared);
        let read_offset = inner.conn.read_offset().unwrap_or(0);
        ClientSnapshot {
            stats: inner.conn.stats(),
            read_offset,
            available: inner.conn.available(),
            buffered: inner.conn.buffered(),
            window: inner
                .conn
                .advertised_window()
                .map_or(0, |w| w.saturating_sub(read_offset)),
            read_ahead: inner.conn.read_ahead(),
            reconnects: inner.reconnects,
            server: Some(canonical(inner.server())),
            failovers: inner.failovers,
        }
    }

    /// Sends Close and stops the network thread. Later waits fail at once.
    pub fn close(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(thread) = thread else {
            return;
        };
        self.with_conn(|c, _| c.close());
        self.shared.stop.store(true, Ordering::Release);
        let _ = (&self.stop_waker).write_all(&[1]);
        let _ = thread.join();
    }
}

impl Drop for BlockingClient {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_bytes_keep_whole_chunks_of_the_tail_of_one_range() {
        let mut h = RecentBytes::new(10);
        h.push(100, Bytes::from_static(&[1, 2, 3, 4, 5, 6]));
        h.push(106, Bytes::from_static(&[7, 8, 9, 10, 11, 12]));
        h.push(112, Bytes::from_static(&[13, 14, 15, 16, 17, 18]));
        // At least the limit, in whole chunks: the first one went.
        assert_eq!(h.end(), 118);
        assert!(!h.contains(105) && h.contains(106) && !h.contains(118));
        let mut out = Vec::new();
        assert_eq!(h.copy_into(110, 100, &mut out), 8);
        assert_eq!(out, vec![11, 12, 13, 14, 15, 16, 17, 18]);
        out.clear();
        assert_eq!(h.copy_into(108, 3, &mut out), 3);
        assert_eq!(out, vec![9, 10, 11]);
        out.clear();
        assert_eq!(h.copy_into(101, 4, &mut out), 0);
        // A gap starts a new range; the last one is kept too, and one
        // range before that is forgotten.
        h.push(200, Bytes::from_static(&[42]));
        assert!(h.contains(110) && h.contains(200));
        out.clear();
        assert_eq!(h.copy_into(116, 5, &mut out), 2);
        h.push(300, Bytes::from_static(&[43]));
        assert!(!h.contains(110) && h.contains(200) && h.contains(300));
        // A previous range that runs into the current one reads on.
        let mut h = RecentBytes::new(100);
        h.push(10, Bytes::from_static(&[1, 2, 3]));
        h.push(13, Bytes::from_static(&[4]));
        h.push(5, Bytes::from_static(&[9, 9, 9, 9, 9]));
        h.push(10, Bytes::from_static(&[1, 2]));
        out.clear();
        assert_eq!(h.copy_into(12, 10, &mut out), 2);
        assert_eq!(out, vec![3, 4]);
    }
}
