//! Doing what the core's actions say: emitting, answering, spawning the tasks that need the
//! network, handing messages to their recipients' tasks, and submitting the writes.

use std::{future::Future, sync::atomic::Ordering};

use proto::{MessageId, Request, Username};
use tokio::sync::mpsc;

use super::{Shell, Waiting, commands::sync_block, now};
use crate::{
    api::{ClientError, Event, SEEN_RETENTION_MS},
    control::ControlEvent,
    core::{Action, Committed, ReplyId, Report, Restriction, Write},
    inbox,
    outgoing::{self, Job},
    prekeys, receipts,
    state::{InboundMessage, OutboxEntry, State, StateError},
};

impl Shell {
    /// Does what the core says, until it says nothing more.
    pub(super) fn act(&mut self) {
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
                    self.tracker.spawn(async move {
                        inbox::reopen_held(&context, &user).await;
                        // What it stored owes delivered receipts, and what it asked for
                        // again owes requests: they go now, not at the slow timer.
                        context.report(Report::ReceiptsDue).await;
                    });
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
    pub(super) fn publish_prekeys(&mut self, online: ControlEvent) {
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
            Write::Lift(lift) => {
                let lifted = match lift.restriction {
                    Restriction::Mute => state.unmute(&lift.user),
                    Restriction::Block => state.unblock(&lift.user),
                };
                self.report_when(async move {
                    Committed::Lifted {
                        lift,
                        result: lifted.await,
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
