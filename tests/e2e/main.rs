//! The end-to-end test binary, one module per area, helpers in `util`.
//!
//! - `architecture`: the dependency direction of ARCHITECTURE.md.
//! - `chat`: the peer runtime against an in-process discovery server.
//! - `cluster`: two discovery instances on a test-started Redis Cluster (3 masters, 3
//!   replicas), and a master SIGKILLed in the middle of a stream of deposits.
//! - `scripted`: the real binaries, driven through `p2pchat send` and `listen --json`.
//! - `interactive`: the interactive client in tmux, as a person uses it.
//! - `outages`: discovery and Redis restarts and crashes, counting every message.
//! - `hostile_peer`: hostile clients against a peer's P2P listener (the real binary).
//! - `hostile_server`: hostile clients against the real discovery server while two real
//!   users chat.
//! - `identity`: identity backup (export → import on a fresh data dir), key rotation
//!   followed by a contact, and the operator releasing a lost name.
//! - `disk`: full disks and unwritable data dirs (root: a tmpfs in a private mount namespace).
//! - `onpath`: an attacker on the path (recording, changing replies, redirecting a peer's
//!   address, replaying acks), and a server whose key changed.
//! - `ratchet`: the double ratchet against a thief of the data dirs and the server's store
//!   (forward secrecy, post-compromise security), SIGKILLs during a burst both ways, and a
//!   pair's order across the mailbox and direct routes (1,000 mails, then direct).
//! - `presence`: contacts' presence (mutual contacts only, also across two instances on
//!   one Redis; a stranger watching learns nothing) and the second-session notice.
//! - `netfaults`: an unreachable listener and a healing partition, between network
//!   namespaces (root).
//!
//! `P2PCHAT_LONG_TESTS=1` runs the long variants (bigger crowds and floods, more messages).

mod architecture;
mod chat;
mod cluster;
mod disk;
mod hostile_peer;
mod hostile_server;
mod identity;
mod interactive;
mod netfaults;
mod onpath;
mod outages;
mod presence;
mod ratchet;
mod scripted;
mod util;
