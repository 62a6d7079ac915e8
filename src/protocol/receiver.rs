//! The receiving half: reassembly of a transfer's bytes in order
//! ([`StreamReceiver`], which also computes the receive window) and the
//! choice of when to acknowledge which packets ([`AckTracker`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::ranges::RangeSet;
use super::rtt::MAX_ACK_DELAY;
use super::wire::{AckRange, MAX_ACK_RANGES};

/// At a transfer's start (see [`ACK_DECIMATION_AFTER`]) acknowledge at
/// once after this many ack-eliciting packets (RFC 9000 §13.2.2's two),
/// and the rest within [`MAX_ACK_DELAY`] however long the path: each
/// round trip of the sender's startup waits for these ACKs. With every
/// fourth and the path's delay (10 ms at 80 ms), a `playbin` start
/// through 20 Mbit/s and 80 ms reached 100 % in 0.75-0.79 s; with two
/// and 5 ms, 0.69-0.73 (the server of 2 Dec, four starts each).
pub const ACK_ELICITING_THRESHOLD: u32 = 2;
/// Once a connection has received [`ACK_DECIMATION_AFTER`] packets, at
/// once after this many. Each ACK costs the sender a receive and a pass
/// through its recovery and congestion state, which was a quarter of a
/// server's CPU pacing 20 pulls; Chromium's QUIC has acknowledged every
/// tenth packet after the first hundred for years. A gap is still
/// acknowledged at once, and a window too small to reach the threshold
/// gets its ACK after the ACK delay, which the sender's window covers
/// (`bbr_ack_feedback_delay`).
pub const DECIMATED_ACK_THRESHOLD: u32 = 8;
/// Packets a transfer receives before they are acknowledged every
/// [`DECIMATED_ACK_THRESHOLD`]th: the start of a stream or of a seek (the
/// sender's startup, its first resends of a hole) keeps the faster
/// feedback. Decimating from the first packet of a seek made the slowest
/// of twelve seeks at 10 % loss 1.81x the clean time (1.68x before).
pub const ACK_DECIMATION_AFTER: u64 = 100;

/// Bytes per reassembly block: the element's buffer size, so a pull that
/// reads on from where it is takes whole blocks.
pub const REASSEMBLY_BLOCK: usize = 64 * 1024;

/// One block of the file's bytes, at a multiple of [`REASSEMBLY_BLOCK`].
#[derive(Debug, Default)]
enum Block {
    /// Nothing of it arrived yet.
    #[default]
    Empty,
    /// Arriving.
    Filling(Vec<u8>),
    /// Everything from the read offset to its end arrived, and reads share
    /// it instead of copying it; nothing more is written to it.
    Shared(Bytes),
}

/// Where a transfer's bytes wait to be read: each byte at its place in the
/// block of its file offset. One copy in and none out for a block that
/// arrived whole by the time it is read: the reader takes it as shared
/// bytes, which become the pipeline's buffer as they are (the copy out of
/// one ring into a fresh buffer per read was 12 % of the element's CPU on
/// a loopback pull). A block read while still arriving is copied, as
/// before. No allocation per datagram (a `Vec` per datagram in a `BTreeMap`
/// cost the client a fifth of its CPU on a fast pull: allocation, copies
/// and tree upkeep).
#[derive(Debug, Default)]
struct ReassemblyRing {
    /// `blocks[i]` holds the bytes of block `first + i`.
    blocks: VecDeque<Block>,
    first: u64,
    pool: BlockPool,
}

/// Blocks most kept for reuse: a megabyte.
const POOLED_BLOCKS: usize = 16;

/// Blocks the pipeline is done with, for the next ones to arrive. A block
/// freed by the streaming thread and allocated anew by the receiving one
/// went back to the kernel and came back as fresh pages: twice the page
/// faults of the copying ring, on the pull's busiest thread.
#[derive(Debug, Default)]
struct BlockPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BlockPool {
    fn take(&self) -> Vec<u8> {
        lock_pool(&self.0)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(REASSEMBLY_BLOCK))
    }

    /// Shares `buf`; it comes back here when the last reader lets go.
    fn share(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(PooledBlock {
            buf,
            pool: Arc::downgrade(&self.0),
        })
    }

    fn give_back(pool: &Mutex<Vec<Vec<u8>>>, mut buf: Vec<u8>) {
        let mut blocks = lock_pool(pool);
        if blocks.len() < POOLED_BLOCKS && buf.capacity() == REASSEMBLY_BLOCK {
            buf.clear();
            blocks.push(buf);
        }
    }
}

fn lock_pool(pool: &Mutex<Vec<Vec<u8>>>) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// A shared block, which goes back to its pool when dropped.
struct PooledBlock {
    buf: Vec<u8>,
    pool: Weak<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for PooledBlock {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBlock {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            BlockPool::give_back(&pool, std::mem::take(&mut self.buf));
        }
    }
}

/// Writes `data` at `at` in a block whose length is how far into it bytes
/// were written. Bytes mostly arrive in order, so they are appended, and
/// only a gap (which a later datagram fills) is zeroed: zeroing each block
/// when it was allocated cost as much as the copy into it, on the thread
/// that also receives.
fn fill(buf: &mut Vec<u8>, at: usize, data: &[u8]) {
    if at > buf.len() {
        buf.resize(at, 0);
    }
    let overlap = data.len().min(buf.len() - at);
    buf[at..at + overlap].copy_from_slice(&data[..overlap]);
    buf.extend_from_slice(&data[overlap..]);
}

fn block_of(offset: u64) -> u64 {
    offset / REASSEMBLY_BLOCK as u64
}

fn within_block(offset: u64) -> usize {
    (offset % REASSEMBLY_BLOCK as u64) as usize
}

impl ReassemblyRing {
    /// Stores `data` at `offset`, at or past the reader's block. A shared
    /// block is complete, so nothing of `data` falls into one (the caller
    /// writes only bytes that had not arrived).
    fn write(&mut self, mut offset: u64, mut data: &[u8]) {
        if self.blocks.is_empty() {
            self.first = block_of(offset);
        }
        while !data.is_empty() {
            let block = block_of(offset);
            let at = within_block(offset);
            let n = data.len().min(REASSEMBLY_BLOCK - at);
            // The first bytes to arrive may lie blocks ahead of the
            // reader's (the caller clips any behind the reader).
            while block < self.first {
                self.blocks.push_front(Block::Empty);
                self.first -= 1;
            }
            let index = (block - self.first) as usize;
            if index >= self.blocks.len() {
                self.blocks.resize_with(index + 1, Block::default);
            }
            let slot = &mut self.blocks[index];
            if matches!(slot, Block::Empty) {
                *slot = Block::Filling(self.pool.take());
            }
            match slot {
                Block::Filling(buf) => fill(buf, at, &data[..n]),
                _ => debug_assert!(false, "write at {offset} into a shared block"),
            }
            offset += n as u64;
            data = &data[n..];
        }
    }

    /// The `len` bytes at `offset`, which must lie within one block and
    /// have arrived. `rest_arrived`: every byte from `offset` to the end of
    /// its block (or of the file) is here, so the block is shared rather
    /// than copied from.
    fn take(&mut self, offset: u64, len: usize, rest_arrived: bool) -> Bytes {
        let at = within_block(offset);
        let Some(slot) = block_of(offset)
            .checked_sub(self.first)
            .and_then(|i| self.blocks.get_mut(i as usize))
        else {
            return Bytes::new();
        };
        if rest_arrived {
            if let Block::Filling(buf) = slot {
                *slot = Block::Shared(self.pool.share(std::mem::take(buf)));
            }
        }
        // Bytes that arrived were written, so the block holds them.
        match slot {
            Block::Shared(b) if at + len <= b.len() => b.slice(at..at + len),
            Block::Filling(buf) if at + len <= buf.len() => {
                Bytes::copy_from_slice(&buf[at..at + len])
            }
            _ => {
                debug_assert!(false, "read of {len} at {offset} beyond what was written");
                Bytes::new()
            }
        }
    }

    /// Lets go of the blocks wholly below `offset`: read.
    fn release_below(&mut self, offset: u64) {
        let keep_from = block_of(offset);
        while self.first < keep_from {
            let Some(block) = self.blocks.pop_front() else {
                break;
            };
            if let Block::Filling(buf) = block {
                BlockPool::give_back(&self.pool.0, buf);
            }
            self.first += 1;
        }
        if self.blocks.is_empty() {
            self.first = keep_from;
        }
    }
}

/// Reassembles one transfer's bytes and hands them out in order.
///
/// Memory is bounded by the window: bytes beyond the highest window ever
/// advertised are dropped, so a misbehaving sender cannot grow the buffer.
#[derive(Debug)]
pub struct StreamReceiver {
    start: u64,
    read_offset: u64,
    end: Option<u64>,
    /// The bytes of `received`, not yet read.
    ring: ReassemblyRing,
    received: RangeSet,
    read_ahead: u64,
    advertised: u64,
    buffered: u64,
}

impl StreamReceiver {
    pub fn new(start: u64, read_ahead: u64) -> Self {
        StreamReceiver {
            start,
            read_offset: start,
            end: None,
            ring: ReassemblyRing::default(),
            received: RangeSet::new(),
            read_ahead,
            advertised: start + read_ahead,
            buffered: 0,
        }
    }

    /// The file size, once the server told it.
    pub fn set_end(&mut self, end: u64) {
        self.end = Some(end);
    }

    pub fn end(&self) -> Option<u64> {
        self.end
    }

    pub fn set_read_ahead(&mut self, read_ahead: u64) {
        self.read_ahead = read_ahead;
    }

    pub fn read_ahead(&self) -> u64 {
        self.read_ahead
    }

    /// Next offset `read` returns.
    pub fn read_offset(&self) -> u64 {
        self.read_offset
    }

    /// Highest offset (exclusive) the sender may send: what was consumed
    /// plus the read-ahead. Never moves back, so a sender holding an older
    /// value is never pushed past a newer one.
    pub fn window(&self) -> u64 {
        let w = self.read_offset.saturating_add(self.read_ahead);
        let w = self.end.map_or(w, |e| w.min(e));
        w.max(self.advertised)
    }

    /// Records that `window` was sent to the peer.
    pub fn mark_advertised(&mut self, window: u64) {
        self.advertised = self.advertised.max(window);
    }

    pub fn advertised(&self) -> u64 {
        self.advertised
    }

    /// Stores a segment. Returns how many of its bytes were new.
    pub fn insert(&mut self, offset: u64, data: &[u8]) -> u64 {
        let Some(data_end) = offset.checked_add(data.len() as u64) else {
            return 0;
        };
        let mut limit = self.advertised.max(self.window());
        if let Some(e) = self.end {
            limit = limit.min(e);
        }
        let lo = offset.max(self.read_offset);
        let hi = data_end.min(limit);
        if lo >= hi {
            return 0;
        }
        let mut new_bytes = 0;
        let mut pos = lo;
        while pos < hi {
            // In order (or after a gap), nothing from `pos` on has arrived:
            // the rest is one gap, found without the two searches below.
            let past_all = self.received.last().is_none_or(|last| last.end <= pos);
            let gap_end = if past_all {
                hi
            } else {
                let have_end = self.received.contiguous_end(pos);
                if have_end > pos {
                    pos = have_end;
                    continue;
                }
                self.received
                    .next_start_after(pos)
                    .map_or(hi, |s| s.min(hi))
            };
            let slice = &data[(pos - offset) as usize..(gap_end - offset) as usize];
            self.ring.write(pos, slice);
            self.received.insert(pos..gap_end);
            self.buffered += gap_end - pos;
            new_bytes += gap_end - pos;
            pos = gap_end;
        }
        new_bytes
    }

    /// Contiguous bytes ready at the read offset.
    pub fn available(&self) -> u64 {
        self.received_up_to() - self.read_offset
    }

    /// Bytes held, in order or not.
    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// Every byte below this offset (from the transfer's start) arrived.
    pub fn received_up_to(&self) -> u64 {
        // `received` holds nothing below the read offset (inserts start at
        // it, reads remove what they take), so only its first range can
        // reach the read offset: no search. Asked twice per datagram, the
        // search was 11 % of a loopback pull's receiving thread.
        match self.received.first() {
            Some(r) if r.start <= self.read_offset => r.end.max(self.read_offset),
            _ => self.read_offset,
        }
    }

    /// Everything up to the window the sender was told of is here: it
    /// waits for our next window update before it sends more.
    pub fn window_used_up(&self) -> bool {
        self.received_up_to() >= self.advertised
    }

    /// The sender has sent up to the window it was told of: whatever it
    /// sends next is a resend of a hole or waits for our next window
    /// update. (Unlike [`Self::window_used_up`], holes may remain.)
    pub fn sender_reached_window(&self) -> bool {
        self.highest_received() >= self.advertised
    }

    /// Highest offset received so far.
    pub fn highest_received(&self) -> u64 {
        self.received.last().map_or(self.read_offset, |r| r.end)
    }

    /// Takes up to `max` bytes at the read offset: what is contiguous
    /// there, up to the end of its block (see [`REASSEMBLY_BLOCK`]).
    pub fn read(&mut self, max: usize) -> Option<Bytes> {
        let block_end = (block_of(self.read_offset) + 1) * REASSEMBLY_BLOCK as u64;
        let arrived_to = self.received_up_to();
        let n = (arrived_to - self.read_offset)
            .min(max as u64)
            .min(block_end - self.read_offset) as usize;
        if n == 0 {
            return None;
        }
        let rest_arrived = arrived_to >= self.end.map_or(block_end, |e| e.min(block_end));
        let seg = self.ring.take(self.read_offset, n, rest_arrived);
        let n = n as u64;
        // `received` keeps only what is ahead of the reader, so it stays small.
        self.received.remove(self.start..self.read_offset + n);
        self.read_offset += n;
        self.buffered -= n;
        self.ring.release_below(self.read_offset);
        Some(seg)
    }

    /// Everything up to the end was read.
    pub fn is_finished(&self) -> bool {
        self.end.is_some_and(|e| self.read_offset >= e)
    }

    /// Everything up to the end arrived (it may not be read yet).
    pub fn is_fully_received(&self) -> bool {
        self.end.is_some_and(|e| self.received_up_to() >= e)
    }
}

/// Which packet numbers arrived and when an ACK is due.
#[derive(Debug, Default)]
pub struct AckTracker {
    received: RangeSet,
    largest: Option<(u64, Instant)>,
    unacked_eliciting: u32,
    /// Ack-eliciting packets received since the transfer began, duplicates
    /// aside.
    eliciting_received: u64,
    ack_deadline: Option<Instant>,
    duplicates: u64,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an ack-eliciting packet, whose ACK may wait up to
    /// `max_delay` for more (the path's ACK delay,
    /// [`super::rtt::RttEstimator::ack_delay`]). Returns false for a
    /// duplicate.
    pub fn on_packet(&mut self, now: Instant, pn: u64, max_delay: Duration) -> bool {
        if self.received.contains(pn) {
            self.duplicates += 1;
            // The sender may have missed our ACK: acknowledge again soon.
            self.ack_deadline = Some(now);
            return false;
        }
        let out_of_order = self.largest.is_some_and(|(l, _)| pn < l || pn > l + 1);
        self.received.insert(pn..pn + 1);
        if self.largest.is_none_or(|(l, _)| pn > l) {
            self.largest = Some((pn, now));
        }
        // Keep the tracker bounded: older ranges are covered by the byte
        // offset in every ACK.
        while self.received.len() > MAX_ACK_RANGES * 2 {
            self.received.pop_first();
        }
        self.unacked_eliciting += 1;
        self.eliciting_received += 1;
        let (threshold, max_delay) = if self.eliciting_received > ACK_DECIMATION_AFTER {
            (DECIMATED_ACK_THRESHOLD, max_delay)
        } else {
            (ACK_ELICITING_THRESHOLD, max_delay.min(MAX_ACK_DELAY))
        };
        // Reordering or a gap means loss may be happening: tell the sender now.
        let deadline = if out_of_order || self.unacked_eliciting >= threshold {
            now
        } else {
            now + max_delay
        };
        self.ack_deadline = Some(self.ack_deadline.map_or(deadline, |d| d.min(deadline)));
        true
    }

    /// A new transfer (a seek) is acknowledged as often as a new stream.
    pub fn on_new_transfer(&mut self) {
        self.eliciting_received = 0;
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    pub fn ack_deadline(&self) -> Option<Instant> {
        self.ack_deadline
    }

    /// Makes the ACK of packets not yet acknowledged due at once, if there
    /// are any.
    pub fn hurry(&mut self, now: Instant) {
        if self.unacked_eliciting > 0 {
            self.ack_deadline = Some(now);
        }
    }

    /// Asks for an ACK at once (e.g. to carry a window update).
    pub fn request_immediate(&mut self, now: Instant) {
        self.ack_deadline = Some(now);
    }

    /// Ranges for an ACK frame and the delay since the largest arrived;
    /// clears the deadline.
    pub fn build(&mut self, now: Instant) -> (Vec<AckRange>, Duration) {
        self.ack_deadline = None;
        self.unacked_eliciting = 0;
        let ranges = self
            .received
            .iter_descending()
            .take(MAX_ACK_RANGES)
            .map(|r| AckRange {
                largest: r.end - 1,
                smallest: r.start,
            })
            .collect();
        let delay = self
            .largest
            .map_or(Duration::ZERO, |(_, t)| now.saturating_duration_since(t));
        (ranges, delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::rtt::MAX_ACK_DELAY;

    #[test]
    fn reassembles_out_of_order_and_duplicates() {
        let mut r = StreamReceiver::new(10, 100);
        r.set_end(40);
        assert_eq!(r.insert(20, &[2; 10]), 10);
        assert_eq!(r.available(), 0);
        assert_eq!(r.insert(15, &[1; 10]), 5); // overlaps 20..25
        assert_eq!(r.insert(10, &[0; 5]), 5);
        assert_eq!(r.insert(10, &[0; 5]), 0);
        assert_eq!(r.available(), 20);
        let mut got = Vec::new();
        while let Some(chunk) = r.read(7) {
            got.extend_from_slice(&chunk);
        }
        let mut want = vec![0; 5];
        want.extend([1; 5]);
        want.extend([2; 10]);
        assert_eq!(got, want);
        assert_eq!(r.read_offset(), 30);
        assert_eq!(r.insert(30, &[3; 50]), 10); // clipped at end
        assert!(r.is_fully_received());
        assert_eq!(r.read(100).map(|v| v.len()), Some(10));
        assert!(r.is_finished());
    }

    proptest::proptest! {
        /// Segments in any order, overlapping and repeated, read in any
        /// sizes while the window grows (the ring wraps and grows): the
        /// bytes read are the stream's.
        #[test]
        fn reassembly_returns_the_stream_whatever_the_arrival_order(
            seed in 0u64..10_000,
            window in 1_000u64..300_000,
        ) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let len = 400_000u64;
            let stream: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut r = StreamReceiver::new(0, window);
            r.set_end(len);
            let mut out = Vec::new();
            let mut steps = 0;
            while out.len() < len as usize {
                steps += 1;
                proptest::prop_assert!(steps < 1_000_000, "no progress");
                // A segment somewhere in the window, sometimes past it or
                // partly before the read offset (a late repeat).
                let ahead = r.window() - r.read_offset() + 2_000;
                let at = (r.read_offset() + rng.gen_range(0..ahead)).saturating_sub(rng.gen_range(0..2_000));
                let at = at.min(len - 1);
                let n = rng.gen_range(1..3_000).min(len - at);
                r.insert(at, &stream[at as usize..(at + n) as usize]);
                if rng.gen_bool(0.3) {
                    if let Some(chunk) = r.read(rng.gen_range(1..100_000)) {
                        out.extend_from_slice(&chunk);
                    }
                    r.mark_advertised(r.window());
                }
                if rng.gen_bool(0.01) {
                    r.set_read_ahead(rng.gen_range(1_000..600_000));
                }
                // The shortcut's premise: nothing held below the read offset.
                proptest::prop_assert_eq!(
                    r.received_up_to(),
                    r.received.contiguous_end(r.read_offset()).max(r.read_offset())
                );
                proptest::prop_assert!(r.received.first().is_none_or(|f| f.end > r.read_offset()));
            }
            proptest::prop_assert!(out == stream);
        }
    }

    #[test]
    fn a_block_that_arrived_whole_is_shared_and_one_still_arriving_is_copied() {
        let block = REASSEMBLY_BLOCK as u64;
        let stream: Vec<u8> = (0..3 * block).map(|i| (i * 7 % 251) as u8).collect();
        let at = |from: u64, to: u64| &stream[from as usize..to as usize];
        // A transfer from the middle of block 1 (a seek) whose first bytes
        // to arrive are in block 2, ahead of the reader's block.
        let start = block + 1000;
        let mut r = StreamReceiver::new(start, 4 * block);
        r.set_end(3 * block);
        r.insert(2 * block + 5, at(2 * block + 5, 2 * block + 9000));
        for pos in (start..2 * block).step_by(1400) {
            r.insert(pos, at(pos, (pos + 1400).min(2 * block)));
        }
        // Block 1 arrived from the read offset to its end: reads share it,
        // and stop at its end.
        let a = r.read(4096).expect("bytes");
        let b = r.read(usize::MAX).expect("bytes");
        assert_eq!(&a[..], at(start, start + 4096));
        assert_eq!(&b[..], at(start + 4096, 2 * block));
        assert_eq!(b.as_ptr(), a[4096..].as_ptr(), "the second read copied");
        // Block 2 has a hole at its start: what is there is copied out, and
        // the bytes still to come land in the block all the same.
        r.insert(2 * block, at(2 * block, 2 * block + 5));
        let c = r.read(usize::MAX).expect("bytes");
        assert_eq!(&c[..], at(2 * block, 2 * block + 9000));
        r.insert(2 * block + 9000, at(2 * block + 9000, 3 * block));
        let d = r.read(usize::MAX).expect("bytes");
        let e = r.read(usize::MAX);
        assert_eq!(&d[..], at(2 * block + 9000, 3 * block));
        assert!(e.is_none() && r.is_finished());
    }

    #[test]
    fn a_shared_block_the_pipeline_let_go_of_holds_the_next_one() {
        let block = REASSEMBLY_BLOCK as u64;
        let mut r = StreamReceiver::new(0, 4 * block);
        r.set_end(2 * block);
        r.insert(0, &vec![1; REASSEMBLY_BLOCK]);
        let first = r.read(usize::MAX).expect("block 0");
        let memory = first.as_ptr();
        drop(first);
        r.insert(block, &vec![2; REASSEMBLY_BLOCK]);
        let second = r.read(usize::MAX).expect("block 1");
        assert_eq!(
            second.as_ptr(),
            memory,
            "block 1 did not reuse block 0's memory"
        );
        assert!(second.iter().all(|&b| b == 2));
    }

    #[test]
    fn window_follows_consumption_and_drops_data_beyond_it() {
        let mut r = StreamReceiver::new(0, 100);
        assert_eq!(r.window(), 100);
        assert_eq!(r.insert(90, &[0; 50]), 10);
        assert_eq!(r.insert(0, &[0; 50]), 50);
        r.read(50);
        assert_eq!(r.window(), 150);
        r.mark_advertised(150);
        r.set_read_ahead(10);
        // Shrinking the read-ahead never pulls back an advertised window.
        assert_eq!(r.window(), 150);
    }

    #[test]
    fn acks_every_second_packet_and_on_reorder() {
        let t = Instant::now();
        let mut a = AckTracker::new();
        for pn in 1..ACK_ELICITING_THRESHOLD as u64 {
            a.on_packet(t, pn, MAX_ACK_DELAY);
            assert_eq!(a.ack_deadline(), Some(t + MAX_ACK_DELAY));
        }
        a.on_packet(t, 2, MAX_ACK_DELAY);
        assert_eq!(a.ack_deadline(), Some(t));
        let (ranges, _) = a.build(t);
        assert_eq!(
            ranges,
            vec![AckRange {
                largest: 2,
                smallest: 1
            }]
        );
        a.on_packet(t, 3, MAX_ACK_DELAY);
        a.on_packet(t, 4, MAX_ACK_DELAY);
        a.build(t);
        // 5 and 6 are missing: a gap is acknowledged at once.
        a.on_packet(t, 7, MAX_ACK_DELAY);
        assert_eq!(a.ack_deadline(), Some(t));
        let (ranges, _) = a.build(t);
        assert_eq!(ranges.len(), 2);
        assert!(!a.on_packet(t, 7, MAX_ACK_DELAY));
        assert_eq!(a.duplicates(), 1);
    }

    #[test]
    fn after_a_hundred_packets_every_eighth_is_acked_until_a_seek() {
        let t = Instant::now();
        let mut a = AckTracker::new();
        // The packets whose arrival made an ACK due at once.
        let acked_at = |a: &mut AckTracker, pns: std::ops::Range<u64>| {
            pns.filter(|&pn| {
                a.on_packet(t, pn, MAX_ACK_DELAY);
                let due = a.ack_deadline() == Some(t);
                if due {
                    a.build(t);
                }
                due
            })
            .collect::<Vec<u64>>()
        };
        // Every second up to the hundredth, then every eighth.
        let expected: Vec<u64> = (2..=100).step_by(2).chain((108..141).step_by(8)).collect();
        assert_eq!(acked_at(&mut a, 1..141), expected);
        // A new transfer starts over at two.
        a.on_new_transfer();
        assert_eq!(acked_at(&mut a, 141..147), vec![142, 144, 146]);
        // A gap is still acknowledged at once.
        for pn in 151..260 {
            a.on_packet(t, pn, MAX_ACK_DELAY);
            a.build(t);
        }
        a.on_packet(t, 262, MAX_ACK_DELAY);
        assert_eq!(a.ack_deadline(), Some(t));
    }

    #[test]
    fn a_long_path_s_ack_waits_longer_and_hurry_sends_only_what_is_owed() {
        let t = Instant::now();
        let mut a = AckTracker::new();
        // At the start the ACK waits no longer than on a short path...
        a.on_packet(t, 1, Duration::from_millis(10));
        assert_eq!(a.ack_deadline(), Some(t + MAX_ACK_DELAY));
        a.on_packet(t, 2, Duration::from_millis(10));
        a.build(t);
        // ...and once the transfer is past it, the path's longer delay.
        for pn in 3..=ACK_DECIMATION_AFTER + 1 {
            a.on_packet(t, pn, Duration::from_millis(10));
            a.build(t);
        }
        a.on_packet(t, ACK_DECIMATION_AFTER + 2, Duration::from_millis(10));
        assert_eq!(a.ack_deadline(), Some(t + Duration::from_millis(10)));
        // After a coalesced look the driver hurries the ACK it owes.
        let later = t + Duration::from_millis(9);
        a.hurry(later);
        assert_eq!(a.ack_deadline(), Some(later));
        a.build(later);
        // With nothing unacknowledged, hurrying sends no empty ACK.
        a.hurry(later);
        assert_eq!(a.ack_deadline(), None);
    }
}
