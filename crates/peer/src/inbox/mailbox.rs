//! The mailbox: [`fetch_mail`] fetches and acks the mail waiting at the server, each by
//! the rule [`mail_verdict`], and keeps sealed here what cannot open yet: mail dated a
//! little ahead (the `early` table, opened by [`open_early`] at every fetch once its time
//! comes) and mail under a sender's changed key (the `held_by_sender` table, opened again
//! by [`reopen_held`] after `trust`). A mail is acked only once what it became is durable.

use proto::{
    MailRef, MessageId, OpenError, Reply, Request, Username,
    seal::{MAX_CLOCK_SKEW_SECS, Plaintext},
};

use super::{
    Accepted, Checked, MAIL_CLOCK_WAIT_SECS, Refusal, check::check, keys_used, receive,
    report_refusal, store,
};
use crate::{
    api::Event,
    context::{Context, MailState},
    core::{Fetched, Report},
    reason::RefusalReason,
};

/// How many envelopes one fetch asks for.
const FETCH_BATCH: u32 = 64;
/// The most envelopes held for a `trust` (beyond it, mail under a changed key is refused
/// and deleted as before): a sender with a new key cannot fill the disk.
const MAX_HELD: u64 = 10_000;
/// The most envelopes kept to open later because they are dated ahead (beyond it, such
/// mail is refused and deleted): a sender dating mail ahead cannot fill the disk.
const MAX_EARLY: u64 = 10_000;
/// How many kept early envelopes one fetch opens, at most.
const EARLY_BATCH: usize = 256;

/// What becomes of one mail, given its check.
#[derive(Debug)]
pub(super) enum MailVerdict {
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
    /// Sealed in a session lost here (a restored backup, a lost state) by a sender whose
    /// keys are pinned here (a restored backup carries the pins): owe them a request to
    /// send it again ([`proto::ReceiptKind::Resend`]), then ack it. Its id is not recorded
    /// as seen, so the message sent again is stored (once). From a sender not pinned, it
    /// is refused: a request goes only to keys this client has trusted, and the user is
    /// told whose message did not open.
    AskAgain,
    /// Refused for good: ack it (delete it from the mailbox, or it comes back forever).
    Refuse(Refusal),
}

/// The mailbox's rule for one mail (see [`MailVerdict`]); `sender_pinned` says whether its
/// sender's keys are pinned here, and is asked only of mail sealed in a lost session.
pub(super) fn mail_verdict(
    checked: Result<Checked, Refusal>,
    sender_pinned: impl Fn() -> bool,
) -> MailVerdict {
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
        Err(Refusal::Bad(OpenError::NoSession { .. })) if sender_pinned() => MailVerdict::AskAgain,
        Err(refusal) => MailVerdict::Refuse(refusal),
    }
}

/// What becomes of held mail opened again after `trust`, given what opening it gave.
#[derive(Debug)]
pub(super) enum HeldVerdict {
    /// Opened and stored (or stored before): show it, forget the held copy.
    Opened(Accepted),
    /// Still not possible (the key changed again, or the server or the disk is failing):
    /// keep it held.
    Keep,
    /// Sealed in a session lost here since it was held, by a sender whose keys are pinned:
    /// owe them a request to send it again, then forget the held copy (as
    /// [`MailVerdict::AskAgain`]).
    AskAgain,
    /// Refused for good: tell the user, forget the held copy.
    Refuse(Refusal),
}

/// The rule for held mail opened again (see [`HeldVerdict`]); `sender_pinned` as in
/// [`mail_verdict`].
pub(super) fn held_verdict(
    opened: Result<Accepted, Refusal>,
    sender_pinned: impl Fn() -> bool,
) -> HeldVerdict {
    match opened {
        Ok(accepted) => HeldVerdict::Opened(accepted),
        Err(Refusal::KeyChanged | Refusal::Transient(_)) => HeldVerdict::Keep,
        Err(Refusal::Bad(OpenError::NoSession { .. })) if sender_pinned() => HeldVerdict::AskAgain,
        Err(refusal) => HeldVerdict::Refuse(refusal),
    }
}

/// Tells the user of the requests to send again that were added, per sender.
async fn tell_asked(context: &Context, asked: Vec<(Username, usize)>) {
    for (from, messages) in asked {
        context.notify(Event::ResendAsked { from, messages }).await;
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

/// Opens, stores and shows the kept early mail whose time has come (see the module docs).
async fn open_early(context: &Context) {
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
            let sender_pinned = || matches!(context.state.pinned(&envelope.from), Ok(Some(_)));
            match mail_verdict(check(context, envelope).await, sender_pinned) {
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
        tell_asked(context, asked).await;
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

/// Opens again the mail held from `from` (after `trust`), each by the rule
/// [`held_verdict`]: what opens now is stored and shown; what was sealed in a session lost
/// here since (a restored backup) is asked for again, like such mail in the mailbox; what
/// is refused for good is dropped; and what still cannot be opened (the key changed again,
/// or the server or disk is unavailable) stays held.
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
    let sender_pinned = || matches!(context.state.pinned(from), Ok(Some(_)));
    for envelope in held {
        let done = match held_verdict(receive(context, &envelope, true).await, sender_pinned) {
            HeldVerdict::Opened(accepted) => {
                if let Some(report) = accepted.into_report() {
                    context.report(report).await;
                }
                true
            }
            HeldVerdict::Keep => false,
            HeldVerdict::AskAgain => {
                tracing::info!(%from, id = %envelope.id, "held mail sealed in a session lost here; asking for it again");
                let owed = vec![(from.clone(), envelope.id)];
                match context
                    .state
                    .submit_resends_owed(owed, proto::now_ms())
                    .await
                {
                    Ok(asked) => {
                        tell_asked(context, asked).await;
                        true
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot owe a request to send held mail again; it stays held");
                        false
                    }
                }
            }
            HeldVerdict::Refuse(refusal) => {
                report_refusal(context, from, &refusal).await;
                true
            }
        };
        if done && let Err(error) = context.state.unhold(&envelope).await {
            tracing::error!(%error, "cannot forget held mail");
        }
    }
}
