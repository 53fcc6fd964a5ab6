//! Test support (the `testing` feature): [`SyncedDisk`], an in-memory file that counts and
//! can hold its `fsync`s, and keeps what the last one made durable, so a test can see what a
//! crash at any moment would leave.

use std::sync::{
    Arc, Condvar, Mutex, PoisonError,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use redb::{Database, DatabaseError, StorageBackend, backends::InMemoryBackend};

/// An in-memory file that counts its `fsync`s, can hold them until released, and keeps a
/// copy of what the last one made durable (what a crash would leave). Clones share the
/// file.
#[derive(Debug, Clone, Default)]
pub struct SyncedDisk {
    live: Arc<InMemoryBackend>,
    syncs: Arc<AtomicUsize>,
    /// While true, `sync_data` waits (and says it is waiting).
    hold: Arc<(Mutex<bool>, Condvar)>,
    waiting: Arc<AtomicBool>,
    durable_image: Arc<Mutex<Vec<u8>>>,
}

impl SyncedDisk {
    /// A disk whose file (live and durable) is `image`: the file a crash left, found again
    /// at the next start.
    pub fn from_image(image: Vec<u8>) -> std::io::Result<Self> {
        let disk = Self::default();
        disk.live.set_len(image.len() as u64)?;
        disk.live.write(0, &image)?;
        *lock(&disk.durable_image) = image;
        Ok(disk)
    }

    /// How many `fsync`s have completed.
    pub fn syncs(&self) -> usize {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Whether an `fsync` is waiting for a hold to be released.
    pub fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Holds `fsync`s until the returned guard is dropped (also when a test fails, so a
    /// writer's thread is not left waiting and the test ends).
    pub fn hold_syncs(&self) -> impl Drop + use<> {
        struct Release(SyncedDisk);
        impl Drop for Release {
            fn drop(&mut self) {
                self.0.set_hold(false);
            }
        }
        self.set_hold(true);
        Release(self.clone())
    }

    /// The file as the last completed `fsync` left it: what a crash now would leave.
    pub fn durable_image(&self) -> Vec<u8> {
        lock(&self.durable_image).clone()
    }

    /// A database over a copy of what is durable: the file as a crash would leave it,
    /// opened again.
    pub fn after_crash(&self) -> Result<Database, DatabaseError> {
        let disk = Self::from_image(self.durable_image()).map_err(redb::StorageError::from)?;
        Database::builder().create_with_backend(disk)
    }

    fn set_hold(&self, hold: bool) {
        *lock(&self.hold.0) = hold;
        self.hold.1.notify_all();
    }
}

/// A poisoned lock (a test thread panicked) still guards whole values.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StorageBackend for SyncedDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.live.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.live.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.live.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        let (held, released) = &*self.hold;
        let mut held = lock(held);
        while *held {
            self.waiting.store(true, Ordering::SeqCst);
            held = released.wait(held).unwrap_or_else(PoisonError::into_inner);
        }
        self.waiting.store(false, Ordering::SeqCst);
        // The hold's lock is kept to the end, so once `hold_syncs` returns no `fsync` is
        // half done: the durable image stays as it is until the hold is released.
        self.live.sync_data()?;
        let mut image = vec![0; self.live.len()? as usize];
        self.live.read(0, &mut image)?;
        *lock(&self.durable_image) = image;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.live.write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_was_synced_survives_a_crash() {
        let disk = SyncedDisk::default();
        disk.set_len(6).unwrap();
        disk.write(0, b"synced").unwrap();
        disk.sync_data().unwrap();
        disk.write(0, b"lost!!").unwrap();
        assert_eq!(disk.durable_image(), b"synced");
        let after = SyncedDisk::from_image(disk.durable_image()).unwrap();
        let mut read = [0; 6];
        after.read(0, &mut read).unwrap();
        assert_eq!(&read, b"synced");
        assert_eq!(disk.syncs(), 1);
    }
}
