//! Reads counters from a udpvid server's metrics page (`--metrics`).
//! Shared by the bench and the load generator.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A metrics page that has not arrived whole in this long is given up on:
/// a reading taken mid-run must not hang the run.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The metrics page served at `host:port`, if it could be read.
pub fn metrics_page(host: &str, port: u16) -> Option<String> {
    let mut s = TcpStream::connect((host, port)).ok()?;
    s.set_read_timeout(Some(READ_TIMEOUT)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut page = String::new();
    s.read_to_string(&mut page).ok()?;
    Some(page)
}

/// The value of metric `name` on `page`, if it has it.
pub fn metric_value(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The value of metric `name` on the page served at `host:port`, if the
/// page could be read and has it.
pub fn scrape_metric(host: &str, port: u16, name: &str) -> Option<u64> {
    metric_value(&metrics_page(host, port)?, name)
}
