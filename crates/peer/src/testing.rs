//! Test support (the `testing` feature, off by default): a runtime whose state lives on a
//! storage backend the test holds, such as [`SyncedDisk`], so a test can stop its `fsync`s
//! and take the file as a crash at that moment would leave it; and [`seal_as`], for tests
//! that play a sender's side of the peer protocol by hand ([`seal_receipt_as`] for a
//! receipt).

pub use durable::testing::SyncedDisk;

use tokio_util::sync::CancellationToken;

use crate::{Client, Config, Events, StartError, runtime::start_with, state::State};

/// [`crate::start`], with the state database over `backend` instead of the data dir's
/// state file (the data dir still holds the identity and the state's lock).
pub async fn start_with_backend<B>(
    config: Config,
    backend: B,
    shutdown: CancellationToken,
) -> Result<(Client, Events), StartError>
where
    B: redb::StorageBackend + Clone,
{
    start_with(config, shutdown, move |dir| {
        State::open_with_backend(dir, backend)
    })
    .await
}

/// Seals `body` from `client`'s user to `to`, written at `sent_at_ms`, as its runtime would
/// (through its ratchet: a session is started from a claimed key if there is none, and the
/// session's new state is durable before this returns), without sending or recording it.
pub async fn seal_as(
    client: &Client,
    to: &proto::Username,
    body: &str,
    sent_at_ms: u64,
) -> Result<proto::Envelope, crate::DeliveryStatus> {
    let context = &client.context;
    let info = crate::delivery::after_lookup(context.lookup(to).await)?;
    let entry = context.state.prepare_outgoing(to, body, sent_at_ms);
    crate::delivery::seal(context, &entry, &info.keys).await
}

/// Seals `receipt` from `client`'s user to `to` as its runtime would (in the session they
/// share, durable before this returns), without sending it: for tests of forged or
/// misdirected receipts. `None` when there is no session with `to` or it cannot be saved.
pub async fn seal_receipt_as(
    client: &Client,
    to: &proto::Username,
    receipt: proto::Receipt,
) -> Option<proto::Envelope> {
    let context = &client.context;
    let (envelope, mut saving) = context
        .ratchet
        .seal_receipt(
            &context.state,
            to,
            proto::MessageId::random(),
            receipt,
            proto::now_ms(),
        )
        .ok()?;
    context
        .ratchet
        .settle(&context.state, &mut saving)
        .await
        .ok()?;
    Some(envelope)
}
