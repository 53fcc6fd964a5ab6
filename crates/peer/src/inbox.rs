//! Receiving: direct connections ([`serve`]) and the mailbox ([`fetch_mail`]) share one
//! check-and-store path, [`receive`]:
//! recipient is me → sender not blocked → sender's pinned keys (pinned on first use from
//! the server) → open and check the sealed header → not too old → store (de-duplicated by
//! id, together with the not-yet-shown mark). Only then is the envelope acked (to the peer,
//! or to the server for mail), and only after the ack is it shown.
//!
//! Mail sealed under a sender key that no longer matches the pinned one is not deleted: it
//! is kept sealed in the `held` table of [`crate::state`] (then acked, so the server stops
//! offering it) and opened again by [`reopen_held`] once the user runs `trust` for the
//! sender. A direct message with a changed key is refused to the sender, who sees it.
//!
//! A peer that sends garbage, stalls, or floods only occupies its own task: every read has a
//! timeout and every refusal is answered and logged, never a panic.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use proto::{
    Connection, Envelope, ErrorCode, ErrorReply, MessageId, OpenError, PeerMsg, PublicKeys, Reply,
    Request, Username,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{
    runtime::{ClientError, Context, Event, Internal, SEEN_RETENTION_MS},
    state::{InboundMessage, PinOutcome, StoreOutcome},
};

/// How long an inbound connection may stay silent before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the hellos may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many envelopes one fetch asks for.
const FETCH_BATCH: u32 = 64;
/// The most envelopes held for a `trust` (beyond it, mail under a changed key is refused
/// and deleted as before): a sender with a new key cannot fill the disk.
const MAX_HELD: u64 = 10_000;

/// What [`receive`] did with an envelope.
#[derive(Debug)]
pub(crate) enum Accepted {
    /// Stored for the first time.
    New(InboundMessage),
    /// Stored before: ack again, show nothing.
    Duplicate,
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
    Transient(String),
}

impl Refusal {
    fn to_reply(&self) -> ErrorReply {
        let code = match self {
            Self::Blocked => ErrorCode::Blocked,
            Self::NotForMe(_) | Self::KeyChanged | Self::Bad(_) => ErrorCode::Refused,
            Self::Transient(_) => ErrorCode::Unavailable,
        };
        ErrorReply::new(code, self.to_string())
    }
}

/// The keys to open `user`'s messages with: pinned, or fetched from the server and pinned
/// now (trust on first use).
async fn sender_keys(context: &Context, user: &Username) -> Result<PublicKeys, Refusal> {
    let transient = |error: crate::state::StateError| Refusal::Transient(error.to_string());
    if let Some(keys) = context.state.pinned(user).map_err(transient)? {
        return Ok(keys);
    }
    let info = match context.lookup(user).await {
        Ok(info) => info,
        Err(ClientError::UnknownUser(_)) => {
            return Err(Refusal::Bad(OpenError::BadToken { peer: user.clone() }));
        }
        Err(error) => return Err(Refusal::Transient(error.to_string())),
    };
    info.keys
        .verify()
        .map_err(|_| Refusal::Bad(OpenError::BadToken { peer: user.clone() }))?;
    match context
        .state
        .pin_if_absent(user, &info.keys)
        .map_err(transient)?
    {
        PinOutcome::New | PinOutcome::Same => Ok(info.keys),
        // Pinned meanwhile by another task: use what is pinned.
        PinOutcome::Changed { pinned } => Ok(pinned),
    }
}

/// Checks and stores one envelope (see the module docs).
pub(crate) async fn receive(context: &Context, envelope: &Envelope) -> Result<Accepted, Refusal> {
    if envelope.to != context.me {
        return Err(Refusal::NotForMe(envelope.to.clone()));
    }
    let from = &envelope.from;
    let transient = |error: crate::state::StateError| Refusal::Transient(error.to_string());
    if context.state.is_blocked(from).map_err(transient)? {
        return Err(Refusal::Blocked);
    }
    let keys = sender_keys(context, from).await?;
    let channel = context
        .channel(from, &keys)
        .map_err(|_| Refusal::KeyChanged)?;
    let now = proto::now_ms();
    let plaintext = match channel.open(envelope, now) {
        Ok(plaintext) => plaintext,
        Err(OpenError::BadToken { .. }) => {
            return Err(key_change_or_forgery(context, from, &keys).await);
        }
        Err(error) => return Err(error.into()),
    };
    if plaintext.sent_at_ms.saturating_add(SEEN_RETENTION_MS) < now {
        return Err(OpenError::Expired {
            window_secs: SEEN_RETENTION_MS / 1000,
        }
        .into());
    }
    let muted = context
        .state
        .muted_until(from, now)
        .map_err(transient)?
        .is_some();
    match context
        .state
        .store_incoming(&plaintext, muted, now)
        .map_err(transient)?
    {
        StoreOutcome::New(message) => Ok(Accepted::New(message)),
        StoreOutcome::Duplicate => Ok(Accepted::Duplicate),
    }
}

/// A token that does not open under the pinned keys is either forged or sealed with new
/// keys. Asking the server tells the two apart, so a real key change is reported loudly.
async fn key_change_or_forgery(context: &Context, from: &Username, pinned: &PublicKeys) -> Refusal {
    match context.lookup(from).await {
        Ok(info) if &info.keys != pinned => {
            context.notify(Event::KeyChanged {
                user: from.clone(),
                pinned: pinned.fingerprint(),
                offered: info.keys.fingerprint(),
            });
            Refusal::KeyChanged
        }
        _ => Refusal::Bad(OpenError::BadToken { peer: from.clone() }),
    }
}

fn report_refusal(context: &Context, from: &Username, refusal: &Refusal) {
    tracing::warn!(%from, %refusal, "incoming message refused");
    // Blocked senders are refused silently: that is the point of blocking.
    if !matches!(refusal, Refusal::Blocked | Refusal::Transient(_)) {
        context.notify(Event::Refused {
            from: from.clone(),
            reason: refusal.to_string(),
        });
    }
}

/// Fetches and acks all waiting mail, then shows it.
pub(crate) async fn fetch_mail(context: &Context) {
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
            Ok(_) => return tracing::warn!("unexpected reply to fetch"),
            Err(error) => return tracing::info!(%error, "mail fetch failed; will retry"),
        };
        if envelopes.is_empty() {
            return;
        }
        let mut ack: Vec<MessageId> = Vec::new();
        let mut new: Vec<InboundMessage> = Vec::new();
        let mut stop = false;
        for envelope in &envelopes {
            match receive(context, envelope).await {
                Ok(Accepted::New(message)) => {
                    ack.push(envelope.id);
                    new.push(message);
                }
                Ok(Accepted::Duplicate) => ack.push(envelope.id),
                Err(Refusal::Transient(reason)) => {
                    tracing::info!(%reason, "mail left in the mailbox for later");
                    stop = true;
                    break;
                }
                // Sealed under the sender's new key: keep it (sealed) for `trust`, then ack.
                Err(Refusal::KeyChanged) => match context.state.hold(envelope, MAX_HELD) {
                    Ok(true) => {
                        context.notify(Event::Refused {
                            from: envelope.from.clone(),
                            reason: format!(
                                "{}; the message is kept and shown once you `trust {}`",
                                Refusal::KeyChanged,
                                envelope.from
                            ),
                        });
                        ack.push(envelope.id);
                    }
                    Ok(false) => {
                        report_refusal(context, &envelope.from, &Refusal::KeyChanged);
                        ack.push(envelope.id);
                    }
                    Err(error) => {
                        tracing::info!(%error, "mail left in the mailbox for later");
                        stop = true;
                        break;
                    }
                },
                // Refused for good: delete it from the mailbox, or it comes back forever.
                Err(refusal) => {
                    report_refusal(context, &envelope.from, &refusal);
                    ack.push(envelope.id);
                }
            }
        }
        if !ack.is_empty()
            && let Err(error) = context.control.request(Request::Ack { ids: ack }).await
        {
            // Stored already; the server sends them again and they are de-duplicated.
            tracing::info!(%error, "mail ack failed");
            stop = true;
        }
        for message in new {
            let _ = context.to_loop.send(Internal::Received(message));
        }
        if stop || remaining == 0 {
            return;
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
    held.sort_by_cached_key(|envelope| {
        channel
            .as_ref()
            .and_then(|channel| channel.open(envelope, now).ok())
            .map_or(u64::MAX, |plaintext| plaintext.sent_at_ms)
    });
    for envelope in held {
        let done = match receive(context, &envelope).await {
            Ok(Accepted::New(message)) => {
                let _ = context.to_loop.send(Internal::Received(message));
                true
            }
            Ok(Accepted::Duplicate) => true,
            Err(Refusal::KeyChanged | Refusal::Transient(_)) => false,
            Err(refusal) => {
                report_refusal(context, from, &refusal);
                true
            }
        };
        if done && let Err(error) = context.state.unhold(&envelope.id) {
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
) -> Result<(), String> {
    connection
        .hello(HANDSHAKE_TIMEOUT)
        .await
        .map_err(|error| error.to_string())?;
    let from = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.recv::<PeerMsg>()).await {
        Ok(Ok(Some(PeerMsg::Hello { from, to }))) => {
            if to != context.me {
                let refusal = Refusal::NotForMe(to);
                let _ = connection
                    .send(&PeerMsg::Reject {
                        id: None,
                        error: refusal.to_reply(),
                    })
                    .await;
                return Err(refusal.to_string());
            }
            if context.state.is_blocked(&from).unwrap_or(false) {
                let _ = connection
                    .send(&PeerMsg::Reject {
                        id: None,
                        error: Refusal::Blocked.to_reply(),
                    })
                    .await;
                return Err(format!("{from} is blocked"));
            }
            from
        }
        Ok(Ok(Some(_))) => return Err("the first message was not a hello".into()),
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => return Err("no peer hello in time".into()),
    };
    loop {
        let envelope = match tokio::time::timeout(IDLE_TIMEOUT, connection.recv::<PeerMsg>()).await
        {
            Ok(Ok(Some(PeerMsg::Envelope(envelope)))) => envelope,
            Ok(Ok(Some(_))) => return Err("unexpected message from the peer".into()),
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(error)) => return Err(error.to_string()),
        };
        let id = envelope.id;
        let answer = if envelope.from != from {
            PeerMsg::Reject {
                id: Some(id),
                error: ErrorReply::new(
                    ErrorCode::BadRequest,
                    "the envelope's sender is not the user who connected",
                ),
            }
        } else {
            match receive(context, &envelope).await {
                Ok(Accepted::New(message)) => {
                    connection
                        .send(&PeerMsg::Ack { id })
                        .await
                        .map_err(|error| error.to_string())?;
                    // Acked after storing, shown after acking.
                    let _ = context.to_loop.send(Internal::Received(message));
                    continue;
                }
                Ok(Accepted::Duplicate) => PeerMsg::Ack { id },
                Err(refusal) => {
                    report_refusal(context, &from, &refusal);
                    PeerMsg::Reject {
                        id: Some(id),
                        error: refusal.to_reply(),
                    }
                }
            }
        };
        connection
            .send(&answer)
            .await
            .map_err(|error| error.to_string())?;
    }
}
