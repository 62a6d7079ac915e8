//! Whole transfers through a simulated network, deterministic per seed:
//! loss, duplication, delay with jitter (and so reordering), simulated time.
//! Each test checks what the protocol promises: the bytes delivered equal
//! the file, the server never sends past the client's window, and nothing
//! acknowledged is sent again.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::catalog::CatalogEntry;
use super::client::{ClientConfig, ClientConnection, ClientEvent};
use super::read_ahead::ReadAhead;
use super::server::{MemoryStore, ServerConfig, ServerEndpoint};
use super::wire::{
    Body, DEFAULT_LARGE_DATAGRAM_SIZE, MAX_DATAGRAM_SIZE, MAX_UDP_PAYLOAD, OpenErrorKind,
    OpenRequest, Packet,
};
use crate::impairment::{GilbertElliott, Impairment, ImpairmentConfig};

mod buffering_app;

fn clean(delay_ms: u64) -> ImpairmentConfig {
    ImpairmentConfig {
        delay: Duration::from_millis(delay_ms),
        ..Default::default()
    }
}

fn lossy(loss: f64, duplicate: f64, delay_ms: u64, jitter_ms: u64) -> ImpairmentConfig {
    ImpairmentConfig {
        loss,
        duplicate,
        delay: Duration::from_millis(delay_ms),
        jitter: Duration::from_millis(jitter_ms),
        ..Default::default()
    }
}

/// One direction of the simulated path.
struct Link {
    imp: Impairment,
    queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    seq: u64,
    /// Drop everything while true (an outage).
    down: bool,
    dropped: u64,
}

impl Link {
    fn new(config: ImpairmentConfig, seed: u64) -> Self {
        Link {
            imp: Impairment::new(config, seed),
            queue: BinaryHeap::new(),
            seq: 0,
            down: false,
            dropped: 0,
        }
    }
    fn send(&mut self, now: Instant, d: Vec<u8>) {
        if self.down {
            self.dropped += 1;
            return;
        }
        let arrivals = self.imp.process(now, d.len());
        if arrivals.is_empty() {
            self.dropped += 1;
        }
        for at in arrivals {
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq, d.clone())));
        }
    }
    fn next_time(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((t, _, _))| *t)
    }
    fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_time()? <= now {
            self.queue.pop().map(|Reverse((_, _, d))| d)
        } else {
            None
        }
    }
}

/// How the simulated player consumes.
#[derive(Clone, Copy)]
enum Consumer {
    /// Reads everything as soon as it arrives.
    Greedy,
    /// Reads `bytes_per_tick` every `tick`.
    Paced {
        bytes_per_tick: usize,
        tick: Duration,
    },
}

struct Sim {
    now: Instant,
    server: ServerEndpoint<MemoryStore>,
    client: ClientConnection,
    up: Link,
    down: Link,
    client_addr: SocketAddr,
    delivered: Vec<u8>,
    max_window_advertised: u64,
    /// Times a client datagram told a larger window than any before.
    window_moves: u64,
    data_packets_sent: u64,
    data_bytes_sent: u64,
    /// Data datagrams shorter than the largest before them, the file's
    /// last aside: slivers at a window's edge.
    short_data_packets_sent: u64,
    largest_payload_sent: usize,
    file_size: u64,
    /// Datagrams the server sent larger than [`MAX_DATAGRAM_SIZE`], and
    /// the largest.
    large_datagrams_sent: u64,
    largest_datagram_sent: usize,
    events: Vec<ClientEvent>,
    next_read: Instant,
    /// Timers fire only on multiples of this since the start, as the
    /// drivers' do (tokio's wheel and socket timeouts tick in
    /// milliseconds); zero fires them exactly.
    timer_tick: Duration,
    /// The client takes its datagrams and runs its timers only on
    /// multiples of this since the start (zero: as they come): a receiver
    /// on a busy machine, or behind a Wi-Fi link that aggregates, whose
    /// ACKs leave in bunches.
    client_tick: Duration,
    /// Smallest step of simulated time, so a busy loop still advances.
    min_step: Duration,
    /// The server's next this many answers to an Open are lost.
    lose_open_answers: u32,
    start: Instant,
}

impl Sim {
    fn new(
        seed: u64,
        file: Vec<u8>,
        read_ahead: u64,
        up: ImpairmentConfig,
        down: ImpairmentConfig,
    ) -> Self {
        let client = ClientConfig {
            read_ahead: ReadAhead::Fixed(read_ahead),
            ..Default::default()
        };
        Self::with_configs(seed, file, ServerConfig::default(), client, up, down)
    }

    fn with_configs(
        seed: u64,
        file: Vec<u8>,
        server_config: ServerConfig,
        client_config: ClientConfig,
        up: ImpairmentConfig,
        down: ImpairmentConfig,
    ) -> Self {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let file_size = file.len() as u64;
        let server = ServerEndpoint::new(
            server_config,
            MemoryStore {
                files: vec![("movie.mp4".into(), file)],
            },
            rng.r#gen(),
            now,
        );
        let client = ClientConnection::new(client_config, rng.r#gen(), now);
        Sim {
            now,
            server,
            client,
            up: Link::new(up, seed ^ 0x5555),
            down: Link::new(down, seed ^ 0xaaaa),
            client_addr: "10.0.0.2:4000".parse().expect("valid address"),
            delivered: Vec::new(),
            max_window_advertised: 0,
            window_moves: 0,
            data_packets_sent: 0,
            data_bytes_sent: 0,
            short_data_packets_sent: 0,
            largest_payload_sent: 0,
            file_size,
            large_datagrams_sent: 0,
            largest_datagram_sent: 0,
            lose_open_answers: 0,
            events: Vec::new(),
            next_read: now,
            timer_tick: Duration::ZERO,
            client_tick: Duration::ZERO,
            min_step: Duration::from_micros(100),
            start: now,
        }
    }

    /// `t` moved to a multiple of `tick` since the start: the next one
    /// (`up`) or the last one; `t` itself when `tick` is zero.
    fn on_tick(&self, t: Instant, tick: Duration, up: bool) -> Instant {
        if tick.is_zero() {
            return t;
        }
        let tick = tick.as_nanos();
        let since = t.saturating_duration_since(self.start).as_nanos();
        let ticks = if up {
            since.div_ceil(tick)
        } else {
            since / tick
        };
        self.start + Duration::from_nanos((ticks * tick) as u64)
    }

    /// When a timer due at `t` really fires.
    fn fires_at(&self, t: Instant) -> Instant {
        self.on_tick(t, self.timer_tick, true)
    }

    /// When the client sees something due at `t` (a datagram's arrival,
    /// a timer's deadline).
    fn client_sees_at(&self, t: Instant) -> Instant {
        self.on_tick(self.fires_at(t), self.client_tick, true)
    }

    /// The last time the client ran, up to now: what arrived by then is in.
    fn client_ran_at(&self) -> Instant {
        self.on_tick(self.now, self.client_tick, false)
    }

    fn flush(&mut self) {
        while let Some(d) = self.client.poll_transmit(self.now) {
            if let Ok(p) = Packet::decode(&d) {
                let window = match p.body {
                    Body::Ack { window, .. } | Body::Open(OpenRequest { window, .. }) => {
                        Some(window)
                    }
                    Body::Hello {
                        early_open: Some(o),
                        ..
                    } => Some(o.window),
                    _ => None,
                };
                if let Some(window) = window.filter(|&w| w > self.max_window_advertised) {
                    self.max_window_advertised = window;
                    self.window_moves += 1;
                }
            }
            self.up.send(self.now, d);
        }
    }

    /// Every Data packet the server sends must not be already acknowledged.
    fn check_no_acked_resend(&self, before: &[(u64, u32, std::ops::Range<u64>)]) {
        for (id, tid, r) in before {
            assert!(
                !self.server.is_acked(*id, *tid, r.clone()),
                "acknowledged range {r:?} was resent"
            );
        }
    }

    fn step(&mut self, consumer: Consumer) {
        // Deliver what is due.
        while let Some(d) = self.up.pop_due(self.now) {
            self.server.handle_datagram(self.now, self.client_addr, &d);
        }
        let client_ran = self.client_ran_at();
        while let Some(d) = self.down.pop_due(client_ran) {
            self.client.handle_datagram(self.now, &d);
        }
        if self
            .server
            .poll_timeout()
            .is_some_and(|t| self.fires_at(t) <= self.now)
        {
            self.server.handle_timeout(self.now);
        }
        if self
            .client
            .poll_timeout()
            .is_some_and(|t| self.client_sees_at(t) <= self.now)
        {
            self.client.handle_timeout(self.now);
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push(e);
        }
        if self.now >= self.next_read {
            match consumer {
                Consumer::Greedy => {
                    while let Some(c) = self.client.read(self.now, 64 * 1024) {
                        self.delivered.extend_from_slice(&c);
                    }
                }
                Consumer::Paced {
                    bytes_per_tick,
                    tick,
                } => {
                    let mut left = bytes_per_tick;
                    while left > 0 {
                        match self.client.read(self.now, left) {
                            Some(c) => {
                                left -= c.len();
                                self.delivered.extend_from_slice(&c);
                            }
                            None => break,
                        }
                    }
                    self.next_read = self.now + tick;
                }
            }
        }
        // Snapshot what the server holds as acknowledged before it sends.
        self.flush_checked();
        let next = [
            self.up.next_time(),
            self.down.next_time().map(|t| self.client_sees_at(t)),
            self.server.poll_timeout().map(|t| self.fires_at(t)),
            self.client.poll_timeout().map(|t| self.client_sees_at(t)),
            match consumer {
                Consumer::Greedy => None,
                Consumer::Paced { .. } => Some(self.next_read),
            },
        ]
        .into_iter()
        .flatten()
        .min();
        self.now = next
            .unwrap_or(self.now + Duration::from_millis(1))
            .max(self.now + self.min_step);
    }

    fn flush_checked(&mut self) {
        let mut buf = Vec::new();
        let mut sent = Vec::new();
        // Encrypted sessions are opaque to the harness: no window checks.
        let inspect = !self.client.is_encrypted();
        // Server first, so the acked-state check sees the state at send time.
        while let Some(to) = self.server.poll_transmit(self.now, &mut buf) {
            assert_eq!(to, self.client_addr);
            if buf.len() > MAX_DATAGRAM_SIZE {
                self.large_datagrams_sent += 1;
            }
            self.largest_datagram_sent = self.largest_datagram_sent.max(buf.len());
            if let (
                true,
                Ok(Packet {
                    connection_id,
                    body:
                        Body::Data {
                            transfer_id,
                            offset,
                            ref payload,
                        },
                    ..
                }),
            ) = (inspect, Packet::decode(&buf))
            {
                sent.push((
                    connection_id,
                    transfer_id,
                    offset..offset + payload.len() as u64,
                ));
                self.data_packets_sent += 1;
                self.data_bytes_sent += payload.len() as u64;
                let end = offset + payload.len() as u64;
                if payload.len() < self.largest_payload_sent && end < self.file_size {
                    self.short_data_packets_sent += 1;
                }
                self.largest_payload_sent = self.largest_payload_sent.max(payload.len());
                assert!(
                    end <= self.max_window_advertised,
                    "server sent up to {end} past the window {}",
                    self.max_window_advertised
                );
            }
            if self.lose_open_answers > 0
                && matches!(
                    Packet::decode(&buf).map(|p| p.body),
                    Ok(Body::OpenOk { .. })
                )
            {
                self.lose_open_answers -= 1;
                continue;
            }
            self.down.send(self.now, buf.clone());
        }
        self.check_no_acked_resend(&sent);
        self.flush();
    }

    fn run_until(
        &mut self,
        consumer: Consumer,
        limit: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) {
        let deadline = self.now + limit;
        let mut steps = 0u64;
        while !done(self) && self.now < deadline {
            self.step(consumer);
            steps += 1;
            assert!(steps < 5_000_000, "simulation made no progress");
        }
    }
}

impl Sim {
    /// Real-time playback of a 4 Mbit/s stream for `d` from now.
    fn play_for(&mut self, d: Duration) {
        let playing = Consumer::Paced {
            bytes_per_tick: 50_000,
            tick: Duration::from_millis(100),
        };
        let until = self.now + d;
        self.run_until(playing, d + Duration::from_secs(2), |s| s.now >= until);
    }

    /// Seeks to `offset`; what arrives from now on is the new position's.
    fn seek(&mut self, offset: u64) -> Instant {
        self.client.open_file(self.now, "movie.mp4", offset);
        self.delivered.clear();
        self.now
    }
}

fn file(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.r#gen()).collect()
}

fn transfer(seed: u64, size: usize, up: ImpairmentConfig, down: ImpairmentConfig) -> Sim {
    let data = file(size, seed);
    let mut sim = Sim::new(seed, data.clone(), 256 * 1024, up, down);
    let now = sim.now;
    sim.client.open_file(now, "movie.mp4", 0);
    sim.run_until(Consumer::Greedy, Duration::from_secs(600), |s| {
        s.client.is_finished()
    });
    assert!(
        sim.client.is_finished(),
        "seed {seed}: transfer did not finish: {:?}",
        sim.events
    );
    assert!(
        sim.delivered == data,
        "seed {seed}: delivered bytes differ from the file"
    );
    sim
}

#[test]
fn clean_path_delivers_the_file() {
    let sim = transfer(1, 3_000_000, clean(10), clean(10));
    // No loss: every byte is sent exactly once, in full-size packets.
    assert_eq!(sim.data_bytes_sent, 3_000_000);
    assert_eq!(sim.client.stats().bytes_received, 3_000_000);
    assert_eq!(sim.client.stats().bytes_redundant, 0);
    let needed = 3_000_000u64.div_ceil(super::wire::DEFAULT_MAX_PAYLOAD as u64);
    assert!(
        sim.data_packets_sent <= needed + 2,
        "{} packets",
        sim.data_packets_sent
    );
}

#[test]
fn lossy_reordering_duplicating_path_delivers_the_file() {
    let bad = lossy(0.1, 0.05, 40, 15);
    for seed in 0..6 {
        let sim = transfer(100 + seed, 600_000, bad.clone(), bad.clone());
        // About a tenth of the server's packets were dropped on the way.
        let stats = sim.client.stats();
        let ratio =
            stats.packets_lost as f64 / (stats.packets_lost + stats.packets_received) as f64;
        assert!((0.04..0.2).contains(&ratio), "loss estimate {ratio}");
        // Copies the path made and resends of what had arrived brought
        // nothing new; every other byte came once.
        assert!(stats.bytes_redundant > 0);
        assert_eq!(stats.bytes_received - stats.bytes_redundant, 600_000);
    }
}

#[test]
fn heavy_loss_still_completes() {
    let awful = lossy(0.3, 0.0, 5, 5);
    transfer(7, 200_000, awful.clone(), awful);
}

#[test]
fn catalog_and_missing_file() {
    let mut sim = Sim::new(3, file(5000, 3), 65536, clean(5), clean(5));
    let now = sim.now;
    sim.client.open_catalog(now);
    sim.run_until(Consumer::Greedy, Duration::from_secs(10), |s| {
        s.events
            .iter()
            .any(|e| matches!(e, ClientEvent::Catalog(_)))
    });
    assert!(
        sim.events
            .contains(&ClientEvent::Catalog(vec![CatalogEntry {
                name: "movie.mp4".into(),
                size: 5000
            }]))
    );
    let now = sim.now;
    sim.client.open_file(now, "nope.mkv", 0);
    sim.run_until(Consumer::Greedy, Duration::from_secs(10), |s| {
        s.events
            .iter()
            .any(|e| matches!(e, ClientEvent::OpenFailed { .. }))
    });
    assert!(sim.events.iter().any(|e| matches!(
        e,
        ClientEvent::OpenFailed {
            kind: OpenErrorKind::NotFound,
            ..
        }
    )));
}

#[test]
fn paused_reader_stops_the_sender_at_the_read_ahead() {
    let read_ahead = 100_000u64;
    let data = file(2_000_000, 9);
    let mut sim = Sim::new(9, data.clone(), read_ahead, clean(20), clean(20));
    let now = sim.now;
    sim.client.open_file(now, "movie.mp4", 0);
    // Play 300 kB, then pause for 30 simulated seconds.
    sim.run_until(Consumer::Greedy, Duration::from_secs(30), |s| {
        s.delivered.len() >= 300_000
    });
    let consumed = sim.delivered.len() as u64;
    let paused = Consumer::Paced {
        bytes_per_tick: 0,
        tick: Duration::from_millis(100),
    };
    let pause_end = sim.now + Duration::from_secs(30);
    sim.run_until(paused, Duration::from_secs(30), |s| s.now >= pause_end);
    let highest = sim
        .server
        .transfer_window(sim.client.connection_id())
        .expect("transfer");
    assert!(
        highest <= consumed + read_ahead,
        "server allowed {highest} with {consumed} consumed and {read_ahead} read-ahead"
    );
    let sent_while_paused = sim.data_packets_sent;
    let client_datagrams = sim.up.imp.stats().packets;
    sim.run_until(paused, Duration::from_secs(20), |_| false);
    assert_eq!(
        sim.data_packets_sent, sent_while_paused,
        "server kept sending while paused"
    );
    // A paused client only keeps the session alive: a ping per keepalive
    // interval (a third of the server's 30 s idle timeout), not an RTT
    // ping a second.
    let pings = sim.up.imp.stats().packets - client_datagrams;
    assert!(pings <= 3, "{pings} datagrams from a paused client in 20 s");
    // Resume: everything arrives.
    sim.run_until(Consumer::Greedy, Duration::from_secs(60), |s| {
        s.client.is_finished()
    });
    assert!(sim.delivered == data);
}

#[test]
fn lost_window_updates_do_not_deadlock() {
    let read_ahead = 50_000u64;
    let data = file(400_000, 11);
    let mut sim = Sim::new(11, data.clone(), read_ahead, clean(10), clean(10));
    let now = sim.now;
    sim.client.open_file(now, "movie.mp4", 0);
    let paused = Consumer::Paced {
        bytes_per_tick: 0,
        tick: Duration::from_millis(50),
    };
    // Fill the window without reading, so the server is blocked.
    let until = sim.now + Duration::from_secs(2);
    sim.run_until(paused, Duration::from_secs(2), |s| s.now >= until);
    assert_eq!(sim.client.available(), read_ahead);
    // Resume reading while the uplink drops everything: every window
    // update is lost. Then the uplink heals.
    sim.up.down = true;
    let until = sim.now + Duration::from_secs(1);
    sim.run_until(Consumer::Greedy, Duration::from_secs(1), |s| s.now >= until);
    assert!(sim.up.dropped > 0);
    sim.up.down = false;
    sim.run_until(Consumer::Greedy, Duration::from_secs(30), |s| {
        s.client.is_finished()
    });
    assert!(
        sim.client.is_finished(),
        "stalled after lost window updates"
    );
    assert!(sim.delivered == data);
}

#[test]
fn seek_drops_the_old_position() {
    let data = file(1_000_000, 12);
    let mut sim = Sim::new(12, data.clone(), 100_000, clean(10), clean(10));
    let now = sim.now;
    sim.client.open_file(now, "movie.mp4", 0);
    sim.run_until(Consumer::Greedy, Duration::from_secs(10), |s| {
        s.delivered.len() >= 50_000
    });
    let now = sim.now;
    sim.delivered.clear();
    sim.client.open_file(now, "movie.mp4", 700_000);
    sim.run_until(Consumer::Greedy, Duration::from_secs(30), |s| {
        s.client.is_finished()
    });
    assert!(sim.delivered == data[700_000..]);
}

#[test]
fn both_sides_expire_a_silent_peer() {
    let mut sim = Sim::new(13, file(10_000, 13), 65536, clean(5), clean(5));
    let now = sim.now;
    sim.client.open_file(now, "movie.mp4", 0);
    sim.run_until(Consumer::Greedy, Duration::from_secs(10), |s| {
        s.client.is_finished()
    });
    assert_eq!(sim.server.session_count(), 1);
    // Keepalives hold the session while both can talk, however long.
    let until = sim.now + Duration::from_secs(120);
    sim.run_until(Consumer::Greedy, Duration::from_secs(120), |s| {
        s.now >= until
    });
    assert_eq!(
        sim.server.session_count(),
        1,
        "keepalive did not hold the session"
    );
    assert!(!sim.client.is_closed());
    // The path dies: each side gives up after the idle timeout.
    sim.up.down = true;
    sim.down.down = true;
    let until = sim.now + super::server::DEFAULT_IDLE_TIMEOUT + Duration::from_secs(1);
    sim.run_until(Consumer::Greedy, Duration::from_secs(60), |s| {
        s.now >= until
    });
    assert_eq!(sim.server.session_count(), 0);
    assert!(sim.client.is_closed());
    assert!(sim.events.iter().any(|e| matches!(
        e,
        ClientEvent::Closed {
            reason: super::wire::CloseReason::IdleTimeout,
            ..
        }
    )));
}

fn unresponsive_at(sim: &Sim) -> Option<Duration> {
    sim.events.iter().find_map(|e| match e {
        ClientEvent::Unresponsive { silent_for } => Some(*silent_for),
        _ => None,
    })
}

#[test]
fn with_another_server_a_dead_one_is_given_up_within_a_second() {
    // Mid-stream, 40 ms RTT, a real-time reader: the server vanishes.
    let data = file(4_000_000, 31);
    let mut sim = Sim::new(31, data, 256 * 1024, clean(20), clean(20));
    sim.client.set_fast_failover(true);
    let now = sim.now;
    sim.client.open_file(now, "movie.mp4", 0);
    let paced = Consumer::Paced {
        bytes_per_tick: 5_000,
        tick: Duration::from_millis(10),
    };
    sim.run_until(paced, Duration::from_secs(3), |_| false);
    assert!(
        unresponsive_at(&sim).is_none(),
        "a live server was given up"
    );
    sim.up.down = true;
    sim.down.down = true;
    let outage = sim.now;
    sim.run_until(paced, Duration::from_secs(5), |s| {
        unresponsive_at(s).is_some()
    });
    let noticed = sim.now - outage;
    let silent = unresponsive_at(&sim).expect("a dead server was not noticed");
    assert!(silent <= noticed + Duration::from_millis(1));
    assert!(sim.client.is_closed());
    assert!(
        noticed < Duration::from_millis(1200),
        "took {noticed:?} to notice"
    );

    // Before the Welcome: a server that never answers is left after the
    // handshake timeout.
    let mut sim = Sim::new(32, file(1000, 32), 65536, clean(20), clean(20));
    sim.client.set_fast_failover(true);
    sim.up.down = true;
    sim.run_until(Consumer::Greedy, Duration::from_secs(5), |s| {
        unresponsive_at(s).is_some()
    });
    let waited = unresponsive_at(&sim).expect("a silent server was not given up");
    assert!(waited >= super::client::HANDSHAKE_FAILOVER_TIMEOUT);
    assert!(waited < super::client::HANDSHAKE_FAILOVER_TIMEOUT + Duration::from_millis(100));
}

#[test]
fn a_live_server_on_a_lossy_path_is_not_given_up() {
    // Ten per cent loss each way, 80 ms RTT, for a minute: streaming,
    // then paused with a full window where only pings cross. No false
    // alarm, and without fast failover no alarm ever.
    for (seed, fast) in [(41, true), (42, true), (43, true), (44, false)] {
        let data = file(3_000_000, seed);
        let lossy_path = || lossy(0.10, 0.0, 40, 5);
        let mut sim = Sim::new(seed, data, 512 * 1024, lossy_path(), lossy_path());
        sim.client.set_fast_failover(fast);
        let now = sim.now;
        sim.client.open_file(now, "movie.mp4", 0);
        let paced = Consumer::Paced {
            bytes_per_tick: 20_000,
            tick: Duration::from_millis(100),
        };
        sim.run_until(paced, Duration::from_secs(30), |_| false);
        let paused = Consumer::Paced {
            bytes_per_tick: 0,
            tick: Duration::from_secs(1),
        };
        sim.run_until(paused, Duration::from_secs(30), |_| false);
        assert_eq!(unresponsive_at(&sim), None, "seed {seed}");
        assert!(!sim.client.is_closed(), "seed {seed}");
        assert!(sim.delivered.len() > 1_000_000, "seed {seed}");
    }
}

fn bottleneck(rate_mbit: u64, delay_ms: u64, queue_kb: usize) -> ImpairmentConfig {
    ImpairmentConfig {
        delay: Duration::from_millis(delay_ms),
        rate_bps: Some(rate_mbit * 1_000_000),
        queue_bytes: queue_kb * 1024,
        ..Default::default()
    }
}

#[test]
fn burst_loss_behind_a_bottleneck_delivers_the_file() {
    let mut down = bottleneck(20, 40, 64);
    down.burst = Some(GilbertElliott::with_rate(0.03, 8.0));
    for seed in 0..3 {
        transfer(200 + seed, 2_000_000, clean(40), down.clone());
    }
}

#[test]
fn every_impairment_at_once_delivers_the_file() {
    let nasty = ImpairmentConfig {
        loss: 0.05,
        burst: Some(GilbertElliott::with_rate(0.02, 4.0)),
        delay: Duration::from_millis(30),
        jitter: Duration::from_millis(10),
        reorder: 0.05,
        reorder_delay: Duration::from_millis(15),
        duplicate: 0.03,
        rate_bps: Some(10_000_000),
        queue_bytes: 48 * 1024,
        ..Default::default()
    };
    for seed in 0..3 {
        let sim = transfer(300 + seed, 1_000_000, nasty.clone(), nasty.clone());
        let s = sim.down.imp.stats();
        assert!(
            s.dropped_random > 0 && s.dropped_burst > 0 && s.duplicated > 0 && s.reordered > 0,
            "{s}"
        );
    }
}

/// Goodput in Mbit/s of a greedy transfer of `size` bytes.
fn goodput(seed: u64, size: usize, up: ImpairmentConfig, down: ImpairmentConfig) -> f64 {
    goodput_to(seed, size, up, down, Duration::ZERO)
}

/// [`goodput`] to a client that runs every `client_tick`.
fn goodput_to(
    seed: u64,
    size: usize,
    up: ImpairmentConfig,
    down: ImpairmentConfig,
    client_tick: Duration,
) -> f64 {
    let data = file(size, seed);
    let mut sim = Sim::new(seed, data.clone(), 8 << 20, up, down);
    sim.client_tick = client_tick;
    let start = sim.now;
    sim.client.open_file(start, "movie.mp4", 0);
    sim.run_until(Consumer::Greedy, Duration::from_secs(300), |s| {
        s.client.is_finished()
    });
    assert!(sim.delivered == data);
    size as f64 * 8.0 / (sim.now - start).as_secs_f64() / 1e6
}

// Simulated time, not wall-clock time: these are deterministic checks of
// the controller's behaviour, not benchmarks.

#[test]
fn fills_a_clean_bottleneck() {
    let mbit = goodput(1, 6_000_000, clean(40), bottleneck(20, 40, 100));
    assert!(mbit > 14.0, "{mbit:.2} Mbit/s of 20");
}

/// A receiver that takes its datagrams every 20 ms on a 2 ms path (a
/// busy machine; the load generator's 500 viewers on one core lagged that
/// much) sends its ACKs in bunches: the round trips the sender measures
/// swing from 2 to 22 ms while its window was sized for the minimum. It
/// got 4.1 Mbit/s of 50 (47.7 taken at once) before the window allowed
/// for bunches (`Bbr::update_ack_aggregation`), 42.6 after.
#[test]
fn a_receiver_that_takes_its_datagrams_in_bunches_still_gets_the_link() {
    let path = bottleneck(50, 1, 400);
    let prompt = goodput_to(5, 8_000_000, clean(1), path.clone(), Duration::ZERO);
    let bunched = goodput_to(5, 8_000_000, clean(1), path, Duration::from_millis(20));
    assert!(
        bunched > prompt * 0.7,
        "{bunched:.1} Mbit/s in bunches, {prompt:.1} taken at once"
    );
}

#[test]
fn random_loss_does_not_starve_the_transfer() {
    // 10 % loss both ways at 80 ms RTT: a loss-based window would collapse
    // to well under 1 Mbit/s here.
    let mut down = bottleneck(20, 40, 100);
    down.loss = 0.1;
    let mut up = clean(40);
    up.loss = 0.1;
    let mbit = goodput(2, 6_000_000, up, down);
    assert!(mbit > 10.0, "{mbit:.2} Mbit/s of 20 at 10 % loss");
}

#[test]
fn burst_loss_does_not_starve_the_transfer() {
    let mut down = bottleneck(20, 40, 100);
    down.burst = Some(GilbertElliott::with_rate(0.03, 8.0));
    let mbit = goodput(3, 6_000_000, clean(40), down);
    assert!(mbit > 12.0, "{mbit:.2} Mbit/s of 20 at 3 % burst loss");
}

#[test]
fn throughput_recovers_within_a_few_round_trips_after_loss_stops() {
    // Seeds 5 and 7 left ProbeBW at 1.5 Mbit/s with the loss gone (its
    // rounds at that rate were too small to count as a lossy spell) and
    // growing 1.25× every eight rounds, until a probe that finds room
    // sends it back to startup.
    for seed in [4, 5, 7] {
        let data = file(24_000_000, seed);
        let mut heavy = bottleneck(20, 40, 100);
        heavy.loss = 0.3;
        let mut up = clean(40);
        up.loss = 0.3;
        let mut sim = Sim::new(seed, data.clone(), 8 << 20, up, heavy);
        let start = sim.now;
        sim.client.open_file(start, "movie.mp4", 0);
        let loss_ends = start + Duration::from_secs(4);
        sim.run_until(Consumer::Greedy, Duration::from_secs(5), |s| {
            s.now >= loss_ends
        });
        sim.up.imp.set_config(clean(40));
        sim.down.imp.set_config(bottleneck(20, 40, 100));
        // Allow a few round trips (80 ms each), then measure two seconds.
        let from = sim.now + Duration::from_millis(500);
        sim.run_until(Consumer::Greedy, Duration::from_secs(1), |s| s.now >= from);
        let before = sim.delivered.len();
        let to = sim.now + Duration::from_secs(2);
        sim.run_until(Consumer::Greedy, Duration::from_secs(3), |s| s.now >= to);
        let mbit = (sim.delivered.len() - before) as f64 * 8.0 / 2.0 / 1e6;
        assert!(
            mbit > 15.0,
            "seed {seed}: {mbit:.2} Mbit/s of 20 after loss stopped"
        );
        sim.run_until(Consumer::Greedy, Duration::from_secs(60), |s| {
            s.client.is_finished()
        });
        assert!(sim.delivered == data, "seed {seed}");
    }
}

#[test]
fn random_loss_never_collapses_the_rate() {
    // Small transfers are the hard case: early rounds hold few packets, and
    // a controller that reads their noise as congestion never recovers.
    for seed in 0..10 {
        let mut down = bottleneck(20, 40, 64);
        down.loss = 0.1;
        let mut up = clean(40);
        up.loss = 0.1;
        let data = file(1_400_000, seed);
        let mut sim = Sim::new(seed, data.clone(), 2 << 20, up, down);
        let start = sim.now;
        sim.client.open_file(start, "movie.mp4", 0);
        sim.run_until(Consumer::Greedy, Duration::from_secs(300), |s| {
            s.client.is_finished()
        });
        assert!(sim.delivered == data);
        let took = sim.now - start;
        // 1.4 MB at 20 Mbit/s is 0.56 s; allow startup and recovery.
        assert!(took < Duration::from_secs(4), "seed {seed}: {took:?}");
    }
}

fn with_passphrases(seed: u64, data: Vec<u8>, server: Option<&str>, client: Option<&str>) -> Sim {
    use super::crypto::Psk;
    let server_config = ServerConfig {
        passphrase: server.map(Psk::from_passphrase),
        ..ServerConfig::default()
    };
    let client_config = ClientConfig {
        read_ahead: ReadAhead::Fixed(256 * 1024),
        passphrase: client.map(Psk::from_passphrase),
        ..Default::default()
    };
    let mut sim = Sim::with_configs(
        seed,
        data,
        server_config,
        client_config,
        lossy(0.05, 0.02, 20, 5),
        lossy(0.05, 0.02, 20, 5),
    );
    let now = sim.now;
    sim.client.open_catalog(now);
    sim
}

/// A 3 MB transfer for a client whose route to the server carries
/// datagrams of any size (as on one host), through `down`.
fn offering_large_datagrams(seed: u64, down: ImpairmentConfig, passphrase: Option<&str>) -> Sim {
    use super::crypto::Psk;
    let data = file(3_000_000, seed);
    let server_config = ServerConfig {
        passphrase: passphrase.map(Psk::from_passphrase),
        ..ServerConfig::default()
    };
    let client_config = ClientConfig {
        read_ahead: ReadAhead::Fixed(1 << 20),
        passphrase: passphrase.map(Psk::from_passphrase),
        path_max_datagram: Some(MAX_UDP_PAYLOAD),
    };
    let mut sim = Sim::with_configs(
        seed,
        data.clone(),
        server_config,
        client_config,
        clean(1),
        down,
    );
    let now = sim.now;
    sim.client.open_file(now, "movie.mp4", 0);
    sim.run_until(Consumer::Greedy, Duration::from_secs(60), |s| {
        s.client.is_finished()
    });
    assert!(sim.client.is_finished(), "seed {seed}: {:?}", sim.events);
    assert!(sim.delivered == data, "seed {seed}: bytes differ");
    sim
}

#[test]
fn a_route_that_carries_large_datagrams_gets_them_after_one_trial() {
    for passphrase in [None, Some("s3cret")] {
        let sim = offering_large_datagrams(31, clean(1), passphrase);
        // All but the first megabyte in datagrams of the server's size.
        assert_eq!(
            sim.largest_datagram_sent, DEFAULT_LARGE_DATAGRAM_SIZE,
            "{passphrase:?}"
        );
        let after_trial = 3_000_000 - super::session::LARGE_DATAGRAM_TRIAL_AFTER;
        assert!(
            sim.large_datagrams_sent >= after_trial / DEFAULT_LARGE_DATAGRAM_SIZE as u64 * 3 / 4,
            "{passphrase:?}: {} large datagrams",
            sim.large_datagrams_sent
        );
        assert_eq!(sim.down.imp.stats().dropped(), 0);
    }
}

#[test]
fn a_trial_the_path_drops_costs_one_datagram_and_no_speed() {
    // A router on the way carries 1,500 bytes, though the client's own
    // interface carries more (a LAN with jumbo frames behind it).
    let ethernet = ImpairmentConfig {
        mtu: Some(1500),
        ..clean(1)
    };
    for seed in [41, 42, 43] {
        let sim = offering_large_datagrams(seed, ethernet.clone(), None);
        let stats = sim.down.imp.stats();
        assert_eq!(stats.dropped_too_large, 1, "seed {seed}: {stats}");
        assert_eq!(stats.dropped(), 1, "seed {seed}: {stats}");
        assert_eq!(sim.large_datagrams_sent, 1, "seed {seed}");
        // The controller was not told of the trial's loss: the transfer
        // takes as long as one that never tried.
        let mut plain = Sim::new(
            seed,
            file(3_000_000, seed),
            1 << 20,
            clean(1),
            ethernet.clone(),
        );
        let now = plain.now;
        plain.client.open_file(now, "movie.mp4", 0);
        plain.run_until(Consumer::Greedy, Duration::from_secs(60), |s| {
            s.client.is_finished()
        });
        assert!(plain.client.is_finished());
        let (tried, never) = (sim.now - sim.start, plain.now - plain.start);
        assert!(
            tried.as_secs_f64() <= never.as_secs_f64() * 1.1 + 0.01,
            "seed {seed}: {tried:?} with the trial, {never:?} without"
        );
    }
}

/// The handshake and the first round trips crossed a server busy with a
/// flood of junk (250 ms of queue on its socket; 2 s), then the path became a
/// loopback's again. The rate measured in those rounds was tiny and the
/// round-trip average high; paced at that rate, every datagram left
/// alone and came back within a fraction of the old average, each such
/// sample was set aside as too short to measure a link, and so the rate
/// never rose: an element pipeline of `load` took 2 MB at 3 KB/s for five
/// minutes.
#[test]
fn a_rate_measured_while_the_server_was_swamped_does_not_stay() {
    for (seed, offer, swamp_ms) in [
        (61, None, 125),
        (62, Some(MAX_UDP_PAYLOAD), 125),
        (63, Some(MAX_UDP_PAYLOAD), 125),
        (64, None, 1000),
        (65, Some(MAX_UDP_PAYLOAD), 1000),
    ] {
        let data = file(3_000_000, seed);
        let client_config = ClientConfig {
            read_ahead: ReadAhead::Fixed(1 << 20),
            path_max_datagram: offer,
            ..Default::default()
        };
        let mut sim = Sim::with_configs(
            seed,
            data.clone(),
            ServerConfig::default(),
            client_config,
            clean(swamp_ms),
            clean(swamp_ms),
        );
        let now = sim.now;
        sim.client.open_file(now, "movie.mp4", 0);
        sim.run_until(Consumer::Greedy, Duration::from_secs(10), |s| {
            s.delivered.len() >= 40_000
        });
        assert!(!sim.client.is_finished(), "seed {seed}");
        sim.up.imp = Impairment::new(clean(0), seed);
        sim.down.imp = Impairment::new(clean(0), seed + 1);
        let calm = sim.now;
        sim.run_until(Consumer::Greedy, Duration::from_secs(120), |s| {
            s.client.is_finished()
        });
        assert!(sim.delivered == data, "seed {seed}: bytes differ");
        // What is left, 3 MB, crosses a loopback in milliseconds once a
        // few samples have shown the round trip is short again: within
        // two of the swamped round trips (before: 4.7 s after 250 ms).
        let took = sim.now - calm;
        let bound = Duration::from_millis(4 * swamp_ms + 100);
        assert!(
            took < bound,
            "seed {seed} ({offer:?}, {swamp_ms} ms): {took:?}"
        );
    }
}

#[test]
fn passphrase_sessions_are_encrypted_and_byte_exact() {
    let data = file(500_000, 21);
    let mut sim = with_passphrases(21, data.clone(), Some("s3cret"), Some("s3cret"));
    sim.run_until(Consumer::Greedy, Duration::from_secs(30), |s| {
        s.events
            .iter()
            .any(|e| matches!(e, ClientEvent::Catalog(_)))
    });
    assert!(sim.client.is_encrypted());
    let now = sim.now;
    sim.client.open_file(now, "movie.mp4", 0);
    // Watch the wire: no 64-byte run of the file may cross it in clear.
    let probe = &data[100_000..100_064];
    let mut leaked = false;
    let deadline = sim.now + Duration::from_secs(120);
    while !sim.client.is_finished() && sim.now < deadline {
        for d in sim.down.queue.iter() {
            let bytes = &d.0.2;
            leaked |= bytes.windows(probe.len()).any(|w| w == probe);
        }
        sim.step(Consumer::Greedy);
    }
    assert!(sim.client.is_finished(), "{:?}", sim.events);
    assert!(sim.delivered == data);
    assert!(!leaked, "file bytes crossed the wire in clear");
}

#[test]
fn mismatched_passphrases_fail_before_any_byte() {
    for (server, client, why) in [
        (Some("right"), Some("wrong"), "wrong passphrase"),
        (Some("right"), None, "requires a passphrase"),
        (None, Some("mine"), "does not use a passphrase"),
    ] {
        let mut sim = with_passphrases(22, file(50_000, 22), server, client);
        sim.run_until(Consumer::Greedy, Duration::from_secs(10), |s| {
            s.client.is_closed()
        });
        let failure = sim.events.iter().find_map(|e| match e {
            ClientEvent::AuthenticationFailed(w) => Some(w.clone()),
            _ => None,
        });
        assert!(
            failure.as_deref().is_some_and(|w| w.contains(why)),
            "{server:?}/{client:?}: {:?}",
            sim.events
        );
        assert!(
            !sim.events
                .iter()
                .any(|e| matches!(e, ClientEvent::Catalog(_)))
        );
        assert_eq!(sim.delivered.len(), 0);
    }
}

#[test]
fn lossy_lan_is_not_paced_by_probe_timeouts() {
    // A LAN: 10 µs each way, 1 Gbit/s, 10 % loss both ways, timers that
    // tick in milliseconds as the drivers' do. The round trip is far below
    // the ACK delay and the tick; a window sized from the round trip alone
    // was a handful of datagrams, the link idled between ACKs and losses
    // waited for probe timeouts (here 350 ms instead of 80 ms; on a real
    // namespace with nftables drops 7 s instead of 0.3 s for 29 MiB).
    let lan = ImpairmentConfig {
        loss: 0.1,
        delay: Duration::from_micros(10),
        rate_bps: Some(1_000_000_000),
        queue_bytes: 512 * 1024,
        ..Default::default()
    };
    let size = 8_000_000;
    let data = file(size, 31);
    let mut sim = Sim::new(31, data.clone(), 4 * 1024 * 1024, lan.clone(), lan);
    sim.timer_tick = Duration::from_millis(1);
    sim.min_step = Duration::from_micros(2);
    let start = sim.now;
    sim.client.open_file(start, "movie.mp4", 0);
    sim.run_until(Consumer::Greedy, Duration::from_secs(60), |s| {
        s.client.is_finished()
    });
    assert!(sim.client.is_finished() && sim.delivered == data);
    let took = sim.now - start;
    // 8 MB at 1 Gbit/s is 64 ms.
    assert!(took < Duration::from_millis(200), "took {took:?}");
}

#[test]
fn first_four_kib_arrive_one_round_trip_after_the_hello() {
    // The Hello carries the Open and, with no load on the server, needs no
    // cookie: the Welcome, the answer and the first data come back together.
    let data = file(200_000, 41);
    let mut sim = Sim::new(41, data.clone(), 1 << 20, clean(40), clean(40));
    let start = sim.now;
    sim.client.open_file(start, "movie.mp4", 0);
    // The step that delivers ends by moving the clock on: note its start.
    // The first flight holds 4 KiB (a typefinder's first read) within the
    // 3x budget of the padded Hello.
    let mut first = Duration::MAX;
    while sim.delivered.len() < 4096 && sim.now < start + Duration::from_secs(5) {
        first = sim.now - start;
        sim.step(Consumer::Greedy);
    }
    assert!(
        first < Duration::from_millis(90),
        "first 4 KiB after {first:?} at 80 ms RTT"
    );
    sim.run_until(Consumer::Greedy, Duration::from_secs(30), |s| {
        s.client.is_finished()
    });
    assert!(sim.delivered == data);
}

/// A file of `size` bytes played in real time for `play` on a 20 Mbit/s,
/// 80 ms path with a 256 KB bottleneck queue, read-ahead 1 MiB.
fn playing_behind_a_bottleneck(seed: u64, size: usize, play: Duration) -> (Sim, Vec<u8>) {
    let data = file(size, seed);
    let mut sim = Sim::new(
        seed,
        data.clone(),
        1 << 20,
        clean(40),
        bottleneck(20, 40, 256),
    );
    sim.client.open_file(sim.now, "movie.mp4", 0);
    sim.play_for(play);
    (sim, data)
}

#[test]
fn a_seek_after_playback_gets_the_link_rate() {
    // Real-time playback of a 4 Mbit/s stream on a 20 Mbit/s, 80 ms path
    // keeps the sender at the read-ahead: its rate estimate only knows the
    // bitrate. The seek then wants as much as the link gives.
    let (mut sim, data) = playing_behind_a_bottleneck(51, 12_000_000, Duration::from_secs(8));
    let asked = sim.seek(6_000_000);
    sim.run_until(Consumer::Greedy, Duration::from_secs(10), |s| {
        s.delivered.len() >= 1_500_000
    });
    let took = sim.now - asked;
    assert!(sim.delivered[..] == data[6_000_000..6_000_000 + sim.delivered.len()]);
    // 1.5 MB at 20 Mbit/s is 0.6 s, plus the round trip and startup; at
    // the playback rate it would be 3 s.
    assert!(took < Duration::from_millis(1300), "took {took:?}");
}

/// A seek after playback, on a 20 Mbit/s path with a 256 KB bottleneck
/// queue: the server knows the link's rate from filling the read-ahead,
/// and cruises at it. Restarting startup (2.9x the estimate, growing per
/// round) filled the queue within two rounds of every seek, and each
/// resend of a lost datagram then waited behind up to 100 ms of it.
#[test]
fn a_seek_cruises_at_the_link_rate_it_knew_instead_of_flooding_the_queue() {
    for seed in 1..5u64 {
        let (mut sim, data) = playing_behind_a_bottleneck(seed, 8_000_000, Duration::from_secs(3));
        let dropped_before = sim.down.imp.stats().dropped_queue;
        let asked = sim.seek(5_000_000);
        let mut deepest = 0;
        while sim.delivered.len() < 600_000 && sim.now - asked < Duration::from_secs(10) {
            let next = sim.now + Duration::from_millis(1);
            sim.run_until(Consumer::Greedy, Duration::from_secs(1), |s| {
                s.now >= next || s.delivered.len() >= 600_000
            });
            let now = sim.now;
            deepest = deepest.max(sim.down.imp.queued_bytes(now));
        }
        let took = sim.now - asked;
        assert!(sim.delivered[..] == data[5_000_000..5_000_000 + sim.delivered.len()]);
        let dropped = sim.down.imp.stats().dropped_queue - dropped_before;
        assert_eq!(dropped, 0, "seed {seed}: the seek overflowed the queue");
        // At most a quarter of the queue (26 ms at 20 Mbit/s).
        assert!(deepest < 64 * 1024, "seed {seed}: {deepest} bytes queued");
        // 600 KB at 20 Mbit/s is 240 ms, plus the round trip.
        assert!(
            took < Duration::from_millis(400),
            "seed {seed}: took {took:?}"
        );
    }
}

/// One server whose random numbers come from `seed`, holding `data` as
/// `movie.mp4`, and `n` clients at 10.0.`subnet`.2 (ports from 4000,
/// nonces from `first_nonce`), each opening it with a fixed read-ahead.
/// Where a simulation's clients are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hosts {
    /// All on one machine (10.0.0.2, a port each), as the load
    /// generator's are and a household's players behind one NAT.
    One,
    /// Each on its own machine (10.0.1.2 and on).
    Each,
}

fn server_and_clients(
    now: Instant,
    data: &[u8],
    seed: [u8; 32],
    n: usize,
    hosts: Hosts,
    read_ahead: u64,
    first_nonce: u64,
) -> (
    ServerEndpoint<MemoryStore>,
    Vec<SocketAddr>,
    Vec<ClientConnection>,
) {
    let server = ServerEndpoint::new(
        ServerConfig {
            max_sessions_per_address: super::server::DEFAULT_MAX_SESSIONS,
            ..Default::default()
        },
        MemoryStore {
            files: vec![("movie.mp4".into(), data.to_vec())],
        },
        seed,
        now,
    );
    let addrs = (0..n)
        .map(|i| match hosts {
            Hosts::One => SocketAddr::from(([10, 0, 0, 2], 4000 + i as u16)),
            Hosts::Each => {
                let host = u8::try_from(2 + i).expect("at most 253 hosts");
                SocketAddr::from(([10, 0, 1, host], 4000))
            }
        })
        .collect();
    let clients = (0..n)
        .map(|i| {
            let mut c = ClientConnection::new(
                ClientConfig {
                    read_ahead: ReadAhead::Fixed(read_ahead),
                    ..Default::default()
                },
                first_nonce + i as u64,
                now,
            );
            c.open_file(now, "movie.mp4", 0);
            c
        })
        .collect();
    (server, addrs, clients)
}

/// Several clients of one server: the server serves them round-robin, a
/// batch of datagrams per turn (one GSO send each), fairly, and starves
/// none.
#[test]
fn sessions_take_turns_in_batches_fairly_and_none_starves() {
    use super::server::SESSION_BATCH;
    const CLIENTS: usize = 4;
    let start = Instant::now();
    let mut now = start;
    let data = file(1_500_000, 11);
    let (mut server, addrs, mut clients) =
        server_and_clients(now, &data, [7; 32], CLIENTS, Hosts::One, 4 << 20, 100);
    let mut delivered = vec![Vec::new(); CLIENTS];
    // Datagrams on their way, delivered one step (1 ms) later.
    let mut up: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut down: Vec<(usize, Vec<u8>)> = Vec::new();
    // Every data datagram's destination, in sending order.
    let mut order: Vec<usize> = Vec::new();
    let mut buf = Vec::new();
    while delivered.iter().any(|d| d.len() < data.len()) {
        assert!(now - start < Duration::from_secs(60), "transfers stalled");
        for (from, d) in up.drain(..) {
            server.handle_datagram(now, from, &d);
        }
        for (to, d) in down.drain(..) {
            clients[to].handle_datagram(now, &d);
        }
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        while let Some(to) = server.poll_transmit(now, &mut buf) {
            let i = addrs.iter().position(|a| *a == to).expect("known client");
            if let Ok(Packet {
                body: Body::Data { .. },
                ..
            }) = Packet::decode(&buf)
            {
                order.push(i);
            }
            down.push((i, buf.clone()));
        }
        for (i, c) in clients.iter_mut().enumerate() {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
            while let Some(chunk) = c.read(now, 1 << 20) {
                delivered[i].extend_from_slice(&chunk);
            }
            while let Some(d) = c.poll_transmit(now) {
                up.push((addrs[i], d));
            }
        }
        now += Duration::from_millis(1);
    }
    for d in &delivered {
        assert!(*d == data, "a client's bytes differ");
    }
    // Batches: a busy session's datagrams leave back to back. One by one
    // (the old round-robin) made every run one datagram long.
    let runs = 1 + order.windows(2).filter(|w| w[0] != w[1]).count();
    let mean_run = order.len() as f64 / runs as f64;
    assert!(mean_run >= 4.0, "mean run {mean_run:.1} datagrams");
    // Turns: no run is longer than a batch.
    let mut run = 0;
    for (k, &i) in order.iter().enumerate() {
        run = if k > 0 && order[k - 1] == i {
            run + 1
        } else {
            1
        };
        assert!(run <= SESSION_BATCH, "one session sent {run} in a row");
    }
    // Fairness: over the first half of the transfer (all sessions busy),
    // every session got a fair share.
    let half = &order[..order.len() / 2];
    for i in 0..CLIENTS {
        let share = half.iter().filter(|&&j| j == i).count() as f64 / half.len() as f64;
        assert!(
            (0.15..0.35).contains(&share),
            "session {i} got {:.0} % of the datagrams",
            share * 100.0
        );
    }
}

/// A seek whose Open is lost is asked again after the path's probe
/// timeout, not after the fixed 250 ms used before any RTT sample: at
/// 80 ms RTT and 10 % loss one seek in ten lost its Open.
#[test]
fn a_lost_open_is_repeated_after_the_paths_timeout() {
    let data = file(4_000_000, 61);
    let mut sim = Sim::new(61, data.clone(), 1 << 20, clean(40), clean(40));
    sim.client.open_file(sim.now, "movie.mp4", 0);
    sim.play_for(Duration::from_secs(3));
    let asked = sim.seek(3_000_000);
    // The Open (and whatever left with it) is lost on the way.
    let mut lost_open = false;
    while let Some(d) = sim.client.poll_transmit(sim.now) {
        lost_open |= matches!(Packet::decode(&d).map(|p| p.body), Ok(Body::Open(_)));
    }
    assert!(lost_open, "the seek sent an Open");
    sim.run_until(Consumer::Greedy, Duration::from_secs(5), |s| {
        !s.delivered.is_empty()
    });
    let took = sim.now - asked;
    assert!(sim.delivered[..] == data[3_000_000..3_000_000 + sim.delivered.len()]);
    // The path's timeout (175 ms here, three pings after the start) and
    // a round trip; with the fixed interval it was 250 ms and a round trip.
    assert!(took < Duration::from_millis(300), "took {took:?}");
}

/// A 4 MB file streaming on a clean 80 ms path, its first 100 KB in.
fn streaming_on_a_clean_path(seed: u64) -> (Sim, Vec<u8>) {
    let data = file(4_000_000, seed);
    let mut sim = Sim::new(seed, data.clone(), 1 << 20, clean(40), clean(40));
    sim.client.open_file(sim.now, "movie.mp4", 0);
    sim.run_until(Consumer::Greedy, Duration::from_secs(5), |s| {
        s.delivered.len() >= 100_000
    });
    (sim, data)
}

/// The Open of a seek leaves twice, so losing one copy costs nothing.
#[test]
fn a_seek_survives_the_loss_of_one_copy_of_its_open() {
    let (mut sim, data) = streaming_on_a_clean_path(62);
    let asked = sim.seek(3_000_000);
    let mut opens = Vec::new();
    while let Some(d) = sim.client.poll_transmit(sim.now) {
        if matches!(Packet::decode(&d).map(|p| p.body), Ok(Body::Open(_))) {
            opens.push(d);
        } else {
            sim.up.send(sim.now, d);
        }
    }
    assert_eq!(opens.len(), 2, "the Open leaves twice");
    // The first copy is lost, the second arrives.
    sim.up.send(sim.now, opens.remove(1));
    sim.run_until(Consumer::Greedy, Duration::from_secs(5), |s| {
        !s.delivered.is_empty()
    });
    assert!(sim.delivered[..] == data[3_000_000..3_000_000 + sim.delivered.len()]);
    let took = sim.now - asked;
    assert!(took < Duration::from_millis(120), "took {took:?}");
}

/// The answer to a seek's Open is lost (both of them: the Open leaves
/// twice and the server answers each). The element waits for the answer
/// before it reads, so the seek waited for the Open's retry timer with its
/// bytes already there: now the first of them asks again.
#[test]
fn a_seek_whose_answer_is_lost_asks_again_when_its_data_comes() {
    let (mut sim, data) = streaming_on_a_clean_path(63);
    let asked = sim.seek(3_000_000);
    sim.events.clear();
    sim.lose_open_answers = 2;
    sim.run_until(Consumer::Greedy, Duration::from_secs(5), |s| {
        s.events.iter().any(|e| {
            matches!(
                e,
                ClientEvent::Opened {
                    offset: 3_000_000,
                    ..
                }
            )
        })
    });
    let took = sim.now - asked;
    assert_eq!(sim.lose_open_answers, 0);
    // Open, data, the Open again and its answer: two round trips.
    assert!(took < Duration::from_millis(180), "took {took:?}");
    assert!(sim.delivered[..] == data[3_000_000..3_000_000 + sim.delivered.len()]);
}

/// Time from a seek (after 3 s of playback, 20 Mbit/s, 80 ms RTT, `loss`
/// both ways) until 150 KB (a keyframe and more) arrived in order.
fn seek_time(seed: u64, loss: f64) -> Duration {
    let data = file(8_000_000, seed);
    let mut down = bottleneck(20, 40, 256);
    down.loss = loss;
    let mut sim = Sim::new(seed, data.clone(), 1 << 20, lossy(loss, 0.0, 40, 0), down);
    sim.client.open_file(sim.now, "movie.mp4", 0);
    sim.play_for(Duration::from_secs(3));
    let asked = sim.seek(5_000_000);
    sim.run_until(Consumer::Greedy, Duration::from_secs(10), |s| {
        s.delivered.len() >= 150_000
    });
    assert!(sim.delivered[..] == data[5_000_000..5_000_000 + sim.delivered.len()]);
    sim.now - asked
}

/// Seeks at 10 % loss: resends at the start of a transfer leave twice, so
/// a hole costs one round trip, not one per loss of its resend. Over these
/// twelve seeds the mean was 1.79x the clean time before, 1.52x with it.
/// With a third copy in the first 256 KB no seed takes a second round trip
/// for a hole: the slowest went from 1.94x (seed 4) to 1.68x. The slowest
/// of a dozen is chance as much as design: over seeds 1-60 it was 2.45x
/// (mean 1.61x) before ACKs were decimated after a transfer's first 100
/// packets, and 1.98x (mean 1.60x) after, when seed 2 of these took 1.98x.
#[test]
fn seeks_at_ten_percent_loss_stay_near_the_clean_time() {
    let clean = seek_time(1, 0.0);
    let lossy: Vec<Duration> = (1..13u64).map(|s| seek_time(s, 0.1)).collect();
    let mean = lossy.iter().sum::<Duration>() / lossy.len() as u32;
    let ratio = mean.as_secs_f64() / clean.as_secs_f64();
    assert!(
        ratio < 1.7,
        "clean {clean:?}, at 10 % loss {lossy:?}: {ratio:.2}x"
    );
    let slowest = lossy.iter().max().copied().unwrap_or_default();
    assert!(
        slowest.as_secs_f64() < clean.as_secs_f64() * 2.1,
        "clean {clean:?}, at 10 % loss {lossy:?}: the slowest {slowest:?}"
    );
}

/// `clients` transfers of `size` bytes at once through one bottleneck of
/// `rate_bps` whose drop-tail queue of `queue_bytes` holds less than their
/// windows' floor (200 pulls through one 200 Mbit/s proxy, scaled down).
/// With a client on each of many `hosts` (a bottleneck near the server)
/// the queue is full all the time and drops much of what reaches it; the
/// sessions of clients on one host share one rate (see
/// [`super::shared_bottleneck`]). The server's sessions woken by one timer
/// tick leave in one burst, of which the queue takes the head. Checks
/// every copy and returns each transfer's longest silence (time without
/// new bytes in order), the share of the server's datagrams the queue
/// dropped, the mean number of datagrams the server sent to one client in
/// a row (what one GSO send carries), and how long the transfers took.
fn through_a_full_bottleneck(
    hosts: Hosts,
    clients: usize,
    size: usize,
    rate_bps: u64,
    queue_bytes: usize,
    private_loss: PrivateLoss,
) -> BottleneckRun {
    const CLIENTS_LIMIT: Duration = Duration::from_secs(120);
    let start = Instant::now();
    let mut now = start;
    let data = file(size, 17);
    let (mut server, addrs, mut conns) =
        server_and_clients(now, &data, [9; 32], clients, hosts, 1 << 20, 300);
    let mut bottleneck = Impairment::new(
        ImpairmentConfig {
            delay: Duration::from_millis(5),
            rate_bps: Some(rate_bps),
            queue_bytes,
            ..Default::default()
        },
        17,
    );
    let mut last_hop = StdRng::seed_from_u64(23);
    let mut finished = vec![None; clients];
    let mut delivered = vec![Vec::new(); clients];
    let mut last_progress = vec![start; clients];
    let mut longest_silence = vec![Duration::ZERO; clients];
    let mut up: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    // (arrival, sequence, client, datagram), earliest first.
    type InFlight = Reverse<(Instant, u64, usize, Vec<u8>)>;
    let mut down: BinaryHeap<InFlight> = BinaryHeap::new();
    let mut seq = 0;
    let mut buf = Vec::new();
    let (mut sent, mut runs) = (0u64, 0u64);
    while delivered.iter().any(|d| d.len() < size) {
        assert!(
            now - start < CLIENTS_LIMIT,
            "transfers stalled: {:?} bytes",
            delivered.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (from, d) in up.drain(..) {
            server.handle_datagram(now, from, &d);
        }
        while let Some(Reverse((at, _, to, d))) = down.peek().cloned() {
            if at > now {
                break;
            }
            down.pop();
            conns[to].handle_datagram(now, &d);
        }
        // The driver's timer ticks in milliseconds: whatever is due leaves
        // together, in the order the server picks.
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        let mut previous = None;
        while let Some(to) = server.poll_transmit(now, &mut buf) {
            let i = addrs.iter().position(|a| *a == to).expect("known client");
            sent += 1;
            if previous.replace(i) != Some(i) {
                runs += 1;
            }
            for at in bottleneck.process(now, buf.len()) {
                if i < private_loss.clients && last_hop.gen_bool(private_loss.share) {
                    continue;
                }
                seq += 1;
                down.push(Reverse((at, seq, i, buf.clone())));
            }
        }
        for (i, c) in conns.iter_mut().enumerate() {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
            let before = delivered[i].len();
            while let Some(chunk) = c.read(now, 1 << 20) {
                delivered[i].extend_from_slice(&chunk);
            }
            if delivered[i].len() > before || delivered[i].len() == size {
                last_progress[i] = now;
            }
            if delivered[i].len() == size {
                finished[i].get_or_insert(now - start);
            }
            longest_silence[i] = longest_silence[i].max(now - last_progress[i]);
            while let Some(d) = c.poll_transmit(now) {
                up.push((addrs[i], d));
            }
        }
        now += Duration::from_millis(1);
    }
    for d in &delivered {
        assert!(*d == data, "a client's bytes differ");
    }
    let stats = bottleneck.stats();
    BottleneckRun {
        longest_silence,
        dropped: stats.dropped_queue as f64 / stats.packets as f64,
        mean_run: sent as f64 / runs.max(1) as f64,
        took: now - start,
        finished: finished
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect(),
    }
}

/// What [`through_a_full_bottleneck`] saw.
struct BottleneckRun {
    longest_silence: Vec<Duration>,
    dropped: f64,
    mean_run: f64,
    /// Until the last transfer completed.
    took: Duration,
    /// Until each transfer completed.
    finished: Vec<Duration>,
}

/// Random loss on the last hop of the first `clients` clients (a phone's
/// Wi-Fi), after the shared bottleneck.
#[derive(Debug, Clone, Copy)]
struct PrivateLoss {
    clients: usize,
    share: f64,
}

/// No loss but the bottleneck's.
const NO_PRIVATE_LOSS: PrivateLoss = PrivateLoss {
    clients: 0,
    share: 0.0,
};

/// Time for `clients` transfers of `size` bytes through `rate_bps` if the
/// link carried nothing but their datagrams, full.
fn ideal_time(clients: usize, size: usize, rate_bps: u64) -> Duration {
    let datagrams = (clients * size).div_ceil(super::wire::DEFAULT_MAX_PAYLOAD);
    let wire = datagrams * (super::wire::DEFAULT_MAX_PAYLOAD + super::wire::DATA_OVERHEAD);
    Duration::from_secs_f64(wire as f64 * 8.0 / rate_bps as f64)
}

/// 40 transfers, from 40 hosts, through 8 Mbit/s and a 40 KB queue (28
/// datagrams, against 160 at the floor of four each): every transfer must
/// finish, and none may go silent for long. A probe that finally got
/// through measured the whole silence (a transfer stalled for good), and a
/// probe queued behind the paced sessions was dropped tick after tick (15
/// s).
#[test]
fn transfers_sharing_a_full_bottleneck_all_finish_and_none_goes_silent() {
    assert_all_heard_through_a_full_bottleneck(
        Hosts::Each,
        40,
        150_000,
        8_000_000,
        40_000,
        0.2,
        Duration::from_secs(8),
    );
}

/// Harsher: 64 transfers, from 64 hosts, through 10 Mbit/s and a 32 KB
/// queue, a fair share of less than a datagram per round trip. Probe
/// timeouts back off to seconds, and without the probe a waiting client's
/// ping earns, one transfer heard nothing for 33 s; the element gives up
/// after 10 s.
#[test]
fn a_waiting_clients_ping_earns_a_probe_at_a_bottleneck_shared_by_too_many() {
    assert_all_heard_through_a_full_bottleneck(
        Hosts::Each,
        64,
        150_000,
        10_000_000,
        32_000,
        0.4,
        Duration::from_secs(10),
    );
}

/// `n` transfers of `size` bytes from `hosts` through `rate` bits/s and a
/// `queue`-byte queue: the queue must drop more than `min_dropped` of what
/// is sent (it is the limit), and no transfer may hear nothing new for
/// `max_silence`.
fn assert_all_heard_through_a_full_bottleneck(
    hosts: Hosts,
    n: usize,
    size: usize,
    rate: u64,
    queue: usize,
    min_dropped: f64,
    max_silence: Duration,
) {
    let BottleneckRun {
        longest_silence: silences,
        dropped,
        ..
    } = through_a_full_bottleneck(hosts, n, size, rate, queue, NO_PRIVATE_LOSS);
    assert!(
        dropped > min_dropped,
        "the queue was not the limit ({dropped:.2} dropped)"
    );
    assert_none_silent_for(&silences, max_silence);
}

/// No transfer of `silences` (each one's longest) heard nothing new for
/// `max_silence`.
fn assert_none_silent_for(silences: &[Duration], max_silence: Duration) {
    let worst = silences.iter().max().copied().unwrap_or_default();
    assert!(
        worst < max_silence,
        "a transfer heard nothing new for {worst:?}"
    );
}

/// 200 transfers of 2 MB, from 200 hosts, through one 200 Mbit/s link
/// and a 512 KB queue: no transfer may go silent for long. The clients,
/// started together, ping together once a second; the probes the pings
/// earned joined the back of the server's queue of sessions, behind the
/// paced ones, and the bottleneck dropped that tail tick after tick: 50-60
/// sessions had no RTT sample after 15 s, one heard nothing new for 14.8 s
/// (34.8 s with 4 MB files), past the element's 10 s timeout. Those probes
/// now go first (as a probe timeout's do): 3.0 s.
#[test]
fn two_hundred_transfers_through_one_queue_all_keep_hearing() {
    assert_all_heard_through_a_full_bottleneck(
        Hosts::Each,
        200,
        2_000_000,
        200_000_000,
        512_000,
        0.2,
        Duration::from_secs(6),
    );
}

/// The sessions of one host share its bottleneck's rate. 200 transfers of
/// 2 MB from one host (`load paced 200 200 4`, and the load generator's
/// sessions are all on one address) through 200 Mbit/s and a 512 KB queue:
/// each session's controller alone offered 1.7-2x the link together, and
/// the queue dropped 41 % of what the server sent; sharing one rate, 8 %,
/// and the transfers end in 17.3 s instead of 20.3, where a full link
/// would take 16.4. No transfer goes silent for long (3.0 s before, 2.2 s).
#[test]
fn two_hundred_transfers_from_one_host_share_its_link_without_overfilling_it() {
    let run = through_a_full_bottleneck(
        Hosts::One,
        200,
        2_000_000,
        200_000_000,
        512_000,
        NO_PRIVATE_LOSS,
    );
    assert_shares_the_link(&run, ideal_time(200, 2_000_000, 200_000_000), 0.15, 1.1);
    assert_none_silent_for(&run.longest_silence, Duration::from_secs(4));
}

/// Sixteen `gst-launch-1.0` pulls from one machine through its 20 Mbit/s
/// link (the proxy's 64 KB queue): the queue dropped 51.5 % of the
/// server's datagrams (35-40 % through the real proxy) and the pulls took
/// 16.1 s; sharing one rate, 4.1 % and 13.6 s, where a full link would
/// take 13.1.
#[test]
fn sixteen_pulls_from_one_host_share_its_link_without_overfilling_it() {
    let run = through_a_full_bottleneck(
        Hosts::One,
        16,
        2_000_000,
        20_000_000,
        64_000,
        NO_PRIVATE_LOSS,
    );
    assert_shares_the_link(&run, ideal_time(16, 2_000_000, 20_000_000), 0.1, 1.1);
}

/// 64 short transfers from one host through 10 Mbit/s and a 32 KB queue,
/// a share of under a datagram per round trip each: 59.6 % dropped, a
/// transfer silent for 7.8 s and 9.4 s in all before; 20.3 %, 2.8 s and
/// 8.6 s sharing one rate (a full link: 7.9 s).
#[test]
fn many_short_transfers_from_one_host_share_a_narrow_link() {
    let run =
        through_a_full_bottleneck(Hosts::One, 64, 150_000, 10_000_000, 32_000, NO_PRIVATE_LOSS);
    assert_shares_the_link(&run, ideal_time(64, 150_000, 10_000_000), 0.25, 1.2);
    assert_none_silent_for(&run.longest_silence, Duration::from_secs(8));
}

/// The queue dropped at most `max_dropped` of the server's datagrams, and
/// the transfers took at most `slack` times `ideal`.
fn assert_shares_the_link(run: &BottleneckRun, ideal: Duration, max_dropped: f64, slack: f64) {
    assert!(
        run.dropped < max_dropped,
        "{:.3} of the datagrams dropped at the queue",
        run.dropped
    );
    assert!(
        run.took.as_secs_f64() < ideal.as_secs_f64() * slack,
        "took {:?}, a full link {ideal:?}",
        run.took
    );
}

/// 64 transfers of 1 MB, from 64 hosts, through one 64 Mbit/s link and a
/// 160 KB queue, the shape of `load paced 200 200 4` scaled down: the
/// sessions' bursts that share a timer tick leave back to back. With the
/// pacer's floor of 8 datagrams each the queue dropped 46.6 % of what came
/// in; with the floors sharing [`super::server::AGGREGATE_BURST_PACKETS`]
/// out, 39.7 % (the window's floor of four datagrams each is more than
/// this queue holds, so loss stays high; in the load, 56 % fell to 22 %).
/// Since the probes that clients' pings earn go first, the sessions that
/// used to wait out the run silent send too, and the queue drops more:
/// 45.4 % shared, 52.2 % with the floor of 8.
#[test]
fn many_sessions_sharing_one_queue_share_out_their_bursts() {
    let run = through_a_full_bottleneck(
        Hosts::Each,
        64,
        1_000_000,
        64_000_000,
        160_000,
        NO_PRIVATE_LOSS,
    );
    assert!(
        run.dropped < 0.48,
        "{:.3} of the datagrams dropped",
        run.dropped
    );
}

/// The same 64 sessions, from one host, with a queue deep enough to lose
/// nothing (the shape of 500 viewers arriving within a second, where the
/// server's core was the bottleneck): a session that loses nothing keeps
/// the pacer's floor of 8 datagrams a burst (sends average 5.9 datagrams
/// here, some held to a third of a small window). Shared out among all
/// busy sessions the floors were 2.5, sends 3.1 datagrams, and in the
/// load sends of 3-4 datagrams doubled the server's cost per GB.
#[test]
fn sessions_that_lose_nothing_keep_whole_bursts() {
    let run = through_a_full_bottleneck(
        Hosts::One,
        64,
        600_000,
        64_000_000,
        64_000_000,
        NO_PRIVATE_LOSS,
    );
    assert!(
        run.dropped == 0.0,
        "{:.3} of the datagrams dropped",
        run.dropped
    );
    assert!(
        run.mean_run >= 5.0,
        "{:.1} datagrams per send to one session",
        run.mean_run
    );
}

/// Random loss is not a full queue: sixteen transfers from one host over
/// a 20 Mbit/s link that drops 10 % of the datagrams at random (its
/// queue deep enough to drop nothing more) take no longer than the same
/// transfers from sixteen hosts, whose sessions are each left to their
/// own controller (7.16 s against 7.12; at 2 and 5 % loss, 6.70 against
/// 6.75 and 6.93 against 6.99).
#[test]
fn random_loss_does_not_hold_back_one_hosts_sessions() {
    let lossy = PrivateLoss {
        clients: 16,
        share: 0.1,
    };
    let run = |hosts| through_a_full_bottleneck(hosts, 16, 1_000_000, 20_000_000, 256_000, lossy);
    let (one, each) = (run(Hosts::One), run(Hosts::Each));
    assert!(
        one.took.as_secs_f64() < each.took.as_secs_f64() * 1.05,
        "one host {:?}, a host each {:?}",
        one.took,
        each.took
    );
}

/// One session's bad last hop is not its host's congestion: a phone on
/// Wi-Fi that drops 30 % and a clean pull, behind one NAT and one 20
/// Mbit/s link, each finish when they would from hosts of their own (5.45
/// and 2.13 s). Judged on the group's loss alone, the clean pull was held
/// to 0.7x its rate and the phone's to a sixth (2.99 and 33.2 s).
#[test]
fn one_sessions_bad_last_hop_does_not_hold_back_its_host() {
    let lossy = PrivateLoss {
        clients: 1,
        share: 0.3,
    };
    let run = |hosts| through_a_full_bottleneck(hosts, 2, 4_000_000, 20_000_000, 256_000, lossy);
    let (one, each) = (run(Hosts::One), run(Hosts::Each));
    for (a, b) in one.finished.iter().zip(&each.finished) {
        assert!(
            a.as_secs_f64() < b.as_secs_f64() * 1.05,
            "one host {:?}, a host each {:?}",
            one.finished,
            each.finished
        );
    }
}

/// Heavy random loss on several sessions of one host (two phones on Wi-Fi
/// that drops 30 %, alone and beside a clean pull) is no full queue: the
/// group cuts once on heavy loss alone, and not again while the loss stays
/// (a cut that drains a queue brings it down). The transfers end when
/// they would from hosts of their own (5.73 against 5.80 s, 7.27 against
/// 7.22); cut at each heavy interval, the two phones stalled.
#[test]
fn heavy_random_loss_on_several_sessions_of_one_host_is_no_full_queue() {
    let lossy = PrivateLoss {
        clients: 2,
        share: 0.3,
    };
    for clients in [2, 3] {
        let run = |hosts| {
            through_a_full_bottleneck(hosts, clients, 4_000_000, 20_000_000, 256_000, lossy)
        };
        let (one, each) = (run(Hosts::One), run(Hosts::Each));
        assert!(
            one.took.as_secs_f64() < each.took.as_secs_f64() * 1.05,
            "{clients} transfers: one host {:?}, a host each {:?}",
            one.finished,
            each.finished
        );
    }
}

/// How the earlier players of [`a_new_player_after`] ended.
#[derive(Clone, Copy, PartialEq, Debug)]
enum PlayersEnd {
    /// Closed their sessions (the server heard a Close).
    Closed,
    /// Killed (SIGTERM, a crash): the server hears nothing more, and its
    /// datagrams to them go nowhere.
    Killed,
}

/// `old` players pull from one host through its 20 Mbit/s link (the
/// proxy's 64 KB queue, 20 ms each way) for `play` and end as `end` says; a
/// new one from the same host opens then. The server has two serving
/// threads (endpoints sharing admission and address groups): the old
/// players are on the first, the new one on the first too or, with
/// `other_thread`, on the second. Returns how long the new player took to
/// read its first megabyte (a player's first buffering).
fn a_new_player_after(end: PlayersEnd, old: usize, other_thread: bool, play: Duration) -> Duration {
    const FIRST: usize = 1 << 20;
    const LIMIT: Duration = Duration::from_secs(30);
    let start = Instant::now();
    let mut now = start;
    let data = file(8_000_000, 29);
    let max = super::server::DEFAULT_MAX_SESSIONS;
    let mut servers: Vec<ServerEndpoint<MemoryStore>> =
        super::admission::Shard::of_server(2, max, max)
            .into_iter()
            .enumerate()
            .map(|(index, shard)| {
                let store = MemoryStore {
                    files: vec![("movie.mp4".into(), data.clone())],
                };
                ServerEndpoint::new_shard(
                    Default::default(),
                    store,
                    [5 + index as u8; 32],
                    now,
                    shard,
                )
            })
            .collect();
    let client = |i: usize, now: Instant| {
        let mut c = ClientConnection::new(
            ClientConfig {
                read_ahead: ReadAhead::Fixed(1 << 20),
                ..Default::default()
            },
            500 + i as u64,
            now,
        );
        c.open_file(now, "movie.mp4", 0);
        c
    };
    let addr = |i: usize| SocketAddr::from(([10, 0, 0, 2], 4000 + i as u16));
    let mut conns: Vec<ClientConnection> = (0..old).map(|i| client(i, now)).collect();
    let mut addrs: Vec<SocketAddr> = (0..old).map(addr).collect();
    let mut shard_of = vec![0; old];
    let mut bottleneck = Impairment::new(
        ImpairmentConfig {
            delay: Duration::from_millis(20),
            rate_bps: Some(20_000_000),
            queue_bytes: 64_000,
            ..Default::default()
        },
        29,
    );
    // (arrival, sequence, client, datagram), earliest first; the uplink
    // is a fixed 20 ms.
    type InFlight = Reverse<(Instant, u64, usize, Vec<u8>)>;
    let mut down: BinaryHeap<InFlight> = BinaryHeap::new();
    let mut up: BinaryHeap<InFlight> = BinaryHeap::new();
    let mut seq = 0;
    let mut buf = Vec::new();
    let mut alive = vec![true; old];
    let ends_at = start + play;
    let mut new_player = None;
    let mut read = 0;
    loop {
        assert!(
            now - start < LIMIT,
            "the new player read {read} bytes in {LIMIT:?}"
        );
        if now >= ends_at && new_player.is_none() {
            for (i, c) in conns.iter_mut().enumerate() {
                assert!(c.read_offset().unwrap_or(0) > 0, "player {i} never read");
                match end {
                    PlayersEnd::Closed => c.close(),
                    PlayersEnd::Killed => alive[i] = false,
                }
            }
            conns.push(client(old, now));
            addrs.push(addr(old));
            shard_of.push(usize::from(other_thread));
            alive.push(true);
            new_player = Some(now);
        }
        while let Some(Reverse((at, _, from, d))) = up.peek().cloned() {
            if at > now {
                break;
            }
            up.pop();
            servers[shard_of[from]].handle_datagram(now, addrs[from], &d);
        }
        while let Some(Reverse((at, _, to, d))) = down.peek().cloned() {
            if at > now {
                break;
            }
            down.pop();
            if alive[to] {
                conns[to].handle_datagram(now, &d);
            }
        }
        for server in &mut servers {
            if server.poll_timeout().is_some_and(|t| t <= now) {
                server.handle_timeout(now);
            }
            while let Some(to) = server.poll_transmit(now, &mut buf) {
                let i = addrs.iter().position(|a| *a == to).expect("known client");
                for at in bottleneck.process(now, buf.len()) {
                    seq += 1;
                    down.push(Reverse((at, seq, i, buf.clone())));
                }
            }
        }
        for (i, c) in conns.iter_mut().enumerate() {
            if !alive[i] {
                continue;
            }
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
            while let Some(chunk) = c.read(now, 1 << 20) {
                if i == old {
                    read += chunk.len();
                }
            }
            while let Some(d) = c.poll_transmit(now) {
                seq += 1;
                up.push(Reverse((now + Duration::from_millis(20), seq, i, d)));
            }
        }
        if let Some(opened) = new_player.filter(|_| read >= FIRST) {
            return now - opened;
        }
        now += Duration::from_millis(1);
    }
}

/// A player killed without closing leaves a session that probes a dead
/// address with its window in flight. Counted in its host's address
/// group it held back the next player from the same host (by hand, four
/// `playbin` starts after four kills did not reach 100 % within 4 s).
/// The next player's first megabyte comes about as soon as after
/// players that closed: 0.75 s against 0.80 (1.55 s while a session
/// stayed in its group until unheard from for 1 s).
#[test]
fn players_killed_without_closing_do_not_hold_back_the_next_from_their_host() {
    let closed = a_new_player_after(PlayersEnd::Closed, 4, false, Duration::from_millis(1500));
    let killed = a_new_player_after(PlayersEnd::Killed, 4, false, Duration::from_millis(1500));
    eprintln!("first megabyte after closed players {closed:?}, after killed {killed:?}");
    assert!(
        killed.as_secs_f64() < closed.as_secs_f64() * 1.5 + 0.2,
        "after killed players {killed:?}, after closed ones {closed:?}"
    );
}

/// A player's session closed on one serving thread, and the next player
/// from its host is served by the other. The threads share address
/// groups, and the closed session's thread, left without sessions and so
/// without timers, kept counting it there as it last saw it, busy and
/// losing: with the new player's own startup losses the group judged its
/// queue overflowed and held the new player to half the cap for its whole
/// run (by hand, `playbin` starts through 20 Mbit/s and 80 ms reached
/// 100 % after 0.87-1.15 s in five of eight, against 0.67-0.71). Here
/// the old player closes in its startup's overshoot: the new one's first
/// megabyte took 1.03 s on the other thread, 0.77 on the same.
#[test]
fn a_session_closed_on_one_thread_does_not_hold_back_the_next_on_another() {
    let overshoot = Duration::from_millis(600);
    let same = a_new_player_after(PlayersEnd::Closed, 1, false, overshoot);
    let other = a_new_player_after(PlayersEnd::Closed, 1, true, overshoot);
    eprintln!("first megabyte on the same thread {same:?}, on the other {other:?}");
    assert!(
        other.as_secs_f64() < same.as_secs_f64() * 1.2 + 0.05,
        "on the other thread {other:?}, on the same {same:?}"
    );
}
