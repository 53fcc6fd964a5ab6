//! Behaviours specific to the embedded backend: durability across a reopen.

use anyhow::ensure;
use redb::TableDefinition;
use store::{
    BindOutcome, Binding, DepositOutcome, EmbeddedStore, MailLimits, Store, StoreError, StoredMail,
};

use crate::util::{LIMITS, envelope, ids, keys, refs, user};

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
        store.ack(&bob, &refs(&first.mail)).await?;
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

/// A file of layout 1 (ids keyed without their sender, no byte counts) is migrated when
/// opened: its mail is fetched, acked by (sender, id) and de-duplicated by sender, and its
/// bytes count toward the byte cap.
#[tokio::test]
async fn a_layout_1_file_is_migrated_at_open() -> anyhow::Result<()> {
    type MailRow = (&'static [u8; 16], &'static [u8]);
    const MAIL: TableDefinition<(&str, u64), MailRow> = TableDefinition::new("mail");
    const MAIL_IDS: TableDefinition<(&str, &[u8; 16]), u64> = TableDefinition::new("mail_ids");
    const MAILBOXES: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("mailboxes");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let bob = user("bob");
    let old: Vec<_> = (0..3)
        .map(|n| envelope("alice", "bob", &n.to_string()))
        .collect();
    let mut total = 0;
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        {
            let (mut mail, mut ids) = (txn.open_table(MAIL)?, txn.open_table(MAIL_IDS)?);
            for (sequence, message) in old.iter().enumerate() {
                let value = proto::wire::encode(&StoredMail {
                    envelope: message.clone(),
                    deposited_at_ms: 1_000,
                })?;
                total += value.len() as u64;
                mail.insert(("bob", sequence as u64), (&message.id.0, value.as_ref()))?;
                ids.insert(("bob", &message.id.0), sequence as u64)?;
            }
            txn.open_table(MAILBOXES)?.insert("bob", (3, 3, 0))?;
        }
        txn.commit()?;
    }
    // The byte cap leaves room for less than one more message of the same size.
    let limits = MailLimits {
        max_bytes: total + total / 6,
        ..LIMITS
    };
    let store: Store = EmbeddedStore::open(&path, limits)?.into();
    ensure!(store.mail_count(&bob).await? == 3);
    ensure!(store.deposit(&old[0], 2_000).await? == DepositOutcome::Duplicate);
    ensure!(matches!(
        store.deposit(&envelope("carol", "bob", "9"), 2_000).await,
        Err(StoreError::MailboxBytesFull { .. })
    ));
    let fetched = store.fetch(&bob, 10, usize::MAX, 3_000).await?;
    ensure!(ids(&fetched.mail) == old.iter().map(|m| m.id).collect::<Vec<_>>());
    ensure!(store.ack(&bob, &refs(&fetched.mail[..1])).await? == 1);
    // Another sender reusing an id is another message.
    let reused = proto::Envelope {
        from: user("carol"),
        ..old[1].clone()
    };
    ensure!(store.deposit(&reused, 4_000).await? == DepositOutcome::Stored);
    ensure!(store.ack(&bob, &refs(&fetched.mail[1..])).await? == 2);
    let rest = store.fetch(&bob, 10, usize::MAX, 5_000).await?;
    ensure!(rest.mail.len() == 1 && rest.mail[0].envelope == reused);
    drop(store);
    // Opened again: already layout 2, nothing migrates twice.
    let store: Store = EmbeddedStore::open(&path, limits)?.into();
    ensure!(store.mail_count(&bob).await? == 1);
    Ok(())
}
