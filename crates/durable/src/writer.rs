//! [`GroupWriter`]: one thread makes every write durable, many writes per `fsync`.
//!
//! A redb write transaction with [`redb::Durability::Immediate`] (the default) ends in an
//! `fsync`, which costs milliseconds on a real disk; one commit per write would bound a
//! process at a few hundred writes a second. So writes are not run by their callers:
//! [`GroupWriter::submit`] hands a job (a closure over the transaction) to a dedicated
//! thread and returns a [`Ticket`]. The thread takes every job waiting (up to a maximum),
//! runs them in one transaction in the order they were submitted, commits once, and only
//! then answers each ticket. A ticket therefore resolves only once its write is durable,
//! exactly as if it had committed alone. [`GroupWriter::submit_shared`] is the same for a
//! job made on behalf of several callers: one job, one ticket per caller, all answered
//! alike. A job that finds it has nothing to write says so ([`Commit::Skip`], through
//! [`GroupWriter::submit_or_skip`]); a group where no job wrote is not committed.
//!
//! A job that no caller waits on to go on ([`GroupWriter::submit_lazy`]: the record of a
//! result already reported, say) does not start a commit of its own at once: it waits up
//! to [`LAZY_LINGER`] for another job to share the commit with. So a lone message's result
//! and the next message's record cost one `fsync`, not two in a row.
//!
//! A write that its caller waits on at once, when nothing else is waiting to be written, may
//! instead be committed on the caller's thread ([`GroupWriter::submit_here`]): handing it to
//! the writer thread and back costs two thread wake-ups, each tens of microseconds on a
//! virtual machine, on the critical path of the write. The caller's ticket then holds the
//! job and the writer's gate (so nothing submitted after it commits before it) and commits
//! it the first time it is polled (or when dropped), inside
//! [`tokio::task::block_in_place`], so the runtime hands the thread's other tasks to another
//! thread meanwhile and no task waits on the `fsync`. On a current-thread runtime, or with
//! anything queued, it is queued like any other job, and groups form as before: under load,
//! the writer thread is busy and every write is batched.
//!
//! Failures stay with their cause: if one job of a group fails, the group's transaction is
//! aborted and every job of the group runs again in a transaction of its own, so the others
//! still commit and only the failing one reports its error. If the commit itself fails
//! (the disk), every waiter of the group gets that error, and the [`DatabaseSlot`] learns
//! of it, to open the file again if redb now refuses everything.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    task::{Context, Poll, Wake, Waker},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use redb::{Database, WriteTransaction};
use tokio::{
    runtime::{Handle, RuntimeFlavor},
    sync::{Mutex, OwnedMutexGuard, oneshot},
};

use crate::{DatabaseSlot, Error, JobError};

/// What a job's write asks of its group's commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The job changed something that must be durable before its ticket resolves.
    Durable,
    /// The job changed nothing (a duplicate, a refusal): it needs no commit, and a group
    /// of such jobs only is not committed. Its ticket resolves once the group is done.
    Skip,
}

/// The longest a group of lazy jobs only waits for another job before it is committed
/// alone: short enough that its tickets still resolve promptly, long enough to cover the
/// gap between one message's result and the next message's record.
pub const LAZY_LINGER: Duration = Duration::from_millis(5);

/// A job in the writer's queue, and whether it may wait for company.
struct Queued {
    job: Box<dyn Job>,
    lazy: bool,
}

/// One job waiting for the writer thread.
trait Job: Send {
    /// Runs the job in `txn`, keeping its result: what it asks of the commit, or `None`
    /// if it failed.
    fn apply(&mut self, txn: &WriteTransaction) -> Option<Commit>;
    /// The database error behind the job's failure, if it failed with one.
    fn database_error(&self) -> Option<Arc<redb::Error>>;
    /// Answers the waiters: the kept result, or `failure` if the commit failed.
    fn finish(self: Box<Self>, failure: Option<&Error>);
}

/// A job with one waiter.
struct SingleJob<T, E, F> {
    work: F,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
}

impl<T, E, F> Job for SingleJob<T, E, F>
where
    T: Send,
    E: JobError,
    F: Fn(&WriteTransaction) -> Result<(T, Commit), E> + Send,
{
    fn apply(&mut self, txn: &WriteTransaction) -> Option<Commit> {
        match (self.work)(txn) {
            Ok((value, commit)) => {
                self.result = Some(Ok(value));
                Some(commit)
            }
            Err(error) => {
                self.result = Some(Err(error));
                None
            }
        }
    }

    fn database_error(&self) -> Option<Arc<redb::Error>> {
        match &self.result {
            Some(Err(error)) => error.database_error().cloned(),
            _ => None,
        }
    }

    fn finish(self: Box<Self>, failure: Option<&Error>) {
        let result = match (failure, self.result) {
            (Some(error), _) => Err(E::from(error.clone())),
            (None, Some(result)) => result,
            // Every job of a group that was not committed has run.
            (None, None) => Err(E::from(Error::WriterStopped)),
        };
        // A caller that stopped waiting does not need the answer; the write stands.
        let _ = self.reply.send(result);
    }
}

/// A job with one waiter for `work`, and where its answer arrives.
fn single_job<T, E, F>(work: F) -> (Box<dyn Job>, oneshot::Receiver<Result<T, E>>)
where
    T: Send + 'static,
    E: JobError,
    F: Fn(&WriteTransaction) -> Result<(T, Commit), E> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let job = Box::new(SingleJob {
        work,
        result: None,
        reply,
    });
    (job, answer)
}

/// A job whose outcome many waiters share.
struct SharedJob<E, F> {
    work: F,
    result: Option<Result<(), Arc<E>>>,
    replies: Vec<oneshot::Sender<Result<(), E>>>,
}

impl<E, F> Job for SharedJob<E, F>
where
    E: JobError + std::error::Error + Sync,
    F: Fn(&WriteTransaction) -> Result<(), E> + Send,
{
    fn apply(&mut self, txn: &WriteTransaction) -> Option<Commit> {
        let result = (self.work)(txn).map_err(Arc::new);
        let ok = result.is_ok();
        self.result = Some(result);
        ok.then_some(Commit::Durable)
    }

    fn database_error(&self) -> Option<Arc<redb::Error>> {
        match &self.result {
            Some(Err(error)) => error.database_error().cloned(),
            _ => None,
        }
    }

    fn finish(self: Box<Self>, failure: Option<&Error>) {
        let outcome = match (failure, self.result) {
            (Some(error), _) => Err(error.clone()),
            (None, Some(Ok(()))) => Ok(()),
            (None, Some(Err(error))) => Err(Error::Shared(error)),
            (None, None) => Err(Error::WriterStopped),
        };
        for reply in self.replies {
            let _ = reply.send(outcome.clone().map_err(E::from));
        }
    }
}

/// A submitted job: resolves, as a future, once the group holding it is durable, with the
/// job's result. Dropping it does not cancel the write.
#[must_use = "a write is durable only once its ticket resolves"]
pub struct Ticket<T, E = Error> {
    answer: oneshot::Receiver<Result<T, E>>,
    /// A job to commit on the thread that first polls (or drops) this ticket
    /// ([`GroupWriter::submit_here`]).
    here: Option<Here>,
}

/// A job reserved to commit on its caller's thread, with the gate that keeps every job
/// submitted after it waiting.
struct Here {
    job: Box<dyn Job>,
    slot: Arc<DatabaseSlot>,
    gate: OwnedMutexGuard<()>,
}

impl Here {
    /// Commits the job here and answers its ticket; on a multi-thread runtime the thread's
    /// other tasks move to another thread meanwhile.
    fn run(self) {
        let Here {
            mut job,
            slot,
            gate,
        } = self;
        let commit_here = move || {
            let failure = match slot.get() {
                Ok(db) => commit(&slot, &db, std::slice::from_mut(&mut job)).err(),
                Err(error) => Some(error),
            };
            // A job that failed aborted the transaction and keeps its own error.
            job.finish(failure.as_ref());
            drop(gate);
        };
        if on_multi_thread_runtime() {
            tokio::task::block_in_place(commit_here);
        } else {
            commit_here();
        }
    }
}

/// Whether this thread runs a multi-thread tokio runtime, where
/// [`tokio::task::block_in_place`] may be called.
fn on_multi_thread_runtime() -> bool {
    Handle::try_current().is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread)
}

impl<T, E> Drop for Ticket<T, E> {
    fn drop(&mut self) {
        // Dropping a ticket does not cancel its write, and the jobs behind it wait for it.
        if let Some(here) = self.here.take() {
            here.run();
        }
    }
}

impl<T, E> std::fmt::Debug for Ticket<T, E> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Ticket").finish_non_exhaustive()
    }
}

impl<T, E: From<Error>> Ticket<T, E> {
    /// A ticket that is resolved already, with `result`.
    pub fn resolved(result: Result<T, E>) -> Self {
        let (reply, answer) = oneshot::channel();
        let _ = reply.send(result);
        Self { answer, here: None }
    }

    /// The result if the write is durable already (or failed), else the ticket back (a
    /// write reserved to commit here, [`GroupWriter::submit_here`], is not yet: it commits
    /// when the ticket is polled or dropped).
    pub fn try_take(mut self) -> Result<Result<T, E>, Self> {
        if self.here.is_some() {
            return Err(self);
        }
        match self.answer.try_recv() {
            Ok(result) => Ok(result),
            Err(oneshot::error::TryRecvError::Empty) => Err(self),
            Err(oneshot::error::TryRecvError::Closed) => Ok(Err(E::from(Error::WriterStopped))),
        }
    }

    /// Blocks this thread until the write is durable. Only for synchronous callers: async
    /// code awaits the ticket instead, so a runtime thread is not held for an `fsync`.
    pub fn wait_blocking(mut self) -> Result<T, E> {
        /// Wakes the blocked thread when the answer arrives.
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut context = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(result) = Pin::new(&mut self).poll(&mut context) {
                return result;
            }
            // A wake-up that came before this park makes it return at once; a spurious
            // one only polls again.
            std::thread::park();
        }
    }
}

impl<T, E: From<Error>> Future for Ticket<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(here) = self.here.take() {
            here.run();
        }
        Pin::new(&mut self.answer)
            .poll(cx)
            .map(|answer| answer.unwrap_or_else(|_| Err(E::from(Error::WriterStopped))))
    }
}

/// The handle on the writer thread. Dropping it lets the thread commit what was submitted,
/// then waits for it to end (so the database file is closed when this returns, unless
/// something else still holds it).
#[derive(Debug)]
pub struct GroupWriter {
    /// Feeds the thread; `None` only while dropping. Unbounded: a submit never blocks its
    /// caller, and a caller waits on its ticket before submitting more of the same.
    jobs: Option<mpsc::Sender<Queued>>,
    thread: Option<JoinHandle<()>>,
    gate: Arc<Gate>,
    slot: Arc<DatabaseSlot>,
}

/// What orders the writer thread's commits and those made on callers' threads.
#[derive(Debug, Default)]
struct Gate {
    /// Held by the writer thread while it gathers and commits a group, and by a ticket
    /// from [`GroupWriter::submit_here`] until its job is committed.
    commit: Arc<Mutex<()>>,
    /// Jobs submitted to the thread and not yet answered.
    unfinished: AtomicUsize,
}

impl GroupWriter {
    /// Starts the writer thread (named `name`) for the database in `slot`, committing up to
    /// `max_group` jobs at a time (a bound on the work behind one `fsync` and on how long
    /// the first waiter of a group waits for the last). Fails only if the thread cannot be
    /// spawned.
    pub fn start(name: &str, slot: Arc<DatabaseSlot>, max_group: usize) -> std::io::Result<Self> {
        Self::start_with_linger(name, slot, max_group, LAZY_LINGER)
    }

    /// [`GroupWriter::start`] with lazy jobs waiting up to `linger` for company instead of
    /// [`LAZY_LINGER`].
    pub fn start_with_linger(
        name: &str,
        slot: Arc<DatabaseSlot>,
        max_group: usize,
        linger: Duration,
    ) -> std::io::Result<Self> {
        let (jobs, receiver) = mpsc::channel::<Queued>();
        let max_group = max_group.max(1);
        let gate = Arc::new(Gate::default());
        let thread = {
            let (slot, gate) = (slot.clone(), gate.clone());
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || run(&slot, &gate, &receiver, max_group, linger))?
        };
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
            gate,
            slot,
        })
    }

    /// Submits `work`, to run in a write transaction after everything submitted before it,
    /// and to be durable before its ticket resolves. It may run more than once (again
    /// alone, if another job of its group failed), so it must depend only on what it
    /// captured and on the transaction.
    pub fn submit<T, E, F>(&self, work: F) -> Ticket<T, E>
    where
        T: Send + 'static,
        E: JobError,
        F: Fn(&WriteTransaction) -> Result<T, E> + Send + 'static,
    {
        self.submit_or_skip(move |txn| work(txn).map(|value| (value, Commit::Durable)))
    }

    /// Submits `work` like [`GroupWriter::submit`], for a caller that waits on the ticket at
    /// once: if nothing submitted before is still waiting to be written and this thread
    /// runs a multi-thread tokio runtime, the ticket commits `work` on the thread that first
    /// polls it (or drops it), inside [`tokio::task::block_in_place`], sparing the two
    /// thread wake-ups of the writer's round trip; meanwhile every job submitted later waits
    /// for it. Otherwise it is queued like [`GroupWriter::submit`]'s. Poll the ticket before
    /// waiting on anything submitted after it.
    pub fn submit_here<T, E, F>(&self, work: F) -> Ticket<T, E>
    where
        T: Send + 'static,
        E: JobError,
        F: Fn(&WriteTransaction) -> Result<T, E> + Send + 'static,
    {
        let work = move |txn: &WriteTransaction| work(txn).map(|value| (value, Commit::Durable));
        let Some(gate) = self.reserve() else {
            return self.send_single(work, false);
        };
        let (job, answer) = single_job(work);
        Ticket {
            answer,
            here: Some(Here {
                job,
                slot: self.slot.clone(),
                gate,
            }),
        }
    }

    /// The gate, if a job may be committed on this thread now: nothing is queued or being
    /// committed, and the runtime can hand this thread's other tasks elsewhere.
    fn reserve(&self) -> Option<OwnedMutexGuard<()>> {
        if !on_multi_thread_runtime() {
            return None;
        }
        let gate = self.gate.commit.clone().try_lock_owned().ok()?;
        // Submissions count themselves before they are queued, and the thread takes the
        // gate before it answers and uncounts them: zero here means none is waiting.
        (self.gate.unfinished.load(Ordering::SeqCst) == 0).then_some(gate)
    }

    /// Submits `work` like [`GroupWriter::submit`], for a job that may find it has nothing
    /// to write: it returns its result with what it asks of the commit.
    pub fn submit_or_skip<T, E, F>(&self, work: F) -> Ticket<T, E>
    where
        T: Send + 'static,
        E: JobError,
        F: Fn(&WriteTransaction) -> Result<(T, Commit), E> + Send + 'static,
    {
        self.send_single(work, false)
    }

    /// Submits `work` like [`GroupWriter::submit`], for a write nobody needs to wait on to
    /// go on: if nothing else is waiting to be written, it waits up to [`LAZY_LINGER`] for
    /// a job to share its commit with (see the module documentation). Order is kept: it is
    /// still committed no later than anything submitted after it.
    pub fn submit_lazy<T, E, F>(&self, work: F) -> Ticket<T, E>
    where
        T: Send + 'static,
        E: JobError,
        F: Fn(&WriteTransaction) -> Result<T, E> + Send + 'static,
    {
        self.send_single(
            move |txn: &WriteTransaction| work(txn).map(|value| (value, Commit::Durable)),
            true,
        )
    }

    fn send_single<T, E, F>(&self, work: F, lazy: bool) -> Ticket<T, E>
    where
        T: Send + 'static,
        E: JobError,
        F: Fn(&WriteTransaction) -> Result<(T, Commit), E> + Send + 'static,
    {
        let (job, answer) = single_job(work);
        self.send(Queued { job, lazy });
        Ticket { answer, here: None }
    }

    /// Submits `work` like [`GroupWriter::submit`], with `waiters` tickets that all resolve
    /// with its outcome (a failure of `work` itself as [`Error::Shared`]): one job for
    /// several callers, so a burst of small writes costs one job.
    pub fn submit_shared<E, F>(&self, work: F, waiters: usize) -> Vec<Ticket<(), E>>
    where
        E: JobError + std::error::Error + Sync,
        F: Fn(&WriteTransaction) -> Result<(), E> + Send + 'static,
    {
        self.send_shared(work, waiters, false)
    }

    /// [`GroupWriter::submit_shared`] for a write its waiters do not need at once: like
    /// [`GroupWriter::submit_lazy`], it waits up to [`LAZY_LINGER`] for company (the new
    /// messages' records, say, which the seal of the first of them follows within
    /// microseconds: one `fsync` for both).
    pub fn submit_shared_lazy<E, F>(&self, work: F, waiters: usize) -> Vec<Ticket<(), E>>
    where
        E: JobError + std::error::Error + Sync,
        F: Fn(&WriteTransaction) -> Result<(), E> + Send + 'static,
    {
        self.send_shared(work, waiters, true)
    }

    fn send_shared<E, F>(&self, work: F, waiters: usize, lazy: bool) -> Vec<Ticket<(), E>>
    where
        E: JobError + std::error::Error + Sync,
        F: Fn(&WriteTransaction) -> Result<(), E> + Send + 'static,
    {
        let (replies, tickets) = (0..waiters)
            .map(|_| {
                let (reply, answer) = oneshot::channel();
                (reply, Ticket { answer, here: None })
            })
            .unzip();
        let job = Box::new(SharedJob {
            work,
            result: None,
            replies,
        });
        self.send(Queued { job, lazy });
        tickets
    }

    fn send(&self, job: Queued) {
        if let Some(jobs) = &self.jobs {
            self.gate.unfinished.fetch_add(1, Ordering::SeqCst);
            // A send error means the thread is gone; the tickets then say so.
            if jobs.send(job).is_err() {
                self.gate.unfinished.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for GroupWriter {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the durable writer thread panicked");
        }
    }
}

/// The writer thread: group, run, commit, answer; until the handle is gone.
fn run(
    slot: &DatabaseSlot,
    gate: &Gate,
    jobs: &mpsc::Receiver<Queued>,
    max_group: usize,
    linger: Duration,
) {
    while let Ok(first) = jobs.recv() {
        // A job committing on its caller's thread goes first: it was reserved before this
        // one was submitted.
        let _gate = gate.commit.blocking_lock();
        let group = gather(first, jobs, max_group, linger);
        let jobs_in_group = group.len();
        commit_group(slot, group);
        gate.unfinished.fetch_sub(jobs_in_group, Ordering::SeqCst);
    }
}

/// Commits `group` (one job at a time if one fails, so only it reports an error) and
/// answers its jobs.
fn commit_group(slot: &DatabaseSlot, mut group: Vec<Box<dyn Job>>) {
    let db = match slot.get() {
        Ok(db) => db,
        Err(error) => return group.into_iter().for_each(|job| job.finish(Some(&error))),
    };
    match commit(slot, &db, &mut group) {
        Ok(true) => group.into_iter().for_each(|job| job.finish(None)),
        // One job failed: run each alone, so only the failing one reports an error.
        Ok(false) if group.len() > 1 => {
            for mut job in group {
                match commit(slot, &db, std::slice::from_mut(&mut job)) {
                    Ok(_) => job.finish(None),
                    Err(error) => job.finish(Some(&error)),
                }
            }
        }
        Ok(false) => group.into_iter().for_each(|job| job.finish(None)),
        Err(error) => {
            tracing::error!(%error, jobs = group.len(), "group commit failed");
            group.into_iter().for_each(|job| job.finish(Some(&error)));
        }
    }
}

/// The group that starts with `first`: every job waiting, up to `max_group`; while the
/// group holds lazy jobs only, it also waits up to `linger` for another job.
fn gather(
    first: Queued,
    jobs: &mpsc::Receiver<Queued>,
    max_group: usize,
    linger: Duration,
) -> Vec<Box<dyn Job>> {
    let mut lazy_only = first.lazy;
    let mut group = vec![first.job];
    let mut linger_until: Option<Instant> = None;
    while group.len() < max_group {
        let next = match jobs.try_recv() {
            Ok(next) => next,
            Err(_) if !lazy_only => break,
            Err(_) => {
                let until = *linger_until.get_or_insert_with(|| Instant::now() + linger);
                match jobs.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(next) => next,
                    // The linger is over, or the handle is gone: commit what there is.
                    Err(_) => break,
                }
            }
        };
        lazy_only &= next.lazy;
        group.push(next.job);
    }
    group
}

/// Runs `group` in one transaction and commits it if a job asks for it: `Ok(false)`
/// (aborted) if a job failed. A database error (of a job or of the transaction) is handed
/// to the slot.
fn commit(
    slot: &DatabaseSlot,
    db: &Arc<Database>,
    group: &mut [Box<dyn Job>],
) -> Result<bool, Error> {
    let failed = |cause: redb::Error| {
        let cause = Arc::new(cause);
        slot.after_error(db, &cause);
        Error::Database(cause)
    };
    let txn = db.begin_write().map_err(|error| failed(error.into()))?;
    let mut needed = false;
    for job in group.iter_mut() {
        match job.apply(&txn) {
            Some(commit) => needed |= commit == Commit::Durable,
            None => {
                txn.abort().map_err(|error| failed(error.into()))?;
                if let Some(cause) = job.database_error() {
                    slot.after_error(db, &cause);
                }
                return Ok(false);
            }
        }
    }
    if needed {
        txn.commit().map_err(|error| failed(error.into()))?;
        slot.committed();
    } else {
        txn.abort().map_err(|error| failed(error.into()))?;
    }
    Ok(true)
}
