//! The clients users run, on links slower than the pipeline wants: every
//! stream either reaches its end byte-exact or fails with a clear error.
//!
//! gst-launch pauses the pipeline while a source reports buffering below
//! 100 % and resumes at 100 %; before the fix of issue 9 a copy through
//! `! filesink` stopped for good there whenever the read-ahead grew while
//! the pipeline was paused (20 Mbit/s tbf: at 6.6 MB; 12 of 16 concurrent
//! loopback pulls). The pulls here are bounded: a freeze fails the test
//! instead of hanging it.

mod common;
#[path = "../benches/common/shaped_link.rs"]
mod shaped_link;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;
use rand::{Rng, SeedableRng};

use common::{Proxy, Server, clips, init, sha256_file};
use shaped_link::ShapedLink;

/// A folder with the test clips and a 24 MB file (random bytes: a copy
/// test needs no video), made once.
fn media_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(make_media_dir).clone()
}

fn make_media_dir() -> PathBuf {
    let clips = clips();
    let dir = common::target_profile_dir()
        .join("..")
        .join("never-freeze-media");
    std::fs::create_dir_all(&dir).expect("media dir");
    let big = dir.join("big.bin");
    if !big.metadata().is_ok_and(|m| m.len() == 24_000_000) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let bytes: Vec<u8> = (0..24_000_000).map(|_| rng.r#gen()).collect();
        let tmp = dir.join(format!(".big.{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes).expect("write big.bin");
        std::fs::rename(&tmp, &big).expect("rename big.bin");
    }
    for name in ["movie.mp4", "movie.ts"] {
        let to = dir.join(name);
        if !to.exists() {
            std::fs::copy(clips.dir.join(name), &to).expect("copy clip");
        }
    }
    dir
}

/// Waits for `child` at most `limit`; kills it and returns None if it
/// is still running then.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `gst-launch-1.0 udpvidsrc host=HOST port=PORT file=FILE ! filesink`,
/// the way a user copies a file.
fn gst_launch_copy(host: &str, port: u16, file: &str, out: &Path) -> Command {
    let mut c = Command::new("gst-launch-1.0");
    c.args([
        "udpvidsrc",
        &format!("host={host}"),
        &format!("port={port}"),
        &format!("file={file}"),
        "timeout=10",
        "!",
        "filesink",
        &format!("location={}", out.display()),
    ])
    .env("GST_PLUGIN_PATH", common::plugin_dir())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Runs a copy to the end within `limit`; panics with gst-launch's output
/// if it froze or failed, and checks the copy against the original.
fn copy_must_finish(
    mut command: Command,
    out: &Path,
    original: &Path,
    limit: Duration,
    what: &str,
) {
    let started = Instant::now();
    let mut child = command.spawn().expect("gst-launch runs");
    let status = wait_bounded(&mut child, limit);
    let mut log = String::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut s = stream;
        let _ = s.read_to_string(&mut log);
    }
    let tail: String = log
        .chars()
        .rev()
        .take(1500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let copied = out.metadata().map_or(0, |m| m.len());
    match status {
        None => panic!("{what}: froze: no end after {limit:?}, {copied} bytes copied\n{tail}"),
        Some(s) => assert!(s.success(), "{what}: gst-launch failed ({s})\n{tail}"),
    }
    assert_eq!(
        sha256_file(out),
        sha256_file(original),
        "{what}: the copy differs ({copied} bytes)"
    );
    eprintln!(
        "{what}: {copied} bytes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(out);
}

fn temp_out(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("udpvid-nf-{tag}-{}", std::process::id()))
}

#[test]
fn gst_launch_copies_through_a_rate_capped_proxy_below_and_above_the_media_rate() {
    init();
    let dir = media_dir();
    let server = Server::start(&dir, &[]);
    let media_bits = std::fs::metadata(dir.join("movie.mp4"))
        .expect("clip")
        .len()
        * 8;
    // The clip is 5 s of media: its rate in Mbit/s.
    let media_mbit = media_bits as f64 / 5.0 / 1e6;
    for (factor, file, limit) in [
        (0.5, "movie.mp4", 60),
        (3.0, "movie.mp4", 30),
        // The freeze's own shape: a 24 MB copy paced by a 20 Mbit/s link,
        // paused by gst-launch at every underrun.
        (f64::NAN, "big.bin", 90),
    ] {
        let mbit = if factor.is_nan() {
            20.0
        } else {
            media_mbit * factor
        };
        let proxy = Proxy::start(
            server.port,
            &[
                "--down-rate-mbit",
                &format!("{mbit:.3}"),
                "--down-queue-kb",
                "128",
                "--delay-ms",
                "20",
            ],
        );
        let out = temp_out(&format!("proxy-{file}"));
        copy_must_finish(
            gst_launch_copy("127.0.0.1", proxy.port, file, &out),
            &out,
            &dir.join(file),
            Duration::from_secs(limit),
            &format!("{file} through a {mbit:.2} Mbit/s proxy"),
        );
    }
}

/// `n` gst-launch copies of `file` (in `dir`) at once from `port`, each
/// waited for until `limit` after the start and checked against the
/// original; returns what went wrong with each copy that did not finish
/// byte-exact.
fn copies_at_once(n: usize, port: u16, dir: &Path, file: &str, limit: Duration) -> Vec<String> {
    let started = Instant::now();
    let children: Vec<(Child, PathBuf)> = (0..n)
        .map(|i| {
            let out = temp_out(&format!("conc-{port}-{i}"));
            let mut c = gst_launch_copy("127.0.0.1", port, file, &out);
            c.stdout(Stdio::null()).stderr(Stdio::null());
            (c.spawn().expect("gst-launch runs"), out)
        })
        .collect();
    let mut failures = Vec::new();
    let original = sha256_file(&dir.join(file));
    for (i, (mut child, out)) in children.into_iter().enumerate() {
        let left = limit.saturating_sub(started.elapsed());
        let copied = |out: &Path| out.metadata().map_or(0, |m| m.len());
        match wait_bounded(&mut child, left) {
            None => failures.push(format!("copy {i} froze at {} bytes", copied(&out))),
            Some(s) if !s.success() => {
                failures.push(format!("copy {i} failed at {} bytes: {s}", copied(&out)))
            }
            Some(_) if sha256_file(&out) != original => {
                failures.push(format!("copy {i}: differs ({} bytes)", copied(&out)))
            }
            Some(_) => {}
        }
        let _ = std::fs::remove_file(out);
    }
    failures
}

#[test]
fn sixteen_concurrent_gst_launch_copies_on_loopback_are_byte_exact() {
    init();
    let dir = media_dir();
    let server = Server::start(&dir, &[]);
    let file = "big.bin";
    let started = Instant::now();
    let failures = copies_at_once(16, server.port, &dir, file, Duration::from_secs(180));
    assert!(failures.is_empty(), "{failures:?}\n{}", server.log_text());
    eprintln!("16 x {file}: {:.1} s", started.elapsed().as_secs_f64());
    // One session per viewer: no catalog sessions beside the copies.
    assert_eq!(server.log_text().matches("session opened").count(), 16);
}

/// Many copies at once through one bottleneck whose queue is smaller than
/// their congestion windows' floor (24 x 4 datagrams against 32 KB): the
/// queue is full all the time and drops about half of what the server
/// sends. Sessions that lost everything for a while came back paced at
/// a few hundred bytes per second, or had their probes dropped tick after
/// tick, and their gst-launch gave up after its timeout.
#[test]
fn twenty_four_gst_launch_copies_through_a_bottleneck_smaller_than_their_windows() {
    init();
    let dir = media_dir();
    let server = Server::start(&dir, &[]);
    let proxy = Proxy::start(
        server.port,
        &[
            "--down-rate-mbit",
            "10",
            "--down-queue-kb",
            "32",
            "--delay-ms",
            "10",
        ],
    );
    let file = "movie.mp4";
    let started = Instant::now();
    let failures = copies_at_once(24, proxy.port, &dir, file, Duration::from_secs(150));
    let took = started.elapsed();
    let report = proxy.finish();
    assert!(failures.is_empty(), "{failures:?}\nproxy: {report}");
    // The premise: the queue, not the senders, was the limit.
    let down = report
        .lines()
        .find(|l| l.starts_with("down"))
        .unwrap_or_default();
    let queue_full: u64 = down
        .split(" queue full")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(queue_full > 1000, "the queue hardly overflowed: {report}");
    eprintln!(
        "24 x {file} through 10 Mbit/s and a 32 KB queue: {:.1} s; {down}",
        took.as_secs_f64()
    );
}

#[test]
fn gst_launch_copies_over_tc_tbf_in_a_network_namespace() {
    init();
    let dir = media_dir();
    // A veth pair into a namespace the test makes, with `tc tbf` capping
    // what leaves the namespace.
    let ns = ShapedLink::create(
        "tbf",
        "10.213.77",
        &["rate", "20mbit", "burst", "32kbit", "latency", "100ms"],
    )
    .unwrap_or_else(|e| panic!("{e}: the namespace tests need root and iproute2"));
    let server_addr = ns.server_addr();
    let mut server = Server::start_in_namespace(&ns.name, &server_addr, &dir, 50000);
    let out = temp_out("tbf");
    let result = std::panic::catch_unwind(|| {
        copy_must_finish(
            gst_launch_copy(&server_addr, 50000, "big.bin", &out),
            &out,
            &dir.join("big.bin"),
            Duration::from_secs(90),
            "big.bin over a 20 Mbit/s tbf",
        )
    });
    server.kill();
    drop(ns);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// A pipeline whose application pauses on buffering below 100 % and
/// resumes at 100 %, as gst-launch and playbin apps do; returns the first
/// error, or None if `limit` passed without EOS or error.
fn run_honouring_buffering(
    pipeline: &gst::Element,
    limit: Duration,
    mut on_tick: impl FnMut(),
) -> Option<Result<(), (gst::glib::Error, String)>> {
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Paused).expect("paused");
    let deadline = Instant::now() + limit;
    let mut result = None;
    while result.is_none() && Instant::now() < deadline {
        on_tick();
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(50)) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Buffering(b) if b.percent() < 100 => {
                let _ = pipeline.set_state(gst::State::Paused);
            }
            gst::MessageView::Buffering(_) => {
                let _ = pipeline.set_state(gst::State::Playing);
            }
            gst::MessageView::Eos(_) => result = Some(Ok(())),
            gst::MessageView::Error(e) => {
                result = Some(Err((
                    e.error(),
                    e.debug().map(|d| d.to_string()).unwrap_or_default(),
                )))
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).expect("null");
    result
}

#[test]
fn an_application_paused_on_buffering_gets_an_error_when_the_server_stops() {
    init();
    let dir = media_dir();
    let mut server = Server::start(&dir, &[]);
    // Slower than the sink, so the application pauses on buffering over
    // and over; then the server freezes (SIGSTOP) while it is paused.
    let proxy = Proxy::start(
        server.port,
        &["--down-rate-mbit", "8", "--down-queue-kb", "64"],
    );
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc port={} file=big.bin timeout=2 ! fakesink sync=false",
        proxy.port
    ))
    .expect("pipeline");
    let pid = server.child.id().to_string();
    let started = Instant::now();
    let stopped_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stopped = Arc::new(AtomicBool::new(false));
    let outcome = run_honouring_buffering(&pipeline, Duration::from_secs(30), || {
        if !stopped.load(Ordering::Relaxed) && started.elapsed() > Duration::from_secs(1) {
            stopped.store(true, Ordering::Relaxed);
            let _ = Command::new("kill").args(["-STOP", &pid]).status();
            *stopped_at.lock().expect("lock") = Some(Instant::now());
        }
    });
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    server.kill();
    let stopped_at = stopped_at
        .lock()
        .expect("lock")
        .expect("server was stopped");
    let (err, debug) = match outcome {
        Some(Err(e)) => e,
        Some(Ok(())) => panic!("EOS although the server stopped"),
        None => panic!("froze: no error 30 s after the server stopped"),
    };
    let message = err.to_string();
    assert!(
        err.kind::<gst::ResourceError>().is_some(),
        "{message} ({debug})"
    );
    for needle in ["window", "buffered", "last data"] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    // The timeout (2 s) plus the monitor's tick, not the session's 30 s.
    let took = stopped_at.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "error after {took:?}: {message}"
    );
}

#[test]
fn an_application_paused_on_buffering_survives_a_server_restart() {
    init();
    let dir = media_dir();
    let mut server = Server::start(&dir, &[]);
    let port = server.port;
    // Slower than the sink: the application pauses on buffering over and
    // over, and nobody reads while it does; the session must still be
    // replaced when the server comes back.
    let proxy = Proxy::start(port, &["--down-rate-mbit", "20", "--down-queue-kb", "64"]);
    let out = temp_out("restart");
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc name=src port={} file=big.bin timeout=5 ! filesink location={}",
        proxy.port,
        out.display()
    ))
    .expect("pipeline");
    let started = Instant::now();
    let mut restarted = None;
    let outcome = run_honouring_buffering(&pipeline, Duration::from_secs(90), || {
        if restarted.is_none() && started.elapsed() > Duration::from_secs(2) {
            server.kill();
            std::thread::sleep(Duration::from_millis(300));
            restarted = Some(Server::start_on(&dir, port, &[]));
        }
    });
    match outcome {
        Some(Ok(())) => {}
        Some(Err((e, debug))) => panic!("{e} ({debug})"),
        None => panic!("froze: no end 90 s after the start"),
    }
    assert!(restarted.is_some(), "the server was not restarted");
    assert_eq!(sha256_file(&out), sha256_file(&dir.join("big.bin")));
    let _ = std::fs::remove_file(out);
}
