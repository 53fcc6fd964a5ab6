//! The record layer of a secured connection: how frames travel once a handshake of
//! [`crate::noise`] has run.
//!
//! On the wire, a secured connection is a stream of records, each framed like any frame (a
//! 4-byte big-endian length, then the record), and each record is one or more whole frames
//! (a 4-byte length and a postcard body each) sealed together by
//! [`Cipher::seal_into`](crate::noise::Cipher::seal_into). The frames
//! [`Connection::feed`](crate::Connection::feed) buffers until a flush leave as one record,
//! as TLS's records do: a batch of 64 acks costs one AEAD operation and one length prefix,
//! not 64 of each.
//!
//! **Bounds.** A record holds at most one largest frame's worth of plaintext, the frame
//! limit plus its header ([`plaintext_limit`]), and a record declared longer than that
//! sealed ([`record_limit`]) is refused on its length alone. So a receiver holds at most what
//! it held for one frame when every frame was sealed on its own: one sealed record while it
//! arrives, and what that record opens to. A record must end at a frame's end; one that ends
//! inside a frame, or holds none, is malformed.
//!
//! [`Records`] holds a connection's keys and its two plaintext buffers (the record being read,
//! the frames fed and not yet sealed); both are given back when the connection is idle, so
//! an idle connection holds no buffer at all.

use std::fmt;

use bytes::{Buf, BytesMut};
use serde::de::DeserializeOwned;

use crate::{
    RecvError,
    noise::{Cipher, NoiseError, sealed_len},
    wire::{self, HEADER_LEN, WireError},
};

/// How much plaintext a sender puts in one record before sealing it without waiting for a
/// flush: large enough that sealing costs little per frame, small enough that the receiver
/// opens the first frames of a long burst while the rest are still on the way (TLS's
/// largest record).
pub const RECORD_BATCH: usize = 16 * 1024;

/// The most plaintext one record holds: one frame of `max_frame_len` bytes and its header.
pub fn plaintext_limit(max_frame_len: usize) -> usize {
    max_frame_len + HEADER_LEN
}

/// The longest record on the wire (sealed, without its own length prefix).
pub fn record_limit(max_frame_len: usize) -> usize {
    sealed_len(plaintext_limit(max_frame_len))
}

/// The keys of a secured connection and the plaintext it is reading and writing.
pub(crate) struct Records {
    cipher: Cipher,
    /// The record being read, opened; its frames are taken from `taken` on.
    opened: Vec<u8>,
    taken: usize,
    /// Whole frames fed and not sealed yet: the next record.
    pending: Vec<u8>,
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("unread", &(self.opened.len() - self.taken))
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Records {
    pub(crate) fn new(cipher: Cipher) -> Self {
        Self {
            cipher,
            opened: Vec::new(),
            taken: 0,
            pending: Vec::new(),
        }
    }

    /// The next message: the next frame of the record being read or, once that is all
    /// taken, of the next whole record at the start of `received` (opened and removed from
    /// it). `Ok(None)` when more bytes must arrive first.
    pub(crate) fn next<M: DeserializeOwned>(
        &mut self,
        received: &mut BytesMut,
        max_frame_len: usize,
    ) -> Result<Option<M>, RecvError> {
        let too_large = |_| RecvError::FrameTooLarge { max: max_frame_len };
        if self.taken == self.opened.len() {
            let Some((sealed, len)) =
                wire::split_frame(received, record_limit(max_frame_len)).map_err(too_large)?
            else {
                return Ok(None);
            };
            self.taken = 0;
            self.cipher
                .open_into(sealed, &mut self.opened)
                .map_err(|_| RecvError::Unauthentic)?;
            received.advance(len);
        }
        match wire::split_frame(&self.opened[self.taken..], max_frame_len).map_err(too_large)? {
            Some((body, len)) => {
                let message = wire::decode(body);
                self.taken += len;
                Ok(Some(message?))
            }
            // An empty record, or one that ends inside a frame: authentic, so the other side
            // sent it, and it broke the format.
            None => Err(RecvError::Malformed(WireError::from(
                postcard::Error::DeserializeUnexpectedEnd,
            ))),
        }
    }

    /// The buffer frames are fed into; after appending one, call [`Records::fed`].
    pub(crate) fn pending(&mut self) -> &mut Vec<u8> {
        &mut self.pending
    }

    /// After a frame was appended to [`Records::pending`] at `start`: if it took the record
    /// over [`plaintext_limit`], what came before it is sealed into `unsent` as a record of
    /// its own (the frame starts the next); a record that reached [`RECORD_BATCH`] is
    /// sealed whole.
    pub(crate) fn fed(
        &mut self,
        start: usize,
        max_frame_len: usize,
        unsent: &mut Vec<u8>,
    ) -> Result<(), NoiseError> {
        if start > 0 && self.pending.len() > plaintext_limit(max_frame_len) {
            seal_record(&mut self.cipher, &self.pending[..start], unsent)?;
            self.pending.drain(..start);
        }
        if self.pending.len() >= RECORD_BATCH {
            self.seal(unsent)?;
        }
        Ok(())
    }

    /// Seals every frame fed since the last record into one record appended to `unsent`
    /// (nothing when none was fed).
    pub(crate) fn seal(&mut self, unsent: &mut Vec<u8>) -> Result<(), NoiseError> {
        if !self.pending.is_empty() {
            seal_record(&mut self.cipher, &self.pending, unsent)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// The bytes its buffers hold allocated.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.opened.capacity() + self.pending.capacity()
    }

    /// Gives back the read buffer once every frame of it was taken.
    pub(crate) fn release_read(&mut self) {
        if self.taken == self.opened.len() {
            self.opened = Vec::new();
            self.taken = 0;
        }
    }

    /// Gives back the write buffer once everything fed was sealed.
    pub(crate) fn release_write(&mut self) {
        if self.pending.is_empty() {
            self.pending = Vec::new();
        }
    }
}

/// Appends `plain` (whole frames) to `unsent` as one framed record.
fn seal_record(cipher: &mut Cipher, plain: &[u8], unsent: &mut Vec<u8>) -> Result<(), NoiseError> {
    wire::append_frame_with(unsent, |out| cipher.seal_into(plain, out)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MessageId, PeerMsg, noise, wire::MAX_FRAME_LEN};

    fn pair() -> (Records, Records) {
        let (client, server) = noise::pair();
        (Records::new(client), Records::new(server))
    }

    fn acks(count: usize) -> Vec<PeerMsg> {
        (0..count)
            .map(|n| PeerMsg::Ack {
                id: MessageId([n as u8; 16]),
            })
            .collect()
    }

    /// Feeds `messages` to `sender` as a connection does, then seals what is left, as a
    /// flush does: the bytes that go on the wire.
    fn sent(sender: &mut Records, messages: &[PeerMsg], max_frame_len: usize) -> Vec<u8> {
        let mut unsent = Vec::new();
        for message in messages {
            let start = sender.pending().len();
            wire::encode_frame(message, sender.pending()).unwrap();
            sender.fed(start, max_frame_len, &mut unsent).unwrap();
        }
        sender.seal(&mut unsent).unwrap();
        unsent
    }

    /// The plaintext length of each record in `bytes`.
    fn record_sizes(mut bytes: &[u8]) -> Vec<usize> {
        let mut sizes = Vec::new();
        while let Some((record, len)) = wire::split_frame(bytes, usize::MAX).unwrap() {
            sizes.push(record.len() - noise::TAG_LEN * record.len().div_ceil(65_535));
            bytes = &bytes[len..];
        }
        assert!(bytes.is_empty(), "the bytes end inside a record");
        sizes
    }

    /// Everything `receiver` takes out of `bytes`, until it needs more.
    fn received(
        receiver: &mut Records,
        bytes: &[u8],
        max_frame_len: usize,
    ) -> Result<Vec<PeerMsg>, RecvError> {
        let mut received = BytesMut::from(bytes);
        let mut messages = Vec::new();
        while let Some(message) = receiver.next(&mut received, max_frame_len)? {
            messages.push(message);
        }
        assert!(received.is_empty(), "{} bytes not taken", received.len());
        Ok(messages)
    }

    /// Sends `messages` through a fresh pair of records as a connection does (limit
    /// `max_frame_len`), checks that all come out in order, and returns how many bytes
    /// crossed and the plaintext length of each record.
    fn through_records(messages: &[PeerMsg], max_frame_len: usize) -> (usize, Vec<usize>) {
        let (mut sender, mut receiver) = pair();
        let bytes = sent(&mut sender, messages, max_frame_len);
        let arrived = received(&mut receiver, &bytes, max_frame_len).unwrap();
        assert_eq!(arrived, messages);
        (bytes.len(), record_sizes(&bytes))
    }

    #[test]
    fn frames_fed_before_a_flush_travel_as_one_record_and_arrive_in_order() {
        let messages = acks(64);
        let frames: usize = messages
            .iter()
            .map(|message| HEADER_LEN + wire::encoded_len(message).unwrap())
            .sum();
        let (crossed, sizes) = through_records(&messages, MAX_FRAME_LEN);
        assert_eq!(sizes, [frames]);
        assert_eq!(
            crossed,
            HEADER_LEN + sealed_len(frames),
            "one tag, one prefix"
        );
    }

    #[test]
    fn a_long_burst_is_cut_at_the_batch_size_and_no_record_exceeds_one_largest_frame() {
        // 1,000 acks of 21 bytes framed: sealed at 16 KiB, the rest at the flush.
        let (_, sizes) = through_records(&acks(1000), MAX_FRAME_LEN);
        assert_eq!(sizes.len(), 2, "{sizes:?}");
        assert!(sizes[0] >= RECORD_BATCH && sizes[0] < RECORD_BATCH + 21);

        // With a 100-byte frame limit a record holds at most 104 bytes: four acks.
        assert_eq!(through_records(&acks(10), 100).1, [84, 84, 42]);

        // The largest frame after small ones starts a record of its own, and fills it.
        let refusal = |text: String| PeerMsg::Reject {
            id: None,
            error: crate::ErrorReply::new(crate::ErrorCode::Refused, text),
        };
        let overhead = wire::encoded_len(&refusal(String::new())).unwrap();
        let largest = refusal("x".repeat(MAX_FRAME_LEN - overhead - 2));
        assert_eq!(wire::encoded_len(&largest).unwrap(), MAX_FRAME_LEN);
        let mut messages = acks(3);
        messages.push(largest);
        let (_, sizes) = through_records(&messages, MAX_FRAME_LEN);
        assert_eq!(sizes, [63, plaintext_limit(MAX_FRAME_LEN)]);
    }

    #[test]
    fn a_changed_byte_fails_the_whole_record() {
        let (mut sender, mut receiver) = pair();
        let mut bytes = sent(&mut sender, &acks(8), MAX_FRAME_LEN);
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        let mut arrived = BytesMut::from(&bytes[..]);
        assert!(matches!(
            receiver.next::<PeerMsg>(&mut arrived, MAX_FRAME_LEN),
            Err(RecvError::Unauthentic)
        ));
    }

    #[test]
    fn a_record_declared_over_the_limit_is_refused_on_its_length_alone() {
        let (_, mut receiver) = pair();
        let limit = record_limit(4096) as u32;
        let mut arrived = BytesMut::from(&limit.to_be_bytes()[..]);
        assert!(matches!(
            receiver.next::<PeerMsg>(&mut arrived, 4096),
            Ok(None)
        ));
        let mut arrived = BytesMut::from(&(limit + 1).to_be_bytes()[..]);
        assert!(matches!(
            receiver.next::<PeerMsg>(&mut arrived, 4096),
            Err(RecvError::FrameTooLarge { max: 4096 })
        ));
    }

    #[test]
    fn a_record_that_ends_inside_a_frame_or_holds_none_or_an_oversized_one_is_refused() {
        let ack = wire::encode(&acks(1)[0]).unwrap();
        let mut cut = Vec::new();
        wire::append_frame_with(&mut cut, |out| {
            out.extend_from_slice(&ack);
            Ok::<_, ()>(())
        })
        .unwrap();
        cut.pop();
        // A frame declared over the limit, inside a record within it.
        let mut oversized = 101u32.to_be_bytes().to_vec();
        oversized.extend_from_slice(&[0; 10]);
        for (plain, malformed) in [(&cut[..], true), (&[][..], true), (&oversized[..], false)] {
            let (mut sender, mut receiver) = pair();
            let mut bytes = Vec::new();
            seal_record(&mut sender.cipher, plain, &mut bytes).unwrap();
            let result = receiver.next::<PeerMsg>(&mut BytesMut::from(&bytes[..]), 100);
            match result {
                Err(RecvError::Malformed(_)) if malformed => {}
                Err(RecvError::FrameTooLarge { max: 100 }) if !malformed => {}
                other => panic!("{plain:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_buffers_are_given_back_once_empty() {
        let (mut sender, mut receiver) = pair();
        let bytes = sent(&mut sender, &acks(8), MAX_FRAME_LEN);
        assert!(sender.pending.capacity() > 0);
        sender.release_write();
        assert_eq!(sender.pending.capacity(), 0);

        let mut arrived = BytesMut::from(&bytes[..]);
        let _: PeerMsg = receiver.next(&mut arrived, MAX_FRAME_LEN).unwrap().unwrap();
        receiver.release_read();
        assert!(receiver.opened.capacity() > 0, "kept while frames are left");
        while receiver
            .next::<PeerMsg>(&mut arrived, MAX_FRAME_LEN)
            .unwrap()
            .is_some()
        {}
        receiver.release_read();
        assert_eq!(receiver.opened.capacity(), 0);
    }
}
