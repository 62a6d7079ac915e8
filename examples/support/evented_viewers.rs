//! Real-time viewers for `load viewers`, many driven from each thread.
//!
//! Each viewer is the protocol core the element uses (`ClientConnection`,
//! default configuration: the adaptive read-ahead) on its own socket, and a
//! player that prerolls a second of media and then takes what the playback
//! clock makes due every 100 ms. All of them share one tokio runtime,
//! on one thread unless `LOAD_VIEWER_THREADS` asks for more. The first generator gave each viewer a thread
//! and `BlockingClient` its network thread: at 300 viewers that needed
//! more than this 2-core machine's second core, and the generator, not
//! the server, decided the stalls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gstudpvid::protocol::{ClientConfig, ClientConnection, ClientEvent};
use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::{CLIENT_TIMEOUT, ViewerReport, same_bytes};

/// The player's clock tick, as in the thread-per-viewer generator.
const TICK: Duration = Duration::from_millis(100);
/// The receive buffer `BlockingClient` asks for.
const RECEIVE_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// How often the generator checks how late its own timers fire.
const LAG_PROBE: Duration = Duration::from_millis(10);
/// Receive calls per wake-up before the other viewers get their turn.
const RECEIVES_PER_WAKE: usize = 32;

/// Where the player is.
enum Player {
    /// Reading the first second before the clock starts.
    Preroll,
    /// The clock runs; the next tick is due then.
    Playing { next_tick: Instant },
    /// The bytes of the tick due at `scheduled` are not all there yet;
    /// asked for at `asked`.
    Waiting { scheduled: Instant, asked: Instant },
    /// The user paused after the preroll (`load paused`): nothing is read
    /// until the end, and the session lives on its keepalives. Its
    /// datagrams are counted from `since` + the mode's `settle` (`counting`).
    Paused { since: Instant, counting: bool },
}

/// What the viewers do once they have prerolled.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// Play in real time for the length.
    Play,
    /// Pause for the length; count the datagrams from `settle` after the
    /// pause (the window fills after it).
    Pause { settle: Duration },
}

/// What the viewers saw, and how far behind its timers the thread that
/// drives them fell: a stall while the generator was a tick or more late
/// says more about the generator than about the server.
pub struct Run {
    pub reports: Vec<ViewerReport>,
    pub longest_lag: Duration,
}

/// Runs `n` viewers of `files` (viewer `i` plays file `i % files.len()`,
/// named `f{i}.bin`) at `rate` bytes/s for `length` (or pausing for it
/// after the preroll) against the server at `server`, arriving over
/// [`arrivals_over`], spread over `threads` threads (one current-thread
/// runtime each). Blocks the calling thread.
pub fn run(
    n: usize,
    threads: usize,
    server: SocketAddr,
    files: Arc<Vec<Vec<u8>>>,
    rate: f64,
    length: Duration,
    mode: Mode,
) -> Run {
    let threads = threads.clamp(1, n.max(1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let files = files.clone();
            // Viewer i goes to thread i % threads, so arrivals interleave.
            let viewers: Vec<usize> = (t..n).step_by(threads).collect();
            std::thread::spawn(move || {
                run_on_this_thread(&viewers, n, server, files, rate, length, mode)
            })
        })
        .collect();
    let mut reports: Vec<(usize, ViewerReport)> = Vec::with_capacity(n);
    let mut longest_lag = Duration::ZERO;
    for h in handles {
        match h.join() {
            Ok((some, lag)) => {
                reports.extend(some);
                longest_lag = longest_lag.max(lag);
            }
            Err(_) => reports.push((
                usize::MAX,
                ViewerReport {
                    error: Some("a viewers' thread panicked".into()),
                    ..Default::default()
                },
            )),
        }
    }
    reports.sort_by_key(|(i, _)| *i);
    Run {
        reports: reports.into_iter().map(|(_, r)| r).collect(),
        longest_lag,
    }
}

/// Runs the viewers numbered in `viewers` (of `n`) on a runtime on this
/// thread; returns their reports and the runtime's longest timer lag.
fn run_on_this_thread(
    viewers: &[usize],
    n: usize,
    server: SocketAddr,
    files: Arc<Vec<Vec<u8>>>,
    rate: f64,
    length: Duration,
    mode: Mode,
) -> (Vec<(usize, ViewerReport)>, Duration) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let error = Some(format!("cannot start the viewers' runtime: {e}"));
            let reports = viewers
                .iter()
                .map(|&i| {
                    let report = ViewerReport {
                        error: error.clone(),
                        ..Default::default()
                    };
                    (i, report)
                })
                .collect();
            return (reports, Duration::ZERO);
        }
    };
    runtime.block_on(async move {
        let longest_lag = Arc::new(AtomicU64::new(0));
        let lag = {
            let longest_lag = longest_lag.clone();
            tokio::spawn(async move {
                loop {
                    let due = Instant::now() + LAG_PROBE;
                    tokio::time::sleep_until(due.into()).await;
                    let late = Instant::now().saturating_duration_since(due);
                    longest_lag.fetch_max(late.as_micros() as u64, Ordering::Relaxed);
                }
            })
        };
        let tasks: Vec<_> = viewers
            .iter()
            .map(|&i| {
                let files = files.clone();
                let arrival = arrivals_over() * i as u32 / n.max(1) as u32;
                tokio::spawn(async move {
                    tokio::time::sleep(arrival).await;
                    let index = i % files.len();
                    let file = format!("f{index}.bin");
                    let mut report = ViewerReport::default();
                    if let Err(e) = view(
                        server,
                        &file,
                        &files[index],
                        rate,
                        length,
                        mode,
                        &mut report,
                    )
                    .await
                    {
                        report.error = Some(e);
                    }
                    report
                })
            })
            .collect();
        let mut reports = Vec::with_capacity(viewers.len());
        for (t, &i) in tasks.into_iter().zip(viewers) {
            let report = t.await.unwrap_or_else(|e| ViewerReport {
                error: Some(format!("viewer panicked: {e}")),
                ..Default::default()
            });
            reports.push((i, report));
        }
        lag.abort();
        let lag = Duration::from_micros(longest_lag.load(Ordering::Relaxed));
        (reports, lag)
    })
}

/// One viewer: connects, opens `file` in the Hello, plays it, and closes.
async fn view(
    server: SocketAddr,
    file: &str,
    data: &[u8],
    rate: f64,
    length: Duration,
    mode: Mode,
    report: &mut ViewerReport,
) -> Result<(), String> {
    let socket = bind().map_err(|e| e.to_string())?;
    let state = UdpSocketState::new((&socket).into()).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut conn = ClientConnection::new(ClientConfig::default(), rand::random(), start);
    conn.open_file(start, file, 0);
    let result = play(
        &mut conn, &socket, &state, server, data, rate, length, mode, report,
    )
    .await;
    conn.close();
    while let Some(d) = conn.poll_transmit(Instant::now()) {
        let _ = socket.try_send_to(&d, server);
    }
    result
}

/// A loopback socket with the receive buffer the element's client asks
/// for: with the default one a viewer (one of hundreds on this thread)
/// lost a sixth of the datagrams of the server's bursts.
fn bind() -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(RECEIVE_BUFFER_BYTES);
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// The player's loop: reads what the clock makes due, counts the ticks
/// whose bytes came more than a tick late as stalls (the clock stops while
/// it waits), and checks every byte.
#[allow(clippy::too_many_arguments)]
async fn play(
    conn: &mut ClientConnection,
    socket: &UdpSocket,
    state: &UdpSocketState,
    server: SocketAddr,
    data: &[u8],
    rate: f64,
    length: Duration,
    mode: Mode,
    report: &mut ViewerReport,
) -> Result<(), String> {
    let mut buf = vec![0u8; u16::MAX as usize];
    let mut metas = [RecvMeta::default(); 1];
    let size = data.len() as u64;
    let mut opened = false;
    let mut offset = 0u64;
    let mut target = (rate as u64).min(size);
    let mut played = Duration::ZERO;
    let mut player = Player::Preroll;
    let mut progress = Instant::now();
    let settle = match mode {
        Mode::Pause { settle } => settle,
        Mode::Play => Duration::ZERO,
    };
    loop {
        let now = Instant::now();
        while let Some(event) = conn.poll_event() {
            match event {
                ClientEvent::Opened { size: s, .. } if s != size => {
                    return Err(format!("size {s} != {size}"));
                }
                ClientEvent::Opened { .. } => opened = true,
                ClientEvent::OpenFailed { message, .. } => return Err(message),
                ClientEvent::Closed { message, .. } => return Err(format!("closed: {message}")),
                ClientEvent::ProtocolError(m) | ClientEvent::AuthenticationFailed(m) => {
                    return Err(m);
                }
                ClientEvent::VersionMismatch { .. } => return Err("version mismatch".into()),
                _ => {}
            }
        }
        // Reads and the clock's moves until neither changes anything.
        let mut moved = true;
        while moved {
            moved = false;
            while opened && offset < target {
                let Some(chunk) = conn.read(now, (target - offset) as usize) else {
                    break;
                };
                offset += same_bytes(data, offset, &chunk)? as u64;
                progress = now;
            }
            match player {
                Player::Preroll if offset >= target && matches!(mode, Mode::Pause { .. }) => {
                    player = Player::Paused {
                        since: now,
                        counting: false,
                    };
                }
                Player::Paused {
                    since,
                    counting: false,
                } if now >= since + settle => {
                    player = Player::Paused {
                        since,
                        counting: true,
                    };
                    let stats = conn.stats();
                    report.paused_packets = (stats.packets_sent, stats.packets_received);
                }
                Player::Preroll if offset >= target => {
                    player = Player::Playing {
                        next_tick: now + TICK,
                    };
                }
                Player::Playing { next_tick } if now >= next_tick => {
                    played += TICK;
                    target = (((played.as_secs_f64() + 1.0) * rate) as u64).min(size);
                    player = Player::Waiting {
                        scheduled: next_tick,
                        asked: now,
                    };
                    moved = true;
                }
                Player::Waiting { scheduled, asked } if offset >= target => {
                    let waited = now.saturating_duration_since(asked);
                    let next_tick = if waited > TICK {
                        report.stalls += 1;
                        report.stalled += waited;
                        report.stall_ends.push(now);
                        now + TICK
                    } else {
                        scheduled + TICK
                    };
                    player = Player::Playing { next_tick };
                    moved = played < length && offset < size;
                }
                _ => {}
            }
        }
        report.bytes = offset;
        report.peak_read_ahead = report.peak_read_ahead.max(conn.read_ahead());
        if matches!(player, Player::Playing { .. }) && (played >= length || offset >= size) {
            return Ok(());
        }
        if let Player::Paused {
            since,
            counting: true,
        } = player
        {
            if now.saturating_duration_since(since) >= length {
                let stats = conn.stats();
                let (sent, received) = report.paused_packets;
                report.paused_packets =
                    (stats.packets_sent - sent, stats.packets_received - received);
                report.paused_for = now.saturating_duration_since(since + settle);
                return Ok(());
            }
        }
        if offset < target && now.saturating_duration_since(progress) > CLIENT_TIMEOUT {
            return Err(format!(
                "no data for {CLIENT_TIMEOUT:?} at {offset} of {size}"
            ));
        }
        while let Some(d) = conn.poll_transmit(now) {
            // A full socket buffer drops it, as the network would.
            let _ = socket.try_send_to(&d, server);
        }
        let mut wake = conn
            .poll_timeout()
            .unwrap_or(now + CLIENT_TIMEOUT)
            .min(progress + CLIENT_TIMEOUT + TICK);
        match player {
            Player::Playing { next_tick } => wake = wake.min(next_tick),
            Player::Paused { since, counting } => {
                wake = wake.min(if counting {
                    since + length
                } else {
                    since + settle
                });
            }
            _ => {}
        }
        tokio::select! {
            r = socket.readable() => {
                if r.is_err() {
                    continue;
                }
                for _ in 0..RECEIVES_PER_WAKE {
                    let received = {
                        let mut iovs = [std::io::IoSliceMut::new(&mut buf)];
                        socket.try_io(Interest::READABLE, || {
                            state.recv(socket.into(), &mut iovs, &mut metas)
                        })
                    };
                    let Ok(count) = received else { break };
                    let now = Instant::now();
                    for meta in metas.iter().take(count) {
                        if meta.addr != server {
                            continue;
                        }
                        for datagram in buf[..meta.len].chunks(meta.stride.max(1)) {
                            conn.handle_datagram(now, datagram);
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let now = Instant::now();
        if conn.poll_timeout().is_some_and(|t| t <= now) {
            conn.handle_timeout(now);
        }
    }
}

/// How long the viewers take to arrive (`LOAD_ARRIVAL_SECONDS`, default
/// one second: a flash crowd).
pub fn arrivals_over() -> Duration {
    std::env::var("LOAD_ARRIVAL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs_f64)
}
