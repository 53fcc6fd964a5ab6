//! `p2pchat-bench`: prints the benchmark table (see the `bench` library).
//!
//! `p2pchat-bench all` measures every figure; `p2pchat-bench <group>` one group; `--json`
//! prints JSON instead of markdown; `--smoke` (or `smoke`) runs everything tiny. The hidden
//! `serve-discovery` and `load-worker` subcommands are the child processes it starts.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use bench::{Bench, Group, Mode, roles};
use clap::{Parser, Subcommand};

/// p2pchat benchmarks: each figure beside its reference measured in the same run.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Print the rows as a JSON array instead of a markdown table.
    #[arg(long, global = true)]
    json: bool,
    /// Run every figure tiny (seconds), to check the harness works.
    #[arg(long, global = true)]
    smoke: bool,
    /// How many discovery clients to connect (default 100,000, capped by the open-file limit).
    #[arg(long, global = true)]
    clients: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every figure.
    All,
    /// Every figure, tiny (same as `all --smoke`).
    Smoke,
    /// Direct message latency p50/p99 vs raw TCP ping-pong.
    DirectLatency,
    /// Direct throughput vs the Olm seal+open ceiling.
    DirectThroughput,
    /// Noise handshakes (control connection, peer link) vs one X25519 operation.
    Handshake,
    /// Heartbeating clients, server memory per client, lookups/s and p99 vs redis GET.
    Discovery,
    /// Lookup p99 under attack (silent sockets, a deposit flood) vs without it.
    Attack,
    /// Mailbox drain on the embedded store vs redis-benchmark -P 32.
    MailboxEmbedded,
    /// Mailbox drain on Redis vs redis-benchmark -P 32.
    MailboxRedis,
    /// Discovery tier (clients, memory, lookups) and mailbox drain: one Redis beside a
    /// Redis Cluster of 3 masters + 3 replicas.
    Cluster,
    /// p2pchat idle memory and start-up to prompt.
    Client,
    /// (internal) Run a discovery server until standard input closes.
    #[command(hide = true)]
    ServeDiscovery {
        /// The embedded store's folder.
        #[arg(long)]
        data_dir: PathBuf,
        /// Use Redis instead.
        #[arg(long)]
        redis: Option<String>,
        /// Mailbox cap.
        #[arg(long, default_value_t = 10_000)]
        mail_cap: u64,
    },
    /// (internal) Connect and heartbeat many clients until standard input closes.
    #[command(hide = true)]
    LoadWorker {
        /// The discovery server.
        #[arg(long)]
        server: SocketAddr,
        /// The first client's number.
        #[arg(long)]
        first: usize,
        /// How many clients.
        #[arg(long)]
        count: usize,
        /// The loopback source address.
        #[arg(long)]
        source: std::net::Ipv4Addr,
        /// Heartbeat interval in milliseconds.
        #[arg(long)]
        heartbeat_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let group = match cli.command {
        Command::ServeDiscovery {
            data_dir,
            redis,
            mail_cap,
        } => {
            return Ok(roles::serve_discovery(roles::ServeOptions {
                data_dir,
                redis,
                mail_cap,
            })
            .await?);
        }
        Command::LoadWorker {
            server,
            first,
            count,
            source,
            heartbeat_ms,
        } => {
            return Ok(roles::load_worker(roles::WorkerOptions {
                server,
                first,
                count,
                source,
                heartbeat: Duration::from_millis(heartbeat_ms),
            })
            .await?);
        }
        Command::All | Command::Smoke => None,
        Command::DirectLatency => Some(Group::DirectLatency),
        Command::DirectThroughput => Some(Group::DirectThroughput),
        Command::Handshake => Some(Group::Handshake),
        Command::Discovery => Some(Group::Discovery),
        Command::Attack => Some(Group::Attack),
        Command::MailboxEmbedded => Some(Group::MailboxEmbedded),
        Command::MailboxRedis => Some(Group::MailboxRedis),
        Command::Cluster => Some(Group::Cluster),
        Command::Client => Some(Group::Client),
    };
    let smoke = cli.smoke || matches!(cli.command, Command::Smoke);
    let bench = Bench {
        mode: if smoke { Mode::Smoke } else { Mode::Full },
        exe: std::env::current_exe().context("cannot find this executable")?,
        clients: cli.clients,
    };
    let rows = match group {
        Some(group) => bench::run_group_or_note(group, &bench).await,
        None => {
            bench::run_all(&bench, |group| {
                eprintln!("p2pchat-bench: {} ...", group.name())
            })
            .await
        }
    };
    if cli.json {
        println!("{}", bench::report::render_json(&rows));
    } else {
        print!("{}", bench::report::render_markdown(&rows));
    }
    Ok(())
}
