use std::net::SocketAddr;

use proto::MessageId;

use super::*;
use crate::state::ReceiptApplied;

fn name(text: &str) -> Username {
    Username::new(text).unwrap()
}

fn lift(restriction: Restriction, user: &str, reply: ReplyId) -> Lift {
    Lift {
        restriction,
        user: name(user),
        reply,
    }
}

fn clock() -> Now {
    Now {
        at: Instant::now(),
        wall_ms: 1_000_000,
    }
}

fn later(now: Now, by: Duration) -> Now {
    Now {
        at: now.at + by,
        wall_ms: now.wall_ms + by.as_millis() as u64,
    }
}

fn core(now: Now) -> Core {
    Core::new(name("alice"), Duration::from_secs(60), true, now)
}

fn entry(to: &str, body: &str, seq: u64) -> OutboxEntry {
    OutboxEntry {
        id: MessageId::random(),
        to: name(to),
        body: body.into(),
        created_ms: 1,
        seq,
        attempts: 0,
        last_error: None,
    }
}

fn inbound(from: &str, seq: u64, while_muted: bool) -> InboundMessage {
    InboundMessage {
        id: MessageId::random(),
        from: name(from),
        body: format!("message {seq}"),
        sent_at_ms: 1,
        received_at_ms: 2,
        seq,
        while_muted,
        via_mailbox: false,
    }
}

fn drain(core: &mut Core) -> Vec<Action> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

fn online(core: &mut Core) {
    core.control(ControlEvent::Online {
        observed: SocketAddr::from(([127, 0, 0, 1], 9)),
        new_binding: false,
    });
    core.outbox_read(None, Ok(Vec::new()));
    drain(core);
}

fn enqueued(actions: &[Action]) -> Vec<MessageId> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Enqueue { entry, .. } => Some(entry.id),
            _ => None,
        })
        .collect()
}

fn receipt_runs(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|action| matches!(action, Action::SendReceipts { .. }))
        .count()
}

#[test]
fn receipts_owed_are_sent_by_one_run_at_a_time_while_online() {
    let now = clock();
    let mut core = core(now);
    drain(&mut core);
    // Offline: they stay owed (the registration sends them).
    core.report(Report::ReceiptsDue, now);
    assert_eq!(receipt_runs(&drain(&mut core)), 0);
    core.control(ControlEvent::Online {
        observed: SocketAddr::from(([127, 0, 0, 1], 9)),
        new_binding: false,
    });
    let actions = drain(&mut core);
    assert_eq!(receipt_runs(&actions), 1, "{actions:?}");
    // While a run is under way, a fetch that ends and messages marked shown ask for
    // one more run, after it.
    core.report(Report::FetchDone(Fetched::Done), now);
    core.report(Report::ReceiptsDue, now);
    assert_eq!(receipt_runs(&drain(&mut core)), 0);
    core.report(Report::ReceiptsSent(ReceiptRun::default()), now);
    assert_eq!(receipt_runs(&drain(&mut core)), 1);
    core.report(Report::ReceiptsSent(ReceiptRun::default()), now);
    assert_eq!(receipt_runs(&drain(&mut core)), 0);
    // A run that left receipts unread goes on; the slow timer retries what could not go.
    core.report(Report::ReceiptsDue, now);
    drain(&mut core);
    core.report(
        Report::ReceiptsSent(ReceiptRun {
            more: true,
            ..ReceiptRun::default()
        }),
        now,
    );
    assert_eq!(receipt_runs(&drain(&mut core)), 1);
    core.report(Report::ReceiptsSent(ReceiptRun::default()), now);
    core.timeout(later(now, Duration::from_secs(61)));
    assert_eq!(receipt_runs(&drain(&mut core)), 1);
}

/// The users each run of receipts in `actions` passes over.
fn passed_over(actions: &[Action]) -> Vec<Vec<Username>> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::SendReceipts { pass_over } => Some(pass_over.clone()),
            _ => None,
        })
        .collect()
}

/// A run of receipts that left some due to `failed` and none to `went`.
fn receipt_run(went: &[&str], failed: &[&str]) -> Report {
    Report::ReceiptsSent(ReceiptRun {
        more: false,
        went: went.iter().map(|user| name(user)).collect(),
        failed: failed.iter().map(|user| name(user)).collect(),
    })
}

#[test]
fn receipts_whose_route_fails_wait_longer_each_time_until_they_go() {
    let start = clock();
    let mut core = core(start);
    online(&mut core);
    let bob = name("bob");
    let secs = Duration::from_secs;
    // The registration's run could not reach bob: his receipts stay due, and the runs
    // before his retry pass him over.
    core.report(receipt_run(&["carol"], &["bob"]), start);
    core.report(Report::ReceiptsDue, start);
    assert_eq!(passed_over(&drain(&mut core)), [vec![bob.clone()]]);
    core.report(receipt_run(&[], &[]), start);
    // His retry comes after 5 s, then 10 s after the next failure.
    assert_eq!(core.next_deadline(start), start.at + secs(5));
    let first = later(start, secs(5));
    core.timeout(first);
    assert_eq!(passed_over(&drain(&mut core)), [vec![]]);
    core.report(receipt_run(&[], &["bob"]), first);
    assert_eq!(core.next_deadline(first), first.at + secs(10));
    core.timeout(later(first, secs(9)));
    assert_eq!(receipt_runs(&drain(&mut core)), 0);
    let second = later(first, secs(10));
    core.timeout(second);
    assert_eq!(passed_over(&drain(&mut core)), [vec![]]);
    // Once they went, the next failure waits the shortest time again.
    core.report(receipt_run(&["bob"], &[]), second);
    core.report(Report::ReceiptsDue, second);
    drain(&mut core);
    core.report(receipt_run(&[], &["bob"]), second);
    assert_eq!(core.next_deadline(second), second.at + secs(5));
    // A registration (the server back) and a `trust` of him each try him at once.
    core.control(ControlEvent::Online {
        observed: SocketAddr::from(([127, 0, 0, 1], 9)),
        new_binding: false,
    });
    assert_eq!(passed_over(&drain(&mut core)), [vec![]]);
    core.report(receipt_run(&[], &["bob"]), second);
    core.report(Report::Trusted(bob.clone()), second);
    assert_eq!(passed_over(&drain(&mut core)), [vec![]]);
}

#[test]
fn a_user_with_any_receipt_left_due_failed_the_run() {
    let (bob, carol) = (name("bob"), name("carol"));
    let mut run = ReceiptRun::default();
    run.tried(&bob, false);
    run.tried(&carol, false);
    run.tried(&bob, true);
    run.tried(&bob, false);
    run.tried(&carol, false);
    assert_eq!(run.went, vec![carol]);
    assert_eq!(run.failed, vec![bob]);
}

#[test]
fn read_receipts_follow_the_switch_and_never_go_for_a_blocked_senders_messages() {
    let now = clock();
    for read_receipts in [true, false] {
        let mut core = Core::new(name("alice"), Duration::from_secs(60), read_receipts, now);
        drain(&mut core);
        let message = inbound("bob", 1, false);
        core.command(Command::Shown {
            shown: vec![(message.id, message.seq)],
            reply: 1,
        });
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Write(Write::Shown { receipts, .. })] if *receipts == read_receipts
        ));
    }
    let mut core = core(now);
    drain(&mut core);
    core.held_read(name("bob"), Ok((vec![inbound("bob", 1, true)], true)));
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::Write(Write::Shown {
            receipts: false,
            ..
        })]
    ));
}

#[test]
fn a_receipt_is_told_only_when_it_moved_a_status_and_never_shown_as_a_message() {
    let now = clock();
    let mut core = core(now);
    drain(&mut core);
    let id = MessageId::random();
    core.report(
        Report::Receipt(ReceiptApplied {
            from: name("bob"),
            kind: proto::ReceiptKind::Delivered,
            messages: vec![(id, 5)],
        }),
        now,
    );
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::Emit(Event::Receipt { from, messages, .. })]
            if from.as_str() == "bob" && messages == &vec![(id, 5)]
    ));
    core.report(
        Report::Receipt(ReceiptApplied {
            from: name("bob"),
            kind: proto::ReceiptKind::Delivered,
            messages: Vec::new(),
        }),
        now,
    );
    assert!(drain(&mut core).is_empty());
}

#[test]
fn a_resend_request_that_queued_messages_flushes_its_senders_outbox_and_shows_nothing() {
    let now = clock();
    let mut core = core(now);
    drain(&mut core);
    let request = |messages| {
        Report::Receipt(ReceiptApplied {
            from: name("bob"),
            kind: proto::ReceiptKind::Resend,
            messages,
        })
    };
    core.report(request(vec![(MessageId::random(), 5)]), now);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::ReadOutbox(Some(user))] if user.as_str() == "bob"
    ));
    // One that queued nothing (ids not sent to bob, or sent again enough) does nothing.
    core.report(request(Vec::new()), now);
    assert!(drain(&mut core).is_empty());
}

#[test]
fn keys_used_up_by_others_are_topped_up_by_a_task() {
    let now = clock();
    let mut core = core(now);
    drain(&mut core);
    core.report(Report::KeysUsed, now);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::PublishPrekeys]
    ));
}

#[test]
fn bad_sends_are_refused_and_good_ones_recorded_in_one_write_in_order() {
    let now = clock();
    let mut core = core(now);
    let good = [entry("bob", "one", 1), entry("carol", "two", 2)];
    core.command(Command::Send {
        entry: entry("alice", "to myself", 3),
        reply: 1,
    });
    core.command(Command::Send {
        entry: entry("bob", "  ", 4),
        reply: 2,
    });
    core.command(Command::Send {
        entry: entry("bob", &"x".repeat(proto::seal::MAX_BODY_LEN + 1), 5),
        reply: 3,
    });
    core.command(Command::Send {
        entry: good[0].clone(),
        reply: 4,
    });
    core.command(Command::Send {
        entry: good[1].clone(),
        reply: 5,
    });
    core.end_turn();
    let actions = drain(&mut core);
    let refused: Vec<_> = actions
        .iter()
        .filter_map(|action| match action {
            Action::Answer(reply, Err(error)) => Some((*reply, error.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(matches!(
        actions.iter().find(|a| matches!(a, Action::Record(_))),
        Some(Action::Record(entries)) if entries == &good.to_vec()
    ));
    assert_eq!(enqueued(&actions), vec![good[0].id, good[1].id]);
}

#[test]
fn a_later_command_writes_after_the_sends_before_it() {
    let now = clock();
    let mut core = core(now);
    core.command(Command::Send {
        entry: entry("bob", "first", 1),
        reply: 1,
    });
    core.command(Command::Lift(lift(Restriction::Mute, "bob", 2)));
    let actions = drain(&mut core);
    let record = actions
        .iter()
        .position(|a| matches!(a, Action::Record(_)))
        .unwrap();
    let unmute = actions
        .iter()
        .position(|a| matches!(a, Action::Write(Write::Lift(_))))
        .unwrap();
    assert!(record < unmute);
}

#[test]
fn an_outbox_flush_passes_over_messages_in_flight_and_flushes_again_once_they_finish() {
    let now = clock();
    let mut core = core(now);
    online(&mut core);
    let first = entry("bob", "first", 1);
    core.command(Command::Send {
        entry: first.clone(),
        reply: 1,
    });
    core.end_turn();
    drain(&mut core);
    // A flush while the message is in flight does not send it again.
    core.outbox_read(None, Ok(vec![first.clone()]));
    assert!(enqueued(&drain(&mut core)).is_empty());
    // Once it finishes, bob's outbox is read again (it may have been kept for a retry).
    core.report(Report::Finished(first.id), now);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::ReadOutbox(Some(user))] if user == &name("bob")
    ));
    core.outbox_read(Some(&name("bob")), Ok(vec![first.clone()]));
    assert_eq!(enqueued(&drain(&mut core)), vec![first.id]);
}

#[test]
fn registration_fetches_mail_syncs_blocks_and_flushes_the_outbox() {
    let now = clock();
    let mut core = core(now);
    core.control(ControlEvent::Online {
        observed: SocketAddr::from(([127, 0, 0, 1], 9)),
        new_binding: true,
    });
    let actions = drain(&mut core);
    assert!(actions.iter().any(|a| matches!(a, Action::FetchMail)));
    assert!(actions.iter().any(|a| matches!(a, Action::SyncBlocks)));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::ReadOutbox(None)))
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Emit(Event::Online { .. })))
    );
    let retry = entry("bob", "kept for retry", 1);
    core.outbox_read(None, Ok(vec![retry.clone()]));
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::Enqueue { entry, reply: None }] if entry == &retry
    ));
}

#[test]
fn the_user_hears_once_that_the_server_is_gone() {
    let now = clock();
    let mut core = core(now);
    online(&mut core);
    let offline = || ControlEvent::Offline {
        reason: "closed".into(),
        retry_in: Duration::from_secs(1),
    };
    core.control(offline());
    let first = drain(&mut core);
    assert!(first.iter().any(|a| matches!(a, Action::NewLinkGeneration)));
    assert!(
        first
            .iter()
            .any(|a| matches!(a, Action::Emit(Event::Offline { .. })))
    );
    core.control(offline());
    let again = drain(&mut core);
    assert!(
        !again
            .iter()
            .any(|a| matches!(a, Action::Emit(Event::Offline { .. })))
    );
    assert!(!core.online());
}

#[test]
fn one_fetch_at_a_time_and_a_push_during_it_fetches_again_after() {
    let now = clock();
    let mut core = core(now);
    online(&mut core);
    core.report(Report::FetchDone(Fetched::Done), now);
    core.control(ControlEvent::Push(Push::MailWaiting));
    assert!(matches!(drain(&mut core).as_slice(), [Action::FetchMail]));
    core.control(ControlEvent::Push(Push::MailWaiting));
    core.control(ControlEvent::Push(Push::MailWaiting));
    assert!(drain(&mut core).is_empty(), "one fetch at a time");
    core.report(Report::FetchDone(Fetched::Done), now);
    assert!(matches!(drain(&mut core).as_slice(), [Action::FetchMail]));
    core.report(Report::FetchDone(Fetched::Done), now);
    assert!(drain(&mut core).is_empty());
}

#[test]
fn mail_left_for_later_is_fetched_again_after_a_backoff() {
    let now = clock();
    let mut core = core(now);
    online(&mut core);
    core.report(Report::FetchDone(Fetched::LeftForLater), now);
    let due = core.next_deadline(now);
    assert!(
        due > now.at && due <= now.at + FETCH_RETRY_MIN * 2,
        "{due:?}"
    );
    core.timeout(later(now, FETCH_RETRY_MIN * 2));
    assert!(
        drain(&mut core)
            .iter()
            .any(|a| matches!(a, Action::FetchMail))
    );
}

#[test]
fn the_mail_timer_fetches_and_flushes_only_when_online() {
    let now = clock();
    let mut core = core(now);
    core.timeout(later(now, Duration::from_secs(61)));
    assert!(drain(&mut core).is_empty(), "offline: nothing to do");
    online(&mut core);
    core.report(Report::FetchDone(Fetched::Done), now);
    core.timeout(later(now, Duration::from_secs(122)));
    let actions = drain(&mut core);
    assert!(actions.iter().any(|a| matches!(a, Action::FetchMail)));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::ReadOutbox(None)))
    );
}

#[test]
fn a_message_stored_while_muted_waits_for_the_end_of_the_mute() {
    let now = clock();
    let mut core = core(now);
    core.report(
        Report::Muted {
            user: name("bob"),
            until_ms: now.wall_ms + 5_000,
        },
        now,
    );
    core.report(Report::Received(inbound("bob", 1, true)), now);
    assert!(drain(&mut core).is_empty(), "held by the mute");
    let shown = inbound("carol", 2, false);
    core.report(Report::Received(shown.clone()), now);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::Emit(Event::Message(message))] if message == &shown
    ));
    // The mute's end is a deadline; at it, the mute is removed, then the held shown.
    let end = later(now, Duration::from_secs(5));
    assert!(core.next_deadline(now) <= end.at);
    core.timeout(end);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::Write(Write::EndMutes { .. })]
    ));
    core.report(
        Report::Committed(Committed::EndMutes(Ok(vec![name("bob")]))),
        end,
    );
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::ReadHeld(user)] if user == &name("bob")
    ));
    let held = vec![inbound("bob", 1, true)];
    core.held_read(name("bob"), Ok((held.clone(), false)));
    let actions = drain(&mut core);
    assert!(matches!(
        &actions[0],
        Action::Emit(Event::MuteEnded { user, held: 1 }) if user == &name("bob")
    ));
    assert!(matches!(&actions[1], Action::Emit(Event::Message(m)) if m == &held[0]));
}

#[test]
fn unmute_answers_then_shows_the_held_messages_and_an_unknown_mute_is_an_error() {
    let now = clock();
    let mut core = core(now);
    core.command(Command::Lift(lift(Restriction::Mute, "bob", 7)));
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::Write(Write::Lift(asked))] if *asked == lift(Restriction::Mute, "bob", 7)
    ));
    core.report(
        Report::Committed(Committed::Lifted {
            lift: lift(Restriction::Mute, "bob", 7),
            result: Ok(true),
        }),
        now,
    );
    let actions = drain(&mut core);
    assert!(matches!(&actions[0], Action::Answer(7, Ok(()))));
    assert!(matches!(&actions[1], Action::ReadHeld(user) if user == &name("bob")));
    core.report(
        Report::Committed(Committed::Lifted {
            lift: lift(Restriction::Mute, "carol", 8),
            result: Ok(false),
        }),
        now,
    );
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::Answer(8, Err(ClientError::NotMuted(_)))]
    ));
}

#[test]
fn messages_held_from_a_user_blocked_since_are_marked_handled_not_shown() {
    let now = clock();
    let mut core = core(now);
    let held = vec![inbound("bob", 1, true), inbound("bob", 2, true)];
    core.held_read(name("bob"), Ok((held.clone(), true)));
    let actions = drain(&mut core);
    assert!(matches!(
        actions.as_slice(),
        [Action::Write(Write::Shown {
            shown,
            reply: None,
            receipts: false
        })]
            if shown == &vec![(held[0].id, 1), (held[1].id, 2)]
    ));
}

#[test]
fn at_start_unshown_messages_are_shown_and_mutes_that_ended_released() {
    let now = clock();
    let mut core = core(now);
    let plain = inbound("carol", 1, false);
    core.start(
        now,
        vec![
            (name("bob"), now.wall_ms - 1),
            (name("dave"), now.wall_ms + 60_000),
        ],
        vec![
            plain.clone(),
            inbound("bob", 2, true),
            inbound("dave", 3, true),
            inbound("erin", 4, true),
        ],
    );
    let actions = drain(&mut core);
    assert!(matches!(
        &actions[0],
        Action::Write(Write::PruneSeen { .. })
    ));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Write(Write::EndMutes { .. })))
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Emit(Event::Message(m)) if m == &plain))
    );
    // erin's mute was ended (by unmute) before the exit: released now; bob's ended
    // meanwhile: released once its removal is durable; dave is still muted.
    let read: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::ReadHeld(user) => Some(user.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(read, vec![name("erin")]);
}

#[test]
fn unblock_is_told_to_the_server_only_when_online() {
    let now = clock();
    let mut core = core(now);
    let unblocked = |reply| {
        Report::Committed(Committed::Lifted {
            lift: lift(Restriction::Block, "bob", reply),
            result: Ok(true),
        })
    };
    core.report(unblocked(1), now);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::Answer(1, Ok(()))]
    ));
    online(&mut core);
    core.report(unblocked(2), now);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::SyncUnblock(_), Action::Answer(2, Ok(()))]
    ));
}

#[test]
fn a_recipient_gets_a_bounded_queue_and_the_rest_wait_in_order() {
    let now = clock();
    let mut core = core(now);
    let entries: Vec<_> = (0..RECIPIENT_QUEUE + 3)
        .map(|seq| entry("bob", "hi", seq as u64))
        .collect();
    core.outbox_read(None, Ok(entries.clone()));
    let handed = enqueued(&drain(&mut core));
    assert_eq!(handed.len(), RECIPIENT_QUEUE);
    for (index, entry) in entries.iter().take(3).enumerate() {
        core.report(Report::Finished(entry.id), now);
        assert_eq!(
            enqueued(&drain(&mut core)),
            vec![entries[RECIPIENT_QUEUE + index].id],
            "each finished message makes room for the next waiting one"
        );
    }
}

#[test]
fn a_recipient_idle_for_a_while_has_its_task_retired() {
    let now = clock();
    let mut core = Core::new(name("alice"), Duration::from_secs(3600), true, now);
    let message = entry("bob", "hi", 1);
    core.outbox_read(None, Ok(vec![message.clone()]));
    drain(&mut core);
    core.report(Report::Finished(message.id), now);
    drain(&mut core);
    assert_eq!(core.next_deadline(now), now.at + RECIPIENT_IDLE);
    core.timeout(later(now, RECIPIENT_IDLE));
    assert!(
        drain(&mut core)
            .iter()
            .any(|a| matches!(a, Action::Retire(user) if user == &name("bob")))
    );
}

#[test]
fn trust_sends_the_users_outbox_and_opens_the_held_mail() {
    let now = clock();
    let mut core = core(now);
    core.report(Report::Trusted(name("bob")), now);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::ReadOutbox(Some(a)), Action::ReopenHeld(b)] if a == &name("bob") && b == &name("bob")
    ));
}

fn watched(actions: &[Action]) -> Vec<Username> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Watch(users) => Some(users.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn each_registration_watches_the_contacts_less_the_blocked() {
    let now = clock();
    let mut core = core(now);
    core.contacts_read(Ok((
        vec![name("bob"), name("carol"), name("mallory")],
        vec![name("mallory")],
    )));
    for _ in 0..2 {
        core.control(ControlEvent::Online {
            observed: SocketAddr::from(([127, 0, 0, 1], 9)),
            new_binding: false,
        });
        assert_eq!(watched(&drain(&mut core)), vec![name("bob"), name("carol")]);
    }
}

#[test]
fn someone_new_written_to_is_watched_once_and_only_while_online() {
    let now = clock();
    let mut core = core(now);
    core.contacts_read(Ok((Vec::new(), Vec::new())));
    // Offline: nothing is asked now; the next registration sends the whole set.
    core.command(Command::Send {
        entry: entry("dave", "hello", 10),
        reply: 10,
    });
    core.end_turn();
    assert_eq!(watched(&drain(&mut core)), Vec::<Username>::new());
    online(&mut core);
    core.command(Command::Send {
        entry: entry("bob", "hi", 1),
        reply: 1,
    });
    core.command(Command::Send {
        entry: entry("bob", "again", 2),
        reply: 2,
    });
    core.end_turn();
    assert_eq!(watched(&drain(&mut core)), vec![name("bob")]);
    // Someone who only wrote to this user is not watched: a stranger's message does
    // not buy them this user's presence.
    core.report(Report::Received(inbound("carol", 2, false)), now);
    assert_eq!(watched(&drain(&mut core)), Vec::<Username>::new());
}

#[test]
fn a_block_unwatches_and_an_unblock_watches_again() {
    let now = clock();
    let mut core = core(now);
    core.contacts_read(Ok((vec![name("bob")], Vec::new())));
    online(&mut core);
    core.report(Report::Blocked(name("bob")), now);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [Action::Unwatch(users)] if users == &vec![name("bob")]
    ));
    // A blocked user's messages do not make them a contact again.
    core.command(Command::Send {
        entry: entry("bob", "still sending", 1),
        reply: 1,
    });
    core.end_turn();
    assert_eq!(watched(&drain(&mut core)), Vec::<Username>::new());
    core.committed(Committed::Lifted {
        lift: lift(Restriction::Block, "bob", 2),
        result: Ok(true),
    });
    assert_eq!(watched(&drain(&mut core)), vec![name("bob")]);
}

#[test]
fn contact_presence_and_another_session_become_events() {
    let now = clock();
    let mut core = core(now);
    let observed = SocketAddr::from(([192, 0, 2, 7], 4000));
    core.control(ControlEvent::Push(Push::Presence {
        user: name("bob"),
        online: true,
    }));
    core.control(ControlEvent::Push(Push::SessionElsewhere {
        observed,
        at_ms: 5,
    }));
    let actions = drain(&mut core);
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Emit(Event::Presence { user, online: true }),
            Action::Emit(Event::SessionElsewhere { observed: seen, at_ms: 5 }),
        ] if user == &name("bob") && *seen == observed
    ));
}

#[test]
fn a_server_that_refuses_watch_requests_is_not_asked_again() {
    let now = clock();
    let mut core = core(now);
    core.contacts_read(Ok((vec![name("bob")], Vec::new())));
    online(&mut core);
    core.report(Report::WatchRefused, now);
    core.control(ControlEvent::Online {
        observed: SocketAddr::from(([127, 0, 0, 1], 9)),
        new_binding: false,
    });
    core.report(Report::Received(inbound("carol", 1, false)), now);
    assert_eq!(watched(&drain(&mut core)), Vec::<Username>::new());
}

#[test]
fn a_running_client_forgets_old_seen_ids_once_a_day() {
    let now = clock();
    let mut core = core(now);
    drain(&mut core);
    assert!(core.next_deadline(now) <= now.at + PRUNE_EVERY);
    let before = later(now, PRUNE_EVERY - Duration::from_secs(1));
    core.timeout(before);
    assert!(
        !drain(&mut core)
            .iter()
            .any(|action| matches!(action, Action::Write(Write::PruneSeen { .. })))
    );
    let due = later(now, PRUNE_EVERY);
    core.timeout(due);
    let pruned: Vec<u64> = drain(&mut core)
        .into_iter()
        .filter_map(|action| match action {
            Action::Write(Write::PruneSeen { now_ms }) => Some(now_ms),
            _ => None,
        })
        .collect();
    assert_eq!(pruned, [due.wall_ms]);
    // The next one is a day later, not at once again.
    core.timeout(later(due, Duration::from_secs(1)));
    assert!(
        !drain(&mut core)
            .iter()
            .any(|action| matches!(action, Action::Write(Write::PruneSeen { .. })))
    );
    assert!(core.next_deadline(due) <= due.at + PRUNE_EVERY);
}
