//! [`Chats`]: the conversations this client has had, each with its unread count and the
//! time of its last message, for the `chats` command.
//!
//! A message is unread when it arrives while its conversation is not the open one; opening
//! the conversation (`chat`, `msg`) or reading its `history` clears the count. What a person
//! has looked at is the client's business, not the runtime's: the counts live in a small
//! file of the client's own (`chats.json` in the user's data dir, 0600), written when the
//! client stops. A client killed outright loses the counts since its start, never a message.

use std::{collections::BTreeMap, io::Write as _, path::Path};

use proto::Username;
use serde::{Deserialize, Serialize};

use crate::command::Command;
use serde_json::{Value, json};

/// The file in the user's data dir.
pub const CHATS_FILE: &str = "chats.json";

/// One conversation's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chat {
    /// Messages received and not yet looked at.
    pub unread: u64,
    /// When its last message (either way) was written, in ms since the epoch.
    pub last_ms: u64,
}

/// Every conversation, by the other user's name, and which one is open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chats {
    chats: BTreeMap<String, Chat>,
    open: Option<Username>,
}

impl Chats {
    /// The open conversation's user, if any.
    pub fn open_user(&self) -> Option<&Username> {
        self.open.as_ref()
    }

    /// What a typed command does to the conversations, before it runs: `chat` and `msg`
    /// open one (and read it), `chat` alone closes it, a send is its latest message,
    /// `history` reads it.
    pub fn note(&mut self, command: &Command, now_ms: u64) {
        match command {
            Command::Open(user) => self.open(user),
            Command::OpenAndSend { to, .. } => {
                self.open(to);
                self.sent(to, now_ms);
            }
            Command::Close => self.close(),
            Command::Send { to, .. } => self.sent(to, now_ms),
            Command::History { user, .. } => self.read(user),
            _ => {}
        }
    }

    /// The conversation with `user` is open (and so read) from now on.
    pub fn open(&mut self, user: &Username) {
        self.read(user);
        self.open = Some(user.clone());
    }

    /// No conversation is open any more.
    pub fn close(&mut self) {
        self.open = None;
    }

    /// A message from `from`, written at `at_ms`, arrived: unread unless its conversation
    /// is the open one.
    pub fn received(&mut self, from: &Username, at_ms: u64) {
        let open = self.open.as_ref() == Some(from);
        let chat = self.chats.entry(from.as_str().to_owned()).or_default();
        chat.last_ms = chat.last_ms.max(at_ms);
        if !open {
            chat.unread = chat.unread.saturating_add(1);
        }
    }

    /// A message to `to` was written at `at_ms`.
    pub fn sent(&mut self, to: &Username, at_ms: u64) {
        let chat = self.chats.entry(to.as_str().to_owned()).or_default();
        chat.last_ms = chat.last_ms.max(at_ms);
    }

    /// The conversation with `user` was looked at: nothing in it is unread.
    pub fn read(&mut self, user: &Username) {
        if let Some(chat) = self.chats.get_mut(user.as_str()) {
            chat.unread = 0;
        }
    }

    /// The conversations, the latest first (then by name).
    pub fn list(&self) -> Vec<(&str, Chat)> {
        let mut list: Vec<(&str, Chat)> = self
            .chats
            .iter()
            .map(|(name, chat)| (name.as_str(), *chat))
            .collect();
        list.sort_by(|a, b| b.1.last_ms.cmp(&a.1.last_ms).then(a.0.cmp(b.0)));
        list
    }

    /// `chats`' fields: `chats`, the latest first, each `user`, `unread`, `last_ms`.
    pub fn json(&self) -> Value {
        let chats: Vec<Value> = self
            .list()
            .into_iter()
            .map(|(user, chat)| json!({"user": user, "unread": chat.unread, "last_ms": chat.last_ms}))
            .collect();
        json!({ "chats": chats })
    }

    /// Reads the counts kept in `path`; a missing or unreadable file is no conversations
    /// (they are a convenience, never worth refusing to start over).
    pub fn load(path: &Path) -> Self {
        let chats = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<BTreeMap<String, Chat>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|(name, _)| Username::new(name).is_ok())
            .collect();
        Self { chats, open: None }
    }

    /// Writes the counts to `path` (0600).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&self.chats).map_err(std::io::Error::other)?;
        let mut file = proto::identity::open_private_file(path)?;
        file.write_all(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[test]
    fn messages_outside_the_open_conversation_are_unread_until_it_is_looked_at() {
        let mut chats = Chats::default();
        chats.received(&name("bob"), 10);
        chats.received(&name("bob"), 20);
        chats.open(&name("carol"));
        chats.received(&name("carol"), 15);
        chats.close();
        chats.sent(&name("dave"), 5);
        assert_eq!(
            chats.list(),
            [
                (
                    "bob",
                    Chat {
                        unread: 2,
                        last_ms: 20
                    }
                ),
                (
                    "carol",
                    Chat {
                        unread: 0,
                        last_ms: 15
                    }
                ),
                (
                    "dave",
                    Chat {
                        unread: 0,
                        last_ms: 5
                    }
                ),
            ]
        );
        chats.read(&name("bob"));
        chats.read(&name("nobody"));
        // Opening a conversation reads it too.
        chats.received(&name("dave"), 30);
        chats.open(&name("dave"));
        chats.close();
        assert_eq!(
            chats.list()[0],
            (
                "dave",
                Chat {
                    unread: 0,
                    last_ms: 30
                }
            )
        );
        assert_eq!(
            chats.list()[1],
            (
                "bob",
                Chat {
                    unread: 0,
                    last_ms: 20
                }
            )
        );
        // An older message (sent earlier, arrived late) does not move the last time back.
        chats.received(&name("bob"), 1);
        assert_eq!(
            chats.list()[1],
            (
                "bob",
                Chat {
                    unread: 1,
                    last_ms: 20
                }
            )
        );
        assert_eq!(
            chats.json()["chats"][1],
            json!({"user": "bob", "unread": 1, "last_ms": 20})
        );
    }

    #[test]
    fn typed_commands_open_close_send_and_read() {
        let mut chats = Chats::default();
        chats.received(&name("bob"), 10);
        chats.note(
            &Command::History {
                user: name("bob"),
                limit: 5,
            },
            11,
        );
        assert_eq!(chats.list()[0].1.unread, 0);
        chats.note(
            &Command::OpenAndSend {
                to: name("carol"),
                body: "hi".into(),
            },
            12,
        );
        assert_eq!(chats.open_user(), Some(&name("carol")));
        assert_eq!(
            chats.list()[0],
            (
                "carol",
                Chat {
                    unread: 0,
                    last_ms: 12
                }
            )
        );
        chats.note(&Command::Close, 13);
        assert_eq!(chats.open_user(), None);
        chats.note(
            &Command::Send {
                to: name("bob"),
                body: "x".into(),
            },
            14,
        );
        assert_eq!(
            chats.list()[0],
            (
                "bob",
                Chat {
                    unread: 0,
                    last_ms: 14
                }
            )
        );
    }

    #[test]
    fn counts_survive_a_restart_and_a_damaged_file_is_no_conversations() {
        let dir = std::env::temp_dir().join(format!("p2pchat-chats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(CHATS_FILE);
        let mut chats = Chats::default();
        chats.received(&name("bob"), 10);
        chats.save(&path).unwrap();
        assert_eq!(Chats::load(&path), chats);
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(Chats::load(&path), Chats::default());
        std::fs::write(&path, br#"{"Not A Name": {"unread": 1, "last_ms": 2}}"#).unwrap();
        assert_eq!(Chats::load(&path), Chats::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
