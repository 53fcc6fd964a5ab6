//! Sending one message: direct first, the mailbox as the fallback.
//!
//! [`deliver`] looks the recipient up, checks its keys against the pinned ones (pinning on
//! first use), seals the message, tries each advertised address and waits for the ack; on
//! no route, refusal to connect, timeout or an offline recipient it deposits the envelope in
//! the recipient's mailbox. The result is a [`DeliveryStatus`].
//!
//! The route's decisions are pure functions of what each step returned ([`after_lookup`],
//! [`after_keys`], [`after_dial`], [`after_deposit`]), unit-tested below without a socket;
//! [`deliver`] only runs the steps they ask for.

use proto::{ErrorCode, PublicKeys, Reply, Request, UserInfo};

pub use crate::api::DeliveryStatus;
use crate::{
    api::{ClientError, Event},
    context::Context,
    control::ControlError,
    link::{LinkError, PeerLink},
    reason::FailureReason,
    sessions::RatchetError,
    state::{OutboxEntry, PinOutcome, StateError},
};

/// Delivers `entry` by the full route: lookup, keys, a new link, else the mailbox. Returns
/// the result and the link it opened, worth keeping for the next messages (a kept link is
/// driven pipelined by [`crate::outgoing`]), with the ratchet key the message was sealed
/// under: its save was durable before the message left, so its private half is kept here.
///
/// `try_direct`: whether to try the recipient's addresses at all (see [`DirectBackoff`]).
/// The third value says whether a direct attempt timed out (see [`LinkError::timed_out`]):
/// the message then went to the mailbox.
pub(crate) async fn deliver(
    context: &Context,
    entry: &OutboxEntry,
    try_direct: bool,
) -> (DeliveryStatus, Option<(PeerLink, Option<[u8; 32]>)>, bool) {
    let info = match after_lookup(context.lookup(&entry.to).await) {
        Ok(info) => info,
        Err(status) => return (status, None, false),
    };
    let verified = info.keys.verify().map_err(|error| error.to_string());
    let mut pinned = match verified {
        Ok(()) => Some(context.state.pin_if_absent(&entry.to, &info.keys).await),
        Err(_) => None,
    };
    if let Some(Ok(PinOutcome::Changed { pinned: old })) = &pinned {
        if context.follow_rotation(&entry.to, old, &info.keys).await {
            pinned = Some(Ok(PinOutcome::Same));
        } else {
            context
                .notify(Event::KeyChanged {
                    user: entry.to.clone(),
                    pinned: old.fingerprint(),
                    offered: info.keys.fingerprint(),
                })
                .await;
        }
    }
    if let Err(status) = after_keys(verified, pinned) {
        return (status, None, false);
    }
    let mut envelope = match seal(context, entry, &info.keys).await {
        Ok(envelope) => envelope,
        Err(status) => return (status, None, false),
    };
    // Set once the message was sealed again in a new session, after the recipient said it
    // had none that opens it.
    let mut resealed = false;
    let addresses = if try_direct {
        direct_addresses(&info)
    } else {
        &[]
    };
    // Set when an attempt cost a timeout (a refusal, or a connection refused or closed at
    // once, as by a peer at its connection cap, is a quick answer, and costs little to
    // try again).
    let mut direct_failed = false;
    let mut addresses = addresses.iter();
    let mut next = addresses.next();
    while let Some(addr) = next {
        let attempt = async {
            let mut link = PeerLink::dial(
                *addr,
                &context.identity,
                &context.me,
                &entry.to,
                &info.keys,
                context.config.connect_timeout,
            )
            .await?;
            link.send(&envelope, context.config.ack_timeout).await?;
            Ok::<_, LinkError>(link)
        };
        let result = attempt.await;
        if matches!(&result, Err(error) if error.timed_out()) {
            direct_failed = true;
        }
        match after_dial(&result) {
            Dialled::Delivered => {
                let key = proto::ratchet::ratchet_key(&envelope);
                return (
                    DeliveryStatus::Delivered,
                    result.ok().map(|link| (link, key)),
                    false,
                );
            }
            Dialled::Failed(status) => return (status, None, false),
            Dialled::NewSession if !resealed => {
                // The recipient lost its session (a restored backup, a new data dir):
                // start a new one and send it again, at the same address.
                tracing::info!(to = %entry.to, "the recipient has no session for our message; starting a new one");
                resealed = true;
                if let Err(error) = context.ratchet.reset(&context.state, &entry.to) {
                    return (state_failure(error), None, false);
                }
                envelope = match seal(context, entry, &info.keys).await {
                    Ok(envelope) => envelope,
                    Err(status) => return (status, None, false),
                };
                continue;
            }
            Dialled::NewSession => {
                let status = DeliveryStatus::failed(
                    FailureReason::Seal {
                        detail: "the recipient cannot open messages of a new session either".into(),
                    },
                    true,
                );
                return (status, None, false);
            }
            Dialled::NextAddress => {
                if let Err(error) = &result {
                    tracing::info!(to = %entry.to, %addr, %error, "not delivered at this address; trying the next, then the mailbox");
                }
            }
            Dialled::Mailbox => break,
        }
        next = addresses.next();
    }
    let deposited = context.control.request(Request::Deposit { envelope }).await;
    (after_deposit(deposited), None, direct_failed)
}

/// When to try a recipient directly again after a direct attempt timed out (no connection
/// or no answer in time; not a refusal or a connection refused or closed at once, which
/// are quick answers): until then its messages go straight
/// to the mailbox, so a peer that is unreachable, or reachable but stalled, costs one
/// connect timeout per while, not one per message. The wait doubles from
/// [`DIRECT_RETRY_MIN`] to [`DIRECT_RETRY_MAX`] while attempts keep failing; a success or
/// a reconnect to the server starts it over. Time is passed in.
#[derive(Debug)]
pub(crate) struct DirectBackoff {
    until: Option<std::time::Instant>,
    wait: durable::Backoff,
}

/// The first wait after a failed direct attempt.
pub(crate) const DIRECT_RETRY_MIN: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest wait.
pub(crate) const DIRECT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

impl Default for DirectBackoff {
    fn default() -> Self {
        Self {
            until: None,
            wait: durable::Backoff::new(DIRECT_RETRY_MIN, DIRECT_RETRY_MAX),
        }
    }
}

impl DirectBackoff {
    /// Whether to try directly at `now`.
    pub(crate) fn allowed(&self, now: std::time::Instant) -> bool {
        self.until.is_none_or(|until| now >= until)
    }

    /// A direct attempt failed at `now`.
    pub(crate) fn failed(&mut self, now: std::time::Instant) {
        self.until = Some(now + self.wait.next_delay(0));
    }

    /// A direct attempt succeeded, or the links start over: try directly again now.
    pub(crate) fn reset(&mut self) {
        self.until = None;
        self.wait.reset();
    }
}

/// What a lookup of the recipient means for the route: go on with what the server knows,
/// or stop with this status (no such user: failed for good; the server unreachable: failed,
/// kept in the outbox for a retry).
pub(crate) fn after_lookup(
    lookup: Result<UserInfo, ClientError>,
) -> Result<UserInfo, DeliveryStatus> {
    match lookup {
        Ok(info) => Ok(info),
        Err(ClientError::UnknownUser(_)) => {
            Err(DeliveryStatus::failed(FailureReason::UnknownUser, false))
        }
        Err(error) => Err(DeliveryStatus::failed(
            FailureReason::ServerUnreachable {
                detail: error.to_string(),
            },
            true,
        )),
    }
}

/// What the server's keys for the recipient mean: `verified` (the keys verify; else why
/// not) and, for keys that verify, how pinning them went. Keys that do not verify fail for
/// good; keys other than the pinned ones hold the message (failed, kept for a retry after
/// `trust`); a state failure keeps it for a retry.
pub(crate) fn after_keys(
    verified: Result<(), String>,
    pinned: Option<Result<PinOutcome, StateError>>,
) -> Result<(), DeliveryStatus> {
    if let Err(detail) = verified {
        return Err(DeliveryStatus::failed(
            FailureReason::InvalidKeys { detail },
            false,
        ));
    }
    match pinned {
        Some(Ok(PinOutcome::New | PinOutcome::Same)) => Ok(()),
        Some(Ok(PinOutcome::Changed { .. })) => {
            Err(DeliveryStatus::failed(FailureReason::KeyChanged, true))
        }
        Some(Err(error)) => Err(DeliveryStatus::failed(
            FailureReason::LocalState {
                detail: error.to_string(),
            },
            true,
        )),
        None => Err(DeliveryStatus::failed(
            FailureReason::LocalState {
                detail: "the keys were not checked".into(),
            },
            true,
        )),
    }
}

/// The addresses to try directly: the advertised ones while the recipient is online, none
/// otherwise (straight to the mailbox).
pub(crate) fn direct_addresses(info: &UserInfo) -> &[std::net::SocketAddr] {
    if info.online { &info.addresses } else { &[] }
}

/// What to do after a direct attempt at one address.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Dialled {
    /// Acked: delivered.
    Delivered,
    /// Try the recipient's next address (then the mailbox).
    NextAddress,
    /// Go to the mailbox now.
    Mailbox,
    /// The recipient has no session that opens the message: seal it in a new one and try
    /// again.
    NewSession,
    /// Stop with this status.
    Failed(DeliveryStatus),
}

/// What a direct attempt's outcome means: acked is delivered; a recipient that cannot take
/// messages now (its own server link is down) sends the message to the mailbox; another
/// user answering at the address (a stale address) or a connection that fails or times out
/// moves on to the next address; any other refusal is the recipient's, and final.
pub(crate) fn after_dial<T>(outcome: &Result<T, LinkError>) -> Dialled {
    match outcome {
        Ok(_) => Dialled::Delivered,
        Err(LinkError::Rejected(error)) if error.code == ErrorCode::Unavailable => Dialled::Mailbox,
        Err(LinkError::Rejected(error)) if error.code == ErrorCode::UnknownUser => {
            Dialled::NextAddress
        }
        Err(LinkError::Rejected(error)) if error.code == ErrorCode::NoSession => {
            Dialled::NewSession
        }
        Err(LinkError::Rejected(error)) => Dialled::Failed(rejected(error.clone())),
        Err(_) => Dialled::NextAddress,
    }
}

/// The status of a message the recipient refused.
pub(crate) fn rejected(error: proto::ErrorReply) -> DeliveryStatus {
    DeliveryStatus::failed(FailureReason::refused(error), false)
}

/// What the server's answer to a deposit means: queued, or failed (kept for a retry unless
/// the refusal is final: the mailbox is full, the server is busy or failing, or this client
/// is not registered now are all worth a retry).
pub(crate) fn after_deposit(deposited: Result<Reply, ControlError>) -> DeliveryStatus {
    match deposited {
        Ok(Reply::Deposited { recipient_online }) => DeliveryStatus::Queued { recipient_online },
        Ok(_) => DeliveryStatus::failed(FailureReason::UnexpectedReply, true),
        Err(ControlError::Refused(reply)) => {
            let retry = matches!(
                reply.code,
                ErrorCode::MailboxFull
                    | ErrorCode::Unavailable
                    | ErrorCode::RateLimited
                    | ErrorCode::Internal
                    | ErrorCode::NotRegistered
            );
            DeliveryStatus::failed(
                FailureReason::MailboxRefused {
                    code: reply.code,
                    message: reply.message,
                },
                retry,
            )
        }
        Err(error) => DeliveryStatus::failed(
            FailureReason::MailboxUnreachable {
                detail: error.to_string(),
            },
            true,
        ),
    }
}

/// The status of a message that could not go because the local state failed (kept for a
/// retry).
pub(crate) fn state_failure(error: StateError) -> DeliveryStatus {
    DeliveryStatus::failed(
        FailureReason::LocalState {
            detail: error.to_string(),
        },
        true,
    )
}

/// Seals `entry` with the recipient's newest session, starting one first from a key
/// claimed at the server if there is none, and waits until the session's new state is
/// durable: only then may the envelope leave (see [`crate::sessions`]).
pub(crate) async fn seal(
    context: &Context,
    entry: &OutboxEntry,
    keys: &PublicKeys,
) -> Result<proto::Envelope, DeliveryStatus> {
    let state = &context.state;
    let sealing = |detail: String| DeliveryStatus::failed(FailureReason::Seal { detail }, false);
    let failure = |error: RatchetError| match error {
        RatchetError::State(error) => state_failure(error),
        error => sealing(error.to_string()),
    };
    if !context
        .ratchet
        .has_session(state, &entry.to)
        .map_err(state_failure)?
    {
        let bundle = claim_prekey(context, &entry.to).await?;
        context
            .ratchet
            .start(state, &entry.to, keys, &bundle)
            .map_err(failure)?;
    }
    let (mut envelopes, mut saving) = context
        .ratchet
        .seal(state, &entry.to, &[entry])
        .map_err(failure)?;
    context
        .ratchet
        .settle(state, &mut saving)
        .await
        .map_err(state_failure)?;
    envelopes
        .pop()
        .ok_or_else(|| sealing("nothing was sealed".into()))
}

/// Claims one of `user`'s published keys to start a session. A user with none (an older
/// client) or a server that cannot answer keeps the message in the outbox.
pub(crate) async fn claim_prekey(
    context: &Context,
    user: &proto::Username,
) -> Result<proto::ratchet::PreKeyBundle, DeliveryStatus> {
    match context
        .control
        .request(Request::ClaimPreKey { user: user.clone() })
        .await
    {
        Ok(Reply::PreKey(bundle)) => Ok(bundle),
        Ok(_) => Err(DeliveryStatus::failed(FailureReason::UnexpectedReply, true)),
        Err(ControlError::Refused(reply)) if reply.code == ErrorCode::NoPreKeys => {
            Err(DeliveryStatus::failed(FailureReason::NoPreKeys, true))
        }
        Err(ControlError::Refused(reply)) if reply.code == ErrorCode::UnknownUser => {
            Err(DeliveryStatus::failed(FailureReason::UnknownUser, false))
        }
        Err(error) => Err(DeliveryStatus::failed(
            FailureReason::ServerUnreachable {
                detail: error.to_string(),
            },
            true,
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use proto::{ErrorReply, Username};

    use super::*;

    fn info(online: bool) -> UserInfo {
        UserInfo {
            user: Username::new("bob").unwrap(),
            keys: proto::Identity::generate().public().clone(),
            online,
            addresses: vec![SocketAddr::from(([127, 0, 0, 1], 7000))],
            last_seen_ms: None,
        }
    }

    fn refused(code: ErrorCode) -> LinkError {
        LinkError::Rejected(ErrorReply::new(code, "no"))
    }

    #[test]
    fn an_unknown_recipient_fails_for_good_and_an_unreachable_server_is_retried() {
        let unknown = after_lookup(Err(ClientError::UnknownUser(Username::new("bob").unwrap())));
        assert_eq!(
            unknown.unwrap_err(),
            DeliveryStatus::failed(FailureReason::UnknownUser, false)
        );
        let offline = after_lookup(Err(ClientError::Control(ControlError::Timeout(
            Duration::from_secs(1),
        ))));
        assert!(matches!(
            offline.unwrap_err(),
            DeliveryStatus::Failed {
                reason: FailureReason::ServerUnreachable { .. },
                will_retry: true
            }
        ));
    }

    #[test]
    fn an_offline_recipient_goes_straight_to_the_mailbox() {
        assert!(direct_addresses(&info(false)).is_empty());
        assert_eq!(direct_addresses(&info(true)).len(), 1);
    }

    #[test]
    fn keys_that_do_not_verify_fail_and_changed_keys_hold_the_message_until_trust() {
        assert!(matches!(
            after_keys(Err("bad signature".into()), None),
            Err(DeliveryStatus::Failed {
                reason: FailureReason::InvalidKeys { .. },
                will_retry: false
            })
        ));
        let pinned = proto::Identity::generate().public().clone();
        assert_eq!(
            after_keys(Ok(()), Some(Ok(PinOutcome::Changed { pinned }))),
            Err(DeliveryStatus::failed(FailureReason::KeyChanged, true))
        );
        assert_eq!(after_keys(Ok(()), Some(Ok(PinOutcome::New))), Ok(()));
        assert_eq!(after_keys(Ok(()), Some(Ok(PinOutcome::Same))), Ok(()));
    }

    #[test]
    fn direct_first_then_the_mailbox() {
        let acked: Result<(), LinkError> = Ok(());
        assert_eq!(after_dial(&acked), Dialled::Delivered);
        // The recipient's own server link is down: the mailbox, now.
        assert_eq!(
            after_dial::<()>(&Err(refused(ErrorCode::Unavailable))),
            Dialled::Mailbox
        );
        // Someone else at a stale address, or no connection: the next address.
        assert_eq!(
            after_dial::<()>(&Err(refused(ErrorCode::UnknownUser))),
            Dialled::NextAddress
        );
        assert_eq!(
            after_dial::<()>(&Err(LinkError::Timeout(Duration::from_secs(5)))),
            Dialled::NextAddress
        );
        // The recipient's refusal is final.
        assert!(matches!(
            after_dial::<()>(&Err(refused(ErrorCode::Blocked))),
            Dialled::Failed(DeliveryStatus::Failed {
                reason: FailureReason::RefusedByRecipient {
                    code: ErrorCode::Blocked,
                    ..
                },
                will_retry: false
            })
        ));
    }

    #[test]
    fn after_a_failed_direct_attempt_the_mailbox_is_used_for_a_while_that_grows() {
        let start = std::time::Instant::now();
        let mut backoff = DirectBackoff::default();
        assert!(backoff.allowed(start));
        backoff.failed(start);
        assert!(!backoff.allowed(start + DIRECT_RETRY_MIN - Duration::from_millis(1)));
        assert!(backoff.allowed(start + DIRECT_RETRY_MIN));
        let again = start + DIRECT_RETRY_MIN;
        backoff.failed(again);
        assert!(!backoff.allowed(again + DIRECT_RETRY_MIN));
        assert!(backoff.allowed(again + DIRECT_RETRY_MIN * 2));
        for _ in 0..10 {
            backoff.failed(again);
        }
        assert!(backoff.allowed(again + DIRECT_RETRY_MAX));
        backoff.reset();
        assert!(backoff.allowed(again));
    }

    #[test]
    fn only_an_attempt_that_waited_out_a_timeout_starts_the_backoff() {
        let io = |kind| LinkError::Connect {
            addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
            source: std::io::Error::from(kind),
        };
        assert!(LinkError::Timeout(Duration::from_secs(5)).timed_out());
        assert!(
            LinkError::Handshake(proto::HandshakeError::Timeout(Duration::from_secs(5)))
                .timed_out()
        );
        assert!(io(std::io::ErrorKind::TimedOut).timed_out());
        assert!(io(std::io::ErrorKind::HostUnreachable).timed_out());
        // Quick answers: a refusal, a refused connection, one closed at once (a peer at its
        // connection cap).
        assert!(!refused(ErrorCode::Unavailable).timed_out());
        assert!(!io(std::io::ErrorKind::ConnectionRefused).timed_out());
        assert!(!LinkError::Closed.timed_out());
        assert!(!LinkError::Handshake(proto::HandshakeError::Closed).timed_out());
    }

    #[test]
    fn a_deposit_is_queued_or_kept_for_a_retry_unless_refused_for_good() {
        assert_eq!(
            after_deposit(Ok(Reply::Deposited {
                recipient_online: false
            })),
            DeliveryStatus::Queued {
                recipient_online: false
            }
        );
        let refusal = |code| after_deposit(Err(ControlError::Refused(ErrorReply::new(code, "no"))));
        for code in [
            ErrorCode::MailboxFull,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
        ] {
            assert!(matches!(
                refusal(code),
                DeliveryStatus::Failed {
                    will_retry: true,
                    ..
                }
            ));
        }
        assert!(matches!(
            refusal(ErrorCode::Blocked),
            DeliveryStatus::Failed {
                will_retry: false,
                ..
            }
        ));
        assert!(matches!(
            after_deposit(Err(ControlError::Offline("closed".into()))),
            DeliveryStatus::Failed {
                reason: FailureReason::MailboxUnreachable { .. },
                will_retry: true
            }
        ));
    }
}
