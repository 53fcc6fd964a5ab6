//! Behaviours specific to the Redis backend: raw publishes, restarts, bad data written
//! behind the store's back, and what Redis may see.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, ensure};
use futures::future::try_join_all;
use proto::{Channel, Identity, MessageId};
use redis::AsyncCommands;
use store::{
    ANNOUNCE_CHANNEL, Binding, Broadcast, MailLimits, Presence, RedisStore, Store,
    testing::RedisServer,
};

use crate::util::{
    BlackholeProxy, EVENT_TIMEOUT, LIMITS, RedisBackend, envelope, ids, next_event, refs, user,
};

/// Regression: when the command connection went half-open (Redis stopped answering but
/// the socket stayed open), every command timed out, redis-rs did not count a timeout as a
/// dropped connection, and each call retried on the same dead connection eight times
/// (about 25 s) and failed, forever. A timeout now replaces the connection, so the first
/// call after the switch succeeds one response timeout (3 s) later.
#[tokio::test]
async fn a_half_open_command_connection_is_replaced_after_one_timeout() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let proxy = BlackholeProxy::start(server.port()).await?;
    let store: Store = RedisStore::connect(&proxy.url(), LIMITS).await?.into();
    let bob = user("bob");
    store
        .deposit(&envelope("alice", "bob", "before"), 1_000)
        .await?;
    proxy.blackhole();
    let count = tokio::time::timeout(Duration::from_secs(10), store.mail_count(&bob))
        .await
        .context("still stuck on the half-open connection after 10 s")??;
    ensure!(count == 1);
    // Later calls use the new connection straight away.
    let after = envelope("alice", "bob", "after");
    let outcome = tokio::time::timeout(Duration::from_secs(2), store.deposit(&after, 2_000))
        .await
        .context("the call after the recovery waited for a timeout again")??;
    ensure!(outcome == store::DepositOutcome::Stored);
    ensure!(store.mail_count(&bob).await? == 2);
    Ok(())
}

/// The Compose deployment's Redis demands a password (`requirepass`). With the password in
/// the URL every part of the store works: commands, scripts, and the pub/sub connection
/// (which authenticates on its own).
#[tokio::test]
async fn a_password_protected_redis_works_with_the_password_in_the_url() -> anyhow::Result<()> {
    let server = RedisServer::start_with_password("correct-horse-battery")?;
    let backend = RedisBackend::with_server(server).await?;
    let store = &backend.store;
    let mut receiver = store.subscribe();
    let sent = envelope("alice", "bob", "behind a password");
    store.deposit(&sent, 1_000).await?;
    let fetched = store.fetch(&user("bob"), 10, usize::MAX, 2_000).await?;
    ensure!(ids(&fetched.mail) == vec![sent.id]);
    let announcement = Broadcast::Announcement {
        text: "still here".to_owned(),
    };
    store.publish(&announcement).await?;
    ensure!(next_event(&mut receiver).await? == announcement);
    Ok(())
}

/// A Redis that demands a password refuses a store without it (`NOAUTH`) or with a wrong
/// one (the `AUTH` fails) at connect, within seconds, and the error says so, so the
/// discovery server stops at start with the reason instead of failing every request later.
#[tokio::test]
async fn a_missing_or_wrong_password_fails_at_connect() -> anyhow::Result<()> {
    let server = RedisServer::start_with_password("correct-horse-battery")?;
    let wrong = server.url().replace("correct-horse-battery", "wrong-horse");
    for (url, expected) in [
        (server.url_without_password(), "NOAUTH"),
        (wrong, "authentication failed"),
    ] {
        let connected =
            tokio::time::timeout(Duration::from_secs(10), RedisStore::connect(&url, LIMITS))
                .await
                .with_context(|| format!("connecting to {url} did not give up within 10 s"))?;
        let Err(error) = connected else {
            anyhow::bail!("connected to {url} without the right password");
        };
        ensure!(
            error.to_string().contains(expected),
            "{url}: expected {expected}, got: {error}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn raw_publish_on_the_announce_channel_is_an_announcement() -> anyhow::Result<()> {
    let backend = RedisBackend::start().await?;
    let mut first = backend.store.subscribe();
    let mut second = backend.store.subscribe();
    let mut raw = backend.raw().await?;
    // What `redis-cli PUBLISH p2pchat:announce "..."` sends.
    let _: u64 = raw
        .publish(ANNOUNCE_CHANNEL, "server restarts at noon")
        .await?;
    // A malformed mail-waiting hint is dropped, and does not stop what follows.
    let _: u64 = raw
        .publish(store::redis_store::MAIL_CHANNEL, "Not A Name!")
        .await?;
    let _: u64 = raw.publish(store::redis_store::MAIL_CHANNEL, "bob").await?;
    for receiver in [&mut first, &mut second] {
        ensure!(
            next_event(receiver).await?
                == Broadcast::Announcement {
                    text: "server restarts at noon".to_owned()
                }
        );
        ensure!(next_event(receiver).await? == Broadcast::MailWaiting { user: user("bob") });
    }
    Ok(())
}

#[tokio::test]
async fn operations_and_subscription_survive_a_redis_restart() -> anyhow::Result<()> {
    let mut backend = RedisBackend::with_server(RedisServer::start_persistent()?).await?;
    let store = backend.store.clone();
    let Store::Redis(redis_store) = &store else {
        anyhow::bail!("not a redis store");
    };
    let mut subscriptions = redis_store.subscriptions();
    let subscribed_before = *subscriptions.borrow_and_update();
    let mut receiver = store.subscribe();

    let before = envelope("alice", "bob", "before");
    store.deposit(&before, 1_000).await?;

    // Killed (like a crash) and started again on the same port, between two operations.
    backend.server.restart()?;

    // The very next operation succeeds: the store reconnects (and retries) by itself.
    let after = envelope("alice", "bob", "after");
    store.deposit(&after, 2_000).await?;
    let fetched = store.fetch(&user("bob"), 10, usize::MAX, 3_000).await?;
    ensure!(ids(&fetched.mail) == vec![before.id, after.id]);

    // The subscriber notices the loss and subscribes again by itself.
    tokio::time::timeout(
        EVENT_TIMEOUT,
        subscriptions.wait_for(|count| *count > subscribed_before),
    )
    .await
    .context("no re-subscription after the restart")??;
    let event = Broadcast::Announcement {
        text: "back".to_owned(),
    };
    store.publish(&event).await?;
    ensure!(next_event(&mut receiver).await? == event);
    Ok(())
}

#[tokio::test]
async fn mail_of_the_old_layout_is_read_and_migrated_on_first_fetch() -> anyhow::Result<()> {
    let backend = RedisBackend::start().await?;
    let store = &backend.store;
    let bob = user("bob");
    let old: Vec<_> = (0..2)
        .map(|n| envelope("alice", "bob", &n.to_string()))
        .collect();
    // Written as the layout before mail keys did: members and fields of the id alone.
    let mut raw = backend.raw().await?;
    for (sequence, message) in old.iter().enumerate() {
        let value = proto::wire::encode(&store::StoredMail {
            envelope: message.clone(),
            deposited_at_ms: 1_000,
        })?;
        let _: u64 = raw
            .zadd(
                "p2pchat:{bob}:mail",
                &message.id.0[..],
                sequence as f64 + 1.0,
            )
            .await?;
        let _: u64 = raw
            .hset("p2pchat:{bob}:mail:data", &message.id.0[..], value.as_ref())
            .await?;
    }
    let _: () = raw.set("p2pchat:{bob}:mail:seq", 2).await?;
    // The sender retransmits the first before the recipient fetches: stored under its new
    // key, then merged with the old copy when the fetch migrates it.
    ensure!(store.deposit(&old[0], 1_500).await? == store::DepositOutcome::Stored);
    ensure!(store.mail_count(&bob).await? == 3);

    let fetched = store.fetch(&bob, 10, usize::MAX, 2_000).await?;
    ensure!(ids(&fetched.mail) == vec![old[0].id, old[1].id, old[0].id]);
    let members: Vec<Vec<u8>> = raw.zrange("p2pchat:{bob}:mail", 0, -1).await?;
    let new_key = |message: &proto::Envelope| [&message.id.0[..], b"alice"].concat();
    ensure!(
        members == vec![new_key(&old[1]), new_key(&old[0])],
        "{members:?}"
    );
    ensure!(store.deposit(&old[1], 2_500).await? == store::DepositOutcome::Duplicate);
    // The client acks by sender and id, and each message goes once.
    ensure!(store.ack(&bob, &refs(&fetched.mail[..2])).await? == 2);
    ensure!(store.mail_count(&bob).await? == 0);
    ensure!(!raw.exists::<_, bool>("p2pchat:{bob}:mail:bytes").await?);
    Ok(())
}

#[tokio::test]
async fn undecodable_mail_is_skipped_and_quarantined() -> anyhow::Result<()> {
    let backend = RedisBackend::start().await?;
    let store = &backend.store;
    let bob = user("bob");
    let sent: Vec<_> = (0..3)
        .map(|n| envelope("alice", "bob", &n.to_string()))
        .collect();
    for message in &sent {
        store.deposit(message, 1_000).await?;
    }
    // Garbage in place of the middle message, and an id whose value is gone.
    let mut raw = backend.raw().await?;
    let middle_key = [&sent[1].id.0[..], b"alice"].concat();
    let _: u64 = raw
        .hset(
            "p2pchat:{bob}:mail:data",
            &middle_key,
            &b"\xff\xffnot postcard"[..],
        )
        .await?;
    let _: u64 = raw
        .zadd("p2pchat:{bob}:mail", &b"dangling-id"[..], 1.5)
        .await?;

    let fetched = store.fetch(&bob, 10, usize::MAX, 2_000).await?;
    ensure!(
        ids(&fetched.mail) == vec![sent[0].id, sent[2].id],
        "{fetched:?}"
    );
    ensure!(fetched.remaining == 0);
    ensure!(store.mail_count(&bob).await? == 2);
    // Kept aside for an operator, not silently lost.
    let quarantined: BTreeMap<Vec<u8>, Vec<u8>> =
        raw.hgetall("p2pchat:{bob}:mail:quarantine").await?;
    ensure!(quarantined.len() == 1 && quarantined.contains_key(&middle_key));

    // Garbage presence reads as absent rather than failing.
    let _: u64 = raw
        .hset("p2pchat:{bob}:presence", "value", "garbage")
        .await?;
    ensure!(store.presence(&bob).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn batches_larger_than_a_script_chunk_keep_order() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let limits = MailLimits {
        cap: 5_000,
        max_bytes: 64 << 20,
        ttl_ms: 60_000,
    };
    let store: Store = RedisStore::connect(&server.url(), limits).await?.into();
    let bob = user("bob");
    let sent: Vec<_> = (0..1_500)
        .map(|n| envelope("alice", "bob", &n.to_string()))
        .collect();
    // Deposited one after another (order is deposit order), but pipelined 100 at a time
    // would reorder; so sequential here.
    for message in &sent {
        store.deposit(message, 1_000).await?;
    }
    let batch = store.fetch(&bob, 1_000, usize::MAX, 2_000).await?;
    ensure!(ids(&batch.mail) == sent[..1_000].iter().map(|m| m.id).collect::<Vec<_>>());
    ensure!(batch.remaining == 500);
    ensure!(store.ack(&bob, &refs(&batch.mail)).await? == 1_000);
    let rest = store.fetch(&bob, 1_000, usize::MAX, 2_000).await?;
    ensure!(ids(&rest.mail) == sent[1_000..].iter().map(|m| m.id).collect::<Vec<_>>());
    // Concurrent acks of disjoint halves.
    let halves: Vec<Vec<proto::MailRef>> =
        refs(&rest.mail).chunks(250).map(<[_]>::to_vec).collect();
    let removed = try_join_all(halves.iter().map(|half| store.ack(&bob, half))).await?;
    ensure!(removed.iter().sum::<u64>() == 500);
    Ok(())
}

/// Every key name and every value in the Redis, whatever its type.
pub async fn dump_everything(
    raw: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(100)
            .query_async(raw)
            .await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut everything = keys.clone();
    for key in &keys {
        let kind: String = redis::cmd("TYPE").arg(key).query_async(raw).await?;
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET").arg(key).query_async(raw).await?],
            "hash" => redis::cmd("HGETALL").arg(key).query_async(raw).await?,
            "set" => redis::cmd("SMEMBERS").arg(key).query_async(raw).await?,
            "list" => {
                redis::cmd("LRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .query_async(raw)
                    .await?
            }
            "zset" => {
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(raw)
                    .await?
            }
            "none" => Vec::new(),
            other => anyhow::bail!("unexpected key type {other} at {key:?}"),
        };
        everything.extend(values);
    }
    Ok(everything)
}

#[tokio::test]
async fn redis_holds_no_plaintext() -> anyhow::Result<()> {
    let backend = RedisBackend::start().await?;
    let raw = backend.raw().await?;
    store_holds_no_plaintext(&backend.store, vec![raw]).await
}

/// Stores everything a server would about two users (bindings, presence, a block, a sealed
/// message, fetched once), then reads every key and value on every node of `raw`: the
/// sealed token is there, its plaintext is nowhere.
pub async fn store_holds_no_plaintext(
    store: &Store,
    raw: Vec<redis::aio::MultiplexedConnection>,
) -> anyhow::Result<()> {
    let (alice, bob) = (user("alice"), user("bob"));
    let alice_identity = Identity::generate();
    let bob_identity = Identity::generate();
    let channel = Channel::new(&alice_identity, &alice, &bob, bob_identity.public())?;
    let marker = "MARKER-xyz";
    let sealed = channel.seal(MessageId::random(), &format!("secret {marker} text"), 1_000)?;

    // Everything a server would store about the two of them.
    for (name, identity) in [(&alice, &alice_identity), (&bob, &bob_identity)] {
        store
            .bind(&Binding {
                user: name.clone(),
                keys: identity.public().clone(),
                bound_at_ms: 1_000,
            })
            .await?;
        store
            .set_presence(&Presence {
                user: name.clone(),
                session: 1,
                addresses: vec!["127.0.0.1:4000".parse()?],
                last_seen_ms: 1_000,
                expires_at_ms: 31_000,
            })
            .await?;
    }
    store.block(&bob, &user("mallory")).await?;
    store.deposit(&sealed, 1_000).await?;
    store.fetch(&bob, 10, usize::MAX, 1_000).await?; // a fetch leaves nothing readable behind either

    let mut everything = Vec::new();
    for mut node in raw {
        everything.extend(dump_everything(&mut node).await?);
    }
    // The dump is not vacuous: the ciphertext itself is in there.
    let token = sealed.token.as_slice();
    ensure!(
        everything.iter().any(|value| contains(value, token)),
        "the sealed token was not found: the dump misses the mailbox"
    );
    for value in &everything {
        ensure!(
            !contains(value, marker.as_bytes()),
            "plaintext marker found in Redis: {:?}",
            String::from_utf8_lossy(value)
        );
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Regression: the online index entries of heartbeats are sent in batches, at most 50 ms
/// after they were queued, and an instance that died before its batch was sent took a
/// user's first entry with it: the lapse sweep, which reads only the index, never found
/// the user, so their contacts were never told they went offline. A registration now
/// returns only once its entry was sent, so another instance finds the user lapsed even
/// when the registering instance is gone right after.
#[tokio::test]
async fn a_registration_is_found_lapsed_after_its_instance_dies_at_once() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let dying: Store = RedisStore::connect(&server.url(), LIMITS).await?.into();
    let presence = Presence {
        user: user("alice"),
        session: 7,
        addresses: vec!["127.0.0.1:4000".parse()?],
        last_seen_ms: 1_000,
        expires_at_ms: 31_000,
    };
    dying.register_presence(&presence).await?;
    // The instance dies: its queued index changes go with it.
    drop(dying);
    let other: Store = RedisStore::connect(&server.url(), LIMITS).await?.into();
    ensure!(
        other.lapsed(30_000, 40_000).await? == vec![user("alice")],
        "the registration's index entry was not written before it returned"
    );
    Ok(())
}
