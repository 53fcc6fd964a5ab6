//! The runtime's public types: its [`Config`], what a [`crate::Client`] answers
//! ([`SendReport`], [`WhoisReport`], [`OnlineUsers`], [`ClientError`]), and the [`Event`]s it
//! tells the user about. Every other module of the crate may use these; this one uses only
//! `proto`, [`crate::control`] and [`crate::state`]'s records.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use proto::{ErrorReply, MessageId, ReceiptKind, Username};

pub use crate::reason::{FailureReason, RefusalReason};
use crate::{
    control::{self, ControlError},
    state::{InboundMessage, MessageStatus, StateError},
};

/// How long seen ids are remembered, and so the oldest message accepted (mail lives up to
/// 30 days in a mailbox; this leaves a margin). Defined beside the state that keeps them.
pub const SEEN_RETENTION_MS: u64 = crate::state::SEEN_RETENTION_MS;

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
    /// The server key's fingerprint, given up front (`--server-key`): the server must
    /// present it, and it is pinned. Without it, the key is pinned on first contact.
    pub server_key: Option<proto::Fingerprint>,
    /// Whether to send read receipts: marking a message shown tells its sender it was read
    /// (on by default). Delivered receipts for mail are always sent; others' read
    /// receipts are shown either way.
    pub read_receipts: bool,
}

impl Config {
    /// The defaults: heartbeat 10 s, pong timeout 10 s, ack timeout 5 s, mail
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
            server_key: None,
            read_receipts: true,
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
    /// The start was interrupted (the runtime is shutting down).
    #[error("the start was interrupted")]
    Interrupted,
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
    /// A message to show. Call [`crate::Client::mark_shown`] once it is shown; until then it is
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
    /// A receipt from the recipient of messages this client sent moved their status
    /// forward: delivered (it stored them from its mailbox) or read (its screen showed
    /// them). Only for messages sent to `from` whose status changed.
    Receipt {
        /// Who sent the receipt: the recipient of the messages.
        from: Username,
        /// Delivered or read.
        kind: ReceiptKind,
        /// (id, when sent) of each message, oldest first.
        messages: Vec<(MessageId, u64)>,
    },
    /// Messages from `from` did not open because the encrypted session they were sealed
    /// in is lost here (a restored backup, a lost state): `from` was asked, in a new
    /// session, to send them again; they are shown as [`Event::Message`]s when they come.
    /// Told instead of a refusal for mail; a message sent direct is sealed again by its
    /// sender at once.
    ResendAsked {
        /// The sender of the messages.
        from: Username,
        /// How many messages were asked for again.
        messages: usize,
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
        /// The sender (it authenticated: refusals of envelopes that prove nothing about
        /// their sender are counted, never told).
        from: Username,
        /// Why.
        reason: RefusalReason,
    },
    /// The local state could not be read or written (the disk is full or failing): what
    /// was being done is kept for later where it can be, and the user should know.
    StateError {
        /// What failed.
        error: String,
    },
    /// A contact came online or went offline. The server tells only about users this
    /// client wrote to (and did not block) who watch it back: [`crate::contacts`].
    /// Not about this client's own server link, which is [`Event::Online`] and
    /// [`Event::Offline`].
    Presence {
        /// Who.
        user: Username,
        /// Online now.
        online: bool,
    },
    /// Another session of this user registered at the server (this identity in another
    /// process or on another machine): direct messages now go to the newest session.
    SessionElsewhere {
        /// Where the server sees the new session.
        observed: SocketAddr,
        /// When it registered, ms since the epoch.
        at_ms: u64,
    },
    /// A peer moved their name to new keys with a statement signed by the key pinned here
    /// (checked by this client, not taken from the server): the new keys are pinned and
    /// messages flow again. The safety number changed; compare it again if you compared
    /// the old one.
    KeyRotated {
        /// Whose key.
        user: Username,
        /// The fingerprint pinned until now.
        old: String,
        /// The fingerprint pinned from now on.
        new: String,
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
    /// The safety number of me and the user with the keys the server presents now (with
    /// the pinned keys when the server cannot be asked): after a key change, the number to
    /// compare before `trust`, which pins those keys.
    pub safety_number: Option<String>,
    /// The safety number with the pinned keys, when they differ from the server's.
    pub pinned_safety_number: Option<String>,
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

/// What became of a message, as the sender sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// The recipient acked it directly.
    Delivered,
    /// It is in the recipient's mailbox.
    Queued {
        /// Whether the recipient is online (and so was told at once).
        recipient_online: bool,
    },
    /// It was not delivered.
    Failed {
        /// Why.
        reason: FailureReason,
        /// Whether it stays in the outbox and is retried (on reconnect, on `trust`).
        will_retry: bool,
    },
}

impl DeliveryStatus {
    pub(crate) fn failed(reason: FailureReason, will_retry: bool) -> Self {
        Self::Failed { reason, will_retry }
    }

    /// The history status, and whether the message stays in the outbox.
    pub fn to_history(&self) -> (MessageStatus, bool) {
        match self {
            Self::Delivered => (MessageStatus::Delivered, false),
            Self::Queued { .. } => (MessageStatus::Queued, false),
            Self::Failed { reason, will_retry } => {
                (MessageStatus::Failed(reason.clone()), *will_retry)
            }
        }
    }

    /// Delivered or queued: the message is safe.
    pub fn is_success(&self) -> bool {
        !matches!(self, Self::Failed { .. })
    }
}
