//! The Redis backend: [`RedisStore`], shared by every discovery instance pointing at the same
//! Redis, so several instances behave as one server; on one Redis server, or on a Redis
//! Cluster when the first node that answers reports `cluster_enabled:1`
//! ([`RedisStore::connect_with`] takes one URL or several, comma-separated).
//!
//! # Files
//!
//! This file holds the public types and what every clone shares ([`RedisStore`], `Inner`);
//! `connection` the connection layer (connecting, the command connection, retries, TCP and
//! cluster settings); `scripts` the Lua scripts; `keys` the key and channel names; `mail`,
//! `presence` and `names` the store's operations on mailboxes and block lists, on presence
//! and the online index, and on name bindings, rotations and prekeys; `events` pub/sub
//! (payloads, the subscriber, publishing); `online_index` the batching writer of the
//! online index.
//!
//! # Connections
//!
//! On one server, commands go through one [`ConnectionManager`] (a multiplexed connection
//! that reconnects by itself after the connection drops); on a cluster, through one
//! [`ClusterConnection`] (a multiplexed connection per node, every command routed to the
//! master of its key's slot, the slot map read again after `MOVED` or a failure). On top of
//! either, every operation retries a bounded
//! number of times when the error says a reconnect or a retry may help, so a Redis restart
//! between two operations is invisible to the caller. The manager reconnects only when the
//! socket reports an error, and a half-open connection (Redis gone without a FIN or RST:
//! a partition, a failover behind a virtual IP) reports none; its commands just time out.
//! So a timed-out reply makes the retry loop swap in a fresh connection (built lazily from
//! the kept client and config) before the next try: one timeout, not one per call forever.
//! TCP keep-alive and, on Linux, `TCP_USER_TIMEOUT` also let the kernel close such a
//! connection by itself while it is idle. Every operation is safe to repeat:
//! deposits are idempotent by (sender, id), acks and block-list changes are set operations,
//! a repeated bind finds its own binding, a repeated rotation finds the binding already
//! moved (which the handler takes as done), a repeated release finds nothing to release, and
//! a repeated publish only repeats a hint.
//!
//! Pub/sub needs a connection of its own (a subscribed connection cannot run commands). On
//! one server a subscriber task owns it, forwards every message into a
//! [`tokio::sync::broadcast`] channel (one Redis subscription however many local
//! subscribers), pings it so a half-open connection is noticed, and after any loss
//! reconnects with backoff and subscribes again. On a cluster it is a second cluster
//! connection speaking RESP3, whose push messages go into the same channel where they
//! arrive, and which subscribes again by itself after a reconnect or a slot-map change.
//! Messages published while a subscription is being re-made are lost, as pub/sub always
//! allows; that is why mail-waiting is only a hint (clients also fetch on every reconnect
//! and on a slow timer).
//!
//! # Replicas
//!
//! With [`RedisOptions::replicas`] above 0 (the default on a cluster: 1), a deposit and a
//! first binding are reported done only once that many replicas have them: the script runs
//! as `EVAL` followed by `WAIT` in one pipeline, on the connection to the keys' master, and
//! fewer confirmations within a second are [`StoreError::NotReplicated`] (the client sees
//! `unavailable` and sends again from its outbox). So a master SIGKILLed right after it
//! answered loses no mail reported queued; and a master without a live replica (just
//! promoted, its old master not back yet) refuses deposits until a replica is in sync.
//!
//! # Keys
//!
//! Everything is under `p2pchat:`, and every per-user key carries the user in a hash tag
//! (`p2pchat:{alice}:mail`), so all keys of one user land in one Redis Cluster slot and
//! the multi-key scripts below stay legal on a cluster. The layout is the same on one
//! server and on a cluster (the routes key is written on a cluster only), so data moved
//! from one to the other (e.g. with `redis-cli --cluster import`) needs no conversion:
//!
//! | Key | Type | Holds |
//! | --- | --- | --- |
//! | `p2pchat:{u}:binding` | string | wire-encoded [`Binding`] |
//! | `p2pchat:{u}:rotations` | list | wire-encoded rotation statements, oldest first (the latest [`crate::MAX_ROTATIONS`]) |
//! | `p2pchat:{u}:presence` | hash | `session` (decimal), `value` (wire-encoded [`Presence`]) |
//! | `p2pchat:{u}:routes` | hash | (cluster) instance id → expiry (ms) of `u`'s presence written by that instance |
//! | `p2pchat:{u}:mail` | sorted set | mail key, scored by deposit sequence |
//! | `p2pchat:{u}:mail:data` | hash | mail key → wire-encoded [`StoredMail`] |
//! | `p2pchat:{u}:mail:seq` | string | the last deposit sequence number |
//! | `p2pchat:{u}:mail:bytes` | string | bytes of the stored values in the mailbox (the byte cap's count) |
//! | `p2pchat:{u}:mail:quarantine` | hash | mail key → bytes that did not decode |
//! | `p2pchat:{u}:blocked` | set | names `u` refuses mail from |
//! | `p2pchat:online:{b}` | sorted set | online index bucket `b` (0–15): the online names whose bucket is `b`, scored by presence expiry (ms) |
//!
//! Channels: [`ANNOUNCE_CHANNEL`] (classic pub/sub, which a cluster carries to every node;
//! every instance subscribes), [`MAIL_CHANNEL`] (one server only: every instance
//! subscribes, the payload is the recipient's name), [`PRESENCE_CHANNEL`] (one server only:
//! contacts' presence and notices of a user's other sessions, a wire-encoded [`Broadcast`])
//! and, on a
//! cluster,
//! `p2pchat:instance:{id}:push`, one sharded channel per instance (`SSUBSCRIBE`d by that
//! instance alone, on the master of its slot). A mail-waiting hint on a cluster is an
//! `SPUBLISH` of the recipient's name to each instance named in the recipient's routes, so
//! no instance subscribes to every user's hints (a presence change goes the same way, one
//! `SPUBLISH` per instance holding any of its recipients, naming only those; its payload
//! starts with a variant tag byte, never a name's character); a presence write adds its instance to the
//! routes (dropping routes lapsed an hour ago, left by instances that died), and clearing
//! the presence removes it. An operation over two slots is separate steps in a stated
//! order, each idempotent: a presence write does the user's slot (presence and route) and
//! then queues the user's online index move; clearing it, the presence, then the route,
//! then queues the leave (the `online_index` writer sends both kinds to the bucket's slot
//! within 50 ms, in order); a deposit stores the mail and then publishes the hint.
//!
//! A **mail key** is the message id (16 raw bytes) followed by the sender's name: mail
//! identity is (sender, id), so another sender reusing an id is another message, while the
//! same sender's retransmission finds its key and is a duplicate. Mailboxes written before
//! this layout hold keys of the id alone (16 bytes). They stay readable and are migrated on
//! first touch: a fetch that meets such an entry returns it and, in the same cleanup
//! script as its removals, moves it to its new key at the same sequence (when the new key
//! exists already, a retransmission stored after the upgrade, the old copy is dropped).
//! Acks name the new key only; an entry fetched before the upgrade and acked after it is
//! offered once more, migrated, and de-duplicated by the client. Such old entries were
//! never counted in `mail:bytes` (its removals clamp at zero, and an empty mailbox resets
//! it), so a mailbox from before the upgrade may hold more than the byte cap until it is
//! drained once.
//!
//! # Why a sorted set plus a hash for mail (and not a list or a stream)
//!
//! At-least-once delivery needs: read without removing, delete an arbitrary acked subset by
//! id, refuse a second deposit of the same id, and a cap check, all cheaply.
//! - A list (`LPUSH`/`RPOP`, what the original did) removes on read; `LRANGE` + `LREM`
//!   would make every ack a linear scan.
//! - A stream gives order and `XDEL` by entry id, but entry ids are Redis-generated, so
//!   idempotency by (sender, message id) and acks by it need a second index anyway, and
//!   consumer groups' pending lists solve a different problem (many consumers, one log)
//!   while a mailbox has one reader.
//! - A sorted set keyed by mail key (id and sender) and scored by a per-user sequence gives deposit
//!   order (times can tie; the sequence cannot), `ZRANGE` batches from the head,
//!   `ZREM` of any acked subset in one command, and `ZCARD` for the cap; a hash beside it
//!   holds the bytes, fetched with one `HMGET` per batch.
//!
//! A deposit is one Lua script (block list, duplicate key, count cap, byte cap, sequence,
//! insert, byte count: atomic), a fetch is one script (range + values + count: one round
//! trip, reading values only up to the batch's byte budget), an ack is one script
//! ([`REMOVE`]: `ZREM`, `HDEL` and the byte count of the whole batch, atomic, so an ack and
//! a fetch's cleanup racing for one entry give its bytes back once). Expired mail is deleted when a fetch meets it; a value that does not decode is
//! logged, moved to the quarantine hash and skipped.
//!
//! Expired mail must not keep a mailbox full either (its recipient may be away for longer
//! than the TTL). The deposit script cannot tell what expired: deposit times live inside
//! the encoded values, and the sorted set's scores are sequences (times can tie). So when
//! the script answers "full", [`RedisStore::expire_head`] runs the fetch's read-classify-
//! remove path on the head of the mailbox, oldest first, up to the first live message,
//! and the script runs once more. That is sound without being one atomic step: expired
//! mail never becomes live again, removal is idempotent, and the second run checks the
//! cap atomically, so a racing deposit can only make it answer "full" again. A mailbox
//! full of live mail costs one more one-entry read per refused deposit.
//! Mailbox keys also get a Redis expiry of TTL + a day, refreshed on every deposit, purely
//! as garbage collection: the passed-in `now_ms` decides what has expired.
//!
//! Presence keeps its expiry inside the value (so `now_ms` decides who is online), plus a
//! Redis expiry a month after that as garbage collection (the last-seen time outlives the
//! presence). The online index (who is online, for `list`) is not per user, so `list` reads
//! a few keys rather than every user's; it is split into [`ONLINE_BUCKETS`] sorted sets,
//! a user's bucket fixed by a hash of the name ([`online_key`]), because every heartbeat
//! moves its user's entry: one key would put every index write on one cluster node. The
//! moves are gathered by the `online_index` writer and sent as one `ZADD` per bucket
//! every 50 ms, so a heartbeat itself is one request.
//! The buckets' hash tags spread them over the slots, so over the masters. Each bucket is
//! only ever touched by single-key commands, so it is cluster-safe; `list` reads every
//! bucket and merges. An index written as one `p2pchat:online` key (the layout before the
//! buckets) is not read: every user still online is in a bucket again by their next
//! heartbeat, so after an upgrade `list` is short for one heartbeat interval (longer while
//! instances of both layouts run side by side), and the old key may be deleted.
//!
//! **Architecture Invariant:** records are (de)serialised only through [`proto::wire`];
//! announcements and mail-waiting names travel as plain UTF-8, so `redis-cli PUBLISH
//! p2pchat:announce "text"` announces.
//!
//! [`ConnectionManager`]: redis::aio::ConnectionManager
//! [`StoreError::NotReplicated`]: crate::StoreError::NotReplicated
//! [`Binding`]: crate::Binding
//! [`Presence`]: crate::Presence
//! [`StoredMail`]: crate::StoredMail
//! [`ANNOUNCE_CHANNEL`]: crate::ANNOUNCE_CHANNEL
//! [`REMOVE`]: scripts::REMOVE

mod connection;
mod events;
mod keys;
mod mail;
mod names;
mod online_index;
mod presence;
mod scripts;

use std::sync::{Arc, RwLock};

use redis::cluster_async::ClusterConnection;
use tokio::{
    sync::{broadcast, watch},
    task::JoinHandle,
};

use self::{
    connection::{Backend, Commands},
    online_index::IndexWriter,
};
use crate::{Broadcast, MailLimits};

pub use self::keys::online_key;

/// The pub/sub channel carrying "mail waiting" hints; the payload is the recipient's name.
pub const MAIL_CHANNEL: &str = "p2pchat:mail";
/// The pub/sub channel carrying presence changes and notices of a user's other sessions
/// (one registered, one ended) between the
/// instances on one server (a cluster routes them like mail-waiting hints); the payload is
/// a wire-encoded [`Broadcast`].
pub const PRESENCE_CHANNEL: &str = "p2pchat:presence";
/// How many sorted sets the online index is split into (see the module docs).
pub const ONLINE_BUCKETS: u32 = 16;
/// What every online index bucket's key starts with (`p2pchat:online:{3}`).
pub const ONLINE_KEY_PREFIX: &str = "p2pchat:online:";

/// The Redis store: a cheap-to-clone handle; clones share the connections and the
/// subscriber, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("limits", &self.inner.limits)
            .field("cluster", &self.is_cluster())
            .field("replicas", &self.inner.replicas)
            .finish_non_exhaustive()
    }
}

/// How a [`RedisStore`] is run, beyond the URL and the mailbox limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RedisOptions {
    /// How many replicas a deposit (and a first binding) must have reached before it is
    /// reported done (`WAIT`); when fewer confirm within a second the operation fails with
    /// [`StoreError::NotReplicated`](crate::StoreError::NotReplicated) and the client tries
    /// again. `None` picks 1 on a cluster (whose masters are expected to have replicas) and 0
    /// on a single server.
    pub replicas: Option<u32>,
}

/// Why a Redis URL list cannot work; the URLs it shows have their passwords redacted.
#[derive(Debug, thiserror::Error)]
pub enum RedisConfigError {
    /// The list is empty.
    #[error("no Redis URL given")]
    NoUrl,
    /// One entry of a comma-separated list is empty.
    #[error("an empty URL in the comma-separated list {list}")]
    EmptyUrl {
        /// The list, redacted.
        list: String,
    },
    /// Several URLs were given for a server that does not run in cluster mode.
    #[error(
        "{count} Redis URLs were given, but {url} is not a cluster node (cluster_enabled:0): give one URL for a single server, or the nodes of a cluster"
    )]
    NotACluster {
        /// How many URLs.
        count: usize,
        /// The node that answered, redacted.
        url: String,
    },
}

/// What every clone shares.
struct Inner {
    /// How fresh command connections are built, and which kind of Redis this is.
    backend: Backend,
    /// The current command connection; a std lock, held only to clone or swap it.
    commands: RwLock<Commands>,
    limits: MailLimits,
    /// How many replicas a replicated write waits for (0: none).
    replicas: u32,
    events: broadcast::Sender<Broadcast>,
    subscriptions: watch::Receiver<u64>,
    /// The task that owns the single server's pub/sub connection (none on a cluster,
    /// where the pub/sub connection below delivers into `events` itself).
    subscriber: Option<JoinHandle<()>>,
    /// The cluster's pub/sub connection, kept open for as long as the store lives.
    _cluster_pubsub: Option<ClusterConnection>,
    /// Sends heartbeats' and leaves' online index changes together.
    index: IndexWriter,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(subscriber) = &self.subscriber {
            subscriber.abort();
        }
    }
}

/// `url` with its credentials replaced by `***`, fit for logs and error messages:
/// `redis://:secret@redis:6379/0` → `redis://***@redis:6379/0` (everything before the last
/// `@` goes, so a password holding `@` or `/` goes whole), and the values of the `pass`
/// and `user` parameters of a `redis+unix://` URL likewise. It works on text that does not
/// parse as a URL too, so a malformed URL is shown without its password as well.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let rest = match rest.rfind('@') {
        Some(at) => format!("***{}", &rest[at..]),
        None => rest.to_owned(),
    };
    let rest = match rest.split_once('?') {
        Some((before, query)) => {
            let parameters: Vec<String> = query
                .split('&')
                .map(|parameter| match parameter.split_once('=') {
                    Some((name @ ("pass" | "user"), _)) => format!("{name}=***"),
                    _ => parameter.to_owned(),
                })
                .collect();
            format!("{before}?{}", parameters.join("&"))
        }
        None => rest,
    };
    format!("{scheme}{rest}")
}

/// [`redact_url`] of each URL in a comma-separated list, for the error of a failed
/// connection to a cluster's nodes.
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|url| redact_url(url.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redact_url_hides_credentials_and_keeps_the_address() {
        for (url, shown) in [
            ("redis://redis:6379", "redis://redis:6379"),
            ("redis://:secret@redis:6379", "redis://***@redis:6379"),
            (
                "redis://app:secret@redis:6379/2",
                "redis://***@redis:6379/2",
            ),
            // The last `@` ends the credentials, whatever the password holds.
            (
                "redis://:p@ss/w?rd@redis:6379/0",
                "redis://***@redis:6379/0",
            ),
            ("redis:6379:secret@", "***@"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=secret&user=app",
                "redis+unix:///run/redis.sock?db=1&pass=***&user=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
