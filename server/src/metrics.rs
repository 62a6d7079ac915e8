//! `--metrics ADDR`: the server's counters in the Prometheus text format
//! (OpenMetrics), at `http://ADDR/metrics`.
//!
//! The serve loop and the store update plain atomics as they go; a scrape
//! copies them into the registry and encodes it, so serving the page
//! costs the loop nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::object_library::StoreCounters;

/// Largest request head read from a scraper.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A scraper that sends no request within this is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the serve loop counts.
#[derive(Default)]
pub struct LoopCounters {
    pub sessions: AtomicU64,
    pub datagrams_sent: AtomicU64,
    /// `sendmsg` calls: datagrams sent divided by these is how well the
    /// sends gather (GSO), which is most of a busy server's CPU per GB.
    pub sends: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub retransmissions: AtomicU64,
    pub transfers: AtomicU64,
    /// Times the serve loop woke (a datagram batch, a timer, a store fetch).
    pub wakeups: AtomicU64,
    /// Datagrams a serving thread received for a session another thread
    /// holds, and handed on (after a client's address changed).
    pub handoffs: AtomicU64,
    /// Errors by kind, as the log names them.
    pub errors: Mutex<Vec<(&'static str, u64)>>,
}

impl LoopCounters {
    pub fn error(&self, kind: &'static str) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match errors.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => errors.push((kind, 1)),
        }
    }
}

type Labels = Vec<(String, String)>;

struct Exported {
    registry: Registry,
    sessions: Gauge,
    datagrams_sent: Counter,
    sends: Counter,
    bytes_sent: Counter,
    retransmissions: Counter,
    transfers: Counter,
    wakeups: Counter,
    handoffs: Counter,
    resident_bytes: Gauge,
    store_gets: Counter,
    store_bytes: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_bytes: Gauge,
    cache_peak_bytes: Gauge,
    disk_hits: Counter,
    disk_bytes: Gauge,
    errors: Family<Labels, Counter>,
}

pub struct Metrics {
    pub counters: Arc<LoopCounters>,
    store: Option<Arc<StoreCounters>>,
    exported: Mutex<Exported>,
}

impl Metrics {
    pub fn new(store: Option<Arc<StoreCounters>>) -> Self {
        let mut registry = Registry::with_prefix("udpvid");
        let sessions = Gauge::default();
        let datagrams_sent = Counter::default();
        let sends = Counter::default();
        let bytes_sent = Counter::default();
        let retransmissions = Counter::default();
        let transfers = Counter::default();
        let wakeups = Counter::default();
        let handoffs = Counter::default();
        let resident_bytes = Gauge::default();
        let store_gets = Counter::default();
        let store_bytes = Counter::default();
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        let cache_bytes = Gauge::default();
        let cache_peak_bytes = Gauge::default();
        let disk_hits = Counter::default();
        let disk_bytes = Gauge::default();
        let errors = Family::<Labels, Counter>::default();
        registry.register("sessions", "Sessions open now", sessions.clone());
        registry.register(
            "datagrams_sent",
            "UDP datagrams sent",
            datagrams_sent.clone(),
        );
        registry.register(
            "sends",
            "UDP sends (sendmsg calls), each of one or more datagrams to one client: datagrams_sent divided by sends is how well they gather",
            sends.clone(),
        );
        registry.register(
            "bytes_sent",
            "Bytes sent in UDP payloads",
            bytes_sent.clone(),
        );
        registry.register(
            "retransmissions",
            "Data packets declared lost, whose bytes were sent again",
            retransmissions.clone(),
        );
        registry.register(
            "transfers",
            "Files and catalogs opened (a seek opens again)",
            transfers.clone(),
        );
        registry.register(
            "wakeups",
            "Times the serve loop woke: divide by time for wake-ups per second",
            wakeups.clone(),
        );
        registry.register(
            "handoffs",
            "Datagrams handed from one serving thread to the one holding their session (after a client's address changed)",
            handoffs.clone(),
        );
        registry.register(
            "resident_bytes",
            "Resident memory of the server process: divide by sessions for memory per session",
            resident_bytes.clone(),
        );
        registry.register(
            "store_gets",
            "Ranged GETs made of the object store",
            store_gets.clone(),
        );
        registry.register(
            "store_bytes_read",
            "Bytes read from the object store",
            store_bytes.clone(),
        );
        registry.register(
            "cache_hits",
            "Block reads served by the block cache",
            cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Blocks fetched from the object store",
            cache_misses.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes held by the block cache",
            cache_bytes.clone(),
        );
        registry.register(
            "cache_peak_bytes",
            "Most bytes the block cache ever held",
            cache_peak_bytes.clone(),
        );
        registry.register(
            "disk_cache_hits",
            "Blocks read back from the cache folder instead of the store",
            disk_hits.clone(),
        );
        registry.register(
            "disk_cache_bytes",
            "Bytes held in the cache folder",
            disk_bytes.clone(),
        );
        registry.register("errors", "Errors by kind", errors.clone());
        Metrics {
            counters: Arc::default(),
            store,
            exported: Mutex::new(Exported {
                registry,
                sessions,
                datagrams_sent,
                sends,
                bytes_sent,
                retransmissions,
                transfers,
                wakeups,
                handoffs,
                resident_bytes,
                store_gets,
                store_bytes,
                cache_hits,
                cache_misses,
                cache_bytes,
                cache_peak_bytes,
                disk_hits,
                disk_bytes,
                errors,
            }),
        }
    }

    /// The page: every counter as it is now.
    pub fn render(&self) -> String {
        let e = self.exported.lock().unwrap_or_else(|p| p.into_inner());
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        e.sessions.set(load(&c.sessions) as i64);
        e.datagrams_sent
            .inner()
            .store(load(&c.datagrams_sent), Ordering::Relaxed);
        e.sends.inner().store(load(&c.sends), Ordering::Relaxed);
        e.bytes_sent
            .inner()
            .store(load(&c.bytes_sent), Ordering::Relaxed);
        e.retransmissions
            .inner()
            .store(load(&c.retransmissions), Ordering::Relaxed);
        e.transfers
            .inner()
            .store(load(&c.transfers), Ordering::Relaxed);
        e.wakeups.inner().store(load(&c.wakeups), Ordering::Relaxed);
        e.handoffs
            .inner()
            .store(load(&c.handoffs), Ordering::Relaxed);
        e.resident_bytes.set(resident_bytes() as i64);
        let mut errors: Vec<(&str, u64)> =
            c.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(s) = &self.store {
            e.store_gets.inner().store(load(&s.gets), Ordering::Relaxed);
            e.store_bytes
                .inner()
                .store(load(&s.bytes_read), Ordering::Relaxed);
            e.cache_hits
                .inner()
                .store(load(&s.cache_hits), Ordering::Relaxed);
            e.cache_misses
                .inner()
                .store(load(&s.cache_misses), Ordering::Relaxed);
            e.cache_bytes.set(load(&s.cache_bytes) as i64);
            e.cache_peak_bytes.set(load(&s.cache_peak_bytes) as i64);
            e.disk_hits
                .inner()
                .store(load(&s.disk_hits), Ordering::Relaxed);
            e.disk_bytes.set(load(&s.disk_bytes) as i64);
            errors.extend([
                ("store_unreachable", load(&s.errors_unreachable)),
                ("store_credentials", load(&s.errors_credentials)),
                ("store_missing", load(&s.errors_missing)),
                ("store_changed", load(&s.errors_changed)),
            ]);
        }
        for (kind, n) in errors {
            e.errors
                .get_or_create(&vec![("kind".to_string(), kind.to_string())])
                .inner()
                .store(n, Ordering::Relaxed);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &e.registry);
        out
    }

    /// Serves the page on `listener` until the process ends.
    pub fn spawn_server(self: &Arc<Self>, listener: TcpListener) {
        let metrics = self.clone();
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "metrics at http://{addr}/metrics");
        }
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &metrics).await {
                        debug!(%peer, error = %e, "metrics request failed");
                    }
                });
            }
        });
    }
}

/// The process's resident set, from /proc (0 where there is none).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, target) {
        ("GET", "/metrics") | ("GET", "/") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "the metrics are at /metrics\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the metrics listener (before the runtime serves, so a bad
/// address fails at start-up).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_every_counter_with_its_value() {
        let store = Arc::new(StoreCounters::default());
        store.bytes_read.store(1234, Ordering::Relaxed);
        store.errors_changed.store(2, Ordering::Relaxed);
        let m = Metrics::new(Some(store));
        m.counters.sessions.store(3, Ordering::Relaxed);
        m.counters.bytes_sent.store(99, Ordering::Relaxed);
        m.counters.sends.store(7, Ordering::Relaxed);
        m.counters.error("open_not_found");
        let page = m.render();
        let resident = page
            .lines()
            .find_map(|l| l.strip_prefix("udpvid_resident_bytes "))
            .and_then(|v| v.parse::<u64>().ok());
        assert!(resident.is_some_and(|v| v > 1 << 20), "{page}");
        for line in [
            "udpvid_sessions 3",
            "udpvid_bytes_sent_total 99",
            "udpvid_sends_total 7",
            "udpvid_store_bytes_read_total 1234",
            "udpvid_wakeups_total 0",
            "udpvid_handoffs_total 0",
            "udpvid_errors_total{kind=\"open_not_found\"} 1",
            "udpvid_errors_total{kind=\"store_changed\"} 2",
            "# EOF",
        ] {
            assert!(page.contains(line), "{line:?} not in\n{page}");
        }
    }
}
