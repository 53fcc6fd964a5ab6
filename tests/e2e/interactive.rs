//! The interactive client driven as a person drives it: in tmux, typing with `send-keys` and
//! reading the screen with `capture-pane`. Two clients chat, list, block, mute and quit, and
//! a message arriving while a line is half typed leaves the prompt and the typed text intact;
//! a conversation is opened, used and left, with times shown in the local time zone; Tab
//! completes names, and a paste (long, or of several lines) is one message on one Enter.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::util::{Discovery, User, WAIT, binary};

/// An hour-and-minute in a zone `offset_minutes` east of UTC, `ms` after the epoch.
fn clock_at(ms: u64, offset_minutes: i64) -> String {
    let minutes =
        (i64::try_from(ms / 60_000).expect("a time") + offset_minutes).rem_euclid(24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One tmux session running one interactive `p2pchat`, on a private tmux server socket.
struct Terminal {
    socket: String,
    session: String,
}

impl Terminal {
    /// Starts `p2pchat` for `user` in a new 120x40 tmux session; `None` without tmux.
    fn start(user: &User, server: &Discovery, ask_name: bool) -> Option<Self> {
        Self::start_with_env(user, server, ask_name, "")
    }

    /// [`Terminal::start`] with extra words for `env` (`NAME=value`, `-u NAME`; no quoting).
    fn start_with_env(user: &User, server: &Discovery, ask_name: bool, env: &str) -> Option<Self> {
        // One tmux server per terminal: tests run in parallel and share user names.
        static TERMINALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let terminal = TERMINALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = format!(
            "p2pchat-test-{}-{terminal}-{}",
            std::process::id(),
            user.name
        );
        let session = user.name.clone();
        let mut command = format!(
            "env {env} P2PCHAT_SERVER={} P2PCHAT_HOME={} {}",
            server.address,
            user.home.display(),
            binary("p2pchat").display()
        );
        if !ask_name {
            command.push_str(&format!(" --user {}", user.name));
        }
        let started = Command::new("tmux")
            .args(["-L", &socket, "new-session", "-d", "-x", "120", "-y", "40"])
            .args(["-s", &session, &command])
            .status()
            .ok()?;
        assert!(started.success(), "tmux could not start a session");
        Some(Self { socket, session })
    }

    /// Types `text` and presses Enter.
    fn type_line(&self, text: &str) {
        self.keys(&[text]);
        self.keys(&["Enter"]);
    }

    /// Types `text` without pressing Enter.
    fn type_text(&self, text: &str) {
        let status = Command::new("tmux")
            .args([
                "-L",
                &self.socket,
                "send-keys",
                "-l",
                "-t",
                &self.session,
                text,
            ])
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// Pastes `text` as a terminal pastes it: in bracketed-paste markers (when the program
    /// asked for them, as line editors do), line breaks kept, no Enter after it.
    fn paste(&self, text: &str) {
        let buffer = Command::new("tmux")
            .args(["-L", &self.socket, "set-buffer", "-b", "paste", "--", text])
            .status()
            .expect("tmux set-buffer");
        assert!(buffer.success());
        let pasted = Command::new("tmux")
            .args([
                "-L",
                &self.socket,
                "paste-buffer",
                "-p",
                "-r",
                "-d",
                "-b",
                "paste",
            ])
            .args(["-t", &self.session])
            .status()
            .expect("tmux paste-buffer");
        assert!(pasted.success());
    }

    fn keys(&self, keys: &[&str]) {
        let status = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// The visible screen.
    fn screen(&self) -> String {
        let output = Command::new("tmux")
            .args([
                "-L",
                &self.socket,
                "capture-pane",
                "-p",
                "-t",
                &self.session,
            ])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The visible screen with its colours, as terminal escape sequences.
    fn screen_with_colours(&self) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-e"])
            .args(["-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until the screen shows `wanted` (the count of times it appears reaches `times`),
    /// and returns the screen.
    fn wait_for_n(&self, wanted: &str, times: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.screen();
            if screen.matches(wanted).count() >= times {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {wanted:?} ({times}x):\n{screen}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for(&self, wanted: &str) -> String {
        self.wait_for_n(wanted, 1)
    }

    /// Whether the session (and so the client) is still running.
    fn running(&self) -> bool {
        Command::new("tmux")
            .args(["-L", &self.socket, "has-session", "-t", &self.session])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // The server is gone already when the client quit by itself.
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|output| output.status.success())
}

#[test]
fn two_people_chat_list_block_mute_and_quit_in_terminals() {
    if !tmux_available() {
        eprintln!("skipped: tmux is not installed (.ci/run installs it)");
        return;
    }
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    // Alice is asked for her name, as the original client did.
    let alice_term = Terminal::start(&alice, &server, true).expect("tmux");
    alice_term.wait_for("username");
    alice_term.type_line("alice");
    alice_term.wait_for("connected to the discovery server");
    alice_term.wait_for("alice>");
    let bob_term = Terminal::start(&bob, &server, false).expect("tmux");
    bob_term.wait_for("connected to the discovery server");
    bob_term.wait_for("bob>");

    alice_term.type_line("list");
    alice_term.wait_for("online: alice, bob");

    alice_term.type_line("send bob hello bob");
    alice_term.wait_for("→ bob: delivered");
    bob_term.wait_for("alice: hello bob");

    // A message arrives while bob has half a line typed: it prints above the prompt, and
    // the prompt with bob's unfinished text is still there, intact, on the last line.
    bob_term.type_text("half-typed");
    bob_term.wait_for("bob> half-typed");
    alice_term.type_line("send bob while you type");
    bob_term.wait_for("alice: while you type");
    let screen = bob_term.screen();
    let last = screen
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default();
    assert_eq!(
        last.trim_end(),
        "bob> half-typed",
        "garbled prompt:\n{screen}"
    );
    assert!(
        !screen.contains("half-typedalice"),
        "garbled line:\n{screen}"
    );
    // Finish the line as a reply.
    bob_term.keys(&["C-u"]);
    bob_term.type_line("send alice got it");
    alice_term.wait_for("bob: got it");

    // Block: alice's next message fails with a reason; unblock restores it.
    bob_term.type_line("block alice");
    bob_term.wait_for("blocked alice");
    alice_term.type_line("send bob are you there");
    alice_term.wait_for("failed");
    bob_term.type_line("blocked");
    bob_term.wait_for("blocked: alice");
    bob_term.type_line("unblock alice");
    bob_term.wait_for("unblocked alice");

    // Mute: messages are held, then summarised and shown when the mute ends.
    bob_term.type_line("mute alice 3600");
    bob_term.wait_for("muted alice for 3600 s");
    alice_term.type_line("send bob one");
    alice_term.wait_for_n("→ bob: delivered", 3);
    alice_term.type_line("send bob two");
    alice_term.wait_for_n("→ bob: delivered", 4);
    assert!(
        !bob_term.screen().contains("alice: one"),
        "a muted message was shown"
    );
    bob_term.type_line("unmute alice");
    bob_term.wait_for("2 messages from alice while muted");
    bob_term.wait_for("alice: two (while muted)");

    // A bad command is one clear line, and the client carries on.
    bob_term.type_line("mute alice 0");
    bob_term.wait_for("positive");

    // Regression: every typed command ran in a task of its own, so a pasted burst of
    // sends went out (and into the history) in a shuffled order. They arrive in order.
    let burst: Vec<String> = (1..=20).map(|n| format!("burst {n:02}")).collect();
    let mut keys: Vec<String> = Vec::new();
    for body in &burst {
        keys.push(format!("send bob {body}"));
        keys.push("Enter".to_owned());
    }
    alice_term.keys(&keys.iter().map(String::as_str).collect::<Vec<_>>());
    // In order, all of them are on the screen once the last is.
    let screen = bob_term.wait_for(&format!("alice: {}", burst[burst.len() - 1]));
    let positions: Vec<usize> = burst
        .iter()
        .map(|body| {
            screen
                .find(&format!("alice: {body}"))
                .unwrap_or_else(|| panic!("{body} not shown:\n{screen}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|pair| pair[0] < pair[1]),
        "a pasted burst arrived out of order:\n{screen}"
    );

    alice_term.type_line("quit");
    let deadline = Instant::now() + WAIT;
    while alice_term.running() {
        assert!(Instant::now() < deadline, "alice's client did not quit");
        thread::sleep(Duration::from_millis(50));
    }
    bob_term.type_line("quit");
}

/// A conversation opened with `chat`, used with plain lines, and left with `/close`; the
/// prompt names the other user; `chats` counts the messages that came before it was open; incoming times are local (here `TZ` 5:45 east of UTC, so
/// UTC's clock would be wrong on the screen).
#[test]
fn a_conversation_is_opened_used_and_left_with_local_times() {
    if !tmux_available() {
        eprintln!("skipped: tmux is not installed (.ci/run installs it)");
        return;
    }
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut bob_bot = bob.listen(&server);
    bob_bot.online();
    let alice_term =
        Terminal::start_with_env(&alice, &server, false, "-u NO_COLOR TZ=NPT-5:45").expect("tmux");
    alice_term.wait_for("connected to the discovery server");
    alice_term.wait_for("peers connect to you on port");
    alice_term.wait_for("alice>");

    // Two messages before the conversation is open: `chats` counts them unread.
    bob_bot.ok("send alice first");
    bob_bot.ok("send alice second");
    alice_term.wait_for("bob: second");
    alice_term.type_line("chats");
    alice_term.wait_for(", 2 unread");

    alice_term.type_line("chat bob");
    alice_term.wait_for("talking to bob");
    alice_term.type_line("/chats");
    alice_term.wait_for_n("bob: last message", 2);
    assert_eq!(alice_term.screen().matches("unread").count(), 1);
    alice_term.wait_for("alice → bob>");
    // Plain lines, even one that starts with a command's name, go to bob.
    alice_term.type_line("hello from a conversation");
    bob_bot.message("hello from a conversation");
    alice_term.type_line("list of things to bring");
    bob_bot.message("list of things to bring");
    // Commands keep working with their `/`.
    alice_term.type_line("/list");
    alice_term.wait_for("online: alice, bob");

    let before = now_ms();
    bob_bot.ok("send alice hi alice");
    let after = now_ms();
    let screen = alice_term.wait_for("bob: hi alice");
    // A terminal gets colour: the sender's name in cyan.
    assert!(
        alice_term.screen_with_colours().contains("36m"),
        "no colour:\n{:?}",
        alice_term.screen_with_colours()
    );
    let local = [clock_at(before, 5 * 60 + 45), clock_at(after, 5 * 60 + 45)];
    assert!(
        local
            .iter()
            .any(|clock| screen.contains(&format!("[{clock}] bob: hi alice"))),
        "not shown in local time ({local:?}):\n{screen}"
    );

    alice_term.type_line("/close");
    alice_term.wait_for("left the conversation with bob");
    // The prompt is alice's alone again, and a plain word is a command again.
    alice_term.type_line("list");
    alice_term.wait_for_n("online: alice, bob", 2);
    let screen = alice_term.screen();
    let last = screen
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default();
    assert_eq!(last.trim_end(), "alice>", "{screen}");
    assert_eq!(bob_bot.count("list"), 0);
    alice_term.type_line("/quit");
}

/// Tab completes a command and a username; `NO_COLOR` turns colour off; a 3 KB paste goes out
/// on one Enter (it waited for
/// another key), and a pasted text of several lines is one message, as is one typed with
/// Alt-Enter between its lines.
#[test]
fn tab_completes_names_and_a_paste_is_one_message() {
    if !tmux_available() {
        eprintln!("skipped: tmux is not installed (.ci/run installs it)");
        return;
    }
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut bob_bot = bob.listen(&server);
    bob_bot.online();
    let alice_term = Terminal::start_with_env(&alice, &server, false, "NO_COLOR=1").expect("tmux");
    alice_term.wait_for("connected to the discovery server");
    alice_term.wait_for("alice>");

    // `list` teaches the client bob's name.
    alice_term.type_text("lis");
    alice_term.keys(&["Tab"]);
    alice_term.wait_for("alice> list");
    alice_term.keys(&["Enter"]);
    alice_term.wait_for("online: alice, bob");
    alice_term.type_text("chat b");
    alice_term.keys(&["Tab"]);
    alice_term.wait_for("alice> chat bob");
    alice_term.keys(&["Enter"]);
    alice_term.wait_for("talking to bob");

    let long = format!("{}end", "0123456789".repeat(300));
    alice_term.paste(&long);
    alice_term.keys(&["Enter"]);
    bob_bot.message(&long);

    // NO_COLOR: not one colour on the screen.
    bob_bot.ok("send alice plain please");
    alice_term.wait_for("bob: plain please");
    assert!(
        !alice_term.screen_with_colours().contains("36m"),
        "colour despite NO_COLOR:\n{:?}",
        alice_term.screen_with_colours()
    );

    alice_term.paste("first line\nsecond line");
    alice_term.keys(&["Enter"]);
    bob_bot.message("first line\nsecond line");

    // Alt-Enter breaks the line without sending it.
    alice_term.type_text("typed one");
    alice_term.keys(&["M-Enter"]);
    alice_term.type_text("typed two");
    alice_term.keys(&["Enter"]);
    bob_bot.message("typed one\ntyped two");

    alice_term.type_line("/quit");
}

/// A contact's presence as a person sees it: once alice and bob have talked, alice's
/// screen says when bob goes and when he comes back; and a second session of alice (the
/// same identity on another machine) makes her first screen say so.
#[test]
fn a_contact_coming_and_going_and_a_second_session_show_in_the_terminal() {
    if !tmux_available() {
        eprintln!("skipped: tmux is not installed (.ci/run installs it)");
        return;
    }
    let server = Discovery::start();
    let (alice, elsewhere) = crate::presence::one_identity_twice(&server);
    let bob = User::new("bob");
    let alice_term = Terminal::start(&alice, &server, false).expect("tmux");
    alice_term.wait_for("alice>");
    let mut bob_bot = bob.listen(&server);
    bob_bot.online();
    bob_bot.ok("send alice hi alice");
    alice_term.wait_for("bob: hi alice");
    // Only people one has written to are contacts.
    alice_term.type_line("send bob hi bob");
    bob_bot.message("hi bob");
    alice_term.wait_for("bob is online");

    bob_bot.stop();
    alice_term.wait_for("bob went offline");
    let mut bob_bot = bob.listen(&server);
    bob_bot.online();
    alice_term.wait_for_n("bob is online", 2);

    // The same identity in a second data dir, as on a second machine.
    let mut alice_elsewhere = elsewhere.listen(&server);
    alice_elsewhere.online();
    alice_term.wait_for("you signed in elsewhere (127.0.0.1");
    alice_term.type_line("/quit");
}

/// Issue 16: a message that went to the mailbox shows *queued*, and once its recipient
/// comes online and stores it, the sender's terminal says so, then that it was read; the
/// history line follows.
#[test]
fn a_queued_message_turns_delivered_then_read_in_the_senders_terminal() {
    if !tmux_available() {
        eprintln!("skipped: tmux is not installed (.ci/run installs it)");
        return;
    }
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    bob.register_and_leave(&server);
    let alice_term = Terminal::start(&alice, &server, false).expect("tmux");
    alice_term.wait_for("alice>");
    alice_term.type_line("send bob are you there");
    alice_term.wait_for("→ bob: queued");
    alice_term.type_line("history bob");
    alice_term.wait_for("you → bob: are you there (queued)");

    let bob_term = Terminal::start(&bob, &server, false).expect("tmux");
    bob_term.wait_for("alice: are you there");
    alice_term.wait_for("bob received your message (sent ");
    alice_term.wait_for("bob read your message (sent ");
    alice_term.type_line("history bob");
    alice_term.wait_for("you → bob: are you there (read)");
    // Bob's screen shows the message once and nothing of the receipts.
    let screen = bob_term.screen();
    assert_eq!(screen.matches("are you there").count(), 1, "{screen}");
    assert!(!screen.contains("received your message"), "{screen}");
}
