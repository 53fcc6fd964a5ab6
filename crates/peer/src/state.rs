//! [`State`]: everything a client remembers between runs, in one crash-safe redb file.
//!
//! Tables (all values are serde records encoded with [`proto::wire`]):
//! - `pins`: user → [`PublicKeys`] pinned on first use (trust on first use).
//! - `blocks`: user → [`BlockRecord`] (blocked or not, and whether the server knows yet).
//! - `mutes`: user → the wall-clock millisecond the mute ends.
//! - `history`: (peer, sequence) → [`HistoryEntry`], both directions, in order.
//! - `outbox`: message id → [`OutboxEntry`], messages not yet delivered or queued.
//! - `seen`: message id → when it was first stored (receivers de-duplicate by id).
//! - `unshown`: message id → [`InboundMessage`], stored but not yet shown to the user.
//! - `held`: message id → [`Envelope`], mail that arrived sealed under a sender key other
//!   than the pinned one: acked at the server (so it is not fetched forever) and kept here,
//!   sealed, until the user `trust`s the sender's new key and it is opened again.
//! - `meta`: counters (the next history sequence number).
//!
//! Every change is one unit of a write transaction, so a crash at any point leaves either the
//! state before the change or the state after it: a received message is in `history`, `seen`
//! and `unshown` together, or in none of them. Changes are committed by the group-commit
//! writer ([`crate::commit`]): many changes share one durable commit, and a change is
//! reported done only once its commit is. The blocking methods (`pin_if_absent`, `block`, ...)
//! wait for that commit; the hot paths have `submit_*` twins that return a [`Ticket`] to
//! await, so an async caller never holds a runtime thread for an `fsync`. Reads run
//! directly (redb readers see the last commit). Time-dependent calls take `now_ms`.
//!
//! **Architecture Invariant:** this module does no network I/O and knows nothing of the
//! runtime; it is plain synchronous storage that the runtime drives.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use proto::{Envelope, MessageId, PublicKeys, Username, seal::Plaintext, wire};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::commit::GroupWriter;
pub use crate::commit::Ticket;

/// The state file's name inside a user's data dir.
pub const STATE_FILE: &str = "state.redb";

const PINS: TableDefinition<&str, &[u8]> = TableDefinition::new("pins");
const BLOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("blocks");
const MUTES: TableDefinition<&str, u64> = TableDefinition::new("mutes");
const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
const OUTBOX: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("outbox");
const SEEN: TableDefinition<[u8; 16], u64> = TableDefinition::new("seen");
const UNSHOWN: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("unshown");
const HELD: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("held");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another process (probably another `p2pchat` of the same user) has the file open.
    #[error("the state file {path} is in use by another p2pchat process of this user")]
    InUse {
        /// The state file.
        path: String,
    },
    /// The database failed.
    #[error("state database error: {0}")]
    Database(#[from] redb::Error),
    /// A stored record does not decode.
    #[error("corrupt record in state table {table}: {source}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// Why it does not decode.
        source: wire::WireError,
    },
    /// The group commit holding this change failed (every change of the group gets this).
    #[error("state commit failed: {0}")]
    Commit(String),
    /// The writer thread has stopped (the runtime is shutting down).
    #[error("the state writer has stopped")]
    WriterStopped,
}

macro_rules! from_redb {
    ($($kind:ty),*) => {$(
        impl From<$kind> for StateError {
            fn from(error: $kind) -> Self {
                StateError::Database(error.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Whether a message went out or came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// I received it.
    Incoming,
    /// I sent it.
    Outgoing,
}

/// Where a message stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageStatus {
    /// Received and stored.
    Received,
    /// Sent, not yet delivered or queued.
    Pending,
    /// Acked by the recipient directly.
    Delivered,
    /// In the recipient's mailbox.
    Queued,
    /// Not delivered, for this reason.
    Failed(String),
}

/// One line of the local history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Position in the history (increasing).
    pub seq: u64,
    /// The message id.
    pub id: MessageId,
    /// In or out.
    pub direction: Direction,
    /// The other user.
    pub peer: Username,
    /// The text.
    pub body: String,
    /// When the sender wrote it.
    pub sent_at_ms: u64,
    /// Where it stands.
    pub status: MessageStatus,
}

/// A message waiting to be delivered or queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The message id (kept across retries, so the receiver de-duplicates).
    pub id: MessageId,
    /// The recipient.
    pub to: Username,
    /// The text.
    pub body: String,
    /// When it was written (sealed with this time on every attempt).
    pub created_ms: u64,
    /// Its history position.
    pub seq: u64,
    /// How many attempts failed so far.
    pub attempts: u32,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// A received message as it is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMessage {
    /// The message id.
    pub id: MessageId,
    /// The sender.
    pub from: Username,
    /// The text.
    pub body: String,
    /// When the sender wrote it.
    pub sent_at_ms: u64,
    /// When it was stored here.
    pub received_at_ms: u64,
    /// Its history position (display order).
    pub seq: u64,
    /// Whether it arrived while the sender was muted.
    pub while_muted: bool,
}

/// What storing a received message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// First time this id was seen: stored and marked not yet shown.
    New(InboundMessage),
    /// Already stored before (a retransmission): nothing changed.
    Duplicate,
}

/// What pinning a peer's keys found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinOutcome {
    /// No keys were pinned; these are now.
    New,
    /// The same keys were already pinned.
    Same,
    /// Other keys are pinned; nothing changed.
    Changed {
        /// The keys pinned before.
        pinned: PublicKeys,
    },
}

/// A block, as the server must learn it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    /// Blocked now (false: unblocked locally, server not yet told).
    pub active: bool,
    /// Whether the server has confirmed the current `active` value.
    pub synced: bool,
}

/// The client's persistent state. Share it behind an `Arc`: every write goes through its one
/// group-commit writer thread, in the order submitted.
#[derive(Debug)]
pub struct State {
    db: Arc<Database>,
    /// The next history position to hand out. Positions are allocated here, before the write
    /// commits (an outgoing message needs its own before it is sent), and every write that
    /// uses one raises the stored counter past it; a position lost to a failed write is a
    /// harmless gap.
    next_seq: Arc<AtomicU64>,
    writer: GroupWriter,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain records of strings and integers always encode.
    wire::encode(value)
        .map(|bytes| bytes.to_vec())
        .unwrap_or_default()
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StateError> {
    wire::decode(bytes).map_err(|source| StateError::Corrupt { table, source })
}

impl State {
    /// Opens (or creates) the state file in `dir`, which must exist.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(STATE_FILE);
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StateError::InUse {
                    path: path.display().to_string(),
                });
            }
            Err(error) => return Err(StateError::Database(error.into())),
        };
        // The history holds plaintext: only the owner may read it (the folder is 0700 too).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let private = std::fs::Permissions::from_mode(0o600);
            std::fs::set_permissions(&path, private)
                .map_err(|error| StateError::Database(redb::Error::Io(error)))?;
        }
        Self::from_database(db)
    }

    /// The state over an opened database: creates the missing tables, starts the writer.
    fn from_database(db: Database) -> Result<Self, StateError> {
        let txn = db.begin_write()?;
        txn.open_table(PINS)?;
        txn.open_table(BLOCKS)?;
        txn.open_table(MUTES)?;
        txn.open_table(HISTORY)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(SEEN)?;
        txn.open_table(UNSHOWN)?;
        txn.open_table(HELD)?;
        let next_seq = txn
            .open_table(META)?
            .get(NEXT_SEQ)?
            .map_or(1, |value| value.value());
        txn.commit()?;
        let db = Arc::new(db);
        Ok(Self {
            writer: GroupWriter::start(db.clone())?,
            db,
            next_seq: Arc::new(AtomicU64::new(next_seq)),
        })
    }

    /// Runs `work` in the writer's next group commit and waits until it is durable.
    fn write<T, F>(&self, work: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> Result<T, StateError> + Send + 'static,
    {
        self.writer.submit(work).wait()
    }

    // ---- pins ----

    /// The keys pinned for `user`, if any.
    pub fn pinned(&self, user: &Username) -> Result<Option<PublicKeys>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PINS)?;
        match table.get(user.as_str())? {
            Some(bytes) => Ok(Some(decode("pins", bytes.value())?)),
            None => Ok(None),
        }
    }

    /// Pins `keys` for `user` unless other keys are pinned already.
    pub fn pin_if_absent(
        &self,
        user: &Username,
        keys: &PublicKeys,
    ) -> Result<PinOutcome, StateError> {
        // Most calls find the same keys pinned: answer those without a write.
        match self.pinned(user)? {
            Some(pinned) if &pinned == keys => return Ok(PinOutcome::Same),
            Some(pinned) => return Ok(PinOutcome::Changed { pinned }),
            None => {}
        }
        let (user, keys) = (user.clone(), keys.clone());
        self.write(move |txn| {
            let mut table = txn.open_table(PINS)?;
            let existing = match table.get(user.as_str())? {
                Some(bytes) => Some(decode::<PublicKeys>("pins", bytes.value())?),
                None => None,
            };
            Ok(match existing {
                Some(pinned) if pinned == keys => PinOutcome::Same,
                Some(pinned) => PinOutcome::Changed { pinned },
                None => {
                    table.insert(user.as_str(), encode(&keys).as_slice())?;
                    PinOutcome::New
                }
            })
        })
    }

    /// Pins `keys` for `user`, replacing whatever was pinned (`trust`).
    pub fn repin(&self, user: &Username, keys: &PublicKeys) -> Result<(), StateError> {
        let (user, keys) = (user.clone(), encode(keys));
        self.write(move |txn| {
            txn.open_table(PINS)?
                .insert(user.as_str(), keys.as_slice())?;
            Ok(())
        })
    }

    // ---- blocks ----

    /// Blocks `user` (not yet confirmed by the server). Returns false if already blocked.
    pub fn block(&self, user: &Username) -> Result<bool, StateError> {
        self.set_block(user, true)
    }

    /// Unblocks `user` (the server still has to be told). Returns false if not blocked.
    pub fn unblock(&self, user: &Username) -> Result<bool, StateError> {
        self.set_block(user, false)
    }

    fn set_block(&self, user: &Username, active: bool) -> Result<bool, StateError> {
        let user = user.clone();
        self.write(move |txn| {
            let mut table = txn.open_table(BLOCKS)?;
            let current = match table.get(user.as_str())? {
                Some(bytes) => decode::<BlockRecord>("blocks", bytes.value())?.active,
                None => false,
            };
            if current != active {
                let record = BlockRecord {
                    active,
                    synced: false,
                };
                table.insert(user.as_str(), encode(&record).as_slice())?;
            }
            Ok(current != active)
        })
    }

    /// Whether `user` is blocked.
    pub fn is_blocked(&self, user: &Username) -> Result<bool, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        match table.get(user.as_str())? {
            Some(bytes) => Ok(decode::<BlockRecord>("blocks", bytes.value())?.active),
            None => Ok(false),
        }
    }

    /// Every block record, sorted by user.
    fn block_records(&self) -> Result<Vec<(Username, BlockRecord)>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        let mut records = Vec::new();
        for row in table.iter()? {
            let (user, bytes) = row?;
            // A name that no longer validates is skipped rather than fatal.
            if let Ok(user) = Username::new(user.value()) {
                records.push((user, decode("blocks", bytes.value())?));
            }
        }
        Ok(records)
    }

    /// The blocked users, sorted.
    pub fn blocked(&self) -> Result<Vec<Username>, StateError> {
        Ok(self
            .block_records()?
            .into_iter()
            .filter(|(_, record)| record.active)
            .map(|(user, _)| user)
            .collect())
    }

    /// Blocks and unblocks the server has not confirmed: (user, blocked).
    pub fn unsynced_blocks(&self) -> Result<Vec<(Username, bool)>, StateError> {
        Ok(self
            .block_records()?
            .into_iter()
            .filter(|(_, record)| !record.synced)
            .map(|(user, record)| (user, record.active))
            .collect())
    }

    /// Records that the server confirmed `user` as `active` (blocked or not). A confirmation
    /// that no longer matches the local record (the user changed their mind meanwhile) is
    /// ignored, so the newer change is still sent.
    pub fn block_synced(&self, user: &Username, active: bool) -> Result<(), StateError> {
        let user = user.clone();
        self.write(move |txn| {
            let mut table = txn.open_table(BLOCKS)?;
            let current = match table.get(user.as_str())? {
                Some(bytes) => Some(decode::<BlockRecord>("blocks", bytes.value())?),
                None => None,
            };
            match current {
                Some(record) if record.active == active && !active => {
                    table.remove(user.as_str())?;
                }
                Some(record) if record.active == active => {
                    let record = BlockRecord {
                        active,
                        synced: true,
                    };
                    table.insert(user.as_str(), encode(&record).as_slice())?;
                }
                _ => {}
            }
            Ok(())
        })
    }

    // ---- mutes ----

    /// Mutes `user` until `until_ms`.
    pub fn mute(&self, user: &Username, until_ms: u64) -> Result<(), StateError> {
        let user = user.clone();
        self.write(move |txn| {
            txn.open_table(MUTES)?.insert(user.as_str(), until_ms)?;
            Ok(())
        })
    }

    /// Ends the mute of `user`. Returns whether there was one.
    pub fn unmute(&self, user: &Username) -> Result<bool, StateError> {
        let user = user.clone();
        self.write(move |txn| Ok(txn.open_table(MUTES)?.remove(user.as_str())?.is_some()))
    }

    /// When the mute of `user` ends, if it is muted at `now_ms`.
    pub fn muted_until(&self, user: &Username, now_ms: u64) -> Result<Option<u64>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MUTES)?;
        Ok(table
            .get(user.as_str())?
            .map(|until| until.value())
            .filter(|until| mute_active(*until, now_ms)))
    }

    /// The earliest end of any mute (expired or not), for the runtime's timer.
    pub fn next_mute_end(&self) -> Result<Option<u64>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MUTES)?;
        let mut earliest: Option<u64> = None;
        for row in table.iter()? {
            let (_, until) = row?;
            earliest = Some(earliest.map_or(until.value(), |e| e.min(until.value())));
        }
        Ok(earliest)
    }

    /// Removes every mute that has ended at `now_ms` and returns whose.
    pub fn take_ended_mutes(&self, now_ms: u64) -> Result<Vec<Username>, StateError> {
        self.write(move |txn| {
            let mut ended = Vec::new();
            let mut table = txn.open_table(MUTES)?;
            table.retain(|user, until| {
                if mute_active(until, now_ms) {
                    true
                } else {
                    if let Ok(user) = Username::new(user) {
                        ended.push(user);
                    }
                    false
                }
            })?;
            Ok(ended)
        })
    }

    // ---- outgoing ----

    /// A new outgoing message's outbox entry (id, history position, time), not yet
    /// recorded: [`State::submit_outgoing`] records it.
    pub fn prepare_outgoing(&self, to: &Username, body: &str, now_ms: u64) -> OutboxEntry {
        OutboxEntry {
            id: MessageId::random(),
            to: to.clone(),
            body: body.to_owned(),
            created_ms: now_ms,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            attempts: 0,
            last_error: None,
        }
    }

    /// Records a prepared outgoing message: a pending history line and the outbox entry,
    /// together. Resolves once durable.
    pub fn submit_outgoing(&self, entry: &OutboxEntry) -> Ticket<()> {
        let entry = entry.clone();
        let encoded = encode(&entry);
        self.writer.submit(move |txn| {
            raise_next_seq(&mut txn.open_table(META)?, entry.seq)?;
            let line = HistoryEntry {
                seq: entry.seq,
                id: entry.id,
                direction: Direction::Outgoing,
                peer: entry.to.clone(),
                body: entry.body.clone(),
                sent_at_ms: entry.created_ms,
                status: MessageStatus::Pending,
            };
            txn.open_table(HISTORY)?
                .insert((entry.to.as_str(), entry.seq), encode(&line).as_slice())?;
            txn.open_table(OUTBOX)?
                .insert(entry.id.0, encoded.as_slice())?;
            Ok(())
        })
    }

    /// Prepares and records a new outgoing message, waiting until it is durable.
    pub fn queue_outgoing(
        &self,
        to: &Username,
        body: &str,
        now_ms: u64,
    ) -> Result<OutboxEntry, StateError> {
        let entry = self.prepare_outgoing(to, body, now_ms);
        self.submit_outgoing(&entry).wait()?;
        Ok(entry)
    }

    /// The outbox, oldest first.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        let mut entries = Vec::new();
        for row in table.iter()? {
            let (_, bytes) = row?;
            entries.push(decode::<OutboxEntry>("outbox", bytes.value())?);
        }
        entries.sort_by_key(|entry| entry.seq);
        Ok(entries)
    }

    /// Records the result of an attempt to send `entry`: a final status removes it from the
    /// outbox; `Failed` with `keep` leaves it there for a retry. Resolves once durable.
    pub fn submit_result(
        &self,
        entry: &OutboxEntry,
        status: &MessageStatus,
        keep: bool,
    ) -> Ticket<()> {
        let (entry, status) = (entry.clone(), status.clone());
        self.writer.submit(move |txn| {
            let mut outbox = txn.open_table(OUTBOX)?;
            if keep {
                let mut kept = entry.clone();
                kept.attempts = kept.attempts.saturating_add(1);
                kept.last_error = match &status {
                    MessageStatus::Failed(reason) => Some(reason.clone()),
                    _ => None,
                };
                outbox.insert(entry.id.0, encode(&kept).as_slice())?;
            } else {
                outbox.remove(entry.id.0)?;
            }
            let mut history = txn.open_table(HISTORY)?;
            let key = (entry.to.as_str(), entry.seq);
            let line = match history.get(key)? {
                Some(bytes) => Some(decode::<HistoryEntry>("history", bytes.value())?),
                None => None,
            };
            if let Some(mut line) = line {
                line.status = status.clone();
                history.insert(key, encode(&line).as_slice())?;
            }
            Ok(())
        })
    }

    /// [`State::submit_result`], waiting until it is durable.
    pub fn finish_attempt(
        &self,
        entry: &OutboxEntry,
        status: &MessageStatus,
        keep: bool,
    ) -> Result<(), StateError> {
        self.submit_result(entry, status, keep).wait()
    }

    // ---- incoming ----

    /// Stores opened messages, in order, each unless its id was seen before (also earlier
    /// in the same batch): for each, history, seen id and the not-yet-shown mark, all in one
    /// commit. Each pair is the message and whether it arrived while its sender was muted.
    /// Resolves once durable, with one outcome per message.
    pub fn submit_incoming(
        &self,
        messages: Vec<(Plaintext, bool)>,
        now_ms: u64,
    ) -> Ticket<Vec<StoreOutcome>> {
        let next_seq = self.next_seq.clone();
        self.writer.submit(move |txn| {
            let mut seen = txn.open_table(SEEN)?;
            let mut meta = txn.open_table(META)?;
            let mut history = txn.open_table(HISTORY)?;
            let mut unshown = txn.open_table(UNSHOWN)?;
            let mut outcomes = Vec::with_capacity(messages.len());
            for (message, while_muted) in &messages {
                if seen.get(message.id.0)?.is_some() {
                    outcomes.push(StoreOutcome::Duplicate);
                    continue;
                }
                seen.insert(message.id.0, now_ms)?;
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                raise_next_seq(&mut meta, seq)?;
                let line = HistoryEntry {
                    seq,
                    id: message.id,
                    direction: Direction::Incoming,
                    peer: message.from.clone(),
                    body: message.body.clone(),
                    sent_at_ms: message.sent_at_ms,
                    status: MessageStatus::Received,
                };
                history.insert((message.from.as_str(), seq), encode(&line).as_slice())?;
                let inbound = InboundMessage {
                    id: message.id,
                    from: message.from.clone(),
                    body: message.body.clone(),
                    sent_at_ms: message.sent_at_ms,
                    received_at_ms: now_ms,
                    seq,
                    while_muted: *while_muted,
                };
                unshown.insert(message.id.0, encode(&inbound).as_slice())?;
                outcomes.push(StoreOutcome::New(inbound));
            }
            Ok(outcomes)
        })
    }

    /// Stores one opened message (see [`State::submit_incoming`]), waiting until durable.
    pub fn store_incoming(
        &self,
        message: &Plaintext,
        while_muted: bool,
        now_ms: u64,
    ) -> Result<StoreOutcome, StateError> {
        self.submit_incoming(vec![(message.clone(), while_muted)], now_ms)
            .wait()?
            .pop()
            .ok_or_else(|| StateError::Commit("no outcome for a stored message".into()))
    }

    /// Whether a message id was stored before.
    pub fn is_seen(&self, id: &MessageId) -> Result<bool, StateError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(SEEN)?.get(id.0)?.is_some())
    }

    /// Forgets seen ids stored more than `retention_ms` before `now_ms`. Messages older
    /// than that are refused on arrival, so forgetting their ids cannot let a replay in.
    pub fn prune_seen(&self, now_ms: u64, retention_ms: u64) -> Result<u64, StateError> {
        self.write(move |txn| {
            let mut removed = 0;
            txn.open_table(SEEN)?.retain(|_, stored_at| {
                let keep = stored_at.saturating_add(retention_ms) >= now_ms;
                removed += u64::from(!keep);
                keep
            })?;
            Ok(removed)
        })
    }

    /// Messages stored but not yet shown, in arrival order.
    pub fn unshown(&self) -> Result<Vec<InboundMessage>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(UNSHOWN)?;
        let mut messages = Vec::new();
        for row in table.iter()? {
            let (_, bytes) = row?;
            messages.push(decode::<InboundMessage>("unshown", bytes.value())?);
        }
        messages.sort_by_key(|message| message.seq);
        Ok(messages)
    }

    /// Marks a message as shown. Resolves once durable.
    ///
    /// This is a write like the others, batched with them, and the runtime answers
    /// [`crate::Client::mark_shown`] only once it is durable — it is not deferred to "some
    /// later commit" — so the only window in which a crash re-shows a message is the one
    /// inherent to showing first and recording second (between the user seeing it and
    /// this commit, one group commit long), exactly as with a commit of its own. Recording
    /// before showing would close that window but open a worse one (a crash in between
    /// hides a message for good), so at-least-once display stays.
    pub fn submit_shown(&self, id: &MessageId) -> Ticket<()> {
        let id = *id;
        self.writer.submit(move |txn| {
            txn.open_table(UNSHOWN)?.remove(id.0)?;
            Ok(())
        })
    }

    /// [`State::submit_shown`], waiting until it is durable.
    pub fn mark_shown(&self, id: &MessageId) -> Result<(), StateError> {
        self.submit_shown(id).wait()
    }

    // ---- held (sealed under a changed key) ----

    /// Keeps `envelope` sealed until its sender is trusted again. Idempotent by message
    /// id. Returns false (and keeps nothing) when `max` envelopes are held already, so a
    /// sender with a new key cannot fill the disk.
    pub fn hold(&self, envelope: &Envelope, max: u64) -> Result<bool, StateError> {
        let (id, encoded) = (envelope.id, encode(envelope));
        self.write(move |txn| {
            let mut table = txn.open_table(HELD)?;
            Ok(if table.get(id.0)?.is_some() {
                true
            } else if table.len()? >= max {
                false
            } else {
                table.insert(id.0, encoded.as_slice())?;
                true
            })
        })
    }

    /// The envelopes held from `from`.
    pub fn held_from(&self, from: &Username) -> Result<Vec<Envelope>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HELD)?;
        let mut envelopes = Vec::new();
        for row in table.iter()? {
            let (_, bytes) = row?;
            let envelope: Envelope = decode("held", bytes.value())?;
            if &envelope.from == from {
                envelopes.push(envelope);
            }
        }
        Ok(envelopes)
    }

    /// Forgets a held envelope (opened and stored, or refused for good).
    pub fn unhold(&self, id: &MessageId) -> Result<(), StateError> {
        let id = *id;
        self.write(move |txn| {
            txn.open_table(HELD)?.remove(id.0)?;
            Ok(())
        })
    }

    /// The last `limit` history lines with `peer`, oldest first.
    pub fn history(&self, peer: &Username, limit: usize) -> Result<Vec<HistoryEntry>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HISTORY)?;
        let mut lines = Vec::new();
        for row in table
            .range((peer.as_str(), 0)..=(peer.as_str(), u64::MAX))?
            .rev()
            .take(limit)
        {
            let (_, bytes) = row?;
            lines.push(decode::<HistoryEntry>("history", bytes.value())?);
        }
        lines.reverse();
        Ok(lines)
    }
}

/// Whether a mute ending at `until_ms` is still on at `now_ms`.
pub fn mute_active(until_ms: u64, now_ms: u64) -> bool {
    now_ms < until_ms
}

/// Raises the stored next history position past `seq` (used now), so a restart does not
/// hand it out again.
fn raise_next_seq(meta: &mut redb::Table<'_, &str, u64>, seq: u64) -> Result<(), StateError> {
    let stored = meta.get(NEXT_SEQ)?.map_or(1, |value| value.value());
    if stored <= seq {
        meta.insert(NEXT_SEQ, seq.saturating_add(1))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Identity;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    fn plaintext(from: &str, body: &str, sent_at_ms: u64) -> Plaintext {
        Plaintext {
            id: MessageId::random(),
            from: name(from),
            to: name("me"),
            sent_at_ms,
            body: body.to_owned(),
        }
    }

    #[test]
    fn everything_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let bob = name("bob");
        let keys = Identity::generate().public().clone();
        let message = plaintext("bob", "hello", 1_000);
        let queued;
        {
            let state = State::open(dir.path()).unwrap();
            assert_eq!(state.pin_if_absent(&bob, &keys).unwrap(), PinOutcome::New);
            assert!(state.block(&name("mallory")).unwrap());
            state.mute(&bob, 50_000).unwrap();
            queued = state.queue_outgoing(&bob, "hi bob", 2_000).unwrap();
            assert!(matches!(
                state.store_incoming(&message, false, 3_000).unwrap(),
                StoreOutcome::New(_)
            ));
        }
        let state = State::open(dir.path()).unwrap();
        assert_eq!(state.pinned(&bob).unwrap(), Some(keys));
        assert_eq!(state.blocked().unwrap(), vec![name("mallory")]);
        assert_eq!(state.muted_until(&bob, 10_000).unwrap(), Some(50_000));
        assert_eq!(state.outbox().unwrap(), vec![queued.clone()]);
        assert!(state.is_seen(&message.id).unwrap());
        assert_eq!(state.unshown().unwrap().len(), 1);
        let history = state.history(&bob, 10).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].body, "hi bob");
        assert_eq!(history[0].status, MessageStatus::Pending);
        assert_eq!(history[1].body, "hello");
        assert_eq!(history[1].direction, Direction::Incoming);
    }

    #[test]
    fn a_second_open_of_the_same_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _first = State::open(dir.path()).unwrap();
        assert!(matches!(
            State::open(dir.path()),
            Err(StateError::InUse { .. })
        ));
    }

    #[test]
    fn seen_ids_deduplicate_and_unshown_marks_clear() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let first = plaintext("bob", "one", 1);
        let second = plaintext("bob", "two", 2);
        let StoreOutcome::New(stored) = state.store_incoming(&first, false, 10).unwrap() else {
            panic!("first store must be new");
        };
        assert_eq!(stored.body, "one");
        assert_eq!(
            state.store_incoming(&first, false, 11).unwrap(),
            StoreOutcome::Duplicate
        );
        state.store_incoming(&second, true, 12).unwrap();
        let unshown = state.unshown().unwrap();
        assert_eq!(
            unshown.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert!(unshown[1].while_muted);
        state.mark_shown(&first.id).unwrap();
        assert_eq!(state.unshown().unwrap().len(), 1);
        // A duplicate after being shown is still a duplicate: shown once.
        assert_eq!(
            state.store_incoming(&first, false, 13).unwrap(),
            StoreOutcome::Duplicate
        );
        assert_eq!(state.history(&name("bob"), 10).unwrap().len(), 2);
        // Pruning forgets only ids older than the retention.
        assert_eq!(state.prune_seen(12, 1).unwrap(), 1);
        assert!(!state.is_seen(&first.id).unwrap());
        assert!(state.is_seen(&second.id).unwrap());
    }

    #[test]
    fn outbox_keeps_failures_for_retry_and_drops_final_results() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let bob = name("bob");
        let first = state.queue_outgoing(&bob, "one", 1).unwrap();
        let second = state.queue_outgoing(&bob, "two", 2).unwrap();
        assert_eq!(state.outbox().unwrap(), vec![first.clone(), second.clone()]);
        let failed = MessageStatus::Failed("server unreachable".into());
        state.finish_attempt(&first, &failed, true).unwrap();
        state
            .finish_attempt(&second, &MessageStatus::Delivered, false)
            .unwrap();
        let outbox = state.outbox().unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].id, first.id);
        assert_eq!(outbox[0].attempts, 1);
        assert_eq!(outbox[0].last_error.as_deref(), Some("server unreachable"));
        let history = state.history(&bob, 10).unwrap();
        assert_eq!(history[0].status, failed);
        assert_eq!(history[1].status, MessageStatus::Delivered);
        // The retry succeeds: queued, gone from the outbox.
        state
            .finish_attempt(&outbox[0], &MessageStatus::Queued, false)
            .unwrap();
        assert!(state.outbox().unwrap().is_empty());
        assert_eq!(
            state.history(&bob, 1).unwrap()[0].status,
            MessageStatus::Delivered
        );
        assert_eq!(
            state.history(&bob, 2).unwrap()[0].status,
            MessageStatus::Queued
        );
    }

    #[test]
    fn held_envelopes_survive_a_reopen_and_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let envelope = |from: &str| Envelope {
            id: MessageId::random(),
            from: name(from),
            to: name("me"),
            token: "sealed".to_owned(),
        };
        let (first, second, third) = (envelope("alice"), envelope("carol"), envelope("alice"));
        {
            let state = State::open(dir.path()).unwrap();
            assert!(state.hold(&first, 2).unwrap());
            assert!(state.hold(&first, 2).unwrap(), "holding again is a no-op");
            assert!(state.hold(&second, 2).unwrap());
            assert!(!state.hold(&third, 2).unwrap(), "over the cap");
        }
        let state = State::open(dir.path()).unwrap();
        assert_eq!(
            state.held_from(&name("alice")).unwrap(),
            vec![first.clone()]
        );
        assert_eq!(state.held_from(&name("carol")).unwrap(), vec![second]);
        state.unhold(&first.id).unwrap();
        assert!(state.held_from(&name("alice")).unwrap().is_empty());
    }

    #[test]
    fn mutes_end_at_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let bob = name("bob");
        let carol = name("carol");
        state.mute(&bob, 10_000).unwrap();
        state.mute(&carol, 20_000).unwrap();
        assert_eq!(state.next_mute_end().unwrap(), Some(10_000));
        assert_eq!(state.muted_until(&bob, 9_999).unwrap(), Some(10_000));
        assert_eq!(state.muted_until(&bob, 10_000).unwrap(), None);
        assert!(state.take_ended_mutes(9_999).unwrap().is_empty());
        assert_eq!(state.take_ended_mutes(10_000).unwrap(), vec![bob.clone()]);
        assert_eq!(state.next_mute_end().unwrap(), Some(20_000));
        assert!(state.unmute(&carol).unwrap());
        assert!(!state.unmute(&carol).unwrap());
        assert_eq!(state.next_mute_end().unwrap(), None);
    }

    #[test]
    fn pins_are_first_use_and_changes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let bob = name("bob");
        let first = Identity::generate().public().clone();
        let second = Identity::generate().public().clone();
        assert_eq!(state.pin_if_absent(&bob, &first).unwrap(), PinOutcome::New);
        assert_eq!(state.pin_if_absent(&bob, &first).unwrap(), PinOutcome::Same);
        assert_eq!(
            state.pin_if_absent(&bob, &second).unwrap(),
            PinOutcome::Changed {
                pinned: first.clone()
            }
        );
        assert_eq!(state.pinned(&bob).unwrap(), Some(first));
        state.repin(&bob, &second).unwrap();
        assert_eq!(state.pinned(&bob).unwrap(), Some(second));
    }

    #[test]
    fn blocks_track_what_the_server_has_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let mallory = name("mallory");
        assert!(state.block(&mallory).unwrap());
        assert!(!state.block(&mallory).unwrap());
        assert!(state.is_blocked(&mallory).unwrap());
        assert_eq!(
            state.unsynced_blocks().unwrap(),
            vec![(mallory.clone(), true)]
        );
        state.block_synced(&mallory, true).unwrap();
        assert!(state.unsynced_blocks().unwrap().is_empty());
        assert!(state.unblock(&mallory).unwrap());
        assert!(!state.is_blocked(&mallory).unwrap());
        // A stale confirmation (of the block) does not hide the pending unblock.
        state.block_synced(&mallory, true).unwrap();
        assert_eq!(
            state.unsynced_blocks().unwrap(),
            vec![(mallory.clone(), false)]
        );
        state.block_synced(&mallory, false).unwrap();
        assert!(state.unsynced_blocks().unwrap().is_empty());
        assert!(state.blocked().unwrap().is_empty());
    }
}
