//! Arbitrary bytes through the frame codec, then every frame through every message decoder.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::{Envelope, Hello, PeerMsg, RequestFrame, ServerMsg, wire};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = wire::codec(wire::MAX_FRAME_LEN);
    let mut buffer = BytesMut::from(data);
    // Each iteration either consumes a frame or stops: the loop is bounded by the input.
    while let Ok(Some(frame)) = codec.decode(&mut buffer) {
        let _ = wire::decode::<Hello>(&frame);
        let _ = wire::decode::<RequestFrame>(&frame);
        let _ = wire::decode::<ServerMsg>(&frame);
        let _ = wire::decode::<PeerMsg>(&frame);
        let _ = wire::decode::<Envelope>(&frame);
    }
    let _ = codec.decode_eof(&mut buffer);
});
