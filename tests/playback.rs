//! playbin and application-level behaviour: URIs, time seeks, pause,
//! server restarts, buffering, stats and the catalog message.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

use common::{Outcome, Server, clips, init, run_pipeline, sha256, sha256_file};

fn playbin(uri: &str) -> gst::Element {
    let video = gst::ElementFactory::make("fakesink")
        .property("sync", false)
        .build()
        .expect("fakesink");
    let audio = gst::ElementFactory::make("fakesink")
        .property("sync", false)
        .build()
        .expect("fakesink");
    gst::ElementFactory::make("playbin")
        .property("uri", uri)
        .property("video-sink", &video)
        .property("audio-sink", &audio)
        .build()
        .expect("playbin")
}

/// Waits for the pipeline to finish a state change (or a seek).
fn settle(pipeline: &gst::Element) {
    let (result, _, _) = pipeline.state(gst::ClockTime::from_seconds(20));
    result.expect("state change completes");
}

fn position(pipeline: &gst::Element) -> gst::ClockTime {
    pipeline
        .query_position::<gst::ClockTime>()
        .expect("position known")
}

fn bus_error(bus: &gst::Bus) -> Option<String> {
    while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
        if let gst::MessageView::Error(e) = msg.view() {
            return Some(format!("{} ({:?})", e.error(), e.debug()));
        }
    }
    None
}

#[test]
fn playbin_seeks_by_time_in_every_container_then_reaches_eos() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    for name in &clips.names {
        let uri = format!("udpvid://127.0.0.1:{}/{name}", server.port);
        let pipeline = playbin(&uri);
        let bus = pipeline.bus().expect("bus");
        pipeline.set_state(gst::State::Paused).expect("paused");
        settle(&pipeline);
        for target_ms in [3000u64, 1000, 4000] {
            let target = gst::ClockTime::from_mseconds(target_ms);
            pipeline
                .seek_simple(gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE, target)
                .unwrap_or_else(|_| panic!("{name}: seek to {target} refused"));
            settle(&pipeline);
            assert_eq!(bus_error(&bus), None, "{name}");
            let pos = position(&pipeline);
            let diff = pos.nseconds().abs_diff(target.nseconds());
            assert!(
                diff < 50_000_000,
                "{name}: at {pos} after seeking to {target}"
            );
        }
        pipeline.set_state(gst::State::Playing).expect("playing");
        let outcome = common::wait_bus(&bus, Duration::from_secs(30)).unwrap_or(Outcome::TimedOut);
        pipeline.set_state(gst::State::Null).expect("null");
        assert_eq!(outcome, Outcome::Eos, "{name}");
    }
}

#[test]
fn uri_property_follows_host_port_and_file() {
    init();
    let src = gst::ElementFactory::make("udpvidsrc")
        .build()
        .expect("udpvidsrc");
    src.set_property("uri", "udpvid://[::1]:6000/dir/my%20clip.mp4");
    assert_eq!(src.property::<String>("host"), "::1");
    assert_eq!(src.property::<u32>("port"), 6000);
    assert_eq!(src.property::<String>("file"), "dir/my clip.mp4");
    src.set_property("port", 7000u32);
    assert_eq!(
        src.property::<String>("uri"),
        "udpvid://[::1]:7000/dir/my%20clip.mp4"
    );
    let handler = src
        .dynamic_cast_ref::<gst::URIHandler>()
        .expect("URI handler");
    assert!(handler.set_uri("http://example.com/x").is_err());
    assert!(handler.set_uri("udpvid://host:70000/x").is_err());
    // A failed set leaves the previous location.
    assert_eq!(
        handler.uri().as_deref(),
        Some("udpvid://[::1]:7000/dir/my%20clip.mp4")
    );
    let made = gst::Element::make_from_uri(gst::URIType::Src, "udpvid://localhost/a.mp4", None)
        .expect("made from URI");
    assert_eq!(made.factory().expect("factory").name(), "udpvidsrc");
    assert_eq!(made.property::<u32>("port"), 50000);
}

#[test]
fn mp4_and_matroska_are_offered_in_push_mode_only_ts_in_both() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    for (file, pull) in [
        ("movie.mp4", false),
        ("movie.mkv", false),
        ("movie.webm", false),
        ("movie.ts", true),
    ] {
        let src = common::source(server.port, file);
        let pipeline = gst::Pipeline::new();
        let sink = gst::ElementFactory::make("fakesink")
            .build()
            .expect("fakesink");
        pipeline.add_many([&src, &sink]).expect("add");
        src.link(&sink).expect("link");
        pipeline.set_state(gst::State::Paused).expect("paused");
        settle(pipeline.upcast_ref());
        let mut q = gst::query::Scheduling::new();
        assert!(src.static_pad("src").expect("pad").query(&mut q));
        assert!(q.has_scheduling_mode(gst::PadMode::Push), "{file}");
        assert_eq!(q.has_scheduling_mode(gst::PadMode::Pull), pull, "{file}");
        pipeline.set_state(gst::State::Null).expect("null");
    }
}

#[test]
fn source_answers_size_seeking_and_scheduling_queries() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let size = std::fs::metadata(clips.dir.join("movie.ts"))
        .expect("clip")
        .len();
    let src = common::source(server.port, "movie.ts");
    let sink = gst::ElementFactory::make("fakesink")
        .build()
        .expect("fakesink");
    let pipeline = gst::Pipeline::new();
    pipeline.add_many([&src, &sink]).expect("add");
    src.link(&sink).expect("link");
    pipeline.set_state(gst::State::Paused).expect("paused");
    settle(pipeline.upcast_ref());
    let pad = src.static_pad("src").expect("src pad");
    assert_eq!(
        pad.query_duration::<gst::format::Bytes>().map(|b| *b),
        Some(size)
    );
    let mut q = gst::query::Seeking::new(gst::Format::Bytes);
    assert!(pad.query(&mut q));
    let (seekable, start, end) = q.result();
    assert!(seekable);
    assert_eq!(
        start,
        gst::GenericFormattedValue::from(gst::format::Bytes::ZERO)
    );
    assert_eq!(
        end,
        gst::GenericFormattedValue::from(gst::format::Bytes::from_u64(size))
    );
    let mut q = gst::query::Scheduling::new();
    assert!(pad.query(&mut q));
    assert!(q.has_scheduling_mode(gst::PadMode::Push));
    assert!(q.has_scheduling_mode(gst::PadMode::Pull));
    assert!(q.result().0.contains(gst::SchedulingFlags::SEEKABLE));
    let mut q = gst::query::Latency::new();
    assert!(pad.query(&mut q));
    assert!(!q.result().0, "udpvidsrc must not be live");
    pipeline.set_state(gst::State::Null).expect("null");
}

/// A 16 MiB file of known bytes, served from its own folder.
fn big_file_dir(tag: &str) -> (std::path::PathBuf, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!("udpvid-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let big: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(dir.join("big.bin"), &big).expect("write");
    (dir, big)
}

/// `udpvidsrc ! identity sleep-time ! fakesink` collecting every byte.
fn slow_reader(
    port: u16,
    file: &str,
    sleep_us: u32,
    extra: &str,
) -> (gst::Element, Arc<Mutex<Vec<u8>>>) {
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc name=src port={port} file={file} {extra} ! identity sleep-time={sleep_us} ! fakesink name=sink signal-handoffs=true sync=false"
    ))
    .expect("pipeline");
    let bin = pipeline.downcast_ref::<gst::Bin>().expect("bin");
    let sink = bin.by_name("sink").expect("sink");
    let data = Arc::new(Mutex::new(Vec::new()));
    let d = data.clone();
    sink.connect("handoff", false, move |args| {
        let buffer = args[1].get::<gst::Buffer>().expect("buffer");
        let map = buffer.map_readable().expect("readable");
        d.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&map);
        None
    });
    (pipeline, data)
}

/// A push-mode consumer faster than the link (`udpvidsrc ! fakesink`, as a
/// `filesink` copy is) gets the bytes in blocks gathered over up to 25 ms,
/// not in a buffer per burst that arrived: each buffer but the first is a
/// whole block, the end of the file, or waited 25 ms past its first byte.
#[test]
fn a_consumer_faster_than_the_link_gets_gathered_blocks_byte_exact() {
    init();
    let (dir, big) = big_file_dir("gather");
    let server = Server::start(&dir, &[]);
    let proxy = common::Proxy::start(server.port, &["--down-rate-mbit", "40", "--delay-ms", "20"]);
    let (pipeline, data) = slow_reader(proxy.port, "big.bin", 0, "");
    let buffers = Arc::new(Mutex::new(Vec::<Instant>::new()));
    {
        let bin = pipeline.downcast_ref::<gst::Bin>().expect("bin");
        let sink = bin.by_name("sink").expect("sink");
        let b = buffers.clone();
        sink.connect("handoff", false, move |_| {
            b.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Instant::now());
            None
        });
    }
    let outcome = run_pipeline(&pipeline, Duration::from_secs(60));
    assert_eq!(outcome, Outcome::Eos);
    let data = data.lock().expect("lock");
    assert_eq!(sha256(&data), sha256(&big), "the copy differs");
    let buffers = buffers.lock().expect("lock");
    let spread = *buffers.last().expect("buffers") - buffers[0];
    // Whole 64 KiB blocks, plus one per 25 ms of the transfer, plus the
    // first; a buffer per burst would be many times as many at 40 Mbit/s.
    let most = big.len() / 65536 + (spread.as_millis() / 25) as usize + 2;
    eprintln!(
        "{} buffers over {:.2} s (at most {most})",
        buffers.len(),
        spread.as_secs_f64()
    );
    assert!(
        buffers.len() <= most,
        "{} buffers over {:.2} s: more than {most}",
        buffers.len(),
        spread.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn server_restart_mid_stream_resumes_with_identical_bytes() {
    init();
    let (dir, big) = big_file_dir("restart");
    let mut server = Server::start(&dir, &[]);
    let port = server.port;
    let (pipeline, data) = slow_reader(port, "big.bin", 5000, "timeout=8 read-ahead=262144");
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("playing");
    std::thread::sleep(Duration::from_millis(800));
    server.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let _server = Server::start_on(&dir, port, &[]);
    let outcome = common::wait_bus(&bus, Duration::from_secs(60)).unwrap_or(Outcome::TimedOut);
    let src = pipeline
        .downcast_ref::<gst::Bin>()
        .expect("bin")
        .by_name("src")
        .expect("src");
    let stats = src.property::<gst::Structure>("stats");
    pipeline.set_state(gst::State::Null).expect("null");
    assert_eq!(outcome, Outcome::Eos);
    let got = data.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(got.len(), big.len());
    assert_eq!(sha256(&got), sha256(&big));
    assert!(
        stats.get::<u64>("reconnects").expect("reconnects") >= 1,
        "{stats}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn file_replaced_during_an_outage_is_a_clear_error() {
    init();
    let (dir, big) = big_file_dir("replaced");
    let mut server = Server::start(&dir, &[]);
    let port = server.port;
    let (pipeline, data) = slow_reader(port, "big.bin", 10000, "timeout=8 read-ahead=262144");
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("playing");
    std::thread::sleep(Duration::from_millis(500));
    server.kill();
    std::fs::write(dir.join("big.bin"), vec![7u8; 20 << 20]).expect("replace");
    let _server = Server::start_on(&dir, port, &[]);
    let outcome = common::wait_bus(&bus, Duration::from_secs(30)).unwrap_or(Outcome::TimedOut);
    pipeline.set_state(gst::State::Null).expect("null");
    match outcome {
        Outcome::Error { message, .. } => {
            assert!(message.contains("changed on the server"), "{message}")
        }
        other => panic!("expected a changed-file error, got {other:?}"),
    }
    // Not one byte of the new file reached the pipeline.
    let got = data.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        got[..] == big[..got.len()],
        "bytes of the replaced file were delivered"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pause_longer_than_the_idle_timeout_resumes_and_costs_nothing() {
    init();
    let (dir, big) = big_file_dir("pause");
    let server = Server::start(&dir, &["--idle-timeout", "1"]);
    let read_ahead = 262_144u64;
    let (pipeline, data) = slow_reader(
        server.port,
        "big.bin",
        2000,
        &format!("read-ahead={read_ahead}"),
    );
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("playing");
    std::thread::sleep(Duration::from_millis(500));
    pipeline.set_state(gst::State::Paused).expect("paused");
    settle(&pipeline);
    let src = pipeline
        .downcast_ref::<gst::Bin>()
        .expect("bin")
        .by_name("src")
        .expect("src");
    // Let the read-ahead fill, then measure over a pause of 3 idle timeouts.
    std::thread::sleep(Duration::from_millis(500));
    let before = src.property::<gst::Structure>("stats");
    std::thread::sleep(Duration::from_secs(3));
    let after = src.property::<gst::Structure>("stats");
    let received = |s: &gst::Structure| s.get::<u64>("bytes-received").expect("bytes-received");
    let delivered = |s: &gst::Structure| s.get::<u64>("bytes-delivered").expect("bytes-delivered");
    assert_eq!(
        received(&after),
        received(&before),
        "server kept sending during the pause"
    );
    // What arrived new beyond what the pipeline took is the read-ahead
    // (plus at most one window update of slack): the window held.
    let redundant = after
        .get::<u64>("bytes-redundant")
        .expect("bytes-redundant");
    let ahead = received(&after) - redundant - delivered(&after);
    assert!(
        ahead <= read_ahead + read_ahead / 8 + 1500,
        "{ahead} bytes ahead: {after:?}"
    );
    // Bytes that came twice are probe timeouts' resends of data that had
    // arrived: a starved client's ACKs came late. With three CPU hogs
    // beside a debug build, 5 runs in 16 had one such timeout (two probes,
    // 31,936 bytes); the clean-clone CI once had three. A few timeouts,
    // not a resend storm.
    assert!(
        redundant <= read_ahead / 2,
        "{redundant} bytes twice: {after:?}"
    );
    pipeline.set_state(gst::State::Playing).expect("playing");
    let outcome = common::wait_bus(&bus, Duration::from_secs(60)).unwrap_or(Outcome::TimedOut);
    pipeline.set_state(gst::State::Null).expect("null");
    assert_eq!(outcome, Outcome::Eos);
    let got = data.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(sha256(&got), sha256(&big));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rapid_seeks_neither_hang_nor_leak_sessions() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let pipeline = playbin(&format!("udpvid://127.0.0.1:{}/movie.mkv", server.port));
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Paused).expect("paused");
    settle(&pipeline);
    pipeline.set_state(gst::State::Playing).expect("playing");
    // A user dragging the slider: 30 seeks, 20 ms apart, without waiting.
    for i in 0..30u64 {
        let target = gst::ClockTime::from_mseconds((i * 733) % 4500);
        let _ = pipeline.seek_simple(gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT, target);
        std::thread::sleep(Duration::from_millis(20));
    }
    settle(&pipeline);
    let outcome = common::wait_bus(&bus, Duration::from_secs(30)).unwrap_or(Outcome::TimedOut);
    let started = Instant::now();
    pipeline.set_state(gst::State::Null).expect("null");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(outcome, Outcome::Eos);
    // Every session opened was closed again (the element's own, and the
    // short one that fetched the catalog).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.log_text();
        let opened = log.matches("session opened").count();
        let closed = log.matches("session closed").count();
        if opened == closed {
            assert!(opened <= 2, "{opened} sessions for one playback");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{opened} opened, {closed} closed:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn buffering_and_stats_are_posted_and_a_viewer_costs_one_session() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc name=src port={} file=movie.webm stats-interval=100 ! identity sleep-time=20000 ! fakesink",
        server.port
    ))
    .expect("pipeline");
    let bus = pipeline.bus().expect("bus");
    let buffering = Arc::new(Mutex::new(Vec::new()));
    let stats_seen = Arc::new(AtomicU64::new(0));
    pipeline.set_state(gst::State::Playing).expect("playing");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut done = false;
    while !done && Instant::now() < deadline {
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Buffering(b) => buffering.lock().expect("lock").push(b.percent()),
            gst::MessageView::Element(e) => {
                let Some(s) = e.structure() else { continue };
                if s.name() == "application/x-udpvid-stats" {
                    stats_seen.fetch_add(1, Ordering::Relaxed);
                    assert!(s.get::<f64>("rtt-ms").expect("rtt-ms") >= 0.0);
                }
            }
            gst::MessageView::Eos(_) => done = true,
            gst::MessageView::Error(e) => panic!("{}", e.error()),
            _ => {}
        }
    }
    let src = pipeline
        .downcast_ref::<gst::Bin>()
        .expect("bin")
        .by_name("src")
        .expect("src");
    let stats = src.property::<gst::Structure>("stats");
    pipeline.set_state(gst::State::Null).expect("null");
    assert!(done, "no EOS");
    let size = std::fs::metadata(clips.dir.join("movie.webm"))
        .expect("clip")
        .len();
    assert_eq!(
        stats.get::<u64>("bytes-delivered").expect("field"),
        size,
        "{stats}"
    );
    assert!(stats.get::<u64>("packets-received").expect("field") > 0);
    assert!(stats.get::<f64>("rtt-ms").expect("field") > 0.0, "{stats}");
    assert!(
        stats_seen.load(Ordering::Relaxed) >= 3,
        "stats messages: {}",
        stats_seen.load(Ordering::Relaxed)
    );
    let buffering = buffering.lock().expect("lock").clone();
    assert_eq!(buffering.first(), Some(&0), "{buffering:?}");
    assert_eq!(buffering.last(), Some(&100), "{buffering:?}");
    // Playing never fetched the catalog: one viewer, one session (there
    // used to be a second one, for a catalog message, on every start).
    let log = server.log_text();
    assert_eq!(log.matches("session opened").count(), 1, "{log}");
    assert!(!log.contains("Catalog"), "{log}");
    // An application that wants the list asks for it.
    let catalog = src.property::<gst::Structure>("catalog");
    assert!(!catalog.has_field("error"), "{catalog}");
    let names: Vec<String> = catalog
        .get::<gst::Array>("files")
        .expect("files")
        .iter()
        .filter_map(|v| v.get::<gst::Structure>().ok())
        .filter_map(|f| f.get::<String>("name").ok())
        .collect();
    for name in &clips.names {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
}

#[test]
fn run_pipeline_helper_sees_errors() {
    // Guards the helper the other tests rely on: a failing pipeline must not
    // look like EOS.
    init();
    let pipeline = gst::parse::launch("udpvidsrc ! fakesink").expect("pipeline");
    common::expect_error(
        run_pipeline(&pipeline, Duration::from_secs(10)),
        gst::ResourceError::Settings,
        "file",
    );
}

#[test]
fn player_example_plays_headless_with_a_seek() {
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let out = std::process::Command::new(common::example_binary("player"))
        .args(["--headless", "--seek", "2"])
        .arg(format!("udpvid://127.0.0.1:{}/movie.webm", server.port))
        .output()
        .expect("player runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "player failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("seeked to 2 s"), "{stdout}");
    assert!(stdout.contains("end of stream"), "{stdout}");
    assert!(stdout.contains("rtt"), "no status line: {stdout}");
}

/// A terminal session driven like a person at the keyboard (tmux).
struct Terminal {
    socket: String,
}

impl Terminal {
    fn start(command: &str) -> Terminal {
        let socket = format!("udpvid-test-{}", std::process::id());
        let t = Terminal { socket };
        let ok = std::process::Command::new("tmux")
            .args([
                "-L",
                &t.socket,
                "new-session",
                "-d",
                "-x",
                "160",
                "-y",
                "50",
            ])
            .arg(command)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "tmux cannot start a session (apt install tmux)");
        t
    }

    fn screen(&self) -> String {
        let out = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-S", "-200"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn type_line(&self, text: &str) {
        let ok = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", text, "Enter"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "tmux send-keys");
    }

    /// Waits until the screen satisfies `done`; panics with it after `limit`.
    fn wait_for(&self, limit: Duration, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} after {limit:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn is_running(&self) -> bool {
        std::process::Command::new("tmux")
            .args(["-L", &self.socket, "has-session"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[test]
fn player_browses_the_catalog_plays_the_pick_and_returns_to_the_list() {
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let player = common::example_binary("player");
    let term = Terminal::start(&format!(
        "{} --headless udpvid://127.0.0.1:{}/; echo player exited: $?; sleep 30",
        player.display(),
        server.port
    ));
    let prompts = |s: &str| s.matches("play which?").count();
    term.wait_for(Duration::from_secs(20), "catalog", |s| prompts(s) == 1);
    let screen = term.screen();
    assert!(screen.contains("offers 4 files"), "{screen}");
    for (i, name) in ["movie.mkv", "movie.mp4", "movie.ts", "movie.webm"]
        .iter()
        .enumerate()
    {
        assert!(
            screen.contains(&format!("{}. {name}  (", i + 1)),
            "{name} not listed as number {}:\n{screen}",
            i + 1
        );
    }
    // By number: plays to its end, then the list again.
    term.type_line("3");
    term.wait_for(Duration::from_secs(30), "end of movie.ts", |s| {
        s.contains("end of movie.ts") && prompts(s) == 2
    });
    // By name, and a name that is not there.
    term.type_line("nope.avi");
    term.wait_for(Duration::from_secs(10), "refusal", |s| {
        s.contains("no file \"nope.avi\"") && prompts(s) == 3
    });
    term.type_line("movie.webm");
    term.wait_for(Duration::from_secs(30), "end of movie.webm", |s| {
        s.contains("end of movie.webm") && prompts(s) == 4
    });
    term.type_line("q");
    // The shell's `sleep` keeps the screen for reading after it exits.
    term.wait_for(Duration::from_secs(10), "exit", |s| {
        s.contains("player exited: 0")
    });
    assert!(term.is_running());
}

#[test]
fn catalog_example_lists_the_clips() {
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let out = std::process::Command::new(common::example_binary("catalog"))
        .args(["127.0.0.1", &server.port.to_string()])
        .output()
        .expect("catalog runs");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in &clips.names {
        assert!(stdout.contains(name), "{stdout}");
    }
    assert!(
        stdout.contains(&format!("{} files", clips.names.len())),
        "{stdout}"
    );
}

#[test]
fn file_truncated_while_streaming_is_a_clear_error() {
    init();
    let (dir, _) = big_file_dir("truncated");
    let server = Server::start(&dir, &[]);
    let (pipeline, data) =
        slow_reader(server.port, "big.bin", 10000, "timeout=5 read-ahead=262144");
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("playing");
    std::thread::sleep(Duration::from_millis(500));
    // Cut the file to 4 MiB under the server's feet.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("big.bin"))
        .expect("open");
    f.set_len(4 << 20).expect("truncate");
    drop(f);
    let started = Instant::now();
    let outcome = common::wait_bus(&bus, Duration::from_secs(30)).unwrap_or(Outcome::TimedOut);
    pipeline.set_state(gst::State::Null).expect("null");
    match outcome {
        Outcome::Error { message, .. } => assert!(
            message.contains("read failed") || message.contains("cannot read"),
            "{message}"
        ),
        other => panic!("expected a read error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    // What was delivered before the error is the file's own prefix.
    let got = data.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let want: Vec<u8> = (0..got.len() as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    assert!(got == want, "corrupted bytes were delivered");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn save_while_watching_writes_a_byte_exact_copy() {
    // The README's pipeline: one branch decodes and plays in real time,
    // the other writes the file's bytes as they come (the seed's client
    // did both). Every container, because an MP4 with its index at the
    // end makes the demuxer read the whole file before the first frame,
    // which is what deadlocked the tee with a bounded copy queue.
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    for name in ["movie.mp4", "movie.mkv", "movie.webm", "movie.ts"] {
        let copy = std::env::temp_dir().join(format!("udpvid-saved-{}-{name}", std::process::id()));
        let pipeline = gst::parse::launch(&format!(
            "udpvidsrc port={} file={name} ! tee name=t \
             t. ! identity drop-allocation=true \
                ! queue max-size-buffers=0 max-size-bytes=0 max-size-time=0 \
                ! filesink location={} \
             t. ! queue ! decodebin ! fakesink sync=true",
            server.port,
            copy.display()
        ))
        .expect("pipeline");
        let outcome = run_pipeline(&pipeline, Duration::from_secs(60));
        assert_eq!(outcome, Outcome::Eos, "{name}");
        assert_eq!(
            sha256_file(&copy),
            sha256_file(&clips.dir.join(name)),
            "the saved copy of {name} differs"
        );
        let _ = std::fs::remove_file(copy);
    }
}

fn read_file_at(file: &std::fs::File) -> impl FnMut(u64, &mut [u8]) -> usize + '_ {
    use std::os::unix::fs::FileExt;
    move |offset, buf| file.read_at(buf, offset).unwrap_or(0)
}

#[test]
fn the_server_finds_the_index_of_every_container_the_tests_make() {
    use gstudpvid::protocol::media_index::locate_index;
    let clips = clips();
    for name in &clips.names {
        let path = clips.dir.join(name);
        let file = std::fs::File::open(&path).expect("clip");
        let size = file.metadata().expect("metadata").len();
        let found = locate_index(size, &mut read_file_at(&file));
        let bytes = std::fs::read(&path).expect("clip");
        match name.rsplit('.').next() {
            // mp4mux writes the moov last.
            Some("mp4") => {
                let index = found.unwrap_or_else(|| panic!("no moov found in {name}"));
                assert_eq!(index.range.end, size, "{name}: moov is the last box");
                let at = index.range.start as usize;
                assert_eq!(&bytes[at + 4..at + 8], b"moov", "{name}");
                let len = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
                assert_eq!(u64::from(len), index.range.end - index.range.start);
            }
            // matroskamux writes the Cues after the clusters.
            Some("mkv" | "webm") => {
                let index = found.unwrap_or_else(|| panic!("no Cues found in {name}"));
                let at = index.range.start as usize;
                assert_eq!(
                    &bytes[at..at + 4],
                    &[0x1C, 0x53, 0xBB, 0x6B],
                    "{name}: Cues ID"
                );
                assert!(index.range.start > size / 2, "{name}: Cues at the end");
            }
            _ => assert_eq!(found, None, "{name} has no index to send ahead"),
        }
    }
}

#[test]
fn the_index_comes_with_the_first_bytes_not_with_more_transfers() {
    // At 80 ms RTT the demuxer jumps to the index before the stream gets
    // there. Before the index went ahead, that jump and the one back cost
    // two more transfers (two round trips) before the first frame; on
    // loopback the whole clip arrives first, so the test needs the delay.
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let proxy = common::Proxy::start(server.port, &["--delay-ms", "40"]);
    for name in ["movie.mp4", "movie.mkv", "movie.webm"] {
        let pipeline = playbin(&format!("udpvid://127.0.0.1:{}/{name}", proxy.port));
        let src: std::sync::Arc<std::sync::Mutex<Option<gst::Element>>> = Default::default();
        let keep = src.clone();
        pipeline.connect("source-setup", false, move |args| {
            if let Ok(e) = args[1].get::<gst::Element>() {
                *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
            None
        });
        pipeline.set_state(gst::State::Paused).expect("paused");
        settle(&pipeline);
        let source = src
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("source");
        let stats = source.property::<gst::Structure>("stats");
        pipeline.set_state(gst::State::Null).expect("null");
        let transfers = stats.get::<u64>("transfers").expect("transfers");
        assert_eq!(
            transfers, 1,
            "{name}: {transfers} transfers to preroll: {stats}"
        );
    }
    let _ = proxy.finish();
}
