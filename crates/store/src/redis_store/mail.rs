//! Mailboxes: deposit, fetch, ack, expiry of the head of a full mailbox, and block lists.

use proto::{Envelope, MailRef, Username, wire};

use super::{
    RedisStore,
    keys::{MailKeys, mail_key, parse_names, user_key},
    scripts::{DEPOSIT, DEPOSIT_FULL, DEPOSIT_FULL_BYTES, DEPOSIT_SOURCE, FETCH, REMOVE},
};
use crate::{
    DepositOutcome, Fetched, StoreError, StoredMail,
    record::{Batch, STORED_MAIL_OVERHEAD, encode, is_expired},
};

/// The most entries [`RedisStore::expire_head`] reads in one round trip...
const EXPIRE_CHUNK_MAX: usize = 512;
/// ...and about the most bytes of them.
const EXPIRE_READ_BUDGET: usize = 256 * 1024;

/// Mailbox keys expire (garbage collection only) this long after their TTL.
const MAIL_GC_MARGIN_MS: u64 = 24 * 60 * 60 * 1000;

/// One mailbox entry a fetch found it must remove (or, from an older layout, move).
struct Removal {
    /// Its mail key.
    key: Vec<u8>,
    action: RemovalAction,
}

/// What [`REMOVE`] does with one entry.
enum RemovalAction {
    /// Delete it (acked, expired, or a key without a value).
    Delete,
    /// Move its value, which does not decode, to quarantine.
    Quarantine,
    /// Move it from its old-layout key to this mail key.
    Migrate(Vec<u8>),
}

/// The fetch script's answer: mailbox size, ids, values (`None` where missing).
type FetchReply = (u64, Vec<Vec<u8>>, Vec<Option<Vec<u8>>>);

/// What a fetch does with one mailbox entry.
enum Entry {
    /// Deliver it; `true` when its key is of the old layout (the id alone), to migrate.
    Keep(StoredMail, bool),
    /// Remove it (delete or quarantine).
    Remove(RemovalAction),
}

/// Decides about one fetched entry under mail key `key`, logging anything wrong with it.
fn classify(
    user: &Username,
    key: &[u8],
    value: Option<Vec<u8>>,
    ttl_ms: u64,
    now_ms: u64,
) -> Entry {
    let Some(bytes) = value else {
        tracing::warn!(%user, key = ?key, "mail key without a value; dropped from the mailbox");
        return Entry::Remove(RemovalAction::Delete);
    };
    match wire::decode::<StoredMail>(&bytes) {
        Ok(stored) if is_expired(&stored, ttl_ms, now_ms) => Entry::Remove(RemovalAction::Delete),
        Ok(stored) if key == mail_key(&stored.envelope.from, &stored.envelope.id) => {
            Entry::Keep(stored, false)
        }
        Ok(stored) if key == stored.envelope.id.0.as_slice() => Entry::Keep(stored, true),
        Ok(_) => {
            tracing::warn!(%user, key = ?key, "stored mail has another sender or id than its key; quarantined");
            Entry::Remove(RemovalAction::Quarantine)
        }
        Err(error) => {
            tracing::warn!(%user, key = ?key, %error, "stored mail does not decode; quarantined");
            Entry::Remove(RemovalAction::Quarantine)
        }
    }
}

impl RedisStore {
    /// See [`crate::Store::deposit`].
    pub async fn deposit(
        &self,
        envelope: &Envelope,
        now_ms: u64,
    ) -> Result<DepositOutcome, StoreError> {
        let limits = self.inner.limits;
        let keys = MailKeys::new(&envelope.to);
        let value = encode(&StoredMail {
            envelope: envelope.clone(),
            deposited_at_ms: now_ms,
        })?;
        let cap = limits.cap.to_string();
        let max_bytes = limits.max_bytes.to_string();
        let gc_ms = limits.ttl_ms.saturating_add(MAIL_GC_MARGIN_MS).to_string();
        let key = mail_key(&envelope.from, &envelope.id);
        let script_keys = [
            keys.order.as_str(),
            &keys.data,
            &keys.sequence,
            &keys.blocked,
            &keys.bytes,
        ];
        let script_args = [
            key.as_slice(),
            envelope.from.as_str().as_bytes(),
            value.as_ref(),
            cap.as_bytes(),
            gc_ms.as_bytes(),
            max_bytes.as_bytes(),
        ];
        let deposit_once = || {
            self.invoke_replicated::<i64>(
                "deposit",
                &DEPOSIT,
                DEPOSIT_SOURCE,
                &script_keys,
                &script_args,
            )
        };
        let mut outcome = deposit_once().await?;
        // Full: expired mail may be what fills it (its recipient has not fetched since).
        // Drop it from the head and try once more; the script checks the cap again
        // atomically, so a race with other deposits can only make this retry say "full".
        if (outcome == DEPOSIT_FULL || outcome == DEPOSIT_FULL_BYTES)
            && self.expire_head(&envelope.to, &keys, now_ms).await? > 0
        {
            outcome = deposit_once().await?;
        }
        match outcome {
            1 => Ok(DepositOutcome::Stored),
            0 => Ok(DepositOutcome::Duplicate),
            -1 => Err(StoreError::Blocked {
                recipient: envelope.to.clone(),
                sender: envelope.from.clone(),
            }),
            DEPOSIT_FULL => Err(StoreError::MailboxFull {
                user: envelope.to.clone(),
                cap: limits.cap,
            }),
            DEPOSIT_FULL_BYTES => Err(StoreError::MailboxBytesFull {
                user: envelope.to.clone(),
                max_bytes: limits.max_bytes,
            }),
            other => Err(StoreError::Corrupt {
                key: keys.order,
                reason: format!("deposit script answered {other}"),
            }),
        }
    }

    /// See [`crate::Store::fetch`]. One round trip per batch, reading only about the
    /// batch's byte budget; expired mail met on the way is deleted and undecodable mail
    /// quarantined (one more round trip, only when there is some), and the batch is topped
    /// up from behind them.
    pub async fn fetch(
        &self,
        user: &Username,
        max: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<Fetched, StoreError> {
        let keys = MailKeys::new(user);
        let ttl_ms = self.inner.limits.ttl_ms;
        if max == 0 {
            let remaining = self.mail_count(user).await?;
            return Ok(Fetched {
                mail: Vec::new(),
                remaining,
            });
        }
        let mut batch = Batch::new(max, max_bytes);
        loop {
            // Mail kept so far still sits at ranks 0..batch.len(); read on from behind it.
            let (total, ids, values) = self
                .read_mail(&keys, batch.len(), max - 1, batch.bytes_left())
                .await?;
            let (mut removals, mut migrations) = (Vec::new(), Vec::new());
            // The script answers one value per id; a missing one reads as a missing value.
            let mut values = values.into_iter();
            for key in ids {
                match classify(user, &key, values.next().flatten(), ttl_ms, now_ms) {
                    Entry::Keep(stored, migrate) => {
                        let new_key =
                            migrate.then(|| mail_key(&stored.envelope.from, &stored.envelope.id));
                        if !batch.offer(stored) {
                            break;
                        }
                        if let Some(new_key) = new_key {
                            migrations.push(Removal {
                                key,
                                action: RemovalAction::Migrate(new_key),
                            });
                        }
                    }
                    Entry::Remove(action) => removals.push(Removal { key, action }),
                }
            }
            let removed = removals.len() as u64;
            if !removals.is_empty() || !migrations.is_empty() {
                // Migrations keep their entries' ranks; only removals make room to read on.
                removals.append(&mut migrations);
                self.remove_mail(&keys, &removals).await?;
            }
            let remaining = total.saturating_sub(removed + batch.len() as u64);
            let more_behind = (batch.len() as u64 + removed) < total;
            if removed == 0 || batch.is_full() || !more_behind {
                return Ok(Fetched {
                    mail: batch.into_mail(),
                    remaining,
                });
            }
        }
    }

    /// Deletes the expired mail at the head of `user`'s mailbox, oldest first, up to the
    /// first message that has not expired; returns how many entries it took out. It reads
    /// the head as a fetch does (undecodable entries met on the way are quarantined, as a
    /// fetch would) in growing chunks from one entry, so a mailbox full of live mail costs
    /// one small read per refused deposit.
    async fn expire_head(
        &self,
        user: &Username,
        keys: &MailKeys,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let ttl_ms = self.inner.limits.ttl_ms;
        let mut chunk = 1;
        let mut removed = 0;
        loop {
            // Everything removed so far is gone, so the head is always rank 0.
            let (total, ids, values) = self
                .read_mail(keys, 0, chunk - 1, EXPIRE_READ_BUDGET)
                .await?;
            let read = ids.len();
            let mut removals = Vec::new();
            let mut values = values.into_iter();
            for key in ids {
                match classify(user, &key, values.next().flatten(), ttl_ms, now_ms) {
                    Entry::Keep(..) => break,
                    Entry::Remove(action) => removals.push(Removal { key, action }),
                }
            }
            let reached_live_mail = removals.len() < read;
            if !removals.is_empty() {
                self.remove_mail(keys, &removals).await?;
                removed += removals.len() as u64;
            }
            if reached_live_mail || read as u64 >= total {
                return Ok(removed);
            }
            chunk = (chunk * 8).min(EXPIRE_CHUNK_MAX);
        }
    }

    /// One [`FETCH`] call: the mailbox size and the entries from rank `first` on, up to
    /// rank `last` or until about `max_bytes` of envelopes are read.
    async fn read_mail(
        &self,
        keys: &MailKeys,
        first: usize,
        last: usize,
        max_bytes: usize,
    ) -> Result<FetchReply, StoreError> {
        let (first, last) = (first.to_string(), last.to_string());
        let (budget, overhead) = (max_bytes.to_string(), STORED_MAIL_OVERHEAD.to_string());
        self.invoke(
            "fetch",
            &FETCH,
            &[&keys.order, &keys.data],
            &[
                first.as_bytes(),
                last.as_bytes(),
                budget.as_bytes(),
                overhead.as_bytes(),
            ],
        )
        .await
    }

    /// Deletes expired entries, moves undecodable ones to quarantine and old-layout ones to
    /// their mail keys, in one [`REMOVE`] call; returns how many entries it deleted.
    async fn remove_mail(&self, keys: &MailKeys, removals: &[Removal]) -> Result<u64, StoreError> {
        let gc_ms = self
            .inner
            .limits
            .ttl_ms
            .saturating_add(MAIL_GC_MARGIN_MS)
            .to_string();
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + 3 * removals.len());
        args.push(gc_ms.as_bytes());
        for removal in removals {
            let (action, extra): (&[u8], &[u8]) = match &removal.action {
                RemovalAction::Delete => (b"d", b""),
                RemovalAction::Quarantine => (b"q", b""),
                RemovalAction::Migrate(new_key) => (b"m", new_key),
            };
            args.extend([action, removal.key.as_slice(), extra]);
        }
        self.invoke(
            "remove mail",
            &REMOVE,
            &[&keys.order, &keys.data, &keys.bytes, &keys.quarantine],
            &args,
        )
        .await
    }

    /// See [`crate::Store::ack`]. One [`REMOVE`] call for the whole batch, which gives the
    /// acked bytes back to the byte cap in the same step.
    pub async fn ack(&self, user: &Username, mail: &[MailRef]) -> Result<u64, StoreError> {
        if mail.is_empty() {
            return Ok(0);
        }
        let removals: Vec<Removal> = mail
            .iter()
            .map(|acked| Removal {
                key: mail_key(&acked.from, &acked.id),
                action: RemovalAction::Delete,
            })
            .collect();
        self.remove_mail(&MailKeys::new(user), &removals).await
    }

    /// See [`crate::Store::mail_count`].
    pub async fn mail_count(&self, user: &Username) -> Result<u64, StoreError> {
        self.query(
            "mail_count",
            redis::cmd("ZCARD").arg(user_key(user, "mail")),
        )
        .await
    }

    /// See [`crate::Store::block`].
    pub async fn block(&self, user: &Username, blocked: &Username) -> Result<(), StoreError> {
        self.query(
            "block",
            redis::cmd("SADD")
                .arg(user_key(user, "blocked"))
                .arg(blocked.as_str()),
        )
        .await
    }

    /// See [`crate::Store::unblock`].
    pub async fn unblock(&self, user: &Username, blocked: &Username) -> Result<(), StoreError> {
        self.query(
            "unblock",
            redis::cmd("SREM")
                .arg(user_key(user, "blocked"))
                .arg(blocked.as_str()),
        )
        .await
    }

    /// See [`crate::Store::blocked_by`].
    pub async fn blocked_by(&self, user: &Username) -> Result<Vec<Username>, StoreError> {
        let key = user_key(user, "blocked");
        let names: Vec<String> = self
            .query("blocked_by", redis::cmd("SMEMBERS").arg(&key))
            .await?;
        let mut users = parse_names(names, &key);
        users.sort();
        Ok(users)
    }
}
