//! Contact presence for one session, as a pure state machine: the watch set a client sent
//! ([`proto::Request::Watch`]) and the presence pushes it lets through, time passed in.
//!
//! A presence change of `bob` reaches `alice` only when both watch each other: `bob`'s
//! session sends its change to the users *it* watches (a [`store::Broadcast::Presence`]),
//! and `alice`'s session pushes it only if *its* watch set holds `bob`
//! ([`Watching::offer`]). Each end checks its own set, so no instance needs another's.
//!
//! Bounds: at most [`proto::msg::MAX_WATCHED`] names per session (about 64 KiB with the
//! map's overhead, held only by sessions that asked), and at most one push per contact per
//! [`MIN_PUSH_INTERVAL_MS`]: a change inside that window is held, and only the latest state
//! goes out when it ends (nothing at all if it flapped back to what was shown), so a user
//! reconnecting in a loop costs each contact one push every two seconds at most.

use std::collections::{HashMap, HashSet};

use proto::{Push, Username, msg::MAX_WATCHED};

/// The shortest time between two presence pushes about one contact to one session.
pub const MIN_PUSH_INTERVAL_MS: u64 = 2_000;

/// The most names one session may add to its watch set over its life, unwatched ones
/// included. Each added name is a presence notice published to the store, so a client
/// that unwatches and watches again in a loop would otherwise turn every request into a
/// thousand notices; a client sends its set once per session and then one name per new
/// contact.
pub const MAX_ADDED_PER_SESSION: usize = 4 * MAX_WATCHED;

/// One watched user, as this session last heard of them.
#[derive(Debug, Clone, Default)]
struct Contact {
    /// The state last pushed (`None`: nothing pushed yet).
    shown: Option<bool>,
    /// A change that came inside the quiet window, to push when it ends.
    held: Option<bool>,
    /// Until when (ms since the epoch) no push about this contact goes out.
    quiet_until_ms: u64,
}

/// Why a watch request adds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchRefused {
    /// It would take the set past [`MAX_WATCHED`].
    #[error("a session watches at most {max} users ({watched} now, {asked} more asked)")]
    Full {
        /// The bound.
        max: usize,
        /// How many are watched now.
        watched: usize,
        /// How many new names the request added.
        asked: usize,
    },
    /// The session has added [`MAX_ADDED_PER_SESSION`] names already.
    #[error("a session adds at most {max} users to its watch set over its life; connect again")]
    Churn {
        /// The bound.
        max: usize,
    },
}

/// One session's watch set and the pushes it lets through.
#[derive(Debug, Clone, Default)]
pub struct Watching {
    contacts: HashMap<Username, Contact>,
    /// How many names were added over the session's life.
    added: usize,
    /// The earliest end of a quiet window with a held change, if any.
    next_due_ms: Option<u64>,
}

impl Watching {
    /// Adds `users` (but never `me`) to the set; returns the names that were not in it
    /// yet. All or nothing: a request that would pass [`MAX_WATCHED`] adds none.
    pub fn add(
        &mut self,
        me: &Username,
        users: Vec<Username>,
    ) -> Result<Vec<Username>, WatchRefused> {
        let mut added: Vec<Username> = users
            .into_iter()
            .filter(|user| user != me && !self.contacts.contains_key(user))
            .collect();
        added.sort();
        added.dedup();
        if self.contacts.len() + added.len() > MAX_WATCHED {
            return Err(WatchRefused::Full {
                max: MAX_WATCHED,
                watched: self.contacts.len(),
                asked: added.len(),
            });
        }
        if self.added + added.len() > MAX_ADDED_PER_SESSION {
            return Err(WatchRefused::Churn {
                max: MAX_ADDED_PER_SESSION,
            });
        }
        self.added += added.len();
        for user in &added {
            self.contacts.insert(user.clone(), Contact::default());
        }
        Ok(added)
    }

    /// Drops `users` from the set; returns the ones that were in it.
    pub fn remove(&mut self, users: Vec<Username>) -> Vec<Username> {
        let mut removed: Vec<Username> = users
            .into_iter()
            .filter(|user| self.contacts.remove(user).is_some())
            .collect();
        removed.sort();
        removed.dedup();
        removed
    }

    /// Whether `user` is watched.
    pub fn watches(&self, user: &Username) -> bool {
        self.contacts.contains_key(user)
    }

    /// Every watched name.
    pub fn names(&self) -> Vec<Username> {
        self.contacts.keys().cloned().collect()
    }

    /// How many users are watched.
    pub fn len(&self) -> usize {
        self.contacts.len()
    }

    /// Whether nobody is watched.
    pub fn is_empty(&self) -> bool {
        self.contacts.is_empty()
    }

    /// `user` is now `online` (or not), as another session said at `now_ms`: the push to
    /// send now, if any. Nothing for a user not watched, nor for the state already shown;
    /// a change inside the contact's quiet window is held for [`Watching::due`].
    pub fn offer(&mut self, user: &Username, online: bool, now_ms: u64) -> Option<Push> {
        let contact = self.contacts.get_mut(user)?;
        if now_ms < contact.quiet_until_ms {
            contact.held = (contact.shown != Some(online)).then_some(online);
            if contact.held.is_some() {
                let due = contact.quiet_until_ms;
                self.next_due_ms = Some(self.next_due_ms.map_or(due, |next| next.min(due)));
            }
            return None;
        }
        contact.held = None;
        if contact.shown == Some(online) {
            return None;
        }
        contact.shown = Some(online);
        contact.quiet_until_ms = now_ms + MIN_PUSH_INTERVAL_MS;
        Some(Push::Presence {
            user: user.clone(),
            online,
        })
    }

    /// `users` lapsed at `now_ms`: their presence expired without their session leaving
    /// (its instance died), so no session told its contacts. Each of them this session
    /// has shown online (or holds online) is offered as offline, as if their session had
    /// said so; one never shown online is left alone, because only their own session
    /// knows whether it watches this one back. The pushes to send now.
    pub fn lapsed(&mut self, users: &HashSet<Username>, now_ms: u64) -> Vec<Push> {
        let shown_online: Vec<Username> = self
            .contacts
            .iter()
            .filter(|(user, contact)| {
                (contact.shown == Some(true) || contact.held == Some(true)) && users.contains(*user)
            })
            .map(|(user, _)| user.clone())
            .collect();
        shown_online
            .iter()
            .filter_map(|user| self.offer(user, false, now_ms))
            .collect()
    }

    /// When [`Watching::due`] has something to send, if ever.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.next_due_ms
    }

    /// The held changes whose quiet window has ended at `now_ms`, as pushes.
    pub fn due(&mut self, now_ms: u64) -> Vec<Push> {
        if self.next_due_ms.is_none_or(|due| due > now_ms) {
            return Vec::new();
        }
        let mut pushes = Vec::new();
        let mut next: Option<u64> = None;
        for (user, contact) in &mut self.contacts {
            let Some(online) = contact.held else {
                continue;
            };
            if contact.quiet_until_ms > now_ms {
                next = Some(next.map_or(contact.quiet_until_ms, |n| n.min(contact.quiet_until_ms)));
                continue;
            }
            contact.held = None;
            if contact.shown != Some(online) {
                contact.shown = Some(online);
                contact.quiet_until_ms = now_ms + MIN_PUSH_INTERVAL_MS;
                pushes.push(Push::Presence {
                    user: user.clone(),
                    online,
                });
            }
        }
        self.next_due_ms = next;
        pushes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_790_000_000_000;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    fn presence(user: &str, online: bool) -> Option<Push> {
        Some(Push::Presence {
            user: name(user),
            online,
        })
    }

    #[test]
    fn only_watched_users_get_through_and_each_state_once() {
        let mut watching = Watching::default();
        let added = watching
            .add(
                &name("alice"),
                vec![name("bob"), name("bob"), name("alice")],
            )
            .unwrap();
        assert_eq!(added, vec![name("bob")], "no duplicates, never oneself");
        assert_eq!(watching.offer(&name("mallory"), true, T0), None);
        assert_eq!(
            watching.offer(&name("bob"), true, T0),
            presence("bob", true)
        );
        // The same state again (a second session of bob, an answer) is not repeated.
        let later = T0 + MIN_PUSH_INTERVAL_MS;
        assert_eq!(watching.offer(&name("bob"), true, later), None);
        assert_eq!(
            watching.offer(&name("bob"), false, later + 1),
            presence("bob", false)
        );
    }

    #[test]
    fn a_lapsed_contact_shown_online_goes_offline_and_one_never_shown_online_stays_untold() {
        let mut watching = Watching::default();
        watching
            .add(
                &name("alice"),
                vec![name("bob"), name("carol"), name("dave")],
            )
            .unwrap();
        assert_eq!(
            watching.offer(&name("bob"), true, T0),
            presence("bob", true)
        );
        assert_eq!(
            watching.offer(&name("dave"), true, T0),
            presence("dave", true)
        );
        // Carol never showed as online here (she may not watch alice back); eve is not
        // watched; dave did not lapse.
        let lapsed: HashSet<Username> = ["bob", "carol", "eve"].into_iter().map(name).collect();
        let later = T0 + MIN_PUSH_INTERVAL_MS;
        assert_eq!(
            watching.lapsed(&lapsed, later),
            vec![presence("bob", false).unwrap()]
        );
        assert!(watching.lapsed(&lapsed, later + 1).is_empty(), "told once");
        // Inside a quiet window the offline is held like any change.
        assert_eq!(watching.offer(&name("bob"), true, later + 2), None);
        assert!(watching.lapsed(&lapsed, later + 3).is_empty());
        assert!(
            watching.due(later + MIN_PUSH_INTERVAL_MS).is_empty(),
            "back to what was shown"
        );
    }

    #[test]
    fn a_flapping_contact_costs_one_push_per_interval_and_the_last_state_wins() {
        let mut watching = Watching::default();
        watching.add(&name("alice"), vec![name("bob")]).unwrap();
        assert_eq!(
            watching.offer(&name("bob"), true, T0),
            presence("bob", true)
        );
        for step in 1..100u64 {
            assert_eq!(watching.offer(&name("bob"), step % 2 == 0, T0 + step), None);
        }
        // The last offer (step 99) was "offline": it goes out when the window ends.
        assert_eq!(watching.next_due_ms(), Some(T0 + MIN_PUSH_INTERVAL_MS));
        assert!(watching.due(T0 + MIN_PUSH_INTERVAL_MS - 1).is_empty());
        assert_eq!(
            watching.due(T0 + MIN_PUSH_INTERVAL_MS),
            vec![presence("bob", false).unwrap()]
        );
        assert_eq!(watching.next_due_ms(), None);
    }

    #[test]
    fn a_flap_back_to_the_state_shown_sends_nothing() {
        let mut watching = Watching::default();
        watching.add(&name("alice"), vec![name("bob")]).unwrap();
        assert_eq!(
            watching.offer(&name("bob"), true, T0),
            presence("bob", true)
        );
        assert_eq!(watching.offer(&name("bob"), false, T0 + 10), None);
        assert_eq!(watching.offer(&name("bob"), true, T0 + 20), None);
        assert!(watching.due(T0 + MIN_PUSH_INTERVAL_MS).is_empty());
    }

    #[test]
    fn the_watch_set_is_bounded_all_or_nothing() {
        let mut watching = Watching::default();
        let me = name("alice");
        let many: Vec<Username> = (0..MAX_WATCHED).map(|i| name(&format!("u{i}"))).collect();
        assert_eq!(watching.add(&me, many.clone()).unwrap().len(), MAX_WATCHED);
        // Names already watched do not count again.
        assert_eq!(watching.add(&me, many[..10].to_vec()).unwrap(), vec![]);
        assert_eq!(
            watching.add(&me, vec![name("one-more")]),
            Err(WatchRefused::Full {
                max: MAX_WATCHED,
                watched: MAX_WATCHED,
                asked: 1
            })
        );
        assert_eq!(
            watching.remove(vec![name("u0"), name("nobody")]),
            vec![name("u0")]
        );
        assert_eq!(watching.add(&me, vec![name("one-more")]).unwrap().len(), 1);
        assert!(!watching.watches(&name("u0")));
        assert_eq!(watching.offer(&name("u0"), true, T0), None);
    }

    #[test]
    fn unwatching_and_watching_again_in_a_loop_runs_out() {
        let mut watching = Watching::default();
        let me = name("alice");
        let many: Vec<Username> = (0..MAX_WATCHED).map(|i| name(&format!("u{i}"))).collect();
        for _ in 0..MAX_ADDED_PER_SESSION / MAX_WATCHED {
            assert_eq!(watching.add(&me, many.clone()).unwrap().len(), MAX_WATCHED);
            watching.remove(many.clone());
        }
        assert_eq!(
            watching.add(&me, vec![name("u0")]),
            Err(WatchRefused::Churn {
                max: MAX_ADDED_PER_SESSION
            })
        );
    }
}
