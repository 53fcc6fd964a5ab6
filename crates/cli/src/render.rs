//! How events and results look: lines of text for people ([`event_text`], [`history_line`],
//! [`whois_text`]), JSON objects for scripts ([`event_json`], [`online_json`],
//! [`whois_json`], [`history_json`]). Pure functions of their inputs (the time zone, the
//! time now and whether to colour are in a [`Look`]), so the wording is tested.

use jiff::{Timestamp, tz::TimeZone};
use peer::{
    DeliveryStatus, Event, FailureReason, OnlineUsers, RefusalReason, WhoisReport,
    state::{Direction, HistoryEntry, MessageStatus},
};
use proto::{MessageId, OpenError, ReceiptKind, Username, seal::MAX_CLOCK_SKEW_SECS};
use serde_json::{Value, json};

use crate::chats::Chat;

/// How lines are shown on this screen: the time zone of their times, colour or not, and the
/// port this client takes peer connections on (for the connect line).
#[derive(Debug, Clone)]
pub struct Look {
    zone: TimeZone,
    colour: bool,
    peer_port: Option<u16>,
}

/// What a painted piece of text is, which decides its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Paint {
    /// Times and connection notices: dim.
    Quiet,
    /// A sender's name: bold cyan.
    Name,
    /// Failures, refusals, key changes: bold red.
    Warning,
    /// Announcements and the end of a mute: yellow.
    Notice,
}

impl Look {
    /// Times in `zone`, colour if `colour`, the connect line naming `peer_port` if given.
    pub fn new(zone: TimeZone, colour: bool, peer_port: Option<u16>) -> Self {
        Self {
            zone,
            colour,
            peer_port,
        }
    }

    /// For standard output: times in the system's time zone (`TZ` first, as the C library
    /// does), colour only when standard output is a terminal and `NO_COLOR` is unset or
    /// empty (no-color.org).
    pub fn for_stdout(peer_port: Option<u16>) -> Self {
        use std::io::IsTerminal as _;
        let colour = std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
        Self::new(TimeZone::system(), colour, peer_port)
    }

    /// This look without colour (for text that goes into JSON).
    pub fn without_colour(self) -> Self {
        Self {
            colour: false,
            ..self
        }
    }

    /// A time in milliseconds since the epoch, as `HH:MM` in this look's time zone when it
    /// falls on the same local day as `now_ms`, else `YYYY-MM-DD HH:MM`. A time out of the
    /// calendar's range (a peer's clock can claim anything) is `??:??`.
    pub fn time(&self, at_ms: u64, now_ms: u64) -> String {
        let local = |ms: u64| {
            let ms = i64::try_from(ms).ok()?;
            let at = Timestamp::from_millisecond(ms).ok()?;
            Some(at.to_zoned_datetime(self.zone.clone()))
        };
        let Some(at) = local(at_ms) else {
            return "??:??".to_owned();
        };
        let clock = format!("{:02}:{:02}", at.hour(), at.minute());
        match local(now_ms) {
            Some(now) if now.date() == at.date() => clock,
            _ => format!("{:04}-{:02}-{:02} {clock}", at.year(), at.month(), at.day()),
        }
    }

    /// `text` in the colour of `paint` (every line of it), or as is without colour.
    fn paint(&self, paint: Paint, text: &str) -> String {
        if !self.colour {
            return text.to_owned();
        }
        let start = match paint {
            Paint::Quiet => "\x1b[2m",
            Paint::Name => "\x1b[1;36m",
            Paint::Warning => "\x1b[1;31m",
            Paint::Notice => "\x1b[33m",
        };
        text.lines()
            .map(|line| format!("{start}{line}\x1b[0m"))
            .collect::<Vec<_>>()
            .join("\n")
    }
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
        FailureReason::NoPreKeys => format!(
            "{to} has not published keys for encrypted sessions yet (an older client?); kept in the outbox until they have"
        ),
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
        RefusalReason::Unopenable(error) => unopenable_text(from, error),
        RefusalReason::NotForMe(to) => format!("the message is addressed to {to}, not to me"),
    }
}

/// Why a message from `from` could not be opened, in words.
fn unopenable_text(from: &Username, error: &OpenError) -> String {
    match error {
        OpenError::BadToken { peer } => format!(
            "it does not decrypt with the key shared with {peer}: forged, tampered with, or \
             sealed for someone else"
        ),
        OpenError::ClockSkew { ahead_secs } => format!(
            "it is dated {ahead_secs} s in the future: {from}'s clock or this machine's is wrong \
             (they must agree within {MAX_CLOCK_SKEW_SECS} s)"
        ),
        OpenError::Malformed => "it decrypts, but what it holds is not a message".into(),
        OpenError::Mismatch { field } => format!(
            "its sealed {field} does not match its envelope (tampered with, or sealed for \
             someone else)"
        ),
        OpenError::Replayed(id) => {
            format!("message {id} was received already (a replay or a retransmission)")
        }
        OpenError::NoSession { .. } => format!(
            "a message from {from} could not be opened: the encrypted session it belongs to is \
             gone here (a restored backup or a new data dir). {from}'s next message starts a new \
             one"
        ),
        OpenError::Legacy => "it is sealed the old way (no forward secrecy) and dated after this \
             client moved to forward-secret sessions"
            .into(),
        OpenError::Expired { window_secs } => {
            format!("it is older than the {window_secs} s window in which repeats are caught")
        }
    }
}

/// Why the client stopped talking to the server for good: the server presented another
/// key than the one pinned for it, a newer login of the same user signed this one out, or
/// the registration was refused.
pub fn fatal_text(reply: &proto::ErrorReply) -> String {
    match reply.code {
        // Said as it is: it names both fingerprints and what to do.
        proto::ErrorCode::ServerKeyChanged => reply.message.clone(),
        proto::ErrorCode::SessionLimit => format!(
            "signed out: {reply}; not reconnecting (start p2pchat again to sign in here, \
             which closes your oldest session)"
        ),
        _ => format!("cannot register: {reply}"),
    }
}

/// The text lines for one event at `now_ms` (`None`: nothing to show). Everything but the
/// key-change warning (whose line breaks are ours, around fingerprints and a name) passes
/// through [`terminal_safe`] before it is painted.
pub fn event_text(event: &Event, look: &Look, now_ms: u64) -> Option<String> {
    let paint = match event {
        Event::Message(message) => {
            let muted = if message.while_muted {
                " (while muted)"
            } else {
                ""
            };
            // Mail that waited in the mailbox says so, as the original client did.
            let offline = if message.via_mailbox {
                format!("{} ", look.paint(Paint::Quiet, "[offline]"))
            } else {
                String::new()
            };
            // A message of several lines (a paste) shows as several lines, each with the
            // sender's prefix: no line of it can pass for a line from someone else.
            let prefix = format!(
                "{} {offline}{}: ",
                look.paint(
                    Paint::Quiet,
                    &format!("[{}]", look.time(message.sent_at_ms, now_ms))
                ),
                look.paint(Paint::Name, message.from.as_str()),
            );
            let lines: Vec<String> = message
                .body
                .split('\n')
                .map(|line| format!("{prefix}{}", terminal_safe(line)))
                .collect();
            return Some(format!("{}{muted}", lines.join("\n")));
        }
        Event::Online { .. }
        | Event::Offline { .. }
        | Event::Presence { .. }
        | Event::Receipt { .. } => Paint::Quiet,
        Event::MuteEnded { .. }
        | Event::ResendAsked { .. }
        | Event::Announcement { .. }
        | Event::KeyRotated { .. }
        | Event::SessionElsewhere { .. } => Paint::Notice,
        Event::Delivery { status, .. } if status.is_success() => Paint::Quiet,
        Event::Delivery { .. }
        | Event::Fatal(_)
        | Event::KeyChanged { .. }
        | Event::Refused { .. }
        | Event::StateError { .. } => Paint::Warning,
    };
    let text = event_text_raw(event, look, now_ms);
    let text = match event {
        Event::KeyChanged { .. } => text,
        _ => terminal_safe(&text),
    };
    Some(look.paint(paint, &text))
}

/// The line of a message this client sent, once its result is known (`→ bob: delivered`).
pub fn sent_text(to: &Username, status: &DeliveryStatus, look: &Look) -> String {
    // The status can carry the recipient's own words (a refusal's reason).
    let text = terminal_safe(&format!("→ {to}: {}", status_text(to, status)));
    if status.is_success() {
        text
    } else {
        look.paint(Paint::Warning, &text)
    }
}

fn event_text_raw(event: &Event, look: &Look, now_ms: u64) -> String {
    match event {
        Event::Message(message) => format!("{}: {}", message.from, message.body),
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
        Event::Receipt {
            from,
            kind,
            messages,
        } => receipt_text(from, *kind, messages, look, now_ms),
        Event::Announcement { text, at_ms } => {
            format!("*** announcement [{}]: {text}", look.time(*at_ms, now_ms))
        }
        // The server sees the control connection's source port, which is not where peers
        // connect: the port shown is the peer listener's.
        Event::Online { observed } => match look.peer_port {
            Some(port) => format!(
                "connected to the discovery server (it sees you at {}; peers connect to you on port {port})",
                observed.ip()
            ),
            None => format!(
                "connected to the discovery server (it sees you at {})",
                observed.ip()
            ),
        },
        Event::Offline { reason, .. } => {
            format!("lost the discovery server ({reason}); reconnecting in the background")
        }
        Event::Fatal(reply) => fatal_text(reply),
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
        Event::ResendAsked { from, messages } => resend_asked_text(from, *messages),
        Event::StateError { error } => format!("local state error: {error}"),
        Event::Presence { user, online: true } => format!("{user} is online"),
        Event::Presence {
            user,
            online: false,
        } => format!("{user} went offline"),
        // The server sees the control connection's address: its IP is where the other
        // session runs (its port is of no use to anyone).
        Event::SessionElsewhere { observed, at_ms } => format!(
            "you signed in elsewhere ({}, at {}); direct messages now go there",
            observed.ip(),
            look.time(*at_ms, now_ms)
        ),
        Event::KeyRotated { user, old, new } => format!(
            "{user} rotated their key: the new key {new} is signed over by the old one {old} \
             that you had pinned, so it is pinned now and messages go on. Your safety number \
             with {user} changed: compare it again (`whois {user}`) if you had compared it"
        ),
    }
}

/// A receipt's line: `bob received your message (sent 12:03)`, `bob read 3 of your
/// messages (sent 12:03 to 12:05)`.
fn receipt_text(
    from: &Username,
    kind: ReceiptKind,
    messages: &[(MessageId, u64)],
    look: &Look,
    now_ms: u64,
) -> String {
    let verb = match kind {
        ReceiptKind::Delivered => "received",
        ReceiptKind::Read => "read",
        ReceiptKind::Resend => "asked again for",
    };
    let first = messages.iter().map(|(_, at)| *at).min().unwrap_or(0);
    let last = messages.iter().map(|(_, at)| *at).max().unwrap_or(0);
    match messages.len() {
        1 => format!(
            "{from} {verb} your message (sent {})",
            look.time(first, now_ms)
        ),
        count => format!(
            "{from} {verb} {count} of your messages (sent {} to {})",
            look.time(first, now_ms),
            look.time(last, now_ms)
        ),
    }
}

/// A receipt kind's name in JSON and history (`delivered`, `read`).
fn receipt_kind_name(kind: ReceiptKind) -> &'static str {
    match kind {
        ReceiptKind::Delivered => "delivered",
        ReceiptKind::Read => "read",
        ReceiptKind::Resend => "resend",
    }
}

/// The notice of messages asked for again: `a message from bob could not be opened (its
/// encrypted session is gone here); asked bob to send it again`.
pub fn resend_asked_text(from: &Username, messages: usize) -> String {
    let (what, it) = match messages {
        1 => ("a message".to_owned(), "it"),
        count => (format!("{count} messages"), "them"),
    };
    format!(
        "{what} from {from} could not be opened (the encrypted session is gone here: a \
         restored backup or a new data dir); asked {from} to send {it} again"
    )
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
            "via_mailbox": message.via_mailbox,
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
        Event::ResendAsked { from, messages } => json!({
            "event": "resend_asked", "from": from.as_str(), "messages": messages,
            "text": resend_asked_text(from, *messages),
        }),
        Event::StateError { error } => json!({"event": "state_error", "error": error}),
        Event::Presence { user, online } => {
            json!({"event": "presence", "user": user.as_str(), "online": online})
        }
        Event::SessionElsewhere { observed, at_ms } => json!({
            "event": "session_elsewhere", "observed": observed.ip().to_string(), "at_ms": at_ms,
        }),
        Event::KeyRotated { user, old, new } => {
            json!({"event": "key_rotated", "user": user.as_str(), "old": old, "new": new})
        }
        Event::Receipt {
            from,
            kind,
            messages,
        } => {
            let messages: Vec<Value> = messages
                .iter()
                .map(|(id, sent_at_ms)| json!({"id": id.to_string(), "sent_at_ms": sent_at_ms}))
                .collect();
            json!({"event": "receipt", "kind": receipt_kind_name(*kind), "from": from.as_str(), "messages": messages})
        }
    }
}

/// One history line at `now_ms` (through [`terminal_safe`]).
pub fn history_line(entry: &HistoryEntry, look: &Look, now_ms: u64) -> String {
    let status = match &entry.status {
        MessageStatus::Received => String::new(),
        MessageStatus::Pending => " (pending)".into(),
        MessageStatus::Delivered => " (delivered)".into(),
        MessageStatus::Queued => " (queued)".into(),
        MessageStatus::Read => " (read)".into(),
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
        look.time(entry.sent_at_ms, now_ms),
        entry.body
    ))
}

/// The `whois` lines at `now_ms`.
pub fn whois_text(report: &WhoisReport, look: &Look, now_ms: u64) -> String {
    let mut lines = vec![format!("{}:", report.user)];
    match report.online {
        Some(true) => lines.push("  online now".into()),
        Some(false) => lines.push(match report.last_seen_ms {
            Some(at) => format!("  offline (last seen {})", look.time(at, now_ms)),
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
    if let Some(number) = &report.safety_number {
        lines.push(format!("  safety number: {number}"));
    }
    if report.key_changed {
        lines.push(format!(
            "  !!! the server's key differs from the pinned one: the safety number above is \
             for the server's (new) key, and differs from the pinned key's{}. Compare it with \
             {user} in person; if it matches, `trust {user}` pins the new key",
            report
                .pinned_safety_number
                .as_ref()
                .map(|number| format!(" ({number})"))
                .unwrap_or_default(),
            user = report.user,
        ));
    }
    lines.push(format!("  your key:      {}", report.my_fingerprint));
    lines.join("\n")
}

/// `chats`' lines at `now_ms`: one per conversation, the latest first.
pub fn chats_text(chats: &[(&str, Chat)], look: &Look, now_ms: u64) -> String {
    if chats.is_empty() {
        return "no conversations yet".to_owned();
    }
    chats
        .iter()
        .map(|(user, chat)| {
            let unread = match chat.unread {
                0 => String::new(),
                count => format!(", {count} unread"),
            };
            format!(
                "{user}: last message {}{unread}",
                look.time(chat.last_ms, now_ms)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `list`'s fields: `users` (names, sorted) and `more` (online, not listed).
pub fn online_json(online: &OnlineUsers) -> Value {
    json!({
        "users": online.users.iter().map(Username::as_str).collect::<Vec<_>>(),
        "more": online.more,
    })
}

/// `blocked`'s fields: `users`.
pub fn users_json(users: &[Username]) -> Value {
    json!({ "users": users.iter().map(Username::as_str).collect::<Vec<_>>() })
}

/// `whois`'s fields, one per line of [`whois_text`] (`null` where the text says "none" or
/// "unreachable").
pub fn whois_json(report: &WhoisReport) -> Value {
    json!({
        "user": report.user.as_str(),
        "online": report.online,
        "last_seen_ms": report.last_seen_ms,
        "pinned_fingerprint": report.pinned_fingerprint,
        "server_fingerprint": report.server_fingerprint,
        "key_changed": report.key_changed,
        "safety_number": report.safety_number,
        "pinned_safety_number": report.pinned_safety_number,
        "my_fingerprint": report.my_fingerprint,
    })
}

/// `history`'s fields: `user` and `messages`, oldest first, each with `id`, `direction`
/// (`incoming`, `outgoing`), `body`, `sent_at_ms`, `status` (`received`, `pending`,
/// `delivered`, `read`, `queued`, `failed`) and `reason` (a failure's, else `null`).
pub fn history_json(user: &Username, entries: &[HistoryEntry]) -> Value {
    let messages: Vec<Value> = entries
        .iter()
        .map(|entry| {
            let (status, reason) = match &entry.status {
                MessageStatus::Received => ("received", None),
                MessageStatus::Pending => ("pending", None),
                MessageStatus::Delivered => ("delivered", None),
                MessageStatus::Queued => ("queued", None),
                MessageStatus::Read => ("read", None),
                MessageStatus::Failed(reason) => ("failed", Some(failure_text(user, reason))),
                MessageStatus::FailedAsText(reason) => ("failed", Some(reason.clone())),
            };
            json!({
                "id": entry.id.to_string(),
                "direction": match entry.direction {
                    Direction::Incoming => "incoming",
                    Direction::Outgoing => "outgoing",
                },
                "body": entry.body,
                "sent_at_ms": entry.sent_at_ms,
                "status": status,
                "reason": reason,
            })
        })
        .collect();
    json!({ "user": user.as_str(), "messages": messages })
}

#[cfg(test)]
mod tests {
    use super::*;
    use peer::state::InboundMessage;
    use proto::{MessageId, Username};

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    /// UTC, no colour, no peer port.
    fn plain() -> Look {
        Look::new(TimeZone::UTC, false, None)
    }

    /// A message from bob sent at 01:02:03 UTC, received a second later.
    fn from_bob(body: &str) -> InboundMessage {
        InboundMessage {
            id: MessageId([1; 16]),
            from: name("bob"),
            body: body.into(),
            sent_at_ms: 3_723_000,
            received_at_ms: 3_724_000,
            seq: 1,
            while_muted: false,
            via_mailbox: false,
        }
    }

    /// The event's text on a plain look at 01:02:04 UTC on 1970-01-01.
    fn event_text(event: &Event) -> Option<String> {
        super::event_text(event, &plain(), 3_724_000)
    }

    #[test]
    fn messages_render_as_text_and_json() {
        let message = from_bob("hi");
        let event = Event::Message(message.clone());
        assert_eq!(event_text(&event).unwrap(), "[01:02] bob: hi");
        let mail = Event::Message(InboundMessage {
            via_mailbox: true,
            ..message
        });
        assert_eq!(event_text(&mail).unwrap(), "[01:02] [offline] bob: hi");
        assert_eq!(event_json(&mail)["via_mailbox"], true);
        let json = event_json(&event);
        assert_eq!(json["event"], "message");
        assert_eq!(json["from"], "bob");
        assert_eq!(json["body"], "hi");
        assert_eq!(json["sent_at_ms"], 3_723_000);
        assert_eq!(json["id"], "01".repeat(16));
    }

    /// A session closed at the server's per-user session limit is shown with the server's
    /// sentence and its code, and says that it does not reconnect by itself (the peer
    /// runtime stops on it, so sessions of one user do not keep closing one another).
    #[test]
    fn a_session_closed_at_the_per_user_session_limit_says_why() {
        let closing = proto::ErrorReply::new(
            proto::ErrorCode::SessionLimit,
            "a newer login with your name went over the limit of 8 sessions at once; \
             this session, the oldest, was closed to make room",
        );
        assert_eq!(
            event_text(&Event::Fatal(closing)).unwrap(),
            "signed out: a newer login with your name went over the limit of 8 sessions at \
             once; this session, the oldest, was closed to make room (session_limit); not \
             reconnecting (start p2pchat again to sign in here, which closes your oldest \
             session)"
        );
        let refused = proto::ErrorReply::new(proto::ErrorCode::NameTaken, "taken");
        assert_eq!(
            event_text(&Event::Fatal(refused)).unwrap(),
            "cannot register: taken (name_taken)"
        );
    }

    /// A message that could not be opened is refused in this client's words, for every
    /// reason: the sender and the bound to check for a clock, the id for a repeat, what to
    /// expect for a lost session; the text and the JSON say the same.
    #[test]
    fn a_message_that_could_not_be_opened_says_why() {
        let bob = name("bob");
        let refused = |error: OpenError| Event::Refused {
            from: bob.clone(),
            reason: RefusalReason::Unopenable(error),
        };
        let clock = refused(OpenError::ClockSkew { ahead_secs: 300 });
        assert_eq!(
            event_text(&clock).unwrap(),
            "refused a message from bob: it is dated 300 s in the future: bob's clock or this \
             machine's is wrong (they must agree within 60 s)"
        );
        assert_eq!(
            event_json(&clock)["reason"],
            "it is dated 300 s in the future: bob's clock or this machine's is wrong (they \
             must agree within 60 s)"
        );
        assert_eq!(
            event_text(&refused(OpenError::Replayed(MessageId([1; 16])))).unwrap(),
            format!(
                "refused a message from bob: message {} was received already (a replay or a \
                 retransmission)",
                "01".repeat(16)
            )
        );
        assert!(
            event_text(&refused(OpenError::NoSession { peer: bob.clone() }))
                .unwrap()
                .ends_with("bob's next message starts a new one")
        );
        let others = [
            OpenError::BadToken { peer: bob.clone() },
            OpenError::Malformed,
            OpenError::Mismatch { field: "recipient" },
            OpenError::Legacy,
            OpenError::Expired { window_secs: 600 },
        ];
        let texts: Vec<String> = others
            .into_iter()
            .map(|error| event_text(&refused(error)).unwrap())
            .collect();
        assert!(texts[0].contains("forged, tampered with, or sealed for someone else"));
        assert!(texts[2].contains("its sealed recipient does not match"));
        assert!(texts[4].contains("600 s"));
        let distinct: std::collections::BTreeSet<&String> = texts.iter().collect();
        assert_eq!(
            distinct.len(),
            5,
            "each reason has words of its own: {texts:?}"
        );
    }

    /// Times are local (the zone of `TZ`), with the date when not today.
    #[test]
    fn times_are_local_with_the_date_when_not_today() {
        // 2026-12-02 09:30 UTC; "now" is 10:00 UTC the same day.
        let at = 1_796_203_800_000;
        let now = at + 30 * 60 * 1000;
        assert_eq!(plain().time(at, now), "09:30");
        let kolkata = Look::new(TimeZone::posix("IST-5:30").unwrap(), false, None);
        assert_eq!(kolkata.time(at, now), "15:00");
        let new_york = Look::new(
            TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").unwrap(),
            false,
            None,
        );
        assert_eq!(new_york.time(at, now), "04:30");
        // The day before, locally.
        assert_eq!(plain().time(at - 24 * 3600 * 1000, now), "2026-12-01 09:30");
        // A peer's clock can claim anything.
        assert_eq!(plain().time(u64::MAX, now), "??:??");
    }

    #[test]
    fn colour_is_added_only_when_asked_and_never_inside_untrusted_text() {
        let message = Event::Message(from_bob("hi"));
        let coloured = Look::new(TimeZone::UTC, true, None);
        let text = super::event_text(&message, &coloured, 3_724_000).unwrap();
        assert_eq!(text, "\x1b[2m[01:02]\x1b[0m \x1b[1;36mbob\x1b[0m: hi");
        assert!(!event_text(&message).unwrap().contains('\x1b'));
        let failed = DeliveryStatus::Failed {
            reason: FailureReason::RefusedByRecipient {
                code: proto::ErrorCode::Refused,
                message: "\x1b[2Jgone".into(),
            },
            will_retry: false,
        };
        let line = sent_text(&name("bob"), &failed, &coloured);
        assert!(
            line.starts_with("\x1b[1;31m") && line.contains("\\u{1b}[2Jgone"),
            "{line:?}"
        );
    }

    /// Regression: the connect line showed the control connection's source port as if
    /// peers could reach this client there.
    #[test]
    fn the_connect_line_names_the_peer_port_not_the_control_connection_port() {
        let event = Event::Online {
            observed: "127.0.0.1:56698".parse().unwrap(),
        };
        let look = Look::new(TimeZone::UTC, false, Some(40_123));
        let text = super::event_text(&event, &look, 0).unwrap();
        assert_eq!(
            text,
            "connected to the discovery server (it sees you at 127.0.0.1; peers connect to you on port 40123)"
        );
        assert!(!text.contains("56698"));
    }

    #[test]
    fn chats_show_the_latest_first_with_unread_counts() {
        let chats = [
            (
                "bob",
                Chat {
                    unread: 2,
                    last_ms: 3_600_000,
                },
            ),
            (
                "carol",
                Chat {
                    unread: 0,
                    last_ms: 60_000,
                },
            ),
        ];
        assert_eq!(
            chats_text(&chats, &plain(), 3_700_000),
            "bob: last message 01:00, 2 unread\ncarol: last message 00:01"
        );
        assert_eq!(chats_text(&[], &plain(), 0), "no conversations yet");
    }

    /// Regression (issue 14): after bob's key changed, alice's `whois bob` showed the
    /// safety number of the old key while the new bob's showed the new one, so "compare,
    /// then `trust`" never matched. The number shown is the server's key's, and the text
    /// says it differs from the pinned one.
    #[test]
    fn whois_after_a_key_change_shows_the_new_keys_number_and_says_so() {
        let report = WhoisReport {
            user: name("bob"),
            my_fingerprint: "mine".into(),
            pinned_fingerprint: Some("old".into()),
            server_fingerprint: Some("new".into()),
            safety_number: Some("11111 22222".into()),
            pinned_safety_number: Some("33333 44444".into()),
            key_changed: true,
            online: Some(true),
            last_seen_ms: None,
        };
        let text = whois_text(&report, &plain(), 0);
        assert!(text.contains("safety number: 11111 22222"), "{text}");
        assert!(
            text.contains("differs from the pinned key's (33333 44444)"),
            "{text}"
        );
        assert!(text.contains("`trust bob`"), "{text}");
        let rotated = Event::KeyRotated {
            user: name("bob"),
            old: "old".into(),
            new: "new".into(),
        };
        let line = event_text(&rotated).unwrap();
        assert!(line.contains("bob rotated their key"), "{line}");
        assert!(line.contains("signed over by the old one old"), "{line}");
        assert_eq!(event_json(&rotated)["event"], "key_rotated");
    }

    #[test]
    fn results_have_structured_fields() {
        let online = OnlineUsers {
            users: vec![name("alice"), name("bob")],
            more: 3,
        };
        assert_eq!(
            online_json(&online),
            json!({"users": ["alice", "bob"], "more": 3})
        );
        let report = WhoisReport {
            user: name("bob"),
            my_fingerprint: "mine".into(),
            pinned_fingerprint: None,
            server_fingerprint: Some("theirs".into()),
            safety_number: Some("12345".into()),
            pinned_safety_number: None,
            key_changed: false,
            online: Some(false),
            last_seen_ms: Some(7),
        };
        let whois = whois_json(&report);
        assert_eq!(whois["pinned_fingerprint"], Value::Null);
        assert_eq!(whois["server_fingerprint"], "theirs");
        assert_eq!(whois["online"], false);
        assert_eq!(whois["last_seen_ms"], 7);
        let entry = |direction, status| HistoryEntry {
            seq: 1,
            id: MessageId([2; 16]),
            peer: name("bob"),
            direction,
            body: "hey".into(),
            sent_at_ms: 5,
            status,
        };
        let history = history_json(
            &name("bob"),
            &[
                entry(Direction::Incoming, MessageStatus::Received),
                entry(
                    Direction::Outgoing,
                    MessageStatus::Failed(FailureReason::RefusedByRecipient {
                        code: proto::ErrorCode::Blocked,
                        message: "blocked".into(),
                    }),
                ),
            ],
        );
        assert_eq!(history["user"], "bob");
        assert_eq!(history["messages"][0]["direction"], "incoming");
        assert_eq!(history["messages"][0]["status"], "received");
        assert_eq!(history["messages"][0]["reason"], Value::Null);
        assert_eq!(history["messages"][1]["direction"], "outgoing");
        assert_eq!(history["messages"][1]["status"], "failed");
        assert_eq!(
            history["messages"][1]["reason"],
            "refused by the recipient: blocked"
        );
        assert_eq!(history["messages"][1]["body"], "hey");
        assert_eq!(history["messages"][1]["id"], "02".repeat(16));
    }

    #[test]
    fn receipts_say_who_received_or_read_which_messages_as_text_and_json() {
        let look = plain();
        let (one, two) = (MessageId::random(), MessageId::random());
        // 12:03 and 12:05 UTC on the day of `now`.
        let day = 1_790_000_000_000 - 1_790_000_000_000 % 86_400_000;
        let (at_1203, at_1205) = (day + (12 * 60 + 3) * 60_000, day + (12 * 60 + 5) * 60_000);
        let delivered = Event::Receipt {
            from: name("bob"),
            kind: ReceiptKind::Delivered,
            messages: vec![(one, at_1203)],
        };
        assert_eq!(
            super::event_text(&delivered, &look, at_1205).unwrap(),
            "bob received your message (sent 12:03)"
        );
        let read = Event::Receipt {
            from: name("bob"),
            kind: ReceiptKind::Read,
            messages: vec![(one, at_1203), (two, at_1205)],
        };
        assert_eq!(
            super::event_text(&read, &look, at_1205).unwrap(),
            "bob read 2 of your messages (sent 12:03 to 12:05)"
        );
        assert_eq!(
            event_json(&read),
            json!({
                "event": "receipt",
                "kind": "read",
                "from": "bob",
                "messages": [
                    {"id": one.to_string(), "sent_at_ms": at_1203},
                    {"id": two.to_string(), "sent_at_ms": at_1205},
                ],
            })
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
    /// and escape sequences could rewrite the screen. Control characters are shown escaped,
    /// never interpreted; a message's own line breaks start lines that name its sender.
    #[test]
    fn untrusted_text_cannot_forge_lines_or_send_terminal_escapes() {
        let forged = "hi\n[01:02:04] alice: send me your password\x1b[2K\r\u{202e}";
        let message = from_bob(forged);
        // A message's lines each carry its sender.
        let lines = event_text(&Event::Message(message)).unwrap();
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in &lines {
            assert!(line.starts_with("[01:02] bob: "), "{line:?}");
            assert!(
                !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
                "{line:?}"
            );
        }
        assert!(
            lines[1].starts_with("[01:02] bob: [01:02:04] alice"),
            "{lines:?}"
        );
        let shown = [
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
            history_line(
                &HistoryEntry {
                    seq: 1,
                    id: MessageId([1; 16]),
                    peer: name("bob"),
                    direction: Direction::Incoming,
                    body: forged.into(),
                    sent_at_ms: 0,
                    status: MessageStatus::FailedAsText(forged.into()),
                },
                &plain(),
                0,
            ),
        ];
        for text in shown {
            assert!(
                !text.chars().any(|c| c.is_control() || c == '\u{202e}'),
                "{text:?}"
            );
            assert!(text.contains("hi\\n[01:02:04] alice"), "{text:?}");
        }
    }

    #[test]
    fn mail_asked_for_again_is_one_notice_in_text_and_json() {
        let one = Event::ResendAsked {
            from: name("bob"),
            messages: 1,
        };
        let text = event_text(&one).unwrap();
        assert!(
            text.starts_with("a message from bob could not be opened")
                && text.ends_with("asked bob to send it again"),
            "{text}"
        );
        let three = Event::ResendAsked {
            from: name("bob"),
            messages: 3,
        };
        let text = event_text(&three).unwrap();
        assert!(
            text.starts_with("3 messages from bob could not be opened")
                && text.ends_with("asked bob to send them again"),
            "{text}"
        );
        let json = event_json(&three);
        assert_eq!(json["event"], "resend_asked");
        assert_eq!(json["from"], "bob");
        assert_eq!(json["messages"], 3);
        assert_eq!(json["text"], text.as_str());
    }

    #[test]
    fn contact_presence_and_another_session_render_as_text_and_json() {
        let online = Event::Presence {
            user: name("bob"),
            online: true,
        };
        let offline = Event::Presence {
            user: name("bob"),
            online: false,
        };
        assert_eq!(event_text(&online).unwrap(), "bob is online");
        assert_eq!(event_text(&offline).unwrap(), "bob went offline");
        assert_eq!(
            event_json(&offline),
            json!({"event": "presence", "user": "bob", "online": false})
        );
        let elsewhere = Event::SessionElsewhere {
            observed: "192.0.2.7:40000".parse().unwrap(),
            at_ms: 3_723_000,
        };
        assert_eq!(
            event_text(&elsewhere).unwrap(),
            "you signed in elsewhere (192.0.2.7, at 01:02); direct messages now go there"
        );
        assert_eq!(
            event_json(&elsewhere),
            json!({"event": "session_elsewhere", "observed": "192.0.2.7", "at_ms": 3_723_000})
        );
    }
}
