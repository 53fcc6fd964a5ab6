//! Abuse limits (issue 12): each test drives one limit with a bounded loop and checks the
//! refusal a client sees, its metric, and that honest clients keep working.

use std::time::Duration;

use discovery::Config;
use proto::{ErrorCode, ErrorReply, Request, RequestFrame, ServerMsg};
use tokio::time::Instant;

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
