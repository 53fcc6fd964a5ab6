//! The `p2pchat` client binary: resident memory when idle at its prompt, and the time from
//! starting it to its prompt.
//!
//! The binary is the one built next to this one (`cargo build --release -p cli`). It runs
//! interactively under a pseudo-terminal made by `script(1)` (rustyline needs a terminal),
//! against an in-process discovery server on loopback. The first start creates the
//! identity and is reported apart; the start-up figure is the median of the later starts.
//! Idle memory is `VmRSS` of the `p2pchat` process after it has sat at its prompt, online.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::Command,
};
use tokio_util::sync::CancellationToken;

use crate::{Bench, BenchError, Row, Target, direct, system};

/// The user the client runs as; its prompt is `benchuser> `.
const USER: &str = "benchuser";
/// How long one start may take to show its prompt.
const PROMPT_TIMEOUT: Duration = Duration::from_secs(15);
const MEMORY_TARGET_MIB: f64 = 15.0;
const STARTUP_TARGET_MS: f64 = 100.0;

/// Measures the two client rows (unmeasured, saying why, when the binary is not built).
pub async fn rows(bench: &Bench) -> Result<Vec<Row>, BenchError> {
    let memory_name = "client: idle memory (p2pchat at its prompt)";
    let startup_name = "client: start-up to prompt (p2pchat)";
    let Some(binary) = system::sibling_binary(&bench.exe, "p2pchat") else {
        let why = "the p2pchat binary is not built next to this one; run `cargo build --release -p cli` first";
        return Ok(vec![
            Row::unmeasured(memory_name, "MiB", Target::AtMost(MEMORY_TARGET_MIB), why),
            Row::unmeasured(startup_name, "ms", Target::AtMost(STARTUP_TARGET_MS), why),
        ]);
    };
    let folder = tempfile::Builder::new()
        .prefix("p2pchat-bench-client-")
        .tempdir()?;
    let shutdown = CancellationToken::new();
    let result = measure(bench, &binary, folder.path(), &shutdown).await;
    shutdown.cancel();
    let (first_start, mut later_starts, idle_kib, idle_time) = result?;
    later_starts.sort_unstable();
    let median = later_starts
        .get(later_starts.len() / 2)
        .copied()
        .unwrap_or(first_start);
    Ok(vec![
        Row::new(
            memory_name,
            idle_kib as f64 / 1024.0,
            "MiB",
            Target::AtMost(MEMORY_TARGET_MIB),
        )
        .with_note(format!(
            "VmRSS of the p2pchat process after {:.1} s idle at its prompt, registered with a loopback discovery server.",
            idle_time.as_secs_f64()
        )),
        Row::new(
            startup_name,
            median.as_secs_f64() * 1000.0,
            "ms",
            Target::AtMost(STARTUP_TARGET_MS),
        )
        .with_note(format!(
            "Median of {} starts with an existing identity, from spawn (under script(1) for a terminal) to the prompt on the terminal; the first start, which creates the identity, took {:.1} ms.",
            later_starts.len(),
            first_start.as_secs_f64() * 1000.0
        )),
    ])
}

/// Runs the client several times: (first start, later starts, idle RSS in KiB, idle time).
async fn measure(
    bench: &Bench,
    binary: &Path,
    folder: &Path,
    shutdown: &CancellationToken,
) -> Result<(Duration, Vec<Duration>, u64, Duration), BenchError> {
    let server = direct::in_process_server(&folder.join("discovery"), shutdown).await?;
    let home = folder.join("home");
    let starts = bench.mode.pick(6, 2);
    let idle = bench
        .mode
        .pick(Duration::from_secs(3), Duration::from_millis(300));
    let mut times = Vec::new();
    let mut idle_kib = 0;
    for start in 0..starts {
        let last = start + 1 == starts;
        let mut command = Command::new("script");
        command
            .args(["-qfec", "exec \"$P2PCHAT_BENCH_CLIENT\"", "/dev/null"])
            .env("P2PCHAT_BENCH_CLIENT", binary)
            .env("P2PCHAT_USER", USER)
            .env("P2PCHAT_HOME", &home)
            .env("P2PCHAT_SERVER", server.to_string())
            .env("TERM", "xterm")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|error| BenchError::Child(format!("cannot run script(1): {error}")))?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Child("script has no output".into()))?;
        let prompt = format!("{USER}> ");
        let mut seen = Vec::new();
        let wait = async {
            let mut buffer = [0u8; 4096];
            loop {
                let read = stdout.read(&mut buffer).await?;
                if read == 0 {
                    return Err(BenchError::Child(format!(
                        "p2pchat exited before its prompt: {}",
                        String::from_utf8_lossy(&seen)
                    )));
                }
                seen.extend_from_slice(&buffer[..read]);
                if seen
                    .windows(prompt.len())
                    .any(|window| window == prompt.as_bytes())
                {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(PROMPT_TIMEOUT, wait)
            .await
            .map_err(|_| BenchError::Timeout(format!("p2pchat prompt in {PROMPT_TIMEOUT:?}")))??;
        times.push(started.elapsed());
        if last {
            tokio::time::sleep(idle).await;
            let script_pid = child
                .id()
                .ok_or_else(|| BenchError::Child("script exited".into()))?;
            let client_pid = system::descendants(script_pid)
                .into_iter()
                .find(|pid| system::command_name(*pid).as_deref() == Some("p2pchat"))
                .ok_or_else(|| BenchError::Child("no p2pchat process under script".into()))?;
            idle_kib = system::rss_kib(client_pid)?;
        }
        // Keep reading so the terminal never blocks the client while it quits.
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink).await;
        });
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"quit\r").await;
            let _ = stdin.flush().await;
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        drain.abort();
    }
    let first = times.remove(0);
    Ok((first, times, idle_kib, idle))
}
