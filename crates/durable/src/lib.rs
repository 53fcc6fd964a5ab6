//! Durable writes to one redb file, shared by the discovery store and the peer's state.
//!
//! - [`DatabaseSlot`] holds the open [`redb::Database`] and opens the file again, with a
//!   [`Backoff`], after an I/O failure (a full disk, most often) made redb refuse
//!   everything, so a process recovers without a restart.
//! - [`GroupWriter`] is one thread that runs write jobs (closures over a
//!   [`redb::WriteTransaction`]) in groups, one commit (one `fsync`) per group, and answers
//!   each job's [`Ticket`] only once its group is durable; a job its caller awaits at once
//!   may commit on the caller's thread when the writer is idle
//!   ([`GroupWriter::submit_here`]).
//! - `testing` (the `testing` feature, for tests only): `SyncedDisk`, an in-memory file
//!   whose `fsync`s a test can hold, and the file as a crash would leave it.
//! - [`Error`] is what the slot and the writer fail with; it keeps the database error that
//!   caused it. [`JobError`] is the bound on a job's own error type.
//!
//! **Architecture Invariant:** this crate is a leaf: it depends on no other crate of the
//! workspace and knows no table; it only opens, hands out and recovers the database, and
//! orders, groups and commits closures.

use std::{sync::Arc, time::Duration};

mod slot;
#[cfg(feature = "testing")]
pub mod testing;
mod writer;

pub use slot::{DatabaseSlot, Opener, REOPEN_BACKOFF_MAX, REOPEN_BACKOFF_MIN};
pub use writer::{Commit, GroupWriter, LAZY_LINGER, Ticket};

/// Why a durable write (or getting the database for a read) failed. `Clone`, because one
/// failure answers every waiter of a group; the causes are shared behind an [`Arc`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The database failed: beginning, running or committing a transaction.
    #[error("database error: {0}")]
    Database(#[source] Arc<redb::Error>),
    /// The file failed an I/O operation and is closed until it opens again, which is
    /// retried with a backoff.
    #[error("{cause} (the database file is opened again once the disk takes writes)")]
    Reopening {
        /// The error that closed the database, or that the last attempt to open it again
        /// met.
        #[source]
        cause: Arc<redb::Error>,
    },
    /// A write shared by several waiters ([`GroupWriter::submit_shared`]) failed with this
    /// job error.
    #[error("{0}")]
    Shared(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// The writer thread has stopped (its [`GroupWriter`] was dropped).
    #[error("the writer has stopped")]
    WriterStopped,
}

impl Error {
    /// The database error behind this one, if there is one.
    pub fn database_error(&self) -> Option<&redb::Error> {
        match self {
            Error::Database(cause) | Error::Reopening { cause } => Some(cause),
            Error::Shared(_) | Error::WriterStopped => None,
        }
    }

    /// Whether the disk (or a quota) ran out of space, so nothing was written.
    pub fn is_storage_full(&self) -> bool {
        self.database_error().is_some_and(is_storage_full)
    }
}

impl From<redb::Error> for Error {
    fn from(error: redb::Error) -> Self {
        Error::Database(Arc::new(error))
    }
}

/// The error type of a write job: it carries this crate's errors (a failed commit, the
/// writer gone), and may say which database error it stands for.
pub trait JobError: From<Error> + Send + 'static {
    /// The database error behind this job error, if any. The writer hands it to the
    /// [`DatabaseSlot`], which closes the database if the error left redb refusing
    /// everything (and keeps it as the reason while the file is closed).
    fn database_error(&self) -> Option<&Arc<redb::Error>> {
        None
    }
}

impl JobError for Error {
    fn database_error(&self) -> Option<&Arc<redb::Error>> {
        match self {
            Error::Database(cause) => Some(cause),
            _ => None,
        }
    }
}

/// Whether `error` is the disk (or a quota) running out of space.
pub fn is_storage_full(error: &redb::Error) -> bool {
    /// ENOSPC and EDQUOT on Linux, for kernels' errors std does not map to `StorageFull`.
    const NO_SPACE: [i32; 2] = [28, 122];
    matches!(error, redb::Error::Io(io)
        if io.kind() == std::io::ErrorKind::StorageFull
            || io.raw_os_error().is_some_and(|code| NO_SPACE.contains(&code)))
}

/// Exponential backoff: a step that starts at `min` and doubles up to `max` after each
/// delay taken, back to `min` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff from `min` doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    /// The next delay: the current step plus up to a quarter of it as jitter (`jitter` in
    /// `0..=255` chooses how much; 0 for none), then doubles the step.
    pub fn next_delay(&mut self, jitter: u8) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        base + base / 4 * u32::from(jitter) / 255
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(backoff.next_delay(0), Duration::from_millis(100));
        assert_eq!(backoff.next_delay(0), Duration::from_millis(200));
        assert_eq!(backoff.next_delay(0), Duration::from_millis(350));
        assert_eq!(
            backoff.next_delay(255),
            Duration::from_millis(350) + Duration::from_millis(350) / 4
        );
        backoff.reset();
        assert_eq!(backoff.next_delay(0), Duration::from_millis(100));
    }

    #[test]
    fn a_full_disk_is_told_apart() {
        let full = redb::Error::Io(std::io::ErrorKind::StorageFull.into());
        assert!(is_storage_full(&full));
        assert!(is_storage_full(&redb::Error::Io(
            std::io::Error::from_raw_os_error(28)
        )));
        assert!(!is_storage_full(&redb::Error::PreviousIo));
        let closed = Error::Reopening {
            cause: Arc::new(full),
        };
        assert!(closed.is_storage_full());
        assert!(!Error::WriterStopped.is_storage_full());
    }
}
