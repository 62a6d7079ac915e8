//! A small player for `udpvid://` URIs built on playbin.
//!
//! ```text
//! cargo run --example player -- udpvid://127.0.0.1/sample.mp4
//! cargo run --example player -- --headless udpvid://127.0.0.1/sample.mp4
//! ```
//!
//! Keys: ← / → seek 10 s, space pauses, q quits. The status line shows the
//! position, the read-ahead level, the RTT and the loss seen by udpvidsrc.
//! `--headless` plays into fakesinks in real time (for CI and machines
//! without a display) and ignores the keyboard; `--playbin3` uses playbin3;
//! `--seek SECONDS` seeks once prerolled, so headless runs can exercise it.
//!
//! Browse and play: given a server without a file, `udpvid://host[:port]/`,
//! it lists the server's catalog, numbered, with sizes; the pick (a number
//! or a name, typed at the prompt, or `--pick` for one headless run)
//! plays, and at its end (or `q`) the list comes back; `q` at the prompt
//! quits.
//!
//! ```text
//! cargo run --example player -- udpvid://127.0.0.1/
//! cargo run --example player -- --headless --pick 2 udpvid://127.0.0.1/
//! ```

use std::io::{IsTerminal, Read, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;
use gstudpvid::blocking_client::BlockingClient;
use gstudpvid::location::{self, DEFAULT_PORT, HostPort, Location};
use gstudpvid::protocol::ClientConfig;
use gstudpvid::protocol::catalog::{CatalogEntry, human_size};

const SEEK_STEP: gst::ClockTime = gst::ClockTime::from_seconds(10);
const STATUS_INTERVAL: Duration = Duration::from_millis(250);

enum Key {
    Left,
    Right,
    Space,
    Quit,
}

#[derive(Clone)]
struct Options {
    uri: String,
    headless: bool,
    playbin3: bool,
    seek: Option<f64>,
    /// Browsing: what to play, instead of asking.
    pick: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        uri: String::new(),
        headless: false,
        playbin3: false,
        seek: None,
        pick: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--headless" => opts.headless = true,
            "--playbin3" => opts.playbin3 = true,
            "--pick" => opts.pick = Some(args.next().ok_or("--pick needs a number or a name")?),
            "--seek" => {
                let v = args.next().ok_or("--seek needs a number of seconds")?;
                opts.seek = Some(
                    v.parse()
                        .map_err(|_| format!("--seek: {v:?} is not a number"))?,
                );
            }
            "-h" | "--help" => return Err(String::new()),
            _ if a.starts_with("--") => return Err(format!("unknown option {a}")),
            _ => opts.uri = a,
        }
    }
    if opts.uri.is_empty() {
        return Err("no URI given".into());
    }
    Ok(opts)
}

/// Puts the terminal in raw mode for single keys; restored on drop.
struct RawTerminal;

impl RawTerminal {
    fn enable() -> Option<RawTerminal> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        let ok = Command::new("stty")
            .args(["-icanon", "-echo", "min", "1"])
            .stdin(Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = Command::new("stty")
            .arg("sane")
            .stdin(Stdio::inherit())
            .status();
    }
}

fn spawn_keyboard(tx: mpsc::Sender<Key>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 3];
        loop {
            let Ok(n) = stdin.read(&mut buf[..1]) else {
                return;
            };
            if n == 0 {
                return;
            }
            let key = match buf[0] {
                b' ' => Key::Space,
                b'q' | b'Q' => Key::Quit,
                // Arrow keys arrive as ESC [ C / ESC [ D.
                0x1b => {
                    if stdin.read_exact(&mut buf[1..3]).is_err() {
                        return;
                    }
                    match &buf[1..3] {
                        b"[C" => Key::Right,
                        b"[D" => Key::Left,
                        _ => continue,
                    }
                }
                _ => continue,
            };
            if tx.send(key).is_err() {
                return;
            }
        }
    });
}

fn status_line(
    pipeline: &gst::Element,
    source: &Mutex<Option<gst::Element>>,
    paused: bool,
) -> String {
    let pos = pipeline.query_position::<gst::ClockTime>();
    let dur = pipeline.query_duration::<gst::ClockTime>();
    let fmt = |t: Option<gst::ClockTime>| {
        t.map_or("--:--".to_string(), |t| {
            let s = t.seconds();
            format!("{:02}:{:02}", s / 60, s % 60)
        })
    };
    let mut line = format!(
        "{} {} / {}",
        if paused { "⏸" } else { "▶" },
        fmt(pos),
        fmt(dur)
    );
    let src = source.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(stats) = src
        .filter(|s| s.has_property("stats"))
        .map(|s| s.property::<gst::Structure>("stats"))
    {
        let level = stats.get::<u64>("read-ahead-level").unwrap_or(0);
        let read_ahead = stats.get::<u64>("read-ahead").unwrap_or(1).max(1);
        let rtt = stats.get::<f64>("rtt-ms").unwrap_or(0.0);
        let lost = stats.get::<u64>("packets-lost").unwrap_or(0);
        let received = stats.get::<u64>("packets-received").unwrap_or(0);
        let loss = if lost + received > 0 {
            lost as f64 * 100.0 / (lost + received) as f64
        } else {
            0.0
        };
        line.push_str(&format!(
            "  buffer {:3}%  rtt {rtt:.1} ms  loss {loss:.1}%",
            (level * 100 / read_ahead).min(100)
        ));
    }
    line
}

fn seek_by(pipeline: &gst::Element, forward: bool) {
    let Some(pos) = pipeline.query_position::<gst::ClockTime>() else {
        return;
    };
    let target = if forward {
        let t = pos + SEEK_STEP;
        match pipeline.query_duration::<gst::ClockTime>() {
            Some(d) if t > d => d,
            _ => t,
        }
    } else {
        pos.saturating_sub(SEEK_STEP)
    };
    let _ = pipeline.seek_simple(gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT, target);
}

fn run(opts: Options) -> Result<(), String> {
    gst::init().map_err(|e| e.to_string())?;
    gstudpvid::plugin_register_static().map_err(|e| e.to_string())?;
    let factory = if opts.playbin3 { "playbin3" } else { "playbin" };
    let pipeline = gst::ElementFactory::make(factory)
        .property("uri", &opts.uri)
        .build()
        .map_err(|e| format!("{factory}: {e}"))?;
    if opts.headless {
        for prop in ["video-sink", "audio-sink"] {
            let sink = gst::ElementFactory::make("fakesink")
                .property("sync", true)
                .build()
                .map_err(|e| e.to_string())?;
            pipeline.set_property(prop, &sink);
        }
    }
    let source = Arc::new(Mutex::new(None));
    {
        let source = source.clone();
        pipeline.connect("source-setup", false, move |args| {
            if let Ok(src) = args[1].get::<gst::Element>() {
                *source.lock().unwrap_or_else(|p| p.into_inner()) = Some(src);
            }
            None
        });
    }
    let bus = pipeline.bus().ok_or("pipeline without a bus")?;
    let (tx, keys) = mpsc::channel();
    let _raw = if opts.headless {
        None
    } else {
        RawTerminal::enable()
    };
    if !opts.headless {
        spawn_keyboard(tx);
        println!("{}  (←/→ seek 10 s, space pause, q quit)", opts.uri);
    }
    if pipeline.set_state(gst::State::Playing).is_err() {
        let why = bus
            .timed_pop_filtered(gst::ClockTime::from_seconds(1), &[gst::MessageType::Error])
            .and_then(|m| match m.view() {
                gst::MessageView::Error(e) => Some(e.error().to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "cannot start playback".into());
        let _ = pipeline.set_state(gst::State::Null);
        return Err(why);
    }
    let mut paused = false;
    let mut buffering = false;
    let mut pending_seek = opts.seek;
    let mut last_status = Instant::now();
    let result = loop {
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(50)) {
            match msg.view() {
                gst::MessageView::Eos(_) => break Ok(()),
                gst::MessageView::Error(e) => {
                    break Err(format!("{} ({})", e.error(), e.debug().unwrap_or_default()));
                }
                // Like gst-play: pause while the source refills, resume at 100 %.
                gst::MessageView::Buffering(b) => {
                    let percent = b.percent();
                    if percent < 100 && !buffering && !paused {
                        buffering = true;
                        let _ = pipeline.set_state(gst::State::Paused);
                    } else if percent >= 100 && buffering {
                        buffering = false;
                        if !paused {
                            let _ = pipeline.set_state(gst::State::Playing);
                        }
                    }
                }
                gst::MessageView::AsyncDone(_) => {
                    if let Some(secs) = pending_seek.take() {
                        let target = gst::ClockTime::from_nseconds((secs.max(0.0) * 1e9) as u64);
                        pipeline
                            .seek_simple(gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT, target)
                            .map_err(|_| format!("seek to {secs} s refused"))?;
                        println!("\nseeked to {secs} s");
                    }
                }
                _ => {}
            }
        }
        match keys.try_recv() {
            Ok(Key::Quit) => break Ok(()),
            Ok(Key::Space) => {
                paused = !paused;
                let state = if paused {
                    gst::State::Paused
                } else {
                    gst::State::Playing
                };
                let _ = pipeline.set_state(state);
            }
            Ok(Key::Left) => seek_by(&pipeline, false),
            Ok(Key::Right) => seek_by(&pipeline, true),
            Err(_) => {}
        }
        if last_status.elapsed() >= STATUS_INTERVAL {
            last_status = Instant::now();
            print!(
                "\r{}\x1b[K",
                status_line(&pipeline, &source, paused || buffering)
            );
            let _ = std::io::stdout().flush();
        }
    };
    println!();
    let _ = pipeline.set_state(gst::State::Null);
    result
}

const CATALOG_TIMEOUT: Duration = Duration::from_secs(10);

fn fetch_catalog(host: &str, port: u16) -> Result<Vec<CatalogEntry>, String> {
    let client = BlockingClient::connect(host, port, ClientConfig::default())
        .map_err(|e| format!("cannot reach {host}:{port}: {e}"))?;
    let entries = client.catalog(CATALOG_TIMEOUT);
    client.close();
    entries.map_err(|e| format!("{host}:{port}: {e}"))
}

/// The entry `choice` names: its number in the list or its name.
fn resolve<'a>(entries: &'a [CatalogEntry], choice: &str) -> Option<&'a CatalogEntry> {
    match choice.parse::<usize>() {
        Ok(n) => entries.get(n.checked_sub(1)?),
        Err(_) => entries.iter().find(|e| e.name == choice),
    }
}

/// The seed's client, done properly: list, pick, play, and back to the list.
fn browse(mut opts: Options, servers: Vec<HostPort>) -> Result<(), String> {
    let once = opts.pick.is_some();
    let stdin = std::io::stdin();
    let hosts = location::format_host_list(&servers);
    loop {
        let entries = fetch_catalog(&hosts, DEFAULT_PORT)?;
        println!("udpvid://{hosts}/ offers {} files:", entries.len());
        for (i, e) in entries.iter().enumerate() {
            println!("{:>4}. {}  ({})", i + 1, e.name, human_size(e.size));
        }
        if entries.is_empty() {
            return Ok(());
        }
        let choice = match opts.pick.take() {
            Some(p) => p,
            None if once => return Ok(()),
            None => {
                print!("play which? (number or name, q quits) ");
                let _ = std::io::stdout().flush();
                let mut line = String::new();
                if stdin.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                    return Ok(());
                }
                line.trim().to_owned()
            }
        };
        if choice == "q" {
            return Ok(());
        }
        let Some(entry) = resolve(&entries, &choice) else {
            println!("no file {choice:?} in the list");
            continue;
        };
        let uri = Location {
            servers: servers.clone(),
            path: entry.name.clone(),
        }
        .to_uri();
        match run(Options {
            uri,
            ..opts.clone()
        }) {
            Ok(()) => println!("end of {}", entry.name),
            Err(e) => println!("{}: {e}", entry.name),
        }
        if once {
            return Ok(());
        }
    }
}

/// `udpvid:///`: the servers announced on the LAN, numbered; the pick's
/// catalog follows.
fn choose_server(opts: Options) -> Result<(), String> {
    let servers = gstudpvid::discovery::discover(Duration::from_secs(2))?;
    println!("{} servers found on the LAN:", servers.len());
    for (i, s) in servers.iter().enumerate() {
        println!("{:>4}. {}  ({})", i + 1, s.name, s.uri());
    }
    let Some(first) = servers.first() else {
        return Ok(());
    };
    let chosen = if servers.len() == 1 {
        first
    } else {
        print!("which server? (number, q quits) ");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        if std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?
            == 0
        {
            return Ok(());
        }
        match line.trim().parse::<usize>() {
            Ok(n) if (1..=servers.len()).contains(&n) => &servers[n - 1],
            _ => return Ok(()),
        }
    };
    browse(
        opts,
        vec![HostPort {
            host: chosen.address.to_string(),
            port: chosen.port,
        }],
    )
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("player: {e}");
            }
            eprintln!(
                "usage: player [--headless] [--playbin3] [--seek SECONDS] udpvid://host[:port]/file\n       player [--headless] [--pick NUMBER|NAME] udpvid://host[:port]/"
            );
            return ExitCode::from(2);
        }
    };
    if opts.uri == "udpvid:///" {
        return match gst::init()
            .map_err(|e| e.to_string())
            .and_then(|()| gstudpvid::plugin_register_static().map_err(|e| e.to_string()))
            .and_then(|()| choose_server(opts))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("player: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Ok(servers) = Location::parse_server(&opts.uri) {
        return match gst::init()
            .map_err(|e| e.to_string())
            .and_then(|()| gstudpvid::plugin_register_static().map_err(|e| e.to_string()))
            .and_then(|()| browse(opts, servers))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("player: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(opts) {
        Ok(()) => {
            println!("end of stream");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("player: {e}");
            ExitCode::FAILURE
        }
    }
}
