//! Group commit: one writer thread makes every write to the state file durable, many writes
//! per `fsync`.
//!
//! A redb write transaction with [`redb::Durability::Immediate`] (the default) ends in an
//! `fsync`, which costs milliseconds on a real disk; one commit per message would bound the
//! runtime at a few hundred messages a second. So writes are not run by their callers:
//! [`GroupWriter::submit`] hands a write (a closure over the transaction) to a dedicated
//! thread and returns a [`Ticket`]. The thread takes every write waiting, runs them in one
//! transaction in the order they were submitted, commits once, and only then answers each
//! ticket. A ticket therefore resolves only once its write is durable, exactly as if it had
//! committed alone (the same scheme as the discovery store's deposit writer,
//! `store::embedded::run_deposit_writer`).
//! [`GroupWriter::submit_shared`] is the same for a write made on behalf of several callers
//! (the records of a burst of sends): one job, one ticket per caller, all answered alike.
//!
//! Failures stay with their cause: if one write of a group fails (a corrupt record), the
//! group's transaction is aborted and every write of the group runs again in a transaction
//! of its own, so the others still commit and only the failing one reports its error. If the
//! commit itself fails (the disk), every waiter of that group gets the error.
//!
//! **Architecture Invariant:** nothing here knows the tables; it only orders, groups and
//! commits closures. Waiting on a [`Ticket`] is the only way a caller learns its write is
//! durable.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, mpsc},
    task::{Context, Poll},
    thread::JoinHandle,
};

use redb::{Database, WriteTransaction};
use tokio::sync::oneshot;

use crate::state::StateError;

/// The most writes committed in one transaction (a bound on the work behind one `fsync`
/// and on how long the first waiter of a group waits for the last).
pub const MAX_GROUP: usize = 4096;

/// One write waiting for the writer thread.
trait Job: Send {
    /// Runs the write in `txn`, keeping its result; false if it failed.
    fn apply(&mut self, txn: &WriteTransaction) -> bool;
    /// Answers the waiter: the kept result, or `failure` if the commit failed.
    fn finish(self: Box<Self>, failure: Option<&str>);
}

struct TypedJob<T, F> {
    work: F,
    result: Option<Result<T, StateError>>,
    reply: oneshot::Sender<Result<T, StateError>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send,
    F: Fn(&WriteTransaction) -> Result<T, StateError> + Send,
{
    fn apply(&mut self, txn: &WriteTransaction) -> bool {
        let result = (self.work)(txn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, failure: Option<&str>) {
        let result = match (failure, self.result) {
            (Some(reason), _) => Err(StateError::Commit(reason.to_owned())),
            (None, Some(result)) => result,
            (None, None) => Err(StateError::Commit("the write was not run".to_owned())),
        };
        // A caller that stopped waiting does not need the answer; the write stands.
        let _ = self.reply.send(result);
    }
}

/// One write whose outcome many waiters share (the records of several sends).
struct SharedJob<F> {
    work: F,
    result: Option<Result<(), String>>,
    replies: Vec<oneshot::Sender<Result<(), StateError>>>,
}

impl<F> Job for SharedJob<F>
where
    F: Fn(&WriteTransaction) -> Result<(), StateError> + Send,
{
    fn apply(&mut self, txn: &WriteTransaction) -> bool {
        let result = (self.work)(txn).map_err(|error| error.to_string());
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, failure: Option<&str>) {
        let outcome = match (failure, self.result) {
            (Some(reason), _) => Err(reason.to_owned()),
            (None, Some(result)) => result,
            (None, None) => Err("the write was not run".to_owned()),
        };
        for reply in self.replies {
            let _ = reply.send(outcome.clone().map_err(StateError::Commit));
        }
    }
}

/// A submitted write: resolves (as a future, or with [`Ticket::wait`]) once the group holding
/// it is durable, with the write's result. Dropping it does not cancel the write.
#[must_use = "a write is durable only once its ticket resolves"]
#[derive(Debug)]
pub struct Ticket<T> {
    answer: oneshot::Receiver<Result<T, StateError>>,
}

impl<T> Ticket<T> {
    /// Blocks this thread until the write is durable. For cold paths and tests: async code
    /// awaits the ticket instead, so a runtime thread is not held for an `fsync`.
    pub fn wait(self) -> Result<T, StateError> {
        futures::executor::block_on(self)
    }
}

impl<T> Ticket<T> {
    /// The result if the write is durable already (or failed), else the ticket back.
    pub fn try_take(mut self) -> Result<Result<T, StateError>, Self> {
        match self.answer.try_recv() {
            Ok(result) => Ok(result),
            Err(oneshot::error::TryRecvError::Empty) => Err(self),
            Err(oneshot::error::TryRecvError::Closed) => Ok(Err(StateError::WriterStopped)),
        }
    }

    /// A ticket that is resolved already, with `result`.
    pub fn resolved(result: Result<T, StateError>) -> Self {
        let (reply, answer) = oneshot::channel();
        let _ = reply.send(result);
        Self { answer }
    }
}

impl<T> Future for Ticket<T> {
    type Output = Result<T, StateError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(StateError::WriterStopped)))
    }
}

/// The handle on the writer thread. Dropping it lets the thread commit what was submitted,
/// then waits for it to end (so the database file is closed when this returns).
#[derive(Debug)]
pub struct GroupWriter {
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupWriter {
    /// Starts the writer thread for `db`.
    pub fn start(db: Arc<Database>) -> Result<Self, StateError> {
        let (jobs, receiver) = mpsc::channel::<Box<dyn Job>>();
        let thread = std::thread::Builder::new()
            .name("p2pchat-state-writer".into())
            .spawn(move || run(&db, &receiver))
            .map_err(|error| StateError::Database(redb::Error::Io(error)))?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Submits `work`, to run in a write transaction after everything submitted before it.
    /// It may run more than once (again alone, if another write of its group failed), so it
    /// must depend only on what it captured and on the transaction.
    pub fn submit<T, F>(&self, work: F) -> Ticket<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> Result<T, StateError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(TypedJob {
            work,
            result: None,
            reply,
        });
        if let Some(jobs) = &self.jobs {
            // A send error means the thread is gone; the ticket then says so.
            let _ = jobs.send(job);
        }
        Ticket { answer }
    }
}

impl GroupWriter {
    /// Submits `work` like [`GroupWriter::submit`], with `waiters` tickets that all resolve
    /// with its outcome (an error as [`StateError::Commit`] with its text): one write job
    /// for several callers, so a burst of small writes costs one job.
    pub fn submit_shared<F>(&self, work: F, waiters: usize) -> Vec<Ticket<()>>
    where
        F: Fn(&WriteTransaction) -> Result<(), StateError> + Send + 'static,
    {
        let (replies, tickets) = (0..waiters)
            .map(|_| {
                let (reply, answer) = oneshot::channel();
                (reply, Ticket { answer })
            })
            .unzip();
        let job = Box::new(SharedJob {
            work,
            result: None,
            replies,
        });
        if let Some(jobs) = &self.jobs {
            // A send error means the thread is gone; the tickets then say so.
            let _ = jobs.send(job);
        }
        tickets
    }
}

impl Drop for GroupWriter {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: group, run, commit, answer; until every handle is gone.
fn run(db: &Database, jobs: &mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        match commit(db, &mut group) {
            Ok(true) => group.into_iter().for_each(|job| job.finish(None)),
            // One write failed: run each alone, so only the failing one reports an error.
            Ok(false) => {
                for mut job in group {
                    match commit(db, std::slice::from_mut(&mut job)) {
                        Ok(_) => job.finish(None),
                        Err(error) => job.finish(Some(&error.to_string())),
                    }
                }
            }
            Err(error) => {
                let reason = error.to_string();
                tracing::error!(%reason, writes = group.len(), "state commit failed");
                group.into_iter().for_each(|job| job.finish(Some(&reason)));
            }
        }
    }
}

/// Runs `group` in one transaction and commits it; `Ok(false)` (aborted) if a write failed.
fn commit(db: &Database, group: &mut [Box<dyn Job>]) -> Result<bool, StateError> {
    let txn = db.begin_write()?;
    for job in group.iter_mut() {
        if !job.apply(&txn) {
            txn.abort()?;
            return Ok(false);
        }
    }
    txn.commit()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::{ReadableDatabase, TableDefinition, backends::InMemoryBackend};

    use super::*;

    const NUMBERS: TableDefinition<u64, u64> = TableDefinition::new("numbers");

    fn insert(writer: &GroupWriter, key: u64) -> Ticket<()> {
        writer.submit(move |txn| {
            txn.open_table(NUMBERS)?.insert(key, key * 2)?;
            Ok(())
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_writes_share_commits_and_are_all_durable_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("group.redb");
        {
            let writer = GroupWriter::start(Arc::new(Database::create(&path).unwrap())).unwrap();
            let writer = Arc::new(writer);
            let mut tasks = Vec::new();
            for task in 0..8u64 {
                let writer = writer.clone();
                tasks.push(tokio::spawn(async move {
                    let tickets: Vec<_> =
                        (0..250).map(|i| insert(&writer, task * 1000 + i)).collect();
                    for ticket in tickets {
                        ticket.await.unwrap();
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
        }
        // The writer is dropped (and joined): the file opens again, with every write in it.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(NUMBERS).unwrap();
        for task in 0..8u64 {
            for i in 0..250 {
                let key = task * 1000 + i;
                assert_eq!(table.get(key).unwrap().unwrap().value(), key * 2);
            }
        }
    }

    #[test]
    fn a_failing_write_fails_alone_and_the_rest_of_its_group_commits() {
        let db = Arc::new(
            Database::builder()
                .create_with_backend(InMemoryBackend::new())
                .unwrap(),
        );
        let writer = GroupWriter::start(db.clone()).unwrap();
        let tickets: Vec<_> = (0..100u64)
            .map(|key| {
                writer.submit(move |txn| {
                    txn.open_table(NUMBERS)?.insert(key, key)?;
                    if key == 50 {
                        return Err(StateError::Commit("refused on purpose".into()));
                    }
                    Ok(key)
                })
            })
            .collect();
        for (key, ticket) in tickets.into_iter().enumerate() {
            let result = ticket.wait();
            if key == 50 {
                assert!(result.is_err());
            } else {
                assert_eq!(result.unwrap(), key as u64);
            }
        }
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(NUMBERS).unwrap();
        assert_eq!(table.get(49).unwrap().unwrap().value(), 49);
        assert!(
            table.get(50).unwrap().is_none(),
            "the failed write left nothing"
        );
        assert_eq!(table.get(51).unwrap().unwrap().value(), 51);
    }

    #[test]
    fn a_shared_write_answers_every_waiter_with_its_outcome() {
        let db = Arc::new(
            Database::builder()
                .create_with_backend(InMemoryBackend::new())
                .unwrap(),
        );
        let writer = GroupWriter::start(db.clone()).unwrap();
        let stored = writer.submit_shared(
            |txn| {
                let mut table = txn.open_table(NUMBERS)?;
                for key in 0..3u64 {
                    table.insert(key, key)?;
                }
                Ok(())
            },
            3,
        );
        let refused = writer.submit_shared(
            |txn| {
                txn.open_table(NUMBERS)?.insert(7, 7)?;
                Err(StateError::Commit("refused on purpose".into()))
            },
            2,
        );
        assert_eq!(stored.len(), 3);
        for ticket in stored {
            ticket.wait().unwrap();
        }
        for ticket in refused {
            assert!(
                matches!(ticket.wait(), Err(StateError::Commit(reason)) if reason.contains("on purpose"))
            );
        }
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(NUMBERS).unwrap();
        assert_eq!(table.get(2).unwrap().unwrap().value(), 2);
        assert!(
            table.get(7).unwrap().is_none(),
            "the refused write left nothing"
        );
    }

    /// An in-memory file whose `fsync` fails on demand.
    #[derive(Debug)]
    struct FailingDisk {
        inner: InMemoryBackend,
        fail_sync: Arc<AtomicBool>,
    }

    impl redb::StorageBackend for FailingDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            if self.fail_sync.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("disk gone"));
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.inner.write(offset, data)
        }
    }

    #[tokio::test]
    async fn a_failing_commit_reports_an_error_to_every_waiter() {
        let fail_sync = Arc::new(AtomicBool::new(false));
        let disk = FailingDisk {
            inner: InMemoryBackend::new(),
            fail_sync: fail_sync.clone(),
        };
        let db = Arc::new(Database::builder().create_with_backend(disk).unwrap());
        let writer = GroupWriter::start(db).unwrap();
        insert(&writer, 1).await.unwrap();
        fail_sync.store(true, Ordering::SeqCst);
        let tickets: Vec<_> = (10..200).map(|key| insert(&writer, key)).collect();
        for ticket in tickets {
            assert!(
                matches!(ticket.await, Err(StateError::Commit(_))),
                "every waiter hears of the failure"
            );
        }
    }
}
