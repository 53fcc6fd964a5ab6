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
//!
//! The parts: the loop and its inputs here ([`Shell::run`]); doing the core's actions
//! (`actions`: tasks, writes, the recipients' queues); and the commands that need the
//! server or the disk, run as tasks (`commands`).

mod actions;
mod commands;

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use proto::{MessageId, Username};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{ClientError, Event, OnlineUsers, SendReport, Status, WhoisReport},
    context::{Context, MailState},
    control::ControlEvent,
    core::{self, Core, Lift, Now, ReplyId, Report, Restriction},
    inbox,
    outgoing::Job,
    state::{HistoryEntry, Ticket},
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
            Command::Unmute { user, reply } => core::Command::Lift(Lift {
                restriction: Restriction::Mute,
                user,
                reply: self.wait(Waiting::Done(reply)),
            }),
            Command::Unblock { user, reply } => core::Command::Lift(Lift {
                restriction: Restriction::Block,
                user,
                reply: self.wait(Waiting::Done(reply)),
            }),
            command => core::Command::Task {
                reply: self.wait(Waiting::Task(command)),
            },
        };
        self.core.command(command);
    }
}
