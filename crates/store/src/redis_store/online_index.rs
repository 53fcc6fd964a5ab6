//! The online index writer: every heartbeat moves its user's entry in the online index
//! (the sorted sets `p2pchat:online:{b}` that `list` and the lapse sweep read), and every
//! session that leaves takes it out. Sent one by one, that is two more commands per
//! heartbeat, and on a cluster a second request to another master. Here the changes
//! queue instead, and one task per store sends them together every [`FLUSH_EVERY`] (or
//! once [`BATCH`] users wait): per bucket, one `ZADD` naming every user it moves, each
//! leave as its own script (leaves are rare), and, at most once per [`PRUNE_EVERY`], the
//! prune of entries that lapsed an hour ago.
//!
//! The latest change per user wins within a batch, which is what sending them in order
//! would leave: a move then a leave is a leave (the entry goes, whatever score it has up
//! to the leaving session's expiry), a leave then a move is a move.
//!
//! Readers of the index ([`RedisStore::online_users`], [`RedisStore::lapsed`]) flush first,
//! so an instance reads its own writes; another instance's are at most one flush behind,
//! which the index allows (it only has to be right by the next heartbeat; a lookup reads
//! the presence itself). A registration flushes too ([`RedisStore::register_presence`]):
//! the lapse sweep finds a dead instance's users only by their entries, so a user must
//! have one before the registration is answered. A send takes every change queued by
//! then, so flushes in a burst still share sends. The queue is bounded ([`QUEUE`]): when Redis is slower than the
//! heartbeats, heartbeats wait for room rather than the queue growing. A batch that fails
//! after the store's retries is dropped with a warning; the next heartbeat of each of its
//! users writes their entry again, and a lost leave only lets its entry lapse, which the
//! lapse sweep reports as the offline it already is.

use std::{collections::HashMap, sync::Weak, time::Duration};

use proto::Username;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{
    Inner, ONLINE_BUCKETS, RedisStore,
    keys::{online_bucket_key, online_key},
    presence::ONLINE_PRUNE_AFTER_MS,
    scripts::LEAVE_ONLINE,
};

/// How long a change waits for others to go with it.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// How many users' changes make a batch go at once.
const BATCH: usize = 4096;
/// How many changes may wait to be read by the writer.
const QUEUE: usize = 8192;
/// How often the buckets are pruned of entries that lapsed [`ONLINE_PRUNE_AFTER_MS`] ago.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// One user's change to the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Online until `expires_at_ms`, as written at `now_ms` (the heartbeat's time, which
    /// the prune's bound is taken from).
    Online { expires_at_ms: u64, now_ms: u64 },
    /// A session whose presence expired at `expires_at_ms` left: the entry goes if its
    /// score is not later (a later one is a newer session's).
    Left { expires_at_ms: u64 },
}

enum Op {
    Change(Username, Change),
    /// Send what waits now, then answer.
    Flush(oneshot::Sender<()>),
}

/// The handle the store keeps; the writer task ends when it is dropped (with the store).
pub(super) struct IndexWriter {
    ops: mpsc::Sender<Op>,
}

impl IndexWriter {
    /// Starts the writer of the store behind `store` (weak: the task must not keep the
    /// store alive; it upgrades only to send a batch).
    pub(super) fn spawn(store: Weak<Inner>) -> Self {
        let (ops, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, receiver));
        Self { ops }
    }

    /// Queues `user`'s entry to expire at `expires_at_ms`.
    pub(super) async fn online(&self, user: &Username, expires_at_ms: u64, now_ms: u64) {
        let change = Change::Online {
            expires_at_ms,
            now_ms,
        };
        // Fails only when the writer stopped with the store: nothing left to index.
        let _ = self.ops.send(Op::Change(user.clone(), change)).await;
    }

    /// Queues the leave of `user`'s session whose presence expired at `expires_at_ms`.
    pub(super) async fn left(&self, user: &Username, expires_at_ms: u64) {
        let change = Change::Left { expires_at_ms };
        let _ = self.ops.send(Op::Change(user.clone(), change)).await;
    }

    /// Sends every change queued so far and waits until it was sent (or dropped).
    pub(super) async fn flush(&self) {
        let (done, answer) = oneshot::channel();
        if self.ops.send(Op::Flush(done)).await.is_ok() {
            let _ = answer.await;
        }
    }
}

/// The writer task: gathers changes for up to [`FLUSH_EVERY`] after the first, then sends.
async fn run(store: Weak<Inner>, mut ops: mpsc::Receiver<Op>) {
    let mut batch = Batch::default();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut last_prune: Option<Instant> = None;
    while let Some(op) = ops.recv().await {
        batch.take(op, &mut waiters);
        let deadline = Instant::now() + FLUSH_EVERY;
        while waiters.is_empty() && batch.changes.len() < BATCH {
            match tokio::time::timeout_at(deadline, ops.recv()).await {
                Ok(Some(op)) => batch.take(op, &mut waiters),
                Ok(None) | Err(_) => break,
            }
        }
        // What is queued already goes too: when every registration asks for a flush
        // (`register_presence`), a burst of them still shares one send.
        while batch.changes.len() < BATCH {
            match ops.try_recv() {
                Ok(op) => batch.take(op, &mut waiters),
                Err(_) => break,
            }
        }
        let Some(inner) = store.upgrade() else {
            return;
        };
        let prune = last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY);
        if prune {
            last_prune = Some(Instant::now());
        }
        RedisStore { inner }
            .write_index(std::mem::take(&mut batch), prune)
            .await;
        for waiter in waiters.drain(..) {
            let _ = waiter.send(());
        }
    }
}

/// The changes gathered for one send.
#[derive(Debug, Default)]
struct Batch {
    /// The latest change of each user.
    changes: HashMap<Username, Change>,
    /// The latest heartbeat time seen, for the prune's bound.
    now_ms: u64,
}

impl Batch {
    fn take(&mut self, op: Op, waiters: &mut Vec<oneshot::Sender<()>>) {
        match op {
            Op::Change(user, change) => {
                if let Change::Online { now_ms, .. } = change {
                    self.now_ms = self.now_ms.max(now_ms);
                }
                self.changes.insert(user, change);
            }
            Op::Flush(done) => waiters.push(done),
        }
    }
}

impl RedisStore {
    /// Sends `batch`: each bucket's moves as one `ZADD` (and, when `prune`, its prune),
    /// all buckets at once (on a cluster they are different slots), then the leaves.
    async fn write_index(&self, batch: Batch, prune: bool) {
        let mut moves: HashMap<String, Vec<(u64, Username)>> = HashMap::new();
        let mut leaves = Vec::new();
        for (user, change) in batch.changes {
            match change {
                Change::Online { expires_at_ms, .. } => moves
                    .entry(online_key(&user))
                    .or_default()
                    .push((expires_at_ms, user)),
                Change::Left { expires_at_ms } => leaves.push((user, expires_at_ms)),
            }
        }
        let prune_before = format!("({}", batch.now_ms.saturating_sub(ONLINE_PRUNE_AFTER_MS));
        let buckets: Vec<String> = if prune && batch.now_ms > 0 {
            (0..ONLINE_BUCKETS).map(online_bucket_key).collect()
        } else {
            moves.keys().cloned().collect()
        };
        let writes = buckets.into_iter().map(|key| {
            let mut pipeline = redis::pipe();
            if let Some(users) = moves.get(&key) {
                let command = pipeline.cmd("ZADD").arg(&key);
                for (expires_at_ms, user) in users {
                    command.arg(*expires_at_ms).arg(user.as_str());
                }
                command.ignore();
            }
            if prune && batch.now_ms > 0 {
                pipeline
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(&prune_before)
                    .ignore();
            }
            async move { self.run_pipeline("online_index", &pipeline).await }
        });
        let leaves = leaves.iter().map(|(user, expires_at_ms)| {
            let key = online_key(user);
            let expiry = expires_at_ms.to_string();
            async move {
                self.invoke::<i64>(
                    "online_index",
                    &LEAVE_ONLINE,
                    &[&key],
                    &[user.as_str().as_bytes(), expiry.as_bytes()],
                )
                .await
                .map(|_| ())
            }
        });
        let (writes, leaves) = tokio::join!(
            futures::future::join_all(writes),
            futures::future::join_all(leaves)
        );
        let failed = writes
            .into_iter()
            .chain(leaves)
            .filter_map(Result::err)
            .last();
        if let Some(error) = failed {
            tracing::warn!(%error, "could not write the online index; the next heartbeats write it again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[test]
    fn the_latest_change_of_a_user_wins_and_the_newest_time_bounds_the_prune() {
        let mut batch = Batch::default();
        let mut waiters = Vec::new();
        let online = |expires_at_ms, now_ms| Change::Online {
            expires_at_ms,
            now_ms,
        };
        batch.take(
            Op::Change(name("alice"), online(31_000, 1_000)),
            &mut waiters,
        );
        batch.take(
            Op::Change(
                name("alice"),
                Change::Left {
                    expires_at_ms: 31_000,
                },
            ),
            &mut waiters,
        );
        batch.take(
            Op::Change(
                name("bob"),
                Change::Left {
                    expires_at_ms: 20_000,
                },
            ),
            &mut waiters,
        );
        batch.take(
            Op::Change(name("bob"), online(40_000, 10_000)),
            &mut waiters,
        );
        batch.take(
            Op::Change(name("carol"), online(35_000, 5_000)),
            &mut waiters,
        );
        assert_eq!(
            batch.changes[&name("alice")],
            Change::Left {
                expires_at_ms: 31_000
            }
        );
        assert_eq!(batch.changes[&name("bob")], online(40_000, 10_000));
        assert_eq!(batch.now_ms, 10_000);
        assert!(waiters.is_empty());
        let (done, _answer) = oneshot::channel();
        batch.take(Op::Flush(done), &mut waiters);
        assert_eq!(waiters.len(), 1);
    }
}
