//! The peer runtime: [`start`] returns a [`Client`] (commands) and an [`Events`] stream.
//!
//! One task runs the event loop, a `biased` `select!` with cancellation first, over: the P2P
//! listener (each accepted connection is served by a tracked task, see [`crate::inbox`]),
//! the control actor's events (online → fetch mail, sync blocks, flush the outbox; pushes:
//! mail waiting, announcements), the user's commands, results of tracked worker tasks, the
//! slow mail timer and the mute timer. Slow work (network) never runs on the loop itself:
//! it is spawned on the [`TaskTracker`] and reports back over an internal channel, so a
//! misbehaving peer can stall only its own task.
//!
//! Outgoing messages go to one task per recipient ([`crate::outgoing`]), which keeps a link
//! and pipelines them over it in order. State writes are group-committed
//! ([`durable::GroupWriter`]): a send's outbox record, the receiver's stored batch and the results
//! of many messages share commits.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use proto::{
    Channel, ErrorReply, Identity, MessageId, PublicKeys, Push, Reply, Request, UserInfo, Username,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    control::{self, ControlConfig, ControlError, ControlEvent, ControlHandle},
    delivery::DeliveryStatus,
    inbox,
    outgoing::{self, Job},
    state::{HistoryEntry, InboundMessage, OutboxEntry, State, StateError},
};

/// How long seen ids are remembered, and so the oldest message accepted (mail lives up to
/// 30 days in a mailbox; this leaves a margin).
pub const SEEN_RETENTION_MS: u64 = 40 * 24 * 3600 * 1000;

/// The most user commands handled in one turn of the event loop (their sends share one
/// write job).
const MAX_COMMANDS_PER_TURN: usize = 1024;

/// The first wait before fetching again mail that was left in the mailbox because it
/// could not be taken (a full disk, say): sooner than the slow poll, so the mail arrives
/// soon after the cause goes away.
const FETCH_RETRY_MIN: Duration = Duration::from_secs(1);

/// The most inbound peer connections served at once.
pub const MAX_INBOUND_CONNECTIONS: usize = 256;

/// Everything the runtime needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The discovery server (`host:port`).
    pub server: String,
    /// Who we are.
    pub user: Username,
    /// This user's data dir (created 0700 if missing): identity, state.
    pub data_dir: PathBuf,
    /// Where the P2P listener binds (port 0: any free port).
    pub listen: SocketAddr,
    /// The port to advertise instead of the listener's (tests use a dead port to simulate
    /// an unreachable peer).
    pub advertise_port: Option<u16>,
    /// Heartbeat interval until the server says otherwise.
    pub heartbeat_interval: Duration,
    /// How long without a pong before the control connection is dead.
    pub pong_timeout: Duration,
    /// How often mail is fetched without a push.
    pub mail_poll_interval: Duration,
    /// How long to wait for a direct ack before falling back to the mailbox.
    pub ack_timeout: Duration,
    /// How long a direct connection attempt may take.
    pub connect_timeout: Duration,
    /// Reconnect backoff, first step.
    pub backoff_min: Duration,
    /// Reconnect backoff, cap.
    pub backoff_max: Duration,
}

impl Config {
    /// The defaults of design.md: heartbeat 10 s, pong timeout 10 s, ack timeout 5 s, mail
    /// re-checked every 60 s, listener on a free port of every interface.
    pub fn new(server: impl Into<String>, user: Username, data_dir: PathBuf) -> Self {
        Self {
            server: server.into(),
            user,
            data_dir,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            advertise_port: None,
            heartbeat_interval: Duration::from_secs(10),
            pong_timeout: control::DEFAULT_PONG_TIMEOUT,
            mail_poll_interval: Duration::from_secs(60),
            ack_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] proto::IdentityError),
    /// The state could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
    /// The P2P listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Local state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The discovery server could not answer.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// No such user at the server.
    #[error("no user named {0} is known to the discovery server")]
    UnknownUser(Username),
    /// A mute needs a positive number of seconds.
    #[error("the mute duration must be a positive number of seconds")]
    BadDuration,
    /// The user is not muted.
    #[error("{0} is not muted")]
    NotMuted(Username),
    /// The user is not blocked.
    #[error("{0} is not blocked")]
    NotBlocked(Username),
    /// The user is already blocked.
    #[error("{0} is already blocked")]
    AlreadyBlocked(Username),
    /// The command names ourselves.
    #[error("that would be yourself")]
    Yourself,
    /// The server's keys for the user do not verify.
    #[error("the discovery server returned invalid keys for {user}: {reason}")]
    BadKeys {
        /// Whose.
        user: Username,
        /// Why.
        reason: String,
    },
    /// The message has no text.
    #[error("a message needs some text")]
    EmptyMessage,
    /// The message is too long.
    #[error("a message has at most {max} bytes (this one has {len})")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The runtime has stopped.
    #[error("the client is shutting down")]
    ShuttingDown,
    /// Not online within the time asked.
    #[error("not connected to the discovery server: {0}")]
    NotOnline(String),
}

/// The connection to the discovery server, as the user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// First attempt under way.
    Connecting,
    /// Registered.
    Online {
        /// The address the server sees.
        observed: SocketAddr,
    },
    /// Lost; retrying.
    Offline {
        /// Why.
        reason: String,
    },
    /// Refused for good (name bound to another key, ...): the client cannot go on.
    Fatal(ErrorReply),
}

/// Who is online, as the server lists them: the first users by name, and how many more
/// are online beyond them (0 when the list is whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineUsers {
    /// Online users, sorted by name.
    pub users: Vec<Username>,
    /// How many more are online than listed.
    pub more: u64,
}

/// Everything the user is told about, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message to show. Call [`Client::mark_shown`] once it is shown; until then it is
    /// shown again at the next start.
    Message(InboundMessage),
    /// A mute ended (timer or `unmute`); `held` messages from `user` follow as
    /// [`Event::Message`]s.
    MuteEnded {
        /// Whose mute.
        user: Username,
        /// How many messages arrived meanwhile.
        held: usize,
    },
    /// A message from the outbox got a result in the background.
    Delivery {
        /// The message.
        id: MessageId,
        /// The recipient.
        to: Username,
        /// The result.
        status: DeliveryStatus,
    },
    /// An operator announcement.
    Announcement {
        /// The text.
        text: String,
        /// When it was published.
        at_ms: u64,
    },
    /// Registered with the discovery server (first time or after a reconnect).
    Online {
        /// The address the server sees.
        observed: SocketAddr,
    },
    /// The control connection was lost; reconnecting.
    Offline {
        /// Why.
        reason: String,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// Registration refused for good.
    Fatal(ErrorReply),
    /// A peer's key differs from the pinned one: its messages are refused until `trust`.
    KeyChanged {
        /// Whose key.
        user: Username,
        /// The pinned fingerprint.
        pinned: String,
        /// The fingerprint now offered.
        offered: String,
    },
    /// An incoming message was refused.
    Refused {
        /// The claimed sender.
        from: Username,
        /// Why.
        reason: String,
    },
    /// A user came online or went offline (if the server tells).
    Presence {
        /// Who.
        user: Username,
        /// Online now.
        online: bool,
    },
}

/// What `whois` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoisReport {
    /// Whom.
    pub user: Username,
    /// My own fingerprint.
    pub my_fingerprint: String,
    /// The fingerprint pinned here, if any.
    pub pinned_fingerprint: Option<String>,
    /// The fingerprint the server has now, if it could be asked.
    pub server_fingerprint: Option<String>,
    /// The safety number of me and the user (with the pinned keys, else the server's).
    pub safety_number: Option<String>,
    /// Whether the server's keys differ from the pinned ones.
    pub key_changed: bool,
    /// Online now (per the server).
    pub online: Option<bool>,
    /// When the server last heard from the user.
    pub last_seen_ms: Option<u64>,
}

/// The result of a `send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReport {
    /// The message id.
    pub id: MessageId,
    /// The recipient.
    pub to: Username,
    /// What happened.
    pub status: DeliveryStatus,
}

type Reply_<T> = oneshot::Sender<Result<T, ClientError>>;

enum Command {
    Send {
        to: Username,
        body: String,
        reply: Reply_<SendReport>,
    },
    List {
        reply: Reply_<OnlineUsers>,
    },
    Block {
        user: Username,
        reply: Reply_<()>,
    },
    Unblock {
        user: Username,
        reply: Reply_<()>,
    },
    Blocked {
        reply: Reply_<Vec<Username>>,
    },
    Mute {
        user: Username,
        seconds: u64,
        reply: Reply_<u64>,
    },
    Unmute {
        user: Username,
        reply: Reply_<()>,
    },
    Whois {
        user: Username,
        reply: Reply_<WhoisReport>,
    },
    Trust {
        user: Username,
        reply: Reply_<String>,
    },
    History {
        user: Username,
        limit: usize,
        reply: Reply_<Vec<HistoryEntry>>,
    },
    Shown {
        /// (id, history position) of each message shown.
        shown: Vec<(MessageId, u64)>,
        reply: Reply_<()>,
    },
}

/// Channels cached per peer and key pair.
type ChannelCache = Mutex<HashMap<(Username, [u8; 32], [u8; 32]), Arc<Channel>>>;

/// Results that tracked tasks report back to the loop.
pub(crate) enum Internal {
    /// A message was stored (and acked); show it unless held by a mute.
    Received(InboundMessage),
    /// Something to tell the user as is.
    Notify(Event),
    /// A message's result is recorded and reported: it may be retried from the outbox again.
    Finished(MessageId),
    /// A mail fetch finished.
    FetchDone(inbox::Fetched),
    /// Mutes changed: re-arm the timer.
    MutesChanged,
    /// Keys were re-pinned: retry the user's outbox, open the mail held from them.
    Trusted(Username),
}

/// What every task of one runtime shares.
pub(crate) struct Context {
    pub(crate) me: Username,
    pub(crate) identity: Arc<Identity>,
    pub(crate) state: State,
    pub(crate) control: ControlHandle,
    pub(crate) to_loop: mpsc::UnboundedSender<Internal>,
    pub(crate) config: Config,
    /// Raised at every reconnect: links kept from an earlier generation are dropped.
    pub(crate) link_generation: AtomicU64,
    channels: ChannelCache,
    /// The server's keys for senders not pinned or not matching the pinned keys, kept
    /// briefly so junk claiming one sender costs one lookup, not one per envelope (see
    /// [`inbox`]).
    pub(crate) server_keys: inbox::ServerKeys,
    /// Envelopes refused before anything in them authenticated: counted, and logged at the
    /// 1st, 2nd, 4th, 8th... (never shown as an event naming the claimed sender).
    pub(crate) unauthenticated: AtomicU64,
}

impl Context {
    /// The sealing channel with `peer` under `keys` (cached: derivation costs a DH).
    pub(crate) fn channel(
        &self,
        peer: &Username,
        keys: &PublicKeys,
    ) -> Result<Arc<Channel>, proto::SealError> {
        let key = (peer.clone(), keys.identity, keys.exchange);
        if let Ok(cache) = self.channels.lock()
            && let Some(channel) = cache.get(&key)
        {
            return Ok(channel.clone());
        }
        let channel = Arc::new(Channel::new(&self.identity, &self.me, peer, keys)?);
        if let Ok(mut cache) = self.channels.lock() {
            cache.insert(key, channel.clone());
        }
        Ok(channel)
    }

    /// Looks `user` up at the server.
    pub(crate) async fn lookup(&self, user: &Username) -> Result<UserInfo, ClientError> {
        match self
            .control
            .request(Request::Lookup { user: user.clone() })
            .await
        {
            Ok(Reply::User(info)) => Ok(info),
            Ok(_) => Err(ControlError::Unexpected.into()),
            Err(error) if error.code() == Some(proto::ErrorCode::UnknownUser) => {
                Err(ClientError::UnknownUser(user.clone()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Tells the user something.
    pub(crate) fn notify(&self, event: Event) {
        let _ = self.to_loop.send(Internal::Notify(event));
    }

    /// Logs a local state failure and tells the user.
    pub(crate) fn report_state_error(&self, error: StateError) {
        tracing::error!(%error, "state error");
        self.notify(state_error_event(&self.me, &error));
    }
}

/// The event telling the user that local state failed.
fn state_error_event(me: &Username, error: &StateError) -> Event {
    Event::Refused {
        from: me.clone(),
        reason: format!("local state error: {error}"),
    }
}

/// A handle on a running runtime. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    me: Username,
    fingerprint: String,
    local_addr: SocketAddr,
    new_identity: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.me)
    }
}

/// The events of one runtime, in order.
#[derive(Debug)]
pub struct Events {
    receiver: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// The next event; `None` once the runtime has stopped and all events were taken.
    pub async fn recv(&mut self) -> Option<Event> {
        self.receiver.recv().await
    }

    /// An event if one is ready now.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.receiver.try_recv().ok()
    }
}

/// Starts a runtime: loads (or creates) the identity and state in `config.data_dir`, binds
/// the P2P listener and connects to the discovery server in the background. Everything
/// stops when `shutdown` is cancelled (or [`Client::shutdown`] is called).
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> Result<(Client, Events), StartError> {
    start_with(config, shutdown, State::open).await
}

/// [`start`] with the state opened by `open_state` (given the data dir), so tests can put it
/// over a storage backend of their own (`crate::testing`).
pub(crate) async fn start_with(
    config: Config,
    shutdown: CancellationToken,
    open_state: impl FnOnce(&Path) -> Result<State, StateError>,
) -> Result<(Client, Events), StartError> {
    proto::identity::create_private_dir(&config.data_dir)?;
    proto::identity::check_private(&config.data_dir, 0o700)?;
    // The state file's lock first: a second process on this data dir stops here, before
    // it could race the first one to create the identity.
    let state = open_state(&config.data_dir)?;
    let (identity, new_identity) = Identity::load_or_create(&config.data_dir)?;
    let identity = Arc::new(identity);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let tracker = TaskTracker::new();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let control = control::spawn(
        ControlConfig {
            server: config.server.clone(),
            user: config.user.clone(),
            listen_port: config.advertise_port.unwrap_or(local_addr.port()),
            pong_timeout: config.pong_timeout,
            heartbeat_interval: config.heartbeat_interval,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
        },
        identity.clone(),
        control_tx,
        shutdown.clone(),
        &tracker,
    );
    let (to_loop, internal_rx) = mpsc::unbounded_channel();
    let (commands_tx, commands_rx) = mpsc::channel(64);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (status_tx, status_rx) = watch::channel(Status::Connecting);
    let fingerprint = identity.public().fingerprint();
    let context = Arc::new(Context {
        me: config.user.clone(),
        identity,
        state,
        control,
        to_loop,
        config: config.clone(),
        link_generation: AtomicU64::new(0),
        channels: Mutex::new(HashMap::new()),
        server_keys: inbox::ServerKeys::default(),
        unauthenticated: AtomicU64::new(0),
    });
    let event_loop = EventLoop {
        context,
        listener,
        control_rx,
        commands_rx,
        internal_rx,
        events: events_tx,
        status: status_tx,
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        recipients: HashMap::new(),
        in_flight: HashMap::new(),
        passed_over: HashMap::new(),
        unrecorded: Vec::new(),
        inbound_slots: Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_CONNECTIONS)),
        refused_connections: 0,
        fetching: false,
        fetch_again: false,
        fetch_retry_at: None,
        fetch_retry: control::Backoff::new(
            FETCH_RETRY_MIN,
            config.mail_poll_interval.max(FETCH_RETRY_MIN),
        ),
        online: false,
    };
    tracker.spawn(event_loop.run());
    Ok((
        Client {
            commands: commands_tx,
            status: status_rx,
            shutdown,
            tracker,
            me: config.user,
            fingerprint,
            local_addr,
            new_identity,
        },
        Events {
            receiver: events_rx,
        },
    ))
}

impl Client {
    /// Who this client is.
    pub fn user(&self) -> &Username {
        &self.me
    }

    /// This client's key fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether the identity was created by this start.
    pub fn is_new_identity(&self) -> bool {
        self.new_identity
    }

    /// The P2P listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The connection status now, and its changes.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Waits until registered, at most `timeout`. A fatal refusal returns at once.
    pub async fn wait_online(&self, timeout: Duration) -> Result<SocketAddr, ClientError> {
        let mut status = self.status.clone();
        let wait = async {
            loop {
                let current = status.borrow_and_update().clone();
                match current {
                    Status::Online { observed } => return Ok(observed),
                    Status::Fatal(reply) => return Err(ClientError::NotOnline(reply.to_string())),
                    _ => {}
                }
                if status.changed().await.is_err() {
                    return Err(ClientError::ShuttingDown);
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => {
                let reason = match &*self.status.borrow() {
                    Status::Offline { reason } => reason.clone(),
                    _ => format!("no registration within {timeout:?}"),
                };
                Err(ClientError::NotOnline(reason))
            }
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply_<T>) -> Command) -> Result<T, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| ClientError::ShuttingDown)?;
        answer.await.map_err(|_| ClientError::ShuttingDown)?
    }

    /// Sends `body` to `to`: directly if possible, else through the mailbox. Returns once
    /// the message is delivered, queued or failed (a failure that can be retried stays in
    /// the outbox and is retried on reconnect).
    pub async fn send(&self, to: &Username, body: &str) -> Result<SendReport, ClientError> {
        self.submit_send(to, body).await?.await
    }

    /// [`Client::send`] in two steps: the returned future's creation takes the message
    /// in line (so messages submitted one after another go out, and are recorded, in that
    /// order), and awaiting it waits for the message's result. For callers that must not
    /// wait for one message before taking the next (the interactive prompt).
    pub async fn submit_send(
        &self,
        to: &Username,
        body: &str,
    ) -> Result<impl Future<Output = Result<SendReport, ClientError>> + use<>, ClientError> {
        let (to, body) = (to.clone(), body.to_owned());
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Send { to, body, reply })
            .await
            .map_err(|_| ClientError::ShuttingDown)?;
        Ok(async move { answer.await.map_err(|_| ClientError::ShuttingDown)? })
    }

    /// Users online now (the server may list only the first of them, and count the rest).
    pub async fn list(&self) -> Result<OnlineUsers, ClientError> {
        self.call(|reply| Command::List { reply }).await
    }

    /// Blocks `user` here and at the server.
    pub async fn block(&self, user: &Username) -> Result<(), ClientError> {
        let user = user.clone();
        self.call(|reply| Command::Block { user, reply }).await
    }

    /// Unblocks `user` here and at the server.
    pub async fn unblock(&self, user: &Username) -> Result<(), ClientError> {
        let user = user.clone();
        self.call(|reply| Command::Unblock { user, reply }).await
    }

    /// The blocked users.
    pub async fn blocked(&self) -> Result<Vec<Username>, ClientError> {
        self.call(|reply| Command::Blocked { reply }).await
    }

    /// Mutes `user` for `seconds`; returns when the mute ends (ms since the epoch).
    pub async fn mute(&self, user: &Username, seconds: u64) -> Result<u64, ClientError> {
        let user = user.clone();
        self.call(|reply| Command::Mute {
            user,
            seconds,
            reply,
        })
        .await
    }

    /// Ends the mute of `user` now; held messages follow as events.
    pub async fn unmute(&self, user: &Username) -> Result<(), ClientError> {
        let user = user.clone();
        self.call(|reply| Command::Unmute { user, reply }).await
    }

    /// Fingerprints and safety number of `user`.
    pub async fn whois(&self, user: &Username) -> Result<WhoisReport, ClientError> {
        let user = user.clone();
        self.call(|reply| Command::Whois { user, reply }).await
    }

    /// Pins the keys the server has for `user` now; returns their fingerprint.
    pub async fn trust(&self, user: &Username) -> Result<String, ClientError> {
        let user = user.clone();
        self.call(|reply| Command::Trust { user, reply }).await
    }

    /// The last `limit` messages with `user`, oldest first.
    pub async fn history(
        &self,
        user: &Username,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, ClientError> {
        let user = user.clone();
        self.call(|reply| Command::History { user, limit, reply })
            .await
    }

    /// Records that these messages were shown, so they are not shown again at the next
    /// start: all in one write, so a display that shows many messages at once (everything
    /// already arrived) marks them with one commit. Call it only once they are shown.
    /// Returns once the marks are stored.
    pub async fn mark_shown<'a>(
        &self,
        shown: impl IntoIterator<Item = &'a InboundMessage>,
    ) -> Result<(), ClientError> {
        let shown = shown
            .into_iter()
            .map(|message| (message.id, message.seq))
            .collect();
        self.call(|reply| Command::Shown { shown, reply }).await
    }

    /// Stops the runtime and waits (at most `timeout`) for its tasks to finish.
    pub async fn shutdown(&self, timeout: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(timeout, self.tracker.wait()).await;
    }
}

struct EventLoop {
    context: Arc<Context>,
    listener: TcpListener,
    control_rx: mpsc::UnboundedReceiver<ControlEvent>,
    commands_rx: mpsc::Receiver<Command>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    events: mpsc::UnboundedSender<Event>,
    status: watch::Sender<Status>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The queue of each recipient's delivery task ([`crate::outgoing`]).
    recipients: HashMap<Username, mpsc::UnboundedSender<Job>>,
    /// Messages being delivered or waiting to be, so an outbox flush does not repeat them.
    in_flight: HashMap<MessageId, Username>,
    /// Messages still in flight that an outbox flush passed over, by recipient: once the
    /// last of a recipient's has finished, that recipient's outbox is flushed again, once
    /// (a result is answered before it is recorded, so a `trust` right after a refusal can
    /// come before the refused message is finished; it must still go).
    passed_over: HashMap<Username, HashSet<MessageId>>,
    /// Sends of this loop turn, not yet recorded: [`EventLoop::record_sends`] records them
    /// in one write job and hands them to their recipients' tasks.
    unrecorded: Vec<(OutboxEntry, Reply_<SendReport>)>,
    /// Caps concurrent inbound peer connections.
    inbound_slots: Arc<tokio::sync::Semaphore>,
    /// Inbound connections refused at the cap so far.
    refused_connections: u64,
    fetching: bool,
    fetch_again: bool,
    /// When to fetch again after mail was left in the mailbox (it could not be stored).
    fetch_retry_at: Option<Instant>,
    /// The wait before that fetch; doubles while mail keeps being left, up to the poll
    /// interval.
    fetch_retry: control::Backoff,
    online: bool,
}

/// When a wall-clock time (ms since the epoch) comes, as a monotonic instant.
fn instant_at(wall_ms: u64, now_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(wall_ms.saturating_sub(now_ms))
}

impl EventLoop {
    async fn run(mut self) {
        self.show_unshown_at_start();
        let mut mail_timer = tokio::time::interval(self.context.config.mail_poll_interval);
        mail_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut mute_deadline = self.next_mute_deadline();
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, addr)) => match self.inbound_slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            let context = self.context.clone();
                            let shutdown = self.shutdown.clone();
                            self.tracker.spawn(async move {
                                inbox::serve(stream, addr, context, shutdown).await;
                                drop(slot);
                            });
                        }
                        // At the cap, new connections are closed at once: a flood of
                        // connections cannot exhaust this process's file descriptors. Logged
                        // at the 1st, 2nd, 4th, 8th... refusal, so the flood cannot flood
                        // the log either.
                        Err(_) => {
                            self.refused_connections += 1;
                            if self.refused_connections.is_power_of_two() {
                                tracing::warn!(%addr, total = self.refused_connections, "too many peer connections; refused");
                            }
                        }
                    },
                    Err(error) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(event) = self.control_rx.recv() => self.handle_control(event),
                Some(internal) = self.internal_rx.recv() => {
                    if self.handle_internal(internal) {
                        mute_deadline = self.next_mute_deadline();
                    }
                }
                Some(command) = self.commands_rx.recv() => {
                    // Commands already waiting are handled in the same turn, so the sends
                    // among them are recorded by one write job.
                    let mut mutes_changed = self.handle_command(command);
                    for _ in 1..MAX_COMMANDS_PER_TURN {
                        let Ok(command) = self.commands_rx.try_recv() else { break };
                        mutes_changed |= self.handle_command(command);
                    }
                    self.record_sends();
                    if mutes_changed {
                        mute_deadline = self.next_mute_deadline();
                    }
                }
                _ = mail_timer.tick() => {
                    if self.online {
                        self.fetch_mail();
                        self.flush_outbox(None);
                    }
                }
                () = sleep_until_opt(self.fetch_retry_at) => {
                    self.fetch_retry_at = None;
                    if self.online {
                        self.fetch_mail();
                    }
                }
                () = sleep_until_opt(mute_deadline) => {
                    self.end_mutes();
                    mute_deadline = self.next_mute_deadline();
                }
            }
        }
        tracing::debug!("event loop stopped");
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn report_state_error(&self, error: StateError) {
        tracing::error!(%error, "state error");
        self.emit(state_error_event(&self.context.me, &error));
    }

    fn next_mute_deadline(&self) -> Option<Instant> {
        match self.context.state.next_mute_end() {
            Ok(end) => end.map(|end| instant_at(end, proto::now_ms())),
            Err(error) => {
                self.report_state_error(error);
                None
            }
        }
    }

    /// Shows what was stored but not shown before the last exit; releases mutes that ended
    /// while the client was not running.
    fn show_unshown_at_start(&mut self) {
        // Ids older than the retention are refused on arrival anyway; forget them.
        if let Err(error) = self
            .context
            .state
            .prune_seen(proto::now_ms(), SEEN_RETENTION_MS)
        {
            self.report_state_error(error);
        }
        let already = self.end_mutes();
        let unshown = match self.context.state.unshown() {
            Ok(unshown) => unshown,
            Err(error) => return self.report_state_error(error),
        };
        let now = proto::now_ms();
        let mut released: Vec<Username> = Vec::new();
        for message in unshown {
            if !message.while_muted {
                self.emit(Event::Message(message));
            } else if !matches!(
                self.context.state.muted_until(&message.from, now),
                Ok(Some(_))
            ) && !released.contains(&message.from)
                && !already.contains(&message.from)
            {
                released.push(message.from.clone());
            }
        }
        for user in released {
            self.release_held(&user);
        }
    }

    fn end_mutes(&mut self) -> Vec<Username> {
        match self.context.state.take_ended_mutes(proto::now_ms()) {
            Ok(ended) => {
                ended.iter().for_each(|user| self.release_held(user));
                ended
            }
            Err(error) => {
                self.report_state_error(error);
                Vec::new()
            }
        }
    }

    /// Shows the messages a mute of `user` held, after a one-line summary; unless the user
    /// has blocked `user` since, in which case they stay in the history, unshown.
    fn release_held(&mut self, user: &Username) {
        let held: Vec<InboundMessage> = match self.context.state.unshown() {
            Ok(unshown) => unshown
                .into_iter()
                .filter(|message| &message.from == user && message.while_muted)
                .collect(),
            Err(error) => return self.report_state_error(error),
        };
        match self.context.state.is_blocked(user) {
            Ok(false) => {}
            Ok(true) => {
                // Not shown, and not offered again at every start: marked as handled.
                let marks = held
                    .iter()
                    .map(|message| (message.id, message.seq))
                    .collect();
                let marked = self.context.state.submit_shown(marks);
                self.tracker.spawn(async move {
                    if let Err(error) = marked.await {
                        tracing::warn!(%error, "could not mark a blocked user's held messages");
                    }
                });
                return;
            }
            Err(error) => return self.report_state_error(error),
        }
        self.emit(Event::MuteEnded {
            user: user.clone(),
            held: held.len(),
        });
        for message in held {
            self.emit(Event::Message(message));
        }
    }

    fn handle_control(&mut self, event: ControlEvent) {
        match event {
            ControlEvent::Online { observed, .. } => {
                self.online = true;
                self.status.send_replace(Status::Online { observed });
                self.emit(Event::Online { observed });
                self.fetch_mail();
                self.sync_blocks();
                self.flush_outbox(None);
            }
            ControlEvent::Offline { reason, retry_in } => {
                // The user hears once that the server is gone, not at every retry.
                let first = self.online || matches!(*self.status.borrow(), Status::Connecting);
                self.online = false;
                // Kept links may point at peers that moved; start fresh after a reconnect.
                self.context.link_generation.fetch_add(1, Ordering::Relaxed);
                self.status.send_replace(Status::Offline {
                    reason: reason.clone(),
                });
                if first {
                    self.emit(Event::Offline { reason, retry_in });
                } else {
                    tracing::debug!(%reason, ?retry_in, "still offline");
                }
            }
            ControlEvent::Fatal(reply) => {
                self.online = false;
                self.status.send_replace(Status::Fatal(reply.clone()));
                self.emit(Event::Fatal(reply));
            }
            ControlEvent::Push(Push::MailWaiting) => self.fetch_mail(),
            ControlEvent::Push(Push::Announcement { text, at_ms }) => {
                self.emit(Event::Announcement { text, at_ms });
            }
            ControlEvent::Push(Push::Presence { user, online }) => {
                self.emit(Event::Presence { user, online });
            }
        }
    }

    /// Returns whether mutes changed.
    fn handle_internal(&mut self, internal: Internal) -> bool {
        match internal {
            Internal::Received(message) => {
                // The mute decision was made when the message was stored.
                if !message.while_muted {
                    self.emit(Event::Message(message));
                }
            }
            Internal::Notify(event) => self.emit(event),
            Internal::Finished(id) => {
                if let Some(to) = self.in_flight.remove(&id)
                    && let Some(waiting) = self.passed_over.get_mut(&to)
                    && waiting.remove(&id)
                    && waiting.is_empty()
                {
                    self.passed_over.remove(&to);
                    self.flush_outbox(Some(&to));
                }
            }
            Internal::FetchDone(fetched) => {
                self.fetching = false;
                match fetched {
                    inbox::Fetched::Done => self.fetch_retry.reset(),
                    inbox::Fetched::LeftForLater => {
                        let wait = self.fetch_retry.next_delay(0);
                        self.fetch_retry_at = Some(Instant::now() + wait);
                    }
                }
                if std::mem::take(&mut self.fetch_again) {
                    self.fetch_mail();
                }
            }
            Internal::MutesChanged => return true,
            Internal::Trusted(user) => {
                self.flush_outbox(Some(&user));
                let context = self.context.clone();
                self.tracker
                    .spawn(async move { inbox::reopen_held(&context, &user).await });
            }
        }
        false
    }

    fn fetch_mail(&mut self) {
        if self.fetching {
            self.fetch_again = true;
            return;
        }
        self.fetching = true;
        let context = self.context.clone();
        self.tracker.spawn(async move {
            let fetched = inbox::fetch_mail(&context).await;
            let _ = context.to_loop.send(Internal::FetchDone(fetched));
        });
    }

    fn sync_blocks(&self) {
        let pending = match self.context.state.unsynced_blocks() {
            Ok(pending) if !pending.is_empty() => pending,
            Ok(_) => return,
            Err(error) => return self.report_state_error(error),
        };
        let context = self.context.clone();
        self.tracker.spawn(async move {
            for (user, active) in pending {
                sync_block(&context, &user, active).await;
            }
        });
    }

    fn flush_outbox(&mut self, only: Option<&Username>) {
        let outbox = match self.context.state.outbox() {
            Ok(outbox) => outbox,
            Err(error) => return self.report_state_error(error),
        };
        for entry in outbox {
            if only.is_some_and(|user| user != &entry.to) {
                continue;
            }
            if self.in_flight.contains_key(&entry.id) {
                self.passed_over
                    .entry(entry.to)
                    .or_default()
                    .insert(entry.id);
                continue;
            }
            self.enqueue(Job {
                entry,
                recorded: None,
                reply: None,
            });
        }
    }

    /// Hands `job` to its recipient's delivery task (started on first use).
    fn enqueue(&mut self, job: Job) {
        self.in_flight.insert(job.entry.id, job.entry.to.clone());
        let to = job.entry.to.clone();
        let queue = self.recipients.entry(to.clone()).or_insert_with(|| {
            outgoing::spawn(
                self.context.clone(),
                to.clone(),
                &self.tracker,
                self.shutdown.clone(),
            )
        });
        if let Err(mpsc::error::SendError(job)) = queue.send(job) {
            // The task has stopped (only at shutdown): the sender hears so.
            self.in_flight.remove(&job.entry.id);
            self.recipients.remove(&to);
            if let Some(reply) = job.reply {
                let _ = reply.send(Err(ClientError::ShuttingDown));
            }
        }
    }

    /// Records the sends of this turn (outbox entries and pending history lines, one write
    /// job) and hands each to its recipient's task, which waits for the record to be
    /// durable before the message leaves.
    fn record_sends(&mut self) {
        if self.unrecorded.is_empty() {
            return;
        }
        let (entries, replies): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.unrecorded).into_iter().unzip();
        let tickets = self.context.state.submit_outgoing(entries.clone());
        for ((entry, reply), recorded) in entries.into_iter().zip(replies).zip(tickets) {
            self.enqueue(Job {
                entry,
                recorded: Some(recorded),
                reply: Some(reply),
            });
        }
    }

    /// Returns whether mutes changed.
    fn handle_command(&mut self, command: Command) -> bool {
        // Writes keep the order of commands: the sends before this one are recorded first.
        if !matches!(command, Command::Send { .. }) {
            self.record_sends();
        }
        let state = &self.context.state;
        match command {
            Command::Send { to, body, reply } => {
                if to == self.context.me {
                    let _ = reply.send(Err(ClientError::Yourself));
                } else if body.trim().is_empty() {
                    // The interactive parser refuses these already; scripts (`p2pchat send
                    // bob ""`) and library callers get the same answer here.
                    let _ = reply.send(Err(ClientError::EmptyMessage));
                } else if body.len() > proto::seal::MAX_BODY_LEN {
                    let _ = reply.send(Err(ClientError::TooLong {
                        len: body.len(),
                        max: proto::seal::MAX_BODY_LEN,
                    }));
                } else {
                    // The outbox record is submitted at the end of this turn, with the
                    // other sends of the turn, in order (`record_sends`), and awaited by the
                    // recipient's task before the message leaves.
                    let entry = state.prepare_outgoing(&to, &body, proto::now_ms());
                    self.unrecorded.push((entry, reply));
                }
            }
            Command::Blocked { reply } => {
                let _ = reply.send(state.blocked().map_err(Into::into));
            }
            // Read once every write submitted before it is durable: a send's result is
            // answered before it is recorded (see `crate::outgoing`), and the history must
            // show it.
            Command::History { user, limit, reply } => {
                let written = state.barrier();
                let context = self.context.clone();
                self.tracker.spawn(async move {
                    let result = match written.await {
                        Ok(()) => context.state.history(&user, limit).map_err(Into::into),
                        Err(error) => Err(error.into()),
                    };
                    let _ = reply.send(result);
                });
            }
            // Answered once the mark is durable (see `State::submit_shown`), without holding
            // the loop for the commit.
            Command::Shown { shown, reply } => {
                let marked = state.submit_shown(shown);
                self.tracker.spawn(async move {
                    let _ = reply.send(marked.await.map_err(Into::into));
                });
            }
            Command::Unmute { user, reply } => {
                let result = match state.unmute(&user) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(ClientError::NotMuted(user.clone())),
                    Err(error) => Err(error.into()),
                };
                let ok = result.is_ok();
                let _ = reply.send(result);
                if ok {
                    self.release_held(&user);
                    return true;
                }
            }
            Command::Unblock { user, reply } => {
                let result = match state.unblock(&user) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(ClientError::NotBlocked(user.clone())),
                    Err(error) => Err(error.into()),
                };
                if result.is_ok() && self.online {
                    let context = self.context.clone();
                    self.tracker
                        .spawn(async move { sync_block(&context, &user, false).await });
                }
                let _ = reply.send(result);
            }
            // The rest need the server (to check the user exists, or for keys): they run as
            // tracked tasks and report back.
            command => self.spawn_command(command),
        }
        false
    }

    fn spawn_command(&self, command: Command) {
        let context = self.context.clone();
        self.tracker.spawn(async move {
            match command {
                Command::List { reply } => {
                    let result = match context.control.request(Request::List).await {
                        Ok(Reply::Users(users)) => Ok(OnlineUsers { users, more: 0 }),
                        Ok(Reply::UsersCapped { users, more }) => Ok(OnlineUsers { users, more }),
                        Ok(_) => Err(ControlError::Unexpected.into()),
                        Err(error) => Err(error.into()),
                    };
                    let _ = reply.send(result);
                }
                Command::Block { user, reply } => {
                    let _ = reply.send(block(&context, &user).await);
                }
                Command::Mute {
                    user,
                    seconds,
                    reply,
                } => {
                    let result = mute(&context, &user, seconds).await;
                    if result.is_ok() {
                        let _ = context.to_loop.send(Internal::MutesChanged);
                    }
                    let _ = reply.send(result);
                }
                Command::Whois { user, reply } => {
                    let _ = reply.send(whois(&context, &user).await);
                }
                Command::Trust { user, reply } => {
                    let result = trust(&context, &user).await;
                    if result.is_ok() {
                        let _ = context.to_loop.send(Internal::Trusted(user));
                    }
                    let _ = reply.send(result);
                }
                // Handled on the loop; never spawned.
                Command::Send { .. }
                | Command::Blocked { .. }
                | Command::History { .. }
                | Command::Shown { .. }
                | Command::Unmute { .. }
                | Command::Unblock { .. } => {}
            }
        });
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Checks that `user` exists: pinned here, or known to the server. Offline, a name that is
/// not pinned is taken on trust (blocking or muting someone is harmless either way).
async fn check_known(context: &Context, user: &Username) -> Result<(), ClientError> {
    if user == &context.me {
        return Err(ClientError::Yourself);
    }
    if context.state.pinned(user)?.is_some() {
        return Ok(());
    }
    match context.lookup(user).await {
        Ok(_) | Err(ClientError::Control(_)) => Ok(()),
        Err(error) => Err(error),
    }
}

async fn block(context: &Context, user: &Username) -> Result<(), ClientError> {
    check_known(context, user).await?;
    if !context.state.block(user)? {
        return Err(ClientError::AlreadyBlocked(user.clone()));
    }
    sync_block(context, user, true).await;
    Ok(())
}

/// Tells the server about a block or unblock; on success records that it knows. Offline,
/// the change stays pending and is sent at the next registration.
async fn sync_block(context: &Context, user: &Username, active: bool) {
    let request = if active {
        Request::Block { user: user.clone() }
    } else {
        Request::Unblock { user: user.clone() }
    };
    match context.control.request(request).await {
        Ok(_) => {
            if let Err(error) = context.state.block_synced(user, active) {
                tracing::error!(%error, "state error");
            }
        }
        Err(error) => tracing::info!(%user, %error, "block change not yet at the server"),
    }
}

async fn mute(context: &Context, user: &Username, seconds: u64) -> Result<u64, ClientError> {
    if seconds == 0 {
        return Err(ClientError::BadDuration);
    }
    check_known(context, user).await?;
    let until = proto::now_ms().saturating_add(seconds.saturating_mul(1000));
    context.state.mute(user, until)?;
    Ok(until)
}

async fn whois(context: &Context, user: &Username) -> Result<WhoisReport, ClientError> {
    let pinned = context.state.pinned(user)?;
    let server = match context.lookup(user).await {
        Ok(info) => Some(info),
        Err(ClientError::Control(_)) if pinned.is_some() => None,
        Err(error) => return Err(error),
    };
    let mine = (&context.me, context.identity.public());
    let shown_keys = pinned.as_ref().or(server.as_ref().map(|info| &info.keys));
    Ok(WhoisReport {
        user: user.clone(),
        my_fingerprint: context.identity.public().fingerprint(),
        pinned_fingerprint: pinned.as_ref().map(PublicKeys::fingerprint),
        server_fingerprint: server.as_ref().map(|info| info.keys.fingerprint()),
        safety_number: shown_keys.map(|keys| proto::identity::safety_number(mine, (user, keys))),
        key_changed: matches!((&pinned, &server), (Some(pinned), Some(info)) if pinned != &info.keys),
        online: server.as_ref().map(|info| info.online),
        last_seen_ms: server.as_ref().and_then(|info| info.last_seen_ms),
    })
}

async fn trust(context: &Context, user: &Username) -> Result<String, ClientError> {
    if user == &context.me {
        return Err(ClientError::Yourself);
    }
    let info = context.lookup(user).await?;
    info.keys.verify().map_err(|error| ClientError::BadKeys {
        user: user.clone(),
        reason: error.to_string(),
    })?;
    context.state.repin(user, &info.keys)?;
    Ok(info.keys.fingerprint())
}
