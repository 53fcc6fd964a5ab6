//! Arbitrary envelopes (decoded from the input, or the input as a token) opened by a real
//! channel: every outcome is a value, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use proto::{Channel, Envelope, Identity, MessageId, ReplayGuard, Username, wire};

struct Keys {
    bob: Channel,
    valid: Envelope,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let alice_identity = Identity::generate();
        let bob_identity = Identity::generate();
        let (alice_name, bob_name) = (Username::new("alice").unwrap(), Username::new("bob").unwrap());
        let alice = Channel::new(&alice_identity, &alice_name, &bob_name, bob_identity.public()).unwrap();
        let bob = Channel::new(&bob_identity, &bob_name, &alice_name, alice_identity.public()).unwrap();
        let valid = alice.seal(MessageId([1; 16]), "seed", 1_790_000_000_000).unwrap();
        Keys { bob, valid }
    })
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    let now = 1_790_000_000_000;
    let mut guard = ReplayGuard::new(60_000);
    let mut try_open = |envelope: &Envelope| {
        if let Ok(plaintext) = keys.bob.open(envelope, now) {
            let _ = guard.admit(&plaintext, now);
        }
    };
    if let Ok(envelope) = wire::decode::<Envelope>(data) {
        try_open(&envelope);
    }
    let mut as_token = keys.valid.clone();
    as_token.token = data.to_vec();
    try_open(&as_token);
    // The valid token with the input spliced over its middle.
    let mut spliced = keys.valid.token.clone();
    let at = spliced.len() / 3;
    for (offset, byte) in data.iter().take(spliced.len() - at).enumerate() {
        spliced[at + offset] = *byte;
    }
    as_token.token = spliced;
    try_open(&as_token);
});
