//! [`Ratchet`]: the user's Olm account and their Olm sessions with each peer, in memory
//! over the state's `olm` tables, shared by every task that seals or opens.
//!
//! One lock guards them all (sealing or opening one message takes microseconds, and no
//! lock is held across an `.await`). Whatever a seal or an open changed is saved by a
//! state write submitted while that lock is held ([`Ratchet::seal`], [`Ratchet::save_with`]):
//! writes commit in the order submitted, so the saved state only ever moves forward. An
//! opened message is acked only once its write is durable.
//!
//! A sealed envelope may leave before its save is durable when it was sealed under a ratchet
//! key whose private half is durable already (a kept link does so: the save commits while
//! the envelope is on the wire; see [`crate::outgoing`]), so whatever the peer seals in
//! answer opens here even after a crash. A message key still never serves twice:
//! - each run of the client is counted ([`State::begin_run`]) and every save carries its
//!   run; after a run that did not stop cleanly ([`Ratchet::end_run`] never came), the
//!   sessions saved before the new run are *retired* from sealing when read (they still
//!   open what the peer sends in them), so the next message to that peer starts a new
//!   session instead of sealing with keys that may have been used already;
//! - when a save fails, what it carried is read again from the disk and retired the same
//!   way ([`Ratchet::forget`]).
//!
//! **Architecture Invariant:** no network I/O; the tasks claim keys and publish them
//! ([`crate::delivery`], [`crate::prekeys`]) and hand this module what they got.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    sync::{Arc, Mutex, MutexGuard},
};

use proto::{
    Envelope, Identity, MessageId, PublicKeys, Receipt, SealError, Username,
    ratchet::{OwnAccount, PickleError, PreKeyBundle, PreKeys, Sessions},
    seal::{OpenError, Plaintext},
};

use crate::state::{OutboxEntry, RatchetSave, Run, State, StateError, Ticket};

/// The account and sessions (see the module docs).
pub(crate) struct Ratchet {
    inner: Mutex<Inner>,
}

struct Inner {
    me: Username,
    identity: Arc<Identity>,
    account: OwnAccount,
    /// Sessions read from the state so far.
    peers: PeerSessions,
    /// Changed since their last save.
    dirty: HashSet<Username>,
    account_dirty: bool,
    /// One-time keys used up by sessions started since the last publish.
    used_one_time_keys: usize,
}

/// The sessions with each peer read from the state so far (a peer with none has an empty
/// entry), and what decides, when they are read, whether they may seal.
struct PeerSessions {
    read: HashMap<Username, Sessions>,
    /// This run, and which saved sessions may seal in it.
    run: Run,
    /// Peers whose sessions a failed save carried: retired when read again.
    retire_on_read: HashSet<Username>,
}

impl std::fmt::Debug for Ratchet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ratchet")
    }
}

impl Ratchet {
    /// The account saved in `state`, or a new one saved now, and a new run begun
    /// ([`State::begin_run`]; blocking: at start-up, off the runtime's threads).
    pub(crate) fn load(
        state: &State,
        identity: &Arc<Identity>,
        me: &Username,
    ) -> Result<Self, StateError> {
        let account = match state.olm_account()? {
            Some(pickle) => OwnAccount::from_pickle(&pickle, identity, me)?,
            None => {
                let account = OwnAccount::generate(identity, me);
                state
                    .submit_new_account(account.pickle(), proto::now_ms())
                    .wait_blocking()?;
                account
            }
        };
        let run = state.begin_run()?;
        Ok(Self {
            inner: Mutex::new(Inner {
                me: me.clone(),
                identity: identity.clone(),
                account,
                peers: PeerSessions {
                    read: HashMap::new(),
                    run,
                    retire_on_read: HashSet::new(),
                },
                dirty: HashSet::new(),
                account_dirty: false,
                used_one_time_keys: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would leave half-changed sessions: nothing here
        // panics, and if it did, going on with what is there is all that can be done.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a session with `peer` may seal (one is started and not retired).
    pub(crate) fn has_session(&self, state: &State, peer: &Username) -> Result<bool, StateError> {
        let mut inner = self.lock();
        Ok(inner.peers.get(state, peer)?.can_seal())
    }

    /// Starts a session with `peer` from a claimed `bundle` (checked against `peer_keys`);
    /// it is saved by the seal that uses it.
    pub(crate) fn start(
        &self,
        state: &State,
        peer: &Username,
        peer_keys: &PublicKeys,
        bundle: &PreKeyBundle,
    ) -> Result<(), RatchetError> {
        self.lock().start(state, peer, peer_keys, bundle)
    }

    /// Forgets every session with `peer` (they lost theirs): the next message starts anew.
    pub(crate) fn reset(&self, state: &State, peer: &Username) -> Result<(), StateError> {
        let mut inner = self.lock();
        inner.peers.get(state, peer)?.clear();
        inner.dirty.insert(peer.clone());
        Ok(())
    }

    /// Seals `entries` (all to `peer`, in order) with the newest session that may seal and
    /// submits the save. The envelopes may leave at once (see the module docs); a message
    /// is finished only once the returned save is durable.
    pub(crate) fn seal(
        &self,
        state: &State,
        peer: &Username,
        entries: &[&OutboxEntry],
    ) -> Result<(Vec<Envelope>, Saving<()>), RatchetError> {
        let mut inner = self.lock();
        let mut envelopes = Vec::with_capacity(entries.len());
        for entry in entries {
            // Sealed with the time it was written, so retries keep the original time.
            envelopes.push(inner.seal_with(state, peer, |sessions, account| {
                sessions.seal(account, peer, entry.id, &entry.body, entry.created_ms)
            })?);
        }
        Ok((envelopes, inner.submit(|save| state.submit_ratchet(save))))
    }

    /// Seals `receipt` to `peer` as message `id` with the newest session and submits the
    /// save, as [`Ratchet::seal`] does for messages.
    pub(crate) fn seal_receipt(
        &self,
        state: &State,
        peer: &Username,
        id: MessageId,
        receipt: Receipt,
        now_ms: u64,
    ) -> Result<(Envelope, Saving<()>), RatchetError> {
        let mut inner = self.lock();
        let envelope = inner.seal_with(state, peer, |sessions, account| {
            sessions.seal_receipt(account, peer, id, receipt, now_ms)
        })?;
        Ok((envelope, inner.submit(|save| state.submit_ratchet(save))))
    }

    /// Opens a ratchet envelope from `peer`, whose identity is `peer_keys`. What changed is
    /// saved by the write that stores the message ([`Ratchet::save_with`]).
    pub(crate) fn open(
        &self,
        state: &State,
        peer: &Username,
        peer_keys: &PublicKeys,
        envelope: &Envelope,
    ) -> Result<Plaintext, RatchetError> {
        let mut inner = self.lock();
        inner.open(state, peer, peer_keys, envelope)
    }

    /// Submits a write made by `submit` with every unsaved change, under the lock, so the
    /// saves reach the disk in the order the changes were made.
    pub(crate) fn save_with<T>(&self, submit: impl FnOnce(RatchetSave) -> Ticket<T>) -> Saving<T> {
        self.lock().submit(submit)
    }

    /// Waits for a write submitted with a save; if it fails, what it carried is forgotten
    /// (read from the disk again when next needed).
    ///
    /// Cancel-safe: dropped before it resolves, the write can be settled again.
    pub(crate) async fn settle<T>(
        &self,
        state: &State,
        saving: &mut Saving<T>,
    ) -> Result<T, StateError> {
        let result = (&mut saving.ticket).await;
        if result.is_err() {
            self.forget(state, &saving.peers, saving.account);
        }
        result
    }

    /// A write carrying `peers` (and the account, if `account`) failed: read them from the
    /// disk again when next needed, retired from sealing (what they sealed may have left).
    pub(crate) fn forget(&self, state: &State, peers: &[Username], account: bool) {
        let mut inner = self.lock();
        for peer in peers {
            inner.peers.forget(peer);
            inner.dirty.remove(peer);
        }
        if account {
            let saved = state.olm_account().ok().flatten().and_then(|pickle| {
                OwnAccount::from_pickle(&pickle, &inner.identity, &inner.me).ok()
            });
            if let Some(saved) = saved {
                inner.account = saved;
                inner.account_dirty = false;
            }
        }
    }

    /// The keys to publish when the server holds `published` one-time keys; the account
    /// changed, and is saved by the returned ticket, which must be durable before they are
    /// published.
    pub(crate) fn prekeys_to_publish(
        &self,
        state: &State,
        published: usize,
        rotate_fallback: bool,
    ) -> (PreKeys, Saving<()>) {
        let mut inner = self.lock();
        if rotate_fallback {
            inner.account.rotate_fallback_key();
        }
        let identity = inner.identity.clone();
        let prekeys = inner.account.prekeys_to_publish(&identity, published);
        inner.account_dirty = true;
        inner.used_one_time_keys = 0;
        (prekeys, inner.submit(|save| state.submit_ratchet(save)))
    }

    /// The server holds the keys published: the account marks them, saved lazily.
    pub(crate) fn published(&self, state: &State) {
        let mut inner = self.lock();
        inner.account.mark_published();
        inner.account_dirty = true;
        let save = inner.take_save();
        drop(state.submit_ratchet_lazy(save));
    }

    /// How many one-time keys sessions started since the last publish used up.
    pub(crate) fn used_one_time_keys(&self) -> usize {
        self.lock().used_one_time_keys
    }

    /// Ends the run cleanly: submit it once nothing seals any more (every task stopped).
    /// Submitted under the lock after every save, it commits after them, so the next run
    /// finds every session's save as far as what it sealed.
    pub(crate) fn end_run(&self, state: &State) -> Ticket<()> {
        let _inner = self.lock();
        state.submit_end_run()
    }
}

/// A write submitted with ratchet state: settle it with [`Ratchet::settle`].
pub(crate) struct Saving<T> {
    ticket: Ticket<T>,
    /// Whose sessions it carries.
    peers: Vec<Username>,
    /// Whether it carries the account.
    account: bool,
}

/// Why a seal or an open failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RatchetError {
    /// The message could not be sealed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The message does not open.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The saved sessions could not be read.
    #[error(transparent)]
    State(#[from] StateError),
}

impl Inner {
    fn start(
        &mut self,
        state: &State,
        peer: &Username,
        peer_keys: &PublicKeys,
        bundle: &PreKeyBundle,
    ) -> Result<(), RatchetError> {
        self.peers
            .get(state, peer)?
            .start(&self.account, peer, peer_keys, bundle)?;
        self.dirty.insert(peer.clone());
        Ok(())
    }

    /// Seals one envelope to `peer` with `seal` (a message or a receipt) and marks the
    /// peer's sessions changed.
    fn seal_with(
        &mut self,
        state: &State,
        peer: &Username,
        seal: impl FnOnce(&mut Sessions, &OwnAccount) -> Result<Envelope, SealError>,
    ) -> Result<Envelope, RatchetError> {
        let envelope = seal(self.peers.get(state, peer)?, &self.account)?;
        self.dirty.insert(peer.clone());
        Ok(envelope)
    }

    fn open(
        &mut self,
        state: &State,
        peer: &Username,
        peer_keys: &PublicKeys,
        envelope: &Envelope,
    ) -> Result<Plaintext, RatchetError> {
        let opened =
            self.peers
                .get(state, peer)?
                .open(&mut self.account, peer, peer_keys, envelope)?;
        self.dirty.insert(peer.clone());
        if opened.account_changed {
            self.account_dirty = true;
            self.used_one_time_keys += 1;
        }
        Ok(opened.plaintext)
    }

    /// Submits the write `submit` makes with everything unsaved.
    fn submit<T>(&mut self, submit: impl FnOnce(RatchetSave) -> Ticket<T>) -> Saving<T> {
        let save = self.take_save();
        let peers = save.sessions.iter().map(|(peer, _)| peer.clone()).collect();
        let account = save.account.is_some();
        Saving {
            ticket: submit(save),
            peers,
            account,
        }
    }

    /// Everything unsaved, as one save (and marked saved).
    fn take_save(&mut self) -> RatchetSave {
        let account = std::mem::take(&mut self.account_dirty).then(|| self.account.pickle());
        let sessions = self
            .dirty
            .drain()
            .filter_map(|peer| {
                let pickle = self.peers.read.get(&peer)?.pickle();
                Some((peer, pickle))
            })
            .collect();
        RatchetSave {
            account,
            sessions,
            generation: self.peers.run.generation,
        }
    }
}

impl PeerSessions {
    /// `peer`'s sessions, read from the state the first time, retired from sealing if
    /// their save may be behind what they sealed (see the module docs).
    fn get(&mut self, state: &State, peer: &Username) -> Result<&mut Sessions, StateError> {
        match self.read.entry(peer.clone()) {
            Entry::Occupied(entry) => Ok(entry.into_mut()),
            Entry::Vacant(entry) => {
                let failed_save = self.retire_on_read.remove(peer);
                let sessions = match state.olm_sessions(peer)? {
                    Some(saved) => {
                        let mut sessions = Sessions::from_pickle(&saved.pickle)?;
                        if failed_save || !self.run.sealable(saved.saved_by) {
                            sessions.retire();
                        }
                        sessions
                    }
                    None => Sessions::default(),
                };
                Ok(entry.insert(sessions))
            }
        }
    }

    /// Drops `peer`'s sessions from memory (a save carrying them failed): read again, and
    /// retired, when next needed.
    fn forget(&mut self, peer: &Username) {
        self.read.remove(peer);
        self.retire_on_read.insert(peer.clone());
    }
}

impl From<PickleError> for StateError {
    fn from(error: PickleError) -> Self {
        StateError::Ratchet(error)
    }
}

#[cfg(test)]
mod tests {
    use proto::{MessageId, ratchet::PreKeyBundle};

    use super::*;

    fn name(user: &str) -> Username {
        Username::new(user).unwrap()
    }

    /// Bob's account, and a bundle of his for alice to start a session with.
    fn bob_bundle() -> (Identity, PreKeyBundle) {
        let identity = Identity::generate();
        let mut account = OwnAccount::generate(&identity, &name("bob"));
        let published = account.prekeys_to_publish(&identity, 0);
        account.mark_published();
        let bundle = PreKeyBundle {
            olm_key: published.olm_key.clone(),
            prekey: published.one_time[0].clone(),
            fallback: false,
        };
        (identity, bundle)
    }

    fn entry(seq: u64) -> OutboxEntry {
        OutboxEntry {
            id: MessageId::random(),
            to: name("bob"),
            body: format!("message {seq}"),
            created_ms: 1,
            seq,
            attempts: 0,
            last_error: None,
        }
    }

    /// Seals one message to bob (starting a session if none may seal) and waits until its
    /// save is durable.
    async fn seal_one(ratchet: &Ratchet, state: &State, bob: &(Identity, PreKeyBundle), seq: u64) {
        let bob_name = name("bob");
        if !ratchet.has_session(state, &bob_name).unwrap() {
            ratchet
                .start(state, &bob_name, bob.0.public(), &bob.1)
                .unwrap();
        }
        let entry = entry(seq);
        let (_, mut saving) = ratchet.seal(state, &bob_name, &[&entry]).unwrap();
        ratchet.settle(state, &mut saving).await.unwrap();
    }

    /// Issues 11 and 14: a kept link sends before the save of the sessions is durable, so a
    /// run that did not stop cleanly leaves sessions that may be behind what they sealed.
    /// The next run retires them (a new session is started); after a clean stop they seal
    /// on.
    #[tokio::test]
    async fn sessions_of_a_run_that_crashed_never_seal_again_and_those_of_a_clean_one_do() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Arc::new(Identity::generate());
        let bob = bob_bundle();
        let bob_name = name("bob");
        let reopen = || {
            let state = State::open(dir.path()).unwrap();
            let ratchet = Ratchet::load(&state, &alice, &name("alice")).unwrap();
            (state, ratchet)
        };

        // A run that ends without its clean stop (a crash).
        let (state, ratchet) = reopen();
        seal_one(&ratchet, &state, &bob, 1).await;
        assert!(ratchet.has_session(&state, &bob_name).unwrap());
        drop((ratchet, state));

        let (state, ratchet) = reopen();
        assert!(
            !ratchet.has_session(&state, &bob_name).unwrap(),
            "a session saved by a run that crashed may still seal"
        );
        // A new session; this run stops cleanly.
        seal_one(&ratchet, &state, &bob, 2).await;
        ratchet.end_run(&state).await.unwrap();
        drop((ratchet, state));

        let (state, ratchet) = reopen();
        assert!(
            ratchet.has_session(&state, &bob_name).unwrap(),
            "a clean stop keeps the sessions for sealing"
        );
        // The retired session was saved retired: the next crash retires the new one too,
        // and nothing seals with either.
        seal_one(&ratchet, &state, &bob, 3).await;
        drop((ratchet, state));
        let (state, ratchet) = reopen();
        assert!(!ratchet.has_session(&state, &bob_name).unwrap());
    }

    /// A save that fails retires what it carried: the envelopes it covered may have left.
    #[tokio::test]
    async fn sessions_a_failed_save_carried_are_read_again_retired() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Arc::new(Identity::generate());
        let bob = bob_bundle();
        let bob_name = name("bob");
        let state = State::open(dir.path()).unwrap();
        let ratchet = Ratchet::load(&state, &alice, &name("alice")).unwrap();
        seal_one(&ratchet, &state, &bob, 1).await;
        ratchet.forget(&state, std::slice::from_ref(&bob_name), false);
        assert!(!ratchet.has_session(&state, &bob_name).unwrap());
    }
}
