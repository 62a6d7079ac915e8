//! Pins processes to cores, so that "one server core" in a benchmark is
//! one core, and the load generator's work does not land on it: the
//! server and the viewers' process share a 2-core machine otherwise, and
//! the scheduler moves both between the cores.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A list of cores such as `1` or `0,2` from the environment variable
/// `var`, if set and well formed.
pub fn cpus_from_env(var: &str) -> Option<Vec<usize>> {
    let value = std::env::var(var).ok()?;
    let cpus: Option<Vec<usize>> = value.split(',').map(|c| c.trim().parse().ok()).collect();
    cpus.filter(|c| !c.is_empty())
}

/// Pins the calling thread to `cpus`; the threads it starts afterwards
/// inherit it, so called first thing in `main` it pins the process.
pub fn pin_this_thread(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; cores past its size are
    // left out (CPU_SET would index past it); sched_setaffinity reads the
    // set through the pointer we pass with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes `command`'s process (and every thread and child it starts) run
/// on `cpus` only.
pub fn pin_command(command: &mut Command, cpus: Vec<usize>) {
    // SAFETY: the hook runs in the forked child before exec; it only
    // makes a system call on memory allocated before the fork (no
    // allocation, no locks), which is async-signal-safe.
    unsafe {
        command.pre_exec(move || pin_this_thread(&cpus));
    }
}
