//! A transfer's file read a block at a time for the datagrams that take
//! it, and the pool of block buffers the server's sessions share.
//!
//! Payloads leave as slices of their block ([`Bytes`]): a driver that
//! sends with scatter-gather I/O sends them from the block itself
//! ([`super::ServerEndpoint::poll_transmit_vectored`]), so a payload is
//! copied once on its way out of the server (page cache to block) instead
//! of twice (and block to send batch), the second copy having been 6-7 %
//! of a server's CPU on a loopback pull and with 20 paced pulls.

use bytes::{Bytes, BytesMut};

use super::server::Content;

/// Bytes read from a file in one go for the datagrams that follow.
pub const READ_BLOCK_BYTES: usize = 64 * 1024;
/// Bytes read in one go for resends and index sent ahead: a few datagrams,
/// so a lone resend costs little more than its own bytes.
pub const RESEND_BLOCK_BYTES: usize = 8 * 1024;

/// Reads a transfer's file a block at a time: new data leaves in file
/// order, so one read serves the next ~45 datagrams instead of one read
/// each (the per-datagram read was a third of the server's system calls).
/// Resends and index sent ahead that the block does not hold leave it
/// alone: the block stays with new data. (It once followed the first read,
/// which for a file whose index is at its end is the index: every datagram
/// of the file after it was read on its own.) They come from a small block
/// of their own instead: on a lossy path each resend in a transfer's first
/// MiB leaves two or three times in a row (`StreamSender::set_resend_twice`),
/// a queue that overflows drops runs of datagrams, and the index sent ahead
/// goes out datagram after datagram, and each of those was a read of its
/// own (796 of the 916 reads in the first 4 s of a pull through a 20 Mbit/s
/// proxy whose queue startup overflowed, every offset read twice). Costs
/// [`READ_BLOCK_BYTES`] and [`RESEND_BLOCK_BYTES`] per session with a
/// transfer.
///
/// Content that is not all there yet (object storage fetching it) is kept
/// as far as it came, and the rest is read on the next try: a datagram
/// that spans two storage blocks never needs both in the cache at the
/// same moment, which a small cache shared by many sessions could not
/// promise.
#[derive(Default)]
pub(crate) struct BlockReader {
    new_data: Block,
    scattered: Block,
}

/// Part of a file, read ahead of the datagrams that take it.
#[derive(Default)]
struct Block {
    start: u64,
    /// The block's buffer, shared with the payloads cut from it until they
    /// are sent. Refilled in place when they are gone (a fresh zeroed
    /// buffer per refill was 3 % of a loaded server's CPU), else swapped
    /// for one from the [`BlockPool`].
    buf: Bytes,
    /// Bytes of `buf` that hold the file from `start`.
    len: usize,
    /// `buf` is the content's shared block ([`Content::shared_block`]),
    /// not the session's: it never goes to the pool.
    shared: bool,
}

/// Where a read falls in a transfer's sending order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadOrder {
    /// New data, which follows the new data before it.
    Sequential,
    /// A resend or index sent ahead.
    Scattered,
}

impl BlockReader {
    /// The `len` bytes from `offset` (fewer only at the end of the file),
    /// as a slice of the block that holds them, read into it first if need
    /// be.
    pub(crate) fn slice(
        &mut self,
        pool: &mut BlockPool,
        content: &dyn Content,
        offset: u64,
        len: usize,
        order: ReadOrder,
    ) -> std::io::Result<Bytes> {
        if order == ReadOrder::Sequential && !self.new_data.holds(offset, len, content.size()) {
            if let Some(payload) = self.new_data.share(pool, content, offset, len) {
                return Ok(payload);
            }
        }
        let (block, size) = match order {
            ReadOrder::Scattered if !self.new_data.holds(offset, len, content.size()) => {
                (&mut self.scattered, RESEND_BLOCK_BYTES)
            }
            _ => (&mut self.new_data, READ_BLOCK_BYTES),
        };
        let (from, n) = block.locate(pool, content, offset, len, size)?;
        Ok(block.buf.slice(from..from + n))
    }

    /// Gives the blocks' buffers to the pool (a paused session's); the
    /// next read fills new ones.
    pub(crate) fn release(&mut self, pool: &mut BlockPool) {
        let blocks = std::mem::take(self);
        blocks.new_data.retire(pool);
        blocks.scattered.retire(pool);
    }

    #[cfg(test)]
    fn is_released(&self) -> bool {
        self.new_data.buf.is_empty() && self.scattered.buf.is_empty()
    }
}

impl Block {
    /// Gives the buffer to the pool, unless it is shared.
    fn retire(self, pool: &mut BlockPool) {
        if !self.shared {
            pool.retire(self.buf);
        }
    }

    /// The `len` bytes from `offset` from the content's shared blocks,
    /// the block becoming the one that holds the last of them; `None` if
    /// the content shares none there. A payload that spans two blocks is
    /// put together from both (one in ~45 of a bulk transfer's).
    fn share(
        &mut self,
        pool: &mut BlockPool,
        content: &dyn Content,
        offset: u64,
        len: usize,
    ) -> Option<Bytes> {
        let size = content.size();
        let block_bytes = READ_BLOCK_BYTES as u64;
        let start = offset - offset % block_bytes;
        let first = content.shared_block(start)?;
        let first_end = start + first.len() as u64;
        let from = (offset - start) as usize;
        if offset >= first_end && first_end < size {
            return None;
        }
        if offset + len as u64 <= first_end || first_end >= size {
            let from = from.min(first.len());
            let payload = first.slice(from..from + len.min(first.len() - from));
            self.replace(pool, start, first);
            return Some(payload);
        }
        let second = content.shared_block(first_end)?;
        let rest = (len - (first.len() - from)).min(second.len());
        let mut stitched = Vec::with_capacity(first.len() - from + rest);
        stitched.extend_from_slice(&first[from..]);
        stitched.extend_from_slice(&second[..rest]);
        self.replace(pool, first_end, second);
        Some(Bytes::from(stitched))
    }

    /// Makes the shared `buf` from `start` this block.
    fn replace(&mut self, pool: &mut BlockPool, start: u64, buf: Bytes) {
        let old = std::mem::replace(
            self,
            Block {
                start,
                len: buf.len(),
                buf,
                shared: true,
            },
        );
        old.retire(pool);
    }

    /// The block has the `len` bytes from `offset`, or all of them up to
    /// the end of a file of `size` bytes: a block that reaches the end of
    /// the file serves every later read.
    fn holds(&self, offset: u64, len: usize, size: u64) -> bool {
        let block_end = self.start + self.len as u64;
        offset >= self.start
            && offset <= block_end
            && (offset + len as u64 <= block_end || (self.len > 0 && block_end >= size))
    }

    /// Where in the block the `len` bytes from `offset` are (or those up
    /// to the end of the file): returns where they start in `buf` and how
    /// many there are, reading them into it (`size` bytes at a time) if it
    /// does not hold them. A read behind the block or past its end starts
    /// it again there rather than leave it a read per datagram.
    fn locate(
        &mut self,
        pool: &mut BlockPool,
        content: &dyn Content,
        offset: u64,
        len: usize,
        size: usize,
    ) -> std::io::Result<(usize, usize)> {
        if offset < self.start || offset > self.start + self.len as u64 {
            self.start = offset;
            self.len = 0;
        }
        if !self.holds(offset, len, content.size()) {
            // Keep what is already here from `offset` on; read the rest.
            let keep_from = (offset - self.start) as usize;
            let keep = self.len - keep_from;
            let size = size.max(len);
            let was_shared = std::mem::take(&mut self.shared);
            let mut buf = match std::mem::take(&mut self.buf).try_into_mut() {
                Ok(mut own) => {
                    own.copy_within(keep_from..self.len, 0);
                    own
                }
                // Payloads of it still wait to be sent, it is the
                // content's shared block, or the empty buffer of a block
                // never read.
                Err(held) => {
                    let mut fresh = pool.take(size);
                    fresh[..keep].copy_from_slice(&held[keep_from..self.len]);
                    if !was_shared {
                        pool.retire(held);
                    }
                    fresh
                }
            };
            if buf.len() < size {
                buf.resize(size, 0);
            }
            self.start = offset;
            let read = read_full(content, offset + keep as u64, &mut buf[keep..]);
            self.buf = buf.freeze();
            let (n, would_block) = match read {
                Ok(r) => r,
                Err(e) => {
                    self.len = keep;
                    return Err(e);
                }
            };
            self.len = keep + n;
            if would_block && self.len < len {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
        }
        let from = (offset - self.start) as usize;
        Ok((from, len.min(self.len.saturating_sub(from))))
    }
}

/// Block buffers between uses, shared by an endpoint's sessions. A buffer
/// whose payloads still wait in a send batch when its block is refilled
/// is retired here and taken again, by any session, once the batch has
/// left: a bulk pull refills its block every ~46 datagrams, a send batch
/// holds up to ~45, so most refills would otherwise allocate and zero a
/// new buffer. Holds at most [`POOLED_BUFFERS`] of each kind; more are
/// dropped (freed when their last payload is sent).
#[derive(Default)]
pub(crate) struct BlockPool {
    retired: Vec<Bytes>,
    free: Vec<BytesMut>,
}

/// Buffers a [`BlockPool`] keeps retired, and free: 1 MiB of 64 KiB blocks
/// at most each.
const POOLED_BUFFERS: usize = 16;

impl BlockPool {
    /// A buffer of `size` bytes, of old contents or zeroed.
    fn take(&mut self, size: usize) -> BytesMut {
        self.reclaim();
        match self.free.iter().position(|b| b.len() == size) {
            Some(i) => self.free.swap_remove(i),
            None => BytesMut::zeroed(size),
        }
    }

    fn retire(&mut self, buf: Bytes) {
        if buf.is_empty() {
            return;
        }
        if self.retired.len() >= POOLED_BUFFERS {
            self.reclaim();
        }
        if self.retired.len() < POOLED_BUFFERS {
            self.retired.push(buf);
        }
    }

    /// Moves the retired buffers no payload holds any more to the free ones.
    fn reclaim(&mut self) {
        let mut i = 0;
        while i < self.retired.len() {
            if !self.retired[i].is_unique() {
                i += 1;
                continue;
            }
            if let Ok(buf) = self.retired.swap_remove(i).try_into_mut() {
                if self.free.len() < POOLED_BUFFERS {
                    self.free.push(buf);
                }
            }
        }
    }
}

/// Reads until `out` is full, the end of the file, or content that is not
/// there yet (then true, with what came before it).
fn read_full(content: &dyn Content, offset: u64, out: &mut [u8]) -> std::io::Result<(usize, bool)> {
    let mut filled = 0;
    while filled < out.len() {
        match content.read_at(offset + filled as u64, &mut out[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok((filled, true)),
            Err(e) => return Err(e),
        }
    }
    Ok((filled, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::server::MemoryContent;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Memory content that counts the reads made of it.
    struct Counted(MemoryContent, AtomicUsize);

    impl Counted {
        /// `len` bytes of a repeating pattern, and content holding them.
        fn pattern(len: u32) -> (Vec<u8>, Self) {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let content = MemoryContent {
                bytes: bytes.clone(),
                tag: 1,
            };
            (bytes, Counted(content, AtomicUsize::new(0)))
        }
    }

    impl Content for Counted {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn tag(&self) -> u64 {
            self.0.tag()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.read_at(offset, buf)
        }
    }

    /// Appends the `len` bytes from `offset` to `out` through the block,
    /// as a copying send does.
    fn append(
        blocks: &mut BlockReader,
        content: &dyn Content,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
        order: ReadOrder,
    ) -> std::io::Result<usize> {
        let payload = blocks.slice(&mut BlockPool::default(), content, offset, len, order)?;
        out.extend_from_slice(&payload);
        Ok(payload.len())
    }

    /// Reads the `len` bytes from `at` through the block, checks them
    /// against the file's `bytes` and returns how many came.
    fn append_checked(
        blocks: &mut BlockReader,
        content: &dyn Content,
        bytes: &[u8],
        at: u64,
        len: usize,
        order: ReadOrder,
    ) -> usize {
        let mut out = Vec::new();
        let n = append(blocks, content, at, len, &mut out, order).expect("read");
        assert_eq!(out[..], bytes[at as usize..at as usize + n]);
        n
    }

    /// Fills `out` from `offset` through the block, as a datagram would be.
    fn read(
        blocks: &mut BlockReader,
        content: &dyn Content,
        offset: u64,
        out: &mut [u8],
        order: ReadOrder,
    ) -> std::io::Result<usize> {
        let mut appended = Vec::new();
        let n = append(blocks, content, offset, out.len(), &mut appended, order)?;
        out[..n].copy_from_slice(&appended);
        Ok(n)
    }

    #[test]
    fn block_reader_reads_once_per_block_and_resends_apart() {
        let (bytes, content) = Counted::pattern(200_000);
        let mut blocks = BlockReader::default();
        let mut out = vec![0u8; 1400];
        // In order through the whole file: one read per block.
        let mut at = 0u64;
        while at < bytes.len() as u64 {
            let n = read(&mut blocks, &content, at, &mut out, ReadOrder::Sequential).expect("read");
            assert!(n > 0);
            assert_eq!(out[..n], bytes[at as usize..at as usize + n]);
            at += n as u64;
        }
        let reads = content.1.load(Ordering::Relaxed);
        // Blocks start where a datagram did not fit the previous one, and
        // the last read of a short block sees the end of the file.
        assert!(
            reads <= bytes.len().div_ceil(READ_BLOCK_BYTES) + 2,
            "{reads}"
        );
        // A resend far behind is read into a block of its own and leaves
        // the new data's block alone.
        let n = read(&mut blocks, &content, 1000, &mut out, ReadOrder::Scattered).expect("read");
        assert_eq!((n, &out[..]), (1400, &bytes[1000..2400]));
        assert_eq!(content.1.load(Ordering::Relaxed), reads + 1);
        // Released (a paused session's), it reads anew, ahead or behind.
        blocks.release(&mut BlockPool::default());
        assert!(blocks.is_released());
        for at in [150_000u64, 3000, 150_500] {
            let n = read(&mut blocks, &content, at, &mut out, ReadOrder::Sequential).expect("read");
            assert_eq!(
                (n, &out[..]),
                (1400, &bytes[at as usize..at as usize + 1400])
            );
        }
        // At the end only what is left.
        let n = read(
            &mut blocks,
            &content,
            bytes.len() as u64 - 10,
            &mut out,
            ReadOrder::Sequential,
        )
        .expect("read");
        assert_eq!(&out[..n], &bytes[bytes.len() - 10..]);
        assert_eq!(
            read(
                &mut blocks,
                &content,
                bytes.len() as u64,
                &mut out,
                ReadOrder::Sequential
            )
            .ok(),
            Some(0)
        );
    }

    #[test]
    fn resends_that_leave_again_or_in_a_run_share_one_read() {
        let (bytes, content) = Counted::pattern(300_000);
        let mut blocks = BlockReader::default();
        let send = |blocks: &mut BlockReader, at: u64, order| {
            append_checked(blocks, &content, &bytes, at, 1400, order);
            content.1.load(Ordering::Relaxed)
        };
        // New data far ahead of the resends below.
        let before = send(&mut blocks, 200_000, ReadOrder::Sequential);
        // A resend that leaves three times, then the four datagrams after
        // it (a run the queue dropped): one read.
        for _ in 0..3 {
            assert_eq!(send(&mut blocks, 10_000, ReadOrder::Scattered), before + 1);
        }
        for at in [11_400, 12_800, 14_200, 15_600] {
            assert_eq!(send(&mut blocks, at, ReadOrder::Scattered), before + 1);
        }
        // The run goes on past the small block: one more read; a resend
        // behind it, one more again.
        assert_eq!(send(&mut blocks, 17_000, ReadOrder::Scattered), before + 2);
        assert_eq!(send(&mut blocks, 5_000, ReadOrder::Scattered), before + 3);
        // New data still comes from its own block, read once.
        assert_eq!(
            send(&mut blocks, 201_400, ReadOrder::Sequential),
            before + 3
        );
    }

    #[test]
    fn new_data_after_index_sent_ahead_is_still_read_a_block_at_a_time() {
        let (bytes, content) = Counted::pattern(300_000);
        let mut blocks = BlockReader::default();
        // The index at the end of the file goes first, ahead of the data.
        let index = bytes.len() as u64 - 5000;
        let mut at = index;
        while at < bytes.len() as u64 {
            let len = 1400.min(bytes.len() - at as usize);
            let n = append_checked(&mut blocks, &content, &bytes, at, len, ReadOrder::Scattered);
            at += n as u64;
        }
        let after_index = content.1.load(Ordering::Relaxed);
        // Then the file from its start, with a resend now and then.
        let mut at = 0u64;
        while at < index {
            let len = 1400.min((index - at) as usize);
            let n = append_checked(
                &mut blocks,
                &content,
                &bytes,
                at,
                len,
                ReadOrder::Sequential,
            );
            if at % 70_000 < 1400 && at > 2800 {
                let resent = append_checked(
                    &mut blocks,
                    &content,
                    &bytes,
                    at - 2800,
                    1400,
                    ReadOrder::Scattered,
                );
                assert_eq!(resent, 1400);
            }
            at += n as u64;
        }
        let reads = content.1.load(Ordering::Relaxed) - after_index;
        // A block read each 64 KiB, and the resends served from the block.
        assert!(
            reads <= (index as usize).div_ceil(READ_BLOCK_BYTES) + 2,
            "{reads} reads for {index} bytes"
        );
    }

    /// Content in two storage blocks of which only one is "cached" at a
    /// time: each read of the other block evicts the first.
    struct TwoBlocks {
        bytes: Vec<u8>,
        block: usize,
        cached: std::sync::Mutex<usize>,
    }

    impl Content for TwoBlocks {
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn tag(&self) -> u64 {
            1
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            let offset = offset as usize;
            if offset >= self.bytes.len() {
                return Ok(0);
            }
            let index = offset / self.block;
            let mut cached = self.cached.lock().expect("lock");
            if *cached != index {
                // Fetched now, evicting the other; there next time.
                *cached = index;
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let end = ((index + 1) * self.block).min(self.bytes.len());
            let n = buf.len().min(end - offset);
            buf[..n].copy_from_slice(&self.bytes[offset..offset + n]);
            Ok(n)
        }
    }

    #[test]
    fn a_read_across_two_blocks_progresses_with_room_for_one() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let content = TwoBlocks {
            bytes: bytes.clone(),
            block: 100_000,
            cached: std::sync::Mutex::new(usize::MAX),
        };
        let mut blocks = BlockReader::default();
        let mut out = vec![0u8; 1400];
        let mut at = 0u64;
        let mut tries = 0;
        while at < bytes.len() as u64 {
            tries += 1;
            assert!(tries < 10_000, "no progress at {at}");
            match read(&mut blocks, &content, at, &mut out, ReadOrder::Sequential) {
                Ok(n) => {
                    assert!(n > 0);
                    assert_eq!(out[..n], bytes[at as usize..at as usize + n]);
                    at += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn payloads_keep_their_bytes_while_the_block_moves_on() {
        let (bytes, content) = Counted::pattern(400_000);
        let mut pool = BlockPool::default();
        let mut blocks = BlockReader::default();
        let slice = |blocks: &mut BlockReader, pool: &mut BlockPool, at: u64| {
            blocks
                .slice(pool, &content, at, 1400, ReadOrder::Sequential)
                .expect("read")
        };
        // Nothing holds the block when it is refilled: the same buffer.
        let first = slice(&mut blocks, &mut pool, 0).as_ptr();
        let refilled = slice(&mut blocks, &mut pool, READ_BLOCK_BYTES as u64).as_ptr();
        assert_eq!(first, refilled, "refilled in place");
        // A payload waiting in a send batch keeps its bytes when the block
        // is refilled, which takes another buffer.
        let waiting = slice(&mut blocks, &mut pool, 2 * READ_BLOCK_BYTES as u64 - 1400);
        let next = slice(&mut blocks, &mut pool, 2 * READ_BLOCK_BYTES as u64);
        let at = 2 * READ_BLOCK_BYTES - 1400;
        assert_eq!(waiting[..], bytes[at..at + 1400]);
        assert_eq!(next[..], bytes[at + 1400..at + 2800]);
        let moved_to = next.as_ptr();
        // Once the batch has left, the retired buffer serves the next
        // refill that finds its block held, instead of a new one.
        let old_buffer = waiting.as_ptr() as usize - (READ_BLOCK_BYTES - 1400);
        drop(waiting);
        let held = next;
        let after = slice(&mut blocks, &mut pool, 3 * READ_BLOCK_BYTES as u64);
        assert_ne!(after.as_ptr(), moved_to);
        assert_eq!(
            after.as_ptr() as usize,
            old_buffer,
            "the retired buffer, reused"
        );
        assert_eq!(
            after[..],
            bytes[3 * READ_BLOCK_BYTES..3 * READ_BLOCK_BYTES + 1400]
        );
        assert_eq!(held[..], bytes[at + 1400..at + 2800]);
    }

    /// Counted content that shares its blocks, as a file several viewers
    /// watch does; blocks from `unshared_from` on it does not share.
    struct Sharing {
        counted: Counted,
        blocks: std::sync::Mutex<std::collections::HashMap<u64, Bytes>>,
        unshared_from: u64,
    }

    impl Content for Sharing {
        fn size(&self) -> u64 {
            self.counted.size()
        }
        fn tag(&self) -> u64 {
            self.counted.tag()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            self.counted.read_at(offset, buf)
        }
        fn shared_block(&self, start: u64) -> Option<Bytes> {
            if start >= self.unshared_from {
                return None;
            }
            let mut blocks = self.blocks.lock().expect("blocks");
            if let Some(b) = blocks.get(&start) {
                return Some(b.clone());
            }
            let len = READ_BLOCK_BYTES.min((self.size() - start) as usize);
            let mut buf = vec![0u8; len];
            let n = self.counted.read_at(start, &mut buf).ok()?;
            let block = Bytes::from(buf[..n].to_vec());
            blocks.insert(start, block.clone());
            Some(block)
        }
    }

    #[test]
    fn sessions_of_one_content_send_from_its_shared_blocks() {
        let (bytes, counted) = Counted::pattern(300_000);
        let content = Sharing {
            counted,
            blocks: Default::default(),
            unshared_from: 4 * READ_BLOCK_BYTES as u64,
        };
        let mut pool = BlockPool::default();
        let (mut a, mut b) = (BlockReader::default(), BlockReader::default());
        let reads = |c: &Sharing| c.counted.1.load(Ordering::Relaxed);
        // Two sessions in step, 1400-byte payloads (which straddle every
        // block boundary but the first), byte-exact.
        let mut at = 0u64;
        while at + 1400 <= 4 * READ_BLOCK_BYTES as u64 {
            for blocks in [&mut a, &mut b] {
                let p = blocks
                    .slice(&mut pool, &content, at, 1400, ReadOrder::Sequential)
                    .expect("read");
                assert_eq!(p[..], bytes[at as usize..at as usize + 1400], "at {at}");
            }
            at += 1400;
        }
        // Each block was read once, for both.
        assert_eq!(reads(&content), 4);
        // Past the shared blocks each reads its own copy, byte-exact to
        // the end, and a resend behind still comes right.
        let before = reads(&content);
        while at < bytes.len() as u64 {
            let p = a
                .slice(&mut pool, &content, at, 1400, ReadOrder::Sequential)
                .expect("read");
            assert!(!p.is_empty());
            assert_eq!(p[..], bytes[at as usize..at as usize + p.len()]);
            at += p.len() as u64;
        }
        assert!(reads(&content) > before);
        let p = a
            .slice(&mut pool, &content, 70_000, 1400, ReadOrder::Scattered)
            .expect("read");
        assert_eq!(p[..], bytes[70_000..71_400]);
        // A jump back into the shared blocks takes them again.
        let before = reads(&content);
        let p = b
            .slice(&mut pool, &content, 10_000, 1400, ReadOrder::Sequential)
            .expect("read");
        assert_eq!(p[..], bytes[10_000..11_400]);
        assert_eq!(reads(&content), before);
        // The shared blocks never went to the pool: none of its buffers
        // is one the content still holds.
        let shared = content.blocks.lock().expect("blocks");
        for buf in pool.retired.iter() {
            assert!(!shared.values().any(|s| s.as_ptr() == buf.as_ptr()));
        }
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers() {
        let mut pool = BlockPool::default();
        let held: Vec<Bytes> = (0..3 * POOLED_BUFFERS)
            .map(|_| {
                let buf = BytesMut::zeroed(READ_BLOCK_BYTES).freeze();
                pool.retire(buf.clone());
                buf
            })
            .collect();
        assert_eq!(pool.retired.len(), POOLED_BUFFERS);
        drop(held);
        for _ in 0..3 * POOLED_BUFFERS {
            pool.retire(BytesMut::zeroed(READ_BLOCK_BYTES).freeze());
        }
        pool.reclaim();
        assert!(pool.free.len() <= POOLED_BUFFERS && pool.retired.len() <= POOLED_BUFFERS);
        assert_eq!(pool.take(RESEND_BLOCK_BYTES).len(), RESEND_BLOCK_BYTES);
    }
}
