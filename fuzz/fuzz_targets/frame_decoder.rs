//! Arbitrary bytes through the frame splitter, then every frame through every message decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::{Envelope, Hello, PeerMsg, RequestFrame, ServerMsg, wire};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Each iteration either consumes a frame or stops: the loop is bounded by the input.
    while let Ok(Some((frame, len))) = wire::split_frame(rest, wire::MAX_FRAME_LEN) {
        let _ = wire::decode::<Hello>(frame);
        let _ = wire::decode::<RequestFrame>(frame);
        let _ = wire::decode::<ServerMsg>(frame);
        let _ = wire::decode::<PeerMsg>(frame);
        let _ = wire::decode::<Envelope>(frame);
        rest = &rest[len..];
    }
});
