//! What the kernel alone charges a UDP sender on this machine for the
//! server's send pattern: the floor under the server's CPU per GB.
//!
//! One thread sends a file's bytes to N receivers on loopback as the
//! serving thread does (a 1 ms tick, each receiver a GSO burst of B
//! datagrams of 1 420 bytes per turn until its share of the rate is used,
//! the payloads copied from a 128 KiB block read with `preadv2`), with no
//! protocol at all: no ACKs, no recovery, no congestion control. Another
//! thread receives (GRO, as the proxy and the clients do). It prints the
//! sending thread's CPU per GB. On loopback the receiver's kernel path
//! runs inside the sender's `sendmsg`, so it is in the figure, as it is in
//! the server's figures of `load`.
//!
//! ```text
//! cargo run --release --example udp_floor -- [N] [TOTAL_MBIT] [SECONDS] [BURST] [read|no-read]
//! ```

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

const PAYLOAD: usize = 1420;
const BLOCK: usize = 128 * 1024;
const TICK: Duration = Duration::from_millis(1);
const FILE_BYTES: usize = 64 << 20;

#[path = "../benches/common/proc_stat.rs"]
mod proc_stat;

/// User and system CPU seconds of one thread of this process.
fn thread_cpu(tid: i32) -> f64 {
    proc_stat::cpu_seconds_of(format!("/proc/self/task/{tid}/stat"))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let mbit: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200.0);
    let seconds: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let burst: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let read = args.next().as_deref() != Some("no-read");

    let path = std::env::temp_dir().join(format!("udp-floor-{}.bin", std::process::id()));
    let data: Vec<u8> = (0..FILE_BYTES).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(&path, &data).expect("write the file");
    let file = std::fs::File::open(&path).expect("open the file");
    let _ = std::fs::remove_file(&path);

    let receivers: Vec<UdpSocket> = (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind a receiver");
            let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20);
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let addrs: Vec<SocketAddr> = receivers
        .iter()
        .map(|s| s.local_addr().expect("receiver address"))
        .collect();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // The receivers wait in epoll, as the proxy and the clients do (tokio),
    // so a datagram arriving wakes a sleeping thread: on loopback that
    // wake-up is charged to the sender's `sendmsg` too.
    let receiving = {
        let received = received.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("receivers' runtime");
            rt.block_on(async move {
                let tasks: Vec<_> = receivers
                    .into_iter()
                    .map(|s| {
                        let received = received.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            let state = UdpSocketState::new((&s).into()).expect("receiver state");
                            let s = tokio::net::UdpSocket::from_std(s).expect("tokio socket");
                            let mut buf = vec![0u8; 64 * 1024];
                            let mut metas = [RecvMeta::default(); 1];
                            while !stop.load(Ordering::Relaxed) {
                                let ready =
                                    tokio::time::timeout(Duration::from_millis(50), s.readable())
                                        .await;
                                if !matches!(ready, Ok(Ok(()))) {
                                    continue;
                                }
                                let mut iovs = [IoSliceMut::new(&mut buf)];
                                if let Ok(count) = s.try_io(tokio::io::Interest::READABLE, || {
                                    state.recv((&s).into(), &mut iovs, &mut metas)
                                }) {
                                    let got: usize = metas[..count].iter().map(|m| m.len).sum();
                                    received.fetch_add(got as u64, Ordering::Relaxed);
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            });
        })
    };

    let sender = UdpSocket::bind("127.0.0.1:0").expect("bind the sender");
    let _ = socket2::SockRef::from(&sender).set_send_buffer_size(4 << 20);
    let state = UdpSocketState::new((&sender).into()).expect("sender state");
    let burst = burst.clamp(1, state.max_gso_segments().max(1));
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let per_receiver = mbit * 1e6 / 8.0 / n as f64;
    let mut credit = vec![0.0f64; n];
    let mut offsets: Vec<usize> = (0..n).map(|i| i * FILE_BYTES / n).collect();
    // A block per receiver, as each session has its own.
    let mut blocks: Vec<(usize, Vec<u8>)> =
        (0..n).map(|_| (usize::MAX, vec![0u8; BLOCK])).collect();
    let mut batch = Vec::with_capacity(burst * PAYLOAD);
    let mut sent = 0u64;
    let mut sendmsgs = 0u64;
    let cpu0 = thread_cpu(tid);
    let started = Instant::now();
    let mut next = started;
    while started.elapsed().as_secs_f64() < seconds {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        // Sleep through the ticks on which no burst is due, as the server
        // sleeps until its next pacing deadline.
        let per_tick = per_receiver * TICK.as_secs_f64();
        let short = credit
            .iter()
            .map(|c| ((burst * PAYLOAD) as f64 - c).max(0.0))
            .fold(f64::MAX, f64::min);
        let ticks = (short / per_tick).ceil().max(1.0);
        next += TICK.mul_f64(ticks);
        for i in 0..n {
            credit[i] = (credit[i] + per_tick * ticks).min(4.0 * (burst * PAYLOAD) as f64);
            while credit[i] >= (burst * PAYLOAD) as f64 {
                batch.clear();
                for _ in 0..burst {
                    let at = offsets[i] % (FILE_BYTES - PAYLOAD);
                    if read {
                        let (block_start, block) = &mut blocks[i];
                        if at < *block_start || at + PAYLOAD > *block_start + BLOCK {
                            *block_start = at;
                            let _ = file.read_at(block, at as u64);
                        }
                        let from = at - *block_start;
                        batch.extend_from_slice(&block[from..from + PAYLOAD]);
                    } else {
                        batch.extend_from_slice(&data[at..at + PAYLOAD]);
                    }
                    offsets[i] += PAYLOAD;
                }
                let transmit = Transmit {
                    destination: addrs[i],
                    ecn: None,
                    contents: &batch,
                    segment_size: (burst > 1).then_some(PAYLOAD),
                    src_ip: None,
                };
                if state.send((&sender).into(), &transmit).is_ok() {
                    sent += batch.len() as u64;
                }
                sendmsgs += 1;
                credit[i] -= (burst * PAYLOAD) as f64;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = thread_cpu(tid) - cpu0;
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let _ = receiving.join();
    let gb = sent as f64 / 1e9;
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| shape | {n} receivers, {mbit} Mbit/s in all, bursts of {burst} x {PAYLOAD} B on a {} ms tick, payloads {} |",
        TICK.as_millis(),
        if read {
            "read from a file into a 128 KiB block, then copied"
        } else {
            "copied from memory"
        }
    );
    println!(
        "| sent | {:.1} MB in {elapsed:.1} s ({:.1} Mbit/s), {:.0} sendmsg/s; received {:.1} MB |",
        sent as f64 / 1e6,
        sent as f64 * 8.0 / 1e6 / elapsed,
        sendmsgs as f64 / elapsed,
        received.load(Ordering::Relaxed) as f64 / 1e6
    );
    println!(
        "| sending thread CPU | {cpu:.2} s ({:.2} s per GB) |",
        cpu / gb.max(1e-9)
    );
    // One line for the benchmark to read.
    println!(
        "floor-result n={n} burst={burst} cpu_per_gb={:.3} sendmsg_per_s={:.0}",
        cpu / gb.max(1e-9),
        sendmsgs as f64 / elapsed
    );
}
