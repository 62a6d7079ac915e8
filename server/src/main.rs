//! `server`: serves the video files of one folder, or of a bucket in
//! S3-compatible object storage, over the udpvid protocol.
//!
//! This is a thin tokio driver around the sans-IO
//! [`gstudpvid::protocol::ServerEndpoint`]: it moves datagrams between the
//! socket and the endpoint, sleeps until the endpoint's next timer or until
//! content fetched from the store arrives, and logs the endpoint's events.
//! While the next timer is near (a session pacing its data) a serving
//! thread sleeps until it without waking for each arriving datagram, and
//! takes them all in that turn ([`TURN_MODERATION`]); while the timers are
//! far and datagrams keep coming, turns come at most every
//! [`MAX_ACK_GATHER`] ([`ack_gather`]).

mod disk_cache;
mod library;
mod metrics;
mod object_library;
mod send_batch;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::FutureExt;
use rand::RngCore;
use std::io::IoSliceMut;

use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, error, info, warn};

use gstudpvid::protocol::admission::{Shard, shard_of};
use gstudpvid::protocol::catalog::CatalogEntry;
use gstudpvid::protocol::crypto::Psk;
use gstudpvid::protocol::pacing::MAX_TOLERATED_LATENESS;
use gstudpvid::protocol::server::{DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_SESSIONS};
use gstudpvid::protocol::wire::{
    DATA_OVERHEAD, DEFAULT_LARGE_DATAGRAM_SIZE, DEFAULT_MAX_PAYLOAD, MAX_DATAGRAM_SIZE,
    MAX_UDP_PAYLOAD,
};
use gstudpvid::protocol::{
    Content, ContentStore, OpenFailure, ServerConfig, ServerEndpoint, ServerEvent,
};

use gstudpvid::discovery::Announcement;
use library::Library;
use metrics::{LoopCounters, Metrics};
use object_library::ObjectLibrary;
use send_batch::SendBatcher;

/// Socket buffers we ask the kernel for: a few read-aheads' worth of
/// datagrams, so bursts survive a busy moment in the event loop.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Datagrams read in one go before the loop sends again, so a flood of
/// input cannot starve the sending side.
const MAX_RECV_BATCH: usize = 256;
/// Receive buffers filled by one `recvmmsg`.
const RECV_SLOTS: usize = 16;
/// Whether a receive fills every slot it can (`recvmmsg`), so one that
/// fills fewer found the socket empty. quinn-udp receives one datagram a
/// call on the BSDs, macOS and Solaris.
const RECEIVES_IN_BATCHES: bool = cfg!(any(target_os = "linux", target_os = "android"));
/// A serving thread whose next timer is at most this far off sleeps until
/// it without watching its socket, and takes what arrived meanwhile (ACKs)
/// in the same turn. Each datagram that woke the thread was a turn of its
/// own, and on a loaded server a turn costs more than the work it does:
/// with 20 paced pulls two turns in three were one or two ACKs. The ACKs
/// then wait at most this long, which the sessions' RTT samples include.
const TURN_MODERATION: Duration = Duration::from_millis(5);
/// The moderation while a session's window is full: its next send waits
/// for an ACK, and with 5 ms 64 copies through a 10 Mbit/s link took 8 %
/// longer.
const TURN_MODERATION_AWAITING_ACKS: Duration = Duration::from_millis(1);
/// A moderated turn ends on this tick, so the sessions' timers that fall
/// within one tick are served by one turn (as tokio's millisecond timer
/// does for the unmoderated ones). A pacing deadline kept up to a tick
/// late loses no rate: the pacer's bucket holds two bursts of at least
/// 2 ms. 2 ms rather than 1: with 20 paced pulls the turns went from
/// 880-1060 to 730-760 a second and the CPU per GB from 3.8-4.4 s to
/// 3.7-3.8 s, at the same throughput and fewer drops (500 viewers: 1.94
/// -> 1.81 s/GB, no stall); a window-bound pull's ACKs, which wait for the
/// tick after [`TURN_MODERATION_AWAITING_ACKS`], came as fast (100 Mbit/s,
/// 2 ms RTT: 2.66-2.70 s either way).
const TURN_TICK: Duration = Duration::from_millis(2);

/// While datagrams keep waking the thread, a turn starts at most this
/// often (within what every busy session tolerates, see [`ack_gather`]):
/// the thread sleeps out the rest and takes what arrived meanwhile in one
/// turn. The sessions' own timers were mostly further off than
/// [`TURN_MODERATION`], so nothing else moderated the ACKs' wake-ups: with
/// 200 paced pulls through one 200 Mbit/s `tc tbf` (`load shaped 200 200
/// 4`, 5 Dec) 92 % of the ~3,300 turns a second were one ACK's wake-up
/// with about two datagrams; with 1 ms, 1,000 turns and 3.5-3.7 s/GB
/// against 5.4-5.6, the same throughput and drops (500 us: 4.2; the
/// least tolerated lateness there is 1.1-2.1 ms, so 2 ms rarely applied).
const MAX_ACK_GATHER: Duration = Duration::from_millis(1);
/// A gather shorter than this is not worth its sleep (a window-bound
/// pull on loopback, whose quarter RTT is microseconds).
const MIN_ACK_GATHER: Duration = Duration::from_micros(250);

/// How long a turn woken by arriving datagrams may wait for more, given
/// the lateness every busy session tolerates.
fn ack_gather(lateness: Duration) -> Option<Duration> {
    let gather = lateness.min(MAX_ACK_GATHER);
    (gather >= MIN_ACK_GATHER).then_some(gather)
}

/// How late the kernel may wake the serving threads (`PR_SET_TIMERSLACK`,
/// inherited by every thread the process starts): a quarter of
/// [`TURN_TICK`], which the tick's sessions tolerate (their pacers' buckets
/// hold a burst more, their ACKs wait for the tick anyway). With Linux's
/// default of 50 us each sleep to a tick programs a timer interrupt of its
/// own, which on a VM is an exit to the hypervisor; with more slack the
/// wake-up rides on one already due. 20 pulls through one 200 Mbit/s `tc
/// tbf` (`load shaped 20 200 16`, server alone on its core, eight
/// alternated pairs, 4 Dec): median 2.12 s/GB and 570 turns a second
/// against 2.38 and 640, the same throughput; 200 of them 7.53 against
/// 8.64; one pull at 100 Mbit/s and 2 ms RTT, and at 10 Mbit/s and 12 ms,
/// kept its rate, and the 526 MiB loopback pull its time.
const TIMER_SLACK: Duration = Duration::from_micros(500);

/// Sets [`TIMER_SLACK`] for this thread and the threads it starts.
fn relax_timer_slack() {
    #[cfg(target_os = "linux")]
    {
        let nanos = TIMER_SLACK.as_nanos() as libc::c_ulong;
        // SAFETY: PR_SET_TIMERSLACK takes a plain integer and touches no
        // memory of ours; a failure (never on Linux >= 2.6.28) leaves the
        // default slack, which only costs CPU.
        let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, nanos, 0, 0, 0) };
    }
}

/// The tick while every session with data to send tolerates `lateness`
/// (`ServerEndpoint::tolerated_lateness`: a quarter of its smoothed RTT,
/// within what its pacer's bucket holds): the longest power of two times
/// [`TURN_TICK`] (so that the ticks stay aligned) within it, at most
/// [`MAX_TOLERATED_LATENESS`]. Sessions that tolerate a tick bring the
/// moderation to it, so ACKs wait for the next tick rather than each
/// waking a turn; below that (a window-bound pull on loopback, whose
/// quarter RTT is well under 2 ms) it stays
/// [`TURN_MODERATION_AWAITING_ACKS`]. 20 pulls through one 200 Mbit/s
/// `tc tbf` (`load shaped 20 200 16`, server alone on its core, alternated,
/// 4 Dec): 545-661 turns a second and 2.56-2.95 s/GB against 968-1031
/// and 3.04-3.28 with the 1 ms moderation, same throughput. (A paused
/// player's read-ahead that overshot in the CI with a 2 ms moderation was
/// probe timeouts' resends to a starved client, as often with 1 ms.) With
/// 40 ms of RTT (`load paced 20 200
/// 16 40`, alternated, 4 Dec) 20 paced pulls took 313-368 turns a second
/// and 1.97-2.06 s/GB against 571-723 and 2.71-3.52 with the 2 ms tick,
/// 200 (`load paced 200 200 4 40`) 878 turns and 4.99 s/GB against 1696
/// and 6.13, at the same throughput. On loopback paths (RTTs of a few ms)
/// the tick stays 2 ms; a pull at 20 Mbit/s and 40 ms RTT kept its 18.5
/// Mbit/s.
fn turn_tick(lateness: Duration) -> Duration {
    let mut tick = TURN_TICK;
    while tick * 2 <= lateness.min(MAX_TOLERATED_LATENESS) {
        tick *= 2;
    }
    tick
}

#[derive(Parser, Debug)]
#[command(
    name = "server",
    version,
    about = "Serve the video files of one folder, or of an S3 bucket, to udpvidsrc clients over UDP",
    long_about = "Serves every regular file inside --dir (subfolders included) to udpvidsrc \
                  clients over the udpvid protocol. Paths that leave the folder, symlinks \
                  pointing outside it, devices and FIFOs are refused as \"not found\".\n\n\
                  With --store s3://bucket[/prefix] it serves the objects under the prefix of \
                  an S3-compatible store instead (AWS S3, MinIO, Ceph RGW, Garage), configured \
                  from the AWS_* environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, \
                  AWS_DEFAULT_REGION, and AWS_ENDPOINT with AWS_ALLOW_HTTP=true for a \
                  self-hosted server. Many servers may serve one bucket; players given all \
                  of them move to the next if one fails."
)]
struct Args {
    /// Folder whose files are served (subfolders included)
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "store",
        conflicts_with = "store"
    )]
    dir: Option<PathBuf>,
    /// Serve the objects of an S3-compatible bucket under an optional prefix
    #[arg(long, value_name = "s3://BUCKET[/PREFIX]")]
    store: Option<String>,
    /// With --store: memory for the block cache all sessions share, in MiB
    /// (at least four blocks)
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    cache_mb: u64,
    /// With --store: keep fetched blocks in this folder too (a second
    /// cache tier that survives restarts)
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// With --cache-dir: most bytes kept in it, in MiB
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    cache_dir_mb: u64,
    /// With --store: bytes fetched per ranged GET, in KiB
    #[arg(long, default_value_t = object_library::DEFAULT_BLOCK_BYTES / 1024, value_name = "KIB")]
    block_kb: u64,
    /// With --store: seconds between listings of the bucket (the catalog)
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    catalog_refresh: f64,
    /// Serve counters in the Prometheus text format at http://ADDR/metrics
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Address to listen on (0.0.0.0 for every IPv4 interface, :: for IPv6)
    #[arg(long, default_value = "0.0.0.0", value_name = "ADDR")]
    bind: IpAddr,
    /// UDP port to listen on (0 picks a free port, printed at start-up)
    #[arg(long, default_value_t = 50000)]
    port: u16,
    /// Append the log to this file instead of standard error
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Seconds a silent client keeps its session before it is dropped
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT.as_secs_f64(), value_name = "SECONDS")]
    idle_timeout: f64,
    /// Most sessions served at once; more clients are told the server is busy
    #[arg(long, default_value_t = DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    /// Most sessions from one IP address (one NAT can hide dozens of
    /// viewers); more are told the server is busy. Default: a quarter of
    /// --max-sessions, so one address never takes the whole server
    #[arg(long)]
    max_sessions_per_address: Option<usize>,
    /// Read a passphrase from this file (first line): clients must know it,
    /// and every session is then authenticated and encrypted
    #[arg(long, value_name = "PATH")]
    passphrase_file: Option<PathBuf>,
    /// Largest data payload per datagram in bytes (the default fits 1500-byte Ethernet)
    #[arg(long, default_value_t = DEFAULT_MAX_PAYLOAD)]
    max_payload: usize,
    /// Largest datagram in bytes for a client whose route to the server
    /// carries more than Ethernet's (the same host, jumbo frames), once one
    /// that large got through; 1452 or less sends every client
    /// Ethernet-sized datagrams
    #[arg(long, default_value_t = DEFAULT_LARGE_DATAGRAM_SIZE)]
    max_datagram: usize,
    /// Announce the server on the LAN with DNS-SD over multicast DNS
    /// (_udpvid._udp), so `player udpvid:///` and `catalog` find it
    #[arg(long)]
    announce: bool,
    /// The name it is announced under (default: "udpvid on HOSTNAME")
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Serving threads, each with its own socket on the port (SO_REUSEPORT)
    /// and its own sessions; 0 means one per core
    #[arg(long, default_value_t = 0, value_name = "N")]
    threads: usize,
}

/// Most serving threads: beyond this the shards' fixed costs (a socket
/// buffer each) outweigh what another core adds.
const MAX_THREADS: usize = 64;

fn init_logging(log_file: Option<&PathBuf>) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UDPVID_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn log_event(event: ServerEvent, counters: &LoopCounters) {
    match &event {
        ServerEvent::TransferStarted { .. } => {
            counters.transfers.fetch_add(1, Ordering::Relaxed);
        }
        ServerEvent::SessionRefused { .. } => counters.error("session_refused"),
        ServerEvent::OpenRefused { kind, .. } => counters.error(match kind {
            gstudpvid::protocol::OpenErrorKind::NotFound => "open_not_found",
            gstudpvid::protocol::OpenErrorKind::NotReadable => "open_not_readable",
            _ => "open_refused",
        }),
        ServerEvent::ReadFailed { .. } => counters.error("read_failed"),
        _ => {}
    }
    match event {
        ServerEvent::SessionOpened { id, addr } => {
            info!(session = %format!("{id:016x}"), %addr, "session opened")
        }
        ServerEvent::SessionRefused { addr, reason } => warn!(%addr, %reason, "session refused"),
        ServerEvent::AddressChanged { id, from, to } => {
            info!(session = %format!("{id:016x}"), %from, %to, "client address changed")
        }
        ServerEvent::TransferStarted {
            id,
            kind,
            path,
            offset,
            size,
        } => info!(
            session = %format!("{id:016x}"), ?kind, path, offset, size, "transfer started"
        ),
        ServerEvent::OpenRefused {
            id,
            path,
            kind,
            detail,
        } => warn!(
            session = %format!("{id:016x}"), path, %kind, detail, "open refused"
        ),
        ServerEvent::TransferComplete { id, path } => {
            info!(session = %format!("{id:016x}"), path, "transfer complete")
        }
        ServerEvent::ReadFailed { id, path, message } => {
            error!(session = %format!("{id:016x}"), path, message, "file read failed")
        }
        ServerEvent::SessionClosed {
            id,
            addr,
            reason,
            bytes_sent,
            packets_sent,
            packets_lost,
            probe_timeouts,
        } => info!(
            session = %format!("{id:016x}"), %addr, %reason, bytes_sent, packets_sent, packets_lost,
            probe_timeouts, "session closed"
        ),
    }
}

/// Binds the port; with `reuse_port` every serving thread binds it, and the
/// kernel spreads clients over them by address (keeping each on one).
fn bind_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `--bind ::` serves IPv4 clients too where the system allows it.
        let _ = socket.set_only_v6(false);
    }
    // The kernel may cap these; a smaller buffer only costs drops under bursts.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// What the server serves: one folder, or a bucket.
enum Store {
    Folder(Library),
    Objects(Arc<ObjectLibrary>),
}

impl ContentStore for Store {
    fn catalog(&self) -> Vec<CatalogEntry> {
        match self {
            Store::Folder(l) => l.catalog(),
            Store::Objects(o) => o.catalog(),
        }
    }

    fn open(&self, path: &str) -> Result<Box<dyn Content>, OpenFailure> {
        match self {
            Store::Folder(l) => l.open(path),
            Store::Objects(o) => o.open(path),
        }
    }
}

/// A datagram one serving thread's socket received for a session another
/// thread holds (the client's address changed, so the kernel's choice of
/// socket did too).
type Handoff = (SocketAddr, Vec<u8>);

/// What ties one serving thread to the others.
struct ShardLink {
    index: usize,
    /// Datagrams the other threads received for this one's sessions.
    inbox: tokio::sync::mpsc::Receiver<Handoff>,
    /// Every thread's inbox, this one's included, by shard index.
    peers: Arc<Vec<tokio::sync::mpsc::Sender<Handoff>>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Told when content fetched from the store arrives.
    content_arrived: Arc<tokio::sync::Notify>,
}

/// Handoffs queued per thread before more are dropped (as the network
/// would drop them): a busy thread cannot make the others hold memory.
const HANDOFF_QUEUE: usize = 1024;

/// What one serving thread reads its datagrams into.
struct Receiver {
    /// Bytes for one receive: a GRO train of datagrams.
    slot: usize,
    bufs: Vec<u8>,
    metas: [RecvMeta; RECV_SLOTS],
}

impl Receiver {
    fn new(state: &UdpSocketState) -> Self {
        // Room for a batch of receives, each up to a GRO train of datagrams.
        let slot = (MAX_DATAGRAM_SIZE * state.gro_segments()).max(MAX_DATAGRAM_SIZE);
        Receiver {
            slot,
            bufs: vec![0u8; slot * RECV_SLOTS],
            metas: [RecvMeta::default(); RECV_SLOTS],
        }
    }

    /// Hands what the socket holds (up to [`MAX_RECV_BATCH`] datagrams) to
    /// the endpoint, or to the thread whose session it is. `watched`: the
    /// socket is being waited on through tokio, whose readiness a
    /// `WouldBlock` must clear; a moderated turn reads it directly.
    ///
    /// A receive that fills fewer than all the slots found the socket
    /// empty, and the drain ends there rather than ask the kernel again to
    /// hear so: with 20 paced pulls that was a receive more every turn,
    /// about 900 a second.
    fn drain(
        &mut self,
        socket: &UdpSocket,
        state: &UdpSocketState,
        watched: bool,
        endpoint: &mut ServerEndpoint<Arc<Store>>,
        link: &ShardLink,
        counters: &LoopCounters,
    ) -> usize {
        let shards = link.peers.len();
        let slot = self.slot;
        let mut handled = 0;
        while handled < MAX_RECV_BATCH {
            let received = {
                let mut iovs: Vec<IoSliceMut<'_>> =
                    self.bufs.chunks_mut(slot).map(IoSliceMut::new).collect();
                let metas = &mut self.metas;
                if watched {
                    let mut emptied = 0;
                    let received = socket.try_io(Interest::READABLE, || {
                        let n = state.recv(socket.into(), &mut iovs, metas)?;
                        if RECEIVES_IN_BATCHES && n < RECV_SLOTS {
                            // Told so, tokio clears its readiness.
                            emptied = n;
                            return Err(std::io::ErrorKind::WouldBlock.into());
                        }
                        Ok(n)
                    });
                    match received {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && emptied > 0 => {
                            Ok(emptied)
                        }
                        other => other,
                    }
                } else {
                    state.recv(socket.into(), &mut iovs, metas)
                }
            };
            let count = match received {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ICMP errors from a vanished client surface here;
                // its session simply idles out.
                Err(e) => {
                    debug!(error = %e, "receive failed");
                    break;
                }
            };
            let now = Instant::now();
            for (meta, buf) in self.metas.iter().zip(self.bufs.chunks(slot)).take(count) {
                let stride = meta.stride.max(1);
                for datagram in buf[..meta.len].chunks(stride) {
                    match shard_of(datagram, shards) {
                        Some(owner) if owner != link.index => {
                            counters.handoffs.fetch_add(1, Ordering::Relaxed);
                            let _ = link.peers[owner].try_send((meta.addr, datagram.to_vec()));
                        }
                        _ => endpoint.handle_datagram(now, meta.addr, datagram),
                    }
                    handled += 1;
                }
            }
            if RECEIVES_IN_BATCHES && count < RECV_SLOTS {
                break;
            }
        }
        handled
    }
}

/// When a turn that finds the next timer at `wake` should be moderated:
/// the tick at or after `wake` to sleep until, if `wake` is near.
fn moderated_until(
    now: Instant,
    wake: Instant,
    epoch: Instant,
    moderation: Duration,
    tick: Duration,
) -> Option<Instant> {
    if wake <= now || wake - now > moderation {
        return None;
    }
    let tick = tick.as_nanos();
    let since = wake.saturating_duration_since(epoch).as_nanos();
    let ticks = since.div_ceil(tick);
    Some(epoch + Duration::from_nanos(u64::try_from(ticks * tick).ok()?))
}

/// Tells every client the server is going away and sends the goodbyes.
async fn shut_down(
    endpoint: &mut ServerEndpoint<Arc<Store>>,
    socket: &UdpSocket,
    index: usize,
    counters: &LoopCounters,
) {
    if index == 0 {
        info!(
            "shutting down: telling {} clients",
            endpoint.admission().sessions()
        );
    }
    endpoint.shutdown();
    let now = Instant::now();
    let mut out = Vec::with_capacity(MAX_DATAGRAM_SIZE);
    while let Some(to) = endpoint.poll_transmit(now, &mut out) {
        let _ = socket.send_to(&out, to).await;
    }
    while let Some(event) = endpoint.poll_event() {
        log_event(event, counters);
    }
}

async fn serve(
    socket: UdpSocket,
    state: UdpSocketState,
    mut endpoint: ServerEndpoint<Arc<Store>>,
    mut link: ShardLink,
    counters: Arc<LoopCounters>,
) {
    let mut receiver = Receiver::new(&state);
    let mut batch = SendBatcher::new(state.max_gso_segments());
    let mut lost_reported = 0;
    let epoch = Instant::now();
    let mut turn_start = epoch;
    // The last turn was one of datagrams arriving (woken by the socket, or
    // a gather that found some): more are likely on their way.
    let mut arriving = false;
    loop {
        let now = Instant::now();
        let last_turn = std::mem::replace(&mut turn_start, now);
        loop {
            let start = batch.mark();
            let Some(to) =
                endpoint.poll_transmit_vectored(now, &mut batch.buf, &mut batch.payloads)
            else {
                break;
            };
            batch.push(start, to, &socket, &counters).await;
        }
        batch.flush(&socket, &counters).await;
        while let Some(event) = endpoint.poll_event() {
            log_event(event, &counters);
        }
        counters
            .sessions
            .store(endpoint.admission().sessions() as u64, Ordering::Relaxed);
        let lost = endpoint.packets_lost();
        counters
            .retransmissions
            .fetch_add(lost - lost_reported, Ordering::Relaxed);
        lost_reported = lost;
        counters.wakeups.fetch_add(1, Ordering::Relaxed);
        let wake = endpoint
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        let before = Instant::now();
        let lateness = endpoint.tolerated_lateness();
        let tick = turn_tick(lateness);
        let moderation = match (endpoint.awaits_acks(), lateness >= TURN_TICK) {
            (true, true) => tick,
            (true, false) => TURN_MODERATION_AWAITING_ACKS,
            (false, _) => TURN_MODERATION.max(tick),
        };
        let moderated = moderated_until(before, wake, epoch, moderation, tick);
        // With the next timer far, only arriving datagrams wake the thread,
        // each on its own: while they keep coming, turns come at most every
        // `ack_gather`.
        let since = before.saturating_duration_since(last_turn);
        let gathered = ack_gather(lateness)
            .filter(|g| arriving && since < *g)
            .map(|g| before + (g - since));
        if let Some(until) = moderated.or(gathered) {
            // A blocking sleep, not tokio's: the runtime would wake for
            // every datagram arriving on the socket it watches. The other
            // tasks of this thread's runtime (the store's fetches; on the
            // first thread also the metrics page and the signal handler)
            // run at the yield below, every turn.
            std::thread::sleep(until - before);
            tokio::task::yield_now().await;
            if link.shutdown.has_changed().unwrap_or(true) {
                return shut_down(&mut endpoint, &socket, link.index, &counters).await;
            }
            let received = receiver.drain(&socket, &state, false, &mut endpoint, &link, &counters);
            while let Ok((from, datagram)) = link.inbox.try_recv() {
                endpoint.handle_datagram(Instant::now(), from, &datagram);
            }
            if link.content_arrived.notified().now_or_never().is_some() {
                endpoint.content_ready();
            }
            endpoint.handle_timeout(Instant::now());
            // A gather that found nothing: the datagrams stopped, and the
            // socket is watched again.
            if moderated.is_some() || received > 0 {
                continue;
            }
        }
        arriving = false;
        tokio::select! {
            r = socket.readable() => {
                if let Err(e) = r {
                    debug!(error = %e, "socket not readable");
                    continue;
                }
                // Not when tokio's readiness was stale (a moderated turn
                // read the socket without clearing it).
                arriving = receiver.drain(&socket, &state, true, &mut endpoint, &link, &counters) > 0;
            }
            Some((from, datagram)) = link.inbox.recv() => {
                endpoint.handle_datagram(Instant::now(), from, &datagram);
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                endpoint.handle_timeout(Instant::now());
            }
            _ = link.content_arrived.notified() => endpoint.content_ready(),
            _ = link.shutdown.changed() => {
                return shut_down(&mut endpoint, &socket, link.index, &counters).await;
            }
        }
    }
}

/// Sets up one serving thread's socket and endpoint and serves until shutdown.
async fn run_shard(
    socket: std::net::UdpSocket,
    config: ServerConfig,
    store: Arc<Store>,
    shard: Shard,
    link: ShardLink,
    counters: Arc<LoopCounters>,
) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            error!(thread = shard.index, error = %e, "cannot serve on this thread");
            return;
        }
    };
    let state = match UdpSocketState::new((&socket).into()) {
        Ok(s) => s,
        Err(e) => {
            error!(thread = shard.index, error = %e, "cannot set up the socket");
            return;
        }
    };
    // Files opened on this thread wake it when their reads finish.
    library::CONTENT_READY.with(|r| *r.borrow_mut() = Some(link.content_arrived.clone()));
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let endpoint = ServerEndpoint::new_shard(config, store, seed, Instant::now(), shard);
    serve(socket, state, endpoint, link, counters).await;
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    relax_timer_slack();
    if let Err(e) = init_logging(args.log_file.as_ref()) {
        eprintln!("server: {e}");
        return std::process::ExitCode::from(2);
    }
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(MAX_THREADS);
    let content_arrived: Vec<Arc<tokio::sync::Notify>> = (0..threads)
        .map(|_| Arc::new(tokio::sync::Notify::new()))
        .collect();
    let store = match (&args.dir, &args.store) {
        (Some(dir), _) => match Library::new(dir) {
            Ok(l) => Store::Folder(l),
            Err(e) => {
                eprintln!("server: cannot serve {}: {e}", dir.display());
                return std::process::ExitCode::from(2);
            }
        },
        (None, Some(url)) => {
            if !(args.catalog_refresh.is_finite() && args.catalog_refresh >= 0.1) {
                eprintln!("server: --catalog-refresh must be at least 0.1 seconds");
                return std::process::ExitCode::from(2);
            }
            let disk = match &args.cache_dir {
                None => None,
                Some(dir) => {
                    match disk_cache::DiskCache::open(
                        dir,
                        args.cache_dir_mb.saturating_mul(1 << 20),
                    ) {
                        Ok(d) => Some(d),
                        Err(e) => {
                            eprintln!("server: cannot use --cache-dir {}: {e}", dir.display());
                            return std::process::ExitCode::from(2);
                        }
                    }
                }
            };
            match ObjectLibrary::new(
                url,
                args.block_kb.saturating_mul(1024),
                args.cache_mb.saturating_mul(1024 * 1024),
                disk,
                content_arrived.clone(),
            ) {
                Ok(o) => Store::Objects(Arc::new(o)),
                Err(e) => {
                    eprintln!("server: cannot serve {e}");
                    return std::process::ExitCode::from(2);
                }
            }
        }
        (None, None) => {
            eprintln!("server: give --dir DIR or --store s3://bucket[/prefix]");
            return std::process::ExitCode::from(2);
        }
    };
    let metrics_listener = match args.metrics.map(metrics::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("server: cannot serve metrics: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.idle_timeout.is_nan() || args.idle_timeout <= 0.0 {
        eprintln!("server: --idle-timeout must be a positive number of seconds");
        return std::process::ExitCode::from(2);
    }
    let max_payload_limit = MAX_DATAGRAM_SIZE - DATA_OVERHEAD;
    if !(64..=max_payload_limit).contains(&args.max_payload) {
        eprintln!("server: --max-payload must be between 64 and {max_payload_limit}");
        return std::process::ExitCode::from(2);
    }
    if args.max_datagram > MAX_UDP_PAYLOAD {
        eprintln!("server: --max-datagram must be at most {MAX_UDP_PAYLOAD}");
        return std::process::ExitCode::from(2);
    }
    let passphrase = match &args.passphrase_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => match text
                .lines()
                .next()
                .map(str::trim_end)
                .filter(|l| !l.is_empty())
            {
                Some(line) => Some(Psk::from_passphrase(line)),
                None => {
                    eprintln!(
                        "server: {} holds no passphrase on its first line",
                        path.display()
                    );
                    return std::process::ExitCode::from(2);
                }
            },
            Err(e) => {
                eprintln!(
                    "server: cannot read passphrase file {}: {e}",
                    path.display()
                );
                return std::process::ExitCode::from(2);
            }
        },
    };
    let addr = SocketAddr::new(args.bind, args.port);
    let first = match bind_socket(addr, threads > 1) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("server: cannot listen on {addr}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let local = first.local_addr().unwrap_or(addr);
    // The others bind the port the first got (it may have asked for 0).
    let mut sockets = vec![first];
    for _ in 1..threads {
        match bind_socket(local, true) {
            Ok(s) => sockets.push(s),
            Err(e) => {
                eprintln!(
                    "server: serving on {} thread(s), not {threads}: cannot share {local}: {e}",
                    sockets.len()
                );
                break;
            }
        }
    }
    let threads = sockets.len();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("server: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let config = ServerConfig {
        idle_timeout: Duration::from_secs_f64(args.idle_timeout),
        max_sessions: args.max_sessions,
        max_sessions_per_address: args
            .max_sessions_per_address
            .unwrap_or((args.max_sessions / 4).max(1)),
        max_payload: args.max_payload,
        max_datagram: args.max_datagram,
        passphrase,
    };
    let shards = Shard::of_server(
        threads,
        config.max_sessions,
        config.max_sessions_per_address,
    );
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..threads)
        .map(|_| tokio::sync::mpsc::channel::<Handoff>(HANDOFF_QUEUE))
        .unzip();
    let peers = Arc::new(senders);
    let mut links: Vec<ShardLink> = inboxes
        .into_iter()
        .zip(content_arrived.iter())
        .enumerate()
        .map(|(index, (inbox, ready))| ShardLink {
            index,
            inbox,
            peers: peers.clone(),
            shutdown: shutdown_rx.clone(),
            content_arrived: ready.clone(),
        })
        .collect();
    let mut sockets = sockets.into_iter();
    let (Some(main_socket), Some(main_link)) =
        (sockets.next(), (!links.is_empty()).then(|| links.remove(0)))
    else {
        return std::process::ExitCode::from(1);
    };
    let store = Arc::new(store);
    let shard = move |index: usize| shards[index].clone();
    runtime.block_on(async move {
        let serving = match &*store {
            Store::Folder(l) => l.root().display().to_string(),
            Store::Objects(o) => {
                // The catalog before the first client; a store that is
                // down now is reported, and listed again until it answers.
                match o.refresh().await {
                    Ok(n) => info!(store = o.url(), objects = n, "store listed"),
                    Err(e) => warn!(store = o.url(), error = e, "cannot list the store yet"),
                }
                o.spawn_refresher(Duration::from_secs_f64(args.catalog_refresh));
                o.url().to_string()
            }
        };
        let store_counters = match &*store {
            Store::Objects(o) => Some(o.counters()),
            Store::Folder(_) => None,
        };
        let metrics = Arc::new(Metrics::new(store_counters));
        if let Some(listener) = metrics_listener {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => metrics.spawn_server(l),
                Err(e) => warn!(error = %e, "cannot serve metrics"),
            }
        }
        // The other threads, each with its own runtime, socket and sessions.
        let mut workers = Vec::new();
        for (socket, link) in sockets.zip(links) {
            let index = link.index;
            let (config, store, counters) =
                (config.clone(), store.clone(), metrics.counters.clone());
            let shard = shard(index);
            let worker = std::thread::Builder::new()
                .name(format!("serve-{index}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => {
                            let serving = run_shard(socket, config, store, shard, link, counters);
                            // A spawned task, not the `block_on` future: waking
                            // that one goes through the runtime's eventfd, a
                            // system call and a turn of the reactor each time.
                            let _ = rt.block_on(rt.spawn(serving));
                        }
                        Err(e) => error!(thread = index, error = %e, "cannot start the runtime"),
                    }
                });
            match worker {
                Ok(w) => workers.push(w),
                Err(e) => warn!(thread = index, error = %e, "cannot start a serving thread"),
            }
        }
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = shutdown_tx.send(true);
        });
        info!(serving, %local, threads, "serving");
        // Tests and scripts read this line to learn the port.
        println!("udpvid server listening on {local}, serving {serving}");
        let _ = std::io::stdout().flush();
        // Withdrawn (a goodbye on the LAN) when the server stops.
        let _announcement = if args.announce {
            let name = args.name.clone().unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("udpvid on {}", host.trim())
            });
            let address = (!local.ip().is_unspecified()).then(|| local.ip());
            match Announcement::new(&name, local.port(), address) {
                Ok(a) => {
                    info!(name, "announced on the LAN (_udpvid._udp)");
                    Some(a)
                }
                Err(e) => {
                    warn!(error = %e, "cannot announce on the LAN; serving anyway");
                    None
                }
            }
        } else {
            None
        };
        let serving = tokio::spawn(run_shard(
            main_socket,
            config,
            store,
            shard(0),
            main_link,
            metrics.counters.clone(),
        ));
        if let Err(e) = serving.await {
            error!(error = %e, "the serving thread failed");
        }
        for w in workers {
            let _ = w.join();
        }
        std::process::ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_timer_is_waited_for_on_the_tick_after_it_and_a_far_one_is_not() {
        let epoch = Instant::now();
        let now = epoch + TURN_TICK * 5 + TURN_TICK / 4;
        // Near: the tick at or after the timer, so timers within one tick
        // share a turn.
        let near = now + TURN_TICK / 2;
        assert_eq!(
            moderated_until(now, near, epoch, TURN_MODERATION, TURN_TICK),
            Some(epoch + TURN_TICK * 6)
        );
        let on_tick = epoch + TURN_TICK * 7;
        assert!(on_tick - now <= TURN_MODERATION);
        assert_eq!(
            moderated_until(now, on_tick, epoch, TURN_MODERATION, TURN_TICK),
            Some(on_tick)
        );
        // Far (the socket is watched meanwhile), or already due.
        assert_eq!(
            moderated_until(
                now,
                now + TURN_MODERATION + Duration::from_micros(1),
                epoch,
                TURN_MODERATION,
                TURN_TICK
            ),
            None
        );
        assert_eq!(
            moderated_until(now, now, epoch, TURN_MODERATION, TURN_TICK),
            None
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_timer_slack_is_set_for_the_threads_the_server_starts() {
        assert!(TIMER_SLACK * 4 <= TURN_TICK, "within what a tick tolerates");
        // In a thread of its own: the slack is per thread, and the test
        // harness's other threads keep theirs.
        let inherited = std::thread::spawn(|| {
            relax_timer_slack();
            std::thread::spawn(|| {
                // SAFETY: PR_GET_TIMERSLACK takes no pointer.
                unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) }
            })
            .join()
        })
        .join();
        assert_eq!(
            inherited.ok().and_then(|r| r.ok()),
            Some(TIMER_SLACK.as_nanos() as libc::c_int)
        );
    }

    #[test]
    fn arriving_datagrams_are_gathered_only_within_what_every_session_tolerates() {
        // A window-bound pull on loopback tolerates microseconds: no sleep.
        assert_eq!(ack_gather(Duration::ZERO), None);
        assert_eq!(ack_gather(Duration::from_micros(100)), None);
        assert_eq!(
            ack_gather(Duration::from_micros(600)),
            Some(Duration::from_micros(600))
        );
        assert_eq!(ack_gather(MAX_TOLERATED_LATENESS), Some(MAX_ACK_GATHER));
        // A gather applies only with the next timer beyond the moderation,
        // at least this: it ends before that timer is due.
        assert!(MAX_ACK_GATHER <= TURN_MODERATION_AWAITING_ACKS);
    }

    #[test]
    fn the_tick_grows_with_the_lateness_every_session_tolerates() {
        assert_eq!(turn_tick(Duration::ZERO), TURN_TICK);
        assert_eq!(turn_tick(Duration::from_millis(3)), TURN_TICK);
        assert_eq!(turn_tick(Duration::from_millis(5)), TURN_TICK * 2);
        assert_eq!(turn_tick(Duration::from_millis(8)), TURN_TICK * 4);
        assert_eq!(turn_tick(Duration::MAX), MAX_TOLERATED_LATENESS);
    }
}
