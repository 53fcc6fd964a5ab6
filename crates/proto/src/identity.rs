//! Identities: a user's Ed25519 identity key and the X25519 key it signs.
//!
//! [`Identity`] holds the secrets (zeroized on drop, saved with mode 0600 in a 0700 folder,
//! refused when either is looser). [`PublicKeys`] is what leaves the machine. This module
//! also builds the byte strings that get signed, so signer and verifier cannot disagree:
//! [`registration_transcript`] and [`announce_proof`].

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};
use zeroize::Zeroizing;

use crate::name::Username;

/// The file, inside a user's data dir, that holds the identity secrets.
pub const IDENTITY_FILE: &str = "identity.key";
const EXCHANGE_KEY_CONTEXT: &[u8] = b"p2pchat x25519 key v1";
const REGISTRATION_CONTEXT: &[u8] = b"p2pchat registration v2";
const ANNOUNCE_CONTEXT: &[u8] = b"p2pchat announce v1";
const ROTATION_CONTEXT: &[u8] = b"p2pchat rotation v1";
const RELEASE_CONTEXT: &[u8] = b"p2pchat release name v1";
/// The length of the identity file: the Ed25519 seed, then the X25519 secret.
pub const SECRET_FILE_LEN: usize = 64;

/// A user's public keys, as bound to their name at the discovery server.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeys {
    /// The Ed25519 identity (verifying) key.
    pub identity: [u8; 32],
    /// The X25519 key used for pairwise message keys.
    pub exchange: [u8; 32],
    /// The identity key's signature over the exchange key.
    pub exchange_signature: Signature,
}

impl std::fmt::Debug for PublicKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKeys({})", self.fingerprint())
    }
}

/// A key or signature that does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The identity key is not a valid Ed25519 point.
    #[error("the identity key is not a valid Ed25519 key")]
    BadIdentityKey,
    /// The exchange key is not signed by the identity key.
    #[error("the X25519 key is not signed by the identity key")]
    BadExchangeSignature,
    /// A signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
}

impl PublicKeys {
    /// The identity key, checked to be a valid point.
    pub fn identity_key(&self) -> Result<VerifyingKey, KeyError> {
        VerifyingKey::from_bytes(&self.identity).map_err(|_| KeyError::BadIdentityKey)
    }

    /// Checks that the identity key signed the exchange key.
    pub fn verify(&self) -> Result<(), KeyError> {
        self.identity_key()?
            .verify_strict(
                &exchange_key_message(&self.exchange),
                &self.exchange_signature,
            )
            .map_err(|_| KeyError::BadExchangeSignature)
    }

    /// Checks `signature` over `message` with the identity key.
    pub fn verify_signature(&self, message: &[u8], signature: &Signature) -> Result<(), KeyError> {
        self.identity_key()?
            .verify_strict(message, signature)
            .map_err(|_| KeyError::BadSignature)
    }

    /// A short human fingerprint of both keys: 8 groups of 4 hex digits.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::new()
            .chain_update(self.identity)
            .chain_update(self.exchange)
            .finalize();
        digest[..16]
            .chunks(2)
            .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn exchange_key_message(exchange: &[u8; 32]) -> Vec<u8> {
    [EXCHANGE_KEY_CONTEXT, exchange.as_slice()].concat()
}

/// Appends `part` with a 4-byte big-endian length prefix, so concatenations are unambiguous
/// ("ab" + "c" never equals "a" + "bc").
pub(crate) fn push_field(out: &mut Vec<u8>, part: &[u8]) {
    let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(part);
}

/// The bytes a client signs to register `user` with `keys` against the server's `nonce`,
/// on the connection whose Noise handshake hash is `channel`
/// ([`crate::Secured::handshake_hash`]). The nonce is fresh per connection, so a recorded
/// signature cannot be replayed; the channel binds it to this encrypted connection, so a
/// server the client was tricked into trusting cannot pass the signature on to the real
/// one.
pub fn registration_transcript(
    nonce: &[u8; 32],
    channel: &[u8; 32],
    user: &Username,
    keys: &PublicKeys,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(232);
    push_field(&mut out, REGISTRATION_CONTEXT);
    push_field(&mut out, nonce);
    push_field(&mut out, channel);
    push_field(&mut out, user.as_str().as_bytes());
    push_field(&mut out, &keys.identity);
    push_field(&mut out, &keys.exchange);
    out
}

/// HMAC-SHA256 under the operator secret over the server's `nonce` and the announcement
/// `text`: proves the operator without sending the secret.
pub fn announce_proof(secret: &[u8], nonce: &[u8; 32], text: &str) -> [u8; 32] {
    operator_proof(secret, ANNOUNCE_CONTEXT, nonce, text)
}

/// HMAC-SHA256 under the operator secret over the server's `nonce` and the name to
/// release: proves the operator for [`crate::Request::ReleaseName`].
pub fn release_proof(secret: &[u8], nonce: &[u8; 32], user: &Username) -> [u8; 32] {
    operator_proof(secret, RELEASE_CONTEXT, nonce, user.as_str())
}

/// HMAC-SHA256 under the operator secret over an operation's `context`, the server's
/// `nonce` and the operation's `text`.
pub fn operator_proof(secret: &[u8], context: &[u8], nonce: &[u8; 32], text: &str) -> [u8; 32] {
    let mut message = Vec::with_capacity(text.len() + 64);
    push_field(&mut message, context);
    push_field(&mut message, nonce);
    push_field(&mut message, text.as_bytes());
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(&message);
    mac.finalize().into_bytes().into()
}

/// Checks an [`announce_proof`] in constant time.
pub fn verify_announce_proof(
    secret: &[u8],
    nonce: &[u8; 32],
    text: &str,
    proof: &[u8; 32],
) -> bool {
    constant_time_eq(&announce_proof(secret, nonce, text), proof)
}

/// Compares two proofs in constant time: folds the differences.
pub fn constant_time_eq(expected: &[u8; 32], proof: &[u8; 32]) -> bool {
    expected
        .iter()
        .zip(proof.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// The version prefixed to every safety-number half (Signal's `FINGERPRINT_VERSION`).
const SAFETY_NUMBER_VERSION: u16 = 0;
/// SHA-512 rounds per half, as Signal's `NumericFingerprintGenerator` uses.
pub const SAFETY_NUMBER_ITERATIONS: usize = 5_200;

/// One party's half of a safety number: 30 digits, computed as Signal's
/// `NumericFingerprintGenerator` does: `hash = SHA-512(version (2 bytes, big-endian) ||
/// key || name)`, then [`SAFETY_NUMBER_ITERATIONS`] times `hash = SHA-512(hash || key)`;
/// the first 30 bytes are six 5-byte chunks, each read big-endian, modulo 100,000, as 5
/// digits. The key is the Ed25519 identity key (it signs the X25519 key).
pub fn safety_number_half(user: &Username, keys: &PublicKeys) -> String {
    let mut hash = Sha512::new()
        .chain_update(SAFETY_NUMBER_VERSION.to_be_bytes())
        .chain_update(keys.identity)
        .chain_update(user.as_str().as_bytes())
        .finalize();
    for _ in 0..SAFETY_NUMBER_ITERATIONS {
        hash = Sha512::new()
            .chain_update(hash)
            .chain_update(keys.identity)
            .finalize();
    }
    hash[..30]
        .chunks(5)
        .map(|chunk| {
            let value = chunk
                .iter()
                .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
            format!("{:05}", value % 100_000)
        })
        .collect()
}

/// The safety number of a pair: both parties' [`safety_number_half`]s, the smaller first
/// (as Signal orders them), so both sides compute the same 60 digits; shown in twelve
/// groups of five. Compare it out of band before trusting a key: a server that gave each
/// side another key for the other would have to find keys whose 30-digit halves both match
/// (a second-preimage search of about 2^100 per half, each try 5,200 SHA-512s), where one
/// hash over both parties let it search for a collision between the two views.
pub fn safety_number(a: (&Username, &PublicKeys), b: (&Username, &PublicKeys)) -> String {
    let mut halves = [safety_number_half(a.0, a.1), safety_number_half(b.0, b.1)];
    halves.sort();
    let digits = halves.concat();
    digits
        .as_bytes()
        .chunks(5)
        .map(|group| String::from_utf8_lossy(group).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A statement that `user`'s name moves from the keys `old` to the keys `new`, signed by
/// both identity keys: the old one says "my successor is `new`", the new one proves its
/// holder made the statement too (nobody binds someone else's key to their name). The
/// discovery server checks it against the binding and keeps it; a contact who pinned `old`
/// checks it again ([`follow_rotations`]), so a server cannot invent a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// Whose keys change.
    pub user: Username,
    /// The keys bound until now.
    pub old: PublicKeys,
    /// The keys bound from now on.
    pub new: PublicKeys,
    /// When the statement was made (milliseconds since the Unix epoch), for people.
    pub at_ms: u64,
    /// The old identity key's signature over [`Rotation::transcript`].
    pub old_signature: Signature,
    /// The new identity key's signature over [`Rotation::transcript`].
    pub new_signature: Signature,
}

impl Rotation {
    /// `old` hands `user`'s name to `new`, at `at_ms`.
    pub fn sign(user: &Username, old: &Identity, new: &Identity, at_ms: u64) -> Self {
        let transcript = rotation_transcript(user, old.public(), new.public(), at_ms);
        Self {
            user: user.clone(),
            old: old.public().clone(),
            new: new.public().clone(),
            at_ms,
            old_signature: old.sign(&transcript),
            new_signature: new.sign(&transcript),
        }
    }

    /// The bytes both keys sign.
    pub fn transcript(&self) -> Vec<u8> {
        rotation_transcript(&self.user, &self.old, &self.new, self.at_ms)
    }

    /// Checks both signatures and that each key set is sound (its X25519 key signed by
    /// its identity key).
    pub fn verify(&self) -> Result<(), KeyError> {
        self.old.verify()?;
        self.new.verify()?;
        let transcript = self.transcript();
        self.old
            .verify_signature(&transcript, &self.old_signature)?;
        self.new.verify_signature(&transcript, &self.new_signature)
    }
}

fn rotation_transcript(user: &Username, old: &PublicKeys, new: &PublicKeys, at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(200);
    push_field(&mut out, ROTATION_CONTEXT);
    push_field(&mut out, user.as_str().as_bytes());
    push_field(&mut out, &old.identity);
    push_field(&mut out, &old.exchange);
    push_field(&mut out, &new.identity);
    push_field(&mut out, &new.exchange);
    push_field(&mut out, &at_ms.to_be_bytes());
    out
}

/// Whether `rotations` (oldest first, as the server keeps them) lead `user`'s name from the
/// `pinned` keys to `offered`: a chain of statements for `user`, each verified and each
/// starting at the keys the one before ended at. Statements that do not continue the chain
/// are skipped (a contact may have pinned a key after the first rotations were made).
pub fn follow_rotations(
    user: &Username,
    pinned: &PublicKeys,
    offered: &PublicKeys,
    rotations: &[Rotation],
) -> bool {
    let mut current = pinned;
    for rotation in rotations {
        if &rotation.user == user && &rotation.old == current && rotation.verify().is_ok() {
            current = &rotation.new;
        }
    }
    current == offered
}

/// Why an identity could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file or folder is readable by others.
    #[error(
        "{path} has mode {mode:o}, which lets other users read it; run `chmod {want:o} {path}` and start again"
    )]
    LoosePermissions {
        /// The offending path.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// The mode it should have.
        want: u32,
    },
    /// The file is not an identity file.
    #[error("{path} is not a valid identity file ({reason})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// Reading or writing failed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// A user's secret keys. Never serialised onto the wire; zeroized on drop.
pub struct Identity {
    signing: SigningKey,
    exchange: x25519_dalek::StaticSecret,
    public: PublicKeys,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public.fingerprint())
    }
}

impl Identity {
    /// A new random identity.
    pub fn generate() -> Self {
        let mut seeds = Zeroizing::new([0u8; SECRET_FILE_LEN]);
        crate::fill_random(seeds.as_mut_slice());
        Self::from_secret_bytes(&seeds)
    }

    /// The identity whose secrets are `seeds`, as [`Identity::secret_bytes`] gives them
    /// (what the identity file and a backup hold).
    pub fn from_secret_bytes(seeds: &[u8; SECRET_FILE_LEN]) -> Self {
        let mut signing_seed = Zeroizing::new([0u8; 32]);
        let mut exchange_seed = Zeroizing::new([0u8; 32]);
        signing_seed.copy_from_slice(&seeds[..32]);
        exchange_seed.copy_from_slice(&seeds[32..]);
        let signing = SigningKey::from_bytes(&signing_seed);
        let exchange = x25519_dalek::StaticSecret::from(*exchange_seed);
        let exchange_public = x25519_dalek::PublicKey::from(&exchange).to_bytes();
        let public = PublicKeys {
            identity: signing.verifying_key().to_bytes(),
            exchange: exchange_public,
            exchange_signature: signing.sign(&exchange_key_message(&exchange_public)),
        };
        Self {
            signing,
            exchange,
            public,
        }
    }

    /// The public half.
    pub fn public(&self) -> &PublicKeys {
        &self.public
    }

    /// Signs `message` with the identity key.
    pub fn sign(&self, message: &[u8]) -> Signature {
        self.signing.sign(message)
    }

    /// The exchange key's secret, for the peer links' Noise handshake.
    pub(crate) fn exchange_secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.exchange.to_bytes())
    }

    /// X25519 with `peer_exchange`; `None` when the result is all zero (a low-order key).
    pub(crate) fn diffie_hellman(&self, peer_exchange: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let shared = self
            .exchange
            .diffie_hellman(&x25519_dalek::PublicKey::from(*peer_exchange));
        shared
            .was_contributory()
            .then(|| Zeroizing::new(shared.to_bytes()))
    }

    /// Loads the identity from `dir`, or creates and saves a new one if there is none.
    /// Returns the identity and whether it was created now.
    ///
    /// Two first starts at once on one data dir end with the same identity: the new file
    /// is published only if none exists yet ([`write_private_new`]), and the loser loads
    /// the winner's key instead of running with one that is not on disk.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool), IdentityError> {
        create_private_dir(dir)?;
        match Self::load(dir) {
            Ok(identity) => Ok((identity, false)),
            Err(IdentityError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let identity = Self::generate();
                if write_private_new(dir, IDENTITY_FILE, identity.secret_bytes().as_slice())? {
                    Ok((identity, true))
                } else {
                    Ok((Self::load(dir)?, false))
                }
            }
            Err(error) => Err(error),
        }
    }

    /// Loads the identity from `dir`, refusing a folder or file that others can read.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        // The folder first: a loose folder is refused even before its first key exists.
        check_private(dir, 0o700)?;
        Self::load_file(&dir.join(IDENTITY_FILE))
    }

    /// Loads an identity from the file `path` (the identity file's format), refusing a file
    /// others can read. A missing file is [`IdentityError::Io`] with `NotFound`.
    pub fn load_file(path: &Path) -> Result<Self, IdentityError> {
        let bytes = Zeroizing::new(fs::read(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?);
        check_private(path, 0o600)?;
        let seeds: &[u8; SECRET_FILE_LEN] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| IdentityError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "wrong length",
                })?;
        Ok(Self::from_secret_bytes(seeds))
    }

    /// Saves the identity in `dir` (created 0700 if missing) as a 0600 file, written to a
    /// temporary file and renamed, so a crash leaves either the old file or the new one.
    /// Replaces an identity saved before.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        create_private_dir(dir)?;
        let path = dir.join(IDENTITY_FILE);
        let io_error = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        let temporary =
            write_private_temporary(dir, IDENTITY_FILE, self.secret_bytes().as_slice())?;
        fs::rename(&temporary, &path).map_err(io_error)?;
        sync_dir(dir).map_err(io_error)
    }

    /// The two secret seeds as the identity file holds them (for a backup; zeroized on
    /// drop).
    pub fn secret_bytes(&self) -> Zeroizing<[u8; SECRET_FILE_LEN]> {
        let mut seeds = Zeroizing::new([0u8; SECRET_FILE_LEN]);
        seeds[..32].copy_from_slice(self.signing.as_bytes());
        seeds[32..].copy_from_slice(self.exchange.as_bytes());
        seeds
    }
}

/// Writes `bytes` to a new 0600 file `dir/name` only if there is none yet, atomically: the
/// bytes go to a temporary file of this call's own, made durable, then hard-linked in
/// place (which fails if the name exists) and the folder synced, so a crash or a
/// concurrent writer never leaves a partial file or replaces another's. Returns whether
/// this call's file was published (false: one existed, and is left as it was).
pub fn write_private_new(dir: &Path, name: &str, bytes: &[u8]) -> Result<bool, IdentityError> {
    let path = dir.join(name);
    let io_error = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    let temporary = write_private_temporary(dir, name, bytes)?;
    let linked = fs::hard_link(&temporary, &path);
    let _ = fs::remove_file(&temporary);
    match linked {
        Ok(()) => {
            sync_dir(dir).map_err(io_error)?;
            Ok(true)
        }
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(io_error(error)),
    }
}

/// Writes `bytes` durably to a fresh 0600 temporary file beside `dir/name`, named for
/// this call alone; returns its path.
fn write_private_temporary(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, IdentityError> {
    let suffix: [u8; 8] = crate::random_bytes();
    let temporary = dir.join(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        u64::from_le_bytes(suffix)
    ));
    let io_error = |source| IdentityError::Io {
        path: temporary.clone(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temporary).map_err(io_error)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(error) = written {
        let _ = fs::remove_file(&temporary);
        return Err(io_error(error));
    }
    Ok(temporary)
}

/// Makes a folder's entries (a file just renamed or linked into it) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Creates `dir` (and parents) with mode 0700 if missing; an existing folder is left as is
/// (loading checks it).
pub fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    let io_error = |source| IdentityError::Io {
        path: dir.to_path_buf(),
        source,
    };
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_error)
}

/// Opens `path` for writing, truncated, created with mode 0600.
pub fn open_private_file(path: &Path) -> io::Result<fs::File> {
    open_private(path, true)
}

/// Creates `path` empty with mode 0600 if it is missing, and tightens an existing file to
/// 0600, leaving its contents alone: for a file another library then opens itself (a
/// database), which would otherwise create it with the umask's mode (often 0644).
pub fn create_private_file(path: &Path) -> io::Result<()> {
    open_private(path, false).map(drop)
}

/// Opens `path` for writing (truncated or not), created with mode 0600, tightened to 0600.
fn open_private(path: &Path, truncate: bool) -> io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(truncate);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    // An existing file keeps its old mode through `open`; tighten it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Refuses `path` if group or others have any access (mode bits beyond `want`).
pub fn check_private(path: &Path, want: u32) -> Result<(), IdentityError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let metadata = fs::metadata(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::LoosePermissions {
                path: path.to_path_buf(),
                mode,
                want,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = (path, want);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn create_private_file_makes_or_tightens_a_file_to_0600_keeping_its_contents() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let fresh = root.path().join("fresh");
        create_private_file(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o600);
        let loose = root.path().join("loose");
        fs::write(&loose, b"kept").unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
        create_private_file(&loose).unwrap();
        assert_eq!(mode(&loose), 0o600);
        assert_eq!(fs::read(&loose).unwrap(), b"kept");
    }

    #[test]
    fn exchange_key_is_signed_and_checked() {
        let identity = Identity::generate();
        identity.public().verify().unwrap();
        let mut forged = identity.public().clone();
        forged.exchange = Identity::generate().public().exchange;
        assert_eq!(forged.verify(), Err(KeyError::BadExchangeSignature));
    }

    #[test]
    fn registration_signature_binds_nonce_channel_name_and_keys() {
        let identity = Identity::generate();
        let nonce = [7u8; 32];
        let channel = [9u8; 32];
        let transcript =
            registration_transcript(&nonce, &channel, &name("alice"), identity.public());
        let signature = identity.sign(&transcript);
        identity
            .public()
            .verify_signature(&transcript, &signature)
            .unwrap();
        let other_channel =
            registration_transcript(&nonce, &[1u8; 32], &name("alice"), identity.public());
        assert!(
            identity
                .public()
                .verify_signature(&other_channel, &signature)
                .is_err()
        );
        let other_nonce =
            registration_transcript(&[8u8; 32], &channel, &name("alice"), identity.public());
        assert!(
            identity
                .public()
                .verify_signature(&other_nonce, &signature)
                .is_err()
        );
        let other_name =
            registration_transcript(&nonce, &channel, &name("alicf"), identity.public());
        assert!(
            identity
                .public()
                .verify_signature(&other_name, &signature)
                .is_err()
        );
    }

    #[test]
    fn saved_identity_loads_back_and_loose_modes_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("alice");
        let (created, fresh) = Identity::load_or_create(&dir).unwrap();
        assert!(fresh);
        let file_mode = fs::metadata(dir.join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let (loaded, fresh) = Identity::load_or_create(&dir).unwrap();
        assert!(!fresh);
        assert_eq!(loaded.public(), created.public());

        fs::set_permissions(dir.join(IDENTITY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load(&dir),
            Err(IdentityError::LoosePermissions { .. })
        ));
        fs::set_permissions(dir.join(IDENTITY_FILE), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            Identity::load(&dir),
            Err(IdentityError::LoosePermissions { .. })
        ));
    }

    /// Regression: two first starts at once on one data dir each generated a key and
    /// wrote it through the same temporary file, so one ran (and bound the name) with a
    /// key that was not the one left on disk: that identity was lost at the next start.
    #[test]
    fn concurrent_first_starts_end_with_the_key_on_disk() {
        for _ in 0..20 {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("home");
            let barrier = std::sync::Barrier::new(2);
            let results: Vec<_> = std::thread::scope(|scope| {
                let starts: Vec<_> = (0..2)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            Identity::load_or_create(&dir)
                        })
                    })
                    .collect();
                starts
                    .into_iter()
                    .map(|start| start.join().unwrap())
                    .collect()
            });
            let on_disk = Identity::load(&dir).unwrap();
            let created = results
                .iter()
                .filter(|result| matches!(result, Ok((_, true))))
                .count();
            assert_eq!(created, 1, "exactly one start created the identity");
            for result in results {
                let (identity, _) = result.unwrap();
                assert_eq!(identity.public(), on_disk.public());
            }
            let leftovers = fs::read_dir(&dir).unwrap().count();
            assert_eq!(leftovers, 1, "no temporary file is left behind");
        }
    }

    /// Regression: a loose folder was refused only once it held a key, so the first run
    /// created the identity (and bound the name) in it and every later run refused it.
    #[cfg(unix)]
    #[test]
    fn a_loose_folder_is_refused_before_the_first_key() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("home");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            Identity::load_or_create(&dir),
            Err(IdentityError::LoosePermissions { mode: 0o755, .. })
        ));
        assert!(!dir.join(IDENTITY_FILE).exists());
    }

    #[test]
    fn corrupt_identity_file_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        create_private_dir(&root.path().join("x")).unwrap();
        let dir = root.path().join("x");
        let mut file = open_private_file(&dir.join(IDENTITY_FILE)).unwrap();
        file.write_all(b"short").unwrap();
        assert!(matches!(
            Identity::load(&dir),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    #[test]
    fn safety_number_is_symmetric_deterministic_and_sixty_digits() {
        let a = Identity::generate();
        let b = Identity::generate();
        let forward = safety_number((&name("a"), a.public()), (&name("b"), b.public()));
        let backward = safety_number((&name("b"), b.public()), (&name("a"), a.public()));
        assert_eq!(forward, backward);
        assert_eq!(
            forward,
            safety_number((&name("a"), a.public()), (&name("b"), b.public()))
        );
        let groups: Vec<&str> = forward.split(' ').collect();
        assert_eq!(groups.len(), 12);
        assert!(
            groups
                .iter()
                .all(|group| group.len() == 5 && group.bytes().all(|byte| byte.is_ascii_digit()))
        );
        assert_eq!(a.public().fingerprint().len(), 8 * 4 + 7);
    }

    /// A known answer, so the number cannot drift between versions (both sides of a pair
    /// must compute it alike): the keys of the seeds 1..=64 and 65..=128.
    #[test]
    fn safety_number_half_has_a_fixed_known_answer() {
        let seeds = |start: u8| -> [u8; SECRET_FILE_LEN] {
            std::array::from_fn(|index| start.wrapping_add(index as u8))
        };
        let alice = Identity::from_secret_bytes(&seeds(1));
        let half = safety_number_half(&name("alice"), alice.public());
        assert_eq!(half.len(), 30);
        assert_eq!(half, KNOWN_HALF);
        // The half is Signal's iteration: recompute it from the description.
        let mut hash =
            Sha512::digest([&0u16.to_be_bytes()[..], &alice.public().identity, b"alice"].concat());
        for _ in 0..5_200 {
            hash = Sha512::digest([&hash[..], &alice.public().identity].concat());
        }
        let expected: String = (0..6)
            .map(|chunk| {
                let bytes = &hash[chunk * 5..chunk * 5 + 5];
                let value = bytes.iter().fold(0u64, |acc, b| acc * 256 + u64::from(*b));
                format!("{:05}", value % 100_000)
            })
            .collect();
        assert_eq!(half, expected);
    }

    /// Computed independently (Python's `hashlib` and `cryptography`) from the description.
    const KNOWN_HALF: &str = "843452218787035682940216549679";

    #[test]
    fn a_changed_key_changes_only_its_partys_half() {
        let alice = Identity::generate();
        let bob = Identity::generate();
        let new_bob = Identity::generate();
        let halves = |number: String| -> Vec<String> {
            let digits: String = number.split(' ').collect();
            vec![digits[..30].to_owned(), digits[30..].to_owned()]
        };
        let alice_half = safety_number_half(&name("alice"), alice.public());
        let before = halves(safety_number(
            (&name("alice"), alice.public()),
            (&name("bob"), bob.public()),
        ));
        let after = halves(safety_number(
            (&name("alice"), alice.public()),
            (&name("bob"), new_bob.public()),
        ));
        assert!(before.contains(&alice_half) && after.contains(&alice_half));
        let bob_before = before.iter().find(|half| **half != alice_half).unwrap();
        let bob_after = after.iter().find(|half| **half != alice_half).unwrap();
        assert_ne!(bob_before, bob_after);
        assert_eq!(
            *bob_after,
            safety_number_half(&name("bob"), new_bob.public())
        );
        // The name is part of a half too.
        assert_ne!(
            safety_number_half(&name("bob"), bob.public()),
            safety_number_half(&name("bob2"), bob.public())
        );
    }

    #[test]
    fn a_rotation_is_checked_and_followed_from_the_pinned_key() {
        let bob = name("bob");
        let first = Identity::generate();
        let second = Identity::generate();
        let third = Identity::generate();
        let one = Rotation::sign(&bob, &first, &second, 1);
        let two = Rotation::sign(&bob, &second, &third, 2);
        one.verify().unwrap();
        let chain = [one.clone(), two.clone()];
        assert!(follow_rotations(
            &bob,
            first.public(),
            third.public(),
            &chain
        ));
        assert!(follow_rotations(
            &bob,
            second.public(),
            third.public(),
            &chain
        ));
        assert!(follow_rotations(
            &bob,
            first.public(),
            second.public(),
            &chain[..1]
        ));
        // Missing a link, or another user's statement, leads nowhere.
        assert!(!follow_rotations(
            &bob,
            first.public(),
            third.public(),
            &chain[1..]
        ));
        assert!(!follow_rotations(
            &name("carol"),
            first.public(),
            third.public(),
            &chain
        ));
        // A statement not signed by the old key (a server inventing one) is not followed.
        let mallory = Identity::generate();
        let mut forged = Rotation::sign(&bob, &mallory, &third, 3);
        forged.old = first.public().clone();
        assert!(forged.verify().is_err());
        assert!(!follow_rotations(
            &bob,
            first.public(),
            third.public(),
            &[forged]
        ));
        // Nor one the new key did not sign.
        let mut grabbed = one.clone();
        grabbed.new = mallory.public().clone();
        assert!(grabbed.verify().is_err());
        assert!(!follow_rotations(
            &bob,
            first.public(),
            mallory.public(),
            &[grabbed]
        ));
    }

    #[test]
    fn announce_proof_checks_secret_nonce_and_text() {
        let proof = announce_proof(b"secret", &[1; 32], "hello");
        assert!(verify_announce_proof(b"secret", &[1; 32], "hello", &proof));
        assert!(!verify_announce_proof(b"other", &[1; 32], "hello", &proof));
        assert!(!verify_announce_proof(b"secret", &[2; 32], "hello", &proof));
        assert!(!verify_announce_proof(b"secret", &[1; 32], "hellp", &proof));
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// The signed form of an exchange key, for tests that forge keys.
    pub(crate) fn exchange_message(exchange: &[u8; 32]) -> Vec<u8> {
        super::exchange_key_message(exchange)
    }
}
