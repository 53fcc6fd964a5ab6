//! The peer runtime: [`start`] returns a [`Client`] (commands) and an [`Events`] stream.
//!
//! [`start`] loads the identity and the state, binds the P2P listener, starts the control
//! actor ([`crate::control`]) and the shell ([`crate::shell`]), which runs the I/O-free core
//! ([`crate::core`]). A [`Client`] sends commands to the shell over bounded channels and
//! waits for their answers; the shell hands the application every [`Event`] in order.
//!
//! Outgoing messages go to one task per recipient ([`crate::outgoing`]), which keeps a link
//! and pipelines them over it in order. State writes are group-committed
//! ([`durable::GroupWriter`]): a send's outbox record, the receiver's stored batch and the
//! results of many messages share commits.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use proto::{Identity, Username};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use crate::{
    api::{
        ClientError, Config, Event, OnlineUsers, SEEN_RETENTION_MS, SendReport, StartError, Status,
        WhoisReport,
    },
    shell::MAX_INBOUND_CONNECTIONS,
};
use crate::{
    context::MailState,
    context::{Context, REPORTS_QUEUED},
    control::{self, ControlConfig},
    sessions::Ratchet,
    shell::{
        COMMANDS_QUEUED, CONTROL_QUEUED, Channels, Command, EVENTS_QUEUED, Reply_, SHOWN_QUEUED,
        Shell, Shown,
    },
    state::{HistoryEntry, InboundMessage, State, StateError},
};

/// A handle on a running runtime. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    shown: mpsc::Sender<Shown>,
    status: watch::Receiver<Status>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    me: Username,
    fingerprint: String,
    local_addr: SocketAddr,
    new_identity: bool,
    /// What the tasks share: [`Client::shutdown`] ends the run on its state, and the test
    /// helpers of [`crate::testing`] use it.
    pub(crate) context: Arc<Context>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.me)
    }
}

/// The events of one runtime, in order. Take them, or drop this: while the application
/// leaves 4,096 of them untaken, the runtime takes no new input (messages, commands) until
/// there is room, except the marks of [`Client::mark_shown`]. Once it is dropped, events
/// are discarded (messages not marked shown are offered again at the next start).
#[derive(Debug)]
pub struct Events {
    receiver: mpsc::Receiver<Event>,
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
    open_state: impl FnOnce(&Path) -> Result<State, StateError> + Send + 'static,
) -> Result<(Client, Events), StartError> {
    // Opening the state commits (creating tables, migrating) and creating an identity
    // syncs a file: off the runtime's threads.
    let data_dir = config.data_dir.clone();
    let user = config.user.clone();
    let opened = tokio::task::spawn_blocking(move || {
        proto::identity::create_private_dir(&data_dir)?;
        proto::identity::check_private(&data_dir, 0o700)?;
        // The state file's lock first: a second process on this data dir stops here,
        // before it could race the first one to create the identity.
        let state = open_state(&data_dir)?;
        let (identity, new_identity) = Identity::load_or_create(&data_dir)?;
        let identity = Arc::new(identity);
        let ratchet = Ratchet::load(&state, &identity, &user)?;
        Ok::<_, StartError>((state, identity, new_identity, ratchet))
    })
    .await
    .map_err(|_| StartError::Interrupted)?;
    let (state, identity, new_identity, ratchet) = opened?;
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
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUED);
    let control = control::spawn(
        ControlConfig {
            server: config.server.clone(),
            user: config.user.clone(),
            listen_port: config.advertise_port.unwrap_or(local_addr.port()),
            pong_timeout: config.pong_timeout,
            heartbeat_interval: config.heartbeat_interval,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
            trust: crate::server_trust::ServerTrust::new(&config.data_dir, config.server_key),
        },
        identity.clone(),
        control_tx,
        shutdown.clone(),
        &tracker,
    );
    let (to_loop, reports_rx) = mpsc::channel(REPORTS_QUEUED);
    let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_QUEUED);
    let (shown_tx, shown_rx) = mpsc::channel(SHOWN_QUEUED);
    let (events_tx, events_rx) = mpsc::channel(EVENTS_QUEUED);
    let (status_tx, status_rx) = watch::channel(Status::Connecting);
    let fingerprint = identity.public().fingerprint();
    let context = Arc::new(Context {
        me: config.user.clone(),
        identity,
        state,
        ratchet,
        control,
        to_loop,
        config: config.clone(),
        link_generation: AtomicU64::new(0),
        channels: Mutex::new(HashMap::new()),
        server_keys: Default::default(),
        unauthenticated: AtomicU64::new(0),
        publishing: tokio::sync::Mutex::new(()),
        mail: tokio::sync::watch::Sender::new(MailState::Unknown),
        unfollowed: Default::default(),
    });
    let client_context = context.clone();
    let shell = Shell::new(
        context,
        listener,
        Channels {
            control: control_rx,
            commands: commands_rx,
            shown: shown_rx,
            reports: reports_rx,
            events: events_tx,
            status: status_tx,
        },
        tracker.clone(),
        shutdown.clone(),
    );
    tracker.spawn(shell.run());
    Ok((
        Client {
            commands: commands_tx,
            shown: shown_tx,
            status: status_rx,
            shutdown,
            tracker,
            me: config.user,
            fingerprint,
            local_addr,
            new_identity,
            context: client_context,
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
        let (reply, answer) = oneshot::channel();
        self.shown
            .send(Shown { shown, reply })
            .await
            .map_err(|_| ClientError::ShuttingDown)?;
        answer.await.map_err(|_| ClientError::ShuttingDown)?
    }

    /// Stops the runtime and waits (at most `timeout`) for its tasks to finish. If they
    /// all did, the run is recorded as stopped cleanly, so the next start keeps the
    /// sessions for sealing ([`crate::sessions`]); otherwise the next start retires them.
    pub async fn shutdown(&self, timeout: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        let deadline = tokio::time::Instant::now() + timeout;
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            let context = &self.context;
            let ended = context.ratchet.end_run(&context.state);
            let _ = tokio::time::timeout_at(deadline, ended).await;
        }
    }
}
