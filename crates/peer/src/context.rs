//! [`Context`]: what the runtime's tasks share (identity, state, the control handle, the
//! way back to the event loop), and [`ServerKeys`], the short-lived cache of the server's
//! answers about senders' keys.
//!
//! **Architecture Invariant:** the task modules ([`crate::delivery`], [`crate::inbox`],
//! [`crate::outgoing`]) and the shell import this module; it imports none of them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use proto::{Channel, Identity, PublicKeys, Reply, Request, UserInfo, Username};
use tokio::sync::mpsc;

use crate::{
    api::{ClientError, Config, Event},
    control::{ControlError, ControlHandle},
    core::Report,
    sessions::Ratchet,
    state::{State, StateError},
};

/// Channels cached per peer and key pair.
type ChannelCache = Mutex<HashMap<(Username, [u8; 32], [u8; 32]), Arc<Channel>>>;

/// The capacity of the tasks' channel to the event loop. Full, a task waits: the loop is
/// behind (its events are not being read), and the task's peer or fetch waits with it.
pub(crate) const REPORTS_QUEUED: usize = 1024;

/// What every task of one runtime shares.
pub(crate) struct Context {
    pub(crate) me: Username,
    pub(crate) identity: Arc<Identity>,
    pub(crate) state: State,
    /// The Olm account and sessions: every message is sealed and opened through it.
    pub(crate) ratchet: Ratchet,
    pub(crate) control: ControlHandle,
    pub(crate) to_loop: mpsc::Sender<Report>,
    pub(crate) config: Config,
    /// Raised at every reconnect: links kept from an earlier generation are dropped.
    pub(crate) link_generation: AtomicU64,
    pub(crate) channels: ChannelCache,
    /// The server's keys for senders not pinned or not matching the pinned keys, kept
    /// briefly so junk claiming one sender costs one lookup, not one per envelope (see
    /// [`crate::inbox`]).
    pub(crate) server_keys: ServerKeys,
    /// Where the fetch of the mail that waited at the last registration is: until it is
    /// all in, direct envelopes are refused as `unavailable` (their senders put them in the
    /// mailbox, behind the mail already there), since a ratchet opens a sender's messages
    /// in the order they were sealed and keeps only a few keys for messages that come late.
    pub(crate) mail: tokio::sync::watch::Sender<MailState>,
    /// Held while prekeys are published ([`crate::prekeys`]): one publish at a time.
    pub(crate) publishing: tokio::sync::Mutex<()>,
    /// Envelopes refused before anything in them authenticated: counted, and logged at the
    /// 1st, 2nd, 4th, 8th... (never shown as an event naming the claimed sender).
    pub(crate) unauthenticated: AtomicU64,
    /// Server keys no rotation statement led to from the pinned ones, checked lately: a
    /// changed key is asked about at most once per [`SERVER_KEYS_TTL`] per sender, however
    /// many envelopes or sends meet it.
    pub(crate) unfollowed: ServerKeys,
}

impl Context {
    /// The sealing channel with `peer` under `keys` (cached: derivation costs a DH).
    pub(crate) fn channel(
        &self,
        peer: &Username,
        keys: &PublicKeys,
    ) -> Result<Arc<Channel>, proto::SealError> {
        let key = (peer.clone(), keys.identity, keys.exchange);
        if let Ok(cache) = self.channels.lock()
            && let Some(channel) = cache.get(&key)
        {
            return Ok(channel.clone());
        }
        let channel = Arc::new(Channel::new(&self.identity, &self.me, peer, keys)?);
        if let Ok(mut cache) = self.channels.lock() {
            cache.insert(key, channel.clone());
        }
        Ok(channel)
    }

    /// Looks `user` up at the server.
    pub(crate) async fn lookup(&self, user: &Username) -> Result<UserInfo, ClientError> {
        match self
            .control
            .request(Request::Lookup { user: user.clone() })
            .await
        {
            Ok(Reply::User(info)) => Ok(info),
            Ok(_) => Err(ControlError::Unexpected.into()),
            Err(error) if error.code() == Some(proto::ErrorCode::UnknownUser) => {
                Err(ClientError::UnknownUser(user.clone()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Follows `user`'s name from the `pinned` keys to the `offered` ones if the server
    /// keeps rotation statements that lead there, each signed by the key before it
    /// ([`proto::identity::follow_rotations`]: checked here, so a server cannot invent a
    /// rotation). Then the offered keys are pinned (durably), the user is told
    /// ([`Event::KeyRotated`]), and the loop treats it as a `trust` (the outbox for `user`
    /// goes, held mail opens). Returns whether the keys are pinned now.
    pub(crate) async fn follow_rotation(
        &self,
        user: &Username,
        pinned: &PublicKeys,
        offered: &PublicKeys,
    ) -> bool {
        if self.unfollowed.get(user, Instant::now()) == Some(Some(offered.clone())) {
            return false;
        }
        let rotations = match self
            .control
            .request(Request::Rotations { user: user.clone() })
            .await
        {
            Ok(Reply::Rotations(rotations)) => rotations,
            Ok(_) => return false,
            Err(error) => {
                tracing::info!(%user, %error, "cannot ask for rotation statements");
                return false;
            }
        };
        if !proto::identity::follow_rotations(user, pinned, offered, &rotations) {
            self.unfollowed
                .insert(user, Some(offered.clone()), Instant::now());
            return false;
        }
        // Another task may have followed it a moment ago: tell the user once.
        match self.state.pinned(user) {
            Ok(Some(now)) if &now == offered => return true,
            Ok(_) => {}
            Err(error) => {
                self.report_state_error(error).await;
                return false;
            }
        }
        if let Err(error) = self.state.repin(user, offered).await {
            self.report_state_error(error).await;
            return false;
        }
        tracing::info!(%user, old = %pinned.fingerprint(), new = %offered.fingerprint(), "followed a signed key rotation");
        self.notify(Event::KeyRotated {
            user: user.clone(),
            old: pinned.fingerprint(),
            new: offered.fingerprint(),
        })
        .await;
        self.report(Report::Trusted(user.clone())).await;
        true
    }

    /// Reports to the event loop (waits while its queue is full; a stopped loop drops it).
    pub(crate) async fn report(&self, report: Report) {
        let _ = self.to_loop.send(report).await;
    }

    /// Tells the user something.
    pub(crate) async fn notify(&self, event: Event) {
        self.report(Report::Notify(event)).await;
    }

    /// Logs a local state failure and tells the user.
    pub(crate) async fn report_state_error(&self, error: StateError) {
        tracing::error!(%error, "state error");
        self.notify(Event::StateError {
            error: error.to_string(),
        })
        .await;
    }
}

/// Where the fetch of the mail waiting at registration is (see [`Context::mail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MailState {
    /// Registered; the first fetch has not answered yet.
    Unknown,
    /// Mail was waiting and is being fetched.
    Draining,
    /// All of it is in (or there was none).
    Drained,
}

/// How long a direct envelope waits for the first fetch after a registration to say
/// whether mail was waiting; past it, the envelope is taken.
const FIRST_FETCH_WAIT: Duration = Duration::from_secs(2);

impl Context {
    /// Where the fetch of the mail waiting at registration is, waiting (briefly) for the
    /// first fetch's answer.
    pub(crate) async fn mail_state(&self) -> MailState {
        let mut state = self.mail.subscribe();
        match tokio::time::timeout(
            FIRST_FETCH_WAIT,
            state.wait_for(|state| *state != MailState::Unknown),
        )
        .await
        {
            Ok(Ok(state)) => *state,
            _ => MailState::Drained,
        }
    }

    /// The fetch moved on: `state`, except that only the first answer after a
    /// registration may say `Draining`.
    pub(crate) fn mail_fetched(&self, state: MailState) {
        self.mail.send_if_modified(|current| {
            let next = match (*current, state) {
                (MailState::Unknown, next) => next,
                (_, MailState::Drained) => MailState::Drained,
                (current, _) => current,
            };
            std::mem::replace(current, next) != next
        });
    }
}

/// How long the server's answer about a sender's keys is reused: long enough that a flood
/// of junk claiming one sender costs one lookup, short enough that a real key change is
/// seen within seconds.
pub(crate) const SERVER_KEYS_TTL: Duration = Duration::from_secs(10);
/// The most senders whose server keys are remembered (beyond it, the oldest answers go).
const SERVER_KEYS_CAP: usize = 1024;

/// The server's recent answers about senders' keys (`None`: no such user, or keys that do
/// not verify), each with when it was fetched. Time is passed in, so the rules are tested
/// without a runtime.
#[derive(Debug, Default)]
pub(crate) struct ServerKeys {
    answers: Mutex<HashMap<Username, (Option<PublicKeys>, Instant)>>,
}

impl ServerKeys {
    /// The answer about `user` fetched within [`SERVER_KEYS_TTL`] of `now`, if any.
    pub(crate) fn get(&self, user: &Username, now: Instant) -> Option<Option<PublicKeys>> {
        let answers = self.answers.lock().ok()?;
        let (keys, fetched) = answers.get(user)?;
        (now.saturating_duration_since(*fetched) < SERVER_KEYS_TTL).then(|| keys.clone())
    }

    /// Forgets the answer about `user`: its keys are pinned now, and the next mismatch
    /// with the pin (a rotation or key change made since) deserves a fresh answer.
    pub(crate) fn forget(&self, user: &Username) {
        if let Ok(mut answers) = self.answers.lock() {
            answers.remove(user);
        }
    }

    /// Remembers the server's answer about `user`, fetched at `now`.
    pub(crate) fn insert(&self, user: &Username, keys: Option<PublicKeys>, now: Instant) {
        let Ok(mut answers) = self.answers.lock() else {
            return;
        };
        if answers.len() >= SERVER_KEYS_CAP && !answers.contains_key(user) {
            answers.retain(|_, (_, fetched)| {
                now.saturating_duration_since(*fetched) < SERVER_KEYS_TTL
            });
            if answers.len() >= SERVER_KEYS_CAP {
                answers.clear();
            }
        }
        answers.insert(user.clone(), (keys, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[test]
    fn server_keys_are_reused_until_the_ttl_then_asked_again() {
        let cache = ServerKeys::default();
        let keys = proto::Identity::generate().public().clone();
        let start = Instant::now();
        assert_eq!(cache.get(&name("bob"), start), None);
        cache.insert(&name("bob"), Some(keys.clone()), start);
        cache.insert(&name("nobody"), None, start);
        let within = start + SERVER_KEYS_TTL - Duration::from_millis(1);
        assert_eq!(cache.get(&name("bob"), within), Some(Some(keys)));
        assert_eq!(cache.get(&name("nobody"), within), Some(None));
        assert_eq!(cache.get(&name("bob"), start + SERVER_KEYS_TTL), None);
    }

    #[test]
    fn a_forgotten_answer_is_asked_again_at_once() {
        let cache = ServerKeys::default();
        let keys = proto::Identity::generate().public().clone();
        let now = Instant::now();
        cache.insert(&name("bob"), Some(keys), now);
        cache.forget(&name("bob"));
        assert_eq!(cache.get(&name("bob"), now), None);
    }

    #[test]
    fn server_keys_stay_bounded() {
        let cache = ServerKeys::default();
        let now = Instant::now();
        for index in 0..SERVER_KEYS_CAP * 3 {
            cache.insert(&name(&format!("user{index}")), None, now);
        }
        assert!(cache.answers.lock().unwrap().len() <= SERVER_KEYS_CAP);
    }
}
