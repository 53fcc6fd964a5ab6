//! The Redis references: a throw-away `redis-server` ([`store::testing::RedisServer`]) and
//! `redis-benchmark` runs against it, parsed from its CSV output.

use std::collections::HashMap;

use store::testing::RedisServer;
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
}
