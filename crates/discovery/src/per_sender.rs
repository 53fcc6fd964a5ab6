//! [`PerSender`]: the deposit budget of each registered user, shared by all of the user's
//! sessions on this instance: messages a minute into other users' mailboxes (a token
//! bucket, so a burst of a minute's worth is allowed) and bytes an hour (a fixed window
//! opened by the first deposit after the last window closed). Over either, a deposit is
//! refused with `rate_limited` and when to try again; the sender keeps the message in its
//! outbox and sends it later.
//!
//! Each instance keeps its own budgets: with several instances on one store, a user whose
//! sessions are spread over them gets each instance's budget. Memory stays bounded by what
//! is live: a sender's entry is swept once its bucket is full again and its byte window has
//! closed, whenever the map has doubled since the last sweep.
//!
//! Time is passed in; nothing here touches a socket or a clock.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use proto::Username;

use crate::limits::TokenBucket;

/// The deposit budget of one sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepositLimits {
    /// Deposits a minute (the bucket holds a minute's worth).
    pub per_minute: u32,
    /// Bytes of sealed messages an hour.
    pub bytes_per_hour: u64,
}

/// Why a deposit is over its sender's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverBudget {
    /// Too many deposits this minute.
    Messages {
        /// When a deposit is allowed again.
        retry_after: Duration,
    },
    /// Too many bytes this hour.
    Bytes {
        /// When the hour's window closes.
        retry_after: Duration,
    },
}

const HOUR: Duration = Duration::from_secs(3600);

/// The fewest entries before a sweep of the idle ones is worth it.
const MIN_SWEEP: usize = 1024;

#[derive(Debug)]
struct Budget {
    messages: TokenBucket,
    window_start: Instant,
    bytes: u64,
}

/// Every sender's budget on this instance.
#[derive(Debug)]
pub struct PerSender {
    limits: DepositLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    budgets: HashMap<Username, Budget>,
    sweep_at: usize,
}

impl PerSender {
    /// Budgets of `limits` for every sender.
    pub fn new(limits: DepositLimits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner {
                budgets: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        }
    }

    /// Counts a deposit of `bytes` by `sender` at `now`, or says why it is over budget
    /// (then nothing is counted).
    pub fn take(&self, sender: &Username, bytes: u64, now: Instant) -> Result<(), OverBudget> {
        let Ok(mut inner) = self.inner.lock() else {
            return Ok(());
        };
        if inner.budgets.len() >= inner.sweep_at {
            inner.budgets.retain(|_, budget| {
                !budget.messages.is_full(now) || now < budget.window_start + HOUR
            });
            inner.sweep_at = (inner.budgets.len() * 2).max(MIN_SWEEP);
        }
        let limits = self.limits;
        let budget = inner
            .budgets
            .entry(sender.clone())
            .or_insert_with(|| Budget {
                messages: TokenBucket::per_minute(limits.per_minute, now),
                window_start: now,
                bytes: 0,
            });
        if now >= budget.window_start + HOUR {
            budget.window_start = now;
            budget.bytes = 0;
        }
        if budget.bytes.saturating_add(bytes) > limits.bytes_per_hour {
            return Err(OverBudget::Bytes {
                retry_after: (budget.window_start + HOUR).saturating_duration_since(now),
            });
        }
        budget
            .messages
            .take_or_wait(now)
            .map_err(|retry_after| OverBudget::Messages { retry_after })?;
        budget.bytes += bytes;
        Ok(())
    }

    /// How many senders have an entry now (for tests of the sweep).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .map(|inner| inner.budgets.len())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[test]
    fn a_minutes_worth_of_deposits_then_a_wait() {
        let budgets = PerSender::new(DepositLimits {
            per_minute: 120,
            bytes_per_hour: u64::MAX,
        });
        let now = Instant::now();
        for _ in 0..120 {
            budgets.take(&name("mallory"), 100, now).unwrap();
        }
        let Err(OverBudget::Messages { retry_after }) = budgets.take(&name("mallory"), 100, now)
        else {
            panic!("over the budget");
        };
        assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
        // Another sender has a budget of its own.
        budgets.take(&name("alice"), 100, now).unwrap();
        // Two a second come back.
        budgets
            .take(&name("mallory"), 100, now + Duration::from_secs(1))
            .unwrap();
    }

    #[test]
    fn bytes_an_hour_then_the_window_closes() {
        let budgets = PerSender::new(DepositLimits {
            per_minute: u32::MAX,
            bytes_per_hour: 1000,
        });
        let start = Instant::now();
        budgets.take(&name("mallory"), 600, start).unwrap();
        let later = start + Duration::from_secs(600);
        assert_eq!(
            budgets.take(&name("mallory"), 600, later),
            Err(OverBudget::Bytes {
                retry_after: Duration::from_secs(3000)
            })
        );
        budgets.take(&name("mallory"), 400, later).unwrap();
        budgets.take(&name("mallory"), 1000, start + HOUR).unwrap();
    }

    #[test]
    fn idle_senders_are_forgotten() {
        let budgets = PerSender::new(DepositLimits {
            per_minute: 60,
            bytes_per_hour: 1 << 20,
        });
        let start = Instant::now();
        for index in 0..MIN_SWEEP * 3 {
            budgets
                .take(&name(&format!("user{index}")), 10, start)
                .unwrap();
        }
        let much_later = start + HOUR * 2;
        // Enough newcomers to reach the next sweep, which forgets every idle sender.
        for index in 0..MIN_SWEEP * 2 {
            budgets
                .take(&name(&format!("other{index}")), 10, much_later)
                .unwrap();
        }
        assert!(budgets.len() <= MIN_SWEEP * 2, "{}", budgets.len());
    }
}
