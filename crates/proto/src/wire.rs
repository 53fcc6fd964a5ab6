//! Everything that turns values into bytes and back: the frame codec and the body format.
//!
//! Frames are a 4-byte big-endian length followed by the body (tokio-util's
//! [`LengthDelimitedCodec`] with an explicit maximum, so a declared length over the limit is
//! refused before a byte of it is buffered). Bodies are serde values in postcard, the
//! maintained compact binary format (the design card named bincode, which its maintainers
//! abandoned). No other module of the workspace calls postcard directly: stores and peers
//! persist their records through [`encode`] and [`decode`] too.

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::LengthDelimitedCodec;

/// The default and recommended maximum body size of one frame: 64 KiB.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// A body that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed message body: {0}")]
pub struct WireError(#[from] postcard::Error);

/// Serialises `value` into a frame body.
pub fn encode<M: Serialize + ?Sized>(value: &M) -> Result<Bytes, WireError> {
    Ok(Bytes::from(postcard::to_stdvec(value)?))
}

/// Parses a frame body. Trailing bytes after a complete value are refused, so one frame is
/// exactly one message.
pub fn decode<M: DeserializeOwned>(body: &[u8]) -> Result<M, WireError> {
    let (value, rest) = postcard::take_from_bytes(body)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(WireError(postcard::Error::DeserializeBadEncoding))
    }
}

/// The encoded size of `value` in bytes, without encoding it into a buffer (used to pack
/// replies up to the frame limit).
pub fn encoded_len<M: Serialize + ?Sized>(value: &M) -> Result<usize, WireError> {
    Ok(postcard::serialize_with_flavor(
        value,
        postcard::ser_flavors::Size::default(),
    )?)
}

/// The frame codec with a maximum body length of `max_frame_len` bytes.
pub fn codec(max_frame_len: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(max_frame_len)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let value = (7u64, "some text", vec![1u8; 300], Some(42u32));
        assert_eq!(encoded_len(&value).unwrap(), encode(&value).unwrap().len());
    }
}
