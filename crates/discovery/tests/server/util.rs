//! Helpers: an in-process server on a free port and a minimal control-protocol client.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use discovery::{Config, Metrics};
use proto::{
    Channel, Connection, Envelope, ErrorReply, Identity, MessageId, Push, Registration, Reply,
    Request, RequestFrame, ServerMsg, Username, identity::registration_transcript,
};
use store::{EmbeddedStore, MailLimits, RedisStore, Store, testing::RedisServer};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(10);
pub const SECRET: &[u8] = b"the operator secret";

pub struct Server {
    pub address: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<std::io::Result<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    pub async fn embedded(config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Embedded(
            EmbeddedStore::open(dir.path().join("store.redb"), MailLimits::default()).unwrap(),
        );
        let mut server = Self::start(store, config).await;
        server._dir = Some(dir);
        server
    }

    pub async fn redis(redis: &RedisServer) -> Self {
        let store = Store::Redis(
            RedisStore::connect(&redis.url(), MailLimits::default())
                .await
                .unwrap(),
        );
        Self::start(store, config()).await
    }

    pub async fn start(store: Store, config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(discovery::serve(
            listener,
            store,
            config,
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
        Self {
            address,
            metrics,
            shutdown,
            task,
            _dir: None,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// An instance on one Redis, run on a runtime of its own so that a test can stop it the
/// way a crash does: every task dropped at once, its sockets closed, no session clearing
/// its presence or telling anyone.
pub struct Crashable {
    pub address: SocketAddr,
    runtime: tokio::runtime::Runtime,
}

impl Crashable {
    pub fn start(redis: &RedisServer, config: Config) -> Self {
        let url = redis.url();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let address = runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let address = listener.local_addr().unwrap();
                let store = Store::Redis(
                    RedisStore::connect(&url, MailLimits::default())
                        .await
                        .unwrap(),
                );
                tokio::spawn(discovery::serve(
                    listener,
                    store,
                    config,
                    Arc::new(Metrics::default()),
                    CancellationToken::new(),
                ));
                address
            });
            Self { address, runtime }
        })
        .join()
        .unwrap()
    }

    pub fn crash(self) {
        self.runtime.shutdown_background();
    }
}

pub fn config() -> Config {
    Config {
        operator_secret: Some(SECRET.to_vec()),
        ..Config::default()
    }
}

pub fn name(text: &str) -> Username {
    Username::new(text).unwrap()
}

/// A minimal control-protocol client that keeps pushes aside while waiting for responses.
pub struct Client {
    pub user: Username,
    pub identity: Identity,
    pub connection: Connection<TcpStream>,
    pub nonce: [u8; 32],
    /// The connection's handshake hash, signed into the registration.
    pub channel: [u8; 32],
    /// The key the server presented.
    pub server_key: [u8; 32],
    pub next_id: u64,
    pub pushes: Vec<Push>,
}

impl Client {
    pub async fn connect(address: SocketAddr, user: &str) -> Self {
        Self::connect_as(address, user, Identity::generate()).await
    }

    pub async fn connect_as(address: SocketAddr, user: &str, identity: Identity) -> Self {
        let stream = TcpStream::connect(address).await.unwrap();
        Self::over(stream, user, identity).await
    }

    /// Connects from the loopback address `source` (127.0.0.2, 127.0.0.3, ...), as a
    /// client from another machine would.
    pub async fn connect_from(address: SocketAddr, source: IpAddr, user: &str) -> Self {
        let stream = connect_from(address, source).await;
        Self::over(stream, user, Identity::generate()).await
    }

    async fn over(stream: TcpStream, user: &str, identity: Identity) -> Self {
        let mut connection = Connection::new(stream);
        let secured = connection.client_handshake(WAIT).await.unwrap();
        let nonce = match connection.recv::<ServerMsg>().await.unwrap() {
            Some(ServerMsg::Challenge { nonce }) => nonce,
            other => panic!("expected a challenge, got {other:?}"),
        };
        Self {
            user: name(user),
            identity,
            connection,
            nonce,
            channel: secured.handshake_hash,
            server_key: secured.remote_static,
            next_id: 1,
            pushes: Vec::new(),
        }
    }

    pub async fn register(&mut self) -> Result<Reply, ErrorReply> {
        let transcript = registration_transcript(
            &self.nonce,
            &self.channel,
            &self.user,
            self.identity.public(),
        );
        let request = Request::Register(Registration {
            user: self.user.clone(),
            keys: self.identity.public().clone(),
            listen_ports: vec![40_000],
            signature: self.identity.sign(&transcript),
        });
        self.request(request).await
    }

    pub async fn request(&mut self, request: Request) -> Result<Reply, ErrorReply> {
        let id = self.next_id;
        self.next_id += 1;
        self.connection
            .send(&RequestFrame { id, request })
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(WAIT, self.connection.recv::<ServerMsg>()).await {
                Ok(Ok(Some(ServerMsg::Response { id: got, result }))) => {
                    assert_eq!(got, id, "responses come back with their request's id");
                    return result;
                }
                Ok(Ok(Some(ServerMsg::Push(push)))) => self.pushes.push(push),
                other => panic!("expected a response, got {other:?}"),
            }
        }
    }

    /// Waits for a push matching `wanted`, keeping the others.
    pub async fn push(&mut self, wanted: impl Fn(&Push) -> bool) -> Push {
        if let Some(index) = self.pushes.iter().position(&wanted) {
            return self.pushes.remove(index);
        }
        loop {
            match tokio::time::timeout(WAIT, self.connection.recv::<ServerMsg>()).await {
                Ok(Ok(Some(ServerMsg::Push(push)))) if wanted(&push) => return push,
                Ok(Ok(Some(ServerMsg::Push(push)))) => self.pushes.push(push),
                other => panic!("expected a push, got {other:?}"),
            }
        }
    }

    pub async fn lookup(&mut self, user: &str) -> Result<Reply, ErrorReply> {
        self.request(Request::Lookup { user: name(user) }).await
    }

    pub fn seal_for(&self, to: &impl Keyed, body: &str) -> Envelope {
        Channel::new(
            &self.identity,
            &self.user,
            to.user(),
            to.identity().public(),
        )
        .unwrap()
        .seal(MessageId::random(), body, proto::now_ms())
        .unwrap()
    }

    /// Reads until the server closes, returning the closing reason it sent, if any.
    pub async fn closed_with(connection: &mut Connection<TcpStream>) -> Option<ErrorReply> {
        let mut reason = None;
        loop {
            match tokio::time::timeout(WAIT, connection.recv::<ServerMsg>()).await {
                Ok(Ok(Some(ServerMsg::Closing(why)))) => reason = Some(why),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return reason,
                Err(_) => panic!("the server did not close the connection"),
            }
        }
    }
}

/// A connection to `address` from the local address `source` (any port).
pub async fn connect_from(address: SocketAddr, source: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(address).await.unwrap()
}

pub fn online(reply: Result<Reply, ErrorReply>) -> bool {
    match reply.unwrap() {
        Reply::User(info) => info.online,
        other => panic!("{other:?}"),
    }
}

/// Writes `bytes` raw onto the stream after a valid handshake (so they are not a sealed
/// frame) and returns the closing reason.
pub async fn after_hello_send(address: SocketAddr, bytes: &[u8]) -> Option<ErrorReply> {
    let mut connection = after_handshake(address).await;
    connection.get_mut().write_all(bytes).await.unwrap();
    Client::closed_with(&mut connection).await
}

/// Sends `body` as one sealed message body after a valid handshake (an authentic frame
/// that is not a valid request) and returns the closing reason.
pub async fn after_hello_send_body(address: SocketAddr, body: &[u8]) -> Option<ErrorReply> {
    let mut connection = after_handshake(address).await;
    connection.send_body(body).await.unwrap();
    Client::closed_with(&mut connection).await
}

async fn after_handshake(address: SocketAddr) -> Connection<TcpStream> {
    let stream = TcpStream::connect(address).await.unwrap();
    let mut connection = Connection::new(stream);
    connection.client_handshake(WAIT).await.unwrap();
    assert!(matches!(
        connection.recv::<ServerMsg>().await.unwrap(),
        Some(ServerMsg::Challenge { .. })
    ));
    connection
}

impl Client {
    /// Closes this client's connection and waits until `observer` sees it offline.
    pub async fn disconnect(self, observer: &mut Client) -> Offline {
        let user = self.user.clone();
        drop(self.connection);
        let deadline = tokio::time::Instant::now() + WAIT;
        while online(observer.lookup(user.as_str()).await) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user} stayed online"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Offline {
            user,
            identity: self.identity,
        }
    }
}

/// A second connection registered as `first`'s user, with `first`'s key (a client that
/// reconnected before the server saw its old connection close).
pub async fn second_session(address: SocketAddr, first: &Client) -> Client {
    let mut second = Client::connect(address, first.user.as_str()).await;
    let transcript = proto::identity::registration_transcript(
        &second.nonce,
        &second.channel,
        &first.user,
        first.identity.public(),
    );
    let reply = second
        .request(Request::Register(proto::Registration {
            user: first.user.clone(),
            keys: first.identity.public().clone(),
            listen_ports: vec![40_001],
            signature: first.identity.sign(&transcript),
        }))
        .await
        .unwrap();
    assert!(matches!(reply, Reply::Registered { .. }));
    second
}

/// A client whose connection is closed, keeping its identity.
pub struct Offline {
    pub user: Username,
    pub identity: Identity,
}

impl Offline {
    pub async fn reconnect(self, address: SocketAddr) -> Client {
        Client::connect_as(address, self.user.as_str(), self.identity).await
    }

    /// Reconnects from the loopback address `source`.
    pub async fn reconnect_from(self, address: SocketAddr, source: IpAddr) -> Client {
        let stream = connect_from(address, source).await;
        Client::over(stream, self.user.as_str(), self.identity).await
    }
}

/// Anything with a name and an identity, online or not.
pub trait Keyed {
    fn user(&self) -> &Username;
    fn identity(&self) -> &Identity;
}

impl Keyed for Client {
    fn user(&self) -> &Username {
        &self.user
    }
    fn identity(&self) -> &Identity {
        &self.identity
    }
}

impl Keyed for Offline {
    fn user(&self) -> &Username {
        &self.user
    }
    fn identity(&self) -> &Identity {
        &self.identity
    }
}
