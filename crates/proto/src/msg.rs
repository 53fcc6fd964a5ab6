//! Every message of both protocols, as plain data.
//!
//! Both protocols open with a [`Hello`] each way. Then:
//! - **control** (client ↔ discovery): the server sends [`ServerMsg::Challenge`]; the client
//!   sends [`RequestFrame`]s, each with an id, and gets exactly one [`ServerMsg::Response`]
//!   for each; the server may also send [`ServerMsg::Push`] at any time.
//! - **peer** (client ↔ client): [`PeerMsg::Hello`] names both users, then the sender sends
//!   [`PeerMsg::Envelope`]s and the receiver answers each with [`PeerMsg::Ack`] (after it has
//!   stored the message) or [`PeerMsg::Reject`].

use std::{fmt, net::SocketAddr, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{
    identity::{PublicKeys, Rotation},
    name::Username,
};

/// The protocol name carried in every [`Hello`].
pub const PROTOCOL_NAME: &str = "p2pchat";
/// The protocol version carried in every [`Hello`]; peers must match exactly. Version 2:
/// every connection runs a Noise handshake after the hellos ([`crate::noise`]). Version 3:
/// an [`Envelope`]'s token may be binary (an Olm message in bytes, [`crate::ratchet`]),
/// which a version-2 endpoint would fail to decode as text, so the two are told apart at the
/// hello instead.
pub const PROTOCOL_VERSION: u32 = 3;

/// The first frame each way on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`PROTOCOL_NAME`] for a p2pchat endpoint.
    pub protocol: String,
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u32,
}

impl Hello {
    /// The hello this build sends.
    pub fn current() -> Self {
        Self {
            protocol: PROTOCOL_NAME.to_owned(),
            version: PROTOCOL_VERSION,
        }
    }
}

/// Identifies a request on one control connection; the response carries it back.
pub type RequestId = u64;

/// A message id: 16 random bytes, unique per message, used for acks, de-duplication and
/// idempotent deposits. Shown and parsed as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(crate::random_bytes())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// A string that is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a message id is 32 hex digits")]
pub struct MessageIdError;

impl FromStr for MessageId {
    type Err = MessageIdError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != 32 || !text.is_ascii() {
            return Err(MessageIdError);
        }
        let mut bytes = [0u8; 16];
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16)
                .map_err(|_| MessageIdError)?;
        }
        Ok(Self(bytes))
    }
}

/// Names one message in a mailbox: mail is identified by its sender and id together, so a
/// second sender reusing another's id is a different message, never a duplicate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MailRef {
    /// Who sent it.
    pub from: Username,
    /// Its id.
    pub id: MessageId,
}

impl MailRef {
    /// The reference to `envelope`.
    pub fn of(envelope: &Envelope) -> Self {
        Self {
            from: envelope.from.clone(),
            id: envelope.id,
        }
    }
}

/// A sealed message as it travels and as mailboxes hold it. The header is clear text for
/// routing; the sealed `token` repeats it inside, and the receiver checks that the two agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The message id.
    pub id: MessageId,
    /// The sender.
    pub from: Username,
    /// The recipient.
    pub to: Username,
    /// The sealed message: an Olm message in binary ([`crate::ratchet`]), or, for mail
    /// sealed by older builds, the text of an Olm or Fernet token ([`crate::seal`]). On the
    /// wire it is length-prefixed bytes, encoded exactly as the text `String` older builds
    /// used, so mail they stored decodes here unchanged.
    #[serde(with = "token_bytes")]
    pub token: Vec<u8>,
}

/// (De)serialises a token as bytes (postcard: a length, then the bytes, the same encoding as a
/// `String`). Reading also takes a string or a sequence of bytes, for self-describing formats.
mod token_bytes {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(token: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(token)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(TokenVisitor)
    }

    struct TokenVisitor;

    impl<'de> de::Visitor<'de> for TokenVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sealed token as bytes")
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
            Ok(bytes.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(bytes)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<u8>, E> {
            Ok(text.as_bytes().to_vec())
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                bytes.push(byte);
            }
            Ok(bytes)
        }
    }
}

/// One request from a client, with the id its response will carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Chosen by the client; echoed in the response.
    pub id: RequestId,
    /// What the client asks for.
    pub request: Request,
}

/// The most listening ports one registration may declare (a client listens on one; the
/// server keeps an address for each, per user).
pub const MAX_LISTEN_PORTS: usize = 8;

/// A signed registration: binds `user` to `keys` on first use, proves the key afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The name to register.
    pub user: Username,
    /// The user's public keys (the X25519 key signed by the identity key).
    pub keys: PublicKeys,
    /// The TCP ports the client accepts peer connections on; the server pairs them with the
    /// address it sees the client connect from. At most [`MAX_LISTEN_PORTS`], none of them 0.
    pub listen_ports: Vec<u16>,
    /// The identity key's signature over [`crate::identity::registration_transcript`] of the
    /// server's challenge, `user` and `keys`.
    pub signature: ed25519_dalek::Signature,
}

/// Requests of the control protocol (client → discovery server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Register (or re-register) under a name. Answered with [`Reply::Registered`].
    Register(Registration),
    /// Keep-alive; refreshes presence. Answered with [`Reply::Pong`].
    Heartbeat,
    /// One user's keys, addresses, presence and last-seen time. Answered with [`Reply::User`].
    Lookup {
        /// Whom to look up.
        user: Username,
    },
    /// Who is online now. Answered with [`Reply::Users`] (possibly empty), or, when more are
    /// online than the server lists at once, [`Reply::UsersCapped`].
    List,
    /// Leave sealed mail in the recipient's mailbox. Idempotent by (sender, envelope id).
    /// Answered with [`Reply::Deposited`].
    Deposit {
        /// The sealed message; `from` must be the registered user.
        envelope: Envelope,
    },
    /// Fetch up to `max` of my waiting messages, oldest first. Answered with [`Reply::Mail`].
    Fetch {
        /// The most envelopes wanted (the server may send fewer to fit a frame).
        max: u32,
    },
    /// The older form of [`Request::AckMail`], naming messages by id alone. The server
    /// resolves each id against the envelopes it sent this connection in its last
    /// [`Reply::Mail`] (that is what a client acks), and deletes those messages. Answered
    /// with [`Reply::Acked`].
    Ack {
        /// The ids of the messages to delete.
        ids: Vec<MessageId>,
    },
    /// Refuse mail from `user` at the server. Answered with [`Reply::Done`].
    Block {
        /// Whom to block.
        user: Username,
    },
    /// Accept mail from `user` again. Answered with [`Reply::Done`].
    Unblock {
        /// Whom to unblock.
        user: Username,
    },
    /// Go offline now (the connection stays open). Answered with [`Reply::Done`].
    Unregister,
    /// Operator only: publish an announcement to every connected client. `proof` is
    /// [`crate::identity::announce_proof`] of the operator secret, the challenge and `text`.
    /// Answered with [`Reply::Done`].
    Announce {
        /// The announcement.
        text: String,
        /// Proof of the operator secret.
        proof: [u8; 32],
    },
    /// Delete these messages from my mailbox: I have stored them. Each is named by its
    /// sender and id (mail identity). Added last, so every older request keeps its
    /// encoding. Answered with [`Reply::Acked`].
    AckMail {
        /// The messages to delete.
        mail: Vec<MailRef>,
    },
    /// Publish my Olm key, new one-time keys and my fallback key, each signed by my
    /// identity (see [`crate::ratchet`]). Answered with [`Reply::PreKeyCount`]. With no
    /// new keys, it only asks how many are left.
    PublishPreKeys(crate::ratchet::PreKeys),
    /// Claim one of `user`'s one-time keys (removed at the server as it is handed out), or
    /// their fallback key when none is left, to start a session. Answered with
    /// [`Reply::PreKey`], or [`ErrorCode::NoPreKeys`].
    ClaimPreKey {
        /// Whose key.
        user: Username,
    },
    /// Move my name to new keys: a [`Rotation`] signed by the keys bound now (the ones this
    /// connection registered with) and by the new ones. The server binds the new keys and
    /// keeps the statement for contacts to check. Answered with [`Reply::Done`].
    Rotate(Rotation),
    /// The rotation statements kept for `user`, oldest first: what a contact who pinned an
    /// older key checks before following the name to its new keys. Answered with
    /// [`Reply::Rotations`].
    Rotations {
        /// Whose statements.
        user: Username,
    },
    /// Operator only: unbind `user`'s name (its owner lost the key and has no backup), so
    /// that the next registration binds it anew. `proof` is
    /// [`crate::identity::operator_proof`] of the operator secret, the challenge and the
    /// name. Answered with [`Reply::Released`].
    ReleaseName {
        /// The name to release.
        user: Username,
        /// Proof of the operator secret.
        proof: [u8; 32],
    },
    /// Watch these users' presence: add them to this session's watch set (at most
    /// [`MAX_WATCHED`] names in all). A change of a watched user is pushed as
    /// [`Push::Presence`] only while the two watch each other (each is in the other's watch
    /// set): a stranger who watches someone learns nothing. Sending it also asks for the
    /// pushes added after it ([`Push::Presence`], [`Push::SessionElsewhere`]), which the
    /// server sends only to sessions that asked, so an older client never meets a push
    /// it cannot decode. Added after every older request, so each keeps its encoding.
    /// Answered with [`Reply::Watching`]; the watched users online now who watch back
    /// follow as [`Push::Presence`] pushes.
    Watch {
        /// Whom to add (at most [`MAX_WATCHED`] in one request).
        users: Vec<Username>,
    },
    /// Stop watching these users (a user blocked, say): mutuality with them ends, both
    /// ways, and they are told this user went offline. Answered with [`Reply::Watching`].
    Unwatch {
        /// Whom to drop.
        users: Vec<Username>,
    },
}

/// The most users one session watches ([`Request::Watch`]): a frame of that many names is
/// about 33 KB, inside a 64 KiB frame.
pub const MAX_WATCHED: usize = 1_000;

/// What the server knows of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The user.
    pub user: Username,
    /// The keys bound to the name.
    pub keys: PublicKeys,
    /// Where the user accepts peer connections (empty when offline).
    pub addresses: Vec<SocketAddr>,
    /// Whether the user is online now.
    pub online: bool,
    /// When the server last heard from the user (milliseconds since the Unix epoch).
    pub last_seen_ms: Option<u64>,
}

/// Successful results of the control protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Registration accepted.
    Registered {
        /// The address the server sees the client connect from.
        observed: SocketAddr,
        /// True when this registration bound the name for the first time.
        new_binding: bool,
        /// How often the server expects a heartbeat, in milliseconds.
        heartbeat_interval_ms: u64,
        /// After how long without a heartbeat the client is offline, in milliseconds.
        presence_ttl_ms: u64,
    },
    /// Heartbeat answered.
    Pong,
    /// Lookup result.
    User(UserInfo),
    /// Users online now, sorted by name.
    Users(Vec<Username>),
    /// Mail stored (or already stored: deposits are idempotent).
    Deposited {
        /// Whether the recipient was online, and so was told at once.
        recipient_online: bool,
    },
    /// Waiting mail, oldest first.
    Mail {
        /// The envelopes.
        envelopes: Vec<Envelope>,
        /// How many more are waiting after these.
        remaining: u64,
    },
    /// Mail deleted.
    Acked {
        /// How many of the ids were in the mailbox.
        removed: u32,
    },
    /// Request carried out, nothing to report.
    Done,
    /// The first users online now, sorted by name, when more are online than the server
    /// lists at once (a reply that always fits a frame). Added last, so every older reply
    /// keeps its encoding, and a list that fits is still [`Reply::Users`].
    UsersCapped {
        /// The first users by name.
        users: Vec<Username>,
        /// How many more are online.
        more: u64,
    },
    /// How many of my one-time keys the server holds now.
    PreKeyCount {
        /// Unclaimed one-time keys.
        one_time: u32,
    },
    /// A claimed key to start a session with.
    PreKey(crate::ratchet::PreKeyBundle),
    /// The rotation statements kept for a user, oldest first (empty if none).
    Rotations(Vec<Rotation>),
    /// A name was released; here is the binding it had.
    Released {
        /// The fingerprint of the keys the name was bound to.
        fingerprint: String,
    },
    /// The watch set changed ([`Request::Watch`], [`Request::Unwatch`]).
    Watching {
        /// How many users this session watches now.
        watched: u32,
        /// How many more it may add ([`MAX_WATCHED`] in all).
        room: u32,
    },
}

/// A machine-readable error code; [`ErrorCode::as_str`] is its stable spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is malformed or not allowed in this state.
    BadRequest,
    /// The other side speaks another protocol version.
    VersionMismatch,
    /// The request needs a registration first.
    NotRegistered,
    /// The name is bound to other keys.
    NameTaken,
    /// A signature does not verify.
    BadSignature,
    /// A name is not a valid username.
    InvalidName,
    /// No such user is known.
    UnknownUser,
    /// The recipient blocks the sender.
    Blocked,
    /// The recipient's mailbox is full.
    MailboxFull,
    /// A message is larger than allowed.
    TooLarge,
    /// Too many requests; slow down.
    RateLimited,
    /// Only the operator may do this.
    Unauthorized,
    /// The server is at its connection limit.
    ServerBusy,
    /// The message is not for this recipient, or its keys are not trusted.
    Refused,
    /// The server's storage is unreachable; try again.
    Unavailable,
    /// Something went wrong on the server.
    Internal,
    /// This session was closed because a newer session of the same user went over the
    /// per-user session limit (the oldest makes room). Added last, so every older code
    /// keeps its encoding.
    SessionLimit,
    /// The discovery server presented a key other than the one this client pinned (or was
    /// given) for its address; nothing was sent. Said by a client to its user, never on
    /// the wire.
    ServerKeyChanged,
    /// The user has published no keys to start an encrypted session with (their client
    /// predates the ratchet, or has not connected since): the message waits in the outbox.
    NoPreKeys,
    /// A peer could not open a message: it has no session the message belongs to (lost, or
    /// replaced). The sender starts a new session and sends it again.
    NoSession,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and metrics.
    pub const ALL: [ErrorCode; 20] = [
        Self::BadRequest,
        Self::VersionMismatch,
        Self::NotRegistered,
        Self::NameTaken,
        Self::BadSignature,
        Self::InvalidName,
        Self::UnknownUser,
        Self::Blocked,
        Self::MailboxFull,
        Self::TooLarge,
        Self::RateLimited,
        Self::Unauthorized,
        Self::ServerBusy,
        Self::Refused,
        Self::Unavailable,
        Self::Internal,
        Self::SessionLimit,
        Self::ServerKeyChanged,
        Self::NoPreKeys,
        Self::NoSession,
    ];

    /// The stable snake_case name of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::VersionMismatch => "version_mismatch",
            Self::NotRegistered => "not_registered",
            Self::NameTaken => "name_taken",
            Self::BadSignature => "bad_signature",
            Self::InvalidName => "invalid_name",
            Self::UnknownUser => "unknown_user",
            Self::Blocked => "blocked",
            Self::MailboxFull => "mailbox_full",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::ServerBusy => "server_busy",
            Self::Refused => "refused",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::SessionLimit => "session_limit",
            Self::ServerKeyChanged => "server_key_changed",
            Self::NoPreKeys => "no_prekeys",
            Self::NoSession => "no_session",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: a code for programs and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ErrorReply {
    /// What kind of error.
    pub code: ErrorCode,
    /// A human sentence saying what went wrong and, where it helps, what to do.
    pub message: String,
}

impl ErrorReply {
    /// An error reply with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Messages the server sends without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Push {
    /// Mail is waiting: fetch it. A hint only; clients also fetch on every (re)connect.
    MailWaiting,
    /// An announcement from the operator.
    Announcement {
        /// The text.
        text: String,
        /// When it was published (milliseconds since the Unix epoch).
        at_ms: u64,
    },
    /// A user came online or went offline. Sent only to a session that asked with
    /// [`Request::Watch`], about a user it watches who watches it back.
    Presence {
        /// Who.
        user: Username,
        /// Online now or not.
        online: bool,
    },
    /// Another session of this user registered (elsewhere, or on this machine): direct
    /// messages now go to the newest session. Sent only to sessions that asked with
    /// [`Request::Watch`]. Added last, so every older push keeps its encoding.
    SessionElsewhere {
        /// The address the server sees the new session at.
        observed: SocketAddr,
        /// When it registered (milliseconds since the Unix epoch).
        at_ms: u64,
    },
}

/// Frames of the control protocol sent by the server (after the [`Hello`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// A fresh nonce to sign in [`Request::Register`] (or prove in [`Request::Announce`]).
    /// Sent once, right after the hello.
    Challenge {
        /// 32 random bytes, new for every connection.
        nonce: [u8; 32],
    },
    /// The one answer to request `id`.
    Response {
        /// The request's id.
        id: RequestId,
        /// Its result.
        result: Result<Reply, ErrorReply>,
    },
    /// An unsolicited notice.
    Push(Push),
    /// The server is closing the connection, and why (bad input, shutdown, idle).
    Closing(ErrorReply),
}

/// Frames of the peer protocol (after the [`Hello`]), both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// First frame from the connecting side: who is calling whom.
    Hello {
        /// The connecting user.
        from: Username,
        /// The user it expects to reach.
        to: Username,
    },
    /// A sealed message.
    Envelope(Envelope),
    /// The envelope `id` is stored by the receiver.
    Ack {
        /// The envelope's id.
        id: MessageId,
    },
    /// The receiver refuses the envelope `id` (or, with no id, the whole connection).
    Reject {
        /// The refused envelope, if any.
        id: Option<MessageId>,
        /// Why.
        error: ErrorReply,
    },
}
