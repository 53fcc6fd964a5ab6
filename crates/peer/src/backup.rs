//! Identity backup files and key rotation, on a user's data dir: [`export`] writes a
//! passphrase-protected backup ([`proto::backup`]: the identity file's secrets, the name and
//! the contacts' pinned keys), [`import`] restores one into a data dir, and [`rotate`]
//! replaces the identity with a new one that the discovery server accepted by a statement
//! signed with the old key.
//!
//! These run while no client runs on the data dir (the state file's lock says so if one
//! does). Every failure is a typed [`BackupFileError`]; nothing here panics on a file's
//! contents.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use proto::{
    Identity, IdentityError, Username,
    backup::{BackupContents, BackupError, KdfParams},
    identity::{IDENTITY_FILE, Rotation, create_private_dir, open_private_file, write_private_new},
};

use crate::{
    control::{ControlConfig, ControlError},
    state::{PinOutcome, State, StateError},
};

/// The new identity of a rotation under way, kept beside `identity.key` until the server
/// confirmed the rotation: a rotation that was cut short is finished with the same key.
pub const PENDING_IDENTITY_FILE: &str = "identity.next";

/// Why a backup could not be written or restored, or a rotation not made.
#[derive(Debug, thiserror::Error)]
pub enum BackupFileError {
    /// The backup's contents or passphrase.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The identity file.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The local state (the pins): a client running on this data dir holds it.
    #[error("the local state: {0} (is p2pchat running for this user? quit it first)")]
    State(#[from] StateError),
    /// Reading or writing the backup file.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The data dir already holds another identity.
    #[error(
        "{user} already has another identity here ({existing}; the backup holds {backup}): \
         importing would replace it; pass --force to do so"
    )]
    DifferentIdentity {
        /// The user.
        user: Username,
        /// The fingerprint of the identity here.
        existing: String,
        /// The fingerprint of the backup's.
        backup: String,
    },
    /// The backup is another user's.
    #[error("this backup is {backup}'s, not {asked}'s")]
    OtherUser {
        /// The user asked for.
        asked: Username,
        /// The user in the backup.
        backup: Username,
    },
    /// The discovery server did not accept the rotation (or could not be reached).
    #[error("the server did not confirm the rotation: {0}; the old key stays in use")]
    Server(#[from] ControlError),
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The identity's fingerprint.
    pub fingerprint: String,
    /// How many contacts' pinned keys went in.
    pub pins: usize,
}

/// Writes a backup of `user`'s identity in `data_dir` (and the contacts' pins) to `file`
/// (mode 0600), sealed under `passphrase` with scrypt `params`.
pub fn export(
    data_dir: &Path,
    user: &Username,
    passphrase: &str,
    params: KdfParams,
    file: &Path,
) -> Result<Exported, BackupFileError> {
    let identity = Identity::load(data_dir)?;
    let pins = State::open(data_dir)?.pins()?;
    let contents = BackupContents {
        user: user.clone(),
        secret: identity.secret_bytes().to_vec(),
        pins,
    };
    let text = proto::backup::seal(&contents, passphrase, params)?;
    let io_error = |source| BackupFileError::Io {
        path: file.to_path_buf(),
        source,
    };
    let mut out = open_private_file(file).map_err(io_error)?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(io_error)?;
    Ok(Exported {
        fingerprint: identity.public().fingerprint(),
        pins: contents.pins.len(),
    })
}

/// Reads and opens the backup `file` with `passphrase`.
pub fn read(file: &Path, passphrase: &str) -> Result<BackupContents, BackupFileError> {
    let bytes = fs::read(file).map_err(|source| BackupFileError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| BackupError::Corrupt("it is not text (not a backup file?)"))?;
    Ok(proto::backup::open(&text, passphrase)?)
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The identity's fingerprint.
    pub fingerprint: String,
    /// Whether an identity already here was replaced (`force`).
    pub replaced: bool,
    /// Contacts' keys pinned from the backup (pins already here are kept as they are).
    pub pins: usize,
}

/// Restores `contents` into `data_dir` (the folder of `contents.user`): the identity file,
/// then the contacts' pins that are not pinned here yet. An identity already here that is
/// another one is replaced only with `force`; the same one is left as it is.
pub async fn import(
    data_dir: &Path,
    contents: &BackupContents,
    force: bool,
) -> Result<Imported, BackupFileError> {
    let identity = Identity::from_secret_bytes(contents.secret_seeds()?);
    create_private_dir(data_dir)?;
    let replaced = match Identity::load(data_dir) {
        Ok(existing) if existing.public() == identity.public() => false,
        Ok(existing) if !force => {
            return Err(BackupFileError::DifferentIdentity {
                user: contents.user.clone(),
                existing: existing.public().fingerprint(),
                backup: identity.public().fingerprint(),
            });
        }
        Ok(_) => {
            identity.save(data_dir)?;
            true
        }
        Err(IdentityError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            if !write_private_new(data_dir, IDENTITY_FILE, identity.secret_bytes().as_slice())? {
                // A client started meanwhile made one: it must be this one.
                let existing = Identity::load(data_dir)?;
                if existing.public() != identity.public() {
                    return Err(BackupFileError::DifferentIdentity {
                        user: contents.user.clone(),
                        existing: existing.public().fingerprint(),
                        backup: identity.public().fingerprint(),
                    });
                }
            }
            false
        }
        Err(error) if force => {
            tracing::warn!(%error, "replacing an unreadable identity file");
            identity.save(data_dir)?;
            true
        }
        Err(error) => return Err(error.into()),
    };
    let state = State::open(data_dir)?;
    let mut pinned = 0;
    for (user, keys) in &contents.pins {
        if state.pin_if_absent(user, keys).await? == PinOutcome::New {
            pinned += 1;
        }
    }
    Ok(Imported {
        fingerprint: identity.public().fingerprint(),
        replaced,
        pins: pinned,
    })
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// The fingerprint of the keys given up.
    pub old: String,
    /// The fingerprint of the keys in use from now on.
    pub new: String,
}

/// Replaces the identity in `data_dir` with a new one (Ed25519 and X25519): the new key is
/// kept in [`PENDING_IDENTITY_FILE`], the server is asked over `control` (registered with
/// the old key) to move the name by a [`Rotation`] signed by both keys, and only once it
/// confirmed does the new key replace `identity.key`. If the server does not confirm, the
/// old key stays in use; running it again finishes with the same new key (also when the
/// server confirmed and the answer, or this process, was lost: the name is then already
/// bound to the pending key).
pub async fn rotate(data_dir: &Path, control: &ControlConfig) -> Result<Rotated, BackupFileError> {
    // Held to the end: a client running on this data dir would go on with the old key.
    let _no_client = State::open(data_dir)?;
    let old = Identity::load(data_dir)?;
    let pending = match pending_identity(data_dir)? {
        Some(pending) => pending,
        None => {
            let fresh = Identity::generate();
            if !write_private_new(
                data_dir,
                PENDING_IDENTITY_FILE,
                fresh.secret_bytes().as_slice(),
            )? {
                return Err(IdentityError::Corrupt {
                    path: data_dir.join(PENDING_IDENTITY_FILE),
                    reason: "another rotation made it meanwhile",
                }
                .into());
            }
            fresh
        }
    };
    let rotation = Rotation::sign(&control.user, &old, &pending, proto::now_ms());
    match crate::control::rotate_keys(control, &old, Some(rotation)).await {
        Ok(()) => {}
        // The name is no longer the old key's: if the pending key holds it, the server
        // confirmed an earlier attempt whose answer was lost.
        Err(ControlError::Refused(reply)) if reply.code == proto::ErrorCode::NameTaken => {
            crate::control::rotate_keys(control, &pending, None)
                .await
                .map_err(|_| ControlError::Refused(reply))?;
        }
        Err(error) => return Err(error.into()),
    }
    pending.save(data_dir)?;
    let _ = fs::remove_file(data_dir.join(PENDING_IDENTITY_FILE));
    Ok(Rotated {
        old: old.public().fingerprint(),
        new: pending.public().fingerprint(),
    })
}

/// The new identity of a rotation that was cut short, if any.
fn pending_identity(data_dir: &Path) -> Result<Option<Identity>, BackupFileError> {
    match Identity::load_file(&data_dir.join(PENDING_IDENTITY_FILE)) {
        Ok(pending) => Ok(Some(pending)),
        Err(IdentityError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters: these tests check the files, not the cost.
    const FAST: KdfParams = KdfParams::cheap_for_tests();

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[tokio::test]
    async fn export_then_import_restores_the_identity_and_the_pins() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("alice");
        let (identity, _) = Identity::load_or_create(&home).unwrap();
        let bob = Identity::generate().public().clone();
        {
            let state = State::open(&home).unwrap();
            state.pin_if_absent(&name("bob"), &bob).await.unwrap();
        }
        let file = root.path().join("alice.backup");
        let exported = export(&home, &name("alice"), "secret", FAST, &file).unwrap();
        assert_eq!(exported.pins, 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            read(&file, "not it"),
            Err(BackupFileError::Backup(BackupError::WrongPassphrase))
        ));
        let contents = read(&file, "secret").unwrap();
        assert_eq!(contents.user, name("alice"));

        let fresh = root.path().join("elsewhere").join("alice");
        let imported = import(&fresh, &contents, false).await.unwrap();
        assert!(!imported.replaced);
        assert_eq!(imported.pins, 1);
        assert_eq!(Identity::load(&fresh).unwrap().public(), identity.public());
        assert_eq!(
            State::open(&fresh).unwrap().pinned(&name("bob")).unwrap(),
            Some(bob)
        );
        // Importing the same identity again changes nothing.
        let again = import(&fresh, &contents, false).await.unwrap();
        assert_eq!((again.replaced, again.pins), (false, 0));
    }

    #[tokio::test]
    async fn a_different_identity_is_replaced_only_with_force() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("alice");
        let (original, _) = Identity::load_or_create(&home).unwrap();
        let contents = BackupContents {
            user: name("alice"),
            secret: Identity::generate().secret_bytes().to_vec(),
            pins: Vec::new(),
        };
        assert!(matches!(
            import(&home, &contents, false).await,
            Err(BackupFileError::DifferentIdentity { .. })
        ));
        assert_eq!(Identity::load(&home).unwrap().public(), original.public());
        let imported = import(&home, &contents, true).await.unwrap();
        assert!(imported.replaced);
        assert_ne!(Identity::load(&home).unwrap().public(), original.public());
    }

    #[test]
    fn a_missing_or_garbled_backup_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("none");
        assert!(matches!(
            read(&missing, "x"),
            Err(BackupFileError::Io { .. })
        ));
        let binary = root.path().join("binary");
        fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            read(&binary, "x"),
            Err(BackupFileError::Backup(BackupError::Corrupt(_)))
        ));
    }
}
