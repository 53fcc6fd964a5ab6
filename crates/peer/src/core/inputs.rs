//! What goes into the core besides the time: user commands ([`Command`], among them a
//! [`Lift`], which the core passes on as a write) and the reports of tasks and writes
//! ([`Report`], [`Committed`], [`Fetched`]).

use proto::{MessageId, Username};

use crate::{
    api::Event,
    control::ControlEvent,
    state::{InboundMessage, OutboxEntry, ReceiptApplied, StateError},
};

/// Names a command waiting for its answer: the shell keeps the reply channel under it.
pub(crate) type ReplyId = u64;

/// A user command, as the core sees it.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send a message (its outbox entry prepared by the shell: id, position, time).
    Send {
        /// The message.
        entry: OutboxEntry,
        /// Who waits for the result.
        reply: ReplyId,
    },
    /// End a mute or a block now.
    Lift(Lift),
    /// Messages were shown: (id, history position) of each.
    Shown {
        /// The marks.
        shown: Vec<(MessageId, u64)>,
        /// Who waits.
        reply: ReplyId,
    },
    /// Any other command: run by a task (it needs the server), after the sends before it
    /// are recorded.
    Task {
        /// The command, kept by the shell.
        reply: ReplyId,
    },
}

/// A write's result.
#[derive(Debug)]
pub(crate) enum Committed {
    /// [`Write::PruneSeen`](super::Write::PruneSeen).
    PruneSeen(Result<u64, StateError>),
    /// [`Write::EndMutes`](super::Write::EndMutes): whose mutes ended.
    EndMutes(Result<Vec<Username>, StateError>),
    /// [`Write::Lift`](super::Write::Lift).
    Lifted {
        /// What was asked.
        lift: Lift,
        /// Whether there was a mute or a block to end.
        result: Result<bool, StateError>,
    },
}

/// Ending a mute or a block now: the core passes it on as a write
/// ([`Write::Lift`](super::Write::Lift)), in command order, and hears whether there was one
/// to end ([`Committed::Lifted`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lift {
    /// What ends.
    pub(crate) restriction: Restriction,
    /// Whose.
    pub(crate) user: Username,
    /// Who waits.
    pub(crate) reply: ReplyId,
}

/// What a [`Lift`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Restriction {
    /// A mute (`unmute`).
    Mute,
    /// A block (`unblock`).
    Block,
}

/// How a mail fetch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// The mailbox was emptied (or the server could not be asked; the next connection
    /// fetches again).
    Done,
    /// Mail was left in the mailbox because it could not be taken now (local storage
    /// failing, the sender's keys not to be had): fetch again soon.
    LeftForLater,
}

/// How a run of [`Action::SendReceipts`](super::Action::SendReceipts) ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ReceiptRun {
    /// Whether more may be due than the run read.
    pub(crate) more: bool,
    /// Users the run left nothing due to, of those it tried (sent, or never to go).
    pub(crate) went: Vec<Username>,
    /// Users the run left receipts due to (their route failed): tried again later.
    pub(crate) failed: Vec<Username>,
}

impl ReceiptRun {
    /// The run tried a batch of receipts to `to`, and `left_due` says whether it stays due.
    /// A user with any batch left due failed, whatever their other batches did.
    pub(crate) fn tried(&mut self, to: &Username, left_due: bool) {
        if left_due {
            self.went.retain(|user| user != to);
            if !self.failed.contains(to) {
                self.failed.push(to.clone());
            }
        } else if !self.failed.contains(to) && !self.went.contains(to) {
            self.went.push(to.clone());
        }
    }
}

/// What tasks and writes report back to the loop.
#[derive(Debug)]
pub(crate) enum Report {
    /// A message was stored (and acked); show it unless held by a mute.
    Received(InboundMessage),
    /// A receipt was stored (and acked): tell the user what it changed.
    Receipt(ReceiptApplied),
    /// Receipts became due (messages were marked shown): send them.
    ReceiptsDue,
    /// A run of [`Action::SendReceipts`](super::Action::SendReceipts) ended.
    ReceiptsSent(ReceiptRun),
    /// The registration (a [`ControlEvent::Online`]), once the keys others start sessions
    /// with are published: the shell hands it to [`Core::control`](super::Core::control).
    Registered(ControlEvent),
    /// Sessions others started used some of the keys published at the server up: publish
    /// more ([`Action::PublishPrekeys`](super::Action::PublishPrekeys)).
    KeysUsed,
    /// Something to tell the user as is.
    Notify(Event),
    /// A message's result is recorded and reported: it may be sent from the outbox again.
    Finished(MessageId),
    /// A mail fetch finished.
    FetchDone(Fetched),
    /// `user` is muted until `until_ms` (the mute is durable).
    Muted {
        /// Whom.
        user: Username,
        /// When it ends, wall clock.
        until_ms: u64,
    },
    /// Keys were pinned again (`trust`): send the user's outbox, open the mail held from them.
    Trusted(Username),
    /// `user` is blocked now (durable): stop watching their presence.
    Blocked(Username),
    /// The server closed the connection at a watch request as malformed: it predates
    /// contacts' presence, and is not asked again.
    WatchRefused,
    /// A write the core asked for is done.
    Committed(Committed),
}
