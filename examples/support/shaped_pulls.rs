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

use std::io::Read;
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

use gstudpvid::protocol::read_ahead::ReadAhead;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::metrics_scrape::scrape_metric;
use super::shaped_link::ShapedLink;
use super::{
    PullSummary, Pulled, ServerCost, cpu_affinity, http_get, median_and_worst, nginx,
    print_server_cost, pull_timed, start_server_at,
};

/// The veth pair's three octets: the pulls' end is `.1`, the servers'
/// inside the namespace `.2`.
const SUBNET: &str = "10.213.78";
/// The bottleneck's queue, as `load paced` gives the proxy.
const QUEUE: &str = "512kb";
/// The token bucket: a few datagrams of slack at line rate. Batches the
/// kernel was handed whole (GSO, TSO) and larger than this are cut into
/// datagrams at the queue; smaller ones stay whole, and a dropped one
/// counts once in the queue's drops (its datagrams all count in what it
/// passes), so the drops are what was handed to it less what it passed
/// (see [`handed_to_the_queue`]).
const BUCKET: &str = "32kb";
/// The udpvid server's metrics page, on the namespace's address: its
/// count of datagrams sent is what it handed to the queue.
const METRICS_PORT: u16 = 9911;
const HTTP_PORT: u16 = 8080;
/// How long an HTTP pull waits for its next bytes: TCP flows that lose
/// their first segments in a queue shared by hundreds back off for
/// seconds (RTO doubling), longer than `CLIENT_TIMEOUT` allows a viewer.
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(120);
const READ_BYTES: usize = 256 * 1024;

/// nginx (the bench's configuration) inside the namespace, listening on
/// [`HTTP_PORT`], once it accepts.
fn start_nginx(link: &ShapedLink, root: &std::path::Path, connections: usize) -> Child {
    let work = root.join("nginx");
    let server = link.server_addr();
    let conf = nginx::write_conf(&work, root, &format!("{server}:{HTTP_PORT}"), connections)
        .expect("nginx.conf");
    let cpus = cpu_affinity::cpus_from_env("LOAD_SERVER_CPUS");
    nginx::launch(&conf, &work, Some(&link.name), cpus, &server, HTTP_PORT)
}

/// Pulls `file` whole over HTTP from `host`, reading as fast as it comes.
fn pull_http(host: &str, file: &str) -> Result<Pulled, String> {
    let started = Instant::now();
    let mut stream = http_get(host, HTTP_PORT, file, HTTP_READ_TIMEOUT)?;
    let mut buf = vec![0u8; READ_BYTES];
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
        bytes += n as u64;
        hash.update(&buf[..n]);
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

/// Datagrams (udpvid: the server's count) or TCP segments (nginx: the
/// namespace's, retransmissions included) handed to the queue so far, one
/// for each that leaves it when it passes.
fn handed_to_the_queue(link: &ShapedLink, peer: &str) -> Option<u64> {
    if peer == "http" {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &link.name, "cat", "/proc/net/snmp"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next()?, tcp.next()?);
        let field = |name: &str| -> Option<u64> {
            let i = names.split_whitespace().position(|n| n == name)?;
            values.split_whitespace().nth(i)?.parse().ok()
        };
        return Some(field("OutSegs")? + field("RetransSegs")?);
    }
    scrape_metric(
        &link.server_addr(),
        METRICS_PORT,
        "udpvid_datagrams_sent_total",
    )
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
    let rate = format!("{mbit}mbit");
    let tbf = ["rate", &rate, "burst", BUCKET, "limit", QUEUE];
    let link = match ShapedLink::create("ld", SUBNET, &tbf) {
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
        let metrics = format!("{}:{METRICS_PORT}", link.server_addr());
        let (server, _, port) = start_server_at(
            &dir,
            n + 16,
            &link.server_addr(),
            Some(&link.name),
            Some(&metrics),
        );
        (server, port)
    };
    let pid = server.id();
    // Read before the server's CPU is: the metrics page is not the pulls'.
    let handed_before = handed_to_the_queue(&link, &peer);
    let before = ServerCost::sample(pid);
    let counts_before = link.counts().unwrap_or_default();
    let started = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let http = peer == "http";
            let host = link.server_addr();
            std::thread::spawn(move || {
                if http {
                    pull_http(&host, "f.bin")
                } else {
                    pull_timed(&host, port, "f.bin", ReadAhead::Fixed(8 << 20))
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
    // The pulls are over: the sender's count first, then the queue's, so
    // that all it was handed has left it.
    let handed_after = handed_to_the_queue(&link, &peer);
    let (passed, dropped_batches) = link
        .counts()
        .map(|(p, d)| (p - counts_before.0, d - counts_before.1))
        .unwrap_or_default();
    // What the queue did not pass, it dropped. Without the sender's count,
    // its drops in batches.
    let dropped = match (handed_before, handed_after) {
        (Some(before), Some(after)) => after.saturating_sub(before).saturating_sub(passed),
        _ => dropped_batches,
    };
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
        "| bottleneck | {passed} datagrams or segments passed, {dropped} dropped ({dropped_share:.1} %; {dropped_batches} drops, a batch of several counting once) |"
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
