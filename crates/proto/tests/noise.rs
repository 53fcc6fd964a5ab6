//! The Noise transports over in-memory streams: both handshakes finish between the right
//! parties and fail against anyone else, and what crosses the wire afterwards reads as
//! noise (no name, id or frame in clear), whatever its size.

use std::time::Duration;

use proto::{
    Connection, Envelope, HandshakeError, Identity, MessageId, PeerMsg, RecvError, ServerKey,
    Username,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const WAIT: Duration = Duration::from_secs(5);

fn envelope(token: String) -> Envelope {
    Envelope {
        id: MessageId::random(),
        from: Username::new("alice").unwrap(),
        to: Username::new("bob").unwrap(),
        token: token.into_bytes(),
    }
}

/// What a recording forwarder saw: the bytes each way, once both sides are gone.
type Recorder = tokio::task::JoinHandle<(Vec<u8>, Vec<u8>)>;

/// A pair of streams joined through a forwarder that records every byte each way.
fn recorded() -> (DuplexStream, DuplexStream, Recorder) {
    let (left, mut left_far) = tokio::io::duplex(1 << 20);
    let (right, mut right_far) = tokio::io::duplex(1 << 20);
    let recorder = tokio::spawn(async move {
        let (mut to_right, mut to_left) = (Vec::new(), Vec::new());
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        loop {
            tokio::select! {
                read = left_far.read(&mut a) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => { to_right.extend_from_slice(&a[..n]); if right_far.write_all(&a[..n]).await.is_err() { break; } }
                },
                read = right_far.read(&mut b) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => { to_left.extend_from_slice(&b[..n]); if left_far.write_all(&b[..n]).await.is_err() { break; } }
                },
            }
        }
        (to_right, to_left)
    });
    (left, right, recorder)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[tokio::test]
async fn a_control_connection_authenticates_the_server_and_hides_every_frame() {
    let key = ServerKey::generate();
    let (left, right, recorder) = recorded();
    let mut client = Connection::new(left);
    let mut server = Connection::new(right);
    let (secured, served) = tokio::join!(
        client.client_handshake(WAIT),
        server.server_handshake(&key, WAIT)
    );
    let (secured, served) = (secured.unwrap(), served.unwrap());
    assert_eq!(secured.remote_static, key.public().0);
    assert_eq!(secured.handshake_hash, served.handshake_hash);
    assert!(client.is_secured() && server.is_secured());

    let sent = envelope("secret-token-body".into());
    client.send(&PeerMsg::Envelope(sent.clone())).await.unwrap();
    let received: PeerMsg = server.recv().await.unwrap().unwrap();
    assert_eq!(received, PeerMsg::Envelope(sent.clone()));
    server.send(&PeerMsg::Ack { id: sent.id }).await.unwrap();
    let _: PeerMsg = client.recv().await.unwrap().unwrap();
    drop((client, server));
    let (to_server, to_client) = recorder.await.unwrap();
    for bytes in [&to_server, &to_client] {
        assert!(!contains(bytes, b"alice"), "a name crossed in clear");
        assert!(!contains(bytes, b"secret-token-body"));
        assert!(!contains(bytes, &sent.id.0), "an id crossed in clear");
        assert!(!contains(
            bytes,
            &proto::wire::encode(&PeerMsg::Ack { id: sent.id }).unwrap()
        ));
    }
}

/// A peer link between two fresh users over an in-memory stream, its handshake done: the
/// dialer's side and the acceptor's.
async fn peer_link() -> (Connection<DuplexStream>, Connection<DuplexStream>) {
    let alice = Identity::generate();
    let bob = Identity::generate();
    let (left, right) = tokio::io::duplex(1 << 20);
    let (mut dialer, mut acceptor) = (Connection::new(left), Connection::new(right));
    let (dialled, accepted) = tokio::join!(
        dialer.dial_handshake(&alice, &bob.public().exchange, WAIT),
        acceptor.accept_handshake(&bob, WAIT)
    );
    assert_eq!(dialled.unwrap().remote_static, bob.public().exchange);
    assert_eq!(accepted.unwrap().remote_static, alice.public().exchange);
    (dialer, acceptor)
}

#[tokio::test]
async fn a_peer_link_finishes_only_with_the_holder_of_the_expected_key() {
    let alice = Identity::generate();
    let bob = Identity::generate();
    let mallory = Identity::generate();

    // Alice dials bob with bob's key: both finish, and bob learns alice's key.
    peer_link().await;

    // Mallory answers at bob's address: alice's handshake fails, nothing is sent.
    let (left, right) = tokio::io::duplex(1 << 16);
    let (mut dialer, mut impostor) = (Connection::new(left), Connection::new(right));
    let (dialled, accepted) = tokio::join!(
        dialer.dial_handshake(&alice, &bob.public().exchange, WAIT),
        async move {
            // A failed handshake ends the connection, as every acceptor does.
            let result = impostor.accept_handshake(&mallory, WAIT).await;
            drop(impostor);
            result
        }
    );
    assert!(
        accepted.is_err(),
        "mallory cannot read a handshake meant for bob"
    );
    assert!(
        matches!(
            dialled,
            Err(HandshakeError::Noise(_) | HandshakeError::Closed | HandshakeError::Recv(_))
        ),
        "{dialled:?}"
    );
}

#[tokio::test]
async fn frames_up_to_the_limit_cross_sealed_and_a_changed_byte_ends_the_connection() {
    let (mut dialer, mut acceptor) = peer_link().await;
    // The largest envelope that fits the 64 KiB frame limit, and small ones around it.
    let overhead = proto::wire::encode(&PeerMsg::Envelope(envelope(String::new())))
        .unwrap()
        .len();
    let largest = proto::wire::MAX_FRAME_LEN - overhead - 2;
    for len in [0, 10, largest] {
        let sent = PeerMsg::Envelope(envelope("x".repeat(len)));
        dialer.send(&sent).await.unwrap();
        assert_eq!(acceptor.recv::<PeerMsg>().await.unwrap().unwrap(), sent);
    }

    // A forwarder that flips one byte of a sealed frame: refused as unauthentic.
    let key = ServerKey::generate();
    let (left, far) = tokio::io::duplex(1 << 16);
    let (near, right) = tokio::io::duplex(1 << 16);
    let mut client = Connection::new(left);
    let mut server = Connection::new(right);
    let flip = tokio::spawn(async move {
        let (mut near_read, mut near_write) = tokio::io::split(near);
        let (mut far_read, mut far_write) = tokio::io::split(far);
        let back =
            tokio::spawn(async move { tokio::io::copy(&mut near_read, &mut far_write).await });
        let mut seen = 0usize;
        let mut buffer = [0u8; 4096];
        loop {
            let n = match far_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Past the hellos and the handshake (well under 400 bytes), flip a byte.
            for byte in &mut buffer[..n] {
                seen += 1;
                if seen == 420 {
                    *byte ^= 0x80;
                }
            }
            if near_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        back.abort();
    });
    let (secured, served) = tokio::join!(
        client.client_handshake(WAIT),
        server.server_handshake(&key, WAIT)
    );
    secured.unwrap();
    served.unwrap();
    // Three envelopes in one record, the flipped byte in one of them: not even the first
    // comes out.
    for _ in 0..3 {
        let sent = PeerMsg::Envelope(envelope("y".repeat(100)));
        client.feed(&sent).await.unwrap();
    }
    client.flush().await.unwrap();
    assert!(matches!(
        server.recv::<PeerMsg>().await,
        Err(RecvError::Unauthentic)
    ));
    flip.abort();
}

#[tokio::test]
async fn frames_fed_before_a_flush_cross_as_one_record_and_arrive_in_order() {
    let (mut dialer, mut acceptor) = peer_link().await;
    let acks: Vec<PeerMsg> = (0..64)
        .map(|_| PeerMsg::Ack {
            id: MessageId::random(),
        })
        .collect();
    let frames: usize = acks
        .iter()
        .map(|ack| 4 + proto::wire::encoded_len(ack).unwrap())
        .sum();
    for ack in &acks {
        dialer.feed(ack).await.unwrap();
    }
    dialer.flush().await.unwrap();
    // What arrived is one record: one length prefix, one tag.
    let mut header = [0u8; 4];
    acceptor.get_mut().read_exact(&mut header).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(header) as usize,
        proto::noise::sealed_len(frames)
    );

    let (mut dialer, mut acceptor) = peer_link().await;
    for ack in &acks {
        dialer.feed(ack).await.unwrap();
    }
    dialer.flush().await.unwrap();
    for ack in &acks {
        assert_eq!(&acceptor.recv::<PeerMsg>().await.unwrap().unwrap(), ack);
    }
}

#[tokio::test]
async fn a_record_declared_over_the_limit_is_refused_before_its_bytes_arrive() {
    let (mut dialer, mut acceptor) = peer_link().await;
    let limit = proto::record::record_limit(proto::wire::MAX_FRAME_LEN) as u32;
    // The length alone, and nothing of the record: the refusal cannot wait for it.
    dialer
        .get_mut()
        .write_all(&(limit + 1).to_be_bytes())
        .await
        .unwrap();
    let refused = tokio::time::timeout(WAIT, acceptor.recv::<PeerMsg>()).await;
    assert!(
        matches!(
            refused,
            Ok(Err(RecvError::FrameTooLarge {
                max: proto::wire::MAX_FRAME_LEN
            }))
        ),
        "{refused:?}"
    );
}
