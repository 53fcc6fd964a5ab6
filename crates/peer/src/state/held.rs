//! Mail kept sealed here: held under a changed key until `trust`, or dated ahead until
//! its time comes.

use super::*;

impl State {
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
}
