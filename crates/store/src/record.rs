//! Helpers both backends share to turn records into stored bytes and back, always through
//! [`proto::wire`] (the one place of the workspace that serialises).

use bytes::Bytes;
use proto::{Username, wire};

use crate::{Binding, StoreError, StoredMail};

/// At most how many bytes a stored [`StoredMail`] is longer than its envelope encoded
/// alone: the deposit time, a varint of at most ten bytes, follows the envelope.
pub(crate) const STORED_MAIL_OVERHEAD: usize = 10;

/// A fetch batch being filled, in mailbox order: at most `max` messages whose envelopes,
/// wire-encoded, add up to at most the byte budget, except that the first message is
/// always taken (see [`crate::Store::fetch`]).
pub(crate) struct Batch {
    mail: Vec<StoredMail>,
    max: usize,
    bytes_left: usize,
    /// Set once a message did not fit: nothing after it may be taken either.
    closed: bool,
}

impl Batch {
    /// An empty batch of at most `max` messages and `max_bytes` encoded envelope bytes.
    pub(crate) fn new(max: usize, max_bytes: usize) -> Self {
        Self {
            mail: Vec::with_capacity(max.min(1024)),
            max,
            bytes_left: max_bytes,
            closed: false,
        }
    }

    /// Takes `stored` if it fits; returns `false` (and closes the batch) if it does not.
    pub(crate) fn offer(&mut self, stored: StoredMail) -> bool {
        if self.is_full() {
            return false;
        }
        // Envelopes are plain data, so measuring one cannot fail; count a failure as too big.
        let size = wire::encoded_len(&stored.envelope).unwrap_or(usize::MAX);
        if size > self.bytes_left && !self.mail.is_empty() {
            self.closed = true;
            return false;
        }
        self.bytes_left = self.bytes_left.saturating_sub(size);
        self.mail.push(stored);
        true
    }

    /// Whether no further message may be taken.
    pub(crate) fn is_full(&self) -> bool {
        self.closed || self.mail.len() >= self.max
    }

    /// How many messages it holds.
    pub(crate) fn len(&self) -> usize {
        self.mail.len()
    }

    /// The encoded envelope bytes still free.
    pub(crate) fn bytes_left(&self) -> usize {
        self.bytes_left
    }

    /// The messages taken, oldest first.
    pub(crate) fn into_mail(self) -> Vec<StoredMail> {
        self.mail
    }
}

/// Whether `mail` is past its time to live at `now_ms`.
pub(crate) fn is_expired(mail: &StoredMail, ttl_ms: u64, now_ms: u64) -> bool {
    mail.deposited_at_ms.saturating_add(ttl_ms) <= now_ms
}

/// Encodes a record for storage. Encoding our own types only fails on a bug, but it is
/// still an error value, not a panic.
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Bytes, StoreError> {
    wire::encode(value).map_err(|error| StoreError::Corrupt {
        key: "(value being written)".to_owned(),
        reason: error.to_string(),
    })
}

/// Decodes the stored binding of `user`. A binding that does not decode is an error, not
/// skipped: skipping it would free the name for anyone to take.
/// Decodes the stored rotation statements of `user`.
pub(crate) fn decode_rotations(
    user: &Username,
    bytes: &[u8],
) -> Result<Vec<proto::identity::Rotation>, StoreError> {
    wire::decode(bytes).map_err(|error| StoreError::Corrupt {
        key: format!("rotations of {user}"),
        reason: error.to_string(),
    })
}

/// `kept` with `rotation` appended, keeping the latest [`crate::MAX_ROTATIONS`].
pub(crate) fn appended(
    mut kept: Vec<proto::identity::Rotation>,
    rotation: &proto::identity::Rotation,
) -> Vec<proto::identity::Rotation> {
    kept.push(rotation.clone());
    let excess = kept.len().saturating_sub(crate::MAX_ROTATIONS);
    kept.drain(..excess);
    kept
}

pub(crate) fn decode_binding(user: &Username, bytes: &[u8]) -> Result<Binding, StoreError> {
    wire::decode(bytes).map_err(|error| StoreError::Corrupt {
        key: format!("binding of {user}"),
        reason: error.to_string(),
    })
}

/// The part of a user's published keys that is replaced, not consumed: their signed Olm
/// key and fallback key (the one-time keys are stored one per entry, each handed out once).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct PreKeyOwner {
    pub(crate) olm_key: proto::ratchet::SignedKey,
    pub(crate) fallback: Option<proto::ratchet::SignedKey>,
}

/// Decodes a stored prekey record (`what` names it in the error).
pub(crate) fn decode_prekey<T: serde::de::DeserializeOwned>(
    user: &Username,
    what: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    wire::decode(bytes).map_err(|error| StoreError::Corrupt {
        key: format!("{what} of {user}"),
        reason: error.to_string(),
    })
}

/// The bundle a claim hands out: a one-time key if one was left, else the fallback key.
pub(crate) fn prekey_bundle(
    owner: PreKeyOwner,
    one_time: Option<proto::ratchet::SignedKey>,
) -> Option<proto::ratchet::PreKeyBundle> {
    let (prekey, fallback) = match one_time {
        Some(key) => (key, false),
        None => (owner.fallback?, true),
    };
    Some(proto::ratchet::PreKeyBundle {
        olm_key: owner.olm_key,
        prekey,
        fallback,
    })
}

/// The fallback key to store after a publish: the published one, or else (a publish of
/// new one-time keys only) the one already stored for the same Olm key `previous`.
pub(crate) fn kept_fallback(
    prekeys: &proto::ratchet::PreKeys,
    previous: Option<PreKeyOwner>,
) -> Option<proto::ratchet::SignedKey> {
    prekeys
        .fallback
        .clone()
        .or_else(|| previous.and_then(|previous| previous.fallback))
}
