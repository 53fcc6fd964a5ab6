//! The p2pchat wire protocol, identities and message sealing.
//!
//! - [`name`]: [`Username`], a name that is valid by construction.
//! - [`msg`]: every message of the control protocol (client ↔ discovery) and the peer
//!   protocol (client ↔ client).
//! - [`wire`]: the one place values become bytes: the length-delimited frames and the
//!   postcard body format.
//! - [`connection`]: [`Connection`], a typed framed stream over any `AsyncRead + AsyncWrite`.
//! - [`noise`]: the Noise handshakes and transport encryption every connection runs (through
//!   `snow`), and the discovery server's key ([`ServerKey`]).
//! - [`record`]: how frames travel once secured: several whole frames sealed as one record.
//! - [`ratchet`]: messages sealed by vodozemac's Olm double ratchet ([`ratchet::Sessions`],
//!   [`ratchet::OwnAccount`]) and the signed keys published to start sessions.
//! - [`seal`]: the checked [`Plaintext`] every message seals, and [`Channel`], the static
//!   pairwise Fernet channel from before the ratchet (kept to open older mail).
//! - [`identity`]: [`Identity`] (secret keys, saved 0600), [`PublicKeys`], safety numbers
//!   and [`identity::Rotation`], the signed statement that moves a name to new keys.
//! - [`backup`]: the passphrase-protected identity backup (scrypt → Fernet).
//!
//! **Architecture Invariant:** this crate is a leaf. It opens no socket and starts no
//! runtime; the only I/O it does is on a stream handed to [`Connection`] and the identity
//! and server key files it is asked to read or write.

pub mod backup;
pub mod connection;
pub mod identity;
pub mod msg;
pub mod name;
pub mod noise;
pub mod ratchet;
pub mod record;
pub mod seal;
pub mod wire;

pub use connection::{Connection, HandshakeError, RecvError, SendError};
pub use identity::{Identity, IdentityError, PublicKeys};
pub use msg::{
    Envelope, ErrorCode, ErrorReply, Hello, MailRef, MessageId, PeerMsg, Push, Registration, Reply,
    Request, RequestFrame, RequestId, ServerMsg, UserInfo,
};
pub use name::{Username, UsernameError};
pub use noise::{Fingerprint, Secured, ServerKey, ServerPublicKey};
pub use seal::{Channel, OpenError, Plaintext, Receipt, ReceiptKind, ReplayGuard, SealError};

/// Fills `buffer` from the operating system's random source.
///
/// A machine that cannot provide randomness cannot run this program safely at all, so this
/// aborts with a clear message rather than return predictable bytes.
pub fn fill_random(buffer: &mut [u8]) {
    if let Err(error) = getrandom::fill(buffer) {
        panic!("the operating system's random source failed: {error}");
    }
}

/// `N` random bytes.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    fill_random(&mut bytes);
    bytes
}

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
