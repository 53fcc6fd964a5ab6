//! What opening a connection costs in cryptography: the Noise handshake of the control
//! connection (NX: the server proves its key) and of a peer link (IK: both users' keys),
//! each from the first hello to the first sealed frame, over an in-memory stream (no
//! network in the figure), beside one X25519 Diffie-Hellman measured in the same run.
//! NX costs each side three X25519 scalar multiplications (an ephemeral key and two
//! Diffie-Hellmans), six in all; IK five each, ten in all: the rows show how close the
//! whole handshake, both sides on one machine, comes to that floor.
//!
//! Beside them, what starting a ratchet session costs: claiming one of the recipient's
//! one-time keys at a real (in-process) discovery server over a registered control
//! connection, starting the Olm session (triple Diffie-Hellman), sealing the first message
//! and opening it at the recipient (which starts its side of the session).

use std::time::{Duration, Instant};

use proto::{
    Connection, Identity, MessageId, Reply, Request, ServerKey, Username,
    ratchet::{OwnAccount, Sessions},
};

use crate::{Bench, BenchError, Row, Target, control::ControlClient, stats::Latencies};

const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The handshake rows: control, peer link, and the X25519 reference.
pub async fn rows(bench: &Bench) -> Result<Vec<Row>, BenchError> {
    let count = bench.mode.pick(2_000, 20);
    let mut x25519 = x25519_operations(count * 4);
    let mut control = handshakes(count, Kind::Control).await?;
    let mut peer = handshakes(count, Kind::Peer).await?;
    let x25519_p50 = x25519.percentile_us(50.0);
    let note = |latencies: &Latencies, what: &str| {
        format!(
            "{} handshakes, one after another on one thread pair: {what}, from the hellos to the first sealed frame each way, over tokio's in-memory duplex stream; X25519 reference: one StaticSecret::diffie_hellman, {} samples.",
            latencies.len(),
            x25519.len()
        )
    };
    let control_note = note(
        &control,
        "Noise_NX_25519_AESGCM_SHA256 (client ↔ discovery)",
    );
    let peer_note = note(&peer, "Noise_IK_25519_AESGCM_SHA256 (peer link)");
    let mut setup = session_setups(bench.mode.pick(1_000, 20)).await?;
    let setup_note = format!(
        "{} sessions, one after another: Request::ClaimPreKey to an in-process discovery server (embedded store, its commit with fsync) over a registered Noise control connection, Sessions::start (Olm's triple Diffie-Hellman), the first 100-byte message sealed and opened by the recipient (its side of the session started from the pre-key message); the recipient's keys published beforehand, untimed. X25519 reference as above.",
        setup.len()
    );
    Ok(vec![
        Row::new(
            "handshake: control connection p50 (Noise NX)",
            control.percentile_us(50.0),
            "µs",
            Target::Reported,
        )
        .with_reference("one X25519 p50", x25519_p50)
        .with_note(control_note),
        Row::new(
            "handshake: peer link p50 (Noise IK)",
            peer.percentile_us(50.0),
            "µs",
            Target::Reported,
        )
        .with_reference("one X25519 p50", x25519_p50)
        .with_note(peer_note),
        Row::new(
            "ratchet session setup p50 (claim a one-time key, first message)",
            setup.percentile_us(50.0),
            "µs",
            Target::Reported,
        )
        .with_reference("one X25519 p50", x25519_p50)
        .with_note(setup_note),
    ])
}

/// `count` ratchet sessions started as a first message starts one (see the module docs),
/// each timed from the claim to the first message opened.
async fn session_setups(count: usize) -> Result<Latencies, BenchError> {
    let folder = tempfile::Builder::new()
        .prefix("p2pchat-bench-setup-")
        .tempdir()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    // Claims share the sender's deposit budget (600 a minute): lifted for the run.
    let unlimited = discovery::Config {
        deposits_per_minute: u32::MAX,
        deposit_bytes_per_hour: u64::MAX,
        ..discovery::Config::default()
    };
    let folder_path = folder.path().join("discovery");
    let server = crate::direct::in_process_server_with(&folder_path, unlimited, &shutdown).await?;
    let name = |text: &str| Username::new(text).unwrap_or_else(|_| unreachable!("valid"));
    let (alice, bob) = (name("alice"), name("bob"));
    let (alice_identity, bob_identity) = (Identity::generate(), Identity::generate());
    let mut bob_control = ControlClient::connect(server, None).await?;
    bob_control.register(&bob_identity, &bob).await?;
    let mut alice_control = ControlClient::connect(server, None).await?;
    alice_control.register(&alice_identity, &alice).await?;
    let alice_account = OwnAccount::generate(&alice_identity, &alice);
    let mut bob_account = OwnAccount::generate(&bob_identity, &bob);
    let mut latencies = Latencies::with_capacity(count);
    let mut left = 0;
    for _ in 0..count {
        if left == 0 {
            // Untimed: bob publishes a fresh batch of one-time keys.
            let prekeys = bob_account.prekeys_to_publish(&bob_identity, 0);
            left = prekeys.one_time.len();
            bob_control
                .request(Request::PublishPreKeys(prekeys))
                .await?;
            bob_account.mark_published();
        }
        let started = Instant::now();
        let bundle = match alice_control
            .request(Request::ClaimPreKey { user: bob.clone() })
            .await?
        {
            Reply::PreKey(bundle) => bundle,
            other => {
                return Err(BenchError::Protocol(format!(
                    "expected a prekey, got {other:?}"
                )));
            }
        };
        let mut sessions = Sessions::default();
        sessions.start(&alice_account, &bob, bob_identity.public(), &bundle)?;
        let envelope = sessions.seal(
            &alice_account,
            &bob,
            MessageId::random(),
            crate::direct::BODY,
            proto::now_ms(),
        )?;
        let opened = Sessions::default().open(
            &mut bob_account,
            &alice,
            alice_identity.public(),
            &envelope,
        )?;
        std::hint::black_box(opened);
        latencies.record(started.elapsed());
        left -= 1;
    }
    shutdown.cancel();
    Ok(latencies)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Control,
    Peer,
}

/// `count` handshakes of `kind`, each timed from start to both sides secured and one
/// frame sent each way.
async fn handshakes(count: usize, kind: Kind) -> Result<Latencies, BenchError> {
    let server_key = ServerKey::generate();
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let mut latencies = Latencies::with_capacity(count);
    for _ in 0..count {
        let (near, far) = tokio::io::duplex(4096);
        let (mut dialer, mut acceptor) = (Connection::new(near), Connection::new(far));
        let started = Instant::now();
        let (dialled, accepted) = match kind {
            Kind::Control => tokio::join!(
                dialer.client_handshake(STEP_TIMEOUT),
                acceptor.server_handshake(&server_key, STEP_TIMEOUT)
            ),
            Kind::Peer => tokio::join!(
                dialer.dial_handshake(&alice, &bob.public().exchange, STEP_TIMEOUT),
                acceptor.accept_handshake(&bob, STEP_TIMEOUT)
            ),
        };
        dialled?;
        accepted?;
        dialer.send(&1u8).await?;
        let _: Option<u8> = acceptor.recv().await?;
        acceptor.send(&2u8).await?;
        let _: Option<u8> = dialer.recv().await?;
        latencies.record(started.elapsed());
    }
    Ok(latencies)
}

/// `count` X25519 operations, each timed.
fn x25519_operations(count: usize) -> Latencies {
    let secret = x25519_dalek::StaticSecret::from(proto::random_bytes::<32>());
    let other = x25519_dalek::StaticSecret::from(proto::random_bytes::<32>());
    let public = x25519_dalek::PublicKey::from(&other);
    let mut latencies = Latencies::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let shared = secret.diffie_hellman(std::hint::black_box(&public));
        std::hint::black_box(shared);
        latencies.record(started.elapsed());
    }
    latencies
}
