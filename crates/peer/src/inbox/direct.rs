//! Direct connections: [`serve`] runs one inbound peer connection. The dialer must first
//! prove, in the Noise handshake under my exchange key, the key of the user its hello
//! names ([`check_dialer`]); then every envelope already arrived (up to [`RECEIVE_BATCH`])
//! is checked, the batch stored in one commit, and all its answers written in one flush,
//! while the connection goes on reading: the sender pipelines, so one `fsync` covers many
//! messages. Until the mail that waited at registration is in, envelopes are refused as
//! `unavailable`, so they go to the mailbox behind it.

use std::{collections::VecDeque, net::SocketAddr, sync::Arc, time::Duration};

use futures::FutureExt;
use proto::{Connection, Envelope, ErrorCode, ErrorReply, MessageId, PeerMsg, Username};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{
    Accepted, Checked, Refusal,
    check::{check, check_dialer},
    keys_used, report_refusal, submit_store,
};
use crate::{
    context::{Context, MailState},
    core::Report,
    sessions::Saving,
    state::StoreOutcome,
};

/// How long an inbound connection that has delivered envelopes may stay silent before it
/// is closed (the sender keeps its link for the next message).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the hellos may take, and then how long until the first envelope: a peer that
/// says hello and nothing more holds one of the inbound slots for no longer than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most envelopes of one connection read and not yet stored and answered: reading
/// pauses beyond it.
const MAX_UNSTORED: usize = 4 * RECEIVE_BATCH;
/// The most envelopes read from a direct connection into one stored batch.
const RECEIVE_BATCH: usize = 1024;
/// The most token bytes in one batch, so a peer sending maximal frames cannot make one
/// batch take more than a few MiB of memory.
const RECEIVE_BATCH_BYTES: usize = 2 << 20;

/// Why an inbound peer connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnded {
    /// The hellos failed.
    #[error(transparent)]
    Handshake(#[from] proto::HandshakeError),
    /// Reading failed.
    #[error(transparent)]
    Recv(#[from] proto::RecvError),
    /// Writing the answers failed.
    #[error(transparent)]
    Send(#[from] proto::SendError),
    /// The dialer reached the wrong user (a stale or reused address).
    #[error("the peer wanted {0}, not me")]
    NotForMe(Username),
    /// The dialer is blocked.
    #[error("{0} is blocked")]
    Blocked(Username),
    /// The first message was not a hello.
    #[error("the first message was not a hello")]
    NoHello,
    /// No hello within the handshake timeout.
    #[error("no peer hello in time")]
    HelloTimeout,
    /// A message other than an envelope after the hello.
    #[error("unexpected message from the peer")]
    Unexpected,
    /// The dialer's key is not the claimed user's.
    #[error("the peer claiming to be {0} does not hold their key: {1}")]
    NotTheirKey(Username, Refusal),
}

/// Serves one inbound peer connection until it closes, idles out, misbehaves, or the
/// runtime stops.
pub(crate) async fn serve(
    stream: TcpStream,
    addr: SocketAddr,
    context: Arc<Context>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let mut connection = Connection::new(stream);
    tokio::select! {
        biased;
        () = shutdown.cancelled() => {}
        result = serve_connection(&mut connection, &context) => {
            if let Err(reason) = result {
                tracing::info!(%addr, %reason, "peer connection closed");
            }
        }
    }
    connection.close().await;
}

async fn serve_connection(
    connection: &mut Connection<TcpStream>,
    context: &Context,
) -> Result<(), ConnectionEnded> {
    let secured = connection
        .accept_handshake(&context.identity, HANDSHAKE_TIMEOUT)
        .await?;
    let from = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.recv::<PeerMsg>()).await {
        Ok(Ok(Some(PeerMsg::Hello { from, to }))) => {
            if to != context.me {
                // Not a refusal by the recipient: the dialer reached the wrong user (a stale
                // or reused address). `unknown_user` tells it to try elsewhere: the mailbox.
                let refusal = Refusal::NotForMe(to.clone());
                let _ = connection
                    .send(&PeerMsg::Reject {
                        id: None,
                        error: ErrorReply::new(ErrorCode::UnknownUser, refusal.to_string()),
                    })
                    .await;
                return Err(ConnectionEnded::NotForMe(to));
            }
            if context.state.is_blocked(&from).unwrap_or(false) {
                let _ = connection
                    .send(&PeerMsg::Reject {
                        id: None,
                        error: Refusal::Blocked.to_reply(),
                    })
                    .await;
                return Err(ConnectionEnded::Blocked(from));
            }
            // The dialer proved it holds the exchange key in `secured`: it must be the key
            // of the user it claims to be, before any envelope moves.
            if let Err(refusal) = check_dialer(context, &from, &secured.remote_static).await {
                let _ = connection
                    .send(&PeerMsg::Reject {
                        id: None,
                        error: refusal.to_reply(),
                    })
                    .await;
                return Err(ConnectionEnded::NotTheirKey(from, refusal));
            }
            from
        }
        Ok(Ok(Some(_))) => return Err(ConnectionEnded::NoHello),
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => return Err(error.into()),
        Err(_) => return Err(ConnectionEnded::HelloTimeout),
    };
    // Batches checked and submitted for storing, oldest first. The connection goes on
    // reading while they commit, so the next batch is everything that arrived meanwhile
    // (not just one socket buffer's worth), and many batches share a group commit.
    let mut pending: VecDeque<Batch> = VecDeque::new();
    let mut pending_envelopes = 0;
    let mut ended: Option<Result<(), ConnectionEnded>> = None;
    // Set once writing the answers failed: nothing more is written.
    let mut write_failed = false;
    let mut idle_timeout = HANDSHAKE_TIMEOUT;
    loop {
        if ended.is_some() && pending.is_empty() {
            return ended.unwrap_or(Ok(()));
        }
        let reading = ended.is_none() && pending_envelopes < MAX_UNSTORED;
        tokio::select! {
            biased;
            stored = next_stored(context, &mut pending), if !pending.is_empty() => {
                let (answers, new) = stored;
                pending_envelopes -= answers.len();
                // Stored is stored: handed over to be shown before the ack is written, so
                // the sender hears *delivered* only once the message is on its way to the
                // screen, and shown even if the ack cannot be written (the sender's retry
                // is then a duplicate, which is not shown).
                for report in new {
                    context.report(report).await;
                }
                // Once a write failed the connection is done, but the batches still
                // committing are stored all the same: each is still handed over to be shown
                // (the sender's retry of it is a duplicate, which is not shown).
                if !write_failed {
                    let written = async {
                        for answer in &answers {
                            connection.feed(answer).await?;
                        }
                        connection.flush().await
                    }
                    .await;
                    if let Err(error) = written {
                        write_failed = true;
                        ended = Some(Err(error.into()));
                    }
                }
                keys_used(context).await;
            }
            first = tokio::time::timeout(idle_timeout, connection.recv::<PeerMsg>()), if reading => {
                let first = match first {
                    Ok(Ok(Some(PeerMsg::Envelope(envelope)))) => {
                        idle_timeout = IDLE_TIMEOUT;
                        envelope
                    }
                    Ok(Ok(Some(_))) => {
                        ended = Some(Err(ConnectionEnded::Unexpected));
                        continue;
                    }
                    // An idle timeout with batches still committing is not idle.
                    Err(_) if !pending.is_empty() => continue,
                    Ok(Ok(None)) | Err(_) => {
                        ended = Some(Ok(()));
                        continue;
                    }
                    Ok(Err(error)) => {
                        ended = Some(Err(error.into()));
                        continue;
                    }
                };
                // Everything that has arrived already joins the batch (`recv` is
                // cancel-safe, so polling it once loses nothing).
                let mut batch_bytes = first.token.len();
                let mut batch = vec![first];
                while batch.len() < RECEIVE_BATCH && batch_bytes < RECEIVE_BATCH_BYTES {
                    match connection.recv::<PeerMsg>().now_or_never() {
                        None => break,
                        Some(Ok(Some(PeerMsg::Envelope(envelope)))) => {
                            batch_bytes += envelope.token.len();
                            batch.push(envelope);
                        }
                        Some(Ok(Some(_))) => ended = Some(Err(ConnectionEnded::Unexpected)),
                        Some(Ok(None)) => ended = Some(Ok(())),
                        Some(Err(error)) => ended = Some(Err(error.into())),
                    }
                    if ended.is_some() {
                        break;
                    }
                }
                pending_envelopes += batch.len();
                pending.push_back(check_batch(context, &from, batch).await);
            }
        }
    }
}

/// A batch of envelopes checked and submitted for storing: one answer per envelope, those
/// still waiting for the commit marked by their place.
struct Batch {
    answers: Vec<Option<PeerMsg>>,
    /// For each checked envelope, its place in `answers` and its id.
    places: Vec<(usize, MessageId)>,
    /// The commit storing the checked envelopes (`None`: nothing to store).
    stored: Option<Saving<Vec<StoreOutcome>>>,
    /// The sender, for the log if the commit fails.
    from: Username,
}

/// Waits for the oldest batch's commit; returns its answers, in order, and the new messages.
async fn next_stored(
    context: &Context,
    pending: &mut VecDeque<Batch>,
) -> (Vec<PeerMsg>, Vec<Report>) {
    let Some(batch) = pending.front_mut() else {
        return std::future::pending().await;
    };
    let result = match batch.stored.as_mut() {
        Some(saving) => context
            .ratchet
            .settle(&context.state, saving)
            .await
            .map(Some),
        None => Ok(None),
    };
    let Some(Batch {
        mut answers,
        places,
        from,
        ..
    }) = pending.pop_front()
    else {
        return (Vec::new(), Vec::new());
    };
    let mut new = Vec::new();
    match result {
        Ok(outcomes) => {
            for ((index, id), outcome) in places.into_iter().zip(outcomes.unwrap_or_default()) {
                new.extend(Accepted::from(outcome).into_report());
                answers[index] = Some(PeerMsg::Ack { id });
            }
        }
        Err(error) => {
            let refusal = Refusal::Transient(error.into());
            tracing::warn!(%from, %refusal, "incoming messages refused");
            let error = refusal.to_reply();
            for (index, id) in places {
                answers[index] = Some(PeerMsg::Reject {
                    id: Some(id),
                    error: error.clone(),
                });
            }
        }
    }
    (answers.into_iter().flatten().collect(), new)
}

/// Checks a batch of envelopes from `from` (the user who connected) and submits what passes
/// for storing, in one commit.
async fn check_batch(context: &Context, from: &Username, batch: Vec<Envelope>) -> Batch {
    let mut answers: Vec<Option<PeerMsg>> = Vec::with_capacity(batch.len());
    let mut places = Vec::new();
    let mut checked = Vec::new();
    let drained = context.mail_state().await == MailState::Drained;
    for envelope in &batch {
        let id = envelope.id;
        if !drained {
            answers.push(Some(PeerMsg::Reject {
                id: Some(id),
                error: ErrorReply::new(
                    ErrorCode::Unavailable,
                    "still fetching the mail that waited for me; leave it in my mailbox",
                ),
            }));
            continue;
        }
        if &envelope.from != from {
            answers.push(Some(PeerMsg::Reject {
                id: Some(id),
                error: ErrorReply::new(
                    ErrorCode::BadRequest,
                    "the envelope's sender is not the user who connected",
                ),
            }));
            continue;
        }
        match check(context, envelope).await {
            Ok(Checked::Open(message)) => {
                places.push((answers.len(), id));
                checked.push(message);
                answers.push(None);
            }
            Ok(Checked::Seen) => answers.push(Some(PeerMsg::Ack { id })),
            Err(refusal) => {
                report_refusal(context, from, &refusal).await;
                answers.push(Some(PeerMsg::Reject {
                    id: Some(id),
                    error: refusal.to_reply(),
                }));
            }
        }
    }
    let stored = (!checked.is_empty()).then(|| submit_store(context, checked, false));
    Batch {
        answers,
        places,
        stored,
        from: from.clone(),
    }
}
