//! The server over real loopback sockets: registration, lookup, mail relay, announcements,
//! two instances sharing one Redis, limits and metrics.

use std::{sync::Arc, time::Duration};

use discovery::{Config, operator};
use proto::{
    Channel, Connection, ErrorCode, ErrorReply, Hello, Push, Reply, Request, RequestFrame,
};
use store::testing::RedisServer;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::util::*;

#[tokio::test]
async fn two_clients_find_each_other_and_a_third_cannot_take_a_bound_name() {
    let server = Server::embedded(config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    let mut bob = Client::connect(server.address, "bob").await;
    assert!(matches!(
        alice.register().await.unwrap(),
        Reply::Registered {
            new_binding: true,
            ..
        }
    ));
    match bob.register().await.unwrap() {
        Reply::Registered { observed, .. } => assert_eq!(
            observed.ip(),
            bob.connection.get_ref().local_addr().unwrap().ip()
        ),
        other => panic!("{other:?}"),
    }
    match alice.lookup("bob").await.unwrap() {
        Reply::User(info) => {
            assert!(info.online);
            assert_eq!(&info.keys, bob.identity.public());
            assert_eq!(info.addresses, vec!["127.0.0.1:40000".parse().unwrap()]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        bob.request(Request::List).await.unwrap(),
        Reply::Users(vec![name("alice"), name("bob")])
    );

    let mut mallory = Client::connect(server.address, "alice").await;
    let error = mallory.register().await.unwrap_err();
    assert_eq!(error.code, ErrorCode::NameTaken);
    // The rightful owner is unaffected.
    assert!(online(bob.lookup("alice").await));
    assert_eq!(server.metrics.errors(ErrorCode::NameTaken), 1);
    server.stop().await;
}

#[tokio::test]
async fn closing_the_connection_is_offline_at_once() {
    let server = Server::embedded(config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    let mut bob = Client::connect(server.address, "bob").await;
    bob.register().await.unwrap();
    drop(alice);
    // Wait for the server to notice the close (it is immediate, but asynchronous).
    let deadline = tokio::time::Instant::now() + WAIT;
    while online(bob.lookup("alice").await) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice stayed online"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn mail_for_an_offline_user_is_pushed_on_login_and_deleted_only_after_ack() {
    let server = Server::embedded(config()).await;
    let mut bob = Client::connect(server.address, "bob").await;
    bob.register().await.unwrap();
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    let bob = bob.disconnect(&mut alice).await;

    let envelope = alice.seal_for(&bob, "while you were out");
    assert_eq!(
        alice
            .request(Request::Deposit {
                envelope: envelope.clone()
            })
            .await
            .unwrap(),
        Reply::Deposited {
            recipient_online: false
        }
    );

    // Bob logs in again with his key: he is told at once, fetches, and does not ack.
    let mut bob = bob.reconnect(server.address).await;
    assert!(matches!(
        bob.register().await.unwrap(),
        Reply::Registered {
            new_binding: false,
            ..
        }
    ));
    bob.push(|push| *push == Push::MailWaiting).await;
    let fetched = bob.request(Request::Fetch { max: 100 }).await.unwrap();
    assert_eq!(
        fetched,
        Reply::Mail {
            envelopes: vec![envelope.clone()],
            remaining: 0
        }
    );
    let opened = Channel::new(
        &bob.identity,
        &bob.user,
        &alice.user,
        alice.identity.public(),
    )
    .unwrap()
    .open(&envelope, proto::now_ms())
    .unwrap();
    assert_eq!(opened.body, "while you were out");

    // Not acked: a new connection gets it again.
    let mut bob = bob
        .disconnect(&mut alice)
        .await
        .reconnect(server.address)
        .await;
    bob.register().await.unwrap();
    assert_eq!(
        bob.request(Request::Fetch { max: 100 }).await.unwrap(),
        fetched
    );
    assert_eq!(
        bob.request(Request::Ack {
            ids: vec![envelope.id]
        })
        .await
        .unwrap(),
        Reply::Acked { removed: 1 }
    );
    assert_eq!(
        bob.request(Request::Fetch { max: 100 }).await.unwrap(),
        Reply::Mail {
            envelopes: vec![],
            remaining: 0
        }
    );
    assert_eq!(server.metrics.mail_delivered.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn mail_for_an_online_user_is_pushed_at_once() {
    let server = Server::embedded(config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    let mut bob = Client::connect(server.address, "bob").await;
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let envelope = alice.seal_for(&bob, "now");
    assert_eq!(
        alice.request(Request::Deposit { envelope }).await.unwrap(),
        Reply::Deposited {
            recipient_online: true
        }
    );
    bob.push(|push| *push == Push::MailWaiting).await;
    server.stop().await;
}

#[tokio::test]
async fn an_announcement_reaches_every_client() {
    let server = Server::embedded(config()).await;
    let mut clients = Vec::new();
    for user in ["a", "b", "c"] {
        let mut client = Client::connect(server.address, user).await;
        client.register().await.unwrap();
        clients.push(client);
    }
    operator::announce(
        &server.address.to_string(),
        SECRET,
        "maintenance at noon",
        None,
    )
    .await
    .unwrap();
    for client in &mut clients {
        let push = client
            .push(|push| matches!(push, Push::Announcement { .. }))
            .await;
        assert!(matches!(push, Push::Announcement { text, .. } if text == "maintenance at noon"));
    }
    // Another server's key expected: refused before anything is sent.
    let elsewhere = Some(proto::ServerKey::generate().public());
    let refused =
        operator::announce(&server.address.to_string(), SECRET, "elsewhere", elsewhere).await;
    assert!(
        matches!(&refused, Err(operator::OperatorError::Connect { reason, .. }) if reason.contains("presents key")),
        "{refused:?}"
    );
    let refused = operator::announce(&server.address.to_string(), b"wrong", "fake", None).await;
    assert!(matches!(
        refused,
        Err(operator::OperatorError::Refused(ErrorReply {
            code: ErrorCode::Unauthorized,
            ..
        }))
    ));
    server.stop().await;
}

#[tokio::test]
async fn two_instances_sharing_one_redis_behave_as_one_server() {
    let redis = RedisServer::start().unwrap();
    let first = Server::redis(&redis).await;
    let second = Server::redis(&redis).await;
    let mut alice = Client::connect(first.address, "alice").await;
    let mut bob = Client::connect(second.address, "bob").await;
    alice.register().await.unwrap();
    bob.register().await.unwrap();

    // Each finds the other across instances.
    assert!(online(alice.lookup("bob").await));
    assert!(online(bob.lookup("alice").await));
    // A name bound through one instance is bound on the other.
    let mut mallory = Client::connect(second.address, "alice").await;
    assert_eq!(
        mallory.register().await.unwrap_err().code,
        ErrorCode::NameTaken
    );

    // Mail deposited on the first is pushed to bob on the second.
    let envelope = alice.seal_for(&bob, "across instances");
    assert_eq!(
        alice
            .request(Request::Deposit {
                envelope: envelope.clone()
            })
            .await
            .unwrap(),
        Reply::Deposited {
            recipient_online: true
        }
    );
    bob.push(|push| *push == Push::MailWaiting).await;
    assert_eq!(
        bob.request(Request::Fetch { max: 10 }).await.unwrap(),
        Reply::Mail {
            envelopes: vec![envelope],
            remaining: 0
        }
    );

    // An announcement through one instance reaches clients of both, and so does a plain
    // PUBLISH on the channel from any Redis client.
    operator::announce(&first.address.to_string(), SECRET, "hello both", None)
        .await
        .unwrap();
    for client in [&mut alice, &mut bob] {
        client
            .push(|push| matches!(push, Push::Announcement { text, .. } if text == "hello both"))
            .await;
    }
    let redis_client = redis::Client::open(redis.url()).unwrap();
    let mut raw = redis_client
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(store::ANNOUNCE_CHANNEL)
        .arg("from redis-cli")
        .query_async(&mut raw)
        .await
        .unwrap();
    for client in [&mut alice, &mut bob] {
        client
            .push(
                |push| matches!(push, Push::Announcement { text, .. } if text == "from redis-cli"),
            )
            .await;
    }
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn hostile_input_gets_a_clear_error_and_a_closed_connection_while_others_carry_on() {
    let server = Server::embedded(config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    let mut bob = Client::connect(server.address, "bob").await;
    bob.register().await.unwrap();

    // Garbage bytes framed as a request (not sealed: they fail authentication).
    let reason = after_hello_send(server.address, &[0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef])
        .await
        .unwrap();
    assert_eq!(reason.code, ErrorCode::BadRequest);
    assert!(online(alice.lookup("bob").await));

    // A 4 GiB length prefix.
    let reason = after_hello_send(server.address, &u32::MAX.to_be_bytes())
        .await
        .unwrap();
    assert_eq!(reason.code, ErrorCode::TooLarge);
    assert!(online(alice.lookup("bob").await));

    // Garbage instead of a hello.
    let mut raw = TcpStream::connect(server.address).await.unwrap();
    raw.write_all(b"\x00\x00\x00\x02zz").await.unwrap();
    let mut connection = Connection::new(raw);
    let _ = connection.recv::<Hello>().await; // the server's hello
    let reason = Client::closed_with(&mut connection).await.unwrap();
    assert_eq!(reason.code, ErrorCode::BadRequest);

    // A wrong protocol version.
    let raw = TcpStream::connect(server.address).await.unwrap();
    let mut connection = Connection::new(raw);
    connection
        .send(&Hello {
            protocol: "p2pchat".into(),
            version: 99,
        })
        .await
        .unwrap();
    let _ = connection.recv::<Hello>().await.unwrap();
    let reason = Client::closed_with(&mut connection).await.unwrap();
    assert_eq!(reason.code, ErrorCode::VersionMismatch);
    assert!(reason.message.contains("99"));

    // A client of the previous version (plain TCP, before the Noise transports) is told
    // to upgrade, not left waiting for a handshake it cannot do.
    let raw = TcpStream::connect(server.address).await.unwrap();
    let mut connection = Connection::new(raw);
    connection
        .send(&Hello {
            protocol: "p2pchat".into(),
            version: proto::msg::PROTOCOL_VERSION - 1,
        })
        .await
        .unwrap();
    let _ = connection.recv::<Hello>().await.unwrap();
    let reason = Client::closed_with(&mut connection).await.unwrap();
    assert_eq!(reason.code, ErrorCode::VersionMismatch);
    assert!(reason.message.contains("upgrade"), "{reason}");

    // A bad signature: a clear error reply, and the connection may try again.
    let mut mallory = Client::connect(server.address, "mallory").await;
    mallory.nonce = [0; 32];
    assert_eq!(
        mallory.register().await.unwrap_err().code,
        ErrorCode::BadSignature
    );

    // A name that is not a valid username cannot even be encoded by a client; sent raw, it
    // is a malformed request.
    let mut lookup = proto::wire::encode(&RequestFrame {
        id: 1,
        request: Request::Lookup { user: name("abc") },
    })
    .unwrap()
    .to_vec();
    let at = lookup.windows(3).position(|w| w == b"abc").unwrap();
    lookup[at] = b';';
    let reason = after_hello_send_body(server.address, &lookup)
        .await
        .unwrap();
    assert_eq!(reason.code, ErrorCode::BadRequest);

    // Everyone else still works.
    assert!(online(alice.lookup("bob").await));
    assert_eq!(bob.request(Request::Heartbeat).await.unwrap(), Reply::Pong);
    server.stop().await;
}

#[tokio::test]
async fn idle_unauthenticated_connections_are_closed() {
    let server = Server::embedded(Config {
        handshake_timeout: Duration::from_millis(300),
        ..config()
    })
    .await;
    let mut silent = Client::connect(server.address, "silent").await;
    let reason = Client::closed_with(&mut silent.connection).await.unwrap();
    assert_eq!(reason.code, ErrorCode::BadRequest);
    assert!(reason.message.contains("registration"));
    // A connection that never even says hello is closed too.
    let mut raw = TcpStream::connect(server.address).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(WAIT, raw.read_to_end(&mut sink))
        .await
        .unwrap()
        .unwrap();
    server.stop().await;
}

/// Regression: a registered client that stopped sending heartbeats was closed with
/// `bad_request`, as if it had sent something malformed; it is no longer registered, and the
/// code says so.
#[tokio::test]
async fn a_silent_registered_client_is_closed_as_not_registered() {
    let server = Server::embedded(Config {
        presence_ttl: Duration::from_millis(300),
        ..config()
    })
    .await;
    let mut silent = Client::connect(server.address, "silent").await;
    assert!(matches!(
        silent.register().await,
        Ok(Reply::Registered { .. })
    ));
    let reason = Client::closed_with(&mut silent.connection).await.unwrap();
    assert_eq!(reason.code, ErrorCode::NotRegistered);
    assert!(reason.message.contains("heartbeat"), "{reason}");
    server.stop().await;
}

#[tokio::test]
async fn the_connection_limit_refuses_with_server_busy() {
    let server = Server::embedded(Config {
        max_connections: 1,
        ..config()
    })
    .await;
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    let raw = TcpStream::connect(server.address).await.unwrap();
    let mut connection = Connection::new(raw);
    connection.client_handshake(WAIT).await.unwrap();
    let reason = Client::closed_with(&mut connection).await.unwrap();
    assert_eq!(reason.code, ErrorCode::ServerBusy);
    assert_eq!(
        alice.request(Request::Heartbeat).await.unwrap(),
        Reply::Pong
    );
    assert_eq!(server.metrics.refused_connections.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_request_flood_is_rate_limited_per_connection() {
    let server = Server::embedded(Config {
        requests_per_second: 1,
        request_burst: 5,
        ..config()
    })
    .await;
    let mut flooder = Client::connect(server.address, "flood").await;
    flooder.register().await.unwrap();
    let mut limited = 0;
    for _ in 0..20 {
        if let Err(error) = flooder.request(Request::Heartbeat).await {
            assert_eq!(error.code, ErrorCode::RateLimited);
            limited += 1;
        }
    }
    assert!(limited >= 14, "only {limited} of 20 were limited");
    // Another connection has its own budget.
    let mut calm = Client::connect(server.address, "calm").await;
    calm.register().await.unwrap();
    assert_eq!(calm.request(Request::Heartbeat).await.unwrap(), Reply::Pong);
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text() {
    let server = Server::embedded(config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    alice.lookup("alice").await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(discovery::metrics::serve(
        listener,
        Arc::clone(&server.metrics),
        server.shutdown.clone(),
    ));
    let mut http = TcpStream::connect(address).await.unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, http.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"));
    assert!(response.contains("p2pchat_connected_clients 1"));
    assert!(response.contains("p2pchat_registrations_total 1"));
    assert!(response.contains("p2pchat_lookups_total 1"));
    assert!(response.contains("p2pchat_errors_total{code=\"name_taken\"} 0"));
    server.stop().await;
}

/// Regression: the hub held one session per user, so when a user's newer session ended
/// (an unregister, or a close seen late), the older one still connected was shown offline
/// and never got another push (no mail waiting, no announcement) until it reconnected.
#[tokio::test]
async fn a_second_session_ending_leaves_the_first_online_and_reachable() {
    let server = Server::embedded(config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    let mut bob = Client::connect(server.address, "bob").await;
    bob.register().await.unwrap();
    let mut second = second_session(server.address, &alice).await;
    assert_eq!(second.request(Request::Unregister).await, Ok(Reply::Done));

    // The remaining session writes its presence again at once (the test client never
    // heartbeats by itself, so without that alice would stay offline).
    let deadline = tokio::time::Instant::now() + WAIT;
    while !online(bob.lookup("alice").await) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice is connected but shown offline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    operator::announce(&server.address.to_string(), SECRET, "hello all", None)
        .await
        .unwrap();
    alice
        .push(|push| matches!(push, Push::Announcement { text, .. } if text == "hello all"))
        .await;
    let envelope = bob.seal_for(&alice, "are you there?");
    assert_eq!(
        bob.request(Request::Deposit { envelope }).await.unwrap(),
        Reply::Deposited {
            recipient_online: true
        }
    );
    alice.push(|push| *push == Push::MailWaiting).await;
    server.stop().await;
}

/// Both sessions of one user get the pushes while both are connected.
#[tokio::test]
async fn every_session_of_a_user_gets_its_pushes() {
    let server = Server::embedded(config()).await;
    let mut alice = Client::connect(server.address, "alice").await;
    alice.register().await.unwrap();
    let mut second = second_session(server.address, &alice).await;
    let mut bob = Client::connect(server.address, "bob").await;
    bob.register().await.unwrap();
    let envelope = bob.seal_for(&alice, "hi");
    bob.request(Request::Deposit { envelope }).await.unwrap();
    alice.push(|push| *push == Push::MailWaiting).await;
    second.push(|push| *push == Push::MailWaiting).await;
    server.stop().await;
}

#[tokio::test]
async fn the_server_presents_its_key_and_instances_sharing_a_key_file_present_one() {
    let key = Arc::new(proto::ServerKey::generate());
    let first = Server::embedded(Config {
        server_key: Arc::clone(&key),
        ..config()
    })
    .await;
    let second = Server::embedded(Config {
        server_key: Arc::clone(&key),
        ..config()
    })
    .await;
    let other = Server::embedded(config()).await;
    let alice = Client::connect(first.address, "alice").await;
    let bob = Client::connect(second.address, "bob").await;
    let carol = Client::connect(other.address, "carol").await;
    assert_eq!(alice.server_key, key.public().0);
    assert_eq!(bob.server_key, key.public().0);
    assert_ne!(carol.server_key, key.public().0);
    // Each connection is its own channel: a registration signed on one is worthless on
    // another (see `hostile::a_replayed_registration_on_a_new_connection_is_refused`).
    assert_ne!(alice.channel, bob.channel);
    for server in [first, second, other] {
        server.stop().await;
    }
}
