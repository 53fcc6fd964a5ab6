//! A kept link, pipelined: batches sealed under one lock each, sent as soon as their ratchet
//! key allows, answered by id; on failure every unanswered message goes back to the front
//! of the queue, in order (see the module docs of [`crate::outgoing`]).

use std::collections::VecDeque;

use proto::{ErrorCode, ErrorReply};
use tokio::{sync::mpsc, time::Instant};

use super::{
    Job,
    report::{Done, finish},
    window::Window,
};
use crate::{
    api::DeliveryStatus,
    context::Context,
    delivery,
    link::{LinkError, PeerLink, WINDOW},
    sessions::{RatchetError, Saving},
    state::{OutboxEntry, StateError},
};

/// Why a kept link was given up (its unacked messages take the full route).
#[derive(Debug, thiserror::Error)]
pub(super) enum LinkEnded {
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
pub(super) async fn pipeline(
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
pub(super) struct DurableKeys(VecDeque<[u8; 32]>);

/// How many durable ratchet keys a recipient's task remembers.
const DURABLE_KEYS: usize = 4;

impl DurableKeys {
    fn contains(&self, key: Option<[u8; 32]>) -> bool {
        key.is_some_and(|key| self.0.contains(&key))
    }

    pub(super) fn insert(&mut self, key: Option<[u8; 32]>) {
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
