//! The interactive commands, parsed by one pure function: [`parse`].
//!
//! The commands: `help`, `list`, `send <user> <message>`, `chat <user>` (`query`), `msg
//! <user> <message>`, `chat` alone (`close`), `chats`, `block <user>`, `unblock <user>`,
//! `blocked`, `mute <user> <seconds>`, `unmute <user>`, `whois <user>`, `trust <user>`,
//! `history <user> [n]`, `quit`. Each also works with a leading `/`. With a conversation open, a line
//! without a leading `/` is a message to that user (a leading `//` sends a line that starts
//! with `/`), so a message is never taken for a command. Bad forms are a [`ParseError`] that
//! says what was wrong and shows the usage line.

use proto::{Username, UsernameError};

/// How many history lines `history <user>` shows by default.
pub const DEFAULT_HISTORY: usize = 20;

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An empty line: do nothing.
    Nothing,
    /// Show the commands.
    Help,
    /// Who is online.
    List,
    /// Send a message.
    Send {
        /// To whom.
        to: Username,
        /// The text (inner spacing kept).
        body: String,
    },
    /// Block a user.
    Block(Username),
    /// Unblock a user.
    Unblock(Username),
    /// Show the blocked users.
    Blocked,
    /// Mute a user for some seconds.
    Mute {
        /// Whom.
        user: Username,
        /// For how long.
        seconds: u64,
    },
    /// End a mute.
    Unmute(Username),
    /// Fingerprints and safety number.
    Whois(Username),
    /// Re-pin a user's keys.
    Trust(Username),
    /// The last messages with a user.
    History {
        /// With whom.
        user: Username,
        /// How many lines.
        limit: usize,
    },
    /// Open a conversation: plain lines go to this user from now on.
    Open(Username),
    /// Open a conversation with `to` and send it `body` (`msg`).
    OpenAndSend {
        /// To whom.
        to: Username,
        /// The text (inner spacing kept).
        body: String,
    },
    /// Leave the open conversation.
    Close,
    /// The conversations, with unread counts.
    Chats,
    /// Leave.
    Quit,
}

/// Why a line is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No such command.
    #[error("unknown command {0:?}; type `help` for the list")]
    Unknown(String),
    /// Missing or extra arguments.
    #[error("usage: {0}")]
    Usage(&'static str),
    /// A user name that is not valid.
    #[error("{name:?} is not a valid username: {reason}")]
    BadUser {
        /// The name given.
        name: String,
        /// Why.
        reason: UsernameError,
    },
    /// A number that is not a positive integer.
    #[error("{what} must be a positive whole number (got {got:?})")]
    BadNumber {
        /// Which argument.
        what: &'static str,
        /// What was given.
        got: String,
    },
}

/// Every command word, for completion.
pub const COMMANDS: &[&str] = &[
    "block", "blocked", "chat", "chats", "close", "help", "history", "list", "msg", "mute",
    "query", "quit", "send", "trust", "unblock", "unmute", "whois",
];

/// Whether the command `word` (without its `/`) takes a user name as its first argument.
pub fn takes_user(word: &str) -> bool {
    matches!(
        word,
        "block"
            | "chat"
            | "history"
            | "msg"
            | "mute"
            | "query"
            | "send"
            | "trust"
            | "unblock"
            | "unmute"
            | "whois"
    )
}

/// The user a parsed command names, if any (to learn names for completion).
pub fn named_user(command: &Command) -> Option<&Username> {
    match command {
        Command::Send { to, .. } | Command::OpenAndSend { to, .. } | Command::Open(to) => Some(to),
        Command::Block(user)
        | Command::Unblock(user)
        | Command::Unmute(user)
        | Command::Whois(user)
        | Command::Trust(user)
        | Command::Mute { user, .. }
        | Command::History { user, .. } => Some(user),
        Command::Nothing
        | Command::Help
        | Command::List
        | Command::Blocked
        | Command::Close
        | Command::Chats
        | Command::Quit => None,
    }
}

/// The help text: one line per command.
pub const HELP: &str = "\
commands (each also with a leading /, as in /list):
  chat <user>             open a conversation: plain lines then go to <user> (also /query)
  msg <user> <message>    open a conversation with <user> and send a message
  chat                    leave the conversation (also /close); in a conversation,
                          commands need their leading /, and // sends a line starting with /
  chats                   conversations, the latest first, with unread counts
  send <user> <message>   send a message (direct, else to their mailbox)
  list                    who is online
  history <user> [n]      the last n messages with <user> (default 20)
  block <user>            refuse messages and mail from <user>
  unblock <user>          accept <user> again
  blocked                 show blocked users
  mute <user> <seconds>   hide <user>'s messages for a while (kept, shown after)
  unmute <user>           end a mute now
  whois <user>            fingerprints and safety number
  trust <user>            accept <user>'s current key (after checking `whois`)
  help                    this text
  quit                    leave (also Ctrl-C, Ctrl-D)
Tab completes commands and names; Alt-Enter types a line break in a message.";

const USAGE_SEND: &str = "send <user> <message>";
const USAGE_MSG: &str = "msg <user> <message>";
const USAGE_CHAT: &str = "chat [<user>]";
const USAGE_MUTE: &str = "mute <user> <seconds>";
const USAGE_HISTORY: &str = "history <user> [n]";

/// Parses one input line, typed with the conversation `open` (if any): a line without a
/// leading `/` is then a message to that user.
pub fn parse(line: &str, open: Option<&Username>) -> Result<Command, ParseError> {
    let line = line.trim();
    if let Some(to) = open {
        // `//text` is the message `/text`; `/command` is a command; anything else is text.
        let message = match line.strip_prefix('/') {
            Some(rest) if rest.starts_with('/') => Some(rest),
            Some(_) => None,
            None => Some(line),
        };
        if let Some(body) = message {
            return Ok(if body.is_empty() {
                Command::Nothing
            } else {
                Command::Send {
                    to: to.clone(),
                    body: body.to_owned(),
                }
            });
        }
    }
    let line = line.strip_prefix('/').unwrap_or(line);
    let (word, rest) = split_word(line);
    let args: Vec<&str> = rest.split_whitespace().collect();
    match word {
        "" => Ok(Command::Nothing),
        "help" | "?" => no_args(&args, "help", Command::Help),
        "list" => no_args(&args, "list", Command::List),
        "blocked" => no_args(&args, "blocked", Command::Blocked),
        "quit" | "exit" => no_args(&args, "quit", Command::Quit),
        "block" => one_user(&args, "block <user>").map(Command::Block),
        "unblock" => one_user(&args, "unblock <user>").map(Command::Unblock),
        "unmute" => one_user(&args, "unmute <user>").map(Command::Unmute),
        "whois" => one_user(&args, "whois <user>").map(Command::Whois),
        "trust" => one_user(&args, "trust <user>").map(Command::Trust),
        "send" => {
            let (to, body) = user_and_text(rest, USAGE_SEND)?;
            Ok(Command::Send { to, body })
        }
        "msg" => {
            let (to, body) = user_and_text(rest, USAGE_MSG)?;
            Ok(Command::OpenAndSend { to, body })
        }
        "chat" | "query" => match args.as_slice() {
            [] if word == "chat" => Ok(Command::Close),
            [name] => Ok(Command::Open(user(name)?)),
            _ if word == "chat" => Err(ParseError::Usage(USAGE_CHAT)),
            _ => Err(ParseError::Usage("query <user>")),
        },
        "close" => no_args(&args, "close", Command::Close),
        "chats" => no_args(&args, "chats", Command::Chats),
        "mute" => match args.as_slice() {
            [name, seconds] => Ok(Command::Mute {
                user: user(name)?,
                seconds: positive(seconds, "the number of seconds")?,
            }),
            _ => Err(ParseError::Usage(USAGE_MUTE)),
        },
        "history" => match args.as_slice() {
            [name] => Ok(Command::History {
                user: user(name)?,
                limit: DEFAULT_HISTORY,
            }),
            [name, count] => Ok(Command::History {
                user: user(name)?,
                limit: usize::try_from(positive(count, "the number of messages")?)
                    .unwrap_or(usize::MAX),
            }),
            _ => Err(ParseError::Usage(USAGE_HISTORY)),
        },
        other => Err(ParseError::Unknown(other.to_owned())),
    }
}

/// The first word and the rest (with its leading spaces).
fn split_word(text: &str) -> (&str, &str) {
    match text.find(char::is_whitespace) {
        Some(end) => (&text[..end], &text[end..]),
        None => (text, ""),
    }
}

/// A user name and a message text (inner spacing kept), or the usage line.
fn user_and_text(rest: &str, usage: &'static str) -> Result<(Username, String), ParseError> {
    let (name, body) = split_word(rest.trim_start());
    if name.is_empty() || body.trim().is_empty() {
        return Err(ParseError::Usage(usage));
    }
    Ok((user(name)?, body.trim().to_owned()))
}

fn no_args(args: &[&str], usage: &'static str, command: Command) -> Result<Command, ParseError> {
    if args.is_empty() {
        Ok(command)
    } else {
        Err(ParseError::Usage(usage))
    }
}

fn one_user(args: &[&str], usage: &'static str) -> Result<Username, ParseError> {
    match args {
        [name] => user(name),
        _ => Err(ParseError::Usage(usage)),
    }
}

fn user(name: &str) -> Result<Username, ParseError> {
    Username::new(name).map_err(|reason| ParseError::BadUser {
        name: name.to_owned(),
        reason,
    })
}

fn positive(text: &str, what: &'static str) -> Result<u64, ParseError> {
    match text.parse::<u64>() {
        Ok(value) if value > 0 => Ok(value),
        _ => Err(ParseError::BadNumber {
            what,
            got: text.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Username {
        Username::new(text).unwrap()
    }

    /// A line typed with no conversation open.
    fn parse(line: &str) -> Result<Command, ParseError> {
        super::parse(line, None)
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(parse(""), Ok(Command::Nothing));
        assert_eq!(parse("   "), Ok(Command::Nothing));
        assert_eq!(parse("help"), Ok(Command::Help));
        assert_eq!(parse("?"), Ok(Command::Help));
        assert_eq!(parse("list"), Ok(Command::List));
        assert_eq!(parse("blocked"), Ok(Command::Blocked));
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert_eq!(parse("exit"), Ok(Command::Quit));
        assert_eq!(parse("block bob"), Ok(Command::Block(name("bob"))));
        assert_eq!(parse("unblock bob"), Ok(Command::Unblock(name("bob"))));
        assert_eq!(parse("unmute bob"), Ok(Command::Unmute(name("bob"))));
        assert_eq!(parse("whois bob"), Ok(Command::Whois(name("bob"))));
        assert_eq!(parse("trust bob"), Ok(Command::Trust(name("bob"))));
        assert_eq!(
            parse("mute bob 30"),
            Ok(Command::Mute {
                user: name("bob"),
                seconds: 30
            })
        );
        assert_eq!(
            parse("history bob"),
            Ok(Command::History {
                user: name("bob"),
                limit: DEFAULT_HISTORY
            })
        );
        assert_eq!(
            parse("history bob 5"),
            Ok(Command::History {
                user: name("bob"),
                limit: 5
            })
        );
    }

    #[test]
    fn send_keeps_the_message_text() {
        assert_eq!(
            parse("send bob hello there,  bob!"),
            Ok(Command::Send {
                to: name("bob"),
                body: "hello there,  bob!".into()
            })
        );
        assert_eq!(
            parse("  send   bob   x  "),
            Ok(Command::Send {
                to: name("bob"),
                body: "x".into()
            })
        );
        assert_eq!(
            parse("msg bob hi"),
            Ok(Command::OpenAndSend {
                to: name("bob"),
                body: "hi".into()
            })
        );
    }

    #[test]
    fn every_command_also_works_with_a_leading_slash() {
        for line in [
            "help",
            "list",
            "blocked",
            "quit",
            "block bob",
            "whois bob",
            "mute bob 5",
            "history bob 3",
            "send bob hi",
            "msg bob hi",
            "chat bob",
            "chats",
            "chat",
            "close",
        ] {
            assert_eq!(parse(&format!("/{line}")), parse(line), "{line}");
            assert!(parse(line).is_ok(), "{line}");
        }
    }

    /// The completion list and `takes_user` agree with the parser.
    #[test]
    fn every_completed_command_word_is_a_command() {
        for word in COMMANDS {
            let line = if takes_user(word) {
                format!("{word} bob")
            } else {
                (*word).to_owned()
            };
            assert!(
                !matches!(parse(&line), Err(ParseError::Unknown(_))),
                "{word}"
            );
        }
    }

    #[test]
    fn conversations_open_and_close() {
        assert_eq!(parse("chat bob"), Ok(Command::Open(name("bob"))));
        assert_eq!(parse("/query bob"), Ok(Command::Open(name("bob"))));
        assert_eq!(parse("chat"), Ok(Command::Close));
        assert_eq!(parse("/close"), Ok(Command::Close));
        assert_eq!(parse("chat a b"), Err(ParseError::Usage(USAGE_CHAT)));
        assert_eq!(parse("query"), Err(ParseError::Usage("query <user>")));
        assert_eq!(parse("msg bob"), Err(ParseError::Usage(USAGE_MSG)));
        assert!(matches!(parse("chat Bob"), Err(ParseError::BadUser { .. })));
    }

    /// In a conversation a plain line is a message, whatever its first word; commands
    /// need their `/`; `//` escapes a leading slash.
    #[test]
    fn in_a_conversation_plain_lines_are_messages() {
        let bob = name("bob");
        let typed = |line: &str| super::parse(line, Some(&bob));
        let message = |body: &str| {
            Ok(Command::Send {
                to: name("bob"),
                body: body.into(),
            })
        };
        assert_eq!(typed("hello there,  bob"), message("hello there,  bob"));
        assert_eq!(typed("list"), message("list"));
        assert_eq!(typed("quit"), message("quit"));
        assert_eq!(
            typed("//etc/passwd is a path"),
            message("/etc/passwd is a path")
        );
        assert_eq!(typed("/list"), Ok(Command::List));
        assert_eq!(typed("/quit"), Ok(Command::Quit));
        assert_eq!(typed("/close"), Ok(Command::Close));
        assert_eq!(typed("/chat carol"), Ok(Command::Open(name("carol"))));
        assert_eq!(typed("   "), Ok(Command::Nothing));
        assert_eq!(typed("//"), message("/"));
        assert_eq!(typed("/"), Ok(Command::Nothing));
        assert_eq!(typed("/dance"), Err(ParseError::Unknown("dance".into())));
    }

    #[test]
    fn missing_and_extra_arguments_show_the_usage() {
        for (line, usage) in [
            ("send", USAGE_SEND),
            ("send bob", USAGE_SEND),
            ("send bob    ", USAGE_SEND),
            ("mute", USAGE_MUTE),
            ("mute bob", USAGE_MUTE),
            ("mute bob 1 2", USAGE_MUTE),
            ("history", USAGE_HISTORY),
            ("history bob 1 2", USAGE_HISTORY),
            ("block", "block <user>"),
            ("block a b", "block <user>"),
            ("unblock", "unblock <user>"),
            ("unmute", "unmute <user>"),
            ("whois", "whois <user>"),
            ("trust", "trust <user>"),
            ("trust a b", "trust <user>"),
            ("list all", "list"),
            ("help me", "help"),
            ("blocked x", "blocked"),
            ("quit now", "quit"),
        ] {
            assert_eq!(parse(line), Err(ParseError::Usage(usage)), "{line:?}");
        }
    }

    #[test]
    fn bad_names_and_numbers_are_explained() {
        assert!(matches!(
            parse("send Bob hi"),
            Err(ParseError::BadUser {
                reason: UsernameError::BadChar('B'),
                ..
            })
        ));
        assert!(matches!(
            parse("block a;b"),
            Err(ParseError::BadUser { .. })
        ));
        assert!(matches!(
            parse(&format!("whois {}", "x".repeat(33))),
            Err(ParseError::BadUser {
                reason: UsernameError::TooLong(33),
                ..
            })
        ));
        for bad in ["0", "-5", "abc", "1.5", "99999999999999999999999"] {
            assert!(
                matches!(
                    parse(&format!("mute bob {bad}")),
                    Err(ParseError::BadNumber { .. })
                ),
                "{bad}"
            );
            assert!(
                matches!(
                    parse(&format!("history bob {bad}")),
                    Err(ParseError::BadNumber { .. })
                ),
                "{bad}"
            );
        }
        let error = parse("mute bob 0").unwrap_err().to_string();
        assert!(error.contains("positive"), "{error}");
    }

    #[test]
    fn unknown_commands_are_named() {
        assert_eq!(parse("dance"), Err(ParseError::Unknown("dance".into())));
        assert_eq!(
            parse("SEND bob hi"),
            Err(ParseError::Unknown("SEND".into()))
        );
        assert!(parse("dance").unwrap_err().to_string().contains("help"));
    }
}
