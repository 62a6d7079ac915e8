//! Entry points shared by the fuzz targets (`fuzz/`) and the regression
//! test that replays their findings (`fuzz/regressions/`) in `make test`.
//! Each takes arbitrary bytes and must never panic.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::catalog;
use super::client::{ClientConfig, ClientConnection};
use super::media_index;
use super::server::{MemoryStore, ServerConfig, ServerEndpoint};
use super::wire::Packet;

/// The decoders: whatever decodes re-encodes to the same packet.
pub fn decode(data: &[u8]) {
    if let Ok(p) = Packet::decode(data) {
        assert_eq!(Packet::decode(&p.encode()), Ok(p));
    }
    let _ = catalog::decode(data);
}

/// The server fed records `[addr, len_hi, len_lo, bytes…]` from a few
/// addresses; address 255 advances time by `len` ms instead.
pub fn server(data: &[u8]) {
    let mut now = Instant::now();
    let mut server = ServerEndpoint::new(
        ServerConfig::default(),
        MemoryStore {
            files: vec![("a".into(), vec![7; 5000])],
        },
        [0; 32],
        now,
    );
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let (addr, len) = (rest[0], u16::from_be_bytes([rest[1], rest[2]]) as usize);
        rest = &rest[3..];
        if addr == 255 {
            now += Duration::from_millis(len as u64);
            server.handle_timeout(now);
        } else {
            let n = len.min(rest.len());
            let from = SocketAddr::from(([127, 0, 0, addr % 4], 1000 + addr as u16));
            server.handle_datagram(now, from, &rest[..n]);
            rest = &rest[n..];
        }
        let mut sent = 0;
        while server.poll_transmit(now, &mut out).is_some() {
            sent += 1;
            assert!(sent < 100_000, "endless output");
        }
        while server.poll_event().is_some() {}
    }
}

/// The client fed records `[len_hi, len_lo, bytes…]`; a length of 0xff00
/// or more advances time by `(len & 0xff) × 10` ms instead. The player
/// reads everything it can after each record.
pub fn client(data: &[u8]) {
    let mut now = Instant::now();
    let mut client = ClientConnection::new(ClientConfig::default(), 0, now);
    client.open_file(now, "a", 0);
    let mut rest = data;
    while rest.len() >= 2 {
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        if len >= 0xff00 {
            now += Duration::from_millis((len & 0xff) as u64 * 10);
            client.handle_timeout(now);
        } else {
            let n = len.min(rest.len());
            client.handle_datagram(now, &rest[..n]);
            rest = &rest[n..];
        }
        while client.poll_transmit(now).is_some() {}
        while client.read(now, 65536).is_some() {}
        while client.poll_event().is_some() {}
    }
}

/// The container index walk over an untrusted file: whatever it answers
/// lies inside the file.
pub fn media_index(data: &[u8]) {
    let mut read = |offset: u64, buf: &mut [u8]| {
        let Some(rest) = usize::try_from(offset).ok().and_then(|o| data.get(o..)) else {
            return 0;
        };
        let n = buf.len().min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        n
    };
    if let Some(index) = media_index::locate_index(data.len() as u64, &mut read) {
        let r = index.range;
        assert!(r.start < r.end && r.end <= data.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    /// Replays every input kept in `fuzz/regressions/<target>/`.
    #[test]
    fn fuzz_regressions_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        let mut replayed = 0;
        for (target, run) in [
            ("decode", super::decode as fn(&[u8])),
            ("server", super::server),
            ("client", super::client),
            ("media_index", super::media_index),
        ] {
            let Ok(entries) = std::fs::read_dir(root.join(target)) else {
                continue;
            };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).expect("regression input");
                run(&data);
                replayed += 1;
            }
        }
        // The folder ships at least one input per target, so a broken path
        // is noticed rather than silently replaying nothing.
        assert!(replayed >= 4, "only {replayed} regression inputs found");
    }
}
