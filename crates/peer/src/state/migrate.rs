//! Layout migrations, run once at open in the transaction that opens the tables.

use super::*;

/// Whether the file has a table named `name` (an old layout's, to migrate).
fn has_table(txn: &WriteTransaction, name: &str) -> Result<bool, StateError> {
    Ok(txn.list_tables()?.any(|table| table.name() == name))
}

/// Copies layout 1's id-keyed `outbox`, `seen` and `unshown` tables (if the file has them)
/// into the sequence- and time-keyed tables, then deletes them, all in `txn`: a crash
/// leaves the file wholly in one layout. Outbox and unshown records carry their sequence.
/// A layout 1 seen row has only the time it was stored; the time its sender wrote it is on
/// the message's incoming history line (stored in the same commit, never removed), so the
/// history is read once to key each seen id as a copy of the message will be looked up.
pub(super) fn migrate_layout_1(txn: &WriteTransaction) -> Result<(), StateError> {
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

/// Copies layouts 3 and 4's time-keyed seen ids (`seen_by_sender`, if the file has it) into
/// `seen_ids` where that has no row for the sender and id (older files wrote the second
/// table only for ratchet messages), then deletes it, all in `txn`.
pub(super) fn migrate_seen_v4(txn: &WriteTransaction) -> Result<(), StateError> {
    if !has_table(txn, SEEN_V4.name())? {
        return Ok(());
    }
    let mut copied = 0u64;
    {
        let mut seen_ids = txn.open_table(SEEN_IDS)?;
        for row in txn.open_table(SEEN_V4)?.iter()? {
            let (key, _) = row?;
            let (sent_at_ms, id, sender) = key.value();
            if seen_ids.get((sender, id))?.is_none() {
                seen_ids.insert((sender, id), sent_at_ms)?;
                copied += 1;
            }
        }
    }
    txn.delete_table(SEEN_V4)?;
    tracing::info!(
        copied,
        "state file migrated to layout 5 (one seen table, keyed by sender and id)"
    );
    Ok(())
}

/// Moves held mail keyed by id alone (`held`) to `held_by_sender`, keyed by its sender and
/// id (each held value is the whole envelope, sender included), and deletes the old table.
pub(super) fn migrate_held(txn: &WriteTransaction) -> Result<(), StateError> {
    if !has_table(txn, HELD_V3.name())? {
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

/// Copies layout 2's seen ids (keyed by the time the sender wrote the message and its id)
/// into the table keyed by its sender too, then deletes the old table, all in `txn`. Two
/// senders may use one id: keyed without the sender, a message from one could make the
/// other's, with the same id and millisecond, pass for a copy and vanish. A seen row has no
/// sender; the message's incoming history line (stored in the same commit, never removed)
/// names it, so the history is read once.
pub(super) fn migrate_layout_2(txn: &WriteTransaction) -> Result<(), StateError> {
    if !has_table(txn, SEEN_V2.name())? {
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
        let mut seen = txn.open_table(SEEN_V4)?;
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

/// Moves layout 4's resend counts (`resends`: (recipient, id) → count, with no time, so
/// never pruned) to `resends_by_sent_at`, keyed by the time the message was written, read
/// from its outgoing history line, then deletes the old table. A count already in the new
/// table (a newer build's, from before a downgrade) is merged by keeping the higher. A
/// count whose message has no outgoing line that decodes is dropped: a request to send
/// again only ever finds messages by those lines, so it would never be read.
pub(super) fn migrate_resends(txn: &WriteTransaction) -> Result<(), StateError> {
    if !has_table(txn, RESENDS_V4.name())? {
        return Ok(());
    }
    let mut counts: HashMap<(String, [u8; 16]), u8> = HashMap::new();
    for row in txn.open_table(RESENDS_V4)?.iter()? {
        let (key, count) = row?;
        let (peer, id) = key.value();
        counts.insert((peer.to_owned(), id), count.value());
    }
    let peers: std::collections::BTreeSet<String> =
        counts.keys().map(|(peer, _)| peer.clone()).collect();
    let mut moved = 0u64;
    {
        let history = txn.open_table(HISTORY)?;
        let mut resends = txn.open_table(RESENDS)?;
        for peer in &peers {
            for row in history.range((peer.as_str(), 0)..=(peer.as_str(), u64::MAX))? {
                let (_, bytes) = row?;
                let Ok(line) = decode::<HistoryEntry>("history", bytes.value()) else {
                    continue;
                };
                if line.direction != Direction::Outgoing {
                    continue;
                }
                if let Some(count) = counts.remove(&(peer.clone(), line.id.0)) {
                    let key = (line.sent_at_ms, peer.as_str(), line.id.0);
                    let kept = resends.get(key)?.map_or(0, |count| count.value());
                    resends.insert(key, count.max(kept))?;
                    moved += 1;
                }
            }
        }
    }
    txn.delete_table(RESENDS_V4)?;
    tracing::info!(
        moved,
        dropped = counts.len(),
        "state file migrated to layout 5 (resend counts keyed by their message's time)"
    );
    Ok(())
}
