//! Test support (cargo feature `testing`): a throw-away `redis-server` per test.
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
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let mut server = Self {
                port: free_port()?,
                dir: tempfile::Builder::new()
                    .prefix("p2pchat-redis-")
                    .tempdir()?,
                persistent,
                password: password.clone(),
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
        let mut request = Vec::new();
        let mut expected = Vec::new();
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
