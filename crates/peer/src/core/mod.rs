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
//! the unit tests (`tests`) without a runtime, a socket or a disk.
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
//!   is answered by a few batched receipts), after held mail is opened again after
//!   `trust`, after messages are marked shown (read receipts, when on; never for messages
//!   of a blocked sender marked handled unshown), on registration (what was owed before an exit or a crash) and on the slow timer (what
//!   could not go). A user a run left receipts due to (their route failed) is passed over
//!   until their retry ([`ReceiptRetry`]: 5 s, doubling after each failed run up to 10
//!   minutes, back to the start once nothing is left due to them), which runs them again
//!   when it comes; a registration (the server back) and a `trust` of them try them at
//!   once. Their receipts stay due all along. A receipt received moves the status of the messages it names and is
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
//! The module's parts: the inputs (`inputs`: [`Command`], [`Report`], [`Committed`],
//! [`Fetched`], [`Lift`]) and the outputs (`actions`: [`Action`], [`Write`]) the shell and
//! the core exchange; when receipts to a user whose route failed are tried again
//! (`receipt_retry`: [`ReceiptRetry`]); the per-recipient queues (`recipients`: what is
//! handed to each recipient's task, what waits for room there, what an outbox flush passed
//! over, which task is idle), a state machine of their own that answers in actions; and
//! [`Core`] here. The other
//! rules stay in one `impl Core`: they share its state (whether online, the mutes, the
//! fetch and receipt runs, the contacts) and each input touches several of them, so
//! splitting them would scatter one input's handling over files.
//!
//! **Architecture Invariant:** this module imports no I/O (no tokio, no sockets, no state
//! file): inputs in, actions out.

mod actions;
mod inputs;
mod receipt_retry;
mod recipients;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use durable::Backoff;
use proto::{ErrorReply, Push, Username};

pub(crate) use self::{
    actions::{Action, Write},
    inputs::{Command, Committed, Fetched, Lift, ReceiptRun, ReplyId, Report, Restriction},
};
use self::{receipt_retry::ReceiptRetry, recipients::Recipients};
use crate::{
    api::{ClientError, Event, Status},
    contacts::Contacts,
    control::ControlEvent,
    state::{InboundMessage, OutboxEntry, StateError},
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

/// The connection to the server, as far as the core cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connecting,
    Online,
    Offline,
    Fatal,
}

/// How often a running client forgets the seen ids and the counts of requests to send
/// again that are past the retention (it also does at every start): a client left running
/// for weeks keeps both tables bounded.
pub(crate) const PRUNE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The event loop's state machine: see the module docs.
#[derive(Debug)]
pub(crate) struct Core {
    me: Username,
    link: Link,
    actions: VecDeque<Action>,
    /// Sends of this turn, recorded at its end (or before the next other command).
    unrecorded: Vec<(OutboxEntry, ReplyId)>,
    /// The messages handed to recipients' tasks or waiting for room there.
    recipients: Recipients,
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
    /// When receipts to users whose route failed are tried again.
    receipt_retry: ReceiptRetry,
    /// When the seen ids and resend counts past the retention are next forgotten.
    prune_at: Instant,
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
            recipients: Recipients::default(),
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
            receipt_retry: ReceiptRetry::default(),
            prune_at: now.at + PRUNE_EVERY,
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
        self.recipients.waiting() < MAX_WAITING
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
            Command::Lift(lift) => self.actions.push_back(Action::Write(Write::Lift(lift))),
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
            self.recipients
                .enqueue(entry, Some(reply), &mut self.actions);
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
                // What failed while the server was away may go now: every user is tried.
                self.receipt_retry.clear();
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
            Report::ReceiptsSent(run) => {
                self.sending_receipts = false;
                for user in &run.went {
                    self.receipt_retry.succeeded(user);
                }
                for user in run.failed {
                    self.receipt_retry.failed(user, now.at);
                }
                // The users who failed are passed over by the next run, so `more` makes
                // progress: it reads receipts due to others.
                if std::mem::take(&mut self.receipts_again) || run.more {
                    self.send_receipts();
                }
            }
            Report::Notify(event) => self.emit(event),
            Report::Finished(id) => self.recipients.finished(id, now.at, &mut self.actions),
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
                // Receipts owed to them waited for this `trust`: they go now.
                self.receipt_retry.succeeded(&user);
                self.send_receipts();
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
            Committed::Lifted {
                lift:
                    Lift {
                        restriction,
                        user,
                        reply,
                    },
                result,
            } => match (restriction, result) {
                (Restriction::Mute, Ok(true)) => {
                    self.mutes.remove(&user);
                    self.actions.push_back(Action::Answer(reply, Ok(())));
                    self.actions.push_back(Action::ReadHeld(user));
                }
                (Restriction::Block, Ok(true)) => {
                    if self.contacts.unblocked(user.clone()) && self.asks_presence() {
                        self.actions.push_back(Action::Watch(vec![user.clone()]));
                    }
                    if self.online() {
                        self.actions.push_back(Action::SyncUnblock(user));
                    }
                    self.actions.push_back(Action::Answer(reply, Ok(())));
                }
                (Restriction::Mute, Ok(false)) => {
                    self.actions
                        .push_back(Action::Answer(reply, Err(ClientError::NotMuted(user))));
                }
                (Restriction::Block, Ok(false)) => {
                    self.actions
                        .push_back(Action::Answer(reply, Err(ClientError::NotBlocked(user))));
                }
                (_, Err(error)) => self
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
        match outbox {
            Ok(outbox) => self.recipients.outbox_read(only, outbox, &mut self.actions),
            Err(error) => self.state_error(&error),
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
        if let Some(at) = self.recipients.next_retirement() {
            next = next.min(at);
        }
        if let Some(at) = self.receipt_retry.next_retry() {
            next = next.min(at);
        }
        next.min(self.prune_at)
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
        if self.receipt_retry.take_due(now.at) {
            self.send_receipts();
        }
        if now.at >= self.prune_at {
            self.prune_at = now.at + PRUNE_EVERY;
            self.actions.push_back(Action::Write(Write::PruneSeen {
                now_ms: now.wall_ms,
            }));
        }
        self.take_ended_mutes(now);
        self.recipients.retire_idle(now.at, &mut self.actions);
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
    /// run is under way (then once more after it); receipts to users waiting for their
    /// retry ([`ReceiptRetry`]) stay due, passed over.
    fn send_receipts(&mut self) {
        if !self.online() {
            return;
        }
        if self.sending_receipts {
            self.receipts_again = true;
            return;
        }
        self.sending_receipts = true;
        self.actions.push_back(Action::SendReceipts {
            pass_over: self.receipt_retry.waiting(),
        });
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
