//! Encoding and decoding of udpvid datagrams (protocol version 1).
//!
//! The byte layout is documented in `src/protocol/README.md`; this module is
//! its only implementation, shared by the server and the element. Decoding
//! never panics: every length is checked against the datagram before use.

use std::fmt;
use std::ops::Range;

/// First two bytes of every datagram, so stray traffic is rejected cheaply.
pub const MAGIC: [u8; 2] = *b"UV";
/// The protocol version this build speaks.
pub const VERSION: u8 = 2;
/// Version byte reserved for version-negotiation replies (as in QUIC, where
/// version 0 marks the negotiation packet).
pub const VERSION_NEGOTIATION: u8 = 0;
/// magic(2) + version(1) + type(1) + connection id(8) + packet number(8).
pub const HEADER_LEN: usize = 20;
/// A client's first datagram is padded to this size, so that the 3x
/// anti-amplification budget (RFC 9000 §8) leaves room for the server's
/// reply. 1200 is QUIC's value: it fits every path with a sane MTU.
pub const MIN_HELLO_SIZE: usize = 1200;
/// Largest datagram we ever build: 1500-byte Ethernet MTU minus IPv6 (40) and
/// UDP (8) headers, rounded down.
pub const MAX_DATAGRAM_SIZE: usize = 1452;
/// Largest datagram a server sends by default to a client whose path
/// carries more than [`MAX_DATAGRAM_SIZE`] (see `Body::Hello`): four make a
/// 64 KB send, and past it a 512 MiB loopback pull gained nothing more
/// (client CPU 375 ms at 1,452 bytes; 276 at 8,000; 255 at 16,000; 265
/// at 32,000 and 60,000).
pub const DEFAULT_LARGE_DATAGRAM_SIZE: usize = 16_000;
/// Largest UDP payload IPv4 allows.
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// What a client pads its Hello to: the largest datagram, which the path
/// must carry anyway. Three times it lets an early open's first flight hold
/// 4 KiB of the file; servers accept anything from [`MIN_HELLO_SIZE`].
pub const HELLO_PADDED_SIZE: usize = MAX_DATAGRAM_SIZE;
/// Bytes a Data packet spends before its payload.
pub const DATA_OVERHEAD: usize = HEADER_LEN + 4 + 8;
/// Default Data payload: fills a datagram that fits 1500-byte Ethernet.
pub const DEFAULT_MAX_PAYLOAD: usize = MAX_DATAGRAM_SIZE - DATA_OVERHEAD;
/// An ACK carries at most this many ranges; older ranges are dropped first
/// (the contiguous `received_up_to` offset covers what they said).
pub const MAX_ACK_RANGES: usize = 32;
/// Longest path or message we put on the wire.
pub const MAX_TEXT_LEN: usize = 1024;
/// Largest cookie a Retry may carry.
pub const MAX_COOKIE_LEN: usize = 64;

/// Connection id assigned by the server; 0 before the server assigned one.
pub type ConnectionId = u64;

/// What a transfer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    Catalog,
    File,
}

/// Why an Open failed; sent as one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenErrorKind {
    NotFound,
    NotReadable,
    BadRequest,
    Internal,
}

/// Why a connection is closed; sent as one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer ended the session on purpose.
    Normal,
    /// The server does not know the connection id (restarted or expired).
    UnknownConnection,
    /// The server is at its session limit.
    ServerBusy,
    /// The server is shutting down.
    Shutdown,
    /// The session was idle too long.
    IdleTimeout,
    /// The peer sent something that violates the protocol.
    ProtocolViolation,
    /// The server requires a passphrase the client did not offer.
    AuthenticationRequired,
}

/// One acknowledged range of packet numbers, inclusive at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckRange {
    pub largest: u64,
    pub smallest: u64,
}

/// What an `Open` asks for; also carried by a `Hello` as its early open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    pub transfer_id: u32,
    pub kind: TransferKind,
    pub offset: u64,
    pub window: u64,
    pub path: String,
}

impl OpenRequest {
    /// Its wire form, the same in `Open` and in a `Hello`'s early open.
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.transfer_id.to_be_bytes());
        out.push(self.kind.to_byte());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.window.to_be_bytes());
        put_text(out, &self.path);
    }

    fn decode(r: &mut Reader<'_>) -> Result<OpenRequest, DecodeError> {
        Ok(OpenRequest {
            transfer_id: r.u32()?,
            kind: TransferKind::from_byte(r.u8()?)?,
            offset: r.u64()?,
            window: r.u64()?,
            path: r.text()?,
        })
    }
}

/// `Hello` flag bits.
const HELLO_WANTS_AUTH: u8 = 1;
const HELLO_EARLY_OPEN: u8 = 2;
/// A `u16` after the early open: the Hello's `max_datagram`. Servers
/// before it read it as padding.
const HELLO_MAX_DATAGRAM: u8 = 4;
/// `Welcome` flag bits.
const WELCOME_AUTH_TAG: u8 = 1;
const WELCOME_EARLY_OPEN_ACCEPTED: u8 = 2;

/// The body of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Client → server: first request; `cookie` is empty until the server
    /// handed one out with `Retry`. Padded to [`HELLO_PADDED_SIZE`].
    /// `wants_auth`: the client holds a passphrase (see `crypto.rs`).
    /// `early_open`: the transfer the client wants, so the server can
    /// answer it with the `Welcome` instead of a round trip later.
    /// `max_datagram`: the largest datagram the client's route to the
    /// server carries, when that is more than [`MAX_DATAGRAM_SIZE`]
    /// (loopback, jumbo frames); the server tries one that large before
    /// it sends more (see `LargeDatagrams` in `server.rs`).
    Hello {
        client_nonce: u64,
        cookie: Vec<u8>,
        wants_auth: bool,
        early_open: Option<OpenRequest>,
        max_datagram: Option<u16>,
    },
    /// Client → server: start a transfer at `offset`. A new transfer id
    /// replaces the previous transfer (that is how a seek works).
    Open(OpenRequest),
    /// Client → server: selective acknowledgement plus the receive window.
    Ack {
        transfer_id: u32,
        /// Highest stream offset (exclusive) the client accepts.
        window: u64,
        /// Every byte below this offset has been received.
        received_up_to: u64,
        ack_delay_micros: u32,
        /// Descending, non-overlapping; may be empty (pure window update).
        ranges: Vec<AckRange>,
    },
    /// Either direction: keepalive; answered with `Pong`.
    Ping,
    Pong,
    /// Either direction: the session is over.
    Close {
        reason: CloseReason,
        message: String,
    },
    /// Server → client: prove you own your address.
    Retry {
        client_nonce: u64,
        cookie: Vec<u8>,
    },
    /// Server → client: session established; header carries the new id.
    Welcome {
        client_nonce: u64,
        idle_timeout_ms: u32,
        max_payload: u16,
        server_random: [u8; 16],
        /// Proof that the server knows the passphrase, on authenticated sessions.
        auth_tag: Option<[u8; 16]>,
        /// The server took the Hello's `early_open` and answers it next.
        early_open_accepted: bool,
    },
    OpenOk {
        transfer_id: u32,
        size: u64,
        content_tag: u64,
        offset: u64,
        /// Where the file's index (MP4 `moov`, Matroska `Cues`) lies, when
        /// the server sends it ahead of the stream (see `media_index.rs`).
        index: Option<Range<u64>>,
    },
    OpenError {
        transfer_id: u32,
        kind: OpenErrorKind,
        message: String,
    },
    Data {
        transfer_id: u32,
        offset: u64,
        payload: Vec<u8>,
    },
    /// Server → client, sent with version byte 0: the versions it speaks.
    VersionNegotiation {
        supported: Vec<u8>,
    },
}

/// A whole datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub connection_id: ConnectionId,
    pub packet_number: u64,
    pub body: Body,
}

/// Why a datagram could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooShort,
    BadMagic,
    /// A udpvid datagram of a version we do not speak.
    UnsupportedVersion(u8),
    UnknownType(u8),
    Malformed(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooShort => write!(f, "datagram shorter than the udpvid header"),
            DecodeError::BadMagic => write!(f, "not a udpvid datagram"),
            DecodeError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "udpvid protocol version {v} (this build speaks {VERSION})"
                )
            }
            DecodeError::UnknownType(t) => write!(f, "unknown packet type 0x{t:02x}"),
            DecodeError::Malformed(what) => write!(f, "malformed datagram: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const OPEN: u8 = 0x02;
    pub const ACK: u8 = 0x03;
    pub const PING: u8 = 0x04;
    pub const CLOSE: u8 = 0x05;
    pub const PONG: u8 = 0x06;
    pub const RETRY: u8 = 0x81;
    pub const WELCOME: u8 = 0x82;
    pub const OPEN_OK: u8 = 0x83;
    pub const OPEN_ERROR: u8 = 0x84;
    pub const DATA: u8 = 0x85;
    pub const VERSION_NEGOTIATION: u8 = 0x86;
}

impl TransferKind {
    fn to_byte(self) -> u8 {
        match self {
            TransferKind::Catalog => 0,
            TransferKind::File => 1,
        }
    }
    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(TransferKind::Catalog),
            1 => Ok(TransferKind::File),
            _ => Err(DecodeError::Malformed("transfer kind")),
        }
    }
}

impl OpenErrorKind {
    fn to_byte(self) -> u8 {
        match self {
            OpenErrorKind::NotFound => 1,
            OpenErrorKind::NotReadable => 2,
            OpenErrorKind::BadRequest => 3,
            OpenErrorKind::Internal => 4,
        }
    }
    fn from_byte(b: u8) -> Self {
        match b {
            1 => OpenErrorKind::NotFound,
            2 => OpenErrorKind::NotReadable,
            3 => OpenErrorKind::BadRequest,
            // An unknown kind from a newer peer is still an error.
            _ => OpenErrorKind::Internal,
        }
    }
}

impl CloseReason {
    fn to_byte(self) -> u8 {
        match self {
            CloseReason::Normal => 0,
            CloseReason::UnknownConnection => 1,
            CloseReason::ServerBusy => 2,
            CloseReason::Shutdown => 3,
            CloseReason::IdleTimeout => 4,
            CloseReason::ProtocolViolation => 5,
            CloseReason::AuthenticationRequired => 6,
        }
    }
    fn from_byte(b: u8) -> Self {
        match b {
            0 => CloseReason::Normal,
            1 => CloseReason::UnknownConnection,
            2 => CloseReason::ServerBusy,
            3 => CloseReason::Shutdown,
            4 => CloseReason::IdleTimeout,
            6 => CloseReason::AuthenticationRequired,
            _ => CloseReason::ProtocolViolation,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::Normal => "closed by peer",
            CloseReason::UnknownConnection => "server does not know this session",
            CloseReason::ServerBusy => "server busy",
            CloseReason::Shutdown => "server shutting down",
            CloseReason::IdleTimeout => "session idle for too long",
            CloseReason::ProtocolViolation => "protocol violation",
            CloseReason::AuthenticationRequired => "the server requires a passphrase",
        })
    }
}

impl fmt::Display for OpenErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpenErrorKind::NotFound => "not found",
            OpenErrorKind::NotReadable => "not readable",
            OpenErrorKind::BadRequest => "bad request",
            OpenErrorKind::Internal => "internal server error",
        })
    }
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    // Truncate on a char boundary so the receiver always gets valid UTF-8.
    let mut end = text.len().min(MAX_TEXT_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

impl Packet {
    pub fn new(connection_id: ConnectionId, packet_number: u64, body: Body) -> Self {
        Packet {
            connection_id,
            packet_number,
            body,
        }
    }

    /// Serialises the packet into a fresh buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.encode_into(&mut out);
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        self.encode_append(out);
    }

    /// Appends the encoded packet to `out`: the server writes datagrams
    /// straight into its send batch.
    pub fn encode_append(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        let version = match self.body {
            Body::VersionNegotiation { .. } => VERSION_NEGOTIATION,
            _ => VERSION,
        };
        out.push(version);
        out.push(self.body.type_byte());
        out.extend_from_slice(&self.connection_id.to_be_bytes());
        out.extend_from_slice(&self.packet_number.to_be_bytes());
        match &self.body {
            Body::Hello {
                client_nonce,
                cookie,
                wants_auth,
                early_open,
                max_datagram,
            } => {
                out.extend_from_slice(&client_nonce.to_be_bytes());
                let len = cookie.len().min(MAX_COOKIE_LEN);
                out.push(len as u8);
                out.extend_from_slice(&cookie[..len]);
                let mut flags = 0;
                if *wants_auth {
                    flags |= HELLO_WANTS_AUTH;
                }
                if early_open.is_some() {
                    flags |= HELLO_EARLY_OPEN;
                }
                if max_datagram.is_some() {
                    flags |= HELLO_MAX_DATAGRAM;
                }
                out.push(flags);
                if let Some(o) = early_open {
                    o.encode(out);
                }
                if let Some(m) = max_datagram {
                    out.extend_from_slice(&m.to_be_bytes());
                }
                if out.len() < HELLO_PADDED_SIZE {
                    out.resize(HELLO_PADDED_SIZE, 0);
                }
            }
            Body::Open(o) => {
                o.encode(out);
            }
            Body::Ack {
                transfer_id,
                window,
                received_up_to,
                ack_delay_micros,
                ranges,
            } => {
                out.extend_from_slice(&transfer_id.to_be_bytes());
                out.extend_from_slice(&window.to_be_bytes());
                out.extend_from_slice(&received_up_to.to_be_bytes());
                out.extend_from_slice(&ack_delay_micros.to_be_bytes());
                let n = ranges.len().min(MAX_ACK_RANGES);
                out.push(n as u8);
                for r in &ranges[..n] {
                    out.extend_from_slice(&r.largest.to_be_bytes());
                    out.extend_from_slice(&r.smallest.to_be_bytes());
                }
            }
            Body::Ping | Body::Pong => {}
            Body::Close { reason, message } => {
                out.push(reason.to_byte());
                put_text(out, message);
            }
            Body::Retry {
                client_nonce,
                cookie,
            } => {
                out.extend_from_slice(&client_nonce.to_be_bytes());
                let len = cookie.len().min(MAX_COOKIE_LEN);
                out.push(len as u8);
                out.extend_from_slice(&cookie[..len]);
            }
            Body::Welcome {
                client_nonce,
                idle_timeout_ms,
                max_payload,
                server_random,
                auth_tag,
                early_open_accepted,
            } => {
                out.extend_from_slice(&client_nonce.to_be_bytes());
                out.extend_from_slice(&idle_timeout_ms.to_be_bytes());
                out.extend_from_slice(&max_payload.to_be_bytes());
                out.extend_from_slice(server_random);
                let mut flags = 0;
                if auth_tag.is_some() {
                    flags |= WELCOME_AUTH_TAG;
                }
                if *early_open_accepted {
                    flags |= WELCOME_EARLY_OPEN_ACCEPTED;
                }
                out.push(flags);
                if let Some(tag) = auth_tag {
                    out.extend_from_slice(tag);
                }
            }
            Body::OpenOk {
                transfer_id,
                size,
                content_tag,
                offset,
                index,
            } => {
                out.extend_from_slice(&transfer_id.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&content_tag.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                // A length of 0 says "no index sent ahead".
                let (start, len) = index.as_ref().map_or((0, 0), |r| {
                    (r.start, u32::try_from(r.end - r.start).unwrap_or(0))
                });
                out.extend_from_slice(&start.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
            }
            Body::OpenError {
                transfer_id,
                kind,
                message,
            } => {
                out.extend_from_slice(&transfer_id.to_be_bytes());
                out.push(kind.to_byte());
                put_text(out, message);
            }
            Body::Data {
                transfer_id,
                offset,
                payload,
            } => {
                out.extend_from_slice(&transfer_id.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(payload);
            }
            Body::VersionNegotiation { supported } => {
                let n = supported.len().min(255);
                out.push(n as u8);
                out.extend_from_slice(&supported[..n]);
            }
        }
    }

    /// The connection id in a datagram's header, read without decoding
    /// the rest (sealed datagrams keep their header in the clear); `None`
    /// for what is not a datagram of this version.
    pub fn header_connection_id(buf: &[u8]) -> Option<ConnectionId> {
        if buf.len() < HEADER_LEN || buf[..2] != MAGIC || buf[2] != VERSION {
            return None;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&buf[4..12]);
        Some(u64::from_be_bytes(id))
    }

    /// Parses one datagram. Never panics, whatever the input.
    pub fn decode(buf: &[u8]) -> Result<Packet, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::TooShort);
        }
        if buf[..2] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = buf[2];
        let ty = buf[3];
        let mut r = Reader {
            buf: &buf[4..],
            pos: 0,
        };
        let connection_id = r.u64()?;
        let packet_number = r.u64()?;
        if version == VERSION_NEGOTIATION {
            if ty != ty::VERSION_NEGOTIATION {
                return Err(DecodeError::Malformed("version 0 is only for negotiation"));
            }
            let n = r.u8()? as usize;
            let supported = r.bytes(n)?.to_vec();
            return Ok(Packet::new(
                connection_id,
                packet_number,
                Body::VersionNegotiation { supported },
            ));
        }
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let body = match ty {
            ty::HELLO => {
                let client_nonce = r.u64()?;
                let len = r.u8()? as usize;
                if len > MAX_COOKIE_LEN {
                    return Err(DecodeError::Malformed("cookie too long"));
                }
                let cookie = r.bytes(len)?.to_vec();
                let flags = r.u8()?;
                let early_open = if flags & HELLO_EARLY_OPEN != 0 {
                    Some(OpenRequest::decode(&mut r)?)
                } else {
                    None
                };
                let max_datagram = if flags & HELLO_MAX_DATAGRAM != 0 {
                    Some(r.u16()?)
                } else {
                    None
                };
                // The rest is padding, deliberately ignored.
                Body::Hello {
                    client_nonce,
                    cookie,
                    wants_auth: flags & HELLO_WANTS_AUTH != 0,
                    early_open,
                    max_datagram,
                }
            }
            ty::OPEN => {
                let open = OpenRequest::decode(&mut r)?;
                r.finish()?;
                Body::Open(open)
            }
            ty::ACK => {
                let transfer_id = r.u32()?;
                let window = r.u64()?;
                let received_up_to = r.u64()?;
                let ack_delay_micros = r.u32()?;
                let n = r.u8()? as usize;
                if n > MAX_ACK_RANGES {
                    return Err(DecodeError::Malformed("too many ack ranges"));
                }
                let mut ranges = Vec::with_capacity(n);
                let mut floor: Option<u64> = None;
                for _ in 0..n {
                    let largest = r.u64()?;
                    let smallest = r.u64()?;
                    if smallest > largest {
                        return Err(DecodeError::Malformed("ack range upside down"));
                    }
                    // Ranges must descend with a gap, so a peer cannot make
                    // us walk the same packet numbers twice.
                    if let Some(f) = floor {
                        if largest.saturating_add(1) >= f {
                            return Err(DecodeError::Malformed("ack ranges not descending"));
                        }
                    }
                    floor = Some(smallest);
                    ranges.push(AckRange { largest, smallest });
                }
                r.finish()?;
                Body::Ack {
                    transfer_id,
                    window,
                    received_up_to,
                    ack_delay_micros,
                    ranges,
                }
            }
            ty::PING => {
                r.finish()?;
                Body::Ping
            }
            ty::PONG => {
                r.finish()?;
                Body::Pong
            }
            ty::CLOSE => {
                let reason = CloseReason::from_byte(r.u8()?);
                let message = r.text()?;
                r.finish()?;
                Body::Close { reason, message }
            }
            ty::RETRY => {
                let client_nonce = r.u64()?;
                let len = r.u8()? as usize;
                if len > MAX_COOKIE_LEN {
                    return Err(DecodeError::Malformed("cookie too long"));
                }
                let cookie = r.bytes(len)?.to_vec();
                r.finish()?;
                Body::Retry {
                    client_nonce,
                    cookie,
                }
            }
            ty::WELCOME => {
                let client_nonce = r.u64()?;
                let idle_timeout_ms = r.u32()?;
                let max_payload = r.u16()?;
                let server_random = r.array::<16>()?;
                let flags = r.u8()?;
                if flags & !(WELCOME_AUTH_TAG | WELCOME_EARLY_OPEN_ACCEPTED) != 0 {
                    return Err(DecodeError::Malformed("welcome flags"));
                }
                let auth_tag = if flags & WELCOME_AUTH_TAG != 0 {
                    Some(r.array::<16>()?)
                } else {
                    None
                };
                r.finish()?;
                Body::Welcome {
                    client_nonce,
                    idle_timeout_ms,
                    max_payload,
                    server_random,
                    auth_tag,
                    early_open_accepted: flags & WELCOME_EARLY_OPEN_ACCEPTED != 0,
                }
            }
            ty::OPEN_OK => {
                let transfer_id = r.u32()?;
                let size = r.u64()?;
                let content_tag = r.u64()?;
                let offset = r.u64()?;
                let index_start = r.u64()?;
                let index_len = u64::from(r.u32()?);
                r.finish()?;
                let index = match index_len {
                    0 => None,
                    len => match index_start.checked_add(len) {
                        Some(end) if end <= size => Some(index_start..end),
                        _ => return Err(DecodeError::Malformed("index beyond the file")),
                    },
                };
                Body::OpenOk {
                    transfer_id,
                    size,
                    content_tag,
                    offset,
                    index,
                }
            }
            ty::OPEN_ERROR => {
                let transfer_id = r.u32()?;
                let kind = OpenErrorKind::from_byte(r.u8()?);
                let message = r.text()?;
                r.finish()?;
                Body::OpenError {
                    transfer_id,
                    kind,
                    message,
                }
            }
            ty::DATA => {
                let (transfer_id, offset, payload) = data_body(&mut r)?;
                Body::Data {
                    transfer_id,
                    offset,
                    payload: payload.to_vec(),
                }
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        Ok(Packet::new(connection_id, packet_number, body))
    }
}

impl Body {
    fn type_byte(&self) -> u8 {
        match self {
            Body::Hello { .. } => ty::HELLO,
            Body::Open(_) => ty::OPEN,
            Body::Ack { .. } => ty::ACK,
            Body::Ping => ty::PING,
            Body::Pong => ty::PONG,
            Body::Close { .. } => ty::CLOSE,
            Body::Retry { .. } => ty::RETRY,
            Body::Welcome { .. } => ty::WELCOME,
            Body::OpenOk { .. } => ty::OPEN_OK,
            Body::OpenError { .. } => ty::OPEN_ERROR,
            Body::Data { .. } => ty::DATA,
            Body::VersionNegotiation { .. } => ty::VERSION_NEGOTIATION,
        }
    }
}

/// Bounds-checked big-endian reader over a datagram.
/// The fields of a Data body, the payload borrowed: one set of rules for
/// [`Packet::decode`] and [`DataView::parse`].
fn data_body<'a>(r: &mut Reader<'a>) -> Result<(u32, u64, &'a [u8]), DecodeError> {
    let transfer_id = r.u32()?;
    let offset = r.u64()?;
    let payload = r.rest();
    if payload.is_empty() {
        return Err(DecodeError::Malformed("empty data packet"));
    }
    if offset.checked_add(payload.len() as u64).is_none() {
        return Err(DecodeError::Malformed("data offset overflows"));
    }
    Ok((transfer_id, offset, payload))
}

/// A Data packet with its payload borrowed from the datagram: the receive
/// path's common case, decoded without copying or allocating (a copy per
/// datagram was a tenth of the client's CPU on a fast pull).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataView<'a> {
    pub connection_id: ConnectionId,
    pub packet_number: u64,
    pub transfer_id: u32,
    pub offset: u64,
    pub payload: &'a [u8],
}

impl<'a> DataView<'a> {
    /// `Some` when `buf` is a well-formed Data packet of this version;
    /// anything else is for [`Packet::decode`].
    pub fn parse(buf: &'a [u8]) -> Option<DataView<'a>> {
        if buf.len() < HEADER_LEN || buf[..2] != MAGIC || buf[2] != VERSION || buf[3] != ty::DATA {
            return None;
        }
        let mut r = Reader {
            buf: &buf[4..],
            pos: 0,
        };
        let connection_id = r.u64().ok()?;
        let packet_number = r.u64().ok()?;
        let (transfer_id, offset, payload) = data_body(&mut r).ok()?;
        Some(DataView {
            connection_id,
            packet_number,
            transfer_id,
            offset,
            payload,
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Malformed("length overflow"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Malformed("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn text(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        if len > MAX_TEXT_LEN {
            return Err(DecodeError::Malformed("text too long"));
        }
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Malformed("text not UTF-8"))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Body> {
        vec![
            Body::Hello {
                client_nonce: 7,
                cookie: vec![],
                wants_auth: false,
                early_open: None,
                max_datagram: None,
            },
            Body::Hello {
                client_nonce: u64::MAX,
                cookie: vec![1; 20],
                wants_auth: true,
                early_open: None,
                max_datagram: Some(16_000),
            },
            Body::Hello {
                client_nonce: 9,
                cookie: vec![2; 20],
                wants_auth: false,
                early_open: Some(OpenRequest {
                    transfer_id: 1,
                    kind: TransferKind::File,
                    offset: 1 << 33,
                    window: 1 << 20,
                    path: "sub/movie é.mkv".into(),
                }),
                max_datagram: Some(u16::MAX),
            },
            Body::Open(OpenRequest {
                transfer_id: 3,
                kind: TransferKind::File,
                offset: 1 << 40,
                window: 1 << 41,
                path: "dir/movie é.mp4".into(),
            }),
            Body::Open(OpenRequest {
                transfer_id: 0,
                kind: TransferKind::Catalog,
                offset: 0,
                window: 0,
                path: String::new(),
            }),
            Body::Ack {
                transfer_id: 9,
                window: 123456,
                received_up_to: 1000,
                ack_delay_micros: 250,
                ranges: vec![
                    AckRange {
                        largest: 100,
                        smallest: 90,
                    },
                    AckRange {
                        largest: 80,
                        smallest: 80,
                    },
                ],
            },
            Body::Ack {
                transfer_id: 9,
                window: 1,
                received_up_to: 0,
                ack_delay_micros: 0,
                ranges: vec![],
            },
            Body::Ping,
            Body::Pong,
            Body::Close {
                reason: CloseReason::ServerBusy,
                message: "too many sessions".into(),
            },
            Body::Retry {
                client_nonce: 5,
                cookie: vec![9; 20],
            },
            Body::Welcome {
                client_nonce: 5,
                idle_timeout_ms: 30_000,
                max_payload: 1420,
                server_random: [3; 16],
                auth_tag: None,
                early_open_accepted: true,
            },
            Body::Welcome {
                client_nonce: 5,
                idle_timeout_ms: 30_000,
                max_payload: 1404,
                server_random: [3; 16],
                auth_tag: Some([4; 16]),
                early_open_accepted: false,
            },
            Body::OpenOk {
                transfer_id: 2,
                size: 99,
                content_tag: 0xdead_beef,
                offset: 4,
                index: None,
            },
            Body::OpenOk {
                transfer_id: 3,
                size: 1 << 40,
                content_tag: 7,
                offset: 0,
                index: Some((1 << 40) - 5000..(1 << 40)),
            },
            Body::OpenError {
                transfer_id: 2,
                kind: OpenErrorKind::NotFound,
                message: "no such file: x".into(),
            },
            Body::Data {
                transfer_id: 2,
                offset: 4096,
                payload: vec![0xab; DEFAULT_MAX_PAYLOAD],
            },
            Body::VersionNegotiation { supported: vec![1] },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (i, body) in samples().into_iter().enumerate() {
            let p = Packet::new(0x1122_3344_5566_7788, i as u64 * 1000, body);
            let bytes = p.encode();
            assert!(bytes.len() <= MAX_DATAGRAM_SIZE, "{p:?} too large");
            assert_eq!(Packet::decode(&bytes), Ok(p));
        }
    }

    #[test]
    fn hello_is_padded_for_the_amplification_budget() {
        let p = Packet::new(
            0,
            0,
            Body::Hello {
                client_nonce: 1,
                cookie: vec![],
                wants_auth: false,
                early_open: None,
                max_datagram: None,
            },
        );
        assert_eq!(p.encode().len(), HELLO_PADDED_SIZE);
        const { assert!(HELLO_PADDED_SIZE >= MIN_HELLO_SIZE) };
    }

    #[test]
    fn other_version_is_reported() {
        let mut bytes = Packet::new(1, 1, Body::Ping).encode();
        for other in [1, VERSION + 1] {
            bytes[2] = other;
            assert_eq!(
                Packet::decode(&bytes),
                Err(DecodeError::UnsupportedVersion(other))
            );
        }
    }

    #[test]
    fn overlapping_ack_ranges_are_rejected() {
        let p = Packet::new(
            1,
            1,
            Body::Ack {
                transfer_id: 1,
                window: 0,
                received_up_to: 0,
                ack_delay_micros: 0,
                ranges: vec![
                    AckRange {
                        largest: 10,
                        smallest: 5,
                    },
                    AckRange {
                        largest: 6,
                        smallest: 1,
                    },
                ],
            },
        );
        assert!(matches!(
            Packet::decode(&p.encode()),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for body in samples() {
            let bytes = Packet::new(1, 2, body).encode();
            for cut in 0..bytes.len() {
                let _ = Packet::decode(&bytes[..cut]);
            }
        }
    }

    proptest! {
        #[test]
        fn random_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = Packet::decode(&bytes);
        }

        #[test]
        fn random_bodies_after_a_valid_header_never_panic(ty in any::<u8>(), rest in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = vec![b'U', b'V', VERSION, ty];
            bytes.extend_from_slice(&[0; 16]);
            bytes.extend_from_slice(&rest);
            if let Ok(p) = Packet::decode(&bytes) {
                // Whatever decodes must encode back to something that decodes the same.
                prop_assert_eq!(Packet::decode(&p.encode()), Ok(p));
            }
        }

        #[test]
        fn data_round_trips(tid in any::<u32>(), off in 0u64..(1 << 50), payload in proptest::collection::vec(any::<u8>(), 1..DEFAULT_MAX_PAYLOAD)) {
            let p = Packet::new(3, 4, Body::Data { transfer_id: tid, offset: off, payload: payload.clone() });
            let bytes = p.encode();
            prop_assert_eq!(Packet::decode(&bytes), Ok(p));
            // The borrowed view reads the same fields.
            prop_assert_eq!(
                DataView::parse(&bytes),
                Some(DataView { connection_id: 3, packet_number: 4, transfer_id: tid, offset: off, payload: &payload })
            );
        }

        /// The view accepts exactly the Data packets the full decoder
        /// accepts, whatever the bytes.
        #[test]
        fn data_view_agrees_with_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..64), ty_data in any::<bool>()) {
            let mut bytes = bytes;
            if bytes.len() >= 4 && ty_data {
                bytes[..4].copy_from_slice(&[b'U', b'V', VERSION, ty::DATA]);
            }
            let full = Packet::decode(&bytes).ok().filter(|p| matches!(p.body, Body::Data { .. }));
            prop_assert_eq!(DataView::parse(&bytes).is_some(), full.is_some());
        }
    }
}
