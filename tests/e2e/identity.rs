//! The identity lifecycle with the real binaries: a backup restored on a fresh data dir
//! keeps the name (contacts see no key change) and gets the mail sealed in the sessions it
//! lost sent again (shown once, in order), a rotation is followed by a contact who
//! pinned the old key (a notice, no `trust`), and a name the operator released is bound
//! anew, which contacts see as a loud key change.

use std::{path::Path, time::Duration};

use crate::util::{Discovery, Listener, User, assert_failed, assert_sent};

const PASSPHRASE: (&str, &str) = ("P2PCHAT_PASSPHRASE", "correct horse battery staple");

/// `p2pchat identity <args>` for `user`, with the test passphrase.
fn identity(user: &User, server: &Discovery, args: &[&str]) -> std::process::Output {
    let mut full = vec!["identity"];
    full.extend_from_slice(args);
    user.run(server, &[PASSPHRASE], &full)
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn key_events(seen: &[serde_json::Value], kind: &str) -> usize {
    seen.iter().filter(|event| event["event"] == kind).count()
}

#[test]
fn a_backup_imported_on_a_fresh_data_dir_keeps_the_name_and_contacts_see_no_key_change() {
    let (server, alice, _bob, mut bob_listener) = alice_writes_to_bob("before the move");

    let backup = alice.home.with_file_name("alice.backup");
    let exported = identity(&alice, &server, &["export", path(&backup)]);
    assert!(exported.status.success(), "{exported:?}");
    assert!(
        stdout(&exported).contains("1 pinned contact keys"),
        "{exported:?}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let text = std::fs::read_to_string(&backup).unwrap();
    assert!(text.starts_with("p2pchat identity backup v1\nscrypt log_n=17 r=8 p=1 salt="));

    // The same name on a new machine: its first start made a key of its own, which the
    // server refuses, saying what to do.
    let moved = User::new("alice");
    let refused = moved.send(&server, "bob", "from a new key");
    assert_failed(&refused, "p2pchat identity import");
    assert_failed(&refused, "release-name alice");

    // A wrong passphrase, a cut file, a different identity here: clear refusals.
    let wrong = moved.run(
        &server,
        &[("P2PCHAT_PASSPHRASE", "wrong")],
        &["identity", "import", path(&backup)],
    );
    assert_failed(&wrong, "wrong passphrase");
    let cut = backup.with_file_name("cut.backup");
    std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
    assert_failed(
        &identity(&moved, &server, &["import", path(&cut)]),
        "not a valid identity backup",
    );
    assert_failed(
        &identity(&moved, &server, &["import", path(&backup)]),
        "--force",
    );
    let other = User::new("carol");
    assert_failed(
        &identity(&other, &server, &["import", path(&backup)]),
        "this backup is alice's, not carol's",
    );

    let imported = identity(&moved, &server, &["import", "--force", path(&backup)]);
    assert!(imported.status.success(), "{imported:?}");
    assert!(stdout(&imported).contains("replacing"), "{imported:?}");

    // The restored alice registers under her name, bob sees no key change, and bob's key
    // came along (it is pinned, not taken from the server anew).
    assert_sent(&moved.send(&server, "bob", "after the move"), "delivered");
    bob_listener.message("after the move");
    let whois = bob_listener.ok("whois alice");
    assert_eq!(whois["key_changed"], false, "{whois}");
    assert_eq!(key_events(&bob_listener.seen, "key_changed"), 0);
    let mut moved_listener = moved.listen(&server);
    moved_listener.online();
    let whois = moved_listener.ok("whois bob");
    assert!(whois["pinned_fingerprint"].is_string(), "{whois}");
    assert_eq!(whois["key_changed"], false, "{whois}");
    delivered(
        &mut bob_listener,
        &mut moved_listener,
        "alice",
        "welcome back",
    );
}

#[test]
fn a_rotation_signed_by_the_old_key_is_followed_by_contacts_and_messages_flow() {
    let (server, alice, _bob, mut bob_listener) = alice_writes_to_bob("with the first key");
    let before = bob_listener.ok("whois alice");

    let rotated = identity(&alice, &server, &["rotate"]);
    assert!(rotated.status.success(), "{rotated:?}");
    assert!(stdout(&rotated).contains("keys are rotated"), "{rotated:?}");
    assert!(!alice.home.join("alice/identity.next").exists());

    // Bob's client checks the statement against the key he pinned: a notice, no trust.
    assert_sent(
        &alice.send(&server, "bob", "with the second key"),
        "delivered",
    );
    let notice = bob_listener.expect("the rotation notice", |event| {
        event["event"] == "key_rotated" && event["user"] == "alice"
    });
    assert_eq!(notice["old"], before["pinned_fingerprint"]);
    bob_listener.message("with the second key");
    assert_eq!(key_events(&bob_listener.seen, "key_changed"), 0);
    let after = bob_listener.ok("whois alice");
    assert_eq!(after["key_changed"], false, "{after}");
    assert_eq!(after["pinned_fingerprint"], notice["new"]);
    assert_ne!(after["safety_number"], before["safety_number"]);

    // Both ways: alice, on her new key, hears from bob.
    let mut alice_listener = alice.listen(&server);
    alice_listener.online();
    assert_eq!(
        alice_listener.ok("whois bob")["safety_number"],
        after["safety_number"]
    );
    delivered(
        &mut bob_listener,
        &mut alice_listener,
        "alice",
        "to the second key",
    );
}

#[test]
fn a_released_name_is_bound_anew_and_contacts_see_a_loud_key_change() {
    let (server, _alice, bob, bob_listener) = alice_writes_to_bob("before the loss");

    // Alice lost her data dir and has no backup; the operator releases the name.
    let released = server.release_name("alice");
    assert!(released.status.success(), "{released:?}");
    assert!(stdout(&released).contains("released alice"), "{released:?}");
    assert!(
        server.log().contains("released the name"),
        "{}",
        server.log()
    );
    assert_failed(&server.release_name("alice"), "no user named alice");

    // The new alice's message waits in bob's mailbox; bob's client holds it, sealed, and
    // warns loudly (the name is bound to a key no statement of the old one vouches for).
    bob_listener.stop();
    let lost = User::new("alice");
    assert_sent(&lost.send(&server, "bob", "from a new key"), "queued");
    let mut bob_listener = bob.listen(&server);
    bob_listener.expect("the key change warning", |event| {
        event["event"] == "key_changed" && event["user"] == "alice"
    });
    assert_eq!(key_events(&bob_listener.seen, "key_rotated"), 0);
    // The number whois shows is the new key's, so comparing it with alice and trusting
    // works; the held message is shown then.
    let whois = bob_listener.ok("whois alice");
    assert_eq!(whois["key_changed"], true, "{whois}");
    assert!(whois["pinned_safety_number"].is_string(), "{whois}");
    let mut lost_listener = lost.listen(&server);
    lost_listener.online();
    assert_eq!(
        lost_listener.ok("whois bob")["safety_number"],
        whois["safety_number"]
    );
    bob_listener.ok("trust alice");
    bob_listener.message("from a new key");
}

/// Mail alice sealed in her session with bob while bob was away cannot open on bob's
/// restored data dir (a backup keeps the identity and pins, not the sessions): bob is told
/// so once, asks alice (in a new session) to send it again, and every message is then
/// shown exactly once and in the order alice wrote them.
#[test]
fn mail_sealed_in_a_session_lost_by_a_restored_backup_is_asked_for_again_and_shown_once_in_order() {
    let server = Discovery::start();
    let alice = User::new("alice");
    let bob = User::new("bob");
    let mut alice_listener = alice.listen(&server);
    alice_listener.online();
    let mut bob_listener = bob.listen(&server);
    bob_listener.online();
    // A session both ways: alice's mail below is sealed in it.
    delivered(&mut alice_listener, &mut bob_listener, "bob", "hello bob");
    delivered(
        &mut bob_listener,
        &mut alice_listener,
        "alice",
        "hello alice",
    );
    bob_listener.stop();
    let backup = bob.home.with_file_name("bob.backup");
    let exported = identity(&bob, &server, &["export", path(&backup)]);
    assert!(exported.status.success(), "{exported:?}");

    let bodies = ["one", "two", "three", "four"];
    for body in bodies {
        let sent = alice_listener.ok(&format!("send bob {body}"));
        assert_eq!(sent["status"], "queued", "{sent}");
    }

    // Bob's machine is gone: the backup goes onto a fresh data dir.
    let restored = User::new("bob");
    let imported = identity(&restored, &server, &["import", path(&backup)]);
    assert!(imported.status.success(), "{imported:?}");
    let mut restored_listener = restored.listen(&server);
    restored_listener.online();
    let notice = restored_listener.expect("the notice of mail asked for again", |event| {
        event["event"] == "resend_asked"
    });
    assert_eq!(notice["from"], "alice", "{notice}");
    // Alice's read receipt for "hello alice", if it went after bob stopped, waited in the
    // mailbox too, sealed in the lost session: it cannot be told from a message without
    // opening it, so it is counted (and asked for: alice, who has no message of that id,
    // sends nothing for it).
    let asked = notice["messages"].as_u64().unwrap_or_default();
    let sent = bodies.len() as u64;
    assert!((sent..=sent + 1).contains(&asked), "{notice}");
    assert!(
        notice["text"]
            .as_str()
            .is_some_and(|text| text.contains("asked alice to send them again")),
        "{notice}"
    );
    for body in bodies {
        restored_listener.message(body);
    }
    restored_listener.drain_for(Duration::from_millis(1_500));
    let shown: Vec<(String, String)> = restored_listener.messages();
    let wanted: Vec<(String, String)> = bodies
        .iter()
        .map(|body| ("alice".to_owned(), (*body).to_owned()))
        .collect();
    assert_eq!(shown, wanted);
    let refused = restored_listener
        .seen
        .iter()
        .filter(|event| event["event"] == "refused")
        .count();
    assert_eq!(refused, 0, "{:#?}", restored_listener.seen);
    // The conversation goes on in the new session, both ways.
    delivered(&mut restored_listener, &mut alice_listener, "alice", "back");
    delivered(
        &mut alice_listener,
        &mut restored_listener,
        "bob",
        "welcome back",
    );
}

/// A server, alice and bob, bob listening, and one message from alice that bob received
/// (so bob pinned alice's key).
fn alice_writes_to_bob(body: &str) -> (Discovery, User, User, Listener) {
    let server = Discovery::start();
    let alice = User::new("alice");
    let bob = User::new("bob");
    let mut bob_listener = bob.listen(&server);
    bob_listener.online();
    assert_sent(&alice.send(&server, "bob", body), "delivered");
    bob_listener.message(body);
    (server, alice, bob, bob_listener)
}

/// `from` sends `body` to `to_name`, who listens on `to`: delivered directly and received.
fn delivered(from: &mut Listener, to: &mut Listener, to_name: &str, body: &str) {
    let sent = from.ok(&format!("send {to_name} {body}"));
    assert_eq!(sent["status"], "delivered", "{sent}");
    to.message(body);
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}
