//! The Olm account and sessions, saved with the messages they sealed or opened, and the
//! runs that tell a clean stop from a crash.

use super::*;

/// Ratchet state to save with a write ([`crate::sessions`] builds it under its lock): the
/// account when it changed, and the sessions of every peer that changed.
#[derive(Default)]
pub struct RatchetSave {
    /// The account pickle, when it changed.
    pub account: Option<Zeroizing<Vec<u8>>>,
    /// Each changed peer's sessions pickle.
    pub sessions: Vec<(Username, Zeroizing<Vec<u8>>)>,
    /// The run that saves them ([`State::begin_run`]), saved with each peer's sessions.
    pub generation: u64,
}

impl std::fmt::Debug for RatchetSave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RatchetSave(account: {}, peers: {})",
            self.account.is_some(),
            self.sessions.len()
        )
    }
}

impl RatchetSave {
    /// Whether there is nothing to save.
    pub fn is_empty(&self) -> bool {
        self.account.is_none() && self.sessions.is_empty()
    }

    /// Writes it in `txn`.
    pub(super) fn write(&self, txn: &WriteTransaction) -> Result<(), StateError> {
        if let Some(account) = &self.account {
            txn.open_table(OLM)?
                .insert(OLM_ACCOUNT, account.as_slice())?;
        }
        if !self.sessions.is_empty() {
            let mut table = txn.open_table(OLM_SESSIONS)?;
            for (peer, pickle) in &self.sessions {
                let mut value = Zeroizing::new(Vec::with_capacity(9 + pickle.len()));
                value.push(SESSIONS_WITH_GENERATION);
                value.extend_from_slice(&self.generation.to_le_bytes());
                value.extend_from_slice(pickle);
                table.insert(peer.as_str(), value.as_slice())?;
            }
        }
        Ok(())
    }
}

/// The Olm sessions saved with one peer ([`State::olm_sessions`]).
pub struct SavedSessions {
    /// The run that saved them ([`State::begin_run`]).
    pub saved_by: u64,
    /// Their pickle ([`proto::ratchet::Sessions::pickle`]).
    pub pickle: Zeroizing<Vec<u8>>,
}

/// A run of the client on a state ([`State::begin_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// This run's number, saved with the sessions it saves.
    pub generation: u64,
    /// Sessions saved by an earlier run than this may not seal.
    pub sealable_from: u64,
}

impl Run {
    /// Whether sessions saved by run `saved_by` may seal in this run.
    pub fn sealable(&self, saved_by: u64) -> bool {
        saved_by >= self.sealable_from
    }
}

impl State {
    // ---- ratchet ----

    /// The saved Olm account, if there is one.
    pub fn olm_account(&self) -> Result<Option<Zeroizing<Vec<u8>>>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(OLM)?;
        Ok(table
            .get(OLM_ACCOUNT)?
            .map(|value| Zeroizing::new(value.value().to_vec())))
    }

    /// The saved Olm sessions with `peer`, if any, with the run that saved them.
    pub fn olm_sessions(&self, peer: &Username) -> Result<Option<SavedSessions>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(OLM_SESSIONS)?;
        let Some(value) = table.get(peer.as_str())? else {
            return Ok(None);
        };
        let value = value.value();
        Ok(Some(match value.split_first() {
            Some((&SESSIONS_WITH_GENERATION, rest)) if rest.len() >= 8 => {
                let (generation, pickle) = rest.split_at(8);
                let generation = u64::from_le_bytes(generation.try_into().unwrap_or_default());
                SavedSessions {
                    saved_by: generation,
                    pickle: Zeroizing::new(pickle.to_vec()),
                }
            }
            _ => SavedSessions {
                saved_by: 0,
                pickle: Zeroizing::new(value.to_vec()),
            },
        }))
    }

    /// Starts a run of the client on this state (blocking: at start-up, before anything is
    /// sealed), and returns it.
    ///
    /// A kept link sends what it sealed while the save of the sessions is still being
    /// committed, so after a crash the saved sessions may be behind what left. A run that
    /// did not stop cleanly ([`State::submit_end_run`]) therefore makes the sessions saved
    /// before this run retire from sealing when next read ([`Run::sealable`]): they still
    /// open what peers send in them, and the next message to such a peer starts a new
    /// session, so no message key serves twice.
    pub fn begin_run(&self) -> Result<Run, StateError> {
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let previous = meta.get(RUN_GENERATION)?.map_or(0, |value| value.value());
            // A state that never ran has nothing sealed: as if it stopped cleanly.
            let clean = meta.get(CLEAN_STOP)?.is_none_or(|value| value.value() == 1);
            let mut sealable_from = meta.get(SEALABLE_FROM)?.map_or(0, |value| value.value());
            let generation = previous + 1;
            if !clean {
                sealable_from = generation;
            }
            meta.insert(RUN_GENERATION, generation)?;
            meta.insert(SEALABLE_FROM, sealable_from)?;
            meta.insert(CLEAN_STOP, 0)?;
            Ok(Run {
                generation,
                sealable_from,
            })
        })
        .wait_blocking()
    }

    /// Records that the current run stopped cleanly: submit it after the last seal (its
    /// saves are committed before it, in order).
    pub fn submit_end_run(&self) -> Ticket<()> {
        self.write(|txn| {
            txn.open_table(META)?.insert(CLEAN_STOP, 1)?;
            Ok(())
        })
    }

    /// Saves a new Olm account, and with it the time until which mail sealed by the static
    /// channel from before the ratchet is accepted: now if this state has a history (that
    /// mail may still be on its way), else never (a new user has none).
    pub fn submit_new_account(&self, account: Zeroizing<Vec<u8>>, now_ms: u64) -> Ticket<()> {
        self.write(move |txn| {
            let mut meta = txn.open_table(META)?;
            if meta.get(LEGACY_UNTIL)?.is_none() {
                let had_history = !txn.open_table(HISTORY)?.is_empty()?;
                meta.insert(LEGACY_UNTIL, if had_history { now_ms } else { 0 })?;
            }
            txn.open_table(OLM)?
                .insert(OLM_ACCOUNT, account.as_slice())?;
            Ok(())
        })
    }

    /// Until when (milliseconds since the epoch) mail sealed by the static channel is
    /// accepted (see [`State::submit_new_account`]).
    pub fn legacy_until_ms(&self) -> Result<u64, StateError> {
        let txn = self.db.get()?.begin_read()?;
        Ok(txn
            .open_table(META)?
            .get(LEGACY_UNTIL)?
            .map_or(0, |value| value.value()))
    }

    /// Saves ratchet state on its own (after sealing: the envelopes leave once this is
    /// durable).
    pub fn submit_ratchet(&self, ratchet: RatchetSave) -> Ticket<()> {
        self.write(move |txn| ratchet.write(txn))
    }

    /// Saves ratchet state with the next write's commit (nothing waits on it: the account
    /// after its keys were published).
    pub fn submit_ratchet_lazy(&self, ratchet: RatchetSave) -> Ticket<()> {
        self.writer.submit_lazy(move |txn| ratchet.write(txn))
    }
}
