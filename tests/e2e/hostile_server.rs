//! Hostile clients against the real discovery server while two real users chat through
//! their real clients (`p2pchat listen --json`), counting every honest message.
//!
//! The attack, all at once and bounded: sockets that connect and never register (held
//! until the registration deadline), a crowd of connections from one address beyond the
//! per-address cap, a registered client flooding an offline user's mailbox (through the
//! peer runtime, as a real client would), and more sessions of one identity than the
//! per-user limit. Each is checked to have met its limit (closed at the deadline,
//! `server_busy`, `rate_limited` with the message kept for later, `session_limit`), and
//! the honest users' messages each arrive exactly once.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use peer::{Config, DeliveryStatus, Event, FailureReason};
use proto::ErrorCode;
use tokio::{io::AsyncReadExt, net::TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::{
    chat::name,
    util::{Discovery, DiscoveryOptions, User, WAIT},
};

/// The server's registration deadline here (seconds).
const HANDSHAKE_SECS: u64 = 2;
/// Deposits one user may make a minute here.
const DEPOSITS_PER_MINUTE: usize = 30;
/// Sessions of one user at once here.
const SESSIONS: usize = 3;
/// Connections from one address at once (the server's default).
const PER_IP: usize = 256;

/// A connection to `server` from the loopback address `source`.
async fn connect_from(
    server: SocketAddr,
    source: Ipv4Addr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(server).await
}

/// How long until the server closes `stream` (at most `limit`; `None`: still open).
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buffer = [0u8; 512];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            // The server's hello, or its closing frame: keep reading until it closes.
            Ok(Ok(_)) => {}
        }
    }
}

/// Sockets that connect and never register: every one is closed at the deadline.
async fn hold_before_registration(server: SocketAddr, count: usize) -> usize {
    let mut streams = Vec::new();
    for _ in 0..count {
        if let Ok(stream) = connect_from(server, Ipv4Addr::new(127, 0, 0, 2)).await {
            streams.push(stream);
        }
    }
    let limit = Duration::from_secs(HANDSHAKE_SECS + 5);
    let mut closed = 0;
    for stream in &mut streams {
        if closed_within(stream, limit).await.is_some() {
            closed += 1;
        }
    }
    closed
}

/// A crowd from one address beyond the per-address cap: returns how many were turned
/// away at once (closed well before the registration deadline).
async fn crowd_one_address(server: SocketAddr, count: usize) -> usize {
    let mut streams = Vec::new();
    for _ in 0..count {
        if let Ok(stream) = connect_from(server, Ipv4Addr::new(127, 0, 0, 3)).await {
            streams.push(stream);
        }
    }
    let mut refused = 0;
    for stream in &mut streams {
        if closed_within(stream, Duration::from_millis(200))
            .await
            .is_some()
        {
            refused += 1;
        }
    }
    refused
}

/// A peer runtime for `user` in `home`, online.
async fn runtime(
    server: SocketAddr,
    user: &str,
    home: &Path,
    shutdown: &CancellationToken,
) -> (peer::Client, peer::Events) {
    let mut config = Config::new(server.to_string(), name(user), home.to_path_buf());
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.backoff_max = Duration::from_millis(500);
    peer::start(config, shutdown.clone())
        .await
        .expect("the runtime starts")
}

/// Floods carol's mailbox from mallory: returns (queued, refused over the budget and kept
/// for a retry).
async fn flood_mailbox(server: SocketAddr, home: &Path, count: usize) -> (usize, usize) {
    let shutdown = CancellationToken::new();
    let (mallory, _events) = runtime(server, "mallory", home, &shutdown).await;
    mallory.wait_online(WAIT).await.expect("mallory online");
    let (mut queued, mut over_budget) = (0, 0);
    for index in 0..count {
        let report = mallory
            .send(&name("carol"), &format!("spam {index}"))
            .await
            .expect("a result");
        match report.status {
            DeliveryStatus::Queued { .. } => queued += 1,
            DeliveryStatus::Failed {
                reason:
                    FailureReason::MailboxRefused {
                        code: ErrorCode::RateLimited,
                        ..
                    },
                will_retry: true,
            } => over_budget += 1,
            other => panic!("unexpected result of a flooding deposit: {other:?}"),
        }
    }
    mallory.shutdown(WAIT).await;
    (queued, over_budget)
}

/// More sessions of one identity than the limit, for `duration`: returns how many times a
/// session was closed with `session_limit` (each such session is signed out for good, so
/// the count settles at the sessions beyond the limit).
async fn crowd_one_identity(
    server: SocketAddr,
    root: &Path,
    sessions: usize,
    duration: Duration,
) -> usize {
    let shutdown = CancellationToken::new();
    let first = root.join("sybil-0");
    let (client, events) = runtime(server, "sybil", &first, &shutdown).await;
    client
        .wait_online(WAIT)
        .await
        .expect("the first session online");
    let mut all_events = vec![events];
    for index in 1..sessions {
        let home = root.join(format!("sybil-{index}"));
        proto::identity::create_private_dir(&home).expect("data dir");
        std::fs::copy(first.join("identity.key"), home.join("identity.key")).expect("copy key");
        let (_client, events) = runtime(server, "sybil", &home, &shutdown).await;
        all_events.push(events);
    }
    let deadline = tokio::time::Instant::now() + duration;
    let mut evicted = 0;
    while tokio::time::Instant::now() < deadline {
        for events in &mut all_events {
            while let Some(event) = events.try_recv() {
                if let Event::Fatal(reply) = event
                    && reply.code == ErrorCode::SessionLimit
                {
                    evicted += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    evicted
}

#[test]
fn hostile_clients_cost_two_chatting_users_no_message() {
    let options = DiscoveryOptions {
        args: [
            "--handshake-timeout-secs",
            &HANDSHAKE_SECS.to_string(),
            "--deposits-per-minute",
            &DEPOSITS_PER_MINUTE.to_string(),
            "--max-sessions-per-user",
            &SESSIONS.to_string(),
        ]
        .map(str::to_owned)
        .to_vec(),
        ..DiscoveryOptions::new()
    };
    let server = Discovery::start_custom(None, options);
    let carol = User::new("carol");
    carol.register_and_leave(&server);
    let alice = User::new("alice");
    let bob = User::new("bob");
    let mut alice_bot = alice.listen(&server);
    let mut bob_bot = bob.listen(&server);
    alice_bot.online();
    bob_bot.online();

    let attackers = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let address = server.address;
    let root = attackers.path().to_path_buf();
    let hold = runtime.spawn(hold_before_registration(address, 100));
    let crowd = runtime.spawn(crowd_one_address(address, PER_IP + 60));
    let flood = runtime.spawn({
        let home = root.join("mallory");
        async move { flood_mailbox(address, &home, DEPOSITS_PER_MINUTE + 20).await }
    });
    let sybils = runtime.spawn({
        let root = root.clone();
        async move { crowd_one_identity(address, &root, SESSIONS + 2, Duration::from_secs(6)).await }
    });

    // Meanwhile, alice and bob chat both ways, directly and (for the ones sent while the
    // other is busy) through whatever route the runtime picks.
    let rounds = 15;
    for index in 0..rounds {
        alice_bot.ok(&format!("send bob from alice {index}"));
        bob_bot.ok(&format!("send alice from bob {index}"));
    }
    for index in 0..rounds {
        bob_bot.message(&format!("from alice {index}"));
        alice_bot.message(&format!("from bob {index}"));
    }

    let held_closed = runtime.block_on(hold).expect("the hold");
    assert_eq!(
        held_closed, 100,
        "every silent socket is closed at the deadline"
    );
    let refused = runtime.block_on(crowd).expect("the crowd");
    assert!(
        refused >= 60,
        "at least the connections beyond the per-address cap are turned away at once: {refused}"
    );
    let (queued, over_budget) = runtime.block_on(flood).expect("the flood");
    assert!(queued <= DEPOSITS_PER_MINUTE + 1, "{queued} queued");
    assert!(over_budget >= 19, "{over_budget} over the budget");
    let evicted = runtime.block_on(sybils).expect("the sybils");
    assert_eq!(
        evicted, 2,
        "each session beyond the limit closes the oldest, which stays signed out: the \
         sessions settle instead of closing one another"
    );

    // Every honest message arrived exactly once.
    alice_bot.drain_for(Duration::from_millis(500));
    bob_bot.drain_for(Duration::from_millis(500));
    for index in 0..rounds {
        assert_eq!(bob_bot.count(&format!("from alice {index}")), 1);
        assert_eq!(alice_bot.count(&format!("from bob {index}")), 1);
    }
    alice_bot.stop();
    bob_bot.stop();
}
