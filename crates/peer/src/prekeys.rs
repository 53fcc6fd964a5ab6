//! Publishing the keys others start sessions with: the account's Olm key, one-time keys
//! and fallback key, each signed by the identity (see [`proto::ratchet`]).
//!
//! [`publish`] runs at every registration and after sessions started by others used
//! one-time keys up: it publishes what the account has not published yet (the server says
//! how many one-time keys it holds), then tops them up to
//! [`proto::ratchet::ONE_TIME_KEYS_TARGET`] when fewer than half are left. New keys are
//! saved in the account before they are published, so the account knows every key a
//! sender may claim; a publish that fails leaves them unpublished, and the next one sends
//! them again (the server does not list a key twice). Each registration also makes a new
//! fallback key (handed out once the one-time keys run out), so a session started from one
//! keeps forward secrecy once two registrations have passed. One publish runs at a time.

use proto::{
    Reply, Request,
    ratchet::{ONE_TIME_KEYS_TARGET, PreKeys},
};

use crate::{context::Context, control::ControlError};

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    /// The account could not be saved first.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The server did not take them.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The server answered with something else.
    #[error("unexpected reply to a prekey publish")]
    Unexpected,
}

/// Publishes and tops up the keys (see the module docs); failures are logged, and the next
/// registration tries again.
pub(crate) async fn publish(context: &Context) {
    let Ok(_running) = context.publishing.try_lock() else {
        return;
    };
    // Each registration also brings a new fallback key (see
    // `proto::ratchet::OwnAccount::rotate_fallback_key`).
    let published = match publish_once(context, ONE_TIME_KEYS_TARGET, true).await {
        Ok(count) => count,
        Err(error) => return tracing::info!(%error, "cannot publish prekeys now"),
    };
    if published >= ONE_TIME_KEYS_TARGET / 2 {
        return;
    }
    match publish_once(context, published, false).await {
        Ok(count) => tracing::debug!(count, "one-time keys topped up"),
        Err(error) => tracing::info!(%error, "cannot top up one-time keys now"),
    }
}

/// Publishes the account's unpublished keys plus new ones up to the target, given that the
/// server holds `published`; returns how many it holds afterwards.
async fn publish_once(
    context: &Context,
    published: usize,
    rotate_fallback: bool,
) -> Result<usize, PublishError> {
    let (prekeys, mut saving) =
        context
            .ratchet
            .prekeys_to_publish(&context.state, published, rotate_fallback);
    context.ratchet.settle(&context.state, &mut saving).await?;
    let count = send(context, prekeys).await?;
    context.ratchet.published(&context.state);
    Ok(count)
}

async fn send(context: &Context, prekeys: PreKeys) -> Result<usize, PublishError> {
    match context
        .control
        .request(Request::PublishPreKeys(prekeys))
        .await?
    {
        Reply::PreKeyCount { one_time } => Ok(usize::try_from(one_time).unwrap_or(usize::MAX)),
        _ => Err(PublishError::Unexpected),
    }
}
