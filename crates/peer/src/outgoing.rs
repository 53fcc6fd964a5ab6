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
//! **Architecture Invariant:** this module never writes the state directly: results are
//! submitted to the group-commit writer and awaited by the reporter.
//!
//! [`State::submit_results`]: crate::state::State::submit_results

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::{StreamExt, stream::FuturesOrdered};
use proto::{ErrorCode, ErrorReply, Username};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{ClientError, DeliveryStatus, Event, SendReport},
    context::Context,
    core::{RECIPIENT_QUEUE, Report},
    delivery,
    link::{LinkError, PeerLink, WINDOW},
    sessions::{RatchetError, Saving},
    state::{AttemptResult, OutboxEntry, StateError, Ticket},
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

/// A finished message on its way to the reporter, which records its result before
/// answering.
struct Done {
    job: Job,
    status: DeliveryStatus,
}

/// The most results the reporter records in one write.
const MAX_RESULTS_PER_WRITE: usize = 4096;

/// Why a kept link was given up (its unacked messages take the full route).
#[derive(Debug, thiserror::Error)]
enum LinkEnded {
    /// Sending or receiving failed, or an ack was late.
    #[error(transparent)]
    Link(LinkError),
    /// The recipient cannot take messages now (its server link or disk is down).
    #[error("the peer cannot take messages now: {0}")]
    PeerUnavailable(ErrorReply),
    /// The recipient refused the whole link.
    #[error("refused by the peer: {0}")]
    Refused(ErrorReply),
    /// The peer has no session that opens our messages (it lost it).
    #[error("the peer has no session for our messages: {0}")]
    NoSession(ErrorReply),
    /// The sessions' state could not be read or saved.
    #[error(transparent)]
    State(StateError),
    /// The messages could not be sealed.
    #[error(transparent)]
    Seal(RatchetError),
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

/// Drives `link` pipelined until the queue is empty and every sent envelope is answered
/// (`Ok`), or the link fails (`Err`, with every unacked message back at the front of the
/// queue, in order).
///
/// A batch is sealed, its save of the sessions submitted, and it leaves at once if it was
/// sealed under a ratchet key whose private half is already durable here (the key of an
/// earlier batch whose save is durable): then a crash can lose only how far the chain went,
/// and the next start retires the session ([`crate::sessions`]). A batch under a new key (a
/// new session, or the first message after the peer's turn) waits until its save is
/// durable, since the peer's answers will be sealed to that key and must open here. An
/// answer finishes its message only once its batch's save is durable, so *delivered*
/// always means the recipient stored it and this client's ratchet state is on disk.
async fn pipeline(
    context: &Context,
    link: &mut PeerLink,
    queue: &mut VecDeque<Job>,
    jobs: &mut mpsc::Receiver<Job>,
    done: &mpsc::Sender<Done>,
    durable_keys: &mut DurableKeys,
) -> Result<(), LinkEnded> {
    let state = &context.state;
    let ack_timeout = context.config.ack_timeout;
    let mut in_flight = Window::default();
    // Batches sealed and not sent yet (they wait for a save), oldest first.
    let mut unsent: VecDeque<Sealed> = VecDeque::new();
    let mut unsent_count = 0;
    // The saves not yet settled, oldest first, with their batch and its ratchet key.
    let mut saving: VecDeque<Pending> = VecDeque::new();
    let mut batches = Batches::default();
    let mut jobs_open = true;
    let result = 'link: loop {
        // Seal what the window allows in one go (its state saved by one write). While two
        // saves are still being committed, the next batch waits and grows meanwhile: each
        // seal costs a save of the sessions, so fewer, larger batches cost less.
        let mut batch: Vec<Job> = Vec::new();
        while saving.len() < SEALED_BATCHES && in_flight.len() + unsent_count + batch.len() < WINDOW
        {
            match queue.pop_front() {
                Some(job) => batch.push(job),
                None => match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                },
            }
        }
        if !batch.is_empty() {
            let entries: Vec<&OutboxEntry> = batch.iter().map(|job| &job.entry).collect();
            let (envelopes, save) = match context.ratchet.seal(state, link.peer(), &entries) {
                Ok(sealed) => sealed,
                Err(error) => {
                    put_back(queue, batch);
                    break Err(LinkEnded::Seal(error));
                }
            };
            // One seal, under the lock: one session, one chain, one key for the batch.
            let key = envelopes.first().and_then(proto::ratchet::ratchet_key);
            let number = batches.sealed();
            saving.push_back(Pending { number, key, save });
            unsent_count += batch.len();
            unsent.push_back(Sealed {
                number,
                key,
                jobs: batch,
                envelopes,
            });
        }
        // What may leave leaves, in order, in one flush.
        let mut fed = false;
        while unsent
            .front()
            .is_some_and(|sealed| batches.may_send(sealed.number, sealed.key, durable_keys))
        {
            let Some(Sealed {
                number,
                jobs: batch,
                envelopes,
                ..
            }) = unsent.pop_front()
            else {
                break;
            };
            unsent_count -= batch.len();
            let mut batch = batch.into_iter();
            for envelope in envelopes {
                let Some(job) = batch.next() else { break };
                if let Err(error) = link.feed(envelope).await {
                    put_back(queue, std::iter::once(job).chain(batch).collect());
                    break 'link Err(LinkEnded::Link(error));
                }
                in_flight.push(job, Instant::now(), number);
            }
            fed = true;
        }
        if fed && let Err(error) = link.flush().await {
            break Err(LinkEnded::Link(error));
        }
        let deadline = in_flight.deadline(ack_timeout);
        if deadline.is_none() && saving.is_empty() && unsent.is_empty() {
            break Ok(());
        }
        let window_open = in_flight.len() + unsent_count < WINDOW;
        tokio::select! {
            biased;
            saved = settle_first(context, &mut saving) => {
                let Some(Pending { number, key, .. }) = saving.pop_front() else {
                    continue;
                };
                batches.finish_through(number, done).await;
                match saved {
                    Ok(()) => {
                        batches.saved(number);
                        durable_keys.insert(key);
                    }
                    // Its envelopes never left, and may not now: the sessions that sealed
                    // them are read again (retired). They go again by the full route.
                    Err(error) if unsent.front().is_some_and(|sealed| sealed.number <= number) => {
                        break Err(LinkEnded::State(error));
                    }
                    Err(_) => {}
                }
            }
            answer = link.next_answer() => match answer {
                Ok((id, outcome)) => {
                    // An answer to nothing in flight is a late one from before: skip it.
                    let Some((index, job, number)) = in_flight.take(&id) else {
                        continue;
                    };
                    match outcome {
                        Ok(()) => batches.finish(number, job, DeliveryStatus::Delivered, done).await,
                        // The recipient cannot take it now (its server link or disk is
                        // down): the full route falls back to the mailbox.
                        Err(error) if error.code == ErrorCode::Unavailable => {
                            in_flight.put_back(index, job, Instant::now(), number);
                            break Err(LinkEnded::PeerUnavailable(error));
                        }
                        // The recipient lost its session: everything unanswered goes
                        // again, by the full route, in a new session.
                        Err(error) if error.code == ErrorCode::NoSession => {
                            in_flight.put_back(index, job, Instant::now(), number);
                            if let Err(error) = context.ratchet.reset(state, link.peer()) {
                                break Err(LinkEnded::State(error));
                            }
                            break Err(LinkEnded::NoSession(error));
                        }
                        Err(error) => batches.finish(number, job, delivery::rejected(error), done).await,
                    }
                }
                // The whole link is refused (blocked): every message on it is.
                Err(LinkError::Rejected(error)) => {
                    for (job, number) in in_flight.drain() {
                        batches.finish(number, job, delivery::rejected(error.clone()), done).await;
                    }
                    break Err(LinkEnded::Refused(error));
                }
                Err(error) => break Err(LinkEnded::Link(error)),
            },
            job = jobs.recv(), if jobs_open && window_open => match job {
                Some(job) => queue.push_back(job),
                None => jobs_open = false,
            },
            () = sleep_until(deadline) => {
                break Err(LinkEnded::Link(LinkError::Timeout(ack_timeout)));
            }
        }
    };
    if result.is_err() {
        // Sealed but not sent go back first, then what was sent and not answered goes
        // before them, in the order sent.
        while let Some(Sealed { jobs: batch, .. }) = unsent.pop_back() {
            put_back(queue, batch);
        }
        in_flight.requeue(queue);
    }
    // The answered messages of batches whose saves are still being committed finish once
    // they are durable.
    while let Some(Pending {
        number, mut save, ..
    }) = saving.pop_front()
    {
        let _ = context.ratchet.settle(state, &mut save).await;
        batches.finish_through(number, done).await;
    }
    result
}

/// How many batches may be sealed while their saves are still being committed.
const SEALED_BATCHES: usize = 2;

/// A batch sealed and not sent yet.
struct Sealed {
    number: u64,
    /// The ratchet key it was sealed under.
    key: Option<[u8; 32]>,
    jobs: Vec<Job>,
    envelopes: Vec<proto::Envelope>,
}

/// A batch's save of the sessions, not yet settled.
struct Pending {
    number: u64,
    key: Option<[u8; 32]>,
    save: Saving<()>,
}

/// The batches of a kept link: numbered as sealed; which saves are durable, and so which
/// ratchet keys are kept here for good; and the answered messages of batches whose save is
/// not durable yet, held until it is.
#[derive(Default)]
struct Batches {
    last_sealed: u64,
    /// Every batch up to this one had its save settled.
    settled_through: u64,
    /// Every batch up to this one had its save durable (none failed).
    saved_through: u64,
    held: VecDeque<(u64, Job, DeliveryStatus)>,
}

/// Ratchet keys sealed under by batches whose saves are durable, so their private halves
/// are kept here for good (the newest few: one is in use at a time).
#[derive(Default)]
struct DurableKeys(VecDeque<[u8; 32]>);

/// How many durable ratchet keys a recipient's task remembers.
const DURABLE_KEYS: usize = 4;

impl DurableKeys {
    fn contains(&self, key: Option<[u8; 32]>) -> bool {
        key.is_some_and(|key| self.0.contains(&key))
    }

    fn insert(&mut self, key: Option<[u8; 32]>) {
        if let Some(key) = key
            && !self.0.contains(&key)
        {
            if self.0.len() == DURABLE_KEYS {
                self.0.pop_front();
            }
            self.0.push_back(key);
        }
    }
}

impl Batches {
    /// Numbers a new batch.
    fn sealed(&mut self) -> u64 {
        self.last_sealed += 1;
        self.last_sealed
    }

    /// Whether batch `number`, sealed under `key`, may leave now (see [`pipeline`]).
    fn may_send(&self, number: u64, key: Option<[u8; 32]>, durable: &DurableKeys) -> bool {
        number <= self.saved_through || durable.contains(key)
    }

    /// Batch `number`'s save is durable.
    fn saved(&mut self, number: u64) {
        if self.saved_through + 1 == number {
            self.saved_through = number;
        }
    }

    /// Finishes `job` of batch `number` now if its save is settled, else once it is.
    async fn finish(
        &mut self,
        number: u64,
        job: Job,
        status: DeliveryStatus,
        done: &mpsc::Sender<Done>,
    ) {
        if number <= self.settled_through {
            finish(job, status, done).await;
        } else {
            self.held.push_back((number, job, status));
        }
    }

    /// The save of batch `number` is settled (those before it were): finishes what waited
    /// for it. A save that failed changes nothing here: its envelopes left and were
    /// answered, and the sessions it carried are retired ([`crate::sessions`]).
    async fn finish_through(&mut self, number: u64, done: &mpsc::Sender<Done>) {
        self.settled_through = self.settled_through.max(number);
        while let Some((held, ..)) = self.held.front() {
            if *held > self.settled_through {
                break;
            }
            if let Some((_, job, status)) = self.held.pop_front() {
                finish(job, status, done).await;
            }
        }
    }
}

/// Waits until the oldest save is settled (forever when there is none). Cancel-safe: the
/// save stays queued until this returns.
async fn settle_first(context: &Context, saving: &mut VecDeque<Pending>) -> Result<(), StateError> {
    match saving.front_mut() {
        Some(first) => {
            context
                .ratchet
                .settle(&context.state, &mut first.save)
                .await
        }
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline` (forever when there is none).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Puts `jobs` back at the front of the queue, in their order.
fn put_back(queue: &mut VecDeque<Job>, jobs: Vec<Job>) {
    for job in jobs.into_iter().rev() {
        queue.push_front(job);
    }
}

/// The envelopes sent on a kept link and not yet answered, oldest first, each with when it
/// was sent. Answers may come in any order; whatever is still unanswered when the link
/// fails goes back to the front of the queue in the order it was sent, so the recipient
/// still gets a recipient's messages in the order they were written.
#[derive(Default)]
struct Window {
    /// Each message, when it was sent, and the batch it was sealed in.
    sent: VecDeque<(Job, Instant, u64)>,
}

impl Window {
    /// How many envelopes wait for answers.
    fn len(&self) -> usize {
        self.sent.len()
    }

    fn push(&mut self, job: Job, at: Instant, batch: u64) {
        self.sent.push_back((job, at, batch));
    }

    /// The message `id` answered, its place and its batch (`None`: a late answer to
    /// nothing here).
    fn take(&mut self, id: &proto::MessageId) -> Option<(usize, Job, u64)> {
        let index = self.sent.iter().position(|(job, ..)| &job.entry.id == id)?;
        self.sent
            .remove(index)
            .map(|(job, _, batch)| (index, job, batch))
    }

    /// Puts back a message taken at `index` (its answer means it must go again).
    fn put_back(&mut self, index: usize, job: Job, at: Instant, batch: u64) {
        self.sent
            .insert(index.min(self.sent.len()), (job, at, batch));
    }

    /// When the oldest unanswered message's ack is late.
    fn deadline(&self, ack_timeout: Duration) -> Option<Instant> {
        self.sent.front().map(|(_, at, _)| *at + ack_timeout)
    }

    /// Every unanswered message with its batch, oldest first (the whole link was refused).
    fn drain(&mut self) -> impl Iterator<Item = (Job, u64)> + '_ {
        self.sent.drain(..).map(|(job, _, batch)| (job, batch))
    }

    /// Puts every unanswered message back at the front of `queue`, in the order sent.
    fn requeue(&mut self, queue: &mut VecDeque<Job>) {
        while let Some((job, ..)) = self.sent.pop_back() {
            queue.push_front(job);
        }
    }
}

/// Hands the result of `job` to the reporter, which records it.
async fn finish(job: Job, status: DeliveryStatus, done: &mpsc::Sender<Done>) {
    let _ = done.send(Done { job, status }).await;
}

/// The reporter: see the module docs. Batches are handled in order; a batch's senders are
/// answered as soon as their outbox records are durable, while its results are still being
/// committed (`recording`), and the event loop hears a message is finished only once its
/// result is durable, so an outbox flush never sends it again meanwhile.
async fn report(context: Arc<Context>, mut done: mpsc::Receiver<Done>) {
    let mut batch: Vec<Done> = Vec::new();
    let mut recording = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = recording.next(), if !recording.is_empty() => {}
            received = done.recv_many(&mut batch, MAX_RESULTS_PER_WRITE) => {
                if received == 0 {
                    break;
                }
                let finishing = record(context.clone(), std::mem::take(&mut batch)).await;
                recording.push_back(finishing);
            }
        }
    }
    while recording.next().await.is_some() {}
}

/// Waits for the outbox records of `batch`, submits its results in one write, answers the
/// senders whose records are durable, and returns the future that finishes the batch once
/// the results are durable.
async fn record(context: Arc<Context>, batch: Vec<Done>) -> impl Future<Output = ()> {
    let mut finished = Vec::with_capacity(batch.len());
    for Done { mut job, status } in batch {
        let record = match job.recorded.take() {
            Some(ticket) => ticket.await.err(),
            None => None,
        };
        finished.push((job, status, record));
    }
    let attempts = finished
        .iter()
        .map(|(job, status, _)| {
            let (status, keep) = status.to_history();
            AttemptResult {
                entry: job.entry.clone(),
                status,
                keep,
            }
        })
        .collect();
    let results = context.state.submit_results(attempts);
    // A message whose record is durable is safe whatever happens to its result: until the
    // result is durable the message stays in the outbox, and a retry after a crash is
    // de-duplicated by the recipient. So its sender hears the result now.
    let mut waiting = Vec::new();
    for (job, status, record) in finished {
        match record {
            None => {
                let id = job.entry.id;
                answer(&context, job, Ok(status)).await;
                waiting.push((id, None));
            }
            Some(error) => waiting.push((job.entry.id, Some((job, status, error)))),
        }
    }
    async move {
        let results = match results.await {
            Ok(results) => results.into_iter().map(|result| result.err()).collect(),
            Err(error) => {
                context.report_state_error(error).await;
                Vec::new()
            }
        };
        let mut results = results.into_iter();
        for (id, unrecorded) in waiting {
            let result_error = results.next().flatten();
            match unrecorded {
                None => {
                    if let Some(error) = result_error {
                        context.report_state_error(error).await;
                    }
                }
                Some((job, status, record_error)) => {
                    answer_unrecorded(&context, job, status, record_error, result_error).await;
                }
            }
            context.report(Report::Finished(id)).await;
        }
    }
}

/// Answers the sender of a message whose outbox record could not be written (it left
/// anyway, while the record was being committed). Delivered or queued, the message is
/// safe with its recipient; the user hears that this client's history lacks it. Failed,
/// it is kept for a retry only if its result could be written (that write puts it back in
/// the outbox); otherwise the sender gets the error, as nothing holds the message now.
async fn answer_unrecorded(
    context: &Context,
    job: Job,
    status: DeliveryStatus,
    record_error: StateError,
    result_error: Option<StateError>,
) {
    if status.is_success() || result_error.is_none() {
        context.report_state_error(record_error).await;
        answer(context, job, Ok(status)).await;
    } else {
        answer(context, job, Err(record_error)).await;
    }
}

/// Tells whoever waits for `job` its result: the sender of a new message, or (a retry from
/// the outbox) the user, by an event.
async fn answer(context: &Context, job: Job, result: Result<DeliveryStatus, StateError>) {
    let (id, to) = (job.entry.id, job.entry.to);
    match (job.reply, result) {
        (Some(reply), Ok(status)) => {
            let _ = reply.send(Ok(SendReport { id, to, status }));
        }
        (Some(reply), Err(error)) => {
            let _ = reply.send(Err(error.into()));
        }
        // Failures that will be retried again are not reported: they would only repeat the
        // same line at every reconnect.
        (
            None,
            Ok(DeliveryStatus::Failed {
                will_retry: true, ..
            }),
        ) => {}
        (None, Ok(status)) => context.notify(Event::Delivery { id, to, status }).await,
        (None, Err(error)) => context.report_state_error(error).await,
    }
}

#[cfg(test)]
mod tests {
    use proto::MessageId;

    use super::*;

    fn job(seq: u64) -> Job {
        Job {
            entry: OutboxEntry {
                id: MessageId::random(),
                to: Username::new("bob").unwrap(),
                body: format!("message {seq}"),
                created_ms: 1,
                seq,
                attempts: 0,
                last_error: None,
            },
            recorded: None,
            reply: None,
        }
    }

    fn seqs(queue: &VecDeque<Job>) -> Vec<u64> {
        queue.iter().map(|job| job.entry.seq).collect()
    }

    #[test]
    fn after_a_failure_the_unanswered_go_first_in_the_order_sent() {
        let now = Instant::now();
        let mut window = Window::default();
        let jobs: Vec<Job> = (1..=5).map(job).collect();
        let ids: Vec<_> = jobs.iter().map(|job| job.entry.id).collect();
        for job in jobs {
            window.push(job, now, 1);
        }
        // Answers come out of order; a late answer to nothing here is skipped.
        assert_eq!(
            window.take(&ids[2]).map(|(_, job, _)| job.entry.seq),
            Some(3)
        );
        assert!(window.take(&MessageId::random()).is_none());
        assert_eq!(
            window.take(&ids[0]).map(|(_, job, _)| job.entry.seq),
            Some(1)
        );
        let mut queue: VecDeque<Job> = [job(6), job(7)].into();
        window.requeue(&mut queue);
        assert_eq!(seqs(&queue), vec![2, 4, 5, 6, 7]);
    }

    #[test]
    fn a_message_put_back_keeps_its_place() {
        let now = Instant::now();
        let mut window = Window::default();
        let jobs: Vec<Job> = (1..=3).map(job).collect();
        let second = jobs[1].entry.id;
        for job in jobs {
            window.push(job, now, 1);
        }
        let (index, taken, batch) = window.take(&second).unwrap();
        window.put_back(index, taken, now, batch);
        let mut queue = VecDeque::new();
        window.requeue(&mut queue);
        assert_eq!(seqs(&queue), vec![1, 2, 3]);
    }

    #[test]
    fn the_oldest_unanswered_message_sets_the_ack_deadline() {
        let start = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut window = Window::default();
        assert_eq!(window.deadline(timeout), None);
        window.push(job(1), start, 1);
        window.push(job(2), start + Duration::from_secs(1), 1);
        assert_eq!(window.deadline(timeout), Some(start + timeout));
        assert_eq!(window.len(), 2);
    }
}
