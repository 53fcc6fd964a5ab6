//! [`ControlClient`]: a bare client of the control protocol (client ↔ discovery) on the real
//! [`proto::Connection`], for load generation. It registers, then sends requests and reads
//! responses, one at a time or pipelined; pushes are skipped. The peer runtime's control
//! actor does more (reconnects, timers); the benchmarks need only the wire.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use proto::{
    Connection, ErrorReply, Identity, Registration, Reply, Request, RequestFrame, RequestId,
    ServerMsg, Username, identity::registration_transcript,
};
use tokio::net::{TcpSocket, TcpStream};

use crate::BenchError;

/// How long the hello, the challenge and each response may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// One control connection to a discovery server.
#[derive(Debug)]
pub struct ControlClient {
    connection: Connection<TcpStream>,
    nonce: [u8; 32],
    /// The connection's handshake hash, signed into the registration.
    channel: [u8; 32],
    next_id: RequestId,
}

impl ControlClient {
    /// Connects to `server` (from `source` when given, else the default loopback address),
    /// runs the Noise handshake (accepting the server's key: the bench started the server)
    /// and reads the challenge.
    pub async fn connect(server: SocketAddr, source: Option<Ipv4Addr>) -> Result<Self, BenchError> {
        let socket = TcpSocket::new_v4()?;
        if let Some(source) = source {
            socket.bind(SocketAddr::from((source, 0)))?;
        }
        let stream = tokio::time::timeout(REPLY_TIMEOUT, socket.connect(server))
            .await
            .map_err(|_| BenchError::Timeout(format!("connecting to {server}")))??;
        stream.set_nodelay(true)?;
        let mut connection = Connection::new(stream);
        let secured = connection.client_handshake(REPLY_TIMEOUT).await?;
        let nonce = match timeout_recv(&mut connection).await? {
            ServerMsg::Challenge { nonce } => nonce,
            other => {
                return Err(BenchError::Protocol(format!(
                    "expected a challenge, got {other:?}"
                )));
            }
        };
        Ok(Self {
            connection,
            nonce,
            channel: secured.handshake_hash,
            next_id: 1,
        })
    }

    /// Registers as `user` with `identity`'s keys (listening on no peer port).
    pub async fn register(
        &mut self,
        identity: &Identity,
        user: &Username,
    ) -> Result<(), BenchError> {
        let keys = identity.public().clone();
        let signature = identity.sign(&registration_transcript(
            &self.nonce,
            &self.channel,
            user,
            &keys,
        ));
        let request = Request::Register(Registration {
            user: user.clone(),
            keys,
            listen_ports: Vec::new(),
            signature,
        });
        match self.request(request).await? {
            Reply::Registered { .. } => Ok(()),
            other => Err(BenchError::Protocol(format!(
                "expected registered, got {other:?}"
            ))),
        }
    }

    /// Sends `request` and waits for its response.
    pub async fn request(&mut self, request: Request) -> Result<Reply, BenchError> {
        let id = self.send(request).await?;
        let (answered, result) = self.recv().await?;
        if answered != id {
            return Err(BenchError::Protocol(format!(
                "response to request {answered} while waiting for {id}"
            )));
        }
        result.map_err(BenchError::Refused)
    }

    /// Sends `request` without waiting; returns its id (pipelining: pair it with
    /// [`ControlClient::recv`], responses come in request order).
    pub async fn send(&mut self, request: Request) -> Result<RequestId, BenchError> {
        let id = self.next_id;
        self.next_id += 1;
        self.connection.send(&RequestFrame { id, request }).await?;
        Ok(id)
    }

    /// The next response (pushes are skipped).
    pub async fn recv(&mut self) -> Result<(RequestId, Result<Reply, ErrorReply>), BenchError> {
        loop {
            match timeout_recv(&mut self.connection).await? {
                ServerMsg::Response { id, result } => return Ok((id, result)),
                ServerMsg::Push(_) => {}
                ServerMsg::Closing(reason) => return Err(BenchError::Refused(reason)),
                ServerMsg::Challenge { .. } => {
                    return Err(BenchError::Protocol("a second challenge".into()));
                }
            }
        }
    }
}

async fn timeout_recv(connection: &mut Connection<TcpStream>) -> Result<ServerMsg, BenchError> {
    match tokio::time::timeout(REPLY_TIMEOUT, connection.recv::<ServerMsg>()).await {
        Err(_) => Err(BenchError::Timeout(format!(
            "no message from the server in {REPLY_TIMEOUT:?}"
        ))),
        Ok(Err(error)) => Err(error.into()),
        Ok(Ok(None)) => Err(BenchError::Protocol(
            "the server closed the connection".into(),
        )),
        Ok(Ok(Some(message))) => Ok(message),
    }
}
