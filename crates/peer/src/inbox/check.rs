//! Whether to believe an envelope ([`check`]) or a dialer ([`check_dialer`]): the keys to
//! open a sender's messages with are the pinned ones, or else the server's (asked at most
//! once per [`crate::context::SERVER_KEYS_TTL`]), which are pinned only once a message
//! opens under them. A token that does not open under the pinned keys is told apart from a
//! key change by asking the server ([`key_change_or_forgery`]); a change the pinned key
//! signed is followed at once.

use std::time::Instant;

use proto::{
    Envelope, OpenError, PublicKeys, Username,
    seal::{MAX_CLOCK_SKEW_SECS, Plaintext},
};

use super::{Checked, MAIL_CLOCK_WAIT_SECS, Refusal, Unavailable, report_refusal};
use crate::{
    api::{ClientError, Event, SEEN_RETENTION_MS},
    context::Context,
    sessions::RatchetError,
    state::{PinOutcome, StateError},
};

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
pub(super) async fn check_dialer(
    context: &Context,
    from: &Username,
    key: &[u8; 32],
) -> Result<(), Refusal> {
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

/// Every check of one envelope short of storing it (see the module docs).
pub(super) async fn check(context: &Context, envelope: &Envelope) -> Result<Checked, Refusal> {
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
pub(super) fn legacy_accepted(sent_at_ms: u64, legacy_until_ms: u64) -> bool {
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
