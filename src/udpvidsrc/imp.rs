//! The element: GStreamer glue around [`BlockingClient`]. Nothing
//! protocol-shaped lives here; it maps properties, URIs, seeks, buffering,
//! stats and errors.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;

use crate::blocking_client::{BlockingClient, ClientSnapshot, WaitError};
use crate::location::{self, DEFAULT_PORT, Location};
use crate::protocol::buffering::{BufferingCause, BufferingLevel, UNDERRUN_HOLD};
use crate::protocol::client::ClientConfig;
use crate::protocol::crypto::Psk;
use crate::protocol::media_index;
use crate::protocol::read_ahead::{
    DEFAULT_MAX_READ_AHEAD, DEFAULT_MIN_READ_AHEAD, DEFAULT_TARGET_TIME, ReadAhead,
};
use crate::protocol::wire::{CloseReason, OpenErrorKind};

const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_TIMEOUT_SECS: u32 = 10;
/// Smallest read-ahead accepted: a few datagrams, or the transfer crawls.
const MIN_READ_AHEAD: u64 = 16 * 1024;
/// How often the monitor looks at the stats when nothing wakes it.
const MONITOR_TICK: Duration = Duration::from_millis(100);
/// While buffering the monitor looks this often, and at once when the
/// bytes for 100 % are in: an application pauses the pipeline until it
/// posts 100 %, so on a fast link a coarse tick would idle the pipeline for
/// most of each refill.
const BUFFERING_TICK: Duration = Duration::from_millis(20);
/// Percents short of 100 are posted at most this often: an application
/// wakes for each message, and a pull faster than its link (`udpvidsrc !
/// filesink` at 20 Mbit/s) posted 47 a second, 610 in 13 s, each also
/// waking the application's main loop. Ten a second still moves a
/// progress bar smoothly; 100 % goes out at once.
const BUFFERING_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// In push mode, how long a read going on through the stream may wait past
/// its first byte to fill the block: on a link slower than the pipeline
/// every burst that arrived was a buffer of its own (a quarter of a
/// millisecond of the streaming thread's CPU each, 250 a second at
/// 20 Mbit/s). 25 ms is about what 64 KiB takes at 20 Mbit/s: at 10 ms the
/// streaming thread still woke 158 times a second and spent 0.13 s of a
/// 13 s pull, at 25 ms 0.06-0.07. Bounded so it never matters to playback;
/// the first read after a start or a jump does not wait.
const GATHER: Duration = Duration::from_millis(25);
/// Values of `UdpVidSrc::buffering`.
const NOT_BUFFERING: u8 = 0;
const BUFFERING_START: u8 = 1;
const BUFFERING_UNDERRUN: u8 = 2;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "udpvidsrc",
        gst::DebugColorFlags::empty(),
        Some("udpvid source"),
    )
});

#[derive(Debug, Clone)]
struct Settings {
    host: String,
    port: u32,
    file: Option<String>,
    /// Fixed read-ahead in bytes; 0 for the adaptive, time-based one.
    read_ahead: u64,
    read_ahead_time: u64,
    max_read_ahead: u64,
    timeout: u32,
    stats_interval: u32,
    passphrase: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT as u32,
            file: None,
            read_ahead: 0,
            read_ahead_time: DEFAULT_TARGET_TIME.as_nanos() as u64,
            max_read_ahead: DEFAULT_MAX_READ_AHEAD,
            timeout: DEFAULT_TIMEOUT_SECS,
            stats_interval: 0,
            passphrase: None,
        }
    }
}

impl Settings {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout as u64)
    }

    fn read_ahead(&self) -> ReadAhead {
        if self.read_ahead > 0 {
            ReadAhead::Fixed(self.read_ahead)
        } else {
            ReadAhead::Adaptive {
                target_time: Duration::from_nanos(self.read_ahead_time),
                min: DEFAULT_MIN_READ_AHEAD.min(self.max_read_ahead),
                max: self.max_read_ahead,
            }
        }
    }

    fn location(&self) -> Option<Location> {
        let port = u16::try_from(self.port).ok()?;
        Some(Location {
            servers: location::parse_host_list(&self.host, port).ok()?,
            path: self.file.clone().filter(|f| !f.is_empty())?,
        })
    }

    /// For messages: the server, or the servers in the order tried.
    fn servers(&self) -> String {
        u16::try_from(self.port)
            .ok()
            .and_then(|port| location::parse_host_list(&self.host, port).ok())
            .map_or_else(
                || format!("{}:{}", self.host, self.port),
                |list| location::format_host_list(&list),
            )
    }

    /// For messages: the URI, or what is missing from it.
    fn describe(&self) -> String {
        self.location().map_or_else(
            || format!("udpvid://{}/ (no file set)", self.servers()),
            |l| l.to_uri(),
        )
    }
}

/// Background thread of a started element: reports buffering progress
/// while buffering and posts stats every `stats-interval`. Dropping `wake`
/// stops it; sending on it says buffering began.
struct Monitor {
    wake: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

#[derive(Default)]
enum State {
    #[default]
    Stopped,
    Started {
        /// Shared so `unlock` can cancel a wait without the state lock,
        /// which `create` must not hold while it blocks.
        client: Arc<BlockingClient>,
        size: u64,
        /// Offset of the next byte `create` returns without a seek.
        position: u64,
        started_at: Instant,
        monitor: Option<Monitor>,
    },
}

/// What the monitor learns of the pipeline's playback, for `create`.
#[derive(Debug)]
struct PlaybackEstimate {
    /// Bytes taken from this source and not played yet; `u64::MAX` unknown.
    held: AtomicU64,
    /// The media's bytes per second of playback (`f64` bits); 0 unknown.
    media_rate: AtomicU64,
    /// `create` waits for bytes without having posted buffering (the
    /// pipeline held enough to play on meanwhile).
    waiting: AtomicBool,
    /// Bytes pushed downstream since start buffering began (at the start or
    /// after a jump the server serves). An application paused on buffering
    /// plays none of them, so the pipeline still holds them: they count
    /// towards the start goal. Without this, a player waited after preroll
    /// for 256 KiB beyond the ~0.8 s of media the demuxer had already
    /// queued (a faststart MP4 at 80 ms RTT: first frame 1.13 s, 0.66 s
    /// when ignoring buffering).
    pushed_while_starting: AtomicU64,
    /// The element was seen PLAYING since the file was opened: before
    /// that, the pipeline prerolls and has played nothing.
    has_played: AtomicBool,
}

impl Default for PlaybackEstimate {
    fn default() -> Self {
        PlaybackEstimate {
            held: AtomicU64::new(u64::MAX),
            media_rate: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            pushed_while_starting: AtomicU64::new(0),
            has_played: AtomicBool::new(false),
        }
    }
}

impl PlaybackEstimate {
    fn media_rate(&self) -> Option<f64> {
        let r = f64::from_bits(self.media_rate.load(Ordering::Acquire));
        (r > 0.0).then_some(r)
    }

    /// The pipeline holds enough ahead of playback to play on while the
    /// source waits, so an underrun need not pause it.
    fn holds_enough(&self) -> bool {
        let held = self.held.load(Ordering::Acquire);
        match self.media_rate() {
            Some(rate) if held != u64::MAX => held as f64 >= rate * UNDERRUN_HOLD.as_secs_f64(),
            _ => false,
        }
    }
}

pub struct UdpVidSrc {
    settings: Mutex<Settings>,
    state: Mutex<State>,
    playback: Arc<PlaybackEstimate>,
    /// Set on underrun (and at start, and after a seek to the server);
    /// cleared by the monitor once the buffer is full enough.
    buffering: Arc<AtomicU8>,
    last_buffering_percent: Arc<Mutex<Option<i32>>>,
    /// Whether the open file is offered in push mode only (decided from
    /// its first bytes, once per start).
    push_only: Mutex<Option<bool>>,
}

impl Default for UdpVidSrc {
    fn default() -> Self {
        UdpVidSrc {
            settings: Mutex::new(Settings::default()),
            state: Mutex::new(State::Stopped),
            playback: Arc::default(),
            buffering: Arc::new(AtomicU8::new(NOT_BUFFERING)),
            last_buffering_percent: Arc::new(Mutex::new(None)),
            push_only: Mutex::new(None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stats as a structure; zeros when not connected.
fn stats_structure(snapshot: Option<(&ClientSnapshot, Duration)>) -> gst::Structure {
    let (s, elapsed) = match snapshot {
        Some((s, e)) => (*s, e),
        None => (ClientSnapshot::default(), Duration::ZERO),
    };
    let secs = elapsed.as_secs_f64();
    let goodput = if secs > 0.0 {
        s.stats.bytes_delivered as f64 * 8.0 / secs
    } else {
        0.0
    };
    gst::Structure::builder("application/x-udpvid-stats")
        .field("connected", snapshot.is_some())
        .field("rtt-ms", s.stats.smoothed_rtt.as_secs_f64() * 1000.0)
        .field(
            "rtt-variance-ms",
            s.stats.rtt_variance.as_secs_f64() * 1000.0,
        )
        .field("packets-sent", s.stats.packets_sent)
        .field("packets-received", s.stats.packets_received)
        .field("packets-lost", s.stats.packets_lost)
        .field("packets-duplicated", s.stats.duplicate_packets)
        .field("data-packets", s.stats.data_packets)
        .field("bytes-received", s.stats.bytes_received)
        .field("bytes-delivered", s.stats.bytes_delivered)
        .field("bytes-redundant", s.stats.bytes_redundant)
        .field("goodput-bps", goodput)
        .field("receive-window", s.window)
        .field("read-ahead", s.read_ahead)
        .field("read-ahead-level", s.available)
        .field("buffered", s.buffered)
        .field("transfers", s.stats.transfers)
        .field("reconnects", s.reconnects)
        .field(
            "server",
            s.server.map_or_else(String::new, |a| a.to_string()),
        )
        .field("failovers", s.failovers)
        .build()
}

fn buffering_cause(cause: u8) -> Option<BufferingCause> {
    match cause {
        BUFFERING_START => Some(BufferingCause::Start),
        BUFFERING_UNDERRUN => Some(BufferingCause::Underrun),
        _ => None,
    }
}

impl UdpVidSrc {
    fn settings(&self) -> MutexGuard<'_, Settings> {
        lock(&self.settings)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Posts a buffering message unless the same percent was just posted.
    fn post_buffering(element: &super::UdpVidSrc, last: &Mutex<Option<i32>>, percent: i32) {
        Self::post_buffering_with(element, last, percent, None);
    }

    /// Posts a buffering message, with the estimate applications show
    /// ("starts in 12 s") when the rates are known: the link's rate in,
    /// the media's rate out, and the time until 100 %.
    fn post_buffering_with(
        element: &super::UdpVidSrc,
        last: &Mutex<Option<i32>>,
        percent: i32,
        estimate: Option<(&BufferingLevel, f64, Option<f64>)>,
    ) {
        // Held until the message is on the bus: the streaming thread
        // (entering a wait, 0 %) and the monitor (100 %) post at once, and
        // with the lock dropped before posting, a 0 % could reach the bus
        // after a 100 % recorded later here; the monitor's next 100 % was
        // then taken for a repeat and not posted, and gst-launch stayed
        // paused with every byte in (one of sixteen loopback copies froze
        // at 23.6 of 24 MB in the CI of 5 Dec).
        let mut last = lock(last);
        if *last == Some(percent) {
            return;
        }
        *last = Some(percent);
        gst::debug!(CAT, obj = element, "buffering {percent}%");
        let mut builder = gst::message::Buffering::builder(percent).src(element);
        if let Some((level, link_rate, media_rate)) = estimate {
            let left = level.goal.saturating_sub(level.available) as f64 / link_rate.max(1.0);
            builder = builder.stats(
                gst::BufferingMode::Stream,
                link_rate.min(i32::MAX as f64) as i32,
                media_rate.unwrap_or(0.0).min(i32::MAX as f64) as i32,
                (left * 1000.0).min(i64::MAX as f64) as i64,
            );
        }
        let _ = element.post_message(builder.build());
        drop(last);
    }

    /// `cause`: [`BUFFERING_START`] (start, jump) or [`BUFFERING_UNDERRUN`].
    fn enter_buffering(&self, cause: u8) {
        if cause == BUFFERING_START && self.buffering.load(Ordering::Acquire) != BUFFERING_START {
            self.playback
                .pushed_while_starting
                .store(0, Ordering::Release);
        }
        self.set_buffering(cause);
    }

    /// Sets why the pipeline waits, posting 0 % if it did not wait yet;
    /// unlike [`enter_buffering`](Self::enter_buffering) it keeps what was
    /// taken while starting.
    fn set_buffering(&self, cause: u8) {
        if self.buffering.swap(cause, Ordering::AcqRel) == NOT_BUFFERING {
            Self::post_buffering(&self.obj(), &self.last_buffering_percent, 0);
            if let State::Started {
                monitor: Some(m), ..
            } = &*self.state()
            {
                let _ = m.wake.send(());
            }
        }
    }

    fn start_monitor(
        &self,
        client: Arc<BlockingClient>,
        size: u64,
        stats_interval: Duration,
        timeout: Duration,
    ) -> Option<Monitor> {
        let (wake, woken) = mpsc::channel::<()>();
        let element = self.obj().downgrade();
        let buffering = self.buffering.clone();
        let last = self.last_buffering_percent.clone();
        let playback = self.playback.clone();
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("udpvidsrc-monitor".into())
            .spawn(move || {
                let mut next_stats = started + stats_interval;
                // Since when the player has waited for bytes (buffering),
                // and whether that wait already failed.
                let mut wanting_since: Option<Instant> = None;
                let mut stall_reported = false;
                // The highest percent shown in this wait: the level drops
                // each time the demuxer takes what arrived or jumps (to a
                // `moov` at the end and back), and an application's
                // progress bar then flickered between 0 and 1 % a hundred
                // times before the first frame. Within one wait the
                // percent shown never goes down.
                let mut shown: i32 = 0;
                // Bytes ready at which the level reaches 100 %, from the
                // last look (any byte before the first).
                let mut full_at = 1;
                // When the pipeline's position was last asked.
                let mut asked_at: Option<Instant> = None;
                // When a percent short of 100 was last posted in this wait.
                let mut progress_posted_at: Option<Instant> = None;
                loop {
                    let woke = if buffering.load(Ordering::Acquire) != NOT_BUFFERING {
                        client.wait_for_buffered(full_at, BUFFERING_TICK);
                        woken.try_recv()
                    } else {
                        woken.recv_timeout(MONITOR_TICK).map_err(|e| match e {
                            mpsc::RecvTimeoutError::Timeout => mpsc::TryRecvError::Empty,
                            mpsc::RecvTimeoutError::Disconnected => {
                                mpsc::TryRecvError::Disconnected
                            }
                        })
                    };
                    if woke == Err(mpsc::TryRecvError::Disconnected) {
                        return;
                    }
                    let Some(element) = element.upgrade() else {
                        return;
                    };
                    let cause = buffering.load(Ordering::Acquire);
                    let snapshot = client.snapshot();
                    // While buffering the pipeline is asked at most every
                    // MONITOR_TICK: only the media rate is wanted then, and
                    // a position query on every 20 ms look was two fifths
                    // of this thread's CPU in `perf`.
                    let ask = cause == NOT_BUFFERING
                        || asked_at.is_none_or(|at: Instant| at.elapsed() >= MONITOR_TICK);
                    let downstream = if ask {
                        asked_at = Some(Instant::now());
                        Self::held_downstream(&element, snapshot.read_offset, size)
                    } else {
                        None
                    };
                    // The media's rate, once the pipeline knows the duration
                    // (after preroll), also while buffering: with it a slow
                    // link is known for one before playback starts, and the
                    // start waits once instead of starting and pausing.
                    if let Some((_, media_rate)) = downstream {
                        let old = playback
                            .media_rate
                            .swap(media_rate.to_bits(), Ordering::AcqRel);
                        if old != media_rate.to_bits() {
                            client.set_media_rate(Some(media_rate));
                        }
                    }
                    // What the pipeline holds plays before anything still
                    // to come, also while it waits: at the start it holds
                    // what prerolling took (0.7 MB of the bench clip), which
                    // a slow link's wait need not bring again (1.4 s of it
                    // at 3 of 4 Mbit/s).
                    if let Some((held, _)) = downstream {
                        client.set_held_downstream(held);
                    }
                    if let Some(cause) = buffering_cause(cause) {
                        // The percentage and the window come from the same
                        // read-ahead, so 100 % is always reachable.
                        let held = match cause {
                            BufferingCause::Start => {
                                playback.pushed_while_starting.load(Ordering::Acquire)
                            }
                            BufferingCause::Underrun => 0,
                        };
                        let level = match client.buffering_level(cause, held) {
                            Ok(level) => level,
                            Err(err) => {
                                full_at = u64::MAX;
                                // The session ended while the application
                                // waits: say why now, not after `timeout`.
                                if !stall_reported {
                                    stall_reported = true;
                                    let imp = element.imp();
                                    let settings = imp.settings().clone();
                                    element.post_error_message(
                                        imp.error_message(&settings, &err, None),
                                    );
                                }
                                continue;
                            }
                        };
                        full_at = level.full_at.max(1);
                        if level.percent >= 100 {
                            // The next wait looks at once.
                            full_at = 1;
                            buffering.store(NOT_BUFFERING, Ordering::Release);
                            // Until the next position query, what the
                            // pipeline holds is what it took while starting:
                            // a read that waits right after the start is
                            // then not taken for an underrun.
                            if held > 0 {
                                playback.held.store(held, Ordering::Release);
                            }
                            wanting_since = None;
                        } else {
                            let since = *wanting_since.get_or_insert_with(Instant::now);
                            // An application paused on buffering reads
                            // nothing, so no read times out: without this a
                            // stream that stopped would hang in silence.
                            if let (false, Some(err)) =
                                (stall_reported, client.stall(since, timeout))
                            {
                                stall_reported = true;
                                let imp = element.imp();
                                let settings = imp.settings().clone();
                                gst::warning!(CAT, obj = element, "{err}");
                                element
                                    .post_error_message(imp.error_message(&settings, &err, None));
                            }
                        }
                        let estimate = client
                            .link_rate()
                            .map(|link| (&level, link, playback.media_rate()));
                        let percent = (level.percent as i32).max(shown);
                        // 100 ends the wait; the next one starts from 0.
                        shown = if percent >= 100 { 0 } else { percent };
                        let progress_due = percent >= 100
                            || progress_posted_at.is_none_or(|at: Instant| {
                                at.elapsed() >= BUFFERING_PROGRESS_INTERVAL
                            });
                        if progress_due {
                            progress_posted_at = (percent < 100).then(Instant::now);
                            Self::post_buffering_with(&element, &last, percent, estimate);
                        }
                    }
                    if cause == NOT_BUFFERING {
                        // Whoever ended the wait (100 % here, or a seek in
                        // `create`), the next one starts afresh.
                        shown = 0;
                        full_at = 1;
                        progress_posted_at = None;
                        match downstream {
                            Some((held, _)) => playback.held.store(held, Ordering::Release),
                            None => playback.held.store(u64::MAX, Ordering::Release),
                        }
                        // `create` is waiting while the pipeline played on
                        // from its queues; once they run low, that is an
                        // underrun the application must hear of.
                        if playback.waiting.load(Ordering::Acquire) && !playback.holds_enough() {
                            element.imp().enter_buffering(BUFFERING_UNDERRUN);
                        }
                    }
                    if !stats_interval.is_zero() && Instant::now() >= next_stats {
                        next_stats += stats_interval;
                        let s = stats_structure(Some((&snapshot, started.elapsed())));
                        let _ = element
                            .post_message(gst::message::Element::builder(s).src(&element).build());
                    }
                }
            })
            .ok()?;
        Some(Monitor { wake, thread })
    }

    /// Bytes the pipeline took from this source but has not played yet:
    /// the stream position minus the file's share at the playback position
    /// (size × position / duration, exact for a constant bitrate). The
    /// adaptive read-ahead counts them as media already ahead of playback.
    /// `None` unless the pipeline answers both queries in time.
    /// Also returns the media's rate (bytes per second of playback).
    fn held_downstream(
        element: &super::UdpVidSrc,
        read_offset: u64,
        size: u64,
    ) -> Option<(u64, f64)> {
        let mut top: gst::Object = element.clone().upcast();
        while let Some(parent) = top.parent() {
            top = parent;
        }
        let top = top.downcast::<gst::Element>().ok()?;
        if top == *element.upcast_ref::<gst::Element>() {
            return None;
        }
        let position = top.query_position::<gst::ClockTime>()?;
        let duration = top.query_duration::<gst::ClockTime>()?;
        if duration.is_zero() {
            return None;
        }
        let played =
            (size as u128 * position.nseconds() as u128 / duration.nseconds() as u128) as u64;
        let media_rate = size as f64 / (duration.nseconds() as f64 / 1e9);
        Some((read_offset.saturating_sub(played), media_rate))
    }

    /// The server's catalog, asked for when an application reads the
    /// `catalog` property. Playing never fetches it: a viewer costs the
    /// server one session. This asks over a short session of its own,
    /// because a session carries one transfer and the element's is the
    /// file being played.
    fn fetch_catalog(&self) -> gst::Structure {
        let settings = self.settings().clone();
        let config = ClientConfig {
            read_ahead: settings.read_ahead(),
            passphrase: settings.passphrase.as_deref().map(Psk::from_passphrase),
            // The network thread finds it per server.
            ..Default::default()
        };
        let port = u16::try_from(settings.port).unwrap_or(DEFAULT_PORT);
        let entries = BlockingClient::connect(&settings.host, port, config)
            .map_err(|e| e.to_string())
            .and_then(|client| {
                let entries = client.catalog(settings.timeout());
                client.close();
                entries.map_err(|e| e.to_string())
            });
        let mut s = gst::Structure::builder("udpvid-catalog")
            .field("host", settings.host.as_str())
            .field("port", settings.port);
        match entries {
            Ok(entries) => {
                let files = gst::Array::new(entries.iter().map(|e| {
                    gst::Structure::builder("file")
                        .field("name", e.name.as_str())
                        .field("size", e.size)
                        .build()
                        .to_send_value()
                }));
                s = s.field("files", files);
            }
            Err(e) => {
                gst::warning!(CAT, imp = self, "catalog: {e}");
                s = s
                    .field("files", gst::Array::new(Vec::<glib::SendValue>::new()))
                    .field("error", e);
            }
        }
        s.build()
    }

    /// Turns a failed wait into the element error a user can act on.
    fn error_message(
        &self,
        settings: &Settings,
        err: &WaitError,
        client: Option<&BlockingClient>,
    ) -> gst::ErrorMessage {
        let location = settings.describe();
        // Of a list, the one that failed; the setting when not connected.
        let server_in_use = || {
            client
                .map(|c| c.server_addr().to_string())
                .unwrap_or_else(|| settings.servers())
        };
        match err {
            WaitError::Timeout { waited } => gst::error_msg!(
                gst::ResourceError::OpenRead,
                (
                    "No answer from udpvid server {} for {:.1} s while reading {}: is the server running and reachable over UDP?",
                    settings.servers(),
                    waited.as_secs_f64(),
                    location
                )
            ),
            WaitError::Stalled {
                waited,
                state,
                server_silent: true,
            } => gst::error_msg!(
                gst::ResourceError::OpenRead,
                (
                    "No answer from udpvid server {} for {:.1} s while reading {} ({}): is the server running and reachable over UDP?",
                    server_in_use(),
                    waited.as_secs_f64(),
                    location,
                    state
                )
            ),
            WaitError::Stalled {
                waited,
                state,
                server_silent: false,
            } => gst::error_msg!(
                gst::ResourceError::Read,
                (
                    "Reading {} stalled: no new data from udpvid server {} for {:.1} s although it still answers ({}); the server may be overloaded or its disk stuck",
                    location,
                    server_in_use(),
                    waited.as_secs_f64(),
                    state
                )
            ),
            WaitError::Open {
                kind: OpenErrorKind::NotFound,
                message,
            } => {
                let offered = client
                    .and_then(|c| c.catalog(settings.timeout()).ok())
                    .map(|entries| {
                        if entries.is_empty() {
                            "the server offers no files".to_string()
                        } else {
                            let names: Vec<&str> =
                                entries.iter().take(20).map(|e| e.name.as_str()).collect();
                            let more = entries.len().saturating_sub(20);
                            let mut s = format!("the server offers: {}", names.join(", "));
                            if more > 0 {
                                s.push_str(&format!(" and {more} more"));
                            }
                            s
                        }
                    })
                    .unwrap_or_else(|| "the catalog could not be fetched".to_string());
                gst::error_msg!(
                    gst::ResourceError::NotFound,
                    (
                        "File not found on udpvid server: {} ({}); {}",
                        location,
                        message,
                        offered
                    )
                )
            }
            WaitError::Open {
                kind: OpenErrorKind::NotReadable,
                message,
            } => gst::error_msg!(
                gst::ResourceError::NotAuthorized,
                ("The server cannot read {}: {}", location, message)
            ),
            WaitError::Open { kind, message } => gst::error_msg!(
                gst::ResourceError::OpenRead,
                ("The server refused {}: {}: {}", location, kind, message)
            ),
            WaitError::VersionMismatch { .. } => gst::error_msg!(
                gst::ResourceError::OpenRead,
                (
                    "Cannot talk to {}: {}; upgrade the older side",
                    server_in_use(),
                    err
                )
            ),
            WaitError::Closed {
                reason: CloseReason::ServerBusy,
                ..
            } => gst::error_msg!(
                gst::ResourceError::Busy,
                (
                    "udpvid server {} is busy; try again later ({})",
                    settings.servers(),
                    err
                )
            ),
            WaitError::ContentChanged { .. } => {
                gst::error_msg!(gst::ResourceError::Read, ("{}", err))
            }
            WaitError::AuthenticationFailed(_) => gst::error_msg!(
                gst::ResourceError::NotAuthorized,
                (
                    "Cannot play {}: {}; set the \"passphrase\" property to the server's passphrase",
                    location,
                    err
                )
            ),
            WaitError::Closed { .. } | WaitError::Protocol(_) => {
                gst::error_msg!(gst::ResourceError::Read, ("Lost {}: {}", location, err))
            }
            WaitError::Cancelled => gst::error_msg!(
                gst::ResourceError::Read,
                ("Reading {} was cancelled", location)
            ),
        }
    }

    /// Posts `err` (unless it is a cancellation) and turns it into a flow return.
    fn flow_error(&self, settings: &Settings, err: WaitError) -> gst::FlowError {
        if err == WaitError::Cancelled {
            gst::debug!(CAT, imp = self, "wait cancelled: flushing");
            return gst::FlowError::Flushing;
        }
        let msg = self.error_message(settings, &err, None);
        self.post_error_message(msg);
        gst::FlowError::Error
    }

    /// Whether to offer push mode only, from the open file's first bytes
    /// (asked once per start; any failure keeps both modes).
    fn push_only(&self) -> bool {
        let mut decided = lock(&self.push_only);
        if let Some(d) = *decided {
            return d;
        }
        let client = match &*self.state() {
            State::Started { client, .. } => client.clone(),
            State::Stopped => return false,
        };
        let timeout = self.settings().timeout();
        match client.read_at(0, 8, timeout) {
            Ok(head) => {
                let push = media_index::prefers_push_mode(&head);
                gst::debug!(CAT, imp = self, "scheduling: push only = {push}");
                *decided = Some(push);
                push
            }
            // Flushing or failing: both modes this time, ask again later.
            Err(_) => false,
        }
    }

    fn set_location(&self, location: Location) {
        let mut settings = self.settings();
        // One server keeps host and port apart, as they were set; a list
        // goes in `host` with every port written out.
        match location.servers.as_slice() {
            [one] => {
                settings.host = one.host.clone();
                settings.port = one.port as u32;
            }
            list => {
                settings.host = location::format_host_list(list);
                settings.port = list.first().map_or(DEFAULT_PORT, |s| s.port) as u32;
            }
        }
        settings.file = Some(location.path);
    }
}

#[glib::object_subclass]
impl ObjectSubclass for UdpVidSrc {
    const NAME: &'static str = "GstUdpVidSrc";
    type Type = super::UdpVidSrc;
    type ParentType = gst_base::BaseSrc;
    type Interfaces = (gst::URIHandler,);
}

impl ObjectImpl for UdpVidSrc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("host")
                    .nick("Host")
                    .blurb("Name or address of the udpvid server, or several as host[:port],host[:port]... (tried in order; playback moves to the next one if the one in use fails)")
                    .default_value(Some(DEFAULT_HOST))
                    .build(),
                glib::ParamSpecUInt::builder("port")
                    .nick("Port")
                    .blurb("UDP port of the udpvid server (of every host listed without one)")
                    .minimum(1)
                    .maximum(u16::MAX as u32)
                    .default_value(DEFAULT_PORT as u32)
                    .build(),
                glib::ParamSpecString::builder("file")
                    .nick("File")
                    .blurb("Path of the file to play, relative to the server's folder (see the server's catalog)")
                    .build(),
                glib::ParamSpecString::builder("uri")
                    .nick("URI")
                    .blurb("udpvid://host[:port][,host[:port]...]/path, the same as host, port and file together")
                    .build(),
                glib::ParamSpecUInt64::builder("read-ahead")
                    .nick("Read-ahead")
                    .blurb("Fixed number of bytes the server may send beyond what the pipeline has consumed (0 = adaptive: read-ahead-time of media, grown on a bad link, up to max-read-ahead)")
                    .default_value(0)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("read-ahead-time")
                    .nick("Read-ahead time")
                    .blurb("Adaptive read-ahead: nanoseconds of media to keep ahead of playback on a clean link, measured from the consumption rate")
                    .minimum(100_000_000)
                    .default_value(DEFAULT_TARGET_TIME.as_nanos() as u64)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("max-read-ahead")
                    .nick("Maximum read-ahead")
                    .blurb("Adaptive read-ahead never exceeds this many bytes")
                    .minimum(MIN_READ_AHEAD)
                    .default_value(DEFAULT_MAX_READ_AHEAD)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("timeout")
                    .nick("Timeout")
                    .blurb("Seconds without any answer from the server before reading fails with an error")
                    .minimum(1)
                    .maximum(3600)
                    .default_value(DEFAULT_TIMEOUT_SECS)
                    .build(),
                glib::ParamSpecString::builder("passphrase")
                    .nick("Passphrase")
                    .blurb("Passphrase shared with the server (its --passphrase-file): the session is then authenticated and encrypted; unset = no passphrase")
                    .write_only()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("Transfer statistics: RTT, packets sent/received/lost/duplicated, bytes received/delivered/redundant, goodput, windows, read-ahead level, the server in use and failovers to another one")
                    .read_only()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("catalog")
                    .nick("Catalog")
                    .blurb("The server's files (udpvid-catalog: host, port, files = array of {name, size}; error on failure), fetched when read: an application asks for it, playback never does")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt::builder("stats-interval")
                    .nick("Statistics interval")
                    .blurb("Milliseconds between stats posted as element messages (0 = never)")
                    .maximum(3_600_000)
                    .default_value(0)
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let running = matches!(*self.state(), State::Started { .. });
        let name = pspec.name();
        if running
            && !matches!(
                name,
                "read-ahead" | "read-ahead-time" | "max-read-ahead" | "stats-interval"
            )
        {
            gst::warning!(
                CAT,
                imp = self,
                "changing {name} has no effect until the element is restarted"
            );
        }
        match name {
            "host" => {
                self.settings().host = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| DEFAULT_HOST.to_string())
            }
            "port" => self.settings().port = value.get().unwrap_or(DEFAULT_PORT as u32),
            "file" => self.settings().file = value.get().ok().flatten(),
            "uri" => {
                let uri: Option<String> = value.get().ok().flatten();
                match uri.as_deref().map(Location::parse) {
                    Some(Ok(location)) => self.set_location(location),
                    Some(Err(e)) => gst::warning!(CAT, imp = self, "{e}"),
                    None => self.settings().file = None,
                }
            }
            "read-ahead" | "read-ahead-time" | "max-read-ahead" => {
                let v: u64 = value.get().unwrap_or(0);
                let mode = {
                    let mut settings = self.settings();
                    match name {
                        // 1..MIN would crawl: treat it as the minimum.
                        "read-ahead" if v > 0 => settings.read_ahead = v.max(MIN_READ_AHEAD),
                        "read-ahead" => settings.read_ahead = 0,
                        "read-ahead-time" => settings.read_ahead_time = v,
                        _ => settings.max_read_ahead = v,
                    }
                    settings.read_ahead()
                };
                if let State::Started { client, .. } = &*self.state() {
                    client.set_read_ahead(mode);
                }
            }
            "timeout" => self.settings().timeout = value.get().unwrap_or(DEFAULT_TIMEOUT_SECS),
            "stats-interval" => self.settings().stats_interval = value.get().unwrap_or(0),
            "passphrase" => {
                self.settings().passphrase = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .filter(|p| !p.is_empty())
            }
            other => gst::warning!(CAT, imp = self, "unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "host" => self.settings().host.to_value(),
            "port" => self.settings().port.to_value(),
            "file" => self.settings().file.to_value(),
            "uri" => self.settings().location().map(|l| l.to_uri()).to_value(),
            "read-ahead" => self.settings().read_ahead.to_value(),
            "read-ahead-time" => self.settings().read_ahead_time.to_value(),
            "max-read-ahead" => self.settings().max_read_ahead.to_value(),
            "timeout" => self.settings().timeout.to_value(),
            "stats-interval" => self.settings().stats_interval.to_value(),
            "catalog" => self.fetch_catalog().to_value(),
            "stats" => match &*self.state() {
                State::Started {
                    client, started_at, ..
                } => stats_structure(Some((&client.snapshot(), started_at.elapsed()))).to_value(),
                State::Stopped => stats_structure(None).to_value(),
            },
            // GObject only asks for properties we declared.
            _ => glib::Value::from_type(pspec.value_type()),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.set_format(gst::Format::Bytes);
        obj.set_automatic_eos(false);
        obj.set_blocksize(64 * 1024);
    }
}

impl GstObjectImpl for UdpVidSrc {}

impl ElementImpl for UdpVidSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "udpvid source",
                "Source/Network",
                "Plays a video file from a udpvid server over reliable, bandwidth-frugal UDP",
                "udpvid developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &gst::Caps::new_any(),
                )
                .expect("valid pad template"),
            ]
        });
        TEMPLATES.as_ref()
    }
}

impl URIHandlerImpl for UdpVidSrc {
    const URI_TYPE: gst::URIType = gst::URIType::Src;

    fn protocols() -> &'static [&'static str] {
        &["udpvid"]
    }

    fn uri(&self) -> Option<String> {
        self.settings().location().map(|l| l.to_uri())
    }

    fn set_uri(&self, uri: &str) -> Result<(), glib::Error> {
        if matches!(*self.state(), State::Started { .. }) {
            return Err(glib::Error::new(
                gst::URIError::BadState,
                "cannot change the URI while the element is running",
            ));
        }
        let location = Location::parse(uri)
            .map_err(|e| glib::Error::new(gst::URIError::BadUri, &e.to_string()))?;
        self.set_location(location);
        Ok(())
    }
}

impl BaseSrcImpl for UdpVidSrc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings().clone();
        let Some(location) = settings.location() else {
            return Err(gst::error_msg!(
                gst::ResourceError::Settings,
                ("No file set: set the \"file\" property (or \"uri\") to a path from the server's catalog")
            ));
        };
        gst::info!(CAT, imp = self, "connecting to {}", location.to_uri());
        let client = BlockingClient::connect_and_open(
            &location::format_host_list(&location.servers),
            DEFAULT_PORT,
            ClientConfig {
                read_ahead: settings.read_ahead(),
                passphrase: settings.passphrase.as_deref().map(Psk::from_passphrase),
                ..Default::default()
            },
            &location.path,
            0,
        )
        .map_err(|e| {
            gst::error_msg!(
                gst::ResourceError::NotFound,
                ("Cannot reach udpvid server {}: {}", settings.servers(), e)
            )
        })?;
        *lock(&self.last_buffering_percent) = None;
        *lock(&self.push_only) = None;
        // What was learnt of an earlier file's playback does not apply.
        self.playback.media_rate.store(0, Ordering::Release);
        self.playback.held.store(u64::MAX, Ordering::Release);
        self.playback.has_played.store(false, Ordering::Release);
        self.buffering.store(NOT_BUFFERING, Ordering::Release);
        self.enter_buffering(BUFFERING_START);
        let opened = match client.open(&location.path, 0, settings.timeout()) {
            Ok(o) => o,
            Err(e) => return Err(self.error_message(&settings, &e, Some(&client))),
        };
        gst::info!(
            CAT,
            imp = self,
            "opened {} ({} bytes, content tag {:016x}) from {}",
            location.path,
            opened.size,
            opened.content_tag,
            client.server_addr()
        );
        let client = Arc::new(client);
        let monitor = self.start_monitor(
            client.clone(),
            opened.size,
            Duration::from_millis(settings.stats_interval as u64),
            settings.timeout(),
        );
        *self.state() = State::Started {
            client,
            size: opened.size,
            position: 0,
            started_at: Instant::now(),
            monitor,
        };
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        let state = std::mem::take(&mut *self.state());
        if let State::Started {
            client, monitor, ..
        } = state
        {
            if let Some(m) = monitor {
                drop(m.wake);
                let _ = m.thread.join();
            }
            let s = client.snapshot();
            gst::info!(
                CAT,
                imp = self,
                "stopping: {} data packets, {} duplicates, ~{} lost, {} bytes received, {} delivered, {} reconnects",
                s.stats.data_packets,
                s.stats.duplicate_packets,
                s.stats.packets_lost,
                s.stats.bytes_received,
                s.stats.bytes_delivered,
                s.reconnects
            );
            client.close();
        }
        self.buffering.store(NOT_BUFFERING, Ordering::Release);
        Ok(())
    }

    fn is_seekable(&self) -> bool {
        true
    }

    fn size(&self) -> Option<u64> {
        match &*self.state() {
            State::Started { size, .. } => Some(*size),
            State::Stopped => None,
        }
    }

    fn query(&self, query: &mut gst::QueryRef) -> bool {
        if let gst::QueryViewMut::Scheduling(q) = query.view_mut() {
            // Pull mode lets demuxers seek exactly (tsdemux's push-mode
            // seeks only estimate); their small jumps are served from the
            // recent bytes and the read-ahead, larger ones by the server.
            // MP4 and Matroska do better in push mode (see
            // `media_index::prefers_push_mode`): at 80 ms RTT the first
            // seek of an MP4 took 633 ms in pull mode and 154 in push, a
            // Matroska file's first frame 908 and 713 ms.
            q.set(gst::SchedulingFlags::SEEKABLE, 1, -1, 0);
            if self.push_only() {
                q.add_scheduling_modes([gst::PadMode::Push]);
            } else {
                q.add_scheduling_modes([gst::PadMode::Push, gst::PadMode::Pull]);
            }
            return true;
        }
        BaseSrcImplExt::parent_query(self, query)
    }

    fn do_seek(&self, segment: &mut gst::Segment) -> bool {
        let Some(segment) = segment.downcast_ref::<gst::format::Bytes>() else {
            gst::warning!(CAT, imp = self, "only byte seeks are supported");
            return false;
        };
        let offset = segment.start().map_or(0, |b| *b);
        let state = self.state();
        let State::Started { size, .. } = &*state else {
            // Before start the base class seeks to 0: nothing to do yet.
            return offset == 0;
        };
        if offset > *size {
            gst::warning!(CAT, imp = self, "seek to {offset} past the end ({size})");
            return false;
        }
        gst::debug!(CAT, imp = self, "seek to byte {offset}");
        // The move itself happens in `create`, which gets the new offset and
        // can wait (and be cancelled) there.
        true
    }

    fn create(
        &self,
        offset: u64,
        _buffer: Option<&mut gst::BufferRef>,
        length: u32,
    ) -> Result<CreateSuccess, gst::FlowError> {
        let settings = self.settings().clone();
        let (client, size, position) = match &*self.state() {
            State::Started {
                client,
                size,
                position,
                ..
            } => (client.clone(), *size, *position),
            State::Stopped => {
                gst::element_imp_error!(
                    self,
                    gst::CoreError::Failed,
                    ("create called while not started")
                );
                return Err(gst::FlowError::Error);
            }
        };
        if offset >= size {
            return Err(gst::FlowError::Eos);
        }
        // Once seen, not asked again: the state takes the object lock.
        if !self.playback.has_played.load(Ordering::Acquire)
            && self.obj().current_state() == gst::State::Playing
        {
            self.playback.has_played.store(true, Ordering::Release);
        }
        let mut waiting = false;
        if !client.is_ready(offset) {
            // Underrun (or a jump the server must serve): the pipeline waits
            // for the network. An underrun while the pipeline holds a
            // second or more ahead of playback is not yet worth a pause:
            // playback goes on from its queues, and the monitor posts
            // buffering if they run low before the bytes come.
            // A demuxer's short forward jump (qtdemux between interleaved
            // audio and video chunks) reads on in the same transfer: it is
            // an underrun at worst, not a new start.
            let starting = self.buffering.load(Ordering::Acquire) == BUFFERING_START;
            if offset != position && !client.continues_stream(offset) {
                self.enter_buffering(BUFFERING_START);
            } else if starting {
                // Still starting (preroll reads the stream as it comes):
                // the start goal, with what was taken meanwhile, stands.
            } else if !self.playback.has_played.load(Ordering::Acquire) {
                // Buffering again before the pipeline played anything (it
                // still prerolls): still the start, and what it took so far
                // is still held.
                self.set_buffering(BUFFERING_START);
            } else if self.playback.holds_enough() {
                waiting = true;
                self.playback.waiting.store(true, Ordering::Release);
            } else {
                self.enter_buffering(BUFFERING_UNDERRUN);
            }
        }
        if offset != position {
            gst::debug!(CAT, imp = self, "jump from {position} to {offset}");
        }
        let want = (length as u64).min(size - offset) as usize;
        let reconnects_before = client.reconnects();
        let transfers_before = client.stats().transfers;
        // In pull mode the whole request is filled: demuxers require full
        // blocks except at the end. In push mode (`udpvidsrc ! fakesink`, a
        // parser or a queue) downstream takes any amount, so a buffer leaves
        // with whatever is ready: the first bytes do not wait for a whole
        // block to come in slow start (at 80 ms RTT that was three round
        // trips for 64 KiB).
        let push = self.obj().src_pad().mode() == gst::PadMode::Push;
        let min = if push { 1 } else { want };
        let gather = if push && offset == position && position > 0 {
            GATHER
        } else {
            Duration::ZERO
        };
        let data = client.read_some_at(offset, want, min, gather, settings.timeout());
        if waiting {
            self.playback.waiting.store(false, Ordering::Release);
        }
        let data = data.map_err(|e| self.flow_error(&settings, e))?;
        let reconnects = client.reconnects();
        if reconnects != reconnects_before {
            gst::info!(
                CAT,
                imp = self,
                "session lost and resumed at {offset} ({reconnects} reconnects so far)"
            );
        }
        if client.stats().transfers != transfers_before {
            gst::debug!(CAT, imp = self, "server asked to continue from {offset}");
        }
        if data.is_empty() {
            return Err(gst::FlowError::Eos);
        }
        let end = offset + data.len() as u64;
        if self.buffering.load(Ordering::Acquire) == BUFFERING_START {
            self.playback
                .pushed_while_starting
                .fetch_add(data.len() as u64, Ordering::AcqRel);
        }
        if let State::Started { position, .. } = &mut *self.state() {
            *position = end;
        }
        gst::trace!(CAT, imp = self, "pushing {} bytes at {offset}", data.len());
        // The bytes are shared with the recent-bytes history, not copied;
        // the memory is read-only, which demuxers and sinks only read.
        let mut buffer = gst::Buffer::from_slice(data);
        {
            let b = buffer.get_mut().ok_or(gst::FlowError::Error)?;
            b.set_offset(offset);
            b.set_offset_end(end);
        }
        Ok(CreateSuccess::NewBuffer(buffer))
    }

    fn unlock(&self) -> Result<(), gst::ErrorMessage> {
        if let State::Started { client, .. } = &*self.state() {
            gst::debug!(CAT, imp = self, "unlock: cancelling waits");
            client.cancel();
        }
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        if let State::Started { client, .. } = &*self.state() {
            client.resume();
        }
        Ok(())
    }
}
