//! Helpers shared by the suite: backends with test limits, names, envelopes, waiting.

use std::time::Duration;

use proto::{Envelope, Identity, MessageId, Username};
use store::{Broadcast, EmbeddedStore, MailLimits, RedisStore, Store, testing::RedisServer};
use tokio::sync::broadcast;

/// The limits every suite store has: a small cap so "full" is cheap to reach, and a TTL of
/// one minute of the test's own clock.
pub const LIMITS: MailLimits = MailLimits {
    cap: 50,
    ttl_ms: 60_000,
};

/// How long a test waits for an event before failing.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// An embedded store in its own temporary folder.
pub struct EmbeddedBackend {
    pub store: Store,
    /// Kept so the folder outlives the store.
    _dir: tempfile::TempDir,
}

impl EmbeddedBackend {
    pub fn open() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path().join("store.redb"), LIMITS)?.into();
        Ok(Self { store, _dir: dir })
    }
}

/// A Redis store on its own `redis-server` (killed when this is dropped).
pub struct RedisBackend {
    pub store: Store,
    pub server: RedisServer,
}

impl RedisBackend {
    pub async fn start() -> anyhow::Result<Self> {
        Self::with_server(RedisServer::start()?).await
    }

    pub async fn with_server(server: RedisServer) -> anyhow::Result<Self> {
        let store = RedisStore::connect(&server.url(), LIMITS).await?.into();
        Ok(Self { store, server })
    }

    /// A plain connection to the same Redis, for looking behind the store's back.
    pub async fn raw(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.server.url())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }
}

/// A valid username (panics on a typo in the test itself).
pub fn user(name: &str) -> Username {
    Username::new(name).expect("test names are valid")
}

/// An envelope with a fresh id; the token is a stand-in (the store never opens it).
pub fn envelope(from: &str, to: &str, label: &str) -> Envelope {
    Envelope {
        id: MessageId::random(),
        from: user(from),
        to: user(to),
        token: format!("token-{label}"),
    }
}

/// Fresh public keys.
pub fn keys() -> proto::PublicKeys {
    Identity::generate().public().clone()
}

/// The ids of `mail`, in order.
pub fn ids(mail: &[store::StoredMail]) -> Vec<MessageId> {
    mail.iter().map(|stored| stored.envelope.id).collect()
}

/// The next event on `receiver`, failing after [`EVENT_TIMEOUT`].
pub async fn next_event(
    receiver: &mut broadcast::Receiver<Broadcast>,
) -> anyhow::Result<Broadcast> {
    Ok(tokio::time::timeout(EVENT_TIMEOUT, receiver.recv()).await??)
}
