//! [`State`]: everything a client remembers between runs, in one crash-safe redb file.
//!
//! Tables (all values are serde records encoded with [`proto::wire`]):
//! - `pins`: user → [`PublicKeys`] pinned on first use (trust on first use).
//! - `blocks`: user → [`BlockRecord`] (blocked or not, and whether the server knows yet).
//! - `mutes`: user → the wall-clock millisecond the mute ends.
//! - `history`: (peer, sequence) → [`HistoryEntry`], both directions, in order.
//! - `outbox_by_seq`: history sequence → [`OutboxEntry`], messages not yet delivered or
//!   queued.
//! - `seen_by_sender`: (time the sender wrote it, message id, sender) → when it was first
//!   stored (receivers de-duplicate by sender and id: two senders may use one id).
//! - `unshown_by_seq`: history sequence → [`InboundMessage`], stored but not yet shown.
//! - `held_by_sender`: (sender, message id) → [`Envelope`], mail that arrived sealed under a
//!   sender key other than the pinned one: acked at the server (so it is not fetched forever) and kept here,
//!   sealed, until the user `trust`s the sender's new key and it is opened again.
//! - `early`: (when it opens, sender, message id) → [`Envelope`], mail dated ahead (its
//!   sender's clock is fast): acked at the server, so it never holds up the mail behind it,
//!   and kept here, sealed, until its time comes and it is opened and shown.
//! - `seen_ids`: (sender, message id) → the time the sender wrote it, for ratchet messages,
//!   whose time is sealed inside: a copy (mail fetched again, a retransmission) is known
//!   before it is opened, which it could not be twice (its message key is used up).
//! - `olm`: `account` → the user's Olm account ([`proto::ratchet::OwnAccount`] pickle).
//! - `olm_sessions`: peer → the Olm sessions with them ([`proto::ratchet::Sessions`]
//!   pickle). Saved in the same write as the message they sealed or opened
//!   ([`RatchetSave`]); see [`crate::sessions`].
//! - `receipts_due`: (sender, kind, message id) → when it became due: receipts this
//!   client owes (delivered: written in the commit that stores mail; read: in the commit
//!   that marks a message shown), removed once the receipt is delivered or queued, so a
//!   crash right after storing mail never loses its receipt ([`crate::receipts`]).
//! - `meta`: counters (the next history sequence number; until when mail sealed by the
//!   static channel from before the ratchet is accepted).
//!
//! The hot tables are keyed so that a batch of messages appends to the same few B-tree
//! pages instead of dirtying one 4 KiB page per message (redb copies every page a commit
//! touches): `outbox_by_seq` and `unshown_by_seq` by the history sequence, which only grows;
//! `seen_by_sender` by the time the sender wrote the message, which grows in each sender's
//! stream, then the id and the sender. A lookup by id stays one point read, because a copy of a message
//! (a retransmission, a replay, mail fetched again) carries the same sealed `sent_at_ms` as
//! the original; and pruning is one range delete of the keys older than the retention, the
//! same bound beyond which [`crate::inbox`] refuses a message anyway. Layout 1 (files written
//! before this layout) keyed these three tables by message id under the names `outbox`,
//! `seen` and `unshown`; [`State::open`] copies such tables into the new ones once, in the
//! same transaction that deletes them ([`migrate_layout_1`]). Layout 2 keyed seen ids
//! without their sender (`seen_by_sent_at`); [`migrate_layout_2`] moves them to
//! `seen_by_sender` the same way. Layouts up to 3 keyed held mail by id alone (`held`), so
//! a second sender's held message with the same id was taken for the first and lost;
//! [`migrate_held`] moves it to `held_by_sender`.
//!
//! Every change is one unit of a write transaction, so a crash at any point leaves either the
//! state before the change or the state after it: a received message is in `history`, `seen`
//! and `unshown` together, or in none of them. Changes are committed by the group-commit
//! writer ([`durable::GroupWriter`]): many changes share one durable commit, and a change is
//! reported done only once its commit is. Readers and the writer take the database from a
//! [`durable::DatabaseSlot`], which opens the file again after an I/O failure. Every write
//! is submitted when it is called and returns a [`Ticket`] that resolves once durable
//! (`pin_if_absent`, which reads first, is an `async fn`): nothing here blocks a thread on an
//! `fsync`, and writes are committed in the order they were called. Reads run directly
//! (redb readers see the last commit). Time-dependent calls take `now_ms`.
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

/// The result of one attempt to send an outbox entry, for [`State::submit_results`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    /// The entry sent.
    pub entry: OutboxEntry,
    /// Its status now.
    pub status: MessageStatus,
    /// Whether it stays in the outbox for a retry (a failure that will be retried).
    pub keep: bool,
}

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
    fn write(&self, txn: &WriteTransaction) -> Result<(), StateError> {
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
const SEEN: TableDefinition<(u64, [u8; 16], &str), u64> = TableDefinition::new("seen_by_sender");
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
/// How often each sent message was sent again at its recipient's request.
const RESENDS: TableDefinition<(&str, [u8; 16]), u8> = TableDefinition::new("resends");
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

/// What storing a received message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// First time this id was seen: stored and marked not yet shown.
    New(InboundMessage),
    /// Already stored before (a retransmission): nothing changed.
    Duplicate,
    /// A receipt, applied to the history of messages sent to its sender (never stored
    /// as a message, never shown, never answered by a receipt).
    Receipt(ReceiptApplied),
}

/// What a receipt changed: the messages sent to `from` whose status it moved forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptApplied {
    /// Who sent the receipt: the recipient of the messages.
    pub from: Username,
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// (id, when sent) of each message whose status changed, oldest first; empty when
    /// the receipt changed nothing (ids not sent to `from`, or a status already further).
    pub messages: Vec<(MessageId, u64)>,
}

/// A receipt kind's key in `receipts_due`.
fn receipt_kind_key(kind: ReceiptKind) -> u8 {
    match kind {
        ReceiptKind::Delivered => 0,
        ReceiptKind::Read => 1,
        ReceiptKind::Resend => 2,
    }
}

/// The receipt kind of a `receipts_due` key (an unknown one, written by a newer build
/// after a downgrade, is read as none).
fn receipt_kind_of_key(key: u8) -> Option<ReceiptKind> {
    [
        ReceiptKind::Delivered,
        ReceiptKind::Read,
        ReceiptKind::Resend,
    ]
    .into_iter()
    .find(|kind| receipt_kind_key(*kind) == key)
}

/// The tables a request to send again ([`ReceiptKind::Resend`]) changes.
struct ResendTables<'a, 'txn> {
    history: &'a mut redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    outbox: &'a mut redb::Table<'txn, u64, &'static [u8]>,
    resends: &'a mut redb::Table<'txn, (&'static str, [u8; 16]), u8>,
}

/// Queues again, in the outbox at their first history positions (so in their original
/// order), the messages `request` from `from` names that were sent to `from`, among the
/// latest [`RECEIPT_SCAN_LINES`] lines with them: each at most
/// [`MAX_RESENDS_PER_MESSAGE`] times, only while the recipient would still take it (its
/// time within [`SEEN_RETENTION_MS`]), never once the recipient confirmed it
/// (delivered or read: its client stored it), and not while it is in the outbox already. Their lines are pending again. An id never sent to `from` changes nothing.
/// The messages are sealed again when sent, in the newest session with `from`: the
/// request itself started one.
fn requeue_for_resend(
    tables: ResendTables<'_, '_>,
    from: &Username,
    request: &Receipt,
    now_ms: u64,
) -> Result<ReceiptApplied, StateError> {
    let mut requeued = Vec::new();
    for mut line in sent_lines_named(tables.history, from, &request.ids)? {
        let resent = tables
            .resends
            .get((from.as_str(), line.id.0))?
            .map_or(0, |count| count.value());
        let too_old = line.sent_at_ms.saturating_add(SEEN_RETENTION_MS) < now_ms;
        // The recipient's client stored a delivered or read message: it never needs it again
        // (and a thief of its identity key cannot have it sealed again for them).
        let stored_there = matches!(line.status, MessageStatus::Delivered | MessageStatus::Read);
        if resent >= MAX_RESENDS_PER_MESSAGE
            || stored_there
            || too_old
            || tables.outbox.get(line.seq)?.is_some()
        {
            continue;
        }
        let entry = OutboxEntry {
            id: line.id,
            to: from.clone(),
            body: line.body.clone(),
            created_ms: line.sent_at_ms,
            seq: line.seq,
            attempts: 0,
            last_error: None,
        };
        tables.outbox.insert(line.seq, encode(&entry).as_ref())?;
        tables
            .resends
            .insert((from.as_str(), line.id.0), resent + 1)?;
        line.status = MessageStatus::Pending;
        tables
            .history
            .insert((from.as_str(), line.seq), encode(&line).as_ref())?;
        requeued.push((line.id, line.sent_at_ms));
    }
    Ok(ReceiptApplied {
        from: from.clone(),
        kind: ReceiptKind::Resend,
        messages: requeued,
    })
}

/// The lines of messages sent to `from` whose ids are in `ids`, among the latest
/// [`RECEIPT_SCAN_LINES`] history lines with `from`, oldest first. A line that does not
/// decode is passed over.
fn sent_lines_named(
    history: &redb::Table<'_, (&str, u64), &[u8]>,
    from: &Username,
    ids: &[MessageId],
) -> Result<Vec<HistoryEntry>, StateError> {
    let mut wanted: std::collections::HashSet<MessageId> = ids.iter().copied().collect();
    let mut lines: Vec<HistoryEntry> = Vec::new();
    for row in history
        .range((from.as_str(), 0)..=(from.as_str(), u64::MAX))?
        .rev()
        .take(RECEIPT_SCAN_LINES)
    {
        if wanted.is_empty() {
            break;
        }
        let (_, bytes) = row?;
        let Ok(line) = decode::<HistoryEntry>("history", bytes.value()) else {
            continue;
        };
        if line.direction == Direction::Outgoing && wanted.remove(&line.id) {
            lines.push(line);
        }
    }
    lines.reverse();
    Ok(lines)
}

/// Applies `receipt` from `from` to the latest [`RECEIPT_SCAN_LINES`] history lines with
/// `from`: only lines of messages sent to `from` with a named id change, and only forward
/// ([`MessageStatus::after_receipt`]). A line that does not decode is left alone.
fn apply_receipt(
    history: &mut redb::Table<'_, (&str, u64), &[u8]>,
    from: &Username,
    receipt: &Receipt,
) -> Result<ReceiptApplied, StateError> {
    let mut changed: Vec<HistoryEntry> = Vec::new();
    for mut line in sent_lines_named(history, from, &receipt.ids)? {
        if let Some(status) = line.status.after_receipt(receipt.kind) {
            line.status = status;
            changed.push(line);
        }
    }
    for line in &changed {
        history.insert((from.as_str(), line.seq), encode(line).as_ref())?;
    }
    Ok(ReceiptApplied {
        from: from.clone(),
        kind: receipt.kind,
        messages: changed
            .into_iter()
            .map(|line| (line.id, line.sent_at_ms))
            .collect(),
    })
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
        migrate_held(&txn)?;
        txn.open_table(PINS)?;
        txn.open_table(BLOCKS)?;
        txn.open_table(MUTES)?;
        txn.open_table(HISTORY)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(SEEN)?;
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

    // ---- pins ----

    /// The keys pinned for `user`, if any.
    pub fn pinned(&self, user: &Username) -> Result<Option<PublicKeys>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(PINS)?;
        match table.get(user.as_str())? {
            Some(bytes) => Ok(Some(decode("pins", bytes.value())?)),
            None => Ok(None),
        }
    }

    /// The users this state has written to: those pinned whose history holds an outgoing
    /// message among their last [`WRITTEN_TO_SCAN`] lines (the people a user talks with,
    /// not everyone who ever wrote to them).
    pub fn written_to(&self) -> Result<Vec<Username>, StateError> {
        let pinned = self.pins()?;
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(HISTORY)?;
        let mut written = Vec::new();
        for (peer, _) in pinned {
            for row in table
                .range((peer.as_str(), 0)..=(peer.as_str(), u64::MAX))?
                .rev()
                .take(WRITTEN_TO_SCAN)
            {
                let (_, bytes) = row?;
                let line = decode::<HistoryEntry>("history", bytes.value())?;
                if line.direction == Direction::Outgoing {
                    written.push(peer);
                    break;
                }
            }
        }
        Ok(written)
    }

    /// Every pin, sorted by user (what an identity backup carries).
    pub fn pins(&self) -> Result<Vec<(Username, PublicKeys)>, StateError> {
        self.by_user(PINS, "pins")
    }

    /// Every row of a table keyed by user, decoded, sorted by user. A name that no longer
    /// validates is skipped rather than fatal.
    fn by_user<T: DeserializeOwned>(
        &self,
        definition: TableDefinition<&str, &[u8]>,
        table: &'static str,
    ) -> Result<Vec<(Username, T)>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let rows = txn.open_table(definition)?;
        let mut records = Vec::new();
        for row in rows.iter()? {
            let (user, bytes) = row?;
            if let Ok(user) = Username::new(user.value()) {
                records.push((user, decode(table, bytes.value())?));
            }
        }
        Ok(records)
    }

    /// Pins `keys` for `user` unless other keys are pinned already.
    pub async fn pin_if_absent(
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
                    table.insert(user.as_str(), encode(&keys).as_ref())?;
                    PinOutcome::New
                }
            })
        })
        .await
    }

    /// Pins `keys` for `user`, replacing whatever was pinned (`trust`).
    pub fn repin(&self, user: &Username, keys: &PublicKeys) -> Ticket<()> {
        let (user, keys) = (user.clone(), encode(keys));
        self.write(move |txn| {
            txn.open_table(PINS)?.insert(user.as_str(), keys.as_ref())?;
            Ok(())
        })
    }

    // ---- blocks ----

    /// Blocks `user` (not yet confirmed by the server). Returns false if already blocked.
    pub fn block(&self, user: &Username) -> Ticket<bool> {
        self.set_block(user, true)
    }

    /// Unblocks `user` (the server still has to be told). Returns false if not blocked.
    pub fn unblock(&self, user: &Username) -> Ticket<bool> {
        self.set_block(user, false)
    }

    fn set_block(&self, user: &Username, active: bool) -> Ticket<bool> {
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
                table.insert(user.as_str(), encode(&record).as_ref())?;
            }
            Ok(current != active)
        })
    }

    /// Whether `user` is blocked.
    pub fn is_blocked(&self, user: &Username) -> Result<bool, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        match table.get(user.as_str())? {
            Some(bytes) => Ok(decode::<BlockRecord>("blocks", bytes.value())?.active),
            None => Ok(false),
        }
    }

    /// Every block record, sorted by user.
    fn block_records(&self) -> Result<Vec<(Username, BlockRecord)>, StateError> {
        self.by_user(BLOCKS, "blocks")
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
    pub fn block_synced(&self, user: &Username, active: bool) -> Ticket<()> {
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
                    table.insert(user.as_str(), encode(&record).as_ref())?;
                }
                _ => {}
            }
            Ok(())
        })
    }

    // ---- mutes ----

    /// Mutes `user` until `until_ms`.
    pub fn mute(&self, user: &Username, until_ms: u64) -> Ticket<()> {
        let user = user.clone();
        self.write(move |txn| {
            txn.open_table(MUTES)?.insert(user.as_str(), until_ms)?;
            Ok(())
        })
    }

    /// Ends the mute of `user`. Returns whether there was one.
    pub fn unmute(&self, user: &Username) -> Ticket<bool> {
        let user = user.clone();
        self.write(move |txn| Ok(txn.open_table(MUTES)?.remove(user.as_str())?.is_some()))
    }

    /// When the mute of `user` ends, if it is muted at `now_ms`.
    pub fn muted_until(&self, user: &Username, now_ms: u64) -> Result<Option<u64>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(MUTES)?;
        Ok(table
            .get(user.as_str())?
            .map(|until| until.value())
            .filter(|until| mute_active(*until, now_ms)))
    }

    /// Every mute (ended or not): user and the millisecond it ends.
    pub fn mutes(&self) -> Result<Vec<(Username, u64)>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(MUTES)?;
        let mut mutes = Vec::new();
        for row in table.iter()? {
            let (user, until) = row?;
            // A name that no longer validates is skipped rather than fatal.
            if let Ok(user) = Username::new(user.value()) {
                mutes.push((user, until.value()));
            }
        }
        Ok(mutes)
    }

    /// Removes every mute that has ended at `now_ms` and returns whose.
    pub fn take_ended_mutes(&self, now_ms: u64) -> Ticket<Vec<Username>> {
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

    /// Records prepared outgoing messages, in order, in one write job: for each, a pending
    /// history line and the outbox entry, together. Returns one ticket per entry; all
    /// resolve once the write is durable.
    ///
    /// The write is lazy: it waits up to [`durable::LAZY_LINGER`] for company, and the seal
    /// of the first of these messages (whose ratchet save starts a commit) comes within
    /// microseconds, so a lone message's record and its ratchet state share one `fsync`.
    pub fn submit_outgoing(&self, entries: Vec<OutboxEntry>) -> Vec<Ticket<()>> {
        let count = entries.len();
        let records: Vec<(OutboxEntry, _)> = entries
            .into_iter()
            .map(|entry| {
                let encoded = encode(&entry);
                (entry, encoded)
            })
            .collect();
        let work = move |txn: &WriteTransaction| {
            let mut history = txn.open_table(HISTORY)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            for (entry, encoded) in &records {
                let line = HistoryEntry {
                    seq: entry.seq,
                    id: entry.id,
                    direction: Direction::Outgoing,
                    peer: entry.to.clone(),
                    body: entry.body.clone(),
                    sent_at_ms: entry.created_ms,
                    status: MessageStatus::Pending,
                };
                history.insert((entry.to.as_str(), entry.seq), encode(&line).as_ref())?;
                outbox.insert(entry.seq, encoded.as_ref())?;
            }
            if let Some(highest) = records.iter().map(|(entry, _)| entry.seq).max() {
                raise_next_seq(&mut txn.open_table(META)?, highest)?;
            }
            Ok(())
        };
        self.writer.submit_shared_lazy(work, count)
    }

    /// Prepares and records a new outgoing message, waiting until it is durable.
    #[cfg(any(test, feature = "testing"))]
    pub fn queue_outgoing(
        &self,
        to: &Username,
        body: &str,
        now_ms: u64,
    ) -> Result<OutboxEntry, StateError> {
        let entry = self.prepare_outgoing(to, body, now_ms);
        for ticket in self.submit_outgoing(vec![entry.clone()]) {
            ticket.wait_blocking()?;
        }
        Ok(entry)
    }

    /// The outbox, oldest first.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        let mut entries = Vec::new();
        for row in table.iter()? {
            let (_, bytes) = row?;
            entries.push(decode::<OutboxEntry>("outbox", bytes.value())?);
        }
        Ok(entries)
    }

    /// Records the results of attempts to send messages, in one write: for each, a final
    /// status removes it from the outbox; `Failed` with `keep` leaves it there for a retry;
    /// its history line takes the status. Resolves once durable, with one result per
    /// attempt: a message whose history line does not decode is left as it was and gets
    /// the error, the others are recorded.
    ///
    /// A lazy write ([`durable::GroupWriter::submit_lazy`]): nobody waits on it to go on
    /// (the sender was answered already, see [`crate::outgoing`]), so it shares the next
    /// write's commit, usually the next message's record. A message's outbox record is
    /// never inserted and removed in the same commit: a result is submitted only once its
    /// message's record is durable.
    pub fn submit_results(
        &self,
        attempts: Vec<AttemptResult>,
    ) -> Ticket<Vec<Result<(), StateError>>> {
        self.writer.submit_lazy(move |txn| {
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut history = txn.open_table(HISTORY)?;
            let mut results = Vec::with_capacity(attempts.len());
            for AttemptResult {
                entry,
                status,
                keep,
            } in &attempts
            {
                let key = (entry.to.as_str(), entry.seq);
                let line = match history.get(key)? {
                    Some(bytes) => match decode::<HistoryEntry>("history", bytes.value()) {
                        Ok(line) => Some(line),
                        Err(error) => {
                            results.push(Err(error));
                            continue;
                        }
                    },
                    None => None,
                };
                if let Some(mut line) = line {
                    // A receipt may have moved the line further already (a result is
                    // written lazily): it never goes back.
                    line.status = line.status.settled(status.clone());
                    history.insert(key, encode(&line).as_ref())?;
                }
                if *keep {
                    let mut kept = entry.clone();
                    kept.attempts = kept.attempts.saturating_add(1);
                    kept.last_error = match status {
                        MessageStatus::Failed(reason) => Some(reason.code().to_owned()),
                        MessageStatus::FailedAsText(reason) => Some(reason.clone()),
                        _ => None,
                    };
                    outbox.insert(entry.seq, encode(&kept).as_ref())?;
                } else {
                    outbox.remove(entry.seq)?;
                }
                results.push(Ok(()));
            }
            Ok(results)
        })
    }

    /// Records the result of one attempt (see [`State::submit_results`]), waiting until it
    /// is durable.
    #[cfg(any(test, feature = "testing"))]
    pub fn finish_attempt(
        &self,
        entry: &OutboxEntry,
        status: &MessageStatus,
        keep: bool,
    ) -> Result<(), StateError> {
        let attempt = AttemptResult {
            entry: entry.clone(),
            status: status.clone(),
            keep,
        };
        self.submit_results(vec![attempt])
            .wait_blocking()?
            .pop()
            .unwrap_or_else(|| Err(StateError::NoOutcome))
    }

    // ---- incoming ----

    /// Stores opened messages, in order, each unless its id was seen before (also earlier
    /// in the same batch): for each, history, seen id and the not-yet-shown mark, all in one
    /// commit. Whether a message is held by its sender's mute is decided here, at `now_ms`,
    /// in the same serialised write order as mute, unmute and the end of a mute, so a
    /// release never misses a message held by the mute it ends. Resolves once durable, with
    /// one outcome per message.
    ///
    /// A receipt ([`Plaintext::receipt`]) is de-duplicated like a message and applied to
    /// the history of messages sent to its sender ([`StoreOutcome::Receipt`]); a request
    /// to send again queues those messages again (see `requeue_for_resend`). A new
    /// message from the mailbox (`via_mailbox`) makes a delivered receipt due, in the same
    /// commit.
    pub fn submit_incoming(
        &self,
        messages: Vec<Plaintext>,
        now_ms: u64,
        via_mailbox: bool,
        ratchet: RatchetSave,
    ) -> Ticket<Vec<StoreOutcome>> {
        let next_seq = self.next_seq.clone();
        self.writer.submit(move |txn| {
            ratchet.write(txn)?;
            let mut seen_ids = txn.open_table(SEEN_IDS)?;
            let mut seen = txn.open_table(SEEN)?;
            let mut meta = txn.open_table(META)?;
            let mut history = txn.open_table(HISTORY)?;
            let mut unshown = txn.open_table(UNSHOWN)?;
            let mutes = txn.open_table(MUTES)?;
            let mut receipts_due = txn.open_table(RECEIPTS_DUE)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut resends = txn.open_table(RESENDS)?;
            let mut outcomes = Vec::with_capacity(messages.len());
            // The stored counter is raised once for the whole batch, past its highest
            // position (positions are handed out in order, so that covers them all).
            let mut highest_seq = 0;
            for message in &messages {
                let seen_key = (message.sent_at_ms, message.id.0, message.from.as_str());
                if seen.get(seen_key)?.is_some() {
                    outcomes.push(StoreOutcome::Duplicate);
                    continue;
                }
                seen.insert(seen_key, now_ms)?;
                seen_ids.insert((message.from.as_str(), message.id.0), message.sent_at_ms)?;
                if let Some(receipt) = &message.receipt {
                    let applied = if receipt.kind == ReceiptKind::Resend {
                        let tables = ResendTables {
                            history: &mut history,
                            outbox: &mut outbox,
                            resends: &mut resends,
                        };
                        requeue_for_resend(tables, &message.from, receipt, now_ms)?
                    } else {
                        apply_receipt(&mut history, &message.from, receipt)?
                    };
                    outcomes.push(StoreOutcome::Receipt(applied));
                    continue;
                }
                if via_mailbox {
                    let kind = receipt_kind_key(ReceiptKind::Delivered);
                    receipts_due.insert((message.from.as_str(), kind, message.id.0), now_ms)?;
                }
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                highest_seq = highest_seq.max(seq);
                let line = HistoryEntry {
                    seq,
                    id: message.id,
                    direction: Direction::Incoming,
                    peer: message.from.clone(),
                    body: message.body.clone(),
                    sent_at_ms: message.sent_at_ms,
                    status: MessageStatus::Received,
                };
                history.insert((message.from.as_str(), seq), encode(&line).as_ref())?;
                let inbound = InboundMessage {
                    id: message.id,
                    from: message.from.clone(),
                    body: message.body.clone(),
                    sent_at_ms: message.sent_at_ms,
                    received_at_ms: now_ms,
                    seq,
                    while_muted: mutes
                        .get(message.from.as_str())?
                        .is_some_and(|until| mute_active(until.value(), now_ms)),
                    via_mailbox,
                };
                unshown.insert(seq, encode(&inbound).as_ref())?;
                outcomes.push(StoreOutcome::New(inbound));
            }
            if highest_seq > 0 {
                raise_next_seq(&mut meta, highest_seq)?;
            }
            Ok(outcomes)
        })
    }

    /// Stores one opened message (see [`State::submit_incoming`]), waiting until durable.
    #[cfg(any(test, feature = "testing"))]
    pub fn store_incoming(
        &self,
        message: &Plaintext,
        now_ms: u64,
    ) -> Result<StoreOutcome, StateError> {
        self.submit_incoming(vec![message.clone()], now_ms, false, RatchetSave::default())
            .wait_blocking()?
            .pop()
            .ok_or(StateError::NoOutcome)
    }

    /// Whether the message of `from` with this id, written at `sent_at_ms`, was stored
    /// before.
    #[cfg(any(test, feature = "testing"))]
    pub fn is_seen(
        &self,
        from: &Username,
        id: &MessageId,
        sent_at_ms: u64,
    ) -> Result<bool, StateError> {
        let txn = self.db.get()?.begin_read()?;
        Ok(txn
            .open_table(SEEN)?
            .get((sent_at_ms, id.0, from.as_str()))?
            .is_some())
    }

    /// Whether a ratchet message of `from` with this id was stored before (see the
    /// `seen_ids` table).
    pub fn seen_id(&self, from: &Username, id: &MessageId) -> Result<bool, StateError> {
        let txn = self.db.get()?.begin_read()?;
        Ok(txn
            .open_table(SEEN_IDS)?
            .get((from.as_str(), id.0))?
            .is_some())
    }

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

    /// Forgets the ids of messages written more than `retention_ms` before `now_ms` (one
    /// range delete). Messages that old are refused on arrival, so forgetting their ids
    /// cannot let a copy in.
    pub fn prune_seen(&self, now_ms: u64, retention_ms: u64) -> Ticket<u64> {
        let oldest_kept = now_ms.saturating_sub(retention_ms);
        self.write(move |txn| {
            let mut removed = Vec::new();
            txn.open_table(SEEN)?
                .retain_in(..(oldest_kept, [0; 16], ""), |(_, id, from), _| {
                    removed.push((from.to_owned(), id));
                    false
                })?;
            let mut seen_ids = txn.open_table(SEEN_IDS)?;
            for (from, id) in &removed {
                seen_ids.remove((from.as_str(), *id))?;
            }
            Ok(removed.len() as u64)
        })
    }

    /// Messages stored but not yet shown, in arrival order.
    pub fn unshown(&self) -> Result<Vec<InboundMessage>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(UNSHOWN)?;
        let mut messages = Vec::new();
        for row in table.iter()? {
            let (_, bytes) = row?;
            messages.push(decode_inbound("unshown", bytes.value())?);
        }
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
    ///
    /// `shown` holds (id, history position) of each message shown, as in the
    /// [`InboundMessage`]s given out; all are marked in one write. A position whose stored
    /// message has another id is left alone. With `read_receipts`, each message marked
    /// makes a read receipt due to its sender, in the same commit.
    pub fn submit_shown(&self, shown: Vec<(MessageId, u64)>, read_receipts: bool) -> Ticket<()> {
        self.writer.submit(move |txn| {
            let mut unshown = txn.open_table(UNSHOWN)?;
            let mut receipts_due = txn.open_table(RECEIPTS_DUE)?;
            for (id, seq) in &shown {
                let stored = match unshown.get(seq)? {
                    Some(bytes) => decode_inbound("unshown", bytes.value())?,
                    None => continue,
                };
                if stored.id == *id {
                    unshown.remove(seq)?;
                    if read_receipts {
                        let kind = receipt_kind_key(ReceiptKind::Read);
                        receipts_due.insert((stored.from.as_str(), kind, id.0), 0)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Up to `max` receipts due, grouped by sender and kind (in that order).
    pub fn receipts_due(
        &self,
        max: usize,
    ) -> Result<Vec<(Username, ReceiptKind, MessageId)>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(RECEIPTS_DUE)?;
        let mut due = Vec::new();
        for row in table.iter()?.take(max) {
            let (key, _) = row?;
            let (user, kind, id) = key.value();
            // Only valid names and kinds are ever written; a row that is not one is skipped.
            if let (Ok(user), Some(kind)) = (Username::new(user), receipt_kind_of_key(kind)) {
                due.push((user, kind, MessageId(id)));
            }
        }
        Ok(due)
    }

    /// Owes a request to send again ([`ReceiptKind::Resend`]) for each (sender, id) of a
    /// message that did not open because its session is lost here, in `receipts_due` like
    /// any receipt: durable, de-duplicated, sent in batches. At most
    /// [`MAX_RESENDS_OWED_PER_PEER`] ids are owed to one peer at a time. Resolves once
    /// durable, with how many ids became owed to each peer (in the order first named).
    pub fn submit_resends_owed(
        &self,
        owed: Vec<(Username, MessageId)>,
        now_ms: u64,
    ) -> Ticket<Vec<(Username, usize)>> {
        self.writer.submit(move |txn| {
            let mut table = txn.open_table(RECEIPTS_DUE)?;
            let kind = receipt_kind_key(ReceiptKind::Resend);
            let mut added: Vec<(Username, usize)> = Vec::new();
            for (from, id) in &owed {
                let peer = from.as_str();
                if table.get((peer, kind, id.0))?.is_some() {
                    continue;
                }
                let already = table
                    .range((peer, kind, [0u8; 16])..=(peer, kind, [0xffu8; 16]))?
                    .count();
                if already >= MAX_RESENDS_OWED_PER_PEER {
                    continue;
                }
                table.insert((peer, kind, id.0), now_ms)?;
                match added.iter_mut().find(|(user, _)| user == from) {
                    Some((_, count)) => *count += 1,
                    None => added.push((from.clone(), 1)),
                }
            }
            Ok(added)
        })
    }

    /// Forgets receipts due to `to` (sent, or never to be sent). Resolves once durable.
    pub fn forget_receipts(
        &self,
        to: &Username,
        kind: ReceiptKind,
        ids: Vec<MessageId>,
    ) -> Ticket<()> {
        let to = to.clone();
        self.writer.submit(move |txn| {
            let mut table = txn.open_table(RECEIPTS_DUE)?;
            for id in &ids {
                table.remove((to.as_str(), receipt_kind_key(kind), id.0))?;
            }
            Ok(())
        })
    }

    /// Marks one message as shown (see [`State::submit_shown`]), waiting until durable.
    #[cfg(any(test, feature = "testing"))]
    pub fn mark_shown(&self, message: &InboundMessage) -> Result<(), StateError> {
        self.submit_shown(vec![(message.id, message.seq)], true)
            .wait_blocking()
    }

    // ---- held (sealed under a changed key) ----

    /// Keeps `envelope` sealed until its sender is trusted again. Idempotent by (sender,
    /// message id). Returns false (and keeps nothing) when `max` envelopes are held already, so a
    /// sender with a new key cannot fill the disk.
    pub fn hold(&self, envelope: &Envelope, max: u64) -> Ticket<bool> {
        let (from, id, encoded) = (envelope.from.clone(), envelope.id, encode(envelope));
        self.write(move |txn| {
            let mut table = txn.open_table(HELD)?;
            let key = (from.as_str(), id.0);
            Ok(if table.get(key)?.is_some() {
                true
            } else if table.len()? >= max {
                false
            } else {
                table.insert(key, encoded.as_ref())?;
                true
            })
        })
    }

    /// The envelopes held from `from`.
    pub fn held_from(&self, from: &Username) -> Result<Vec<Envelope>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(HELD)?;
        let mut envelopes = Vec::new();
        for row in table.range((from.as_str(), [0; 16])..=(from.as_str(), [0xff; 16]))? {
            let (_, bytes) = row?;
            envelopes.push(decode("held", bytes.value())?);
        }
        Ok(envelopes)
    }

    /// Forgets a held envelope (opened and stored, or refused for good).
    pub fn unhold(&self, envelope: &Envelope) -> Ticket<()> {
        let (from, id) = (envelope.from.clone(), envelope.id);
        self.write(move |txn| {
            txn.open_table(HELD)?.remove((from.as_str(), id.0))?;
            Ok(())
        })
    }

    // ---- early (dated ahead) ----

    /// Keeps `envelope`, which opens at `opens_at_ms`, sealed until then. Idempotent by
    /// (sender, id) and time (a copy of a message carries the same time). Returns false
    /// (and keeps nothing) when `max` envelopes are kept already, so a sender dating mail
    /// ahead cannot fill the disk.
    pub fn keep_early(&self, envelope: &Envelope, opens_at_ms: u64, max: u64) -> Ticket<bool> {
        let (from, id, encoded) = (envelope.from.clone(), envelope.id, encode(envelope));
        self.write(move |txn| {
            let mut table = txn.open_table(EARLY)?;
            let key = (opens_at_ms, from.as_str(), id.0);
            Ok(if table.get(key)?.is_some() {
                true
            } else if table.len()? >= max {
                false
            } else {
                table.insert(key, encoded.as_ref())?;
                true
            })
        })
    }

    /// At most `max` kept early envelopes whose time has come at `now_ms`, soonest first,
    /// each with the time it was kept for (to [`State::forget_early`] it by).
    pub fn early_due(&self, now_ms: u64, max: usize) -> Result<Vec<(u64, Envelope)>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(EARLY)?;
        let mut due = Vec::new();
        for row in table.range((0, "", [0; 16])..(now_ms.saturating_add(1), "", [0; 16]))? {
            if due.len() >= max {
                break;
            }
            let (key, bytes) = row?;
            due.push((key.value().0, decode("early", bytes.value())?));
        }
        Ok(due)
    }

    /// Whether any early envelope is kept (due or not).
    pub fn has_early(&self) -> Result<bool, StateError> {
        let txn = self.db.get()?.begin_read()?;
        Ok(!txn.open_table(EARLY)?.is_empty()?)
    }

    /// Forgets a kept early envelope (opened and stored, held, or refused for good).
    pub fn forget_early(&self, opens_at_ms: u64, envelope: &Envelope) -> Ticket<()> {
        let (from, id) = (envelope.from.clone(), envelope.id);
        self.write(move |txn| {
            txn.open_table(EARLY)?
                .remove((opens_at_ms, from.as_str(), id.0))?;
            Ok(())
        })
    }

    /// A ticket that resolves once every write submitted before it is durable (a write
    /// of nothing, in line behind them).
    pub fn barrier(&self) -> Ticket<()> {
        self.writer.submit(|_txn| Ok(()))
    }

    /// The last `limit` history lines with `peer`, oldest first.
    pub fn history(&self, peer: &Username, limit: usize) -> Result<Vec<HistoryEntry>, StateError> {
        let txn = self.db.get()?.begin_read()?;
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

/// Copies layout 1's id-keyed `outbox`, `seen` and `unshown` tables (if the file has them)
/// into the sequence- and time-keyed tables, then deletes them, all in `txn`: a crash
/// leaves the file wholly in one layout. Outbox and unshown records carry their sequence.
/// A layout 1 seen row has only the time it was stored; the time its sender wrote it is on
/// the message's incoming history line (stored in the same commit, never removed), so the
/// history is read once to key each seen id as a copy of the message will be looked up.
fn migrate_layout_1(txn: &WriteTransaction) -> Result<(), StateError> {
    let old: Vec<String> = txn
        .list_tables()?
        .map(|table| table.name().to_owned())
        .filter(|name| matches!(name.as_str(), "outbox" | "seen" | "unshown"))
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    {
        let mut outbox = txn.open_table(OUTBOX)?;
        for row in txn.open_table(OUTBOX_V1)?.iter()? {
            let (_, bytes) = row?;
            let entry: OutboxEntry = decode("outbox", bytes.value())?;
            outbox.insert(entry.seq, bytes.value())?;
        }
        let mut unshown = txn.open_table(UNSHOWN)?;
        for row in txn.open_table(UNSHOWN_V1)?.iter()? {
            let (_, bytes) = row?;
            let message = decode_inbound("unshown", bytes.value())?;
            unshown.insert(message.seq, bytes.value())?;
        }
        let mut stored_at: HashMap<[u8; 16], u64> = HashMap::new();
        for row in txn.open_table(SEEN_V1)?.iter()? {
            let (id, at) = row?;
            stored_at.insert(id.value(), at.value());
        }
        let mut seen = txn.open_table(SEEN_V2)?;
        for row in txn.open_table(HISTORY)?.iter()? {
            let (_, bytes) = row?;
            let line: HistoryEntry = decode("history", bytes.value())?;
            if line.direction == Direction::Incoming
                && let Some(at) = stored_at.remove(&line.id.0)
            {
                seen.insert((line.sent_at_ms, line.id.0), at)?;
            }
        }
        // A seen id without a history line cannot exist (both are written in one commit);
        // should one, it is kept under the time it was stored, still pruned in time.
        for (id, at) in stored_at {
            seen.insert((at, id), at)?;
        }
    }
    txn.delete_table(OUTBOX_V1)?;
    txn.delete_table(SEEN_V1)?;
    txn.delete_table(UNSHOWN_V1)?;
    tracing::info!(tables = ?old, "state file migrated to layout 2 (keyed by sequence and time)");
    Ok(())
}

/// Copies layout 2's seen ids (keyed by the time the sender wrote the message and its id)
/// into the table keyed by its sender too, then deletes the old table, all in `txn`. Two
/// senders may use one id: keyed without the sender, a message from one could make the
/// other's, with the same id and millisecond, pass for a copy and vanish. A seen row has no
/// sender; the message's incoming history line (stored in the same commit, never removed)
/// names it, so the history is read once.
/// Moves held mail keyed by id alone (`held`) to `held_by_sender`, keyed by its sender and
/// id (each held value is the whole envelope, sender included), and deletes the old table.
fn migrate_held(txn: &WriteTransaction) -> Result<(), StateError> {
    let present = txn
        .list_tables()?
        .any(|table| table.name() == HELD_V3.name());
    if !present {
        return Ok(());
    }
    let mut moved = 0u64;
    {
        let mut held = txn.open_table(HELD)?;
        for row in txn.open_table(HELD_V3)?.iter()? {
            let (_, bytes) = row?;
            let envelope: Envelope = decode("held", bytes.value())?;
            held.insert((envelope.from.as_str(), envelope.id.0), bytes.value())?;
            moved += 1;
        }
    }
    txn.delete_table(HELD_V3)?;
    tracing::info!(
        moved,
        "state file migrated to layout 4 (held mail keyed by its sender)"
    );
    Ok(())
}

fn migrate_layout_2(txn: &WriteTransaction) -> Result<(), StateError> {
    let present = txn
        .list_tables()?
        .any(|table| table.name() == SEEN_V2.name());
    if !present {
        return Ok(());
    }
    let mut senders: HashMap<[u8; 16], Username> = HashMap::new();
    for row in txn.open_table(HISTORY)?.iter()? {
        let (_, bytes) = row?;
        let line: HistoryEntry = decode("history", bytes.value())?;
        if line.direction == Direction::Incoming {
            senders.insert(line.id.0, line.peer);
        }
    }
    let mut moved = 0u64;
    {
        let mut seen = txn.open_table(SEEN)?;
        for row in txn.open_table(SEEN_V2)?.iter()? {
            let (key, at) = row?;
            let ((sent_at_ms, id), at) = (key.value(), at.value());
            // A seen id without a history line cannot exist (both are written in one
            // commit); should one, it is kept without a sender, still pruned in time.
            let sender = senders.get(&id).map_or("", Username::as_str);
            seen.insert((sent_at_ms, id, sender), at)?;
            moved += 1;
        }
    }
    txn.delete_table(SEEN_V2)?;
    tracing::info!(
        moved,
        "state file migrated to layout 3 (seen ids keyed by their sender)"
    );
    Ok(())
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
            receipt: None,
        }
    }

    /// A new message's outbox record is in the file only once its ticket resolves: a crash
    /// before that leaves no trace of it, so nothing is sent again after the restart.
    #[cfg(feature = "testing")]
    #[test]
    fn a_crash_before_an_outbox_record_is_durable_leaves_no_trace_of_it() {
        use durable::testing::SyncedDisk;
        let (dir, after_crash) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let disk = SyncedDisk::default();
        let state = State::open_with_backend(dir.path(), disk.clone()).unwrap();
        let held = disk.hold_syncs();
        let entry = state.prepare_outgoing(&name("bob"), "hello", 1_000);
        let mut tickets = state.submit_outgoing(vec![entry.clone()]);
        let ticket = tickets.pop().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !disk.is_waiting() {
            assert!(
                std::time::Instant::now() < deadline,
                "the commit never reached its fsync"
            );
            std::thread::yield_now();
        }
        let ticket = ticket.try_take().expect_err("not durable yet");
        // What a crash now leaves, opened again (elsewhere: this state still holds its lock).
        let crashed = SyncedDisk::from_image(disk.durable_image()).unwrap();
        let restarted = State::open_with_backend(after_crash.path(), crashed).unwrap();
        assert_eq!(restarted.outbox().unwrap(), vec![]);
        assert_eq!(restarted.history(&name("bob"), 10).unwrap(), vec![]);
        drop(restarted);
        drop(held);
        ticket.wait_blocking().unwrap();
        let durable = SyncedDisk::from_image(disk.durable_image()).unwrap();
        let restarted = State::open_with_backend(after_crash.path(), durable).unwrap();
        assert_eq!(restarted.outbox().unwrap(), vec![entry]);
    }

    fn receipt(from: &str, kind: ReceiptKind, ids: Vec<MessageId>, sent_at_ms: u64) -> Plaintext {
        Plaintext {
            receipt: Some(Receipt { kind, ids }),
            ..plaintext(from, "", sent_at_ms)
        }
    }

    fn store_batch(
        state: &State,
        messages: Vec<Plaintext>,
        via_mailbox: bool,
    ) -> Vec<StoreOutcome> {
        state
            .submit_incoming(messages, 10_000, via_mailbox, RatchetSave::default())
            .wait_blocking()
            .unwrap()
    }

    fn statuses(state: &State, peer: &str) -> Vec<MessageStatus> {
        let lines = state.history(&name(peer), 100).unwrap();
        lines.into_iter().map(|line| line.status).collect()
    }

    #[test]
    fn a_receipt_moves_its_senders_messages_forward_only_and_is_never_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let to_bob = state.queue_outgoing(&name("bob"), "one", 1_000).unwrap();
        let to_carol = state.queue_outgoing(&name("carol"), "two", 1_001).unwrap();
        for entry in [&to_bob, &to_carol] {
            state
                .finish_attempt(entry, &MessageStatus::Queued, false)
                .unwrap();
        }
        let unshown_before = state.unshown().unwrap().len();
        // Carol cannot move a message sent to Bob, and an id nobody sent changes nothing.
        let forged = receipt("carol", ReceiptKind::Read, vec![to_bob.id], 2_000);
        let unknown = receipt("bob", ReceiptKind::Read, vec![MessageId::random()], 2_001);
        let outcomes = store_batch(&state, vec![forged, unknown], true);
        for outcome in &outcomes {
            assert!(
                matches!(outcome, StoreOutcome::Receipt(applied) if applied.messages.is_empty()),
                "{outcome:?}"
            );
        }
        assert_eq!(statuses(&state, "bob"), vec![MessageStatus::Queued]);
        // Bob's receipts: delivered, then read; a late delivered one changes nothing.
        let delivered = receipt("bob", ReceiptKind::Delivered, vec![to_bob.id], 2_002);
        let outcomes = store_batch(&state, vec![delivered.clone()], true);
        assert_eq!(
            outcomes,
            vec![StoreOutcome::Receipt(ReceiptApplied {
                from: name("bob"),
                kind: ReceiptKind::Delivered,
                messages: vec![(to_bob.id, to_bob.created_ms)],
            })]
        );
        assert_eq!(statuses(&state, "bob"), vec![MessageStatus::Delivered]);
        // The same receipt again is a duplicate, like any message.
        assert_eq!(
            store_batch(&state, vec![delivered], true),
            vec![StoreOutcome::Duplicate]
        );
        let read = receipt("bob", ReceiptKind::Read, vec![to_bob.id], 2_003);
        store_batch(&state, vec![read], false);
        let late = receipt("bob", ReceiptKind::Delivered, vec![to_bob.id], 2_004);
        assert!(matches!(
            &store_batch(&state, vec![late], true)[0],
            StoreOutcome::Receipt(applied) if applied.messages.is_empty()
        ));
        assert_eq!(statuses(&state, "bob"), vec![MessageStatus::Read]);
        // A send result written after the receipt does not take it back.
        state
            .finish_attempt(&to_bob, &MessageStatus::Queued, false)
            .unwrap();
        assert_eq!(statuses(&state, "bob"), vec![MessageStatus::Read]);
        assert_eq!(statuses(&state, "carol"), vec![MessageStatus::Queued]);
        // Receipts are no history lines, no unshown messages, and owe no receipt.
        assert_eq!(state.history(&name("bob"), 100).unwrap().len(), 1);
        assert_eq!(state.unshown().unwrap().len(), unshown_before);
        assert_eq!(state.receipts_due(100).unwrap(), vec![]);
    }

    /// Asserts that a batch of one request to send again queued nothing.
    fn assert_queued_nothing(outcomes: &[StoreOutcome]) {
        assert!(
            matches!(outcomes, [StoreOutcome::Receipt(applied)] if applied.messages.is_empty()),
            "{outcomes:?}"
        );
    }

    /// Stores a request from `from` to send `ids` again, and asserts it queued nothing.
    fn assert_asks_in_vain(state: &State, from: &str, ids: Vec<MessageId>) {
        let request = receipt(from, ReceiptKind::Resend, ids, 2_000);
        assert_queued_nothing(&store_batch(state, vec![request], true));
        assert!(state.outbox().unwrap().is_empty());
    }

    #[test]
    fn a_resend_request_queues_again_only_its_senders_messages_in_order_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let first = state.queue_outgoing(&name("bob"), "one", 1_000).unwrap();
        let second = state.queue_outgoing(&name("bob"), "two", 1_001).unwrap();
        let to_carol = state
            .queue_outgoing(&name("carol"), "three", 1_002)
            .unwrap();
        for entry in [&first, &second, &to_carol] {
            state
                .finish_attempt(entry, &MessageStatus::Queued, false)
                .unwrap();
        }
        assert!(state.outbox().unwrap().is_empty());
        // Carol asks for the messages sent to bob: nothing goes.
        assert_asks_in_vain(&state, "carol", vec![first.id, second.id]);
        // Bob names his two (in reverse) and an id nobody sent: both go again, in their
        // original order, with their ids, bodies and times; their lines are pending.
        let unknown = MessageId::random();
        let request = |at| {
            receipt(
                "bob",
                ReceiptKind::Resend,
                vec![second.id, unknown, first.id],
                at,
            )
        };
        let outcomes = store_batch(&state, vec![request(2_001)], true);
        assert_eq!(
            outcomes,
            vec![StoreOutcome::Receipt(ReceiptApplied {
                from: name("bob"),
                kind: ReceiptKind::Resend,
                messages: vec![(first.id, 1_000), (second.id, 1_001)],
            })]
        );
        assert_eq!(state.outbox().unwrap(), vec![first.clone(), second.clone()]);
        assert_eq!(
            statuses(&state, "bob"),
            vec![MessageStatus::Pending, MessageStatus::Pending]
        );
        assert_eq!(statuses(&state, "carol"), vec![MessageStatus::Queued]);
        // While they are in the outbox, asking again queues nothing twice.
        let outcomes = store_batch(&state, vec![request(2_002)], true);
        assert_queued_nothing(&outcomes);
        assert_eq!(state.outbox().unwrap().len(), 2);
        // Each message goes again at most `MAX_RESENDS_PER_MESSAGE` times (here each time
        // to the mailbox, and never opened there).
        let mut sent_again = 1;
        for at in 3_000..3_010 {
            for entry in [&first, &second] {
                state
                    .finish_attempt(entry, &MessageStatus::Queued, false)
                    .unwrap();
            }
            let outcomes = store_batch(&state, vec![request(at)], true);
            if let [StoreOutcome::Receipt(applied)] = &outcomes[..]
                && !applied.messages.is_empty()
            {
                sent_again += 1;
            }
        }
        assert_eq!(sent_again, usize::from(MAX_RESENDS_PER_MESSAGE));
        assert!(state.outbox().unwrap().is_empty());
        // A request is no message: nothing to show, no receipt owed for it.
        assert!(state.unshown().unwrap().is_empty());
        assert!(
            state
                .receipts_due(100)
                .unwrap()
                .iter()
                .all(|(_, kind, _)| *kind != ReceiptKind::Resend)
        );
    }

    #[test]
    fn a_message_its_recipient_confirmed_is_never_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let delivered = state.queue_outgoing(&name("bob"), "got it", 1_000).unwrap();
        let read = state
            .queue_outgoing(&name("bob"), "read it", 1_001)
            .unwrap();
        state
            .finish_attempt(&delivered, &MessageStatus::Delivered, false)
            .unwrap();
        state
            .finish_attempt(&read, &MessageStatus::Read, false)
            .unwrap();
        assert_asks_in_vain(&state, "bob", vec![delivered.id, read.id]);
    }

    #[test]
    fn a_message_too_old_for_its_recipient_is_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let old = state.queue_outgoing(&name("bob"), "old", 1_000).unwrap();
        state
            .finish_attempt(&old, &MessageStatus::Queued, false)
            .unwrap();
        let late = 1_000 + SEEN_RETENTION_MS + 1;
        let request = receipt("bob", ReceiptKind::Resend, vec![old.id], late - 1);
        let outcomes = state
            .submit_incoming(vec![request], late, true, RatchetSave::default())
            .wait_blocking()
            .unwrap();
        assert_queued_nothing(&outcomes);
        assert!(state.outbox().unwrap().is_empty());
    }

    #[test]
    fn resends_owed_are_durable_deduplicated_and_bounded_per_peer() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let lost = MessageId::random();
        let owed = vec![
            (name("alice"), lost),
            (name("alice"), lost),
            (name("carol"), MessageId::random()),
        ];
        let added = state.submit_resends_owed(owed, 5).wait_blocking().unwrap();
        assert_eq!(added, vec![(name("alice"), 1), (name("carol"), 1)]);
        let again = state
            .submit_resends_owed(vec![(name("alice"), lost)], 6)
            .wait_blocking()
            .unwrap();
        assert!(again.is_empty());
        // Owed across a restart, as the receipt kind it is.
        drop(state);
        let state = State::open(dir.path()).unwrap();
        let due = state.receipts_due(100).unwrap();
        assert!(due.contains(&(name("alice"), ReceiptKind::Resend, lost)));
        assert_eq!(due.len(), 2);
        // A flood of unopenable ids from one peer owes at most the bound.
        let flood: Vec<_> = (0..MAX_RESENDS_OWED_PER_PEER + 50)
            .map(|_| (name("mallory"), MessageId::random()))
            .collect();
        let added = state.submit_resends_owed(flood, 7).wait_blocking().unwrap();
        assert_eq!(added, vec![(name("mallory"), MAX_RESENDS_OWED_PER_PEER)]);
        state
            .forget_receipts(&name("alice"), ReceiptKind::Resend, vec![lost])
            .wait_blocking()
            .unwrap();
        let due = state.receipts_due(10_000).unwrap();
        assert!(!due.contains(&(name("alice"), ReceiptKind::Resend, lost)));
    }

    #[test]
    fn mail_owes_a_delivered_receipt_from_its_commit_and_a_shown_message_a_read_one() {
        let dir = tempfile::tempdir().unwrap();
        let mail = plaintext("bob", "from the mailbox", 1_000);
        let direct = plaintext("bob", "direct", 1_001);
        let quiet = plaintext("carol", "shown with receipts off", 1_002);
        {
            let state = State::open(dir.path()).unwrap();
            store_batch(&state, vec![mail.clone()], true);
            store_batch(&state, vec![direct.clone(), quiet.clone()], false);
        }
        // Owed across a restart (a crash right after storing loses nothing).
        let state = State::open(dir.path()).unwrap();
        assert_eq!(
            state.receipts_due(100).unwrap(),
            vec![(name("bob"), ReceiptKind::Delivered, mail.id)]
        );
        let unshown = state.unshown().unwrap();
        let mark = |message: &Plaintext| {
            let stored = unshown.iter().find(|m| m.id == message.id).unwrap();
            (stored.id, stored.seq)
        };
        state
            .submit_shown(vec![mark(&direct)], true)
            .wait_blocking()
            .unwrap();
        state
            .submit_shown(vec![mark(&quiet)], false)
            .wait_blocking()
            .unwrap();
        let mut due = state.receipts_due(100).unwrap();
        due.sort_by_key(|(_, kind, _)| *kind);
        assert_eq!(
            due,
            vec![
                (name("bob"), ReceiptKind::Delivered, mail.id),
                (name("bob"), ReceiptKind::Read, direct.id),
            ]
        );
        state
            .forget_receipts(&name("bob"), ReceiptKind::Delivered, vec![mail.id])
            .wait_blocking()
            .unwrap();
        assert_eq!(
            state.receipts_due(100).unwrap(),
            vec![(name("bob"), ReceiptKind::Read, direct.id)]
        );
    }

    /// History positions are handed out above every stored one after each restart, also
    /// once more than a block of them was used (the stored ceiling is raised a block at a
    /// time), and the history stays in the order written.
    #[test]
    fn a_restart_hands_out_history_positions_above_every_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut written = Vec::new();
        for round in 0..3u64 {
            let state = State::open(dir.path()).unwrap();
            let count = if round == 1 { SEQ_BLOCK + 5 } else { 3 };
            for n in 0..count {
                let now = 1_000 + round * 10_000 + n;
                if n % 2 == 0 {
                    let entry = state.queue_outgoing(&name("bob"), "out", now).unwrap();
                    written.push(entry.seq);
                } else {
                    let outcomes = store_batch(&state, vec![plaintext("bob", "in", now)], false);
                    let [StoreOutcome::New(inbound)] = outcomes.as_slice() else {
                        panic!("{outcomes:?}");
                    };
                    written.push(inbound.seq);
                }
            }
        }
        assert!(
            written.windows(2).all(|pair| pair[0] < pair[1]),
            "{written:?}"
        );
        let state = State::open(dir.path()).unwrap();
        let lines = state.history(&name("bob"), 10_000).unwrap();
        let stored: Vec<u64> = lines.iter().map(|line| line.seq).collect();
        assert_eq!(stored, written);
    }

    #[test]
    fn a_status_only_moves_forward() {
        use MessageStatus::*;
        let failed = Failed(crate::reason::FailureReason::UnknownUser);
        for status in [Pending, Queued, failed.clone()] {
            assert_eq!(
                status.after_receipt(ReceiptKind::Delivered),
                Some(Delivered)
            );
            assert_eq!(status.after_receipt(ReceiptKind::Read), Some(Read));
        }
        assert_eq!(Delivered.after_receipt(ReceiptKind::Read), Some(Read));
        // A late delivered receipt does not undo a read one; repeats change nothing.
        assert_eq!(Read.after_receipt(ReceiptKind::Delivered), None);
        assert_eq!(Read.after_receipt(ReceiptKind::Read), None);
        assert_eq!(Delivered.after_receipt(ReceiptKind::Delivered), None);
        // A send result written after a receipt keeps the receipt's status.
        assert_eq!(Delivered.settled(Queued), Delivered);
        assert_eq!(Read.settled(Delivered), Read);
        assert_eq!(Pending.settled(Queued), Queued);
        assert_eq!(Queued.settled(failed.clone()), failed);
        assert_eq!(Delivered.settled(Read), Read);
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
            assert_eq!(
                futures::executor::block_on(state.pin_if_absent(&bob, &keys)).unwrap(),
                PinOutcome::New
            );
            assert!(state.block(&name("mallory")).wait_blocking().unwrap());
            state.mute(&bob, 50_000).wait_blocking().unwrap();
            queued = state.queue_outgoing(&bob, "hi bob", 2_000).unwrap();
            assert!(matches!(
                state.store_incoming(&message, 3_000).unwrap(),
                StoreOutcome::New(_)
            ));
        }
        let state = State::open(dir.path()).unwrap();
        assert_eq!(state.pinned(&bob).unwrap(), Some(keys));
        assert_eq!(state.blocked().unwrap(), vec![name("mallory")]);
        assert_eq!(state.muted_until(&bob, 10_000).unwrap(), Some(50_000));
        assert_eq!(state.outbox().unwrap(), vec![queued.clone()]);
        assert!(
            state
                .is_seen(&message.from, &message.id, message.sent_at_ms)
                .unwrap()
        );
        assert_eq!(state.unshown().unwrap().len(), 1);
        let history = state.history(&bob, 10).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].body, "hi bob");
        assert_eq!(history[0].status, MessageStatus::Pending);
        assert_eq!(history[1].body, "hello");
        assert_eq!(history[1].direction, Direction::Incoming);
    }

    #[test]
    fn results_marks_and_stores_of_many_messages_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let bob = name("bob");
        let incoming: Vec<Plaintext> = (0..300)
            .map(|i| plaintext("bob", &format!("in {i}"), 1_000 + i))
            .collect();
        let (kept, shown_ids);
        {
            let state = State::open(dir.path()).unwrap();
            let sent: Vec<OutboxEntry> = (0..300)
                .map(|i| {
                    state
                        .queue_outgoing(&bob, &format!("out {i}"), 5_000 + i)
                        .unwrap()
                })
                .collect();
            // Every other message delivered, the rest failed and kept, all in one write.
            let attempts = sent
                .iter()
                .enumerate()
                .map(|(i, entry)| AttemptResult {
                    entry: entry.clone(),
                    status: if i % 2 == 0 {
                        MessageStatus::Delivered
                    } else {
                        MessageStatus::Failed(FailureReason::MailboxUnreachable {
                            detail: "offline".into(),
                        })
                    },
                    keep: i % 2 == 1,
                })
                .collect();
            let results = state.submit_results(attempts).wait_blocking().unwrap();
            assert!(results.iter().all(Result::is_ok));
            kept = sent
                .iter()
                .skip(1)
                .step_by(2)
                .map(|e| e.id)
                .collect::<Vec<_>>();
            let batch = incoming.clone();
            let outcomes = state
                .submit_incoming(batch, 9_000, false, RatchetSave::default())
                .wait_blocking()
                .unwrap();
            assert!(outcomes.iter().all(|o| matches!(o, StoreOutcome::New(_))));
            let unshown = state.unshown().unwrap();
            state
                .submit_shown(unshown[..100].iter().map(|m| (m.id, m.seq)).collect(), true)
                .wait_blocking()
                .unwrap();
            shown_ids = unshown[..100].iter().map(|m| m.id).collect::<Vec<_>>();
        }
        let state = State::open(dir.path()).unwrap();
        let outbox = state.outbox().unwrap();
        assert_eq!(outbox.iter().map(|e| e.id).collect::<Vec<_>>(), kept);
        assert!(outbox.iter().all(|e| e.attempts == 1));
        let unshown = state.unshown().unwrap();
        assert_eq!(unshown.len(), 200);
        assert!(unshown.iter().all(|m| !shown_ids.contains(&m.id)));
        assert_eq!(unshown[0].body, "in 100", "still in arrival order");
        for message in &incoming {
            assert!(
                state
                    .is_seen(&message.from, &message.id, message.sent_at_ms)
                    .unwrap()
            );
        }
        // Every copy is still a duplicate after the reopen, shown or not.
        let copies = incoming.clone();
        let outcomes = state
            .submit_incoming(copies, 9_500, false, RatchetSave::default())
            .wait_blocking()
            .unwrap();
        assert!(outcomes.iter().all(|o| *o == StoreOutcome::Duplicate));
        assert_eq!(state.history(&bob, 1_000).unwrap().len(), 600);
    }

    #[test]
    fn a_layout_1_state_file_is_migrated_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let bob = name("bob");
        // A state file as layout 1 wrote it: outbox, seen and unshown keyed by message id.
        let pending = OutboxEntry {
            id: MessageId::random(),
            to: bob.clone(),
            body: "still pending".into(),
            created_ms: 2_000,
            seq: 1,
            attempts: 2,
            last_error: Some("offline".into()),
        };
        let shown = plaintext("bob", "shown before", 3_000);
        let unshown_message = plaintext("bob", "not shown yet", 4_000);
        let unshown_record = InboundMessage {
            id: unshown_message.id,
            from: bob.clone(),
            body: unshown_message.body.clone(),
            sent_at_ms: unshown_message.sent_at_ms,
            received_at_ms: 4_500,
            seq: 3,
            while_muted: false,
            via_mailbox: false,
        };
        // As layout 1 stored it: before messages said whether they came from the mailbox.
        let unshown_stored = InboundMessageWithoutRoute {
            id: unshown_record.id,
            from: unshown_record.from.clone(),
            body: unshown_record.body.clone(),
            sent_at_ms: unshown_record.sent_at_ms,
            received_at_ms: unshown_record.received_at_ms,
            seq: unshown_record.seq,
            while_muted: false,
        };
        {
            let db = Database::create(dir.path().join(STATE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut history = txn.open_table(HISTORY).unwrap();
                let line = |seq, id, direction, body: &str, sent_at_ms, status| HistoryEntry {
                    seq,
                    id,
                    direction,
                    peer: bob.clone(),
                    body: body.to_owned(),
                    sent_at_ms,
                    status,
                };
                for entry in [
                    line(
                        1,
                        pending.id,
                        Direction::Outgoing,
                        "still pending",
                        2_000,
                        MessageStatus::Pending,
                    ),
                    line(
                        2,
                        shown.id,
                        Direction::Incoming,
                        "shown before",
                        3_000,
                        MessageStatus::Received,
                    ),
                    line(
                        3,
                        unshown_message.id,
                        Direction::Incoming,
                        "not shown yet",
                        4_000,
                        MessageStatus::Received,
                    ),
                ] {
                    history
                        .insert(("bob", entry.seq), encode(&entry).as_ref())
                        .unwrap();
                }
                txn.open_table(META).unwrap().insert(NEXT_SEQ, 4).unwrap();
                txn.open_table(OUTBOX_V1)
                    .unwrap()
                    .insert(pending.id.0, encode(&pending).as_ref())
                    .unwrap();
                let mut seen = txn.open_table(SEEN_V1).unwrap();
                seen.insert(shown.id.0, 3_500).unwrap();
                seen.insert(unshown_message.id.0, 4_500).unwrap();
                txn.open_table(UNSHOWN_V1)
                    .unwrap()
                    .insert(unshown_message.id.0, encode(&unshown_stored).as_ref())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            // The second open finds layout 2 already and changes nothing.
            let state = State::open(dir.path()).unwrap();
            assert_eq!(state.outbox().unwrap(), vec![pending.clone()]);
            assert_eq!(state.unshown().unwrap(), vec![unshown_record.clone()]);
            assert!(state.is_seen(&shown.from, &shown.id, 3_000).unwrap());
            assert!(
                state
                    .is_seen(&unshown_message.from, &unshown_message.id, 4_000)
                    .unwrap()
            );
            assert_eq!(
                state.store_incoming(&shown, 5_000).unwrap(),
                StoreOutcome::Duplicate,
                "a message shown before the migration is not shown again"
            );
            let txn = state.db.get().unwrap().begin_read().unwrap();
            let names: Vec<String> = txn
                .list_tables()
                .unwrap()
                .map(|table| table.name().to_owned())
                .collect();
            for old in ["outbox", "seen", "unshown"] {
                assert!(!names.iter().any(|name| name == old), "{old} is gone");
            }
        }
        // The migrated records work as before: the result removes the outbox entry, the
        // mark clears the unshown one, and new sequence numbers follow the old ones.
        let state = State::open(dir.path()).unwrap();
        state
            .finish_attempt(&pending, &MessageStatus::Delivered, false)
            .unwrap();
        assert!(state.outbox().unwrap().is_empty());
        state.mark_shown(&unshown_record).unwrap();
        assert!(state.unshown().unwrap().is_empty());
        assert_eq!(state.queue_outgoing(&bob, "next", 6_000).unwrap().seq, 4);
    }

    #[test]
    fn pruning_forgets_exactly_the_seen_ids_older_than_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let messages: Vec<Plaintext> = [100, 199, 200, 201, 5_000]
            .into_iter()
            .map(|sent_at| plaintext("bob", "x", sent_at))
            .collect();
        for message in &messages {
            state.store_incoming(message, 10_000).unwrap();
        }
        // Retention 800 at 1,000: ids written before 200 go; 200 itself is still accepted
        // on arrival (see `inbox::check`), so it stays.
        assert_eq!(state.prune_seen(1_000, 800).wait_blocking().unwrap(), 2);
        let seen: Vec<bool> = messages
            .iter()
            .map(|m| state.is_seen(&m.from, &m.id, m.sent_at_ms).unwrap())
            .collect();
        assert_eq!(seen, [false, false, true, true, true]);
        assert_eq!(state.prune_seen(1_000, 800).wait_blocking().unwrap(), 0);
        // The stored messages themselves are not pruned.
        assert_eq!(state.history(&name("bob"), 10).unwrap().len(), 5);
    }

    #[test]
    fn a_second_open_of_the_same_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let first = State::open(dir.path()).unwrap();
        assert!(matches!(
            State::open(dir.path()),
            Err(StateError::InUse { .. })
        ));
        // The data dir is held by its own lock, not only by the database file's, which is
        // let go while the file is closed to be opened again after an I/O failure.
        let lock = std::fs::File::open(dir.path().join(LOCK_FILE)).unwrap();
        assert!(matches!(
            lock.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        drop(first);
        State::open(dir.path()).unwrap();
    }

    #[test]
    fn seen_ids_deduplicate_and_unshown_marks_clear() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let first = plaintext("bob", "one", 1);
        let second = plaintext("bob", "two", 2);
        let StoreOutcome::New(stored) = state.store_incoming(&first, 10).unwrap() else {
            panic!("first store must be new");
        };
        assert_eq!(stored.body, "one");
        assert_eq!(
            state.store_incoming(&first, 11).unwrap(),
            StoreOutcome::Duplicate
        );
        state.mute(&name("bob"), 100).wait_blocking().unwrap();
        state.store_incoming(&second, 12).unwrap();
        let unshown = state.unshown().unwrap();
        assert_eq!(
            unshown.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert!(unshown[1].while_muted);
        state.mark_shown(&unshown[0]).unwrap();
        assert_eq!(state.unshown().unwrap().len(), 1);
        // A duplicate after being shown is still a duplicate: shown once.
        assert_eq!(
            state.store_incoming(&first, 13).unwrap(),
            StoreOutcome::Duplicate
        );
        assert_eq!(state.history(&name("bob"), 10).unwrap().len(), 2);
        // Pruning forgets only ids of messages written before the retention.
        assert_eq!(state.prune_seen(3, 1).wait_blocking().unwrap(), 1);
        assert!(
            !state
                .is_seen(&first.from, &first.id, first.sent_at_ms)
                .unwrap()
        );
        assert!(
            state
                .is_seen(&second.from, &second.id, second.sent_at_ms)
                .unwrap()
        );
    }

    #[test]
    fn outbox_keeps_failures_for_retry_and_drops_final_results() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let bob = name("bob");
        let first = state.queue_outgoing(&bob, "one", 1).unwrap();
        let second = state.queue_outgoing(&bob, "two", 2).unwrap();
        assert_eq!(state.outbox().unwrap(), vec![first.clone(), second.clone()]);
        let failed = MessageStatus::Failed(FailureReason::ServerUnreachable {
            detail: "no answer".into(),
        });
        state.finish_attempt(&first, &failed, true).unwrap();
        state
            .finish_attempt(&second, &MessageStatus::Delivered, false)
            .unwrap();
        let outbox = state.outbox().unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].id, first.id);
        assert_eq!(outbox[0].attempts, 1);
        assert_eq!(outbox[0].last_error.as_deref(), Some("server_unreachable"));
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
            token: b"sealed".to_vec(),
        };
        let (first, second, third) = (envelope("alice"), envelope("carol"), envelope("alice"));
        {
            let state = State::open(dir.path()).unwrap();
            assert!(state.hold(&first, 2).wait_blocking().unwrap());
            assert!(
                state.hold(&first, 2).wait_blocking().unwrap(),
                "holding again is a no-op"
            );
            assert!(state.hold(&second, 2).wait_blocking().unwrap());
            assert!(
                !state.hold(&third, 2).wait_blocking().unwrap(),
                "over the cap"
            );
        }
        let state = State::open(dir.path()).unwrap();
        assert_eq!(
            state.held_from(&name("alice")).unwrap(),
            vec![first.clone()]
        );
        assert_eq!(state.held_from(&name("carol")).unwrap(), vec![second]);
        state.unhold(&first).wait_blocking().unwrap();
        assert!(state.held_from(&name("alice")).unwrap().is_empty());
    }

    /// Mail dated ahead is kept by (time, sender, id): two senders' messages with one id
    /// are both kept, a copy is kept once, the cap holds, and it comes out once due.
    #[test]
    fn early_envelopes_come_out_when_due_and_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let envelope = |from: &str, id: MessageId| Envelope {
            id,
            from: name(from),
            to: name("me"),
            token: b"sealed".to_vec(),
        };
        let id = MessageId::random();
        let (alice, carol) = (envelope("alice", id), envelope("carol", id));
        let later = envelope("dave", MessageId::random());
        {
            let state = State::open(dir.path()).unwrap();
            assert!(state.keep_early(&alice, 5_000, 2).wait_blocking().unwrap());
            assert!(state.keep_early(&alice, 5_000, 2).wait_blocking().unwrap());
            assert!(state.keep_early(&carol, 5_000, 2).wait_blocking().unwrap());
            assert!(!state.keep_early(&later, 9_000, 2).wait_blocking().unwrap());
        }
        let state = State::open(dir.path()).unwrap();
        assert!(state.has_early().unwrap());
        assert!(state.early_due(4_999, 10).unwrap().is_empty());
        let due = state.early_due(5_000, 10).unwrap();
        assert_eq!(due, vec![(5_000, alice.clone()), (5_000, carol.clone())]);
        assert_eq!(state.early_due(5_000, 1).unwrap().len(), 1);
        state.forget_early(5_000, &alice).wait_blocking().unwrap();
        assert_eq!(
            state.early_due(u64::MAX, 10).unwrap(),
            vec![(5_000, carol.clone())]
        );
        state.forget_early(5_000, &carol).wait_blocking().unwrap();
        assert!(!state.has_early().unwrap());
    }

    #[test]
    fn mutes_end_at_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let bob = name("bob");
        let carol = name("carol");
        state.mute(&bob, 10_000).wait_blocking().unwrap();
        state.mute(&carol, 20_000).wait_blocking().unwrap();
        assert_eq!(
            state.mutes().unwrap(),
            vec![(bob.clone(), 10_000), (carol.clone(), 20_000)]
        );
        assert_eq!(state.muted_until(&bob, 9_999).unwrap(), Some(10_000));
        assert_eq!(state.muted_until(&bob, 10_000).unwrap(), None);
        assert!(
            state
                .take_ended_mutes(9_999)
                .wait_blocking()
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            state.take_ended_mutes(10_000).wait_blocking().unwrap(),
            vec![bob.clone()]
        );
        assert_eq!(state.mutes().unwrap(), vec![(carol.clone(), 20_000)]);
        assert!(state.unmute(&carol).wait_blocking().unwrap());
        assert!(!state.unmute(&carol).wait_blocking().unwrap());
        assert_eq!(state.mutes().unwrap(), vec![]);
    }

    /// Regression: whether a message was held by a mute was decided when it was checked,
    /// before the write that stored it; a message checked just before an unmute and stored
    /// just after was neither released by the unmute nor shown on arrival. The store now
    /// decides in the same write, in order with mute and unmute.
    #[test]
    fn a_message_stored_after_its_senders_unmute_is_not_held() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let alice = name("alice");
        state.mute(&alice, 10_000).wait_blocking().unwrap();
        let before = plaintext("alice", "checked and stored while muted", 1_000);
        let StoreOutcome::New(held) = state.store_incoming(&before, 1_000).unwrap() else {
            panic!("stored")
        };
        assert!(held.while_muted);
        assert!(state.unmute(&alice).wait_blocking().unwrap());
        let after = plaintext("alice", "checked while muted, stored after", 1_100);
        let StoreOutcome::New(shown) = state.store_incoming(&after, 1_100).unwrap() else {
            panic!("stored")
        };
        assert!(
            !shown.while_muted,
            "the unmute came first: shown on arrival"
        );
        state.mute(&alice, 5_000).wait_blocking().unwrap();
        let expired = plaintext("alice", "stored after the mute's end", 6_000);
        let StoreOutcome::New(late) = state.store_incoming(&expired, 6_000).unwrap() else {
            panic!("stored")
        };
        assert!(!late.while_muted, "the mute had ended: shown on arrival");
    }

    #[test]
    fn pins_are_first_use_and_changes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let bob = name("bob");
        let first = Identity::generate().public().clone();
        let second = Identity::generate().public().clone();
        assert_eq!(
            futures::executor::block_on(state.pin_if_absent(&bob, &first)).unwrap(),
            PinOutcome::New
        );
        assert_eq!(
            futures::executor::block_on(state.pin_if_absent(&bob, &first)).unwrap(),
            PinOutcome::Same
        );
        assert_eq!(
            futures::executor::block_on(state.pin_if_absent(&bob, &second)).unwrap(),
            PinOutcome::Changed {
                pinned: first.clone()
            }
        );
        assert_eq!(state.pinned(&bob).unwrap(), Some(first));
        state.repin(&bob, &second).wait_blocking().unwrap();
        assert_eq!(state.pinned(&bob).unwrap(), Some(second));
    }

    #[test]
    fn blocks_track_what_the_server_has_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let mallory = name("mallory");
        assert!(state.block(&mallory).wait_blocking().unwrap());
        assert!(!state.block(&mallory).wait_blocking().unwrap());
        assert!(state.is_blocked(&mallory).unwrap());
        assert_eq!(
            state.unsynced_blocks().unwrap(),
            vec![(mallory.clone(), true)]
        );
        state.block_synced(&mallory, true).wait_blocking().unwrap();
        assert!(state.unsynced_blocks().unwrap().is_empty());
        assert!(state.unblock(&mallory).wait_blocking().unwrap());
        assert!(!state.is_blocked(&mallory).unwrap());
        // A stale confirmation (of the block) does not hide the pending unblock.
        state.block_synced(&mallory, true).wait_blocking().unwrap();
        assert_eq!(
            state.unsynced_blocks().unwrap(),
            vec![(mallory.clone(), false)]
        );
        state.block_synced(&mallory, false).wait_blocking().unwrap();
        assert!(state.unsynced_blocks().unwrap().is_empty());
        assert!(state.blocked().unwrap().is_empty());
    }

    /// History lines written when reasons were stored as text still read, as text.
    #[test]
    fn a_failure_stored_as_text_by_an_earlier_version_still_reads() {
        #[derive(Serialize)]
        enum Earlier {
            _Received,
            _Pending,
            _Delivered,
            _Queued,
            Failed(String),
        }
        let bytes = wire::encode(&Earlier::Failed("server unreachable".into())).unwrap();
        assert_eq!(
            wire::decode::<MessageStatus>(&bytes).unwrap(),
            MessageStatus::FailedAsText("server unreachable".into())
        );
    }

    /// Regression: seen ids were keyed without their sender, so a message from one sender
    /// made another sender's message with the same id and millisecond pass for a copy.
    #[test]
    fn two_senders_may_use_one_id_and_each_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let from_mallory = plaintext("mallory", "first, with alice's id", 5_000);
        let from_alice = Plaintext {
            from: name("alice"),
            body: "the real one".into(),
            receipt: None,
            ..from_mallory.clone()
        };
        let outcomes = state
            .submit_incoming(
                vec![from_mallory.clone(), from_alice.clone(), from_alice.clone()],
                6_000,
                false,
                RatchetSave::default(),
            )
            .wait_blocking()
            .unwrap();
        assert!(matches!(outcomes[0], StoreOutcome::New(_)));
        assert!(matches!(outcomes[1], StoreOutcome::New(_)), "{outcomes:?}");
        assert_eq!(outcomes[2], StoreOutcome::Duplicate);
        assert!(
            state
                .is_seen(&from_alice.from, &from_alice.id, from_alice.sent_at_ms)
                .unwrap()
        );
    }

    /// A layout 2 file (seen ids without their sender) opens with every seen id keyed by
    /// the sender its history line names: a copy of a stored message is still a copy.
    #[test]
    fn layout_2_seen_ids_are_migrated_with_their_senders() {
        let dir = tempfile::tempdir().unwrap();
        let stored = plaintext("bob", "before the upgrade", 3_000);
        {
            let state = State::open(dir.path()).unwrap();
            state
                .submit_incoming(vec![stored.clone()], 3_500, false, RatchetSave::default())
                .wait_blocking()
                .unwrap();
        }
        // Turn the file back into layout 2: the seen row without its sender.
        {
            let db = Database::create(dir.path().join(STATE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(SEEN).unwrap();
            txn.open_table(SEEN_V2)
                .unwrap()
                .insert((stored.sent_at_ms, stored.id.0), 3_500)
                .unwrap();
            txn.commit().unwrap();
        }
        let state = State::open(dir.path()).unwrap();
        assert!(
            state
                .is_seen(&stored.from, &stored.id, stored.sent_at_ms)
                .unwrap()
        );
        let again = state
            .submit_incoming(vec![stored.clone()], 4_000, false, RatchetSave::default())
            .wait_blocking()
            .unwrap();
        assert_eq!(again, vec![StoreOutcome::Duplicate]);
        let txn = state.db.get().unwrap().begin_read().unwrap();
        assert!(
            txn.list_tables()
                .unwrap()
                .all(|table| table.name() != SEEN_V2.name()),
            "the old table is gone"
        );
    }

    /// Regression (issue 12): held mail was keyed by id alone, so a second sender's held
    /// message reusing an id passed for the first one ("held already") and was acked and
    /// lost. Held mail is keyed by (sender, id), and a file of the older layout is migrated.
    #[test]
    fn held_mail_is_keyed_by_sender_and_an_older_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let envelope = |from: &str, id: MessageId| Envelope {
            id,
            from: name(from),
            to: name("me"),
            token: format!("sealed by {from}").into_bytes(),
        };
        let id = MessageId::random();
        let (alice, carol) = (envelope("alice", id), envelope("carol", id));
        let old = envelope("dave", MessageId::random());
        {
            let state = State::open(dir.path()).unwrap();
            assert!(state.hold(&alice, 10).wait_blocking().unwrap());
            assert!(state.hold(&carol, 10).wait_blocking().unwrap());
        }
        // A row as the older layout wrote it, keyed by id alone.
        {
            let db = Database::create(dir.path().join(STATE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(HELD_V3)
                .unwrap()
                .insert(old.id.0, encode(&old).as_ref())
                .unwrap();
            txn.commit().unwrap();
        }
        let state = State::open(dir.path()).unwrap();
        assert_eq!(
            state.held_from(&name("alice")).unwrap(),
            vec![alice.clone()]
        );
        assert_eq!(
            state.held_from(&name("carol")).unwrap(),
            vec![carol.clone()]
        );
        assert_eq!(state.held_from(&name("dave")).unwrap(), vec![old]);
        state.unhold(&alice).wait_blocking().unwrap();
        assert!(state.held_from(&name("alice")).unwrap().is_empty());
        assert_eq!(state.held_from(&name("carol")).unwrap(), vec![carol]);
        let txn = state.db.get().unwrap().begin_read().unwrap();
        assert!(
            txn.list_tables()
                .unwrap()
                .all(|table| table.name() != HELD_V3.name()),
            "the old table is gone"
        );
    }
}
