//! Test support (the `testing` feature, off by default): a runtime whose state lives on a
//! storage backend the test holds, such as [`SyncedDisk`], so a test can stop its `fsync`s
//! and take the file as a crash at that moment would leave it.

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
