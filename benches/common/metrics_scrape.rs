//! Reads one counter from a udpvid server's metrics page (`--metrics`).
//! Shared by the bench and the load generator.

use std::io::{Read, Write};
use std::net::TcpStream;

/// The value of metric `name` on the page served at `host:port`, if the
/// page could be read and has it.
pub fn scrape_metric(host: &str, port: u16, name: &str) -> Option<u64> {
    let mut s = TcpStream::connect((host, port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut page = String::new();
    s.read_to_string(&mut page).ok()?;
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}
