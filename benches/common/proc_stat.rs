//! CPU time from `/proc`, shared by the benchmark, the load generator and
//! `udp_floor` so that every CPU figure they print is counted the same way.

use std::path::Path;

/// User and system CPU seconds from a `/proc/…/stat` file (a process's or
/// a thread's); 0 if it cannot be read.
pub fn cpu_seconds_of(path: impl AsRef<Path>) -> f64 {
    try_cpu_seconds_of(path).unwrap_or(0.0)
}

/// As [`cpu_seconds_of`], `None` if the file cannot be read (the process
/// or thread ended).
pub fn try_cpu_seconds_of(path: impl AsRef<Path>) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces; utime and stime are fields 14 and 15, 12 and 13 after
    // ") state". Linux counts them in ticks of 1/100 s (USER_HZ).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Some((ticks(11) + ticks(12)) / 100.0)
}
