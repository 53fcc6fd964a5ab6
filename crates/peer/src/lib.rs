//! The p2pchat peer runtime: everything a client does except talk to a terminal.
//!
//! - [`runtime`]: [`start`] a runtime from a [`Config`]; it returns a [`Client`] (commands:
//!   send, list, block, mute, whois, trust, history, ...) and [`Events`] (messages,
//!   delivery results, announcements, warnings) in order.
//! - [`backup`]: identity backup files ([`backup::export`], [`backup::import`]) and key
//!   rotation ([`backup::rotate`]) on a data dir, while no runtime runs on it.
//! - [`api`]: the public types ([`Config`], [`Event`], [`DeliveryStatus`], [`ClientError`]...).
//! - `core`: the event loop's rules as an I/O-free state machine (inputs and the time in,
//!   actions out, each in a part of its own, like the per-recipient queues), unit-tested
//!   without a runtime, socket or disk.
//! - `shell`: the one task that owns the loop's I/O (listener, channels, tasks, state
//!   writes), feeds the core and does what it says; every channel bounded.
//! - `context`: what the tasks share.
//! - [`control`]: the control connection to the discovery server as an actor (a Noise
//!   handshake with the server's key, register, heartbeats, requests matched by id,
//!   reconnect with backoff).
//! - [`server_trust`]: the server keys pinned per address (`known_servers`), checked at
//!   every connect.
//! - [`delivery`]: sending one message: direct, else the mailbox; [`DeliveryStatus`].
//! - [`inbox`]: receiving: direct connections (`direct`) and mail (`mailbox`) share one
//!   check-and-store path (`check`, then the store in the module itself).
//! - [`outgoing`]: one task per recipient pipelines its messages over a kept link, in order.
//! - [`link`]: [`link::PeerLink`], the sending side of the peer protocol (a Noise handshake
//!   that only the recipient's key can finish).
//! - `sessions`: the Olm account and the sessions with each peer (vodozemac's double
//!   ratchet), each change saved in the same write as the message it sealed or opened.
//! - `receipts`: delivered and read receipts, sealed like messages: what is owed, how it
//!   goes, and the rule that a message's status only moves forward.
//! - `prekeys`: publishing the account's signed one-time and fallback keys at the server.
//! - [`state`]: [`state::State`], the crash-safe local state (pins, blocks, mutes, history,
//!   outbox, seen ids, not-yet-shown marks, mail held under a changed key) in one redb file.
//! - `testing` (the `testing` feature, for tests only): a runtime whose state is on a
//!   storage backend the test holds, to see what a crash at a given moment leaves.
//!
//! Data dir layout (one folder per user, mode 0700): `identity.key` (0600, see
//! [`proto::Identity`]), `state.redb` and `known_servers` (0600, see [`server_trust`]).
//!
//! **Architecture Invariant:** this crate depends on `proto` and `durable` only among the
//! workspace crates, and never prints: everything the user should see is an [`Event`].

pub mod api;
pub mod backup;
pub(crate) mod contacts;
pub(crate) mod context;
pub mod control;
pub(crate) mod core;
pub mod delivery;
pub(crate) mod inbox;
pub mod link;
pub(crate) mod outgoing;
pub(crate) mod prekeys;
pub mod reason;
pub(crate) mod receipts;
pub mod runtime;
pub mod server_trust;
pub(crate) mod sessions;
pub(crate) mod shell;
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;

pub use api::{DeliveryStatus, FailureReason, RefusalReason};
pub use runtime::{
    Client, ClientError, Config, Event, Events, OnlineUsers, SendReport, StartError, Status,
    WhoisReport, start,
};
