//! Where a container keeps its index, so the server can send it with the
//! first bytes of a transfer instead of the demuxer fetching it with a jump
//! to the end and another back (two round trips before the first frame).
//!
//! - MP4/MOV: the `moov` box, found from the top-level box headers.
//! - Matroska/WebM: the `Cues` element, found through the `SeekHead`.
//!
//! The file is untrusted input. The walk reads a bounded number of small
//! headers through a caller-supplied reader (the core does no I/O), uses
//! checked arithmetic, and gives up (`None`) on anything it does not
//! understand; a wrong answer only costs the bytes of a useless prefetch,
//! never correctness, since the client checks nothing against it.

use std::ops::Range;

/// An index larger than this is not prefetched: it would delay the first
/// bytes of the stream itself for too long on a slow link.
pub const MAX_INDEX_BYTES: u64 = 8 * 1024 * 1024;
/// What may follow the index to the end of the file and still be sent
/// with it.
const SHORT_TAIL: u64 = 64 * 1024;
/// Top-level boxes or elements looked at before giving up.
const MAX_ELEMENTS: usize = 64;
/// A `SeekHead` larger than this is not read.
const MAX_SEEK_HEAD_BYTES: u64 = 64 * 1024;

const EBML_MAGIC: [u8; 4] = [0x1A, 0x45, 0xDF, 0xA3];
const MKV_SEGMENT: u32 = 0x1853_8067;
const MKV_SEEK_HEAD: u32 = 0x114D_9B74;
const MKV_SEEK: u32 = 0x4DBB;
const MKV_SEEK_ID: u32 = 0x53AB;
const MKV_SEEK_POSITION: u32 = 0x53AC;
const MKV_CUES: u32 = 0x1C53_BB6B;
const MKV_CLUSTER: u32 = 0x1F43_B675;

/// Where a file's index lies, and how much of the file's start a demuxer
/// reads before it jumps there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaIndex {
    pub range: Range<u64>,
    /// typefind reads the first 4 KiB and qtdemux then only box headers;
    /// matroskademux reads a first block of 64 KiB before it looks for the
    /// Cues. The index goes out after these bytes, not before them.
    pub head: u64,
}

/// Reads into the buffer at a file offset; returns how many bytes it got
/// (fewer at the end of the file or on an error).
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> usize + 'a;

/// The byte range of the file's index, if the container is one this knows,
/// the index is where its headers say and it is at most
/// [`MAX_INDEX_BYTES`].
pub fn locate_index(size: u64, read: &mut ReadAt) -> Option<MediaIndex> {
    let mut magic = [0u8; 8];
    if read(0, &mut magic) < 8 {
        return None;
    }
    let (range, head) = if magic[..4] == EBML_MAGIC {
        (matroska_cues(size, read)?, 64 * 1024)
    } else if is_mp4_box_type(&magic[4..8]) {
        (mp4_moov(size, read)?, 4096)
    } else {
        return None;
    };
    // A short tail after the index (Matroska's Tags, say) goes with it:
    // matroskademux reads the Cues in one block that runs to the end.
    let range = if size.saturating_sub(range.end) <= SHORT_TAIL {
        range.start..size
    } else {
        range
    };
    (range.start < range.end && range.end <= size && range.end - range.start <= MAX_INDEX_BYTES)
        .then_some(MediaIndex { range, head })
}

/// Whether a file starting with `head` is best demuxed in push mode: MP4
/// and Matroska demuxers seek by their index there as exactly as in pull
/// mode, and read less doing it (in pull mode qtdemux's first seek reads
/// about 1.2 MB, and matroskademux probes the middle of the file before
/// its first frame, each a round trip to the server). MPEG-TS and the
/// rest keep pull mode, where tsdemux seeks exactly instead of estimating.
pub fn prefers_push_mode(head: &[u8]) -> bool {
    head.len() >= 8 && (head[..4] == EBML_MAGIC || is_mp4_box_type(&head[4..8]))
}

fn is_mp4_box_type(t: &[u8]) -> bool {
    matches!(
        t,
        b"ftyp" | b"styp" | b"moov" | b"mdat" | b"free" | b"skip" | b"wide" | b"pnot"
    )
}

fn mp4_moov(size: u64, read: &mut ReadAt) -> Option<Range<u64>> {
    let mut offset = 0u64;
    for _ in 0..MAX_ELEMENTS {
        if offset.checked_add(8)? > size {
            return None;
        }
        let mut header = [0u8; 16];
        let got = read(offset, &mut header);
        if got < 8 {
            return None;
        }
        let short = u64::from(u32::from_be_bytes([
            header[0], header[1], header[2], header[3],
        ]));
        let kind = &header[4..8];
        let (len, header_len) = match short {
            0 => (size - offset, 8),
            1 if got >= 16 => {
                let mut large = [0u8; 8];
                large.copy_from_slice(&header[8..16]);
                (u64::from_be_bytes(large), 16)
            }
            1 => return None,
            n => (n, 8),
        };
        if len < header_len {
            return None;
        }
        let end = offset.checked_add(len)?;
        if end > size {
            return None;
        }
        if kind == b"moov" {
            return Some(offset..end);
        }
        offset = end;
    }
    None
}

/// An EBML variable-length integer at the front of `bytes`: (value without
/// its length marker, length). `keep_marker` keeps the marker bit, as
/// element IDs are written.
fn vint(bytes: &[u8], keep_marker: bool) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let len = first.leading_zeros() as usize + 1;
    if len > 8 || bytes.len() < len {
        return None;
    }
    let mut value = if keep_marker {
        u64::from(first)
    } else {
        u64::from(first) & (0xFF >> len)
    };
    for b in &bytes[1..len] {
        value = (value << 8) | u64::from(*b);
    }
    Some((value, len))
}

/// An element header: (id, data size or `None` when unknown, header length).
fn element_header(bytes: &[u8]) -> Option<(u32, Option<u64>, usize)> {
    let (id, id_len) = vint(bytes, true)?;
    if id_len > 4 {
        return None;
    }
    let (size, size_len) = vint(&bytes[id_len..], false)?;
    // All ones means "unknown size" (a live-written segment or cluster).
    let unknown = size == (1u64 << (7 * size_len)) - 1;
    Some((id as u32, (!unknown).then_some(size), id_len + size_len))
}

fn read_header(read: &mut ReadAt, offset: u64) -> Option<(u32, Option<u64>, usize)> {
    let mut buf = [0u8; 12];
    let got = read(offset, &mut buf);
    element_header(&buf[..got])
}

fn matroska_cues(size: u64, read: &mut ReadAt) -> Option<Range<u64>> {
    let (id, ebml_size, header_len) = read_header(read, 0)?;
    if id != u32::from_be_bytes(EBML_MAGIC) {
        return None;
    }
    let segment_at = (header_len as u64).checked_add(ebml_size?)?;
    let (id, _, header_len) = read_header(read, segment_at)?;
    if id != MKV_SEGMENT {
        return None;
    }
    let segment_data = segment_at.checked_add(header_len as u64)?;
    // The SeekHead is normally the segment's first element; Void padding
    // or the Info may come first.
    let mut offset = segment_data;
    for _ in 0..MAX_ELEMENTS {
        if offset >= size {
            return None;
        }
        let (id, len, header_len) = read_header(read, offset)?;
        let data = offset.checked_add(header_len as u64)?;
        match id {
            MKV_SEEK_HEAD => {
                let len = len?;
                if len > MAX_SEEK_HEAD_BYTES {
                    return None;
                }
                let mut body = vec![0u8; len as usize];
                if read(data, &mut body) < body.len() {
                    return None;
                }
                let position = cues_position(&body)?;
                let cues = segment_data.checked_add(position)?;
                let (id, len, header_len) = read_header(read, cues)?;
                if id != MKV_CUES {
                    return None;
                }
                let end = cues.checked_add(header_len as u64)?.checked_add(len?)?;
                return Some(cues..end);
            }
            MKV_CLUSTER => return None,
            _ => offset = data.checked_add(len?)?,
        }
    }
    None
}

/// The `SeekPosition` of the `Seek` entry whose `SeekID` is `Cues`.
fn cues_position(seek_head: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    while at < seek_head.len() {
        let (id, len, header_len) = element_header(&seek_head[at..])?;
        let len = usize::try_from(len?).ok()?;
        let body_start = at.checked_add(header_len)?;
        let body = seek_head.get(body_start..body_start.checked_add(len)?)?;
        if id == MKV_SEEK {
            let (mut seek_id, mut position) = (None, None);
            let mut inner = 0usize;
            while inner < body.len() {
                let (id, len, header_len) = element_header(&body[inner..])?;
                let len = usize::try_from(len?).ok()?;
                let start = inner.checked_add(header_len)?;
                let value = body.get(start..start.checked_add(len)?)?;
                match id {
                    MKV_SEEK_ID => seek_id = Some(value.to_vec()),
                    MKV_SEEK_POSITION if len <= 8 => {
                        position = Some(value.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
                    }
                    _ => {}
                }
                inner = start + len;
            }
            if seek_id.as_deref() == Some(&MKV_CUES.to_be_bytes()[..]) {
                return position;
            }
        }
        at = body_start + len;
    }
    None
}

#[cfg(test)]
mod tests {

    #[test]
    fn mp4_and_matroska_prefer_push_mode_ts_does_not() {
        assert!(prefers_push_mode(b"\0\0\0\x20ftypisom"));
        assert!(prefers_push_mode(&[0x1A, 0x45, 0xDF, 0xA3, 1, 0, 0, 0]));
        assert!(!prefers_push_mode(&[0x47, 0x40, 0x11, 0x10, 0, 0, 0, 0]));
        assert!(!prefers_push_mode(b"\0\0"));
    }

    use super::*;

    fn reader(file: &[u8]) -> impl FnMut(u64, &mut [u8]) -> usize + '_ {
        move |offset, buf| {
            let Ok(start) = usize::try_from(offset) else {
                return 0;
            };
            if start >= file.len() {
                return 0;
            }
            let n = buf.len().min(file.len() - start);
            buf[..n].copy_from_slice(&file[start..start + n]);
            n
        }
    }

    fn mp4_box(kind: &[u8; 4], body_len: usize) -> Vec<u8> {
        let mut b = ((body_len + 8) as u32).to_be_bytes().to_vec();
        b.extend_from_slice(kind);
        b.resize(body_len + 8, 0);
        b
    }

    fn locate(file: &[u8]) -> Option<Range<u64>> {
        locate_index(file.len() as u64, &mut reader(file)).map(|i| i.range)
    }

    #[test]
    fn finds_moov_at_the_end_and_at_the_start() {
        let mut file = mp4_box(b"ftyp", 24);
        file.extend(mp4_box(b"free", 0));
        file.extend(mp4_box(b"mdat", 100_000));
        let moov_at = file.len() as u64;
        file.extend(mp4_box(b"moov", 3000));
        assert_eq!(locate(&file), Some(moov_at..moov_at + 3008));

        let mut fast = mp4_box(b"ftyp", 24);
        fast.extend(mp4_box(b"moov", 500));
        fast.extend(mp4_box(b"mdat", 100_000));
        assert_eq!(locate(&fast), Some(32..540));
        // A short tail after the index goes with it (a demuxer reads it in
        // the same block).
        let mut tail = mp4_box(b"ftyp", 24);
        tail.extend(mp4_box(b"mdat", 100_000));
        tail.extend(mp4_box(b"moov", 500));
        tail.extend(mp4_box(b"free", 100));
        assert_eq!(locate(&tail), Some(100_040..tail.len() as u64));
    }

    #[test]
    fn a_64_bit_mdat_is_walked_over() {
        let mut file = mp4_box(b"ftyp", 8);
        let mut mdat = 1u32.to_be_bytes().to_vec();
        mdat.extend_from_slice(b"mdat");
        mdat.extend_from_slice(&(16u64 + 50).to_be_bytes());
        mdat.resize(66, 0);
        file.extend(mdat);
        file.extend(mp4_box(b"moov", 10));
        assert_eq!(locate(&file), Some(82..100));
    }

    #[test]
    fn truncated_or_hostile_box_trees_are_ignored() {
        let mut file = mp4_box(b"ftyp", 24);
        file.extend(mp4_box(b"mdat", 1000));
        file.extend(mp4_box(b"moov", 3000));
        // Cut in the middle of the moov, of the mdat, of a header.
        for cut in [file.len() - 1, 500, 35, 7, 0] {
            assert_eq!(locate(&file[..cut]), None, "cut at {cut}");
        }
        // A box smaller than its header, a 64-bit size that overflows, a
        // size past the end.
        for bad in [
            [0, 0, 0, 4, b'm', b'd', b'a', b't'].to_vec(),
            [&[0, 0, 0, 1][..], b"mdat", &u64::MAX.to_be_bytes()].concat(),
            [&[0x7f, 0, 0, 0][..], b"mdat"].concat(),
        ] {
            let mut f = mp4_box(b"ftyp", 8);
            f.extend(bad);
            f.extend(mp4_box(b"moov", 10));
            assert_eq!(locate(&f), None);
        }
        // An index over the cap is not prefetched.
        let mut huge = mp4_box(b"ftyp", 8);
        huge.extend(mp4_box(b"moov", MAX_INDEX_BYTES as usize));
        assert_eq!(locate(&huge), None);
        // Not a container at all.
        assert_eq!(locate(b"hello world, this is text"), None);
    }

    /// A minimal Matroska file: EBML header, Segment, SeekHead → Cues.
    fn mkv(cues_declared_at: u64) -> (Vec<u8>, Range<u64>) {
        let mut f = vec![0x1A, 0x45, 0xDF, 0xA3, 0x80 | 4, 0x42, 0x86, 0x81, 0x01];
        // Segment of unknown size.
        f.extend_from_slice(&[
            0x18, 0x53, 0x80, 0x67, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        let seek = [
            &[0x53, 0xAB, 0x84][..],
            &MKV_CUES.to_be_bytes(),
            &[0x53, 0xAC, 0x88],
            &cues_declared_at.to_be_bytes(),
        ]
        .concat();
        let entry = [&[0x4D, 0xBB, 0x80 | seek.len() as u8][..], &seek].concat();
        f.extend_from_slice(&[0x11, 0x4D, 0x9B, 0x74, 0x80 | entry.len() as u8]);
        f.extend(entry);
        // A cluster of 1000 bytes.
        f.extend_from_slice(&[0x1F, 0x43, 0xB6, 0x75, 0x40 | 0x03, 0xE8 - 5]);
        f.resize(f.len() + 0x3E3, 0);
        let cues_at = f.len() as u64;
        f.extend_from_slice(&[0x1C, 0x53, 0xBB, 0x6B, 0x40 | 0x01, 0x00]);
        f.resize(f.len() + 0x100, 0);
        let end = f.len() as u64;
        (f, cues_at..end)
    }

    #[test]
    fn finds_cues_through_the_seek_head() {
        // The seek position counts from the segment's data, at byte 21.
        let (_, cues) = mkv(0);
        let (file, want) = mkv(cues.start - 21);
        assert_eq!(locate(&file), Some(want));
    }

    #[test]
    fn hostile_matroska_is_ignored() {
        let (_, cues) = mkv(0);
        // The seek head points at the cluster, past the end, at u64::MAX.
        for position in [0, cues.start, u64::MAX - 5] {
            let (file, _) = mkv(position);
            assert_eq!(locate(&file), None, "position {position}");
        }
        let (file, _) = mkv(cues.start - 21);
        for cut in [5, 15, 30, 60, file.len() - 10] {
            let got = locate(&file[..cut]);
            assert!(
                got.as_ref().is_none_or(|r| r.end <= cut as u64),
                "cut at {cut}: {got:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_give_a_range_inside_the_file_or_none(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            mp4 in proptest::bool::ANY,
        ) {
            let mut file = if mp4 { mp4_box(b"ftyp", 8) } else { EBML_MAGIC.to_vec() };
            file.extend(bytes);
            if let Some(r) = locate(&file) {
                proptest::prop_assert!(r.start < r.end && r.end <= file.len() as u64);
            }
        }
    }
}
