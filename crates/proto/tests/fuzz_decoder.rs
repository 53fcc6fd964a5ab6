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

mod open {
    use std::sync::OnceLock;

    use proptest::prelude::*;
    use proto::{Channel, Envelope, Identity, MessageId, OpenError, ReplayGuard, Username, wire};

    const NOW: u64 = 1_790_000_000_000;

    struct Keys {
        bob: Channel,
        valid: Envelope,
    }

    fn keys() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let alice_identity = Identity::generate();
            let bob_identity = Identity::generate();
            let alice_name = Username::new("alice").unwrap();
            let bob_name = Username::new("bob").unwrap();
            let alice = Channel::new(
                &alice_identity,
                &alice_name,
                &bob_name,
                bob_identity.public(),
            )
            .unwrap();
            let bob = Channel::new(
                &bob_identity,
                &bob_name,
                &alice_name,
                alice_identity.public(),
            )
            .unwrap();
            let valid = alice.seal(MessageId([1; 16]), "seed", NOW).unwrap();
            Keys { bob, valid }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        #[test]
        fn opening_arbitrary_envelopes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let keys = keys();
            if let Ok(envelope) = wire::decode::<Envelope>(&bytes) {
                let _ = keys.bob.open(&envelope, NOW);
            }
            let mut forged = keys.valid.clone();
            forged.token = bytes;
            prop_assert!(keys.bob.open(&forged, NOW).is_err());
        }

        #[test]
        fn any_single_byte_change_to_a_token_is_refused(position in any::<prop::sample::Index>(), replacement in any::<u8>()) {
            let keys = keys();
            let mut token = keys.valid.token.clone();
            let at = position.index(token.len());
            prop_assume!(token[at] != replacement);
            token[at] = replacement;
            let mut tampered = keys.valid.clone();
            tampered.token = token;
            // Base64 padding bits aside, every change must fail; none may open to other text.
            match keys.bob.open(&tampered, NOW) {
                Err(_) => {}
                Ok(plaintext) => prop_assert_eq!(plaintext.body, "seed"),
            }
        }
    }

    #[test]
    fn the_valid_seed_opens_once() {
        let keys = keys();
        let mut guard = ReplayGuard::new(60_000);
        let plaintext = keys.bob.open(&keys.valid, NOW).unwrap();
        guard.admit(&plaintext, NOW).unwrap();
        assert!(matches!(
            guard.admit(&plaintext, NOW),
            Err(OpenError::Replayed(_))
        ));
    }
}
