//! `make load`: hundreds of concurrent clients against the release server
//! on loopback, pulling different and identical files, while others
//! misbehave: some never acknowledge, some acknowledge garbage, some flood
//! the port with junk. Part of the well-behaved clients are real element
//! pipelines (`gst-launch-1.0 udpvidsrc ! filesink`, which pauses on
//! buffering as applications do): the freezes of issue 9 showed only
//! through the element. Every well-behaved client must finish byte-exact.
//! Prints server CPU, peak memory, throughput and each pipeline's time.
//! Bounded in clients, datagrams and time.
//!
//! ```text
//! cargo run --release --example load -- [CLIENTS] [FILE_MIB] [PIPELINES]
//! cargo run --release --example load -- viewers [N] [MBIT] [SECONDS] [udpvid|udpvid-threads|http]
//! cargo run --release --example load -- paced [N] [TOTAL_MBIT] [FILE_MIB] [RTT_MS]
//! cargo run --release --example load -- paused [N] [SECONDS]
//! cargo run --release --example load -- shaped [N] [TOTAL_MBIT] [FILE_MIB] [udpvid|http]
//! ```
//!
//! `paced`: N pulls as fast as they can through one bottleneck of
//! TOTAL_MBIT (the impairment proxy's rate cap, shared, with a 512 KB
//! queue) and RTT_MS of round trip (0 by default), so congestion control
//! paces every session: the server's CPU per GB when it is the pacer, not
//! the loopback. The proxy's count of the server's datagrams, against
//! those the files need, shows what resends cost.
//!
//! `viewers` is the other shape of load: N viewers that consume in real
//! time at MBIT each (with the element's adaptive read-ahead), as people
//! watching do, instead of pulling as fast as they can. It reports the
//! server's CPU per GB, its wake-ups per second, its memory, and the
//! viewers' stalls. The udpvid viewers all run on one thread
//! (`LOAD_VIEWER_THREADS` for more; `examples/support/evented_viewers.rs`),
//! arriving over a second (`LOAD_ARRIVAL_SECONDS`); `udpvid-threads` gives
//! each a thread and a `BlockingClient`, which costs more than the server
//! from 300 viewers on. With `http` the same viewers read from nginx (one
//! worker), the peer a user would pick instead; `make bench` runs both.
//!
//! `shaped`: as `paced`, through a `tc tbf` in a network namespace instead
//! of the proxy, so that nginx can be measured through the same queue
//! (`examples/support/shaped_pulls.rs`; needs root).
//!
//! `paused`: N viewers preroll and then pause; what thousands of paused
//! sessions cost the server (CPU, wake-ups, memory, datagrams each).
//!
//! `LOAD_SERVER_CPUS` and `LOAD_VIEWER_CPUS` (core lists, `0` or `0,1`)
//! pin the server (or nginx) and this process: "one server core" is then
//! one core, and the generator's work never lands on it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gstudpvid::blocking_client::BlockingClient;
use gstudpvid::protocol::ClientConfig;
use gstudpvid::protocol::read_ahead::ReadAhead;
use gstudpvid::protocol::wire::{
    AckRange, Body, DEFAULT_MAX_PAYLOAD, OpenRequest, Packet, TransferKind,
};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

#[path = "../benches/common/cpu_affinity.rs"]
mod cpu_affinity;
#[path = "../benches/common/cpu_quota.rs"]
mod cpu_quota;
#[path = "support/evented_viewers.rs"]
mod evented_viewers;
#[path = "../benches/common/impair_report.rs"]
mod impair_report;
#[path = "../benches/common/metrics_scrape.rs"]
mod metrics_scrape;
#[path = "../benches/common/nginx.rs"]
mod nginx;
#[path = "../benches/common/proc_stat.rs"]
mod proc_stat;
#[path = "../benches/common/shaped_link.rs"]
mod shaped_link;
#[path = "support/shaped_pulls.rs"]
mod shaped_pulls;
use proc_stat::cpu_seconds_of;

const FILES: usize = 4;
const NEVER_ACK: usize = 20;
const GARBAGE_ACK: usize = 20;
const FLOODERS: usize = 10;
const FLOOD_DATAGRAMS: usize = 20_000;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
const LIMIT: Duration = Duration::from_secs(300);

fn proc_value(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(format!("/proc/{pid}/stat"))
}

/// Handshake on a raw socket; returns the connection id.
fn raw_connect(sock: &UdpSocket, server: &str, nonce: u64) -> Option<u64> {
    sock.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = [0u8; 2048];
    let mut cookie = Vec::new();
    for _ in 0..4 {
        let hello = Packet::new(
            0,
            0,
            Body::Hello {
                client_nonce: nonce,
                cookie: cookie.clone(),
                wants_auth: false,
                early_open: None,
                max_datagram: None,
            },
        )
        .encode();
        sock.send_to(&hello, server).ok()?;
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        match Packet::decode(&buf[..n]).ok()? {
            Packet {
                body: Body::Retry { cookie: c, .. },
                ..
            } => cookie = c,
            Packet {
                connection_id,
                body: Body::Welcome { .. },
                ..
            } => return Some(connection_id),
            _ => return None,
        }
    }
    None
}

fn open(sock: &UdpSocket, server: &str, id: u64, path: &str) {
    let p = Packet::new(
        id,
        1,
        Body::Open(OpenRequest {
            transfer_id: 1,
            kind: TransferKind::File,
            offset: 0,
            window: 8 << 20,
            path: path.into(),
        }),
    );
    let _ = sock.send_to(&p.encode(), server);
}

/// One `gst-launch-1.0 udpvidsrc ! filesink` process.
struct ElementPull {
    child: Child,
    index: usize,
    file: usize,
    out: std::path::PathBuf,
    started: Instant,
    took: Option<Duration>,
    status: Option<std::process::ExitStatus>,
}

impl ElementPull {
    fn start(plugin_dir: &Path, port: u16, dir: &Path, file: usize, index: usize) -> ElementPull {
        let out = dir.join(format!("pull-{index}.out"));
        let child = Command::new("gst-launch-1.0")
            .args([
                "-q",
                "udpvidsrc",
                &format!("port={port}"),
                &format!("file=f{file}.bin"),
                "timeout=20",
                "!",
                "filesink",
                &format!("location={}", out.display()),
            ])
            .env("GST_PLUGIN_PATH", plugin_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gst-launch-1.0 runs (gstreamer1.0-tools)");
        ElementPull {
            child,
            index,
            file,
            out,
            started: Instant::now(),
            took: None,
            status: None,
        }
    }

    fn poll(&mut self) {
        if self.took.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.took = Some(self.started.elapsed());
                self.status = Some(status);
            }
        }
    }

    /// Its time and bytes, or why it failed (a pipeline still running at
    /// the limit froze).
    fn finish(&mut self, digests: &[Vec<u8>], file_mib: usize) -> Result<(Duration, u64), String> {
        self.poll();
        let Some(took) = self.took else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let got = std::fs::metadata(&self.out).map_or(0, |m| m.len());
            return Err(format!(
                "pipeline {}: froze at {got} of {} bytes",
                self.index,
                file_mib << 20
            ));
        };
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        if !self.status.is_some_and(|s| s.success()) {
            return Err(format!("pipeline {}: {}", self.index, stderr.trim()));
        }
        let data = std::fs::read(&self.out).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&self.out);
        if Sha256::digest(&data).to_vec() != digests[self.file] {
            return Err(format!(
                "pipeline {}: f{}.bin differs",
                self.index, self.file
            ));
        }
        Ok((took, data.len() as u64))
    }
}

/// The release server next to this example, on a free loopback port,
/// with limits out of the way; returns it, its path and its port.
/// Starts the release server on `dir` for up to `max_sessions` sessions (all
/// from this one address).
fn start_server(dir: &Path, max_sessions: usize) -> (Child, std::path::PathBuf, u16) {
    start_server_at(dir, max_sessions, "127.0.0.1", None, None)
}

/// [`start_server`] bound to `bind`, inside network namespace `netns` if
/// given (`ip netns exec` becomes the server: its pid is the server's),
/// with its metrics page at `metrics` if given.
fn start_server_at(
    dir: &Path,
    max_sessions: usize,
    bind: &str,
    netns: Option<&str>,
    metrics: Option<&str>,
) -> (Child, std::path::PathBuf, u16) {
    let max_sessions = max_sessions.to_string();
    let exe = std::env::current_exe().expect("exe");
    let server_bin = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("profile dir")
        .join("server");
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&server_bin);
            c
        }
        None => Command::new(&server_bin),
    };
    if let Some(cpus) = cpu_affinity::cpus_from_env("LOAD_SERVER_CPUS") {
        cpu_affinity::pin_command(&mut command, cpus);
    }
    hold_to_quota(&mut command);
    let mut server = command
        .arg("--dir")
        .arg(dir)
        .args([
            "--bind",
            bind,
            "--port",
            "0",
            "--max-sessions",
            &max_sessions,
            "--max-sessions-per-address",
            &max_sessions,
            "--threads",
            &server_threads(),
        ])
        // LOAD_SERVER_METRICS=ADDR:PORT: the server's metrics page there
        // (inside the namespace for `shaped`), to read its counters mid-run.
        .args(
            metrics
                .map(str::to_string)
                .or_else(|| std::env::var("LOAD_SERVER_METRICS").ok())
                .map(|a| vec!["--metrics".to_string(), a])
                .unwrap_or_default(),
        )
        .env(
            "UDPVID_LOG",
            std::env::var("LOAD_SERVER_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        // LOAD_SERVER_LOG=FILE keeps the server's log, to see why a
        // session failed under load.
        .stderr(match std::env::var_os("LOAD_SERVER_LOG") {
            Some(path) => std::fs::File::create(path)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
            None => Stdio::null(),
        })
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", server_bin.display()));
    // "udpvid server listening on 127.0.0.1:PORT, serving DIR"
    let port = banner_port(&mut server, 4);
    (server, server_bin, port)
}

/// The cgroups holding this run's servers (see [`hold_to_quota`]),
/// removed when `main` returns, once the servers are gone.
static QUOTAS: std::sync::Mutex<Vec<cpu_quota::CpuQuota>> = std::sync::Mutex::new(Vec::new());

/// `LOAD_SERVER_QUOTA=CORES`: the server is held to CORES of CPU time per
/// serving thread (a cgroup CPU quota; needs root), so that one and two
/// serving threads can be compared on a machine whose other core runs the
/// generator.
fn hold_to_quota(command: &mut Command) {
    let Ok(value) = std::env::var("LOAD_SERVER_QUOTA") else {
        return;
    };
    let cores: f64 = match value.parse() {
        Ok(c) if c > 0.0 => c,
        _ => panic!("LOAD_SERVER_QUOTA={value}: a share of a core, such as 0.1"),
    };
    // `--threads 0` is one per core.
    let threads = match server_threads().parse::<usize>() {
        Ok(0) | Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        Ok(t) => t,
    } as f64;
    let name = format!("udpvid-load-{}", std::process::id());
    let quota = cpu_quota::CpuQuota::new(&name, cores * threads)
        .unwrap_or_else(|e| panic!("LOAD_SERVER_QUOTA: {e}"));
    quota.hold(command);
    QUOTAS.lock().unwrap_or_else(|e| e.into_inner()).push(quota);
}

/// The port in the first line a child printed, the address being word
/// `word` (`ADDR:PORT,`).
fn banner_port(child: &mut Child, word: usize) -> u16 {
    let mut banner = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut banner)
        .expect("banner");
    banner
        .split_whitespace()
        .nth(word)
        .and_then(|a| a.trim_end_matches(',').rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in the banner {banner:?}"))
}

/// The server's rows of a table: CPU per GB delivered and wake-ups.
fn print_server_cost(cpu: f64, gb: f64, wake: u64, elapsed: Duration, per_thread: &[f64]) {
    // nginx's threads are not named as the udpvid server's are.
    if !per_thread.is_empty() {
        let each: Vec<String> = per_thread.iter().map(|c| format!("{c:.2}")).collect();
        println!(
            "| server threads | {} (CPU s each: {}) |",
            server_threads(),
            each.join(", ")
        );
    }
    println!(
        "| server CPU | {cpu:.2} s ({:.2} s per GB) |",
        cpu / gb.max(1e-9)
    );
    println!(
        "| server wake-ups | {:.0} per second |",
        wake as f64 / elapsed.as_secs_f64()
    );
}

/// The threads of a process.
fn tasks(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Context switches of a process so far, all its threads: its wake-ups.
fn wakeups(pid: u32) -> u64 {
    tasks(pid)
        .into_iter()
        .map(|t| {
            let file = format!("task/{t}/status");
            proc_value(pid, &file, "voluntary_ctxt_switches:").unwrap_or(0)
                + proc_value(pid, &file, "nonvoluntary_ctxt_switches:").unwrap_or(0)
        })
        .sum()
}

/// CPU seconds of each serving thread (named `server` and `serve-N`), so
/// the table shows whether the load spread over cores.
fn serving_thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut cpu: Vec<(String, f64)> = tasks(pid)
        .into_iter()
        .filter_map(|t| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm")).ok()?;
            let name = name.trim().to_string();
            (name == "server" || name.starts_with("serve-"))
                .then(|| (name, cpu_seconds_of(format!("/proc/{pid}/task/{t}/stat"))))
        })
        .collect();
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    cpu
}

/// What the server process has spent so far: CPU, wake-ups, and CPU by
/// serving thread.
struct ServerCost {
    cpu: f64,
    wakeups: u64,
    per_thread: Vec<f64>,
}

impl ServerCost {
    fn sample(pid: u32) -> Self {
        ServerCost {
            cpu: cpu_seconds(pid),
            wakeups: wakeups(pid),
            per_thread: serving_thread_cpu(pid)
                .into_iter()
                .map(|(_, c)| c)
                .collect(),
        }
    }

    /// What was spent between `before` and this sample (threads are the
    /// same, in the same order: they live as long as the server).
    fn since(&self, before: &ServerCost) -> ServerCost {
        ServerCost {
            cpu: self.cpu - before.cpu,
            wakeups: self.wakeups.saturating_sub(before.wakeups),
            per_thread: self
                .per_thread
                .iter()
                .enumerate()
                .map(|(i, c)| c - before.per_thread.get(i).copied().unwrap_or(0.0))
                .collect(),
        }
    }
}

/// The busiest serving thread's share of all serving threads' CPU, in
/// percent ("-" for a server whose threads are not named as udpvid's):
/// with N threads near 100/N, the load spread evenly, and a server of N
/// cores carries N times what one carries at the same CPU per GB.
fn busiest_thread_share(per_thread: &[f64]) -> String {
    let total: f64 = per_thread.iter().sum();
    let busiest = per_thread.iter().copied().fold(0.0, f64::max);
    if per_thread.is_empty() || total <= 0.0 {
        return "-".to_string();
    }
    format!("{:.0}", 100.0 * busiest / total)
}

/// Serving threads the load generator asks the server for
/// (`LOAD_SERVER_THREADS`, default 1: figures per core).
fn server_threads() -> String {
    std::env::var("LOAD_SERVER_THREADS").unwrap_or_else(|_| "1".into())
}

/// What one real-time viewer saw.
#[derive(Default)]
struct ViewerReport {
    bytes: u64,
    stalls: u32,
    stalled: Duration,
    /// When each stall ended.
    stall_ends: Vec<Instant>,
    /// The largest read-ahead the viewer's client chose: a viewer that
    /// took its link for slower than the media opened it to the maximum.
    peak_read_ahead: u64,
    error: Option<String>,
    /// `load paused`: how long the viewer stayed paused, and the datagrams
    /// it sent and received meanwhile.
    paused_for: Duration,
    paused_packets: (u64, u64),
}

/// The server a viewer load runs against.
#[derive(Clone, Copy, PartialEq)]
enum ViewerPeer {
    /// The udpvid server, viewers all driven from one thread
    /// (`evented_viewers`: the protocol core with the element's adaptive
    /// read-ahead).
    Udpvid,
    /// The udpvid server, each viewer a thread with a `BlockingClient` (the
    /// element's client, and its network thread): the first generator,
    /// which needs more than a core of its own from about 300 viewers.
    UdpvidThreads,
    /// nginx with one worker, viewers reading an HTTP response in real
    /// time: what a progressive-download player does, its read-ahead being
    /// the socket buffers TCP fills.
    Http,
}

impl ViewerPeer {
    fn name(self) -> &'static str {
        match self {
            ViewerPeer::Udpvid => "udpvid",
            ViewerPeer::UdpvidThreads => "udpvid-threads",
            ViewerPeer::Http => "http",
        }
    }
}

/// Plays `file` (whose bytes are `data`) in real time at `rate` bytes/s
/// for `length`: after a second of preroll, the bytes due by the playback
/// clock are read every 100 ms; a read that waits longer than a tick is a
/// stall (the player's queues would have run dry), and the clock stops
/// while it waits. Every byte is compared with the file.
fn view(
    peer: ViewerPeer,
    port: u16,
    file: &str,
    data: &[u8],
    rate: f64,
    length: Duration,
) -> ViewerReport {
    let mut report = ViewerReport::default();
    let result = match peer {
        // Driven from one thread by `evented_viewers::run` instead.
        ViewerPeer::Udpvid => Err("not a thread-per-viewer peer".into()),
        ViewerPeer::UdpvidThreads => (|| -> Result<(), String> {
            let client = BlockingClient::connect_and_open(
                "127.0.0.1",
                port,
                ClientConfig::default(),
                file,
                0,
            )
            .map_err(|e| e.to_string())?;
            let opened = client
                .open(file, 0, CLIENT_TIMEOUT)
                .map_err(|e| e.to_string())?;
            if opened.size != data.len() as u64 {
                return Err(format!("size {} != {}", opened.size, data.len()));
            }
            let result = play_in_real_time(data, rate, length, &mut report, |offset, wanted| {
                let chunk = client
                    .read_at(offset, wanted, CLIENT_TIMEOUT)
                    .map_err(|e| format!("at {offset}: {e}"))?;
                same_bytes(data, offset, &chunk)
            });
            client.close();
            result
        })(),
        ViewerPeer::Http => (|| -> Result<(), String> {
            let mut stream = http_get("127.0.0.1", port, file, CLIENT_TIMEOUT)?;
            play_in_real_time(data, rate, length, &mut report, |offset, wanted| {
                let mut chunk = vec![0; wanted];
                stream
                    .read_exact(&mut chunk)
                    .map_err(|e| format!("at {offset}: {e}"))?;
                same_bytes(data, offset, &chunk)
            })
        })(),
    };
    report.error = result.err();
    report
}

/// The real-time consumer of [`view`]: `read(offset, wanted)` returns how
/// many bytes it got.
fn play_in_real_time(
    data: &[u8],
    rate: f64,
    length: Duration,
    report: &mut ViewerReport,
    mut read: impl FnMut(u64, usize) -> Result<usize, String>,
) -> Result<(), String> {
    const TICK: Duration = Duration::from_millis(100);
    let size = data.len() as u64;
    let preroll = (rate as u64).min(size);
    let mut offset = 0;
    while offset < preroll {
        offset += read(offset, (preroll - offset) as usize)? as u64;
    }
    let mut played = Duration::ZERO;
    let mut next = Instant::now() + TICK;
    while played < length && offset < size {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        played += TICK;
        let due = ((played.as_secs_f64() + 1.0) * rate) as u64;
        let wanted = due.min(size).saturating_sub(offset) as usize;
        let asked = Instant::now();
        if wanted > 0 {
            let got = read(offset, wanted)?;
            if got == 0 {
                return Err(format!("end of stream at {offset} of {size}"));
            }
            offset += got as u64;
        }
        let waited = asked.elapsed();
        if waited > TICK {
            report.stalls += 1;
            report.stalled += waited;
            report.stall_ends.push(Instant::now());
            next = Instant::now() + TICK;
        } else {
            next += TICK;
        }
    }
    report.bytes = offset;
    Ok(())
}

/// The stalls counted in each 5 s since the load `started`: whether the
/// viewers stalled only while they arrived, or the server never caught up.
fn stalls_over_time(reports: &[ViewerReport], started: Instant) -> String {
    const SPAN: u64 = 5;
    let mut counts: Vec<u32> = Vec::new();
    for end in reports.iter().flat_map(|r| &r.stall_ends) {
        let k = (end.saturating_duration_since(started).as_secs() / SPAN) as usize;
        if counts.len() <= k {
            counts.resize(k + 1, 0);
        }
        counts[k] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(k, c)| format!("{}-{} s: {c}", k as u64 * SPAN, (k as u64 + 1) * SPAN))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `chunk`'s length if it is the file's bytes at `offset`.
fn same_bytes(data: &[u8], offset: u64, chunk: &[u8]) -> Result<usize, String> {
    let start = offset as usize;
    match data.get(start..start + chunk.len()) {
        Some(expected) if expected == chunk => Ok(chunk.len()),
        _ => Err(format!("wrong bytes at {offset}")),
    }
}

/// Sends a GET for `file` to `host:port` and reads the response head; the
/// stream is left at the first byte of the body, its reads waiting up to
/// `timeout`.
fn http_get(
    host: &str,
    port: u16,
    file: &str,
    timeout: Duration,
) -> Result<std::net::TcpStream, String> {
    let mut stream = std::net::TcpStream::connect((host, port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /{file} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    // Byte by byte, so that nothing of the body is read into a buffer
    // here: the rest is read at the viewer's pace.
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err("response head too long".into());
        }
        stream.read_exact(&mut byte).map_err(|e| e.to_string())?;
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head);
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "HTTP answered {:?}",
            status.lines().next().unwrap_or("")
        ));
    }
    Ok(stream)
}

/// A fresh directory `udpvid-{name}-PID` holding [`FILES`] files of `size`
/// random bytes (seeded), `f{i}.bin`, and their bytes, which the viewers
/// check what they receive against.
fn viewers_files(name: &str, size: usize, seed: u64) -> (std::path::PathBuf, Arc<Vec<Vec<u8>>>) {
    let dir = std::env::temp_dir().join(format!("udpvid-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("viewers dir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let files = (0..FILES)
        .map(|i| {
            let data: Vec<u8> = (0..size).map(|_| rng.r#gen()).collect();
            std::fs::write(dir.join(format!("f{i}.bin")), &data).expect("write");
            data
        })
        .collect();
    (dir, Arc::new(files))
}

fn viewers(mut args: impl Iterator<Item = String>) -> ExitCode {
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let mbit: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4.0);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let peer = match args.next().as_deref() {
        None | Some("udpvid") => ViewerPeer::Udpvid,
        Some("udpvid-threads") => ViewerPeer::UdpvidThreads,
        Some("http") => ViewerPeer::Http,
        Some(other) => {
            eprintln!("unknown peer {other:?}: udpvid, udpvid-threads or http");
            return ExitCode::FAILURE;
        }
    };
    let rate = mbit * 1e6 / 8.0;
    let length = Duration::from_secs(seconds);
    let size = (rate * (seconds as f64 + 5.0)) as usize;
    let (dir, files) = viewers_files("viewers", size, 2);
    let (mut server, port) = match peer {
        ViewerPeer::Udpvid | ViewerPeer::UdpvidThreads => {
            let (server, _, port) = start_server(&dir, 2000);
            (server, port)
        }
        // A connection per viewer, and some to spare.
        ViewerPeer::Http => nginx::start(
            &dir,
            &dir.join("nginx"),
            n + 16,
            cpu_affinity::cpus_from_env("LOAD_SERVER_CPUS"),
        ),
    };
    let pid = server.id();
    let rss0 = proc_value(pid, "status", "VmRSS:").unwrap_or(0);
    let before = ServerCost::sample(pid);
    let client_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    // The evented generator's longest timer lag, once it is done.
    let lag = Arc::new(AtomicU64::new(u64::MAX));
    let handles: Vec<std::thread::JoinHandle<Vec<ViewerReport>>> = if peer == ViewerPeer::Udpvid {
        let files = files.clone();
        let server_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let lag = lag.clone();
        vec![std::thread::spawn(move || {
            let threads = std::env::var("LOAD_VIEWER_THREADS")
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(1);
            let run = evented_viewers::run(
                n,
                threads,
                server_addr,
                files,
                rate,
                length,
                evented_viewers::Mode::Play,
            );
            lag.store(run.longest_lag.as_millis() as u64, Ordering::Relaxed);
            run.reports
        })]
    } else {
        (0..n)
            .map(|i| {
                let files = files.clone();
                let h = std::thread::spawn(move || {
                    let file = format!("f{}.bin", i % FILES);
                    vec![view(peer, port, &file, &files[i % FILES], rate, length)]
                });
                // Arrivals spread over a second.
                std::thread::sleep(Duration::from_millis(1000 / n.max(1) as u64));
                h
            })
            .collect()
    };
    let mut peak_rss = 0;
    while !handles.iter().all(|h| h.is_finished()) && started.elapsed() < LIMIT {
        peak_rss = peak_rss.max(proc_value(pid, "status", "VmRSS:").unwrap_or(0));
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = started.elapsed();
    let ServerCost {
        cpu,
        wakeups: wake,
        per_thread,
    } = ServerCost::sample(pid).since(&before);
    let client_cpu = cpu_seconds(std::process::id()) - client_before;
    let reports: Vec<ViewerReport> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    let failed: Vec<&String> = reports.iter().filter_map(|r| r.error.as_ref()).collect();
    let stalls: u32 = reports.iter().map(|r| r.stalls).sum();
    let stalled: Duration = reports.iter().map(|r| r.stalled).sum();
    let stalled_viewers = reports.iter().filter(|r| r.stalls > 0).count();
    let gb = bytes as f64 / 1e9;
    let per_session_kib = peak_rss.saturating_sub(rss0) as f64 / n.max(1) as f64;
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| viewers | {n} at {mbit} Mbit/s for {seconds} s from {} (real time, every byte checked) |",
        match peer {
            ViewerPeer::Udpvid => "udpvid (adaptive read-ahead, all viewers on one thread)",
            ViewerPeer::UdpvidThreads => "udpvid (adaptive read-ahead, a thread per viewer)",
            ViewerPeer::Http => "nginx, one worker (TCP's socket buffers as read-ahead)",
        }
    );
    println!("| finished | {} |", n - failed.len());
    println!(
        "| stalls | {stalls} ({:.1} s in all; {stalled_viewers} viewers stalled) |",
        stalled.as_secs_f64(),
    );
    println!(
        "| delivered | {:.1} MB in {:.1} s |",
        bytes as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    if stalls > 0 {
        println!(
            "| stalls over time | {} |",
            stalls_over_time(&reports, started)
        );
    }
    if peer == ViewerPeer::Udpvid {
        let mut peaks: Vec<u64> = reports.iter().map(|r| r.peak_read_ahead).collect();
        peaks.sort_unstable();
        let mib = |k: usize| peaks.get(k).map_or(0.0, |&p| p as f64 / 1048576.0);
        println!(
            "| viewers' largest read-ahead | median {:.1} MiB, 90th percentile {:.1}, largest {:.1} |",
            mib(peaks.len() / 2),
            mib(peaks.len() * 9 / 10),
            mib(peaks.len().saturating_sub(1)),
        );
    }
    print_server_cost(cpu, gb, wake, elapsed, &per_thread);
    println!(
        "| server memory | peak RSS {:.1} MiB, {per_session_kib:.0} KiB per session above idle |",
        peak_rss as f64 / 1024.0,
    );
    println!(
        "| viewers' CPU (this process) | {client_cpu:.2} s ({:.2} s per GB) |",
        client_cpu / gb.max(1e-9)
    );
    let lag_ms = lag.load(Ordering::Relaxed);
    if lag_ms != u64::MAX {
        println!(
            "| the viewers' threads' longest timer lag | {lag_ms} ms (stalls while it is near a tick, 100 ms, are the generator's) |"
        );
    }
    // One line for the benchmark to read.
    println!(
        "viewers-result peer={} n={n} finished={} stalls={stalls} stalled_viewers={stalled_viewers} \
         server_cpu_per_gb={:.3} wakeups_per_s={:.0} kib_per_session={per_session_kib:.0} \
         client_cpu_per_gb={:.3} generator_lag_ms={} busiest_thread_share={}",
        peer.name(),
        n - failed.len(),
        cpu / gb.max(1e-9),
        wake as f64 / elapsed.as_secs_f64(),
        client_cpu / gb.max(1e-9),
        if lag_ms == u64::MAX {
            "-".to_string()
        } else {
            lag_ms.to_string()
        },
        busiest_thread_share(&per_thread),
    );
    for e in failed.iter().take(10) {
        eprintln!("{e}");
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `load paused N SECONDS`: N viewers preroll a second of a 4 Mbit/s file
/// and then pause for SECONDS, as a user who pressed pause does. Measures
/// what the paused sessions cost the server while all of them are paused
/// and their windows are full (the second half of the pause: 2000 windows
/// of 1 MB take the server seconds to fill): CPU, wake-ups, memory, and
/// the datagrams each exchanges (its keepalives and RTT pings, and their
/// answers).
fn paused(mut args: impl Iterator<Item = String>) -> ExitCode {
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    let arrivals = evented_viewers::arrivals_over();
    let length = Duration::from_secs(seconds);
    let settle = length / 2;
    if settle < arrivals + Duration::from_secs(3) {
        eprintln!("SECONDS must be at least twice the arrivals ({arrivals:?}) and 3 s");
        return ExitCode::FAILURE;
    }
    let rate = 4e6 / 8.0;
    // Larger than the preroll and the first read-ahead (1.5 MB), so that
    // every paused session holds a full window.
    let (dir, files) = viewers_files("paused", 4 << 20, 3);
    let (mut server, _, port) = start_server(&dir, n + 16);
    let pid = server.id();
    let rss_idle = proc_value(pid, "status", "VmRSS:").unwrap_or(0);
    let started = Instant::now();
    let server_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let viewers = {
        let files = files.clone();
        std::thread::spawn(move || {
            evented_viewers::run(
                n,
                1,
                server_addr,
                files,
                rate,
                length,
                evented_viewers::Mode::Pause { settle },
            )
        })
    };
    // Everyone arrived, prerolled, paused and has a full window...
    std::thread::sleep((started + arrivals + settle).saturating_duration_since(Instant::now()));
    let before = ServerCost::sample(pid);
    let measured_from = Instant::now();
    let rss = proc_value(pid, "status", "VmRSS:").unwrap_or(0);
    // ...until the first of them resumes (its pause began after it arrived).
    std::thread::sleep(
        (started + length - Duration::from_millis(500)).saturating_duration_since(Instant::now()),
    );
    let cost = ServerCost::sample(pid).since(&before);
    let measured = measured_from.elapsed();
    let run = viewers.join().unwrap_or_else(|_| evented_viewers::Run {
        reports: Vec::new(),
        longest_lag: Duration::ZERO,
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let failed: Vec<&String> = run
        .reports
        .iter()
        .filter_map(|r| r.error.as_ref())
        .collect();
    let paused: Vec<&ViewerReport> = run
        .reports
        .iter()
        .filter(|r| r.error.is_none() && !r.paused_for.is_zero())
        .collect();
    let packets: u64 = paused
        .iter()
        .map(|r| r.paused_packets.0 + r.paused_packets.1)
        .sum();
    let paused_seconds: f64 = paused.iter().map(|r| r.paused_for.as_secs_f64()).sum();
    let core_share = cost.cpu / measured.as_secs_f64();
    let per_session_kib = rss.saturating_sub(rss_idle) as f64 / n.max(1) as f64;
    let datagrams_per_session_s = packets as f64 / paused_seconds.max(1e-9);
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| paused viewers | {n}, each paused after a second of a 4 Mbit/s file, for {seconds} s |"
    );
    println!("| paused to the end | {} |", paused.len());
    println!(
        "| server CPU while all were paused | {:.3} s in {:.1} s: {:.2} % of a core ({:.3} % per 1000 sessions) |",
        cost.cpu,
        measured.as_secs_f64(),
        core_share * 100.0,
        core_share * 100.0 * 1000.0 / n.max(1) as f64,
    );
    println!(
        "| server wake-ups | {:.0} per second |",
        cost.wakeups as f64 / measured.as_secs_f64()
    );
    println!(
        "| server memory | RSS {:.1} MiB, {per_session_kib:.0} KiB per paused session above idle |",
        rss as f64 / 1024.0
    );
    let sent: u64 = paused.iter().map(|r| r.paused_packets.0).sum();
    println!(
        "| datagrams per paused session | {datagrams_per_session_s:.2} per second, both ways ({:.2} from the viewer) |",
        sent as f64 / paused_seconds.max(1e-9)
    );
    println!(
        "paused-result n={n} paused={} core_percent={:.3} core_percent_per_1000={:.3} \
         wakeups_per_s={:.0} kib_per_session={per_session_kib:.0} datagrams_per_session_s={datagrams_per_session_s:.3}",
        paused.len(),
        core_share * 100.0,
        core_share * 100.0 * 1000.0 / n.max(1) as f64,
        cost.wakeups as f64 / measured.as_secs_f64(),
    );
    for e in failed.iter().take(10) {
        eprintln!("{e}");
    }
    if failed.is_empty() && paused.len() == n {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// How one pull went.
struct Pulled {
    bytes: u64,
    sha256: Vec<u8>,
    /// From connecting to the first bytes read.
    first_byte: Duration,
    /// The longest wait for one read of the file (a starving session
    /// shows here, not in the throughput).
    longest_wait: Duration,
}

/// Pulls `file` whole through `port`; returns the bytes and their SHA-256.
fn pull(port: u16, file: &str, read_ahead: ReadAhead) -> Result<(u64, Vec<u8>), String> {
    pull_timed("127.0.0.1", port, file, read_ahead).map(|p| (p.bytes, p.sha256))
}

fn pull_timed(host: &str, port: u16, file: &str, read_ahead: ReadAhead) -> Result<Pulled, String> {
    let started = Instant::now();
    let config = ClientConfig {
        read_ahead,
        ..Default::default()
    };
    let client = BlockingClient::connect(host, port, config).map_err(|e| e.to_string())?;
    let opened = client
        .open(file, 0, CLIENT_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let mut hash = Sha256::new();
    let mut got = 0u64;
    let mut first_byte = None;
    let mut longest_wait = Duration::ZERO;
    while got < opened.size {
        let asked = Instant::now();
        let chunk = client
            .read_at(got, 256 * 1024, CLIENT_TIMEOUT)
            .map_err(|e| format!("at {got}: {e}"))?;
        longest_wait = longest_wait.max(asked.elapsed());
        first_byte.get_or_insert_with(|| started.elapsed());
        if chunk.is_empty() {
            break;
        }
        got += chunk.len() as u64;
        hash.update(&chunk);
    }
    client.close();
    Ok(Pulled {
        bytes: got,
        sha256: hash.finalize().to_vec(),
        first_byte: first_byte.unwrap_or_default(),
        longest_wait,
    })
}

/// What a run's pulls of one file delivered: the bytes of the byte-exact
/// copies, their first-byte times and longest waits (sorted), and why the
/// others failed.
struct PullSummary {
    bytes: u64,
    failures: Vec<String>,
    first_bytes: Vec<Duration>,
    waits: Vec<Duration>,
}

impl PullSummary {
    fn of(results: &[Result<Pulled, String>], digest: &[u8]) -> PullSummary {
        let mut summary = PullSummary {
            bytes: 0,
            failures: Vec::new(),
            first_bytes: Vec::new(),
            waits: Vec::new(),
        };
        for r in results {
            match r {
                Ok(p) if p.sha256 == digest => {
                    summary.bytes += p.bytes;
                    summary.first_bytes.push(p.first_byte);
                    summary.waits.push(p.longest_wait);
                }
                Ok(_) => summary.failures.push("copy differs".to_string()),
                Err(e) => summary.failures.push(e.clone()),
            }
        }
        summary.first_bytes.sort();
        summary.waits.sort();
        summary
    }
}

/// "median X s, slowest Y s" of sorted durations.
fn median_and_worst(v: &[Duration]) -> String {
    format!(
        "median {:.2} s, slowest {:.2} s",
        v.get(v.len() / 2)
            .copied()
            .unwrap_or_default()
            .as_secs_f64(),
        v.last().copied().unwrap_or_default().as_secs_f64()
    )
}

fn paced(mut args: impl Iterator<Item = String>) -> ExitCode {
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let mbit: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200.0);
    let file_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let rtt_ms: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0.0);
    let dir = std::env::temp_dir().join(format!("udpvid-paced-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("paced dir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let data: Vec<u8> = (0..file_mib << 20).map(|_| rng.r#gen()).collect();
    let digest = Sha256::digest(&data).to_vec();
    std::fs::write(dir.join("f.bin"), &data).expect("write");
    let (mut server, server_bin, port) = start_server(&dir, 2000);
    let proxy_bin = server_bin
        .parent()
        .expect("profile dir")
        .join("examples")
        .join("impair");
    let mut proxy = Command::new(&proxy_bin)
        .args([
            "--upstream",
            &format!("127.0.0.1:{port}"),
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--down-rate-mbit",
            &mbit.to_string(),
            "--down-queue-kb",
            "512",
            "--delay-ms",
            &(rtt_ms / 2.0).to_string(),
        ])
        // LOAD_PROXY_TRACE=FILE: the proxy's datagram-by-datagram trace, to
        // read why a starving session hears nothing.
        .args(
            std::env::var("LOAD_PROXY_TRACE")
                .map(|f| vec!["--trace".to_string(), f])
                .unwrap_or_default(),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", proxy_bin.display()));
    // "impair listening on 127.0.0.1:PORT, forwarding to ..."
    let proxy_port = banner_port(&mut proxy, 3);
    let pid = server.id();
    let before = ServerCost::sample(pid);
    let started = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                pull_timed("127.0.0.1", proxy_port, "f.bin", ReadAhead::Fixed(8 << 20))
            })
        })
        .collect();
    let results: Vec<Result<Pulled, String>> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err("client panicked".into())))
        .collect();
    let elapsed = started.elapsed();
    let ServerCost {
        cpu,
        wakeups: wake,
        per_thread,
    } = ServerCost::sample(pid).since(&before);
    let report = impair_report::stop_for_report(&mut proxy);
    let bottleneck = impair_report::server_to_client(&report);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let PullSummary {
        bytes,
        failures,
        first_bytes,
        waits,
    } = PullSummary::of(&results, &digest);
    let gb = bytes as f64 / 1e9;
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| pulls | {n} of {file_mib} MiB through one {mbit} Mbit/s bottleneck (512 KB queue), {rtt_ms} ms RTT |"
    );
    println!("| byte-exact | {} |", n - failures.len());
    println!(
        "| throughput | {:.1} Mbit/s in {:.1} s |",
        bytes as f64 * 8.0 / 1e6 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!("| first byte | {} |", median_and_worst(&first_bytes));
    println!(
        "| longest wait for a read (256 KiB) | {} |",
        median_and_worst(&waits)
    );
    print_server_cost(cpu, gb, wake, elapsed, &per_thread);
    // What was resent shows here: the server's datagrams against the
    // file's, and how many the bottleneck's queue dropped.
    println!(
        "| bottleneck, server to clients | {} ({} datagrams of payload in the files) |",
        bottleneck.unwrap_or("no report"),
        n as u64 * ((file_mib as u64) << 20).div_ceil(DEFAULT_MAX_PAYLOAD as u64)
    );
    for f in failures.iter().take(10) {
        eprintln!("{f}");
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let code = run();
    QUOTAS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    code
}

fn run() -> ExitCode {
    // Before any thread starts, so that all of them inherit it.
    if let Some(cpus) = cpu_affinity::cpus_from_env("LOAD_VIEWER_CPUS") {
        if let Err(e) = cpu_affinity::pin_this_thread(&cpus) {
            eprintln!("LOAD_VIEWER_CPUS={cpus:?}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut args = std::env::args().skip(1).peekable();
    match args.peek().map(String::as_str) {
        Some("viewers") => {
            args.next();
            return viewers(args);
        }
        Some("paced") => {
            args.next();
            return paced(args);
        }
        Some("paused") => {
            args.next();
            return paused(args);
        }
        Some("shaped") => {
            args.next();
            return shaped_pulls::shaped(args);
        }
        _ => {}
    }
    let clients: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let file_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let pipelines: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let dir = std::env::temp_dir().join(format!("udpvid-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("load dir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut digests = Vec::new();
    for i in 0..FILES {
        let data: Vec<u8> = (0..file_mib << 20).map(|_| rng.r#gen()).collect();
        digests.push(Sha256::digest(&data).to_vec());
        std::fs::write(dir.join(format!("f{i}.bin")), &data).expect("write");
    }
    let (mut server, server_bin, port) = start_server(&dir, 2000);
    let addr = format!("127.0.0.1:{port}");
    let pid = server.id();
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flood_sent = Arc::new(AtomicU64::new(0));

    // Misbehaving clients.
    let mut bad = Vec::new();
    for i in 0..NEVER_ACK + GARBAGE_ACK {
        let (addr, stop) = (addr.clone(), stop.clone());
        bad.push(std::thread::spawn(move || {
            let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
                return;
            };
            let Some(id) = raw_connect(&sock, &addr, 10_000 + i as u64) else {
                return;
            };
            open(&sock, &addr, id, &format!("f{}.bin", i % FILES));
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            let mut buf = [0u8; 2048];
            let _ = sock.set_read_timeout(Some(Duration::from_millis(50)));
            let mut pn = 2;
            while !stop.load(Ordering::Relaxed) {
                let _ = sock.recv_from(&mut buf);
                if i >= NEVER_ACK {
                    // Acknowledges packets and ranges that make no sense.
                    let largest: u64 = rng.gen_range(0..1_000_000);
                    let ack = Packet::new(
                        id,
                        pn,
                        Body::Ack {
                            transfer_id: rng.r#gen(),
                            window: rng.r#gen(),
                            received_up_to: rng.r#gen(),
                            ack_delay_micros: rng.r#gen(),
                            ranges: vec![AckRange {
                                largest,
                                smallest: largest.saturating_sub(rng.gen_range(0..100)),
                            }],
                        },
                    );
                    pn += 1;
                    let _ = sock.send_to(&ack.encode(), &addr);
                }
            }
        }));
    }
    for i in 0..FLOODERS {
        let (addr, flood_sent) = (addr.clone(), flood_sent.clone());
        bad.push(std::thread::spawn(move || {
            let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
                return;
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + i as u64);
            for k in 0..FLOOD_DATAGRAMS {
                let len = rng.gen_range(1..1400);
                let mut junk: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
                if k % 3 == 0 && junk.len() > 4 {
                    // Some look like udpvid, to get past the magic check.
                    junk[..3].copy_from_slice(b"UV\x01");
                }
                let _ = sock.send_to(&junk, &addr);
                flood_sent.fetch_add(1, Ordering::Relaxed);
                if k % 500 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }));
    }

    // Real element pipelines, started among the protocol clients.
    let plugin_dir = server_bin.parent().expect("profile dir").to_path_buf();
    let mut element_pulls: Vec<ElementPull> = (0..pipelines)
        .map(|i| ElementPull::start(&plugin_dir, port, &dir, i % FILES, i))
        .collect();

    // Well-behaved clients.
    let ok = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let digests = Arc::new(digests);
    let mut good = Vec::new();
    for i in 0..clients {
        let (ok, bytes, failures, digests) =
            (ok.clone(), bytes.clone(), failures.clone(), digests.clone());
        // Half pull the same file, half spread over the others.
        let file = if i % 2 == 0 { 0 } else { i % FILES };
        good.push(std::thread::spawn(move || {
            let result = (|| -> Result<(), String> {
                let (got, digest) =
                    pull(port, &format!("f{file}.bin"), ReadAhead::Fixed(512 * 1024))?;
                bytes.fetch_add(got, Ordering::Relaxed);
                if digest != digests[file] {
                    return Err(format!("client {i}: f{file}.bin differs"));
                }
                Ok(())
            })();
            match result {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("client {i}: {e}")),
            }
        }));
        // Arrivals spread over a second, as real viewers would.
        std::thread::sleep(Duration::from_millis(1000 / clients.max(1) as u64));
    }
    let mut peak_rss = 0;
    let mut sessions_done = false;
    while !sessions_done && started.elapsed() < LIMIT {
        peak_rss = peak_rss.max(proc_value(pid, "status", "VmRSS:").unwrap_or(0));
        for p in element_pulls.iter_mut() {
            p.poll();
        }
        sessions_done =
            good.iter().all(|h| h.is_finished()) && element_pulls.iter().all(|p| p.took.is_some());
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = started.elapsed();
    let mut pull_failures = Vec::new();
    let mut pull_times = Vec::new();
    for p in element_pulls.iter_mut() {
        match p.finish(&digests, file_mib) {
            Ok((took, got)) => {
                pull_times.push(took.as_secs_f64());
                bytes.fetch_add(got, Ordering::Relaxed);
            }
            Err(e) => pull_failures.push(e),
        }
    }
    pull_times.sort_by(f64::total_cmp);
    for h in good {
        let _ = h.join();
    }
    stop.store(true, Ordering::Relaxed);
    for h in bad {
        let _ = h.join();
    }
    let cpu = cpu_seconds(pid) - cpu0;
    let peak = proc_value(pid, "status", "VmHWM:").unwrap_or(peak_rss);
    let alive = server.try_wait().map(|s| s.is_none()).unwrap_or(false);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let total = bytes.load(Ordering::Relaxed);
    let good_done = ok.load(Ordering::Relaxed);
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| well-behaved clients | {clients} ({FILES} files of {file_mib} MiB; half on the same file) |"
    );
    println!("| finished byte-exact | {good_done} |");
    println!(
        "| element pipelines (gst-launch udpvidsrc ! filesink) | {pipelines}, {} byte-exact |",
        pull_times.len()
    );
    if let (Some(first), Some(last)) = (pull_times.first(), pull_times.last()) {
        println!(
            "| pipeline times | min {first:.2} s, median {:.2} s, max {last:.2} s |",
            pull_times[pull_times.len() / 2]
        );
        let each: Vec<String> = pull_times.iter().map(|t| format!("{t:.2}")).collect();
        println!("| each pipeline (s, sorted) | {} |", each.join(" "));
    }
    println!(
        "| misbehaving | {NEVER_ACK} never ACK, {GARBAGE_ACK} ACK garbage, {FLOODERS} flood {} junk datagrams |",
        flood_sent.load(Ordering::Relaxed)
    );
    println!("| wall time | {:.1} s |", elapsed.as_secs_f64());
    println!(
        "| delivered | {:.1} MiB, {:.1} MiB/s |",
        total as f64 / 1048576.0,
        total as f64 / 1048576.0 / elapsed.as_secs_f64()
    );
    println!(
        "| server CPU | {cpu:.1} s ({:.1} s per GiB) |",
        cpu / (total as f64 / 1073741824.0).max(1e-9)
    );
    println!("| server peak RSS | {:.1} MiB |", peak as f64 / 1024.0);
    println!("| server still up | {alive} |");
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner());
    for f in failures.iter().chain(pull_failures.iter()).take(20) {
        eprintln!("{f}");
    }
    if good_done as usize == clients && pull_failures.is_empty() && alive {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "load: {} of {clients} clients and {} of {pipelines} pipelines failed",
            clients - good_done as usize,
            pull_failures.len()
        );
        ExitCode::FAILURE
    }
}
