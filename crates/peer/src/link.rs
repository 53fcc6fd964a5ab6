//! [`PeerLink`]: the sending side of the peer protocol.
//!
//! A link is one TCP connection to a peer after the hellos and a Noise handshake (IK: the
//! dialer must know the recipient's exchange key, so only the recipient can answer, and
//! every frame after it, acks included, is encrypted and authenticated): the connecting side sends
//! [`PeerMsg::Hello`] naming both users, then [`PeerMsg::Envelope`]s, each answered by
//! [`PeerMsg::Ack`] (stored) or [`PeerMsg::Reject`] with its id. [`PeerLink::send`] sends one
//! and waits for its answer; a kept link is driven pipelined instead (many envelopes in
//! flight, answers matched by id) with [`PeerLink::feed`], [`PeerLink::flush`] and
//! [`PeerLink::next_answer`], by [`crate::outgoing`]. The receiving side is in
//! [`crate::inbox`].

use std::{net::SocketAddr, time::Duration};

use proto::{Connection, Envelope, ErrorReply, Identity, MessageId, PeerMsg, PublicKeys, Username};
use tokio::net::TcpStream;

/// The most envelopes sent and not yet answered on one link. Bounded so a slow receiver
/// cannot make the sender buffer without limit, and so the acks of a full window (about
/// 25 bytes each) always fit in the sender's socket buffer: the receiver's ack writes never
/// block on a sender that is itself blocked writing envelopes.
pub const WINDOW: usize = 1024;

/// Why sending over a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The hello exchange failed.
    #[error(transparent)]
    Handshake(#[from] proto::HandshakeError),
    /// Sending failed.
    #[error(transparent)]
    Send(#[from] proto::SendError),
    /// Receiving failed.
    #[error(transparent)]
    Recv(#[from] proto::RecvError),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// No answer in time.
    #[error("no answer from the peer within {0:?}")]
    Timeout(Duration),
    /// The peer refused the message (or the whole connection).
    #[error("refused by the peer: {0}")]
    Rejected(ErrorReply),
}

impl LinkError {
    /// Whether the attempt ended by waiting out a timeout (no connection, no hello or no
    /// answer in time), as against a quick answer: a refusal, a closed or refused
    /// connection. Only the first kind costs the sender a wait worth avoiding next time.
    pub fn timed_out(&self) -> bool {
        fn io_timed_out(error: &std::io::Error) -> bool {
            matches!(
                error.kind(),
                std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            )
        }
        match self {
            Self::Timeout(_)
            | Self::Handshake(proto::HandshakeError::Timeout(_))
            | Self::Handshake(proto::HandshakeError::Send(proto::SendError::Timeout(_)))
            | Self::Send(proto::SendError::Timeout(_)) => true,
            Self::Connect { source, .. } => io_timed_out(source),
            Self::Send(proto::SendError::Io(source))
            | Self::Recv(proto::RecvError::Io(source))
            | Self::Handshake(proto::HandshakeError::Recv(proto::RecvError::Io(source))) => {
                io_timed_out(source)
            }
            _ => false,
        }
    }
}

/// An open connection to one peer, ready to carry envelopes.
#[derive(Debug)]
pub struct PeerLink {
    connection: Connection<TcpStream>,
    peer: Username,
}

impl PeerLink {
    /// Connects to `addr`, runs the Noise handshake as `identity` with the holder of
    /// `peer_keys`' exchange key and announces `me` → `peer`, all within `timeout`. Anyone
    /// else at the address (a stale address, a redirection) cannot finish the handshake:
    /// the dial fails and nothing is sent.
    pub async fn dial(
        addr: SocketAddr,
        identity: &Identity,
        me: &Username,
        peer: &Username,
        peer_keys: &PublicKeys,
        timeout: Duration,
    ) -> Result<Self, LinkError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| LinkError::Timeout(timeout))?
            .map_err(|source| LinkError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let mut connection = Connection::with_limits(stream, proto::wire::MAX_FRAME_LEN, timeout);
        connection
            .dial_handshake(identity, &peer_keys.exchange, timeout)
            .await?;
        connection
            .send(&PeerMsg::Hello {
                from: me.clone(),
                to: peer.clone(),
            })
            .await?;
        Ok(Self {
            connection,
            peer: peer.clone(),
        })
    }

    /// The peer at the other end.
    pub fn peer(&self) -> &Username {
        &self.peer
    }

    /// Sends `envelope` and waits up to `ack_timeout` for its ack.
    pub async fn send(
        &mut self,
        envelope: &Envelope,
        ack_timeout: Duration,
    ) -> Result<(), LinkError> {
        self.connection
            .send(&PeerMsg::Envelope(envelope.clone()))
            .await?;
        let wait = async {
            loop {
                match self.connection.recv::<PeerMsg>().await? {
                    Some(PeerMsg::Ack { id }) if id == envelope.id => return Ok(()),
                    Some(PeerMsg::Reject { id, error })
                        if id.is_none() || id == Some(envelope.id) =>
                    {
                        return Err(LinkError::Rejected(error));
                    }
                    // A late answer to an earlier message on a reused link: skip it.
                    Some(PeerMsg::Ack { .. } | PeerMsg::Reject { .. }) => {}
                    Some(PeerMsg::Hello { .. } | PeerMsg::Envelope(_)) => {
                        return Err(LinkError::Closed);
                    }
                    None => return Err(LinkError::Closed),
                }
            }
        };
        tokio::time::timeout(ack_timeout, wait)
            .await
            .map_err(|_| LinkError::Timeout(ack_timeout))?
    }

    /// Buffers `envelope` for sending (written out by [`PeerLink::flush`], or when the
    /// buffer fills).
    pub async fn feed(&mut self, envelope: Envelope) -> Result<(), LinkError> {
        Ok(self.connection.feed(&PeerMsg::Envelope(envelope)).await?)
    }

    /// Writes out the buffered envelopes.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        Ok(self.connection.flush().await?)
    }

    /// The next answer: the envelope id it answers and whether it was stored (`Ok`) or
    /// refused. A refusal of the whole link (no id) is [`LinkError::Rejected`]. Cancel-safe.
    pub async fn next_answer(&mut self) -> Result<(MessageId, Result<(), ErrorReply>), LinkError> {
        match self.connection.recv::<PeerMsg>().await? {
            Some(PeerMsg::Ack { id }) => Ok((id, Ok(()))),
            Some(PeerMsg::Reject {
                id: Some(id),
                error,
            }) => Ok((id, Err(error))),
            Some(PeerMsg::Reject { id: None, error }) => Err(LinkError::Rejected(error)),
            Some(PeerMsg::Hello { .. } | PeerMsg::Envelope(_)) | None => Err(LinkError::Closed),
        }
    }
}
