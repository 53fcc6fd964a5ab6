//! An attacker on the path: a forwarder between alice and the discovery server, and another
//! in front of bob's P2P port (where the server tells alice to find bob), that record every
//! byte, change the server's replies, redirect bob's address to an impostor, and answer
//! alice's envelopes with acks replayed from an earlier connection. Whatever they do, no
//! message is reported *delivered* unless bob stored it, none is shown from anyone but its
//! real sender, each one ends *queued* or kept visibly for a retry and arrives once, and
//! nothing readable crosses either path.
//!
//! A server whose key changed (`a_server_whose_key_changed_is_refused_until_trust_server`)
//! is in the second half, with the real binaries.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use peer::DeliveryStatus;
use proto::{Identity, PeerMsg, Request, RequestFrame};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use crate::{
    chat::{Chatter, Server, any_port, config, name},
    util::{Discovery, DiscoveryOptions, User, assert_sent, binary, run_bounded},
};

/// What a [`Path`] does with the connections through it.
#[derive(Clone)]
enum Mode {
    /// Refuses connections.
    Closed,
    /// Forwards to `to`.
    Forward { to: SocketAddr },
    /// Forwards to `to`, but flips a byte in every frame from `to` after the first `after`.
    Tamper { to: SocketAddr, after: usize },
    /// Forwards to `to`, but replaces every frame from `to` after the first `after` with
    /// the next of `replay` (frames recorded on an earlier connection).
    Replay {
        to: SocketAddr,
        after: usize,
        replay: Vec<Vec<u8>>,
    },
}

#[derive(Default)]
struct Recording {
    /// Every byte sent towards the target, all connections.
    to_target: Vec<u8>,
    /// Every byte from the target, all connections.
    from_target: Vec<u8>,
    /// The frames (length prefix included) from the target, per connection.
    frames: Vec<Vec<Vec<u8>>>,
}

/// An on-path attacker: a TCP forwarder that records and, depending on its [`Mode`],
/// changes what crosses it.
struct Path {
    addr: SocketAddr,
    state: Arc<Mutex<(Mode, CancellationToken)>>,
    recording: Arc<Mutex<Recording>>,
    stop: CancellationToken,
}

impl Path {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let path = Self {
            addr: listener.local_addr()?,
            state: Arc::new(Mutex::new((Mode::Closed, CancellationToken::new()))),
            recording: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (state, recording, stop) = (
            Arc::clone(&path.state),
            Arc::clone(&path.recording),
            path.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let (mode, cut) = {
                    let state = state.lock().expect("path state");
                    (state.0.clone(), state.1.clone())
                };
                tokio::spawn(forward(client, mode, cut, Arc::clone(&recording)));
            }
        });
        Ok(path)
    }

    /// Changes what the path does; connections through it now are cut (a client then
    /// connects again, through the new mode).
    fn set(&self, mode: Mode) {
        let mut state = self.state.lock().expect("path state");
        state.1.cancel();
        *state = (mode, CancellationToken::new());
    }

    fn recording(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.recording.lock().expect("recording")
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        self.set(Mode::Closed);
        self.stop.cancel();
    }
}

async fn forward(
    client: TcpStream,
    mode: Mode,
    cut: CancellationToken,
    recording: Arc<Mutex<Recording>>,
) {
    let (to, after, tamper, mut replay) = match mode {
        Mode::Closed => return,
        Mode::Forward { to } => (to, usize::MAX, false, Vec::new()),
        Mode::Tamper { to, after } => (to, after, true, Vec::new()),
        Mode::Replay { to, after, replay } => (to, after, false, replay),
    };
    let Ok(target) = TcpStream::connect(to).await else {
        return;
    };
    let connection = {
        let mut recording = recording.lock().expect("recording");
        recording.frames.push(Vec::new());
        recording.frames.len() - 1
    };
    replay.reverse();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut target_read, mut target_write) = target.into_split();
    let upstream = {
        let recording = Arc::clone(&recording);
        async move {
            let mut buffer = [0u8; 4096];
            loop {
                let n = match client_read.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                recording
                    .lock()
                    .expect("recording")
                    .to_target
                    .extend_from_slice(&buffer[..n]);
                if target_write.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let downstream = async move {
        for index in 0.. {
            let Ok(len) = target_read.read_u32().await else {
                return;
            };
            let mut frame = len.to_be_bytes().to_vec();
            frame.resize(4 + len as usize, 0);
            if target_read.read_exact(&mut frame[4..]).await.is_err() {
                return;
            }
            {
                let mut recording = recording.lock().expect("recording");
                recording.from_target.extend_from_slice(&frame);
                recording.frames[connection].push(frame.clone());
            }
            let out = if index < after {
                frame
            } else if tamper {
                let last = frame.len() - 1;
                frame[last] ^= 0x01;
                frame
            } else {
                match replay.pop() {
                    Some(replayed) => replayed,
                    None => continue,
                }
            };
            if client_write.write_all(&out).await.is_err() {
                return;
            }
        }
    };
    // The cut first: once the mode changed, nothing more crosses this connection, even
    // if bytes are waiting when the task next runs.
    tokio::select! {
        biased;
        () = cut.cancelled() => {}
        () = upstream => {}
        () = downstream => {}
    }
}

/// An impostor at bob's address: holds a key of its own and acks whatever it is sent,
/// if only a dialer would finish the handshake with it.
async fn impostor(handshakes: Arc<AtomicUsize>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mallory = Arc::new(Identity::generate());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (mallory, handshakes) = (Arc::clone(&mallory), Arc::clone(&handshakes));
            tokio::spawn(async move {
                let mut connection = proto::Connection::new(stream);
                if connection
                    .accept_handshake(&mallory, Duration::from_secs(5))
                    .await
                    .is_err()
                {
                    return;
                }
                handshakes.fetch_add(1, Ordering::SeqCst);
                while let Ok(Some(message)) = connection.recv::<PeerMsg>().await {
                    if let PeerMsg::Envelope(envelope) = message {
                        let _ = connection.send(&PeerMsg::Ack { id: envelope.id }).await;
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_path_attacker_reads_nothing_fakes_no_delivery_and_loses_no_message()
-> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    // Alice reaches the server only through `control`; the server sends her to bob through
    // `link`, the port bob advertises.
    let control = Path::start().await?;
    control.set(Mode::Forward { to: server.addr });
    let link = Path::start().await?;
    let mut bob_config = config(root.path(), "bob", server.addr);
    bob_config.advertise_port = Some(link.addr.port());
    let mut bob = Chatter::start(bob_config).await?;
    let bob_addr = SocketAddr::from(([127, 0, 0, 1], bob.client.local_addr().port()));
    link.set(Mode::Forward { to: bob_addr });
    let alice = Chatter::join(root.path(), "alice", control.addr).await?;

    // 1. Recorded: delivered, and nothing readable on either path.
    assert_eq!(
        alice.send("bob", "recorded secret").await?,
        DeliveryStatus::Delivered
    );
    let shown = bob.expect("alice", "recorded secret").await?;
    let lookup = proto::wire::encode(&RequestFrame {
        id: 1,
        request: Request::Lookup { user: name("bob") },
    })?;
    let hello = proto::wire::encode(&PeerMsg::Hello {
        from: name("alice"),
        to: name("bob"),
    })?;
    for (what, path) in [("control", &control), ("link", &link)] {
        let recording = path.recording();
        for bytes in [&recording.to_target, &recording.from_target] {
            assert!(!bytes.is_empty(), "{what}: nothing recorded");
            for needle in [
                b"alice".as_slice(),
                b"bob",
                b"recorded secret",
                &shown.id.0,
                &lookup[1..],
                &hello,
            ] {
                assert!(
                    !contains(bytes, needle),
                    "{what}: {:?} crossed in clear",
                    String::from_utf8_lossy(needle)
                );
            }
        }
    }
    // The acks bob sent alice on that link, to replay later.
    let acks: Vec<Vec<u8>> = link
        .recording()
        .frames
        .iter()
        .flat_map(|frames| frames.iter().skip(2).cloned())
        .collect();
    assert!(!acks.is_empty(), "bob's acks were recorded");

    // 2. Every reply of the server after the registration changed on the way: alice's
    // lookups fail (her connection is refused as tampered), the message is kept visibly
    // for a retry, and goes once the path is honest again.
    control.set(Mode::Tamper {
        to: server.addr,
        after: 4,
    });
    // Cut alice's kept link to bob too, so the next message needs a lookup.
    link.set(Mode::Forward { to: bob_addr });
    let status = alice.send("bob", "while tampered").await?;
    assert!(
        matches!(
            status,
            DeliveryStatus::Failed {
                will_retry: true,
                ..
            }
        ),
        "{status:?}"
    );
    control.set(Mode::Forward { to: server.addr });
    bob.expect("alice", "while tampered").await?;

    // 3. Bob's address leads to an impostor: the handshake fails, the message goes to the
    // mailbox and reaches bob from there.
    let handshakes = Arc::new(AtomicUsize::new(0));
    link.set(Mode::Forward {
        to: impostor(Arc::clone(&handshakes)).await?,
    });
    let status = alice.send("bob", "redirected").await?;
    assert!(
        matches!(status, DeliveryStatus::Queued { .. }),
        "{status:?}"
    );
    let relayed = bob.expect("alice", "redirected").await?;
    assert!(relayed.via_mailbox);
    assert_eq!(handshakes.load(Ordering::SeqCst), 0, "the impostor got in");

    // 4. Bob's real link, but his answers replaced by acks replayed from step 1: not
    // delivered on their word; queued, and shown once.
    link.set(Mode::Replay {
        to: bob_addr,
        after: 2,
        replay: acks,
    });
    let status = alice.send("bob", "acks forged").await?;
    assert!(
        matches!(status, DeliveryStatus::Queued { .. }),
        "{status:?}"
    );
    bob.expect("alice", "acks forged").await?;

    // Nothing more, from anyone: every message once.
    link.set(Mode::Forward { to: bob_addr });
    assert_eq!(
        alice.send("bob", "honest again").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("alice", "honest again").await?;

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

#[test]
fn a_server_whose_key_changed_is_refused_until_trust_server() {
    let mut server = Discovery::start();
    let key_of = |data_dir: &std::path::Path| {
        let mut command = std::process::Command::new(binary("p2pchat-discovery"));
        command.arg("--data-dir").arg(data_dir).arg("key");
        let output = run_bounded(command);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let old_key = key_of(&server.data_dir);
    let (alice, bob, carol) = (User::new("alice"), User::new("bob"), User::new("carol"));
    bob.register_and_leave(&server);
    assert_sent(&alice.send(&server, "bob", "first"), "queued");

    // The same address, a new data dir: a new key.
    let address = server.address;
    server.stop();
    let fresh = tempfile::tempdir().expect("tempdir");
    let server = Discovery::start_custom(
        None,
        DiscoveryOptions {
            address,
            data_dir: Some(fresh.path().join("discovery")),
            ..DiscoveryOptions::new()
        },
    );
    assert_eq!(server.address, address, "restarted on the same address");
    let new_key = key_of(&server.data_dir);
    assert_ne!(old_key, new_key);
    carol.register_and_leave(&server);

    let refused = alice.send(&server, "carol", "to the new server");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{refused:?}");
    for wanted in [old_key.as_str(), new_key.as_str(), "p2pchat trust-server"] {
        assert!(stderr.contains(wanted), "{wanted:?} missing from: {stderr}");
    }
    // A wrong key given up front is refused too; the right one is accepted.
    let wrong = alice.run(
        &server,
        &[("P2PCHAT_SERVER_KEY", &old_key)],
        &["trust-server"],
    );
    assert!(!wrong.status.success(), "{wrong:?}");

    let trusted = alice.run(&server, &[], &["trust-server"]);
    let stdout = String::from_utf8_lossy(&trusted.stdout);
    assert!(
        trusted.status.success() && stdout.contains(&new_key) && stdout.contains(&old_key),
        "{trusted:?}"
    );
    assert_sent(&alice.send(&server, "carol", "to the new server"), "queued");
}
