//! Helpers both backends share to turn records into stored bytes and back, always through
//! [`proto::wire`] (the one place of the workspace that serialises).

use bytes::Bytes;
use proto::{Username, wire};

use crate::{Binding, StoreError, StoredMail};

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
pub(crate) fn decode_binding(user: &Username, bytes: &[u8]) -> Result<Binding, StoreError> {
    wire::decode(bytes).map_err(|error| StoreError::Corrupt {
        key: format!("binding of {user}"),
        reason: error.to_string(),
    })
}
