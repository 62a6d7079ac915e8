//! The folder a server serves: only regular files inside it, by relative
//! path. Every refusal is reported as "not found", so a client learns
//! nothing about what lies outside the folder.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use gstudpvid::protocol::catalog::CatalogEntry;
use gstudpvid::protocol::wire::MAX_TEXT_LEN;
use gstudpvid::protocol::{Content, ContentStore, OpenErrorKind, OpenFailure};

/// Folders deeper than this are not listed (a symlink loop cannot hang us,
/// since symlinked folders are not followed, but a deep tree could be slow).
const MAX_CATALOG_DEPTH: usize = 16;
/// At most this many files are listed.
const MAX_CATALOG_ENTRIES: usize = 10_000;

pub struct Library {
    root: PathBuf,
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
        Ok(Library { root })
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

    fn walk(&self, dir: &Path, depth: usize, out: &mut Vec<CatalogEntry>) {
        if depth > MAX_CATALOG_DEPTH || out.len() >= MAX_CATALOG_ENTRIES {
            return;
        }
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
                self.walk(&path, depth + 1, out);
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
        let mut out = Vec::new();
        self.walk(&self.root, 0, &mut out);
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
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
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()).hash(&mut h);
        Ok(Box::new(FileContent {
            file,
            size: meta.len(),
            tag: h.finish(),
        }))
    }
}

struct FileContent {
    file: File,
    size: u64,
    tag: u64,
}

impl Content for FileContent {
    fn size(&self) -> u64 {
        self.size
    }
    fn tag(&self) -> u64 {
        self.tag
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("udpvid-lib-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create temp dir");
        d
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
