//! Shared by the integration tests: the plugin registered statically, the
//! real server binary started on a free loopback port, test clips made with
//! GStreamer (cached under `target/`), and a bus-watching pipeline runner.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use gst::prelude::*;

#[path = "../../benches/common/impair_report.rs"]
mod impair_report;
use sha2::{Digest, Sha256};

pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("GStreamer initialises");
        gstudpvid::plugin_register_static().expect("udpvid plugin registers");
    });
}

/// `target/<profile>/` of this build, found from the test binary's path.
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Runs `cargo build` with `args` once per test process, so the binaries the
/// tests start are never stale (`cargo test` alone does not rebuild the
/// server package or the examples).
fn cargo_build(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // `cargo test --release` must start release binaries, built from this
    // source too.
    let release = target_profile_dir().ends_with("release");
    let status = Command::new(cargo)
        // `cargo test` sets this for the test; ring's build script tracks
        // it, so passing it on would rebuild ring and everything above it
        // (minutes) here, and again at the next build from a shell.
        .env_remove("CARGO_MANIFEST_DIR")
        .arg("build")
        .args(release.then_some("--release"))
        .args(args)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// The real `server` binary, brought up to date first.
pub fn server_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // With the plugin's package selected too, as `cargo test
            // --workspace` and `make build` build them: the library's
            // features are then the same in both builds, which share its
            // fingerprint and would otherwise rebuild each other.
            cargo_build(&[
                "-q",
                "-p",
                "udpvid-server",
                "-p",
                "gst-plugin-udpvid",
                "--bin",
                "server",
            ]);
            let path = target_profile_dir().join("server");
            assert!(path.exists(), "server binary missing at {}", path.display());
            path
        })
        .clone()
}

/// The folder holding the plugin library (`libgstudpvid.so`), for
/// GStreamer processes the tests start (`GST_PLUGIN_PATH`); brought up to
/// date first, since `cargo test` alone does not rebuild the cdylib.
pub fn plugin_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            cargo_build(&["-q", "--lib"]);
            target_profile_dir()
        })
        .clone()
}

/// An example binary (`target/<profile>/examples/NAME`), brought up to date first.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|n| n == name) {
        cargo_build(&["-q", "--example", name]);
        built.push(name.to_owned());
    }
    target_profile_dir().join("examples").join(name)
}

/// A running server process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Self::start_on(dir, 0, extra)
    }

    pub fn start_on(dir: &Path, port: u16, extra: &[&str]) -> Server {
        Self::launch(None, "127.0.0.1", dir, port, extra)
    }

    /// The server inside network namespace `ns`, listening on `bind`.
    pub fn start_in_namespace(ns: &str, bind: &str, dir: &Path, port: u16) -> Server {
        Self::launch(Some(ns), bind, dir, port, &[])
    }

    /// The server inside network namespace `ns` on its loopback, with
    /// more options.
    pub fn launch_in_namespace(ns: &str, dir: &Path, port: u16, extra: &[&str]) -> Server {
        Self::launch(Some(ns), "127.0.0.1", dir, port, extra)
    }

    /// Stops it the way an operator does (SIGTERM) and waits for it.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    fn launch(ns: Option<&str>, bind: &str, dir: &Path, port: u16, extra: &[&str]) -> Server {
        let serve = [std::ffi::OsStr::new("--dir"), dir.as_os_str()];
        Self::launch_serving(ns, bind, &serve, port, extra, &[])
    }

    /// A server of the objects under `url` (`s3://bucket/prefix`), with the
    /// store's `AWS_*` environment.
    pub fn start_store(url: &str, env: &[(String, String)], extra: &[&str]) -> Server {
        let serve = [std::ffi::OsStr::new("--store"), std::ffi::OsStr::new(url)];
        Self::launch_serving(None, "127.0.0.1", &serve, 0, extra, env)
    }

    fn launch_serving(
        ns: Option<&str>,
        bind: &str,
        serve: &[&std::ffi::OsStr],
        port: u16,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Server {
        static N: Mutex<u32> = Mutex::new(0);
        let n = {
            let mut g = N.lock().unwrap_or_else(|p| p.into_inner());
            *g += 1;
            *g
        };
        let log = std::env::temp_dir().join(format!("udpvid-test-{}-{n}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        // `ip netns exec` execs the server, so the child is the server.
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(server_binary());
                c
            }
            None => Command::new(server_binary()),
        };
        let mut child = command
            .args(serve)
            .args(["--bind", bind, "--port", &port.to_string()])
            .arg("--log-file")
            .arg(&log)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("server starts");
        let stdout = child.stdout.take().expect("server stdout");
        // "udpvid server listening on 127.0.0.1:PORT, serving DIR"
        let port = banner_port(stdout, 4);
        Server { child, port, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        // A failed test's log stays for its reader; a passed one's would
        // only fill the disk over many runs.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The port in a banner's first line, the address being word `word`
/// (`ADDR:PORT,`).
fn banner_port(stdout: impl std::io::Read, word: usize) -> u16 {
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the program prints its address");
    line.split_whitespace()
        .nth(word)
        .and_then(|a| a.trim_end_matches(',').rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected banner: {line:?}"))
}

/// The impairment proxy example between a client and the server on
/// `upstream_port`, running until dropped.
pub struct Proxy {
    pub child: Child,
    pub port: u16,
}

impl Proxy {
    pub fn start(upstream_port: u16, args: &[&str]) -> Proxy {
        let mut child = Command::new(example_binary("impair"))
            .args([
                "--upstream",
                &format!("127.0.0.1:{upstream_port}"),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("proxy starts");
        // "impair listening on 127.0.0.1:PORT, forwarding to ..."
        let port = banner_port(child.stdout.as_mut().expect("stdout"), 3);
        Proxy { child, port }
    }

    /// Stops the proxy (SIGTERM, so it prints its report) and returns its
    /// report.
    pub fn finish(mut self) -> String {
        impair_report::stop_for_report(&mut self.child)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read file");
    sha256(&bytes)
}

pub fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The test clips, one per container, made once and cached.
pub struct Clips {
    pub dir: PathBuf,
    pub names: Vec<&'static str>,
}

const CLIP_RECIPES: &[(&str, &str)] = &[
    (
        // mp4mux writes the moov atom at the end unless asked otherwise: the
        // demuxer must seek to the end before it can play.
        "movie.mp4",
        "videotestsrc num-buffers=150 pattern=snow ! video/x-raw,width=640,height=360,framerate=30/1 \
         ! x264enc speed-preset=ultrafast bitrate=1500 key-int-max=30 ! h264parse ! mux. \
         audiotestsrc num-buffers=215 ! audioconvert ! avenc_aac ! aacparse ! mux. \
         mp4mux name=mux",
    ),
    (
        "movie.mkv",
        "videotestsrc num-buffers=150 pattern=snow ! video/x-raw,width=640,height=360,framerate=30/1 \
         ! x264enc speed-preset=ultrafast bitrate=1500 key-int-max=30 ! h264parse ! mux. \
         audiotestsrc num-buffers=215 ! audioconvert ! avenc_aac ! aacparse ! mux. \
         matroskamux name=mux",
    ),
    (
        "movie.webm",
        "videotestsrc num-buffers=150 pattern=snow ! video/x-raw,width=320,height=240,framerate=30/1 \
         ! vp8enc deadline=1 target-bitrate=800000 keyframe-max-dist=30 ! mux. \
         audiotestsrc num-buffers=215 ! audioconvert ! vorbisenc ! mux. \
         webmmux name=mux",
    ),
    (
        "movie.ts",
        "videotestsrc num-buffers=150 pattern=snow ! video/x-raw,width=640,height=360,framerate=30/1 \
         ! x264enc speed-preset=ultrafast bitrate=1500 key-int-max=30 ! h264parse ! mux. \
         audiotestsrc num-buffers=215 ! audioconvert ! avenc_aac ! aacparse ! mux. \
         mpegtsmux name=mux",
    ),
];

pub fn clips() -> &'static Clips {
    static CLIPS: OnceLock<Clips> = OnceLock::new();
    CLIPS.get_or_init(|| {
        init();
        let dir = target_profile_dir().join("..").join("test-clips");
        std::fs::create_dir_all(&dir).expect("clip dir");
        for (name, recipe) in CLIP_RECIPES {
            let path = dir.join(name);
            if path.metadata().is_ok_and(|m| m.len() > 0) {
                continue;
            }
            let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
            let desc = format!("{recipe} ! filesink location={}", tmp.display());
            let pipeline = gst::parse::launch(&desc).unwrap_or_else(|e| panic!("{name}: {e}"));
            let outcome = run_pipeline(&pipeline, Duration::from_secs(120));
            assert_eq!(outcome, Outcome::Eos, "making {name}");
            std::fs::rename(&tmp, &path).expect("rename clip");
        }
        Clips {
            dir,
            names: CLIP_RECIPES.iter().map(|(n, _)| *n).collect(),
        }
    })
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Eos,
    Error {
        domain_resource: Option<gst::ResourceError>,
        message: String,
        debug: String,
    },
    TimedOut,
}

/// Asserts that `outcome` is an error in `domain` whose message contains
/// `needle`; returns the message.
#[track_caller]
pub fn expect_error(outcome: Outcome, domain: gst::ResourceError, needle: &str) -> String {
    match outcome {
        Outcome::Error {
            domain_resource,
            message,
            ..
        } => {
            assert_eq!(domain_resource, Some(domain), "{message}");
            assert!(message.contains(needle), "{needle:?} not in {message:?}");
            message
        }
        other => panic!("expected a {domain:?} error containing {needle:?}, got {other:?}"),
    }
}

/// Plays `pipeline` until EOS, an error or `limit`; always ends in NULL.
pub fn run_pipeline(pipeline: &gst::Element, limit: Duration) -> Outcome {
    let bus = pipeline.bus().expect("pipeline has a bus");
    let outcome = match pipeline.set_state(gst::State::Playing) {
        Err(_) => wait_bus(&bus, Duration::from_secs(1)).unwrap_or(Outcome::Error {
            domain_resource: None,
            message: "state change failed without an error message".into(),
            debug: String::new(),
        }),
        Ok(_) => wait_bus(&bus, limit).unwrap_or(Outcome::TimedOut),
    };
    pipeline
        .set_state(gst::State::Null)
        .expect("pipeline goes to NULL");
    outcome
}

pub fn wait_bus(bus: &gst::Bus, limit: Duration) -> Option<Outcome> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let msg = bus.timed_pop_filtered(
            gst::ClockTime::from_nseconds(left.as_nanos() as u64),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )?;
        match msg.view() {
            gst::MessageView::Eos(_) => return Some(Outcome::Eos),
            gst::MessageView::Error(e) => {
                let err = e.error();
                return Some(Outcome::Error {
                    domain_resource: err.kind::<gst::ResourceError>(),
                    message: err.to_string(),
                    debug: e.debug().map(|d| d.to_string()).unwrap_or_default(),
                });
            }
            _ => {}
        }
    }
}

/// A `udpvidsrc` configured for `file` on the local server at `port`.
pub fn source(port: u16, file: &str) -> gst::Element {
    gst::ElementFactory::make("udpvidsrc")
        .property("port", port as u32)
        .property("file", file)
        .build()
        .expect("udpvidsrc exists")
}
