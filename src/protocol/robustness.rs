//! Hostile input against the state machines: arbitrary and mutated
//! datagram sequences never panic, never make the server amplify towards
//! an unvalidated address, and limits refuse newcomers without disturbing
//! established sessions. (The fuzz targets in `fuzz/` drive the same entry
//! points with coverage guidance; these run in `make test`.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::client::{ClientConfig, ClientConnection, ClientEvent};
use super::server::{AMPLIFICATION_FACTOR, MemoryStore, ServerConfig, ServerEndpoint};
use super::wire::{Body, CloseReason, OpenRequest, Packet, TransferKind, VERSION};

/// One 100 kB file, `a.mp4`.
fn one_file() -> MemoryStore {
    MemoryStore {
        files: vec![("a.mp4".into(), (0..100_000u32).map(|i| i as u8).collect())],
    }
}

fn server(now: Instant) -> ServerEndpoint<MemoryStore> {
    ServerEndpoint::new(ServerConfig::default(), one_file(), [3; 32], now)
}

/// A cookie-less Hello asking for a.mp4 from the start.
fn hello_opening(client_nonce: u64, window: u64) -> Packet {
    Packet::new(
        0,
        0,
        Body::Hello {
            client_nonce,
            cookie: vec![],
            wants_auth: false,
            early_open: Some(OpenRequest {
                transfer_id: 1,
                kind: TransferKind::File,
                offset: 0,
                window,
                path: "a.mp4".into(),
            }),
            max_datagram: None,
        },
    )
}

/// Valid client packets to mutate from.
fn seeds() -> Vec<Vec<u8>> {
    vec![
        Packet::new(
            0,
            0,
            Body::Hello {
                client_nonce: 1,
                cookie: vec![],
                wants_auth: false,
                early_open: None,
                max_datagram: None,
            },
        )
        .encode(),
        hello_opening(2, 1 << 20).encode(),
        Packet::new(
            5,
            1,
            Body::Open(OpenRequest {
                transfer_id: 1,
                kind: TransferKind::File,
                offset: 0,
                window: 1 << 20,
                path: "a.mp4".into(),
            }),
        )
        .encode(),
        Packet::new(
            5,
            2,
            Body::Ack {
                transfer_id: 1,
                window: 1 << 20,
                received_up_to: 5000,
                ack_delay_micros: 10,
                ranges: vec![],
            },
        )
        .encode(),
        Packet::new(5, 3, Body::Ping).encode(),
    ]
}

#[derive(Debug, Clone)]
enum Input {
    Datagram {
        from: u8,
        bytes: Vec<u8>,
    },
    Mutated {
        from: u8,
        seed: usize,
        flips: Vec<(usize, u8)>,
    },
    Advance(u16),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        (0u8..4, proptest::collection::vec(any::<u8>(), 0..1300))
            .prop_map(|(from, bytes)| Input::Datagram { from, bytes }),
        (
            0u8..4,
            0usize..4,
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6)
        )
            .prop_map(|(from, seed, flips)| Input::Mutated { from, seed, flips }),
        any::<u16>().prop_map(Input::Advance),
    ]
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i], 4000 + i as u16))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn server_survives_arbitrary_datagrams_and_never_amplifies(inputs in proptest::collection::vec(input(), 1..60)) {
        let mut now = Instant::now();
        let mut s = server(now);
        let seeds = seeds();
        let mut received: HashMap<SocketAddr, usize> = HashMap::new();
        // Bytes sent to each address while it was not validated.
        let mut unvalidated_sent: HashMap<SocketAddr, usize> = HashMap::new();
        let mut out = Vec::new();
        for i in inputs {
            match i {
                Input::Datagram { from, bytes } => {
                    *received.entry(addr(from)).or_default() += bytes.len();
                    s.handle_datagram(now, addr(from), &bytes);
                }
                Input::Mutated { from, seed, flips } => {
                    let mut bytes = seeds[seed].clone();
                    for (pos, v) in flips {
                        let n = bytes.len();
                        bytes[pos % n] ^= v;
                    }
                    *received.entry(addr(from)).or_default() += bytes.len();
                    s.handle_datagram(now, addr(from), &bytes);
                }
                Input::Advance(ms) => {
                    now += Duration::from_millis(ms as u64);
                    s.handle_timeout(now);
                }
            }
            while s.poll_event().is_some() {}
            let mut guard = 0;
            while let Some(to) = s.poll_transmit(now, &mut out) {
                if !s.address_validated(to) {
                    *unvalidated_sent.entry(to).or_default() += out.len();
                }
                guard += 1;
                prop_assert!(guard < 10_000, "endless transmit");
            }
        }
        for (a, bytes) in unvalidated_sent {
            let got = received.get(&a).copied().unwrap_or(0);
            prop_assert!(bytes <= got * AMPLIFICATION_FACTOR, "{bytes} bytes to unvalidated {a} after receiving {got}");
        }
    }

    #[test]
    fn client_survives_arbitrary_datagrams(inputs in proptest::collection::vec(input(), 1..60)) {
        let mut now = Instant::now();
        let mut c = ClientConnection::new(ClientConfig::default(), 1, now);
        c.open_file(now, "a.mp4", 0);
        for i in inputs {
            match i {
                Input::Datagram { bytes, .. } => c.handle_datagram(now, &bytes),
                Input::Mutated { seed, flips, .. } => {
                    // Mutate server-to-client packets with the right nonce.
                    let mut bytes = match seed {
                        0 => Packet::new(0, 0, Body::Retry { client_nonce: 1, cookie: vec![1; 20] }).encode(),
                        1 => Packet::new(7, 1, Body::Welcome { client_nonce: 1, idle_timeout_ms: 1000, max_payload: 1420, server_random: [0; 16], auth_tag: None, early_open_accepted: false }).encode(),
                        2 => Packet::new(7, 2, Body::OpenOk { transfer_id: 1, size: 10_000, content_tag: 1, offset: 0, index: None }).encode(),
                        _ => Packet::new(7, 3, Body::Data { transfer_id: 1, offset: 0, payload: vec![1; 1000] }).encode(),
                    };
                    for (pos, v) in flips {
                        let n = bytes.len();
                        bytes[pos % n] ^= v;
                    }
                    c.handle_datagram(now, &bytes);
                }
                Input::Advance(ms) => {
                    now += Duration::from_millis(ms as u64);
                    c.handle_timeout(now);
                }
            }
            while c.poll_transmit(now).is_some() {}
            while c.read(now, 4096).is_some() {}
            while c.poll_event().is_some() {}
        }
    }
}

/// Completes a handshake for `from` and returns the connection id.
fn connect(
    s: &mut ServerEndpoint<MemoryStore>,
    now: Instant,
    from: SocketAddr,
    nonce: u64,
) -> Option<u64> {
    let hello = |cookie: Vec<u8>| {
        Packet::new(
            0,
            0,
            Body::Hello {
                client_nonce: nonce,
                cookie,
                wants_auth: false,
                early_open: None,
                max_datagram: None,
            },
        )
        .encode()
    };
    let mut out = Vec::new();
    let mut cookie = vec![];
    // Without load the first Hello is welcomed; under load it gets a cookie.
    for _ in 0..2 {
        s.handle_datagram(now, from, &hello(cookie.clone()));
        let mut retry = None;
        let mut id = None;
        while s.poll_transmit(now, &mut out).is_some() {
            match Packet::decode(&out) {
                Ok(Packet {
                    connection_id,
                    body: Body::Welcome { .. },
                    ..
                }) => id = Some(connection_id),
                Ok(Packet {
                    body: Body::Retry { cookie: c, .. },
                    ..
                }) => retry = Some(c),
                Ok(Packet {
                    body: Body::Close { reason, .. },
                    ..
                }) => assert_eq!(reason, CloseReason::ServerBusy),
                _ => {}
            }
        }
        if let Some(id) = id {
            // Prove the address, as a real client does with its first ACK.
            s.handle_datagram(now, from, &Packet::new(id, 1, Body::Ping).encode());
            while s.poll_transmit(now, &mut out).is_some() {}
            return Some(id);
        }
        cookie = retry?;
    }
    None
}

#[test]
fn limits_refuse_newcomers_and_spare_established_sessions() {
    let now = Instant::now();
    let config = ServerConfig {
        max_sessions: 6,
        max_sessions_per_address: 4,
        ..ServerConfig::default()
    };
    let mut s = ServerEndpoint::new(config, one_file(), [1; 32], now);
    let a = |port| SocketAddr::from(([198, 51, 100, 1], port));
    let b = |port| SocketAddr::from(([198, 51, 100, 2], port));
    let ids: Vec<Option<u64>> = (0..5)
        .map(|i| connect(&mut s, now, a(1000 + i), i as u64))
        .collect();
    assert!(ids[..4].iter().all(Option::is_some));
    assert_eq!(ids[4], None, "fifth session from one address accepted");
    assert!(connect(&mut s, now, b(1), 100).is_some());
    assert!(connect(&mut s, now, b(2), 101).is_some());
    assert_eq!(
        connect(&mut s, now, b(3), 102),
        None,
        "session over the total limit accepted"
    );
    // The established sessions still work: open a file on the first.
    let id = ids[0].expect("first session");
    let open = Packet::new(
        id,
        1,
        Body::Open(OpenRequest {
            transfer_id: 1,
            kind: TransferKind::File,
            offset: 0,
            window: 1 << 20,
            path: "a.mp4".into(),
        }),
    );
    s.handle_datagram(now, a(1000), &open.encode());
    let mut out = Vec::new();
    let mut data = 0;
    while s.poll_transmit(now, &mut out).is_some() {
        if let Ok(Packet {
            body: Body::Data { .. },
            ..
        }) = Packet::decode(&out)
        {
            data += 1;
        }
    }
    assert!(data > 0, "established session starved");
}

#[test]
fn shards_of_one_server_share_its_limits_and_keep_to_their_own_ids() {
    // One endpoint per core on one port: the kernel spreads clients over
    // them, but `--max-sessions` and the per-address share are the server's.
    let now = Instant::now();
    let config = ServerConfig {
        max_sessions: 5,
        max_sessions_per_address: 3,
        ..ServerConfig::default()
    };
    let mut shards: Vec<ServerEndpoint<MemoryStore>> = super::admission::Shard::of_server(2, 5, 3)
        .into_iter()
        .enumerate()
        .map(|(index, shard)| {
            ServerEndpoint::new_shard(config.clone(), one_file(), [index as u8; 32], now, shard)
        })
        .collect();
    let a = |port| SocketAddr::from(([198, 51, 100, 1], port));
    let b = |port| SocketAddr::from(([198, 51, 100, 2], port));
    let mut ids = Vec::new();
    // One address alternates between the shards: its share is 3 in all.
    for i in 0..4u16 {
        let id = connect(&mut shards[i as usize % 2], now, a(1000 + i), i as u64);
        ids.push((i as usize % 2, id));
    }
    assert!(ids[..3].iter().all(|(_, id)| id.is_some()));
    assert_eq!(
        ids[3].1, None,
        "an address took more than its share across shards"
    );
    for &(shard, id) in &ids[..3] {
        let id = id.expect("session");
        assert_eq!(
            super::admission::shard_of(&Packet::new(id, 1, Body::Ping).encode(), 2),
            Some(shard)
        );
    }
    assert!(connect(&mut shards[1], now, b(1), 50).is_some());
    assert!(connect(&mut shards[0], now, b(2), 51).is_some());
    assert_eq!(
        connect(&mut shards[1], now, b(3), 52),
        None,
        "the server took more than --max-sessions across shards"
    );
    // A session that ends frees its place for any shard.
    let (shard, id) = ids[0];
    let id = id.expect("session");
    shards[shard].handle_datagram(
        now,
        a(1000),
        &Packet::new(
            id,
            2,
            Body::Close {
                reason: CloseReason::Normal,
                message: String::new(),
            },
        )
        .encode(),
    );
    assert_eq!(shards[0].admission().sessions(), 4);
    assert!(connect(&mut shards[1], now, b(3), 53).is_some());
}

#[test]
fn dozens_of_viewers_share_one_address_but_not_the_whole_server() {
    // One NAT, many viewers: the 17th used to be told the server is busy.
    let now = Instant::now();
    let mut s = ServerEndpoint::new(ServerConfig::default(), one_file(), [2; 32], now);
    let nat = |port| SocketAddr::from(([198, 51, 100, 7], port));
    let per_address = super::server::DEFAULT_MAX_SESSIONS_PER_ADDRESS;
    assert!(per_address >= 48, "{per_address}");
    for i in 0..per_address {
        assert!(
            connect(&mut s, now, nat(2000 + i as u16), i as u64).is_some(),
            "viewer {} behind one address refused",
            i + 1
        );
    }
    assert_eq!(
        connect(&mut s, now, nat(9999), 9999),
        None,
        "one address took more than its share"
    );
    // Everyone else still gets in.
    let other = SocketAddr::from(([198, 51, 100, 8], 1));
    assert!(connect(&mut s, now, other, 10_000).is_some());
    assert!(per_address * 4 <= super::server::DEFAULT_MAX_SESSIONS);
}

#[test]
fn an_unvalidated_flood_creates_no_state() {
    let now = Instant::now();
    let mut s = server(now);
    let mut out = Vec::new();
    for i in 0..10_000u32 {
        let from = SocketAddr::from(([203, 0, 113, (i % 250) as u8], (i % 60_000) as u16 + 1));
        let hello = Packet::new(
            0,
            0,
            Body::Hello {
                client_nonce: i as u64,
                cookie: vec![0; 20],
                wants_auth: false,
                early_open: None,
                max_datagram: None,
            },
        );
        s.handle_datagram(now, from, &hello.encode());
        while s.poll_transmit(now, &mut out).is_some() {}
    }
    assert_eq!(s.session_count(), 0);
    // A real client still gets in.
    assert!(connect(&mut s, now, SocketAddr::from(([192, 0, 2, 1], 9)), 5).is_some());
}

#[test]
fn forged_hellos_without_cookies_are_bounded_and_expire() {
    let mut now = Instant::now();
    let mut s = server(now);
    let mut out = Vec::new();
    let mut welcomed = 0;
    let mut retried = 0;
    for i in 0..1000u32 {
        // Forged sources asking for a file in the Hello: they never see the
        // answer, so they never prove their address.
        let from = SocketAddr::from(([203, 0, 113, (i % 250) as u8], (i % 60_000) as u16 + 1));
        let hello = hello_opening(i as u64, 16 << 20).encode();
        s.handle_datagram(now, from, &hello);
        let mut sent = 0;
        while let Some(to) = s.poll_transmit(now, &mut out) {
            assert_eq!(to, from);
            sent += out.len();
            match Packet::decode(&out).map(|p| p.body) {
                Ok(Body::Welcome { .. }) => welcomed += 1,
                Ok(Body::Retry { .. }) => retried += 1,
                _ => {}
            }
        }
        assert!(
            sent <= hello.len() * AMPLIFICATION_FACTOR,
            "{sent} bytes for one Hello"
        );
    }
    // A few were welcomed before the server asked everyone for cookies.
    let limit = (ServerConfig::default().max_sessions / 8).max(4);
    assert_eq!(welcomed, limit);
    assert_eq!(retried, 1000 - limit);
    assert_eq!(s.session_count(), limit);
    // They expire long before the idle timeout; a real client then gets in
    // without a cookie again.
    now += super::server::UNVALIDATED_TIMEOUT + Duration::from_millis(1);
    s.handle_timeout(now);
    assert_eq!(s.session_count(), 0);
    assert!(connect(&mut s, now, SocketAddr::from(([192, 0, 2, 1], 9)), 5).is_some());
}

#[test]
fn an_early_open_streams_after_the_first_ack() {
    let now = Instant::now();
    let mut s = server(now);
    let from = SocketAddr::from(([192, 0, 2, 7], 4000));
    let hello = hello_opening(77, 1 << 20).encode();
    s.handle_datagram(now, from, &hello);
    let mut out = Vec::new();
    let (mut id, mut accepted, mut opened, mut data, mut sent) = (0, false, false, 0, 0);
    while s.poll_transmit(now, &mut out).is_some() {
        sent += out.len();
        let p = Packet::decode(&out).expect("valid");
        match p.body {
            Body::Welcome {
                early_open_accepted,
                ..
            } => {
                id = p.connection_id;
                accepted = early_open_accepted;
            }
            Body::OpenOk { .. } => opened = true,
            Body::Data { .. } => data += 1,
            _ => {}
        }
    }
    assert!(accepted && opened && data > 0);
    assert!(sent <= hello.len() * AMPLIFICATION_FACTOR);
    // Later, with pacing and window to spare, the budget alone holds the
    // rest back.
    let now = now + Duration::from_millis(100);
    s.handle_timeout(now);
    assert!(s.poll_transmit(now, &mut out).is_none());
    // The first ACK proves the address: the transfer goes on.
    let ack = Packet::new(
        id,
        1,
        Body::Ack {
            transfer_id: 1,
            window: 1 << 20,
            received_up_to: 0,
            ack_delay_micros: 0,
            ranges: vec![],
        },
    );
    s.handle_datagram(now, from, &ack.encode());
    let mut more = 0;
    while s.poll_transmit(now, &mut out).is_some() {
        more += 1;
    }
    assert!(more > 0, "nothing sent after the ACK");
}

#[test]
fn a_repeated_hello_is_answered_at_once() {
    let now = Instant::now();
    let mut s = server(now);
    let from = SocketAddr::from(([192, 0, 2, 8], 4000));
    let hello = hello_opening(78, 1 << 20).encode();
    s.handle_datagram(now, from, &hello);
    let mut out = Vec::new();
    // The first flight, Welcome included, is lost on the way.
    while s.poll_transmit(now, &mut out).is_some() {}
    // The client repeats its Hello after its retry interval; no timer of
    // the session is due then.
    let now = now + Duration::from_millis(250);
    assert!(s.poll_timeout().is_none_or(|t| t > now));
    s.handle_datagram(now, from, &hello);
    let mut answer = Vec::new();
    while s.poll_transmit(now, &mut out).is_some() {
        answer.push(Packet::decode(&out).expect("valid").body);
    }
    assert!(
        matches!(answer.first(), Some(Body::Welcome { .. })),
        "the repeated Hello got {answer:?}"
    );
    assert!(
        answer.iter().any(|b| matches!(b, Body::OpenOk { .. })),
        "the early open is answered again too: {answer:?}"
    );
}

/// A client's events through a handshake over a lossless path, `stray`
/// (from the server's side, connection id 0) having reached it before it
/// sent its first Hello.
fn handshake_after_a_stray(stray: Body) -> Vec<ClientEvent> {
    let now = Instant::now();
    let mut s = server(now);
    let from = SocketAddr::from(([192, 0, 2, 9], 4000));
    let mut c = ClientConnection::new(ClientConfig::default(), 91, now);
    c.open_file(now, "a.mp4", 0);
    c.handle_datagram(now, &Packet::new(0, 0, stray).encode());
    let mut events = Vec::new();
    let mut out = Vec::new();
    for _ in 0..10 {
        while let Some(d) = c.poll_transmit(now) {
            s.handle_datagram(now, from, &d);
        }
        while s.poll_transmit(now, &mut out).is_some() {
            c.handle_datagram(now, &out);
        }
        while let Some(e) = c.poll_event() {
            events.push(e);
        }
    }
    events
}

/// `stray` neither ends the handshake (as a version mismatch or a close)
/// nor keeps it from completing.
fn assert_stray_is_ignored(stray: Body) {
    let events = handshake_after_a_stray(stray);
    assert!(
        !events.iter().any(|e| matches!(
            e,
            ClientEvent::VersionMismatch { .. } | ClientEvent::Closed { .. }
        )),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e, ClientEvent::Connected)),
        "{events:?}"
    );
}

#[test]
fn a_version_list_naming_the_clients_version_is_not_a_mismatch() {
    // The answer the server gave some earlier socket on the same port (the
    // OS reuses ports: the load generator's 200 clients hit it once).
    assert_stray_is_ignored(Body::VersionNegotiation {
        supported: vec![VERSION],
    });
}

#[test]
fn a_version_list_without_the_clients_version_is_a_mismatch() {
    let other = VERSION.wrapping_add(1);
    let events = handshake_after_a_stray(Body::VersionNegotiation {
        supported: vec![other],
    });
    assert!(
        events.iter().any(|e| matches!(
            e,
            ClientEvent::VersionMismatch { server_supports } if *server_supports == vec![other]
        )),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, ClientEvent::Connected)),
        "{events:?}"
    );
}

#[test]
fn an_unknown_connection_close_does_not_end_a_handshake() {
    // What the server answers junk carrying connection id 0; a handshaking
    // client sends nothing of the kind, so it was some earlier socket's.
    assert_stray_is_ignored(Body::Close {
        reason: CloseReason::UnknownConnection,
        message: String::new(),
    });
}

#[test]
fn a_busy_server_still_ends_a_handshake() {
    let events = handshake_after_a_stray(Body::Close {
        reason: CloseReason::ServerBusy,
        message: "full".into(),
    });
    assert!(
        events.iter().any(|e| matches!(
            e,
            ClientEvent::Closed {
                reason: CloseReason::ServerBusy,
                ..
            }
        )),
        "{events:?}"
    );
}
