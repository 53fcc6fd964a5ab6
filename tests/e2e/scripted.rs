//! The real binaries driven as scripts and bots drive them: `p2pchat send` and
//! `p2pchat listen --json` against a `p2pchat-discovery` process.

use std::time::Duration;

use crate::util::{Discovery, User, assert_failed, assert_sent};

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
        assert_eq!(bob_listener.message(body)["from"], "alice");
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
    let alice_view = alice_bot.ok("whois bob");
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
