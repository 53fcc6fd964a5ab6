//! Sending one message: direct first, the mailbox as the fallback.
//!
//! [`deliver`] looks the recipient up, checks its keys against the pinned ones (pinning on
//! first use), seals the message, tries each advertised address and waits for the ack; on no route, refusal to connect, timeout or an offline recipient
//! it deposits the envelope in the recipient's mailbox. The result is a [`DeliveryStatus`].

use proto::{Envelope, ErrorCode, PublicKeys, Reply, Request};

pub use crate::api::DeliveryStatus;
use crate::{
    api::{ClientError, Event},
    context::Context,
    control::ControlError,
    link::{LinkError, PeerLink},
    state::{OutboxEntry, PinOutcome},
};

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
    let keys = match check_keys(context, entry, &info.keys).await {
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
async fn check_keys(
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
    match context.state.pin_if_absent(&entry.to, offered).await {
        Ok(PinOutcome::New | PinOutcome::Same) => Ok(offered.clone()),
        Ok(PinOutcome::Changed { pinned }) => {
            context
                .notify(Event::KeyChanged {
                    user: entry.to.clone(),
                    pinned: pinned.fingerprint(),
                    offered: offered.fingerprint(),
                })
                .await;
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
