//! Applications that honour buffering, as gst-launch, gst-play and playbin
//! apps do: the pipeline pauses while the source reports less than 100 %
//! and resumes at 100 %. A paused pipeline reads nothing, so only the
//! protocol can make 100 % come; these tests check that it always does.
//!
//! The source side is modelled as the element behaves: buffering starts at
//! the first byte (`Start`) and whenever a read finds nothing ready
//! (`Underrun`); the application then reads nothing until
//! [`ClientConnection::buffering_level`] says 100 %.
//!
//! [`ClientConnection::buffering_level`]: crate::protocol::client::ClientConnection::buffering_level

use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::{Consumer, Sim, bottleneck, clean, file};
use crate::impairment::{ImpairmentConfig, ImpairmentStats};
use crate::protocol::buffering::BufferingCause;
use crate::protocol::client::ClientConfig;
use crate::protocol::read_ahead::ReadAhead;
use crate::protocol::server::ServerConfig;
use crate::protocol::wire::{DEFAULT_MAX_PAYLOAD, MAX_DATAGRAM_SIZE};

/// How the application consumes when it is not paused on buffering.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pattern {
    /// Plays in real time at the media rate (decoders and a synced sink).
    RealTime,
    /// Takes everything as fast as it comes (`! filesink`).
    Greedy,
    /// Plays in real time for `play`, then the user pauses for `pause`,
    /// over and over.
    PauseResume { play: Duration, pause: Duration },
}

/// What the element reads per `create` (its default blocksize).
const BLOCK: usize = 64 * 1024;
/// How often the simulated streaming thread runs.
const TICK: Duration = Duration::from_millis(10);
/// What a playing pipeline holds ahead of playback in its queues (playbin
/// takes about 0.7 MiB of a 4 Mbit/s clip): a real-time reader may run this
/// far ahead of the playback clock.
const PIPELINE_QUEUE_BYTES: f64 = 700_000.0;
/// The element's rule: an underrun is posted as buffering only while the
/// pipeline holds less than this much media ahead of playback.
const UNDERRUN_HOLD: Duration = crate::protocol::buffering::UNDERRUN_HOLD;

struct BufferingApp {
    pattern: Pattern,
    /// Media bytes per second of playback.
    media_rate: f64,
    buffering: Option<BufferingCause>,
    /// Playback time so far (the clock stops while paused).
    played: Duration,
    /// When the user's current play or pause phase began.
    phase_started: Instant,
    user_paused: bool,
    /// Times buffering began after playback started.
    underruns: u32,
    /// Playback has run dry (stalls without buffering).
    dry: bool,
    dry_stalls: u32,
    /// While buffering: when the bytes ready last grew.
    last_progress: Instant,
    /// The longest stretch of buffering without a new byte ready.
    longest_stall: Duration,
    last_level: u64,
}

impl BufferingApp {
    fn new(pattern: Pattern, media_rate: u64, now: Instant) -> Self {
        BufferingApp {
            pattern,
            media_rate: media_rate as f64,
            buffering: Some(BufferingCause::Start),
            played: Duration::ZERO,
            phase_started: now,
            user_paused: false,
            underruns: 0,
            dry: false,
            dry_stalls: 0,
            last_progress: now,
            longest_stall: Duration::ZERO,
            last_level: 0,
        }
    }

    /// One run of the streaming thread and the application's bus handler.
    fn step(&mut self, sim: &mut Sim) {
        let now = sim.now;
        if let Some(cause) = self.buffering {
            let level = sim.client.buffering_level(now, cause, 0);
            let progress = sim.delivered.len() as u64 + level.available;
            if progress > self.last_level {
                self.last_level = progress;
                self.last_progress = now;
            }
            self.longest_stall = self
                .longest_stall
                .max(now.saturating_duration_since(self.last_progress));
            if level.percent < 100 {
                return;
            }
            self.buffering = None;
        }
        if let Pattern::PauseResume { play, pause } = self.pattern {
            let phase = if self.user_paused { pause } else { play };
            if now.saturating_duration_since(self.phase_started) >= phase {
                self.user_paused = !self.user_paused;
                self.phase_started = now;
            }
            if self.user_paused {
                return;
            }
        }
        let mut allowance = match self.pattern {
            Pattern::Greedy => f64::INFINITY,
            Pattern::RealTime | Pattern::PauseResume { .. } => {
                // Playback runs on what the pipeline holds; with nothing
                // left it stalls, paused on buffering or not.
                let next = self.played + TICK;
                if self.media_rate * next.as_secs_f64() <= sim.delivered.len() as f64 {
                    self.played = next;
                    self.dry = false;
                } else if !self.dry && self.played > Duration::ZERO && !sim.client.is_finished() {
                    self.dry = true;
                    self.dry_stalls += 1;
                }
                self.media_rate * self.played.as_secs_f64() + PIPELINE_QUEUE_BYTES
                    - sim.delivered.len() as f64
            }
        };
        while allowance >= 1.0 && !sim.client.is_finished() {
            let want = allowance.min(BLOCK as f64) as usize;
            match sim.client.read(now, want) {
                Some(chunk) => {
                    allowance -= chunk.len() as f64;
                    sim.delivered.extend_from_slice(&chunk);
                }
                None => {
                    // Nothing ready. While the pipeline still holds a
                    // second or more ahead of playback, the element waits
                    // without posting buffering, and playback goes on from
                    // the queues; below that it posts buffering and the
                    // application pauses.
                    let held =
                        sim.delivered.len() as f64 - self.media_rate * self.played.as_secs_f64();
                    if held >= self.media_rate * UNDERRUN_HOLD.as_secs_f64() {
                        return;
                    }
                    self.buffering = Some(BufferingCause::Underrun);
                    if self.played > Duration::ZERO {
                        self.underruns += 1;
                    }
                    self.last_progress = now;
                    self.last_level = sim.delivered.len() as u64 + sim.client.available();
                    return;
                }
            }
        }
    }
}

struct Outcome {
    finished: bool,
    took: Duration,
    longest_stall: Duration,
    underruns: u32,
    dry_stalls: u32,
    /// Bytes the server sent beyond what was played (after a stop, once
    /// what was in flight has landed).
    waste: u64,
    /// Datagrams the downlink carried and dropped.
    downlink: ImpairmentStats,
    /// Data datagrams the server sent, resends included.
    data_packets_sent: u64,
    /// Client datagrams that moved the window.
    window_moves: u64,
    /// Data datagrams shorter than those before them (the file's last
    /// aside).
    short_data_packets_sent: u64,
    /// The client's smoothed RTT at the end.
    client_rtt: Duration,
}

/// One run: a `size`-byte file of `media_rate` bytes/s through `down`.
struct Scenario {
    seed: u64,
    size: usize,
    media_rate: u64,
    down: ImpairmentConfig,
    up: ImpairmentConfig,
    read_ahead: ReadAhead,
    pattern: Pattern,
    limit: Duration,
    /// The viewer closes the player after this much playback.
    stop_after: Option<Duration>,
    /// The element tells the media's rate (it knows the duration); without
    /// it the read-ahead goes by what the player consumed.
    tells_media_rate: bool,
}

fn play(scenario: Scenario) -> Outcome {
    let Scenario {
        seed,
        size,
        media_rate,
        down,
        up,
        read_ahead,
        pattern,
        limit,
        stop_after,
        tells_media_rate,
    } = scenario;
    let data = file(size, seed);
    let mut sim = Sim::with_configs(
        seed,
        data.clone(),
        ServerConfig::default(),
        ClientConfig {
            read_ahead,
            ..Default::default()
        },
        up,
        down,
    );
    // Timers tick in milliseconds, as the drivers' do.
    sim.timer_tick = Duration::from_millis(1);
    let start = sim.now;
    sim.client.open_file(start, "movie.mp4", 0);
    // The element tells the media rate once the pipeline knows the
    // duration (at preroll).
    if tells_media_rate {
        sim.client.set_media_rate(start, Some(media_rate as f64));
    }
    let mut app = BufferingApp::new(pattern, media_rate, start);
    let mut next_app_step = start;
    let deadline = start + limit;
    while !sim.client.is_finished()
        && sim.now < deadline
        && stop_after.is_none_or(|s| app.played < s)
    {
        if sim.now >= next_app_step {
            app.step(&mut sim);
            next_app_step = sim.now + TICK;
        }
        // The app reads for itself; the harness only moves packets and
        // timers, waking at least every tick.
        sim.step(Consumer::Paced {
            bytes_per_tick: 0,
            tick: TICK,
        });
    }
    let finished = sim.client.is_finished();
    let mut waste = 0;
    if stop_after.is_some() {
        // Closed: nothing is read any more; what the server still sends
        // (up to the window) lands within a few round trips.
        let settle = sim.now + Duration::from_secs(3);
        while sim.now < settle {
            sim.step(Consumer::Paced {
                bytes_per_tick: 0,
                tick: TICK,
            });
        }
        let played = (app.media_rate * app.played.as_secs_f64()) as u64;
        waste = sim.data_bytes_sent.saturating_sub(played);
    }
    if finished {
        assert!(sim.delivered == data, "seed {seed}: delivered bytes differ");
    }
    if app.buffering.is_some() {
        // Still waiting at the deadline: that wait counts too.
        app.longest_stall = app
            .longest_stall
            .max(sim.now.saturating_duration_since(app.last_progress));
    }
    Outcome {
        finished,
        took: sim.now - start,
        longest_stall: app.longest_stall,
        underruns: app.underruns,
        dry_stalls: app.dry_stalls,
        waste,
        downlink: sim.down.imp.stats(),
        data_packets_sent: sim.data_packets_sent,
        window_moves: sim.window_moves,
        short_data_packets_sent: sim.short_data_packets_sent,
        client_rtt: sim.client.rtt().smoothed(),
    }
}

/// 4 Mbit/s of media.
const MEDIA_RATE: u64 = 500_000;

/// How long a link of `bits_per_second` takes for `bytes` of a file in full
/// Data datagrams, each charged its IPv4 and UDP headers on the wire.
fn link_time(bytes: usize, bits_per_second: f64) -> Duration {
    let payload_share =
        DEFAULT_MAX_PAYLOAD as f64 / (MAX_DATAGRAM_SIZE + crate::impairment::IP_UDP_HEADERS) as f64;
    Duration::from_secs_f64(bytes as f64 * 8.0 / (bits_per_second * payload_share))
}

fn link(rate_bps: Option<u64>, delay_ms: u64) -> ImpairmentConfig {
    match rate_bps {
        Some(bps) => ImpairmentConfig {
            rate_bps: Some(bps),
            ..bottleneck(0, delay_ms, 128)
        },
        None => clean(delay_ms),
    }
}

#[test]
fn every_buffering_application_reaches_the_end_at_every_link_rate() {
    // The link at 0.5x, 1x and 4x what the application consumes, and
    // unlimited; 40 ms each way. 6 MB is 12 s of 4 Mbit/s media.
    let size = 6_000_000;
    let patterns = [
        Pattern::RealTime,
        Pattern::Greedy,
        Pattern::PauseResume {
            play: Duration::from_secs(3),
            pause: Duration::from_secs(2),
        },
    ];
    for (i, pattern) in patterns.into_iter().enumerate() {
        for (j, factor) in [Some(0.5), Some(1.0), Some(4.0), None]
            .into_iter()
            .enumerate()
        {
            let rate = factor.map(|f| (f * MEDIA_RATE as f64 * 8.0) as u64);
            let seed = 1 + (i * 4 + j) as u64;
            let out = play(Scenario {
                seed,
                size,
                media_rate: MEDIA_RATE,
                down: link(rate, 40),
                up: clean(40),
                read_ahead: ReadAhead::default(),
                pattern,
                limit: Duration::from_secs(300),
                stop_after: None,
                tells_media_rate: true,
            });
            assert!(
                out.finished,
                "{pattern:?} at {factor:?}x: stopped after {:?} (longest stall {:?}, {} underruns)",
                out.took, out.longest_stall, out.underruns
            );
            // A stall is the link's time to bring the goal, not forever.
            assert!(
                out.longest_stall < Duration::from_secs(5),
                "{pattern:?} at {factor:?}x: waited {:?} for a byte",
                out.longest_stall
            );
        }
    }
}

#[test]
fn a_greedy_copy_over_a_slow_link_is_paced_by_the_link_not_by_pauses() {
    // The shape of the tbf freeze: `! filesink` on a 20 Mbit/s path, each
    // underrun pausing the pipeline; the pauses must not cost throughput.
    let size = 12_000_000;
    let out = play(Scenario {
        seed: 7,
        size,
        media_rate: MEDIA_RATE,
        down: link(Some(20_000_000), 20),
        up: clean(20),
        read_ahead: ReadAhead::default(),
        pattern: Pattern::Greedy,
        limit: Duration::from_secs(120),
        stop_after: None,
        tells_media_rate: true,
    });
    assert!(out.finished, "stopped after {:?}", out.took);
    let mbit = size as f64 * 8.0 / out.took.as_secs_f64() / 1e6;
    assert!(
        mbit > 14.0,
        "{mbit:.1} Mbit/s of 20 ({} pauses)",
        out.underruns
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the link, read-ahead, goal and pauses: whenever the
    /// application waits for bytes, they come within a bounded time, and
    /// the stream reaches its end.
    #[test]
    fn a_waiting_application_always_gets_bytes(
        seed in 0u64..1_000,
        rate_kbit in prop::option::of(1_000u64..40_000),
        one_way_ms in 1u64..150,
        fixed_read_ahead in prop::option::of(16u64 * 1024..4 << 20),
        target_ms in 200u64..6_000,
        max_read_ahead in 256u64 * 1024..32 << 20,
        pattern in 0u8..3,
        play_ms in 200u64..4_000,
        pause_ms in 100u64..4_000,
    ) {
        let read_ahead = match fixed_read_ahead {
            Some(bytes) => ReadAhead::Fixed(bytes),
            None => ReadAhead::Adaptive {
                target_time: Duration::from_millis(target_ms),
                min: 256 * 1024,
                max: max_read_ahead,
            },
        };
        let pattern = match pattern {
            0 => Pattern::RealTime,
            1 => Pattern::Greedy,
            _ => Pattern::PauseResume {
                play: Duration::from_millis(play_ms),
                pause: Duration::from_millis(pause_ms),
            },
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let media_rate = rand::Rng::gen_range(&mut rng, 100_000..1_000_000);
        let size = 3_000_000;
        let out = play(Scenario {
            seed,
            size,
            media_rate,
            down: link(rate_kbit.map(|k| k * 1000), one_way_ms),
            up: clean(one_way_ms),
            read_ahead,
            pattern,
            limit: Duration::from_secs(600),
            stop_after: None,
            tells_media_rate: true,
        });
        // The slowest link brings 1 MB in 8 s; the goal is at most half
        // the read-ahead (at most 16 MiB, reached gradually as it grows).
        prop_assert!(out.finished, "stopped after {:?}, longest stall {:?}", out.took, out.longest_stall);
        prop_assert!(
            out.longest_stall < Duration::from_secs(10),
            "waited {:?} for a byte",
            out.longest_stall
        );
    }
}

#[test]
fn a_slow_link_waits_once_then_plays_to_the_end() {
    const SIZE: usize = 6_000_000;
    // Issue 13's shape: real-time playback of 12 s of 4 Mbit/s media over
    // links at 0.5x and 0.75x the media rate (at most one pause after the
    // first frame: the wait comes from the download-time estimate), and
    // at 1.5x and 4x (no pause at all).
    for (factor, most) in [(0.5, 1), (0.75, 1), (1.5, 0), (4.0, 0)] {
        for seed in [3, 4] {
            let out = play(Scenario {
                seed,
                size: SIZE,
                media_rate: MEDIA_RATE,
                down: link(Some((factor * MEDIA_RATE as f64 * 8.0) as u64), 40),
                up: clean(40),
                read_ahead: ReadAhead::default(),
                pattern: Pattern::RealTime,
                limit: Duration::from_secs(300),
                stop_after: None,
                tells_media_rate: true,
            });
            assert!(
                out.finished,
                "{factor}x seed {seed}: stopped after {:?}",
                out.took
            );
            let pauses = out.underruns + out.dry_stalls;
            assert!(
                pauses <= most,
                "{factor}x seed {seed}: {} buffering pauses and {} stalls after the first frame",
                out.underruns,
                out.dry_stalls
            );
            if factor < 1.0 {
                // The wait's margin must not cost much of the end: HTTP's
                // player ends a little after its download does, so the
                // end here is held within 4 % of the link's time for the
                // file (payload share of each datagram on the wire) and the
                // start. SLOW_LINK_MARGIN at 20 % ended 7 % after it.
                let download = link_time(SIZE, factor * MEDIA_RATE as f64 * 8.0);
                assert!(
                    out.took <= download.mul_f64(1.04) + Duration::from_millis(500),
                    "{factor}x seed {seed}: the end after {:?}, the download alone takes {download:?}",
                    out.took
                );
            }
        }
    }
}

#[test]
fn a_viewer_who_stops_early_on_a_fast_link_costs_no_more_than_before() {
    // The slow-link goal must not buy its single wait with bytes on links
    // faster than the media: after 5 s of playback the viewer closes, and
    // what the server sent beyond what was played stays within the usual
    // read-ahead (about 2 s of media plus the round trips), the pipeline's
    // queue and what was in flight: 2.5 MB for 4 Mbit/s media. (Measured:
    // 1.8-2.2 MB, the same to the byte with the slow-link goal disabled.)
    for factor in [1.5, 4.0, 20.0] {
        let out = play(Scenario {
            seed: 5,
            size: 12_000_000,
            media_rate: MEDIA_RATE,
            down: link(Some((factor * MEDIA_RATE as f64 * 8.0) as u64), 40),
            up: clean(40),
            read_ahead: ReadAhead::default(),
            pattern: Pattern::RealTime,
            limit: Duration::from_secs(60),
            stop_after: Some(Duration::from_secs(5)),
            tells_media_rate: true,
        });
        assert!(
            out.waste <= 2_500_000,
            "{factor}x: {} bytes sent beyond what was played",
            out.waste
        );
    }
}

#[test]
fn a_viewer_whose_window_stays_full_is_not_taken_for_a_slow_link() {
    // A player that keeps up with a fast link holds its window full: the
    // server sends an eighth of the read-ahead each time the window moves
    // that much, and waits in between. Those waits are the player's, not
    // the link's; counted as link time they measured the link at the
    // consumption rate itself, noise made it "slower than the media", and
    // the window opened to its maximum (16 MiB, a 4 Mbit/s viewer's whole
    // 30 s file on loopback). Without a known media rate (a stream without
    // a duration, or the load generator's viewers) and with it, 15 s of
    // playback and a stop must cost no more than the usual read-ahead.
    // (Before: 7.6 MB sent beyond what was played at 4x, either way.)
    for (factor, tells_media_rate) in [(4.0, true), (4.0, false), (20.0, true), (20.0, false)] {
        let down = link(Some((factor * MEDIA_RATE as f64 * 8.0) as u64), 20);
        let waste = waste_of_a_stop_after_15_s(7, down, clean(20), tells_media_rate);
        assert!(
            waste <= 2_500_000,
            "{factor}x, media rate told: {tells_media_rate}: {waste} bytes sent beyond what was played"
        );
    }
}

#[test]
fn a_viewer_on_a_lossy_link_is_not_taken_for_a_slow_one() {
    // The same at 1 % and 5 % loss both ways, 80 ms RTT, the bench's 20
    // Mbit/s: a window update whose bytes came with a hole (a datagram
    // lost, its resend a round trip away) is still one the server used up,
    // and the wait for the next is not link time. Counted, it read as a
    // link slower than the media, the read-ahead jumped to its maximum for
    // a moment, and the window it advertised (which never moves back) let
    // the server send on at the link's rate: 11.3 MiB wasted at 1 % loss
    // in the bench's 10 s stop, 1.45 without loss.
    for (loss, tells_media_rate) in [(0.01, true), (0.01, false), (0.05, true)] {
        let mut down = link(Some(20_000_000), 40);
        down.loss = loss;
        let mut up = clean(40);
        up.loss = loss;
        let waste = waste_of_a_stop_after_15_s(11, down, up, tells_media_rate);
        assert!(
            waste <= 3_000_000,
            "{loss} loss, media rate told: {tells_media_rate}: {waste} bytes sent beyond what was played"
        );
    }
}

#[test]
fn a_viewers_round_trip_estimate_survives_lost_pings() {
    // 5 % loss both ways on an 80 ms path: a lost Ping's or Pong's time
    // was taken for the next Pong's (a probe's Ping sent while the RTT
    // ping was outstanding), and the client's smoothed RTT stood at
    // 257 ms after 15 s in seed 19 (112 ms in seed 12).
    for seed in 11..23 {
        let mut down = link(Some(20_000_000), 40);
        down.loss = 0.05;
        let mut up = clean(40);
        up.loss = 0.05;
        let outcome = play(Scenario {
            seed,
            size: 15_000_000,
            media_rate: MEDIA_RATE,
            down,
            up,
            read_ahead: ReadAhead::default(),
            pattern: Pattern::RealTime,
            limit: Duration::from_secs(60),
            stop_after: Some(Duration::from_secs(15)),
            tells_media_rate: true,
        });
        assert!(
            outcome.client_rtt < Duration::from_millis(120),
            "seed {seed}: the client's smoothed RTT is {:?} on an 80 ms path",
            outcome.client_rtt
        );
    }
}

#[test]
fn a_viewer_whose_acks_are_lost_in_a_burst_waits_seconds_not_ten() {
    // 3 % loss in bursts of eight datagrams (the bench's bursty link) both
    // ways, 20 Mbit/s, 80 ms RTT. A burst on the uplink lasts eight of the
    // client's datagrams, and a starving client sends few: its window probe
    // backed off to 2 s, so a burst of ACKs lost became seconds without an
    // ACK, the server sat on a full window of packets the client held, and
    // playback stopped for 3.0-5.7 s in these seeds (5.7, 5.1, 3.0). The
    // ACK is now repeated at the probe's first interval. (Seed 8 lost 10.2
    // s that way before; with the repeat its loss draws fell elsewhere and
    // it showed the mirror case, a burst on the way down stretched by the
    // server's backed-off probes, 10.2 s again; since the ACK delay scales
    // with the path its draws fall elsewhere again: 0.4 s, no underrun.
    // Not known to be fixed, so it stays here.) Seed 38 then
    // still stopped for 10.7 s: the silence had become a persistent
    // congestion, whose reset to the smallest window and a new startup
    // stood although the first ACK after it acknowledged packets sent
    // before it (the path had carried them); that reset is now undone.
    // Seeds 1-40 (2 Dec, evening; 441 s in a debug build, so not here):
    // underruns in 6, the longest 1.7 s; before the ACK delay scaled with
    // the path, in 9, the longest 10.2 s (seed 8).
    use crate::impairment::GilbertElliott;
    for seed in [1, 8, 19, 20, 38] {
        let mut down = link(Some(20_000_000), 40);
        down.queue_bytes = 256 * 1024;
        down.burst = Some(GilbertElliott::with_rate(0.03, 8.0));
        let mut up = clean(40);
        up.burst = Some(GilbertElliott::with_rate(0.03, 8.0));
        let out = play(Scenario {
            seed,
            size: 30_000_000,
            media_rate: MEDIA_RATE,
            down,
            up,
            read_ahead: ReadAhead::default(),
            pattern: Pattern::RealTime,
            limit: Duration::from_secs(62),
            stop_after: Some(Duration::from_secs(59)),
            tells_media_rate: true,
        });
        assert!(
            out.longest_stall <= Duration::from_secs(3),
            "seed {seed}: waited {:?} for a byte ({} underruns)",
            out.longest_stall,
            out.underruns
        );
    }
}

/// 25 s of real-time playback of a 15 MB file through a clean link of
/// `factor` times the media's rate, `delay` each way.
fn play_25_s(seed: u64, factor: f64, read_ahead: ReadAhead, delay: u64) -> Outcome {
    play(Scenario {
        seed,
        size: 15_000_000,
        media_rate: MEDIA_RATE,
        down: link(Some((factor * MEDIA_RATE as f64 * 8.0) as u64), delay),
        up: clean(delay),
        read_ahead,
        pattern: Pattern::RealTime,
        limit: Duration::from_secs(40),
        stop_after: Some(Duration::from_secs(25)),
        tells_media_rate: true,
    })
}

/// [`play_25_s`] with 20 ms each way, which must never leave the player
/// without data.
fn play_25_s_without_running_dry(seed: u64, factor: f64, read_ahead: ReadAhead) -> Outcome {
    let out = play_25_s(seed, factor, read_ahead, 20);
    assert_eq!(
        (out.underruns, out.dry_stalls),
        (0, 0),
        "{factor}x: the player ran dry"
    );
    out
}

#[test]
fn a_viewer_on_a_fast_link_moves_the_window_in_eighths_of_whole_datagrams() {
    // A player that keeps up with the link holds its window full. Told in
    // every ACK and at each read (10 ms of media here, 3.5 datagrams), the
    // window crept on by a read's worth, and on a real server each move
    // cost an ACK to take and a `sendmsg` of a few datagrams (ten
    // `gst-launch-1.0` viewers of 4 Mbit/s: 7.8 datagrams a send). On a
    // link measured at least twice the media's rate the client now tells
    // it once it moved by an eighth of the read-ahead: 25 s of playback
    // moved the window 1,144 times at 20x and 1,472 at 4x before, 131 now,
    // with no underrun. (This harness serves the pacer on a 1 ms tick, so
    // its server sends about eight datagrams a turn either way; the
    // drivers' 2 ms tick is where the sends gather.) On a slower link, or
    // one not measured yet, every move is still told at once: each moment
    // the server waits there is lost for good (2x: 1,677 moves, 1.5x:
    // 2,023, before and now).
    for (factor, moves) in [
        (20.0, 0..=200),
        (4.0, 0..=200),
        (2.0, 1_000..=u64::MAX),
        (1.5, 1_000..=u64::MAX),
    ] {
        let out = play_25_s_without_running_dry(3, factor, ReadAhead::default());
        assert!(
            moves.contains(&out.window_moves),
            "{factor}x: the window moved {} times for {} data datagrams",
            out.window_moves,
            out.data_packets_sent
        );
        // A move told in whole datagrams leaves no sliver at the window's
        // edge for the server to hold back until everything in flight is
        // acknowledged and then send alone (a third turn of a real server
        // per refill): 89 and 90 slivers in the 131 moves at 20x and 4x
        // before, 2 now, as on slower links, whose window creeps on past
        // them.
        assert!(
            out.short_data_packets_sent <= 5,
            "{factor}x: {} short datagrams in {} window moves",
            out.short_data_packets_sent,
            out.window_moves
        );
    }
}

/// Bytes sent beyond what was played when a real-time viewer of a 15 MB
/// file with the default read-ahead stops after 15 s.
fn waste_of_a_stop_after_15_s(
    seed: u64,
    down: ImpairmentConfig,
    up: ImpairmentConfig,
    tells_media_rate: bool,
) -> u64 {
    play(Scenario {
        seed,
        size: 15_000_000,
        media_rate: MEDIA_RATE,
        down,
        up,
        read_ahead: ReadAhead::default(),
        pattern: Pattern::RealTime,
        limit: Duration::from_secs(60),
        stop_after: Some(Duration::from_secs(15)),
        tells_media_rate,
    })
    .waste
}

#[test]
fn a_token_bucket_shaper_costs_neither_loss_nor_link_time() {
    // tc tbf's shape at 2 Mbit/s with a 4 KB burst and 30 KB of queue, on a
    // path with no delay of its own: after an idle spell 2-3 datagrams
    // cross at once and come back in microseconds. Read as the link's rate
    // and minimum RTT, they overflowed the queue (5.6 % of the datagrams
    // lost) and idled the link between ACKs.
    for pattern in [Pattern::RealTime, Pattern::Greedy] {
        let mut down = link(Some(2_050_000), 0);
        down.queue_bytes = 30_000;
        down.bucket_bytes = 4096;
        let size = 8_000_000;
        let out = play(Scenario {
            seed: 1,
            size,
            media_rate: MEDIA_RATE,
            down,
            up: clean(0),
            read_ahead: ReadAhead::default(),
            pattern,
            limit: Duration::from_secs(120),
            stop_after: None,
            tells_media_rate: true,
        });
        assert!(out.finished, "{pattern:?}: stopped after {:?}", out.took);
        assert!(
            out.downlink.dropped() * 200 <= out.downlink.packets,
            "{pattern:?}: {}",
            out.downlink
        );
        let download = link_time(size, 2_050_000.0);
        assert!(
            out.took <= download.mul_f64(1.01) + Duration::from_millis(200),
            "{pattern:?}: the file took {:?}, the link's time for it is {download:?}",
            out.took
        );
    }
}

#[test]
fn a_viewer_with_a_small_read_ahead_moves_the_window_in_steps_of_128_kib() {
    // A real player's source holds about a second of media (its
    // pipeline's queues hold the rest): 512 KiB at 4 Mbit/s. An eighth of
    // it is 64 KiB, a refill of 45 datagrams eight times a second, each a
    // window update and a burst's ACKs that wake the server. On a fast
    // link the window now moves in steps of 128 KiB (a quarter here), in
    // whole datagrams, with no underrun: 146 and 139 moves in 25 s at 20x
    // and 4x the media's rate, 1,278 and 230 in eighths.
    //
    // With 1.5 MiB (a second of 12 Mbit/s media) at 20x the window moved
    // 1,065 times: while the link was not measured yet the client told
    // every move, a read's worth (3.5 datagrams), and the server sent each
    // move's whole datagrams and held its sliver back. Only a packet after
    // which the window was used up counted as app-limited, so these
    // packets' samples, the player's pace, replaced the link's rate in the
    // server's controller once the start's samples aged out (9.8 MB/s to
    // 0.42 within 200 ms); the steps then came at that pace, the client
    // measured the link as barely faster than the media and told every
    // move again. A packet that leaves less than a datagram of window is
    // app-limited now: 116 moves.
    for (read_ahead, factor) in [(512 * 1024, 20.0), (512 * 1024, 4.0), (1536 * 1024, 20.0)] {
        let out = play_25_s_without_running_dry(5, factor, ReadAhead::Fixed(read_ahead));
        assert!(
            out.window_moves <= 160 && out.short_data_packets_sent <= 5,
            "{read_ahead} bytes, {factor}x: {} window moves, {} short datagrams",
            out.window_moves,
            out.short_data_packets_sent
        );
    }
}

#[test]
fn viewers_on_fast_links_move_the_window_in_steps_at_every_read_ahead_and_round_trip() {
    // The trap above (1.5 MiB at 20x, 20 ms each way) was found only by
    // sweeping read-aheads and links: every other case moved the window
    // 32-154 times in 25 s. Part of the sweep stays here, at 10 and 40 ms
    // of RTT, so a case that starts telling every move again shows. (At
    // 100 ms, a 512 KiB or 1 MiB read-ahead at 3-4x still does: the first
    // link measurement holds slow start and comes in under twice the
    // media's rate; see the README's known limits.)
    for delay in [5, 20] {
        for read_ahead in [512 * 1024, 1536 * 1024, 3072 * 1024] {
            for factor in [20.0, 3.0] {
                let out = play_25_s(5, factor, ReadAhead::Fixed(read_ahead), delay);
                assert!(
                    out.window_moves <= 160 && out.underruns == 0,
                    "{delay} ms each way, {read_ahead} bytes, {factor}x: {} window moves, {} underruns",
                    out.window_moves,
                    out.underruns
                );
            }
        }
    }
}
