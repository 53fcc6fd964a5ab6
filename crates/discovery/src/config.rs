//! [`Config`]: every knob of the server, with its defaults (heartbeat 10 s, presence 30 s,
//! frame and connection limits), and the checks that refuse settings it cannot keep.

use std::time::Duration;

/// The smallest frame limit before registration that still fits a registration with
/// all its listen ports (about 300 bytes) with room to spare.
pub const MIN_PREAUTH_FRAME_LEN: usize = 1024;

/// The most names a `List` reply may carry: each takes at most 33 bytes (a length and 32
/// characters), and the reply's own fields a few dozen, so 1,900 names fit a 64 KiB frame.
pub const MAX_LIST_LEN: usize = 1900;

/// Server settings. `Config::default()` is what the binary runs with unless told otherwise.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often clients are asked to send a heartbeat.
    pub heartbeat_interval: Duration,
    /// How long a registered client stays online without a heartbeat. A registered
    /// connection silent for this long is closed.
    pub presence_ttl: Duration,
    /// How long a new connection has to complete the hello and register (or announce),
    /// counted from accept (or from an `Unregister`); no request extends it.
    pub handshake_timeout: Duration,
    /// How long one write to a client may take before the client is dropped as stuck.
    pub write_timeout: Duration,
    /// The most simultaneous connections; more are told `server_busy` and closed. The
    /// server keeps fewer when the open-file limit less [`Config::open_file_reserve`]
    /// cannot hold this many ([`crate::limits::connection_cap`]).
    pub max_connections: usize,
    /// Open files kept out of the connection cap: the listener, the store, logs, and the
    /// `server_busy` refusals in flight (at most half of this reserve at once).
    pub open_file_reserve: u64,
    /// The most sessions (connections registered as one user) at once on this instance; a
    /// newer one closes the oldest with `session_limit`.
    pub max_sessions_per_user: usize,
    /// The most names in one `List` reply; past it, the first names by order and a count
    /// of the rest. At most [`MAX_LIST_LEN`], so the reply always fits a 64 KiB frame.
    pub list_max: usize,
    /// The largest frame accepted from a registered client.
    pub max_frame_len: usize,
    /// The largest frame accepted before registration (a hello, a registration, an
    /// announcement): small, so unauthenticated connections cost little.
    pub preauth_max_frame_len: usize,
    /// The most mail envelopes sent in one `Fetch` reply (fewer if they would not fit a
    /// frame: the store stops reading at the frame's budget).
    pub fetch_batch: u32,
    /// Requests per second one connection may sustain (token bucket); more get `rate_limited`.
    pub requests_per_second: u32,
    /// The burst one connection may send above the sustained rate.
    pub request_burst: u32,
    /// The most connections from one source IP address at once; more are told
    /// `server_busy` and closed. Generous, so an office behind one NAT address works.
    pub per_ip_connections: usize,
    /// Requests per second all connections from one source IP address may sustain
    /// together (one token bucket per address); more get `rate_limited`.
    pub per_ip_requests_per_second: u32,
    /// The burst one source IP address may send above its sustained rate.
    pub per_ip_request_burst: u32,
    /// The most new names (first registrations of a name) one source IP address may bind
    /// in an hour; more get `rate_limited`. A name already bound re-registers freely.
    pub per_ip_new_names_per_hour: u32,
    /// Deposits one user may make a minute into other users' mailboxes (all the user's
    /// sessions on this instance together); more get `rate_limited`.
    pub deposits_per_minute: u32,
    /// Bytes of sealed messages one user may deposit an hour into other users' mailboxes;
    /// more get `rate_limited`.
    pub deposit_bytes_per_hour: u64,
    /// The operator secret that `announce` must prove; `None` refuses every announcement.
    pub operator_secret: Option<Vec<u8>>,
    /// The server's static key: every control connection is a Noise handshake with it, and
    /// clients pin it. Instances that share one store share one key (`--key-file`).
    pub server_key: std::sync::Arc<proto::ServerKey>,
    /// How long a shutdown waits for connections to close.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 200_000,
            open_file_reserve: 128,
            max_sessions_per_user: 8,
            list_max: 1000,
            max_frame_len: proto::wire::MAX_FRAME_LEN,
            preauth_max_frame_len: 4 * 1024,
            fetch_batch: 1000,
            requests_per_second: 20_000,
            request_burst: 40_000,
            per_ip_connections: 256,
            per_ip_requests_per_second: 2_000,
            per_ip_request_burst: 4_000,
            per_ip_new_names_per_hour: 100,
            deposits_per_minute: 600,
            deposit_bytes_per_hour: 64 << 20,
            operator_secret: None,
            server_key: std::sync::Arc::new(proto::ServerKey::generate()),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// Refuses settings the server cannot keep its promises with: a presence timeout no
    /// longer than the heartbeat interval would drop every client between two heartbeats,
    /// over and over.
    pub fn validate(&self) -> Result<(), String> {
        if self.presence_ttl <= self.heartbeat_interval {
            return Err(format!(
                "the presence timeout ({} s) must be longer than the heartbeat interval ({} s), \
                 or every client drops offline between two heartbeats (the defaults are 30 s and 10 s)",
                self.presence_ttl.as_secs(),
                self.heartbeat_interval.as_secs()
            ));
        }
        if self.heartbeat_interval.is_zero() {
            return Err("the heartbeat interval must be at least 1 s".to_owned());
        }
        if self.max_sessions_per_user == 0 {
            return Err(
                "the session limit per user must be at least 1 (the default is 8)".to_owned(),
            );
        }
        if !(1..=MAX_LIST_LEN).contains(&self.list_max) {
            return Err(format!(
                "the most names in a list ({}) must be between 1 and {MAX_LIST_LEN} (the default is 1000)",
                self.list_max
            ));
        }
        if self.per_ip_connections == 0 || self.per_ip_requests_per_second == 0 {
            return Err(
                "the per-IP limits (connections, requests per second) must be at least 1 \
                 (the defaults are 256 and 2000)"
                    .to_owned(),
            );
        }
        if self.handshake_timeout.is_zero() {
            return Err("the handshake timeout must be at least 1 s".to_owned());
        }
        if !(MIN_PREAUTH_FRAME_LEN..=self.max_frame_len).contains(&self.preauth_max_frame_len) {
            return Err(format!(
                "the frame limit before registration ({} bytes) must be between {MIN_PREAUTH_FRAME_LEN} \
                 (room for a registration) and the frame limit ({} bytes); the default is 4096",
                self.preauth_max_frame_len, self.max_frame_len
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presence_timeout_must_outlast_the_heartbeat_interval() {
        assert_eq!(Config::default().validate(), Ok(()));
        let mut config = Config::default();
        config.presence_ttl = config.heartbeat_interval;
        assert!(config.validate().unwrap_err().contains("longer than"));
        config.heartbeat_interval = Duration::ZERO;
        config.presence_ttl = Duration::from_secs(5);
        assert!(config.validate().is_err());
    }

    #[test]
    fn the_frame_limit_before_registration_fits_a_registration_and_the_frame_limit() {
        let mut config = Config {
            preauth_max_frame_len: 100,
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("before registration")
        );
        config.preauth_max_frame_len = config.max_frame_len + 1;
        assert!(config.validate().is_err());
        config.preauth_max_frame_len = config.max_frame_len;
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn the_most_names_in_a_list_fit_a_frame() {
        let names = vec![proto::Username::new(&"n".repeat(32)).unwrap(); MAX_LIST_LEN];
        let reply = proto::Reply::UsersCapped {
            users: names,
            more: u64::MAX,
        };
        let response = proto::ServerMsg::Response {
            id: u64::MAX,
            result: Ok(reply),
        };
        assert!(proto::wire::encoded_len(&response).unwrap() <= proto::wire::MAX_FRAME_LEN);
        let config = Config {
            list_max: MAX_LIST_LEN + 1,
            ..Config::default()
        };
        assert!(config.validate().unwrap_err().contains("names in a list"));
    }
}
