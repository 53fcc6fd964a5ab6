//! The child processes the benchmarks start, as hidden subcommands of `p2pchat-bench`
//! itself, so that their memory and open files are their own:
//!
//! - [`serve_discovery`]: the real [`discovery::serve`] on a free loopback port, over an
//!   embedded store in a given folder or over Redis. It prints `listening <addr>` and runs
//!   until its standard input closes.
//! - [`load_worker`]: many [`ControlClient`]s from one loopback source address, each
//!   registered and heartbeating. It prints `ready <registered> <failed>`, answers each
//!   `status` line with `status <alive> <answered> <pongs>`, and stops when its input closes.
//!
//! Closing standard input is the stop signal, so a child never outlives the benchmark.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use discovery::{Config, Metrics};
use futures::StreamExt;
use proto::{Identity, Reply, Request, Username};
use store::{EmbeddedStore, MailLimits, RedisStore, Store};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{BenchError, control::ControlClient, discovery_load::StoreTimes, system};

/// What [`serve_discovery`] serves from.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The embedded store's folder (used when `redis` is `None`).
    pub data_dir: PathBuf,
    /// A Redis URL to use instead of the embedded store.
    pub redis: Option<String>,
    /// The most messages one mailbox holds.
    pub mail_cap: u64,
}

/// Runs the discovery server until standard input closes (see the module docs).
pub async fn serve_discovery(options: ServeOptions) -> Result<(), BenchError> {
    system::raise_open_file_limit()?;
    let limits = MailLimits {
        cap: options.mail_cap,
        max_bytes: 64 << 20,
        ..MailLimits::default()
    };
    let store = match &options.redis {
        Some(url) => Store::Redis(RedisStore::connect(url, limits).await?),
        None => Store::Embedded(EmbeddedStore::open(
            options.data_dir.join("store.redb"),
            limits,
        )?),
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    println!("listening {}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    tokio::spawn(answer_until_eof(shutdown.clone(), metrics.clone()));
    // The load's clients come from a handful of loopback addresses (10,000 clients on each),
    // standing for as many machines: the per-IP limits would refuse them, so they are
    // lifted here; the rest of the configuration is the default.
    let config = Config {
        per_ip_connections: usize::MAX,
        per_ip_requests_per_second: u32::MAX,
        per_ip_request_burst: u32::MAX,
        per_ip_new_names_per_hour: u32::MAX,
        ..Config::default()
    };
    discovery::serve(listener, store, config, metrics, shutdown).await?;
    Ok(())
}

/// Answers each `store-times` line on standard input with the server's store-time
/// histograms ([`StoreTimes::line`]); cancels `shutdown` when standard input closes.
async fn answer_until_eof(shutdown: CancellationToken, metrics: Arc<Metrics>) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() == "store-times" {
            let times = StoreTimes {
                heartbeat: metrics.store_heartbeat.buckets(),
                lookup: metrics.store_lookup.buckets(),
            };
            println!("{}", times.line());
        }
    }
    shutdown.cancel();
}

/// What [`load_worker`] does.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The discovery server.
    pub server: SocketAddr,
    /// The first client's number (clients are named `load<number>`).
    pub first: usize,
    /// How many clients.
    pub count: usize,
    /// The loopback address the clients connect from.
    pub source: Ipv4Addr,
    /// How often each client sends a heartbeat.
    pub heartbeat: Duration,
}

/// How many clients connect and register at the same time.
const CONNECT_CONCURRENCY: usize = 128;
/// How long the whole connect phase may take.
const CONNECT_BUDGET: Duration = Duration::from_secs(240);

/// The name of load client number `number`.
pub fn load_user(number: usize) -> Username {
    // `load` and digits are always a valid name.
    Username::new(&format!("load{number}")).unwrap_or_else(|_| unreachable!("valid by shape"))
}

/// Counters the heartbeat tasks share.
#[derive(Debug, Default)]
struct Liveness {
    alive: AtomicUsize,
    answered: AtomicUsize,
    pongs: AtomicU64,
}

/// Connects, registers and heartbeats `options.count` clients (see the module docs).
pub async fn load_worker(options: WorkerOptions) -> Result<(), BenchError> {
    system::raise_open_file_limit()?;
    // One identity for all of this worker's names: the server binds each name to it, and
    // every registration still signs its own challenge.
    let identity = Arc::new(Identity::generate());
    let liveness = Arc::new(Liveness::default());
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut registered = 0usize;
    let mut failed = 0usize;
    // Each client heartbeats from its own registration on, as a real client does: a
    // client that waited for the whole worker to register would find its presence
    // expired whenever registering them all takes longer than the presence timeout.
    let connect_all = futures::stream::iter(0..options.count)
        .map(|offset| {
            let identity = Arc::clone(&identity);
            let user = load_user(options.first + offset);
            async move {
                let mut client =
                    ControlClient::connect(options.server, Some(options.source)).await?;
                client.register(&identity, &user).await?;
                Ok::<_, BenchError>(client)
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .for_each(|result| {
            match result {
                Ok(client) => {
                    registered += 1;
                    liveness.alive.fetch_add(1, Ordering::Relaxed);
                    tracker.spawn(heartbeat(
                        client,
                        options.heartbeat,
                        Arc::clone(&liveness),
                        shutdown.clone(),
                    ));
                }
                Err(error) => {
                    if failed == 0 {
                        eprintln!("load-worker: a client failed: {error}");
                    }
                    failed += 1;
                }
            }
            std::future::ready(())
        });
    if tokio::time::timeout(CONNECT_BUDGET, connect_all)
        .await
        .is_err()
    {
        shutdown.cancel();
        return Err(BenchError::Timeout(format!(
            "connecting within {CONNECT_BUDGET:?}"
        )));
    }
    println!("ready {registered} {failed}");
    tracker.close();

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() == "status" {
            println!(
                "status {} {} {}",
                liveness.alive.load(Ordering::Relaxed),
                liveness.answered.load(Ordering::Relaxed),
                liveness.pongs.load(Ordering::Relaxed)
            );
        }
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    Ok(())
}

/// Sends a heartbeat every `interval` (the first one interval after registering, as a
/// real client does) until cancelled or the connection fails.
async fn heartbeat(
    mut client: ControlClient,
    interval: Duration,
    liveness: Arc<Liveness>,
    shutdown: CancellationToken,
) {
    let mut next = tokio::time::Instant::now() + interval;
    let mut answered = false;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep_until(next) => {}
        }
        next += interval;
        let pong = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            reply = client.request(Request::Heartbeat) => reply,
        };
        match pong {
            Ok(Reply::Pong) => {
                liveness.pongs.fetch_add(1, Ordering::Relaxed);
                if !answered {
                    answered = true;
                    liveness.answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(other) => {
                eprintln!("load-worker: heartbeat answered with {other:?}");
                break;
            }
            Err(error) => {
                eprintln!("load-worker: heartbeat failed: {error}");
                break;
            }
        }
    }
    liveness.alive.fetch_sub(1, Ordering::Relaxed);
}
