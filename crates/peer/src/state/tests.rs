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

fn store_batch(state: &State, messages: Vec<Plaintext>, via_mailbox: bool) -> Vec<StoreOutcome> {
    store_at(state, messages, 10_000, via_mailbox)
}

/// Stores `messages` in one write at `now_ms`, with no ratchet state, and waits for it.
fn store_at(
    state: &State,
    messages: Vec<Plaintext>,
    now_ms: u64,
    via_mailbox: bool,
) -> Vec<StoreOutcome> {
    state
        .submit_incoming(messages, now_ms, via_mailbox, RatchetSave::default())
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
    assert_eq!(state.receipts_due(100, &[]).unwrap(), vec![]);
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
            .receipts_due(100, &[])
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
    let outcomes = store_at(&state, vec![request], late, true);
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
    let due = state.receipts_due(100, &[]).unwrap();
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
    let due = state.receipts_due(10_000, &[]).unwrap();
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
        state.receipts_due(100, &[]).unwrap(),
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
    let mut due = state.receipts_due(100, &[]).unwrap();
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
        state.receipts_due(100, &[]).unwrap(),
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
    assert!(state.seen_id(&message.from, &message.id).unwrap());
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
        let outcomes = store_at(&state, batch, 9_000, false);
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
        assert!(state.seen_id(&message.from, &message.id).unwrap());
    }
    // Every copy is still a duplicate after the reopen, shown or not.
    let copies = incoming.clone();
    let outcomes = store_at(&state, copies, 9_500, false);
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
        assert!(state.seen_id(&shown.from, &shown.id).unwrap());
        assert!(
            state
                .seen_id(&unshown_message.from, &unshown_message.id)
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
        .map(|m| state.seen_id(&m.from, &m.id).unwrap())
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
    assert!(!state.seen_id(&first.from, &first.id).unwrap());
    assert!(state.seen_id(&second.from, &second.id).unwrap());
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
    let outcomes = store_at(
        &state,
        vec![from_mallory.clone(), from_alice.clone(), from_alice.clone()],
        6_000,
        false,
    );
    assert!(matches!(outcomes[0], StoreOutcome::New(_)));
    assert!(matches!(outcomes[1], StoreOutcome::New(_)), "{outcomes:?}");
    assert_eq!(outcomes[2], StoreOutcome::Duplicate);
    assert!(state.seen_id(&from_alice.from, &from_alice.id).unwrap());
}

/// A layout 2 file (seen ids without their sender) opens with every seen id keyed by
/// the sender its history line names: a copy of a stored message is still a copy.
#[test]
fn layout_2_seen_ids_are_migrated_with_their_senders() {
    let dir = tempfile::tempdir().unwrap();
    let stored = plaintext("bob", "before the upgrade", 3_000);
    {
        let state = State::open(dir.path()).unwrap();
        store_at(&state, vec![stored.clone()], 3_500, false);
    }
    // Turn the file back into layout 2: the seen row without its sender.
    {
        let db = Database::create(dir.path().join(STATE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(SEEN_IDS)
            .unwrap()
            .remove((stored.from.as_str(), stored.id.0))
            .unwrap();
        txn.open_table(SEEN_V2)
            .unwrap()
            .insert((stored.sent_at_ms, stored.id.0), 3_500)
            .unwrap();
        txn.commit().unwrap();
    }
    let state = State::open(dir.path()).unwrap();
    assert!(state.seen_id(&stored.from, &stored.id).unwrap());
    let again = store_at(&state, vec![stored.clone()], 4_000, false);
    assert_eq!(again, vec![StoreOutcome::Duplicate]);
    let txn = state.db.get().unwrap().begin_read().unwrap();
    assert!(
        txn.list_tables()
            .unwrap()
            .all(|table| table.name() != SEEN_V2.name()),
        "the old table is gone"
    );
}

/// A layout 4 file (a second seen table keyed by time, and ids missing from `seen_ids`
/// for messages stored before it was written for every message) opens with every seen id
/// in `seen_ids` and without the old table: a copy of a stored message is still a copy.
#[test]
fn layout_4_seen_ids_are_moved_into_the_one_seen_table() {
    let dir = tempfile::tempdir().unwrap();
    let kept = plaintext("bob", "in both tables", 3_000);
    let only_old = plaintext("carol", "only in the old table", 3_100);
    {
        let state = State::open(dir.path()).unwrap();
        store_at(&state, vec![kept.clone(), only_old.clone()], 3_500, false);
    }
    {
        let db = Database::create(dir.path().join(STATE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(SEEN_IDS)
            .unwrap()
            .remove((only_old.from.as_str(), only_old.id.0))
            .unwrap();
        let mut old = txn.open_table(SEEN_V4).unwrap();
        for message in [&kept, &only_old] {
            old.insert(
                (message.sent_at_ms, message.id.0, message.from.as_str()),
                3_500,
            )
            .unwrap();
        }
        drop(old);
        txn.commit().unwrap();
    }
    let state = State::open(dir.path()).unwrap();
    for message in [&kept, &only_old] {
        assert!(state.seen_id(&message.from, &message.id).unwrap());
        let again = store_at(&state, vec![message.clone()], 4_000, false);
        assert_eq!(again, vec![StoreOutcome::Duplicate]);
    }
    // The copied id keeps the time its sender wrote it, so pruning still forgets it in time.
    assert_eq!(state.prune_seen(3_050, 0).wait_blocking().unwrap(), 1);
    assert!(!state.seen_id(&kept.from, &kept.id).unwrap());
    assert!(state.seen_id(&only_old.from, &only_old.id).unwrap());
    let txn = state.db.get().unwrap().begin_read().unwrap();
    assert!(
        txn.list_tables()
            .unwrap()
            .all(|table| table.name() != SEEN_V4.name()),
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

/// How often `entry` was sent again at its recipient's request, as stored.
fn resend_count(state: &State, entry: &OutboxEntry) -> Option<u8> {
    let txn = state.db.get().unwrap().begin_read().unwrap();
    let table = txn.open_table(RESENDS).unwrap();
    let key = (entry.created_ms, entry.to.as_str(), entry.id.0);
    table.get(key).unwrap().map(|count| count.value())
}

/// Stores at `now_ms` a request from `entry`'s recipient to send it again (once it has
/// left the outbox, as after each send) and returns whether it was queued again.
fn ask_again(state: &State, entry: &OutboxEntry, now_ms: u64) -> bool {
    state
        .finish_attempt(entry, &MessageStatus::Queued, false)
        .unwrap();
    let request = receipt(
        entry.to.as_str(),
        ReceiptKind::Resend,
        vec![entry.id],
        now_ms,
    );
    let outcomes = store_at(state, vec![request], now_ms, true);
    matches!(&outcomes[..], [StoreOutcome::Receipt(applied)] if !applied.messages.is_empty())
}

#[test]
fn resend_counts_are_pruned_past_the_retention_and_kept_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path()).unwrap();
    let old = state.queue_outgoing(&name("bob"), "old", 1_000).unwrap();
    let newer = state.queue_outgoing(&name("bob"), "newer", 9_000).unwrap();
    assert!(ask_again(&state, &old, 10_000));
    assert!(ask_again(&state, &newer, 10_000));
    // At the last moment a request for `old` is still honoured, its count stays.
    state
        .prune_seen(1_000 + SEEN_RETENTION_MS, SEEN_RETENTION_MS)
        .wait_blocking()
        .unwrap();
    assert_eq!(resend_count(&state, &old), Some(1));
    assert_eq!(resend_count(&state, &newer), Some(1));
    // A millisecond later no request for it can be, and its count goes.
    state
        .prune_seen(1_001 + SEEN_RETENTION_MS, SEEN_RETENTION_MS)
        .wait_blocking()
        .unwrap();
    assert_eq!(resend_count(&state, &old), None);
    assert_eq!(resend_count(&state, &newer), Some(1));
    assert!(!ask_again(&state, &old, 1_001 + SEEN_RETENTION_MS));
    // The messages themselves stay in the history.
    assert_eq!(state.history(&name("bob"), 10).unwrap().len(), 2);
}

#[test]
fn the_resend_limit_holds_within_the_retention_whatever_the_prunes() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path()).unwrap();
    let entry = state.queue_outgoing(&name("bob"), "lost", 1_000).unwrap();
    let last = 1_000 + SEEN_RETENTION_MS;
    let mut honoured = 0;
    for now in [2_000, 3_000, SEEN_RETENTION_MS / 2, last - 1, last] {
        if ask_again(&state, &entry, now) {
            honoured += 1;
        }
        // Neither the periodic prune nor one with a shorter retention forgets a count
        // still in use.
        state
            .prune_seen(now, SEEN_RETENTION_MS)
            .wait_blocking()
            .unwrap();
        state.prune_seen(now, 0).wait_blocking().unwrap();
        assert!(resend_count(&state, &entry).is_some());
    }
    assert_eq!(honoured, usize::from(MAX_RESENDS_PER_MESSAGE));
    assert_eq!(resend_count(&state, &entry), Some(MAX_RESENDS_PER_MESSAGE));
}

/// A file of layout 4 (resend counts keyed by recipient and id, with no time) opens with
/// each count keyed by its message's time: a message that reached its limit is not sent
/// again, one that did not goes only as often as it has left.
#[test]
fn a_layout_4_resend_count_is_migrated_by_its_messages_time() {
    let dir = tempfile::tempdir().unwrap();
    let (spent, once) = {
        let state = State::open(dir.path()).unwrap();
        let spent = state.queue_outgoing(&name("bob"), "spent", 1_000).unwrap();
        let once = state.queue_outgoing(&name("bob"), "once", 1_001).unwrap();
        (spent, once)
    };
    // Turn the file back into layout 4, with counts of messages in no history too.
    {
        let db = Database::create(dir.path().join(STATE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(RESENDS).unwrap();
        {
            let mut old = txn.open_table(RESENDS_V4).unwrap();
            old.insert(("bob", spent.id.0), MAX_RESENDS_PER_MESSAGE)
                .unwrap();
            old.insert(("bob", once.id.0), 1).unwrap();
            old.insert(("bob", MessageId::random().0), 1).unwrap();
            old.insert(("carol", MessageId::random().0), 2).unwrap();
        }
        txn.commit().unwrap();
    }
    let state = State::open(dir.path()).unwrap();
    assert_eq!(resend_count(&state, &spent), Some(MAX_RESENDS_PER_MESSAGE));
    assert_eq!(resend_count(&state, &once), Some(1));
    {
        let txn = state.db.get().unwrap().begin_read().unwrap();
        assert_eq!(txn.open_table(RESENDS).unwrap().len().unwrap(), 2);
        assert!(
            txn.list_tables()
                .unwrap()
                .all(|table| table.name() != RESENDS_V4.name()),
            "the old table is gone"
        );
    }
    assert!(!ask_again(&state, &spent, 10_000));
    let honoured = (0..5)
        .filter(|step| ask_again(&state, &once, 10_000 + step))
        .count();
    assert_eq!(honoured, usize::from(MAX_RESENDS_PER_MESSAGE) - 1);
    // Counts migrated are pruned like any other.
    state
        .prune_seen(1_001 + SEEN_RETENTION_MS + 1, SEEN_RETENTION_MS)
        .wait_blocking()
        .unwrap();
    assert_eq!(resend_count(&state, &spent), None);
    assert_eq!(resend_count(&state, &once), None);
}

/// Receipts due to users waiting for their retry are left out of a read, which goes on
/// past them (up to its bound), so one user's failing route never holds up the others'.
#[test]
fn receipts_due_to_users_passed_over_stay_due_and_others_are_read_past_them() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path()).unwrap();
    let owed = |user: &str, count: usize| -> Vec<(Username, MessageId)> {
        (0..count)
            .map(|_| (name(user), MessageId::random()))
            .collect()
    };
    let mut all = owed("alice", 3);
    all.extend(owed("bob", 5));
    all.extend(owed("carol", 2));
    all.extend(owed("dave", 2));
    state.submit_resends_owed(all, 1).wait_blocking().unwrap();
    let users = |due: Vec<(Username, ReceiptKind, MessageId)>| -> Vec<String> {
        due.into_iter().map(|(user, ..)| user.to_string()).collect()
    };
    assert_eq!(
        users(state.receipts_due(100, &[name("bob")]).unwrap()),
        ["alice", "alice", "alice", "carol", "carol", "dave", "dave"]
    );
    assert_eq!(
        users(
            state
                .receipts_due(4, &[name("alice"), name("carol")])
                .unwrap()
        ),
        ["bob", "bob", "bob", "bob"]
    );
    assert_eq!(
        users(
            state
                .receipts_due(100, &[name("alice"), name("bob"), name("dave")])
                .unwrap()
        ),
        ["carol", "carol"]
    );
    assert_eq!(state.receipts_due(100, &[]).unwrap().len(), 12);
}
