//! The discovery server under load: N registered clients heartbeating, the server's memory
//! per client, and lookups per second and their p99 while that load runs, against
//! `redis-benchmark` GET at the same concurrency.
//!
//! The server is a child process (`p2pchat-bench serve-discovery`, the real
//! [`discovery::serve`]) so its resident memory is its own; its embedded store lives on
//! tmpfs (`/dev/shm`) because this figure is about connections, not about the `fsync` of
//! each first-time name binding. The clients come from child processes too
//! (`p2pchat-bench load-worker`), each from its own loopback source address (127.0.0.2,
//! 127.0.0.3, ...) so they never run out of ephemeral ports, and each with its own
//! open-file limit. The lookup clients run in this process.
//!
//! [`tier_rows`] is the same load over several instances sharing one Redis deployment
//! (enough of them to hold the goal under the per-process open-file limit), with where the
//! CPU went; the `cluster` group runs it on one Redis and on a Redis Cluster.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use proto::{Identity, Reply, Request, Username};
use tokio::process::Command;

use crate::{
    Bench, BenchError, Row, Target,
    control::ControlClient,
    redis_ref::{self, Redis},
    roles,
    stats::Latencies,
    system::{self, LineChild},
};

/// Concurrent lookup connections (redis-benchmark's default `-c`).
pub const LOOKUP_CONNECTIONS: usize = 50;
/// Open files the server keeps for itself besides one per client.
const SERVER_SPARE_FILES: u64 = 200;
/// How long every client of a load may take to connect and register.
const READY_BUDGET: Duration = Duration::from_secs(300);
/// Clients per worker process (each needs one open file per client).
const CLIENTS_PER_WORKER: usize = 10_000;

/// How big the load is in one mode.
struct Sizes {
    clients: usize,
    heartbeat: Duration,
    lookup_time: Duration,
    redis_requests: usize,
}

/// The clients asked for (`goal`), how many one process may hold (`per_process`: the
/// hard open-file limit less the server's spare files) and that hard limit.
fn client_bounds(bench: &Bench) -> Result<(usize, usize, u64), BenchError> {
    let hard_limit = system::open_file_hard_limit()?;
    let goal = bench.clients.unwrap_or(bench.mode.pick(100_000, 200));
    let per_process =
        usize::try_from(hard_limit.saturating_sub(SERVER_SPARE_FILES)).unwrap_or(usize::MAX);
    Ok((goal.max(1), per_process.max(1), hard_limit))
}

impl Sizes {
    /// The load of one mode with `clients` clients.
    fn of(bench: &Bench, clients: usize) -> Self {
        Self {
            clients,
            heartbeat: bench
                .mode
                .pick(Duration::from_secs(10), Duration::from_millis(200)),
            lookup_time: bench
                .mode
                .pick(Duration::from_secs(8), Duration::from_millis(300)),
            redis_requests: bench.mode.pick(500_000, 2_000),
        }
    }
}

/// Measures the four discovery rows (see the module docs).
pub async fn rows(bench: &Bench) -> Result<Vec<Row>, BenchError> {
    let (goal, per_process, hard_limit) = client_bounds(bench)?;
    let sizes = Sizes::of(bench, goal.min(per_process));

    let folder = tempfile::Builder::new()
        .prefix("p2pchat-bench-discovery-")
        .tempdir_in(tmpfs_or_temp())?;
    let server = spawn_server(bench, folder.path(), None, 1_000).await?;
    let address = server.address;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = system::rss_kib(server.child.pid()?)?;

    let load = run_load(bench, &[address], &sizes).await;
    let rss_after = system::rss_kib(server.child.pid()?);
    let (mut workers, load) = match load {
        Ok(load) => load,
        Err(error) => {
            server.child.stop(Duration::from_secs(5)).await;
            return Err(error);
        }
    };
    let lookups = lookup_load(&[address], sizes.clients, sizes.lookup_time).await;
    // Still heartbeating after the lookups?
    let alive_after = worker_status(&mut workers).await.map(|status| status.alive);
    for worker in workers {
        worker.stop(Duration::from_secs(10)).await;
    }
    server.child.stop(Duration::from_secs(10)).await;
    let rss_after = rss_after?;
    let (mut lookups, lookup_failures, lookup_elapsed) = lookups?;
    let alive_after = alive_after?;

    let redis = redis_ref::start_redis()?;
    let figures =
        redis_ref::redis_benchmark(&redis, "get", LOOKUP_CONNECTIONS, 1, sizes.redis_requests)
            .await?;
    let get = figures
        .get("GET")
        .copied()
        .ok_or_else(|| BenchError::Child("redis-benchmark printed no GET figure".into()))?;

    let heartbeating = load.answered.min(alive_after);
    let per_client = rss_after.saturating_sub(rss_before) as f64 / load.registered.max(1) as f64;
    let lookup_rate = lookups.len() as f64 / lookup_elapsed.as_secs_f64();
    let mut clients_note = format!(
        "{} of {} clients registered ({} failed) in {:.1} s from {} worker processes on loopback sources {}..; {} answered a heartbeat (every {:?}) and {} were still connected after the lookups.",
        load.registered,
        sizes.clients,
        load.failed,
        load.connect_time.as_secs_f64(),
        load.workers,
        system::loopback_source(0),
        load.answered,
        sizes.heartbeat,
        alive_after,
    );
    if sizes.clients < goal {
        clients_note.push_str(&format!(
            " N was capped at {} because this machine's hard open-file limit is {hard_limit} per process (the server holds one descriptor per client) and cannot be raised without CAP_SYS_RESOURCE; with a higher hard limit (`ulimit -Hn`, Docker `--ulimit nofile=`) run `p2pchat-bench discovery --clients {goal}`. The `tier` rows (`p2pchat-bench cluster`) hold {goal} over several instances.",
            sizes.clients
        ));
    }
    Ok(vec![
        Row::new(
            "discovery: connected heartbeating clients",
            heartbeating as f64,
            "clients",
            Target::AtLeast(50_000.0),
        )
        .with_target_text("goal 100,000")
        .with_note(clients_note),
        Row::new(
            "discovery: server memory per client",
            per_client,
            "KiB",
            Target::AtMost(8.0),
        )
        .with_note(format!(
            "Server process RSS {rss_before} KiB before the clients, {rss_after} KiB with {} registered and heartbeating.",
            load.registered
        )),
        Row::new(
            "discovery: lookups/s under that load",
            lookup_rate,
            "lookups/s",
            Target::AtLeast(120_000.0),
        )
        .with_reference(format!("redis-benchmark GET -c {LOOKUP_CONNECTIONS}"), get.rps)
        .with_note(format!(
            "{LOOKUP_CONNECTIONS} registered connections in this process, one lookup in flight each, random load users, for {:.1} s ({} failed); redis-benchmark run on a fresh redis-server after the load stopped.",
            lookup_elapsed.as_secs_f64(),
            lookup_failures
        )),
        Row::new(
            "discovery: lookup p99 under that load",
            lookups.percentile_us(99.0) / 1000.0,
            "ms",
            Target::AtMost(5.0),
        )
        .with_reference(format!("redis-benchmark GET -c {LOOKUP_CONNECTIONS} p99"), get.p99_ms),
    ])
}

/// The discovery tier on `redis`: enough instances sharing it to hold the goal of clients
/// when one process may hold only its open-file limit's worth (at least two, so the shared
/// path is always exercised); clients heartbeating, memory per client summed over the
/// instances (the Redis nodes' own memory is reported beside it, not counted), then lookups
/// spread over the instances. Where the CPU went (each Redis node, the instances, the load
/// workers, this process's lookup clients) is measured over a window of heartbeats alone
/// and over the lookups, and given in the notes.
pub async fn tier_rows(bench: &Bench, redis: &Redis) -> Result<Vec<Row>, BenchError> {
    let (goal, per_process, _) = client_bounds(bench)?;
    let instances = goal.div_ceil(per_process.min(goal)).max(2);
    let per_instance = goal.div_ceil(instances);
    let sizes = Sizes::of(bench, goal);
    let label = redis.kind().label();
    let url = redis.url();
    let folder = tempfile::Builder::new()
        .prefix("p2pchat-bench-tier-")
        .tempdir_in(tmpfs_or_temp())?;
    let mut servers = Vec::with_capacity(instances);
    for index in 0..instances {
        let data_dir = folder.path().join(format!("instance-{index}"));
        std::fs::create_dir_all(&data_dir)?;
        match spawn_server(bench, &data_dir, Some(&url), 1_000).await {
            Ok(server) => servers.push(server),
            Err(error) => {
                stop_servers(servers).await;
                return Err(error);
            }
        }
    }
    let measured = measure_tier(bench, redis, &mut servers, &sizes).await;
    stop_servers(servers).await;
    let mut tier = measured?;

    let per_client =
        tier.rss_after.saturating_sub(tier.rss_before) as f64 / tier.load.registered.max(1) as f64;
    let redis_memory: u64 = tier
        .idle
        .after
        .redis
        .iter()
        .map(|node| node.used_memory_kib)
        .sum();
    let lookup_rate = tier.lookups.len() as f64 / tier.lookup_elapsed.as_secs_f64();
    let load = &tier.load;
    Ok(vec![
        Row::new(
            format!("discovery tier ({instances} instances, {label}): connected heartbeating clients"),
            load.answered as f64,
            "clients",
            Target::AtLeast(50_000.0),
        )
        .with_target_text("goal 100,000")
        .with_note(format!(
            "{} of {goal} clients registered ({} failed) in {:.1} s, spread over {instances} `discovery::serve` processes sharing {label} (at most {per_instance} each: the per-process open-file limit), from {} worker processes; {} answered a heartbeat (every {:?}). While they only heartbeated ({:.1} s): {}.",
            load.registered,
            load.failed,
            load.connect_time.as_secs_f64(),
            load.workers,
            load.answered,
            sizes.heartbeat,
            tier.idle.seconds(),
            tier.idle.describe(),
        )),
        Row::new(
            format!("discovery tier ({label}): server memory per client"),
            per_client,
            "KiB",
            Target::AtMost(8.0),
        )
        .with_note(format!(
            "Summed RSS of the {instances} instances: {} KiB before, {} KiB with the clients; the Redis nodes held {redis_memory} KiB in all (`used_memory`, replicas included) for presence and bindings.",
            tier.rss_before, tier.rss_after,
        )),
        Row::new(
            format!("discovery tier ({label}): lookups/s under that load"),
            lookup_rate,
            "lookups/s",
            Target::AtLeast(120_000.0),
        )
        .with_note(format!(
            "{LOOKUP_CONNECTIONS} registered connections in this process spread over the {instances} instances, one lookup in flight each, random load users, for {:.1} s ({} failed), the heartbeats going on. During the lookups: {}. Inside the instances, over the same window: {}.",
            tier.lookup_elapsed.as_secs_f64(),
            tier.lookup_failures,
            tier.busy.describe(),
            tier.store_times.describe(),
        )),
        Row::new(
            format!("discovery tier ({label}): lookup p99 under that load"),
            tier.lookups.percentile_us(99.0) / 1000.0,
            "ms",
            Target::AtMost(5.0),
        ),
    ])
}

/// What [`measure_tier`] saw.
struct Tier {
    load: Load,
    rss_before: u64,
    rss_after: u64,
    /// Heartbeats alone, for one interval after the first round.
    idle: Window,
    /// The lookups (heartbeats going on).
    busy: Window,
    lookups: Latencies,
    lookup_failures: usize,
    lookup_elapsed: Duration,
    /// How long the instances' store calls took during the lookups.
    store_times: StoreTimes,
}

/// Loads the started `servers`, then measures a heartbeat-only window and the lookups.
async fn measure_tier(
    bench: &Bench,
    redis: &Redis,
    servers: &mut [ServerChild],
    sizes: &Sizes,
) -> Result<Tier, BenchError> {
    let mut rss_before = 0u64;
    let mut server_pids = Vec::with_capacity(servers.len());
    for server in servers.iter() {
        let pid = server.child.pid()?;
        rss_before += system::rss_kib(pid)?;
        server_pids.push(pid);
    }
    let addresses: Vec<SocketAddr> = servers.iter().map(|server| server.address).collect();
    let (workers, load) = run_load(bench, &addresses, sizes).await?;
    let measured = async {
        let worker_pids: Vec<u32> = workers
            .iter()
            .filter_map(|worker| worker.pid().ok())
            .collect();
        let pids = Pids {
            servers: &server_pids,
            workers: &worker_pids,
        };
        let mut rss_after = 0u64;
        for pid in &server_pids {
            rss_after += system::rss_kib(*pid).unwrap_or(0);
        }
        let idle_start = Usage::now(redis, &pids).await;
        tokio::time::sleep(sizes.heartbeat).await;
        let idle = Window {
            before: idle_start,
            after: Usage::now(redis, &pids).await,
        };
        let busy_start = Usage::now(redis, &pids).await;
        let times_before = StoreTimes::of(servers).await?;
        let (lookups, lookup_failures, lookup_elapsed) =
            lookup_load(&addresses, sizes.clients, sizes.lookup_time).await?;
        let store_times = StoreTimes::of(servers).await?.since(&times_before);
        let busy = Window {
            before: busy_start,
            after: Usage::now(redis, &pids).await,
        };
        Ok::<_, BenchError>(Tier {
            load,
            rss_before,
            rss_after,
            idle,
            busy,
            lookups,
            lookup_failures,
            lookup_elapsed,
            store_times,
        })
    }
    .await;
    for worker in workers {
        worker.stop(Duration::from_secs(10)).await;
    }
    measured
}

/// Store-time histogram buckets ([`discovery::metrics::Histogram::buckets`]): how long
/// heartbeats' and lookups' store calls took, in one instance (its `store-times` answer,
/// [`StoreTimes::line`]) or summed over every instance.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoreTimes {
    pub(crate) heartbeat: Vec<u64>,
    pub(crate) lookup: Vec<u64>,
}

impl StoreTimes {
    /// The `store-times` answer `serve-discovery` prints: `store-times <heartbeat>
    /// <lookup>`, each a comma-separated list of bucket counts ([`StoreTimes::parse`]
    /// reads what follows the first word).
    pub(crate) fn line(&self) -> String {
        let list = |buckets: &[u64]| {
            buckets
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "store-times {} {}",
            list(&self.heartbeat),
            list(&self.lookup)
        )
    }

    /// Asks each of `servers` and sums their answers.
    async fn of(servers: &mut [ServerChild]) -> Result<Self, BenchError> {
        let buckets = discovery::metrics::BUCKETS_SECONDS.len() + 1;
        let mut total = Self {
            heartbeat: vec![0; buckets],
            lookup: vec![0; buckets],
        };
        for server in servers {
            server.child.say("store-times").await?;
            let line = server
                .child
                .expect("store-times ", Duration::from_secs(30))
                .await?;
            let parsed = Self::parse(&line)
                .ok_or_else(|| BenchError::Child(format!("bad store-times line {line:?}")))?;
            for (sums, adds) in [
                (&mut total.heartbeat, parsed.heartbeat),
                (&mut total.lookup, parsed.lookup),
            ] {
                for (sum, add) in sums.iter_mut().zip(adds) {
                    *sum += add;
                }
            }
        }
        Ok(total)
    }

    /// Reads `<heartbeat buckets> <lookup buckets>`, each comma-separated.
    fn parse(line: &str) -> Option<Self> {
        let buckets = |text: &str| -> Option<Vec<u64>> {
            let parsed: Vec<u64> = text
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            (parsed.len() == discovery::metrics::BUCKETS_SECONDS.len() + 1).then_some(parsed)
        };
        let mut fields = line.split_whitespace();
        let heartbeat = buckets(fields.next()?)?;
        let lookup = buckets(fields.next()?)?;
        Some(Self { heartbeat, lookup })
    }

    /// What was counted after `before`.
    fn since(&self, before: &Self) -> Self {
        let minus = |after: &[u64], before: &[u64]| {
            after
                .iter()
                .zip(before)
                .map(|(after, before)| after.saturating_sub(*before))
                .collect()
        };
        Self {
            heartbeat: minus(&self.heartbeat, &before.heartbeat),
            lookup: minus(&self.lookup, &before.lookup),
        }
    }

    /// The bucket bound at or under which `percent` of `buckets`' observations fall, as
    /// text ("≤ 2 ms"; "> 1000 ms" past the last bound); "none" with no observation.
    fn percentile(buckets: &[u64], percent: f64) -> String {
        let count: u64 = buckets.iter().sum();
        if count == 0 {
            return "none".to_owned();
        }
        let wanted = ((count as f64) * percent / 100.0).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bound, in_bucket) in discovery::metrics::BUCKETS_SECONDS.iter().zip(buckets) {
            seen += in_bucket;
            if seen >= wanted {
                return format!("≤ {} ms", bound * 1000.0);
            }
        }
        let last =
            discovery::metrics::BUCKETS_SECONDS[discovery::metrics::BUCKETS_SECONDS.len() - 1];
        format!("> {} ms", last * 1000.0)
    }

    fn describe(&self) -> String {
        let of = |buckets: &[u64]| {
            format!(
                "{} calls, p50 {}, p99 {}",
                buckets.iter().sum::<u64>(),
                Self::percentile(buckets, 50.0),
                Self::percentile(buckets, 99.0)
            )
        };
        format!(
            "the lookups' store reads {}; the heartbeats' store writes {}",
            of(&self.lookup),
            of(&self.heartbeat)
        )
    }
}

/// Stops every server, each within a bounded wait.
async fn stop_servers(servers: Vec<ServerChild>) {
    for server in servers {
        server.child.stop(Duration::from_secs(10)).await;
    }
}

/// The processes whose CPU a [`Usage`] sums.
struct Pids<'a> {
    servers: &'a [u32],
    workers: &'a [u32],
}

/// CPU used so far by each part of the tier, and when it was read.
struct Usage {
    at: Instant,
    redis: Vec<redis_ref::NodeStats>,
    servers: f64,
    workers: f64,
    this: f64,
    /// Run-queue waits of the Redis nodes, the instances, the workers and this process.
    waits: [system::RunQueue; 4],
}

impl Usage {
    async fn now(redis: &Redis, pids: &Pids<'_>) -> Self {
        let nodes = redis.node_stats().await;
        let node_pids: Vec<u32> = nodes.iter().map(|node| node.pid).collect();
        Self {
            redis: nodes,
            at: Instant::now(),
            servers: system::cpu_seconds_of(pids.servers),
            workers: system::cpu_seconds_of(pids.workers),
            this: system::cpu_seconds(std::process::id()).unwrap_or(f64::NAN),
            waits: [
                system::RunQueue::of(&node_pids),
                system::RunQueue::of(pids.servers),
                system::RunQueue::of(pids.workers),
                system::RunQueue::of(&[std::process::id()]),
            ],
        }
    }
}

/// Two [`Usage`] readings: what each part used in between.
struct Window {
    before: Usage,
    after: Usage,
}

impl Window {
    fn seconds(&self) -> f64 {
        self.after
            .at
            .duration_since(self.before.at)
            .as_secs_f64()
            .max(1e-3)
    }

    /// "redis: 0.41 cores, 61,000 commands/s (masters 0.20 / 0.08 / 0.07 cores, ...)",
    /// CPU in cores (CPU seconds per second).
    fn describe(&self) -> String {
        let seconds = self.seconds();
        let cores = |before: f64, after: f64| (after - before).max(0.0) / seconds;
        let mut masters = Vec::new();
        let (mut redis_cores, mut replica_cores, mut commands) = (0.0, 0.0, 0u64);
        for after in &self.after.redis {
            let Some(before) = self
                .before
                .redis
                .iter()
                .find(|node| node.port == after.port)
            else {
                continue;
            };
            let node_cores = cores(before.cpu_seconds, after.cpu_seconds);
            let node_commands = after.commands.saturating_sub(before.commands);
            redis_cores += node_cores;
            commands += node_commands;
            if after.master {
                masters.push((node_cores, node_commands));
            } else {
                replica_cores += node_cores;
            }
        }
        masters.sort_by(|a, b| b.0.total_cmp(&a.0));
        let per_master = masters
            .iter()
            .map(|(node_cores, node_commands)| {
                format!(
                    "{node_cores:.2} cores / {} commands/s",
                    crate::report::number(*node_commands as f64 / seconds)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let split = if masters.len() > 1 {
            format!(" (masters, busiest first: {per_master}; replicas {replica_cores:.2} cores)")
        } else {
            String::new()
        };
        let waited =
            |part: usize| self.after.waits[part].describe_since(&self.before.waits[part], seconds);
        format!(
            "Redis {redis_cores:.2} cores and {} commands/s{split}; discovery instances {:.2} cores; load workers {:.2} cores; this process (the lookup clients) {:.2} cores. Waiting for a core (run queue): Redis nodes {}; instances {}; load workers {}; this process {}",
            crate::report::number(commands as f64 / seconds),
            cores(self.before.servers, self.after.servers),
            cores(self.before.workers, self.after.workers),
            cores(self.before.this, self.after.this),
            waited(0),
            waited(1),
            waited(2),
            waited(3),
        )
    }
}

/// `/dev/shm` when it exists (tmpfs), else the temporary folder.
pub fn tmpfs_or_temp() -> std::path::PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A discovery server child process and its address.
pub struct ServerChild {
    /// The process.
    pub child: LineChild,
    /// Where it listens.
    pub address: SocketAddr,
}

/// Starts `p2pchat-bench serve-discovery` on the embedded store in `data_dir`, or on Redis.
pub async fn spawn_server(
    bench: &Bench,
    data_dir: &Path,
    redis: Option<&str>,
    mail_cap: u64,
) -> Result<ServerChild, BenchError> {
    let mut command = Command::new(&bench.exe);
    command
        .arg("serve-discovery")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--mail-cap")
        .arg(mail_cap.to_string());
    if let Some(url) = redis {
        command.arg("--redis").arg(url);
    }
    let mut child = LineChild::spawn(command, "the discovery server")?;
    let address = child
        .expect("listening ", Duration::from_secs(30))
        .await?
        .parse()
        .map_err(|error| BenchError::Child(format!("bad server address: {error}")))?;
    Ok(ServerChild { child, address })
}

/// The load once connected.
struct Load {
    registered: usize,
    failed: usize,
    answered: usize,
    workers: usize,
    connect_time: Duration,
}

/// What a worker says to `status`.
struct WorkerStatus {
    alive: usize,
    answered: usize,
}

/// Starts the workers, `sizes.clients` clients spread evenly over `servers`, waits until all
/// registered and one heartbeat round passed.
async fn run_load(
    bench: &Bench,
    servers: &[SocketAddr],
    sizes: &Sizes,
) -> Result<(Vec<LineChild>, Load), BenchError> {
    let started = Instant::now();
    let mut workers = Vec::new();
    let mut first = 0;
    let per_server = sizes.clients.div_ceil(servers.len().max(1));
    while first < sizes.clients {
        let server = servers[(first / per_server).min(servers.len() - 1)];
        // A worker never spans two servers.
        let left_on_server = per_server - first % per_server;
        let count = CLIENTS_PER_WORKER
            .min(sizes.clients - first)
            .min(left_on_server);
        let mut command = Command::new(&bench.exe);
        command
            .arg("load-worker")
            .arg("--server")
            .arg(server.to_string())
            .arg("--first")
            .arg(first.to_string())
            .arg("--count")
            .arg(count.to_string())
            .arg("--source")
            .arg(system::loopback_source(workers.len()).to_string())
            .arg("--heartbeat-ms")
            .arg(sizes.heartbeat.as_millis().to_string());
        workers.push(LineChild::spawn(command, "a load worker")?);
        first += count;
    }
    let (mut registered, mut failed) = (0, 0);
    // One deadline for all of them, so the wait is bounded whatever the number of workers.
    let deadline = Instant::now() + READY_BUDGET;
    for worker in &mut workers {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = worker.expect("ready ", left).await?;
        let mut numbers = ready.split_whitespace().map(str::parse::<usize>);
        match (numbers.next(), numbers.next()) {
            (Some(Ok(ok)), Some(Ok(bad))) => {
                registered += ok;
                failed += bad;
            }
            _ => return Err(BenchError::Child(format!("bad ready line {ready:?}"))),
        }
    }
    let connect_time = started.elapsed();
    // One full heartbeat round (plus a margin) so every client has been answered.
    tokio::time::sleep(sizes.heartbeat + sizes.heartbeat / 10 + Duration::from_millis(200)).await;
    let status = worker_status(&mut workers).await?;
    let load = Load {
        registered,
        failed,
        answered: status.answered.min(status.alive),
        workers: workers.len(),
        connect_time,
    };
    Ok((workers, load))
}

/// Sums every worker's answer to `status`.
async fn worker_status(workers: &mut [LineChild]) -> Result<WorkerStatus, BenchError> {
    let mut total = WorkerStatus {
        alive: 0,
        answered: 0,
    };
    for worker in workers {
        worker.say("status").await?;
        let line = worker.expect("status ", Duration::from_secs(30)).await?;
        let numbers: Vec<usize> = line
            .split_whitespace()
            .filter_map(|number| number.parse().ok())
            .collect();
        let [alive, answered, _pongs] = numbers[..] else {
            return Err(BenchError::Child(format!("bad status line {line:?}")));
        };
        total.alive += alive;
        total.answered += answered;
    }
    Ok(total)
}

/// [`LOOKUP_CONNECTIONS`] registered clients each looking up random load users, one
/// lookup in flight each, for `duration`. Returns the latencies of the answered lookups,
/// how many failed, and the time taken.
async fn lookup_load(
    servers: &[SocketAddr],
    population: usize,
    duration: Duration,
) -> Result<(Latencies, usize, Duration), BenchError> {
    let population = population.max(1);
    lookup_load_of(
        servers,
        "lookup",
        move |random| roles::load_user(random % population),
        duration,
    )
    .await
}

/// [`LOOKUP_CONNECTIONS`] clients registered as `{prefix}0`, `{prefix}1`, ... (with a new
/// key: a prefix serves one call), connection `i` to `servers[i % servers.len()]`, each
/// looking up `pick(r)` for random numbers `r`, one
/// lookup in flight each, for `duration`. Returns the latencies of the answered lookups,
/// how many failed, and the time taken.
pub async fn lookup_load_of(
    servers: &[SocketAddr],
    prefix: &str,
    pick: impl Fn(usize) -> Username + Clone + Send + 'static,
    duration: Duration,
) -> Result<(Latencies, usize, Duration), BenchError> {
    let identity = Identity::generate();
    let mut clients = Vec::with_capacity(LOOKUP_CONNECTIONS);
    for (index, server) in (0..LOOKUP_CONNECTIONS).zip(servers.iter().cycle()) {
        let mut client = ControlClient::connect(*server, None).await?;
        let user = Username::new(&format!("{prefix}{index}"))
            .unwrap_or_else(|_| unreachable!("valid by shape"));
        client.register(&identity, &user).await?;
        clients.push(client);
    }
    let started = Instant::now();
    let deadline = started + duration;
    // Bounded in count too: no more than this many per connection, whatever the speed.
    let max_per_connection = (duration.as_secs_f64() * 1_000_000.0) as usize + 1;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(index, mut client)| {
            let pick = pick.clone();
            tokio::spawn(async move {
                let mut latencies = Latencies::with_capacity(max_per_connection.min(1 << 20));
                let mut failures = 0usize;
                let mut random = 0x9E37_79B9_7F4A_7C15u64 ^ (index as u64 + 1);
                for _ in 0..max_per_connection {
                    if Instant::now() >= deadline {
                        break;
                    }
                    // xorshift64: a cheap spread over the load users.
                    random ^= random << 13;
                    random ^= random >> 7;
                    random ^= random << 17;
                    let user = pick(random as usize);
                    let sent = Instant::now();
                    match client.request(Request::Lookup { user }).await {
                        Ok(Reply::User(_)) => latencies.record(sent.elapsed()),
                        Ok(_) | Err(BenchError::Refused(_)) => failures += 1,
                        Err(error) => return Err(error),
                    }
                }
                Ok::<_, BenchError>((latencies, failures))
            })
        })
        .collect();
    let mut all = Latencies::default();
    let mut failures = 0;
    for task in tasks {
        let (latencies, failed) = task
            .await
            .map_err(|error| BenchError::Protocol(format!("lookup task: {error}")))??;
        all.merge(latencies);
        failures += failed;
    }
    Ok((all, failures, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_times_parse_subtract_and_give_bucket_bounds() {
        let zeros = vec![0u64; discovery::metrics::BUCKETS_SECONDS.len() + 1];
        let mut heartbeat = zeros.clone();
        heartbeat[2] = 90; // ≤ 1 ms
        heartbeat[5] = 10; // ≤ 10 ms
        let mut lookup = zeros.clone();
        lookup[12] = 4; // past the last bound
        let answer = StoreTimes {
            heartbeat: heartbeat.clone(),
            lookup: lookup.clone(),
        }
        .line();
        let fields = answer.strip_prefix("store-times ").unwrap();
        let after = StoreTimes::parse(fields).unwrap();
        assert_eq!(after.heartbeat, heartbeat);
        assert_eq!(after.lookup, lookup);
        let before = StoreTimes {
            heartbeat: zeros.clone(),
            lookup: zeros.clone(),
        };
        let window = after.since(&before);
        assert_eq!(StoreTimes::percentile(&window.heartbeat, 50.0), "≤ 1 ms");
        assert_eq!(StoreTimes::percentile(&window.heartbeat, 99.0), "≤ 10 ms");
        assert_eq!(StoreTimes::percentile(&window.lookup, 50.0), "> 1000 ms");
        assert_eq!(StoreTimes::percentile(&zeros, 99.0), "none");
        assert_eq!(StoreTimes::parse("1,2 3"), None);
        let (heartbeat_only, _) = fields.split_once(' ').unwrap();
        assert_eq!(StoreTimes::parse(heartbeat_only), None);
    }
}
