//! The Redis backend: [`RedisStore`], shared by every discovery instance pointing at the same
//! Redis, so several instances behave as one server; on one Redis server, or on a Redis
//! Cluster when the first node that answers reports `cluster_enabled:1`
//! ([`RedisStore::connect_with`] takes one URL or several, comma-separated).
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

mod online_index;

use std::{
    future::Future,
    sync::{Arc, LazyLock, PoisonError, RwLock},
    time::Duration,
};

use futures::StreamExt;
use proto::{Envelope, MailRef, MessageId, Username, identity::Rotation, wire};
use redis::{
    Client, Cmd, ProtocolVersion, PushInfo, PushKind, RedisFuture, RedisResult, RetryMethod,
    Script, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub},
    cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    io::tcp::{TcpSettings, socket2},
};
use tokio::{
    sync::{broadcast, watch},
    task::JoinHandle,
};

use self::online_index::IndexWriter;
use crate::{
    ANNOUNCE_CHANNEL, BindOutcome, Binding, Broadcast, DepositOutcome, Fetched, MailLimits,
    Presence, RotateOutcome, StoreError, StoredMail,
    record::{
        Batch, PreKeyOwner, STORED_MAIL_OVERHEAD, decode_binding, decode_prekey, encode,
        is_expired, prekey_bundle,
    },
};

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

/// The key of online index bucket `bucket`; its hash tag is the bucket's number, so the
/// buckets land in different slots.
fn online_bucket_key(bucket: u32) -> String {
    format!("{ONLINE_KEY_PREFIX}{{{bucket}}}")
}

/// The online index bucket `user` is in: FNV-1a of the name, modulo [`ONLINE_BUCKETS`]
/// (spelled out, not `std`'s hasher, because every instance of every version must agree).
pub fn online_key(user: &Username) -> String {
    let hash = user
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    // The remainder is below ONLINE_BUCKETS, a u32.
    online_bucket_key((hash % u64::from(ONLINE_BUCKETS)) as u32)
}

/// How many times an operation is tried when Redis is unreachable or restarting.
const RETRY_ATTEMPTS: u32 = 8;
/// The pause before the second try; it doubles up to [`RETRY_MAX_DELAY`].
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(10);
/// The longest pause between two tries.
const RETRY_MAX_DELAY: Duration = Duration::from_millis(500);
/// How long one command may wait for its reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// TCP keep-alive: the first probe after this much silence, then one per interval, and
/// the connection is dropped after this many unanswered probes.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
#[cfg(target_os = "linux")]
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel drops the connection.
#[cfg(target_os = "linux")]
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the subscriber pings its connection, and how long it waits for the answer.
const PUBSUB_PING_INTERVAL: Duration = Duration::from_secs(5);
const PUBSUB_PING_TIMEOUT: Duration = Duration::from_secs(3);
/// The most entries [`RedisStore::expire_head`] reads in one round trip...
const EXPIRE_CHUNK_MAX: usize = 512;
/// ...and about the most bytes of them.
const EXPIRE_READ_BUDGET: usize = 256 * 1024;
/// How many broadcast events a slow local subscriber may fall behind.
const BROADCAST_CAPACITY: usize = 1024;
/// Mailbox keys expire (garbage collection only) this long after their TTL.
const MAIL_GC_MARGIN_MS: u64 = 24 * 60 * 60 * 1000;
/// A presence record is kept this long after it lapses, for "last seen".
const PRESENCE_KEEP_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// Entries of the online index that lapsed this long ago are pruned.
const ONLINE_PRUNE_AFTER_MS: u64 = 60 * 60 * 1000;

/// Deposit: KEYS = mail order, mail data, sequence, block list, byte count; ARGV = mail key,
/// sender, value, cap, GC expiry ms, byte cap. Returns 1 stored, 0 duplicate, -1 blocked,
/// -2 full (messages), -3 full (bytes).
static DEPOSIT: LazyLock<Script> = LazyLock::new(|| Script::new(DEPOSIT_SOURCE));

/// The source of [`DEPOSIT`], also sent as a plain `EVAL` when the deposit must reach a
/// replica (see [`RedisStore::invoke_replicated`]).
const DEPOSIT_SOURCE: &str = r"
        if redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 1 then return -1 end
        if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
        if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return -2 end
        local bytes = tonumber(redis.call('GET', KEYS[5]) or '0')
        if bytes + #ARGV[3] > tonumber(ARGV[6]) then return -3 end
        local sequence = redis.call('INCR', KEYS[3])
        redis.call('ZADD', KEYS[1], sequence, ARGV[1])
        redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
        redis.call('INCRBY', KEYS[5], #ARGV[3])
        redis.call('PEXPIRE', KEYS[1], ARGV[5])
        redis.call('PEXPIRE', KEYS[2], ARGV[5])
        redis.call('PEXPIRE', KEYS[3], ARGV[5])
        redis.call('PEXPIRE', KEYS[5], ARGV[5])
        return 1
        ";

/// What [`DEPOSIT`] answers when the mailbox is at its message cap.
const DEPOSIT_FULL: i64 = -2;
/// What [`DEPOSIT`] answers when the message would pass the mailbox's byte cap.
const DEPOSIT_FULL_BYTES: i64 = -3;

/// Removal: KEYS = mail order, mail data, byte count, quarantine; ARGV = GC expiry ms, then
/// triples (action, mail key, new key): `d` deletes the entry, `q` moves its value to
/// quarantine, `m` moves an old-layout entry to its new key at the same sequence (or drops
/// it when the new key exists). Deleted and quarantined values give their bytes back (the
/// count never goes below zero, and is reset when the mailbox empties). Returns how many
/// entries had a value to delete.
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local removed = 0
        local freed = 0
        for index = 2, #ARGV, 3 do
            local action, key, target = ARGV[index], ARGV[index + 1], ARGV[index + 2]
            local value = redis.call('HGET', KEYS[2], key)
            if action == 'm' then
                local score = redis.call('ZSCORE', KEYS[1], key)
                if value and score then
                    redis.call('ZREM', KEYS[1], key)
                    redis.call('HDEL', KEYS[2], key)
                    if redis.call('HEXISTS', KEYS[2], target) == 0 then
                        redis.call('ZADD', KEYS[1], score, target)
                        redis.call('HSET', KEYS[2], target, value)
                    end
                end
            else
                redis.call('ZREM', KEYS[1], key)
                if value then
                    redis.call('HDEL', KEYS[2], key)
                    removed = removed + 1
                    freed = freed + #value
                    if action == 'q' then
                        redis.call('HSET', KEYS[4], key, value)
                        redis.call('PEXPIRE', KEYS[4], ARGV[1])
                    end
                end
            end
        end
        if redis.call('ZCARD', KEYS[1]) == 0 then
            redis.call('DEL', KEYS[3])
        elseif freed > 0 and redis.call('DECRBY', KEYS[3], freed) < 0 then
            redis.call('DEL', KEYS[3])
        end
        return removed
        ",
    )
});

/// Fetch: KEYS = mail order, mail data; ARGV = first and last rank, byte budget, stored
/// overhead. Returns the mailbox size, the ids from the first rank on, and their values
/// (nil where missing): all of the range, or fewer once the values' sizes, each less the
/// overhead, pass the budget (the value passing it included, so at least one comes back).
/// Less the overhead, a value never counts more than its envelope does in [`Batch`], so
/// the script reads at least what the batch takes, and [`Batch`] trims the rest exactly.
/// `HMGET` goes in chunks growing from 8 to 512 (Lua's `unpack` has a stack limit), so a
/// batch of a few large values reads few, and one of many small values takes few calls.
static FETCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local total = redis.call('ZCARD', KEYS[1])
        local ids = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2])
        local budget = tonumber(ARGV[3])
        local overhead = tonumber(ARGV[4])
        local values = {}
        local used = 0
        local chunk = 8
        while #values < #ids and used <= budget do
            local first = #values + 1
            local last = math.min(first + chunk - 1, #ids)
            local got = redis.call('HMGET', KEYS[2], unpack(ids, first, last))
            for index = 1, #got do
                local value = got[index]
                values[#values + 1] = value
                if value then used = used + math.max(#value - overhead, 0) end
                if used > budget then break end
            end
            chunk = math.min(chunk * 2, 512)
        end
        for index = #ids, #values + 1, -1 do ids[index] = nil end
        return {total, ids, values}
        ",
    )
});

/// Bind: KEYS = binding; ARGV = value. Returns the existing value, or nil after binding.
static BIND: LazyLock<Script> = LazyLock::new(|| Script::new(BIND_SOURCE));

/// The source of [`BIND`].
const BIND_SOURCE: &str = r"
        local existing = redis.call('GET', KEYS[1])
        if existing then return existing end
        redis.call('SET', KEYS[1], ARGV[1])
        return false
        ";

/// Publish prekeys: KEYS = the user's prekey owner hash, their one-time key list; ARGV =
/// owner record, Olm key, the most one-time keys kept, `1` when the publish carries no
/// fallback key (the stored record, with its fallback key, is then kept for the same Olm
/// key), then each new one-time key. A new Olm key drops the old key's one-time keys; a key
/// already listed is not added again; beyond the most kept, the oldest go. Returns how many
/// are listed.
static PUBLISH_PREKEYS: LazyLock<Script> = LazyLock::new(|| Script::new(PUBLISH_PREKEYS_SOURCE));

/// The source of [`PUBLISH_PREKEYS`].
const PUBLISH_PREKEYS_SOURCE: &str = r"
        local old = redis.call('HGET', KEYS[1], 'olm')
        if old and old ~= ARGV[2] then redis.call('DEL', KEYS[2]) end
        if not (ARGV[4] == '1' and old == ARGV[2]) then
            redis.call('HSET', KEYS[1], 'record', ARGV[1], 'olm', ARGV[2])
        end
        for index = 5, #ARGV do
            if not redis.call('LPOS', KEYS[2], ARGV[index]) then
                redis.call('RPUSH', KEYS[2], ARGV[index])
            end
        end
        local count = redis.call('LLEN', KEYS[2])
        local most = tonumber(ARGV[3])
        if count > most then
            redis.call('LTRIM', KEYS[2], count - most, -1)
            count = most
        end
        return count
        ";

/// Claim a prekey: KEYS = the user's prekey owner hash, their one-time key list. Returns
/// nil when the user published nothing, else the owner record and, when one was left, the
/// oldest one-time key, popped in the same step.
static CLAIM_PREKEY: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_PREKEY_SOURCE));

/// The source of [`CLAIM_PREKEY`].
const CLAIM_PREKEY_SOURCE: &str = r"
        local record = redis.call('HGET', KEYS[1], 'record')
        if not record then return false end
        local key = redis.call('LPOP', KEYS[2])
        if key then return {record, key} end
        return {record}
        ";

/// Rotate: KEYS = binding, rotations, prekey owner, one-time keys (the published keys go:
/// the old identity signed them); ARGV = expected binding, new binding, statement, how
/// many statements to keep. Compare and set: returns `{0, ''}` after rotating, or
/// `{1, standing binding or ''}` when the binding is not the expected one.
static ROTATE: LazyLock<Script> = LazyLock::new(|| Script::new(ROTATE_SOURCE));

/// The source of [`ROTATE`].
const ROTATE_SOURCE: &str = r"
        local standing = redis.call('GET', KEYS[1])
        if standing ~= ARGV[1] then return {1, standing or ''} end
        redis.call('SET', KEYS[1], ARGV[2])
        redis.call('RPUSH', KEYS[2], ARGV[3])
        redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
        redis.call('DEL', KEYS[3], KEYS[4])
        return {0, ''}
        ";

/// Release: KEYS = binding, rotations, prekey owner, one-time keys. Deletes them all;
/// returns the binding there was.
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_SOURCE));

/// The source of [`RELEASE`].
const RELEASE_SOURCE: &str = r"
        local standing = redis.call('GET', KEYS[1])
        redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
        return standing
        ";

/// Presence on a cluster: KEYS = presence, routes; ARGV = session, value, keep ms,
/// instance, presence expiry ms, prune-before ms. Writes the presence as the single-server
/// pipeline does, names this instance as a route to the user (valued by the presence's
/// expiry), and drops routes that lapsed before the prune time (an instance that died
/// without clearing its route).
static SET_PRESENCE_ROUTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        redis.call('HSET', KEYS[1], 'session', ARGV[1], 'value', ARGV[2])
        redis.call('PEXPIRE', KEYS[1], ARGV[3])
        redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
        if redis.call('HLEN', KEYS[2]) > 1 then
            local routes = redis.call('HGETALL', KEYS[2])
            local prune_before = tonumber(ARGV[6])
            for index = 1, #routes, 2 do
                if tonumber(routes[index + 1]) < prune_before then
                    redis.call('HDEL', KEYS[2], routes[index])
                end
            end
        end
        redis.call('PEXPIRE', KEYS[2], ARGV[3])
        return 1
        ",
    )
});

/// Clear presence: KEYS = presence; ARGV = session, cleared value. Returns 1 if the
/// session still owned the presence (and it is now cleared), else 0.
static CLEAR_PRESENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('HGET', KEYS[1], 'session') ~= ARGV[1] then return 0 end
        redis.call('HSET', KEYS[1], 'value', ARGV[2])
        return 1
        ",
    )
});

/// Leave the online index: KEYS = the user's online index bucket; ARGV = user, the expiry
/// the cleared presence had.
/// Removes the entry only if its expiry is not later (the index writer may not have sent
/// the leaving session's last move yet), so a newer session's entry (written meanwhile,
/// with a later expiry) stays.
static LEAVE_ONLINE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
        if score and tonumber(score) <= tonumber(ARGV[2]) then
            return redis.call('ZREM', KEYS[1], ARGV[1])
        end
        return 0
        ",
    )
});

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
    /// [`StoreError::NotReplicated`] and the client tries again. `None` picks 1 on a
    /// cluster (whose masters are expected to have replicas) and 0 on a single server.
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

/// How long a write waits for its replicas to confirm it.
const REPLICA_WAIT: Duration = Duration::from_secs(1);

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

/// The two kinds of Redis deployment, with what it takes to build a command connection.
enum Backend {
    /// One server (possibly with replicas behind it).
    Single {
        client: Client,
        manager_config: ConnectionManagerConfig,
    },
    /// A Redis Cluster: every key is routed to the master of its slot.
    Cluster {
        client: ClusterClient,
        /// This instance's sharded channel, which its users' routes name.
        instance: Instance,
    },
}

/// One discovery instance on a cluster: its random id (written into the route records of
/// the users it holds sessions of) and the sharded channel it listens on.
#[derive(Debug, Clone)]
struct Instance {
    id: String,
}

impl Instance {
    fn random() -> Self {
        let bytes = MessageId::random().0;
        let id = bytes
            .iter()
            .fold(String::with_capacity(32), |mut id, byte| {
                use std::fmt::Write;
                let _ = write!(id, "{byte:02x}");
                id
            });
        Self { id }
    }

    fn channel(&self) -> String {
        instance_channel(&self.id)
    }
}

/// The sharded pub/sub channel of the instance `id`: `p2pchat:instance:{id}:push` (the
/// hash tag puts it on one slot, so it lives on one master and its replicas).
fn instance_channel(id: &str) -> String {
    format!("p2pchat:instance:{{{id}}}:push")
}

/// A command connection to either kind of deployment; both multiplex many callers over
/// their sockets and are cheap to clone.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, command: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(command),
            Connection::Cluster(connection) => connection.req_packed_command(command),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The command connection and which one it is, so that of many operations timing out on
/// the same dead connection only the first replaces it.
#[derive(Clone)]
struct Commands {
    connection: Connection,
    generation: u64,
}

impl Inner {
    /// The current command connection (a cheap clone of a shared handle).
    fn commands(&self) -> Commands {
        self.commands
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces command connection `generation` (if it is still the current one) with a
    /// fresh one that connects on first use. Used after a reply timed out: the
    /// [`ConnectionManager`] reconnects by itself only when the socket reports an error,
    /// and a half-open connection (Redis gone without a FIN or RST, as after a partition or
    /// a failover behind a virtual IP) reports nothing, so every command on it would time
    /// out forever. On a cluster the fresh connection also reads the slot map anew.
    fn replace_commands(&self, generation: u64) {
        let mut commands = self
            .commands
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if commands.generation != generation {
            return;
        }
        let connection = match &self.backend {
            Backend::Single {
                client,
                manager_config,
            } => ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                .map(Connection::Single),
            Backend::Cluster { client, .. } => Ok(Connection::Cluster(
                client.get_pending_async_connection_with_config(cluster_config()),
            )),
        };
        match connection {
            Ok(connection) => {
                tracing::warn!("redis stopped answering; replaced the command connection");
                *commands = Commands {
                    connection,
                    generation: generation + 1,
                };
            }
            Err(error) => {
                tracing::warn!(%error, "cannot build a new redis command connection");
            }
        }
    }
}

/// The keys of one user's mailbox and block list.
struct MailKeys {
    order: String,
    data: String,
    sequence: String,
    bytes: String,
    quarantine: String,
    blocked: String,
}

impl MailKeys {
    fn new(user: &Username) -> Self {
        Self {
            order: user_key(user, "mail"),
            data: user_key(user, "mail:data"),
            sequence: user_key(user, "mail:seq"),
            bytes: user_key(user, "mail:bytes"),
            quarantine: user_key(user, "mail:quarantine"),
            blocked: user_key(user, "blocked"),
        }
    }
}

/// The mail key of a message (see the module docs): its id, then its sender's name.
fn mail_key(from: &Username, id: &MessageId) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + from.as_str().len());
    key.extend_from_slice(&id.0);
    key.extend_from_slice(from.as_str().as_bytes());
    key
}

/// The keys of `user`'s prekey owner hash and one-time key list (one slot).
fn prekey_keys(user: &Username) -> (String, String) {
    (
        user_key(user, "prekeys"),
        user_key(user, "prekeys:one_time"),
    )
}

/// Every key that goes with `user`'s name binding (one slot): the binding, its rotation
/// statements, and the prekeys its identity signed (owner hash, one-time key list).
fn name_keys(user: &Username) -> [String; 4] {
    let (owner, one_time) = prekey_keys(user);
    [
        user_key(user, "binding"),
        user_key(user, "rotations"),
        owner,
        one_time,
    ]
}

/// `p2pchat:{user}:part`: the hash tag keeps all of one user's keys in one cluster slot.
fn user_key(user: &Username, part: &str) -> String {
    format!("p2pchat:{{{user}}}:{part}")
}

/// One mailbox entry a fetch found it must remove (or, from an older layout, move).
struct Removal {
    /// Its mail key.
    key: Vec<u8>,
    action: RemovalAction,
}

/// What [`REMOVE`] does with one entry.
enum RemovalAction {
    /// Delete it (acked, expired, or a key without a value).
    Delete,
    /// Move its value, which does not decode, to quarantine.
    Quarantine,
    /// Move it from its old-layout key to this mail key.
    Migrate(Vec<u8>),
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

impl RedisStore {
    /// Connects with the default [`RedisOptions`]; see [`RedisStore::connect_with`].
    pub async fn connect(url: &str, limits: MailLimits) -> Result<Self, StoreError> {
        Self::connect_with(url, limits, RedisOptions::default()).await
    }

    /// Connects to the Redis at `urls`: one URL (`redis://host:port/db`, or
    /// `redis://[user]:password@host:port/db` for a Redis that demands a password; the
    /// password is percent-decoded), or several separated by commas, the nodes of one Redis
    /// Cluster. The first node that answers says whether it runs in cluster mode
    /// (`INFO cluster`); if it does, the store runs in cluster mode (every key routed to
    /// its slot's master, sharded pub/sub for mail-waiting hints), else as on one server,
    /// and several URLs for a server that is not a cluster node are refused. Subscribes to
    /// the broadcast channels before it returns. Fails if no node is reachable now, or one
    /// refuses the credentials (`NOAUTH` without a password, `WRONGPASS` with a wrong
    /// one); after that, lost connections are re-established by themselves, with the same
    /// credentials.
    pub async fn connect_with(
        urls: &str,
        limits: MailLimits,
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        let urls = split_urls(urls)?;
        let mut clients = Vec::with_capacity(urls.len());
        for url in &urls {
            let client = Client::open(*url)?;
            clients.push(Client::open(
                client
                    .get_connection_info()
                    .clone()
                    .set_tcp_settings(tcp_settings()),
            )?);
        }
        let (cluster, first) = probe_cluster_mode(&clients).await?;
        if !cluster && clients.len() > 1 {
            return Err(RedisConfigError::NotACluster {
                count: clients.len(),
                url: redact_url(urls[first]),
            }
            .into());
        }
        if cluster {
            Self::connect_cluster(&urls, limits, options).await
        } else {
            let Some(client) = clients.into_iter().next() else {
                return Err(RedisConfigError::NoUrl.into());
            };
            Self::connect_single(client, limits, options).await
        }
    }

    /// [`RedisStore::connect_with`] on one server.
    async fn connect_single(
        client: Client,
        limits: MailLimits,
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let connection =
            ConnectionManager::new_with_config(client.clone(), manager_config.clone()).await?;
        // Subscribe once here, so a subscriber created right after `connect` returns sees
        // everything published from then on, and a bad URL fails now rather than in a task.
        let pubsub = subscribe_channels(&client).await?;
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (subscriptions_sender, subscriptions) = watch::channel(1);
        let subscriber = tokio::spawn(run_subscriber(
            client.clone(),
            pubsub,
            events.clone(),
            subscriptions_sender,
        ));
        let replicas = options.replicas.unwrap_or(0);
        tracing::info!(replicas, "redis backend: a single server");
        Ok(Self {
            inner: Arc::new_cyclic(|store| Inner {
                index: IndexWriter::spawn(store.clone()),
                backend: Backend::Single {
                    client,
                    manager_config,
                },
                commands: RwLock::new(Commands {
                    connection: Connection::Single(connection),
                    generation: 0,
                }),
                limits,
                replicas,
                events,
                subscriptions,
                subscriber: Some(subscriber),
                _cluster_pubsub: None,
            }),
        })
    }

    /// [`RedisStore::connect_with`] on a cluster. Commands go through one cluster
    /// connection (a multiplexed connection per node, the slot map refreshed on `MOVED` and
    /// after failures); pub/sub through a second one speaking RESP3, whose pushes are
    /// turned into events right where they arrive, and which subscribes again by itself
    /// after a reconnect or a change of the slot map: the announcement channel
    /// (`SUBSCRIBE`: a cluster carries classic pub/sub to every node) and this instance's
    /// own sharded channel (`SSUBSCRIBE`), which the route records of its users name.
    async fn connect_cluster(
        urls: &[&str],
        limits: MailLimits,
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        let builder = || {
            ClusterClientBuilder::new(urls.iter().copied())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .tcp_settings(tcp_settings())
                .retries(CLUSTER_RETRIES)
                .min_retry_wait(50)
                .max_retry_wait(500)
        };
        let client = builder().build()?;
        let connection = client.get_async_connection().await?;

        let instance = Instance::random();
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (subscriptions_sender, subscriptions) = watch::channel(0);
        let subscribed = subscriptions_sender.clone();
        let push_events = events.clone();
        let channel = instance.channel();
        let push_channel = channel.clone();
        let pubsub_client = builder()
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(move |push: PushInfo| {
                handle_cluster_push(push, &push_channel, &push_events, &subscriptions_sender);
                Ok::<(), std::convert::Infallible>(())
            })
            .build()?;
        let mut pubsub = pubsub_client.get_async_connection().await?;
        pubsub.subscribe(ANNOUNCE_CHANNEL).await?;
        pubsub.ssubscribe(&channel).await?;
        // The confirmation may or may not have come through the push sender by now; either
        // way the count starts at one, as on a single server.
        subscribed.send_modify(|count| *count = (*count).max(1));
        let replicas = options.replicas.unwrap_or(1);
        tracing::info!(
            nodes = urls.len(),
            replicas,
            instance = %instance.id,
            "redis backend: cluster mode"
        );
        Ok(Self {
            inner: Arc::new_cyclic(|store| Inner {
                index: IndexWriter::spawn(store.clone()),
                backend: Backend::Cluster { client, instance },
                commands: RwLock::new(Commands {
                    connection: Connection::Cluster(connection),
                    generation: 0,
                }),
                limits,
                replicas,
                events,
                subscriptions,
                subscriber: None,
                _cluster_pubsub: Some(pubsub),
            }),
        })
    }

    /// Whether this store runs on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.backend, Backend::Cluster { .. })
    }

    /// This instance's route on a cluster: the id its users' route records name.
    fn instance(&self) -> Option<&Instance> {
        match &self.inner.backend {
            Backend::Cluster { instance, .. } => Some(instance),
            Backend::Single { .. } => None,
        }
    }

    /// The limits this store applies.
    pub fn limits(&self) -> MailLimits {
        self.inner.limits
    }

    /// Counts how often the pub/sub connection has (re)subscribed: 1 after `connect`, one
    /// more after every re-subscription (on a cluster: of this instance's sharded channel).
    /// A health check or a test can wait for it to move.
    pub fn subscriptions(&self) -> watch::Receiver<u64> {
        self.inner.subscriptions.clone()
    }

    /// Runs `attempt` with a connection, again after a short pause when the error says a
    /// reconnect or retry may help (the connection manager reconnects on such errors), up
    /// to [`RETRY_ATTEMPTS`] times. A timeout replaces the connection before the next try
    /// ([`Inner::replace_commands`]), so a half-open connection costs one timeout, not
    /// every call from then on.
    async fn with_retry<T, F, Fut>(
        &self,
        operation: &'static str,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut delay = RETRY_FIRST_DELAY;
        let mut tries = 1;
        loop {
            let commands = self.inner.commands();
            match attempt(commands.connection).await {
                Ok(value) => return Ok(value),
                Err(error)
                    if tries < RETRY_ATTEMPTS
                        && !matches!(error.retry_method(), RetryMethod::NoRetry) =>
                {
                    tracing::warn!(operation, tries, %error, "redis operation failed; retrying");
                    if error.is_timeout() {
                        self.inner.replace_commands(commands.generation);
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX_DELAY);
                    tries += 1;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Runs one command with retries.
    async fn query<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        command: &redis::Cmd,
    ) -> Result<T, StoreError> {
        self.with_retry(operation, |mut connection| async move {
            command.query_async(&mut connection).await
        })
        .await
    }

    /// Runs one script invocation (built by `build`) with retries. The invocation is built
    /// per try because it borrows the script and is consumed by the call.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        script: &'static Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        self.with_retry(operation, |mut connection| {
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(*key);
            }
            for arg in args {
                invocation.arg(*arg);
            }
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await
    }

    /// Runs the script `source` (as a plain `EVAL`, so a master new after a failover needs
    /// no script cache) and then `WAIT`s for [`RedisOptions::replicas`] replicas, both in one
    /// pipeline on the connection to the keys' master: `WAIT` covers the writes of the
    /// connection it runs on, which are then this script's and any before it. Fails with
    /// [`StoreError::NotReplicated`] when too few replicas confirm within
    /// [`REPLICA_WAIT`]; the write may then be on the master alone, and the caller's retry
    /// (every replicated script is idempotent) writes it again or finds it there.
    /// With no replicas asked for, it is [`RedisStore::invoke`].
    async fn invoke_replicated<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        script: &'static Script,
        source: &'static str,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let wanted = self.inner.replicas;
        if wanted == 0 {
            return self.invoke(operation, script, keys, args).await;
        }
        let mut pipeline = redis::pipe();
        pipeline
            .cmd("EVAL")
            .arg(source)
            .arg(keys.len())
            .arg(keys)
            .arg(args)
            .cmd("WAIT")
            .arg(wanted)
            .arg(u64::try_from(REPLICA_WAIT.as_millis()).unwrap_or(u64::MAX));
        let (value, reached): (T, u32) = self
            .with_retry(operation, |mut connection| {
                let pipeline = &pipeline;
                async move { pipeline.query_async(&mut connection).await }
            })
            .await?;
        if reached < wanted {
            return Err(StoreError::NotReplicated { wanted, reached });
        }
        Ok(value)
    }

    /// See [`crate::Store::bind`].
    pub async fn bind(&self, binding: &Binding) -> Result<BindOutcome, StoreError> {
        let key = user_key(&binding.user, "binding");
        let value = encode(binding)?;
        let existing: Option<Vec<u8>> = self
            .invoke_replicated("bind", &BIND, BIND_SOURCE, &[&key], &[value.as_ref()])
            .await?;
        match existing {
            None => Ok(BindOutcome::Created),
            Some(bytes) => Ok(BindOutcome::Existing(decode_binding(
                &binding.user,
                &bytes,
            )?)),
        }
    }

    /// See [`crate::Store::rotate`].
    pub async fn rotate(
        &self,
        current: &Binding,
        rotation: &Rotation,
        now_ms: u64,
    ) -> Result<RotateOutcome, StoreError> {
        let user = &current.user;
        let keys = name_keys(user);
        let next = current.rotated(rotation, now_ms);
        let (expected, next, statement) = (encode(current)?, encode(&next)?, encode(rotation)?);
        let keep = crate::MAX_ROTATIONS.to_string();
        let (status, standing): (u8, Vec<u8>) = self
            .invoke_replicated(
                "rotate",
                &ROTATE,
                ROTATE_SOURCE,
                &[&keys[0], &keys[1], &keys[2], &keys[3]],
                &[
                    expected.as_ref(),
                    next.as_ref(),
                    statement.as_ref(),
                    keep.as_bytes(),
                ],
            )
            .await?;
        match (status, standing.is_empty()) {
            (0, _) => Ok(RotateOutcome::Rotated),
            (_, true) => Ok(RotateOutcome::Changed(None)),
            (_, false) => Ok(RotateOutcome::Changed(Some(decode_binding(
                user, &standing,
            )?))),
        }
    }

    /// See [`crate::Store::rotations`].
    pub async fn rotations(&self, user: &Username) -> Result<Vec<Rotation>, StoreError> {
        let values: Vec<Vec<u8>> = self
            .query(
                "rotations",
                redis::cmd("LRANGE")
                    .arg(user_key(user, "rotations"))
                    .arg(0)
                    .arg(-1),
            )
            .await?;
        values
            .iter()
            .map(|bytes| {
                wire::decode(bytes).map_err(|error| StoreError::Corrupt {
                    key: user_key(user, "rotations"),
                    reason: error.to_string(),
                })
            })
            .collect()
    }

    /// See [`crate::Store::release`].
    pub async fn release(&self, user: &Username) -> Result<Option<Binding>, StoreError> {
        let keys = name_keys(user);
        let standing: Option<Vec<u8>> = self
            .invoke_replicated(
                "release",
                &RELEASE,
                RELEASE_SOURCE,
                &[&keys[0], &keys[1], &keys[2], &keys[3]],
                &[],
            )
            .await?;
        standing
            .map(|bytes| decode_binding(user, &bytes))
            .transpose()
    }

    /// See [`crate::Store::binding`].
    pub async fn binding(&self, user: &Username) -> Result<Option<Binding>, StoreError> {
        let value: Option<Vec<u8>> = self
            .query("binding", redis::cmd("GET").arg(user_key(user, "binding")))
            .await?;
        value.map(|bytes| decode_binding(user, &bytes)).transpose()
    }

    /// See [`crate::Store::set_presence`]. Writes the presence (on a cluster with the
    /// route, one script on the user's slot) and queues the online index's move for the
    /// index writer (`online_index`): the presence is the truth, and the index only needs
    /// to be right by the next heartbeat (a lookup reads the presence, never the index).
    pub async fn set_presence(&self, presence: &Presence) -> Result<(), StoreError> {
        let key = user_key(&presence.user, "presence");
        let value = encode(presence)?;
        let now_ms = presence.last_seen_ms;
        let keep_ms = presence
            .expires_at_ms
            .saturating_sub(now_ms)
            .saturating_add(PRESENCE_KEEP_MS);
        if let Some(instance) = self.instance() {
            let keep_text = keep_ms.to_string();
            let session_text = presence.session.to_string();
            let expiry_text = presence.expires_at_ms.to_string();
            let prune_text = now_ms.saturating_sub(ONLINE_PRUNE_AFTER_MS).to_string();
            let routes = user_key(&presence.user, "routes");
            let keys = [key.as_str(), routes.as_str()];
            let args = [
                session_text.as_bytes(),
                value.as_ref(),
                keep_text.as_bytes(),
                instance.id.as_bytes(),
                expiry_text.as_bytes(),
                prune_text.as_bytes(),
            ];
            self.invoke::<i64>("set_presence", &SET_PRESENCE_ROUTED, &keys, &args)
                .await?;
        } else {
            let mut pipeline = redis::pipe();
            pipeline
                .cmd("HSET")
                .arg(&key)
                .arg("session")
                .arg(presence.session)
                .arg("value")
                .arg(value.as_ref())
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(keep_ms)
                .ignore();
            self.run_pipeline("set_presence", &pipeline).await?;
        }
        self.inner
            .index
            .online(&presence.user, presence.expires_at_ms, now_ms)
            .await;
        Ok(())
    }

    /// Runs `pipeline` (its replies ignored) with retries.
    async fn run_pipeline(
        &self,
        operation: &'static str,
        pipeline: &redis::Pipeline,
    ) -> Result<(), StoreError> {
        self.with_retry(operation, |mut connection| async move {
            pipeline.query_async::<()>(&mut connection).await
        })
        .await
    }

    /// See [`crate::Store::clear_presence`].
    pub async fn clear_presence(
        &self,
        user: &Username,
        session: u64,
        _now_ms: u64,
    ) -> Result<bool, StoreError> {
        let Some(current) = self.presence(user).await? else {
            return Ok(false);
        };
        if current.session != session {
            return Ok(false);
        }
        let cleared = Presence {
            expires_at_ms: 0,
            ..current.clone()
        };
        let key = user_key(user, "presence");
        let value = encode(&cleared)?;
        let session_text = session.to_string();
        let owned: i64 = self
            .invoke(
                "clear_presence",
                &CLEAR_PRESENCE,
                &[&key],
                &[session_text.as_bytes(), value.as_ref()],
            )
            .await?;
        if owned == 0 {
            return Ok(false);
        }
        if let Some(instance) = self.instance() {
            // The user's slot first (presence, then this instance's route), the slot of the
            // user's online index bucket last; each step is idempotent.
            let _: u64 = self
                .query(
                    "clear_presence",
                    redis::cmd("HDEL")
                        .arg(user_key(user, "routes"))
                        .arg(&instance.id),
                )
                .await?;
        }
        self.inner.index.left(user, current.expires_at_ms).await;
        Ok(true)
    }

    /// See [`crate::Store::presence`]. A record that does not decode is logged and reads as
    /// no presence.
    pub async fn presence(&self, user: &Username) -> Result<Option<Presence>, StoreError> {
        let key = user_key(user, "presence");
        let value: Option<Vec<u8>> = self
            .query("presence", redis::cmd("HGET").arg(&key).arg("value"))
            .await?;
        let Some(bytes) = value else {
            return Ok(None);
        };
        match wire::decode::<Presence>(&bytes) {
            Ok(presence) => Ok(Some(presence)),
            Err(error) => {
                tracing::warn!(%key, %error, "presence does not decode; ignored");
                Ok(None)
            }
        }
    }

    /// See [`crate::Store::online_users`]: the online index's entries expiring after
    /// `now_ms`.
    pub async fn online_users(&self, now_ms: u64) -> Result<Vec<Username>, StoreError> {
        self.inner.index.flush().await;
        self.online_index("online_users", &format!("({now_ms}"), "+inf")
            .await
    }

    /// See [`crate::Store::lapsed`]: the online index's entries that expired in the range.
    /// A session that leaves takes its entry out (`LEAVE_ONLINE`) and a heartbeat moves it
    /// to the new expiry, so what expired there was left by a session that never cleared
    /// its presence.
    pub async fn lapsed(&self, after_ms: u64, until_ms: u64) -> Result<Vec<Username>, StoreError> {
        self.inner.index.flush().await;
        self.online_index("lapsed", &format!("({after_ms}"), &until_ms.to_string())
            .await
    }

    /// The names in the online index scored (expiring) between `min` and `max`
    /// (`ZRANGEBYSCORE` bounds), sorted: every bucket read (one command each, all in flight
    /// at once: on a cluster they are different slots) and merged.
    async fn online_index(
        &self,
        operation: &'static str,
        min: &str,
        max: &str,
    ) -> Result<Vec<Username>, StoreError> {
        let reads = (0..ONLINE_BUCKETS).map(|bucket| {
            let key = online_bucket_key(bucket);
            async move {
                let names: Vec<String> = self
                    .query(
                        operation,
                        redis::cmd("ZRANGEBYSCORE").arg(&key).arg(min).arg(max),
                    )
                    .await?;
                Ok::<_, StoreError>(parse_names(names, &key))
            }
        });
        let mut users: Vec<Username> = futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
            .collect();
        users.sort();
        Ok(users)
    }

    /// See [`crate::Store::deposit`].
    pub async fn deposit(
        &self,
        envelope: &Envelope,
        now_ms: u64,
    ) -> Result<DepositOutcome, StoreError> {
        let limits = self.inner.limits;
        let keys = MailKeys::new(&envelope.to);
        let value = encode(&StoredMail {
            envelope: envelope.clone(),
            deposited_at_ms: now_ms,
        })?;
        let cap = limits.cap.to_string();
        let max_bytes = limits.max_bytes.to_string();
        let gc_ms = limits.ttl_ms.saturating_add(MAIL_GC_MARGIN_MS).to_string();
        let key = mail_key(&envelope.from, &envelope.id);
        let script_keys = [
            keys.order.as_str(),
            &keys.data,
            &keys.sequence,
            &keys.blocked,
            &keys.bytes,
        ];
        let script_args = [
            key.as_slice(),
            envelope.from.as_str().as_bytes(),
            value.as_ref(),
            cap.as_bytes(),
            gc_ms.as_bytes(),
            max_bytes.as_bytes(),
        ];
        let deposit_once = || {
            self.invoke_replicated::<i64>(
                "deposit",
                &DEPOSIT,
                DEPOSIT_SOURCE,
                &script_keys,
                &script_args,
            )
        };
        let mut outcome = deposit_once().await?;
        // Full: expired mail may be what fills it (its recipient has not fetched since).
        // Drop it from the head and try once more; the script checks the cap again
        // atomically, so a race with other deposits can only make this retry say "full".
        if (outcome == DEPOSIT_FULL || outcome == DEPOSIT_FULL_BYTES)
            && self.expire_head(&envelope.to, &keys, now_ms).await? > 0
        {
            outcome = deposit_once().await?;
        }
        match outcome {
            1 => Ok(DepositOutcome::Stored),
            0 => Ok(DepositOutcome::Duplicate),
            -1 => Err(StoreError::Blocked {
                recipient: envelope.to.clone(),
                sender: envelope.from.clone(),
            }),
            DEPOSIT_FULL => Err(StoreError::MailboxFull {
                user: envelope.to.clone(),
                cap: limits.cap,
            }),
            DEPOSIT_FULL_BYTES => Err(StoreError::MailboxBytesFull {
                user: envelope.to.clone(),
                max_bytes: limits.max_bytes,
            }),
            other => Err(StoreError::Corrupt {
                key: keys.order,
                reason: format!("deposit script answered {other}"),
            }),
        }
    }

    /// See [`crate::Store::fetch`]. One round trip per batch, reading only about the
    /// batch's byte budget; expired mail met on the way is deleted and undecodable mail
    /// quarantined (one more round trip, only when there is some), and the batch is topped
    /// up from behind them.
    pub async fn fetch(
        &self,
        user: &Username,
        max: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<Fetched, StoreError> {
        let keys = MailKeys::new(user);
        let ttl_ms = self.inner.limits.ttl_ms;
        if max == 0 {
            let remaining = self.mail_count(user).await?;
            return Ok(Fetched {
                mail: Vec::new(),
                remaining,
            });
        }
        let mut batch = Batch::new(max, max_bytes);
        loop {
            // Mail kept so far still sits at ranks 0..batch.len(); read on from behind it.
            let (total, ids, values) = self
                .read_mail(&keys, batch.len(), max - 1, batch.bytes_left())
                .await?;
            let (mut removals, mut migrations) = (Vec::new(), Vec::new());
            // The script answers one value per id; a missing one reads as a missing value.
            let mut values = values.into_iter();
            for key in ids {
                match classify(user, &key, values.next().flatten(), ttl_ms, now_ms) {
                    Entry::Keep(stored, migrate) => {
                        let new_key =
                            migrate.then(|| mail_key(&stored.envelope.from, &stored.envelope.id));
                        if !batch.offer(stored) {
                            break;
                        }
                        if let Some(new_key) = new_key {
                            migrations.push(Removal {
                                key,
                                action: RemovalAction::Migrate(new_key),
                            });
                        }
                    }
                    Entry::Remove(action) => removals.push(Removal { key, action }),
                }
            }
            let removed = removals.len() as u64;
            if !removals.is_empty() || !migrations.is_empty() {
                // Migrations keep their entries' ranks; only removals make room to read on.
                removals.append(&mut migrations);
                self.remove_mail(&keys, &removals).await?;
            }
            let remaining = total.saturating_sub(removed + batch.len() as u64);
            let more_behind = (batch.len() as u64 + removed) < total;
            if removed == 0 || batch.is_full() || !more_behind {
                return Ok(Fetched {
                    mail: batch.into_mail(),
                    remaining,
                });
            }
        }
    }

    /// Deletes the expired mail at the head of `user`'s mailbox, oldest first, up to the
    /// first message that has not expired; returns how many entries it took out. It reads
    /// the head as a fetch does (undecodable entries met on the way are quarantined, as a
    /// fetch would) in growing chunks from one entry, so a mailbox full of live mail costs
    /// one small read per refused deposit.
    async fn expire_head(
        &self,
        user: &Username,
        keys: &MailKeys,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let ttl_ms = self.inner.limits.ttl_ms;
        let mut chunk = 1;
        let mut removed = 0;
        loop {
            // Everything removed so far is gone, so the head is always rank 0.
            let (total, ids, values) = self
                .read_mail(keys, 0, chunk - 1, EXPIRE_READ_BUDGET)
                .await?;
            let read = ids.len();
            let mut removals = Vec::new();
            let mut values = values.into_iter();
            for key in ids {
                match classify(user, &key, values.next().flatten(), ttl_ms, now_ms) {
                    Entry::Keep(..) => break,
                    Entry::Remove(action) => removals.push(Removal { key, action }),
                }
            }
            let reached_live_mail = removals.len() < read;
            if !removals.is_empty() {
                self.remove_mail(keys, &removals).await?;
                removed += removals.len() as u64;
            }
            if reached_live_mail || read as u64 >= total {
                return Ok(removed);
            }
            chunk = (chunk * 8).min(EXPIRE_CHUNK_MAX);
        }
    }

    /// One [`FETCH`] call: the mailbox size and the entries from rank `first` on, up to
    /// rank `last` or until about `max_bytes` of envelopes are read.
    async fn read_mail(
        &self,
        keys: &MailKeys,
        first: usize,
        last: usize,
        max_bytes: usize,
    ) -> Result<FetchReply, StoreError> {
        let (first, last) = (first.to_string(), last.to_string());
        let (budget, overhead) = (max_bytes.to_string(), STORED_MAIL_OVERHEAD.to_string());
        self.invoke(
            "fetch",
            &FETCH,
            &[&keys.order, &keys.data],
            &[
                first.as_bytes(),
                last.as_bytes(),
                budget.as_bytes(),
                overhead.as_bytes(),
            ],
        )
        .await
    }

    /// Deletes expired entries, moves undecodable ones to quarantine and old-layout ones to
    /// their mail keys, in one [`REMOVE`] call; returns how many entries it deleted.
    async fn remove_mail(&self, keys: &MailKeys, removals: &[Removal]) -> Result<u64, StoreError> {
        let gc_ms = self
            .inner
            .limits
            .ttl_ms
            .saturating_add(MAIL_GC_MARGIN_MS)
            .to_string();
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + 3 * removals.len());
        args.push(gc_ms.as_bytes());
        for removal in removals {
            let (action, extra): (&[u8], &[u8]) = match &removal.action {
                RemovalAction::Delete => (b"d", b""),
                RemovalAction::Quarantine => (b"q", b""),
                RemovalAction::Migrate(new_key) => (b"m", new_key),
            };
            args.extend([action, removal.key.as_slice(), extra]);
        }
        self.invoke(
            "remove mail",
            &REMOVE,
            &[&keys.order, &keys.data, &keys.bytes, &keys.quarantine],
            &args,
        )
        .await
    }

    /// See [`crate::Store::ack`]. One [`REMOVE`] call for the whole batch, which gives the
    /// acked bytes back to the byte cap in the same step.
    pub async fn ack(&self, user: &Username, mail: &[MailRef]) -> Result<u64, StoreError> {
        if mail.is_empty() {
            return Ok(0);
        }
        let removals: Vec<Removal> = mail
            .iter()
            .map(|acked| Removal {
                key: mail_key(&acked.from, &acked.id),
                action: RemovalAction::Delete,
            })
            .collect();
        self.remove_mail(&MailKeys::new(user), &removals).await
    }

    /// See [`crate::Store::mail_count`].
    pub async fn mail_count(&self, user: &Username) -> Result<u64, StoreError> {
        self.query(
            "mail_count",
            redis::cmd("ZCARD").arg(user_key(user, "mail")),
        )
        .await
    }

    /// See [`crate::Store::block`].
    pub async fn block(&self, user: &Username, blocked: &Username) -> Result<(), StoreError> {
        self.query(
            "block",
            redis::cmd("SADD")
                .arg(user_key(user, "blocked"))
                .arg(blocked.as_str()),
        )
        .await
    }

    /// See [`crate::Store::unblock`].
    pub async fn unblock(&self, user: &Username, blocked: &Username) -> Result<(), StoreError> {
        self.query(
            "unblock",
            redis::cmd("SREM")
                .arg(user_key(user, "blocked"))
                .arg(blocked.as_str()),
        )
        .await
    }

    /// See [`crate::Store::publish_prekeys`]: one script on the user's slot, replicated
    /// like a deposit (a key published on a master alone could be lost, and then claimed
    /// from nowhere).
    pub async fn publish_prekeys(
        &self,
        user: &Username,
        prekeys: &proto::ratchet::PreKeys,
    ) -> Result<u32, StoreError> {
        let owner = encode(&PreKeyOwner {
            olm_key: prekeys.olm_key.clone(),
            fallback: prekeys.fallback.clone(),
        })?;
        let most = proto::ratchet::MAX_ONE_TIME_KEYS.to_string();
        let keys = prekeys
            .one_time
            .iter()
            .map(encode)
            .collect::<Result<Vec<_>, _>>()?;
        let keep: &[u8] = if prekeys.fallback.is_none() {
            b"1"
        } else {
            b"0"
        };
        let mut args: Vec<&[u8]> =
            vec![owner.as_ref(), &prekeys.olm_key.key, most.as_bytes(), keep];
        args.extend(keys.iter().map(|key| key.as_ref()));
        let (owner_key, list_key) = prekey_keys(user);
        self.invoke_replicated(
            "publish_prekeys",
            &PUBLISH_PREKEYS,
            PUBLISH_PREKEYS_SOURCE,
            &[&owner_key, &list_key],
            &args,
        )
        .await
    }

    /// See [`crate::Store::claim_prekey`]: one script on the user's slot, replicated (a
    /// claim lost in a failover would hand the same one-time key out twice, and the second
    /// session could never open).
    pub async fn claim_prekey(
        &self,
        user: &Username,
    ) -> Result<Option<proto::ratchet::PreKeyBundle>, StoreError> {
        let (owner_key, list_key) = prekey_keys(user);
        let found: Option<Vec<Vec<u8>>> = self
            .invoke_replicated(
                "claim_prekey",
                &CLAIM_PREKEY,
                CLAIM_PREKEY_SOURCE,
                &[&owner_key, &list_key],
                &[],
            )
            .await?;
        let Some(mut parts) = found else {
            return Ok(None);
        };
        let one_time = match parts.len() {
            2 => Some(decode_prekey(user, "one-time key", &parts.remove(1))?),
            _ => None,
        };
        let owner: PreKeyOwner = match parts.first() {
            Some(bytes) => decode_prekey(user, "prekeys", bytes)?,
            None => return Ok(None),
        };
        Ok(prekey_bundle(owner, one_time))
    }

    /// See [`crate::Store::blocked_by`].
    pub async fn blocked_by(&self, user: &Username) -> Result<Vec<Username>, StoreError> {
        let key = user_key(user, "blocked");
        let names: Vec<String> = self
            .query("blocked_by", redis::cmd("SMEMBERS").arg(&key))
            .await?;
        let mut users = parse_names(names, &key);
        users.sort();
        Ok(users)
    }

    /// See [`crate::Store::publish`]: a `PUBLISH` on [`ANNOUNCE_CHANNEL`] or
    /// [`MAIL_CHANNEL`]; every instance's subscriber (this one's too) delivers it. On a
    /// cluster, announcements go the same way (a cluster carries classic pub/sub to every
    /// node), but a mail-waiting hint goes only where the recipient has a session: one
    /// `SPUBLISH` on the sharded channel of each instance named in the recipient's route
    /// record (`p2pchat:{user}:routes`), none when they are nowhere online.
    pub async fn publish(&self, event: &Broadcast) -> Result<(), StoreError> {
        let (channel, payload) = match event {
            Broadcast::Announcement { text } => (ANNOUNCE_CHANNEL, text.as_str()),
            Broadcast::MailWaiting { user } if self.is_cluster() => {
                return self.publish_routed(user).await;
            }
            Broadcast::MailWaiting { user } => (MAIL_CHANNEL, user.as_str()),
            Broadcast::Presence { user, to, .. } if self.is_cluster() => {
                return self.publish_presence_routed(event, user, to).await;
            }
            Broadcast::SessionElsewhere { user, .. } | Broadcast::SessionEnded { user, .. }
                if self.is_cluster() =>
            {
                let routes = self.routes_of(user).await?;
                return self.spublish_to(&routes, &encode_event(event)?).await;
            }
            Broadcast::Presence { .. }
            | Broadcast::SessionElsewhere { .. }
            | Broadcast::SessionEnded { .. } => {
                return self
                    .query(
                        "publish",
                        redis::cmd("PUBLISH")
                            .arg(PRESENCE_CHANNEL)
                            .arg(encode_event(event)?.as_ref()),
                    )
                    .await
                    .map(|_receivers: u64| ());
            }
        };
        self.query("publish", redis::cmd("PUBLISH").arg(channel).arg(payload))
            .await
            .map(|_receivers: u64| ())
    }

    /// The instances holding sessions of `user` on a cluster (their route record).
    async fn routes_of(&self, user: &Username) -> Result<Vec<String>, StoreError> {
        self.query("publish", redis::cmd("HKEYS").arg(user_key(user, "routes")))
            .await
    }

    /// One `SPUBLISH` of `payload` on the sharded channel of each of `instances`.
    async fn spublish_to(&self, instances: &[String], payload: &[u8]) -> Result<(), StoreError> {
        for instance in instances {
            let _receivers: u64 = self
                .query(
                    "publish",
                    redis::cmd("SPUBLISH")
                        .arg(instance_channel(instance))
                        .arg(payload),
                )
                .await?;
        }
        Ok(())
    }

    /// A presence change on a cluster: each recipient's route record is read, and each
    /// instance named gets one `SPUBLISH` listing only its own recipients (none when no
    /// recipient is online anywhere).
    async fn publish_presence_routed(
        &self,
        event: &Broadcast,
        user: &Username,
        to: &[Username],
    ) -> Result<(), StoreError> {
        let mut by_instance: std::collections::BTreeMap<String, Vec<Username>> =
            std::collections::BTreeMap::new();
        for recipient in to {
            for instance in self.routes_of(recipient).await? {
                by_instance
                    .entry(instance)
                    .or_default()
                    .push(recipient.clone());
            }
        }
        let Broadcast::Presence { online, answer, .. } = event else {
            return Ok(());
        };
        for (instance, recipients) in by_instance {
            let part = Broadcast::Presence {
                user: user.clone(),
                online: *online,
                to: recipients,
                answer: *answer,
            };
            self.spublish_to(&[instance], &encode_event(&part)?).await?;
        }
        Ok(())
    }

    /// A mail-waiting hint for `user` on a cluster, to each instance their routes name.
    async fn publish_routed(&self, user: &Username) -> Result<(), StoreError> {
        let routes = self.routes_of(user).await?;
        self.spublish_to(&routes, user.as_str().as_bytes()).await
    }

    /// See [`crate::Store::subscribe`].
    pub fn subscribe(&self) -> broadcast::Receiver<Broadcast> {
        self.inner.events.subscribe()
    }
}

/// The fetch script's answer: mailbox size, ids, values (`None` where missing).
type FetchReply = (u64, Vec<Vec<u8>>, Vec<Option<Vec<u8>>>);

/// What a fetch does with one mailbox entry.
enum Entry {
    /// Deliver it; `true` when its key is of the old layout (the id alone), to migrate.
    Keep(StoredMail, bool),
    /// Remove it (delete or quarantine).
    Remove(RemovalAction),
}

/// Decides about one fetched entry under mail key `key`, logging anything wrong with it.
fn classify(
    user: &Username,
    key: &[u8],
    value: Option<Vec<u8>>,
    ttl_ms: u64,
    now_ms: u64,
) -> Entry {
    let Some(bytes) = value else {
        tracing::warn!(%user, key = ?key, "mail key without a value; dropped from the mailbox");
        return Entry::Remove(RemovalAction::Delete);
    };
    match wire::decode::<StoredMail>(&bytes) {
        Ok(stored) if is_expired(&stored, ttl_ms, now_ms) => Entry::Remove(RemovalAction::Delete),
        Ok(stored) if key == mail_key(&stored.envelope.from, &stored.envelope.id) => {
            Entry::Keep(stored, false)
        }
        Ok(stored) if key == stored.envelope.id.0.as_slice() => Entry::Keep(stored, true),
        Ok(_) => {
            tracing::warn!(%user, key = ?key, "stored mail has another sender or id than its key; quarantined");
            Entry::Remove(RemovalAction::Quarantine)
        }
        Err(error) => {
            tracing::warn!(%user, key = ?key, %error, "stored mail does not decode; quarantined");
            Entry::Remove(RemovalAction::Quarantine)
        }
    }
}

/// The TCP options of every Redis connection: keep-alive probes, and on Linux a user
/// timeout, so the kernel itself closes a connection whose peer vanished (and the
/// connection manager then reconnects), even while no command is waiting on it. Nagle
/// stays as the redis crate's default has it.
fn tcp_settings() -> TcpSettings {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    #[cfg(target_os = "linux")]
    let keepalive = keepalive.with_retries(TCP_KEEPALIVE_RETRIES);
    let settings = TcpSettings::default().set_keepalive(keepalive);
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout(TCP_USER_TIMEOUT);
    settings
}

/// Parses names read from `key`, logging and skipping invalid ones.
fn parse_names(names: Vec<String>, key: &str) -> Vec<Username> {
    names
        .into_iter()
        .filter_map(|name| match Username::new(&name) {
            Ok(user) => Some(user),
            Err(error) => {
                tracing::warn!(key, name, %error, "invalid name stored; skipped");
                None
            }
        })
        .collect()
}

/// A presence or second-session event as a pub/sub payload.
fn encode_event(event: &Broadcast) -> Result<bytes::Bytes, StoreError> {
    wire::encode(event).map_err(|error| StoreError::Corrupt {
        key: PRESENCE_CHANNEL.to_owned(),
        reason: error.to_string(),
    })
}

/// A presence or second-session event read from a pub/sub payload; anything else (an
/// older or newer instance's message, garbage) is logged and dropped.
fn decode_event(payload: &[u8]) -> Option<Broadcast> {
    match wire::decode::<Broadcast>(payload) {
        Ok(
            event @ (Broadcast::Presence { .. }
            | Broadcast::SessionElsewhere { .. }
            | Broadcast::SessionEnded { .. }),
        ) => Some(event),
        Ok(_) | Err(_) => {
            tracing::warn!(
                len = payload.len(),
                "a presence event that does not decode; dropped"
            );
            None
        }
    }
}

/// Opens a pub/sub connection subscribed to every broadcast channel.
async fn subscribe_channels(client: &Client) -> RedisResult<PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub
        .subscribe(&[ANNOUNCE_CHANNEL, MAIL_CHANNEL, PRESENCE_CHANNEL])
        .await?;
    Ok(pubsub)
}

/// The subscriber task: forwards from `pubsub` until the connection is lost, then
/// re-subscribes (with backoff while Redis is away) and bumps `subscriptions`. Runs until
/// aborted by the last store handle's drop.
async fn run_subscriber(
    client: Client,
    pubsub: PubSub,
    events: broadcast::Sender<Broadcast>,
    subscriptions: watch::Sender<u64>,
) {
    let mut current = Some(pubsub);
    let mut delay = RETRY_FIRST_DELAY;
    loop {
        let pubsub = match current.take() {
            Some(pubsub) => pubsub,
            None => {
                match tokio::time::timeout(CONNECT_TIMEOUT, subscribe_channels(&client)).await {
                    Ok(Ok(pubsub)) => {
                        tracing::info!("redis pub/sub re-subscribed");
                        subscriptions.send_modify(|count| *count += 1);
                        pubsub
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "redis pub/sub reconnect failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(RETRY_MAX_DELAY);
                        continue;
                    }
                    Err(_elapsed) => {
                        tracing::debug!("redis pub/sub reconnect timed out; retrying");
                        continue;
                    }
                }
            }
        };
        delay = RETRY_FIRST_DELAY;
        forward(pubsub, &events).await;
        tracing::warn!("redis pub/sub connection lost; re-subscribing");
    }
}

/// Forwards messages from one pub/sub connection until it closes or stops answering pings.
async fn forward(pubsub: PubSub, events: &broadcast::Sender<Broadcast>) {
    let (mut sink, mut stream) = pubsub.split();
    let mut keepalive = tokio::time::interval(PUBSUB_PING_INTERVAL);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the connection was just proven alive.
    keepalive.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(message) => {
                    if let Some(event) = to_broadcast(&message, MAIL_CHANNEL) {
                        // No local subscriber is fine: then no one needs the event.
                        let _ = events.send(event);
                    }
                }
                None => return,
            },
            _ = keepalive.tick() => {
                let answer = tokio::time::timeout(PUBSUB_PING_TIMEOUT, sink.ping::<Value>()).await;
                if !matches!(answer, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}

/// Turns a pub/sub message into an event, reading `mail_channel` as the channel of
/// mail-waiting hints; logs and drops anything malformed.
fn to_broadcast(message: &redis::Msg, mail_channel: &str) -> Option<Broadcast> {
    let payload = message.get_payload_bytes();
    match message.get_channel_name() {
        ANNOUNCE_CHANNEL => {
            let text = String::from_utf8_lossy(payload);
            if let std::borrow::Cow::Owned(_) = text {
                tracing::warn!("announcement is not valid UTF-8; invalid bytes replaced");
            }
            Some(Broadcast::Announcement {
                text: text.into_owned(),
            })
        }
        PRESENCE_CHANNEL => decode_event(payload),
        channel if channel == mail_channel => match std::str::from_utf8(payload)
            .ok()
            .and_then(|name| Username::new(name).ok())
        {
            Some(user) => Some(Broadcast::MailWaiting { user }),
            // A cluster instance's channel also carries presence events: their encoding
            // starts with a variant tag byte, never a name's character.
            None if payload.first().is_some_and(|byte| *byte < b' ') => decode_event(payload),
            None => {
                tracing::warn!(payload = ?String::from_utf8_lossy(payload), "mail-waiting hint with an invalid name; dropped");
                None
            }
        },
        other => {
            tracing::warn!(channel = other, "message on an unexpected channel; dropped");
            None
        }
    }
}

/// What a cluster pub/sub push means: a message on the announcement channel or on this
/// instance's `channel` becomes an event; a confirmed subscription of `channel` (at
/// connect, and again after every reconnect or slot-map change) counts in
/// `subscriptions`; anything else is logged.
fn handle_cluster_push(
    push: PushInfo,
    channel: &str,
    events: &broadcast::Sender<Broadcast>,
    subscriptions: &watch::Sender<u64>,
) {
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            if let Some(message) = redis::Msg::from_push_info(push)
                && let Some(event) = to_broadcast(&message, channel)
            {
                // No local subscriber is fine: then no one needs the event.
                let _ = events.send(event);
            }
        }
        PushKind::SSubscribe => {
            subscriptions.send_modify(|count| *count += 1);
            if *subscriptions.borrow() > 1 {
                tracing::info!("redis cluster: this instance's push channel re-subscribed");
            }
        }
        PushKind::Disconnection => {
            tracing::warn!("redis cluster: a pub/sub connection was lost; it re-subscribes");
        }
        kind => tracing::debug!(?kind, "redis cluster push"),
    }
}

/// How many times the cluster connection itself retries a request (moving to the new
/// master of a slot after `MOVED`, reconnecting) before the store's own retries see it.
const CLUSTER_RETRIES: u32 = 3;

/// The settings of a cluster command connection built after a timeout.
fn cluster_config() -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
}

/// The URLs in `urls`, separated by commas (blanks around each ignored); an error names
/// what is wrong without printing a password.
fn split_urls(urls: &str) -> Result<Vec<&str>, StoreError> {
    let list: Vec<&str> = urls.split(',').map(str::trim).collect();
    if list.iter().all(|url| url.is_empty()) {
        return Err(RedisConfigError::NoUrl.into());
    }
    if list.iter().any(|url| url.is_empty()) {
        return Err(RedisConfigError::EmptyUrl {
            list: redact_urls(urls),
        }
        .into());
    }
    Ok(list)
}

/// Asks the nodes, in order, until one answers `INFO cluster`; returns whether it runs in
/// cluster mode and which one answered. Fails with the last node's error if none does.
async fn probe_cluster_mode(clients: &[Client]) -> Result<(bool, usize), StoreError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut last_error = None;
    for (index, client) in clients.iter().enumerate() {
        let attempt = async {
            let mut connection = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("INFO")
                .arg("cluster")
                .query_async::<String>(&mut connection)
                .await
        };
        match attempt.await {
            Ok(info) => {
                let cluster = info.lines().any(|line| line.trim() == "cluster_enabled:1");
                return Ok((cluster, index));
            }
            Err(error) => {
                tracing::warn!(%error, "a Redis node did not answer; trying the next");
                last_error = Some(error);
            }
        }
    }
    Err(last_error.map_or_else(|| RedisConfigError::NoUrl.into(), StoreError::Redis))
}

#[cfg(test)]
mod tests {
    use super::{RedisConfigError, StoreError, redact_url, redact_urls, split_urls};

    #[test]
    fn url_lists_split_on_commas_and_refuse_empty_entries() {
        assert_eq!(
            split_urls(" redis://a:1 ,redis://b:2").ok(),
            Some(vec!["redis://a:1", "redis://b:2"])
        );
        for bad in [
            "",
            " ",
            ",",
            "redis://a:1,,redis://b:2",
            "redis://:secret@a:1,",
        ] {
            match split_urls(bad) {
                Err(StoreError::Config(
                    error @ (RedisConfigError::NoUrl | RedisConfigError::EmptyUrl { .. }),
                )) => {
                    let reason = error.to_string();
                    assert!(reason.contains("URL"), "{bad:?}: {reason}");
                    assert!(!reason.contains("secret"), "{bad:?}: {reason}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(
            redact_urls("redis://:one@a:1, redis://:two@b:2"),
            "redis://***@a:1,redis://***@b:2"
        );
    }

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
