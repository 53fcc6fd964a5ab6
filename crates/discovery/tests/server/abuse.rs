//! Abuse limits (issue 12): each test drives one limit with a bounded loop and checks the
//! refusal a client sees, its metric, and that honest clients keep working.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Stdio,
    time::Duration,
};

use discovery::Config;
use proto::{Connection, ErrorCode, ErrorReply, Reply, Request, RequestFrame, ServerMsg};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::Instant,
};

use crate::util::*;

/// Sends a refused `Heartbeat` every `every` from an unregistered connection until the
/// server closes it; returns the closing reason and how long after the connect it came.
async fn heartbeat_until_closed(client: &mut Client, every: Duration) -> (ErrorReply, Duration) {
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < WAIT,
            "the unregistered connection was never closed"
        );
        let heartbeat = RequestFrame {
            id: 1,
            request: Request::Heartbeat,
        };
        let sent = client.connection.send(&heartbeat).await;
        let pause = tokio::time::sleep(every);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                message = client.connection.recv::<ServerMsg>() => match message {
                    Ok(Some(ServerMsg::Closing(reason))) => return (reason, started.elapsed()),
                    Ok(Some(_)) if sent.is_ok() => {}
                    other => panic!("expected a closing reason, got {other:?}"),
                },
            }
        }
    }
}

/// Regression: every request, even a refused `Heartbeat`, pushed the registration deadline
/// back, so a heartbeat every 8 s held an unregistered socket 44 s against a 10 s timeout.
#[tokio::test]
async fn refused_requests_do_not_extend_the_registration_deadline() {
    let timeout = Duration::from_millis(1000);
    let server = Server::embedded(Config {
        handshake_timeout: timeout,
        ..config()
    })
    .await;
    let mut idler = Client::connect(server.address, "idler").await;
    let (reason, after) = heartbeat_until_closed(&mut idler, timeout / 5).await;
    assert_eq!(reason.code, ErrorCode::BadRequest);
    assert!(reason.message.contains("no registration"), "{reason}");
    assert!(after < timeout + timeout / 2, "closed only after {after:?}");
    assert_eq!(server.metrics.registration_timeouts.get(), 1);
    server.stop().await;
}

/// Regression: before registration a client could send (or declare) a 64 KiB frame; now
/// frames are limited to a few KiB until it registers, and to the full 64 KiB after.
#[tokio::test]
async fn frames_before_registration_are_limited_to_a_few_kib() {
    let server = Server::embedded(Config {
        handshake_timeout: Duration::from_secs(3),
        ..config()
    })
    .await;
    let reason = after_hello_send(server.address, &5000u32.to_be_bytes())
        .await
        .expect("a closing reason");
    assert_eq!(reason.code, ErrorCode::TooLarge);
    assert!(reason.message.contains("before registration"), "{reason}");
    assert_eq!(server.metrics.preauth_oversized_frames.get(), 1);

    // A registered client may send a frame of twice the limit before registration.
    let mut alice = Client::connect(server.address, "alice").await;
    let mut bob = Client::connect(server.address, "bob").await;
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let envelope = alice.seal_for(&bob, &"x".repeat(8 * 1024));
    assert!(proto::wire::encoded_len(&envelope).unwrap() > 8 * 1024);
    alice.request(Request::Deposit { envelope }).await.unwrap();
    server.stop().await;
}

/// A free loopback port (taken for a moment by the OS, then left for the server).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real `p2pchat-discovery` binary, run with an open-file limit of `open_files` (soft
/// and hard) and umask 022, its log kept.
struct Process {
    child: tokio::process::Child,
    address: SocketAddr,
    metrics: SocketAddr,
    log: Option<tokio::task::JoinHandle<String>>,
}

impl Process {
    /// Starts the server on `data_dir` and waits until it listens; `Err` with its log if it
    /// exits first.
    async fn start(open_files: u64, data_dir: &Path, extra: &[&str]) -> Result<Self, String> {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -n "$0" && umask 022 && exec "$@""#)
            .arg(open_files.to_string())
            .arg(env!("CARGO_BIN_EXE_p2pchat-discovery"))
            .args(["--listen", &address.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = String::new();
        let listening = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                log.push_str(&line);
                log.push('\n');
                if line.contains("discovery server listening") {
                    return true;
                }
            }
            false
        })
        .await
        .expect("the server neither listened nor exited");
        if !listening {
            return Err(log);
        }
        // Keep reading the log, so the server never blocks on a full pipe.
        let log = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                log.push_str(&line);
                log.push('\n');
            }
            log
        });
        Ok(Self {
            child,
            address,
            metrics,
            log: Some(log),
        })
    }

    /// One metric's value from `--metrics`.
    async fn metric(&self, name: &str) -> u64 {
        let mut stream = TcpStream::connect(self.metrics).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
            .await
            .unwrap()
            .unwrap();
        response
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in {response}"))
    }

    /// Stops the server and returns its log.
    async fn stop(mut self) -> String {
        self.child.kill().await.unwrap();
        let log = self.log.take().unwrap();
        tokio::time::timeout(WAIT, log).await.unwrap().unwrap()
    }
}

/// Connects and says hello; the server's first frame after its hello.
async fn first_frame(address: SocketAddr) -> (Connection<TcpStream>, ServerMsg) {
    let stream = TcpStream::connect(address).await.unwrap();
    first_frame_over(stream).await
}

/// Says hello on `stream`; the server's first frame after its hello.
async fn first_frame_over(stream: TcpStream) -> (Connection<TcpStream>, ServerMsg) {
    let mut connection = Connection::new(stream);
    connection
        .client_handshake(WAIT)
        .await
        .expect("a handshake with the server");
    let frame = tokio::time::timeout(WAIT, connection.recv::<ServerMsg>())
        .await
        .expect("an answer after the hello")
        .unwrap()
        .expect("a frame, not a bare close");
    (connection, frame)
}

/// Regression: the cap (200,000) ignored the open-file limit (20,000): a crowd exhausted the
/// descriptors, accept failed ("Too many open files", 471 times), honest clients timed out
/// and no one was told `server_busy`. Now the cap sits under the limit, and everyone over it
/// is told `server_busy`.
#[tokio::test]
async fn at_the_open_file_limit_new_connections_get_server_busy_not_accept_errors() {
    let parent = tempfile::tempdir().unwrap();
    let server = Process::start(
        150,
        &parent.path().join("data"),
        &[
            "--open-file-reserve",
            "50",
            "--handshake-timeout-secs",
            "60",
        ],
    )
    .await
    .unwrap();
    assert_eq!(server.metric("p2pchat_connection_cap").await, 100);
    let mut held = Vec::new();
    let mut busy = 0;
    // More connections than the 150 descriptors could hold, one after another.
    for _ in 0..160 {
        match first_frame(server.address).await {
            (connection, ServerMsg::Challenge { .. }) => held.push(connection),
            (_, ServerMsg::Closing(reason)) if reason.code == ErrorCode::ServerBusy => busy += 1,
            (_, other) => panic!("expected a challenge or server_busy, got {other:?}"),
        }
    }
    assert_eq!((held.len(), busy), (100, 60));

    // Once the crowd leaves, an honest client gets in (as soon as the server has seen the
    // crowd's connections close).
    drop(held);
    let deadline = Instant::now() + WAIT;
    loop {
        match first_frame(server.address).await {
            (_, ServerMsg::Challenge { .. }) => break,
            (_, ServerMsg::Closing(reason)) if reason.code == ErrorCode::ServerBusy => {
                assert!(Instant::now() < deadline, "the server stayed busy");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (_, other) => panic!("expected a challenge, got {other:?}"),
        }
    }
    assert!(server.metric("p2pchat_refused_connections_total").await >= 60);
    assert_eq!(server.metric("p2pchat_accept_errors_total").await, 0);
    let log = server.stop().await;
    assert!(!log.contains("accept failed"), "{log}");
}

/// Regression: sessions per user were unlimited (10,000 sessions of one user made every
/// deposit to him fan out 10,000 pushes). Now a session over the limit closes the oldest,
/// which is told why; the newer ones keep working.
#[tokio::test]
async fn a_session_over_the_per_user_limit_closes_the_oldest() {
    let server = Server::embedded(Config {
        max_sessions_per_user: 3,
        ..config()
    })
    .await;
    // One identity, kept on disk: each session loads its own copy, as a process would.
    let keys = tempfile::tempdir().unwrap();
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    proto::Identity::generate().save(keys.path()).unwrap();
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let identity = proto::Identity::load(keys.path()).unwrap();
        let mut session = Client::connect_as(server.address, "alice", identity).await;
        session.register().await.unwrap();
        sessions.push(session);
    }
    let mut oldest = sessions.remove(0);
    let reason = Client::closed_with(&mut oldest.connection)
        .await
        .expect("a closing reason");
    assert_eq!(reason.code, ErrorCode::SessionLimit);
    assert!(reason.message.contains("limit of 3 sessions"), "{reason}");
    for session in &mut sessions {
        assert!(online(session.lookup("alice").await));
    }
    assert_eq!(server.metrics.sessions_evicted.get(), 1);
    assert_eq!(server.metrics.errors(ErrorCode::SessionLimit), 1);
    server.stop().await;
}

/// Regression: the server accepted an existing 0755 data dir. Now it refuses to start,
/// saying which folder and what to run.
#[tokio::test]
async fn a_data_dir_other_users_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = match Process::start(1024, dir.path(), &[]).await {
        Ok(server) => panic!("started on a 0755 data dir: {}", server.stop().await),
        Err(log) => log,
    };
    assert!(log.contains("755") && log.contains("chmod 700"), "{log}");
    assert!(!dir.path().join("store.redb").exists());
}

/// Regression: `store.redb` was written 0644 (the umask's mode). Now the data dir is 0700
/// and every file the server writes in it 0600.
#[tokio::test]
async fn every_file_the_server_writes_is_private() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let server = Process::start(1024, &dir, &[]).await.unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    assert_eq!(mode("store.redb"), 0o600);
    assert_eq!(mode("operator.secret"), 0o600);
    server.stop().await;
}

#[tokio::test]
async fn metrics_connections_beyond_the_cap_are_closed_and_scrapes_work_again_after() {
    use discovery::metrics::{self, MAX_METRICS_CONNECTIONS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(metrics::serve(
        listener,
        std::sync::Arc::new(discovery::Metrics::default()),
        shutdown.clone(),
    ));
    let scrape = || async move {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        // A refused connection may be closed before the request is written, or reset.
        let _ = stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await;
        let mut response = String::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            stream.read_to_string(&mut response),
        )
        .await
        .expect("a metrics response in time");
        response
    };
    // Idle connections that send no request hold every slot.
    let mut idle = Vec::new();
    for _ in 0..MAX_METRICS_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    // Each idle connection has its task once a scrape behind them has been answered or
    // refused; one more is closed at once, without an answer.
    let mut refused = false;
    for _ in 0..50 {
        if scrape().await.is_empty() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "a connection beyond the cap is closed unanswered");
    // The idle ones leave; scrapes are answered again.
    drop(idle);
    let mut answered = false;
    for _ in 0..200 {
        if scrape().await.contains("p2pchat_") {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answered, "scrapes are answered once the crowd has gone");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("the endpoint stops")
        .unwrap();
}

/// The loopback address 127.0.0.`last`, a client machine of its own.
fn source(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// One address holds at most its per-IP share of connections: one more is told
/// `server_busy` (naming the address's limit) while another address connects and registers;
/// once the crowd leaves, the address connects again (its count went back down).
#[tokio::test]
async fn connections_from_one_address_are_limited_and_given_back() {
    let server = Server::embedded(Config {
        per_ip_connections: 3,
        handshake_timeout: Duration::from_secs(60),
        ..config()
    })
    .await;
    let mut crowd = Vec::new();
    for _ in 0..3 {
        match first_frame_over(connect_from(server.address, source(2)).await).await {
            (connection, ServerMsg::Challenge { .. }) => crowd.push(connection),
            (_, other) => panic!("expected a challenge, got {other:?}"),
        }
    }
    match first_frame_over(connect_from(server.address, source(2)).await).await {
        (_, ServerMsg::Closing(reason)) => {
            assert_eq!(reason.code, ErrorCode::ServerBusy);
            assert!(reason.message.contains("from your address"), "{reason}");
            assert!(reason.message.contains("3 at once"), "{reason}");
        }
        (_, other) => panic!("expected server_busy, got {other:?}"),
    }
    // Another address is not affected.
    let mut honest = Client::connect_from(server.address, source(3), "honest").await;
    honest.register().await.unwrap();
    assert_eq!(server.metrics.per_ip_refused_connections.get(), 1);
    assert_eq!(server.metrics.errors(ErrorCode::ServerBusy), 1);

    // The crowd leaves: as soon as the server has seen it go, the address connects again.
    drop(crowd);
    let deadline = Instant::now() + WAIT;
    let mut back = Vec::new();
    while back.len() < 3 {
        match first_frame_over(connect_from(server.address, source(2)).await).await {
            (connection, ServerMsg::Challenge { .. }) => back.push(connection),
            (_, ServerMsg::Closing(reason)) if reason.code == ErrorCode::ServerBusy => {
                assert!(Instant::now() < deadline, "the address stayed at its limit");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (_, other) => panic!("expected a challenge, got {other:?}"),
        }
    }
    server.stop().await;
}

/// All connections of one address share one request budget: spread over two connections,
/// requests past it are refused `rate_limited` (naming the per-address limit), while a
/// client from another address keeps working.
#[tokio::test]
async fn requests_from_one_address_share_one_rate() {
    let server = Server::embedded(Config {
        per_ip_requests_per_second: 1,
        per_ip_request_burst: 6,
        ..config()
    })
    .await;
    let mut alice = Client::connect_from(server.address, source(2), "alice").await;
    let mut bob = Client::connect_from(server.address, source(2), "bob").await;
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let mut refusal = None;
    for round in 0..10 {
        let client = if round % 2 == 0 { &mut alice } else { &mut bob };
        if let Err(error) = client.lookup("alice").await {
            refusal = Some(error);
            break;
        }
    }
    let refusal = refusal.expect("the address's shared budget ran out");
    assert_eq!(refusal.code, ErrorCode::RateLimited);
    assert!(refusal.message.contains("from your address"), "{refusal}");
    assert!(server.metrics.per_ip_rate_limited.get() >= 1);

    // Another address has its own budget.
    let mut carol = Client::connect_from(server.address, source(3), "carol").await;
    carol.register().await.unwrap();
    for _ in 0..4 {
        assert!(online(carol.lookup("alice").await));
    }
    server.stop().await;
}

/// Past its hourly budget of new names, an address is refused a new name with
/// `rate_limited` (counted), while its existing names reconnect and another address binds
/// new names; closing and reopening connections does not reset the budget.
#[tokio::test]
async fn new_names_from_one_address_are_limited() {
    let server = Server::embedded(Config {
        per_ip_new_names_per_hour: 2,
        ..config()
    })
    .await;
    let mut alice = Client::connect_from(server.address, source(2), "alice").await;
    alice.register().await.unwrap();
    let mut bob = Client::connect_from(server.address, source(2), "bob").await;
    bob.register().await.unwrap();
    let alice = alice.disconnect(&mut bob).await;
    drop(bob);
    let mut squatter = Client::connect_from(server.address, source(2), "carol").await;
    let refused = squatter.register().await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::RateLimited);
    assert!(refused.message.contains("2 an hour"), "{refused}");
    assert_eq!(server.metrics.per_ip_names_refused.get(), 1);
    // Alice's name is hers already: she registers again from the same address.
    let mut alice = alice.reconnect_from(server.address, source(2)).await;
    alice.register().await.unwrap();
    // Another address binds a new name.
    let mut carol = Client::connect_from(server.address, source(3), "carol").await;
    carol.register().await.unwrap();
    server.stop().await;
}

/// Past its budget of deposits a minute, a sender is refused with `rate_limited` and when
/// to try again (counted), across all of its sessions, while another sender's mail to the
/// same mailbox is taken; a byte budget an hour works the same way.
#[tokio::test]
async fn deposits_beyond_a_senders_budget_are_refused_with_when_to_retry() {
    let server = Server::embedded(Config {
        deposits_per_minute: 5,
        ..config()
    })
    .await;
    // One identity, two sessions (two processes of one user).
    let keys = tempfile::tempdir().unwrap();
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    proto::Identity::generate().save(keys.path()).unwrap();
    let session = || proto::Identity::load(keys.path()).unwrap();
    let mut mallory = Client::connect_as(server.address, "mallory", session()).await;
    let mut mallory_again = Client::connect_as(server.address, "mallory", session()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    let bob = Client::connect(server.address, "bob").await;
    mallory.register().await.unwrap();
    mallory_again.register().await.unwrap();
    alice.register().await.unwrap();
    let mut bob = bob;
    bob.register().await.unwrap();
    let mut refusal = None;
    for round in 0..20 {
        let client = if round % 2 == 0 {
            &mut mallory
        } else {
            &mut mallory_again
        };
        let envelope = client.seal_for(&bob, "buy now");
        match client.request(Request::Deposit { envelope }).await {
            Ok(Reply::Deposited { .. }) => {}
            Ok(other) => panic!("unexpected reply {other:?}"),
            Err(error) => {
                refusal = Some((round, error));
                break;
            }
        }
    }
    let (round, refusal) = refusal.expect("the sender's budget ran out");
    assert_eq!(round, 5, "five a minute, both sessions together");
    assert_eq!(refusal.code, ErrorCode::RateLimited);
    assert!(refusal.message.contains("try again in"), "{refusal}");
    assert_eq!(server.metrics.deposits_over_budget.get(), 1);

    // Another sender's mail to the same mailbox is taken.
    let envelope = alice.seal_for(&bob, "lunch?");
    assert!(matches!(
        alice.request(Request::Deposit { envelope }).await,
        Ok(Reply::Deposited { .. })
    ));
    server.stop().await;

    let server = Server::embedded(Config {
        // Two sealed 8 KiB messages fit, a third does not.
        deposit_bytes_per_hour: 28 * 1024,
        ..config()
    })
    .await;
    let mut mallory = Client::connect(server.address, "mallory").await;
    let mut bob = Client::connect(server.address, "bob").await;
    mallory.register().await.unwrap();
    bob.register().await.unwrap();
    let big = "x".repeat(8 * 1024);
    for _ in 0..2 {
        let envelope = mallory.seal_for(&bob, &big);
        mallory
            .request(Request::Deposit { envelope })
            .await
            .unwrap();
    }
    let envelope = mallory.seal_for(&bob, &big);
    let refusal = mallory
        .request(Request::Deposit { envelope })
        .await
        .unwrap_err();
    assert_eq!(refusal.code, ErrorCode::RateLimited);
    assert!(refusal.message.contains("an hour"), "{refusal}");
    server.stop().await;
}
