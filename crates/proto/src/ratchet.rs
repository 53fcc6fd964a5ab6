//! Messages sealed by a double ratchet: vodozemac's Olm (audited; nothing here is
//! hand-written cryptography).
//!
//! Each user has an Olm [`Account`] ([`OwnAccount`]): a Curve25519 key of its own (the
//! *Olm key*), one-time keys and a fallback key. The Olm key and every published key are
//! signed by the user's Ed25519 identity ([`SignedKey`]), so a sender who pinned the
//! identity knows the keys are the recipient's, whoever passed them on. The user publishes
//! them at the discovery server ([`PreKeys`]); a sender claims one ([`PreKeyBundle`], each
//! one-time key handed out once) and starts a [`Sessions`] entry with it while the
//! recipient may be offline.
//!
//! Until the recipient has answered, every message is an Olm pre-key message, which
//! carries what the recipient needs to start its side of the session; the envelope then
//! also carries the sender's signature over its Olm key, so the recipient checks the
//! binding before its account is touched. A session forgets each message key once used
//! and ratchets forward with every exchange: a key stolen later opens no message sealed
//! before it (forward secrecy), and after one exchange the thief is locked out again
//! (post-compromise security).
//!
//! The sealed bytes are the same checked [`Plaintext`] as the older static channel's
//! ([`crate::seal`]), checked against the envelope and the pair. The envelope's `token`
//! holds the Olm message in binary: the byte `0x01` then a normal message, or `0x02`, the
//! sender's 64-byte signature over its Olm key, then a pre-key message. Every pre-key
//! message carries the signature, not just the first: any of them may be the first the
//! recipient opens (mail arrives by more than one route, and a mailbox may drop mail that
//! expired), and the recipient starts its session only from a signed Olm key. Older builds
//! wrote the same message as text, `o<type>.<base64>` (`.<base64 signature>` after a
//! pre-key message), and mailboxes may still hold such mail: it opens here unchanged. Both
//! forms differ from a Fernet token (text starting with `gAAAAA`) in their first byte, so
//! mail sealed before the ratchet still opens with [`crate::Channel`].
//!
//! [`Sessions`] and [`OwnAccount`] are saved as pickles ([`Sessions::pickle`],
//! [`OwnAccount::pickle`]); the caller commits them in the same write as the message they
//! sealed or opened. A caller that lets a sealed envelope leave before that write is
//! durable must, after a crash, retire the sessions whose saves may be behind
//! ([`Sessions::retire`]), so a message key never serves twice.

use base64::Engine;
use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};
use vodozemac::{
    Curve25519PublicKey,
    olm::{
        Account, AccountPickle, OlmMessage, PreKeyMessage, Session, SessionConfig,
        SessionCreationError, SessionPickle,
    },
};
use zeroize::Zeroizing;

use crate::{
    identity::{Identity, KeyError, PublicKeys, push_field},
    msg::{Envelope, MessageId},
    name::Username,
    seal::{MAX_BODY_LEN, MAX_RECEIPT_IDS, OpenError, Plaintext, Receipt, SealError},
};

const OLM_KEY_CONTEXT: &[u8] = b"p2pchat olm key v1";
const PREKEY_CONTEXT: &[u8] = b"p2pchat prekey v1";
/// How many one-time keys a user keeps published; it tops them up when fewer are left
/// than half of this.
pub const ONE_TIME_KEYS_TARGET: usize = 50;
/// The most keys one publish may carry, and the most one-time keys the server keeps for a
/// user.
pub const MAX_ONE_TIME_KEYS: usize = 100;
/// The most sessions kept with one peer (two start at once when both sides send first; a
/// lost session is replaced): the newest is used to send, all are tried to open.
pub const MAX_SESSIONS_PER_PEER: usize = 4;
/// The first byte of a binary token holding an Olm normal message (then its bytes).
const TOKEN_NORMAL: u8 = 0x01;
/// The first byte of a binary token holding an Olm pre-key message (then the sender's
/// 64-byte signature over its Olm key, then the message's bytes).
const TOKEN_PRE_KEY: u8 = 0x02;
/// The first byte of the text form older builds sealed (`o`, then the message type digit).
const OLM_TEXT_PREFIX: u8 = b'o';
/// The length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// The Olm session configuration: version 1, the one audited and spoken by libolm.
fn session_config() -> SessionConfig {
    SessionConfig::version_1()
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// A Curve25519 key signed by its owner's Ed25519 identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKey {
    /// The public key.
    pub key: [u8; 32],
    /// The identity's signature (see [`SignedKey::verify_olm_key`] and
    /// [`SignedKey::verify_prekey`] for what is signed).
    pub signature: Signature,
}

fn olm_key_message(user: &Username, key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    push_field(&mut out, OLM_KEY_CONTEXT);
    push_field(&mut out, user.as_str().as_bytes());
    push_field(&mut out, key);
    out
}

fn prekey_message(user: &Username, olm_key: &[u8; 32], key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    push_field(&mut out, PREKEY_CONTEXT);
    push_field(&mut out, user.as_str().as_bytes());
    push_field(&mut out, olm_key);
    push_field(&mut out, key);
    out
}

impl SignedKey {
    /// Checks that `keys` signed this as `user`'s Olm key.
    pub fn verify_olm_key(&self, user: &Username, keys: &PublicKeys) -> Result<(), KeyError> {
        keys.verify_signature(&olm_key_message(user, &self.key), &self.signature)
    }

    /// Checks that `keys` signed this as a one-time or fallback key of `user`'s Olm key
    /// `olm_key`.
    pub fn verify_prekey(
        &self,
        user: &Username,
        olm_key: &[u8; 32],
        keys: &PublicKeys,
    ) -> Result<(), KeyError> {
        keys.verify_signature(&prekey_message(user, olm_key, &self.key), &self.signature)
    }
}

/// What a user publishes at the server (`Request::PublishPreKeys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreKeys {
    /// The Olm key, signed.
    pub olm_key: SignedKey,
    /// New one-time keys (each handed out once), signed.
    pub one_time: Vec<SignedKey>,
    /// The fallback key, handed out when no one-time key is left (replaces the last one).
    pub fallback: Option<SignedKey>,
}

impl PreKeys {
    /// Checks every signature against `user`'s `keys`.
    pub fn verify(&self, user: &Username, keys: &PublicKeys) -> Result<(), KeyError> {
        self.olm_key.verify_olm_key(user, keys)?;
        for key in self.one_time.iter().chain(self.fallback.iter()) {
            key.verify_prekey(user, &self.olm_key.key, keys)?;
        }
        Ok(())
    }
}

/// What a sender claims to start a session with a user (`Reply::PreKey`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreKeyBundle {
    /// The user's Olm key, signed.
    pub olm_key: SignedKey,
    /// A one-time key (now removed at the server), or the fallback key.
    pub prekey: SignedKey,
    /// Whether `prekey` is the fallback key (no one-time key was left).
    pub fallback: bool,
}

impl PreKeyBundle {
    /// Checks both signatures against `user`'s `keys`.
    pub fn verify(&self, user: &Username, keys: &PublicKeys) -> Result<(), KeyError> {
        self.olm_key.verify_olm_key(user, keys)?;
        self.prekey.verify_prekey(user, &self.olm_key.key, keys)
    }
}

/// Why a pickle could not be read.
#[derive(Debug, thiserror::Error)]
#[error("a saved ratchet state does not decode: {0}")]
pub struct PickleError(#[from] serde_json::Error);

/// A user's own Olm account, with the signature binding its Olm key to the user.
pub struct OwnAccount {
    account: Account,
    me: Username,
    binding: Signature,
}

impl std::fmt::Debug for OwnAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OwnAccount({})", self.me)
    }
}

impl OwnAccount {
    /// A new account for `me`, with a fallback key.
    pub fn generate(identity: &Identity, me: &Username) -> Self {
        let mut account = Account::new();
        account.generate_fallback_key();
        Self::bind(account, identity, me)
    }

    /// The account saved by [`OwnAccount::pickle`], bound to `me` by `identity`.
    pub fn from_pickle(
        bytes: &[u8],
        identity: &Identity,
        me: &Username,
    ) -> Result<Self, PickleError> {
        let pickle: AccountPickle = serde_json::from_slice(bytes)?;
        Ok(Self::bind(Account::from_pickle(pickle), identity, me))
    }

    fn bind(account: Account, identity: &Identity, me: &Username) -> Self {
        let key = account.curve25519_key().to_bytes();
        let binding = identity.sign(&olm_key_message(me, &key));
        Self {
            account,
            me: me.clone(),
            binding,
        }
    }

    /// The account's secrets as bytes to save (zeroized when dropped).
    pub fn pickle(&self) -> Zeroizing<Vec<u8>> {
        // A pickle is plain data: it always serialises.
        to_json_zeroizing(&self.account.pickle()).unwrap_or_default()
    }

    /// The Olm key, signed.
    pub fn olm_key(&self) -> SignedKey {
        SignedKey {
            key: self.account.curve25519_key().to_bytes(),
            signature: self.binding,
        }
    }

    /// How many one-time keys the account holds (published or not).
    pub fn one_time_key_count(&self) -> usize {
        self.account.stored_one_time_key_count()
    }

    /// The keys to publish when the server holds `published` one-time keys: new one-time
    /// keys up to [`ONE_TIME_KEYS_TARGET`] (plus any made earlier and not yet published),
    /// and the fallback key, all signed. The account changes (save it before
    /// publishing, so no published key is ever unknown to it); once the server has them,
    /// call [`OwnAccount::mark_published`].
    pub fn prekeys_to_publish(&mut self, identity: &Identity, published: usize) -> PreKeys {
        let unpublished = self.account.one_time_keys().len();
        let wanted = ONE_TIME_KEYS_TARGET.saturating_sub(published + unpublished);
        if wanted > 0 {
            self.account.generate_one_time_keys(wanted);
        }
        let olm_key = self.olm_key();
        let sign = |key: Curve25519PublicKey| {
            let key = key.to_bytes();
            SignedKey {
                key,
                signature: identity.sign(&prekey_message(&self.me, &olm_key.key, &key)),
            }
        };
        let mut one_time: Vec<SignedKey> = self
            .account
            .one_time_keys()
            .into_values()
            .map(sign)
            .collect();
        one_time.truncate(MAX_ONE_TIME_KEYS);
        let fallback = self.account.fallback_key().into_values().next().map(sign);
        PreKeys {
            olm_key,
            one_time,
            fallback,
        }
    }

    /// Makes a new fallback key (published by the next [`OwnAccount::prekeys_to_publish`]).
    /// The previous one keeps opening sessions started from it until the next rotation;
    /// the one before is forgotten, so a session started from a fallback key keeps forward
    /// secrecy once two rotations have passed.
    pub fn rotate_fallback_key(&mut self) {
        self.account.generate_fallback_key();
    }

    /// The server stored what [`OwnAccount::prekeys_to_publish`] returned.
    pub fn mark_published(&mut self) {
        self.account.mark_keys_as_published();
    }
}

/// An Olm message as the envelope's token says it.
struct Token {
    message: OlmMessage,
    /// After a pre-key message: the sender's signature over its Olm key.
    binding: Option<Signature>,
}

/// Whether `token` is an Olm message, binary or text (else it is a Fernet token of the
/// static channel, which starts with `gAAAAA`).
pub fn is_olm_token(token: &[u8]) -> bool {
    matches!(
        token.first(),
        Some(&(TOKEN_NORMAL | TOKEN_PRE_KEY | OLM_TEXT_PREFIX))
    )
}

/// The binary token of `message` (with the sender's `binding` after a pre-key message).
fn encode_token(message: &OlmMessage, binding: &Signature) -> Vec<u8> {
    let (_, bytes) = message.to_parts();
    let mut token = Vec::with_capacity(1 + SIGNATURE_LEN + bytes.len());
    match message {
        OlmMessage::PreKey(_) => {
            token.push(TOKEN_PRE_KEY);
            token.extend_from_slice(&binding.to_bytes());
        }
        OlmMessage::Normal(_) => token.push(TOKEN_NORMAL),
    }
    token.extend_from_slice(&bytes);
    token
}

/// Reads a token in either form: binary ([`encode_token`]) or the text of older builds.
fn decode_token(token: &[u8]) -> Result<Token, OpenError> {
    let (kind, binding, bytes) = match token.split_first() {
        Some((&TOKEN_NORMAL, bytes)) => (1, None, bytes),
        Some((&TOKEN_PRE_KEY, rest)) => {
            let (binding, bytes) = rest
                .split_first_chunk::<SIGNATURE_LEN>()
                .ok_or(OpenError::Malformed)?;
            (0, Some(Signature::from_bytes(binding)), bytes)
        }
        Some((&OLM_TEXT_PREFIX, _)) => return decode_text_token(token),
        _ => return Err(OpenError::Malformed),
    };
    let message = OlmMessage::from_parts(kind, bytes).map_err(|_| OpenError::Malformed)?;
    Ok(Token { message, binding })
}

/// Reads the text form older builds sealed: `o<type>.<base64>`, then `.<base64 signature>`
/// after a pre-key message.
fn decode_text_token(token: &[u8]) -> Result<Token, OpenError> {
    let text = std::str::from_utf8(token).map_err(|_| OpenError::Malformed)?;
    let rest = text
        .strip_prefix(char::from(OLM_TEXT_PREFIX))
        .ok_or(OpenError::Malformed)?;
    let mut parts = rest.split('.');
    let kind: usize = parts
        .next()
        .and_then(|kind| kind.parse().ok())
        .ok_or(OpenError::Malformed)?;
    let bytes = parts
        .next()
        .and_then(|part| b64().decode(part).ok())
        .ok_or(OpenError::Malformed)?;
    let binding = match parts.next() {
        Some(part) => {
            let bytes = b64().decode(part).map_err(|_| OpenError::Malformed)?;
            let bytes: [u8; SIGNATURE_LEN] = bytes.try_into().map_err(|_| OpenError::Malformed)?;
            Some(Signature::from_bytes(&bytes))
        }
        None => None,
    };
    if parts.next().is_some() {
        return Err(OpenError::Malformed);
    }
    let message = OlmMessage::from_parts(kind, &bytes).map_err(|_| OpenError::Malformed)?;
    match (&message, &binding) {
        (OlmMessage::PreKey(_), Some(_)) | (OlmMessage::Normal(_), None) => {
            Ok(Token { message, binding })
        }
        _ => Err(OpenError::Malformed),
    }
}

/// Whether `envelope` is a pre-key message whose Olm key `keys` signed as `user`'s: a
/// message that does not open under the pinned keys but passes this under the server's
/// was sealed after a real key change, not forged.
pub fn signed_by(envelope: &Envelope, user: &Username, keys: &PublicKeys) -> bool {
    match decode_token(&envelope.token) {
        Ok(Token {
            message: OlmMessage::PreKey(prekey),
            binding: Some(binding),
        }) => SignedKey {
            key: prekey.identity_key().to_bytes(),
            signature: binding,
        }
        .verify_olm_key(user, keys)
        .is_ok(),
        _ => false,
    }
}

/// Where a ratchet envelope stands in its sending chain (messages of one chain open best
/// in this order); `None` for anything else.
pub fn chain_position(envelope: &Envelope) -> Option<u64> {
    match decode_token(&envelope.token).ok()?.message {
        OlmMessage::Normal(message) => Some(message.chain_index()),
        OlmMessage::PreKey(prekey) => Some(prekey.message().chain_index()),
    }
}

/// The ratchet key a ratchet envelope's chain was sealed under (the sender's public half);
/// `None` for anything else. A sender that keeps the private half only once its state is
/// durable can tell from it whether the peer may answer to a key it could still lose.
pub fn ratchet_key(envelope: &Envelope) -> Option<[u8; 32]> {
    let key = match decode_token(&envelope.token).ok()?.message {
        OlmMessage::Normal(message) => message.ratchet_key(),
        OlmMessage::PreKey(prekey) => prekey.message().ratchet_key(),
    };
    Some(key.to_bytes())
}

/// What [`Sessions::open`] found.
#[derive(Debug)]
pub struct Opened {
    /// The checked plaintext.
    pub plaintext: Plaintext,
    /// Whether the account changed (a one-time key was used up): save it with the
    /// sessions.
    pub account_changed: bool,
}

/// The Olm sessions one user has with one peer, newest first.
///
/// A session may be *retired* from sealing ([`Sessions::retire`]): it still opens what the
/// peer sends in it, but nothing is sealed with it again. A client retires the sessions
/// whose saved state may be behind what it sent (it sent before the save was durable, then
/// crashed), so no message key of theirs can serve twice; the next message starts a new
/// session instead.
#[derive(Default)]
pub struct Sessions {
    list: Vec<Kept>,
}

/// One session and whether it may seal.
struct Kept {
    session: Session,
    sealable: bool,
}

/// How [`Sessions`] are saved: each session's pickle and whether it may seal. The first
/// layout (a bare list of pickles, from before sessions could be retired) still reads, as
/// sessions that may seal.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SavedSessions {
    Flagged { sessions: Vec<SavedSession> },
    Bare(Vec<SessionPickle>),
}

#[derive(Serialize, Deserialize)]
struct SavedSession {
    pickle: SessionPickle,
    sealable: bool,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sessions({})", self.list.len())
    }
}

impl Sessions {
    /// The sessions saved by [`Sessions::pickle`].
    pub fn from_pickle(bytes: &[u8]) -> Result<Self, PickleError> {
        let list = match serde_json::from_slice(bytes)? {
            SavedSessions::Flagged { sessions } => sessions
                .into_iter()
                .map(|saved| Kept {
                    session: Session::from_pickle(saved.pickle),
                    sealable: saved.sealable,
                })
                .collect(),
            SavedSessions::Bare(pickles) => pickles
                .into_iter()
                .map(|pickle| Kept {
                    session: Session::from_pickle(pickle),
                    sealable: true,
                })
                .collect(),
        };
        Ok(Self { list })
    }

    /// The sessions' secrets as bytes to save (zeroized when dropped).
    pub fn pickle(&self) -> Zeroizing<Vec<u8>> {
        let saved = SavedSessions::Flagged {
            sessions: self
                .list
                .iter()
                .map(|kept| SavedSession {
                    pickle: kept.session.pickle(),
                    sealable: kept.sealable,
                })
                .collect(),
        };
        // A pickle is plain data: it always serialises.
        to_json_zeroizing(&saved).unwrap_or_default()
    }

    /// Whether there is no session at all.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether a session may seal (one is started and not retired).
    pub fn can_seal(&self) -> bool {
        self.list.iter().any(|kept| kept.sealable)
    }

    /// Retires every session from sealing (they still open what the peer sends in them):
    /// the next message starts a new session.
    pub fn retire(&mut self) {
        for kept in &mut self.list {
            kept.sealable = false;
        }
    }

    /// How many sessions there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Forgets every session (the peer lost theirs: the next message starts a new one).
    pub fn clear(&mut self) {
        self.list.clear();
    }

    fn keep_first(&mut self, session: Session) {
        self.list.insert(
            0,
            Kept {
                session,
                sealable: true,
            },
        );
        self.list.truncate(MAX_SESSIONS_PER_PEER);
    }

    /// Starts a session with `peer` from the `bundle` claimed at the server, checked against
    /// `peer_keys` (pinned or verified); it becomes the one messages are sealed with.
    pub fn start(
        &mut self,
        account: &OwnAccount,
        peer: &Username,
        peer_keys: &PublicKeys,
        bundle: &PreKeyBundle,
    ) -> Result<(), SealError> {
        bundle.verify(peer, peer_keys)?;
        let session = account
            .account
            .create_outbound_session(
                session_config(),
                Curve25519PublicKey::from_bytes(bundle.olm_key.key),
                Curve25519PublicKey::from_bytes(bundle.prekey.key),
            )
            .map_err(|_| SealError::DegenerateKey)?;
        self.keep_first(session);
        Ok(())
    }

    /// Seals `body` as message `id` from `account`'s user to `peer`, written at
    /// `sent_at_ms`, with the newest session that is not retired. Save the sessions with the
    /// message (see the module docs).
    pub fn seal(
        &mut self,
        account: &OwnAccount,
        peer: &Username,
        id: MessageId,
        body: &str,
        sent_at_ms: u64,
    ) -> Result<Envelope, SealError> {
        if body.len() > MAX_BODY_LEN {
            return Err(SealError::TooLong(body.len()));
        }
        self.seal_plaintext(
            account,
            Plaintext {
                id,
                from: account.me.clone(),
                to: peer.clone(),
                sent_at_ms,
                body: body.to_owned(),
                receipt: None,
            },
        )
    }

    /// Seals `receipt` as message `id` (an id of its own, for de-duplication) from
    /// `account`'s user to `peer`, like a message: the envelope does not tell them apart.
    pub fn seal_receipt(
        &mut self,
        account: &OwnAccount,
        peer: &Username,
        id: MessageId,
        receipt: Receipt,
        sent_at_ms: u64,
    ) -> Result<Envelope, SealError> {
        if receipt.ids.len() > MAX_RECEIPT_IDS {
            return Err(SealError::TooLong(receipt.ids.len() * 16));
        }
        self.seal_plaintext(
            account,
            Plaintext {
                id,
                from: account.me.clone(),
                to: peer.clone(),
                sent_at_ms,
                body: String::new(),
                receipt: Some(receipt),
            },
        )
    }

    fn seal_plaintext(
        &mut self,
        account: &OwnAccount,
        plaintext: Plaintext,
    ) -> Result<Envelope, SealError> {
        let session = &mut self
            .list
            .iter_mut()
            .find(|kept| kept.sealable)
            .ok_or(SealError::NoSession)?
            .session;
        let bytes = plaintext.to_bytes();
        let message = session
            .encrypt(bytes.as_slice())
            .map_err(|_| SealError::DegenerateKey)?;
        Ok(Envelope {
            id: plaintext.id,
            from: plaintext.from,
            to: plaintext.to,
            token: encode_token(&message, &account.binding),
        })
    }

    /// Opens an Olm envelope from `peer` (whose identity is `peer_keys`, pinned or the
    /// server's) to `account`'s user: with the session it belongs to, or, for a pre-key
    /// message no session knows, a new session started from it once the sender's
    /// signature over its Olm key verifies. Save the sessions (and the account when
    /// [`Opened::account_changed`]) with the message.
    ///
    /// A message that does not open changes nothing.
    pub fn open(
        &mut self,
        account: &mut OwnAccount,
        peer: &Username,
        peer_keys: &PublicKeys,
        envelope: &Envelope,
    ) -> Result<Opened, OpenError> {
        let forged = || OpenError::BadToken { peer: peer.clone() };
        let token = decode_token(&envelope.token)?;
        let (bytes, account_changed) = match &token.message {
            OlmMessage::Normal(_) => (self.open_with_sessions(&token.message, peer)?, false),
            OlmMessage::PreKey(prekey) => {
                if let Some(index) = self.position_of(prekey) {
                    let bytes = self.list[index]
                        .session
                        .decrypt(&token.message)
                        .map_err(|_| forged())?;
                    self.promote(index);
                    (bytes, false)
                } else {
                    let binding = token.binding.ok_or(OpenError::Malformed)?;
                    let olm_key = SignedKey {
                        key: prekey.identity_key().to_bytes(),
                        signature: binding,
                    };
                    olm_key
                        .verify_olm_key(peer, peer_keys)
                        .map_err(|_| forged())?;
                    let one_time_keys = account.account.stored_one_time_key_count();
                    let created = account
                        .account
                        .create_inbound_session(session_config(), prekey.identity_key(), prekey)
                        .map_err(|error| match error {
                            // Signed by the sender, for a one-time key this account does not
                            // have (used up, or the account is new: a restored backup): the
                            // session it started is lost here.
                            SessionCreationError::MissingOneTimeKey(_) => {
                                OpenError::NoSession { peer: peer.clone() }
                            }
                            _ => forged(),
                        })?;
                    if account.account.stored_one_time_key_count() == one_time_keys {
                        // Started from a fallback key (no one-time key was used up): the
                        // library keeps those, so they are replaced now, or a thief of the
                        // account could open this session's first messages later. A new
                        // fallback key is published at the next publish.
                        account.account.generate_fallback_key();
                        account.account.forget_fallback_key();
                    }
                    self.keep_first(created.session);
                    (created.plaintext, true)
                }
            }
        };
        let bytes = Zeroizing::new(bytes);
        let plaintext = Plaintext::from_bytes(&bytes)?;
        let checks = [
            ("id", plaintext.id == envelope.id),
            (
                "sender",
                plaintext.from == envelope.from && &plaintext.from == peer,
            ),
            (
                "recipient",
                plaintext.to == envelope.to && plaintext.to == account.me,
            ),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((field, _)) => Err(OpenError::Mismatch { field }),
            None => Ok(Opened {
                plaintext,
                account_changed,
            }),
        }
    }

    /// Decrypts a normal message with whichever session it belongs to (that one becomes
    /// the newest: the peer uses it).
    fn open_with_sessions(
        &mut self,
        message: &OlmMessage,
        peer: &Username,
    ) -> Result<Vec<u8>, OpenError> {
        if self.list.is_empty() {
            return Err(OpenError::NoSession { peer: peer.clone() });
        }
        for index in 0..self.list.len() {
            if let Ok(bytes) = self.list[index].session.decrypt(message) {
                self.promote(index);
                return Ok(bytes);
            }
        }
        // A chain a session here received in before is not lost: its message was tampered
        // with, forged, or replayed (its key is used up). Only a chain no session knows
        // may be one of a session lost here (the recipient then asks for the message
        // again; see `ReceiptKind::Resend`).
        if let OlmMessage::Normal(normal) = message
            && self
                .list
                .iter()
                .any(|kept| receives_in(&kept.session, &normal.ratchet_key()))
        {
            return Err(OpenError::BadToken { peer: peer.clone() });
        }
        Err(OpenError::NoSession { peer: peer.clone() })
    }

    fn position_of(&self, prekey: &PreKeyMessage) -> Option<usize> {
        let keys = prekey.session_keys();
        self.list
            .iter()
            .position(|kept| kept.session.session_keys() == keys)
    }

    fn promote(&mut self, index: usize) {
        if index > 0 {
            let session = self.list.remove(index);
            self.list.insert(0, session);
        }
    }
}

/// Whether `session` has a receiving chain under the sender's ratchet key `ratchet_key`
/// (it opened a message of that chain). The library does not say so directly; its pickle
/// lists the chains by their public ratchet keys, which are compared here. The pickle is
/// written to a buffer that is zeroed when dropped ([`to_json_zeroizing`]) and read back
/// into [`ReceivingChains`], which keeps the public keys only: no secret of the session is
/// copied into memory that is freed un-zeroed. Read only when a message did not open.
fn receives_in(session: &Session, ratchet_key: &Curve25519PublicKey) -> bool {
    let Some(pickle) = to_json_zeroizing(&session.pickle()) else {
        return false;
    };
    serde_json::from_slice::<ReceivingChains>(&pickle).is_ok_and(|pickle| {
        pickle
            .receiving_chains
            .inner
            .iter()
            .any(|chain| &chain.ratchet_key == ratchet_key)
    })
}

/// The part of vodozemac's [`SessionPickle`] that [`receives_in`] reads: the public ratchet
/// keys of the receiving chains. Every other field (the root, chain and message keys) is
/// skipped unread.
#[derive(Deserialize)]
struct ReceivingChains {
    receiving_chains: ChainList,
}

/// vodozemac's `ChainStore`, as serialised.
#[derive(Deserialize)]
struct ChainList {
    inner: Vec<ReceivingChain>,
}

/// vodozemac's `ReceiverChain`, its public ratchet key only.
#[derive(Deserialize)]
struct ReceivingChain {
    ratchet_key: Curve25519PublicKey,
}

/// `value` as JSON in a buffer zeroed when dropped. The buffer never reallocates in place:
/// when it must grow, the bytes move to a new buffer and the old one is zeroed, so no
/// copy of a secret is left behind in freed memory. `None` if it does not serialise.
fn to_json_zeroizing(value: &impl Serialize) -> Option<Zeroizing<Vec<u8>>> {
    /// A writer over a zeroizing buffer that zeroes what it outgrows.
    struct Writer(Zeroizing<Vec<u8>>);
    impl std::io::Write for Writer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let needed = self.0.len() + bytes.len();
            if needed > self.0.capacity() {
                let mut bigger = Vec::with_capacity(needed.max(2 * self.0.capacity()));
                bigger.extend_from_slice(&self.0);
                // The old buffer is zeroed as it drops.
                self.0 = Zeroizing::new(bigger);
            }
            self.0.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut writer = Writer(Zeroizing::new(Vec::with_capacity(4096)));
    serde_json::to_writer(&mut writer, value).ok()?;
    Some(writer.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::ReceiptKind;

    struct User {
        name: Username,
        identity: Identity,
        account: OwnAccount,
        sessions: Sessions,
    }

    fn user(name: &str) -> User {
        let name = Username::new(name).unwrap();
        let identity = Identity::generate();
        let account = OwnAccount::generate(&identity, &name);
        User {
            name,
            identity,
            account,
            sessions: Sessions::default(),
        }
    }

    /// `from` claims one of `to`'s published keys and starts a session.
    fn start(from: &mut User, to: &mut User) {
        let published = to.account.prekeys_to_publish(&to.identity, 0);
        to.account.mark_published();
        published.verify(&to.name, to.identity.public()).unwrap();
        let bundle = PreKeyBundle {
            olm_key: published.olm_key.clone(),
            prekey: published.one_time[0].clone(),
            fallback: false,
        };
        from.sessions
            .start(&from.account, &to.name, to.identity.public(), &bundle)
            .unwrap();
    }

    fn seal(from: &mut User, to: &User, body: &str) -> Envelope {
        from.sessions
            .seal(&from.account, &to.name, MessageId::random(), body, 1_000)
            .unwrap()
    }

    fn open(to: &mut User, from: &User, envelope: &Envelope) -> Result<Opened, OpenError> {
        to.sessions.open(
            &mut to.account,
            &from.name,
            from.identity.public(),
            envelope,
        )
    }

    #[test]
    fn a_receipt_is_sealed_like_a_message_and_opens_as_a_receipt() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let first = seal(&mut alice, &bob, "hello");
        let opened = open(&mut bob, &alice, &first).unwrap();
        // Bob answers in the session Alice started.
        let receipt = Receipt {
            kind: ReceiptKind::Delivered,
            ids: vec![opened.plaintext.id],
        };
        let envelope = bob
            .sessions
            .seal_receipt(
                &bob.account,
                &alice.name,
                MessageId::random(),
                receipt.clone(),
                2_000,
            )
            .unwrap();
        assert_eq!(envelope.token[0], TOKEN_NORMAL);
        let back = open(&mut alice, &bob, &envelope).unwrap().plaintext;
        assert_eq!(back.receipt, Some(receipt));
        assert_eq!(back.body, "");
        let too_many = Receipt {
            kind: ReceiptKind::Read,
            ids: vec![MessageId::random(); MAX_RECEIPT_IDS + 1],
        };
        assert!(
            bob.sessions
                .seal_receipt(
                    &bob.account,
                    &alice.name,
                    MessageId::random(),
                    too_many,
                    3_000
                )
                .is_err()
        );
    }

    #[test]
    fn a_session_started_from_a_claimed_key_opens_both_ways_and_never_twice() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let first = seal(&mut alice, &bob, "hello bob");
        assert_eq!(first.token[0], TOKEN_PRE_KEY, "a pre-key message first");
        let opened = open(&mut bob, &alice, &first).unwrap();
        assert_eq!(opened.plaintext.body, "hello bob");
        assert!(opened.account_changed, "the one-time key is used up");
        // The same envelope again: its key is gone.
        assert!(open(&mut bob, &alice, &first).is_err());
        let reply = seal(&mut bob, &alice, "hi alice");
        assert_eq!(reply.token[0], TOKEN_NORMAL, "bob's session is started");
        assert_eq!(
            open(&mut alice, &bob, &reply).unwrap().plaintext.body,
            "hi alice"
        );
        let next = seal(&mut alice, &bob, "how are you");
        assert_eq!(
            next.token[0], TOKEN_NORMAL,
            "alice heard back: normal messages"
        );
        assert!(!open(&mut bob, &alice, &next).unwrap().account_changed);
    }

    #[test]
    fn a_thousand_messages_then_more_open_in_order_and_a_few_out_of_order() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let queued: Vec<Envelope> = (0..1000)
            .map(|n| seal(&mut alice, &bob, &format!("mail {n}")))
            .collect();
        let direct: Vec<Envelope> = (0..10)
            .map(|n| seal(&mut alice, &bob, &format!("direct {n}")))
            .collect();
        for (n, envelope) in queued.iter().enumerate() {
            assert_eq!(
                open(&mut bob, &alice, envelope).unwrap().plaintext.body,
                format!("mail {n}")
            );
        }
        // Out of order within the library's bounded window of skipped keys.
        for envelope in direct.iter().rev() {
            assert!(open(&mut bob, &alice, envelope).is_ok());
        }
    }

    #[test]
    fn a_pre_key_message_under_a_key_not_signed_by_the_sender_is_refused_and_costs_nothing() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let envelope = seal(&mut alice, &bob, "hello");
        let keys_before = bob.account.one_time_key_count();
        // Mallory claims to be alice, with alice's message but her own binding.
        let mallory = Identity::generate();
        let mut forged = envelope.clone();
        let fake = mallory.sign(b"anything");
        forged.token[1..1 + SIGNATURE_LEN].copy_from_slice(&fake.to_bytes());
        assert!(matches!(
            open(&mut bob, &alice, &forged),
            Err(OpenError::BadToken { .. })
        ));
        assert_eq!(bob.account.one_time_key_count(), keys_before);
        assert!(open(&mut bob, &alice, &envelope).is_ok());
    }

    #[test]
    fn pickles_restore_sessions_and_accounts() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let envelope = seal(&mut alice, &bob, "saved");
        let account = bob.account.pickle();
        bob.account = OwnAccount::from_pickle(&account, &bob.identity, &bob.name).unwrap();
        assert!(open(&mut bob, &alice, &envelope).is_ok());
        let sessions = bob.sessions.pickle();
        bob.sessions = Sessions::from_pickle(&sessions).unwrap();
        let reply = seal(&mut bob, &alice, "after restore");
        assert!(open(&mut alice, &bob, &reply).is_ok());
    }

    #[test]
    fn a_retired_session_opens_but_never_seals_again_and_its_mark_is_saved() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let first = seal(&mut alice, &bob, "before the crash");
        open(&mut bob, &alice, &first).unwrap();
        // Alice's saved state may be behind what she sent: she retires the session.
        alice.sessions.retire();
        assert!(!alice.sessions.can_seal() && !alice.sessions.is_empty());
        let refused =
            alice
                .sessions
                .seal(&alice.account, &bob.name, MessageId::random(), "no", 1_000);
        assert!(matches!(refused, Err(SealError::NoSession)));
        // The mark survives a save; bob's messages in the old session still open (and
        // promote it, without making it seal again).
        alice.sessions = Sessions::from_pickle(&alice.sessions.pickle()).unwrap();
        let reply = seal(&mut bob, &alice, "in the old session");
        assert_eq!(
            open(&mut alice, &bob, &reply).unwrap().plaintext.body,
            "in the old session"
        );
        assert!(!alice.sessions.can_seal());
        // A new session seals; bob opens it as a new one.
        start(&mut alice, &mut bob);
        let fresh = seal(&mut alice, &bob, "in a new session");
        assert_eq!(fresh.token[0], TOKEN_PRE_KEY);
        assert_eq!(
            open(&mut bob, &alice, &fresh).unwrap().plaintext.body,
            "in a new session"
        );
        assert_eq!(alice.sessions.len(), 2);
    }

    #[test]
    fn a_chain_keeps_its_ratchet_key_until_the_peer_answers() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let first = seal(&mut alice, &bob, "one");
        let second = seal(&mut alice, &bob, "two");
        assert!(ratchet_key(&first).is_some());
        assert_eq!(ratchet_key(&first), ratchet_key(&second));
        open(&mut bob, &alice, &first).unwrap();
        open(&mut bob, &alice, &second).unwrap();
        let answer = seal(&mut bob, &alice, "answer");
        open(&mut alice, &bob, &answer).unwrap();
        let after = seal(&mut alice, &bob, "after the turn");
        assert_ne!(ratchet_key(&after), ratchet_key(&first), "a new chain");
    }

    #[test]
    fn sessions_saved_before_retiring_existed_read_as_sealable() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let bare: Vec<SessionPickle> = alice
            .sessions
            .list
            .iter()
            .map(|kept| kept.session.pickle())
            .collect();
        let bytes = serde_json::to_vec(&bare).unwrap();
        alice.sessions = Sessions::from_pickle(&bytes).unwrap();
        assert!(alice.sessions.can_seal());
        let envelope = seal(&mut alice, &bob, "still works");
        assert!(open(&mut bob, &alice, &envelope).is_ok());
    }

    #[test]
    fn old_state_opens_nothing_sent_before_it_was_taken_and_nothing_after_an_exchange() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let early = seal(&mut alice, &bob, "before");
        open(&mut bob, &alice, &early).unwrap();
        // Forward secrecy: bob's state now cannot open what it already opened.
        let stolen_account = bob.account.pickle();
        let stolen_sessions = bob.sessions.pickle();
        let mut thief = User {
            name: bob.name.clone(),
            account: OwnAccount::from_pickle(&stolen_account, &bob.identity, &bob.name).unwrap(),
            identity: Identity::generate(),
            sessions: Sessions::from_pickle(&stolen_sessions).unwrap(),
        };
        assert!(open(&mut thief, &alice, &early).is_err());
        // Post-compromise: after both sides ratchet, the stolen state opens nothing new.
        for round in 0..2 {
            let to_alice = seal(&mut bob, &alice, &format!("reply {round}"));
            open(&mut alice, &bob, &to_alice).unwrap();
            let to_bob = seal(&mut alice, &bob, &format!("again {round}"));
            open(&mut bob, &alice, &to_bob).unwrap();
        }
        let later = seal(&mut alice, &bob, "after");
        assert!(open(&mut thief, &alice, &later).is_err());
        assert_eq!(
            open(&mut bob, &alice, &later).unwrap().plaintext.body,
            "after"
        );
    }

    #[test]
    fn a_session_started_from_the_fallback_key_is_not_opened_by_the_account_afterwards() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        let published = bob.account.prekeys_to_publish(&bob.identity, 0);
        bob.account.mark_published();
        let bundle = PreKeyBundle {
            olm_key: published.olm_key.clone(),
            prekey: published.fallback.clone().unwrap(),
            fallback: true,
        };
        alice
            .sessions
            .start(&alice.account, &bob.name, bob.identity.public(), &bundle)
            .unwrap();
        let first = seal(&mut alice, &bob, "from the fallback key");
        let stolen = bob.account.pickle();
        assert!(open(&mut bob, &alice, &first).is_ok());
        // A copy of bob's account taken after he read it opens nothing; one taken before
        // would (the key was still there), which is what forward secrecy cannot help.
        let mut thief = User {
            name: bob.name.clone(),
            account: OwnAccount::from_pickle(&bob.account.pickle(), &bob.identity, &bob.name)
                .unwrap(),
            identity: Identity::generate(),
            sessions: Sessions::default(),
        };
        assert!(open(&mut thief, &alice, &first).is_err());
        let mut before = User {
            account: OwnAccount::from_pickle(&stolen, &bob.identity, &bob.name).unwrap(),
            sessions: Sessions::default(),
            ..thief
        };
        assert!(open(&mut before, &alice, &first).is_ok());
        // A new fallback key is there to publish.
        assert!(
            bob.account
                .prekeys_to_publish(&bob.identity, 50)
                .fallback
                .is_some()
        );
    }

    #[test]
    fn both_sides_starting_at_once_settle_on_one_session() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        start(&mut bob, &mut alice);
        let from_alice = seal(&mut alice, &bob, "a1");
        let from_bob = seal(&mut bob, &alice, "b1");
        open(&mut bob, &alice, &from_alice).unwrap();
        open(&mut alice, &bob, &from_bob).unwrap();
        for round in 0..3 {
            let a = seal(&mut alice, &bob, &format!("a{round}"));
            open(&mut bob, &alice, &a).unwrap();
            let b = seal(&mut bob, &alice, &format!("b{round}"));
            open(&mut alice, &bob, &b).unwrap();
        }
    }

    /// Alice and bob with a session in which each has opened a message of the other.
    fn talking_both_ways() -> (User, User) {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let first = seal(&mut alice, &bob, "one");
        open(&mut bob, &alice, &first).unwrap();
        let answer = seal(&mut bob, &alice, "two");
        open(&mut alice, &bob, &answer).unwrap();
        (alice, bob)
    }

    #[test]
    fn a_lost_session_is_told_apart_from_a_forgery() {
        let (mut alice, mut bob) = talking_both_ways();
        let normal = seal(&mut alice, &bob, "three");
        bob.sessions.clear();
        assert!(matches!(
            open(&mut bob, &alice, &normal),
            Err(OpenError::NoSession { .. })
        ));
        // A new account (a restored backup) has none of the one-time keys a sender's
        // session may have started from: lost too, not forged.
        let mut carol = user("carol");
        start(&mut carol, &mut bob);
        let to_bob = seal(&mut carol, &bob, "hi");
        bob.account = OwnAccount::generate(&bob.identity, &bob.name);
        assert!(matches!(
            open(&mut bob, &carol, &to_bob),
            Err(OpenError::NoSession { .. })
        ));
    }

    /// A lost session asks for its messages again, so a message tampered with in a chain
    /// the recipient knows must not read as lost: it is refused as a forgery.
    #[test]
    fn a_tampered_message_of_a_known_chain_is_a_forgery_not_a_lost_session() {
        let (mut alice, mut bob) = talking_both_ways();
        let next = seal(&mut alice, &bob, "three");
        open(&mut bob, &alice, &next).unwrap();
        // The chain is found by the typed read of vodozemac's pickle (this fails first if
        // its layout changes), and a key never received under is not.
        let chain = Curve25519PublicKey::from_bytes(ratchet_key(&next).unwrap());
        let receives = |key| {
            bob.sessions
                .list
                .iter()
                .any(|kept| receives_in(&kept.session, &key))
        };
        assert!(receives(chain));
        assert!(!receives(Curve25519PublicKey::from_bytes([9; 32])));
        // The same chain, one message on: its ciphertext altered.
        let mut tampered = seal(&mut alice, &bob, "four");
        let token = decode_token(&tampered.token).unwrap();
        let (kind, mut bytes) = token.message.to_parts();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        let altered = OlmMessage::from_parts(kind, &bytes).unwrap();
        // A normal message carries no binding: the signature passed is not written.
        assert!(matches!(altered, OlmMessage::Normal(_)));
        tampered.token = encode_token(&altered, &Signature::from_bytes(&[0; SIGNATURE_LEN]));
        assert!(matches!(
            open(&mut bob, &alice, &tampered),
            Err(OpenError::BadToken { .. })
        ));
        // A replay of one already opened (its key is used up) is no lost session either.
        assert!(matches!(
            open(&mut bob, &alice, &next),
            Err(OpenError::BadToken { .. })
        ));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let (alice, mut bob) = (user("alice"), user("bob"));
        let text = [
            "o",
            "o0",
            "o0.",
            "o9.AAAA",
            "o1.!!",
            "o1.AAAA.BBBB.CCCC",
            "gAAAAAB",
        ]
        .map(|token| token.as_bytes().to_vec());
        let binary = [
            vec![],
            vec![TOKEN_NORMAL],
            vec![TOKEN_PRE_KEY],
            vec![TOKEN_PRE_KEY; 1 + SIGNATURE_LEN],
            vec![TOKEN_NORMAL, 0xff, 0xff, 0xff],
            vec![0x03, 1, 2, 3],
            vec![0x00; 64],
            vec![b'o', 0xff, 0xfe],
        ];
        for token in text.into_iter().chain(binary) {
            let envelope = Envelope {
                id: MessageId::random(),
                from: alice.name.clone(),
                to: bob.name.clone(),
                token: token.clone(),
            };
            assert!(
                matches!(open(&mut bob, &alice, &envelope), Err(OpenError::Malformed)),
                "{token:?}"
            );
            assert!(chain_position(&envelope).is_none() && ratchet_key(&envelope).is_none());
            assert!(!signed_by(&envelope, &alice.name, alice.identity.public()));
        }
    }

    /// The text form older builds sealed, of the same Olm message as `envelope`'s token.
    fn as_text_token(envelope: &Envelope) -> Envelope {
        let token = decode_token(&envelope.token).unwrap();
        let (kind, bytes) = token.message.to_parts();
        let mut text = format!("o{kind}.{}", b64().encode(bytes));
        if let Some(binding) = token.binding {
            text.push('.');
            text.push_str(&b64().encode(binding.to_bytes()));
        }
        Envelope {
            token: text.into_bytes(),
            ..envelope.clone()
        }
    }

    #[test]
    fn mail_in_the_text_form_of_older_builds_opens_like_binary_mail() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        // Queued by an older build: pre-key messages in text, the first of them starting
        // bob's session.
        let old: Vec<Envelope> = (0..3)
            .map(|n| as_text_token(&seal(&mut alice, &bob, &format!("old {n}"))))
            .collect();
        let new = seal(&mut alice, &bob, "new");
        assert_eq!(new.token[0], TOKEN_PRE_KEY);
        assert!(
            old.iter()
                .all(|envelope| envelope.token.starts_with(b"o0."))
        );
        for (envelope, position) in old.iter().zip(0..) {
            assert!(is_olm_token(&envelope.token));
            assert_eq!(chain_position(envelope), Some(position));
            assert!(signed_by(envelope, &alice.name, alice.identity.public()));
        }
        assert_eq!(chain_position(&new), Some(3));
        assert!(signed_by(&new, &alice.name, alice.identity.public()));
        assert_eq!(ratchet_key(&new), ratchet_key(&old[0]));
        for envelope in &old {
            let opened = open(&mut bob, &alice, envelope).unwrap();
            assert!(opened.plaintext.body.starts_with("old "));
        }
        assert_eq!(open(&mut bob, &alice, &new).unwrap().plaintext.body, "new");
        // A replayed text copy of an opened message finds its key gone.
        assert!(open(&mut bob, &alice, &old[1]).is_err());
        // Normal messages in text open too.
        let reply = seal(&mut bob, &alice, "reply");
        assert_eq!(
            open(&mut alice, &bob, &as_text_token(&reply))
                .unwrap()
                .plaintext
                .body,
            "reply"
        );
    }

    #[test]
    fn a_binary_token_is_the_olm_message_and_signature_without_base64() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let envelope = seal(&mut alice, &bob, &"x".repeat(100));
        let text = as_text_token(&envelope);
        let token = decode_token(&envelope.token).unwrap();
        let (_, bytes) = token.message.to_parts();
        assert_eq!(envelope.token.len(), 1 + SIGNATURE_LEN + bytes.len());
        // Base64 costs 4 bytes per 3, plus the text's prefix and separators.
        assert!(
            text.token.len() * 3 >= envelope.token.len() * 4,
            "{} vs {}",
            text.token.len(),
            envelope.token.len()
        );
    }

    #[test]
    fn every_damage_to_a_binary_token_is_refused_without_touching_the_session() {
        let (mut alice, mut bob) = (user("alice"), user("bob"));
        start(&mut alice, &mut bob);
        let envelope = seal(&mut alice, &bob, "hello");
        let keys_before = bob.account.one_time_key_count();
        // Every cut short of the whole token, and a flipped bit in every byte.
        for cut in 0..envelope.token.len() {
            let mut damaged = envelope.clone();
            damaged.token.truncate(cut);
            assert!(open(&mut bob, &alice, &damaged).is_err(), "cut at {cut}");
        }
        for at in 0..envelope.token.len() {
            let mut damaged = envelope.clone();
            damaged.token[at] ^= 0x01;
            assert!(
                open(&mut bob, &alice, &damaged).is_err(),
                "bit flipped at {at}"
            );
        }
        assert!(bob.sessions.is_empty());
        assert_eq!(bob.account.one_time_key_count(), keys_before);
        assert_eq!(
            open(&mut bob, &alice, &envelope).unwrap().plaintext.body,
            "hello"
        );
    }
}
