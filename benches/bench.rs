//! `make bench`: udpvid against the peers a GStreamer user would pick
//! instead — HTTP progressive download (nginx + souphttpsrc through
//! playbin) and SRT (srtsink/srtsrc) — on the same clip, the same machine,
//! the same impairments, in one run. Prints a table (and writes it to
//! `target/bench/results.md`); compare ratios, not absolute numbers, since
//! the machine is shared.
//!
//! Impairments: UDP peers go through the seeded impairment proxy
//! (`examples/impair.rs`); HTTP goes through a TCP relay adding the same
//! delay and rate cap (a relay cannot drop TCP segments, so HTTP's lossy
//! rows come from the kernel table instead); the kernel table runs server
//! and client inside a network namespace where nftables drops a random
//! share of packets (the kernel here has no netem, so no delay there).
//!
//! `BENCH_QUICK=1` shortens the real-time runs.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use gst::prelude::*;

// Shared with the load generator, which also pins from its environment.
#[allow(dead_code)]
#[path = "common/cpu_affinity.rs"]
mod cpu_affinity;
#[allow(dead_code)]
#[path = "common/metrics_scrape.rs"]
mod metrics_scrape;
#[path = "common/nginx.rs"]
mod nginx;
use metrics_scrape::{metric_value, metrics_page};
#[path = "common/proc_stat.rs"]
mod proc_stat;

const CLIP_SECONDS: u64 = 60;
/// Length of each real-time viewers run.
const VIEWER_SECONDS: u64 = 30;
/// The viewers arrive over this long: with 30 s each, all of them watch
/// at once for the last 20 s. (500 arriving within one second all want
/// their preroll and read-ahead, 1.5 MB each, at once: that flash crowd
/// is more than one core serves, and is reported apart.)
const VIEWER_ARRIVAL_SECONDS: u64 = 10;
const STOP_AFTER: Duration = Duration::from_secs(10);
const PAUSE_FOR: Duration = Duration::from_secs(30);
const SRT_LATENCY_MS: u32 = 400;

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

fn profile_dir() -> PathBuf {
    std::env::current_exe()
        .expect("bench path")
        .parent()
        .and_then(Path::parent)
        .expect("profile dir")
        .to_path_buf()
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    proc_stat::cpu_seconds_of(format!("/proc/{pid}/stat"))
}

/// Name of the bench's TCP relay threads (HTTP's impairment), whose CPU
/// is not the HTTP client's.
const RELAY_THREAD: &str = "tcp-relay";

/// CPU seconds of each of this process's relay threads, by thread id.
fn relay_threads_cpu() -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != RELAY_THREAD {
            continue;
        }
        if let Some(cpu) = proc_stat::try_cpu_seconds_of(dir.join("stat")) {
            out.insert(task.file_name().to_string_lossy().into_owned(), cpu);
        }
    }
    out
}

/// CPU the relay threads used since `before` (threads that ended meanwhile
/// are not counted: a slight overcount of HTTP's client).
fn relay_cpu_since(before: &std::collections::HashMap<String, f64>) -> f64 {
    relay_threads_cpu()
        .iter()
        .map(|(tid, cpu)| cpu - before.get(tid).copied().unwrap_or(0.0))
        .sum()
}

/// Runs per file and peer in the first-frame table.
const START_REPEATS: usize = 5;

fn make_clips(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("clip dir");
    let mp4 = dir.join("bench.mp4");
    let ts = dir.join("bench.ts");
    let frames = CLIP_SECONDS * 30;
    let audio_buffers = CLIP_SECONDS * 44100 / 1024 + 1;
    for (path, mux) in [(&mp4, "mp4mux"), (&ts, "mpegtsmux")] {
        if path.exists() {
            continue;
        }
        eprintln!(
            "making {} ({CLIP_SECONDS} s, 4 Mbit/s H.264 + AAC)",
            path.display()
        );
        let tmp = path.with_extension("tmp");
        let desc = format!(
            "videotestsrc num-buffers={frames} pattern=snow ! video/x-raw,width=1280,height=720,framerate=30/1 \
             ! x264enc speed-preset=ultrafast bitrate=4000 vbv-buf-capacity=1000 key-int-max=60 ! h264parse ! mux. \
             audiotestsrc num-buffers={audio_buffers} ! audioconvert ! avenc_aac ! aacparse ! mux. \
             {mux} name=mux ! filesink location={}",
            tmp.display()
        );
        let status = Command::new("gst-launch-1.0")
            .arg("-q")
            .args(desc.split_whitespace())
            .status()
            .expect("gst-launch");
        assert!(status.success(), "making {}", path.display());
        std::fs::rename(&tmp, path).expect("rename");
    }
    // The same streams with the index at the start (faststart MP4) and in
    // Matroska (Cues at the end, found through the SeekHead), for the
    // first-frame table.
    for (name, mux) in [
        ("bench-faststart.mp4", "mp4mux faststart=true"),
        ("bench.mkv", "matroskamux"),
    ] {
        let path = dir.join(name);
        if path.exists() {
            continue;
        }
        let tmp = path.with_extension("tmp");
        let desc = format!(
            "filesrc location={} ! qtdemux name=d {mux} name=m ! filesink location={} \
             d.video_0 ! queue ! h264parse ! m. d.audio_0 ! queue ! aacparse ! m.",
            mp4.display(),
            tmp.display()
        );
        let status = Command::new("gst-launch-1.0")
            .arg("-q")
            .args(desc.split_whitespace())
            .status()
            .expect("gst-launch");
        assert!(status.success(), "making {}", path.display());
        std::fs::rename(&tmp, path).expect("rename");
    }
    // The loopback pull of the clip lasts tens of milliseconds, mostly
    // the start; a long pull measures the rate the two sides sustain.
    let long = dir.join(LONG_PULL_FILE);
    if !long.exists() {
        let tmp = long.with_extension("tmp");
        let clip = std::fs::read(&mp4).expect("read the clip");
        let mut f = std::fs::File::create(&tmp).expect("create the long pull's file");
        for _ in 0..LONG_PULL_COPIES {
            f.write_all(&clip).expect("write the long pull's file");
        }
        drop(f);
        std::fs::rename(&tmp, &long).expect("rename");
    }
    (mp4, ts)
}

/// Reads `path` into the page cache, so that each peer's pull of it
/// reads from memory. Before every pull, not once: this VM's kernel pages
/// out file pages left untouched (DAMON's `pageout` scheme; 31 of this
/// file's 526 MiB went within 90 idle seconds), and the long row comes
/// after two minutes of other rows.
fn warm_page_cache(path: &Path) {
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = std::io::copy(&mut f, &mut std::io::sink());
    }
}

/// The file of the long loopback pull: the clip repeated (the pull goes
/// to a fakesink, so only the bytes count), about half a GiB.
const LONG_PULL_FILE: &str = "long-pull.bin";
const LONG_PULL_COPIES: usize = 18;
/// Pulls of the long file, per peer.
const LONG_PULL_REPEATS: usize = 5;

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        std::thread::sleep(Duration::from_millis(50));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

fn spawn_with_banner(mut cmd: Command, word: &str) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("banner");
    assert!(line.contains(word), "unexpected banner {line:?}");
    (Proc(child), line)
}

fn port_of(banner: &str, field: usize) -> u16 {
    banner
        .split_whitespace()
        .nth(field)
        .and_then(|a| a.trim_end_matches(',').rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("port in banner")
}

/// The server on a free loopback port for `dir`, with `extra` options.
fn start_udpvid_server(dir: &Path, extra: &[&str]) -> (Proc, u16) {
    let mut cmd = Command::new(profile_dir().join("server"));
    cmd.arg("--dir")
        .arg(dir)
        .args(["--bind", "127.0.0.1", "--port", "0"])
        .args(extra);
    cmd.env("UDPVID_LOG", "warn");
    let (p, banner) = spawn_with_banner(cmd, "listening");
    (p, port_of(&banner, 4))
}

fn start_nginx(dir: &Path, work: &Path) -> (Proc, u16) {
    let (child, port) = nginx::start(dir, work, 64, None);
    (Proc(child), port)
}

#[derive(Clone, Copy)]
struct Condition {
    name: &'static str,
    rate_mbit: Option<f64>,
    one_way_ms: u64,
    loss: f64,
    /// Gilbert-Elliott loss both ways: (loss rate, mean burst length).
    burst: Option<(f64, f64)>,
}

impl Condition {
    fn is_clean(&self) -> bool {
        self.rate_mbit.is_none() && self.one_way_ms == 0 && !self.is_lossy()
    }
    fn is_lossy(&self) -> bool {
        self.loss > 0.0 || self.burst.is_some()
    }
    fn proxy_args(&self, seed: u64) -> Vec<String> {
        let mut a = vec!["--seed".into(), seed.to_string()];
        if let Some(r) = self.rate_mbit {
            a.extend([
                "--down-rate-mbit".into(),
                r.to_string(),
                "--down-queue-kb".into(),
                "256".into(),
            ]);
        }
        if self.one_way_ms > 0 {
            a.extend(["--delay-ms".into(), self.one_way_ms.to_string()]);
        }
        if self.loss > 0.0 {
            a.extend(["--loss".into(), self.loss.to_string()]);
        }
        if let Some((rate, mean)) = self.burst {
            a.extend(["--burst".into(), format!("{rate},{mean}")]);
        }
        a
    }
}

/// Starts one of the relay's threads, named so its CPU can be told apart.
fn relay_thread(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .name(RELAY_THREAD.into())
        .spawn(f)
        .expect("relay thread");
}

/// Payload of a full TCP segment on a 1500-byte Ethernet path (IPv4, TCP
/// timestamps).
const TCP_SEGMENT_PAYLOAD: usize = 1448;
/// IPv4 (20) and TCP (20 + 12 of timestamps) headers per segment.
const TCP_IP_HEADERS: usize = 52;

/// A TCP relay that adds one-way delay and a rate cap in the server →
/// client direction (and the delay client → server), with a bounded
/// buffer so the sender still feels back-pressure.
fn start_tcp_relay(upstream: u16, cond: Condition) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
    let port = listener.local_addr().expect("addr").port();
    relay_thread(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let pairs = [
                (server.try_clone(), client.try_clone(), cond.rate_mbit),
                (client.try_clone(), server.try_clone(), None),
            ];
            for (from, to, rate) in pairs {
                let (Ok(from), Ok(to)) = (from, to) else {
                    continue;
                };
                pump(from, to, rate, Duration::from_millis(cond.one_way_ms));
            }
        }
    });
    port
}

fn pump(mut from: TcpStream, mut to: TcpStream, rate_mbit: Option<f64>, delay: Duration) {
    // Capacity: a bandwidth-delay product plus a 256 KiB queue, in 16 KiB chunks.
    let bdp = rate_mbit.map_or(4 << 20, |r| {
        (r * 1e6 / 8.0 * delay.as_secs_f64() * 2.0) as usize + (256 << 10)
    });
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>((bdp / 16384).max(4));
    relay_thread(move || {
        let mut buf = vec![0u8; 16384];
        let mut free_at = Instant::now();
        let mut carried = 0usize;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = Instant::now();
            let start = free_at.max(now);
            // A link carries TCP's headers too: a full segment's (1448
            // bytes with timestamps) 52 bytes of IPv4 and TCP, as the UDP
            // proxy charges each datagram its IPv4 and UDP headers.
            let segments =
                (carried + n).div_ceil(TCP_SEGMENT_PAYLOAD) - carried.div_ceil(TCP_SEGMENT_PAYLOAD);
            carried += n;
            let on_wire = n + segments * TCP_IP_HEADERS;
            let serialise = rate_mbit.map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(on_wire as f64 * 8.0 / (r * 1e6))
            });
            free_at = start + serialise;
            if tx.send((free_at + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    relay_thread(move || {
        while let Ok((due, data)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// nftables byte counters on loopback for the ports the client receives from.
struct WireCounter {
    /// One rule per port: runs on the clean path reuse the server's port,
    /// and a second rule would count every packet twice.
    watched: Mutex<std::collections::HashSet<u16>>,
}

impl WireCounter {
    fn install() -> Option<WireCounter> {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "udpvidbench"])
            .stderr(Stdio::null())
            .status();
        let ok = |args: &[&str]| {
            Command::new("nft")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&["add", "table", "inet", "udpvidbench"])
            || !ok(&[
                "add",
                "chain",
                "inet",
                "udpvidbench",
                "out",
                "{ type filter hook output priority 0; }",
            ])
        {
            return None;
        }
        Some(WireCounter {
            watched: Mutex::new(Default::default()),
        })
    }
    fn watch(&self, port: u16) {
        if !self
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port)
        {
            return;
        }
        for proto in ["udp", "tcp"] {
            let p = port.to_string();
            let _ = Command::new("nft")
                .args([
                    "add",
                    "rule",
                    "inet",
                    "udpvidbench",
                    "out",
                    "oif",
                    "lo",
                    proto,
                    "sport",
                    &p,
                    "counter",
                    "comment",
                    &format!("\"{proto}{p}\""),
                ])
                .status();
        }
    }
    /// IP bytes sent from `port` so far.
    fn bytes(&self, port: u16) -> u64 {
        let out = Command::new("nft")
            .args(["list", "chain", "inet", "udpvidbench", "out"])
            .output();
        let Ok(out) = out else { return 0 };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut total = 0;
        for line in text.lines() {
            if line.contains(&format!("sport {port} ")) {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let Some(i) = words.iter().position(|w| *w == "bytes") {
                    total += words
                        .get(i + 1)
                        .and_then(|b| b.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
        total
    }
}

impl Drop for WireCounter {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "udpvidbench"])
            .status();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Udpvid,
    UdpvidFixed,
    Http,
    Srt,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Udpvid => "udpvid",
            Peer::UdpvidFixed => "udpvid fixed 4 MiB",
            Peer::Http => "HTTP (nginx, souphttpsrc)",
            Peer::Srt => "SRT (srtsrc)",
        }
    }
}

struct Env {
    clips: PathBuf,
    mp4_size: u64,
    ts_size: u64,
    udpvid_port: u16,
    udpvid_pid: String,
    http_port: u16,
    http_pid: String,
    wire: Option<WireCounter>,
}

/// Everything a run needs kept alive: proxies, SRT sender.
struct PeerPath {
    uri: String,
    /// Port the client receives from (for the wire counter).
    client_port: u16,
    server_pid: String,
    _guards: Vec<Proc>,
}

fn open_path(env: &Env, peer: Peer, cond: Condition, seed: u64) -> PeerPath {
    let impair = profile_dir().join("examples").join("impair");
    match peer {
        Peer::Udpvid | Peer::UdpvidFixed => {
            let (port, guards) = if cond.is_clean() {
                (env.udpvid_port, vec![])
            } else {
                let mut cmd = Command::new(&impair);
                cmd.args(["--upstream", &format!("127.0.0.1:{}", env.udpvid_port)])
                    .args(cond.proxy_args(seed));
                let (p, banner) = spawn_with_banner(cmd, "listening");
                (port_of(&banner, 3), vec![p])
            };
            if let Some(w) = &env.wire {
                w.watch(port);
            }
            PeerPath {
                uri: format!("udpvid://127.0.0.1:{port}/bench.mp4"),
                client_port: port,
                server_pid: env.udpvid_pid.clone(),
                _guards: guards,
            }
        }
        Peer::Http => {
            let port = if cond.is_clean() {
                env.http_port
            } else {
                start_tcp_relay(env.http_port, cond)
            };
            if let Some(w) = &env.wire {
                w.watch(port);
            }
            PeerPath {
                uri: format!("http://127.0.0.1:{port}/bench.mp4"),
                client_port: port,
                server_pid: env.http_pid.clone(),
                _guards: vec![],
            }
        }
        Peer::Srt => {
            let srt_port = free_port();
            // The sender paces the TS in real time, as a live SRT source does.
            let sender = Command::new("gst-launch-1.0")
                .args([
                    "-q",
                    "filesrc",
                    &format!("location={}", env.clips.join("bench.ts").display()),
                    "!",
                    "tsparse",
                    "set-timestamps=true",
                    "!",
                ])
                .args([
                    "srtsink",
                    &format!("uri=srt://:{srt_port}?mode=listener"),
                    &format!("latency={SRT_LATENCY_MS}"),
                    "wait-for-connection=true",
                    "sync=true",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("srt sender");
            std::thread::sleep(Duration::from_millis(300));
            let sender = Proc(sender);
            let server_pid = sender.pid();
            let (port, mut guards) = if cond.is_clean() {
                (srt_port, vec![])
            } else {
                let mut cmd = Command::new(&impair);
                cmd.args(["--upstream", &format!("127.0.0.1:{srt_port}")])
                    .args(cond.proxy_args(seed));
                let (p, banner) = spawn_with_banner(cmd, "listening");
                (port_of(&banner, 3), vec![p])
            };
            guards.push(sender);
            if let Some(w) = &env.wire {
                w.watch(port);
            }
            PeerPath {
                uri: format!("srt://127.0.0.1:{port}?mode=caller&latency={SRT_LATENCY_MS}"),
                client_port: port,
                server_pid,
                _guards: guards,
            }
        }
    }
}

/// One real-time playback through playbin, behaving like an app: it pauses
/// while the source reports buffering below 100 %.
struct Playback {
    first_byte: Option<Duration>,
    first_frame: Option<Duration>,
    stalls: u32,
    stalled_for: Duration,
    position: Duration,
    /// From the start to the stop point (or the end).
    wall: Duration,
    error: Option<String>,
}

/// When something first happened, set from a streaming thread.
type FirstSeen = Arc<Mutex<Option<Instant>>>;

fn playbin(uri: &str, peer: Peer) -> (gst::Element, FirstSeen, FirstSeen) {
    let video = gst::ElementFactory::make("fakesink")
        .property("sync", true)
        .build()
        .expect("fakesink");
    let audio = gst::ElementFactory::make("fakesink")
        .property("sync", true)
        .build()
        .expect("fakesink");
    video.set_property("signal-handoffs", true);
    let first_frame = Arc::new(Mutex::new(None));
    let ff = first_frame.clone();
    video.connect("handoff", false, move |_| {
        ff.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
        None
    });
    let pipeline = gst::ElementFactory::make("playbin")
        .property("uri", uri)
        .property("video-sink", &video)
        .property("audio-sink", &audio)
        .build()
        .expect("playbin");
    let first_byte = Arc::new(Mutex::new(None));
    let fb = first_byte.clone();
    pipeline.connect("source-setup", false, move |args| {
        let Ok(src) = args[1].get::<gst::Element>() else {
            return None;
        };
        if peer == Peer::UdpvidFixed {
            src.set_property("read-ahead", 4u64 << 20);
        }
        if let Some(pad) = src.static_pad("src") {
            let fb = fb.clone();
            pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                fb.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(Instant::now);
                gst::PadProbeReturn::Ok
            });
        }
        None
    });
    (pipeline, first_byte, first_frame)
}

/// What a bus message did to an application that pauses on buffering
/// below 100 % and resumes at 100 %, as playbin applications do.
enum AppStep {
    Continue,
    BufferingBegan,
    /// EOS, or the error that ended playback.
    End(Option<String>),
}

/// Handles `msg` as such an application: changes the pipeline's state on
/// buffering, and says whether playback ended.
fn application_step(pipeline: &gst::Element, msg: &gst::Message, buffering: &mut bool) -> AppStep {
    match msg.view() {
        gst::MessageView::Eos(_) => AppStep::End(None),
        gst::MessageView::Error(e) => AppStep::End(Some(e.error().to_string())),
        gst::MessageView::Buffering(b) if b.percent() < 100 && !*buffering => {
            *buffering = true;
            let _ = pipeline.set_state(gst::State::Paused);
            AppStep::BufferingBegan
        }
        gst::MessageView::Buffering(b) if b.percent() >= 100 && *buffering => {
            *buffering = false;
            let _ = pipeline.set_state(gst::State::Playing);
            AppStep::Continue
        }
        _ => AppStep::Continue,
    }
}

fn play(uri: &str, peer: Peer, stop_at: Duration, pause: Option<Duration>) -> Playback {
    let (pipeline, first_byte, first_frame) = playbin(uri, peer);
    let bus = pipeline.bus().expect("bus");
    let started = Instant::now();
    let _ = pipeline.set_state(gst::State::Playing);
    let mut result = Playback {
        first_byte: None,
        first_frame: None,
        stalls: 0,
        stalled_for: Duration::ZERO,
        position: Duration::ZERO,
        wall: Duration::ZERO,
        error: None,
    };
    let mut buffering = false;
    let mut last_pos = Duration::ZERO;
    let mut last_progress = Instant::now();
    let mut in_stall = false;
    let mut playing_since: Option<Instant> = None;
    // A link at half the media rate needs about twice the clip to play it.
    let hard_limit = (stop_at * 3).max(stop_at + Duration::from_secs(60));
    loop {
        if started.elapsed() > hard_limit {
            result.error = Some("did not reach the stop point".into());
            break;
        }
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(20)) {
            if let AppStep::End(error) = application_step(&pipeline, &msg, &mut buffering) {
                result.error = error;
                break;
            }
        }
        let pos = pipeline
            .query_position::<gst::ClockTime>()
            .map_or(Duration::ZERO, |p| Duration::from_nanos(p.nseconds()));
        if pos > Duration::ZERO && playing_since.is_none() {
            playing_since = Some(Instant::now());
        }
        if pos > last_pos {
            if in_stall {
                result.stalled_for += last_progress.elapsed();
                in_stall = false;
            }
            last_pos = pos;
            last_progress = Instant::now();
        } else if playing_since.is_some()
            && !in_stall
            && last_progress.elapsed() > Duration::from_millis(250)
        {
            in_stall = true;
            result.stalls += 1;
        }
        if pos >= stop_at {
            break;
        }
    }
    result.position = last_pos;
    result.wall = started.elapsed();
    if let Some(p) = pause {
        let _ = pipeline.set_state(gst::State::Paused);
        std::thread::sleep(p);
    }
    result.first_byte = first_byte
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|t| t - started);
    result.first_frame = first_frame
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|t| t - started);
    let _ = pipeline.set_state(gst::State::Null);
    result
}

/// Where the seek table's playbin seeks, in seconds, in this order: the
/// first three are the table's own columns, all ten its median and slowest
/// (three seeks said little about a tail at 10 % loss).
const SEEK_TARGETS: [u64; 10] = [20, 45, 5, 33, 12, 50, 27, 8, 40, 16];

/// Seek latency through playbin: from the seek request to the first video
/// frame rendered after it, for each of [`SEEK_TARGETS`] while playing.
fn seek_latencies(uri: &str, peer: Peer) -> Result<Vec<Duration>, String> {
    let (pipeline, _, _) = playbin(uri, peer);
    let video: gst::Element = pipeline.property("video-sink");
    let frames = Arc::new(AtomicU64::new(0));
    let f = frames.clone();
    video.connect("handoff", false, move |_| {
        f.fetch_add(1, Ordering::Relaxed);
        None
    });
    let bus = pipeline.bus().ok_or("bus")?;
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|e| e.to_string())?;
    let (r, _, _) = pipeline.state(gst::ClockTime::from_seconds(30));
    r.map_err(|_| "did not start".to_string())?;
    std::thread::sleep(Duration::from_secs(2));
    let mut out = Vec::new();
    for target in SEEK_TARGETS {
        let before = frames.load(Ordering::Relaxed);
        let asked = Instant::now();
        pipeline
            .seek_simple(
                gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
                gst::ClockTime::from_seconds(target),
            )
            .map_err(|_| format!("seek to {target} s refused"))?;
        // The flush drops queued frames: wait for the position to reach the
        // target and a frame to be rendered there.
        loop {
            if asked.elapsed() > Duration::from_secs(30) {
                return Err(format!("seek to {target} s did not complete"));
            }
            if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
                if let gst::MessageView::Error(e) = msg.view() {
                    return Err(e.error().to_string());
                }
            }
            let pos = pipeline
                .query_position::<gst::ClockTime>()
                .map_or(0, |p| p.seconds());
            if frames.load(Ordering::Relaxed) > before && pos + 2 >= target && pos <= target + 2 {
                out.push(asked.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let _ = pipeline.set_state(gst::State::Null);
    Ok(out)
}

struct Pull {
    seconds: f64,
    first_byte: Duration,
    client_cpu: f64,
    server_cpu: f64,
    bytes: u64,
}

fn pull(uri: &str, server_pid: &str) -> Result<Pull, String> {
    let src =
        gst::Element::make_from_uri(gst::URIType::Src, uri, None).map_err(|e| e.to_string())?;
    let sink = gst::ElementFactory::make("fakesink")
        .property("sync", false)
        .build()
        .map_err(|e| e.to_string())?;
    let pipeline = gst::Pipeline::new();
    pipeline
        .add_many([&src, &sink])
        .map_err(|e| e.to_string())?;
    src.link(&sink).map_err(|e| e.to_string())?;
    let bytes = Arc::new(AtomicU64::new(0));
    let first = Arc::new(Mutex::new(None));
    {
        let (bytes, first) = (bytes.clone(), first.clone());
        src.static_pad("src").ok_or("no src pad")?.add_probe(
            gst::PadProbeType::BUFFER,
            move |_, info| {
                if let Some(b) = info.buffer() {
                    bytes.fetch_add(b.size() as u64, Ordering::Relaxed);
                }
                first
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(Instant::now);
                gst::PadProbeReturn::Ok
            },
        );
    }
    let cpu0 = (cpu_seconds("self"), cpu_seconds(server_pid));
    let relay0 = relay_threads_cpu();
    let started = Instant::now();
    let bus = pipeline.bus().ok_or("bus")?;
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|e| e.to_string())?;
    let msg = bus.timed_pop_filtered(
        gst::ClockTime::from_seconds(300),
        &[gst::MessageType::Eos, gst::MessageType::Error],
    );
    let seconds = started.elapsed().as_secs_f64();
    // Before the connection closes and the relay's threads end with it.
    let client_cpu = cpu_seconds("self") - cpu0.0 - relay_cpu_since(&relay0);
    let server_cpu = cpu_seconds(server_pid) - cpu0.1;
    let _ = pipeline.set_state(gst::State::Null);
    match msg.as_ref().map(|m| m.view()) {
        Some(gst::MessageView::Eos(_)) => {}
        Some(gst::MessageView::Error(e)) => return Err(e.error().to_string()),
        _ => return Err("timed out".into()),
    }
    let first_byte = first
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map_or(Duration::ZERO, |t| t - started);
    Ok(Pull {
        seconds,
        first_byte,
        client_cpu,
        server_cpu,
        bytes: bytes.load(Ordering::Relaxed),
    })
}

/// Pulls of the clean loopback path, per peer. The clip's pull lasts
/// 17-100 ms, its start mostly, and this VM's noise moved the median of
/// seven by 2x between runs of one hour (4 Dec: HTTP 23-82 ms): fifteen,
/// and the fastest beside the median.
const PULL_REPEATS: usize = 15;

/// The run with the median time and the fastest run's seconds; the first
/// error if any run failed.
fn median_pull(runs: Vec<Result<Pull, String>>) -> Result<(Pull, f64), String> {
    let mut ok = Vec::new();
    for r in runs {
        ok.push(r?);
    }
    ok.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let fastest = ok.first().map_or(0.0, |p| p.seconds);
    let mid = ok.len() / 2;
    let median = ok
        .into_iter()
        .nth(mid)
        .ok_or_else(|| "no run".to_string())?;
    Ok((median, fastest))
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.0}", d.as_secs_f64() * 1000.0))
}

fn mib(b: f64) -> String {
    format!("{:.2}", b / 1048576.0)
}

/// Runs server and client inside a namespace where nftables drops
/// `percent` % of packets; returns the seconds a full pull took.
fn kernel_loss_pull(env: &Env, percent: u32, http: bool) -> Result<f64, String> {
    let ns = format!("udpvidbench{}", std::process::id());
    let run = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    let _ = Command::new("ip")
        .args(["netns", "del", &ns])
        .stderr(Stdio::null())
        .status();
    if !Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .is_ok_and(|s| s.success())
    {
        return Err("no network namespace (needs root)".into());
    }
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _ns = Ns(ns.clone());
    run(&["ip", "link", "set", "lo", "up"]);
    let p = percent.to_string();
    run(&["nft", "add", "table", "inet", "loss"]);
    run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "loss",
        "in",
        "{ type filter hook input priority 0; }",
    ]);
    run(&[
        "nft", "add", "rule", "inet", "loss", "in", "numgen", "random", "mod", "100", "<", &p,
        "drop",
    ]);
    let (_server, uri) = if http {
        let work = target_dir().join("bench").join("nginx-ns");
        let conf = nginx::write_conf(&work, &env.clips, "127.0.0.1:8080", 64)
            .map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "nginx", "-c"])
            .arg(&conf)
            .arg("-p")
            .arg(&work)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(300));
        (Proc(child), "http://127.0.0.1:8080/bench.mp4".to_string())
    } else {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(profile_dir().join("server"))
            .arg("--dir")
            .arg(&env.clips)
            .args(["--bind", "127.0.0.1", "--port", "50000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(300));
        (
            Proc(child),
            "udpvid://127.0.0.1:50000/bench.mp4".to_string(),
        )
    };
    let started = Instant::now();
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "gst-launch-1.0",
            "-q",
            "urisourcebin",
            &format!("uri={uri}"),
            "!",
            "fakesink",
            "sync=false",
        ])
        .env("GST_PLUGIN_PATH", profile_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err("pull failed".into());
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Stops the peers (the environment's proxies and counters first) and
/// An S3-compatible server (moto from target/venv) on a free port.
fn start_moto() -> Result<(Proc, u16), String> {
    let bin = target_dir().join("venv").join("bin").join("moto_server");
    if !bin.exists() {
        return Err(format!("{} missing: run `make venv`", bin.display()));
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let moto = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("moto did not start".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((moto, port))
}

fn s3_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "bench".into()),
        ("AWS_SECRET_ACCESS_KEY", "bench".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
    ]
}

fn s3_upload(port: u16, bucket: &str, key: &str, file: &Path) -> Result<(), String> {
    let python = target_dir().join("venv").join("bin").join("python");
    let script = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', \
         aws_access_key_id='bench', aws_secret_access_key='bench', region_name='us-east-1')\n\
         s3.create_bucket(Bucket={bucket:?})\n\
         s3.upload_file({:?}, {bucket:?}, {key:?})\n",
        file.display().to_string()
    );
    let ok = Command::new(python)
        .args(["-c", &script])
        .status()
        .map_err(|e| e.to_string())?
        .success();
    if ok {
        Ok(())
    } else {
        Err("upload failed".into())
    }
}

/// A server of `s3://bucket` with its metrics page; (process, UDP port,
/// metrics port).
fn start_store_server(moto_port: u16, url: &str) -> (Proc, u16, u16) {
    let metrics = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut cmd = Command::new(profile_dir().join("server"));
    cmd.args(["--store", url, "--bind", "127.0.0.1", "--port", "0"])
        .args(["--metrics", &format!("127.0.0.1:{metrics}")])
        .env("UDPVID_LOG", "warn")
        .envs(s3_env(moto_port));
    let (p, banner) = spawn_with_banner(cmd, "listening");
    (p, port_of(&banner, 4), metrics)
}

/// A real-time playbin viewer of `uri` (several servers); `kill` runs when
/// playback reaches `kill_at`. Returns the longest wall-clock gap between
/// two rendered video frames after the first, the stalls, the failovers
/// and an error if any.
fn failover_viewing(
    uri: &str,
    kill_at: Duration,
    stop_at: Duration,
    kill: impl FnOnce(),
) -> (Duration, u32, u64, Option<String>) {
    let (pipeline, _first_byte, _first_frame) = playbin(uri, Peer::Udpvid);
    let gap = Arc::new(Mutex::new((None::<Instant>, Duration::ZERO)));
    let video: gst::Element = pipeline.property("video-sink");
    {
        let gap = gap.clone();
        video.connect("handoff", false, move |_| {
            let now = Instant::now();
            let mut g = gap.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(last) = g.0 {
                g.1 = g.1.max(now - last);
            }
            g.0 = Some(now);
            None
        });
    }
    let bus = pipeline.bus().expect("bus");
    let _ = pipeline.set_state(gst::State::Playing);
    let started = Instant::now();
    let mut kill = Some(kill);
    let mut stalls = 0;
    let mut error = None;
    let mut failovers = 0;
    let mut buffering = false;
    while started.elapsed() < stop_at * 3 {
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(20)) {
            match application_step(&pipeline, &msg, &mut buffering) {
                AppStep::End(e) => {
                    error = e;
                    break;
                }
                AppStep::BufferingBegan if kill.is_none() => stalls += 1,
                _ => {}
            }
        }
        let pos = pipeline
            .query_position::<gst::ClockTime>()
            .map_or(Duration::ZERO, |p| Duration::from_nanos(p.nseconds()));
        if pos >= kill_at {
            if let Some(k) = kill.take() {
                k();
            }
        }
        if let Some(src) = pipeline.property::<Option<gst::Element>>("source") {
            let stats: gst::Structure = src.property("stats");
            failovers = stats.get::<u64>("failovers").unwrap_or(0).max(failovers);
        }
        if pos >= stop_at {
            break;
        }
    }
    let _ = pipeline.set_state(gst::State::Null);
    let longest = gap.lock().unwrap_or_else(|p| p.into_inner()).1;
    (longest, stalls, failovers, error)
}

/// One run of `load viewers`: N real-time viewers arriving over
/// `arrival_seconds` against one server core, udpvid or nginx; with
/// `quota`, the server held to that share of a core per serving thread.
fn load_viewers(
    n: usize,
    peer: &str,
    server_threads: usize,
    arrival_seconds: u64,
    quota: Option<f64>,
) -> Result<Vec<(String, String)>, String> {
    let mut command = Command::new(profile_dir().join("examples").join("load"));
    command
        .args([
            "viewers",
            &n.to_string(),
            "4",
            &VIEWER_SECONDS.to_string(),
            peer,
        ])
        .env("LOAD_SERVER_THREADS", server_threads.to_string())
        .env("LOAD_ARRIVAL_SECONDS", arrival_seconds.to_string());
    if let Some(cores) = quota {
        command.env("LOAD_SERVER_QUOTA", cores.to_string());
    }
    if server_threads == 1 {
        pin_server_and_load(&mut command);
    }
    result_pairs(&mut command, "viewers-result ")
}

/// One server core means one: the server (or nginx) `load` starts on core
/// 0, `load` itself on core 1, when there are two cores to give.
fn pin_server_and_load(command: &mut Command) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        command
            .env("LOAD_SERVER_CPUS", "0")
            .env("LOAD_VIEWER_CPUS", "1");
    }
}

/// Runs `command` (`load` or `udp_floor`) and returns the `key=value`
/// pairs of the line of its output that starts with `prefix`.
fn result_pairs(command: &mut Command, prefix: &str) -> Result<Vec<(String, String)>, String> {
    let output = command
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{}: {e}", command.get_program().to_string_lossy()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .ok_or_else(|| {
            let stderr = String::from_utf8_lossy(&output.stderr);
            format!("no result ({})", stderr.lines().last().unwrap_or("").trim())
        })?;
    Ok(line
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The value of `key` in `pairs`, or "?".
fn pair_value<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map_or("?", |(_, v)| v.as_str())
}

/// The CPU per GB a sender with no protocol spends on loopback sending N
/// receivers `mbit` Mbit/s in all in GSO bursts of `burst` datagrams
/// (`examples/udp_floor`): the floor under the server's figure.
fn udp_floor(n: usize, mbit: usize, burst: usize) -> Result<String, String> {
    let mut command = Command::new(profile_dir().join("examples").join("udp_floor"));
    command.args([
        n.to_string(),
        mbit.to_string(),
        "10".to_string(),
        burst.to_string(),
    ]);
    let pairs = result_pairs(&mut command, "floor-result ")?;
    pairs
        .into_iter()
        .find(|(k, _)| k == "cpu_per_gb")
        .map(|(_, v)| v)
        .ok_or_else(|| "no result".to_string())
}

/// The share of a core each serving thread is held to in the rows that
/// show what a second serving thread adds, and the viewers one such
/// thread carries there without a stall (125 on the 2-core VM of 5 Dec;
/// 250 stalled every viewer).
const QUOTA_CORES: f64 = 0.1;
const QUOTA_VIEWERS: usize = 125;

/// Datagrams per GSO send the server makes to 4 Mbit/s viewers (measured
/// with `perf stat` on `sendmsg` at 200 viewers: 11.5).
const VIEWER_BURST_DATAGRAMS: usize = 11;

/// Real-time viewers at 4 Mbit/s, N of them at once, udpvid against nginx
/// (issue "hundreds of viewers per core"). `BENCH_VIEWERS=10,100` picks
/// the Ns. The viewers run on this machine's other core, so past a few
/// hundred they can be the limit: the generator's timer lag shows when.
fn viewers_table(out: &mut String) {
    let counts: Vec<usize> = std::env::var("BENCH_VIEWERS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 100, 300, 500]);
    let _ = writeln!(
        out,
        "## Real-time viewers (4 Mbit/s each, {VIEWER_SECONDS} s, arriving over {VIEWER_ARRIVAL_SECONDS} s, every byte checked; one server core)\n"
    );
    let _ = writeln!(
        out,
        "The viewers play in real time from one load process (`load viewers`): udpvid through the protocol core the element uses and its adaptive read-ahead, all viewers on one thread; HTTP through a socket read at the playback rate (TCP's buffers are its read-ahead), a thread per viewer. With one serving thread the server (or nginx) runs on core 0 and the viewers on core 1 (`LOAD_SERVER_CPUS`, `LOAD_VIEWER_CPUS`); with two, both share both cores. The busiest serving thread's share is 100 % with one thread; near 50 % with two, the sessions spread evenly over both cores, so two cores carry twice what one does at the same CPU per GB (here the second core also runs the viewers, so the doubled count cannot be shown with whole cores). The last three rows show it with the server held to {QUOTA_CORES} of a core per serving thread (a cgroup CPU quota with a 10 ms period, `LOAD_SERVER_QUOTA`; needs root), pinned as above: one thread so held carries the first count without a stall and stalls at twice it; two threads so held carry twice it. The last column is how late the udpvid viewers' thread ran its timers at worst: near a tick (100 ms), stalls are the generator's.\n"
    );
    let _ = writeln!(
        out,
        "| viewers | peer | finished | stalls (viewers) | server CPU s/GB | busiest serving thread % of server CPU | server wake-ups/s | server KiB per session | viewers' CPU s/GB | viewers' thread lag ms |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    let largest = counts.iter().copied().max().unwrap_or(0);
    // (viewers, peer, serving threads, arrival seconds, quota per thread)
    let mut runs: Vec<(usize, &str, usize, u64, Option<f64>)> = Vec::new();
    for &n in &counts {
        runs.push((n, "http", 1, VIEWER_ARRIVAL_SECONDS, None));
        runs.push((n, "udpvid", 1, VIEWER_ARRIVAL_SECONDS, None));
        runs.push((n, "floor", 1, VIEWER_ARRIVAL_SECONDS, None));
    }
    if largest > 0 {
        // 1 -> 2 serving threads at the largest N.
        runs.push((largest, "udpvid", 2, VIEWER_ARRIVAL_SECONDS, None));
        // The flash crowd: all of them within a second.
        runs.push((largest, "udpvid", 1, 1, None));
    }
    // 1 -> 2 serving threads, each held to a share of a core: twice the
    // viewers need the second thread.
    for (n, threads) in [
        (QUOTA_VIEWERS, 1),
        (2 * QUOTA_VIEWERS, 1),
        (2 * QUOTA_VIEWERS, 2),
    ] {
        runs.push((
            n,
            "udpvid",
            threads,
            VIEWER_ARRIVAL_SECONDS,
            Some(QUOTA_CORES),
        ));
    }
    for (n, peer, threads, arrival, quota) in runs {
        if peer == "floor" {
            let cell = udp_floor(n, 4 * n, VIEWER_BURST_DATAGRAMS)
                .unwrap_or_else(|e| format!("failed: {e}"));
            let _ = writeln!(
                out,
                "| {n} | UDP sends alone, bursts of {VIEWER_BURST_DATAGRAMS} (no protocol: the kernel's floor) | – | – | {cell} | – | – | – | – | – |"
            );
            continue;
        }
        let name = match (peer, threads, quota) {
            ("http", _, _) => "HTTP (nginx, 1 worker)".to_string(),
            (_, 1, Some(q)) => format!("udpvid, 1 serving thread held to {q} of a core"),
            (_, t, Some(q)) => format!("udpvid, {t} serving threads held to {q} of a core each"),
            (_, 1, None) if arrival == VIEWER_ARRIVAL_SECONDS => "udpvid".to_string(),
            (_, 1, None) => format!("udpvid, all arriving within {arrival} s"),
            (_, t, None) => format!("udpvid, {t} serving threads"),
        };
        match load_viewers(n, peer, threads, arrival, quota) {
            Ok(kv) => {
                let get = |k: &str| pair_value(&kv, k);
                let _ = writeln!(
                    out,
                    "| {n} | {name} | {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
                    get("finished"),
                    get("stalls"),
                    get("stalled_viewers"),
                    get("server_cpu_per_gb"),
                    get("busiest_thread_share"),
                    get("wakeups_per_s"),
                    get("kib_per_session"),
                    get("client_cpu_per_gb"),
                    get("generator_lag_ms"),
                );
            }
            Err(e) => {
                let _ = writeln!(out, "| {n} | {name} | failed: {e} | | | | | | | |");
            }
        }
        eprint!(".");
    }
    let _ = writeln!(out);
    paused_sessions(out);
}

/// Real players at once (`BENCH_PLAYERS`, default 10), as `gst-launch-1.0
/// SRC ! qtdemux ! queue ! fakesink sync=true` plays: the demuxer's own
/// reads at the playback clock, not the load generator's. Measured over
/// [`PLAYER_SECONDS`] after [`PLAYER_WARMUP`].
const PLAYER_SECONDS: u64 = 20;
const PLAYER_WARMUP: Duration = Duration::from_secs(8);

/// Bytes the loopback interface carried: both peers' payloads and headers
/// (their ACKs too), counted the same way.
fn loopback_bytes() -> u64 {
    std::fs::read_to_string("/sys/class/net/lo/statistics/tx_bytes")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn players_table(out: &mut String, env: &Env) {
    let n: usize = std::env::var("BENCH_PLAYERS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(10);
    let _ = writeln!(
        out,
        "## Real players ({n} at once, `! qtdemux ! queue ! fakesink sync=true` in real time, {PLAYER_SECONDS} s after {} s)\n",
        PLAYER_WARMUP.as_secs()
    );
    let _ = writeln!(
        out,
        "GStreamer pipelines in this process play the MP4 clip in real time, each as `gst-launch-1.0` would: the demuxer reads at the playback clock, in its own sizes (the `viewers` table's generator reads every 100 ms instead). The udpvid server sends Ethernet-sized datagrams (`--max-datagram 1452`), as to a viewer across a network. Bytes are what the loopback interface carried. Datagrams per send is the server's `udpvid_datagrams_sent_total` over `udpvid_sends_total`. The floor row sends the same rate to as many receivers in bursts of that many datagrams with no protocol at all (`examples/udp_floor`): on loopback each datagram is also received inside the sender's `sendmsg`, where nginx's TCP hands over 64 KB segments whole, so the floor, not nginx, is what udpvid can come near here.\n"
    );
    let _ = writeln!(
        out,
        "| peer | Mbit/s | server CPU s/GB | server wake-ups/s | datagrams per send |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let metrics_port = free_port();
    let (server, udpvid_port) = start_udpvid_server(
        &env.clips,
        &[
            "--max-datagram",
            "1452",
            "--metrics",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );
    let peers = [
        (
            "HTTP (souphttpsrc, nginx)",
            format!(
                "souphttpsrc location=http://127.0.0.1:{}/bench.mp4",
                env.http_port
            ),
            env.http_pid.clone(),
            None,
        ),
        (
            "udpvid",
            format!("udpvidsrc host=127.0.0.1 port={udpvid_port} file=bench.mp4"),
            server.pid(),
            Some(metrics_port),
        ),
    ];
    for (name, source, pid, metrics) in peers {
        let description = format!(
            "{source} ! qtdemux name=d d.video_0 ! queue ! fakesink sync=true d.audio_0 ! queue ! fakesink sync=true"
        );
        let pipelines: Vec<gst::Element> = (0..n)
            .filter_map(|_| gst::parse::launch(&description).ok())
            .collect();
        for p in &pipelines {
            let _ = p.set_state(gst::State::Playing);
        }
        std::thread::sleep(PLAYER_WARMUP);
        // One page per reading: its three counters from one moment.
        let counts = |port: Option<u16>| {
            port.map(|p| {
                let page = metrics_page("127.0.0.1", p).unwrap_or_default();
                let get = |name| metric_value(&page, name).unwrap_or(0);
                (
                    get("udpvid_datagrams_sent_total"),
                    get("udpvid_sends_total"),
                    get("udpvid_wakeups_total"),
                )
            })
        };
        let before = (loopback_bytes(), cpu_seconds(&pid), counts(metrics));
        std::thread::sleep(Duration::from_secs(PLAYER_SECONDS));
        let after = (loopback_bytes(), cpu_seconds(&pid), counts(metrics));
        let errors = pipelines
            .iter()
            .filter(|p| {
                p.bus()
                    .is_some_and(|b| b.pop_filtered(&[gst::MessageType::Error]).is_some())
            })
            .count();
        for p in &pipelines {
            let _ = p.set_state(gst::State::Null);
        }
        let bytes = after.0.saturating_sub(before.0) as f64;
        let cpu = after.1 - before.1;
        let per_send = match (before.2, after.2) {
            (Some(b), Some(a)) => Some((
                a.2.saturating_sub(b.2) as f64 / PLAYER_SECONDS as f64,
                a.0.saturating_sub(b.0) as f64 / a.1.saturating_sub(b.1).max(1) as f64,
            )),
            _ => None,
        };
        let (wakeups, per_send_cell) = per_send
            .map_or(("–".to_string(), "–".to_string()), |(w, p)| {
                (format!("{w:.0}"), format!("{p:.1}"))
            });
        let playing = if pipelines.len() == n && errors == 0 {
            String::new()
        } else {
            format!(" ({} of {n} playing, {errors} errors)", pipelines.len())
        };
        let mbit = bytes * 8.0 / PLAYER_SECONDS as f64 / 1e6;
        let _ = writeln!(
            out,
            "| {name}{playing} | {mbit:.1} | {:.2} | {wakeups} | {per_send_cell} |",
            cpu / (bytes / 1e9).max(1e-9),
        );
        // What the kernel alone charges for the server's send pattern (the
        // same rate to as many receivers in bursts of as many datagrams):
        // on loopback each datagram is also received inside the sender's
        // `sendmsg`, where TCP's 64 KB segments are received whole.
        if let Some((_, burst)) = per_send {
            let burst = burst.round().max(1.0) as usize;
            let cell = udp_floor(n, mbit.round().max(1.0) as usize, burst)
                .unwrap_or_else(|e| format!("failed: {e}"));
            let _ = writeln!(
                out,
                "| UDP sends alone, bursts of {burst} (no protocol: the kernel's floor) | {mbit:.1} | {cell} | – | {burst} |"
            );
        }
        eprint!(".");
    }
    drop(server);
    let _ = writeln!(out);
}

/// Concurrent pulls through one kernel-shaped bottleneck (`load shaped`),
/// udpvid against nginx for the same N (issue "hundreds of viewers per
/// core": server CPU per GB with 20 and 200 paced streams). (N, file MiB.)
const SHAPED_PULLS: [(usize, usize); 2] = [(20, 16), (200, 4)];
/// The bottleneck's rate, Mbit/s.
const SHAPED_MBIT: usize = 200;

fn shaped_pulls_table(out: &mut String) {
    let _ = writeln!(
        out,
        "## Concurrent pulls through one {SHAPED_MBIT} Mbit/s bottleneck (tc tbf, 512 KB queue; one server core)\n"
    );
    let _ = writeln!(
        out,
        "N pulls of one file as fast as they can through one `tc tbf` on a veth into a network namespace (`load shaped`): congestion control paces every session, TCP's in nginx's kernel, udpvid's in its server. The server (or nginx, one worker, sendfile) runs in the namespace on core 0, the pulls on core 1. Dropped: datagrams or TCP segments the queue dropped, of all it was handed (what the server handed it, by the udpvid server's count of datagrams sent or the namespace's TCP segments sent, less what it passed; before 5 Dec the queue's own drop count, where a GSO or TSO batch under 32 KB counts once, which understated udpvid's share several times). HTTP pulls wait up to 120 s for their next bytes (TCP flows whose first segments are lost back off for seconds); udpvid pulls 20 s.\n"
    );
    let _ = writeln!(
        out,
        "| pulls | peer | byte-exact | Mbit/s | first 256 KiB ms (median) | server CPU s/GB | server wake-ups/s | dropped % |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (n, mib) in SHAPED_PULLS {
        for (peer, name) in [("http", "HTTP (nginx, 1 worker)"), ("udpvid", "udpvid")] {
            let mut command = Command::new(profile_dir().join("examples").join("load"));
            command.args([
                "shaped",
                &n.to_string(),
                &SHAPED_MBIT.to_string(),
                &mib.to_string(),
                peer,
            ]);
            pin_server_and_load(&mut command);
            match result_pairs(&mut command, "shaped-result ") {
                Ok(kv) => {
                    let get = |k: &str| pair_value(&kv, k);
                    let _ = writeln!(
                        out,
                        "| {n} of {mib} MiB | {name} | {} | {} | {} | {} | {} | {} |",
                        get("exact"),
                        get("mbit"),
                        get("first_read_ms"),
                        get("cpu_per_gb"),
                        get("wakeups_per_s"),
                        get("dropped_pct"),
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "| {n} of {mib} MiB | {name} | failed: {e} | | | | | |");
                }
            }
            eprint!(".");
        }
    }
    let _ = writeln!(out);
}

/// Paused viewers kept by one server core (`load paused`): they preroll,
/// pause for 60 s, and are measured once all are paused with full windows.
const PAUSED_SESSIONS: usize = 2000;

fn paused_sessions(out: &mut String) {
    let mut command = Command::new(profile_dir().join("examples").join("load"));
    command
        .args(["paused", &PAUSED_SESSIONS.to_string(), "60"])
        .env("LOAD_ARRIVAL_SECONDS", "20");
    pin_server_and_load(&mut command);
    let row = match result_pairs(&mut command, "paused-result ") {
        Ok(kv) => {
            let get = |k: &str| pair_value(&kv, k);
            format!(
                "| {} of {PAUSED_SESSIONS} | {} | {} | {} | {} |",
                get("paused"),
                get("core_percent"),
                get("wakeups_per_s"),
                get("kib_per_session"),
                get("datagrams_per_session_s"),
            )
        }
        Err(e) => format!("| failed: {e} | | | | |"),
    };
    let _ = writeln!(
        out,
        "### Paused viewers\n\n{PAUSED_SESSIONS} viewers arriving over 20 s preroll a second of a 4 Mbit/s file and pause for 60 s; measured over the last 10 s, all paused with full windows (`load paused`, server on core 0).\n"
    );
    let _ = writeln!(
        out,
        "| paused to the end | server % of a core | server wake-ups/s | server KiB per session | datagrams per session per s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let _ = writeln!(out, "{row}\n");
}

/// Issue "beyond one machine": the object store against `--dir`, what ten
/// viewers of one file cost the store, and what a viewer sees when its
/// server dies.
fn scale_out(out: &mut String, env: &Env) {
    let _ = writeln!(
        out,
        "## Scale out: object storage (moto on loopback) against --dir\n"
    );
    let (moto, moto_port) = match start_moto() {
        Ok(m) => m,
        Err(e) => {
            let _ = writeln!(out, "skipped: {e}\n");
            return;
        }
    };
    let clip = env.clips.join("bench.mp4");
    if let Err(e) = s3_upload(moto_port, "bench", "bench.mp4", &clip) {
        let _ = writeln!(out, "skipped: {e}\n");
        return;
    }
    let gb = |bytes: u64| bytes as f64 / 1e9;
    let _ = writeln!(
        out,
        "| library | pull | first byte ms | time s | server CPU s/GB |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let dir_uri = format!("udpvid://127.0.0.1:{}/bench.mp4", env.udpvid_port);
    let (store, store_port, _) = start_store_server(moto_port, "s3://bench");
    let store_uri = format!("udpvid://127.0.0.1:{store_port}/bench.mp4");
    for (library, what, uri, pid) in [
        ("--dir", "page cache warm", &dir_uri, env.udpvid_pid.clone()),
        ("--store", "cache cold", &store_uri, store.pid()),
        ("--store", "cache warm", &store_uri, store.pid()),
    ] {
        match pull(uri, &pid) {
            Ok(p) => {
                let _ = writeln!(
                    out,
                    "| {library} | {what} | {:.0} | {:.2} | {:.1} |",
                    p.first_byte.as_secs_f64() * 1000.0,
                    p.seconds,
                    p.server_cpu / gb(p.bytes).max(1e-9)
                );
            }
            Err(e) => {
                let _ = writeln!(out, "| {library} | {what} | failed: {e} | | |");
            }
        }
        eprint!(".");
    }
    drop(store);
    let _ = writeln!(out);

    // Ten concurrent pulls of one object on a fresh server (cold cache).
    let (store, store_port, store_metrics) = start_store_server(moto_port, "s3://bench");
    let uri = format!("udpvid://127.0.0.1:{store_port}/bench.mp4");
    let pid = store.pid();
    let viewers: Vec<_> = (0..10)
        .map(|_| {
            let (uri, pid) = (uri.clone(), pid.clone());
            std::thread::spawn(move || pull(&uri, &pid))
        })
        .collect();
    let mut delivered = 0u64;
    let mut failed = 0;
    for v in viewers {
        match v.join() {
            Ok(Ok(p)) => delivered += p.bytes,
            _ => failed += 1,
        }
    }
    let page = metrics_page("127.0.0.1", store_metrics).unwrap_or_default();
    let read = metric_value(&page, "udpvid_store_bytes_read_total").unwrap_or(0);
    let gets = metric_value(&page, "udpvid_store_gets_total").unwrap_or(0);
    drop(store);
    let _ = writeln!(
        out,
        "| 10 concurrent pulls of one {:.1} MiB object | value |\n|---|---|",
        env.mp4_size as f64 / 1048576.0
    );
    let _ = writeln!(
        out,
        "| delivered | {:.1} MiB ({failed} failed) |",
        delivered as f64 / 1048576.0
    );
    let _ = writeln!(
        out,
        "| read from the store | {:.1} MiB in {gets} GETs |",
        read as f64 / 1048576.0
    );
    let _ = writeln!(
        out,
        "| store ÷ one copy (target ≤ 1.1) | {:.2} |",
        read as f64 / env.mp4_size.max(1) as f64
    );
    let _ = writeln!(
        out,
        "| store ÷ delivered | {:.3} |\n",
        read as f64 / delivered.max(1) as f64
    );
    eprint!(".");

    // A real-time viewer given two servers; the first dies 5 s in.
    let _ = writeln!(
        out,
        "| two servers, the first killed 5 s into real-time playback | longest gap between frames ms | rebuffering | failovers | result |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for library in ["--dir", "--store"] {
        let start = || match library {
            "--dir" => start_udpvid_server(&env.clips, &[]),
            _ => {
                let (p, port, _) = start_store_server(moto_port, "s3://bench");
                (p, port)
            }
        };
        let (first, first_port) = start();
        let (second, second_port) = start();
        let uri = format!("udpvid://127.0.0.1:{first_port},127.0.0.1:{second_port}/bench.mp4");
        let first = Mutex::new(Some(first));
        let (gap, stalls, failovers, error) = failover_viewing(
            &uri,
            Duration::from_secs(5),
            Duration::from_secs(15),
            || {
                // SIGKILL: a server that dies, not one that says goodbye.
                if let Some(mut p) = first.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = p.0.kill();
                }
            },
        );
        let _ = writeln!(
            out,
            "| {library} | {:.0} | {stalls} | {failovers} | {} |",
            gap.as_secs_f64() * 1000.0,
            error.unwrap_or_else(|| "ok".into())
        );
        drop(second);
        eprint!(".");
    }
    let _ = writeln!(out);
    drop(moto);
}

/// prints the report: the end of a full run and of a `BENCH_ONLY` one.
fn stop_and_print(out: &str, env: Env, udpvid: Proc, nginx: Proc) {
    drop(env);
    drop(udpvid);
    drop(nginx);
    println!("{out}");
}

fn main() {
    gst::init().expect("GStreamer");
    gstudpvid::plugin_register_static().expect("plugin");
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let bench_dir = target_dir().join("bench");
    let clips_dir = bench_dir.join("clips");
    let (mp4, ts) = make_clips(&clips_dir);
    let (udpvid, udpvid_port) = start_udpvid_server(&clips_dir, &[]);
    let (nginx, http_port) = start_nginx(&clips_dir, &bench_dir.join("nginx"));
    let env = Env {
        mp4_size: std::fs::metadata(&mp4).map(|m| m.len()).unwrap_or(0),
        ts_size: std::fs::metadata(&ts).map(|m| m.len()).unwrap_or(0),
        clips: clips_dir.clone(),
        udpvid_port,
        udpvid_pid: udpvid.pid(),
        http_port,
        http_pid: nginx.pid(),
        wire: WireCounter::install(),
    };
    let conditions = [
        Condition {
            name: "loopback",
            rate_mbit: None,
            one_way_ms: 0,
            loss: 0.0,
            burst: None,
        },
        Condition {
            name: "20 Mbit/s, 80 ms",
            rate_mbit: Some(20.0),
            one_way_ms: 40,
            loss: 0.0,
            burst: None,
        },
        Condition {
            name: "20 Mbit/s, 80 ms, 1 % loss",
            rate_mbit: Some(20.0),
            one_way_ms: 40,
            loss: 0.01,
            burst: None,
        },
        Condition {
            name: "20 Mbit/s, 80 ms, 5 % loss",
            rate_mbit: Some(20.0),
            one_way_ms: 40,
            loss: 0.05,
            burst: None,
        },
        Condition {
            name: "20 Mbit/s, 80 ms, 10 % loss",
            rate_mbit: Some(20.0),
            one_way_ms: 40,
            loss: 0.10,
            burst: None,
        },
    ];
    let mut out = String::new();
    let _ = writeln!(out, "# udpvid benchmark\n");
    let _ = writeln!(
        out,
        "Command: `make bench` ({}). Machine: {} cores, {}. Clip: {CLIP_SECONDS} s 720p H.264 4 Mbit/s + AAC, MP4 {:.1} MiB (TS {:.1} MiB for SRT). Date: {}.\n",
        if quick { "BENCH_QUICK=1" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default(),
        env.mp4_size as f64 / 1048576.0,
        env.ts_size as f64 / 1048576.0,
        Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );

    // `BENCH_ONLY=seek` (or `start`, `slow`, `players`, `viewers`, `shaped`, `scale`, `pull`) runs just that table.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only == section;
    if run("start") {
        let _ = writeln!(
            out,
            "## First frame by container (20 Mbit/s, 80 ms RTT; median of {START_REPEATS}, peers taking turns)\n"
        );
        let _ = writeln!(
            out,
            "| file | HTTP ms | udpvid ms | udpvid − HTTP ms | RTTs sooner |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        let cond = conditions[1];
        for (file, what) in [
            ("bench.mp4", "MP4, moov at the end"),
            ("bench-faststart.mp4", "MP4, faststart"),
            ("bench.mkv", "Matroska, Cues at the end"),
        ] {
            let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            for rep in 0..START_REPEATS {
                for (i, peer) in [Peer::Http, Peer::Udpvid].into_iter().enumerate() {
                    let path = open_path(&env, peer, cond, 100 + rep as u64);
                    let uri = path.uri.replace("bench.mp4", file);
                    let p = play(&uri, peer, Duration::from_millis(1500), None);
                    if let Some(f) = p.first_frame {
                        times[i].push(f.as_secs_f64() * 1000.0);
                    }
                    eprint!(".");
                }
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied()
            };
            let (h, u) = (med(&mut times[0]), med(&mut times[1]));
            let cell = |v: Option<f64>| v.map_or("failed".into(), |v| format!("{v:.0}"));
            let (diff, rtts) = match (h, u) {
                (Some(h), Some(u)) => (format!("{:+.0}", u - h), format!("{:.1}", (h - u) / 80.0)),
                _ => ("–".into(), "–".into()),
            };
            let _ = writeln!(
                out,
                "| {what} | {} | {} | {diff} | {rtts} |",
                cell(h),
                cell(u)
            );
        }
        let _ = writeln!(out);
        if only == "start" {
            return stop_and_print(&out, env, udpvid, nginx);
        }
    }
    // Links slower than the media: an application that pauses on buffering
    // should wait once and then play to the end (issue "slow links").
    if run("slow") {
        let media_mbit = env.mp4_size as f64 * 8.0 / CLIP_SECONDS as f64 / 1e6;
        let _ = writeln!(
            out,
            "## Links slower than the media ({media_mbit:.2} Mbit/s), 80 ms RTT: the whole clip, an app that pauses on buffering\n"
        );
        let _ = writeln!(
            out,
            "| link | peer | first frame s | pauses after it | paused s | end reached after s | result |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for factor in [0.5, 0.75] {
            let name: &'static str = Box::leak(
                format!("{factor}× media ({:.2} Mbit/s)", media_mbit * factor).into_boxed_str(),
            );
            let cond = Condition {
                name,
                rate_mbit: Some(media_mbit * factor),
                one_way_ms: 40,
                loss: 0.0,
                burst: None,
            };
            for peer in [Peer::Http, Peer::Udpvid] {
                let path = open_path(&env, peer, cond, 7);
                let stop = Duration::from_secs(CLIP_SECONDS - 1);
                let p = play(&path.uri, peer, stop, None);
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} | {:.1} | {:.1} | {} |",
                    peer.name(),
                    p.first_frame
                        .map_or("–".into(), |f| format!("{:.1}", f.as_secs_f64())),
                    p.stalls,
                    p.stalled_for.as_secs_f64(),
                    p.wall.as_secs_f64(),
                    p.error.unwrap_or_else(|| "ok".into())
                );
                eprint!(".");
            }
        }
        let _ = writeln!(out);
        if only == "slow" {
            return stop_and_print(&out, env, udpvid, nginx);
        }
    }

    if run("players") {
        players_table(&mut out, &env);
        if only == "players" {
            return stop_and_print(&out, env, udpvid, nginx);
        }
    }
    if run("viewers") {
        viewers_table(&mut out);
        if only == "viewers" {
            return stop_and_print(&out, env, udpvid, nginx);
        }
    }
    if run("shaped") {
        shaped_pulls_table(&mut out);
        if only == "shaped" {
            return stop_and_print(&out, env, udpvid, nginx);
        }
    }
    if run("scale") {
        scale_out(&mut out, &env);
        if only == "scale" {
            return stop_and_print(&out, env, udpvid, nginx);
        }
    }

    if run("seek") {
        let _ = writeln!(
            out,
            "## Seek latency (request to first frame rendered after it; ten seeks while playing, to 20 s, 45 s, 5 s, then seven more)\n"
        );
        let _ = writeln!(
            out,
            "| condition | peer | seek 1 ms | seek 2 ms | seek 3 ms | median of 10 ms | slowest of 10 ms |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for cond in conditions
            .iter()
            .filter(|c| c.is_clean() || (c.rate_mbit.is_some() && c.loss == 0.0) || c.loss >= 0.1)
        {
            for peer in [Peer::Http, Peer::Udpvid] {
                if peer == Peer::Http && cond.is_lossy() {
                    continue;
                }
                let path = open_path(&env, peer, *cond, 4);
                let cells = match seek_latencies(&path.uri, peer) {
                    Ok(v) => {
                        let ms = |d: &Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
                        let mut sorted = v.clone();
                        sorted.sort();
                        let mut cells: Vec<String> = v.iter().take(3).map(ms).collect();
                        cells.push(sorted.get(sorted.len() / 2).map_or_else(String::new, ms));
                        cells.push(sorted.last().map_or_else(String::new, ms));
                        cells.join(" | ")
                    }
                    Err(e) => format!("failed: {e} | | | | "),
                };
                let _ = writeln!(out, "| {} | {} | {cells} |", cond.name, peer.name());
                eprint!(".");
            }
        }
        let _ = writeln!(out);
    }
    if only == "seek" {
        return stop_and_print(&out, env, udpvid, nginx);
    }

    if run("pull") {
        // 1. Full pull as fast as possible.
        let _ = writeln!(out, "## Full-file pull (as fast as possible)\n");
        let _ = writeln!(
            out,
            "Client CPU: this process's, less the HTTP relay's threads; the impairment proxy is a process of its own. \
             On the delayed paths HTTP's TCP ends at the relay on both sides, on loopback: its congestion control never \
             sees the round trip, so its row has no slow start (its time is the link's time for its bytes plus one round \
             trip), while udpvid's controller ramps up over the real round trip.\n"
        );
        let _ = writeln!(
            out,
            "| condition | peer | time s | ratio to HTTP | first byte ms | client CPU s/GB | server CPU s/GB |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        let long = env.clips.join(LONG_PULL_FILE);
        let long_name = format!(
            "loopback, {:.0} MiB file",
            std::fs::metadata(&long).map_or(0, |m| m.len()) as f64 / 1048576.0
        );
        let rows = conditions
            .iter()
            .map(|c| (*c, c.name.to_string(), "bench.mp4"))
            .chain([(conditions[0], long_name, LONG_PULL_FILE)]);
        for (cond, row_name, file) in rows {
            let mut http_time = None;
            // On loopback a pull takes tens of milliseconds, less than this
            // machine's noise: the median of several, the peers taking turns.
            let reps = match (cond.is_clean(), file) {
                (false, _) => 1,
                (true, LONG_PULL_FILE) => LONG_PULL_REPEATS,
                (true, _) => PULL_REPEATS,
            };
            let peers = [Peer::Http, Peer::Udpvid];
            let mut pulls: Vec<Vec<Result<Pull, String>>> =
                peers.iter().map(|_| Vec::new()).collect();
            for _ in 0..reps {
                for (i, peer) in peers.iter().enumerate() {
                    if *peer == Peer::Http && cond.is_lossy() {
                        continue;
                    }
                    if file == LONG_PULL_FILE {
                        warm_page_cache(&long);
                    }
                    let path = open_path(&env, *peer, cond, 1);
                    let uri = path.uri.replace("bench.mp4", file);
                    pulls[i].push(pull(&uri, &path.server_pid));
                }
            }
            for (peer, runs) in peers.into_iter().zip(pulls) {
                if peer == Peer::Http && cond.is_lossy() {
                    let _ = writeln!(
                        out,
                        "| {} | {} | n/a: a TCP relay cannot drop segments (see the kernel table) | | | | |",
                        row_name,
                        peer.name()
                    );
                    continue;
                }
                match median_pull(runs) {
                    Ok((p, fastest)) => {
                        let gb = p.bytes as f64 / 1e9;
                        if peer == Peer::Http {
                            http_time = Some((p.seconds, fastest));
                        }
                        let ratio = http_time.map_or("–".into(), |(h, h_fastest)| {
                            if reps > 1 {
                                format!("{:.2} (fastest {:.2})", p.seconds / h, fastest / h_fastest)
                            } else {
                                format!("{:.2}", p.seconds / h)
                            }
                        });
                        let _ = writeln!(
                            out,
                            "| {} | {} | {} | {} | {} | {:.1} | {:.1} |",
                            row_name,
                            peer.name(),
                            if reps > 1 {
                                format!("{:.3} (median of {reps}; fastest {fastest:.3})", p.seconds)
                            } else {
                                format!("{:.2}", p.seconds)
                            },
                            ratio,
                            ms(Some(p.first_byte)),
                            p.client_cpu / gb,
                            p.server_cpu / gb
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(
                            out,
                            "| {} | {} | failed: {e} | | | | |",
                            row_name,
                            peer.name()
                        );
                    }
                }
                eprint!(".");
            }
        }
    }
    if only == "pull" {
        return stop_and_print(&out, env, udpvid, nginx);
    }

    // 2. Stop after 10 s of real-time playback (and after pausing 30 s): waste.
    let _ = writeln!(
        out,
        "\n## Viewer stops after {} s of real-time playback\n",
        STOP_AFTER.as_secs()
    );
    let _ = writeln!(
        out,
        "Waste = bytes sent to the client (nftables counter on its port, IP bytes) minus the bytes of the media it played (file size × played / duration).\n"
    );
    let _ = writeln!(
        out,
        "| condition | peer | first byte ms | first frame ms | wire MiB | waste MiB | waste after 30 s pause MiB | waste ratio HTTP/peer |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    let waste_conditions: Vec<&Condition> = if quick {
        conditions.iter().take(2).collect()
    } else {
        conditions.iter().collect()
    };
    for cond in waste_conditions {
        let mut http_waste = None;
        for peer in [Peer::Http, Peer::Udpvid, Peer::UdpvidFixed, Peer::Srt] {
            if peer == Peer::Http && cond.is_lossy() {
                continue;
            }
            let size = if peer == Peer::Srt {
                env.ts_size
            } else {
                env.mp4_size
            };
            let mut cells = Vec::new();
            let mut first = (None, None);
            for pause in [None, Some(PAUSE_FOR)] {
                if pause.is_some() && (quick || !(cond.rate_mbit.is_some() && cond.loss == 0.0)) {
                    cells.push("–".to_string());
                    continue;
                }
                let path = open_path(&env, peer, *cond, 2);
                let before = env.wire.as_ref().map_or(0, |w| w.bytes(path.client_port));
                let p = play(&path.uri, peer, STOP_AFTER, pause);
                let wire = env.wire.as_ref().map_or(0, |w| w.bytes(path.client_port)) - before;
                let played = size as f64 * p.position.as_secs_f64() / CLIP_SECONDS as f64;
                let waste = wire as f64 - played;
                if pause.is_none() {
                    first = (p.first_byte, p.first_frame);
                    cells.push(mib(wire as f64));
                    if peer == Peer::Http {
                        http_waste = Some(waste);
                    }
                }
                cells.push(match &p.error {
                    Some(e) => format!("failed: {e}"),
                    None => mib(waste),
                });
                if pause.is_none() {
                    cells.push(String::new());
                }
                eprint!(".");
            }
            // cells: wire, waste, "", pause-waste
            let wire = cells.first().cloned().unwrap_or_default();
            let waste = cells.get(1).cloned().unwrap_or_default();
            let paused = cells.get(3).cloned().unwrap_or_default();
            let ratio = match (http_waste, waste.parse::<f64>()) {
                (Some(h), Ok(w)) if peer != Peer::Http && w > 0.0 => {
                    format!("{:.1}×", h / 1048576.0 / w)
                }
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {wire} | {waste} | {paused} | {ratio} |",
                cond.name,
                peer.name(),
                ms(first.0),
                ms(first.1)
            );
        }
    }

    // 3. Stalls during real-time playback of the whole clip.
    let watch = if quick {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(CLIP_SECONDS - 1)
    };
    let _ = writeln!(
        out,
        "\n## Stalls during {} s of real-time playback\n",
        watch.as_secs()
    );
    let _ = writeln!(
        out,
        "| condition | peer | stalls | stalled s | first frame ms | result |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    // Bursts of loss (Gilbert-Elliott, 3 %, eight packets on average) are
    // the other bad network the issue names; only for this table.
    let bursty = Condition {
        name: "20 Mbit/s, 80 ms, 3 % burst loss",
        rate_mbit: Some(20.0),
        one_way_ms: 40,
        loss: 0.0,
        burst: Some((0.03, 8.0)),
    };
    let stall_conditions: Vec<Condition> = conditions
        .iter()
        .filter(|c| c.rate_mbit.is_some() && (c.loss == 0.0 || c.loss >= 0.1))
        .copied()
        .chain(std::iter::once(bursty))
        .collect();
    for cond in &stall_conditions {
        for peer in [Peer::Http, Peer::Udpvid, Peer::UdpvidFixed, Peer::Srt] {
            if peer == Peer::Http && cond.is_lossy() {
                continue;
            }
            let path = open_path(&env, peer, *cond, 3);
            let p = play(&path.uri, peer, watch, None);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} | {} | {} |",
                cond.name,
                peer.name(),
                p.stalls,
                p.stalled_for.as_secs_f64(),
                ms(p.first_frame),
                p.error.unwrap_or_else(|| "ok".into())
            );
            eprint!(".");
        }
    }

    // 4. Kernel drops (nftables in a namespace; no delay).
    let _ = writeln!(
        out,
        "\n## Full pull with kernel packet drops (nftables in a network namespace, no added delay)\n"
    );
    let _ = writeln!(out, "| drop % | HTTP s | udpvid s | udpvid / HTTP |");
    let _ = writeln!(out, "|---|---|---|---|");
    for percent in [0u32, 1, 5, 10] {
        let h = kernel_loss_pull(&env, percent, true);
        let u = kernel_loss_pull(&env, percent, false);
        let fmt = |r: &Result<f64, String>| {
            r.as_ref()
                .map_or_else(|e| format!("failed: {e}"), |s| format!("{s:.2}"))
        };
        let ratio = match (&h, &u) {
            (Ok(h), Ok(u)) => format!("{:.2}", u / h),
            _ => "–".into(),
        };
        let _ = writeln!(out, "| {percent} | {} | {} | {ratio} |", fmt(&h), fmt(&u));
        eprint!(".");
    }
    eprintln!();
    stop_and_print(&out, env, udpvid, nginx);
    let results = bench_dir.join("results.md");
    if let Ok(mut f) = std::fs::File::create(&results) {
        let _ = f.write_all(out.as_bytes());
        eprintln!("written to {}", results.display());
    }
}
