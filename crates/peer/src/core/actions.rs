//! What comes out of the core: [`Action`]s for the shell to do, among them the writes
//! ([`Write`]) whose results come back as [`Report::Committed`](super::Report::Committed).

use proto::{MessageId, Username};

use super::{Lift, ReplyId};
use crate::{
    api::{ClientError, Event, Status},
    state::OutboxEntry,
};

/// What the shell must do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Tell the user.
    Emit(Event),
    /// The connection status changed.
    Status(Status),
    /// Answer a command.
    Answer(ReplyId, Result<(), ClientError>),
    /// Run a command that needs the server as a task.
    Run(ReplyId),
    /// Submit the outbox records of new messages, in order, in one write.
    Record(Vec<OutboxEntry>),
    /// Hand a message to its recipient's task (with the sender's reply channel, for a new
    /// message; `None`: a retry from the outbox, reported as an event).
    Enqueue {
        /// The message.
        entry: OutboxEntry,
        /// Who waits for its result.
        reply: Option<ReplyId>,
    },
    /// End the recipient's task: nothing in flight for a while.
    Retire(Username),
    /// Submit a write; its result comes back as [`Report::Committed`](super::Report::Committed).
    Write(Write),
    /// Read the outbox (only `user`'s entries, or all) and call
    /// [`Core::outbox_read`](super::Core::outbox_read).
    ReadOutbox(Option<Username>),
    /// Read the messages held by `user`'s mute and whether `user` is blocked, and call
    /// [`Core::held_read`](super::Core::held_read).
    ReadHeld(Username),
    /// Start a mail fetch; it ends with [`Report::FetchDone`](super::Report::FetchDone).
    FetchMail,
    /// Top up the keys published at the server, in a task of its own.
    PublishPrekeys,
    /// Send the receipts due, in a task; it ends with
    /// [`Report::ReceiptsSent`](super::Report::ReceiptsSent).
    SendReceipts {
        /// Users whose receipts wait for their retry: left due, not tried.
        pass_over: Vec<Username>,
    },
    /// Tell the server about every block change it has not confirmed.
    SyncBlocks,
    /// Tell the server `user` is unblocked.
    SyncUnblock(Username),
    /// Open again the mail held from `user` under a changed key.
    ReopenHeld(Username),
    /// Drop kept links: a new link generation.
    NewLinkGeneration,
    /// Ask the server to watch these contacts' presence (sent even when empty at a
    /// registration: it also asks for the newer pushes).
    Watch(Vec<Username>),
    /// Ask the server to stop watching these users' presence.
    Unwatch(Vec<Username>),
}

/// A write the core asks for; its result comes back as
/// [`Report::Committed`](super::Report::Committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Write {
    /// Forget seen ids older than the retention.
    PruneSeen {
        /// Now, wall clock.
        now_ms: u64,
    },
    /// Remove the mutes ended at `now_ms`.
    EndMutes {
        /// Now, wall clock.
        now_ms: u64,
    },
    /// End a mute or a block here.
    Lift(Lift),
    /// Mark messages shown. Its result goes straight to who waits (not through
    /// [`Report::Committed`](super::Report::Committed)): an application that marks what it
    /// showed before it takes more events must be answered even while the loop waits for it
    /// to take them.
    Shown {
        /// (id, history position).
        shown: Vec<(MessageId, u64)>,
        /// Who waits, if anyone.
        reply: Option<ReplyId>,
        /// Whether read receipts become due for them (then, once durable, the shell
        /// reports [`Report::ReceiptsDue`](super::Report::ReceiptsDue)).
        receipts: bool,
    },
}
