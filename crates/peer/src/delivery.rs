//! Sending one message: direct first, the mailbox as the fallback.
//!
//! [`deliver`] looks the recipient up, checks its keys against the pinned ones (pinning on
//! first use), seals the message, tries each advertised address and waits for the ack; on no route, refusal to connect, timeout or an offline recipient
//! it deposits the envelope in the recipient's mailbox. The result is a [`DeliveryStatus`].

use std::fmt;

use proto::{Envelope, ErrorCode, PublicKeys, Reply, Request};

use crate::{
    control::ControlError,
    link::{LinkError, PeerLink},
    runtime::{ClientError, Context, Event},
    state::{MessageStatus, OutboxEntry, PinOutcome},
};

/// What became of a message, as the sender sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// The recipient acked it directly.
    Delivered,
    /// It is in the recipient's mailbox.
    Queued {
        /// Whether the recipient is online (and so was told at once).
        recipient_online: bool,
    },
    /// It was not delivered.
    Failed {
        /// Why, for the user.
        reason: String,
        /// Whether it stays in the outbox and is retried (on reconnect, on `trust`).
        will_retry: bool,
    },
}

impl DeliveryStatus {
    fn failed(reason: impl Into<String>, will_retry: bool) -> Self {
        Self::Failed {
            reason: reason.into(),
            will_retry,
        }
    }

    /// The history status, and whether the message stays in the outbox.
    pub fn to_history(&self) -> (MessageStatus, bool) {
        match self {
            Self::Delivered => (MessageStatus::Delivered, false),
            Self::Queued { .. } => (MessageStatus::Queued, false),
            Self::Failed { reason, will_retry } => {
                (MessageStatus::Failed(reason.clone()), *will_retry)
            }
        }
    }

    /// Delivered or queued: the message is safe.
    pub fn is_success(&self) -> bool {
        !matches!(self, Self::Failed { .. })
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Delivered => f.write_str("delivered"),
            Self::Queued {
                recipient_online: true,
            } => f.write_str("queued (recipient unreachable directly; relayed by the server)"),
            Self::Queued {
                recipient_online: false,
            } => f.write_str("queued (recipient offline)"),
            Self::Failed {
                reason,
                will_retry: true,
            } => write!(f, "failed: {reason} (kept in the outbox, will retry)"),
            Self::Failed {
                reason,
                will_retry: false,
            } => write!(f, "failed: {reason}"),
        }
    }
}

/// Delivers `entry` by the full route: lookup, keys, a new link, else the mailbox. Returns
/// the result and the link it opened, worth keeping for the next messages (a kept link is
/// driven pipelined by [`crate::outgoing`]).
pub(crate) async fn deliver(
    context: &Context,
    entry: &OutboxEntry,
) -> (DeliveryStatus, Option<PeerLink>) {
    let info = match context.lookup(&entry.to).await {
        Ok(info) => info,
        Err(ClientError::UnknownUser(user)) => {
            return (
                DeliveryStatus::failed(format!("no user named {user}"), false),
                None,
            );
        }
        Err(error) => {
            return (
                DeliveryStatus::failed(format!("discovery server unreachable: {error}"), true),
                None,
            );
        }
    };
    let keys = match check_keys(context, entry, &info.keys) {
        Ok(keys) => keys,
        Err(status) => return (status, None),
    };
    let envelope = match seal(context, entry, &keys) {
        Ok(envelope) => envelope,
        Err(status) => return (status, None),
    };
    if info.online {
        for addr in &info.addresses {
            let attempt = async {
                let mut link = PeerLink::dial(
                    *addr,
                    &context.me,
                    &entry.to,
                    context.config.connect_timeout,
                )
                .await?;
                link.send(&envelope, context.config.ack_timeout).await?;
                Ok::<_, LinkError>(link)
            };
            match attempt.await {
                Ok(link) => return (DeliveryStatus::Delivered, Some(link)),
                // The recipient cannot take it now (its server link is down): use the mailbox.
                Err(LinkError::Rejected(error)) if error.code == ErrorCode::Unavailable => break,
                // Someone else answers at this address (the recipient's is stale): not the
                // recipient's refusal; try its next address, then the mailbox.
                Err(LinkError::Rejected(error)) if error.code == ErrorCode::UnknownUser => {
                    tracing::info!(to = %entry.to, %addr, reason = %error.message, "another user at the recipient's address; trying elsewhere");
                }
                Err(LinkError::Rejected(error)) => return (rejected(error), None),
                Err(error) => {
                    tracing::info!(to = %entry.to, %addr, %error, "direct delivery failed; trying the mailbox");
                }
            }
        }
    }
    (deposit(context, envelope).await, None)
}

/// The status of a message the recipient refused.
pub(crate) fn rejected(error: proto::ErrorReply) -> DeliveryStatus {
    DeliveryStatus::failed(
        format!("refused by the recipient: {}", error.message),
        false,
    )
}

/// Verifies the server's keys and compares them with the pinned ones (pinning on first use).
fn check_keys(
    context: &Context,
    entry: &OutboxEntry,
    offered: &PublicKeys,
) -> Result<PublicKeys, DeliveryStatus> {
    if let Err(error) = offered.verify() {
        return Err(DeliveryStatus::failed(
            format!("the server's keys for {} are invalid: {error}", entry.to),
            false,
        ));
    }
    match context.state.pin_if_absent(&entry.to, offered) {
        Ok(PinOutcome::New | PinOutcome::Same) => Ok(offered.clone()),
        Ok(PinOutcome::Changed { pinned }) => {
            context.notify(Event::KeyChanged {
                user: entry.to.clone(),
                pinned: pinned.fingerprint(),
                offered: offered.fingerprint(),
            });
            Err(DeliveryStatus::failed(
                format!(
                    "{}'s key changed; NOT sent. Compare fingerprints with `whois {}` and run `trust {}` if the change is genuine",
                    entry.to, entry.to, entry.to
                ),
                true,
            ))
        }
        Err(error) => Err(DeliveryStatus::failed(
            format!("local state error: {error}"),
            true,
        )),
    }
}

fn seal(
    context: &Context,
    entry: &OutboxEntry,
    keys: &PublicKeys,
) -> Result<Envelope, DeliveryStatus> {
    let channel = context
        .channel(&entry.to, keys)
        .map_err(|error| DeliveryStatus::failed(error.to_string(), false))?;
    // Sealed with the time it was written, so retries keep the original time.
    channel
        .seal(entry.id, &entry.body, entry.created_ms)
        .map_err(|error| DeliveryStatus::failed(error.to_string(), false))
}

async fn deposit(context: &Context, envelope: Envelope) -> DeliveryStatus {
    match context.control.request(Request::Deposit { envelope }).await {
        Ok(Reply::Deposited { recipient_online }) => DeliveryStatus::Queued { recipient_online },
        Ok(_) => DeliveryStatus::failed("unexpected reply from the server", true),
        Err(ControlError::Refused(reply)) => {
            let retry = matches!(
                reply.code,
                ErrorCode::MailboxFull
                    | ErrorCode::Unavailable
                    | ErrorCode::RateLimited
                    | ErrorCode::Internal
                    | ErrorCode::NotRegistered
            );
            DeliveryStatus::failed(reply.message, retry)
        }
        Err(error) => DeliveryStatus::failed(format!("recipient unreachable and {error}"), true),
    }
}
