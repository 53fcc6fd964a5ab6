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
//! A failure of the disk itself (a full disk, most often) makes redb refuse every later read
//! and write with "previous I/O error" until the database is closed and opened again. A
//! client must not need a restart for that, so the database sits in a [`DatabaseSlot`]
//! that readers and the writer take it from: when a commit fails that way, the slot drops
//! the database, and the first operation after a backoff (50 ms, doubling to 2 s while the
//! disk stays full) opens the file again (redb repairs it if needed) and carries on with
//! everything committed before the failure. In between, operations fail at once with the
//! error that closed it.
//!
//! **Architecture Invariant:** nothing here knows the tables; it only orders, groups and
//! commits closures, and opens the file. Waiting on a [`Ticket`] is the only way a caller
//! learns its write is durable.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, mpsc},
    task::{Context, Poll},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use redb::{Database, DatabaseError, StorageError, TransactionError, WriteTransaction};
use tokio::sync::oneshot;

use crate::{control::Backoff, state::StateError};

/// The most writes committed in one transaction (a bound on the work behind one `fsync`
/// and on how long the first waiter of a group waits for the last).
pub const MAX_GROUP: usize = 4096;

/// The first wait before opening again a database that failed.
pub const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest wait between two attempts to open it again.
pub const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Opens the database file (again). A closure, so tests can open it over a storage backend
/// that fails on demand.
pub type Opener = Box<dyn Fn() -> Result<Database, DatabaseError> + Send + Sync>;

/// The state database, shared by the readers and the writer thread, and opened again after
/// an I/O failure (see the module documentation).
pub struct DatabaseSlot {
    open: Opener,
    current: Mutex<Current>,
}

impl std::fmt::Debug for DatabaseSlot {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DatabaseSlot")
            .finish_non_exhaustive()
    }
}

/// The slot's database, or why there is none just now.
struct Current {
    database: Option<Arc<Database>>,
    /// The error that closed the database, or that the last attempt to open it met.
    failure: String,
    /// No attempt to open it is made before this.
    retry_at: Instant,
    /// The wait before the next attempt; back to the shortest after a successful commit.
    backoff: Backoff,
}

impl DatabaseSlot {
    /// A slot over an already opened `database`, which `open` opens again after a failure.
    pub fn new(database: Database, open: Opener) -> Self {
        Self {
            open,
            current: Mutex::new(Current {
                database: Some(Arc::new(database)),
                failure: String::new(),
                retry_at: Instant::now(),
                backoff: Backoff::new(REOPEN_BACKOFF_MIN, REOPEN_BACKOFF_MAX),
            }),
        }
    }

    /// The database to run an operation on: the open one, or the file opened again if it
    /// failed and the backoff has passed. Opening is file I/O (perhaps a repair), but rare.
    pub fn get(&self) -> Result<Arc<Database>, StateError> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(database) = &current.database {
            return Ok(Arc::clone(database));
        }
        let now = Instant::now();
        if now >= current.retry_at {
            match (self.open)() {
                Ok(database) => {
                    tracing::info!("state database opened again after an I/O failure");
                    let database = Arc::new(database);
                    current.database = Some(Arc::clone(&database));
                    return Ok(database);
                }
                Err(error) => {
                    // `DatabaseAlreadyOpen` too: a read that took the failed database just
                    // before it was dropped still holds the file; it lets go at once.
                    current.failure = redb::Error::from(error).to_string();
                    current.retry_at = now + current.backoff.next_delay(0);
                    tracing::warn!(failure = %current.failure, "state database could not be opened again; will retry");
                }
            }
        }
        Err(StateError::Reopening(current.failure.clone()))
    }

    /// Called by the writer with a commit's failure on `database`: if the database now
    /// refuses everything for a previous I/O error, it is dropped, to be opened again by a
    /// later operation.
    fn after_failure(&self, database: &Arc<Database>, failure: &str) {
        // `try_begin_write` checks for a latched I/O failure first. The writer thread is the
        // only writer, so no other write transaction can be open here.
        let latched = matches!(
            database.try_begin_write(),
            Err(TransactionError::Storage(
                StorageError::PreviousIo | StorageError::DatabaseClosed
            ))
        );
        if !latched {
            return;
        }
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current
            .database
            .as_ref()
            .is_some_and(|open| Arc::ptr_eq(open, database))
        {
            tracing::error!(%failure, "state database failed an I/O operation; opening it again");
            current.database = None;
            current.failure = failure.to_owned();
            current.retry_at = Instant::now() + current.backoff.next_delay(0);
        }
    }

    /// Called after a successful commit: the disk takes writes again, so the next failure
    /// starts from the shortest backoff.
    fn committed(&self) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.backoff.reset();
    }
}

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
    /// Starts the writer thread for the database in `slot`.
    pub fn start(slot: Arc<DatabaseSlot>) -> Result<Self, StateError> {
        let (jobs, receiver) = mpsc::channel::<Box<dyn Job>>();
        let thread = std::thread::Builder::new()
            .name("p2pchat-state-writer".into())
            .spawn(move || run(&slot, &receiver))
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
fn run(slot: &DatabaseSlot, jobs: &mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let db = match slot.get() {
            Ok(db) => db,
            Err(error) => {
                let reason = error.to_string();
                group.into_iter().for_each(|job| job.finish(Some(&reason)));
                continue;
            }
        };
        match commit(&db, &mut group) {
            Ok(true) => {
                slot.committed();
                group.into_iter().for_each(|job| job.finish(None));
            }
            // One write failed: run each alone, so only the failing one reports an error.
            Ok(false) => {
                for mut job in group {
                    match commit(&db, std::slice::from_mut(&mut job)) {
                        Ok(_) => job.finish(None),
                        Err(error) => {
                            let reason = error.to_string();
                            slot.after_failure(&db, &reason);
                            job.finish(Some(&reason));
                        }
                    }
                }
            }
            Err(error) => {
                let reason = error.to_string();
                tracing::error!(%reason, writes = group.len(), "state commit failed");
                slot.after_failure(&db, &reason);
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
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use redb::{ReadableDatabase, TableDefinition, backends::InMemoryBackend};

    use super::*;

    const NUMBERS: TableDefinition<u64, u64> = TableDefinition::new("numbers");

    /// A slot over `db` that cannot open it again (the tests that need that build their own).
    fn slot(db: Database) -> Arc<DatabaseSlot> {
        Arc::new(DatabaseSlot::new(
            db,
            Box::new(|| Err(DatabaseError::DatabaseAlreadyOpen)),
        ))
    }

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
            let writer = GroupWriter::start(slot(Database::create(&path).unwrap())).unwrap();
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
        let db = slot(
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
        let txn = db.get().unwrap().begin_read().unwrap();
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
        let db = slot(
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
        let txn = db.get().unwrap().begin_read().unwrap();
        let table = txn.open_table(NUMBERS).unwrap();
        assert_eq!(table.get(2).unwrap().unwrap().value(), 2);
        assert!(
            table.get(7).unwrap().is_none(),
            "the refused write left nothing"
        );
    }

    /// An in-memory file whose `fsync` fails on demand; opened again, it is the same file.
    #[derive(Debug, Clone)]
    struct FailingDisk {
        inner: Arc<InMemoryBackend>,
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
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.inner.write(offset, data)
        }
    }

    /// A slot over a [`FailingDisk`] that opens it again: the slot, the switch, and how
    /// often the file was opened.
    fn failing_slot() -> (Arc<DatabaseSlot>, Arc<AtomicBool>, Arc<AtomicUsize>) {
        let disk = FailingDisk {
            inner: Arc::new(InMemoryBackend::new()),
            fail_sync: Arc::new(AtomicBool::new(false)),
        };
        let fail_sync = disk.fail_sync.clone();
        let opens = Arc::new(AtomicUsize::new(0));
        let open: Opener = Box::new({
            let opens = opens.clone();
            move || {
                opens.fetch_add(1, Ordering::SeqCst);
                Database::builder().create_with_backend(disk.clone())
            }
        });
        let db = open().unwrap();
        (Arc::new(DatabaseSlot::new(db, open)), fail_sync, opens)
    }

    #[tokio::test]
    async fn a_failing_commit_reports_an_error_to_every_waiter() {
        let (slot, fail_sync, _) = failing_slot();
        let writer = GroupWriter::start(slot).unwrap();
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

    /// Regression (issue 8): after a commit failed on a full disk, redb refused every later
    /// read and write until the database was opened again, so a client kept failing (and
    /// refusing every message as "cannot take it now") after space was freed, until it was
    /// restarted. Now the file is opened again by itself, with everything committed before.
    #[tokio::test]
    async fn a_full_disk_is_recovered_from_without_a_restart() {
        let (slot, fail_sync, opens) = failing_slot();
        let writer = GroupWriter::start(slot.clone()).unwrap();
        insert(&writer, 1).await.unwrap();
        fail_sync.store(true, Ordering::SeqCst);
        let error = insert(&writer, 2).await.expect_err("the disk is full");
        assert!(
            matches!(&error, StateError::Commit(reason) if reason.contains("no storage space")),
            "{error}"
        );
        // While the database is closed, reads fail at once and say why.
        let closed = slot.get().expect_err("closed after the failure");
        assert!(matches!(closed, StateError::Reopening(_)), "{closed}");

        fail_sync.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match insert(&writer, 3).await {
                Ok(()) => break,
                Err(error) if std::time::Instant::now() < deadline => {
                    assert!(
                        matches!(error, StateError::Commit(_)),
                        "fails only while reopening: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => panic!("never recovered: {error}"),
            }
        }
        let txn = slot.get().unwrap().begin_read().unwrap();
        let table = txn.open_table(NUMBERS).unwrap();
        assert_eq!(table.get(1).unwrap().unwrap().value(), 2, "kept");
        // Key 2 may or may not be there: its `fsync` failed, not its writes, so the commit
        // can be durable anyway, as on a real disk. Writers must not rely on either.
        assert_eq!(table.get(3).unwrap().unwrap().value(), 6, "written after");
        assert_eq!(
            opens.load(Ordering::SeqCst),
            2,
            "opened once, then once again"
        );
    }

    /// While the disk stays full, opening again backs off instead of running once per write.
    #[tokio::test]
    async fn a_disk_that_stays_full_is_opened_again_with_backoff() {
        let (slot, fail_sync, opens) = failing_slot();
        let writer = GroupWriter::start(slot).unwrap();
        insert(&writer, 1).await.unwrap();
        fail_sync.store(true, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let mut failures = 0;
        while started.elapsed() < Duration::from_millis(500) {
            insert(&writer, 2).await.expect_err("full");
            failures += 1;
        }
        // Backoff 50, 100, 200, 400 ms: at most four attempts in half a second, plus the
        // first open.
        let opens = opens.load(Ordering::SeqCst);
        assert!(opens <= 5, "{opens} opens for {failures} failed writes");
        assert!(failures > 20, "failures are answered at once ({failures})");
    }
}
