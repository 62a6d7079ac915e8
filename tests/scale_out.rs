//! Beyond one machine: a library in S3-compatible object storage (a moto
//! server the tests start), several servers over one library, and a player
//! given a list that moves to the next server when the one in use dies,
//! shuts down or never answers, and refuses to splice a different file.

mod common;

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

use common::{Server, init, run_pipeline, sha256, sha256_file};

/// A 20 s clip of about 5 MB (snow does not compress), long enough that most of it is still on the server when
/// the server dies a few seconds in; made once.
fn library() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        init();
        let dir = common::target_profile_dir()
            .join("..")
            .join("failover-media");
        std::fs::create_dir_all(&dir).expect("media dir");
        let clip = dir.join("long.mkv");
        if !clip.metadata().is_ok_and(|m| m.len() > 0) {
            let tmp = dir.join(format!(".long.{}.tmp", std::process::id()));
            let pipeline = gst::parse::launch(&format!(
                "videotestsrc num-buffers=600 pattern=snow ! video/x-raw,width=640,height=360,framerate=30/1 \
                 ! x264enc speed-preset=ultrafast bitrate=2000 key-int-max=30 ! h264parse ! mux. \
                 audiotestsrc num-buffers=860 ! audioconvert ! avenc_aac ! aacparse ! mux. \
                 matroskamux name=mux ! filesink location={}",
                tmp.display()
            ))
            .expect("clip pipeline");
            assert_eq!(
                run_pipeline(&pipeline, Duration::from_secs(120)),
                common::Outcome::Eos,
                "making long.mkv"
            );
            std::fs::rename(&tmp, &clip).expect("rename clip");
        }
        dir
    })
    .clone()
}

/// The bytes a source pushed, placed at their offsets.
#[derive(Clone, Default)]
struct SparseCopy(Arc<Mutex<(Vec<u8>, Vec<bool>)>>);

impl SparseCopy {
    fn record(&self, src: &gst::Element) {
        let copy = self.clone();
        src.static_pad("src").expect("src pad").add_probe(
            gst::PadProbeType::BUFFER,
            move |_, info| {
                if let Some(buffer) = info.buffer() {
                    let offset = buffer.offset() as usize;
                    let map = buffer.map_readable().expect("readable buffer");
                    let mut c = copy.0.lock().expect("lock");
                    let end = offset + map.len();
                    if c.0.len() < end {
                        c.0.resize(end, 0);
                        c.1.resize(end, false);
                    }
                    c.0[offset..end].copy_from_slice(&map);
                    c.1[offset..end].fill(true);
                }
                gst::PadProbeReturn::Ok
            },
        );
    }

    /// Whether every byte of `file` was pushed, and pushed right.
    fn matches(&self, file: &[u8]) -> Result<(), String> {
        let c = self.0.lock().expect("lock");
        if c.0.len() != file.len() {
            return Err(format!("{} bytes pushed of {}", c.0.len(), file.len()));
        }
        if let Some(hole) = c.1.iter().position(|&b| !b) {
            return Err(format!("byte {hole} never pushed"));
        }
        match c.0.iter().zip(file).position(|(a, b)| a != b) {
            Some(at) => Err(format!("byte {at} differs from the file")),
            None => Ok(()),
        }
    }
}

fn temp_out(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("udpvid-failover-{tag}-{}", std::process::id()))
}

/// Video frames as the sink renders them.
#[derive(Default)]
struct Frames {
    first: Option<Instant>,
    last: Option<Instant>,
    longest_gap: Duration,
}

/// What a real-time viewer saw.
struct Viewing {
    result: Result<(), String>,
    /// Longest wall-clock gap between two video frames after the first.
    longest_gap: Duration,
    /// Buffering messages below 100 % after playback began.
    stalls: u32,
    stats: Option<gst::Structure>,
}

/// A real-time viewer (decoder, sink synchronised to the clock) driven by
/// an application that pauses on buffering as gst-launch does. The small
/// queue puts the source in push mode at the viewer's pace, so a server
/// that dies early leaves most of the file to the next one. Every byte
/// the source pushes lands in `copy` at its offset. `during` runs every
/// tick with the time since the first frame.
fn watch(uri: &str, copy: &SparseCopy, mut during: impl FnMut(Option<Duration>)) -> Viewing {
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc name=src uri={uri} timeout=10 \
         ! queue max-size-buffers=4 max-size-bytes=0 max-size-time=0 \
         ! decodebin ! video/x-raw ! fakesink name=video sync=true signal-handoffs=true"
    ))
    .expect("pipeline");
    let bin = pipeline.clone().downcast::<gst::Bin>().expect("bin");
    let frames: Arc<Mutex<Frames>> = Arc::default();
    copy.record(&bin.by_name("src").expect("src"));
    {
        let frames = frames.clone();
        bin.by_name("video")
            .expect("video sink")
            .connect("handoff", false, move |_| {
                let now = Instant::now();
                let mut f = frames.lock().expect("lock");
                if let Some(last) = f.last {
                    f.longest_gap = f.longest_gap.max(now - last);
                }
                f.first.get_or_insert(now);
                f.last = Some(now);
                None
            });
    }
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Paused).expect("paused");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut result = None;
    let mut stalls = 0;
    let mut stats = None;
    while result.is_none() && Instant::now() < deadline {
        let first_frame = frames.lock().expect("lock").first;
        during(first_frame.map(|t| t.elapsed()));
        if let Some(src) = bin.by_name("src") {
            stats = Some(src.property::<gst::Structure>("stats"));
        }
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(20)) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Buffering(b) if b.percent() < 100 => {
                if first_frame.is_some() {
                    stalls += 1;
                }
                let _ = pipeline.set_state(gst::State::Paused);
            }
            gst::MessageView::Buffering(_) => {
                let _ = pipeline.set_state(gst::State::Playing);
            }
            gst::MessageView::Eos(_) => result = Some(Ok(())),
            gst::MessageView::Error(e) => {
                result = Some(Err(format!(
                    "{} ({})",
                    e.error(),
                    e.debug().map(|d| d.to_string()).unwrap_or_default()
                )))
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).expect("null");
    let longest_gap = frames.lock().expect("lock").longest_gap;
    Viewing {
        result: result.unwrap_or_else(|| Err("no end within 90 s".into())),
        longest_gap,
        stalls,
        stats,
    }
}

fn stat_u64(stats: &Option<gst::Structure>, field: &str) -> u64 {
    stats
        .as_ref()
        .and_then(|s| s.get::<u64>(field).ok())
        .unwrap_or_else(|| panic!("no {field} in {stats:?}"))
}

fn stat_server(stats: &Option<gst::Structure>) -> String {
    stats
        .as_ref()
        .and_then(|s| s.get::<String>("server").ok())
        .unwrap_or_default()
}

/// Two servers over one library, made by `start`; the first one goes
/// away three seconds into playback, killed (silence) or shut down (it
/// says so).
fn viewer_moves_on_when_the_first_server(start: impl Fn() -> Server, goes: fn(&mut Server)) {
    let dir = library();
    let mut first = start();
    let second = start();
    let uri = format!(
        "udpvid://127.0.0.1:{},127.0.0.1:{}/long.mkv",
        first.port, second.port
    );
    let copy = SparseCopy::default();
    let mut gone = false;
    let seen = watch(&uri, &copy, |played| {
        if !gone && played.is_some_and(|p| p > Duration::from_secs(3)) {
            gone = true;
            goes(&mut first);
        }
    });
    assert!(gone, "the first server was never stopped");
    eprintln!(
        "longest gap between frames {:?}, stalls {}",
        seen.longest_gap, seen.stalls
    );
    if let Err(e) = &seen.result {
        panic!("{e}");
    }
    let file = std::fs::read(dir.join("long.mkv")).expect("read clip");
    if let Err(e) = copy.matches(&file) {
        panic!("{e}");
    }
    assert_eq!(stat_u64(&seen.stats, "failovers"), 1);
    assert_eq!(
        stat_server(&seen.stats),
        format!("127.0.0.1:{}", second.port)
    );
    // The read-ahead covered the switch: the viewer never waited.
    assert_eq!(seen.stalls, 0, "the viewer saw rebuffering");
    assert!(
        seen.longest_gap < Duration::from_millis(500),
        "a {:?} freeze between two frames",
        seen.longest_gap
    );
    assert!(
        second.log_text().contains("long.mkv"),
        "the second server did not serve the file"
    );
}

#[test]
fn a_real_time_viewer_continues_on_the_next_server_when_one_is_killed() {
    let dir = library();
    viewer_moves_on_when_the_first_server(|| Server::start(&dir, &[]), Server::kill);
}

#[test]
fn a_real_time_viewer_continues_on_the_next_server_when_one_shuts_down() {
    let dir = library();
    viewer_moves_on_when_the_first_server(|| Server::start(&dir, &[]), Server::terminate);
}

#[test]
fn a_first_server_that_never_answers_is_skipped_quickly() {
    let dir = library();
    // Bound but silent: datagrams vanish, no ICMP error hints at it.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dead_port = silent.local_addr().expect("addr").port();
    let server = Server::start(&dir, &[]);
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc name=src uri=udpvid://127.0.0.1:{dead_port},127.0.0.1:{}/long.mkv timeout=10 \
         ! fakesink name=sink",
        server.port
    ))
    .expect("pipeline");
    let bin = pipeline.clone().downcast::<gst::Bin>().expect("bin");
    let src = bin.by_name("src").expect("src");
    let sink = bin.by_name("sink").expect("sink");
    let first_buffer: Arc<Mutex<Option<Instant>>> = Arc::default();
    {
        let first_buffer = first_buffer.clone();
        sink.static_pad("sink")
            .expect("pad")
            .add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                first_buffer
                    .lock()
                    .expect("lock")
                    .get_or_insert_with(Instant::now);
                gst::PadProbeReturn::Ok
            });
    }
    let bus = pipeline.bus().expect("bus");
    let started = Instant::now();
    pipeline.set_state(gst::State::Playing).expect("playing");
    let outcome = common::wait_bus(&bus, Duration::from_secs(60));
    // Read before stopping: a stopped element reports zeros.
    let stats = Some(src.property::<gst::Structure>("stats"));
    pipeline.set_state(gst::State::Null).expect("null");
    assert_eq!(outcome, Some(common::Outcome::Eos));
    let first = first_buffer.lock().expect("lock").expect("no buffer");
    // Not the 10 s timeout: the handshake gives up after one second.
    let waited = first - started;
    assert!(
        waited < Duration::from_secs(4),
        "first byte after {waited:?}"
    );
    assert_eq!(stat_u64(&stats, "failovers"), 1);
    assert_eq!(stat_server(&stats), format!("127.0.0.1:{}", server.port));
    drop(silent);
}

#[test]
fn a_list_mixing_ipv6_and_ipv4_plays_from_the_one_that_answers() {
    let clips = common::clips();
    let server = Server::start(&clips.dir, &[]);
    // Nothing listens on [::1] at this port (or IPv6 is off): the one
    // dual-stack socket must still reach the IPv4 server, and report it
    // in its plain form.
    let dead = free_tcp_port();
    let out = temp_out("mixed");
    let (pipeline, src) = launch_with_src(&format!(
        "udpvidsrc name=src uri=udpvid://[::1]:{dead},127.0.0.1:{}/movie.mkv timeout=10 \
         ! filesink location={}",
        server.port,
        out.display()
    ));
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("playing");
    let outcome = common::wait_bus(&bus, Duration::from_secs(30));
    let stats = Some(src.property::<gst::Structure>("stats"));
    pipeline.set_state(gst::State::Null).expect("null");
    assert_eq!(outcome, Some(common::Outcome::Eos));
    assert_eq!(sha256_file(&out), sha256_file(&clips.dir.join("movie.mkv")));
    assert_eq!(stat_server(&stats), format!("127.0.0.1:{}", server.port));
    assert_eq!(stat_u64(&stats, "failovers"), 1);
    let _ = std::fs::remove_file(out);
}

/// A pipeline from `description` and its element named `src`.
fn launch_with_src(description: &str) -> (gst::Element, gst::Element) {
    let pipeline = gst::parse::launch(description).expect("pipeline");
    let src = pipeline
        .clone()
        .downcast::<gst::Bin>()
        .expect("bin")
        .by_name("src")
        .expect("src");
    (pipeline, src)
}

/// A protocol client holding a session on the server at `port`, with
/// `long.mkv` open; the server's refusal as text.
fn hold_session(port: u16) -> Result<gstudpvid::blocking_client::BlockingClient, String> {
    let client = gstudpvid::blocking_client::BlockingClient::connect_and_open(
        "127.0.0.1",
        port,
        Default::default(),
        "long.mkv",
        0,
    )
    .map_err(|e| e.to_string())?;
    client
        .open("long.mkv", 0, Duration::from_secs(5))
        .map_err(|e| format!("{e:?}"))?;
    Ok(client)
}

#[test]
fn a_busy_first_server_is_skipped_at_once() {
    let dir = library();
    let busy = Server::start(&dir, &["--max-sessions", "1"]);
    let free = Server::start(&dir, &[]);
    // The busy server's only session is taken.
    let holder = hold_session(busy.port).expect("the first client is served");
    let (pipeline, src) = launch_with_src(&format!(
        "udpvidsrc name=src uri=udpvid://127.0.0.1:{},127.0.0.1:{}/long.mkv timeout=10 ! fakesink",
        busy.port, free.port
    ));
    let started = Instant::now();
    pipeline.set_state(gst::State::Paused).expect("paused");
    let (changed, _, _) = pipeline.state(gst::ClockTime::from_seconds(10));
    let prerolled = started.elapsed();
    let stats = Some(src.property::<gst::Structure>("stats"));
    pipeline.set_state(gst::State::Null).expect("null");
    holder.close();
    assert!(changed.is_ok(), "did not preroll from the free server");
    assert_eq!(stat_u64(&stats, "failovers"), 1);
    assert_eq!(stat_server(&stats), format!("127.0.0.1:{}", free.port));
    // Told "busy" (the client moves on at that answer rather than after
    // the 1 s handshake timeout; the time is printed, not asserted, as
    // this machine's load varies).
    eprintln!("prerolled from the second server after {prerolled:?}");
    assert!(busy.log_text().contains("session refused"));
}

#[test]
fn a_next_server_with_another_version_of_the_file_is_an_error_not_a_splice() {
    init();
    let a = temp_out("lib-a");
    let b = temp_out("lib-b");
    for dir in [&a, &b] {
        std::fs::create_dir_all(dir).expect("dir");
    }
    // Same name and size, other bytes: the content tags differ.
    let bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + (i >> 12)) as u8).collect();
    std::fs::write(a.join("f.bin"), &bytes).expect("write");
    let other: Vec<u8> = bytes.iter().map(|b| b ^ 0x5a).collect();
    std::fs::write(b.join("f.bin"), &other).expect("write");
    let mut first = Server::start(&a, &[]);
    let second = Server::start(&b, &[]);
    let out = temp_out("splice");
    // A slow reader with a small read-ahead: most of the file is left when
    // the first server dies.
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc uri=udpvid://127.0.0.1:{},127.0.0.1:{}/f.bin read-ahead=65536 timeout=5 \
         ! identity sleep-time=20000 ! filesink location={}",
        first.port,
        second.port,
        out.display()
    ))
    .expect("pipeline");
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("playing");
    std::thread::sleep(Duration::from_millis(800));
    first.kill();
    let outcome =
        common::wait_bus(&bus, Duration::from_secs(30)).unwrap_or(common::Outcome::TimedOut);
    pipeline.set_state(gst::State::Null).expect("null");
    let message = common::expect_error(outcome, gst::ResourceError::Read, "changed on the server");
    assert!(message.contains("f.bin"), "{message}");
    // What was written is a prefix of the first version only.
    let written = std::fs::read(&out).unwrap_or_default();
    assert!(written.len() < bytes.len(), "the whole file came through");
    assert_eq!(written[..], bytes[..written.len()], "bytes were spliced");
    drop(second);
    for p in [&a, &b] {
        let _ = std::fs::remove_dir_all(p);
    }
    let _ = std::fs::remove_file(out);
}

// ---- Object storage -------------------------------------------------------

/// An S3-compatible server (moto, installed by `make` into target/venv) on
/// a free loopback port; killed when dropped.
struct S3 {
    child: Child,
    port: u16,
}

fn venv_bin(name: &str) -> PathBuf {
    let bin = common::target_profile_dir()
        .join("..")
        .join("venv")
        .join("bin")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: `make test` (or `make venv`) installs moto into target/venv",
        bin.display()
    );
    bin
}

impl S3 {
    fn start() -> S3 {
        Self::start_with(&[])
    }

    fn start_with(env: &[(&str, &str)]) -> S3 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(venv_bin("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3 { child, port }
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "udpvid-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "udpvid-test".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Creates `bucket` if needed and uploads `(key, file)` pairs.
    fn put(&self, bucket: &str, objects: &[(&str, &Path)]) {
        let mut script = format!(
            "import boto3\n\
             s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', \
             aws_access_key_id='udpvid-test', aws_secret_access_key='udpvid-test', \
             region_name='us-east-1')\n\
             try:\n    s3.create_bucket(Bucket={bucket:?})\n\
             except s3.exceptions.BucketAlreadyOwnedByYou:\n    pass\n",
            self.port
        );
        for (key, file) in objects {
            script.push_str(&format!(
                "s3.upload_file({:?}, {bucket:?}, {key:?})\n",
                file.display().to_string()
            ));
        }
        let status = Command::new(venv_bin("python"))
            .args(["-c", &script])
            .status()
            .expect("python runs");
        assert!(status.success(), "upload failed");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A file of `len` bytes that compresses to nothing like itself.
fn noise(path: &Path, len: usize, seed: u32) {
    let bytes: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(path, bytes).expect("write");
}

/// A moto server whose bucket "library" holds `key`: `size` bytes of
/// noise, also kept in a local file (returned) to compare with.
fn bucket_with_noise(key: &str, size: u64, seed: u32) -> (S3, PathBuf) {
    let s3 = S3::start();
    let file = temp_out(key);
    noise(&file, size as usize, seed);
    s3.put("library", &[(key, &file)]);
    (s3, file)
}

/// The server's /metrics page.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut page = String::new();
    s.read_to_string(&mut page).expect("page");
    page
}

fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A server of `url` in `s3` with its metrics page; returns it and the
/// page's port.
fn store_with_metrics(s3: &S3, url: &str, extra: &[&str]) -> (Server, u16) {
    let metrics_port = free_tcp_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut args = vec!["--metrics", metrics.as_str()];
    args.extend_from_slice(extra);
    (Server::start_store(url, &s3.env(), &args), metrics_port)
}

/// The bytes of `file` pulled through `udpvidsrc` as a filesink copy.
fn pull(port: u16, file: &str, tag: &str) -> Result<Vec<u8>, String> {
    let out = temp_out(tag);
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc port={port} file={file} timeout=10 ! filesink location={}",
        out.display()
    ))
    .expect("pipeline");
    let outcome = run_pipeline(&pipeline, Duration::from_secs(60));
    let bytes = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    match outcome {
        common::Outcome::Eos => Ok(bytes),
        other => Err(format!("{other:?}")),
    }
}

#[test]
fn a_bucket_is_served_byte_exact_with_its_listing_as_the_catalog() {
    let clips = common::clips();
    let s3 = S3::start();
    let outside = temp_out("outside");
    noise(&outside, 1000, 1);
    let mut objects: Vec<(String, PathBuf)> = clips
        .names
        .iter()
        .map(|n| (format!("films/{n}"), clips.dir.join(n)))
        .collect();
    objects.push(("other/secret.bin".into(), outside.clone()));
    let refs: Vec<(&str, &Path)> = objects
        .iter()
        .map(|(k, p)| (k.as_str(), p.as_path()))
        .collect();
    s3.put("library", &refs);
    let (server, metrics_port) = store_with_metrics(&s3, "s3://library/films", &[]);
    let client = gstudpvid::blocking_client::BlockingClient::connect(
        "127.0.0.1",
        server.port,
        Default::default(),
    )
    .expect("client");
    let mut listed: Vec<String> = client
        .catalog(Duration::from_secs(10))
        .expect("catalog")
        .into_iter()
        .map(|e| e.name)
        .collect();
    client.close();
    listed.sort();
    let mut expected: Vec<String> = clips.names.iter().map(|n| n.to_string()).collect();
    expected.sort();
    assert_eq!(
        listed, expected,
        "the catalog is the listing under the prefix"
    );
    let mut total = 0;
    for name in &clips.names {
        let bytes = pull(server.port, name, "s3-pull").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(sha256(&bytes), sha256_file(&clips.dir.join(name)), "{name}");
        total += bytes.len() as u64;
    }
    // Outside the prefix is not served.
    let refused = pull(server.port, "../other/secret.bin", "s3-outside");
    assert!(refused.is_err(), "an object outside the prefix was served");
    let page = scrape(metrics_port);
    assert_eq!(metric(&page, "udpvid_store_bytes_read_total"), total);
    assert!(metric(&page, "udpvid_bytes_sent_total") >= total);
    assert!(metric(&page, "udpvid_transfers_total") >= clips.names.len() as u64);
    let _ = std::fs::remove_file(outside);
}

/// `n` concurrent pulls of `name`, each checked against `expected`.
fn pull_concurrently(port: u16, name: &'static str, n: usize, expected: &str) {
    let viewers: Vec<_> = (0..n)
        .map(|i| std::thread::spawn(move || pull(port, name, &format!("{name}-{i}"))))
        .collect();
    for v in viewers {
        let bytes = v.join().expect("viewer").expect("pull");
        assert_eq!(sha256(&bytes), expected);
    }
}

#[test]
fn ten_viewers_of_one_object_cost_one_copy_from_the_store() {
    init();
    let size = 6u64 << 20;
    let (s3, file) = bucket_with_noise("ten.bin", size, 2);
    let (server, metrics_port) = store_with_metrics(&s3, "s3://library", &[]);
    pull_concurrently(server.port, "ten.bin", 10, &sha256_file(&file));
    let page = scrape(metrics_port);
    let read = metric(&page, "udpvid_store_bytes_read_total");
    let gets = metric(&page, "udpvid_store_gets_total");
    eprintln!(
        "store bytes {read} for 10 x {size}: {:.2} copies; {gets} GETs",
        read as f64 / size as f64
    );
    assert!(
        read as f64 <= 1.1 * size as f64,
        "the store served {read} bytes for one {size}-byte object"
    );
    // One GET per 1 MiB block, however many viewers missed it at once.
    assert_eq!(gets, size.div_ceil(1 << 20));
    let _ = std::fs::remove_file(file);
}

#[test]
fn the_block_cache_stays_within_its_cap() {
    init();
    let (s3, file) = bucket_with_noise("cap.bin", 6 << 20, 6);
    // Smaller than the file: blocks are evicted while viewers play.
    let (server, metrics_port) = store_with_metrics(
        &s3,
        "s3://library",
        &["--cache-mb", "2", "--block-kb", "256"],
    );
    pull_concurrently(server.port, "cap.bin", 3, &sha256_file(&file));
    let page = scrape(metrics_port);
    let peak = metric(&page, "udpvid_cache_peak_bytes");
    eprintln!("cache peak {peak} bytes, cap {}", 2 << 20);
    assert!(
        peak <= 2 << 20,
        "the cache held {peak} bytes over its 2 MiB cap"
    );
    assert!(peak >= 1 << 20, "the cache held nothing ({peak})");
    assert!(metric(&page, "udpvid_cache_bytes") <= 2 << 20);
    let _ = std::fs::remove_file(file);
}

#[test]
fn the_cache_folder_serves_what_memory_evicted_and_survives_a_restart() {
    init();
    let size = 6u64 << 20;
    let (s3, file) = bucket_with_noise("disk.bin", size, 7);
    let cache_dir = temp_out("cache-dir");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let expected = sha256_file(&file);
    let start = || {
        store_with_metrics(
            &s3,
            "s3://library",
            &[
                "--cache-mb",
                "2",
                "--block-kb",
                "256",
                "--cache-dir",
                cache_dir.to_str().expect("utf-8 path"),
                "--cache-dir-mb",
                "16",
            ],
        )
    };
    // Memory holds a third of the file; the folder holds all of it.
    let (server, metrics_port) = start();
    for round in 0..2 {
        let bytes = pull(server.port, "disk.bin", "disk").expect("pull");
        assert_eq!(sha256(&bytes), expected, "round {round}");
    }
    let page = scrape(metrics_port);
    assert_eq!(metric(&page, "udpvid_store_bytes_read_total"), size);
    assert!(
        metric(&page, "udpvid_disk_cache_hits_total") >= 16,
        "{page}"
    );
    // Written off the serving thread: give the last block a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&scrape(metrics_port), "udpvid_disk_cache_bytes") < size {
        assert!(Instant::now() < deadline, "the folder never held the file");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
    // A restarted server finds the blocks: the store is not asked again.
    let (server, metrics_port) = start();
    let bytes = pull(server.port, "disk.bin", "disk-restart").expect("pull");
    assert_eq!(sha256(&bytes), expected);
    let page = scrape(metrics_port);
    assert_eq!(metric(&page, "udpvid_store_bytes_read_total"), 0, "{page}");
    assert_eq!(metric(&page, "udpvid_disk_cache_bytes"), size);
    let _ = std::fs::remove_dir_all(cache_dir);
    let _ = std::fs::remove_file(file);
}

#[test]
fn an_object_replaced_mid_stream_is_a_clear_error_and_nothing_is_spliced() {
    init();
    let s3 = S3::start();
    let v1 = temp_out("v1.bin");
    let v2 = temp_out("v2.bin");
    noise(&v1, 8 << 20, 3);
    noise(&v2, 8 << 20, 4);
    s3.put("library", &[("film.bin", &v1)]);
    // Small blocks and cache: most of the file is still in the store
    // when it changes.
    let server = Server::start_store(
        "s3://library",
        &s3.env(),
        &["--cache-mb", "1", "--block-kb", "256"],
    );
    let out = temp_out("replaced");
    let pipeline = gst::parse::launch(&format!(
        "udpvidsrc port={} file=film.bin read-ahead=65536 timeout=10 \
         ! identity sleep-time=20000 ! filesink location={}",
        server.port,
        out.display()
    ))
    .expect("pipeline");
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("playing");
    std::thread::sleep(Duration::from_millis(800));
    // Paused while the object changes: on a loaded machine the upload can
    // outlast the whole stream, which would then end before the change.
    // Paused, the source holds its read-ahead and the server its session.
    pipeline.set_state(gst::State::Paused).expect("paused");
    let (paused, _, _) = pipeline.state(gst::ClockTime::from_seconds(10));
    paused.expect("the pipeline did not pause");
    s3.put("library", &[("film.bin", &v2)]);
    pipeline
        .set_state(gst::State::Playing)
        .expect("playing again");
    let outcome =
        common::wait_bus(&bus, Duration::from_secs(60)).unwrap_or(common::Outcome::TimedOut);
    pipeline.set_state(gst::State::Null).expect("null");
    let message = common::expect_error(
        outcome,
        gst::ResourceError::NotAuthorized,
        "changed in the store",
    );
    assert!(message.contains("film.bin"), "{message}");
    let written = std::fs::read(&out).unwrap_or_default();
    let original = std::fs::read(&v1).expect("v1");
    assert!(written.len() < original.len());
    assert_eq!(written[..], original[..written.len()], "bytes were spliced");
    assert!(
        server.log_text().contains("changed in the store"),
        "the server log does not say why"
    );
    for p in [v1, v2, out] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn a_store_that_goes_down_is_a_clear_error() {
    init();
    let (mut s3, file) = bucket_with_noise("down.bin", 2 << 20, 5);
    let server = Server::start_store("s3://library", &s3.env(), &[]);
    s3.kill();
    // Listed before the store went down, so the open succeeds; the first
    // block cannot be fetched.
    let started = Instant::now();
    let err = pull(server.port, "down.bin", "down").expect_err("played from a dead store");
    assert!(err.contains("store is unreachable"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(server.log_text().contains("store is unreachable"));
    let _ = std::fs::remove_file(file);
}

#[test]
fn a_store_that_refuses_the_credentials_is_a_clear_error() {
    init();
    // moto checks signatures only when told to; it knows no key then.
    let s3 = S3::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let server = Server::start_store("s3://library", &s3.env(), &[]);
    let err = pull(server.port, "film.bin", "refused").expect_err("played without credentials");
    assert!(err.contains("refused the server's credentials"), "{err}");
    assert!(err.contains("InvalidAccessKeyId"), "{err}");
    assert!(
        server
            .log_text()
            .contains("refused the server's credentials")
    );
}

#[test]
fn two_servers_over_one_bucket_a_real_time_viewer_survives_one_dying() {
    let dir = library();
    let s3 = S3::start();
    s3.put("library", &[("long.mkv", &dir.join("long.mkv"))]);
    let env = s3.env();
    viewer_moves_on_when_the_first_server(
        || Server::start_store("s3://library", &env, &[]),
        Server::kill,
    );
}

#[test]
fn a_server_on_four_threads_follows_clients_whose_address_changes_and_keeps_one_limit() {
    init();
    let dir = library();
    let expected = sha256_file(&dir.join("long.mkv"));
    let metrics_port = free_tcp_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let server = Server::start(
        &dir,
        &[
            "--threads",
            "4",
            "--metrics",
            &metrics,
            "--max-sessions",
            "4",
            "--max-sessions-per-address",
            "4",
        ],
    );
    // Every client's source port changes every 0.4 s, and the kernel then
    // most likely delivers it to another thread's socket than the one
    // holding its session (3 chances in 4 each time).
    let proxy = common::Proxy::start(server.port, &["--rate-mbit", "30", "--rebind-every", "0.4"]);
    let port = proxy.port;
    let started = Instant::now();
    let viewers: Vec<_> = (0..3)
        .map(|i| std::thread::spawn(move || pull(port, "long.mkv", &format!("rebind-{i}"))))
        .collect();
    for v in viewers {
        let bytes = v.join().expect("viewer").expect("pull through rebinding");
        assert_eq!(sha256(&bytes), expected);
    }
    let page = scrape(metrics_port);
    let handoffs = metric(&page, "udpvid_handoffs_total");
    eprintln!(
        "{handoffs} datagrams handed between threads; pulls took {:?}",
        started.elapsed()
    );
    assert!(handoffs > 0, "no client ever reached another thread");
    assert!(server.log_text().contains("client address changed"));
    drop(proxy);

    // The limit is the server's: four sessions on four sockets, however
    // the kernel spread them, and the fifth is told the server is busy.
    let open = || hold_session(server.port);
    let holders: Vec<_> = (0..4)
        .map(|i| open().unwrap_or_else(|e| panic!("session {} refused: {e}", i + 1)))
        .collect();
    let asked = Instant::now();
    let fifth = open()
        .map(|_| ())
        .expect_err("a fifth session was admitted");
    eprintln!("fifth refused after {:?}", asked.elapsed());
    assert!(fifth.contains("busy"), "{fifth}");
    assert_eq!(metric(&scrape(metrics_port), "udpvid_sessions"), 4);
    for h in holders {
        h.close();
    }
}
