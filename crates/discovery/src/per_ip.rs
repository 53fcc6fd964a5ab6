//! [`PerIp`]: the limits per source IP address, shared by every connection from that
//! address: connections at once ([`PerIp::connect`], whose [`IpSlot`] gives the place back
//! when dropped), requests per second (one [`TokenBucket`] per address,
//! [`IpSlot::take_request`]) and new names bound per hour ([`PerIp::may_bind_name`],
//! [`PerIp::count_new_name`]).
//!
//! Memory stays bounded by what is live: an address's entry exists while it has a
//! connection, and after its last one only while it has bound a new name within the hour.
//! Such entries are swept whenever the map has doubled since the last sweep (amortised
//! constant work per connection), so what is kept is at most the connections held plus
//! one entry per address that bound a name in the last hour, far less than the name
//! bindings those addresses created. An address that closes all its connections starts
//! again with a full request bucket; that costs it a new connection and handshake per burst,
//! which the connection limit and the registration deadline already bound.
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
    /// The most new names (first registrations of a name) one address may bind in an hour.
    pub new_names_per_hour: u32,
}

/// An hour, in milliseconds: the window of the new-names limit.
const HOUR_MS: u64 = 60 * 60 * 1000;

/// The fewest entries before a sweep of the idle ones is worth it.
const MIN_SWEEP: usize = 1024;

/// The new names one address bound in the window that opened at `start_ms` (a fixed
/// window, opened by the first new name after the last one closed).
#[derive(Debug, Clone, Copy)]
struct NameWindow {
    start_ms: u64,
    count: u32,
}

impl NameWindow {
    fn open_at(&self, now_ms: u64) -> bool {
        now_ms < self.start_ms.saturating_add(HOUR_MS)
    }
}

/// One address's state.
#[derive(Debug)]
struct Entry {
    connections: usize,
    requests: TokenBucket,
    names: Option<NameWindow>,
}

impl Entry {
    fn new(limits: &PerIpLimits, now: Instant) -> Self {
        Self {
            connections: 0,
            requests: TokenBucket::new(limits.requests_per_second, limits.request_burst, now),
            names: None,
        }
    }

    /// Whether the entry still holds anything at `now_ms`: a connection, or an open window
    /// of new names.
    fn live(&self, now_ms: u64) -> bool {
        self.connections > 0 || self.names.is_some_and(|window| window.open_at(now_ms))
    }
}

/// Every address's entry, and the map's size at which the next sweep runs.
#[derive(Debug)]
struct State {
    entries: HashMap<IpAddr, Entry>,
    sweep_at: usize,
}

/// The per-IP limits and the state of every address with a connection.
#[derive(Debug)]
pub struct PerIp {
    limits: PerIpLimits,
    state: Mutex<State>,
}

impl PerIp {
    /// No address known yet.
    pub fn new(limits: PerIpLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(State {
                entries: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        })
    }

    /// Takes a connection place for `ip` at `now` (`now_ms` on the wall clock); `None` when
    /// the address already has the most connections allowed.
    pub fn connect(self: &Arc<Self>, ip: IpAddr, now: Instant, now_ms: u64) -> Option<IpSlot> {
        let mut state = self.lock();
        if state.entries.len() >= state.sweep_at {
            state.entries.retain(|_, entry| entry.live(now_ms));
            state.sweep_at = MIN_SWEEP.max(state.entries.len() * 2);
        }
        let entry = state
            .entries
            .entry(ip)
            .or_insert_with(|| Entry::new(&self.limits, now));
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

    /// Whether `ip` may bind one more new name at `now_ms`.
    pub fn may_bind_name(&self, ip: IpAddr, now_ms: u64) -> bool {
        self.lock()
            .entries
            .get(&ip)
            .and_then(|entry| entry.names)
            .is_none_or(|window| {
                !window.open_at(now_ms) || window.count < self.limits.new_names_per_hour
            })
    }

    /// Counts a new name bound by `ip` at `now_ms`. Checked with [`PerIp::may_bind_name`]
    /// before the binding and counted after it, so registrations of one address in flight
    /// at once may pass the limit by as many as they are. The name is bound over one of the
    /// address's connections, whose [`IpSlot`] keeps its entry; without one nothing is
    /// counted.
    pub fn count_new_name(&self, ip: IpAddr, now_ms: u64) {
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(&ip) else {
            return;
        };
        entry.names = match entry.names {
            Some(window) if window.open_at(now_ms) => Some(NameWindow {
                count: window.count.saturating_add(1),
                ..window
            }),
            _ => Some(NameWindow {
                start_ms: now_ms,
                count: 1,
            }),
        };
    }

    /// How many addresses have state.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no address has state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The limits in force.
    pub fn limits(&self) -> PerIpLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves each entry consistent before the lock is released (counters
        // and a bucket), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One connection's place in its address's count; dropping it gives the place back and,
/// with the address's last connection, removes the address's state unless it has bound a
/// new name this hour (then a later sweep does).
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
            .entries
            .get_mut(&self.ip)
            .is_none_or(|entry| entry.requests.take(now))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut state = self.per_ip.lock();
        if let Some(entry) = state.entries.get_mut(&self.ip) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 && entry.names.is_none() {
                state.entries.remove(&self.ip);
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
            new_names_per_hour: 2,
        }
    }

    #[test]
    fn connections_are_counted_per_address_and_given_back() {
        let per_ip = PerIp::new(limits());
        let now = Instant::now();
        let mut first: Vec<_> = (0..3)
            .map(|_| per_ip.connect(ip(1), now, 0).unwrap())
            .collect();
        assert!(per_ip.connect(ip(1), now, 0).is_none());
        // Another address is not affected.
        let other = per_ip.connect(ip(2), now, 0).unwrap();
        // One leaves: one place is free again.
        first.pop();
        let again = per_ip.connect(ip(1), now, 0).unwrap();
        assert!(per_ip.connect(ip(1), now, 0).is_none());
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
        let one = per_ip.connect(ip(1), now, 0).unwrap();
        let two = per_ip.connect(ip(1), now, 0).unwrap();
        let other = per_ip.connect(ip(2), now, 0).unwrap();
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

    #[test]
    fn new_names_are_counted_per_address_for_an_hour() {
        let per_ip = PerIp::new(limits());
        let now = Instant::now();
        let start_ms = 1_000_000;
        let _connected = per_ip.connect(ip(1), now, start_ms).unwrap();
        for _ in 0..2 {
            assert!(per_ip.may_bind_name(ip(1), start_ms));
            per_ip.count_new_name(ip(1), start_ms);
        }
        assert!(!per_ip.may_bind_name(ip(1), start_ms + HOUR_MS - 1));
        assert!(per_ip.may_bind_name(ip(2), start_ms));
        // An hour after the window opened, it closes.
        assert!(per_ip.may_bind_name(ip(1), start_ms + HOUR_MS));
        per_ip.count_new_name(ip(1), start_ms + HOUR_MS);
        assert!(per_ip.may_bind_name(ip(1), start_ms + HOUR_MS));
    }

    #[test]
    fn an_address_that_bound_a_name_is_kept_for_the_hour_then_swept() {
        let per_ip = PerIp::new(limits());
        let now = Instant::now();
        let slot = per_ip.connect(ip(1), now, 0).unwrap();
        per_ip.count_new_name(ip(1), 0);
        per_ip.count_new_name(ip(1), 0);
        drop(slot);
        // Reconnecting does not reset the count.
        assert_eq!(per_ip.len(), 1);
        let again = per_ip.connect(ip(1), now, 1).unwrap();
        assert!(!per_ip.may_bind_name(ip(1), 1));
        drop(again);
        // Enough addresses come and go to trigger a sweep an hour later: only live entries
        // are left.
        let crowd: Vec<_> = (0..MIN_SWEEP)
            .map(|n| {
                let address = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + n as u32));
                per_ip.connect(address, now, HOUR_MS).unwrap()
            })
            .collect();
        let last = per_ip.connect(ip(9), now, HOUR_MS).unwrap();
        assert_eq!(per_ip.len(), MIN_SWEEP + 1, "the expired entry was swept");
        drop((crowd, last));
        assert!(per_ip.is_empty());
    }
}
