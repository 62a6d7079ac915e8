//! The catalog: the files a server offers, as carried by a Catalog transfer.
//!
//! Encoding: `count (u32)`, then per entry `name length (u16) || name (UTF-8)
//! || size (u64)`, big-endian. Names are relative paths with `/` separators.

use std::fmt;

use super::wire::MAX_TEXT_LEN;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub name: String,
    pub size: u64,
}

/// A size as people read it in a listing: `912 B`, `1.5 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError(&'static str);

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed catalog: {}", self.0)
    }
}

impl std::error::Error for CatalogError {}

pub fn encode(entries: &[CatalogEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    let usable: Vec<&CatalogEntry> = entries
        .iter()
        .filter(|e| e.name.len() <= MAX_TEXT_LEN)
        .collect();
    out.extend_from_slice(&(usable.len() as u32).to_be_bytes());
    for e in usable {
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&e.size.to_be_bytes());
    }
    out
}

pub fn decode(mut buf: &[u8]) -> Result<Vec<CatalogEntry>, CatalogError> {
    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], CatalogError> {
        if buf.len() < n {
            return Err(CatalogError("truncated"));
        }
        let (head, tail) = buf.split_at(n);
        *buf = tail;
        Ok(head)
    }
    let mut count = [0u8; 4];
    count.copy_from_slice(take(&mut buf, 4)?);
    let count = u32::from_be_bytes(count) as usize;
    // Each entry takes at least 10 bytes: a bogus count cannot make us allocate.
    let mut entries = Vec::with_capacity(count.min(buf.len() / 10));
    for _ in 0..count {
        let mut len = [0u8; 2];
        len.copy_from_slice(take(&mut buf, 2)?);
        let len = u16::from_be_bytes(len) as usize;
        if len > MAX_TEXT_LEN {
            return Err(CatalogError("name too long"));
        }
        let name = std::str::from_utf8(take(&mut buf, len)?)
            .map_err(|_| CatalogError("name not UTF-8"))?
            .to_owned();
        let mut size = [0u8; 8];
        size.copy_from_slice(take(&mut buf, 8)?);
        entries.push(CatalogEntry {
            name,
            size: u64::from_be_bytes(size),
        });
    }
    if !buf.is_empty() {
        return Err(CatalogError("trailing bytes"));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let entries = vec![
            CatalogEntry {
                name: "a.mp4".into(),
                size: 1,
            },
            CatalogEntry {
                name: "sub/dir/b é.mkv".into(),
                size: u64::MAX,
            },
        ];
        assert_eq!(decode(&encode(&entries)), Ok(entries));
        assert_eq!(decode(&encode(&[])), Ok(vec![]));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }
    }
}
