//! Receiving: direct connections ([`serve`], in `direct`) and the mailbox ([`fetch_mail`],
//! in `mailbox`) share one check-and-store path: `check::check` (recipient is me → sender
//! not blocked → sender's pinned keys, or else the server's → open and check the sealed
//! header, and only then pin the server's keys → not too old), then [`store`] (de-duplicated
//! by id, together with the not-yet-shown mark), which takes a whole batch in one group
//! commit. Only once the batch is durable are its envelopes acked (to the peer, or to the
//! server for mail), and only after the ack are they shown.
//!
//! The module's parts:
//! - this file: what the parts share: the verdicts ([`Checked`], [`Accepted`], [`Refusal`])
//!   and the store half of the path ([`receive`], [`store`]), with [`report_refusal`].
//! - `check`: whether to believe an envelope or a dialer: the sender's keys (pinned, or
//!   the server's, asked at most once per [`crate::context::SERVER_KEYS_TTL`]), opening,
//!   and telling a key change from a forgery (or following a signed rotation).
//! - `direct`: serving one inbound peer connection: the Noise handshake, the dialer's key
//!   (`check::check_dialer`: the key of the user its hello names, pinned or the server's,
//!   before any envelope is read; anyone else under that name is refused, a key change is
//!   told to the user), then batches of envelopes, one commit and one flush of answers each
//!   (the sender pipelines, so one `fsync` covers many messages). A direct message under a
//!   changed key is refused to the sender, who sees it.
//! - `mailbox`: fetching and acking mail, by the pure rule `mailbox::mail_verdict`; mail
//!   sealed under a sender's changed key is kept sealed in the `held_by_sender` table of
//!   [`crate::state`] (then acked, so the server stops offering it) and opened again by
//!   [`reopen_held`] once the user runs `trust` for the sender (by `mailbox::held_verdict`:
//!   held mail sealed in a session lost here since is asked for again); mail dated a little ahead
//!   (its sender's clock is fast) is authentic but cannot open yet, so it is kept sealed in
//!   the `early` table (then acked), and every fetch first opens the kept mail whose time
//!   has come. The server's fetch has no cursor, so mail left in the mailbox would come
//!   back at its head on every fetch: one sender's mail dated ahead would hold up
//!   everyone's mail behind it until it opened.
//! - `tests`: the pure rules' unit tests.
//!
//! A peer that sends garbage, stalls, or floods only occupies its own task: every read has a
//! timeout and every refusal is answered and logged, never a panic. An envelope that does
//! not open (or is not for me) proves nothing about its claimed sender: it pins nothing, is
//! counted rather than shown, and the server is asked about that sender at most once per
//! [`crate::context::SERVER_KEYS_TTL`].

mod check;
mod direct;
mod mailbox;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;

use proto::{Envelope, ErrorCode, ErrorReply, OpenError, Username, seal::Plaintext};

use self::check::check;
pub(crate) use self::{
    direct::serve,
    mailbox::{fetch_mail, reopen_held},
};
use crate::{
    api::{ClientError, Event},
    context::Context,
    core::Report,
    reason::RefusalReason,
    sessions::Saving,
    state::{InboundMessage, ReceiptApplied, StateError, StoreOutcome},
};

/// How far ahead (beyond Fernet's own minute) a mail may be dated and still be left in the
/// mailbox to open later rather than refused: a sender's clock a few minutes fast.
const MAIL_CLOCK_WAIT_SECS: u64 = 300;

/// What [`receive`] did with an envelope.
#[derive(Debug)]
enum Accepted {
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
enum Refusal {
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
enum Unavailable {
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

/// What [`check`] found an envelope to be.
#[derive(Debug)]
enum Checked {
    /// Opened and checked: store it.
    Open(Plaintext),
    /// A ratchet message stored before (its copy cannot be opened again: its key is used
    /// up): ack it again, show nothing.
    Seen,
}

impl Refusal {
    /// The answer to the sender, whose code tells its route what follows: `unavailable`
    /// (not now: it goes to my mailbox), `no_session` (sealed again in a new session), or
    /// final (`blocked`, `refused`).
    fn to_reply(&self) -> ErrorReply {
        let code = match self {
            Self::Blocked => ErrorCode::Blocked,
            Self::Bad(OpenError::NoSession { .. }) => ErrorCode::NoSession,
            Self::NotForMe(_) | Self::KeyChanged | Self::Bad(_) => ErrorCode::Refused,
            Self::Transient(_) => ErrorCode::Unavailable,
        };
        ErrorReply::new(code, self.to_string())
    }

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

    /// Whether the envelope was refused before anything in it authenticated (it did not
    /// open, or its clear header is not for me): anyone can send it under any name.
    fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Self::NotForMe(_) | Self::Bad(OpenError::BadToken { .. })
        )
    }
}

/// Checks and stores one envelope (see the module docs).
async fn receive(
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
async fn store(
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

/// Sessions started from my published keys (by mail or on a direct connection) used some
/// of them up: the runtime tops them up, and publishes the fallback key that replaced a
/// used one.
async fn keys_used(context: &Context) {
    if context.ratchet.used_one_time_keys() > 0 {
        context.report(Report::KeysUsed).await;
    }
}
