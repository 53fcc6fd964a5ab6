//! Restarts and outages of the discovery server and of Redis: no message is lost, none is
//! shown twice.

use store::testing::RedisServer;

use crate::util::{Discovery, User, assert_sent};

#[test]
fn discovery_restart_mid_conversation_loses_nothing() {
    let mut server = Discovery::start();
    let alice = User::new("alice");
    let bob = User::new("bob");
    let mut bob_listener = bob.listen(&server);
    bob_listener.online();
    assert_sent(&alice.send(&server, "bob", "before"), "delivered");
    bob_listener.message("before");

    server.restart();
    // Bob's client notices, reconnects and registers again by itself.
    bob_listener.expect("offline", |event| event["event"] == "offline");
    bob_listener.online();
    assert_sent(&alice.send(&server, "bob", "after"), "delivered");
    bob_listener.message("after");

    // Killed, not stopped: same result.
    server.kill();
    server.start_again();
    bob_listener.online();
    assert_sent(&alice.send(&server, "bob", "after a crash"), "delivered");
    bob_listener.message("after a crash");
    assert_eq!(bob_listener.count("before"), 1);
    assert_eq!(bob_listener.count("after"), 1);
}

#[test]
fn queued_mail_survives_a_discovery_crash_on_the_embedded_store() {
    let mut server = Discovery::start();
    let alice = User::new("alice");
    let bob = User::new("bob");
    bob.register_and_leave(&server);
    for index in 0..5 {
        assert_sent(
            &alice.send(&server, "bob", &format!("queued {index}")),
            "queued",
        );
    }
    server.kill();
    server.start_again();
    let mut bob_listener = bob.listen(&server);
    for index in 0..5 {
        bob_listener.message(&format!("queued {index}"));
    }
}

#[test]
fn queued_mail_survives_a_redis_restart_with_aof() {
    let mut redis = RedisServer::start_persistent().expect("redis-server starts");
    let server = Discovery::start_with(Some(redis.url()));
    let alice = User::new("alice");
    let bob = User::new("bob");
    bob.register_and_leave(&server);
    for index in 0..5 {
        assert_sent(
            &alice.send(&server, "bob", &format!("mail {index}")),
            "queued",
        );
    }

    redis.stop().expect("redis-server stops");
    redis.restart().expect("redis-server restarts");

    let mut bob_listener = bob.listen(&server);
    for index in 0..5 {
        assert_eq!(
            bob_listener.message(&format!("mail {index}"))["from"],
            "alice"
        );
    }
    // And the server works on: a new message goes through.
    assert_sent(
        &alice.send(&server, "bob", "after redis came back"),
        "delivered",
    );
    bob_listener.message("after redis came back");
}

/// Every `message` body a listener printed, in order.
fn bodies(listener: &crate::util::Listener) -> Vec<String> {
    listener
        .seen
        .iter()
        .filter(|event| event["event"] == "message")
        .filter_map(|event| event["body"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_recipient_killed_and_restarted_during_a_stream_sees_every_message_once() {
    const MESSAGES: usize = 30;
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut alice_bot = alice.listen(&server);
    alice_bot.online();
    let mut bob_bot = bob.listen(&server);
    bob_bot.online();

    let mut shown = Vec::new();
    let mut statuses = Vec::new();
    for index in 0..MESSAGES {
        if index % 6 == 5 {
            // Make sure bob has finished with what he printed (a command's result comes
            // after the loop has recorded the previous message as shown), then SIGKILL him.
            bob_bot.ok("blocked");
            shown.extend(bodies(&bob_bot));
            bob_bot.kill();
            // Two messages while bob is dead: direct fails, they are queued.
            for offline in [index, index + 1] {
                if offline < MESSAGES {
                    let result = alice_bot.ok(&format!("send bob message {offline}"));
                    statuses.push(result["status"].as_str().unwrap_or_default().to_owned());
                }
            }
            bob_bot = bob.listen(&server);
            bob_bot.online();
            continue;
        }
        if index % 6 == 0 && index > 0 {
            // The message after a restart was already sent while bob was down.
            continue;
        }
        let result = alice_bot.ok(&format!("send bob message {index}"));
        statuses.push(result["status"].as_str().unwrap_or_default().to_owned());
    }
    // Wait for the last one, then count everything every bob process printed.
    bob_bot.message(&format!("message {}", MESSAGES - 1));
    bob_bot.ok("blocked");
    shown.extend(bodies(&bob_bot));

    assert_eq!(statuses.len(), MESSAGES);
    assert!(
        statuses
            .iter()
            .all(|status| status == "delivered" || status == "queued"),
        "{statuses:?}"
    );
    assert!(statuses.iter().any(|status| status == "queued"));
    let mut sorted = shown.clone();
    sorted.sort();
    let mut expected: Vec<String> = (0..MESSAGES)
        .map(|index| format!("message {index}"))
        .collect();
    expected.sort();
    assert_eq!(sorted, expected, "every message shown exactly once");
}

#[test]
fn a_sender_killed_right_after_queued_loses_nothing() {
    let server = Discovery::start();
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    bob.register_and_leave(&server);
    let mut alice_bot = alice.listen(&server);
    alice_bot.online();
    assert_eq!(
        alice_bot.ok("send bob sent then killed")["status"],
        "queued"
    );
    alice_bot.kill();
    let mut bob_bot = bob.listen(&server);
    assert_eq!(bob_bot.message("sent then killed")["from"], "alice");
}
