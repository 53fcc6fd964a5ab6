//! [`ReceiptRetry`]: when the receipts owed to a user whose route failed are tried again.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use durable::Backoff;
use proto::Username;

/// The wait before the first retry of receipts to a user after a run left some due.
pub(crate) const RECEIPT_RETRY_MIN: Duration = Duration::from_secs(5);

/// The longest wait between two tries of receipts to one user.
pub(crate) const RECEIPT_RETRY_MAX: Duration = Duration::from_secs(600);

/// Per user, when receipts that could not go to them are tried again: the wait starts at
/// [`RECEIPT_RETRY_MIN`] and doubles after each run that leaves some due to them, up to
/// [`RECEIPT_RETRY_MAX`]; a run that leaves none due forgets the user (back to the start).
/// Until their time, runs pass the user over (their receipts stay due, nothing is lost);
/// when it comes, [`ReceiptRetry::take_due`] says a run is wanted. In memory only: a
/// start tries everything once.
#[derive(Debug, Default)]
pub(crate) struct ReceiptRetry {
    /// User → their backoff, and when they are tried again (`None`: their time has come,
    /// they are in the next run).
    users: HashMap<Username, (Backoff, Option<Instant>)>,
}

impl ReceiptRetry {
    /// A run at `now` left receipts due to `user`: wait longer before the next try.
    pub(crate) fn failed(&mut self, user: Username, now: Instant) {
        let (backoff, at) = self
            .users
            .entry(user)
            .or_insert_with(|| (Backoff::new(RECEIPT_RETRY_MIN, RECEIPT_RETRY_MAX), None));
        *at = Some(now + backoff.next_delay(0));
    }

    /// Nothing is left due to `user` (sent, or never to go): the next failure starts
    /// from the shortest wait.
    pub(crate) fn succeeded(&mut self, user: &Username) {
        self.users.remove(user);
    }

    /// Forgets every wait: a cause they share may be gone (the server is back).
    pub(crate) fn clear(&mut self) {
        self.users.clear();
    }

    /// The users a run passes over now: those whose time has not come.
    pub(crate) fn waiting(&self) -> Vec<Username> {
        let mut waiting: Vec<Username> = self
            .users
            .iter()
            .filter(|(_, (_, at))| at.is_some())
            .map(|(user, _)| user.clone())
            .collect();
        waiting.sort();
        waiting
    }

    /// Marks the users whose time has come at `now` as due again; returns whether there
    /// were any (a run is wanted).
    pub(crate) fn take_due(&mut self, now: Instant) -> bool {
        let mut any = false;
        for (_, at) in self.users.values_mut() {
            if at.is_some_and(|at| at <= now) {
                *at = None;
                any = true;
            }
        }
        any
    }

    /// When the next user's time comes, if any waits.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.users.values().filter_map(|(_, at)| *at).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    /// The waits between the tries of one user failing every time, from `start`.
    fn waits(retry: &mut ReceiptRetry, user: &Username, start: Instant, tries: usize) -> Vec<u64> {
        let mut now = start;
        let mut waits = Vec::new();
        for _ in 0..tries {
            retry.failed(user.clone(), now);
            let at = retry.next_retry().unwrap();
            assert!(!retry.take_due(at - Duration::from_millis(1)));
            assert_eq!(retry.waiting(), vec![user.clone()]);
            assert!(retry.take_due(at));
            assert!(retry.waiting().is_empty());
            waits.push((at - now).as_secs());
            now = at;
        }
        waits
    }

    #[test]
    fn failing_retries_wait_twice_as_long_each_time_up_to_the_cap() {
        let (mut retry, bob, start) = (ReceiptRetry::default(), name("bob"), Instant::now());
        assert_eq!(
            waits(&mut retry, &bob, start, 9),
            [5, 10, 20, 40, 80, 160, 320, 600, 600]
        );
        // A success starts over.
        retry.succeeded(&bob);
        assert_eq!(retry.next_retry(), None);
        assert_eq!(waits(&mut retry, &bob, start, 2), [5, 10]);
    }

    #[test]
    fn each_user_has_a_wait_of_their_own_and_a_clear_forgets_them_all() {
        let (mut retry, start) = (ReceiptRetry::default(), Instant::now());
        let (bob, carol) = (name("bob"), name("carol"));
        retry.failed(bob.clone(), start);
        retry.failed(bob.clone(), start);
        retry.failed(carol.clone(), start);
        assert_eq!(retry.waiting(), vec![bob.clone(), carol.clone()]);
        assert_eq!(retry.next_retry(), Some(start + RECEIPT_RETRY_MIN));
        // Carol's time comes first; bob still waits.
        assert!(retry.take_due(start + RECEIPT_RETRY_MIN));
        assert_eq!(retry.waiting(), vec![bob.clone()]);
        assert_eq!(retry.next_retry(), Some(start + 2 * RECEIPT_RETRY_MIN));
        retry.clear();
        assert!(retry.waiting().is_empty());
        assert_eq!(retry.next_retry(), None);
        assert!(!retry.take_due(start + RECEIPT_RETRY_MAX));
    }
}
