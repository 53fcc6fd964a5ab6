//! [`DatabaseHandle`]: the embedded store's redb database, reopened after an I/O failure.
//!
//! Once a write to its file fails (a full disk, most often), redb fails every later
//! operation with [`redb::StorageError::PreviousIo`] until the database is closed and opened
//! again. A discovery server must not need a restart for that: after an operation fails,
//! [`DatabaseHandle::after_error`] asks the database whether it is in that state, and if so
//! drops the handle's reference to it; the next operation reopens the file (redb repairs
//! it if needed) and carries on with everything committed before the failure.
//!
//! Reopening waits until every operation still holding the old database has let go of it
//! (the file lock is held until then), and a failed reopen — or a reopened database that
//! fails again without one successful commit in between — doubles the wait before the
//! next attempt, up to [`REOPEN_BACKOFF_MAX`], so a disk that stays full costs one reopen
//! every few seconds, not one per request. Meanwhile operations fail at once with the
//! error that closed the database (a full disk stays "the disk is full").
//!
//! This module must not depend on the store's tables or records: it only opens, hands out
//! and recovers the [`Database`].

use std::{
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use redb::{Database, DatabaseError, StorageError, TransactionError};

use crate::StoreError;

/// The first wait before reopening a database that failed.
pub(super) const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest wait between two reopen attempts.
pub(super) const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Opens the database file (again). A closure, so tests can open it over a storage
/// backend that fails on demand.
pub(super) type Opener = Box<dyn Fn() -> Result<Database, DatabaseError> + Send + Sync>;

/// The current database, shared by every operation and the deposit writer thread.
pub(super) struct DatabaseHandle {
    open: Opener,
    state: Mutex<State>,
    /// Failures (of the database or of a reopen) since the last successful commit; sets
    /// the backoff.
    failures: AtomicU32,
}

/// Whether the database is usable.
enum State {
    /// Open and, as far as anyone has seen, healthy.
    Open(Arc<Database>),
    /// Failed; reopened by the first operation after `retry_at`.
    Failed(Failure),
}

/// Why and since when the database is unusable.
struct Failure {
    /// The failed database, still alive while an operation holds it (it keeps the file
    /// locked until the last one lets go).
    old: Weak<Database>,
    /// Whether the disk was full, so callers keep hearing "the disk is full".
    storage_full: bool,
    /// The error that closed the database, or that the last reopen attempt met.
    message: String,
    /// No reopen is attempted before this.
    retry_at: Instant,
}

impl Failure {
    /// The error an operation gets while the database is closed.
    fn error(&self) -> StoreError {
        let message = format!("{} (the database is being reopened)", self.message);
        if self.storage_full {
            StoreError::StorageFull(message)
        } else {
            StoreError::Embedded(message)
        }
    }
}

impl DatabaseHandle {
    /// A handle over an already opened `database`, which `open` opens again after a failure.
    pub(super) fn new(database: Database, open: Opener) -> Self {
        Self {
            open,
            state: Mutex::new(State::Open(Arc::new(database))),
            failures: AtomicU32::new(0),
        }
    }

    /// The database to run an operation on: the open one, or a reopened one if the last
    /// failed and its backoff has passed. Blocks while reopening (file I/O and perhaps a
    /// repair), so call it off the async runtime.
    pub(super) fn get(&self) -> Result<Arc<Database>, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let failure = match &mut *state {
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
                tracing::info!("embedded store reopened after an I/O failure");
                let database = Arc::new(database);
                *state = State::Open(Arc::clone(&database));
                Ok(database)
            }
            Err(error) => {
                let error = super::embedded_error(error);
                failure.storage_full = matches!(error, StoreError::StorageFull(_));
                failure.message = error.to_string();
                failure.retry_at = now + self.next_backoff();
                tracing::warn!(%error, "embedded store could not be reopened; will retry");
                Err(failure.error())
            }
        }
    }

    /// Called with the error of an operation on `database`: if the database now refuses
    /// everything for a previous I/O error, it is dropped from the handle, to be reopened
    /// by a later operation.
    pub(super) fn after_error(&self, database: &Arc<Database>, error: &StoreError) {
        if !matches!(error, StoreError::StorageFull(_) | StoreError::Embedded(_)) {
            return;
        }
        // `try_begin_write` checks for a latched I/O failure before anything else. When
        // another write is in progress it answers `WouldBlock` instead; that writer then
        // meets the failure itself and reports it here.
        let failed = matches!(
            database.try_begin_write(),
            Err(TransactionError::Storage(
                StorageError::PreviousIo | StorageError::DatabaseClosed
            ))
        );
        if !failed {
            return;
        }
        let storage_full = matches!(error, StoreError::StorageFull(_));
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *state {
            State::Open(current) if Arc::ptr_eq(current, database) => {
                tracing::error!(%error, "embedded store failed an I/O operation; reopening it");
                *state = State::Failed(Failure {
                    old: Arc::downgrade(database),
                    storage_full,
                    message: error.to_string(),
                    retry_at: Instant::now() + self.next_backoff(),
                });
            }
            // A "previous I/O error" from another operation may have closed it first; the
            // operation that met the full disk itself has the better reason.
            State::Failed(failure)
                if storage_full
                    && !failure.storage_full
                    && std::ptr::eq(failure.old.as_ptr(), Arc::as_ptr(database)) =>
            {
                failure.storage_full = true;
                failure.message = error.to_string();
            }
            // Closed (or even reopened) by another operation already.
            _ => {}
        }
    }

    /// Called after a successful commit: the disk takes writes again, so the next failure
    /// starts from the shortest backoff.
    pub(super) fn committed(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure and returns the wait before the next reopen attempt.
    fn next_backoff(&self) -> Duration {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed);
        REOPEN_BACKOFF_MIN
            .saturating_mul(1 << failures.min(16))
            .min(REOPEN_BACKOFF_MAX)
    }

    /// The database as it is now, if open (for tests that write behind the store's back).
    #[cfg(test)]
    pub(super) fn current(&self) -> Option<Arc<Database>> {
        match &*self.state.lock().unwrap_or_else(PoisonError::into_inner) {
            State::Open(database) => Some(Arc::clone(database)),
            State::Failed(_) => None,
        }
    }
}
