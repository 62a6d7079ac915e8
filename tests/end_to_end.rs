//! The real server on loopback, real GStreamer pipelines, real video.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gst::prelude::*;

use common::{Outcome, Server, clips, init, run_pipeline, sha256, sha256_file, source};
use gstudpvid::blocking_client::BlockingClient;
use gstudpvid::protocol::ClientConfig;

fn copy_through_udpvid(port: u16, file: &str, read_ahead: u64) -> Vec<u8> {
    let pipeline = gst::Pipeline::new();
    let src = source(port, file);
    src.set_property("read-ahead", read_ahead);
    let sink = gst_app_sink();
    pipeline.add_many([&src, &sink.0]).expect("add");
    src.link(&sink.0).expect("link");
    let outcome = run_pipeline(pipeline.upcast_ref(), Duration::from_secs(60));
    assert_eq!(outcome, Outcome::Eos, "{file}");
    sink.1.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A fakesink that collects every byte it receives, checking offsets.
fn gst_app_sink() -> (gst::Element, Arc<std::sync::Mutex<Vec<u8>>>) {
    let sink = gst::ElementFactory::make("fakesink")
        .property("signal-handoffs", true)
        .property("sync", false)
        .build()
        .expect("fakesink");
    let data = Arc::new(std::sync::Mutex::new(Vec::new()));
    let d = data.clone();
    sink.connect("handoff", false, move |args| {
        let buffer = args[1].get::<gst::Buffer>().expect("handoff buffer");
        let map = buffer.map_readable().expect("readable buffer");
        let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(
            buffer.offset(),
            d.len() as u64,
            "buffer offset out of order"
        );
        d.extend_from_slice(&map);
        None
    });
    (sink, data)
}

#[test]
fn filesink_copy_is_byte_identical_for_every_container() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    for name in &clips.names {
        let out = std::env::temp_dir().join(format!("udpvid-copy-{}-{name}", std::process::id()));
        let pipeline = gst::parse::launch(&format!(
            "udpvidsrc port={} file={name} ! filesink location={}",
            server.port,
            out.display()
        ))
        .expect("pipeline");
        assert_eq!(
            run_pipeline(&pipeline, Duration::from_secs(60)),
            Outcome::Eos,
            "{name}"
        );
        assert_eq!(
            sha256_file(&out),
            sha256_file(&clips.dir.join(name)),
            "{name} differs"
        );
        let _ = std::fs::remove_file(out);
    }
}

/// `udpvidsrc ! filesink` of `name` from `port`: whether the copy is the
/// file, and the mean payload of the datagrams that brought it.
fn copy_and_mean_payload(port: u16, dir: &std::path::Path, name: &str) -> (bool, f64) {
    let out = std::env::temp_dir().join(format!("udpvid-large-{}-{port}", std::process::id()));
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc name=src port={port} file={name} ! filesink location={}",
        out.display()
    ))
    .expect("pipeline");
    // Not `run_pipeline`: the stats go with the session at NULL.
    pipeline.set_state(gst::State::Playing).expect("playing");
    let outcome = common::wait_bus(&pipeline.bus().expect("bus"), Duration::from_secs(60));
    let stats = pipeline
        .downcast_ref::<gst::Bin>()
        .and_then(|b| b.by_name("src"))
        .expect("src")
        .property::<gst::Structure>("stats");
    pipeline.set_state(gst::State::Null).expect("null");
    assert_eq!(outcome, Some(Outcome::Eos), "{name} from {port}");
    let same = sha256_file(&out) == sha256_file(&dir.join(name));
    let _ = std::fs::remove_file(out);
    let bytes = stats.get::<u64>("bytes-received").expect("bytes-received");
    let packets = stats.get::<u64>("data-packets").expect("data-packets");
    (same, bytes as f64 / packets.max(1) as f64)
}

#[test]
fn the_same_host_gets_large_datagrams_and_an_ethernet_path_does_not() {
    init();
    // The trial waits for a transfer's first megabyte: a file of four (the
    // clips hold one).
    let dir = std::env::temp_dir().join(format!("udpvid-large-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let name = "four-megabytes.bin";
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let data: Vec<u8> = (0..4_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(dir.join(name), data).expect("write");
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(dir.clone());
    // On loopback the route carries 64 KB: after one trial, 16,000-byte
    // datagrams.
    let server = Server::start(&dir, &[]);
    let (same, mean) = copy_and_mean_payload(server.port, &dir, name);
    assert!(same, "copy differs");
    assert!(mean > 2_000.0, "mean payload {mean:.0} bytes on loopback");
    // Through a path of 1,500-byte packets the trial is lost, and the rest
    // comes in Ethernet-sized datagrams, whole.
    let proxy = common::Proxy::start(server.port, &[]);
    let (same, mean) = copy_and_mean_payload(proxy.port, &dir, name);
    let report = proxy.finish();
    assert!(same, "copy through the proxy differs: {report}");
    assert!(mean <= 1420.0, "mean payload {mean:.0} bytes: {report}");
    assert!(report.contains("0 queue full, 1 too large"), "{report}");
    // An operator who wants none: --max-datagram 1452.
    let small = Server::start(&dir, &["--max-datagram", "1452"]);
    let (same, mean) = copy_and_mean_payload(small.port, &dir, name);
    assert!(same, "copy differs");
    assert!(mean <= 1420.0, "mean payload {mean:.0} bytes");
}

#[test]
fn small_read_ahead_still_delivers_every_byte_in_order() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let bytes = copy_through_udpvid(server.port, "movie.mkv", 16 * 1024);
    let want = std::fs::read(clips.dir.join("movie.mkv")).expect("clip");
    assert_eq!(sha256(&bytes), sha256(&want));
}

#[test]
fn mp4_clip_has_moov_at_the_end() {
    // The mp4 test clip must exercise the seek-to-the-end path.
    let clips = clips();
    let bytes = std::fs::read(clips.dir.join("movie.mp4")).expect("clip");
    let find = |tag: &[u8]| {
        bytes
            .windows(4)
            .position(|w| w == tag)
            .expect("atom present")
    };
    assert!(find(b"moov") > find(b"mdat"), "moov is not after mdat");
}

/// Decodes every stream of `file` to fakesinks; returns the video frames seen.
fn decode(port: u16, file: &str) -> (Outcome, u64) {
    let pipeline = gst::Pipeline::new();
    let src = source(port, file);
    let decodebin = gst::ElementFactory::make("decodebin")
        .build()
        .expect("decodebin");
    pipeline.add_many([&src, &decodebin]).expect("add");
    src.link(&decodebin).expect("link");
    let frames = Arc::new(AtomicU64::new(0));
    let pipeline_weak = pipeline.downgrade();
    let f = frames.clone();
    decodebin.connect_pad_added(move |_, pad| {
        let Some(pipeline) = pipeline_weak.upgrade() else {
            return;
        };
        let is_video = pad
            .current_caps()
            .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
            .unwrap_or(false);
        let sink = gst::ElementFactory::make("fakesink")
            .property("sync", false)
            .build()
            .expect("fakesink");
        pipeline.add(&sink).expect("add sink");
        sink.sync_state_with_parent().expect("sink state");
        pad.link(&sink.static_pad("sink").expect("sink pad"))
            .expect("link decoded pad");
        if is_video {
            let f = f.clone();
            pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                f.fetch_add(1, Ordering::Relaxed);
                gst::PadProbeReturn::Ok
            });
        }
    });
    let outcome = run_pipeline(pipeline.upcast_ref(), Duration::from_secs(60));
    (outcome, frames.load(Ordering::Relaxed))
}

#[test]
fn decodebin_decodes_every_container_to_eos() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    for name in &clips.names {
        let (outcome, frames) = decode(server.port, name);
        assert_eq!(outcome, Outcome::Eos, "{name}");
        // Every clip holds 150 video frames.
        assert_eq!(frames, 150, "{name}: decoded {frames} video frames");
    }
}

#[test]
fn catalog_lists_every_clip_with_its_size() {
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let client =
        BlockingClient::connect("127.0.0.1", server.port, ClientConfig::default()).expect("client");
    let entries = client.catalog(Duration::from_secs(5)).expect("catalog");
    for name in &clips.names {
        let size = std::fs::metadata(clips.dir.join(name)).expect("clip").len();
        assert!(
            entries.iter().any(|e| e.name == *name && e.size == size),
            "{name} ({size} bytes) missing from {entries:?}"
        );
    }
}

#[test]
fn missing_file_is_a_not_found_error_naming_what_is_offered() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc port={} file=nope.mp4 ! fakesink",
        server.port
    ))
    .expect("pipeline");
    match run_pipeline(&pipeline, Duration::from_secs(20)) {
        Outcome::Error {
            domain_resource,
            message,
            ..
        } => {
            assert_eq!(domain_resource, Some(gst::ResourceError::NotFound));
            assert!(message.contains("nope.mp4"), "{message}");
            assert!(
                message.contains("movie.mp4"),
                "catalog not listed: {message}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn paths_leaving_the_folder_are_refused_and_logged() {
    init();
    let base = std::env::temp_dir().join(format!("udpvid-escape-{}", std::process::id()));
    let served = base.join("served");
    std::fs::create_dir_all(&served).expect("dir");
    std::fs::write(base.join("secret.txt"), b"do not serve").expect("secret");
    std::fs::write(served.join("ok.bin"), b"fine").expect("ok");
    std::os::unix::fs::symlink(base.join("secret.txt"), served.join("link.bin")).expect("symlink");
    let server = Server::start(&served, &[]);
    for bad in ["../secret.txt", "/etc/passwd", "link.bin"] {
        let pipeline = gst::Pipeline::new();
        let src = source(server.port, bad);
        let sink = gst::ElementFactory::make("fakesink")
            .build()
            .expect("fakesink");
        pipeline.add_many([&src, &sink]).expect("add");
        src.link(&sink).expect("link");
        match run_pipeline(pipeline.upcast_ref(), Duration::from_secs(20)) {
            Outcome::Error {
                domain_resource, ..
            } => {
                assert_eq!(domain_resource, Some(gst::ResourceError::NotFound), "{bad}")
            }
            other => panic!("{bad}: expected not found, got {other:?}"),
        }
    }
    // The good file still works, and the refusals are in the log.
    let bytes = copy_through_udpvid(server.port, "ok.bin", 65536);
    assert_eq!(bytes, b"fine");
    let log = server.log_text();
    assert!(log.matches("open refused").count() >= 3, "log: {log}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn server_down_is_an_error_after_the_timeout_not_eos() {
    init();
    // A port nobody listens on: bind, note it, close.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc port={port} file=movie.mp4 timeout=1 ! fakesink"
    ))
    .expect("pipeline");
    let started = Instant::now();
    common::expect_error(
        run_pipeline(&pipeline, Duration::from_secs(20)),
        gst::ResourceError::OpenRead,
        "No answer",
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn server_killed_mid_stream_is_an_error_not_eos() {
    init();
    let dir = std::env::temp_dir().join(format!("udpvid-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let big: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("big.bin"), &big).expect("write");
    let mut server = Server::start(&dir, &[]);
    // A slow reader (10 ms per 64 KiB block) and a small read-ahead: most of
    // the file is still on the server when it dies.
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc port={} file=big.bin timeout=2 read-ahead=65536 ! identity sleep-time=10000 ! fakesink",
        server.port
    ))
    .expect("pipeline");
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("playing");
    std::thread::sleep(Duration::from_millis(1000));
    server.kill();
    let killed = Instant::now();
    let outcome = common::wait_bus(&bus, Duration::from_secs(20)).unwrap_or(Outcome::TimedOut);
    pipeline.set_state(gst::State::Null).expect("null");
    common::expect_error(outcome, gst::ResourceError::OpenRead, "No answer");
    // Reported within the timeout (2 s) plus slack, not hung.
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "{:?}",
        killed.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stopping_mid_stream_does_not_hang() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    for _ in 0..3 {
        let pipeline = gst::parse::launch(&format!(
            "udpvidsrc port={} file=movie.mkv read-ahead=32768 ! matroskademux ! h264parse ! avdec_h264 ! fakesink sync=true",
            server.port
        ))
        .expect("pipeline");
        pipeline.set_state(gst::State::Playing).expect("playing");
        std::thread::sleep(Duration::from_millis(400));
        let started = Instant::now();
        pipeline.set_state(gst::State::Null).expect("null");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "NULL took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_server_that_answers_but_never_delivers_is_an_error() {
    use gstudpvid::protocol::wire::{Body, Packet};
    init();
    // A fake server that completes the handshake, accepts the open, answers
    // every ping, and never sends a byte of the file: the element must not
    // take the pongs for progress and wait forever.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = socket.local_addr().expect("addr").port();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pongs = Arc::new(AtomicU64::new(0));
    let fake = {
        let (done, pongs) = (done.clone(), pongs.clone());
        std::thread::spawn(move || {
            let cid = 42;
            let mut pn = 0;
            let mut buf = [0u8; 2048];
            let limit = Instant::now() + Duration::from_secs(30);
            while !done.load(Ordering::Acquire) && Instant::now() < limit {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(packet) = Packet::decode(&buf[..n]) else {
                    continue;
                };
                let mut replies = Vec::new();
                match packet.body {
                    Body::Hello {
                        client_nonce,
                        early_open,
                        ..
                    } => {
                        replies.push(Body::Welcome {
                            client_nonce,
                            idle_timeout_ms: 30_000,
                            max_payload: 1420,
                            server_random: [0; 16],
                            auth_tag: None,
                            early_open_accepted: early_open.is_some(),
                        });
                        if let Some(o) = early_open {
                            replies.push(Body::OpenOk {
                                transfer_id: o.transfer_id,
                                size: 1 << 20,
                                content_tag: 1,
                                offset: 0,
                                index: None,
                            });
                        }
                    }
                    Body::Open(o) => replies.push(Body::OpenOk {
                        transfer_id: o.transfer_id,
                        size: 1 << 20,
                        content_tag: 1,
                        offset: 0,
                        index: None,
                    }),
                    Body::Ping => {
                        pongs.fetch_add(1, Ordering::Relaxed);
                        replies.push(Body::Pong);
                    }
                    _ => {}
                }
                for body in replies {
                    pn += 1;
                    let _ = socket.send_to(&Packet::new(cid, pn, body).encode(), from);
                }
            }
        })
    };
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc port={port} file=x.mp4 timeout=2 ! fakesink"
    ))
    .expect("pipeline");
    let started = Instant::now();
    let message = common::expect_error(
        run_pipeline(&pipeline, Duration::from_secs(20)),
        gst::ResourceError::Read,
        "stalled",
    );
    // The error names where the flow stopped.
    for needle in [
        "window",
        "buffered",
        "allowed but not received",
        "no data yet",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    let took = started.elapsed();
    done.store(true, Ordering::Release);
    fake.join().expect("fake server");
    assert!(pongs.load(Ordering::Relaxed) > 0, "the client never pinged");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn version_mismatch_is_reported() {
    use gstudpvid::protocol::wire::{Body, Packet};
    init();
    // A fake server from the future: answers everything with version negotiation.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = socket.local_addr().expect("addr").port();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let fake = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            let reply = Packet::new(0, 0, Body::VersionNegotiation { supported: vec![7] }).encode();
            let _ = socket.send_to(&reply, from);
        }
    });
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc port={port} file=x.mp4 timeout=5 ! fakesink"
    ))
    .expect("pipeline");
    match run_pipeline(&pipeline, Duration::from_secs(20)) {
        Outcome::Error { message, .. } => assert!(message.contains("version"), "{message}"),
        other => panic!("expected a version error, got {other:?}"),
    }
    fake.join().expect("fake server");
}

#[test]
fn passphrase_protects_catalog_and_files() {
    init();
    let clips = clips();
    let secret = std::env::temp_dir().join(format!("udpvid-pass-{}", std::process::id()));
    std::fs::write(&secret, "open sesame\n").expect("passphrase file");
    let server = Server::start(
        &clips.dir,
        &["--passphrase-file", secret.to_str().expect("path")],
    );
    // The right passphrase: a byte-identical copy.
    let out = std::env::temp_dir().join(format!("udpvid-pass-copy-{}.mkv", std::process::id()));
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc port={} file=movie.mkv passphrase=\"open sesame\" ! filesink location={}",
        server.port,
        out.display()
    ))
    .expect("pipeline");
    assert_eq!(
        run_pipeline(&pipeline, Duration::from_secs(60)),
        Outcome::Eos
    );
    assert_eq!(sha256_file(&out), sha256_file(&clips.dir.join("movie.mkv")));
    let _ = std::fs::remove_file(&out);
    // A wrong passphrase, or none: a clear error, and no catalog in it.
    for extra in ["passphrase=wrong", ""] {
        let pipeline = gst::parse::launch(&format!(
            "udpvidsrc port={} file=movie.mkv {extra} timeout=5 ! fakesink",
            server.port
        ))
        .expect("pipeline");
        match run_pipeline(&pipeline, Duration::from_secs(20)) {
            Outcome::Error {
                domain_resource,
                message,
                ..
            } => {
                assert_eq!(
                    domain_resource,
                    Some(gst::ResourceError::NotAuthorized),
                    "{message}"
                );
                assert!(message.contains("authentication failed"), "{message}");
                assert!(!message.contains("movie.mp4"), "catalog leaked: {message}");
            }
            other => panic!("{extra:?}: expected an authentication error, got {other:?}"),
        }
    }
    let client =
        BlockingClient::connect("127.0.0.1", server.port, ClientConfig::default()).expect("client");
    let err = client
        .catalog(Duration::from_secs(5))
        .expect_err("catalog without passphrase");
    assert!(err.to_string().contains("authentication failed"), "{err}");
    let _ = std::fs::remove_file(&secret);
}
