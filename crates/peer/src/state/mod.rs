//! [`State`]: everything a client remembers between runs, in one crash-safe redb file.
//!
//! Tables (all values are serde records encoded with [`proto::wire`]):
//! - `pins`: user → [`PublicKeys`] pinned on first use (trust on first use).
//! - `blocks`: user → [`BlockRecord`] (blocked or not, and whether the server knows yet).
//! - `mutes`: user → the wall-clock millisecond the mute ends.
//! - `history`: (peer, sequence) → [`HistoryEntry`], both directions, in order.
//! - `outbox_by_seq`: history sequence → [`OutboxEntry`], messages not yet delivered or
//!   queued.
//! - `unshown_by_seq`: history sequence → [`InboundMessage`], stored but not yet shown.
//! - `held_by_sender`: (sender, message id) → [`Envelope`], mail that arrived sealed under a
//!   sender key other than the pinned one: acked at the server (so it is not fetched forever) and kept here,
//!   sealed, until the user `trust`s the sender's new key and it is opened again.
//! - `early`: (when it opens, sender, message id) → [`Envelope`], mail dated ahead (its
//!   sender's clock is fast): acked at the server, so it never holds up the mail behind it,
//!   and kept here, sealed, until its time comes and it is opened and shown.
//! - `seen_ids`: (sender, message id) → the time the sender wrote it, for every message
//!   stored (receivers de-duplicate by sender and id: two senders may use one id). A copy
//!   (mail fetched again, a retransmission, a replay) is known before it is opened, which
//!   it could not be twice (its message key is used up), and again in the commit that
//!   would store it. Pruned at start by the time the sender wrote it.
//! - `olm`: `account` → the user's Olm account ([`proto::ratchet::OwnAccount`] pickle).
//! - `olm_sessions`: peer → the Olm sessions with them ([`proto::ratchet::Sessions`]
//!   pickle). Saved in the same write as the message they sealed or opened
//!   ([`RatchetSave`]); see [`crate::sessions`].
//! - `receipts_due`: (sender, kind, message id) → when it became due: receipts this
//!   client owes (delivered: written in the commit that stores mail; read: in the commit
//!   that marks a message shown), removed once the receipt is delivered or queued, so a
//!   crash right after storing mail never loses its receipt ([`crate::receipts`]).
//! - `resends_by_sent_at`: (time a sent message was written, its recipient, its id) → how
//!   many times it was sent again at the recipient's request; pruned with the seen ids.
//! - `meta`: counters (the next history sequence number; until when mail sealed by the
//!   static channel from before the ratchet is accepted).
//!
//! The hot tables are keyed so that a batch of messages appends to the same few B-tree
//! pages instead of dirtying one 4 KiB page per message (redb copies every page a commit
//! touches): `outbox_by_seq` and `unshown_by_seq` by the history sequence, which only grows.
//! A received message writes one seen table, not two: each table a commit changes costs its
//! B-tree path and its root in redb's table tree, pages that the `fsync` on a message's
//! path has to write. Pruning `seen_ids` reads it whole, at each start and once a day while
//! the client runs, and forgets the ids older than the retention, the same bound beyond
//! which [`crate::inbox`] refuses a message anyway. Layout 1 (files written before this
//! layout) keyed these three tables by message id under the names `outbox`,
//! `seen` and `unshown`; [`State::open`] copies such tables into the new ones once, in the
//! same transaction that deletes them ([`migrate_layout_1`]). Layout 2 keyed seen ids
//! without their sender (`seen_by_sent_at`); [`migrate_layout_2`] moves them to
//! `seen_by_sender` the same way. Layouts 3 and 4 kept that second seen table, keyed by
//! the time the sender wrote the message, beside `seen_ids`; [`migrate_seen_v4`] copies
//! any id missing from `seen_ids` and deletes it. Layouts up to 3 keyed held mail by id
//! alone (`held`), so a second sender's held message with the same id was taken for the
//! first and lost; [`migrate_held`] moves it to `held_by_sender`. Layouts up to 4 counted requests to
//! send again by (recipient, id) alone (`resends`), which no prune could bound;
//! [`migrate_resends`] keys each count by its message's time in `resends_by_sent_at`.
//!
//! Every change is one unit of a write transaction, so a crash at any point leaves either the
//! state before the change or the state after it: a received message is in `history`,
//! `seen_ids` and `unshown` together, or in none of them. Changes are committed by the group-commit
//! writer ([`durable::GroupWriter`]): many changes share one durable commit, and a change is
//! reported done only once its commit is. Readers and the writer take the database from a
//! [`durable::DatabaseSlot`], which opens the file again after an I/O failure. Every write
//! is submitted when it is called and returns a [`Ticket`] that resolves once durable
//! (`pin_if_absent`, which reads first, is an `async fn`): nothing here blocks a runtime
//! worker on an `fsync`, and writes are committed in the order they were called. The one
//! write made on its caller's thread, the store of received messages that an ack waits for
//! (`submit_incoming`), commits inside `tokio::task::block_in_place` when the writer is
//! idle, so the worker's other tasks move to another thread meanwhile. Reads run directly
//! (redb readers see the last commit). Time-dependent calls take `now_ms`.
//!
//! The code is split by concern, each part an `impl State` of its own with the records
//! it writes: `contacts` (pins, blocks, mutes), `messages` (outbox, history, incoming,
//! receipts, requests to send again), `ratchet` (the Olm account and sessions, runs),
//! `held` (held and early mail) and `migrate` (layout migrations); this file has the
//! tables, the shared records and opening.
//!
//! **Architecture Invariant:** this module does no network I/O and knows nothing of the
//! runtime; it is plain synchronous storage that the runtime drives.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use proto::{
    Envelope, MessageId, PublicKeys, Receipt, ReceiptKind, Username, seal::Plaintext, wire,
};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
    WriteTransaction,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use zeroize::Zeroizing;

use durable::{DatabaseSlot, GroupWriter, Opener};

use crate::reason::FailureReason;

/// A submitted state write: resolves once durable (see [`durable::Ticket`]).
pub type Ticket<T> = durable::Ticket<T, StateError>;

/// The most writes committed in one transaction (a bound on the work behind one `fsync`
/// and on how long the first waiter of a group waits for the last).
const MAX_GROUP: usize = 4096;

mod contacts;
mod held;
mod messages;
mod migrate;
mod ratchet;
#[cfg(test)]
mod tests;

use self::migrate::*;
pub use self::{contacts::*, messages::*, ratchet::*};

/// How many of a peer's latest history lines [`State::written_to`] looks through.
pub const WRITTEN_TO_SCAN: usize = 1_000;

/// The state file's name inside a user's data dir.
pub const STATE_FILE: &str = "state.redb";
/// The file locked while a process has the data dir's state open.
pub const LOCK_FILE: &str = "state.lock";

const PINS: TableDefinition<&str, &[u8]> = TableDefinition::new("pins");
const BLOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("blocks");
const MUTES: TableDefinition<&str, u64> = TableDefinition::new("mutes");
const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_by_seq");
/// Layouts 3 and 4's seen ids, keyed by the time the sender wrote them beside `seen_ids`: migrated
/// at open, then deleted.
const SEEN_V4: TableDefinition<(u64, [u8; 16], &str), u64> = TableDefinition::new("seen_by_sender");
/// Layout 2's seen ids, keyed without their sender: migrated at open, then deleted.
const SEEN_V2: TableDefinition<(u64, [u8; 16]), u64> = TableDefinition::new("seen_by_sent_at");
const UNSHOWN: TableDefinition<u64, &[u8]> = TableDefinition::new("unshown_by_seq");
/// Layout 1's tables, keyed by message id: migrated at open, then deleted.
const OUTBOX_V1: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("outbox");
const SEEN_V1: TableDefinition<[u8; 16], u64> = TableDefinition::new("seen");
const UNSHOWN_V1: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("unshown");
const HELD: TableDefinition<(&str, [u8; 16]), &[u8]> = TableDefinition::new("held_by_sender");
/// Layouts up to 3's held mail, keyed by id alone: migrated at open, then deleted.
const HELD_V3: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("held");
const EARLY: TableDefinition<(u64, &str, [u8; 16]), &[u8]> = TableDefinition::new("early");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Every history position handed out is below this stored ceiling, which is raised a
/// block at a time ([`SEQ_BLOCK`]) so most commits leave the table alone; a start
/// continues from it, leaving a gap of at most one block.
const NEXT_SEQ: &str = "next_seq";
/// How far the stored ceiling of history positions is raised at once: one commit in this
/// many writes the `meta` table, the others touch one table fewer (fewer pages to sync).
const SEQ_BLOCK: u64 = 1024;
/// Messages sealed by the static channel are accepted only if written before this time
/// (the moment this state first made an Olm account; 0 for a state that never had
/// messages before it).
const LEGACY_UNTIL: &str = "legacy_until_ms";
const SEEN_IDS: TableDefinition<(&str, [u8; 16]), u64> = TableDefinition::new("seen_ids");
const OLM: TableDefinition<&str, &[u8]> = TableDefinition::new("olm");
const RECEIPTS_DUE: TableDefinition<(&str, u8, [u8; 16]), u64> =
    TableDefinition::new("receipts_due");
/// How many of the latest history lines with a peer a receipt from them is matched
/// against: a receipt names recent messages (one per stored batch or shown screen), and
/// one for older ones leaves their status as it was rather than cost a scan of the whole
/// history.
const RECEIPT_SCAN_LINES: usize = 8192;
/// How long seen ids are remembered, and so the oldest message accepted (mail lives up to
/// 30 days in a mailbox; this leaves a margin): `crate::api::SEEN_RETENTION_MS`.
pub const SEEN_RETENTION_MS: u64 = 40 * 24 * 3600 * 1000;
/// How many times each sent message is sent again at its recipient's request
/// ([`ReceiptKind::Resend`]) at most: a peer cannot make this client send unboundedly.
pub const MAX_RESENDS_PER_MESSAGE: u8 = 3;
/// The most ids owed in requests to send again to one peer (beyond it, more unopenable
/// messages of theirs are only told): a peer sending garbage cannot fill the disk.
pub const MAX_RESENDS_OWED_PER_PEER: usize = 4 * proto::seal::MAX_RECEIPT_IDS;
/// How often each sent message was sent again at its recipient's request, keyed by
/// (when it was written, recipient, id), so counts past the retention go in one range
/// delete ([`State::prune_seen`]).
const RESENDS: TableDefinition<(u64, &str, [u8; 16]), u8> =
    TableDefinition::new("resends_by_sent_at");
/// Layouts up to 4's resend counts, keyed by (recipient, id) with no time, so never
/// pruned: migrated at open, then deleted.
const RESENDS_V4: TableDefinition<(&str, [u8; 16]), u8> = TableDefinition::new("resends");
const OLM_ACCOUNT: &str = "account";
const OLM_SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("olm_sessions");
/// The first byte of an `olm_sessions` value that starts with the run that saved it (a
/// little-endian u64) before the pickle; a value without it (a JSON pickle, from before
/// runs were counted) was saved by run 0.
const SESSIONS_WITH_GENERATION: u8 = b'g';
/// The current run of the client on this state ([`State::begin_run`]).
const RUN_GENERATION: &str = "run_generation";
/// Sessions saved by a run before this one may not seal ([`State::begin_run`]).
const SEALABLE_FROM: &str = "sealable_from_generation";
/// 1 once the current run stopped cleanly ([`State::submit_end_run`]), 0 while it runs.
const CLEAN_STOP: &str = "clean_stop";

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
    /// The durable write failed: its group's commit (every change of the group gets
    /// this), the state file closed after an I/O failure until it opens again, or the
    /// writer stopped (the runtime is shutting down).
    #[error("state write: {0}")]
    Durable(#[from] durable::Error),
    /// A write answered without an outcome for one of its entries.
    #[error("the state write answered without an outcome")]
    NoOutcome,
    /// The saved Olm account or sessions do not decode.
    #[error("corrupt ratchet state: {0}")]
    Ratchet(proto::ratchet::PickleError),
}

// A job's own database error is not handed to the slot: if it left redb refusing
// everything, the writer's next transaction meets that and closes the database.
impl durable::JobError for StateError {}

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
    /// Acked by the recipient directly, or stored by it from its mailbox (a delivered
    /// receipt).
    Delivered,
    /// In the recipient's mailbox.
    Queued,
    /// Not delivered, as worded by a version that stored reasons as text.
    FailedAsText(String),
    /// Not delivered, for this reason.
    Failed(FailureReason),
    /// The recipient's screen showed it (a read receipt). Added last, so every status
    /// stored before keeps its encoding.
    Read,
}

impl MessageStatus {
    /// How far a status has come, for the sender: it only ever moves up.
    fn rank(&self) -> u8 {
        match self {
            Self::Read => 3,
            Self::Delivered => 2,
            Self::Received
            | Self::Pending
            | Self::Queued
            | Self::FailedAsText(_)
            | Self::Failed(_) => 1,
        }
    }

    /// The status a sent message takes on a receipt of `kind`, if that moves it forward
    /// (a delivered receipt after a read one changes nothing).
    pub fn after_receipt(&self, kind: ReceiptKind) -> Option<MessageStatus> {
        let target = match kind {
            ReceiptKind::Delivered => Self::Delivered,
            ReceiptKind::Read => Self::Read,
            // A request to send again moves nothing forward (it queues the message again:
            // [`State::submit_incoming`]).
            ReceiptKind::Resend => return None,
        };
        (self.rank() < target.rank()).then_some(target)
    }

    /// The status a send `result` leaves on a line that has this one: the result, unless
    /// a receipt took the line further first (results are written lazily, after the ack).
    pub fn settled(&self, result: MessageStatus) -> MessageStatus {
        if self.rank() > result.rank() {
            self.clone()
        } else {
            result
        }
    }
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
    /// The last failure's code ([`FailureReason::code`]), if any.
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
    /// Whether it came from the mailbox (the sender could not reach this client directly,
    /// or it was offline), not over a direct connection.
    pub via_mailbox: bool,
}

/// [`InboundMessage`] as stored before it said whether it came from the mailbox: read as
/// not from the mailbox.
#[derive(Serialize, Deserialize)]
struct InboundMessageWithoutRoute {
    id: MessageId,
    from: Username,
    body: String,
    sent_at_ms: u64,
    received_at_ms: u64,
    seq: u64,
    while_muted: bool,
}

/// Decodes a stored [`InboundMessage`], of this layout or of the one before it.
fn decode_inbound(table: &'static str, bytes: &[u8]) -> Result<InboundMessage, StateError> {
    match wire::decode::<InboundMessage>(bytes) {
        Ok(message) => Ok(message),
        Err(error) => match wire::decode::<InboundMessageWithoutRoute>(bytes) {
            Ok(old) => Ok(InboundMessage {
                id: old.id,
                from: old.from,
                body: old.body,
                sent_at_ms: old.sent_at_ms,
                received_at_ms: old.received_at_ms,
                seq: old.seq,
                while_muted: old.while_muted,
                via_mailbox: false,
            }),
            Err(_) => Err(StateError::Corrupt {
                table,
                source: error,
            }),
        },
    }
}

/// The client's persistent state. Share it behind an `Arc`: every write goes through its one
/// group-commit writer thread, in the order submitted.
#[derive(Debug)]
pub struct State {
    db: Arc<DatabaseSlot>,
    /// The next history position to hand out. Positions are allocated here, before the write
    /// commits (an outgoing message needs its own before it is sent), and every write that
    /// uses one raises the stored counter past it; a position lost to a failed write is a
    /// harmless gap.
    next_seq: Arc<AtomicU64>,
    writer: GroupWriter,
    /// Held (locked) while this state is open; declared last, so it is let go only after
    /// the writer has finished and the database is closed.
    _instance_lock: std::fs::File,
}

/// Locks `dir` for this process, for the life of the returned file. The database file's
/// own lock is not enough: it is let go while the file is closed to be opened again after
/// an I/O failure, and another process must not take the file meanwhile.
fn lock_instance(dir: &Path) -> Result<std::fs::File, StateError> {
    let io = |error| StateError::Database(redb::Error::Io(error));
    // Truncating the (empty) lock file is harmless even while another process holds it.
    let instance_lock = proto::identity::open_private_file(&dir.join(LOCK_FILE)).map_err(io)?;
    match instance_lock.try_lock() {
        Ok(()) => Ok(instance_lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(in_use(dir)),
        Err(std::fs::TryLockError::Error(error)) => Err(io(error)),
    }
}

/// The state file of `dir` is in use by another process.
fn in_use(dir: &Path) -> StateError {
    StateError::InUse {
        path: dir.join(STATE_FILE).display().to_string(),
    }
}

fn encode<T: Serialize>(value: &T) -> impl AsRef<[u8]> + Send + 'static + use<T> {
    // Plain records of strings and integers always encode.
    wire::encode(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StateError> {
    wire::decode(bytes).map_err(|source| StateError::Corrupt { table, source })
}

impl State {
    /// Opens (or creates) the state file in `dir`, which must exist.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(STATE_FILE);
        let instance_lock = lock_instance(dir)?;
        let reopen_path = path.clone();
        let open: Opener = Box::new(move || Database::create(&reopen_path));
        let db = match open() {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(in_use(dir)),
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
        Self::from_database(db, open, instance_lock)
    }

    /// Opens the state of `dir` (locked as by [`State::open`]) over `backend` instead of
    /// the file in it, and opens `backend` again after an I/O failure: for tests that hold
    /// the `fsync`s or keep what a crash would leave (`durable::testing::SyncedDisk`).
    #[cfg(feature = "testing")]
    pub fn open_with_backend<B>(dir: &Path, backend: B) -> Result<Self, StateError>
    where
        B: redb::StorageBackend + Clone,
    {
        let instance_lock = lock_instance(dir)?;
        let open: Opener =
            Box::new(move || Database::builder().create_with_backend(backend.clone()));
        let db = open().map_err(|error| StateError::Database(error.into()))?;
        Self::from_database(db, open, instance_lock)
    }

    /// The state over an opened database, which `open` opens again after an I/O failure:
    /// migrates layout 1, creates the missing tables, starts the writer.
    fn from_database(
        db: Database,
        open: Opener,
        instance_lock: std::fs::File,
    ) -> Result<Self, StateError> {
        let txn = db.begin_write()?;
        migrate_layout_1(&txn)?;
        migrate_layout_2(&txn)?;
        migrate_seen_v4(&txn)?;
        migrate_held(&txn)?;
        migrate_resends(&txn)?;
        txn.open_table(PINS)?;
        txn.open_table(BLOCKS)?;
        txn.open_table(MUTES)?;
        txn.open_table(HISTORY)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(UNSHOWN)?;
        txn.open_table(HELD)?;
        txn.open_table(EARLY)?;
        txn.open_table(SEEN_IDS)?;
        txn.open_table(OLM)?;
        txn.open_table(OLM_SESSIONS)?;
        txn.open_table(RECEIPTS_DUE)?;
        txn.open_table(RESENDS)?;
        let next_seq = txn
            .open_table(META)?
            .get(NEXT_SEQ)?
            .map_or(1, |value| value.value());
        txn.commit()?;
        let db = Arc::new(DatabaseSlot::new(db, open));
        let writer = GroupWriter::start("p2pchat-state-writer", db.clone(), MAX_GROUP)
            .map_err(|error| StateError::Database(redb::Error::Io(error)))?;
        Ok(Self {
            writer,
            db,
            next_seq: Arc::new(AtomicU64::new(next_seq)),
            _instance_lock: instance_lock,
        })
    }

    /// Runs `work` in the writer's next group commit; the ticket resolves once durable.
    fn write<T, F>(&self, work: F) -> Ticket<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> Result<T, StateError> + Send + 'static,
    {
        self.writer.submit(work)
    }

    /// A ticket that resolves once every write submitted before it is durable (a write
    /// of nothing, in line behind them).
    pub fn barrier(&self) -> Ticket<()> {
        self.writer.submit(|_txn| Ok(()))
    }
}

/// Whether a mute ending at `until_ms` is still on at `now_ms`.
pub fn mute_active(until_ms: u64, now_ms: u64) -> bool {
    now_ms < until_ms
}

/// Keeps the stored ceiling of history positions above `seq` (used now), so a restart
/// does not hand it out again: when `seq` reaches it, it is raised a block past `seq`.
fn raise_next_seq(meta: &mut redb::Table<'_, &str, u64>, seq: u64) -> Result<(), StateError> {
    let stored = meta.get(NEXT_SEQ)?.map_or(1, |value| value.value());
    if stored <= seq {
        meta.insert(NEXT_SEQ, seq.saturating_add(SEQ_BLOCK))?;
    }
    Ok(())
}
