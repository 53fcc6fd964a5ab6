//! [`Connection`]: one framed stream, generic over `AsyncRead + AsyncWrite`, that sends and
//! receives typed messages. It owns the framing, its buffers and, once a handshake of
//! [`crate::noise`] has run, the records of [`crate::record`]; callers only see messages.
//!
//! Its buffers live only while there is something in them: the read side's are given back
//! when a read has to wait with nothing left to take, the write side's once a flush has
//! written everything. A busy connection reuses them from frame to frame (no allocation per
//! frame); an idle one, as most of a server's clients are, holds none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::{
    Identity,
    msg::{Hello, PROTOCOL_NAME},
    noise::{Handshake, NoiseError, Secured, ServerKey},
    record::Records,
    wire::{self, MAX_FRAME_LEN, WireError},
};

/// How long a single write may take before the peer is considered stuck.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the hello exchange may take.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first capacity of a buffer that was given back (or never had any): control and peer
/// messages are a few hundred bytes (an idle client's sealed heartbeat and pong a few
/// dozen), and a buffer grows by doubling for more, the read buffer only as bytes arrive.
const INITIAL_BUFFER: usize = 256;
/// How many bytes of fed frames (before a handshake) or sealed records are kept before they
/// are written out without a flush, so a burst leaves in few writes.
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
pub struct Connection<T> {
    io: T,
    write_timeout: Duration,
    /// The largest message body, before encryption.
    max_frame_len: usize,
    /// Bytes read and not taken yet: frames before a handshake, sealed records after.
    received: BytesMut,
    /// Bytes to write, from `written` on: frames before a handshake, sealed records after.
    unsent: Vec<u8>,
    written: usize,
    /// Set once a handshake finished: every frame from then on travels in records.
    records: Option<Records>,
}

impl<T> std::fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("max_frame_len", &self.max_frame_len)
            .field("received", &self.received.len())
            .field("unsent", &(self.unsent.len() - self.written))
            .field("records", &self.records)
            .finish_non_exhaustive()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Connection<T> {
    /// A connection with the default limits ([`MAX_FRAME_LEN`], [`DEFAULT_WRITE_TIMEOUT`]).
    pub fn new(io: T) -> Self {
        Self::with_limits(io, MAX_FRAME_LEN, DEFAULT_WRITE_TIMEOUT)
    }

    /// A connection with an explicit frame limit and write timeout.
    pub fn with_limits(io: T, max_frame_len: usize, write_timeout: Duration) -> Self {
        Self {
            io,
            write_timeout,
            max_frame_len: max_frame_len.min(u32::MAX as usize),
            received: BytesMut::new(),
            unsent: Vec::new(),
            written: 0,
            records: None,
        }
    }

    /// The largest message body received or sent (before encryption).
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Changes the frame limit for the frames received and sent from now on (a server keeps
    /// it small until the client has registered). Records follow it
    /// ([`crate::record::record_limit`]).
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.max_frame_len = max_frame_len.min(u32::MAX as usize);
    }

    /// Whether a handshake has run: every frame is encrypted and authenticated.
    pub fn is_secured(&self) -> bool {
        self.records.is_some()
    }

    /// Receives the next message: `Ok(None)` on a clean close between frames.
    ///
    /// Cancel-safe: a partly received frame stays buffered, so this can sit in a `select!`.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, RecvError> {
        self.receive(|connection| {
            let max = connection.max_frame_len;
            match connection.records.as_mut() {
                Some(records) => records.next(&mut connection.received, max),
                None => take_plain(&mut connection.received, max, wire::decode)?
                    .transpose()
                    .map_err(RecvError::from),
            }
        })
        .await
    }

    /// Receives one frame body as it is on the wire (a handshake message).
    async fn recv_raw(&mut self) -> Result<Option<Vec<u8>>, RecvError> {
        self.receive(|connection| {
            let max = connection.max_frame_len;
            take_plain(&mut connection.received, max, <[u8]>::to_vec)
        })
        .await
    }

    /// Takes what `take` finds in the buffers, reading more until it finds something or the
    /// stream ends. Cancel-safe: `take` runs whole between reads, and a read that is
    /// cancelled has read nothing.
    async fn receive<R>(
        &mut self,
        take: impl Fn(&mut Self) -> Result<Option<R>, RecvError>,
    ) -> Result<Option<R>, RecvError> {
        loop {
            if let Some(found) = take(self)? {
                return Ok(Some(found));
            }
            if !std::future::poll_fn(|context| self.poll_read_more(context)).await? {
                return if self.received.is_empty() {
                    Ok(None)
                } else {
                    Err(RecvError::Truncated)
                };
            }
        }
    }

    /// Reads what has arrived: `false` at the end of the stream. The buffer grows with the
    /// bytes that arrive (doubling when full), never by what a header declares. A read that
    /// has to wait with nothing buffered gives the read buffers back.
    fn poll_read_more(&mut self, context: &mut Context<'_>) -> Poll<Result<bool, RecvError>> {
        if self.received.len() == self.received.capacity() {
            self.received
                .reserve(self.received.capacity().max(INITIAL_BUFFER));
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), context, &mut self.received) {
            Poll::Pending => {
                if self.received.is_empty() {
                    self.received = BytesMut::new();
                    if let Some(records) = self.records.as_mut() {
                        records.release_read();
                    }
                }
                Poll::Pending
            }
            Poll::Ready(Ok(read)) => Poll::Ready(Ok(read > 0)),
            Poll::Ready(Err(error)) => Poll::Ready(Err(RecvError::Io(error))),
        }
    }

    /// Sends one message and flushes it, failing if the peer does not take it within the
    /// write timeout.
    pub async fn send<M: Serialize + ?Sized>(&mut self, message: &M) -> Result<(), SendError> {
        self.buffer(message)?;
        self.flush().await
    }

    /// Buffers one message without flushing it (see [`Connection::flush`]), so a burst of
    /// messages (acks of a batch, a window of envelopes) leaves in few writes and, once
    /// secured, in few records. Waits only to write out a full batch, bounded by the write
    /// timeout.
    pub async fn feed<M: Serialize + ?Sized>(&mut self, message: &M) -> Result<(), SendError> {
        self.buffer(message)?;
        if self.unsent.len() - self.written >= WRITE_BATCH {
            let batch = write_out(&mut self.io, &mut self.unsent, &mut self.written);
            timed(self.write_timeout, batch).await?;
        }
        Ok(())
    }

    /// Appends one message's frame to what waits to be sent (the record being built, once
    /// secured), refused if the message exceeds the frame limit.
    fn buffer<M: Serialize + ?Sized>(&mut self, message: &M) -> Result<(), SendError> {
        let max = self.max_frame_len;
        self.append(|frames| {
            let start = frames.len();
            let len = wire::encode_frame(message, frames)?;
            if len > max {
                frames.truncate(start);
                return Err(SendError::TooLarge { len, max });
            }
            Ok(())
        })
    }

    /// Appends one frame with `write`: to the bytes to write, or to the record being built
    /// (sealed into them when it is full).
    fn append(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), SendError>,
    ) -> Result<(), SendError> {
        let frames = match self.records.as_mut() {
            Some(records) => records.pending(),
            None => &mut self.unsent,
        };
        // Room for a typical frame at once: encoding grows the buffer a byte at a time.
        frames.reserve(INITIAL_BUFFER);
        let start = frames.len();
        write(frames)?;
        if let Some(records) = self.records.as_mut() {
            records
                .fed(start, self.max_frame_len, &mut self.unsent)
                .map_err(SendError::Encrypt)?;
        }
        Ok(())
    }

    /// Writes out what [`Connection::feed`] buffered (sealing the record being built), within
    /// the write timeout, then gives the write buffers back.
    pub async fn flush(&mut self) -> Result<(), SendError> {
        if let Some(records) = self.records.as_mut() {
            records.seal(&mut self.unsent).map_err(SendError::Encrypt)?;
        }
        let everything = async {
            write_out(&mut self.io, &mut self.unsent, &mut self.written).await?;
            self.io.flush().await
        };
        timed(self.write_timeout, everything).await?;
        self.unsent = Vec::new();
        if let Some(records) = self.records.as_mut() {
            records.release_write();
        }
        Ok(())
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
                self.send_body(&first).await?;
            }
            let message = match self.recv_raw().await {
                Ok(Some(message)) => message,
                Ok(None) => return Err(HandshakeError::Closed),
                Err(error) => return Err(error.into()),
            };
            handshake.read(&message)?;
            if !initiator {
                let second = handshake.write()?;
                self.send_body(&second).await?;
            }
            let (cipher, secured) = handshake.finish()?;
            self.records = Some(Records::new(cipher));
            Ok(secured)
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| HandshakeError::Timeout(timeout))?
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// The underlying stream, for writing bytes past the framing (tests of how the other
    /// side takes a broken stream). Anything fed and not flushed is written after them.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// Sends `body` as one frame's body as it is, not encoded (in a record once secured),
    /// and flushes it: the handshake messages, and tests of how the other side takes a body
    /// that is not a valid message.
    pub async fn send_body(&mut self, body: &[u8]) -> Result<(), SendError> {
        self.append(|frames| {
            wire::append_frame_with(frames, |out| {
                out.extend_from_slice(body);
                Ok(())
            })
            .map(drop)
        })?;
        self.flush().await
    }

    /// The underlying stream, giving up the connection (bytes already buffered are lost).
    pub fn into_inner(self) -> T {
        self.io
    }

    /// Closes the write side after flushing what is buffered (best effort, bounded by the
    /// write timeout).
    pub async fn close(&mut self) {
        if self.flush().await.is_ok() {
            let _ = tokio::time::timeout(self.write_timeout, self.io.shutdown()).await;
        }
    }
}

/// Writes `unsent` from `written` on. Cancel-safe: `written` counts what went out.
async fn write_out<T: AsyncWrite + Unpin>(
    io: &mut T,
    unsent: &mut Vec<u8>,
    written: &mut usize,
) -> io::Result<()> {
    while *written < unsent.len() {
        match io.write(&unsent[*written..]).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            wrote => *written += wrote,
        }
    }
    unsent.clear();
    *written = 0;
    Ok(())
}

/// Runs one write within `timeout`.
async fn timed(
    timeout: Duration,
    write: impl std::future::Future<Output = io::Result<()>>,
) -> Result<(), SendError> {
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(SendError::Io(error)),
        Err(_) => Err(SendError::Timeout(timeout)),
    }
}

/// Takes the plain frame at the start of `received` (before a handshake), read by `read`.
fn take_plain<R>(
    received: &mut BytesMut,
    max_frame_len: usize,
    read: impl FnOnce(&[u8]) -> R,
) -> Result<Option<R>, RecvError> {
    match wire::split_frame(received, max_frame_len) {
        Err(_) => Err(RecvError::FrameTooLarge { max: max_frame_len }),
        Ok(None) => Ok(None),
        Ok(Some((body, len))) => {
            let found = read(body);
            received.advance(len);
            Ok(Some(found))
        }
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

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::{MessageId, PeerMsg};

    const WAIT: Duration = Duration::from_secs(5);

    async fn secured_pair() -> (Connection<DuplexStream>, Connection<DuplexStream>) {
        let key = ServerKey::generate();
        let (left, right) = tokio::io::duplex(1 << 20);
        let (mut client, mut server) = (Connection::new(left), Connection::new(right));
        let (secured, served) = tokio::join!(
            client.client_handshake(WAIT),
            server.server_handshake(&key, WAIT)
        );
        secured.unwrap();
        served.unwrap();
        (client, server)
    }

    fn held(connection: &Connection<DuplexStream>) -> usize {
        connection.received.capacity()
            + connection.unsent.capacity()
            + connection.records.as_ref().map_or(0, Records::capacity)
    }

    /// What a server holds per idle client is mostly this: nothing, once a read waits.
    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (mut client, mut server) = secured_pair().await;
        for _ in 0..3 {
            let ack = PeerMsg::Ack {
                id: MessageId::random(),
            };
            client.feed(&ack).await.unwrap();
        }
        client.flush().await.unwrap();
        for _ in 0..3 {
            let _: PeerMsg = server.recv().await.unwrap().unwrap();
        }
        server.send(&"x".repeat(20_000)).await.unwrap();
        let _: String = client.recv().await.unwrap().unwrap();
        // A read that has to wait gives the read side back; a flush, the write side.
        assert!(server.recv::<PeerMsg>().now_or_never().is_none());
        assert!(client.recv::<PeerMsg>().now_or_never().is_none());
        assert_eq!(held(&server), 0);
        assert_eq!(held(&client), 0);
    }

    /// Regression: tokio-util's codec reserved a frame's declared length as soon as the
    /// header arrived; records are read the same way frames are, as their bytes arrive.
    #[tokio::test]
    async fn a_declared_record_reserves_nothing_before_its_bytes_arrive() {
        let (mut client, mut server) = secured_pair().await;
        client
            .get_mut()
            .write_all(&60_000u32.to_be_bytes())
            .await
            .unwrap();
        client.get_mut().write_all(&[7; 10]).await.unwrap();
        assert!(server.recv::<PeerMsg>().now_or_never().is_none());
        assert_eq!(server.received.len(), 14);
        assert!(held(&server) < 1024, "reserved {}", held(&server));
    }
}
