//! Messages: the outbox and the history of what was sent, what arrived (de-duplicated,
//! stored before it is acked), receipts and requests to send again.

use super::*;

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
    resends: &'a mut redb::Table<'txn, (u64, &'static str, [u8; 16]), u8>,
}

/// The oldest time a sent message may have been written at for a request at `now_ms` to
/// send it again to be honoured: the recipient refuses anything older on arrival
/// (`crate::inbox::check`, [`SEEN_RETENTION_MS`]), so sending it again would be in vain.
fn resend_window_start(now_ms: u64) -> u64 {
    now_ms.saturating_sub(SEEN_RETENTION_MS)
}

/// Forgets how often messages written before the window of [`resend_window_start`] at
/// `now_ms` were sent again (one range delete). No request can be honoured for them any
/// more, whatever their count (`requeue_for_resend` refuses them as too old first), so
/// forgetting a count never lets a message go again past [`MAX_RESENDS_PER_MESSAGE`].
/// The bound is [`SEEN_RETENTION_MS`] itself, not a retention passed in: a shorter one
/// would drop counts still in use.
fn prune_resends(txn: &WriteTransaction, now_ms: u64) -> Result<(), StateError> {
    let mut removed = 0u64;
    txn.open_table(RESENDS)?
        .retain_in(..(resend_window_start(now_ms), "", [0; 16]), |_, _| {
            removed += 1;
            false
        })?;
    tracing::debug!(removed, "resend counts past the retention forgotten");
    Ok(())
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
        let resent_key = (line.sent_at_ms, from.as_str(), line.id.0);
        let resent = tables
            .resends
            .get(resent_key)?
            .map_or(0, |count| count.value());
        let too_old = line.sent_at_ms < resend_window_start(now_ms);
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
        tables.resends.insert(resent_key, resent + 1)?;
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

impl State {
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
    ///
    /// A lone message's ack waits for this commit alone, so when nothing else is waiting to
    /// be written it is made on the thread that awaits the ticket
    /// ([`durable::GroupWriter::submit_here`]), without the writer thread's round trip:
    /// await the ticket before anything submitted after it. A batch of several (a sender
    /// pipelining) goes to the writer thread, so its connection reads the next batch while
    /// this one commits.
    pub fn submit_incoming(
        &self,
        messages: Vec<Plaintext>,
        now_ms: u64,
        via_mailbox: bool,
        ratchet: RatchetSave,
    ) -> Ticket<Vec<StoreOutcome>> {
        let next_seq = self.next_seq.clone();
        let lone = messages.len() == 1;
        let store = move |txn: &WriteTransaction| {
            ratchet.write(txn)?;
            let mut seen_ids = txn.open_table(SEEN_IDS)?;
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
                let seen_key = (message.from.as_str(), message.id.0);
                if seen_ids.get(seen_key)?.is_some() {
                    outcomes.push(StoreOutcome::Duplicate);
                    continue;
                }
                seen_ids.insert(seen_key, message.sent_at_ms)?;
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
        };
        if lone {
            self.writer.submit_here(store)
        } else {
            self.writer.submit(store)
        }
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

    /// Whether a message of `from` with this id was stored before and not yet pruned (see
    /// the `seen_ids` table).
    pub fn seen_id(&self, from: &Username, id: &MessageId) -> Result<bool, StateError> {
        let txn = self.db.get()?.begin_read()?;
        Ok(txn
            .open_table(SEEN_IDS)?
            .get((from.as_str(), id.0))?
            .is_some())
    }

    /// Forgets the ids of messages written more than `retention_ms` before `now_ms`.
    /// Messages that old are refused on arrival, so forgetting their ids cannot let a copy
    /// in. The table is keyed for lookups by sender and id, so this reads it whole: it runs
    /// at each start and once a day (`core::PRUNE_EVERY`), where a pass over some hundred
    /// thousand ids is a few tens of milliseconds, and keeps every message's commit to one
    /// seen table. In the same write, forgets the counts of requests to send again that can
    /// no longer be honoured (`prune_resends`).
    pub fn prune_seen(&self, now_ms: u64, retention_ms: u64) -> Ticket<u64> {
        let oldest_kept = now_ms.saturating_sub(retention_ms);
        self.write(move |txn| {
            prune_resends(txn, now_ms)?;
            let mut removed = 0u64;
            txn.open_table(SEEN_IDS)?.retain(|_, sent_at_ms| {
                let keep = sent_at_ms >= oldest_kept;
                removed += u64::from(!keep);
                keep
            })?;
            Ok(removed)
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

    /// Up to `max` receipts due, grouped by sender and kind (in that order), leaving out
    /// those due to the users in `pass_over` (their rows are stepped over, not read).
    pub fn receipts_due(
        &self,
        max: usize,
        pass_over: &[Username],
    ) -> Result<Vec<(Username, ReceiptKind, MessageId)>, StateError> {
        let txn = self.db.get()?.begin_read()?;
        let table = txn.open_table(RECEIPTS_DUE)?;
        let mut due = Vec::new();
        // The scan goes on after every row of the last user passed over.
        let mut after: Option<String> = None;
        loop {
            let rows = match &after {
                None => table.iter()?,
                Some(user) => table.range::<(&str, u8, [u8; 16])>((
                    std::ops::Bound::Excluded((user.as_str(), u8::MAX, [0xff; 16])),
                    std::ops::Bound::Unbounded,
                ))?,
            };
            let mut passed_over = None;
            for row in rows {
                if due.len() >= max {
                    break;
                }
                let (key, _) = row?;
                let (user, kind, id) = key.value();
                if pass_over.iter().any(|passed| passed.as_str() == user) {
                    passed_over = Some(user.to_owned());
                    break;
                }
                // Only valid names and kinds are ever written; a row that is not one is
                // skipped.
                if let (Ok(user), Some(kind)) = (Username::new(user), receipt_kind_of_key(kind)) {
                    due.push((user, kind, MessageId(id)));
                }
            }
            match passed_over {
                Some(user) => after = Some(user),
                None => return Ok(due),
            }
        }
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
