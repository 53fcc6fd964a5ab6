//! The async shell around [`crate::core`]: it owns every socket, timer, task and state write,
//! feeds the core its inputs and does what the core's actions say.
//!
//! One task runs the loop, a `biased` `select!` with cancellation first, over: the marks of
//! shown messages, the P2P listener (each accepted connection is served by a tracked task,
//! see [`crate::inbox`]), the control actor's events, the reports of tasks and writes, the
//! user's commands, and the core's next deadline. After each input it takes the core's
//! actions until there are none. Nothing here waits on the network or on a commit: slow
//! work is spawned on the [`TaskTracker`] and reports back ([`Report`]), and every state
//! write is submitted and its [`durable::Ticket`] awaited by a tracked task that reports the
//! result, so a misbehaving peer or a slow disk stalls only its own task.
//!
//! Bounded, with a stated behaviour when full:
//! - user commands ([`COMMANDS_QUEUED`]): `send` and the others wait for room; the loop
//!   stops taking commands while [`crate::core::MAX_WAITING`] messages wait for their
//!   recipients;
//! - events ([`EVENTS_QUEUED`]): when the application does not take them, the events of the
//!   current input wait here and the loop takes no new input (except marks of shown
//!   messages and cancellation) until there is room; tasks then wait on their reports, and
//!   their peers on them;
//! - reports ([`crate::context::REPORTS_QUEUED`]), control events ([`CONTROL_QUEUED`]) and
//!   each recipient's queue ([`crate::core::RECIPIENT_QUEUE`]): the sender waits, except
//!   the recipient queues, which the core never overfills.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use proto::{MessageId, PublicKeys, Reply, Request, Username};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{ClientError, Event, OnlineUsers, SEEN_RETENTION_MS, SendReport, Status, WhoisReport},
    context::{Context, MailState},
    control::{ControlError, ControlEvent},
    core::{self, Action, Committed, Core, Now, ReplyId, Report, Write},
    inbox,
    outgoing::{self, Job},
    prekeys, receipts,
    state::{HistoryEntry, InboundMessage, OutboxEntry, State, StateError, Ticket},
};

/// The most user commands waiting for the loop.
pub(crate) const COMMANDS_QUEUED: usize = 64;

/// The most marks of shown messages waiting for the loop.
pub(crate) const SHOWN_QUEUED: usize = 64;

/// The most events waiting for the application.
pub(crate) const EVENTS_QUEUED: usize = 4096;

/// The most control connection events waiting for the loop.
pub(crate) const CONTROL_QUEUED: usize = 64;

/// The most user commands handled in one turn of the loop (their sends share one write).
const MAX_COMMANDS_PER_TURN: usize = 1024;

/// The most inbound peer connections served at once.
pub const MAX_INBOUND_CONNECTIONS: usize = 256;

/// Where a command's answer goes.
pub(crate) type Reply_<T> = oneshot::Sender<Result<T, ClientError>>;

/// A command from a [`crate::Client`].
pub(crate) enum Command {
    Send {
        to: Username,
        body: String,
        reply: Reply_<SendReport>,
    },
    List {
        reply: Reply_<OnlineUsers>,
    },
    Block {
        user: Username,
        reply: Reply_<()>,
    },
    Unblock {
        user: Username,
        reply: Reply_<()>,
    },
    Blocked {
        reply: Reply_<Vec<Username>>,
    },
    Mute {
        user: Username,
        seconds: u64,
        reply: Reply_<u64>,
    },
    Unmute {
        user: Username,
        reply: Reply_<()>,
    },
    Whois {
        user: Username,
        reply: Reply_<WhoisReport>,
    },
    Trust {
        user: Username,
        reply: Reply_<String>,
    },
    History {
        user: Username,
        limit: usize,
        reply: Reply_<Vec<HistoryEntry>>,
    },
}

/// Messages shown by the application: (id, history position) of each. On a channel of its
/// own, which the loop always reads: an application that marks what it showed before it
/// takes the next events never waits on a loop that waits for it to take them.
pub(crate) struct Shown {
    pub(crate) shown: Vec<(MessageId, u64)>,
    pub(crate) reply: Reply_<()>,
}

/// A command waiting for its answer, under the id the core knows it by.
enum Waiting {
    Send(Reply_<SendReport>),
    Done(Reply_<()>),
    /// Run by a task once the core says so.
    Task(Command),
}

/// What the shell reads from and writes to.
pub(crate) struct Channels {
    pub(crate) control: mpsc::Receiver<ControlEvent>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) shown: mpsc::Receiver<Shown>,
    pub(crate) reports: mpsc::Receiver<Report>,
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) status: watch::Sender<Status>,
}

/// The shell: see the module docs.
pub(crate) struct Shell {
    core: Core,
    context: Arc<Context>,
    listener: TcpListener,
    channels: Channels,
    /// Events of the current input the application has no room for yet.
    backlog: VecDeque<Event>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The queue of each recipient's delivery task ([`crate::outgoing`]).
    recipients: HashMap<Username, mpsc::Sender<Job>>,
    /// New messages' outbox records, until their messages are handed to their tasks.
    records: HashMap<MessageId, Ticket<()>>,
    waiting: HashMap<ReplyId, Waiting>,
    next_reply: ReplyId,
    /// Caps concurrent inbound peer connections.
    inbound_slots: Arc<tokio::sync::Semaphore>,
    /// Inbound connections refused at the cap so far.
    refused_connections: u64,
    /// A registration waits for its prekeys to be published (see
    /// [`Shell::publish_prekeys`]): control events wait meanwhile.
    registering: bool,
}

/// Now, for the core.
fn now() -> Now {
    Now {
        at: std::time::Instant::now(),
        wall_ms: proto::now_ms(),
    }
}

impl Shell {
    pub(crate) fn new(
        context: Arc<Context>,
        listener: TcpListener,
        channels: Channels,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let core = Core::new(
            context.me.clone(),
            context.config.mail_poll_interval,
            context.config.read_receipts,
            now(),
        );
        Self {
            core,
            context,
            listener,
            channels,
            backlog: VecDeque::new(),
            tracker,
            shutdown,
            recipients: HashMap::new(),
            records: HashMap::new(),
            waiting: HashMap::new(),
            next_reply: 0,
            inbound_slots: Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_CONNECTIONS)),
            refused_connections: 0,
            registering: false,
        }
    }

    pub(crate) async fn run(mut self) {
        self.start();
        loop {
            let paused = !self.backlog.is_empty();
            let take_commands = !paused && self.core.accepts_commands();
            let deadline = tokio::time::Instant::from_std(self.core.next_deadline(now()));
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                permit = self.channels.events.clone().reserve_owned(), if paused => match permit {
                    Ok(permit) => {
                        if let Some(event) = self.backlog.pop_front() {
                            permit.send(event);
                        }
                    }
                    // Nobody takes events any more.
                    Err(_) => self.backlog.clear(),
                },
                Some(Shown { shown, reply }) = self.channels.shown.recv() => {
                    let reply = self.wait(Waiting::Done(reply));
                    self.core.command(core::Command::Shown { shown, reply });
                    self.core.end_turn();
                }
                accepted = self.listener.accept(), if !paused => match accepted {
                    Ok((stream, addr)) => match self.inbound_slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            let context = self.context.clone();
                            let shutdown = self.shutdown.clone();
                            self.tracker.spawn(async move {
                                inbox::serve(stream, addr, context, shutdown).await;
                                drop(slot);
                            });
                        }
                        // At the cap, new connections are closed at once: a flood of
                        // connections cannot exhaust this process's file descriptors. Logged
                        // at the 1st, 2nd, 4th, 8th... refusal, so the flood cannot flood
                        // the log either.
                        Err(_) => {
                            self.refused_connections += 1;
                            if self.refused_connections.is_power_of_two() {
                                tracing::warn!(%addr, total = self.refused_connections, "too many peer connections; refused");
                            }
                        }
                    },
                    Err(error) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(event) = self.channels.control.recv(), if !paused && !self.registering => {
                    if matches!(event, ControlEvent::Online { .. }) {
                        // Mail may be waiting again: direct envelopes wait until it is in.
                        self.context.mail.send_replace(MailState::Unknown);
                        self.publish_prekeys(event);
                    } else {
                        self.core.control(event);
                    }
                }
                Some(report) = self.channels.reports.recv(), if !paused => match report {
                    Report::Registered(event) => {
                        self.registering = false;
                        self.core.control(event);
                    }
                    report => self.core.report(report, now()),
                },
                Some(command) = self.channels.commands.recv(), if take_commands => {
                    // Commands already waiting are handled in the same turn, so the sends
                    // among them are recorded by one write.
                    self.command(command);
                    for _ in 1..MAX_COMMANDS_PER_TURN {
                        let Ok(command) = self.channels.commands.try_recv() else { break };
                        self.command(command);
                    }
                    self.core.end_turn();
                }
                () = tokio::time::sleep_until(deadline), if !paused => self.core.timeout(now()),
            }
            self.act();
        }
        tracing::debug!("event loop stopped");
    }

    /// Feeds the core what was stored before this start.
    fn start(&mut self) {
        let state = &self.context.state;
        let read = state
            .mutes()
            .and_then(|mutes| Ok((mutes, state.unshown()?)));
        match read {
            Ok((mutes, unshown)) => self.core.start(now(), mutes, unshown),
            Err(error) => self.core.state_error(&error),
        }
        let contacts = state
            .written_to()
            .and_then(|written_to| Ok((written_to, state.blocked()?)));
        self.core.contacts_read(contacts);
        self.act();
    }

    fn wait(&mut self, waiting: Waiting) -> ReplyId {
        self.next_reply += 1;
        self.waiting.insert(self.next_reply, waiting);
        self.next_reply
    }

    fn command(&mut self, command: Command) {
        let command = match command {
            Command::Send { to, body, reply } => {
                let entry = self
                    .context
                    .state
                    .prepare_outgoing(&to, &body, proto::now_ms());
                let reply = self.wait(Waiting::Send(reply));
                core::Command::Send { entry, reply }
            }
            Command::Unmute { user, reply } => core::Command::Unmute {
                user,
                reply: self.wait(Waiting::Done(reply)),
            },
            Command::Unblock { user, reply } => core::Command::Unblock {
                user,
                reply: self.wait(Waiting::Done(reply)),
            },
            command => core::Command::Task {
                reply: self.wait(Waiting::Task(command)),
            },
        };
        self.core.command(command);
    }

    /// Does what the core says, until it says nothing more.
    fn act(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Emit(event) => self.emit(event),
                Action::Status(status) => {
                    self.channels.status.send_replace(status);
                }
                Action::Answer(reply, result) => match self.waiting.remove(&reply) {
                    Some(Waiting::Done(reply)) => {
                        let _ = reply.send(result);
                    }
                    Some(Waiting::Send(reply)) => {
                        if let Err(error) = result {
                            let _ = reply.send(Err(error));
                        }
                    }
                    Some(Waiting::Task(_)) | None => {}
                },
                Action::Run(reply) => {
                    if let Some(Waiting::Task(command)) = self.waiting.remove(&reply) {
                        self.spawn_command(command);
                    }
                }
                Action::Record(entries) => {
                    let ids: Vec<MessageId> = entries.iter().map(|entry| entry.id).collect();
                    let tickets = self.context.state.submit_outgoing(entries);
                    self.records.extend(ids.into_iter().zip(tickets));
                }
                Action::Enqueue { entry, reply } => self.enqueue(entry, reply),
                Action::Retire(user) => {
                    // Its task ends once it has finished what it was given (nothing).
                    self.recipients.remove(&user);
                }
                Action::Write(write) => self.write(write),
                Action::ReadOutbox(only) => {
                    let outbox = self.context.state.outbox();
                    self.core.outbox_read(only.as_ref(), outbox);
                }
                Action::ReadHeld(user) => {
                    let held = read_held(&self.context.state, &user);
                    self.core.held_read(user, held);
                }
                Action::FetchMail => {
                    let context = self.context.clone();
                    self.tracker.spawn(async move {
                        let fetched = inbox::fetch_mail(&context).await;
                        context.report(Report::FetchDone(fetched)).await;
                    });
                }
                Action::PublishPrekeys => {
                    let context = self.context.clone();
                    self.tracker
                        .spawn(async move { prekeys::publish(&context).await });
                }
                Action::SendReceipts { pass_over } => {
                    let context = self.context.clone();
                    self.tracker.spawn(async move {
                        let run = receipts::send_due(&context, &pass_over).await;
                        context.report(Report::ReceiptsSent(run)).await;
                    });
                }
                Action::SyncBlocks => self.sync_blocks(),
                Action::SyncUnblock(user) => {
                    let context = self.context.clone();
                    self.tracker
                        .spawn(async move { sync_block(&context, &user, false).await });
                }
                Action::ReopenHeld(user) => {
                    let context = self.context.clone();
                    self.tracker
                        .spawn(async move { inbox::reopen_held(&context, &user).await });
                }
                Action::Watch(users) => self.watch(Request::Watch { users }),
                Action::Unwatch(users) => self.watch(Request::Unwatch { users }),
                Action::NewLinkGeneration => {
                    self.context.link_generation.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// After a registration (`online`), publishes (and tops up) the keys others start
    /// sessions with, in a task of its own, and only then lets the core hear of the
    /// registration (so "online" means others can start sessions now). Meanwhile the next
    /// control events wait, in order.
    fn publish_prekeys(&mut self, online: ControlEvent) {
        self.registering = true;
        let context = self.context.clone();
        self.tracker.spawn(async move {
            prekeys::publish(&context).await;
            context.report(Report::Registered(online)).await;
        });
    }

    fn emit(&mut self, event: Event) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(event);
            return;
        }
        match self.channels.events.try_send(event) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(event)) => self.backlog.push_back(event),
        }
    }

    /// Hands `entry` to its recipient's task (started on first use).
    fn enqueue(&mut self, entry: OutboxEntry, reply: Option<ReplyId>) {
        let reply = match reply.and_then(|reply| self.waiting.remove(&reply)) {
            Some(Waiting::Send(reply)) => Some(reply),
            _ => None,
        };
        let to = entry.to.clone();
        let job = Job {
            recorded: self.records.remove(&entry.id),
            entry,
            reply,
        };
        let queue = self.recipients.entry(to.clone()).or_insert_with(|| {
            outgoing::spawn(
                self.context.clone(),
                to.clone(),
                &self.tracker,
                self.shutdown.clone(),
            )
        });
        // The core hands a task no more than its queue holds, so it is never full; closed,
        // the task has stopped (only at shutdown).
        if let Err(error) = queue.try_send(job) {
            let job = match error {
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => {
                    job
                }
            };
            self.recipients.remove(&to);
            if let Some(reply) = job.reply {
                let _ = reply.send(Err(ClientError::ShuttingDown));
            }
            self.core.report(Report::Finished(job.entry.id), now());
        }
    }

    /// Submits `write` now, in order with the others, and reports its result once durable.
    fn write(&mut self, write: Write) {
        let state = &self.context.state;
        match write {
            Write::PruneSeen { now_ms } => {
                let pruned = state.prune_seen(now_ms, SEEN_RETENTION_MS);
                self.report_when(async move { Committed::PruneSeen(pruned.await) });
            }
            Write::EndMutes { now_ms } => {
                let ended = state.take_ended_mutes(now_ms);
                self.report_when(async move { Committed::EndMutes(ended.await) });
            }
            Write::Unmute { user, reply } => {
                let unmuted = state.unmute(&user);
                self.report_when(async move {
                    Committed::Unmute {
                        user,
                        reply,
                        result: unmuted.await,
                    }
                });
            }
            Write::Unblock { user, reply } => {
                let unblocked = state.unblock(&user);
                self.report_when(async move {
                    Committed::Unblock {
                        user,
                        reply,
                        result: unblocked.await,
                    }
                });
            }
            // Answered by the task itself, not through the reports: see `Write::Shown`.
            Write::Shown {
                shown,
                reply,
                receipts,
            } => {
                let marked = state.submit_shown(shown, receipts);
                let context = self.context.clone();
                let reply = match reply.and_then(|reply| self.waiting.remove(&reply)) {
                    Some(Waiting::Done(reply)) => Some(reply),
                    _ => None,
                };
                self.tracker.spawn(async move {
                    let result = marked.await;
                    let due = receipts && result.is_ok();
                    match reply {
                        Some(reply) => {
                            let _ = reply.send(result.map_err(Into::into));
                        }
                        None => {
                            if let Err(error) = result {
                                tracing::warn!(%error, "could not mark a blocked user's held messages");
                            }
                        }
                    }
                    // After the answer: the loop may be waiting for the application,
                    // which waits for this answer, before it reads reports again.
                    if due {
                        context.report(Report::ReceiptsDue).await;
                    }
                });
            }
        }
    }

    fn report_when(&self, committed: impl Future<Output = Committed> + Send + 'static) {
        let context = self.context.clone();
        self.tracker.spawn(async move {
            let committed = committed.await;
            context.report(Report::Committed(committed)).await;
        });
    }

    /// Sends a watch or unwatch request in a task. A failure is left be: the server forgets
    /// a session's watch set with its connection, and the next registration sends it all;
    /// but a server that closed the connection at it as malformed (an older version) is
    /// reported, and not asked again.
    fn watch(&self, request: Request) {
        let context = self.context.clone();
        self.tracker.spawn(async move {
            match context.control.request(request).await {
                Ok(_) => {}
                Err(error) if error.code() == Some(proto::ErrorCode::BadRequest) => {
                    context.report(Report::WatchRefused).await;
                }
                Err(error) => {
                    tracing::info!(%error, "watch request not answered; sent again at the next registration");
                }
            }
        });
    }

    fn sync_blocks(&mut self) {
        let pending = match self.context.state.unsynced_blocks() {
            Ok(pending) if !pending.is_empty() => pending,
            Ok(_) => return,
            Err(error) => return self.core.state_error(&error),
        };
        let context = self.context.clone();
        self.tracker.spawn(async move {
            for (user, active) in pending {
                sync_block(&context, &user, active).await;
            }
        });
    }

    fn spawn_command(&self, command: Command) {
        let context = self.context.clone();
        self.tracker.spawn(async move {
            match command {
                Command::List { reply } => {
                    let result = match context.control.request(Request::List).await {
                        Ok(Reply::Users(users)) => Ok(OnlineUsers { users, more: 0 }),
                        Ok(Reply::UsersCapped { users, more }) => Ok(OnlineUsers { users, more }),
                        Ok(_) => Err(ControlError::Unexpected.into()),
                        Err(error) => Err(error.into()),
                    };
                    let _ = reply.send(result);
                }
                Command::Block { user, reply } => {
                    let result = block(&context, &user).await;
                    if result.is_ok() {
                        context.report(Report::Blocked(user)).await;
                    }
                    let _ = reply.send(result);
                }
                Command::Blocked { reply } => {
                    let _ = reply.send(context.state.blocked().map_err(Into::into));
                }
                Command::Mute {
                    user,
                    seconds,
                    reply,
                } => {
                    let result = mute(&context, &user, seconds).await;
                    if let Ok(until_ms) = result {
                        context
                            .report(Report::Muted {
                                user: user.clone(),
                                until_ms,
                            })
                            .await;
                    }
                    let _ = reply.send(result);
                }
                Command::Whois { user, reply } => {
                    let _ = reply.send(whois(&context, &user).await);
                }
                Command::Trust { user, reply } => {
                    let result = trust(&context, &user).await;
                    if result.is_ok() {
                        context.report(Report::Trusted(user)).await;
                    }
                    let _ = reply.send(result);
                }
                // Read once every write submitted before it is durable: a send's result is
                // answered before it is recorded (see `crate::outgoing`), and the history
                // must show it.
                Command::History { user, limit, reply } => {
                    let result = match context.state.barrier().await {
                        Ok(()) => context.state.history(&user, limit).map_err(Into::into),
                        Err(error) => Err(error.into()),
                    };
                    let _ = reply.send(result);
                }
                // Handled by the core; never run as tasks.
                Command::Send { .. } | Command::Unmute { .. } | Command::Unblock { .. } => {}
            }
        });
    }
}

/// The messages `user`'s mute held, and whether `user` is blocked.
fn read_held(state: &State, user: &Username) -> Result<(Vec<InboundMessage>, bool), StateError> {
    let held = state
        .unshown()?
        .into_iter()
        .filter(|message| &message.from == user && message.while_muted)
        .collect();
    Ok((held, state.is_blocked(user)?))
}

/// Checks that `user` exists: pinned here, or known to the server. Offline, a name that is
/// not pinned is taken on trust (blocking or muting someone is harmless either way).
async fn check_known(context: &Context, user: &Username) -> Result<(), ClientError> {
    if user == &context.me {
        return Err(ClientError::Yourself);
    }
    if context.state.pinned(user)?.is_some() {
        return Ok(());
    }
    match context.lookup(user).await {
        Ok(_) | Err(ClientError::Control(_)) => Ok(()),
        Err(error) => Err(error),
    }
}

async fn block(context: &Context, user: &Username) -> Result<(), ClientError> {
    check_known(context, user).await?;
    if !context.state.block(user).await? {
        return Err(ClientError::AlreadyBlocked(user.clone()));
    }
    sync_block(context, user, true).await;
    Ok(())
}

/// Tells the server about a block or unblock; on success records that it knows. Offline,
/// the change stays pending and is sent at the next registration.
async fn sync_block(context: &Context, user: &Username, active: bool) {
    let request = if active {
        Request::Block { user: user.clone() }
    } else {
        Request::Unblock { user: user.clone() }
    };
    match context.control.request(request).await {
        Ok(_) => {
            if let Err(error) = context.state.block_synced(user, active).await {
                tracing::error!(%error, "state error");
            }
        }
        Err(error) => tracing::info!(%user, %error, "block change not yet at the server"),
    }
}

async fn mute(context: &Context, user: &Username, seconds: u64) -> Result<u64, ClientError> {
    if seconds == 0 {
        return Err(ClientError::BadDuration);
    }
    check_known(context, user).await?;
    let until = proto::now_ms().saturating_add(seconds.saturating_mul(1000));
    context.state.mute(user, until).await?;
    Ok(until)
}

async fn whois(context: &Context, user: &Username) -> Result<WhoisReport, ClientError> {
    let pinned = context.state.pinned(user)?;
    let server = match context.lookup(user).await {
        Ok(info) => Some(info),
        Err(ClientError::Control(_)) if pinned.is_some() => None,
        Err(error) => return Err(error),
    };
    let mine = (&context.me, context.identity.public());
    let number = |keys: &PublicKeys| proto::identity::safety_number(mine, (user, keys));
    // The keys `trust` would pin are the server's: that is the number to compare.
    let shown_keys = server.as_ref().map(|info| &info.keys).or(pinned.as_ref());
    let key_changed =
        matches!((&pinned, &server), (Some(pinned), Some(info)) if pinned != &info.keys);
    Ok(WhoisReport {
        user: user.clone(),
        my_fingerprint: context.identity.public().fingerprint(),
        pinned_fingerprint: pinned.as_ref().map(PublicKeys::fingerprint),
        server_fingerprint: server.as_ref().map(|info| info.keys.fingerprint()),
        safety_number: shown_keys.map(number),
        pinned_safety_number: pinned.as_ref().filter(|_| key_changed).map(number),
        key_changed,
        online: server.as_ref().map(|info| info.online),
        last_seen_ms: server.as_ref().and_then(|info| info.last_seen_ms),
    })
}

async fn trust(context: &Context, user: &Username) -> Result<String, ClientError> {
    if user == &context.me {
        return Err(ClientError::Yourself);
    }
    let info = context.lookup(user).await?;
    info.keys.verify().map_err(|error| ClientError::BadKeys {
        user: user.clone(),
        reason: error.to_string(),
    })?;
    context.state.repin(user, &info.keys).await?;
    Ok(info.keys.fingerprint())
}
