//! Finding servers on the LAN: DNS-SD over multicast DNS (RFC 6762/6763),
//! service type `_udpvid._udp`, as home media servers are found. A server
//! started with `--announce` registers itself; players and the catalog tool
//! list what answers. This is I/O (a daemon thread of `mdns-sd`), so it
//! lives beside the protocol core, not in it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};

/// The DNS-SD service type of udpvid servers.
pub const SERVICE_TYPE: &str = "_udpvid._udp.local.";

/// A server that answered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DiscoveredServer {
    /// Its instance name (what the operator called it).
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
}

impl DiscoveredServer {
    /// `udpvid://address:port/`, the server's catalog.
    pub fn uri(&self) -> String {
        match self.address {
            IpAddr::V6(a) => format!("udpvid://[{a}]:{}/", self.port),
            IpAddr::V4(a) => format!("udpvid://{a}:{}/", self.port),
        }
    }
}

fn daemon() -> Result<ServiceDaemon, String> {
    let d = ServiceDaemon::new().map_err(|e| format!("multicast DNS: {e}"))?;
    // Servers on this very machine answer on the loopback interface.
    let _ = d.enable_interface(IfKind::LoopbackV4);
    Ok(d)
}

/// A server's announcement; withdrawn (a goodbye packet, so browsers drop
/// it at once) when dropped.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Announcement {
    /// Announces `name` at `port`, on `address` or, if `None`, on every
    /// address of this host.
    pub fn new(name: &str, port: u16, address: Option<IpAddr>) -> Result<Announcement, String> {
        let daemon = daemon()?;
        let host = format!(
            "{}.local.",
            hostname().unwrap_or_else(|| "udpvid-server".into())
        );
        let addresses: Vec<IpAddr> = address.into_iter().collect();
        let properties: [(&str, &str); 1] = [("v", "1")];
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            name,
            &host,
            &addresses[..],
            port,
            &properties[..],
        )
        .map_err(|e| format!("cannot announce {name:?}: {e}"))?;
        if address.is_none() {
            info = info.enable_addr_auto();
        }
        let fullname = info.get_fullname().to_owned();
        daemon
            .register(info)
            .map_err(|e| format!("cannot announce {name:?}: {e}"))?;
        Ok(Announcement { daemon, fullname })
    }
}

impl Drop for Announcement {
    fn drop(&mut self) {
        if let Ok(done) = self.daemon.unregister(&self.fullname) {
            // The goodbye leaves before the daemon stops.
            let _ = done.recv_timeout(Duration::from_secs(1));
        }
        let _ = self.daemon.shutdown();
    }
}

/// The servers that answer within `wait`, sorted by name.
pub fn discover(wait: Duration) -> Result<Vec<DiscoveredServer>, String> {
    let daemon = daemon()?;
    let events = daemon
        .browse(SERVICE_TYPE)
        .map_err(|e| format!("multicast DNS: {e}"))?;
    let deadline = Instant::now() + wait;
    let mut found: BTreeMap<String, DiscoveredServer> = BTreeMap::new();
    while let Ok(event) = events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        match event {
            ServiceEvent::ServiceResolved(info) => {
                let name = info
                    .get_fullname()
                    .strip_suffix(&format!(".{SERVICE_TYPE}"))
                    .unwrap_or(info.get_fullname())
                    .to_owned();
                // One address per server: IPv4 first, which every client
                // route reaches.
                let mut addresses: Vec<IpAddr> = info
                    .get_addresses()
                    .iter()
                    .map(|a| a.to_ip_addr())
                    .collect();
                addresses.sort_by_key(|a| (a.is_ipv6(), *a));
                if let Some(address) = addresses.first() {
                    found.insert(
                        name.clone(),
                        DiscoveredServer {
                            name,
                            address: *address,
                            port: info.get_port(),
                        },
                    );
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                found.retain(|_, s| !fullname.starts_with(&format!("{}.", s.name)));
            }
            _ => {}
        }
    }
    let _ = daemon.shutdown();
    Ok(found.into_values().collect())
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}
