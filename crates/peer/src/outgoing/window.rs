//! The envelopes sent on a kept link and not yet answered.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

use super::Job;

/// The envelopes sent on a kept link and not yet answered, oldest first, each with when it
/// was sent. Answers may come in any order; whatever is still unanswered when the link
/// fails goes back to the front of the queue in the order it was sent, so the recipient
/// still gets a recipient's messages in the order they were written.
#[derive(Default)]
pub(super) struct Window {
    /// Each message, when it was sent, and the batch it was sealed in.
    sent: VecDeque<(Job, Instant, u64)>,
}

impl Window {
    /// How many envelopes wait for answers.
    pub(super) fn len(&self) -> usize {
        self.sent.len()
    }

    pub(super) fn push(&mut self, job: Job, at: Instant, batch: u64) {
        self.sent.push_back((job, at, batch));
    }

    /// The message `id` answered, its place and its batch (`None`: a late answer to
    /// nothing here).
    pub(super) fn take(&mut self, id: &proto::MessageId) -> Option<(usize, Job, u64)> {
        let index = self.sent.iter().position(|(job, ..)| &job.entry.id == id)?;
        self.sent
            .remove(index)
            .map(|(job, _, batch)| (index, job, batch))
    }

    /// Puts back a message taken at `index` (its answer means it must go again).
    pub(super) fn put_back(&mut self, index: usize, job: Job, at: Instant, batch: u64) {
        self.sent
            .insert(index.min(self.sent.len()), (job, at, batch));
    }

    /// When the oldest unanswered message's ack is late.
    pub(super) fn deadline(&self, ack_timeout: Duration) -> Option<Instant> {
        self.sent.front().map(|(_, at, _)| *at + ack_timeout)
    }

    /// Every unanswered message with its batch, oldest first (the whole link was refused).
    pub(super) fn drain(&mut self) -> impl Iterator<Item = (Job, u64)> + '_ {
        self.sent.drain(..).map(|(job, _, batch)| (job, batch))
    }

    /// Puts every unanswered message back at the front of `queue`, in the order sent.
    pub(super) fn requeue(&mut self, queue: &mut VecDeque<Job>) {
        while let Some((job, ..)) = self.sent.pop_back() {
            queue.push_front(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::{MessageId, Username};

    use super::*;
    use crate::state::OutboxEntry;

    fn job(seq: u64) -> Job {
        Job {
            entry: OutboxEntry {
                id: MessageId::random(),
                to: Username::new("bob").unwrap(),
                body: format!("message {seq}"),
                created_ms: 1,
                seq,
                attempts: 0,
                last_error: None,
            },
            recorded: None,
            reply: None,
        }
    }

    fn seqs(queue: &VecDeque<Job>) -> Vec<u64> {
        queue.iter().map(|job| job.entry.seq).collect()
    }

    #[test]
    fn after_a_failure_the_unanswered_go_first_in_the_order_sent() {
        let now = Instant::now();
        let mut window = Window::default();
        let jobs: Vec<Job> = (1..=5).map(job).collect();
        let ids: Vec<_> = jobs.iter().map(|job| job.entry.id).collect();
        for job in jobs {
            window.push(job, now, 1);
        }
        // Answers come out of order; a late answer to nothing here is skipped.
        assert_eq!(
            window.take(&ids[2]).map(|(_, job, _)| job.entry.seq),
            Some(3)
        );
        assert!(window.take(&MessageId::random()).is_none());
        assert_eq!(
            window.take(&ids[0]).map(|(_, job, _)| job.entry.seq),
            Some(1)
        );
        let mut queue: VecDeque<Job> = [job(6), job(7)].into();
        window.requeue(&mut queue);
        assert_eq!(seqs(&queue), vec![2, 4, 5, 6, 7]);
    }

    #[test]
    fn a_message_put_back_keeps_its_place() {
        let now = Instant::now();
        let mut window = Window::default();
        let jobs: Vec<Job> = (1..=3).map(job).collect();
        let second = jobs[1].entry.id;
        for job in jobs {
            window.push(job, now, 1);
        }
        let (index, taken, batch) = window.take(&second).unwrap();
        window.put_back(index, taken, now, batch);
        let mut queue = VecDeque::new();
        window.requeue(&mut queue);
        assert_eq!(seqs(&queue), vec![1, 2, 3]);
    }

    #[test]
    fn the_oldest_unanswered_message_sets_the_ack_deadline() {
        let start = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut window = Window::default();
        assert_eq!(window.deadline(timeout), None);
        window.push(job(1), start, 1);
        window.push(job(2), start + Duration::from_secs(1), 1);
        assert_eq!(window.deadline(timeout), Some(start + timeout));
        assert_eq!(window.len(), 2);
    }
}
