//! Everything that turns values into bytes and back: the frames and the body format.
//!
//! Frames are a 4-byte big-endian length followed by the body. [`split_frame`] finds them
//! under an explicit maximum, so a declared length over the limit is refused on the header
//! alone, and one under it reserves nothing: a reader's buffer grows only with the bytes that
//! actually arrive. [`encode_frame`] appends one to a buffer the caller reuses. Bodies are serde values in postcard, the
//! maintained compact binary format (the design card named bincode, which its maintainers
//! abandoned). No other module of the workspace calls postcard directly: stores and peers
//! persist their records through [`encode`] and [`decode`] too.

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

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

/// Parses a value at the start of `body` and returns it with the bytes after it (for a
/// format that may carry something after a value older builds wrote alone).
pub fn decode_prefix<M: DeserializeOwned>(body: &[u8]) -> Result<(M, &[u8]), WireError> {
    Ok(postcard::take_from_bytes(body)?)
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

/// The length prefix of every frame: a 4-byte big-endian body length.
pub const HEADER_LEN: usize = 4;

/// The frame at the start of `bytes`: its body and its whole length on the wire, once all
/// of it is there (`Ok(None)` before). A declared length over `max` is refused on the
/// header alone, before a byte of the body is needed.
pub fn split_frame(bytes: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameTooLarge> {
    let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*header) as usize;
    if len > max {
        return Err(FrameTooLarge { len, max });
    }
    Ok(bytes
        .get(HEADER_LEN..HEADER_LEN + len)
        .map(|body| (body, HEADER_LEN + len)))
}

/// Appends `value` to `out` as one frame (header, then body) and returns the body's
/// length; on an error `out` is left as it was. Encoding in place, into a buffer a
/// connection reuses, is what keeps a frame from costing allocations of its own.
pub fn encode_frame<M: Serialize + ?Sized>(
    value: &M,
    out: &mut Vec<u8>,
) -> Result<usize, WireError> {
    append_frame_with(out, |out| {
        postcard::serialize_with_flavor(value, Append(out)).map_err(WireError)
    })
}

/// Appends one frame to `out` whose body `write` appends, and returns the body's length;
/// on an error `out` is left as it was. A body over 4 GiB is declared as `u32::MAX`: no
/// connection sends one, as every frame limit is below that.
pub fn append_frame_with<E>(
    out: &mut Vec<u8>,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<usize, E> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(error) = write(out) {
        out.truncate(start);
        return Err(error);
    }
    let len = out.len() - start - HEADER_LEN;
    let header = u32::try_from(len).unwrap_or(u32::MAX);
    out[start..start + HEADER_LEN].copy_from_slice(&header.to_be_bytes());
    Ok(len)
}

/// A postcard flavor that appends to a vector it borrows.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// A frame whose declared length is over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes exceeds the {max} byte limit")]
pub struct FrameTooLarge {
    /// The frame's length.
    pub len: usize,
    /// The limit.
    pub max: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let value = (7u64, "some text", vec![1u8; 300], Some(42u32));
        assert_eq!(encoded_len(&value).unwrap(), encode(&value).unwrap().len());
    }

    #[test]
    fn frames_round_trip_and_a_declared_length_over_the_limit_is_refused_on_the_header() {
        let mut bytes = Vec::new();
        encode_frame("hello", &mut bytes).unwrap();
        let frame_len = bytes.len();
        append_frame_with(&mut bytes, |out| {
            out.extend_from_slice(b"world!");
            Ok::<_, ()>(())
        })
        .unwrap();
        let (body, len) = split_frame(&bytes, 16).unwrap().unwrap();
        assert_eq!(
            (decode::<String>(body).unwrap().as_str(), len),
            ("hello", frame_len)
        );
        let (body, _) = split_frame(&bytes[len..], 16).unwrap().unwrap();
        assert_eq!(body, b"world!");
        assert_eq!(
            split_frame(&bytes[len..len + 9], 16).unwrap(),
            None,
            "not all there"
        );
        assert_eq!(split_frame(&bytes[..3], 16).unwrap(), None, "no header yet");
        // 17 declared: refused on the four header bytes alone.
        let error = split_frame(&17u32.to_be_bytes(), 16).unwrap_err();
        assert_eq!(error, FrameTooLarge { len: 17, max: 16 });
        // A failed encoding leaves the buffer as it was.
        let before = bytes.clone();
        assert!(encode_frame(&Unencodable, &mut bytes).is_err());
        assert_eq!(bytes, before);
    }

    /// A value postcard cannot encode (a map of unknown length).
    struct Unencodable;

    impl Serialize for Unencodable {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            serializer.serialize_map(None)?.end()
        }
    }
}
