//! The real binaries driven as scripts and bots drive them: `p2pchat send` and
//! `p2pchat listen --json` against a `p2pchat-discovery` process.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::util::{
    Discovery, DiscoveryOptions, Launcher, User, WAIT, assert_failed, assert_sent, binary,
    free_port, run_bounded,
};

/// `--listen` puts the peer listener on one address and port; with `--port` as well it is
/// a usage error.
#[test]
fn the_peer_listener_binds_where_listen_says() {
    let server = Discovery::start();
    let alice = User::new("alice");
    let bob = User::new("bob");
    let address = format!("127.0.0.1:{}", free_port());
    let mut bob_listener =
        bob.listen_custom(&server, &Launcher::direct(), &["--listen", &address], &[]);
    bob_listener.online();
    std::net::TcpStream::connect(&address).expect("bob listens where --listen says");
    assert_sent(&alice.send(&server, "bob", "on a chosen port"), "delivered");
    bob_listener.message("on a chosen port");
    bob_listener.stop();

    let mut both = Command::new(binary("p2pchat"));
    both.args([
        "--listen", &address, "--port", "7000", "--user", "alice", "send", "bob", "x",
    ]);
    let output = run_bounded(both);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot be used with"),
        "{output:?}"
    );
}

#[test]
fn a_message_to_a_listening_peer_is_delivered_directly() {
    let server = Discovery::start();
    let alice = User::new("alice");
    let bob = User::new("bob");
    let mut bob_listener = bob.listen(&server);
    bob_listener.online();

    assert_sent(&alice.send(&server, "bob", "hello bob"), "delivered");
    let message = bob_listener.message("hello bob");
    assert_eq!(message["from"], "alice");
    assert_eq!(message["id"].as_str().map(str::len), Some(32));
    assert_eq!(message["via_mailbox"], false);
}

#[test]
fn mail_for_an_offline_user_is_queued_and_shown_once_at_login() {
    let server = Discovery::start();
    let alice = User::new("alice");
    let bob = User::new("bob");
    bob.register_and_leave(&server);

    for body in ["one", "two", "three"] {
        assert_sent(&alice.send(&server, "bob", body), "queued");
    }
    let mut bob_listener = bob.listen(&server);
    for body in ["one", "two", "three"] {
        let message = bob_listener.message(body);
        assert_eq!(message["from"], "alice");
        // Marked as mail that waited in the mailbox (`[offline]` on a terminal).
        assert_eq!(message["via_mailbox"], true);
    }
    bob_listener.stop();

    // Acked and shown: a restart shows nothing again.
    let mut again = bob.listen(&server);
    again.online();
    let extra = again.drain_for(Duration::from_millis(1500));
    assert!(
        extra.iter().all(|event| event["event"] != "message"),
        "shown twice: {extra:?}"
    );
}

#[test]
fn a_message_to_a_user_who_never_registered_fails_with_a_reason() {
    let server = Discovery::start();
    let alice = User::new("alice");
    assert_failed(&alice.send(&server, "nobody", "hello?"), "nobody");
}

#[test]
fn a_taken_name_is_refused_with_a_clear_error() {
    let server = Discovery::start();
    let alice = User::new("alice");
    let mut listener = alice.listen(&server);
    listener.online();
    // Someone else, with their own keys, tries to be alice.
    let impostor = User::new("alice");
    assert_failed(&impostor.send(&server, "alice", "it's me"), "taken");
}

#[test]
fn bad_input_on_the_command_line_is_a_clear_error() {
    let server = Discovery::start();
    let alice = User::new("Alice");
    assert_failed(&alice.send(&server, "bob", "hi"), "username");
}

#[test]
fn an_announcement_reaches_every_listening_client() {
    let server = Discovery::start();
    let mut listeners: Vec<_> = ["alice", "bob"]
        .iter()
        .map(|name| {
            let user = User::new(name);
            let mut listener = user.listen(&server);
            listener.online();
            (user, listener)
        })
        .collect();
    let output = server.announce("maintenance at noon");
    assert!(output.status.success(), "{output:?}");
    for (_, listener) in &mut listeners {
        listener.expect("the announcement", |event| {
            event["event"] == "announcement" && event["text"] == "maintenance at noon"
        });
    }
}

#[test]
fn two_bots_chat_both_ways_through_standard_input() {
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut alice_bot = alice.listen(&server);
    let mut bob_bot = bob.listen(&server);
    alice_bot.online();
    bob_bot.online();

    for round in 0..3 {
        let sent = alice_bot.ok(&format!("send bob ping {round}"));
        assert_eq!(sent["status"], "delivered");
        bob_bot.message(&format!("ping {round}"));
        let sent = bob_bot.ok(&format!("send alice pong {round}"));
        assert_eq!(sent["status"], "delivered");
        alice_bot.message(&format!("pong {round}"));
    }
    let list = alice_bot.ok("list");
    assert_eq!(list["text"], "online: alice, bob");
    // Both sides compute the same safety number.
    let number = |text: &str| {
        text.lines()
            .find(|line| line.contains("safety number"))
            .map(str::to_owned)
    };
    let alice_view = alice_bot.ok("/whois bob");
    let bob_view = bob_bot.ok("whois alice");
    assert!(
        number(alice_view["text"].as_str().unwrap()).is_some(),
        "{alice_view}"
    );
    assert_eq!(
        number(alice_view["text"].as_str().unwrap()),
        number(bob_view["text"].as_str().unwrap())
    );
    // A bad command is a result with a reason, and the bot carries on.
    let bad = alice_bot.run("mute bob -5");
    assert_eq!(bad["ok"], false);
    assert_eq!(alice_bot.ok("send bob still here")["status"], "delivered");
    bob_bot.message("still here");
}

#[test]
fn block_refuses_direct_messages_and_mail_until_unblocked() {
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut alice_bot = alice.listen(&server);
    let mut bob_bot = bob.listen(&server);
    alice_bot.online();
    bob_bot.online();
    bob_bot.ok("block alice");
    let refused = alice_bot.run("send bob let me in");
    assert_eq!(refused["status"], "failed", "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("block"),
        "{refused}"
    );

    // Offline, the server refuses the mail too.
    bob_bot.stop();
    let refused = alice_bot.run("send bob knock knock");
    assert_eq!(refused["status"], "failed", "{refused}");

    let mut bob_bot = bob.listen(&server);
    bob_bot.online();
    assert_eq!(bob_bot.ok("blocked")["text"], "blocked: alice");
    bob_bot.ok("unblock alice");
    assert_eq!(alice_bot.ok("send bob finally")["status"], "delivered");
    bob_bot.message("finally");
    assert_eq!(bob_bot.count("let me in") + bob_bot.count("knock knock"), 0);
}

#[test]
fn mute_holds_messages_and_shows_them_when_it_ends() {
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut alice_bot = alice.listen(&server);
    let mut bob_bot = bob.listen(&server);
    alice_bot.online();
    bob_bot.online();
    bob_bot.ok("mute alice 3600");
    for body in ["one", "two", "three"] {
        assert_eq!(
            alice_bot.ok(&format!("send bob {body}"))["status"],
            "delivered"
        );
    }
    // Received and kept, not shown.
    assert_eq!(bob_bot.count("one"), 0);
    bob_bot.ok("unmute alice");
    let ended = bob_bot.expect("the end of the mute", |event| {
        event["event"] == "mute_ended"
    });
    assert_eq!(ended["held"], 3);
    for body in ["one", "two", "three"] {
        assert_eq!(bob_bot.message(body)["while_muted"], true);
    }
}

/// `p2pchat send`'s exit codes: 0 delivered or queued; 3 kept in the outbox (it goes out
/// later: a script must not send it again); 1 failed for good. Regression: a message kept
/// for retry exited 1 like a failure, and a script that resent it sent it twice.
#[test]
fn send_exit_codes_tell_sent_from_kept_from_failed() {
    let mut options = DiscoveryOptions::new();
    options.args = vec!["--mail-cap".into(), "1".into()];
    let server = Discovery::start_custom(None, options);
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    bob.register_and_leave(&server);

    let queued = alice.send(&server, "bob", "one");
    assert_sent(&queued, "queued");
    assert_eq!(queued.status.code(), Some(0));

    // Bob's mailbox holds one message: the next is kept in alice's outbox.
    let kept = alice.send(&server, "bob", "two");
    let stderr = String::from_utf8_lossy(&kept.stderr);
    assert_eq!(kept.status.code(), Some(3), "{kept:?}");
    assert!(stderr.contains("do not send it again"), "{stderr}");

    let failed = alice.send(&server, "nobody", "hello?");
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert_failed(&failed, "nobody");

    // The kept message goes out by itself once alice runs again and bob has room: once.
    let mut bob_bot = bob.listen(&server);
    bob_bot.message("one");
    let mut alice_bot = alice.listen(&server);
    alice_bot.online();
    bob_bot.message("two");
    // One process per data dir at a time.
    alice_bot.stop();
    let delivered = alice.send(&server, "bob", "three");
    assert_sent(&delivered, "delivered");
    assert_eq!(delivered.status.code(), Some(0));
    bob_bot.message("three");
    bob_bot.drain_for(Duration::from_millis(500));
    assert_eq!(bob_bot.count("two"), 1, "{:?}", bob_bot.messages());
}

/// `list`, `blocked`, `whois`, `history` and `chats` answer `listen --json` with fields, not
/// only text; a conversation opened on standard input takes plain lines as messages.
#[test]
fn listen_json_results_have_structured_fields() {
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut alice_bot = alice.listen(&server);
    // Without bob's read receipts the statuses below stay *delivered* (see
    // `listen_json_tells_a_queued_message_delivered_then_read`).
    let mut bob_bot = bob.listen_custom(&server, &Launcher::direct(), &["--no-read-receipts"], &[]);
    alice_bot.online();
    bob_bot.online();

    let list = alice_bot.ok("/list");
    assert_eq!(list["users"], serde_json::json!(["alice", "bob"]), "{list}");
    assert_eq!(list["more"], 0);

    // A conversation: plain lines go to bob, `/` commands still work, `/close` leaves.
    let opened = alice_bot.ok("chat bob");
    assert_eq!(opened["conversation"], "bob");
    assert_eq!(
        alice_bot.ok("list is not a command here")["status"],
        "delivered"
    );
    bob_bot.message("list is not a command here");
    assert_eq!(alice_bot.ok("//slash first")["status"], "delivered");
    bob_bot.message("/slash first");
    let closed = alice_bot.ok("/close");
    assert_eq!(closed["conversation"], serde_json::Value::Null);
    assert_eq!(
        alice_bot.ok("msg bob opened and sent")["status"],
        "delivered"
    );
    bob_bot.message("opened and sent");
    // `msg` left the conversation with bob open: commands take their `/` from here on.
    assert_eq!(bob_bot.ok("send alice back")["status"], "delivered");
    alice_bot.message("back");

    let whois = alice_bot.ok("/whois bob");
    assert_eq!(whois["user"], "bob");
    assert_eq!(whois["online"], true);
    assert!(whois["pinned_fingerprint"].is_string(), "{whois}");
    assert!(whois["my_fingerprint"].is_string(), "{whois}");
    assert_eq!(whois["key_changed"], false);
    let bob_whois = bob_bot.ok("whois alice");
    assert!(whois["safety_number"].is_string(), "{whois}");
    assert_eq!(whois["safety_number"], bob_whois["safety_number"]);

    let history = alice_bot.ok("/history bob 10");
    assert_eq!(history["user"], "bob");
    let messages = history["messages"].as_array().expect("messages");
    let bodies: Vec<(&str, &str, &str)> = messages
        .iter()
        .map(|message| {
            (
                message["direction"].as_str().unwrap_or_default(),
                message["body"].as_str().unwrap_or_default(),
                message["status"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        bodies,
        [
            ("outgoing", "list is not a command here", "delivered"),
            ("outgoing", "/slash first", "delivered"),
            ("outgoing", "opened and sent", "delivered"),
            ("incoming", "back", "received"),
        ]
    );
    assert!(
        messages
            .iter()
            .all(|message| message["id"].as_str().map(str::len) == Some(32)
                && message["sent_at_ms"].as_u64().is_some())
    );

    // `chats`: read while open; unread once closed; `history` reads it again.
    let chats = alice_bot.ok("/chats");
    assert_eq!(chats["chats"][0]["user"], "bob", "{chats}");
    assert_eq!(chats["chats"][0]["unread"], 0, "{chats}");
    alice_bot.ok("/close");
    bob_bot.ok("send alice later");
    alice_bot.message("later");
    let chats = alice_bot.ok("chats");
    assert_eq!(chats["chats"][0]["unread"], 1, "{chats}");
    assert!(chats["chats"][0]["last_ms"].as_u64().is_some(), "{chats}");
    alice_bot.ok("history bob 1");
    assert_eq!(alice_bot.ok("chats")["chats"][0]["unread"], 0);

    alice_bot.ok("/block bob");
    assert_eq!(
        alice_bot.ok("/blocked")["users"],
        serde_json::json!(["bob"])
    );
}

/// `p2pchat-discovery announce` takes `--data-dir` after the subcommand too, and an
/// announcement too large for the server is named as such (it said "cannot talk to the
/// server"). Both programs' `--version` name the programs.
#[test]
fn announce_options_go_anywhere_and_an_oversized_one_is_named() {
    let server = Discovery::start();
    let announce = |text: &str| {
        let mut command = Command::new(binary("p2pchat-discovery"));
        command
            .arg("announce")
            .arg(text)
            .arg("--data-dir")
            .arg(&server.data_dir)
            .arg("--server")
            .arg(server.address.to_string());
        run_bounded(command)
    };
    let output = announce("options after the subcommand");
    assert!(output.status.success(), "{output:?}");
    let output = announce(&"x".repeat(100_000));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("too large"),
        "{stderr}"
    );
    assert!(server.log().contains("options after the subcommand"));

    for (program, name) in [
        ("p2pchat", "p2pchat 0.1.0"),
        ("p2pchat-discovery", "p2pchat-discovery 0.1.0"),
    ] {
        let mut command = Command::new(binary(program));
        command.arg("--version");
        let output = run_bounded(command);
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), name);
    }
}

/// Without `--json`, `listen` prints the lines a person reads (it printed the same JSON).
#[test]
fn listen_without_json_prints_lines_for_people() {
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut child = Command::new(binary("p2pchat"))
        .env("P2PCHAT_SERVER", server.address.to_string())
        .env("P2PCHAT_USER", &bob.name)
        .env("P2PCHAT_HOME", &bob.home)
        .env("RUST_LOG", "warn")
        .arg("listen")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start p2pchat listen");
    let stdout = child.stdout.take().expect("stdout");
    let mut stdin = child.stdin.take().expect("stdin");
    // Killed however the test ends.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = KillOnDrop(child);
    let (sender, lines) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |wanted: &str| {
        let deadline = Instant::now() + WAIT;
        while !seen.iter().any(|line: &String| line.contains(wanted)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!("never printed {wanted:?}; printed {seen:?}"),
            }
        }
        seen.clone()
    };
    wait_for("connected to the discovery server");
    writeln!(stdin, "list").expect("write a command");
    wait_for("online: bob");
    assert_sent(&alice.send(&server, "bob", "hi bob"), "delivered");
    let printed = wait_for("alice: hi bob");
    assert!(
        printed.iter().all(|line| !line.starts_with('{')),
        "JSON without --json: {printed:?}"
    );
}

/// Issue 16: a queued message becomes delivered for a sender running `listen --json` when
/// its recipient fetches it (a `receipt` event naming the message, with its time), then
/// read when the recipient's `listen` printed it; `history` says so. A recipient with
/// `--no-read-receipts` sends the delivered receipt only.
#[test]
fn listen_json_tells_a_queued_message_delivered_then_read() {
    let server = Discovery::start();
    let (alice, bob, carol) = (User::new("alice"), User::new("bob"), User::new("carol"));
    bob.register_and_leave(&server);
    carol.register_and_leave(&server);
    let mut alice_bot = alice.listen(&server);
    alice_bot.online();
    let sent = alice_bot.ok("send bob are you there");
    assert_eq!(sent["status"], "queued", "{sent}");
    let id = sent["id"].as_str().expect("an id").to_owned();
    let to_carol = alice_bot.ok("send carol and you");
    assert_eq!(to_carol["status"], "queued", "{to_carol}");

    let mut bob_bot = bob.listen(&server);
    bob_bot.message("are you there");
    let receipt_of = |kind: &'static str, from: &'static str| {
        move |event: &serde_json::Value| {
            event["event"] == "receipt" && event["kind"] == kind && event["from"] == from
        }
    };
    let delivered = alice_bot.expect("a delivered receipt", receipt_of("delivered", "bob"));
    assert_eq!(delivered["messages"][0]["id"], id.as_str(), "{delivered}");
    assert_eq!(delivered["messages"].as_array().map(Vec::len), Some(1));
    assert!(delivered["messages"][0]["sent_at_ms"].as_u64().is_some());
    // `listen` printed it: that is bob's screen showing it.
    let read = alice_bot.expect("a read receipt", receipt_of("read", "bob"));
    assert_eq!(read["messages"][0]["id"], id.as_str(), "{read}");
    let history = alice_bot.ok("history bob");
    assert_eq!(history["messages"][0]["status"], "read", "{history}");

    let mut carol_bot =
        carol.listen_custom(&server, &Launcher::direct(), &["--no-read-receipts"], &[]);
    carol_bot.message("and you");
    alice_bot.expect(
        "carol's delivered receipt",
        receipt_of("delivered", "carol"),
    );
    // Carol's answer comes after anything her screen made due.
    carol_bot.ok("send alice no read receipt from me");
    alice_bot.message("no read receipt from me");
    let later = alice_bot.drain_for(Duration::from_secs(1));
    assert!(!later.iter().any(receipt_of("read", "carol")), "{later:#?}");
    let history = alice_bot.ok("history carol");
    assert_eq!(history["messages"][0]["status"], "delivered", "{history}");
    for bot in [alice_bot, bob_bot, carol_bot] {
        bot.stop();
    }
}
