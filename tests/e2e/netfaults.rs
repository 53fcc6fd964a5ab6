//! Network faults between hosts, with network namespaces: two test hosts joined by a veth
//! pair on 10.231.N.0/24 (addresses that exist only inside the namespaces these tests
//! create). The "server host" runs the discovery server and alice; the "bob host" runs bob.
//! Faults are firewall rules inside the namespaces.
//!
//! These need root, `ip` (iproute2) and `iptables`; without them each test prints why and
//! returns. CI runs as root with both installed (`.ci/run`), so there they really run.
//! The namespaces are deleted by a guard even when a test fails.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicU8, Ordering},
    time::{Duration, Instant},
};

use crate::util::{
    Discovery, DiscoveryOptions, Launcher, Listener, User, root_tools_missing, scaled,
};

/// Two namespaces joined by a veth pair; deleted on drop.
struct Hosts {
    server_ns: String,
    bob_ns: String,
    server_ip: String,
    bob_ip: String,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("{program}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl Hosts {
    /// Creates the two hosts, or says why it cannot.
    fn create() -> Result<Self, String> {
        if let Some(reason) = root_tools_missing(&["ip", "iptables"]) {
            return Err(reason);
        }
        // Unique per test in this run, and distinct from concurrent runs (by pid).
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let index = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let subnet = (pid % 60) * 4 + u32::from(index % 4) + 1;
        let tag = format!("{}{index}", pid % 100_000);
        let hosts = Self {
            server_ns: format!("p2pS{tag}"),
            bob_ns: format!("p2pB{tag}"),
            server_ip: format!("10.231.{subnet}.1"),
            bob_ip: format!("10.231.{subnet}.2"),
        };
        // The guard exists before the first namespace does, so a failed step cleans up.
        hosts.remove();
        let (server_dev, bob_dev) = (format!("vS{tag}"), format!("vB{tag}"));
        run("ip", &["netns", "add", &hosts.server_ns])?;
        run("ip", &["netns", "add", &hosts.bob_ns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &server_dev,
                "netns",
                &hosts.server_ns,
                "type",
                "veth",
                "peer",
                "name",
                &bob_dev,
                "netns",
                &hosts.bob_ns,
            ],
        )?;
        for (ns, dev, ip) in [
            (&hosts.server_ns, &server_dev, &hosts.server_ip),
            (&hosts.bob_ns, &bob_dev, &hosts.bob_ip),
        ] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev],
            )?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    fn remove(&self) {
        for ns in [&self.server_ns, &self.bob_ns] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Runs `iptables <rule>` in namespace `ns`.
    fn iptables(&self, ns: &str, rule: &[&str]) {
        let mut args = vec!["netns", "exec", ns, "iptables"];
        args.extend_from_slice(rule);
        run("ip", &args).expect("iptables rule");
    }

    /// Cuts the link both ways (every packet between the hosts dropped on arrival), or
    /// heals it.
    fn partition(&self, cut: bool) {
        let action = if cut { "-A" } else { "-D" };
        self.iptables(
            &self.bob_ns,
            &[action, "INPUT", "-s", &self.server_ip, "-j", "DROP"],
        );
        self.iptables(
            &self.server_ns,
            &[action, "INPUT", "-s", &self.bob_ip, "-j", "DROP"],
        );
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Starts the hosts, or prints why this test is skipped.
fn hosts_or_skip(test: &str) -> Option<Hosts> {
    match Hosts::create() {
        Ok(hosts) => Some(hosts),
        Err(reason) => {
            eprintln!("SKIPPED {test}: needs root, `ip netns` and iptables: {reason}");
            None
        }
    }
}

const BOB_PORT: &str = "7000";

fn start_server(hosts: &Hosts, args: &[&str]) -> Discovery {
    let mut options = DiscoveryOptions::new();
    options.address = format!("{}:5001", hosts.server_ip)
        .parse()
        .expect("server address");
    options.launcher = Launcher::netns(&hosts.server_ns);
    options.args = args.iter().map(|arg| (*arg).to_owned()).collect();
    Discovery::start_custom(None, options)
}

fn status(bot: &mut Listener, command: &str) -> String {
    bot.ok(command)["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn an_unreachable_listener_still_gets_its_messages_through_the_mailbox_at_once() {
    let Some(hosts) = hosts_or_skip("netfaults::unreachable listener") else {
        return;
    };
    let messages = scaled(5, 50);
    let server = start_server(&hosts, &[]);
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    // Bob's host drops everything sent to his P2P port; his own connections out work (as
    // behind a NAT or a strict firewall).
    hosts.iptables(
        &hosts.bob_ns,
        &[
            "-A", "INPUT", "-p", "tcp", "--dport", BOB_PORT, "-j", "DROP",
        ],
    );
    let mut bob_bot = bob.listen_custom(
        &server,
        &Launcher::netns(&hosts.bob_ns),
        &["--port", BOB_PORT],
        &[],
    );
    bob_bot.online();
    // A short direct-connect timeout keeps the test quick; the route is the same.
    let mut alice_bot = alice.listen_custom(
        &server,
        &Launcher::netns(&hosts.server_ns),
        &[],
        &[("P2PCHAT_CONNECT_TIMEOUT_MS", "300")],
    );
    alice_bot.online();

    let mut slowest = Duration::ZERO;
    for index in 0..messages {
        let body = format!("relayed {index}");
        let result = alice_bot.ok(&format!("send bob {body}"));
        assert_eq!(result["status"], "queued", "{result}");
        // Prompt: pushed by the server, not found by the 60 s mail timer.
        let queued_at = Instant::now();
        assert_eq!(bob_bot.message(&body)["from"], "alice");
        slowest = slowest.max(queued_at.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(5),
        "mail reached the online recipient only after {slowest:?}"
    );
    // Bob can still reach alice directly.
    assert_eq!(status(&mut bob_bot, "send alice thanks"), "delivered");
    alice_bot.message("thanks");

    bob_bot.ok("blocked");
    for index in 0..messages {
        assert_eq!(bob_bot.count(&format!("relayed {index}")), 1);
    }
    eprintln!("unreachable listener: {messages} messages relayed, slowest {slowest:?}");
}

#[test]
fn a_partition_between_client_and_server_heals_and_the_client_re_registers() {
    let Some(hosts) = hosts_or_skip("netfaults::partition") else {
        return;
    };
    let during = scaled(3, 30);
    // Heartbeats every second, presence gone after 3 s without one.
    let server = start_server(
        &hosts,
        &["--heartbeat-secs", "1", "--presence-ttl-secs", "3"],
    );
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let mut bob_bot = bob.listen_custom(
        &server,
        &Launcher::netns(&hosts.bob_ns),
        &["--port", BOB_PORT],
        &[("P2PCHAT_PONG_TIMEOUT_MS", "1500")],
    );
    bob_bot.online();
    let mut alice_bot = alice.listen_custom(
        &server,
        &Launcher::netns(&hosts.server_ns),
        &[],
        &[("P2PCHAT_CONNECT_TIMEOUT_MS", "300")],
    );
    alice_bot.online();
    assert_eq!(status(&mut alice_bot, "send bob before"), "delivered");
    bob_bot.message("before");

    let cut_at = Instant::now();
    hosts.partition(true);
    // Bob notices the dead connection by himself (no answer to his heartbeat).
    bob_bot.expect("bob to notice the partition", |event| {
        event["event"] == "offline"
    });
    let noticed = cut_at.elapsed();
    // Meanwhile alice's messages cannot reach bob directly: they are queued.
    for index in 0..during {
        assert_eq!(
            status(&mut alice_bot, &format!("send bob during {index}")),
            "queued"
        );
    }
    hosts.partition(false);
    let healed_at = Instant::now();
    bob_bot.online();
    let rejoined = healed_at.elapsed();
    for index in 0..during {
        bob_bot.message(&format!("during {index}"));
    }
    // And the direct route works again, both ways.
    assert_eq!(status(&mut alice_bot, "send bob after"), "delivered");
    bob_bot.message("after");
    assert_eq!(status(&mut bob_bot, "send alice back"), "delivered");
    alice_bot.message("back");

    bob_bot.ok("blocked");
    let mut shown: Vec<String> = bob_bot
        .messages()
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    shown.sort();
    let mut expected: Vec<String> = (0..during).map(|index| format!("during {index}")).collect();
    expected.extend(["before".to_owned(), "after".to_owned()]);
    expected.sort();
    assert_eq!(shown, expected, "every message shown exactly once");
    eprintln!("partition: noticed after {noticed:?}, re-registered {rejoined:?} after the heal");
}
