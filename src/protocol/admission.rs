//! Session limits of a whole server, and the shards that share them.
//!
//! A server may run one [`ServerEndpoint`](super::ServerEndpoint) per core,
//! each on its own socket of one port (`SO_REUSEPORT`). The limits an
//! operator sets are the server's, not a core's: the endpoints share one
//! [`Admission`], so `--max-sessions 100` admits 100 sessions however the
//! kernel spreads clients over the sockets, and one address never takes
//! more than its share on any mix of shards.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::address_map::AddressMap;
use super::shared_bottleneck::PeerGroups;
use super::wire::{ConnectionId, Packet};

/// Why a new session is turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds `max_sessions` already.
    Full { sessions: usize },
    /// This address holds its share already.
    AddressFull { ip: IpAddr, sessions: usize },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Full { sessions } => {
                write!(
                    f,
                    "server busy: {sessions} sessions already, try again later"
                )
            }
            Refusal::AddressFull { ip, sessions } => write!(
                f,
                "server busy: {sessions} sessions from {ip} already, close one first"
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: AddressMap<usize>,
}

/// The server-wide session count, by address. Touched only when a session
/// starts, ends or moves, never per datagram, so one lock is cheap.
#[derive(Debug)]
pub struct Admission {
    max_sessions: usize,
    max_per_address: usize,
    counts: Mutex<Counts>,
}

impl Admission {
    pub fn new(max_sessions: usize, max_per_address: usize) -> Self {
        Admission {
            max_sessions,
            max_per_address,
            counts: Mutex::new(Counts::default()),
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked mid-way:
        // every change is a single increment or decrement.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// Sessions of the whole server.
    pub fn sessions(&self) -> usize {
        self.counts().total
    }

    /// Counts a new session from `ip`, or says why it cannot start.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Refusal> {
        let mut c = self.counts();
        if c.total >= self.max_sessions {
            return Err(Refusal::Full { sessions: c.total });
        }
        let from_ip = c.by_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.max_per_address {
            return Err(Refusal::AddressFull {
                ip,
                sessions: from_ip,
            });
        }
        c.total += 1;
        *c.by_ip.entry(ip).or_insert(0) += 1;
        Ok(())
    }

    /// A session from `ip` ended.
    pub fn release(&self, ip: IpAddr) {
        let mut c = self.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&ip);
            }
        }
    }

    /// A session's client moved to another address (a NAT rebinding). It
    /// keeps its session even past the new address's share: refusing a
    /// migration would cut a viewer off mid-film.
    pub fn moved(&self, from: IpAddr, to: IpAddr) {
        if from == to {
            return;
        }
        let mut c = self.counts();
        if let Some(n) = c.by_ip.get_mut(&from) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&from);
            }
        }
        *c.by_ip.entry(to).or_insert(0) += 1;
    }
}

/// Which of a server's endpoints this is, and the limits they share.
#[derive(Debug, Clone)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    pub admission: Arc<Admission>,
    /// The rates each client address's sessions share, on every shard.
    pub groups: Arc<PeerGroups>,
}

impl Shard {
    /// The only endpoint of a server.
    pub fn single(max_sessions: usize, max_per_address: usize) -> Self {
        Shard {
            index: 0,
            count: 1,
            admission: Arc::new(Admission::new(max_sessions, max_per_address)),
            groups: Arc::default(),
        }
    }

    /// The `count` endpoints of one server, in order of index: they share
    /// its session limits and its address groups.
    pub fn of_server(count: usize, max_sessions: usize, max_per_address: usize) -> Vec<Self> {
        let admission = Arc::new(Admission::new(max_sessions, max_per_address));
        let groups: Arc<PeerGroups> = Arc::default();
        (0..count)
            .map(|index| Shard {
                index,
                count,
                admission: admission.clone(),
                groups: groups.clone(),
            })
            .collect()
    }

    /// Whether `id` is one this shard hands out.
    pub fn owns(&self, id: ConnectionId) -> bool {
        id % self.count as u64 == self.index as u64
    }

    /// Turns a random connection id into one of this shard's (0 stays
    /// reserved for Hellos).
    pub fn claim(&self, random: ConnectionId) -> Option<ConnectionId> {
        let count = self.count as u64;
        (random / count * count)
            .checked_add(self.index as u64)
            .filter(|&id| id != 0)
    }
}

/// The shard (of `count`) a datagram belongs to, read from its connection
/// id without decoding the rest; `None` for a Hello (connection id 0, any
/// shard takes it) or for what is not a udpvid datagram. The kernel keeps
/// a client's datagrams on one socket while its address stays the same;
/// after a NAT rebinding they may reach another shard's socket, which
/// hands them on to the shard holding the session.
pub fn shard_of(datagram: &[u8], count: usize) -> Option<usize> {
    if count <= 1 {
        return None;
    }
    let id = Packet::header_connection_id(datagram)?;
    (id != 0).then(|| (id % count as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::Body;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn limits_hold_for_the_whole_server_and_per_address() {
        let a = Admission::new(3, 2);
        assert_eq!(a.admit(ip(1)), Ok(()));
        assert_eq!(a.admit(ip(1)), Ok(()));
        assert_eq!(
            a.admit(ip(1)),
            Err(Refusal::AddressFull {
                ip: ip(1),
                sessions: 2
            })
        );
        assert_eq!(a.admit(ip(2)), Ok(()));
        assert_eq!(a.admit(ip(3)), Err(Refusal::Full { sessions: 3 }));
        a.release(ip(1));
        assert_eq!(a.sessions(), 2);
        assert_eq!(a.admit(ip(3)), Ok(()));
        // A migrated session counts under its new address.
        a.moved(ip(3), ip(2));
        assert!(matches!(a.admit(ip(2)), Err(Refusal::Full { .. })));
        a.release(ip(1));
        assert!(matches!(a.admit(ip(2)), Err(Refusal::AddressFull { .. })));
        assert_eq!(a.admit(ip(3)), Ok(()));
    }

    #[test]
    fn every_shard_claims_only_its_own_ids_and_datagrams_find_their_shard() {
        let admission = Arc::new(Admission::new(10, 10));
        for count in [1usize, 2, 3, 7] {
            for index in 0..count {
                let shard = Shard {
                    index,
                    count,
                    admission: admission.clone(),
                    groups: Arc::default(),
                };
                for random in [0, 1, 2, 12345, u64::MAX, u64::MAX - 1] {
                    if let Some(id) = shard.claim(random) {
                        assert_ne!(id, 0);
                        assert!(shard.owns(id));
                        let datagram = Packet::new(id, 1, Body::Ping).encode();
                        let expected = (count > 1).then_some(index);
                        assert_eq!(shard_of(&datagram, count), expected);
                    }
                }
            }
        }
        let hello = Packet::new(0, 0, Body::Ping).encode();
        assert_eq!(shard_of(&hello, 4), None);
        assert_eq!(shard_of(b"junk", 4), None);
        assert_eq!(shard_of(&[0u8; 64], 4), None);
    }
}
