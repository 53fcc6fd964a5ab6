//! The I/O-free core of the runtime: every decision of the event loop, as a state machine.
//!
//! [`Core`] is fed one input at a time with the current time ([`Now`]): a user command
//! ([`Core::command`], then [`Core::end_turn`] once the commands waiting were taken), a
//! control connection event ([`Core::control`]), a report from a task or a finished write
//! ([`Core::report`]), what a read it asked for found ([`Core::outbox_read`],
//! [`Core::held_read`]), or the time ([`Core::timeout`] once [`Core::next_deadline`] has
//! come). It answers with [`Action`]s, taken with [`Core::poll_action`]: emit this event,
//! answer that command, submit this write, read that, hand this message to its recipient's
//! task, fetch mail. It owns no socket, timer, task or file; the shell ([`crate::shell`])
//! does what the actions say and feeds the results back, so every rule here is tested by
//! the unit tests below without a runtime, a socket or a disk.
//!
//! Rules decided here:
//! - **Sends**: a send to oneself, of no text or of more than the limit is refused; the
//!   others are recorded in command order, the sends of one turn in one write
//!   ([`Action::Record`]), before any later command's write.
//! - **Outbox**: each message is handed to its recipient's task once
//!   ([`Action::Enqueue`]); an outbox flush (on registration, on the mail timer, on `trust`)
//!   passes over what is in flight and flushes that recipient again once the passed-over
//!   messages have finished. At most [`RECIPIENT_QUEUE`] messages are handed to one
//!   recipient's task at a time; the rest wait here, in order. A recipient with nothing in
//!   flight for [`RECIPIENT_IDLE`] has its task retired ([`Action::Retire`]).
//! - **Mail**: fetched on registration, on a push and on the slow timer, one fetch at a
//!   time (a request during a fetch fetches again after it); mail left in the mailbox
//!   because it could not be taken is fetched again after a backoff.
//! - **Mutes**: a received message stored while its sender was muted is not shown; when a
//!   mute ends (its time, or `unmute`) the held messages are shown after a summary, unless
//!   the sender has been blocked since (then they are marked handled, unshown). At start,
//!   what was stored and not shown is shown, and mutes that ended meanwhile are released.
//! - **Blocks**: an unblock is sent to the server at once when online; every change not
//!   yet confirmed is sent at each registration.
//! - **Receipts**: the receipts owed ([`crate::receipts`]) are sent by one task at a time
//!   ([`Action::SendReceipts`]), while online: after each mail fetch (so a drained mailbox
//!   is answered by a few batched receipts), after messages are marked shown (read
//!   receipts, when on; never for messages of a blocked sender marked handled unshown), on
//!   registration (what was owed before an exit or a crash) and on the slow timer (what
//!   could not go). A receipt received moves the status of the messages it names and is
//!   told as [`Event::Receipt`] when it changed any; it is never shown as a message. A
//!   request to send again that queued messages again flushes its sender's outbox.
//! - **Connection**: the user hears once that the server is gone, not at every retry; a
//!   reconnect starts a new link generation (kept links may point where peers no longer are).
//! - **Contacts' presence**: at each registration the server is told whom to watch (the
//!   people written to, less the blocked: [`crate::contacts`]); someone new sent to is
//!   added while online (someone who only wrote to this user is not); a block drops them,
//!   an unblock adds them back.
//!
//! The rules of one message's route (direct first, then the mailbox; keys pinned on first
//! authenticated use; de-duplication; mail dated ahead) live in [`crate::delivery`] and
//! [`crate::inbox`], which the shell runs as tasks.
//!
//! **Architecture Invariant:** this module imports no I/O (no tokio, no sockets, no state
//! file): inputs in, actions out.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use durable::Backoff;
use proto::{ErrorReply, MessageId, Push, Username};

use crate::{
    api::{ClientError, Event, Status},
    contacts::Contacts,
    control::ControlEvent,
    state::{InboundMessage, OutboxEntry, ReceiptApplied, StateError},
};

/// The most messages handed to one recipient's task and not yet finished (the capacity of
/// its queue); more wait in the core, in order.
pub(crate) const RECIPIENT_QUEUE: usize = 2 * crate::link::WINDOW;

/// How long a recipient's task (and the link it keeps) lives with nothing to send.
pub(crate) const RECIPIENT_IDLE: Duration = Duration::from_secs(90);

/// The most messages waiting in the core for their recipients' tasks before user commands
/// are no longer taken (the shell stops reading them: back-pressure on `send`).
pub(crate) const MAX_WAITING: usize = 65_536;

/// The first wait before fetching again mail that was left in the mailbox because it
/// could not be taken (a full disk, say): sooner than the slow poll, so the mail arrives
/// soon after the cause goes away.
pub(crate) const FETCH_RETRY_MIN: Duration = Duration::from_secs(1);

/// The time, as the core sees it: a monotonic instant for timers and the wall clock (ms
/// since the epoch) for what is stored (mutes end at a wall-clock time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Now {
    /// Monotonic.
    pub(crate) at: Instant,
    /// Wall clock, ms since the epoch.
    pub(crate) wall_ms: u64,
}

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
    /// End a mute now.
    Unmute {
        /// Whose.
        user: Username,
        /// Who waits.
        reply: ReplyId,
    },
    /// Unblock.
    Unblock {
        /// Whom.
        user: Username,
        /// Who waits.
        reply: ReplyId,
    },
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

/// A write the core asks for; its result comes back as [`Report::Committed`].
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
    /// End `user`'s mute.
    Unmute {
        /// Whose.
        user: Username,
        /// Who waits.
        reply: ReplyId,
    },
    /// Unblock `user` here.
    Unblock {
        /// Whom.
        user: Username,
        /// Who waits.
        reply: ReplyId,
    },
    /// Mark messages shown. Its result goes straight to who waits (not through
    /// [`Report::Committed`]): an application that marks what it showed before it takes
    /// more events must be answered even while the loop waits for it to take them.
    Shown {
        /// (id, history position).
        shown: Vec<(MessageId, u64)>,
        /// Who waits, if anyone.
        reply: Option<ReplyId>,
        /// Whether read receipts become due for them (then, once durable, the shell
        /// reports [`Report::ReceiptsDue`]).
        receipts: bool,
    },
}

/// A write's result.
#[derive(Debug)]
pub(crate) enum Committed {
    /// [`Write::PruneSeen`].
    PruneSeen(Result<u64, StateError>),
    /// [`Write::EndMutes`]: whose mutes ended.
    EndMutes(Result<Vec<Username>, StateError>),
    /// [`Write::Unmute`]: whether there was a mute.
    Unmute {
        /// Whose.
        user: Username,
        /// Who waits.
        reply: ReplyId,
        /// The result.
        result: Result<bool, StateError>,
    },
    /// [`Write::Unblock`]: whether the user was blocked.
    Unblock {
        /// Whom.
        user: Username,
        /// Who waits.
        reply: ReplyId,
        /// The result.
        result: Result<bool, StateError>,
    },
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

/// What tasks and writes report back to the loop.
#[derive(Debug)]
pub(crate) enum Report {
    /// A message was stored (and acked); show it unless held by a mute.
    Received(InboundMessage),
    /// A receipt was stored (and acked): tell the user what it changed.
    Receipt(ReceiptApplied),
    /// Receipts became due (messages were marked shown): send them.
    ReceiptsDue,
    /// A run of [`Action::SendReceipts`] ended; `more`: it left receipts due unread.
    ReceiptsSent {
        /// Whether more may be due than the run read.
        more: bool,
    },
    /// The registration (a [`ControlEvent::Online`]), once the keys others start sessions
    /// with are published: the shell hands it to [`Core::control`].
    Registered(ControlEvent),
    /// Sessions others started used some of the keys published at the server up: publish
    /// more ([`Action::PublishPrekeys`]).
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
    /// Submit a write; its result comes back as [`Report::Committed`].
    Write(Write),
    /// Read the outbox (only `user`'s entries, or all) and call [`Core::outbox_read`].
    ReadOutbox(Option<Username>),
    /// Read the messages held by `user`'s mute and whether `user` is blocked, and call
    /// [`Core::held_read`].
    ReadHeld(Username),
    /// Start a mail fetch; it ends with [`Report::FetchDone`].
    FetchMail,
    /// Top up the keys published at the server, in a task of its own.
    PublishPrekeys,
    /// Send the receipts due, in a task; it ends with [`Report::ReceiptsSent`].
    SendReceipts,
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

/// The connection to the server, as far as the core cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connecting,
    Online,
    Offline,
    Fatal,
}

/// The event loop's state machine: see the module docs.
#[derive(Debug)]
pub(crate) struct Core {
    me: Username,
    link: Link,
    actions: VecDeque<Action>,
    /// Sends of this turn, recorded at its end (or before the next other command).
    unrecorded: Vec<(OutboxEntry, ReplyId)>,
    /// Messages being delivered or waiting to be, by id: an outbox flush does not repeat them.
    in_flight: HashMap<MessageId, Username>,
    recipients: HashMap<Username, Recipient>,
    /// How many messages wait in `recipients` (not handed yet).
    waiting: usize,
    /// Messages in flight that an outbox flush passed over, by recipient: once the last of
    /// a recipient's has finished, that recipient's outbox is flushed again, once (a result
    /// is answered before it is recorded, so a `trust` right after a refusal can come before
    /// the refused message is finished; it must still go).
    passed_over: HashMap<Username, HashSet<MessageId>>,
    /// Mutes: user → end, wall clock.
    mutes: HashMap<Username, u64>,
    fetching: bool,
    fetch_again: bool,
    /// When to fetch again after mail was left in the mailbox.
    fetch_retry_at: Option<Instant>,
    fetch_retry: Backoff,
    mail_poll: Duration,
    mail_poll_at: Instant,
    /// Whose presence is watched at the server.
    contacts: Contacts,
    /// Whether the server knows watch requests (until one is refused as malformed).
    server_watches: bool,
    /// Whether marking messages shown makes read receipts due.
    read_receipts: bool,
    /// A receipts task runs.
    sending_receipts: bool,
    /// Receipts became due while it ran: run again after it.
    receipts_again: bool,
}

impl Core {
    /// A core for `me`, fetching mail every `mail_poll` without a push, sending read
    /// receipts if `read_receipts`.
    pub(crate) fn new(me: Username, mail_poll: Duration, read_receipts: bool, now: Now) -> Self {
        Self {
            me,
            link: Link::Connecting,
            actions: VecDeque::new(),
            unrecorded: Vec::new(),
            in_flight: HashMap::new(),
            recipients: HashMap::new(),
            waiting: 0,
            passed_over: HashMap::new(),
            mutes: HashMap::new(),
            fetching: false,
            fetch_again: false,
            fetch_retry_at: None,
            fetch_retry: Backoff::new(FETCH_RETRY_MIN, mail_poll.max(FETCH_RETRY_MIN)),
            mail_poll,
            mail_poll_at: now.at + mail_poll,
            contacts: Contacts::default(),
            server_watches: true,
            read_receipts,
            sending_receipts: false,
            receipts_again: false,
        }
    }

    /// The contacts stored before this start: the users written to
    /// ([`crate::state::State::written_to`]) and the blocked ones.
    pub(crate) fn contacts_read(
        &mut self,
        read: Result<(Vec<Username>, Vec<Username>), StateError>,
    ) {
        match read {
            Ok((talked_with, blocked)) => {
                self.contacts = Contacts::new(&self.me, talked_with, blocked);
            }
            Err(error) => self.state_error(&error),
        }
    }

    /// This client wrote to `user`: watch their presence if they are new.
    fn talked_with(&mut self, user: &Username) {
        if self.contacts.talked_with(user.clone()) && self.asks_presence() {
            self.actions.push_back(Action::Watch(vec![user.clone()]));
        }
    }

    /// Whether watch requests go to the server now.
    fn asks_presence(&self) -> bool {
        self.online() && self.server_watches
    }

    /// The next thing to do, if any.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether user commands are taken now: not while too many messages wait for their
    /// recipients' tasks (back-pressure on senders).
    pub(crate) fn accepts_commands(&self) -> bool {
        self.waiting < MAX_WAITING
    }

    /// Starts from the stored state: the mutes, and what was stored but not shown before
    /// the last exit. Forgets old seen ids; releases mutes that ended meanwhile.
    pub(crate) fn start(
        &mut self,
        now: Now,
        mutes: Vec<(Username, u64)>,
        unshown: Vec<InboundMessage>,
    ) {
        self.actions.push_back(Action::Write(Write::PruneSeen {
            now_ms: now.wall_ms,
        }));
        self.mutes = mutes.into_iter().collect();
        let ended = self.take_ended_mutes(now);
        let mut released: Vec<Username> = Vec::new();
        for message in unshown {
            if !message.while_muted {
                self.emit(Event::Message(message));
            } else if !self.mutes.contains_key(&message.from)
                && !ended.contains(&message.from)
                && !released.contains(&message.from)
            {
                // Its mute was ended by `unmute` before the exit, after it was stored.
                released.push(message.from.clone());
            }
        }
        for user in released {
            self.actions.push_back(Action::ReadHeld(user));
        }
    }

    /// A user command. Call [`Core::end_turn`] once the commands already waiting are taken.
    pub(crate) fn command(&mut self, command: Command) {
        // Writes keep the order of commands: the sends before this one are recorded first.
        if !matches!(command, Command::Send { .. }) {
            self.record_sends();
        }
        match command {
            Command::Send { entry, reply } => {
                let refusal = if entry.to == self.me {
                    Some(ClientError::Yourself)
                } else if entry.body.trim().is_empty() {
                    Some(ClientError::EmptyMessage)
                } else if entry.body.len() > proto::seal::MAX_BODY_LEN {
                    Some(ClientError::TooLong {
                        len: entry.body.len(),
                        max: proto::seal::MAX_BODY_LEN,
                    })
                } else {
                    None
                };
                match refusal {
                    Some(error) => self.actions.push_back(Action::Answer(reply, Err(error))),
                    None => {
                        self.talked_with(&entry.to);
                        self.unrecorded.push((entry, reply));
                    }
                }
            }
            Command::Unmute { user, reply } => {
                self.actions
                    .push_back(Action::Write(Write::Unmute { user, reply }));
            }
            Command::Unblock { user, reply } => {
                self.actions
                    .push_back(Action::Write(Write::Unblock { user, reply }));
            }
            Command::Shown { shown, reply } => {
                self.actions.push_back(Action::Write(Write::Shown {
                    shown,
                    reply: Some(reply),
                    receipts: self.read_receipts,
                }));
            }
            Command::Task { reply } => self.actions.push_back(Action::Run(reply)),
        }
    }

    /// The end of a turn of commands: their sends are recorded, in one write.
    pub(crate) fn end_turn(&mut self) {
        self.record_sends();
    }

    fn record_sends(&mut self) {
        if self.unrecorded.is_empty() {
            return;
        }
        let sends = std::mem::take(&mut self.unrecorded);
        let entries = sends.iter().map(|(entry, _)| entry.clone()).collect();
        self.actions.push_back(Action::Record(entries));
        for (entry, reply) in sends {
            self.enqueue(entry, Some(reply));
        }
    }

    /// Hands `entry` to its recipient's task, or keeps it waiting for room there.
    fn enqueue(&mut self, entry: OutboxEntry, reply: Option<ReplyId>) {
        self.in_flight.insert(entry.id, entry.to.clone());
        let recipient = self.recipients.entry(entry.to.clone()).or_default();
        recipient.idle_since = None;
        if recipient.handed < RECIPIENT_QUEUE && recipient.waiting.is_empty() {
            recipient.handed += 1;
            self.actions.push_back(Action::Enqueue { entry, reply });
        } else {
            recipient.waiting.push_back((entry, reply));
            self.waiting += 1;
        }
    }

    /// An event of the control connection.
    pub(crate) fn control(&mut self, event: ControlEvent) {
        match event {
            ControlEvent::Online { observed, .. } => {
                self.link = Link::Online;
                self.actions
                    .push_back(Action::Status(Status::Online { observed }));
                self.emit(Event::Online { observed });
                self.fetch_mail();
                self.send_receipts();
                self.actions.push_back(Action::SyncBlocks);
                self.actions.push_back(Action::ReadOutbox(None));
                if self.server_watches {
                    self.actions.push_back(Action::Watch(self.contacts.all()));
                }
            }
            ControlEvent::Offline { reason, retry_in } => {
                // The user hears once that the server is gone, not at every retry.
                let first = matches!(self.link, Link::Online | Link::Connecting);
                self.link = Link::Offline;
                // Kept links may point at peers that moved; start fresh after a reconnect.
                self.actions.push_back(Action::NewLinkGeneration);
                self.actions.push_back(Action::Status(Status::Offline {
                    reason: reason.clone(),
                }));
                if first {
                    self.emit(Event::Offline { reason, retry_in });
                } else {
                    tracing::debug!(%reason, ?retry_in, "still offline");
                }
            }
            ControlEvent::Fatal(reply) => self.fatal(reply),
            ControlEvent::Push(Push::MailWaiting) => self.fetch_mail(),
            ControlEvent::Push(Push::Announcement { text, at_ms }) => {
                self.emit(Event::Announcement { text, at_ms });
            }
            ControlEvent::Push(Push::Presence { user, online }) => {
                self.emit(Event::Presence { user, online });
            }
            ControlEvent::Push(Push::SessionElsewhere { observed, at_ms }) => {
                self.emit(Event::SessionElsewhere { observed, at_ms });
            }
        }
    }

    fn fatal(&mut self, reply: ErrorReply) {
        self.link = Link::Fatal;
        self.actions
            .push_back(Action::Status(Status::Fatal(reply.clone())));
        self.emit(Event::Fatal(reply));
    }

    fn online(&self) -> bool {
        self.link == Link::Online
    }

    /// A report of a task or a write.
    pub(crate) fn report(&mut self, report: Report, now: Now) {
        match report {
            // The shell hands registrations to `Core::control`.
            Report::Registered(event) => self.control(event),
            Report::KeysUsed => self.actions.push_back(Action::PublishPrekeys),
            Report::Received(message) => {
                // The mute decision was made when the message was stored.
                if !message.while_muted {
                    self.emit(Event::Message(message));
                }
            }
            Report::Receipt(applied) if applied.kind == proto::ReceiptKind::Resend => {
                // The messages it named are in the outbox again: send them.
                if !applied.messages.is_empty() {
                    tracing::info!(to = %applied.from, messages = applied.messages.len(), "sending messages again that the recipient could not open");
                    self.actions
                        .push_back(Action::ReadOutbox(Some(applied.from)));
                }
            }
            Report::Receipt(applied) => {
                if !applied.messages.is_empty() {
                    self.emit(Event::Receipt {
                        from: applied.from,
                        kind: applied.kind,
                        messages: applied.messages,
                    });
                }
            }
            Report::ReceiptsDue => self.send_receipts(),
            Report::ReceiptsSent { more } => {
                self.sending_receipts = false;
                if std::mem::take(&mut self.receipts_again) || more {
                    self.send_receipts();
                }
            }
            Report::Notify(event) => self.emit(event),
            Report::Finished(id) => self.finished(id, now),
            Report::FetchDone(fetched) => {
                self.fetching = false;
                match fetched {
                    Fetched::Done => self.fetch_retry.reset(),
                    Fetched::LeftForLater => {
                        let wait = self.fetch_retry.next_delay(0);
                        self.fetch_retry_at = Some(now.at + wait);
                    }
                }
                if std::mem::take(&mut self.fetch_again) {
                    self.fetch_mail();
                }
                // What the fetch stored is owed its delivered receipts, batched.
                self.send_receipts();
            }
            Report::Muted { user, until_ms } => {
                self.mutes.insert(user, until_ms);
            }
            Report::Trusted(user) => {
                self.actions
                    .push_back(Action::ReadOutbox(Some(user.clone())));
                self.actions.push_back(Action::ReopenHeld(user));
            }
            Report::Committed(committed) => self.committed(committed),
            Report::WatchRefused => {
                tracing::warn!(
                    "the discovery server does not know watch requests (an older version): no contact presence"
                );
                self.server_watches = false;
            }
            Report::Blocked(user) => {
                if self.contacts.blocked(&user) && self.asks_presence() {
                    self.actions.push_back(Action::Unwatch(vec![user]));
                }
            }
        }
    }

    fn finished(&mut self, id: MessageId, now: Now) {
        let Some(to) = self.in_flight.remove(&id) else {
            return;
        };
        if let Some(recipient) = self.recipients.get_mut(&to) {
            recipient.handed = recipient.handed.saturating_sub(1);
            if let Some((entry, reply)) = recipient.waiting.pop_front() {
                self.waiting -= 1;
                recipient.handed += 1;
                self.actions.push_back(Action::Enqueue { entry, reply });
            } else if recipient.handed == 0 {
                recipient.idle_since = Some(now.at);
            }
        }
        if let Some(waiting) = self.passed_over.get_mut(&to)
            && waiting.remove(&id)
            && waiting.is_empty()
        {
            self.passed_over.remove(&to);
            self.actions.push_back(Action::ReadOutbox(Some(to)));
        }
    }

    fn committed(&mut self, committed: Committed) {
        match committed {
            Committed::PruneSeen(result) => {
                if let Err(error) = result {
                    self.state_error(&error);
                }
            }
            Committed::EndMutes(result) => match result {
                Ok(ended) => {
                    for user in ended {
                        self.actions.push_back(Action::ReadHeld(user));
                    }
                }
                Err(error) => self.state_error(&error),
            },
            Committed::Unmute {
                user,
                reply,
                result,
            } => match result {
                Ok(true) => {
                    self.mutes.remove(&user);
                    self.actions.push_back(Action::Answer(reply, Ok(())));
                    self.actions.push_back(Action::ReadHeld(user));
                }
                Ok(false) => {
                    self.actions
                        .push_back(Action::Answer(reply, Err(ClientError::NotMuted(user))));
                }
                Err(error) => self
                    .actions
                    .push_back(Action::Answer(reply, Err(error.into()))),
            },
            Committed::Unblock {
                user,
                reply,
                result,
            } => match result {
                Ok(true) => {
                    if self.contacts.unblocked(user.clone()) && self.asks_presence() {
                        self.actions.push_back(Action::Watch(vec![user.clone()]));
                    }
                    if self.online() {
                        self.actions.push_back(Action::SyncUnblock(user));
                    }
                    self.actions.push_back(Action::Answer(reply, Ok(())));
                }
                Ok(false) => {
                    self.actions
                        .push_back(Action::Answer(reply, Err(ClientError::NotBlocked(user))));
                }
                Err(error) => self
                    .actions
                    .push_back(Action::Answer(reply, Err(error.into()))),
            },
        }
    }

    /// What [`Action::ReadOutbox`] found: every entry not in flight is handed on; an entry
    /// in flight is passed over, and its recipient flushed again once it finishes.
    pub(crate) fn outbox_read(
        &mut self,
        only: Option<&Username>,
        outbox: Result<Vec<OutboxEntry>, StateError>,
    ) {
        let outbox = match outbox {
            Ok(outbox) => outbox,
            Err(error) => return self.state_error(&error),
        };
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
            self.enqueue(entry, None);
        }
    }

    /// What [`Action::ReadHeld`] found: the messages `user`'s mute held, and whether the
    /// user has blocked `user` since (then they are marked handled, not shown).
    pub(crate) fn held_read(
        &mut self,
        user: Username,
        held: Result<(Vec<InboundMessage>, bool), StateError>,
    ) {
        let (held, blocked) = match held {
            Ok(read) => read,
            Err(error) => return self.state_error(&error),
        };
        if blocked {
            // Not shown, and not offered again at every start: marked as handled.
            let shown = held
                .iter()
                .map(|message| (message.id, message.seq))
                .collect();
            self.actions.push_back(Action::Write(Write::Shown {
                shown,
                reply: None,
                receipts: false,
            }));
            return;
        }
        self.emit(Event::MuteEnded {
            user,
            held: held.len(),
        });
        for message in held {
            self.emit(Event::Message(message));
        }
    }

    /// When [`Core::timeout`] is next due.
    pub(crate) fn next_deadline(&self, now: Now) -> Instant {
        let mut next = self.mail_poll_at;
        if let Some(at) = self.fetch_retry_at {
            next = next.min(at);
        }
        if let Some(until) = self.mutes.values().min() {
            next = next.min(now.at + Duration::from_millis(until.saturating_sub(now.wall_ms)));
        }
        for recipient in self.recipients.values() {
            if let Some(since) = recipient.idle_since {
                next = next.min(since + RECIPIENT_IDLE);
            }
        }
        next
    }

    /// The time has come for whatever is due at `now`.
    pub(crate) fn timeout(&mut self, now: Now) {
        if now.at >= self.mail_poll_at {
            self.mail_poll_at = now.at + self.mail_poll;
            if self.online() {
                self.fetch_mail();
                self.actions.push_back(Action::ReadOutbox(None));
                self.send_receipts();
            }
        }
        if self.fetch_retry_at.is_some_and(|at| now.at >= at) {
            self.fetch_retry_at = None;
            if self.online() {
                self.fetch_mail();
            }
        }
        self.take_ended_mutes(now);
        let idle: Vec<Username> = self
            .recipients
            .iter()
            .filter(|(_, recipient)| {
                recipient
                    .idle_since
                    .is_some_and(|since| now.at >= since + RECIPIENT_IDLE)
            })
            .map(|(user, _)| user.clone())
            .collect();
        for user in idle {
            self.recipients.remove(&user);
            self.actions.push_back(Action::Retire(user));
        }
    }

    /// Forgets the mutes ended at `now` and asks for them to be removed from the state
    /// (their held messages are shown once that is durable). Returns whose.
    fn take_ended_mutes(&mut self, now: Now) -> Vec<Username> {
        let ended: Vec<Username> = self
            .mutes
            .iter()
            .filter(|(_, until)| !crate::state::mute_active(**until, now.wall_ms))
            .map(|(user, _)| user.clone())
            .collect();
        if !ended.is_empty() {
            self.mutes
                .retain(|_, until| crate::state::mute_active(*until, now.wall_ms));
            self.actions.push_back(Action::Write(Write::EndMutes {
                now_ms: now.wall_ms,
            }));
        }
        ended
    }

    fn fetch_mail(&mut self) {
        if self.fetching {
            self.fetch_again = true;
            return;
        }
        self.fetching = true;
        self.actions.push_back(Action::FetchMail);
    }

    /// Sends the receipts due, unless offline (they stay due for the registration) or a
    /// run is under way (then once more after it).
    fn send_receipts(&mut self) {
        if !self.online() {
            return;
        }
        if self.sending_receipts {
            self.receipts_again = true;
            return;
        }
        self.sending_receipts = true;
        self.actions.push_back(Action::SendReceipts);
    }

    fn emit(&mut self, event: Event) {
        self.actions.push_back(Action::Emit(event));
    }

    /// Tells the user that the local state failed (also for reads the shell did itself).
    pub(crate) fn state_error(&mut self, error: &StateError) {
        tracing::error!(%error, "state error");
        self.emit(Event::StateError {
            error: error.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    fn clock() -> Now {
        Now {
            at: Instant::now(),
            wall_ms: 1_000_000,
        }
    }

    fn later(now: Now, by: Duration) -> Now {
        Now {
            at: now.at + by,
            wall_ms: now.wall_ms + by.as_millis() as u64,
        }
    }

    fn core(now: Now) -> Core {
        Core::new(name("alice"), Duration::from_secs(60), true, now)
    }

    fn entry(to: &str, body: &str, seq: u64) -> OutboxEntry {
        OutboxEntry {
            id: MessageId::random(),
            to: name(to),
            body: body.into(),
            created_ms: 1,
            seq,
            attempts: 0,
            last_error: None,
        }
    }

    fn inbound(from: &str, seq: u64, while_muted: bool) -> InboundMessage {
        InboundMessage {
            id: MessageId::random(),
            from: name(from),
            body: format!("message {seq}"),
            sent_at_ms: 1,
            received_at_ms: 2,
            seq,
            while_muted,
            via_mailbox: false,
        }
    }

    fn drain(core: &mut Core) -> Vec<Action> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    fn online(core: &mut Core) {
        core.control(ControlEvent::Online {
            observed: SocketAddr::from(([127, 0, 0, 1], 9)),
            new_binding: false,
        });
        core.outbox_read(None, Ok(Vec::new()));
        drain(core);
    }

    fn enqueued(actions: &[Action]) -> Vec<MessageId> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Enqueue { entry, .. } => Some(entry.id),
                _ => None,
            })
            .collect()
    }

    fn receipt_runs(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|action| matches!(action, Action::SendReceipts))
            .count()
    }

    #[test]
    fn receipts_owed_are_sent_by_one_run_at_a_time_while_online() {
        let now = clock();
        let mut core = core(now);
        drain(&mut core);
        // Offline: they stay owed (the registration sends them).
        core.report(Report::ReceiptsDue, now);
        assert_eq!(receipt_runs(&drain(&mut core)), 0);
        core.control(ControlEvent::Online {
            observed: SocketAddr::from(([127, 0, 0, 1], 9)),
            new_binding: false,
        });
        let actions = drain(&mut core);
        assert_eq!(receipt_runs(&actions), 1, "{actions:?}");
        // While a run is under way, a fetch that ends and messages marked shown ask for
        // one more run, after it.
        core.report(Report::FetchDone(Fetched::Done), now);
        core.report(Report::ReceiptsDue, now);
        assert_eq!(receipt_runs(&drain(&mut core)), 0);
        core.report(Report::ReceiptsSent { more: false }, now);
        assert_eq!(receipt_runs(&drain(&mut core)), 1);
        core.report(Report::ReceiptsSent { more: false }, now);
        assert_eq!(receipt_runs(&drain(&mut core)), 0);
        // A run that left receipts unread goes on; the slow timer retries what could not go.
        core.report(Report::ReceiptsDue, now);
        drain(&mut core);
        core.report(Report::ReceiptsSent { more: true }, now);
        assert_eq!(receipt_runs(&drain(&mut core)), 1);
        core.report(Report::ReceiptsSent { more: false }, now);
        core.timeout(later(now, Duration::from_secs(61)));
        assert_eq!(receipt_runs(&drain(&mut core)), 1);
    }

    #[test]
    fn read_receipts_follow_the_switch_and_never_go_for_a_blocked_senders_messages() {
        let now = clock();
        for read_receipts in [true, false] {
            let mut core = Core::new(name("alice"), Duration::from_secs(60), read_receipts, now);
            drain(&mut core);
            let message = inbound("bob", 1, false);
            core.command(Command::Shown {
                shown: vec![(message.id, message.seq)],
                reply: 1,
            });
            assert!(matches!(
                drain(&mut core).as_slice(),
                [Action::Write(Write::Shown { receipts, .. })] if *receipts == read_receipts
            ));
        }
        let mut core = core(now);
        drain(&mut core);
        core.held_read(name("bob"), Ok((vec![inbound("bob", 1, true)], true)));
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Write(Write::Shown {
                receipts: false,
                ..
            })]
        ));
    }

    #[test]
    fn a_receipt_is_told_only_when_it_moved_a_status_and_never_shown_as_a_message() {
        let now = clock();
        let mut core = core(now);
        drain(&mut core);
        let id = MessageId::random();
        core.report(
            Report::Receipt(ReceiptApplied {
                from: name("bob"),
                kind: proto::ReceiptKind::Delivered,
                messages: vec![(id, 5)],
            }),
            now,
        );
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Emit(Event::Receipt { from, messages, .. })]
                if from.as_str() == "bob" && messages == &vec![(id, 5)]
        ));
        core.report(
            Report::Receipt(ReceiptApplied {
                from: name("bob"),
                kind: proto::ReceiptKind::Delivered,
                messages: Vec::new(),
            }),
            now,
        );
        assert!(drain(&mut core).is_empty());
    }

    #[test]
    fn a_resend_request_that_queued_messages_flushes_its_senders_outbox_and_shows_nothing() {
        let now = clock();
        let mut core = core(now);
        drain(&mut core);
        let request = |messages| {
            Report::Receipt(ReceiptApplied {
                from: name("bob"),
                kind: proto::ReceiptKind::Resend,
                messages,
            })
        };
        core.report(request(vec![(MessageId::random(), 5)]), now);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::ReadOutbox(Some(user))] if user.as_str() == "bob"
        ));
        // One that queued nothing (ids not sent to bob, or sent again enough) does nothing.
        core.report(request(Vec::new()), now);
        assert!(drain(&mut core).is_empty());
    }

    #[test]
    fn keys_used_up_by_others_are_topped_up_by_a_task() {
        let now = clock();
        let mut core = core(now);
        drain(&mut core);
        core.report(Report::KeysUsed, now);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::PublishPrekeys]
        ));
    }

    #[test]
    fn bad_sends_are_refused_and_good_ones_recorded_in_one_write_in_order() {
        let now = clock();
        let mut core = core(now);
        let good = [entry("bob", "one", 1), entry("carol", "two", 2)];
        core.command(Command::Send {
            entry: entry("alice", "to myself", 3),
            reply: 1,
        });
        core.command(Command::Send {
            entry: entry("bob", "  ", 4),
            reply: 2,
        });
        core.command(Command::Send {
            entry: entry("bob", &"x".repeat(proto::seal::MAX_BODY_LEN + 1), 5),
            reply: 3,
        });
        core.command(Command::Send {
            entry: good[0].clone(),
            reply: 4,
        });
        core.command(Command::Send {
            entry: good[1].clone(),
            reply: 5,
        });
        core.end_turn();
        let actions = drain(&mut core);
        let refused: Vec<_> = actions
            .iter()
            .filter_map(|action| match action {
                Action::Answer(reply, Err(error)) => Some((*reply, error.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(matches!(
            actions.iter().find(|a| matches!(a, Action::Record(_))),
            Some(Action::Record(entries)) if entries == &good.to_vec()
        ));
        assert_eq!(enqueued(&actions), vec![good[0].id, good[1].id]);
    }

    #[test]
    fn a_later_command_writes_after_the_sends_before_it() {
        let now = clock();
        let mut core = core(now);
        core.command(Command::Send {
            entry: entry("bob", "first", 1),
            reply: 1,
        });
        core.command(Command::Unmute {
            user: name("bob"),
            reply: 2,
        });
        let actions = drain(&mut core);
        let record = actions
            .iter()
            .position(|a| matches!(a, Action::Record(_)))
            .unwrap();
        let unmute = actions
            .iter()
            .position(|a| matches!(a, Action::Write(Write::Unmute { .. })))
            .unwrap();
        assert!(record < unmute);
    }

    #[test]
    fn an_outbox_flush_passes_over_messages_in_flight_and_flushes_again_once_they_finish() {
        let now = clock();
        let mut core = core(now);
        online(&mut core);
        let first = entry("bob", "first", 1);
        core.command(Command::Send {
            entry: first.clone(),
            reply: 1,
        });
        core.end_turn();
        drain(&mut core);
        // A flush while the message is in flight does not send it again.
        core.outbox_read(None, Ok(vec![first.clone()]));
        assert!(enqueued(&drain(&mut core)).is_empty());
        // Once it finishes, bob's outbox is read again (it may have been kept for a retry).
        core.report(Report::Finished(first.id), now);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::ReadOutbox(Some(user))] if user == &name("bob")
        ));
        core.outbox_read(Some(&name("bob")), Ok(vec![first.clone()]));
        assert_eq!(enqueued(&drain(&mut core)), vec![first.id]);
    }

    #[test]
    fn registration_fetches_mail_syncs_blocks_and_flushes_the_outbox() {
        let now = clock();
        let mut core = core(now);
        core.control(ControlEvent::Online {
            observed: SocketAddr::from(([127, 0, 0, 1], 9)),
            new_binding: true,
        });
        let actions = drain(&mut core);
        assert!(actions.iter().any(|a| matches!(a, Action::FetchMail)));
        assert!(actions.iter().any(|a| matches!(a, Action::SyncBlocks)));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::ReadOutbox(None)))
        );
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Emit(Event::Online { .. })))
        );
        let retry = entry("bob", "kept for retry", 1);
        core.outbox_read(None, Ok(vec![retry.clone()]));
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Enqueue { entry, reply: None }] if entry == &retry
        ));
    }

    #[test]
    fn the_user_hears_once_that_the_server_is_gone() {
        let now = clock();
        let mut core = core(now);
        online(&mut core);
        let offline = || ControlEvent::Offline {
            reason: "closed".into(),
            retry_in: Duration::from_secs(1),
        };
        core.control(offline());
        let first = drain(&mut core);
        assert!(first.iter().any(|a| matches!(a, Action::NewLinkGeneration)));
        assert!(
            first
                .iter()
                .any(|a| matches!(a, Action::Emit(Event::Offline { .. })))
        );
        core.control(offline());
        let again = drain(&mut core);
        assert!(
            !again
                .iter()
                .any(|a| matches!(a, Action::Emit(Event::Offline { .. })))
        );
        assert!(!core.online());
    }

    #[test]
    fn one_fetch_at_a_time_and_a_push_during_it_fetches_again_after() {
        let now = clock();
        let mut core = core(now);
        online(&mut core);
        core.report(Report::FetchDone(Fetched::Done), now);
        core.control(ControlEvent::Push(Push::MailWaiting));
        assert!(matches!(drain(&mut core).as_slice(), [Action::FetchMail]));
        core.control(ControlEvent::Push(Push::MailWaiting));
        core.control(ControlEvent::Push(Push::MailWaiting));
        assert!(drain(&mut core).is_empty(), "one fetch at a time");
        core.report(Report::FetchDone(Fetched::Done), now);
        assert!(matches!(drain(&mut core).as_slice(), [Action::FetchMail]));
        core.report(Report::FetchDone(Fetched::Done), now);
        assert!(drain(&mut core).is_empty());
    }

    #[test]
    fn mail_left_for_later_is_fetched_again_after_a_backoff() {
        let now = clock();
        let mut core = core(now);
        online(&mut core);
        core.report(Report::FetchDone(Fetched::LeftForLater), now);
        let due = core.next_deadline(now);
        assert!(
            due > now.at && due <= now.at + FETCH_RETRY_MIN * 2,
            "{due:?}"
        );
        core.timeout(later(now, FETCH_RETRY_MIN * 2));
        assert!(
            drain(&mut core)
                .iter()
                .any(|a| matches!(a, Action::FetchMail))
        );
    }

    #[test]
    fn the_mail_timer_fetches_and_flushes_only_when_online() {
        let now = clock();
        let mut core = core(now);
        core.timeout(later(now, Duration::from_secs(61)));
        assert!(drain(&mut core).is_empty(), "offline: nothing to do");
        online(&mut core);
        core.report(Report::FetchDone(Fetched::Done), now);
        core.timeout(later(now, Duration::from_secs(122)));
        let actions = drain(&mut core);
        assert!(actions.iter().any(|a| matches!(a, Action::FetchMail)));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::ReadOutbox(None)))
        );
    }

    #[test]
    fn a_message_stored_while_muted_waits_for_the_end_of_the_mute() {
        let now = clock();
        let mut core = core(now);
        core.report(
            Report::Muted {
                user: name("bob"),
                until_ms: now.wall_ms + 5_000,
            },
            now,
        );
        core.report(Report::Received(inbound("bob", 1, true)), now);
        assert!(drain(&mut core).is_empty(), "held by the mute");
        let shown = inbound("carol", 2, false);
        core.report(Report::Received(shown.clone()), now);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Emit(Event::Message(message))] if message == &shown
        ));
        // The mute's end is a deadline; at it, the mute is removed, then the held shown.
        let end = later(now, Duration::from_secs(5));
        assert!(core.next_deadline(now) <= end.at);
        core.timeout(end);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Write(Write::EndMutes { .. })]
        ));
        core.report(
            Report::Committed(Committed::EndMutes(Ok(vec![name("bob")]))),
            end,
        );
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::ReadHeld(user)] if user == &name("bob")
        ));
        let held = vec![inbound("bob", 1, true)];
        core.held_read(name("bob"), Ok((held.clone(), false)));
        let actions = drain(&mut core);
        assert!(matches!(
            &actions[0],
            Action::Emit(Event::MuteEnded { user, held: 1 }) if user == &name("bob")
        ));
        assert!(matches!(&actions[1], Action::Emit(Event::Message(m)) if m == &held[0]));
    }

    #[test]
    fn unmute_answers_then_shows_the_held_messages_and_an_unknown_mute_is_an_error() {
        let now = clock();
        let mut core = core(now);
        core.command(Command::Unmute {
            user: name("bob"),
            reply: 7,
        });
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Write(Write::Unmute { reply: 7, .. })]
        ));
        core.report(
            Report::Committed(Committed::Unmute {
                user: name("bob"),
                reply: 7,
                result: Ok(true),
            }),
            now,
        );
        let actions = drain(&mut core);
        assert!(matches!(&actions[0], Action::Answer(7, Ok(()))));
        assert!(matches!(&actions[1], Action::ReadHeld(user) if user == &name("bob")));
        core.report(
            Report::Committed(Committed::Unmute {
                user: name("carol"),
                reply: 8,
                result: Ok(false),
            }),
            now,
        );
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Answer(8, Err(ClientError::NotMuted(_)))]
        ));
    }

    #[test]
    fn messages_held_from_a_user_blocked_since_are_marked_handled_not_shown() {
        let now = clock();
        let mut core = core(now);
        let held = vec![inbound("bob", 1, true), inbound("bob", 2, true)];
        core.held_read(name("bob"), Ok((held.clone(), true)));
        let actions = drain(&mut core);
        assert!(matches!(
            actions.as_slice(),
            [Action::Write(Write::Shown {
                shown,
                reply: None,
                receipts: false
            })]
                if shown == &vec![(held[0].id, 1), (held[1].id, 2)]
        ));
    }

    #[test]
    fn at_start_unshown_messages_are_shown_and_mutes_that_ended_released() {
        let now = clock();
        let mut core = core(now);
        let plain = inbound("carol", 1, false);
        core.start(
            now,
            vec![
                (name("bob"), now.wall_ms - 1),
                (name("dave"), now.wall_ms + 60_000),
            ],
            vec![
                plain.clone(),
                inbound("bob", 2, true),
                inbound("dave", 3, true),
                inbound("erin", 4, true),
            ],
        );
        let actions = drain(&mut core);
        assert!(matches!(
            &actions[0],
            Action::Write(Write::PruneSeen { .. })
        ));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Write(Write::EndMutes { .. })))
        );
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Emit(Event::Message(m)) if m == &plain))
        );
        // erin's mute was ended (by unmute) before the exit: released now; bob's ended
        // meanwhile: released once its removal is durable; dave is still muted.
        let read: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::ReadHeld(user) => Some(user.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(read, vec![name("erin")]);
    }

    #[test]
    fn unblock_is_told_to_the_server_only_when_online() {
        let now = clock();
        let mut core = core(now);
        let unblocked = |reply| {
            Report::Committed(Committed::Unblock {
                user: name("bob"),
                reply,
                result: Ok(true),
            })
        };
        core.report(unblocked(1), now);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Answer(1, Ok(()))]
        ));
        online(&mut core);
        core.report(unblocked(2), now);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::SyncUnblock(_), Action::Answer(2, Ok(()))]
        ));
    }

    #[test]
    fn a_recipient_gets_a_bounded_queue_and_the_rest_wait_in_order() {
        let now = clock();
        let mut core = core(now);
        let entries: Vec<_> = (0..RECIPIENT_QUEUE + 3)
            .map(|seq| entry("bob", "hi", seq as u64))
            .collect();
        core.outbox_read(None, Ok(entries.clone()));
        let handed = enqueued(&drain(&mut core));
        assert_eq!(handed.len(), RECIPIENT_QUEUE);
        for (index, entry) in entries.iter().take(3).enumerate() {
            core.report(Report::Finished(entry.id), now);
            assert_eq!(
                enqueued(&drain(&mut core)),
                vec![entries[RECIPIENT_QUEUE + index].id],
                "each finished message makes room for the next waiting one"
            );
        }
    }

    #[test]
    fn a_recipient_idle_for_a_while_has_its_task_retired() {
        let now = clock();
        let mut core = Core::new(name("alice"), Duration::from_secs(3600), true, now);
        let message = entry("bob", "hi", 1);
        core.outbox_read(None, Ok(vec![message.clone()]));
        drain(&mut core);
        core.report(Report::Finished(message.id), now);
        drain(&mut core);
        assert_eq!(core.next_deadline(now), now.at + RECIPIENT_IDLE);
        core.timeout(later(now, RECIPIENT_IDLE));
        assert!(
            drain(&mut core)
                .iter()
                .any(|a| matches!(a, Action::Retire(user) if user == &name("bob")))
        );
    }

    #[test]
    fn trust_sends_the_users_outbox_and_opens_the_held_mail() {
        let now = clock();
        let mut core = core(now);
        core.report(Report::Trusted(name("bob")), now);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::ReadOutbox(Some(a)), Action::ReopenHeld(b)] if a == &name("bob") && b == &name("bob")
        ));
    }

    fn watched(actions: &[Action]) -> Vec<Username> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Watch(users) => Some(users.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn each_registration_watches_the_contacts_less_the_blocked() {
        let now = clock();
        let mut core = core(now);
        core.contacts_read(Ok((
            vec![name("bob"), name("carol"), name("mallory")],
            vec![name("mallory")],
        )));
        for _ in 0..2 {
            core.control(ControlEvent::Online {
                observed: SocketAddr::from(([127, 0, 0, 1], 9)),
                new_binding: false,
            });
            assert_eq!(watched(&drain(&mut core)), vec![name("bob"), name("carol")]);
        }
    }

    #[test]
    fn someone_new_written_to_is_watched_once_and_only_while_online() {
        let now = clock();
        let mut core = core(now);
        core.contacts_read(Ok((Vec::new(), Vec::new())));
        // Offline: nothing is asked now; the next registration sends the whole set.
        core.command(Command::Send {
            entry: entry("dave", "hello", 10),
            reply: 10,
        });
        core.end_turn();
        assert_eq!(watched(&drain(&mut core)), Vec::<Username>::new());
        online(&mut core);
        core.command(Command::Send {
            entry: entry("bob", "hi", 1),
            reply: 1,
        });
        core.command(Command::Send {
            entry: entry("bob", "again", 2),
            reply: 2,
        });
        core.end_turn();
        assert_eq!(watched(&drain(&mut core)), vec![name("bob")]);
        // Someone who only wrote to this user is not watched: a stranger's message does
        // not buy them this user's presence.
        core.report(Report::Received(inbound("carol", 2, false)), now);
        assert_eq!(watched(&drain(&mut core)), Vec::<Username>::new());
    }

    #[test]
    fn a_block_unwatches_and_an_unblock_watches_again() {
        let now = clock();
        let mut core = core(now);
        core.contacts_read(Ok((vec![name("bob")], Vec::new())));
        online(&mut core);
        core.report(Report::Blocked(name("bob")), now);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Action::Unwatch(users)] if users == &vec![name("bob")]
        ));
        // A blocked user's messages do not make them a contact again.
        core.command(Command::Send {
            entry: entry("bob", "still sending", 1),
            reply: 1,
        });
        core.end_turn();
        assert_eq!(watched(&drain(&mut core)), Vec::<Username>::new());
        core.committed(Committed::Unblock {
            user: name("bob"),
            reply: 2,
            result: Ok(true),
        });
        assert_eq!(watched(&drain(&mut core)), vec![name("bob")]);
    }

    #[test]
    fn contact_presence_and_another_session_become_events() {
        let now = clock();
        let mut core = core(now);
        let observed = SocketAddr::from(([192, 0, 2, 7], 4000));
        core.control(ControlEvent::Push(Push::Presence {
            user: name("bob"),
            online: true,
        }));
        core.control(ControlEvent::Push(Push::SessionElsewhere {
            observed,
            at_ms: 5,
        }));
        let actions = drain(&mut core);
        assert!(matches!(
            actions.as_slice(),
            [
                Action::Emit(Event::Presence { user, online: true }),
                Action::Emit(Event::SessionElsewhere { observed: seen, at_ms: 5 }),
            ] if user == &name("bob") && *seen == observed
        ));
    }

    #[test]
    fn a_server_that_refuses_watch_requests_is_not_asked_again() {
        let now = clock();
        let mut core = core(now);
        core.contacts_read(Ok((vec![name("bob")], Vec::new())));
        online(&mut core);
        core.report(Report::WatchRefused, now);
        core.control(ControlEvent::Online {
            observed: SocketAddr::from(([127, 0, 0, 1], 9)),
            new_binding: false,
        });
        core.report(Report::Received(inbound("carol", 1, false)), now);
        assert_eq!(watched(&drain(&mut core)), Vec::<Username>::new());
    }
}
