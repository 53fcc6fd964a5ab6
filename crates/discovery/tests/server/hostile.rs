//! Hostile clients (issue 8): slow frames, crowds that never say hello, floods and replays.
//! Each gets a clear error or a clean close with bounded resources, and an honest client's
//! traffic during the attack is counted: every one of its requests must succeed.

use std::time::Duration;

use discovery::Config;
use proto::{ErrorCode, Registration, Reply, Request, identity::registration_transcript};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};

use crate::util::*;

/// Runs `honest` lookups from a registered client while `attack` runs, and returns how many
/// succeeded: the attack must not cost the honest client a single request.
async fn honest_lookups_during<F: std::future::Future<Output = ()>>(
    client: &mut Client,
    lookups: usize,
    attack: F,
) -> usize {
    let honest = async {
        let mut succeeded = 0;
        for _ in 0..lookups {
            if client.lookup(client.user.clone().as_str()).await.is_ok() {
                succeeded += 1;
            }
            tokio::task::yield_now().await;
        }
        succeeded
    };
    let (succeeded, ()) = tokio::join!(honest, attack);
    succeeded
}

/// How many sockets this test may open on each side, within the process's file limit.
fn crowd_size(wanted: usize) -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|soft| soft.parse::<usize>().ok())
        .unwrap_or(1024);
    wanted.min(limit.saturating_sub(256) / 2)
}

#[tokio::test]
async fn a_slowloris_sending_one_byte_at_a_time_is_closed_at_the_handshake_deadline() {
    let server = Server::embedded(Config {
        handshake_timeout: Duration::from_millis(500),
        ..config()
    })
    .await;
    let mut honest = Client::connect(server.address, "honest").await;
    honest.register().await.unwrap();
    let attack = async {
        let mut slow = TcpStream::connect(server.address).await.unwrap();
        // A hello frame's header promising 1000 bytes, then a byte every 50 ms.
        let mut bytes = 1000u32.to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(7u8, 1000));
        let started = tokio::time::Instant::now();
        for byte in bytes {
            if slow.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if started.elapsed() > WAIT {
                panic!("the slow client was never cut off");
            }
        }
        // The server has closed it: reading ends (after its hello) without a hang.
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, slow.read_to_end(&mut rest))
            .await
            .unwrap()
            .ok();
    };
    let succeeded = honest_lookups_during(&mut honest, 200, attack).await;
    assert_eq!(succeeded, 200);
    server.stop().await;
}

#[tokio::test]
async fn thousands_of_silent_connections_are_closed_and_cost_others_nothing() {
    let server = Server::embedded(Config {
        handshake_timeout: Duration::from_millis(1500),
        // The crowd stands for many machines, though it comes from one loopback address:
        // this test is about the registration deadline, not the per-IP limit.
        per_ip_connections: usize::MAX,
        ..config()
    })
    .await;
    let mut honest = Client::connect(server.address, "honest").await;
    honest.register().await.unwrap();
    let crowd = crowd_size(2000);
    assert!(crowd >= 200, "the file limit is too low for this test");
    let address = server.address;
    let attack = async move {
        // Open the crowd in waves, each connection waiting for the server's hello (so the
        // server has accepted it) before the next wave: a burst larger than the listen
        // backlog would otherwise measure the kernel's SYN retries, not the server.
        let mut silent = JoinSet::new();
        for wave in (0..crowd).collect::<Vec<_>>().chunks(250) {
            let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel::<()>(wave.len());
            for _ in wave {
                let accepted_tx = accepted_tx.clone();
                silent.spawn(async move {
                    let mut stream = TcpStream::connect(address).await.ok()?;
                    let mut length = [0u8; 4];
                    stream.read_exact(&mut length).await.ok()?;
                    let mut hello = vec![0u8; u32::from_be_bytes(length) as usize];
                    stream.read_exact(&mut hello).await.ok()?;
                    let _ = accepted_tx.send(()).await;
                    // Never say hello; wait for the server to hang up.
                    let mut sink = Vec::new();
                    tokio::time::timeout(WAIT, stream.read_to_end(&mut sink))
                        .await
                        .ok()?
                        .ok()?;
                    Some(())
                });
            }
            drop(accepted_tx);
            let mut accepted = 0;
            while accepted < wave.len() {
                match tokio::time::timeout(WAIT, accepted_rx.recv()).await {
                    Ok(Some(())) => accepted += 1,
                    _ => panic!("only {accepted} of a wave of {} were accepted", wave.len()),
                }
            }
        }
        let mut closed = 0;
        while let Some(result) = silent.join_next().await {
            if matches!(result, Ok(Some(()))) {
                closed += 1;
            }
        }
        assert_eq!(
            closed, crowd,
            "every silent connection is closed by the server"
        );
    };
    let succeeded = honest_lookups_during(&mut honest, 300, attack).await;
    assert_eq!(succeeded, 300);
    // Only the honest client is left.
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metrics.connected.get() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} still connected",
            server.metrics.connected.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_request_flood_from_one_connection_does_not_starve_another() {
    let server = Server::embedded(Config {
        requests_per_second: 1000,
        request_burst: 1000,
        ..config()
    })
    .await;
    let mut honest = Client::connect(server.address, "honest").await;
    honest.register().await.unwrap();
    let mut flooder = Client::connect(server.address, "flooder").await;
    flooder.register().await.unwrap();
    let attack = async {
        // Pipeline 5000 requests without reading, then read every answer.
        let mut limited = 0;
        let mut answered = 0;
        for id in 0..5000u64 {
            flooder
                .connection
                .send(&proto::RequestFrame {
                    id,
                    request: Request::List,
                })
                .await
                .unwrap();
        }
        while answered < 5000 {
            match tokio::time::timeout(WAIT, flooder.connection.recv::<proto::ServerMsg>()).await {
                Ok(Ok(Some(proto::ServerMsg::Response { result, .. }))) => {
                    answered += 1;
                    if matches!(result, Err(ref error) if error.code == ErrorCode::RateLimited) {
                        limited += 1;
                    }
                }
                Ok(Ok(Some(_))) => {}
                other => panic!("the flooder lost its connection: {other:?}"),
            }
        }
        // Every request got exactly one answer, and most of the excess was limited.
        assert!(limited >= 3000, "only {limited} limited");
    };
    let succeeded = honest_lookups_during(&mut honest, 300, attack).await;
    assert_eq!(succeeded, 300);
    server.stop().await;
}

#[tokio::test]
async fn a_replayed_registration_on_a_new_connection_is_refused() {
    let server = Server::embedded(config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    // An eavesdropper recorded alice's registration (signed over her connection's nonce).
    let transcript = registration_transcript(
        &alice.nonce,
        &alice.channel,
        &alice.user,
        alice.identity.public(),
    );
    let recorded = Request::Register(Registration {
        user: alice.user.clone(),
        keys: alice.identity.public().clone(),
        listen_ports: vec![1],
        signature: alice.identity.sign(&transcript),
    });
    let mut replayer = Client::connect(server.address, "alice").await;
    let error = replayer.request(recorded).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::BadSignature);
    // Alice is untouched: still online at her own address.
    match alice.lookup("alice").await.unwrap() {
        Reply::User(info) => assert_eq!(info.addresses[0].port(), 40_000),
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

/// Regression: a reply too large for one frame (a lookup of a user whose presence holds a
/// huge address list) made the server drop the asker's connection without any response,
/// breaking "every request gets exactly one response"; now the asker gets a `too_large`
/// error and its connection stays usable. (Registrations can no longer declare such a
/// list, so the record is written to the store directly, as an older server could have.)
#[tokio::test]
async fn a_reply_too_large_for_a_frame_is_answered_with_an_error_not_a_dropped_connection() {
    let dir = tempfile::tempdir().unwrap();
    let store = store::Store::Embedded(
        store::EmbeddedStore::open(dir.path().join("store.redb"), Default::default()).unwrap(),
    );
    let server = Server::start(store.clone(), config()).await;
    let mut mallory = Client::connect(server.address, "mallory").await;
    let transcript = registration_transcript(
        &mallory.nonce,
        &mallory.channel,
        &mallory.user,
        mallory.identity.public(),
    );
    let (user, keys) = (mallory.user.clone(), mallory.identity.public().clone());
    let signature = mallory.identity.sign(&transcript);
    let registration = |listen_ports| {
        Request::Register(Registration {
            user: user.clone(),
            keys: keys.clone(),
            listen_ports,
            signature,
        })
    };
    // More ports than allowed, in a frame small enough to be read before registration.
    let refused = registration((1..=100).collect());
    let error = mallory.request(refused).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::BadRequest, "{error}");
    mallory.request(registration(vec![40_000])).await.unwrap();
    let now = proto::now_ms();
    store
        .set_presence(&store::Presence {
            user: mallory.user.clone(),
            session: 1,
            addresses: (1..=20_000)
                .map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .collect(),
            last_seen_ms: now,
            expires_at_ms: now + 600_000,
        })
        .await
        .unwrap();
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    let error = alice.lookup("mallory").await.unwrap_err();
    assert_eq!(error.code, ErrorCode::TooLarge);
    // Alice's connection is still there and answers.
    assert!(online(alice.lookup("alice").await));
    server.stop().await;
}

/// Regression: with enough users online, `List`'s reply outgrew the frame and every client
/// asking for it lost its control connection with no response (later: got `too_large`).
/// Now it lists the first names that the limit allows and counts the rest.
#[tokio::test]
async fn a_list_of_more_online_users_than_fit_a_frame_gets_one_response() {
    let dir = tempfile::tempdir().unwrap();
    let store = store::Store::Embedded(
        store::EmbeddedStore::open(dir.path().join("store.redb"), Default::default()).unwrap(),
    );
    let now = proto::now_ms();
    for index in 0..3000 {
        let user = name(&format!("{index:0>32}"));
        store
            .set_presence(&store::Presence {
                user,
                session: 1,
                addresses: Vec::new(),
                last_seen_ms: now,
                expires_at_ms: now + 600_000,
            })
            .await
            .unwrap();
    }
    let server = Server::start(store, config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    match alice.request(Request::List).await.unwrap() {
        Reply::UsersCapped { users, more } => {
            assert_eq!(users.len(), Config::default().list_max);
            assert!(users.is_sorted());
            assert_eq!(users.len() as u64 + more, 3001);
        }
        other => panic!("expected a capped list, got {other:?}"),
    }
    assert!(online(alice.lookup("alice").await));
    assert_eq!(server.metrics.lists_capped.get(), 1);
    server.stop().await;
}

/// Regression: an announcement published on the store's channel (a `PUBLISH` by whoever
/// holds Redis access) larger than a frame made every connection's push fail, and the
/// server closed every connected client; now the push is dropped (logged) and the clients
/// stay connected.
#[tokio::test]
async fn an_announcement_too_large_for_a_frame_does_not_disconnect_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let store = store::Store::Embedded(
        store::EmbeddedStore::open(dir.path().join("store.redb"), Default::default()).unwrap(),
    );
    let server = Server::start(store.clone(), config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    store
        .publish(&store::Broadcast::Announcement {
            text: "x".repeat(100 * 1024),
        })
        .await
        .unwrap();
    store
        .publish(&store::Broadcast::Announcement {
            text: "short".into(),
        })
        .await
        .unwrap();
    let push = alice
        .push(|push| matches!(push, proto::Push::Announcement { .. }))
        .await;
    assert!(matches!(push, proto::Push::Announcement { text, .. } if text == "short"));
    assert!(online(alice.lookup("alice").await));
    server.stop().await;
}
