//! The writer and the slot against redb over storage backends that count, hold or fail
//! their `fsync`s on demand.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use durable::{
    Commit, DatabaseSlot, Error, GroupWriter, JobError, Opener, Ticket, testing::SyncedDisk,
};
use redb::{
    Database, DatabaseError, ReadableDatabase, StorageBackend, TableDefinition,
    backends::InMemoryBackend,
};

const NUMBERS: TableDefinition<u64, u64> = TableDefinition::new("numbers");

/// A job's error in these tests.
#[derive(Debug, thiserror::Error)]
enum TestError {
    #[error(transparent)]
    Durable(#[from] Error),
    #[error("database: {0}")]
    Database(Arc<redb::Error>),
    #[error("refused on purpose")]
    Refused,
}

impl JobError for TestError {
    fn database_error(&self) -> Option<&Arc<redb::Error>> {
        match self {
            TestError::Database(cause) => Some(cause),
            _ => None,
        }
    }
}

macro_rules! from_redb {
    ($($kind:ty),*) => {$(
        impl From<$kind> for TestError {
            fn from(error: $kind) -> Self {
                TestError::Database(Arc::new(error.into()))
            }
        }
    )*};
}
from_redb!(redb::TableError, redb::StorageError);

/// A slot over `db` that cannot open it again (the tests that need that build their own).
fn slot(db: Database) -> Arc<DatabaseSlot> {
    Arc::new(DatabaseSlot::new(
        db,
        Box::new(|| Err(DatabaseError::DatabaseAlreadyOpen)),
    ))
}

fn in_memory() -> Database {
    Database::builder()
        .create_with_backend(InMemoryBackend::new())
        .unwrap()
}

fn start(slot: Arc<DatabaseSlot>) -> GroupWriter {
    GroupWriter::start("durable-test-writer", slot, 4096).unwrap()
}

/// A writer over a [`SyncedDisk`], and the disk.
fn on_synced_disk() -> (SyncedDisk, GroupWriter) {
    let disk = SyncedDisk::default();
    let db = Database::builder()
        .create_with_backend(disk.clone())
        .unwrap();
    (disk, start(slot(db)))
}

fn insert(writer: &GroupWriter, key: u64) -> Ticket<(), TestError> {
    writer.submit(move |txn| {
        txn.open_table(NUMBERS)?.insert(key, key * 2)?;
        Ok(())
    })
}

fn value(db: &Database, key: u64) -> Option<u64> {
    let txn = db.begin_read().unwrap();
    match txn.open_table(NUMBERS) {
        Ok(table) => table.get(key).unwrap().map(|value| value.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(error) => panic!("{error}"),
    }
}

/// Waits (bounded) until `condition` holds.
fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn jobs_submitted_while_the_writer_is_busy_share_one_commit() {
    let (disk, writer) = on_synced_disk();
    // What one lone commit costs in `fsync`s.
    let before = disk.syncs();
    insert(&writer, 0).wait_blocking().unwrap();
    let per_commit = disk.syncs() - before;
    assert!(per_commit >= 1);

    // The writer is busy with a commit held at its `fsync` while 200 jobs arrive.
    let held = disk.hold_syncs();
    let busy = insert(&writer, 1);
    wait_for("the first commit's fsync", || disk.is_waiting());
    let before = disk.syncs();
    let tickets: Vec<_> = (2..202).map(|key| insert(&writer, key)).collect();
    drop(held);
    busy.wait_blocking().unwrap();
    for ticket in tickets {
        ticket.wait_blocking().unwrap();
    }
    let commits = (disk.syncs() - before) / per_commit;
    assert!(
        commits <= 2,
        "201 jobs took {commits} commits; the 200 that waited share one"
    );
    let db = disk.after_crash().unwrap();
    for key in 0..202 {
        assert_eq!(value(&db, key), Some(key * 2));
    }
}

#[test]
fn a_ticket_resolves_only_once_its_write_is_durable() {
    let (disk, writer) = on_synced_disk();
    let held = disk.hold_syncs();
    let mut ticket = insert(&writer, 7);
    wait_for("the commit's fsync", || disk.is_waiting());
    // Written but not yet durable: the ticket is still pending.
    ticket = ticket.try_take().expect_err("not durable yet");
    assert_eq!(
        value(&disk.after_crash().unwrap(), 7),
        None,
        "nothing durable yet"
    );
    drop(held);
    ticket.wait_blocking().unwrap();
    // Resolved: a crash now (a copy of what was synced, opened again) keeps the write.
    assert_eq!(value(&disk.after_crash().unwrap(), 7), Some(14));
}

#[test]
fn a_lazy_job_shares_the_next_jobs_commit() {
    let disk = SyncedDisk::default();
    let db = Database::builder()
        .create_with_backend(disk.clone())
        .unwrap();
    // A linger far longer than the test, so the sharing does not depend on timing.
    let writer =
        GroupWriter::start_with_linger("lazy", slot(db), 64, Duration::from_secs(60)).unwrap();
    insert(&writer, 0).wait_blocking().unwrap();
    let before = disk.syncs();
    let lazy: Ticket<(), TestError> = writer.submit_lazy(|txn| {
        txn.open_table(NUMBERS)?.insert(1, 2)?;
        Ok(())
    });
    let lazy = lazy.try_take().expect_err("a lazy job waits for company");
    insert(&writer, 2).wait_blocking().unwrap();
    lazy.wait_blocking().unwrap();
    assert_eq!(
        disk.syncs() - before,
        1,
        "the lazy job and the next one share one fsync"
    );
    let db = disk.after_crash().unwrap();
    assert_eq!((value(&db, 1), value(&db, 2)), (Some(2), Some(4)));
}

#[test]
fn a_lazy_job_alone_is_committed_after_the_linger() {
    let (disk, writer) = on_synced_disk();
    let lazy: Ticket<(), TestError> = writer.submit_lazy(|txn| {
        txn.open_table(NUMBERS)?.insert(3, 6)?;
        Ok(())
    });
    lazy.wait_blocking().unwrap();
    assert_eq!(value(&disk.after_crash().unwrap(), 3), Some(6));
}

#[test]
fn a_group_where_no_job_wrote_is_not_committed() {
    let (disk, writer) = on_synced_disk();
    insert(&writer, 1).wait_blocking().unwrap();
    let before = disk.syncs();
    let skipped: Ticket<u64, TestError> = writer.submit_or_skip(|_| Ok((5, Commit::Skip)));
    assert_eq!(skipped.wait_blocking().unwrap(), 5);
    assert_eq!(disk.syncs(), before, "no commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_writes_are_all_durable_after_the_file_is_opened_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group.redb");
    {
        let writer = Arc::new(start(slot(Database::create(&path).unwrap())));
        let mut tasks = Vec::new();
        for task in 0..8u64 {
            let writer = writer.clone();
            tasks.push(tokio::spawn(async move {
                let tickets: Vec<_> = (0..250).map(|i| insert(&writer, task * 1000 + i)).collect();
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
    for task in 0..8u64 {
        for i in 0..250 {
            let key = task * 1000 + i;
            assert_eq!(value(&db, key), Some(key * 2));
        }
    }
}

#[test]
fn a_failing_job_fails_alone_and_the_rest_of_its_group_commits() {
    let slot = slot(in_memory());
    let writer = start(slot.clone());
    let tickets: Vec<_> = (0..100u64)
        .map(|key| {
            writer.submit(move |txn| {
                txn.open_table(NUMBERS)?.insert(key, key)?;
                if key == 50 {
                    return Err(TestError::Refused);
                }
                Ok(key)
            })
        })
        .collect();
    for (key, ticket) in tickets.into_iter().enumerate() {
        let result = ticket.wait_blocking();
        if key == 50 {
            assert!(matches!(result, Err(TestError::Refused)), "{result:?}");
        } else {
            assert_eq!(result.unwrap(), key as u64);
        }
    }
    let db = slot.get().unwrap();
    assert_eq!(value(&db, 49), Some(49));
    assert_eq!(value(&db, 50), None, "the failed job left nothing");
    assert_eq!(value(&db, 51), Some(51));
}

#[test]
fn a_shared_job_answers_every_waiter_with_its_outcome() {
    let slot = slot(in_memory());
    let writer = start(slot.clone());
    let stored = writer.submit_shared::<TestError, _>(
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
            Err(TestError::Refused)
        },
        2,
    );
    assert_eq!(stored.len(), 3);
    for ticket in stored {
        ticket.wait_blocking().unwrap();
    }
    for ticket in refused {
        let result = ticket.wait_blocking();
        assert!(
            matches!(&result, Err(TestError::Durable(Error::Shared(cause))) if cause.to_string() == "refused on purpose"),
            "{result:?}"
        );
    }
    let db = slot.get().unwrap();
    assert_eq!(value(&db, 2), Some(2));
    assert_eq!(value(&db, 7), None, "the refused job left nothing");
}

/// Writes `key` → `value` with [`GroupWriter::submit_here`], noting the name of the thread
/// that ran the job in `ran_on`.
fn insert_here(
    writer: &GroupWriter,
    key: u64,
    value: u64,
    ran_on: &Arc<std::sync::Mutex<Vec<String>>>,
) -> Ticket<(), TestError> {
    let ran_on = ran_on.clone();
    writer.submit_here(move |txn| {
        let thread = std::thread::current().name().unwrap_or("").to_owned();
        ran_on.lock().unwrap().push(thread);
        txn.open_table(NUMBERS)?.insert(key, value)?;
        Ok(())
    })
}

const WRITER_THREAD: &str = "durable-test-writer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_submitted_here_to_an_idle_writer_commits_on_the_awaiting_thread() {
    let (disk, writer) = on_synced_disk();
    let ran_on = Arc::default();
    let before = disk.syncs();
    insert_here(&writer, 1, 10, &ran_on).await.unwrap();
    assert!(disk.syncs() > before, "committed with an fsync");
    let ran_on = ran_on.lock().unwrap().clone();
    assert_eq!(ran_on.len(), 1);
    assert_ne!(ran_on[0], WRITER_THREAD, "committed on the awaiting thread");
    assert_eq!(value(&disk.after_crash().unwrap(), 1), Some(10), "durable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_submitted_here_while_a_job_is_queued_goes_behind_it() {
    let (disk, writer) = on_synced_disk();
    let ran_on = Arc::default();
    // The writer holds a commit at its fsync.
    let held = disk.hold_syncs();
    let busy = insert(&writer, 1);
    wait_for("the writer's fsync", || disk.is_waiting());
    let mut here = insert_here(&writer, 1, 99, &ran_on);
    here = here.try_take().expect_err("queued behind the held commit");
    drop(held);
    busy.await.unwrap();
    here.await.unwrap();
    assert_eq!(*ran_on.lock().unwrap(), [WRITER_THREAD]);
    assert_eq!(
        value(&disk.after_crash().unwrap(), 1),
        Some(99),
        "in submission order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_submitted_after_a_write_reserved_here_commit_after_it() {
    let (disk, writer) = on_synced_disk();
    let ran_on = Arc::default();
    let here = insert_here(&writer, 5, 1, &ran_on);
    // Submitted later, it must not commit first, even though the writer thread is free.
    let later = insert(&writer, 5);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        value(&disk.after_crash().unwrap(), 5),
        None,
        "the later job waits for the reserved one"
    );
    here.await.unwrap();
    later.await.unwrap();
    assert_eq!(
        value(&disk.after_crash().unwrap(), 5),
        Some(10),
        "the later job's write is the last"
    );
    assert_ne!(ran_on.lock().unwrap()[0], WRITER_THREAD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_ticket_reserved_here_still_commits_its_write() {
    let (disk, writer) = on_synced_disk();
    let ran_on = Arc::default();
    drop(insert_here(&writer, 3, 30, &ran_on));
    insert(&writer, 4).await.unwrap();
    let db = disk.after_crash().unwrap();
    assert_eq!((value(&db, 3), value(&db, 4)), (Some(30), Some(8)));
}

#[tokio::test]
async fn on_a_current_thread_runtime_a_write_submitted_here_goes_to_the_writer() {
    let writer = start(slot(in_memory()));
    let ran_on = Arc::default();
    insert_here(&writer, 1, 2, &ran_on).await.unwrap();
    assert_eq!(*ran_on.lock().unwrap(), [WRITER_THREAD]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_submitted_here_reports_its_error_and_leaves_nothing() {
    let slot = slot(in_memory());
    let writer = start(slot.clone());
    let failed: Ticket<(), TestError> = writer.submit_here(|txn| {
        txn.open_table(NUMBERS)?.insert(8, 8)?;
        Err(TestError::Refused)
    });
    assert!(matches!(failed.await, Err(TestError::Refused)));
    insert(&writer, 9).await.unwrap();
    let db = slot.get().unwrap();
    assert_eq!((value(&db, 8), value(&db, 9)), (None, Some(18)));
}

#[test]
fn tickets_of_a_stopped_writer_say_so() {
    let ticket: Ticket<(), Error> = Ticket::resolved(Err(Error::WriterStopped));
    assert!(matches!(ticket.wait_blocking(), Err(Error::WriterStopped)));
}

/// An in-memory file whose `fsync` fails on demand; opened again, it is the same file.
#[derive(Debug, Clone)]
struct FailingDisk {
    inner: Arc<InMemoryBackend>,
    fail_sync: Arc<AtomicBool>,
}

impl StorageBackend for FailingDisk {
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

/// A slot over a [`FailingDisk`] that opens it again: the slot, the switch, and how often
/// the file was opened.
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
async fn a_failing_commit_reports_its_error_to_every_waiter() {
    let (slot, fail_sync, _) = failing_slot();
    let writer = start(slot);
    insert(&writer, 1).await.unwrap();
    fail_sync.store(true, Ordering::SeqCst);
    let tickets: Vec<_> = (10..200).map(|key| insert(&writer, key)).collect();
    for ticket in tickets {
        let error = ticket.await.expect_err("the disk is full");
        assert!(
            matches!(&error, TestError::Durable(error) if error.is_storage_full()),
            "every waiter hears of the full disk: {error}"
        );
    }
}

/// After a commit failed on a full disk, redb refuses every later read and write until the
/// database is opened again; the slot does that by itself, with everything committed
/// before, once the disk takes writes again.
#[tokio::test]
async fn an_io_failure_is_recovered_from_by_opening_the_file_again() {
    let (slot, fail_sync, opens) = failing_slot();
    let writer = start(slot.clone());
    insert(&writer, 1).await.unwrap();
    fail_sync.store(true, Ordering::SeqCst);
    let error = insert(&writer, 2).await.expect_err("the disk is full");
    assert!(
        matches!(&error, TestError::Durable(Error::Database(cause)) if cause.to_string().contains("no storage space")),
        "{error}"
    );
    // While the database is closed, operations fail at once with the error that closed it.
    let closed = slot.get().expect_err("closed after the failure");
    assert!(
        matches!(&closed, Error::Reopening { .. }) && closed.is_storage_full(),
        "{closed}"
    );

    fail_sync.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match insert(&writer, 3).await {
            Ok(()) => break,
            Err(TestError::Durable(Error::Reopening { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("never recovered: {error}"),
        }
    }
    let db = slot.get().unwrap();
    assert_eq!(value(&db, 1), Some(2), "kept");
    // Key 2 may or may not be there: its `fsync` failed, not its writes, so the commit
    // can be durable anyway, as on a real disk. Writers must not rely on either.
    assert_eq!(value(&db, 3), Some(6), "written after");
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
    let writer = start(slot);
    insert(&writer, 1).await.unwrap();
    fail_sync.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut failures = 0;
    while started.elapsed() < Duration::from_millis(500) {
        let error = insert(&writer, 2).await.expect_err("full");
        assert!(
            matches!(&error, TestError::Durable(error) if error.is_storage_full()),
            "{error}"
        );
        failures += 1;
    }
    // Backoff 50, 100, 200, 400 ms: at most four attempts in half a second, plus the
    // first open.
    let opens = opens.load(Ordering::SeqCst);
    assert!(opens <= 5, "{opens} opens for {failures} failed writes");
    assert!(failures > 20, "failures are answered at once ({failures})");
}

/// The file is not opened again while an operation still holds the failed database (it
/// would still have the file locked).
#[tokio::test]
async fn the_file_is_opened_again_only_once_the_failed_database_is_let_go() {
    let (slot, fail_sync, opens) = failing_slot();
    let writer = start(slot.clone());
    insert(&writer, 1).await.unwrap();
    let held = slot.get().unwrap();
    fail_sync.store(true, Ordering::SeqCst);
    insert(&writer, 2).await.expect_err("full");
    fail_sync.store(false, Ordering::SeqCst);
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        assert!(matches!(slot.get(), Err(Error::Reopening { .. })));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(opens.load(Ordering::SeqCst), 1, "not opened while held");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while slot.get().is_err() {
        assert!(Instant::now() < deadline, "never opened again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(opens.load(Ordering::SeqCst), 2);
    insert(&writer, 3).await.unwrap();
}
