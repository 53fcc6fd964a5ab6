//! Behaviours specific to a Redis Cluster: detecting it, where keys and hints go, what the
//! nodes may see, and a master's death in the middle of a stream of deposits.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use proto::{Envelope, MessageId};
use store::{
    Broadcast, DepositOutcome, MailLimits, Presence, RedisConfigError, RedisOptions, RedisStore,
    Store, StoreError,
    testing::{RedisCluster, RedisServer},
};

use crate::{
    redis_only::{dump_everything, store_holds_no_plaintext},
    util::{ClusterBackend, LIMITS, envelope, expect_events, ids, next_event, user},
};

/// How long the failover test may take to get every message reported queued.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);
/// The pause before a refused deposit is tried again (a client retries from its outbox).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

fn presence(name: &str, session: u64) -> Presence {
    Presence {
        user: user(name),
        session,
        addresses: vec!["127.0.0.1:4000".parse().expect("a literal address")],
        last_seen_ms: 1_000,
        expires_at_ms: 31_000,
    }
}

#[tokio::test]
async fn bad_url_lists_are_refused_with_a_clear_error() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    for urls in ["", " , ", &format!("{},", server.url())] {
        match RedisStore::connect(urls, LIMITS).await {
            Err(StoreError::Config(
                error @ (RedisConfigError::NoUrl | RedisConfigError::EmptyUrl { .. }),
            )) => ensure!(error.to_string().contains("URL"), "{error}"),
            other => bail!("{urls:?}: expected a configuration error, got {other:?}"),
        }
    }
    // Two URLs of a server that is not a cluster node: refused, the password not shown.
    let second = RedisServer::start_with_password("hunter2-secret")?;
    let urls = format!("{},{}", second.url(), server.url());
    match RedisStore::connect(&urls, LIMITS).await {
        Err(StoreError::Config(error @ RedisConfigError::NotACluster { count: 2, .. })) => {
            let reason = error.to_string();
            ensure!(reason.contains("not a cluster node"), "{reason}");
            ensure!(!reason.contains("hunter2"), "{reason}");
        }
        other => bail!("expected a configuration error, got {other:?}"),
    }
    // One URL of a single server is the single-server mode.
    ensure!(
        !RedisStore::connect(&server.url(), LIMITS)
            .await?
            .is_cluster()
    );
    Ok(())
}

/// One node's URL is enough: the store learns the others from it, and keys of users on
/// every master work (each operation touches one slot, or it would fail with CROSSSLOT).
#[tokio::test]
async fn one_node_is_enough_to_find_the_cluster() -> anyhow::Result<()> {
    let backend = ClusterBackend::start().await?;
    let url = backend.cluster.node_url(0).context("a node")?;
    let store: Store = RedisStore::connect(&url, LIMITS).await?.into();
    let names = [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ];
    for name in names {
        store.deposit(&envelope("zed", name, name), 1_000).await?;
        store.set_presence(&presence(name, 1)).await?;
    }
    for name in names {
        ensure!(store.mail_count(&user(name)).await? == 1, "{name}");
    }
    ensure!(store.online_users(2_000).await?.len() == names.len());
    Ok(())
}

/// The Compose cluster's nodes demand a password: with it in the URLs, commands, scripts and
/// both kinds of push (announcements, routed mail-waiting hints) work.
#[tokio::test]
async fn a_password_protected_cluster_works_with_the_password_in_the_urls() -> anyhow::Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| RedisCluster::start_with_password("correct-horse-battery"))
            .await??;
    ensure!(cluster.url().contains("correct-horse-battery@"));
    let store: Store = RedisStore::connect(&cluster.url(), LIMITS).await?.into();
    let mut events = store.subscribe();
    store.set_presence(&presence("bob", 1)).await?;
    let sent = envelope("alice", "bob", "behind a password");
    store.deposit(&sent, 1_000).await?;
    let mail = Broadcast::MailWaiting { user: user("bob") };
    let announcement = Broadcast::Announcement {
        text: "hello".to_owned(),
    };
    store.publish(&mail).await?;
    store.publish(&announcement).await?;
    expect_events(&mut events, &[mail, announcement]).await?;
    let fetched = store.fetch(&user("bob"), 10, usize::MAX, 2_000).await?;
    ensure!(ids(&fetched.mail) == vec![sent.id]);
    // Without the password, connecting fails at once.
    let bare = cluster.url().replace(":correct-horse-battery@", "");
    ensure!(RedisStore::connect(&bare, LIMITS).await.is_err());
    Ok(())
}

/// Every key but the online index's buckets carries its user in a hash tag, so one user's keys share
/// one slot; and the users above are spread over more than one master.
#[tokio::test]
async fn every_key_is_tagged_by_its_user() -> anyhow::Result<()> {
    let backend = ClusterBackend::start().await?;
    let store = &backend.store;
    let names = ["alice", "bob", "carol", "dave", "erin", "frank"];
    for name in names {
        store.deposit(&envelope("zed", name, name), 1_000).await?;
        store.set_presence(&presence(name, 1)).await?;
        store.block(&user(name), &user("mallory")).await?;
    }
    let mut masters = HashSet::new();
    for name in names {
        masters.insert(
            backend
                .cluster
                .master_of(&format!("p2pchat:{{{name}}}:mail"))?,
        );
    }
    ensure!(
        masters.len() > 1,
        "all users on one master: the test proves little"
    );
    let mut keys = Vec::new();
    for mut node in backend.raw_nodes().await? {
        let found: Vec<String> = redis::cmd("KEYS")
            .arg("p2pchat:*")
            .query_async(&mut node)
            .await?;
        keys.extend(found);
    }
    ensure!(!keys.is_empty());
    for key in keys {
        if key.starts_with(store::redis_store::ONLINE_KEY_PREFIX) {
            continue;
        }
        let tagged = names
            .iter()
            .any(|name| key.starts_with(&format!("p2pchat:{{{name}}}:")));
        ensure!(tagged, "key {key} is not tagged by its user");
    }
    Ok(())
}

/// Heartbeats' writes to the online index do not all land on one master: the users'
/// buckets sit on several, and `online_users` still finds every user across them.
#[tokio::test]
async fn the_online_index_is_spread_over_the_masters() -> anyhow::Result<()> {
    let backend = ClusterBackend::start().await?;
    let store = &backend.store;
    let names: Vec<String> = (0..32).map(|index| format!("user{index}")).collect();
    let mut masters = HashSet::new();
    for name in &names {
        store.set_presence(&presence(name, 1)).await?;
        let key = store::redis_store::online_key(&user(name));
        ensure!(
            key.starts_with(store::redis_store::ONLINE_KEY_PREFIX),
            "{key}"
        );
        masters.insert(backend.cluster.master_of(&key)?);
    }
    ensure!(
        masters.len() > 1,
        "every online index bucket of 32 users is on one master"
    );
    let mut expected: Vec<_> = names.iter().map(|name| user(name)).collect();
    expected.sort();
    ensure!(store.online_users(2_000).await? == expected);
    Ok(())
}

/// A presence change for several users reaches each instance with only the users whose
/// sessions it holds, and none for a user online nowhere; a second-session notice goes
/// only where the user is.
#[tokio::test]
async fn presence_goes_only_where_each_recipient_is() -> anyhow::Result<()> {
    let backend = ClusterBackend::start().await?;
    let holder = &backend.store;
    let other = backend.another_store().await?;
    let mut at_holder = holder.subscribe();
    let mut at_other = other.subscribe();
    holder.set_presence(&presence("bob", 1)).await?;
    other.set_presence(&presence("carol", 2)).await?;
    let online = |to: Vec<&str>| Broadcast::Presence {
        user: user("alice"),
        online: true,
        to: to.into_iter().map(user).collect(),
        answer: false,
    };
    other.publish(&online(vec!["bob", "carol", "dave"])).await?;
    ensure!(next_event(&mut at_holder).await? == online(vec!["bob"]));
    ensure!(next_event(&mut at_other).await? == online(vec!["carol"]));
    let elsewhere = Broadcast::SessionElsewhere {
        user: user("bob"),
        session: 3,
        observed: "192.0.2.7:40000".parse()?,
        at_ms: 1_500,
    };
    let announcement = Broadcast::Announcement {
        text: "after the notice".to_owned(),
    };
    other.publish(&elsewhere).await?;
    ensure!(next_event(&mut at_holder).await? == elsewhere);
    let ended = Broadcast::SessionEnded {
        user: user("bob"),
        session: 4,
    };
    other.publish(&ended).await?;
    ensure!(next_event(&mut at_holder).await? == ended);
    other.publish(&announcement).await?;
    ensure!(next_event(&mut at_holder).await? == announcement);
    ensure!(
        next_event(&mut at_other).await? == announcement,
        "the other instance got the notice"
    );
    Ok(())
}

/// A mail-waiting hint reaches the instance holding the recipient's session (named in his
/// route record) and no other; an announcement reaches every instance.
#[tokio::test]
async fn mail_waiting_goes_only_where_the_recipient_is() -> anyhow::Result<()> {
    let backend = ClusterBackend::start().await?;
    let holder = &backend.store;
    let other = backend.another_store().await?;
    let mut at_holder = holder.subscribe();
    let mut at_other = other.subscribe();
    holder.set_presence(&presence("bob", 1)).await?;
    let mail = Broadcast::MailWaiting { user: user("bob") };
    let announcement = Broadcast::Announcement {
        text: "maintenance".to_owned(),
    };
    // Published from the other instance, as when the sender is connected there; the
    // announcement only once the hint has arrived where it belongs, so a hint wrongly sent
    // to the other instance too would have been sent before the announcement.
    other.publish(&mail).await?;
    ensure!(next_event(&mut at_holder).await? == mail);
    other.publish(&announcement).await?;
    ensure!(next_event(&mut at_holder).await? == announcement);
    ensure!(
        next_event(&mut at_other).await? == announcement,
        "the other instance got the hint"
    );
    // Bob's routes name one instance.
    let mut routes = Vec::new();
    for mut node in backend.raw_nodes().await? {
        let found: Vec<String> = redis::cmd("HKEYS")
            .arg("p2pchat:{bob}:routes")
            .query_async(&mut node)
            .await
            .unwrap_or_default();
        routes.extend(found);
    }
    routes.sort();
    routes.dedup();
    ensure!(routes.len() == 1, "bob's routes: {routes:?}");

    // Once his session there is cleared, the holder gets no more hints for him.
    ensure!(holder.clear_presence(&user("bob"), 1, 2_000).await?);
    other.publish(&mail).await?;
    other.publish(&announcement).await?;
    ensure!(next_event(&mut at_holder).await? == announcement);
    Ok(())
}

#[tokio::test]
async fn no_node_holds_plaintext() -> anyhow::Result<()> {
    let backend = ClusterBackend::start().await?;
    let nodes = backend.raw_nodes().await?;
    store_holds_no_plaintext(&backend.store, nodes).await?;
    // The replicas too hold the ciphertext (the dump covered them as well).
    let mut replica_values = 0;
    for mut node in backend.raw_nodes().await? {
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut node).await?;
        let is_replica =
            matches!(role.first(), Some(redis::Value::BulkString(kind)) if kind == b"slave");
        if is_replica {
            replica_values += dump_everything(&mut node).await?.len();
        }
    }
    ensure!(replica_values > 0, "no replica holds anything");
    Ok(())
}

/// A deposit is reported done only once it reached a replica: asking for more replicas
/// than the cluster has makes it fail (`NotReplicated`, which a client sees as
/// `unavailable`), and trying again is safe.
#[tokio::test]
async fn a_deposit_short_of_its_replicas_is_not_reported_stored() -> anyhow::Result<()> {
    let backend = ClusterBackend::start().await?;
    let strict: Store = RedisStore::connect_with(
        &backend.cluster.url(),
        LIMITS,
        RedisOptions { replicas: Some(2) },
    )
    .await?
    .into();
    let message = envelope("alice", "bob", "hello");
    match strict.deposit(&message, 1_000).await {
        Err(StoreError::NotReplicated { wanted: 2, reached }) => ensure!(reached <= 1),
        other => bail!("expected NotReplicated, got {other:?}"),
    }
    // With the replica the cluster has, the same deposit is confirmed (and stored once).
    ensure!(backend.store.deposit(&message, 1_000).await? == DepositOutcome::Duplicate);
    let fetched = backend
        .store
        .fetch(&user("bob"), 10, usize::MAX, 2_000)
        .await?;
    ensure!(ids(&fetched.mail) == vec![message.id]);
    Ok(())
}

/// Deposits to one offline user stream in from four senders; the master holding his slot
/// is SIGKILLed in the middle, its replica is promoted, and the dead node is restarted (it
/// rejoins as the new master's replica). Every deposit is retried until it is reported
/// done, as a client's outbox does; afterwards the mailbox holds every message exactly
/// once, in the order each sender sent them.
#[tokio::test]
async fn a_masters_death_loses_no_reported_deposit() -> anyhow::Result<()> {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 60;
    let backend = ClusterBackend::start().await?;
    let mut cluster = backend.cluster;
    // Room for every message (the suite's cap is 50).
    let limits = MailLimits {
        cap: 10_000,
        max_bytes: 64 << 20,
        ..LIMITS
    };
    let store: Store = RedisStore::connect(&cluster.url(), limits).await?.into();
    let bob = user("bob");
    let master = cluster.master_of("p2pchat:{bob}:mail")?;
    let reported = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut streams = Vec::new();
    let mut sent: Vec<Vec<Envelope>> = Vec::new();
    for sender in 0..SENDERS {
        let messages: Vec<Envelope> = (0..PER_SENDER)
            .map(|n| envelope(&format!("sender{sender}"), "bob", &n.to_string()))
            .collect();
        sent.push(messages.clone());
        let (store, reported) = (store.clone(), Arc::clone(&reported));
        streams.push(tokio::spawn(async move {
            let mut refusals = 0;
            for message in messages {
                loop {
                    match store.deposit(&message, 1_000).await {
                        Ok(_) => break,
                        Err(error) if started.elapsed() < FAILOVER_DEADLINE => {
                            tracing::debug!(%error, "deposit refused; retrying");
                            refusals += 1;
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                        Err(error) => return Err(anyhow::Error::from(error)),
                    }
                }
                reported.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<usize, anyhow::Error>(refusals)
        }));
    }
    // Kill the master a quarter of the way in, while the streams go on.
    while reported.load(Ordering::SeqCst) < SENDERS * PER_SENDER / 4 {
        ensure!(
            started.elapsed() < FAILOVER_DEADLINE,
            "the streams never got going"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill(master)?;
    let at_kill = reported.load(Ordering::SeqCst);
    ensure!(
        at_kill < SENDERS * PER_SENDER,
        "the streams ended before the kill"
    );
    // Meanwhile the replica is promoted; the new master has no replica of its own, so
    // deposits to bob stay refused (they could not reach a replica) until the dead node
    // is back, as a replica of its successor.
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_for_failover("p2pchat:{bob}:mail", master)?;
        cluster.restart(master)?;
        Ok::<_, std::io::Error>(cluster)
    })
    .await??;
    ensure!(cluster.master_of("p2pchat:{bob}:mail")? != master);
    let mut refusals = 0;
    for stream in streams {
        refusals += stream.await??;
    }
    ensure!(
        refusals > 0,
        "no deposit was refused: the kill came too late to test much"
    );

    let fetched = store.fetch(&bob, 10_000, usize::MAX, 2_000).await?;
    let got = ids(&fetched.mail);
    ensure!(fetched.remaining == 0);
    let unique: HashSet<MessageId> = got.iter().copied().collect();
    ensure!(
        unique.len() == got.len(),
        "a message is in the mailbox twice"
    );
    ensure!(
        got.len() == SENDERS * PER_SENDER,
        "{} of {} messages in the mailbox",
        got.len(),
        SENDERS * PER_SENDER
    );
    for messages in sent {
        let order: Vec<MessageId> = got
            .iter()
            .copied()
            .filter(|id| messages.iter().any(|message| message.id == *id))
            .collect();
        ensure!(
            order
                == messages
                    .iter()
                    .map(|message| message.id)
                    .collect::<Vec<_>>(),
            "one sender's messages are out of order"
        );
    }
    Ok(())
}
