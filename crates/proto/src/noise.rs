//! The encrypted, authenticated transports: the Noise Protocol Framework through `snow`.
//!
//! Every connection starts with the plain [`crate::Hello`] exchange (so a peer of another
//! version is told to upgrade instead of failing a handshake it cannot read), then runs one
//! Noise handshake, after which every frame travels inside records sealed as Noise transport
//! messages ([`Cipher`]): nobody on the path reads a name, an id or a frame, and any change
//! to the bytes fails the connection.
//!
//! - **Control** (client ↔ discovery): [`CONTROL_PARAMS`], pattern NX. The client sends an
//!   ephemeral key; the server answers with its ephemeral and its static key
//!   ([`ServerKey`]), which the client checks against the key it pinned for that server
//!   (as SSH's known_hosts does). Users authenticate inside the channel by signing a
//!   registration transcript that includes the handshake hash ([`Secured::handshake_hash`]),
//!   so a signature made for one connection is worthless on another.
//! - **Peer links** (client ↔ client): [`PEER_PARAMS`], pattern IK, with both users'
//!   identity-bound X25519 keys (the `exchange` key of [`crate::PublicKeys`], signed by
//!   their Ed25519 identity). The dialer must already know the recipient's key, so only the
//!   real recipient can answer; the recipient learns the dialer's key from the handshake
//!   and checks it against that user's pinned (or verified) key before any envelope moves.
//!
//! The cipher is AES-256-GCM: with the AES and carry-less multiply instructions of every
//! current x86-64 and ARMv8 processor it costs about a third of ChaCha20-Poly1305 here
//! (measured on 36- and 250-byte frames, both ends: 0.45 and 0.73 µs against 2.0 and
//! 3.2 µs), and the crate falls back to a constant-time software AES elsewhere.
//!
//! What is sealed is a record of [`crate::record`]: one or more whole frames. A Noise
//! transport message holds at most 65,535 bytes, so a record larger than [`MAX_CHUNK`] is
//! sealed as several messages back to back; it grows by one tag per chunk
//! ([`sealed_len`]).

use std::{fmt, io, path::Path};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::identity::{self, IdentityError};

/// The control connection's Noise protocol.
pub const CONTROL_PARAMS: &str = "Noise_NX_25519_AESGCM_SHA256";
/// The peer links' Noise protocol.
pub const PEER_PARAMS: &str = "Noise_IK_25519_AESGCM_SHA256";
/// Bound into every handshake: a transcript of another protocol or version never verifies.
const PROLOGUE: &[u8] = b"p2pchat/2";
/// The authentication tag of one transport message.
pub const TAG_LEN: usize = 16;
/// The most plaintext bytes in one Noise transport message.
pub const MAX_CHUNK: usize = 65_535 - TAG_LEN;
/// The default name of the server key file, inside the server's data dir.
pub const SERVER_KEY_FILE: &str = "server.key";

/// The length on the wire of a frame body of `plain` bytes once sealed.
pub fn sealed_len(plain: usize) -> usize {
    plain + TAG_LEN * plain.div_ceil(MAX_CHUNK).max(1)
}

/// Why a handshake or a transport message failed, in snow's words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoiseError(#[from] snow::Error);

/// The two directions' keys of an established connection.
pub struct Cipher(Box<snow::TransportState>);

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher")
    }
}

impl Cipher {
    /// Appends `plain` to `out` sealed: one transport message per [`MAX_CHUNK`] bytes,
    /// back to back, [`sealed_len`] bytes in all. On an error `out` is left as it was.
    pub fn seal_into(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        let start = out.len();
        out.resize(start + sealed_len(plain.len()), 0);
        // An empty body is still one message (its tag alone), where `chunks` yields none.
        let empty = std::iter::once(plain).filter(|plain| plain.is_empty());
        let sealed = empty
            .chain(plain.chunks(MAX_CHUNK))
            .try_fold(start, |written, chunk| {
                Ok::<_, snow::Error>(written + self.0.write_message(chunk, &mut out[written..])?)
            });
        match sealed {
            Ok(written) => {
                out.truncate(written);
                Ok(())
            }
            Err(error) => {
                out.truncate(start);
                Err(NoiseError(error))
            }
        }
    }

    /// Opens what [`Cipher::seal_into`] sealed into `plain`, replacing its contents; fails
    /// if any byte was changed, dropped or replayed.
    pub fn open_into(&mut self, sealed: &[u8], plain: &mut Vec<u8>) -> Result<(), NoiseError> {
        plain.clear();
        if sealed.is_empty() {
            return Err(NoiseError(snow::Error::Decrypt));
        }
        plain.resize(sealed.len(), 0);
        let opened = sealed
            .chunks(MAX_CHUNK + TAG_LEN)
            .try_fold(0, |read, chunk| {
                if chunk.len() < TAG_LEN {
                    return Err(snow::Error::Decrypt);
                }
                Ok(read + self.0.read_message(chunk, &mut plain[read..])?)
            });
        match opened {
            Ok(read) => {
                plain.truncate(read);
                Ok(())
            }
            Err(error) => {
                plain.clear();
                Err(NoiseError(error))
            }
        }
    }
}

/// What a finished handshake established, besides the keys.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secured {
    /// The other side's static key: the server's key on a control connection (checked by
    /// the client against its pin), the dialer's exchange key on an accepted peer link
    /// (checked by the recipient against that user's key), the recipient's on a dialled
    /// one. All zero on the server's side of a control connection, where clients have none
    /// (they prove who they are by a signature inside the channel).
    pub remote_static: [u8; 32],
    /// The hash of the whole handshake: the same on both sides, unique to this connection.
    pub handshake_hash: [u8; 32],
}

impl fmt::Debug for Secured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secured({})", key_fingerprint(&self.remote_static))
    }
}

/// One side of a Noise handshake in progress.
pub(crate) struct Handshake(Box<snow::HandshakeState>);

impl Handshake {
    /// The client side of the control handshake.
    pub(crate) fn control_client() -> Result<Self, NoiseError> {
        let builder = snow::Builder::new(params(CONTROL_PARAMS)).prologue(PROLOGUE)?;
        Ok(Self(Box::new(builder.build_initiator()?)))
    }

    /// The server side of the control handshake, with the server's key.
    pub(crate) fn control_server(key: &ServerKey) -> Result<Self, NoiseError> {
        let builder = snow::Builder::new(params(CONTROL_PARAMS))
            .prologue(PROLOGUE)?
            .local_private_key(key.secret.as_slice())?;
        Ok(Self(Box::new(builder.build_responder()?)))
    }

    /// The dialling side of a peer link: `secret` is my exchange key, `peer` the
    /// recipient's.
    pub(crate) fn peer_dialer(secret: &[u8; 32], peer: &[u8; 32]) -> Result<Self, NoiseError> {
        let builder = snow::Builder::new(params(PEER_PARAMS))
            .prologue(PROLOGUE)?
            .local_private_key(secret)?
            .remote_public_key(peer)?;
        Ok(Self(Box::new(builder.build_initiator()?)))
    }

    /// The accepting side of a peer link.
    pub(crate) fn peer_acceptor(secret: &[u8; 32]) -> Result<Self, NoiseError> {
        let builder = snow::Builder::new(params(PEER_PARAMS))
            .prologue(PROLOGUE)?
            .local_private_key(secret)?;
        Ok(Self(Box::new(builder.build_responder()?)))
    }

    /// Whether this side writes the first message.
    pub(crate) fn is_initiator(&self) -> bool {
        self.0.is_initiator()
    }

    /// The next handshake message to send (with an empty payload).
    pub(crate) fn write(&mut self) -> Result<Vec<u8>, NoiseError> {
        let mut out = vec![0u8; 256];
        let len = self.0.write_message(&[], &mut out)?;
        out.truncate(len);
        Ok(out)
    }

    /// Reads the other side's next handshake message (its payload must be empty).
    pub(crate) fn read(&mut self, message: &[u8]) -> Result<(), NoiseError> {
        let mut payload = vec![0u8; message.len()];
        let len = self.0.read_message(message, &mut payload)?;
        if len == 0 {
            Ok(())
        } else {
            Err(NoiseError(snow::Error::Input))
        }
    }

    /// Finishes: the transport keys and what was established.
    pub(crate) fn finish(self) -> Result<(Cipher, Secured), NoiseError> {
        let remote_static = match self.0.get_remote_static() {
            Some(key) => <[u8; 32]>::try_from(key).map_err(|_| NoiseError(snow::Error::Input))?,
            None => [0; 32],
        };
        let handshake_hash = <[u8; 32]>::try_from(self.0.get_handshake_hash())
            .map_err(|_| NoiseError(snow::Error::Input))?;
        let transport = self.0.into_transport_mode()?;
        Ok((
            Cipher(Box::new(transport)),
            Secured {
                remote_static,
                handshake_hash,
            },
        ))
    }
}

fn params(name: &str) -> snow::params::NoiseParams {
    // Both names are constants that parse; a failure is a programming error caught by
    // every test that opens a connection.
    name.parse().expect("valid Noise parameters")
}

/// A short human fingerprint of a 32-byte public key: the first 16 bytes of its SHA-256
/// as 8 groups of 4 hex digits joined by `:`.
pub fn key_fingerprint(key: &[u8; 32]) -> String {
    let digest = Sha256::digest(key);
    digest[..16]
        .chunks(2)
        .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
        .collect::<Vec<_>>()
        .join(":")
}

/// The discovery server's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerPublicKey(pub [u8; 32]);

impl ServerPublicKey {
    /// Its fingerprint ([`key_fingerprint`]): what the server prints at start, what a
    /// client is given with `--server-key`.
    pub fn fingerprint(&self) -> String {
        key_fingerprint(&self.0)
    }

    /// Whether the user-given `fingerprint` (hex digits; spaces, `:` and `-` ignored, case
    /// ignored) is this key's.
    pub fn matches(&self, fingerprint: &Fingerprint) -> bool {
        fingerprint.0 == Sha256::digest(self.0)[..16]
    }

    /// The key as 64 hex digits (how a pin is stored).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Parses [`ServerPublicKey::to_hex`]'s output.
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = hex_bytes(text)?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for ServerPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerPublicKey({})", self.fingerprint())
    }
}

impl fmt::Display for ServerPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// A server key fingerprint as a user typed it (see [`ServerPublicKey::matches`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 16]);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups: Vec<String> = self
            .0
            .chunks(2)
            .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
            .collect();
        f.write_str(&groups.join(":"))
    }
}

/// A fingerprint that is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a server key fingerprint is 32 hex digits (as `p2pchat-discovery key` prints it, e.g. 3f1a:9c02:...), not {0:?}"
)]
pub struct BadFingerprint(pub String);

impl std::str::FromStr for Fingerprint {
    type Err = BadFingerprint;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadFingerprint(text.to_owned());
        let digits: String = text
            .chars()
            .filter(|c| !matches!(c, ':' | ' ' | '-'))
            .collect();
        let bytes = hex_bytes(&digits).ok_or_else(bad)?;
        Ok(Self(bytes.try_into().map_err(|_| bad())?))
    }
}

fn hex_bytes(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).ok())
        .collect()
}

/// The discovery server's static key (zeroized on drop). Instances that share one store
/// share one key file, so clients see one server.
pub struct ServerKey {
    secret: Zeroizing<[u8; 32]>,
    public: ServerPublicKey,
}

impl fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerKey({})", self.public.fingerprint())
    }
}

impl ServerKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self::from_secret(Zeroizing::new(crate::random_bytes()))
    }

    fn from_secret(secret: Zeroizing<[u8; 32]>) -> Self {
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret));
        Self {
            secret,
            public: ServerPublicKey(public.to_bytes()),
        }
    }

    /// The public half.
    pub fn public(&self) -> ServerPublicKey {
        self.public
    }

    /// Loads the key from `path`, or creates it there (0600, its folder 0700 if new) when
    /// there is none. Returns the key and whether it was created now. Two first starts at
    /// once end with the same key.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), IdentityError> {
        match Self::load(path) {
            Ok(key) => Ok((key, false)),
            Err(IdentityError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty());
                let dir = dir.unwrap_or(Path::new("."));
                let name = path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .unwrap_or(SERVER_KEY_FILE);
                identity::create_private_dir(dir)?;
                let key = Self::generate();
                if identity::write_private_new(dir, name, key.secret.as_slice())? {
                    Ok((key, true))
                } else {
                    Ok((Self::load(path)?, false))
                }
            }
            Err(error) => Err(error),
        }
    }

    /// Loads the key from `path`, refusing a file others can read.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?);
        identity::check_private(path, 0o600)?;
        let secret: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| IdentityError::Corrupt {
                path: path.to_path_buf(),
                reason: "wrong length",
            })?;
        Ok(Self::from_secret(Zeroizing::new(secret)))
    }
}

/// Both ends of a control connection's keys, from a handshake run in memory: the client's
/// and the server's (for unit tests of what is sealed with them).
#[cfg(test)]
pub(crate) fn pair() -> (Cipher, Cipher) {
    let key = ServerKey::generate();
    let mut client = Handshake::control_client().unwrap();
    let mut server = Handshake::control_server(&key).unwrap();
    server.read(&client.write().unwrap()).unwrap();
    client.read(&server.write().unwrap()).unwrap();
    let (client, secured) = client.finish().unwrap();
    assert_eq!(secured.remote_static, key.public().0);
    let (server, _) = server.finish().unwrap();
    (client, server)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seals `plain` on its own, as one record's body.
    fn sealed(cipher: &mut Cipher, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        cipher.seal_into(plain, &mut out).unwrap();
        out
    }

    /// Opens `sealed` on its own.
    fn opened(cipher: &mut Cipher, sealed: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let mut plain = vec![9; 3];
        cipher.open_into(sealed, &mut plain).map(|()| plain)
    }

    #[test]
    fn bodies_of_every_size_round_trip_and_grow_by_one_tag_per_chunk() {
        let (mut client, mut server) = pair();
        for len in [
            0,
            1,
            100,
            MAX_CHUNK,
            MAX_CHUNK + 1,
            2 * MAX_CHUNK,
            64 * 1024 + 3,
        ] {
            let plain = vec![7u8; len];
            let mut out = vec![1, 2, 3];
            client.seal_into(&plain, &mut out).unwrap();
            assert_eq!(out.len(), 3 + sealed_len(len), "{len}");
            assert_eq!(out[..3], [1, 2, 3], "appended, not overwritten");
            assert_eq!(opened(&mut server, &out[3..]).unwrap(), plain);
        }
    }

    #[test]
    fn a_changed_replayed_cut_or_empty_body_fails() {
        let (mut client, mut server) = pair();
        let mut changed = sealed(&mut client, b"hello");
        changed[0] ^= 1;
        assert!(opened(&mut server, &changed).is_err());
        let (mut client, mut server) = pair();
        let hello = sealed(&mut client, b"hello");
        assert!(opened(&mut server, &hello[..10]).is_err());
        assert!(opened(&mut server, &[]).is_err());
        assert_eq!(opened(&mut server, &hello).unwrap(), b"hello");
        assert!(opened(&mut server, &hello).is_err(), "a replay must fail");
    }

    #[test]
    fn fingerprints_parse_with_any_separators_and_match_only_their_key() {
        let key = ServerKey::generate().public();
        let printed = key.fingerprint();
        assert_eq!(printed.len(), 39);
        let parsed: Fingerprint = printed.parse().unwrap();
        assert!(key.matches(&parsed));
        assert_eq!(parsed.to_string(), printed);
        let spaced: Fingerprint = printed.replace(':', " ").to_uppercase().parse().unwrap();
        assert!(key.matches(&spaced));
        assert!(!ServerKey::generate().public().matches(&parsed));
        assert!("123".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(16).parse::<Fingerprint>().is_err());
        assert_eq!(ServerPublicKey::from_hex(&key.to_hex()), Some(key));
    }

    #[test]
    fn a_server_key_is_created_once_private_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join(SERVER_KEY_FILE);
        let (created, new) = ServerKey::load_or_create(&path).unwrap();
        assert!(new);
        let (loaded, new) = ServerKey::load_or_create(&path).unwrap();
        assert!(!new);
        assert_eq!(created.public(), loaded.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
