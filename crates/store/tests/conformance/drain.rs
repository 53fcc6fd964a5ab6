//! A rough drain measurement, not a timed test (numbers belong to
//! `p2pchat-bench`): `cargo test --release -p store -- --ignored --nocapture drain`.
//! It fills one mailbox with 100,000 messages and drains it in batches of 1,000, fetch then
//! ack, and prints the rate; it asserts only that everything came out once, in order.

use std::time::{Duration, Instant};

use anyhow::ensure;
use futures::{StreamExt, TryStreamExt, stream};
use store::{EmbeddedStore, MailLimits, RedisStore, Store, testing::RedisServer};

use crate::util::{envelope, refs, user};

const MESSAGES: usize = 100_000;
const BATCH: usize = 1_000;
const LIMITS: MailLimits = MailLimits {
    cap: MESSAGES as u64,
    max_bytes: 64 << 20,
    ttl_ms: 60_000,
};

async fn fill_and_drain(store: &Store, label: &str, concurrency: usize) -> anyhow::Result<()> {
    let bob = user("bob");
    let sent: Vec<_> = (0..MESSAGES)
        .map(|n| envelope("alice", "bob", &format!("{n:0>120}")))
        .collect();
    let started = Instant::now();
    stream::iter(sent.iter().map(|message| store.deposit(message, 1_000)))
        .buffered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let filled = started.elapsed();
    ensure!(store.mail_count(&bob).await? == MESSAGES as u64);

    let started = Instant::now();
    let mut drained = 0;
    let (mut fetching, mut acking) = (Duration::ZERO, Duration::ZERO);
    loop {
        let fetch_started = Instant::now();
        let batch = store.fetch(&bob, BATCH, usize::MAX, 2_000).await?;
        fetching += fetch_started.elapsed();
        if batch.mail.is_empty() {
            break;
        }
        let ack_started = Instant::now();
        drained += store.ack(&bob, &refs(&batch.mail)).await?;
        acking += ack_started.elapsed();
    }
    let elapsed = started.elapsed();
    ensure!(drained == MESSAGES as u64);
    println!(
        "{label}: filled {MESSAGES} in {filled:?} ({:.0} msg/s); drained in {elapsed:?} = {:.0} msg/s (fetch {fetching:?}, ack {acking:?})",
        MESSAGES as f64 / filled.as_secs_f64(),
        MESSAGES as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn drain_redis() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let store: Store = RedisStore::connect(&server.url(), LIMITS).await?.into();
    fill_and_drain(&store, "redis", 256).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn drain_embedded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store: Store = EmbeddedStore::open(dir.path().join("store.redb"), LIMITS)?.into();
    fill_and_drain(&store, "embedded", 64).await
}
