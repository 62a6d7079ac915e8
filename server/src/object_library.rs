//! A library in S3-compatible object storage (`--store s3://bucket/prefix`):
//! AWS S3, MinIO, Ceph RGW, Garage, configured from the usual `AWS_*`
//! environment (`AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for a self-hosted
//! server).
//!
//! - The catalog is the listing under the prefix, refreshed in the
//!   background; opening a file looks it up there (size and ETag), so an
//!   open never waits on the store.
//! - Bytes come in aligned blocks by ranged GETs that carry the ETag the
//!   file was opened with (`If-Match`): an object replaced in the store
//!   fails the next block instead of splicing two versions.
//! - All sessions share one bounded block cache. A block being fetched is
//!   fetched once, whoever else asks meanwhile (nginx's
//!   `proxy_cache_lock`), so N viewers of one file cost about one copy.
//! - A block not there yet makes the read fail with `WouldBlock`: only the
//!   sessions that wait on it wait; the fetch wakes the endpoint when done.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, RetryConfig,
};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::disk_cache::{DiskCache, block_file_name};

use gstudpvid::protocol::catalog::CatalogEntry;
use gstudpvid::protocol::wire::MAX_TEXT_LEN;
use gstudpvid::protocol::{Content, ContentStore, OpenErrorKind, OpenFailure};

/// Bytes per GET: large enough that a GET's latency is paid once per
/// second or so of a viewer's media, small enough that a seek fetches
/// little it will not play.
pub const DEFAULT_BLOCK_BYTES: u64 = 1024 * 1024;
/// Blocks fetched ahead of the one a session reads, so the sender never
/// waits on the store while the stream flows.
const PREFETCH_BLOCKS: u64 = 2;
/// A failed block is not asked for again sooner than this: a dead store is
/// not hammered by every session's every datagram.
const FAILURE_MEMORY: Duration = Duration::from_secs(1);
/// The most of a store's error text passed on.
const MAX_DETAIL_CHARS: usize = 240;
/// Objects listed at most (the same bound as a folder's catalog).
const MAX_LISTED: usize = 10_000;

/// What the store did, for the operator's metrics.
#[derive(Default)]
pub struct StoreCounters {
    pub gets: AtomicU64,
    pub bytes_read: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub cache_peak_bytes: AtomicU64,
    pub disk_hits: AtomicU64,
    pub disk_bytes: AtomicU64,
    pub errors_unreachable: AtomicU64,
    pub errors_credentials: AtomicU64,
    pub errors_missing: AtomicU64,
    pub errors_changed: AtomicU64,
}

/// Why a GET or a listing failed, in words for the client and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    Unreachable,
    Credentials,
    Missing,
    Changed,
}

impl StoreFailure {
    fn of(e: &object_store::Error) -> Self {
        match e {
            object_store::Error::Precondition { .. } => StoreFailure::Changed,
            object_store::Error::NotFound { .. } => StoreFailure::Missing,
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => StoreFailure::Credentials,
            // A listing's refusal comes back as a generic error: the S3
            // error code in its text says what it is.
            other => {
                let text = other.to_string();
                let refused = ["403 Forbidden", "401 Unauthorized"]
                    .iter()
                    .any(|m| text.contains(m))
                    || s3_code(&text).is_some_and(|c| {
                        matches!(
                            c,
                            "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied"
                        )
                    });
                if refused {
                    StoreFailure::Credentials
                } else {
                    StoreFailure::Unreachable
                }
            }
        }
    }

    fn explain(self, e: &object_store::Error) -> String {
        let text = e.to_string();
        // The store's own word when it gave one, else the error cut short:
        // it travels to the client in one datagram.
        let detail = s3_code(&text).map_or_else(
            || text.chars().take(MAX_DETAIL_CHARS).collect::<String>(),
            str::to_owned,
        );
        match self {
            StoreFailure::Changed => "the object changed in the store while it was being served \
                 (its ETag no longer matches); start again to play the new version"
                .to_string(),
            StoreFailure::Missing => "the object is no longer in the store".to_string(),
            StoreFailure::Credentials => {
                format!("the store refused the server's credentials ({detail})")
            }
            StoreFailure::Unreachable => format!("the store is unreachable ({detail})"),
        }
    }

    fn count(self, counters: &StoreCounters) {
        let c = match self {
            StoreFailure::Unreachable => &counters.errors_unreachable,
            StoreFailure::Credentials => &counters.errors_credentials,
            StoreFailure::Missing => &counters.errors_missing,
            StoreFailure::Changed => &counters.errors_changed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The `<Code>` of an S3 error document quoted in `text`.
fn s3_code(text: &str) -> Option<&str> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(&text[start..start + len])
}

#[derive(Clone)]
struct ListedObject {
    key: ObjectPath,
    size: u64,
    etag: Option<String>,
}

#[derive(Default)]
struct Listing {
    objects: HashMap<String, ListedObject>,
    entries: Vec<CatalogEntry>,
    /// A listing succeeded at least once.
    listed: bool,
    /// Why the last listing failed, if it did.
    error: Option<String>,
}

/// One block of one version of one object.
#[derive(Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    /// Key and ETag: a new version of an object never hits the old blocks.
    object: Arc<str>,
    index: u64,
}

enum Slot {
    Fetching,
    Ready { data: Bytes, last_use: u64 },
    Failed { message: String, at: Instant },
}

/// The blocks all sessions share, least recently used evicted first.
struct BlockCache {
    slots: HashMap<BlockKey, Slot>,
    bytes: u64,
    cap: u64,
    clock: u64,
}

impl BlockCache {
    /// Inserts a fetched block and evicts down to the cap; the new block
    /// stays even if it alone is over the cap (the session needs it now).
    fn insert(&mut self, key: BlockKey, data: Bytes) {
        self.clock += 1;
        self.bytes += data.len() as u64;
        self.slots.insert(
            key.clone(),
            Slot::Ready {
                data,
                last_use: self.clock,
            },
        );
        while self.bytes > self.cap {
            let victim = self
                .slots
                .iter()
                .filter(|(k, _)| **k != key)
                .filter_map(|(k, s)| match s {
                    Slot::Ready { last_use, .. } => Some((*last_use, k.clone())),
                    _ => None,
                })
                .min_by_key(|(t, _)| *t)
                .map(|(_, k)| k);
            let Some(victim) = victim else { break };
            if let Some(Slot::Ready { data, .. }) = self.slots.remove(&victim) {
                self.bytes -= data.len() as u64;
            }
        }
    }
}

struct Shared {
    store: Arc<dyn ObjectStore>,
    prefix: Option<ObjectPath>,
    listing: Mutex<Listing>,
    cache: Mutex<BlockCache>,
    /// Told when a fetch ends, so waiting sessions try again.
    /// One per serving thread: a fetched block may be awaited by a
    /// session of any of them.
    ready: Vec<Arc<Notify>>,
    counters: Arc<StoreCounters>,
    block_bytes: u64,
    /// The second tier, if the server has one.
    disk: Option<Arc<DiskCache>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct ObjectLibrary {
    shared: Arc<Shared>,
    url: String,
}

/// `s3://bucket[/prefix]` split into bucket and prefix.
pub fn parse_store_url(url: &str) -> Result<(String, Option<String>), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{url:?}: the store must be s3://bucket[/prefix]"))?;
    let (bucket, prefix) = match rest.split_once('/') {
        Some((b, p)) => (b, p.trim_matches('/')),
        None => (rest, ""),
    };
    if bucket.is_empty() {
        return Err(format!("{url:?}: no bucket"));
    }
    Ok((
        bucket.to_owned(),
        (!prefix.is_empty()).then(|| prefix.to_owned()),
    ))
}

impl ObjectLibrary {
    /// A library over `url` (`s3://bucket[/prefix]`) with the `AWS_*`
    /// environment's endpoint and credentials. Nothing is asked of the
    /// store yet: [`ObjectLibrary::refresh`] lists it.
    pub fn new(
        url: &str,
        block_bytes: u64,
        cache_bytes: u64,
        disk: Option<DiskCache>,
        ready: Vec<Arc<Notify>>,
    ) -> Result<Self, String> {
        let (bucket, prefix) = parse_store_url(url)?;
        // A store that does not answer is reported within seconds, not
        // after object_store's default three minutes of retries.
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 2,
            retry_timeout: Duration::from_secs(5),
        };
        // Set as keys, not as a whole ClientOptions, which would drop what
        // the environment set (AWS_ALLOW_HTTP, a proxy).
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry)
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                "2s",
            )
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "20s")
            .build()
            .map_err(|e| format!("{url}: {e}"))?;
        let block_bytes = block_bytes.max(64 * 1024);
        let min_cache = (PREFETCH_BLOCKS + 2) * block_bytes;
        if cache_bytes < min_cache {
            warn!(
                asked = cache_bytes,
                used = min_cache,
                "the block cache must hold four blocks; using more memory than asked"
            );
        }
        let counters = Arc::new(StoreCounters::default());
        if let Some(d) = &disk {
            counters.disk_bytes.store(d.bytes(), Ordering::Relaxed);
        }
        Ok(ObjectLibrary {
            shared: Arc::new(Shared {
                store: Arc::new(store),
                prefix: prefix.map(ObjectPath::from),
                listing: Mutex::new(Listing::default()),
                cache: Mutex::new(BlockCache {
                    slots: HashMap::new(),
                    bytes: 0,
                    // A block being read and the ones fetched ahead of it
                    // must fit, or they evict each other.
                    cap: cache_bytes.max(min_cache),
                    clock: 0,
                }),
                ready,
                counters,
                block_bytes,
                disk: disk.map(Arc::new),
            }),
            url: url.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn counters(&self) -> Arc<StoreCounters> {
        self.shared.counters.clone()
    }

    /// Lists the store anew; on failure the previous listing stays.
    pub async fn refresh(&self) -> Result<usize, String> {
        let shared = &self.shared;
        let mut stream = shared.store.list(shared.prefix.as_ref());
        let mut objects = HashMap::new();
        let mut entries = Vec::new();
        let base = shared
            .prefix
            .as_ref()
            .map(|p| format!("{}/", p.as_ref()))
            .unwrap_or_default();
        while let Some(item) = stream.next().await {
            let meta = match item {
                Ok(m) => m,
                Err(e) => {
                    let failure = StoreFailure::of(&e);
                    failure.count(&shared.counters);
                    let why = failure.explain(&e);
                    lock(&shared.listing).error = Some(why.clone());
                    return Err(why);
                }
            };
            let key = meta.location.as_ref();
            let Some(name) = key.strip_prefix(&base) else {
                continue;
            };
            // Folder markers and names a catalog cannot carry are skipped.
            if name.is_empty() || name.ends_with('/') || name.len() > MAX_TEXT_LEN {
                continue;
            }
            if objects.len() >= MAX_LISTED {
                break;
            }
            entries.push(CatalogEntry {
                name: name.to_owned(),
                size: meta.size,
            });
            objects.insert(
                name.to_owned(),
                ListedObject {
                    key: meta.location.clone(),
                    size: meta.size,
                    etag: meta.e_tag.clone(),
                },
            );
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let count = entries.len();
        let mut listing = lock(&shared.listing);
        *listing = Listing {
            objects,
            entries,
            listed: true,
            error: None,
        };
        Ok(count)
    }

    /// Lists the store every `every`, logging when that starts or stops
    /// failing.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration) {
        let library = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(every).await;
                match library.refresh().await {
                    Ok(n) if failing => {
                        failing = false;
                        info!(store = library.url, objects = n, "store listed again");
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        failing = true;
                        warn!(store = library.url, error = e, "cannot list the store");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

impl ContentStore for ObjectLibrary {
    fn catalog(&self) -> Vec<CatalogEntry> {
        lock(&self.shared.listing).entries.clone()
    }

    fn open(&self, path: &str) -> Result<Box<dyn Content>, OpenFailure> {
        let listing = lock(&self.shared.listing);
        let Some(object) = listing.objects.get(path).cloned() else {
            if !listing.listed {
                let why = listing
                    .error
                    .clone()
                    .unwrap_or_else(|| "the store has not been listed yet".into());
                return Err(OpenFailure {
                    kind: OpenErrorKind::NotReadable,
                    message: format!("{path}: the server cannot list its store: {why}"),
                    detail: why,
                });
            }
            return Err(OpenFailure {
                kind: OpenErrorKind::NotFound,
                message: format!("{path}: not found on the server"),
                detail: format!("no object {path:?} under {}", self.url),
            });
        };
        drop(listing);
        let etag = object.etag.clone().unwrap_or_default();
        Ok(Box::new(ObjectContent {
            shared: self.shared.clone(),
            tag: content_tag(&etag, object.size),
            identity: format!("{}\0{etag}", object.key).into(),
            object,
        }))
    }
}

/// The same for every server that lists the same object: from its ETag
/// and size, through a digest no Rust release changes.
pub fn content_tag(etag: &str, size: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(b"udpvid object tag v1\0");
    h.update(etag.as_bytes());
    h.update(size.to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

struct ObjectContent {
    shared: Arc<Shared>,
    object: ListedObject,
    identity: Arc<str>,
    tag: u64,
}

enum Block {
    Ready(Bytes),
    Pending,
    Failed(String),
}

impl ObjectContent {
    fn block_range(&self, index: u64) -> Range<u64> {
        let start = index * self.shared.block_bytes;
        start..(start + self.shared.block_bytes).min(self.object.size)
    }

    /// The block, from the cache or asked for (once, whoever asks).
    fn block(&self, index: u64, counted: bool) -> Block {
        let key = BlockKey {
            object: self.identity.clone(),
            index,
        };
        let counters = &self.shared.counters;
        {
            let mut cache = lock(&self.shared.cache);
            cache.clock += 1;
            let clock = cache.clock;
            match cache.slots.get_mut(&key) {
                Some(Slot::Ready { data, last_use }) => {
                    *last_use = clock;
                    if counted {
                        counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                    }
                    return Block::Ready(data.clone());
                }
                Some(Slot::Fetching) => return Block::Pending,
                Some(Slot::Failed { message, at }) if at.elapsed() < FAILURE_MEMORY => {
                    return Block::Failed(message.clone());
                }
                _ => {}
            }
            cache.slots.insert(key.clone(), Slot::Fetching);
        }
        counters.cache_misses.fetch_add(1, Ordering::Relaxed);
        self.fetch(key, self.block_range(index));
        Block::Pending
    }

    fn fetch(&self, key: BlockKey, range: Range<u64>) {
        let shared = self.shared.clone();
        let location = self.object.key.clone();
        let etag = self.object.etag.clone();
        tokio::spawn(async move {
            let expected = range.end - range.start;
            let file = block_file_name(&key.object, key.index);
            if let Some(data) = from_disk(&shared, &file, expected).await {
                shared.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                return finish(&shared, key, Ok(data));
            }
            let options = GetOptions {
                if_match: etag,
                range: Some(GetRange::Bounded(range.clone())),
                ..Default::default()
            };
            shared.counters.gets.fetch_add(1, Ordering::Relaxed);
            let result = match shared.store.get_opts(&location, options).await {
                Ok(r) => r.bytes().await,
                Err(e) => Err(e),
            };
            let slot = match result {
                Ok(data) if data.len() as u64 == expected => {
                    shared
                        .counters
                        .bytes_read
                        .fetch_add(expected, Ordering::Relaxed);
                    to_disk(&shared, file, data.clone());
                    Ok(data)
                }
                Ok(data) => Err(format!(
                    "the store returned {} bytes for {}..{} of {location}",
                    data.len(),
                    range.start,
                    range.end
                )),
                Err(e) => {
                    let failure = StoreFailure::of(&e);
                    failure.count(&shared.counters);
                    Err(failure.explain(&e))
                }
            };
            if let Err(message) = &slot {
                warn!(object = %location, range = ?range, error = message, "store read failed");
            }
            finish(&shared, key, slot);
        });
    }
}

/// A block from the disk tier, if it holds it whole.
async fn from_disk(shared: &Shared, file: &str, expected: u64) -> Option<Bytes> {
    let disk = shared.disk.as_ref()?;
    let path = disk.lookup(file)?;
    match tokio::fs::read(&path).await {
        Ok(data) if data.len() as u64 == expected => Some(Bytes::from(data)),
        _ => {
            disk.forget(file);
            None
        }
    }
}

/// Keeps a fetched block in the disk tier, off the serving thread.
fn to_disk(shared: &Arc<Shared>, file: String, data: Bytes) {
    let Some(disk) = shared.disk.clone() else {
        return;
    };
    let counters = shared.counters.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = disk.store(&file, &data) {
            warn!(file, error = %e, "cannot keep a block in the cache folder");
        }
        counters.disk_bytes.store(disk.bytes(), Ordering::Relaxed);
    });
}

/// Puts a fetch's outcome in the memory tier and wakes the sessions.
fn finish(shared: &Shared, key: BlockKey, slot: Result<Bytes, String>) {
    {
        let mut cache = lock(&shared.cache);
        match slot {
            Ok(data) => cache.insert(key, data),
            Err(message) => {
                cache.slots.insert(
                    key,
                    Slot::Failed {
                        message,
                        at: Instant::now(),
                    },
                );
            }
        }
        let bytes = cache.bytes;
        shared.counters.cache_bytes.store(bytes, Ordering::Relaxed);
        shared
            .counters
            .cache_peak_bytes
            .fetch_max(bytes, Ordering::Relaxed);
    }
    for ready in &shared.ready {
        ready.notify_one();
    }
}

impl Content for ObjectContent {
    fn size(&self) -> u64 {
        self.object.size
    }

    fn tag(&self) -> u64 {
        self.tag
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= self.object.size || buf.is_empty() {
            return Ok(0);
        }
        let index = offset / self.shared.block_bytes;
        let last = (self.object.size - 1) / self.shared.block_bytes;
        let block = self.block(index, true);
        // The blocks after it are asked for while this one is read, so a
        // flowing stream finds them there.
        for ahead in index + 1..=(index + PREFETCH_BLOCKS).min(last) {
            if let Block::Failed(_) = self.block(ahead, false) {
                break;
            }
        }
        match block {
            Block::Ready(data) => {
                let from = (offset - index * self.shared.block_bytes) as usize;
                let n = buf.len().min(data.len().saturating_sub(from));
                buf[..n].copy_from_slice(&data[from..from + n]);
                Ok(n)
            }
            Block::Pending => Err(io::ErrorKind::WouldBlock.into()),
            Block::Failed(message) => Err(io::Error::other(message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_name_a_bucket_and_maybe_a_prefix() {
        assert_eq!(parse_store_url("s3://lib"), Ok(("lib".into(), None)));
        assert_eq!(
            parse_store_url("s3://lib/films/hd/"),
            Ok(("lib".into(), Some("films/hd".into())))
        );
        assert!(parse_store_url("s3:///x").is_err());
        assert!(parse_store_url("http://lib").is_err());
    }

    #[test]
    fn s3_error_codes_are_read_from_the_error_text() {
        let text = "Generic S3 error: 403 Forbidden: <Error><Code>InvalidAccessKeyId</Code>\
                    <Message>nope</Message></Error>";
        assert_eq!(s3_code(text), Some("InvalidAccessKeyId"));
        assert_eq!(s3_code("connection refused"), None);
        assert_eq!(s3_code("<Code>unclosed"), None);
    }

    #[test]
    fn the_content_tag_follows_etag_and_size_only() {
        assert_eq!(content_tag("\"abc\"", 10), content_tag("\"abc\"", 10));
        assert_ne!(content_tag("\"abc\"", 10), content_tag("\"abd\"", 10));
        assert_ne!(content_tag("\"abc\"", 10), content_tag("\"abc\"", 11));
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_down_to_its_cap() {
        let mut cache = BlockCache {
            slots: HashMap::new(),
            bytes: 0,
            cap: 3000,
            clock: 0,
        };
        let key = |i| BlockKey {
            object: Arc::from("o"),
            index: i,
        };
        for i in 0..3 {
            cache.insert(key(i), Bytes::from(vec![0u8; 1000]));
        }
        // Block 0 is used again, so block 1 is the oldest.
        cache.clock += 1;
        if let Some(Slot::Ready { last_use, .. }) = cache.slots.get_mut(&key(0)) {
            *last_use = 100;
        }
        cache.insert(key(3), Bytes::from(vec![0u8; 1000]));
        assert_eq!(cache.bytes, 3000);
        assert!(!cache.slots.contains_key(&key(1)));
        assert!(cache.slots.contains_key(&key(0)));
        // A block larger than the cap still goes in, alone.
        cache.insert(key(9), Bytes::from(vec![0u8; 5000]));
        assert_eq!(cache.bytes, 5000);
        assert_eq!(cache.slots.len(), 1);
    }
}
