//! `load shaped N [TOTAL_MBIT] [FILE_MIB] [udpvid|http]`: N pulls of one
//! file, as fast as they can, through one bottleneck the kernel shapes
//! (`tc tbf` at TOTAL_MBIT with a 512 KB queue, on a veth into a network
//! namespace the run makes and removes), served by the udpvid server or
//! by nginx (one worker, sendfile) from inside the namespace. Congestion
//! control then paces every session (TCP's in the kernel, udpvid's in the
//! server), and the table gives the server's CPU per GB next to the peer
//! a user would pick instead, for the same N through the same queue.
//! (`paced` shapes with the impairment proxy, which carries only UDP.)
//! Needs root and iproute2. Prints a `shaped-result` line for the bench.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use gstudpvid::protocol::read_ahead::ReadAhead;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::{
    PullSummary, Pulled, ServerCost, cpu_affinity, median_and_worst, nginx, print_server_cost,
    pull_timed, start_server_at,
};

/// The veth pair's addresses: the pulls' end, and the servers' inside the
/// namespace.
const HOST_ADDR: &str = "10.213.78.1";
const SERVER_ADDR: &str = "10.213.78.2";
/// The bottleneck's queue, as `load paced` gives the proxy.
const QUEUE: &str = "512kb";
/// The token bucket: a few datagrams of slack at line rate. Batches the
/// kernel was handed whole (GSO, TSO) and larger than this are cut into
/// datagrams at the queue, so its drop count is in datagrams.
const BUCKET: &str = "32kb";
const HTTP_PORT: u16 = 8080;
/// How long an HTTP pull waits for its next bytes: TCP flows that lose
/// their first segments in a queue shared by hundreds back off for
/// seconds (RTO doubling), longer than `CLIENT_TIMEOUT` allows a viewer.
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(120);
const READ_BYTES: usize = 256 * 1024;

/// A veth into a namespace of the run's own whose egress (towards the
/// pulls) is shaped; removed on drop.
struct ShapedLink {
    name: String,
    host_if: String,
    peer_if: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!("{args:?} failed (needs root and iproute2)"))
    }
}

impl ShapedLink {
    fn create(mbit: f64) -> Result<ShapedLink, String> {
        let pid = std::process::id();
        let link = ShapedLink {
            name: format!("udpvid-load-{pid}"),
            host_if: format!("uvld{}", pid % 100_000),
            peer_if: format!("uvld{}p", pid % 100_000),
        };
        // Left over by a run that was killed.
        let _ = run(&["ip", "netns", "del", &link.name]);
        let _ = run(&["ip", "link", "del", &link.host_if]);
        run(&["ip", "netns", "add", &link.name])?;
        run(&[
            "ip",
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &link.peer_if,
        ])?;
        run(&["ip", "link", "set", &link.peer_if, "netns", &link.name])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST_ADDR}/24"),
            "dev",
            &link.host_if,
        ])?;
        run(&["ip", "link", "set", &link.host_if, "up"])?;
        link.inside(&[
            "ip",
            "addr",
            "add",
            &format!("{SERVER_ADDR}/24"),
            "dev",
            &link.peer_if,
        ])?;
        link.inside(&["ip", "link", "set", &link.peer_if, "up"])?;
        link.inside(&["ip", "link", "set", "lo", "up"])?;
        link.inside(&[
            "tc",
            "qdisc",
            "add",
            "dev",
            &link.peer_if,
            "root",
            "tbf",
            "rate",
            &format!("{mbit}mbit"),
            "burst",
            BUCKET,
            "limit",
            QUEUE,
        ])?;
        Ok(link)
    }

    fn inside(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Datagrams (or segments) the bottleneck passed and dropped so far.
    fn counts(&self) -> Option<(u64, u64)> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "tc", "-s", "qdisc", "show"])
            .args(["dev", &self.peer_if])
            .output()
            .ok()?;
        // " Sent 1234 bytes 56 pkt (dropped 7, overlimits 8 requeues 0)"
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let before = |key: &str| {
            let i = words.iter().position(|w| *w == key)?;
            words.get(i.checked_sub(1)?)?.parse().ok()
        };
        let after = |key: &str| {
            let i = words.iter().position(|w| *w == key)?;
            words.get(i + 1)?.trim_end_matches(',').parse().ok()
        };
        Some((before("pkt")?, after("(dropped")?))
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}

/// nginx (the bench's configuration) inside the namespace, listening on
/// [`HTTP_PORT`], once it accepts.
fn start_nginx(link: &ShapedLink, root: &std::path::Path, connections: usize) -> Child {
    let work = root.join("nginx");
    let conf = nginx::write_conf(
        &work,
        root,
        &format!("{SERVER_ADDR}:{HTTP_PORT}"),
        connections,
    )
    .expect("nginx.conf");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &link.name, "nginx", "-c"])
        .arg(&conf)
        .arg("-p")
        .arg(&work)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(cpus) = cpu_affinity::cpus_from_env("LOAD_SERVER_CPUS") {
        cpu_affinity::pin_command(&mut command, cpus);
    }
    let child = command
        .spawn()
        .expect("nginx starts (apt-get install nginx)");
    for _ in 0..100 {
        if TcpStream::connect((SERVER_ADDR, HTTP_PORT)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Pulls `file` whole over HTTP, reading as fast as it comes.
fn pull_http(file: &str) -> Result<Pulled, String> {
    let started = Instant::now();
    let mut stream = TcpStream::connect((SERVER_ADDR, HTTP_PORT)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HTTP_READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /{file} HTTP/1.1\r\nHost: {SERVER_ADDR}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; READ_BYTES];
    let mut head = Vec::new();
    let mut in_body = false;
    let mut hash = Sha256::new();
    let (mut bytes, mut first_byte, mut longest_wait) = (0u64, None, Duration::ZERO);
    loop {
        let asked = Instant::now();
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("at {bytes}: {e}"))?;
        if n == 0 {
            break;
        }
        longest_wait = longest_wait.max(asked.elapsed());
        let mut body = &buf[..n];
        if !in_body {
            head.extend_from_slice(body);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                if head.len() > 16 * 1024 {
                    return Err("response head too long".into());
                }
                continue;
            };
            if !head.starts_with(b"HTTP/1.1 200") {
                return Err(format!(
                    "HTTP answered {:?}",
                    String::from_utf8_lossy(&head[..end])
                ));
            }
            in_body = true;
            let seen = head.len() - n;
            body = &buf[(end + 4).saturating_sub(seen)..n];
        }
        bytes += body.len() as u64;
        hash.update(body);
        // As a udpvid pull's first read ends: once its first 256 KiB came.
        if bytes >= READ_BYTES as u64 {
            first_byte.get_or_insert_with(|| started.elapsed());
        }
    }
    Ok(Pulled {
        bytes,
        sha256: hash.finalize().to_vec(),
        first_byte: first_byte.unwrap_or_else(|| started.elapsed()),
        longest_wait,
    })
}

pub fn shaped(mut args: impl Iterator<Item = String>) -> ExitCode {
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let mbit: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200.0);
    let file_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let peer = args.next().unwrap_or_else(|| "udpvid".into());
    if peer != "udpvid" && peer != "http" {
        eprintln!("peer must be udpvid or http, not {peer:?}");
        return ExitCode::FAILURE;
    }
    let dir = std::env::temp_dir().join(format!("udpvid-shaped-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("shaped dir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let data: Vec<u8> = (0..file_mib << 20).map(|_| rng.r#gen()).collect();
    let digest = Sha256::digest(&data).to_vec();
    std::fs::write(dir.join("f.bin"), &data).expect("write");
    drop(data);
    let link = match ShapedLink::create(mbit) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot shape a link: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            return ExitCode::FAILURE;
        }
    };
    let (mut server, port) = if peer == "http" {
        (start_nginx(&link, &dir, n + 16), HTTP_PORT)
    } else {
        let (server, _, port) = start_server_at(&dir, n + 16, SERVER_ADDR, Some(&link.name));
        (server, port)
    };
    let pid = server.id();
    let before = ServerCost::sample(pid);
    let counts_before = link.counts().unwrap_or_default();
    let started = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let http = peer == "http";
            std::thread::spawn(move || {
                if http {
                    pull_http("f.bin")
                } else {
                    pull_timed(SERVER_ADDR, port, "f.bin", ReadAhead::Fixed(8 << 20))
                }
            })
        })
        .collect();
    let results: Vec<Result<Pulled, String>> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err("client panicked".into())))
        .collect();
    let elapsed = started.elapsed();
    let cost = ServerCost::sample(pid).since(&before);
    let (passed, dropped) = link
        .counts()
        .map(|(p, d)| (p - counts_before.0, d - counts_before.1))
        .unwrap_or_default();
    let _ = server.kill();
    let _ = server.wait();
    drop(link);
    let _ = std::fs::remove_dir_all(&dir);
    let summary = PullSummary::of(&results, &digest);
    let gb = summary.bytes as f64 / 1e9;
    let served_by = if peer == "http" {
        "nginx (one worker)"
    } else {
        "udpvid server"
    };
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| pulls | {n} of {file_mib} MiB from the {served_by} through one {mbit} Mbit/s tc tbf ({QUEUE} queue) |"
    );
    println!("| byte-exact | {} |", n - summary.failures.len());
    let throughput = summary.bytes as f64 * 8.0 / 1e6 / elapsed.as_secs_f64();
    println!(
        "| throughput | {throughput:.1} Mbit/s in {:.1} s |",
        elapsed.as_secs_f64()
    );
    println!(
        "| first 256 KiB | {} |",
        median_and_worst(&summary.first_bytes)
    );
    println!(
        "| longest wait for a read | {} |",
        median_and_worst(&summary.waits)
    );
    print_server_cost(cost.cpu, gb, cost.wakeups, elapsed, &cost.per_thread);
    let dropped_share = 100.0 * dropped as f64 / (passed + dropped).max(1) as f64;
    println!(
        "| bottleneck | {passed} datagrams or segments passed, {dropped} dropped ({dropped_share:.1} %) |"
    );
    let median_first = summary
        .first_bytes
        .get(summary.first_bytes.len() / 2)
        .copied()
        .unwrap_or_default();
    println!(
        "shaped-result peer={peer} n={n} exact={} mbit={throughput:.1} cpu_per_gb={:.2} \
         wakeups_per_s={:.0} first_read_ms={:.0} dropped_pct={dropped_share:.1}",
        n - summary.failures.len(),
        cost.cpu / gb.max(1e-9),
        cost.wakeups as f64 / elapsed.as_secs_f64(),
        median_first.as_secs_f64() * 1000.0,
    );
    for f in summary.failures.iter().take(10) {
        eprintln!("{f}");
    }
    if summary.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
