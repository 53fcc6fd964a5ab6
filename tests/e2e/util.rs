//! Helpers for the end-to-end tests: the real binaries as child processes on free loopback
//! ports, each with its own data dir, and a `redis-server` of their own.
//!
//! Every wait is for an event with a deadline ([`WAIT`]), never a bare sleep; every child is
//! killed when its handle drops, so a failing test leaves no process behind.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long any one expected event may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// The path of one of the workspace's binaries, built (if stale) once per test run.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // The test executable is target/<profile>/deps/e2e-…; the binaries sit in
        // target/<profile>.
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        // Built every time (a no-op when they are fresh): `cargo test` does not rebuild
        // another package's binaries, so a check for their existence alone ran the suite
        // against stale binaries after a change.
        let status = Command::new(env!("CARGO"))
            .args(["build", "--locked", "-p", "cli", "-p", "discovery"])
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building the binaries failed");
        dir
    });
    dir.join(name)
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// Waits until nothing accepts TCP connections on `address`.
pub fn wait_for_port_closed(address: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{address} still accepts connections"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to a child (what Docker and Ctrl-C-like shutdowns send).
fn terminate(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// Waits (bounded) for a child to exit; kills it if it does not.
fn reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + WAIT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                return child.wait().ok();
            }
        }
    }
}

/// How a child process is started: directly, or inside a namespace (network namespaces
/// for `netfaults`, a private mount namespace for `disk`).
#[derive(Debug, Clone, Default)]
pub struct Launcher {
    prefix: Vec<String>,
}

impl Launcher {
    /// Started as is, in this test's namespaces.
    pub fn direct() -> Self {
        Self::default()
    }

    /// Started in the network namespace `name` (`ip netns exec`, which execs: the child's
    /// pid is the program's).
    pub fn netns(name: &str) -> Self {
        Self {
            prefix: ["ip", "netns", "exec", name].map(str::to_owned).to_vec(),
        }
    }

    /// Started in the mount namespace of process `pid` (`nsenter` without a fork).
    pub fn mount_namespace_of(pid: u32) -> Self {
        Self {
            prefix: vec![
                "nsenter".to_owned(),
                "-t".to_owned(),
                pid.to_string(),
                "-m".to_owned(),
                "--".to_owned(),
            ],
        }
    }

    fn is_direct(&self) -> bool {
        self.prefix.is_empty()
    }

    /// A command that runs `program` this way.
    pub fn command(&self, program: &Path) -> Command {
        match self.prefix.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
        }
    }
}

/// How to start a [`Discovery`] other than the default way.
#[derive(Debug, Clone)]
pub struct DiscoveryOptions {
    /// Where it listens (and clients connect).
    pub address: SocketAddr,
    /// How the process is started.
    pub launcher: Launcher,
    /// Extra command-line arguments (`--heartbeat-secs 1`, ...).
    pub args: Vec<String>,
    /// The data dir; default: a fresh one in a tempdir.
    pub data_dir: Option<PathBuf>,
}

impl DiscoveryOptions {
    /// On a free loopback port, started directly, default settings.
    pub fn new() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], free_port())),
            launcher: Launcher::direct(),
            args: Vec::new(),
            data_dir: None,
        }
    }
}

/// A running `p2pchat-discovery`.
pub struct Discovery {
    /// Where clients connect.
    pub address: SocketAddr,
    /// Its data dir (embedded store, operator secret).
    pub data_dir: PathBuf,
    redis_url: Option<String>,
    launcher: Launcher,
    args: Vec<String>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Discovery {
    /// Starts a server with the embedded store.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts a server on Redis at `url`.
    pub fn start_with(redis_url: Option<String>) -> Self {
        Self::start_custom(redis_url, DiscoveryOptions::new())
    }

    /// Starts a server as `options` say (embedded store unless `redis_url`).
    pub fn start_custom(redis_url: Option<String>, options: DiscoveryOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = Self {
            address: options.address,
            data_dir: options
                .data_dir
                .unwrap_or_else(|| dir.path().join("discovery")),
            redis_url,
            launcher: options.launcher,
            args: options.args,
            child: None,
            _dir: dir,
        };
        // A "free" loopback port can be taken by another test between the check and the
        // bind; the server then exits at once, and a directly started one tries another.
        for _ in 0..5 {
            match server.try_spawn() {
                Ok(()) => return server,
                Err(error) if server.launcher.is_direct() && server.address.ip().is_loopback() => {
                    eprintln!(
                        "discovery could not use {}; trying another port: {error}",
                        server.address
                    );
                    server.address.set_port(free_port());
                }
                Err(error) => panic!("discovery did not start on {}: {error}", server.address),
            }
        }
        panic!("discovery did not start on any of 5 free ports");
    }

    fn spawn(&mut self) {
        if let Err(error) = self.try_spawn() {
            panic!("discovery did not start on {}: {error}", self.address);
        }
    }

    /// Starts the process and waits until it listens; `Err` with its log if it exited.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self._dir.path().join("discovery.log")).expect("log");
        let mut command = self.launcher.command(&binary("p2pchat-discovery"));
        command
            .arg("--listen")
            .arg(self.address.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(url) = &self.redis_url {
            command.arg("--redis").arg(url);
        }
        self.child = Some(command.spawn().expect("start p2pchat-discovery"));
        // Wait for its own word that it listens (a bare connect could reach another process
        // that took the port first, and its address may not be reachable from here).
        let deadline = Instant::now() + WAIT;
        while !self.log().contains("discovery server listening") {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            assert!(
                Instant::now() < deadline,
                "discovery did not start within {WAIT:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops it with SIGTERM (graceful) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&child);
            let status = reap(&mut child);
            assert!(
                status.is_some_and(|status| status.success()),
                "discovery did not shut down cleanly: {status:?}\n{}",
                self.log()
            );
        }
        if self.launcher.is_direct() {
            wait_for_port_closed(self.address);
        }
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.launcher.is_direct() {
            wait_for_port_closed(self.address);
        }
    }

    /// Starts it again on the same address with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again after [`Discovery::kill`] or [`Discovery::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// `p2pchat-discovery announce <text>` against this server.
    pub fn announce(&self, text: &str) -> Output {
        self.operator(&["announce", text])
    }

    /// `p2pchat-discovery release-name <name>` against this server.
    pub fn release_name(&self, name: &str) -> Output {
        self.operator(&["release-name", name])
    }

    /// An operator command (`p2pchat-discovery <args> --server <this one>`) with this
    /// server's data dir.
    fn operator(&self, args: &[&str]) -> Output {
        let mut command = Command::new(binary("p2pchat-discovery"));
        command
            .args(["--data-dir"])
            .arg(&self.data_dir)
            .args(args)
            .arg("--server")
            .arg(self.address.to_string());
        run_bounded(command)
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("discovery.log")).unwrap_or_default()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a command to completion, killing it if it takes longer than [`WAIT`].
pub fn run_bounded(mut command: Command) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

/// One user's side: a name and a data dir that outlives the processes started for it.
pub struct User {
    /// The username.
    pub name: String,
    /// `P2PCHAT_HOME` for this user's processes.
    pub home: PathBuf,
    _dir: tempfile::TempDir,
}

impl User {
    /// A new user with an empty data dir.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self {
            name: name.to_owned(),
            home: dir.path().join("home"),
            _dir: dir,
        }
    }

    fn command(&self, server: &Discovery) -> Command {
        self.command_via(server, &Launcher::direct())
    }

    fn command_via(&self, server: &Discovery, launcher: &Launcher) -> Command {
        let mut command = launcher.command(&binary("p2pchat"));
        command
            .env("P2PCHAT_SERVER", server.address.to_string())
            .env("P2PCHAT_USER", &self.name)
            .env("P2PCHAT_HOME", &self.home)
            .env("RUST_LOG", "warn");
        command
    }

    /// `p2pchat send <to> <message>`, to completion.
    pub fn send(&self, server: &Discovery, to: &str, message: &str) -> Output {
        let mut command = self.command(server);
        command.args(["send", to, message]);
        run_bounded(command)
    }

    /// Registers once (so the name and keys are known to the server and to peers' lookups),
    /// then goes offline.
    pub fn register_and_leave(&self, server: &Discovery) {
        let mut listener = self.listen(server);
        listener.online();
        listener.stop();
    }

    /// Starts `p2pchat listen --json`.
    pub fn listen(&self, server: &Discovery) -> Listener {
        self.listen_custom(server, &Launcher::direct(), &[], &[])
    }

    /// Starts `p2pchat listen --json` via `launcher`, with extra global arguments (before
    /// `listen`) and environment variables.
    pub fn listen_custom(
        &self,
        server: &Discovery,
        launcher: &Launcher,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Listener {
        let mut command = self.command_via(server, launcher);
        command
            .args(args)
            .args(["listen", "--json"])
            .envs(envs.iter().copied());
        Listener::spawn(command)
    }

    /// `p2pchat <args>` with extra environment variables, to completion.
    pub fn run(&self, server: &Discovery, envs: &[(&str, &str)], args: &[&str]) -> Output {
        let mut command = self.command(server);
        command.args(args).envs(envs.iter().copied());
        run_bounded(command)
    }

    /// `p2pchat send <to> <message>` via `launcher` with extra environment variables, to
    /// completion.
    pub fn send_custom(
        &self,
        server: &Discovery,
        launcher: &Launcher,
        envs: &[(&str, &str)],
        to: &str,
        message: &str,
    ) -> Output {
        let mut command = self.command_via(server, launcher);
        command
            .args(["send", to, message])
            .envs(envs.iter().copied());
        run_bounded(command)
    }
}

/// A running `p2pchat listen --json`, its output lines parsed as they arrive.
pub struct Listener {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<Value>,
    /// Events received but not yet matched by an [`Listener::expect`], in order.
    unmatched: std::collections::VecDeque<Value>,
    /// Every event received so far, in order.
    pub seen: Vec<Value>,
}

impl Listener {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start p2pchat listen");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(value) => {
                        if sender.send(value).is_err() {
                            break;
                        }
                    }
                    Err(error) => {
                        panic!("listen printed a line that is not JSON ({error}): {line}")
                    }
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            unmatched: std::collections::VecDeque::new(),
            seen: Vec::new(),
        }
    }

    /// Runs one command (interactive syntax) through standard input and returns its
    /// `result` object.
    pub fn run(&mut self, line: &str) -> Value {
        self.submit(line);
        self.result(line)
    }

    /// Writes one command (interactive syntax) to standard input without waiting for its
    /// result, so a test can queue a burst; [`Listener::result`] waits for it later.
    pub fn submit(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").expect("write a command");
        self.stdin.flush().expect("flush");
    }

    /// Waits for the `result` object of a command written earlier by [`Listener::submit`].
    pub fn result(&mut self, line: &str) -> Value {
        self.expect(&format!("the result of {line:?}"), |event| {
            event["event"] == "result" && event["command"] == line
        })
    }

    /// Runs a command that must succeed; returns its `result` object.
    pub fn ok(&mut self, line: &str) -> Value {
        let result = self.run(line);
        assert_eq!(result["ok"], true, "{line:?} failed: {result}");
        result
    }

    /// Waits for the first not-yet-matched event matching `wanted` (it may already have
    /// arrived while waiting for another) and returns it.
    pub fn expect(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        if let Some(index) = self.unmatched.iter().position(&wanted) {
            return self.unmatched.remove(index).expect("index in range");
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(value) => {
                    self.seen.push(value.clone());
                    if wanted(&value) {
                        return value;
                    }
                    self.unmatched.push_back(value);
                }
                Err(_) => panic!("no {what} within {WAIT:?}; saw {:#?}", self.seen),
            }
        }
    }

    /// Waits until the client is online (true) or has exited (false: it could not start,
    /// e.g. its `--port` was taken meanwhile).
    pub fn online_or_exited(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(value) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(value.clone());
                if value["event"] == "online" {
                    return true;
                }
                self.unmatched.push_back(value);
            } else if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
        }
        panic!(
            "neither online nor exited within {WAIT:?}; saw {:#?}",
            self.seen
        )
    }

    /// Waits until the client is online.
    pub fn online(&mut self) {
        self.expect("online event", |event| event["event"] == "online");
    }

    /// Waits for a message with `body` and returns it.
    pub fn message(&mut self, body: &str) -> Value {
        self.expect(&format!("message {body:?}"), |event| {
            event["event"] == "message" && event["body"] == body
        })
    }

    /// Collects every event that arrives within `quiet` of the previous one (used only to
    /// check that nothing *more* arrives, after the expected events were awaited).
    pub fn drain_for(&mut self, quiet: Duration) -> Vec<Value> {
        let mut extra: Vec<Value> = self.unmatched.drain(..).collect();
        while let Ok(value) = self.lines.recv_timeout(quiet) {
            self.seen.push(value.clone());
            extra.push(value);
        }
        extra
    }

    /// Messages seen so far with `body`.
    pub fn count(&self, body: &str) -> usize {
        self.seen
            .iter()
            .filter(|event| event["event"] == "message" && event["body"] == body)
            .count()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// Messages seen so far, in order, as (from, body).
    pub fn messages(&self) -> Vec<(String, String)> {
        self.seen
            .iter()
            .filter(|event| event["event"] == "message")
            .map(|event| {
                let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
                (text("from"), text("body"))
            })
            .collect()
    }

    /// Stops it with SIGTERM and waits.
    pub fn stop(mut self) {
        terminate(&self.child);
        reap(&mut self.child);
    }

    /// Kills it with SIGKILL.
    pub fn kill(mut self) {
        self.kill_now();
    }

    /// Kills it with SIGKILL and waits for it, keeping what it printed (`seen`).
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// Asserts a scripted command failed and said something containing `wanted` on stderr.
pub fn assert_failed(output: &Output, wanted: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains(wanted),
        "expected a failure mentioning {wanted:?}; status {:?}\nstderr: {stderr}",
        output.status
    );
}

/// Asserts a scripted command succeeded and printed `wanted` on stdout.
pub fn assert_sent(output: &Output, wanted: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(wanted),
        "expected success with {wanted:?}; status {:?}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
}

/// The resident memory of process `pid` in KiB (`VmRSS` in /proc), 0 if it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Whether the long variants were asked for (`P2PCHAT_LONG_TESTS=1`): bigger counts, more
/// rounds. The default versions are what CI runs and stay within seconds.
pub fn long_tests() -> bool {
    std::env::var("P2PCHAT_LONG_TESTS").is_ok_and(|value| value == "1")
}

/// `short` normally, `long` with `P2PCHAT_LONG_TESTS=1`.
pub fn scaled(short: usize, long: usize) -> usize {
    if long_tests() { long } else { short }
}

/// Why a root-only test cannot run here, if it cannot: not root, or `program` missing.
pub fn root_tools_missing(programs: &[&str]) -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next().map(str::to_owned))
        });
    if uid.as_deref() != Some("0") {
        return Some("not running as root".to_owned());
    }
    for program in programs {
        let found = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("`{program}` is not installed"));
        }
    }
    None
}

/// Opens a raw peer-protocol connection to `addr` as the holder of `identity` (the Noise
/// handshake, expecting `to_keys` at the other end) and says hello as `from` to `to`.
pub async fn raw_peer(
    addr: SocketAddr,
    identity: &proto::Identity,
    from: &str,
    to: &str,
    to_keys: &proto::PublicKeys,
) -> anyhow::Result<proto::Connection<tokio::net::TcpStream>> {
    let name = |text: &str| proto::Username::new(text);
    let mut connection = proto::Connection::new(tokio::net::TcpStream::connect(addr).await?);
    connection
        .dial_handshake(identity, &to_keys.exchange, WAIT)
        .await?;
    connection
        .send(&proto::PeerMsg::Hello {
            from: name(from)?,
            to: name(to)?,
        })
        .await?;
    Ok(connection)
}

/// The next message from a raw peer connection (an error if it closes or is silent).
pub async fn answer(
    connection: &mut proto::Connection<tokio::net::TcpStream>,
) -> anyhow::Result<proto::PeerMsg> {
    use anyhow::Context as _;
    tokio::time::timeout(WAIT, connection.recv::<proto::PeerMsg>())
        .await??
        .context("the peer closed the connection")
}

/// Claims one of `user`'s published keys at the server `server`, as any registered user
/// may (a throwaway user registers for it).
pub async fn claim_prekey(
    server: SocketAddr,
    user: &str,
) -> anyhow::Result<proto::ratchet::PreKeyBundle> {
    use anyhow::{Context as _, bail};
    use proto::{Reply, Request, RequestFrame, ServerMsg};
    let mut connection = proto::Connection::new(tokio::net::TcpStream::connect(server).await?);
    let secured = connection.client_handshake(WAIT).await?;
    let nonce = match connection.recv::<ServerMsg>().await? {
        Some(ServerMsg::Challenge { nonce }) => nonce,
        other => bail!("expected a challenge, got {other:?}"),
    };
    let identity = proto::Identity::generate();
    let claimer = proto::Username::new(&format!(
        "claimer{}",
        u32::from_be_bytes(proto::random_bytes())
    ))?;
    let transcript = proto::identity::registration_transcript(
        &nonce,
        &secured.handshake_hash,
        &claimer,
        identity.public(),
    );
    let requests = [
        Request::Register(proto::Registration {
            user: claimer,
            keys: identity.public().clone(),
            listen_ports: Vec::new(),
            signature: identity.sign(&transcript),
        }),
        Request::ClaimPreKey {
            user: proto::Username::new(user)?,
        },
    ];
    let mut last = None;
    for (id, request) in (1..).zip(requests) {
        connection.send(&RequestFrame { id, request }).await?;
        loop {
            match tokio::time::timeout(WAIT, connection.recv::<ServerMsg>())
                .await??
                .context("the server closed the connection")?
            {
                ServerMsg::Response {
                    id: answered,
                    result,
                } if answered == id => {
                    last = Some(result.map_err(|error| anyhow::anyhow!("{error}"))?);
                    break;
                }
                _ => continue,
            }
        }
    }
    match last {
        Some(Reply::PreKey(bundle)) => Ok(bundle),
        other => bail!("expected a prekey, got {other:?}"),
    }
}

/// A sender played by hand: an Olm account of its own for `from` (bound by `identity`,
/// which need not be `from`'s: a forger's) and a session with `to`, started from a key
/// claimed at the server. What it seals opens at `to` as a real client's messages do.
pub struct RawSender {
    to: proto::Username,
    account: proto::ratchet::OwnAccount,
    sessions: proto::ratchet::Sessions,
}

impl RawSender {
    /// Starts a session from `from` (holding `identity`) to `to` (whose keys are `to_keys`).
    pub async fn start(
        server: SocketAddr,
        identity: &proto::Identity,
        from: &str,
        to: &str,
        to_keys: &proto::PublicKeys,
    ) -> anyhow::Result<Self> {
        let (from, to) = (proto::Username::new(from)?, proto::Username::new(to)?);
        let account = proto::ratchet::OwnAccount::generate(identity, &from);
        let bundle = claim_prekey(server, to.as_str()).await?;
        let mut sessions = proto::ratchet::Sessions::default();
        sessions.start(&account, &to, to_keys, &bundle)?;
        Ok(Self {
            to,
            account,
            sessions,
        })
    }

    /// [`RawSender::start`] on a runtime of its own, for synchronous tests.
    pub fn start_blocking(
        server: SocketAddr,
        identity: &proto::Identity,
        from: &str,
        to: &str,
        to_keys: &proto::PublicKeys,
    ) -> Self {
        tokio::runtime::Runtime::new()
            .expect("tokio runtime")
            .block_on(Self::start(server, identity, from, to, to_keys))
            .expect("a session with the recipient")
    }

    /// Seals the next message, written now.
    pub fn seal(&mut self, body: &str) -> proto::Envelope {
        self.sessions
            .seal(
                &self.account,
                &self.to,
                proto::MessageId::random(),
                body,
                proto::now_ms(),
            )
            .expect("seal")
    }
}
