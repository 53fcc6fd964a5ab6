//! `p2pchat-bench`: the project's performance figures, each beside a reference measured in the same
//! run on the same machine.
//!
//! Every figure runs the project's real code: the real codec and sealing ([`proto`]), the
//! real discovery server ([`discovery::serve`]) over loopback TCP, the real store backends
//! ([`store`]), the real peer runtime ([`peer`]) and the real `p2pchat` binary.
//!
//! - [`Group`]: the figures that share one setup (one `p2pchat-bench <group>` subcommand
//!   each); [`run_group`] measures one, [`run_all`] every one.
//! - [`direct`]: direct messages (latency, throughput) vs raw TCP and the Olm (ratchet) seal+open ceiling.
//! - [`attack`]: lookup p99 under attack (silent sockets, a deposit flood) vs without it.
//! - [`discovery_load`]: N heartbeating clients, server memory per client, lookups under
//!   that load vs `redis-benchmark` GET; the tier of several instances on one Redis
//!   deployment.
//! - [`mailbox`]: draining 100,000 queued messages (embedded store, Redis) vs
//!   `redis-benchmark -P 32`.
//! - [`cluster`]: the discovery tier (several instances on one store: clients, memory,
//!   lookups, where the CPU goes) and the drain, on one Redis beside a Redis Cluster.
//! - [`client`]: the `p2pchat` binary's idle memory and start-up to prompt.
//! - [`roles`]: the child processes the benchmarks start (`serve-discovery`, `load-worker`).
//! - [`control`], [`redis_ref`], [`stats`], [`system`], [`report`]: the helpers.
//!
//! [`Mode::Smoke`] runs every figure tiny (a second or two each) so a plain `#[test]` keeps
//! the whole harness working; a benchmark is never a timed test, so nothing asserts a speed.
//!
//! **Architecture Invariant:** nothing depends on this crate, and it only ever talks to
//! loopback addresses. Every load loop is bounded in count and in time.

use std::path::PathBuf;

pub mod attack;
pub mod client;
pub mod cluster;
pub mod control;
pub mod direct;
pub mod discovery_load;
pub mod handshake;
pub mod mailbox;
pub mod redis_ref;
pub mod report;
pub mod roles;
pub mod stats;
pub mod system;

pub use report::{Reference, Row, Target};

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The real figures (minutes in all).
    Full,
    /// Every figure tiny, to check the harness works (seconds).
    Smoke,
}

impl Mode {
    /// `full` in full mode, `smoke` in smoke mode.
    pub fn pick<T>(self, full: T, smoke: T) -> T {
        match self {
            Self::Full => full,
            Self::Smoke => smoke,
        }
    }
}

/// What every figure needs to run.
#[derive(Debug, Clone)]
pub struct Bench {
    /// Full or smoke.
    pub mode: Mode,
    /// The `p2pchat-bench` executable, started again for the child-process roles.
    pub exe: PathBuf,
    /// How many discovery clients to connect (default: the design's goal, bounded by the
    /// open-file limit).
    pub clients: Option<usize>,
}

/// Why a figure could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A socket, file or process operation failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A store operation failed.
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    /// The hello exchange failed.
    #[error("handshake: {0}")]
    Handshake(#[from] proto::HandshakeError),
    /// Sending a frame failed.
    #[error("send: {0}")]
    Send(#[from] proto::SendError),
    /// Receiving a frame failed.
    #[error("receive: {0}")]
    Recv(#[from] proto::RecvError),
    /// Encoding or decoding a body failed.
    #[error("wire: {0}")]
    Wire(#[from] proto::wire::WireError),
    /// Sealing failed.
    #[error("seal: {0}")]
    Seal(#[from] proto::SealError),
    /// Opening failed.
    #[error("open: {0}")]
    Open(#[from] proto::OpenError),
    /// The server answered a request with an error.
    #[error("refused by the server: {0}")]
    Refused(proto::ErrorReply),
    /// The peer runtime could not start.
    #[error("peer runtime: {0}")]
    PeerStart(#[from] peer::StartError),
    /// A peer runtime command failed.
    #[error("peer runtime: {0}")]
    Peer(#[from] peer::ClientError),
    /// Something answered outside the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A child process misbehaved.
    #[error("child process: {0}")]
    Child(String),
    /// Something took too long.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// The figures that share one setup; each is one subcommand of `p2pchat-bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Direct message latency p50/p99 (peer runtime, and the bare protocol path) vs raw
    /// TCP ping-pong.
    DirectLatency,
    /// Direct throughput (peer runtime, and the bare protocol path pipelined) vs the
    /// Olm seal+open ceiling on one core.
    DirectThroughput,
    /// The Noise handshakes (control connection, peer link) vs one X25519 operation.
    Handshake,
    /// N heartbeating discovery clients, server memory per client, lookups/s and p99 under
    /// that load vs `redis-benchmark` GET.
    Discovery,
    /// Lookup p99 while thousands of sockets sit unregistered and one registered client
    /// floods deposits, vs the same lookups without the attack.
    Attack,
    /// Mailbox drain of 100,000 messages on the embedded store.
    MailboxEmbedded,
    /// Mailbox drain of 100,000 messages on Redis.
    MailboxRedis,
    /// The discovery tier (several instances sharing the store: clients, memory, lookups)
    /// and the mailbox drain, on one Redis beside a Redis Cluster of 3 masters + 3
    /// replicas.
    Cluster,
    /// `p2pchat` idle memory and start-up to prompt.
    Client,
}

impl Group {
    /// Every group, in table order. [`Group::MailboxRedis`] is left out: its row is
    /// [`Group::Cluster`]'s drain on one Redis.
    pub const ALL: [Group; 8] = [
        Self::DirectLatency,
        Self::DirectThroughput,
        Self::Handshake,
        Self::Discovery,
        Self::Attack,
        Self::MailboxEmbedded,
        Self::Cluster,
        Self::Client,
    ];

    /// The subcommand name.
    pub fn name(self) -> &'static str {
        match self {
            Self::DirectLatency => "direct-latency",
            Self::DirectThroughput => "direct-throughput",
            Self::Handshake => "handshake",
            Self::Discovery => "discovery",
            Self::Attack => "attack",
            Self::MailboxEmbedded => "mailbox-embedded",
            Self::MailboxRedis => "mailbox-redis",
            Self::Cluster => "cluster",
            Self::Client => "client",
        }
    }
}

/// Measures one group's figures.
pub async fn run_group(group: Group, bench: &Bench) -> Result<Vec<Row>, BenchError> {
    match group {
        Group::DirectLatency => direct::latency_rows(bench).await,
        Group::DirectThroughput => direct::throughput_rows(bench).await,
        Group::Handshake => handshake::rows(bench).await,
        Group::Discovery => discovery_load::rows(bench).await,
        Group::Attack => attack::rows(bench).await,
        Group::MailboxEmbedded => mailbox::rows(bench, mailbox::Backend::Embedded).await,
        Group::MailboxRedis => {
            mailbox::rows(bench, mailbox::Backend::Redis(redis_ref::RedisKind::One)).await
        }
        Group::Cluster => cluster::rows(bench).await,
        Group::Client => client::rows(bench).await,
    }
}

/// Measures every group in turn. A group that fails becomes one unmeasured row saying why,
/// so the table is always complete; `progress` hears each group's name as it starts.
pub async fn run_all(bench: &Bench, mut progress: impl FnMut(Group)) -> Vec<Row> {
    let mut rows = Vec::new();
    for group in Group::ALL {
        progress(group);
        rows.extend(run_group_or_note(group, bench).await);
    }
    rows
}

/// [`run_group`], with a failure turned into one unmeasured row.
pub async fn run_group_or_note(group: Group, bench: &Bench) -> Vec<Row> {
    match run_group(group, bench).await {
        Ok(rows) => rows,
        Err(error) => vec![Row::unmeasured(
            group.name(),
            "",
            Target::AtLeast(0.0),
            format!("{} failed: {error}", group.name()),
        )],
    }
}
