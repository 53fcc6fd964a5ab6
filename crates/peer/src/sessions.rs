//! [`Ratchet`]: the user's Olm account and their Olm sessions with each peer, in memory
//! over the state's `olm` tables, shared by every task that seals or opens.
//!
//! One lock guards them all (sealing or opening one message takes microseconds, and no
//! lock is held across an `.await`). Whatever a seal or an open changed is saved by a
//! state write submitted while that lock is held ([`Ratchet::seal`], [`Ratchet::save_with`]):
//! writes commit in the order submitted, so the saved state only ever moves forward, and
//! the caller lets an envelope leave (or acks an opened one) only once its write is
//! durable. After a crash the saved state is at least as far as anything that left, so a
//! message key is never used twice. When a write fails, what it carried is read again
//! from the disk ([`Ratchet::forget`]): the memory never runs ahead of a failed save.
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

use crate::state::{OutboxEntry, RatchetSave, State, StateError, Ticket};

/// The account and sessions (see the module docs).
pub(crate) struct Ratchet {
    inner: Mutex<Inner>,
}

struct Inner {
    me: Username,
    identity: Arc<Identity>,
    account: OwnAccount,
    /// Sessions read from the state so far (a peer with none has an empty entry).
    peers: HashMap<Username, Sessions>,
    /// Changed since their last save.
    dirty: HashSet<Username>,
    account_dirty: bool,
    /// One-time keys used up by sessions started since the last publish.
    used_one_time_keys: usize,
}

impl std::fmt::Debug for Ratchet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ratchet")
    }
}

impl Ratchet {
    /// The account saved in `state`, or a new one saved now (blocking: at start-up, off the
    /// runtime's threads).
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
        Ok(Self {
            inner: Mutex::new(Inner {
                me: me.clone(),
                identity: identity.clone(),
                account,
                peers: HashMap::new(),
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

    /// Whether a session with `peer` is started.
    pub(crate) fn has_session(&self, state: &State, peer: &Username) -> Result<bool, StateError> {
        let mut inner = self.lock();
        Ok(!inner.sessions(state, peer)?.is_empty())
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
        inner.sessions(state, peer)?.clear();
        inner.dirty.insert(peer.clone());
        Ok(())
    }

    /// Seals `entries` (all to `peer`, in order) with the newest session and submits the
    /// save: the envelopes may leave once the returned ticket is durable.
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
            envelopes.push(inner.seal(state, peer, entry)?);
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
        let Inner {
            peers,
            account,
            dirty,
            ..
        } = &mut *inner;
        let envelope =
            peer_sessions(peers, state, peer)?.seal_receipt(account, peer, id, receipt, now_ms)?;
        dirty.insert(peer.clone());
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
    /// disk again when next needed.
    pub(crate) fn forget(&self, state: &State, peers: &[Username], account: bool) {
        let mut inner = self.lock();
        for peer in peers {
            inner.peers.remove(peer);
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
    /// `peer`'s sessions, read from the state the first time.
    fn sessions(&mut self, state: &State, peer: &Username) -> Result<&mut Sessions, StateError> {
        peer_sessions(&mut self.peers, state, peer)
    }

    fn start(
        &mut self,
        state: &State,
        peer: &Username,
        peer_keys: &PublicKeys,
        bundle: &PreKeyBundle,
    ) -> Result<(), RatchetError> {
        peer_sessions(&mut self.peers, state, peer)?.start(
            &self.account,
            peer,
            peer_keys,
            bundle,
        )?;
        self.dirty.insert(peer.clone());
        Ok(())
    }

    fn seal(
        &mut self,
        state: &State,
        peer: &Username,
        entry: &OutboxEntry,
    ) -> Result<Envelope, RatchetError> {
        let envelope = peer_sessions(&mut self.peers, state, peer)?.seal(
            &self.account,
            peer,
            entry.id,
            &entry.body,
            entry.created_ms,
        )?;
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
        let opened = peer_sessions(&mut self.peers, state, peer)?.open(
            &mut self.account,
            peer,
            peer_keys,
            envelope,
        )?;
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
                let pickle = self.peers.get(&peer)?.pickle();
                Some((peer, pickle))
            })
            .collect();
        RatchetSave { account, sessions }
    }
}

/// `peer`'s sessions in `peers`, read from the state the first time (a free function, so
/// the account beside them can be borrowed at the same time).
fn peer_sessions<'a>(
    peers: &'a mut HashMap<Username, Sessions>,
    state: &State,
    peer: &Username,
) -> Result<&'a mut Sessions, StateError> {
    match peers.entry(peer.clone()) {
        Entry::Occupied(entry) => Ok(entry.into_mut()),
        Entry::Vacant(entry) => {
            let sessions = match state.olm_sessions(peer)? {
                Some(pickle) => Sessions::from_pickle(&pickle)?,
                None => Sessions::default(),
            };
            Ok(entry.insert(sessions))
        }
    }
}

impl From<PickleError> for StateError {
    fn from(error: PickleError) -> Self {
        StateError::Ratchet(error)
    }
}
