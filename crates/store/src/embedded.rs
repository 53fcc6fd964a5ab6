//! The embedded backend: [`EmbeddedStore`], the default when no Redis URL is given.
//!
//! Mail, name bindings and block lists live in one [redb] file, so a restart loses none of
//! them; presence and the broadcast channel live in memory, because one process is the whole
//! discovery tier here and both die with it anyway (a restarted server has no connected
//! clients, so it has no one to call online).
//!
//! # Layout
//!
//! | Table | Key | Value |
//! | --- | --- | --- |
//! | `bindings` | user | [`Binding`] (wire-encoded) |
//! | `rotations` | user | the latest rotation statements, oldest first (wire-encoded) |
//! | `mail` | (user, sequence) | (message id, [`StoredMail`] wire-encoded) |
//! | `mail_keys` | (user, message id, sender) | sequence |
//! | `mailbox_totals` | user | (message count, next sequence, stale `mail_keys` entries, bytes) |
//! | `blocks` (multimap) | user | blocked user |
//! | `quarantine` | (user, sequence) | (message id, undecodable bytes) |
//! | `meta` | `"layout"` | the layout version (2) |
//!
//! The per-user sequence orders a mailbox in deposit order (ids are random, times can tie);
//! `mail_keys` makes deposits idempotent by (sender, id), the mail's identity, and acks a
//! point lookup; `mailbox_totals` makes both cap checks (messages and bytes) O(1). A
//! message's bytes are its stored value's length; every removal (ack, expiry, quarantine)
//! gives them back in the same transaction.
//!
//! Layout 1 (files written before `meta` existed) keyed the id index by (user, id) alone in
//! `mail_ids` and kept no byte count in `mailboxes`. [`EmbeddedStore::open`] migrates such a
//! file once, in one transaction: it reads every stored mail row, keys it by its sender in
//! `mail_keys`, sums each mailbox's bytes into `mailbox_totals`, deletes the old tables
//! and records layout 2; a crash before the commit leaves layout 1 to migrate again. A deposit that finds the mailbox at its cap first deletes the expired mail
//! at its head (`expire_head`, oldest first, up to the first live message, counted through
//! the same `remove_mail` as a fetch's removals), so mail no one can fetch never keeps a
//! mailbox full while its recipient is away. A fetch stops reading at the first message
//! that does not fit its byte budget. Removing mail leaves its `mail_ids` entry behind (an
//! entry whose mail row is gone counts as absent): ids are random, so deleting them one by one would dirty a
//! different index page per message; instead a mailbox's entries are dropped in one sweep
//! when it empties, or when stale ones outnumber live ones. The message id sits beside the encoded mail, so even a value that no longer
//! decodes can be moved to `quarantine` (for an operator to inspect) together with its id.
//!
//! # Blocking and durability
//!
//! redb transactions block the calling thread (a durable commit waits for `fsync`), so every
//! operation runs on Tokio's blocking pool via [`tokio::task::spawn_blocking`]; a drain does
//! one read transaction per fetched batch and one write transaction per acked batch, never
//! one per message. Deposits, the one write that arrives one message at a time from many
//! senders at once, go to a dedicated writer thread that commits every deposit waiting in
//! one transaction (group commit), so concurrent deposits share one `fsync`. Deposits,
//! bindings and block-list changes commit durably. Acks commit without waiting for the disk:
//! an ack lost in a crash only brings its mail back, which at-least-once delivery allows
//! (receivers drop ids they have seen), and the next durable commit persists it; an `fsync`
//! per acked batch would bound a mailbox drain at the disk's flush rate. Bindings are cached
//! in memory after their first read or write; a rotation or a release (the only changes to
//! a binding) updates the cache in the same call, after its commit.
//!
//! # I/O failures
//!
//! After a write to the file fails (a full disk), redb refuses everything until the
//! database is reopened. The database therefore sits in a [`durable::DatabaseSlot`] that
//! every operation, and the deposit writer ([`durable::GroupWriter`]), takes it from: the
//! operation that failed reports why (a full disk is [`StoreError::StorageFull`]), and a
//! later one reopens the file, with a backoff while the disk stays full. Nothing committed
//! is lost, and the in-memory state (presence, cached bindings, the broadcast channel) is
//! kept, so a server recovers by itself once space is freed.
//!
//! **Architecture Invariant:** values are (de)serialised only through [`proto::wire`].

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use durable::{Commit, DatabaseSlot, GroupWriter, JobError, Opener};
use proto::{Envelope, MailRef, Username, identity::Rotation, wire};
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition, TableHandle, WriteTransaction,
};
use tokio::sync::broadcast;

use crate::{
    BindOutcome, Binding, Broadcast, DepositOutcome, Fetched, MailLimits, Presence, RotateOutcome,
    StoreError, StoredMail,
    record::{
        Batch, PreKeyOwner, appended, decode_binding, decode_prekey, decode_rotations, encode,
        is_expired, kept_fallback, prekey_bundle,
    },
};

/// Name → wire-encoded [`Binding`].
const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("bindings");
/// Name → wire-encoded rotation statements, oldest first.
const ROTATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("rotations");
/// A mail table: (user, sequence) → (message id, stored bytes).
type MailTable = TableDefinition<'static, (&'static str, u64), (&'static [u8; 16], &'static [u8])>;

/// (user, sequence) → (message id, wire-encoded [`StoredMail`]).
const MAIL: MailTable = TableDefinition::new("mail");
/// (user, message id, sender) → sequence in `MAIL`: mail identity is (sender, id).
const MAIL_KEYS: TableDefinition<(&str, &[u8; 16], &str), u64> = TableDefinition::new("mail_keys");
/// User → (messages in the mailbox, next sequence number, stale `MAIL_KEYS` entries, bytes
/// of stored mail).
const MAILBOX_TOTALS: TableDefinition<&str, (u64, u64, u64, u64)> =
    TableDefinition::new("mailbox_totals");
/// `"layout"` → the layout version of this file ([`LAYOUT`]).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Layout 1's id index, keyed without the sender: migrated at open, then deleted.
const MAIL_IDS_V1: TableDefinition<(&str, &[u8; 16]), u64> = TableDefinition::new("mail_ids");
/// Layout 1's mailbox rows, without bytes: migrated at open, then deleted.
const MAILBOXES_V1: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("mailboxes");
/// The layout this build writes.
const LAYOUT: u64 = 2;
/// User → the users they block.
/// Each user's signed Olm key and fallback key ([`crate::record::PreKeyOwner`]).
const PREKEY_OWNERS: TableDefinition<&str, &[u8]> = TableDefinition::new("prekey_owners");
/// Each user's one-time keys, by user and a position that grows with every key added.
const ONE_TIME_KEYS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("one_time_keys");
const BLOCKS: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("blocks");
/// Mail that no longer decodes, moved out of the mailbox: same shape as `MAIL`.
const QUARANTINE: MailTable = TableDefinition::new("quarantine");

/// How many broadcast events a slow subscriber may fall behind before it loses the oldest.
const BROADCAST_CAPACITY: usize = 1024;

/// The embedded store: a cheap-to-clone handle; clones share one database.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// What every clone shares.
struct Inner {
    /// The database, reopened after an I/O failure; shared with the deposit writer.
    db: Arc<DatabaseSlot>,
    limits: MailLimits,
    /// The deposit writer thread, joined on drop so the file is closed when the last
    /// handle goes (a reopen right after must not find it still open).
    writer: GroupWriter,
    /// Presence by user; a std mutex, never held across an `.await`. A `BTreeMap` so the
    /// online list comes out sorted by name.
    presence: Mutex<BTreeMap<Username, Presence>>,
    /// Bindings already read or written, so lookups (the hottest request) never touch the
    /// database for a known user. One process is the whole tier, and a rotation or release
    /// updates it after its commit, so it is never stale.
    bindings: Mutex<std::collections::HashMap<Username, Binding>>,
    events: broadcast::Sender<Broadcast>,
}

impl Inner {
    fn cached_binding(&self, user: &Username) -> Option<Binding> {
        self.bindings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(user)
            .cloned()
    }

    fn forget_binding(&self, user: &Username) {
        self.bindings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(user);
    }

    fn cache_binding(&self, binding: &Binding) {
        self.bindings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(binding.user.clone(), binding.clone());
    }
}

/// One deposit, as the writer thread runs it.
struct DepositJob {
    recipient: Username,
    sender: Username,
    id: [u8; 16],
    /// The stored value; its length is what the message costs against the byte cap.
    encoded: bytes::Bytes,
    /// When the deposit happens: decides which mail at the head of a full mailbox expired.
    now_ms: u64,
}

/// The most deposits committed in one group.
const MAX_DEPOSIT_GROUP: usize = 512;

/// What a deposit transaction decided, before it is turned into the public result.
#[derive(Debug, Clone, Copy)]
enum DepositDecision {
    Stored,
    Duplicate,
    Blocked,
    Full,
    FullBytes,
}

/// One message a fetch found it must remove from the mailbox.
struct Removal {
    sequence: u64,
    id: [u8; 16],
    /// `Some(bytes)` moves the value to quarantine (it does not decode); `None` drops it
    /// (it expired).
    quarantine: Option<Vec<u8>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the database file at `path`. This blocks briefly (file I/O, and a
    /// repair if the last run crashed), so call it at start-up, not on a busy runtime thread.
    ///
    /// After an I/O failure (a full disk) the file is reopened by itself, with a backoff;
    /// see the module docs.
    pub fn open(path: impl AsRef<Path>, limits: MailLimits) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        Self::open_with(Box::new(move || Database::create(&path)), limits)
    }

    /// Opens the database with `open`, which also reopens it after an I/O failure.
    fn open_with(open: Opener, limits: MailLimits) -> Result<Self, StoreError> {
        let db = open().map_err(embedded_error)?;
        // Migrate an older layout, and create every table once, so read transactions never
        // meet a missing table.
        let txn = db.begin_write().map_err(embedded_error)?;
        migrate_layout_1(&txn)?;
        create_tables(&txn).map_err(embedded_error)?;
        record_layout(&txn).map_err(embedded_error)?;
        txn.commit().map_err(embedded_error)?;
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let db = Arc::new(DatabaseSlot::new(db, open));
        let writer = GroupWriter::start("store-deposits", Arc::clone(&db), MAX_DEPOSIT_GROUP)
            .map_err(|error| StoreError::Embedded(format!("cannot start the writer: {error}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                limits,
                writer,
                presence: Mutex::new(BTreeMap::new()),
                bindings: Mutex::new(std::collections::HashMap::new()),
                events,
            }),
        })
    }

    /// The limits this store applies.
    pub fn limits(&self) -> MailLimits {
        self.inner.limits
    }

    /// Runs `work` on the blocking pool with the shared state and the current database.
    /// When `work` fails on the database, the slot checks whether it needs reopening.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &Database) -> Result<T, OpError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let db = inner.db.get().map_err(durable_error)?;
            let result = work(&inner, &db);
            if let Err(error) = &result
                && let Some(cause) = error.database_error()
            {
                inner.db.after_error(&db, cause);
            }
            result.map_err(StoreError::from)
        })
        .await
        .map_err(|error| StoreError::Embedded(format!("store task failed: {error}")))?
    }

    /// See [`crate::Store::bind`].
    pub async fn bind(&self, binding: &Binding) -> Result<BindOutcome, StoreError> {
        let binding = binding.clone();
        let encoded = encode(&binding)?;
        self.blocking(move |inner, db| {
            let txn = db.begin_write()?;
            let existing = {
                let mut table = txn.open_table(BINDINGS)?;
                let existing = table
                    .get(binding.user.as_str())?
                    .map(|value| value.value().to_vec());
                if existing.is_none() {
                    table.insert(binding.user.as_str(), encoded.as_ref())?;
                }
                existing
            };
            match existing {
                Some(bytes) => {
                    let existing = decode_binding(&binding.user, &bytes)?;
                    inner.cache_binding(&existing);
                    Ok(BindOutcome::Existing(existing))
                }
                None => {
                    txn.commit()?;
                    inner.db.committed();
                    inner.cache_binding(&binding);
                    Ok(BindOutcome::Created)
                }
            }
        })
        .await
    }

    /// See [`crate::Store::rotate`].
    pub async fn rotate(
        &self,
        current: &Binding,
        rotation: &Rotation,
        now_ms: u64,
    ) -> Result<RotateOutcome, StoreError> {
        let current = current.clone();
        let next = current.rotated(rotation, now_ms);
        let encoded = encode(&next)?;
        let rotation = rotation.clone();
        self.blocking(move |inner, db| {
            let txn = db.begin_write()?;
            let user = current.user.as_str();
            {
                let mut bindings = txn.open_table(BINDINGS)?;
                let standing = bindings
                    .get(user)?
                    .map(|value| decode_binding(&current.user, value.value()))
                    .transpose()?;
                if standing.as_ref() != Some(&current) {
                    return Ok(RotateOutcome::Changed(standing));
                }
                bindings.insert(user, encoded.as_ref())?;
                let mut rotations = txn.open_table(ROTATIONS)?;
                let kept = rotations
                    .get(user)?
                    .map(|value| decode_rotations(&current.user, value.value()))
                    .transpose()?
                    .unwrap_or_default();
                let kept = encode(&appended(kept, &rotation))?;
                rotations.insert(user, kept.as_ref())?;
                // The published keys were signed by the old identity: nobody could use them.
                forget_prekeys(&txn, user)?;
            }
            txn.commit()?;
            inner.db.committed();
            inner.cache_binding(&next);
            Ok(RotateOutcome::Rotated)
        })
        .await
    }

    /// See [`crate::Store::rotations`].
    pub async fn rotations(&self, user: &Username) -> Result<Vec<Rotation>, StoreError> {
        let user = user.clone();
        self.blocking(move |_, db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ROTATIONS)?;
            let value = table.get(user.as_str())?;
            Ok(value
                .map(|value| decode_rotations(&user, value.value()))
                .transpose()?
                .unwrap_or_default())
        })
        .await
    }

    /// See [`crate::Store::release`].
    pub async fn release(&self, user: &Username) -> Result<Option<Binding>, StoreError> {
        let user = user.clone();
        self.blocking(move |inner, db| {
            let txn = db.begin_write()?;
            let released = {
                let released = txn
                    .open_table(BINDINGS)?
                    .remove(user.as_str())?
                    .map(|value| decode_binding(&user, value.value()))
                    .transpose()?;
                txn.open_table(ROTATIONS)?.remove(user.as_str())?;
                forget_prekeys(&txn, user.as_str())?;
                released
            };
            txn.commit()?;
            inner.db.committed();
            inner.forget_binding(&user);
            Ok(released)
        })
        .await
    }

    /// See [`crate::Store::binding`].
    pub async fn binding(&self, user: &Username) -> Result<Option<Binding>, StoreError> {
        if let Some(binding) = self.inner.cached_binding(user) {
            return Ok(Some(binding));
        }
        let user = user.clone();
        self.blocking(move |inner, db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(BINDINGS)?;
            let value = table.get(user.as_str())?;
            let binding = value
                .map(|value| decode_binding(&user, value.value()))
                .transpose()?;
            if let Some(binding) = &binding {
                inner.cache_binding(binding);
            }
            Ok(binding)
        })
        .await
    }

    /// See [`crate::Store::set_presence`].
    pub async fn set_presence(&self, presence: &Presence) -> Result<(), StoreError> {
        self.presence_map()
            .insert(presence.user.clone(), presence.clone());
        Ok(())
    }

    /// See [`crate::Store::register_presence`]: presence lives in this process, so it is
    /// [`EmbeddedStore::set_presence`].
    pub async fn register_presence(&self, presence: &Presence) -> Result<(), StoreError> {
        self.set_presence(presence).await
    }

    /// See [`crate::Store::clear_presence`].
    pub async fn clear_presence(
        &self,
        user: &Username,
        session: u64,
        _now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut presence = self.presence_map();
        match presence.get_mut(user) {
            Some(current) if current.session == session => {
                current.expires_at_ms = 0;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// See [`crate::Store::presence`].
    pub async fn presence(&self, user: &Username) -> Result<Option<Presence>, StoreError> {
        Ok(self.presence_map().get(user).cloned())
    }

    /// See [`crate::Store::online_users`].
    pub async fn online_users(&self, now_ms: u64) -> Result<Vec<Username>, StoreError> {
        Ok(self
            .presence_map()
            .values()
            .filter(|presence| presence.is_online(now_ms))
            .map(|presence| presence.user.clone())
            .collect())
    }

    /// See [`crate::Store::lapsed`].
    pub async fn lapsed(&self, after_ms: u64, until_ms: u64) -> Result<Vec<Username>, StoreError> {
        Ok(self
            .presence_map()
            .values()
            .filter(|presence| (after_ms + 1..=until_ms).contains(&presence.expires_at_ms))
            .map(|presence| presence.user.clone())
            .collect())
    }

    /// The presence map. A poisoned lock still holds consistent data (every update is a
    /// single insert or field write), so it is used as is.
    fn presence_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<Username, Presence>> {
        self.inner
            .presence
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// See [`crate::Store::deposit`].
    pub async fn deposit(
        &self,
        envelope: &Envelope,
        now_ms: u64,
    ) -> Result<DepositOutcome, StoreError> {
        let mail = StoredMail {
            envelope: envelope.clone(),
            deposited_at_ms: now_ms,
        };
        let encoded = encode(&mail)?;
        let limits = self.inner.limits;
        let job = DepositJob {
            recipient: envelope.to.clone(),
            sender: envelope.from.clone(),
            id: envelope.id.0,
            encoded,
            now_ms,
        };
        // Deposits of one group run in one transaction in order (a repeated id in one group
        // is a duplicate). Only a stored deposit needs the commit: a group of duplicates and
        // refusals commits nothing.
        let decision = self
            .inner
            .writer
            .submit_or_skip(move |txn| {
                let decision = deposit_in(txn, &job, limits)?;
                let commit = match decision {
                    DepositDecision::Stored => Commit::Durable,
                    _ => Commit::Skip,
                };
                Ok::<_, OpError>((decision, commit))
            })
            .await?;
        let cap = limits.cap;
        match decision {
            DepositDecision::Stored => Ok(DepositOutcome::Stored),
            DepositDecision::Duplicate => Ok(DepositOutcome::Duplicate),
            DepositDecision::Blocked => Err(StoreError::Blocked {
                recipient: envelope.to.clone(),
                sender: envelope.from.clone(),
            }),
            DepositDecision::Full => Err(StoreError::MailboxFull {
                user: envelope.to.clone(),
                cap,
            }),
            DepositDecision::FullBytes => Err(StoreError::MailboxBytesFull {
                user: envelope.to.clone(),
                max_bytes: limits.max_bytes,
            }),
        }
    }

    /// See [`crate::Store::fetch`]. Expired mail met on the way is deleted; mail that does
    /// not decode is logged and moved to quarantine, so neither stops the rest. Reading
    /// stops at the first message that does not fit the batch.
    pub async fn fetch(
        &self,
        user: &Username,
        max: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<Fetched, StoreError> {
        let user = user.clone();
        let ttl_ms = self.inner.limits.ttl_ms;
        self.blocking(move |_, db| {
            let (batch, removals, count) = {
                let txn = db.begin_read()?;
                let count = Mailbox::read(&txn.open_table(MAILBOX_TOTALS)?, &user)?.count;
                let table = txn.open_table(MAIL)?;
                let mut batch = Batch::new(max, max_bytes);
                let mut removals = Vec::new();
                let range = table.range((user.as_str(), 0)..=(user.as_str(), u64::MAX))?;
                for entry in range {
                    if batch.is_full() {
                        break;
                    }
                    let (key, value) = entry?;
                    let (id, bytes) = value.value();
                    match classify(&user, key.value().1, id, bytes, ttl_ms, now_ms) {
                        Entry::Keep(stored) => {
                            if !batch.offer(stored) {
                                break;
                            }
                        }
                        Entry::Remove(removal) => removals.push(removal),
                    }
                }
                (batch, removals, count)
            };
            let removed = removals.len() as u64;
            if !removals.is_empty() {
                let txn = db.begin_write()?;
                remove_mail(&txn, &user, &removals)?;
                txn.commit()?;
            }
            let remaining = count.saturating_sub(removed + batch.len() as u64);
            Ok(Fetched {
                mail: batch.into_mail(),
                remaining,
            })
        })
        .await
    }

    /// See [`crate::Store::ack`]. One write transaction for the whole batch, committed
    /// without waiting for the disk: an ack lost in a crash only brings its mail back, which
    /// at-least-once delivery allows (receivers drop what they have seen), and the next
    /// durable commit (any deposit or binding) persists it. Waiting for `fsync` per batch
    /// would bound a mailbox drain at the disk's flush rate.
    pub async fn ack(&self, user: &Username, mail: &[MailRef]) -> Result<u64, StoreError> {
        if mail.is_empty() {
            return Ok(0);
        }
        let user = user.clone();
        let mail = mail.to_vec();
        self.blocking(move |_, db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::None)?;
            let removed = ack_in(&txn, &user, &mail)?;
            if removed > 0 {
                txn.commit()?;
            }
            Ok(removed)
        })
        .await
    }

    /// See [`crate::Store::mail_count`].
    pub async fn mail_count(&self, user: &Username) -> Result<u64, StoreError> {
        let user = user.clone();
        self.blocking(move |_, db| {
            let txn = db.begin_read()?;
            Ok(Mailbox::read(&txn.open_table(MAILBOX_TOTALS)?, &user)?.count)
        })
        .await
    }

    /// See [`crate::Store::block`].
    pub async fn block(&self, user: &Username, blocked: &Username) -> Result<(), StoreError> {
        self.change_block(user, blocked, true).await
    }

    /// See [`crate::Store::unblock`].
    pub async fn unblock(&self, user: &Username, blocked: &Username) -> Result<(), StoreError> {
        self.change_block(user, blocked, false).await
    }

    /// Adds (`block`) or removes the pair in one durable transaction.
    async fn change_block(
        &self,
        user: &Username,
        blocked: &Username,
        block: bool,
    ) -> Result<(), StoreError> {
        let user = user.clone();
        let blocked = blocked.clone();
        self.blocking(move |inner, db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_multimap_table(BLOCKS)?;
                if block {
                    table.insert(user.as_str(), blocked.as_str())
                } else {
                    table.remove(user.as_str(), blocked.as_str())
                }?;
            }
            txn.commit()?;
            inner.db.committed();
            Ok(())
        })
        .await
    }

    /// See [`crate::Store::publish_prekeys`]: one durable transaction.
    pub async fn publish_prekeys(
        &self,
        user: &Username,
        prekeys: &proto::ratchet::PreKeys,
    ) -> Result<u32, StoreError> {
        let user = user.clone();
        let prekeys = prekeys.clone();
        self.blocking(move |inner, db| {
            let txn = db.begin_write()?;
            let count = {
                let mut owners = txn.open_table(PREKEY_OWNERS)?;
                let mut keys = txn.open_table(ONE_TIME_KEYS)?;
                let previous = owners
                    .get(user.as_str())?
                    .map(|value| decode_prekey::<PreKeyOwner>(&user, "prekeys", value.value()))
                    .transpose()?;
                let range = (user.as_str(), 0)..=(user.as_str(), u64::MAX);
                let mut stored: Vec<(u64, proto::ratchet::SignedKey)> = Vec::new();
                for row in keys.range(range.clone())? {
                    let (key, value) = row?;
                    stored.push((
                        key.value().1,
                        decode_prekey(&user, "one-time key", value.value())?,
                    ));
                }
                let same_account = previous
                    .as_ref()
                    .is_some_and(|previous| previous.olm_key.key == prekeys.olm_key.key);
                if previous.is_some() && !same_account {
                    for (position, _) in stored.drain(..) {
                        keys.remove((user.as_str(), position))?;
                    }
                }
                let owner = encode(&PreKeyOwner {
                    olm_key: prekeys.olm_key.clone(),
                    fallback: kept_fallback(&prekeys, previous.filter(|_| same_account)),
                })?;
                owners.insert(user.as_str(), owner.as_ref())?;
                let mut next = stored.last().map_or(0, |(position, _)| position + 1);
                for key in &prekeys.one_time {
                    if stored.iter().any(|(_, old)| old.key == key.key) {
                        continue;
                    }
                    keys.insert((user.as_str(), next), encode(key)?.as_ref())?;
                    stored.push((next, key.clone()));
                    next += 1;
                }
                let excess = stored
                    .len()
                    .saturating_sub(proto::ratchet::MAX_ONE_TIME_KEYS);
                for (position, _) in stored.drain(..excess) {
                    keys.remove((user.as_str(), position))?;
                }
                u32::try_from(stored.len()).unwrap_or(u32::MAX)
            };
            txn.commit()?;
            inner.db.committed();
            Ok(count)
        })
        .await
    }

    /// See [`crate::Store::claim_prekey`]: one durable transaction.
    pub async fn claim_prekey(
        &self,
        user: &Username,
    ) -> Result<Option<proto::ratchet::PreKeyBundle>, StoreError> {
        let user = user.clone();
        self.blocking(move |inner, db| {
            let txn = db.begin_write()?;
            let (bundle, claimed) = {
                let owners = txn.open_table(PREKEY_OWNERS)?;
                let Some(owner) = owners
                    .get(user.as_str())?
                    .map(|value| decode_prekey::<PreKeyOwner>(&user, "prekeys", value.value()))
                    .transpose()?
                else {
                    return Ok(None);
                };
                let mut keys = txn.open_table(ONE_TIME_KEYS)?;
                let first = keys
                    .range((user.as_str(), 0)..=(user.as_str(), u64::MAX))?
                    .next()
                    .transpose()?
                    .map(|(key, value)| (key.value().1, value.value().to_vec()));
                let one_time = match first {
                    Some((position, bytes)) => {
                        keys.remove((user.as_str(), position))?;
                        Some(decode_prekey(&user, "one-time key", &bytes)?)
                    }
                    None => None,
                };
                let claimed = one_time.is_some();
                (prekey_bundle(owner, one_time), claimed)
            };
            if claimed {
                txn.commit()?;
                inner.db.committed();
            }
            Ok(bundle)
        })
        .await
    }

    /// See [`crate::Store::blocked_by`].
    pub async fn blocked_by(&self, user: &Username) -> Result<Vec<Username>, StoreError> {
        let user = user.clone();
        self.blocking(move |_, db| {
            let txn = db.begin_read()?;
            let table = txn.open_multimap_table(BLOCKS)?;
            let mut blocked = Vec::new();
            for entry in table.get(user.as_str())? {
                let entry = entry?;
                match Username::new(entry.value()) {
                    Ok(name) => blocked.push(name),
                    Err(error) => {
                        tracing::warn!(%user, %error, "invalid name in block list; skipped")
                    }
                }
            }
            // The multimap keeps values in byte order, which is name order already.
            Ok(blocked)
        })
        .await
    }

    /// See [`crate::Store::publish`]. Having no subscriber is not an error.
    pub async fn publish(&self, event: &Broadcast) -> Result<(), StoreError> {
        // `send` fails only when no one is subscribed, and then there is no one to tell.
        let _ = self.inner.events.send(event.clone());
        Ok(())
    }

    /// See [`crate::Store::subscribe`].
    pub fn subscribe(&self) -> broadcast::Receiver<Broadcast> {
        self.inner.events.subscribe()
    }
}

/// Drops `user`'s published keys (their name moved to other keys, which did not sign them).
fn forget_prekeys(txn: &WriteTransaction, user: &str) -> Result<(), redb::Error> {
    txn.open_table(PREKEY_OWNERS)?.remove(user)?;
    txn.open_table(ONE_TIME_KEYS)?
        .retain_in((user, 0)..=(user, u64::MAX), |_, _| false)?;
    Ok(())
}

/// Opens every table in `txn`, creating the missing ones.
fn create_tables(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(BINDINGS)?;
    txn.open_table(ROTATIONS)?;
    txn.open_table(MAIL)?;
    txn.open_table(MAIL_KEYS)?;
    txn.open_table(MAILBOX_TOTALS)?;
    txn.open_table(META)?;
    txn.open_multimap_table(BLOCKS)?;
    txn.open_table(QUARANTINE)?;
    txn.open_table(PREKEY_OWNERS)?;
    txn.open_table(ONE_TIME_KEYS)?;
    Ok(())
}

/// Records in `txn` that the file has this build's [`LAYOUT`].
fn record_layout(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(META)?.insert("layout", LAYOUT)?;
    Ok(())
}

/// Migrates a layout 1 file (see the module docs) inside `txn`; does nothing to a file that
/// records its layout or has no layout 1 tables (a new file).
fn migrate_layout_1(txn: &WriteTransaction) -> Result<(), StoreError> {
    let recorded = (|| -> Result<Option<u64>, redb::Error> {
        Ok(txn
            .open_table(META)?
            .get("layout")?
            .map(|value| value.value()))
    })()
    .map_err(embedded_error)?;
    if recorded.is_some() {
        return Ok(());
    }
    let has_layout_1 = txn
        .list_tables()
        .map_err(embedded_error)?
        .any(|table| table.name() == "mailboxes");
    if !has_layout_1 {
        return Ok(());
    }
    let migrate = || -> Result<u64, redb::Error> {
        let old: Vec<(String, (u64, u64, u64))> = txn
            .open_table(MAILBOXES_V1)?
            .iter()?
            .map(|row| row.map(|(user, totals)| (user.value().to_owned(), totals.value())))
            .collect::<Result<_, _>>()?;
        let mut mail = 0;
        for (user, (count, next_sequence, _)) in &old {
            let mut bytes = 0;
            let mut keys = Vec::new();
            for row in txn
                .open_table(MAIL)?
                .range((user.as_str(), 0)..=(user.as_str(), u64::MAX))?
            {
                let (key, value) = row?;
                let (id, stored) = value.value();
                bytes += stored.len() as u64;
                // A row that does not decode has no sender to key it by; the next fetch
                // quarantines it, as it would have before.
                if let Ok(decoded) = wire::decode::<StoredMail>(stored) {
                    keys.push((*id, decoded.envelope.from, key.value().1));
                }
            }
            let mut index = txn.open_table(MAIL_KEYS)?;
            for (id, sender, sequence) in &keys {
                index.insert((user.as_str(), id, sender.as_str()), sequence)?;
            }
            mail += keys.len() as u64;
            let totals = Mailbox {
                count: *count,
                next_sequence: *next_sequence,
                stale_ids: 0,
                bytes,
            };
            let mut table = txn.open_table(MAILBOX_TOTALS)?;
            table.insert(
                user.as_str(),
                (totals.count, totals.next_sequence, 0, totals.bytes),
            )?;
        }
        txn.delete_table(MAILBOXES_V1)?;
        txn.delete_table(MAIL_IDS_V1)?;
        Ok(mail)
    };
    let mail = migrate().map_err(embedded_error)?;
    tracing::info!(
        mail,
        "store file migrated to layout 2 (mail keyed by sender and id, mailbox bytes counted)"
    );
    Ok(())
}

/// Stale `MAIL_KEYS` entries of one mailbox tolerated before a sweep (see [`after_removal`]).
const STALE_ID_SWEEP: u64 = 4096;

/// One row of `MAILBOXES`.
#[derive(Debug, Clone, Copy, Default)]
struct Mailbox {
    /// Messages in the mailbox.
    count: u64,
    /// The sequence number the next deposit gets (never reused, so a stale id entry can
    /// never point at newer mail).
    next_sequence: u64,
    /// `MAIL_KEYS` entries whose mail is gone (acked, expired, quarantined).
    stale_ids: u64,
    /// Bytes of the stored values of the mail in the mailbox (checked against the byte cap).
    bytes: u64,
}

impl Mailbox {
    fn read(
        table: &impl ReadableTable<&'static str, (u64, u64, u64, u64)>,
        user: &Username,
    ) -> Result<Self, redb::Error> {
        Ok(table
            .get(user.as_str())?
            .map_or_else(Self::default, |value| {
                let (count, next_sequence, stale_ids, bytes) = value.value();
                Self {
                    count,
                    next_sequence,
                    stale_ids,
                    bytes,
                }
            }))
    }

    fn write(
        self,
        table: &mut redb::Table<&'static str, (u64, u64, u64, u64)>,
        user: &Username,
    ) -> Result<(), redb::Error> {
        table.insert(
            user.as_str(),
            (self.count, self.next_sequence, self.stale_ids, self.bytes),
        )?;
        Ok(())
    }

    /// Whether a message of `bytes` more fits under `limits`: `None` if it does, else the
    /// refusal.
    fn refuses(&self, bytes: u64, limits: MailLimits) -> Option<DepositDecision> {
        if self.count >= limits.cap {
            Some(DepositDecision::Full)
        } else if self.bytes.saturating_add(bytes) > limits.max_bytes {
            Some(DepositDecision::FullBytes)
        } else {
            None
        }
    }
}

/// The checks and inserts of one deposit, inside `txn`. A mailbox at either cap (messages
/// or bytes) first loses the expired mail at its head ([`expire_head`]), so mail no one can
/// fetch any more never keeps a mailbox full.
fn deposit_in(
    txn: &WriteTransaction,
    job: &DepositJob,
    limits: MailLimits,
) -> Result<DepositDecision, redb::Error> {
    let (recipient, id, sender) = (&job.recipient, &job.id, job.sender.as_str());
    let key = (recipient.as_str(), id, sender);
    let blocks = txn.open_multimap_table(BLOCKS)?;
    for blocked in blocks.get(recipient.as_str())? {
        if blocked?.value() == job.sender.as_str() {
            return Ok(DepositDecision::Blocked);
        }
    }
    let stale_entry = {
        let keys = txn.open_table(MAIL_KEYS)?;
        let mail = txn.open_table(MAIL)?;
        match keys.get(key)?.map(|value| value.value()) {
            Some(sequence) if mail.get((recipient.as_str(), sequence))?.is_some() => {
                return Ok(DepositDecision::Duplicate);
            }
            Some(_) => true,
            None => false,
        }
    };
    let size = job.encoded.len() as u64;
    let mut mailbox = Mailbox::read(&txn.open_table(MAILBOX_TOTALS)?, recipient)?;
    if mailbox.refuses(size, limits).is_some()
        && expire_head(txn, recipient, limits.ttl_ms, job.now_ms)? > 0
    {
        // `expire_head` books what it removes in `MAILBOX_TOTALS` itself; read the row again.
        mailbox = Mailbox::read(&txn.open_table(MAILBOX_TOTALS)?, recipient)?;
    }
    if let Some(refusal) = mailbox.refuses(size, limits) {
        return Ok(refusal);
    }
    let sequence = mailbox.next_sequence;
    txn.open_table(MAIL)?
        .insert((recipient.as_str(), sequence), (id, &job.encoded[..]))?;
    txn.open_table(MAIL_KEYS)?.insert(key, sequence)?;
    mailbox.count += 1;
    mailbox.bytes += size;
    mailbox.next_sequence += 1;
    if stale_entry {
        // The stale entry was just overwritten by a live one (or swept by `expire_head`,
        // which then reset the stale count to zero already).
        mailbox.stale_ids = mailbox.stale_ids.saturating_sub(1);
    }
    mailbox.write(&mut txn.open_table(MAILBOX_TOTALS)?, recipient)?;
    Ok(DepositDecision::Stored)
}

/// Deletes the expired mail at the head of `user`'s mailbox, oldest first, up to the first
/// message that has not expired; returns how many it deleted. It meets the head the way a
/// fetch would (mail that does not decode is quarantined on the way), and counts through
/// [`remove_mail`] like a fetch's removals, so the mailbox count stays exact.
fn expire_head(
    txn: &WriteTransaction,
    user: &Username,
    ttl_ms: u64,
    now_ms: u64,
) -> Result<u64, redb::Error> {
    let mut removals = Vec::new();
    {
        let mail = txn.open_table(MAIL)?;
        for entry in mail.range((user.as_str(), 0)..=(user.as_str(), u64::MAX))? {
            let (key, value) = entry?;
            let (id, bytes) = value.value();
            match classify(user, key.value().1, id, bytes, ttl_ms, now_ms) {
                Entry::Keep(_) => break,
                Entry::Remove(removal) => removals.push(removal),
            }
        }
    }
    remove_mail(txn, user, &removals)
}

/// What a fetch (or [`expire_head`]) does with one mailbox row.
enum Entry {
    /// Deliver it.
    Keep(StoredMail),
    /// Take it out of the mailbox: it expired, or it does not decode (then it is
    /// quarantined).
    Remove(Removal),
}

/// Decides about one mailbox row of `user`, logging anything wrong with it.
fn classify(
    user: &Username,
    sequence: u64,
    id: &[u8; 16],
    bytes: &[u8],
    ttl_ms: u64,
    now_ms: u64,
) -> Entry {
    let remove = |quarantine| {
        Entry::Remove(Removal {
            sequence,
            id: *id,
            quarantine,
        })
    };
    match wire::decode::<StoredMail>(bytes) {
        Ok(stored) if stored.envelope.id.0 != *id => {
            tracing::warn!(%user, sequence, "stored mail has a different id than its key; quarantined");
            remove(Some(bytes.to_vec()))
        }
        Ok(stored) if is_expired(&stored, ttl_ms, now_ms) => remove(None),
        Ok(stored) => Entry::Keep(stored),
        Err(error) => {
            tracing::warn!(%user, sequence, %error, "stored mail does not decode; quarantined");
            remove(Some(bytes.to_vec()))
        }
    }
}

/// Deletes the acked `mail` of `user` inside `txn`; returns how many were there.
///
/// Only the mail rows go now (they sit together, in sequence order, so a batch touches a
/// few pages); the id index is random by nature, and deleting a thousand random entries
/// per batch would rewrite most of its pages every time. [`after_removal`] clears it in one
/// sweep instead.
fn ack_in(txn: &WriteTransaction, user: &Username, acked: &[MailRef]) -> Result<u64, redb::Error> {
    let keys = txn.open_table(MAIL_KEYS)?;
    let mut sequences = Vec::with_capacity(acked.len());
    for acked in acked {
        if let Some(sequence) = keys.get((user.as_str(), &acked.id.0, acked.from.as_str()))? {
            sequences.push(sequence.value());
        }
    }
    drop(keys);
    let (mut removed, mut bytes) = (0, 0);
    // The acked rows are usually a run at the mailbox's front: one pass over the range they
    // span removes them, instead of one descent of the tree each.
    sequences.sort_unstable();
    sequences.dedup();
    if let (Some(&first), Some(&last)) = (sequences.first(), sequences.last()) {
        let mut mail = txn.open_table(MAIL)?;
        mail.retain_in(
            (user.as_str(), first)..=(user.as_str(), last),
            |key, value| {
                let acked = sequences.binary_search(&key.1).is_ok();
                if acked {
                    removed += 1;
                    bytes += value.1.len() as u64;
                }
                !acked
            },
        )?;
    }
    if removed > 0 {
        after_removal(txn, user, removed, bytes)?;
    }
    Ok(removed)
}

/// Removes what a fetch (or a deposit into a full mailbox) found expired or undecodable,
/// quarantining the latter; returns how many rows it actually deleted.
fn remove_mail(
    txn: &WriteTransaction,
    user: &Username,
    removals: &[Removal],
) -> Result<u64, redb::Error> {
    // The rows were read in an earlier transaction: an ack may have deleted some since, and
    // only the rows deleted here may be booked as removed (counting one twice would let the
    // count reach zero with mail left, and sweep that mail's ids).
    let (mut removed, mut bytes) = (0, 0);
    {
        let mut mail = txn.open_table(MAIL)?;
        let mut quarantine = txn.open_table(QUARANTINE)?;
        for removal in removals {
            let Some(row) = mail.remove((user.as_str(), removal.sequence))? else {
                continue;
            };
            removed += 1;
            bytes += row.value().1.len() as u64;
            drop(row);
            if let Some(bytes) = &removal.quarantine {
                quarantine.insert(
                    (user.as_str(), removal.sequence),
                    (&removal.id, bytes.as_slice()),
                )?;
            }
        }
    }
    if removed > 0 {
        after_removal(txn, user, removed, bytes)?;
    }
    Ok(removed)
}

/// Books `removed` mail rows of `user`, `bytes` long together, as gone (their bytes go back
/// to the byte cap), and cleans the key index: all of the
/// user's entries at once when the mailbox is empty (the usual end of a drain), or the
/// stale ones when too many have piled up in a mailbox that never empties.
fn after_removal(
    txn: &WriteTransaction,
    user: &Username,
    removed: u64,
    bytes: u64,
) -> Result<(), redb::Error> {
    let mut mailboxes = txn.open_table(MAILBOX_TOTALS)?;
    let mut mailbox = Mailbox::read(&mailboxes, user)?;
    mailbox.count = mailbox.count.saturating_sub(removed);
    mailbox.bytes = mailbox.bytes.saturating_sub(bytes);
    mailbox.stale_ids += removed;
    // Usernames are ASCII, so a sender of U+10FFFF sorts after every real one.
    let key_range = (user.as_str(), &[0u8; 16], "")..=(user.as_str(), &[0xffu8; 16], "\u{10FFFF}");
    if mailbox.count == 0 {
        let mut keys = txn.open_table(MAIL_KEYS)?;
        keys.retain_in(key_range, |_, _| false)?;
        mailbox.stale_ids = 0;
        mailbox.bytes = 0;
    } else if mailbox.stale_ids > STALE_ID_SWEEP.max(mailbox.count) {
        let mut keys = txn.open_table(MAIL_KEYS)?;
        let mail = txn.open_table(MAIL)?;
        // Keep an entry when its mail row exists, or when that cannot be read (the sweep
        // is only garbage collection; the next one tries again).
        keys.retain_in(key_range, |_, sequence| {
            mail.get((user.as_str(), sequence))
                .map_or(true, |row| row.is_some())
        })?;
        mailbox.stale_ids = 0;
    }
    mailbox.write(&mut mailboxes, user)
}

/// An operation's failure inside the store: the database's (kept whole, so the slot can
/// tell whether the file failed and keep the cause) or the store's own.
#[derive(Debug)]
enum OpError {
    Durable(durable::Error),
    Store(StoreError),
}

impl From<durable::Error> for OpError {
    fn from(error: durable::Error) -> Self {
        OpError::Durable(error)
    }
}

impl From<StoreError> for OpError {
    fn from(error: StoreError) -> Self {
        OpError::Store(error)
    }
}

macro_rules! from_redb {
    ($($kind:ty),*) => {$(
        impl From<$kind> for OpError {
            fn from(error: $kind) -> Self {
                OpError::Durable(redb::Error::from(error).into())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl JobError for OpError {
    fn database_error(&self) -> Option<&Arc<redb::Error>> {
        match self {
            OpError::Durable(durable::Error::Database(cause)) => Some(cause),
            _ => None,
        }
    }
}

impl From<OpError> for StoreError {
    fn from(error: OpError) -> Self {
        match error {
            OpError::Durable(error) => durable_error(error),
            OpError::Store(error) => error,
        }
    }
}

/// The store's error for a durable-write failure; a full disk is told apart, so senders
/// hear why.
fn durable_error(error: durable::Error) -> StoreError {
    let message = match &error {
        durable::Error::Database(cause) => cause.to_string(),
        other => other.to_string(),
    };
    if error.is_storage_full() {
        StoreError::StorageFull(message)
    } else {
        StoreError::Embedded(message)
    }
}

/// Wraps any redb error met while opening the store.
fn embedded_error(error: impl Into<redb::Error>) -> StoreError {
    durable_error(durable::Error::from(error.into()))
}

#[cfg(test)]
mod tests {
    use proto::{Envelope, MailRef, MessageId, Username};
    use redb::ReadableTableMetadata;

    use super::*;

    fn user(name: &str) -> Username {
        Username::new(name).expect("valid test name")
    }

    fn envelope(label: &str) -> Envelope {
        Envelope {
            id: MessageId::random(),
            from: user("alice"),
            to: user("bob"),
            token: format!("token-{label}").into_bytes(),
        }
    }

    /// A file backend whose writes fail with "no space left" while `full` is set, like a
    /// disk that fills up and later has space again.
    #[derive(Debug)]
    struct FillingDisk {
        file: redb::backends::FileBackend,
        full: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FillingDisk {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                Err(std::io::ErrorKind::StorageFull.into())
            } else {
                Ok(())
            }
        }
    }

    type Bound = std::ops::Bound<u64>;

    impl redb::StorageBackend for FillingDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> std::io::Result<()> {
            self.file.close()
        }
        fn try_lock_range(&self, start: Bound, end: Bound) -> Result<bool, redb::BackendError> {
            self.file.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: Bound,
            end: Bound,
        ) -> Result<bool, redb::BackendError> {
            self.file.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound, end: Bound) -> Result<(), redb::BackendError> {
            self.file.lock_range(start, end)
        }
        fn lock_shared_range(&self, start: Bound, end: Bound) -> Result<(), redb::BackendError> {
            self.file.lock_shared_range(start, end)
        }
        fn unlock_range(&self, start: Bound, end: Bound) -> Result<(), redb::BackendError> {
            self.file.unlock_range(start, end)
        }
        fn query_lock_range(&self, start: Bound, end: Bound) -> Result<bool, redb::BackendError> {
            self.file.query_lock_range(start, end)
        }
    }

    /// A store on a [`FillingDisk`]: the store, the switch, and how often it was opened.
    fn store_on_filling_disk(
        path: std::path::PathBuf,
    ) -> Result<
        (
            EmbeddedStore,
            Arc<std::sync::atomic::AtomicBool>,
            Arc<std::sync::atomic::AtomicUsize>,
        ),
        StoreError,
    > {
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opens = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let opener: Opener = Box::new({
            let (full, opens) = (Arc::clone(&full), Arc::clone(&opens));
            move || {
                opens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                let backend = FillingDisk {
                    file: redb::backends::FileBackend::new(file)?,
                    full: Arc::clone(&full),
                };
                redb::Builder::new().create_with_backend(backend)
            }
        });
        let store = EmbeddedStore::open_with(opener, MailLimits::default())?;
        Ok((store, full, opens))
    }

    /// Deposits `message` until the store takes it again after a full disk (bounded).
    async fn deposit_once_recovered(
        store: &EmbeddedStore,
        message: &Envelope,
    ) -> Result<DepositOutcome, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match store.deposit(message, 3_000).await {
                Err(StoreError::StorageFull(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                other => return other,
            }
        }
    }

    /// Regression (issue 8): after a write failed on a full disk, redb refused every later
    /// write until reopened, so a server kept failing deposits after space was freed. Now
    /// the failing deposit says "the disk is full", the store reopens itself once there is
    /// space, and nothing stored before is lost or duplicated; in-memory state survives.
    #[tokio::test]
    async fn a_full_disk_is_recovered_from_without_a_restart()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (store, full, _) = store_on_filling_disk(dir.path().join("store.redb"))?;
        let stored: Vec<_> = (0..3).map(|n| envelope(&n.to_string())).collect();
        for message in &stored {
            assert_eq!(store.deposit(message, 1_000).await?, DepositOutcome::Stored);
        }
        let presence = Presence {
            user: user("bob"),
            session: 7,
            addresses: Vec::new(),
            last_seen_ms: 1_000,
            expires_at_ms: 60_000,
        };
        store.set_presence(&presence).await?;
        let mut events = store.subscribe();

        full.store(true, std::sync::atomic::Ordering::SeqCst);
        let while_full = envelope("while full");
        for _ in 0..3 {
            let error = store
                .deposit(&while_full, 2_000)
                .await
                .expect_err("disk is full");
            assert!(matches!(error, StoreError::StorageFull(_)), "{error}");
        }

        full.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            deposit_once_recovered(&store, &while_full).await?,
            DepositOutcome::Stored
        );
        assert_eq!(
            store.deposit(&while_full, 3_000).await?,
            DepositOutcome::Duplicate
        );
        let bob = user("bob");
        let fetched = store.fetch(&bob, 10, usize::MAX, 4_000).await?;
        let got: Vec<_> = fetched.mail.iter().map(|m| m.envelope.id).collect();
        let expected: Vec<_> = stored.iter().chain([&while_full]).map(|m| m.id).collect();
        assert_eq!(got, expected, "every message once, in deposit order");
        assert_eq!(store.mail_count(&bob).await?, 4);
        let acked: Vec<_> = expected
            .iter()
            .map(|&id| MailRef {
                from: user("alice"),
                id,
            })
            .collect();
        assert_eq!(store.ack(&bob, &acked).await?, 4);
        assert_eq!(store.presence(&bob).await?, Some(presence));
        store
            .publish(&Broadcast::MailWaiting { user: bob.clone() })
            .await?;
        assert_eq!(events.recv().await?, Broadcast::MailWaiting { user: bob });
        Ok(())
    }

    /// A value that no longer decodes (written behind the store's back) is skipped and
    /// quarantined; the mail around it is still delivered, and counts stay right.
    #[tokio::test]
    async fn undecodable_mail_is_skipped_and_quarantined() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path().join("store.redb"), MailLimits::default())?;
        let sent: Vec<_> = (0..3).map(|n| envelope(&n.to_string())).collect();
        for message in &sent {
            store.deposit(message, 1_000).await?;
        }
        {
            // Sequence 1 is the middle message.
            let txn = store.inner.db.current().expect("open").begin_write()?;
            txn.open_table(MAIL)?
                .insert(("bob", 1), (&sent[1].id.0, &b"\xff\xffgarbage"[..]))?;
            txn.commit()?;
        }
        let bob = user("bob");
        let fetched = store.fetch(&bob, 10, usize::MAX, 2_000).await?;
        let got: Vec<_> = fetched.mail.iter().map(|m| m.envelope.id).collect();
        assert_eq!(got, vec![sent[0].id, sent[2].id]);
        assert_eq!(fetched.remaining, 0);
        assert_eq!(store.mail_count(&bob).await?, 2);
        let txn = store.inner.db.current().expect("open").begin_read()?;
        assert_eq!(txn.open_table(QUARANTINE)?.len()?, 1);
        Ok(())
    }

    /// Regression: a fetch reads expired mail in one transaction and deletes it in a later
    /// one; mail acked in between was counted as removed twice, so the mailbox's count
    /// dropped below its real size, and at zero the id index of the live mail was swept:
    /// that mail could then never be acked (delivered again and again) nor de-duplicated.
    #[tokio::test]
    async fn mail_acked_while_a_fetch_expires_it_is_not_counted_twice()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path().join("store.redb"), MailLimits::default())?;
        let (old, live) = (envelope("old"), envelope("live"));
        store.deposit(&old, 1_000).await?;
        store.deposit(&live, 2_000).await?;
        // A fetch found `old` (sequence 0) expired; before it deletes it, the ack lands.
        assert_eq!(store.ack(&user("bob"), &[MailRef::of(&old)]).await?, 1);
        let db = store.inner.db.current().expect("open");
        let txn = db.begin_write()?;
        let expired = Removal {
            sequence: 0,
            id: old.id.0,
            quarantine: None,
        };
        remove_mail(&txn, &user("bob"), &[expired])?;
        txn.commit()?;
        assert_eq!(store.mail_count(&user("bob")).await?, 1);
        assert_eq!(store.ack(&user("bob"), &[MailRef::of(&live)]).await?, 1);
        Ok(())
    }
}
