//! Helpers shared by the suite: backends with test limits, names, envelopes, waiting, and
//! a TCP proxy that can turn a connection half-open.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use proto::{Envelope, Identity, MailRef, MessageId, Username};
use store::{
    Broadcast, EmbeddedStore, MailLimits, RedisStore, Store,
    testing::{RedisCluster, RedisServer},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::broadcast,
    task::JoinHandle,
};

/// The limits every suite store has: small caps (50 messages, 1 MiB) so "full" is cheap to
/// reach, and a TTL of one minute of the test's own clock.
pub const LIMITS: MailLimits = MailLimits {
    cap: 50,
    max_bytes: 1 << 20,
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

/// A Redis store on its own test cluster of 3 masters and 3 replicas (killed when this is
/// dropped).
pub struct ClusterBackend {
    pub store: Store,
    pub cluster: RedisCluster,
}

impl ClusterBackend {
    pub async fn start() -> anyhow::Result<Self> {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start).await??;
        let store = RedisStore::connect(&cluster.url(), LIMITS).await?;
        anyhow::ensure!(store.is_cluster(), "the store did not detect the cluster");
        Ok(Self {
            store: store.into(),
            cluster,
        })
    }

    /// Another store (another discovery instance) on the same cluster.
    pub async fn another_store(&self) -> anyhow::Result<Store> {
        Ok(RedisStore::connect(&self.cluster.url(), LIMITS)
            .await?
            .into())
    }

    /// A plain connection to each node, allowed to read on replicas too (`READONLY`).
    pub async fn raw_nodes(&self) -> anyhow::Result<Vec<redis::aio::MultiplexedConnection>> {
        let mut connections = Vec::new();
        for index in 0..self.cluster.len() {
            let Some(url) = self.cluster.node_url(index) else {
                continue;
            };
            let client = redis::Client::open(url)?;
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("READONLY")
                .query_async::<()>(&mut connection)
                .await?;
            connections.push(connection);
        }
        Ok(connections)
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
        token: format!("token-{label}").into_bytes(),
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

/// The references (sender, id) that ack `mail`.
pub fn refs(mail: &[store::StoredMail]) -> Vec<MailRef> {
    mail.iter()
        .map(|stored| MailRef::of(&stored.envelope))
        .collect()
}

/// The references (sender, id) that ack `sent`.
pub fn refs_of(sent: &[Envelope]) -> Vec<MailRef> {
    sent.iter().map(MailRef::of).collect()
}

/// The next event on `receiver`, failing after [`EVENT_TIMEOUT`].
pub async fn next_event(
    receiver: &mut broadcast::Receiver<Broadcast>,
) -> anyhow::Result<Broadcast> {
    Ok(tokio::time::timeout(EVENT_TIMEOUT, receiver.recv()).await??)
}

/// The next events on `receiver`, as many as `expected` holds, checked against it in any
/// order: on a cluster, an announcement (classic pub/sub, carried over the cluster bus) and
/// a mail-waiting hint (sharded pub/sub, straight from a shard's master) arrive on
/// different connections, so their order is not kept.
pub async fn expect_events(
    receiver: &mut broadcast::Receiver<Broadcast>,
    expected: &[Broadcast],
) -> anyhow::Result<()> {
    let mut got = Vec::with_capacity(expected.len());
    for _ in expected {
        got.push(next_event(receiver).await?);
    }
    for event in expected {
        let Some(index) = got.iter().position(|seen| seen == event) else {
            anyhow::bail!("expected {event:?} among {got:?}");
        };
        got.swap_remove(index);
    }
    Ok(())
}

/// A loopback TCP proxy to a local port. After [`BlackholeProxy::blackhole`], every
/// connection it accepted before stays open but passes nothing either way, and never
/// closes: a half-open connection, as after a network partition or a failover behind a
/// virtual IP. Connections accepted later pass normally.
pub struct BlackholeProxy {
    port: u16,
    /// Bumped by `blackhole`; a connection passes bytes while it is what it was at accept.
    generation: Arc<AtomicU64>,
    acceptor: JoinHandle<()>,
}

impl BlackholeProxy {
    /// Starts a proxy to `127.0.0.1:target` on a free port.
    pub async fn start(target: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let generation = Arc::new(AtomicU64::new(0));
        let shared = Arc::clone(&generation);
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let born = shared.load(Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(relay(client_read, server_write, born, Arc::clone(&shared)));
                tokio::spawn(relay(server_read, client_write, born, Arc::clone(&shared)));
            }
        });
        Ok(Self {
            port,
            generation,
            acceptor,
        })
    }

    /// A Redis URL through the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Turns every connection open now into a black hole.
    pub fn blackhole(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for BlackholeProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// Copies `from` to `to` while `generation` is still `born`, then swallows everything.
/// Neither side is ever closed by the proxy, as with a peer that vanished.
async fn relay(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    born: u64,
    generation: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                // Hold `to` open: the other side must not see a close.
                std::future::pending::<()>().await;
            }
            Ok(read) => {
                if generation.load(Ordering::SeqCst) != born {
                    continue;
                }
                if to.write_all(&buffer[..read]).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
