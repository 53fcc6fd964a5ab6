//! The store conformance suite: one set of behaviours ([`suite`]), run against the
//! embedded backend, one Redis server, and a Redis Cluster of 3 masters with a replica
//! each, plus the tests that only make sense for one of them ([`redis_only`],
//! [`cluster_only`], [`embedded_only`]). Redis tests start their own `redis-server`s on
//! free ports (`store::testing::RedisServer`, `store::testing::RedisCluster`), so they
//! need no Redis running beforehand.

mod cluster_only;
mod drain;
mod embedded_only;
mod redis_only;
mod suite;
mod util;

/// Runs every named suite test against a fresh store of each backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    let backend = crate::util::EmbeddedBackend::open()?;
                    crate::suite::$name(&backend.store).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    let backend = crate::util::RedisBackend::start().await?;
                    crate::suite::$name(&backend.store).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    let backend = crate::util::ClusterBackend::start().await?;
                    crate::suite::$name(&backend.store).await
                }
            )*
        }
    };
}

conformance!(
    deposit_fetch_ack_keeps_order_and_counts,
    unacked_mail_comes_back,
    expired_mail_is_dropped_at_fetch,
    full_mailbox_refuses_with_typed_error,
    expired_mail_does_not_keep_a_mailbox_full,
    a_fetch_stops_at_its_byte_budget,
    deposit_is_idempotent_by_message_id,
    mail_identity_is_sender_and_id,
    mailbox_byte_cap_refuses_and_acks_give_bytes_back,
    binding_conflict_returns_existing_binding,
    rotation_moves_the_binding_and_release_frees_the_name,
    presence_expires_and_only_its_session_clears_it,
    online_users_are_sorted_by_name,
    presence_that_lapsed_without_leaving_is_found_once,
    a_leave_takes_out_its_own_entry_and_never_a_newer_sessions,
    block_list_refuses_mail_until_unblocked,
    broadcast_reaches_two_subscribers,
    presence_events_reach_their_recipients_instance,
    mailboxes_drain_in_batches,
    prekeys_are_claimed_once_each_then_the_fallback,
    mail_queued_by_older_builds_in_text_is_fetched_and_opens,
);
