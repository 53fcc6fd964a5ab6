//! [`PerIp`]: the limits per source IP address, shared by every connection from that
//! address: connections at once ([`PerIp::connect`], whose [`IpSlot`] gives the place back
//! when dropped) and requests per second (one [`TokenBucket`] per address,
//! [`IpSlot::take_request`]).
//!
//! Memory stays bounded by what is live: an address's entry exists while it has a
//! connection, and is removed when its last connection ends. An address that closes all its
//! connections therefore starts again with a full request bucket; that costs it a new
//! connection and handshake per burst, which the connection limit and the registration
//! deadline already bound.
//!
//! Time is passed in; nothing here touches a socket or a clock.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use crate::limits::TokenBucket;

/// The per-IP limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIpLimits {
    /// The most connections from one address at once.
    pub connections: usize,
    /// Requests per second all connections of one address may sustain together.
    pub requests_per_second: u32,
    /// The burst one address may send above its sustained rate.
    pub request_burst: u32,
}

/// One address's state.
#[derive(Debug)]
struct Entry {
    connections: usize,
    requests: TokenBucket,
}

/// The per-IP limits and the state of every address with a connection.
#[derive(Debug)]
pub struct PerIp {
    limits: PerIpLimits,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl PerIp {
    /// No address known yet.
    pub fn new(limits: PerIpLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a connection place for `ip` at `now`; `None` when the address already has
    /// the most connections allowed.
    pub fn connect(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Option<IpSlot> {
        let mut entries = self.lock();
        let entry = entries.entry(ip).or_insert_with(|| Entry {
            connections: 0,
            requests: TokenBucket::new(
                self.limits.requests_per_second,
                self.limits.request_burst,
                now,
            ),
        });
        if entry.connections >= self.limits.connections {
            // Never the last reference: the full entry has live connections, so nothing to
            // remove here.
            return None;
        }
        entry.connections += 1;
        Some(IpSlot {
            per_ip: Arc::clone(self),
            ip,
        })
    }

    /// How many addresses have state (each has a connection).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no address has state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The limits in force.
    pub fn limits(&self) -> PerIpLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Entry>> {
        // Every update leaves each entry consistent before the lock is released (a counter
        // and a bucket), so a poisoned lock is still usable.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One connection's place in its address's count; dropping it gives the place back and,
/// with the address's last connection, removes the address's state.
#[derive(Debug)]
pub struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl IpSlot {
    /// The address this place belongs to.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Takes one request from the address's shared bucket at `now`; false when the address
    /// is over its rate.
    pub fn take_request(&self, now: Instant) -> bool {
        self.per_ip
            .lock()
            .get_mut(&self.ip)
            .is_none_or(|entry| entry.requests.take(now))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut entries = self.per_ip.lock();
        if let Some(entry) = entries.get_mut(&self.ip) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                entries.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn limits() -> PerIpLimits {
        PerIpLimits {
            connections: 3,
            requests_per_second: 10,
            request_burst: 5,
        }
    }

    #[test]
    fn connections_are_counted_per_address_and_given_back() {
        let per_ip = PerIp::new(limits());
        let now = Instant::now();
        let mut first: Vec<_> = (0..3)
            .map(|_| per_ip.connect(ip(1), now).unwrap())
            .collect();
        assert!(per_ip.connect(ip(1), now).is_none());
        // Another address is not affected.
        let other = per_ip.connect(ip(2), now).unwrap();
        // One leaves: one place is free again.
        first.pop();
        let again = per_ip.connect(ip(1), now).unwrap();
        assert!(per_ip.connect(ip(1), now).is_none());
        drop((first, again, other));
        assert!(
            per_ip.is_empty(),
            "no state is kept for addresses with no connection"
        );
    }

    #[test]
    fn requests_share_one_bucket_per_address() {
        let per_ip = PerIp::new(limits());
        let now = Instant::now();
        let one = per_ip.connect(ip(1), now).unwrap();
        let two = per_ip.connect(ip(1), now).unwrap();
        let other = per_ip.connect(ip(2), now).unwrap();
        // The burst of five, split across two connections of one address.
        let taken = (0..4)
            .filter(|_| one.take_request(now))
            .chain((0..4).filter(|_| two.take_request(now)))
            .count();
        assert_eq!(taken, 5);
        // Another address has its own bucket.
        assert!(other.take_request(now));
        // A tenth of a second later, one more for the first address.
        let soon = now + Duration::from_millis(100);
        assert!(two.take_request(soon));
        assert!(!one.take_request(soon));
    }
}
