//! Chat end to end: a real discovery server (in process, embedded store in a tempdir) and
//! two or three peer runtimes on loopback. Tests wait for events with a timeout, never sleep.

use std::{collections::VecDeque, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use peer::{
    Client, Config, DeliveryStatus, Event, Events, FailureReason, RefusalReason,
    state::InboundMessage,
};
use proto::Username;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::util::{RawSender, answer, raw_peer};

pub(crate) const WAIT: Duration = Duration::from_secs(15);

pub(crate) fn name(text: &str) -> Username {
    Username::new(text).expect("test names are valid")
}

/// A discovery server running in this process.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    token: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Starts a server on `addr` (port 0: any) with the embedded store at `store_path`.
    pub(crate) async fn start(store_path: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        // A restarted server reopens the file the stopped one may still be closing.
        let store = tokio::time::timeout(WAIT, async {
            loop {
                match store::EmbeddedStore::open(store_path, store::MailLimits::default()) {
                    Ok(store) => return store,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await
        .context("the embedded store did not reopen")?;
        // The key file beside the store, as the binary keeps it in its data dir: a
        // restarted server presents the same key, so its clients go on trusting it.
        let key_file = store_path.with_extension("key");
        let (key, _) = proto::ServerKey::load_or_create(&key_file)?;
        Self::start_keyed(store::Store::Embedded(store), addr, key).await
    }

    /// Starts a server on `addr` (port 0: any) with `store` and a new key.
    pub(crate) async fn start_on(store: store::Store, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_keyed(store, addr, proto::ServerKey::generate()).await
    }

    async fn start_keyed(
        store: store::Store,
        addr: SocketAddr,
        key: proto::ServerKey,
    ) -> anyhow::Result<Self> {
        let config = discovery::Config {
            server_key: std::sync::Arc::new(key),
            ..discovery::Config::default()
        };
        Self::start_configured(store, addr, config).await
    }

    /// Starts a server on `addr` (port 0: any) with `store` and `config`.
    pub(crate) async fn start_configured(
        store: store::Store,
        addr: SocketAddr,
        config: discovery::Config,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let token = CancellationToken::new();
        let task = tokio::spawn(discovery::run(listener, store, config, token.clone()));
        Ok(Self { addr, token, task })
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.task).await???;
        Ok(())
    }
}

/// One peer runtime and the events it produced but a test has not looked at yet.
pub(crate) struct Chatter {
    pub(crate) client: Client,
    events: Events,
    token: CancellationToken,
    messages: VecDeque<InboundMessage>,
}

pub(crate) fn config(root: &Path, user: &str, server: SocketAddr) -> Config {
    let mut config = Config::new(server.to_string(), name(user), root.join(user));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(400);
    config.ack_timeout = Duration::from_secs(3);
    config
}

impl Chatter {
    pub(crate) async fn start(config: Config) -> anyhow::Result<Self> {
        let token = CancellationToken::new();
        let (client, events) = peer::start(config, token.clone()).await?;
        client.wait_online(WAIT).await?;
        Ok(Self {
            client,
            events,
            token,
            messages: VecDeque::new(),
        })
    }

    pub(crate) async fn join(root: &Path, user: &str, server: SocketAddr) -> anyhow::Result<Self> {
        Self::start(config(root, user, server)).await
    }

    pub(crate) async fn stop(self) {
        self.client.shutdown(WAIT).await;
        drop(self.token);
    }

    /// Waits for an event `pick` accepts; messages passed on the way are kept (and marked
    /// shown, as a user interface does once it prints them).
    pub(crate) async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> anyhow::Result<T> {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let Some(event) = self.events.recv().await else {
                    bail!("the runtime stopped while waiting for {what}");
                };
                if let Event::Message(message) = &event {
                    self.client.mark_shown([message]).await?;
                }
                if let Some(found) = pick(&event) {
                    return Ok(found);
                }
                if let Event::Message(message) = event {
                    self.messages.push_back(message);
                }
            }
        })
        .await;
        found.with_context(|| format!("timed out waiting for {what}"))?
    }

    /// Waits for a delivered receipt from `from` (mail this user sent was stored there).
    pub(crate) async fn delivered_receipt_from(&mut self, from: &str) -> anyhow::Result<()> {
        self.wait_for("a delivered receipt", |event| match event {
            Event::Receipt {
                from: sender,
                kind: proto::ReceiptKind::Delivered,
                ..
            } if sender.as_str() == from => Some(()),
            _ => None,
        })
        .await
    }

    /// The next message shown.
    pub(crate) async fn message(&mut self) -> anyhow::Result<InboundMessage> {
        if let Some(message) = self.messages.pop_front() {
            return Ok(message);
        }
        self.wait_for("a message", |event| match event {
            Event::Message(message) => Some(message.clone()),
            _ => None,
        })
        .await
    }

    /// Asserts the next message shown is `body` from `from`.
    pub(crate) async fn expect(
        &mut self,
        from: &str,
        body: &str,
    ) -> anyhow::Result<InboundMessage> {
        let message = self.message().await?;
        assert_eq!(
            (message.from.as_str(), message.body.as_str()),
            (from, body),
            "unexpected message"
        );
        Ok(message)
    }

    pub(crate) async fn send(&self, to: &str, body: &str) -> anyhow::Result<DeliveryStatus> {
        Ok(self.client.send(&name(to), body).await?.status)
    }
}

/// A port nothing listens on.
pub(crate) async fn dead_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.port())
}

pub(crate) fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_chat_both_ways() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let mut alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;

    assert_eq!(
        alice.send("bob", "hi bob").await?,
        DeliveryStatus::Delivered
    );
    let received = bob.expect("alice", "hi bob").await?;
    assert!(!received.while_muted);
    assert_eq!(
        bob.send("alice", "hi alice").await?,
        DeliveryStatus::Delivered
    );
    alice.expect("bob", "hi alice").await?;
    // The kept link carries the next ones, in order.
    for index in 0..5 {
        assert_eq!(
            alice.send("bob", &format!("n{index}")).await?,
            DeliveryStatus::Delivered
        );
    }
    for index in 0..5 {
        bob.expect("alice", &format!("n{index}")).await?;
    }
    let online = alice.client.list().await?;
    assert_eq!(online.users, vec![name("alice"), name("bob")]);
    assert_eq!(online.more, 0);
    let history = alice.client.history(&name("bob"), 3).await?;
    assert_eq!(
        history
            .iter()
            .map(|line| line.body.as_str())
            .collect::<Vec<_>>(),
        ["n2", "n3", "n4"]
    );
    // Both sides compute the same safety number.
    let from_alice = alice.client.whois(&name("bob")).await?;
    let from_bob = bob.client.whois(&name("alice")).await?;
    assert_eq!(from_alice.safety_number, from_bob.safety_number);
    assert!(!from_alice.key_changed);
    // Sending to yourself or to nobody is a clear error, not a hang.
    assert!(alice.client.send(&name("alice"), "me").await.is_err());
    assert!(matches!(
        alice.send("nobody", "hello?").await?,
        DeliveryStatus::Failed {
            will_retry: false,
            ..
        }
    ));

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_mail_at_login_shown_once() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    // Bob registers once (binding his name), then leaves.
    Chatter::join(root.path(), "bob", server.addr)
        .await?
        .stop()
        .await;

    assert!(matches!(
        alice.send("bob", "while you were out").await?,
        DeliveryStatus::Queued { .. }
    ));
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    bob.expect("alice", "while you were out").await?;
    // Shown once: the next message bob sees is the next one alice sends.
    assert_eq!(
        alice.send("bob", "marker").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("alice", "marker").await?;
    bob.stop().await;
    // And not again at the next start.
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    assert_eq!(
        alice.send("bob", "second marker").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("alice", "second marker").await?;

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_but_unshown_message_is_shown_at_next_start() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let bob = Chatter::join(root.path(), "bob", server.addr).await?;
    // Bob's runtime stores and acks it, but bob's "screen" never shows it.
    assert_eq!(
        alice.send("bob", "do not miss me").await?,
        DeliveryStatus::Delivered
    );
    bob.stop().await;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    bob.expect("alice", "do not miss me").await?;

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_listener_gets_mail_pushed_at_once() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let mut bob_config = config(root.path(), "bob", server.addr);
    bob_config.advertise_port = Some(dead_port().await?);
    // Only the server's push can bring the mail in time: no slow re-check during the test.
    bob_config.mail_poll_interval = Duration::from_secs(3600);
    let mut bob = Chatter::start(bob_config).await?;

    assert_eq!(
        alice.send("bob", "through the relay").await?,
        DeliveryStatus::Queued {
            recipient_online: true
        }
    );
    bob.expect("alice", "through the relay").await?;
    // Bob can still reach alice directly.
    assert_eq!(
        bob.send("alice", "thanks").await?,
        DeliveryStatus::Delivered
    );

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_is_enforced_directly_and_for_mail() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let carol = Chatter::join(root.path(), "carol", server.addr).await?;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;

    bob.client.block(&name("alice")).await?;
    assert_eq!(bob.client.blocked().await?, vec![name("alice")]);
    assert!(
        bob.client.block(&name("ghost")).await.is_err(),
        "unknown users are an error"
    );
    let direct = alice.send("bob", "let me in").await?;
    assert!(
        matches!(
            &direct,
            DeliveryStatus::Failed {
                will_retry: false,
                ..
            }
        ),
        "{direct:?}"
    );
    assert_eq!(
        carol.send("bob", "marker 1").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("carol", "marker 1").await?;

    // Offline, the server refuses the mail.
    bob.stop().await;
    let mail = alice.send("bob", "let me in later").await?;
    assert!(
        matches!(
            &mail,
            DeliveryStatus::Failed {
                will_retry: false,
                ..
            }
        ),
        "{mail:?}"
    );
    assert!(matches!(
        carol.send("bob", "marker 2").await?,
        DeliveryStatus::Queued { .. }
    ));
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    bob.expect("carol", "marker 2").await?;

    // The block survived the restart; unblocking lets alice through again.
    assert_eq!(bob.client.blocked().await?, vec![name("alice")]);
    bob.client.unblock(&name("alice")).await?;
    assert_eq!(
        alice.send("bob", "friends again").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("alice", "friends again").await?;

    alice.stop().await;
    bob.stop().await;
    carol.stop().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_hides_and_later_shows() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let carol = Chatter::join(root.path(), "carol", server.addr).await?;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;

    assert!(bob.client.mute(&name("alice"), 0).await.is_err());
    assert!(bob.client.mute(&name("ghost"), 10).await.is_err());
    // Explicit unmute.
    bob.client.mute(&name("alice"), 3600).await?;
    assert_eq!(
        alice.send("bob", "hidden 1").await?,
        DeliveryStatus::Delivered
    );
    assert_eq!(
        alice.send("bob", "hidden 2").await?,
        DeliveryStatus::Delivered
    );
    assert_eq!(
        carol.send("bob", "visible").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("carol", "visible").await?;
    bob.client.unmute(&name("alice")).await?;
    let held = bob
        .wait_for("the mute to end", |event| match event {
            Event::MuteEnded { user, held } if user.as_str() == "alice" => Some(*held),
            _ => None,
        })
        .await?;
    assert_eq!(held, 2);
    assert!(bob.expect("alice", "hidden 1").await?.while_muted);
    assert!(bob.expect("alice", "hidden 2").await?.while_muted);

    // A mute that runs out by itself.
    bob.client.mute(&name("alice"), 1).await?;
    assert_eq!(
        alice.send("bob", "hidden 3").await?,
        DeliveryStatus::Delivered
    );
    let held = bob
        .wait_for("the mute to expire", |event| match event {
            Event::MuteEnded { user, held } if user.as_str() == "alice" => Some(*held),
            _ => None,
        })
        .await?;
    // The message may arrive just after the second is up, and then it is not held.
    assert!(held <= 1);
    bob.expect("alice", "hidden 3").await?;
    assert!(
        bob.client.unmute(&name("alice")).await.is_err(),
        "not muted any more"
    );

    alice.stop().await;
    bob.stop().await;
    carol.stop().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_pinned_key_is_refused_until_trusted() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let mut alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    assert_eq!(alice.send("bob", "first").await?, DeliveryStatus::Delivered);
    bob.expect("alice", "first").await?;
    assert_eq!(
        bob.send("alice", "pinned").await?,
        DeliveryStatus::Delivered
    );
    alice.expect("bob", "pinned").await?;

    // Receiver side: bob's pin for alice no longer matches alice's real key.
    bob.stop().await;
    let impostor = proto::Identity::generate();
    {
        let state = peer::state::State::open(&root.path().join("bob"))?;
        state
            .repin(&name("alice"), impostor.public())
            .wait_blocking()?;
    }
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    let refused = alice.send("bob", "can you read me").await?;
    assert!(
        matches!(
            &refused,
            DeliveryStatus::Failed {
                reason: FailureReason::RefusedByRecipient { .. },
                ..
            }
        ),
        "{refused:?}"
    );
    bob.wait_for("a key change warning", |event| match event {
        Event::KeyChanged { user, .. } if user.as_str() == "alice" => Some(()),
        _ => None,
    })
    .await?;
    assert!(bob.client.whois(&name("alice")).await?.key_changed);
    bob.client.trust(&name("alice")).await?;
    assert!(!bob.client.whois(&name("alice")).await?.key_changed);
    assert_eq!(
        alice.send("bob", "now you can").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("alice", "now you can").await?;

    // Sender side: alice's pin for bob is wrong; she refuses to send and keeps the message.
    alice.stop().await;
    {
        let state = peer::state::State::open(&root.path().join("alice"))?;
        state
            .repin(&name("bob"), impostor.public())
            .wait_blocking()?;
    }
    let mut alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let held = alice.send("bob", "held back").await?;
    assert!(
        matches!(
            &held,
            DeliveryStatus::Failed {
                will_retry: true,
                reason: FailureReason::KeyChanged
            }
        ),
        "{held:?}"
    );
    alice
        .wait_for("a key change warning", |event| match event {
            Event::KeyChanged { user, .. } if user.as_str() == "bob" => Some(()),
            _ => None,
        })
        .await?;
    // Trusting bob's real key sends what was held.
    alice.client.trust(&name("bob")).await?;
    let delivered = alice
        .wait_for("the held message's delivery", |event| match event {
            Event::Delivery { status, .. } => Some(status.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(delivered, DeliveryStatus::Delivered);
    bob.expect("alice", "held back").await?;

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

/// Regression: mail sealed under a key other than the pinned one used to be deleted with a
/// warning. It is kept, sealed, and shown once the user trusts the sender's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_under_a_changed_key_is_held_until_trusted() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    Chatter::join(root.path(), "bob", server.addr)
        .await?
        .stop()
        .await;
    // Bob's pin for alice no longer matches alice's real key, and bob is offline.
    let impostor = proto::Identity::generate();
    {
        let state = peer::state::State::open(&root.path().join("bob"))?;
        state
            .repin(&name("alice"), impostor.public())
            .wait_blocking()?;
    }
    for body in ["held 1", "held 2"] {
        assert!(matches!(
            alice.send("bob", body).await?,
            DeliveryStatus::Queued { .. }
        ));
    }

    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    for _ in 0..2 {
        let reason = bob
            .wait_for("the held-mail notice", |event| match event {
                Event::Refused { from, reason } if from.as_str() == "alice" => Some(reason.clone()),
                _ => None,
            })
            .await?;
        assert_eq!(reason, RefusalReason::KeyChanged { held: true });
    }
    // Acked at the server and kept here across a restart, never shown before `trust`.
    bob.stop().await;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    // Held envelopes are sealed: nothing of them is in the history yet.
    assert!(bob.client.history(&name("alice"), 10).await?.is_empty());
    bob.client.trust(&name("alice")).await?;
    // In the order written (two sent within the same millisecond may swap).
    let mut shown = Vec::new();
    for _ in 0..2 {
        let message = bob.message().await?;
        assert_eq!(message.from.as_str(), "alice");
        shown.push(message.body);
    }
    shown.sort();
    assert_eq!(shown, ["held 1", "held 2"]);
    assert_eq!(bob.client.history(&name("alice"), 10).await?.len(), 2);
    // Shown once: a second trust shows nothing, the next message is the next one shown.
    bob.client.trust(&name("alice")).await?;
    assert_eq!(alice.send("bob", "after").await?, DeliveryStatus::Delivered);
    bob.expect("alice", "after").await?;

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_restart_loses_nothing() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let store_path = root.path().join("discovery.redb");
    let server = Server::start(&store_path, any_port()).await?;
    let addr = server.addr;
    let mut alice = Chatter::join(root.path(), "alice", addr).await?;
    let mut bob = Chatter::join(root.path(), "bob", addr).await?;
    // Carol is offline with mail waiting across the restart.
    Chatter::join(root.path(), "carol", addr)
        .await?
        .stop()
        .await;
    assert!(matches!(
        alice.send("carol", "kept by the server").await?,
        DeliveryStatus::Queued { .. }
    ));
    assert_eq!(
        alice.send("bob", "before").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("alice", "before").await?;

    server.stop().await?;
    alice
        .wait_for("alice to notice", |event| {
            matches!(event, Event::Offline { .. }).then_some(())
        })
        .await?;
    // With the server gone, the message is kept in the outbox.
    let during = alice.send("bob", "during").await?;
    assert!(
        matches!(
            &during,
            DeliveryStatus::Failed {
                will_retry: true,
                ..
            }
        ),
        "{during:?}"
    );

    let server = Server::start(&store_path, addr).await?;
    alice
        .wait_for("alice to re-register", |event| {
            matches!(event, Event::Online { .. }).then_some(())
        })
        .await?;
    bob.expect("alice", "during").await?;
    bob.client.wait_online(WAIT).await?;
    assert_eq!(bob.send("alice", "after").await?, DeliveryStatus::Delivered);
    alice.expect("bob", "after").await?;
    let mut carol = Chatter::join(root.path(), "carol", addr).await?;
    carol.expect("alice", "kept by the server").await?;

    alice.stop().await;
    bob.stop().await;
    carol.stop().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_and_retransmissions_shown_once() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;

    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    let bob_addr = SocketAddr::from(([127, 0, 0, 1], bob.client.local_addr().port()));

    // Garbage bytes, then a huge declared frame: the connection is dropped, bob lives on.
    let mut garbage = tokio::net::TcpStream::connect(bob_addr).await?;
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    let mut huge = tokio::net::TcpStream::connect(bob_addr).await?;
    huge.write_all(&u32::MAX.to_be_bytes()).await?;

    let alice_identity = proto::Identity::load(&root.path().join("alice"))?;
    let bob_keys = proto::Identity::load(&root.path().join("bob"))?
        .public()
        .clone();
    // A dial for someone else (carol's key) at bob's address: bob cannot finish a
    // handshake meant for another key, so nothing is sent.
    let carol_keys = proto::Identity::generate().public().clone();
    assert!(
        raw_peer(bob_addr, &alice_identity, "alice", "carol", &carol_keys)
            .await
            .is_err()
    );
    // A hello for someone else, with bob's key, is refused.
    let mut wrong = raw_peer(bob_addr, &alice_identity, "alice", "carol", &bob_keys).await?;
    assert!(matches!(
        answer(&mut wrong).await?,
        proto::PeerMsg::Reject { id: None, .. }
    ));

    // A message sealed by alice, sent twice (a retransmission): acked twice, shown once.
    let mut sender =
        RawSender::start(server.addr, &alice_identity, "alice", "bob", &bob_keys).await?;
    let envelope = sender.seal("once only");
    let mut link = raw_peer(bob_addr, &alice_identity, "alice", "bob", &bob_keys).await?;
    for _ in 0..2 {
        link.send(&proto::PeerMsg::Envelope(envelope.clone()))
            .await?;
        assert_eq!(
            answer(&mut link).await?,
            proto::PeerMsg::Ack { id: envelope.id }
        );
    }
    // Someone claiming alice's name without her key is refused before any envelope.
    let mallory_identity = proto::Identity::generate();
    let mut mallory = raw_peer(bob_addr, &mallory_identity, "alice", "bob", &bob_keys).await?;
    assert!(matches!(
        answer(&mut mallory).await?,
        proto::PeerMsg::Reject { id: None, .. }
    ));
    // An envelope whose sender is not the user who said hello is refused: carol (registered,
    // with her own key) forwards alice's envelope.
    let carol = Chatter::join(root.path(), "carol", server.addr).await?;
    let carol_identity = proto::Identity::load(&root.path().join("carol"))?;
    let mut forwarder = raw_peer(bob_addr, &carol_identity, "carol", "bob", &bob_keys).await?;
    forwarder
        .send(&proto::PeerMsg::Envelope(envelope.clone()))
        .await?;
    assert!(matches!(
        answer(&mut forwarder).await?,
        proto::PeerMsg::Reject { id: Some(_), .. }
    ));
    carol.stop().await;
    // A tampered token is refused.
    let mut tampered = sender.seal("tampered");
    // (The end of the token: the Olm message's MAC.)
    let end = tampered.token.len();
    for byte in &mut tampered.token[end - 4..] {
        *byte ^= 0x55;
    }
    link.send(&proto::PeerMsg::Envelope(tampered)).await?;
    assert!(matches!(
        answer(&mut link).await?,
        proto::PeerMsg::Reject { id: Some(_), .. }
    ));

    bob.expect("alice", "once only").await?;
    assert_eq!(
        alice.send("bob", "still fine").await?,
        DeliveryStatus::Delivered
    );
    bob.expect("alice", "still fine").await?;

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_key_for_a_taken_name_is_refused_clearly() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    // Another "alice" with her own new key, from another data dir.
    let other = root.path().join("elsewhere");
    let token = CancellationToken::new();
    let (impostor, _events) = peer::start(config(&other, "alice", server.addr), token).await?;
    let error = impostor
        .wait_online(WAIT)
        .await
        .expect_err("the name is bound to the first key");
    assert!(error.to_string().contains("name_taken"), "{error}");
    assert!(matches!(
        *impostor.status().borrow(),
        peer::Status::Fatal(proto::ErrorReply {
            code: proto::ErrorCode::NameTaken,
            ..
        })
    ));
    impostor.shutdown(WAIT).await;
    alice.stop().await;
    server.stop().await
}

/// A server that rebinds a name and invents a rotation statement for it (not signed by the
/// key the contact pinned) gets a loud key change, never a followed rotation: the client
/// checks the statements itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_the_server_invents_is_a_loud_key_change() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let store = store::Store::Embedded(store::EmbeddedStore::open(
        root.path().join("discovery.redb"),
        store::MailLimits::default(),
    )?);
    let server = Server::start_on(store.clone(), any_port()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    assert_eq!(alice.send("bob", "first").await?, DeliveryStatus::Delivered);
    bob.expect("alice", "first").await?;
    alice.stop().await;

    // The server's operator (or whoever holds its store) moves alice's name to a key of
    // their own, with a statement that claims alice's old key as its start.
    let binding = store
        .binding(&name("alice"))
        .await?
        .context("alice is bound")?;
    let (mallory, replacement) = (proto::Identity::generate(), proto::Identity::generate());
    let mut invented = proto::identity::Rotation::sign(&name("alice"), &mallory, &replacement, 1);
    invented.old = binding.keys.clone();
    let outcome = store.rotate(&binding, &invented, 1).await?;
    assert_eq!(outcome, store::RotateOutcome::Rotated);
    let fake_home = root.path().join("elsewhere");
    replacement.save(&fake_home.join("alice"))?;
    let fake = Chatter::join(&fake_home, "alice", server.addr).await?;

    let refused = fake.send("bob", "it is me, really").await?;
    assert!(
        matches!(&refused, DeliveryStatus::Failed { .. }),
        "{refused:?}"
    );
    let seen = bob
        .wait_for("a key change warning", |event| match event {
            Event::KeyChanged { user, .. } if user.as_str() == "alice" => Some(true),
            Event::KeyRotated { user, .. } if user.as_str() == "alice" => Some(false),
            _ => None,
        })
        .await?;
    assert!(seen, "an invented rotation was followed");
    assert!(bob.client.whois(&name("alice")).await?.key_changed);

    fake.stop().await;
    bob.stop().await;
    server.stop().await
}
