//! [`Connection`]: one framed stream, generic over `AsyncRead + AsyncWrite`, that sends and
//! receives typed messages. It owns the framing; callers only see messages.

use std::{io, time::Duration};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::{
    msg::{Hello, PROTOCOL_NAME},
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
const INITIAL_BUFFER: usize = 512;

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
}

impl<T: AsyncRead + AsyncWrite + Unpin> Connection<T> {
    /// A connection with the default limits ([`MAX_FRAME_LEN`], [`DEFAULT_WRITE_TIMEOUT`]).
    pub fn new(io: T) -> Self {
        Self::with_limits(io, MAX_FRAME_LEN, DEFAULT_WRITE_TIMEOUT)
    }

    /// A connection with an explicit frame limit and write timeout.
    pub fn with_limits(io: T, max_frame_len: usize, write_timeout: Duration) -> Self {
        Self {
            framed: Framed::with_capacity(io, wire::codec(max_frame_len), INITIAL_BUFFER),
            write_timeout,
        }
    }

    /// The largest frame body received or sent.
    pub fn max_frame_len(&self) -> usize {
        self.framed.codec().max_frame_len()
    }

    /// Changes the frame limit for the frames received and sent from now on (a server keeps
    /// it small until the client has registered).
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.framed.codec_mut().set_max_frame_len(max_frame_len);
    }

    /// Receives the next message: `Ok(None)` on a clean close between frames.
    ///
    /// Cancel-safe: a partly received frame stays buffered, so this can sit in a `select!`.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, RecvError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Ok(body)) => Ok(Some(wire::decode(&body)?)),
            Some(Err(error)) => Err(self.recv_error(error)),
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
        match tokio::time::timeout(self.write_timeout, self.framed.send(body)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SendError::Io(error)),
            Err(_) => Err(SendError::Timeout(self.write_timeout)),
        }
    }

    /// One message's frame body, refused if it exceeds the frame limit.
    fn frame<M: Serialize + ?Sized>(&self, message: &M) -> Result<Bytes, SendError> {
        let body = wire::encode(message)?;
        if body.len() > self.max_frame_len() {
            return Err(SendError::TooLarge {
                len: body.len(),
                max: self.max_frame_len(),
            });
        }
        Ok(body)
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

    /// Exchanges [`Hello`]s: sends ours, then checks theirs, all within `timeout`.
    pub async fn hello(&mut self, timeout: Duration) -> Result<(), HandshakeError> {
        let exchange = async {
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
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HandshakeError::Timeout(timeout))?
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &T {
        self.framed.get_ref()
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
