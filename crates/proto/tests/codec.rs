//! The frames and `Connection` over in-memory streams: every message round-trips, frames
//! split across reads reassemble, and bad input is a typed error, never a panic.

use std::time::Duration;

use proto::{
    Connection, Envelope, ErrorCode, ErrorReply, HandshakeError, Hello, Identity, MailRef,
    MessageId, PeerMsg, Push, RecvError, Registration, Reply, Request, RequestFrame, ServerMsg,
    UserInfo, Username, msg::PROTOCOL_VERSION, wire,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn name(text: &str) -> Username {
    Username::new(text).unwrap()
}

fn envelope() -> Envelope {
    Envelope {
        id: MessageId::random(),
        from: name("alice"),
        to: name("bob"),
        token: b"gAAAAAB-token".to_vec(),
    }
}

/// An envelope as builds before binary tokens declared it: the token as text.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct TextTokenEnvelope {
    id: MessageId,
    from: Username,
    to: Username,
    token: String,
}

#[test]
fn an_envelope_of_an_older_build_decodes_unchanged_and_encodes_to_the_same_bytes() {
    for token in ["gAAAAAB-fernet", "o0.AAAA.BBBB", "o1.AAAA", ""] {
        let old = TextTokenEnvelope {
            id: MessageId([7; 16]),
            from: name("alice"),
            to: name("bob"),
            token: token.to_owned(),
        };
        let bytes = wire::encode(&old).unwrap();
        let new: Envelope = wire::decode(&bytes).unwrap();
        assert_eq!(new.token, token.as_bytes());
        assert_eq!((new.id, &new.from, &new.to), (old.id, &old.from, &old.to));
        // The same bytes both ways: a stored envelope re-encoded is unchanged.
        assert_eq!(wire::encode(&new).unwrap(), bytes);
        assert_eq!(wire::decode::<TextTokenEnvelope>(&bytes).unwrap(), old);
    }
}

#[test]
fn a_binary_token_round_trips_and_an_older_build_refuses_it_as_a_frame() {
    let mut binary = envelope();
    binary.token = vec![0x02, 0xff, 0x00, 0x80, 0xc3];
    let bytes = wire::encode(&binary).unwrap();
    assert_eq!(wire::decode::<Envelope>(&bytes).unwrap(), binary);
    // Not UTF-8: a build that reads the token as text gets a decode error, not a crash.
    assert!(wire::decode::<TextTokenEnvelope>(&bytes).is_err());
    // A token cut short of its declared length is refused.
    assert!(wire::decode::<Envelope>(&bytes[..bytes.len() - 1]).is_err());
}

fn every_request() -> Vec<Request> {
    let identity = Identity::generate();
    vec![
        Request::Register(Registration {
            user: name("alice"),
            keys: identity.public().clone(),
            listen_ports: vec![4000, 4001],
            signature: identity.sign(b"transcript"),
        }),
        Request::Heartbeat,
        Request::Lookup { user: name("bob") },
        Request::List,
        Request::Deposit {
            envelope: envelope(),
        },
        Request::Fetch { max: 100 },
        Request::Ack {
            ids: vec![MessageId::random(), MessageId::random()],
        },
        Request::Block { user: name("eve") },
        Request::Unblock { user: name("eve") },
        Request::Unregister,
        Request::Announce {
            text: "maintenance at noon".into(),
            proof: [9; 32],
        },
        Request::AckMail {
            mail: vec![MailRef {
                from: name("alice"),
                id: MessageId::random(),
            }],
        },
        Request::Rotate(rotation()),
        Request::Rotations { user: name("bob") },
        Request::ReleaseName {
            user: name("bob"),
            proof: [7; 32],
        },
    ]
}

fn rotation() -> proto::identity::Rotation {
    proto::identity::Rotation::sign(
        &name("alice"),
        &Identity::generate(),
        &Identity::generate(),
        5,
    )
}

fn every_server_msg() -> Vec<ServerMsg> {
    let identity = Identity::generate();
    let mut messages = vec![
        ServerMsg::Challenge { nonce: [3; 32] },
        ServerMsg::Push(Push::MailWaiting),
        ServerMsg::Push(Push::Announcement {
            text: "hello all".into(),
            at_ms: 1,
        }),
        ServerMsg::Push(Push::Presence {
            user: name("bob"),
            online: true,
        }),
        ServerMsg::Closing(ErrorReply::new(ErrorCode::BadRequest, "bye")),
    ];
    let replies = [
        Reply::Registered {
            observed: "127.0.0.1:5555".parse().unwrap(),
            new_binding: true,
            heartbeat_interval_ms: 10_000,
            presence_ttl_ms: 30_000,
        },
        Reply::Pong,
        Reply::User(UserInfo {
            user: name("bob"),
            keys: identity.public().clone(),
            addresses: vec![
                "127.0.0.1:4000".parse().unwrap(),
                "[::1]:4000".parse().unwrap(),
            ],
            online: true,
            last_seen_ms: Some(42),
        }),
        Reply::Users(vec![]),
        Reply::Users(vec![name("a"), name("b")]),
        Reply::UsersCapped {
            users: vec![name("a")],
            more: 7,
        },
        Reply::Deposited {
            recipient_online: false,
        },
        Reply::Mail {
            envelopes: vec![envelope(), envelope()],
            remaining: 7,
        },
        Reply::Acked { removed: 2 },
        Reply::Done,
        Reply::Rotations(vec![rotation(), rotation()]),
        Reply::Released {
            fingerprint: identity.public().fingerprint(),
        },
    ];
    for (index, reply) in replies.into_iter().enumerate() {
        messages.push(ServerMsg::Response {
            id: index as u64,
            result: Ok(reply),
        });
    }
    for code in ErrorCode::ALL {
        messages.push(ServerMsg::Response {
            id: 99,
            result: Err(ErrorReply::new(code, format!("because {code}"))),
        });
    }
    messages
}

fn every_peer_msg() -> Vec<PeerMsg> {
    vec![
        PeerMsg::Hello {
            from: name("alice"),
            to: name("bob"),
        },
        PeerMsg::Envelope(envelope()),
        PeerMsg::Ack {
            id: MessageId::random(),
        },
        PeerMsg::Reject {
            id: Some(MessageId::random()),
            error: ErrorReply::new(ErrorCode::Blocked, "no"),
        },
        PeerMsg::Reject {
            id: None,
            error: ErrorReply::new(ErrorCode::Refused, "not for me"),
        },
    ]
}

#[tokio::test]
async fn every_message_round_trips_through_a_connection() {
    let (left, right) = tokio::io::duplex(1 << 20);
    let mut sender = Connection::new(left);
    let mut receiver = Connection::new(right);

    sender.send(&Hello::current()).await.unwrap();
    assert_eq!(
        receiver.recv::<Hello>().await.unwrap(),
        Some(Hello::current())
    );
    for (id, request) in every_request().into_iter().enumerate() {
        let frame = RequestFrame {
            id: id as u64,
            request,
        };
        sender.send(&frame).await.unwrap();
        assert_eq!(receiver.recv::<RequestFrame>().await.unwrap(), Some(frame));
    }
    for message in every_server_msg() {
        sender.send(&message).await.unwrap();
        assert_eq!(receiver.recv::<ServerMsg>().await.unwrap(), Some(message));
    }
    for message in every_peer_msg() {
        sender.send(&message).await.unwrap();
        assert_eq!(receiver.recv::<PeerMsg>().await.unwrap(), Some(message));
    }
    drop(sender);
    assert_eq!(
        receiver.recv::<PeerMsg>().await.unwrap(),
        None,
        "clean close is None"
    );
}

#[tokio::test]
async fn a_frame_split_across_reads_reassembles() {
    let message = ServerMsg::Push(Push::Announcement {
        text: "x".repeat(1000),
        at_ms: 5,
    });
    let body = wire::encode(&message).unwrap();
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);

    let (mut raw, stream) = tokio::io::duplex(64);
    let mut receiver = Connection::new(stream);
    let writer = tokio::spawn(async move {
        // One byte at a time, then a few bytes, with yields between: many separate reads.
        for chunk in bytes.chunks(7) {
            raw.write_all(chunk).await.unwrap();
            tokio::task::yield_now().await;
        }
        raw
    });
    assert_eq!(receiver.recv::<ServerMsg>().await.unwrap(), Some(message));
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn an_oversized_frame_is_refused_before_it_is_buffered() {
    let (mut raw, stream) = tokio::io::duplex(1024);
    let mut receiver = Connection::new(stream);
    // Declare 4 GiB - 1 and send nothing more: the codec must refuse on the header alone.
    raw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let error = receiver.recv::<ServerMsg>().await.unwrap_err();
    assert!(
        matches!(error, RecvError::FrameTooLarge { max } if max == wire::MAX_FRAME_LEN),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_frame_just_over_a_custom_limit_is_refused_and_one_at_it_is_accepted() {
    let (left, right) = tokio::io::duplex(1 << 16);
    let mut sender = Connection::with_limits(left, 1 << 16, Duration::from_secs(1));
    let mut receiver = Connection::with_limits(right, 100, Duration::from_secs(1));
    let fits = "a".repeat(99); // 1 length byte + 99 = 100
    sender.send(&fits).await.unwrap();
    assert_eq!(receiver.recv::<String>().await.unwrap(), Some(fits));
    sender.send(&"a".repeat(100)).await.unwrap();
    assert!(matches!(
        receiver.recv::<String>().await,
        Err(RecvError::FrameTooLarge { max: 100 })
    ));
}

#[tokio::test]
async fn sending_a_message_over_the_limit_is_a_typed_error() {
    let (left, _right) = tokio::io::duplex(1 << 16);
    let mut sender = Connection::with_limits(left, 100, Duration::from_secs(1));
    assert!(matches!(
        sender.send(&"a".repeat(200)).await,
        Err(proto::SendError::TooLarge { max: 100, .. })
    ));
}

#[tokio::test]
async fn garbage_bytes_are_a_typed_error() {
    let (mut raw, stream) = tokio::io::duplex(1024);
    let mut receiver = Connection::new(stream);
    // A well-formed frame whose body is not a ServerMsg (variant 200 does not exist).
    raw.write_all(&[0, 0, 0, 3, 200, 1, 2]).await.unwrap();
    assert!(matches!(
        receiver.recv::<ServerMsg>().await,
        Err(RecvError::Malformed(_))
    ));
}

#[tokio::test]
async fn a_connection_closed_mid_frame_is_truncated_not_clean() {
    let (mut raw, stream) = tokio::io::duplex(1024);
    let mut receiver = Connection::new(stream);
    raw.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
    drop(raw);
    assert!(matches!(
        receiver.recv::<ServerMsg>().await,
        Err(RecvError::Truncated)
    ));
}

#[tokio::test]
async fn trailing_bytes_after_a_message_are_refused() {
    let mut body = wire::encode(&Request::Heartbeat).unwrap().to_vec();
    body.push(0);
    assert!(wire::decode::<Request>(&body).is_err());
}

#[tokio::test]
async fn hello_succeeds_between_matching_versions() {
    let (left, right) = tokio::io::duplex(1024);
    let mut a = Connection::new(left);
    let mut b = Connection::new(right);
    let timeout = Duration::from_secs(5);
    let (first, second) = tokio::join!(a.hello(timeout), b.hello(timeout));
    first.unwrap();
    second.unwrap();
}

#[tokio::test]
async fn a_wrong_protocol_version_is_a_clear_error() {
    let (left, right) = tokio::io::duplex(1024);
    let mut ours = Connection::new(left);
    let mut theirs = Connection::new(right);
    let future = Hello {
        protocol: "p2pchat".into(),
        version: PROTOCOL_VERSION + 1,
    };
    theirs.send(&future).await.unwrap();
    let error = ours.hello(Duration::from_secs(5)).await.unwrap_err();
    assert!(
        matches!(error, HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs } if theirs == PROTOCOL_VERSION + 1)
    );
    assert!(error.to_string().contains("version"));
}

#[tokio::test]
async fn another_protocol_or_garbage_instead_of_hello_is_a_clear_error() {
    let (left, right) = tokio::io::duplex(1024);
    let mut ours = Connection::new(left);
    let mut theirs = Connection::new(right);
    theirs
        .send(&Hello {
            protocol: "http".into(),
            version: 1,
        })
        .await
        .unwrap();
    assert!(matches!(
        ours.hello(Duration::from_secs(5)).await,
        Err(HandshakeError::WrongProtocol(name)) if name == "http"
    ));

    let (left, mut raw) = tokio::io::duplex(1024);
    let mut ours = Connection::new(left);
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    // "GET " as a length is ~1.2 GB: refused as oversized, not buffered.
    let error = ours.hello(Duration::from_secs(5)).await.unwrap_err();
    assert!(
        matches!(error, HandshakeError::Recv(RecvError::FrameTooLarge { .. })),
        "{error:?}"
    );
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(10), raw.read_to_end(&mut sink)).await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_times_out_the_hello() {
    let (left, _right) = tokio::io::duplex(1024);
    let mut ours = Connection::new(left);
    assert!(matches!(
        ours.hello(Duration::from_secs(3)).await,
        Err(HandshakeError::Timeout(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_reads_times_out_the_send() {
    let (left, _right) = tokio::io::duplex(16);
    let mut sender = Connection::with_limits(left, 1 << 16, Duration::from_secs(2));
    let big = "z".repeat(10_000);
    assert!(matches!(
        sender.send(&big).await,
        Err(proto::SendError::Timeout(_))
    ));
}
