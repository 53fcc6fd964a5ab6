//! Which discovery server key this client trusts, per server address: pinned on first
//! contact, as SSH's known_hosts does, and refused loudly when it changes.
//!
//! The pins live in `known_servers` in the user's data dir (0600), one line per server
//! address: the address, then the key's 64 hex digits. A key given up front
//! (`--server-key` / `P2PCHAT_SERVER_KEY`, a fingerprint) must match what the server
//! presents, and is then pinned. `p2pchat trust-server` replaces a pin after the user has
//! checked the new fingerprint with the operator.
//!
//! The file is small and read and written only when the control connection connects, off
//! the runtime's threads (`spawn_blocking`).

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use proto::{Fingerprint, ServerPublicKey};

/// The pins' file name inside the user's data dir.
pub const KNOWN_SERVERS_FILE: &str = "known_servers";

/// Why a server's key is not trusted (or the pins cannot be used).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerKeyError {
    /// The key differs from the one given up front.
    #[error(
        "the server at {address} presents key {presented}, not the key {expected} given with --server-key (P2PCHAT_SERVER_KEY); nothing was sent. Check the fingerprint with the server's operator (`p2pchat-discovery key` prints it)"
    )]
    NotExpected {
        /// The server address.
        address: String,
        /// The fingerprint given.
        expected: Fingerprint,
        /// The key presented.
        presented: ServerPublicKey,
    },
    /// The key differs from the pinned one.
    #[error(
        "THE SERVER'S KEY CHANGED: the server at {address} presents key {presented}, but this client pinned key {pinned} for it; nothing was sent. Someone may be intercepting the connection, or the server got a new key. Ask the operator for the server's fingerprint (`p2pchat-discovery key`); if it is {presented}, accept it with `p2pchat trust-server` (or pass --server-key {presented})"
    )]
    Changed {
        /// The server address.
        address: String,
        /// The key pinned.
        pinned: ServerPublicKey,
        /// The key presented.
        presented: ServerPublicKey,
    },
    /// The pins file cannot be read or written.
    #[error("cannot use the known servers file {path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

/// What [`ServerTrust::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trusted {
    /// The key pinned before.
    Pinned,
    /// First contact (or the key given up front): pinned now.
    PinnedNow,
}

/// The pins of one user, and the key given up front, if any.
#[derive(Debug, Clone)]
pub struct ServerTrust {
    path: PathBuf,
    expected: Option<Fingerprint>,
}

impl ServerTrust {
    /// The pins in `data_dir`; `expected`: a fingerprint the server must present.
    pub fn new(data_dir: &Path, expected: Option<Fingerprint>) -> Self {
        Self {
            path: data_dir.join(KNOWN_SERVERS_FILE),
            expected,
        }
    }

    /// Checks the key the server at `address` presented, pinning it on first contact or
    /// when it is the key given up front.
    pub async fn check(
        &self,
        address: &str,
        presented: ServerPublicKey,
    ) -> Result<Trusted, ServerKeyError> {
        let this = self.clone();
        let address = address.to_owned();
        blocking(move || this.check_now(&address, presented)).await
    }

    fn check_now(
        &self,
        address: &str,
        presented: ServerPublicKey,
    ) -> Result<Trusted, ServerKeyError> {
        let pins = self.read()?;
        let pinned = pin_of(&pins, address);
        if let Some(expected) = self.expected {
            if !presented.matches(&expected) {
                return Err(ServerKeyError::NotExpected {
                    address: address.to_owned(),
                    expected,
                    presented,
                });
            }
            if pinned == Some(presented) {
                return Ok(Trusted::Pinned);
            }
        } else {
            match pinned {
                Some(pinned) if pinned == presented => return Ok(Trusted::Pinned),
                Some(pinned) => {
                    return Err(ServerKeyError::Changed {
                        address: address.to_owned(),
                        pinned,
                        presented,
                    });
                }
                None => {}
            }
        }
        self.pin(pins, address, presented)?;
        tracing::info!(%address, fingerprint = %presented, "pinned the server's key");
        Ok(Trusted::PinnedNow)
    }

    /// Writes `pins` with `key` as the one pin of `address`.
    fn pin(
        &self,
        mut pins: Vec<(String, ServerPublicKey)>,
        address: &str,
        key: ServerPublicKey,
    ) -> Result<(), ServerKeyError> {
        pins.retain(|(at, _)| at != address);
        pins.push((address.to_owned(), key));
        self.write(&pins)
    }

    /// Pins `presented` for `address`, replacing any earlier pin (the user checked it);
    /// returns the key pinned before.
    pub async fn replace(
        &self,
        address: &str,
        presented: ServerPublicKey,
    ) -> Result<Option<ServerPublicKey>, ServerKeyError> {
        let this = self.clone();
        let address = address.to_owned();
        blocking(move || {
            let pins = this.read()?;
            let before = pin_of(&pins, &address);
            this.pin(pins, &address, presented)?;
            Ok(before)
        })
        .await
    }

    /// The key pinned for `address`, if any.
    pub async fn pinned(&self, address: &str) -> Result<Option<ServerPublicKey>, ServerKeyError> {
        let this = self.clone();
        let address = address.to_owned();
        blocking(move || Ok(pin_of(&this.read()?, &address))).await
    }

    fn file_error(&self, detail: impl std::fmt::Display) -> ServerKeyError {
        ServerKeyError::File {
            path: self.path.clone(),
            detail: detail.to_string(),
        }
    }

    fn read(&self) -> Result<Vec<(String, ServerPublicKey)>, ServerKeyError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(self.file_error(error)),
        };
        let mut pins = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = line
                .split_once(' ')
                .and_then(|(address, key)| Some((address, ServerPublicKey::from_hex(key.trim())?)));
            match parsed {
                Some((address, key)) => pins.push((address.to_owned(), key)),
                None => {
                    return Err(self.file_error(format!(
                        "line {} is not `<address> <64 hex digits>`",
                        number + 1
                    )));
                }
            }
        }
        Ok(pins)
    }

    /// Replaces the file: a 0600 temporary file, made durable, renamed over it.
    fn write(&self, pins: &[(String, ServerPublicKey)]) -> Result<(), ServerKeyError> {
        let mut text = String::from("# p2pchat: discovery server keys, pinned per address\n");
        for (address, key) in pins {
            text.push_str(&format!("{address} {}\n", key.to_hex()));
        }
        let temporary = self.path.with_extension("tmp");
        let written = proto::identity::open_private_file(&temporary).and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        });
        written
            .and_then(|()| std::fs::rename(&temporary, &self.path))
            .map_err(|error| self.file_error(error))
    }
}

/// The key pinned for `address` in `pins`.
fn pin_of(pins: &[(String, ServerPublicKey)], address: &str) -> Option<ServerPublicKey> {
    pins.iter()
        .find(|(at, _)| at == address)
        .map(|(_, key)| *key)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ServerKeyError> + Send + 'static,
) -> Result<T, ServerKeyError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| {
            Err(ServerKeyError::File {
                path: PathBuf::from(KNOWN_SERVERS_FILE),
                detail: error.to_string(),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_key_is_pinned_and_a_changed_one_refused_until_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let trust = ServerTrust::new(dir.path(), None);
        let first = proto::ServerKey::generate().public();
        let second = proto::ServerKey::generate().public();
        assert_eq!(trust.check("h:1", first).await, Ok(Trusted::PinnedNow));
        assert_eq!(trust.check("h:1", first).await, Ok(Trusted::Pinned));
        // Another address is its own server.
        assert_eq!(trust.check("h:2", second).await, Ok(Trusted::PinnedNow));
        let error = trust.check("h:1", second).await.unwrap_err();
        let text = error.to_string();
        assert!(text.contains(&first.fingerprint()) && text.contains(&second.fingerprint()));
        assert!(text.contains("p2pchat trust-server"));
        assert_eq!(trust.replace("h:1", second).await, Ok(Some(first)));
        assert_eq!(trust.check("h:1", second).await, Ok(Trusted::Pinned));
        assert_eq!(trust.pinned("h:2").await, Ok(Some(second)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(KNOWN_SERVERS_FILE);
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[tokio::test]
    async fn a_key_given_up_front_must_match_and_replaces_the_pin() {
        let dir = tempfile::tempdir().unwrap();
        let old = proto::ServerKey::generate().public();
        let new = proto::ServerKey::generate().public();
        ServerTrust::new(dir.path(), None)
            .check("h:1", old)
            .await
            .unwrap();
        let given: Fingerprint = new.fingerprint().parse().unwrap();
        let trust = ServerTrust::new(dir.path(), Some(given));
        assert!(matches!(
            trust.check("h:1", old).await,
            Err(ServerKeyError::NotExpected { .. })
        ));
        assert_eq!(trust.check("h:1", new).await, Ok(Trusted::PinnedNow));
        assert_eq!(
            ServerTrust::new(dir.path(), None).check("h:1", new).await,
            Ok(Trusted::Pinned)
        );
    }

    #[tokio::test]
    async fn a_damaged_pins_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KNOWN_SERVERS_FILE), "h:1 nothex\n").unwrap();
        let trust = ServerTrust::new(dir.path(), None);
        let error = trust
            .check("h:1", proto::ServerKey::generate().public())
            .await
            .unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
    }
}
