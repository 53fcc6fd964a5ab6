//! The async shell: the accept loop, one actor task per connection, the [`Hub`] that routes
//! pushes to connected users, and the broadcast fan-out from the store.
//!
//! Each connection is one task running one `select!` loop (cancellation first): pushes out,
//! requests in (each handed to the [`Session`] state machine, its one reply written back),
//! and the idle deadline. Every write has a timeout; any bad input closes that connection
//! only, after a `Closing` frame that says why.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use proto::{
    Connection, ErrorCode, ErrorReply, HandshakeError, Push, RecvError, Reply, Request,
    RequestFrame, RequestId, SendError, ServerMsg, Username,
};
use store::{Broadcast, Store};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    handler::{Event, Session},
    limits::{self, TokenBucket},
    metrics::Metrics,
    per_ip::{IpSlot, PerIp, PerIpLimits},
    per_sender::{DepositLimits, PerSender},
};

/// The first and the longest pause after a failed accept (out of file descriptors and the
/// like): the failure repeats at once, so the loop backs off instead of spinning, and keeps
/// serving the connections it has meanwhile.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// How many pushes may wait for one slow client before new ones are dropped (they are hints
/// and announcements; mail itself waits in the store).
const PUSH_QUEUE: usize = 64;

/// What the hub hands a connection's actor. Every connection's queue holds a block of
/// these, so the rare large ones are boxed: the enum stays 32 bytes.
#[derive(Debug, Clone)]
enum Outbound {
    /// A push to send to the client.
    Push(Box<Push>),
    /// Another session of this connection's user closed, and may have taken the user's
    /// presence with it: write this session's presence again now, not at its next
    /// heartbeat; `announce`: the other session was on another instance and its contacts
    /// heard "offline", so tell them this one is online.
    RefreshPresence {
        /// Tell the contacts.
        announce: bool,
    },
    /// A contact's presence changed (see [`Session::presence_of`]).
    Presence {
        /// Whose.
        user: Username,
        /// Online now or not.
        online: bool,
        /// Whether the sender asks this session to answer with its own presence.
        answer: bool,
    },
    /// A newer session of this connection's user registered: where the server sees it,
    /// and when (ms since the epoch).
    SessionElsewhere(Box<(SocketAddr, u64)>),
    /// These users' presence lapsed without their sessions leaving (see
    /// [`Session::lapsed`]).
    Lapsed(Arc<HashSet<Username>>),
}

/// One registered session's entry in the hub.
#[derive(Debug)]
struct Route {
    /// The session's presence id.
    session: u64,
    /// Where its pushes go.
    sender: mpsc::Sender<Outbound>,
    /// Cancelled when newer sessions of the same user push this one over the per-user
    /// session limit: the connection then closes with `session_limit`.
    evict: CancellationToken,
}

/// The connections of one user on this instance, oldest first: almost always one; more
/// while a client reconnects before the server has seen its old connection close, or when
/// several processes run with one identity (at most the per-user session limit).
#[derive(Debug)]
enum Sessions {
    One(Route),
    Many(Vec<Route>),
}

impl Sessions {
    /// These sessions with `route` added as the newest (an entry of the same id is replaced).
    fn with(self, route: Route) -> Self {
        match self.without(route.session) {
            None => Self::One(route),
            Some(Self::One(other)) => Self::Many(vec![other, route]),
            Some(Self::Many(mut many)) => {
                many.push(route);
                Self::Many(many)
            }
        }
    }

    /// These sessions without `session`; `None` if none is left.
    fn without(self, session: u64) -> Option<Self> {
        match self {
            Self::One(current) if current.session == session => None,
            one @ Self::One(..) => Some(one),
            Self::Many(mut many) => {
                many.retain(|route| route.session != session);
                Self::from_routes(many)
            }
        }
    }

    /// These sessions less the oldest beyond `max`, and the ones taken out.
    fn keeping(self, max: usize) -> (Option<Self>, Vec<Route>) {
        match self {
            Self::Many(mut many) if many.len() > max => {
                let evicted = many.drain(..many.len() - max).collect();
                (Self::from_routes(many), evicted)
            }
            other => (Some(other), Vec::new()),
        }
    }

    fn from_routes(mut routes: Vec<Route>) -> Option<Self> {
        match routes.len() {
            0 => None,
            1 => Some(Self::One(routes.remove(0))),
            _ => Some(Self::Many(routes)),
        }
    }

    fn routes(&self) -> &[Route] {
        match self {
            Self::One(route) => std::slice::from_ref(route),
            Self::Many(routes) => routes,
        }
    }
}

/// Routes pushes to the connections of registered users on this instance (every session of
/// a user gets them).
#[derive(Debug, Default)]
pub struct Hub {
    clients: Mutex<HashMap<Username, Sessions>>,
}

impl Hub {
    /// Adds `route` as the newest session of `user`. Beyond `max_sessions`, the oldest
    /// sessions are taken out and told to close (their `evict` token is cancelled); returns
    /// how many.
    fn insert(&self, user: Username, route: Route, max_sessions: usize) -> usize {
        let mut clients = self.lock();
        let sessions = match clients.remove(&user) {
            Some(sessions) => sessions.with(route),
            None => Sessions::One(route),
        };
        let (kept, evicted) = sessions.keeping(max_sessions.max(1));
        if let Some(kept) = kept {
            clients.insert(user, kept);
        }
        for route in &evicted {
            route.evict.cancel();
        }
        evicted.len()
    }

    /// Removes `session` of `user`. If another session of the user is still connected
    /// here, the most recent one is told to write its presence again (the closing session
    /// may have owned the presence record and cleared it), and this returns true.
    fn remove(&self, user: &Username, session: u64) -> bool {
        let mut clients = self.lock();
        let Some(remaining) = clients
            .remove(user)
            .and_then(|sessions| sessions.without(session))
        else {
            return false;
        };
        if let Some(latest) = remaining.routes().last() {
            let _ = latest
                .sender
                .try_send(Outbound::RefreshPresence { announce: false });
        }
        clients.insert(user.clone(), remaining);
        true
    }

    /// Session `ended` of `user` ended on another instance and cleared the user's
    /// presence: the most recent session of `user` here (if any) writes it again and tells
    /// its contacts it is online.
    fn take_over(&self, user: &Username, ended: u64) {
        if let Some(sessions) = self.lock().get(user)
            && let Some(latest) = sessions
                .routes()
                .iter()
                .rev()
                .find(|route| route.session != ended)
        {
            let _ = latest
                .sender
                .try_send(Outbound::RefreshPresence { announce: true });
        }
    }

    /// Offers `user`'s presence to every session here of the users in `to`; each decides
    /// by its own watch set whether its client hears of it. A full queue drops the offer.
    fn offer_presence(&self, user: &Username, online: bool, to: &[Username], answer: bool) {
        let clients = self.lock();
        for recipient in to {
            let Some(sessions) = clients.get(recipient) else {
                continue;
            };
            for route in sessions.routes() {
                let _ = route.sender.try_send(Outbound::Presence {
                    user: user.clone(),
                    online,
                    answer,
                });
            }
        }
    }

    /// Tells every session of `user` here but `session` that `session` registered.
    fn tell_others(&self, user: &Username, session: u64, observed: SocketAddr, at_ms: u64) {
        if let Some(sessions) = self.lock().get(user) {
            for route in sessions.routes() {
                if route.session != session {
                    let _ = route
                        .sender
                        .try_send(Outbound::SessionElsewhere(Box::new((observed, at_ms))));
                }
            }
        }
    }

    /// Pushes to `user` if they are connected here; a full queue drops the push.
    pub fn push(&self, user: &Username, push: Push) {
        if let Some(sessions) = self.lock().get(user) {
            for route in sessions.routes() {
                let _ = route
                    .sender
                    .try_send(Outbound::Push(Box::new(push.clone())));
            }
        }
    }

    /// Tells every session here that `users`' presence lapsed without their sessions
    /// leaving; each pushes "offline" for those of them it showed online. A full queue
    /// drops the notice.
    fn tell_lapsed(&self, users: &Arc<HashSet<Username>>) {
        for sessions in self.lock().values() {
            for route in sessions.routes() {
                let _ = route.sender.try_send(Outbound::Lapsed(Arc::clone(users)));
            }
        }
    }

    /// Pushes to every registered user connected here.
    pub fn push_all(&self, push: &Push) {
        for sessions in self.lock().values() {
            for route in sessions.routes() {
                let _ = route
                    .sender
                    .try_send(Outbound::Push(Box::new(push.clone())));
            }
        }
    }

    /// How many users are connected here.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no user is connected here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Username, Sessions>> {
        // A panic while holding this lock cannot leave the map inconsistent (every update
        // rebuilds one user's entry before putting it back), so a poisoned lock is still
        // usable.
        self.clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What every connection task shares.
struct Shared {
    store: Store,
    config: Config,
    metrics: Arc<Metrics>,
    hub: Hub,
    per_ip: Arc<PerIp>,
    deposits: Arc<PerSender>,
}

/// Runs the discovery server on `listener` until `shutdown` is cancelled, with fresh metrics.
pub async fn run(
    listener: TcpListener,
    store: Store,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve(
        listener,
        store,
        config,
        Arc::new(Metrics::default()),
        shutdown,
    )
    .await
}

/// Runs the discovery server on `listener`, counting into `metrics`, until `shutdown` is
/// cancelled; then tells every client, and waits (bounded) for the connections to close.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let per_ip = PerIp::new(PerIpLimits {
        connections: config.per_ip_connections,
        requests_per_second: config.per_ip_requests_per_second,
        request_burst: config.per_ip_request_burst,
        new_names_per_hour: config.per_ip_new_names_per_hour,
    });
    let deposits = Arc::new(PerSender::new(DepositLimits {
        per_minute: config.deposits_per_minute,
        bytes_per_hour: config.deposit_bytes_per_hour,
    }));
    let shared = Arc::new(Shared {
        store,
        config,
        metrics,
        hub: Hub::default(),
        per_ip,
        deposits,
    });
    let tracker = TaskTracker::new();
    // Subscribe before accepting anyone, so no event published for a client is missed.
    let events = shared.store.subscribe();
    tracker.spawn(fan_out(events, Arc::clone(&shared), shutdown.clone()));
    tracker.spawn(sweep_lapsed(Arc::clone(&shared), shutdown.clone()));
    let config = &shared.config;
    let open_files = limits::open_file_limit();
    let cap = limits::connection_cap(config.max_connections, open_files, config.open_file_reserve);
    shared.metrics.connection_cap.set(cap as u64);
    if cap < config.max_connections {
        tracing::warn!(
            configured = config.max_connections,
            cap,
            open_files,
            reserve = config.open_file_reserve,
            "the open-file limit holds fewer connections than configured; the cap is lowered"
        );
    }
    tracing::info!(cap, open_files, "connection cap");
    let permits = Arc::new(Semaphore::new(cap));
    // Refusals hold a descriptor for up to a few seconds each: they share half the reserve,
    // and a connection beyond that is closed at once without a word.
    let refusals = Arc::new(Semaphore::new(
        usize::try_from(config.open_file_reserve / 2)
            .unwrap_or(usize::MAX)
            .max(1),
    ));
    let mut accept_backoff = ACCEPT_BACKOFF.0;
    tracing::info!(address = %listener.local_addr()?, "discovery server listening");

    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    accept_backoff = ACCEPT_BACKOFF.0;
                    accepted
                }
                Err(error) => {
                    shared.metrics.accept_errors.inc();
                    let failures = shared.metrics.accept_errors.get();
                    if failures.is_power_of_two() {
                        tracing::warn!(%error, failures, retry_in = ?accept_backoff, "accept failed; backing off");
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(accept_backoff) => {}
                    }
                    accept_backoff = (accept_backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(slot) =
            shared
                .per_ip
                .connect(peer.ip(), std::time::Instant::now(), proto::now_ms())
        else {
            shared.metrics.per_ip_refused_connections.inc();
            shared.metrics.error(ErrorCode::ServerBusy);
            let message = format!(
                "too many connections from your address (the limit is {} at once); close some or try again later",
                shared.config.per_ip_connections
            );
            if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                let key = Arc::clone(&shared.config.server_key);
                tracker.spawn(async move {
                    refuse_busy(stream, key, message).await;
                    drop(permit);
                });
            }
            continue;
        };
        match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                let shared = Arc::clone(&shared);
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    shared.metrics.connected.inc();
                    serve_connection(stream, peer, &slot, &shared, shutdown).await;
                    shared.metrics.connected.dec();
                    drop((permit, slot));
                });
            }
            Err(_) => {
                drop(slot);
                shared.metrics.refused_connections.inc();
                shared.metrics.error(ErrorCode::ServerBusy);
                if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                    let key = Arc::clone(&shared.config.server_key);
                    tracker.spawn(async move {
                        refuse_busy(
                            stream,
                            key,
                            "the server is at its connection limit; try again later".to_owned(),
                        )
                        .await;
                        drop(permit);
                    });
                }
            }
        }
    }
    tracker.close();
    if tokio::time::timeout(shared.config.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close within the drain timeout");
    }
    tracing::info!("discovery server stopped");
    Ok(())
}

/// Forwards store broadcasts to the users connected to this instance.
async fn fan_out(
    mut events: tokio::sync::broadcast::Receiver<Broadcast>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(Broadcast::Announcement { text }) => {
                let push = Push::Announcement {
                    text,
                    at_ms: proto::now_ms(),
                };
                // Whoever holds Redis access can publish any text on the channel; one too
                // large for a frame is dropped here, once, rather than refused by every
                // connection's write. (Announcements are rare: the clone is nothing.)
                match proto::wire::encoded_len(&ServerMsg::Push(push.clone())) {
                    Ok(len) if len <= shared.config.max_frame_len => {
                        if let Push::Announcement { text, .. } = &push {
                            // Debug-formatted: the text is quoted and its control
                            // characters escaped, so it cannot forge log lines.
                            tracing::info!(text = ?text, len, "announcement pushed to every client");
                        }
                        shared.hub.push_all(&push);
                    }
                    Ok(len) => tracing::warn!(
                        len,
                        max = shared.config.max_frame_len,
                        "announcement too large for a frame; not pushed"
                    ),
                    Err(error) => tracing::warn!(%error, "announcement not encodable; not pushed"),
                }
            }
            Ok(Broadcast::MailWaiting { user }) => shared.hub.push(&user, Push::MailWaiting),
            Ok(Broadcast::Presence {
                user,
                online,
                to,
                answer,
            }) => shared.hub.offer_presence(&user, online, &to, answer),
            Ok(Broadcast::SessionElsewhere {
                user,
                session,
                observed,
                at_ms,
            }) => shared.hub.tell_others(&user, session, observed, at_ms),
            Ok(Broadcast::SessionEnded { user, session }) => shared.hub.take_over(&user, session),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "broadcast fan-out lagged; clients re-fetch on their timer"
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Every heartbeat interval, finds the users whose presence lapsed since the last look
/// without their session leaving ([`Store::lapsed`]: the instance that held them died, so
/// nobody told their contacts), and tells every session here ([`Hub::tell_lapsed`]). Every
/// instance sweeps for its own sessions; the store read is one range per online index
/// bucket. Contacts so hear of a dead instance's users one presence timeout after their
/// last heartbeat, plus at most one interval.
async fn sweep_lapsed(shared: Arc<Shared>, shutdown: CancellationToken) {
    let interval = shared.config.heartbeat_interval;
    let mut after_ms = proto::now_ms();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now_ms = proto::now_ms();
        match shared.store.lapsed(after_ms, now_ms).await {
            Ok(lapsed) => {
                after_ms = now_ms;
                if !lapsed.is_empty() {
                    tracing::info!(
                        users = lapsed.len(),
                        "presence lapsed without its session leaving (an instance stopped); telling contacts here"
                    );
                    shared
                        .hub
                        .tell_lapsed(&Arc::new(lapsed.into_iter().collect()));
                }
            }
            // The same range is read again, longer, next time.
            Err(error) => tracing::warn!(%error, "could not read lapsed presence"),
        }
    }
}

/// Tells a connection over a connection limit `server_busy`, with `message`, and closes it.
async fn refuse_busy(stream: TcpStream, key: Arc<proto::ServerKey>, message: String) {
    let mut connection = Connection::with_limits(stream, 1024, Duration::from_secs(2));
    if connection
        .server_handshake(&key, Duration::from_secs(2))
        .await
        .is_ok()
    {
        let _ = connection
            .send(&ServerMsg::Closing(ErrorReply::new(
                ErrorCode::ServerBusy,
                message,
            )))
            .await;
    }
    connection.close().await;
}

/// Tells the client why it is being closed (best effort) and counts the reason.
async fn close_with(
    connection: &mut Connection<TcpStream>,
    metrics: &Metrics,
    code: ErrorCode,
    message: impl Into<String>,
) {
    let reason = ErrorReply::new(code, message);
    tracing::debug!(%reason, "closing connection");
    metrics.error(code);
    let _ = connection.send(&ServerMsg::Closing(reason)).await;
    connection.close().await;
}

/// Sends the one response to request `id`. A reply too large for a frame (a `List` of
/// more online users than fit, a lookup of a user registered with a huge port list) is
/// refused by the codec before anything is written, so the client gets a `too_large` error
/// in its place instead of losing its connection with no answer at all.
async fn send_response(
    connection: &mut Connection<TcpStream>,
    metrics: &Metrics,
    id: RequestId,
    result: Result<Reply, ErrorReply>,
) -> Result<(), SendError> {
    match connection.send(&ServerMsg::Response { id, result }).await {
        Err(SendError::TooLarge { len, max }) => {
            tracing::warn!(
                len,
                max,
                "reply too large for a frame; answered with an error"
            );
            metrics.error(ErrorCode::TooLarge);
            let error = ErrorReply::new(
                ErrorCode::TooLarge,
                format!("the reply ({len} bytes) does not fit the {max} byte frame limit"),
            );
            connection
                .send(&ServerMsg::Response {
                    id,
                    result: Err(error),
                })
                .await
        }
        other => other,
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: &IpSlot,
    shared: &Shared,
    shutdown: CancellationToken,
) {
    let config = &shared.config;
    let metrics = &shared.metrics;
    // Until the client registers, its frames are limited to a few KiB and it has one
    // deadline, counted from accept: no request (not even a refused one) extends it.
    let mut connection =
        Connection::with_limits(stream, config.preauth_max_frame_len, config.write_timeout);
    let mut registration_deadline = Instant::now() + config.handshake_timeout;

    let handshake = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return,
        handshake = connection.server_handshake(&config.server_key, config.handshake_timeout) => handshake,
    };
    let secured = match handshake {
        Ok(secured) => secured,
        Err(error) => {
            tracing::debug!(%peer, %error, "handshake failed");
            let code = match &error {
                HandshakeError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
                HandshakeError::Recv(RecvError::FrameTooLarge { .. }) => ErrorCode::TooLarge,
                // Nothing more can be said on a connection whose handshake failed half-way
                // (the other side expects encrypted frames, or is gone).
                HandshakeError::Timeout(_)
                | HandshakeError::Closed
                | HandshakeError::Noise(_)
                | HandshakeError::Send(_) => return,
                _ => ErrorCode::BadRequest,
            };
            if !connection.is_secured() {
                close_with(&mut connection, metrics, code, error.to_string()).await;
            }
            return;
        }
    };

    let nonce: [u8; 32] = proto::random_bytes();
    let mut session = Session::new(nonce, u64::from_le_bytes(proto::random_bytes()), peer)
        .bound_to(secured.handshake_hash)
        .limited_by(Arc::clone(&shared.per_ip))
        .with_deposit_budgets(Arc::clone(&shared.deposits));
    if connection
        .send(&ServerMsg::Challenge { nonce })
        .await
        .is_err()
    {
        return;
    }
    let (push_sender, mut pushes) = mpsc::channel::<Outbound>(PUSH_QUEUE);
    let evict = CancellationToken::new();
    let mut bucket = TokenBucket::new(
        config.requests_per_second,
        config.request_burst,
        std::time::Instant::now(),
    );
    let mut last_activity = Instant::now();

    loop {
        let deadline = match session.user() {
            None => registration_deadline,
            Some(_) => last_activity + config.presence_ttl,
        };
        // Presence pushes held back by their per-contact interval share the deadline's
        // timer (one timer in every connection's task, which is what the server holds per
        // client): it wakes at whichever comes first (a millisecond late rather than early,
        // so the wall clock has reached the due time when it does).
        let wake = session.next_presence_due_ms().map_or(deadline, |due_ms| {
            let due =
                Instant::now() + Duration::from_millis(due_ms.saturating_sub(proto::now_ms()) + 1);
            due.min(deadline)
        });
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                close_with(&mut connection, metrics, ErrorCode::Unavailable, "the server is shutting down; reconnect shortly").await;
                break;
            }
            _ = evict.cancelled() => {
                let message = format!(
                    "a newer login with your name went over the limit of {} sessions at once; this session, the oldest, was closed to make room",
                    config.max_sessions_per_user
                );
                close_with(&mut connection, metrics, ErrorCode::SessionLimit, message).await;
                break;
            }
            Some(outbound) = pushes.recv() => match outbound {
                Outbound::Push(push) => match connection.send(&ServerMsg::Push(*push)).await {
                    Ok(()) => {}
                    // Refused before a byte was written: the connection is intact, and a
                    // push is a notice the client can do without.
                    Err(SendError::TooLarge { len, max }) => {
                        tracing::debug!(%peer, len, max, "push too large for a frame; dropped");
                    }
                    Err(_) => break,
                },
                Outbound::Presence { user, online, answer } => {
                    let (push, reply) = session.presence_of(&user, online, answer, proto::now_ms());
                    if let Some(push) = push {
                        metrics.presence_pushes.inc();
                        if connection.send(&ServerMsg::Push(push)).await.is_err() {
                            break;
                        }
                    }
                    if let Some(reply) = reply
                        && let Err(error) = shared.store.publish(&reply).await
                    {
                        tracing::debug!(%error, "could not answer a contact's presence");
                    }
                }
                Outbound::Lapsed(users) => {
                    let mut sent = true;
                    for push in session.lapsed(&users, proto::now_ms()) {
                        metrics.presence_pushes.inc();
                        sent = connection.send(&ServerMsg::Push(push)).await.is_ok();
                        if !sent {
                            break;
                        }
                    }
                    if !sent {
                        break;
                    }
                }
                Outbound::SessionElsewhere(elsewhere) => {
                    let (observed, at_ms) = *elsewhere;
                    if session.wants_new_pushes()
                        && connection
                            .send(&ServerMsg::Push(Push::SessionElsewhere { observed, at_ms }))
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
                Outbound::RefreshPresence { announce } => {
                    if session.user().is_some() {
                        let now_ms = proto::now_ms();
                        let (result, _) = Box::pin(
                            session.handle(Request::Heartbeat, &shared.store, config, metrics, now_ms),
                        )
                        .await;
                        match result {
                            Err(error) => tracing::warn!(%peer, %error, "could not write presence again; the next heartbeat will"),
                            Ok(_) if announce => {
                                if let Some(notice) = session.online_notice()
                                    && let Err(error) = Box::pin(shared.store.publish(&notice)).await
                                {
                                    tracing::warn!(%error, "could not tell contacts a user is still online");
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                }
            },
            frame = connection.recv::<RequestFrame>() => {
                let RequestFrame { id, request } = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(RecvError::FrameTooLarge { max }) => {
                        let message = if session.user().is_some() {
                            format!("frames are limited to {max} bytes")
                        } else {
                            metrics.preauth_oversized_frames.inc();
                            format!("before registration, frames are limited to {max} bytes")
                        };
                        close_with(&mut connection, metrics, ErrorCode::TooLarge, message).await;
                        break;
                    }
                    Err(RecvError::Unauthentic) => {
                        tracing::info!(%peer, "a frame failed authentication");
                        close_with(&mut connection, metrics, ErrorCode::BadRequest, "a frame failed authentication (changed on the way, or not from this connection's client)").await;
                        break;
                    }
                    Err(RecvError::Malformed(error)) => {
                        tracing::info!(%peer, %error, "malformed request");
                        close_with(&mut connection, metrics, ErrorCode::BadRequest, format!("{error} (usernames must match [a-z0-9_-]{{1,32}})")).await;
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(%peer, %error, "connection failed");
                        break;
                    }
                };
                last_activity = Instant::now();
                let now = std::time::Instant::now();
                // The connection's own bucket first: a connection over its own rate does
                // not spend its address's shared budget.
                let within_connection = bucket.take(now);
                let within_address = within_connection && slot.take_request(now);
                let result = if within_address {
                    // Boxed: the request future is ~2.5 KiB, and unboxed it would be part of
                    // every idle connection's task, which is what the server holds per client.
                    let (result, event) = Box::pin(
                        session.handle(request, &shared.store, config, metrics, proto::now_ms()),
                    )
                    .await;
                    match event {
                        Some(Event::Registered(user)) => {
                            // Names and addresses only: no key, challenge or signature.
                            let new_binding = matches!(result, Ok(Reply::Registered { new_binding: true, .. }));
                            tracing::info!(%user, %peer, new_binding, "registered");
                            connection.set_max_frame_len(config.max_frame_len);
                            let route = Route {
                                session: session.session_id(),
                                sender: push_sender.clone(),
                                evict: evict.clone(),
                            };
                            let evicted = shared.hub.insert(user.clone(), route, config.max_sessions_per_user);
                            metrics.sessions_evicted.add(evicted as u64);
                            // The user's other sessions, here or on other instances, hear
                            // that direct messages now come here.
                            let elsewhere = Broadcast::SessionElsewhere {
                                user,
                                session: session.session_id(),
                                observed: peer,
                                at_ms: proto::now_ms(),
                            };
                            if let Err(error) = shared.store.publish(&elsewhere).await {
                                tracing::debug!(%error, "could not tell other sessions of a new one");
                            }
                        }
                        Some(Event::Unregistered(user)) => {
                            tracing::info!(%user, %peer, "unregistered");
                            // Unregistered again: the limits of a new connection apply,
                            // with a fresh deadline to register again.
                            connection.set_max_frame_len(config.preauth_max_frame_len);
                            registration_deadline = Instant::now() + config.handshake_timeout;
                            let others_here = shared.hub.remove(&user, session.session_id());
                            let notice = session.take_offline_notice(&user);
                            if !others_here {
                                // Boxed, as below: kept out of every connection's task.
                                // Boxed: its two publishes would otherwise add to the state every connection's
            // task holds for its whole life (memory per client).
            Box::pin(left(&shared.store, &user, session.session_id(), notice)).await;
                            }
                        }
                        None => {}
                    }
                    result
                } else if within_connection {
                    metrics.per_ip_rate_limited.inc();
                    metrics.error(ErrorCode::RateLimited);
                    let message = format!(
                        "too many requests from your address (the limit is {} a second for all its connections together); slow down",
                        config.per_ip_requests_per_second
                    );
                    Err(ErrorReply::new(ErrorCode::RateLimited, message))
                } else {
                    metrics.error(ErrorCode::RateLimited);
                    Err(ErrorReply::new(ErrorCode::RateLimited, "too many requests; slow down"))
                };
                let registered_now = matches!(result, Ok(Reply::Registered { .. }));
                if send_response(&mut connection, metrics, id, result).await.is_err() {
                    break;
                }
                // A freshly registered client learns at once that mail is waiting.
                if registered_now
                    && let Some(user) = session.user()
                    && shared.store.mail_count(user).await.unwrap_or(0) > 0
                {
                    shared.hub.push(user, Push::MailWaiting);
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() < deadline {
                    let mut failed = false;
                    for push in session.presence_due(proto::now_ms()) {
                        metrics.presence_pushes.inc();
                        if connection.send(&ServerMsg::Push(push)).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        break;
                    }
                    continue;
                }
                // A silent registered client is no longer registered (it registers again on
                // its next connection); one that never registered broke the handshake rules.
                let (code, message) = match session.user() {
                    None => {
                        metrics.registration_timeouts.inc();
                        (ErrorCode::BadRequest, "no registration within the handshake timeout")
                    }
                    Some(user) => {
                        tracing::info!(%user, %peer, "no heartbeat within the presence timeout; closed");
                        (ErrorCode::NotRegistered, "no heartbeat within the presence timeout; register again")
                    }
                };
                close_with(&mut connection, metrics, code, message).await;
                break;
            }
        }
    }

    if let Some(user) = session.user().cloned() {
        let others_here = shared.hub.remove(&user, session.session_id());
        let cleared = match shared
            .store
            .clear_presence(&user, session.session_id(), proto::now_ms())
            .await
        {
            Ok(cleared) => cleared,
            Err(error) => {
                tracing::warn!(%error, %user, "could not clear presence; it lapses by its TTL");
                // The connection is gone all the same: its contacts hear it.
                true
            }
        };
        // Offline for contacts only when no other session of the user is here, and this
        // one still owned the presence record (no newer session elsewhere took it over).
        let notice = session.take_offline_notice(&user);
        if cleared && !others_here {
            Box::pin(left(&shared.store, &user, session.session_id(), notice)).await;
        }
    }
}

/// The last session of `user` here, `session`, left and cleared the user's presence: its
/// contacts hear it went offline (`notice`, if it watched anyone), and a session of the
/// user still open on another instance, if any, is told to take the presence over and
/// say it is online ([`Broadcast::SessionEnded`]). So contacts may see "offline" and then
/// "online"; each session's per-contact push interval merges the two into nothing when
/// they come close together. Best effort: these are notices.
async fn left(store: &Store, user: &Username, session: u64, notice: Option<Broadcast>) {
    if let Some(notice) = notice
        && let Err(error) = store.publish(&notice).await
    {
        tracing::warn!(%error, "could not tell contacts a user went offline");
    }
    let ended = Broadcast::SessionEnded {
        user: user.clone(),
        session,
    };
    if let Err(error) = store.publish(&ended).await {
        tracing::debug!(%error, "could not tell other sessions that one ended");
    }
}
