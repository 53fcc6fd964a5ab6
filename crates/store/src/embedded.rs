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
//! | `mail` | (user, sequence) | (message id, [`StoredMail`] wire-encoded) |
//! | `mail_ids` | (user, message id) | sequence |
//! | `mailboxes` | user | (message count, next sequence) |
//! | `blocks` (multimap) | user | blocked user |
//! | `quarantine` | (user, sequence) | (message id, undecodable bytes) |
//!
//! The per-user sequence orders a mailbox in deposit order (ids are random, times can tie);
//! `mail_ids` makes deposits idempotent and acks a point lookup; `mailboxes` makes the cap
//! check O(1). The message id sits beside the encoded mail, so even a value that no longer
//! decodes can be moved to `quarantine` (for an operator to inspect) together with its id.
//!
//! # Blocking and durability
//!
//! redb transactions block the calling thread (a durable commit waits for `fsync`), so every
//! operation runs on Tokio's blocking pool via [`tokio::task::spawn_blocking`]; a drain does
//! one read transaction per fetched batch and one write transaction per acked batch, never
//! one per message. Deposits, bindings and block-list changes commit durably. Acks commit
//! durably too: an ack lost in a crash would only bring the mail back, which at-least-once
//! allows, but the fsync per batch is cheap enough that we do not trade it away.
//!
//! **Architecture Invariant:** values are (de)serialised only through [`proto::wire`].

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use proto::{Envelope, MessageId, Username, wire};
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition, WriteTransaction,
};
use tokio::sync::broadcast;

use crate::{
    BindOutcome, Binding, Broadcast, DepositOutcome, Fetched, MailLimits, Presence, StoreError,
    StoredMail,
    record::{decode_binding, encode, is_expired},
};

/// Name → wire-encoded [`Binding`].
const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("bindings");
/// A mail table: (user, sequence) → (message id, stored bytes).
type MailTable = TableDefinition<'static, (&'static str, u64), (&'static [u8; 16], &'static [u8])>;

/// (user, sequence) → (message id, wire-encoded [`StoredMail`]).
const MAIL: MailTable = TableDefinition::new("mail");
/// (user, message id) → sequence in `MAIL`.
const MAIL_IDS: TableDefinition<(&str, &[u8; 16]), u64> = TableDefinition::new("mail_ids");
/// User → (messages in the mailbox, next sequence number).
const MAILBOXES: TableDefinition<&str, (u64, u64)> = TableDefinition::new("mailboxes");
/// User → the users they block.
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
    db: Database,
    limits: MailLimits,
    /// Presence by user; a std mutex, never held across an `.await`. A `BTreeMap` so the
    /// online list comes out sorted by name.
    presence: Mutex<BTreeMap<Username, Presence>>,
    events: broadcast::Sender<Broadcast>,
}

/// What a deposit transaction decided, before it is turned into the public result.
enum DepositDecision {
    Stored,
    Duplicate,
    Blocked,
    Full,
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
    pub fn open(path: impl AsRef<Path>, limits: MailLimits) -> Result<Self, StoreError> {
        let db = Database::create(path.as_ref()).map_err(embedded_error)?;
        // Create every table once, so read transactions never meet a missing table.
        let txn = db.begin_write().map_err(embedded_error)?;
        create_tables(&txn).map_err(embedded_error)?;
        txn.commit().map_err(embedded_error)?;
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                limits,
                presence: Mutex::new(BTreeMap::new()),
                events,
            }),
        })
    }

    /// The limits this store applies.
    pub fn limits(&self) -> MailLimits {
        self.inner.limits
    }

    /// Runs `work` on the blocking pool with the shared state.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|error| StoreError::Embedded(format!("store task failed: {error}")))?
    }

    /// See [`crate::Store::bind`].
    pub async fn bind(&self, binding: &Binding) -> Result<BindOutcome, StoreError> {
        let binding = binding.clone();
        let encoded = encode(&binding)?;
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(embedded_error)?;
            let existing = {
                let mut table = txn.open_table(BINDINGS).map_err(embedded_error)?;
                let existing = table
                    .get(binding.user.as_str())
                    .map_err(embedded_error)?
                    .map(|value| value.value().to_vec());
                if existing.is_none() {
                    table
                        .insert(binding.user.as_str(), encoded.as_ref())
                        .map_err(embedded_error)?;
                }
                existing
            };
            match existing {
                Some(bytes) => Ok(BindOutcome::Existing(decode_binding(
                    &binding.user,
                    &bytes,
                )?)),
                None => {
                    txn.commit().map_err(embedded_error)?;
                    Ok(BindOutcome::Created)
                }
            }
        })
        .await
    }

    /// See [`crate::Store::binding`].
    pub async fn binding(&self, user: &Username) -> Result<Option<Binding>, StoreError> {
        let user = user.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(embedded_error)?;
            let table = txn.open_table(BINDINGS).map_err(embedded_error)?;
            let value = table.get(user.as_str()).map_err(embedded_error)?;
            value
                .map(|value| decode_binding(&user, value.value()))
                .transpose()
        })
        .await
    }

    /// See [`crate::Store::set_presence`].
    pub async fn set_presence(&self, presence: &Presence) -> Result<(), StoreError> {
        self.presence_map()
            .insert(presence.user.clone(), presence.clone());
        Ok(())
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
        let cap = self.inner.limits.cap;
        let recipient = envelope.to.clone();
        let sender = envelope.from.clone();
        let id = envelope.id.0;
        let decision = self
            .blocking(move |inner| {
                let txn = inner.db.begin_write().map_err(embedded_error)?;
                let decision = deposit_in(&txn, &recipient, &sender, &id, &encoded, cap)
                    .map_err(embedded_error)?;
                if matches!(decision, DepositDecision::Stored) {
                    txn.commit().map_err(embedded_error)?;
                }
                Ok(decision)
            })
            .await?;
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
        }
    }

    /// See [`crate::Store::fetch`]. Expired mail met on the way is deleted; mail that does
    /// not decode is logged and moved to quarantine, so neither stops the rest.
    pub async fn fetch(
        &self,
        user: &Username,
        max: usize,
        now_ms: u64,
    ) -> Result<Fetched, StoreError> {
        let user = user.clone();
        let ttl_ms = self.inner.limits.ttl_ms;
        self.blocking(move |inner| {
            let (mail, removals, count) = {
                let txn = inner.db.begin_read().map_err(embedded_error)?;
                let mailboxes = txn.open_table(MAILBOXES).map_err(embedded_error)?;
                let count = mailboxes
                    .get(user.as_str())
                    .map_err(embedded_error)?
                    .map_or(0, |value| value.value().0);
                let table = txn.open_table(MAIL).map_err(embedded_error)?;
                let mut mail = Vec::with_capacity(max.min(count as usize));
                let mut removals = Vec::new();
                let range = table
                    .range((user.as_str(), 0)..=(user.as_str(), u64::MAX))
                    .map_err(embedded_error)?;
                for entry in range {
                    if mail.len() >= max {
                        break;
                    }
                    let (key, value) = entry.map_err(embedded_error)?;
                    let (_, sequence) = key.value();
                    let (id, bytes) = value.value();
                    match wire::decode::<StoredMail>(bytes) {
                        Ok(stored) if stored.envelope.id.0 != *id => {
                            tracing::warn!(%user, sequence, "stored mail has a different id than its key; quarantined");
                            removals.push(Removal { sequence, id: *id, quarantine: Some(bytes.to_vec()) });
                        }
                        Ok(stored) if is_expired(&stored, ttl_ms, now_ms) => {
                            removals.push(Removal { sequence, id: *id, quarantine: None });
                        }
                        Ok(stored) => mail.push(stored),
                        Err(error) => {
                            tracing::warn!(%user, sequence, %error, "stored mail does not decode; quarantined");
                            removals.push(Removal { sequence, id: *id, quarantine: Some(bytes.to_vec()) });
                        }
                    }
                }
                (mail, removals, count)
            };
            let removed = removals.len() as u64;
            if !removals.is_empty() {
                let txn = inner.db.begin_write().map_err(embedded_error)?;
                remove_mail(&txn, &user, &removals).map_err(embedded_error)?;
                txn.commit().map_err(embedded_error)?;
            }
            let remaining = count.saturating_sub(removed + mail.len() as u64);
            Ok(Fetched { mail, remaining })
        })
        .await
    }

    /// See [`crate::Store::ack`]. One write transaction for the whole batch.
    pub async fn ack(&self, user: &Username, ids: &[MessageId]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let user = user.clone();
        let ids = ids.to_vec();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(embedded_error)?;
            let removed = ack_in(&txn, &user, &ids).map_err(embedded_error)?;
            if removed > 0 {
                txn.commit().map_err(embedded_error)?;
            }
            Ok(removed)
        })
        .await
    }

    /// See [`crate::Store::mail_count`].
    pub async fn mail_count(&self, user: &Username) -> Result<u64, StoreError> {
        let user = user.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(embedded_error)?;
            let mailboxes = txn.open_table(MAILBOXES).map_err(embedded_error)?;
            let count = mailboxes
                .get(user.as_str())
                .map_err(embedded_error)?
                .map_or(0, |value| value.value().0);
            Ok(count)
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
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(embedded_error)?;
            {
                let mut table = txn.open_multimap_table(BLOCKS).map_err(embedded_error)?;
                if block {
                    table.insert(user.as_str(), blocked.as_str())
                } else {
                    table.remove(user.as_str(), blocked.as_str())
                }
                .map_err(embedded_error)?;
            }
            txn.commit().map_err(embedded_error)
        })
        .await
    }

    /// See [`crate::Store::blocked_by`].
    pub async fn blocked_by(&self, user: &Username) -> Result<Vec<Username>, StoreError> {
        let user = user.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(embedded_error)?;
            let table = txn.open_multimap_table(BLOCKS).map_err(embedded_error)?;
            let mut blocked = Vec::new();
            for entry in table.get(user.as_str()).map_err(embedded_error)? {
                let entry = entry.map_err(embedded_error)?;
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

/// Opens every table in `txn`, creating the missing ones.
fn create_tables(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(BINDINGS)?;
    txn.open_table(MAIL)?;
    txn.open_table(MAIL_IDS)?;
    txn.open_table(MAILBOXES)?;
    txn.open_multimap_table(BLOCKS)?;
    txn.open_table(QUARANTINE)?;
    Ok(())
}

/// The checks and inserts of one deposit, inside `txn`.
fn deposit_in(
    txn: &WriteTransaction,
    recipient: &Username,
    sender: &Username,
    id: &[u8; 16],
    encoded: &[u8],
    cap: u64,
) -> Result<DepositDecision, redb::Error> {
    let blocks = txn.open_multimap_table(BLOCKS)?;
    for blocked in blocks.get(recipient.as_str())? {
        if blocked?.value() == sender.as_str() {
            return Ok(DepositDecision::Blocked);
        }
    }
    let mut ids = txn.open_table(MAIL_IDS)?;
    if ids.get((recipient.as_str(), id))?.is_some() {
        return Ok(DepositDecision::Duplicate);
    }
    let mut mailboxes = txn.open_table(MAILBOXES)?;
    let (count, next_sequence) = mailboxes
        .get(recipient.as_str())?
        .map_or((0, 0), |value| value.value());
    if count >= cap {
        return Ok(DepositDecision::Full);
    }
    let mut mail = txn.open_table(MAIL)?;
    mail.insert((recipient.as_str(), next_sequence), (id, encoded))?;
    ids.insert((recipient.as_str(), id), next_sequence)?;
    mailboxes.insert(recipient.as_str(), (count + 1, next_sequence + 1))?;
    Ok(DepositDecision::Stored)
}

/// Deletes the acked `ids` of `user` inside `txn`; returns how many were there.
fn ack_in(txn: &WriteTransaction, user: &Username, ids: &[MessageId]) -> Result<u64, redb::Error> {
    let mut id_table = txn.open_table(MAIL_IDS)?;
    let mut mail = txn.open_table(MAIL)?;
    let mut removed = 0;
    for id in ids {
        let sequence = id_table
            .remove((user.as_str(), &id.0))?
            .map(|value| value.value());
        if let Some(sequence) = sequence {
            mail.remove((user.as_str(), sequence))?;
            removed += 1;
        }
    }
    if removed > 0 {
        decrease_count(txn, user, removed)?;
    }
    Ok(removed)
}

/// Removes what a fetch found expired or undecodable, quarantining the latter.
fn remove_mail(
    txn: &WriteTransaction,
    user: &Username,
    removals: &[Removal],
) -> Result<(), redb::Error> {
    let mut id_table = txn.open_table(MAIL_IDS)?;
    let mut mail = txn.open_table(MAIL)?;
    let mut quarantine = txn.open_table(QUARANTINE)?;
    for removal in removals {
        mail.remove((user.as_str(), removal.sequence))?;
        id_table.remove((user.as_str(), &removal.id))?;
        if let Some(bytes) = &removal.quarantine {
            quarantine.insert(
                (user.as_str(), removal.sequence),
                (&removal.id, bytes.as_slice()),
            )?;
        }
    }
    decrease_count(txn, user, removals.len() as u64)
}

/// Lowers `user`'s message count by `by`, keeping the next sequence number.
fn decrease_count(txn: &WriteTransaction, user: &Username, by: u64) -> Result<(), redb::Error> {
    let mut mailboxes = txn.open_table(MAILBOXES)?;
    let (count, next_sequence) = mailboxes
        .get(user.as_str())?
        .map_or((0, 0), |value| value.value());
    mailboxes.insert(user.as_str(), (count.saturating_sub(by), next_sequence))?;
    Ok(())
}

/// Wraps any redb error.
fn embedded_error(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Embedded(error.into().to_string())
}
