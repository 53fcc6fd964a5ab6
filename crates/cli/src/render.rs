//! How events and results look: one line of text for people ([`event_text`]), one JSON
//! object for scripts ([`event_json`]). Pure functions, so the wording is tested.

use peer::{
    DeliveryStatus, Event, FailureReason, RefusalReason, WhoisReport,
    state::{Direction, HistoryEntry, MessageStatus},
};
use proto::Username;
use serde_json::{Value, json};

/// `HH:MM:SS` (UTC) of a time in milliseconds since the epoch.
pub fn clock(ms: u64) -> String {
    let seconds = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `text` with every control character (newlines, carriage returns, terminal escape
/// sequences) and every bidirectional-override character shown escaped (`\n`, `\u{1b}`),
/// never interpreted: message bodies, reasons and announcements come from other people,
/// and a newline or a cursor movement in them could forge a line "from" someone else.
pub fn terminal_safe(text: &str) -> String {
    let dangerous = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(dangerous) {
        return text.to_owned();
    }
    let mut safe = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if dangerous(c) {
            safe.extend(c.escape_default());
        } else {
            safe.push(c);
        }
    }
    safe
}

/// A send's result to `to`, in words (may carry the recipient's or the server's own
/// words: pass it through [`terminal_safe`]).
pub fn status_text(to: &Username, status: &DeliveryStatus) -> String {
    match status {
        DeliveryStatus::Delivered => "delivered".into(),
        DeliveryStatus::Queued {
            recipient_online: true,
        } => "queued (recipient unreachable directly; relayed by the server)".into(),
        DeliveryStatus::Queued {
            recipient_online: false,
        } => "queued (recipient offline)".into(),
        DeliveryStatus::Failed {
            reason,
            will_retry: true,
        } => format!(
            "failed: {} (kept in the outbox, will retry)",
            failure_text(to, reason)
        ),
        DeliveryStatus::Failed {
            reason,
            will_retry: false,
        } => format!("failed: {}", failure_text(to, reason)),
    }
}

/// Why a message to `to` was not delivered, in words.
pub fn failure_text(to: &Username, reason: &FailureReason) -> String {
    match reason {
        FailureReason::UnknownUser => format!("no user named {to}"),
        FailureReason::ServerUnreachable { detail } => {
            format!("discovery server unreachable: {detail}")
        }
        FailureReason::InvalidKeys { detail } => {
            format!("the server's keys for {to} are invalid: {detail}")
        }
        FailureReason::KeyChanged => format!(
            "{to}'s key changed; NOT sent. Compare fingerprints with `whois {to}` and run `trust {to}` if the change is genuine"
        ),
        FailureReason::RefusedByRecipient { message, .. } => {
            format!("refused by the recipient: {message}")
        }
        FailureReason::MailboxRefused { message, .. } => message.clone(),
        FailureReason::MailboxUnreachable { detail } => {
            format!("recipient unreachable and {detail}")
        }
        FailureReason::UnexpectedReply => "unexpected reply from the server".into(),
        FailureReason::Seal { detail } => format!("cannot seal the message: {detail}"),
        FailureReason::LocalState { detail } => format!("local state error: {detail}"),
    }
}

/// Why a message from `from` was refused, in words.
pub fn refusal_text(from: &Username, reason: &RefusalReason) -> String {
    const KEY_CHANGED: &str = "the sender's key does not match the key pinned for them; refused";
    match reason {
        RefusalReason::KeyChanged { held: false } => KEY_CHANGED.into(),
        RefusalReason::KeyChanged { held: true } => {
            format!("{KEY_CHANGED}; the message is kept and shown once you `trust {from}`")
        }
        RefusalReason::Unopenable(error) => error.to_string(),
        RefusalReason::NotForMe(to) => format!("the message is addressed to {to}, not to me"),
    }
}

/// The text lines for one event (`None`: nothing to show). Everything but the key-change
/// warning (whose line breaks are ours, around fingerprints and a name) passes through
/// [`terminal_safe`].
pub fn event_text(event: &Event) -> Option<String> {
    let text = event_text_raw(event);
    Some(match event {
        Event::KeyChanged { .. } => text,
        _ => terminal_safe(&text),
    })
}

fn event_text_raw(event: &Event) -> String {
    match event {
        Event::Message(message) => {
            let muted = if message.while_muted {
                " (while muted)"
            } else {
                ""
            };
            format!(
                "[{}] {}: {}{muted}",
                clock(message.sent_at_ms),
                message.from,
                message.body
            )
        }
        Event::MuteEnded { user, held: 0 } => format!("{user} is no longer muted"),
        Event::MuteEnded { user, held: 1 } => {
            format!("{user} is no longer muted; 1 message from {user} while muted:")
        }
        Event::MuteEnded { user, held } => {
            format!("{user} is no longer muted; {held} messages from {user} while muted:")
        }
        Event::Delivery { to, status, .. } => {
            format!("(earlier message to {to}: {})", status_text(to, status))
        }
        Event::Announcement { text, at_ms } => {
            format!("*** announcement [{}]: {text}", clock(*at_ms))
        }
        Event::Online { observed } => {
            format!("connected to the discovery server (it sees you at {observed})")
        }
        Event::Offline { reason, .. } => {
            format!("lost the discovery server ({reason}); reconnecting in the background")
        }
        Event::Fatal(reply) => format!("cannot register: {reply}"),
        Event::KeyChanged {
            user,
            pinned,
            offered,
        } => format!(
            "!!! WARNING: {user}'s key has CHANGED !!!\n!!! pinned:  {pinned}\n!!! offered: {offered}\n!!! Messages to and from {user} are refused. Check `whois {user}` with {user} in person, then `trust {user}` if the change is genuine."
        ),
        Event::Refused { from, reason } => {
            format!(
                "refused a message from {from}: {}",
                refusal_text(from, reason)
            )
        }
        Event::StateError { error } => format!("local state error: {error}"),
        Event::Presence { user, online } => {
            format!("{user} is {}", if *online { "online" } else { "offline" })
        }
    }
}

fn status_fields(
    to: &Username,
    status: &DeliveryStatus,
) -> (&'static str, Option<String>, Option<&'static str>) {
    match status {
        DeliveryStatus::Delivered => ("delivered", None, None),
        DeliveryStatus::Queued { .. } => ("queued", None, None),
        DeliveryStatus::Failed { reason, .. } => (
            "failed",
            Some(failure_text(to, reason)),
            Some(reason.code()),
        ),
    }
}

/// The JSON object for one event.
pub fn event_json(event: &Event) -> Value {
    match event {
        Event::Message(message) => json!({
            "event": "message",
            "from": message.from.as_str(),
            "id": message.id.to_string(),
            "body": message.body,
            "sent_at_ms": message.sent_at_ms,
            "received_at_ms": message.received_at_ms,
            "while_muted": message.while_muted,
        }),
        Event::MuteEnded { user, held } => {
            json!({"event": "mute_ended", "user": user.as_str(), "held": held})
        }
        Event::Delivery { id, to, status } => {
            let (status, reason, code) = status_fields(to, status);
            json!({"event": "delivery", "id": id.to_string(), "to": to.as_str(), "status": status, "reason": reason, "reason_code": code})
        }
        Event::Announcement { text, at_ms } => {
            json!({"event": "announcement", "text": text, "at_ms": at_ms})
        }
        Event::Online { observed } => json!({"event": "online", "observed": observed.to_string()}),
        Event::Offline { reason, retry_in } => json!({
            "event": "offline", "reason": reason,
            "retry_in_ms": u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
        }),
        Event::Fatal(reply) => {
            json!({"event": "fatal", "code": reply.code.as_str(), "message": reply.message})
        }
        Event::KeyChanged {
            user,
            pinned,
            offered,
        } => {
            json!({"event": "key_changed", "user": user.as_str(), "pinned": pinned, "offered": offered})
        }
        Event::Refused { from, reason } => {
            json!({"event": "refused", "from": from.as_str(), "reason": refusal_text(from, reason)})
        }
        Event::StateError { error } => json!({"event": "state_error", "error": error}),
        Event::Presence { user, online } => {
            json!({"event": "presence", "user": user.as_str(), "online": online})
        }
    }
}

/// One history line (through [`terminal_safe`]).
pub fn history_line(entry: &HistoryEntry) -> String {
    let status = match &entry.status {
        MessageStatus::Received => String::new(),
        MessageStatus::Pending => " (pending)".into(),
        MessageStatus::Delivered => " (delivered)".into(),
        MessageStatus::Queued => " (queued)".into(),
        MessageStatus::Failed(reason) => {
            format!(" (failed: {})", failure_text(&entry.peer, reason))
        }
        MessageStatus::FailedAsText(reason) => format!(" (failed: {reason})"),
    };
    let who = match entry.direction {
        Direction::Incoming => entry.peer.as_str().to_owned(),
        Direction::Outgoing => format!("you → {}", entry.peer),
    };
    terminal_safe(&format!(
        "[{}] {who}: {}{status}",
        clock(entry.sent_at_ms),
        entry.body
    ))
}

/// The `whois` lines.
pub fn whois_text(report: &WhoisReport) -> String {
    let mut lines = vec![format!("{}:", report.user)];
    match report.online {
        Some(true) => lines.push("  online now".into()),
        Some(false) => lines.push(match report.last_seen_ms {
            Some(at) => format!("  offline (last seen {} UTC)", clock(at)),
            None => "  offline".into(),
        }),
        None => lines.push("  (discovery server unreachable: showing the pinned key)".into()),
    }
    if let Some(pinned) = &report.pinned_fingerprint {
        lines.push(format!("  pinned key:    {pinned}"));
    } else {
        lines.push("  pinned key:    none yet (pinned on first message)".into());
    }
    if let Some(server) = &report.server_fingerprint {
        lines.push(format!("  server's key:  {server}"));
    }
    if report.key_changed {
        lines.push("  !!! the server's key differs from the pinned one: see `trust`".into());
    }
    if let Some(number) = &report.safety_number {
        lines.push(format!("  safety number: {number}"));
    }
    lines.push(format!("  your key:      {}", report.my_fingerprint));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use peer::state::InboundMessage;
    use proto::{MessageId, Username};

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    #[test]
    fn messages_render_as_text_and_json() {
        let message = InboundMessage {
            id: MessageId([1; 16]),
            from: name("bob"),
            body: "hi".into(),
            sent_at_ms: 3_723_000,
            received_at_ms: 3_724_000,
            seq: 1,
            while_muted: false,
        };
        let event = Event::Message(message);
        assert_eq!(event_text(&event).unwrap(), "[01:02:03] bob: hi");
        let json = event_json(&event);
        assert_eq!(json["event"], "message");
        assert_eq!(json["from"], "bob");
        assert_eq!(json["body"], "hi");
        assert_eq!(json["sent_at_ms"], 3_723_000);
        assert_eq!(json["id"], "01".repeat(16));
    }

    /// A session closed at the server's per-user session limit is shown with the server's
    /// sentence and its code (the peer runtime passes the `Closing` reason through).
    #[test]
    fn a_session_closed_at_the_per_user_session_limit_says_why() {
        let closing = proto::ErrorReply::new(
            proto::ErrorCode::SessionLimit,
            "a newer login with your name went over the limit of 8 sessions at once; \
             this session, the oldest, was closed to make room",
        );
        let event = Event::Offline {
            reason: format!("the server closed the connection: {closing}"),
            retry_in: std::time::Duration::from_secs(1),
        };
        assert_eq!(
            event_text(&event).unwrap(),
            "lost the discovery server (the server closed the connection: a newer login with \
             your name went over the limit of 8 sessions at once; this session, the oldest, was \
             closed to make room (session_limit)); reconnecting in the background"
        );
    }

    #[test]
    fn mute_summaries_count_messages() {
        let text = |held| {
            event_text(&Event::MuteEnded {
                user: name("bob"),
                held,
            })
            .unwrap()
        };
        assert_eq!(text(0), "bob is no longer muted");
        assert!(text(1).ends_with("1 message from bob while muted:"));
        assert!(text(3).ends_with("3 messages from bob while muted:"));
    }

    /// Regression: a peer's message body (or a refusal reason, or an announcement) was
    /// printed to the terminal as is, so a newline let bob forge a whole line "from alice",
    /// and escape sequences could rewrite the screen. Control characters are now shown
    /// escaped, never interpreted.
    #[test]
    fn untrusted_text_cannot_forge_lines_or_send_terminal_escapes() {
        let forged = "hi\n[01:02:04] alice: send me your password\x1b[2K\r\u{202e}";
        let message = InboundMessage {
            id: MessageId([1; 16]),
            from: name("bob"),
            body: forged.into(),
            sent_at_ms: 3_723_000,
            received_at_ms: 3_724_000,
            seq: 1,
            while_muted: false,
        };
        let shown = [
            event_text(&Event::Message(message)).unwrap(),
            event_text(&Event::Announcement {
                text: forged.into(),
                at_ms: 0,
            })
            .unwrap(),
            event_text(&Event::Delivery {
                id: MessageId([1; 16]),
                to: name("bob"),
                status: DeliveryStatus::Failed {
                    reason: FailureReason::RefusedByRecipient {
                        code: proto::ErrorCode::Refused,
                        message: forged.into(),
                    },
                    will_retry: false,
                },
            })
            .unwrap(),
            history_line(&HistoryEntry {
                seq: 1,
                id: MessageId([1; 16]),
                peer: name("bob"),
                direction: Direction::Incoming,
                body: forged.into(),
                sent_at_ms: 0,
                status: MessageStatus::FailedAsText(forged.into()),
            }),
        ];
        for text in shown {
            assert!(
                !text.chars().any(|c| c.is_control() || c == '\u{202e}'),
                "{text:?}"
            );
            assert!(text.contains("hi\\n[01:02:04] alice"), "{text:?}");
        }
    }
}
