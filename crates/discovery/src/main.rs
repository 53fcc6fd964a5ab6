//! `p2pchat-discovery`: the discovery server binary, a thin shell over [`discovery::serve`].

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use discovery::{Config, Metrics, operator};
use store::{EmbeddedStore, MailLimits, RedisOptions, RedisStore, Store, redis_store::redact_urls};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The p2pchat discovery server: tells clients where their peers are and holds their
/// end-to-end encrypted mail while they are offline.
#[derive(Debug, Parser)]
#[command(name = "p2pchat-discovery", version, about)]
struct Cli {
    /// Address to listen on for clients (`0.0.0.0:5001` for clients on other machines).
    #[arg(
        long,
        env = "P2PCHAT_LISTEN",
        default_value = "127.0.0.1:5001",
        global = true
    )]
    listen: SocketAddr,
    /// Redis URL (shared state for several instances), `redis://:PASSWORD@host:port` for a
    /// Redis that demands a password; for a Redis Cluster, one node's URL or several,
    /// comma-separated (cluster mode is detected). Without it, an embedded store in the
    /// data dir is used.
    // The value may hold a password: `--help` must not print it from the environment.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
    /// Replicas a deposit must reach before it counts as queued (`WAIT`); default 1 on a
    /// Redis Cluster, 0 on a single Redis.
    #[arg(long, env = "P2PCHAT_REDIS_REPLICAS")]
    redis_replicas: Option<u32>,
    /// Folder for the embedded store, the operator secret and the server key.
    #[arg(long, env = "P2PCHAT_DISCOVERY_DATA", global = true)]
    data_dir: Option<PathBuf>,
    /// The server's key file (created 0600 on first start); default `server.key` in the
    /// data dir. Instances that share one Redis must share one key file, so clients see
    /// one server.
    #[arg(long, env = "P2PCHAT_SERVER_KEY_FILE", global = true)]
    key_file: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long, env = "P2PCHAT_METRICS")]
    metrics: Option<SocketAddr>,
    /// Seconds between client heartbeats.
    #[arg(long, env = "P2PCHAT_HEARTBEAT_SECS", default_value_t = 10)]
    heartbeat_secs: u64,
    /// Seconds without a heartbeat after which a client is offline.
    #[arg(long, env = "P2PCHAT_PRESENCE_TTL_SECS", default_value_t = 30)]
    presence_ttl_secs: u64,
    /// Seconds a new connection has to register, counted from accept; no request extends it.
    #[arg(long, env = "P2PCHAT_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    handshake_timeout_secs: u64,
    /// Largest frame (bytes) accepted before a client registers.
    #[arg(long, env = "P2PCHAT_PREAUTH_MAX_FRAME", default_value_t = 4096)]
    preauth_max_frame: usize,
    /// Most simultaneous client connections (fewer if the open-file limit, less the reserve,
    /// cannot hold them).
    #[arg(long, env = "P2PCHAT_MAX_CONNECTIONS", default_value_t = 200_000)]
    max_connections: usize,
    /// Open files kept out of the connection cap (listener, store, logs, refusals in flight).
    #[arg(long, env = "P2PCHAT_OPEN_FILE_RESERVE", default_value_t = 128)]
    open_file_reserve: u64,
    /// Most sessions of one user at once; a newer one closes the oldest.
    #[arg(long, env = "P2PCHAT_MAX_SESSIONS_PER_USER", default_value_t = 8)]
    max_sessions_per_user: usize,
    /// Most connections from one source IP address at once (an office behind one NAT
    /// address shares it).
    #[arg(long, env = "P2PCHAT_PER_IP_CONNECTIONS", default_value_t = 256)]
    per_ip_connections: usize,
    /// Requests per second all connections from one source IP address may sustain together.
    #[arg(
        long,
        env = "P2PCHAT_PER_IP_REQUESTS_PER_SECOND",
        default_value_t = 2_000
    )]
    per_ip_requests_per_second: u32,
    /// Requests one source IP address may send at once above its sustained rate.
    #[arg(long, env = "P2PCHAT_PER_IP_REQUEST_BURST", default_value_t = 4_000)]
    per_ip_request_burst: u32,
    /// New names (first registrations) one source IP address may bind in an hour.
    #[arg(long, env = "P2PCHAT_PER_IP_NEW_NAMES_PER_HOUR", default_value_t = 100)]
    per_ip_new_names_per_hour: u32,
    /// Deposits one user may make a minute into other users' mailboxes.
    #[arg(long, env = "P2PCHAT_DEPOSITS_PER_MINUTE", default_value_t = 600)]
    deposits_per_minute: u32,
    /// Bytes of sealed messages one user may deposit an hour into other users' mailboxes.
    #[arg(long, env = "P2PCHAT_DEPOSIT_BYTES_PER_HOUR", default_value_t = 64 << 20)]
    deposit_bytes_per_hour: u64,
    /// Most names in one `list` reply (the rest are counted); at most 1900.
    #[arg(long, env = "P2PCHAT_LIST_MAX", default_value_t = 1000)]
    list_max: usize,
    /// Most messages one mailbox holds.
    #[arg(long, env = "P2PCHAT_MAIL_CAP", default_value_t = 10_000)]
    mail_cap: u64,
    /// Most bytes of stored mail one mailbox holds (64 MiB; at least 64 KiB).
    #[arg(long, env = "P2PCHAT_MAIL_MAX_BYTES", default_value_t = 64 << 20)]
    mail_max_bytes: u64,
    /// Days mail is kept before it expires.
    #[arg(long, env = "P2PCHAT_MAIL_TTL_DAYS", default_value_t = 30)]
    mail_ttl_days: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish an announcement to every connected client (of every instance), proving the
    /// operator secret from the data dir.
    Announce {
        /// The announcement text.
        text: String,
        /// The running server to ask (defaults to the listen address).
        #[arg(long, env = "P2PCHAT_SERVER")]
        server: Option<String>,
    },
    /// Print the server key's fingerprint (creating the key if there is none yet): what
    /// clients are given with `--server-key` to pin it up front.
    Key,
    /// Release a name whose owner lost their key and has no backup, proving the operator
    /// secret from the data dir: the running server (and every instance on its store)
    /// unbinds it, and the next registration binds it anew. The user's contacts then see a
    /// key change they must check and `trust`.
    ReleaseName {
        /// The name to release.
        name: String,
        /// The running server to ask (defaults to the listen address).
        #[arg(long, env = "P2PCHAT_SERVER")]
        server: Option<String>,
    },
}

/// The server key from `path`, created if missing.
fn load_server_key(path: &std::path::Path) -> anyhow::Result<(proto::ServerKey, bool)> {
    proto::ServerKey::load_or_create(path)
        .with_context(|| format!("cannot use the server key file {}", path.display()))
}

/// The key in this data dir's key file, if there is one: it names the server an operator
/// command may talk to, so the command goes nowhere else.
fn own_server_key(path: &std::path::Path) -> Option<proto::ServerPublicKey> {
    proto::ServerKey::load(path).ok().map(|key| key.public())
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    directories::ProjectDirs::from("", "", "p2pchat-discovery")
        .map(|dirs| dirs.data_dir().to_path_buf())
        .context("no home folder to keep data in; pass --data-dir")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let data_dir = match &cli.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir()?,
    };

    let key_file = cli
        .key_file
        .clone()
        .unwrap_or_else(|| data_dir.join(proto::noise::SERVER_KEY_FILE));
    match &cli.command {
        Some(Command::Announce { text, server }) => {
            let secret = operator::load_secret(&data_dir)?;
            let server = server.clone().unwrap_or_else(|| cli.listen.to_string());
            let expected = own_server_key(&key_file);
            operator::announce(&server, &secret, text, expected).await?;
            println!("announced");
            return Ok(());
        }
        Some(Command::ReleaseName { name, server }) => {
            let user = proto::Username::new(name)
                .with_context(|| format!("{name:?} is not a valid username"))?;
            let secret = operator::load_secret(&data_dir)?;
            let server = server.clone().unwrap_or_else(|| cli.listen.to_string());
            let expected = own_server_key(&key_file);
            match operator::release_name(&server, &secret, &user, expected).await {
                Ok(fingerprint) => {
                    tracing::warn!(%user, %fingerprint, %server, "released the name");
                    println!(
                        "released {user} (it was bound to {fingerprint}); the next registration of {user} binds it anew"
                    );
                }
                Err(error) => {
                    tracing::warn!(%user, %server, %error, "the name was not released");
                    return Err(error.into());
                }
            }
            return Ok(());
        }
        Some(Command::Key) => {
            let (key, created) = load_server_key(&key_file)?;
            if created {
                eprintln!("created a new server key in {}", key_file.display());
            }
            println!("{}", key.public().fingerprint());
            return Ok(());
        }
        None => {}
    }

    // Settings are checked before anything is opened or created.
    let mut config = Config {
        heartbeat_interval: Duration::from_secs(cli.heartbeat_secs),
        presence_ttl: Duration::from_secs(cli.presence_ttl_secs),
        handshake_timeout: Duration::from_secs(cli.handshake_timeout_secs),
        preauth_max_frame_len: cli.preauth_max_frame,
        max_connections: cli.max_connections,
        open_file_reserve: cli.open_file_reserve,
        max_sessions_per_user: cli.max_sessions_per_user,
        list_max: cli.list_max,
        per_ip_connections: cli.per_ip_connections,
        per_ip_requests_per_second: cli.per_ip_requests_per_second,
        per_ip_request_burst: cli.per_ip_request_burst,
        per_ip_new_names_per_hour: cli.per_ip_new_names_per_hour,
        deposits_per_minute: cli.deposits_per_minute,
        deposit_bytes_per_hour: cli.deposit_bytes_per_hour,
        ..Config::default()
    };
    config.validate().map_err(anyhow::Error::msg)?;
    // A mailbox must hold at least one message of the largest size, or such a message
    // would be refused as "full" forever and retried by its sender forever.
    anyhow::ensure!(
        cli.mail_max_bytes >= proto::wire::MAX_FRAME_LEN as u64,
        "the mailbox byte cap ({} bytes) must be at least {} bytes (one message of the \
         largest size); the default is 67108864 (64 MiB)",
        cli.mail_max_bytes,
        proto::wire::MAX_FRAME_LEN
    );
    // Each connection is a descriptor: take all the hard limit allows (the connection cap
    // is then set under it, see `serve`).
    match discovery::limits::raise_open_file_limit() {
        Ok(limit) => tracing::info!(?limit, "open-file limit raised to the hard limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    let limits = MailLimits {
        cap: cli.mail_cap,
        max_bytes: cli.mail_max_bytes,
        ttl_ms: cli.mail_ttl_days.saturating_mul(24 * 60 * 60 * 1000),
    };
    // The data dir holds the operator secret (and the embedded store): created 0700, and
    // refused if other users can read it, as the client refuses its own.
    proto::identity::create_private_dir(&data_dir)?;
    proto::identity::check_private(&data_dir, 0o700)?;
    let store = match &cli.redis {
        Some(url) => Store::Redis(
            RedisStore::connect_with(
                url,
                limits,
                RedisOptions {
                    replicas: cli.redis_replicas,
                },
            )
            .await
            .with_context(|| format!("cannot use Redis at {}", redact_urls(url)))?,
        ),
        None => {
            // Created (or tightened) 0600 before redb opens it with the umask's mode.
            let path = data_dir.join("store.redb");
            proto::identity::create_private_file(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            Store::Embedded(
                EmbeddedStore::open(path, limits)
                    .with_context(|| format!("cannot open the store in {}", data_dir.display()))?,
            )
        }
    };
    config.operator_secret = Some(operator::load_or_create_secret(&data_dir)?);
    let (server_key, created) = load_server_key(&key_file)?;
    tracing::info!(
        fingerprint = %server_key.public(),
        file = %key_file.display(),
        created,
        "server key: clients pin it on first contact, or are given it with --server-key"
    );
    config.server_key = Arc::new(server_key);
    let listener = TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    if let Some(address) = cli.metrics {
        let metrics_listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot serve metrics on {address}"))?;
        tokio::spawn(discovery::metrics::serve(
            metrics_listener,
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
    }
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    discovery::serve(listener, store, config, metrics, shutdown).await?;
    Ok(())
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM (what Docker sends).
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
