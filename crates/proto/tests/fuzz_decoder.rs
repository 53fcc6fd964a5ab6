//! Arbitrary bytes fed to the frame decoder and the message decoders never panic (the
//! bounded, in-suite version of the fuzz targets).

use proptest::prelude::*;
use proto::{Connection, Envelope, Hello, PeerMsg, RequestFrame, ServerMsg, wire};
use tokio::io::AsyncWriteExt;

fn decode_everything(bytes: &[u8]) {
    let _ = wire::decode::<Hello>(bytes);
    let _ = wire::decode::<RequestFrame>(bytes);
    let _ = wire::decode::<ServerMsg>(bytes);
    let _ = wire::decode::<PeerMsg>(bytes);
    let _ = wire::decode::<Envelope>(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, .. ProptestConfig::default() })]

    #[test]
    fn message_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn frame_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (mut raw, stream) = tokio::io::duplex(4096);
            let mut receiver = Connection::new(stream);
            raw.write_all(&bytes).await.unwrap();
            drop(raw);
            // Read until the stream ends or errors: every outcome is a value, none a panic.
            for _ in 0..bytes.len() + 1 {
                match receiver.recv::<RequestFrame>().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        });
    }

    #[test]
    fn well_formed_frames_with_random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (mut raw, stream) = tokio::io::duplex(4096);
            let mut receiver = Connection::new(stream);
            raw.write_all(&(body.len() as u32).to_be_bytes()).await.unwrap();
            raw.write_all(&body).await.unwrap();
            drop(raw);
            let _ = receiver.recv::<ServerMsg>().await;
            let _ = receiver.recv::<ServerMsg>().await;
        });
    }
}
