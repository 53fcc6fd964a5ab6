//! The reporter: records each recipient's results in batches and answers their senders
//! (see the module docs of [`crate::outgoing`]).

use std::sync::Arc;

use futures::{StreamExt, stream::FuturesOrdered};
use tokio::sync::mpsc;

use super::Job;
use crate::{
    api::{DeliveryStatus, Event, SendReport},
    context::Context,
    core::Report,
    state::{AttemptResult, StateError},
};

/// A finished message on its way to the reporter, which records its result before
/// answering.
pub(super) struct Done {
    job: Job,
    status: DeliveryStatus,
}

/// The most results the reporter records in one write.
const MAX_RESULTS_PER_WRITE: usize = 4096;

/// Hands the result of `job` to the reporter, which records it.
pub(super) async fn finish(job: Job, status: DeliveryStatus, done: &mpsc::Sender<Done>) {
    let _ = done.send(Done { job, status }).await;
}

/// The reporter: see [`crate::outgoing`]. Batches are handled in order; a batch's senders are
/// answered as soon as their outbox records are durable, while its results are still being
/// committed (`recording`), and the event loop hears a message is finished only once its
/// result is durable, so an outbox flush never sends it again meanwhile.
pub(super) async fn report(context: Arc<Context>, mut done: mpsc::Receiver<Done>) {
    let mut batch: Vec<Done> = Vec::new();
    let mut recording = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = recording.next(), if !recording.is_empty() => {}
            received = done.recv_many(&mut batch, MAX_RESULTS_PER_WRITE) => {
                if received == 0 {
                    break;
                }
                let finishing = record(context.clone(), std::mem::take(&mut batch)).await;
                recording.push_back(finishing);
            }
        }
    }
    while recording.next().await.is_some() {}
}

/// Waits for the outbox records of `batch`, submits its results in one write, answers the
/// senders whose records are durable, and returns the future that finishes the batch once
/// the results are durable.
async fn record(context: Arc<Context>, batch: Vec<Done>) -> impl Future<Output = ()> {
    let mut finished = Vec::with_capacity(batch.len());
    for Done { mut job, status } in batch {
        let record = match job.recorded.take() {
            Some(ticket) => ticket.await.err(),
            None => None,
        };
        finished.push((job, status, record));
    }
    let attempts = finished
        .iter()
        .map(|(job, status, _)| {
            let (status, keep) = status.to_history();
            AttemptResult {
                entry: job.entry.clone(),
                status,
                keep,
            }
        })
        .collect();
    let results = context.state.submit_results(attempts);
    // A message whose record is durable is safe whatever happens to its result: until the
    // result is durable the message stays in the outbox, and a retry after a crash is
    // de-duplicated by the recipient. So its sender hears the result now.
    let mut waiting = Vec::new();
    for (job, status, record) in finished {
        match record {
            None => {
                let id = job.entry.id;
                answer(&context, job, Ok(status)).await;
                waiting.push((id, None));
            }
            Some(error) => waiting.push((job.entry.id, Some((job, status, error)))),
        }
    }
    async move {
        let results = match results.await {
            Ok(results) => results.into_iter().map(|result| result.err()).collect(),
            Err(error) => {
                context.report_state_error(error).await;
                Vec::new()
            }
        };
        let mut results = results.into_iter();
        for (id, unrecorded) in waiting {
            let result_error = results.next().flatten();
            match unrecorded {
                None => {
                    if let Some(error) = result_error {
                        context.report_state_error(error).await;
                    }
                }
                Some((job, status, record_error)) => {
                    answer_unrecorded(&context, job, status, record_error, result_error).await;
                }
            }
            context.report(Report::Finished(id)).await;
        }
    }
}

/// Answers the sender of a message whose outbox record could not be written (it left
/// anyway, while the record was being committed). Delivered or queued, the message is
/// safe with its recipient; the user hears that this client's history lacks it. Failed,
/// it is kept for a retry only if its result could be written (that write puts it back in
/// the outbox); otherwise the sender gets the error, as nothing holds the message now.
async fn answer_unrecorded(
    context: &Context,
    job: Job,
    status: DeliveryStatus,
    record_error: StateError,
    result_error: Option<StateError>,
) {
    if status.is_success() || result_error.is_none() {
        context.report_state_error(record_error).await;
        answer(context, job, Ok(status)).await;
    } else {
        answer(context, job, Err(record_error)).await;
    }
}

/// Tells whoever waits for `job` its result: the sender of a new message, or (a retry from
/// the outbox) the user, by an event.
async fn answer(context: &Context, job: Job, result: Result<DeliveryStatus, StateError>) {
    let (id, to) = (job.entry.id, job.entry.to);
    match (job.reply, result) {
        (Some(reply), Ok(status)) => {
            let _ = reply.send(Ok(SendReport { id, to, status }));
        }
        (Some(reply), Err(error)) => {
            let _ = reply.send(Err(error.into()));
        }
        // Failures that will be retried again are not reported: they would only repeat the
        // same line at every reconnect.
        (
            None,
            Ok(DeliveryStatus::Failed {
                will_retry: true, ..
            }),
        ) => {}
        (None, Ok(status)) => context.notify(Event::Delivery { id, to, status }).await,
        (None, Err(error)) => context.report_state_error(error).await,
    }
}
