//! Pins, blocks and mutes: whom this client trusts, refuses and keeps quiet.

use super::*;

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

impl State {
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
}
