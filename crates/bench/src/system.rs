//! What the benchmarks need from the operating system: the open-file limit, a process's
//! resident memory, loopback source addresses, and child processes that speak one line at a
//! time on their standard streams.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};

use crate::BenchError;

/// Raises this process's soft open-file limit to its hard limit; returns the new limit.
pub fn raise_open_file_limit() -> Result<u64, BenchError> {
    rlimit::increase_nofile_limit(u64::MAX).map_err(BenchError::Io)
}

/// This process's hard open-file limit (what a process can raise its own limit to without
/// privileges).
pub fn open_file_hard_limit() -> Result<u64, BenchError> {
    let (_, hard) = rlimit::Resource::NOFILE.get().map_err(BenchError::Io)?;
    Ok(hard)
}

/// The resident set size of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64, BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| BenchError::Protocol(format!("no VmRSS in /proc/{pid}/status")))
}

/// Kernel clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// The CPU time process `pid` has used so far, user + system, in seconds (fields 14 and 15
/// of `/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> Result<f64, BenchError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the name, field 3 (state) is index 0, so fields 14 and 15 are 11 and 12.
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|field| field.parse::<u64>().ok())
    };
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok((user + system) as f64 / USER_HZ),
        _ => Err(BenchError::Protocol(format!(
            "no CPU times in /proc/{pid}/stat"
        ))),
    }
}

/// The CPU time of every process in `pids` still running, summed, in seconds.
pub fn cpu_seconds_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|pid| cpu_seconds(*pid).ok()).sum()
}

/// How long the threads of process `pid` have waited on a run queue for a core so far,
/// and how many times they were scheduled in, summed over its threads (fields 2 and 3 of
/// `/proc/<pid>/task/<tid>/schedstat`). Threads that ended are not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunQueue {
    /// Time spent runnable but not running, in seconds.
    pub waited: f64,
    /// Times a thread of the process was put on a core.
    pub slices: u64,
}

impl RunQueue {
    /// The run-queue figures of every process in `pids` still running, summed.
    pub fn of(pids: &[u32]) -> Self {
        let mut total = Self::default();
        for pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
                    continue;
                };
                let mut fields = stat.split_whitespace().skip(1);
                let (Some(Ok(waited)), Some(Ok(slices))) = (
                    fields.next().map(str::parse::<u64>),
                    fields.next().map(str::parse::<u64>),
                ) else {
                    continue;
                };
                total.waited += waited as f64 / 1e9;
                total.slices += slices;
            }
        }
        total
    }

    /// What was used between `before` and `self`, as "waited W ms per second, M µs per
    /// slice" over `seconds`.
    pub fn describe_since(&self, before: &Self, seconds: f64) -> String {
        let waited = (self.waited - before.waited).max(0.0);
        let slices = self.slices.saturating_sub(before.slices).max(1);
        format!(
            "waited {:.0} ms/s, {:.0} µs per slice",
            waited * 1e3 / seconds,
            waited * 1e6 / slices as f64
        )
    }
}

/// The processes below `pid` (children, grandchildren, ...), from `/proc/<pid>/task/*/children`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    // Bounded: a process tree of a few levels; the cap only guards against a loop.
    while let Some(parent) = queue.pop() {
        if found.len() > 1000 {
            break;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in children
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
            {
                found.push(child);
                queue.push(child);
            }
        }
    }
    found
}

/// The command name of process `pid` (`/proc/<pid>/comm`).
pub fn command_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|name| name.trim().to_owned())
}

/// The `index`th loopback source address for client sockets: 127.0.0.2, 127.0.0.3, ...
/// (the whole 127.0.0.0/8 is loopback on Linux). Each address has its own ephemeral ports,
/// so many clients do not run out of them.
pub fn loopback_source(index: usize) -> Ipv4Addr {
    let index = u32::try_from(index % 250_000).unwrap_or(0);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + index)
}

/// A binary built next to `exe` (the same `target/<profile>` folder), if it exists. `exe`
/// may also be a test binary in `target/<profile>/deps`.
pub fn sibling_binary(exe: &Path, name: &str) -> Option<PathBuf> {
    let folder = exe.parent()?;
    [Some(folder), folder.parent()]
        .into_iter()
        .flatten()
        .map(|folder| folder.join(name))
        .find(|path| path.is_file())
}

/// A child process driven line by line: commands on its standard input, answers on its
/// standard output. Killed when dropped; closing its input asks it to stop.
#[derive(Debug)]
pub struct LineChild {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    what: String,
}

impl LineChild {
    /// Spawns `command` with piped standard input and output (standard error inherited).
    pub fn spawn(mut command: Command, what: impl Into<String>) -> Result<Self, BenchError> {
        let what = what.into();
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| BenchError::Child(format!("cannot start {what}: {error}")))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Child(format!("{what} has no standard output")))?;
        Ok(Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            what,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> Result<u32, BenchError> {
        self.child
            .id()
            .ok_or_else(|| BenchError::Child(format!("{} has exited", self.what)))
    }

    /// The next line the child prints that starts with `prefix`, without the prefix; other
    /// lines are skipped. Fails after `timeout` or if the child closes its output.
    pub async fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String, BenchError> {
        let wait = async {
            loop {
                match self.lines.next_line().await? {
                    Some(line) => {
                        if let Some(rest) = line.strip_prefix(prefix) {
                            return Ok(rest.trim().to_owned());
                        }
                    }
                    None => {
                        return Err(BenchError::Child(format!(
                            "{} exited before saying {prefix:?}",
                            self.what
                        )));
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            BenchError::Timeout(format!(
                "{} did not say {prefix:?} in {timeout:?}",
                self.what
            ))
        })?
    }

    /// Writes one line to the child's standard input.
    pub async fn say(&mut self, line: &str) -> Result<(), BenchError> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| BenchError::Child(format!("{}'s input is closed", self.what)))?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Closes the child's input (asking it to stop) and waits up to `timeout` for it to
    /// exit; kills it if it does not.
    pub async fn stop(mut self, timeout: Duration) {
        drop(self.stdin.take());
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_sources_count_up_from_127_0_0_2() {
        assert_eq!(loopback_source(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(loopback_source(1), Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(loopback_source(300), Ipv4Addr::new(127, 0, 1, 46));
        assert!(loopback_source(7).is_loopback());
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let spent = cpu_seconds(std::process::id()).unwrap();
        assert!(spent.is_finite() && spent >= 0.0);
    }

    #[test]
    fn own_run_queue_is_readable() {
        let this = RunQueue::of(&[std::process::id()]);
        assert!(this.slices > 0, "{this:?}");
        assert!(this.waited >= 0.0);
    }

    #[test]
    fn own_memory_is_readable() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
