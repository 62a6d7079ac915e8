//! The serving thread's send batches: runs of datagrams to one address
//! that leave in one `sendmsg` (GSO), their file bytes sent from the
//! blocks they were read into (scatter-gather) rather than copied into
//! the batch.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use gstudpvid::protocol::server::SharedPayload;
use gstudpvid::protocol::wire::MAX_DATAGRAM_SIZE;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, info};

use crate::metrics::LoopCounters;

/// Largest GSO batch: what one UDP send can carry.
pub const GSO_BATCH_BYTES: usize = 65_000;

/// Where a datagram starts in a [`SendBatcher`]: in its bytes, in its
/// payloads, and in the datagrams' bytes as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    inline: usize,
    payloads: usize,
    total: usize,
}

/// Datagrams the endpoint queued, gathered into GSO batches: runs of
/// equal-size datagrams to one address (the last may be shorter) leave in
/// one `sendmsg`, which the kernel (or the NIC) cuts into datagrams. The
/// endpoint appends each datagram to `buf` itself, its file bytes to
/// `payloads` ([`gstudpvid::protocol::ServerEndpoint::poll_transmit_vectored`]);
/// one that cannot join the run before it starts the next batch.
pub struct SendBatcher {
    /// The datagrams' bytes but their shared payloads.
    pub buf: Vec<u8>,
    /// Payloads to insert into `buf`, in order.
    pub payloads: Vec<SharedPayload>,
    payload_bytes: usize,
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// A shorter datagram ended the run.
    closed: bool,
    /// Datagrams one send may carry: the socket's GSO limit, 1 once the
    /// path refused a GSO send.
    max_segments: usize,
}

impl SendBatcher {
    pub fn new(max_segments: usize) -> Self {
        SendBatcher {
            // Room for a full batch's headers and the datagram that does
            // not fit it.
            buf: Vec::with_capacity(GSO_BATCH_BYTES + MAX_DATAGRAM_SIZE),
            payloads: Vec::with_capacity(64),
            payload_bytes: 0,
            to: None,
            segment: 0,
            count: 0,
            closed: false,
            max_segments: max_segments.max(1),
        }
    }

    /// Where the next datagram starts.
    pub fn mark(&self) -> Mark {
        Mark {
            inline: self.buf.len(),
            payloads: self.payloads.len(),
            total: self.buf.len() + self.payload_bytes,
        }
    }

    /// Counts the datagram to `to` appended since `start` in, as the
    /// batch's next or, when it cannot join the batch before it, as the
    /// first of the next batch, after sending that one.
    pub async fn push(
        &mut self,
        start: Mark,
        to: SocketAddr,
        socket: &UdpSocket,
        counters: &LoopCounters,
    ) {
        self.payload_bytes += self.payloads[start.payloads..]
            .iter()
            .map(|p| p.bytes.len())
            .sum::<usize>();
        if start.total > 0 && !self.fits(start.total, to) {
            self.flush_before(start, socket, counters).await;
            self.take(0, to);
        } else {
            self.take(start.total, to);
        }
    }

    fn total(&self) -> usize {
        self.buf.len() + self.payload_bytes
    }

    /// Whether the datagram to `to` just appended at `start` can join the
    /// batch before it.
    fn fits(&self, start: usize, to: SocketAddr) -> bool {
        self.to == Some(to)
            && !self.closed
            && self.total() - start <= self.segment
            && self.count < self.max_segments
            && self.total() <= GSO_BATCH_BYTES
    }

    /// Counts the datagram at `start..` in, as the batch's next.
    fn take(&mut self, start: usize, to: SocketAddr) {
        let len = self.total() - start;
        if self.to.is_none() {
            self.to = Some(to);
            self.segment = len;
        }
        self.closed = len < self.segment;
        self.count += 1;
    }

    /// Sends the batch, all of it.
    pub async fn flush(&mut self, socket: &UdpSocket, counters: &LoopCounters) {
        let end = self.mark();
        self.flush_before(end, socket, counters).await;
    }

    /// Sends the datagrams before `end`; what follows (a datagram that did
    /// not fit) moves to the front, to start the next batch.
    async fn flush_before(&mut self, end: Mark, socket: &UdpSocket, counters: &LoopCounters) {
        if let Some(destination) = self.to.take() {
            counters
                .datagrams_sent
                .fetch_add(self.count as u64, Ordering::Relaxed);
            counters.sends.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes_sent
                .fetch_add(end.total as u64, Ordering::Relaxed);
            let segment = (self.count > 1).then_some(self.segment);
            let parts = gather(&self.buf[..end.inline], &self.payloads[..end.payloads]);
            let address = socket2::SockAddr::from(destination);
            let fd = socket.as_raw_fd();
            let sent = socket
                .async_io(Interest::WRITABLE, || {
                    send_segments(fd, &address, &parts, segment)
                })
                .await;
            match sent {
                Ok(()) => {}
                // Some paths (a NIC without checksum offload, some
                // tunnels) refuse GSO only when it is used.
                Err(e) if segment.is_some() && is_gso_refusal(&e) => {
                    info!(error = %e, "the network refused a GSO send; sending datagrams one by one");
                    self.max_segments = 1;
                    self.send_one_by_one(&parts, self.segment, &address, socket, counters)
                        .await;
                }
                // The same as losing the datagrams: recovery resends them.
                Err(e) => {
                    debug!(to = %destination, error = %e, datagrams = self.count, "send failed");
                }
            }
        }
        self.buf.drain(..end.inline);
        self.payloads.drain(..end.payloads);
        for p in &mut self.payloads {
            p.at -= end.inline;
        }
        self.payload_bytes = self.payloads.iter().map(|p| p.bytes.len()).sum();
        self.count = 0;
        self.closed = false;
    }

    /// The batch's datagrams, each in a send of its own.
    async fn send_one_by_one(
        &self,
        parts: &[IoSlice<'_>],
        segment: usize,
        address: &socket2::SockAddr,
        socket: &UdpSocket,
        counters: &LoopCounters,
    ) {
        let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let fd = socket.as_raw_fd();
        for datagram in whole.chunks(segment.max(1)) {
            let one = [IoSlice::new(datagram)];
            counters.sends.fetch_add(1, Ordering::Relaxed);
            let sent = socket
                .async_io(Interest::WRITABLE, || {
                    send_segments(fd, address, &one, None)
                })
                .await;
            if let Err(e) = sent {
                debug!(error = %e, "send failed");
            }
        }
    }
}

/// `inline` with each payload put in at its place, as slices to send.
fn gather<'a>(inline: &'a [u8], payloads: &'a [SharedPayload]) -> Vec<IoSlice<'a>> {
    let mut parts = Vec::with_capacity(2 * payloads.len() + 1);
    let mut at = 0;
    for p in payloads {
        if p.at > at {
            parts.push(IoSlice::new(&inline[at..p.at]));
        }
        parts.push(IoSlice::new(&p.bytes));
        at = p.at;
    }
    if inline.len() > at {
        parts.push(IoSlice::new(&inline[at..]));
    }
    parts
}

fn is_gso_refusal(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL))
}

/// One `sendmsg` of `parts` to `address`, cut into datagrams of `segment`
/// bytes by the kernel when given (`UDP_SEGMENT`).
fn send_segments(
    fd: RawFd,
    address: &socket2::SockAddr,
    parts: &[IoSlice<'_>],
    segment: Option<usize>,
) -> std::io::Result<()> {
    // A cmsghdr and its u16, aligned as the kernel reads them.
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = address.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = address.len();
    // `IoSlice` is ABI-compatible with `iovec` on Unix; sendmsg only
    // reads through the pointer.
    msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = parts.len() as _;
    if let Some(segment) = segment {
        let segment = u16::try_from(segment)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: `control` has room for one cmsghdr with a u16
        // (CMSG_SPACE(2) = 24 bytes on 64-bit Linux, 16 on 32-bit) and is
        // 8-byte aligned; CMSG_FIRSTHDR points into it once msg_control
        // and msg_controllen are set.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
            debug_assert!(space <= std::mem::size_of_val(&control));
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment);
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers (`parts`, `address`,
        // `control`) for the duration of the call.
        let n = unsafe { libc::sendmsg(fd, &msg, 0) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn payload(at: usize, bytes: &[u8]) -> SharedPayload {
        SharedPayload {
            at,
            bytes: Bytes::copy_from_slice(bytes),
        }
    }

    fn joined(parts: &[IoSlice<'_>]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.iter().copied()).collect()
    }

    #[test]
    fn payloads_are_gathered_in_place_between_the_other_bytes() {
        let inline = b"h1h2..c";
        let payloads = [payload(2, b"AAA"), payload(4, b"BB")];
        assert_eq!(joined(&gather(inline, &payloads)), b"h1AAAh2BB..c");
        // A payload last, and two in a row at one place.
        let payloads = [payload(7, b"Z"), payload(7, b"Y")];
        assert_eq!(joined(&gather(inline, &payloads)), b"h1h2..cZY");
        assert_eq!(joined(&gather(b"", &[])), b"");
    }

    #[tokio::test]
    async fn a_batch_sends_its_datagrams_whole_and_keeps_the_one_that_did_not_fit() {
        // One datagram a send, and GSO: the datagrams arrive the same.
        for max_segments in [1, 64] {
            let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            let to = peer.local_addr().expect("addr");
            let elsewhere = SocketAddr::from(([127, 0, 0, 1], 9));
            let counters = LoopCounters::default();
            let mut batch = SendBatcher::new(max_segments);
            let append = |batch: &mut SendBatcher, header: &[u8], body: &[u8]| {
                let start = batch.mark();
                batch.buf.extend_from_slice(header);
                batch.payloads.push(payload(batch.buf.len(), body));
                start
            };
            // Two of one size, a shorter one that ends the run, one more
            // that cannot join it and waits for the next batch.
            for (header, body) in [(&b"h0"[..], &b"payload-0"[..]), (b"h1", b"payload-1")] {
                let start = append(&mut batch, header, body);
                batch.push(start, to, &socket, &counters).await;
            }
            let start = append(&mut batch, b"h2", b"p2");
            batch.push(start, to, &socket, &counters).await;
            let start = append(&mut batch, b"h3", b"payload-3");
            batch.push(start, to, &socket, &counters).await;
            assert_eq!(
                (batch.buf.as_slice(), batch.payloads.len()),
                (&b"h3"[..], 1),
                "the last datagram waits, at the front"
            );
            assert_eq!(batch.payloads[0].at, 2);
            // A datagram to another address starts a batch of its own.
            let start = batch.mark();
            batch.buf.extend_from_slice(b"control");
            batch.push(start, elsewhere, &socket, &counters).await;
            batch.flush(&socket, &counters).await;
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            for _ in 0..4 {
                let n = peer.recv(&mut buf).expect("a datagram");
                got.push(buf[..n].to_vec());
            }
            assert_eq!(
                got,
                [&b"h0payload-0"[..], b"h1payload-1", b"h2p2", b"h3payload-3"]
            );
            assert!(batch.buf.is_empty() && batch.payloads.is_empty());
            assert_eq!(counters.datagrams_sent.load(Ordering::Relaxed), 5);
            // Gathered: the run of three, the one that waited, the other
            // address's; one by one, each its own.
            let sends = if max_segments == 1 { 5 } else { 3 };
            assert_eq!(counters.sends.load(Ordering::Relaxed), sends);
        }
    }
}
