//! Discovery instances on a Redis Cluster of 3 masters and 3 replicas (test-started local
//! `redis-server`s): chat, relayed mail, announcements and contacts' presence across two
//! instances, and a master's death in the middle of a stream of deposits. The servers are the real binary
//! and in-process ones over `store::Store::Redis`; the clients are peer runtimes, as in
//! `chat`.

use std::{collections::HashSet, time::Duration};

use anyhow::{Context as _, ensure};
use peer::{DeliveryStatus, Event};
use proto::MessageId;
use store::{RedisStore, Store, testing::RedisCluster};

use crate::{
    chat::{Chatter, Server, WAIT, any_port, config, dead_port, name},
    util::Discovery,
};

/// A store on `cluster` with the default limits, as a discovery instance has.
async fn cluster_store(cluster: &RedisCluster) -> anyhow::Result<Store> {
    let store = RedisStore::connect(&cluster.url(), store::MailLimits::default()).await?;
    ensure!(store.is_cluster(), "the store did not detect the cluster");
    Ok(store.into())
}

async fn start_cluster() -> anyhow::Result<RedisCluster> {
    Ok(tokio::task::spawn_blocking(RedisCluster::start).await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_cluster_chat_relay_mail_and_announce() -> anyhow::Result<()> {
    let cluster = start_cluster().await?;
    let root = tempfile::tempdir()?;
    // One instance is the real binary, given every node's URL; the other runs in process.
    let urls = cluster.url();
    let first = tokio::task::spawn_blocking(move || Discovery::start_with(Some(urls))).await?;
    ensure!(
        first.log().contains("redis backend: cluster mode"),
        "no word of cluster mode at start:\n{}",
        first.log()
    );
    let first_addr = first.address;
    let second = Server::start_on(cluster_store(&cluster).await?, any_port()).await?;

    let mut alice = Chatter::join(root.path(), "alice", first_addr).await?;
    let mut bob = Chatter::join(root.path(), "bob", second.addr).await?;
    // Found through the cluster, delivered directly.
    assert_eq!(
        alice.send("bob", "across instances").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("alice", "across instances").await?;
    // Having talked, each watches the other: their presence goes between the instances
    // over each one's sharded channel.
    for (chatter, contact) in [(&mut alice, "bob"), (&mut bob, "alice")] {
        chatter
            .wait_for("a contact online", |event| match event {
                Event::Presence { user, online: true } if user == &name(contact) => Some(()),
                _ => None,
            })
            .await?;
    }

    // Carol is reachable only through the relay, and only the push can bring her mail in
    // time: it goes from alice's instance to carol's over carol's sharded channel.
    let mut carol_config = config(root.path(), "carol", second.addr);
    carol_config.advertise_port = Some(dead_port().await?);
    carol_config.mail_poll_interval = Duration::from_secs(3600);
    let mut carol = Chatter::start(carol_config).await?;
    assert_eq!(
        alice.send("carol", "through the relay").await?,
        DeliveryStatus::Queued {
            recipient_online: true
        }
    );
    carol.expect("alice", "through the relay").await?;

    // Dave is offline: his mail waits in the cluster and comes when he logs in, on the
    // other instance than the sender's.
    let dave = Chatter::join(root.path(), "dave", second.addr).await?;
    dave.stop().await;
    assert_eq!(
        alice.send("dave", "while you were away").await?,
        DeliveryStatus::Queued {
            recipient_online: false
        }
    );
    let mut dave = Chatter::join(root.path(), "dave", first_addr).await?;
    dave.expect("alice", "while you were away").await?;

    // The operator's announcement, made at one instance, reaches the clients of both.
    let first = tokio::task::spawn_blocking(move || {
        let output = first.announce("maintenance at noon");
        (first, output)
    })
    .await?;
    let (first, output) = first;
    ensure!(output.status.success(), "announce failed: {output:?}");
    for chatter in [&mut alice, &mut bob] {
        let text = chatter
            .wait_for("the announcement", |event| match event {
                Event::Announcement { text, .. } => Some(text.clone()),
                _ => None,
            })
            .await?;
        assert_eq!(text, "maintenance at noon");
    }

    bob.stop().await;
    alice
        .wait_for("bob offline", |event| match event {
            Event::Presence {
                user,
                online: false,
            } if user == &name("bob") => Some(()),
            _ => None,
        })
        .await?;
    for chatter in [alice, carol, dave] {
        chatter.stop().await;
    }
    drop(first);
    second.stop().await
}

/// A stream of messages to an offline user; the master holding his slot is SIGKILLed in
/// the middle, its replica promoted, and the dead node restarted (it rejoins as a replica).
/// Deposits refused meanwhile (`unavailable`) stay in the sender's outbox and go again;
/// afterwards the user fetches every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masters_death_mid_stream_loses_no_mail_and_shows_none_twice() -> anyhow::Result<()> {
    const MESSAGES: usize = 40;
    const KILL_AFTER: usize = 10;
    let cluster = start_cluster().await?;
    let root = tempfile::tempdir()?;
    let server = Server::start_on(cluster_store(&cluster).await?, any_port()).await?;
    let bob = Chatter::join(root.path(), "bob", server.addr).await?;
    bob.stop().await;

    let mut alice_config = config(root.path(), "alice", server.addr);
    // The outbox is retried on this timer (the control connection stays up meanwhile).
    alice_config.mail_poll_interval = Duration::from_millis(300);
    let mut alice = Chatter::start(alice_config).await?;
    let master = cluster.master_of("p2pchat:{bob}:mail")?;
    let mut cluster = Some(cluster);
    let mut queued = HashSet::new();
    let mut waiting = HashSet::new();
    let mut recovery = None;
    for index in 0..MESSAGES {
        if index == KILL_AFTER {
            let mut cluster = cluster.take().context("the master is killed once")?;
            cluster.kill(master)?;
            recovery = Some(tokio::task::spawn_blocking(move || {
                cluster.wait_for_failover("p2pchat:{bob}:mail", master)?;
                cluster.restart(master)?;
                Ok::<_, std::io::Error>(cluster)
            }));
        }
        let report = alice
            .client
            .send(&name("bob"), &format!("message {index}"))
            .await?;
        match report.status {
            DeliveryStatus::Queued { .. } => queued.insert(report.id),
            DeliveryStatus::Failed {
                will_retry: true, ..
            } => waiting.insert(report.id),
            other => anyhow::bail!("message {index}: {other:?}"),
        };
    }
    let cluster = recovery.context("the master was never killed")?.await??;
    ensure!(cluster.master_of("p2pchat:{bob}:mail")? != master);
    ensure!(
        !waiting.is_empty(),
        "no deposit was refused: the kill came too late to test much"
    );
    // Every refused message goes again from the outbox and is queued.
    while !waiting.is_empty() {
        let id: MessageId = alice
            .wait_for("an outbox retry", |event| match event {
                Event::Delivery {
                    id,
                    status: DeliveryStatus::Queued { .. },
                    ..
                } => Some(*id),
                _ => None,
            })
            .await?;
        if waiting.remove(&id) {
            queued.insert(id);
        }
    }
    ensure!(queued.len() == MESSAGES);

    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    let mut shown = Vec::new();
    for _ in 0..MESSAGES {
        shown.push(bob.message().await?.body);
    }
    // A direct message after the mail: nothing shown twice came in between.
    assert_eq!(
        alice.send("bob", "the end").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("alice", "the end").await?;
    shown.sort();
    let mut expected: Vec<String> = (0..MESSAGES)
        .map(|index| format!("message {index}"))
        .collect();
    expected.sort();
    assert_eq!(shown, expected, "every message shown exactly once");

    alice.stop().await;
    bob.stop().await;
    drop(cluster);
    tokio::time::timeout(WAIT, server.stop()).await?
}
