//! Limits with their arithmetic kept pure: [`TokenBucket`], the per-connection request rate
//! limit, with time passed in; [`connection_cap`], the connection cap under the open-file
//! limit, and [`raise_open_file_limit`], which the binary calls at start.

use std::time::Instant;

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// A full bucket at `now` refilled with `per_minute` tokens a minute, holding a
    /// minute's worth.
    pub fn per_minute(per_minute: u32, now: Instant) -> Self {
        let burst = f64::from(per_minute.max(1));
        Self {
            rate: burst / 60.0,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token at `now`; when the bucket is empty, how long until it holds one.
    pub fn take_or_wait(&mut self, now: Instant) -> Result<(), std::time::Duration> {
        if self.take(now) {
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(std::time::Duration::from_secs_f64(
            (missing / self.rate.max(f64::MIN_POSITIVE)).min(86_400.0),
        ))
    }

    /// Whether the bucket is full at `now` (it would be the same as a new one).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes one token at `now`; false when the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Raises the soft open-file limit to the hard limit and returns the soft limit now in
/// force (`None` where the platform has none or it cannot be read).
pub fn raise_open_file_limit() -> std::io::Result<Option<u64>> {
    rlimit::increase_nofile_limit(rlimit::INFINITY)?;
    Ok(open_file_limit())
}

/// The soft open-file limit of this process, if it has one.
pub fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        match rlimit::getrlimit(rlimit::Resource::NOFILE) {
            Ok((soft, _)) if soft != rlimit::INFINITY => Some(soft),
            _ => None,
        }
    }
    #[cfg(not(unix))]
    None
}

/// The connection cap the server keeps: the configured one, or less when the open-file
/// limit (less `reserve` descriptors for the listener, the store, logs and refusals in
/// flight) cannot hold that many; at least one.
pub fn connection_cap(configured: usize, open_files: Option<u64>, reserve: u64) -> usize {
    let room = open_files.map_or(usize::MAX, |limit| {
        usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX)
    });
    configured.min(room).max(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Regression: the cap was 200,000 under an open-file limit of 20,000, so a crowd
    /// exhausted the descriptors and the accept loop failed instead of answering `server_busy`.
    #[test]
    fn the_connection_cap_leaves_the_reserve_of_the_open_file_limit() {
        assert_eq!(connection_cap(200_000, Some(20_000), 100), 19_900);
        assert_eq!(connection_cap(1_000, Some(20_000), 100), 1_000);
        assert_eq!(connection_cap(1_000, None, 100), 1_000);
        assert_eq!(connection_cap(1_000, Some(50), 100), 1);
    }

    #[test]
    fn allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5, start);
        assert_eq!((0..8).filter(|_| bucket.take(start)).count(), 5);
        // A second later, ten more (capped at the burst of five).
        let later = start + Duration::from_secs(1);
        assert_eq!((0..8).filter(|_| bucket.take(later)).count(), 5);
        // A tenth of a second later, one more.
        let soon = later + Duration::from_millis(100);
        assert!(bucket.take(soon));
        assert!(!bucket.take(soon));
    }
}
