//! The double ratchet end to end (issue 14): what a thief holding both users' data dirs
//! and the server's store can open (forward secrecy), what a thief who copied a user's
//! state can open once the users have talked on (post-compromise security), SIGKILLs of
//! either side during a burst in both directions, and the order of a pair's messages across
//! the mailbox and direct routes.
//!
//! Captured envelopes are the exact bytes that travelled: mail read from the server's
//! store, and direct messages sealed by the sender's runtime ([`peer::testing::seal_as`])
//! and sent over a raw peer link by the test (a direct link is Noise-encrypted, so a
//! recording forwarder would see nothing else).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, anyhow, ensure};
use peer::DeliveryStatus;
use proto::{
    Envelope, Identity, OpenError, PublicKeys, Username,
    ratchet::{OwnAccount, Sessions},
};
use serde_json::Value;

use store::{RedisStore, testing::RedisServer};

use crate::{
    chat::{Chatter, Server, any_port, name},
    util::{Discovery, Listener, User, answer, claim_prekey, raw_peer},
};

/// Seals `body` from `from` to `to` with `from`'s runtime, sends it over a raw link to
/// `to`'s listener, waits for the ack and for `to` to show it; returns the envelope as it
/// travelled.
async fn send_captured(
    root: &Path,
    from: &Chatter,
    to: &mut Chatter,
    from_name: &str,
    to_name: &str,
    body: &str,
) -> anyhow::Result<Envelope> {
    let envelope = seal_captured(from, to_name, body).await?;
    let identity = Identity::load(&root.join(from_name))?;
    let to_keys = Identity::load(&root.join(to_name))?.public().clone();
    let to_addr = std::net::SocketAddr::from(([127, 0, 0, 1], to.client.local_addr().port()));
    let mut link = raw_peer(to_addr, &identity, from_name, to_name, &to_keys).await?;
    link.send(&proto::PeerMsg::Envelope(envelope.clone()))
        .await?;
    ensure!(
        answer(&mut link).await? == proto::PeerMsg::Ack { id: envelope.id },
        "{to_name} did not ack {body:?}"
    );
    to.expect(from_name, body).await?;
    Ok(envelope)
}

/// Seals `body` to `to` with `from`'s runtime (its ratchet state durable), sending nothing.
async fn seal_captured(from: &Chatter, to: &str, body: &str) -> anyhow::Result<Envelope> {
    peer::testing::seal_as(&from.client, &name(to), body, proto::now_ms())
        .await
        .map_err(|status| anyhow!("{body:?} was not sealed: {status:?}"))
}

/// Copies the directory `from` (files and subdirectories, with their modes) to `to`, as a
/// thief would.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Someone holding a copy of `me`'s data dir (its identity key and state, with the Olm
/// account and the sessions with `peer`), trying to read the pair's messages.
struct Thief {
    me: Username,
    peer: Username,
    peer_keys: PublicKeys,
    identity: Identity,
    account: OwnAccount,
    sessions: Sessions,
}

impl Thief {
    /// Loads `me`'s stolen data dir `dir`; `peer_keys` are public (the server hands them
    /// out).
    fn from_dir(dir: &Path, me: &str, peer: &str, peer_keys: &PublicKeys) -> anyhow::Result<Self> {
        let (me, peer) = (name(me), name(peer));
        let identity = Identity::load(dir)?;
        let state = peer::state::State::open(dir)?;
        let account_pickle = state
            .olm_account()?
            .context("the stolen state holds no Olm account")?;
        let sessions_pickle = state
            .olm_sessions(&peer)?
            .context("the stolen state holds no sessions with the peer")?;
        let account = OwnAccount::from_pickle(&account_pickle, &identity, &me)?;
        let sessions = Sessions::from_pickle(&sessions_pickle.pickle)?;
        Ok(Self {
            me,
            peer,
            peer_keys: peer_keys.clone(),
            identity,
            account,
            sessions,
        })
    }

    /// The body of `envelope` (either direction of the pair), if anything the thief holds
    /// decrypts it: the stolen sessions (as advanced by what the thief opened before), a
    /// new inbound session from the stolen account (a pre-key message whose one-time or
    /// fallback key it still holds), or the static pairwise channel of the identity keys.
    /// A decryption whose header then disagrees counts as opened: the plaintext leaked.
    fn opens(&mut self, envelope: &Envelope) -> Option<String> {
        let leaked = |result: Result<proto::ratchet::Opened, OpenError>| match result {
            Ok(opened) => Some(opened.plaintext.body),
            Err(OpenError::Mismatch { field }) => Some(format!("(decrypted; {field} differs)")),
            Err(OpenError::Malformed) => Some("(decrypted; malformed)".to_owned()),
            Err(_) => None,
        };
        let own_keys = self.identity.public().clone();
        let (sender, sender_keys) = if envelope.from == self.me {
            (&self.me, &own_keys)
        } else {
            (&self.peer, &self.peer_keys)
        };
        // A failed open changes nothing, so one try does not spoil the next.
        if let Some(body) =
            leaked(
                self.sessions
                    .open(&mut self.account, sender, sender_keys, envelope),
            )
        {
            return Some(body);
        }
        if let Some(body) =
            leaked(Sessions::default().open(&mut self.account, sender, sender_keys, envelope))
        {
            return Some(body);
        }
        let channel = proto::Channel::new(&self.identity, &self.me, &self.peer, &self.peer_keys)
            .expect("the peer's keys are valid");
        match channel.open(envelope, proto::now_ms()) {
            Ok(plaintext) => Some(plaintext.body),
            Err(OpenError::Mismatch { .. } | OpenError::Malformed) => {
                Some("(decrypted by the static channel)".to_owned())
            }
            Err(_) => None,
        }
    }
}

/// The public keys in `dir`'s identity file.
fn public_keys(dir: &Path) -> anyhow::Result<PublicKeys> {
    Ok(Identity::load(dir)?.public().clone())
}

/// Envelopes captured on both routes (mail, from the store; direct, as sent), all read by
/// their recipient; then a thief with copies of both data dirs and of Redis's files opens
/// none of them: not with the stolen sessions, not with a new session from a stolen
/// account, not with the static channel of the stolen identity keys. The same tools do
/// open a message the recipient has not read yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_secrecy_stolen_data_dirs_and_store_open_no_captured_message() -> anyhow::Result<()>
{
    let root = tempfile::tempdir()?;
    // Redis with its append-only file: the thief later copies that too, deleted mail and all.
    let redis = RedisServer::start_persistent()?;
    let (server, store_view) = server_and_offline_bob_on(&redis, root.path()).await?;
    // Without read receipts, only the messages counted here go into the mailboxes (a
    // delivered receipt for mail is awaited below).
    let quiet = |user: &str| {
        let mut config = crate::chat::config(root.path(), user, server.addr);
        config.read_receipts = false;
        config
    };
    let mut alice = Chatter::start(quiet("alice")).await?;
    let mut captured: Vec<(Envelope, String)> = Vec::new();

    // Mail while bob is offline (the first one starts the session from a claimed key),
    // then direct messages both ways (both ratchets turn), then mail in the established
    // session.
    let first_mail = ["mail 1 (first contact)", "mail 2"];
    captured.extend(send_captured_mail(&alice, &store_view, &first_mail).await?);
    let mut bob = Chatter::start(quiet("bob")).await?;
    for body in first_mail {
        bob.expect("alice", body).await?;
    }
    alice.delivered_receipt_from("bob").await?;
    for round in 0..3 {
        let body = format!("direct from alice {round}");
        let envelope = send_captured(root.path(), &alice, &mut bob, "alice", "bob", &body).await?;
        captured.push((envelope, body));
        let body = format!("direct from bob {round}");
        let envelope = send_captured(root.path(), &bob, &mut alice, "bob", "alice", &body).await?;
        captured.push((envelope, body));
    }
    bob.stop().await;
    let second_mail = ["mail 3", "mail 4"];
    captured.extend(send_captured_mail(&alice, &store_view, &second_mail).await?);
    let mut bob = Chatter::start(quiet("bob")).await?;
    for body in second_mail {
        bob.expect("alice", body).await?;
    }
    // Bob's receipt for them reached alice: nothing more goes into a mailbox.
    alice.delivered_receipt_from("bob").await?;
    // One last message from alice, sealed but never delivered: bob has not read it, so his
    // stolen state must open it (the thief's tools work; what was read is what is safe).
    let unread = seal_captured(&alice, "bob", "never delivered").await?;

    alice.stop().await;
    bob.stop().await;
    server.stop().await?;

    // The thief copies everything as it is now: both data dirs and Redis's files.
    let loot = root.path().join("thief");
    copy_dir(&root.path().join("alice"), &loot.join("alice"))?;
    copy_dir(&root.path().join("bob"), &loot.join("bob"))?;
    copy_dir(redis.dir(), &loot.join("redis"))?;
    // The store keeps no mail now (bob acked it); its files may still hold old copies.
    for user in ["alice", "bob"] {
        let left = store_view.mail_count(&name(user)).await?;
        ensure!(left == 0, "{left} mails left for {user}");
    }
    let in_store_files = tokens_in_files(&loot.join("redis"), &captured)?;
    eprintln!(
        "{in_store_files} of the {} captured envelopes are still in Redis's files",
        captured.len()
    );

    let alice_keys = public_keys(&loot.join("alice"))?;
    let bob_keys = public_keys(&loot.join("bob"))?;
    let mut thief_as_bob = Thief::from_dir(&loot.join("bob"), "bob", "alice", &alice_keys)?;
    let mut thief_as_alice = Thief::from_dir(&loot.join("alice"), "alice", "bob", &bob_keys)?;
    ensure!(
        captured.len() == 10,
        "captured {} envelopes",
        captured.len()
    );
    for (envelope, body) in &captured {
        for thief in [&mut thief_as_bob, &mut thief_as_alice] {
            let opened = thief.opens(envelope);
            ensure!(
                opened.is_none(),
                "{body:?} ({} to {}) opened with {}'s stolen data: {opened:?}",
                envelope.from,
                envelope.to,
                thief.me
            );
        }
    }
    assert_eq!(
        thief_as_bob.opens(&unread).as_deref(),
        Some("never delivered")
    );
    Ok(())
}

/// A discovery server on `redis`, the test's own view of that store (to read the mail as
/// it waits there), and bob registered once (his prekeys published) and gone offline.
async fn server_and_offline_bob_on(
    redis: &RedisServer,
    root: &Path,
) -> anyhow::Result<(Server, store::Store)> {
    let limits = store::MailLimits::default();
    let server = Server::start_on(
        store::Store::Redis(RedisStore::connect(&redis.url(), limits).await?),
        any_port(),
    )
    .await?;
    let store_view = store::Store::Redis(RedisStore::connect(&redis.url(), limits).await?);
    Chatter::join(root, "bob", server.addr).await?.stop().await;
    Ok((server, store_view))
}

/// Sends `bodies` from alice to the offline bob (each must be queued) and returns them as
/// they wait in the store, oldest first, left in place.
async fn send_captured_mail(
    alice: &Chatter,
    store_view: &store::Store,
    bodies: &[&str],
) -> anyhow::Result<Vec<(Envelope, String)>> {
    let before = store_view.mail_count(&name("bob")).await?;
    ensure!(before == 0, "{before} mails already waiting");
    for body in bodies {
        let status = alice.send("bob", body).await?;
        ensure!(
            matches!(status, DeliveryStatus::Queued { .. }),
            "{body:?}: {status:?}"
        );
    }
    let fetched = store_view
        .fetch(&name("bob"), bodies.len() + 1, usize::MAX, proto::now_ms())
        .await?;
    ensure!(
        fetched.mail.len() == bodies.len(),
        "{} mails in the store, {} sent",
        fetched.mail.len(),
        bodies.len()
    );
    Ok(fetched
        .mail
        .into_iter()
        .map(|mail| mail.envelope)
        .zip(bodies.iter().map(|body| (*body).to_owned()))
        .collect())
}

/// How many of the `captured` envelopes' tokens appear, byte for byte, in the files
/// under `dir`.
fn tokens_in_files(dir: &Path, captured: &[(Envelope, String)]) -> anyhow::Result<usize> {
    fn read_all(dir: &Path, contents: &mut Vec<u8>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                read_all(&entry.path(), contents)?;
            } else {
                contents.extend(std::fs::read(entry.path())?);
            }
        }
        Ok(())
    }
    let mut contents = Vec::new();
    read_all(dir, &mut contents)?;
    Ok(captured
        .iter()
        .filter(|(envelope, _)| {
            let token = envelope.token.as_slice();
            contents.windows(token.len()).any(|window| window == token)
        })
        .count())
}

/// How many keys a thief may claim while draining bob's one-time keys before the server
/// hands out the fallback key (he publishes [`proto::ratchet::ONE_TIME_KEYS_TARGET`]).
const MAX_DRAINING_CLAIMS: usize = 2 * proto::ratchet::ONE_TIME_KEYS_TARGET;

/// Forward secrecy when bob's one-time keys have run out (anyone registered can claim them
/// all): the server hands out his fallback key, alice's first mail starts the session from
/// it, bob reads it, and a thief with a copy of bob's data dir afterwards must not open it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_secrecy_of_a_session_started_from_the_fallback_key() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let redis = RedisServer::start()?;
    let (server, store_view) = server_and_offline_bob_on(&redis, root.path()).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    // Someone claims bob's one-time keys until only the fallback key is handed out.
    let mut claims = 0;
    while !claim_prekey(server.addr, "bob")
        .await
        .with_context(|| format!("claim {claims}"))?
        .fallback
    {
        claims += 1;
        ensure!(
            claims < MAX_DRAINING_CLAIMS,
            "still one-time keys after {claims} claims"
        );
    }

    let bodies = ["first contact, from the fallback key", "second, same chain"];
    let captured = send_captured_mail(&alice, &store_view, &bodies).await?;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    for body in bodies {
        bob.expect("alice", body).await?;
    }
    alice.stop().await;
    bob.stop().await;
    server.stop().await?;

    let loot = root.path().join("thief");
    copy_dir(&root.path().join("bob"), &loot.join("bob"))?;
    let alice_keys = public_keys(&root.path().join("alice"))?;
    let mut thief = Thief::from_dir(&loot.join("bob"), "bob", "alice", &alice_keys)?;
    for (envelope, body) in &captured {
        let opened = thief.opens(envelope);
        ensure!(
            opened.is_none(),
            "{body:?} opened with bob's stolen data: {opened:?}"
        );
    }
    Ok(())
}

/// A thief who copied bob's data dir reads along at first; after two round trips (each
/// side's ratchet turns with keys the thief never saw) alice's new messages open at bob
/// but not with the stolen state, however the thief uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_compromise_stolen_state_is_locked_out_after_two_round_trips() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(&root.path().join("discovery.redb"), any_port()).await?;
    let mut alice = Chatter::join(root.path(), "alice", server.addr).await?;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    assert_eq!(alice.send("bob", "hello").await?, DeliveryStatus::Delivered);
    bob.expect("alice", "hello").await?;
    assert_eq!(bob.send("alice", "hi").await?, DeliveryStatus::Delivered);
    alice.expect("bob", "hi").await?;

    // The theft: a copy of bob's data dir, taken while his client is stopped.
    bob.stop().await;
    let stolen = root.path().join("stolen-bob");
    copy_dir(&root.path().join("bob"), &stolen)?;
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    let mut thief = Thief::from_dir(
        &stolen,
        "bob",
        "alice",
        &public_keys(&root.path().join("alice"))?,
    )?;

    // Right after the theft the thief reads along: the stolen state is live.
    let envelope = send_captured(
        root.path(),
        &alice,
        &mut bob,
        "alice",
        "bob",
        "read by both",
    )
    .await?;
    assert_eq!(thief.opens(&envelope).as_deref(), Some("read by both"));

    // Two round trips: each side's ratchet turns with fresh keys the thief never saw.
    for round in 0..2 {
        let body = format!("alice, round {round}");
        assert_eq!(alice.send("bob", &body).await?, DeliveryStatus::Delivered);
        bob.expect("alice", &body).await?;
        let body = format!("bob, round {round}");
        assert_eq!(bob.send("alice", &body).await?, DeliveryStatus::Delivered);
        alice.expect("bob", &body).await?;
    }

    // New messages from alice: bob reads them, the thief (with the state it advanced, with
    // a fresh copy of the stolen state, and with the stolen identity key) does not.
    for index in 0..3 {
        let body = format!("after the healing {index}");
        let envelope = send_captured(root.path(), &alice, &mut bob, "alice", "bob", &body).await?;
        let opened = thief.opens(&envelope);
        ensure!(
            opened.is_none(),
            "{body:?} opened with the stolen state: {opened:?}"
        );
        let mut fresh_thief = Thief::from_dir(
            &stolen,
            "bob",
            "alice",
            &public_keys(&root.path().join("alice"))?,
        )?;
        let opened = fresh_thief.opens(&envelope);
        ensure!(
            opened.is_none(),
            "{body:?} opened with a fresh copy of the stolen state: {opened:?}"
        );
    }

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

/// How many mails wait in bob's mailbox before the direct messages.
const QUEUED_MAIL: usize = 1_000;
/// How many direct messages follow them.
const DIRECT_AFTER_MAIL: usize = 20;

/// 1,000 mails queued for the offline bob (one sending chain, 1,000 deep), then direct
/// messages once he is online: every one opens and is shown in the order sent, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_across_routes_a_thousand_mails_then_direct_all_open_in_order() -> anyhow::Result<()>
{
    let root = tempfile::tempdir()?;
    let store = store::EmbeddedStore::open(
        root.path().join("discovery.redb"),
        store::MailLimits::default(),
    )?;
    // The server's deposit limit (600 a minute by default) would keep most of the 1,000 in
    // alice's outbox, to be retried later: this test is about order, not that limit.
    let config = discovery::Config {
        deposits_per_minute: 2 * QUEUED_MAIL as u32,
        ..discovery::Config::default()
    };
    let server =
        Server::start_configured(store::Store::Embedded(store), any_port(), config).await?;
    let alice = Chatter::join(root.path(), "alice", server.addr).await?;
    Chatter::join(root.path(), "bob", server.addr)
        .await?
        .stop()
        .await;

    // All taken in line at once (they are sealed, recorded and sent in this order), then
    // every result awaited: one session, one sending chain, 1,000 deep.
    let mut results = Vec::with_capacity(QUEUED_MAIL);
    for index in 0..QUEUED_MAIL {
        results.push(
            alice
                .client
                .submit_send(&name("bob"), &format!("mail {index}"))
                .await?,
        );
    }
    for (index, result) in results.into_iter().enumerate() {
        let status = result.await?.status;
        ensure!(
            matches!(status, DeliveryStatus::Queued { .. }),
            "mail {index}: {status:?}"
        );
    }

    // Bob comes online and reads his mail, in order; then alice goes on directly, in the
    // same sending chain (bob never answered), and those open after the 1,000 as well.
    let mut bob = Chatter::join(root.path(), "bob", server.addr).await?;
    for index in 0..QUEUED_MAIL {
        bob.expect("alice", &format!("mail {index}")).await?;
    }
    for index in 0..DIRECT_AFTER_MAIL {
        let body = format!("direct {index}");
        assert_eq!(
            alice.send("bob", &body).await?,
            DeliveryStatus::Delivered,
            "{body}"
        );
    }
    for index in 0..DIRECT_AFTER_MAIL {
        bob.expect("alice", &format!("direct {index}")).await?;
    }
    // Each shown once: the next message is the next one alice sends.
    assert_eq!(alice.send("bob", "last").await?, DeliveryStatus::Delivered);
    bob.expect("alice", "last").await?;

    alice.stop().await;
    bob.stop().await;
    server.stop().await
}

/// Messages per side and round of the SIGKILL burst.
const BURST: usize = 25;
/// How many of the other side's messages the victim shows before it is killed.
const KILL_AFTER: usize = 8;

/// A message as a bot showed it: (sender, body).
type Shown = (String, String);

/// One message a bot was told to send, and what its sender said about it.
struct Sent {
    from: &'static str,
    to: &'static str,
    body: String,
    /// The sender reported it delivered, queued or kept in its outbox.
    confirmed: bool,
}

/// Whether a `send` result says the message is on its way: delivered, queued, or kept in
/// the outbox to be retried.
fn is_confirmed(result: &Value) -> bool {
    match result["status"].as_str() {
        Some("delivered" | "queued") => true,
        Some("failed") => result["text"]
            .as_str()
            .is_some_and(|text| text.contains("kept in the outbox")),
        _ => false,
    }
}

/// The `send` result for `line` among the events `seen` by a killed bot, if it printed one.
fn result_seen<'a>(seen: &'a [Value], line: &str) -> Option<&'a Value> {
    seen.iter()
        .find(|event| event["event"] == "result" && event["command"] == line)
}

/// The messages a bot showed, as (from, body), and those of them it may not have marked
/// shown before it was killed (printed after its last command result: the CLI marks a
/// printed burst shown in one write, so only the last burst can be shown again after a
/// restart — by design it is shown twice rather than never).
fn shown_by(seen: &[Value]) -> (Vec<Shown>, BTreeSet<Shown>) {
    let last_result = seen
        .iter()
        .rposition(|event| event["event"] == "result")
        .map_or(0, |index| index + 1);
    let message = |event: &Value| {
        (event["event"] == "message").then(|| {
            let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
            (text("from"), text("body"))
        })
    };
    let shown = seen.iter().filter_map(message).collect();
    let unmarked = seen[last_result..].iter().filter_map(message).collect();
    (shown, unmarked)
}

/// The real binaries: both `listen --json` bots get a burst of sends to each other; bob is
/// SIGKILLed mid-burst, restarted, then the same for alice. Every message its sender
/// reported delivered, queued or kept in the outbox is shown at the recipient; nothing is
/// shown that was not sent; nothing is shown twice except the one burst the CLI printed
/// but had not yet marked shown when it was killed (by design shown again rather than
/// lost, and at most once more); no message is refused, no key change or state error.
#[test]
fn sigkill_of_either_side_during_a_burst_both_ways_loses_nothing_refuses_nothing() {
    let server = Discovery::start();
    let users = [User::new("alice"), User::new("bob")];
    let names = ["alice", "bob"];
    let start = |index: usize| {
        let mut bot = users[index].listen(&server);
        bot.online();
        bot
    };
    let mut bots: [Listener; 2] = [start(0), start(1)];
    // Every instance that ran, per user, in order (killed ones first).
    let mut killed: [Vec<Listener>; 2] = [Vec::new(), Vec::new()];
    let mut sent: Vec<Sent> = Vec::new();

    // Round 0 kills bob, round 1 kills alice; both send all the while.
    for (round, victim) in [(0, 1), (1, 0)] {
        let other = 1 - victim;
        let body = |from: usize, index: usize| format!("{}{round}-{index}", &names[from][..1]);
        for index in 0..BURST {
            for from in [0, 1] {
                bots[from].submit(&format!("send {} {}", names[1 - from], body(from, index)));
            }
        }
        // Mid-burst: the victim is receiving, storing and sending when it dies.
        bots[victim].message(&body(other, KILL_AFTER));
        bots[victim].kill_now();
        // Its output up to the kill (the pipe closes at its death: no waiting on time).
        bots[victim].drain_for(crate::util::WAIT);
        let restarted = start(victim);
        killed[victim].push(std::mem::replace(&mut bots[victim], restarted));
        let victim_seen = &killed[victim].last().expect("just pushed").seen;
        for index in 0..BURST {
            let line = format!("send {} {}", names[other], body(victim, index));
            sent.push(Sent {
                from: names[victim],
                to: names[other],
                body: body(victim, index),
                confirmed: result_seen(victim_seen, &line).is_some_and(is_confirmed),
            });
        }
        // The survivor's commands all end: delivered, queued or kept in its outbox.
        for index in 0..BURST {
            let line = format!("send {} {}", names[victim], body(other, index));
            let result = bots[other].result(&line);
            assert!(is_confirmed(&result), "{line:?}: {result}");
            sent.push(Sent {
                from: names[other],
                to: names[victim],
                body: body(other, index),
                confirmed: true,
            });
        }
    }

    // Every confirmed message reaches its recipient (in the killed instances' output or,
    // after the restarts, in the running ones').
    for message in sent.iter().filter(|message| message.confirmed) {
        let recipient = names
            .iter()
            .position(|user| *user == message.to)
            .expect("a user");
        let key = (message.from.to_owned(), message.body.clone());
        let already = killed[recipient]
            .iter()
            .any(|bot| shown_by(&bot.seen).0.contains(&key));
        if !already {
            bots[recipient].message(&message.body);
        }
    }
    // Nothing more arrives (only to catch extra copies; everything awaited is in).
    for bot in &mut bots {
        bot.drain_for(Duration::from_millis(500));
    }

    let known: BTreeMap<Shown, &Sent> = sent
        .iter()
        .map(|message| ((message.from.to_owned(), message.body.clone()), message))
        .collect();
    for (recipient, user) in names.iter().enumerate() {
        let instances: Vec<&Listener> =
            killed[recipient].iter().chain([&bots[recipient]]).collect();
        let mut counts: BTreeMap<Shown, usize> = BTreeMap::new();
        let mut may_repeat: BTreeSet<Shown> = BTreeSet::new();
        for (instance, bot) in instances.iter().enumerate() {
            for event in &bot.seen {
                let kind = event["event"].as_str().unwrap_or_default();
                assert!(
                    !matches!(kind, "refused" | "state_error" | "fatal" | "key_changed"),
                    "{user} (instance {instance}): {event}"
                );
            }
            let (shown, unmarked) = shown_by(&bot.seen);
            for key in shown {
                let message = known.get(&key);
                assert!(
                    message.is_some_and(|message| message.to == *user),
                    "{user} showed {key:?}, which nobody sent to {user}"
                );
                *counts.entry(key).or_default() += 1;
            }
            if instance + 1 < instances.len() {
                may_repeat.extend(unmarked);
            }
        }
        for (key, count) in &counts {
            let allowed = if may_repeat.contains(key) { 2 } else { 1 };
            assert!(
                *count <= allowed,
                "{user} showed {key:?} {count} times (allowed {allowed})"
            );
        }
        let confirmed = sent
            .iter()
            .filter(|message| message.to == *user && message.confirmed)
            .count();
        let unconfirmed_shown = counts
            .keys()
            .filter(|key| known.get(*key).is_some_and(|message| !message.confirmed))
            .count();
        eprintln!(
            "{user}: {} distinct messages shown ({confirmed} confirmed to the sender, {unconfirmed_shown} sent by a killed bot before it could report), {} repeated after a kill",
            counts.len(),
            counts.values().filter(|count| **count > 1).count()
        );
    }
}
