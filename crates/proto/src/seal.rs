//! Sealing: the pairwise Fernet keys and the checked plaintext inside every message.
//!
//! [`Channel`] holds the two keys one user shares with one peer: HKDF-SHA256 over their
//! X25519 shared secret, with both names and both key sets length-prefixed in the info, one
//! key per direction (so a message cannot be reflected back to its sender). Fernet has no
//! associated data, so the sealed [`Plaintext`] repeats sender, recipient, id and time, and
//! [`Channel::open`] checks them against the envelope and the channel. [`ReplayGuard`]
//! remembers ids it has opened within a time window.
//!
//! A sealed plaintext is either a message or a [`Receipt`] (see [`Plaintext::to_bytes`]
//! for the encoding, which keeps every message's bytes as older builds wrote them).

use std::collections::HashMap;

use base64::Engine;
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{
    identity::{Identity, KeyError, PublicKeys, push_field},
    msg::{Envelope, MessageId},
    name::Username,
    wire,
};

const PAIR_KEY_SALT: &[u8] = b"p2pchat pair key salt v1";
const PAIR_KEY_CONTEXT: &[u8] = b"p2pchat pair key v1";
/// Fernet refuses tokens dated further ahead than this many seconds.
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// The longest message body accepted, in bytes; a sealed envelope of it fits a frame.
pub const MAX_BODY_LEN: usize = 16 * 1024;

/// What a sealed message says inside its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plaintext {
    /// The message id (equal to the envelope's).
    pub id: MessageId,
    /// The sender (equal to the envelope's, and to the channel's peer).
    pub from: Username,
    /// The recipient (equal to the envelope's, and to the channel's owner).
    pub to: Username,
    /// When the sender wrote it, in milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// The text (empty in a receipt).
    pub body: String,
    /// `Some` when this is a receipt, not a message: never shown, never answered by a
    /// receipt. Sealed after the fields above (see [`Plaintext::to_bytes`]).
    #[serde(skip)]
    pub receipt: Option<Receipt>,
}

/// The most message ids one receipt names: its sealed bytes stay far below
/// [`MAX_BODY_LEN`] (16 bytes an id), so a batch of mail is answered by a few receipts.
pub const MAX_RECEIPT_IDS: usize = 256;

/// What a receipt says of the messages it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReceiptKind {
    /// The recipient stored them (they came from its mailbox).
    Delivered,
    /// The recipient's screen showed them.
    Read,
    /// The recipient could not open them (the session they were sealed in is lost there:
    /// a restored backup, a lost state) and asks their sender to send them again, sealed
    /// in a new session. Sealed itself in a session the recipient starts anew. Added last:
    /// an older build decodes no such kind, so it refuses the whole plaintext as
    /// malformed (it never shows it, and answers a direct one with a refusal).
    Resend,
}

/// A receipt, sealed like a message by the recipient of `ids` to their sender (a request
/// to send them again is one too, of kind [`ReceiptKind::Resend`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// The messages (at most [`MAX_RECEIPT_IDS`]).
    pub ids: Vec<MessageId>,
}

/// What follows a plaintext's fields in its sealed bytes: nothing for a message, a
/// variant of this for anything else (a new kind is a new variant at the end).
#[derive(Serialize, Deserialize)]
enum Extension {
    Receipt(Receipt),
}

impl Plaintext {
    /// The sealed bytes: the postcard fields (id, from, to, sent_at_ms, body), then, only
    /// for a receipt, an [`Extension`]. A message is encoded exactly as by builds that had
    /// no receipts, so mail sealed by either opens with the other; a receipt has bytes
    /// after the fields, which an older build's strict decoder refuses as malformed (it
    /// never shows a receipt as a message). The server sees none of it: the bytes are
    /// sealed, and tell a receipt from a message only by their length.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        // Encoding plain data into a Vec cannot fail.
        let mut bytes = Zeroizing::new(wire::encode(self).map(|b| b.to_vec()).unwrap_or_default());
        if let Some(receipt) = &self.receipt {
            let extension = wire::encode(&Extension::Receipt(receipt.clone())).unwrap_or_default();
            bytes.extend_from_slice(&extension);
        }
        bytes
    }

    /// Reads what [`Plaintext::to_bytes`] wrote (or an older build's message). A receipt
    /// must have no text and at most [`MAX_RECEIPT_IDS`] ids.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OpenError> {
        let (mut plaintext, rest): (Plaintext, &[u8]) =
            wire::decode_prefix(bytes).map_err(|_| OpenError::Malformed)?;
        if !rest.is_empty() {
            let Extension::Receipt(receipt) =
                wire::decode(rest).map_err(|_| OpenError::Malformed)?;
            if !plaintext.body.is_empty() || receipt.ids.len() > MAX_RECEIPT_IDS {
                return Err(OpenError::Malformed);
            }
            plaintext.receipt = Some(receipt);
        }
        Ok(plaintext)
    }
}

/// Why the pairwise keys could not be derived, or a message sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The peer's keys do not verify.
    #[error("the peer's keys are invalid: {0}")]
    BadKeys(#[from] KeyError),
    /// The Diffie-Hellman result is all zero: the peer's key is a low-order point.
    #[error("the peer's X25519 key is degenerate (all-zero shared secret); refusing it")]
    DegenerateKey,
    /// The body is too long.
    #[error("a message has at most {MAX_BODY_LEN} bytes (this one has {0})")]
    TooLong(usize),
    /// No ratchet session with the peer is started yet (see [`crate::ratchet`]).
    #[error("no encrypted session with the peer is started yet")]
    NoSession,
}

/// Why a sealed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The token does not decrypt under this channel's key: tampered, forged, or sealed for
    /// another pair or direction.
    #[error(
        "the message does not decrypt with the key shared with {peer}: forged, tampered with, or sealed for someone else"
    )]
    BadToken {
        /// The expected sender.
        peer: Username,
    },
    /// The token is dated too far in the future.
    #[error(
        "the message is dated {ahead_secs} s in the future; the sender's or this machine's clock is wrong (they must agree within {MAX_CLOCK_SKEW_SECS} s)"
    )]
    ClockSkew {
        /// How far ahead.
        ahead_secs: u64,
    },
    /// The plaintext is not a sealed message.
    #[error("the decrypted message is malformed")]
    Malformed,
    /// The sealed header disagrees with the envelope or the channel.
    #[error("the message's sealed {field} does not match its envelope or channel")]
    Mismatch {
        /// Which field.
        field: &'static str,
    },
    /// The message id was already opened.
    #[error("message {0} was already received (replay or retransmission)")]
    Replayed(MessageId),
    /// A ratchet message that no session with its sender opens: the recipient lost the
    /// session (a restored backup, a new device), or it was never started. The sender
    /// starts a new one.
    #[error(
        "no encrypted session with {peer} opens this message (the session was lost or replaced)"
    )]
    NoSession {
        /// The sender.
        peer: Username,
    },
    /// A message sealed by the static channel from before the ratchet, written after the
    /// recipient started using the ratchet: only older mail is accepted that way.
    #[error(
        "the message is sealed the old way (no forward secrecy) and newer than the switch to the ratchet; refused"
    )]
    Legacy,
    /// The message is older than the replay window.
    #[error("the message is older than the {window_secs} s replay window")]
    Expired {
        /// The window.
        window_secs: u64,
    },
}

/// The keys one user (`me`) shares with one peer.
pub struct Channel {
    me: Username,
    peer: Username,
    send: fernet::Fernet,
    recv: fernet::Fernet,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Channel({} <-> {})", self.me, self.peer)
    }
}

impl Channel {
    /// Derives the pairwise keys of `me` (with secret `identity`) and `peer` (with public
    /// `peer_keys`, whose signature is checked here).
    pub fn new(
        identity: &Identity,
        me: &Username,
        peer: &Username,
        peer_keys: &PublicKeys,
    ) -> Result<Self, SealError> {
        peer_keys.verify()?;
        let shared = identity
            .diffie_hellman(&peer_keys.exchange)
            .ok_or(SealError::DegenerateKey)?;
        let mine = (me, identity.public());
        let theirs = (peer, peer_keys);
        Ok(Self {
            me: me.clone(),
            peer: peer.clone(),
            send: direction_key(&shared, mine, theirs),
            recv: direction_key(&shared, theirs, mine),
        })
    }

    /// The peer this channel talks to.
    pub fn peer(&self) -> &Username {
        &self.peer
    }

    /// Seals `body` as message `id`, written at `now_ms`.
    pub fn seal(&self, id: MessageId, body: &str, now_ms: u64) -> Result<Envelope, SealError> {
        if body.len() > MAX_BODY_LEN {
            return Err(SealError::TooLong(body.len()));
        }
        let plaintext = Plaintext {
            id,
            from: self.me.clone(),
            to: self.peer.clone(),
            sent_at_ms: now_ms,
            body: body.to_owned(),
            receipt: None,
        };
        let bytes = plaintext.to_bytes();
        Ok(Envelope {
            id,
            from: self.me.clone(),
            to: self.peer.clone(),
            token: self
                .send
                .encrypt_at_time(&bytes, now_ms / 1000)
                .into_bytes(),
        })
    }

    /// Opens an envelope from the peer at time `now_ms`, checking that its sealed header
    /// matches the envelope and this channel.
    pub fn open(&self, envelope: &Envelope, now_ms: u64) -> Result<Plaintext, OpenError> {
        let now_secs = now_ms / 1000;
        // A Fernet token is text (URL-safe base64): anything else is no token of this
        // channel, like text that does not authenticate.
        let token = std::str::from_utf8(&envelope.token).map_err(|_| OpenError::BadToken {
            peer: self.peer.clone(),
        })?;
        let bytes = Zeroizing::new(
            self.recv
                .decrypt_at_time(token, None, now_secs)
                .map_err(|_| self.open_failure(token, now_secs))?,
        );
        let plaintext = Plaintext::from_bytes(&bytes)?;
        // The token's timestamp is authenticated now; the sealed time must be the one it
        // was sealed at (`seal` stamps both alike), so a sender cannot date a message
        // beyond Fernet's future bound inside the plaintext.
        let stamped = token_time(token) == Some(plaintext.sent_at_ms / 1000);
        let checks = [
            ("id", plaintext.id == envelope.id),
            ("time", stamped),
            (
                "sender",
                plaintext.from == envelope.from && plaintext.from == self.peer,
            ),
            (
                "recipient",
                plaintext.to == envelope.to && plaintext.to == self.me,
            ),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((field, _)) => Err(OpenError::Mismatch { field }),
            None => Ok(plaintext),
        }
    }

    /// Why a token did not open at `now_secs`. Fernet checks the timestamp before the
    /// HMAC, so a token dated too far ahead says nothing yet about who made it: it is a
    /// clock problem only if it opens at its own time, and a forgery otherwise.
    fn open_failure(&self, token: &str, now_secs: u64) -> OpenError {
        match token_time(token) {
            Some(stamp)
                if stamp > now_secs + MAX_CLOCK_SKEW_SECS
                    && self.recv.decrypt_at_time(token, None, stamp).is_ok() =>
            {
                OpenError::ClockSkew {
                    ahead_secs: stamp - now_secs,
                }
            }
            _ => OpenError::BadToken {
                peer: self.peer.clone(),
            },
        }
    }
}

fn direction_key(
    shared: &[u8; 32],
    sender: (&Username, &PublicKeys),
    recipient: (&Username, &PublicKeys),
) -> fernet::Fernet {
    let mut info = Vec::with_capacity(256);
    push_field(&mut info, PAIR_KEY_CONTEXT);
    for (user, keys) in [sender, recipient] {
        push_field(&mut info, user.as_str().as_bytes());
        push_field(&mut info, &keys.identity);
        push_field(&mut info, &keys.exchange);
    }
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
    Hkdf::<Sha256>::new(Some(PAIR_KEY_SALT), shared)
        .expand(&info, key.as_mut_slice())
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF length"));
    let encoded = Zeroizing::new(base64::engine::general_purpose::URL_SAFE.encode(key.as_slice()));
    fernet::Fernet::new(&encoded)
        .unwrap_or_else(|| unreachable!("a 32-byte key is a valid Fernet key"))
}

/// The timestamp (seconds) a Fernet token claims, if it parses that far.
fn token_time(token: &str) -> Option<u64> {
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(token.trim_end_matches('='))
        .or_else(|_| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.trim_end_matches('='))
        })
        .ok()?;
    let stamp: [u8; 8] = bytes.get(1..9)?.try_into().ok()?;
    Some(u64::from_be_bytes(stamp))
}

/// Remembers opened message ids for `window_ms`, refusing repeats and anything older than
/// the window (whose id might already be forgotten).
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    window_ms: u64,
    seen: HashMap<MessageId, u64>,
}

impl ReplayGuard {
    /// A guard with a window of `window_ms` milliseconds.
    pub fn new(window_ms: u64) -> Self {
        Self {
            window_ms,
            seen: HashMap::new(),
        }
    }

    /// Admits `plaintext` once: the first time an id is seen within the window.
    pub fn admit(&mut self, plaintext: &Plaintext, now_ms: u64) -> Result<(), OpenError> {
        if plaintext.sent_at_ms.saturating_add(self.window_ms) < now_ms {
            return Err(OpenError::Expired {
                window_secs: self.window_ms / 1000,
            });
        }
        if self.seen.contains_key(&plaintext.id) {
            return Err(OpenError::Replayed(plaintext.id));
        }
        self.seen.insert(plaintext.id, plaintext.sent_at_ms);
        Ok(())
    }

    /// Whether `id` was admitted.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.seen.contains_key(id)
    }

    /// Forgets ids older than the window.
    pub fn prune(&mut self, now_ms: u64) {
        let window = self.window_ms;
        self.seen
            .retain(|_, sent_at| sent_at.saturating_add(window) >= now_ms);
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000_000;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    struct Pair {
        alice: Channel,
        bob: Channel,
    }

    fn pair(a: &str, b: &str) -> (Pair, Identity, Identity) {
        let alice_id = Identity::generate();
        let bob_id = Identity::generate();
        let alice = Channel::new(&alice_id, &name(a), &name(b), bob_id.public()).unwrap();
        let bob = Channel::new(&bob_id, &name(b), &name(a), alice_id.public()).unwrap();
        (Pair { alice, bob }, alice_id, bob_id)
    }

    /// A message as builds without receipts encoded it (the same fields, nothing after).
    #[derive(Serialize, Deserialize)]
    struct OlderPlaintext {
        id: MessageId,
        from: Username,
        to: Username,
        sent_at_ms: u64,
        body: String,
    }

    fn message(body: &str) -> Plaintext {
        Plaintext {
            id: MessageId::random(),
            from: name("alice"),
            to: name("bob"),
            sent_at_ms: NOW,
            body: body.into(),
            receipt: None,
        }
    }

    #[test]
    fn a_message_is_encoded_as_older_builds_did_so_mail_opens_both_ways() {
        let message = message("hi");
        let older = OlderPlaintext {
            id: message.id,
            from: message.from.clone(),
            to: message.to.clone(),
            sent_at_ms: message.sent_at_ms,
            body: message.body.clone(),
        };
        let older_bytes = wire::encode(&older).unwrap();
        assert_eq!(message.to_bytes().as_slice(), older_bytes.as_ref());
        assert_eq!(Plaintext::from_bytes(&older_bytes).unwrap(), message);
    }

    #[test]
    fn a_receipt_round_trips_and_an_older_build_refuses_it_rather_than_show_it() {
        let ids: Vec<MessageId> = (0..MAX_RECEIPT_IDS).map(|_| MessageId::random()).collect();
        let mut receipt = message("");
        receipt.receipt = Some(Receipt {
            kind: ReceiptKind::Read,
            ids,
        });
        let bytes = receipt.to_bytes();
        assert!(bytes.len() < MAX_BODY_LEN, "{}", bytes.len());
        assert_eq!(Plaintext::from_bytes(&bytes).unwrap(), receipt);
        // An older build decodes strictly: bytes after the fields are refused.
        assert!(wire::decode::<OlderPlaintext>(&bytes).is_err());
    }

    /// The receipt kinds of builds that had no request to send again.
    #[derive(Debug, Serialize, Deserialize)]
    enum OlderReceiptKind {
        Delivered,
        Read,
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct OlderReceipt {
        kind: OlderReceiptKind,
        ids: Vec<MessageId>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    enum OlderExtension {
        Receipt(OlderReceipt),
    }

    #[test]
    fn a_resend_request_round_trips_and_a_build_without_it_refuses_it_as_malformed() {
        let mut request = message("");
        request.receipt = Some(Receipt {
            kind: ReceiptKind::Resend,
            ids: (0..MAX_RECEIPT_IDS).map(|_| MessageId::random()).collect(),
        });
        let bytes = request.to_bytes();
        assert!(bytes.len() < MAX_BODY_LEN, "{}", bytes.len());
        assert_eq!(Plaintext::from_bytes(&bytes).unwrap(), request);
        // A build with receipts but without this kind reads the fields, then fails to
        // decode the extension: `Plaintext::from_bytes` there answers `Malformed`.
        let (_, rest): (OlderPlaintext, &[u8]) = wire::decode_prefix(&bytes).unwrap();
        assert!(wire::decode::<OlderExtension>(rest).is_err());
        // Its own receipts still decode there (the new kind changed no older encoding).
        let mut read = message("");
        read.receipt = Some(Receipt {
            kind: ReceiptKind::Read,
            ids: vec![MessageId::random()],
        });
        let bytes = read.to_bytes();
        let (_, rest): (OlderPlaintext, &[u8]) = wire::decode_prefix(&bytes).unwrap();
        assert!(matches!(
            wire::decode::<OlderExtension>(rest),
            Ok(OlderExtension::Receipt(OlderReceipt {
                kind: OlderReceiptKind::Read,
                ..
            }))
        ));
    }

    #[test]
    fn a_receipt_with_text_or_too_many_ids_or_garbage_after_a_message_is_malformed() {
        let mut with_text = message("look at me");
        with_text.receipt = Some(Receipt {
            kind: ReceiptKind::Delivered,
            ids: vec![MessageId::random()],
        });
        assert_eq!(
            Plaintext::from_bytes(&with_text.to_bytes()),
            Err(OpenError::Malformed)
        );
        let mut too_many = message("");
        too_many.receipt = Some(Receipt {
            kind: ReceiptKind::Delivered,
            ids: (0..=MAX_RECEIPT_IDS).map(|_| MessageId::random()).collect(),
        });
        assert_eq!(
            Plaintext::from_bytes(&too_many.to_bytes()),
            Err(OpenError::Malformed)
        );
        let mut garbage = message("hi").to_bytes().to_vec();
        garbage.extend_from_slice(&[7, 7, 7]);
        assert_eq!(Plaintext::from_bytes(&garbage), Err(OpenError::Malformed));
    }

    #[test]
    fn seal_then_open_round_trips() {
        let (pair, _, _) = pair("alice", "bob");
        let id = MessageId::random();
        let envelope = pair.alice.seal(id, "hello bob", NOW).unwrap();
        assert_eq!(
            (envelope.from.as_str(), envelope.to.as_str()),
            ("alice", "bob")
        );
        let opened = pair.bob.open(&envelope, NOW + 5).unwrap();
        assert_eq!(opened.body, "hello bob");
        assert_eq!(opened.id, id);
        assert_eq!(opened.sent_at_ms, NOW);
        // And the other way.
        let back = pair.bob.seal(MessageId::random(), "hi alice", NOW).unwrap();
        assert_eq!(pair.alice.open(&back, NOW).unwrap().body, "hi alice");
    }

    #[test]
    fn both_sides_derive_the_same_keys_per_direction() {
        let (pair, _, _) = pair("alice", "bob");
        let envelope = pair.alice.seal(MessageId::random(), "x", NOW).unwrap();
        assert!(
            pair.bob
                .recv
                .decrypt_at_time(
                    std::str::from_utf8(&envelope.token).unwrap(),
                    None,
                    NOW / 1000
                )
                .is_ok()
        );
        // Directions differ: alice's own receive key does not open what she sent.
        assert!(
            pair.alice
                .recv
                .decrypt_at_time(
                    std::str::from_utf8(&envelope.token).unwrap(),
                    None,
                    NOW / 1000
                )
                .is_err()
        );
    }

    #[test]
    fn a_token_that_is_not_text_is_no_token_of_the_channel() {
        let (pair, _, _) = pair("alice", "bob");
        let mut envelope = pair.alice.seal(MessageId::random(), "hello", NOW).unwrap();
        envelope.token = vec![0x02, 0xff, 0xfe, 0x00];
        assert!(matches!(
            pair.bob.open(&envelope, NOW),
            Err(OpenError::BadToken { .. })
        ));
    }

    #[test]
    fn tampered_token_is_refused() {
        let (pair, _, _) = pair("alice", "bob");
        let mut envelope = pair.alice.seal(MessageId::random(), "hello", NOW).unwrap();
        let middle = envelope.token.len() / 2;
        envelope.token[middle] = if envelope.token[middle] == b'A' {
            b'B'
        } else {
            b'A'
        };
        assert!(matches!(
            pair.bob.open(&envelope, NOW),
            Err(OpenError::BadToken { .. })
        ));
    }

    #[test]
    fn wrong_pair_cannot_open() {
        let (pair, alice_id, _) = pair("alice", "bob");
        let carol_id = Identity::generate();
        let carol =
            Channel::new(&carol_id, &name("carol"), &name("alice"), alice_id.public()).unwrap();
        let mut envelope = pair
            .alice
            .seal(MessageId::random(), "for bob", NOW)
            .unwrap();
        envelope.to = name("carol");
        assert!(matches!(
            carol.open(&envelope, NOW),
            Err(OpenError::BadToken { .. })
        ));
    }

    #[test]
    fn swapped_sender_and_recipient_is_refused() {
        let (pair, _, _) = pair("alice", "bob");
        let mut envelope = pair.alice.seal(MessageId::random(), "hello", NOW).unwrap();
        std::mem::swap(&mut envelope.from, &mut envelope.to);
        // Alice receiving her own message "from bob" (a reflection) fails: other direction.
        assert!(matches!(
            pair.alice.open(&envelope, NOW),
            Err(OpenError::BadToken { .. })
        ));
        // Bob with the header swapped fails the header check.
        assert!(matches!(
            pair.bob.open(&envelope, NOW),
            Err(OpenError::Mismatch { .. })
        ));
    }

    #[test]
    fn relabelled_id_is_refused() {
        let (pair, _, _) = pair("alice", "bob");
        let mut envelope = pair.alice.seal(MessageId::random(), "hello", NOW).unwrap();
        envelope.id = MessageId::random();
        assert_eq!(
            pair.bob.open(&envelope, NOW),
            Err(OpenError::Mismatch { field: "id" })
        );
    }

    #[test]
    fn replayed_id_is_refused() {
        let (pair, _, _) = pair("alice", "bob");
        let envelope = pair.alice.seal(MessageId::random(), "once", NOW).unwrap();
        let mut guard = ReplayGuard::new(60_000);
        let first = pair.bob.open(&envelope, NOW).unwrap();
        guard.admit(&first, NOW).unwrap();
        let again = pair.bob.open(&envelope, NOW + 1).unwrap();
        assert_eq!(
            guard.admit(&again, NOW + 1),
            Err(OpenError::Replayed(envelope.id))
        );
        // Past the window the message is refused as expired, even once pruned.
        guard.prune(NOW + 120_000);
        assert!(guard.is_empty());
        assert!(matches!(
            guard.admit(&again, NOW + 120_000),
            Err(OpenError::Expired { .. })
        ));
    }

    #[test]
    fn future_token_says_the_clock_is_wrong() {
        let (pair, _, _) = pair("alice", "bob");
        let envelope = pair
            .alice
            .seal(MessageId::random(), "from the future", NOW + 600_000)
            .unwrap();
        match pair.bob.open(&envelope, NOW) {
            Err(error @ OpenError::ClockSkew { ahead_secs: 600 }) => {
                assert!(error.to_string().contains("clock"));
            }
            other => panic!("expected a clock error, got {other:?}"),
        }
    }

    /// Regression: Fernet checks a token's time before its HMAC, so any garbage token
    /// dated ahead was reported as "your clock is wrong" (and skipped the forgery check)
    /// instead of as a forgery.
    #[test]
    fn a_forged_token_dated_ahead_is_a_forgery_not_a_clock_error() {
        let (pair, _, _) = pair("alice", "bob");
        let mut envelope = pair.alice.seal(MessageId::random(), "x", NOW).unwrap();
        let mut bytes = vec![0x80];
        bytes.extend_from_slice(&(NOW / 1000 + 600).to_be_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        envelope.token = base64::engine::general_purpose::URL_SAFE
            .encode(bytes)
            .into_bytes();
        assert!(matches!(
            pair.bob.open(&envelope, NOW),
            Err(OpenError::BadToken { .. })
        ));
    }

    /// Regression: the time sealed in the plaintext was not checked against the token's
    /// authenticated time, so a sender could date a message a year ahead (past Fernet's
    /// one-minute bound) and it opened, to sort, expire and be remembered by that date.
    #[test]
    fn the_sealed_time_must_be_the_tokens_time() {
        let (pair, _, _) = pair("alice", "bob");
        let id = MessageId::random();
        let plaintext = Plaintext {
            id,
            from: name("alice"),
            to: name("bob"),
            sent_at_ms: NOW + 365 * 24 * 3600 * 1000,
            body: "from next year".into(),
            receipt: None,
        };
        let bytes = wire::encode(&plaintext).unwrap();
        let envelope = Envelope {
            id,
            from: name("alice"),
            to: name("bob"),
            token: pair
                .alice
                .send
                .encrypt_at_time(&bytes, NOW / 1000)
                .into_bytes(),
        };
        assert_eq!(
            pair.bob.open(&envelope, NOW),
            Err(OpenError::Mismatch { field: "time" })
        );
    }

    #[test]
    fn keys_differ_for_ambiguous_name_splits() {
        // ("ab", "c") and ("a", "bc") with the same key material must not share a key.
        let first = Identity::generate();
        let second = Identity::generate();
        let ab_c = Channel::new(&first, &name("ab"), &name("c"), second.public()).unwrap();
        let a_bc = Channel::new(&first, &name("a"), &name("bc"), second.public()).unwrap();
        let envelope = ab_c.seal(MessageId::random(), "x", NOW).unwrap();
        assert!(
            a_bc.send
                .decrypt_at_time(
                    std::str::from_utf8(&envelope.token).unwrap(),
                    None,
                    NOW / 1000
                )
                .is_err()
        );
    }

    #[test]
    fn low_order_peer_key_is_refused() {
        let me = Identity::generate();
        let attacker = Identity::generate();
        let mut keys = attacker.public().clone();
        keys.exchange = [0u8; 32];
        keys.exchange_signature = attacker.sign(
            &super::super::identity::tests_support::exchange_message(&keys.exchange),
        );
        assert_eq!(
            Channel::new(&me, &name("me"), &name("evil"), &keys).unwrap_err(),
            SealError::DegenerateKey
        );
    }

    #[test]
    fn oversized_body_is_refused() {
        let (pair, _, _) = pair("alice", "bob");
        let body = "x".repeat(MAX_BODY_LEN + 1);
        assert_eq!(
            pair.alice
                .seal(MessageId::random(), &body, NOW)
                .unwrap_err(),
            SealError::TooLong(MAX_BODY_LEN + 1)
        );
    }
}
