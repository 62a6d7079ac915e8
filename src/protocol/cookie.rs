//! Stateless address validation (RFC 9000 §8.1 style retry tokens).
//!
//! A cookie is `slot (4 bytes) || HMAC-SHA256(key, addr || nonce || slot)[..16]`.
//! The server keeps no state per unvalidated client: it recomputes the MAC.
//! Keys rotate; a cookie is accepted under the current or previous key while
//! its time slot is the current or previous one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A cookie names a slot of this length; it stays valid for one to two slots.
pub const COOKIE_SLOT: Duration = Duration::from_secs(15);
/// How often the MAC key is replaced.
pub const KEY_ROTATION: Duration = Duration::from_secs(120);
const MAC_LEN: usize = 16;
pub const COOKIE_LEN: usize = 4 + MAC_LEN;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug)]
pub struct AddressValidator {
    epoch: Instant,
    current: [u8; 32],
    previous: [u8; 32],
    rotated_at: Instant,
}

impl AddressValidator {
    pub fn new(now: Instant, key: [u8; 32]) -> Self {
        AddressValidator {
            epoch: now,
            current: key,
            previous: key,
            rotated_at: now,
        }
    }

    /// Whether a new key is due; the caller supplies the randomness.
    pub fn rotation_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.rotated_at) >= KEY_ROTATION
    }

    pub fn rotate(&mut self, now: Instant, key: [u8; 32]) {
        self.previous = self.current;
        self.current = key;
        self.rotated_at = now;
    }

    pub fn next_rotation(&self) -> Instant {
        self.rotated_at + KEY_ROTATION
    }

    fn slot(&self, now: Instant) -> u32 {
        let secs = now.saturating_duration_since(self.epoch).as_secs();
        (secs / COOKIE_SLOT.as_secs()) as u32
    }

    fn mac(key: &[u8; 32], addr: SocketAddr, nonce: u64, slot: u32) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        match addr {
            SocketAddr::V4(a) => {
                mac.update(&[4]);
                mac.update(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                mac.update(&[6]);
                mac.update(&a.ip().octets());
            }
        }
        mac.update(&addr.port().to_be_bytes());
        mac.update(&nonce.to_be_bytes());
        mac.update(&slot.to_be_bytes());
        mac
    }

    pub fn issue(&self, now: Instant, addr: SocketAddr, nonce: u64) -> Vec<u8> {
        let slot = self.slot(now);
        let tag = Self::mac(&self.current, addr, nonce, slot)
            .finalize()
            .into_bytes();
        let mut cookie = Vec::with_capacity(COOKIE_LEN);
        cookie.extend_from_slice(&slot.to_be_bytes());
        cookie.extend_from_slice(&tag[..MAC_LEN]);
        cookie
    }

    pub fn verify(&self, now: Instant, addr: SocketAddr, nonce: u64, cookie: &[u8]) -> bool {
        if cookie.len() != COOKIE_LEN {
            return false;
        }
        let mut slot_bytes = [0u8; 4];
        slot_bytes.copy_from_slice(&cookie[..4]);
        let slot = u32::from_be_bytes(slot_bytes);
        let current = self.slot(now);
        if slot > current || current - slot > 1 {
            return false;
        }
        [&self.current, &self.previous].into_iter().any(|key| {
            // verify_truncated_left compares in constant time.
            Self::mac(key, addr, nonce, slot)
                .verify_truncated_left(&cookie[4..])
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_is_bound_to_address_nonce_and_time() {
        let t0 = Instant::now();
        let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        let mut v = AddressValidator::new(t0, [7; 32]);
        let c = v.issue(t0, a, 42);
        assert!(v.verify(t0, a, 42, &c));
        assert!(!v.verify(t0, b, 42, &c));
        assert!(!v.verify(t0, a, 43, &c));
        let mut bad = c.clone();
        bad[10] ^= 1;
        assert!(!v.verify(t0, a, 42, &bad));
        // Survives one rotation, not two.
        let t1 = t0 + Duration::from_secs(1);
        v.rotate(t1, [8; 32]);
        assert!(v.verify(t1, a, 42, &c));
        v.rotate(t1, [9; 32]);
        assert!(!v.verify(t1, a, 42, &c));
        // Expires after two slots.
        let c = v.issue(t1, a, 1);
        assert!(!v.verify(t1 + COOKIE_SLOT * 2, a, 1, &c));
    }
}
