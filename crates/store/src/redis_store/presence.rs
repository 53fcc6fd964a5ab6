//! Presence and the online index: writing and clearing a user's presence (with its route on
//! a cluster), reading it, and listing who is online or lapsed.

use proto::{Username, wire};

use super::{
    ONLINE_BUCKETS, RedisStore,
    keys::{online_bucket_key, parse_names, user_key},
    scripts::{CLEAR_PRESENCE, SET_PRESENCE_ROUTED},
};
use crate::{Presence, StoreError, record::encode};

/// A presence record is kept this long after it lapses, for "last seen".
const PRESENCE_KEEP_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// Entries of the online index that lapsed this long ago are pruned.
pub(super) const ONLINE_PRUNE_AFTER_MS: u64 = 60 * 60 * 1000;

impl RedisStore {
    /// See [`crate::Store::set_presence`]. Writes the presence (on a cluster with the
    /// route, one script on the user's slot) and queues the online index's move for the
    /// index writer (`online_index`): the presence is the truth, and the index only needs
    /// to be right by the next heartbeat (a lookup reads the presence, never the index).
    pub async fn set_presence(&self, presence: &Presence) -> Result<(), StoreError> {
        let key = user_key(&presence.user, "presence");
        let value = encode(presence)?;
        let now_ms = presence.last_seen_ms;
        let keep_ms = presence
            .expires_at_ms
            .saturating_sub(now_ms)
            .saturating_add(PRESENCE_KEEP_MS);
        if let Some(instance) = self.instance() {
            let keep_text = keep_ms.to_string();
            let session_text = presence.session.to_string();
            let expiry_text = presence.expires_at_ms.to_string();
            let prune_text = now_ms.saturating_sub(ONLINE_PRUNE_AFTER_MS).to_string();
            let routes = user_key(&presence.user, "routes");
            let keys = [key.as_str(), routes.as_str()];
            let args = [
                session_text.as_bytes(),
                value.as_ref(),
                keep_text.as_bytes(),
                instance.id.as_bytes(),
                expiry_text.as_bytes(),
                prune_text.as_bytes(),
            ];
            self.invoke::<i64>("set_presence", &SET_PRESENCE_ROUTED, &keys, &args)
                .await?;
        } else {
            let mut pipeline = redis::pipe();
            pipeline
                .cmd("HSET")
                .arg(&key)
                .arg("session")
                .arg(presence.session)
                .arg("value")
                .arg(value.as_ref())
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(keep_ms)
                .ignore();
            self.run_pipeline("set_presence", &pipeline).await?;
        }
        self.inner
            .index
            .online(&presence.user, presence.expires_at_ms, now_ms)
            .await;
        Ok(())
    }

    /// See [`crate::Store::register_presence`]: [`RedisStore::set_presence`], then the
    /// index writer sends what waits, this user's entry among it, before this returns. The
    /// lapse sweep reads only the index, so an entry still queued when this instance dies
    /// would leave the user online for their contacts for good.
    pub async fn register_presence(&self, presence: &Presence) -> Result<(), StoreError> {
        self.set_presence(presence).await?;
        self.inner.index.flush().await;
        Ok(())
    }

    /// Runs `pipeline` (its replies ignored) with retries.
    pub(super) async fn run_pipeline(
        &self,
        operation: &'static str,
        pipeline: &redis::Pipeline,
    ) -> Result<(), StoreError> {
        self.with_retry(operation, |mut connection| async move {
            pipeline.query_async::<()>(&mut connection).await
        })
        .await
    }

    /// See [`crate::Store::clear_presence`].
    pub async fn clear_presence(
        &self,
        user: &Username,
        session: u64,
        _now_ms: u64,
    ) -> Result<bool, StoreError> {
        let Some(current) = self.presence(user).await? else {
            return Ok(false);
        };
        if current.session != session {
            return Ok(false);
        }
        let cleared = Presence {
            expires_at_ms: 0,
            ..current.clone()
        };
        let key = user_key(user, "presence");
        let value = encode(&cleared)?;
        let session_text = session.to_string();
        let owned: i64 = self
            .invoke(
                "clear_presence",
                &CLEAR_PRESENCE,
                &[&key],
                &[session_text.as_bytes(), value.as_ref()],
            )
            .await?;
        if owned == 0 {
            return Ok(false);
        }
        if let Some(instance) = self.instance() {
            // The user's slot first (presence, then this instance's route), the slot of the
            // user's online index bucket last; each step is idempotent.
            let _: u64 = self
                .query(
                    "clear_presence",
                    redis::cmd("HDEL")
                        .arg(user_key(user, "routes"))
                        .arg(&instance.id),
                )
                .await?;
        }
        self.inner.index.left(user, current.expires_at_ms).await;
        Ok(true)
    }

    /// See [`crate::Store::presence`]. A record that does not decode is logged and reads as
    /// no presence.
    pub async fn presence(&self, user: &Username) -> Result<Option<Presence>, StoreError> {
        let key = user_key(user, "presence");
        let value: Option<Vec<u8>> = self
            .query("presence", redis::cmd("HGET").arg(&key).arg("value"))
            .await?;
        let Some(bytes) = value else {
            return Ok(None);
        };
        match wire::decode::<Presence>(&bytes) {
            Ok(presence) => Ok(Some(presence)),
            Err(error) => {
                tracing::warn!(%key, %error, "presence does not decode; ignored");
                Ok(None)
            }
        }
    }

    /// See [`crate::Store::online_users`]: the online index's entries expiring after
    /// `now_ms`.
    pub async fn online_users(&self, now_ms: u64) -> Result<Vec<Username>, StoreError> {
        self.inner.index.flush().await;
        self.online_index("online_users", &format!("({now_ms}"), "+inf")
            .await
    }

    /// See [`crate::Store::lapsed`]: the online index's entries that expired in the range.
    /// A session that leaves takes its entry out (`LEAVE_ONLINE`) and a heartbeat moves it
    /// to the new expiry, so what expired there was left by a session that never cleared
    /// its presence.
    pub async fn lapsed(&self, after_ms: u64, until_ms: u64) -> Result<Vec<Username>, StoreError> {
        self.inner.index.flush().await;
        self.online_index("lapsed", &format!("({after_ms}"), &until_ms.to_string())
            .await
    }

    /// The names in the online index scored (expiring) between `min` and `max`
    /// (`ZRANGEBYSCORE` bounds), sorted: every bucket read (one command each, all in flight
    /// at once: on a cluster they are different slots) and merged.
    async fn online_index(
        &self,
        operation: &'static str,
        min: &str,
        max: &str,
    ) -> Result<Vec<Username>, StoreError> {
        let reads = (0..ONLINE_BUCKETS).map(|bucket| {
            let key = online_bucket_key(bucket);
            async move {
                let names: Vec<String> = self
                    .query(
                        operation,
                        redis::cmd("ZRANGEBYSCORE").arg(&key).arg(min).arg(max),
                    )
                    .await?;
                Ok::<_, StoreError>(parse_names(names, &key))
            }
        });
        let mut users: Vec<Username> = futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
            .collect();
        users.sort();
        Ok(users)
    }
}
