//! Test support (cargo feature `testing`): a throw-away `redis-server` per test, or a
//! throw-away Redis Cluster ([`RedisCluster`]: six of them, 3 masters and 3 replicas).
//!
//! [`RedisServer::start`] spawns `redis-server` on a free loopback port with its working
//! directory in a fresh temporary folder, waits until it answers `PING`, and kills it when
//! dropped, so tests never depend on a Redis being up already and never share one.
//! [`RedisServer::stop`] and [`RedisServer::restart`] kill and start it again on the same
//! port (and, with [`RedisServer::start_persistent`], the same data), for reconnect tests.
//! [`RedisServer::start_with_password`] starts one that refuses clients without the password
//! (`requirepass`), as the Compose deployment's does.
//!
//! The binary is `redis-server` from `PATH`, or the path in the `REDIS_SERVER` environment
//! variable.
//!
//! Other crates use it from their tests with
//! `store = { workspace = true, features = ["testing"] }` under `[dev-dependencies]`.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How long a started server may take to answer `PING`.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How often a starting server is asked.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How many free ports are tried if another process takes the chosen one first.
const PORT_ATTEMPTS: usize = 5;

/// A `redis-server` child process on `127.0.0.1`, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
    /// The `requirepass` password, if the server demands one.
    password: Option<String>,
    /// More `redis-server` arguments (a cluster node's).
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts an in-memory server (no RDB snapshots, no AOF) on a free port.
    pub fn start() -> io::Result<Self> {
        Self::start_with(false, None)
    }

    /// Starts a server that keeps its data across [`RedisServer::restart`] (an append-only
    /// file, fsynced on every write, in the server's temporary folder).
    pub fn start_persistent() -> io::Result<Self> {
        Self::start_with(true, None)
    }

    /// Starts an in-memory server that refuses every command but `AUTH` until a client gives
    /// `password` (`requirepass`); [`RedisServer::url`] carries the password, as it is (so it
    /// should need no percent-encoding).
    pub fn start_with_password(password: &str) -> io::Result<Self> {
        Self::start_with(false, Some(password.to_owned()))
    }

    fn start_with(persistent: bool, password: Option<String>) -> io::Result<Self> {
        Self::start_with_args(persistent, password, |_port| Ok(Vec::new()))
    }

    /// Starts a server with the arguments `extra_args` makes for its port.
    fn start_with_args(
        persistent: bool,
        password: Option<String>,
        extra_args: impl Fn(u16) -> io::Result<Vec<String>>,
    ) -> io::Result<Self> {
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let mut server = Self {
                port,
                dir: tempfile::Builder::new()
                    .prefix("p2pchat-redis-")
                    .tempdir()?,
                persistent,
                password: password.clone(),
                extra_args: extra_args(port)?,
                child: None,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// A connection URL for the `redis` crate (and `REDIS_URL`), with the password if the
    /// server demands one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => self.url_without_password(),
        }
    }

    /// A connection URL without credentials, for tests of what a client without the
    /// password gets.
    pub fn url_without_password(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its working directory (log file `redis.log`, and the AOF when persistent).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the child process is running (it may still be starting).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Kills the server (SIGKILL: no shutdown save, like a crash) and waits for it to exit.
    /// Does nothing if it is not running.
    pub fn stop(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            // `kill` fails only if the process has already exited, which is what we want.
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    /// Stops the server if it runs, then starts it again on the same port and folder, and
    /// waits until it answers `PING`.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// Spawns the child and waits for `PING`.
    fn spawn(&mut self) -> io::Result<()> {
        let binary = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        let mut command = Command::new(binary);
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        if let Some(password) = &self.password {
            command.arg("--requirepass").arg(password);
        }
        command.args(&self.extra_args);
        self.child = Some(command.spawn()?);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if ping(self.addr(), self.password.as_deref()) {
                return Ok(());
            }
            if !self.is_running() {
                self.child = None;
                return Err(io::Error::other(format!(
                    "redis-server exited at start (port {}); see {}",
                    self.port,
                    self.log_path().display()
                )));
            }
            if Instant::now() >= deadline {
                self.stop()?;
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("redis-server did not answer PING on port {}", self.port),
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Nothing useful can be done with a failure while dropping.
        let _ = self.stop();
    }
}

/// A loopback port that was free a moment ago (the OS picks it; a race with another process
/// taking it is possible, which [`RedisServer::start`] handles by trying again).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Whether a Redis server at `addr` answers `PING` with `+PONG` right now, after `AUTH`
/// with `password` when one is given.
pub fn ping(addr: SocketAddr, password: Option<&str>) -> bool {
    let attempt = || -> io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut request: Vec<u8> = Vec::new();
        let mut expected: Vec<u8> = Vec::new();
        if let Some(password) = password {
            request.extend(resp_command(&["AUTH", password]));
            expected.extend(b"+OK\r\n");
        }
        request.extend(resp_command(&["PING"]));
        expected.extend(b"+PONG\r\n");
        stream.write_all(&request)?;
        let mut reply = vec![0u8; expected.len()];
        stream.read_exact(&mut reply)?;
        Ok(reply == expected)
    };
    attempt().unwrap_or(false)
}

/// `arguments` as one RESP command (an array of bulk strings), so a password may hold any
/// byte an inline command would split or end on.
fn resp_command(arguments: &[&str]) -> Vec<u8> {
    let mut command = format!("*{}\r\n", arguments.len()).into_bytes();
    for argument in arguments {
        command.extend(format!("${}\r\n", argument.len()).into_bytes());
        command.extend(argument.as_bytes());
        command.extend(b"\r\n");
    }
    command
}

/// How long a test cluster may take to agree on its slots, and after a master's death to
/// promote its replica.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);
/// How often a forming or failing-over cluster is asked how it is.
const CLUSTER_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Masters in a test cluster; each gets one replica.
const CLUSTER_MASTERS: usize = 3;
/// The cluster's node timeout (ms): how long a silent master takes to be judged failed,
/// after which its replica is promoted, within about two of these.
const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

/// A throw-away Redis Cluster on loopback: 3 masters and one replica each, six
/// `redis-server` child processes (cluster mode, each with its own cluster bus port), joined
/// by `redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`, and killed when
/// dropped. [`RedisCluster::master_of`] and [`RedisCluster::kill`] let a test SIGKILL the
/// master holding a key, and [`RedisCluster::wait_for_failover`] waits until its replica
/// serves the slot. `redis-cli` comes from `PATH`, or the `REDIS_CLI` environment variable.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the six nodes, creates the cluster, and waits until every node reports all
    /// slots served (`cluster_state:ok`) and every master has its replica in sync.
    pub fn start() -> io::Result<Self> {
        Self::start_with(None)
    }

    /// [`RedisCluster::start`] with every node demanding `password` of clients
    /// (`requirepass`) and giving it to its master (`masterauth`), as the Compose cluster's
    /// nodes do; [`RedisCluster::url`] carries it.
    pub fn start_with_password(password: &str) -> io::Result<Self> {
        Self::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> io::Result<Self> {
        let mut nodes = Vec::with_capacity(CLUSTER_MASTERS * 2);
        for _ in 0..CLUSTER_MASTERS * 2 {
            nodes.push(RedisServer::start_with_args(
                false,
                password.map(str::to_owned),
                |_port| {
                    let mut args: Vec<String> = password
                        .map(|password| vec!["--masterauth".into(), password.to_owned()])
                        .unwrap_or_default();
                    args.extend([
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                        "--cluster-node-timeout".into(),
                        CLUSTER_NODE_TIMEOUT_MS.to_string(),
                        // A replica takes over however long it was cut off from its master.
                        "--cluster-replica-validity-factor".into(),
                        "0".into(),
                        "--cluster-port".into(),
                        free_port()?.to_string(),
                    ]);
                    Ok(args)
                },
            )?);
        }
        let cluster = Self { nodes };
        cluster.create()?;
        cluster.wait_until(|cluster| cluster.is_healthy(None))?;
        Ok(cluster)
    }

    /// The URLs of every node, comma-separated (what `--redis` and `REDIS_URL` take).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URL of one node.
    pub fn node_url(&self, index: usize) -> Option<String> {
        self.nodes.get(index).map(RedisServer::url)
    }

    /// How many nodes there are (six).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The index of the node that is master of `key`'s slot now, as a live node sees it.
    pub fn master_of(&self, key: &str) -> io::Result<usize> {
        let (_, node) = self.any_live_node()?;
        let mut connection = sync_connection(node)?;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut connection)
            .map_err(io::Error::other)?;
        let port = slot_master_port(&mut connection, slot)?
            .ok_or_else(|| io::Error::other(format!("no master serves slot {slot}")))?;
        self.nodes
            .iter()
            .position(|node| node.port() == port)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "slot {slot} is served from port {port}, not one of ours"
                ))
            })
    }

    /// Kills node `index` (SIGKILL: no shutdown save, no goodbye to the cluster).
    pub fn kill(&mut self, index: usize) -> io::Result<()> {
        match self.nodes.get_mut(index) {
            Some(node) => node.stop(),
            None => Err(io::Error::other(format!("no node {index}"))),
        }
    }

    /// Starts node `index` again after [`RedisCluster::kill`], with its cluster state file,
    /// as a supervisor restarts a crashed process: a master that was replaced rejoins as a
    /// replica of its successor. Waits until the whole cluster is healthy again, every
    /// master with a replica in sync.
    pub fn restart(&mut self, index: usize) -> io::Result<()> {
        match self.nodes.get_mut(index) {
            Some(node) => node.restart()?,
            None => return Err(io::Error::other(format!("no node {index}"))),
        }
        self.wait_until(|cluster| cluster.is_healthy(None))
    }

    /// Waits until a node other than `dead` serves `key`'s slot as master and the cluster
    /// is whole again (`cluster_state:ok` on every live node).
    pub fn wait_for_failover(&self, key: &str, dead: usize) -> io::Result<()> {
        let dead_port = self.nodes.get(dead).map(RedisServer::port);
        self.wait_until(|cluster| {
            let (_, node) = cluster.any_live_node()?;
            let mut connection = sync_connection(node)?;
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query(&mut connection)
                .map_err(io::Error::other)?;
            let master = slot_master_port(&mut connection, slot)?;
            Ok(master.is_some() && master != dead_port && cluster.is_healthy(Some(dead))?)
        })
    }

    /// Runs `redis-cli --cluster create`, bounded by [`CLUSTER_DEADLINE`].
    fn create(&self) -> io::Result<()> {
        let binary = std::env::var_os("REDIS_CLI").unwrap_or_else(|| "redis-cli".into());
        let mut command = Command::new(binary);
        if let Some(password) = self.nodes.first().and_then(|node| node.password.as_deref()) {
            // Not `-a`: that would put the password on the command line.
            command.env("REDISCLI_AUTH", password);
        }
        command.args(["--cluster", "create"]);
        for node in &self.nodes {
            command.arg(node.addr().to_string());
        }
        let mut child = command
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        loop {
            if let Some(status) = child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(io::Error::other(format!(
                        "redis-cli --cluster create failed: {status}"
                    )))
                };
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "redis-cli --cluster create did not finish",
                ));
            }
            std::thread::sleep(CLUSTER_POLL_INTERVAL);
        }
    }

    /// Whether every live node but `skip` says `cluster_state:ok`, and every master among
    /// them has a replica in sync (`connected_slaves` ≥ 1).
    fn is_healthy(&self, skip: Option<usize>) -> io::Result<bool> {
        for (index, node) in self.nodes.iter().enumerate() {
            if Some(index) == skip {
                continue;
            }
            let mut connection = sync_connection(node)?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut connection)
                .map_err(io::Error::other)?;
            if !info.lines().any(|line| line.trim() == "cluster_state:ok") {
                return Ok(false);
            }
            if skip.is_none() {
                let replication: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut connection)
                    .map_err(io::Error::other)?;
                let master = replication.lines().any(|line| line.trim() == "role:master");
                let synced = replication
                    .lines()
                    .any(|line| line.starts_with("slave0:") && line.contains("state=online"));
                if master && !synced {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// A node that is running, with its index.
    fn any_live_node(&self) -> io::Result<(usize, &RedisServer)> {
        self.nodes
            .iter()
            .enumerate()
            .find(|(_, node)| node.child.is_some())
            .ok_or_else(|| io::Error::other("no node of the cluster is running"))
    }

    /// Polls `check` until it says yes (errors count as no), for at most
    /// [`CLUSTER_DEADLINE`].
    fn wait_until(&self, check: impl Fn(&Self) -> io::Result<bool>) -> io::Result<()> {
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        loop {
            let last = match check(self) {
                Ok(true) => return Ok(()),
                Ok(false) => "not there yet".to_owned(),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the test cluster did not settle: {last}"),
                ));
            }
            std::thread::sleep(CLUSTER_POLL_INTERVAL);
        }
    }
}

/// A synchronous connection to `node`, with short timeouts.
fn sync_connection(node: &RedisServer) -> io::Result<redis::Connection> {
    let client = redis::Client::open(node.url()).map_err(io::Error::other)?;
    let connection = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(io::Error::other)?;
    connection
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(io::Error::other)?;
    Ok(connection)
}

/// The port of the node that `CLUSTER NODES` (asked on `connection`) names as the master,
/// not failed, of `slot`.
fn slot_master_port(connection: &mut redis::Connection, slot: u16) -> io::Result<Option<u16>> {
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(connection)
        .map_err(io::Error::other)?;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        if !flags.split(',').any(|flag| flag == "master") || flags.contains("fail") {
            continue;
        }
        let serves = fields.iter().skip(8).any(|range| {
            let mut bounds = range.splitn(2, '-').map(str::parse::<u16>);
            match (bounds.next(), bounds.next()) {
                (Some(Ok(first)), Some(Ok(last))) => (first..=last).contains(&slot),
                (Some(Ok(only)), None) => only == slot,
                _ => false,
            }
        });
        if serves {
            let port = address
                .split('@')
                .next()
                .and_then(|host_port| host_port.rsplit(':').next())
                .and_then(|port| port.parse().ok());
            return Ok(port);
        }
    }
    Ok(None)
}
