//! The control connection to the discovery server, as an actor.
//!
//! [`spawn`] starts one task that owns the connection: it connects, runs the Noise
//! handshake and checks the server's key against the pin ([`crate::server_trust`]; a
//! changed key is fatal and nothing is sent), answers the challenge with a registration
//! signed for this connection, then multiplexes requests from any
//! number of [`ControlHandle`]s (matched to responses by id), sends heartbeats and forwards
//! server pushes as [`ControlEvent`]s. When the connection dies (closed, error, or no pong in
//! time) every pending request fails with [`ControlError::Offline`] and the task reconnects
//! with [`Backoff`], registering again. A session the server closes with `session_limit`
//! (a newer login of the same user went over the per-user limit) is not reconnected: that
//! would close another session of the user, which would reconnect in turn, and so on
//! forever; the actor reports it as [`ControlEvent::Fatal`] and stops. The pure pieces, [`PingTracker`] and [`Backoff`],
//! take time as an argument.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use crate::server_trust::{ServerKeyError, ServerTrust};
use proto::{
    Connection, ErrorCode, ErrorReply, Identity, Push, Registration, Reply, Request, RequestFrame,
    RequestId, ServerMsg, Username, identity::registration_transcript,
};
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

/// How long to wait for a pong (or any response) before the connection is considered dead.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may wait for its response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a control request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Not connected to the discovery server now.
    #[error("not connected to the discovery server ({0})")]
    Offline(String),
    /// The server did not answer in time.
    #[error("the discovery server did not answer within {0:?}")]
    Timeout(Duration),
    /// The server refused the request.
    #[error("the server refused: {0}")]
    Refused(ErrorReply),
    /// The server answered with a reply of the wrong kind.
    #[error("the server sent an unexpected reply")]
    Unexpected,
    /// The runtime is shutting down.
    #[error("the client is shutting down")]
    ShuttingDown,
}

impl ControlError {
    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused(reply) => Some(reply.code),
            _ => None,
        }
    }
}

/// What the control actor tells the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// Registered (again): the runtime fetches mail and flushes its outbox.
    Online {
        /// The address the server sees us at.
        observed: SocketAddr,
        /// Whether this registration bound the name for the first time.
        new_binding: bool,
    },
    /// The connection is gone; reconnecting in `retry_in`.
    Offline {
        /// Why, in one line.
        reason: String,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// Registration was refused for good (name bound to other keys, bad signature), or the
    /// server closed this session for a newer login of the same user (`session_limit`):
    /// the actor stops.
    Fatal(ErrorReply),
    /// A server push.
    Push(Push),
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The discovery server's address (`host:port`).
    pub server: String,
    /// Who we are.
    pub user: Username,
    /// The P2P port to advertise.
    pub listen_port: u16,
    /// How long to wait for a pong.
    pub pong_timeout: Duration,
    /// Heartbeat interval until the server says otherwise.
    pub heartbeat_interval: Duration,
    /// Reconnect backoff bounds.
    pub backoff_min: Duration,
    /// Reconnect backoff bounds.
    pub backoff_max: Duration,
    /// The server keys this client trusts.
    pub trust: ServerTrust,
}

type Pending = oneshot::Sender<Result<Reply, ControlError>>;

/// A cheap handle for sending requests over the control connection.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    requests: mpsc::Sender<(Request, Pending)>,
}

impl ControlHandle {
    /// Sends `request` and waits (at most [`REQUEST_TIMEOUT`]) for its reply. Fails at once
    /// when offline: callers decide whether to retry later.
    pub async fn request(&self, request: Request) -> Result<Reply, ControlError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.requests
            .send((request, reply_tx))
            .await
            .map_err(|_| ControlError::ShuttingDown)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ControlError::Offline("connection lost".into())),
            Err(_) => Err(ControlError::Timeout(REQUEST_TIMEOUT)),
        }
    }
}

/// Keep-alive bookkeeping: when to ping, and when a missing pong means a dead connection.
#[derive(Debug, Clone)]
pub struct PingTracker {
    timeout: Duration,
    outstanding_since: Option<Instant>,
}

/// What a heartbeat tick should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingAction {
    /// Send a heartbeat.
    Ping,
    /// A heartbeat is outstanding and not yet overdue: wait.
    Wait,
    /// No pong within the timeout: the connection is dead.
    Dead,
}

impl PingTracker {
    /// A tracker that declares the connection dead after `timeout` without a pong.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            outstanding_since: None,
        }
    }

    /// Called on every tick.
    pub fn on_tick(&mut self, now: Instant) -> PingAction {
        match self.outstanding_since {
            Some(since) if now.saturating_duration_since(since) >= self.timeout => PingAction::Dead,
            Some(_) => PingAction::Wait,
            None => {
                self.outstanding_since = Some(now);
                PingAction::Ping
            }
        }
    }

    /// When the outstanding ping becomes overdue, if one is outstanding.
    pub fn deadline(&self) -> Option<Instant> {
        self.outstanding_since.map(|since| since + self.timeout)
    }

    /// Called when a pong arrives.
    pub fn on_pong(&mut self) {
        self.outstanding_since = None;
    }
}

/// Exponential reconnect backoff with jitter (the one doubling backoff of the workspace).
pub use durable::Backoff;

/// Starts the control actor. Events go to `events`; the actor stops when `shutdown` fires
/// or after a [`ControlEvent::Fatal`]. When `events` is full the actor waits for room (the
/// runtime is behind; the actor's requests and heartbeats wait with it).
pub fn spawn(
    config: ControlConfig,
    identity: Arc<Identity>,
    events: mpsc::Sender<ControlEvent>,
    shutdown: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> ControlHandle {
    let (requests_tx, requests_rx) = mpsc::channel(256);
    tracker.spawn(run(config, identity, events, requests_rx, shutdown));
    ControlHandle {
        requests: requests_tx,
    }
}

async fn run(
    config: ControlConfig,
    identity: Arc<Identity>,
    events: mpsc::Sender<ControlEvent>,
    mut requests: mpsc::Receiver<(Request, Pending)>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    loop {
        let reason = match connect(&config, &identity, &shutdown).await {
            Ok(Some((connection, heartbeat, observed, new_binding))) => {
                backoff.reset();
                let _ = events
                    .send(ControlEvent::Online {
                        observed,
                        new_binding,
                    })
                    .await;
                match session(
                    connection,
                    heartbeat,
                    &config,
                    &events,
                    &mut requests,
                    &shutdown,
                )
                .await
                {
                    SessionEnd::Lost(reason) => reason,
                    SessionEnd::Replaced(reply) => {
                        tracing::warn!(%reply, "closed for a newer login of this user; not reconnecting");
                        let _ = events.send(ControlEvent::Fatal(reply)).await;
                        return;
                    }
                }
            }
            Ok(None) => return,
            Err(ConnectError::Fatal(reply)) => {
                tracing::error!(%reply, "registration refused");
                let _ = events.send(ControlEvent::Fatal(reply)).await;
                return;
            }
            Err(ConnectError::Retry(reason)) => reason,
        };
        if shutdown.is_cancelled() {
            return;
        }
        let retry_in = backoff.next_delay(proto::random_bytes::<1>()[0]);
        tracing::info!(%reason, ?retry_in, "discovery server connection lost");
        let _ = events
            .send(ControlEvent::Offline { reason, retry_in })
            .await;
        // While offline, requests fail at once instead of waiting for the reconnect.
        let wait = tokio::time::sleep(retry_in);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = &mut wait => break,
                request = requests.recv() => match request {
                    Some((_, reply)) => {
                        let _ = reply.send(Err(ControlError::Offline("reconnecting".into())));
                    }
                    None => return,
                },
            }
        }
    }
}

enum ConnectError {
    Retry(String),
    Fatal(ErrorReply),
}

type Registered = (Connection<TcpStream>, Duration, SocketAddr, bool);

/// Why no secure connection to the server could be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TCP connection did not open in time.
    #[error("connecting to {0} timed out")]
    TimedOut(String),
    /// The TCP connection failed.
    #[error("cannot connect to {server}: {source}")]
    Connect {
        /// The server address.
        server: String,
        /// Why.
        source: std::io::Error,
    },
    /// The hellos or the Noise handshake failed.
    #[error(transparent)]
    Handshake(#[from] proto::HandshakeError),
}

/// Connects to the discovery server at `server` and runs the Noise handshake, each step
/// within `timeout`. The server's key is in [`proto::Secured::remote_static`], for the
/// caller to check before it sends anything.
async fn dial_server(
    server: &str,
    timeout: Duration,
) -> Result<(Connection<TcpStream>, proto::Secured), DialError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(server))
        .await
        .map_err(|_| DialError::TimedOut(server.to_owned()))?
        .map_err(|source| DialError::Connect {
            server: server.to_owned(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let mut connection = Connection::new(stream);
    let secured = connection.client_handshake(timeout).await?;
    Ok((connection, secured))
}

/// Connects to the server at `server` and returns the key it presents (nothing else is
/// sent): what `p2pchat trust-server` shows and pins.
pub async fn presented_key(
    server: &str,
    timeout: Duration,
) -> Result<proto::ServerPublicKey, DialError> {
    let (mut connection, secured) = dial_server(server, timeout).await?;
    connection.close().await;
    Ok(proto::ServerPublicKey(secured.remote_static))
}

/// Registers as `config.user` with `identity` on a connection of its own (not the actor's:
/// the runtime need not run) and, with a `rotation`, asks the server to move the name to
/// the rotation's new keys; returns once the server confirmed. Without one it only checks
/// that `identity` is the one bound to the name. What `p2pchat identity rotate` does.
pub async fn rotate_keys(
    config: &ControlConfig,
    identity: &Identity,
    rotation: Option<proto::identity::Rotation>,
) -> Result<(), ControlError> {
    let (mut connection, ..) = match connect(config, identity, &CancellationToken::new()).await {
        Ok(Some(registered)) => registered,
        Ok(None) => return Err(ControlError::ShuttingDown),
        Err(ConnectError::Retry(reason)) => return Err(ControlError::Offline(reason)),
        Err(ConnectError::Fatal(reply)) => return Err(ControlError::Refused(reply)),
    };
    let result = match rotation {
        None => Ok(()),
        Some(rotation) => rotate_on(&mut connection, rotation).await,
    };
    connection.close().await;
    result
}

/// Sends one `Rotate` on a registered connection and waits for its answer.
async fn rotate_on(
    connection: &mut Connection<TcpStream>,
    rotation: proto::identity::Rotation,
) -> Result<(), ControlError> {
    let frame = RequestFrame {
        id: 1,
        request: Request::Rotate(rotation),
    };
    connection
        .send(&frame)
        .await
        .map_err(|error| ControlError::Offline(error.to_string()))?;
    loop {
        match recv_timed(connection).await {
            Ok(ServerMsg::Response {
                id: 1,
                result: Ok(Reply::Done),
            }) => return Ok(()),
            Ok(ServerMsg::Response {
                id: 1,
                result: Err(reply),
            })
            | Ok(ServerMsg::Closing(reply)) => return Err(ControlError::Refused(reply)),
            Ok(ServerMsg::Response { id: 1, .. }) => return Err(ControlError::Unexpected),
            Ok(_) => {}
            Err(ConnectError::Retry(reason)) => return Err(ControlError::Offline(reason)),
            Err(ConnectError::Fatal(reply)) => return Err(ControlError::Refused(reply)),
        }
    }
}

/// Connects, exchanges hellos and registers. `Ok(None)` when shut down meanwhile.
async fn connect(
    config: &ControlConfig,
    identity: &Identity,
    shutdown: &CancellationToken,
) -> Result<Option<Registered>, ConnectError> {
    let attempt = async {
        let (mut connection, secured) = dial_server(&config.server, REQUEST_TIMEOUT)
            .await
            .map_err(|error| match error {
                DialError::Handshake(
                    proto::HandshakeError::VersionMismatch { .. }
                    | proto::HandshakeError::WrongProtocol(_),
                ) => ConnectError::Fatal(ErrorReply::new(
                    ErrorCode::VersionMismatch,
                    error.to_string(),
                )),
                other => ConnectError::Retry(other.to_string()),
            })?;
        // Nothing is sent before the server's key is the one trusted for this address.
        let presented = proto::ServerPublicKey(secured.remote_static);
        config
            .trust
            .check(&config.server, presented)
            .await
            .map_err(|error| match error {
                ServerKeyError::File { .. } => ConnectError::Retry(error.to_string()),
                refused => ConnectError::Fatal(ErrorReply::new(
                    ErrorCode::ServerKeyChanged,
                    refused.to_string(),
                )),
            })?;
        let nonce = match recv_timed(&mut connection).await? {
            ServerMsg::Challenge { nonce } => nonce,
            ServerMsg::Closing(reply) => return Err(refusal(reply)),
            _ => {
                return Err(ConnectError::Retry(
                    "the server did not send a challenge".into(),
                ));
            }
        };
        let keys = identity.public().clone();
        let signature = identity.sign(&registration_transcript(
            &nonce,
            &secured.handshake_hash,
            &config.user,
            &keys,
        ));
        let register = RequestFrame {
            id: 0,
            request: Request::Register(Registration {
                user: config.user.clone(),
                keys,
                // Port 0: a one-off connection that takes no peers (`rotate_keys`).
                listen_ports: (config.listen_port != 0)
                    .then_some(config.listen_port)
                    .into_iter()
                    .collect(),
                signature,
            }),
        };
        connection
            .send(&register)
            .await
            .map_err(|error| ConnectError::Retry(error.to_string()))?;
        loop {
            match recv_timed(&mut connection).await? {
                ServerMsg::Response {
                    id: 0,
                    result:
                        Ok(Reply::Registered {
                            observed,
                            new_binding,
                            heartbeat_interval_ms,
                            ..
                        }),
                } => {
                    let heartbeat = if heartbeat_interval_ms == 0 {
                        config.heartbeat_interval
                    } else {
                        Duration::from_millis(heartbeat_interval_ms)
                    };
                    return Ok((connection, heartbeat, observed, new_binding));
                }
                ServerMsg::Response {
                    result: Err(reply), ..
                }
                | ServerMsg::Closing(reply) => {
                    return Err(refusal(reply));
                }
                // Pushes may arrive at any time; before registering they can be ignored.
                ServerMsg::Push(_) => {}
                _ => return Err(ConnectError::Retry("unexpected answer to register".into())),
            }
        }
    };
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Ok(None),
        result = attempt => result.map(Some),
    }
}

/// Refusals that another attempt cannot fix stop the actor; the rest are retried.
fn refusal(reply: ErrorReply) -> ConnectError {
    match reply.code {
        ErrorCode::NameTaken
        | ErrorCode::BadSignature
        | ErrorCode::InvalidName
        | ErrorCode::VersionMismatch => ConnectError::Fatal(reply),
        _ => ConnectError::Retry(reply.to_string()),
    }
}

async fn recv_timed(connection: &mut Connection<TcpStream>) -> Result<ServerMsg, ConnectError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, connection.recv::<ServerMsg>()).await {
        Ok(Ok(Some(message))) => Ok(message),
        Ok(Ok(None)) => Err(ConnectError::Retry(
            "the server closed the connection".into(),
        )),
        Ok(Err(error)) => Err(ConnectError::Retry(error.to_string())),
        Err(_) => Err(ConnectError::Retry(
            "the server did not answer in time".into(),
        )),
    }
}

/// How a registered connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SessionEnd {
    /// Lost (closed, failed, silent, shutting down): why, in one line. Reconnect.
    Lost(String),
    /// Closed by the server for a newer login of the same user: do not reconnect.
    Replaced(ErrorReply),
}

/// What a `Closing` from the server means for this session.
fn after_closing(reply: ErrorReply) -> SessionEnd {
    match reply.code {
        ErrorCode::SessionLimit => SessionEnd::Replaced(reply),
        _ => SessionEnd::Lost(format!("the server closed the connection: {reply}")),
    }
}

/// Serves one registered connection until it ends; returns how.
async fn session(
    mut connection: Connection<TcpStream>,
    heartbeat: Duration,
    config: &ControlConfig,
    events: &mpsc::Sender<ControlEvent>,
    requests: &mut mpsc::Receiver<(Request, Pending)>,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let mut pending: HashMap<RequestId, Pending> = HashMap::new();
    // Watch requests not answered yet: a server older than them closes the connection
    // with `bad_request` when it reads one, and they are then refused with that reason
    // (not failed as `Offline`), so the runtime stops asking that server.
    let mut watches: Vec<RequestId> = Vec::new();
    let mut next_id: RequestId = 1;
    let mut ping = PingTracker::new(config.pong_timeout);
    let mut heartbeat_id: Option<RequestId> = None;
    let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        // The pong deadline is checked on its own timer so a dead connection is noticed
        // `pong_timeout` after the ping, not at the next heartbeat tick.
        let overdue = ping.deadline();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                let _ = tokio::time::timeout(
                    Duration::from_millis(500),
                    connection.send(&RequestFrame { id: next_id, request: Request::Unregister }),
                ).await;
                connection.close().await;
                break "shutting down".to_owned();
            }
            frame = connection.recv::<ServerMsg>() => match frame {
                Ok(Some(ServerMsg::Response { id, result })) => {
                    if Some(id) == heartbeat_id {
                        heartbeat_id = None;
                        ping.on_pong();
                    } else if let Some(reply) = pending.remove(&id) {
                        watches.retain(|watch| *watch != id);
                        let _ = reply.send(result.map_err(ControlError::Refused));
                    }
                }
                Ok(Some(ServerMsg::Push(push))) => {
                    let _ = events.send(ControlEvent::Push(push)).await;
                }
                Ok(Some(ServerMsg::Closing(reply))) => match after_closing(reply.clone()) {
                    SessionEnd::Lost(reason) => {
                        if reply.code == ErrorCode::BadRequest {
                            for id in watches.drain(..) {
                                if let Some(pending) = pending.remove(&id) {
                                    let _ = pending.send(Err(ControlError::Refused(reply.clone())));
                                }
                            }
                        }
                        break reason;
                    }
                    replaced @ SessionEnd::Replaced(_) => {
                        for (_, pending) in pending.drain() {
                            let _ = pending.send(Err(ControlError::Offline("closed for a newer login".into())));
                        }
                        return replaced;
                    }
                },
                Ok(Some(ServerMsg::Challenge { .. })) => {}
                Ok(None) => break "the server closed the connection".to_owned(),
                Err(error) => break format!("connection error: {error}"),
            },
            request = requests.recv() => {
                let Some((request, reply)) = request else { break "shutting down".to_owned() };
                let id = next_id;
                next_id += 1;
                let watch = matches!(request, Request::Watch { .. } | Request::Unwatch { .. });
                match connection.send(&RequestFrame { id, request }).await {
                    Ok(()) => {
                        pending.insert(id, reply);
                        if watch {
                            watches.push(id);
                        }
                    }
                    Err(error) => {
                        let _ = reply.send(Err(ControlError::Offline(error.to_string())));
                        break format!("send failed: {error}");
                    }
                }
            }
            _ = ticker.tick() => match ping.on_tick(Instant::now()) {
                PingAction::Ping => {
                    let id = next_id;
                    next_id += 1;
                    heartbeat_id = Some(id);
                    if let Err(error) = connection.send(&RequestFrame { id, request: Request::Heartbeat }).await {
                        break format!("heartbeat failed: {error}");
                    }
                }
                PingAction::Wait => {}
                PingAction::Dead => break "no answer to the heartbeat".to_owned(),
            },
            () = sleep_until_opt(overdue) => break format!("no answer to the heartbeat within {:?}", config.pong_timeout),
        }
    };
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(ControlError::Offline(reason.clone())));
    }
    SessionEnd::Lost(reason)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: a session closed for a newer login reconnected at once and closed another
    /// session of the same user, which did the same: nine processes of one identity
    /// evicted one another forever. Only `session_limit` ends the session for good; any
    /// other closing reason is a loss to reconnect after.
    #[test]
    fn only_a_session_limit_closing_stops_reconnecting() {
        let replaced = ErrorReply::new(ErrorCode::SessionLimit, "a newer login");
        assert_eq!(
            after_closing(replaced.clone()),
            SessionEnd::Replaced(replaced)
        );
        for code in [
            ErrorCode::NotRegistered,
            ErrorCode::ServerBusy,
            ErrorCode::Unavailable,
        ] {
            assert!(matches!(
                after_closing(ErrorReply::new(code, "x")),
                SessionEnd::Lost(reason) if reason.starts_with("the server closed the connection")
            ));
        }
    }

    #[test]
    fn ping_tracker_declares_death_only_after_the_timeout() {
        let start = Instant::now();
        let mut tracker = PingTracker::new(Duration::from_secs(10));
        assert_eq!(tracker.on_tick(start), PingAction::Ping);
        assert_eq!(tracker.deadline(), Some(start + Duration::from_secs(10)));
        assert_eq!(
            tracker.on_tick(start + Duration::from_secs(9)),
            PingAction::Wait
        );
        tracker.on_pong();
        assert_eq!(tracker.deadline(), None);
        let later = start + Duration::from_secs(20);
        assert_eq!(tracker.on_tick(later), PingAction::Ping);
        assert_eq!(
            tracker.on_tick(later + Duration::from_secs(10)),
            PingAction::Dead
        );
    }
}
