//! Receipts: a recipient tells a sender that it stored (delivered) or showed (read) the
//! sender's messages, sealed through the same Olm session as any message; or asks the
//! sender to send again messages that did not open because the session they were sealed
//! in is lost here (a request to send again, [`ReceiptKind::Resend`]).
//!
//! A request to send again is owed like a receipt (durable in the same table, batched,
//! de-duplicated; at most [`crate::state::MAX_RESENDS_OWED_PER_PEER`] ids per peer) but is
//! always sealed in a new session, started from a one-time or fallback key claimed at the
//! server like any first message. Its sender, on storing it, queues again the messages it
//! names that were sent to the requester, with their ids, in their order, each a bounded
//! number of times ([`crate::state::MAX_RESENDS_PER_MESSAGE`]); they are then sealed in
//! the newest session (the one the request started) and sent by the normal route.
//!
//! A receipt is a [`proto::Receipt`] inside a sealed [`proto::Plaintext`] (see
//! [`proto::seal`] for the encoding): the envelope carries it like a message, direct first
//! and then the mailbox, so the server cannot tell the two apart beyond their size. A
//! receipt names up to [`proto::seal::MAX_RECEIPT_IDS`] messages, so a drained mailbox of a
//! thousand messages is answered by a few receipts, not a thousand.
//!
//! What is owed is durable: [`crate::state`] makes a delivered receipt due in the commit
//! that stores mail, and a read receipt in the commit that marks a message shown (when
//! read receipts are on, [`crate::Config::read_receipts`]). [`send_due`] sends what is due,
//! grouped by sender and kind ([`batches`]), and forgets each batch once it is delivered
//! or queued, or can never go; what could not go now stays due for the next run (the core
//! runs it after each mail fetch, after held mail is opened again, each mark of shown
//! messages, on registration and on the slow timer).
//!
//! Retries back off per user: a run reports to whom it left receipts due
//! ([`crate::core::ReceiptRun`]), and the core's retry schedule (`ReceiptRetry` in
//! `core/receipt_retry.rs`, in memory) has the next runs pass those users over (their rows
//! stay due, unread) for 5 s after the first failed run, then 10 s, 20 s and so on, doubling
//! up to 10 minutes, when a run of its own tries them again; a run that leaves nothing due
//! to a user starts them over at 5 s. A registration (the server back) or a `trust` of the
//! user tries them at once. Nothing is forgotten on a failure: a receipt leaves
//! `receipts_due` only once it went (delivered or queued) or can never go.
//!
//! Rules for the sender of the messages, applied when a receipt is stored
//! ([`crate::state::State::submit_incoming`]): only lines of messages sent to the
//! receipt's sender change (a peer cannot move another conversation's status), an id the
//! history does not have is ignored, and a status only moves forward ([`upgrade`]:
//! pending, queued or failed → delivered → read); a late send result never moves it back
//! ([`settled`]). A receipt is never stored as a message, never shown, never counted as
//! unread, and never answered by a receipt.

use proto::{MessageId, Receipt, ReceiptKind, Request, Username, seal::MAX_RECEIPT_IDS};

use crate::{
    api::{ClientError, DeliveryStatus},
    context::Context,
    core::ReceiptRun,
    delivery::{Dialled, after_deposit, after_dial, claim_prekey, direct_addresses},
    link::PeerLink,
};

/// The most receipts due read by one run of [`send_due`]; more are sent by the next run,
/// which the run asks for.
pub(crate) const MAX_DUE_PER_RUN: usize = 16 * MAX_RECEIPT_IDS;

/// Receipts due, as read from the state (grouped by sender, then kind), as receipts of at
/// most [`MAX_RECEIPT_IDS`] ids each, one sender and kind each.
pub(crate) fn batches(due: Vec<(Username, ReceiptKind, MessageId)>) -> Vec<(Username, Receipt)> {
    let mut batches: Vec<(Username, Receipt)> = Vec::new();
    for (to, kind, id) in due {
        match batches.last_mut() {
            Some((last_to, receipt))
                if last_to == &to
                    && receipt.kind == kind
                    && receipt.ids.len() < MAX_RECEIPT_IDS =>
            {
                receipt.ids.push(id);
            }
            _ => batches.push((
                to,
                Receipt {
                    kind,
                    ids: vec![id],
                },
            )),
        }
    }
    batches
}

/// What became of one receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Delivered or queued: no longer due.
    Done,
    /// It can never go (the user is gone, no session, refused): no longer due.
    Dropped,
    /// Not now (the server unreachable, the peer's key changed until `trust`): still due.
    Later,
}

/// What a receipt's route ended with means for what is due: the same route as a message
/// ([`crate::delivery`]), and a receipt kept due where a message would stay in the outbox.
pub(crate) fn after_route(status: &DeliveryStatus) -> Sent {
    match status {
        DeliveryStatus::Delivered | DeliveryStatus::Queued { .. } => Sent::Done,
        DeliveryStatus::Failed {
            will_retry: true, ..
        } => Sent::Later,
        DeliveryStatus::Failed { .. } => Sent::Dropped,
    }
}

/// Sends the receipts due (up to [`MAX_DUE_PER_RUN`]) except those to the users in
/// `pass_over` (waiting for their retry), forgetting each batch that went or can never go.
/// Returns whether more may be due than were read, and to whom it left receipts due.
pub(crate) async fn send_due(context: &Context, pass_over: &[Username]) -> ReceiptRun {
    let mut run = ReceiptRun::default();
    let due = match context.state.receipts_due(MAX_DUE_PER_RUN, pass_over) {
        Ok(due) => due,
        Err(error) => {
            tracing::warn!(%error, "cannot read the receipts due");
            return run;
        }
    };
    run.more = due.len() == MAX_DUE_PER_RUN;
    // Peers a request to send again started a new session with in this run: the next
    // batch of requests goes in that one (one claimed key a run, not one a batch).
    let mut started: std::collections::HashSet<Username> = std::collections::HashSet::new();
    for (to, receipt) in batches(due) {
        let new_session = receipt.kind == ReceiptKind::Resend && !started.contains(&to);
        let sent = send(context, &to, &receipt, new_session).await;
        if new_session && sent == Sent::Done {
            started.insert(to.clone());
        }
        tracing::debug!(%to, kind = ?receipt.kind, ids = receipt.ids.len(), ?sent, "receipt");
        run.tried(&to, sent == Sent::Later);
        if sent == Sent::Later {
            continue;
        }
        if let Err(error) = context
            .state
            .forget_receipts(&to, receipt.kind, receipt.ids)
            .await
        {
            tracing::warn!(%error, "cannot forget a receipt sent");
            run.more = false;
            return run;
        }
    }
    run
}

/// Seals `receipt` to `to` in the session their messages came by (in a new one started
/// from a claimed key with `new_session`) and sends it by the
/// route of a message: direct to an advertised address, else `to`'s mailbox. Only to keys
/// pinned here (the receipt answers messages that opened under them) and still the
/// server's: after a key change it waits for `trust`. Never to a user blocked since.
async fn send(context: &Context, to: &Username, receipt: &Receipt, new_session: bool) -> Sent {
    let state = &context.state;
    let pinned = match (state.pinned(to), state.is_blocked(to)) {
        (Ok(Some(pinned)), Ok(false)) => pinned,
        // Nobody to answer: keys never pinned (no message of theirs opened here), or a
        // sender blocked since.
        (Ok(None), _) | (_, Ok(true)) => return Sent::Dropped,
        (Err(_), _) | (_, Err(_)) => return Sent::Later,
    };
    let info = match context.lookup(to).await {
        Ok(info) => info,
        Err(ClientError::UnknownUser(_)) => return Sent::Dropped,
        Err(_) => return Sent::Later,
    };
    if info.keys != pinned {
        return Sent::Later;
    }
    // A request to send again answers messages of a session lost here: with
    // `new_session` it starts a new one, which the sender then seals them again in.
    match context.ratchet.has_session(state, to) {
        Ok(true) if !new_session => {}
        // No session may seal (reset, or retired after an unclean stop): start one from a
        // claimed key, as a message would, so a receipt owed across a crash still goes.
        Ok(_) => {
            let bundle = match claim_prekey(context, to).await {
                Ok(bundle) => bundle,
                Err(status) => return after_route(&status),
            };
            if let Err(error) = context.ratchet.start(state, to, &pinned, &bundle) {
                tracing::warn!(%to, %error, "cannot start a session for a receipt");
                return Sent::Dropped;
            }
        }
        Err(_) => return Sent::Later,
    }
    let sealed = context.ratchet.seal_receipt(
        state,
        to,
        MessageId::random(),
        receipt.clone(),
        proto::now_ms(),
    );
    let (envelope, mut saving) = match sealed {
        Ok(sealed) => sealed,
        Err(error) => {
            tracing::warn!(%to, %error, "cannot seal a receipt");
            return Sent::Dropped;
        }
    };
    // The envelope leaves only once the session state that sealed it is durable.
    if context.ratchet.settle(state, &mut saving).await.is_err() {
        return Sent::Later;
    }
    for addr in direct_addresses(&info) {
        let attempt = async {
            let mut link = PeerLink::dial(
                *addr,
                &context.identity,
                &context.me,
                to,
                &pinned,
                context.config.connect_timeout,
            )
            .await?;
            link.send(&envelope, context.config.ack_timeout).await
        };
        match after_dial(&attempt.await) {
            Dialled::Delivered => return Sent::Done,
            Dialled::NextAddress => {}
            Dialled::Mailbox => break,
            Dialled::NewSession => return Sent::Dropped,
            Dialled::Failed(status) => return after_route(&status),
        }
    }
    let deposited = context.control.request(Request::Deposit { envelope }).await;
    after_route(&after_deposit(deposited))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::FailureReason;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[test]
    fn receipts_due_go_in_batches_of_one_sender_and_kind_and_bounded_size() {
        let (bob, carol) = (name("bob"), name("carol"));
        let mut due = Vec::new();
        for _ in 0..(MAX_RECEIPT_IDS + 3) {
            due.push((bob.clone(), ReceiptKind::Delivered, MessageId::random()));
        }
        due.push((bob.clone(), ReceiptKind::Read, MessageId::random()));
        due.push((carol.clone(), ReceiptKind::Delivered, MessageId::random()));
        let batches = batches(due);
        let shape: Vec<(&str, ReceiptKind, usize)> = batches
            .iter()
            .map(|(to, receipt)| (to.as_str(), receipt.kind, receipt.ids.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("bob", ReceiptKind::Delivered, MAX_RECEIPT_IDS),
                ("bob", ReceiptKind::Delivered, 3),
                ("bob", ReceiptKind::Read, 1),
                ("carol", ReceiptKind::Delivered, 1),
            ]
        );
    }

    #[test]
    fn a_receipt_stays_due_while_its_route_would_keep_a_message_for_a_retry() {
        assert_eq!(after_route(&DeliveryStatus::Delivered), Sent::Done);
        assert_eq!(
            after_route(&DeliveryStatus::Queued {
                recipient_online: false
            }),
            Sent::Done
        );
        assert_eq!(
            after_route(&DeliveryStatus::failed(FailureReason::NoPreKeys, true)),
            Sent::Later
        );
        assert_eq!(
            after_route(&DeliveryStatus::failed(FailureReason::UnknownUser, false)),
            Sent::Dropped
        );
    }
}
