//! Receiving: direct connections ([`serve`]) and the mailbox ([`fetch_mail`]) share one
//! check-and-store path: [`check`] (recipient is me → sender not blocked → sender's pinned
//! keys, or else the server's → open and check the sealed header, and only then pin the
//! server's keys → not too old), then [`store`] (de-duplicated by id, together with the not-yet-shown mark), which
//! takes a whole batch in one group commit. Only once the batch is durable are its
//! envelopes acked (to the peer, or to the server for mail), and only after the ack are they
//! shown. A direct connection reads every envelope already arrived (up to
//! [`RECEIVE_BATCH`]), checks them, stores them in one commit, then writes all the answers
//! in one flush: the sender pipelines, so one `fsync` covers many messages.
//!
//! Mail sealed under a sender key that no longer matches the pinned one is not deleted: it
//! is kept sealed in the `held_by_sender` table of [`crate::state`] (then acked, so the server stops
//! offering it) and opened again by [`reopen_held`] once the user runs `trust` for the
//! sender. A direct message with a changed key is refused to the sender, who sees it.
//!
//! A direct connection starts with the Noise handshake under my exchange key; the dialer's
//! proven key must be the key of the user its hello names (pinned, or else the server's)
//! before any envelope is read ([`check_dialer`]): a connection from anyone else under that
//! name is refused, a key change is told to the user.
//!
//! Mail dated a little ahead (its sender's clock is fast) is authentic but cannot open yet.
//! It is kept sealed in the `early` table (then acked), and every fetch first opens the
//! kept mail whose time has come ([`open_early`]). The server's fetch has no cursor, so
//! mail left in the mailbox would come back at its head on every fetch: one sender's mail
//! dated ahead would hold up everyone's mail behind it until it opened.
//!
//! A peer that sends garbage, stalls, or floods only occupies its own task: every read has a
//! timeout and every refusal is answered and logged, never a panic. An envelope that does
//! not open (or is not for me) proves nothing about its claimed sender: it pins nothing, is
//! counted rather than shown, and the server is asked about that sender at most once per
//! [`crate::context::SERVER_KEYS_TTL`] ([`ServerKeys`]).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use futures::FutureExt;
use proto::{
    Connection, Envelope, ErrorCode, ErrorReply, MailRef, MessageId, OpenError, PeerMsg,
    PublicKeys, Reply, Request, Username,
    seal::{MAX_CLOCK_SKEW_SECS, Plaintext},
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{ClientError, Event, SEEN_RETENTION_MS},
    context::{Context, MailState},
    core::{Fetched, Report},
    reason::RefusalReason,
    sessions::{RatchetError, Saving},
    state::{InboundMessage, PinOutcome, ReceiptApplied, StateError, StoreOutcome},
};

/// How long an inbound connection that has delivered envelopes may stay silent before it
/// is closed (the sender keeps its link for the next message).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the hellos may take, and then how long until the first envelope: a peer that
/// says hello and nothing more holds one of the inbound slots for no longer than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many envelopes one fetch asks for.
const FETCH_BATCH: u32 = 64;
/// The most envelopes of one connection read and not yet stored and answered: reading
/// pauses beyond it.
const MAX_UNSTORED: usize = 4 * RECEIVE_BATCH;
/// The most envelopes read from a direct connection into one stored batch.
pub(crate) const RECEIVE_BATCH: usize = 1024;
/// The most token bytes in one batch, so a peer sending maximal frames cannot make one
/// batch take more than a few MiB of memory.
const RECEIVE_BATCH_BYTES: usize = 2 << 20;
/// The most envelopes held for a `trust` (beyond it, mail under a changed key is refused
/// and deleted as before): a sender with a new key cannot fill the disk.
const MAX_HELD: u64 = 10_000;
/// The most envelopes kept to open later because they are dated ahead (beyond it, such
/// mail is refused and deleted): a sender dating mail ahead cannot fill the disk.
const MAX_EARLY: u64 = 10_000;
/// How many kept early envelopes one fetch opens, at most.
const EARLY_BATCH: usize = 256;

/// What [`receive`] did with an envelope.
#[derive(Debug)]
pub(crate) enum Accepted {
    /// Stored for the first time.
    New(InboundMessage),
    /// A receipt, applied: ack it, tell what it changed.
    Receipt(ReceiptApplied),
    /// Stored before: ack again, show nothing.
    Duplicate,
}

impl Accepted {
    /// What the loop hears of it: a message to show, a receipt to tell, or nothing.
    fn into_report(self) -> Option<Report> {
        match self {
            Self::New(message) => Some(Report::Received(message)),
            Self::Receipt(applied) => Some(Report::Receipt(applied)),
            Self::Duplicate => None,
        }
    }
}

impl From<StoreOutcome> for Accepted {
    fn from(outcome: StoreOutcome) -> Self {
        match outcome {
            StoreOutcome::New(message) => Self::New(message),
            StoreOutcome::Receipt(applied) => Self::Receipt(applied),
            StoreOutcome::Duplicate => Self::Duplicate,
        }
    }
}

/// Why [`receive`] refused an envelope.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// Not addressed to me.
    #[error("the message is addressed to {0}, not to me")]
    NotForMe(Username),
    /// I block the sender.
    #[error("you are blocked by the recipient")]
    Blocked,
    /// The sender's keys changed.
    #[error("the sender's key does not match the key pinned for them; refused")]
    KeyChanged,
    /// The message does not open or check.
    #[error(transparent)]
    Bad(#[from] OpenError),
    /// Cannot decide now (server unreachable, local storage failing): try again later.
    #[error("cannot take the message now: {0}")]
    Transient(Unavailable),
}

/// Why a message cannot be taken now.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unavailable {
    /// The server cannot be asked for the sender's keys.
    #[error("the discovery server cannot be asked for the sender's keys: {0}")]
    Server(ClientError),
    /// The local state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The state write answered without an outcome.
    #[error("the state write answered without an outcome")]
    NoOutcome,
}

/// Why an inbound peer connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnded {
    /// The hellos failed.
    #[error(transparent)]
    Handshake(#[from] proto::HandshakeError),
    /// Reading failed.
    #[error(transparent)]
    Recv(#[from] proto::RecvError),
    /// Writing the answers failed.
    #[error(transparent)]
    Send(#[from] proto::SendError),
    /// The dialer reached the wrong user (a stale or reused address).
    #[error("the peer wanted {0}, not me")]
    NotForMe(Username),
    /// The dialer is blocked.
    #[error("{0} is blocked")]
    Blocked(Username),
    /// The first message was not a hello.
    #[error("the first message was not a hello")]
    NoHello,
    /// No hello within the handshake timeout.
    #[error("no peer hello in time")]
    HelloTimeout,
    /// A message other than an envelope after the hello.
    #[error("unexpected message from the peer")]
    Unexpected,
    /// The dialer's key is not the claimed user's.
    #[error("the peer claiming to be {0} does not hold their key: {1}")]
    NotTheirKey(Username, Refusal),
}

impl Refusal {
    fn to_reply(&self) -> ErrorReply {
        let code = match self {
            Self::Blocked => ErrorCode::Blocked,
            Self::Bad(OpenError::NoSession { .. }) => ErrorCode::NoSession,
            Self::NotForMe(_) | Self::KeyChanged | Self::Bad(_) => ErrorCode::Refused,
            Self::Transient(_) => ErrorCode::Unavailable,
        };
        ErrorReply::new(code, self.to_string())
    }
}

/// The keys the server has for `user` (`None`: unknown, or keys that do not verify), asked
/// at most once per [`crate::context::SERVER_KEYS_TTL`].
async fn server_keys(context: &Context, user: &Username) -> Result<Option<PublicKeys>, Refusal> {
    if let Some(keys) = context.server_keys.get(user, Instant::now()) {
        return Ok(keys);
    }
    let keys = match context.lookup(user).await {
        Ok(info) => info.keys.verify().is_ok().then_some(info.keys),
        Err(ClientError::UnknownUser(_)) => None,
        Err(error) => return Err(Refusal::Transient(Unavailable::Server(error))),
    };
    context
        .server_keys
        .insert(user, keys.clone(), Instant::now());
    Ok(keys)
}

/// Where the keys to open a sender's message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeySource {
    /// Pinned here: a message opened under them before.
    Pinned,
    /// The server's, not pinned yet: pinned once a message opens under them.
    Server,
}

/// The keys to open `user`'s messages with: pinned, or else the server's (which
/// [`check`] pins only once a message opens under them: trust on first authenticated use).
async fn sender_keys(
    context: &Context,
    user: &Username,
) -> Result<(PublicKeys, KeySource), Refusal> {
    let transient = |error: StateError| Refusal::Transient(error.into());
    if let Some(keys) = context.state.pinned(user).map_err(transient)? {
        return Ok((keys, KeySource::Pinned));
    }
    match server_keys(context, user).await? {
        Some(keys) => Ok((keys, KeySource::Server)),
        None => Err(Refusal::Bad(OpenError::BadToken { peer: user.clone() })),
    }
}

/// Checks that `key`, the exchange key a dialer proved in the handshake, is `from`'s:
/// the pinned key, or else the server's (verified). A pinned key that differs while the
/// server's matches is a key change (told to the user, refused until `trust`); any other
/// mismatch is someone else using the name, refused and counted like a forged envelope.
async fn check_dialer(context: &Context, from: &Username, key: &[u8; 32]) -> Result<(), Refusal> {
    let (keys, source) = sender_keys(context, from).await?;
    if &keys.exchange == key {
        return Ok(());
    }
    let refusal = match source {
        KeySource::Pinned => {
            match key_change_or_forgery(context, from, &keys, |offered| &offered.exchange == key)
                .await
            {
                // A signed rotation to the key the dialer proved: pinned now.
                Ok(_) => return Ok(()),
                Err(refusal) => refusal,
            }
        }
        KeySource::Server => Refusal::Bad(OpenError::BadToken { peer: from.clone() }),
    };
    if refusal.is_unauthenticated() {
        report_refusal(context, from, &refusal).await;
    }
    Err(refusal)
}

/// Checks and stores one envelope (see the module docs).
pub(crate) async fn receive(
    context: &Context,
    envelope: &Envelope,
    via_mailbox: bool,
) -> Result<Accepted, Refusal> {
    let checked = match check(context, envelope).await? {
        Checked::Open(plaintext) => plaintext,
        Checked::Seen => return Ok(Accepted::Duplicate),
    };
    store(context, vec![checked], via_mailbox)
        .await?
        .pop()
        .ok_or(Refusal::Transient(Unavailable::NoOutcome))
}

/// Stores checked messages, in order, in one group commit; resolves once durable.
pub(crate) async fn store(
    context: &Context,
    checked: Vec<Plaintext>,
    via_mailbox: bool,
) -> Result<Vec<Accepted>, Refusal> {
    if checked.is_empty() {
        return Ok(Vec::new());
    }
    let mut saving = submit_store(context, checked, via_mailbox);
    let outcomes = context
        .ratchet
        .settle(&context.state, &mut saving)
        .await
        .map_err(|error| Refusal::Transient(error.into()))?;
    Ok(outcomes.into_iter().map(Accepted::from).collect())
}

/// Submits the write storing `checked`, with the ratchet state their opening changed.
fn submit_store(
    context: &Context,
    checked: Vec<Plaintext>,
    via_mailbox: bool,
) -> Saving<Vec<StoreOutcome>> {
    context.ratchet.save_with(|save| {
        context
            .state
            .submit_incoming(checked, proto::now_ms(), via_mailbox, save)
    })
}

/// What [`check`] found an envelope to be.
#[derive(Debug)]
pub(crate) enum Checked {
    /// Opened and checked: store it.
    Open(Plaintext),
    /// A ratchet message stored before (its copy cannot be opened again: its key is used
    /// up): ack it again, show nothing.
    Seen,
}

/// Every check of one envelope short of storing it (see the module docs).
pub(crate) async fn check(context: &Context, envelope: &Envelope) -> Result<Checked, Refusal> {
    if envelope.to != context.me {
        return Err(Refusal::NotForMe(envelope.to.clone()));
    }
    let from = &envelope.from;
    let transient = |error: StateError| Refusal::Transient(error.into());
    if context.state.is_blocked(from).map_err(transient)? {
        return Err(Refusal::Blocked);
    }
    let (keys, source) = sender_keys(context, from).await?;
    let now = proto::now_ms();
    let plaintext = if proto::ratchet::is_olm_token(&envelope.token) {
        if context
            .state
            .seen_id(from, &envelope.id)
            .map_err(transient)?
        {
            return Ok(Checked::Seen);
        }
        let open = |keys: &PublicKeys| {
            context
                .ratchet
                .open(&context.state, from, keys, envelope)
                .map_err(|error| match error {
                    RatchetError::State(error) => transient(error),
                    RatchetError::Open(error) => Refusal::Bad(error),
                    RatchetError::Seal(_) => Refusal::Bad(OpenError::Malformed),
                })
        };
        match open(&keys) {
            Err(Refusal::Bad(OpenError::BadToken { .. })) if source == KeySource::Pinned => {
                // A signed rotation pins the new keys: the message must open under them.
                let explains =
                    |offered: &PublicKeys| proto::ratchet::signed_by(envelope, from, offered);
                let rotated = key_change_or_forgery(context, from, &keys, explains).await?;
                open(&rotated)?
            }
            opened => opened?,
        }
    } else {
        open_legacy(context, envelope, &keys, source, now).await?
    };
    // Opened: the message is authentic under these keys, so they may be pinned now.
    if source == KeySource::Server {
        match context
            .state
            .pin_if_absent(from, &keys)
            .await
            .map_err(transient)?
        {
            // The answer that was cached to pin them has served: a later mismatch with
            // the pin (a key rotated since) asks the server again.
            PinOutcome::New | PinOutcome::Same => context.server_keys.forget(from),
            // Pinned meanwhile, by another task, to other keys: those rule.
            PinOutcome::Changed { .. } => return Err(Refusal::KeyChanged),
        }
    }
    if plaintext.sent_at_ms.saturating_add(SEEN_RETENTION_MS) < now {
        return Err(OpenError::Expired {
            window_secs: SEEN_RETENTION_MS / 1000,
        }
        .into());
    }
    // Whether its sender is muted is decided by the write that stores it
    // (`State::submit_incoming`), in order with mute and unmute.
    Ok(Checked::Open(plaintext))
}

/// Opens a message sealed by the static channel from before the ratchet: accepted only if
/// written before this client started the ratchet (mail already on its way then), so a
/// stolen static key cannot be used to seal new messages that would be believed.
async fn open_legacy(
    context: &Context,
    envelope: &Envelope,
    keys: &PublicKeys,
    source: KeySource,
    now: u64,
) -> Result<Plaintext, Refusal> {
    let from = &envelope.from;
    let transient = |error: StateError| Refusal::Transient(error.into());
    let channel = context
        .channel(from, keys)
        .map_err(|_| Refusal::KeyChanged)?;
    let plaintext = match channel.open(envelope, now) {
        Ok(plaintext) => plaintext,
        Err(OpenError::BadToken { .. }) if source == KeySource::Pinned => {
            // A signed rotation pins the new keys: the message must open under them.
            let rotated = key_change_or_forgery(context, from, keys, |_| true).await?;
            context
                .channel(from, &rotated)
                .map_err(|_| Refusal::KeyChanged)?
                .open(envelope, now)?
        }
        Err(error) => return Err(error.into()),
    };
    if !legacy_accepted(
        plaintext.sent_at_ms,
        context.state.legacy_until_ms().map_err(transient)?,
    ) {
        return Err(OpenError::Legacy.into());
    }
    Ok(plaintext)
}

/// Whether a message sealed the old way, written at `sent_at_ms`, is still accepted by a
/// client that switched to the ratchet at `legacy_until_ms` (0: it never had the old kind).
/// Mail dated a little ahead that was kept until its time at the switch counts as before it.
fn legacy_accepted(sent_at_ms: u64, legacy_until_ms: u64) -> bool {
    let allowance = (MAX_CLOCK_SKEW_SECS + MAIL_CLOCK_WAIT_SECS) * 1000;
    legacy_until_ms != 0 && sent_at_ms < legacy_until_ms.saturating_add(allowance)
}

/// A token that does not open under the pinned keys (or a dialer proving another key) is
/// either forged or made with new keys. Asking the server tells the two apart, so a real
/// key change is reported loudly: the server's keys differ from the pinned ones and
/// `explains` what was seen. A change by rotation statements signed with the pinned key is
/// followed instead ([`Context::follow_rotation`]): the new keys are pinned and returned.
/// The server is asked at most once per [`crate::context::SERVER_KEYS_TTL`] per sender,
/// so forgeries cost no lookup each.
async fn key_change_or_forgery(
    context: &Context,
    from: &Username,
    pinned: &PublicKeys,
    explains: impl Fn(&PublicKeys) -> bool,
) -> Result<PublicKeys, Refusal> {
    match server_keys(context, from).await {
        Ok(Some(keys)) if &keys != pinned && explains(&keys) => {
            if context.follow_rotation(from, pinned, &keys).await {
                return Ok(keys);
            }
            context
                .notify(Event::KeyChanged {
                    user: from.clone(),
                    pinned: pinned.fingerprint(),
                    offered: keys.fingerprint(),
                })
                .await;
            Err(Refusal::KeyChanged)
        }
        _ => Err(Refusal::Bad(OpenError::BadToken { peer: from.clone() })),
    }
}

impl Refusal {
    /// Whether the envelope was refused before anything in it authenticated (it did not
    /// open, or its clear header is not for me): anyone can send it under any name.
    /// The reason told to the user, for the refusals told at all: blocked senders are
    /// refused silently (that is the point of blocking), and what cannot be taken now is
    /// taken later.
    fn told(&self) -> Option<RefusalReason> {
        match self {
            Self::NotForMe(to) => Some(RefusalReason::NotForMe(to.clone())),
            Self::Bad(error) => Some(RefusalReason::Unopenable(error.clone())),
            Self::KeyChanged => Some(RefusalReason::KeyChanged { held: false }),
            Self::Blocked | Self::Transient(_) => None,
        }
    }

    fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Self::NotForMe(_) | Self::Bad(OpenError::BadToken { .. })
        )
    }
}

/// Logs a refusal and tells the user, except that an unauthenticated refusal only counts
/// (logged at the 1st, 2nd, 4th... one): naming its claimed sender would let anyone make
/// the user see refusals "from" whomever they like, and a flood of them would flood the
/// log.
async fn report_refusal(context: &Context, from: &Username, refusal: &Refusal) {
    if refusal.is_unauthenticated() {
        let total = context.unauthenticated.fetch_add(1, Ordering::Relaxed) + 1;
        if total.is_power_of_two() {
            tracing::warn!(claimed_sender = %from, %refusal, total, "unauthenticated envelopes refused");
        }
        return;
    }
    tracing::warn!(%from, %refusal, "incoming message refused");
    if let Some(reason) = refusal.told() {
        context
            .notify(Event::Refused {
                from: from.clone(),
                reason,
            })
            .await;
    }
}

/// How far ahead (beyond Fernet's own minute) a mail may be dated and still be left in the
/// mailbox to open later rather than refused: a sender's clock a few minutes fast.
const MAIL_CLOCK_WAIT_SECS: u64 = 300;

/// What becomes of one mail, given its check.
#[derive(Debug)]
pub(crate) enum MailVerdict {
    /// Store it (then ack it).
    Store(Plaintext),
    /// Stored before: ack it.
    Seen,
    /// It cannot be taken now (the server or the disk is failing): leave it and the mail
    /// behind it in the mailbox, and fetch again soon.
    LeaveForLater(Refusal),
    /// Dated a little ahead (the sender's clock is fast): it opens in a while, so it is
    /// kept sealed here and acked, instead of being refused and deleted, or left in the
    /// mailbox where it would hold up the mail behind it.
    DatedAhead {
        /// How far ahead.
        ahead_secs: u64,
    },
    /// Sealed under the sender's new key: keep it sealed for `trust`, then ack it.
    Hold,
    /// Sealed in a session lost here (a restored backup, a lost state): owe its sender a
    /// request to send it again ([`proto::ReceiptKind::Resend`]), then ack it. Its id is
    /// not recorded as seen, so the message sent again is stored (once).
    AskAgain,
    /// Refused for good: ack it (delete it from the mailbox, or it comes back forever).
    Refuse(Refusal),
}

/// The mailbox's rule for one mail (see [`MailVerdict`]).
pub(crate) fn mail_verdict(checked: Result<Checked, Refusal>) -> MailVerdict {
    match checked {
        Ok(Checked::Open(message)) => MailVerdict::Store(message),
        Ok(Checked::Seen) => MailVerdict::Seen,
        Err(refusal @ Refusal::Transient(_)) => MailVerdict::LeaveForLater(refusal),
        Err(Refusal::Bad(OpenError::ClockSkew { ahead_secs }))
            if ahead_secs <= MAX_CLOCK_SKEW_SECS + MAIL_CLOCK_WAIT_SECS =>
        {
            MailVerdict::DatedAhead { ahead_secs }
        }
        Err(Refusal::KeyChanged) => MailVerdict::Hold,
        Err(Refusal::Bad(OpenError::NoSession { .. })) => MailVerdict::AskAgain,
        Err(refusal) => MailVerdict::Refuse(refusal),
    }
}

/// When mail `ahead_secs` ahead of now opens: once it is within Fernet's allowance.
fn opens_at_ms(now_ms: u64, ahead_secs: u64) -> u64 {
    now_ms.saturating_add(
        ahead_secs
            .saturating_sub(MAX_CLOCK_SKEW_SECS)
            .saturating_mul(1000),
    )
}

/// Sessions started from my published keys (by mail or on a direct connection) used some
/// of them up: the runtime tops them up, and publishes the fallback key that replaced a
/// used one.
async fn keys_used(context: &Context) {
    if context.ratchet.used_one_time_keys() > 0 {
        context.report(Report::KeysUsed).await;
    }
}

/// Opens, stores and shows the kept early mail whose time has come (see the module docs).
pub(crate) async fn open_early(context: &Context) {
    let due = match context.state.early_due(proto::now_ms(), EARLY_BATCH) {
        Ok(due) => due,
        Err(error) => return tracing::error!(%error, "cannot read the mail kept until its time"),
    };
    for (opens_at_ms, envelope) in due {
        let done = match receive(context, &envelope, true).await {
            Ok(accepted) => {
                if let Some(report) = accepted.into_report() {
                    context.report(report).await;
                }
                true
            }
            // Still a moment early (the time is kept to the second), or not possible now.
            Err(Refusal::Bad(OpenError::ClockSkew { .. }) | Refusal::Transient(_)) => false,
            Err(Refusal::KeyChanged) => match context.state.hold(&envelope, MAX_HELD).await {
                Ok(held) => {
                    let reason = RefusalReason::KeyChanged { held };
                    context
                        .notify(Event::Refused {
                            from: envelope.from.clone(),
                            reason,
                        })
                        .await;
                    true
                }
                Err(_) => false,
            },
            Err(refusal) => {
                report_refusal(context, &envelope.from, &refusal).await;
                true
            }
        };
        if done && let Err(error) = context.state.forget_early(opens_at_ms, &envelope).await {
            tracing::error!(%error, "cannot forget mail kept until its time");
        }
    }
}

/// Opens the kept early mail that is due, then fetches and acks all waiting mail, and
/// shows it. While early mail is kept, the answer is [`Fetched::LeftForLater`], so the
/// runtime fetches again soon and shows it once its time comes.
pub(crate) async fn fetch_mail(context: &Context) -> Fetched {
    open_early(context).await;
    let fetched = fetch_mailbox(context).await;
    keys_used(context).await;
    if context.state.has_early().unwrap_or(true) {
        Fetched::LeftForLater
    } else {
        fetched
    }
}

/// Fetches and acks all waiting mail, then shows it.
async fn fetch_mailbox(context: &Context) -> Fetched {
    loop {
        let (envelopes, remaining) = match context
            .control
            .request(Request::Fetch { max: FETCH_BATCH })
            .await
        {
            Ok(Reply::Mail {
                envelopes,
                remaining,
            }) => (envelopes, remaining),
            Ok(_) => {
                tracing::warn!("unexpected reply to fetch");
                return Fetched::Done;
            }
            Err(error) => {
                tracing::info!(%error, "mail fetch failed; will retry");
                // Whether mail waits is unknown: direct envelopes are not held up for it.
                context.mail_fetched(MailState::Drained);
                return Fetched::Done;
            }
        };
        if envelopes.is_empty() {
            context.mail_fetched(MailState::Drained);
            return Fetched::Done;
        }
        context.mail_fetched(MailState::Draining);
        let mut ack: Vec<MailRef> = Vec::new();
        let mut checked: Vec<(MailRef, Plaintext)> = Vec::new();
        // Mail sealed in sessions lost here: acked once the requests to send it again are
        // owed durably.
        let mut ask_again: Vec<(MailRef, (Username, MessageId))> = Vec::new();
        let mut stop = false;
        // Set when a message could not be taken now.
        let mut left_for_later = false;
        for envelope in &envelopes {
            match mail_verdict(check(context, envelope).await) {
                MailVerdict::Store(message) => checked.push((MailRef::of(envelope), message)),
                MailVerdict::Seen => ack.push(MailRef::of(envelope)),
                MailVerdict::LeaveForLater(reason) => {
                    tracing::info!(%reason, "mail left in the mailbox for later");
                    (stop, left_for_later) = (true, true);
                    break;
                }
                MailVerdict::DatedAhead { ahead_secs } => {
                    let opens_at = opens_at_ms(proto::now_ms(), ahead_secs);
                    match context
                        .state
                        .keep_early(envelope, opens_at, MAX_EARLY)
                        .await
                    {
                        Ok(true) => {
                            tracing::info!(ahead_secs, from = %envelope.from, "mail dated ahead kept until it opens");
                            ack.push(MailRef::of(envelope));
                        }
                        Ok(false) => {
                            let refusal = Refusal::Bad(OpenError::ClockSkew { ahead_secs });
                            report_refusal(context, &envelope.from, &refusal).await;
                            ack.push(MailRef::of(envelope));
                        }
                        Err(error) => {
                            tracing::info!(%error, "mail left in the mailbox for later");
                            (stop, left_for_later) = (true, true);
                            break;
                        }
                    }
                }
                MailVerdict::Hold => match context.state.hold(envelope, MAX_HELD).await {
                    Ok(true) => {
                        context
                            .notify(Event::Refused {
                                from: envelope.from.clone(),
                                reason: RefusalReason::KeyChanged { held: true },
                            })
                            .await;
                        ack.push(MailRef::of(envelope));
                    }
                    Ok(false) => {
                        report_refusal(context, &envelope.from, &Refusal::KeyChanged).await;
                        ack.push(MailRef::of(envelope));
                    }
                    Err(error) => {
                        tracing::info!(%error, "mail left in the mailbox for later");
                        (stop, left_for_later) = (true, true);
                        break;
                    }
                },
                // A request goes only to keys pinned here (a restored backup carries the
                // pins): without them, the user is told whose message did not open.
                MailVerdict::AskAgain
                    if !matches!(context.state.pinned(&envelope.from), Ok(Some(_))) =>
                {
                    let refusal = Refusal::Bad(OpenError::NoSession {
                        peer: envelope.from.clone(),
                    });
                    report_refusal(context, &envelope.from, &refusal).await;
                    ack.push(MailRef::of(envelope));
                }
                MailVerdict::AskAgain => {
                    tracing::info!(from = %envelope.from, id = %envelope.id, "mail sealed in a session lost here; asking for it again");
                    ask_again.push((MailRef::of(envelope), (envelope.from.clone(), envelope.id)));
                }
                MailVerdict::Refuse(refusal) => {
                    report_refusal(context, &envelope.from, &refusal).await;
                    ack.push(MailRef::of(envelope));
                }
            }
        }
        let mut asked: Vec<(Username, usize)> = Vec::new();
        if !ask_again.is_empty() {
            let (refs, owed): (Vec<MailRef>, Vec<_>) = ask_again.into_iter().unzip();
            match context
                .state
                .submit_resends_owed(owed, proto::now_ms())
                .await
            {
                Ok(added) => {
                    ack.extend(refs);
                    asked = added;
                }
                Err(error) => {
                    tracing::info!(%error, "mail left in the mailbox for later");
                    (stop, left_for_later) = (true, true);
                }
            }
        }
        // The whole fetch is stored in one commit before any of it is acked.
        let (refs, checked): (Vec<MailRef>, Vec<Plaintext>) = checked.into_iter().unzip();
        let mut new: Vec<Report> = Vec::new();
        match store(context, checked, true).await {
            Ok(accepted) => {
                ack.extend(refs);
                new.extend(accepted.into_iter().filter_map(Accepted::into_report));
            }
            Err(refusal) => {
                tracing::info!(%refusal, "mail left in the mailbox for later");
                (stop, left_for_later) = (true, true);
            }
        }
        if !ack.is_empty()
            && let Err(error) = context
                .control
                .request(Request::AckMail { mail: ack })
                .await
        {
            // Stored already; the server sends them again and they are de-duplicated.
            tracing::info!(%error, "mail ack failed");
            stop = true;
        }
        for report in new {
            context.report(report).await;
        }
        for (from, messages) in asked {
            context.notify(Event::ResendAsked { from, messages }).await;
        }
        if !stop && remaining == 0 {
            context.mail_fetched(MailState::Drained);
        }
        if stop || remaining == 0 {
            return if left_for_later {
                Fetched::LeftForLater
            } else {
                Fetched::Done
            };
        }
    }
}

/// Opens again the mail held from `from` (after `trust`): what opens now is stored and
/// shown, what is refused for good is dropped, and what still cannot be opened (the key
/// changed again, or the server or disk is unavailable) stays held.
pub(crate) async fn reopen_held(context: &Context, from: &Username) {
    let mut held = match context.state.held_from(from) {
        Ok(held) => held,
        Err(error) => return tracing::error!(%error, "cannot read held mail"),
    };
    // Shown in the order they were written: the time is inside the seal, so peek at it
    // with the newly trusted keys (what does not open goes last and is dealt with below).
    let channel = match context.state.pinned(from) {
        Ok(Some(keys)) => context.channel(from, &keys).ok(),
        _ => None,
    };
    let now = proto::now_ms();
    // Ratchet messages cannot be peeked at (opening uses their key up): they go in the
    // order of their sending chain, after the older kind.
    held.sort_by_cached_key(|envelope| match proto::ratchet::chain_position(envelope) {
        Some(position) => (1, position),
        None => (
            0,
            channel
                .as_ref()
                .and_then(|channel| channel.open(envelope, now).ok())
                .map_or(u64::MAX, |plaintext| plaintext.sent_at_ms),
        ),
    });
    for envelope in held {
        let done = match receive(context, &envelope, true).await {
            Ok(accepted) => {
                if let Some(report) = accepted.into_report() {
                    context.report(report).await;
                }
                true
            }
            Err(Refusal::KeyChanged | Refusal::Transient(_)) => false,
            Err(refusal) => {
                report_refusal(context, from, &refusal).await;
                true
            }
        };
        if done && let Err(error) = context.state.unhold(&envelope).await {
            tracing::error!(%error, "cannot forget held mail");
        }
    }
}

/// Serves one inbound peer connection until it closes, idles out, misbehaves, or the
/// runtime stops.
pub(crate) async fn serve(
    stream: TcpStream,
    addr: SocketAddr,
    context: Arc<Context>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let mut connection = Connection::new(stream);
    tokio::select! {
        biased;
        () = shutdown.cancelled() => {}
        result = serve_connection(&mut connection, &context) => {
            if let Err(reason) = result {
                tracing::info!(%addr, %reason, "peer connection closed");
            }
        }
    }
    connection.close().await;
}

async fn serve_connection(
    connection: &mut Connection<TcpStream>,
    context: &Context,
) -> Result<(), ConnectionEnded> {
    let secured = connection
        .accept_handshake(&context.identity, HANDSHAKE_TIMEOUT)
        .await?;
    let from = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.recv::<PeerMsg>()).await {
        Ok(Ok(Some(PeerMsg::Hello { from, to }))) => {
            if to != context.me {
                // Not a refusal by the recipient: the dialer reached the wrong user (a stale
                // or reused address). `unknown_user` tells it to try elsewhere: the mailbox.
                let refusal = Refusal::NotForMe(to.clone());
                let _ = connection
                    .send(&PeerMsg::Reject {
                        id: None,
                        error: ErrorReply::new(ErrorCode::UnknownUser, refusal.to_string()),
                    })
                    .await;
                return Err(ConnectionEnded::NotForMe(to));
            }
            if context.state.is_blocked(&from).unwrap_or(false) {
                let _ = connection
                    .send(&PeerMsg::Reject {
                        id: None,
                        error: Refusal::Blocked.to_reply(),
                    })
                    .await;
                return Err(ConnectionEnded::Blocked(from));
            }
            // The dialer proved it holds the exchange key in `secured`: it must be the key
            // of the user it claims to be, before any envelope moves.
            if let Err(refusal) = check_dialer(context, &from, &secured.remote_static).await {
                let _ = connection
                    .send(&PeerMsg::Reject {
                        id: None,
                        error: refusal.to_reply(),
                    })
                    .await;
                return Err(ConnectionEnded::NotTheirKey(from, refusal));
            }
            from
        }
        Ok(Ok(Some(_))) => return Err(ConnectionEnded::NoHello),
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => return Err(error.into()),
        Err(_) => return Err(ConnectionEnded::HelloTimeout),
    };
    // Batches checked and submitted for storing, oldest first. The connection goes on
    // reading while they commit, so the next batch is everything that arrived meanwhile
    // (not just one socket buffer's worth), and many batches share a group commit.
    let mut pending: VecDeque<Batch> = VecDeque::new();
    let mut pending_envelopes = 0;
    let mut ended: Option<Result<(), ConnectionEnded>> = None;
    // Set once writing the answers failed: nothing more is written.
    let mut write_failed = false;
    let mut idle_timeout = HANDSHAKE_TIMEOUT;
    loop {
        if ended.is_some() && pending.is_empty() {
            return ended.unwrap_or(Ok(()));
        }
        let reading = ended.is_none() && pending_envelopes < MAX_UNSTORED;
        tokio::select! {
            biased;
            stored = next_stored(context, &mut pending), if !pending.is_empty() => {
                let (answers, new) = stored;
                pending_envelopes -= answers.len();
                // Stored is stored: handed over to be shown before the ack is written, so
                // the sender hears *delivered* only once the message is on its way to the
                // screen, and shown even if the ack cannot be written (the sender's retry
                // is then a duplicate, which is not shown).
                for report in new {
                    context.report(report).await;
                }
                // Once a write failed the connection is done, but the batches still
                // committing are stored all the same: each is still handed over to be shown
                // (the sender's retry of it is a duplicate, which is not shown).
                if !write_failed {
                    let written = async {
                        for answer in &answers {
                            connection.feed(answer).await?;
                        }
                        connection.flush().await
                    }
                    .await;
                    if let Err(error) = written {
                        write_failed = true;
                        ended = Some(Err(error.into()));
                    }
                }
                keys_used(context).await;
            }
            first = tokio::time::timeout(idle_timeout, connection.recv::<PeerMsg>()), if reading => {
                let first = match first {
                    Ok(Ok(Some(PeerMsg::Envelope(envelope)))) => {
                        idle_timeout = IDLE_TIMEOUT;
                        envelope
                    }
                    Ok(Ok(Some(_))) => {
                        ended = Some(Err(ConnectionEnded::Unexpected));
                        continue;
                    }
                    // An idle timeout with batches still committing is not idle.
                    Err(_) if !pending.is_empty() => continue,
                    Ok(Ok(None)) | Err(_) => {
                        ended = Some(Ok(()));
                        continue;
                    }
                    Ok(Err(error)) => {
                        ended = Some(Err(error.into()));
                        continue;
                    }
                };
                // Everything that has arrived already joins the batch (`recv` is
                // cancel-safe, so polling it once loses nothing).
                let mut batch_bytes = first.token.len();
                let mut batch = vec![first];
                while batch.len() < RECEIVE_BATCH && batch_bytes < RECEIVE_BATCH_BYTES {
                    match connection.recv::<PeerMsg>().now_or_never() {
                        None => break,
                        Some(Ok(Some(PeerMsg::Envelope(envelope)))) => {
                            batch_bytes += envelope.token.len();
                            batch.push(envelope);
                        }
                        Some(Ok(Some(_))) => ended = Some(Err(ConnectionEnded::Unexpected)),
                        Some(Ok(None)) => ended = Some(Ok(())),
                        Some(Err(error)) => ended = Some(Err(error.into())),
                    }
                    if ended.is_some() {
                        break;
                    }
                }
                pending_envelopes += batch.len();
                pending.push_back(check_batch(context, &from, batch).await);
            }
        }
    }
}

/// A batch of envelopes checked and submitted for storing: one answer per envelope, those
/// still waiting for the commit marked by their place.
struct Batch {
    answers: Vec<Option<PeerMsg>>,
    /// For each checked envelope, its place in `answers` and its id.
    places: Vec<(usize, MessageId)>,
    /// The commit storing the checked envelopes (`None`: nothing to store).
    stored: Option<Saving<Vec<StoreOutcome>>>,
    /// The sender, for the log if the commit fails.
    from: Username,
}

/// Waits for the oldest batch's commit; returns its answers, in order, and the new messages.
async fn next_stored(
    context: &Context,
    pending: &mut VecDeque<Batch>,
) -> (Vec<PeerMsg>, Vec<Report>) {
    let Some(batch) = pending.front_mut() else {
        return std::future::pending().await;
    };
    let result = match batch.stored.as_mut() {
        Some(saving) => context
            .ratchet
            .settle(&context.state, saving)
            .await
            .map(Some),
        None => Ok(None),
    };
    let Some(Batch {
        mut answers,
        places,
        from,
        ..
    }) = pending.pop_front()
    else {
        return (Vec::new(), Vec::new());
    };
    let mut new = Vec::new();
    match result {
        Ok(outcomes) => {
            for ((index, id), outcome) in places.into_iter().zip(outcomes.unwrap_or_default()) {
                new.extend(Accepted::from(outcome).into_report());
                answers[index] = Some(PeerMsg::Ack { id });
            }
        }
        Err(error) => {
            let refusal = Refusal::Transient(error.into());
            tracing::warn!(%from, %refusal, "incoming messages refused");
            let error = refusal.to_reply();
            for (index, id) in places {
                answers[index] = Some(PeerMsg::Reject {
                    id: Some(id),
                    error: error.clone(),
                });
            }
        }
    }
    (answers.into_iter().flatten().collect(), new)
}

/// Checks a batch of envelopes from `from` (the user who connected) and submits what passes
/// for storing, in one commit.
async fn check_batch(context: &Context, from: &Username, batch: Vec<Envelope>) -> Batch {
    let mut answers: Vec<Option<PeerMsg>> = Vec::with_capacity(batch.len());
    let mut places = Vec::new();
    let mut checked = Vec::new();
    let drained = context.mail_state().await == MailState::Drained;
    for envelope in &batch {
        let id = envelope.id;
        if !drained {
            answers.push(Some(PeerMsg::Reject {
                id: Some(id),
                error: ErrorReply::new(
                    ErrorCode::Unavailable,
                    "still fetching the mail that waited for me; leave it in my mailbox",
                ),
            }));
            continue;
        }
        if &envelope.from != from {
            answers.push(Some(PeerMsg::Reject {
                id: Some(id),
                error: ErrorReply::new(
                    ErrorCode::BadRequest,
                    "the envelope's sender is not the user who connected",
                ),
            }));
            continue;
        }
        match check(context, envelope).await {
            Ok(Checked::Open(message)) => {
                places.push((answers.len(), id));
                checked.push(message);
                answers.push(None);
            }
            Ok(Checked::Seen) => answers.push(Some(PeerMsg::Ack { id })),
            Err(refusal) => {
                report_refusal(context, from, &refusal).await;
                answers.push(Some(PeerMsg::Reject {
                    id: Some(id),
                    error: refusal.to_reply(),
                }));
            }
        }
    }
    let stored = (!checked.is_empty()).then(|| submit_store(context, checked, false));
    Batch {
        answers,
        places,
        stored,
        from: from.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[test]
    fn mail_is_stored_held_left_or_refused_by_its_check() {
        let plaintext = Plaintext {
            id: MessageId::random(),
            from: name("bob"),
            to: name("alice"),
            sent_at_ms: 1,
            body: "hi".into(),
            receipt: None,
        };
        assert!(matches!(
            mail_verdict(Ok(Checked::Open(plaintext))),
            MailVerdict::Store(_)
        ));
        assert!(matches!(mail_verdict(Ok(Checked::Seen)), MailVerdict::Seen));
        assert!(matches!(
            mail_verdict(Err(Refusal::Transient(Unavailable::NoOutcome))),
            MailVerdict::LeaveForLater(_)
        ));
        assert!(matches!(
            mail_verdict(Err(Refusal::KeyChanged)),
            MailVerdict::Hold
        ));
        // A few minutes fast is kept until it opens; far ahead is refused for good.
        let ahead =
            |ahead_secs| mail_verdict(Err(Refusal::Bad(OpenError::ClockSkew { ahead_secs })));
        assert!(matches!(
            ahead(MAX_CLOCK_SKEW_SECS + MAIL_CLOCK_WAIT_SECS),
            MailVerdict::DatedAhead { .. }
        ));
        assert!(matches!(
            ahead(MAX_CLOCK_SKEW_SECS + MAIL_CLOCK_WAIT_SECS + 1),
            MailVerdict::Refuse(_)
        ));
        assert!(matches!(
            mail_verdict(Err(Refusal::Bad(OpenError::Replayed(MessageId::random())))),
            MailVerdict::Refuse(_)
        ));
        assert!(matches!(
            mail_verdict(Err(Refusal::Blocked)),
            MailVerdict::Refuse(_)
        ));
    }

    #[test]
    fn mail_sealed_the_old_way_is_taken_only_from_before_the_switch() {
        let switch = 1_000_000;
        assert!(legacy_accepted(switch - 1, switch));
        // Kept until its time when the switch came: at most the wait allowed then.
        let allowance = (MAX_CLOCK_SKEW_SECS + MAIL_CLOCK_WAIT_SECS) * 1000;
        assert!(legacy_accepted(switch + allowance - 1, switch));
        assert!(!legacy_accepted(switch + allowance, switch));
        // A user who never had the old kind takes none.
        assert!(!legacy_accepted(1, 0));
    }

    #[test]
    fn a_blocked_sender_hears_blocked_and_a_transient_failure_asks_for_a_retry() {
        assert_eq!(Refusal::Blocked.to_reply().code, ErrorCode::Blocked);
        assert_eq!(
            Refusal::Transient(Unavailable::NoOutcome).to_reply().code,
            ErrorCode::Unavailable
        );
        assert_eq!(Refusal::KeyChanged.to_reply().code, ErrorCode::Refused);
        // Blocked senders are refused silently; what cannot be taken now is not told.
        assert_eq!(Refusal::Blocked.told(), None);
        assert_eq!(Refusal::Transient(Unavailable::NoOutcome).told(), None);
        assert_eq!(
            Refusal::KeyChanged.told(),
            Some(RefusalReason::KeyChanged { held: false })
        );
    }

    #[test]
    fn only_refusals_before_authentication_are_unauthenticated() {
        let forged = Refusal::Bad(OpenError::BadToken { peer: name("bob") });
        assert!(forged.is_unauthenticated());
        assert!(Refusal::NotForMe(name("carol")).is_unauthenticated());
        assert!(!Refusal::KeyChanged.is_unauthenticated());
        assert!(!Refusal::Bad(OpenError::Replayed(MessageId::random())).is_unauthenticated());
        assert!(!Refusal::Blocked.is_unauthenticated());
    }
}
