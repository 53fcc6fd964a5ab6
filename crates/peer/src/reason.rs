//! Why a message was not delivered, and why an incoming one was refused: typed, so the
//! runtime decides by kind and the application words them (the terminal client's wording is
//! in its `render` module). A failure reason is stored with the message's history line.
//!
//! **Architecture Invariant:** a leaf of the crate: it imports no other module of it.

use proto::{ErrorCode, ErrorReply, OpenError, Username};
use serde::{Deserialize, Serialize};

/// Why a message was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureReason {
    /// The discovery server knows no user of that name.
    UnknownUser,
    /// The discovery server could not be asked where the recipient is (offline, no answer).
    ServerUnreachable {
        /// What failed.
        detail: String,
    },
    /// The discovery server's keys for the recipient do not verify.
    InvalidKeys {
        /// Why they do not.
        detail: String,
    },
    /// The recipient's key differs from the one pinned here: nothing was sent, and nothing
    /// is until the user runs `trust` for them.
    KeyChanged,
    /// The recipient refused the message.
    RefusedByRecipient {
        /// Its code.
        code: ErrorCode,
        /// Its words.
        message: String,
    },
    /// Not reachable directly, and the server refused to hold the message in the
    /// recipient's mailbox.
    MailboxRefused {
        /// The server's code.
        code: ErrorCode,
        /// The server's words.
        message: String,
    },
    /// Not reachable directly, and the server could not be reached to hold it.
    MailboxUnreachable {
        /// What failed.
        detail: String,
    },
    /// The server answered with a reply of the wrong kind.
    UnexpectedReply,
    /// The message could not be sealed.
    Seal {
        /// Why.
        detail: String,
    },
    /// The local state could not be read or written.
    LocalState {
        /// What failed.
        detail: String,
    },
    /// The recipient has published no keys to start an encrypted session with (their
    /// client predates the ratchet, or never connected since): kept in the outbox.
    NoPreKeys,
}

impl FailureReason {
    /// A stable machine-readable spelling (for scripts and logs).
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownUser => "unknown_user",
            Self::ServerUnreachable { .. } => "server_unreachable",
            Self::InvalidKeys { .. } => "invalid_keys",
            Self::KeyChanged => "key_changed",
            Self::RefusedByRecipient { .. } => "refused_by_recipient",
            Self::MailboxRefused { .. } => "mailbox_refused",
            Self::MailboxUnreachable { .. } => "mailbox_unreachable",
            Self::UnexpectedReply => "unexpected_reply",
            Self::Seal { .. } => "seal",
            Self::LocalState { .. } => "local_state",
            Self::NoPreKeys => "no_prekeys",
        }
    }

    /// The recipient's refusal.
    pub(crate) fn refused(reply: ErrorReply) -> Self {
        Self::RefusedByRecipient {
            code: reply.code,
            message: reply.message,
        }
    }
}

/// Why an incoming message was refused (told to the user as [`crate::Event::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalReason {
    /// The sender's key does not match the key pinned for them. `held`: the message (mail)
    /// is kept sealed and opened once the user runs `trust` for the sender.
    KeyChanged {
        /// Whether it is kept for `trust`.
        held: bool,
    },
    /// It opened under the sender's key but does not check (replayed, too old, dated ahead,
    /// malformed, a header that disagrees).
    Unopenable(OpenError),
    /// It is addressed to someone else.
    NotForMe(Username),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_reason_has_its_own_code() {
        let reasons = [
            FailureReason::UnknownUser,
            FailureReason::ServerUnreachable { detail: "x".into() },
            FailureReason::InvalidKeys { detail: "x".into() },
            FailureReason::KeyChanged,
            FailureReason::RefusedByRecipient {
                code: ErrorCode::Blocked,
                message: "x".into(),
            },
            FailureReason::MailboxRefused {
                code: ErrorCode::MailboxFull,
                message: "x".into(),
            },
            FailureReason::MailboxUnreachable { detail: "x".into() },
            FailureReason::UnexpectedReply,
            FailureReason::Seal { detail: "x".into() },
            FailureReason::LocalState { detail: "x".into() },
            FailureReason::NoPreKeys,
        ];
        let codes: std::collections::HashSet<_> = reasons.iter().map(FailureReason::code).collect();
        assert_eq!(codes.len(), reasons.len());
    }

    #[test]
    fn a_failure_reason_is_stored_and_read_back() {
        let reason = FailureReason::MailboxRefused {
            code: ErrorCode::MailboxFull,
            message: "full".into(),
        };
        let bytes = proto::wire::encode(&reason).unwrap();
        assert_eq!(
            proto::wire::decode::<FailureReason>(&bytes).unwrap(),
            reason
        );
    }
}
