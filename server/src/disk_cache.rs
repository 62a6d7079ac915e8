//! The block cache's second tier (`--cache-dir DIR --cache-dir-mb N`):
//! blocks of objects fetched from the store, kept as files so they survive
//! memory eviction and restarts, least recently used out first.
//!
//! A block's file is named after the object's key and ETag (hashed) and
//! the block's number, so a new version of an object never finds an old
//! version's blocks. Files are written under a temporary name and renamed,
//! so a crash leaves no partial block under a real name. File I/O runs on
//! tokio's blocking pool, never on the thread that serves the sessions.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};

const TEMP_SUFFIX: &str = ".partial";

struct Entry {
    bytes: u64,
    last_use: u64,
}

struct Index {
    files: HashMap<String, Entry>,
    bytes: u64,
    clock: u64,
}

pub struct DiskCache {
    dir: PathBuf,
    cap: u64,
    index: Mutex<Index>,
}

fn lock(m: &Mutex<Index>) -> std::sync::MutexGuard<'_, Index> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The file name of block `index` of `object` (its key and ETag).
pub fn block_file_name(object: &str, index: u64) -> String {
    let digest = Sha256::digest(object.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{index}")
}

fn is_block_file_name(name: &str) -> bool {
    name.split_once('-').is_some_and(|(hex, index)| {
        hex.len() == 32
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
            && index.parse::<u64>().is_ok()
    })
}

impl DiskCache {
    /// Opens (creating it if needed) `dir`, indexes the blocks an earlier
    /// run left, removes partial files and anything over `cap`.
    pub fn open(dir: &Path, cap: u64) -> io::Result<DiskCache> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(TEMP_SUFFIX) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if !is_block_file_name(&name) {
                continue;
            }
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            let used = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            found.push((used, name, meta.len()));
        }
        // Oldest first, so their clock values are the smallest.
        found.sort();
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            cap,
            index: Mutex::new(Index {
                files: HashMap::new(),
                bytes: 0,
                clock: 0,
            }),
        };
        {
            let mut index = lock(&cache.index);
            for (_, name, bytes) in found {
                index.clock += 1;
                let last_use = index.clock;
                index.bytes += bytes;
                index.files.insert(name, Entry { bytes, last_use });
            }
        }
        for victim in cache.evict_over_cap(None) {
            let _ = std::fs::remove_file(victim);
        }
        Ok(cache)
    }

    /// Bytes held on disk.
    pub fn bytes(&self) -> u64 {
        lock(&self.index).bytes
    }

    /// Where block `name` is, if the cache holds it (and marks it used).
    pub fn lookup(&self, name: &str) -> Option<PathBuf> {
        let mut index = lock(&self.index);
        index.clock += 1;
        let clock = index.clock;
        let entry = index.files.get_mut(name)?;
        entry.last_use = clock;
        Some(self.dir.join(name))
    }

    /// Forgets a block whose file turned out unreadable or wrong.
    pub fn forget(&self, name: &str) {
        let mut index = lock(&self.index);
        if let Some(e) = index.files.remove(name) {
            index.bytes -= e.bytes;
        }
    }

    /// Writes a block (blocking: call it from the blocking pool) and
    /// evicts down to the cap. A block larger than the cap is not kept.
    pub fn store(&self, name: &str, data: &Bytes) -> io::Result<()> {
        if data.len() as u64 > self.cap {
            return Ok(());
        }
        let path = self.dir.join(name);
        let temp = self.dir.join(format!("{name}{TEMP_SUFFIX}"));
        std::fs::write(&temp, data)?;
        std::fs::rename(&temp, &path)?;
        let victims = {
            let mut index = lock(&self.index);
            index.clock += 1;
            let last_use = index.clock;
            let bytes = data.len() as u64;
            if let Some(old) = index
                .files
                .insert(name.to_owned(), Entry { bytes, last_use })
            {
                index.bytes -= old.bytes;
            }
            index.bytes += bytes;
            drop(index);
            self.evict_over_cap(Some(name))
        };
        for victim in victims {
            let _ = std::fs::remove_file(victim);
        }
        Ok(())
    }

    /// Takes the least recently used entries out of the index until it is
    /// within the cap, sparing `keep`; returns their files to remove.
    fn evict_over_cap(&self, keep: Option<&str>) -> Vec<PathBuf> {
        let mut index = lock(&self.index);
        let mut victims = Vec::new();
        while index.bytes > self.cap {
            let oldest = index
                .files
                .iter()
                .filter(|(n, _)| Some(n.as_str()) != keep)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(n, _)| n.clone());
            let Some(name) = oldest else { break };
            if let Some(e) = index.files.remove(&name) {
                index.bytes -= e.bytes;
            }
            victims.push(self.dir.join(name));
        }
        victims
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("udpvid-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn blocks_are_kept_within_the_cap_least_recently_used_out_first() {
        let dir = temp_dir("cap");
        let cache = DiskCache::open(&dir, 3000).expect("open");
        let block = Bytes::from(vec![7u8; 1000]);
        for i in 0..3 {
            cache
                .store(&block_file_name("o", i), &block)
                .expect("store");
        }
        // Block 0 is read again, so block 1 goes first.
        assert!(cache.lookup(&block_file_name("o", 0)).is_some());
        cache
            .store(&block_file_name("o", 3), &block)
            .expect("store");
        assert_eq!(cache.bytes(), 3000);
        assert!(cache.lookup(&block_file_name("o", 1)).is_none());
        assert!(!dir.join(block_file_name("o", 1)).exists());
        let kept = cache.lookup(&block_file_name("o", 0)).expect("kept");
        assert_eq!(std::fs::read(kept).expect("read"), vec![7u8; 1000]);
        // Too large for the cap: not kept, nothing evicted for it.
        cache
            .store(&block_file_name("o", 9), &Bytes::from(vec![0u8; 4000]))
            .expect("store");
        assert_eq!(cache.bytes(), 3000);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_restart_finds_the_blocks_and_drops_partial_files_and_the_excess() {
        let dir = temp_dir("restart");
        {
            let cache = DiskCache::open(&dir, 10_000).expect("open");
            for i in 0..4 {
                cache
                    .store(&block_file_name("o", i), &Bytes::from(vec![1u8; 1000]))
                    .expect("store");
            }
        }
        std::fs::write(dir.join("abc.partial"), b"half").expect("write");
        std::fs::write(dir.join("notes.txt"), b"left alone").expect("write");
        let cache = DiskCache::open(&dir, 2500).expect("reopen");
        assert_eq!(cache.bytes(), 2000);
        assert!(!dir.join("abc.partial").exists());
        assert!(dir.join("notes.txt").exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn names_depend_on_object_version_and_block() {
        assert_ne!(
            block_file_name("k\0\"a\"", 0),
            block_file_name("k\0\"b\"", 0)
        );
        assert_ne!(block_file_name("k", 0), block_file_name("k", 1));
        assert!(is_block_file_name(&block_file_name("k", 12)));
        assert!(!is_block_file_name("x-1"));
    }
}
