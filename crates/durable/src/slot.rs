//! [`DatabaseSlot`]: the open database, opened again after an I/O failure.
//!
//! Once a write to its file fails (a full disk, most often), redb fails every later
//! operation with [`redb::StorageError::PreviousIo`] until the database is closed and opened
//! again. After an operation fails, [`DatabaseSlot::after_error`] asks the database whether
//! it is in that state, and if so drops the slot's reference to it; the first operation
//! after a backoff opens the file again (redb repairs it if needed) and carries on with
//! everything committed before the failure.
//!
//! Opening again waits until every operation still holding the old database has let go of
//! it (the file stays locked until then). A failed attempt, or a database that fails again
//! before one successful commit ([`DatabaseSlot::committed`]), doubles the wait before the
//! next attempt, from [`REOPEN_BACKOFF_MIN`] up to [`REOPEN_BACKOFF_MAX`], so a disk that
//! stays full costs one attempt every few seconds, not one per operation. Meanwhile
//! operations fail at once with [`Error::Reopening`] and the error that closed the database
//! (a full disk stays "the disk is full").

use std::{
    sync::{Arc, Mutex, PoisonError, Weak},
    time::{Duration, Instant},
};

use redb::{Database, DatabaseError, StorageError, TransactionError};

use crate::{Backoff, Error, is_storage_full};

/// The first wait before opening again a database that failed.
pub const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest wait between two attempts to open it again.
pub const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Opens the database file (again). A closure, so tests can open it over a storage backend
/// that fails on demand.
pub type Opener = Box<dyn Fn() -> Result<Database, DatabaseError> + Send + Sync>;

/// The database, shared by every operation and the writer thread, and opened again after
/// an I/O failure (see the module documentation).
pub struct DatabaseSlot {
    open: Opener,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for DatabaseSlot {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DatabaseSlot")
            .finish_non_exhaustive()
    }
}

/// What the slot's lock guards.
struct Inner {
    state: State,
    /// The wait before the next attempt to open the file; back to the shortest after a
    /// successful commit.
    backoff: Backoff,
}

/// Whether the database is usable.
enum State {
    /// Open and, as far as anyone has seen, healthy.
    Open(Arc<Database>),
    /// Failed; opened again by the first operation after `retry_at`.
    Failed(Failure),
}

/// Why and since when the database is unusable.
struct Failure {
    /// The failed database, still alive while an operation holds it (it keeps the file
    /// locked until the last one lets go).
    old: Weak<Database>,
    /// The error that closed the database, or that the last attempt to open it met.
    cause: Arc<redb::Error>,
    /// No attempt to open it is made before this.
    retry_at: Instant,
}

impl Failure {
    fn error(&self) -> Error {
        Error::Reopening {
            cause: Arc::clone(&self.cause),
        }
    }
}

impl DatabaseSlot {
    /// A slot over an already opened `database`, which `open` opens again after a failure.
    pub fn new(database: Database, open: Opener) -> Self {
        Self {
            open,
            inner: Mutex::new(Inner {
                state: State::Open(Arc::new(database)),
                backoff: Backoff::new(REOPEN_BACKOFF_MIN, REOPEN_BACKOFF_MAX),
            }),
        }
    }

    /// The database to run an operation on: the open one, or the file opened again if the
    /// last one failed and the backoff has passed. Opening is file I/O (perhaps a repair)
    /// and blocks, but it is rare.
    pub fn get(&self) -> Result<Arc<Database>, Error> {
        let mut inner = self.lock();
        let Inner { state, backoff } = &mut *inner;
        let failure = match state {
            State::Open(database) => return Ok(Arc::clone(database)),
            State::Failed(failure) => failure,
        };
        let now = Instant::now();
        if now < failure.retry_at {
            return Err(failure.error());
        }
        if failure.old.strong_count() > 0 {
            // Operations that took the old database before it failed have not finished
            // yet (they fail fast); the file stays locked until they do.
            failure.retry_at = now + REOPEN_BACKOFF_MIN;
            return Err(failure.error());
        }
        match (self.open)() {
            Ok(database) => {
                tracing::info!("database opened again after an I/O failure");
                let database = Arc::new(database);
                *state = State::Open(Arc::clone(&database));
                Ok(database)
            }
            Err(error) => {
                failure.cause = Arc::new(error.into());
                failure.retry_at = now + backoff.next_delay(0);
                tracing::warn!(cause = %failure.cause, "database could not be opened again; will retry");
                Err(failure.error())
            }
        }
    }

    /// Called with the error `cause` of an operation on `database`: if the database now
    /// refuses everything for a previous I/O error, it is dropped from the slot, to be
    /// opened again by a later operation, and `cause` is the reason operations hear
    /// meanwhile.
    pub fn after_error(&self, database: &Arc<Database>, cause: &Arc<redb::Error>) {
        // `try_begin_write` checks for a latched I/O failure before anything else. When
        // another write is in progress it answers `WouldBlock` instead; that writer then
        // meets the failure itself and reports it here.
        let latched = matches!(
            database.try_begin_write(),
            Err(TransactionError::Storage(
                StorageError::PreviousIo | StorageError::DatabaseClosed
            ))
        );
        if !latched {
            return;
        }
        let mut inner = self.lock();
        let Inner { state, backoff } = &mut *inner;
        match state {
            State::Open(current) if Arc::ptr_eq(current, database) => {
                tracing::error!(%cause, "database failed an I/O operation; opening it again");
                *state = State::Failed(Failure {
                    old: Arc::downgrade(database),
                    cause: Arc::clone(cause),
                    retry_at: Instant::now() + backoff.next_delay(0),
                });
            }
            // A "previous I/O error" met by another operation may have closed it first;
            // the operation that met the full disk itself has the better reason.
            State::Failed(failure)
                if is_storage_full(cause)
                    && !is_storage_full(&failure.cause)
                    && std::ptr::eq(failure.old.as_ptr(), Arc::as_ptr(database)) =>
            {
                failure.cause = Arc::clone(cause);
            }
            // Closed (or even opened again) by another operation already.
            _ => {}
        }
    }

    /// Called after a successful commit: the disk takes writes again, so the next failure
    /// starts from the shortest backoff.
    pub fn committed(&self) {
        self.lock().backoff.reset();
    }

    /// The database as it is now, if open, without trying to open it again.
    pub fn current(&self) -> Option<Arc<Database>> {
        match &self.lock().state {
            State::Open(database) => Some(Arc::clone(database)),
            State::Failed(_) => None,
        }
    }

    /// The lock; a poisoned one still holds consistent data (every update is one
    /// assignment), so it is used as is.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
