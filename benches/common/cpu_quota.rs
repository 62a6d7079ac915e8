//! Holds a process to a share of a core with a cgroup's CPU quota, so
//! that the load generator can show what a second serving thread adds on
//! a machine whose second core it needs itself: one thread held to a
//! tenth of a core against two threads held to a tenth each, the
//! generator beside them. Needs root and the cgroup CPU
//! controller (v1's `cpu` hierarchy, or v2 with `cpu` enabled).

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// The quota's period: short, so a held server runs in slices of a
/// millisecond or so rather than for 10 ms out of every 100, which a
/// protocol timed in milliseconds would take for a stalled path.
const PERIOD_US: u64 = 10_000;

/// A cgroup of this process's own with a CPU quota, removed on drop
/// (once the processes put in it have exited).
pub struct CpuQuota {
    dir: PathBuf,
}

impl CpuQuota {
    /// A cgroup `name` whose processes together get at most `cores` of
    /// CPU time.
    pub fn new(name: &str, cores: f64) -> Result<CpuQuota, String> {
        let quota = ((cores * PERIOD_US as f64) as u64).max(1000);
        let v1 = PathBuf::from("/sys/fs/cgroup/cpu");
        let (dir, files) = if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(name);
            let files = vec![
                ("cpu.cfs_period_us", PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", quota.to_string()),
            ];
            (dir, files)
        } else {
            let root = PathBuf::from("/sys/fs/cgroup");
            // Lets the root's children have CPU limits (a no-op if they can).
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
            let dir = root.join(name);
            let files = vec![("cpu.max", format!("{quota} {PERIOD_US}"))];
            (dir, files)
        };
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot create {}: {e} (needs root)", dir.display()))?;
        let group = CpuQuota { dir };
        for (file, value) in files {
            let path = group.dir.join(file);
            std::fs::write(&path, &value)
                .map_err(|e| format!("cannot write {value} to {}: {e}", path.display()))?;
        }
        Ok(group)
    }

    /// Makes `command`'s process start inside this cgroup, so that none of
    /// its work runs outside the quota.
    pub fn hold(&self, command: &mut Command) {
        let procs = CString::new(self.dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .expect("a path without NUL");
        // SAFETY: the hook runs in the forked child before exec and makes
        // only system calls (open, write, close) on memory allocated before
        // the fork, which are async-signal-safe. Writing "0" to
        // `cgroup.procs` moves the writing process.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
                Ok(())
            });
        }
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // Fails while a process in it still runs (a server not yet reaped):
        // the empty cgroup is then left behind, and a later run of the same
        // name replaces it.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}
