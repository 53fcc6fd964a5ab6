//! The interactive prompt's line editor: rustyline on a thread of its own, since its
//! `readline` blocks.
//!
//! rustyline replaced rustyline-async because it has what the prompt needs and the other
//! lacks: a completion hook (Tab completes commands and the names this client has seen), an
//! [`ExternalPrinter`] that prints above the prompt and redraws it with the half-typed line
//! intact, and bracketed paste (a pasted text, newlines included, is one line, inserted at
//! once; Alt-Enter inserts a line break). Its `buffer-redux` feature keeps the bytes read past one line for the next
//! `readline`: without it, lines typed or pasted ahead (a burst of commands) were lost.
//!
//! - [`Editor::start`] starts the thread. It reads a line, parses it with
//!   [`command::parse`] against its own copy of the open conversation (so the prompt for the
//!   next line is right before the caller has even seen this one), and sends a [`Typed`].
//!   After `quit`, end-of-file (Ctrl-D) or Ctrl-C it sends [`Command::Quit`] and stops.
//! - [`Screen`] prints lines above the prompt (or straight to standard output when there is
//!   no terminal).
//! - [`Names`] are the usernames Tab completes; [`complete`] is the pure completion rule.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
};

use proto::Username;
use rustyline::{
    CompletionType, Config, Context, ExternalPrinter, Helper, completion::Completer,
    highlight::Highlighter, hint::Hinter, history::MemHistory, validate::Validator,
};

use crate::command::{self, Command, ParseError};

/// The usernames Tab completes: everyone this client has heard from, written to, or seen in
/// `list`. Shared between the editor thread and the code that learns names.
#[derive(Debug, Clone, Default)]
pub struct Names(Arc<Mutex<BTreeSet<String>>>);

impl Names {
    /// Remembers `user` for completion.
    pub fn learn(&self, user: &Username) {
        let mut names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !names.contains(user.as_str()) {
            names.insert(user.as_str().to_owned());
        }
    }

    fn snapshot(&self) -> BTreeSet<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The completions of the word before `pos` in `line`: the start of that word and its
/// candidates. The first word completes to a command (keeping a typed `/`), unless a
/// conversation is open and it has no `/` (it is message text then); the word after a
/// command that takes a user completes to a known name; anything else to nothing.
pub fn complete(
    line: &str,
    pos: usize,
    names: &BTreeSet<String>,
    in_conversation: bool,
) -> (usize, Vec<String>) {
    let before = line.get(..pos).unwrap_or(line);
    let start = before
        .rfind(char::is_whitespace)
        .map_or(0, |space| space + 1);
    let word = &before[start..];
    let earlier: Vec<&str> = before[..start].split_whitespace().collect();
    match earlier.as_slice() {
        [] => {
            let (slash, bare) = match word.strip_prefix('/') {
                Some(bare) => ("/", bare),
                None if in_conversation => return (start, Vec::new()),
                None => ("", word),
            };
            let candidates = command::COMMANDS
                .iter()
                .filter(|command| command.starts_with(bare))
                .map(|command| format!("{slash}{command} "))
                .collect();
            (start, candidates)
        }
        [first] => {
            let bare = first.strip_prefix('/').unwrap_or(first);
            let is_command = first.starts_with('/') || !in_conversation;
            if !(is_command && command::takes_user(bare)) {
                return (start, Vec::new());
            }
            let candidates = names
                .iter()
                .filter(|name| name.starts_with(word))
                .map(|name| format!("{name} "))
                .collect();
            (start, candidates)
        }
        _ => (start, Vec::new()),
    }
}

/// rustyline's helper: completion only (no hints, highlighting or validation).
struct Completion {
    names: Names,
    in_conversation: bool,
}

impl Completer for Completion {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        Ok(complete(
            line,
            pos,
            &self.names.snapshot(),
            self.in_conversation,
        ))
    }
}

impl Hinter for Completion {
    type Hint = String;
}

impl Highlighter for Completion {}

impl Validator for Completion {}

impl Helper for Completion {}

/// One line typed at the prompt, parsed with the conversation open when it was typed.
#[derive(Debug)]
pub struct Typed {
    /// The parsed command (`Quit` at end of input).
    pub command: Result<Command, ParseError>,
}

/// Where the interactive client's lines go: above the prompt while the editor runs.
#[derive(Clone)]
pub struct Screen {
    printer: Option<Arc<Mutex<dyn ExternalPrinter + Send>>>,
}

impl Screen {
    /// Prints `text` (one or more lines) above the prompt, keeping what is typed intact.
    pub fn line(&self, text: impl Into<String>) {
        let mut text = text.into();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        let printed = match &self.printer {
            Some(printer) => printer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .print(text.clone())
                .is_ok(),
            None => false,
        };
        if !printed {
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
    }
}

/// The running editor: its [`Screen`], the command history it collected, and the terminal
/// settings to restore if the process leaves while a line is being read.
pub struct Editor {
    /// Prints above the prompt.
    pub screen: Screen,
    history: Arc<Mutex<Vec<String>>>,
    #[cfg(unix)]
    terminal: Option<nix::sys::termios::Termios>,
}

/// The prompt: who you are, and whom plain lines go to.
pub fn prompt(me: &Username, conversation: Option<&Username>) -> String {
    match conversation {
        Some(peer) => format!("{me} → {peer}> "),
        None => format!("{me}> "),
    }
}

impl Editor {
    /// Starts the editor thread for `me` with the earlier `history` (oldest first, at most
    /// `max_history` kept); each typed line goes to `typed`, in order (a full channel makes
    /// the editor wait: back-pressure on typing).
    pub fn start(
        me: Username,
        history: Vec<String>,
        max_history: usize,
        names: Names,
        typed: tokio::sync::mpsc::Sender<Typed>,
    ) -> anyhow::Result<Self> {
        #[cfg(unix)]
        let terminal = nix::sys::termios::tcgetattr(std::io::stdin()).ok();
        let config = Config::builder()
            .completion_type(CompletionType::List)
            .max_history_size(max_history)?
            .auto_add_history(false)
            .build();
        let mut editor: rustyline::Editor<Completion, MemHistory> =
            rustyline::Editor::with_history(config.clone(), MemHistory::with_config(&config))?;
        editor.set_helper(Some(Completion {
            names: names.clone(),
            in_conversation: false,
        }));
        for line in &history {
            let _ = editor.add_history_entry(line.as_str());
        }
        // Alt-Enter starts a new line in the message instead of sending it.
        editor.bind_sequence(
            rustyline::KeyEvent(rustyline::KeyCode::Enter, rustyline::Modifiers::ALT),
            rustyline::Cmd::Newline,
        );
        let printer = editor
            .create_external_printer()
            .ok()
            .map(|printer| Arc::new(Mutex::new(printer)) as Arc<Mutex<dyn ExternalPrinter + Send>>);
        let history = Arc::new(Mutex::new(history));
        let kept = Arc::clone(&history);
        std::thread::Builder::new()
            .name("line-editor".into())
            .spawn(move || read_lines(editor, me, names, kept, max_history, typed))?;
        Ok(Self {
            screen: Screen { printer },
            history,
            #[cfg(unix)]
            terminal,
        })
    }

    /// The command history to save: every line typed, oldest first, at most the maximum.
    pub fn history(&self) -> Vec<String> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts the terminal back as it was at start: the editor thread may still be reading a
    /// line in raw mode when the process leaves (SIGTERM), and nothing else would undo it.
    pub fn restore_terminal(&self) {
        #[cfg(unix)]
        if let Some(terminal) = &self.terminal {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                terminal,
            );
        }
    }
}

/// The editor thread: reads, records and parses lines until `quit` or the end of input.
fn read_lines(
    mut editor: rustyline::Editor<Completion, MemHistory>,
    me: Username,
    names: Names,
    history: Arc<Mutex<Vec<String>>>,
    max_history: usize,
    typed: tokio::sync::mpsc::Sender<Typed>,
) {
    let mut conversation: Option<Username> = None;
    loop {
        if let Some(helper) = editor.helper_mut() {
            helper.in_conversation = conversation.is_some();
        }
        let line = match editor.readline(&prompt(&me, conversation.as_ref())) {
            Ok(line) => line,
            // Ctrl-D, Ctrl-C, or a terminal that is gone: leave as `quit` does.
            Err(_) => {
                let _ = typed.blocking_send(Typed {
                    command: Ok(Command::Quit),
                });
                return;
            }
        };
        let trimmed = line.trim();
        if !trimmed.is_empty() {
            let _ = editor.add_history_entry(trimmed);
            let mut kept = history.lock().unwrap_or_else(PoisonError::into_inner);
            kept.push(trimmed.to_owned());
            if kept.len() > max_history {
                let excess = kept.len() - max_history;
                kept.drain(..excess);
            }
        }
        let command = command::parse(trimmed, conversation.as_ref());
        match &command {
            Ok(Command::Open(user) | Command::OpenAndSend { to: user, .. }) => {
                conversation = Some(user.clone());
            }
            Ok(Command::Close) => conversation = None,
            _ => {}
        }
        if let Some(user) = command.as_ref().ok().and_then(command::named_user) {
            names.learn(user);
        }
        let quit = matches!(command, Ok(Command::Quit));
        if typed.blocking_send(Typed { command }).is_err() || quit {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> BTreeSet<String> {
        ["bob", "bobby", "carol"].map(str::to_owned).into()
    }

    fn complete_at_end(line: &str, in_conversation: bool) -> (usize, Vec<String>) {
        complete(line, line.len(), &names(), in_conversation)
    }

    #[test]
    fn the_first_word_completes_to_a_command() {
        assert_eq!(complete_at_end("whoi", false), (0, vec!["whois ".into()]));
        assert_eq!(
            complete_at_end("bl", false),
            (0, vec!["block ".into(), "blocked ".into()])
        );
        assert_eq!(complete_at_end("/tr", false), (0, vec!["/trust ".into()]));
        // In a conversation a word without `/` is message text.
        assert_eq!(complete_at_end("tr", true), (0, vec![]));
        assert_eq!(complete_at_end("/tr", true), (0, vec!["/trust ".into()]));
    }

    #[test]
    fn the_word_after_a_command_that_takes_a_user_completes_to_a_name() {
        assert_eq!(
            complete_at_end("chat b", false),
            (5, vec!["bob ".into(), "bobby ".into()])
        );
        assert_eq!(complete_at_end("/msg c", true), (5, vec!["carol ".into()]));
        assert_eq!(
            complete_at_end("whois ", false),
            (6, vec!["bob ".into(), "bobby ".into(), "carol ".into()])
        );
        // Not after a command without a user, not in message text, not in a third word.
        assert_eq!(complete_at_end("list b", false), (5, vec![]));
        assert_eq!(complete_at_end("chat b", true), (5, vec![]));
        assert_eq!(complete_at_end("send bob b", false), (9, vec![]));
        // The cursor decides, not the line's end.
        assert_eq!(
            complete("chat c and more", 6, &names(), false),
            (5, vec!["carol ".into()])
        );
    }

    #[test]
    fn names_are_learned_once() {
        let names = Names::default();
        names.learn(&Username::new("bob").unwrap());
        names.learn(&Username::new("bob").unwrap());
        assert_eq!(names.snapshot().len(), 1);
    }

    #[test]
    fn the_prompt_names_the_open_conversation() {
        let (alice, bob) = (
            Username::new("alice").unwrap(),
            Username::new("bob").unwrap(),
        );
        assert_eq!(prompt(&alice, None), "alice> ");
        assert_eq!(prompt(&alice, Some(&bob)), "alice → bob> ");
    }
}
