//! Viewers on links slower (and faster) than the media: a playbin
//! application that pauses on buffering below 100 % and plays at 100 %
//! waits once, then plays to the end; on a faster link it never pauses.

mod common;

use std::time::{Duration, Instant};

use gst::prelude::*;

use common::{Proxy, Server, clips, init};

/// Plays `uri` with playbin into real-time fakesinks, honouring buffering;
/// returns the buffering pauses that began after playback had started
/// (position > 0), or the error.
fn play_counting_pauses(uri: &str, limit: Duration) -> Result<u32, String> {
    let playbin = gst::ElementFactory::make("playbin")
        .property("uri", uri)
        .build()
        .map_err(|e| e.to_string())?;
    for prop in ["video-sink", "audio-sink"] {
        let sink = gst::ElementFactory::make("fakesink")
            .property("sync", true)
            .build()
            .map_err(|e| e.to_string())?;
        playbin.set_property(prop, &sink);
    }
    let bus = playbin.bus().ok_or("no bus")?;
    playbin
        .set_state(gst::State::Paused)
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + limit;
    let mut buffering = false;
    let mut pauses = 0;
    // Within one wait the percent must not go down (a progress bar that
    // flickers); the highest seen in the current wait.
    let mut peak: Option<i32> = None;
    let result = loop {
        if Instant::now() > deadline {
            break Err(format!("no end after {limit:?}"));
        }
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Buffering(b) => {
                let was = buffering;
                buffering = b.percent() < 100;
                if was && peak.is_some_and(|p| b.percent() < p) {
                    break Err(format!(
                        "buffering went back from {}% to {}% within one wait",
                        peak.unwrap_or(0),
                        b.percent()
                    ));
                }
                peak = buffering.then(|| b.percent().max(peak.filter(|_| was).unwrap_or(0)));
                let started = playbin
                    .query_position::<gst::ClockTime>()
                    .is_some_and(|p| p > gst::ClockTime::ZERO);
                if buffering && !was && started {
                    pauses += 1;
                }
                let state = if buffering {
                    gst::State::Paused
                } else {
                    gst::State::Playing
                };
                let _ = playbin.set_state(state);
            }
            gst::MessageView::AsyncDone(_) if !buffering => {
                let _ = playbin.set_state(gst::State::Playing);
            }
            gst::MessageView::Eos(_) => break Ok(pauses),
            gst::MessageView::Error(e) => break Err(e.error().to_string()),
            _ => {}
        }
    };
    let _ = playbin.set_state(gst::State::Null);
    result
}

#[test]
fn a_slow_link_pauses_at_most_once_and_a_fast_one_never() {
    init();
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    let bits = std::fs::metadata(clips.dir.join("movie.mp4"))
        .expect("clip")
        .len()
        * 8;
    // The clip is 5 s of media.
    let media_mbit = bits as f64 / 5.0 / 1e6;
    for (factor, most) in [(0.5, 1), (2.0, 0)] {
        let mbit = media_mbit * factor;
        let proxy = Proxy::start(
            server.port,
            &[
                "--down-rate-mbit",
                &format!("{mbit:.3}"),
                "--down-queue-kb",
                "64",
                "--delay-ms",
                "20",
            ],
        );
        let uri = format!("udpvid://127.0.0.1:{}/movie.mp4", proxy.port);
        let pauses = play_counting_pauses(&uri, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{factor}x ({mbit:.2} Mbit/s): {e}"));
        eprintln!("{factor}x ({mbit:.2} Mbit/s): {pauses} pauses after the first frame");
        assert!(
            pauses <= most,
            "{factor}x ({mbit:.2} Mbit/s): {pauses} pauses after the first frame"
        );
    }
}
