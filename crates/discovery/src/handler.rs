//! The control protocol as a state machine: one [`Session`] per connection, fed one request
//! at a time with the time passed in, answering each with exactly one result.
//!
//! It touches the [`Store`] and nothing else: no sockets, no clocks, no tasks. The
//! connection code in [`crate::server`] only moves frames in and out of it, so every rule of
//! the protocol (who may do what, in which state, with which error) is tested here with plain
//! `#[tokio::test]`s over an embedded store.

use std::{collections::HashSet, net::SocketAddr, sync::Arc};

use proto::{
    ErrorCode, ErrorReply, MailRef, Push, Registration, Reply, Request, UserInfo, Username,
    identity::{
        Rotation, constant_time_eq, registration_transcript, release_proof, verify_announce_proof,
    },
};
use store::{
    BindOutcome, Binding, Broadcast, DepositOutcome, Presence, RotateOutcome, Store, StoreError,
};

use crate::{
    config::Config,
    metrics::Metrics,
    per_ip::PerIp,
    per_sender::{OverBudget, PerSender},
    presence::{WatchRefused, Watching},
};

/// The largest sealed token accepted in a deposit, in bytes (an Olm message, or the text of
/// an older build's token): a full-size body sealed, with room to spare, and well inside a
/// frame.
pub const MAX_TOKEN_LEN: usize = 48 * 1024;
/// The budget of one `Fetch` reply in encoded envelope bytes: a 64 KiB frame less room for
/// the response's own fields (tags, request id, lengths, `remaining`: a few dozen bytes).
const FETCH_REPLY_BUDGET: usize = proto::wire::MAX_FRAME_LEN - 256;

/// Where a connection is in the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Challenged, not registered: only `Register`, `Announce` and `ReleaseName` are
    /// allowed.
    Unregistered,
    /// Registered as `user`.
    Registered {
        /// The user.
        user: Username,
    },
}

/// What the server tells the rest of the process after a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// This connection is now `user` (route pushes for `user` here).
    Registered(Username),
    /// This connection no longer speaks for `user`.
    Unregistered(Username),
}

/// One control connection's protocol state.
#[derive(Debug)]
pub struct Session {
    nonce: [u8; 32],
    /// The connection's Noise handshake hash, bound into the registration signature.
    channel: [u8; 32],
    session_id: u64,
    observed: SocketAddr,
    state: State,
    listen_ports: Vec<u16>,
    /// The per-IP limits this session's address counts against (new names per hour);
    /// `None` limits nothing.
    per_ip: Option<Arc<PerIp>>,
    /// The deposit budgets this session's user counts against; `None` limits nothing.
    deposits: Option<Arc<PerSender>>,
    /// The mail sent in this connection's last `Mail` reply, until the next ack: what a
    /// [`Request::Ack`] of ids alone (the older form of [`Request::AckMail`]) refers to.
    last_fetched: Vec<MailRef>,
    /// The contacts whose presence this session watches; `None` until it sends
    /// [`Request::Watch`], and so asks for the pushes added with it.
    /// Boxed, so a session that never watches (an older client, an announcer) pays one
    /// word for it.
    watching: Option<Box<Watching>>,
}

/// A request's outcome: the reply to send and what changed.
pub type Outcome = (Result<Reply, ErrorReply>, Option<Event>);

impl Session {
    /// A session for a client seen at `observed`, challenged with `nonce`; `session_id`
    /// tells this connection's presence apart from any later one of the same user.
    pub fn new(nonce: [u8; 32], session_id: u64, observed: SocketAddr) -> Self {
        Self {
            nonce,
            channel: [0; 32],
            session_id,
            observed,
            state: State::Unregistered,
            listen_ports: Vec::new(),
            per_ip: None,
            deposits: None,
            last_fetched: Vec::new(),
            watching: None,
        }
    }

    /// This session, on the connection whose Noise handshake hash is `channel`: a
    /// registration must be signed for this connection
    /// ([`proto::identity::registration_transcript`]).
    pub fn bound_to(mut self, channel: [u8; 32]) -> Self {
        self.channel = channel;
        self
    }

    /// This session, with its user's deposits counted against the budgets in `deposits`.
    pub fn with_deposit_budgets(mut self, deposits: Arc<PerSender>) -> Self {
        self.deposits = Some(deposits);
        self
    }

    /// This session, with the new names it binds counted against its address's per-IP limit
    /// in `per_ip`.
    pub fn limited_by(mut self, per_ip: Arc<PerIp>) -> Self {
        self.per_ip = Some(per_ip);
        self
    }

    /// The protocol state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The registered user, if any.
    pub fn user(&self) -> Option<&Username> {
        match &self.state {
            State::Registered { user } => Some(user),
            State::Unregistered => None,
        }
    }

    /// This connection's presence id.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Whether the client asked for the pushes added with [`Request::Watch`]
    /// ([`Push::Presence`], [`Push::SessionElsewhere`]); an older client never does, and
    /// is never sent one (it could not decode it).
    pub fn wants_new_pushes(&self) -> bool {
        self.watching.is_some()
    }

    /// Another session said at `now_ms` that `user` is `online` (or not), asking for an
    /// answer or not: the push for this client, if it watches `user` (mutuality: the
    /// sender watches this session's user), and the answer to publish, if one was asked
    /// for and this session watches back (its own presence, for `user` alone).
    pub fn presence_of(
        &mut self,
        user: &Username,
        online: bool,
        answer: bool,
        now_ms: u64,
    ) -> (Option<Push>, Option<Broadcast>) {
        let Some(me) = self.user().cloned() else {
            return (None, None);
        };
        let Some(watching) = &mut self.watching else {
            return (None, None);
        };
        if !watching.watches(user) {
            return (None, None);
        }
        let push = watching.offer(user, online, now_ms);
        let reply = answer.then(|| Broadcast::Presence {
            user: me,
            online: true,
            to: vec![user.clone()],
            answer: false,
        });
        (push, reply)
    }

    /// The offline pushes owed for `users`, whose presence lapsed without their sessions
    /// leaving ([`Watching::lapsed`]).
    pub fn lapsed(&mut self, users: &HashSet<Username>, now_ms: u64) -> Vec<Push> {
        self.watching
            .as_mut()
            .map(|watching| watching.lapsed(users, now_ms))
            .unwrap_or_default()
    }

    /// The presence pushes held back by the per-contact interval and due at `now_ms`.
    pub fn presence_due(&mut self, now_ms: u64) -> Vec<Push> {
        self.watching
            .as_mut()
            .map(|watching| watching.due(now_ms))
            .unwrap_or_default()
    }

    /// When [`Session::presence_due`] next has something, if ever.
    pub fn next_presence_due_ms(&self) -> Option<u64> {
        self.watching.as_deref().and_then(Watching::next_due_ms)
    }

    /// The online notice this session's user owes its contacts when it takes over the
    /// user's presence from a session that ended elsewhere (whose contacts heard
    /// "offline"), if it is registered and watches anyone.
    pub fn online_notice(&self) -> Option<Broadcast> {
        presence_notice(self.user()?, true, self.watching.as_deref()?)
    }

    /// The offline notice `user` (this session's user, or the one it just unregistered)
    /// owes its contacts as the session leaves (the connection closed, timed out or
    /// unregistered), if it watches anyone; the watch set is forgotten.
    pub fn take_offline_notice(&mut self, user: &Username) -> Option<Broadcast> {
        presence_notice(user, false, &*self.watching.take()?)
    }

    /// Handles one request at `now_ms` and returns its one reply.
    pub async fn handle(
        &mut self,
        request: Request,
        store: &Store,
        config: &Config,
        metrics: &Metrics,
        now_ms: u64,
    ) -> Outcome {
        let outcome = match request {
            Request::Register(registration) => {
                self.register(registration, store, config, metrics, now_ms)
                    .await
            }
            Request::Announce { text, proof } => {
                (self.announce(text, proof, store, config).await, None)
            }
            Request::ReleaseName { user, proof } => {
                (self.release_name(user, proof, store, config).await, None)
            }
            request => match self.user().cloned() {
                None => (
                    Err(ErrorReply::new(
                        ErrorCode::NotRegistered,
                        "register first: this request needs a registered user",
                    )),
                    None,
                ),
                Some(me) => {
                    self.handle_registered(me, request, store, config, metrics, now_ms)
                        .await
                }
            },
        };
        match &outcome.0 {
            Ok(Reply::Registered { .. }) => metrics.registrations.inc(),
            Ok(_) => {}
            Err(error) => metrics.error(error.code),
        }
        outcome
    }

    async fn handle_registered(
        &mut self,
        me: Username,
        request: Request,
        store: &Store,
        config: &Config,
        metrics: &Metrics,
        now_ms: u64,
    ) -> Outcome {
        let result = match request {
            Request::Heartbeat => {
                let started = std::time::Instant::now();
                let refreshed = self
                    .refresh_presence(&me, store, config, now_ms, false)
                    .await;
                metrics.store_heartbeat.observe(started.elapsed());
                refreshed.map(|()| Reply::Pong)
            }
            Request::Lookup { user } => {
                metrics.lookups.inc();
                let started = std::time::Instant::now();
                let reply = lookup(&user, store, now_ms).await;
                metrics.store_lookup.observe(started.elapsed());
                reply
            }
            Request::List => store
                .online_users(now_ms)
                .await
                .map(|users| list_reply(users, config.list_max, metrics))
                .map_err(store_error),
            Request::Deposit { envelope } => {
                if let Some(deposits) = &self.deposits
                    && let Err(over) =
                        deposits.take(&me, envelope.token.len() as u64, std::time::Instant::now())
                {
                    metrics.deposits_over_budget.inc();
                    return (Err(over_budget(over, config)), None);
                }
                deposit(&me, envelope, store, metrics, now_ms).await
            }
            Request::Fetch { max } => {
                let reply = fetch(&me, max.min(config.fetch_batch), store, now_ms).await;
                if let Ok(Reply::Mail { envelopes, .. }) = &reply {
                    self.last_fetched = envelopes.iter().map(MailRef::of).collect();
                }
                reply
            }
            Request::Ack { ids } => {
                // Mail identity is (sender, id): an id alone names the messages of the last
                // fetch with that id, which is what the client that sends it has stored.
                let ids: std::collections::HashSet<_> = ids.into_iter().collect();
                let mail: Vec<MailRef> = std::mem::take(&mut self.last_fetched)
                    .into_iter()
                    .filter(|fetched| ids.contains(&fetched.id))
                    .collect();
                ack(&me, &mail, store, metrics).await
            }
            Request::AckMail { mail } => {
                self.last_fetched = Vec::new();
                ack(&me, &mail, store, metrics).await
            }
            Request::PublishPreKeys(prekeys) => publish_prekeys(&me, &prekeys, store).await,
            Request::ClaimPreKey { user } => {
                // A claim uses up one of the user's one-time keys: claims share the sender's
                // deposit budget, so nobody can drain someone's keys faster than they could
                // fill their mailbox (past the last key, sessions start on the fallback key).
                if let Some(deposits) = &self.deposits
                    && let Err(over) = deposits.take(&me, CLAIM_COST, std::time::Instant::now())
                {
                    metrics.deposits_over_budget.inc();
                    return (Err(over_budget(over, config)), None);
                }
                claim_prekey(&user, store).await
            }
            Request::Block { user } => set_blocked(&me, &user, true, store).await,
            Request::Unblock { user } => set_blocked(&me, &user, false, store).await,
            Request::Unregister => {
                return match store.clear_presence(&me, self.session_id, now_ms).await {
                    Ok(_) => {
                        self.state = State::Unregistered;
                        (Ok(Reply::Done), Some(Event::Unregistered(me)))
                    }
                    Err(error) => (Err(store_error(error)), None),
                };
            }
            Request::Watch { users } => self.watch(&me, users, store, metrics).await,
            Request::Unwatch { users } => self.unwatch(&me, users, store).await,
            Request::Rotate(rotation) => rotate(&me, rotation, store, now_ms).await,
            Request::Rotations { user } => store
                .rotations(&user)
                .await
                .map(Reply::Rotations)
                .map_err(store_error),
            Request::Register(_) | Request::Announce { .. } | Request::ReleaseName { .. } => {
                unreachable!("handled before the registration check")
            }
        };
        (result, None)
    }

    async fn register(
        &mut self,
        registration: Registration,
        store: &Store,
        config: &Config,
        metrics: &Metrics,
        now_ms: u64,
    ) -> Outcome {
        let Registration {
            user,
            keys,
            mut listen_ports,
            signature,
        } = registration;
        if let Some(current) = self.user()
            && *current != user
        {
            return (
                Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!(
                        "this connection is registered as {current}; open another connection for {user}"
                    ),
                )),
                None,
            );
        }
        // The server keeps an address per declared port, for as long as the presence
        // record lives: a bounded, duplicate-free list of real ports.
        if listen_ports.len() > proto::msg::MAX_LISTEN_PORTS || listen_ports.contains(&0) {
            return (
                Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!(
                        "a registration declares at most {} listening ports, none of them 0",
                        proto::msg::MAX_LISTEN_PORTS
                    ),
                )),
                None,
            );
        }
        let mut seen = Vec::with_capacity(listen_ports.len());
        listen_ports.retain(|port| {
            let new = !seen.contains(port);
            seen.push(*port);
            new
        });
        if keys.verify().is_err() {
            return (
                Err(ErrorReply::new(
                    ErrorCode::BadSignature,
                    "the X25519 key is not signed by the identity key",
                )),
                None,
            );
        }
        let transcript = registration_transcript(&self.nonce, &self.channel, &user, &keys);
        if keys.verify_signature(&transcript, &signature).is_err() {
            return (
                Err(ErrorReply::new(
                    ErrorCode::BadSignature,
                    "the registration signature does not verify against this connection's challenge",
                )),
                None,
            );
        }
        // Only a new name counts against the address's hourly budget: once it is spent, a
        // name already bound (to any key) still goes on to the binding below.
        let ip = self.observed.ip();
        if let Some(per_ip) = &self.per_ip
            && !per_ip.may_bind_name(ip, now_ms)
        {
            match store.binding(&user).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    metrics.per_ip_names_refused.inc();
                    return (
                        Err(ErrorReply::new(
                            ErrorCode::RateLimited,
                            format!(
                                "too many new names from your address (the limit is {} an hour); \
                                 try again later, or register a name you already have",
                                config.per_ip_new_names_per_hour
                            ),
                        )),
                        None,
                    );
                }
                Err(error) => return (Err(store_error(error)), None),
            }
        }
        let binding = Binding {
            user: user.clone(),
            keys: keys.clone(),
            bound_at_ms: now_ms,
        };
        let new_binding = match store.bind(&binding).await {
            Ok(BindOutcome::Created) => {
                if let Some(per_ip) = &self.per_ip {
                    per_ip.count_new_name(ip, now_ms);
                }
                true
            }
            Ok(BindOutcome::Existing(existing)) if existing.keys == keys => false,
            Ok(BindOutcome::Existing(_)) => return (Err(name_taken(&user)), None),
            Err(error) => return (Err(store_error(error)), None),
        };
        self.listen_ports = listen_ports;
        if let Err(error) = self
            .refresh_presence(&user, store, config, now_ms, true)
            .await
        {
            return (Err(error), None);
        }
        let event = (self.user() != Some(&user)).then(|| Event::Registered(user.clone()));
        self.state = State::Registered { user };
        (
            Ok(Reply::Registered {
                observed: self.observed,
                new_binding,
                heartbeat_interval_ms: millis(config.heartbeat_interval),
                presence_ttl_ms: millis(config.presence_ttl),
            }),
            event,
        )
    }

    /// Adds `users` to the watch set and tells the ones added that `me` is online, asking
    /// each that watches back to answer with their own presence.
    async fn watch(
        &mut self,
        me: &Username,
        users: Vec<Username>,
        store: &Store,
        metrics: &Metrics,
    ) -> Result<Reply, ErrorReply> {
        let watching = self.watching.get_or_insert_default();
        let added = watching.add(me, users).map_err(|refused| {
            metrics.watch_refused.inc();
            match refused {
                WatchRefused::Full { .. } => ErrorReply::new(
                    ErrorCode::TooLarge,
                    format!("{refused}; watch the users you talk with most"),
                ),
                WatchRefused::Churn { .. } => {
                    ErrorReply::new(ErrorCode::RateLimited, refused.to_string())
                }
            }
        })?;
        let reply = watching_reply(watching);
        tell_contacts(store, me, true, added, true).await;
        Ok(reply)
    }

    /// Drops `users` from the watch set; the ones dropped are told `me` went offline (to
    /// them, as far as they could tell: mutuality ended).
    async fn unwatch(
        &mut self,
        me: &Username,
        users: Vec<Username>,
        store: &Store,
    ) -> Result<Reply, ErrorReply> {
        let watching = self.watching.get_or_insert_default();
        let removed = watching.remove(users);
        let reply = watching_reply(watching);
        tell_contacts(store, me, false, removed, false).await;
        Ok(reply)
    }

    /// Writes this session's presence: at a registration (`first`) so that the lapse sweep
    /// of any instance finds it before the registration is answered
    /// ([`Store::register_presence`]), at a heartbeat as a refresh.
    async fn refresh_presence(
        &self,
        user: &Username,
        store: &Store,
        config: &Config,
        now_ms: u64,
        first: bool,
    ) -> Result<(), ErrorReply> {
        let presence = Presence {
            user: user.clone(),
            session: self.session_id,
            addresses: self
                .listen_ports
                .iter()
                .map(|port| SocketAddr::new(self.observed.ip(), *port))
                .collect(),
            last_seen_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(millis(config.presence_ttl)),
        };
        let written = if first {
            store.register_presence(&presence).await
        } else {
            store.set_presence(&presence).await
        };
        written.map_err(store_error)
    }

    /// The operator releases `user`'s name (its owner lost the key): the binding and its
    /// rotation statements go, and the next registration binds the name anew.
    async fn release_name(
        &self,
        user: Username,
        proof: [u8; 32],
        store: &Store,
        config: &Config,
    ) -> Result<Reply, ErrorReply> {
        operator_only(config, "release a name", |secret| {
            constant_time_eq(&release_proof(secret, &self.nonce, &user), &proof)
        })
        .inspect_err(|_| {
            tracing::warn!(%user, observed = %self.observed, "refused a name release without the operator secret");
        })?;
        match store.release(&user).await.map_err(store_error)? {
            Some(binding) => {
                let fingerprint = binding.keys.fingerprint();
                tracing::warn!(%user, %fingerprint, "the operator released the name; the next registration binds it anew");
                Ok(Reply::Released { fingerprint })
            }
            None => Err(unknown_user(&user)),
        }
    }

    async fn announce(
        &self,
        text: String,
        proof: [u8; 32],
        store: &Store,
        config: &Config,
    ) -> Result<Reply, ErrorReply> {
        operator_only(config, "announce", |secret| {
            verify_announce_proof(secret, &self.nonce, &text, &proof)
        })?;
        if text.trim().is_empty() {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "an announcement needs some text",
            ));
        }
        // The same bound as a message body, so the push that carries it always fits a frame.
        if text.len() > proto::seal::MAX_BODY_LEN {
            return Err(ErrorReply::new(
                ErrorCode::TooLarge,
                format!(
                    "an announcement has at most {} bytes (this one has {})",
                    proto::seal::MAX_BODY_LEN,
                    text.len()
                ),
            ));
        }
        store
            .publish(&Broadcast::Announcement { text })
            .await
            .map(|()| Reply::Done)
            .map_err(store_error)
    }
}

/// Passes an operator request whose proof `verify` accepts under the operator secret;
/// refuses it (`unauthorized`, saying the operator alone may do `what`) otherwise, or when
/// this server has no secret.
fn operator_only(
    config: &Config,
    what: &str,
    verify: impl FnOnce(&[u8]) -> bool,
) -> Result<(), ErrorReply> {
    if config.operator_secret.as_deref().is_some_and(verify) {
        return Ok(());
    }
    Err(ErrorReply::new(
        ErrorCode::Unauthorized,
        format!("only the operator may {what} (the proof of the operator secret is wrong)"),
    ))
}

/// The reply to `List`: every online user sorted by name, or, past `max`, the first `max`
/// of them and a count of the rest (a reply that always fits a frame).
fn list_reply(mut users: Vec<Username>, max: usize, metrics: &Metrics) -> Reply {
    users.sort_unstable();
    if users.len() <= max {
        return Reply::Users(users);
    }
    metrics.lists_capped.inc();
    let more = (users.len() - max) as u64;
    users.truncate(max);
    Reply::UsersCapped { users, more }
}

async fn lookup(user: &Username, store: &Store, now_ms: u64) -> Result<Reply, ErrorReply> {
    // Both reads at once: on Redis they share one round trip (and, on a cluster, the
    // user's one slot); a presence read for a name nobody holds is wasted, and cheap.
    let (binding, presence) = tokio::join!(store.binding(user), store.presence(user));
    let binding = binding
        .map_err(store_error)?
        .ok_or_else(|| unknown_user(user))?;
    let presence = presence.map_err(store_error)?;
    let online = presence.as_ref().is_some_and(|p| p.is_online(now_ms));
    Ok(Reply::User(UserInfo {
        user: user.clone(),
        keys: binding.keys,
        addresses: match (&presence, online) {
            (Some(presence), true) => presence.addresses.clone(),
            _ => Vec::new(),
        },
        online,
        last_seen_ms: presence.map(|p| p.last_seen_ms),
    }))
}

/// What one prekey claim costs of the sender's deposit budget, in bytes.
const CLAIM_COST: u64 = 1024;

/// `user`'s presence change (`online` or not) for the users `watching` holds, if any.
fn presence_notice(user: &Username, online: bool, watching: &Watching) -> Option<Broadcast> {
    (!watching.is_empty()).then(|| Broadcast::Presence {
        user: user.clone(),
        online,
        to: watching.names(),
        answer: false,
    })
}

/// The reply to a watch request: the set's size and the room left.
fn watching_reply(watching: &Watching) -> Reply {
    let watched = watching.len();
    Reply::Watching {
        watched: u32::try_from(watched).unwrap_or(u32::MAX),
        room: u32::try_from(proto::msg::MAX_WATCHED.saturating_sub(watched)).unwrap_or(0),
    }
}

/// Stores the keys `me` publishes, once every signature verifies against the keys bound to
/// the name (a client cannot publish keys its identity did not sign).
async fn publish_prekeys(
    me: &Username,
    prekeys: &proto::ratchet::PreKeys,
    store: &Store,
) -> Result<Reply, ErrorReply> {
    if prekeys.one_time.len() > proto::ratchet::MAX_ONE_TIME_KEYS {
        return Err(ErrorReply::new(
            ErrorCode::TooLarge,
            format!(
                "publish at most {} one-time keys at once",
                proto::ratchet::MAX_ONE_TIME_KEYS
            ),
        ));
    }
    let binding = store
        .binding(me)
        .await
        .map_err(store_error)?
        .ok_or_else(|| unknown_user(me))?;
    if prekeys.verify(me, &binding.keys).is_err() {
        return Err(ErrorReply::new(
            ErrorCode::BadSignature,
            "the published keys are not all signed by your identity key",
        ));
    }
    let one_time = store
        .publish_prekeys(me, prekeys)
        .await
        .map_err(store_error)?;
    Ok(Reply::PreKeyCount { one_time })
}

/// Hands out one of `user`'s keys to start a session with them.
async fn claim_prekey(user: &Username, store: &Store) -> Result<Reply, ErrorReply> {
    match store.claim_prekey(user).await.map_err(store_error)? {
        Some(bundle) => Ok(Reply::PreKey(bundle)),
        None => {
            // Say "unknown user" for names nobody holds, as a lookup would.
            store
                .binding(user)
                .await
                .map_err(store_error)?
                .ok_or_else(|| unknown_user(user))?;
            Err(ErrorReply::new(
                ErrorCode::NoPreKeys,
                format!(
                    "{user} has published no keys to start an encrypted session with; \
                     they need to run a current client (the message waits until then)"
                ),
            ))
        }
    }
}

/// A byte limit in words: whole MiB from 1 MiB up, else KiB.
fn byte_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// The refusal of a deposit over its sender's budget, with when to try again.
fn over_budget(over: OverBudget, config: &Config) -> ErrorReply {
    let message = match over {
        OverBudget::Messages { retry_after } => format!(
            "too many messages into mailboxes (the limit is {} a minute); try again in {} s",
            config.deposits_per_minute,
            retry_after.as_secs().max(1)
        ),
        OverBudget::Bytes { retry_after } => format!(
            "too many bytes into mailboxes (the limit is {} an hour); try again in {} s",
            byte_size(config.deposit_bytes_per_hour),
            retry_after.as_secs().max(1)
        ),
    };
    ErrorReply::new(ErrorCode::RateLimited, message)
}

async fn deposit(
    me: &Username,
    envelope: proto::Envelope,
    store: &Store,
    metrics: &Metrics,
    now_ms: u64,
) -> Result<Reply, ErrorReply> {
    if envelope.from != *me {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!(
                "you are registered as {me} and cannot send mail as {}",
                envelope.from
            ),
        ));
    }
    if envelope.token.len() > MAX_TOKEN_LEN {
        return Err(ErrorReply::new(
            ErrorCode::TooLarge,
            format!("a sealed message has at most {MAX_TOKEN_LEN} bytes"),
        ));
    }
    let recipient = envelope.to.clone();
    if store
        .binding(&recipient)
        .await
        .map_err(store_error)?
        .is_none()
    {
        return Err(unknown_user(&recipient));
    }
    match store.deposit(&envelope, now_ms).await {
        Ok(outcome) => {
            if outcome == DepositOutcome::Stored {
                metrics.mail_deposited.inc();
            }
            // The push is a hint: if it is lost the recipient still fetches on its timer.
            if let Err(error) = store
                .publish(&Broadcast::MailWaiting {
                    user: recipient.clone(),
                })
                .await
            {
                tracing::warn!(%error, "could not publish mail-waiting for {recipient}");
            }
            let recipient_online = store
                .presence(&recipient)
                .await
                .ok()
                .flatten()
                .is_some_and(|p| p.is_online(now_ms));
            Ok(Reply::Deposited { recipient_online })
        }
        Err(error) => {
            if matches!(error, StoreError::MailboxBytesFull { .. }) {
                metrics.mailbox_bytes_full.inc();
            }
            Err(store_error(error))
        }
    }
}

/// Deletes `mail` from `me`'s mailbox: it is delivered.
async fn ack(
    me: &Username,
    mail: &[MailRef],
    store: &Store,
    metrics: &Metrics,
) -> Result<Reply, ErrorReply> {
    let removed = store.ack(me, mail).await.map_err(store_error)?;
    metrics.mail_delivered.add(removed);
    Ok(Reply::Acked {
        removed: u32::try_from(removed).unwrap_or(u32::MAX),
    })
}

/// Publishes `me`'s presence (`online` or not) to the contacts `to`, asking each that
/// watches back to answer with its own if `answer`. A lost notice only delays a contact's
/// picture until the next change: the watch set itself is in place.
async fn tell_contacts(
    store: &Store,
    me: &Username,
    online: bool,
    to: Vec<Username>,
    answer: bool,
) {
    if to.is_empty() {
        return;
    }
    let event = Broadcast::Presence {
        user: me.clone(),
        online,
        to,
        answer,
    };
    if let Err(error) = store.publish(&event).await {
        tracing::warn!(%error, user = %me, online, "could not publish presence to contacts");
    }
}

async fn fetch(me: &Username, max: u32, store: &Store, now_ms: u64) -> Result<Reply, ErrorReply> {
    let max = usize::try_from(max.max(1)).unwrap_or(1);
    // The store stops reading once the reply's frame is full, so the batch always fits (a
    // deposit's token is capped well below a frame, so even a first message alone does).
    let fetched = store
        .fetch(me, max, FETCH_REPLY_BUDGET, now_ms)
        .await
        .map_err(store_error)?;
    Ok(Reply::Mail {
        envelopes: fetched.mail.into_iter().map(|mail| mail.envelope).collect(),
        remaining: fetched.remaining,
    })
}

async fn set_blocked(
    me: &Username,
    user: &Username,
    blocked: bool,
    store: &Store,
) -> Result<Reply, ErrorReply> {
    if user == me {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            "you cannot block yourself",
        ));
    }
    if store.binding(user).await.map_err(store_error)?.is_none() {
        return Err(unknown_user(user));
    }
    let result = if blocked {
        store.block(me, user).await
    } else {
        store.unblock(me, user).await
    };
    result.map(|()| Reply::Done).map_err(store_error)
}

/// Moves `me`'s name to the keys of `rotation`, which must be signed by the keys bound now
/// and by the new ones (see [`proto::identity::Rotation`]); the statement is kept for
/// contacts to check. Repeating a rotation that already happened succeeds (a client that
/// lost the answer asks again before it drops its old key).
async fn rotate(
    me: &Username,
    rotation: Rotation,
    store: &Store,
    now_ms: u64,
) -> Result<Reply, ErrorReply> {
    if &rotation.user != me {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!(
                "you are registered as {me} and cannot rotate {}'s keys",
                rotation.user
            ),
        ));
    }
    if rotation.verify().is_err() {
        return Err(ErrorReply::new(
            ErrorCode::BadSignature,
            "the rotation must be signed by both the old and the new identity key",
        ));
    }
    let current = store
        .binding(me)
        .await
        .map_err(store_error)?
        .ok_or_else(|| unknown_user(me))?;
    if current.keys == rotation.new {
        return Ok(Reply::Done);
    }
    if current.keys != rotation.old {
        return Err(ErrorReply::new(
            ErrorCode::BadSignature,
            format!("the rotation starts from keys {me} is not bound to"),
        ));
    }
    match store
        .rotate(&current, &rotation, now_ms)
        .await
        .map_err(store_error)?
    {
        RotateOutcome::Rotated => {
            tracing::info!(
                user = %me,
                old = %rotation.old.fingerprint(),
                new = %rotation.new.fingerprint(),
                "keys rotated by a statement signed with the old key"
            );
            Ok(Reply::Done)
        }
        RotateOutcome::Changed(Some(standing)) if standing.keys == rotation.new => Ok(Reply::Done),
        RotateOutcome::Changed(_) => Err(ErrorReply::new(
            ErrorCode::Unavailable,
            format!("{me}'s binding changed meanwhile; try again"),
        )),
    }
}

/// The refusal of a registration under a name bound to other keys, with what its user can
/// do about it.
fn name_taken(user: &Username) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::NameTaken,
        format!(
            "the name {user} is already taken by someone else's key. If it is yours and you \
             have a backup, restore it (`p2pchat identity import <file>`); if you lost your \
             key and have no backup, ask the server's operator to release the name \
             (`p2pchat-discovery release-name {user}`), after which your contacts will see \
             that your key changed; or choose another name"
        ),
    )
}

fn unknown_user(user: &Username) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::UnknownUser,
        format!("no user named {user} has ever registered"),
    )
}

/// Maps a store failure to the error a client sees.
pub fn store_error(error: StoreError) -> ErrorReply {
    match error {
        StoreError::MailboxFull { user, cap } => ErrorReply::new(
            ErrorCode::MailboxFull,
            format!("{user}'s mailbox is full ({cap} messages); try again later"),
        ),
        StoreError::MailboxBytesFull { user, max_bytes } => ErrorReply::new(
            ErrorCode::MailboxFull,
            format!(
                "{user}'s mailbox is full ({} of mail); try again later",
                byte_size(max_bytes)
            ),
        ),
        StoreError::Blocked { recipient, sender } => ErrorReply::new(
            ErrorCode::Blocked,
            format!("{recipient} does not accept messages from {sender}"),
        ),
        StoreError::StorageFull(detail) => {
            tracing::error!(%detail, "the store's disk is full");
            ErrorReply::new(
                ErrorCode::Unavailable,
                "the server's storage is full; nothing was stored, try again later",
            )
        }
        StoreError::NotReplicated { wanted, reached } => {
            tracing::warn!(
                wanted,
                reached,
                "a write did not reach its replicas in time"
            );
            ErrorReply::new(
                ErrorCode::Unavailable,
                "the server's storage could not confirm a safe copy right now; try again shortly",
            )
        }
        StoreError::Redis(error) => {
            tracing::warn!(%error, "redis request failed");
            ErrorReply::new(
                ErrorCode::Unavailable,
                "the server's storage is unreachable right now; try again shortly",
            )
        }
        error => {
            tracing::error!(%error, "store failure");
            ErrorReply::new(
                ErrorCode::Internal,
                "the server failed to carry out the request",
            )
        }
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
