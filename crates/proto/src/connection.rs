//! [`Connection`]: one framed stream, generic over `AsyncRead + AsyncWrite`, that sends and
//! receives typed messages. It owns the framing and, once a handshake of
//! [`crate::noise`] has run, the encryption; callers only see messages.

use std::{io, time::Duration};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::{
    Identity,
    msg::{Hello, PROTOCOL_NAME},
    noise::{self, Cipher, Handshake, NoiseError, Secured, ServerKey},
    wire::{self, FrameCodec, FrameTooLarge, MAX_FRAME_LEN, WireError},
};

/// How long a single write may take before the peer is considered stuck.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the hello exchange may take.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The initial capacity of each of a connection's read and write buffers. Control and peer
/// messages are a few hundred bytes, and both buffers grow on demand for larger frames (the
/// read buffer only as the frame's bytes arrive), so tokio-util's 8 KiB default only costs
/// memory: a server holding tens of thousands of idle connections pays it twice for each.
/// An idle client's sealed heartbeat and pong are a few dozen bytes, its registration about
/// 200.
const INITIAL_BUFFER: usize = 256;
/// How many bytes of fed frames are buffered before they are written out without a flush
/// (independent of the buffer's initial size, so a batch of acks still leaves in few
/// writes).
const WRITE_BATCH: usize = 512;

/// Why a frame could not be received. After any of these the connection is unusable and
/// should be closed; none of them is a reason to stop serving anyone else.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer declared a frame larger than the limit.
    #[error("frame larger than the {max} byte limit")]
    FrameTooLarge {
        /// The limit.
        max: usize,
    },
    /// A frame arrived whose body is not a valid message.
    #[error(transparent)]
    Malformed(#[from] WireError),
    /// The connection closed in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// A frame failed authentication: changed, cut, replayed or not from the other side.
    #[error("a frame failed authentication (changed or forged on the way)")]
    Unauthentic,
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[source] io::Error),
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The message is larger than the frame limit.
    #[error("message of {len} bytes exceeds the {max} byte frame limit")]
    TooLarge {
        /// The encoded size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] WireError),
    /// The message could not be encrypted.
    #[error("cannot encrypt the message: {0}")]
    Encrypt(NoiseError),
    /// The peer did not take the bytes in time.
    #[error("peer did not read within {0:?}")]
    Timeout(Duration),
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[source] io::Error),
}

/// Why the hello exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The other side is a p2pchat endpoint of another version.
    #[error(
        "protocol version mismatch: we speak version {ours}, the other side speaks {theirs}; upgrade the older one"
    )]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// The other side is not a p2pchat endpoint.
    #[error("the other side is not a p2pchat endpoint (it said {0:?})")]
    WrongProtocol(String),
    /// The other side did not answer in time.
    #[error("no hello within {0:?}")]
    Timeout(Duration),
    /// The other side closed the connection.
    #[error("connection closed during the hello")]
    Closed,
    /// The Noise handshake failed: the other side does not hold the key it was expected to
    /// (a redirected or impersonated peer), or the bytes were changed on the way.
    #[error(
        "the secure handshake failed (the other side does not hold the expected key, or the connection was tampered with): {0}"
    )]
    Noise(#[from] NoiseError),
    /// Receiving failed.
    #[error(transparent)]
    Recv(#[from] RecvError),
    /// Sending failed.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// A framed connection carrying postcard-encoded messages.
#[derive(Debug)]
pub struct Connection<T> {
    framed: Framed<T, FrameCodec>,
    write_timeout: Duration,
    /// The largest message body, before encryption.
    max_frame_len: usize,
    /// Set once a handshake finished: every frame from then on is sealed.
    cipher: Option<Cipher>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Connection<T> {
    /// A connection with the default limits ([`MAX_FRAME_LEN`], [`DEFAULT_WRITE_TIMEOUT`]).
    pub fn new(io: T) -> Self {
        Self::with_limits(io, MAX_FRAME_LEN, DEFAULT_WRITE_TIMEOUT)
    }

    /// A connection with an explicit frame limit and write timeout.
    pub fn with_limits(io: T, max_frame_len: usize, write_timeout: Duration) -> Self {
        let mut framed = Framed::with_capacity(io, wire::codec(max_frame_len), INITIAL_BUFFER);
        framed.set_backpressure_boundary(WRITE_BATCH);
        Self {
            framed,
            write_timeout,
            max_frame_len,
            cipher: None,
        }
    }

    /// The largest message body received or sent (before encryption).
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Changes the frame limit for the frames received and sent from now on (a server keeps
    /// it small until the client has registered).
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.max_frame_len = max_frame_len;
        let on_wire = if self.cipher.is_some() {
            noise::sealed_len(max_frame_len)
        } else {
            max_frame_len
        };
        self.framed.codec_mut().set_max_frame_len(on_wire);
    }

    /// Whether a handshake has run: every frame is encrypted and authenticated.
    pub fn is_secured(&self) -> bool {
        self.cipher.is_some()
    }

    /// Receives the next message: `Ok(None)` on a clean close between frames.
    ///
    /// Cancel-safe: a partly received frame stays buffered, so this can sit in a `select!`.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, RecvError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Ok(body)) => match self.cipher.as_mut() {
                None => Ok(Some(wire::decode(&body)?)),
                Some(cipher) => {
                    let plain = cipher.open(&body).map_err(|_| RecvError::Unauthentic)?;
                    Ok(Some(wire::decode(&plain)?))
                }
            },
            Some(Err(error)) => Err(self.recv_error(error)),
        }
    }

    /// Receives one frame body as it is on the wire (a handshake message).
    async fn recv_raw(&mut self) -> Result<Option<Bytes>, RecvError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Ok(body)) => Ok(Some(body.freeze())),
            Some(Err(error)) => Err(self.recv_error(error)),
        }
    }

    /// Sends one frame body as it is (a handshake message) and flushes it.
    async fn send_raw(&mut self, body: Bytes) -> Result<(), SendError> {
        match tokio::time::timeout(self.write_timeout, self.framed.send(body)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SendError::Io(error)),
            Err(_) => Err(SendError::Timeout(self.write_timeout)),
        }
    }

    fn recv_error(&self, error: io::Error) -> RecvError {
        if error
            .get_ref()
            .is_some_and(|inner| inner.is::<FrameTooLarge>())
        {
            RecvError::FrameTooLarge {
                max: self.max_frame_len(),
            }
        } else if error.kind() == io::ErrorKind::UnexpectedEof
            || error.to_string().contains("bytes remaining on stream")
        {
            RecvError::Truncated
        } else {
            RecvError::Io(error)
        }
    }

    /// Sends one message and flushes it, failing if the peer does not take it within the
    /// write timeout.
    pub async fn send<M: Serialize + ?Sized>(&mut self, message: &M) -> Result<(), SendError> {
        let body = self.frame(message)?;
        self.send_raw(body).await
    }

    /// One message's frame body (sealed once secured), refused if the message exceeds the
    /// frame limit.
    fn frame<M: Serialize + ?Sized>(&mut self, message: &M) -> Result<Bytes, SendError> {
        let body = wire::encode(message)?;
        if body.len() > self.max_frame_len {
            return Err(SendError::TooLarge {
                len: body.len(),
                max: self.max_frame_len,
            });
        }
        match self.cipher.as_mut() {
            None => Ok(body),
            Some(cipher) => cipher.seal(&body).map_err(SendError::Encrypt),
        }
    }

    /// Buffers one message without flushing it (see [`Connection::flush`]), so a burst of
    /// messages (acks of a batch, a window of envelopes) leaves in few writes. Waits only
    /// if the buffer is full, bounded by the write timeout.
    pub async fn feed<M: Serialize + ?Sized>(&mut self, message: &M) -> Result<(), SendError> {
        let body = self.frame(message)?;
        match tokio::time::timeout(self.write_timeout, self.framed.feed(body)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SendError::Io(error)),
            Err(_) => Err(SendError::Timeout(self.write_timeout)),
        }
    }

    /// Writes out what [`Connection::feed`] buffered, within the write timeout.
    pub async fn flush(&mut self) -> Result<(), SendError> {
        match tokio::time::timeout(
            self.write_timeout,
            SinkExt::<Bytes>::flush(&mut self.framed),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SendError::Io(error)),
            Err(_) => Err(SendError::Timeout(self.write_timeout)),
        }
    }

    /// Exchanges [`Hello`]s: sends ours, then checks theirs, all within `timeout`. The
    /// handshakes below start with it; on its own it is for tests of the plain exchange.
    pub async fn hello(&mut self, timeout: Duration) -> Result<(), HandshakeError> {
        tokio::time::timeout(timeout, self.exchange_hellos())
            .await
            .map_err(|_| HandshakeError::Timeout(timeout))?
    }

    async fn exchange_hellos(&mut self) -> Result<(), HandshakeError> {
        self.send(&Hello::current()).await?;
        let theirs: Hello = match self.recv().await {
            Ok(Some(hello)) => hello,
            Ok(None) => return Err(HandshakeError::Closed),
            // A body that is not a hello at all is another protocol speaking.
            Err(RecvError::Malformed(_)) => {
                return Err(HandshakeError::WrongProtocol(
                    "an unreadable first frame".into(),
                ));
            }
            Err(error) => return Err(error.into()),
        };
        check_hello(&theirs)
    }

    /// The client side of a control connection: hellos, then the Noise NX handshake, all
    /// within `timeout`. Returns the server's key ([`Secured::remote_static`]), which the
    /// caller checks against its pin before sending anything that matters.
    pub async fn client_handshake(&mut self, timeout: Duration) -> Result<Secured, HandshakeError> {
        self.secure(timeout, Handshake::control_client()?).await
    }

    /// The server side of a control connection, with the server's `key`.
    pub async fn server_handshake(
        &mut self,
        key: &ServerKey,
        timeout: Duration,
    ) -> Result<Secured, HandshakeError> {
        self.secure(timeout, Handshake::control_server(key)?).await
    }

    /// The dialling side of a peer link: `me`, to the user whose exchange key is `peer`.
    /// Only the holder of that key can finish the handshake.
    pub async fn dial_handshake(
        &mut self,
        me: &Identity,
        peer: &[u8; 32],
        timeout: Duration,
    ) -> Result<Secured, HandshakeError> {
        let handshake = Handshake::peer_dialer(&me.exchange_secret(), peer)?;
        self.secure(timeout, handshake).await
    }

    /// The accepting side of a peer link. The dialer's exchange key is
    /// [`Secured::remote_static`]: the caller checks it against the user it claims to be.
    pub async fn accept_handshake(
        &mut self,
        me: &Identity,
        timeout: Duration,
    ) -> Result<Secured, HandshakeError> {
        let handshake = Handshake::peer_acceptor(&me.exchange_secret())?;
        self.secure(timeout, handshake).await
    }

    /// Hellos, then the two handshake messages (the initiator writes first), then every
    /// frame is sealed.
    async fn secure(
        &mut self,
        timeout: Duration,
        mut handshake: Handshake,
    ) -> Result<Secured, HandshakeError> {
        let run = async {
            self.exchange_hellos().await?;
            let initiator = handshake.is_initiator();
            if initiator {
                let first = handshake.write()?;
                self.send_raw(first).await?;
            }
            let message = match self.recv_raw().await {
                Ok(Some(message)) => message,
                Ok(None) => return Err(HandshakeError::Closed),
                Err(error) => return Err(error.into()),
            };
            handshake.read(&message)?;
            if !initiator {
                let second = handshake.write()?;
                self.send_raw(second).await?;
            }
            let (cipher, secured) = handshake.finish()?;
            self.cipher = Some(cipher);
            self.set_max_frame_len(self.max_frame_len);
            Ok(secured)
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| HandshakeError::Timeout(timeout))?
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &T {
        self.framed.get_ref()
    }

    /// The underlying stream, for writing bytes past the framing (tests of how the other
    /// side takes a broken stream). Anything fed and not flushed is written after them.
    pub fn get_mut(&mut self) -> &mut T {
        self.framed.get_mut()
    }

    /// Sends `body` as one message body as it is, not encoded (sealed once secured): for
    /// tests of how the other side takes a body that is not a valid message.
    pub async fn send_body(&mut self, body: &[u8]) -> Result<(), SendError> {
        let body = match self.cipher.as_mut() {
            None => Bytes::copy_from_slice(body),
            Some(cipher) => cipher.seal(body).map_err(SendError::Encrypt)?,
        };
        self.send_raw(body).await
    }

    /// The underlying stream, giving up the connection (bytes already buffered are lost).
    pub fn into_inner(self) -> T {
        self.framed.into_inner()
    }

    /// Closes the write side after flushing what is buffered (best effort, bounded by the
    /// write timeout).
    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(
            self.write_timeout,
            SinkExt::<Bytes>::close(&mut self.framed),
        )
        .await;
    }
}

/// Checks the other side's hello against ours.
pub fn check_hello(theirs: &Hello) -> Result<(), HandshakeError> {
    let ours = Hello::current();
    if theirs.protocol != PROTOCOL_NAME {
        return Err(HandshakeError::WrongProtocol(theirs.protocol.clone()));
    }
    if theirs.version != ours.version {
        return Err(HandshakeError::VersionMismatch {
            ours: ours.version,
            theirs: theirs.version,
        });
    }
    Ok(())
}
