//! The commands that need the server or the disk, each run as a task of its own once the
//! core says so ([`crate::core::Action::Run`]).

use proto::{PublicKeys, Reply, Request, Username};

use super::{Command, Shell};
use crate::{
    api::{ClientError, OnlineUsers, WhoisReport},
    context::Context,
    control::ControlError,
    core::Report,
};

impl Shell {
    pub(super) fn spawn_command(&self, command: Command) {
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
pub(super) async fn sync_block(context: &Context, user: &Username, active: bool) {
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
