//! Name bindings, their rotation statements, and the prekeys a binding's identity signed.

use proto::{Username, identity::Rotation, wire};

use super::{
    RedisStore,
    keys::{name_keys, prekey_keys, user_key},
    scripts::{
        BIND, BIND_SOURCE, CLAIM_PREKEY, CLAIM_PREKEY_SOURCE, PUBLISH_PREKEYS,
        PUBLISH_PREKEYS_SOURCE, RELEASE, RELEASE_SOURCE, ROTATE, ROTATE_SOURCE,
    },
};
use crate::{
    BindOutcome, Binding, RotateOutcome, StoreError,
    record::{PreKeyOwner, decode_binding, decode_prekey, encode, prekey_bundle},
};

impl RedisStore {
    /// See [`crate::Store::bind`].
    pub async fn bind(&self, binding: &Binding) -> Result<BindOutcome, StoreError> {
        let key = user_key(&binding.user, "binding");
        let value = encode(binding)?;
        let existing: Option<Vec<u8>> = self
            .invoke_replicated("bind", &BIND, BIND_SOURCE, &[&key], &[value.as_ref()])
            .await?;
        match existing {
            None => Ok(BindOutcome::Created),
            Some(bytes) => Ok(BindOutcome::Existing(decode_binding(
                &binding.user,
                &bytes,
            )?)),
        }
    }

    /// See [`crate::Store::rotate`].
    pub async fn rotate(
        &self,
        current: &Binding,
        rotation: &Rotation,
        now_ms: u64,
    ) -> Result<RotateOutcome, StoreError> {
        let user = &current.user;
        let keys = name_keys(user);
        let next = current.rotated(rotation, now_ms);
        let (expected, next, statement) = (encode(current)?, encode(&next)?, encode(rotation)?);
        let keep = crate::MAX_ROTATIONS.to_string();
        let (status, standing): (u8, Vec<u8>) = self
            .invoke_replicated(
                "rotate",
                &ROTATE,
                ROTATE_SOURCE,
                &[&keys[0], &keys[1], &keys[2], &keys[3]],
                &[
                    expected.as_ref(),
                    next.as_ref(),
                    statement.as_ref(),
                    keep.as_bytes(),
                ],
            )
            .await?;
        match (status, standing.is_empty()) {
            (0, _) => Ok(RotateOutcome::Rotated),
            (_, true) => Ok(RotateOutcome::Changed(None)),
            (_, false) => Ok(RotateOutcome::Changed(Some(decode_binding(
                user, &standing,
            )?))),
        }
    }

    /// See [`crate::Store::rotations`].
    pub async fn rotations(&self, user: &Username) -> Result<Vec<Rotation>, StoreError> {
        let values: Vec<Vec<u8>> = self
            .query(
                "rotations",
                redis::cmd("LRANGE")
                    .arg(user_key(user, "rotations"))
                    .arg(0)
                    .arg(-1),
            )
            .await?;
        values
            .iter()
            .map(|bytes| {
                wire::decode(bytes).map_err(|error| StoreError::Corrupt {
                    key: user_key(user, "rotations"),
                    reason: error.to_string(),
                })
            })
            .collect()
    }

    /// See [`crate::Store::release`].
    pub async fn release(&self, user: &Username) -> Result<Option<Binding>, StoreError> {
        let keys = name_keys(user);
        let standing: Option<Vec<u8>> = self
            .invoke_replicated(
                "release",
                &RELEASE,
                RELEASE_SOURCE,
                &[&keys[0], &keys[1], &keys[2], &keys[3]],
                &[],
            )
            .await?;
        standing
            .map(|bytes| decode_binding(user, &bytes))
            .transpose()
    }

    /// See [`crate::Store::binding`].
    pub async fn binding(&self, user: &Username) -> Result<Option<Binding>, StoreError> {
        let value: Option<Vec<u8>> = self
            .query("binding", redis::cmd("GET").arg(user_key(user, "binding")))
            .await?;
        value.map(|bytes| decode_binding(user, &bytes)).transpose()
    }

    /// See [`crate::Store::publish_prekeys`]: one script on the user's slot, replicated
    /// like a deposit (a key published on a master alone could be lost, and then claimed
    /// from nowhere).
    pub async fn publish_prekeys(
        &self,
        user: &Username,
        prekeys: &proto::ratchet::PreKeys,
    ) -> Result<u32, StoreError> {
        let owner = encode(&PreKeyOwner {
            olm_key: prekeys.olm_key.clone(),
            fallback: prekeys.fallback.clone(),
        })?;
        let most = proto::ratchet::MAX_ONE_TIME_KEYS.to_string();
        let keys = prekeys
            .one_time
            .iter()
            .map(encode)
            .collect::<Result<Vec<_>, _>>()?;
        let keep: &[u8] = if prekeys.fallback.is_none() {
            b"1"
        } else {
            b"0"
        };
        let mut args: Vec<&[u8]> =
            vec![owner.as_ref(), &prekeys.olm_key.key, most.as_bytes(), keep];
        args.extend(keys.iter().map(|key| key.as_ref()));
        let (owner_key, list_key) = prekey_keys(user);
        self.invoke_replicated(
            "publish_prekeys",
            &PUBLISH_PREKEYS,
            PUBLISH_PREKEYS_SOURCE,
            &[&owner_key, &list_key],
            &args,
        )
        .await
    }

    /// See [`crate::Store::claim_prekey`]: one script on the user's slot, replicated (a
    /// claim lost in a failover would hand the same one-time key out twice, and the second
    /// session could never open).
    pub async fn claim_prekey(
        &self,
        user: &Username,
    ) -> Result<Option<proto::ratchet::PreKeyBundle>, StoreError> {
        let (owner_key, list_key) = prekey_keys(user);
        let found: Option<Vec<Vec<u8>>> = self
            .invoke_replicated(
                "claim_prekey",
                &CLAIM_PREKEY,
                CLAIM_PREKEY_SOURCE,
                &[&owner_key, &list_key],
                &[],
            )
            .await?;
        let Some(mut parts) = found else {
            return Ok(None);
        };
        let one_time = match parts.len() {
            2 => Some(decode_prekey(user, "one-time key", &parts.remove(1))?),
            _ => None,
        };
        let owner: PreKeyOwner = match parts.first() {
            Some(bytes) => decode_prekey(user, "prekeys", bytes)?,
            None => return Ok(None),
        };
        Ok(prekey_bundle(owner, one_time))
    }
}
