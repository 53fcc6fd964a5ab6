//! Mailbox drain: 100,000 sealed messages queued for one user, drained by that user's
//! login over the real control protocol (register, then `Fetch` and `Ack` until empty)
//! against the real discovery server, on the embedded store, on one Redis and on a Redis
//! Cluster; against `redis-benchmark -P 32` LPUSH/RPOP on this machine (on a cluster, the
//! `cluster` group sets the same row on one Redis as the reference instead: one user's
//! mailbox is one slot, so `redis-benchmark` on one node says nothing new).
//!
//! The mailbox is filled through the store's own `deposit` (not timed). For the embedded
//! store it is filled on tmpfs and the file is then copied to disk, because filling means
//! 100,000 durable commits that would take minutes on this disk and are not the figure;
//! the drain itself runs on disk, with its durable acks. The drain client pipelines: it
//! sends the ack of one batch and the fetch of the next together, so one round trip per
//! batch. It receives and acks; it does not open the envelopes (see the Fernet ceiling for
//! that cost) nor store them (the peer runtime does, durably).

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use proto::{Envelope, Identity, Reply, Request, Username};
use store::{Binding, EmbeddedStore, MailLimits, RedisStore, Store};

use crate::{
    Bench, BenchError, Row, Target,
    control::ControlClient,
    direct::BODY,
    discovery_load,
    redis_ref::{self, Redis, RedisKind},
};

/// Which store the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded (redb) store in a folder on disk.
    Embedded,
    /// Redis: one server or a cluster.
    Redis(RedisKind),
}

/// Envelopes asked for per fetch (the server may send fewer to fit a frame).
const FETCH_MAX: u32 = 1_000;
/// How long filling the mailbox may take before the benchmark gives up.
const FILL_BUDGET: Duration = Duration::from_secs(300);
/// How long the drain may take before the benchmark gives up.
const DRAIN_BUDGET: Duration = Duration::from_secs(180);

/// Measures the drain row for `backend` (see the module docs).
pub async fn rows(bench: &Bench, backend: Backend) -> Result<Vec<Row>, BenchError> {
    let count = bench.mode.pick(100_000, 500);
    let limits = MailLimits {
        cap: count as u64 + 1_000,
        max_bytes: 64 << 20,
        ..MailLimits::default()
    };
    let bob = Username::new("bob").unwrap_or_else(|_| unreachable!("valid"));
    let bob_identity = Identity::generate();
    let envelopes = seal_for(&bob, &bob_identity, count).await?;
    let binding = Binding {
        user: bob.clone(),
        keys: bob_identity.public().clone(),
        bound_at_ms: proto::now_ms(),
    };

    let disk = tempfile::Builder::new()
        .prefix("p2pchat-bench-mailbox-")
        .tempdir()?;
    let redis = match backend {
        Backend::Redis(kind) => Some(Redis::start(kind).await?),
        Backend::Embedded => None,
    };
    let fill_started = Instant::now();
    match &redis {
        Some(redis) => {
            let store = Store::Redis(RedisStore::connect(&redis.url(), limits).await?);
            fill(&store, &binding, &envelopes, 256).await?;
        }
        None => {
            let tmpfs = tempfile::Builder::new()
                .prefix("p2pchat-bench-fill-")
                .tempdir_in(discovery_load::tmpfs_or_temp())?;
            let file = tmpfs.path().join("store.redb");
            {
                let store = Store::Embedded(EmbeddedStore::open(&file, limits)?);
                fill(&store, &binding, &envelopes, 64).await?;
            }
            let target = disk.path().join("store.redb");
            std::fs::copy(&file, &target)?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    let fill_time = fill_started.elapsed();
    drop(envelopes);

    let url = redis.as_ref().map(|redis| redis.url());
    let server =
        discovery_load::spawn_server(bench, disk.path(), url.as_deref(), limits.cap).await?;
    let drained = drain(server.address, &bob, &bob_identity, count).await;
    server.child.stop(Duration::from_secs(10)).await;
    let (drained, batches, elapsed) = drained?;

    let (name, target) = match backend {
        Backend::Embedded => ("mailbox drain (embedded store)".to_owned(), 150_000.0),
        Backend::Redis(RedisKind::One) => ("mailbox drain (Redis)".to_owned(), 100_000.0),
        Backend::Redis(kind) => (format!("mailbox drain ({})", kind.label()), 100_000.0),
    };
    let row = Row::new(
        format!("{name}, {count} messages"),
        drained as f64 / elapsed.as_secs_f64(),
        "msg/s",
        Target::AtLeast(target),
    );
    let note = format!(
        "{drained} messages drained in {batches} fetch+ack round trips ({:.0} per batch) in {:.2} s (filled in {:.1} s, not timed)",
        drained as f64 / batches.max(1) as f64,
        elapsed.as_secs_f64(),
        fill_time.as_secs_f64(),
    );
    // The reference: on the same Redis for the Redis row, on a fresh one for the embedded
    // store; none on a cluster (see the module docs).
    let reference = match redis {
        Some(Redis::One(server)) => server,
        Some(Redis::Cluster(_)) => {
            return Ok(vec![row.with_note(format!(
                "{note}; bob's mailbox is one slot, so one master serves the whole drain."
            ))]);
        }
        None => redis_ref::start_redis()?,
    };
    let figures = redis_ref::redis_benchmark(
        &reference,
        "lpush,rpop",
        50,
        32,
        bench.mode.pick(1_000_000, 2_000),
    )
    .await?;
    let rpop = figures
        .get("RPOP")
        .copied()
        .ok_or_else(|| BenchError::Child("redis-benchmark printed no RPOP figure".into()))?;
    let lpush = figures.get("LPUSH").map_or(f64::NAN, |figure| figure.rps);
    Ok(vec![
        row.with_reference("redis-benchmark -P 32 RPOP", rpop.rps)
            .with_note(format!(
                "{note}; redis-benchmark -c 50 -P 32: LPUSH {} /s, RPOP {} /s.",
                crate::report::number(lpush),
                crate::report::number(rpop.rps),
            )),
    ])
}

/// `count` envelopes from alice to `bob`, sealed by the ratchet as a real client seals them.
async fn seal_for(
    bob: &Username,
    bob_identity: &Identity,
    count: usize,
) -> Result<Vec<Envelope>, BenchError> {
    let alice = Username::new("alice").unwrap_or_else(|_| unreachable!("valid"));
    let (mut sender, _) =
        crate::direct::start_conversation((&Identity::generate(), &alice), (bob_identity, bob))?;
    tokio::task::spawn_blocking(move || {
        (0..count)
            .map(|_| sender.seal(BODY))
            .collect::<Result<Vec<_>, BenchError>>()
    })
    .await
    .map_err(|error| BenchError::Protocol(format!("sealing task: {error}")))?
}

/// Binds bob's name and deposits every envelope, `concurrency` at a time.
async fn fill(
    store: &Store,
    binding: &Binding,
    envelopes: &[Envelope],
    concurrency: usize,
) -> Result<(), BenchError> {
    store.bind(binding).await?;
    let now = proto::now_ms();
    let deposits = futures::stream::iter(
        envelopes
            .iter()
            .map(|envelope| store.deposit(envelope, now)),
    )
    .buffer_unordered(concurrency)
    .try_collect::<Vec<_>>();
    tokio::time::timeout(FILL_BUDGET, deposits)
        .await
        .map_err(|_| {
            BenchError::Timeout(format!("filling the mailbox within {FILL_BUDGET:?}"))
        })??;
    let queued = store.mail_count(&binding.user).await?;
    if queued != envelopes.len() as u64 {
        return Err(BenchError::Protocol(format!(
            "queued {queued} of {} messages",
            envelopes.len()
        )));
    }
    Ok(())
}

/// Logs in as `bob` and drains the mailbox: returns messages drained, round trips, time.
async fn drain(
    server: std::net::SocketAddr,
    bob: &Username,
    identity: &Identity,
    expected: usize,
) -> Result<(usize, usize, Duration), BenchError> {
    let mut client = ControlClient::connect(server, None).await?;
    let started = Instant::now();
    client.register(identity, bob).await?;
    let work = async {
        let (mut drained, mut batches) = (0usize, 0usize);
        client.send(Request::Fetch { max: FETCH_MAX }).await?;
        // Bounded: never more round trips than messages, plus one.
        for _ in 0..=expected {
            let (envelopes, remaining) = match client.recv().await? {
                (
                    _,
                    Ok(Reply::Mail {
                        envelopes,
                        remaining,
                    }),
                ) => (envelopes, remaining),
                (_, other) => {
                    return Err(BenchError::Protocol(format!(
                        "expected mail, got {other:?}"
                    )));
                }
            };
            if envelopes.is_empty() {
                break;
            }
            batches += 1;
            let mail = envelopes.iter().map(proto::MailRef::of).collect();
            client.send(Request::AckMail { mail }).await?;
            if remaining > 0 {
                client.send(Request::Fetch { max: FETCH_MAX }).await?;
            }
            match client.recv().await? {
                (_, Ok(Reply::Acked { removed })) => drained += removed as usize,
                (_, other) => {
                    return Err(BenchError::Protocol(format!(
                        "expected acked, got {other:?}"
                    )));
                }
            }
            if remaining == 0 {
                break;
            }
        }
        Ok::<_, BenchError>((drained, batches))
    };
    let (drained, batches) = tokio::time::timeout(DRAIN_BUDGET, work)
        .await
        .map_err(|_| BenchError::Timeout(format!("draining within {DRAIN_BUDGET:?}")))??;
    let elapsed = started.elapsed();
    if drained != expected {
        return Err(BenchError::Protocol(format!(
            "drained {drained} of {expected} messages"
        )));
    }
    Ok((drained, batches, elapsed))
}
