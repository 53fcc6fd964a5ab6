//! Per-recipient delivery: one task per recipient sends that recipient's messages in the
//! order they were sent, pipelined over one kept [`PeerLink`].
//!
//! [`spawn`] starts the task for a recipient and returns the queue the event loop feeds
//! with [`Job`]s. The task:
//! - seals each message through the ratchet ([`crate::sessions`]); its save of the
//!   sessions shares the group commit of the message's outbox record (that record is a lazy
//!   write, [`crate::state::State::submit_outgoing`]);
//! - with no kept link, takes the full route for the oldest message ([`delivery::deliver`]:
//!   lookup, keys, dial, else the mailbox) and keeps the link it opened; after a direct
//!   attempt timed out, the next messages go straight to the mailbox for a while
//!   ([`delivery::DirectBackoff`]), so an unreachable or stalled peer costs one connect
//!   timeout per while, not one per message;
//! - with a kept link, seals up to [`WINDOW`] envelopes (saved in one write) and writes
//!   them at once, while that write is committed, when they are sealed under a ratchet key
//!   already durable here (else once the write is durable), then matches acks and refusals
//!   by id as they come (the receiver stores a batch in one commit, then acks all of it);
//!   an answer finishes its message once the save of its batch is durable. If the link
//!   fails or an ack is late, every unacked
//!   message goes back to the front of the queue, in order, and takes the full route (the
//!   receiver de-duplicates by id what it had stored already);
//! - hands each result to a second task (the reporter), so the sending task never waits on
//!   a commit. The reporter waits for the message's outbox record, then answers the sender
//!   (a message whose record is durable is safe: until its result is durable it stays in
//!   the outbox, and a retry after a crash is de-duplicated by the recipient) while it
//!   records every result waiting in one write ([`State::submit_results`]: the outbox and
//!   history); the event loop hears a message is finished once that write is durable.
//!
//! On a kept link an envelope sealed under a ratchet key whose private half is already
//! durable here leaves while its outbox record and ratchet state are being committed, so a
//! lone message waits for one `fsync` on each side, at the same time. A crash before they
//! are durable leaves the message with its recipient (if it arrived) and nothing here; the
//! send was never answered, and the next start retires the sessions whose saves may be
//! behind what left ([`crate::sessions`]), so no message key serves twice. An envelope
//! under a new key (a new session, the first message after the peer's turn) waits for its
//! save: the peer seals its answers to that key, and they must open here after a crash.
//! The full route (a new link, the mailbox) always sends only once the save is durable.
//!
//! Order: envelopes leave in queue order on one connection, and the receiver stores them in
//! arrival order, so the recipient shows them in the order sent. A retransmission after a
//! failure re-sends the unacked suffix in order.
//!
//! The parts: the task here ([`spawn`], [`Job`]); the kept link (`pipeline`: sealing in
//! batches, what may leave before its save is durable, acks and refusals); the unanswered
//! envelopes in the order sent (`window`); and the reporter (`report`).
//!
//! **Architecture Invariant:** this module never writes the state directly: results are
//! submitted to the group-commit writer and awaited by the reporter.
//!
//! [`State::submit_results`]: crate::state::State::submit_results

mod pipeline;
mod report;
mod window;

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering},
};

use proto::Username;
use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{
    pipeline::{DurableKeys, pipeline},
    report::{Done, finish, report},
};
use crate::{
    api::{ClientError, SendReport},
    context::Context,
    core::RECIPIENT_QUEUE,
    delivery,
    link::{PeerLink, WINDOW},
    state::{OutboxEntry, Ticket},
};

/// One message for a recipient's task.
pub(crate) struct Job {
    /// The outbox entry.
    pub(crate) entry: OutboxEntry,
    /// A new message's outbox record; it must be durable before the envelope leaves.
    /// `None` for a retry from the outbox (recorded long ago).
    pub(crate) recorded: Option<Ticket<()>>,
    /// Who waits for the result (`None`: a retry, reported as an event).
    pub(crate) reply: Option<oneshot::Sender<Result<SendReport, ClientError>>>,
}

/// How many finished messages may wait for the reporter: beyond it, the sending task waits.
const DONE_QUEUED: usize = WINDOW;

/// Starts the task (and its reporter) for `to`; both stop when `shutdown` is cancelled or
/// the returned queue is dropped (then the task ends once it has finished what it was
/// given). The queue holds [`RECIPIENT_QUEUE`] jobs: the core hands no more than that to
/// one task at a time, so a `try_send` to it never finds it full.
pub(crate) fn spawn(
    context: Arc<Context>,
    to: Username,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> mpsc::Sender<Job> {
    let (jobs_tx, jobs) = mpsc::channel(RECIPIENT_QUEUE);
    let (done_tx, done) = mpsc::channel(DONE_QUEUED);
    let reporter_context = context.clone();
    tracker.spawn(report(reporter_context, done));
    tracker.spawn(async move {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {}
            () = run(&context, &to, jobs, &done_tx) => {}
        }
    });
    jobs_tx
}

/// The sending task: see the module docs.
async fn run(
    context: &Context,
    to: &Username,
    mut jobs: mpsc::Receiver<Job>,
    done: &mpsc::Sender<Done>,
) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    // The kept link and the link generation it was opened in.
    let mut link: Option<(PeerLink, u64)> = None;
    // When to try the recipient directly again, and the link generation it was set in.
    let mut direct = delivery::DirectBackoff::default();
    let mut direct_generation = context.link_generation.load(Ordering::Relaxed);
    // Ratchet keys whose private halves are durable here: batches sealed under them may
    // leave before their own saves are (see [`pipeline`]).
    let mut durable_keys = DurableKeys::default();
    loop {
        if queue.is_empty() {
            match jobs.recv().await {
                Some(job) => queue.push_back(job),
                None => return,
            }
        }
        let generation = context.link_generation.load(Ordering::Relaxed);
        // A link from before a reconnect may point where the peer no longer is.
        match link
            .take()
            .filter(|(_, opened_in)| *opened_in == generation)
        {
            Some((mut kept, opened_in)) => {
                match pipeline(
                    context,
                    &mut kept,
                    &mut queue,
                    &mut jobs,
                    done,
                    &mut durable_keys,
                )
                .await
                {
                    Ok(()) => link = Some((kept, opened_in)),
                    Err(reason) => {
                        tracing::debug!(%to, %reason, "kept link failed; unacked messages take the full route");
                    }
                }
            }
            None => {
                let Some(job) = queue.pop_front() else {
                    continue;
                };
                // After a reconnect the recipient may be reachable again.
                if direct_generation != generation {
                    direct.reset();
                    direct_generation = generation;
                }
                let try_direct = direct.allowed(std::time::Instant::now());
                let (status, opened, direct_failed) =
                    delivery::deliver(context, &job.entry, try_direct).await;
                if direct_failed {
                    direct.failed(std::time::Instant::now());
                } else if opened.is_some() {
                    direct.reset();
                }
                finish(job, status, done).await;
                link = opened.map(|(opened, key)| {
                    durable_keys.insert(key);
                    (opened, generation)
                });
            }
        }
    }
}
