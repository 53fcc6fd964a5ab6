//! One Redis beside a Redis Cluster, in the same run: the discovery tier (connected
//! heartbeating clients, memory per client, lookups/s and p99, where the CPU went) and the
//! mailbox drain, measured by the same code ([`discovery_load::tier_rows`],
//! [`mailbox::rows`]) on each [`Redis`] deployment in turn. Each cluster row takes the same
//! row on one Redis as its reference, so its ratio says what the cluster changed.
//!
//! Only one deployment runs at a time, and each is dropped (its `redis-server` processes
//! killed) before the next starts, so neither competes with the other for the machine's
//! cores. On a machine with a couple of cores the cluster's six nodes, the instances, the
//! load workers and the lookup clients all share those cores: the rows show what the
//! cluster costs and where its work lands, not what it gains on separate machines.

use std::time::Duration;

use crate::{
    Bench, BenchError, Row, discovery_load, mailbox,
    redis_ref::{Redis, RedisKind},
};

/// The most one step (a tier or a drain on one deployment) may take. Each step's own waits
/// are bounded already; this bounds their sum, and a step cut short drops its child
/// processes and Redis nodes, which kills them.
const STEP_BUDGET: Duration = Duration::from_secs(8 * 60);

/// Measures the tier and the drain on one Redis, then on a cluster; rows in pairs.
pub async fn rows(bench: &Bench) -> Result<Vec<Row>, BenchError> {
    let one_tier = bounded("the tier on one Redis", tier(bench, RedisKind::One)).await?;
    let cluster_tier = bounded("the tier on a cluster", tier(bench, RedisKind::Cluster)).await?;
    let one_drain = bounded(
        "the drain on one Redis",
        mailbox::rows(bench, mailbox::Backend::Redis(RedisKind::One)),
    )
    .await?;
    let cluster_drain = bounded(
        "the drain on a cluster",
        mailbox::rows(bench, mailbox::Backend::Redis(RedisKind::Cluster)),
    )
    .await?;
    let mut rows = beside(one_tier, cluster_tier);
    rows.extend(beside(one_drain, cluster_drain));
    Ok(rows)
}

/// `step` within [`STEP_BUDGET`].
async fn bounded(
    what: &str,
    step: impl Future<Output = Result<Vec<Row>, BenchError>>,
) -> Result<Vec<Row>, BenchError> {
    tokio::time::timeout(STEP_BUDGET, step)
        .await
        .map_err(|_| BenchError::Timeout(format!("{what} within {STEP_BUDGET:?}")))?
}

/// The tier rows on a fresh deployment of `kind`, which is stopped afterwards.
async fn tier(bench: &Bench, kind: RedisKind) -> Result<Vec<Row>, BenchError> {
    let redis = Redis::start(kind).await?;
    discovery_load::tier_rows(bench, &redis).await
}

/// Each cluster row after its one-Redis twin (the same figure, in the same order), with
/// that twin's value as its reference.
fn beside(one: Vec<Row>, cluster: Vec<Row>) -> Vec<Row> {
    let mut rows = Vec::with_capacity(one.len() + cluster.len());
    for (one, cluster) in one.into_iter().zip(cluster) {
        let cluster = match one.value {
            Some(value) if cluster.reference.is_none() => {
                cluster.with_reference(format!("{} (same run)", RedisKind::One.label()), value)
            }
            _ => cluster,
        };
        rows.push(one);
        rows.push(cluster);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;

    #[test]
    fn each_cluster_row_follows_its_twin_with_the_twin_as_reference() {
        let one = vec![
            Row::new("a (one)", 10.0, "x", Target::Reported),
            Row::new("b (one)", 4.0, "x", Target::Reported),
        ];
        let cluster = vec![
            Row::new("a (cluster)", 5.0, "x", Target::Reported),
            Row::new("b (cluster)", 8.0, "x", Target::Reported),
        ];
        let rows = beside(one, cluster);
        let names: Vec<&str> = rows.iter().map(|row| row.name.as_str()).collect();
        assert_eq!(names, ["a (one)", "a (cluster)", "b (one)", "b (cluster)"]);
        assert_eq!(rows[1].ratio(), Some(0.5));
        assert_eq!(rows[3].ratio(), Some(2.0));
        assert!(rows[0].reference.is_none());
    }
}
