//! All state of the discovery tier: name bindings (and the rotation statements that moved
//! them), presence, offline mailboxes, server-side block lists and the broadcast channel.
//!
//! [`Store`] is the one interface, with two backends:
//! - [`Store::Redis`] ([`redis_store::RedisStore`]): shared by every discovery instance that
//!   points at the same Redis, so several instances behave as one server; on one Redis
//!   server or on a Redis Cluster (detected at connect), where every key is routed to its
//!   user's slot and mail-waiting hints go only to the instances holding the recipient.
//! - [`Store::Embedded`] ([`embedded::EmbeddedStore`]): the default when no Redis URL is
//!   given; durable on disk (redb), so a restart loses no mail and no binding. Presence and
//!   the broadcast channel live in memory there (one process is the whole tier).
//!
//! Time is always passed in (`now_ms`, milliseconds since the Unix epoch), so TTLs are
//! tested without sleeping. Mail is at-least-once: nothing is deleted before it is acked.
//! How each backend lays mail out, and why (a Redis sorted set plus a hash, not a list or a
//! stream), is in the module docs of [`redis_store`] and [`embedded`].
//!
//! With the cargo feature `testing`, `store::testing::RedisServer` starts a throw-away
//! `redis-server` for tests (of this crate and of the crates above it), and
//! `store::testing::RedisCluster` a throw-away cluster of 3 masters and 3 replicas. The
//! conformance suite in `tests/conformance` runs the same behaviours against the embedded
//! backend, one Redis server and a cluster.
//!
//! **Architecture Invariant:** only the discovery server depends on this crate; clients
//! never see a store or its credentials. Envelopes are stored as opaque sealed bytes.

use std::net::SocketAddr;

use proto::{Envelope, MailRef, PublicKeys, Username};
use serde::{Deserialize, Serialize};

pub mod embedded;
mod record;
pub mod redis_store;
#[cfg(feature = "testing")]
pub mod testing;

pub use embedded::EmbeddedStore;
pub use redis_store::{RedisConfigError, RedisOptions, RedisStore};

/// The Redis pub/sub channel carrying operator announcements as plain UTF-8 text, so that
/// `PUBLISH p2pchat:announce "text"` from any Redis client announces too.
pub const ANNOUNCE_CHANNEL: &str = "p2pchat:announce";

/// Limits applied to every mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailLimits {
    /// The most messages one mailbox holds; a deposit beyond it is refused.
    pub cap: u64,
    /// The most bytes of stored mail (each message counted as its stored value: the
    /// wire-encoded envelope and its deposit time) one mailbox holds; a deposit that would
    /// pass it is refused. Default 64 MiB.
    pub max_bytes: u64,
    /// How long mail is kept, in milliseconds (default 30 days).
    pub ttl_ms: u64,
}

impl Default for MailLimits {
    fn default() -> Self {
        Self {
            cap: 10_000,
            max_bytes: 64 << 20,
            ttl_ms: 30 * 24 * 60 * 60 * 1000,
        }
    }
}

/// A name bound to its keys at first registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The name.
    pub user: Username,
    /// The keys it is bound to.
    pub keys: PublicKeys,
    /// When it was bound.
    pub bound_at_ms: u64,
}

impl Binding {
    /// The binding `rotation` makes of this name at `now_ms`: its new keys.
    pub fn rotated(&self, rotation: &proto::identity::Rotation, now_ms: u64) -> Self {
        Self {
            user: self.user.clone(),
            keys: rotation.new.clone(),
            bound_at_ms: now_ms,
        }
    }
}

/// The result of [`Store::bind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindOutcome {
    /// The name was free and is now bound to the given keys.
    Created,
    /// The name was already bound; here is the binding (which may or may not match).
    Existing(Binding),
}

/// The result of [`Store::rotate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The name was bound to the expected binding and now is bound to the new keys; the
    /// statement is kept.
    Rotated,
    /// The binding was no longer the expected one (another rotation or a release came
    /// first, or this one already happened): here is what stands, if anything.
    Changed(Option<Binding>),
}

/// The most rotation statements kept per name (the latest): enough for a contact away
/// through several rotations to follow them all.
pub const MAX_ROTATIONS: usize = 16;

/// Where and until when a user is online.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The user.
    pub user: Username,
    /// Identifies the connection that registered; only it may clear this presence, so a
    /// stale connection closing does not take a newer one offline.
    pub session: u64,
    /// Where the user accepts peer connections.
    pub addresses: Vec<SocketAddr>,
    /// When the user was last heard from.
    pub last_seen_ms: u64,
    /// When the presence lapses without another heartbeat (0 once cleared).
    pub expires_at_ms: u64,
}

impl Presence {
    /// Whether the user is online at `now_ms`.
    pub fn is_online(&self, now_ms: u64) -> bool {
        self.expires_at_ms > now_ms
    }
}

/// A stored envelope and when it was deposited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMail {
    /// The sealed message.
    pub envelope: Envelope,
    /// When it was deposited.
    pub deposited_at_ms: u64,
}

/// The result of [`Store::deposit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepositOutcome {
    /// Stored now.
    Stored,
    /// A message from this sender with this id was already in the mailbox; nothing
    /// changed.
    Duplicate,
}

/// A batch of mail from [`Store::fetch`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fetched {
    /// The oldest waiting messages, oldest first.
    pub mail: Vec<StoredMail>,
    /// How many more are waiting after these.
    pub remaining: u64,
}

/// Events carried between discovery instances (and, for announcements, from any Redis
/// client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Broadcast {
    /// An operator announcement.
    Announcement {
        /// The text.
        text: String,
    },
    /// Mail was deposited for `user`: whichever instance holds their connection tells them.
    MailWaiting {
        /// The recipient.
        user: Username,
    },
    /// `user` came online or went offline, for the users in `to` (at most
    /// [`proto::msg::MAX_WATCHED`], all of them watched by `user`): whichever instance holds
    /// a session of one of them offers it to that session, which pushes it only if it
    /// watches `user` back. Mutuality is checked at both ends, each against the watch set
    /// its own session holds, so no instance needs another's watch sets.
    Presence {
        /// Whose presence.
        user: Username,
        /// Online now or not.
        online: bool,
        /// For whom.
        to: Vec<Username>,
        /// Whether a receiving session that watches `user` back answers with its own
        /// presence (a session that starts watching learns who of its contacts is online).
        answer: bool,
    },
    /// A new session of `user` registered: the user's other sessions are told.
    SessionElsewhere {
        /// Whose sessions.
        user: Username,
        /// The new session's presence id (it is not told about itself).
        session: u64,
        /// Where the server sees the new session.
        observed: SocketAddr,
        /// When it registered, ms since the epoch.
        at_ms: u64,
    },
    /// The session of `user` that held the user's presence ended, and cleared it: a
    /// session of `user` still open on another instance writes the presence again and
    /// tells its contacts it is online (they heard "offline" from the one that ended).
    SessionEnded {
        /// Whose session.
        user: Username,
        /// The ended session's presence id.
        session: u64,
    },
}

/// Store failures. Expected outcomes (a duplicate deposit, an existing binding) are values
/// of the operations, not errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The recipient's mailbox holds `cap` messages already.
    #[error("{user}'s mailbox is full ({cap} messages)")]
    MailboxFull {
        /// The recipient.
        user: Username,
        /// The cap.
        cap: u64,
    },
    /// The recipient's mailbox would pass its byte cap with this message.
    #[error("{user}'s mailbox is full ({max_bytes} bytes)")]
    MailboxBytesFull {
        /// The recipient.
        user: Username,
        /// The byte cap.
        max_bytes: u64,
    },
    /// The recipient blocks the sender.
    #[error("{recipient} does not accept messages from {sender}")]
    Blocked {
        /// The recipient.
        recipient: Username,
        /// The sender.
        sender: Username,
    },
    /// Redis failed or is unreachable (the next operation reconnects).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Too few replicas confirmed a write in time (a failover may be under way, or a
    /// replica is down): it may be on the master alone, so it is not reported done; trying
    /// again is safe, as every such write is idempotent.
    #[error("redis: {reached} of {wanted} replicas confirmed the write in time")]
    NotReplicated {
        /// How many replicas were asked for.
        wanted: u32,
        /// How many confirmed.
        reached: u32,
    },
    /// The Redis URLs cannot work (none, an empty one, several for a server that is not a
    /// cluster node).
    #[error("redis configuration: {0}")]
    Config(#[from] redis_store::RedisConfigError),
    /// The embedded database failed.
    #[error("embedded store: {0}")]
    Embedded(String),
    /// The embedded database's disk is full: nothing was written.
    #[error("embedded store: the disk is full: {0}")]
    StorageFull(String),
    /// A stored value does not decode.
    #[error("corrupt stored value at {key}: {reason}")]
    Corrupt {
        /// Where.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The store of the discovery tier: one of the two backends.
#[derive(Clone, Debug)]
pub enum Store {
    /// Shared state in Redis.
    Redis(RedisStore),
    /// Durable local state in one process.
    Embedded(EmbeddedStore),
}

/// Calls the same method on whichever backend this is.
macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Redis($store) => $call,
            Store::Embedded($store) => $call,
        }
    };
}

impl From<RedisStore> for Store {
    fn from(store: RedisStore) -> Self {
        Store::Redis(store)
    }
}

impl From<EmbeddedStore> for Store {
    fn from(store: EmbeddedStore) -> Self {
        Store::Embedded(store)
    }
}

impl Store {
    /// The mailbox limits this store applies.
    pub fn limits(&self) -> MailLimits {
        dispatch!(self, store => store.limits())
    }

    /// Binds `binding.user` to `binding.keys` if the name is free (atomically).
    pub async fn bind(&self, binding: &Binding) -> Result<BindOutcome, StoreError> {
        dispatch!(self, store => store.bind(binding).await)
    }

    /// Moves `current.user`'s name to `rotation.new` if it is still bound exactly as
    /// `current` (compare and set), and appends `rotation` to the statements kept for the
    /// name (the latest [`MAX_ROTATIONS`]), both in one transaction or script. The caller
    /// has verified the statement against `current`.
    pub async fn rotate(
        &self,
        current: &Binding,
        rotation: &proto::identity::Rotation,
        now_ms: u64,
    ) -> Result<RotateOutcome, StoreError> {
        dispatch!(self, store => store.rotate(current, rotation, now_ms).await)
    }

    /// The rotation statements kept for `user`, oldest first.
    pub async fn rotations(
        &self,
        user: &Username,
    ) -> Result<Vec<proto::identity::Rotation>, StoreError> {
        dispatch!(self, store => store.rotations(user).await)
    }

    /// Unbinds `user`'s name and forgets its rotation statements, in one step (the operator
    /// releases a name whose key was lost); returns the binding it had. The next
    /// registration binds the name anew.
    pub async fn release(&self, user: &Username) -> Result<Option<Binding>, StoreError> {
        dispatch!(self, store => store.release(user).await)
    }

    /// The binding of `user`, if any.
    pub async fn binding(&self, user: &Username) -> Result<Option<Binding>, StoreError> {
        dispatch!(self, store => store.binding(user).await)
    }

    /// Records (or refreshes) a presence, replacing any earlier one of the user.
    pub async fn set_presence(&self, presence: &Presence) -> Result<(), StoreError> {
        dispatch!(self, store => store.set_presence(presence).await)
    }

    /// Records the first presence of a session (a registration): as
    /// [`Store::set_presence`], and it returns only once the user's entry in the online
    /// index was sent, so [`Store::lapsed`] finds the user from any instance and contacts
    /// hear the user went offline even if this instance dies at once. (A send that fails
    /// after the store's retries is logged, and the next heartbeat writes the entry again;
    /// a heartbeat's own index move may trail it by a moment, the registration's entry
    /// standing for the user meanwhile.)
    pub async fn register_presence(&self, presence: &Presence) -> Result<(), StoreError> {
        dispatch!(self, store => store.register_presence(presence).await)
    }

    /// Takes `user` offline at `now_ms` if their presence still belongs to `session`;
    /// returns whether it did. The last-seen time is kept.
    pub async fn clear_presence(
        &self,
        user: &Username,
        session: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        dispatch!(self, store => store.clear_presence(user, session, now_ms).await)
    }

    /// The last presence recorded for `user` (online or not: see [`Presence::is_online`]).
    pub async fn presence(&self, user: &Username) -> Result<Option<Presence>, StoreError> {
        dispatch!(self, store => store.presence(user).await)
    }

    /// Users online at `now_ms`, sorted by name.
    pub async fn online_users(&self, now_ms: u64) -> Result<Vec<Username>, StoreError> {
        dispatch!(self, store => store.online_users(now_ms).await)
    }

    /// Users whose presence expired in (`after_ms`, `until_ms`] while still recorded as
    /// online: no session cleared it on leaving (its instance died, or the clearing
    /// failed), so nobody told their contacts. Sorted by name. A user whose session ended
    /// normally is not among them, nor one who wrote their presence again meanwhile.
    pub async fn lapsed(&self, after_ms: u64, until_ms: u64) -> Result<Vec<Username>, StoreError> {
        dispatch!(self, store => store.lapsed(after_ms, until_ms).await)
    }

    /// Deposits `envelope` in `envelope.to`'s mailbox: refused if the recipient blocks the
    /// sender or the mailbox is full (by count or by bytes); idempotent by (sender, id):
    /// mail identity is the pair, so another sender's message with the same id is stored.
    pub async fn deposit(
        &self,
        envelope: &Envelope,
        now_ms: u64,
    ) -> Result<DepositOutcome, StoreError> {
        dispatch!(self, store => store.deposit(envelope, now_ms).await)
    }

    /// `user`'s oldest unexpired messages, without deleting them: at most `max` of them,
    /// whose envelopes, [`proto::wire`]-encoded, add up to at most `max_bytes` (a caller
    /// filling one frame passes the frame's room) — but always the oldest one, however
    /// large. The backends stop reading once the batch is full, so a small budget reads
    /// little even when `max` is large; [`Fetched::remaining`] counts everything left out.
    pub async fn fetch(
        &self,
        user: &Username,
        max: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<Fetched, StoreError> {
        dispatch!(self, store => store.fetch(user, max, max_bytes, now_ms).await)
    }

    /// Deletes the messages `mail` from `user`'s mailbox, giving their bytes back to the
    /// byte cap; returns how many were there.
    pub async fn ack(&self, user: &Username, mail: &[MailRef]) -> Result<u64, StoreError> {
        dispatch!(self, store => store.ack(user, mail).await)
    }

    /// How many messages wait for `user` (expired ones may still be counted until a fetch
    /// meets them, or a deposit finds the mailbox at its cap and drops them).
    pub async fn mail_count(&self, user: &Username) -> Result<u64, StoreError> {
        dispatch!(self, store => store.mail_count(user).await)
    }

    /// Stores `user`'s published keys (already verified against their binding): the Olm
    /// key and fallback key replace the stored ones (a new Olm key also drops the one-time
    /// keys of the old one), new one-time keys join the queue (keys already there are not
    /// added twice; beyond [`proto::ratchet::MAX_ONE_TIME_KEYS`] the oldest go). Returns
    /// how many one-time keys are stored now.
    pub async fn publish_prekeys(
        &self,
        user: &Username,
        prekeys: &proto::ratchet::PreKeys,
    ) -> Result<u32, StoreError> {
        dispatch!(self, store => store.publish_prekeys(user, prekeys).await)
    }

    /// Hands out `user`'s oldest one-time key, removing it in the same atomic step, or
    /// their fallback key when none is left; `None` when they published nothing.
    pub async fn claim_prekey(
        &self,
        user: &Username,
    ) -> Result<Option<proto::ratchet::PreKeyBundle>, StoreError> {
        dispatch!(self, store => store.claim_prekey(user).await)
    }

    /// `user` refuses mail from `blocked` from now on.
    pub async fn block(&self, user: &Username, blocked: &Username) -> Result<(), StoreError> {
        dispatch!(self, store => store.block(user, blocked).await)
    }

    /// `user` accepts mail from `blocked` again.
    pub async fn unblock(&self, user: &Username, blocked: &Username) -> Result<(), StoreError> {
        dispatch!(self, store => store.unblock(user, blocked).await)
    }

    /// Whom `user` blocks, sorted by name.
    pub async fn blocked_by(&self, user: &Username) -> Result<Vec<Username>, StoreError> {
        dispatch!(self, store => store.blocked_by(user).await)
    }

    /// Sends `event` to every subscriber of every instance sharing this store; on a Redis
    /// Cluster, a [`Broadcast::MailWaiting`], [`Broadcast::Presence`],
    /// [`Broadcast::SessionElsewhere`] or [`Broadcast::SessionEnded`] only to the instances whose presence writes for the
    /// recipients are still in force (those that hold the recipients' sessions).
    pub async fn publish(&self, event: &Broadcast) -> Result<(), StoreError> {
        dispatch!(self, store => store.publish(event).await)
    }

    /// A receiver of every [`Broadcast`] published from now on. With Redis, the underlying
    /// subscription survives reconnects (it re-subscribes); a lagging receiver loses the
    /// oldest events, which is acceptable because mail-waiting is only a hint.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Broadcast> {
        dispatch!(self, store => store.subscribe())
    }
}
