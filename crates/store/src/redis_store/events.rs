//! Pub/sub: events as payloads and back, the single server's subscriber task, the cluster's
//! push handler, and publishing (plain channels on one server, routed `SPUBLISH` on a
//! cluster).

use std::time::Duration;

use futures::StreamExt;
use proto::{Username, wire};
use redis::{Client, PushInfo, PushKind, RedisResult, Value, aio::PubSub};
use tokio::sync::{broadcast, watch};

use super::{
    MAIL_CHANNEL, PRESENCE_CHANNEL, RedisStore,
    connection::{CONNECT_TIMEOUT, RETRY_FIRST_DELAY, RETRY_MAX_DELAY},
    keys::{instance_channel, user_key},
};
use crate::{ANNOUNCE_CHANNEL, Broadcast, StoreError};

/// How often the subscriber pings its connection, and how long it waits for the answer.
const PUBSUB_PING_INTERVAL: Duration = Duration::from_secs(5);
const PUBSUB_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// How many broadcast events a slow local subscriber may fall behind.
pub(super) const BROADCAST_CAPACITY: usize = 1024;

/// A presence or second-session event as a pub/sub payload.
fn encode_event(event: &Broadcast) -> Result<bytes::Bytes, StoreError> {
    wire::encode(event).map_err(|error| StoreError::Corrupt {
        key: PRESENCE_CHANNEL.to_owned(),
        reason: error.to_string(),
    })
}

/// A presence or second-session event read from a pub/sub payload; anything else (an
/// older or newer instance's message, garbage) is logged and dropped.
fn decode_event(payload: &[u8]) -> Option<Broadcast> {
    match wire::decode::<Broadcast>(payload) {
        Ok(
            event @ (Broadcast::Presence { .. }
            | Broadcast::SessionElsewhere { .. }
            | Broadcast::SessionEnded { .. }),
        ) => Some(event),
        Ok(_) | Err(_) => {
            tracing::warn!(
                len = payload.len(),
                "a presence event that does not decode; dropped"
            );
            None
        }
    }
}

/// Opens a pub/sub connection subscribed to every broadcast channel.
pub(super) async fn subscribe_channels(client: &Client) -> RedisResult<PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub
        .subscribe(&[ANNOUNCE_CHANNEL, MAIL_CHANNEL, PRESENCE_CHANNEL])
        .await?;
    Ok(pubsub)
}

/// The subscriber task: forwards from `pubsub` until the connection is lost, then
/// re-subscribes (with backoff while Redis is away) and bumps `subscriptions`. Runs until
/// aborted by the last store handle's drop.
pub(super) async fn run_subscriber(
    client: Client,
    pubsub: PubSub,
    events: broadcast::Sender<Broadcast>,
    subscriptions: watch::Sender<u64>,
) {
    let mut current = Some(pubsub);
    let mut delay = RETRY_FIRST_DELAY;
    loop {
        let pubsub = match current.take() {
            Some(pubsub) => pubsub,
            None => {
                match tokio::time::timeout(CONNECT_TIMEOUT, subscribe_channels(&client)).await {
                    Ok(Ok(pubsub)) => {
                        tracing::info!("redis pub/sub re-subscribed");
                        subscriptions.send_modify(|count| *count += 1);
                        pubsub
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "redis pub/sub reconnect failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(RETRY_MAX_DELAY);
                        continue;
                    }
                    Err(_elapsed) => {
                        tracing::debug!("redis pub/sub reconnect timed out; retrying");
                        continue;
                    }
                }
            }
        };
        delay = RETRY_FIRST_DELAY;
        forward(pubsub, &events).await;
        tracing::warn!("redis pub/sub connection lost; re-subscribing");
    }
}

/// Forwards messages from one pub/sub connection until it closes or stops answering pings.
async fn forward(pubsub: PubSub, events: &broadcast::Sender<Broadcast>) {
    let (mut sink, mut stream) = pubsub.split();
    let mut keepalive = tokio::time::interval(PUBSUB_PING_INTERVAL);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the connection was just proven alive.
    keepalive.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(message) => {
                    if let Some(event) = to_broadcast(&message, MAIL_CHANNEL) {
                        // No local subscriber is fine: then no one needs the event.
                        let _ = events.send(event);
                    }
                }
                None => return,
            },
            _ = keepalive.tick() => {
                let answer = tokio::time::timeout(PUBSUB_PING_TIMEOUT, sink.ping::<Value>()).await;
                if !matches!(answer, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}

/// Turns a pub/sub message into an event, reading `mail_channel` as the channel of
/// mail-waiting hints; logs and drops anything malformed.
fn to_broadcast(message: &redis::Msg, mail_channel: &str) -> Option<Broadcast> {
    let payload = message.get_payload_bytes();
    match message.get_channel_name() {
        ANNOUNCE_CHANNEL => {
            let text = String::from_utf8_lossy(payload);
            if let std::borrow::Cow::Owned(_) = text {
                tracing::warn!("announcement is not valid UTF-8; invalid bytes replaced");
            }
            Some(Broadcast::Announcement {
                text: text.into_owned(),
            })
        }
        PRESENCE_CHANNEL => decode_event(payload),
        channel if channel == mail_channel => match std::str::from_utf8(payload)
            .ok()
            .and_then(|name| Username::new(name).ok())
        {
            Some(user) => Some(Broadcast::MailWaiting { user }),
            // A cluster instance's channel also carries presence events: their encoding
            // starts with a variant tag byte, never a name's character.
            None if payload.first().is_some_and(|byte| *byte < b' ') => decode_event(payload),
            None => {
                tracing::warn!(payload = ?String::from_utf8_lossy(payload), "mail-waiting hint with an invalid name; dropped");
                None
            }
        },
        other => {
            tracing::warn!(channel = other, "message on an unexpected channel; dropped");
            None
        }
    }
}

/// What a cluster pub/sub push means: a message on the announcement channel or on this
/// instance's `channel` becomes an event; a confirmed subscription of `channel` (at
/// connect, and again after every reconnect or slot-map change) counts in
/// `subscriptions`; anything else is logged.
pub(super) fn handle_cluster_push(
    push: PushInfo,
    channel: &str,
    events: &broadcast::Sender<Broadcast>,
    subscriptions: &watch::Sender<u64>,
) {
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            if let Some(message) = redis::Msg::from_push_info(push)
                && let Some(event) = to_broadcast(&message, channel)
            {
                // No local subscriber is fine: then no one needs the event.
                let _ = events.send(event);
            }
        }
        PushKind::SSubscribe => {
            subscriptions.send_modify(|count| *count += 1);
            if *subscriptions.borrow() > 1 {
                tracing::info!("redis cluster: this instance's push channel re-subscribed");
            }
        }
        PushKind::Disconnection => {
            tracing::warn!("redis cluster: a pub/sub connection was lost; it re-subscribes");
        }
        kind => tracing::debug!(?kind, "redis cluster push"),
    }
}

impl RedisStore {
    /// See [`crate::Store::publish`]: a `PUBLISH` on [`ANNOUNCE_CHANNEL`] or
    /// [`MAIL_CHANNEL`]; every instance's subscriber (this one's too) delivers it. On a
    /// cluster, announcements go the same way (a cluster carries classic pub/sub to every
    /// node), but a mail-waiting hint goes only where the recipient has a session: one
    /// `SPUBLISH` on the sharded channel of each instance named in the recipient's route
    /// record (`p2pchat:{user}:routes`), none when they are nowhere online.
    pub async fn publish(&self, event: &Broadcast) -> Result<(), StoreError> {
        let (channel, payload) = match event {
            Broadcast::Announcement { text } => (ANNOUNCE_CHANNEL, text.as_str()),
            Broadcast::MailWaiting { user } if self.is_cluster() => {
                return self.publish_routed(user).await;
            }
            Broadcast::MailWaiting { user } => (MAIL_CHANNEL, user.as_str()),
            Broadcast::Presence { user, to, .. } if self.is_cluster() => {
                return self.publish_presence_routed(event, user, to).await;
            }
            Broadcast::SessionElsewhere { user, .. } | Broadcast::SessionEnded { user, .. }
                if self.is_cluster() =>
            {
                let routes = self.routes_of(user).await?;
                return self.spublish_to(&routes, &encode_event(event)?).await;
            }
            Broadcast::Presence { .. }
            | Broadcast::SessionElsewhere { .. }
            | Broadcast::SessionEnded { .. } => {
                return self
                    .query(
                        "publish",
                        redis::cmd("PUBLISH")
                            .arg(PRESENCE_CHANNEL)
                            .arg(encode_event(event)?.as_ref()),
                    )
                    .await
                    .map(|_receivers: u64| ());
            }
        };
        self.query("publish", redis::cmd("PUBLISH").arg(channel).arg(payload))
            .await
            .map(|_receivers: u64| ())
    }

    /// The instances holding sessions of `user` on a cluster (their route record).
    async fn routes_of(&self, user: &Username) -> Result<Vec<String>, StoreError> {
        self.query("publish", redis::cmd("HKEYS").arg(user_key(user, "routes")))
            .await
    }

    /// One `SPUBLISH` of `payload` on the sharded channel of each of `instances`.
    async fn spublish_to(&self, instances: &[String], payload: &[u8]) -> Result<(), StoreError> {
        for instance in instances {
            let _receivers: u64 = self
                .query(
                    "publish",
                    redis::cmd("SPUBLISH")
                        .arg(instance_channel(instance))
                        .arg(payload),
                )
                .await?;
        }
        Ok(())
    }

    /// A presence change on a cluster: each recipient's route record is read, and each
    /// instance named gets one `SPUBLISH` listing only its own recipients (none when no
    /// recipient is online anywhere).
    async fn publish_presence_routed(
        &self,
        event: &Broadcast,
        user: &Username,
        to: &[Username],
    ) -> Result<(), StoreError> {
        let mut by_instance: std::collections::BTreeMap<String, Vec<Username>> =
            std::collections::BTreeMap::new();
        for recipient in to {
            for instance in self.routes_of(recipient).await? {
                by_instance
                    .entry(instance)
                    .or_default()
                    .push(recipient.clone());
            }
        }
        let Broadcast::Presence { online, answer, .. } = event else {
            return Ok(());
        };
        for (instance, recipients) in by_instance {
            let part = Broadcast::Presence {
                user: user.clone(),
                online: *online,
                to: recipients,
                answer: *answer,
            };
            self.spublish_to(&[instance], &encode_event(&part)?).await?;
        }
        Ok(())
    }

    /// A mail-waiting hint for `user` on a cluster, to each instance their routes name.
    async fn publish_routed(&self, user: &Username) -> Result<(), StoreError> {
        let routes = self.routes_of(user).await?;
        self.spublish_to(&routes, user.as_str().as_bytes()).await
    }

    /// See [`crate::Store::subscribe`].
    pub fn subscribe(&self) -> broadcast::Receiver<Broadcast> {
        self.inner.events.subscribe()
    }
}
