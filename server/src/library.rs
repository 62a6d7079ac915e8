//! The folder a server serves: only regular files inside it, by relative
//! path. Every refusal is reported as "not found", so a client learns
//! nothing about what lies outside the folder.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

use gstudpvid::protocol::catalog::CatalogEntry;
use gstudpvid::protocol::content_blocks::READ_BLOCK_BYTES;
use gstudpvid::protocol::wire::MAX_TEXT_LEN;
use gstudpvid::protocol::{Content, ContentStore, OpenErrorKind, OpenFailure};

/// Folders deeper than this are not listed (a symlink loop cannot hang us,
/// since symlinked folders are not followed, but a deep tree could be slow).
const MAX_CATALOG_DEPTH: usize = 16;
/// At most this many files are listed.
const MAX_CATALOG_ENTRIES: usize = 10_000;
/// A cached catalog is walked anew after this long even if no folder
/// changed: a file growing in place (a copy in progress) changes no folder,
/// and its listed size should catch up.
const MAX_CATALOG_AGE: Duration = Duration::from_secs(10);
/// A folder modified this close to the walk may have changed again within
/// the file system's timestamp granularity (the coarse clock ticks in
/// milliseconds) without its stamp moving, so it does not vouch for the
/// cache; the next request walks again (git's "racy" index entries).
const RACY_STAMP_WINDOW: Duration = Duration::from_secs(1);

/// What identifies a folder's list of entries: adding, removing or
/// renaming an entry moves its modification time; replacing the folder
/// changes its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FolderStamp {
    mtime: i64,
    mtime_nsec: i64,
    ino: u64,
}

impl FolderStamp {
    fn of(dir: &Path) -> Option<FolderStamp> {
        let meta = std::fs::symlink_metadata(dir).ok()?;
        Some(FolderStamp {
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ino: meta.ino(),
        })
    }

    fn modified(&self) -> SystemTime {
        let since_epoch = Duration::new(
            self.mtime.max(0) as u64,
            self.mtime_nsec.clamp(0, 999_999_999) as u32,
        );
        SystemTime::UNIX_EPOCH + since_epoch
    }
}

/// The last walk: its entries and the stamp of every folder it read.
struct CachedCatalog {
    entries: Vec<CatalogEntry>,
    folders: Vec<(PathBuf, Option<FolderStamp>)>,
    walked_at: Instant,
    walked_at_wall: SystemTime,
}

impl CachedCatalog {
    /// Still what a walk would find: young enough, and no folder changed
    /// (one stat per folder instead of a stat and a canonicalisation per
    /// file).
    fn is_current(&self) -> bool {
        if self.walked_at.elapsed() >= MAX_CATALOG_AGE {
            return false;
        }
        self.folders.iter().all(|(dir, stamp)| {
            let now = FolderStamp::of(dir);
            now == *stamp
                && now.is_some_and(|s| s.modified() + RACY_STAMP_WINDOW <= self.walked_at_wall)
        })
    }
}

pub struct Library {
    root: PathBuf,
    /// The catalog is asked for by every not-found error and every
    /// application that lists files, and is walked on the server's only
    /// runtime thread: it is cached, and walked again when a folder changed.
    catalog: Mutex<Option<CachedCatalog>>,
    /// Full walks so far (for the tests of the cache).
    walks: AtomicU64,
}

impl Library {
    pub fn new(dir: &Path) -> io::Result<Self> {
        let root = dir.canonicalize()?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a folder", dir.display()),
            ));
        }
        Ok(Library {
            root,
            catalog: Mutex::new(None),
            walks: AtomicU64::new(0),
        })
    }

    /// Full walks of the folder so far.
    #[cfg(test)]
    pub fn catalog_walks(&self) -> u64 {
        self.walks.load(Ordering::Relaxed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a client's path to a regular file inside the folder, or says
    /// why not (for the log; the client is only told "not found").
    fn resolve(&self, path: &str) -> Result<PathBuf, String> {
        if path.is_empty() {
            return Err("empty path".into());
        }
        if path.len() > MAX_TEXT_LEN || path.contains('\0') {
            return Err("path too long or contains NUL".into());
        }
        let rel = Path::new(path);
        for c in rel.components() {
            match c {
                Component::Normal(_) => {}
                Component::CurDir => {}
                _ => return Err("path leaves the folder (.., / or prefix)".into()),
            }
        }
        let full = self
            .root
            .join(rel)
            .canonicalize()
            .map_err(|e| format!("cannot resolve: {e}"))?;
        if !full.starts_with(&self.root) {
            return Err("resolves outside the folder (symlink)".into());
        }
        let meta = std::fs::metadata(&full).map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        Ok(full)
    }

    fn walk(
        &self,
        dir: &Path,
        depth: usize,
        out: &mut Vec<CatalogEntry>,
        folders: &mut Vec<(PathBuf, Option<FolderStamp>)>,
    ) {
        if depth > MAX_CATALOG_DEPTH || out.len() >= MAX_CATALOG_ENTRIES {
            return;
        }
        // Stamped before reading, so a change during the read shows later.
        folders.push((dir.to_path_buf(), FolderStamp::of(dir)));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if out.len() >= MAX_CATALOG_ENTRIES {
                return;
            }
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                self.walk(&path, depth + 1, out, folders);
                continue;
            }
            let Ok(rel) = path.strip_prefix(&self.root) else {
                continue;
            };
            // Names that are not UTF-8 cannot be asked for on the wire.
            let Some(name) = rel.to_str() else { continue };
            // Listed only if a client could actually open it: this applies
            // the same symlink and file-type rules as `open`.
            if let Ok(meta) = self
                .resolve(name)
                .and_then(|full| std::fs::metadata(full).map_err(|e| e.to_string()))
            {
                out.push(CatalogEntry {
                    name: name.to_owned(),
                    size: meta.len(),
                });
            }
        }
    }
}

impl ContentStore for Library {
    fn catalog(&self) -> Vec<CatalogEntry> {
        let mut cache = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| c.is_current()) {
            return c.entries.clone();
        }
        let walked_at = Instant::now();
        let walked_at_wall = SystemTime::now();
        let mut entries = Vec::new();
        let mut folders = Vec::new();
        self.walk(&self.root, 0, &mut entries, &mut folders);
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        self.walks.fetch_add(1, Ordering::Relaxed);
        *cache = Some(CachedCatalog {
            entries: entries.clone(),
            folders,
            walked_at,
            walked_at_wall,
        });
        entries
    }

    fn open(&self, path: &str) -> Result<Box<dyn Content>, OpenFailure> {
        // The reason goes to the server log only; the client is told "not
        // found" whatever lies behind the name.
        let not_found = |why: String| OpenFailure {
            kind: OpenErrorKind::NotFound,
            message: format!("{path}: not found on the server"),
            detail: why,
        };
        let full = self.resolve(path).map_err(not_found)?;
        let file = File::open(&full).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => OpenFailure {
                kind: OpenErrorKind::NotReadable,
                message: format!("{path}: the server may not read this file"),
                detail: e.to_string(),
            },
            _ => not_found(e.to_string()),
        })?;
        let meta = file.metadata().map_err(|e| not_found(e.to_string()))?;
        Ok(Box::new(FileContent::new(file, &meta)))
    }
}

/// What identifies a file's content: size, modification time and inode,
/// digested with SHA-256 (its first 8 bytes). The same file gives the same
/// tag across restarts and rebuilds of the server, so a client that
/// reconnects to a restarted (or upgraded) server resumes instead of
/// reporting the file changed; `DefaultHasher`, used before, promises no
/// stable output between Rust releases.
fn content_tag(size: u64, mtime: i64, mtime_nsec: i64, inode: u64) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"udpvid content tag v1");
    h.update(size.to_be_bytes());
    h.update(mtime.to_be_bytes());
    h.update(mtime_nsec.to_be_bytes());
    h.update(inode.to_be_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

thread_local! {
    /// The serving thread's wake-up for content that was not there yet
    /// (set by the server when the thread starts). A file opened on a
    /// thread wakes only that thread, where its session lives.
    pub static CONTENT_READY: RefCell<Option<Arc<Notify>>> = const { RefCell::new(None) };
}

thread_local! {
    /// The blocks of files this serving thread's sessions send, shared
    /// between them (see [`SharedBlocks`]).
    static SHARED_BLOCKS: RefCell<SharedBlocks> = RefCell::new(SharedBlocks::default());
}

/// Blocks a serving thread keeps for its sessions to share: 4 MiB of
/// 64 KiB blocks.
const SHARED_BLOCKS_KEPT: usize = 64;

/// Which file, and which version of it, a block was read from: sessions
/// that opened the same file share its blocks, and a file changed since
/// (its size or modification time) is another.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileIdentity {
    device: u64,
    inode: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

/// The blocks a serving thread read last, by file and offset, least
/// recently used first out. Sessions sending the same file near the same
/// place (viewers of a popular file, pulls started together) send from
/// one read of each block instead of copying it once each: with 20 pulls
/// of one file, `preadv2` was 9 % of the server's CPU. Payloads are slices
/// of the blocks, so an evicted block lives on until they have left.
#[derive(Default)]
struct SharedBlocks {
    blocks: Vec<SharedBlock>,
    uses: u64,
    /// The buffer for the next block to read: one an evicted block left
    /// (no payload held it any more), or one a read that the page cache
    /// could not answer gave back. A block is evicted only once its
    /// successor was read, so a session reading from the disk does not
    /// push the other files' blocks out.
    spare: Option<bytes::BytesMut>,
}

struct SharedBlock {
    file: FileIdentity,
    start: u64,
    bytes: bytes::Bytes,
    last_use: u64,
}

impl SharedBlocks {
    fn get(&mut self, file: FileIdentity, start: u64) -> Option<bytes::Bytes> {
        self.uses += 1;
        let block = self
            .blocks
            .iter_mut()
            .find(|b| b.start == start && b.file == file)?;
        block.last_use = self.uses;
        Some(block.bytes.clone())
    }

    /// A buffer of `len` bytes for a block about to be read; give it back
    /// with [`Self::give_back`] if the read fails.
    fn buffer(&mut self, len: usize) -> bytes::BytesMut {
        let mut buf = self.spare.take().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn give_back(&mut self, buf: bytes::BytesMut) {
        self.spare = Some(buf);
    }

    /// Keeps a block just read, evicting the least recently used one if
    /// the cache is full (its buffer becomes the spare if nothing holds it).
    fn insert(&mut self, file: FileIdentity, start: u64, bytes: bytes::Bytes) {
        if self.blocks.len() >= SHARED_BLOCKS_KEPT
            && let Some(i) = (0..self.blocks.len()).min_by_key(|&i| self.blocks[i].last_use)
            && let Ok(buf) = self.blocks.swap_remove(i).bytes.try_into_mut()
        {
            self.spare = Some(buf);
        }
        self.uses += 1;
        self.blocks.push(SharedBlock {
            file,
            start,
            bytes,
            last_use: self.uses,
        });
    }
}

/// Bytes a file is read in, off the serving thread.
const FILE_BLOCK_BYTES: u64 = 128 * 1024;
/// Blocks an open file keeps once its reads need the disk: the one being
/// sent, the one read ahead of it, and one for resends behind. 384 KiB
/// per transfer, and none while the page cache serves it.
const FILE_BLOCKS_KEPT: usize = 3;

/// A file being served. What the page cache holds is read on the serving
/// thread; what needs the disk is read on the blocking pool, a block ahead,
/// never on the serving thread: a slow disk (a network file system, a
/// spinning disk seeking between viewers) delays only the sessions reading
/// from it, as with object storage.
struct FileContent {
    file: Arc<File>,
    size: u64,
    tag: u64,
    identity: FileIdentity,
    reads: Arc<FileReads>,
}

/// A block read on the blocking pool.
struct PoolBlock {
    data: Vec<u8>,
    /// The page cache held all of it when the pool read it: the disk was
    /// not needed after all (see [`FileContent::read_at`]).
    was_cached: bool,
}

/// Blocks by start offset; `None` while the read is running.
type Blocks = VecDeque<(u64, Option<Result<PoolBlock, (io::ErrorKind, String)>>)>;

struct FileReads {
    blocks: Mutex<Blocks>,
    /// A read came back `WouldBlock`: the thread must be told when a block
    /// arrives (and only then, so read-ahead costs no wake-ups).
    waiting: AtomicBool,
    ready: Option<Arc<Notify>>,
    /// Blocks read on the pool so far.
    #[cfg(test)]
    pool_reads: AtomicU64,
}

impl FileContent {
    fn new(file: File, meta: &std::fs::Metadata) -> Self {
        let identity = FileIdentity {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        };
        FileContent {
            file: Arc::new(file),
            size: meta.len(),
            tag: content_tag(
                identity.size,
                identity.mtime,
                identity.mtime_nsec,
                identity.inode,
            ),
            identity,
            reads: Arc::new(FileReads {
                blocks: Mutex::new(VecDeque::new()),
                waiting: AtomicBool::new(false),
                ready: CONTENT_READY.with(|r| r.borrow().clone()),
                #[cfg(test)]
                pool_reads: AtomicU64::new(0),
            }),
        }
    }

    /// Reads `len` bytes at `start`, asking the page cache first (unless
    /// `probe_cache` is false) to learn whether the disk was needed.
    fn read_block(
        file: &File,
        start: u64,
        len: u64,
        probe_cache: bool,
    ) -> Result<PoolBlock, (io::ErrorKind, String)> {
        let mut data = vec![0u8; len as usize];
        let mut filled = 0;
        if probe_cache {
            match read_if_cached(file, start, &mut data) {
                Some(Ok(n)) => filled = n,
                Some(Err(e)) => return Err((e.kind(), e.to_string())),
                None => {}
            }
        }
        let was_cached = filled == data.len();
        while filled < data.len() {
            match file.read_at(&mut data[filled..], start + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err((e.kind(), e.to_string())),
            }
        }
        // A file that shrank gives a short block; the server reports it.
        data.truncate(filled);
        Ok(PoolBlock { data, was_cached })
    }

    /// Starts reading the block at `start` unless it is held or on its way;
    /// the block at `keep` (being sent from) is not evicted for it.
    fn fetch(&self, blocks: &mut Blocks, start: u64, keep: u64) {
        if start >= self.size || blocks.iter().any(|(s, _)| *s == start) {
            return;
        }
        if blocks.len() >= FILE_BLOCKS_KEPT {
            // The oldest finished block goes; reads on their way stay.
            if let Some(i) = blocks.iter().position(|(s, b)| b.is_some() && *s != keep) {
                blocks.remove(i);
            }
        }
        let len = FILE_BLOCK_BYTES.min(self.size - start);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (a tool or a test): read here.
            blocks.push_back((start, Some(Self::read_block(&self.file, start, len, false))));
            return;
        };
        blocks.push_back((start, None));
        let (file, reads) = (self.file.clone(), self.reads.clone());
        let probe_cache = !cache_probes_miss();
        runtime.spawn_blocking(move || {
            let block = Self::read_block(&file, start, len, probe_cache);
            #[cfg(test)]
            reads.pool_reads.fetch_add(1, Ordering::Relaxed);
            let mut blocks = reads.blocks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = blocks.iter_mut().find(|(s, b)| *s == start && b.is_none()) {
                slot.1 = Some(block);
            }
            drop(blocks);
            if let (true, Some(ready)) = (reads.waiting.swap(false, Ordering::AcqRel), &reads.ready)
            {
                ready.notify_one();
            }
        });
    }
}

/// Whether this thread's probes of the page cache are made to miss (a
/// test's cold disk); the pool's probes for a block follow the thread
/// that asked for it.
fn cache_probes_miss() -> bool {
    #[cfg(test)]
    return tests::PAGE_CACHE_MISSES.with(|m| m.get());
    #[cfg(not(test))]
    false
}

/// Reads from the page cache only (`preadv2` with `RWF_NOWAIT`): `None`
/// when the bytes are not cached or the file system cannot say.
fn read_if_cached(file: &File, offset: u64, buf: &mut [u8]) -> Option<io::Result<usize>> {
    use std::os::fd::AsRawFd;
    if cache_probes_miss() {
        return None;
    }
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let offset = libc::off_t::try_from(offset).ok()?;
    // SAFETY: `iov` points at `buf`, valid and writable for its length
    // for the duration of the call; the descriptor is `file`'s, open.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if n >= 0 {
        return Some(Ok(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Not cached, or not a question this file system answers.
        Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINTR) => {
            None
        }
        _ => Some(Err(e)),
    }
}

impl Content for FileContent {
    fn size(&self) -> u64 {
        self.size
    }
    fn tag(&self) -> u64 {
        self.tag
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let start = offset / FILE_BLOCK_BYTES * FILE_BLOCK_BYTES;
        let mut blocks = self.reads.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if !blocks.iter().any(|(s, _)| *s == start) {
            // What the page cache holds is copied here, at memory speed;
            // only what needs the disk goes to the blocking pool.
            match read_if_cached(&self.file, offset, buf) {
                Some(Ok(n)) if n > 0 => return Ok(n),
                Some(Err(e)) => return Err(e),
                _ => {}
            }
        }
        self.fetch(&mut blocks, start, start);
        // Reading ahead goes on while the blocks need the disk. A block
        // the page cache held after all ends it: the next is probed on
        // the thread again. A probe can miss a cached page (one marked for
        // the kernel's readahead answers EAGAIN to RWF_NOWAIT), and a file
        // whose every block then went through the pool cost a pulling
        // server twice the CPU, in hand-offs between threads.
        let mut read_ahead = true;
        let got = match blocks.iter().find(|(s, _)| *s == start) {
            Some((_, Some(Ok(PoolBlock { data, was_cached })))) => {
                let from = (offset - start) as usize;
                let n = buf.len().min(data.len().saturating_sub(from));
                buf[..n].copy_from_slice(&data[from..from + n]);
                read_ahead = !was_cached;
                Ok(n)
            }
            Some((_, Some(Err((kind, message))))) => {
                let e = io::Error::new(*kind, message.clone());
                // Asked again later, the block is read again.
                blocks.retain(|(s, _)| *s != start);
                return Err(e);
            }
            _ => {
                self.reads.waiting.store(true, Ordering::Release);
                Err(io::ErrorKind::WouldBlock.into())
            }
        };
        // The disk is slow here: read the next block meanwhile.
        if read_ahead {
            self.fetch(&mut blocks, start + FILE_BLOCK_BYTES, start);
        }
        got
    }
    /// From the thread's shared blocks, or read into them if the page
    /// cache holds the whole block; else `None` (the disk is needed, and
    /// `read_at` reads off the serving thread).
    fn shared_block(&self, start: u64) -> Option<bytes::Bytes> {
        if start >= self.size {
            return None;
        }
        SHARED_BLOCKS.with(|blocks| {
            let mut blocks = blocks.borrow_mut();
            if let Some(bytes) = blocks.get(self.identity, start) {
                return Some(bytes);
            }
            let len = READ_BLOCK_BYTES.min(usize::try_from(self.size - start).ok()?);
            let mut buf = blocks.buffer(len);
            match read_if_cached(&self.file, start, &mut buf) {
                Some(Ok(n)) if n == len => {}
                _ => {
                    blocks.give_back(buf);
                    return None;
                }
            }
            let bytes = buf.freeze();
            blocks.insert(self.identity, start, bytes.clone());
            Some(bytes)
        })
    }
    /// The index is found at open from a few small reads of the headers,
    /// made here: the blocks would not be there yet.
    fn media_index(&self) -> Option<gstudpvid::protocol::media_index::MediaIndex> {
        gstudpvid::protocol::media_index::locate_index(self.size, &mut |offset, buf| {
            self.file.read_at(buf, offset).unwrap_or(0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// On this thread every probe of the page cache misses. The probe
        /// that finds a page missing starts the kernel's readahead, and a
        /// virtual disk backed by the host's cache can complete it within
        /// the same call, so an evicted file's first read sometimes came
        /// from the cache (in CI, and in 1 of 8 runs here even with 20
        /// evictions in a row): the off-thread path is tested with misses
        /// made certain.
        pub(super) static PAGE_CACHE_MISSES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("udpvid-lib-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create temp dir");
        d
    }

    /// Drops `path`'s pages from the page cache, so the pool's reads go
    /// to the disk as on a cold server. The advice does not reach pages
    /// still in another CPU's batch of pages not yet on the kernel's
    /// lists, so it is repeated until mincore finds none resident, for up
    /// to a second; best effort, since the misses the test relies on are
    /// made certain by `PAGE_CACHE_MISSES`.
    fn evict_from_page_cache(path: &std::path::Path, len: u64) {
        use std::os::fd::AsRawFd;
        let f = File::open(path).expect("open");
        f.sync_all().expect("sync");
        let len = len as usize;
        // Residency from mincore, which (unlike a RWF_NOWAIT read, which
        // starts the readahead of what it misses) brings nothing in.
        let resident_pages = || -> usize {
            // SAFETY: a fresh read-only shared mapping of an open file of
            // `len` bytes, unmapped before returning; mincore writes one
            // byte per page into `pages`, sized for the mapping.
            unsafe {
                let map = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                );
                assert_ne!(map, libc::MAP_FAILED, "mmap");
                let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).unwrap_or(4096);
                let mut pages = vec![0u8; len.div_ceil(page)];
                let r = libc::mincore(map, len, pages.as_mut_ptr());
                libc::munmap(map, len);
                assert_eq!(r, 0, "mincore");
                pages.iter().filter(|p| **p & 1 == 1).count()
            }
        };
        for _ in 0..50 {
            // SAFETY: a plain advice call on an open descriptor.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(r, 0);
            if resident_pages() == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `test` on a serving thread as the server's: a current-thread
    /// runtime whose content-ready wake-up (given to `test`) the files
    /// opened on it use.
    fn on_a_serving_thread<F: std::future::Future>(
        test: impl FnOnce(Arc<Notify>) -> F,
    ) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let ready = Arc::new(Notify::new());
            CONTENT_READY.with(|r| *r.borrow_mut() = Some(ready.clone()));
            test(ready).await
        })
    }

    #[test]
    fn reads_that_need_the_disk_run_off_the_serving_thread_a_block_ahead() {
        let dir = temp_dir("offthread");
        let data: Vec<u8> = (0..(FILE_BLOCK_BYTES * 3 + 1000) as u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(dir.join("f.bin"), &data).expect("write");
        let library = Library::new(&dir).expect("library");
        // Borrowed by the test's future, which takes only the wake-up.
        let (dir, data) = (&dir, &data);
        on_a_serving_thread(|ready| async move {
            let mut buf = vec![0u8; 1400];
            // As on a disk that has not been read yet: out of the page
            // cache, and the probes told so (see `PAGE_CACHE_MISSES`).
            evict_from_page_cache(&dir.join("f.bin"), data.len() as u64);
            PAGE_CACHE_MISSES.with(|m| m.set(true));
            let content = library.open("f.bin").map_err(|e| e.message).expect("open");
            // Nothing read yet: the serving thread is not made to wait.
            let first = content.read_at(0, &mut buf).map(|_| ());
            assert_eq!(first.map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
            // The first block and the one read ahead of it are read at
            // once, on two pool threads: whichever lands first wakes the
            // thread, so the first block may take one more wake-up.
            let mut first_wakes = 0;
            loop {
                tokio::time::timeout(Duration::from_secs(5), ready.notified())
                    .await
                    .expect("told when the block arrived");
                first_wakes += 1;
                match content.read_at(0, &mut buf) {
                    Ok(n) => {
                        assert_eq!(n, buf.len());
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && first_wakes < 3 => {}
                    Err(e) => panic!("first block: {e}"),
                }
            }
            let mut got = Vec::new();
            let mut waits = 0;
            while got.len() < data.len() {
                match content.read_at(got.len() as u64, &mut buf) {
                    Ok(0) => panic!("end of file at {}", got.len()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        waits += 1;
                        tokio::time::timeout(Duration::from_secs(5), ready.notified())
                            .await
                            .expect("told when the block arrived");
                    }
                    Err(e) => panic!("{e}"),
                }
                // Sending at a 2 Mbit/s viewer's pace (a block per half
                // second): the next block is read meanwhile, and is there
                // when sending reaches it. (100 ms was too short for a
                // debug build on a busy machine: CI once waited.)
                if got.len() as u64 % FILE_BLOCK_BYTES < buf.len() as u64 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            assert_eq!(got, *data);
            assert_eq!(waits, 0, "sending waited for a block read ahead");
            // Now cached: read at once, on the thread, without a block.
            PAGE_CACHE_MISSES.with(|m| m.set(false));
            let again = library.open("f.bin").map_err(|e| e.message).expect("open");
            assert_eq!(again.read_at(10, &mut buf).ok(), Some(1400));
            assert_eq!(buf[..], data[10..1410]);
            assert_eq!(content.read_at(data.len() as u64, &mut buf).ok(), Some(0));
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn sessions_of_one_file_share_its_blocks_and_a_changed_file_does_not() {
        let dir = temp_dir("sharedblocks");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(dir.join("f.bin"), &data).expect("write");
        let open = || {
            let file = File::open(dir.join("f.bin")).expect("open");
            let meta = file.metadata().expect("metadata");
            FileContent::new(file, &meta)
        };
        let (a, b) = (open(), open());
        let block = READ_BLOCK_BYTES as u64;
        for start in [0, block, 4 * block] {
            let (Some(x), Some(y)) = (a.shared_block(start), b.shared_block(start)) else {
                panic!("block {start} not shared: the file was just written, so cached");
            };
            // One read, one buffer, for both sessions.
            assert_eq!(x.as_ptr(), y.as_ptr());
            let end = (start + block).min(data.len() as u64) as usize;
            assert_eq!(x[..], data[start as usize..end]);
        }
        assert!(a.shared_block(data.len() as u64).is_none());
        // Rewritten (another size), the file is another: new sessions get
        // its bytes, not the old blocks.
        let changed: Vec<u8> = data.iter().map(|b| b ^ 0xff).take(250_000).collect();
        std::fs::write(dir.join("f.bin"), &changed).expect("write");
        let c = open();
        let x = c.shared_block(0).expect("cached");
        assert_eq!(x[..], changed[..READ_BLOCK_BYTES]);
        // The cache stays bounded: a walk through many blocks keeps at
        // most SHARED_BLOCKS_KEPT.
        let big: Vec<u8> = vec![3u8; READ_BLOCK_BYTES * (SHARED_BLOCKS_KEPT + 10)];
        std::fs::write(dir.join("big.bin"), &big).expect("write");
        let file = File::open(dir.join("big.bin")).expect("open");
        let meta = file.metadata().expect("metadata");
        let d = FileContent::new(file, &meta);
        for i in 0..(SHARED_BLOCKS_KEPT + 10) as u64 {
            assert!(d.shared_block(i * block).is_some());
        }
        SHARED_BLOCKS.with(|s| assert_eq!(s.borrow().blocks.len(), SHARED_BLOCKS_KEPT));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cached_file_leaves_the_pool_after_a_probe_that_missed() {
        let dir = temp_dir("backtothread");
        let blocks = 8;
        let data: Vec<u8> = (0..(FILE_BLOCK_BYTES * blocks) as u32)
            .map(|i| (i * 13 % 251) as u8)
            .collect();
        std::fs::write(dir.join("f.bin"), &data).expect("write");
        // Borrowed by the test's future, which takes only the wake-up.
        let (dir, data) = (&dir, &data);
        on_a_serving_thread(|ready| async move {
            let file = File::open(dir.join("f.bin")).expect("open");
            let meta = file.metadata().expect("metadata");
            let content = FileContent::new(file, &meta);
            let mut buf = vec![0u8; 1400];
            // The file is cached (just written), but the first probe
            // misses, as one of a page marked for readahead does: the
            // first block and the next go to the pool, read as from disk.
            PAGE_CACHE_MISSES.with(|m| m.set(true));
            let first = content.read_at(0, &mut buf).map(|_| ());
            assert_eq!(first.map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
            PAGE_CACHE_MISSES.with(|m| m.set(false));
            let mut got = Vec::new();
            while got.len() < data.len() {
                // At a viewer's pace: what was read ahead has landed when
                // sending reaches it.
                if got.len() as u64 % FILE_BLOCK_BYTES < buf.len() as u64 {
                    let all_landed = || {
                        let blocks = content.reads.blocks.lock().expect("blocks");
                        blocks.iter().all(|(_, b)| b.is_some())
                    };
                    for _ in 0..5000 {
                        if all_landed() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                match content.read_at(got.len() as u64, &mut buf) {
                    Ok(0) => panic!("end of file at {}", got.len()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tokio::time::timeout(Duration::from_secs(5), ready.notified())
                            .await
                            .expect("told when the block arrived");
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got, *data);
            // Blocks 0 and 1 as from disk; block 2, read ahead of block
            // 1, was found cached, so block 3 on was read on the thread.
            assert_eq!(content.reads.pool_reads.load(Ordering::Relaxed), 3);
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_content_tag_is_stable_and_follows_the_content() {
        // A fixed value: a change here breaks every client's resume after
        // a server upgrade.
        assert_eq!(
            content_tag(1000, 1_700_000_000, 5, 42),
            6_008_544_370_280_288_354
        );
        let base = content_tag(1000, 1_700_000_000, 5, 42);
        for other in [
            content_tag(1001, 1_700_000_000, 5, 42),
            content_tag(1000, 1_700_000_001, 5, 42),
            content_tag(1000, 1_700_000_000, 6, 42),
            content_tag(1000, 1_700_000_000, 5, 43),
        ] {
            assert_ne!(other, base);
        }
    }

    #[test]
    fn serves_only_regular_files_inside() {
        let base = temp_dir("sandbox");
        let served = base.join("served");
        std::fs::create_dir_all(served.join("sub")).expect("mkdir");
        std::fs::write(served.join("a.mp4"), b"aaaa").expect("write");
        std::fs::write(served.join("sub/b.mkv"), b"bb").expect("write");
        std::fs::write(base.join("secret.txt"), b"secret").expect("write");
        std::os::unix::fs::symlink(base.join("secret.txt"), served.join("escape.mp4"))
            .expect("symlink");
        std::os::unix::fs::symlink(served.join("a.mp4"), served.join("inside.mp4"))
            .expect("symlink");
        let lib = Library::new(&served).expect("library");
        let names: Vec<String> = lib.catalog().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["a.mp4", "inside.mp4", "sub/b.mkv"]);
        assert!(lib.open("a.mp4").is_ok());
        assert!(lib.open("sub/b.mkv").is_ok());
        assert!(lib.open("inside.mp4").is_ok());
        for bad in [
            "../secret.txt",
            "/etc/passwd",
            "escape.mp4",
            "sub",
            "",
            "a.mp4\0",
            "sub/../../secret.txt",
        ] {
            let err = lib
                .open(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} was served"));
            assert_eq!(err.kind, OpenErrorKind::NotFound, "{bad:?}");
        }
        let f = lib.open("a.mp4").expect("open");
        let mut buf = [0u8; 8];
        assert_eq!(f.read_at(1, &mut buf).expect("read"), 3);
        let long = "x/".repeat(600) + "a.mp4";
        assert_eq!(
            lib.open(&long).err().map(|e| e.kind),
            Some(OpenErrorKind::NotFound)
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn the_catalog_is_cached_and_follows_changes_to_the_folder() {
        let served = temp_dir("cache");
        std::fs::create_dir_all(served.join("sub")).expect("mkdir");
        std::fs::write(served.join("a.mp4"), b"a").expect("write");
        // Folders modified just now are "racy" and do not vouch for the
        // cache: backdate them, as if the folder had been still a while.
        let settle = |dir: &Path| {
            let past = SystemTime::now() - Duration::from_secs(5);
            for d in [dir.to_path_buf(), dir.join("sub")] {
                let f = File::open(&d).expect("open folder");
                f.set_modified(past).expect("set mtime");
            }
        };
        settle(&served);
        let lib = Library::new(&served).expect("library");
        let names =
            |lib: &Library| -> Vec<String> { lib.catalog().into_iter().map(|e| e.name).collect() };
        assert_eq!(names(&lib), vec!["a.mp4"]);
        assert_eq!(names(&lib), vec!["a.mp4"]);
        assert_eq!(
            lib.catalog_walks(),
            1,
            "an unchanged folder was walked again"
        );
        // A new file in a subfolder is seen at the next request.
        std::fs::write(served.join("sub/b.mkv"), b"bb").expect("write");
        assert_eq!(names(&lib), vec!["a.mp4", "sub/b.mkv"]);
        settle(&served);
        let walks = lib.catalog_walks();
        assert_eq!(names(&lib), vec!["a.mp4", "sub/b.mkv"]);
        assert_eq!(names(&lib), vec!["a.mp4", "sub/b.mkv"]);
        assert_eq!(lib.catalog_walks(), walks + 1);
        // Removing and renaming are seen too.
        std::fs::rename(served.join("a.mp4"), served.join("c.mp4")).expect("rename");
        assert_eq!(names(&lib), vec!["c.mp4", "sub/b.mkv"]);
        std::fs::remove_file(served.join("sub/b.mkv")).expect("remove");
        assert_eq!(names(&lib), vec!["c.mp4"]);
        let _ = std::fs::remove_dir_all(&served);
    }

    #[test]
    fn fifos_devices_and_undecodable_names_are_neither_listed_nor_served() {
        use std::os::unix::ffi::OsStrExt;
        let served = temp_dir("special");
        std::fs::write(served.join("ok.ts"), b"ts").expect("write");
        let status = std::process::Command::new("mkfifo")
            .arg(served.join("pipe.mp4"))
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
        // A symlink to a device inside the folder's reach is still a device.
        std::os::unix::fs::symlink("/dev/zero", served.join("zero.mp4")).expect("symlink");
        let bad_name = std::ffi::OsStr::from_bytes(b"caf\xe9.mkv");
        std::fs::write(served.join(bad_name), b"latin-1 name").expect("write");
        let lib = Library::new(&served).expect("library");
        let names: Vec<String> = lib.catalog().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["ok.ts"]);
        for bad in ["pipe.mp4", "zero.mp4", "caf\u{fffd}.mkv"] {
            let err = lib
                .open(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} was served"));
            assert_eq!(err.kind, OpenErrorKind::NotFound, "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&served);
    }
}
