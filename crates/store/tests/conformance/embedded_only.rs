//! Behaviours specific to the embedded backend: durability across a reopen.

use anyhow::ensure;
use store::{BindOutcome, Binding, EmbeddedStore, Store};

use crate::util::{LIMITS, envelope, ids, keys, user};

#[tokio::test]
async fn reopened_store_keeps_mail_bindings_and_block_lists() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let bob = user("bob");
    let binding = Binding {
        user: bob.clone(),
        keys: keys(),
        bound_at_ms: 1_000,
    };
    let sent: Vec<_> = (0..20)
        .map(|n| envelope("alice", "bob", &n.to_string()))
        .collect();
    {
        let store: Store = EmbeddedStore::open(&path, LIMITS)?.into();
        ensure!(store.bind(&binding).await? == BindOutcome::Created);
        for message in &sent {
            store.deposit(message, 1_000).await?;
        }
        store.block(&bob, &user("mallory")).await?;
        // Half of it fetched and acked before the "restart".
        let first = store.fetch(&bob, 5, usize::MAX, 2_000).await?;
        store.ack(&bob, &ids(&first.mail)).await?;
    }
    let store: Store = EmbeddedStore::open(&path, LIMITS)?.into();
    ensure!(store.binding(&bob).await? == Some(binding.clone()));
    ensure!(store.bind(&binding).await? == BindOutcome::Existing(binding));
    ensure!(store.blocked_by(&bob).await? == vec![user("mallory")]);
    ensure!(store.mail_count(&bob).await? == 15);
    let rest = store.fetch(&bob, 100, usize::MAX, 3_000).await?;
    ensure!(ids(&rest.mail) == sent[5..].iter().map(|m| m.id).collect::<Vec<_>>());
    // Sequence numbers continue after the reopen: new mail goes behind the old.
    let newer = envelope("alice", "bob", "newer");
    store.deposit(&newer, 4_000).await?;
    let all = store.fetch(&bob, 100, usize::MAX, 4_000).await?;
    ensure!(all.mail.last().map(|m| m.envelope.id) == Some(newer.id));
    ensure!(store.deposit(&sent[7], 4_000).await? == store::DepositOutcome::Duplicate);
    Ok(())
}
