//! Everything that turns values into bytes and back: the frame codec and the body format.
//!
//! Frames are a 4-byte big-endian length followed by the body ([`FrameCodec`], with an
//! explicit maximum, so a declared length over the limit is refused before a byte of it is
//! buffered, and a declared length under it reserves nothing: the read buffer grows only
//! with the bytes that actually arrive). Bodies are serde values in postcard, the
//! maintained compact binary format (the design card named bincode, which its maintainers
//! abandoned). No other module of the workspace calls postcard directly: stores and peers
//! persist their records through [`encode`] and [`decode`] too.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

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
pub fn codec(max_frame_len: usize) -> FrameCodec {
    FrameCodec::new(max_frame_len)
}

/// The length prefix of every frame: a 4-byte big-endian body length.
const HEADER_LEN: usize = 4;

/// A frame whose length is over the codec's limit (declared by the peer, or asked to be
/// sent); the error inside the codec's `io::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes exceeds the {max} byte limit")]
pub struct FrameTooLarge {
    /// The frame's length.
    pub len: usize,
    /// The limit.
    pub max: usize,
}

/// The length-delimited frame codec: a 4-byte big-endian body length, then the body.
///
/// Unlike tokio-util's `LengthDelimitedCodec`, which reserves a frame's declared length as
/// soon as it has read the header, this codec never reserves for a frame: a peer that
/// declares 64 KiB and sends nothing more costs the few bytes it sent, not 64 KiB (5,000
/// such connections took a server from 35 to 346 MiB before registration). The limit can change on a live
/// connection ([`FrameCodec::set_max_frame_len`]): the server keeps it small until a client
/// registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    max_frame_len: usize,
}

impl FrameCodec {
    /// A codec for bodies of at most `max_frame_len` bytes (and at most `u32::MAX`).
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            max_frame_len: max_frame_len.min(u32::MAX as usize),
        }
    }

    /// The largest body accepted or sent.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Changes the limit for the frames decoded or encoded from now on.
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        *self = Self::new(max_frame_len);
    }

    fn too_large(&self, len: usize, kind: io::ErrorKind) -> io::Error {
        io::Error::new(
            kind,
            FrameTooLarge {
                len,
                max: self.max_frame_len,
            },
        )
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        let Some(header) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut length = [0u8; HEADER_LEN];
        length.copy_from_slice(header);
        let len = u32::from_be_bytes(length) as usize;
        if len > self.max_frame_len {
            return Err(self.too_large(len, io::ErrorKind::InvalidData));
        }
        // Deliberately no `reserve` here: the buffer grows as bytes arrive.
        if src.len() < HEADER_LEN + len {
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(src.split_to(len)))
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = io::Error;

    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> io::Result<()> {
        let len = body.len();
        let Ok(header) = u32::try_from(len) else {
            return Err(self.too_large(len, io::ErrorKind::InvalidInput));
        };
        if len > self.max_frame_len {
            return Err(self.too_large(len, io::ErrorKind::InvalidInput));
        }
        dst.reserve(HEADER_LEN + len);
        dst.put_u32(header);
        dst.extend_from_slice(&body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let value = (7u64, "some text", vec![1u8; 300], Some(42u32));
        assert_eq!(encoded_len(&value).unwrap(), encode(&value).unwrap().len());
    }

    /// Regression: tokio-util's codec reserved a frame's declared length as soon as the
    /// header arrived, so a connection that declared 64 KiB and sent four bytes held 64 KiB.
    #[test]
    fn a_declared_length_reserves_nothing_before_the_bytes_arrive() {
        let mut codec = codec(MAX_FRAME_LEN);
        let mut buffer = BytesMut::with_capacity(64);
        buffer.put_u32(60_000);
        buffer.put_slice(&[7; 10]);
        assert_eq!(codec.decode(&mut buffer).unwrap(), None);
        assert!(buffer.capacity() < 1024, "reserved {}", buffer.capacity());
    }

    #[test]
    fn frames_round_trip_and_a_declared_length_over_the_limit_is_refused() {
        let mut codec = codec(16);
        let mut buffer = BytesMut::new();
        codec
            .encode(Bytes::from_static(b"hello"), &mut buffer)
            .unwrap();
        codec
            .encode(Bytes::from_static(b"world!"), &mut buffer)
            .unwrap();
        assert!(codec.encode(Bytes::from(vec![0; 17]), &mut buffer).is_err());
        assert_eq!(codec.decode(&mut buffer).unwrap().unwrap(), &b"hello"[..]);
        assert_eq!(codec.decode(&mut buffer).unwrap().unwrap(), &b"world!"[..]);
        assert_eq!(codec.decode(&mut buffer).unwrap(), None);
        buffer.put_u32(17);
        let error = codec.decode(&mut buffer).unwrap_err();
        assert!(
            error
                .get_ref()
                .is_some_and(|inner| inner.is::<FrameTooLarge>())
        );
        codec.set_max_frame_len(17);
        buffer.put_slice(&[1; 17]);
        assert_eq!(codec.decode(&mut buffer).unwrap().unwrap().len(), 17);
    }
}
