//! Optional passphrase: authenticated and encrypted sessions.
//!
//! Nothing home-made in the primitives: HKDF-SHA256 (RFC 5869), HMAC-SHA256
//! and ChaCha20-Poly1305 (RFC 8439) from the RustCrypto crates. The scheme:
//!
//! - `psk = HKDF-Extract(salt = "udpvid v1 passphrase", ikm = passphrase)`.
//! - The client's `Hello` says it wants authentication. The server's
//!   `Welcome` carries 16 random bytes and `HMAC(psk, "udpvid v1 welcome" ‖
//!   client nonce ‖ connection id ‖ server random)[..16]`: a client with the
//!   wrong passphrase (or none) cannot verify it and stops there, before it
//!   sends or receives any catalog or file byte.
//! - Both sides derive two keys, `HKDF-Expand(psk, "udpvid v1 keys" ‖ client
//!   nonce ‖ connection id ‖ server random, 64)`: the first 32 bytes seal
//!   client → server, the last 32 server → client.
//! - Every later datagram is sealed: the 20-byte header stays in clear and
//!   is authenticated as associated data; the body is encrypted; a 16-byte
//!   tag follows. The nonce is the packet number (never reused within a
//!   direction of a session), zero-padded to 12 bytes. A server that cannot
//!   open a client's datagram drops it, so a client with the wrong key gets
//!   nothing.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::wire::{ConnectionId, HEADER_LEN};

/// Bytes a sealed datagram adds.
pub const TAG_LEN: usize = 16;
pub const RANDOM_LEN: usize = 16;

/// The key both sides derive from the shared passphrase.
#[derive(Clone)]
pub struct Psk([u8; 32]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(…)")
    }
}

impl Psk {
    pub fn from_passphrase(passphrase: &str) -> Psk {
        let (prk, _) =
            Hkdf::<Sha256>::extract(Some(b"udpvid v1 passphrase"), passphrase.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(&prk);
        Psk(key)
    }

    fn context(
        client_nonce: u64,
        connection_id: ConnectionId,
        server_random: &[u8; RANDOM_LEN],
    ) -> Vec<u8> {
        let mut c = Vec::with_capacity(32);
        c.extend_from_slice(&client_nonce.to_be_bytes());
        c.extend_from_slice(&connection_id.to_be_bytes());
        c.extend_from_slice(server_random);
        c
    }

    /// The proof in `Welcome` that the server knows the passphrase.
    pub fn welcome_tag(
        &self,
        client_nonce: u64,
        connection_id: ConnectionId,
        server_random: &[u8; RANDOM_LEN],
    ) -> [u8; 16] {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(b"udpvid v1 welcome");
        mac.update(&Self::context(client_nonce, connection_id, server_random));
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&full[..16]);
        tag
    }

    /// Checks a `Welcome` tag in constant time.
    pub fn verify_welcome(
        &self,
        client_nonce: u64,
        connection_id: ConnectionId,
        server_random: &[u8; RANDOM_LEN],
        tag: &[u8],
    ) -> bool {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(b"udpvid v1 welcome");
        mac.update(&Self::context(client_nonce, connection_id, server_random));
        mac.verify_truncated_left(tag).is_ok()
    }

    /// The session's keys, for the server (`is_server`) or the client.
    pub fn session_keys(
        &self,
        client_nonce: u64,
        connection_id: ConnectionId,
        server_random: &[u8; RANDOM_LEN],
        is_server: bool,
    ) -> SessionKeys {
        let hk = Hkdf::<Sha256>::from_prk(&self.0).unwrap_or_else(|_| unreachable!());
        let mut info = b"udpvid v1 keys".to_vec();
        info.extend_from_slice(&Self::context(client_nonce, connection_id, server_random));
        let mut okm = [0u8; 64];
        // 64 bytes is far below HKDF's limit of 255 × 32.
        hk.expand(&info, &mut okm)
            .unwrap_or_else(|_| unreachable!());
        let c2s = ChaCha20Poly1305::new(Key::from_slice(&okm[..32]));
        let s2c = ChaCha20Poly1305::new(Key::from_slice(&okm[32..]));
        if is_server {
            SessionKeys {
                seal: s2c,
                open: c2s,
            }
        } else {
            SessionKeys {
                seal: c2s,
                open: s2c,
            }
        }
    }
}

/// The two directions' AEAD keys of one session.
pub struct SessionKeys {
    seal: ChaCha20Poly1305,
    open: ChaCha20Poly1305,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(…)")
    }
}

fn nonce(packet_number: &[u8]) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(packet_number);
    *Nonce::from_slice(&n)
}

impl SessionKeys {
    /// Encrypts an encoded datagram in place: header in clear, body
    /// encrypted, tag appended.
    pub fn seal(&self, datagram: &mut Vec<u8>) {
        self.seal_from(datagram, 0);
    }

    /// Seals the datagram that starts at `start` in `buf` and runs to its
    /// end (datagrams before it, in a send batch, are left alone).
    pub fn seal_from(&self, buf: &mut Vec<u8>, start: usize) {
        if buf.len() < start + HEADER_LEN {
            return;
        }
        let (header, body) = buf[start..].split_at_mut(HEADER_LEN);
        let n = nonce(&header[12..20]);
        // Encryption fails only for bodies over 256 GiB.
        let tag = self
            .seal
            .encrypt_in_place_detached(&n, header, body)
            .unwrap_or_else(|_| unreachable!());
        buf.extend_from_slice(&tag);
    }

    /// Checks and decrypts a sealed datagram; `None` if it was not sealed
    /// with this session's key or was altered.
    pub fn open(&self, datagram: &[u8]) -> Option<Vec<u8>> {
        if datagram.len() < HEADER_LEN + TAG_LEN {
            return None;
        }
        let (sealed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
        let mut plain = sealed.to_vec();
        let (header, body) = plain.split_at_mut(HEADER_LEN);
        let n = nonce(&header[12..20]);
        self.open
            .decrypt_in_place_detached(&n, header, body, Tag::from_slice(tag))
            .ok()?;
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::{Body, Packet};

    #[test]
    fn sealed_datagrams_open_only_with_the_right_key() {
        let psk = Psk::from_passphrase("correct horse");
        let random = [9u8; RANDOM_LEN];
        let client = psk.session_keys(1, 2, &random, false);
        let server = psk.session_keys(1, 2, &random, true);
        let p = Packet::new(
            2,
            7,
            Body::Data {
                transfer_id: 1,
                offset: 0,
                payload: b"secret video bytes".to_vec(),
            },
        );
        let mut d = p.encode();
        server.seal(&mut d);
        assert!(
            !d.windows(6).any(|w| w == b"secret"),
            "plaintext on the wire"
        );
        assert_eq!(Packet::decode(&client.open(&d).expect("opens")), Ok(p));
        // The sender cannot open its own direction, others cannot open it.
        assert!(server.open(&d).is_none());
        let wrong = Psk::from_passphrase("wrong").session_keys(1, 2, &random, false);
        assert!(wrong.open(&d).is_none());
        // Any altered byte, header included, is refused.
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 1;
            assert!(client.open(&bad).is_none(), "byte {i}");
        }
    }

    #[test]
    fn welcome_tag_proves_the_passphrase() {
        let psk = Psk::from_passphrase("a");
        let r = [1u8; RANDOM_LEN];
        let tag = psk.welcome_tag(5, 6, &r);
        assert!(psk.verify_welcome(5, 6, &r, &tag));
        assert!(!Psk::from_passphrase("b").verify_welcome(5, 6, &r, &tag));
        assert!(!psk.verify_welcome(5, 7, &r, &tag));
    }
}
