//! The per-recipient queues of the core: every message being delivered is handed to its
//! recipient's task at most [`RECIPIENT_QUEUE`] at a time, the rest wait here in order; an
//! outbox flush passes over what is in flight and flushes that recipient again once the
//! passed-over messages have finished; a recipient with nothing in flight for
//! [`RECIPIENT_IDLE`] has its task retired. It answers in [`Action`]s, pushed onto the
//! core's queue.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::Instant,
};

use proto::{MessageId, Username};

use super::{Action, RECIPIENT_IDLE, RECIPIENT_QUEUE, ReplyId};
use crate::state::OutboxEntry;

/// Every recipient's messages in flight: see the module docs.
#[derive(Debug, Default)]
pub(super) struct Recipients {
    /// Messages being delivered or waiting to be, by id: an outbox flush does not repeat them.
    in_flight: HashMap<MessageId, Username>,
    by_user: HashMap<Username, Recipient>,
    /// How many messages wait in `by_user` (not handed yet).
    waiting: usize,
    /// Messages in flight that an outbox flush passed over, by recipient: once the last of
    /// a recipient's has finished, that recipient's outbox is flushed again, once (a result
    /// is answered before it is recorded, so a `trust` right after a refusal can come before
    /// the refused message is finished; it must still go).
    passed_over: HashMap<Username, HashSet<MessageId>>,
}

/// One recipient's messages: handed to its task, or waiting for room there.
#[derive(Debug, Default)]
struct Recipient {
    /// Handed to the task and not finished.
    handed: usize,
    /// Waiting for room in the task's queue, in order.
    waiting: VecDeque<(OutboxEntry, Option<ReplyId>)>,
    /// Since when nothing is in flight (then the task is retired after [`RECIPIENT_IDLE`]).
    idle_since: Option<Instant>,
}

impl Recipients {
    /// How many messages wait for room in their recipients' tasks.
    pub(super) fn waiting(&self) -> usize {
        self.waiting
    }

    /// Hands `entry` to its recipient's task, or keeps it waiting for room there.
    pub(super) fn enqueue(
        &mut self,
        entry: OutboxEntry,
        reply: Option<ReplyId>,
        actions: &mut VecDeque<Action>,
    ) {
        self.in_flight.insert(entry.id, entry.to.clone());
        let recipient = self.by_user.entry(entry.to.clone()).or_default();
        recipient.idle_since = None;
        if recipient.handed < RECIPIENT_QUEUE && recipient.waiting.is_empty() {
            recipient.handed += 1;
            actions.push_back(Action::Enqueue { entry, reply });
        } else {
            recipient.waiting.push_back((entry, reply));
            self.waiting += 1;
        }
    }

    /// Message `id`'s result is recorded: the next waiting message of its recipient takes
    /// its place, and a recipient whose passed-over messages have all finished is flushed
    /// again.
    pub(super) fn finished(&mut self, id: MessageId, now: Instant, actions: &mut VecDeque<Action>) {
        let Some(to) = self.in_flight.remove(&id) else {
            return;
        };
        if let Some(recipient) = self.by_user.get_mut(&to) {
            recipient.handed = recipient.handed.saturating_sub(1);
            if let Some((entry, reply)) = recipient.waiting.pop_front() {
                self.waiting -= 1;
                recipient.handed += 1;
                actions.push_back(Action::Enqueue { entry, reply });
            } else if recipient.handed == 0 {
                recipient.idle_since = Some(now);
            }
        }
        if let Some(waiting) = self.passed_over.get_mut(&to)
            && waiting.remove(&id)
            && waiting.is_empty()
        {
            self.passed_over.remove(&to);
            actions.push_back(Action::ReadOutbox(Some(to)));
        }
    }

    /// The outbox as read (only `only`'s entries, if given): every entry not in flight is
    /// handed on; an entry in flight is passed over, and its recipient flushed again once
    /// it finishes.
    pub(super) fn outbox_read(
        &mut self,
        only: Option<&Username>,
        outbox: Vec<OutboxEntry>,
        actions: &mut VecDeque<Action>,
    ) {
        for entry in outbox {
            if only.is_some_and(|user| user != &entry.to) {
                continue;
            }
            if self.in_flight.contains_key(&entry.id) {
                self.passed_over
                    .entry(entry.to)
                    .or_default()
                    .insert(entry.id);
                continue;
            }
            self.enqueue(entry, None, actions);
        }
    }

    /// When the first idle recipient's task is due to be retired, if any is idle.
    pub(super) fn next_retirement(&self) -> Option<Instant> {
        self.by_user
            .values()
            .filter_map(|recipient| recipient.idle_since)
            .min()
            .map(|since| since + RECIPIENT_IDLE)
    }

    /// Retires the tasks of the recipients idle for [`RECIPIENT_IDLE`] at `now`.
    pub(super) fn retire_idle(&mut self, now: Instant, actions: &mut VecDeque<Action>) {
        let idle: Vec<Username> = self
            .by_user
            .iter()
            .filter(|(_, recipient)| {
                recipient
                    .idle_since
                    .is_some_and(|since| now >= since + RECIPIENT_IDLE)
            })
            .map(|(user, _)| user.clone())
            .collect();
        for user in idle {
            self.by_user.remove(&user);
            actions.push_back(Action::Retire(user));
        }
    }
}
