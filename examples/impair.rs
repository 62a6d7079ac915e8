//! A UDP impairment proxy: sits between udpvid clients and a server and
//! makes the path bad on purpose, reproducibly (seeded).
//!
//! ```text
//! cargo run --example impair -- --upstream 127.0.0.1:50000 --listen 127.0.0.1:50001 \
//!     --down-loss 0.1 --delay-ms 40 --rate-mbit 20 --seed 7
//! gst-launch-1.0 udpvidsrc port=50001 file=sample.mp4 ! decodebin ! autovideosink
//! ```
//!
//! "down" is server → client, "up" is client → server; options without a
//! direction apply to both. Each client address gets its own upstream
//! socket, so several clients can share one proxy; `--rebind-every`
//! replaces it (a new source port, the old one closed) as a NAT that
//! forgets its mappings does. The first line on stdout
//! is `impair listening on ADDR`; on exit (Ctrl-C, SIGTERM or `--duration`)
//! it prints what it did per direction, and every `--report` seconds too.
//! `--trace FILE` writes one line per datagram: when it came (µs from the
//! start), its direction, its connection id, what it carries (decoded when it is a plaintext
//! udpvid datagram) and its fate (the delay of each copy, or `lost`), so a
//! slow seek or a stall can be read datagram by datagram.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstudpvid::impairment::{GilbertElliott, Impairment, ImpairmentConfig, ImpairmentStats};
use gstudpvid::protocol::wire::{Body, DataView, Packet};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Ethernet's MTU: what the proxy carries unless told otherwise.
const ETHERNET_MTU: usize = 1500;

struct Options {
    listen: SocketAddr,
    upstream: SocketAddr,
    seed: u64,
    up: ImpairmentConfig,
    down: ImpairmentConfig,
    duration: Option<Duration>,
    report: Option<Duration>,
    rebind_every: Option<Duration>,
    trace: Option<std::path::PathBuf>,
}

const USAGE: &str = "usage: impair --upstream HOST:PORT [--listen ADDR:PORT] [--seed N]
  [--loss P] [--up-loss P] [--down-loss P]            random loss, 0..1
  [--burst P,MEAN] [--up-burst ..] [--down-burst ..]   Gilbert-Elliott loss rate and mean burst length
  [--delay-ms MS] [--up-delay-ms ..] [--down-delay-ms ..]  one-way delay
  [--jitter-ms MS] [--reorder P] [--reorder-ms MS] [--duplicate P]   (also with up-/down- prefixes)
  [--rate-mbit R] [--queue-kb KB]                      bottleneck rate and queue (also with up-/down-)
  [--mtu BYTES]    largest IP packet carried, 1500 unless told (0: any); larger ones are dropped
  [--rebind-every SECONDS]   each client's upstream port changes this often (a NAT rebinding)
  [--duration SECONDS] [--report SECONDS] [--trace FILE]";

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        listen: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        upstream: "127.0.0.1:50000".parse().map_err(|e| format!("{e}"))?,
        seed: 1,
        up: ImpairmentConfig {
            queue_bytes: 64 * 1024,
            reorder_delay: Duration::from_millis(10),
            // An Ethernet path, as a network between two hosts has: on
            // loopback a client would otherwise see large datagrams pass.
            mtu: Some(ETHERNET_MTU),
            ..Default::default()
        },
        down: ImpairmentConfig::default(),
        duration: None,
        report: None,
        rebind_every: None,
        trace: None,
    };
    opts.down = opts.up.clone();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        let (dirs, name): (&[bool], &str) = if let Some(n) = flag.strip_prefix("--up-") {
            (&[true], n)
        } else if let Some(n) = flag.strip_prefix("--down-") {
            (&[false], n)
        } else {
            (&[true, false], flag.trim_start_matches("--"))
        };
        match name {
            "listen" => opts.listen = value.parse().map_err(|e| format!("--listen: {e}"))?,
            "upstream" => {
                use std::net::ToSocketAddrs;
                opts.upstream = value
                    .to_socket_addrs()
                    .map_err(|e| format!("--upstream: {e}"))?
                    .next()
                    .ok_or("--upstream: no address")?
            }
            "seed" => opts.seed = value.parse().map_err(|_| "--seed: not a number")?,
            "duration" => opts.duration = Some(Duration::from_secs_f64(num(&value)?)),
            "report" => opts.report = Some(Duration::from_secs_f64(num(&value)?)),
            "rebind-every" => opts.rebind_every = Some(Duration::from_secs_f64(num(&value)?)),
            "trace" => opts.trace = Some(value.into()),
            _ => {
                for &up in dirs {
                    let c = if up { &mut opts.up } else { &mut opts.down };
                    match name {
                        "loss" => c.loss = num(&value)?,
                        "burst" => {
                            let (rate, mean) = value
                                .split_once(',')
                                .ok_or("--burst wants RATE,MEAN_LENGTH")?;
                            c.burst = Some(GilbertElliott::with_rate(num(rate)?, num(mean)?));
                        }
                        "delay-ms" => c.delay = Duration::from_secs_f64(num(&value)? / 1000.0),
                        "jitter-ms" => c.jitter = Duration::from_secs_f64(num(&value)? / 1000.0),
                        "reorder" => c.reorder = num(&value)?,
                        "reorder-ms" => {
                            c.reorder_delay = Duration::from_secs_f64(num(&value)? / 1000.0)
                        }
                        "duplicate" => c.duplicate = num(&value)?,
                        "rate-mbit" => c.rate_bps = Some((num(&value)? * 1e6) as u64),
                        "queue-kb" => c.queue_bytes = (num(&value)? * 1024.0) as usize,
                        "mtu" => c.mtu = Some(num(&value)? as usize).filter(|&m| m > 0),
                        _ => return Err(format!("unknown option {flag}")),
                    }
                }
            }
        }
    }
    Ok(opts)
}

/// A datagram due at a time, to an address, through a socket.
struct Scheduled {
    at: Instant,
    seq: u64,
    bytes: Vec<u8>,
    to: SocketAddr,
    via: Arc<UdpSocket>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Sends each datagram at its time.
async fn deliver(mut rx: mpsc::UnboundedReceiver<Scheduled>) {
    let mut heap: BinaryHeap<Reverse<Scheduled>> = BinaryHeap::new();
    loop {
        let next = heap.peek().map(|Reverse(s)| s.at);
        tokio::select! {
            item = rx.recv() => match item {
                Some(s) => heap.push(Reverse(s)),
                None if heap.is_empty() => return,
                None => {}
            },
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending::<()>().await,
                }
            } => {
                let now = Instant::now();
                while heap.peek().is_some_and(|Reverse(s)| s.at <= now) {
                    if let Some(Reverse(s)) = heap.pop() {
                        let _ = s.via.send_to(&s.bytes, s.to).await;
                    }
                }
            }
        }
    }
}

/// Where `--trace` writes, and the time its lines count from.
struct Trace {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
    started: Instant,
}

impl Trace {
    fn record(&self, now: Instant, up: bool, bytes: &[u8], arrivals: &[Instant]) {
        let fate = if arrivals.is_empty() {
            "lost".to_string()
        } else {
            arrivals
                .iter()
                .map(|a| format!("+{}us", a.saturating_duration_since(now).as_micros()))
                .collect::<Vec<_>>()
                .join(",")
        };
        let line = format!(
            "{} {} cid={:016x} {} {fate}\n",
            now.saturating_duration_since(self.started).as_micros(),
            if up { "up" } else { "down" },
            Packet::header_connection_id(bytes).unwrap_or(0),
            describe(bytes)
        );
        let _ = self
            .out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(line.as_bytes());
    }
    fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

/// A datagram in a few words: its packet number and what it carries.
fn describe(bytes: &[u8]) -> String {
    if let Some(d) = DataView::parse(bytes) {
        return format!(
            "pn={} data transfer={} offset={} len={}",
            d.packet_number,
            d.transfer_id,
            d.offset,
            d.payload.len()
        );
    }
    let Ok(p) = Packet::decode(bytes) else {
        return format!("{} bytes (not plaintext udpvid)", bytes.len());
    };
    let what = match p.body {
        Body::Open(o) => format!("open transfer={} offset={}", o.transfer_id, o.offset),
        Body::OpenOk {
            transfer_id,
            offset,
            ..
        } => format!("open-ok transfer={transfer_id} offset={offset}"),
        Body::Ack {
            transfer_id,
            window,
            received_up_to,
            ranges,
            ..
        } => {
            let ranges: Vec<String> = ranges
                .iter()
                .map(|r| format!("{}-{}", r.smallest, r.largest))
                .collect();
            format!(
                "ack transfer={transfer_id} window={window} received_up_to={received_up_to} pns={}",
                ranges.join(",")
            )
        }
        other => {
            let name = format!("{other:?}");
            name.split([' ', '{', '('])
                .next()
                .unwrap_or("")
                .to_lowercase()
        }
    };
    format!("pn={} {what}", p.packet_number)
}

struct Direction {
    model: Mutex<Impairment>,
    seq: Mutex<u64>,
    tx: mpsc::UnboundedSender<Scheduled>,
    up: bool,
    trace: Option<Arc<Trace>>,
}

impl Direction {
    fn forward(&self, bytes: &[u8], to: SocketAddr, via: &Arc<UdpSocket>) {
        let now = Instant::now();
        let arrivals = self
            .model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .process(now, bytes.len());
        if let Some(t) = &self.trace {
            t.record(now, self.up, bytes, &arrivals);
        }
        for at in arrivals {
            let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
            *seq += 1;
            let _ = self.tx.send(Scheduled {
                at,
                seq: *seq,
                bytes: bytes.to_vec(),
                to,
                via: via.clone(),
            });
        }
    }
    fn stats(&self) -> ImpairmentStats {
        self.model.lock().unwrap_or_else(|p| p.into_inner()).stats()
    }
}

/// Carries the server's datagrams for `client` back through the down
/// direction's model. The socket takes GRO trains: a server's GSO send
/// then crosses loopback as one packet, as it leaves a NIC that segments
/// in hardware, instead of being cut up in the sender's system call and
/// charged to the server's CPU.
async fn forward_answers(
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    front: Arc<UdpSocket>,
    down: Arc<Direction>,
) {
    let state = match quinn_udp::UdpSocketState::new((&*socket).into()) {
        Ok(s) => s,
        Err(_) => {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, _)) = socket.recv_from(&mut buf).await {
                down.forward(&buf[..n], client, &front);
            }
            return;
        }
    };
    let mut buf = vec![0u8; 65536 * 2];
    let mut metas = [quinn_udp::RecvMeta::default(); 1];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        loop {
            let received = {
                let mut iovs = [std::io::IoSliceMut::new(&mut buf)];
                socket.try_io(tokio::io::Interest::READABLE, || {
                    state.recv((&*socket).into(), &mut iovs, &mut metas)
                })
            };
            match received {
                Ok(_) => {
                    let meta = &metas[0];
                    for datagram in buf[..meta.len].chunks(meta.stride.max(1)) {
                        down.forward(datagram, client, &front);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
    }
}

fn report(up: &Direction, down: &Direction) {
    println!("up   (client -> server): {}", up.stats());
    println!("down (server -> client): {}", down.stats());
    let _ = std::io::stdout().flush();
}

async fn run(opts: Options) -> Result<(), String> {
    let front = Arc::new(
        UdpSocket::bind(opts.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?,
    );
    let local = front.local_addr().map_err(|e| e.to_string())?;
    println!(
        "impair listening on {local}, forwarding to {}",
        opts.upstream
    );
    let _ = std::io::stdout().flush();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(deliver(rx));
    let trace = match &opts.trace {
        Some(path) => Some(Arc::new(Trace {
            out: Mutex::new(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .map_err(|e| format!("--trace {}: {e}", path.display()))?,
            )),
            started: Instant::now(),
        })),
        None => None,
    };
    let up = Arc::new(Direction {
        model: Mutex::new(Impairment::new(opts.up, opts.seed)),
        seq: Mutex::new(0),
        tx: tx.clone(),
        up: true,
        trace: trace.clone(),
    });
    let down = Arc::new(Direction {
        model: Mutex::new(Impairment::new(
            opts.down,
            opts.seed.wrapping_add(0x9e37_79b9),
        )),
        seq: Mutex::new(0),
        tx,
        up: false,
        trace: trace.clone(),
    });
    /// Per client: its upstream socket, when it was bound, and the task
    /// carrying the server's answers back.
    type Upstream = (Arc<UdpSocket>, Instant, tokio::task::JoinHandle<()>);
    let mut clients: HashMap<SocketAddr, Upstream> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let started = Instant::now();
    let deadline = opts.duration.map(|d| started + d);
    let mut next_report = opts.report.map(|r| started + r);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        let wake = [deadline, next_report].into_iter().flatten().min();
        tokio::select! {
            r = front.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                let stale = clients.get(&client).is_some_and(|(_, bound, _)| {
                    opts.rebind_every.is_some_and(|every| bound.elapsed() >= every)
                });
                if stale {
                    if let Some((_, _, answers)) = clients.remove(&client) {
                        // The old mapping is gone: what the server still
                        // sends there is lost, as behind a real NAT.
                        answers.abort();
                    }
                }
                let back = match clients.get(&client) {
                    Some((s, _, _)) => s.clone(),
                    None => {
                        let bind: SocketAddr = if opts.upstream.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
                            .parse()
                            .map_err(|e| format!("{e}"))?;
                        let s = Arc::new(UdpSocket::bind(bind).await.map_err(|e| e.to_string())?);
                        // Server → client for this client.
                        let (s2, front2, down2) = (s.clone(), front.clone(), down.clone());
                        let answers = tokio::spawn(async move {
                            forward_answers(s2, client, front2, down2).await;
                        });
                        clients.insert(client, (s.clone(), Instant::now(), answers));
                        s
                    }
                };
                up.forward(&buf[..n], opts.upstream, &back);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending::<()>().await,
                }
            } => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    break;
                }
                if let (Some(t), Some(every)) = (next_report, opts.report) {
                    if now >= t {
                        report(&up, &down);
                        next_report = Some(t + every);
                    }
                }
            }
        }
    }
    report(&up, &down);
    if let Some(t) = &trace {
        t.flush();
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("impair: {e}");
            }
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("impair: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("impair: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
