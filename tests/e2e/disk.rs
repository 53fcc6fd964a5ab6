//! Full disks and unwritable data dirs: a clear error, a non-zero exit, no panic, nothing
//! corrupted and nothing lost; a server whose disk filled recovers without a restart once
//! space is freed.
//!
//! The full-disk cases mount a small tmpfs over a data dir inside a private mount namespace
//! (a `sleep` started by `unshare -m`, entered with `nsenter` for each process), so nothing
//! outside the test sees the mount and it disappears with the namespace. They need root
//! and util-linux; without them the test prints why and returns.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::util::{
    Discovery, DiscoveryOptions, Launcher, User, WAIT, free_port, root_tools_missing, run_bounded,
    scaled,
};

/// A private mount namespace held open by a `sleep`; it (and every mount in it) goes away
/// when the guard drops.
struct MountNamespace {
    holder: Child,
}

impl MountNamespace {
    fn create() -> Result<Self, String> {
        if let Some(reason) = root_tools_missing(&["unshare", "nsenter", "mount"]) {
            return Err(reason);
        }
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "300"])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|error| format!("unshare: {error}"))?;
        let mut namespace = Self { holder };
        // Ready once the holder is in a mount namespace other than ours.
        let ours = std::fs::read_link("/proc/self/ns/mnt").map_err(|error| error.to_string())?;
        let deadline = Instant::now() + WAIT;
        loop {
            let theirs = std::fs::read_link(format!("/proc/{}/ns/mnt", namespace.holder.id()));
            if theirs.is_ok_and(|theirs| theirs != ours) {
                return Ok(namespace);
            }
            if namespace.holder.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                return Err("unshare --mount did not start (no CAP_SYS_ADMIN?)".to_owned());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn launcher(&self) -> Launcher {
        Launcher::mount_namespace_of(self.holder.id())
    }

    /// Runs a command inside the namespace to completion; returns whether it succeeded.
    fn run(&self, program: &str, args: &[&str]) -> bool {
        let mut command = self.launcher().command(Path::new(program));
        command.args(args);
        run_bounded(command).status.success()
    }

    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) over `dir`.
    fn mount_tmpfs(&self, dir: &Path, size: &str, read_only: bool) {
        std::fs::create_dir_all(dir).expect("mount point");
        let options = format!(
            "size={size},mode=0700{}",
            if read_only { ",ro" } else { "" }
        );
        let dir = dir.to_str().expect("utf-8 path");
        assert!(
            self.run("mount", &["-t", "tmpfs", "-o", &options, "tmpfs", dir]),
            "mount tmpfs over {dir}"
        );
    }
}

impl Drop for MountNamespace {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn namespace_or_skip(test: &str) -> Option<MountNamespace> {
    match MountNamespace::create() {
        Ok(namespace) => Some(namespace),
        Err(reason) => {
            eprintln!("SKIPPED {test}: needs root and a private mount namespace: {reason}");
            None
        }
    }
}

/// A scripted command failed cleanly: non-zero exit, a `p2pchat:` line naming the problem,
/// no panic.
fn assert_clean_failure(output: &std::process::Output, wanted: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected a failure; stderr: {stderr}"
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "a plain error exit, not a signal: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.starts_with("p2pchat: ") && wanted.iter().any(|word| stderr.contains(word)),
        "the error should say what is wrong ({wanted:?}): {stderr}"
    );
}

#[test]
fn an_unwritable_data_dir_is_a_clear_error_not_a_panic() {
    let server = Discovery::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // A data dir under a regular file can never be created, root or not.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").expect("file");
    let mut user = User::new("alice");
    user.home = file.join("home");
    assert_clean_failure(
        &user.send(&server, "bob", "hello"),
        &["Not a directory", "not a directory"],
    );

    // A read-only file system (root is not stopped by modes, so a read-only mount it is).
    let Some(namespace) = namespace_or_skip("disk::read-only data dir") else {
        return;
    };
    let read_only = dir.path().join("read-only");
    namespace.mount_tmpfs(&read_only, "1m", true);
    user.home = read_only.join("home");
    let output = user.send_custom(&server, &namespace.launcher(), &[], "bob", "hello");
    assert_clean_failure(&output, &["Read-only file system", "read-only"]);
}

/// Regression (issue 8): the server's store refused every write after the disk filled
/// until it was restarted. Now, once space is freed, deposits work again in the same
/// process, and every message (stored before, failed while full, sent after) is shown once.
#[test]
fn a_full_disk_at_the_server_fails_deposits_clearly_and_recovers_without_a_restart() {
    let Some(namespace) = namespace_or_skip("disk::full server disk") else {
        return;
    };
    let before_full = scaled(5, 50);
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("discovery");
    namespace.mount_tmpfs(&data_dir, "16m", false);
    let mut options = DiscoveryOptions::new();
    options.address = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    options.launcher = namespace.launcher();
    options.data_dir = Some(data_dir.clone());
    let server = Discovery::start_custom(None, options);

    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut first = bob.listen(&server);
    first.online();
    first.stop();
    let mut alice_bot = alice.listen(&server);
    alice_bot.online();
    for index in 0..before_full {
        let result = alice_bot.ok(&format!("send bob stored {index}"));
        assert_eq!(result["status"], "queued", "{result}");
    }

    // Fill the disk to the last byte.
    let filler = data_dir.join("filler");
    let filler_arg = format!("of={}", filler.display());
    namespace.run("dd", &["if=/dev/zero", &filler_arg, "bs=64k"]);
    // Deposits now fail, each with a clear reason, and stay in alice's outbox. (The store
    // may still fit a few into pages it already has; the loop is bounded.)
    let mut sent_while_full = Vec::new();
    let mut failure = None;
    for index in 0..200 {
        let body = format!("while full {index}");
        let result = alice_bot.run(&format!("send bob {body}"));
        sent_while_full.push(body);
        if result["status"] == "failed" {
            failure = Some(result);
            break;
        }
        assert_eq!(result["status"], "queued", "{result}");
    }
    let failure = failure.expect("no deposit failed on a full disk");
    assert_eq!(failure["ok"], false, "{failure}");
    assert!(
        failure.to_string().contains("kept in the outbox"),
        "{failure}"
    );
    let reason = failure["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains("storage is full"),
        "{failure}\n{}",
        server.log()
    );
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");

    // Space again (the filler goes); the server keeps running. Its store reopens the
    // database by itself (after a short backoff), so a new deposit soon goes through.
    let filler_path = filler.to_str().expect("utf-8 path");
    assert!(namespace.run("rm", &["-f", filler_path]));
    let mut sent_after_space = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let body = format!("after space {}", sent_after_space.len());
        let result = alice_bot.run(&format!("send bob {body}"));
        sent_after_space.push(body);
        if result["status"] == "queued" {
            break;
        }
        assert_eq!(result["status"], "failed", "{result}");
        assert!(
            Instant::now() < deadline,
            "deposits still fail with space freed: {result}\n{}",
            server.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Alice's client retries its outbox when it connects: restart the client (not the
    // server); bob gets everything.
    alice_bot.stop();
    let mut alice_bot = alice.listen(&server);
    alice_bot.online();
    let mut bob_bot = bob.listen(&server);
    for index in 0..before_full {
        bob_bot.message(&format!("stored {index}"));
    }
    for body in sent_while_full.iter().chain(&sent_after_space) {
        bob_bot.message(body);
    }
    bob_bot.ok("blocked");
    let mut shown: Vec<String> = bob_bot
        .messages()
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    shown.sort();
    let mut expected: Vec<String> = (0..before_full)
        .map(|index| format!("stored {index}"))
        .chain(sent_while_full.iter().cloned())
        .chain(sent_after_space.iter().cloned())
        .collect();
    expected.sort();
    assert_eq!(shown, expected, "every message shown exactly once");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    eprintln!(
        "full disk: {} deposits before the first failure; failure reason: {reason}; \
         {} sends after space was freed until one was queued",
        sent_while_full.len() - 1,
        sent_after_space.len()
    );
}

/// Regression (issue 8): a client whose disk filled refused every message, and kept its
/// state file closed, until it was restarted. Now, while full, mail waits in the mailbox;
/// once space is freed the same process takes it, and every message is shown once.
#[test]
fn a_full_disk_at_the_recipient_leaves_mail_in_the_mailbox_until_it_has_space() {
    let Some(namespace) = namespace_or_skip("disk::full client disk") else {
        return;
    };
    let server = Discovery::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mounted = dir.path().join("bob-home");
    namespace.mount_tmpfs(&mounted, "4m", false);
    let (alice, mut bob) = (User::new("alice"), User::new("bob"));
    bob.home = mounted.join("home");
    let mut bob_bot = bob.listen_custom(&server, &namespace.launcher(), &[], &[]);
    bob_bot.online();
    let mut alice_bot = alice.listen(&server);
    alice_bot.online();
    assert_eq!(alice_bot.ok("send bob with space")["status"], "delivered");
    bob_bot.message("with space");

    let filler = mounted.join("filler");
    let filler_arg = format!("of={}", filler.display());
    namespace.run("dd", &["if=/dev/zero", &filler_arg, "bs=64k"]);
    // Bob cannot store: he refuses direct delivery as "unavailable", so alice's client
    // falls back to the mailbox, where the mail waits (his fetches leave it there).
    let mut sent_while_full = Vec::new();
    for index in 0..200 {
        let body = format!("while full {index}");
        let result = alice_bot.ok(&format!("send bob {body}"));
        sent_while_full.push(body);
        if result["status"] == "queued" {
            break;
        }
        assert_eq!(result["status"], "delivered", "{result}");
    }
    let stuck = sent_while_full.last().expect("sent").clone();
    assert_eq!(bob_bot.count(&stuck), 0, "shown without being stored");

    // Space again: bob's client opens its state file again by itself and fetches the mail
    // left in his mailbox soon after (no restart), and direct delivery works again.
    let filler_path = filler.to_str().expect("utf-8 path");
    assert!(namespace.run("rm", &["-f", filler_path]));
    bob_bot.message(&stuck);
    let after = alice_bot.ok("send bob after space");
    assert_eq!(after["status"], "delivered", "{after}");
    bob_bot.message("after space");
    bob_bot.ok("blocked");
    let mut bodies: Vec<String> = bob_bot
        .messages()
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    bodies.sort();
    let mut expected: Vec<String> = sent_while_full;
    expected.push("with space".to_owned());
    expected.push("after space".to_owned());
    expected.sort();
    assert_eq!(bodies, expected, "every message shown exactly once");
}
