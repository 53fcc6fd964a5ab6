//! The connection layer: the two kinds of deployment ([`Backend`]), the command connection
//! and its replacement after a timeout, retries, TCP settings, and connecting (cluster mode
//! probed with `INFO cluster`).

use std::{
    future::Future,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use proto::MessageId;
use redis::{
    Client, Cmd, ProtocolVersion, PushInfo, RedisFuture, RedisResult, RetryMethod, Script, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    io::tcp::{TcpSettings, socket2},
};
use tokio::sync::{broadcast, watch};

use super::{
    Inner, RedisConfigError, RedisOptions, RedisStore,
    events::{BROADCAST_CAPACITY, handle_cluster_push, run_subscriber, subscribe_channels},
    keys::instance_channel,
    online_index::IndexWriter,
    redact_url, redact_urls,
};
use crate::{ANNOUNCE_CHANNEL, MailLimits, StoreError};

/// How many times an operation is tried when Redis is unreachable or restarting.
const RETRY_ATTEMPTS: u32 = 8;
/// The pause before the second try; it doubles up to [`RETRY_MAX_DELAY`].
pub(super) const RETRY_FIRST_DELAY: Duration = Duration::from_millis(10);
/// The longest pause between two tries.
pub(super) const RETRY_MAX_DELAY: Duration = Duration::from_millis(500);
/// How long one command may wait for its reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one connection attempt may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// TCP keep-alive: the first probe after this much silence, then one per interval, and
/// the connection is dropped after this many unanswered probes.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
#[cfg(target_os = "linux")]
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel drops the connection.
#[cfg(target_os = "linux")]
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write waits for its replicas to confirm it.
const REPLICA_WAIT: Duration = Duration::from_secs(1);

/// The two kinds of Redis deployment, with what it takes to build a command connection.
pub(super) enum Backend {
    /// One server (possibly with replicas behind it).
    Single {
        client: Client,
        manager_config: ConnectionManagerConfig,
    },
    /// A Redis Cluster: every key is routed to the master of its slot.
    Cluster {
        client: ClusterClient,
        /// This instance's sharded channel, which its users' routes name.
        instance: Instance,
    },
}

/// One discovery instance on a cluster: its random id (written into the route records of
/// the users it holds sessions of) and the sharded channel it listens on.
#[derive(Debug, Clone)]
pub(super) struct Instance {
    pub(super) id: String,
}

impl Instance {
    fn random() -> Self {
        let bytes = MessageId::random().0;
        let id = bytes
            .iter()
            .fold(String::with_capacity(32), |mut id, byte| {
                use std::fmt::Write;
                let _ = write!(id, "{byte:02x}");
                id
            });
        Self { id }
    }

    fn channel(&self) -> String {
        instance_channel(&self.id)
    }
}

/// A command connection to either kind of deployment; both multiplex many callers over
/// their sockets and are cheap to clone.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, command: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(command),
            Connection::Cluster(connection) => connection.req_packed_command(command),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The command connection and which one it is, so that of many operations timing out on
/// the same dead connection only the first replaces it.
#[derive(Clone)]
pub(super) struct Commands {
    connection: Connection,
    generation: u64,
}

impl Inner {
    /// The current command connection (a cheap clone of a shared handle).
    fn commands(&self) -> Commands {
        self.commands
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces command connection `generation` (if it is still the current one) with a
    /// fresh one that connects on first use. Used after a reply timed out: the
    /// [`ConnectionManager`] reconnects by itself only when the socket reports an error,
    /// and a half-open connection (Redis gone without a FIN or RST, as after a partition or
    /// a failover behind a virtual IP) reports nothing, so every command on it would time
    /// out forever. On a cluster the fresh connection also reads the slot map anew.
    fn replace_commands(&self, generation: u64) {
        let mut commands = self
            .commands
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if commands.generation != generation {
            return;
        }
        let connection = match &self.backend {
            Backend::Single {
                client,
                manager_config,
            } => ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                .map(Connection::Single),
            Backend::Cluster { client, .. } => Ok(Connection::Cluster(
                client.get_pending_async_connection_with_config(cluster_config()),
            )),
        };
        match connection {
            Ok(connection) => {
                tracing::warn!("redis stopped answering; replaced the command connection");
                *commands = Commands {
                    connection,
                    generation: generation + 1,
                };
            }
            Err(error) => {
                tracing::warn!(%error, "cannot build a new redis command connection");
            }
        }
    }
}

/// The TCP options of every Redis connection: keep-alive probes, and on Linux a user
/// timeout, so the kernel itself closes a connection whose peer vanished (and the
/// connection manager then reconnects), even while no command is waiting on it. Nagle
/// stays as the redis crate's default has it.
fn tcp_settings() -> TcpSettings {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    #[cfg(target_os = "linux")]
    let keepalive = keepalive.with_retries(TCP_KEEPALIVE_RETRIES);
    let settings = TcpSettings::default().set_keepalive(keepalive);
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout(TCP_USER_TIMEOUT);
    settings
}

/// How many times the cluster connection itself retries a request (moving to the new
/// master of a slot after `MOVED`, reconnecting) before the store's own retries see it.
const CLUSTER_RETRIES: u32 = 3;

/// The settings of a cluster command connection built after a timeout.
fn cluster_config() -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
}

/// The URLs in `urls`, separated by commas (blanks around each ignored); an error names
/// what is wrong without printing a password.
fn split_urls(urls: &str) -> Result<Vec<&str>, StoreError> {
    let list: Vec<&str> = urls.split(',').map(str::trim).collect();
    if list.iter().all(|url| url.is_empty()) {
        return Err(RedisConfigError::NoUrl.into());
    }
    if list.iter().any(|url| url.is_empty()) {
        return Err(RedisConfigError::EmptyUrl {
            list: redact_urls(urls),
        }
        .into());
    }
    Ok(list)
}

/// Asks the nodes, in order, until one answers `INFO cluster`; returns whether it runs in
/// cluster mode and which one answered. Fails with the last node's error if none does.
async fn probe_cluster_mode(clients: &[Client]) -> Result<(bool, usize), StoreError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut last_error = None;
    for (index, client) in clients.iter().enumerate() {
        let attempt = async {
            let mut connection = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("INFO")
                .arg("cluster")
                .query_async::<String>(&mut connection)
                .await
        };
        match attempt.await {
            Ok(info) => {
                let cluster = info.lines().any(|line| line.trim() == "cluster_enabled:1");
                return Ok((cluster, index));
            }
            Err(error) => {
                tracing::warn!(%error, "a Redis node did not answer; trying the next");
                last_error = Some(error);
            }
        }
    }
    Err(last_error.map_or_else(|| RedisConfigError::NoUrl.into(), StoreError::Redis))
}

impl RedisStore {
    /// Connects with the default [`RedisOptions`]; see [`RedisStore::connect_with`].
    pub async fn connect(url: &str, limits: MailLimits) -> Result<Self, StoreError> {
        Self::connect_with(url, limits, RedisOptions::default()).await
    }

    /// Connects to the Redis at `urls`: one URL (`redis://host:port/db`, or
    /// `redis://[user]:password@host:port/db` for a Redis that demands a password; the
    /// password is percent-decoded), or several separated by commas, the nodes of one Redis
    /// Cluster. The first node that answers says whether it runs in cluster mode
    /// (`INFO cluster`); if it does, the store runs in cluster mode (every key routed to
    /// its slot's master, sharded pub/sub for mail-waiting hints), else as on one server,
    /// and several URLs for a server that is not a cluster node are refused. Subscribes to
    /// the broadcast channels before it returns. Fails if no node is reachable now, or one
    /// refuses the credentials (`NOAUTH` without a password, `WRONGPASS` with a wrong
    /// one); after that, lost connections are re-established by themselves, with the same
    /// credentials.
    pub async fn connect_with(
        urls: &str,
        limits: MailLimits,
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        let urls = split_urls(urls)?;
        let mut clients = Vec::with_capacity(urls.len());
        for url in &urls {
            let client = Client::open(*url)?;
            clients.push(Client::open(
                client
                    .get_connection_info()
                    .clone()
                    .set_tcp_settings(tcp_settings()),
            )?);
        }
        let (cluster, first) = probe_cluster_mode(&clients).await?;
        if !cluster && clients.len() > 1 {
            return Err(RedisConfigError::NotACluster {
                count: clients.len(),
                url: redact_url(urls[first]),
            }
            .into());
        }
        if cluster {
            Self::connect_cluster(&urls, limits, options).await
        } else {
            let Some(client) = clients.into_iter().next() else {
                return Err(RedisConfigError::NoUrl.into());
            };
            Self::connect_single(client, limits, options).await
        }
    }

    /// [`RedisStore::connect_with`] on one server.
    async fn connect_single(
        client: Client,
        limits: MailLimits,
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let connection =
            ConnectionManager::new_with_config(client.clone(), manager_config.clone()).await?;
        // Subscribe once here, so a subscriber created right after `connect` returns sees
        // everything published from then on, and a bad URL fails now rather than in a task.
        let pubsub = subscribe_channels(&client).await?;
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (subscriptions_sender, subscriptions) = watch::channel(1);
        let subscriber = tokio::spawn(run_subscriber(
            client.clone(),
            pubsub,
            events.clone(),
            subscriptions_sender,
        ));
        let replicas = options.replicas.unwrap_or(0);
        tracing::info!(replicas, "redis backend: a single server");
        Ok(Self {
            inner: Arc::new_cyclic(|store| Inner {
                index: IndexWriter::spawn(store.clone()),
                backend: Backend::Single {
                    client,
                    manager_config,
                },
                commands: RwLock::new(Commands {
                    connection: Connection::Single(connection),
                    generation: 0,
                }),
                limits,
                replicas,
                events,
                subscriptions,
                subscriber: Some(subscriber),
                _cluster_pubsub: None,
            }),
        })
    }

    /// [`RedisStore::connect_with`] on a cluster. Commands go through one cluster
    /// connection (a multiplexed connection per node, the slot map refreshed on `MOVED` and
    /// after failures); pub/sub through a second one speaking RESP3, whose pushes are
    /// turned into events right where they arrive, and which subscribes again by itself
    /// after a reconnect or a change of the slot map: the announcement channel
    /// (`SUBSCRIBE`: a cluster carries classic pub/sub to every node) and this instance's
    /// own sharded channel (`SSUBSCRIBE`), which the route records of its users name.
    async fn connect_cluster(
        urls: &[&str],
        limits: MailLimits,
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        let builder = || {
            ClusterClientBuilder::new(urls.iter().copied())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .tcp_settings(tcp_settings())
                .retries(CLUSTER_RETRIES)
                .min_retry_wait(50)
                .max_retry_wait(500)
        };
        let client = builder().build()?;
        let connection = client.get_async_connection().await?;

        let instance = Instance::random();
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (subscriptions_sender, subscriptions) = watch::channel(0);
        let subscribed = subscriptions_sender.clone();
        let push_events = events.clone();
        let channel = instance.channel();
        let push_channel = channel.clone();
        let pubsub_client = builder()
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(move |push: PushInfo| {
                handle_cluster_push(push, &push_channel, &push_events, &subscriptions_sender);
                Ok::<(), std::convert::Infallible>(())
            })
            .build()?;
        let mut pubsub = pubsub_client.get_async_connection().await?;
        pubsub.subscribe(ANNOUNCE_CHANNEL).await?;
        pubsub.ssubscribe(&channel).await?;
        // The confirmation may or may not have come through the push sender by now; either
        // way the count starts at one, as on a single server.
        subscribed.send_modify(|count| *count = (*count).max(1));
        let replicas = options.replicas.unwrap_or(1);
        tracing::info!(
            nodes = urls.len(),
            replicas,
            instance = %instance.id,
            "redis backend: cluster mode"
        );
        Ok(Self {
            inner: Arc::new_cyclic(|store| Inner {
                index: IndexWriter::spawn(store.clone()),
                backend: Backend::Cluster { client, instance },
                commands: RwLock::new(Commands {
                    connection: Connection::Cluster(connection),
                    generation: 0,
                }),
                limits,
                replicas,
                events,
                subscriptions,
                subscriber: None,
                _cluster_pubsub: Some(pubsub),
            }),
        })
    }

    /// Whether this store runs on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.backend, Backend::Cluster { .. })
    }

    /// This instance's route on a cluster: the id its users' route records name.
    pub(super) fn instance(&self) -> Option<&Instance> {
        match &self.inner.backend {
            Backend::Cluster { instance, .. } => Some(instance),
            Backend::Single { .. } => None,
        }
    }

    /// The limits this store applies.
    pub fn limits(&self) -> MailLimits {
        self.inner.limits
    }

    /// Counts how often the pub/sub connection has (re)subscribed: 1 after `connect`, one
    /// more after every re-subscription (on a cluster: of this instance's sharded channel).
    /// A health check or a test can wait for it to move.
    pub fn subscriptions(&self) -> watch::Receiver<u64> {
        self.inner.subscriptions.clone()
    }

    /// Runs `attempt` with a connection, again after a short pause when the error says a
    /// reconnect or retry may help (the connection manager reconnects on such errors), up
    /// to [`RETRY_ATTEMPTS`] times. A timeout replaces the connection before the next try
    /// ([`Inner::replace_commands`]), so a half-open connection costs one timeout, not
    /// every call from then on.
    pub(super) async fn with_retry<T, F, Fut>(
        &self,
        operation: &'static str,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut delay = RETRY_FIRST_DELAY;
        let mut tries = 1;
        loop {
            let commands = self.inner.commands();
            match attempt(commands.connection).await {
                Ok(value) => return Ok(value),
                Err(error)
                    if tries < RETRY_ATTEMPTS
                        && !matches!(error.retry_method(), RetryMethod::NoRetry) =>
                {
                    tracing::warn!(operation, tries, %error, "redis operation failed; retrying");
                    if error.is_timeout() {
                        self.inner.replace_commands(commands.generation);
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX_DELAY);
                    tries += 1;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Runs one command with retries.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        command: &redis::Cmd,
    ) -> Result<T, StoreError> {
        self.with_retry(operation, |mut connection| async move {
            command.query_async(&mut connection).await
        })
        .await
    }

    /// Runs one script invocation (built by `build`) with retries. The invocation is built
    /// per try because it borrows the script and is consumed by the call.
    pub(super) async fn invoke<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        script: &'static Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        self.with_retry(operation, |mut connection| {
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(*key);
            }
            for arg in args {
                invocation.arg(*arg);
            }
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await
    }

    /// Runs the script `source` (as a plain `EVAL`, so a master new after a failover needs
    /// no script cache) and then `WAIT`s for [`RedisOptions::replicas`] replicas, both in one
    /// pipeline on the connection to the keys' master: `WAIT` covers the writes of the
    /// connection it runs on, which are then this script's and any before it. Fails with
    /// [`StoreError::NotReplicated`] when too few replicas confirm within
    /// [`REPLICA_WAIT`]; the write may then be on the master alone, and the caller's retry
    /// (every replicated script is idempotent) writes it again or finds it there.
    /// With no replicas asked for, it is [`RedisStore::invoke`].
    pub(super) async fn invoke_replicated<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        script: &'static Script,
        source: &'static str,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let wanted = self.inner.replicas;
        if wanted == 0 {
            return self.invoke(operation, script, keys, args).await;
        }
        let mut pipeline = redis::pipe();
        pipeline
            .cmd("EVAL")
            .arg(source)
            .arg(keys.len())
            .arg(keys)
            .arg(args)
            .cmd("WAIT")
            .arg(wanted)
            .arg(u64::try_from(REPLICA_WAIT.as_millis()).unwrap_or(u64::MAX));
        let (value, reached): (T, u32) = self
            .with_retry(operation, |mut connection| {
                let pipeline = &pipeline;
                async move { pipeline.query_async(&mut connection).await }
            })
            .await?;
        if reached < wanted {
            return Err(StoreError::NotReplicated { wanted, reached });
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::{RedisConfigError, StoreError, redact_urls, split_urls};

    #[test]
    fn url_lists_split_on_commas_and_refuse_empty_entries() {
        assert_eq!(
            split_urls(" redis://a:1 ,redis://b:2").ok(),
            Some(vec!["redis://a:1", "redis://b:2"])
        );
        for bad in [
            "",
            " ",
            ",",
            "redis://a:1,,redis://b:2",
            "redis://:secret@a:1,",
        ] {
            match split_urls(bad) {
                Err(StoreError::Config(
                    error @ (RedisConfigError::NoUrl | RedisConfigError::EmptyUrl { .. }),
                )) => {
                    let reason = error.to_string();
                    assert!(reason.contains("URL"), "{bad:?}: {reason}");
                    assert!(!reason.contains("secret"), "{bad:?}: {reason}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(
            redact_urls("redis://:one@a:1, redis://:two@b:2"),
            "redis://***@a:1,redis://***@b:2"
        );
    }
}
