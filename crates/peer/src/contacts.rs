//! Whose presence the client watches at the server: the people it has talked with (pinned
//! keys, then everyone it sends to or hears from), less the ones it blocks, at most
//! [`MAX_WATCHED`]. Pure rules for the core ([`crate::core`]); the server pushes a contact's
//! presence only while the two watch each other, so leaving a blocked user out of the set
//! is enough for them never to see this user's presence.

use std::collections::HashSet;

use proto::{Username, msg::MAX_WATCHED};

/// The watch set as the client keeps it.
#[derive(Debug, Default)]
pub(crate) struct Contacts {
    watched: HashSet<Username>,
    blocked: HashSet<Username>,
}

impl Contacts {
    /// The contacts known at start (`talked_with`, say the pinned users) and the blocked
    /// users; `me` is never watched.
    pub(crate) fn new(me: &Username, talked_with: Vec<Username>, blocked: Vec<Username>) -> Self {
        let mut contacts = Self {
            watched: HashSet::new(),
            blocked: blocked.into_iter().collect(),
        };
        for user in talked_with {
            if &user != me {
                contacts.talked_with(user);
            }
        }
        contacts
    }

    /// Everyone watched, sorted: the watch request sent at each registration.
    pub(crate) fn all(&self) -> Vec<Username> {
        let mut all: Vec<Username> = self.watched.iter().cloned().collect();
        all.sort();
        all
    }

    /// This client sent to or heard from `user`: true if `user` is new to the set (then
    /// the server is told). A blocked user, or one past the bound, is not added.
    pub(crate) fn talked_with(&mut self, user: Username) -> bool {
        if self.blocked.contains(&user)
            || self.watched.contains(&user)
            || self.watched.len() >= MAX_WATCHED
        {
            return false;
        }
        self.watched.insert(user)
    }

    /// `user` is blocked now: true if they were watched (then the server is told to stop).
    pub(crate) fn blocked(&mut self, user: &Username) -> bool {
        self.blocked.insert(user.clone());
        self.watched.remove(user)
    }

    /// `user` is unblocked: watched again (true when that is new to the set).
    pub(crate) fn unblocked(&mut self, user: Username) -> bool {
        self.blocked.remove(&user);
        self.talked_with(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[test]
    fn blocked_users_and_oneself_are_never_watched() {
        let mut contacts = Contacts::new(
            &name("alice"),
            vec![name("alice"), name("bob"), name("mallory")],
            vec![name("mallory")],
        );
        assert_eq!(contacts.all(), vec![name("bob")]);
        assert!(!contacts.talked_with(name("mallory")));
        assert!(!contacts.talked_with(name("bob")), "already watched");
        assert!(contacts.talked_with(name("carol")));
        assert!(contacts.blocked(&name("carol")));
        assert!(!contacts.talked_with(name("carol")));
        assert!(contacts.unblocked(name("carol")));
        assert_eq!(contacts.all(), vec![name("bob"), name("carol")]);
    }

    #[test]
    fn the_set_stops_growing_at_the_servers_bound() {
        let many = (0..MAX_WATCHED + 5)
            .map(|i| name(&format!("u{i}")))
            .collect();
        let mut contacts = Contacts::new(&name("alice"), many, Vec::new());
        assert_eq!(contacts.all().len(), MAX_WATCHED);
        assert!(!contacts.talked_with(name("newcomer")));
    }
}
