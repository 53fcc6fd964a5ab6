//! Test support (cargo feature `testing`): a throw-away `redis-server` per test.
//!
//! [`RedisServer::start`] spawns `redis-server` on a free loopback port with its working
//! directory in a fresh temporary folder, waits until it answers `PING`, and kills it when
//! dropped, so tests never depend on a Redis being up already and never share one.
//! [`RedisServer::stop`] and [`RedisServer::restart`] kill and start it again on the same
//! port (and, with [`RedisServer::start_persistent`], the same data), for reconnect tests.
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
    child: Option<Child>,
}

impl RedisServer {
    /// Starts an in-memory server (no RDB snapshots, no AOF) on a free port.
    pub fn start() -> io::Result<Self> {
        Self::start_with(false)
    }

    /// Starts a server that keeps its data across [`RedisServer::restart`] (an append-only
    /// file, fsynced on every write, in the server's temporary folder).
    pub fn start_persistent() -> io::Result<Self> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> io::Result<Self> {
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let mut server = Self {
                port: free_port()?,
                dir: tempfile::Builder::new()
                    .prefix("p2pchat-redis-")
                    .tempdir()?,
                persistent,
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

    /// A connection URL for the `redis` crate (and `REDIS_URL`).
    pub fn url(&self) -> String {
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
        self.child = Some(command.spawn()?);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if ping(self.addr()) {
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

/// Whether a Redis server at `addr` answers `PING` with `+PONG` right now.
pub fn ping(addr: SocketAddr) -> bool {
    let attempt = || -> io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    attempt().unwrap_or(false)
}
