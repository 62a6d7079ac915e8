//! Maps keyed by a client's IP address, for the server's per-address
//! state (its sessions' shared bottleneck, their group window, the
//! admission counts).
//!
//! Several of these are looked up for every datagram a session sends and
//! every ACK it receives: with 200 paced pulls from one address, std's
//! SipHash over those lookups (and the 10 ms walks of every session that
//! file each under its address) took about 7 % of the server's CPU. An
//! address is one or two words, so one keyed multiply folds it: a 128-bit
//! product whose halves are XORed. The key is random per map and never
//! leaves the process, so a client, which chooses its address only within
//! the networks it can receive at, cannot aim its addresses at one bucket;
//! and how many addresses a server keeps is bounded by its admission.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;

/// A map keyed by client address (see the module doc).
pub type AddressMap<V> = HashMap<IpAddr, V, AddressHashing>;

/// An odd constant with well spread bits (the fractional part of pi),
/// so the product of any nonzero word with it reaches both halves.
const SPREAD: u64 = 0x243f_6a88_85a3_08d3;

/// Builds the hashers of one [`AddressMap`]: they share its random key.
#[derive(Debug, Clone)]
pub struct AddressHashing {
    key: u64,
}

impl Default for AddressHashing {
    fn default() -> Self {
        // One SipHash per map, keyed by the process's random seed.
        AddressHashing {
            key: RandomState::new().hash_one(SPREAD),
        }
    }
}

impl BuildHasher for AddressHashing {
    type Hasher = AddressHasher;

    fn build_hasher(&self) -> AddressHasher {
        AddressHasher { state: self.key }
    }
}

/// Hashes the words of one address (see the module doc).
#[derive(Debug, Clone)]
pub struct AddressHasher {
    state: u64,
}

fn fold_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl AddressHasher {
    fn mix(&mut self, word: u64) {
        self.state = fold_multiply(self.state ^ word, SPREAD);
    }
}

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        // One more fold, so the low bits hashbrown picks the bucket with
        // depend on every bit of the last word.
        fold_multiply(self.state, SPREAD ^ self.state.rotate_left(32))
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.mix(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn write_u128(&mut self, n: u128) {
        self.mix(n as u64);
        self.mix((n >> 64) as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn write_isize(&mut self, n: isize) {
        self.mix(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn every_address_is_found_again_and_no_other() {
        let mut map: AddressMap<usize> = AddressMap::default();
        let v4 = (0..1000u32).map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
        let v6 = (0..1000u128).map(|i| IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) + i)));
        let all: Vec<IpAddr> = v4.chain(v6).collect();
        for (i, ip) in all.iter().enumerate() {
            map.insert(*ip, i);
        }
        assert_eq!(map.len(), all.len());
        for (i, ip) in all.iter().enumerate() {
            assert_eq!(map.get(ip), Some(&i));
        }
        // An IPv4 address and its IPv4-mapped IPv6 form are two keys.
        assert!(!map.contains_key(&IpAddr::V6(Ipv4Addr::from(0x0a00_0000).to_ipv6_mapped())));
        assert!(!map.contains_key(&IpAddr::V4(Ipv4Addr::from(0x0b00_0000))));
    }

    /// Neighbouring addresses, the ones a client controls most easily,
    /// spread over the buckets: the low bits of their hashes differ.
    #[test]
    fn neighbouring_addresses_spread_over_the_low_bits() {
        let hashing = AddressHashing::default();
        let buckets: HashSet<u64> = (0..4096u32)
            .map(|i| hashing.hash_one(IpAddr::V4(Ipv4Addr::from(0xc0a8_0000 + i))) & 4095)
            .collect();
        // A uniform hash fills about 1 - 1/e of 4096 buckets with 4096 keys.
        assert!(buckets.len() > 2400, "{} buckets", buckets.len());
        let buckets: HashSet<u64> = (0..4096u128)
            .map(|i| {
                hashing.hash_one(IpAddr::V6(Ipv6Addr::from((0xfe80u128 << 112) + (i << 64)))) & 4095
            })
            .collect();
        assert!(buckets.len() > 2400, "{} buckets", buckets.len());
    }

    /// Two maps hash alike only by chance: the key is the map's own.
    #[test]
    fn each_map_has_its_own_key() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let hashes: HashSet<u64> = (0..8)
            .map(|_| AddressHashing::default().hash_one(ip))
            .collect();
        assert!(hashes.len() > 1);
    }
}
