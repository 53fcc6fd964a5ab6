//! The Redis references and backends: a throw-away `redis-server`
//! ([`store::testing::RedisServer`]) or Redis Cluster ([`store::testing::RedisCluster`],
//! 3 masters + 3 replicas) as one [`Redis`], `redis-benchmark` runs parsed from its CSV
//! output, and each node's own counters ([`NodeStats`], from `INFO`) to tell which node
//! did the work.

use std::collections::HashMap;

use store::testing::{RedisCluster, RedisServer};
use tokio::process::Command;

use crate::BenchError;

/// One `redis-benchmark` test result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RedisFigure {
    /// Requests per second.
    pub rps: f64,
    /// 99th percentile latency in milliseconds.
    pub p99_ms: f64,
}

/// Starts a fresh in-memory `redis-server` on a free loopback port.
pub fn start_redis() -> Result<RedisServer, BenchError> {
    RedisServer::start().map_err(|error| {
        BenchError::Child(format!(
            "cannot start redis-server (install the redis-server package): {error}"
        ))
    })
}

/// Which Redis deployment a figure runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisKind {
    /// One `redis-server`.
    One,
    /// A Redis Cluster of 3 masters, each with one replica.
    Cluster,
}

impl RedisKind {
    /// How the deployment reads in a row's name.
    pub fn label(self) -> &'static str {
        match self {
            Self::One => "one Redis",
            Self::Cluster => "Redis Cluster 3+3",
        }
    }
}

/// A started, throw-away Redis deployment on loopback; its processes are killed when it is
/// dropped.
#[derive(Debug)]
pub enum Redis {
    /// One `redis-server`.
    One(RedisServer),
    /// Six cluster-mode `redis-server`s joined into one cluster.
    Cluster(RedisCluster),
}

impl Redis {
    /// Starts a fresh deployment of `kind` (a cluster takes a few seconds to settle; that
    /// wait runs off the async workers).
    pub async fn start(kind: RedisKind) -> Result<Self, BenchError> {
        match kind {
            RedisKind::One => Ok(Self::One(start_redis()?)),
            RedisKind::Cluster => tokio::task::spawn_blocking(RedisCluster::start)
                .await
                .map_err(|error| BenchError::Child(format!("cluster start task: {error}")))?
                .map(Self::Cluster)
                .map_err(|error| {
                    BenchError::Child(format!(
                        "cannot start a Redis Cluster (redis-server and redis-cli ≥ 7): {error}"
                    ))
                }),
        }
    }

    /// Which deployment this is.
    pub fn kind(&self) -> RedisKind {
        match self {
            Self::One(_) => RedisKind::One,
            Self::Cluster(_) => RedisKind::Cluster,
        }
    }

    /// What `--redis` takes: one URL, or every node's, comma-separated.
    pub fn url(&self) -> String {
        match self {
            Self::One(server) => server.url(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }

    /// The port of every node.
    pub fn ports(&self) -> Vec<u16> {
        match self {
            Self::One(server) => vec![server.port()],
            Self::Cluster(cluster) => (0..cluster.len())
                .filter_map(|index| cluster.node_url(index))
                .filter_map(|url| url_port(&url))
                .collect(),
        }
    }

    /// Every node's counters now (nodes that do not answer are left out).
    pub async fn node_stats(&self) -> Vec<NodeStats> {
        let mut stats = Vec::new();
        for port in self.ports() {
            if let Some(node) = NodeStats::read(port).await {
                stats.push(node);
            }
        }
        stats
    }
}

/// The port of a `redis://host:port/` URL.
fn url_port(url: &str) -> Option<u16> {
    url.trim_end_matches('/').rsplit(':').next()?.parse().ok()
}

/// How long one node may take to answer `INFO`.
const NODE_STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One Redis node's own counters, from `INFO` through `redis-cli`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStats {
    /// The node's port.
    pub port: u16,
    /// Whether it is a master (`role:master`).
    pub master: bool,
    /// CPU time it has used, user + system, in seconds (`used_cpu_user` + `used_cpu_sys`).
    pub cpu_seconds: f64,
    /// Commands it has processed (`total_commands_processed`).
    pub commands: u64,
    /// Memory it holds for data and overhead, in KiB (`used_memory`).
    pub used_memory_kib: u64,
    /// Its process id (`process_id`), for what `/proc` says of it.
    pub pid: u32,
}

impl NodeStats {
    /// Reads the node on `port` (`None` if `redis-cli` is missing or the node is silent).
    pub async fn read(port: u16) -> Option<Self> {
        let read = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "info", "everything"])
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(NODE_STATS_TIMEOUT, read)
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let number = |name: &str| field(name).and_then(|value| value.parse::<f64>().ok());
        Some(Self {
            port,
            master: field("role")? == "master",
            cpu_seconds: number("used_cpu_user")? + number("used_cpu_sys")?,
            commands: number("total_commands_processed")? as u64,
            used_memory_kib: number("used_memory")? as u64 / 1024,
            pid: number("process_id")? as u32,
        })
    }
}

/// Runs `redis-benchmark` against `server` for `tests` (e.g. `get` or `lpush,rpop`) with
/// `connections` clients, `pipeline` requests in flight per client, and `requests` requests
/// per test; returns each test's figure by upper-case name (`GET`, `LPUSH`, `RPOP`).
pub async fn redis_benchmark(
    server: &RedisServer,
    tests: &str,
    connections: usize,
    pipeline: usize,
    requests: usize,
) -> Result<HashMap<String, RedisFigure>, BenchError> {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p"])
        .arg(server.port().to_string())
        .arg("-c")
        .arg(connections.to_string())
        .arg("-P")
        .arg(pipeline.to_string())
        .arg("-n")
        .arg(requests.to_string())
        .args(["-t", tests, "--csv"])
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| {
            BenchError::Child(format!(
                "cannot run redis-benchmark (install redis-tools): {error}"
            ))
        })?;
    if !output.status.success() {
        return Err(BenchError::Child(format!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let figures = parse_csv(&String::from_utf8_lossy(&output.stdout));
    if figures.is_empty() {
        return Err(BenchError::Child(
            "redis-benchmark printed no results".into(),
        ));
    }
    Ok(figures)
}

/// Parses `redis-benchmark --csv`: a header naming the columns, then one line per test.
fn parse_csv(text: &str) -> HashMap<String, RedisFigure> {
    let mut lines = text.lines().map(|line| {
        line.split(',')
            .map(|field| field.trim_matches('"').to_owned())
            .collect::<Vec<_>>()
    });
    let Some(header) = lines.next() else {
        return HashMap::new();
    };
    let column = |name: &str| header.iter().position(|field| field == name);
    let (Some(rps), Some(p99)) = (column("rps"), column("p99_latency_ms")) else {
        return HashMap::new();
    };
    lines
        .filter_map(|fields| {
            let name = fields.first()?.to_uppercase();
            let rps = fields.get(rps)?.parse().ok()?;
            let p99_ms = fields.get(p99)?.parse().ok()?;
            Some((name, RedisFigure { rps, p99_ms }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_benchmark_csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"LPUSH\",\"1149425.38\",\"0.025\",\"0.016\",\"0.031\",\"0.031\",\"0.039\",\"0.199\"\n\"RPOP\",\"877193.00\",\"0.035\",\"0.024\",\"0.031\",\"0.031\",\"0.055\",\"4.855\"\n";
        let figures = parse_csv(text);
        assert_eq!(figures["RPOP"].rps, 877_193.0);
        assert_eq!(figures["LPUSH"].p99_ms, 0.039);
    }

    #[test]
    fn node_ports_come_from_their_urls() {
        assert_eq!(url_port("redis://127.0.0.1:6379/"), Some(6379));
        assert_eq!(url_port("redis://:secret@127.0.0.1:7001/"), Some(7001));
        assert_eq!(url_port("redis://127.0.0.1/"), None);
    }
}
