//! The behaviours every backend must have. Each function takes a fresh [`Store`] built with
//! [`util::LIMITS`]; time is passed in, never slept.

use std::net::SocketAddr;

use anyhow::{Context as _, ensure};
use proto::identity::Rotation;
use store::{
    BindOutcome, Binding, Broadcast, DepositOutcome, Presence, RotateOutcome, Store, StoreError,
};

use crate::util::{LIMITS, envelope, expect_events, ids, keys, refs, refs_of, user};

pub async fn deposit_fetch_ack_keeps_order_and_counts(store: &Store) -> anyhow::Result<()> {
    let bob = user("bob");
    let sent: Vec<_> = (0..5)
        .map(|n| envelope("alice", "bob", &n.to_string()))
        .collect();
    for (n, message) in sent.iter().enumerate() {
        // The same clock for all: order must come from deposit order, not from time.
        let outcome = store.deposit(message, 1_000 + (n as u64 % 2)).await?;
        ensure!(outcome == DepositOutcome::Stored);
    }
    ensure!(store.mail_count(&bob).await? == 5);
    ensure!(store.mail_count(&user("alice")).await? == 0);

    let first = store.fetch(&bob, 3, usize::MAX, 2_000).await?;
    ensure!(ids(&first.mail) == sent[..3].iter().map(|m| m.id).collect::<Vec<_>>());
    ensure!(first.remaining == 2, "remaining {}", first.remaining);
    ensure!(first.mail[0].envelope == sent[0]);
    ensure!(first.mail[0].deposited_at_ms == 1_000);

    ensure!(store.ack(&bob, &refs(&first.mail)).await? == 3);
    ensure!(store.mail_count(&bob).await? == 2);

    let second = store.fetch(&bob, 10, usize::MAX, 2_000).await?;
    ensure!(ids(&second.mail) == sent[3..].iter().map(|m| m.id).collect::<Vec<_>>());
    ensure!(second.remaining == 0);

    // Acking again, or acking an unknown id, deletes nothing.
    ensure!(store.ack(&bob, &refs(&first.mail)).await? == 0);
    ensure!(
        store
            .ack(
                &bob,
                &[proto::MailRef {
                    from: user("alice"),
                    id: proto::MessageId::random()
                }]
            )
            .await?
            == 0
    );
    ensure!(store.ack(&bob, &[]).await? == 0);

    ensure!(store.ack(&bob, &refs(&second.mail)).await? == 2);
    ensure!(store.mail_count(&bob).await? == 0);
    let empty = store.fetch(&bob, 10, usize::MAX, 2_000).await?;
    ensure!(empty.mail.is_empty() && empty.remaining == 0);
    Ok(())
}

pub async fn unacked_mail_comes_back(store: &Store) -> anyhow::Result<()> {
    let bob = user("bob");
    let sent = [envelope("alice", "bob", "1"), envelope("carol", "bob", "2")];
    for message in &sent {
        store.deposit(message, 1_000).await?;
    }
    let first = store.fetch(&bob, 10, usize::MAX, 1_100).await?;
    ensure!(first.mail.len() == 2);
    // No ack (the client went away): the same mail, in the same order, next time.
    let again = store.fetch(&bob, 10, usize::MAX, 1_200).await?;
    ensure!(again == first);
    ensure!(store.mail_count(&bob).await? == 2);

    // A partial ack leaves exactly the rest.
    store.ack(&bob, &[proto::MailRef::of(&sent[0])]).await?;
    let rest = store.fetch(&bob, 10, usize::MAX, 1_300).await?;
    ensure!(ids(&rest.mail) == vec![sent[1].id]);
    Ok(())
}

pub async fn expired_mail_is_dropped_at_fetch(store: &Store) -> anyhow::Result<()> {
    let bob = user("bob");
    let ttl = LIMITS.ttl_ms;
    let old = envelope("alice", "bob", "old");
    let new = envelope("alice", "bob", "new");
    store.deposit(&old, 0).await?;
    store.deposit(&new, 500).await?;

    // Just before the first expires, both are there.
    let before = store.fetch(&bob, 10, usize::MAX, ttl - 1).await?;
    ensure!(ids(&before.mail) == vec![old.id, new.id]);

    // At its expiry it is dropped (and deleted), the younger one stays.
    let after = store.fetch(&bob, 10, usize::MAX, ttl).await?;
    ensure!(ids(&after.mail) == vec![new.id]);
    ensure!(after.remaining == 0);
    ensure!(store.mail_count(&bob).await? == 1);

    // A batch of one is topped up from behind the expired mail.
    store
        .deposit(&envelope("alice", "bob", "newest"), ttl + 400)
        .await?;
    let late = store.fetch(&bob, 1, usize::MAX, ttl + 500).await?;
    ensure!(late.mail.len() == 1 && late.mail[0].envelope.token == b"token-newest");
    ensure!(late.remaining == 0);
    ensure!(store.mail_count(&bob).await? == 1);
    Ok(())
}

pub async fn full_mailbox_refuses_with_typed_error(store: &Store) -> anyhow::Result<()> {
    let bob = user("bob");
    let mut sent = Vec::new();
    for n in 0..LIMITS.cap {
        let message = envelope("alice", "bob", &n.to_string());
        store.deposit(&message, 1_000).await?;
        sent.push(message);
    }
    let refused = store
        .deposit(&envelope("alice", "bob", "one too many"), 1_000)
        .await;
    match refused {
        Err(StoreError::MailboxFull { user, cap }) => {
            ensure!(user == bob && cap == LIMITS.cap);
        }
        other => anyhow::bail!("expected MailboxFull, got {other:?}"),
    }
    // A retried deposit of mail already in the full mailbox is still just a duplicate.
    ensure!(store.deposit(&sent[0], 1_000).await? == DepositOutcome::Duplicate);
    ensure!(store.mail_count(&bob).await? == LIMITS.cap);

    // Room again after an ack.
    store.ack(&bob, &[proto::MailRef::of(&sent[0])]).await?;
    ensure!(
        store
            .deposit(&envelope("alice", "bob", "fits"), 1_000)
            .await?
            == DepositOutcome::Stored
    );
    Ok(())
}

/// Regression: mail past its TTL still counted toward the cap (and the embedded store
/// deleted it only when its recipient fetched), so a user away longer than the TTL was
/// "mailbox full" to every sender although a fetch would have returned nothing. A deposit
/// into a full mailbox now first drops the expired mail at its head.
pub async fn expired_mail_does_not_keep_a_mailbox_full(store: &Store) -> anyhow::Result<()> {
    let bob = user("bob");
    let (cap, ttl) = (LIMITS.cap, LIMITS.ttl_ms);
    let early = cap / 2;
    for n in 0..cap {
        let deposited_at = if n < early { 1_000 } else { 1_000 + ttl / 2 };
        let message = envelope("alice", "bob", &n.to_string());
        store.deposit(&message, deposited_at).await?;
    }
    // The early half has expired, the late half has not: only the early half goes.
    let later = 1_000 + ttl;
    let fresh = envelope("carol", "bob", "after the ttl");
    ensure!(store.deposit(&fresh, later).await? == DepositOutcome::Stored);
    ensure!(store.mail_count(&bob).await? == cap - early + 1);
    for n in 1..early {
        let message = envelope("carol", "bob", &format!("refill {n}"));
        ensure!(store.deposit(&message, later).await? == DepositOutcome::Stored);
    }
    ensure!(store.mail_count(&bob).await? == cap);
    let refused = store
        .deposit(&envelope("carol", "bob", "one too many"), later)
        .await;
    ensure!(
        matches!(refused, Err(StoreError::MailboxFull { .. })),
        "live mail still fills the mailbox: {refused:?}"
    );
    let live = store.fetch(&bob, 1_000, usize::MAX, later).await?;
    ensure!(live.mail.len() as u64 == cap && live.remaining == 0);

    // Long after all of it expired, with no fetch in between: the mailbox empties.
    let much_later = later + ttl * 10;
    let last = envelope("dave", "bob", "much later");
    ensure!(store.deposit(&last, much_later).await? == DepositOutcome::Stored);
    ensure!(store.mail_count(&bob).await? == 1);
    ensure!(store.deposit(&last, much_later).await? == DepositOutcome::Duplicate);
    let fetched = store.fetch(&bob, 1_000, usize::MAX, much_later).await?;
    ensure!(ids(&fetched.mail) == vec![last.id] && fetched.remaining == 0);
    ensure!(store.ack(&bob, &[proto::MailRef::of(&last)]).await? == 1);
    ensure!(store.mail_count(&bob).await? == 0);
    Ok(())
}

/// Regression: a fetch read up to `max` messages whatever their size (the server asks for
/// 1,000) and the server then sent only what fit one 64 KiB frame, so a mailbox of large
/// messages had ~47 MiB read to send one frame. A fetch now stops once its envelopes pass
/// the byte budget it is given, always returning the oldest message, with `remaining`
/// exact.
pub async fn a_fetch_stops_at_its_byte_budget(store: &Store) -> anyhow::Result<()> {
    const FRAME: usize = 64 * 1024;
    let bob = user("bob");
    let (large, size) = deposit_equal_sized(store, 20, 20_000, 1_000).await?;
    let fetched = store.fetch(&bob, 1_000, FRAME, 2_000).await?;
    ensure!(
        ids(&fetched.mail) == ids_of(&large[..FRAME / size]),
        "{} messages of {size} bytes for a budget of {FRAME}",
        fetched.mail.len()
    );
    ensure!(fetched.remaining == (large.len() - FRAME / size) as u64);
    // A budget smaller than one message still brings the oldest one.
    let tiny = store.fetch(&bob, 1_000, 1, 2_000).await?;
    ensure!(ids(&tiny.mail) == vec![large[0].id] && tiny.remaining == 19);

    // Small messages fill the budget exactly: as many as fit, not fewer.
    store.ack(&bob, &refs_of(&large)).await?;
    let (small, size) = deposit_equal_sized(store, 30, 100, 1_000).await?;
    let fetched = store.fetch(&bob, 1_000, size * 25, 2_000).await?;
    ensure!(ids(&fetched.mail) == ids_of(&small[..25]) && fetched.remaining == 5);

    // Expired mail met on the way (the five left) takes no room.
    let late = 1_000 + LIMITS.ttl_ms;
    let (fresh, size) = deposit_equal_sized(store, 3, 101, late - 1).await?;
    let fetched = store.fetch(&bob, 1_000, size * 2, late).await?;
    ensure!(ids(&fetched.mail) == ids_of(&fresh[..2]) && fetched.remaining == 1);
    Ok(())
}

/// Deposits `count` messages from alice to bob at `now_ms`, each with a token of
/// `label_len` digits, so all are the same size; returns them and their encoded size.
async fn deposit_equal_sized(
    store: &Store,
    count: usize,
    label_len: usize,
    now_ms: u64,
) -> anyhow::Result<(Vec<proto::Envelope>, usize)> {
    let mut sent = Vec::with_capacity(count);
    for n in 0..count {
        let message = envelope("alice", "bob", &format!("{n:0>label_len$}"));
        store.deposit(&message, now_ms).await?;
        sent.push(message);
    }
    let size = proto::wire::encoded_len(&sent[0])?;
    Ok((sent, size))
}

/// The ids of `envelopes`, in order.
fn ids_of(envelopes: &[proto::Envelope]) -> Vec<proto::MessageId> {
    envelopes.iter().map(|envelope| envelope.id).collect()
}

pub async fn deposit_is_idempotent_by_message_id(store: &Store) -> anyhow::Result<()> {
    let bob = user("bob");
    let message = envelope("alice", "bob", "once");
    ensure!(store.deposit(&message, 1_000).await? == DepositOutcome::Stored);
    ensure!(store.deposit(&message, 2_000).await? == DepositOutcome::Duplicate);
    ensure!(store.mail_count(&bob).await? == 1);
    let fetched = store.fetch(&bob, 10, usize::MAX, 3_000).await?;
    ensure!(fetched.mail.len() == 1);
    // The first deposit is the one kept.
    ensure!(fetched.mail[0].deposited_at_ms == 1_000);

    // Once acked, the id is free again (a new deposit is new mail, not a duplicate), also
    // while other mail keeps the mailbox from emptying.
    let other = envelope("carol", "bob", "other");
    store.deposit(&other, 3_500).await?;
    store.ack(&bob, &[proto::MailRef::of(&message)]).await?;
    ensure!(store.deposit(&message, 4_000).await? == DepositOutcome::Stored);
    ensure!(store.deposit(&message, 4_100).await? == DepositOutcome::Duplicate);
    ensure!(store.mail_count(&bob).await? == 2);
    let fetched = store.fetch(&bob, 10, usize::MAX, 5_000).await?;
    ensure!(ids(&fetched.mail) == vec![other.id, message.id]);
    Ok(())
}

/// Regression (issue 12): mail was de-duplicated by (recipient, id), so a second sender
/// reusing another sender's id got "deposited" and the message was silently dropped. Mail
/// identity is (sender, id): both are stored, each sender's retransmission is still a
/// duplicate, and an ack names the sender too, so it takes only that sender's message.
pub async fn mail_identity_is_sender_and_id(store: &Store) -> anyhow::Result<()> {
    let bob = user("bob");
    let from_alice = envelope("alice", "bob", "alice's");
    let from_mallory = proto::Envelope {
        from: user("mallory"),
        token: b"token-mallory's".to_vec(),
        ..from_alice.clone()
    };
    ensure!(store.deposit(&from_alice, 1_000).await? == DepositOutcome::Stored);
    ensure!(store.deposit(&from_mallory, 1_100).await? == DepositOutcome::Stored);
    ensure!(store.deposit(&from_alice, 1_200).await? == DepositOutcome::Duplicate);
    ensure!(store.deposit(&from_mallory, 1_300).await? == DepositOutcome::Duplicate);
    ensure!(store.mail_count(&bob).await? == 2);
    let fetched = store.fetch(&bob, 10, usize::MAX, 2_000).await?;
    let got: Vec<_> = fetched.mail.iter().map(|m| m.envelope.clone()).collect();
    ensure!(got == vec![from_alice.clone(), from_mallory.clone()]);

    // Acking mallory's message leaves alice's, although the ids are equal.
    ensure!(
        store
            .ack(&bob, &refs_of(std::slice::from_ref(&from_mallory)))
            .await?
            == 1
    );
    let fetched = store.fetch(&bob, 10, usize::MAX, 3_000).await?;
    ensure!(fetched.mail.len() == 1 && fetched.mail[0].envelope == from_alice);
    ensure!(store.ack(&bob, &refs(&fetched.mail)).await? == 1);
    ensure!(store.mail_count(&bob).await? == 0);
    Ok(())
}

/// Issue 12: the count cap alone let one mailbox hold 10,000 × 48 KiB. A deposit that would
/// pass the byte cap is refused with a typed error while the count cap is far off; other
/// mailboxes are unaffected; acks give the bytes back, so the same message then fits.
pub async fn mailbox_byte_cap_refuses_and_acks_give_bytes_back(
    store: &Store,
) -> anyhow::Result<()> {
    let (bob, carol) = (user("bob"), user("carol"));
    // About 40 KiB each: the 1 MiB cap is reached after some 26, far below 50 messages.
    let big = |label: &str, to: &str| proto::Envelope {
        token: format!("{label}-{}", "x".repeat(40 * 1024)).into_bytes(),
        ..envelope("alice", to, label)
    };
    let mut stored = Vec::new();
    let refused = loop {
        ensure!(
            (stored.len() as u64) < LIMITS.cap,
            "the byte cap never refused a deposit"
        );
        let message = big(&stored.len().to_string(), "bob");
        match store.deposit(&message, 1_000).await {
            Ok(DepositOutcome::Stored) => stored.push(message),
            Ok(DepositOutcome::Duplicate) => anyhow::bail!("a fresh id is no duplicate"),
            Err(StoreError::MailboxBytesFull { user, max_bytes }) => {
                ensure!(user == bob && max_bytes == LIMITS.max_bytes);
                break message;
            }
            Err(other) => return Err(other.into()),
        }
    };
    let size = refused.token.len() as u64;
    ensure!(stored.len() as u64 >= LIMITS.max_bytes / (size + 200) - 1);
    ensure!((stored.len() as u64 + 1) * size > LIMITS.max_bytes - LIMITS.max_bytes / 50);
    ensure!(store.mail_count(&bob).await? == stored.len() as u64);
    // Refused again while nothing changes, and a small message still fits the slack.
    ensure!(matches!(
        store.deposit(&refused, 1_100).await,
        Err(StoreError::MailboxBytesFull { .. })
    ));
    // Another user's mailbox is unaffected.
    ensure!(store.deposit(&big("to carol", "carol"), 1_200).await? == DepositOutcome::Stored);
    ensure!(store.mail_count(&carol).await? == 1);

    // An ack gives its bytes back: the refused message fits now, and then it is full again.
    ensure!(store.ack(&bob, &refs_of(&stored[..1])).await? == 1);
    ensure!(store.deposit(&refused, 1_300).await? == DepositOutcome::Stored);
    ensure!(matches!(
        store.deposit(&big("again", "bob"), 1_400).await,
        Err(StoreError::MailboxBytesFull { .. })
    ));
    // Acking everything empties the count: as many fit again as at first.
    let fetched = store.fetch(&bob, 1_000, usize::MAX, 2_000).await?;
    ensure!(store.ack(&bob, &refs(&fetched.mail)).await? == stored.len() as u64);
    ensure!(store.mail_count(&bob).await? == 0);
    for (n, _) in stored.iter().enumerate() {
        let message = big(&format!("refill {n}"), "bob");
        ensure!(store.deposit(&message, 1_500).await? == DepositOutcome::Stored);
    }
    Ok(())
}

pub async fn binding_conflict_returns_existing_binding(store: &Store) -> anyhow::Result<()> {
    let alice = user("alice");
    let first = Binding {
        user: alice.clone(),
        keys: keys(),
        bound_at_ms: 1_000,
    };
    ensure!(store.binding(&alice).await?.is_none());
    ensure!(store.bind(&first).await? == BindOutcome::Created);
    ensure!(store.binding(&alice).await? == Some(first.clone()));

    // Binding again with the same keys finds the binding (the caller sees they match).
    ensure!(store.bind(&first).await? == BindOutcome::Existing(first.clone()));

    // Someone else's keys: refused by returning the binding that stands.
    let intruder = Binding {
        user: alice.clone(),
        keys: keys(),
        bound_at_ms: 2_000,
    };
    ensure!(store.bind(&intruder).await? == BindOutcome::Existing(first.clone()));
    ensure!(store.binding(&alice).await? == Some(first));

    // Other names are independent.
    ensure!(store.binding(&user("bob")).await?.is_none());
    Ok(())
}

pub async fn rotation_moves_the_binding_and_release_frees_the_name(
    store: &Store,
) -> anyhow::Result<()> {
    let alice = user("alice");
    let (first, second, third) = (
        proto::Identity::generate(),
        proto::Identity::generate(),
        proto::Identity::generate(),
    );
    let bound = Binding {
        user: alice.clone(),
        keys: first.public().clone(),
        bound_at_ms: 1_000,
    };
    ensure!(store.bind(&bound).await? == BindOutcome::Created);
    ensure!(store.rotations(&alice).await?.is_empty());
    let mut account = proto::ratchet::OwnAccount::generate(&first, &alice);
    store
        .publish_prekeys(&alice, &prekeys(&first, &mut account, 0))
        .await?;

    // Compare and set: the binding moves to the new keys and the statement is kept, both.
    let one = Rotation::sign(&alice, &first, &second, 2_000);
    ensure!(store.rotate(&bound, &one, 2_000).await? == RotateOutcome::Rotated);
    // The keys the old identity signed are gone with it.
    ensure!(store.claim_prekey(&alice).await?.is_none());
    let rotated = bound.rotated(&one, 2_000);
    ensure!(rotated.keys == *second.public());
    ensure!(store.binding(&alice).await? == Some(rotated.clone()));
    ensure!(store.rotations(&alice).await? == vec![one.clone()]);

    // The same rotation again (a retry) finds the binding moved, and changes nothing.
    ensure!(
        store.rotate(&bound, &one, 2_500).await? == RotateOutcome::Changed(Some(rotated.clone()))
    );
    ensure!(store.rotations(&alice).await? == vec![one.clone()]);

    // A second rotation appends; only the latest MAX_ROTATIONS are kept.
    let two = Rotation::sign(&alice, &second, &third, 3_000);
    ensure!(store.rotate(&rotated, &two, 3_000).await? == RotateOutcome::Rotated);
    ensure!(store.rotations(&alice).await? == vec![one, two.clone()]);
    let mut current = store.binding(&alice).await?.unwrap();
    let mut holder = third;
    for n in 0..store::MAX_ROTATIONS as u64 {
        let next = proto::Identity::generate();
        let rotation = Rotation::sign(&alice, &holder, &next, 4_000 + n);
        ensure!(store.rotate(&current, &rotation, 4_000 + n).await? == RotateOutcome::Rotated);
        current = store.binding(&alice).await?.unwrap();
        holder = next;
    }
    let kept = store.rotations(&alice).await?;
    ensure!(kept.len() == store::MAX_ROTATIONS);
    ensure!(!kept.contains(&two), "the oldest statements are dropped");
    ensure!(&current.keys == holder.public());

    // Release: the binding and the statements go together; the name binds anew.
    ensure!(store.release(&alice).await? == Some(current));
    ensure!(store.binding(&alice).await?.is_none());
    ensure!(store.rotations(&alice).await?.is_empty());
    ensure!(store.release(&alice).await?.is_none());
    ensure!(
        store
            .rotate(&bound, &Rotation::sign(&alice, &first, &second, 9), 9)
            .await?
            == RotateOutcome::Changed(None)
    );
    let fresh = Binding {
        user: alice.clone(),
        keys: keys(),
        bound_at_ms: 5_000,
    };
    ensure!(store.bind(&fresh).await? == BindOutcome::Created);
    ensure!(store.binding(&alice).await? == Some(fresh));
    Ok(())
}

fn presence(name: &str, session: u64, now_ms: u64, expires_at_ms: u64) -> Presence {
    Presence {
        user: user(name),
        session,
        addresses: vec![SocketAddr::from(([127, 0, 0, 1], 4000 + session as u16))],
        last_seen_ms: now_ms,
        expires_at_ms,
    }
}

/// A presence that expired without its session clearing it (its instance died) is found by
/// the range its expiry falls in, and only by it; one cleared on leaving, or written again
/// with a later expiry, is not found.
pub async fn presence_that_lapsed_without_leaving_is_found_once(
    store: &Store,
) -> anyhow::Result<()> {
    store
        .set_presence(&presence("bob", 1, 1_000, 5_000))
        .await?;
    store
        .set_presence(&presence("carol", 2, 1_000, 9_000))
        .await?;
    store
        .set_presence(&presence("alice", 3, 1_000, 5_000))
        .await?;
    store
        .set_presence(&presence("dave", 4, 1_000, 5_000))
        .await?;
    // Dave leaves normally; carol heartbeats again before she lapses.
    ensure!(store.clear_presence(&user("dave"), 4, 2_000).await?);
    store
        .set_presence(&presence("carol", 2, 8_000, 38_000))
        .await?;
    ensure!(store.lapsed(0, 4_999).await?.is_empty());
    ensure!(store.lapsed(4_000, 6_000).await? == vec![user("alice"), user("bob")]);
    ensure!(
        store.lapsed(5_000, 10_000).await?.is_empty(),
        "an end bound counted twice"
    );
    ensure!(store.lapsed(10_000, 40_000).await? == vec![user("carol")]);
    Ok(())
}

/// A session's leave takes its own entry out of the online index, sent yet or not, and
/// never the entry of a newer session of the same user.
pub async fn a_leave_takes_out_its_own_entry_and_never_a_newer_sessions(
    store: &Store,
) -> anyhow::Result<()> {
    let alice = user("alice");
    // A heartbeat and the leave right after it, sent together or not at all yet.
    store
        .set_presence(&presence("alice", 1, 1_000, 31_000))
        .await?;
    store
        .set_presence(&presence("alice", 1, 2_000, 32_000))
        .await?;
    ensure!(store.clear_presence(&alice, 1, 2_500).await?);
    ensure!(store.online_users(2_500).await?.is_empty());
    // Session 2 comes; session 3 takes the presence over; session 3 leaves; session 2
    // writes again.
    store
        .set_presence(&presence("alice", 2, 3_000, 33_000))
        .await?;
    ensure!(store.online_users(3_000).await? == vec![alice.clone()]);
    store
        .set_presence(&presence("alice", 3, 4_000, 34_000))
        .await?;
    ensure!(store.clear_presence(&alice, 3, 4_500).await?);
    store
        .set_presence(&presence("alice", 2, 5_000, 35_000))
        .await?;
    ensure!(store.online_users(5_000).await? == vec![alice.clone()]);
    ensure!(store.lapsed(0, 34_999).await?.is_empty());
    ensure!(store.lapsed(34_999, 35_000).await? == vec![alice]);
    Ok(())
}

pub async fn presence_expires_and_only_its_session_clears_it(store: &Store) -> anyhow::Result<()> {
    let alice = user("alice");
    ensure!(store.presence(&alice).await?.is_none());
    let first = presence("alice", 1, 1_000, 31_000);
    store.set_presence(&first).await?;
    ensure!(store.presence(&alice).await? == Some(first.clone()));
    ensure!(store.online_users(30_999).await? == vec![alice.clone()]);
    // Expired by the passed clock alone.
    ensure!(store.online_users(31_000).await?.is_empty());
    ensure!(
        !store
            .presence(&alice)
            .await?
            .unwrap_or(first.clone())
            .is_online(31_000)
    );

    // A heartbeat refreshes it.
    let refreshed = presence("alice", 1, 20_000, 50_000);
    store.set_presence(&refreshed).await?;
    ensure!(store.online_users(31_000).await? == vec![alice.clone()]);

    // A wrong session does not clear it.
    ensure!(!store.clear_presence(&alice, 2, 21_000).await?);
    ensure!(store.online_users(21_000).await? == vec![alice.clone()]);
    ensure!(!store.clear_presence(&user("nobody"), 1, 21_000).await?);

    // Its own session does; the last-seen time is kept.
    ensure!(store.clear_presence(&alice, 1, 21_000).await?);
    ensure!(store.online_users(21_000).await?.is_empty());
    let cleared = store.presence(&alice).await?;
    ensure!(
        cleared.as_ref().map(|p| p.last_seen_ms) == Some(20_000),
        "{cleared:?}"
    );
    ensure!(cleared.as_ref().is_some_and(|p| !p.is_online(21_000)));

    // A newer session is not taken offline by the old one closing late.
    store
        .set_presence(&presence("alice", 3, 22_000, 52_000))
        .await?;
    ensure!(!store.clear_presence(&alice, 1, 22_500).await?);
    ensure!(store.online_users(22_500).await? == vec![alice]);
    Ok(())
}

pub async fn online_users_are_sorted_by_name(store: &Store) -> anyhow::Result<()> {
    // Registered out of name order, with different expiries.
    for (n, name) in ["zoe", "alice", "mallory", "bob", "aaron"]
        .iter()
        .enumerate()
    {
        store
            .set_presence(&presence(name, n as u64, 1_000, 10_000 + n as u64 * 1_000))
            .await?;
    }
    store.set_presence(&presence("gone", 9, 0, 500)).await?;
    let online = store.online_users(1_000).await?;
    let expected: Vec<_> = ["aaron", "alice", "bob", "mallory", "zoe"]
        .iter()
        .map(|name| user(name))
        .collect();
    ensure!(online == expected, "{online:?}");
    // zoe (index 0) lapses first.
    let later = store.online_users(10_500).await?;
    ensure!(
        !later.contains(&user("zoe")) && later.len() == 4,
        "{later:?}"
    );
    Ok(())
}

pub async fn block_list_refuses_mail_until_unblocked(store: &Store) -> anyhow::Result<()> {
    let bob = user("bob");
    let alice = user("alice");
    store.block(&bob, &alice).await?;
    store.block(&bob, &user("zed")).await?;
    store.block(&bob, &user("aaron")).await?;
    store.block(&bob, &alice).await?; // twice is once
    ensure!(store.blocked_by(&bob).await? == vec![user("aaron"), alice.clone(), user("zed")]);
    ensure!(store.blocked_by(&alice).await?.is_empty());

    match store
        .deposit(&envelope("alice", "bob", "spam"), 1_000)
        .await
    {
        Err(StoreError::Blocked { recipient, sender }) => {
            ensure!(recipient == bob && sender == alice);
        }
        other => anyhow::bail!("expected Blocked, got {other:?}"),
    }
    ensure!(store.mail_count(&bob).await? == 0);
    // Others still get through, and the block is one-way.
    ensure!(
        store
            .deposit(&envelope("carol", "bob", "hi"), 1_000)
            .await?
            == DepositOutcome::Stored
    );
    ensure!(
        store
            .deposit(&envelope("bob", "alice", "hi"), 1_000)
            .await?
            == DepositOutcome::Stored
    );

    store.unblock(&bob, &alice).await?;
    store.unblock(&bob, &user("never-blocked")).await?;
    ensure!(store.blocked_by(&bob).await? == vec![user("aaron"), user("zed")]);
    ensure!(
        store
            .deposit(&envelope("alice", "bob", "sorry"), 1_000)
            .await?
            == DepositOutcome::Stored
    );
    ensure!(store.mail_count(&bob).await? == 2);
    Ok(())
}

pub async fn broadcast_reaches_two_subscribers(store: &Store) -> anyhow::Result<()> {
    let mut first = store.subscribe();
    let mut second = store.subscribe();
    let announcement = Broadcast::Announcement {
        text: "maintenance at 22:00 — ünïcode too".to_owned(),
    };
    let mail = Broadcast::MailWaiting { user: user("bob") };
    // Bob has a session here: on a cluster, a mail-waiting hint goes only to the instances
    // his route record names, and setting his presence names this one.
    store
        .set_presence(&presence("bob", 1, 1_000, 31_000))
        .await?;
    store.publish(&announcement).await?;
    store.publish(&mail).await?;
    for receiver in [&mut first, &mut second] {
        expect_events(receiver, &[announcement.clone(), mail.clone()]).await?;
    }
    Ok(())
}

/// A contact's presence change and a second-session notice reach the instance holding
/// their recipient's session, whole (the same events, in order).
pub async fn presence_events_reach_their_recipients_instance(store: &Store) -> anyhow::Result<()> {
    let mut receiver = store.subscribe();
    store
        .set_presence(&presence("bob", 1, 1_000, 31_000))
        .await?;
    let online = Broadcast::Presence {
        user: user("alice"),
        online: true,
        to: vec![user("bob")],
        answer: true,
    };
    let elsewhere = Broadcast::SessionElsewhere {
        user: user("bob"),
        session: 2,
        observed: "192.0.2.7:40000".parse()?,
        at_ms: 1_500,
    };
    let ended = Broadcast::SessionEnded {
        user: user("bob"),
        session: 3,
    };
    store.publish(&online).await?;
    store.publish(&elsewhere).await?;
    store.publish(&ended).await?;
    expect_events(&mut receiver, &[online, elsewhere, ended]).await
}

pub async fn mailboxes_drain_in_batches(store: &Store) -> anyhow::Result<()> {
    // Several full mailboxes, drained in odd-sized batches: no mail crosses mailboxes,
    // nothing is lost or repeated, `remaining` counts down exactly.
    let users = ["bob", "carol", "dave"];
    let mut sent = Vec::new();
    for name in users {
        for n in 0..LIMITS.cap {
            let message = envelope("alice", name, &n.to_string());
            store.deposit(&message, 1_000).await?;
            sent.push(message);
        }
    }
    for (index, name) in users.iter().enumerate() {
        let expected: Vec<_> = sent[index * LIMITS.cap as usize..(index + 1) * LIMITS.cap as usize]
            .iter()
            .map(|m| m.id)
            .collect();
        let mut drained = Vec::new();
        loop {
            let batch = store.fetch(&user(name), 7, usize::MAX, 2_000).await?;
            if batch.mail.is_empty() {
                break;
            }
            ensure!(batch.remaining as usize == expected.len() - drained.len() - batch.mail.len());
            let batch_ids = ids(&batch.mail);
            ensure!(store.ack(&user(name), &refs(&batch.mail)).await? == batch_ids.len() as u64);
            drained.extend(batch_ids);
        }
        ensure!(drained == expected);
    }
    Ok(())
}

/// A user's Olm account publishing `published` one-time keys already stored.
fn prekeys(
    identity: &proto::Identity,
    account: &mut proto::ratchet::OwnAccount,
    published: usize,
) -> proto::ratchet::PreKeys {
    let keys = account.prekeys_to_publish(identity, published);
    account.mark_published();
    keys
}

pub async fn prekeys_are_claimed_once_each_then_the_fallback(store: &Store) -> anyhow::Result<()> {
    use proto::ratchet::{MAX_ONE_TIME_KEYS, ONE_TIME_KEYS_TARGET, OwnAccount};
    let bob = user("bob");
    ensure!(
        store.claim_prekey(&bob).await?.is_none(),
        "nothing published yet"
    );
    let identity = proto::Identity::generate();
    let mut account = OwnAccount::generate(&identity, &bob);
    let first = prekeys(&identity, &mut account, 0);
    ensure!(first.one_time.len() == ONE_TIME_KEYS_TARGET);
    ensure!(store.publish_prekeys(&bob, &first).await? as usize == ONE_TIME_KEYS_TARGET);
    // Publishing the same keys again (a retry) adds none.
    ensure!(store.publish_prekeys(&bob, &first).await? as usize == ONE_TIME_KEYS_TARGET);
    let mut claimed = std::collections::HashSet::new();
    for _ in 0..ONE_TIME_KEYS_TARGET {
        let bundle = store.claim_prekey(&bob).await?.context("a key is left")?;
        bundle.verify(&bob, identity.public())?;
        ensure!(!bundle.fallback);
        ensure!(
            claimed.insert(bundle.prekey.key),
            "a one-time key was handed out twice"
        );
    }
    // A top-up of one-time keys alone (the fallback key already published) keeps the
    // stored fallback key.
    let top_up = proto::ratchet::PreKeys {
        one_time: Vec::new(),
        fallback: None,
        ..first.clone()
    };
    store.publish_prekeys(&bob, &top_up).await?;
    // None left: the fallback key, as often as asked.
    for _ in 0..2 {
        let bundle = store.claim_prekey(&bob).await?.context("the fallback")?;
        ensure!(bundle.fallback && Some(&bundle.prekey) == first.fallback.as_ref());
    }
    // Topped up past the cap: the oldest go.
    let second = prekeys(&identity, &mut account, 0);
    let third = prekeys(&identity, &mut account, 0);
    let fourth = prekeys(&identity, &mut account, 0);
    store.publish_prekeys(&bob, &second).await?;
    store.publish_prekeys(&bob, &third).await?;
    ensure!(store.publish_prekeys(&bob, &fourth).await? as usize == MAX_ONE_TIME_KEYS);
    let oldest = store.claim_prekey(&bob).await?.context("a key")?;
    ensure!(
        oldest.prekey == third.one_time[0],
        "the oldest kept key comes first"
    );
    // A new Olm key (a new account) drops the old account's one-time keys.
    let mut renewed = OwnAccount::generate(&identity, &bob);
    let fresh = prekeys(&identity, &mut renewed, 0);
    ensure!(store.publish_prekeys(&bob, &fresh).await? as usize == ONE_TIME_KEYS_TARGET);
    let bundle = store.claim_prekey(&bob).await?.context("a key")?;
    ensure!(bundle.olm_key == fresh.olm_key && fresh.one_time.contains(&bundle.prekey));
    // Another user's keys are their own.
    ensure!(store.claim_prekey(&user("alice")).await?.is_none());
    Ok(())
}

/// Mail an older build queued, its Olm messages as text (`o0.<base64>.<base64 signature>`),
/// beside mail sealed now (binary): both are fetched byte for byte as deposited and open in
/// order with the recipient's ratchet. (An older build's stored bytes are exactly these:
/// its text token and today's byte token encode alike; `proto`'s codec tests check it.)
pub async fn mail_queued_by_older_builds_in_text_is_fetched_and_opens(
    store: &Store,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    use proto::ratchet::{OwnAccount, PreKeyBundle, Sessions};

    let (alice, bob) = (user("alice"), user("bob"));
    let (alice_identity, bob_identity) = (proto::Identity::generate(), proto::Identity::generate());
    let alice_account = OwnAccount::generate(&alice_identity, &alice);
    let mut bob_account = OwnAccount::generate(&bob_identity, &bob);
    let published = bob_account.prekeys_to_publish(&bob_identity, 0);
    bob_account.mark_published();
    let bundle = PreKeyBundle {
        olm_key: published.olm_key.clone(),
        prekey: published.one_time[0].clone(),
        fallback: false,
    };
    let mut alice_sessions = Sessions::default();
    alice_sessions.start(&alice_account, &bob, bob_identity.public(), &bundle)?;
    let mut seal = |body: &str| {
        alice_sessions.seal(
            &alice_account,
            &bob,
            proto::MessageId::random(),
            body,
            1_000,
        )
    };
    let text = |mut envelope: proto::Envelope| -> anyhow::Result<proto::Envelope> {
        // A binary pre-key token: 0x02, the 64-byte signature, the Olm message.
        ensure!(envelope.token.first() == Some(&0x02) && envelope.token.len() > 65);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (signature, message) = envelope.token[1..].split_at(64);
        envelope.token =
            format!("o0.{}.{}", b64.encode(message), b64.encode(signature)).into_bytes();
        Ok(envelope)
    };
    let mut sent = Vec::new();
    for n in 0..3 {
        sent.push(text(seal(&format!("queued by an older build {n}"))?)?);
    }
    sent.push(seal("queued after the upgrade")?);
    for envelope in &sent {
        ensure!(store.deposit(envelope, 1_000).await? == DepositOutcome::Stored);
    }

    let fetched = store.fetch(&bob, 10, usize::MAX, 2_000).await?;
    ensure!(fetched.mail.len() == sent.len() && fetched.remaining == 0);
    let mut bodies = Vec::new();
    let mut bob_sessions = Sessions::default();
    for (stored, envelope) in fetched.mail.iter().zip(&sent) {
        ensure!(&stored.envelope == envelope, "stored mail changed");
        let opened = bob_sessions.open(
            &mut bob_account,
            &alice,
            alice_identity.public(),
            &stored.envelope,
        )?;
        bodies.push(opened.plaintext.body);
    }
    ensure!(
        bodies
            == [
                "queued by an older build 0",
                "queued by an older build 1",
                "queued by an older build 2",
                "queued after the upgrade"
            ],
        "{bodies:?}"
    );
    ensure!(store.ack(&bob, &refs(&fetched.mail)).await? == 4);
    Ok(())
}
