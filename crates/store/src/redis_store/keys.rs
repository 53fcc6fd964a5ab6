//! Key and channel names: every per-user key under its user's hash tag, the online index
//! buckets, and each cluster instance's sharded channel (the layout: the parent module's
//! docs).

use proto::{MessageId, Username};

use super::{ONLINE_BUCKETS, ONLINE_KEY_PREFIX};

/// The key of online index bucket `bucket`; its hash tag is the bucket's number, so the
/// buckets land in different slots.
pub(super) fn online_bucket_key(bucket: u32) -> String {
    format!("{ONLINE_KEY_PREFIX}{{{bucket}}}")
}

/// The online index bucket `user` is in: FNV-1a of the name, modulo [`ONLINE_BUCKETS`]
/// (spelled out, not `std`'s hasher, because every instance of every version must agree).
pub fn online_key(user: &Username) -> String {
    let hash = user
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    // The remainder is below ONLINE_BUCKETS, a u32.
    online_bucket_key((hash % u64::from(ONLINE_BUCKETS)) as u32)
}

/// The sharded pub/sub channel of the instance `id`: `p2pchat:instance:{id}:push` (the
/// hash tag puts it on one slot, so it lives on one master and its replicas).
pub(super) fn instance_channel(id: &str) -> String {
    format!("p2pchat:instance:{{{id}}}:push")
}

/// The keys of one user's mailbox and block list.
pub(super) struct MailKeys {
    pub(super) order: String,
    pub(super) data: String,
    pub(super) sequence: String,
    pub(super) bytes: String,
    pub(super) quarantine: String,
    pub(super) blocked: String,
}

impl MailKeys {
    pub(super) fn new(user: &Username) -> Self {
        Self {
            order: user_key(user, "mail"),
            data: user_key(user, "mail:data"),
            sequence: user_key(user, "mail:seq"),
            bytes: user_key(user, "mail:bytes"),
            quarantine: user_key(user, "mail:quarantine"),
            blocked: user_key(user, "blocked"),
        }
    }
}

/// The mail key of a message (see the module docs): its id, then its sender's name.
pub(super) fn mail_key(from: &Username, id: &MessageId) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + from.as_str().len());
    key.extend_from_slice(&id.0);
    key.extend_from_slice(from.as_str().as_bytes());
    key
}

/// The keys of `user`'s prekey owner hash and one-time key list (one slot).
pub(super) fn prekey_keys(user: &Username) -> (String, String) {
    (
        user_key(user, "prekeys"),
        user_key(user, "prekeys:one_time"),
    )
}

/// Every key that goes with `user`'s name binding (one slot): the binding, its rotation
/// statements, and the prekeys its identity signed (owner hash, one-time key list).
pub(super) fn name_keys(user: &Username) -> [String; 4] {
    let (owner, one_time) = prekey_keys(user);
    [
        user_key(user, "binding"),
        user_key(user, "rotations"),
        owner,
        one_time,
    ]
}

/// `p2pchat:{user}:part`: the hash tag keeps all of one user's keys in one cluster slot.
pub(super) fn user_key(user: &Username, part: &str) -> String {
    format!("p2pchat:{{{user}}}:{part}")
}

/// Parses names read from `key`, logging and skipping invalid ones.
pub(super) fn parse_names(names: Vec<String>, key: &str) -> Vec<Username> {
    names
        .into_iter()
        .filter_map(|name| match Username::new(&name) {
            Ok(user) => Some(user),
            Err(error) => {
                tracing::warn!(key, name, %error, "invalid name stored; skipped");
                None
            }
        })
        .collect()
}
